//! The replication stream end to end over loopback: sender → (proxy) → receiver →
//! journal, checked byte for byte against an in-memory model of each disk.
#![allow(clippy::unwrap_used)]

mod stream_util;

use std::time::{Duration, Instant};

use bulwark::agent::stream::{
    ClientTransport, DiskMode, Enqueued, Sender, ServerTransport, StreamEvent,
};
use bulwark::proto::stream::Compression;
use stream_util::*;
use tokio_util::sync::CancellationToken;

const DISKS: [u64; 2] = [7, 42];

/// Enqueues `n` records per disk (interleaved) in chunks, calling `between` after each
/// chunk; ends every disk with a checkpoint. Returns the slowest enqueue.
async fn load(
    sender: &Sender,
    w: &mut Workload,
    n: usize,
    chunks: usize,
    mut between: impl FnMut(usize),
) -> Duration {
    let mut worst = Duration::ZERO;
    for c in 0..chunks {
        let mut recs = Vec::new();
        for _ in 0..n / chunks {
            for d in DISKS {
                recs.push(w.next(d, 64 << 10));
            }
        }
        worst = worst.max(enqueue_all(sender, recs));
        between(c);
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let last: Vec<_> = DISKS.iter().map(|&d| w.checkpoint(d)).collect();
    worst.max(enqueue_all(sender, last))
}

async fn multiplexed(compression: Compression, n: usize) {
    init_tracing();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let st = storage(dir.path());
    let rx = RunningReceiver::start(
        "127.0.0.1:0".parse().unwrap(),
        certs.server(),
        &[(PRO, &st)],
    )
    .await;
    let mut cfg = sender_config(rx.addr, certs.client(PRO));
    cfg.compression = compression;
    let cancel = CancellationToken::new();
    let (sender, mut events) = Sender::start(cfg, specs(&DISKS), cancel.clone()).unwrap();
    let mut w = Workload::new(1, &DISKS);
    let worst = load(&sender, &mut w, n, 4, |_| {}).await;
    wait_drained(&sender, Duration::from_secs(60)).await;
    let lag = rx.handle.lag();
    assert_eq!(lag.len(), 2);
    for l in &lag {
        assert_eq!(l.durable_seq, w.next_seq[&l.disk_id] - 1);
    }
    cancel.cancel();
    rx.stop().await;
    for d in DISKS {
        verify_disk(&st, d, &w);
    }
    let ev = drain_events(&mut events);
    assert!(ev.contains(&StreamEvent::Connected), "{ev:?}");
    assert!(
        !ev.iter()
            .any(|e| matches!(e, StreamEvent::NeedsBitmapSync { .. })),
        "{ev:?}"
    );
    assert!(worst < Duration::from_millis(200), "enqueue took {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disks_multiplexed_over_tls() {
    multiplexed(Compression::None, 2000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_round_trip() {
    multiplexed(Compression::Zstd, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lz4_round_trip() {
    multiplexed(Compression::Lz4, 400).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cut_mid_load_loses_and_repeats_nothing() {
    init_tracing();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let st = storage(dir.path());
    let rx = RunningReceiver::start(
        "127.0.0.1:0".parse().unwrap(),
        certs.server(),
        &[(PRO, &st)],
    )
    .await;
    let proxy = Proxy::start(rx.addr).await;
    let cancel = CancellationToken::new();
    let (sender, mut events) = Sender::start(
        sender_config(proxy.addr, certs.client(PRO)),
        specs(&DISKS),
        cancel.clone(),
    )
    .unwrap();
    let mut w = Workload::new(2, &DISKS);
    let handle = rx.handle.clone();
    let mut seen = std::collections::HashMap::new();
    let mut check_monotonic = || {
        for l in handle.lag() {
            let prev = seen.insert(l.disk_id, l.durable_seq).unwrap_or(0);
            assert!(
                l.durable_seq >= prev,
                "durable seq went back on disk {}",
                l.disk_id
            );
        }
    };
    load(&sender, &mut w, 1500, 10, |c| {
        check_monotonic();
        if c % 3 == 1 {
            proxy.cut();
        }
    })
    .await;
    wait_drained(&sender, Duration::from_secs(60)).await;
    check_monotonic();
    assert!(proxy.connections.load(std::sync::atomic::Ordering::SeqCst) >= 3);
    cancel.cancel();
    rx.stop().await;
    proxy.stop();
    for d in DISKS {
        verify_disk(&st, d, &w);
    }
    let ev = drain_events(&mut events);
    assert!(
        ev.iter()
            .any(|e| matches!(e, StreamEvent::Disconnected { .. })),
        "{ev:?}"
    );
    assert!(!ev
        .iter()
        .any(|e| matches!(e, StreamEvent::NeedsBitmapSync { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receiver_restart_mid_load() {
    init_tracing();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let st = storage(dir.path());
    let rx = RunningReceiver::start(
        "127.0.0.1:0".parse().unwrap(),
        certs.server(),
        &[(PRO, &st)],
    )
    .await;
    let addr = rx.addr;
    let cancel = CancellationToken::new();
    let (sender, _events) = Sender::start(
        sender_config(addr, certs.client(PRO)),
        specs(&DISKS),
        cancel.clone(),
    )
    .unwrap();
    let mut w = Workload::new(3, &DISKS);
    let mut recs = Vec::new();
    for _ in 0..600 {
        for d in DISKS {
            recs.push(w.next(d, 64 << 10));
        }
    }
    enqueue_all(&sender, recs);
    // Stop it mid-load: part of the queue is acknowledged, part not.
    tokio::time::sleep(Duration::from_millis(150)).await;
    rx.stop().await;
    let acked_before: Vec<u64> = sender.stats().iter().map(|s| s.acked_seq).collect();
    let mut recs = Vec::new();
    for _ in 0..600 {
        for d in DISKS {
            recs.push(w.next(d, 64 << 10));
        }
    }
    recs.extend(DISKS.iter().map(|&d| w.checkpoint(d)));
    enqueue_all(&sender, recs);
    let rx = RunningReceiver::start(addr, certs.server(), &[(PRO, &st)]).await;
    wait_drained(&sender, Duration::from_secs(60)).await;
    let acked_after: Vec<u64> = sender.stats().iter().map(|s| s.acked_seq).collect();
    for (a, b) in acked_before.iter().zip(&acked_after) {
        assert!(b >= a);
    }
    cancel.cancel();
    rx.stop().await;
    for d in DISKS {
        verify_disk(&st, d, &w);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_frame_is_detected_and_resent() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let st = storage(dir.path());
    // Plain TCP: under TLS a flipped byte fails the TLS record MAC before our CRC.
    let rx = RunningReceiver::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerTransport::Insecure,
        &[(PRO, &st)],
    )
    .await;
    let proxy = Proxy::start(rx.addr).await;
    proxy.flip_at(300_000);
    let cancel = CancellationToken::new();
    let (sender, mut events) = Sender::start(
        sender_config(proxy.addr, ClientTransport::Insecure),
        specs(&DISKS),
        cancel.clone(),
    )
    .unwrap();
    let mut w = Workload::new(4, &DISKS);
    load(&sender, &mut w, 600, 3, |_| {}).await;
    wait_drained(&sender, Duration::from_secs(60)).await;
    cancel.cancel();
    rx.stop().await;
    proxy.stop();
    for d in DISKS {
        verify_disk(&st, d, &w);
    }
    let ev = drain_events(&mut events);
    assert!(
        ev.iter()
            .any(|e| matches!(e, StreamEvent::Disconnected { .. })),
        "the corruption should have cost a reconnect: {ev:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_memory_spills_and_stays_exact() {
    init_tracing();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let st = storage(dir.path());
    let rx = RunningReceiver::start(
        "127.0.0.1:0".parse().unwrap(),
        certs.server(),
        &[(PRO, &st)],
    )
    .await;
    let cancel = CancellationToken::new();
    let mut cfg = sender_config(rx.addr, certs.client(PRO));
    cfg.queue_memory = 256 << 10;
    cfg.spill_dir = Some(dir.path().join("spill"));
    cfg.spill_limit = 256 << 20;
    let (sender, mut events) = Sender::start(cfg, specs(&DISKS), cancel.clone()).unwrap();
    let mut w = Workload::new(5, &DISKS);
    let mut spilled = 0;
    for _ in 0..1500 {
        for d in DISKS {
            if sender.enqueue(w.next(d, 64 << 10)).unwrap() == Enqueued::Spilled {
                spilled += 1;
            }
        }
    }
    for d in DISKS {
        sender.enqueue(w.checkpoint(d)).unwrap();
    }
    assert!(spilled > 100, "spilled only {spilled}");
    wait_drained(&sender, Duration::from_secs(60)).await;
    assert!(sender.stats().iter().all(|s| s.spilled_bytes == 0));
    cancel.cancel();
    rx.stop().await;
    for d in DISKS {
        verify_disk(&st, d, &w);
    }
    let ev = drain_events(&mut events);
    assert!(!ev
        .iter()
        .any(|e| matches!(e, StreamEvent::NeedsBitmapSync { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_queue_goes_bitmap_only_without_blocking() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    // Nobody listens there: the peer is away.
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cancel = CancellationToken::new();
    let mut cfg = sender_config(nobody, ClientTransport::Insecure);
    cfg.queue_memory = 128 << 10;
    cfg.spill_dir = Some(dir.path().join("spill"));
    cfg.spill_limit = 256 << 10;
    let (sender, mut events) = Sender::start(cfg, specs(&DISKS), cancel.clone()).unwrap();
    let mut w = Workload::new(6, &DISKS);
    let mut worst = Duration::ZERO;
    let mut outcome = std::collections::HashMap::new();
    for _ in 0..200 {
        let rec = w.next(7, 64 << 10);
        let t = Instant::now();
        let r = sender.enqueue(rec).unwrap();
        worst = worst.max(t.elapsed());
        *outcome.entry(format!("{r:?}")).or_insert(0) += 1;
    }
    assert!(worst < Duration::from_millis(100), "enqueue took {worst:?}");
    assert!(
        outcome.contains_key("Memory")
            && outcome.contains_key("Spilled")
            && outcome.contains_key("BitmapOnly"),
        "{outcome:?}"
    );
    let st = sender.stats();
    let d7 = st.iter().find(|s| s.disk_id == 7).unwrap();
    assert_eq!(d7.mode, DiskMode::BitmapOnly);
    assert_eq!(d7.queued_records, 0);
    let d42 = st.iter().find(|s| s.disk_id == 42).unwrap();
    assert_eq!(d42.mode, DiskMode::Streaming);
    let ev = drain_events(&mut events);
    assert!(
        ev.contains(&StreamEvent::NeedsBitmapSync {
            disk: 7,
            acked_seq: 0,
            reason: "outbound queue and spill log full".into()
        }),
        "{ev:?}"
    );
    // Further records of the disk are dropped until the sync is done.
    assert_eq!(
        sender.enqueue(w.next(7, 4096)).unwrap(),
        Enqueued::BitmapOnly
    );
    sender.sync_finished(7).unwrap();
    assert_eq!(sender.enqueue(w.next(7, 4096)).unwrap(), Enqueued::Memory);
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_away_past_bound_goes_bitmap_only() {
    init_tracing();
    let nobody = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cancel = CancellationToken::new();
    let mut cfg = sender_config(nobody, ClientTransport::Insecure);
    cfg.away_bound = Duration::from_millis(400);
    let (sender, mut events) = Sender::start(cfg, specs(&DISKS), cancel.clone()).unwrap();
    let mut w = Workload::new(7, &DISKS);
    assert_eq!(sender.enqueue(w.next(42, 4096)).unwrap(), Enqueued::Memory);
    // No further write: the connection task itself must notice the bound.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ev = drain_events(&mut events);
        if ev
            .iter()
            .any(|e| matches!(e, StreamEvent::NeedsBitmapSync { disk: 42, .. }))
        {
            break;
        }
        assert!(Instant::now() < deadline, "no NeedsBitmapSync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = sender.stats();
    assert_eq!(
        st.iter().find(|s| s.disk_id == 42).unwrap().mode,
        DiskMode::BitmapOnly
    );
    // Disk 7 had nothing queued: nothing to resync, it stays streaming until it writes.
    assert_eq!(
        st.iter().find(|s| s.disk_id == 7).unwrap().mode,
        DiskMode::Streaming
    );
    assert_eq!(
        sender.enqueue(w.next(7, 4096)).unwrap(),
        Enqueued::BitmapOnly
    );
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limit_holds_and_lag_reaches_the_receiver() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let st = storage(dir.path());
    let rx = RunningReceiver::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerTransport::Insecure,
        &[(PRO, &st)],
    )
    .await;
    let cancel = CancellationToken::new();
    let mut cfg = sender_config(rx.addr, ClientTransport::Insecure);
    cfg.bandwidth_limit = Some(1_000_000);
    let (sender, _events) = Sender::start(cfg, specs(&DISKS), cancel.clone()).unwrap();
    let mut w = Workload::new(8, &DISKS);
    let start = Instant::now();
    let mut bytes = 0usize;
    while bytes < 2_500_000 {
        let r = w.next(7, 64 << 10);
        bytes += r.cost();
        sender.enqueue(r).unwrap();
    }
    sender.enqueue(w.checkpoint(7)).unwrap();
    sender.enqueue(w.checkpoint(42)).unwrap();
    // While it trickles, the receiver learns the sender's backlog from the pings.
    let mut saw_backlog = false;
    while !sender.is_drained() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "too slow: {:?}",
            sender.stats()
        );
        saw_backlog |= rx.handle.lag().iter().any(|l| {
            l.disk_id == 7 && l.sender.queued_records > 0 && l.sender.oldest_unacked_ms > 0
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = start.elapsed();
    // 2.5 MB at 1 MB/s with a 100 KB burst: at least ~2.3 s.
    assert!(
        took >= Duration::from_millis(2200),
        "limit not applied: {took:?}"
    );
    assert!(saw_backlog, "no lag figures reached the receiver");
    cancel.cancel();
    rx.stop().await;
    for d in DISKS {
        verify_disk(&st, d, &w);
    }
}

/// Enqueues `bytes` of 64 KiB writes on disk 7 and waits until all are acked; returns
/// the time it took (bounded by `within`).
async fn drain_time(sender: &Sender, w: &mut Workload, bytes: usize, within: Duration) -> Duration {
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < bytes {
        let r = w.next(7, 64 << 10);
        sent += r.cost();
        sender.enqueue(r).unwrap();
    }
    while !sender.is_drained() {
        assert!(
            start.elapsed() < within,
            "not drained within {within:?}: {:?}",
            sender.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_limit_changes_at_run_time_without_reconnecting() {
    init_tracing();
    const KIB: u64 = 1024;
    let dir = tempfile::tempdir().unwrap();
    let st = storage(dir.path());
    let rx = RunningReceiver::start(
        "127.0.0.1:0".parse().unwrap(),
        ServerTransport::Insecure,
        &[(PRO, &st)],
    )
    .await;
    let cancel = CancellationToken::new();
    let cfg = sender_config(rx.addr, ClientTransport::Insecure);
    // Starts unlimited; the limit comes later, on the running stream.
    let (sender, mut events) = Sender::start(cfg, specs(&DISKS), cancel.clone()).unwrap();
    let mut w = Workload::new(9, &DISKS);
    drain_time(&sender, &mut w, 256 << 10, Duration::from_secs(10)).await;
    assert_eq!(sender.bandwidth_limit(), None);

    // 256 KiB/s: 768 KiB take about 2.75 s (the first 64 KiB are the burst).
    assert!(sender.set_bandwidth_limit(Some(256 * KIB)));
    assert!(
        !sender.set_bandwidth_limit(Some(256 * KIB)),
        "same value: no change"
    );
    let bytes = 768usize << 10;
    let took = drain_time(&sender, &mut w, bytes, Duration::from_secs(8)).await;
    let rate = bytes as f64 / took.as_secs_f64();
    let limit = (256 * KIB) as f64;
    assert!(
        rate >= 0.5 * limit && rate <= 1.6 * limit,
        "rate {rate:.0} B/s at a limit of {limit} B/s ({took:?})"
    );

    // Lifted: the same amount goes clearly faster.
    assert!(sender.set_bandwidth_limit(None));
    let fast = drain_time(&sender, &mut w, bytes, Duration::from_secs(5)).await;
    assert!(
        fast * 3 < took,
        "lifting the limit did not speed the stream up: {fast:?} vs {took:?}"
    );

    // A change reaches a wait in progress: 2 MiB at 64 KiB/s would take 30 s; lifting
    // the limit half a second in lets it finish at once.
    assert!(sender.set_bandwidth_limit(Some(64 * KIB)));
    let start = Instant::now();
    let lifter = {
        let s = sender.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            s.set_bandwidth_limit(None)
        })
    };
    drain_time(&sender, &mut w, 2 << 20, Duration::from_secs(5)).await;
    assert!(lifter.await.unwrap());
    assert!(
        start.elapsed() >= Duration::from_millis(450),
        "the limit held at first"
    );

    sender.enqueue(w.checkpoint(7)).unwrap();
    sender.enqueue(w.checkpoint(42)).unwrap();
    drain_time(&sender, &mut w, 0, Duration::from_secs(5)).await;

    // One connection throughout: the changes neither reconnected nor dropped a write.
    let ev = drain_events(&mut events);
    let connects = ev
        .iter()
        .filter(|e| matches!(e, StreamEvent::Connected))
        .count();
    assert_eq!(connects, 1, "{ev:?}");
    assert!(
        !ev.iter()
            .any(|e| matches!(e, StreamEvent::Disconnected { .. })),
        "{ev:?}"
    );
    cancel.cancel();
    rx.stop().await;
    for d in DISKS {
        verify_disk(&st, d, &w);
    }
}

/// A receiver that answers the Hello with a Welcome for every disk, then falls silent:
/// it neither reads nor writes again, and keeps the socket open (what a cable cut
/// without resets looks like from the sender, once the socket buffers are full).
async fn silent_after_welcome() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    use bulwark::agent::stream::{FrameReader, FrameWriter};
    use bulwark::proto::stream::{DiskAck, Frame};
    // A small receive buffer (inherited by the accepted socket): the sender's writes
    // block after a few MiB instead of filling an autotuned 32 MiB window.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(16 << 10).unwrap();
    sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let l = sock.listen(1).unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = l.accept().await.unwrap();
        let (rd, wr) = tcp.into_split();
        let mut reader = FrameReader::new(rd);
        let mut writer = FrameWriter::new(wr, Compression::None);
        let Some(Frame::Hello { disks, .. }) = reader.read_frame().await.unwrap() else {
            panic!("expected Hello");
        };
        let acks = disks
            .iter()
            .map(|d| DiskAck {
                disk_id: d.disk_id,
                durable_seq: 0,
            })
            .collect();
        writer
            .send(&Frame::Welcome {
                disks: acks,
                refused: Vec::new(),
            })
            .await
            .unwrap();
        // Silent from now on; the halves live until the test ends the task.
        let _keep = (reader, writer);
        std::future::pending::<()>().await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_noticed_while_a_write_is_blocked() {
    init_tracing();
    let (addr, silent) = silent_after_welcome().await;
    let cancel = CancellationToken::new();
    let mut cfg = sender_config(addr, ClientTransport::Insecure);
    cfg.peer_timeout = Duration::from_secs(2);
    cfg.backoff_min = Duration::from_secs(30);
    cfg.backoff_max = Duration::from_secs(30);
    cfg.queue_memory = 128 << 20;
    let (sender, mut events) = Sender::start(cfg, specs(&[7]), cancel.clone()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !drain_events(&mut events).contains(&StreamEvent::Connected) {
        assert!(Instant::now() < deadline, "never connected");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Far more than the socket buffers of both ends hold: the send blocks for good.
    const N: u64 = 3000;
    let mut w = Workload::new(11, &[7]);
    let recs: Vec<_> = (0..N).map(|_| w.next(7, 1 << 20)).collect();
    let bytes: usize = recs.iter().map(|r| r.cost()).sum();
    assert!(bytes > 32 << 20, "{bytes} bytes queued");
    let queued_at = Instant::now();
    enqueue_all(&sender, recs);
    let deadline = queued_at + Duration::from_secs(8);
    let mut seen = Vec::new();
    let detected = loop {
        seen.extend(drain_events(&mut events));
        if let Some(e) = seen
            .iter()
            .find(|e| matches!(e, StreamEvent::Disconnected { .. }))
        {
            break e.clone();
        }
        assert!(
            Instant::now() < deadline,
            "a silent peer went unnoticed for 8 s with a 2 s peer timeout; connected = {}, events {seen:?}",
            sender.is_connected()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let after = queued_at.elapsed();
    assert!(!sender.is_connected());
    assert!(
        matches!(&detected, StreamEvent::Disconnected { error } if error.contains("timed out")),
        "{detected:?}"
    );
    // Nothing was acknowledged: every record is still queued for the next connection.
    let st = sender.stats();
    assert_eq!(st[0].mode, DiskMode::Streaming);
    assert_eq!(st[0].acked_seq, 0);
    assert_eq!(st[0].queued_records, N);
    eprintln!("silent peer noticed {after:?} after the records were queued");
    cancel.cancel();
    silent.abort();
}

/// A size-limited tmpfs mounted by the test (root); unmounted on drop, lazily if busy.
struct Tmpfs {
    path: std::path::PathBuf,
}

impl Tmpfs {
    fn mount(path: &std::path::Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let o = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mount a tmpfs at {} (this test needs root): {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    fn resize(&self, mib: u64) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(st.success(), "remount {}", self.path.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = std::process::Command::new("umount")
            .arg(&self.path)
            .status();
        if !plain.is_ok_and(|s| s.success()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.path)
                .status();
        }
    }
}

/// The journal's file system fills up: the journal closes itself and the disk is
/// refused (its records stay queued at the sender), and stays refused while the file
/// system is full. Once space is freed the receiver reopens the journal, the sender
/// offers the disk again by itself (no reconnect forced from outside) and resends from
/// the durable seq: every record exactly once, the view equals the model, and no
/// bitmap-only (nothing was dropped, so no sync is owed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_journal_whose_file_system_filled_is_reopened_and_resent_once_space_is_freed() {
    init_tracing();
    let certs = Certs::new();
    let dir = tempfile::tempdir().unwrap();
    let st = storage(dir.path());
    let fs = Tmpfs::mount(&st, 3);
    let rx = RunningReceiver::start(
        "127.0.0.1:0".parse().unwrap(),
        certs.server(),
        &[(PRO, &st)],
    )
    .await;
    let cancel = CancellationToken::new();
    let (sender, mut events) = Sender::start(
        sender_config(rx.addr, certs.client(PRO)),
        specs(&[7]),
        cancel.clone(),
    )
    .unwrap();
    let mut w = Workload::new(18, &[7]);

    // Write until the journal reports its storage error (bounded: well past 3 MiB).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut batches = 0;
    while rx.handle.storage_error(PRO, 7).is_none() {
        assert!(
            batches < 200 && Instant::now() < deadline,
            "no storage error after {batches} batches: {:?}",
            sender.stats()
        );
        enqueue_all(&sender, (0..8).map(|_| w.next(7, 64 << 10)).collect());
        batches += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sender.is_refused(7) {
        assert!(Instant::now() < deadline, "disk never refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // More writes meanwhile: they wait in the queue.
    enqueue_all(&sender, (0..20).map(|_| w.next(7, 64 << 10)).collect());
    // Still refused after several offers while the file system is full.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(sender.is_refused(7));
    assert!(rx.handle.storage_error(PRO, 7).is_some());
    let acked = sender.stats()[0].acked_seq;
    assert!(
        acked < w.next_seq[&7] - 1,
        "the refused disk's records wait unacknowledged"
    );

    fs.resize(64);
    sender.enqueue(w.checkpoint(7)).unwrap();
    wait_drained(&sender, Duration::from_secs(30)).await;
    assert!(!sender.is_refused(7));
    assert_eq!(rx.handle.storage_error(PRO, 7), None, "error cleared");
    let ev = drain_events(&mut events);
    assert!(
        ev.iter().any(|e| matches!(
            e,
            StreamEvent::DiskRefused {
                disk: 7,
                fenced: false,
                ..
            }
        )),
        "{ev:?}"
    );
    assert!(
        !ev.iter().any(|e| matches!(
            e,
            StreamEvent::NeedsBitmapSync { .. } | StreamEvent::ReplicaBehind { .. }
        )),
        "nothing dropped, nothing lost: {ev:?}"
    );
    assert_eq!(sender.stats()[0].mode, DiskMode::Streaming);
    cancel.cancel();
    rx.stop().await;
    verify_disk(&st, 7, &w);
}
