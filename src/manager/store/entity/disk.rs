//! The `disks` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "disks")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub vm_id: String,
    pub name: String,
    pub size_bytes: i64,
    pub path: Option<String>,
    pub created_at: DateTimeUtc,
    /// The agent's disk id (unique per host); None for disks entered by hand.
    pub device_id: Option<i64>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
