//! Webhook subscriptions over REST and what a receiver gets. The body POSTed to a
//! receiver is a [`crate::proto::api::Event`] as JSON; the headers named here carry the
//! kind, a delivery id stable per (subscription, event) for de-duplication, the time
//! and the HMAC-SHA256 signature over `"<timestamp>.<body>"`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Header: the event kind, e.g. `vpg.status_changed`.
pub const HEADER_EVENT: &str = "x-bulwark-event";
/// Header: `<subscription id>:<event id>`, the same on every attempt of one event.
pub const HEADER_DELIVERY: &str = "x-bulwark-delivery";
/// Header: Unix seconds at signing; part of the signed text.
pub const HEADER_TIMESTAMP: &str = "x-bulwark-timestamp";
/// Header: `sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.
pub const HEADER_SIGNATURE: &str = "x-bulwark-signature";

/// A subscription as listed; the secret is never shown again after creation.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Webhook {
    pub id: String,
    pub name: String,
    pub url: String,
    /// Patterns: `*`, a prefix such as `vpg.*`, or an exact kind.
    pub event_kinds: Vec<String>,
    pub enabled: bool,
    /// The last event id handed to the receiver (or skipped as not matching).
    pub cursor: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookCreate {
    pub name: String,
    /// `http://` or `https://` receiver URL.
    pub url: String,
    pub event_kinds: Vec<String>,
    /// Signing secret (16 to 256 characters); generated when absent.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// The only time a subscription's secret is shown (creation and rotation).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookCreated {
    pub webhook: Webhook,
    pub secret: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct WebhookUpdate {
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub event_kinds: Option<Vec<String>>,
    #[serde(default)]
    pub enabled: Option<bool>,
}

/// One event owed to one subscription and how its delivery went.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WebhookDelivery {
    pub id: i64,
    pub event_id: i64,
    pub event_kind: Option<String>,
    /// The `X-Bulwark-Delivery` header value.
    pub delivery_id: String,
    pub attempts: u32,
    /// HTTP status of the last attempt, if the receiver answered.
    pub last_status: Option<u16>,
    /// Why the last attempt failed (status, timeout, refused), if it did.
    pub last_error: Option<String>,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// The `X-Bulwark-Delivery` value of one event for one subscription.
pub fn delivery_id(webhook_id: &str, event_id: i64) -> String {
    format!("{webhook_id}:{event_id}")
}
