//! Agents under the manager: the control channel (`channel`), who is connected and what
//! they last said (`hub`), the desired state each host must run and the inventory they
//! report (`reconcile`), checkpoint rounds with the cross-host consistency barrier
//! (`rounds`), which checkpoints every journal of a VPG holds (`recovery`), the VPG
//! status that follows from all of it (`evaluate`), and VM requests that go through a
//! VM's host (`vms`: create, console).
//!
//! The database holds what should be; agents report what is. Nothing here replays
//! commands: every (re)connection and every change recomputes the desired state from the
//! database and sends it whole.

pub mod alerts;
pub mod channel;
pub mod evaluate;
pub mod hub;
pub mod reconcile;
pub mod recovery;
pub mod replicas;
pub mod rounds;
pub mod vms;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::metrics::Metrics;
use super::store::Store;
use crate::proto::control::AgentMessage;
pub use hub::{HostLive, Hub, HubError};

/// Timings of the control plane (`[manager]` section; tests shorten them).
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// How often agents report.
    pub heartbeat: Duration,
    /// Silence after which a host counts as disconnected.
    pub disconnect_after: Duration,
    /// The longest an agent may hold write completions in a checkpoint round.
    pub hold_bound: Duration,
    /// Test-only: `false` runs rounds without the barrier (each host inserts its marker
    /// and releases at once, one host after the other), to show what the barrier
    /// prevents. Never set in production.
    pub barrier: bool,
    /// Checkpoint interval when a VPG does not set one.
    pub default_checkpoint_interval: Duration,
    /// How long an alert's condition must hold before it is raised, and be plainly
    /// false before it clears.
    pub alerts: crate::model::alerts::Hysteresis,
    /// Webhook delivery timings (back-off, timeout, polling).
    pub webhooks: crate::manager::webhooks::WebhookSettings,
    /// Live stream bounds (history, slow clients).
    pub live: crate::manager::live::LiveSettings,
}

impl Default for ControlSettings {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(1),
            disconnect_after: Duration::from_secs(5),
            hold_bound: Duration::from_millis(50),
            barrier: true,
            default_checkpoint_interval: Duration::from_secs(5),
            alerts: crate::model::alerts::Hysteresis::default(),
            webhooks: Default::default(),
            live: Default::default(),
        }
    }
}

/// The control plane of one manager process.
pub struct ControlPlane {
    pub store: Store,
    pub hub: Hub,
    pub settings: ControlSettings,
    pub reconciler: reconcile::Reconciler,
    pub rounds: rounds::Rounds,
    pub recovery: recovery::RecoveryTracker,
    /// Recovery disks waiting to be deleted once their disks stopped streaming.
    pub replicas: replicas::ReplicaDrops,
    /// Recovery operations (failover test, failover, move) and their drivers.
    pub ops: crate::manager::ops::Operations,
    /// Per-VM replication state (Hyper-V words) from the last evaluation.
    pub vm_states: evaluate::VmStates,
    /// The VPG list as the last evaluation left it (`GET /api/v1/vpgs`).
    pub vpg_list: evaluate::VpgList,
    /// The Prometheus registry: the evaluator sets per-VPG values, rounds observe holds.
    pub metrics: Arc<Metrics>,
    /// The live stream (`GET /api/v1/stream`): the evaluator hands it SLA samples.
    pub live: Arc<crate::manager::live::Live>,
    /// Poked whenever configuration or live facts change, so the loops react at once
    /// instead of at their next tick.
    pub changed: Notify,
    /// Moves whenever configuration or inventory (VPGs, members, VMs, disks, hosts) may
    /// have changed in the database: what was read from it at an older generation may
    /// be stale (the rounds' cached plans).
    generation: AtomicU64,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl ControlPlane {
    pub fn new(store: Store, settings: ControlSettings, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self {
            metrics,
            live: crate::manager::live::Live::new(settings.live.clone()),
            reconciler: reconcile::Reconciler::new(),
            rounds: rounds::Rounds::new(),
            recovery: recovery::RecoveryTracker::new(),
            replicas: replicas::ReplicaDrops::new(),
            vm_states: evaluate::VmStates::default(),
            vpg_list: evaluate::VpgList::default(),
            ops: crate::manager::ops::Operations::new(),
            hub: Hub::new(),
            store,
            settings,
            changed: Notify::new(),
            generation: AtomicU64::new(0),
            cancel: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    /// Starts the background loops (reconciler, round scheduler, evaluator, liveness).
    pub fn start(self: &Arc<Self>) {
        let me = Arc::clone(self);
        self.tasks.spawn(reconcile::run(me, self.cancel.clone()));
        let me = Arc::clone(self);
        self.tasks.spawn(rounds::run(me, self.cancel.clone()));
        let me = Arc::clone(self);
        self.tasks.spawn(evaluate::run(me, self.cancel.clone()));
        let me = Arc::clone(self);
        self.tasks.spawn(replicas::run(me, self.cancel.clone()));
        self.tasks
            .spawn(crate::manager::ops::resume_all(Arc::clone(self)));
        self.tasks.spawn(crate::manager::live::run(
            self.store.clone(),
            Arc::clone(&self.live),
            self.cancel.clone(),
        ));
        self.tasks.spawn(crate::manager::webhooks::run(
            self.store.clone(),
            self.settings.webhooks.clone(),
            self.cancel.clone(),
        ));
    }

    /// Configuration changed in the database (a REST mutation): recompute now.
    pub fn config_changed(&self) {
        self.bump_generation();
        self.changed.notify_waiters();
        self.reconciler.poke();
    }

    /// See the `generation` field: read it before reading configuration from the
    /// database; what was read stays valid while this has not moved.
    pub fn config_generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Configuration or inventory may have changed in the database (a REST mutation, an
    /// inventory applied, a host connecting or going away).
    pub fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Runs a background task of the control plane (stopped and awaited at shutdown).
    pub fn spawn_task<F>(&self, f: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(f);
    }

    /// Cancellation token of the control plane (connections end with it).
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Everything an agent sends after its Hello comes through here.
    pub async fn on_message(self: &Arc<Self>, host: &channel::HostRef, msg: AgentMessage) {
        self.hub.touch(&host.name);
        match msg {
            AgentMessage::Hello(_) => {
                tracing::warn!(host = %host.name, "second hello on one connection ignored")
            }
            AgentMessage::Heartbeat(hb) => {
                self.recovery.on_journals(&host.name, &hb.journals);
                self.hub.record_heartbeat(&host.name, hb);
                self.changed.notify_waiters();
            }
            AgentMessage::Inventory(inv) => reconcile::on_inventory(self, host, inv).await,
            AgentMessage::Applied { version, error } => {
                if let Some(e) = &error {
                    tracing::warn!(host = %host.name, version, error = %e, "agent could not apply its desired state");
                }
                self.hub.record_applied(&host.name, version);
                self.changed.notify_waiters();
            }
            AgentMessage::Held(h) => self.rounds.on_held(&host.name, h),
            AgentMessage::Released(r) => self.rounds.on_released(&host.name, r),
            AgentMessage::CommandResult(r) => self.hub.command_done(r),
            AgentMessage::Event(e) => reconcile::on_agent_event(self, host, e).await,
        }
    }

    /// Stops the loops and closes every agent connection.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}
