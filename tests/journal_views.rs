//! Views under concurrent promotion and appends, retention limits and their stats,
//! corruption detection, compression, the error cases of the journal API, and the
//! pipelined sync API (requests, waits from another thread, back-pressure, close).
// Helpers outside #[test] fns are test code too (clippy's allow-unwrap-in-tests misses them).
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bulwark::agent::journal::{
    CheckpointKind, Journal, JournalConfig, JournalError, PromotePolicy, Record,
};

const DISK: u64 = 256 << 10;

fn config() -> JournalConfig {
    let mut cfg = JournalConfig::new(11, DISK);
    cfg.segment_size = 16 << 10;
    cfg.index_chunk_shift = 14;
    cfg.index_mark_min = 4;
    cfg
}

/// Appends `n` writes and then a checkpoint; returns the model after it.
struct Writer {
    seq: u64,
    ckpt: u64,
    disk: Vec<u8>,
}

impl Writer {
    fn new() -> Writer {
        Writer {
            seq: 0,
            ckpt: 0,
            disk: vec![0; DISK as usize],
        }
    }

    fn round(&mut self, j: &mut Journal, n: u64) -> (u64, Vec<u8>) {
        for _ in 0..n {
            self.seq += 1;
            let off = (self.seq * 104_729) % (DISK - 8192);
            let len = 512 + (self.seq * 31) % 7000;
            let data: Vec<u8> = (0..len)
                .map(|k| (k as u8).wrapping_add(self.seq as u8))
                .collect();
            j.append(Record::write(self.seq, 0, off, &data)).unwrap();
            self.disk[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        self.seq += 1;
        self.ckpt += 1;
        j.append(Record::checkpoint(
            self.seq,
            self.ckpt as i64 * 1000,
            self.ckpt,
            CheckpointKind::Scheduled,
            None,
        ))
        .unwrap();
        j.sync().unwrap();
        (self.ckpt, self.disk.clone())
    }
}

fn open(root: &Path) -> Journal {
    Journal::open(root.join("j"), root.join("replica"), config()).unwrap()
}

fn read_all(v: &bulwark::agent::journal::View) -> Vec<u8> {
    let mut b = vec![0u8; DISK as usize];
    v.read_at(&mut b, 0).unwrap();
    b
}

#[test]
fn pinned_views_read_correctly_during_promotion_and_appends() {
    let root = tempfile::tempdir().unwrap();
    let mut j = open(root.path());
    let mut w = Writer::new();
    let mut models = Vec::new();
    for _ in 0..12 {
        models.push(w.round(&mut j, 20));
    }
    // A view at checkpoint 6 while promotion moves the replica up to exactly it and
    // deletes the segments under it, and appends go on; another at 9.
    let (c6, m6) = models[5].clone();
    let (c9, m9) = models[8].clone();
    let v6 = Arc::new(j.open_view(c6).unwrap());
    let v9 = Arc::new(j.open_view(c9).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = [(v6.clone(), m6.clone()), (v9.clone(), m9.clone())]
        .into_iter()
        .map(|(v, m)| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0;
                let mut b = vec![0u8; 9000];
                while !stop.load(Ordering::SeqCst) || n < 3 {
                    assert!(read_all(&v) == m, "view changed under promotion");
                    let off = (n * 7777) % (DISK - 9000);
                    v.read_at(&mut b, off).unwrap();
                    assert!(b[..] == m[off as usize..off as usize + 9000]);
                    n += 1;
                }
                n
            })
        })
        .collect();
    let segs_before = j.stats().segments;
    let rep = j
        .promote(&PromotePolicy {
            now_ms: 100_000,
            history_ms: 0,
            warn_bytes: None,
            hard_limit_bytes: None,
        })
        .unwrap();
    // Asked for everything, held at the oldest open view.
    assert!(rep.blocked_by_view);
    assert_eq!(rep.promoted_to.as_ref().unwrap().id, c6);
    assert!(rep.segments_deleted > 0 && j.stats().segments < segs_before);
    assert!(rep.lag_ms > 0 && rep.lag_bytes > 0);
    let st = j.stats();
    assert_eq!(st.promote_lag_ms, rep.lag_ms);
    assert_eq!(st.oldest_checkpoint.as_ref().unwrap().id, c6);
    assert_eq!(st.open_views, 2);
    for _ in 0..5 {
        models.push(w.round(&mut j, 20));
    }
    stop.store(true, Ordering::SeqCst);
    for r in readers {
        assert!(r.join().unwrap() >= 3);
    }
    // The replica is now exactly checkpoint 6.
    assert!(std::fs::read(root.path().join("replica")).unwrap() == m6);
    // A view cannot open below the promoted point.
    assert!(matches!(
        j.open_view(c6 - 1),
        Err(JournalError::CheckpointNotRetained(_))
    ));
    drop(v6);
    let rep = j
        .promote(&PromotePolicy {
            now_ms: 100_000,
            history_ms: 0,
            warn_bytes: None,
            hard_limit_bytes: None,
        })
        .unwrap();
    assert_eq!(rep.promoted_to.unwrap().id, c9);
    assert!(read_all(&v9) == m9);
    drop(v9);
    // Everything retained still reads right, and again after a reopen.
    for (c, m) in models.iter().filter(|(c, _)| *c >= c9) {
        assert!(read_all(&j.open_view(*c).unwrap()) == *m);
    }
    drop(j);
    let j = open(root.path());
    for (c, m) in models.iter().filter(|(c, _)| *c >= c9) {
        assert!(read_all(&j.open_view(*c).unwrap()) == *m);
    }
}

#[test]
fn hard_limit_shortens_history_and_is_reported() {
    let root = tempfile::tempdir().unwrap();
    let mut j = open(root.path());
    let mut w = Writer::new();
    for _ in 0..16 {
        w.round(&mut j, 10);
    }
    let used = j.stats().bytes_used;
    let pin = j.open_view(1).unwrap();
    let policy = PromotePolicy {
        now_ms: 16_000,
        history_ms: 1 << 40,
        warn_bytes: Some(used / 4),
        hard_limit_bytes: Some(used / 3),
    };
    // The view at the oldest checkpoint holds promotion: the limit cannot be met.
    let rep = j.promote(&policy).unwrap();
    assert!(rep.blocked_by_view && rep.over_hard_limit && rep.size_warning);
    assert!(rep.promoted_to.is_none() || rep.promoted_to.as_ref().unwrap().id == 1);
    assert!(j.stats().over_hard_limit);
    drop(pin);
    let rep = j.promote(&policy).unwrap();
    assert!(rep.history_short, "{rep:?}");
    assert!(!rep.over_hard_limit, "{rep:?}");
    assert!(j.stats().bytes_used <= used / 3);
    let st = j.stats();
    assert!(st.history_short);
    assert!(st.history_span_ms < 15_000);
    assert_eq!(st.newest_checkpoint.unwrap().id, 16);
}

#[test]
fn corruption_of_durable_data_is_an_error_not_a_cut() {
    // "first": a sealed segment. "last": the active segment, whose later sync groups
    // carry a durable hint past the damage. (Damage inside the very last sync group
    // cannot be told from a torn write and is cut; the model test covers that case.)
    for target in ["first", "last"] {
        let root = tempfile::tempdir().unwrap();
        let mut cfg = config();
        if target == "last" {
            cfg.segment_size = 4 << 20;
        }
        let mut j = Journal::open(
            root.path().join("j"),
            root.path().join("replica"),
            cfg.clone(),
        )
        .unwrap();
        let mut w = Writer::new();
        for _ in 0..8 {
            w.round(&mut j, 10);
        }
        drop(j);
        let mut segs: Vec<_> = std::fs::read_dir(root.path().join("j"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segs.sort();
        assert!(segs.len() > 2 || target == "last");
        let seg = if target == "first" {
            &segs[0]
        } else {
            &segs[segs.len() - 1]
        };
        // A byte in the payload of the second record: synced, with records after it.
        let mut b = std::fs::read(seg).unwrap();
        let len = b.len();
        assert!(len > 4000);
        b[32 + 64 + 700] ^= 0x01;
        std::fs::write(seg, &b).unwrap();
        let err =
            Journal::open(root.path().join("j"), root.path().join("replica"), cfg).unwrap_err();
        assert!(
            matches!(err, JournalError::Corrupt { .. }),
            "{target}: {err}"
        );
        // Nothing was cut.
        assert_eq!(std::fs::metadata(seg).unwrap().len(), len as u64);
    }
}

#[test]
fn compressed_records_read_promote_and_reopen() {
    let root = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.compress_level = Some(1);
    let mut j = Journal::open(
        root.path().join("j"),
        root.path().join("replica"),
        cfg.clone(),
    )
    .unwrap();
    let mut disk = vec![0u8; DISK as usize];
    let mut models = Vec::new();
    for i in 0..30u64 {
        let data: Vec<u8> = (0..6000)
            .map(|k| ((k / 100) as u8).wrapping_add(i as u8))
            .collect();
        let off = (i * 5003) % (DISK - 6000);
        j.append(Record::write(2 * i + 1, 0, off, &data)).unwrap();
        disk[off as usize..off as usize + 6000].copy_from_slice(&data);
        j.append(Record::checkpoint(
            2 * i + 2,
            i as i64,
            i,
            CheckpointKind::AppConsistent,
            None,
        ))
        .unwrap();
        models.push(disk.clone());
    }
    j.sync().unwrap();
    assert!(
        j.stats().bytes_used < 30 * 6000 / 2,
        "data was not compressed"
    );
    for i in [0u64, 14, 29] {
        assert!(read_all(&j.open_view(i).unwrap()) == models[i as usize]);
    }
    j.promote(&PromotePolicy {
        now_ms: 20,
        history_ms: 0,
        warn_bytes: None,
        hard_limit_bytes: None,
    })
    .unwrap();
    assert!(std::fs::read(root.path().join("replica")).unwrap() == models[20]);
    drop(j);
    let j = Journal::open(root.path().join("j"), root.path().join("replica"), cfg).unwrap();
    for i in 20..30u64 {
        assert!(read_all(&j.open_view(i).unwrap()) == models[i as usize]);
    }
}

#[test]
fn api_errors_and_dedup() {
    let root = tempfile::tempdir().unwrap();
    let mut j = open(root.path());
    j.append(Record::write(5, 0, 0, &[1, 2, 3])).unwrap();
    j.append(Record::checkpoint(
        6,
        10,
        77,
        CheckpointKind::UserTagged,
        Some("pre-upgrade"),
    ))
    .unwrap();
    // Not durable yet.
    assert!(matches!(
        j.open_view(77),
        Err(JournalError::CheckpointNotDurable(77))
    ));
    assert!(j.checkpoints().is_empty());
    assert_eq!(j.sync().unwrap(), 6);
    let c = &j.checkpoints()[0];
    assert_eq!(
        (c.id, c.seq, c.tag.as_deref()),
        (77, 6, Some("pre-upgrade"))
    );
    assert!(matches!(
        j.open_view(78),
        Err(JournalError::UnknownCheckpoint(78))
    ));
    // Resends are ignored, whatever they carry.
    assert_eq!(
        j.append(Record::write(5, 0, 0, &[9, 9, 9])).unwrap(),
        bulwark::agent::journal::Appended::Duplicate
    );
    // Invalid records are refused without closing the journal.
    assert!(matches!(
        j.append(Record::write(7, 0, DISK - 1, &[1, 2])),
        Err(JournalError::InvalidRecord { .. })
    ));
    assert!(matches!(
        j.append(Record::checkpoint(
            8,
            0,
            77,
            CheckpointKind::Scheduled,
            None
        )),
        Err(JournalError::InvalidRecord { .. })
    ));
    assert!(matches!(
        j.append(Record::zero(9, 0, 0, 0)),
        Err(JournalError::InvalidRecord { .. })
    ));
    let v = j.open_view(77).unwrap();
    let mut b = [0u8; 4];
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1, 2, 3, 0]);
    assert!(matches!(
        v.read_at(&mut b, DISK - 2),
        Err(JournalError::OutOfRange { .. })
    ));
    v.write_at(&[7], 1).unwrap();
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1, 7, 3, 0]);
    // A rollback drops the scratch layer; the journal is untouched.
    j.rollback(v).unwrap();
    let v = j.open_view(77).unwrap();
    v.read_at(&mut b, 0).unwrap();
    assert_eq!(b, [1, 2, 3, 0]);
    assert_eq!(
        std::fs::read_dir(root.path().join("j/scratch"))
            .unwrap()
            .count(),
        0
    );
    drop(v);
    // A journal directory of another disk is refused.
    drop(j);
    let mut other = config();
    other.disk_id = 12;
    j = open(root.path());
    j.promote(&PromotePolicy {
        now_ms: 10,
        history_ms: 0,
        warn_bytes: None,
        hard_limit_bytes: None,
    })
    .unwrap();
    drop(j);
    assert!(matches!(
        Journal::open(root.path().join("j"), root.path().join("replica"), other),
        Err(JournalError::Config(_))
    ));
}

#[test]
fn pipelined_sync_api() {
    use bulwark::agent::journal::FaultPoint;
    use std::time::Duration;
    let root = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.segment_size = 1 << 20;
    // Back-pressure after 64 KiB not yet durable; a sync asked for by itself at 32 KiB.
    cfg.max_unsynced = 64 << 10;
    cfg.write_buffer = 8 << 10;
    let waits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let w = waits.clone();
    cfg.fault = Some(Arc::new(move |p| {
        match p {
            FaultPoint::SyncWait => {
                w.fetch_add(1, Ordering::SeqCst);
            }
            // A slow disk, so that appends surely run ahead of it.
            FaultPoint::SegmentSync { .. } => std::thread::sleep(Duration::from_millis(2)),
            _ => {}
        }
        Ok(())
    }));
    let mut j = Journal::open(root.path().join("j"), root.path().join("replica"), cfg).unwrap();
    let dur = j.durability();
    assert_eq!(dur.durable_seq(), 0);
    // Another thread acknowledges what becomes durable, as the replication receiver's
    // acknowledger would, while this one appends and only asks for syncs.
    let acker = {
        let dur = dur.clone();
        std::thread::spawn(move || {
            let mut acked = Vec::new();
            let mut d = 0;
            while d < 200 {
                let got = dur.wait_durable(d + 1, Duration::from_secs(10)).unwrap();
                assert!(got > d, "timed out at {d}");
                acked.push(got);
                d = got;
            }
            acked
        })
    };
    let data = vec![0x5au8; 4096];
    for seq in 1..=200u64 {
        j.append(Record::write(seq, 0, (seq % 60) * 4096, &data))
            .unwrap();
        assert!(j.durable_seq() <= seq);
        if seq % 10 == 0 {
            let t = j.request_sync().unwrap();
            assert_eq!(t, seq);
            assert!(dur.requested_seq() >= t);
        }
    }
    let acked = acker.join().unwrap();
    assert_eq!(acked.last(), Some(&200));
    assert!(acked.windows(2).all(|w| w[0] < w[1]));
    // 200 records of 4 KiB past a 64 KiB bound: appends had to wait now and then.
    assert!(waits.load(Ordering::SeqCst) > 0);
    // A wait for a seq nobody asked a sync for times out and says where things are.
    j.append(Record::write(201, 0, 0, &data)).unwrap();
    assert_eq!(j.wait_durable(201, Duration::from_millis(20)).unwrap(), 200);
    assert_eq!(j.stats().durable_seq, 200);
    let t = j.request_sync().unwrap();
    assert_eq!(j.wait_durable(t, Duration::from_secs(10)).unwrap(), 201);
    // Nothing new: a sync returns at once with the durable seq.
    assert_eq!(j.sync().unwrap(), 201);
    j.append(Record::write(202, 0, 0, &data)).unwrap();
    assert_eq!(j.close().unwrap(), 202);
    // The handle outlives the journal: it still knows the last durable seq, and a wait
    // for more fails instead of hanging.
    assert_eq!(dur.durable_seq(), 202);
    assert!(matches!(
        dur.wait_durable(203, Duration::from_secs(10)),
        Err(JournalError::Closed(_))
    ));
    let j = open(root.path());
    assert_eq!(j.last_seq(), 202);
}

#[test]
fn sync_failure_closes_the_journal_and_moves_nothing() {
    use bulwark::agent::journal::FaultPoint;
    use std::time::Duration;
    let root = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let f = fail.clone();
    let mut cfg = config();
    cfg.fault = Some(Arc::new(move |p| {
        if matches!(p, FaultPoint::SegmentSync { .. }) && f.load(Ordering::SeqCst) {
            return Err(JournalError::Injected(p));
        }
        Ok(())
    }));
    let mut j = Journal::open(root.path().join("j"), root.path().join("replica"), cfg).unwrap();
    j.append(Record::write(1, 0, 0, &[1; 100])).unwrap();
    assert_eq!(j.sync().unwrap(), 1);
    fail.store(true, Ordering::SeqCst);
    j.append(Record::write(2, 0, 0, &[2; 100])).unwrap();
    let t = j.request_sync().unwrap();
    let dur = j.durability();
    let e = dur.wait_durable(t, Duration::from_secs(10)).unwrap_err();
    assert!(matches!(e, JournalError::Closed(_)), "{e}");
    assert_eq!(j.durable_seq(), 1);
    for e in [
        j.append(Record::write(3, 0, 0, &[3; 100])).unwrap_err(),
        j.sync().unwrap_err(),
        j.request_sync().unwrap_err(),
    ] {
        assert!(matches!(e, JournalError::Closed(_)), "{e}");
    }
    assert!(j.close().is_err());
    // The blocking path reports it too.
    fail.store(false, Ordering::SeqCst);
    let f2 = Arc::new(AtomicBool::new(true));
    let f3 = f2.clone();
    let mut cfg = config();
    cfg.fault = Some(Arc::new(move |p| {
        if matches!(p, FaultPoint::SegmentSynced { .. }) && f3.load(Ordering::SeqCst) {
            return Err(JournalError::Injected(p));
        }
        Ok(())
    }));
    let mut j = Journal::open(root.path().join("j"), root.path().join("replica"), cfg).unwrap();
    assert_eq!(j.durable_seq(), 2, "what was written survives a reopen");
    j.append(Record::write(3, 0, 0, &[3; 100])).unwrap();
    assert!(matches!(j.sync(), Err(JournalError::Closed(_))));
    assert_eq!(j.durable_seq(), 2);
}

#[test]
fn sequentially_written_records_read_back_exactly() {
    // A guest writing sequentially: records one after the other in the log and on the
    // disk, so a view read covers runs of pieces a header apart in a segment (read with
    // one preadv), cut by segment and index-chunk edges, zeros, overwrites and the
    // replica.
    let root = tempfile::tempdir().unwrap();
    let mut cfg = config();
    cfg.segment_size = 64 << 10;
    let mut j = Journal::open(root.path().join("j"), root.path().join("replica"), cfg).unwrap();
    let mut model = vec![0u8; DISK as usize];
    let mut seq = 0u64;
    let mut off = 3000u64;
    // Lengths not multiples of 8: the padding varies the gap between pieces.
    for i in 0..120u64 {
        seq += 1;
        let len = 700 + (i * 389) % 3100;
        if i % 37 == 20 {
            j.append(Record::zero(seq, 0, off, len)).unwrap();
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data: Vec<u8> = (0..len)
                .map(|k| (k as u8).wrapping_mul(7) ^ i as u8)
                .collect();
            j.append(Record::write(seq, 0, off, &data)).unwrap();
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        off += len;
        if i % 50 == 49 {
            // An overwrite in the middle of the run.
            seq += 1;
            let o = off - 5000;
            j.append(Record::write(seq, 0, o, &[0xEE; 1500])).unwrap();
            model[o as usize..o as usize + 1500].fill(0xEE);
        }
    }
    assert!(off < DISK);
    seq += 1;
    j.append(Record::checkpoint(
        seq,
        1,
        1,
        CheckpointKind::Scheduled,
        None,
    ))
    .unwrap();
    j.sync().unwrap();
    assert!(j.stats().segments > 2);
    let v = j.open_view(1).unwrap();
    assert!(read_all(&v) == model);
    for (o, n) in [
        (0u64, 70_000usize),
        (2999, 5),
        (3001, 40_000),
        (100_000, 123_457),
    ] {
        let mut b = vec![0u8; n];
        v.read_at(&mut b, o).unwrap();
        assert!(
            b[..] == model[o as usize..o as usize + n],
            "read {n} at {o}"
        );
    }
    // From another thread too (its own work buffers).
    let m = model.clone();
    std::thread::scope(|s| {
        s.spawn(|| assert!(read_all(&v) == m));
    });
    drop(v);
    // After a promotion deleted the older segments, the same reads come from the
    // replica where the journal no longer has the records.
    seq += 1;
    j.append(Record::write(seq, 0, 0, &[1; 10])).unwrap();
    model[..10].fill(1);
    seq += 1;
    j.append(Record::checkpoint(
        seq,
        100_000,
        2,
        CheckpointKind::Scheduled,
        None,
    ))
    .unwrap();
    j.sync().unwrap();
    let v2 = j.open_view(2).unwrap();
    let rep = j
        .promote(&PromotePolicy {
            now_ms: 100_000,
            history_ms: 50_000,
            warn_bytes: None,
            hard_limit_bytes: None,
        })
        .unwrap();
    assert_eq!(rep.promoted_to.map(|c| c.id), Some(1));
    assert!(rep.segments_deleted > 0);
    assert!(read_all(&v2) == model);
}
