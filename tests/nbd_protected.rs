//! A protected disk behind the NBD server, driven by qemu-io: the sink sees every write in
//! order with the right bytes, the dirty bitmap covers every write, and after a crash
//! (drop without clean shutdown) the bitmap is unclean and bitmap ∪ activity log covers
//! everything written.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod nbd_common;

use std::sync::Arc;

use bulwark::agent::dirty::{
    ActivityLog, DirtyBitmap, DirtyConfig, DirtyPaths, DirtyTracker, RecoveryState,
};
use bulwark::agent::nbd::{
    CompletionGate, ExportRegistry, FileDevice, ProtectedDevice, RecordedEvent, RecordingSink,
};
use nbd_common::*;

const MIB: u64 = 1 << 20;

fn range_of(e: &RecordedEvent) -> (u64, u64) {
    match e {
        RecordedEvent::Write { offset, data, .. } => (*offset, data.len() as u64),
        RecordedEvent::Zeroes { offset, len } | RecordedEvent::Trim { offset, len } => {
            (*offset, *len)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_and_dirty_tracking_see_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let img = dir.path().join("p.img");
    let paths = DirtyPaths::in_dir(dir.path(), "p");
    // Small activity log (16 × 1 MiB) so the workload forces evictions and persists.
    let cfg = DirtyConfig {
        region_size: 65536,
        extent_size: MIB,
        al_capacity: 16,
    };
    let (tracker, rec) = DirtyTracker::open(paths.clone(), size, cfg).unwrap();
    assert_eq!(rec.state, RecoveryState::New);
    let tracker = Arc::new(tracker);
    let sink = RecordingSink::new();
    let dev = Arc::new(
        ProtectedDevice::new(
            FileDevice::create(&img, size).unwrap(),
            tracker.clone(),
            sink.clone(),
            CompletionGate::new(),
        )
        .unwrap(),
    );
    let registry = ExportRegistry::new();
    registry.add("p", dev.clone()).unwrap();
    let server = TestServer::start(registry).await;

    // Overlapping writes, in-flight bursts that overlap each other (order decided by the
    // server), zeroes, trims, FUA.
    let mut cmds = Vec::new();
    for i in 0..40u64 {
        let off = (i * 1_234_567) % (size - 300_000);
        cmds.push(format!(
            "write -P {} {off} {}",
            i + 1,
            4096 + (i % 5) * 50_000
        ));
    }
    for i in 0..48u64 {
        cmds.push(format!(
            "aio_write -P {} {} 65536",
            100 + i,
            (i % 12) * 40_000
        ));
    }
    cmds.push("aio_flush".into());
    cmds.push(format!("write -z {} 300000", 10 * MIB + 17));
    cmds.push(format!("discard {} 2000000", 20 * MIB + 5));
    cmds.push(format!("write -f -P 0xee {} 4096", size - 4096));
    // Half writethrough (FUA: blocking path), half writeback (plain writes: inline fast
    // path through `ProtectedDevice::write_nowait`).
    let half = cmds.len() / 2;
    let out = qemu_io(&server.url("p"), &["-d", "unmap"], &cmds[..half]).await;
    assert_qemu_ok(&out);
    let out = qemu_io(
        &server.url("p"),
        &["-d", "unmap", "-t", "writeback"],
        &cmds[half..],
    )
    .await;
    assert_qemu_ok(&out);
    server.shutdown().await;

    // Replaying the sink's events in order onto zeroes reproduces the protected disk.
    let events = sink.take();
    assert_eq!(events.len(), 40 + 48 + 3);
    let mut replica = vec![0u8; size as usize];
    for e in &events {
        e.apply(&mut replica);
    }
    let disk = std::fs::read(&img).unwrap();
    assert!(
        disk == replica,
        "replaying the sink does not reproduce the disk"
    );
    // Every event's range is dirty.
    for e in &events {
        let (o, l) = range_of(e);
        let bm = tracker.bitmap();
        let first = o / bm.region_size();
        let last = (o + l - 1) / bm.region_size();
        assert!(
            (first..=last).all(|r| bm.is_dirty(r)),
            "event at {o}+{l} not dirty"
        );
    }
    assert!(
        tracker.persist_count() > 0,
        "a 16-extent log must have forced persists"
    );
    assert!(tracker.activity_log().active_extents().len() <= 16);

    // Clean shutdown: the file is exact and says so.
    dev.shutdown_clean().unwrap();
    let (loaded, clean) = DirtyBitmap::load(&paths.bitmap).unwrap();
    assert!(clean);
    assert_eq!(
        loaded.dirty_regions().collect::<Vec<_>>(),
        tracker.bitmap().dirty_regions().collect::<Vec<_>>()
    );
    drop((tracker, dev));
    let (t2, rec) = DirtyTracker::open(paths, size, cfg).unwrap();
    assert_eq!(rec.state, RecoveryState::Clean);
    assert_eq!(t2.bitmap().dirty_count(), loaded.dirty_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_leaves_unclean_bitmap_and_bounded_activity_log() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256 * MIB;
    let img = dir.path().join("c.img");
    let paths = DirtyPaths::in_dir(dir.path(), "c");
    let cfg = DirtyConfig {
        region_size: 65536,
        extent_size: 4 * MIB,
        al_capacity: 8,
    };
    let (tracker, _) = DirtyTracker::open(paths.clone(), size, cfg).unwrap();
    let tracker = Arc::new(tracker);
    let sink = RecordingSink::new();
    let dev = ProtectedDevice::new(
        FileDevice::create(&img, size).unwrap(),
        tracker.clone(),
        sink.clone(),
        CompletionGate::new(),
    )
    .unwrap();
    let registry = ExportRegistry::new();
    registry.add("c", Arc::new(dev)).unwrap();
    let server = TestServer::start(registry).await;

    // Writes spread over 40 extents, a periodic persist in the middle.
    let mut written = Vec::new();
    let mut cmds = Vec::new();
    for i in 0..40u64 {
        let off = i * 6 * MIB + (i * 7919) % MIB;
        cmds.push(format!("write -P {} {off} 8192", i + 1));
        written.push((off, 8192u64));
    }
    let out = qemu_io(&server.url("c"), &[], &cmds[..20]).await;
    assert_qemu_ok(&out);
    tokio::task::spawn_blocking({
        let t = tracker.clone();
        move || t.persist().unwrap()
    })
    .await
    .unwrap();
    let out = qemu_io(&server.url("c"), &["-t", "writeback"], &cmds[20..]).await;
    assert_qemu_ok(&out);
    server.shutdown().await;

    // "Crash": no close_clean. Drop everything, then look at what is on disk.
    drop(tracker);
    let (bm, clean) = DirtyBitmap::load(&paths.bitmap).unwrap();
    assert!(!clean, "bitmap must say unclean after a crash");
    let al = ActivityLog::recover(&paths.activity_log).unwrap();
    assert!(
        al.extents.len() <= 8,
        "activity log holds at most its capacity: {:?}",
        al.extents
    );
    assert!(!al.extents.is_empty());
    for &(off, len) in &written {
        let in_bitmap = bm.is_range_dirty(off, len)
            && (off / 65536..=(off + len - 1) / 65536).all(|r| bm.is_dirty(r));
        let in_al =
            (off / (4 * MIB)..=(off + len - 1) / (4 * MIB)).all(|e| al.extents.contains(&e));
        assert!(
            in_bitmap || in_al,
            "write at {off} covered by neither the bitmap file nor the activity log"
        );
    }
    // The last writes are recent: they are in the activity log.
    let (last_off, _) = written[written.len() - 1];
    assert!(al.extents.contains(&(last_off / (4 * MIB))));

    // Reopening reports Unclean and merges the log into the bitmap.
    let (t2, rec) = DirtyTracker::open(paths.clone(), size, cfg).unwrap();
    assert_eq!(rec.state, RecoveryState::Unclean);
    assert_eq!(rec.al_extents.len(), al.extents.len());
    for &(off, len) in &written {
        assert!((off / 65536..=(off + len - 1) / 65536).all(|r| t2.bitmap().is_dirty(r)));
    }
    // And that merge is itself durable before any new write.
    let (bm2, clean2) = DirtyBitmap::load(&paths.bitmap).unwrap();
    assert!(!clean2);
    assert_eq!(bm2.dirty_count(), t2.bitmap().dirty_count());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_writes_from_two_connections_replay_exactly() {
    use bulwark::agent::nbd::proto::{CMD_FLAG_FUA, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES};
    use bulwark::agent::nbd::NbdClient;
    let dir = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let img = dir.path().join("o.img");
    let cfg = DirtyConfig {
        region_size: 65536,
        extent_size: MIB,
        al_capacity: 4,
    };
    let (tracker, _) = DirtyTracker::open(DirtyPaths::in_dir(dir.path(), "o"), size, cfg).unwrap();
    let sink = RecordingSink::new();
    let dev = ProtectedDevice::new(
        FileDevice::create(&img, size).unwrap(),
        Arc::new(tracker),
        sink.clone(),
        CompletionGate::new(),
    )
    .unwrap();
    let registry = ExportRegistry::new();
    registry.add("o", Arc::new(dev)).unwrap();
    let server = TestServer::start(registry).await;

    // Two connections hammer the same 256 KiB (plus a far extent now and then) with
    // pipelined writes — plain (inline fast path), FUA (blocking path), zeroes and trims.
    let mut tasks = Vec::new();
    for k in 0..2u64 {
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = NbdClient::connect(addr, "o").await.unwrap();
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ k;
            let mut sent = 0;
            for i in 0..300u64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let len = 1 + x % 20_000;
                let base = if i % 37 == 0 { 3 * MIB } else { 0 };
                let off = base + (x >> 20) % (256 * 1024);
                let kind = x % 10;
                let data = vec![(x >> 40) as u8 | 1; len as usize];
                match kind {
                    0 => c.send(CMD_TRIM, 0, off, len as u32, &[]).await.unwrap(),
                    1 => c
                        .send(CMD_WRITE_ZEROES, 0, off, len as u32, &[])
                        .await
                        .unwrap(),
                    2 | 3 => c
                        .send(CMD_WRITE, CMD_FLAG_FUA, off, len as u32, &data)
                        .await
                        .unwrap(),
                    _ => c.send(CMD_WRITE, 0, off, len as u32, &data).await.unwrap(),
                };
                sent += 1;
            }
            for _ in 0..sent {
                let r = tokio::time::timeout(std::time::Duration::from_secs(30), c.recv())
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(r.error, 0);
            }
            c.disconnect().await.unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    server.shutdown().await;
    let events = sink.take();
    assert_eq!(events.len(), 600);
    let mut replica = vec![0u8; size as usize];
    for e in &events {
        e.apply(&mut replica);
    }
    assert!(
        std::fs::read(&img).unwrap() == replica,
        "sink order differs from local application order"
    );
}
