//! The live stream's engine: one ordered sequence of frames, published once and shared
//! by every connected client (`api::live` serves them over WebSocket).
//!
//! The publisher follows the events table: every mutation writes an event in its own
//! transaction, so an event is the notice that the records it names changed. On each
//! commit (`Store::commits`) it reads the new events, loads the current state of the
//! VPGs, alerts, tasks, hosts and sites they name, adds the SLA samples the evaluator
//! handed over, and publishes one [`Delta`]. Records go out whole, so a late or repeated
//! record is harmless.
//!
//! Memory is bounded twice: the history kept for `?since=N` is capped in frames and in
//! bytes, and each client is a cursor into one shared broadcast ring — a client that
//! falls more than `client_queue` frames behind, or whose socket does not take a frame
//! within `send_timeout`, is dropped (it reconnects with `since` and catches up).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use chrono::Utc;
use tokio::sync::{broadcast, Notify};
use tokio_util::sync::CancellationToken;

use super::store::{Store, StoreError};
use crate::proto::api::Event;
use crate::proto::live::{Delta, Frame, Snapshot, SnapshotReason, VpgSample};

/// Limits of the live stream (`[manager.live]`; tests shrink them).
#[derive(Debug, Clone)]
pub struct LiveSettings {
    /// Frames kept for clients that reconnect with `since`.
    pub history_frames: usize,
    /// Bytes of frames kept for them.
    pub history_bytes: usize,
    /// How far (in frames) a client may fall behind before it is dropped.
    pub client_queue: usize,
    /// How long one frame may take to go into a client's socket.
    pub send_timeout: Duration,
    /// How long a gap in event ids may be a transaction still committing (PostgreSQL
    /// hands out ids before commit) before it counts as a rollback.
    pub gap_settle: Duration,
}

impl Default for LiveSettings {
    fn default() -> Self {
        Self {
            history_frames: 4096,
            history_bytes: 64 << 20,
            client_queue: 512,
            send_timeout: Duration::from_secs(10),
            gap_settle: Duration::from_secs(5),
        }
    }
}

/// A published frame: its sequence number and its JSON text, shared by every client.
#[derive(Debug, Clone)]
pub struct Published {
    pub seq: u64,
    pub text: Utf8Bytes,
}

/// How a new client starts.
#[derive(Debug)]
pub enum Start {
    /// Send a snapshot taken now, marked with this sequence number.
    Snapshot { seq: u64, reason: SnapshotReason },
    /// Send these frames (everything after the client's `since`), then follow.
    Replay(Vec<Published>),
}

struct History {
    /// The sequence number of the last frame published.
    last: u64,
    frames: VecDeque<Published>,
    bytes: usize,
}

/// The live stream of one manager process.
pub struct Live {
    settings: LiveSettings,
    history: Mutex<History>,
    tx: broadcast::Sender<Published>,
    /// Latest SLA sample per VPG not yet published.
    samples: Mutex<HashMap<String, VpgSample>>,
    samples_ready: Notify,
    /// Latest SLA sample per VPG, published or not: what a snapshot carries.
    latest: Mutex<HashMap<String, VpgSample>>,
    clients: AtomicUsize,
    dropped: AtomicU64,
}

/// Counters for `/metrics` and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LiveStats {
    pub last_seq: u64,
    pub history_frames: usize,
    pub history_bytes: usize,
    pub clients: usize,
    pub dropped: u64,
}

impl Live {
    pub fn new(settings: LiveSettings) -> Arc<Self> {
        // Sequence numbers start at the wall clock in microseconds, so a `since` from an
        // earlier run of the manager is always older than this run's history and gets a
        // snapshot, never someone else's frames. (2^53 is reached in the year 2255: the
        // numbers stay exact in JavaScript.)
        let start = u64::try_from(Utc::now().timestamp_micros()).unwrap_or(0);
        let (tx, _) = broadcast::channel(settings.client_queue.max(1));
        Arc::new(Self {
            history: Mutex::new(History {
                last: start,
                frames: VecDeque::new(),
                bytes: 0,
            }),
            tx,
            samples: Mutex::new(HashMap::new()),
            samples_ready: Notify::new(),
            latest: Mutex::new(HashMap::new()),
            clients: AtomicUsize::new(0),
            dropped: AtomicU64::new(0),
            settings,
        })
    }

    pub fn settings(&self) -> &LiveSettings {
        &self.settings
    }

    fn history(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Numbers and publishes a delta (nothing if it is empty); returns its `seq`.
    pub fn publish(&self, mut delta: Delta) -> Option<u64> {
        if delta.is_empty() {
            return None;
        }
        let mut h = self.history();
        let seq = h.last + 1;
        delta.seq = seq;
        let text = match serde_json::to_string(&Frame::Delta(delta)) {
            Ok(t) => Utf8Bytes::from(t),
            Err(e) => {
                tracing::error!(error = %e, "live stream frame not serialisable; skipped");
                return None;
            }
        };
        h.last = seq;
        h.bytes += text.len();
        h.frames.push_back(Published {
            seq,
            text: text.clone(),
        });
        while h.frames.len() > self.settings.history_frames
            || (h.bytes > self.settings.history_bytes && h.frames.len() > 1)
        {
            if let Some(f) = h.frames.pop_front() {
                h.bytes -= f.text.len();
            }
        }
        // Sent under the lock, so `subscribe` sees each frame either in the history or
        // on its receiver, never both and never neither. No receivers is not an error.
        let _ = self.tx.send(Published { seq, text });
        Some(seq)
    }

    /// Where a client that applied everything up to `since` starts, and its receiver
    /// for what follows.
    pub fn subscribe(&self, since: Option<u64>) -> (Start, broadcast::Receiver<Published>) {
        let h = self.history();
        let rx = self.tx.subscribe();
        let oldest_kept = h.frames.front().map_or(h.last + 1, |f| f.seq);
        let start = match since {
            None => Start::Snapshot {
                seq: h.last,
                reason: SnapshotReason::Connect,
            },
            // Everything after `since` is still here (or nothing came after it).
            Some(n) if n <= h.last && n + 1 >= oldest_kept => {
                Start::Replay(h.frames.iter().filter(|f| f.seq > n).cloned().collect())
            }
            Some(_) => Start::Snapshot {
                seq: h.last,
                reason: SnapshotReason::SinceTooOld,
            },
        };
        (start, rx)
    }

    /// The evaluator's SLA figures of one pass; published with the next delta.
    pub fn add_samples(&self, samples: Vec<VpgSample>) {
        if samples.is_empty() {
            return;
        }
        {
            let mut latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
            for s in &samples {
                latest.insert(s.id.clone(), s.clone());
            }
        }
        let mut pending = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        for s in samples {
            pending.insert(s.id.clone(), s);
        }
        drop(pending);
        self.samples_ready.notify_one();
    }

    /// Each VPG's latest sample, in id order.
    pub fn latest_samples(&self) -> Vec<VpgSample> {
        let latest = self.latest.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<VpgSample> = latest.values().cloned().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Forgets the samples of VPGs not in `keep` (removed).
    pub fn retain_samples(&self, keep: &std::collections::HashSet<&str>) {
        self.latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| keep.contains(id.as_str()));
    }

    fn take_samples(&self) -> Vec<VpgSample> {
        let mut pending = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let mut v: Vec<VpgSample> = pending.drain().map(|(_, s)| s).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// A client connected; the guard counts it until dropped.
    pub fn client(self: &Arc<Self>) -> ClientGuard {
        self.clients.fetch_add(1, Ordering::Relaxed);
        ClientGuard(Arc::clone(self))
    }

    /// A client was dropped for not keeping up.
    pub fn count_dropped(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> LiveStats {
        let h = self.history();
        LiveStats {
            last_seq: h.last,
            history_frames: h.frames.len(),
            history_bytes: h.bytes,
            clients: self.clients.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }
}

/// Counts one connected client while alive.
pub struct ClientGuard(Arc<Live>);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        self.0.clients.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The parts of a snapshot, as one read gave them.
struct SnapshotParts {
    vpgs: Vec<crate::proto::api::Vpg>,
    alerts: Vec<crate::proto::api::Alert>,
    tasks: Vec<crate::proto::api::Task>,
    sites: Vec<crate::proto::api::Site>,
    hosts: Vec<crate::proto::api::Host>,
    events: Vec<Event>,
}

/// The last snapshot read, for clients that connect together (a console reload on many
/// screens, every client after a manager restart): one read serves every client that
/// was waiting when it started, instead of one whole read of the database each.
struct LastRead {
    /// The store it was read from (one process may run several managers: tests).
    store: tokio::sync::watch::Receiver<u64>,
    started: Instant,
    parts: Arc<SnapshotParts>,
}

static LAST_READ: std::sync::OnceLock<tokio::sync::Mutex<Option<LastRead>>> =
    std::sync::OnceLock::new();

/// Reads the whole picture for a snapshot marked `seq`. The read is at least as new as
/// the call (a read that started after the call began may be shared with other callers).
pub async fn snapshot(
    store: &Store,
    seq: u64,
    reason: SnapshotReason,
) -> Result<Snapshot, StoreError> {
    let called = Instant::now();
    let me = store.commits();
    let mut last = LAST_READ
        .get_or_init(|| tokio::sync::Mutex::new(None))
        .lock()
        .await;
    let shared = last
        .as_ref()
        .filter(|l| l.started >= called && l.store.same_channel(&me))
        .map(|l| Arc::clone(&l.parts));
    let parts = match shared {
        Some(p) => p,
        None => {
            let started = Instant::now();
            let parts = Arc::new(SnapshotParts {
                vpgs: store.all_vpgs().await?,
                alerts: store.open_alerts().await?,
                tasks: store.live_tasks().await?,
                sites: store.all_sites().await?,
                hosts: store.all_hosts().await?,
                events: store.recent_events().await?,
            });
            *last = Some(LastRead {
                store: me,
                started,
                parts: Arc::clone(&parts),
            });
            parts
        }
    };
    drop(last);
    Ok(Snapshot {
        seq,
        at: Utc::now(),
        reason,
        vpgs: parts.vpgs.clone(),
        alerts: parts.alerts.clone(),
        tasks: parts.tasks.clone(),
        sites: parts.sites.clone(),
        hosts: parts.hosts.clone(),
        events: parts.events.clone(),
        samples: Vec::new(),
    })
}

/// Events read per query.
const EVENT_BATCH: u64 = 500;
/// Gap ids remembered at most (beyond this the oldest are given up).
const MAX_GAPS: usize = 4096;

/// Follows the events table from the newest event at start.
struct Follower {
    cursor: i64,
    /// Ids skipped because they were not visible yet, with when first skipped.
    gaps: BTreeMap<i64, Instant>,
}

impl Follower {
    /// Takes `events` (ids above the cursor or among the gaps) into account and returns
    /// them in id order.
    fn advance(&mut self, events: &[Event], now: Instant, settle: Duration) {
        for e in events {
            self.gaps.remove(&e.id);
            if e.id > self.cursor {
                for missing in self.cursor + 1..e.id {
                    if self.gaps.len() >= MAX_GAPS {
                        break;
                    }
                    self.gaps.insert(missing, now);
                }
                self.cursor = e.id;
            }
        }
        self.gaps.retain(|_, at| now.duration_since(*at) < settle);
        while self.gaps.len() > MAX_GAPS {
            self.gaps.pop_first();
        }
    }

    fn gap_ids(&self) -> Vec<i64> {
        self.gaps.keys().copied().collect()
    }
}

/// The records a batch of events names.
#[derive(Default)]
struct Dirty {
    vpgs: BTreeSet<String>,
    alerts: BTreeSet<String>,
    tasks: BTreeSet<String>,
    hosts: BTreeSet<String>,
    sites: BTreeSet<String>,
}

impl Dirty {
    fn note(&mut self, e: &Event) {
        if let Some(v) = &e.vpg_id {
            self.vpgs.insert(v.clone());
        }
        let Some(id) = e.subject_id.clone() else {
            return;
        };
        match e.subject_type.as_str() {
            "vpg" => {
                self.vpgs.insert(id);
            }
            "alert" => {
                self.alerts.insert(id);
            }
            "task" => {
                self.tasks.insert(id);
            }
            "host" => {
                self.hosts.insert(id);
            }
            "site" => {
                self.sites.insert(id);
            }
            _ => {}
        }
    }
}

/// Publishes deltas until cancelled.
pub async fn run(store: Store, live: Arc<Live>, cancel: CancellationToken) {
    let mut commits = store.commits();
    let mut follower = Follower {
        cursor: loop {
            match store.newest_event_id().await {
                Ok(id) => break id,
                Err(e) => {
                    tracing::warn!(error = %e, "live stream: cannot read the events; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        },
        gaps: BTreeMap::new(),
    };
    loop {
        let more = match pass(&store, &live, &mut follower).await {
            Ok(more) => more,
            Err(e) => {
                tracing::warn!(error = %e, "live stream: publishing failed; retrying");
                false
            }
        };
        if more {
            continue;
        }
        // Gaps are re-read each second until they fill or settle.
        let retry = if follower.gaps.is_empty() {
            Duration::from_secs(3600)
        } else {
            Duration::from_millis(200)
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = commits.changed() => if r.is_err() { return },
            _ = live.samples_ready.notified() => {}
            _ = tokio::time::sleep(retry) => {}
        }
    }
}

/// One delta from what is new; true if more events are waiting.
async fn pass(store: &Store, live: &Live, f: &mut Follower) -> Result<bool, StoreError> {
    let events = store
        .events_after(f.cursor, &f.gap_ids(), EVENT_BATCH)
        .await?;
    let more = events.len() as u64 >= EVENT_BATCH;
    f.advance(&events, Instant::now(), live.settings.gap_settle);
    let mut dirty = Dirty::default();
    for e in &events {
        dirty.note(e);
    }
    let mut delta = Delta {
        at: Utc::now(),
        events,
        ..Delta::default()
    };
    let ids = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
    if !dirty.vpgs.is_empty() {
        delta.vpgs = store.vpgs_by_ids(&ids(&dirty.vpgs)).await?;
        delta.vpgs_removed = removed(&dirty.vpgs, delta.vpgs.iter().map(|v| &v.id));
    }
    if !dirty.alerts.is_empty() {
        delta.alerts = store.alerts_by_ids(&ids(&dirty.alerts)).await?;
    }
    if !dirty.tasks.is_empty() {
        delta.tasks = store.tasks_by_ids(&ids(&dirty.tasks)).await?;
    }
    if !dirty.hosts.is_empty() {
        delta.hosts = store.hosts_by_ids(&ids(&dirty.hosts)).await?;
        delta.hosts_removed = removed(&dirty.hosts, delta.hosts.iter().map(|h| &h.id));
    }
    if !dirty.sites.is_empty() {
        delta.sites = store.sites_by_ids(&ids(&dirty.sites)).await?;
        delta.sites_removed = removed(&dirty.sites, delta.sites.iter().map(|s| &s.id));
    }
    delta.samples = live.take_samples();
    delta.at = Utc::now();
    live.publish(delta);
    Ok(more)
}

fn removed<'a>(asked: &BTreeSet<String>, found: impl Iterator<Item = &'a String>) -> Vec<String> {
    let found: BTreeSet<&String> = found.collect();
    asked
        .iter()
        .filter(|id| !found.contains(id))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(n: usize) -> Delta {
        Delta {
            samples: (0..n)
                .map(|i| VpgSample {
                    id: format!("v{i}"),
                    at: Utc::now(),
                    rpo_actual_secs: Some(1.0),
                    history_actual_secs: None,
                    journal_bytes: 0,
                    throughput_bytes_per_sec: 0.0,
                    iops: 0.0,
                })
                .collect(),
            ..Delta::default()
        }
    }

    fn settings(frames: usize, bytes: usize) -> LiveSettings {
        LiveSettings {
            history_frames: frames,
            history_bytes: bytes,
            client_queue: 4,
            ..LiveSettings::default()
        }
    }

    #[test]
    fn empty_deltas_are_not_published() {
        let live = Live::new(LiveSettings::default());
        let before = live.stats().last_seq;
        assert_eq!(live.publish(Delta::default()), None);
        assert_eq!(live.stats().last_seq, before);
    }

    #[test]
    fn seq_increases_by_one_and_frames_carry_it() {
        let live = Live::new(LiveSettings::default());
        let (_, mut rx) = live.subscribe(None);
        let a = live.publish(delta(1)).unwrap();
        let b = live.publish(delta(1)).unwrap();
        assert_eq!(b, a + 1);
        let f = rx.try_recv().unwrap();
        assert_eq!(f.seq, a);
        let parsed: Frame = serde_json::from_str(f.text.as_str()).unwrap();
        assert_eq!(parsed.seq(), a);
    }

    #[test]
    fn since_replays_exactly_what_follows_or_asks_for_a_snapshot() {
        let live = Live::new(settings(3, usize::MAX));
        let seqs: Vec<u64> = (0..5).map(|_| live.publish(delta(1)).unwrap()).collect();
        // Kept: the last three.
        match live.subscribe(Some(seqs[2])).0 {
            Start::Replay(f) => {
                assert_eq!(f.iter().map(|f| f.seq).collect::<Vec<_>>(), seqs[3..]);
            }
            other => panic!("{other:?}"),
        }
        // Everything after seqs[1] is still held (seqs[2] is the oldest kept).
        match live.subscribe(Some(seqs[1])).0 {
            Start::Replay(f) => assert_eq!(f.len(), 3),
            other => panic!("{other:?}"),
        }
        // since=seqs[0] needs seqs[1], which is gone.
        assert!(matches!(
            live.subscribe(Some(seqs[0])).0,
            Start::Snapshot {
                reason: SnapshotReason::SinceTooOld,
                ..
            }
        ));
        // Up to date: nothing to replay.
        match live.subscribe(Some(seqs[4])).0 {
            Start::Replay(f) => assert!(f.is_empty()),
            other => panic!("{other:?}"),
        }
        // From the future (another run): snapshot.
        assert!(matches!(
            live.subscribe(Some(seqs[4] + 10)).0,
            Start::Snapshot {
                reason: SnapshotReason::SinceTooOld,
                ..
            }
        ));
        assert!(matches!(
            live.subscribe(None).0,
            Start::Snapshot {
                reason: SnapshotReason::Connect,
                ..
            }
        ));
    }

    #[test]
    fn history_is_bounded_in_bytes() {
        let live = Live::new(settings(1000, 4096));
        for _ in 0..100 {
            live.publish(delta(20));
        }
        let s = live.stats();
        assert!(s.history_bytes <= 4096, "{s:?}");
        assert!(s.history_frames >= 1);
    }

    #[test]
    fn a_lagging_receiver_sees_lagged_not_unbounded_memory() {
        let live = Live::new(settings(10, usize::MAX));
        let (_, mut rx) = live.subscribe(None);
        for _ in 0..20 {
            live.publish(delta(1));
        }
        assert!(matches!(
            rx.try_recv(),
            Err(broadcast::error::TryRecvError::Lagged(_))
        ));
    }

    fn ev(id: i64) -> Event {
        Event {
            id,
            at: Utc::now(),
            kind: "k".into(),
            severity: "info".into(),
            actor: "system".into(),
            vpg_id: None,
            subject_type: "vpg".into(),
            subject_id: Some("v".into()),
            message: String::new(),
            details: None,
        }
    }

    #[test]
    fn follower_remembers_gaps_until_they_fill_or_settle() {
        let settle = Duration::from_secs(5);
        let t0 = Instant::now();
        let mut f = Follower {
            cursor: 10,
            gaps: BTreeMap::new(),
        };
        f.advance(&[ev(11), ev(14)], t0, settle);
        assert_eq!(f.cursor, 14);
        assert_eq!(f.gap_ids(), vec![12, 13]);
        // 12 commits later.
        f.advance(&[ev(12)], t0 + Duration::from_secs(1), settle);
        assert_eq!(f.cursor, 14);
        assert_eq!(f.gap_ids(), vec![13]);
        // 13 never comes (a rollback): given up once settled.
        f.advance(&[], t0 + Duration::from_secs(6), settle);
        assert!(f.gap_ids().is_empty());
    }

    #[test]
    fn events_name_their_records() {
        let mut d = Dirty::default();
        let mut e = ev(1);
        e.subject_type = "alert".into();
        e.subject_id = Some("a1".into());
        e.vpg_id = Some("v1".into());
        d.note(&e);
        e.subject_type = "host".into();
        e.subject_id = Some("h1".into());
        e.vpg_id = None;
        d.note(&e);
        assert!(d.alerts.contains("a1") && d.vpgs.contains("v1") && d.hosts.contains("h1"));
        assert!(d.tasks.is_empty() && d.sites.is_empty());
    }
}
