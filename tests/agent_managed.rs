//! Managed protection of in-process agents (loopback, mutual TLS): agents start with no
//! protection and the desired state the manager would send is applied at run time —
//! protect (Initial Sync), unprotect and protect again (Bitmap Sync), pause and resume,
//! two-phase checkpoint rounds against real qemu-io writes, journal reports with a
//! cursor, the recovery side's accept list, replica drop, and a restart that resumes the
//! persisted desired state. Every equality check reads the recovery journal offline at a
//! checkpoint and compares it with the protected disk's image.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::{assert_qemu_ok, assert_same, open_journal, qemu_io, read_view, Lab, PROT, REC};
use bulwark::agent::host::{Agent, AgentConfig, AgentError};
use bulwark::model::settings::{Priority, ResyncPolicy};
use bulwark::model::status::SyncKind;
use bulwark::proto::agent::{AgentStatus, CheckpointRequest, ProtectedDiskStatus, ReplicationMode};
use bulwark::proto::control::{
    CheckpointKind, DesiredState, DiskProtection, PeerTarget, RoundHold,
};

const SIZE: u64 = 4 << 20;
const VPG: &str = "vpg-a";

async fn start(lab: &Lab, host: &str, section: &str) -> Arc<Agent> {
    let cfg =
        AgentConfig::loopback(lab.dir.path(), host, section, Some(lab.path("certs"))).unwrap();
    Agent::start(cfg).await.unwrap()
}

/// A recovery agent with a data listener and nothing accepted yet.
async fn recovery(lab: &Lab) -> Arc<Agent> {
    start(lab, REC, "data_listen = '127.0.0.1:0'\n").await
}

/// A protected agent with disk `d1` (id 1), unprotected.
async fn protected(lab: &Lab) -> Arc<Agent> {
    start(
        lab,
        PROT,
        "[[disks]]\nname = 'd1'\nid = 1\nsize = '4 MiB'\n",
    )
    .await
}

fn accept(version: u64, hosts: &[&str]) -> DesiredState {
    DesiredState {
        version,
        accept: hosts.iter().map(|h| h.to_string()).collect(),
        ..DesiredState::default()
    }
}

/// `d1` to the recovery agent in VPG `vpg-a`, or nothing when `disk` is false.
fn protect(version: u64, rec: &Agent, disk: bool, paused: bool) -> DesiredState {
    DesiredState {
        version,
        protect: if disk {
            vec![DiskProtection {
                disk_id: 1,
                disk_name: "d1".into(),
                vm: "vm1".into(),
                vpg_id: VPG.into(),
                recovery_host: REC.into(),
                paused,
                priority: Priority::Medium,
                resync: ResyncPolicy::Automatic,
                fencing_generation: 1,
            }]
        } else {
            vec![]
        },
        peers: vec![PeerTarget {
            host_name: REC.into(),
            address: rec.endpoints().data.unwrap(),
            bandwidth_limit: None,
        }],
        accept: vec![],
        fencing: [(VPG.to_string(), 1)].into(),
        recovery: vec![],
    }
}

fn d1(s: &AgentStatus) -> &ProtectedDiskStatus {
    s.protected.iter().find(|d| d.name == "d1").unwrap()
}

async fn wait(agent: &Agent, what: &str, pred: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = agent.status();
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until `n` syncs completed and nothing is owed; returns the last one's kind.
async fn synced(agent: &Agent, n: u64) -> SyncKind {
    let s = wait(agent, &format!("sync #{n}"), |s| {
        let d = d1(s);
        d.sync.completed >= n && !d.owes_sync && d.mode == ReplicationMode::Streaming
    })
    .await;
    d1(&s).sync.last.as_ref().unwrap().kind
}

fn url(agent: &Agent) -> String {
    format!("nbd://{}/d1", agent.endpoints().nbd)
}

async fn write(agent: &Agent, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    let o = qemu_io(&url(agent), "writeback", &cmds, Duration::from_secs(30)).await;
    assert_qemu_ok(&o);
}

/// A checkpoint of the VPG, acknowledged durable; returns its id.
async fn checkpoint(agent: &Agent) -> u64 {
    let r = agent
        .checkpoint(&CheckpointRequest {
            group: Some(VPG.into()),
            ..CheckpointRequest::default()
        })
        .unwrap();
    assert!(r.disks[0].queued, "{r:?}");
    let seq = r.disks[0].seq;
    wait(agent, "checkpoint acknowledged", |s| d1(s).acked_seq >= seq).await;
    r.id
}

fn storage(lab: &Lab) -> PathBuf {
    lab.path(REC).join("replicas").join(PROT)
}

fn image(lab: &Lab) -> Vec<u8> {
    std::fs::read(lab.path(PROT).join("disks").join("d1.img")).unwrap()
}

/// With both agents stopped: the journal's view at `ckpt` equals the protected image.
fn assert_replica(lab: &Lab, ckpt: u64) {
    let j = open_journal(&storage(lab), 1, SIZE);
    let got = read_view(&j, ckpt, SIZE);
    assert_same(
        &format!("view at checkpoint {ckpt} vs disk"),
        &got,
        &image(lab),
    );
}

async fn stop(agents: &[&Arc<Agent>]) {
    for a in agents {
        a.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_protects_a_disk_written_before_with_an_initial_sync() {
    let lab = Lab::new(&[]);
    let rec = recovery(&lab).await;
    rec.apply(&accept(1, &[PROT])).await.unwrap();
    let prot = protected(&lab).await;
    let mut events = prot.subscribe_events();
    let st = prot.status();
    assert_eq!(d1(&st).mode, ReplicationMode::Unprotected);
    assert_eq!(d1(&st).recovery_host, None);
    assert!(st.peers.is_empty());
    write(
        &prot,
        &[
            "write -P 0x5a 0 64k",
            "write -P 0x33 1M 192k",
            "write -P 0x11 4032k 64k",
        ],
    )
    .await;
    // The guest's writes are counted whether or not the disk is replicated; the window
    // holds whole seconds only, so it has them once their second is over.
    let written = (64 + 192 + 64) << 10;
    let w = d1(&prot.status()).writes;
    assert_eq!((w.writes_total, w.bytes_total), (3, written), "{w:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let w = d1(&prot.status()).writes;
    assert_eq!((w.window_writes, w.window_bytes), (3, written), "{w:?}");
    assert_eq!(
        w.bytes_per_sec(),
        written as f64 * 1000.0 / w.window_ms as f64
    );

    prot.apply(&protect(7, &rec, true, false)).await.unwrap();
    assert_eq!(prot.desired_version(), Some(7));
    assert_eq!(synced(&prot, 1).await, SyncKind::Initial);
    let st = prot.status();
    assert_eq!(d1(&st).group, VPG);
    assert_eq!(d1(&st).recovery_host.as_deref(), Some(REC));
    assert!(!d1(&st).paused);
    assert_eq!(st.peers.len(), 1);
    // Writes after the sync stream as usual.
    write(&prot, &["write -P 0x44 2M 64k"]).await;
    let ckpt = checkpoint(&prot).await;
    // The sync's reads and records are not the guest's writes.
    let w = d1(&prot.status()).writes;
    assert_eq!(
        (w.writes_total, w.bytes_total),
        (4, written + (64 << 10)),
        "{w:?}"
    );

    // The manager hears of the sync and the stream.
    let mut kinds = Vec::new();
    while let Ok(e) = events.try_recv() {
        kinds.push(e.kind);
    }
    for k in ["stream_connected", "sync_started", "sync_ended"] {
        assert!(kinds.iter().any(|x| x == k), "no {k} event in {kinds:?}");
    }
    stop(&[&prot, &rec]).await;
    assert_replica(&lab, ckpt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_taken_out_is_tracked_and_syncs_by_bitmap_when_back() {
    let lab = Lab::new(&[]);
    let rec = recovery(&lab).await;
    rec.apply(&accept(1, &[PROT])).await.unwrap();
    let prot = protected(&lab).await;
    write(&prot, &["write -P 0x21 0 256k"]).await;
    prot.apply(&protect(1, &rec, true, false)).await.unwrap();
    assert_eq!(synced(&prot, 1).await, SyncKind::Initial);
    let received = |rec: &Agent| rec.status().received.iter().map(|r| r.received_seq).max();
    let before = received(&rec);

    // Out of protection: the peer goes, writes land in the bitmap only.
    prot.apply(&protect(2, &rec, false, false)).await.unwrap();
    let st = prot.status();
    assert_eq!(d1(&st).mode, ReplicationMode::Unprotected);
    assert!(st.peers.is_empty(), "the peer without disks is stopped");
    write(&prot, &["write -P 0x77 2M 64k", "write -P 0x78 3M 4k"]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = prot.status();
    assert!(d1(&st).owes_sync && d1(&st).dirty_regions >= 2, "{st:#?}");
    assert_eq!(received(&rec), before, "nothing streamed while unprotected");

    // Back in: the bitmap says what differs.
    prot.apply(&protect(3, &rec, true, false)).await.unwrap();
    assert_eq!(synced(&prot, 2).await, SyncKind::Bitmap);
    let last = d1(&prot.status()).sync.last.clone().unwrap();
    // The two regions written while out, plus at most the first write's four regions
    // if the clearer had not yet caught up with their acknowledgements when the disk
    // left protection (unacknowledged records are marked again then): never the disk.
    assert!(
        last.blocks_sent <= 6 * 16,
        "only the dirty regions: {last:?}"
    );
    let ckpt = checkpoint(&prot).await;
    stop(&[&prot, &rec]).await;
    assert_replica(&lab, ckpt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_stops_streaming_and_resume_runs_a_bitmap_sync() {
    let lab = Lab::new(&[]);
    let rec = recovery(&lab).await;
    rec.apply(&accept(1, &[PROT])).await.unwrap();
    let prot = protected(&lab).await;
    prot.apply(&protect(1, &rec, true, false)).await.unwrap();
    assert_eq!(synced(&prot, 1).await, SyncKind::Initial);
    write(&prot, &["write -P 0x01 0 64k"]).await;
    let _ = checkpoint(&prot).await;
    let received = |rec: &Agent| rec.status().received.iter().map(|r| r.received_seq).max();
    let before = received(&rec);

    prot.apply(&protect(2, &rec, true, true)).await.unwrap();
    let st = prot.status();
    assert!(d1(&st).paused);
    assert_eq!(d1(&st).mode, ReplicationMode::BitmapOnly);
    write(&prot, &["write -P 0x02 1M 64k", "write -P 0x03 3M 8k"]).await;
    let r = prot
        .checkpoint(&CheckpointRequest {
            group: Some(VPG.into()),
            ..CheckpointRequest::default()
        })
        .unwrap();
    assert!(!r.disks[0].queued, "a paused disk queues no marker");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(received(&rec), before, "nothing streamed while paused");
    let st = prot.status();
    assert_eq!(d1(&st).sync.completed, 1, "no sync while paused");
    assert!(d1(&st).owes_sync);

    prot.apply(&protect(3, &rec, true, false)).await.unwrap();
    assert_eq!(synced(&prot, 2).await, SyncKind::Bitmap);
    assert!(!d1(&prot.status()).paused);
    let ckpt = checkpoint(&prot).await;
    stop(&[&prot, &rec]).await;
    assert_replica(&lab, ckpt);
}

fn hold(round: u64, bound_ms: u64, barrier: bool) -> RoundHold {
    RoundHold {
        round,
        vpg_id: VPG.into(),
        kind: CheckpointKind::Scheduled,
        tag: None,
        bound_ms,
        quiesce: vec![],
        barrier,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_round_holds_write_completions_until_released_or_its_bound() {
    let lab = Lab::new(&[]);
    let rec = recovery(&lab).await;
    rec.apply(&accept(1, &[PROT])).await.unwrap();
    let prot = protected(&lab).await;
    prot.apply(&protect(1, &rec, true, false)).await.unwrap();
    assert_eq!(synced(&prot, 1).await, SyncKind::Initial);

    // Released by the manager.
    let (held, rx) = prot.hold_round(&hold(100, 20_000, true));
    assert_eq!(held.error, None);
    assert_eq!(held.disks.len(), 1);
    assert!(held.disks[0].queued);
    let rx = rx.unwrap();
    let u = url(&prot);
    let writer = tokio::spawn(async move {
        qemu_io(
            &u,
            "writeback",
            &["write -P 0x66 0 4k".to_string()],
            Duration::from_secs(30),
        )
        .await
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !writer.is_finished(),
        "the write completed while the round was held"
    );
    assert!(prot.release_round(100));
    assert!(!prot.release_round(100), "a second release finds nothing");
    let o = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .unwrap()
        .unwrap();
    assert_qemu_ok(&o);
    let rel = rx.await.unwrap();
    assert!(rel.on_time);
    assert!(rel.hold_us >= 700_000, "{rel:?}");

    // No release: the agent lets go at the bound.
    let started = Instant::now();
    let (held, rx) = prot.hold_round(&hold(101, 400, true));
    assert_eq!(held.error, None);
    let u = url(&prot);
    let writer = tokio::spawn(async move {
        qemu_io(
            &u,
            "writeback",
            &["write -P 0x67 8k 4k".to_string()],
            Duration::from_secs(30),
        )
        .await
    });
    let rel = tokio::time::timeout(Duration::from_secs(10), rx.unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(!rel.on_time, "{rel:?}");
    assert!(
        rel.hold_us >= 400_000 && started.elapsed() < Duration::from_secs(5),
        "{rel:?}"
    );
    assert_qemu_ok(
        &tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .unwrap()
            .unwrap(),
    );
    assert!(!prot.release_round(101), "the bound already released it");

    // No barrier: released at once; an unknown VPG holds nothing.
    let (held, rx) = prot.hold_round(&hold(102, 5_000, false));
    assert_eq!(held.error, None);
    assert!(rx.unwrap().await.unwrap().on_time);
    let mut other = hold(103, 5_000, true);
    other.vpg_id = "nope".into();
    let (held, rx) = prot.hold_round(&other);
    assert!(held.error.is_some() && rx.is_none(), "{held:?}");
    assert!(prot.status().max_hold_us >= 700_000);

    // The markers of both barrier rounds reached the journal.
    let id = checkpoint(&prot).await;
    let ids: Vec<u64> = rec
        .received_checkpoints(PROT, 1)
        .unwrap()
        .iter()
        .map(|c| c.id)
        .collect();
    for want in [100, 101, 102, id] {
        assert!(ids.contains(&want), "{want} not in {ids:?}");
    }
    stop(&[&prot, &rec]).await;
    assert_replica(&lab, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_reports_each_recoverable_checkpoint_once_per_cursor() {
    let lab = Lab::new(&[]);
    let rec = recovery(&lab).await;
    rec.apply(&accept(1, &[PROT])).await.unwrap();
    let prot = protected(&lab).await;
    write(&prot, &["write -P 0x09 0 128k"]).await;
    prot.apply(&protect(1, &rec, true, false)).await.unwrap();
    assert_eq!(synced(&prot, 1).await, SyncKind::Initial);
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(checkpoint(&prot).await);
    }
    let mut cursor = HashMap::new();
    let reports = rec.journal_reports(&mut cursor);
    assert_eq!(reports.len(), 1, "{reports:?}");
    let r = &reports[0];
    assert_eq!((r.host.as_str(), r.disk_id), (PROT, 1));
    assert_eq!(r.recoverable, ids);
    assert_eq!(r.oldest_recoverable, Some(ids[0]));
    assert_eq!(r.newest_recoverable, Some(ids[2]));
    assert!(r.journal_bytes > 128 << 10, "{r:?}");
    assert_eq!(r.storage_error, None);

    let again = rec.journal_reports(&mut cursor);
    assert!(again[0].recoverable.is_empty(), "{again:?}");
    assert_eq!(again[0].newest_recoverable, Some(ids[2]));
    ids.push(checkpoint(&prot).await);
    let next = rec.journal_reports(&mut cursor);
    assert_eq!(next[0].recoverable, vec![ids[3]]);
    // A new connection's cursor reports everything again.
    let fresh = rec.journal_reports(&mut HashMap::new());
    assert_eq!(fresh[0].recoverable, ids);
    // A protected host keeps no journals.
    assert!(prot.journal_reports(&mut HashMap::new()).is_empty());
    stop(&[&prot, &rec]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_taken_off_accept_is_refused_and_its_replica_can_be_dropped() {
    let lab = Lab::new(&[]);
    let rec = recovery(&lab).await;
    rec.apply(&accept(1, &[PROT])).await.unwrap();
    let prot = protected(&lab).await;
    prot.apply(&protect(1, &rec, true, false)).await.unwrap();
    assert_eq!(synced(&prot, 1).await, SyncKind::Initial);
    let _ = checkpoint(&prot).await;
    match rec.drop_replica(PROT, 1).await {
        Err(AgentError::ReplicaInUse { .. }) => {}
        other => panic!("dropping a streamed replica: {other:?}"),
    }

    // Off the list: the live stream closes and new ones are refused.
    rec.apply(&accept(2, &[])).await.unwrap();
    let st = wait(&prot, "the stream refused", |s| {
        s.peers.iter().all(|p| {
            !p.connected
                && p.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("allow-list"))
        })
    })
    .await;
    assert_eq!(st.peers.len(), 1);
    write(&prot, &["write -P 0x5c 0 64k"]).await;
    let r = prot.checkpoint(&CheckpointRequest::default()).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        d1(&prot.status()).acked_seq < r.disks[0].seq,
        "acknowledged while refused"
    );

    // Back on the list: it streams again and catches up.
    rec.apply(&accept(3, &[PROT])).await.unwrap();
    wait(&prot, "the stream back", |s| {
        d1(s).acked_seq >= r.disks[0].seq
    })
    .await;

    // Unprotected: the recovery side may drop the replica.
    prot.apply(&protect(2, &rec, false, false)).await.unwrap();
    let dir = storage(&lab).join(format!("disk-{:016x}", 1));
    assert!(dir.exists());
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match rec.drop_replica(PROT, 1).await {
            Ok(()) => break,
            Err(AgentError::ReplicaInUse { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("drop_replica: {e}"),
        }
    }
    assert!(!dir.exists());
    assert!(rec.journal_reports(&mut HashMap::new()).is_empty());
    stop(&[&prot, &rec]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_resumes_the_persisted_desired_state() {
    let lab = Lab::new(&[]);
    let rec = recovery(&lab).await;
    rec.apply(&accept(1, &[PROT])).await.unwrap();
    let prot = protected(&lab).await;
    assert_eq!(prot.persisted_desired(), None);
    write(&prot, &["write -P 0x3c 512k 64k"]).await;
    let desired = protect(5, &rec, true, false);
    prot.apply(&desired).await.unwrap();
    assert_eq!(synced(&prot, 1).await, SyncKind::Initial);
    prot.shutdown().await.unwrap();
    drop(prot);

    let prot = protected(&lab).await;
    assert_eq!(prot.persisted_desired(), Some(desired.clone()));
    assert_eq!(prot.desired_version(), Some(5));
    // Protected before anyone applies anything; applying it again changes nothing.
    let st = prot.status();
    assert_eq!(d1(&st).recovery_host.as_deref(), Some(REC));
    assert_eq!(d1(&st).group, VPG);
    prot.apply(&prot.persisted_desired().unwrap())
        .await
        .unwrap();
    write(&prot, &["write -P 0x3d 1M 64k"]).await;
    let ckpt = checkpoint(&prot).await;
    let st = prot.status();
    assert!(
        d1(&st)
            .sync
            .last
            .as_ref()
            .is_none_or(|l| l.kind != SyncKind::Initial),
        "a clean restart needs no Initial Sync: {st:#?}"
    );
    assert!(!d1(&st).owes_sync);
    stop(&[&prot, &rec]).await;
    assert_replica(&lab, ckpt);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accept_without_a_listener_and_unknown_disks_are_errors_the_rest_applies() {
    let lab = Lab::new(&[]);
    let rec = recovery(&lab).await;
    let prot = protected(&lab).await;
    let e = prot.apply(&accept(1, &["someone"])).await.unwrap_err();
    assert!(e.to_string().contains("data_listen"), "{e}");
    let mut d = protect(2, &rec, true, false);
    let mut ghost = d.protect[0].clone();
    ghost.disk_id = 99;
    ghost.disk_name = "ghost".into();
    d.protect.push(ghost);
    let e = prot.apply(&d).await.unwrap_err();
    assert!(e.to_string().contains("ghost"), "{e}");
    // d1 was protected all the same.
    assert_eq!(d1(&prot.status()).recovery_host.as_deref(), Some(REC));
    assert_eq!(prot.persisted_desired(), Some(d));
    stop(&[&prot, &rec]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_are_added_and_exports_withdrawn_at_run_time() {
    let lab = Lab::new(&[]);
    let prot = protected(&lab).await;
    let d2 = bulwark::agent::host::config::DiskConfig {
        name: "d2".into(),
        id: 2,
        size: 1 << 20,
        path: lab.path(PROT).join("disks").join("d2.img"),
        group: "default".into(),
        recovery_host: None,
        resync: ResyncPolicy::Automatic,
        priority: Priority::Medium,
    };
    prot.add_disk(d2.clone()).await.unwrap();
    prot.add_disk(d2.clone()).await.unwrap();
    let mut clash = d2.clone();
    clash.name = "d3".into();
    assert!(prot.add_disk(clash).await.is_err(), "id 2 is taken");
    let url2 = format!("nbd://{}/d2", prot.endpoints().nbd);
    let w = |u: String| async move {
        qemu_io(
            &u,
            "writeback",
            &["write -P 0x42 0 4k".to_string()],
            Duration::from_secs(30),
        )
        .await
    };
    assert_qemu_ok(&w(url2.clone()).await);
    assert_eq!(prot.status().protected.len(), 2);
    prot.set_exported("d2", false).await.unwrap();
    assert!(
        !w(url2.clone()).await.status.success(),
        "withdrawn export still served"
    );
    prot.set_exported("d2", true).await.unwrap();
    assert_qemu_ok(&w(url2).await);
    assert!(matches!(
        prot.set_exported("nope", true).await,
        Err(AgentError::NoSuchDisk(_))
    ));
    stop(&[&prot]).await;
    let img = std::fs::read(&d2.path).unwrap();
    assert_eq!(img.len(), 1 << 20);
    assert!(img[..4096].iter().all(|b| *b == 0x42));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_managers_bandwidth_limit_applies_to_the_running_stream() {
    let lab = Lab::new(&[]);
    let rec = recovery(&lab).await;
    rec.apply(&accept(1, &[PROT])).await.unwrap();
    // A static peer entry with its own limit of 1 MiB/s.
    let prot = start(
        &lab,
        PROT,
        &format!(
            "[[disks]]\nname = 'd1'\nid = 1\nsize = '4 MiB'\n\
             [[peers]]\nhost_name = '{REC}'\naddress = '{}'\nbandwidth_limit = '1 MiB'\n",
            rec.endpoints().data.unwrap()
        ),
    )
    .await;
    let with_limit = |version: u64, limit: Option<u64>| {
        let mut d = protect(version, &rec, true, false);
        d.peers[0].bandwidth_limit = limit;
        d
    };
    prot.apply(&with_limit(1, None)).await.unwrap();
    assert_eq!(synced(&prot, 1).await, SyncKind::Initial);
    let limits = |a: &Agent| a.peer_bandwidth_limits();
    assert_eq!(
        limits(&prot),
        [(REC.to_string(), Some(1 << 20))],
        "static only"
    );

    // The smaller of the two wins, changed in place: same stream, no new sync.
    prot.apply(&with_limit(2, Some(256 << 10))).await.unwrap();
    assert_eq!(limits(&prot), [(REC.to_string(), Some(256 << 10))]);
    write(&prot, &["write -P 0x05 0 256k"]).await;
    prot.apply(&with_limit(3, Some(8 << 20))).await.unwrap();
    assert_eq!(limits(&prot), [(REC.to_string(), Some(1 << 20))]);
    prot.apply(&with_limit(4, None)).await.unwrap();
    assert_eq!(limits(&prot), [(REC.to_string(), Some(1 << 20))]);
    let ckpt = checkpoint(&prot).await;
    // (A Bitmap Sync for regions left dirty at start may follow the initial one; the
    // limit changes themselves ask for none.)
    wait(&prot, "in sync", |s| {
        !d1(s).owes_sync && d1(s).mode == ReplicationMode::Streaming
    })
    .await;
    let st = prot.status();
    assert!(st.peers.iter().all(|p| p.connected), "{:?}", st.peers);
    stop(&[&prot, &rec]).await;
    assert_replica(&lab, ckpt);
}
