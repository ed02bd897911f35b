//! Real VMs (issue 19): `vms.boot`, how a VM boots as JSON (`{"kind":"kernel",…}` or
//! `{"kind":"firmware"}`; null for a simulated VM or one the operator recorded without
//! it), so a recovered VM boots as its protected one did; and `checkpoints.quiesce`, how
//! a round's guests were quiesced (`guest_agent` or `paused`; null when none was asked).
//! `vms.nics` exists since the first migration (JSON, an array).

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters one at a time.
        m.alter_table(
            Table::alter()
                .table(Vms::Table)
                .add_column(ColumnDef::new(Vms::Boot).text().null())
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Checkpoints::Table)
                .add_column(ColumnDef::new(Checkpoints::Quiesce).text().null())
                .to_owned(),
        )
        .await
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.alter_table(
            Table::alter()
                .table(Checkpoints::Table)
                .drop_column(Checkpoints::Quiesce)
                .to_owned(),
        )
        .await?;
        m.alter_table(
            Table::alter()
                .table(Vms::Table)
                .drop_column(Vms::Boot)
                .to_owned(),
        )
        .await
    }
}

#[derive(DeriveIden)]
enum Vms {
    Table,
    Boot,
}

#[derive(DeriveIden)]
enum Checkpoints {
    Table,
    Quiesce,
}
