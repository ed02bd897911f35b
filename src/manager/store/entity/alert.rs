//! The `alerts` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "alerts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub kind: String,
    pub severity: String,
    pub vpg_id: Option<String>,
    pub host_id: Option<String>,
    pub site_id: Option<String>,
    pub message: String,
    pub affected_count: i32,
    pub raised_at: DateTimeUtc,
    pub cleared_at: Option<DateTimeUtc>,
    pub acknowledged_by: Option<String>,
    pub acknowledged_at: Option<DateTimeUtc>,
    pub details: Option<Json>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
