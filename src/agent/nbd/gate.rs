//! The consistency-barrier hook: a [`CompletionGate`] lets the agent briefly *hold write
//! completions* — writes keep being accepted and applied locally (and handed to the
//! replication sink), but their replies wait — while a checkpoint marker is inserted into
//! every disk's stream; then it releases them.
//!
//! Why that is enough for a crash-consistent checkpoint C across hosts: a write whose sink
//! hand-off came after the marker cannot be acknowledged before the release, and the
//! release happens only after every disk got its marker. So no write acknowledged before
//! C's release depends on a write that landed after C on any disk.
//!
//! Ordering argument for one disk: the holder sets the gate (SeqCst) *before* inserting
//! the marker into the stream; the write path hands the write to the sink *before* it
//! checks the gate. If the write lands after the marker in the stream, the stream's own
//! synchronisation orders the gate store before the write's check, so the check sees
//! "held". Writes that landed before the marker may be delayed too; that is harmless.
//!
//! Cost when not held: one atomic load per write reply.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Shared by every protected disk that must be held together (e.g. all disks of a VPG on
/// this host). Holds nest: completions flow again when the last [`HoldGuard`] is dropped.
#[derive(Debug, Default)]
pub struct CompletionGate {
    holds: AtomicUsize,
    released: Notify,
    hold_count: AtomicU64,
    held_nanos: AtomicU64,
}

impl CompletionGate {
    /// A new, open gate.
    pub fn new() -> Arc<Self> {
        Arc::new(CompletionGate::default())
    }

    /// Starts holding write completions until the returned guard is dropped (or
    /// [`HoldGuard::release`]d). The owner must bound the hold (milliseconds); a hold that
    /// is never released stalls the guests' writes.
    pub fn hold(self: &Arc<Self>) -> HoldGuard {
        self.holds.fetch_add(1, Ordering::SeqCst);
        HoldGuard {
            gate: Arc::clone(self),
            start: Instant::now(),
            done: false,
        }
    }

    /// Whether completions are currently held. One atomic load.
    pub fn is_held(&self) -> bool {
        self.holds.load(Ordering::SeqCst) != 0
    }

    /// Resolves once the gate is open (immediately if it is).
    pub async fn wait_released(&self) {
        loop {
            let notified = self.released.notified();
            tokio::pin!(notified);
            // Register before checking, so a release between the check and the await is
            // not missed.
            notified.as_mut().enable();
            if !self.is_held() {
                return;
            }
            notified.await;
        }
    }

    /// Number of holds completed so far.
    pub fn hold_count(&self) -> u64 {
        self.hold_count.load(Ordering::Relaxed)
    }

    /// Total time spent held (sum over completed holds; overlapping holds count twice).
    pub fn total_held(&self) -> Duration {
        Duration::from_nanos(self.held_nanos.load(Ordering::Relaxed))
    }

    fn release_one(&self, held: Duration) {
        self.hold_count.fetch_add(1, Ordering::Relaxed);
        self.held_nanos.fetch_add(
            u64::try_from(held.as_nanos()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
        if self.holds.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.released.notify_waiters();
        }
    }
}

/// An active hold; dropping it releases.
#[derive(Debug)]
#[must_use = "the hold ends when the guard is dropped"]
pub struct HoldGuard {
    gate: Arc<CompletionGate>,
    start: Instant,
    done: bool,
}

impl HoldGuard {
    /// Releases now and returns how long completions were held by this guard.
    pub fn release(mut self) -> Duration {
        let held = self.start.elapsed();
        self.done = true;
        self.gate.release_one(held);
        held
    }
}

impl Drop for HoldGuard {
    fn drop(&mut self) {
        if !self.done {
            self.gate.release_one(self.start.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn nested_holds_release_at_last() {
        let g = CompletionGate::new();
        assert!(!g.is_held());
        g.wait_released().await;
        let a = g.hold();
        let b = g.hold();
        let g2 = Arc::clone(&g);
        let waiter = tokio::spawn(async move { g2.wait_released().await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        let held = b.release();
        assert!(held >= Duration::from_millis(40));
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(g.hold_count(), 2);
    }
}
