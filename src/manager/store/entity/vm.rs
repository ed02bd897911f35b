//! The `vms` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "vms")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub host_id: String,
    pub name: String,
    pub power_state: String,
    pub cpus: i32,
    pub memory_mib: i64,
    pub nics: Json,
    /// How the VM boots: JSON of `proto::control::Boot`; None when not known.
    pub boot: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
