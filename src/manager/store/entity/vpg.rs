//! The `vpgs` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "vpgs")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub name: String,
    pub description: String,
    pub protected_site_id: Option<String>,
    pub recovery_site_id: String,
    pub settings: Json,
    pub lifecycle: String,
    pub paused: bool,
    pub status: String,
    pub sub_status: String,
    pub rpo_actual_ms: Option<i64>,
    pub history_actual_secs: Option<i64>,
    pub journal_bytes: i64,
    pub protected_since: Option<DateTimeUtc>,
    /// Start of the history the VPG can have with its current members (see the
    /// control migration); reset when a VM joins.
    pub history_since: Option<DateTimeUtc>,
    /// Time of the newest recoverable checkpoint (the RPO is now minus this).
    pub newest_recoverable_at: Option<DateTimeUtc>,
    pub last_test_at: Option<DateTimeUtc>,
    /// Only goes up; a failover or move bumps it (fencing).
    pub fencing_generation: i64,
    /// The operation (`tasks` row) running on the VPG, and its phase.
    pub operation_id: Option<String>,
    pub operation_phase: Option<String>,
    pub version: i64,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
