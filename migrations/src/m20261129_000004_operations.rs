//! Recovery operations: each VPG's fencing generation and the operation that owns it,
//! and the recovery reports every failover, test and move leaves behind.
//!
//! - `vpgs.fencing_generation`: only goes up; a failover or move bumps it, and agents
//!   refuse streams and commands of the VPG that carry an older one.
//! - `vpgs.operation_id` / `vpgs.operation_phase`: the operation (a `tasks` row) running
//!   on the VPG and its phase (e.g. `failover_before_commit`); one at a time per VPG.
//! - `recovery_reports`: one row per operation, written as it ends (RTO, steps, result).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // SQLite takes one column per ALTER TABLE.
        m.alter_table(
            Table::alter()
                .table(Vpgs::Table)
                .add_column(
                    ColumnDef::new(Vpgs::FencingGeneration)
                        .big_integer()
                        .not_null()
                        .default(1),
                )
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Vpgs::Table)
                .add_column(ColumnDef::new(Vpgs::OperationId).string().null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Vpgs::Table)
                .add_column(ColumnDef::new(Vpgs::OperationPhase).string().null())
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(RecoveryReports::Table)
                .col(
                    ColumnDef::new(RecoveryReports::Id)
                        .string()
                        .not_null()
                        .primary_key(),
                )
                .col(ColumnDef::new(RecoveryReports::VpgId).string().not_null())
                .col(ColumnDef::new(RecoveryReports::VpgName).string().not_null())
                .col(ColumnDef::new(RecoveryReports::Kind).string().not_null())
                .col(ColumnDef::new(RecoveryReports::Result).string().not_null())
                .col(
                    ColumnDef::new(RecoveryReports::CheckpointId)
                        .big_integer()
                        .null(),
                )
                .col(
                    ColumnDef::new(RecoveryReports::CheckpointAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .col(
                    ColumnDef::new(RecoveryReports::CreatedBy)
                        .string()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(RecoveryReports::StartedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(RecoveryReports::EndedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .col(ColumnDef::new(RecoveryReports::RtoMs).big_integer().null())
                .col(ColumnDef::new(RecoveryReports::Notes).text().not_null())
                .col(ColumnDef::new(RecoveryReports::Steps).json().not_null())
                .col(ColumnDef::new(RecoveryReports::Details).json().not_null())
                .to_owned(),
        )
        .await?;
        m.create_index(
            Index::create()
                .name("idx_recovery_reports_vpg")
                .table(RecoveryReports::Table)
                .col(RecoveryReports::VpgId)
                .col(RecoveryReports::StartedAt)
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(RecoveryReports::Table).to_owned())
            .await?;
        for col in [
            Vpgs::OperationPhase,
            Vpgs::OperationId,
            Vpgs::FencingGeneration,
        ] {
            m.alter_table(
                Table::alter()
                    .table(Vpgs::Table)
                    .drop_column(col)
                    .to_owned(),
            )
            .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum Vpgs {
    Table,
    FencingGeneration,
    OperationId,
    OperationPhase,
}

#[derive(DeriveIden)]
enum RecoveryReports {
    Table,
    Id,
    VpgId,
    VpgName,
    Kind,
    Result,
    CheckpointId,
    CheckpointAt,
    CreatedBy,
    StartedAt,
    EndedAt,
    RtoMs,
    Notes,
    Steps,
    Details,
}
