//! Schema migrations for the manager database. The schema builder keeps one set of
//! migrations valid for SQLite and PostgreSQL alike. A migration is never edited after
//! it lands: changes come as new migrations appended to the list.

pub use sea_orm_migration::prelude::*;

mod m20261123_000001_initial;
mod m20261129_000001_control;
mod m20261129_000002_webhooks;
mod m20261129_000003_site_bandwidth;
mod m20261129_000004_operations;
mod m20261129_000005_rpo_history;
mod m20261129_000006_host_key_use;
mod m20261208_000001_vm_boot_quiesce;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261123_000001_initial::Migration),
            Box::new(m20261129_000001_control::Migration),
            Box::new(m20261129_000002_webhooks::Migration),
            Box::new(m20261129_000003_site_bandwidth::Migration),
            Box::new(m20261129_000004_operations::Migration),
            Box::new(m20261129_000005_rpo_history::Migration),
            Box::new(m20261129_000006_host_key_use::Migration),
            Box::new(m20261208_000001_vm_boot_quiesce::Migration),
        ]
    }
}
