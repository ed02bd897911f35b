//! Webhook subscriptions and their delivery state. The outbox is the `events` table:
//! a subscription's cursor (`webhook_cursors`) is the last event id handed over, and the
//! event being delivered has a `webhook_deliveries` row (attempts, last status/error,
//! next attempt, delivered). The secret is stored as is, since the manager must sign
//! with it; it is shown only when created or rotated.
//!
//! The worker's bookkeeping (cursor moves, attempts) writes no audit event: it is not a
//! change anyone made, and an event per attempt would feed the webhooks themselves.

use super::entity::{event, webhook, webhook_cursor, webhook_delivery};
use super::records::to_event;
use super::{finish_page, new_id, now, on_unique, page_limit, Actor, NewEvent, Store, StoreError};
use crate::model::names::Name;
use crate::model::webhooks::{any_matches, validate_kinds, validate_url};
use crate::model::ValidationError;
use crate::proto::api::{Event, Page, PageQuery};
use crate::proto::webhooks::{
    delivery_id, Webhook, WebhookCreate, WebhookCreated, WebhookDelivery, WebhookUpdate,
};
use chrono::{DateTime, Utc};
use rand::RngCore;
use sea_orm::sea_query::Expr;
use sea_orm::{
    ActiveModelTrait, ColumnTrait, ConnectionTrait, EntityTrait, IntoActiveModel, QueryFilter,
    QueryOrder, QuerySelect, Set, TransactionTrait,
};
use std::collections::HashMap;

/// Generated secrets start with this, so leaked ones are easy to scan for.
pub const WEBHOOK_SECRET_PREFIX: &str = "whsec_";

/// What the delivery worker needs of one subscription.
#[derive(Debug, Clone)]
pub struct WebhookTarget {
    pub url: String,
    pub secret: String,
    pub event_kinds: Vec<String>,
    pub enabled: bool,
}

/// The next event a subscription owes its receiver.
#[derive(Debug, Clone)]
pub struct PendingDelivery {
    pub event: Event,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not before this (back-off after a failed attempt).
    pub next_attempt_at: Option<DateTime<Utc>>,
}

/// What a subscription has next.
#[derive(Debug, Clone)]
pub enum NextDelivery {
    /// This event is owed.
    Due(Box<PendingDelivery>),
    /// A whole batch of events its kinds do not select was crossed; look again at once.
    Skipped,
    /// Nothing after the cursor (or an id gap that may still fill): wait for more.
    Idle,
}

/// How one attempt went.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    pub status: Option<u16>,
    pub error: Option<String>,
    pub delivered: bool,
    pub next_attempt_at: Option<DateTime<Utc>>,
}

fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{WEBHOOK_SECRET_PREFIX}{}", hex::encode(bytes))
}

fn validate_secret(s: &str) -> Result<String, ValidationError> {
    if !(16..=256).contains(&s.len()) || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(ValidationError::new(
            "webhook.invalid_secret",
            "secret",
            "a secret is 16 to 256 characters without spaces",
        ));
    }
    Ok(s.to_string())
}

fn kinds_of(v: &serde_json::Value) -> Vec<String> {
    serde_json::from_value(v.clone()).unwrap_or_default()
}

fn to_webhook(m: webhook::Model, cursor: i64) -> Webhook {
    Webhook {
        event_kinds: kinds_of(&m.event_kinds),
        id: m.id,
        name: m.name,
        url: m.url,
        enabled: m.enabled,
        cursor,
        created_at: m.created_at,
        updated_at: m.updated_at,
    }
}

async fn cursor_of(db: &impl ConnectionTrait, id: &str) -> Result<i64, StoreError> {
    Ok(webhook_cursor::Entity::find_by_id(id)
        .one(db)
        .await?
        .map_or(0, |c| c.last_event_id))
}

pub(super) async fn newest_event_id(db: &impl ConnectionTrait) -> Result<i64, StoreError> {
    Ok(event::Entity::find()
        .order_by_desc(event::Column::Id)
        .limit(1)
        .one(db)
        .await?
        .map_or(0, |e| e.id))
}

/// Moves a cursor forward, never back (two writers cannot undo each other).
async fn advance_cursor(db: &impl ConnectionTrait, id: &str, to: i64) -> Result<(), StoreError> {
    webhook_cursor::Entity::update_many()
        .col_expr(webhook_cursor::Column::LastEventId, Expr::value(to))
        .col_expr(webhook_cursor::Column::UpdatedAt, Expr::value(now()))
        .filter(webhook_cursor::Column::WebhookId.eq(id))
        .filter(webhook_cursor::Column::LastEventId.lt(to))
        .exec(db)
        .await?;
    Ok(())
}

impl Store {
    pub async fn create_webhook(
        &self,
        actor: &Actor,
        input: WebhookCreate,
    ) -> Result<WebhookCreated, StoreError> {
        let name = Name::parse(&input.name)?;
        let url = validate_url(&input.url)?;
        let kinds = validate_kinds(&input.event_kinds)?;
        let secret = match &input.secret {
            Some(s) => validate_secret(s)?,
            None => generate_secret(),
        };
        let t = now();
        let id = new_id();
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let m = webhook::ActiveModel {
            id: Set(id.clone()),
            name: Set(name.to_string()),
            url: Set(url.clone()),
            event_kinds: Set(serde_json::json!(kinds)),
            secret: Set(secret.clone()),
            enabled: Set(input.enabled.unwrap_or(true)),
            created_at: Set(t),
            updated_at: Set(t),
        }
        .insert(&txn)
        .await
        .map_err(on_unique(
            "webhook.name_taken",
            format!("a webhook named {name} already exists"),
        ))?;
        NewEvent::info(
            "webhook.created",
            "webhook",
            &id,
            format!("webhook {name} created for {url}"),
        )
        .details(serde_json::json!({ "event_kinds": kinds }))
        .write(&txn, actor)
        .await?;
        // A new subscription starts at the newest event (its own creation included): it
        // gets what happens from now on, not the history.
        let cursor = newest_event_id(&txn).await?;
        webhook_cursor::ActiveModel {
            webhook_id: Set(id.clone()),
            last_event_id: Set(cursor),
            updated_at: Set(t),
        }
        .insert(&txn)
        .await?;
        self.commit(txn).await?;
        Ok(WebhookCreated {
            webhook: to_webhook(m, cursor),
            secret,
        })
    }

    pub async fn list_webhooks(&self, p: &PageQuery) -> Result<Page<Webhook>, StoreError> {
        let limit = page_limit(p.limit)?;
        let mut sel = webhook::Entity::find().order_by_asc(webhook::Column::Id);
        if let Some(c) = &p.cursor {
            sel = sel.filter(webhook::Column::Id.gt(c.as_str()));
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        let ids: Vec<String> = rows.iter().map(|m| m.id.clone()).collect();
        let cursors: HashMap<String, i64> = webhook_cursor::Entity::find()
            .filter(webhook_cursor::Column::WebhookId.is_in(ids))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|c| (c.webhook_id, c.last_event_id))
            .collect();
        Ok(finish_page(
            rows,
            limit,
            |m| m.id.clone(),
            |m| {
                let c = cursors.get(&m.id).copied().unwrap_or(0);
                to_webhook(m, c)
            },
        ))
    }

    pub async fn get_webhook(&self, id: &str) -> Result<Webhook, StoreError> {
        let m = webhook::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .ok_or_else(|| StoreError::not_found("webhook", id))?;
        let c = cursor_of(&self.db, id).await?;
        Ok(to_webhook(m, c))
    }

    pub async fn update_webhook(
        &self,
        actor: &Actor,
        id: &str,
        input: WebhookUpdate,
    ) -> Result<Webhook, StoreError> {
        let url = input.url.as_deref().map(validate_url).transpose()?;
        let kinds = input
            .event_kinds
            .as_deref()
            .map(validate_kinds)
            .transpose()?;
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = webhook::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("webhook", id))?;
        let name = cur.name.clone();
        let mut am = cur.into_active_model();
        let mut changed = Vec::new();
        if let Some(u) = url {
            am.url = Set(u);
            changed.push("url");
        }
        if let Some(k) = kinds {
            am.event_kinds = Set(serde_json::json!(k));
            changed.push("event_kinds");
        }
        if let Some(e) = input.enabled {
            am.enabled = Set(e);
            changed.push("enabled");
        }
        am.updated_at = Set(now());
        let m = am.update(&txn).await?;
        NewEvent::info(
            "webhook.updated",
            "webhook",
            id,
            format!("webhook {name} updated ({})", changed.join(", ")),
        )
        .write(&txn, actor)
        .await?;
        let c = cursor_of(&txn, id).await?;
        self.commit(txn).await?;
        Ok(to_webhook(m, c))
    }

    /// Deletes a subscription with its cursor and delivery history.
    pub async fn delete_webhook(&self, actor: &Actor, id: &str) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = webhook::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("webhook", id))?;
        webhook_delivery::Entity::delete_many()
            .filter(webhook_delivery::Column::WebhookId.eq(id))
            .exec(&txn)
            .await?;
        webhook_cursor::Entity::delete_by_id(id).exec(&txn).await?;
        webhook::Entity::delete_by_id(id).exec(&txn).await?;
        NewEvent::info(
            "webhook.deleted",
            "webhook",
            id,
            format!("webhook {} deleted", cur.name),
        )
        .write(&txn, actor)
        .await?;
        self.commit(txn).await?;
        Ok(())
    }

    /// Replaces the signing secret with a generated one, shown in the answer only.
    pub async fn rotate_webhook_secret(
        &self,
        actor: &Actor,
        id: &str,
    ) -> Result<WebhookCreated, StoreError> {
        let secret = generate_secret();
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let cur = webhook::Entity::find_by_id(id)
            .one(&txn)
            .await?
            .ok_or_else(|| StoreError::not_found("webhook", id))?;
        let name = cur.name.clone();
        let mut am = cur.into_active_model();
        am.secret = Set(secret.clone());
        am.updated_at = Set(now());
        let m = am.update(&txn).await?;
        NewEvent::info(
            "webhook.secret_rotated",
            "webhook",
            id,
            format!("secret of webhook {name} rotated"),
        )
        .write(&txn, actor)
        .await?;
        let c = cursor_of(&txn, id).await?;
        self.commit(txn).await?;
        Ok(WebhookCreated {
            webhook: to_webhook(m, c),
            secret,
        })
    }

    /// Delivery history of one subscription, newest first.
    pub async fn list_webhook_deliveries(
        &self,
        id: &str,
        p: &PageQuery,
    ) -> Result<Page<WebhookDelivery>, StoreError> {
        let limit = page_limit(p.limit)?;
        if webhook::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .is_none()
        {
            return Err(StoreError::not_found("webhook", id));
        }
        let mut sel = webhook_delivery::Entity::find()
            .filter(webhook_delivery::Column::WebhookId.eq(id))
            .order_by_desc(webhook_delivery::Column::Id);
        if let Some(c) = &p.cursor {
            let c: i64 = c.parse().map_err(|_| {
                StoreError::from(ValidationError::new(
                    "request.invalid_cursor",
                    "cursor",
                    "cursor is not one this list handed out",
                ))
            })?;
            sel = sel.filter(webhook_delivery::Column::Id.lt(c));
        }
        let rows = sel.limit(limit + 1).all(&self.db).await?;
        let event_ids: Vec<i64> = rows.iter().map(|d| d.event_id).collect();
        let kinds: HashMap<i64, String> = event::Entity::find()
            .filter(event::Column::Id.is_in(event_ids))
            .all(&self.db)
            .await?
            .into_iter()
            .map(|e| (e.id, e.kind))
            .collect();
        Ok(finish_page(
            rows,
            limit,
            |d| d.id.to_string(),
            |d| WebhookDelivery {
                event_kind: kinds.get(&d.event_id).cloned(),
                delivery_id: delivery_id(&d.webhook_id, d.event_id),
                id: d.id,
                event_id: d.event_id,
                attempts: u32::try_from(d.attempts).unwrap_or(0),
                last_status: d.last_status.and_then(|s| u16::try_from(s).ok()),
                last_error: d.last_error,
                next_attempt_at: d.next_attempt_at,
                delivered_at: d.delivered_at,
                created_at: d.created_at,
            },
        ))
    }

    // ---- the delivery worker ---------------------------------------------------------

    /// Ids of the enabled subscriptions.
    pub async fn enabled_webhook_ids(&self) -> Result<Vec<String>, StoreError> {
        Ok(webhook::Entity::find()
            .filter(webhook::Column::Enabled.eq(true))
            .order_by_asc(webhook::Column::Id)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|m| m.id)
            .collect())
    }

    /// The subscription as the worker needs it, or None once deleted.
    pub async fn webhook_target(&self, id: &str) -> Result<Option<WebhookTarget>, StoreError> {
        Ok(webhook::Entity::find_by_id(id)
            .one(&self.db)
            .await?
            .map(|m| WebhookTarget {
                event_kinds: kinds_of(&m.event_kinds),
                url: m.url,
                secret: m.secret,
                enabled: m.enabled,
            }))
    }

    /// The next event after the subscription's cursor that its kinds select, with its
    /// delivery row (created on first sight). Looks at most `batch` events: the cursor
    /// moves over those that do not match, so a long run of other kinds is crossed a
    /// batch per call and the events table is never read whole.
    ///
    /// A gap in the ids right after the cursor may be a transaction still committing
    /// (PostgreSQL hands out ids before commit); the cursor does not cross a gap until
    /// the event after it is `settle` old, when the gap must be a rollback.
    pub async fn next_webhook_delivery(
        &self,
        id: &str,
        kinds: &[String],
        batch: u64,
        settle: chrono::Duration,
    ) -> Result<NextDelivery, StoreError> {
        let cursor = cursor_of(&self.db, id).await?;
        let batch = batch.max(1);
        let rows = event::Entity::find()
            .filter(event::Column::Id.gt(cursor))
            .order_by_asc(event::Column::Id)
            .limit(batch)
            .all(&self.db)
            .await?;
        let full = rows.len() as u64 == batch;
        let mut held_at_gap = false;
        let t = now();
        let mut prev = cursor;
        let mut skip_to = cursor;
        let mut found = None;
        for e in rows {
            if e.id != prev + 1 && t - e.at < settle {
                held_at_gap = true;
                break;
            }
            prev = e.id;
            if any_matches(kinds, &e.kind) {
                found = Some(e);
                break;
            }
            skip_to = e.id;
        }
        let _w = self.write_guard().await;
        if skip_to > cursor {
            advance_cursor(&self.db, id, skip_to).await?;
        }
        let Some(e) = found else {
            return Ok(if full && !held_at_gap {
                NextDelivery::Skipped
            } else {
                NextDelivery::Idle
            });
        };
        let existing = webhook_delivery::Entity::find()
            .filter(webhook_delivery::Column::WebhookId.eq(id))
            .filter(webhook_delivery::Column::EventId.eq(e.id))
            .one(&self.db)
            .await?;
        let d = match existing {
            Some(d) => d,
            None => {
                webhook_delivery::ActiveModel {
                    webhook_id: Set(id.to_string()),
                    event_id: Set(e.id),
                    attempts: Set(0),
                    last_status: Set(None),
                    last_error: Set(None),
                    next_attempt_at: Set(None),
                    delivered_at: Set(None),
                    created_at: Set(t),
                    ..Default::default()
                }
                .insert(&self.db)
                .await?
            }
        };
        if d.delivered_at.is_some() {
            // Recording a delivery moves the cursor in the same transaction, so this is
            // only a second worker having got there first: catch the cursor up.
            advance_cursor(&self.db, id, e.id).await?;
            return Ok(NextDelivery::Skipped);
        }
        Ok(NextDelivery::Due(Box::new(PendingDelivery {
            event: to_event(e),
            attempts: u32::try_from(d.attempts).unwrap_or(0),
            next_attempt_at: d.next_attempt_at,
        })))
    }

    /// Records one attempt; a delivery moves the cursor past the event in the same
    /// transaction, so a restart neither repeats it nor skips anything.
    pub async fn record_webhook_attempt(
        &self,
        id: &str,
        event_id: i64,
        outcome: AttemptOutcome,
    ) -> Result<(), StoreError> {
        let _w = self.write_guard().await;
        let txn = self.db.begin().await?;
        let t = now();
        let mut up = webhook_delivery::Entity::update_many()
            .col_expr(
                webhook_delivery::Column::Attempts,
                Expr::col(webhook_delivery::Column::Attempts).add(1),
            )
            .col_expr(
                webhook_delivery::Column::LastStatus,
                Expr::value(outcome.status.map(i32::from)),
            )
            .col_expr(
                webhook_delivery::Column::LastError,
                Expr::value(outcome.error),
            )
            .col_expr(
                webhook_delivery::Column::NextAttemptAt,
                Expr::value(outcome.next_attempt_at),
            );
        if outcome.delivered {
            up = up.col_expr(webhook_delivery::Column::DeliveredAt, Expr::value(Some(t)));
        }
        up.filter(webhook_delivery::Column::WebhookId.eq(id))
            .filter(webhook_delivery::Column::EventId.eq(event_id))
            .exec(&txn)
            .await?;
        if outcome.delivered {
            advance_cursor(&txn, id, event_id).await?;
        }
        self.commit(txn).await?;
        Ok(())
    }
}
