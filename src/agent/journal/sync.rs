//! The sync thread of a journal: pipelined group commit ([`Durability`] is its public
//! face).
//!
//! Why a thread: `fdatasync` blocks for as long as the device takes to write back the
//! dirty pages and flush its cache. Run on the append path, the device idles while the
//! appender fills the next group and the appender idles while the device writes: the
//! journal reached only ~0.6 of a raw sequential write. With the sync on its own thread,
//! appends go on into the page cache while the previous group is written back, so the
//! device always has the next group waiting.
//!
//! What "durable" means: the appender hands the kernel every byte of a record
//! (`pwrite` returned) *before* it queues a request naming that record's seq. The
//! thread calls `fdatasync` on the segment only after taking the request, so that call
//! started after those bytes were written, and when it returns they are on stable
//! storage (ext4/xfs write back every page dirty when the call starts; pages dirtied
//! during it are not waited for and are not claimed). Only then does the durable seq
//! advance, to exactly the request's seq: a record appended while the call ran stays
//! un-durable until a later request covers it. A failed call never advances it: the
//! thread records the failure, stops syncing (after an `fdatasync` error the page cache
//! can no longer be trusted, the "fsyncgate" lesson) and every waiter and the journal
//! then report `Closed`.
//!
//! Requests form a FIFO queue; a request for the same segment as the last queued one
//! replaces it (one `fdatasync` covers both), so a slow device makes groups bigger
//! instead of making the queue longer. Requests for different segments stay in order:
//! an older segment is always synced first.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::error::{io_at, io_err};
use super::segment::segment_path;
use super::{sync_dir, FaultHook, FaultPoint, JournalError};

type Result<T, E = JournalError> = std::result::Result<T, E>;

/// "Make the segment durable up to `end`, which makes every seq ≤ `seq` durable".
pub(crate) struct SyncReq {
    pub(crate) seg: u32,
    pub(crate) file: Arc<File>,
    /// Bytes of the segment handed to the kernel when the request was made.
    pub(crate) end: u64,
    pub(crate) seq: u64,
    /// Also fsync the journal directory (a segment was created since the last request).
    pub(crate) dir: bool,
}

/// Where the durable seq stands in the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DurablePos {
    pub(crate) seq: u64,
    pub(crate) seg: u32,
    /// Every byte of `seg` below this is durable.
    pub(crate) end: u64,
}

struct State {
    queue: VecDeque<SyncReq>,
    /// The thread took a request and has not finished it.
    busy: bool,
    durable: DurablePos,
    /// Highest seq ever queued.
    requested: u64,
    /// The first sync failure; set once, never cleared (the journal must be reopened).
    failed: Option<String>,
    /// The journal is gone: the thread exits, waiters give up.
    stop: bool,
}

struct Inner {
    dir: PathBuf,
    fault: Option<FaultHook>,
    state: Mutex<State>,
    /// The thread waits here for requests (and `stop`).
    work: Condvar,
    /// Waiters wait here for progress (and failure, and `stop`).
    done: Condvar,
    /// Mirror of `state.durable.seq`, for reads that must not take the lock.
    durable: AtomicU64,
    /// Mirror of `state.failed.is_some()`, checked on every append.
    failed: AtomicBool,
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // The lock is never held across a call that can panic halfway through an update.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready` holds, the thread failed or stopped, or the deadline passed.
    /// Returns the durable position at the end. `Ok` does not mean `ready` held when a
    /// deadline was given. Without a deadline (the journal's own waits, for a request it
    /// just queued) the thread going idle with `ready` still false is an error instead
    /// of a hang: nothing would ever make it true.
    fn wait_for(
        &self,
        deadline: Option<Instant>,
        mut ready: impl FnMut(&State) -> bool,
    ) -> Result<DurablePos> {
        let mut st = self.state();
        loop {
            if ready(&st) {
                return Ok(st.durable);
            }
            if let Some(why) = &st.failed {
                return Err(JournalError::Closed(why.clone()));
            }
            if st.stop {
                return Err(JournalError::Closed("the journal was closed".into()));
            }
            if deadline.is_none() && st.queue.is_empty() && !st.busy {
                return Err(JournalError::Closed(
                    "internal error: waited for a sync that was never requested".into(),
                ));
            }
            st = match deadline {
                None => self.done.wait(st).unwrap_or_else(|e| e.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Ok(st.durable);
                    }
                    self.done
                        .wait_timeout(st, d - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }

    fn run(&self) {
        loop {
            let req = {
                let mut st = self.state();
                loop {
                    if st.stop || st.failed.is_some() {
                        // Requests still queued are abandoned: dropping a journal without
                        // `close` is a crash, and nothing in them was reported durable.
                        return;
                    }
                    if let Some(r) = st.queue.pop_front() {
                        st.busy = true;
                        break r;
                    }
                    st = self.work.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            let r = self.sync_one(&req);
            let mut st = self.state();
            st.busy = false;
            match r {
                Ok(()) => {
                    // Requests are taken in order, so this only moves forward; `max` keeps
                    // that true even against `force` (which only runs when idle).
                    if req.seq >= st.durable.seq {
                        st.durable = DurablePos {
                            seq: req.seq,
                            seg: req.seg,
                            end: req.end,
                        };
                        self.durable.store(req.seq, Ordering::Release);
                    }
                }
                Err(e) => {
                    tracing::error!(dir = %self.dir.display(), error = %e, "journal sync failed");
                    st.failed = Some(e.to_string());
                    st.queue.clear();
                    self.failed.store(true, Ordering::Release);
                }
            }
            drop(st);
            self.done.notify_all();
        }
    }

    fn sync_one(&self, req: &SyncReq) -> Result<()> {
        if let Some(h) = &self.fault {
            h(FaultPoint::SegmentSync { segment: req.seg })?;
        }
        if req.dir {
            sync_dir(&self.dir)?;
        }
        req.file.sync_data().map_err(|e| {
            io_at(
                "fdatasync journal segment",
                &segment_path(&self.dir, req.seg),
                e,
            )
        })?;
        if let Some(h) = &self.fault {
            h(FaultPoint::SegmentSynced { segment: req.seg })?;
        }
        Ok(())
    }
}

/// A handle on a journal's durable seq, for a thread other than the appender (the
/// replication receiver's acknowledger): cheap to clone, `Send + Sync`, and usable
/// while the journal appends. Outlives the journal harmlessly (waits then fail with
/// `Closed`).
#[derive(Clone)]
pub struct Durability {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durability")
            .field("durable_seq", &self.durable_seq())
            .finish()
    }
}

impl Durability {
    /// Highest seq known durable: every record with seq ≤ it survives a crash. One
    /// atomic load.
    pub fn durable_seq(&self) -> u64 {
        self.inner.durable.load(Ordering::Acquire)
    }

    /// Highest seq a sync was asked for (by `request_sync`, `sync`, or the journal
    /// itself: segment rotation, back-pressure). Above [`Durability::durable_seq`] while
    /// a sync is queued or running; equal once the thread caught up.
    pub fn requested_seq(&self) -> u64 {
        self.inner.state().requested
    }

    /// Blocks until `seq` is durable or `timeout` passed; returns the durable seq then
    /// (below `seq` on a timeout: compare). It only waits: some thread must have asked
    /// for a sync covering `seq` ([`super::Journal::request_sync`]) or it times out.
    ///
    /// Errors: `Closed` if a sync failed (the journal is closed, `seq` will never become
    /// durable in this process) or the journal was dropped before `seq` became durable.
    pub fn wait_durable(&self, seq: u64, timeout: Duration) -> Result<u64> {
        let deadline = Instant::now().checked_add(timeout);
        self.inner
            .wait_for(deadline, |st| st.durable.seq >= seq)
            .map(|p| p.seq)
    }
}

/// The journal's side of the sync thread. Dropping it stops and joins the thread.
pub(crate) struct Syncer {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Syncer {
    pub(crate) fn start(dir: PathBuf, fault: Option<FaultHook>) -> Result<Syncer> {
        let inner = Arc::new(Inner {
            dir,
            fault,
            state: Mutex::new(State {
                queue: VecDeque::new(),
                busy: false,
                durable: DurablePos {
                    seq: 0,
                    seg: 0,
                    end: 0,
                },
                requested: 0,
                failed: None,
                stop: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            durable: AtomicU64::new(0),
            failed: AtomicBool::new(false),
        });
        let me = inner.clone();
        let thread = std::thread::Builder::new()
            .name("journal-sync".into())
            .spawn(move || me.run())
            .map_err(io_err("start the journal sync thread"))?;
        Ok(Syncer {
            inner,
            thread: Some(thread),
        })
    }

    pub(crate) fn handle(&self) -> Durability {
        Durability {
            inner: self.inner.clone(),
        }
    }

    pub(crate) fn durable_seq(&self) -> u64 {
        self.inner.durable.load(Ordering::Acquire)
    }

    pub(crate) fn durable_pos(&self) -> DurablePos {
        self.inner.state().durable
    }

    /// The first sync failure, if any. Lock-free unless there was one.
    pub(crate) fn failure(&self) -> Option<String> {
        if !self.inner.failed.load(Ordering::Acquire) {
            return None;
        }
        self.inner.state().failed.clone()
    }

    /// Queues a request; the caller has written every byte it covers.
    pub(crate) fn request(&self, req: SyncReq) -> Result<()> {
        let mut st = self.inner.state();
        if let Some(why) = &st.failed {
            return Err(JournalError::Closed(why.clone()));
        }
        st.requested = st.requested.max(req.seq);
        match st.queue.back_mut() {
            // Not yet taken by the thread: one fdatasync will cover both.
            Some(last) if last.seg == req.seg => {
                last.dir |= req.dir;
                last.end = last.end.max(req.end);
                last.seq = last.seq.max(req.seq);
            }
            _ => st.queue.push_back(req),
        }
        drop(st);
        self.inner.work.notify_one();
        Ok(())
    }

    /// Blocks (no timeout) until `ready` holds; `Closed` if the thread failed.
    pub(crate) fn wait(&self, ready: impl FnMut(&DurablePos) -> bool) -> Result<DurablePos> {
        let mut ready = ready;
        if let Some(h) = &self.inner.fault {
            // Tell a test that gates the thread that someone now depends on it.
            if !ready(&self.inner.state().durable) {
                h(FaultPoint::SyncWait)?;
            }
        }
        self.inner.wait_for(None, |st| ready(&st.durable))
    }

    /// Blocks until no request is queued or running.
    pub(crate) fn wait_idle(&self) -> Result<()> {
        let idle = |st: &State| st.queue.is_empty() && !st.busy;
        if let Some(h) = &self.inner.fault {
            if !idle(&self.inner.state()) {
                h(FaultPoint::SyncWait)?;
            }
        }
        self.inner.wait_for(None, idle).map(|_| ())
    }

    /// Declares `pos` durable without a request: for `open` and `commit`, which made
    /// everything durable themselves while nothing was queued. Never moves backwards.
    pub(crate) fn force(&self, pos: DurablePos) {
        let mut st = self.inner.state();
        debug_assert!(
            st.queue.is_empty() && !st.busy,
            "force with syncs in flight"
        );
        if pos.seq >= st.durable.seq {
            st.durable = pos;
            st.requested = st.requested.max(pos.seq);
            self.inner.durable.store(pos.seq, Ordering::Release);
        }
        drop(st);
        self.inner.done.notify_all();
    }
}

impl Syncer {
    /// Stops the thread (idempotent): a sync in progress is waited for, queued ones are
    /// abandoned, as when the journal is dropped. Waiters get `Closed` from then on.
    pub(crate) fn stop(&mut self) {
        self.inner.state().stop = true;
        self.inner.work.notify_all();
        self.inner.done.notify_all();
        if let Some(t) = self.thread.take() {
            // An fdatasync in progress cannot be interrupted; joining waits for it so no
            // thread touches the files once the journal is gone.
            if t.join().is_err() {
                tracing::error!(dir = %self.inner.dir.display(), "journal sync thread panicked");
            }
        }
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.stop();
    }
}
