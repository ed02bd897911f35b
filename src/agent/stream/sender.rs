//! The protected side of the stream: the per-disk outbound queue (memory, then spill),
//! the connection task (dial, Hello/Welcome, send, acks, back-off) and the bitmap-only
//! fallback.
//!
//! Sequence numbers are assigned by the caller (the protected disk owns its counter, so
//! it survives the sender); `enqueue` only checks they increase per disk.
//!
//! Per-disk state machine:
//! ```text
//!   Streaming ──(memory and spill full, peer away > away_bound,
//!                or fenced by the recovery side > fenced_bound)──▶ BitmapOnly
//!   BitmapOnly ──(sync_finished(disk))──▶ Streaming
//! ```
//! In Streaming a record is queued in memory, or, once memory is full (or the disk
//! already has spilled records, to keep order), appended to the disk's spill log. It
//! stays until acknowledged durable. Going BitmapOnly drops the disk's queue and reports
//! `NeedsBitmapSync`; records enqueued meanwhile are dropped on the spot (the dirty
//! bitmap the NBD side keeps has them).
//!
//! A disk the receiver refuses without fencing it (its journal had a storage error) keeps
//! its queue and is offered again by a new connection after a delay (1 s, doubling to the
//! back-off bound while refusals go on; [`Sender::reoffer_soon`] shortens it); a fenced
//! disk goes bitmap-only and waits for a new fencing generation.
//!
//! The disk set changes at run time ([`Sender::add_disk`], [`Sender::remove_disk`]): the
//! `Hello` names the disks and the receiver opens their journals for the connection, so
//! a change ends the connection and the next one carries the new set. Resending from the
//! receiver's durable seq after a reconnect is the ordinary path, so nothing new is
//! needed to keep the other disks' records in order.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::conn::{FrameReader, FrameWriter};
use super::spill::Spill;
use super::{io, now_ms, ClientTransport, Io, StreamError};
use crate::proto::stream::{
    Compression, DiskAck, DiskHello, DiskLag, Frame, RecordBody, StreamRecord, MAX_WRITE_DATA,
    PROTOCOL_VERSION,
};

/// How long a fenced disk keeps its queue by default (see
/// [`SenderConfig::fenced_bound`]): the manager pushes desired states at once and resends
/// them every 5 s to hosts that did not apply them, so a protected host that has not
/// caught up by then is not merely behind by a push.
pub const DEFAULT_FENCED_BOUND: Duration = Duration::from_secs(10);

/// A disk this sender streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    pub disk_id: u64,
    pub size: u64,
    /// The disk's sequence epoch (not the fencing generation).
    pub generation: u64,
    /// The disk's VPG and its fencing generation, carried in the Hello of the stream and
    /// of every sync session (0 with nothing recorded: a static configuration).
    pub vpg_id: String,
    pub fencing_generation: u64,
}

/// First delay before a disk the receiver refused (not fenced) is offered again.
const REOFFER_MIN: Duration = Duration::from_secs(1);

/// How the sender runs.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// This (protected) host's name: what the recovery side's allow-list names.
    pub host_name: String,
    pub peer: SocketAddr,
    pub transport: ClientTransport,
    /// Per-frame compression, from the VPG's setting.
    pub compression: Compression,
    /// Bytes per second on the wire (after compression); `None`: unlimited. The start
    /// value: [`Sender::set_bandwidth_limit`] changes it on the running stream.
    pub bandwidth_limit: Option<u64>,
    /// Record bytes (data plus a fixed overhead per record) kept in memory, all disks.
    pub queue_memory: usize,
    /// Where spill logs go (`None`: no spilling).
    pub spill_dir: Option<PathBuf>,
    /// Record bytes the spill logs may hold, all disks.
    pub spill_limit: usize,
    /// A disk with records queued goes bitmap-only once the peer has been unreachable
    /// this long.
    pub away_bound: Duration,
    /// A disk the recovery side refused by fencing keeps its queue this long (at most
    /// `away_bound`) for its own new generation ([`Sender::set_fencing`]) to arrive: a
    /// failover or move bumps the generation on every host at once, and the recovery
    /// host may learn it first. Past it, a disk with records queued goes bitmap-only, as
    /// for a peer away too long (a stale primary stays shut out either way).
    pub fenced_bound: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub connect_timeout: Duration,
    /// A Ping (with the lag figures) goes out this often.
    pub ping_interval: Duration,
    /// No frame from the peer for this long ends the connection.
    pub peer_timeout: Duration,
}

impl SenderConfig {
    pub fn new(host_name: impl Into<String>, peer: SocketAddr, transport: ClientTransport) -> Self {
        SenderConfig {
            host_name: host_name.into(),
            peer,
            transport,
            compression: Compression::None,
            bandwidth_limit: None,
            queue_memory: 256 << 20,
            spill_dir: None,
            spill_limit: 0,
            away_bound: Duration::from_secs(300),
            fenced_bound: DEFAULT_FENCED_BOUND,
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(5),
            ping_interval: Duration::from_secs(1),
            peer_timeout: Duration::from_secs(10),
        }
    }
}

/// Where a disk stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskMode {
    Streaming,
    /// Records are not queued; the dirty bitmap is the truth until a Bitmap Sync.
    BitmapOnly,
}

/// What `enqueue` did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Memory,
    Spilled,
    /// Dropped: the disk is bitmap-only (now or already).
    BitmapOnly,
}

/// What the sender tells its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Connected,
    Disconnected {
        error: String,
    },
    Refused {
        reason: String,
    },
    /// The disk's queue was dropped; only a Bitmap Sync brings the replica level again.
    /// Records up to `acked_seq` are durable at the recovery site.
    NeedsBitmapSync {
        disk: u64,
        acked_seq: u64,
        reason: String,
    },
    /// The receiver did not accept this disk in its Welcome.
    DiskNotAccepted {
        disk: u64,
    },
    /// The receiver refused this disk in its Welcome, saying why. A fenced disk (the
    /// recovery side knows a newer fencing generation of its VPG) keeps its queue and is
    /// not offered again until its fencing generation changes ([`Sender::set_fencing`]);
    /// past [`SenderConfig::fenced_bound`] it goes bitmap-only (`NeedsBitmapSync`).
    DiskRefused {
        disk: u64,
        fenced: bool,
        reason: String,
    },
    /// The receiver holds less than it once acknowledged as durable (its journal was lost,
    /// replaced or rolled back): records between were forgotten here and are gone there,
    /// so neither the stream nor the bitmap can bring the replica level — a Full Sync is
    /// needed. Streaming goes on from `durable_seq`.
    ReplicaBehind {
        disk: u64,
        durable_seq: u64,
        acked_seq: u64,
    },
}

/// Figures per disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskStats {
    pub disk_id: u64,
    pub mode: DiskMode,
    pub queued_records: u64,
    /// Record cost (data plus overhead) queued, memory and spill.
    pub queued_bytes: u64,
    pub spilled_bytes: u64,
    pub oldest_unacked_ms: u64,
    pub acked_seq: u64,
    pub last_seq: u64,
}

struct Queued {
    rec: Arc<StreamRecord>,
    cost: usize,
}

struct DiskQ {
    spec: DiskSpec,
    mode: DiskMode,
    /// Oldest first; seqs increasing; all older than anything in `spill`.
    mem: VecDeque<Queued>,
    mem_cost: usize,
    spill: Option<Spill>,
    last_seq: u64,
    acked: u64,
    /// Highest seq written on the current connection.
    sent: u64,
    accepted: bool,
    /// Refused by fencing on the last connection.
    fenced: bool,
    /// Since when the recovery side refuses this disk's generation (`None`: it does not).
    /// The queue is kept meanwhile, up to [`SenderConfig::fenced_bound`].
    fenced_since: Option<Instant>,
    /// Refused for a reason that may pass (a journal storage error at the recovery host,
    /// not fencing, not a size mismatch), or left out, on the last connection: offered
    /// again after a bounded delay.
    refused: bool,
    /// The reason of the last refusal.
    refusal: String,
}

impl DiskQ {
    fn queued(&self) -> usize {
        self.mem.len() + self.spill.as_ref().map_or(0, |s| s.index.len())
    }
}

struct State {
    disks: BTreeMap<u64, DiskQ>,
    mem_cost: usize,
    spill_cost: usize,
    /// Since when the peer has been unreachable (`None` while connected).
    away_since: Option<Instant>,
    /// The disk set changed since the current connection's Hello: reconnect.
    reconnect: bool,
    /// Delay before disks the receiver refused (not fenced) are offered again by a new
    /// connection; doubles up to the back-off bound while refusals go on.
    reoffer_delay: Duration,
    /// When the current connection offers its refused disks again (`None`: none refused).
    reoffer_at: Option<Instant>,
    /// When the current connection's Welcome came.
    welcomed_at: Option<Instant>,
}

struct Inner {
    cfg: SenderConfig,
    state: Mutex<State>,
    wake: Notify,
    /// The bandwidth limit in force (`None`: unlimited); the send loop follows changes
    /// at once, also in the middle of a wait, without reconnecting.
    limit: watch::Sender<Option<u64>>,
    events: mpsc::UnboundedSender<StreamEvent>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves the queue consistent enough to keep going.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn event(&self, e: StreamEvent) {
        let _ = self.events.send(e);
    }

    /// Drops the disk's queue and reports that a Bitmap Sync is needed.
    fn go_bitmap(&self, st: &mut State, disk: u64, reason: &str) {
        let Some(d) = st.disks.get_mut(&disk) else {
            return;
        };
        if d.mode == DiskMode::BitmapOnly {
            return;
        }
        d.mode = DiskMode::BitmapOnly;
        let reason = if d.refused && !d.fenced {
            format!("{reason} while the recovery host refused the disk")
        } else {
            reason.to_string()
        };
        st.mem_cost -= d.mem_cost;
        d.mem.clear();
        d.mem_cost = 0;
        if let Some(s) = d.spill.as_mut() {
            st.spill_cost -= s.cost;
            if let Err(e) = s.clear() {
                tracing::warn!(disk, error = %e, "could not truncate spill log");
            }
        }
        tracing::warn!(
            disk,
            acked_seq = d.acked,
            reason,
            "disk switched to bitmap-only"
        );
        self.event(StreamEvent::NeedsBitmapSync {
            disk,
            acked_seq: d.acked,
            reason,
        });
    }

    /// Past the away bound, every disk with something queued goes bitmap-only.
    fn check_away(&self, st: &mut State) {
        let Some(since) = st.away_since else { return };
        if since.elapsed() < self.cfg.away_bound {
            return;
        }
        let ids: Vec<u64> = st
            .disks
            .iter()
            .filter(|(_, d)| d.mode == DiskMode::Streaming && d.queued() > 0)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.go_bitmap(st, id, "peer away longer than the bound");
        }
    }

    /// Past the fenced bound, every fenced disk with something queued goes bitmap-only:
    /// its own new generation did not come, so it is not a race with a failover or move
    /// that the next Hello settles.
    fn check_fenced(&self, st: &mut State) {
        let bound = self.fenced_bound();
        let ids: Vec<u64> = st
            .disks
            .iter()
            .filter(|(_, d)| {
                d.mode == DiskMode::Streaming
                    && d.queued() > 0
                    && d.fenced_since.is_some_and(|t| t.elapsed() >= bound)
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.go_bitmap(st, id, "stream fenced by the recovery host");
        }
    }

    fn fenced_bound(&self) -> Duration {
        self.cfg.fenced_bound.min(self.cfg.away_bound)
    }

    fn apply_ack(&self, st: &mut State, a: DiskAck) {
        let Some(d) = st.disks.get_mut(&a.disk_id) else {
            return;
        };
        if a.durable_seq < d.acked {
            tracing::error!(
                disk = a.disk_id,
                durable = a.durable_seq,
                acked = d.acked,
                "receiver holds less than it acknowledged: a Full Sync is needed"
            );
            let acked_seq = d.acked;
            // From now on count from what the receiver really holds (resend starts there).
            d.acked = a.durable_seq;
            self.event(StreamEvent::ReplicaBehind {
                disk: a.disk_id,
                durable_seq: a.durable_seq,
                acked_seq,
            });
            return;
        }
        d.acked = a.durable_seq;
        while d.mem.front().is_some_and(|q| q.rec.seq <= d.acked) {
            if let Some(q) = d.mem.pop_front() {
                d.mem_cost -= q.cost;
                st.mem_cost -= q.cost;
            }
        }
        if let Some(s) = d.spill.as_mut() {
            while s.index.front().is_some_and(|e| e.0 <= d.acked) {
                let before = s.cost;
                if let Err(e) = s.skip_front() {
                    tracing::warn!(disk = a.disk_id, error = %e, "spill log");
                }
                st.spill_cost -= before - s.cost;
            }
        }
    }
}

/// The protected side of one stream. Cheap to clone; the connection task stops when
/// the cancellation token given to [`Sender::start`] is cancelled.
#[derive(Clone)]
pub struct Sender {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sender")
            .field("peer", &self.inner.cfg.peer)
            .finish_non_exhaustive()
    }
}

impl Sender {
    /// Starts the connection task (span `stream-sender`) for `disks`; returns the handle
    /// and the events channel. Must be called inside a Tokio runtime.
    pub fn start(
        cfg: SenderConfig,
        disks: Vec<DiskSpec>,
        cancel: CancellationToken,
    ) -> Result<(Sender, mpsc::UnboundedReceiver<StreamEvent>), StreamError> {
        if matches!(cfg.transport, ClientTransport::Insecure) {
            tracing::warn!(peer = %cfg.peer, "replication stream without TLS (--insecure): data and identity are unprotected");
        }
        if cfg.queue_memory == 0 {
            return Err(StreamError::Config("queue memory bound is zero".into()));
        }
        if let Some(dir) = &cfg.spill_dir {
            std::fs::create_dir_all(dir).map_err(|source| StreamError::Spill {
                path: dir.clone(),
                source,
            })?;
        }
        let mut map = BTreeMap::new();
        for spec in disks {
            map.insert(spec.disk_id, new_disk_q(&cfg, spec)?);
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (limit, _) = watch::channel(cfg.bandwidth_limit);
        let inner = Arc::new(Inner {
            limit,
            cfg,
            state: Mutex::new(State {
                disks: map,
                mem_cost: 0,
                spill_cost: 0,
                away_since: Some(Instant::now()),
                reconnect: false,
                reoffer_delay: REOFFER_MIN,
                reoffer_at: None,
                welcomed_at: None,
            }),
            wake: Notify::new(),
            events: tx,
        });
        let task = inner.clone();
        tokio::spawn(run(task, cancel).instrument(tracing::info_span!("stream-sender")));
        Ok((Sender { inner }, rx))
    }

    /// Queues one record of `disk`. Never waits for the network: it takes one short
    /// lock and, when memory is full, does one buffered append to the spill log.
    /// `rec.seq` must be above the disk's last enqueued seq.
    pub fn enqueue(&self, rec: StreamRecord) -> Result<Enqueued, StreamError> {
        if let RecordBody::Write { data, .. } = &rec.body {
            if data.is_empty() || data.len() > MAX_WRITE_DATA {
                return Err(StreamError::TooLarge(data.len()));
            }
        }
        let inner = &*self.inner;
        let mut guard = inner.lock();
        let st = &mut *guard;
        let disk = rec.disk;
        let Some(d) = st.disks.get_mut(&disk) else {
            return Err(StreamError::UnknownDisk(disk));
        };
        if rec.seq <= d.last_seq {
            return Err(StreamError::OutOfOrder {
                disk,
                seq: rec.seq,
                last: d.last_seq,
            });
        }
        d.last_seq = rec.seq;
        if d.mode == DiskMode::BitmapOnly {
            return Ok(Enqueued::BitmapOnly);
        }
        if st
            .away_since
            .is_some_and(|t| t.elapsed() >= inner.cfg.away_bound)
        {
            inner.go_bitmap(st, disk, "peer away longer than the bound");
            return Ok(Enqueued::BitmapOnly);
        }
        if d.fenced_since
            .is_some_and(|t| t.elapsed() >= inner.fenced_bound())
        {
            inner.go_bitmap(st, disk, "stream fenced by the recovery host");
            return Ok(Enqueued::BitmapOnly);
        }
        let cost = rec.cost();
        let spill_empty = d.spill.as_ref().is_none_or(|s| s.is_empty());
        let r = if spill_empty && st.mem_cost + cost <= inner.cfg.queue_memory {
            d.mem.push_back(Queued {
                rec: Arc::new(rec),
                cost,
            });
            d.mem_cost += cost;
            st.mem_cost += cost;
            Enqueued::Memory
        } else if let Some(s) = d
            .spill
            .as_mut()
            .filter(|_| st.spill_cost + cost <= inner.cfg.spill_limit)
        {
            match s.push(&rec) {
                Ok(()) => {
                    st.spill_cost += cost;
                    Enqueued::Spilled
                }
                Err(e) => {
                    tracing::error!(disk, error = %e, "spill log write failed");
                    inner.go_bitmap(st, disk, "spill log write failed");
                    Enqueued::BitmapOnly
                }
            }
        } else {
            inner.go_bitmap(st, disk, "outbound queue and spill log full");
            Enqueued::BitmapOnly
        };
        drop(guard);
        inner.wake.notify_one();
        Ok(r)
    }

    /// Adds a disk at run time (no-op if it is there with the same spec; a different
    /// spec replaces it, dropping its queue). The connection is renewed so the receiver
    /// opens its journal; records queued meanwhile wait for the new Welcome.
    pub fn add_disk(&self, spec: DiskSpec) -> Result<(), StreamError> {
        {
            let mut guard = self.inner.lock();
            let st = &mut *guard;
            if st.disks.get(&spec.disk_id).is_some_and(|d| d.spec == spec) {
                return Ok(());
            }
            if let Some(old) = st.disks.remove(&spec.disk_id) {
                forget(st, old);
            }
            let q = new_disk_q(&self.inner.cfg, spec)?;
            st.disks.insert(q.spec.disk_id, q);
            st.reconnect = true;
        }
        self.inner.wake.notify_one();
        Ok(())
    }

    /// Removes a disk at run time: what was queued for it is dropped (the owner's dirty
    /// bitmap keeps what it covered) and the connection is renewed without it. Returns
    /// whether the disk was there.
    pub fn remove_disk(&self, disk: u64) -> bool {
        let found = {
            let mut guard = self.inner.lock();
            let st = &mut *guard;
            match st.disks.remove(&disk) {
                Some(old) => {
                    forget(st, old);
                    st.reconnect = true;
                    true
                }
                None => false,
            }
        };
        if found {
            self.inner.wake.notify_one();
        }
        found
    }

    /// Changes the fencing generation (and VPG) a disk's stream carries, keeping its
    /// queue: the connection is renewed so the next Hello offers the new one. Returns
    /// whether anything changed.
    pub fn set_fencing(
        &self,
        disk: u64,
        vpg_id: &str,
        fencing_generation: u64,
    ) -> Result<bool, StreamError> {
        let changed = {
            let mut st = self.inner.lock();
            let d = st
                .disks
                .get_mut(&disk)
                .ok_or(StreamError::UnknownDisk(disk))?;
            let changed =
                d.spec.vpg_id != vpg_id || d.spec.fencing_generation != fencing_generation;
            if changed {
                d.spec.vpg_id = vpg_id.to_string();
                d.spec.fencing_generation = fencing_generation;
                d.fenced = false;
                d.fenced_since = None;
                st.reconnect = true;
            }
            changed
        };
        if changed {
            self.inner.wake.notify_one();
        }
        Ok(changed)
    }

    /// The VPG and fencing generation a disk's stream carries (what its sync sessions
    /// must carry too).
    pub fn fencing_of(&self, disk: u64) -> Option<(String, u64)> {
        self.inner
            .lock()
            .disks
            .get(&disk)
            .map(|d| (d.spec.vpg_id.clone(), d.spec.fencing_generation))
    }

    /// Whether the receiver refused the disk by fencing on the last connection (cleared
    /// by [`Sender::set_fencing`] with another generation, or a reconnect that admits it).
    pub fn is_fenced(&self, disk: u64) -> bool {
        self.inner.lock().disks.get(&disk).is_some_and(|d| d.fenced)
    }

    /// Changes the bandwidth limit of the running stream (`None`: unlimited): the next
    /// send, or the wait in progress, follows the new rate; the connection and the queue
    /// stay as they are. Returns whether the limit changed.
    pub fn set_bandwidth_limit(&self, limit: Option<u64>) -> bool {
        self.inner.limit.send_if_modified(|cur| {
            if *cur == limit {
                false
            } else {
                *cur = limit;
                true
            }
        })
    }

    /// The bandwidth limit in force (`None`: unlimited).
    pub fn bandwidth_limit(&self) -> Option<u64> {
        *self.inner.limit.borrow()
    }

    pub fn disk_ids(&self) -> Vec<u64> {
        self.inner.lock().disks.keys().copied().collect()
    }

    /// The recovery agent's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.inner.cfg.peer
    }

    /// A Bitmap Sync of `disk` finished: stream its records again (seqs go on from the
    /// disk's counter; the journal accepts the gap).
    pub fn sync_finished(&self, disk: u64) -> Result<(), StreamError> {
        let mut st = self.inner.lock();
        let d = st
            .disks
            .get_mut(&disk)
            .ok_or(StreamError::UnknownDisk(disk))?;
        d.mode = DiskMode::Streaming;
        Ok(())
    }

    pub fn stats(&self) -> Vec<DiskStats> {
        let st = self.inner.lock();
        let now = now_ms();
        st.disks
            .values()
            .map(|d| {
                let oldest = d
                    .mem
                    .front()
                    .map(|q| q.rec.timestamp_ms)
                    .or_else(|| d.spill.as_ref().and_then(|s| s.oldest_ms()));
                DiskStats {
                    disk_id: d.spec.disk_id,
                    mode: d.mode,
                    queued_records: d.queued() as u64,
                    queued_bytes: (d.mem_cost + d.spill.as_ref().map_or(0, |s| s.cost)) as u64,
                    spilled_bytes: d.spill.as_ref().map_or(0, |s| s.bytes()),
                    oldest_unacked_ms: oldest.map_or(0, |t| (now - t).max(0) as u64),
                    acked_seq: d.acked,
                    last_seq: d.last_seq,
                }
            })
            .collect()
    }

    /// Whether every queued record of every disk has been acknowledged.
    pub fn is_drained(&self) -> bool {
        self.inner.lock().disks.values().all(|d| d.queued() == 0)
    }

    pub fn is_connected(&self) -> bool {
        self.inner.lock().away_since.is_none()
    }

    /// Whether the receiver refused `disk` (not fenced) on the last connection; it is
    /// offered again after a bounded delay.
    pub fn is_refused(&self, disk: u64) -> bool {
        self.inner
            .lock()
            .disks
            .get(&disk)
            .is_some_and(|d| d.refused && !d.fenced)
    }

    /// Offers the refused disks again soon (once the current connection is a second
    /// old), rather than at the end of the growing delay: for a caller that learnt the
    /// recovery side may take them now (its sync session was admitted). No-op when no
    /// disk is refused.
    pub fn reoffer_soon(&self) {
        {
            let mut st = self.inner.lock();
            let Some(at) = st.reoffer_at else { return };
            let soon = st
                .welcomed_at
                .map_or_else(Instant::now, |w| w + REOFFER_MIN)
                .max(Instant::now());
            st.reoffer_at = Some(at.min(soon));
        }
        self.inner.wake.notify_one();
    }

    /// Whether the peer accepted `disk` on the current connection.
    pub fn is_accepted(&self, disk: u64) -> bool {
        let st = self.inner.lock();
        st.away_since.is_none() && st.disks.get(&disk).is_some_and(|d| d.accepted)
    }

    /// Record bytes queued (memory and spill) and the acknowledged seq of one disk.
    pub fn disk_backlog(&self, disk: u64) -> Option<(u64, u64)> {
        let st = self.inner.lock();
        st.disks.get(&disk).map(|d| {
            (
                (d.mem_cost + d.spill.as_ref().map_or(0, |s| s.cost)) as u64,
                d.acked,
            )
        })
    }

    /// The configured outbound memory bound (a sync paces itself on a share of it).
    pub fn queue_memory(&self) -> usize {
        self.inner.cfg.queue_memory
    }

    /// A new connection to the same recovery agent for a sync session, secured as the
    /// stream is.
    pub async fn dial_session(&self) -> Result<SessionConn, StreamError> {
        let stream = dial(&self.inner.cfg).await?;
        let (rd, wr) = tokio::io::split(stream);
        Ok(SessionConn {
            reader: FrameReader::new(rd),
            writer: FrameWriter::new(wr, Compression::None),
            timeout: self.inner.cfg.peer_timeout,
            keepalive: self.inner.cfg.ping_interval,
            last_sent: Instant::now(),
        })
    }
}

/// An empty queue for `spec` (with its spill log, truncated, when spilling is on).
fn new_disk_q(cfg: &SenderConfig, spec: DiskSpec) -> Result<DiskQ, StreamError> {
    let spill = match &cfg.spill_dir {
        Some(dir) if cfg.spill_limit > 0 => Some(Spill::create(
            dir.join(format!("spill-{:016x}.log", spec.disk_id)),
        )?),
        _ => None,
    };
    Ok(DiskQ {
        spec,
        mode: DiskMode::Streaming,
        mem: VecDeque::new(),
        mem_cost: 0,
        spill,
        last_seq: 0,
        acked: 0,
        sent: 0,
        accepted: false,
        fenced: false,
        fenced_since: None,
        refused: false,
        refusal: String::new(),
    })
}

/// Takes a removed disk's queue out of the totals and empties its spill log.
fn forget(st: &mut State, mut old: DiskQ) {
    st.mem_cost -= old.mem_cost;
    if let Some(s) = old.spill.as_mut() {
        st.spill_cost -= s.cost;
        if let Err(e) = s.clear() {
            tracing::warn!(disk = old.spec.disk_id, error = %e, "could not truncate spill log");
        }
    }
}

/// A framed connection for a sync session (see `proto::stream::SyncFrame`).
pub struct SessionConn {
    reader: FrameReader<tokio::io::ReadHalf<Box<dyn Io>>>,
    writer: FrameWriter<tokio::io::WriteHalf<Box<dyn Io>>>,
    timeout: Duration,
    /// The stream's ping interval: well inside any peer timeout.
    keepalive: Duration,
    last_sent: Instant,
}

impl SessionConn {
    /// Sends one frame; a peer that takes none of it for the peer timeout is `Timeout`.
    pub async fn send(&mut self, f: &Frame) -> Result<(), StreamError> {
        self.last_sent = Instant::now();
        tokio::time::timeout(self.timeout, self.writer.send(f))
            .await
            .map_err(|_| StreamError::Timeout("sending to the sync peer"))?
    }

    /// Sends a Ping if nothing was sent for a ping interval: a pass whose data all goes
    /// through the stream keeps its session alive this way.
    pub async fn keepalive(&mut self) -> Result<(), StreamError> {
        if self.last_sent.elapsed() < self.keepalive {
            return Ok(());
        }
        self.send(&Frame::Ping {
            nonce: 0,
            lag: Vec::new(),
        })
        .await
    }

    /// Queues a frame without flushing (pipelined requests); `send` or `flush` pushes it.
    pub fn push(&mut self, f: &Frame) -> Result<(), StreamError> {
        self.writer.push(f)
    }

    pub async fn flush(&mut self) -> Result<(), StreamError> {
        self.last_sent = Instant::now();
        tokio::time::timeout(self.timeout, self.writer.flush())
            .await
            .map_err(|_| StreamError::Timeout("sending to the sync peer"))?
    }

    /// The next frame (answers to keepalives are skipped); a refusal becomes
    /// `StreamError::Refused`, silence past the peer timeout `Timeout`, a close `Closed`.
    pub async fn recv(&mut self) -> Result<Frame, StreamError> {
        loop {
            match tokio::time::timeout(self.timeout, self.reader.read_frame()).await {
                Err(_) => return Err(StreamError::Timeout("waiting for the sync peer")),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(None)) => return Err(StreamError::Closed),
                Ok(Ok(Some(Frame::Refused { reason }))) => {
                    return Err(StreamError::Refused(reason))
                }
                Ok(Ok(Some(Frame::Pong { .. }))) => continue,
                Ok(Ok(Some(f))) => return Ok(f),
            }
        }
    }

    pub async fn shutdown(&mut self) {
        self.writer.shutdown().await;
    }
}

/// The connection task: dial, run, back off, again, until cancelled.
async fn run(inner: Arc<Inner>, cancel: CancellationToken) {
    let mut backoff = inner.cfg.backoff_min;
    loop {
        let started = Instant::now();
        let r = tokio::select! {
            _ = cancel.cancelled() => return,
            r = connection(&inner, &cancel) => r,
        };
        {
            let mut st = inner.lock();
            if st.away_since.is_none() {
                st.away_since = Some(Instant::now());
            }
            for d in st.disks.values_mut() {
                d.accepted = false;
            }
        }
        match r {
            Ok(()) => return,
            // The disk set changed: dial again at once with the new Hello.
            Err(StreamError::Reconfigured) => {
                tracing::info!(peer = %inner.cfg.peer, "disk set changed: reconnecting");
                continue;
            }
            // Disks the receiver refused are offered again: a new Hello at once (the
            // delay was the wait before this).
            Err(StreamError::Reoffer) => {
                tracing::info!(peer = %inner.cfg.peer, "offering refused disks again: reconnecting");
                continue;
            }
            Err(StreamError::Refused(reason)) => {
                tracing::error!(peer = %inner.cfg.peer, %reason, "recovery agent refused the stream");
                inner.event(StreamEvent::Refused { reason });
                backoff = inner.cfg.backoff_max;
            }
            Err(e) => {
                tracing::warn!(peer = %inner.cfg.peer, error = %e, "replication connection lost");
                inner.event(StreamEvent::Disconnected {
                    error: e.to_string(),
                });
                // A connection that stood for a while resets the back-off.
                if started.elapsed() > inner.cfg.backoff_max {
                    backoff = inner.cfg.backoff_min;
                }
            }
        }
        // Exponential back-off with jitter: sleep in [b/2, b], then double b.
        let b = backoff.as_millis() as u64;
        let sleep = Duration::from_millis(rand::rng().random_range(b / 2..=b.max(1)));
        backoff = (backoff * 2).min(inner.cfg.backoff_max);
        let deadline = Instant::now() + sleep;
        // Check the away bound while waiting, so a disk goes bitmap-only on time even
        // when the guest is idle.
        while Instant::now() < deadline {
            {
                let mut st = inner.lock();
                inner.check_away(&mut st);
                inner.check_fenced(&mut st);
                // A disk added while backing off is worth an early try.
                if st.reconnect {
                    break;
                }
            }
            let step = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(step) => {}
            }
        }
    }
}

async fn dial(cfg: &SenderConfig) -> Result<Box<dyn Io>, StreamError> {
    let tcp = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(cfg.peer))
        .await
        .map_err(|_| StreamError::Timeout("connect"))?
        .map_err(io("connect"))?;
    let _ = tcp.set_nodelay(true);
    crate::net::tune_long_lived(&tcp, cfg.peer_timeout);
    match &cfg.transport {
        ClientTransport::Insecure => Ok(Box::new(tcp)),
        ClientTransport::Tls {
            config,
            server_name,
        } => {
            let name = rustls::pki_types::ServerName::try_from(server_name.clone())
                .map_err(|e| StreamError::Tls(format!("server name {server_name:?}: {e}")))?;
            let tls = tokio::time::timeout(
                cfg.connect_timeout,
                tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp),
            )
            .await
            .map_err(|_| StreamError::Timeout("TLS handshake"))?
            .map_err(|e| StreamError::Tls(e.to_string()))?;
            Ok(Box::new(tls))
        }
    }
}

/// One connection's life: handshake, then send and receive until an error.
async fn connection(inner: &Arc<Inner>, cancel: &CancellationToken) -> Result<(), StreamError> {
    let cfg = &inner.cfg;
    let io_stream = dial(cfg).await?;
    let (rd, wr) = tokio::io::split(io_stream);
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr, cfg.compression);
    let disks: Vec<DiskHello> = {
        let mut st = inner.lock();
        // This Hello carries the current set: later changes reconnect again.
        st.reconnect = false;
        st.disks
            .values()
            .map(|d| DiskHello {
                disk_id: d.spec.disk_id,
                size: d.spec.size,
                generation: d.spec.generation,
                vpg_id: d.spec.vpg_id.clone(),
                fencing_generation: d.spec.fencing_generation,
            })
            .collect()
    };
    let offered: HashMap<u64, u64> = disks
        .iter()
        .map(|d| (d.disk_id, d.fencing_generation))
        .collect();
    // Every wait on the peer is bounded: a silent peer must not hold the handshake.
    tokio::time::timeout(
        cfg.peer_timeout,
        writer.send(&Frame::Hello {
            protocol_version: PROTOCOL_VERSION,
            host_name: cfg.host_name.clone(),
            disks,
        }),
    )
    .await
    .map_err(|_| StreamError::Timeout("sending Hello"))??;
    let welcome = tokio::time::timeout(cfg.peer_timeout, reader.read_frame())
        .await
        .map_err(|_| StreamError::Timeout("waiting for Welcome"))??;
    let (accepted, refused) = match welcome {
        Some(Frame::Welcome { disks, refused }) => (disks, refused),
        Some(Frame::Refused { reason }) => return Err(StreamError::Refused(reason)),
        Some(other) => {
            return Err(StreamError::Protocol(format!(
                "expected Welcome, got {other:?}"
            )))
        }
        None => return Err(StreamError::Closed),
    };
    {
        let mut guard = inner.lock();
        let st = &mut *guard;
        st.away_since = None;
        st.welcomed_at = Some(Instant::now());
        let ids: HashSet<u64> = accepted.iter().map(|a| a.disk_id).collect();
        for a in &accepted {
            inner.apply_ack(st, *a);
            if let Some(d) = st.disks.get_mut(&a.disk_id) {
                // Resend everything above what the receiver holds durably.
                d.sent = d.acked;
                d.accepted = true;
                d.fenced = false;
                d.fenced_since = None;
                if d.refused {
                    tracing::info!(
                        disk = a.disk_id,
                        durable_seq = a.durable_seq,
                        "receiver accepts the disk it refused before"
                    );
                }
                d.refused = false;
            }
        }
        let mut explained = HashSet::new();
        for r in refused {
            if ids.contains(&r.disk_id) || !explained.insert(r.disk_id) {
                continue;
            }
            let Some(d) = st.disks.get_mut(&r.disk_id) else {
                continue;
            };
            if r.fenced && offered.get(&r.disk_id) != Some(&d.spec.fencing_generation) {
                // The generation changed while this Hello was on its way: the refusal is
                // about the old one, and the reconnect already asked for offers the new.
                tracing::info!(disk = r.disk_id, reason = %r.reason,
                    "fencing refusal of a generation since replaced: ignored");
                continue;
            }
            d.fenced = r.fenced;
            // The same refusal again (a re-offer while the journal's storage is still
            // unusable) is not news: logged, not reported again.
            let repeated = d.refused && d.refusal == r.reason;
            // A size mismatch waits for the operator (a new disk spec reconnects anyway);
            // anything else (a journal storage error) may pass: offered again.
            d.refused = !r.fenced && !r.reason.contains("size mismatch");
            d.refusal.clone_from(&r.reason);
            if r.fenced {
                // A failover or move raises the generation on every host at once and the
                // recovery host may have it first (from the manager, or from another
                // protected host's Hello): this host's own is likely on its way. The
                // queue is kept, so once `set_fencing` brings it the stream resends from
                // the durable seq and nothing is owed to a sync. A stale primary never
                // gets it: past the fenced bound (or the queue's bounds) the disk goes
                // bitmap-only. Nothing of this Hello reaches the journal meanwhile.
                let since = *d.fenced_since.get_or_insert_with(Instant::now);
                tracing::warn!(disk = r.disk_id, vpg = %d.spec.vpg_id,
                    fencing_generation = d.spec.fencing_generation, reason = %r.reason,
                    fenced_for_ms = since.elapsed().as_millis() as u64,
                    "recovery host fenced the disk's stream: queue kept for a new generation");
                inner.check_fenced(st);
            } else {
                // Not final (the recovery journal may be reopened once its storage works
                // again): the records stay queued and the disk is offered again soon.
                tracing::warn!(disk = r.disk_id, reason = %r.reason, "receiver refused disk");
            }
            if repeated {
                continue;
            }
            inner.event(StreamEvent::DiskRefused {
                disk: r.disk_id,
                fenced: r.fenced,
                reason: r.reason,
            });
        }
        for (id, d) in st
            .disks
            .iter_mut()
            .filter(|(id, _)| !ids.contains(id) && !explained.contains(id))
        {
            tracing::warn!(disk = id, "receiver did not accept disk");
            d.refused = true;
            inner.event(StreamEvent::DiskNotAccepted { disk: *id });
        }
        // Disks refused for a reason that may pass are offered again by a new connection
        // after a delay that grows while the refusals go on.
        if st.disks.values().any(|d| d.refused && !d.fenced) {
            st.reoffer_at = Some(Instant::now() + st.reoffer_delay);
            st.reoffer_delay = (st.reoffer_delay * 2).min(cfg.backoff_max.max(REOFFER_MIN));
        } else {
            st.reoffer_at = None;
            st.reoffer_delay = REOFFER_MIN;
        }
    }
    tracing::info!(peer = %cfg.peer, disks = accepted.len(), "replication stream connected");
    inner.event(StreamEvent::Connected);
    inner.wake.notify_one();

    let conn_cancel = cancel.child_token();
    let _stop_reader = conn_cancel.clone().drop_guard();
    let rinner = inner.clone();
    let rcancel = conn_cancel.clone();
    let peer_timeout = cfg.peer_timeout;
    let mut reader_task = tokio::spawn(
        async move {
            loop {
                let f = tokio::select! {
                    _ = rcancel.cancelled() => return Ok(()),
                    f = tokio::time::timeout(peer_timeout, reader.read_frame()) => f,
                };
                match f.map_err(|_| StreamError::Timeout("no frame from the receiver"))?? {
                    Some(Frame::Ack { disks }) => {
                        {
                            let mut st = rinner.lock();
                            for a in disks {
                                rinner.apply_ack(&mut st, a);
                            }
                        }
                        // Acks free memory: the writer may refill from the spill log.
                        rinner.wake.notify_one();
                    }
                    Some(Frame::Pong { .. }) => {}
                    Some(Frame::Refused { reason }) => return Err(StreamError::Refused(reason)),
                    Some(other) => {
                        return Err(StreamError::Protocol(format!(
                            "unexpected frame from receiver: {other:?}"
                        )))
                    }
                    None => return Err(StreamError::Closed),
                }
            }
        }
        .instrument(tracing::info_span!("stream-sender-acks")),
    );

    let mut limit = inner.limit.subscribe();
    let mut bucket = limit.borrow_and_update().map(Bucket::new);
    let mut next_ping = tokio::time::Instant::now();
    let mut nonce = 0u64;
    let mut batch: Vec<Arc<StreamRecord>> = Vec::new();
    loop {
        if tokio::time::Instant::now() >= next_ping {
            // Pings go out under load too: they carry the lag figures.
            nonce += 1;
            let lag = lag_figures(inner);
            writer.push(&Frame::Ping { nonce, lag })?;
            next_ping = tokio::time::Instant::now() + cfg.ping_interval;
        }
        let reoffer_at = inner.lock().reoffer_at;
        if reoffer_at.is_some_and(|t| Instant::now() >= t) {
            unless_reader_ended(&mut reader_task, writer.flush()).await?;
            return Err(StreamError::Reoffer);
        }
        batch.clear();
        collect(inner, &mut batch, batch_budget(*limit.borrow()))?;
        if batch.is_empty() {
            unless_reader_ended(&mut reader_task, writer.flush()).await?;
            let reoffer = async {
                match reoffer_at {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = &mut reader_task => {
                    return match r {
                        // Stopped with the sender.
                        Ok(Ok(())) => Ok(()),
                        r => Err(reader_end(r)),
                    };
                }
                _ = inner.wake.notified() => {}
                _ = tokio::time::sleep_until(next_ping) => {}
                _ = reoffer => {}
            }
            continue;
        }
        for rec in &batch {
            // The Arc keeps the queue's copy; the frame needs an owned record. This clone
            // is the one copy of the data on the send path.
            writer.push(&Frame::Record(StreamRecord::clone(rec)))?;
        }
        let n = writer.buffered();
        unless_reader_ended(&mut reader_task, async {
            pace(&mut bucket, &mut limit, n).await;
            Ok(())
        })
        .await?;
        unless_reader_ended(&mut reader_task, writer.flush()).await?;
    }
}

/// Runs `io` (a write to the receiver, or the pacing before one) unless the ack reader
/// ends first. The reader owns the peer timeout: when the peer falls silent (a cable cut
/// without resets) no Pong comes back, and a write behind a full socket buffer would
/// otherwise wait for as long as the kernel retransmits, with the disks still reported
/// as streaming.
async fn unless_reader_ended<T>(
    reader: &mut tokio::task::JoinHandle<Result<(), StreamError>>,
    io: impl std::future::Future<Output = Result<T, StreamError>>,
) -> Result<T, StreamError> {
    tokio::select! {
        r = io => r,
        r = reader => Err(reader_end(r)),
    }
}

/// Why the connection ends when its ack reader did: the reader's own error, or `Closed`
/// when it was stopped (the connection is being cancelled).
fn reader_end(r: Result<Result<(), StreamError>, tokio::task::JoinError>) -> StreamError {
    match r {
        Ok(Ok(())) => StreamError::Closed,
        Ok(Err(e)) => e,
        Err(e) => StreamError::Protocol(format!("ack reader: {e}")),
    }
}

/// Record bytes one batch may take: 1 MiB, or a quarter second's worth under a bandwidth
/// limit (at least 64 KiB), so that the Ping queued before a batch — and the Pong that
/// proves the peer alive — never waits behind more data than the link moves well inside
/// the peer timeout.
fn batch_budget(limit: Option<u64>) -> usize {
    const BATCH: usize = 1 << 20;
    match limit {
        None => BATCH,
        Some(rate) => ((rate / 4) as usize).clamp(64 << 10, BATCH),
    }
}

/// Takes the next records to send (about `budget` bytes), refilling memory from spill
/// logs.
fn collect(
    inner: &Inner,
    batch: &mut Vec<Arc<StreamRecord>>,
    budget: usize,
) -> Result<(), StreamError> {
    let mut guard = inner.lock();
    let st = &mut *guard;
    if st.reconnect {
        return Err(StreamError::Reconfigured);
    }
    inner.check_fenced(st);
    let mut bytes = 0usize;
    let limit = inner.cfg.queue_memory;
    for d in st.disks.values_mut() {
        if !d.accepted || d.mode != DiskMode::Streaming {
            continue;
        }
        loop {
            let start = d.mem.partition_point(|q| q.rec.seq <= d.sent);
            if start == d.mem.len() {
                // Everything in memory is sent: bring the next spilled record in while
                // memory allows (always one, so a disk cannot stall).
                let Some(s) = d.spill.as_mut() else { break };
                let Some(&(_, _, cost, _)) = s.index.front() else {
                    break;
                };
                if st.mem_cost + cost > limit && !d.mem.is_empty() {
                    break;
                }
                match s.pop() {
                    Ok(Some(rec)) => {
                        st.spill_cost -= cost;
                        d.mem.push_back(Queued {
                            rec: Arc::new(rec),
                            cost,
                        });
                        d.mem_cost += cost;
                        st.mem_cost += cost;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(disk = d.spec.disk_id, error = %e, "spill log read failed");
                        return Err(e);
                    }
                }
                continue;
            }
            for q in d.mem.range(start..) {
                batch.push(q.rec.clone());
                d.sent = q.rec.seq;
                bytes += q.cost;
                if bytes >= budget {
                    break;
                }
            }
            break;
        }
        if bytes >= budget {
            break;
        }
    }
    Ok(())
}

fn lag_figures(inner: &Inner) -> Vec<DiskLag> {
    let st = inner.lock();
    let now = now_ms();
    st.disks
        .values()
        .map(|d| {
            let oldest = d
                .mem
                .front()
                .map(|q| q.rec.timestamp_ms)
                .or_else(|| d.spill.as_ref().and_then(|s| s.oldest_ms()));
            DiskLag {
                disk_id: d.spec.disk_id,
                queued_records: d.queued() as u64,
                queued_bytes: (d.mem_cost + d.spill.as_ref().map_or(0, |s| s.cost)) as u64,
                oldest_unacked_ms: oldest.map_or(0, |t| (now - t).max(0) as u64),
            }
        })
        .collect()
}

/// Waits until `n` bytes may go at the limit in force. A limit change (also during the
/// wait) retunes the bucket: the debt left is waited off at the new rate, or not at all
/// when the limit is lifted.
async fn pace(bucket: &mut Option<Bucket>, limit: &mut watch::Receiver<Option<u64>>, n: usize) {
    if limit.has_changed().unwrap_or(false) {
        retune(bucket, *limit.borrow_and_update());
    }
    let Some(b) = bucket.as_mut() else { return };
    let mut wait = b.take(n);
    while let Some(d) = wait {
        tokio::select! {
            _ = tokio::time::sleep(d) => return,
            r = limit.changed() => {
                if r.is_err() {
                    // The sender half lives in `Inner`, as long as this loop: cannot
                    // happen; wait the debt off as before.
                    tokio::time::sleep(d).await;
                    return;
                }
                retune(bucket, *limit.borrow_and_update());
                wait = bucket.as_mut().and_then(Bucket::debt);
            }
        }
    }
}

fn retune(bucket: &mut Option<Bucket>, limit: Option<u64>) {
    match (bucket.as_mut(), limit) {
        (_, None) => *bucket = None,
        (Some(b), Some(r)) => b.set_rate(r),
        (None, Some(r)) => *bucket = Some(Bucket::new(r)),
    }
}

/// Token bucket for the bandwidth limit: a burst of a tenth of a second (at least
/// 64 KiB); a send larger than the tokens goes into debt and waits it off.
struct Bucket {
    rate: f64,
    tokens: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn burst_of(rate: f64) -> f64 {
        (rate / 10.0).max(64.0 * 1024.0)
    }

    fn new(rate: u64) -> Bucket {
        let rate = rate.max(1) as f64;
        let burst = Self::burst_of(rate);
        Bucket {
            rate,
            tokens: burst,
            burst,
            last: Instant::now(),
        }
    }

    /// Tokens earned since the last refill, at the current rate.
    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
    }

    /// Spends `n` bytes; returns how long to wait off the debt, if any.
    fn take(&mut self, n: usize) -> Option<Duration> {
        self.refill();
        self.tokens -= n as f64;
        self.debt()
    }

    /// The wait the current debt costs at the current rate.
    fn debt(&mut self) -> Option<Duration> {
        self.refill();
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }

    /// A new rate from now on: what was earned so far counts at the old one; the burst
    /// follows the new rate.
    fn set_rate(&mut self, rate: u64) {
        self.refill();
        self.rate = rate.max(1) as f64;
        self.burst = Self::burst_of(self.rate);
        self.tokens = self.tokens.min(self.burst);
    }
}
