//! Desired state per host, computed from the database and pushed whole on every change
//! and every reconnect; inventory and events reported by agents written to the database.
//!
//! Versions: one manager-wide counter, seeded from the wall clock (ms) at start so a
//! restarted manager never reuses a number an agent already ran, bumped for a host only
//! when its content changes. A host is sent its state when it connects, when the
//! configuration changes (`ControlPlane::config_changed`), and on a 5 s tick while it
//! has not applied what it was sent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use super::channel::{self, HostRef};
use super::ControlPlane;
use crate::manager::store::{Actor, StoreError};
use crate::model::desired::{desired_states, same_content, Gap};
use crate::proto::control::{AgentEvent, DesiredState, Inventory, ManagerMessage};

/// How often desired state is recomputed and resent to hosts that did not apply it.
pub const RESEND_EVERY: Duration = Duration::from_secs(5);

/// Recomputes and pushes desired state when poked (and periodically).
pub struct Reconciler {
    poke: Notify,
    next_version: AtomicU64,
    /// Last computed state per host name (with its version). One computation at a time,
    /// so versions follow content changes in order.
    current: Mutex<HashMap<String, DesiredState>>,
}

impl Default for Reconciler {
    fn default() -> Self {
        let seed = u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(1);
        Self {
            poke: Notify::new(),
            next_version: AtomicU64::new(seed),
            current: Mutex::new(HashMap::new()),
        }
    }
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn poke(&self) {
        self.poke.notify_one();
    }

    /// Recomputes every host's desired state from the database. Returns the hosts whose
    /// content changed (they got a new version).
    async fn recompute(&self, cp: &ControlPlane) -> Result<Vec<String>, StoreError> {
        let mut current = self.current.lock().await;
        let rows = cp.store.desired_rows().await?;
        let computed = desired_states(&rows.vpgs, &rows.members, &rows.hosts);
        for g in &computed.gaps {
            match g {
                Gap::NoDataAddress { recovery_host } => tracing::warn!(
                    host = %recovery_host,
                    "recovery host has no replication listener yet: not sent as a peer"
                ),
                other => tracing::debug!(gap = ?other, "not in any desired state"),
            }
        }
        let mut changed = Vec::new();
        for (host, mut d) in computed.hosts {
            match current.get(&host) {
                Some(prev) if same_content(prev, &d) => {}
                _ => {
                    d.version = self.next_version.fetch_add(1, Ordering::Relaxed) + 1;
                    current.insert(host.clone(), d);
                    changed.push(host);
                }
            }
        }
        Ok(changed)
    }

    /// The host's current desired state (recomputed when not known yet).
    async fn state_of(
        &self,
        cp: &ControlPlane,
        host: &str,
    ) -> Result<Option<DesiredState>, StoreError> {
        if let Some(d) = self.current.lock().await.get(host) {
            return Ok(Some(d.clone()));
        }
        self.recompute(cp).await?;
        Ok(self.current.lock().await.get(host).cloned())
    }

    /// Sends `host` its desired state (after a connect).
    pub async fn push_to(&self, cp: &ControlPlane, host: &str) {
        // Recompute first: the connection may have brought a new inventory or address.
        if let Err(e) = self.recompute(cp).await {
            tracing::warn!(host, error = %e, "cannot compute desired state");
            return;
        }
        match self.state_of(cp, host).await {
            Ok(Some(d)) => send(cp, host, d),
            Ok(None) => {}
            Err(e) => tracing::warn!(host, error = %e, "cannot compute desired state"),
        }
    }

    /// One pass: recompute, send changed states to connected hosts, and on `resend`
    /// also the current state to hosts that have not applied what they were sent.
    async fn pass(&self, cp: &ControlPlane, resend: bool) {
        let changed = match self.recompute(cp).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot compute desired state");
                return;
            }
        };
        let states = self.current.lock().await.clone();
        for live in cp.hub.all_live() {
            let Some(d) = states.get(&live.host_name) else {
                continue;
            };
            let due = changed.contains(&live.host_name)
                || live.sent != Some(d.version)
                || (resend && live.applied != Some(d.version));
            if due {
                send(cp, &live.host_name, d.clone());
            }
        }
    }
}

fn send(cp: &ControlPlane, host: &str, d: DesiredState) {
    let version = d.version;
    match cp.hub.send(host, ManagerMessage::Desired(d)) {
        Ok(()) => tracing::debug!(host, version, "desired state sent"),
        Err(e) => tracing::debug!(host, error = %e, "desired state not sent"),
    }
}

/// The reconciler loop, and the liveness loop next to it.
pub async fn run(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    // No agent is connected to a manager that just started, whatever the database
    // remembers from the last run.
    match cp
        .store
        .disconnect_all_hosts_except(&cp.hub.connected_hosts(), "manager restarted")
        .await
    {
        Ok(0) => {}
        Ok(n) => tracing::info!(
            hosts = n,
            "hosts marked disconnected until their agents reconnect"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot mark hosts disconnected at start"),
    }
    let reconcile = async {
        let mut tick = tokio::time::interval(RESEND_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = cp.reconciler.poke.notified() => cp.reconciler.pass(&cp, false).await,
                _ = tick.tick() => cp.reconciler.pass(&cp, true).await,
            }
        }
    };
    tokio::join!(
        reconcile,
        channel::liveness(Arc::clone(&cp), cancel.clone())
    );
}

fn agent_actor(host: &HostRef) -> Actor {
    Actor(format!("agent:{}", host.name))
}

/// Applies an inventory the agent reported; a change recomputes desired state (a disk
/// may have got its id).
pub async fn on_inventory(cp: &Arc<ControlPlane>, host: &HostRef, inv: Inventory) {
    match cp
        .store
        .apply_host_inventory(&agent_actor(host), &host.id, &inv)
        .await
    {
        Ok(true) => cp.config_changed(),
        Ok(false) => {}
        Err(e) => tracing::warn!(host = %host.name, error = %e, "inventory not applied"),
    }
}

pub async fn on_agent_event(cp: &Arc<ControlPlane>, host: &HostRef, ev: AgentEvent) {
    if let Err(e) = cp.store.record_agent_event(&host.id, &host.name, &ev).await {
        tracing::warn!(host = %host.name, kind = %ev.kind, error = %e, "agent event not recorded");
    }
}
