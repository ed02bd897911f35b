//! Enrolment that can be repeated until its key is used: `hosts.enrolled_by` (the
//! enrolment token that issued the host key) and `hosts.key_used_at` (when an agent first
//! connected with that key). An agent that enrolled but never received its Welcome (the
//! connection or a later write failed after the key was stored) enrols again with the
//! same token and gets a new key, without spending another use.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        m.alter_table(
            Table::alter()
                .table(Hosts::Table)
                .add_column(ColumnDef::new(Hosts::EnrolledBy).string().null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Hosts::Table)
                .add_column(
                    ColumnDef::new(Hosts::KeyUsedAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .to_owned(),
        )
        .await?;
        // Hosts enrolled before this migration have been connecting with their keys.
        m.exec_stmt(
            Query::update()
                .table(Hosts::Table)
                .value(Hosts::KeyUsedAt, Expr::col(Hosts::EnrolledAt))
                .and_where(Expr::col(Hosts::HostKeyHash).is_not_null())
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Hosts::Table)
                .drop_column(Hosts::KeyUsedAt)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Hosts::Table)
                .drop_column(Hosts::EnrolledBy)
                .to_owned(),
        )
        .await
    }
}

#[derive(DeriveIden)]
enum Hosts {
    Table,
    EnrolledBy,
    KeyUsedAt,
    EnrolledAt,
    HostKeyHash,
}
