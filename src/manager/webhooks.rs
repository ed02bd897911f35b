//! Webhook delivery: every enabled subscription gets its own task, so a slow or dead
//! receiver never delays another. A task takes the next matching event after its
//! cursor (`Store::next_webhook_delivery`), POSTs it signed, and on a 2xx records the
//! delivery and moves on; anything else retries the same event with exponential
//! back-off while later events wait (in order, at least once). All state is in the
//! database, so a restarted manager carries on where it stopped.
//!
//! Signature: `X-Bulwark-Signature: sha256=<hex HMAC-SHA256(secret, "<ts>.<body>")>`
//! with `ts` the `X-Bulwark-Timestamp` header (Unix seconds), so a receiver can refuse
//! replays of old bodies.

use super::store::{
    AttemptOutcome, NextDelivery, PendingDelivery, Store, StoreError, WebhookTarget,
};
use crate::proto::webhooks::{
    delivery_id, HEADER_DELIVERY, HEADER_EVENT, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use hmac::{Hmac, Mac};
use rand::Rng;
use sha2::Sha256;
use std::collections::HashMap;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Timings of delivery (tests shorten them).
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// How often an idle subscription looks for new events, and how often the set of
    /// subscriptions is re-read.
    pub poll: Duration,
    /// First retry delay; doubled per failed attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
    /// Per attempt (connect + response headers).
    pub timeout: Duration,
    /// How long a gap in event ids may be a transaction still committing.
    pub settle: Duration,
    /// Events looked at, and deliveries made, per pass of one subscription.
    pub batch: u64,
}

impl Default for WebhookSettings {
    fn default() -> Self {
        Self {
            poll: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
            settle: Duration::from_secs(5),
            batch: 100,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot encode the event: {0}")]
    Encode(#[from] serde_json::Error),
}

/// Hex HMAC-SHA256 of `data` under `key`.
pub fn hmac_sha256_hex(key: &[u8], data: &[u8]) -> String {
    // HMAC takes keys of any length (long ones are hashed), so this cannot fail; the
    // fallback only keeps the type honest.
    match <Hmac<Sha256> as Mac>::new_from_slice(key) {
        Ok(mut mac) => {
            mac.update(data);
            hex::encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// The `X-Bulwark-Signature` value of `body` sent at `timestamp`.
pub fn signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut signed = Vec::with_capacity(body.len() + 21);
    signed.extend_from_slice(timestamp.to_string().as_bytes());
    signed.push(b'.');
    signed.extend_from_slice(body);
    format!("sha256={}", hmac_sha256_hex(secret.as_bytes(), &signed))
}

/// Delay before the attempt after `attempts` failed ones: base·2^(n−1), capped, then
/// 80–100 % of that so receivers coming back are not hit by every sender at once.
pub fn backoff(settings: &WebhookSettings, attempts: u32, jitter: f64) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    let raw = settings
        .backoff_base
        .saturating_mul(1u32 << exp)
        .min(settings.backoff_cap);
    raw.mul_f64(jitter.clamp(0.8, 1.0))
}

/// Runs until `cancel`: keeps one task per enabled subscription.
pub async fn run(store: Store, settings: WebhookSettings, cancel: CancellationToken) {
    // No redirects: a signed body must only go where the subscription says.
    let client = match reqwest::Client::builder()
        .timeout(settings.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhooks: cannot build the HTTP client; no deliveries");
            return;
        }
    };
    let mut tasks: HashMap<String, JoinHandle<()>> = HashMap::new();
    loop {
        match store.enabled_webhook_ids().await {
            Ok(ids) => {
                tasks.retain(|id, h| {
                    let keep = ids.contains(id) && !h.is_finished();
                    if !keep {
                        h.abort();
                    }
                    keep
                });
                for id in ids {
                    if let std::collections::hash_map::Entry::Vacant(slot) = tasks.entry(id) {
                        let id = slot.key().clone();
                        slot.insert(tokio::spawn(subscription(
                            store.clone(),
                            client.clone(),
                            settings.clone(),
                            id,
                            cancel.child_token(),
                        )));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "webhooks: cannot list subscriptions"),
        }
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(settings.poll) => {}
        }
    }
    for (_, h) in tasks {
        h.abort();
    }
}

/// One subscription's loop: a pass, then a wait the pass chose.
async fn subscription(
    store: Store,
    client: reqwest::Client,
    settings: WebhookSettings,
    id: String,
    cancel: CancellationToken,
) {
    let mut commits = store.commits();
    loop {
        commits.mark_unchanged();
        let (wait, idle) = match pass(&store, &client, &settings, &id).await {
            Ok(Some(w)) => (w, w == settings.poll),
            // Deleted or disabled: the supervisor starts a new task if it comes back.
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(webhook = %id, error = %e, "webhook pass failed");
                (settings.poll, false)
            }
        };
        // Idle, a commit (new events) wakes it at once; the poll is the safety net. A
        // back-off is waited out whatever happens.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            r = commits.changed(), if idle => if r.is_err() { return },
        }
    }
}

/// Delivers up to `batch` events in order (or crosses up to `batch` batches of events
/// of other kinds); returns how long to wait before the next pass, or None when the
/// subscription is gone or disabled.
async fn pass(
    store: &Store,
    client: &reqwest::Client,
    settings: &WebhookSettings,
    id: &str,
) -> Result<Option<Duration>, WebhookError> {
    let Some(target) = store.webhook_target(id).await? else {
        return Ok(None);
    };
    if !target.enabled {
        return Ok(None);
    }
    let settle = chrono::Duration::from_std(settings.settle).unwrap_or(chrono::Duration::MAX);
    for _ in 0..settings.batch.max(1) {
        let p = match store
            .next_webhook_delivery(id, &target.event_kinds, settings.batch, settle)
            .await?
        {
            NextDelivery::Due(p) => p,
            // A backlog of other kinds is crossed without waiting a poll per batch, and
            // still within this pass's bound.
            NextDelivery::Skipped => continue,
            NextDelivery::Idle => return Ok(Some(settings.poll)),
        };
        if let Some(due) = p.next_attempt_at {
            let now = chrono::Utc::now();
            if due > now {
                return Ok(Some((due - now).to_std().unwrap_or(settings.poll)));
            }
        }
        let event_id = p.event.id;
        let outcome = attempt(client, &target, id, &p).await?;
        let (delivered, wait) = match outcome {
            Ok(status) => (
                true,
                AttemptOutcome {
                    status: Some(status),
                    error: None,
                    delivered: true,
                    next_attempt_at: None,
                },
            ),
            Err((status, error)) => {
                let delay = backoff(
                    settings,
                    p.attempts + 1,
                    rand::rng().random_range(0.8..=1.0),
                );
                tracing::debug!(webhook = %id, event_id, error = %error, ?delay, "webhook attempt failed");
                // Checked: a huge configured cap must not overflow the clock arithmetic.
                let now = chrono::Utc::now();
                let next = chrono::Duration::from_std(delay)
                    .ok()
                    .and_then(|d| now.checked_add_signed(d))
                    .unwrap_or(now);
                (
                    false,
                    AttemptOutcome {
                        status,
                        error: Some(error),
                        delivered: false,
                        next_attempt_at: Some(next),
                    },
                )
            }
        };
        let next_at = wait.next_attempt_at;
        store.record_webhook_attempt(id, event_id, wait).await?;
        if !delivered {
            let now = chrono::Utc::now();
            return Ok(Some(
                next_at
                    .and_then(|n| (n - now).to_std().ok())
                    .unwrap_or(settings.backoff_base),
            ));
        }
    }
    // A full batch delivered: go again at once, but through the scheduler.
    Ok(Some(Duration::ZERO))
}

/// One POST. Ok(status) on 2xx; else the status (if any) and why.
async fn attempt(
    client: &reqwest::Client,
    target: &WebhookTarget,
    id: &str,
    p: &PendingDelivery,
) -> Result<Result<u16, (Option<u16>, String)>, WebhookError> {
    let body = serde_json::to_vec(&p.event)?;
    let ts = chrono::Utc::now().timestamp();
    let sig = signature(&target.secret, ts, &body);
    let res = client
        .post(&target.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(HEADER_EVENT, &p.event.kind)
        .header(HEADER_DELIVERY, delivery_id(id, p.event.id))
        .header(HEADER_TIMESTAMP, ts.to_string())
        .header(HEADER_SIGNATURE, sig)
        .body(body)
        .send()
        .await;
    Ok(match res {
        Ok(r) if r.status().is_success() => Ok(r.status().as_u16()),
        Ok(r) => {
            let s = r.status();
            Err((Some(s.as_u16()), format!("receiver answered {s}")))
        }
        Err(e) if e.is_timeout() => Err((None, "timed out".to_string())),
        Err(e) if e.is_connect() => Err((None, format!("cannot connect: {e}"))),
        Err(e) => Err((None, e.to_string())),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // RFC 4231 test case 2.
        assert_eq!(
            hmac_sha256_hex(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn signature_covers_timestamp_and_body() {
        let s = signature("k", 1700000000, b"{\"id\":1}");
        assert_eq!(
            s,
            format!("sha256={}", hmac_sha256_hex(b"k", b"1700000000.{\"id\":1}"))
        );
        assert_ne!(s, signature("k", 1700000001, b"{\"id\":1}"));
        assert_ne!(s, signature("k", 1700000000, b"{\"id\":2}"));
        assert_ne!(s, signature("k2", 1700000000, b"{\"id\":1}"));
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let s = WebhookSettings::default();
        assert_eq!(backoff(&s, 1, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(&s, 2, 1.0), Duration::from_secs(2));
        assert_eq!(backoff(&s, 4, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(&s, 9, 1.0), Duration::from_secs(256));
        assert_eq!(backoff(&s, 10, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(&s, 1000, 1.0), Duration::from_secs(300));
        assert_eq!(backoff(&s, 3, 0.8), Duration::from_millis(3200));
        assert_eq!(backoff(&s, 3, 0.1), Duration::from_millis(3200));
    }
}
