//! The `checkpoints` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "checkpoints")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub vpg_id: String,
    pub taken_at: DateTimeUtc,
    pub kind: String,
    pub tag: Option<String>,
    pub recoverable: bool,
    /// How the round's guests were quiesced: `guest_agent`, `paused`, or None when the
    /// round did not quiesce.
    pub quiesce: Option<String>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
