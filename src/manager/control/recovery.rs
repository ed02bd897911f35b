//! Which checkpoints every journal of a VPG holds durably and recoverably, from the
//! recovery hosts' heartbeats.
//!
//! One [`DiskJournal`] per (protected host, disk id), merged from the incremental
//! reports. The first heartbeat of a connection lists everything the recovery host
//! holds, so it replaces what that host reported before (a journal it no longer has
//! disappears, ids that fell into a hole are dropped). In memory only: after a manager
//! restart the sets refill from the agents' first heartbeats, and until then the
//! evaluator decides nothing from them (`model::checkpoints::judge`).

use std::collections::{HashMap, HashSet};
use std::sync::{Mutex, MutexGuard, OnceLock, PoisonError};

use super::Hub;
use crate::model::checkpoints::{judge, DiskJournal, RecoveryVerdict};
use crate::proto::control::JournalReport;

/// A journal is known by the protected host it belongs to and the disk id there.
pub type DiskKey = (String, u64);

struct Entry {
    /// The recovery host that reports this journal.
    reported_by: String,
    journal: DiskJournal,
}

/// What the journals of a set of disks say together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JournalFacts {
    /// Sum of the journals' sizes; `None` unless every disk is reported.
    pub bytes: Option<u64>,
    /// The first storage error any of them reports.
    pub storage_error: Option<String>,
}

/// See the module documentation.
#[derive(Default)]
pub struct RecoveryTracker {
    disks: Mutex<HashMap<DiskKey, Entry>>,
    /// To tell a connection's first heartbeat (the hub has none recorded yet).
    hub: OnceLock<Hub>,
}

impl RecoveryTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets the tracker see the hub (set once when the evaluator starts).
    pub fn attach(&self, hub: Hub) {
        let _ = self.hub.set(hub);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<DiskKey, Entry>> {
        self.disks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A heartbeat's journal reports from recovery host `host`. Called before the hub
    /// records the heartbeat, so "no heartbeat recorded" means the connection's first.
    pub fn on_journals(&self, host: &str, journals: &[JournalReport]) {
        let first = self
            .hub
            .get()
            .is_some_and(|h| h.live(host).is_none_or(|l| l.heartbeat.is_none()));
        self.apply(host, journals, first);
    }

    fn apply(&self, host: &str, journals: &[JournalReport], complete: bool) {
        let mut g = self.lock();
        if complete {
            g.retain(|_, e| e.reported_by != host);
        }
        for j in journals {
            let e = g
                .entry((j.host.clone(), j.disk_id))
                .or_insert_with(|| Entry {
                    reported_by: host.to_string(),
                    journal: DiskJournal::default(),
                });
            if e.reported_by != host {
                // The disk now replicates to another recovery host: its journal there
                // starts from nothing.
                e.reported_by = host.to_string();
                e.journal = DiskJournal::default();
            }
            e.journal
                .apply(&j.recoverable, j.oldest_recoverable, j.newest_recoverable);
            e.journal.journal_bytes = j.journal_bytes;
            e.journal.storage_error = j.storage_error.clone();
        }
    }

    /// What follows for a VPG's pending checkpoints from the journals of `disks` (one
    /// entry per member disk; `None` for a disk whose agent id is not known).
    pub fn judge(&self, pending: &[u64], disks: &[Option<DiskKey>]) -> RecoveryVerdict {
        let g = self.lock();
        let journals: Vec<Option<&DiskJournal>> = disks
            .iter()
            .map(|k| k.as_ref().and_then(|k| g.get(k)).map(|e| &e.journal))
            .collect();
        judge(pending, &journals)
    }

    pub fn facts(&self, disks: &[Option<DiskKey>]) -> JournalFacts {
        let g = self.lock();
        let mut bytes = Some(0u64);
        let mut storage_error = None;
        for k in disks {
            match k.as_ref().and_then(|k| g.get(k)) {
                Some(e) => {
                    bytes = bytes.map(|b| b.saturating_add(e.journal.journal_bytes));
                    if storage_error.is_none() {
                        storage_error.clone_from(&e.journal.storage_error);
                    }
                }
                None => bytes = None,
            }
        }
        JournalFacts {
            bytes,
            storage_error,
        }
    }

    /// Forgets journals of disks no VPG protects any more.
    pub fn retain(&self, keep: &HashSet<DiskKey>) {
        self.lock().retain(|k, _| keep.contains(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(disk: u64, ids: &[u64], oldest: Option<u64>) -> JournalReport {
        JournalReport {
            host: "prod".into(),
            disk_id: disk,
            recoverable: ids.to_vec(),
            oldest_recoverable: oldest,
            newest_recoverable: ids.iter().max().copied(),
            journal_bytes: 100,
            storage_error: None,
        }
    }

    fn key(d: u64) -> Option<DiskKey> {
        Some(("prod".into(), d))
    }

    #[test]
    fn incremental_reports_merge_and_a_first_heartbeat_replaces() {
        let t = RecoveryTracker::new();
        t.apply("dr", &[report(1, &[10, 11], Some(10))], true);
        t.apply("dr", &[report(1, &[12], Some(10))], false);
        let v = t.judge(&[10, 11, 12, 13], &[key(1)]);
        assert_eq!(v.newly_recoverable, [10, 11, 12]);
        // Reconnected: the full list no longer has 11 (a hole), and disk 2 is gone.
        t.apply("dr", &[report(2, &[12], Some(12))], false);
        t.apply("dr", &[report(1, &[10, 12], Some(10))], true);
        assert_eq!(t.judge(&[11, 12], &[key(1)]).newly_recoverable, [12]);
        assert_eq!(t.judge(&[12], &[key(2)]), RecoveryVerdict::default());
        assert_eq!(
            t.facts(&[key(1), key(2)]),
            JournalFacts {
                bytes: None,
                storage_error: None
            }
        );
        assert_eq!(t.facts(&[key(1)]).bytes, Some(100));
    }

    #[test]
    fn a_disk_moving_to_another_recovery_host_starts_over() {
        let t = RecoveryTracker::new();
        t.apply("dr1", &[report(1, &[10], Some(10))], true);
        t.apply("dr2", &[report(1, &[20], Some(20))], true);
        assert_eq!(t.judge(&[10, 20], &[key(1)]).newly_recoverable, [20]);
        // dr1 reconnecting does not take dr2's journal away.
        t.apply("dr1", &[], true);
        assert_eq!(t.judge(&[20], &[key(1)]).newly_recoverable, [20]);
    }
}
