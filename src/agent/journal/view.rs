//! [`View`]: the disk as of one checkpoint (replica, overlaid by the journal up to the
//! checkpoint, overlaid by a writable scratch layer).
//!
//! The scratch layer is a sparse file at the disk's offsets plus an in-memory map of the
//! ranges written. The map is only persisted when the view is committed: a test or a
//! before-commit failover does not survive an agent crash (its VMs die with the agent's
//! NBD server anyway), and not persisting it keeps guest writes at the speed of one
//! `pwrite`.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::IoSliceMut;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use super::error::{io_at, io_err};
use super::format::{encode_scratch_map, Header, HEADER_LEN};
use super::index::{Piece, Src};
use super::segment::read_full_at;
use super::{write_file_durably, CheckpointInfo, JournalError, Shared, SCRATCH_DIR};

type Result<T, E = JournalError> = std::result::Result<T, E>;

/// The disk as of one retained checkpoint. Reads and scratch writes may come from any
/// number of threads. Dropping the view (or [`super::Journal::rollback`]) discards its
/// scratch layer and releases its pin.
pub struct View {
    pub(crate) shared: Arc<Shared>,
    pub(crate) id: u64,
    pub(crate) ckpt: CheckpointInfo,
    scratch: RwLock<Scratch>,
}

impl std::fmt::Debug for View {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("View")
            .field("id", &self.id)
            .field("checkpoint", &self.ckpt)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Scratch {
    file: Option<File>,
    /// start → end, disjoint, not touching.
    ranges: BTreeMap<u64, u64>,
    /// Set once a commit persisted the scratch: the files then belong to the commit.
    keep_files: bool,
}

pub(crate) fn scratch_paths(shared: &Shared, id: u64) -> (PathBuf, PathBuf) {
    let d = shared.dir.join(SCRATCH_DIR);
    (
        d.join(format!("{id:016x}.data")),
        d.join(format!("{id:016x}.map")),
    )
}

impl View {
    pub(crate) fn new(shared: Arc<Shared>, ckpt: CheckpointInfo) -> View {
        let id = shared.next_view.fetch_add(1, Ordering::Relaxed);
        View {
            shared,
            id,
            ckpt,
            scratch: RwLock::new(Scratch::default()),
        }
    }

    pub fn checkpoint(&self) -> &CheckpointInfo {
        &self.ckpt
    }

    /// Size of the disk in bytes.
    pub fn size(&self) -> u64 {
        self.shared.disk_size
    }

    /// Bytes written to the scratch layer (overlaps counted once).
    pub fn scratch_bytes(&self) -> u64 {
        let s = self.scratch.read().unwrap_or_else(|e| e.into_inner());
        s.ranges.iter().map(|(a, b)| b - a).sum()
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<()> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.shared.disk_size => Ok(()),
            _ => Err(JournalError::OutOfRange {
                offset,
                len,
                size: self.shared.disk_size,
            }),
        }
    }

    /// Fills `buf` with the disk's bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len())?;
        let s = self.scratch.read().unwrap_or_else(|e| e.into_inner());
        let end = offset + buf.len() as u64;
        let mut at = offset;
        let before = s
            .ranges
            .range(..=offset)
            .next_back()
            .filter(|(_, &e)| e > offset);
        let after = s.ranges.range(offset + 1..end);
        for (&rs, &re) in before.into_iter().chain(after) {
            if at < rs {
                let (a, b) = ((at - offset) as usize, (rs - offset) as usize);
                read_base(&self.shared, &mut buf[a..b], at, self.ckpt.seq)?;
                at = rs;
            }
            let stop = re.min(end);
            let (a, b) = ((at - offset) as usize, (stop - offset) as usize);
            if let Some(f) = &s.file {
                f.read_exact_at(&mut buf[a..b], at)
                    .map_err(io_err("read scratch layer"))?;
            }
            at = stop;
        }
        if at < end {
            let a = (at - offset) as usize;
            read_base(&self.shared, &mut buf[a..], at, self.ckpt.seq)?;
        }
        Ok(())
    }

    /// Writes to the scratch layer; the journal and the replica are never touched.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        self.check_range(offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let mut s = self.scratch.write().unwrap_or_else(|e| e.into_inner());
        if s.file.is_none() {
            let (path, _) = scratch_paths(&self.shared, self.id);
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .map_err(|e| io_at("create scratch layer", &path, e))?;
            s.file = Some(f);
        }
        if let Some(f) = &s.file {
            f.write_all_at(data, offset)
                .map_err(io_err("write scratch layer"))?;
        }
        let (mut a, mut b) = (offset, offset + data.len() as u64);
        let touching: Vec<u64> = s
            .ranges
            .range(..=b)
            .rev()
            .take_while(|(_, &e)| e >= a)
            .map(|(&k, _)| k)
            .collect();
        for k in touching {
            if let Some(e) = s.ranges.remove(&k) {
                a = a.min(k);
                b = b.max(e);
            }
        }
        s.ranges.insert(a, b);
        Ok(())
    }

    /// Makes the scratch layer durable and writes its map, for a commit. From here on
    /// the files outlive the view until the commit deletes them.
    pub(crate) fn persist_scratch(&self) -> Result<bool> {
        let mut s = self.scratch.write().unwrap_or_else(|e| e.into_inner());
        let Some(f) = &s.file else {
            return Ok(false);
        };
        f.sync_all().map_err(io_err("fsync scratch layer"))?;
        let ranges: Vec<(u64, u64)> = s.ranges.iter().map(|(&a, &b)| (a, b)).collect();
        let (_, map) = scratch_paths(&self.shared, self.id);
        let name = map
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| JournalError::Config("bad scratch path".into()))?
            .to_string();
        s.keep_files = true;
        write_file_durably(
            &self.shared.dir.join(SCRATCH_DIR),
            &name,
            &encode_scratch_map(&ranges),
        )?;
        Ok(true)
    }
}

impl Drop for View {
    fn drop(&mut self) {
        {
            let mut pins = self.shared.pins();
            if let Some(n) = pins.by_seq.get_mut(&self.ckpt.seq) {
                *n -= 1;
                if *n == 0 {
                    pins.by_seq.remove(&self.ckpt.seq);
                }
            }
        }
        let s = self.scratch.get_mut().unwrap_or_else(|e| e.into_inner());
        if s.file.take().is_some() && !s.keep_files {
            let (data, _) = scratch_paths(&self.shared, self.id);
            if let Err(e) = std::fs::remove_file(&data) {
                tracing::warn!(path = %data.display(), error = %e, "could not remove scratch layer");
            }
        }
    }
}

/// A resolved piece with the segment handle it reads from.
struct Io {
    piece: Piece,
    file: Option<Arc<File>>,
}

/// Per-thread buffers of the read path, so a read allocates nothing once warm.
#[derive(Default)]
struct Work {
    pieces: Vec<Piece>,
    unc: Vec<(u32, u32)>,
    tmp: Vec<(u32, u32)>,
    ios: Vec<Io>,
    /// Where the record headers between coalesced pieces are read to (and dropped).
    gaps: Vec<u8>,
}

thread_local! {
    static WORK: RefCell<Work> = RefCell::new(Work::default());
}

/// Longest stretch of a segment between two pieces that one read still spans: a
/// record header and its padding (records written one after the other, as a guest
/// writing sequentially produces), with room to spare.
const MAX_GAP: u64 = 256;
/// Most pieces read by one `preadv` (IOV_MAX is 1024, and a gap takes an iovec too).
const MAX_RUN: usize = 256;

/// Reads the disk at `at_seq` without any scratch layer.
pub(crate) fn read_base(shared: &Shared, buf: &mut [u8], offset: u64, at_seq: u64) -> Result<()> {
    WORK.with(|w| match w.try_borrow_mut() {
        Ok(mut w) => {
            let r = read_base_with(shared, buf, offset, at_seq, &mut w);
            // The handles of deleted segments must not stay open in an idle thread.
            w.ios.clear();
            r
        }
        // Only if a read re-entered this thread's read path; never expected.
        Err(_) => read_base_with(shared, buf, offset, at_seq, &mut Work::default()),
    })
}

fn read_base_with(
    shared: &Shared,
    buf: &mut [u8],
    offset: u64,
    at_seq: u64,
    w: &mut Work,
) -> Result<()> {
    {
        let rs = shared.read_side();
        rs.index.query_with(
            offset,
            buf.len() as u64,
            at_seq,
            &mut w.pieces,
            &mut w.unc,
            &mut w.tmp,
        );
        w.ios.clear();
        for p in &w.pieces {
            let file = match p.src {
                Src::Journal { seg, .. } => rs.segs.get(&seg).cloned(),
                _ => None,
            };
            // Neighbours from the replica (chunk edges) or zeros are one read / one fill.
            if let Some(last) = w.ios.last_mut() {
                let same = matches!(
                    (last.piece.src, p.src),
                    (Src::Replica, Src::Replica) | (Src::Zero { .. }, Src::Zero { .. })
                );
                if same && last.piece.off + last.piece.len == p.off {
                    last.piece.len += p.len;
                    continue;
                }
            }
            w.ios.push(Io { piece: *p, file });
        }
    }
    let mut i = 0;
    while i < w.ios.len() {
        let run = journal_run(&w.ios[i..]);
        if run > 1 {
            read_run(shared, buf, offset, &w.ios[i..i + run], &mut w.gaps)?;
            i += run;
            continue;
        }
        let io = &w.ios[i];
        i += 1;
        let p = io.piece;
        let a = (p.off - offset) as usize;
        let dst = &mut buf[a..a + p.len as usize];
        match (p.src, &io.file) {
            (Src::Zero { .. }, _) => dst.fill(0),
            // A segment gone from the table was deleted after its records reached the
            // replica (promotion deletes only fully promoted segments, after the replica
            // fsync and the state file), so the replica has exactly these bytes.
            (Src::Replica, _) | (Src::Journal { .. }, None) => read_replica(shared, dst, p.off)?,
            (
                Src::Journal {
                    pos,
                    skip,
                    compressed: false,
                    ..
                },
                Some(f),
            ) => f
                .read_exact_at(dst, pos + HEADER_LEN as u64 + skip)
                .map_err(io_err("read journal segment"))?,
            (
                Src::Journal {
                    pos,
                    skip,
                    compressed: true,
                    seg,
                    ..
                },
                Some(f),
            ) => read_compressed(shared, f, seg, pos, skip, dst)?,
        }
    }
    Ok(())
}

/// Where a piece's bytes are in its segment, if it is stored uncompressed there.
fn file_pos(io: &Io) -> Option<(u32, u64)> {
    match (io.piece.src, &io.file) {
        (
            Src::Journal {
                seg,
                pos,
                skip,
                compressed: false,
                ..
            },
            Some(_),
        ) => Some((seg, pos + HEADER_LEN as u64 + skip)),
        _ => None,
    }
}

/// How many pieces from the first one lie one after the other in the same segment,
/// a header apart at most, so that one `preadv` reads them all.
fn journal_run(ios: &[Io]) -> usize {
    let Some((seg, mut end)) = file_pos(&ios[0]).map(|(s, p)| (s, p + ios[0].piece.len)) else {
        return 1;
    };
    let mut n = 1;
    while n < ios.len().min(MAX_RUN) {
        match file_pos(&ios[n]) {
            Some((s, p)) if s == seg && p >= end && p - end <= MAX_GAP => {
                end = p + ios[n].piece.len;
                n += 1;
            }
            _ => break,
        }
    }
    n
}

/// Reads a run found by [`journal_run`] with one `preadv`: each piece straight into its
/// place in `buf`, the bytes between them (headers) into `gaps`.
fn read_run(
    shared: &Shared,
    buf: &mut [u8],
    offset: u64,
    run: &[Io],
    gaps: &mut Vec<u8>,
) -> Result<()> {
    let path = || super::segment::segment_path(&shared.dir, file_pos(&run[0]).map_or(0, |x| x.0));
    let (Some(f), Some((_, start))) = (&run[0].file, file_pos(&run[0])) else {
        return Err(JournalError::Closed("internal error: bad read run".into()));
    };
    // The gap sizes, then one buffer for all of them.
    let mut gap_total = 0usize;
    let mut end = start;
    for io in run {
        let (_, p) = file_pos(io).unwrap_or((0, end));
        gap_total += (p - end) as usize;
        end = p + io.piece.len;
    }
    gaps.resize(gap_total, 0);
    let first = (run[0].piece.off - offset) as usize;
    let mut dst = &mut buf[first..];
    let mut gap_buf = &mut gaps[..];
    let mut iov: Vec<IoSliceMut<'_>> = Vec::with_capacity(run.len() * 2);
    let mut end = start;
    for io in run {
        let (_, p) = file_pos(io).unwrap_or((0, end));
        let g = (p - end) as usize;
        if g > 0 {
            let (head, rest) = std::mem::take(&mut gap_buf).split_at_mut(g);
            iov.push(IoSliceMut::new(head));
            gap_buf = rest;
        }
        let (head, rest) = std::mem::take(&mut dst).split_at_mut(io.piece.len as usize);
        iov.push(IoSliceMut::new(head));
        dst = rest;
        end = p + io.piece.len;
    }
    let mut bufs = &mut iov[..];
    let mut at = start;
    while !bufs.is_empty() {
        match rustix::io::preadv(&**f, bufs, at) {
            Ok(0) => {
                return Err(io_at(
                    "read journal segment",
                    &path(),
                    std::io::ErrorKind::UnexpectedEof.into(),
                ))
            }
            Ok(n) => {
                at += n as u64;
                IoSliceMut::advance_slices(&mut bufs, n);
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io_at("read journal segment", &path(), e.into())),
        }
    }
    Ok(())
}

fn read_replica(shared: &Shared, dst: &mut [u8], off: u64) -> Result<()> {
    let n = read_full_at(&shared.replica, dst, off)
        .map_err(|e| io_at("read replica", &shared.replica_path, e))?;
    // A replica shorter than the disk (a block device is never extended) reads as zeros
    // past its end, like a sparse file.
    dst[n..].fill(0);
    Ok(())
}

fn read_compressed(
    shared: &Shared,
    f: &File,
    seg: u32,
    pos: u64,
    skip: u64,
    dst: &mut [u8],
) -> Result<()> {
    let path = || super::segment::segment_path(&shared.dir, seg);
    let mut hb = [0u8; HEADER_LEN];
    f.read_exact_at(&mut hb, pos)
        .map_err(|e| io_at("read journal segment", &path(), e))?;
    let h = Header::decode(&hb).map_err(|r| JournalError::corrupt(path(), pos, r))?;
    let mut stored = vec![0u8; h.stored_len as usize];
    f.read_exact_at(&mut stored, pos + HEADER_LEN as u64)
        .map_err(|e| io_at("read journal segment", &path(), e))?;
    if !Header::crc_ok(&hb, &stored) {
        return Err(JournalError::corrupt(path(), pos, "record CRC mismatch"));
    }
    let mut out = Vec::with_capacity(h.length as usize);
    zstd::bulk::Decompressor::new()
        .and_then(|mut d| d.decompress_to_buffer(&stored[..], &mut out))
        .map_err(|e| JournalError::corrupt(path(), pos, format!("zstd: {e}")))?;
    let s = skip as usize;
    match out.get(s..s + dst.len()) {
        Some(src) if out.len() as u64 == h.length => {
            dst.copy_from_slice(src);
            Ok(())
        }
        _ => Err(JournalError::corrupt(
            path(),
            pos,
            "decompressed length differs",
        )),
    }
}
