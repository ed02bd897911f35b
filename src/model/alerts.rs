//! SLA alerts: which alerts the current facts call for, and the hysteresis that turns a
//! stream of per-second verdicts into few, stable raise/clear transitions.
//!
//! Two pure steps, both with time passed in:
//! - [`conditions`] maps the facts of every VPG and host to one [`Condition`] per
//!   (kind, subject) that is not plainly fine: [`Signal::Active`] (the alert's condition
//!   holds) or [`Signal::Hold`] (inside the clear margin, or suppressed: neither raise nor
//!   clear). A key missing from the result counts as [`Signal::Inactive`].
//! - [`step`] is the state machine of one key: raise only after the condition held for
//!   `raise_after`, clear only after it was plainly false for `clear_after`.
//!
//! One root cause is one alert: a disconnected site (or a disconnected host serving
//! VPGs) is a single `site_disconnection` alert of that site with the number of VPGs it
//! affects; those VPGs raise no RPO or history alerts of their own meanwhile.

use super::units::{Bytes, Secs};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// RPO must fall below this share of the target before an RPO alert clears.
pub const RPO_CLEAR_RATIO: f64 = 0.9;
/// History below this share of its (capped) target is a warning …
pub const HISTORY_WARNING_RATIO: f64 = 0.85;
/// … and below this share an error.
pub const HISTORY_ERROR_RATIO: f64 = 0.75;
/// History must be back above this share before a history alert clears.
pub const HISTORY_CLEAR_RATIO: f64 = 0.9;
/// The journal must shrink below this share of a limit before its alert clears.
pub const JOURNAL_CLEAR_RATIO: f64 = 0.95;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    RpoExceeded,
    HistoryNotMet,
    JournalSizeWarning,
    JournalHardLimit,
    SiteDisconnection,
    HostDisconnected,
    SyncRequired,
    JournalStorageError,
    RecoveryStorageError,
    TestOverdue,
    /// A recovery operation failed (raised by the operations runner: an event alert).
    OperationFailed,
    /// A failover test ran into its time box and was stopped (an event alert).
    TestTimeBoxed,
}

impl AlertKind {
    pub const ALL: &'static [AlertKind] = &[
        AlertKind::RpoExceeded,
        AlertKind::HistoryNotMet,
        AlertKind::JournalSizeWarning,
        AlertKind::JournalHardLimit,
        AlertKind::SiteDisconnection,
        AlertKind::HostDisconnected,
        AlertKind::SyncRequired,
        AlertKind::JournalStorageError,
        AlertKind::RecoveryStorageError,
        AlertKind::TestOverdue,
        AlertKind::OperationFailed,
        AlertKind::TestTimeBoxed,
    ];

    /// The stable identifier used in JSON and the database.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::RpoExceeded => "rpo_exceeded",
            AlertKind::HistoryNotMet => "history_not_met",
            AlertKind::JournalSizeWarning => "journal_size_warning",
            AlertKind::JournalHardLimit => "journal_hard_limit",
            AlertKind::SiteDisconnection => "site_disconnection",
            AlertKind::HostDisconnected => "host_disconnected",
            AlertKind::SyncRequired => "sync_required",
            AlertKind::JournalStorageError => "journal_storage_error",
            AlertKind::RecoveryStorageError => "recovery_storage_error",
            AlertKind::TestOverdue => "test_overdue",
            AlertKind::OperationFailed => "operation_failed",
            AlertKind::TestTimeBoxed => "test_time_boxed",
        }
    }

    /// Raised by what happened (an operation's end), not by a condition the evaluator
    /// watches: no hysteresis machine owns it. It stays open until the VPG's next
    /// operation ends as asked (acknowledging marks it seen).
    pub fn is_event(self) -> bool {
        matches!(self, AlertKind::OperationFailed | AlertKind::TestTimeBoxed)
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|k| k.as_str() == s)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "warning" => Some(Severity::Warning),
            "error" => Some(Severity::Error),
            _ => None,
        }
    }
}

/// What an alert is about (ids).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Subject {
    Vpg(String),
    Host(String),
    Site(String),
}

/// One state machine per key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AlertKey {
    pub kind: AlertKind,
    pub subject: Subject,
}

/// The verdict of one pass for one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    /// The alert's condition holds.
    Active,
    /// Neither raise nor clear: inside the clear margin, or suppressed by a root cause
    /// reported elsewhere.
    Hold,
    /// Plainly fine.
    Inactive,
}

/// What [`conditions`] says about one key.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub signal: Signal,
    pub severity: Severity,
    /// VPGs sharing this root cause (1 for a VPG's own alert).
    pub affected_count: u32,
    /// VPG ids concerned (for an aggregated alert: all of them).
    pub vpg_ids: Vec<String>,
    pub message: String,
}

/// Facts of one VPG, gathered by the evaluator.
#[derive(Debug, Clone)]
pub struct VpgAlertFacts {
    pub vpg_id: String,
    pub name: String,
    /// Whether the VPG protects at all (not deleting, recovered, …): otherwise none of
    /// its alerts apply.
    pub protecting: bool,
    pub protected_site_id: Option<String>,
    pub recovery_site_id: String,
    pub rpo_actual: Option<Duration>,
    pub rpo_target: Duration,
    pub history_actual: Duration,
    pub history_target: Duration,
    /// How long the VPG, as composed now, could have kept history (caps the target).
    pub protected_for: Duration,
    pub journal_bytes: Option<u64>,
    pub journal_warning_bytes: u64,
    pub journal_hard_limit_bytes: u64,
    pub initial_sync: bool,
    pub protected_site_connected: bool,
    pub recovery_site_connected: bool,
    /// A sync is owed but held for the resync window or the operator.
    pub sync_required: bool,
    pub journal_storage_error: bool,
    pub recovery_storage_error: bool,
    /// The last failover test, or when protection started if never tested.
    pub last_test_or_start: Option<DateTime<Utc>>,
    /// 0: no reminder.
    pub test_reminder_days: u32,
}

/// Facts of one enrolled host.
#[derive(Debug, Clone)]
pub struct HostAlertFacts {
    pub host_id: String,
    pub name: String,
    pub site_id: String,
    pub connected: bool,
}

/// The history target as `model::status::history_met` applies it: capped by how long
/// the VPG could have kept history (less the current RPO, less 1 % for rounding).
pub fn effective_history_target(f: &VpgAlertFacts) -> Duration {
    let lived = f
        .protected_for
        .saturating_sub(f.rpo_actual.unwrap_or(Duration::ZERO));
    f.history_target.min(lived.mul_f64(0.99))
}

fn ratio(actual: Duration, target: Duration) -> f64 {
    if target.is_zero() {
        return f64::INFINITY;
    }
    actual.as_secs_f64() / target.as_secs_f64()
}

fn banded(active: bool, plainly_fine: bool) -> Signal {
    if active {
        Signal::Active
    } else if plainly_fine {
        Signal::Inactive
    } else {
        Signal::Hold
    }
}

/// Which alerts the facts call for at `now`. Keys plainly fine are left out.
pub fn conditions(
    vpgs: &[VpgAlertFacts],
    hosts: &[HostAlertFacts],
    now: DateTime<Utc>,
) -> BTreeMap<AlertKey, Condition> {
    let mut out = BTreeMap::new();
    let mut put = |kind, subject, signal, severity, vpg_ids: Vec<String>, message: String| {
        if signal != Signal::Inactive {
            out.insert(
                AlertKey { kind, subject },
                Condition {
                    signal,
                    severity,
                    affected_count: u32::try_from(vpg_ids.len()).unwrap_or(u32::MAX),
                    vpg_ids,
                    message,
                },
            );
        }
    };

    // Root causes first: sites that VPGs cannot reach.
    let mut sites: BTreeMap<&str, Vec<&VpgAlertFacts>> = BTreeMap::new();
    for v in vpgs.iter().filter(|v| v.protecting) {
        if !v.recovery_site_connected {
            sites
                .entry(v.recovery_site_id.as_str())
                .or_default()
                .push(v);
        }
        if let (false, Some(p)) = (v.protected_site_connected, v.protected_site_id.as_deref()) {
            if p != v.recovery_site_id || v.recovery_site_connected {
                sites.entry(p).or_default().push(v);
            }
        }
    }
    for (site, affected) in &sites {
        let names: Vec<&str> = affected.iter().map(|v| v.name.as_str()).collect();
        put(
            AlertKind::SiteDisconnection,
            Subject::Site((*site).to_string()),
            Signal::Active,
            Severity::Error,
            affected.iter().map(|v| v.vpg_id.clone()).collect(),
            format!(
                "site disconnected: {} VPG(s) cannot replicate ({})",
                affected.len(),
                names.join(", ")
            ),
        );
    }
    // A host down in a site already alerted is the same root cause.
    for h in hosts.iter().filter(|h| !h.connected) {
        let signal = if sites.contains_key(h.site_id.as_str()) {
            Signal::Hold
        } else {
            Signal::Active
        };
        put(
            AlertKind::HostDisconnected,
            Subject::Host(h.host_id.clone()),
            signal,
            Severity::Error,
            Vec::new(),
            format!("host {} is not connected to the manager", h.name),
        );
    }

    for v in vpgs.iter().filter(|v| v.protecting) {
        let subject = || Subject::Vpg(v.vpg_id.clone());
        let ids = || vec![v.vpg_id.clone()];
        let disconnected = !v.recovery_site_connected || !v.protected_site_connected;

        if let Some(rpo) = v.rpo_actual.filter(|_| !v.initial_sync) {
            let r = ratio(rpo, v.rpo_target);
            let signal = banded(r > 1.0, r < RPO_CLEAR_RATIO);
            // The site alert speaks for it; an open RPO alert stays until it is fine.
            let signal = if disconnected && signal == Signal::Active {
                Signal::Hold
            } else {
                signal
            };
            put(
                AlertKind::RpoExceeded,
                subject(),
                signal,
                Severity::Error,
                ids(),
                format!(
                    "VPG {}: RPO {} exceeds its target of {}",
                    v.name,
                    Secs(rpo.as_secs()),
                    Secs(v.rpo_target.as_secs())
                ),
            );
        }

        if !v.initial_sync && v.rpo_actual.is_some() {
            let target = effective_history_target(v);
            let r = ratio(v.history_actual, target);
            let signal = banded(r < HISTORY_WARNING_RATIO, r >= HISTORY_CLEAR_RATIO);
            let signal = if disconnected && signal == Signal::Active {
                Signal::Hold
            } else {
                signal
            };
            let severity = if r < HISTORY_ERROR_RATIO {
                Severity::Error
            } else {
                Severity::Warning
            };
            put(
                AlertKind::HistoryNotMet,
                subject(),
                signal,
                severity,
                ids(),
                format!(
                    "VPG {}: journal history {} is {:.0} % of its target of {}",
                    v.name,
                    Secs(v.history_actual.as_secs()),
                    (r * 100.0).min(100.0),
                    Secs(target.as_secs())
                ),
            );
        }

        if let Some(bytes) = v.journal_bytes {
            let limit = |l: u64| {
                let r = bytes as f64 / l.max(1) as f64;
                banded(r >= 1.0, r < JOURNAL_CLEAR_RATIO)
            };
            put(
                AlertKind::JournalSizeWarning,
                subject(),
                limit(v.journal_warning_bytes),
                Severity::Warning,
                ids(),
                format!(
                    "VPG {}: journal {} passed the warning size of {}",
                    v.name,
                    Bytes(bytes),
                    Bytes(v.journal_warning_bytes)
                ),
            );
            put(
                AlertKind::JournalHardLimit,
                subject(),
                limit(v.journal_hard_limit_bytes),
                Severity::Error,
                ids(),
                format!(
                    "VPG {}: journal reached its hard limit of {}; history is promoted early",
                    v.name,
                    Bytes(v.journal_hard_limit_bytes)
                ),
            );
        }

        let flag = |b: bool| if b { Signal::Active } else { Signal::Inactive };
        put(
            AlertKind::SyncRequired,
            subject(),
            flag(v.sync_required),
            Severity::Warning,
            ids(),
            format!(
                "VPG {}: a sync is required and waits for the resync window or an operator",
                v.name
            ),
        );
        put(
            AlertKind::JournalStorageError,
            subject(),
            flag(v.journal_storage_error),
            Severity::Error,
            ids(),
            format!("VPG {}: I/O error on journal storage", v.name),
        );
        put(
            AlertKind::RecoveryStorageError,
            subject(),
            flag(v.recovery_storage_error),
            Severity::Error,
            ids(),
            format!("VPG {}: I/O error on recovery storage", v.name),
        );

        if let (days @ 1.., Some(since)) = (v.test_reminder_days, v.last_test_or_start) {
            let overdue = now - since > chrono::Duration::days(i64::from(days));
            put(
                AlertKind::TestOverdue,
                subject(),
                flag(overdue),
                Severity::Warning,
                ids(),
                format!("VPG {}: no failover test for more than {days} days", v.name),
            );
        }
    }
    out
}

/// Hysteresis timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hysteresis {
    /// The condition must hold this long before the alert is raised.
    pub raise_after: Duration,
    /// The condition must be plainly false this long before the alert clears.
    pub clear_after: Duration,
}

impl Default for Hysteresis {
    fn default() -> Self {
        Self {
            raise_after: Duration::from_secs(3),
            clear_after: Duration::from_secs(10),
        }
    }
}

/// The state of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AlertState {
    #[default]
    Idle,
    /// Active since then, not raised yet.
    Pending { since: DateTime<Utc> },
    /// Raised; `clear_since`: plainly fine since then.
    Open { clear_since: Option<DateTime<Utc>> },
}

impl AlertState {
    pub fn is_open(self) -> bool {
        matches!(self, AlertState::Open { .. })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Raise,
    Clear,
}

fn held_for(since: DateTime<Utc>, now: DateTime<Utc>, d: Duration) -> bool {
    (now - since).to_std().unwrap_or(Duration::ZERO) >= d
}

/// One pass of one key's state machine.
pub fn step(
    state: AlertState,
    signal: Signal,
    now: DateTime<Utc>,
    h: Hysteresis,
) -> (AlertState, Option<Transition>) {
    use AlertState::*;
    use Signal::*;
    match (state, signal) {
        (Idle, Active) => {
            if h.raise_after.is_zero() {
                (Open { clear_since: None }, Some(Transition::Raise))
            } else {
                (Pending { since: now }, None)
            }
        }
        (Idle, Hold | Inactive) => (Idle, None),
        (Pending { since }, Active) => {
            if held_for(since, now, h.raise_after) {
                (Open { clear_since: None }, Some(Transition::Raise))
            } else {
                (Pending { since }, None)
            }
        }
        // Raising needs the condition to hold without a break.
        (Pending { .. }, Hold | Inactive) => (Idle, None),
        // Inside the margin the clear timer starts over.
        (Open { .. }, Active | Hold) => (Open { clear_since: None }, None),
        (Open { clear_since }, Inactive) => {
            let since = clear_since.unwrap_or(now);
            if held_for(since, now, h.clear_after) {
                (Idle, Some(Transition::Clear))
            } else {
                (
                    Open {
                        clear_since: Some(since),
                    },
                    None,
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(ms: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_700_000_000, 0).unwrap() + chrono::Duration::milliseconds(ms)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn h() -> Hysteresis {
        Hysteresis {
            raise_after: secs(3),
            clear_after: secs(10),
        }
    }

    fn healthy(id: &str) -> VpgAlertFacts {
        VpgAlertFacts {
            vpg_id: id.into(),
            name: id.into(),
            protecting: true,
            protected_site_id: Some("prod".into()),
            recovery_site_id: "dr".into(),
            rpo_actual: Some(secs(5)),
            rpo_target: secs(10),
            history_actual: secs(3600),
            history_target: secs(3600),
            protected_for: secs(86400),
            journal_bytes: Some(100),
            journal_warning_bytes: 750,
            journal_hard_limit_bytes: 1000,
            initial_sync: false,
            protected_site_connected: true,
            recovery_site_connected: true,
            sync_required: false,
            journal_storage_error: false,
            recovery_storage_error: false,
            last_test_or_start: Some(t(0)),
            test_reminder_days: 180,
        }
    }

    fn key(kind: AlertKind, id: &str) -> AlertKey {
        AlertKey {
            kind,
            subject: Subject::Vpg(id.into()),
        }
    }

    /// Runs one key through `signals` (one per second from t=0) and returns the
    /// transitions with the second they happened at.
    fn run(signals: &[Signal]) -> Vec<(i64, Transition)> {
        let mut s = AlertState::Idle;
        let mut out = Vec::new();
        for (i, sig) in signals.iter().enumerate() {
            let now = t(i as i64 * 1000);
            let (next, tr) = step(s, *sig, now, h());
            s = next;
            if let Some(tr) = tr {
                out.push((i as i64, tr));
            }
        }
        out
    }

    #[test]
    fn every_transition_of_the_state_machine() {
        use Signal::*;
        let open = AlertState::Open { clear_since: None };
        type Case = (
            &'static str,
            AlertState,
            Signal,
            i64,
            AlertState,
            Option<Transition>,
        );
        let cases: Vec<Case> = vec![
            (
                "idle stays idle when fine",
                AlertState::Idle,
                Inactive,
                0,
                AlertState::Idle,
                None,
            ),
            (
                "idle ignores the margin",
                AlertState::Idle,
                Hold,
                0,
                AlertState::Idle,
                None,
            ),
            (
                "idle → pending",
                AlertState::Idle,
                Active,
                5,
                AlertState::Pending { since: t(5) },
                None,
            ),
            (
                "pending too short",
                AlertState::Pending { since: t(0) },
                Active,
                2999,
                AlertState::Pending { since: t(0) },
                None,
            ),
            (
                "pending → open",
                AlertState::Pending { since: t(0) },
                Active,
                3000,
                open,
                Some(Transition::Raise),
            ),
            (
                "pending broken by margin",
                AlertState::Pending { since: t(0) },
                Hold,
                1000,
                AlertState::Idle,
                None,
            ),
            (
                "pending broken by fine",
                AlertState::Pending { since: t(0) },
                Inactive,
                1000,
                AlertState::Idle,
                None,
            ),
            ("open stays while active", open, Active, 0, open, None),
            ("open stays in the margin", open, Hold, 0, open, None),
            (
                "open starts the clear timer",
                open,
                Inactive,
                7,
                AlertState::Open {
                    clear_since: Some(t(7)),
                },
                None,
            ),
            (
                "margin resets the clear timer",
                AlertState::Open {
                    clear_since: Some(t(0)),
                },
                Hold,
                9000,
                open,
                None,
            ),
            (
                "active resets the clear timer",
                AlertState::Open {
                    clear_since: Some(t(0)),
                },
                Active,
                9000,
                open,
                None,
            ),
            (
                "clear timer too short",
                AlertState::Open {
                    clear_since: Some(t(0)),
                },
                Inactive,
                9999,
                AlertState::Open {
                    clear_since: Some(t(0)),
                },
                None,
            ),
            (
                "open → cleared",
                AlertState::Open {
                    clear_since: Some(t(0)),
                },
                Inactive,
                10_000,
                AlertState::Idle,
                Some(Transition::Clear),
            ),
        ];
        for (name, from, sig, at, to, tr) in cases {
            assert_eq!(step(from, sig, t(at), h()), (to, tr), "{name}");
        }
    }

    #[test]
    fn zero_delays_raise_and_clear_at_once() {
        let z = Hysteresis {
            raise_after: Duration::ZERO,
            clear_after: Duration::ZERO,
        };
        let (s, tr) = step(AlertState::Idle, Signal::Active, t(0), z);
        assert_eq!(tr, Some(Transition::Raise));
        assert_eq!(
            step(s, Signal::Inactive, t(0), z).1,
            Some(Transition::Clear)
        );
    }

    #[test]
    fn raise_needs_the_delay_and_clear_needs_the_clear_delay() {
        use Signal::*;
        let mut sig = vec![Active; 5];
        sig.extend(vec![Inactive; 12]);
        assert_eq!(
            run(&sig),
            vec![(3, Transition::Raise), (15, Transition::Clear)]
        );
    }

    /// RPO alternating 9.9 / 10.1 s around a 10 s target.
    fn rpo_signal(rpo_ms: u64) -> Signal {
        let mut v = healthy("a");
        v.rpo_actual = Some(Duration::from_millis(rpo_ms));
        conditions(&[v], &[], t(0))
            .get(&key(AlertKind::RpoExceeded, "a"))
            .map_or(Signal::Inactive, |c| c.signal)
    }

    #[test]
    fn flapping_rpo_raises_at_most_once_and_never_clears_in_the_margin() {
        let flap: Vec<Signal> = (0..60)
            .map(|i| rpo_signal(if i % 2 == 0 { 9900 } else { 10100 }))
            .collect();
        assert_eq!(run(&flap), vec![], "never held 3 s in a row");

        // Held long enough once, then flapping: one raise, no clear (9.9 s is above
        // 90 % of the target).
        let mut sig = vec![rpo_signal(10100); 4];
        sig.extend(flap);
        assert_eq!(run(&sig), vec![(3, Transition::Raise)]);

        // Flapping with the other edge of the margin: clears once RPO stays below 9 s.
        let mut sig = vec![rpo_signal(10100); 4];
        sig.extend((0..20).map(|i| rpo_signal(if i % 2 == 0 { 8900 } else { 9500 })));
        sig.extend(vec![rpo_signal(8000); 11]);
        let got = run(&sig);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[1].1, Transition::Clear);
        assert_eq!(got[1].0, 34, "10 s after the margin was left for good");
    }

    fn kinds_of(
        vpgs: &[VpgAlertFacts],
        hosts: &[HostAlertFacts],
        now: i64,
    ) -> Vec<(AlertKind, Signal, Severity)> {
        conditions(vpgs, hosts, t(now))
            .iter()
            .map(|(k, c)| (k.kind, c.signal, c.severity))
            .collect()
    }

    #[test]
    fn each_kind_from_its_facts() {
        use AlertKind as K;
        use Severity::*;
        use Signal::*;
        let day = 86_400_000i64;
        type Case = (
            &'static str,
            fn(&mut VpgAlertFacts),
            i64,
            Vec<(AlertKind, Signal, Severity)>,
        );
        let cases: Vec<Case> = vec![
            ("healthy", |_| {}, 0, vec![]),
            (
                "rpo over target",
                |f| f.rpo_actual = Some(secs(11)),
                0,
                vec![(K::RpoExceeded, Active, Error)],
            ),
            (
                "rpo in the clear margin",
                |f| f.rpo_actual = Some(Duration::from_millis(9500)),
                0,
                vec![(K::RpoExceeded, Hold, Error)],
            ),
            (
                "rpo at the target is met",
                |f| f.rpo_actual = Some(secs(10)),
                0,
                vec![(K::RpoExceeded, Hold, Error)],
            ),
            (
                "no rpo during initial sync",
                |f| {
                    f.initial_sync = true;
                    f.rpo_actual = Some(secs(100));
                    f.history_actual = secs(0);
                },
                0,
                vec![],
            ),
            (
                "history 80 %: warning",
                |f| f.history_actual = secs(2880),
                0,
                vec![(K::HistoryNotMet, Active, Warning)],
            ),
            (
                "history 70 %: error",
                |f| f.history_actual = secs(2520),
                0,
                vec![(K::HistoryNotMet, Active, Error)],
            ),
            (
                "history 87 %: margin",
                |f| f.history_actual = secs(3132),
                0,
                vec![(K::HistoryNotMet, Hold, Warning)],
            ),
            (
                "history capped by a young VPG",
                |f| {
                    f.protected_for = secs(600);
                    f.history_actual = secs(590);
                },
                0,
                vec![],
            ),
            (
                "journal past warning",
                |f| f.journal_bytes = Some(800),
                0,
                vec![(K::JournalSizeWarning, Active, Warning)],
            ),
            (
                "journal just under warning: margin",
                |f| f.journal_bytes = Some(740),
                0,
                vec![(K::JournalSizeWarning, Hold, Warning)],
            ),
            (
                "journal at hard limit",
                |f| f.journal_bytes = Some(1000),
                0,
                vec![
                    (K::JournalSizeWarning, Active, Warning),
                    (K::JournalHardLimit, Active, Error),
                ],
            ),
            (
                "sync required",
                |f| f.sync_required = true,
                0,
                vec![(K::SyncRequired, Active, Warning)],
            ),
            (
                "journal storage error",
                |f| f.journal_storage_error = true,
                0,
                vec![(K::JournalStorageError, Active, Error)],
            ),
            (
                "recovery storage error",
                |f| f.recovery_storage_error = true,
                0,
                vec![(K::RecoveryStorageError, Active, Error)],
            ),
            ("test not overdue", |_| {}, 180 * day, vec![]),
            (
                "test overdue",
                |_| {},
                180 * day + 1,
                vec![(K::TestOverdue, Active, Warning)],
            ),
            (
                "test reminder off",
                |f| f.test_reminder_days = 0,
                400 * day,
                vec![],
            ),
            (
                "recovery site down: one site alert, RPO held",
                |f| {
                    f.recovery_site_connected = false;
                    f.rpo_actual = Some(secs(60));
                },
                0,
                vec![
                    (K::RpoExceeded, Hold, Error),
                    (K::SiteDisconnection, Active, Error),
                ],
            ),
            (
                "not protecting: nothing",
                |f| {
                    f.protecting = false;
                    f.journal_storage_error = true;
                    f.recovery_site_connected = false;
                },
                0,
                vec![],
            ),
        ];
        for (name, edit, now, mut want) in cases {
            let mut f = healthy("a");
            edit(&mut f);
            want.sort();
            let mut got = kinds_of(&[f], &[], now);
            got.sort();
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn one_site_alert_for_many_vpgs_and_no_host_alert_under_it() {
        let mut a = healthy("a");
        let mut b = healthy("b");
        a.recovery_site_connected = false;
        b.recovery_site_connected = false;
        let c = healthy("c");
        let hosts = vec![
            HostAlertFacts {
                host_id: "h-dr".into(),
                name: "esx-dr".into(),
                site_id: "dr".into(),
                connected: false,
            },
            HostAlertFacts {
                host_id: "h-idle".into(),
                name: "spare".into(),
                site_id: "lab".into(),
                connected: false,
            },
            HostAlertFacts {
                host_id: "h-ok".into(),
                name: "esx-a".into(),
                site_id: "prod".into(),
                connected: true,
            },
        ];
        let got = conditions(&[a, b, c], &hosts, t(0));
        let site = &got[&AlertKey {
            kind: AlertKind::SiteDisconnection,
            subject: Subject::Site("dr".into()),
        }];
        assert_eq!(site.affected_count, 2);
        assert_eq!(site.vpg_ids, vec!["a".to_string(), "b".to_string()]);
        assert_eq!(
            got.values().filter(|c| c.signal == Signal::Active).count(),
            2,
            "{got:?}"
        );
        assert_eq!(
            got[&AlertKey {
                kind: AlertKind::HostDisconnected,
                subject: Subject::Host("h-dr".into())
            }]
                .signal,
            Signal::Hold,
            "the site alert speaks for its host"
        );
        assert_eq!(
            got[&AlertKey {
                kind: AlertKind::HostDisconnected,
                subject: Subject::Host("h-idle".into())
            }]
                .signal,
            Signal::Active,
            "a host serving no VPG has its own alert"
        );
    }

    #[test]
    fn protected_site_down_is_an_alert_of_the_protected_site() {
        let mut a = healthy("a");
        a.protected_site_connected = false;
        let got = conditions(&[a], &[], t(0));
        assert!(got.contains_key(&AlertKey {
            kind: AlertKind::SiteDisconnection,
            subject: Subject::Site("prod".into())
        }));
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn kinds_round_trip() {
        for k in AlertKind::ALL {
            assert_eq!(AlertKind::parse(k.as_str()), Some(*k));
        }
        assert_eq!(Severity::parse("error"), Some(Severity::Error));
        assert_eq!(Severity::parse("info"), None);
    }
}
