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
//! Any error, silence or late answer aborts the round (`Abort` to all, no row); the
//! markers already in the journals are harmless, since nothing refers to them. Rounds of
//! different VPGs run concurrently; one VPG's rounds never overlap.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::ControlPlane;
use crate::manager::store::{Actor, NewCheckpoint, StoreError};
use crate::model::checkpoints::next_round_id;
use crate::model::status::Lifecycle;
use crate::proto::api::Checkpoint;
use crate::proto::control::{CheckpointKind, ManagerMessage, RoundHeld, RoundHold, RoundReleased};

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

/// Aborted rounds of one VPG since they were last reported.
struct AbortLog {
    count: u64,
    since: DateTime<Utc>,
    reported: Option<Instant>,
}

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
            Ok(hold_us) => {
                self.record(hold_us, started.elapsed());
                cp.metrics
                    .observe_round(Some(Duration::from_micros(hold_us)));
                let c = NewCheckpoint {
                    id: round,
                    vpg_id: vpg_id.to_string(),
                    taken_at,
                    kind: req.kind,
                    tag: req.tag.clone(),
                };
                Ok(cp.store.insert_checkpoint(c, actor).await?)
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

    /// Phases 1 and 2 with the barrier. Returns the longest hold (µs) or why it failed.
    async fn barrier_round(
        &self,
        cp: &ControlPlane,
        vpg_id: &str,
        round: u64,
        req: &RoundRequest,
        plan: &Plan,
        mut rx: mpsc::UnboundedReceiver<(String, Reply)>,
    ) -> Result<u64, String> {
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
        let mut held: HashSet<&str> = HashSet::new();
        while held.len() < plan.len() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some((host, Reply::Held(h)))) => {
                    let Some((name, _)) = plan.get_key_value(&host) else {
                        continue;
                    };
                    if let Some(e) = h.error {
                        return abort(format!("{host}: {e}"));
                    }
                    held.insert(name.as_str());
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
                        .filter(|h| !held.contains(h))
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
        Ok(released.values().copied().max().unwrap_or(0))
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
    ) -> Result<u64, String> {
        let bound = cp.settings.hold_bound;
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
                        break;
                    }
                    Ok(Some(_)) => continue,
                    Ok(None) => return Err("reply route closed".into()),
                    Err(_) => return Err(format!("no Held from {host}")),
                }
            }
        }
        Ok(0)
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
    let v = cp.store.live_vpg(vpg_id).await?;
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
    let mut plan: Plan = BTreeMap::new();
    let mut devices: BTreeMap<String, Vec<Option<u64>>> = BTreeMap::new();
    for m in &v.members {
        let Some(host) = &m.host else { continue };
        plan.entry(host.clone())
            .or_default()
            .push(m.vm_name.clone());
        devices
            .entry(host.clone())
            .or_default()
            .extend(m.devices.iter().copied());
    }
    if plan.is_empty() {
        return Err(RoundError::NoHosts);
    }
    for (host, devs) in &devices {
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
        for d in devs {
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
    Ok(plan)
}

/// The scheduler: a round per VPG every checkpoint interval.
pub async fn run(cp: Arc<ControlPlane>, cancel: CancellationToken) {
    let mut due: HashMap<String, tokio::time::Instant> = HashMap::new();
    let mut intervals: HashMap<String, Duration> = HashMap::new();
    let mut in_flight: HashSet<String> = HashSet::new();
    let mut running: JoinSet<(String, Result<Checkpoint, RoundError>)> = JoinSet::new();
    let mut refreshed: Option<Instant> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            Some(done) = running.join_next(), if !running.is_empty() => {
                let Ok((vpg, result)) = done else { continue };
                in_flight.remove(&vpg);
                let interval = intervals.get(&vpg).copied().unwrap_or(cp.settings.default_checkpoint_interval);
                let next = match &result {
                    Ok(_) | Err(RoundError::Aborted { .. }) => interval,
                    Err(e) => {
                        tracing::debug!(vpg, error = %e, "scheduled checkpoint round skipped");
                        interval.min(NOT_READY_RETRY)
                    }
                };
                if let Err(RoundError::Store(e)) = &result {
                    tracing::warn!(vpg, error = %e, "checkpoint round could not be stored");
                }
                due.insert(vpg, tokio::time::Instant::now() + next);
                continue;
            }
            _ = tick.tick() => {}
        }
        if refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
            match cp.store.round_candidates().await {
                Ok(list) => {
                    let now = tokio::time::Instant::now();
                    intervals = list
                        .into_iter()
                        .map(|(id, ms)| {
                            let iv = if ms == 0 {
                                cp.settings.default_checkpoint_interval
                            } else {
                                Duration::from_millis(u64::from(ms))
                            };
                            (id, iv)
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
            },
        );
        assert!(matches!(rx.try_recv(), Ok((h, Reply::Held(_))) if h == "h"));
    }
}
