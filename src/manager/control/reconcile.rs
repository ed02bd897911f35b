//! Desired state per host, computed from the database and pushed whole on every change
//! and every reconnect; inventory and events reported by agents written to the database.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::channel::HostRef;
use super::ControlPlane;
use crate::proto::control::{AgentEvent, Inventory};

/// Recomputes and pushes desired state when poked (and periodically).
#[derive(Default)]
pub struct Reconciler {
    poke: Notify,
}

impl Reconciler {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn poke(&self) {
        self.poke.notify_one();
    }
}

pub async fn run(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    let _ = cp;
    cancel.cancelled().await;
}

pub async fn on_inventory(cp: &Arc<ControlPlane>, host: &HostRef, inv: Inventory) {
    let _ = (cp, host, inv);
}

pub async fn on_agent_event(cp: &Arc<ControlPlane>, host: &HostRef, ev: AgentEvent) {
    let _ = (cp, host, ev);
}
