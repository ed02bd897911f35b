//! The activity log (DRBD's idea): a small, bounded set of "hot" extents that is made
//! durable *before* any write into an extent outside the set is issued, so that after a
//! crash only those extents (plus the persisted bitmap) need checking, never the whole disk.
//!
//! Rules that make the crash argument hold (see also the [module map](super)):
//! 1. A write first marks its bitmap bits and its extents' epoch *under the shared lock*,
//!    and only after every one of its extents is in the durable log.
//! 2. An extent leaves the log only if no write touched it since the start of the last
//!    *completed* bitmap persist (`last_epoch <= covered`), i.e. its bits are in the bitmap
//!    file. Eviction takes the exclusive lock, so no write is half-way through rule 1.
//! 3. The log on disk is replaced by a full snapshot written into one of [`SLOTS`] fixed slots
//!    (pwrite + fdatasync); recovery takes the valid slot with the highest sequence number. A
//!    torn slot fails its CRC and the previous snapshot, a superset of what was written
//!    under it, is used.
//!
//! Steady state costs nothing extra: a write into active extents takes a read lock, looks
//! the extents up and usually only *reads* two atomics per extent. Activations that arrive
//! while another is being written are batched into the next transaction (group commit).
//!
//! File format (little-endian). Block 0 (4096 bytes) is the header:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `BWACTLOG` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | log2(extent size) |
//! | 16 | 4 | capacity (max extents) |
//! | 20 | 4 | number of slots |
//! | 24 | 8 | disk size |
//! | 32 | 4 | slot size in bytes (multiple of 4096) |
//! | 36 | 4 | crc32c of bytes 0..36 |
//!
//! Slot `i` starts at `4096 + i × slot size`:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | slot magic `ALSN` |
//! | 4 | 4 | number of extents `n` |
//! | 8 | 8 | sequence number (≥ 1; slot = seq mod slots) |
//! | 16 | 4 | crc32c of bytes 0..16 followed by the extent list |
//! | 20 | 4 | reserved, 0 |
//! | 24 | 8 × n | extent indices (extent = offset >> log2(extent size)) |

use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use super::DirtyError;
use crate::agent::crashsafe;

/// Default extent size: 4 MiB.
pub const DEFAULT_EXTENT_SIZE: u64 = 4 << 20;
/// Default number of extents the log may hold: DRBD's default (1237 × 4 MiB ≈ 4.8 GiB
/// hot). A log smaller than a guest's working set makes nearly every write wait for a log
/// transaction (256 extents over a 2 GiB random-write set cost +200 µs per 4 KiB write in
/// `bulwark bench agent`); after a crash at most this much of the disk is checked.
pub const DEFAULT_AL_CAPACITY: usize = 1237;
/// Bounds on the capacity.
pub const MIN_AL_CAPACITY: usize = 4;
/// Bounds on the capacity.
pub const MAX_AL_CAPACITY: usize = 4096;
/// Number of snapshot slots in the file.
pub const SLOTS: u64 = 2;

const MAGIC: [u8; 8] = *b"BWACTLOG";
const VERSION: u32 = 1;
const HEADER_BLOCK: u64 = 4096;
const SLOT_MAGIC: [u8; 4] = *b"ALSN";
const SLOT_HEADER: usize = 24;

/// What [`ActivityLog::recover`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlRecovered {
    /// Bytes per extent.
    pub extent_size: u64,
    /// Disk size the log was created for.
    pub disk_size: u64,
    /// Sequence number of the snapshot used (0 if no transaction was ever written).
    pub seq: u64,
    /// The extents that were possibly being written when the log was last updated.
    pub extents: BTreeSet<u64>,
}

impl AlRecovered {
    /// The recovered extents as byte ranges, clipped to the disk.
    pub fn ranges(&self) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        self.extents.iter().map(|&e| {
            let start = e * self.extent_size;
            start..(start + self.extent_size).min(self.disk_size)
        })
    }
}

#[derive(Debug)]
struct Entry {
    /// Bitmap-persist epoch of the last write into this extent (rule 2).
    last_epoch: AtomicU64,
    /// Activation clock at the last write: the LRU order.
    last_use: AtomicU64,
}

#[derive(Debug)]
struct Committer {
    seq: u64,
    buf: Vec<u8>,
}

/// The live activity log of one disk. See the module documentation.
#[derive(Debug)]
pub struct ActivityLog {
    path: PathBuf,
    file: File,
    extent_shift: u32,
    disk_size: u64,
    capacity: usize,
    slot_size: u64,
    /// Active extents. Read-locked by every write while it marks; write-locked to evict.
    state: RwLock<HashMap<u64, Entry>>,
    /// Serialises transactions (one writer of the file at a time).
    commit: Mutex<Committer>,
    /// Extents waiting for activation: the next committer takes them all (group commit).
    pending: Mutex<BTreeSet<u64>>,
    /// Current bitmap-persist epoch; a persist starts by incrementing it.
    epoch: AtomicU64,
    /// Highest epoch whose bitmap persist completed.
    covered: AtomicU64,
    /// Advances once per transaction; entries remember it on use (LRU).
    clock: AtomicU64,
    transactions: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
fn read<T>(m: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    m.read().unwrap_or_else(PoisonError::into_inner)
}
fn write<T>(m: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    m.write().unwrap_or_else(PoisonError::into_inner)
}

fn slot_size_for(capacity: usize) -> u64 {
    ((SLOT_HEADER + 8 * capacity) as u64).div_ceil(4096) * 4096
}

impl ActivityLog {
    /// Creates a fresh, empty log at `path` (replacing any old one atomically) and opens it.
    pub fn create(
        path: &Path,
        disk_size: u64,
        extent_size: u64,
        capacity: usize,
    ) -> Result<Self, DirtyError> {
        if !extent_size.is_power_of_two() || !(4096..=1 << 34).contains(&extent_size) {
            return Err(DirtyError::Config(format!(
                "extent size {extent_size} is not a power of two in 4 KiB..16 GiB"
            )));
        }
        if !(MIN_AL_CAPACITY..=MAX_AL_CAPACITY).contains(&capacity) {
            return Err(DirtyError::Config(format!(
                "activity-log capacity {capacity} not in {MIN_AL_CAPACITY}..={MAX_AL_CAPACITY}"
            )));
        }
        let extent_shift = extent_size.trailing_zeros();
        let slot_size = slot_size_for(capacity);
        // The whole file is written (not just sized) so that later slot writes overwrite
        // allocated blocks and fdatasync has no metadata to flush.
        let total = HEADER_BLOCK + SLOTS * slot_size;
        let mut image = vec![0u8; total as usize];
        image[0..8].copy_from_slice(&MAGIC);
        image[8..12].copy_from_slice(&VERSION.to_le_bytes());
        image[12..16].copy_from_slice(&extent_shift.to_le_bytes());
        image[16..20].copy_from_slice(&(capacity as u32).to_le_bytes());
        image[20..24].copy_from_slice(&(SLOTS as u32).to_le_bytes());
        image[24..32].copy_from_slice(&disk_size.to_le_bytes());
        image[32..36].copy_from_slice(&(slot_size as u32).to_le_bytes());
        let crc = crc32c::crc32c(&image[0..36]);
        image[36..40].copy_from_slice(&crc.to_le_bytes());
        crashsafe::write_atomically(path, &image)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| DirtyError::io("open", path, e))?;
        Ok(ActivityLog {
            path: path.to_path_buf(),
            file,
            extent_shift,
            disk_size,
            capacity,
            slot_size,
            state: RwLock::new(HashMap::with_capacity(capacity)),
            commit: Mutex::new(Committer {
                seq: 0,
                buf: Vec::with_capacity(slot_size as usize),
            }),
            pending: Mutex::new(BTreeSet::new()),
            epoch: AtomicU64::new(1),
            covered: AtomicU64::new(0),
            clock: AtomicU64::new(1),
            transactions: AtomicU64::new(0),
        })
    }

    /// Reads a log left by a previous run: the extents of its newest intact snapshot.
    pub fn recover(path: &Path) -> Result<AlRecovered, DirtyError> {
        let file = File::open(path).map_err(|e| DirtyError::io("open", path, e))?;
        let mut h = [0u8; 40];
        file.read_exact_at(&mut h, 0)
            .map_err(|e| DirtyError::io("read header", path, e))?;
        if h[0..8] != MAGIC {
            return Err(DirtyError::corrupt(path, "not an activity log (bad magic)"));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        if crc32c::crc32c(&h[0..36]) != u32_at(36) {
            return Err(DirtyError::corrupt(
                path,
                "activity-log header checksum mismatch",
            ));
        }
        if u32_at(8) != VERSION {
            return Err(DirtyError::corrupt(
                path,
                format!("unsupported activity-log version {}", u32_at(8)),
            ));
        }
        let extent_shift = u32_at(12);
        let capacity = u32_at(16) as usize;
        let slots = u64::from(u32_at(20));
        let mut ds = [0u8; 8];
        ds.copy_from_slice(&h[24..32]);
        let disk_size = u64::from_le_bytes(ds);
        let slot_size = u64::from(u32_at(32));
        if !(12..=34).contains(&extent_shift)
            || !(MIN_AL_CAPACITY..=MAX_AL_CAPACITY).contains(&capacity)
            || slots == 0
            || slots > 64
            || slot_size != slot_size_for(capacity)
        {
            return Err(DirtyError::corrupt(
                path,
                "inconsistent activity-log header",
            ));
        }
        let n_extents = disk_size.div_ceil(1 << extent_shift);
        let mut best: Option<(u64, BTreeSet<u64>)> = None;
        let mut slot = vec![0u8; slot_size as usize];
        for i in 0..slots {
            if file
                .read_exact_at(&mut slot, HEADER_BLOCK + i * slot_size)
                .is_err()
            {
                continue; // a short file: that slot was never written
            }
            if let Some((seq, set)) = parse_slot(&slot, capacity, n_extents) {
                if best.as_ref().is_none_or(|(s, _)| seq > *s) {
                    best = Some((seq, set));
                }
            }
        }
        let (seq, extents) = best.unwrap_or_default();
        Ok(AlRecovered {
            extent_size: 1 << extent_shift,
            disk_size,
            seq,
            extents,
        })
    }

    /// Bytes per extent.
    pub fn extent_size(&self) -> u64 {
        1 << self.extent_shift
    }

    /// Maximum number of extents held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Path of the log file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Active extents, sorted.
    pub fn active_extents(&self) -> Vec<u64> {
        let mut v: Vec<u64> = read(&self.state).keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Number of transactions (durable log updates) written since creation.
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// Most extents one [`touch`](Self::touch) may span.
    pub(crate) fn max_span(&self) -> u64 {
        (self.capacity / 2) as u64
    }

    /// Extents `first..=last` touched by a byte range (clipped to the disk), if any.
    pub(crate) fn extent_range(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.disk_size);
        if len == 0 || offset >= end {
            return None;
        }
        Some((offset >> self.extent_shift, (end - 1) >> self.extent_shift))
    }

    /// Starts a bitmap persist: returns the epoch the persist will cover. Writes that read
    /// an epoch `<=` the returned value set their bits before this call.
    pub(crate) fn begin_cover(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst)
    }

    /// The persist started by `begin_cover` returning `e` is durable.
    pub(crate) fn end_cover(&self, e: u64) {
        self.covered.fetch_max(e, Ordering::SeqCst);
    }

    /// The activation clock (for [`evict_idle`](Self::evict_idle)).
    pub(crate) fn clock(&self) -> u64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// Advances the activation clock (start of a persist interval); returns the new value.
    pub(crate) fn advance_clock(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Runs `mark` (which sets the bitmap bits) once every extent of `first..=last` is in the
    /// durable log, under the shared lock so no eviction can interleave (rule 1).
    /// `make_room` persists the bitmap; it is called when the log is full of extents
    /// written since the last persist.
    pub(crate) fn touch(
        &self,
        first: u64,
        last: u64,
        mark: &dyn Fn(),
        make_room: &dyn Fn() -> Result<(), DirtyError>,
    ) -> Result<(), DirtyError> {
        if last - first > self.max_span().max(1) {
            return Err(DirtyError::Config(format!(
                "range spans {} extents, more than {}",
                last - first + 1,
                self.max_span() + 1
            )));
        }
        // Bounded: each round either marks or commits a transaction that activated our
        // extents; only a competing activation evicting them again can cause another round.
        for _ in 0..1000 {
            {
                let st = read(&self.state);
                if (first..=last).all(|x| st.contains_key(&x)) {
                    self.mark_active(&st, first, last, mark);
                    return Ok(());
                }
            }
            self.activate(first, last, make_room)?;
        }
        Err(DirtyError::Config(
            "activity log thrashing: could not keep extents active".into(),
        ))
    }

    /// The fast path of [`touch`](Self::touch) alone: runs `mark` and returns true only if
    /// every extent is already active and the shared lock is free to take.
    pub(crate) fn try_touch(&self, first: u64, last: u64, mark: &dyn Fn()) -> bool {
        let Ok(st) = self.state.try_read() else {
            return false;
        };
        if !(first..=last).all(|x| st.contains_key(&x)) {
            return false;
        }
        self.mark_active(&st, first, last, mark);
        true
    }

    /// Rule 1 under the shared lock `st`: bits first, then the extents' epoch and LRU clock.
    fn mark_active(&self, st: &HashMap<u64, Entry>, first: u64, last: u64, mark: &dyn Fn()) {
        mark();
        let e = self.epoch.load(Ordering::SeqCst);
        let now = self.clock.load(Ordering::Relaxed);
        for x in first..=last {
            if let Some(ent) = st.get(&x) {
                if ent.last_epoch.load(Ordering::SeqCst) < e {
                    ent.last_epoch.fetch_max(e, Ordering::SeqCst);
                }
                if ent.last_use.load(Ordering::Relaxed) != now {
                    ent.last_use.store(now, Ordering::Relaxed);
                }
            }
        }
    }

    /// Makes `first..=last` (and whatever else is pending) durable in the log.
    fn activate(
        &self,
        first: u64,
        last: u64,
        make_room: &dyn Fn() -> Result<(), DirtyError>,
    ) -> Result<(), DirtyError> {
        lock(&self.pending).extend(first..=last);
        let mut c = lock(&self.commit);
        let limit = self.max_span().max(last - first + 1) as usize;
        let need: Vec<u64> = {
            let st = read(&self.state);
            let mut p = lock(&self.pending);
            p.retain(|x| !st.contains_key(x));
            // Ours first, then others' up to the batch limit; the rest stay pending.
            let mut need: Vec<u64> = (first..=last).filter(|x| !st.contains_key(x)).collect();
            for x in p.iter() {
                if need.len() >= limit {
                    break;
                }
                if !(first..=last).contains(x) {
                    need.push(*x);
                }
            }
            for x in &need {
                p.remove(x);
            }
            need
        };
        if need.is_empty() {
            return Ok(()); // someone else's transaction activated them
        }
        let keep = first..=last;
        let mut st = write(&self.state);
        if !self.evict_for(&mut st, need.len(), &keep) {
            // Persisting the bitmap covers everything written so far. First without
            // blocking writers; if they re-dirtied the log meanwhile, again while holding
            // the exclusive lock, after which every entry is covered.
            drop(st);
            make_room()?;
            st = write(&self.state);
            if !self.evict_for(&mut st, need.len(), &keep) {
                make_room()?;
                if !self.evict_for(&mut st, need.len(), &keep) {
                    return Err(DirtyError::Config(
                        "activity log full and nothing evictable".into(),
                    ));
                }
            }
        }
        let mut snapshot: Vec<u64> = st.keys().copied().collect();
        drop(st);
        snapshot.extend_from_slice(&need);
        let seq = c.seq + 1;
        self.write_snapshot(&mut c.buf, seq, &snapshot)?;
        c.seq = seq;
        let now = self.clock.fetch_add(1, Ordering::Relaxed) + 1;
        // New entries are not evictable until the next persist completes, so they survive
        // until the writer that asked for them marks.
        let e = self.epoch.load(Ordering::SeqCst);
        let mut st = write(&self.state);
        for x in need {
            st.insert(
                x,
                Entry {
                    last_epoch: AtomicU64::new(e),
                    last_use: AtomicU64::new(now),
                },
            );
        }
        Ok(())
    }

    /// Evicts least-recently-used covered entries (never those in `keep`, the range being
    /// activated) until `n` slots are free. Returns false, evicting nothing, if impossible.
    fn evict_for(
        &self,
        st: &mut HashMap<u64, Entry>,
        n: usize,
        keep: &std::ops::RangeInclusive<u64>,
    ) -> bool {
        let free = self.capacity.saturating_sub(st.len());
        if free >= n {
            return true;
        }
        let covered = self.covered.load(Ordering::SeqCst);
        let mut cands: Vec<(u64, u64)> = st
            .iter()
            .filter(|(x, e)| !keep.contains(x) && e.last_epoch.load(Ordering::SeqCst) <= covered)
            .map(|(&x, e)| (e.last_use.load(Ordering::Relaxed), x))
            .collect();
        let want = n - free;
        if cands.len() < want {
            return false;
        }
        cands.sort_unstable();
        for (_, x) in cands.into_iter().take(want) {
            st.remove(&x);
        }
        true
    }

    /// Drops entries that are covered by the persisted bitmap and were not used since clock
    /// `older_than` (idle extents), writing one transaction if anything changed. Called by
    /// the persister after a bitmap persist; keeps the post-crash check small.
    pub(crate) fn evict_idle(&self, older_than: u64) -> Result<usize, DirtyError> {
        let mut c = lock(&self.commit);
        let mut st = write(&self.state);
        let covered = self.covered.load(Ordering::SeqCst);
        let before = st.len();
        st.retain(|_, e| {
            e.last_epoch.load(Ordering::SeqCst) > covered
                || e.last_use.load(Ordering::Relaxed) >= older_than
        });
        let removed = before - st.len();
        if removed == 0 {
            return Ok(0);
        }
        let snapshot: Vec<u64> = st.keys().copied().collect();
        drop(st);
        let seq = c.seq + 1;
        self.write_snapshot(&mut c.buf, seq, &snapshot)?;
        c.seq = seq;
        Ok(removed)
    }

    fn write_snapshot(
        &self,
        buf: &mut Vec<u8>,
        seq: u64,
        extents: &[u64],
    ) -> Result<(), DirtyError> {
        buf.clear();
        buf.extend_from_slice(&SLOT_MAGIC);
        buf.extend_from_slice(&(extents.len() as u32).to_le_bytes());
        buf.extend_from_slice(&seq.to_le_bytes());
        buf.extend_from_slice(&[0u8; 8]); // crc + reserved, filled below
        for x in extents {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        let mut crc = crc32c::crc32c(&buf[0..16]);
        crc = crc32c::crc32c_append(crc, &buf[SLOT_HEADER..]);
        buf[16..20].copy_from_slice(&crc.to_le_bytes());
        // Whole 4 KiB blocks: no read-modify-write of a partial page.
        let len = (buf.len() as u64).div_ceil(4096) * 4096;
        buf.resize(len as usize, 0);
        let at = HEADER_BLOCK + (seq % SLOTS) * self.slot_size;
        self.file
            .write_all_at(buf, at)
            .map_err(|e| DirtyError::io("write", &self.path, e))?;
        self.file
            .sync_data()
            .map_err(|e| DirtyError::io("fdatasync", &self.path, e))?;
        self.transactions.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn parse_slot(slot: &[u8], capacity: usize, n_extents: u64) -> Option<(u64, BTreeSet<u64>)> {
    if slot.len() < SLOT_HEADER || slot[0..4] != SLOT_MAGIC {
        return None;
    }
    let n = u32::from_le_bytes([slot[4], slot[5], slot[6], slot[7]]) as usize;
    if n > capacity || SLOT_HEADER + 8 * n > slot.len() {
        return None;
    }
    let mut s = [0u8; 8];
    s.copy_from_slice(&slot[8..16]);
    let seq = u64::from_le_bytes(s);
    let stored = u32::from_le_bytes([slot[16], slot[17], slot[18], slot[19]]);
    let list = &slot[SLOT_HEADER..SLOT_HEADER + 8 * n];
    let crc = crc32c::crc32c_append(crc32c::crc32c(&slot[0..16]), list);
    if crc != stored || seq == 0 {
        return None;
    }
    let mut set = BTreeSet::new();
    for c in list.chunks_exact(8) {
        s.copy_from_slice(c);
        let x = u64::from_le_bytes(s);
        if x >= n_extents {
            return None;
        }
        set.insert(x);
    }
    Some((seq, set))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn activation_eviction_and_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let al = ActivityLog::create(&p, 64 << 20, 1 << 20, 4).unwrap();
        let marks = Cell::new(0);
        let persists = Cell::new(0);
        let persist = || -> Result<(), DirtyError> {
            let e = al.begin_cover();
            persists.set(persists.get() + 1);
            al.end_cover(e);
            Ok(())
        };
        for x in 0..4u64 {
            al.touch(x, x, &|| marks.set(marks.get() + 1), &persist)
                .unwrap();
        }
        assert_eq!(al.active_extents(), vec![0, 1, 2, 3]);
        assert_eq!(al.transactions(), 4);
        // Hot extents: no transaction.
        al.touch(1, 2, &|| marks.set(marks.get() + 1), &persist)
            .unwrap();
        assert_eq!(al.transactions(), 4);
        assert_eq!(persists.get(), 0);
        // Full and nothing covered: a persist is forced, then the LRU entry (0) goes.
        al.touch(9, 9, &|| marks.set(marks.get() + 1), &persist)
            .unwrap();
        assert_eq!(persists.get(), 1);
        assert_eq!(al.active_extents(), vec![1, 2, 3, 9]);
        assert_eq!(marks.get(), 6);
        let rec = ActivityLog::recover(&p).unwrap();
        assert_eq!(
            rec.extents.into_iter().collect::<Vec<_>>(),
            vec![1, 2, 3, 9]
        );
        assert_eq!(rec.seq, 5);
        // Idle eviction: everything covered after a persist; used before clock 100.
        persist().unwrap();
        assert_eq!(al.evict_idle(u64::MAX).unwrap(), 4);
        assert!(ActivityLog::recover(&p).unwrap().extents.is_empty());
    }

    #[test]
    fn torn_newest_slot_falls_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let al = ActivityLog::create(&p, 64 << 20, 1 << 20, 8).unwrap();
        let ok = || -> Result<(), DirtyError> { Ok(()) };
        al.touch(3, 3, &|| {}, &ok).unwrap(); // seq 1
        al.touch(5, 5, &|| {}, &ok).unwrap(); // seq 2
        drop(al);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        // Tear seq 2 (slot 0): flip a byte of its extent list.
        f.write_all_at(&[0xff], HEADER_BLOCK + SLOT_HEADER as u64 + 3)
            .unwrap();
        let rec = ActivityLog::recover(&p).unwrap();
        assert_eq!(rec.seq, 1);
        assert_eq!(rec.extents.into_iter().collect::<Vec<_>>(), vec![3]);
    }
}
