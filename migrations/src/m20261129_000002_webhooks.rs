//! Webhook delivery state. The outbox is the `events` table itself (append-only, ids
//! increasing): each subscription keeps a cursor (the last event id handed over) in
//! `webhook_cursors`, and each event it must deliver gets one `webhook_deliveries` row
//! recording attempts, the last status or error, the next attempt and the delivery.

use sea_orm_migration::prelude::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.create_table(
            Table::create()
                .table(WebhookCursors::Table)
                .col(
                    ColumnDef::new(WebhookCursors::WebhookId)
                        .string_len(36)
                        .not_null()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(WebhookCursors::LastEventId)
                        .big_integer()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(WebhookCursors::UpdatedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .to_owned(),
        )
        .await?;
        m.create_table(
            Table::create()
                .table(WebhookDeliveries::Table)
                .col(
                    ColumnDef::new(WebhookDeliveries::Id)
                        .big_integer()
                        .not_null()
                        .auto_increment()
                        .primary_key(),
                )
                .col(
                    ColumnDef::new(WebhookDeliveries::WebhookId)
                        .string_len(36)
                        .not_null(),
                )
                .col(
                    ColumnDef::new(WebhookDeliveries::EventId)
                        .big_integer()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(WebhookDeliveries::Attempts)
                        .integer()
                        .not_null(),
                )
                .col(
                    ColumnDef::new(WebhookDeliveries::LastStatus)
                        .integer()
                        .null(),
                )
                .col(ColumnDef::new(WebhookDeliveries::LastError).text().null())
                .col(
                    ColumnDef::new(WebhookDeliveries::NextAttemptAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .col(
                    ColumnDef::new(WebhookDeliveries::DeliveredAt)
                        .timestamp_with_time_zone()
                        .null(),
                )
                .col(
                    ColumnDef::new(WebhookDeliveries::CreatedAt)
                        .timestamp_with_time_zone()
                        .not_null(),
                )
                .to_owned(),
        )
        .await?;
        // One row per (subscription, event): the worker's get-or-insert relies on it, and
        // the history is listed per subscription newest first.
        m.create_index(
            Index::create()
                .name("ux_webhook_deliveries_webhook_event")
                .table(WebhookDeliveries::Table)
                .col(WebhookDeliveries::WebhookId)
                .col(WebhookDeliveries::EventId)
                .unique()
                .to_owned(),
        )
        .await?;
        Ok(())
    }

    async fn down(&self, m: &SchemaManager) -> Result<(), DbErr> {
        m.drop_table(Table::drop().table(WebhookDeliveries::Table).to_owned())
            .await?;
        m.drop_table(Table::drop().table(WebhookCursors::Table).to_owned())
            .await?;
        Ok(())
    }
}

#[derive(DeriveIden)]
enum WebhookCursors {
    Table,
    WebhookId,
    LastEventId,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum WebhookDeliveries {
    Table,
    Id,
    WebhookId,
    EventId,
    Attempts,
    LastStatus,
    LastError,
    NextAttemptAt,
    DeliveredAt,
    CreatedAt,
}
