//! One disk's dirty tracking: the bitmap, its activity log, the persist schedule and the
//! clean/unclean life cycle (open → mark… → persist… → close_clean).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::activity_log::{ActivityLog, DEFAULT_AL_CAPACITY, DEFAULT_EXTENT_SIZE};
use super::bitmap::{DirtyBitmap, DEFAULT_REGION_SIZE};
use super::DirtyError;

/// Geometry of the tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirtyConfig {
    /// Bytes per bitmap bit (power of two, default 64 KiB).
    pub region_size: u32,
    /// Bytes per activity-log extent (power of two, default 4 MiB).
    pub extent_size: u64,
    /// Maximum number of extents in the activity log (default 1237 ≈ 4.8 GiB hot).
    pub al_capacity: usize,
}

impl Default for DirtyConfig {
    fn default() -> Self {
        DirtyConfig {
            region_size: DEFAULT_REGION_SIZE,
            extent_size: DEFAULT_EXTENT_SIZE,
            al_capacity: DEFAULT_AL_CAPACITY,
        }
    }
}

/// Where one disk's tracking files live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPaths {
    /// The bitmap file.
    pub bitmap: PathBuf,
    /// The activity-log file.
    pub activity_log: PathBuf,
}

impl DirtyPaths {
    /// `dir/<disk>.dirty` and `dir/<disk>.al`.
    pub fn in_dir(dir: &Path, disk: &str) -> Self {
        DirtyPaths {
            bitmap: dir.join(format!("{disk}.dirty")),
            activity_log: dir.join(format!("{disk}.al")),
        }
    }
}

/// What the previous run left behind, as found by [`DirtyTracker::open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryState {
    /// No bitmap file and no activity log: a disk never tracked here (initial sync decides).
    New,
    /// The previous run shut down cleanly: the loaded bitmap is exact.
    Clean,
    /// The previous run crashed. The loaded bitmap ∪ the activity-log extents (already merged
    /// into the tracker's bitmap) covers every region that may differ from the replica; the
    /// bitmap alone does not.
    Unclean,
    /// Files missing, damaged or for another geometry: nothing is known, so every region was
    /// marked dirty (a delta or full sync is needed).
    Lost {
        /// Why.
        reason: String,
    },
}

/// Result of opening a tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// What was found.
    pub state: RecoveryState,
    /// The previous run's activity-log extents, as byte ranges (only read when unclean).
    pub al_extents: Vec<Range<u64>>,
    /// Dirty regions in the tracker's bitmap after merging.
    pub dirty_regions: u64,
}

#[derive(Debug, Default)]
struct PersistState {
    buf: Vec<u8>,
}

/// Dirty tracking of one protected disk. Cheap to call from many threads at once.
#[derive(Debug)]
pub struct DirtyTracker {
    paths: DirtyPaths,
    bitmap: DirtyBitmap,
    al: ActivityLog,
    /// `true` once closed cleanly. Marks hold the read side so a clean close cannot slip
    /// between a mark's check and its bits.
    closed: RwLock<bool>,
    persist: Mutex<PersistState>,
    /// Activity-log clock at the previous periodic persist (idle-extent eviction).
    prev_clock: AtomicU64,
    persists: AtomicU64,
}

impl DirtyTracker {
    /// Opens tracking for a disk of `disk_size` bytes: loads what the previous run left,
    /// merges it, makes the merged bitmap durable *with the clean flag off*, and starts a
    /// fresh activity log. Blocking (file I/O and fsyncs).
    pub fn open(
        paths: DirtyPaths,
        disk_size: u64,
        cfg: DirtyConfig,
    ) -> Result<(Self, Recovery), DirtyError> {
        let bitmap = DirtyBitmap::new(disk_size, cfg.region_size)?;
        let mut al_extents = Vec::new();
        let lost = |bitmap: &DirtyBitmap, reason: String| {
            bitmap.mark_all();
            RecoveryState::Lost { reason }
        };
        let state = match DirtyBitmap::load(&paths.bitmap) {
            Ok((loaded, clean)) => {
                if loaded.disk_size() != disk_size
                    || loaded.region_size() != u64::from(cfg.region_size)
                {
                    lost(
                        &bitmap,
                        format!(
                            "bitmap is for {} bytes / {} B regions, disk is {} bytes / {} B",
                            loaded.disk_size(),
                            loaded.region_size(),
                            disk_size,
                            cfg.region_size
                        ),
                    )
                } else {
                    bitmap.union_with(&loaded)?;
                    if clean {
                        RecoveryState::Clean
                    } else {
                        match ActivityLog::recover(&paths.activity_log) {
                            Ok(rec) if rec.disk_size == disk_size => {
                                for r in rec.ranges() {
                                    bitmap.mark(r.start, r.end - r.start);
                                    al_extents.push(r);
                                }
                                RecoveryState::Unclean
                            }
                            Ok(rec) => lost(
                                &bitmap,
                                format!("activity log is for a disk of {} bytes", rec.disk_size),
                            ),
                            Err(e) => lost(&bitmap, format!("activity log unusable: {e}")),
                        }
                    }
                }
            }
            Err(e) if e.is_not_found() => {
                if paths.activity_log.exists() {
                    lost(
                        &bitmap,
                        "bitmap missing but an activity log exists".to_string(),
                    )
                } else {
                    RecoveryState::New
                }
            }
            Err(e) => lost(&bitmap, format!("bitmap unusable: {e}")),
        };
        // Order matters: the merged bitmap must be durable before the old log is replaced.
        bitmap.save(&paths.bitmap, false)?;
        let al = ActivityLog::create(
            &paths.activity_log,
            disk_size,
            cfg.extent_size,
            cfg.al_capacity,
        )?;
        let dirty_regions = bitmap.dirty_count();
        let tracker = DirtyTracker {
            paths,
            bitmap,
            al,
            closed: RwLock::new(false),
            persist: Mutex::new(PersistState::default()),
            prev_clock: AtomicU64::new(0),
            persists: AtomicU64::new(0),
        };
        tracker
            .prev_clock
            .store(tracker.al.clock(), Ordering::Relaxed);
        Ok((
            tracker,
            Recovery {
                state,
                al_extents,
                dirty_regions,
            },
        ))
    }

    /// Marks `offset..offset+len` dirty. Must be called *before* the data is written to the
    /// local disk: on return the range is covered by the durable activity log (or by the
    /// persisted bitmap). Blocks only when a new extent has to enter the log (one
    /// pwrite + fdatasync, shared by concurrent callers) or, rarely, for a bitmap persist.
    pub fn mark(&self, offset: u64, len: u64) -> Result<(), DirtyError> {
        let closed = self.closed.read().unwrap_or_else(PoisonError::into_inner);
        if *closed {
            return Err(DirtyError::Closed);
        }
        let Some((first, last)) = self.al.extent_range(offset, len) else {
            return Ok(());
        };
        let shift = self.al.extent_size().trailing_zeros();
        let end = offset.saturating_add(len);
        let span = self.al.max_span().max(1);
        let mut x = first;
        // Long ranges (big trims) go in chunks the log can hold; evicting an earlier chunk's
        // extents requires its bits to be persisted, so coverage never lapses.
        while x <= last {
            let chunk_last = last.min(x + span - 1);
            let s = offset.max(x << shift);
            let e = end.min((chunk_last + 1) << shift);
            self.al
                .touch(x, chunk_last, &|| self.bitmap.mark(s, e - s), &|| {
                    self.persist_bitmap(false)
                })?;
            x = chunk_last + 1;
        }
        Ok(())
    }

    /// [`mark`](Self::mark) only if it needs no I/O and no waiting (the extents are already
    /// in the activity log and no lock is contended); `None` otherwise.
    pub fn try_mark(&self, offset: u64, len: u64) -> Option<Result<(), DirtyError>> {
        let closed = self.closed.try_read().ok()?;
        if *closed {
            return Some(Err(DirtyError::Closed));
        }
        let Some((first, last)) = self.al.extent_range(offset, len) else {
            return Some(Ok(()));
        };
        self.al
            .try_touch(first, last, &|| self.bitmap.mark(offset, len))
            .then_some(Ok(()))
    }

    fn persist_bitmap(&self, clean: bool) -> Result<(), DirtyError> {
        let mut st = self.persist.lock().unwrap_or_else(PoisonError::into_inner);
        let e = self.al.begin_cover();
        self.bitmap
            .save_with(&self.paths.bitmap, clean, &mut st.buf)?;
        self.al.end_cover(e);
        self.persists.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Periodic persist: writes the bitmap (clean flag off), then drops activity-log extents
    /// idle since the previous periodic persist. Blocking. A no-op once closed.
    pub fn persist(&self) -> Result<(), DirtyError> {
        // Held throughout so a clean close cannot be overwritten by an unclean persist.
        let closed = self.closed.read().unwrap_or_else(PoisonError::into_inner);
        if *closed {
            return Ok(());
        }
        // Entries used from now on carry the new clock; those still below the previous
        // persist's clock afterwards were idle for a whole interval.
        let now = self.al.advance_clock();
        self.persist_bitmap(false)?;
        let prev = self.prev_clock.swap(now, Ordering::Relaxed);
        self.al.evict_idle(prev)?;
        Ok(())
    }

    /// Clean shutdown: after every write has completed, persists the bitmap with the clean
    /// flag set. Later [`mark`](Self::mark)s fail with [`DirtyError::Closed`].
    pub fn close_clean(&self) -> Result<(), DirtyError> {
        let mut closed = self.closed.write().unwrap_or_else(PoisonError::into_inner);
        if *closed {
            return Ok(());
        }
        self.persist_bitmap(true)?;
        *closed = true;
        Ok(())
    }

    /// Clears regions lying entirely inside `offset..offset+len`. Call only once the replica
    /// *and the local disk* (a flush after the write) hold that data durably, and no newer
    /// write to the range is still queued for replication (see
    /// `ProtectedDevice::clear_replicated`, which flushes the local disk first).
    pub fn clear_range(&self, offset: u64, len: u64) {
        self.bitmap.clear_range(offset, len);
    }

    /// The bitmap, for iterating dirty regions. Writes must be marked through
    /// [`mark`](Self::mark), never on the bitmap directly (that would skip the activity log).
    pub fn bitmap(&self) -> &DirtyBitmap {
        &self.bitmap
    }

    /// The live activity log.
    pub fn activity_log(&self) -> &ActivityLog {
        &self.al
    }

    /// The file locations.
    pub fn paths(&self) -> &DirtyPaths {
        &self.paths
    }

    /// Number of bitmap persists done since open.
    pub fn persist_count(&self) -> u64 {
        self.persists.load(Ordering::Relaxed)
    }

    /// Starts the named background persister: every `every`, persist on a blocking thread.
    /// Stops on `cancel` (without a clean close: that is the owner's call).
    pub fn spawn_persister(
        self: &Arc<Self>,
        every: Duration,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let name = me.paths.bitmap.display().to_string();
            tracing::debug!(worker = "dirty-persister", bitmap = %name, "started");
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(every) => {}
                }
                let t = Arc::clone(&me);
                match tokio::task::spawn_blocking(move || t.persist()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(worker = "dirty-persister", bitmap = %name, error = %e, "persist failed")
                    }
                    Err(e) => {
                        tracing::warn!(worker = "dirty-persister", bitmap = %name, error = %e, "persist task failed")
                    }
                }
            }
            tracing::debug!(worker = "dirty-persister", bitmap = %name, "stopped");
        })
    }
}
