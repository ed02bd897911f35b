//! VPG status and sub-status (the Zerto vocabulary) and the per-VM replication state
//! (the Hyper-V vocabulary), each derived from facts by one pure function.
//!
//! Precedence, highest first: deletion, a recovery operation in flight, recovered,
//! configuration gaps, the initial sync, faults (storage, errors, disconnection), other
//! syncs, then the SLA arithmetic. Sub-statuses that do not stop recovery (bitmap sync,
//! forced delta sync, a running failover test, a lost protected site) keep the status
//! the SLA arithmetic gives, as the reference table says.

use serde::{Deserialize, Serialize};
use std::time::Duration;
use utoipa::ToSchema;

macro_rules! vocabulary {
    ($(#[$m:meta])* $name:ident { $($variant:ident = $id:literal, $label:literal, $desc:literal;)* }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant,)* }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];

            /// The stable identifier used in JSON and the database.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $id,)* }
            }

            /// The words operators see.
            pub fn label(self) -> &'static str {
                match self { $($name::$variant => $label,)* }
            }

            pub fn description(self) -> &'static str {
                match self { $($name::$variant => $desc,)* }
            }

            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.label())
            }
        }
    };
}

vocabulary! {
    /// The headline state of a VPG.
    VpgStatus {
        Initializing = "initializing", "Initializing", "Protection is being set up; recovery is not possible yet.";
        MeetingSla = "meeting_sla", "Meeting SLA", "Both the RPO and the journal history targets are met.";
        NotMeetingSla = "not_meeting_sla", "Not Meeting SLA", "Neither target is met, or protection is impaired (see the sub-status).";
        RpoNotMeetingSla = "rpo_not_meeting_sla", "RPO Not Meeting SLA", "The newest recoverable checkpoint is older than the RPO target; history is met.";
        HistoryNotMeetingSla = "history_not_meeting_sla", "History Not Meeting SLA", "The journal holds less history than its target; the RPO is met.";
        FailingOver = "failing_over", "Failing Over", "A failover of this VPG is in progress.";
        Moving = "moving", "Moving", "A planned move of this VPG is in progress.";
        Deleting = "deleting", "Deleting", "The VPG is being removed.";
        Recovered = "recovered", "Recovered", "The VPG was recovered at its recovery site and is not protected.";
    }
}

vocabulary! {
    /// What the VPG is doing or suffering right now, refining [`VpgStatus`].
    VpgSubStatus {
        None = "none", "", "Nothing beyond the status.";
        CreatingVpg = "creating_vpg", "Creating VPG", "Both sites are being configured from the saved definition.";
        InitialSync = "initial_sync", "Initial Sync", "Replica disks are being filled for the first time; no checkpoint is recoverable yet.";
        DiskInitialSync = "disk_initial_sync", "Disk Initial Sync", "A disk added to the VPG is being filled; recovery waits for it.";
        Syncing = "syncing", "Syncing", "A sync is needed and its kind is being decided.";
        DeltaSyncing = "delta_syncing", "Delta Syncing", "Block hashes are compared and only differing blocks are sent; earlier checkpoints stay recoverable.";
        DeltaSyncingDisk = "delta_syncing_disk", "Delta Syncing a disk", "One disk is delta syncing; earlier checkpoints stay recoverable.";
        BitmapSyncing = "bitmap_syncing", "Bitmap Syncing", "Regions changed while the stream was down are being sent; earlier checkpoints stay recoverable.";
        FullSyncing = "full_syncing", "Full Syncing", "Replica consistency is unknown, so everything is being copied; recovery is not possible.";
        FullSyncingDisk = "full_syncing_disk", "Full Syncing a disk", "One disk is being fully copied; recovery is not possible.";
        SyncPending = "sync_pending", "Resynchronization required", "A sync is needed and waits for its window or for an operator.";
        TestingFailover = "testing_failover", "Testing failover", "A failover test runs at the recovery site while protection continues.";
        FailingOverBeforeCommit = "failing_over_before_commit", "Failing over – before commit", "Recovered VMs run; the failover can still be committed or rolled back.";
        CommittingFailover = "committing_failover", "Committing Failover", "The failover is being made final.";
        RollingBackFailover = "rolling_back_failover", "Rolling back Failover", "The failover is being undone and the original VMs restored.";
        MovingBeforeCommit = "moving_before_commit", "Moving – before commit", "Moved VMs run; the move can still be committed or rolled back.";
        CommittingMove = "committing_move", "Committing Move", "The move is being made final and the source VMs removed.";
        RollingBackMove = "rolling_back_move", "Rolling back Move", "The move is being undone and the source VMs restored.";
        Promoting = "promoting", "Promoting", "Journal data up to the chosen checkpoint is being written into the recovered disks.";
        RecoveryIsPossible = "recovery_is_possible", "Recovery is possible", "The protected site cannot be reached, but recovery at the recovery site is available.";
        SiteDisconnection = "site_disconnection", "Site disconnection", "The recovery site cannot be reached, so protection is halted.";
        SiteDisconnectionNoCheckpoints = "site_disconnection_no_checkpoints", "Site disconnection. No checkpoints", "The recovery site cannot be reached and no checkpoint is available to recover to.";
        JournalStorageError = "journal_storage_error", "Journal storage error", "Writing the journal failed; it is reopened once its storage takes writes again, and a sync follows if records were dropped or lost meanwhile.";
        RecoveryStorageError = "recovery_storage_error", "Recovery storage error", "The recovery disks cannot be written or read.";
        UserPausedProtection = "user_paused_protection", "User paused protection", "An operator paused protection; changes are tracked and sent on resume.";
        NeedsConfiguration = "needs_configuration", "Needs configuration", "A setting protection needs is missing (for example a member's recovery host).";
        VpgHasNoVms = "vpg_has_no_vms", "VPG has no VMs", "The VPG has no member VMs.";
        VmNotProtected = "vm_not_protected", "VM not protected", "A member VM is not replicating.";
        Error = "error", "Error", "A fault stops protection; see events and alerts.";
        DeletingTheVpg = "deleting_the_vpg", "Deleting the VPG", "Protection is being removed from every host.";
        VpgWaitingToBeRemoved = "vpg_waiting_to_be_removed", "VPG waiting to be removed", "Removal could not reach every host; remove it by force.";
    }
}

vocabulary! {
    /// A VM's replication state in Hyper-V Replica's words.
    VmReplicationState {
        NotEnabled = "not_enabled", "Not enabled", "The VM is not protected.";
        PendingInitialReplication = "pending_initial_replication", "Pending initial replication", "Protection is configured and the first copy is not complete.";
        ReplicationEnabled = "replication_enabled", "Replication enabled", "Replication is normal.";
        PreparedForPlannedFailover = "prepared_for_planned_failover", "Prepared for planned failover", "The source VM is shut down for a move and locked against starting.";
        FailoverComplete = "failover_complete", "Failover complete", "The VM runs at the recovery site.";
        Paused = "paused", "Replication paused", "Replication is paused; changes are tracked.";
        Error = "error", "Replication error", "Replication is not happening; an operator is needed.";
        ResynchronizationRequired = "resynchronization_required", "Resynchronization required", "The replica must be resynchronised before replication continues.";
        Resynchronizing = "resynchronizing", "Resynchronizing", "A resynchronisation is running.";
        ResynchronizeSuspended = "resynchronize_suspended", "Resynchronize suspended", "A resynchronisation was interrupted and waits to resume.";
    }
}

vocabulary! {
    /// The kinds of sync (DESIGN §5).
    SyncKind {
        Initial = "initial", "Initial Sync", "All non-zero blocks of a new disk are copied.";
        Delta = "delta", "Delta Sync", "Block hashes are compared on both sides; only differing blocks are sent.";
        Bitmap = "bitmap", "Bitmap Sync", "Only regions marked dirty while the stream was down are sent.";
        Full = "full", "Full Sync", "Everything is copied because the replica's state is unknown.";
    }
}

/// Where a VPG is in its life, as the manager's configuration records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    /// Defined; initial sync not finished on every disk yet.
    Creating,
    Protecting,
    Deleting,
    /// Deletion could not reach every host.
    WaitingRemoval,
    /// Failed over and committed without reverse protection.
    Recovered,
}

/// Failover and move phases that own the VPG's status while they run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperationPhase {
    TestingFailover,
    FailoverBeforeCommit,
    CommittingFailover,
    PromotingFailover,
    RollingBackFailover,
    MoveBeforeCommit,
    CommittingMove,
    PromotingMove,
    RollingBackMove,
}

impl OperationPhase {
    pub const ALL: &'static [OperationPhase] = &[
        OperationPhase::TestingFailover,
        OperationPhase::FailoverBeforeCommit,
        OperationPhase::CommittingFailover,
        OperationPhase::PromotingFailover,
        OperationPhase::RollingBackFailover,
        OperationPhase::MoveBeforeCommit,
        OperationPhase::CommittingMove,
        OperationPhase::PromotingMove,
        OperationPhase::RollingBackMove,
    ];

    /// The stable identifier stored in `vpgs.operation_phase`.
    pub fn as_str(self) -> &'static str {
        match self {
            OperationPhase::TestingFailover => "testing_failover",
            OperationPhase::FailoverBeforeCommit => "failover_before_commit",
            OperationPhase::CommittingFailover => "committing_failover",
            OperationPhase::PromotingFailover => "promoting_failover",
            OperationPhase::RollingBackFailover => "rolling_back_failover",
            OperationPhase::MoveBeforeCommit => "move_before_commit",
            OperationPhase::CommittingMove => "committing_move",
            OperationPhase::PromotingMove => "promoting_move",
            OperationPhase::RollingBackMove => "rolling_back_move",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|p| p.as_str() == s)
    }

    /// The protected VMs are shut down and locked against starting in this phase
    /// (Hyper-V's "prepared for planned failover"): a failover or move is up at the
    /// recovery site and not rolled back.
    pub fn protected_vms_locked(self) -> bool {
        !matches!(
            self,
            OperationPhase::TestingFailover
                | OperationPhase::RollingBackFailover
                | OperationPhase::RollingBackMove
        )
    }

    /// Protection of the VPG stops in this phase (commit: its journals are promoted
    /// and the replicas become the recovered VMs' disks).
    pub fn stops_protection(self) -> bool {
        matches!(
            self,
            OperationPhase::CommittingFailover
                | OperationPhase::PromotingFailover
                | OperationPhase::CommittingMove
                | OperationPhase::PromotingMove
        )
    }
}

/// The most important sync running in the VPG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncActivity {
    pub kind: SyncKind,
    /// One disk of an otherwise steady VPG, rather than the whole VPG.
    pub single_disk: bool,
    /// Started by an operator's Force Sync.
    pub forced: bool,
}

/// One disk's sync, as its protected host reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskSyncFact {
    /// The kind of the sync running now.
    pub running: Option<SyncKind>,
    /// The running sync is an operator's Force Sync.
    pub forced: bool,
    /// A sync is owed and waits (resync policy, a slot, or the peer).
    pub pending: bool,
}

/// The VPG's sync activity from its disks: the most drastic kind running (Initial, Full,
/// Delta, Bitmap), whether only some disks run it, whether it was forced; and whether a
/// sync is pending anywhere. `established`: the VPG has had a recoverable checkpoint, so
/// an Initial Sync of some disks is a disk being added ("Disk Initial Sync"), not the
/// VPG's own first sync, where disks simply finish at different times.
pub fn vpg_sync(disks: &[DiskSyncFact], established: bool) -> (Option<SyncActivity>, bool) {
    const ORDER: [SyncKind; 4] = [
        SyncKind::Initial,
        SyncKind::Full,
        SyncKind::Delta,
        SyncKind::Bitmap,
    ];
    let pending = disks.iter().any(|d| d.pending && d.running.is_none());
    let activity = ORDER.iter().find_map(|&kind| {
        let of_kind: Vec<&DiskSyncFact> =
            disks.iter().filter(|d| d.running == Some(kind)).collect();
        if of_kind.is_empty() {
            return None;
        }
        // "A disk" when only some of the VPG's disks run this kind.
        let some_only = of_kind.len() < disks.len();
        Some(SyncActivity {
            kind,
            single_disk: some_only && (kind != SyncKind::Initial || established),
            forced: of_kind.iter().all(|d| d.forced),
        })
    });
    (activity, pending)
}

/// Everything the derivation looks at. The evaluator fills it from the database and
/// from what agents report; tests fill it by hand.
#[derive(Debug, Clone)]
pub struct VpgFacts {
    pub lifecycle: Lifecycle,
    pub members: usize,
    /// Members lacking a setting that protection needs.
    pub members_needing_configuration: usize,
    /// Members configured but not replicating (their host reports no protection).
    pub members_not_protected: usize,
    pub operation: Option<OperationPhase>,
    pub paused: bool,
    pub sync: Option<SyncActivity>,
    /// A sync is required but waits for the resync window or an operator.
    pub sync_pending: bool,
    pub protected_site_connected: bool,
    pub recovery_site_connected: bool,
    pub journal_storage_error: bool,
    pub recovery_storage_error: bool,
    /// Any other fault that stops protection.
    pub error: bool,
    pub has_recoverable_checkpoint: bool,
    /// now − newest recoverable checkpoint; None when there is none.
    pub rpo_actual: Option<Duration>,
    pub rpo_target: Duration,
    pub history_actual: Duration,
    pub history_target: Duration,
    /// How long protection has run since the initial sync finished: history cannot be
    /// longer than that, so the target is capped by it.
    pub protected_for: Duration,
}

impl VpgFacts {
    /// A steady, healthy VPG; tests and the evaluator start here and change what differs.
    pub fn healthy(members: usize) -> Self {
        Self {
            lifecycle: Lifecycle::Protecting,
            members,
            members_needing_configuration: 0,
            members_not_protected: 0,
            operation: None,
            paused: false,
            sync: None,
            sync_pending: false,
            protected_site_connected: true,
            recovery_site_connected: true,
            journal_storage_error: false,
            recovery_storage_error: false,
            error: false,
            has_recoverable_checkpoint: true,
            rpo_actual: Some(Duration::from_secs(5)),
            rpo_target: Duration::from_secs(300),
            history_actual: Duration::from_secs(86400),
            history_target: Duration::from_secs(86400),
            protected_for: Duration::from_secs(10 * 86400),
        }
    }
}

/// Whether the RPO target is met.
pub fn rpo_met(f: &VpgFacts) -> bool {
    f.rpo_actual.is_some_and(|rpo| rpo <= f.rpo_target)
}

/// Whether the history target is met. A young VPG cannot hold more history than it
/// has lived, so the target is capped by the protection age less the current RPO (the
/// newest recoverable checkpoint is that old, so history ends there), less 1 % for
/// rounding. Without the RPO term a young VPG would flap to "History Not Meeting SLA"
/// between two checkpoints.
pub fn history_met(f: &VpgFacts) -> bool {
    let lived = f
        .protected_for
        .saturating_sub(f.rpo_actual.unwrap_or(Duration::ZERO));
    let achievable = lived.mul_f64(0.99);
    f.history_actual >= f.history_target.min(achievable)
}

/// The SLA arithmetic alone.
pub fn sla_status(f: &VpgFacts) -> VpgStatus {
    match (rpo_met(f), history_met(f)) {
        (true, true) => VpgStatus::MeetingSla,
        (false, true) => VpgStatus::RpoNotMeetingSla,
        (true, false) => VpgStatus::HistoryNotMeetingSla,
        (false, false) => VpgStatus::NotMeetingSla,
    }
}

/// The status and sub-status of a VPG.
pub fn derive_status(f: &VpgFacts) -> (VpgStatus, VpgSubStatus) {
    use OperationPhase as Op;
    use VpgStatus as S;
    use VpgSubStatus as Sub;

    match f.lifecycle {
        Lifecycle::Deleting => return (S::Deleting, Sub::DeletingTheVpg),
        Lifecycle::WaitingRemoval => return (S::Deleting, Sub::VpgWaitingToBeRemoved),
        _ => {}
    }
    match f.operation {
        Some(Op::FailoverBeforeCommit) => return (S::FailingOver, Sub::FailingOverBeforeCommit),
        Some(Op::CommittingFailover) => return (S::FailingOver, Sub::CommittingFailover),
        Some(Op::PromotingFailover) => return (S::FailingOver, Sub::Promoting),
        Some(Op::RollingBackFailover) => return (S::FailingOver, Sub::RollingBackFailover),
        Some(Op::MoveBeforeCommit) => return (S::Moving, Sub::MovingBeforeCommit),
        Some(Op::CommittingMove) => return (S::Moving, Sub::CommittingMove),
        Some(Op::PromotingMove) => return (S::Moving, Sub::Promoting),
        Some(Op::RollingBackMove) => return (S::Moving, Sub::RollingBackMove),
        Some(Op::TestingFailover) | None => {}
    }
    if f.lifecycle == Lifecycle::Recovered {
        return (S::Recovered, Sub::None);
    }
    if f.members == 0 {
        return (S::NotMeetingSla, Sub::VpgHasNoVms);
    }
    if f.members_needing_configuration > 0 {
        return (S::NotMeetingSla, Sub::NeedsConfiguration);
    }
    if f.lifecycle == Lifecycle::Creating {
        let sub = match f.sync {
            Some(SyncActivity {
                kind: SyncKind::Initial,
                ..
            }) => Sub::InitialSync,
            Some(_) => Sub::Syncing,
            None if f.paused => Sub::UserPausedProtection,
            None => Sub::CreatingVpg,
        };
        return (S::Initializing, sub);
    }
    if f.journal_storage_error {
        return (S::NotMeetingSla, Sub::JournalStorageError);
    }
    if f.recovery_storage_error {
        return (S::NotMeetingSla, Sub::RecoveryStorageError);
    }
    if f.error {
        return (S::NotMeetingSla, Sub::Error);
    }
    if f.paused {
        return (sla_status(f), Sub::UserPausedProtection);
    }
    if !f.recovery_site_connected {
        let sub = if f.has_recoverable_checkpoint {
            Sub::SiteDisconnection
        } else {
            Sub::SiteDisconnectionNoCheckpoints
        };
        return (S::NotMeetingSla, sub);
    }
    if let Some(sync) = f.sync {
        return match (sync.kind, sync.single_disk, sync.forced) {
            (SyncKind::Initial, true, _) => (S::Initializing, Sub::DiskInitialSync),
            (SyncKind::Initial, false, _) => (S::Initializing, Sub::InitialSync),
            (SyncKind::Full, true, _) => (S::NotMeetingSla, Sub::FullSyncingDisk),
            (SyncKind::Full, false, _) => (S::NotMeetingSla, Sub::FullSyncing),
            (SyncKind::Delta, _, true) => (sla_status(f), Sub::DeltaSyncing),
            (SyncKind::Delta, true, false) => (S::NotMeetingSla, Sub::DeltaSyncingDisk),
            (SyncKind::Delta, false, false) => (S::NotMeetingSla, Sub::DeltaSyncing),
            (SyncKind::Bitmap, _, _) => (sla_status(f), Sub::BitmapSyncing),
        };
    }
    if f.sync_pending {
        return (S::NotMeetingSla, Sub::SyncPending);
    }
    if f.members_not_protected > 0 {
        return (S::NotMeetingSla, Sub::VmNotProtected);
    }
    let status = sla_status(f);
    if !f.protected_site_connected && f.has_recoverable_checkpoint {
        return (status, Sub::RecoveryIsPossible);
    }
    if f.operation == Some(Op::TestingFailover) {
        return (status, Sub::TestingFailover);
    }
    (status, Sub::None)
}

/// Facts about one member VM for its Hyper-V-style state (default: not protected).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VmFacts {
    pub protected: bool,
    pub initial_sync_done: bool,
    pub syncing: bool,
    pub sync_pending: bool,
    /// A sync was started and then interrupted (disconnect, crash) and has not resumed.
    pub sync_interrupted: bool,
    pub paused: bool,
    pub error: bool,
    /// Shut down for a move and locked against starting.
    pub prepared_for_move: bool,
    /// Running at the recovery site after a failover or move.
    pub failed_over: bool,
}

/// The per-VM replication state.
pub fn derive_vm_state(f: &VmFacts) -> VmReplicationState {
    use VmReplicationState as R;
    if f.failed_over {
        return R::FailoverComplete;
    }
    if f.prepared_for_move {
        return R::PreparedForPlannedFailover;
    }
    if !f.protected {
        return R::NotEnabled;
    }
    if f.error {
        return R::Error;
    }
    if f.paused {
        return R::Paused;
    }
    if !f.initial_sync_done {
        return R::PendingInitialReplication;
    }
    if f.syncing {
        return R::Resynchronizing;
    }
    if f.sync_interrupted {
        return R::ResynchronizeSuspended;
    }
    if f.sync_pending {
        return R::ResynchronizationRequired;
    }
    R::ReplicationEnabled
}

#[cfg(test)]
mod tests {
    use super::*;
    use OperationPhase as Op;
    use VpgStatus as S;
    use VpgSubStatus as Sub;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn sync(kind: SyncKind, single_disk: bool, forced: bool) -> Option<SyncActivity> {
        Some(SyncActivity {
            kind,
            single_disk,
            forced,
        })
    }

    #[test]
    fn derivation_table() {
        type Edit = fn(&mut VpgFacts);
        let table: &[(&str, Edit, S, Sub)] = &[
            ("healthy", |_| {}, S::MeetingSla, Sub::None),
            (
                "rpo over target",
                |f| f.rpo_actual = Some(secs(301)),
                S::RpoNotMeetingSla,
                Sub::None,
            ),
            (
                "rpo exactly at target",
                |f| f.rpo_actual = Some(secs(300)),
                S::MeetingSla,
                Sub::None,
            ),
            (
                "no checkpoint yet",
                |f| {
                    f.rpo_actual = None;
                    f.has_recoverable_checkpoint = false
                },
                S::RpoNotMeetingSla,
                Sub::None,
            ),
            (
                "history short",
                |f| f.history_actual = secs(3600),
                S::HistoryNotMeetingSla,
                Sub::None,
            ),
            (
                "both short",
                |f| {
                    f.history_actual = secs(3600);
                    f.rpo_actual = Some(secs(900))
                },
                S::NotMeetingSla,
                Sub::None,
            ),
            (
                "young VPG: history capped by protection age",
                |f| {
                    f.history_actual = secs(3590);
                    f.protected_for = secs(3600)
                },
                S::MeetingSla,
                Sub::None,
            ),
            (
                "young VPG between two checkpoints: history ends at the newest",
                |f| {
                    f.protected_for = secs(60);
                    f.rpo_actual = Some(secs(5));
                    f.history_actual = secs(55)
                },
                S::MeetingSla,
                Sub::None,
            ),
            (
                "young VPG still short of its age",
                |f| {
                    f.history_actual = secs(1000);
                    f.protected_for = secs(3600)
                },
                S::HistoryNotMeetingSla,
                Sub::None,
            ),
            (
                "deleting",
                |f| {
                    f.lifecycle = Lifecycle::Deleting;
                    f.operation = Some(Op::FailoverBeforeCommit)
                },
                S::Deleting,
                Sub::DeletingTheVpg,
            ),
            (
                "waiting removal",
                |f| f.lifecycle = Lifecycle::WaitingRemoval,
                S::Deleting,
                Sub::VpgWaitingToBeRemoved,
            ),
            (
                "creating",
                |f| {
                    f.lifecycle = Lifecycle::Creating;
                    f.has_recoverable_checkpoint = false;
                    f.rpo_actual = None
                },
                S::Initializing,
                Sub::CreatingVpg,
            ),
            (
                "creating, initial sync",
                |f| {
                    f.lifecycle = Lifecycle::Creating;
                    f.sync = sync(SyncKind::Initial, false, false)
                },
                S::Initializing,
                Sub::InitialSync,
            ),
            (
                "creating, other sync",
                |f| {
                    f.lifecycle = Lifecycle::Creating;
                    f.sync = sync(SyncKind::Delta, false, false)
                },
                S::Initializing,
                Sub::Syncing,
            ),
            (
                "creating, paused",
                |f| {
                    f.lifecycle = Lifecycle::Creating;
                    f.paused = true
                },
                S::Initializing,
                Sub::UserPausedProtection,
            ),
            (
                "no VMs",
                |f| f.members = 0,
                S::NotMeetingSla,
                Sub::VpgHasNoVms,
            ),
            (
                "no VMs while creating",
                |f| {
                    f.members = 0;
                    f.lifecycle = Lifecycle::Creating
                },
                S::NotMeetingSla,
                Sub::VpgHasNoVms,
            ),
            (
                "needs configuration",
                |f| f.members_needing_configuration = 1,
                S::NotMeetingSla,
                Sub::NeedsConfiguration,
            ),
            (
                "needs configuration beats creating",
                |f| {
                    f.members_needing_configuration = 2;
                    f.lifecycle = Lifecycle::Creating
                },
                S::NotMeetingSla,
                Sub::NeedsConfiguration,
            ),
            (
                "failover before commit",
                |f| f.operation = Some(Op::FailoverBeforeCommit),
                S::FailingOver,
                Sub::FailingOverBeforeCommit,
            ),
            (
                "committing failover",
                |f| f.operation = Some(Op::CommittingFailover),
                S::FailingOver,
                Sub::CommittingFailover,
            ),
            (
                "promoting after failover",
                |f| f.operation = Some(Op::PromotingFailover),
                S::FailingOver,
                Sub::Promoting,
            ),
            (
                "rolling back failover",
                |f| f.operation = Some(Op::RollingBackFailover),
                S::FailingOver,
                Sub::RollingBackFailover,
            ),
            (
                "move before commit",
                |f| f.operation = Some(Op::MoveBeforeCommit),
                S::Moving,
                Sub::MovingBeforeCommit,
            ),
            (
                "committing move",
                |f| f.operation = Some(Op::CommittingMove),
                S::Moving,
                Sub::CommittingMove,
            ),
            (
                "promoting a move",
                |f| f.operation = Some(Op::PromotingMove),
                S::Moving,
                Sub::Promoting,
            ),
            (
                "rolling back move",
                |f| f.operation = Some(Op::RollingBackMove),
                S::Moving,
                Sub::RollingBackMove,
            ),
            (
                "operation beats site loss",
                |f| {
                    f.operation = Some(Op::FailoverBeforeCommit);
                    f.protected_site_connected = false
                },
                S::FailingOver,
                Sub::FailingOverBeforeCommit,
            ),
            (
                "testing failover keeps SLA status",
                |f| f.operation = Some(Op::TestingFailover),
                S::MeetingSla,
                Sub::TestingFailover,
            ),
            (
                "testing failover with lag",
                |f| {
                    f.operation = Some(Op::TestingFailover);
                    f.rpo_actual = Some(secs(400))
                },
                S::RpoNotMeetingSla,
                Sub::TestingFailover,
            ),
            (
                "recovered",
                |f| f.lifecycle = Lifecycle::Recovered,
                S::Recovered,
                Sub::None,
            ),
            (
                "journal storage error",
                |f| f.journal_storage_error = true,
                S::NotMeetingSla,
                Sub::JournalStorageError,
            ),
            (
                "recovery storage error",
                |f| f.recovery_storage_error = true,
                S::NotMeetingSla,
                Sub::RecoveryStorageError,
            ),
            ("error", |f| f.error = true, S::NotMeetingSla, Sub::Error),
            (
                "paused keeps SLA arithmetic",
                |f| f.paused = true,
                S::MeetingSla,
                Sub::UserPausedProtection,
            ),
            (
                "paused and late",
                |f| {
                    f.paused = true;
                    f.rpo_actual = Some(secs(9000))
                },
                S::RpoNotMeetingSla,
                Sub::UserPausedProtection,
            ),
            (
                "recovery site lost",
                |f| f.recovery_site_connected = false,
                S::NotMeetingSla,
                Sub::SiteDisconnection,
            ),
            (
                "recovery site lost, no checkpoints",
                |f| {
                    f.recovery_site_connected = false;
                    f.has_recoverable_checkpoint = false;
                    f.rpo_actual = None
                },
                S::NotMeetingSla,
                Sub::SiteDisconnectionNoCheckpoints,
            ),
            (
                "protected site lost",
                |f| f.protected_site_connected = false,
                S::MeetingSla,
                Sub::RecoveryIsPossible,
            ),
            (
                "protected site lost, late",
                |f| {
                    f.protected_site_connected = false;
                    f.rpo_actual = Some(secs(600))
                },
                S::RpoNotMeetingSla,
                Sub::RecoveryIsPossible,
            ),
            (
                "protected site lost, nothing to recover",
                |f| {
                    f.protected_site_connected = false;
                    f.has_recoverable_checkpoint = false;
                    f.rpo_actual = None
                },
                S::RpoNotMeetingSla,
                Sub::None,
            ),
            (
                "bitmap sync keeps SLA status",
                |f| f.sync = sync(SyncKind::Bitmap, false, false),
                S::MeetingSla,
                Sub::BitmapSyncing,
            ),
            (
                "bitmap sync, late",
                |f| {
                    f.sync = sync(SyncKind::Bitmap, false, false);
                    f.rpo_actual = Some(secs(999))
                },
                S::RpoNotMeetingSla,
                Sub::BitmapSyncing,
            ),
            (
                "forced delta keeps SLA status",
                |f| f.sync = sync(SyncKind::Delta, false, true),
                S::MeetingSla,
                Sub::DeltaSyncing,
            ),
            (
                "unforced delta",
                |f| f.sync = sync(SyncKind::Delta, false, false),
                S::NotMeetingSla,
                Sub::DeltaSyncing,
            ),
            (
                "delta on one disk",
                |f| f.sync = sync(SyncKind::Delta, true, false),
                S::NotMeetingSla,
                Sub::DeltaSyncingDisk,
            ),
            (
                "full sync",
                |f| f.sync = sync(SyncKind::Full, false, false),
                S::NotMeetingSla,
                Sub::FullSyncing,
            ),
            (
                "full sync of one disk",
                |f| f.sync = sync(SyncKind::Full, true, true),
                S::NotMeetingSla,
                Sub::FullSyncingDisk,
            ),
            (
                "disk initial sync",
                |f| f.sync = sync(SyncKind::Initial, true, false),
                S::Initializing,
                Sub::DiskInitialSync,
            ),
            (
                "re-initial sync of all",
                |f| f.sync = sync(SyncKind::Initial, false, false),
                S::Initializing,
                Sub::InitialSync,
            ),
            (
                "sync pending",
                |f| f.sync_pending = true,
                S::NotMeetingSla,
                Sub::SyncPending,
            ),
            (
                "vm not protected",
                |f| f.members_not_protected = 1,
                S::NotMeetingSla,
                Sub::VmNotProtected,
            ),
            (
                "storage error beats sync",
                |f| {
                    f.journal_storage_error = true;
                    f.sync = sync(SyncKind::Full, false, false)
                },
                S::NotMeetingSla,
                Sub::JournalStorageError,
            ),
            (
                "site loss beats sync",
                |f| {
                    f.recovery_site_connected = false;
                    f.sync = sync(SyncKind::Bitmap, false, false)
                },
                S::NotMeetingSla,
                Sub::SiteDisconnection,
            ),
        ];
        for (name, edit, status, sub) in table {
            let mut f = VpgFacts::healthy(3);
            edit(&mut f);
            assert_eq!(derive_status(&f), (*status, *sub), "{name}");
        }
    }

    #[test]
    fn sync_activity_table() {
        let run = |k: SyncKind| DiskSyncFact {
            running: Some(k),
            ..DiskSyncFact::default()
        };
        let idle = DiskSyncFact::default();
        let forced = DiskSyncFact {
            running: Some(SyncKind::Delta),
            forced: true,
            pending: false,
        };
        let waiting = DiskSyncFact {
            pending: true,
            ..DiskSyncFact::default()
        };
        type Row = (
            &'static str,
            Vec<DiskSyncFact>,
            bool,
            Option<SyncActivity>,
            bool,
        );
        let table: Vec<Row> = vec![
            ("steady", vec![idle, idle], true, None, false),
            ("no disks", vec![], false, None, false),
            (
                "first sync, disks finishing at different times",
                vec![run(SyncKind::Initial), idle],
                false,
                sync(SyncKind::Initial, false, false),
                false,
            ),
            (
                "a disk added later",
                vec![run(SyncKind::Initial), idle],
                true,
                sync(SyncKind::Initial, true, false),
                false,
            ),
            (
                "the most drastic kind wins",
                vec![run(SyncKind::Bitmap), run(SyncKind::Full)],
                true,
                sync(SyncKind::Full, true, false),
                false,
            ),
            (
                "every disk delta, forced",
                vec![forced, forced],
                true,
                sync(SyncKind::Delta, false, true),
                false,
            ),
            (
                "delta on one disk, not forced",
                vec![run(SyncKind::Delta), idle],
                true,
                sync(SyncKind::Delta, true, false),
                false,
            ),
            (
                "bitmap everywhere",
                vec![run(SyncKind::Bitmap), run(SyncKind::Bitmap)],
                true,
                sync(SyncKind::Bitmap, false, false),
                false,
            ),
            ("pending", vec![idle, waiting], true, None, true),
            (
                "pending alongside a running sync",
                vec![run(SyncKind::Bitmap), waiting],
                true,
                sync(SyncKind::Bitmap, true, false),
                true,
            ),
        ];
        for (name, disks, established, activity, pending) in table {
            assert_eq!(vpg_sync(&disks, established), (activity, pending), "{name}");
        }
    }

    #[test]
    fn vm_state_table() {
        let base = VmFacts {
            protected: true,
            initial_sync_done: true,
            ..VmFacts::default()
        };
        use VmReplicationState as R;
        type Edit = fn(&mut VmFacts);
        let table: &[(Edit, R)] = &[
            (|_| {}, R::ReplicationEnabled),
            (|f| f.protected = false, R::NotEnabled),
            (
                |f| f.initial_sync_done = false,
                R::PendingInitialReplication,
            ),
            (
                |f| {
                    f.initial_sync_done = false;
                    f.syncing = true
                },
                R::PendingInitialReplication,
            ),
            (|f| f.syncing = true, R::Resynchronizing),
            (|f| f.sync_pending = true, R::ResynchronizationRequired),
            (|f| f.sync_interrupted = true, R::ResynchronizeSuspended),
            (|f| f.paused = true, R::Paused),
            (
                |f| {
                    f.paused = true;
                    f.error = true
                },
                R::Error,
            ),
            (
                |f| f.prepared_for_move = true,
                R::PreparedForPlannedFailover,
            ),
            (
                |f| {
                    f.failed_over = true;
                    f.protected = false
                },
                R::FailoverComplete,
            ),
        ];
        for (i, (edit, want)) in table.iter().enumerate() {
            let mut f = base;
            edit(&mut f);
            assert_eq!(derive_vm_state(&f), *want, "row {i}");
        }
    }

    #[test]
    fn protected_vms_are_locked_from_bring_up_until_rollback() {
        let locked: Vec<&str> = Op::ALL
            .iter()
            .filter(|p| p.protected_vms_locked())
            .map(|p| p.as_str())
            .collect();
        assert_eq!(
            locked,
            [
                "failover_before_commit",
                "committing_failover",
                "promoting_failover",
                "move_before_commit",
                "committing_move",
                "promoting_move"
            ]
        );
    }

    #[test]
    fn vocabularies_round_trip_and_are_unique() {
        for s in VpgStatus::ALL {
            assert_eq!(VpgStatus::parse(s.as_str()), Some(*s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        for s in VpgSubStatus::ALL {
            assert_eq!(VpgSubStatus::parse(s.as_str()), Some(*s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        let mut ids: Vec<_> = VpgSubStatus::ALL.iter().map(|s| s.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), VpgSubStatus::ALL.len());
        assert_eq!(VpgStatus::MeetingSla.label(), "Meeting SLA");
        assert_eq!(
            VpgSubStatus::FailingOverBeforeCommit.label(),
            "Failing over – before commit"
        );
    }
}
