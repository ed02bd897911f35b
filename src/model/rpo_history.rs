//! RPO history arithmetic: the storage tiers, which tier and step answer a query, how
//! samples fold into buckets, and the per-VPG aggregation of the evaluator's samples.
//!
//! Tiers (resolution, retention):
//! - `raw`: 1 s, 2 hours — one row per VPG per second the evaluator ran;
//! - `minute`: 60 s, 7 days — aggregated in memory from the raw samples as they pass;
//! - `hour`: 3600 s, 400 days — aggregated the same way (a year of reports and then some).
//!
//! Folding is "worst wins", because an SLA report must never hide a breach:
//! - `rpo_ms`: the maximum; `None` (no recoverable checkpoint at all) is worse than any
//!   number, so one `None` sample makes the bucket `None`;
//! - `history_secs`: the minimum; `None` (no history) is worse than any number;
//! - `status`: the worst by [`status_rank`]; among equally bad ones the LAST wins (the
//!   most recent reason). Rank, worst first: `not_meeting_sla`, `rpo_not_meeting_sla`,
//!   `history_not_meeting_sla`, any other non-meeting status (initializing, failing
//!   over, moving, deleting, recovered), and `meeting_sla` only when every sample met it.
//!
//! A query over `[since, until)` with at most `max_points` points: `needed` is the
//! smallest step giving that many points, rounded up to a "nice" step (1, 2, 5, 10 s …
//! 1 day, then whole days) so charts get round bucket boundaries. The tier is the
//! coarsest one whose resolution divides that step and whose retention still reaches
//! `since`; if none reaches `since` with a fine enough resolution, the finest tier that
//! reaches it is used with its own resolution as the step (fewer points, never more);
//! if no tier reaches it, the coarsest. Buckets are aligned on multiples of the step
//! since the epoch, so repeated queries return the same buckets; empty buckets are
//! left out. An unaligned range touches one bucket more than it spans steps: when that
//! would exceed `max_points`, the partial oldest bucket is left out (the answer starts
//! at the first step boundary after `since`, less than one step later).

use crate::model::status::VpgStatus;

/// A storage tier of the history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Raw,
    Minute,
    Hour,
}

impl Tier {
    /// Finest first.
    pub const ALL: [Tier; 3] = [Tier::Raw, Tier::Minute, Tier::Hour];

    /// Seconds one row of this tier spans.
    pub fn resolution_secs(self) -> i64 {
        match self {
            Tier::Raw => 1,
            Tier::Minute => 60,
            Tier::Hour => 3600,
        }
    }

    /// How long rows of this tier are kept.
    pub fn retention_secs(self) -> i64 {
        match self {
            Tier::Raw => 2 * 3600,
            Tier::Minute => 7 * 86_400,
            Tier::Hour => 400 * 86_400,
        }
    }

    /// The value stored in the `tier` column.
    pub fn code(self) -> i16 {
        match self {
            Tier::Raw => 0,
            Tier::Minute => 1,
            Tier::Hour => 2,
        }
    }

    /// The next finer tier, if any.
    pub fn finer(self) -> Option<Tier> {
        match self {
            Tier::Raw => None,
            Tier::Minute => Some(Tier::Raw),
            Tier::Hour => Some(Tier::Minute),
        }
    }
}

/// Worse statuses rank higher (see the module docs).
pub fn status_rank(s: VpgStatus) -> u8 {
    match s {
        VpgStatus::MeetingSla => 0,
        VpgStatus::NotMeetingSla => 4,
        VpgStatus::RpoNotMeetingSla => 3,
        VpgStatus::HistoryNotMeetingSla => 2,
        VpgStatus::Initializing
        | VpgStatus::FailingOver
        | VpgStatus::Moving
        | VpgStatus::Deleting
        | VpgStatus::Recovered => 1,
    }
}

/// One sample or one aggregated bucket: the values of `[at, at + span)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    /// Seconds since the epoch: the start of the span.
    pub at: i64,
    pub rpo_ms: Option<i64>,
    pub history_secs: Option<i64>,
    pub status: VpgStatus,
}

impl Point {
    /// Folds a later point in (worst wins; see the module docs).
    pub fn fold(&mut self, later: &Point) {
        self.rpo_ms = match (self.rpo_ms, later.rpo_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            _ => None,
        };
        self.history_secs = match (self.history_secs, later.history_secs) {
            (Some(a), Some(b)) => Some(a.min(b)),
            _ => None,
        };
        if status_rank(later.status) >= status_rank(self.status) {
            self.status = later.status;
        }
    }
}

/// Floor of `t` to a multiple of `step` (also for times before the epoch).
pub fn align(t: i64, step: i64) -> i64 {
    t.div_euclid(step.max(1)) * step.max(1)
}

/// The steps a query may use below one day (each a multiple of the tiers' resolutions
/// it is at least as coarse as).
const NICE: [i64; 17] = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10_800, 21_600, 43_200,
];

/// The smallest nice step of at least `secs`.
pub fn nice_step(secs: i64) -> i64 {
    if let Some(s) = NICE.iter().copied().find(|&s| s >= secs) {
        return s;
    }
    let day = 86_400;
    ((secs + day - 1) / day).max(1) * day
}

/// Which tier a query reads and the step of its buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub tier: Tier,
    pub step_secs: i64,
    /// Start of the first bucket: the step boundary at or before `since`, or the one
    /// after it when that bucket would exceed `max_points` (see [`Plan::new`]).
    pub from: i64,
}

/// The plan for `[since, until)` (seconds since the epoch) with at most `max_points`
/// buckets, at `now` (see the module docs). `until > since` and `max_points >= 1`.
pub fn plan(since: i64, until: i64, max_points: u32, now: i64) -> Plan {
    let range = (until - since).max(1);
    let points = i64::from(max_points.max(1));
    let needed = nice_step((range + points - 1) / points);
    let reaches = |t: Tier| since >= now - t.retention_secs();
    if let Some(tier) = Tier::ALL
        .iter()
        .rev()
        .copied()
        .find(|&t| t.resolution_secs() <= needed && reaches(t))
    {
        return Plan::new(tier, needed, since, until, points);
    }
    let tier = Tier::ALL
        .iter()
        .copied()
        .find(|&t| reaches(t))
        .unwrap_or(Tier::Hour);
    Plan::new(
        tier,
        needed.max(tier.resolution_secs()),
        since,
        until,
        points,
    )
}

impl Plan {
    fn new(tier: Tier, step_secs: i64, since: i64, until: i64, points: i64) -> Plan {
        // The step gives at most `points` steps over the range, but aligned buckets
        // touch one more when the range is not aligned: that partial oldest bucket is
        // left out rather than breaking the limit.
        let mut from = align(since, step_secs);
        if buckets(since, until, step_secs) > points {
            from += step_secs;
        }
        Plan {
            tier,
            step_secs,
            from,
        }
    }
}

/// How many aligned buckets of `step` seconds `[since, until)` touches.
pub fn buckets(since: i64, until: i64, step: i64) -> i64 {
    let step = step.max(1);
    let last = (until - 1).max(since);
    last.div_euclid(step) - since.div_euclid(step) + 1
}

/// Folds points (in time order, each spanning at most `step`) into aligned buckets of
/// `step` seconds; empty buckets are left out.
pub fn downsample(points: impl IntoIterator<Item = Point>, step: i64) -> Vec<Point> {
    let mut out: Vec<Point> = Vec::new();
    for p in points {
        let at = align(p.at, step);
        match out.last_mut() {
            Some(last) if last.at == at => last.fold(&p),
            _ => out.push(Point { at, ..p }),
        }
    }
    out
}

/// What the evaluator saw for one VPG in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub vpg_id: String,
    /// Seconds since the epoch.
    pub at: i64,
    pub rpo_ms: Option<i64>,
    pub history_secs: Option<i64>,
    pub status: VpgStatus,
}

/// A closed bucket to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub vpg_id: String,
    pub tier: Tier,
    pub point: Point,
}

/// The open bucket of every tier for one VPG.
#[derive(Debug, Default, Clone)]
struct Open([Option<Point>; 3]);

/// Turns the evaluator's samples into rows of every tier: several samples within one
/// second fold into one raw row; raw rows fold into the open minute and hour buckets,
/// which are closed (and become rows) once their span is over.
#[derive(Debug, Default)]
pub struct Aggregator {
    open: std::collections::HashMap<String, Open>,
}

impl Aggregator {
    /// Takes one sample; rows of buckets it closes go to `out`.
    pub fn add(&mut self, s: Sample, out: &mut Vec<Row>) {
        let p = Point {
            at: s.at,
            rpo_ms: s.rpo_ms,
            history_secs: s.history_secs,
            status: s.status,
        };
        // Looked up before inserting: the id is cloned once per VPG, not per sample.
        if !self.open.contains_key(&s.vpg_id) {
            self.open.insert(s.vpg_id.clone(), Open::default());
        }
        let Some(open) = self.open.get_mut(&s.vpg_id) else {
            return;
        };
        for (i, tier) in Tier::ALL.iter().copied().enumerate() {
            let at = align(p.at, tier.resolution_secs());
            match &mut open.0[i] {
                Some(b) if b.at == at => b.fold(&p),
                // A sample older than the open bucket (the clock stepped back): folded
                // into it rather than reopening a stored bucket.
                Some(b) if at < b.at => b.fold(&Point { at: b.at, ..p }),
                slot => {
                    if let Some(done) = slot.take() {
                        out.push(Row {
                            vpg_id: s.vpg_id.clone(),
                            tier,
                            point: done,
                        });
                    }
                    *slot = Some(Point { at, ..p });
                }
            }
        }
    }

    /// Closes every bucket whose span ended by `now` (or every bucket when `all`, at
    /// shutdown); VPGs left with no open bucket are forgotten.
    pub fn close(&mut self, now: i64, all: bool, out: &mut Vec<Row>) {
        self.open.retain(|vpg_id, open| {
            for (i, tier) in Tier::ALL.iter().copied().enumerate() {
                let ended = open.0[i].is_some_and(|b| b.at + tier.resolution_secs() <= now);
                if all || ended {
                    if let Some(done) = open.0[i].take() {
                        out.push(Row {
                            vpg_id: vpg_id.clone(),
                            tier,
                            point: done,
                        });
                    }
                }
            }
            open.0.iter().any(Option::is_some)
        });
    }

    /// VPGs with an open bucket.
    pub fn len(&self) -> usize {
        self.open.len()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use VpgStatus as S;

    fn pt(at: i64, rpo: Option<i64>, hist: Option<i64>, status: VpgStatus) -> Point {
        Point {
            at,
            rpo_ms: rpo,
            history_secs: hist,
            status,
        }
    }

    #[test]
    fn fold_keeps_the_worst() {
        // (first, later, expected)
        let cases = [
            (
                pt(0, Some(1000), Some(60), S::MeetingSla),
                pt(1, Some(5000), Some(30), S::MeetingSla),
                pt(0, Some(5000), Some(30), S::MeetingSla),
            ),
            (
                pt(0, Some(9000), Some(10), S::RpoNotMeetingSla),
                pt(1, Some(1000), Some(90), S::MeetingSla),
                pt(0, Some(9000), Some(10), S::RpoNotMeetingSla),
            ),
            // No recoverable checkpoint is worse than any RPO.
            (
                pt(0, None, None, S::Initializing),
                pt(1, Some(1000), Some(90), S::MeetingSla),
                pt(0, None, None, S::Initializing),
            ),
            (
                pt(0, Some(1000), Some(90), S::MeetingSla),
                pt(1, None, Some(5), S::MeetingSla),
                pt(0, None, Some(5), S::MeetingSla),
            ),
            // Ranks: not meeting > rpo > history > other non-meeting > meeting.
            (
                pt(0, Some(1), Some(1), S::NotMeetingSla),
                pt(1, Some(1), Some(1), S::RpoNotMeetingSla),
                pt(0, Some(1), Some(1), S::NotMeetingSla),
            ),
            (
                pt(0, Some(1), Some(1), S::HistoryNotMeetingSla),
                pt(1, Some(1), Some(1), S::RpoNotMeetingSla),
                pt(0, Some(1), Some(1), S::RpoNotMeetingSla),
            ),
            (
                pt(0, Some(1), Some(1), S::HistoryNotMeetingSla),
                pt(1, Some(1), Some(1), S::Moving),
                pt(0, Some(1), Some(1), S::HistoryNotMeetingSla),
            ),
            // Equally bad: the last wins.
            (
                pt(0, Some(1), Some(1), S::Initializing),
                pt(1, Some(1), Some(1), S::Deleting),
                pt(0, Some(1), Some(1), S::Deleting),
            ),
        ];
        for (i, (mut a, b, want)) in cases.into_iter().enumerate() {
            a.fold(&b);
            assert_eq!(a, want, "case {i}");
        }
    }

    #[test]
    fn every_status_ranks_above_meeting_sla() {
        for s in VpgStatus::ALL {
            if *s != S::MeetingSla {
                assert!(status_rank(*s) > status_rank(S::MeetingSla), "{s:?}");
            }
        }
    }

    #[test]
    fn nice_steps() {
        let cases = [
            (0, 1),
            (1, 1),
            (3, 5),
            (5, 5),
            (59, 60),
            (61, 120),
            (3599, 3600),
            (50_000, 86_400),
            (86_401, 172_800),
        ];
        for (secs, want) in cases {
            assert_eq!(nice_step(secs), want, "{secs}");
        }
    }

    #[test]
    fn plans() {
        // Midnight: every nice step divides it.
        let now = 86_400 * 11_574;
        let h = 3600;
        let d = 86_400;
        // (since, until, max_points, tier, step)
        let cases = [
            // Default console view: the last hour at 720 points = 5 s steps from raw.
            (now - h, now, 720, Tier::Raw, 5),
            (now - h, now, 5000, Tier::Raw, 1),
            // 2 h at 5000 points still raw; one second past its window: minute.
            (now - 2 * h, now, 5000, Tier::Raw, 2),
            (now - 2 * h - 1, now, 5000, Tier::Minute, 60),
            // Unaligned: 120 s steps touch 6 buckets; the partial oldest one goes.
            (now - 660, now - 60, 5, Tier::Minute, 120),
            (now - 3601, now - 1, 720, Tier::Raw, 5),
            // Coarse enough for minutes: read minutes even though raw covers.
            (now - h, now, 30, Tier::Minute, 120),
            (now - d, now, 720, Tier::Minute, 120),
            (now - 7 * d, now, 720, Tier::Minute, 900),
            // Beyond the minute window: hours.
            (now - 30 * d, now, 720, Tier::Hour, 3600),
            (now - 30 * d, now, 5000, Tier::Hour, 3600),
            (now - 365 * d, now, 720, Tier::Hour, 86_400),
            // An old window of an hour: only the hour tier reaches it.
            (now - 10 * d, now - 10 * d + h, 720, Tier::Hour, 3600),
            // Beyond every retention: the coarsest tier (it may be empty).
            (now - 500 * d, now - 499 * d, 720, Tier::Hour, 3600),
            // A window in the future of the raw tier is reachable.
            (now - 60, now + 60, 720, Tier::Raw, 1),
        ];
        for (i, (since, until, max, tier, step)) in cases.into_iter().enumerate() {
            let p = plan(since, until, max, now);
            assert_eq!((p.tier, p.step_secs), (tier, step), "case {i}");
            assert!(
                buckets(p.from, until, p.step_secs) <= i64::from(max),
                "case {i}"
            );
            assert!(p.from <= since + p.step_secs, "case {i}");
        }
    }

    #[test]
    fn downsample_aligns_and_keeps_the_worst() {
        let pts = [
            pt(100, Some(1000), Some(60), S::MeetingSla),
            pt(101, Some(7000), Some(50), S::RpoNotMeetingSla),
            pt(104, Some(2000), Some(70), S::MeetingSla),
            // Gap: 105..110 empty, left out.
            pt(111, Some(3000), Some(40), S::MeetingSla),
        ];
        let got = downsample(pts, 5);
        assert_eq!(
            got,
            vec![
                pt(100, Some(7000), Some(50), S::RpoNotMeetingSla),
                pt(110, Some(3000), Some(40), S::MeetingSla),
            ]
        );
        assert_eq!(align(-1, 60), -60);
        assert_eq!(buckets(0, 600, 120), 5);
        assert_eq!(buckets(60, 660, 120), 6);
        assert_eq!(buckets(60, 61, 120), 1);
        let now = 86_400 * 11_574;
        assert_eq!(plan(now - 660, now - 60, 5, now).from, now - 600);
        assert_eq!(plan(now - 600, now, 5, now).from, now - 600);
    }

    fn sample(at: i64, rpo: i64, status: VpgStatus) -> Sample {
        Sample {
            vpg_id: "v".into(),
            at,
            rpo_ms: Some(rpo),
            history_secs: Some(100),
            status,
        }
    }

    #[test]
    fn aggregator_emits_each_tier_once_its_bucket_closes() {
        let mut a = Aggregator::default();
        let mut out = Vec::new();
        let t0 = 3600 * 10; // an hour boundary
                            // Two samples in the same second fold into one raw row.
        a.add(sample(t0, 1000, S::MeetingSla), &mut out);
        a.add(sample(t0, 9000, S::RpoNotMeetingSla), &mut out);
        assert!(out.is_empty());
        for s in 1..60 {
            a.add(sample(t0 + s, 2000, S::MeetingSla), &mut out);
        }
        // 59 raw rows closed by the next second's sample.
        assert_eq!(out.len(), 59);
        assert!(out.iter().all(|r| r.tier == Tier::Raw));
        assert_eq!(out[0].point.rpo_ms, Some(9000));
        assert_eq!(out[0].point.status, S::RpoNotMeetingSla);
        out.clear();
        // The next minute closes the raw second and the minute.
        a.add(sample(t0 + 60, 3000, S::MeetingSla), &mut out);
        assert_eq!(out.len(), 2);
        let minute = out.iter().find(|r| r.tier == Tier::Minute).unwrap();
        assert_eq!(
            minute.point,
            pt(t0, Some(9000), Some(100), S::RpoNotMeetingSla)
        );
        out.clear();
        // Time passes without samples (the VPG went away): close by the clock.
        a.close(t0 + 61, false, &mut out);
        assert_eq!(out.len(), 1, "only the raw second ended: {out:?}");
        out.clear();
        a.close(t0 + 3600, false, &mut out);
        let tiers: Vec<Tier> = out.iter().map(|r| r.tier).collect();
        assert_eq!(tiers, vec![Tier::Minute, Tier::Hour]);
        assert_eq!(out[1].point.rpo_ms, Some(9000));
        assert!(a.is_empty(), "a VPG without open buckets is forgotten");
    }

    #[test]
    fn aggregator_closes_everything_at_shutdown_and_tolerates_a_clock_step_back() {
        let mut a = Aggregator::default();
        let mut out = Vec::new();
        a.add(sample(1000, 10, S::MeetingSla), &mut out);
        a.add(sample(990, 500, S::NotMeetingSla), &mut out);
        assert!(out.is_empty(), "no bucket reopened: {out:?}");
        a.close(1000, true, &mut out);
        assert_eq!(out.len(), 3);
        assert!(out
            .iter()
            .all(|r| r.point.rpo_ms == Some(500) && r.point.status == S::NotMeetingSla));
        assert_eq!(a.len(), 0);
    }
}
