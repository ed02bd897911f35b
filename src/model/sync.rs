//! Which sync a replicated disk needs, whether it may start now, and what stays
//! recoverable meanwhile: pure decisions over facts the agents report (DESIGN §5, the
//! sync rows of the Zerto status table, Hyper-V's resynchronisation policy).
//!
//! The decision is a precedence list, most drastic first, so that one disk never runs two
//! syncs for two causes: the most thorough sync that any cause demands covers the others.

use super::settings::{Priority, ResyncPolicy};
use super::status::SyncKind;

/// What the protected side's dirty tracking found at agent start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tracking {
    /// Never tracked (a new disk): nothing to say.
    New,
    /// Clean shutdown: the bitmap is exact.
    Clean,
    /// Crash: bitmap ∪ activity-log extents cover every region that may differ.
    Unclean,
    /// Tracking files missing or damaged: nothing is known about what changed.
    Lost,
}

/// Everything the decision looks at, for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSyncFacts {
    pub protected_size: u64,
    /// Size of the replica disk at the recovery site, `None` when there is none yet.
    pub replica_size: Option<u64>,
    /// The operator registered a copy already at the recovery site (restored backup,
    /// external media) as the replica.
    pub preseeded: bool,
    pub tracking: Tracking,
    /// Regions the bitmap marks as owed to a sync.
    pub dirty_regions: u64,
    /// The stream dropped records (outbound overflow, peer away too long).
    pub bitmap_only: bool,
    /// The recovery journal was reopened after a storage error holding less than it had
    /// made durable (the recovery side says so): what it lost is in no bitmap, and its
    /// replica's consistency with the stream is unknown.
    pub journal_lost_records: bool,
    /// The recovery host refused the disk's stream for a journal storage error since
    /// the last completed sync (it could not take records): what the stream dropped or
    /// the journal lost meanwhile is owed to that error.
    pub journal_refused: bool,
    /// The recovery side holds less than it once acknowledged (its journal was lost or
    /// replaced): the bitmap no longer covers the difference.
    pub replica_behind_acknowledged: bool,
    /// Protection was reversed after a failover: the old protected disk is now the target.
    pub reverse_protection: bool,
    /// Operator's Force Sync.
    pub force_sync: bool,
    /// Operator asked for a full copy.
    pub full_sync_requested: bool,
}

impl DiskSyncFacts {
    /// A steady disk: replica present, same size, clean tracking, nothing dirty.
    pub fn steady(size: u64) -> Self {
        DiskSyncFacts {
            protected_size: size,
            replica_size: Some(size),
            preseeded: false,
            tracking: Tracking::Clean,
            dirty_regions: 0,
            bitmap_only: false,
            journal_lost_records: false,
            journal_refused: false,
            replica_behind_acknowledged: false,
            reverse_protection: false,
            force_sync: false,
            full_sync_requested: false,
        }
    }
}

/// What part of the disk a sync covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncScope {
    WholeDisk,
    /// The bitmap's dirty regions plus the previous run's activity-log extents.
    ActivityLog,
    /// The bitmap's dirty regions only.
    DirtyRegions,
}

/// Why a sync is needed (for events and the console).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncReason {
    NewDisk,
    PreSeeded,
    SizeChanged,
    JournalStorageError,
    ReplicaBehind,
    OperatorFullSync,
    ReverseProtection,
    ForceSync,
    TrackingLost,
    UncleanRestart,
    StreamDropped,
    DirtyAtStart,
}

impl SyncReason {
    pub fn describe(self) -> &'static str {
        match self {
            SyncReason::NewDisk => "the disk has no replica yet",
            SyncReason::PreSeeded => "a pre-seeded copy is compared with the disk",
            SyncReason::SizeChanged => "the protected disk and its replica differ in size",
            SyncReason::JournalStorageError => "the recovery journal had a storage error",
            SyncReason::ReplicaBehind => "the recovery site holds less than it acknowledged",
            SyncReason::OperatorFullSync => "an operator asked for a full sync",
            SyncReason::ReverseProtection => "protection was reversed after a failover",
            SyncReason::ForceSync => "an operator asked for a Force Sync",
            SyncReason::TrackingLost => "the dirty-tracking files were lost or damaged",
            SyncReason::UncleanRestart => "the protected agent restarted after a crash",
            SyncReason::StreamDropped => {
                "writes were tracked in the bitmap only (outbound queue full, peer away, \
                 protection paused or removed)"
            }
            SyncReason::DirtyAtStart => "regions were still dirty at the last clean shutdown",
        }
    }
}

/// A sync a disk needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncNeed {
    pub kind: SyncKind,
    pub scope: SyncScope,
    pub reason: SyncReason,
}

fn need(kind: SyncKind, scope: SyncScope, reason: SyncReason) -> Option<SyncNeed> {
    Some(SyncNeed {
        kind,
        scope,
        reason,
    })
}

/// The sync `f` calls for, if any. See the module documentation for the precedence.
pub fn sync_needed(f: &DiskSyncFacts) -> Option<SyncNeed> {
    use SyncKind::*;
    use SyncScope::*;
    let Some(replica_size) = f.replica_size else {
        return need(Initial, WholeDisk, SyncReason::NewDisk);
    };
    // Sizes first, before anything is sent (Hyper-V checks VHD sizes first too).
    if replica_size != f.protected_size {
        return need(Full, WholeDisk, SyncReason::SizeChanged);
    }
    // A journal storage error costs what it cost, no more: acknowledged records lost →
    // Full; records dropped while the journal refused the disk → the bitmap has them
    // (below); nothing lost → the stream resent it all and no sync is needed.
    if f.journal_lost_records || (f.replica_behind_acknowledged && f.journal_refused) {
        return need(Full, WholeDisk, SyncReason::JournalStorageError);
    }
    if f.replica_behind_acknowledged {
        return need(Full, WholeDisk, SyncReason::ReplicaBehind);
    }
    if f.full_sync_requested {
        return need(Full, WholeDisk, SyncReason::OperatorFullSync);
    }
    if f.preseeded {
        return need(Delta, WholeDisk, SyncReason::PreSeeded);
    }
    if f.reverse_protection {
        return need(Delta, WholeDisk, SyncReason::ReverseProtection);
    }
    if f.force_sync {
        return need(Delta, WholeDisk, SyncReason::ForceSync);
    }
    match f.tracking {
        // A new tracker beside an existing replica: nothing says what differs.
        Tracking::Lost | Tracking::New => return need(Delta, WholeDisk, SyncReason::TrackingLost),
        Tracking::Unclean => return need(Delta, ActivityLog, SyncReason::UncleanRestart),
        Tracking::Clean => {}
    }
    if f.bitmap_only {
        let reason = if f.journal_refused {
            SyncReason::JournalStorageError
        } else {
            SyncReason::StreamDropped
        };
        return need(Bitmap, DirtyRegions, reason);
    }
    if f.dirty_regions > 0 {
        return need(Bitmap, DirtyRegions, SyncReason::DirtyAtStart);
    }
    None
}

/// Whether checkpoints taken before a sync of this kind stay recoverable while it runs
/// (the Zerto table): a Delta or Bitmap sync writes through the journal, so earlier
/// checkpoints keep their meaning; Full and Initial rewrite the replica underneath them.
/// No sync lets a *new* checkpoint become recoverable before it ends.
pub fn keeps_earlier_checkpoints(kind: SyncKind) -> bool {
    matches!(kind, SyncKind::Delta | SyncKind::Bitmap)
}

/// Whether the VPG's resync policy governs this sync. Initial syncs belong to creating
/// protection and Bitmap syncs only resend what the bitmap names; the policy (Hyper-V's
/// "resynchronization") is about the expensive whole-disk comparisons and copies.
pub fn policy_applies(need: &SyncNeed) -> bool {
    match need.kind {
        SyncKind::Initial | SyncKind::Bitmap => false,
        SyncKind::Delta | SyncKind::Full => need.reason != SyncReason::PreSeeded,
    }
}

/// Whether a needed sync may start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartDecision {
    Now,
    /// "Resynchronization required": waits until the window opens, in this many minutes.
    WaitForWindow {
        opens_in_minutes: u16,
    },
    /// "Resynchronization required": waits for an operator to resume.
    WaitForOperator,
}

/// May `need` start at `minute` (minutes after midnight in the manager's zone)?
/// `operator_resumed`: an operator explicitly resumed (overrides manual and window).
pub fn may_start(
    need: &SyncNeed,
    policy: ResyncPolicy,
    minute: u16,
    operator_resumed: bool,
) -> StartDecision {
    if operator_resumed || !policy_applies(need) || policy.allows_start_at(minute) {
        return StartDecision::Now;
    }
    match policy {
        ResyncPolicy::Window { start, .. } => {
            let day = 24 * 60;
            let opens_in = (start.minutes() + day - minute % day) % day;
            StartDecision::WaitForWindow {
                opens_in_minutes: opens_in,
            }
        }
        ResyncPolicy::Manual | ResyncPolicy::Automatic => StartDecision::WaitForOperator,
    }
}

/// One sync waiting for a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedSync {
    pub vpg_priority: Priority,
    pub kind: SyncKind,
    /// When it became needed (any monotonic unit).
    pub since: u64,
}

fn priority_rank(p: Priority) -> u8 {
    match p {
        Priority::High => 0,
        Priority::Medium => 1,
        Priority::Low => 2,
    }
}

fn kind_rank(k: SyncKind) -> u8 {
    // Cheap syncs that restore an SLA quickly go first within a priority.
    match k {
        SyncKind::Bitmap => 0,
        SyncKind::Delta => 1,
        SyncKind::Initial => 2,
        SyncKind::Full => 3,
    }
}

/// Orders waiting syncs: VPG priority, then cheaper kinds, then the longest waiting.
pub fn order_queue(queue: &mut [QueuedSync]) {
    queue.sort_by_key(|q| (priority_rank(q.vpg_priority), kind_rank(q.kind), q.since));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::settings::TimeOfDay;
    use SyncKind::*;
    use SyncScope::*;

    const G: u64 = 1 << 30;

    #[test]
    fn decision_table() {
        type Edit = fn(&mut DiskSyncFacts);
        type Want = Option<(SyncKind, SyncScope, SyncReason)>;
        let rows: &[(&str, Edit, Want)] = &[
            ("steady", |_| {}, None),
            (
                "no replica",
                |f| f.replica_size = None,
                Some((Initial, WholeDisk, SyncReason::NewDisk)),
            ),
            (
                "no replica wins over everything",
                |f| {
                    f.replica_size = None;
                    f.journal_lost_records = true;
                    f.tracking = Tracking::Unclean;
                },
                Some((Initial, WholeDisk, SyncReason::NewDisk)),
            ),
            (
                "grown disk",
                |f| f.protected_size = 2 * G,
                Some((Full, WholeDisk, SyncReason::SizeChanged)),
            ),
            (
                "size before pre-seed",
                |f| {
                    f.replica_size = Some(G / 2);
                    f.preseeded = true;
                },
                Some((Full, WholeDisk, SyncReason::SizeChanged)),
            ),
            (
                "journal lost acknowledged records",
                |f| f.journal_lost_records = true,
                Some((Full, WholeDisk, SyncReason::JournalStorageError)),
            ),
            (
                "journal lost records: the cause, not the symptom",
                |f| {
                    f.journal_lost_records = true;
                    f.replica_behind_acknowledged = true;
                    f.bitmap_only = true;
                },
                Some((Full, WholeDisk, SyncReason::JournalStorageError)),
            ),
            (
                "refused by a journal error, then behind",
                |f| {
                    f.journal_refused = true;
                    f.replica_behind_acknowledged = true;
                },
                Some((Full, WholeDisk, SyncReason::JournalStorageError)),
            ),
            (
                "journal refused the disk, nothing dropped or lost: no sync",
                |f| f.journal_refused = true,
                None,
            ),
            (
                "journal refused the disk and the queue overflowed",
                |f| {
                    f.journal_refused = true;
                    f.bitmap_only = true;
                },
                Some((Bitmap, DirtyRegions, SyncReason::JournalStorageError)),
            ),
            (
                "journal refused, but a crash says more",
                |f| {
                    f.journal_refused = true;
                    f.bitmap_only = true;
                    f.tracking = Tracking::Unclean;
                },
                Some((Delta, ActivityLog, SyncReason::UncleanRestart)),
            ),
            (
                "size mismatch before a journal error",
                |f| {
                    f.protected_size = 2 * G;
                    f.journal_lost_records = true;
                },
                Some((Full, WholeDisk, SyncReason::SizeChanged)),
            ),
            (
                "replica behind",
                |f| f.replica_behind_acknowledged = true,
                Some((Full, WholeDisk, SyncReason::ReplicaBehind)),
            ),
            (
                "operator full",
                |f| f.full_sync_requested = true,
                Some((Full, WholeDisk, SyncReason::OperatorFullSync)),
            ),
            (
                "full beats force",
                |f| {
                    f.full_sync_requested = true;
                    f.force_sync = true;
                },
                Some((Full, WholeDisk, SyncReason::OperatorFullSync)),
            ),
            (
                "pre-seeded",
                |f| f.preseeded = true,
                Some((Delta, WholeDisk, SyncReason::PreSeeded)),
            ),
            (
                "reverse",
                |f| f.reverse_protection = true,
                Some((Delta, WholeDisk, SyncReason::ReverseProtection)),
            ),
            (
                "force beats unclean",
                |f| {
                    f.force_sync = true;
                    f.tracking = Tracking::Unclean;
                },
                Some((Delta, WholeDisk, SyncReason::ForceSync)),
            ),
            (
                "tracking lost",
                |f| f.tracking = Tracking::Lost,
                Some((Delta, WholeDisk, SyncReason::TrackingLost)),
            ),
            (
                "new tracker, old replica",
                |f| f.tracking = Tracking::New,
                Some((Delta, WholeDisk, SyncReason::TrackingLost)),
            ),
            (
                "crash: activity log only",
                |f| f.tracking = Tracking::Unclean,
                Some((Delta, ActivityLog, SyncReason::UncleanRestart)),
            ),
            (
                "crash beats bitmap-only",
                |f| {
                    f.tracking = Tracking::Unclean;
                    f.bitmap_only = true;
                },
                Some((Delta, ActivityLog, SyncReason::UncleanRestart)),
            ),
            (
                "overflow",
                |f| f.bitmap_only = true,
                Some((Bitmap, DirtyRegions, SyncReason::StreamDropped)),
            ),
            (
                "dirty at clean start",
                |f| f.dirty_regions = 3,
                Some((Bitmap, DirtyRegions, SyncReason::DirtyAtStart)),
            ),
        ];
        for (name, edit, want) in rows {
            let mut f = DiskSyncFacts::steady(G);
            edit(&mut f);
            let got = sync_needed(&f).map(|n| (n.kind, n.scope, n.reason));
            assert_eq!(got, *want, "{name}");
        }
    }

    #[test]
    fn recoverability_during_a_sync_follows_the_zerto_table() {
        assert!(keeps_earlier_checkpoints(Delta));
        assert!(keeps_earlier_checkpoints(Bitmap));
        assert!(!keeps_earlier_checkpoints(Full));
        assert!(!keeps_earlier_checkpoints(Initial));
    }

    #[test]
    fn resync_policy_gates_only_whole_disk_resyncs() {
        let delta = SyncNeed {
            kind: Delta,
            scope: ActivityLog,
            reason: SyncReason::UncleanRestart,
        };
        let bitmap = SyncNeed {
            kind: Bitmap,
            scope: DirtyRegions,
            reason: SyncReason::StreamDropped,
        };
        let initial = SyncNeed {
            kind: Initial,
            scope: WholeDisk,
            reason: SyncReason::NewDisk,
        };
        let t = |s| TimeOfDay::parse(s).unwrap();
        let window = ResyncPolicy::Window {
            start: t("22:00"),
            end: t("06:00"),
        };
        let noon = 12 * 60;
        assert_eq!(
            may_start(&delta, ResyncPolicy::Automatic, noon, false),
            StartDecision::Now
        );
        assert_eq!(
            may_start(&delta, ResyncPolicy::Manual, noon, false),
            StartDecision::WaitForOperator
        );
        assert_eq!(
            may_start(&delta, ResyncPolicy::Manual, noon, true),
            StartDecision::Now
        );
        assert_eq!(
            may_start(&delta, window, noon, false),
            StartDecision::WaitForWindow {
                opens_in_minutes: 600
            }
        );
        assert_eq!(
            may_start(&delta, window, 21 * 60 + 59, false),
            StartDecision::WaitForWindow {
                opens_in_minutes: 1
            }
        );
        assert_eq!(
            may_start(&delta, window, 23 * 60, false),
            StartDecision::Now
        );
        assert_eq!(may_start(&delta, window, 3 * 60, false), StartDecision::Now);
        assert_eq!(
            may_start(&delta, window, 6 * 60, false),
            StartDecision::WaitForWindow {
                opens_in_minutes: 16 * 60
            }
        );
        for policy in [ResyncPolicy::Manual, window] {
            assert_eq!(may_start(&bitmap, policy, noon, false), StartDecision::Now);
            assert_eq!(may_start(&initial, policy, noon, false), StartDecision::Now);
        }
        let preseed = SyncNeed {
            kind: Delta,
            scope: WholeDisk,
            reason: SyncReason::PreSeeded,
        };
        assert_eq!(
            may_start(&preseed, ResyncPolicy::Manual, noon, false),
            StartDecision::Now
        );
    }

    #[test]
    fn queue_order_is_priority_then_cost_then_age() {
        let q = |p, k, s| QueuedSync {
            vpg_priority: p,
            kind: k,
            since: s,
        };
        let mut v = vec![
            q(Priority::Low, Bitmap, 1),
            q(Priority::High, Full, 5),
            q(Priority::High, Bitmap, 9),
            q(Priority::Medium, Delta, 2),
            q(Priority::High, Bitmap, 3),
        ];
        order_queue(&mut v);
        let got: Vec<_> = v
            .iter()
            .map(|x| (x.vpg_priority, x.kind, x.since))
            .collect();
        assert_eq!(
            got,
            vec![
                (Priority::High, Bitmap, 3),
                (Priority::High, Bitmap, 9),
                (Priority::High, Full, 5),
                (Priority::Medium, Delta, 2),
                (Priority::Low, Bitmap, 1),
            ]
        );
    }

    #[test]
    fn every_reason_has_words() {
        for r in [
            SyncReason::NewDisk,
            SyncReason::PreSeeded,
            SyncReason::SizeChanged,
            SyncReason::JournalStorageError,
            SyncReason::ReplicaBehind,
            SyncReason::OperatorFullSync,
            SyncReason::ReverseProtection,
            SyncReason::ForceSync,
            SyncReason::TrackingLost,
            SyncReason::UncleanRestart,
            SyncReason::StreamDropped,
            SyncReason::DirtyAtStart,
        ] {
            assert!(r.describe().len() > 10);
        }
    }
}
