//! The `rpo_history` table: one row per VPG, tier and bucket (see `model::rpo_history`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "rpo_history")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub vpg_id: String,
    #[sea_orm(primary_key, auto_increment = false)]
    pub tier: i16,
    /// Bucket start, seconds since the epoch.
    #[sea_orm(primary_key, auto_increment = false)]
    pub at_secs: i64,
    pub rpo_ms: Option<i64>,
    pub history_secs: Option<i64>,
    pub status: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
