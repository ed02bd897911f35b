//! The two ends of a sync as state machines exchanging [`SyncMsg`]s, plus two drivers:
//! [`run_local`] (one thread, deterministic, can stop after N messages to simulate a
//! crash) and [`run_threaded`] (one thread per side over channels, so hashing on both
//! sides overlaps). Over the network, each side's loop is [`run_threaded`]'s loop with
//! frames instead of channels.
//!
//! Protocol (source S, target T):
//! - S→T `Start`; T checks the size (refuses a mismatch before any data), loads its
//!   progress file and answers `Accept{resume_from}`.
//! - Delta: T streams level-1 digests in batches (at most `window` batches ahead); S hashes
//!   the same chunks, answers `Compare{differing}`; T answers each differing chunk with
//!   its level-2 digests; S sends the differing blocks (merged runs, zero runs as `Zero`)
//!   and `ChunkEnd{strong}`; T re-hashes the chunk and answers `Verified` — on a mismatch
//!   (level-2 collision, concurrent write) S resends the chunk whole.
//! - Full: S sends every non-zero block (and zeroes zero blocks unless T is known zero)
//!   chunk by chunk, each followed by `ChunkEnd`, verified as above.
//! - Bitmap: S sends the dirty ranges' content with a `Mark{upto}` about once a chunk.
//! - S→T `Finish` once everything is acknowledged; T flushes, records completion, `Done`.
//!
//! Resumption: T persists (id, kind, size, geometry, plan, cursor) after flushing, where
//! `cursor` is the offset below which all work is durable; a `Start` with the same
//! identity resumes from it. A finished sync restarted with the same id sends nothing.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::time::Instant;

use super::hash::{block_digest, ChunkDigest, HashConfig, Hasher};
use super::msg::{SyncMsg, FRAME_OVERHEAD};
use super::plan::{chunks_from, next_piece, plan_digest, work_extents, Extent};
use super::{BlockRead, BlockWrite, SyncError, SyncPlan, SyncStats};
use crate::agent::crashsafe::write_atomically;

/// Whole-chunk resends of one chunk before the sync gives up.
const MAX_RETRIES: u32 = 3;

/// One end of a sync, driven by a transport.
pub trait Endpoint {
    /// Handles one message from the peer; replies go to `out`.
    fn handle(&mut self, msg: SyncMsg, out: &mut Vec<SyncMsg>) -> Result<(), SyncError>;
    /// Does one unit of self-driven work (hash a batch, send a chunk). `false`: nothing to
    /// do until a message arrives.
    fn work(&mut self, out: &mut Vec<SyncMsg>) -> Result<bool, SyncError>;
    fn is_finished(&self) -> bool;
}

/// The source side's parameters.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub id: u64,
    pub plan: SyncPlan,
    pub hash: HashConfig,
    pub threads: usize,
    /// Unacknowledged chunks (or Bitmap marks) in flight.
    pub window: u32,
}

impl SourceConfig {
    pub fn new(id: u64, plan: SyncPlan) -> Self {
        SourceConfig {
            id,
            plan,
            hash: HashConfig::default(),
            threads: 2,
            window: 16,
        }
    }
}

/// The target side's parameters.
#[derive(Debug, Clone)]
pub struct TargetConfig {
    /// Where the progress cursor is persisted (one file per replica disk).
    pub progress_path: PathBuf,
    /// The replica is freshly created and reads as zeroes (sparse): Full skips zero blocks.
    pub known_zero: bool,
    /// Flush and persist the cursor whenever it advanced this many bytes.
    pub flush_interval: u64,
    /// Chunks per level-1 digest batch, and batches in flight ahead of the source.
    pub batch_chunks: u32,
    pub window: u32,
    pub threads: usize,
}

impl TargetConfig {
    pub fn new(progress_path: impl Into<PathBuf>) -> Self {
        TargetConfig {
            progress_path: progress_path.into(),
            known_zero: false,
            flush_interval: 64 << 20,
            batch_chunks: 32,
            window: 2,
            threads: 2,
        }
    }
}

fn count(stats: &mut SyncStats, msg: &SyncMsg) {
    let n = msg.wire_len() + FRAME_OVERHEAD;
    if msg.from_source() {
        stats.bytes_to_target += n;
        stats.msgs_to_target += 1;
    } else {
        stats.bytes_to_source += n;
        stats.msgs_to_source += 1;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SrcState {
    Init,
    AwaitAccept,
    Running,
    AwaitDone,
    Finished,
}

/// The protected disk's side.
pub struct SyncSource<R: BlockRead> {
    disk: R,
    cfg: SourceConfig,
    size: u64,
    extents: Vec<Extent>,
    plan: u64,
    hasher: Hasher,
    state: SrcState,
    known_zero: bool,
    /// Full/Bitmap: next byte to send.
    pos: u64,
    bytes_since_mark: u64,
    in_flight: u32,
    /// Delta: strong digests of chunks found differing, until their ChunkEnd.
    differing: HashMap<u64, [u8; 32]>,
    digests_done: bool,
    retries: HashMap<u64, u32>,
    durable: u64,
    digests: Vec<ChunkDigest>,
    levels: Vec<u64>,
    stats: SyncStats,
    started: Instant,
}

impl<R: BlockRead> SyncSource<R> {
    pub fn new(disk: R, cfg: SourceConfig) -> Result<Self, SyncError> {
        let size = disk.size().map_err(|e| SyncError::io("size", 0, e))?;
        let hasher = Hasher::new(cfg.hash, cfg.threads)?;
        let extents = work_extents(&cfg.plan, size, cfg.hash);
        let plan = plan_digest(cfg.plan.tag(), size, cfg.hash, &extents);
        Ok(SyncSource {
            disk,
            size,
            extents,
            plan,
            hasher,
            state: SrcState::Init,
            known_zero: false,
            pos: 0,
            bytes_since_mark: 0,
            in_flight: 0,
            differing: HashMap::new(),
            digests_done: false,
            retries: HashMap::new(),
            durable: 0,
            digests: Vec::new(),
            levels: Vec::new(),
            stats: SyncStats::default(),
            started: Instant::now(),
            cfg,
        })
    }

    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }
    /// The target's last persisted cursor: Bitmap bits below it may be cleared.
    pub fn durable(&self) -> u64 {
        self.durable
    }
    pub fn into_disk(self) -> R {
        self.disk
    }

    fn emit(&mut self, out: &mut Vec<SyncMsg>, msg: SyncMsg) {
        count(&mut self.stats, &msg);
        out.push(msg);
    }

    /// The opening message.
    pub fn begin(&mut self, out: &mut Vec<SyncMsg>) {
        let extents = match self.cfg.plan {
            SyncPlan::Delta(Some(_)) => self.extents.clone(),
            _ => Vec::new(),
        };
        let msg = SyncMsg::Start {
            id: self.cfg.id,
            kind: self.cfg.plan.tag(),
            size: self.size,
            block_size: self.cfg.hash.block_size,
            chunk_blocks: self.cfg.hash.chunk_blocks,
            plan: self.plan,
            extents,
        };
        self.started = Instant::now();
        self.emit(out, msg);
        self.state = SrcState::AwaitAccept;
    }

    /// Sends chunk `c` from `buf`-sized reads: `only` = per-block filter (Delta), `skip_zero`
    /// = leave zero blocks alone (known-zero target). Ends with `ChunkEnd` unless nothing
    /// was needed for a zero chunk on a known-zero target.
    fn send_chunk(
        &mut self,
        c: u64,
        only: Option<&[bool]>,
        skip_zero: bool,
        strong: Option<[u8; 32]>,
        out: &mut Vec<SyncMsg>,
    ) -> Result<(), SyncError> {
        let (start, _) = self.cfg.hash.chunk_range(c, self.size);
        let bs = self.cfg.hash.block_size as usize;
        let (buf, computed) =
            self.hasher
                .read_chunk_hashed(&self.disk, self.size, c, strong.is_none())?;
        let (digest, zero) = match (strong, computed) {
            (Some(s), _) => (s, false),
            (None, Some(d)) => d,
            (None, None) => return Err(SyncError::Protocol("chunk digest missing".into())),
        };
        if zero && skip_zero {
            return Ok(());
        }
        let (msgs, sent, zeroed) = block_runs(start, buf, bs, |i, bz| {
            only.is_none_or(|m| m.get(i).copied().unwrap_or(false)) && !(bz && skip_zero)
        });
        self.emit_runs(msgs, sent, zeroed, out);
        self.emit(
            out,
            SyncMsg::ChunkEnd {
                chunk: c,
                strong: digest,
            },
        );
        self.in_flight += 1;
        Ok(())
    }

    /// Bitmap: sends one piece (≤ a chunk) of the dirty ranges.
    fn send_piece(&mut self, piece: Extent, out: &mut Vec<SyncMsg>) -> Result<(), SyncError> {
        let bs = self.cfg.hash.block();
        let buf = self
            .hasher
            .read_range(&self.disk, piece.offset, piece.len)?;
        // Pieces start block-aligned (normalised extents), so the blocks are disk blocks.
        let (msgs, sent, zeroed) = block_runs(piece.offset, buf, bs as usize, |_, _| true);
        self.emit_runs(msgs, sent, zeroed, out);
        Ok(())
    }

    /// Emits the Data/Zero messages of one chunk or piece and counts them.
    fn emit_runs(&mut self, msgs: Vec<SyncMsg>, sent: u64, zeroed: u64, out: &mut Vec<SyncMsg>) {
        self.stats.blocks_sent += sent;
        self.stats.blocks_zeroed += zeroed;
        for m in msgs {
            if let SyncMsg::Data { data, .. } = &m {
                self.stats.data_bytes += data.len() as u64;
            }
            self.emit(out, m);
        }
    }

    fn maybe_finish(&mut self, out: &mut Vec<SyncMsg>) {
        if self.state != SrcState::Running || self.in_flight > 0 {
            return;
        }
        let done = match self.cfg.plan {
            SyncPlan::Delta(_) => self.digests_done && self.differing.is_empty(),
            SyncPlan::Full => self.next_full_chunk().is_none(),
            SyncPlan::Bitmap(_) => next_piece(&self.extents, self.cfg.hash, self.pos).is_none(),
        };
        if done {
            self.emit(out, SyncMsg::Finish);
            self.state = SrcState::AwaitDone;
        }
    }

    fn next_full_chunk(&self) -> Option<u64> {
        chunks_from(&self.extents, self.cfg.hash, self.pos).next()
    }

    fn protocol(&self, what: &str, msg: &SyncMsg) -> SyncError {
        SyncError::Protocol(format!("source got {what}: {msg:?}"))
    }
}

impl<R: BlockRead> Endpoint for SyncSource<R> {
    fn handle(&mut self, msg: SyncMsg, out: &mut Vec<SyncMsg>) -> Result<(), SyncError> {
        count(&mut self.stats, &msg);
        match msg {
            SyncMsg::Accept {
                resume_from,
                known_zero,
            } if self.state == SrcState::AwaitAccept => {
                self.state = SrcState::Running;
                self.pos = resume_from;
                self.durable = resume_from;
                self.known_zero = known_zero;
            }
            SyncMsg::Refuse { target_size } => {
                self.state = SrcState::Finished;
                return Err(SyncError::SizeMismatch {
                    source_size: self.size,
                    target_size,
                });
            }
            SyncMsg::ChunkDigests { digests, last } if self.state == SrcState::Running => {
                let chunks: Vec<u64> = digests.iter().map(|d| d.0).collect();
                let mut mine = std::mem::take(&mut self.digests);
                self.hasher
                    .chunk_digests(&self.disk, self.size, &chunks, &mut mine)?;
                let mut differing = Vec::new();
                for (theirs, ours) in digests.iter().zip(&mine) {
                    let (s, e) = self.cfg.hash.chunk_range(ours.chunk, self.size);
                    self.stats.blocks_compared += (e - s).div_ceil(self.cfg.hash.block());
                    if theirs.1 != ours.strong {
                        differing.push(ours.chunk);
                        self.differing.insert(ours.chunk, ours.strong);
                    }
                }
                self.digests = mine;
                self.digests_done = last;
                self.emit(out, SyncMsg::Compare { differing });
            }
            SyncMsg::BlockDigests { chunk, digests } if self.differing.contains_key(&chunk) => {
                let strong = self.differing.remove(&chunk);
                let buf = self.hasher.read_chunk(&self.disk, self.size, chunk)?;
                let bs = self.cfg.hash.block_size as usize;
                let mut levels = std::mem::take(&mut self.levels);
                levels.clear();
                levels.extend(buf.chunks(bs).map(block_digest));
                let mask: Vec<bool> = levels
                    .iter()
                    .enumerate()
                    .map(|(i, d)| digests.get(i) != Some(d))
                    .collect();
                self.levels = levels;
                self.send_chunk(chunk, Some(&mask), false, strong, out)?;
            }
            SyncMsg::Verified { chunk, ok, durable } if self.in_flight > 0 => {
                self.in_flight -= 1;
                self.durable = self.durable.max(durable);
                if !ok {
                    let n = self.retries.entry(chunk).or_insert(0);
                    *n += 1;
                    if *n > MAX_RETRIES {
                        return Err(SyncError::Unstable {
                            chunk,
                            attempts: MAX_RETRIES,
                        });
                    }
                    self.stats.chunks_retried += 1;
                    self.send_chunk(chunk, None, false, None, out)?;
                }
            }
            SyncMsg::Marked { durable, .. } if self.in_flight > 0 => {
                self.in_flight -= 1;
                self.durable = self.durable.max(durable);
            }
            SyncMsg::Done { cursor } if self.state == SrcState::AwaitDone => {
                self.durable = cursor;
                self.state = SrcState::Finished;
                self.stats.duration = self.started.elapsed();
                return Ok(());
            }
            other => return Err(self.protocol("an unexpected message", &other)),
        }
        self.maybe_finish(out);
        Ok(())
    }

    fn work(&mut self, out: &mut Vec<SyncMsg>) -> Result<bool, SyncError> {
        if self.state != SrcState::Running || self.in_flight >= self.cfg.window {
            return Ok(false);
        }
        match self.cfg.plan {
            SyncPlan::Delta(_) => return Ok(false),
            SyncPlan::Full => {
                let Some(c) = self.next_full_chunk() else {
                    self.maybe_finish(out);
                    return Ok(false);
                };
                self.pos = self.cfg.hash.chunk_range(c, self.size).1;
                let skip_zero = self.known_zero;
                self.send_chunk(c, None, skip_zero, None, out)?;
            }
            SyncPlan::Bitmap(_) => {
                let Some(piece) = next_piece(&self.extents, self.cfg.hash, self.pos) else {
                    self.maybe_finish(out);
                    return Ok(false);
                };
                self.send_piece(piece, out)?;
                self.pos = piece.end();
                self.bytes_since_mark += piece.len;
                let last = next_piece(&self.extents, self.cfg.hash, self.pos).is_none();
                // About one mark per chunk of data: marks are the resume points.
                if last || self.bytes_since_mark >= self.cfg.hash.chunk_size() {
                    self.bytes_since_mark = 0;
                    let upto = self.pos;
                    self.emit(out, SyncMsg::Mark { upto });
                    self.in_flight += 1;
                }
            }
        }
        self.maybe_finish(out);
        Ok(true)
    }

    fn is_finished(&self) -> bool {
        self.state == SrcState::Finished
    }
}

/// What the target persists: the sync's identity and its durable cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    id: u64,
    kind: u8,
    size: u64,
    block_size: u32,
    chunk_blocks: u32,
    plan: u64,
    cursor: u64,
    finished: bool,
}

const PROGRESS_MAGIC: &[u8; 8] = b"BWSYNC01";
const PROGRESS_LEN: usize = 8 + 8 + 1 + 8 + 4 + 4 + 8 + 8 + 1 + 4;

impl Progress {
    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(PROGRESS_LEN);
        v.extend_from_slice(PROGRESS_MAGIC);
        v.extend_from_slice(&self.id.to_le_bytes());
        v.push(self.kind);
        v.extend_from_slice(&self.size.to_le_bytes());
        v.extend_from_slice(&self.block_size.to_le_bytes());
        v.extend_from_slice(&self.chunk_blocks.to_le_bytes());
        v.extend_from_slice(&self.plan.to_le_bytes());
        v.extend_from_slice(&self.cursor.to_le_bytes());
        v.push(u8::from(self.finished));
        let crc = crc32c::crc32c(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// `None` for a missing, torn or foreign file: the sync then starts from zero.
    fn decode(b: &[u8]) -> Option<Progress> {
        if b.len() != PROGRESS_LEN || &b[..8] != PROGRESS_MAGIC {
            return None;
        }
        let (body, crc) = b.split_at(PROGRESS_LEN - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return None;
        }
        let u64_at = |o: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(x)
        };
        let u32_at = |o: usize| {
            let mut x = [0u8; 4];
            x.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(x)
        };
        Some(Progress {
            id: u64_at(8),
            kind: b[16],
            size: u64_at(17),
            block_size: u32_at(25),
            chunk_blocks: u32_at(29),
            plan: u64_at(33),
            cursor: u64_at(41),
            finished: b[49] == 1,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TgtState {
    AwaitStart,
    Running,
    Finished,
}

/// The replica's side.
pub struct SyncTarget<D: BlockRead + BlockWrite> {
    disk: D,
    cfg: TargetConfig,
    size: u64,
    state: TgtState,
    progress: Option<Progress>,
    hash: HashConfig,
    hasher: Option<Hasher>,
    extents: Vec<Extent>,
    /// Everything below `frontier` is done or listed in `pending`.
    frontier: u64,
    pending: BTreeSet<u64>,
    persisted: u64,
    /// Delta: next byte to hash, batches awaiting the source's `Compare`.
    hash_pos: u64,
    batches: VecDeque<Vec<u64>>,
    digests_done: bool,
    digests: Vec<ChunkDigest>,
    levels: Vec<u64>,
    stats: SyncStats,
    started: Instant,
}

impl<D: BlockRead + BlockWrite> SyncTarget<D> {
    pub fn new(disk: D, cfg: TargetConfig) -> Result<Self, SyncError> {
        let size = disk.size().map_err(|e| SyncError::io("size", 0, e))?;
        Ok(SyncTarget {
            disk,
            cfg,
            size,
            state: TgtState::AwaitStart,
            progress: None,
            hash: HashConfig::default(),
            hasher: None,
            extents: Vec::new(),
            frontier: 0,
            pending: BTreeSet::new(),
            persisted: 0,
            hash_pos: 0,
            batches: VecDeque::new(),
            digests_done: false,
            digests: Vec::new(),
            levels: Vec::new(),
            stats: SyncStats::default(),
            started: Instant::now(),
        })
    }

    pub fn stats(&self) -> &SyncStats {
        &self.stats
    }
    pub fn into_disk(self) -> D {
        self.disk
    }
    pub fn disk(&self) -> &D {
        &self.disk
    }

    fn emit(&mut self, out: &mut Vec<SyncMsg>, msg: SyncMsg) {
        count(&mut self.stats, &msg);
        out.push(msg);
    }

    /// The offset below which every piece of work is applied (durable after a flush).
    fn cursor(&self) -> u64 {
        let cs = self.hash.chunk_size();
        match self.pending.first() {
            Some(&c) => self.frontier.min(c * cs),
            None => self.frontier,
        }
    }

    fn persist(&mut self, cursor: u64, finished: bool) -> Result<(), SyncError> {
        self.disk
            .flush()
            .map_err(|e| SyncError::io("flush", cursor, e))?;
        if let Some(p) = &mut self.progress {
            p.cursor = cursor;
            p.finished = finished;
            let bytes = p.encode();
            write_atomically(&self.cfg.progress_path, &bytes)?;
        }
        self.persisted = cursor;
        Ok(())
    }

    fn maybe_persist(&mut self) -> Result<(), SyncError> {
        let c = self.cursor();
        if c >= self
            .persisted
            .saturating_add(self.cfg.flush_interval.max(1))
        {
            self.persist(c, false)?;
        }
        Ok(())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), SyncError> {
        if offset.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(SyncError::Protocol(format!(
                "write of {len} bytes at {offset} beyond the {}-byte disk",
                self.size
            )));
        }
        Ok(())
    }

    fn start(&mut self, msg: SyncMsg, out: &mut Vec<SyncMsg>) -> Result<(), SyncError> {
        let SyncMsg::Start {
            id,
            kind,
            size,
            block_size,
            chunk_blocks,
            plan,
            extents,
        } = msg
        else {
            return Err(SyncError::Protocol("expected Start".into()));
        };
        if size != self.size {
            // Refused before anything is written or sent.
            self.emit(
                out,
                SyncMsg::Refuse {
                    target_size: self.size,
                },
            );
            self.state = TgtState::Finished;
            return Ok(());
        }
        self.hash = HashConfig {
            block_size,
            chunk_blocks,
        };
        self.hasher = Some(Hasher::new(self.hash, self.cfg.threads)?);
        self.extents = match kind {
            2 if !extents.is_empty() => {
                super::plan::normalize(&extents, self.hash.chunk_size(), size)
            }
            1 | 2 => work_extents(&SyncPlan::Full, size, self.hash),
            3 => Vec::new(),
            _ => return Err(SyncError::Protocol(format!("unknown sync kind {kind}"))),
        };
        let mine = Progress {
            id,
            kind,
            size,
            block_size,
            chunk_blocks,
            plan,
            cursor: 0,
            finished: false,
        };
        let stored = std::fs::read(&self.cfg.progress_path)
            .ok()
            .and_then(|b| Progress::decode(&b));
        let resume = match stored {
            Some(p)
                if Progress {
                    cursor: 0,
                    finished: false,
                    ..p
                } == mine =>
            {
                if p.finished {
                    size
                } else {
                    p.cursor.min(size)
                }
            }
            _ => 0,
        };
        self.progress = Some(Progress {
            cursor: resume,
            finished: resume >= size,
            ..mine
        });
        self.frontier = resume;
        self.persisted = resume;
        self.hash_pos = resume;
        self.state = TgtState::Running;
        self.started = Instant::now();
        self.emit(
            out,
            SyncMsg::Accept {
                resume_from: resume,
                known_zero: self.cfg.known_zero,
            },
        );
        Ok(())
    }

    fn is_delta(&self) -> bool {
        self.progress.is_some_and(|p| p.kind == 2)
    }
}

impl<D: BlockRead + BlockWrite> Endpoint for SyncTarget<D> {
    fn handle(&mut self, msg: SyncMsg, out: &mut Vec<SyncMsg>) -> Result<(), SyncError> {
        count(&mut self.stats, &msg);
        if self.state == TgtState::AwaitStart {
            return self.start(msg, out);
        }
        if self.state != TgtState::Running {
            return Err(SyncError::Protocol(format!(
                "target got {msg:?} after the end"
            )));
        }
        match msg {
            SyncMsg::Data { offset, data } => {
                self.check_range(offset, data.len() as u64)?;
                self.disk
                    .write_at(&data, offset)
                    .map_err(|e| SyncError::io("write", offset, e))?;
                self.stats.data_bytes += data.len() as u64;
                self.stats.blocks_sent += (data.len() as u64).div_ceil(self.hash.block());
            }
            SyncMsg::Zero { offset, len } => {
                self.check_range(offset, len)?;
                self.disk
                    .write_zeroes(offset, len)
                    .map_err(|e| SyncError::io("zero", offset, e))?;
                self.stats.blocks_zeroed += len.div_ceil(self.hash.block());
            }
            SyncMsg::Compare { differing } => {
                let batch = self
                    .batches
                    .pop_front()
                    .ok_or_else(|| SyncError::Protocol("Compare without a batch".into()))?;
                let diff: BTreeSet<u64> = differing.iter().copied().collect();
                for c in &batch {
                    if !diff.contains(c) {
                        self.pending.remove(c);
                    }
                }
                let size = self.size;
                for c in differing {
                    if !batch.contains(&c) {
                        return Err(SyncError::Protocol(format!("chunk {c} not in the batch")));
                    }
                    let mut levels = std::mem::take(&mut self.levels);
                    let bs = self.hash.block_size as usize;
                    let h = self.hasher.as_mut().ok_or_else(no_hasher)?;
                    let buf = h.read_chunk(&self.disk, size, c)?;
                    levels.clear();
                    levels.extend(buf.chunks(bs).map(block_digest));
                    self.emit(
                        out,
                        SyncMsg::BlockDigests {
                            chunk: c,
                            digests: levels.clone(),
                        },
                    );
                    self.levels = levels;
                }
                self.maybe_persist()?;
            }
            SyncMsg::ChunkEnd { chunk, strong } => {
                let size = self.size;
                let h = self.hasher.as_mut().ok_or_else(no_hasher)?;
                let (_, mine) = h.read_chunk_hashed(&self.disk, size, chunk, true)?;
                let ok = mine.is_some_and(|(d, _)| d == strong);
                if !self.is_delta() {
                    let end = self.hash.chunk_range(chunk, size).1;
                    self.frontier = self.frontier.max(end);
                }
                if ok {
                    self.pending.remove(&chunk);
                } else {
                    self.pending.insert(chunk);
                }
                self.maybe_persist()?;
                let durable = self.persisted;
                self.emit(out, SyncMsg::Verified { chunk, ok, durable });
            }
            SyncMsg::Mark { upto } => {
                self.frontier = self.frontier.max(upto.min(self.size));
                self.maybe_persist()?;
                let durable = self.persisted;
                self.emit(out, SyncMsg::Marked { upto, durable });
            }
            SyncMsg::Finish => {
                if !self.pending.is_empty() || !self.batches.is_empty() {
                    return Err(SyncError::Protocol(format!(
                        "Finish with chunks {:?} unresolved",
                        self.pending
                    )));
                }
                self.frontier = self.size;
                self.persist(self.size, true)?;
                self.state = TgtState::Finished;
                self.stats.duration = self.started.elapsed();
                self.emit(out, SyncMsg::Done { cursor: self.size });
            }
            other => {
                return Err(SyncError::Protocol(format!("target got {other:?}")));
            }
        }
        Ok(())
    }

    fn work(&mut self, out: &mut Vec<SyncMsg>) -> Result<bool, SyncError> {
        if self.state != TgtState::Running
            || !self.is_delta()
            || self.digests_done
            || self.batches.len() >= self.cfg.window.max(1) as usize
        {
            return Ok(false);
        }
        let cs = self.hash.chunk_size();
        let chunks: Vec<u64> = chunks_from(&self.extents, self.hash, self.hash_pos)
            .take(self.cfg.batch_chunks.max(1) as usize)
            .collect();
        let last = match chunks.last() {
            Some(&c) => {
                self.hash_pos = (c + 1) * cs;
                chunks_from(&self.extents, self.hash, self.hash_pos)
                    .next()
                    .is_none()
            }
            None => true,
        };
        let size = self.size;
        let mut digests = std::mem::take(&mut self.digests);
        let disk = &self.disk;
        let h = self.hasher.as_mut().ok_or_else(no_hasher)?;
        h.chunk_digests(disk, size, &chunks, &mut digests)?;
        let wire: Vec<(u64, [u8; 32])> = digests.iter().map(|d| (d.chunk, d.strong)).collect();
        self.digests = digests;
        for &c in &chunks {
            self.stats.blocks_compared += {
                let (s, e) = self.hash.chunk_range(c, size);
                (e - s).div_ceil(self.hash.block())
            };
            self.pending.insert(c);
        }
        self.frontier = if last { size } else { self.hash_pos.min(size) };
        self.batches.push_back(chunks);
        self.digests_done = last;
        self.emit(
            out,
            SyncMsg::ChunkDigests {
                digests: wire,
                last,
            },
        );
        Ok(true)
    }

    fn is_finished(&self) -> bool {
        self.state == TgtState::Finished
    }
}

fn no_hasher() -> SyncError {
    SyncError::Protocol("target got data before Start".into())
}

/// How a [`run_local`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalOutcome {
    Completed,
    /// Stopped after the given number of delivered messages (a simulated crash).
    Interrupted,
}

/// Runs both sides on this thread. `max_messages` stops after that many deliveries,
/// leaving both sides as a crash would (the caller drops them).
pub fn run_local<R: BlockRead, D: BlockRead + BlockWrite>(
    source: &mut SyncSource<R>,
    target: &mut SyncTarget<D>,
    max_messages: Option<u64>,
) -> Result<LocalOutcome, SyncError> {
    let mut to_target: VecDeque<SyncMsg> = VecDeque::new();
    let mut to_source: VecDeque<SyncMsg> = VecDeque::new();
    let mut out = Vec::new();
    source.begin(&mut out);
    to_target.extend(out.drain(..));
    let mut delivered = 0u64;
    loop {
        if source.is_finished() && target.is_finished() {
            return Ok(LocalOutcome::Completed);
        }
        if max_messages.is_some_and(|m| delivered >= m) {
            return Ok(LocalOutcome::Interrupted);
        }
        if let Some(m) = to_target.pop_front() {
            delivered += 1;
            target.handle(m, &mut out)?;
            to_source.extend(out.drain(..));
        } else if let Some(m) = to_source.pop_front() {
            delivered += 1;
            source.handle(m, &mut out)?;
            to_target.extend(out.drain(..));
        } else if target.work(&mut out)? {
            to_source.extend(out.drain(..));
        } else if source.work(&mut out)? {
            to_target.extend(out.drain(..));
        } else {
            return Err(SyncError::Protocol(
                "sync stalled with nothing in flight".into(),
            ));
        }
    }
}

/// Runs each side on its own thread over channels, as over a connection.
pub fn run_threaded<R, D>(
    source: &mut SyncSource<R>,
    target: &mut SyncTarget<D>,
) -> Result<(), SyncError>
where
    R: BlockRead + Send,
    D: BlockRead + BlockWrite + Send,
{
    use std::sync::mpsc;
    let (to_t, t_rx) = mpsc::channel::<SyncMsg>();
    let (to_s, s_rx) = mpsc::channel::<SyncMsg>();
    let mut first = Vec::new();
    source.begin(&mut first);
    for m in first {
        to_t.send(m).map_err(|_| SyncError::Disconnected)?;
    }
    fn side<E: Endpoint>(
        ep: &mut E,
        rx: mpsc::Receiver<SyncMsg>,
        tx: mpsc::Sender<SyncMsg>,
    ) -> Result<(), SyncError> {
        let mut out = Vec::new();
        while !ep.is_finished() {
            match rx.try_recv() {
                Ok(m) => ep.handle(m, &mut out)?,
                Err(mpsc::TryRecvError::Empty) => {
                    if !ep.work(&mut out)? {
                        let m = rx.recv().map_err(|_| SyncError::Disconnected)?;
                        ep.handle(m, &mut out)?;
                    }
                }
                Err(mpsc::TryRecvError::Disconnected) => return Err(SyncError::Disconnected),
            }
            for m in out.drain(..) {
                // The peer may already be done (e.g. after our final Done).
                let _ = tx.send(m);
            }
        }
        Ok(())
    }
    let (rs, rt) = std::thread::scope(|s| {
        let ht = s.spawn(move || side(target, t_rx, to_s));
        let rs = side(source, s_rx, to_t);
        let rt = ht
            .join()
            .unwrap_or_else(|_| Err(SyncError::Protocol("target thread panicked".into())));
        (rs, rt)
    });
    // The first real error wins over the peer's resulting disconnect.
    match (rs, rt) {
        (Err(SyncError::Disconnected), Err(e)) | (Err(e), _) | (Ok(()), Err(e)) => Err(e),
        (Ok(()), Ok(())) => Ok(()),
    }
}

/// Splits `buf` (disk bytes from `base`) into blocks of `bs`, keeps those `take(index,
/// is_zero)` selects, and merges consecutive kept blocks of the same kind into one
/// `Data` or payload-free `Zero` message. Returns the messages and the numbers of data
/// and zero blocks kept.
fn block_runs(
    base: u64,
    buf: &[u8],
    bs: usize,
    take: impl Fn(usize, bool) -> bool,
) -> (Vec<SyncMsg>, u64, u64) {
    let mut runs: Vec<(usize, usize, bool)> = Vec::new(); // (first byte, end byte, is_zero)
    let (mut sent, mut zeroed) = (0u64, 0u64);
    for (i, block) in buf.chunks(bs).enumerate() {
        let bz = super::hash::is_zero(block);
        if !take(i, bz) {
            continue;
        }
        let (b0, b1) = (i * bs, i * bs + block.len());
        match runs.last_mut() {
            Some((_, end, z)) if *z == bz && *end == b0 => *end = b1,
            _ => runs.push((b0, b1, bz)),
        }
        if bz {
            zeroed += 1;
        } else {
            sent += 1;
        }
    }
    let msgs = runs
        .into_iter()
        .map(|(s, e, z)| {
            let offset = base + s as u64;
            if z {
                SyncMsg::Zero {
                    offset,
                    len: (e - s) as u64,
                }
            } else {
                SyncMsg::Data {
                    offset,
                    data: buf[s..e].to_vec(),
                }
            }
        })
        .collect();
    (msgs, sent, zeroed)
}
