//! The `recovery_reports` table: one row per ended failover, test or move.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "recovery_reports")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub vpg_id: String,
    pub vpg_name: String,
    pub kind: String,
    pub result: String,
    pub checkpoint_id: Option<i64>,
    pub checkpoint_at: Option<DateTimeUtc>,
    pub created_by: String,
    pub started_at: DateTimeUtc,
    pub ended_at: DateTimeUtc,
    pub rto_ms: Option<i64>,
    pub notes: String,
    pub steps: Json,
    pub details: Json,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
