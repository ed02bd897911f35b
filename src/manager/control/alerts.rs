//! SLA alerts, run at the end of every evaluator pass: the facts of that pass go
//! through `model::alerts::conditions`, each (kind, subject) through its hysteresis
//! state machine (`model::alerts::step`), and only the transitions reach the store
//! (`alert.raised` / `alert.cleared` / `alert.updated` events, which webhooks deliver).
//!
//! The state machines live in memory; the first pass after a start loads the open
//! alerts from the database as open state machines, so a restart neither raises an
//! alert twice nor forgets to clear one.

use std::collections::{BTreeSet, HashMap};

use chrono::{DateTime, Utc};

use super::{ControlPlane, HostLive};
use crate::manager::store::{LiveVpg, NewAlert, StoreError};
use crate::model::alerts::{
    conditions, step, AlertKey, AlertKind, AlertState, Condition, HostAlertFacts, Severity, Signal,
    Subject, Transition, VpgAlertFacts,
};
use crate::model::settings::VpgSettings;
use crate::model::status::{Lifecycle, SyncKind, VpgFacts};

/// One key's machine and the row it raised.
#[derive(Debug, Clone)]
struct Tracked {
    state: AlertState,
    /// The open alert's id (set once raised).
    id: Option<String>,
    severity: Option<Severity>,
    affected_count: u32,
}

impl Default for Tracked {
    fn default() -> Self {
        Self {
            state: AlertState::Idle,
            id: None,
            severity: None,
            affected_count: 0,
        }
    }
}

/// The alert state machines of this manager process.
#[derive(Default)]
pub struct AlertEngine {
    /// When the first pass ran (open alerts loaded from the database then).
    started: Option<DateTime<Utc>>,
    /// The last pass: heartbeats poke the evaluator up to ten times a second, far finer
    /// than the alert delays need, so passes closer than [`MIN_SPACING`] are skipped.
    last: Option<DateTime<Utc>>,
    keys: HashMap<AlertKey, Tracked>,
}

/// Alert passes are at least this far apart.
const MIN_SPACING: std::time::Duration = std::time::Duration::from_millis(250);

/// The alert facts of one VPG from what the evaluator gathered; the site ids and the
/// last test come from the database in [`pass`].
pub fn observe(
    v: &LiveVpg,
    f: &VpgFacts,
    journal_bytes: Option<u64>,
    sync_required: bool,
) -> VpgAlertFacts {
    let s: &VpgSettings = &v.settings;
    VpgAlertFacts {
        vpg_id: v.id.clone(),
        name: v.name.clone(),
        protecting: matches!(v.lifecycle, Lifecycle::Creating | Lifecycle::Protecting),
        protected_site_id: None,
        recovery_site_id: String::new(),
        rpo_actual: f.rpo_actual,
        rpo_target: f.rpo_target,
        history_actual: f.history_actual,
        history_target: f.history_target,
        protected_for: f.protected_for,
        journal_bytes,
        journal_warning_bytes: s.journal_warning_bytes,
        journal_hard_limit_bytes: s.journal_hard_limit_bytes,
        initial_sync: v.protected_since.is_none()
            || f.sync.is_some_and(|a| a.kind == SyncKind::Initial),
        protected_site_connected: f.protected_site_connected,
        recovery_site_connected: f.recovery_site_connected,
        sync_required,
        journal_storage_error: f.journal_storage_error,
        recovery_storage_error: f.recovery_storage_error,
        last_test_or_start: v.protected_since,
        test_reminder_days: s.test_reminder_days,
    }
}

fn key_of(a: &crate::proto::api::Alert) -> Option<AlertKey> {
    let kind = AlertKind::parse(&a.kind)?;
    let subject = match kind {
        AlertKind::SiteDisconnection => Subject::Site(a.site_id.clone()?),
        AlertKind::HostDisconnected => Subject::Host(a.host_id.clone()?),
        _ => Subject::Vpg(a.vpg_id.clone()?),
    };
    Some(AlertKey { kind, subject })
}

fn new_alert(key: &AlertKey, c: &Condition, site_of_host: Option<&str>) -> NewAlert {
    let (vpg_id, host_id, site_id) = match &key.subject {
        Subject::Vpg(v) => (Some(v.clone()), None, None),
        Subject::Host(h) => (None, Some(h.clone()), site_of_host.map(str::to_string)),
        Subject::Site(s) => (None, None, Some(s.clone())),
    };
    NewAlert {
        kind: key.kind.as_str().to_string(),
        severity: c.severity.as_str().to_string(),
        vpg_id,
        host_id,
        site_id,
        message: c.message.clone(),
        affected_count: c.affected_count,
        details: Some(serde_json::json!({ "vpg_ids": c.vpg_ids })),
    }
}

/// Loads the open alerts once per process (idempotent).
async fn load(
    cp: &ControlPlane,
    engine: &mut AlertEngine,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if engine.started.is_some() {
        return Ok(());
    }
    for a in cp.store.open_alerts().await? {
        let Some(key) = key_of(&a) else {
            tracing::warn!(alert = %a.id, kind = %a.kind, "open alert of an unknown kind left as it is");
            continue;
        };
        if key.kind.is_event() {
            // The operations runner owns it; no condition would ever hold it open.
            continue;
        }
        if engine.keys.contains_key(&key) {
            // Two open rows for one cause (should not happen): keep one.
            cp.store.clear_alert(&a.id).await?;
            continue;
        }
        engine.keys.insert(
            key,
            Tracked {
                state: AlertState::Open { clear_since: None },
                id: Some(a.id),
                severity: Severity::parse(&a.severity),
                affected_count: a.affected_count,
            },
        );
    }
    engine.started = Some(now);
    Ok(())
}

/// One pass over every alert key.
pub async fn pass(
    cp: &ControlPlane,
    engine: &mut AlertEngine,
    mut vpgs: Vec<VpgAlertFacts>,
    live: &HashMap<String, HostLive>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if engine
        .last
        .is_some_and(|l| (now - l).to_std().unwrap_or_default() < MIN_SPACING)
    {
        return Ok(());
    }
    load(cp, engine, now).await?;
    engine.last = Some(now);
    let ctx = cp.store.alert_context().await?;
    for v in &mut vpgs {
        if let Some(c) = ctx.vpgs.get(&v.vpg_id) {
            v.protected_site_id = c.protected_site_id.clone();
            v.recovery_site_id = c.recovery_site_id.clone();
            v.last_test_or_start = c.last_test_at.or(v.last_test_or_start);
        }
    }
    let hosts: Vec<HostAlertFacts> = ctx
        .hosts
        .iter()
        .map(|h| HostAlertFacts {
            host_id: h.id.clone(),
            name: h.name.clone(),
            site_id: h.site_id.clone(),
            connected: live.contains_key(&h.name),
        })
        .collect();
    let site_of_host: HashMap<&str, &str> = ctx
        .hosts
        .iter()
        .map(|h| (h.id.as_str(), h.site_id.as_str()))
        .collect();
    let conds = conditions(&vpgs, &hosts, now);
    // Right after a start no agent has reconnected yet: that is not a disconnection.
    let settling = engine
        .started
        .is_some_and(|s| (now - s).to_std().unwrap_or_default() < cp.settings.disconnect_after);
    let keys: BTreeSet<AlertKey> = engine.keys.keys().chain(conds.keys()).cloned().collect();
    for key in keys {
        let cond = conds.get(&key);
        let mut signal = cond.map_or(Signal::Inactive, |c| c.signal);
        if settling
            && signal == Signal::Active
            && matches!(
                key.kind,
                AlertKind::SiteDisconnection | AlertKind::HostDisconnected
            )
        {
            signal = Signal::Hold;
        }
        let t = engine.keys.get(&key).cloned().unwrap_or_default();
        let (next, transition) = step(t.state, signal, now, cp.settings.alerts);
        let mut t = Tracked { state: next, ..t };
        match (transition, cond) {
            (Some(Transition::Raise), Some(c)) => {
                let site = match &key.subject {
                    Subject::Host(h) => site_of_host.get(h.as_str()).copied(),
                    _ => None,
                };
                match cp.store.raise_alert(&new_alert(&key, c, site)).await {
                    Ok(id) => {
                        tracing::info!(alert = %id, kind = key.kind.as_str(), "alert raised: {}", c.message);
                        t.id = Some(id);
                        t.severity = Some(c.severity);
                        t.affected_count = c.affected_count;
                    }
                    Err(e) => {
                        // The machine stays where it was: the next pass tries again.
                        tracing::warn!(kind = key.kind.as_str(), error = %e, "alert not raised");
                        continue;
                    }
                }
            }
            (Some(Transition::Clear), _) => {
                if let Some(id) = &t.id {
                    if let Err(e) = cp.store.clear_alert(id).await {
                        tracing::warn!(alert = %id, error = %e, "alert not cleared");
                        continue;
                    }
                    tracing::info!(alert = %id, kind = key.kind.as_str(), "alert cleared");
                }
                t.id = None;
            }
            (None, Some(c)) if next.is_open() && c.signal != Signal::Inactive => {
                // The same cause grew or shrank: the open alert follows it. Severity only
                // rises while open (an error that eases to a warning stays an error until
                // it clears), so an alert near the 75 % line does not flip back and forth.
                let worse = t.severity.is_none_or(|s| c.severity > s);
                let reach = c.affected_count != t.affected_count && c.affected_count > 0;
                if let (Some(id), true) = (&t.id, worse || reach) {
                    let severity = if worse {
                        c.severity
                    } else {
                        t.severity.unwrap_or(c.severity)
                    };
                    match cp
                        .store
                        .update_alert(id, severity.as_str(), c.affected_count, &c.message)
                        .await
                    {
                        Ok(()) => {
                            t.severity = Some(severity);
                            t.affected_count = c.affected_count;
                        }
                        Err(e) => tracing::warn!(alert = %id, error = %e, "alert not updated"),
                    }
                }
            }
            _ => {}
        }
        if t.state == AlertState::Idle {
            engine.keys.remove(&key);
        } else {
            engine.keys.insert(key, t);
        }
    }
    Ok(())
}
