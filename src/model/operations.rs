//! Recovery operations as pure state machines: failover test, failover (live) and move,
//! each with the steps it runs, the phase it puts the VPG in, what an operator may ask
//! of it at each point (commit, rollback, stop) and the steps that request appends.
//!
//! An operation is a plan — an ordered list of named steps — plus a cursor. The plan
//! starts with the steps that bring the VMs up and ends in a waiting step (`before
//! commit`, or `testing` for a test); the operator's decision (or the commit policy's
//! timer, or a test's time box) appends the steps that end it. The manager persists the
//! plan and the cursor before each step acts, so a restarted manager continues exactly
//! where the last one stopped; every step is idempotent towards the agents.
//!
//! No I/O here: the manager's operation runner (`manager::ops`) executes the steps.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::model::status::OperationPhase;

/// What an operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    FailoverTest,
    Failover,
    Move,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::FailoverTest => "failover_test",
            OperationKind::Failover => "failover",
            OperationKind::Move => "move",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "failover_test" => Some(OperationKind::FailoverTest),
            "failover" => Some(OperationKind::Failover),
            "move" => Some(OperationKind::Move),
            _ => None,
        }
    }

    /// Whether it ends in a commit or rollback (a test ends in a stop).
    pub fn is_live(self) -> bool {
        !matches!(self, OperationKind::FailoverTest)
    }
}

/// One step of an operation. The names are stable: they are stored, shown, and used
/// by fault injection (`BULWARK_FAULT_STEP=<step>:<before|after>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Resolve the checkpoint and the VMs; check the hosts the operation needs.
    Prepare,
    /// Test: a user-tagged checkpoint marks the test's start in every journal.
    TagTestStart,
    /// Failover and move: the VPG's fencing generation goes up; every host is told.
    BumpFencing,
    /// Shut the protected VMs down and lock them against starting (skipped for hosts
    /// that cannot be reached in a failover; required in a move).
    ShutDownProtected,
    /// Move: a checkpoint after the last write, durable in every journal (RPO 0).
    FinalCheckpoint,
    /// The recovery hosts bring the VMs up from the checkpoint (views over NBD), off.
    Recover,
    /// Power the recovered VMs on, boot group by boot group, with the groups' delays.
    PowerOn,
    /// Failover and move: waiting for commit or rollback (or the commit policy).
    BeforeCommit,
    /// Test: running until stopped (or its time box ends).
    Testing,
    /// Commit: protection of the VPG stops (its streams end).
    StopProtection,
    /// Commit: the journals are promoted up to the checkpoint into the replica disks,
    /// the scratch layers merged; the recovered VMs now run on them.
    Promote,
    /// Commit with reverse protection: the old protected disks become the pre-seeded
    /// replicas of the recovered ones.
    SeedReverse,
    /// Commit with reverse protection: the VPG's roles swap (the recovered VMs are the
    /// protected members, the old protected site the recovery site); a Delta Sync back.
    ReverseProtection,
    /// Commit without reverse protection: the VPG is Recovered.
    MarkRecovered,
    /// Rollback and test stop: the recovered VMs are removed, scratch discarded.
    Discard,
    /// Rollback: the original VMs are unlocked and powered on again.
    RestartProtected,
    /// Test stop: the test is recorded for the test-reminder SLA.
    RecordTest,
}

impl Step {
    pub const ALL: &'static [Step] = &[
        Step::Prepare,
        Step::TagTestStart,
        Step::BumpFencing,
        Step::ShutDownProtected,
        Step::FinalCheckpoint,
        Step::Recover,
        Step::PowerOn,
        Step::BeforeCommit,
        Step::Testing,
        Step::StopProtection,
        Step::Promote,
        Step::SeedReverse,
        Step::ReverseProtection,
        Step::MarkRecovered,
        Step::Discard,
        Step::RestartProtected,
        Step::RecordTest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Step::Prepare => "prepare",
            Step::TagTestStart => "tag_test_start",
            Step::BumpFencing => "bump_fencing",
            Step::ShutDownProtected => "shut_down_protected",
            Step::FinalCheckpoint => "final_checkpoint",
            Step::Recover => "recover",
            Step::PowerOn => "power_on",
            Step::BeforeCommit => "before_commit",
            Step::Testing => "testing",
            Step::StopProtection => "stop_protection",
            Step::Promote => "promote",
            Step::SeedReverse => "seed_reverse",
            Step::ReverseProtection => "reverse_protection",
            Step::MarkRecovered => "mark_recovered",
            Step::Discard => "discard",
            Step::RestartProtected => "restart_protected",
            Step::RecordTest => "record_test",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Step::ALL.iter().copied().find(|x| x.as_str() == s)
    }

    /// A step that waits for the operator rather than doing something.
    pub fn is_wait(self) -> bool {
        matches!(self, Step::BeforeCommit | Step::Testing)
    }
}

/// How the operator ends an operation (or the policy / time box does it for them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Commit {
        reverse_protection: bool,
    },
    Rollback,
    /// End a failover test.
    Stop,
}

/// What happens by itself after the VMs are up, unless the operator decides first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action")]
pub enum CommitPolicy {
    /// Wait for the operator (the default).
    #[default]
    None,
    Commit {
        after_secs: u64,
    },
    Rollback {
        after_secs: u64,
    },
}

impl CommitPolicy {
    /// The decision due once `waited` has passed in the waiting step, if any.
    pub fn due(self, waited: Duration, reverse_protection: bool) -> Option<Decision> {
        match self {
            CommitPolicy::None => None,
            CommitPolicy::Commit { after_secs } => (waited >= Duration::from_secs(after_secs))
                .then_some(Decision::Commit { reverse_protection }),
            CommitPolicy::Rollback { after_secs } => {
                (waited >= Duration::from_secs(after_secs)).then_some(Decision::Rollback)
            }
        }
    }

    /// Seconds until the policy acts, for the countdown shown to the operator.
    pub fn remaining(self, waited: Duration) -> Option<u64> {
        match self {
            CommitPolicy::None => None,
            CommitPolicy::Commit { after_secs } | CommitPolicy::Rollback { after_secs } => {
                Some(after_secs.saturating_sub(waited.as_secs()))
            }
        }
    }
}

/// The steps that bring the VMs up, ending in the waiting step.
pub fn initial_plan(kind: OperationKind) -> Vec<Step> {
    match kind {
        OperationKind::FailoverTest => vec![
            Step::Prepare,
            Step::TagTestStart,
            Step::Recover,
            Step::PowerOn,
            Step::Testing,
        ],
        OperationKind::Failover => vec![
            Step::Prepare,
            Step::BumpFencing,
            Step::ShutDownProtected,
            Step::Recover,
            Step::PowerOn,
            Step::BeforeCommit,
        ],
        OperationKind::Move => vec![
            Step::Prepare,
            Step::BumpFencing,
            Step::ShutDownProtected,
            Step::FinalCheckpoint,
            Step::Recover,
            Step::PowerOn,
            Step::BeforeCommit,
        ],
    }
}

/// Why a decision is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    #[error("a failover test is ended with stop, not commit or rollback")]
    TestNeedsStop,
    #[error("stop ends a failover test; a {0} ends with commit or rollback")]
    StopNeedsTest(&'static str),
    #[error("the operation already has a decision ({0})")]
    AlreadyDecided(&'static str),
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Commit { .. } => "commit",
            Decision::Rollback => "rollback",
            Decision::Stop => "stop",
        }
    }
}

/// The steps a decision appends to a plan. A decision is taken once: a second one (a
/// repeated request, or the timer racing the operator) is refused unless it is the same.
pub fn decide(
    kind: OperationKind,
    already: Option<Decision>,
    d: Decision,
) -> Result<Vec<Step>, DecisionError> {
    if let Some(a) = already {
        return Err(DecisionError::AlreadyDecided(a.as_str()));
    }
    match (kind, d) {
        (OperationKind::FailoverTest, Decision::Stop) => Ok(vec![Step::Discard, Step::RecordTest]),
        (OperationKind::FailoverTest, _) => Err(DecisionError::TestNeedsStop),
        (k, Decision::Stop) => Err(DecisionError::StopNeedsTest(k.as_str())),
        (_, Decision::Commit { reverse_protection }) => Ok(if reverse_protection {
            vec![
                Step::StopProtection,
                Step::Promote,
                Step::SeedReverse,
                Step::ReverseProtection,
            ]
        } else {
            vec![Step::StopProtection, Step::Promote, Step::MarkRecovered]
        }),
        (_, Decision::Rollback) => Ok(vec![Step::Discard, Step::RestartProtected]),
    }
}

/// The VPG's phase while step `step` of an operation of `kind` runs (after `decision`,
/// if one was taken). A test keeps the SLA status ("Testing failover" is a sub-status).
pub fn phase(kind: OperationKind, step: Step, decision: Option<Decision>) -> OperationPhase {
    use OperationPhase as P;
    let moving = kind == OperationKind::Move;
    match (kind, decision) {
        (OperationKind::FailoverTest, _) => P::TestingFailover,
        (_, Some(Decision::Rollback)) => {
            if moving {
                P::RollingBackMove
            } else {
                P::RollingBackFailover
            }
        }
        (_, Some(Decision::Commit { .. })) => match (step, moving) {
            (Step::StopProtection, false) => P::CommittingFailover,
            (Step::StopProtection, true) => P::CommittingMove,
            (_, false) => P::PromotingFailover,
            (_, true) => P::PromotingMove,
        },
        _ => {
            if moving {
                P::MoveBeforeCommit
            } else {
                P::FailoverBeforeCommit
            }
        }
    }
}

/// Which checkpoint an operation recovers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointChoice {
    Latest,
    LatestTagged,
    LatestAppConsistent,
    /// The newest recoverable checkpoint tagged exactly so.
    Tag(String),
    Id(u64),
}

impl CheckpointChoice {
    /// `latest`, `latest_tagged`, `latest_app_consistent`, `tag:NAME` or a checkpoint id.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        match s {
            "" | "latest" => Ok(CheckpointChoice::Latest),
            "latest_tagged" | "latest-tagged" => Ok(CheckpointChoice::LatestTagged),
            "latest_app_consistent" | "latest-app-consistent" => {
                Ok(CheckpointChoice::LatestAppConsistent)
            }
            _ => {
                if let Some(t) = s.strip_prefix("tag:") {
                    if t.is_empty() {
                        return Err("`tag:` needs a tag name".into());
                    }
                    return Ok(CheckpointChoice::Tag(t.to_string()));
                }
                s.parse::<u64>().map(CheckpointChoice::Id).map_err(|_| {
                    format!(
                        "`{s}` is not a checkpoint: use latest, latest_tagged, \
                         latest_app_consistent, tag:NAME or a checkpoint id"
                    )
                })
            }
        }
    }

    pub fn describe(&self) -> String {
        match self {
            CheckpointChoice::Latest => "latest".into(),
            CheckpointChoice::LatestTagged => "latest_tagged".into(),
            CheckpointChoice::LatestAppConsistent => "latest_app_consistent".into(),
            CheckpointChoice::Tag(t) => format!("tag:{t}"),
            CheckpointChoice::Id(id) => id.to_string(),
        }
    }
}

/// A checkpoint as the choice sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointCandidate {
    pub id: u64,
    pub kind: crate::proto::control::CheckpointKind,
    pub tag: Option<String>,
    pub recoverable: bool,
}

/// The checkpoint `choice` names among `candidates` (any order), if it is recoverable.
pub fn choose_checkpoint(
    choice: &CheckpointChoice,
    candidates: &[CheckpointCandidate],
) -> Result<u64, String> {
    use crate::proto::control::CheckpointKind as K;
    let newest = |pred: &dyn Fn(&CheckpointCandidate) -> bool| {
        candidates
            .iter()
            .filter(|c| c.recoverable && pred(c))
            .map(|c| c.id)
            .max()
    };
    let found = match choice {
        CheckpointChoice::Latest => newest(&|_| true),
        CheckpointChoice::LatestTagged => newest(&|c| c.kind == K::UserTagged),
        CheckpointChoice::LatestAppConsistent => newest(&|c| c.kind == K::AppConsistent),
        CheckpointChoice::Tag(t) => newest(&|c| c.tag.as_deref() == Some(t.as_str())),
        CheckpointChoice::Id(id) => {
            return match candidates.iter().find(|c| c.id == *id) {
                Some(c) if c.recoverable => Ok(*id),
                Some(_) => Err(format!("checkpoint {id} is not recoverable")),
                None => Err(format!("checkpoint {id} does not exist in this VPG")),
            }
        }
    };
    found.ok_or_else(|| format!("no recoverable checkpoint matches `{}`", choice.describe()))
}

/// Recovered VM name for a test ("<vm> - Test") or a live recovery (the VM's own name).
pub fn recovered_name(vm: &str, test: bool) -> String {
    if test {
        format!("{vm} - Test")
    } else {
        vm.to_string()
    }
}

/// The network a recovered VM's NIC joins: the member's own choice, else the VPG's; the
/// test network for a failover test, the failover network otherwise.
pub fn recovery_network(
    m: &crate::model::settings::MemberSettings,
    s: &crate::model::settings::VpgSettings,
    test: bool,
) -> Option<String> {
    if test {
        m.test_network.clone().or_else(|| s.test_network.clone())
    } else {
        m.failover_network
            .clone()
            .or_else(|| s.failover_network.clone())
    }
}

/// The address a recovered VM gets (`address/prefix`): its first re-IP setting on a live
/// recovery; a test keeps the addresses on its isolated network.
pub fn recovery_ip(m: &crate::model::settings::MemberSettings, test: bool) -> Option<String> {
    if test {
        return None;
    }
    m.nics
        .iter()
        .find_map(|n| n.reip.as_ref())
        .map(|r| format!("{}/{}", r.address, r.prefix))
}

/// Boot groups in start order: VMs grouped by `boot_group` (lowest first), each group
/// with the delay to wait after it started (the largest of its members').
pub fn boot_order<T: Clone>(vms: &[(T, u32, u64)]) -> Vec<(Vec<T>, u64)> {
    let mut groups: std::collections::BTreeMap<u32, (Vec<T>, u64)> = Default::default();
    for (vm, group, delay) in vms {
        let g = groups.entry(*group).or_default();
        g.0.push(vm.clone());
        g.1 = g.1.max(*delay);
    }
    groups.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::control::CheckpointKind as K;

    #[test]
    fn plans_and_decisions() {
        use OperationKind as O;
        assert_eq!(initial_plan(O::Move).last(), Some(&Step::BeforeCommit));
        assert!(initial_plan(O::Move).contains(&Step::FinalCheckpoint));
        assert!(!initial_plan(O::Failover).contains(&Step::FinalCheckpoint));
        assert_eq!(initial_plan(O::FailoverTest).last(), Some(&Step::Testing));
        assert!(!initial_plan(O::FailoverTest).contains(&Step::BumpFencing));
        type Row = (
            O,
            Option<Decision>,
            Decision,
            Result<Vec<Step>, DecisionError>,
        );
        let table: &[Row] = &[
            (
                O::FailoverTest,
                None,
                Decision::Stop,
                Ok(vec![Step::Discard, Step::RecordTest]),
            ),
            (
                O::FailoverTest,
                None,
                Decision::Rollback,
                Err(DecisionError::TestNeedsStop),
            ),
            (
                O::Move,
                None,
                Decision::Stop,
                Err(DecisionError::StopNeedsTest("move")),
            ),
            (
                O::Failover,
                None,
                Decision::Commit {
                    reverse_protection: false,
                },
                Ok(vec![
                    Step::StopProtection,
                    Step::Promote,
                    Step::MarkRecovered,
                ]),
            ),
            (
                O::Move,
                None,
                Decision::Commit {
                    reverse_protection: true,
                },
                Ok(vec![
                    Step::StopProtection,
                    Step::Promote,
                    Step::SeedReverse,
                    Step::ReverseProtection,
                ]),
            ),
            (
                O::Failover,
                None,
                Decision::Rollback,
                Ok(vec![Step::Discard, Step::RestartProtected]),
            ),
            (
                O::Failover,
                Some(Decision::Rollback),
                Decision::Commit {
                    reverse_protection: false,
                },
                Err(DecisionError::AlreadyDecided("rollback")),
            ),
        ];
        for (kind, already, d, want) in table {
            assert_eq!(
                &decide(*kind, *already, *d),
                want,
                "{kind:?} {already:?} {d:?}"
            );
        }
    }

    #[test]
    fn phases_follow_the_reference_table() {
        use OperationKind as O;
        use OperationPhase as P;
        let commit = Some(Decision::Commit {
            reverse_protection: true,
        });
        let table = [
            (O::FailoverTest, Step::Recover, None, P::TestingFailover),
            (O::Failover, Step::Recover, None, P::FailoverBeforeCommit),
            (
                O::Failover,
                Step::BeforeCommit,
                None,
                P::FailoverBeforeCommit,
            ),
            (
                O::Failover,
                Step::StopProtection,
                commit,
                P::CommittingFailover,
            ),
            (O::Failover, Step::Promote, commit, P::PromotingFailover),
            (
                O::Failover,
                Step::Discard,
                Some(Decision::Rollback),
                P::RollingBackFailover,
            ),
            (O::Move, Step::FinalCheckpoint, None, P::MoveBeforeCommit),
            (O::Move, Step::StopProtection, commit, P::CommittingMove),
            (O::Move, Step::ReverseProtection, commit, P::PromotingMove),
            (
                O::Move,
                Step::RestartProtected,
                Some(Decision::Rollback),
                P::RollingBackMove,
            ),
        ];
        for (kind, step, d, want) in table {
            assert_eq!(phase(kind, step, d), want, "{kind:?} {step:?} {d:?}");
        }
    }

    #[test]
    fn commit_policy_counts_down() {
        let p = CommitPolicy::Commit { after_secs: 600 };
        assert_eq!(p.due(Duration::from_secs(599), true), None);
        assert_eq!(
            p.due(Duration::from_secs(600), true),
            Some(Decision::Commit {
                reverse_protection: true
            })
        );
        assert_eq!(p.remaining(Duration::from_secs(100)), Some(500));
        let r = CommitPolicy::Rollback { after_secs: 5 };
        assert_eq!(
            r.due(Duration::from_secs(6), false),
            Some(Decision::Rollback)
        );
        assert_eq!(
            CommitPolicy::None.due(Duration::from_secs(1 << 30), false),
            None
        );
        assert_eq!(CommitPolicy::None.remaining(Duration::ZERO), None);
    }

    #[test]
    fn checkpoint_choice_parses_and_resolves() {
        let cands = vec![
            CheckpointCandidate {
                id: 10,
                kind: K::Scheduled,
                tag: None,
                recoverable: true,
            },
            CheckpointCandidate {
                id: 11,
                kind: K::UserTagged,
                tag: Some("pre-upgrade".into()),
                recoverable: true,
            },
            CheckpointCandidate {
                id: 12,
                kind: K::AppConsistent,
                tag: None,
                recoverable: true,
            },
            CheckpointCandidate {
                id: 13,
                kind: K::Scheduled,
                tag: None,
                recoverable: true,
            },
            CheckpointCandidate {
                id: 14,
                kind: K::UserTagged,
                tag: Some("x".into()),
                recoverable: false,
            },
        ];
        let r = |s: &str| choose_checkpoint(&CheckpointChoice::parse(s).unwrap(), &cands);
        assert_eq!(r("latest"), Ok(13));
        assert_eq!(r(""), Ok(13));
        assert_eq!(r("latest_tagged"), Ok(11), "14 is not recoverable");
        assert_eq!(r("latest_app_consistent"), Ok(12));
        assert_eq!(r("tag:pre-upgrade"), Ok(11));
        assert!(r("tag:x").unwrap_err().contains("no recoverable"));
        assert_eq!(r("10"), Ok(10));
        assert!(r("14").unwrap_err().contains("not recoverable"));
        assert!(r("99").unwrap_err().contains("does not exist"));
        assert!(CheckpointChoice::parse("tag:").is_err());
        assert!(CheckpointChoice::parse("yesterday").is_err());
        assert!(choose_checkpoint(&CheckpointChoice::Latest, &[]).is_err());
    }

    #[test]
    fn latest_app_consistent_never_picks_a_round_whose_guests_were_only_paused() {
        use crate::model::checkpoints::round_kind;
        use crate::proto::control::QuiesceMethod as Q;
        // Both rounds asked to quiesce; the newer one's guests were only paused.
        let cands: Vec<CheckpointCandidate> = [(20, Some(Q::GuestAgent)), (21, Some(Q::Paused))]
            .into_iter()
            .map(|(id, q)| CheckpointCandidate {
                id,
                kind: round_kind(K::AppConsistent, true, q),
                tag: Some(format!("t{id}")),
                recoverable: true,
            })
            .collect();
        assert_eq!(
            choose_checkpoint(&CheckpointChoice::LatestAppConsistent, &cands),
            Ok(20)
        );
        assert_eq!(
            choose_checkpoint(&CheckpointChoice::LatestTagged, &cands),
            Ok(21),
            "the paused round is an ordinary tagged one"
        );
    }

    #[test]
    fn boot_groups_start_in_order_with_the_longest_delay() {
        let vms = [
            ("db", 0, 30),
            ("web1", 1, 0),
            ("cache", 0, 10),
            ("web2", 1, 5),
        ];
        let got = boot_order(&vms.map(|(n, g, d)| (n, g, d)));
        assert_eq!(
            got,
            vec![(vec!["db", "cache"], 30), (vec!["web1", "web2"], 5)]
        );
        assert_eq!(recovered_name("web", true), "web - Test");
        assert_eq!(recovered_name("web", false), "web");
    }

    #[test]
    fn step_names_round_trip() {
        for s in Step::ALL {
            assert_eq!(Step::parse(s.as_str()), Some(*s));
        }
        assert_eq!(Step::parse("nope"), None);
        assert!(
            Step::BeforeCommit.is_wait() && Step::Testing.is_wait() && !Step::Promote.is_wait()
        );
    }
}
