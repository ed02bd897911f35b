//! Crash during promotion and commit at every step boundary (fault injection), restart,
//! and the same replica disk and journal as a run without the crash.
// Helpers outside #[test] fns are test code too (clippy's allow-unwrap-in-tests misses them).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bulwark::agent::journal::{
    CheckpointInfo, CheckpointKind, FaultPoint, Journal, JournalConfig, JournalError,
    PromotePolicy, Record,
};

const DISK: u64 = 64 << 10;

/// Counts fault points while armed; fails the `fail_at`-th one (0-based), if any.
#[derive(Default)]
struct Injector {
    armed: AtomicBool,
    seen: AtomicUsize,
    fail_at: AtomicUsize,
    points: std::sync::Mutex<Vec<FaultPoint>>,
}

impl Injector {
    fn new(fail_at: Option<usize>) -> Arc<Injector> {
        let i = Injector::default();
        i.fail_at
            .store(fail_at.unwrap_or(usize::MAX), Ordering::SeqCst);
        Arc::new(i)
    }
    fn hook(self: &Arc<Self>) -> bulwark::agent::journal::FaultHook {
        let me = self.clone();
        Arc::new(move |p| {
            if !me.armed.load(Ordering::SeqCst) {
                return Ok(());
            }
            let n = me.seen.fetch_add(1, Ordering::SeqCst);
            me.points.lock().unwrap().push(p);
            if n == me.fail_at.load(Ordering::SeqCst) {
                return Err(JournalError::Injected(p));
            }
            Ok(())
        })
    }
}

fn config(fault: Option<bulwark::agent::journal::FaultHook>) -> JournalConfig {
    let mut cfg = JournalConfig::new(3, DISK);
    cfg.segment_size = 8192;
    cfg.index_chunk_shift = 12;
    cfg.index_mark_min = 3;
    cfg.fault = fault;
    cfg
}

/// 60 records over several segments: writes, zeros, trims, a checkpoint every 6.
fn fill(j: &mut Journal) {
    let mut seq = 0;
    for i in 0..60u64 {
        seq += 1;
        let ts = 1000 * seq as i64;
        let off = (i * 7919) % (DISK - 3000);
        match i % 6 {
            5 => j
                .append(Record::checkpoint(
                    seq,
                    ts,
                    100 + i,
                    CheckpointKind::Scheduled,
                    None,
                ))
                .unwrap(),
            4 if i % 12 == 4 => j.append(Record::zero(seq, ts, off, 2500)).unwrap(),
            4 => j.append(Record::trim(seq, ts, off, 1800)).unwrap(),
            _ => {
                let data: Vec<u8> = (0..1500 + (i as usize * 37) % 1500)
                    .map(|k| (k as u8) ^ (i as u8).wrapping_mul(13))
                    .collect();
                j.append(Record::write(seq, ts, off, &data)).unwrap()
            }
        };
        if i % 10 == 9 {
            j.sync().unwrap();
        }
    }
    j.sync().unwrap();
}

#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    replica: Vec<u8>,
    checkpoints: Vec<CheckpointInfo>,
    views: Vec<Vec<u8>>,
    records: u64,
    promoted_seq: u64,
    last_seq: u64,
    durable_seq: u64,
    bytes_used: u64,
}

fn snapshot(j: &Journal, replica: &Path) -> Snapshot {
    let cps = j.checkpoints();
    let views = cps
        .iter()
        .map(|c| {
            let v = j.open_view(c.id).unwrap();
            let mut b = vec![0u8; DISK as usize];
            v.read_at(&mut b, 0).unwrap();
            b
        })
        .collect();
    let st = j.stats();
    Snapshot {
        replica: std::fs::read(replica).unwrap(),
        checkpoints: cps,
        views,
        records: st.records,
        promoted_seq: st.promoted_seq,
        last_seq: st.last_seq,
        durable_seq: st.durable_seq,
        bytes_used: st.bytes_used,
    }
}

/// The window keeps the last 20 s: promotion goes to the checkpoint at seq 36.
fn policy() -> PromotePolicy {
    PromotePolicy {
        now_ms: 60_000,
        history_ms: 20_000,
        warn_bytes: None,
        hard_limit_bytes: None,
    }
}

/// After recovery the journal must keep working the same way.
fn more(j: &mut Journal) {
    let d = j.last_seq();
    j.append(Record::write(d + 1, 0, 100, &[9u8; 3000]))
        .unwrap();
    j.append(Record::checkpoint(
        d + 2,
        99_000,
        999,
        CheckpointKind::UserTagged,
        Some("after"),
    ))
    .unwrap();
    j.sync().unwrap();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Promote,
    Commit,
}

impl Scenario {
    fn run(self, j: &mut Journal, inj: &Arc<Injector>) -> Result<(), JournalError> {
        match self {
            Scenario::Promote => {
                inj.armed.store(true, Ordering::SeqCst);
                let r = j.promote(&policy());
                inj.armed.store(false, Ordering::SeqCst);
                let rep = r?;
                // A rerun after a redo on open finds nothing left to do.
                assert!(
                    rep.promoted_to.is_none()
                        || rep.promoted_to.as_ref().map(|c| c.seq) == Some(36)
                );
                assert_eq!(j.stats().promoted_seq, 36);
                Ok(())
            }
            Scenario::Commit => commit_scenario(j, inj),
        }
    }
}

const COMMIT_AT: u64 = 100 + 29; // checkpoint at seq 30

fn commit_scenario(j: &mut Journal, inj: &Arc<Injector>) -> Result<(), JournalError> {
    let v = j.open_view(COMMIT_AT)?;
    v.write_at(&[0xAB; 5000], 10_000)?;
    v.write_at(&[0xCD; 100], DISK - 100)?;
    inj.armed.store(true, Ordering::SeqCst);
    let r = j.commit(v);
    inj.armed.store(false, Ordering::SeqCst);
    r.map(|_| ())
}

fn run(
    root: &Path,
    scenario: Scenario,
    fail_at: Option<usize>,
    redo_fail_at: Option<usize>,
) -> (Snapshot, Vec<FaultPoint>) {
    let dir = root.join("j");
    let replica = root.join("replica");
    let inj = Injector::new(fail_at);
    let mut j = Journal::open(&dir, &replica, config(Some(inj.hook()))).unwrap();
    fill(&mut j);
    let r = scenario.run(&mut j, &inj);
    let points = inj.points.lock().unwrap().clone();
    match (fail_at, r) {
        (None, r) => r.unwrap(),
        (Some(_), Err(JournalError::Injected(_))) => {
            // The journal refuses to go on after the "crash".
            assert!(matches!(j.sync(), Err(JournalError::Closed(_))));
            drop(j);
            if let Some(k) = redo_fail_at {
                // Crash again while open() redoes the interrupted work.
                let inj2 = Injector::new(Some(k));
                inj2.armed.store(true, Ordering::SeqCst);
                match Journal::open(&dir, &replica, config(Some(inj2.hook()))) {
                    Ok(j2) => drop(j2),
                    Err(JournalError::Injected(_)) => {}
                    Err(e) => panic!("reopen failed: {e}"),
                }
            }
            let mut j2 = Journal::open(&dir, &replica, config(None)).unwrap();
            // The operation the crash interrupted is asked for again, as the agent would
            // after a restart (if the redo on open already finished it, it is a no-op).
            let committed = j2.checkpoints().len() == 1 && j2.stats().records == 0;
            if scenario == Scenario::Promote || !committed {
                scenario.run(&mut j2, &Injector::new(None)).unwrap();
            }
            j = j2;
        }
        (Some(k), r) => panic!("fault {k} did not stop the operation: {r:?}"),
    }
    drop(j);
    let mut j = Journal::open(&dir, &replica, config(None)).unwrap();
    let s1 = snapshot(&j, &replica);
    more(&mut j);
    let s2 = snapshot(&j, &replica);
    assert_eq!(s2.checkpoints.last().unwrap().id, 999);
    (s1, points)
}

fn every_point(scenario: Scenario, expect: &[FaultPoint]) {
    let root = tempfile::tempdir().unwrap();
    let (reference, points) = run(&root.path().join("ref"), scenario, None, None);
    for p in expect {
        assert!(points.contains(p), "{p:?} never reached: {points:?}");
    }
    assert!(points.len() > expect.len());
    // Every boundary, but only some of the per-record ones (they all look alike).
    let applied: Vec<usize> = (0..points.len())
        .filter(|&k| points[k] == FaultPoint::RecordApplied)
        .collect();
    let picked: Vec<usize> = (0..points.len())
        .filter(|&k| {
            points[k] != FaultPoint::RecordApplied
                || k == applied[0]
                || k == applied[applied.len() / 2]
        })
        .collect();
    for &k in &picked {
        // Also crash a second time while `open` redoes the work, at its first boundary
        // and at a later one.
        for redo in [None, Some(0), Some(2)] {
            let r = root.path().join(format!("crash-{k}-{redo:?}"));
            let (s, _) = run(&r, scenario, Some(k), redo);
            assert!(
                s == reference,
                "crash at point {k} ({:?}), redo crash {redo:?}: journal or replica differs",
                points[k]
            );
            std::fs::remove_dir_all(&r).unwrap();
        }
    }
}

#[test]
fn crash_during_promotion_at_every_step() {
    every_point(
        Scenario::Promote,
        &[
            FaultPoint::PromoteIntentWritten,
            FaultPoint::RecordApplied,
            FaultPoint::PromoteApplied,
            FaultPoint::PromoteReplicaSynced,
            FaultPoint::PromoteStateWritten,
            FaultPoint::SegmentDeleted,
        ],
    );
}

#[test]
fn crash_during_commit_at_every_step() {
    every_point(
        Scenario::Commit,
        &[
            FaultPoint::CommitScratchPersisted,
            FaultPoint::CommitIntentWritten,
            FaultPoint::RecordApplied,
            FaultPoint::CommitApplied,
            FaultPoint::CommitScratchApplied,
            FaultPoint::CommitReplicaSynced,
            FaultPoint::CommitCleanWritten,
            FaultPoint::SegmentDeleted,
            FaultPoint::CommitSegmentsDeleted,
            FaultPoint::CommitStateWritten,
        ],
    );
}

#[test]
fn commit_result_is_the_view() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("j");
    let replica = root.path().join("replica");
    let mut j = Journal::open(&dir, &replica, config(None)).unwrap();
    fill(&mut j);
    let v = j.open_view(COMMIT_AT).unwrap();
    v.write_at(&[0xAB; 5000], 10_000).unwrap();
    let mut want = vec![0u8; DISK as usize];
    v.read_at(&mut want, 0).unwrap();
    let rep = j.commit(v).unwrap();
    assert_eq!(rep.checkpoint.id, COMMIT_AT);
    assert_eq!(rep.scratch_bytes, 5000);
    assert!(rep.records_discarded > 0);
    assert_eq!(std::fs::read(&replica).unwrap(), want);
    assert_eq!(j.checkpoints().len(), 1);
    // Resent records from before the commit stay duplicates.
    assert_eq!(
        j.append(Record::write(40, 0, 0, &[1])).unwrap(),
        bulwark::agent::journal::Appended::Duplicate
    );
}

/// A journal closed by a failure is retired (its sync thread stopped, its durable seq
/// final) and its directory opened again in the same process while the retired one
/// still exists: the new journal holds at least what was durable, and the retired one
/// still answers what it held but takes nothing more.
#[test]
fn a_failed_journal_is_retired_and_its_directory_reopened() {
    let dir = tempfile::tempdir().unwrap();
    // Once armed, every fdatasync of a segment fails (on the sync thread).
    let armed = Arc::new(AtomicBool::new(false));
    let a = armed.clone();
    let hook: bulwark::agent::journal::FaultHook = Arc::new(move |p| match p {
        FaultPoint::SegmentSync { .. } if a.load(Ordering::SeqCst) => {
            Err(JournalError::Injected(p))
        }
        _ => Ok(()),
    });
    let mut j = Journal::open(
        dir.path().join("journal"),
        dir.path().join("replica.img"),
        config(Some(hook)),
    )
    .unwrap();
    fill(&mut j);
    let durable = j.sync().unwrap();
    assert_eq!(durable, 60);
    assert_eq!(j.failure(), None);
    for seq in 61..=64u64 {
        j.append(Record::write(seq, 0, seq * 512, &[7u8; 512]))
            .unwrap();
    }
    armed.store(true, Ordering::SeqCst);
    assert!(j.sync().is_err(), "the injected failure fails the sync");
    let why = j.failure().expect("closed after the failure");
    assert!(matches!(
        j.append(Record::write(65, 0, 0, &[1u8; 512])),
        Err(JournalError::Closed(_))
    ));
    assert_eq!(j.open_views(), 0);
    let cps = j.checkpoints();
    assert_eq!(j.retire(), 60);
    assert_eq!(j.retire(), 60, "idempotent");
    assert_eq!(j.failure(), Some(why), "the first failure is kept");

    let again = Journal::open(
        dir.path().join("journal"),
        dir.path().join("replica.img"),
        config(None),
    )
    .unwrap();
    assert!(again.durable_seq() >= 60, "{}", again.durable_seq());
    assert_eq!(again.failure(), None);
    assert_eq!(again.checkpoints(), cps);
    assert_eq!(j.checkpoints(), cps, "the retired journal still answers");
    assert!(j.sync().is_err());
}
