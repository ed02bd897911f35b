//! The agent control channel: enrolment tokens (exchanged once for a host key), the host
//! key's hash and enrolment time on `hosts`, and the agent's disk id on `disks` (the
//! replication stream and the recovery journal know a disk by (protected host, disk id)).
//!
//! `disks.device_id` is unique per host; a disk row has no host column, so the rule is
//! kept by the inventory upsert (one writer per host, inventories with repeated ids are
//! refused), not by an index.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(EnrolmentTokens::Table)
                .col(
                    ColumnDef::new(EnrolmentTokens::Id)
                        .string_len(36)
                        .not_null()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(EnrolmentTokens::Description)
                        .string()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(EnrolmentTokens::SecretHash)
                        .string()
                        .not_null()
                        .unique_key(),
                )
                .col(
                    ColumnDef::new(EnrolmentTokens::CreatedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(EnrolmentTokens::ExpiresAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(ColumnDef::new(EnrolmentTokens::MaxUses).integer().null())
                .col(ColumnDef::new(EnrolmentTokens::Uses).integer().not_null())
                .col(
                    ColumnDef::new(EnrolmentTokens::RevokedAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .col(
                    ColumnDef::new(EnrolmentTokens::CreatedBy)
                        .string()
                        .not_null(),
                )
                .to_owned(),
        )
        .await?;
        // SQLite alters one column per statement; PostgreSQL accepts the same.
        m.alter_table(
            Table::alter()
                .table(Hosts::Table)
                .add_column(ColumnDef::new(Hosts::HostKeyHash).string().null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Hosts::Table)
                .add_column(
                    ColumnDef::new(Hosts::EnrolledAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Disks::Table)
                .add_column(ColumnDef::new(Disks::DeviceId).big_integer().null())
                .to_owned(),
        )
        .await?;
        // Start of the history a VPG can have as it is composed now: its first
        // recoverable checkpoint, again after a VM joins (earlier checkpoints do not
        // cover the newcomer). The history target is capped by how long that is.
        m.alter_table(
            Table::alter()
                .table(Vpgs::Table)
                .add_column(
                    ColumnDef::new(Vpgs::HistorySince)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .to_owned(),
        )
        .await?;
        // Time of the newest recoverable checkpoint: the API reports the RPO as now minus
        // this, exact at every read, while the row is written once per checkpoint.
        m.alter_table(
            Table::alter()
                .table(Vpgs::Table)
                .add_column(
                    ColumnDef::new(Vpgs::NewestRecoverableAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Vpgs::Table)
                .drop_column(Vpgs::NewestRecoverableAt)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Vpgs::Table)
                .drop_column(Vpgs::HistorySince)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Disks::Table)
                .drop_column(Disks::DeviceId)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Hosts::Table)
                .drop_column(Hosts::EnrolledAt)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Hosts::Table)
                .drop_column(Hosts::HostKeyHash)
                .to_owned(),
        )
        .await?;
        m.drop_table(Table::drop().table(EnrolmentTokens::Table).to_owned())
            .await?;
        Ok(())
    }
}

#[derive(DeriveIden)]
enum EnrolmentTokens {
    Table,
    Id,
    Description,
    SecretHash,
    CreatedAt,
    ExpiresAt,
    MaxUses,
    Uses,
    RevokedAt,
    CreatedBy,
}

#[derive(DeriveIden)]
enum Hosts {
    Table,
    HostKeyHash,
    EnrolledAt,
}

#[derive(DeriveIden)]
enum Vpgs {
    Table,
    HistorySince,
    NewestRecoverableAt,
}

#[derive(DeriveIden)]
enum Disks {
    Table,
    DeviceId,
}
