//! The per-disk write journal kept at the recovery site.
//!
//! Code map:
//! - [`Journal`] (this file): open and recovery, append, group commit (the appender's
//!   side: buffering, sync requests, back-pressure, rotation), checkpoints, stats. One
//!   journal per protected disk, in its own directory.
//! - `sync`: the sync thread that runs every `fdatasync` of the journal's segments and
//!   owns the durable seq; [`Durability`] is the handle other threads wait on.
//! - `format`: the on-disk encodings (record, segment header, state file, scratch map).
//! - `segment`: segment files, the sequential record reader, torn-tail analysis.
//! - `index`: the multi-version extent index that makes opening a view O(1).
//! - [`View`] (`view`): a point-in-time disk with a writable scratch layer.
//! - `promote`: promotion, retention, commit, rollback and their redo after a crash.
//! - [`bench`](mod@bench): the `bulwark bench journal` benchmark.
//!
//! Directory layout: `XXXXXXXX.seg` segment files (hex id, ascending = older), the
//! crash-safe `journal.state` (what the replica holds, and the promotion or commit in
//! flight), `scratch/` for the scratch layers of open views. The replica disk is a file
//! elsewhere, named by the caller.
//!
//! Why per disk and not per VPG: sequence numbers are per disk, the replica and its
//! promotion are per disk, and a damaged journal then costs one disk a sync instead of
//! the whole group. Group commit still amortises `fdatasync` over every record a disk
//! received since the last sync; the agent syncs the disks of a VPG in parallel.
//!
//! Group commit is pipelined. `append` encodes records into a buffer that is handed to
//! the kernel (`pwrite`) every `write_buffer` bytes. [`Journal::request_sync`] hands
//! over what is buffered and queues "sync the active segment up to here, which makes
//! seq S durable" for the journal's sync thread, and returns S at once; appends go on
//! into the page cache while the device writes back, which is what lets ingest run at
//! the speed of a plain sequential write. The replication receiver appends, requests a
//! sync per batch, and acknowledges from another thread what [`Durability`] reports
//! ([`Durability::wait_durable`] with a timeout, or the one-load
//! [`Durability::durable_seq`]). [`Journal::sync`] is the blocking form. A request not
//! yet started is merged with the next one for the same segment, so a slow device gets
//! bigger groups rather than a longer queue; [`JournalConfig::max_unsynced`] bounds how
//! far appends may run ahead of the disk (back-pressure in `append`).
//!
//! Durability, precisely: the durable seq D only ever advances when an `fdatasync` (and
//! the directory fsync, if a segment was created since the last one) returned success,
//! and then exactly to the seq of the request it served; every byte of every record up
//! to that seq had been handed to the kernel before the request was queued, so before
//! that call started. D never moves backwards and never moves on a failure. A sync
//! failure on the thread closes the journal as a write failure does: every later call
//! and every waiter gets `Closed`, and the journal must be reopened (recovery keeps
//! whatever made it to disk, which may be more than D). Each record header carries D as
//! of its append (the durable hint recovery uses to tell a torn tail from lost data).
//!
//! Rotation: a segment is made wholly durable (through the thread, the appender
//! waiting) before the next one is created, so after a crash only the last segment can
//! have a torn tail; the new segment's directory entry is fsynced with the first sync
//! of it, before any of its records counts as durable. This wait is the pipeline's one
//! stall, once per segment, while the device is busy with that segment anyway.
//!
//! Invariants:
//! 1. Records in the segments have strictly increasing seq; segments hold whole records.
//! 2. Every record with seq ≤ `promoted_seq` is in the replica, and the replica holds
//!    nothing newer than `promoted_seq` except during a commit recorded in the state.
//! 3. Nothing is applied to the replica before an intent naming it is durable in the
//!    state file; segments are deleted oldest first, only once the state file says their
//!    records are promoted. So any crash leaves a state that `open` finishes (redo).
//! 4. Only records that were durable (fsynced) are ever promoted; only durable
//!    checkpoints are offered for views. Both read D once, and D only grows.
//! 5. No view exists at a checkpoint older than the promotion floor, and promotion never
//!    passes the oldest open view (`Pins`).
//! 6. Every segment but the last is wholly durable.
//!
//! Thread-safety: [`Journal`] is `Send`; every mutating call takes `&mut self` (the agent
//! owns it on one thread, or behind a mutex). Each journal has one sync thread, started
//! by `open` and stopped and joined when the journal is dropped (a sync in progress is
//! waited for; queued ones are abandoned, as in a crash: [`Journal::close`] syncs first).
//! The thread shares with the journal only the request queue and the durable seq (one
//! mutex, never held during I/O, and an atomic mirror for lock-free reads), and `Arc`s
//! of the segment files it syncs. [`Durability`] handles are `Send + Sync`, outlive the
//! journal harmlessly, and never block appends. [`View`] is `Send + Sync` and independent
//! of the `Journal` borrow: views read (and write their scratch) from any thread while
//! the journal appends and promotes. They share the index and the segment handles under
//! one `RwLock` held only to resolve a read, never during I/O.

pub mod bench;
mod error;
mod format;
mod index;
mod promote;
mod segment;
mod sync;
mod view;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

pub use error::JournalError;
pub use format::{MAX_TAG_LEN, MAX_WRITE_LEN};
pub use index::IndexMemory;
pub use promote::{CommitReport, PromotePolicy, PromoteReport};
pub use sync::Durability;
pub use view::View;

use error::{io_at, io_err};
use format::{
    encode_checkpoint, encode_segment_header, Header, Intent, Kind, StateFile, FLAG_COMPRESSED,
    HEADER_LEN, SEGMENT_HEADER_LEN,
};
use index::{Index, Loc};
use segment::{find_durable_after, list_segments, segment_path, Next, RecordReader};
use sync::{DurablePos, SyncReq, Syncer};

type Result<T, E = JournalError> = std::result::Result<T, E>;

pub(crate) const STATE_FILE: &str = "journal.state";
pub(crate) const SCRATCH_DIR: &str = "scratch";
/// How many promoted-away checkpoint ids are remembered to answer
/// `CheckpointNotRetained` instead of `UnknownCheckpoint`.
const RETIRED_IDS: usize = 100_000;
/// The id of a view opened by [`Journal::open_head`].
pub const HEAD_VIEW_ID: u64 = u64::MAX;

/// Kind of a checkpoint, as the manager chose it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CheckpointKind {
    Scheduled = 1,
    UserTagged = 2,
    AppConsistent = 3,
}

impl CheckpointKind {
    fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Scheduled),
            2 => Some(Self::UserTagged),
            3 => Some(Self::AppConsistent),
            _ => None,
        }
    }
}

/// A checkpoint as the journal knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointInfo {
    /// Chosen by the manager; unique per journal.
    pub id: u64,
    /// Sequence number of the marker in this disk's stream.
    pub seq: u64,
    /// Wall time of the checkpoint, unix ms.
    pub wall_ms: i64,
    pub kind: CheckpointKind,
    pub tag: Option<String>,
}

/// What a record does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordBody<'a> {
    Write {
        offset: u64,
        data: &'a [u8],
    },
    /// WRITE_ZEROES: reads as zeros.
    Zero {
        offset: u64,
        len: u64,
    },
    /// TRIM: reads as zeros too (the disk model treats discarded ranges as zeros).
    Trim {
        offset: u64,
        len: u64,
    },
    /// A checkpoint marker; its wall time is the record's timestamp.
    Checkpoint {
        id: u64,
        kind: CheckpointKind,
        tag: Option<&'a str>,
    },
}

/// One record of the replication stream, as the receiver hands it to the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Assigned by the protected side; strictly increasing per disk.
    pub seq: u64,
    /// Unix ms when the write happened (for checkpoints: the checkpoint's wall time).
    pub timestamp_ms: i64,
    pub body: RecordBody<'a>,
}

impl<'a> Record<'a> {
    pub fn write(seq: u64, timestamp_ms: i64, offset: u64, data: &'a [u8]) -> Self {
        Record {
            seq,
            timestamp_ms,
            body: RecordBody::Write { offset, data },
        }
    }
    pub fn zero(seq: u64, timestamp_ms: i64, offset: u64, len: u64) -> Self {
        Record {
            seq,
            timestamp_ms,
            body: RecordBody::Zero { offset, len },
        }
    }
    pub fn trim(seq: u64, timestamp_ms: i64, offset: u64, len: u64) -> Self {
        Record {
            seq,
            timestamp_ms,
            body: RecordBody::Trim { offset, len },
        }
    }
    pub fn checkpoint(
        seq: u64,
        wall_ms: i64,
        id: u64,
        kind: CheckpointKind,
        tag: Option<&'a str>,
    ) -> Self {
        Record {
            seq,
            timestamp_ms: wall_ms,
            body: RecordBody::Checkpoint { id, kind, tag },
        }
    }
}

/// What `append` did with a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Buffered; durable once a sync requested after it completes.
    Accepted,
    /// Its seq was already taken (a resend after a reconnect): ignored, idempotently.
    Duplicate,
}

/// Each step boundary of promotion and commit, for fault injection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    PromoteIntentWritten,
    /// After each record applied to the replica (promotion or commit).
    RecordApplied,
    PromoteApplied,
    PromoteReplicaSynced,
    PromoteStateWritten,
    /// After each segment file deleted (promotion or commit).
    SegmentDeleted,
    CommitScratchPersisted,
    CommitIntentWritten,
    CommitApplied,
    CommitScratchApplied,
    CommitReplicaSynced,
    CommitCleanWritten,
    CommitSegmentsDeleted,
    CommitStateWritten,
    /// On the sync thread, before each `fdatasync` of a segment (by id): an error fails
    /// that sync exactly as an `fdatasync` error would (the journal closes, the durable
    /// seq stays). A hook may also block here to hold the thread back (tests of the
    /// pipeline); it must let go once [`FaultPoint::SyncWait`] was seen.
    SegmentSync {
        segment: u32,
    },
    /// On the sync thread, after that `fdatasync` returned and before the durable seq
    /// moves: an error discards the sync as a failed `fdatasync`. Holding the thread
    /// here lets a test append and request while a sync is "in the device".
    SegmentSynced {
        segment: u32,
    },
    /// A caller is about to block until the sync thread makes progress (`sync`,
    /// segment rotation, back-pressure, a commit waiting for syncs in flight). Only
    /// reached when the wait is real.
    SyncWait,
}

/// Called at every [`FaultPoint`]; an error stops the operation on the spot, as if the
/// process had died there (the journal is then closed and must be reopened).
pub type FaultHook = Arc<dyn Fn(FaultPoint) -> Result<(), JournalError> + Send + Sync>;

/// How a journal is laid out and tuned.
#[derive(Clone)]
pub struct JournalConfig {
    /// Written into every record and segment; a file of another disk is refused.
    pub disk_id: u64,
    /// Size of the protected disk in bytes.
    pub disk_size: u64,
    /// A segment is closed once it reaches this size (default 64 MiB).
    pub segment_size: u64,
    /// Appended bytes are handed to the kernel once this many are buffered (default 4 MiB).
    pub write_buffer: usize,
    /// Back-pressure: `append` blocks while more than this many bytes handed to the
    /// kernel are not yet durable (default 16 MiB), and asks for a sync by itself once
    /// half of it is written and not asked for. This bounds how far appends run ahead
    /// of the disk, hence the append → durable latency (about this many bytes at disk
    /// speed) and the dirty page cache, when the caller asks for syncs without waiting
    /// for them; it also means a sync at least every `max_unsynced / 2` bytes whatever
    /// the caller's cadence. 0: no bound, syncs only when asked.
    pub max_unsynced: u64,
    /// zstd level for write payloads (`None`: store as received; compression is slower
    /// than the disk here, see DESIGN §11).
    pub compress_level: Option<i32>,
    /// log2 of the index chunk (default 20 = 1 MiB). Tuning; tests use small chunks.
    pub index_chunk_shift: u32,
    /// Fewest record pieces between two index marks of a chunk (default 32).
    pub index_mark_min: usize,
    /// Test hook, see [`FaultPoint`].
    pub fault: Option<FaultHook>,
}

impl std::fmt::Debug for JournalConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournalConfig")
            .field("disk_id", &self.disk_id)
            .field("disk_size", &self.disk_size)
            .field("segment_size", &self.segment_size)
            .field("write_buffer", &self.write_buffer)
            .field("max_unsynced", &self.max_unsynced)
            .field("compress_level", &self.compress_level)
            .field("index_chunk_shift", &self.index_chunk_shift)
            .field("index_mark_min", &self.index_mark_min)
            .field("fault", &self.fault.is_some())
            .finish()
    }
}

impl JournalConfig {
    pub fn new(disk_id: u64, disk_size: u64) -> Self {
        JournalConfig {
            disk_id,
            disk_size,
            segment_size: 64 << 20,
            write_buffer: 4 << 20,
            max_unsynced: 16 << 20,
            compress_level: None,
            index_chunk_shift: 20,
            index_mark_min: 32,
            fault: None,
        }
    }

    fn validate(&self) -> Result<()> {
        if self.disk_size == 0 {
            return Err(JournalError::Config("disk size is zero".into()));
        }
        if self.segment_size < 4096 {
            return Err(JournalError::Config("segment size below 4 KiB".into()));
        }
        if !(9..=30).contains(&self.index_chunk_shift) {
            return Err(JournalError::Config(
                "index chunk shift outside 9..=30".into(),
            ));
        }
        if (self.disk_size >> self.index_chunk_shift) > (1 << 28) {
            return Err(JournalError::Config(
                "index chunk too small for this disk".into(),
            ));
        }
        Ok(())
    }
}

/// Figures for the manager.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalStats {
    pub disk_id: u64,
    /// Oldest recoverable checkpoint (the replica is at it once promotion reached it).
    pub oldest_checkpoint: Option<CheckpointInfo>,
    /// Newest durable checkpoint.
    pub newest_checkpoint: Option<CheckpointInfo>,
    /// Newest minus oldest checkpoint wall time: the journal history actually kept.
    pub history_span_ms: i64,
    pub checkpoints: usize,
    /// Bytes of segment files, buffered bytes included.
    pub bytes_used: u64,
    pub segments: usize,
    /// Records in the journal not yet promoted (checkpoint markers included).
    pub records: u64,
    pub last_seq: u64,
    /// What the agent may acknowledge to the protected side.
    pub durable_seq: u64,
    pub promoted_seq: u64,
    /// As of the last `promote`: how far the history window's target is ahead of what is
    /// promoted (non-zero when an open view holds promotion back).
    pub promote_lag_ms: i64,
    pub promote_lag_bytes: u64,
    /// As of the last `promote`: the hard limit forced promotion past the window.
    pub history_short: bool,
    /// As of the last `promote`: bytes used at or above the warning threshold.
    pub size_warning: bool,
    /// As of the last `promote`: still above the hard limit (an open view, or too few
    /// checkpoints, kept promotion from freeing enough).
    pub over_hard_limit: bool,
    pub open_views: usize,
    pub index: IndexMemory,
    /// The segment appends go to (file `{id:08x}.seg`) and its length, buffered bytes
    /// included: the end of the newest record.
    pub active_segment: u32,
    pub active_segment_bytes: u64,
}

/// The part views share with the journal.
pub(crate) struct Shared {
    pub(crate) dir: PathBuf,
    pub(crate) disk_size: u64,
    pub(crate) replica: File,
    pub(crate) replica_path: PathBuf,
    pub(crate) read: RwLock<ReadSide>,
    pub(crate) pins: Mutex<Pins>,
    pub(crate) next_view: AtomicU64,
}

pub(crate) struct ReadSide {
    pub(crate) index: Index,
    /// Read handles of live segments. A view clones the handle it needs, so a segment
    /// deleted under it stays readable until the read ends.
    pub(crate) segs: HashMap<u32, Arc<File>>,
}

#[derive(Default)]
pub(crate) struct Pins {
    /// Open views per checkpoint seq.
    pub(crate) by_seq: BTreeMap<u64, usize>,
    /// Promotion may have touched records up to here: no view may open below it.
    pub(crate) floor: u64,
}

impl Shared {
    pub(crate) fn read_side(&self) -> RwLockReadGuard<'_, ReadSide> {
        // A panic while holding the lock cannot leave the index half-updated in a way
        // that breaks memory safety; keep serving rather than cascade panics.
        self.read.read().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn write_side(&self) -> RwLockWriteGuard<'_, ReadSide> {
        self.read.write().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn pins(&self) -> MutexGuard<'_, Pins> {
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
    }
}

pub(crate) struct SegMeta {
    pub(crate) id: u32,
    pub(crate) file: Arc<File>,
    /// Bytes, including any still in the write buffer (active segment).
    pub(crate) len: u64,
    /// 0 when the segment holds no record.
    pub(crate) first_seq: u64,
    pub(crate) last_seq: u64,
    pub(crate) records: u64,
}

pub(crate) struct CkptEntry {
    pub(crate) info: CheckpointInfo,
    /// `Journal::log_bytes` right after the marker: bytes of history up to it.
    pub(crate) log_at: u64,
}

/// The journal of one protected disk. See the module documentation.
pub struct Journal {
    pub(crate) shared: Arc<Shared>,
    pub(crate) cfg: JournalConfig,
    /// Oldest first; the last one is the active segment appends go to.
    pub(crate) segs: Vec<SegMeta>,
    pub(crate) next_seg: u32,
    /// Encoded records not yet handed to the kernel; they belong at `buf_pos` in the
    /// active segment.
    pub(crate) buf: Vec<u8>,
    pub(crate) buf_pos: u64,
    pub(crate) last_seq: u64,
    /// Highest seq a sync was requested for (queued or done), and the segment and
    /// length that request covers.
    pub(crate) requested_seq: u64,
    pub(crate) requested_at: (u32, u64),
    /// Runs the `fdatasync`s and owns the durable seq. Declared after everything else it
    /// could touch so that dropping the journal stops it before files are closed (they
    /// are `Arc`s anyway).
    pub(crate) syncer: Syncer,
    pub(crate) seq_floor: u64,
    pub(crate) promoted_seq: u64,
    /// The checkpoint the replica is at, once promotion or a commit reached one.
    pub(crate) base: Option<CheckpointInfo>,
    pub(crate) ckpts: BTreeMap<u64, CkptEntry>,
    pub(crate) ckpt_ids: HashMap<u64, u64>,
    pub(crate) retired: HashSet<u64>,
    pub(crate) retired_order: VecDeque<u64>,
    pub(crate) records: u64,
    /// Bytes of records appended since open beyond the promoted point (a clock for
    /// history size; only differences matter).
    pub(crate) log_bytes: u64,
    pub(crate) dir_dirty: bool,
    pub(crate) failed: Option<String>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    cbuf: Vec<u8>,
    pbuf: Vec<u8>,
    /// Reused by segment scans and promotion.
    pub(crate) rbuf: Vec<u8>,
    pub(crate) dbuf: Vec<u8>,
    pub(crate) last_promote: Option<(PromotePolicy, PromoteReport)>,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("dir", &self.shared.dir)
            .field("disk_id", &self.cfg.disk_id)
            .field("last_seq", &self.last_seq)
            .field("durable_seq", &self.durable_seq())
            .field("promoted_seq", &self.promoted_seq)
            .finish_non_exhaustive()
    }
}

/// Writes `name` in `dir` so that after a crash it holds either the old or the new bytes:
/// temp file, fsync, rename, fsync of the directory.
pub(crate) fn write_file_durably(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    crate::agent::crashsafe::write_atomically(&dir.join(name), bytes)
        .map_err(|e| io_at(e.op, &e.path, e.source))
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_at("fsync directory", dir, e))
}

fn read_state(dir: &Path, disk: u64) -> Result<StateFile> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(b) => StateFile::decode(&b).map_err(|r| JournalError::corrupt(&path, 0, r)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StateFile {
            disk,
            promoted_seq: 0,
            seq_floor: 0,
            base: None,
            intent: Intent::None,
        }),
        Err(e) => Err(io_at("read", &path, e)),
    }
}

impl Journal {
    /// Opens (or creates) the journal in `dir` for the replica disk at `replica_path`
    /// (created, sparse, if missing; extended to the disk size if shorter).
    ///
    /// Recovery: every segment is scanned once and its CRCs checked; a torn tail of the
    /// last segment is cut at the last valid record; damage anywhere else, or damage in
    /// the last segment followed by a record that says it was durable, is
    /// `JournalError::Corrupt`. A promotion or commit the state file says was in flight is
    /// then finished before anything else. Scratch layers of views do not survive.
    pub fn open(
        dir: impl AsRef<Path>,
        replica_path: impl AsRef<Path>,
        cfg: JournalConfig,
    ) -> Result<Journal> {
        cfg.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let scratch = dir.join(SCRATCH_DIR);
        std::fs::create_dir_all(&scratch).map_err(|e| io_at("create", &scratch, e))?;
        let replica_path = replica_path.as_ref().to_path_buf();
        let replica = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&replica_path)
            .map_err(|e| io_at("open replica", &replica_path, e))?;
        let meta = replica
            .metadata()
            .map_err(|e| io_at("stat replica", &replica_path, e))?;
        if meta.is_file() && meta.len() < cfg.disk_size {
            replica
                .set_len(cfg.disk_size)
                .map_err(|e| io_at("extend replica", &replica_path, e))?;
        }
        let state = read_state(&dir, cfg.disk_id)?;
        if state.disk != cfg.disk_id {
            return Err(JournalError::Config(format!(
                "{} belongs to disk {}, not {}",
                dir.display(),
                state.disk,
                cfg.disk_id
            )));
        }
        let shared = Arc::new(Shared {
            dir: dir.clone(),
            disk_size: cfg.disk_size,
            replica,
            replica_path,
            read: RwLock::new(ReadSide {
                index: Index::new(cfg.disk_size, cfg.index_chunk_shift, cfg.index_mark_min),
                segs: HashMap::new(),
            }),
            pins: Mutex::new(Pins::default()),
            next_view: AtomicU64::new(1),
        });
        let compressor = match cfg.compress_level {
            Some(level) => {
                Some(zstd::bulk::Compressor::new(level).map_err(io_err("create zstd compressor"))?)
            }
            None => None,
        };
        let syncer = Syncer::start(dir.clone(), cfg.fault.clone())?;
        let mut j = Journal {
            shared,
            cfg,
            segs: Vec::new(),
            next_seg: 1,
            buf: Vec::new(),
            buf_pos: 0,
            last_seq: 0,
            requested_seq: 0,
            requested_at: (0, 0),
            syncer,
            seq_floor: state.seq_floor,
            promoted_seq: state.promoted_seq,
            base: state.base.clone(),
            ckpts: BTreeMap::new(),
            ckpt_ids: HashMap::new(),
            retired: HashSet::new(),
            retired_order: VecDeque::new(),
            records: 0,
            log_bytes: 0,
            dir_dirty: false,
            failed: None,
            compressor,
            cbuf: Vec::new(),
            pbuf: Vec::new(),
            rbuf: Vec::new(),
            dbuf: Vec::new(),
            last_promote: None,
        };
        j.shared.pins().floor = state.promoted_seq;
        j.load(&state)?;
        let r = j.redo(&state);
        j.guard(r)?;
        j.clean_scratch_dir()?;
        let r = j.drop_promoted_segments();
        j.guard(r)?;
        if j.segs.is_empty() {
            let r = j.create_segment();
            j.guard(r)?;
        }
        // What survived the crash may sit in the page cache only: make it durable before
        // saying so.
        let r = j.sync_active_and_dir();
        j.guard(r)?;
        j.force_durable();
        Ok(j)
    }

    /// Scans every segment, cuts a torn tail, rebuilds the index and checkpoints.
    pub(crate) fn load(&mut self, state: &StateFile) -> Result<()> {
        self.segs.clear();
        self.ckpts.clear();
        self.ckpt_ids.clear();
        self.records = 0;
        self.log_bytes = 0;
        self.promoted_seq = state.promoted_seq;
        self.seq_floor = state.seq_floor;
        self.base = state.base.clone();
        self.buf.clear();
        {
            let mut rs = self.shared.write_side();
            rs.index.clear();
            rs.segs.clear();
        }
        if let Some(base) = &state.base {
            self.insert_ckpt(base.clone(), 0);
        }
        let dir = self.shared.dir.clone();
        let ids = list_segments(&dir)?;
        let mut last_seq = 0u64;
        let mut rbuf = std::mem::take(&mut self.rbuf);
        for (i, &id) in ids.iter().enumerate() {
            self.next_seg = self.next_seg.max(id.saturating_add(1));
            let is_last = i + 1 == ids.len();
            let path = segment_path(&dir, id);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| io_at("open segment", &path, e))?;
            let len = file
                .metadata()
                .map_err(|e| io_at("stat segment", &path, e))?
                .len();
            let mut hdr = [0u8; SEGMENT_HEADER_LEN];
            let got = segment::read_full_at(&file, &mut hdr, 0)
                .map_err(|e| io_at("read segment", &path, e))?;
            if let Err(reason) = format::check_segment_header(&hdr[..got], self.cfg.disk_id, id) {
                if !is_last {
                    return Err(JournalError::corrupt(&path, 0, reason));
                }
                // Records up to the promoted point (or a commit's floor) need no segment:
                // a durable hint at or below them is no sign of lost data, even when the
                // segments that held them are gone and nothing precedes the damage here.
                let known = last_seq.max(self.promoted_seq).max(self.seq_floor);
                if find_durable_after(&file, &path, 0, len, self.cfg.disk_id, known)?.is_some() {
                    return Err(JournalError::corrupt(&path, 0, reason));
                }
                tracing::warn!(segment = %path.display(), reason, "removing torn journal segment");
                drop(file);
                std::fs::remove_file(&path).map_err(|e| io_at("remove torn segment", &path, e))?;
                self.dir_dirty = true;
                continue;
            }
            let file = Arc::new(file);
            let mut meta = SegMeta {
                id,
                file: file.clone(),
                len,
                first_seq: 0,
                last_seq: 0,
                records: 0,
            };
            let mut reader = RecordReader::new(&file, &path, SEGMENT_HEADER_LEN as u64, len, rbuf);
            let mut cut = None;
            loop {
                match reader.next()? {
                    Next::End => break,
                    Next::Bad { pos, reason } => {
                        cut = Some((pos, reason));
                        break;
                    }
                    Next::Record {
                        pos,
                        header,
                        payload,
                    } => {
                        if header.disk != self.cfg.disk_id {
                            return Err(JournalError::corrupt(
                                &path,
                                pos,
                                "record of another disk",
                            ));
                        }
                        if header.seq <= last_seq {
                            return Err(JournalError::corrupt(
                                &path,
                                pos,
                                "sequence does not increase",
                            ));
                        }
                        last_seq = header.seq;
                        if meta.first_seq == 0 {
                            meta.first_seq = header.seq;
                        }
                        meta.last_seq = header.seq;
                        meta.records += 1;
                        if header.seq >= self.promoted_seq {
                            self.index_record(&header, id, pos, payload)
                                .map_err(|r| JournalError::corrupt(&path, pos, r))?;
                        }
                    }
                }
            }
            rbuf = reader.into_buf();
            if let Some((pos, reason)) = cut {
                if !is_last {
                    return Err(JournalError::corrupt(&path, pos, reason));
                }
                let known = last_seq.max(self.promoted_seq).max(self.seq_floor);
                if let Some(at) =
                    find_durable_after(&file, &path, pos, len, self.cfg.disk_id, known)?
                {
                    return Err(JournalError::corrupt(
                        &path,
                        pos,
                        format!("{reason}; the record at byte {at} says later data was durable"),
                    ));
                }
                tracing::warn!(segment = %path.display(), pos, reason, "cutting torn journal tail");
                file.set_len(pos)
                    .map_err(|e| io_at("truncate torn tail", &path, e))?;
                file.sync_data().map_err(|e| io_at("fdatasync", &path, e))?;
                meta.len = pos;
            }
            self.shared.write_side().segs.insert(id, file);
            self.segs.push(meta);
        }
        self.rbuf = rbuf;
        // Not durable yet: `open` syncs what survived before it says so.
        self.last_seq = last_seq.max(self.promoted_seq).max(self.seq_floor);
        self.buf_pos = self.segs.last().map_or(0, |s| s.len);
        let records = self.records;
        self.shared.write_side().index.set_records(records);
        Ok(())
    }

    /// Adds a record found on disk (or just appended) to the index and checkpoints.
    /// Records at or below the promoted point are in the replica already; only the
    /// checkpoint marker at exactly that point is kept (it is the base).
    fn index_record(
        &mut self,
        h: &Header,
        seg: u32,
        pos: u64,
        payload: &[u8],
    ) -> Result<(), &'static str> {
        if h.seq == self.promoted_seq && h.kind != Kind::Checkpoint {
            return Ok(());
        }
        if h.seq > self.promoted_seq {
            self.records += 1;
            self.log_bytes += format::record_len(h.stored_len);
        }
        match h.kind {
            Kind::Write => self.shared.write_side().index.insert(
                h.seq,
                h.offset,
                h.length,
                Loc::Data {
                    seg,
                    pos,
                    compressed: h.flags & FLAG_COMPRESSED != 0,
                },
            ),
            Kind::Zero | Kind::Trim => {
                self.shared
                    .write_side()
                    .index
                    .insert(h.seq, h.offset, h.length, Loc::Zero)
            }
            Kind::Checkpoint => {
                let info = format::decode_checkpoint(payload, h.seq, h.timestamp)?;
                let at = self.log_bytes;
                self.insert_ckpt(info, at);
            }
        }
        Ok(())
    }

    pub(crate) fn insert_ckpt(&mut self, info: CheckpointInfo, log_at: u64) {
        self.ckpt_ids.insert(info.id, info.seq);
        self.ckpts.insert(info.seq, CkptEntry { info, log_at });
    }

    pub(crate) fn retire_ckpts_below(&mut self, seq: u64) {
        let keep = self.ckpts.split_off(&seq);
        let gone = std::mem::replace(&mut self.ckpts, keep);
        for (_, c) in gone {
            self.ckpt_ids.remove(&c.info.id);
            if self.retired.insert(c.info.id) {
                self.retired_order.push_back(c.info.id);
                if self.retired_order.len() > RETIRED_IDS {
                    if let Some(old) = self.retired_order.pop_front() {
                        self.retired.remove(&old);
                    }
                }
            }
        }
    }

    fn clean_scratch_dir(&self) -> Result<()> {
        let dir = self.shared.dir.join(SCRATCH_DIR);
        let rd = std::fs::read_dir(&dir).map_err(|e| io_at("list", &dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| io_at("list", &dir, e))?;
            let p = ent.path();
            std::fs::remove_file(&p).map_err(|e| io_at("remove stale scratch", &p, e))?;
        }
        Ok(())
    }

    /// `Closed` once anything failed: a write or fsync here, an injected fault, or an
    /// `fdatasync` on the sync thread.
    pub(crate) fn check_ok(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(JournalError::Closed(why.clone())),
            None => match self.syncer.failure() {
                Some(why) => Err(JournalError::Closed(why)),
                None => Ok(()),
            },
        }
    }

    /// Closes the journal on an I/O-level failure: after a failed write or fsync the
    /// kernel's view of the file can no longer be trusted (the "fsyncgate" lesson).
    pub(crate) fn guard<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            if self.failed.is_none() {
                tracing::error!(dir = %self.shared.dir.display(), error = %e, "journal storage error");
                self.failed = Some(e.to_string());
            }
        }
        r
    }

    pub(crate) fn fault(&self, p: FaultPoint) -> Result<()> {
        match &self.cfg.fault {
            Some(h) => h(p),
            None => Ok(()),
        }
    }

    pub(crate) fn create_segment(&mut self) -> Result<()> {
        let id = self.next_seg;
        if id >= 1 << 31 {
            return Err(JournalError::Config("segment ids exhausted".into()));
        }
        let path = segment_path(&self.shared.dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| io_at("create segment", &path, e))?;
        file.write_all_at(&encode_segment_header(self.cfg.disk_id, id), 0)
            .map_err(|e| io_at("write segment header", &path, e))?;
        let file = Arc::new(file);
        self.shared.write_side().segs.insert(id, file.clone());
        self.segs.push(SegMeta {
            id,
            file,
            len: SEGMENT_HEADER_LEN as u64,
            first_seq: 0,
            last_seq: 0,
            records: 0,
        });
        self.next_seg = id + 1;
        self.buf_pos = SEGMENT_HEADER_LEN as u64;
        self.dir_dirty = true;
        Ok(())
    }

    pub(crate) fn flush_buf(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let Some(seg) = self.segs.last() else {
            return Err(JournalError::Closed("no active segment".into()));
        };
        seg.file
            .write_all_at(&self.buf, self.buf_pos)
            .map_err(io_err("write journal segment"))?;
        self.buf_pos += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Syncs on the calling thread, bypassing the sync thread: only for `open`, before
    /// anything was requested of it.
    pub(crate) fn sync_active_and_dir(&mut self) -> Result<()> {
        self.flush_buf()?;
        if let Some(seg) = self.segs.last() {
            seg.file
                .sync_data()
                .map_err(io_err("fdatasync journal segment"))?;
        }
        if self.dir_dirty {
            sync_dir(&self.shared.dir)?;
            self.dir_dirty = false;
        }
        Ok(())
    }

    fn rotate(&mut self) -> Result<()> {
        // The old segment is made durable before the new one exists, so after a crash
        // only the last segment can have a torn tail. This waits for the sync thread (the
        // one stall of the pipeline, once per segment): while it runs the device is busy
        // writing that segment anyway.
        let seq = self.request_sync_inner()?;
        self.syncer.wait(|p| p.seq >= seq)?;
        self.create_segment()
    }

    /// Hands the buffer to the kernel and queues a sync of everything appended.
    fn request_sync_inner(&mut self) -> Result<u64> {
        self.flush_buf()?;
        if self.last_seq > self.requested_seq || self.dir_dirty {
            let Some(seg) = self.segs.last() else {
                return Err(JournalError::Closed("no active segment".into()));
            };
            self.syncer.request(SyncReq {
                seg: seg.id,
                file: seg.file.clone(),
                end: self.buf_pos,
                seq: self.last_seq,
                dir: self.dir_dirty,
            })?;
            self.dir_dirty = false;
            self.requested_seq = self.last_seq;
            self.requested_at = (seg.id, self.buf_pos);
        }
        Ok(self.last_seq)
    }

    /// Back-pressure (see [`JournalConfig::max_unsynced`]); called after each buffer
    /// handed to the kernel. Two thresholds make it double-buffered: a sync is requested
    /// on the caller's behalf once half the bound is written and not asked for, so that
    /// by the time the bound is reached the oldest half is already being synced and the
    /// wait is only for it, with the next half queued behind it (the device never
    /// idles). Without the first threshold, a caller asking rarely would hit the bound
    /// with nothing requested and wait for a whole `fdatasync` of it, appends stopped.
    fn throttle(&mut self) -> Result<()> {
        let max = self.cfg.max_unsynced;
        let Some(seg) = self.segs.last().map(|s| s.id) else {
            return Ok(());
        };
        if max == 0 {
            return Ok(());
        }
        // Bytes of the active segment below this are covered: nothing before the
        // segment header is ever unsynced.
        let covered = |p: (u32, u64)| {
            if p.0 == seg {
                p.1
            } else {
                SEGMENT_HEADER_LEN as u64
            }
        };
        if self.buf_pos.saturating_sub(covered(self.requested_at)) >= max / 2 {
            self.request_sync_inner()?;
        }
        let d = self.syncer.durable_pos();
        if self.buf_pos.saturating_sub(covered((d.seg, d.end))) <= max {
            return Ok(());
        }
        // Reachable: everything below `buf_pos - max / 2` is requested (above), and
        // requests complete in order.
        let want = self.buf_pos - max;
        self.syncer.wait(|p| p.seg == seg && p.end >= want)?;
        Ok(())
    }

    /// Marks everything appended as durable: `open` and `commit` synced it themselves,
    /// with no request in flight.
    pub(crate) fn force_durable(&mut self) {
        let seg = self.segs.last().map_or(0, |s| s.id);
        self.requested_seq = self.last_seq;
        self.requested_at = (seg, self.buf_pos);
        self.syncer.force(DurablePos {
            seq: self.last_seq,
            seg,
            end: self.buf_pos,
        });
    }

    /// Buffers one record; it is durable once a sync requested after it completed
    /// ([`Journal::request_sync`], [`Journal::sync`], or one the journal makes itself at
    /// rotation or under back-pressure). A record whose seq is not above every seq seen
    /// so far is a resend and is ignored: `Appended::Duplicate`. May block: at segment
    /// rotation (until the old segment is durable) and under back-pressure
    /// ([`JournalConfig::max_unsynced`]).
    pub fn append(&mut self, rec: Record<'_>) -> Result<Appended> {
        self.check_ok()?;
        if rec.seq <= self.last_seq.max(self.seq_floor) {
            return Ok(Appended::Duplicate);
        }
        let invalid = |reason: &str| JournalError::InvalidRecord {
            seq: rec.seq,
            reason: reason.to_string(),
        };
        let in_disk = |offset: u64, len: u64| {
            offset
                .checked_add(len)
                .is_some_and(|e| e <= self.cfg.disk_size)
        };
        let mut flags = 0u8;
        let (kind, offset, length, payload): (Kind, u64, u64, &[u8]) = match rec.body {
            RecordBody::Write { offset, data } => {
                let len = data.len() as u64;
                if len == 0 || len > MAX_WRITE_LEN {
                    return Err(invalid("write length must be 1..=4 GiB-1"));
                }
                if !in_disk(offset, len) {
                    return Err(invalid("write outside the disk"));
                }
                let payload = match self.compressor.as_mut() {
                    Some(c) if data.len() >= 512 => {
                        self.cbuf.clear();
                        self.cbuf
                            .reserve(zstd::zstd_safe::compress_bound(data.len()));
                        match c.compress_to_buffer(data, &mut self.cbuf) {
                            // Only worth it if it saves an eighth.
                            Ok(n) if n < data.len() - data.len() / 8 => {
                                flags = FLAG_COMPRESSED;
                                &self.cbuf[..]
                            }
                            _ => data,
                        }
                    }
                    _ => data,
                };
                (Kind::Write, offset, len, payload)
            }
            RecordBody::Zero { offset, len } | RecordBody::Trim { offset, len } => {
                if len == 0 || !in_disk(offset, len) {
                    return Err(invalid("zero/trim range empty or outside the disk"));
                }
                let kind = if matches!(rec.body, RecordBody::Zero { .. }) {
                    Kind::Zero
                } else {
                    Kind::Trim
                };
                (kind, offset, len, &[][..])
            }
            RecordBody::Checkpoint { id, kind, tag } => {
                if tag.is_some_and(|t| t.len() > MAX_TAG_LEN) {
                    return Err(invalid("checkpoint tag too long"));
                }
                if self.ckpt_ids.contains_key(&id) {
                    return Err(invalid("checkpoint id already in the journal"));
                }
                encode_checkpoint(id, kind, tag, &mut self.pbuf);
                (Kind::Checkpoint, 0, 0, &self.pbuf[..])
            }
        };
        let mut header = Header {
            kind,
            flags,
            seq: rec.seq,
            disk: self.cfg.disk_id,
            offset,
            length,
            timestamp: rec.timestamp_ms,
            durable: self.syncer.durable_seq(),
            stored_len: payload.len() as u32,
            crc: 0,
        };
        let total = format::record_len(header.stored_len);
        let need_rotate = self.segs.last().is_none_or(|s| {
            s.len > SEGMENT_HEADER_LEN as u64 && s.len + total > self.cfg.segment_size
        });
        if need_rotate {
            // `payload` may borrow `cbuf`/`pbuf`, which rotation does not touch; but the
            // borrow checker cannot see that through `&mut self`, so re-encode after.
            return self.append_after_rotate(rec);
        }
        let mut hb = [0u8; HEADER_LEN];
        header.seal(payload, &mut hb);
        let pos = self.buf_pos + self.buf.len() as u64;
        self.buf.extend_from_slice(&hb);
        self.buf.extend_from_slice(payload);
        let pad = (total as usize) - HEADER_LEN - payload.len();
        self.buf.extend_from_slice(&[0u8; 8][..pad]);
        let Some(seg) = self.segs.last_mut() else {
            return Err(JournalError::Closed("no active segment".into()));
        };
        seg.len += total;
        seg.records += 1;
        if seg.first_seq == 0 {
            seg.first_seq = rec.seq;
        }
        seg.last_seq = rec.seq;
        let seg_id = seg.id;
        self.last_seq = rec.seq;
        match rec.body {
            RecordBody::Checkpoint { id, kind, tag } => {
                self.records += 1;
                self.log_bytes += total;
                let info = CheckpointInfo {
                    id,
                    seq: rec.seq,
                    wall_ms: rec.timestamp_ms,
                    kind,
                    tag: tag.map(str::to_string),
                };
                let at = self.log_bytes;
                self.insert_ckpt(info, at);
            }
            _ => {
                self.records += 1;
                self.log_bytes += total;
                let loc = if kind == Kind::Write {
                    Loc::Data {
                        seg: seg_id,
                        pos,
                        compressed: flags & FLAG_COMPRESSED != 0,
                    }
                } else {
                    Loc::Zero
                };
                let mut rs = self.shared.write_side();
                rs.index.insert(rec.seq, offset, length, loc);
                rs.index.set_records(self.records);
            }
        }
        if self.buf.len() >= self.cfg.write_buffer {
            let r = self.flush_buf().and_then(|()| self.throttle());
            self.guard(r)?;
        }
        Ok(Appended::Accepted)
    }

    fn append_after_rotate(&mut self, rec: Record<'_>) -> Result<Appended> {
        let r = self.rotate();
        self.guard(r)?;
        self.append(rec)
    }

    /// Asks for a sync of everything appended so far, without waiting: the buffer is
    /// handed to the kernel and the sync thread will `fdatasync` it (coalesced with any
    /// request it has not started yet). Returns the seq that is durable once that
    /// request completes: the ticket to pass to [`Journal::wait_durable`] (or
    /// [`Durability::wait_durable`]). Appends may go on meanwhile.
    pub fn request_sync(&mut self) -> Result<u64> {
        self.check_ok()?;
        let r = self.request_sync_inner();
        self.guard(r)
    }

    /// Group commit, blocking: hands every buffered record to the kernel and waits until
    /// all of them are durable (one `fdatasync`, plus a directory fsync if a segment was
    /// created, or the sync already in flight and then one more). Returns the highest
    /// durable seq: what the agent acknowledges.
    pub fn sync(&mut self) -> Result<u64> {
        self.check_ok()?;
        let r = self
            .request_sync_inner()
            .and_then(|seq| self.syncer.wait(|p| p.seq >= seq));
        let p = self.guard(r)?;
        Ok(p.seq)
    }

    /// Waits until `seq` is durable or `timeout` passed, and returns the durable seq then
    /// (below `seq` on a timeout). Only waits: a sync covering `seq` must have been
    /// requested. Holding `&self` blocks appends; a receiver that appends on one thread
    /// and acknowledges on another uses [`Journal::durability`] instead.
    pub fn wait_durable(&self, seq: u64, timeout: Duration) -> Result<u64> {
        self.check_ok()?;
        self.syncer.handle().wait_durable(seq, timeout)
    }

    /// A handle on the durable seq for other threads (see [`Durability`]).
    pub fn durability(&self) -> Durability {
        self.syncer.handle()
    }

    /// Syncs and closes (stops the sync thread). Dropping a journal without this loses
    /// what no completed sync covered, exactly as a crash would (it was never
    /// acknowledged): queued sync requests are abandoned, one in progress is waited for.
    pub fn close(mut self) -> Result<u64> {
        self.sync()
    }

    /// Appends every record then syncs once; returns the durable seq.
    pub fn append_all<'a>(&mut self, recs: impl IntoIterator<Item = Record<'a>>) -> Result<u64> {
        for r in recs {
            self.append(r)?;
        }
        self.sync()
    }

    /// Highest seq made durable: every record with seq ≤ it survives a crash. Moves on
    /// its own as the sync thread completes requests. One atomic load.
    pub fn durable_seq(&self) -> u64 {
        self.syncer.durable_seq()
    }

    /// The first failure that closed the journal (a write, an `fdatasync`, an injected
    /// fault), if any: the journal must then be reopened.
    pub fn failure(&self) -> Option<String> {
        self.check_ok().err().map(|e| match e {
            JournalError::Closed(why) => why,
            other => other.to_string(),
        })
    }

    /// Views open on this journal now (a view keeps its checkpoint's records readable).
    pub fn open_views(&self) -> usize {
        self.shared.pins().by_seq.values().sum()
    }

    /// Takes a journal that failed out of service before its directory is opened again:
    /// stops the sync thread (a sync in progress is waited for, queued ones are
    /// abandoned, as in a crash) and returns the durable seq as it ends — everything up
    /// to it was made durable and may have been acknowledged. The journal stays closed
    /// (it still answers what it held: checkpoints, durable seq). Idempotent.
    pub fn retire(&mut self) -> u64 {
        if self.failed.is_none() {
            self.failed = Some("the journal was retired".into());
        }
        self.syncer.stop();
        self.durable_seq()
    }

    /// Highest seq accepted (durable or not).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn disk_size(&self) -> u64 {
        self.cfg.disk_size
    }

    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Retained, durable checkpoints, oldest first: each one can be opened as a view.
    pub fn checkpoints(&self) -> Vec<CheckpointInfo> {
        self.ckpts
            .range(..=self.durable_seq())
            .map(|(_, c)| c.info.clone())
            .collect()
    }

    fn lookup_ckpt(&self, id: u64) -> Result<&CheckpointInfo> {
        match self.ckpt_ids.get(&id).and_then(|s| self.ckpts.get(s)) {
            Some(c) if c.info.seq > self.durable_seq() => {
                Err(JournalError::CheckpointNotDurable(id))
            }
            Some(c) => Ok(&c.info),
            None if self.retired.contains(&id) => Err(JournalError::CheckpointNotRetained(id)),
            None => Err(JournalError::UnknownCheckpoint(id)),
        }
    }

    /// Opens the disk as of checkpoint `id`: no data is copied and nothing rescanned.
    /// The view pins the checkpoint until dropped.
    pub fn open_view(&self, id: u64) -> Result<View> {
        self.check_ok()?;
        let info = self.lookup_ckpt(id)?.clone();
        {
            let mut pins = self.shared.pins();
            if info.seq < pins.floor {
                return Err(JournalError::CheckpointNotRetained(id));
            }
            *pins.by_seq.entry(info.seq).or_insert(0) += 1;
        }
        Ok(View::new(self.shared.clone(), info))
    }

    /// Opens the disk as of the durable seq, checkpoint or not: what a Delta Sync
    /// compares against. Its id is [`HEAD_VIEW_ID`]; it cannot be committed. The view pins
    /// that seq until dropped.
    pub fn open_head(&self) -> Result<View> {
        self.check_ok()?;
        let seq = self.durable_seq().max(self.promoted_seq);
        let info = CheckpointInfo {
            id: HEAD_VIEW_ID,
            seq,
            wall_ms: 0,
            kind: CheckpointKind::Scheduled,
            tag: None,
        };
        *self.shared.pins().by_seq.entry(seq).or_insert(0) += 1;
        Ok(View::new(self.shared.clone(), info))
    }

    /// Figures for the manager; the window-related ones are as of the last `promote`.
    pub fn stats(&self) -> JournalStats {
        let cps = self.checkpoints();
        let oldest = cps.first().cloned();
        let newest = cps.last().cloned();
        let history_span_ms = match (&oldest, &newest) {
            (Some(o), Some(n)) => n.wall_ms - o.wall_ms,
            _ => 0,
        };
        let (lag_ms, lag_bytes, short, warn, over) = match &self.last_promote {
            Some((_, r)) => (
                r.lag_ms,
                r.lag_bytes,
                r.history_short,
                r.size_warning,
                r.over_hard_limit,
            ),
            None => (0, 0, false, false, false),
        };
        let open_views = self.shared.pins().by_seq.values().sum();
        JournalStats {
            disk_id: self.cfg.disk_id,
            oldest_checkpoint: oldest,
            newest_checkpoint: newest,
            history_span_ms,
            checkpoints: cps.len(),
            bytes_used: self.bytes_used(),
            segments: self.segs.len(),
            records: self.records,
            last_seq: self.last_seq,
            durable_seq: self.durable_seq(),
            promoted_seq: self.promoted_seq,
            promote_lag_ms: lag_ms,
            promote_lag_bytes: lag_bytes,
            history_short: short,
            size_warning: warn,
            over_hard_limit: over,
            open_views,
            index: self.shared.read_side().index.memory(),
            active_segment: self.segs.last().map_or(0, |s| s.id),
            active_segment_bytes: self.segs.last().map_or(0, |s| s.len),
        }
    }

    pub(crate) fn bytes_used(&self) -> u64 {
        self.segs.iter().map(|s| s.len).sum()
    }
}
