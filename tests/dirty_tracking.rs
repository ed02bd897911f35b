//! Dirty bitmap and activity log: model-based property tests, the crash invariant checked
//! against the files after every step, steady-state cost, concurrency, and damaged files.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

use std::collections::BTreeSet;
use std::sync::Arc;

use bulwark::agent::dirty::{
    ActivityLog, DirtyBitmap, DirtyConfig, DirtyPaths, DirtyTracker, RecoveryState,
};
use proptest::prelude::*;

const KIB: u64 = 1024;
const MIB: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Mark(u64, u64),
    Clear(u64, u64),
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..size, 1..256 * KIB).prop_map(|(o, l)| Op::Mark(o, l)),
        1 => (0..size, 1..512 * KIB).prop_map(|(o, l)| Op::Clear(o, l)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// The bitmap behaves like a set of region indices, and survives save/load.
    #[test]
    fn bitmap_matches_set_model(ops in prop::collection::vec(op(10 * MIB + 12345), 1..60)) {
        let size = 10 * MIB + 12345;
        let rs = 64 * KIB;
        let bm = DirtyBitmap::new(size, rs as u32).unwrap();
        let mut model = BTreeSet::new();
        let nreg = size.div_ceil(rs);
        for op in &ops {
            match *op {
                Op::Mark(o, l) => {
                    bm.mark(o, l);
                    let end = (o + l).min(size);
                    for r in o / rs..=(end - 1) / rs { model.insert(r); }
                }
                Op::Clear(o, l) => {
                    bm.clear_range(o, l);
                    let end = (o + l).min(size);
                    for r in 0..nreg {
                        let (rstart, rend) = (r * rs, ((r + 1) * rs).min(size));
                        if o <= rstart && rend <= end { model.remove(&r); }
                    }
                }
            }
        }
        prop_assert_eq!(bm.dirty_regions().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        let covered: u64 = bm.dirty_ranges().map(|r| r.end - r.start).sum();
        let expect: u64 = model.iter().map(|&r| ((r + 1) * rs).min(size) - r * rs).sum();
        prop_assert_eq!(covered, expect);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bm");
        bm.save(&p, false).unwrap();
        let (back, clean) = DirtyBitmap::load(&p).unwrap();
        prop_assert!(!clean);
        prop_assert_eq!(back.dirty_regions().collect::<Vec<_>>(), model.into_iter().collect::<Vec<_>>());
    }

}

proptest! {
    // Every step may fdatasync: fewer cases keep this test a few seconds long.
    #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

    /// Crash invariant, checked against the files on disk after every step: every region
    /// written so far is dirty in the persisted bitmap or inside a logged extent.
    #[test]
    fn files_always_cover_every_write(
        steps in prop::collection::vec((0..64 * MIB, 1..3 * MIB, 0..10u8), 1..40)
    ) {
        let size = 64 * MIB;
        let dir = tempfile::tempdir().unwrap();
        let paths = DirtyPaths::in_dir(dir.path(), "d");
        let cfg = DirtyConfig { region_size: 64 * KIB as u32, extent_size: MIB, al_capacity: 4 };
        let (t, _) = DirtyTracker::open(paths.clone(), size, cfg).unwrap();
        let mut written: Vec<(u64, u64)> = Vec::new();
        for (off, len, action) in steps {
            match action {
                0 => t.persist().unwrap(),
                _ => {
                    t.mark(off, len).unwrap();
                    written.push((off, len.min(size - off)));
                }
            }
            let (bm, _) = DirtyBitmap::load(&paths.bitmap).unwrap();
            let al = ActivityLog::recover(&paths.activity_log).unwrap();
            prop_assert!(al.extents.len() <= 4);
            for &(o, l) in &written {
                for r in o / (64 * KIB)..=(o + l - 1) / (64 * KIB) {
                    let e = r * 64 * KIB / MIB;
                    prop_assert!(bm.is_dirty(r) || al.extents.contains(&e),
                        "region {} (extent {}) lost: al {:?}", r, e, al.extents);
                }
            }
        }
    }
}

#[test]
fn hot_extents_cost_no_transactions() {
    let dir = tempfile::tempdir().unwrap();
    let paths = DirtyPaths::in_dir(dir.path(), "hot");
    let (t, _) = DirtyTracker::open(paths, 1 << 30, DirtyConfig::default()).unwrap();
    for i in 0..8u64 {
        t.mark(i * 4 * MIB, 4096).unwrap();
    }
    let tx = t.activity_log().transactions();
    assert_eq!(tx, 8);
    for round in 0..10_000u64 {
        let i = round % 8;
        t.mark(i * 4 * MIB + (round * 4096) % (4 * MIB - 4096), 4096)
            .unwrap();
    }
    assert_eq!(
        t.activity_log().transactions(),
        tx,
        "writes into hot extents wrote the log"
    );
    assert_eq!(t.persist_count(), 0, "no persist was needed");
    // Idle extents leave the log after two periodic persists without use.
    t.persist().unwrap();
    t.mark(0, 1).unwrap();
    t.persist().unwrap();
    assert_eq!(t.activity_log().active_extents(), vec![0]);
}

#[test]
fn concurrent_marks_with_a_tiny_log() {
    let dir = tempfile::tempdir().unwrap();
    let paths = DirtyPaths::in_dir(dir.path(), "conc");
    let size = 256 * MIB;
    let cfg = DirtyConfig {
        region_size: 64 * KIB as u32,
        extent_size: MIB,
        al_capacity: 4,
    };
    let (t, _) = DirtyTracker::open(paths.clone(), size, cfg).unwrap();
    let t = Arc::new(t);
    let threads: Vec<_> = (0..4u64)
        .map(|k| {
            let t = t.clone();
            std::thread::spawn(move || {
                let mut x = k * 7 + 1;
                let mut mine = Vec::new();
                for _ in 0..150 {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let off = (x >> 20) % (size - 2 * MIB);
                    let len = 1 + (x >> 8) % (2 * MIB);
                    t.mark(off, len).unwrap();
                    mine.push((off, len));
                    if x % 17 == 0 {
                        t.persist().unwrap();
                    }
                }
                mine
            })
        })
        .collect();
    let written: Vec<(u64, u64)> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let (bm, _) = DirtyBitmap::load(&paths.bitmap).unwrap();
    let al = ActivityLog::recover(&paths.activity_log).unwrap();
    for (o, l) in written {
        for r in o / (64 * KIB)..=(o + l - 1) / (64 * KIB) {
            assert!(bm.is_dirty(r) || al.extents.contains(&(r * 64 * KIB / MIB)));
            assert!(t.bitmap().is_dirty(r));
        }
    }
}

#[test]
fn damaged_or_missing_files_mean_everything_is_dirty() {
    let dir = tempfile::tempdir().unwrap();
    let paths = DirtyPaths::in_dir(dir.path(), "dmg");
    let cfg = DirtyConfig::default();
    let size = 100 * MIB;
    {
        let (t, rec) = DirtyTracker::open(paths.clone(), size, cfg).unwrap();
        assert_eq!(rec.state, RecoveryState::New);
        t.mark(0, 1).unwrap();
        t.close_clean().unwrap();
        assert!(t.mark(0, 1).is_err(), "marks after a clean close must fail");
    }
    // Flip a payload byte: checksum mismatch → Lost, all regions dirty.
    let mut bytes = std::fs::read(&paths.bitmap).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&paths.bitmap, &bytes).unwrap();
    let (t, rec) = DirtyTracker::open(paths.clone(), size, cfg).unwrap();
    assert!(
        matches!(rec.state, RecoveryState::Lost { .. }),
        "{:?}",
        rec.state
    );
    assert_eq!(t.bitmap().dirty_count(), t.bitmap().region_count());
    drop(t);
    // Bitmap gone but a log present: Lost as well.
    std::fs::remove_file(&paths.bitmap).unwrap();
    let (_, rec) = DirtyTracker::open(paths.clone(), size, cfg).unwrap();
    assert!(
        matches!(rec.state, RecoveryState::Lost { .. }),
        "{:?}",
        rec.state
    );
    // A different disk size: Lost.
    let (_, rec) = DirtyTracker::open(paths.clone(), size * 2, cfg).unwrap();
    assert!(
        matches!(rec.state, RecoveryState::Lost { .. }),
        "{:?}",
        rec.state
    );
    // A leftover temp file from a crash during save does not matter.
    std::fs::write(dir.path().join("dmg.dirty.tmp"), b"junk").unwrap();
    let (t, rec) = DirtyTracker::open(paths.clone(), size * 2, cfg).unwrap();
    assert_eq!(rec.state, RecoveryState::Unclean);
    t.close_clean().unwrap();
    let (_, rec) = DirtyTracker::open(paths, size * 2, cfg).unwrap();
    assert_eq!(rec.state, RecoveryState::Clean);
}
