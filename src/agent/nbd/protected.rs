//! A protected disk as an export: [`ProtectedDevice`] = local device (write-through) +
//! dirty tracking + a [`WriteSink`] (the replication splitter) + a [`CompletionGate`].
//!
//! Order of one write, and why:
//! 1. lock the byte range against overlapping writes, so the sink sees overlapping writes
//!    in the order they were applied locally (otherwise the replica could end different);
//! 2. mark the dirty bitmap / activity log (durable coverage *before* the data lands);
//! 3. write locally (FUA honoured);
//! 4. hand the write to the sink (only writes that succeeded locally are replicated);
//! 5. unlock; the server then passes the completion gate and replies.
//!
//! The guest gets its acknowledgement after the local write: replication is asynchronous.

use std::io;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::agent::dirty::DirtyTracker;

use super::device::{BlockDevice, FileDevice};
use super::gate::{CompletionGate, HoldGuard};
use super::NbdError;

/// One accepted change to a protected disk, as handed to the [`WriteSink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteEvent<'a> {
    /// Data written.
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: &'a [u8],
        /// Whether the guest asked for FUA.
        fua: bool,
    },
    /// Range zeroed (`NBD_CMD_WRITE_ZEROES`).
    Zeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// Range discarded (`NBD_CMD_TRIM`); it now reads as zeroes.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
}

/// Receives every accepted change, after the local write succeeded and before the guest is
/// answered, in local application order for overlapping ranges. Called concurrently for
/// non-overlapping ranges, on blocking threads *and*, for small writes taking the server's
/// fast path, on async runtime threads: it must never block (take a short lock, copy,
/// return). When it cannot keep a record (queue full, peer gone) it drops it; the dirty
/// bitmap still has the region.
pub trait WriteSink: Send + Sync + 'static {
    /// Takes one change. Copy `data` if it must outlive the call.
    fn accept(&self, event: &WriteEvent<'_>);
}

/// A sink that ignores everything (a disk not yet replicating).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl WriteSink for NullSink {
    fn accept(&self, _event: &WriteEvent<'_>) {}
}

/// An owned copy of a [`WriteEvent`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordedEvent {
    /// See [`WriteEvent::Write`].
    Write {
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: Vec<u8>,
        /// FUA requested.
        fua: bool,
    },
    /// See [`WriteEvent::Zeroes`].
    Zeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
    /// See [`WriteEvent::Trim`].
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u64,
    },
}

impl RecordedEvent {
    /// Applies the event to an in-memory disk image (for checking a replica model).
    pub fn apply(&self, image: &mut [u8]) {
        match self {
            RecordedEvent::Write { offset, data, .. } => {
                let o = *offset as usize;
                image[o..o + data.len()].copy_from_slice(data);
            }
            RecordedEvent::Zeroes { offset, len } | RecordedEvent::Trim { offset, len } => {
                let o = *offset as usize;
                image[o..o + *len as usize].fill(0);
            }
        }
    }
}

/// A sink that records every event in order (tests, diagnostics).
#[derive(Debug, Default)]
pub struct RecordingSink {
    events: Mutex<Vec<RecordedEvent>>,
}

impl RecordingSink {
    /// An empty recorder.
    pub fn new() -> Arc<Self> {
        Arc::new(RecordingSink::default())
    }

    /// Takes the events recorded so far.
    pub fn take(&self) -> Vec<RecordedEvent> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Number of events recorded so far.
    pub fn len(&self) -> usize {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl WriteSink for RecordingSink {
    fn accept(&self, event: &WriteEvent<'_>) {
        let rec = match *event {
            WriteEvent::Write { offset, data, fua } => RecordedEvent::Write {
                offset,
                data: data.to_vec(),
                fua,
            },
            WriteEvent::Zeroes { offset, len } => RecordedEvent::Zeroes { offset, len },
            WriteEvent::Trim { offset, len } => RecordedEvent::Trim { offset, len },
        };
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(rec);
    }
}

/// Byte ranges currently being changed; overlapping changes wait for each other.
#[derive(Debug, Default)]
struct RangeLocks {
    active: Mutex<Ranges>,
    freed: Condvar,
}

#[derive(Debug, Default)]
struct Ranges {
    held: Vec<(u64, u64)>,
    /// Threads waiting: the release skips the wake-up syscall when there are none.
    waiters: usize,
}

struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Locks `start..end` if nothing overlapping is locked; never waits.
    fn try_lock(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        if active.held.iter().any(|&(s, e)| s < end && start < e) {
            return None;
        }
        active.held.push((start, end));
        Some(RangeGuard {
            locks: self,
            range: (start, end),
        })
    }

    fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let mut active = self.active.lock().unwrap_or_else(PoisonError::into_inner);
        while active.held.iter().any(|&(s, e)| s < end && start < e) {
            active.waiters += 1;
            active = self
                .freed
                .wait(active)
                .unwrap_or_else(PoisonError::into_inner);
            active.waiters -= 1;
        }
        active.held.push((start, end));
        RangeGuard {
            locks: self,
            range: (start, end),
        }
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut active = self
            .locks
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = active.held.iter().position(|r| *r == self.range) {
            active.held.swap_remove(i);
        }
        let wake = active.waiters > 0;
        drop(active);
        if wake {
            self.locks.freed.notify_all();
        }
    }
}

/// A protected disk: see the module documentation.
pub struct ProtectedDevice<D: BlockDevice = FileDevice> {
    inner: D,
    tracker: Arc<DirtyTracker>,
    sink: Arc<dyn WriteSink>,
    gate: Arc<CompletionGate>,
    ranges: RangeLocks,
}

impl<D: BlockDevice> std::fmt::Debug for ProtectedDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProtectedDevice")
            .field("size", &self.inner.size())
            .field("held", &self.gate.is_held())
            .finish_non_exhaustive()
    }
}

fn dirty_io(e: crate::agent::dirty::DirtyError) -> io::Error {
    io::Error::other(e)
}

impl<D: BlockDevice> ProtectedDevice<D> {
    /// Wraps `inner`. The tracker must have been opened for `inner.size()` bytes; `gate` is
    /// usually shared by every disk that is checkpointed together.
    pub fn new(
        inner: D,
        tracker: Arc<DirtyTracker>,
        sink: Arc<dyn WriteSink>,
        gate: Arc<CompletionGate>,
    ) -> Result<Self, NbdError> {
        if tracker.bitmap().disk_size() != inner.size() {
            return Err(NbdError::Config(format!(
                "dirty tracker is for {} bytes, device has {}",
                tracker.bitmap().disk_size(),
                inner.size()
            )));
        }
        Ok(ProtectedDevice {
            inner,
            tracker,
            sink,
            gate,
            ranges: RangeLocks::default(),
        })
    }

    /// Holds write completions on every device sharing this gate (see [`CompletionGate`]).
    pub fn hold(&self) -> HoldGuard {
        self.gate.hold()
    }

    /// The completion gate.
    pub fn gate(&self) -> &Arc<CompletionGate> {
        &self.gate
    }

    /// The dirty tracker.
    pub fn tracker(&self) -> &Arc<DirtyTracker> {
        &self.tracker
    }

    /// The local device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// Clears the dirty bits of ranges the replica has made durable. First makes the local
    /// disk durable (one fdatasync for the batch): a bit may only go once *both* copies
    /// hold the data, or a power loss here could silently leave the local disk older than
    /// the replica. The caller guarantees no newer write to these ranges is still queued
    /// for replication. Blocking.
    pub fn clear_replicated(&self, ranges: &[(u64, u64)]) -> Result<(), NbdError> {
        self.inner.flush()?;
        for &(offset, len) in ranges {
            self.tracker.clear_range(offset, len);
        }
        Ok(())
    }

    /// Runs `f` on the local device with `offset..offset+len` locked against guest
    /// changes: a sync reads a range and queues its content inside `f`, so no guest write
    /// to the range can land between the read and the queueing. Blocking.
    pub fn with_range_locked<R>(&self, offset: u64, len: u64, f: impl FnOnce(&D) -> R) -> R {
        let _range = self.ranges.lock(offset, offset.saturating_add(len));
        f(&self.inner)
    }

    /// Clean shutdown of the disk, once no request is in flight (export removed and
    /// drained, see [`ExportRegistry::remove_and_drain`](super::ExportRegistry::remove_and_drain)):
    /// fdatasync the local disk, then persist the bitmap with its clean flag. Blocking.
    pub fn shutdown_clean(&self) -> Result<(), NbdError> {
        self.inner.flush()?;
        self.tracker.close_clean()?;
        Ok(())
    }

    fn change(
        &self,
        offset: u64,
        len: u64,
        apply: impl FnOnce() -> io::Result<()>,
        event: WriteEvent<'_>,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.inner.size())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOSPC))?;
        let _range = self.ranges.lock(offset, end);
        self.tracker.mark(offset, len).map_err(dirty_io)?;
        apply()?;
        self.sink.accept(&event);
        Ok(())
    }
}

impl<D: BlockDevice> BlockDevice for ProtectedDevice<D> {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn can_multi_conn(&self) -> bool {
        self.inner.can_multi_conn()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        self.inner.read_nowait(buf, offset)
    }

    /// The same steps as `write_at`, each without waiting: the range must be free, the
    /// extents already in the activity log, and the local write quick; else `None`.
    fn write_nowait(&self, buf: &[u8], offset: u64) -> Option<io::Result<()>> {
        let len = buf.len() as u64;
        let end = offset.checked_add(len)?;
        if len == 0 || end > self.inner.size() {
            return None;
        }
        let _range = self.ranges.try_lock(offset, end)?;
        if let Err(e) = self.tracker.try_mark(offset, len)? {
            return Some(Err(dirty_io(e)));
        }
        // Marked but not written if this is `None`: harmless, the retry marks again.
        if let Err(e) = self.inner.write_nowait(buf, offset)? {
            return Some(Err(e));
        }
        self.sink.accept(&WriteEvent::Write {
            offset,
            data: buf,
            fua: false,
        });
        Some(Ok(()))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        self.change(
            offset,
            buf.len() as u64,
            || self.inner.write_at(buf, offset, fua),
            WriteEvent::Write {
                offset,
                data: buf,
                fua,
            },
        )
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        self.change(
            offset,
            len,
            || self.inner.write_zeroes(offset, len, may_trim, fua),
            WriteEvent::Zeroes { offset, len },
        )
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.change(
            offset,
            len,
            || self.inner.trim(offset, len, fua),
            WriteEvent::Trim { offset, len },
        )
    }

    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }

    fn completion_gate(&self) -> Option<Arc<CompletionGate>> {
        Some(Arc::clone(&self.gate))
    }
}
