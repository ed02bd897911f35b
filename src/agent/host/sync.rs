//! The protected side of syncs (DESIGN §5): for each replicated disk a task that learns
//! which sync the disk needs (`model::sync::sync_needed` over what this agent and the
//! recovery agent know), waits for the resync policy and a sync slot, and runs the pass.
//!
//! Comparison travels over a sync session with the recovery agent (`SyncFrame`); data
//! travels in band: each owed range is read under the device's range lock and queued
//! through the disk's splitter as ordinary records, so a sync can never undo a newer guest
//! write (ARCHITECTURE.md, "Syncs while the guest writes"). The pass moves the splitter's
//! cursor; bits behind it clear on acknowledgement, so an interrupted sync resumes from
//! the bitmap it left — in this process from the cursor, after a crash from the persisted
//! bitmap and activity log.
//!
//! A disk keeps one `DiskSync` for the life of the agent; its task runs while the disk is
//! protected. A new protection (another recovery host) gives it the new sender and the
//! tracking that holds for that replica ([`DiskSync::set_target`]); a paused protection
//! leaves the task waiting; every start and end event also goes to the agent's event
//! channel (`AgentEvent`, for the manager).

use std::collections::HashMap;
use std::io;
use std::ops::Range;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::config::{DiskConfig, SyncSettings};
use super::splitter::{Splitter, MAX_RECORD_DATA};
use crate::agent::nbd::{BlockDevice, FileDevice, ProtectedDevice};
use crate::agent::stream::{Sender, SessionConn, StreamError};
use crate::agent::sync::hash::block_digests_of;
use crate::agent::sync::{BlockRead, ChunkDigest, Hasher, SyncError};
use crate::model::settings::{Priority, ResyncPolicy};
use crate::model::status::SyncKind;
use crate::model::sync::{
    may_start, order_queue, sync_needed, DiskSyncFacts, QueuedSync, StartDecision, SyncNeed,
    SyncScope, Tracking,
};
use crate::proto::agent::{DiskSyncStatus, SyncAction, SyncOutcome, SyncPhase, SyncProgress};
use crate::proto::stream::{
    sync_kind_byte, sync_kind_from_byte, ChunkHash, Frame, RecordBody, ReplicaState, SyncFrame,
};

/// Chunks per digest request (Delta), and requests kept in flight.
const BATCH_CHUNKS: usize = 32;
/// The pass clears what it may and persists the bitmap every this many bytes.
const PERSIST_EVERY: u64 = 16 << 20;

/// Ranges waiting to be cleared, and where the bitmap was last persisted.
#[derive(Debug, Default)]
struct Mark {
    pending: Vec<(u64, u64)>,
    persisted_at: u64,
}

/// Why one sync attempt did not complete.
#[derive(Debug, thiserror::Error)]
pub enum SyncRunError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error(
        "disk size mismatch: protected disk is {protected} bytes, replica is {replica} bytes; \
         nothing was sent"
    )]
    SizeMismatch { protected: u64, replica: u64 },
    #[error(
        "the disk fell back to bitmap-only during the sync (outbound queue full or peer away)"
    )]
    BitmapOnly,
    #[error("unexpected message from the recovery agent: {0}")]
    Protocol(String),
    #[error("local disk at offset {offset}: {source}")]
    Io { offset: u64, source: io::Error },
    #[error("dirty tracking: {0}")]
    Dirty(#[from] crate::agent::dirty::DirtyError),
    #[error("background task failed: {0}")]
    Task(String),
    #[error("the agent is stopping")]
    Cancelled,
}

impl SyncRunError {
    /// A refusal the operator must resolve; retrying soon would only repeat it.
    fn needs_operator(&self) -> bool {
        match self {
            SyncRunError::SizeMismatch { .. } => true,
            SyncRunError::Stream(StreamError::Refused(r)) => r.contains("size mismatch"),
            _ => false,
        }
    }
}

/// Wall clock for the resync window; tests inject a fixed one.
pub trait Clock: Send + Sync {
    /// Minutes after midnight, UTC.
    fn minute_of_day(&self) -> u16;
}

/// The system clock (UTC).
#[derive(Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn minute_of_day(&self) -> u16 {
        use chrono::Timelike;
        let now = chrono::Utc::now();
        (now.hour() * 60 + now.minute()) as u16
    }
}

/// Limits how many syncs run at once on this host; waiting ones go by VPG priority,
/// then the cheaper kind, then the longest waiting (`model::sync::order_queue`).
#[derive(Debug)]
pub struct SyncSlots {
    max: usize,
    state: Mutex<SlotState>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct SlotState {
    running: usize,
    next_ticket: u64,
    waiting: Vec<(u64, QueuedSync)>,
}

/// A held slot; dropping it frees the slot.
pub struct SlotGuard<'a> {
    slots: &'a SyncSlots,
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.slots.lock().running -= 1;
        self.slots.freed.notify_waiters();
    }
}

/// Takes a waiter off the queue if it gives up (cancelled) before getting a slot.
struct Waiting<'a> {
    slots: &'a SyncSlots,
    ticket: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.slots.lock().waiting.retain(|(t, _)| *t != self.ticket);
        self.slots.freed.notify_waiters();
    }
}

impl SyncSlots {
    pub fn new(max: usize) -> Self {
        SyncSlots {
            max: max.max(1),
            state: Mutex::new(SlotState::default()),
            freed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for a slot.
    pub async fn acquire(&self, q: QueuedSync) -> SlotGuard<'_> {
        let ticket = {
            let mut st = self.lock();
            st.next_ticket += 1;
            let t = st.next_ticket;
            st.waiting.push((t, q));
            t
        };
        let waiting = Waiting {
            slots: self,
            ticket,
        };
        loop {
            let notified = self.freed.notified();
            {
                let mut st = self.lock();
                if st.running < self.max {
                    let mut queue: Vec<QueuedSync> =
                        st.waiting.iter().map(|(_, q)| q.clone()).collect();
                    order_queue(&mut queue);
                    // Our turn when nothing waiting ranks before us.
                    let mine = st
                        .waiting
                        .iter()
                        .find(|(t, _)| *t == ticket)
                        .map(|(_, q)| q.clone());
                    let first = queue.first().cloned();
                    if mine.is_some() && mine == first {
                        st.running += 1;
                        drop(st);
                        drop(waiting);
                        return SlotGuard { slots: self };
                    }
                }
            }
            // Re-check now and then: equal-ranked waiters may be woken out of order.
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }
}

/// What the sync tasks of one host share.
pub struct SyncHost {
    pub host_name: String,
    pub settings: SyncSettings,
    pub clock: Arc<dyn Clock>,
    pub slots: SyncSlots,
    pub events: SyncEventLog,
}

/// Appends the start and end events of syncs to `<data-dir>/state/sync-events.jsonl`
/// and, when given a channel, sends the same facts as `AgentEvent`s (the manager's event
/// table takes them over).
#[derive(Debug)]
pub struct SyncEventLog {
    path: PathBuf,
    lock: Mutex<()>,
    events: Option<tokio::sync::broadcast::Sender<crate::proto::control::AgentEvent>>,
}

impl SyncEventLog {
    pub fn new(path: PathBuf) -> Self {
        SyncEventLog {
            path,
            lock: Mutex::new(()),
            events: None,
        }
    }

    /// Also sends every event on `tx`.
    pub fn broadcasting(
        mut self,
        tx: tokio::sync::broadcast::Sender<crate::proto::control::AgentEvent>,
    ) -> Self {
        self.events = Some(tx);
        self
    }

    fn append(&self, event: &serde_json::Value) {
        use std::io::Write;
        if let Some(tx) = &self.events {
            let kind = event["event"].as_str().unwrap_or("sync").to_string();
            let message = format!(
                "{} {} of disk {}{}",
                event["kind"].as_str().unwrap_or("sync"),
                if kind == "sync_started" {
                    "sync started"
                } else {
                    "sync ended"
                },
                event["disk"].as_str().unwrap_or("?"),
                event["result"]
                    .as_str()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default(),
            );
            // No receiver (no control connection) is not an error.
            let _ = tx.send(crate::proto::control::AgentEvent {
                kind,
                disk_id: event["disk_id"].as_u64(),
                vm: None,
                message,
                details: event.clone(),
                at_ms: crate::agent::stream::now_ms(),
            });
        }
        let _g = self.lock.lock().unwrap_or_else(PoisonError::into_inner);
        let line = format!("{event}\n");
        let r = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = r {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot append sync event");
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Requests {
    resume: bool,
    force: bool,
    full: bool,
}

/// Counters of the running pass.
#[derive(Debug, Default)]
struct Counters {
    bytes_done: AtomicU64,
    blocks_compared: AtomicU64,
    blocks_sent: AtomicU64,
    data_bytes: AtomicU64,
    wire_bytes: AtomicU64,
}

#[derive(Debug)]
struct Running {
    kind: SyncKind,
    reason: &'static str,
    started: Instant,
    started_ms: i64,
    bytes_total: u64,
    /// `bytes_done` when this attempt started (a resumed pass starts part-way).
    done_at_start: u64,
}

#[derive(Debug, Default)]
struct View {
    phase: SyncPhase,
    detail: Option<String>,
    running: Option<Running>,
    last: Option<SyncOutcome>,
    completed: u64,
}

/// The sync task of one replicated disk. See the module documentation.
pub struct DiskSync {
    disk: DiskConfig,
    device: Arc<ProtectedDevice<FileDevice>>,
    splitter: Arc<Splitter>,
    /// The stream to the current recovery host (replaced by `set_target` while no task
    /// runs).
    sender: Mutex<Sender>,
    /// The VPG's priority and resync policy (change with the protection).
    policy: Mutex<(Priority, ResyncPolicy)>,
    host: Arc<SyncHost>,
    tracking: Mutex<Tracking>,
    requests: Mutex<Requests>,
    /// Consult the recovery agent even if nothing is owed locally (first start: the
    /// replica may be missing).
    check: AtomicBool,
    /// The pass in progress in this process: its kind, to resume from the cursor.
    pass: Mutex<Option<SyncKind>>,
    counters: Counters,
    view: Mutex<View>,
    wake: Notify,
    since: Instant,
}

impl std::fmt::Debug for DiskSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskSync")
            .field("disk", &self.disk.name)
            .finish_non_exhaustive()
    }
}

/// The local disk as a hashing source.
struct DevRead<'a>(&'a FileDevice);

impl BlockRead for DevRead<'_> {
    fn size(&self) -> io::Result<u64> {
        Ok(BlockDevice::size(self.0))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        BlockDevice::read_at(self.0, buf, offset)
    }
}

/// Fault injection for the race tests: `BULWARK_FAULT_SYNC_DELAY_MS=N` holds each disk's
/// first sync attempt N ms after its stream connected, so records and checkpoints reach
/// the recovery journal before the first sync begins (as when the sync session was
/// refused and retried later than the stream).
fn fault_sync_delay() -> Option<Duration> {
    std::env::var("BULWARK_FAULT_SYNC_DELAY_MS")
        .ok()?
        .parse()
        .ok()
        .map(Duration::from_millis)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A frame named for an error message (digests would flood it).
fn describe(f: &SyncFrame) -> String {
    match f {
        SyncFrame::ChunkDigests { req, digests } => {
            format!(
                "the chunk digests of request {req} ({} chunks)",
                digests.len()
            )
        }
        SyncFrame::BlockDigests { chunk, .. } => format!("the block digests of chunk {chunk}"),
        SyncFrame::ChunkDigestsReq { req, .. } => format!("a digest request ({req})"),
        other => format!("{other:?}"),
    }
}

/// Wire length of a frame, for the wire-bytes counter.
fn frame_len(f: &Frame) -> u64 {
    let mut v = Vec::new();
    f.encode_payload(&mut v);
    v.len() as u64 + crate::proto::stream::HEADER_LEN as u64
}

/// The chunk-aligned ranges of `dirty` from `from` on, merged.
fn pass_ranges(
    dirty: impl Iterator<Item = Range<u64>>,
    from: u64,
    chunk: u64,
    size: u64,
) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in dirty {
        let start = r.start.max(from);
        if start >= r.end {
            continue;
        }
        let a = (start / chunk * chunk).max(from / chunk * chunk);
        let b = r.end.div_ceil(chunk).saturating_mul(chunk).min(size);
        match out.last_mut() {
            Some(last) if last.end >= a => last.end = last.end.max(b),
            _ => out.push(a..b),
        }
    }
    out
}

/// Queues `buf` (the content at `offset`, read under the range lock) as records: runs of
/// non-zero blocks as writes, runs of zero blocks as zero records — or nothing when the
/// replica is known to read zeroes there. Returns blocks and bytes queued, or `None` when
/// the disk went bitmap-only.
fn queue_content(
    splitter: &Splitter,
    buf: &[u8],
    offset: u64,
    block: usize,
    skip_zero: bool,
) -> Option<(u64, u64)> {
    let mut blocks = 0u64;
    let mut bytes = 0u64;
    let mut i = 0usize;
    while i < buf.len() {
        let zero = crate::agent::sync::hash::is_zero(&buf[i..(i + block).min(buf.len())]);
        let mut j = i;
        while j < buf.len() {
            let end = (j + block).min(buf.len());
            if crate::agent::sync::hash::is_zero(&buf[j..end]) != zero {
                break;
            }
            j = end;
        }
        let at = offset + i as u64;
        if zero {
            if !skip_zero {
                let len = (j - i) as u64;
                if !splitter.push_sync(RecordBody::Zero { offset: at, len }) {
                    return None;
                }
                blocks += len.div_ceil(block as u64);
            }
        } else {
            let mut k = i;
            while k < j {
                let e = (k + MAX_RECORD_DATA).min(j);
                if !splitter.push_sync(RecordBody::Write {
                    offset: offset + k as u64,
                    data: buf[k..e].to_vec(),
                }) {
                    return None;
                }
                k = e;
            }
            blocks += ((j - i) as u64).div_ceil(block as u64);
            bytes += (j - i) as u64;
        }
        i = j;
    }
    Some((blocks, bytes))
}

/// What one attempt came to.
enum Attempt {
    Completed,
    NothingNeeded,
    /// The resync policy holds it; the detail says until when.
    Held(String),
    /// The session works but the stream has not accepted the disk (yet): no data could
    /// flow in band.
    NotAccepted,
}

impl DiskSync {
    pub fn new(
        disk: DiskConfig,
        device: Arc<ProtectedDevice<FileDevice>>,
        splitter: Arc<Splitter>,
        sender: Sender,
        tracking: Tracking,
        host: Arc<SyncHost>,
    ) -> Self {
        DiskSync {
            policy: Mutex::new((disk.priority, disk.resync)),
            disk,
            device,
            splitter,
            sender: Mutex::new(sender),
            host,
            tracking: Mutex::new(tracking),
            requests: Mutex::new(Requests::default()),
            check: AtomicBool::new(true),
            pass: Mutex::new(None),
            counters: Counters::default(),
            view: Mutex::new(View::default()),
            wake: Notify::new(),
            since: Instant::now(),
        }
    }

    fn sender(&self) -> Sender {
        lock(&self.sender).clone()
    }

    /// A new protection of the disk: its stream and the tracking that holds against that
    /// replica. Only while no task runs (the agent stops it first). Forgets the pass in
    /// progress and operator requests (they were for the old replica).
    pub fn set_target(&self, sender: Sender, tracking: Tracking) {
        *lock(&self.sender) = sender;
        *lock(&self.tracking) = tracking;
        *lock(&self.pass) = None;
        *lock(&self.requests) = Requests::default();
        self.check.store(true, Ordering::SeqCst);
    }

    /// What the dirty tracking says about the current replica (`Clean` once a sync
    /// completed).
    pub fn tracking(&self) -> Tracking {
        *lock(&self.tracking)
    }

    /// The VPG's priority and resync policy.
    pub fn set_policy(&self, priority: Priority, resync: ResyncPolicy) {
        *lock(&self.policy) = (priority, resync);
        self.poke();
    }

    /// An operator's request (admin endpoint).
    pub fn request(&self, action: SyncAction) {
        {
            let mut r = lock(&self.requests);
            match action {
                SyncAction::Resume => r.resume = true,
                SyncAction::Force => r.force = true,
                SyncAction::Full => r.full = true,
            }
        }
        self.check.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    /// Something changed that may call for a sync (the stream dropped records, the
    /// replica lost some, the stream reconnected).
    pub fn poke(&self) {
        self.check.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    pub fn status(&self) -> DiskSyncStatus {
        let v = lock(&self.view);
        let c = &self.counters;
        let running = v.running.as_ref().map(|r| {
            let done = c.bytes_done.load(Ordering::Relaxed).min(r.bytes_total);
            let secs = r.started.elapsed().as_secs_f64();
            let rate = if secs > 0.0 {
                (done.saturating_sub(r.done_at_start) as f64 / secs) as u64
            } else {
                0
            };
            let left = r.bytes_total - done;
            SyncProgress {
                kind: r.kind,
                reason: r.reason.to_string(),
                started_ms: r.started_ms,
                bytes_total: r.bytes_total,
                bytes_done: done,
                percent: (done * 100).checked_div(r.bytes_total).unwrap_or(100) as u8,
                bytes_per_sec: rate,
                eta_secs: (rate > 0).then(|| left / rate),
                blocks_compared: c.blocks_compared.load(Ordering::Relaxed),
                blocks_sent: c.blocks_sent.load(Ordering::Relaxed),
                data_bytes: c.data_bytes.load(Ordering::Relaxed),
                wire_bytes: c.wire_bytes.load(Ordering::Relaxed),
            }
        });
        DiskSyncStatus {
            phase: v.phase,
            detail: v.detail.clone(),
            running,
            last: v.last.clone(),
            completed: v.completed,
        }
    }

    fn set_phase(&self, phase: SyncPhase, detail: Option<String>) {
        let mut v = lock(&self.view);
        v.phase = phase;
        v.detail = detail;
    }

    /// Waits for a poke, a request, or `d`.
    async fn pause(&self, d: Duration, cancel: &CancellationToken) {
        tokio::select! {
            _ = cancel.cancelled() => {}
            _ = self.wake.notified() => {}
            _ = tokio::time::sleep(d) => {}
        }
    }

    /// The task: runs until `cancel`.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        let mut fault_delay = fault_sync_delay();
        while !cancel.is_cancelled() {
            if self.splitter.is_paused() {
                // "User paused protection": the sync waits for the resume (a poke).
                self.set_phase(SyncPhase::Idle, Some("protection paused".into()));
                self.pause(Duration::from_secs(1), &cancel).await;
                continue;
            }
            let wanted = self.check.load(Ordering::SeqCst) || self.splitter.owes_sync();
            if !wanted {
                self.set_phase(SyncPhase::Idle, None);
                self.pause(Duration::from_secs(1), &cancel).await;
                continue;
            }
            if !self.sender().is_connected() {
                self.set_phase(
                    SyncPhase::WaitingForPeer,
                    Some("the recovery agent is not reachable".into()),
                );
                self.pause(Duration::from_millis(200), &cancel).await;
                continue;
            }
            if let Some(d) = fault_delay.take() {
                tracing::warn!(disk = %self.disk.name, delay_ms = d.as_millis() as u64,
                    "fault injection: the first sync attempt waits with the stream connected");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(d) => {}
                }
            }
            match self.attempt(&cancel).await {
                Ok(Attempt::Completed) | Ok(Attempt::NothingNeeded) => {
                    backoff = Duration::from_millis(500);
                }
                Ok(Attempt::NotAccepted) => {
                    self.check.store(true, Ordering::SeqCst);
                    self.set_phase(
                        SyncPhase::WaitingForPeer,
                        Some("the recovery agent has not accepted the disk's stream yet".into()),
                    );
                    self.pause(Duration::from_millis(300), &cancel).await;
                }
                Ok(Attempt::Held(detail)) => {
                    self.check.store(true, Ordering::SeqCst);
                    self.set_phase(SyncPhase::Required, Some(detail));
                    self.pause(Duration::from_secs(30), &cancel).await;
                }
                Err(SyncRunError::Cancelled) => return,
                Err(SyncRunError::Stream(StreamError::Paused(_))) => continue,
                Err(e) => {
                    self.check.store(true, Ordering::SeqCst);
                    let wait = if e.needs_operator() {
                        Duration::from_secs(60)
                    } else {
                        backoff
                    };
                    tracing::warn!(disk = %self.disk.name, error = %e, retry_in_ms = wait.as_millis() as u64, "sync attempt failed");
                    self.set_phase(SyncPhase::Failed, Some(e.to_string()));
                    // Not cut short by pokes: a failing attempt would otherwise be
                    // retried at once by the very event its failure raised.
                    tokio::select! {
                        _ = cancel.cancelled() => {}
                        _ = tokio::time::sleep(wait) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn send(&self, conn: &mut SessionConn, f: SyncFrame) -> Result<(), SyncRunError> {
        self.push(conn, f)?;
        conn.flush().await?;
        Ok(())
    }

    /// Queues a frame (counted on the wire) without flushing.
    fn push(&self, conn: &mut SessionConn, f: SyncFrame) -> Result<(), SyncRunError> {
        let f = Frame::Sync(f);
        self.counters
            .wire_bytes
            .fetch_add(frame_len(&f), Ordering::Relaxed);
        conn.push(&f)?;
        Ok(())
    }

    async fn recv(
        &self,
        conn: &mut SessionConn,
        cancel: &CancellationToken,
    ) -> Result<SyncFrame, SyncRunError> {
        let f = tokio::select! {
            _ = cancel.cancelled() => return Err(SyncRunError::Cancelled),
            f = conn.recv() => f?,
        };
        self.counters
            .wire_bytes
            .fetch_add(frame_len(&f), Ordering::Relaxed);
        match f {
            Frame::Sync(m) => Ok(m),
            other => Err(SyncRunError::Protocol(format!("{other:?}"))),
        }
    }

    async fn expect_ok(
        &self,
        conn: &mut SessionConn,
        cancel: &CancellationToken,
    ) -> Result<(), SyncRunError> {
        match self.recv(conn, cancel).await? {
            SyncFrame::Ok => Ok(()),
            other => Err(SyncRunError::Protocol(format!(
                "expected Ok, got {}",
                describe(&other)
            ))),
        }
    }

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, SyncRunError> {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| SyncRunError::Task(e.to_string()))
    }

    /// One attempt: session, decision, policy, slot, pass, end.
    async fn attempt(&self, cancel: &CancellationToken) -> Result<Attempt, SyncRunError> {
        self.check.store(false, Ordering::SeqCst);
        let mut conn = self.sender().dial_session().await?;
        // The session carries the fencing the disk's stream carries.
        let (vpg_id, fencing_generation) =
            self.sender().fencing_of(self.disk.id).unwrap_or_default();
        self.send(
            &mut conn,
            SyncFrame::Hello {
                host_name: self.host.host_name.clone(),
                disk_id: self.disk.id,
                size: self.disk.size,
                vpg_id,
                fencing_generation,
            },
        )
        .await?;
        let (replica_size, replica, running, journal_lost) =
            match self.recv(&mut conn, cancel).await? {
                SyncFrame::Info {
                    size,
                    replica,
                    running,
                    journal_lost,
                    ..
                } => (size, replica, running, journal_lost),
                other => {
                    return Err(SyncRunError::Protocol(format!(
                        "expected Info, got {}",
                        describe(&other)
                    )))
                }
            };
        // Hyper-V checks sizes first: nothing is sent for a mismatched pair.
        if replica_size != self.disk.size {
            return Err(SyncRunError::SizeMismatch {
                protected: self.disk.size,
                replica: replica_size,
            });
        }
        // The session answered for the disk (a refusal, e.g. a size mismatch, came back
        // as an error above); data needs the stream too.
        if !self.sender().is_accepted(self.disk.id) {
            // The recovery agent answered for the disk, so its journal is open again
            // after a refusal (a storage error): the stream need not wait out its delay.
            if self.sender().is_refused(self.disk.id) {
                self.sender().reoffer_soon();
            }
            return Ok(Attempt::NotAccepted);
        }
        let requests = *lock(&self.requests);
        let tracking = *lock(&self.tracking);
        let facts = DiskSyncFacts {
            protected_size: self.disk.size,
            replica_size: (replica != ReplicaState::Empty).then_some(replica_size),
            preseeded: replica == ReplicaState::PreSeeded,
            tracking,
            // Owed regions only: a busy disk always has dirty regions whose records are
            // in flight, and a poke (a new desired state, a reconnect) must not turn
            // them into a sync.
            dirty_regions: self.splitter.owed_regions(),
            bitmap_only: self.splitter.is_bitmap_only() || self.splitter.dropped_since_sync(),
            journal_lost_records: journal_lost,
            journal_refused: self.splitter.journal_refused_since_sync(),
            replica_behind_acknowledged: self.splitter.replica_behind(),
            reverse_protection: false,
            force_sync: requests.force,
            full_sync_requested: requests.full,
        };
        let Some(need) = sync_needed(&facts) else {
            if !self.splitter.owes_sync() {
                self.set_phase(SyncPhase::Idle, None);
                return Ok(Attempt::NothingNeeded);
            }
            // Owed but nothing to compare (e.g. bitmap-only with nothing written): an
            // empty Bitmap pass brings the stream back.
            return self
                .run_pass(
                    conn,
                    SyncNeed {
                        kind: SyncKind::Bitmap,
                        scope: SyncScope::DirtyRegions,
                        reason: crate::model::sync::SyncReason::StreamDropped,
                    },
                    false,
                    cancel,
                )
                .await;
        };
        // A Delta stopped by a clean shutdown left its owed regions in the bitmap: they
        // are compared again rather than sent whole as a Bitmap Sync would.
        let need = match running.and_then(sync_kind_from_byte) {
            Some(SyncKind::Delta)
                if need.kind == SyncKind::Bitmap && tracking == Tracking::Clean =>
            {
                SyncNeed {
                    kind: SyncKind::Delta,
                    scope: SyncScope::DirtyRegions,
                    reason: need.reason,
                }
            }
            _ => need,
        };
        // A sync the recovery agent saw begin and not end, of the kind we would run now,
        // resumes: the bitmap (with the activity log after a crash) holds what is left —
        // if this agent still has that bitmap. A new or lost tracker starts over.
        let resuming_after_restart = running.is_some_and(|k| k == sync_kind_byte(need.kind))
            && matches!(tracking, Tracking::Clean | Tracking::Unclean);
        let in_process = *lock(&self.pass) == Some(need.kind);
        let resuming = resuming_after_restart || in_process;
        match may_start(
            &need,
            lock(&self.policy).1,
            self.host.clock.minute_of_day(),
            // An operator's Force or Full Sync is itself the go-ahead the policy waits for.
            requests.resume || requests.force || requests.full || resuming,
        ) {
            StartDecision::Now => {}
            StartDecision::WaitForWindow { opens_in_minutes } => {
                return Ok(Attempt::Held(format!(
                    "{} needed ({}); the resync window opens in {opens_in_minutes} min",
                    need.kind.label(),
                    need.reason.describe()
                )))
            }
            StartDecision::WaitForOperator => {
                return Ok(Attempt::Held(format!(
                    "{} needed ({}); the resync policy waits for an operator to resume it",
                    need.kind.label(),
                    need.reason.describe()
                )))
            }
        }
        self.run_pass(conn, need, resuming, cancel).await
    }

    async fn run_pass(
        &self,
        mut conn: SessionConn,
        need: SyncNeed,
        resuming: bool,
        cancel: &CancellationToken,
    ) -> Result<Attempt, SyncRunError> {
        self.set_phase(SyncPhase::Queued, None);
        let _slot = tokio::select! {
            _ = cancel.cancelled() => return Err(SyncRunError::Cancelled),
            s = self.host.slots.acquire(QueuedSync {
                vpg_priority: lock(&self.policy).0,
                kind: need.kind,
                since: self.since.elapsed().as_millis() as u64,
            }) => s,
        };
        let in_process = *lock(&self.pass) == Some(need.kind);
        let from = if in_process {
            self.splitter.sync_cursor()
        } else {
            0
        };
        *lock(&self.pass) = Some(need.kind);
        // Owing first: from here no acknowledgement clears a region the pass has not
        // reached, so the marks below cannot be undone behind its back.
        let start_seq = self.splitter.begin_sync(from)?;
        if need.scope == SyncScope::WholeDisk && !resuming {
            // Every region is owed from now on, durably before anything is sent, so a
            // crash resumes this pass from the bitmap.
            let tracker = Arc::clone(self.device.tracker());
            Self::blocking(move || {
                tracker.bitmap().mark_all();
                tracker.persist()
            })
            .await??;
        }
        let hash = self.host.settings.hash;
        self.send(
            &mut conn,
            SyncFrame::Begin {
                kind: sync_kind_byte(need.kind),
                start_seq,
                block_size: hash.block_size,
                chunk_blocks: hash.chunk_blocks,
            },
        )
        .await?;
        self.expect_ok(&mut conn, cancel).await?;

        let chunk = hash.chunk_size();
        let ranges = pass_ranges(
            self.device.tracker().bitmap().dirty_ranges(),
            from,
            chunk,
            self.disk.size,
        );
        let total: u64 = ranges.iter().map(|r| r.end - r.start).sum();
        if !in_process {
            self.counters.bytes_done.store(0, Ordering::Relaxed);
            self.counters.blocks_compared.store(0, Ordering::Relaxed);
            self.counters.blocks_sent.store(0, Ordering::Relaxed);
            self.counters.data_bytes.store(0, Ordering::Relaxed);
            self.counters.wire_bytes.store(0, Ordering::Relaxed);
        }
        let done_before = self.counters.bytes_done.load(Ordering::Relaxed);
        {
            let mut v = lock(&self.view);
            v.phase = SyncPhase::Running;
            v.detail = None;
            v.running = Some(Running {
                kind: need.kind,
                reason: need.reason.describe(),
                started: Instant::now(),
                started_ms: crate::agent::stream::now_ms(),
                bytes_total: done_before + total,
                done_at_start: done_before,
            });
        }
        let started = Instant::now();
        self.host.events.append(&serde_json::json!({
            "event": "sync_started",
            "time_ms": crate::agent::stream::now_ms(),
            "disk": self.disk.name,
            "disk_id": self.disk.id,
            "kind": need.kind,
            "reason": need.reason.describe(),
            "scope": format!("{:?}", need.scope),
            "from": from,
            "bytes": total,
            "resumed": resuming,
        }));
        tracing::info!(
            disk = %self.disk.name, kind = need.kind.label(), reason = need.reason.describe(),
            from, bytes = total, resumed = resuming, "sync started"
        );

        let r = self.pass(&mut conn, need.kind, &ranges, cancel).await;
        let r = match r {
            Ok(()) => self.finish(&mut conn, cancel).await,
            Err(e) => Err(e),
        };
        let outcome = |result: &str, error: Option<String>| SyncOutcome {
            kind: need.kind,
            reason: need.reason.describe().to_string(),
            result: result.to_string(),
            error,
            blocks_compared: self.counters.blocks_compared.load(Ordering::Relaxed),
            blocks_sent: self.counters.blocks_sent.load(Ordering::Relaxed),
            data_bytes: self.counters.data_bytes.load(Ordering::Relaxed),
            wire_bytes: self.counters.wire_bytes.load(Ordering::Relaxed),
            duration_ms: started.elapsed().as_millis() as u64,
            ended_ms: crate::agent::stream::now_ms(),
        };
        let o = match &r {
            Ok(()) => outcome("completed", None),
            Err(SyncRunError::BitmapOnly) => {
                outcome("failed", Some(SyncRunError::BitmapOnly.to_string()))
            }
            Err(e) => outcome("interrupted", Some(e.to_string())),
        };
        self.host.events.append(&serde_json::json!({
            "event": "sync_ended",
            "time_ms": o.ended_ms,
            "disk": self.disk.name,
            "disk_id": self.disk.id,
            "kind": o.kind,
            "reason": o.reason,
            "result": o.result,
            "error": o.error,
            "blocks_compared": o.blocks_compared,
            "blocks_sent": o.blocks_sent,
            "data_bytes": o.data_bytes,
            "wire_bytes": o.wire_bytes,
            "duration_ms": o.duration_ms,
        }));
        tracing::info!(
            disk = %self.disk.name, kind = need.kind.label(), result = %o.result,
            blocks_compared = o.blocks_compared, blocks_sent = o.blocks_sent,
            wire_bytes = o.wire_bytes, duration_ms = o.duration_ms, error = ?o.error,
            "sync ended"
        );
        {
            let mut v = lock(&self.view);
            v.running = None;
            if r.is_ok() {
                v.completed += 1;
                v.phase = SyncPhase::Idle;
            }
            v.last = Some(o);
        }
        if matches!(r, Err(SyncRunError::BitmapOnly)) {
            *lock(&self.pass) = None;
        }
        conn.shutdown().await;
        r.map(|()| Attempt::Completed)
    }

    /// Waits until the sender's backlog for this disk is under the pacing bound and the
    /// rate limit allows more; fails if the disk went bitmap-only.
    async fn pace(
        &self,
        started: Instant,
        sent_at_start: u64,
        cancel: &CancellationToken,
    ) -> Result<(), SyncRunError> {
        let (budget, _) = self.pacing();
        loop {
            self.still_on(cancel)?;
            let queued = self.sender().disk_backlog(self.disk.id).map_or(0, |b| b.0);
            let rate_wait = self.host.settings.rate_limit.and_then(|rate| {
                let sent = self.counters.data_bytes.load(Ordering::Relaxed) - sent_at_start;
                let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                due.checked_sub(started.elapsed())
            });
            match rate_wait {
                Some(w) if w > Duration::from_millis(1) => {
                    tokio::time::sleep(w.min(Duration::from_millis(100))).await
                }
                _ if queued > budget => tokio::time::sleep(Duration::from_millis(2)).await,
                _ => return Ok(()),
            }
        }
    }

    /// Reads `range` under the range lock and queues its content; counts it.
    /// The pass may go on: the agent is not stopping and the disk still streams.
    fn still_on(&self, cancel: &CancellationToken) -> Result<(), SyncRunError> {
        if cancel.is_cancelled() {
            return Err(SyncRunError::Cancelled);
        }
        if self.splitter.is_bitmap_only() {
            return Err(SyncRunError::BitmapOnly);
        }
        Ok(())
    }

    /// How much sync data may wait in the sender's queue for this disk, and the largest
    /// piece queued at once: together at most half the queue (the guest's writes keep
    /// the other half), small enough that a crash redoes little, large enough to cover
    /// an fsync round trip.
    fn pacing(&self) -> (u64, u64) {
        let q = self.sender().queue_memory() as u64;
        let block = self.host.settings.hash.block();
        let piece = ((q / 8).clamp(64 << 10, 1 << 20) / block * block).max(block);
        let budget = (q / 2).saturating_sub(piece).min(16 << 20);
        (budget, piece)
    }

    /// Queues the content of `range` piece by piece, pacing before each.
    async fn send_paced(
        &self,
        range: Range<u64>,
        skip_zero: bool,
        started: Instant,
        sent_at_start: u64,
        cancel: &CancellationToken,
    ) -> Result<(), SyncRunError> {
        let (_, piece) = self.pacing();
        let mut pos = range.start;
        while pos < range.end {
            let end = (pos + piece).min(range.end);
            self.pace(started, sent_at_start, cancel).await?;
            self.send_range(pos..end, skip_zero).await?;
            pos = end;
        }
        Ok(())
    }

    async fn send_range(&self, range: Range<u64>, skip_zero: bool) -> Result<(), SyncRunError> {
        let dev = Arc::clone(&self.device);
        let splitter = Arc::clone(&self.splitter);
        let block = self.host.settings.hash.block_size as usize;
        let r = Self::blocking(move || {
            let len = range.end - range.start;
            let mut buf = vec![0u8; len as usize];
            dev.with_range_locked(range.start, len, |d| {
                d.read_at(&mut buf, range.start)
                    .map_err(|source| SyncRunError::Io {
                        offset: range.start,
                        source,
                    })?;
                queue_content(&splitter, &buf, range.start, block, skip_zero)
                    .ok_or(SyncRunError::BitmapOnly)
            })
        })
        .await??;
        self.counters.blocks_sent.fetch_add(r.0, Ordering::Relaxed);
        self.counters.data_bytes.fetch_add(r.1, Ordering::Relaxed);
        // Record framing: header and seq per record, roughly.
        self.counters.wire_bytes.fetch_add(
            r.1 + 48 * r.1.div_ceil(MAX_RECORD_DATA as u64).max(1),
            Ordering::Relaxed,
        );
        Ok(())
    }

    /// Moves the splitter's cursor to `upto`. Every [`PERSIST_EVERY`] bytes of pass (and
    /// at the end) it also clears what is acknowledged or needed no record (one local
    /// flush) and persists the bitmap: what a crash of this agent makes the resumed pass
    /// redo is bounded by that step plus the paced backlog, not by the pass.
    async fn progress(&self, upto: u64, mark: &mut Mark, force: bool) -> Result<(), SyncRunError> {
        mark.pending.extend(self.splitter.sync_progress(upto));
        self.counters.bytes_done.store(upto, Ordering::Relaxed);
        if !force && upto < mark.persisted_at + PERSIST_EVERY {
            return Ok(());
        }
        mark.persisted_at = upto;
        if let Some((_, acked)) = self.sender().disk_backlog(self.disk.id) {
            mark.pending.extend(self.splitter.on_acked(acked));
        }
        let ranges = self
            .splitter
            .still_clear(&std::mem::take(&mut mark.pending));
        let dev = Arc::clone(&self.device);
        Self::blocking(move || {
            if !ranges.is_empty() {
                dev.clear_replicated(&ranges)
                    .map_err(|e| SyncRunError::Io {
                        offset: 0,
                        source: io::Error::other(e),
                    })?;
            }
            dev.tracker().persist().map_err(SyncRunError::from)
        })
        .await??;
        Ok(())
    }

    async fn pass(
        &self,
        conn: &mut SessionConn,
        kind: SyncKind,
        ranges: &[Range<u64>],
        cancel: &CancellationToken,
    ) -> Result<(), SyncRunError> {
        let hash = self.host.settings.hash;
        let chunk = hash.chunk_size();
        let started = Instant::now();
        let sent_at_start = self.counters.data_bytes.load(Ordering::Relaxed);
        let mut clear = Mark::default();
        // bytes_done counts whole pass positions; the ranges are ascending.
        match kind {
            SyncKind::Delta => {
                self.delta_pass(conn, ranges, &mut clear, started, sent_at_start, cancel)
                    .await?
            }
            SyncKind::Bitmap | SyncKind::Full | SyncKind::Initial => {
                let skip_zero = kind == SyncKind::Initial;
                let bitmap_only_regions = kind == SyncKind::Bitmap;
                let rs = self.device.tracker().bitmap().region_size();
                for r in ranges {
                    let mut pos = r.start;
                    while pos < r.end {
                        let end = (pos / chunk + 1) * chunk;
                        let end = end.min(r.end);
                        self.pace(started, sent_at_start, cancel).await?;
                        conn.keepalive().await?;
                        if bitmap_only_regions {
                            // Only the dirty regions of the chunk: runs of them.
                            let bitmap = self.device.tracker().bitmap();
                            let mut runs: Vec<Range<u64>> = Vec::new();
                            let mut reg = pos / rs;
                            while reg * rs < end {
                                if bitmap.is_dirty(reg) {
                                    let a = (reg * rs).max(pos);
                                    let b = ((reg + 1) * rs).min(end);
                                    match runs.last_mut() {
                                        Some(l) if l.end == a => l.end = b,
                                        _ => runs.push(a..b),
                                    }
                                }
                                reg += 1;
                            }
                            for run in runs {
                                self.send_paced(run, false, started, sent_at_start, cancel)
                                    .await?;
                            }
                        } else if skip_zero {
                            // Holes read as zeroes and the replica is known zero: skip
                            // them without reading (a new sparse disk costs nothing).
                            let dev = Arc::clone(&self.device);
                            let data = Self::blocking(move || dev.inner().next_data(pos))
                                .await?
                                .map_err(|source| SyncRunError::Io {
                                    offset: pos,
                                    source,
                                })?;
                            if let Some(at) = data.filter(|&at| at < end) {
                                self.send_paced(
                                    at / rs * rs..end,
                                    true,
                                    started,
                                    sent_at_start,
                                    cancel,
                                )
                                .await?;
                            }
                        } else {
                            self.send_paced(pos..end, false, started, sent_at_start, cancel)
                                .await?;
                        }
                        self.progress(end, &mut clear, false).await?;
                        pos = end;
                    }
                }
            }
        }
        self.progress(self.disk.size, &mut clear, true).await?;
        Ok(())
    }

    /// Delta: level-1 digests of a batch of chunks from both sides (the target's
    /// requested ahead, so both hash at once), level-2 digests of the chunks that differ
    /// (pipelined, hashed in parallel on both sides), then the differing blocks in band.
    /// Where most chunks differ (scattered small changes), level 1 only costs a second
    /// read: after such a batch the next ones go straight to level 2.
    async fn delta_pass(
        &self,
        conn: &mut SessionConn,
        ranges: &[Range<u64>],
        clear: &mut Mark,
        started: Instant,
        sent_at_start: u64,
        cancel: &CancellationToken,
    ) -> Result<(), SyncRunError> {
        let hash = self.host.settings.hash;
        let size = self.disk.size;
        let chunks: Vec<u64> = ranges
            .iter()
            .flat_map(|r| r.start / hash.chunk_size()..r.end.div_ceil(hash.chunk_size()))
            .collect();
        let batches: Vec<Vec<u64>> = chunks.chunks(BATCH_CHUNKS).map(|c| c.to_vec()).collect();
        let mut hasher = Some(Hasher::new(hash, 2)?);
        // Per batch: compared at level 1 (a request was sent) or straight at level 2.
        let mut level1: Vec<bool> = Vec::with_capacity(batches.len());
        let mut direct = false;
        let mut early: HashMap<u64, Vec<ChunkHash>> = HashMap::new();
        for (i, batch) in batches.iter().enumerate() {
            // Keep two batches decided ahead, their level-1 requests sent.
            while level1.len() < batches.len() && level1.len() <= i + 1 {
                let k = level1.len();
                level1.push(!direct);
                if !direct {
                    self.push(
                        conn,
                        SyncFrame::ChunkDigestsReq {
                            req: k as u64,
                            chunks: batches[k].clone(),
                        },
                    )?;
                }
            }
            conn.flush().await?;
            for &c in batch {
                let (a, b) = hash.chunk_range(c, size);
                self.counters
                    .blocks_compared
                    .fetch_add((b - a).div_ceil(hash.block()), Ordering::Relaxed);
            }
            let differing: Vec<u64> = if level1[i] {
                let h = hasher
                    .take()
                    .ok_or_else(|| SyncRunError::Task("hasher lost".into()))?;
                let dev = Arc::clone(&self.device);
                let b = batch.clone();
                // Ours while the target computes its own.
                let local = tokio::task::spawn_blocking(move || {
                    let mut h = h;
                    let mut out = Vec::new();
                    let r = h.chunk_digests(&DevRead(dev.inner()), size, &b, &mut out);
                    (h, r.map(|()| out))
                });
                let want = i as u64;
                let theirs = match early.remove(&want) {
                    Some(d) => d,
                    None => match self.recv(conn, cancel).await? {
                        SyncFrame::ChunkDigests { req, digests } if req == want => digests,
                        other => {
                            return Err(SyncRunError::Protocol(format!(
                                "expected the chunk digests of request {want}, got {}",
                                describe(&other)
                            )))
                        }
                    },
                };
                let (h, mine) = local.await.map_err(|e| SyncRunError::Task(e.to_string()))?;
                hasher = Some(h);
                let mine: Vec<ChunkDigest> = mine?;
                if theirs.len() != mine.len() {
                    return Err(SyncRunError::Protocol(format!(
                        "{} chunk digests for {} chunks",
                        theirs.len(),
                        mine.len()
                    )));
                }
                let mut d = Vec::new();
                for (m, t) in mine.iter().zip(&theirs) {
                    if m.chunk != t.chunk {
                        return Err(SyncRunError::Protocol("chunk digests out of order".into()));
                    }
                    if m.strong != t.strong {
                        d.push(m.chunk);
                    }
                }
                d
            } else {
                batch.clone()
            };
            direct = differing.len() * 2 > batch.len();
            // Level 2 of the differing chunks: all requests out at once; ours meanwhile.
            for &c in &differing {
                self.push(conn, SyncFrame::BlockDigestsReq { req: c, chunk: c })?;
            }
            conn.flush().await?;
            let dev = Arc::clone(&self.device);
            let d2 = differing.clone();
            let local = tokio::task::spawn_blocking(move || {
                block_digests_of(&DevRead(dev.inner()), hash, size, &d2, 2)
            });
            let mut theirs_all = Vec::with_capacity(differing.len());
            for &c in &differing {
                // Answers come in request order; a later batch's chunk digests (asked for
                // ahead) may arrive among them.
                let theirs = loop {
                    match self.recv(conn, cancel).await? {
                        SyncFrame::BlockDigests { chunk, digests, .. } if chunk == c => {
                            break digests
                        }
                        SyncFrame::ChunkDigests { req, digests } => {
                            early.insert(req, digests);
                        }
                        other => {
                            return Err(SyncRunError::Protocol(format!(
                                "expected the block digests of chunk {c}, got {}",
                                describe(&other)
                            )))
                        }
                    }
                };
                theirs_all.push(theirs);
            }
            let mine_all = local
                .await
                .map_err(|e| SyncRunError::Task(e.to_string()))??;
            for ((&c, mine), theirs) in differing.iter().zip(mine_all).zip(theirs_all) {
                if mine.len() != theirs.len() {
                    return Err(SyncRunError::Protocol(format!(
                        "{} block digests for chunk {c}, expected {}",
                        theirs.len(),
                        mine.len()
                    )));
                }
                let (a, b) = hash.chunk_range(c, size);
                let mut runs: Vec<Range<u64>> = Vec::new();
                for (k, (m, t)) in mine.iter().zip(&theirs).enumerate() {
                    if m != t {
                        let s = a + k as u64 * hash.block();
                        let e = (s + hash.block()).min(b);
                        match runs.last_mut() {
                            Some(l) if l.end == s => l.end = e,
                            _ => runs.push(s..e),
                        }
                    }
                }
                for run in runs {
                    self.send_paced(run, false, started, sent_at_start, cancel)
                        .await?;
                }
                // Every chunk of the batch up to this one is handled (the others in
                // between were equal).
                self.progress(b, clear, false).await?;
            }
            if let Some(&last) = batch.last() {
                let (_, end) = hash.chunk_range(last, size);
                self.progress(end, clear, false).await?;
            }
        }
        Ok(())
    }

    /// After the pass: waits until every record it queued is acknowledged, tells the
    /// recovery agent, and stops owing.
    async fn finish(
        &self,
        conn: &mut SessionConn,
        cancel: &CancellationToken,
    ) -> Result<(), SyncRunError> {
        // Nothing queued on this stream: nothing to wait for, and the journal's durable
        // seq (what the sender saw acknowledged) is where the sync ends. (Seqs numbered
        // while the disk was unprotected or paused were never queued: not waited for.)
        let last = self.splitter.last_queued();
        let end_seq = if last != 0 {
            last
        } else {
            self.sender().disk_backlog(self.disk.id).map_or(0, |b| b.1)
        };
        loop {
            self.still_on(cancel)?;
            let acked = self.sender().disk_backlog(self.disk.id).map_or(0, |b| b.1);
            if acked >= end_seq {
                break;
            }
            conn.keepalive().await?;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.send(conn, SyncFrame::End { end_seq }).await?;
        self.expect_ok(conn, cancel).await?;
        self.splitter.finish_sync();
        *lock(&self.pass) = None;
        *lock(&self.tracking) = Tracking::Clean;
        *lock(&self.requests) = Requests::default();
        let tracker = Arc::clone(self.device.tracker());
        Self::blocking(move || tracker.persist()).await??;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::settings::Priority;

    #[test]
    fn pass_ranges_align_to_chunks_merge_and_start_at_the_cursor() {
        let c = 1 << 20;
        let size = 10 * c;
        // Two dirty regions in one chunk and one two chunks later.
        let r = pass_ranges(
            vec![100..200, c / 2..c / 2 + 10, 3 * c + 5..3 * c + 6].into_iter(),
            0,
            c,
            size,
        );
        assert_eq!(r, vec![0..c, 3 * c..4 * c]);
        // From the cursor on only; a cursor inside a chunk starts at that chunk.
        let r = pass_ranges(std::iter::once(0..size), 5 * c, c, size);
        assert_eq!(r, vec![5 * c..size]);
        // The last partial chunk ends at the disk's end.
        let r = pass_ranges(std::iter::once(size - 10..size), 0, 3 * c, size);
        assert_eq!(r, vec![9 * c..size]);
        assert!(pass_ranges(std::iter::once(0..c), 2 * c, c, size).is_empty());
    }

    #[test]
    fn slots_go_by_priority_then_kind() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let slots = Arc::new(SyncSlots::new(1));
            let first = slots
                .acquire(QueuedSync {
                    vpg_priority: Priority::Low,
                    kind: SyncKind::Full,
                    since: 0,
                })
                .await;
            let order = Arc::new(Mutex::new(Vec::new()));
            let mut tasks = Vec::new();
            for (name, p, k) in [
                ("low-bitmap", Priority::Low, SyncKind::Bitmap),
                ("high-full", Priority::High, SyncKind::Full),
                ("high-bitmap", Priority::High, SyncKind::Bitmap),
                ("medium-delta", Priority::Medium, SyncKind::Delta),
            ] {
                let s = Arc::clone(&slots);
                let o = Arc::clone(&order);
                tasks.push(tokio::spawn(async move {
                    let _g = s
                        .acquire(QueuedSync {
                            vpg_priority: p,
                            kind: k,
                            since: 1,
                        })
                        .await;
                    lock(&o).push(name);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }));
            }
            // Let all four queue up behind the held slot.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(lock(&order).is_empty(), "nobody passes a held slot");
            drop(first);
            for t in tasks {
                t.await.unwrap();
            }
            assert_eq!(
                *lock(&order),
                vec!["high-bitmap", "high-full", "medium-delta", "low-bitmap"]
            );
        });
    }
}
