//! Checkpoints across a VPG's journals: round ids, tags, how consistent a round is
//! (the quiesce method its hosts report, and the kind it is stored as), and which
//! checkpoints are recoverable.
//!
//! A checkpoint C of a VPG is *recoverable* when every journal of every member disk
//! holds C durably and recoverably. Each recovery host reports per journal the ids that
//! became recoverable since it last reported and the oldest one it still holds; the
//! manager keeps one [`DiskJournal`] per (protected host, disk) and asks [`judge`] what
//! follows for the VPG's stored checkpoints. Missing reports decide nothing: after a
//! manager restart the sets are empty until the first heartbeats arrive, and a row must
//! not be flipped or deleted because of that.

use std::collections::BTreeSet;

use super::ValidationError;
use crate::proto::control::{CheckpointKind, QuiesceMethod};

/// Longest user tag, in characters.
pub const MAX_TAG_CHARS: usize = 64;

/// The next round id: microseconds since the epoch, so ids read as times and keep
/// increasing across manager restarts (the caller seeds `last` with the largest id in
/// the database), and strictly above `last` even when the clock steps back or two rounds
/// start within a microsecond.
pub fn next_round_id(now_ms: u64, last: u64) -> u64 {
    now_ms.saturating_mul(1000).max(last.saturating_add(1))
}

/// A user tag: trimmed, 1 to [`MAX_TAG_CHARS`] characters, no control characters (it is
/// shown in tables and written into every journal's marker).
pub fn check_tag(tag: &str) -> Result<String, ValidationError> {
    let t = tag.trim();
    let n = t.chars().count();
    if n == 0 || n > MAX_TAG_CHARS {
        return Err(ValidationError::new(
            "checkpoint.invalid_tag",
            "tag",
            format!("a checkpoint tag has 1 to {MAX_TAG_CHARS} characters"),
        ));
    }
    if t.chars().any(char::is_control) {
        return Err(ValidationError::new(
            "checkpoint.invalid_tag",
            "tag",
            "a checkpoint tag cannot contain control characters",
        ));
    }
    Ok(t.to_string())
}

/// How a round's guests were quiesced, from every host's answer: `None` when the round
/// did not ask; else the weakest answer, a host that answered without a method counting
/// as [`QuiesceMethod::Paused`] (nothing says its guests were frozen).
pub fn round_quiesce(
    asked: bool,
    answers: impl IntoIterator<Item = Option<QuiesceMethod>>,
) -> Option<QuiesceMethod> {
    if !asked {
        return None;
    }
    Some(
        answers
            .into_iter()
            .map(|a| a.unwrap_or(QuiesceMethod::Paused))
            .fold(QuiesceMethod::GuestAgent, QuiesceMethod::weakest),
    )
}

/// The kind a completed round is stored as: what was asked, except that an
/// app-consistent round whose guests were not all frozen by their guest agents is only
/// crash consistent (user-tagged when it has a tag, else scheduled). So
/// `latest_app_consistent`, which goes by the stored kind, never picks such a round.
pub fn round_kind(
    asked: CheckpointKind,
    tagged: bool,
    quiesce: Option<QuiesceMethod>,
) -> CheckpointKind {
    match (asked, quiesce) {
        (CheckpointKind::AppConsistent, Some(QuiesceMethod::GuestAgent)) => asked,
        (CheckpointKind::AppConsistent, _) if tagged => CheckpointKind::UserTagged,
        (CheckpointKind::AppConsistent, _) => CheckpointKind::Scheduled,
        _ => asked,
    }
}

/// What the manager knows about one journal (one protected disk at its recovery host).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskJournal {
    /// Recoverable checkpoint ids ≥ `oldest`.
    pub ids: BTreeSet<u64>,
    /// The oldest recoverable checkpoint the journal still holds; `None` when it holds
    /// none (initial sync, or a Full Sync made every earlier one unusable).
    pub oldest: Option<u64>,
    pub newest: Option<u64>,
    pub journal_bytes: u64,
    pub storage_error: Option<String>,
}

impl DiskJournal {
    /// Merges one report: the ids are incremental (only those not reported before on
    /// this connection), `oldest` is absolute and drops everything below it (promoted
    /// away, or made unrecoverable by a sync).
    pub fn apply(&mut self, recoverable: &[u64], oldest: Option<u64>, newest: Option<u64>) {
        self.ids.extend(recoverable.iter().copied());
        match oldest {
            Some(o) => self.ids = self.ids.split_off(&o),
            None => self.ids.clear(),
        }
        self.oldest = oldest;
        self.newest = newest;
    }
}

/// What follows for a VPG's stored checkpoints from its journals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryVerdict {
    /// Stored, not yet recoverable checkpoints that every journal now holds.
    pub newly_recoverable: Vec<u64>,
    /// Checkpoints below this id can never be recovered again (some journal promoted
    /// past them or lost them to a sync): their rows go.
    pub delete_below: Option<u64>,
}

/// The rule. `pending` are the VPG's stored checkpoint ids not yet marked recoverable;
/// `disks` has one entry per member disk, `None` where no report is at hand (the disk's
/// recovery host has not reported it, its id is not known yet). Any gap, or a VPG without
/// disks, decides nothing.
pub fn judge(pending: &[u64], disks: &[Option<&DiskJournal>]) -> RecoveryVerdict {
    let Some(disks) = disks.iter().copied().collect::<Option<Vec<_>>>() else {
        return RecoveryVerdict::default();
    };
    if disks.is_empty() {
        return RecoveryVerdict::default();
    }
    let newly_recoverable = pending
        .iter()
        .copied()
        .filter(|c| disks.iter().all(|d| d.ids.contains(c)))
        .collect();
    // A checkpoint is recoverable only if *every* journal still holds it, so the floor is
    // the highest of the journals' oldest points. A journal with no recoverable
    // checkpoint at all (a sync running) sets no floor: what it will hold once the sync
    // ends is not known yet.
    let delete_below = disks
        .iter()
        .map(|d| d.oldest)
        .collect::<Option<Vec<u64>>>()
        .and_then(|o| o.into_iter().max());
    RecoveryVerdict {
        newly_recoverable,
        delete_below,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn journal(ids: &[u64]) -> DiskJournal {
        let mut j = DiskJournal::default();
        j.apply(ids, ids.iter().min().copied(), ids.iter().max().copied());
        j
    }

    #[test]
    fn a_round_is_as_consistent_as_its_least_quiesced_host() {
        use QuiesceMethod::{GuestAgent as G, Paused as P};
        assert_eq!(round_quiesce(false, [Some(G), Some(G)]), None);
        assert_eq!(round_quiesce(true, [Some(G), Some(G)]), Some(G));
        assert_eq!(round_quiesce(true, [Some(G), Some(P)]), Some(P));
        assert_eq!(
            round_quiesce(true, [Some(G), None]),
            Some(P),
            "a host that does not say how it quiesced counts as paused"
        );
        use CheckpointKind::{AppConsistent as A, Scheduled as S, UserTagged as U};
        assert_eq!(round_kind(A, true, Some(G)), A);
        assert_eq!(round_kind(A, true, Some(P)), U);
        assert_eq!(round_kind(A, false, Some(P)), S);
        assert_eq!(round_kind(A, true, None), U, "asked but nothing reported");
        assert_eq!(round_kind(U, true, None), U);
        assert_eq!(round_kind(S, false, None), S);
        assert_eq!(
            round_kind(U, true, Some(G)),
            U,
            "a kind is never raised by a quiesce answer"
        );
    }

    #[test]
    fn round_ids_are_times_and_strictly_increase() {
        assert_eq!(next_round_id(1_700_000_000_000, 0), 1_700_000_000_000_000);
        // Same millisecond twice, or the clock stepping back: still above the last.
        assert_eq!(
            next_round_id(1_700_000_000_000, 1_700_000_000_000_000),
            1_700_000_000_000_001
        );
        assert_eq!(next_round_id(5, 9_000_000), 9_000_001);
        assert_eq!(next_round_id(u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn tags() {
        assert_eq!(check_tag("  before upgrade ").unwrap(), "before upgrade");
        assert_eq!(check_tag(&"é".repeat(64)).unwrap().chars().count(), 64);
        for bad in ["", "   ", &"x".repeat(65), "a\nb", "tab\there"] {
            assert_eq!(
                check_tag(bad).unwrap_err().code,
                "checkpoint.invalid_tag",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn reports_merge_incrementally_and_the_oldest_point_cuts() {
        let mut j = DiskJournal::default();
        j.apply(&[10, 11], Some(10), Some(11));
        j.apply(&[12], Some(10), Some(12));
        assert_eq!(j.ids.iter().copied().collect::<Vec<_>>(), [10, 11, 12]);
        // Promotion passed 11: only the floor moves, no ids are resent.
        j.apply(&[], Some(12), Some(12));
        assert_eq!(j.ids.iter().copied().collect::<Vec<_>>(), [12]);
        // A Full Sync left nothing recoverable.
        j.apply(&[], None, None);
        assert!(j.ids.is_empty());
        assert_eq!(j.oldest, None);
        // Checkpoints after the sync arrive again.
        j.apply(&[20], Some(20), Some(20));
        assert_eq!(j.ids.iter().copied().collect::<Vec<_>>(), [20]);
    }

    #[test]
    fn judgement_table() {
        let a = journal(&[10, 11, 12, 13]);
        let b = journal(&[11, 12]);
        let c = journal(&[12, 13, 14]);
        let empty = DiskJournal::default();
        let mut syncing = journal(&[]);
        syncing.apply(&[], None, None);
        type Row<'a> = (
            &'a str,
            Vec<u64>,
            Vec<Option<&'a DiskJournal>>,
            Vec<u64>,
            Option<u64>,
        );
        let table: Vec<Row> = vec![
            (
                "one disk",
                vec![10, 12, 99],
                vec![Some(&a)],
                vec![10, 12],
                Some(10),
            ),
            (
                "intersection of two",
                vec![10, 11, 12, 13],
                vec![Some(&a), Some(&b)],
                vec![11, 12],
                Some(11),
            ),
            (
                "three disks, floor is the highest oldest",
                vec![10, 11, 12, 13, 14],
                vec![Some(&a), Some(&b), Some(&c)],
                vec![12],
                Some(12),
            ),
            (
                "a disk without a report decides nothing",
                vec![11, 12],
                vec![Some(&a), None],
                vec![],
                None,
            ),
            ("no disks decide nothing", vec![11], vec![], vec![], None),
            (
                "a journal holding nothing marks nothing and sets no floor",
                vec![11, 12],
                vec![Some(&a), Some(&syncing)],
                vec![],
                None,
            ),
            (
                "a never-reported journal is the same",
                vec![11],
                vec![Some(&b), Some(&empty)],
                vec![],
                None,
            ),
            (
                "nothing pending still thins",
                vec![],
                vec![Some(&a), Some(&c)],
                vec![],
                Some(12),
            ),
        ];
        for (name, pending, disks, recoverable, floor) in table {
            let v = judge(&pending, &disks);
            assert_eq!(v.newly_recoverable, recoverable, "{name}");
            assert_eq!(v.delete_below, floor, "{name}");
        }
    }
}
