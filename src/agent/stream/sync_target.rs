//! The recovery side of a sync session (see `proto::stream::SyncFrame`): the persisted
//! per-disk sync state (`sync.state`: what the replica holds, which checkpoints a sync
//! made unrecoverable), the digests a Delta Sync asks for, and pre-seeding a replica.
//! Sync data never comes here: it arrives in band, as stream records.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::conn::{FrameReader, FrameWriter};
use super::receiver::{lock, refuse};
use super::{io, now_ms, StreamError};
use crate::agent::crashsafe::{sync_parent_dir, temp_path, write_atomically};
use crate::agent::journal::{Journal, JournalConfig, View};
use crate::agent::sync::hash::block_digests_of;
use crate::agent::sync::{BlockRead, ChunkDigest, HashConfig, Hasher};
use crate::model::status::SyncKind;
use crate::model::sync::keeps_earlier_checkpoints;
use crate::proto::stream::{
    sync_kind_byte, sync_kind_from_byte, ChunkHash, Frame, ReplicaState, SyncFrame,
};

/// File name of the sync state in a disk's directory.
pub const SYNC_STATE_FILE: &str = "sync.state";
/// Finished Delta/Bitmap syncs remembered as holes.
const MAX_HOLES: usize = 256;
/// Hashing threads per session.
const HASH_THREADS: usize = 2;
/// Most pipelined block-digest requests answered as one parallel batch.
const MAX_BLOCK_BATCH: usize = 64;

/// A sync that began and has not ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningSync {
    pub kind: SyncKind,
    pub start_seq: u64,
}

/// The most recent sync that ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastSync {
    pub kind: SyncKind,
    pub start_seq: u64,
    pub end_seq: u64,
    /// Unix ms.
    pub ended_ms: i64,
}

/// What the recovery side knows about a disk's syncs (`sync.state`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncState {
    #[serde(with = "replica_serde")]
    pub replica: ReplicaState,
    pub running: Option<RunningSync>,
    /// Checkpoints with a seq below this are not recoverable (`u64::MAX`: none is, until
    /// a sync ends).
    pub floor_seq: u64,
    /// Seq ranges `start..=end` of finished Delta/Bitmap syncs, oldest first.
    pub holes: Vec<(u64, u64)>,
    pub last: Option<LastSync>,
    /// The journal was reopened after a storage error holding only the records up to
    /// this seq, less than it had made durable: records after it were lost, so no
    /// checkpoint after it is recoverable until a sync that rewrites the whole replica
    /// (Full) ends. Absent in files written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_after: Option<u64>,
}

mod replica_serde {
    use super::ReplicaState;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Replica {
        Empty,
        PreSeeded,
        Existing,
    }

    pub fn serialize<S: Serializer>(r: &ReplicaState, s: S) -> Result<S::Ok, S::Error> {
        match r {
            ReplicaState::Empty => Replica::Empty,
            ReplicaState::PreSeeded => Replica::PreSeeded,
            ReplicaState::Existing => Replica::Existing,
        }
        .serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ReplicaState, D::Error> {
        Ok(match Replica::deserialize(d)? {
            Replica::Empty => ReplicaState::Empty,
            Replica::PreSeeded => ReplicaState::PreSeeded,
            Replica::Existing => ReplicaState::Existing,
        })
    }
}

impl SyncState {
    /// The state of a disk whose replica is `replica`. Only an `Existing` replica (one
    /// that a sync brought level) can back a recoverable checkpoint: over an empty or a
    /// pre-seeded replica nothing is recoverable until the first sync ends, whatever
    /// reached the journal before it began.
    pub fn new(replica: ReplicaState) -> Self {
        SyncState {
            replica,
            running: None,
            floor_seq: if replica == ReplicaState::Existing {
                0
            } else {
                u64::MAX
            },
            holes: Vec::new(),
            last: None,
            lost_after: None,
        }
    }

    /// The journal lost the records after `seq` that it had made durable (reopened
    /// after a storage error): checkpoints after `seq` stop being recoverable until a
    /// Full Sync ends. A second loss keeps the earlier point.
    pub fn lose_after(&mut self, seq: u64) {
        self.lost_after = Some(self.lost_after.map_or(seq, |l| l.min(seq)));
    }

    /// A sync begins (or a resumed one begins again).
    pub fn begin(&mut self, kind: SyncKind, start_seq: u64) {
        // A resumed or replaced sync keeps the earlier start: checkpoints since then were
        // taken while a sync ran, whichever it was.
        let start_seq = match self.running {
            Some(r) => r.start_seq.min(start_seq),
            None => start_seq,
        };
        self.running = Some(RunningSync { kind, start_seq });
        if !keeps_earlier_checkpoints(kind) {
            self.floor_seq = u64::MAX;
        }
    }

    /// The running sync ended with every record up to `end_seq` durable.
    pub fn end(&mut self, end_seq: u64, ended_ms: i64) -> Result<(), String> {
        let Some(r) = self.running.take() else {
            return Err("End without a running sync".into());
        };
        // A floor of MAX also stays from a Full that a Delta or Bitmap replaced: the
        // replica is whole again only now.
        if !keeps_earlier_checkpoints(r.kind) || self.floor_seq == u64::MAX {
            self.floor_seq = end_seq;
            self.holes.retain(|&(_, e)| e >= end_seq);
            // The replica was rewritten whole: what the journal lost is in it again.
            self.lost_after = None;
        } else {
            self.holes.push((r.start_seq, end_seq));
            while self.holes.len() > MAX_HOLES {
                // Forgetting a hole must not make its checkpoints recoverable.
                let (_, e) = self.holes.remove(0);
                self.floor_seq = self.floor_seq.max(e.saturating_add(1));
            }
        }
        self.replica = ReplicaState::Existing;
        self.last = Some(LastSync {
            kind: r.kind,
            start_seq: r.start_seq,
            end_seq,
            ended_ms,
        });
        Ok(())
    }
}

/// Whether the checkpoint at `seq` may be recovered to, as far as syncs go.
pub fn recoverable(state: &SyncState, seq: u64) -> bool {
    // A replica no sync has completed holds nothing of what the disk held before its
    // records began (also for a state file written before floors said so).
    if state.replica != ReplicaState::Existing {
        return false;
    }
    // A sync's start seq is the last one assigned before its pass: a checkpoint with
    // exactly that seq was placed before the pass wrote anything, so it stays whole.
    if seq < state.floor_seq || state.holes.iter().any(|&(s, e)| s < seq && seq <= e) {
        return false;
    }
    // Records before it were lost: its view would miss writes the disk had.
    if state.lost_after.is_some_and(|l| seq > l) {
        return false;
    }
    match state.running {
        Some(r) => keeps_earlier_checkpoints(r.kind) && seq <= r.start_seq,
        None => true,
    }
}

/// A disk's sync state, in memory and in its file. Changes are written before they
/// count.
#[derive(Debug)]
pub(crate) struct SyncCell {
    path: PathBuf,
    state: Mutex<SyncState>,
}

impl SyncCell {
    /// Loads `dir`'s state, creating `dir` and the file if missing: a directory holding
    /// neither journal nor replica is a new, empty disk; anything else predates sync
    /// states and counts as existing.
    pub(crate) fn load_or_init(dir: &Path) -> Result<SyncCell, StreamError> {
        let path = dir.join(SYNC_STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| state_err(&path, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let fresh = !dir.join("journal").exists() && !dir.join("replica.img").exists();
                std::fs::create_dir_all(dir).map_err(io("create disk directory"))?;
                let state = SyncState::new(if fresh {
                    ReplicaState::Empty
                } else {
                    ReplicaState::Existing
                });
                store(&path, &state)?;
                state
            }
            Err(e) => return Err(state_err(&path, e)),
        };
        Ok(SyncCell {
            path,
            state: Mutex::new(state),
        })
    }

    pub(crate) fn get(&self) -> SyncState {
        lock(&self.state).clone()
    }

    /// Records, durably, that the journal lost what it held after `seq` (see
    /// [`SyncState::lose_after`]). Blocking (fsync).
    pub(crate) fn lose_after(&self, seq: u64) -> Result<SyncState, StreamError> {
        self.update(|s| {
            s.lose_after(seq);
            Ok(())
        })
    }

    /// Applies `f` and persists the result; blocking (fsync). On an error from `f` or the
    /// write nothing changes.
    fn update(
        &self,
        f: impl FnOnce(&mut SyncState) -> Result<(), String>,
    ) -> Result<SyncState, StreamError> {
        let mut g = lock(&self.state);
        let mut next = g.clone();
        f(&mut next).map_err(StreamError::Refused)?;
        store(&self.path, &next)?;
        *g = next.clone();
        Ok(next)
    }
}

fn state_err(path: &Path, e: impl std::fmt::Display) -> StreamError {
    StreamError::SyncState {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

fn store(path: &Path, state: &SyncState) -> Result<(), StreamError> {
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| state_err(path, e))?;
    write_atomically(path, &bytes).map_err(|e| state_err(path, e))
}

/// Reverse protection: the old protected disk's image `image` becomes, by a rename (no
/// copy of the data), the pre-seeded replica of `disk_id` under `storage`; the Delta
/// Sync of the new protected disk then compares it and sends only what differs.
/// Returns the replica's path.
///
/// Crash-safe order: the state (`PreSeeded`) goes first, then the rename (the commit
/// point: atomic, the directory fsynced), so a crash leaves either the image in place
/// (run it again) or the replica in place with a state that says "compare". An image on
/// another file system is copied to a temporary file, fsynced and renamed instead, and
/// the original removed after. Refused if the disk already has a replica or a journal
/// here: nothing is overwritten. Blocking.
pub fn preseed_move(
    storage: &Path,
    disk_id: u64,
    image: &Path,
    size: u64,
) -> Result<PathBuf, StreamError> {
    let image_size = std::fs::metadata(image)
        .map_err(io("stat the image to seed from"))?
        .len();
    if size == 0 || image_size != size {
        return Err(StreamError::Config(format!(
            "disk size mismatch: {} is {image_size} bytes, the replica must be {size} bytes",
            image.display()
        )));
    }
    // The receiver's layout (`open_disk`, `preseed`).
    let dir = storage.join(format!("disk-{disk_id:016x}"));
    let replica = dir.join("replica.img");
    for taken in [&replica, &dir.join("journal")] {
        if taken.exists() {
            return Err(StreamError::Config(format!(
                "{} already exists: disk {disk_id:016x} has a replica here (drop it first)",
                taken.display()
            )));
        }
    }
    std::fs::create_dir_all(&dir).map_err(io("create disk directory"))?;
    store(
        &dir.join(SYNC_STATE_FILE),
        &SyncState::new(ReplicaState::PreSeeded),
    )?;
    match std::fs::rename(image, &replica) {
        Ok(()) => {}
        // EXDEV: another file system. No stable io::ErrorKind for it: raw errno 18.
        Err(e) if e.raw_os_error() == Some(18) => {
            let tmp = temp_path(&replica);
            std::fs::copy(image, &tmp).map_err(io("copy the image to seed from"))?;
            std::fs::OpenOptions::new()
                .write(true)
                .open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io("fsync pre-seeded replica"))?;
            std::fs::rename(&tmp, &replica).map_err(io("rename pre-seeded replica"))?;
            sync_parent_dir(&replica).map_err(|e| state_err(&replica, e))?;
            std::fs::remove_file(image).map_err(io("remove the seeded image"))?;
        }
        Err(e) => return Err(io("move the image into the replica")(e)),
    }
    sync_parent_dir(&replica).map_err(|e| state_err(&replica, e))?;
    sync_parent_dir(image).map_err(|e| state_err(image, e))?;
    Ok(replica)
}

/// Registers `image` as the replica of disk `disk_id` under `storage`: a copy made
/// elsewhere, so the first sync is a Delta instead of a Full. Refused once the disk's
/// journal holds a record, or if the image is not `size` bytes. Run it while no
/// receiver serves this storage.
pub fn preseed(
    storage: &Path,
    disk_id: u64,
    image: &Path,
    size: u64,
) -> Result<PathBuf, StreamError> {
    if size == 0 {
        return Err(StreamError::Config("disk size is zero".into()));
    }
    let image_size = std::fs::metadata(image)
        .map_err(io("stat pre-seed image"))?
        .len();
    if image_size != size {
        return Err(StreamError::Config(format!(
            "disk size mismatch: {} is {image_size} bytes, the protected disk is {size} bytes",
            image.display()
        )));
    }
    let dir = storage.join(format!("disk-{disk_id:016x}"));
    let replica = dir.join("replica.img");
    if dir.join("journal").exists() {
        // Opened at the replica's own size: opening extends a shorter replica.
        let have = match std::fs::metadata(&replica) {
            Ok(m) if m.len() > 0 => m.len(),
            Ok(_) => size,
            Err(e) if e.kind() == io::ErrorKind::NotFound => size,
            Err(e) => return Err(io("stat replica")(e)),
        };
        let j = Journal::open(
            dir.join("journal"),
            &replica,
            JournalConfig::new(disk_id, have),
        )?;
        let last = j.last_seq();
        j.close()?;
        if last > 0 {
            return Err(StreamError::Config(format!(
                "disk {disk_id:016x} already has a journal holding records (up to seq {last}): \
                 a replicated disk cannot be pre-seeded"
            )));
        }
    }
    std::fs::create_dir_all(&dir).map_err(io("create disk directory"))?;
    // The state goes first: PreSeeded over any content is safe (it means "compare"),
    // Empty over copied content is not.
    store(
        &dir.join(SYNC_STATE_FILE),
        &SyncState::new(ReplicaState::PreSeeded),
    )?;
    let tmp = temp_path(&replica);
    std::fs::copy(image, &tmp).map_err(io("copy pre-seed image"))?;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io("fsync pre-seeded replica"))?;
    std::fs::rename(&tmp, &replica).map_err(io("rename pre-seeded replica"))?;
    sync_parent_dir(&replica).map_err(|e| state_err(&replica, e))?;
    Ok(replica)
}

/// What a session works on: the disk's journal and sync state from the registry.
pub(crate) struct OpenDisk {
    pub(crate) journal: Arc<Mutex<Journal>>,
    pub(crate) sync: Arc<SyncCell>,
    /// The session's use of the journal (it is not dropped while in use).
    pub(crate) busy: super::receiver::Busy,
}

/// The journal's head as a hashing source.
struct HeadView(View);

impl BlockRead for HeadView {
    fn size(&self) -> io::Result<u64> {
        Ok(self.0.size())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset).map_err(io::Error::other)
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, StreamError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StreamError::Protocol(format!("sync session task: {e}")))
}

/// Runs a sync session after its `Hello` was admitted and the disk opened with the
/// protected disk's size. Ends when the peer closes, on `cancel`, or on a refusal.
pub(crate) async fn session<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    reader: &mut FrameReader<R>,
    writer: &mut FrameWriter<W>,
    disk: OpenDisk,
    size: u64,
    peer_timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(), StreamError> {
    let j = disk.journal.clone();
    let durable = match blocking(move || lock(&j).sync()).await? {
        Ok(d) => d,
        Err(e) => return Err(refuse(writer, format!("journal: {e}")).await),
    };
    let st = disk.sync.get();
    writer
        .send(&Frame::Sync(SyncFrame::Info {
            size,
            replica: st.replica,
            durable_seq: durable,
            running: st.running.map(|r| sync_kind_byte(r.kind)),
            journal_lost: st.lost_after.is_some(),
        }))
        .await?;

    // Set by a Delta Begin; moved into the hashing task and back so its buffers stay.
    let mut hasher: Option<Hasher> = None;
    // A frame read ahead while gathering a run of block-digest requests.
    let mut ahead: Option<Frame> = None;
    loop {
        let frame = match ahead.take() {
            Some(f) => Some(f),
            None => tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = tokio::time::timeout(peer_timeout, reader.read_frame()) => {
                    r.map_err(|_| StreamError::Timeout("no frame from the sync source"))??
                }
            },
        };
        let msg = match frame {
            None => return Ok(()),
            Some(Frame::Sync(m)) => m,
            Some(Frame::Ping { nonce, .. }) => {
                writer.send(&Frame::Pong { nonce }).await?;
                continue;
            }
            Some(other) => {
                let reason = format!("unexpected frame in a sync session: {other:?}");
                return Err(refuse(writer, reason).await);
            }
        };
        let reply = match msg {
            SyncFrame::Begin {
                kind,
                start_seq,
                block_size,
                chunk_blocks,
            } => {
                let Some(kind) = sync_kind_from_byte(kind) else {
                    return Err(refuse(writer, format!("unknown sync kind {kind}")).await);
                };
                let cfg = HashConfig {
                    block_size,
                    chunk_blocks,
                };
                hasher = if kind == SyncKind::Delta {
                    match Hasher::new(cfg, HASH_THREADS) {
                        Ok(h) => Some(h),
                        Err(e) => return Err(refuse(writer, e.to_string()).await),
                    }
                } else if let Err(e) = cfg.validate() {
                    return Err(refuse(writer, e.to_string()).await);
                } else {
                    None
                };
                let cell = disk.sync.clone();
                let r = blocking(move || {
                    cell.update(|s| {
                        s.begin(kind, start_seq);
                        Ok(())
                    })
                })
                .await?;
                if let Err(e) = r {
                    return Err(refuse(writer, format!("persisting the sync's begin: {e}")).await);
                }
                tracing::info!(?kind, start_seq, "sync began");
                SyncFrame::Ok
            }
            SyncFrame::ChunkDigestsReq { req, chunks } => {
                let Some(h) = hasher.take() else {
                    let reason = "chunk digests asked for outside a Delta Sync".to_string();
                    return Err(refuse(writer, reason).await);
                };
                let n = h.config().chunks(size);
                if let Some(c) = chunks.iter().find(|&&c| c >= n) {
                    let reason = format!("chunk {c} is beyond the disk ({n} chunks)");
                    return Err(refuse(writer, reason).await);
                }
                let j = disk.journal.clone();
                let (h, r) = blocking(move || {
                    let mut h = h;
                    let r = chunk_digests(&j, &mut h, size, &chunks);
                    (h, r)
                })
                .await?;
                hasher = Some(h);
                match r {
                    Ok(digests) => SyncFrame::ChunkDigests { req, digests },
                    Err(reason) => return Err(refuse(writer, reason).await),
                }
            }
            SyncFrame::BlockDigestsReq { req, chunk } => {
                let Some(h) = hasher.as_ref() else {
                    let reason = "block digests asked for outside a Delta Sync".to_string();
                    return Err(refuse(writer, reason).await);
                };
                let cfg = h.config();
                // The requests the source pipelined: answered together, hashed in
                // parallel, replies in request order.
                let mut reqs = vec![(req, chunk)];
                while reqs.len() < MAX_BLOCK_BATCH {
                    match reader.try_frame()? {
                        Some(Frame::Sync(SyncFrame::BlockDigestsReq { req, chunk })) => {
                            reqs.push((req, chunk))
                        }
                        Some(other) => {
                            ahead = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                let n = cfg.chunks(size);
                if let Some((_, c)) = reqs.iter().find(|(_, c)| *c >= n) {
                    let reason = format!("chunk {c} is beyond the disk ({n} chunks)");
                    return Err(refuse(writer, reason).await);
                }
                let j = disk.journal.clone();
                let chunks: Vec<u64> = reqs.iter().map(|(_, c)| *c).collect();
                let r = blocking(move || {
                    let src = head(&j)?;
                    block_digests_of(&src, cfg, size, &chunks, HASH_THREADS)
                        .map_err(|e| format!("hashing: {e}"))
                })
                .await?;
                let all = match r {
                    Ok(all) => all,
                    Err(reason) => return Err(refuse(writer, reason).await),
                };
                for ((req, chunk), digests) in reqs.into_iter().zip(all) {
                    writer.push(&Frame::Sync(SyncFrame::BlockDigests {
                        req,
                        chunk,
                        digests,
                    }))?;
                }
                writer.flush().await?;
                continue;
            }
            SyncFrame::End { end_seq } => {
                let j = disk.journal.clone();
                let cell = disk.sync.clone();
                let r = blocking(move || {
                    let durable = lock(&j).durable_seq();
                    if durable < end_seq {
                        return Err(StreamError::Refused(format!(
                            "end_seq not durable: end_seq {end_seq}, durable seq {durable}"
                        )));
                    }
                    cell.update(|s| s.end(end_seq, now_ms()))
                })
                .await?;
                match r {
                    Ok(s) => tracing::info!(end_seq, last = ?s.last, "sync ended"),
                    Err(StreamError::Refused(reason)) => return Err(refuse(writer, reason).await),
                    Err(e) => {
                        let reason = format!("persisting the sync's end: {e}");
                        return Err(refuse(writer, reason).await);
                    }
                }
                hasher = None;
                SyncFrame::Ok
            }
            other => {
                let reason = format!("unexpected sync message: {other:?}");
                return Err(refuse(writer, reason).await);
            }
        };
        writer.send(&Frame::Sync(reply)).await?;
    }
}

fn head(j: &Mutex<Journal>) -> Result<HeadView, String> {
    // The view reads without the journal lock; only opening it takes the lock.
    let v = lock(j)
        .open_head()
        .map_err(|e| format!("opening the head view: {e}"))?;
    Ok(HeadView(v))
}

fn chunk_digests(
    j: &Mutex<Journal>,
    h: &mut Hasher,
    size: u64,
    chunks: &[u64],
) -> Result<Vec<ChunkHash>, String> {
    let src = head(j)?;
    let mut out: Vec<ChunkDigest> = Vec::with_capacity(chunks.len());
    h.chunk_digests(&src, size, chunks, &mut out)
        .map_err(|e| format!("hashing: {e}"))?;
    Ok(out
        .into_iter()
        .map(|d| ChunkHash {
            chunk: d.chunk,
            strong: d.strong,
            zero: d.zero,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use SyncKind::*;

    fn state(floor_seq: u64, running: Option<(SyncKind, u64)>, holes: &[(u64, u64)]) -> SyncState {
        SyncState {
            replica: ReplicaState::Existing,
            running: running.map(|(kind, start_seq)| RunningSync { kind, start_seq }),
            floor_seq,
            holes: holes.to_vec(),
            last: None,
            lost_after: None,
        }
    }

    #[test]
    fn recoverable_table() {
        let cases: &[(SyncState, u64, bool)] = &[
            // Nothing running: floor and holes decide.
            (state(0, None, &[]), 0, true),
            (state(10, None, &[]), 9, false),
            (state(10, None, &[]), 10, true),
            (state(0, None, &[(5, 8)]), 4, true),
            (state(0, None, &[(5, 8)]), 5, true),
            (state(0, None, &[(5, 8)]), 6, false),
            (state(0, None, &[(5, 8)]), 8, false),
            (state(0, None, &[(5, 8)]), 9, true),
            // Delta / Bitmap running: only earlier checkpoints, above the floor.
            (state(0, Some((Delta, 20)), &[]), 19, true),
            (state(0, Some((Delta, 20)), &[]), 20, true),
            (state(0, Some((Delta, 20)), &[]), 21, false),
            (state(0, Some((Bitmap, 20)), &[]), 25, false),
            (state(10, Some((Bitmap, 20)), &[]), 9, false),
            (state(0, Some((Delta, 20)), &[(5, 8)]), 6, false),
            // Full / Initial running: nothing.
            (state(0, Some((Full, 20)), &[]), 19, false),
            (state(0, Some((Initial, 20)), &[]), 1, false),
            (state(u64::MAX, None, &[]), u64::MAX - 1, false),
        ];
        for (i, (s, seq, want)) in cases.iter().enumerate() {
            assert_eq!(recoverable(s, *seq), *want, "case {i}: seq {seq} in {s:?}");
        }
    }

    #[test]
    fn full_sync_moves_the_floor_to_its_end() {
        let mut s = SyncState::new(ReplicaState::Empty);
        s.begin(Initial, 5);
        assert_eq!(s.floor_seq, u64::MAX);
        assert!(!recoverable(&s, 3));
        s.end(40, 1).unwrap();
        assert_eq!(s.floor_seq, 40);
        assert_eq!(s.running, None);
        assert_eq!(s.replica, ReplicaState::Existing);
        assert_eq!(
            s.last,
            Some(LastSync {
                kind: Initial,
                start_seq: 5,
                end_seq: 40,
                ended_ms: 1
            })
        );
        assert!(!recoverable(&s, 39));
        assert!(recoverable(&s, 41));
    }

    #[test]
    fn delta_sync_leaves_a_hole() {
        let mut s = SyncState::new(ReplicaState::Existing);
        s.begin(Delta, 10);
        assert!(recoverable(&s, 9));
        assert!(!recoverable(&s, 11));
        s.end(20, 2).unwrap();
        assert_eq!(s.holes, vec![(10, 20)]);
        assert_eq!(s.floor_seq, 0);
        assert!(recoverable(&s, 9));
        assert!(!recoverable(&s, 15));
        assert!(recoverable(&s, 21));
    }

    #[test]
    fn nothing_is_recoverable_before_the_first_sync_ends() {
        for replica in [ReplicaState::Empty, ReplicaState::PreSeeded] {
            let mut s = SyncState::new(replica);
            // Records and checkpoints may reach the journal before the sync begins (the
            // stream was admitted first): none of them is recoverable.
            for seq in [0, 1, 9, 10, 11, 1 << 40] {
                assert!(
                    !recoverable(&s, seq),
                    "{replica:?}: seq {seq} before the sync"
                );
            }
            // A Delta over a pre-seeded copy keeps nothing from before it either.
            s.begin(
                if replica == ReplicaState::Empty {
                    Initial
                } else {
                    Delta
                },
                10,
            );
            assert!(!recoverable(&s, 9), "{replica:?}: seq 9 while it runs");
            s.end(20, 2).unwrap();
            assert_eq!(s.replica, ReplicaState::Existing);
            assert_eq!(s.floor_seq, 20, "{replica:?}");
            assert!(s.holes.is_empty(), "{replica:?}");
            assert!(!recoverable(&s, 9), "{replica:?}: seq 9 after the sync");
            assert!(!recoverable(&s, 15), "{replica:?}: seq 15 after the sync");
            assert!(recoverable(&s, 20), "{replica:?}: seq 20 after the sync");
            assert!(recoverable(&s, 21), "{replica:?}: seq 21 after the sync");
        }
    }

    #[test]
    fn a_state_file_of_an_unsynced_replica_with_a_zero_floor_recovers_nothing() {
        // Written by an earlier version: floor 0 over an empty replica.
        let mut s = SyncState::new(ReplicaState::Empty);
        s.floor_seq = 0;
        assert!(!recoverable(&s, 5));
    }

    #[test]
    fn records_lost_by_the_journal_hide_later_checkpoints_until_a_full_sync_ends() {
        let mut s = SyncState::new(ReplicaState::Existing);
        s.begin(Delta, 5);
        s.end(8, 0).unwrap();
        s.lose_after(20);
        // Before the loss: recoverable as before (outside the Delta's hole).
        assert!(recoverable(&s, 4));
        assert!(!recoverable(&s, 6));
        assert!(recoverable(&s, 20));
        // After it: a view would miss the lost writes.
        assert!(!recoverable(&s, 21));
        assert!(!recoverable(&s, 1000));
        // A second loss keeps the earlier point.
        s.lose_after(30);
        assert_eq!(s.lost_after, Some(20));
        s.lose_after(12);
        assert_eq!(s.lost_after, Some(12));
        assert!(!recoverable(&s, 13));
        // A Bitmap or Delta Sync does not bring the lost records back.
        s.begin(Bitmap, 40);
        s.end(50, 0).unwrap();
        assert_eq!(s.lost_after, Some(12));
        assert!(!recoverable(&s, 60));
        // A Full Sync rewrites the replica: after its end all is well again.
        s.begin(Full, 60);
        assert!(!recoverable(&s, 4), "Full: nothing earlier while it runs");
        s.end(70, 0).unwrap();
        assert_eq!(s.lost_after, None);
        assert!(!recoverable(&s, 69));
        assert!(recoverable(&s, 71));
    }

    #[test]
    fn a_sync_state_without_the_loss_field_still_loads() {
        let old =
            r#"{"replica":"existing","running":null,"floor_seq":3,"holes":[[5,8]],"last":null}"#;
        let s: SyncState = serde_json::from_str(old).unwrap();
        assert_eq!(s.lost_after, None);
        assert_eq!(s.floor_seq, 3);
        // And it is written without it while there is none.
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("lost_after"), "{text}");
        let mut lost = s.clone();
        lost.lose_after(9);
        let back: SyncState = serde_json::from_str(&serde_json::to_string(&lost).unwrap()).unwrap();
        assert_eq!(back, lost);
    }

    #[test]
    fn end_without_begin_is_refused() {
        let mut s = SyncState::new(ReplicaState::Existing);
        let before = s.clone();
        assert!(s.end(5, 0).is_err());
        assert_eq!(s, before);
    }

    #[test]
    fn resumed_begin_keeps_the_earlier_start() {
        let mut s = SyncState::new(ReplicaState::Existing);
        s.begin(Delta, 10);
        s.begin(Delta, 30);
        assert_eq!(
            s.running,
            Some(RunningSync {
                kind: Delta,
                start_seq: 10
            })
        );
        // Another kind replaces it, from the earlier start.
        s.begin(Bitmap, 40);
        assert_eq!(
            s.running,
            Some(RunningSync {
                kind: Bitmap,
                start_seq: 10
            })
        );
        s.end(50, 0).unwrap();
        assert_eq!(s.holes, vec![(10, 50)]);
    }

    #[test]
    fn a_full_replaced_by_a_delta_keeps_the_drastic_floor() {
        let mut s = SyncState::new(ReplicaState::Existing);
        s.begin(Full, 10);
        s.begin(Delta, 30);
        assert_eq!(s.running.map(|r| r.kind), Some(Delta));
        assert_eq!(s.floor_seq, u64::MAX);
        assert!(!recoverable(&s, 5));
        s.end(60, 0).unwrap();
        assert_eq!(s.floor_seq, 60);
        assert!(s.holes.is_empty());
        assert!(!recoverable(&s, 5));
        assert!(recoverable(&s, 61));
        // And a Delta replaced by a Full takes the Full's floor.
        s.begin(Delta, 70);
        s.begin(Full, 75);
        assert_eq!(s.floor_seq, u64::MAX);
        s.end(90, 0).unwrap();
        assert_eq!(s.floor_seq, 90);
    }

    #[test]
    fn old_holes_are_dropped_without_becoming_recoverable() {
        let mut s = SyncState::new(ReplicaState::Existing);
        for i in 0..(MAX_HOLES as u64 + 3) {
            s.begin(Bitmap, i * 10 + 1);
            s.end(i * 10 + 5, 0).unwrap();
        }
        assert_eq!(s.holes.len(), MAX_HOLES);
        assert_eq!(s.holes[0], (31, 35));
        assert_eq!(s.floor_seq, 26);
        assert!(!recoverable(&s, 3));
        assert!(recoverable(&s, 36));
    }

    #[test]
    fn state_round_trips_through_json_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("disk-0000000000000001");
        let cell = SyncCell::load_or_init(&d).unwrap();
        assert_eq!(cell.get(), SyncState::new(ReplicaState::Empty));
        cell.update(|s| {
            s.begin(Initial, 3);
            s.end(9, 7)
        })
        .unwrap();
        cell.update(|s| {
            s.begin(Delta, 12);
            s.end(20, 8)
        })
        .unwrap();
        assert!(cell.update(|s| s.end(21, 0)).is_err());
        let again = SyncCell::load_or_init(&d).unwrap();
        assert_eq!(again.get(), cell.get());
        assert_eq!(again.get().floor_seq, 9);
        assert_eq!(again.get().holes, vec![(12, 20)]);
        let text = std::fs::read_to_string(d.join(SYNC_STATE_FILE)).unwrap();
        assert!(text.contains("\"existing\""), "{text}");

        // A directory from before sync states counts as existing.
        let old = dir.path().join("disk-0000000000000002");
        std::fs::create_dir_all(old.join("journal")).unwrap();
        let cell = SyncCell::load_or_init(&old).unwrap();
        assert_eq!(cell.get().replica, ReplicaState::Existing);
        assert!(old.join(SYNC_STATE_FILE).exists());
    }

    #[test]
    #[allow(clippy::unwrap_used)]
    fn preseed_move_renames_the_image_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("old.img");
        let content: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&image, &content).unwrap();
        let storage = dir.path().join("replicas").join("new-host");
        assert!(
            preseed_move(&storage, 9, &image, 4096).is_err(),
            "size checked first"
        );
        assert!(image.exists());
        let replica = preseed_move(&storage, 9, &image, 8192).unwrap();
        assert_eq!(replica, storage.join("disk-0000000000000009/replica.img"));
        assert!(!image.exists(), "moved, not copied");
        assert_eq!(std::fs::read(&replica).unwrap(), content);
        let cell = SyncCell::load_or_init(replica.parent().unwrap()).unwrap();
        assert_eq!(cell.get().replica, ReplicaState::PreSeeded);
        // A second image for the same replica is refused and left where it is.
        std::fs::write(&image, &content).unwrap();
        let e = preseed_move(&storage, 9, &image, 8192).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert!(image.exists());
    }
}
