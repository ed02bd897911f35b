//! Checkpoint rounds: every checkpoint interval per VPG, across every protected host of
//! the VPG, with the consistency barrier of DESIGN §4 (hold, marker, report, release),
//! bounded; user-tagged and app-consistent rounds on request.
//!
//! One round, with the barrier:
//! 1. `Hold` to every protected host at once. Each holds write completions of the VPG's
//!    disks, inserts marker C into every disk's stream and answers `Held`.
//! 2. Only when *every* host has answered within the hold bound: `Release` to all. No
//!    write acknowledged before the release can depend on one that lands after C on
//!    another host, so C is crash-consistent across the VPG.
//! 3. Every host answers `Released`; only if all released on time (the agent did not
//!    have to release by itself at the bound) is the checkpoint stored.
//!
//! A round asked to quiesce (app-consistent) is stored with the weakest quiesce method
//! the hosts answered in `Held` (`model::checkpoints::round_quiesce`), and only as
//! app-consistent when every guest agent froze its file systems
//! (`model::checkpoints::round_kind`).
//!
//! Any error, silence or late answer aborts the round (`Abort` to all, no row); the
//! markers already in the journals are harmless, since nothing refers to them. Rounds of
//! different VPGs run concurrently; one VPG's rounds never overlap.
//!
//! Nothing is read from the database per round: each VPG's plan (lifecycle, paused,
//! interval, hosts with their member VMs and disk ids) is cached, tagged with the
//! control plane's configuration generation, and all plans are read again in one pass
//! once the generation moved (or the cache is [`PLAN_MAX_AGE`] old). Scheduled rounds'
//! rows are written by one writer task in batches, one transaction per batch.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ControlPlane;
use crate::manager::store::{Actor, LiveVpg, NewCheckpoint, Store, StoreError};
use crate::model::checkpoints::{next_round_id, round_kind, round_quiesce};
use crate::model::status::Lifecycle;
use crate::proto::api::Checkpoint;
use crate::proto::control::{
    CheckpointKind, ManagerMessage, QuiesceMethod, RoundHeld, RoundHold, RoundReleased,
};

/// Samples kept for the hold-time and latency percentiles.
const SAMPLES: usize = 10_000;
/// How often aborted rounds of one VPG are logged and recorded as an event, at most.
const ABORT_REPORT_EVERY: Duration = Duration::from_secs(60);
/// A VPG whose round could not start (a host away, protection not applied yet) is
/// retried this soon, or at its interval if shorter.
const NOT_READY_RETRY: Duration = Duration::from_secs(1);
/// How often the scheduler rereads which VPGs take checkpoints.
const REFRESH: Duration = Duration::from_secs(1);
/// Scheduler resolution.
const TICK: Duration = Duration::from_millis(100);
/// Slack for `Released` beyond the hold bound (the agent's own timer, the network).
const RELEASE_SLACK: Duration = Duration::from_secs(1);
/// Cached plans are read again after this long even if the generation did not move:
/// a safety net for changes written without a bump (another process on the same
/// database, the evaluator's lifecycle moves).
const PLAN_MAX_AGE: Duration = Duration::from_secs(10);
/// The most checkpoint rows written in one transaction.
const BATCH_MAX: usize = 500;
/// At most one batch transaction this often (a batch waits for the rounds completing
/// meanwhile; an idle writer writes at once).
const BATCH_EVERY: Duration = Duration::from_millis(50);
/// Completed rounds waiting for the writer, at most (rounds wait beyond it).
const BATCH_QUEUE: usize = 10_000;

/// Why a round did not produce a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum RoundError {
    #[error("the VPG is not being protected (it is {0})")]
    NotProtecting(&'static str),
    #[error("protection of the VPG is paused")]
    Paused,
    #[error("the VPG has no member VM on a known host")]
    NoHosts,
    #[error("host {0} is not connected")]
    HostUnreachable(String),
    #[error("host {host} does not run the VPG's protection yet ({why})")]
    NotReady { host: String, why: String },
    #[error("checkpoint round {round} aborted: {reason}")]
    Aborted { round: u64, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a round is asked to take.
#[derive(Debug, Clone)]
pub struct RoundRequest {
    pub kind: CheckpointKind,
    pub tag: Option<String>,
    /// Quiesce the member VMs first (app-consistent).
    pub quiesce: bool,
}

impl RoundRequest {
    pub fn scheduled() -> Self {
        Self {
            kind: CheckpointKind::Scheduled,
            tag: None,
            quiesce: false,
        }
    }
}

/// Percentiles of the rounds kept in memory (for the benchmark and metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RoundStats {
    pub completed: u64,
    pub aborted: u64,
    /// Longest write-completion hold across the round's hosts, µs.
    pub hold_p50_us: u64,
    pub hold_p99_us: u64,
    /// From sending `Hold` to the last `Released`, µs.
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
}

enum Reply {
    Held(RoundHeld),
    Released(RoundReleased),
}

/// What a completed round reports.
struct Outcome {
    /// The longest write-completion hold across its hosts, µs.
    hold_us: u64,
    /// How its guests were quiesced (None: not asked).
    quiesce: Option<QuiesceMethod>,
}

/// Aborted rounds of one VPG since they were last reported.
struct AbortLog {
    count: u64,
    since: DateTime<Utc>,
    reported: Option<Instant>,
}

/// What a round needs of one VPG's configuration, from the database.
#[derive(Debug, Clone, PartialEq)]
struct VpgPlan {
    lifecycle: Lifecycle,
    paused: bool,
    /// `checkpoint_interval_ms` (0: the default).
    interval_ms: u32,
    /// Host name → its member VMs and their disks' agent ids (`None`: not reported).
    hosts: BTreeMap<String, HostPlan>,
}

#[derive(Debug, Clone, Default, PartialEq)]
struct HostPlan {
    vms: Vec<String>,
    devices: Vec<Option<u64>>,
}

impl VpgPlan {
    fn of(v: &LiveVpg) -> Self {
        let mut hosts: BTreeMap<String, HostPlan> = BTreeMap::new();
        for m in &v.members {
            let Some(host) = &m.host else { continue };
            let h = hosts.entry(host.clone()).or_default();
            h.vms.push(m.vm_name.clone());
            h.devices.extend(m.devices.iter().copied());
        }
        Self {
            lifecycle: v.lifecycle,
            paused: v.paused,
            interval_ms: v.settings.checkpoint_interval_ms,
            hosts,
        }
    }

    /// Whether the scheduler starts rounds for it: being created or protecting, not paused.
    fn scheduled(&self) -> bool {
        matches!(self.lifecycle, Lifecycle::Creating | Lifecycle::Protecting) && !self.paused
    }
}

/// Every VPG's plan as read at one configuration generation.
struct Plans {
    generation: u64,
    loaded: tokio::time::Instant,
    vpgs: HashMap<String, VpgPlan>,
}

/// A completed round's row for the writer, and where its result goes.
type Pending = (
    NewCheckpoint,
    oneshot::Sender<Result<Checkpoint, StoreError>>,
);

#[derive(Default)]
struct Inner {
    /// The last round id handed out; `None` until seeded from the database.
    last_id: Option<u64>,
    /// Round id → the round waiting for its replies.
    waiting: HashMap<u64, mpsc::UnboundedSender<(String, Reply)>>,
    /// One lock per VPG: its rounds never overlap.
    vpg_locks: HashMap<String, Arc<tokio::sync::Mutex<()>>>,
    holds_us: VecDeque<u64>,
    latencies_us: VecDeque<u64>,
    completed: u64,
    aborted: u64,
    aborts: HashMap<String, AbortLog>,
}

/// See the module documentation.
#[derive(Default)]
pub struct Rounds {
    inner: Mutex<Inner>,
    /// The cached plans; the async lock makes concurrent rounds wait for one reload
    /// instead of each reading the database.
    plans: tokio::sync::Mutex<Option<Arc<Plans>>>,
    /// The batch writer's queue, started with the first scheduled round.
    writer: OnceLock<mpsc::Sender<Pending>>,
}

fn push_sample(q: &mut VecDeque<u64>, v: u64) {
    if q.len() == SAMPLES {
        q.pop_front();
    }
    q.push_back(v);
}

/// Nearest-rank percentile.
fn percentile(q: &VecDeque<u64>, p: f64) -> u64 {
    if q.is_empty() {
        return 0;
    }
    let mut v: Vec<u64> = q.iter().copied().collect();
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Removes the round's reply route however the round ends.
struct Unregister<'a> {
    rounds: &'a Rounds,
    round: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        self.rounds.lock().waiting.remove(&self.round);
    }
}

/// The hosts of one round: host name → member VM names there.
type Plan = BTreeMap<String, Vec<String>>;

impl Rounds {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn on_held(&self, host: &str, held: RoundHeld) {
        self.route(host, held.round, Reply::Held(held));
    }

    pub fn on_released(&self, host: &str, released: RoundReleased) {
        self.route(host, released.round, Reply::Released(released));
    }

    fn route(&self, host: &str, round: u64, reply: Reply) {
        let g = self.lock();
        match g.waiting.get(&round) {
            Some(tx) => {
                let _ = tx.send((host.to_string(), reply));
            }
            // The round ended (timed out, aborted); its late answers change nothing.
            None => tracing::debug!(host, round, "reply to a round that is over ignored"),
        }
    }

    /// Hold-time and latency percentiles over the last rounds.
    pub fn hold_stats(&self) -> RoundStats {
        let g = self.lock();
        RoundStats {
            completed: g.completed,
            aborted: g.aborted,
            hold_p50_us: percentile(&g.holds_us, 50.0),
            hold_p99_us: percentile(&g.holds_us, 99.0),
            latency_p50_us: percentile(&g.latencies_us, 50.0),
            latency_p99_us: percentile(&g.latencies_us, 99.0),
        }
    }

    fn vpg_lock(&self, vpg_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut g = self.lock();
        Arc::clone(g.vpg_locks.entry(vpg_id.to_string()).or_default())
    }

    /// Every VPG's plan, read again in one pass when the configuration generation moved
    /// since the cached ones were read (or they are [`PLAN_MAX_AGE`] old).
    async fn plans(&self, cp: &ControlPlane) -> Result<Arc<Plans>, StoreError> {
        self.plans_with(
            || cp.config_generation(),
            || cp.store.live_vpgs(None, false),
        )
        .await
    }

    async fn plans_with<G, L, F>(&self, generation: G, load: L) -> Result<Arc<Plans>, StoreError>
    where
        G: Fn() -> u64,
        L: FnOnce() -> F,
        F: Future<Output = Result<Vec<LiveVpg>, StoreError>>,
    {
        let mut cached = self.plans.lock().await;
        // Read before the database: a change committed meanwhile moves it past this.
        let now = generation();
        if let Some(p) = cached.as_ref() {
            if p.generation == now && p.loaded.elapsed() < PLAN_MAX_AGE {
                return Ok(Arc::clone(p));
            }
        }
        let list = load().await?;
        let p = Arc::new(Plans {
            generation: now,
            loaded: tokio::time::Instant::now(),
            vpgs: list
                .iter()
                .map(|v| (v.id.clone(), VpgPlan::of(v)))
                .collect(),
        });
        *cached = Some(Arc::clone(&p));
        Ok(p)
    }

    /// Hands a scheduled round's row to the batch writer (started on first use) and
    /// waits until it is stored.
    async fn store_batched(
        &self,
        cp: &ControlPlane,
        c: NewCheckpoint,
    ) -> Result<Checkpoint, RoundError> {
        let round = c.id;
        let stopped = || RoundError::Aborted {
            round,
            reason: "the checkpoint writer has stopped (manager shutting down)".into(),
        };
        let writer = self.writer.get_or_init(|| {
            let (tx, rx) = mpsc::channel(BATCH_QUEUE);
            cp.tasks
                .spawn(write_checkpoints(cp.store.clone(), rx, cp.cancel.clone()));
            tx
        });
        let (tx, rx) = oneshot::channel();
        if writer.send((c, tx)).await.is_err() {
            return Err(stopped());
        }
        match rx.await {
            Ok(r) => Ok(r?),
            Err(_) => Err(stopped()),
        }
    }

    /// Forgets per-VPG state of VPGs that no longer take checkpoints.
    fn retain_vpgs(&self, keep: &HashSet<String>) {
        let mut g = self.lock();
        g.vpg_locks
            .retain(|id, l| keep.contains(id) || Arc::strong_count(l) > 1);
        g.aborts.retain(|id, _| keep.contains(id));
    }

    /// The next round id, above every id stored before (also by earlier runs of the
    /// manager).
    async fn next_id(&self, cp: &ControlPlane) -> Result<u64, StoreError> {
        if self.lock().last_id.is_none() {
            let stored = cp.store.max_checkpoint_id().await?;
            let mut g = self.lock();
            g.last_id = Some(g.last_id.unwrap_or(0).max(stored));
        }
        let now_ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
        let mut g = self.lock();
        let id = next_round_id(now_ms, g.last_id.unwrap_or(0));
        g.last_id = Some(id);
        Ok(id)
    }

    fn record(&self, hold_us: u64, latency: Duration) {
        let mut g = self.lock();
        g.completed += 1;
        push_sample(&mut g.holds_us, hold_us);
        push_sample(
            &mut g.latencies_us,
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
        );
    }

    /// Counts an aborted round; returns the summary to log and record when one is due
    /// (at most once a minute per VPG).
    fn note_abort(&self, vpg_id: &str) -> Option<(u64, DateTime<Utc>)> {
        let mut g = self.lock();
        g.aborted += 1;
        let log = g.aborts.entry(vpg_id.to_string()).or_insert(AbortLog {
            count: 0,
            since: Utc::now(),
            reported: None,
        });
        log.count += 1;
        if log
            .reported
            .is_some_and(|t| t.elapsed() < ABORT_REPORT_EVERY)
        {
            return None;
        }
        let out = (log.count, log.since);
        log.count = 0;
        log.since = Utc::now();
        log.reported = Some(Instant::now());
        Some(out)
    }

    /// Runs one round for the VPG now (waiting for a round of the same VPG in flight)
    /// and stores its checkpoint. `actor` is the operator who asked, if any.
    pub async fn run_round(
        &self,
        cp: &ControlPlane,
        vpg_id: &str,
        req: RoundRequest,
        actor: Option<&Actor>,
    ) -> Result<Checkpoint, RoundError> {
        let lock = self.vpg_lock(vpg_id);
        let _one_at_a_time = lock.lock().await;
        let plan = plan(cp, vpg_id).await?;
        let round = self.next_id(cp).await?;
        let taken_at = crate::manager::store::now();
        let started = Instant::now();
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().waiting.insert(round, tx);
        let _unregister = Unregister {
            rounds: self,
            round,
        };
        let result = if cp.settings.barrier {
            self.barrier_round(cp, vpg_id, round, &req, &plan, rx).await
        } else {
            self.unsafe_round(cp, vpg_id, round, &req, &plan, rx).await
        };
        match result {
            Ok(Outcome { hold_us, quiesce }) => {
                self.record(hold_us, started.elapsed());
                cp.metrics
                    .observe_round(Some(Duration::from_micros(hold_us)));
                let kind = round_kind(req.kind, req.tag.is_some(), quiesce);
                if kind != req.kind {
                    tracing::info!(
                        vpg = vpg_id,
                        round,
                        asked = req.kind.as_str(),
                        stored = kind.as_str(),
                        "guests were paused, not frozen: the checkpoint is crash consistent only"
                    );
                }
                let c = NewCheckpoint {
                    id: round,
                    vpg_id: vpg_id.to_string(),
                    taken_at,
                    kind,
                    tag: req.tag.clone(),
                    quiesce,
                };
                match actor {
                    // Asked for by an operator: audited, in its own transaction.
                    Some(_) => Ok(cp.store.insert_checkpoint(c, actor).await?),
                    None => self.store_batched(cp, c).await,
                }
            }
            Err(reason) => {
                cp.metrics.observe_round(None);
                if let Some((n, since)) = self.note_abort(vpg_id) {
                    tracing::warn!(vpg = vpg_id, round, %reason, aborted = n, %since, "checkpoint rounds aborted");
                    let msg = format!(
                        "checkpoint rounds aborted: {n} since {} (last: {reason})",
                        since.format("%Y-%m-%d %H:%M:%S UTC")
                    );
                    let details = serde_json::json!({"aborted": n, "since": since, "round": round, "reason": reason});
                    if let Err(e) = cp
                        .store
                        .vpg_event(vpg_id, "checkpoint.rounds_aborted", "warning", msg, details)
                        .await
                    {
                        tracing::warn!(vpg = vpg_id, error = %e, "could not record aborted rounds");
                    }
                }
                Err(RoundError::Aborted { round, reason })
            }
        }
    }

    /// Phases 1 and 2 with the barrier. Returns the longest hold and how the guests were
    /// quiesced, or why it failed.
    async fn barrier_round(
        &self,
        cp: &ControlPlane,
        vpg_id: &str,
        round: u64,
        req: &RoundRequest,
        plan: &Plan,
        mut rx: mpsc::UnboundedReceiver<(String, Reply)>,
    ) -> Result<Outcome, String> {
        let bound = cp.settings.hold_bound;
        let abort = |why: String| {
            for host in plan.keys() {
                let _ = cp.hub.send(host, ManagerMessage::Abort { round });
            }
            Err(why)
        };
        for (host, vms) in plan {
            let hold = hold_message(cp, vpg_id, round, req, vms, true);
            if let Err(e) = cp.hub.send(host, ManagerMessage::Hold(hold)) {
                return abort(e.to_string());
            }
        }
        let deadline = tokio::time::Instant::now() + bound;
        // Host → how it quiesced.
        let mut held: HashMap<&str, Option<QuiesceMethod>> = HashMap::new();
        while held.len() < plan.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((host, Reply::Held(h)))) => {
                    let Some((name, _)) = plan.get_key_value(&host) else {
                        continue;
                    };
                    if let Some(e) = h.error {
                        return abort(format!("{host}: {e}"));
                    }
                    held.insert(name.as_str(), h.quiesce);
                }
                Ok(Some((host, Reply::Released(r)))) => {
                    // Released before we released: the host gave up holding.
                    return abort(format!("{host} released by itself after {} µs", r.hold_us));
                }
                Ok(None) => return abort("reply route closed".into()),
                Err(_) => {
                    let missing: Vec<&str> = plan
                        .keys()
                        .map(String::as_str)
                        .filter(|h| !held.contains_key(h))
                        .collect();
                    return abort(format!(
                        "no Held within {} ms from {}",
                        bound.as_millis(),
                        missing.join(", ")
                    ));
                }
            }
        }
        // Every host holds: release them all.
        for host in plan.keys() {
            if let Err(e) = cp.hub.send(host, ManagerMessage::Release { round }) {
                // The others are released; this host lets go at its bound and the
                // round cannot count.
                return Err(format!("release: {e}"));
            }
        }
        let deadline = tokio::time::Instant::now() + bound + RELEASE_SLACK;
        let mut released: HashMap<&str, u64> = HashMap::new();
        while released.len() < plan.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((host, Reply::Released(r)))) => {
                    let Some((name, _)) = plan.get_key_value(&host) else {
                        continue;
                    };
                    if !r.on_time {
                        return Err(format!(
                            "{host} released by itself after {} µs (bound {} ms)",
                            r.hold_us,
                            bound.as_millis()
                        ));
                    }
                    released.insert(name.as_str(), r.hold_us);
                }
                Ok(Some((_, Reply::Held(_)))) => continue,
                Ok(None) => return Err("reply route closed".into()),
                Err(_) => {
                    let missing: Vec<&str> = plan
                        .keys()
                        .map(String::as_str)
                        .filter(|h| !released.contains_key(h))
                        .collect();
                    return Err(format!("no Released from {}", missing.join(", ")));
                }
            }
        }
        Ok(Outcome {
            hold_us: released.values().copied().max().unwrap_or(0),
            quiesce: round_quiesce(req.quiesce, held.into_values()),
        })
    }

    /// Test-only mode without the barrier: each host inserts its markers and goes on at
    /// once, one host after the other. The checkpoint is stored as if consistent; it is
    /// not, which is what the cross-VM consistency test shows.
    async fn unsafe_round(
        &self,
        cp: &ControlPlane,
        vpg_id: &str,
        round: u64,
        req: &RoundRequest,
        plan: &Plan,
        mut rx: mpsc::UnboundedReceiver<(String, Reply)>,
    ) -> Result<Outcome, String> {
        let bound = cp.settings.hold_bound;
        let mut methods = Vec::with_capacity(plan.len());
        for (host, vms) in plan {
            let hold = hold_message(cp, vpg_id, round, req, vms, false);
            cp.hub
                .send(host, ManagerMessage::Hold(hold))
                .map_err(|e| e.to_string())?;
            let deadline = tokio::time::Instant::now() + bound;
            loop {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((h, Reply::Held(r)))) if &h == host => {
                        if let Some(e) = r.error {
                            return Err(format!("{host}: {e}"));
                        }
                        methods.push(r.quiesce);
                        break;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err("reply route closed".into()),
                    Err(_) => return Err(format!("no Held from {host}")),
                }
            }
        }
        Ok(Outcome {
            hold_us: 0,
            quiesce: round_quiesce(req.quiesce, methods),
        })
    }
}

fn hold_message(
    cp: &ControlPlane,
    vpg_id: &str,
    round: u64,
    req: &RoundRequest,
    vms: &[String],
    barrier: bool,
) -> RoundHold {
    RoundHold {
        round,
        vpg_id: vpg_id.to_string(),
        kind: req.kind,
        tag: req.tag.clone(),
        bound_ms: u64::try_from(cp.settings.hold_bound.as_millis()).unwrap_or(u64::MAX),
        quiesce: if req.quiesce {
            vms.to_vec()
        } else {
            Vec::new()
        },
        barrier,
    }
}

/// The hosts a round of this VPG must hold, checked against what they report: every
/// host connected, every member disk protected there in the VPG's group.
async fn plan(cp: &ControlPlane, vpg_id: &str) -> Result<Plan, RoundError> {
    let plans = cp.rounds.plans(cp).await?;
    let v = plans
        .vpgs
        .get(vpg_id)
        .ok_or_else(|| StoreError::not_found("vpg", vpg_id))?;
    check_plan(cp, vpg_id, v)
}

fn check_plan(cp: &ControlPlane, vpg_id: &str, v: &VpgPlan) -> Result<Plan, RoundError> {
    match v.lifecycle {
        Lifecycle::Creating | Lifecycle::Protecting => {}
        Lifecycle::Deleting | Lifecycle::WaitingRemoval => {
            return Err(RoundError::NotProtecting("being deleted"))
        }
        Lifecycle::Recovered => return Err(RoundError::NotProtecting("recovered")),
    }
    if v.paused {
        return Err(RoundError::Paused);
    }
    if v.hosts.is_empty() {
        return Err(RoundError::NoHosts);
    }
    for (host, h) in &v.hosts {
        let live = cp
            .hub
            .live(host)
            .ok_or_else(|| RoundError::HostUnreachable(host.clone()))?;
        let not_ready = |why: &str| RoundError::NotReady {
            host: host.clone(),
            why: why.to_string(),
        };
        let hb = live
            .heartbeat
            .ok_or_else(|| not_ready("no heartbeat yet"))?;
        for d in &h.devices {
            let d = d.ok_or_else(|| not_ready("a disk was never reported by the agent"))?;
            if !hb
                .status
                .protected
                .iter()
                .any(|p| p.disk_id == d && p.group == vpg_id)
            {
                return Err(not_ready(&format!("disk {d} is not protected in the VPG")));
            }
        }
    }
    Ok(v.hosts
        .iter()
        .map(|(host, h)| (host.clone(), h.vms.clone()))
        .collect())
}

/// The batch writer of scheduled rounds' rows: takes what is queued (up to
/// [`BATCH_MAX`]), at most one transaction every [`BATCH_EVERY`], and answers each
/// round. On cancellation it stores what was queued and ends.
async fn write_checkpoints(
    store: Store,
    mut rx: mpsc::Receiver<Pending>,
    cancel: CancellationToken,
) {
    let mut closing = false;
    let mut last: Option<tokio::time::Instant> = None;
    loop {
        let first = if closing {
            rx.recv().await
        } else {
            tokio::select! {
                m = rx.recv() => m,
                _ = cancel.cancelled() => {
                    closing = true;
                    rx.close();
                    continue;
                }
            }
        };
        let Some(first) = first else { return };
        if let (Some(t), false) = (last, closing) {
            tokio::select! {
                _ = tokio::time::sleep_until(t + BATCH_EVERY) => {}
                _ = cancel.cancelled() => {
                    closing = true;
                    rx.close();
                }
            }
        }
        let mut batch = vec![first];
        while batch.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        last = Some(tokio::time::Instant::now());
        write_batch(&store, batch).await;
    }
}

/// One transaction for the whole batch; should it fail (a VPG deleted while its round
/// ran), each row alone, so one bad row costs only its own round.
async fn write_batch(store: &Store, mut batch: Vec<Pending>) {
    batch.sort_by_key(|(c, _)| c.id);
    let rows: Vec<NewCheckpoint> = batch.iter().map(|(c, _)| c.clone()).collect();
    match store.insert_checkpoints(&rows).await {
        Ok(()) => {
            for (c, tx) in batch {
                let _ = tx.send(Ok(stored(c)));
            }
        }
        Err(e) if batch.len() == 1 => {
            if let Some((_, tx)) = batch.pop() {
                let _ = tx.send(Err(e));
            }
        }
        Err(e) => {
            tracing::warn!(rows = batch.len(), error = %e, "checkpoint batch failed; storing its rows one by one");
            for (c, tx) in batch {
                let r = store
                    .insert_checkpoints(std::slice::from_ref(&c))
                    .await
                    .map(|()| stored(c));
                let _ = tx.send(r);
            }
        }
    }
}

/// The row a batch stored, as the API shows it.
fn stored(c: NewCheckpoint) -> Checkpoint {
    Checkpoint {
        id: i64::try_from(c.id).unwrap_or(i64::MAX),
        vpg_id: c.vpg_id,
        taken_at: c.taken_at,
        kind: c.kind.as_str().to_string(),
        tag: c.tag,
        recoverable: false,
        quiesce: c.quiesce.map(|q| q.as_str().to_string()),
        app_consistent: c.quiesce == Some(QuiesceMethod::GuestAgent),
    }
}

/// The scheduler: a round per VPG every checkpoint interval.
pub async fn run(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    let mut due: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut intervals: HashMap<String, Duration> = HashMap::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut running: JoinSet<(String, Result<Checkpoint, RoundError>)> = JoinSet::new();
    let mut refreshed: Option<Instant> = None;
    let mut seen_generation = cp.config_generation();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok((vpg, result)) = done else { continue };
                in_flight.remove(&vpg);
                let interval = intervals.get(&vpg).copied().unwrap_or(cp.settings.default_checkpoint_interval);
                let now = tokio::time::Instant::now();
                let next = match &result {
                    // On the cadence (the previous due time + the interval), not one
                    // interval after this round ended: otherwise every round's own
                    // duration and the tick add up to a slower rhythm than configured.
                    // A round that overran is followed at once, never twice.
                    Ok(_) | Err(RoundError::Aborted { .. }) => due
                        .get(&vpg)
                        .map_or(now + interval, |prev| (*prev + interval).max(now)),
                    Err(e) => {
                        tracing::debug!(vpg, error = %e, "scheduled checkpoint round skipped");
                        now + interval.min(NOT_READY_RETRY)
                    }
                };
                if let Err(RoundError::Store(e)) = &result {
                    tracing::warn!(vpg, error = %e, "checkpoint round could not be stored");
                }
                due.insert(vpg, next);
                continue;
            }
            _ = tick.tick() => {}
        }
        // From the cached plans: no query unless the configuration generation moved.
        if refreshed.is_none_or(|t| t.elapsed() >= REFRESH)
            || cp.config_generation() != seen_generation
        {
            match cp.rounds.plans(&cp).await {
                Ok(plans) => {
                    seen_generation = plans.generation;
                    let now = tokio::time::Instant::now();
                    intervals = plans
                        .vpgs
                        .iter()
                        .filter(|(_, v)| v.scheduled())
                        .map(|(id, v)| {
                            let iv = if v.interval_ms == 0 {
                                cp.settings.default_checkpoint_interval
                            } else {
                                Duration::from_millis(u64::from(v.interval_ms))
                            };
                            (id.clone(), iv)
                        })
                        .collect();
                    due.retain(|id, _| intervals.contains_key(id));
                    for (id, iv) in &intervals {
                        // A VPG seen for the first time takes its first checkpoint one
                        // interval from now.
                        due.entry(id.clone()).or_insert(now + *iv);
                    }
                    cp.rounds
                        .retain_vpgs(&intervals.keys().cloned().collect::<HashSet<_>>());
                    refreshed = Some(Instant::now());
                }
                Err(e) => tracing::warn!(error = %e, "round scheduler cannot read the VPGs"),
            }
        }
        let now = tokio::time::Instant::now();
        let ready: Vec<String> = due
            .iter()
            .filter(|(id, at)| **at <= now && !in_flight.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ready {
            in_flight.insert(id.clone());
            let cp = Arc::clone(&cp);
            running.spawn(async move {
                let r = cp
                    .rounds
                    .run_round(&cp, &id, RoundRequest::scheduled(), None)
                    .await;
                (id, r)
            });
        }
    }
    // Rounds in flight end here; an agent holding lets go at its bound by itself.
    running.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::store::{entity, LiveMember};
    use crate::model::settings::VpgSettings;
    use sea_orm::{ActiveModelTrait, EntityTrait, Set};
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    fn live(id: &str, hosts: &[(&str, &str, Option<u64>)], paused: bool) -> LiveVpg {
        LiveVpg {
            operation: None,
            id: id.into(),
            name: id.into(),
            lifecycle: Lifecycle::Protecting,
            paused,
            settings: VpgSettings::default(),
            status: String::new(),
            sub_status: String::new(),
            rpo_actual_ms: None,
            history_actual_secs: None,
            journal_bytes: 0,
            protected_since: None,
            history_since: None,
            newest_recoverable_at: None,
            members: hosts
                .iter()
                .map(|(host, vm, dev)| LiveMember {
                    vm_id: format!("id-{vm}"),
                    vm_name: (*vm).into(),
                    host: Some((*host).into()),
                    recovery_host: None,
                    never_enrolled: Vec::new(),
                    devices: vec![*dev],
                    needs_configuration: false,
                })
                .collect(),
            checkpoints: Default::default(),
        }
    }

    #[tokio::test]
    async fn plans_are_read_again_only_when_the_generation_moves() {
        let r = Rounds::new();
        let generation = AtomicU64::new(7);
        let loads = AtomicUsize::new(0);
        // What the database holds; the loader reads all of it in one call.
        let db = Mutex::new(vec![live("v1", &[("h1", "a", Some(1))], false)]);
        let get = || {
            r.plans_with(
                || generation.load(Ordering::SeqCst),
                || {
                    loads.fetch_add(1, Ordering::SeqCst);
                    let list = db.lock().map(|l| l.clone()).unwrap_or_default();
                    async move { Ok::<_, StoreError>(list) }
                },
            )
        };
        let p = get().await.expect("plans");
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        assert_eq!(p.generation, 7);
        assert_eq!(p.vpgs["v1"].hosts["h1"].vms, vec!["a".to_string()]);
        for _ in 0..10 {
            get().await.expect("plans");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1, "same generation: cached");

        // The database changes; without a bump the cache is (deliberately) not reread.
        db.lock()
            .expect("db")
            .push(live("v2", &[("h1", "b", Some(2)), ("h2", "c", None)], true));
        assert!(!get().await.expect("plans").vpgs.contains_key("v2"));
        generation.fetch_add(1, Ordering::SeqCst);
        let p = get().await.expect("plans");
        assert_eq!(loads.load(Ordering::SeqCst), 2, "one read for every VPG");
        assert_eq!(p.generation, 8);
        let v2 = &p.vpgs["v2"];
        assert!(v2.paused && !v2.scheduled());
        assert_eq!(v2.hosts.len(), 2);
        assert_eq!(v2.hosts["h2"].devices, vec![None]);
        assert!(p.vpgs["v1"].scheduled());
        get().await.expect("plans");
        assert_eq!(loads.load(Ordering::SeqCst), 2);

        // Safety net: an old cache is reread even at the same generation.
        {
            let mut c = r.plans.lock().await;
            let old = c.take().expect("cached");
            *c = Some(Arc::new(Plans {
                generation: old.generation,
                loaded: tokio::time::Instant::now()
                    .checked_sub(PLAN_MAX_AGE)
                    .expect("clock"),
                vpgs: old.vpgs.clone(),
            }));
        }
        get().await.expect("plans");
        assert_eq!(loads.load(Ordering::SeqCst), 3);

        // A failed read caches nothing: the next round tries again.
        generation.fetch_add(1, Ordering::SeqCst);
        let failed = r
            .plans_with(
                || generation.load(Ordering::SeqCst),
                || async { Err::<Vec<LiveVpg>, _>(StoreError::not_found("vpg", "x")) },
            )
            .await;
        assert!(failed.is_err());
        get().await.expect("plans");
        assert_eq!(loads.load(Ordering::SeqCst), 4);
    }

    /// A migrated SQLite store in `dir` with VPG `v1` (checkpoints need their VPG).
    async fn store_with_vpg(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("t.db").display());
        let store = Store::connect(&url).await.expect("connect");
        store.migrate_up().await.expect("migrate");
        let now = crate::manager::store::now();
        entity::site::ActiveModel {
            id: Set("s1".into()),
            name: Set("s1".into()),
            description: Set(String::new()),
            location: Set(None),
            bandwidth_limit: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        }
        .insert(store.connection())
        .await
        .expect("site");
        entity::vpg::ActiveModel {
            id: Set("v1".into()),
            name: Set("v1".into()),
            description: Set(String::new()),
            protected_site_id: Set(None),
            recovery_site_id: Set("s1".into()),
            settings: Set(serde_json::json!({})),
            lifecycle: Set("protecting".into()),
            paused: Set(false),
            status: Set("initializing".into()),
            sub_status: Set("none".into()),
            rpo_actual_ms: Set(None),
            history_actual_secs: Set(None),
            journal_bytes: Set(0),
            protected_since: Set(None),
            history_since: Set(None),
            newest_recoverable_at: Set(None),
            last_test_at: Set(None),
            fencing_generation: Set(1),
            operation_id: Set(None),
            operation_phase: Set(None),
            version: Set(1),
            created_at: Set(now),
            updated_at: Set(now),
        }
        .insert(store.connection())
        .await
        .expect("vpg");
        store
    }

    fn new_checkpoint(id: u64, vpg: &str) -> NewCheckpoint {
        NewCheckpoint {
            id,
            vpg_id: vpg.into(),
            taken_at: crate::manager::store::now(),
            kind: CheckpointKind::Scheduled,
            tag: None,
            // Every other row carries a quiesce method, to show the writer keeps it.
            quiesce: (id % 2 == 0).then_some(QuiesceMethod::Paused),
        }
    }

    #[tokio::test]
    async fn the_batch_writer_stores_queued_rounds_in_one_transaction() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_with_vpg(&dir).await;
        let commits = store.commits();
        let before = *commits.borrow();
        let (tx, rx) = mpsc::channel(BATCH_QUEUE);
        let mut waiters = Vec::new();
        // 120 rounds completed before the writer gets to them (ids out of order, as
        // rounds of different VPGs finish), and one whose VPG is gone.
        for i in (0..120u64).rev() {
            let (otx, orx) = oneshot::channel();
            tx.send((new_checkpoint(1_000 + i, "v1"), otx))
                .await
                .expect("queue");
            waiters.push((1_000 + i, orx));
        }
        let cancel = CancellationToken::new();
        let writer = tokio::spawn(write_checkpoints(store.clone(), rx, cancel.clone()));
        for (id, w) in waiters {
            let c = w.await.expect("answered").expect("stored");
            assert_eq!(
                (c.id, c.vpg_id.as_str(), c.recoverable),
                (id as i64, "v1", false)
            );
        }
        assert_eq!(
            *commits.borrow() - before,
            1,
            "one transaction for the batch"
        );
        let rows = entity::checkpoint::Entity::find()
            .all(store.connection())
            .await
            .expect("rows");
        let ids: Vec<i64> = rows.iter().map(|m| m.id).collect();
        assert_eq!(ids, (1_000..1_120).collect::<Vec<i64>>());
        for m in &rows {
            let want = (m.id % 2 == 0).then_some("paused");
            assert_eq!(m.quiesce.as_deref(), want, "row {}", m.id);
        }

        // A bad row (VPG deleted while its round ran) fails alone.
        let (a, ra) = oneshot::channel();
        let (b, rb) = oneshot::channel();
        let (c, rc) = oneshot::channel();
        tx.send((new_checkpoint(2_000, "v1"), a))
            .await
            .expect("queue");
        tx.send((new_checkpoint(2_001, "gone"), b))
            .await
            .expect("queue");
        tx.send((new_checkpoint(2_002, "v1"), c))
            .await
            .expect("queue");
        assert!(ra.await.expect("answered").is_ok());
        assert!(rb.await.expect("answered").is_err());
        assert!(rc.await.expect("answered").is_ok());
        assert_eq!(store.max_checkpoint_id().await.expect("max"), 2_002);

        // Shutdown: what is queued is stored, then the writer ends.
        let (d, rd) = oneshot::channel();
        tx.send((new_checkpoint(3_000, "v1"), d))
            .await
            .expect("queue");
        cancel.cancel();
        writer.await.expect("writer ends");
        assert!(rd.await.expect("answered").is_ok());
        assert!(tx
            .send((new_checkpoint(3_001, "v1"), oneshot::channel().0))
            .await
            .is_err());
    }

    #[tokio::test]
    async fn scheduled_rounds_share_transactions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = store_with_vpg(&dir).await;
        let cp = ControlPlane::new(
            store.clone(),
            Default::default(),
            Arc::new(crate::manager::metrics::Metrics::new()),
        );
        let commits = store.commits();
        let before = *commits.borrow();
        let mut set = JoinSet::new();
        for i in 0..200u64 {
            let cp = Arc::clone(&cp);
            set.spawn(async move {
                cp.rounds
                    .store_batched(&cp, new_checkpoint(10_000 + i, "v1"))
                    .await
            });
        }
        while let Some(r) = set.join_next().await {
            r.expect("task").expect("stored");
        }
        let n = *commits.borrow() - before;
        assert!((1..200).contains(&n), "{n} transactions for 200 rows");
        let rows = entity::checkpoint::Entity::find()
            .all(store.connection())
            .await
            .expect("rows");
        assert_eq!(rows.len(), 200);
        cp.shutdown().await;
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let q: VecDeque<u64> = (1..=100).collect();
        assert_eq!(percentile(&q, 50.0), 50);
        assert_eq!(percentile(&q, 99.0), 99);
        assert_eq!(percentile(&VecDeque::new(), 50.0), 0);
        assert_eq!(percentile(&VecDeque::from([7]), 99.0), 7);
    }

    #[test]
    fn aborts_are_reported_at_most_once_a_minute() {
        let r = Rounds::new();
        assert_eq!(r.note_abort("v").map(|x| x.0), Some(1));
        assert_eq!(r.note_abort("v"), None);
        assert_eq!(r.note_abort("v"), None);
        assert_eq!(r.note_abort("w").map(|x| x.0), Some(1), "per VPG");
        if let Some(l) = r.lock().aborts.get_mut("v") {
            l.reported = Instant::now().checked_sub(ABORT_REPORT_EVERY);
        }
        assert_eq!(r.note_abort("v").map(|x| x.0), Some(3));
        assert_eq!(r.hold_stats().aborted, 5);
    }

    #[test]
    fn late_replies_are_ignored() {
        let r = Rounds::new();
        r.on_released(
            "h",
            RoundReleased {
                round: 9,
                vpg_id: "v".into(),
                hold_us: 5,
                on_time: false,
            },
        );
        let (tx, mut rx) = mpsc::unbounded_channel();
        r.lock().waiting.insert(10, tx);
        r.on_released(
            "h",
            RoundReleased {
                round: 9,
                vpg_id: "v".into(),
                hold_us: 5,
                on_time: true,
            },
        );
        assert!(rx.try_recv().is_err());
        r.on_held(
            "h",
            RoundHeld {
                round: 10,
                vpg_id: "v".into(),
                timestamp_ms: 0,
                disks: vec![],
                error: None,
                quiesce: None,
            },
        );
        assert!(matches!(rx.try_recv(), Ok((h, Reply::Held(_))) if h == "h"));
    }
}
