//! The splitter: the [`WriteSink`] of one protected disk. It numbers every accepted write
//! (the disk owns its sequence, so it outlives any connection), queues it on the stream
//! [`Sender`], and keeps the bookkeeping that lets the dirty bitmap be cleared region by
//! region once the recovery journal holds a region durably — and never otherwise.
//!
//! Sequence numbers are `epoch << 40 | n`: the epoch is bumped (durably) at every agent
//! start, so a restarted agent never reuses a number the journal already holds.
//!
//! Why the bitmap stays truthful:
//! - a write marks its regions *before* it lands locally (ProtectedDevice);
//! - a region's bit is cleared only when no unacknowledged record touches it, after the
//!   local disk was flushed, and never while the disk is bitmap-only;
//! - a clear can still race a write that marked the region but was not yet accepted
//!   here; if that write's record is later dropped (bitmap-only), the splitter marks its
//!   range again — from the `accept` that saw `BitmapOnly`, or from the pending list when
//!   the sender reports `NeedsBitmapSync`. A crash in between is covered by the
//!   activity log.
//!
//! During a sync the protected side reads each owed range under the device's range lock
//! and queues its current content here ([`Splitter::push_sync`]) as an ordinary record,
//! so it is ordered against the guest's writes to that range. The pass moves a cursor
//! upwards ([`Splitter::sync_progress`]): regions below it are no longer owed and clear
//! on acknowledgement like any other; regions at or above it wait for the pass.
//!
//! Protection changes at run time: [`Splitter::attach`] gives the disk a sender (it
//! streams from then on; what the bitmap marks is owed to a sync), [`Splitter::detach`]
//! takes it away and [`Splitter::set_paused`] stops queueing while keeping it — both
//! mark every unacknowledged record's regions again, so the bitmap stays the truth.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::meter::WriteMeter;
use crate::agent::dirty::DirtyTracker;
use crate::agent::nbd::{WriteEvent, WriteSink};
use crate::agent::stream::{Enqueued, Sender, StreamError};
use crate::proto::agent::WriteActivity;
use crate::proto::stream::{RecordBody, StreamRecord};

/// Bits of the per-epoch counter.
pub const EPOCH_SHIFT: u32 = 40;
/// Writes larger than this travel as several records (frames are bounded).
pub const MAX_RECORD_DATA: usize = 8 << 20;

/// The first sequence number of `epoch`.
pub fn first_seq(epoch: u64) -> u64 {
    (epoch << EPOCH_SHIFT) | 1
}

#[derive(Debug)]
struct Pending {
    seq: u64,
    /// Bitmap regions `first..=last` the record touches (none for a checkpoint).
    regions: Option<(u64, u64)>,
}

#[derive(Debug)]
struct State {
    next_seq: u64,
    /// Queued, unacknowledged records, oldest first.
    pending: VecDeque<Pending>,
    /// Region → number of pending records touching it.
    counts: HashMap<u64, u32>,
    /// Records are not queued; the bitmap is the truth until a Bitmap Sync.
    bitmap_only: bool,
    /// The stream dropped this disk's records since the last completed sync (it stays
    /// set after the sender is back, so the sync says why it runs).
    dropped: bool,
    /// The bitmap holds regions that only a sync may clear (dirty at start, or written
    /// while bitmap-only): acknowledgements clear no region at or above `owed_from`.
    owes_sync: bool,
    /// First region a running sync pass has not reached yet (0 when none runs).
    owed_from: u64,
    /// The recovery side lost records it had acknowledged: only a Full Sync helps.
    replica_behind: bool,
    /// The recovery host refused the disk's stream (a journal storage error there) since
    /// the last completed sync: records the stream dropped meanwhile, and any it lost,
    /// are owed to that error (the sync says so).
    journal_refused: bool,
    /// Refusals seen, and how many had been seen when the running pass began: a pass
    /// that completes clears `journal_refused` only if no refusal came after its start
    /// (one racing the pass's end still owes its drops to the error).
    refusals: u64,
    refusals_at_begin: u64,
    /// Highest seq the sender reported acknowledged.
    acked: u64,
    /// Where records go; `None`: the disk is not replicated (the bitmap alone records
    /// what changed).
    sender: Option<Sender>,
    /// "User paused protection": nothing is queued and no sync may start.
    paused: bool,
    /// Seq of the newest record queued on the current sender (0: none yet).
    last_queued: u64,
    /// The guest's writes, whether or not they are streamed.
    meter: WriteMeter,
}

/// See the module documentation.
pub struct Splitter {
    disk_id: u64,
    tracker: Arc<DirtyTracker>,
    region_shift: u32,
    state: Mutex<State>,
}

impl std::fmt::Debug for Splitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splitter")
            .field("disk_id", &self.disk_id)
            .finish_non_exhaustive()
    }
}

/// What [`Splitter::insert_checkpoint`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MarkerPlaced {
    pub seq: u64,
    /// `false`: the disk is bitmap-only or unreplicated; the marker went nowhere.
    pub queued: bool,
}

impl Splitter {
    /// A splitter for `disk_id` starting at `epoch`. Regions already dirty in `tracker`
    /// are owed to a sync and are not cleared by acknowledgements.
    pub fn new(
        disk_id: u64,
        epoch: u64,
        sender: Option<Sender>,
        tracker: Arc<DirtyTracker>,
    ) -> Self {
        let region_shift = tracker.bitmap().region_size().trailing_zeros();
        let owes_sync = tracker.bitmap().dirty_count() > 0;
        Splitter {
            disk_id,
            state: Mutex::new(State {
                next_seq: first_seq(epoch),
                pending: VecDeque::new(),
                counts: HashMap::new(),
                bitmap_only: sender.is_none(),
                dropped: false,
                owes_sync,
                owed_from: 0,
                replica_behind: false,
                journal_refused: false,
                refusals: 0,
                refusals_at_begin: 0,
                acked: 0,
                sender,
                paused: false,
                last_queued: 0,
                meter: WriteMeter::default(),
            }),
            tracker,
            region_shift,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn disk_id(&self) -> u64 {
        self.disk_id
    }

    /// Last sequence number assigned (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.lock().next_seq - 1
    }

    pub fn is_bitmap_only(&self) -> bool {
        self.lock().bitmap_only
    }

    /// Whether dirty regions wait for a sync (acknowledgements do not clear them).
    pub fn owes_sync(&self) -> bool {
        self.lock().owes_sync
    }

    /// Dirty regions a sync must bring level: the bitmap's while a sync is owed (dirty
    /// at start, written while not streamed, dropped by the stream, replica behind),
    /// else none. A region dirty only because its records are in flight — queued, or
    /// acknowledged and waiting for the clearer — clears on its acknowledgement; it is
    /// no reason for a sync.
    pub fn owed_regions(&self) -> u64 {
        let st = self.lock();
        if st.owes_sync {
            self.tracker.bitmap().dirty_count()
        } else {
            0
        }
    }

    fn regions(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        (len > 0).then(|| {
            (
                offset >> self.region_shift,
                (offset + len - 1) >> self.region_shift,
            )
        })
    }

    /// Numbers `body`, queues it, records it as pending. Called with the state locked, so
    /// seqs reach the sender in order.
    fn push(&self, st: &mut State, body: RecordBody, timestamp_ms: i64) -> MarkerPlaced {
        let seq = st.next_seq;
        st.next_seq += 1;
        // The byte range the record changes (none for a checkpoint) and its regions.
        let range = match &body {
            RecordBody::Write { offset, data } => Some((*offset, data.len() as u64)),
            RecordBody::Zero { offset, len } | RecordBody::Trim { offset, len } => {
                Some((*offset, *len))
            }
            RecordBody::Checkpoint { .. } => None,
        };
        let regions = range.and_then(|(offset, len)| self.regions(offset, len));
        let Some(sender) = st.sender.clone().filter(|_| !st.bitmap_only) else {
            return MarkerPlaced { seq, queued: false };
        };
        let rec = StreamRecord {
            disk: self.disk_id,
            seq,
            timestamp_ms,
            body,
        };
        match sender.enqueue(rec) {
            Ok(Enqueued::Memory | Enqueued::Spilled) => {
                if let Some((first, last)) = regions {
                    for r in first..=last {
                        *st.counts.entry(r).or_insert(0) += 1;
                    }
                }
                st.pending.push_back(Pending { seq, regions });
                st.last_queued = seq;
                MarkerPlaced { seq, queued: true }
            }
            Ok(Enqueued::BitmapOnly) => {
                self.enter_bitmap_only(st);
                if let Some((offset, len)) = range {
                    // A clear may have raced this write between its mark and here; its
                    // extent is in the activity log (it was marked an instant ago), so
                    // setting the bits directly keeps the crash guarantee.
                    self.tracker.bitmap().mark(offset, len);
                }
                MarkerPlaced { seq, queued: false }
            }
            Err(e) => {
                tracing::error!(disk = self.disk_id, error = %e, "record not queued; disk goes bitmap-only");
                self.enter_bitmap_only(st);
                if let Some((offset, len)) = range {
                    self.tracker.bitmap().mark(offset, len);
                }
                MarkerPlaced { seq, queued: false }
            }
        }
    }

    /// The queue of this disk was dropped (or a record refused): mark every pending
    /// record's regions again and stop clearing until a sync.
    fn enter_bitmap_only(&self, st: &mut State) {
        if st.bitmap_only {
            return;
        }
        st.bitmap_only = true;
        st.dropped = true;
        st.owes_sync = true;
        st.owed_from = 0;
        for p in st.pending.drain(..) {
            if let Some((first, last)) = p.regions {
                self.tracker.bitmap().mark_regions(first, last);
            }
        }
        st.counts.clear();
    }

    /// Gives the disk a sender: records stream from now on. Whatever the bitmap marks
    /// (written while unprotected, paused or bitmap-only, or dirty at start) is owed to a
    /// sync, so acknowledgements clear none of it until the sync passes it.
    pub fn attach(&self, sender: Sender) {
        let mut st = self.lock();
        st.sender = Some(sender);
        st.last_queued = 0;
        st.acked = 0;
        if !st.paused {
            st.bitmap_only = false;
        }
        if self.tracker.bitmap().dirty_count() > 0 {
            st.owes_sync = true;
            st.owed_from = 0;
        }
    }

    /// Takes the sender away: what was queued and not acknowledged is marked again and
    /// owed to a sync; from now on the bitmap alone records what changes.
    pub fn detach(&self) {
        let mut st = self.lock();
        self.enter_bitmap_only(&mut st);
        st.sender = None;
        st.last_queued = 0;
        st.acked = 0;
    }

    /// Pauses or resumes queueing. Pausing is bitmap-only by choice (unacknowledged
    /// records marked again, a sync owed); resuming leaves the disk bitmap-only until
    /// its sync begins ([`Splitter::begin_sync`]), which brings the stream back.
    pub fn set_paused(&self, paused: bool) {
        let mut st = self.lock();
        st.paused = paused;
        if paused {
            self.enter_bitmap_only(&mut st);
        }
    }

    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Whether a sender is attached.
    pub fn is_attached(&self) -> bool {
        self.lock().sender.is_some()
    }

    /// Seq of the newest record queued on the current sender (0: none since attach).
    pub fn last_queued(&self) -> u64 {
        self.lock().last_queued
    }

    /// Whether the recovery side lost acknowledged records (see `StreamEvent::ReplicaBehind`).
    pub fn replica_behind(&self) -> bool {
        self.lock().replica_behind
    }

    /// The sender reported `ReplicaBehind`: the bitmap no longer covers the difference,
    /// so nothing is cleared until a (full) sync.
    pub fn on_replica_behind(&self) {
        let mut st = self.lock();
        st.replica_behind = true;
        st.owes_sync = true;
        st.owed_from = 0;
    }

    /// The recovery host refused the disk's stream, not by fencing: its journal could not
    /// take records (a storage error). Remembered until a sync completes.
    pub fn on_journal_refused(&self) {
        let mut st = self.lock();
        st.journal_refused = true;
        st.refusals += 1;
    }

    /// Whether the recovery host refused the disk's stream since the last completed sync.
    pub fn journal_refused_since_sync(&self) -> bool {
        self.lock().journal_refused
    }

    /// The sender reported `NeedsBitmapSync` for this disk.
    pub fn on_needs_bitmap_sync(&self) {
        let mut st = self.lock();
        self.enter_bitmap_only(&mut st);
    }

    /// Inserts a checkpoint marker (called with the consistency group's completions held).
    pub fn insert_checkpoint(
        &self,
        id: u64,
        kind: u8,
        tag: Option<String>,
        timestamp_ms: i64,
    ) -> MarkerPlaced {
        let mut st = self.lock();
        self.push(
            &mut st,
            RecordBody::Checkpoint { id, kind, tag },
            timestamp_ms,
        )
    }

    /// The sender acknowledged everything up to `acked`: forgets those records and
    /// returns the byte ranges whose regions no pending record touches any more and that
    /// no sync still owes — the caller flushes the local disk and clears them
    /// (`ProtectedDevice::clear_replicated`).
    pub fn on_acked(&self, acked: u64) -> Vec<(u64, u64)> {
        let mut st = self.lock();
        if acked <= st.acked {
            return Vec::new();
        }
        st.acked = acked;
        let mut freed = Vec::new();
        while st.pending.front().is_some_and(|p| p.seq <= acked) {
            let Some(p) = st.pending.pop_front() else {
                break;
            };
            if let Some((first, last)) = p.regions {
                for r in first..=last {
                    if let Some(c) = st.counts.get_mut(&r) {
                        *c -= 1;
                        if *c == 0 {
                            st.counts.remove(&r);
                            freed.push(r);
                        }
                    }
                }
            }
        }
        if st.bitmap_only {
            return Vec::new();
        }
        if st.owes_sync {
            let from = st.owed_from;
            freed.retain(|&r| r < from);
        }
        freed.sort_unstable();
        self.merge_regions(freed)
    }

    /// Sorted region numbers → merged byte ranges.
    fn merge_regions(&self, regions: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
        let size = 1u64 << self.region_shift;
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in regions {
            match out.last_mut() {
                Some((off, len)) if *off + *len == r * size => *len += size,
                _ => out.push((r * size, size)),
            }
        }
        out
    }

    /// A sync pass starts (or resumes) at byte `from`: the disk streams again (if it was
    /// bitmap-only) and regions from `from` on are owed to the pass. Returns the last seq
    /// assigned before the pass: checkpoints after it are not recoverable until it ends.
    pub fn begin_sync(&self, from: u64) -> Result<u64, StreamError> {
        let mut st = self.lock();
        if st.paused {
            return Err(StreamError::Paused(self.disk_id));
        }
        if let Some(s) = st.sender.clone() {
            if st.bitmap_only {
                s.sync_finished(self.disk_id)?;
            }
            st.bitmap_only = false;
        }
        st.owes_sync = true;
        st.owed_from = from >> self.region_shift;
        st.refusals_at_begin = st.refusals;
        Ok(st.next_seq - 1)
    }

    /// The pass has handled everything below byte `upto` (queued its content, or found
    /// it equal). Returns the ranges that may be cleared now: passed regions the bitmap
    /// marks and no pending record touches (the others clear on their acknowledgement).
    /// Nothing if the disk fell back to bitmap-only meanwhile (the pass is void).
    pub fn sync_progress(&self, upto: u64) -> Vec<(u64, u64)> {
        let mut st = self.lock();
        if st.bitmap_only || !st.owes_sync {
            return Vec::new();
        }
        let bitmap = self.tracker.bitmap();
        // The disk's end passes its last region even when that region is short.
        let to = if upto >= bitmap.disk_size() {
            bitmap.region_count()
        } else {
            upto >> self.region_shift
        };
        if to <= st.owed_from {
            return Vec::new();
        }
        let passed = (st.owed_from..to)
            .filter(|r| bitmap.is_dirty(*r) && !st.counts.contains_key(r))
            .collect::<Vec<_>>();
        st.owed_from = to;
        self.merge_regions(passed)
    }

    /// `ranges` (region-aligned, from [`Splitter::sync_progress`]) without the regions a
    /// record queued since then touches: a deferred clear must not drop their bits
    /// before those records are acknowledged.
    pub fn still_clear(&self, ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let st = self.lock();
        let size = 1u64 << self.region_shift;
        let free = ranges
            .iter()
            .flat_map(|&(off, len)| off / size..(off + len).div_ceil(size))
            .filter(|r| !st.counts.contains_key(r));
        self.merge_regions(free)
    }

    /// Where the running pass stands (byte offset), for resuming after a reconnect.
    pub fn sync_cursor(&self) -> u64 {
        self.lock().owed_from << self.region_shift
    }

    /// The pass reached the end and every record it queued is acknowledged: nothing is
    /// owed any more.
    pub fn finish_sync(&self) {
        let mut st = self.lock();
        if st.bitmap_only {
            return;
        }
        st.owes_sync = false;
        st.owed_from = 0;
        st.replica_behind = false;
        st.dropped = false;
        if st.refusals == st.refusals_at_begin {
            st.journal_refused = false;
        }
    }

    /// Whether the stream dropped this disk's records since the last completed sync.
    pub fn dropped_since_sync(&self) -> bool {
        self.lock().dropped
    }

    /// Queues the current content of a range for a sync, as a record in seq order. The
    /// caller holds the device's range lock over it (so no guest write to the range can
    /// slip between the read and this call) and passes what it read. `false`: the disk
    /// is bitmap-only (or unreplicated) and nothing was queued; the pass is void.
    pub fn push_sync(&self, body: RecordBody) -> bool {
        let ts = crate::agent::stream::now_ms();
        let mut st = self.lock();
        if st.bitmap_only || st.sender.is_none() {
            return false;
        }
        self.push(&mut st, body, ts).queued
    }

    /// The guest's writes to this disk: totals and the last few seconds.
    pub fn write_activity(&self, now_ms: i64) -> WriteActivity {
        self.lock().meter.activity(now_ms)
    }

    fn accept_event(&self, event: &WriteEvent<'_>) {
        let ts = crate::agent::stream::now_ms();
        let mut st = self.lock();
        let bytes = match *event {
            WriteEvent::Write { data, .. } => data.len() as u64,
            WriteEvent::Zeroes { .. } | WriteEvent::Trim { .. } => 0,
        };
        st.meter.record(ts, bytes);
        match *event {
            WriteEvent::Write { offset, data, .. } => {
                let mut off = offset;
                for chunk in data.chunks(MAX_RECORD_DATA) {
                    self.push(
                        &mut st,
                        RecordBody::Write {
                            offset: off,
                            data: chunk.to_vec(),
                        },
                        ts,
                    );
                    off += chunk.len() as u64;
                }
            }
            WriteEvent::Zeroes { offset, len } => {
                self.push(&mut st, RecordBody::Zero { offset, len }, ts);
            }
            WriteEvent::Trim { offset, len } => {
                self.push(&mut st, RecordBody::Trim { offset, len }, ts);
            }
        }
    }
}

impl WriteSink for Splitter {
    fn accept(&self, event: &WriteEvent<'_>) {
        self.accept_event(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::dirty::{DirtyConfig, DirtyPaths};
    use crate::agent::stream::{ClientTransport, DiskSpec, SenderConfig};
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    const SIZE: u64 = 4 << 20;
    /// A disk whose last region is short.
    const ODD_SIZE: u64 = SIZE + 4096;
    const REGION: u64 = 64 << 10;

    #[derive(Debug, Clone)]
    enum Op {
        Write {
            offset: u64,
            len: u64,
        },
        Zero {
            offset: u64,
            len: u64,
        },
        /// Acknowledge up to the n-th assigned seq (clamped).
        Ack(usize),
        Checkpoint,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..SIZE / 512, 1u64..300).prop_map(|(s, n)| {
                let offset = s * 512;
                Op::Write { offset, len: (n * 512).min(SIZE - offset) }
            }),
            1 => (0..SIZE / 512, 1u64..600).prop_map(|(s, n)| {
                let offset = s * 512;
                Op::Zero { offset, len: (n * 512).min(SIZE - offset) }
            }),
            2 => (0usize..64).prop_map(Op::Ack),
            1 => Just(Op::Checkpoint),
        ]
    }

    fn regions(offset: u64, len: u64) -> impl Iterator<Item = u64> {
        offset / REGION..=(offset + len - 1) / REGION
    }

    /// Runs `ops` against a real tracker and a real (unconnected) sender whose memory
    /// queue holds `queue` bytes, clearing what `on_acked` frees as the agent does.
    /// Checks after every step: every region written by a record not acknowledged (or
    /// dropped) is dirty; and at the end, when nothing was dropped and everything was
    /// acknowledged, the bitmap is empty.
    fn run(ops: Vec<Op>, queue: usize, dirty_at_start: bool) -> Result<(), TestCaseError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let (tracker, _) = DirtyTracker::open(
            DirtyPaths::in_dir(dir.path(), "d"),
            SIZE,
            DirtyConfig::default(),
        )
        .unwrap();
        if dirty_at_start {
            tracker.mark(0, 512).unwrap();
        }
        let tracker = Arc::new(tracker);
        let mut sc = SenderConfig::new(
            "h",
            "127.0.0.1:9".parse().unwrap(),
            ClientTransport::Insecure,
        );
        sc.queue_memory = queue;
        let cancel = tokio_util::sync::CancellationToken::new();
        let (sender, _events) = Sender::start(
            sc,
            vec![DiskSpec {
                disk_id: 1,
                size: SIZE,
                vpg_id: String::new(),
                fencing_generation: 0,
                generation: 1,
            }],
            cancel.clone(),
        )
        .unwrap();
        let s = Splitter::new(1, 1, Some(sender), Arc::clone(&tracker));
        // seq → regions written by that record.
        let mut written: Vec<(u64, Vec<u64>)> = Vec::new();
        let mut acked = 0u64;
        let mut must_stay: BTreeSet<u64> = BTreeSet::new();
        if dirty_at_start {
            must_stay.insert(0);
        }
        let data = vec![7u8; 300 * 512];
        for op in ops {
            match op {
                Op::Write { offset, len } | Op::Zero { offset, len } => {
                    tracker.mark(offset, len).unwrap();
                    let before = s.last_seq();
                    if matches!(op, Op::Write { .. }) {
                        s.accept(&WriteEvent::Write {
                            offset,
                            data: &data[..len as usize],
                            fua: false,
                        });
                    } else {
                        s.accept(&WriteEvent::Zeroes { offset, len });
                    }
                    prop_assert_eq!(s.last_seq(), before + 1);
                    written.push((s.last_seq(), regions(offset, len).collect()));
                }
                Op::Checkpoint => {
                    let placed = s.insert_checkpoint(9, 1, None, 0);
                    prop_assert_eq!(placed.queued, !s.is_bitmap_only());
                }
                Op::Ack(n) => {
                    let Some(&(seq, _)) = written.get(n.min(written.len().saturating_sub(1)))
                    else {
                        continue;
                    };
                    // Only a record actually queued can be acknowledged.
                    if s.is_bitmap_only() || seq <= acked {
                        continue;
                    }
                    acked = seq;
                    for (off, len) in s.on_acked(seq) {
                        tracker.clear_range(off, len);
                    }
                }
            }
            // Not acknowledged (queued or dropped) ⇒ dirty.
            let bitmap = tracker.bitmap();
            for (seq, rs) in &written {
                if *seq > acked {
                    for r in rs {
                        prop_assert!(bitmap.is_dirty(*r), "region {r} of seq {seq} not dirty");
                    }
                }
            }
            for r in &must_stay {
                prop_assert!(bitmap.is_dirty(*r), "region {r} dirty at start was cleared");
            }
            // What a sync decision is told: the owed regions, never those merely in
            // flight (a busy disk always has some).
            if s.owes_sync() {
                prop_assert_eq!(s.owed_regions(), bitmap.dirty_count());
            } else {
                prop_assert_eq!(s.owed_regions(), 0);
            }
            if !dirty_at_start && !s.dropped_since_sync() {
                prop_assert!(!s.owes_sync(), "nothing dropped, nothing dirty at start");
            }
        }
        if !s.owes_sync() {
            if let Some(&(last, _)) = written.last() {
                for (off, len) in s.on_acked(last) {
                    tracker.clear_range(off, len);
                }
                prop_assert_eq!(
                    tracker.bitmap().dirty_count(),
                    0,
                    "all acknowledged, bitmap not empty"
                );
            }
        }
        cancel.cancel();
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn acknowledged_regions_clear_and_nothing_else_does(ops in prop::collection::vec(op(), 1..80)) {
            run(ops, 64 << 20, false)?;
        }

        #[test]
        fn overflow_keeps_every_dropped_region_dirty(ops in prop::collection::vec(op(), 1..80)) {
            run(ops, 40 << 10, false)?;
        }

        #[test]
        fn regions_dirty_at_start_wait_for_a_sync(ops in prop::collection::vec(op(), 1..40)) {
            run(ops, 64 << 20, true)?;
        }
    }

    #[derive(Debug, Clone)]
    enum SyncOp {
        /// A guest write of `len` bytes at `offset`.
        Guest { offset: u64, len: u64 },
        /// The pass handles its next region: queues it (or finds it equal) and moves on.
        Step { equal: bool },
        /// Acknowledge everything queued so far.
        AckAll,
    }

    fn sync_op() -> impl Strategy<Value = SyncOp> {
        prop_oneof![
            3 => (0..SIZE / 512, 1u64..300).prop_map(|(s, n)| {
                let offset = s * 512;
                SyncOp::Guest { offset, len: (n * 512).min(SIZE - offset) }
            }),
            4 => any::<bool>().prop_map(|equal| SyncOp::Step { equal }),
            1 => Just(SyncOp::AckAll),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A sync pass over regions owed at its start, with guest writes and acks
        /// interleaved: a region the pass has not reached stays dirty, a region with an
        /// unacknowledged record stays dirty, and once the pass ends and everything is
        /// acknowledged the bitmap is empty.
        #[test]
        fn a_sync_pass_clears_only_behind_its_cursor(
            owed in prop::collection::btree_set(0..ODD_SIZE.div_ceil(REGION), 1..20),
            ops in prop::collection::vec(sync_op(), 1..120),
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            let _guard = rt.enter();
            let dir = tempfile::tempdir().unwrap();
            let (tracker, _) = DirtyTracker::open(
                DirtyPaths::in_dir(dir.path(), "d"), ODD_SIZE, DirtyConfig::default()).unwrap();
            for r in &owed {
                tracker.mark(r * REGION, 1).unwrap();
            }
            let tracker = Arc::new(tracker);
            let mut sc = SenderConfig::new("h", "127.0.0.1:9".parse().unwrap(), ClientTransport::Insecure);
            sc.queue_memory = 256 << 20;
            let cancel = tokio_util::sync::CancellationToken::new();
            let (sender, _events) = Sender::start(
                sc, vec![DiskSpec { disk_id: 1, size: ODD_SIZE, generation: 1, vpg_id: String::new(), fencing_generation: 0 }], cancel.clone()).unwrap();
            let s = Splitter::new(1, 1, Some(sender), Arc::clone(&tracker));
            prop_assert!(s.owes_sync());
            s.begin_sync(0).unwrap();
            let data = vec![5u8; 300 * 512];
            // seq → regions; the pass position (region index).
            let mut written: Vec<(u64, Vec<u64>)> = Vec::new();
            let mut acked = 0u64;
            let mut next = 0u64;
            let regions_total = ODD_SIZE.div_ceil(REGION);
            let clear = |ranges: Vec<(u64, u64)>| {
                for (o, l) in ranges { tracker.clear_range(o, l); }
            };
            for op in ops.into_iter().chain(std::iter::repeat_n(SyncOp::Step { equal: false }, regions_total as usize)).chain([SyncOp::AckAll]) {
                match op {
                    SyncOp::Guest { offset, len } => {
                        tracker.mark(offset, len).unwrap();
                        s.accept(&WriteEvent::Write { offset, data: &data[..len as usize], fua: false });
                        written.push((s.last_seq(), regions(offset, len).collect()));
                    }
                    SyncOp::Step { equal } => {
                        if next >= regions_total { continue; }
                        let r = next;
                        if owed.contains(&r) && !equal {
                            let queued = s.push_sync(RecordBody::Write { offset: r * REGION, data: vec![1; REGION as usize] });
                            prop_assert!(queued);
                            written.push((s.last_seq(), vec![r]));
                        }
                        next += 1;
                        clear(s.sync_progress(next * REGION));
                    }
                    SyncOp::AckAll => {
                        let last = s.last_seq();
                        if last > acked {
                            acked = last;
                            clear(s.on_acked(last));
                        }
                    }
                }
                let bitmap = tracker.bitmap();
                for r in &owed {
                    if *r >= next {
                        prop_assert!(bitmap.is_dirty(*r), "owed region {r} cleared before the pass reached it");
                    }
                }
                for (seq, rs) in &written {
                    if *seq > acked {
                        for r in rs {
                            prop_assert!(bitmap.is_dirty(*r), "region {r} of unacknowledged seq {seq} clean");
                        }
                    }
                }
            }
            s.finish_sync();
            prop_assert!(!s.owes_sync());
            prop_assert_eq!(tracker.bitmap().dirty_count(), 0, "everything passed and acknowledged");
            cancel.cancel();
        }
    }

    #[test]
    fn a_journal_refusal_is_remembered_until_a_sync_that_began_after_it_completes() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let (tracker, _) = DirtyTracker::open(
            DirtyPaths::in_dir(dir.path(), "d"),
            SIZE,
            DirtyConfig::default(),
        )
        .unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let (sender, _events) = Sender::start(
            SenderConfig::new(
                "h",
                "127.0.0.1:9".parse().unwrap(),
                ClientTransport::Insecure,
            ),
            vec![DiskSpec {
                disk_id: 1,
                size: SIZE,
                vpg_id: String::new(),
                fencing_generation: 0,
                generation: 1,
            }],
            cancel.clone(),
        )
        .unwrap();
        let s = Splitter::new(1, 1, Some(sender), Arc::new(tracker));
        assert!(!s.journal_refused_since_sync());
        // A pass begins, the journal refuses the disk before the pass's end is recorded:
        // the refusal outlives that pass (drops after it are the error's doing).
        s.begin_sync(0).unwrap();
        s.on_journal_refused();
        s.finish_sync();
        assert!(s.journal_refused_since_sync());
        // A pass that began after the refusal clears it when it completes.
        s.begin_sync(0).unwrap();
        s.finish_sync();
        assert!(!s.journal_refused_since_sync());
        cancel.cancel();
    }

    #[test]
    fn large_writes_are_split_and_sequenced() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = rt.enter();
        let dir = tempfile::tempdir().unwrap();
        let size = 32u64 << 20;
        let (tracker, _) = DirtyTracker::open(
            DirtyPaths::in_dir(dir.path(), "d"),
            size,
            DirtyConfig::default(),
        )
        .unwrap();
        let tracker = Arc::new(tracker);
        let cancel = tokio_util::sync::CancellationToken::new();
        let (sender, _events) = Sender::start(
            SenderConfig::new(
                "h",
                "127.0.0.1:9".parse().unwrap(),
                ClientTransport::Insecure,
            ),
            vec![DiskSpec {
                disk_id: 3,
                size,
                vpg_id: String::new(),
                fencing_generation: 0,
                generation: 5,
            }],
            cancel.clone(),
        )
        .unwrap();
        let s = Splitter::new(3, 5, Some(sender.clone()), tracker);
        let data = vec![1u8; MAX_RECORD_DATA * 2 + 4096];
        s.accept(&WriteEvent::Write {
            offset: 0,
            data: &data,
            fua: false,
        });
        assert_eq!(s.last_seq(), first_seq(5) + 2, "three records");
        let st = &sender.stats()[0];
        assert_eq!(st.queued_records, 3);
        assert_eq!(st.last_seq, first_seq(5) + 2);
        cancel.cancel();
    }
}
