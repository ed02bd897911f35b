//! Site-level replication bandwidth limit: `sites.bandwidth_limit`, bytes per second the
//! links leaving the site may use together (null = unlimited). The manager splits it
//! equally among the (protected host, recovery host) links of the site's hosts.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Sites::Table)
                .add_column(ColumnDef::new(Sites::BandwidthLimit).big_integer().null())
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Sites::Table)
                .drop_column(Sites::BandwidthLimit)
                .to_owned(),
        )
        .await
    }
}

#[derive(DeriveIden)]
enum Sites {
    Table,
    BandwidthLimit,
}
