//! Per-VPG RPO history for reports: `rpo_history`, one row per VPG, tier and bucket
//! start (tier 0 = 1 s raw samples, 1 = minute aggregates, 2 = hour aggregates; see
//! `model::rpo_history`). Times are whole seconds since the epoch (`at_secs`): compact,
//! the same on both databases, and cheap to compare. Rows are not tied to the VPG by a
//! foreign key: they are written in bulk after the fact and pruned by retention alone.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(RpoHistory::Table)
                .col(ColumnDef::new(RpoHistory::VpgId).string().not_null())
                .col(ColumnDef::new(RpoHistory::Tier).small_integer().not_null())
                .col(ColumnDef::new(RpoHistory::AtSecs).big_integer().not_null())
                .col(ColumnDef::new(RpoHistory::RpoMs).big_integer().null())
                .col(ColumnDef::new(RpoHistory::HistorySecs).big_integer().null())
                .col(ColumnDef::new(RpoHistory::Status).string().not_null())
                // Queries read one VPG's tier over a time range: the key is that order.
                .primary_key(
                    Index::create()
                        .col(RpoHistory::VpgId)
                        .col(RpoHistory::Tier)
                        .col(RpoHistory::AtSecs),
                )
                .to_owned(),
        )
        .await?;
        // Retention deletes a tier's oldest rows across all VPGs by time range.
        m.create_index(
            Index::create()
                .name("idx_rpo_history_tier_at")
                .table(RpoHistory::Table)
                .col(RpoHistory::Tier)
                .col(RpoHistory::AtSecs)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(RpoHistory::Table).to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum RpoHistory {
    Table,
    VpgId,
    Tier,
    AtSecs,
    RpoMs,
    HistorySecs,
    Status,
}
