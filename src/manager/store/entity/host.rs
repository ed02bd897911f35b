//! The `hosts` table.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
#[sea_orm(table_name = "hosts")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: String,
    pub site_id: String,
    pub name: String,
    pub address: Option<String>,
    pub data_address: Option<String>,
    pub nbd_address: Option<String>,
    pub storage_path: Option<String>,
    pub connectivity: String,
    pub agent_version: Option<String>,
    pub last_seen_at: Option<DateTimeUtc>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
    /// BLAKE3 of the host key issued at enrolment (None: never enrolled).
    pub host_key_hash: Option<String>,
    pub enrolled_at: Option<DateTimeUtc>,
    /// The enrolment token that issued the host key.
    pub enrolled_by: Option<String>,
    /// When an agent first connected with the host key (None: issued, never used; the
    /// same token may enrol the host again).
    pub key_used_at: Option<DateTimeUtc>,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
