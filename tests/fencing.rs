//! Fencing of the replication data path and the old protected host's side of reverse
//! protection, with in-process agents (loopback, mutual TLS) driven by desired states as
//! the manager sends them:
//! - a recovery host that learned a newer fencing generation refuses the stream of a
//!   protected host still at the old one (its journal does not change; the protected
//!   host reports `stream_fenced`) and admits it again at the new generation;
//! - a generation change that reaches the recovery host before the protected host costs
//!   a reconnect, not the queue: no sync follows;
//! - the record survives a restart of the recovery host;
//! - `SeedReverse` turns the old protected disk into the pre-seeded replica of the
//!   recovered disk, so the reverse Delta Sync sends only the blocks that differ.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod agent_common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::{assert_qemu_ok, assert_same, open_journal, qemu_io, read_view, Lab, PROT, REC};
use bulwark::agent::host::config::DiskConfig;
use bulwark::agent::host::{Agent, AgentConfig};
use bulwark::model::settings::{Priority, ResyncPolicy};
use bulwark::model::status::SyncKind;
use bulwark::proto::agent::{AgentStatus, CheckpointRequest, ProtectedDiskStatus, ReplicationMode};
use bulwark::proto::control::{AgentEvent, DesiredState, DiskProtection, PeerTarget, ReverseSeed};
use tokio::sync::broadcast;

const SIZE: u64 = 4 << 20;
const VPG: &str = "vpg-f";
/// Bound of every wait.
const WAIT: Duration = Duration::from_secs(60);

async fn start(lab: &Lab, host: &str, section: &str) -> Arc<Agent> {
    let cfg =
        AgentConfig::loopback(lab.dir.path(), host, section, Some(lab.path("certs"))).unwrap();
    Agent::start(cfg).await.unwrap()
}

const REC_SECTION: &str = "data_listen = '127.0.0.1:0'\n";
/// The protected host has a listener too: it is the recovery host after reversal.
const PROT_SECTION: &str =
    "data_listen = '127.0.0.1:0'\n[[disks]]\nname = 'd1'\nid = 1\nsize = '4 MiB'\n";

/// Recovery side: accept `hosts`, VPG at `generation`.
fn accept(version: u64, hosts: &[&str], generation: u64) -> DesiredState {
    DesiredState {
        version,
        accept: hosts.iter().map(|h| h.to_string()).collect(),
        fencing: [(VPG.to_string(), generation)].into(),
        ..DesiredState::default()
    }
}

/// Protected side: disk (`name`, `id`) to `to`, VPG at `generation`.
fn protect(
    version: u64,
    name: &str,
    id: u64,
    to: &Agent,
    to_name: &str,
    generation: u64,
) -> DesiredState {
    DesiredState {
        version,
        protect: vec![DiskProtection {
            disk_id: id,
            disk_name: name.into(),
            vm: "vm1".into(),
            vpg_id: VPG.into(),
            recovery_host: to_name.into(),
            paused: false,
            priority: Priority::Medium,
            resync: ResyncPolicy::Automatic,
            fencing_generation: generation,
        }],
        peers: vec![PeerTarget {
            host_name: to_name.into(),
            address: to.endpoints().data.unwrap(),
            bandwidth_limit: None,
        }],
        accept: vec![],
        fencing: [(VPG.to_string(), generation)].into(),
        recovery: vec![],
    }
}

fn disk<'a>(s: &'a AgentStatus, name: &str) -> &'a ProtectedDiskStatus {
    s.protected.iter().find(|d| d.name == name).unwrap()
}

async fn wait(agent: &Agent, what: &str, pred: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
    let deadline = Instant::now() + WAIT;
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

/// Waits until disk `name` completed `n` syncs, owes nothing and streams.
async fn synced(agent: &Agent, name: &str, n: u64) -> SyncKind {
    let s = wait(agent, &format!("sync #{n} of {name}"), |s| {
        let d = disk(s, name);
        d.sync.completed >= n && !d.owes_sync && d.mode == ReplicationMode::Streaming
    })
    .await;
    disk(&s, name).sync.last.as_ref().unwrap().kind
}

async fn write(agent: &Agent, name: &str, cmds: &[&str]) {
    let url = format!("nbd://{}/{name}", agent.endpoints().nbd);
    let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
    let o = qemu_io(&url, "writeback", &cmds, Duration::from_secs(30)).await;
    assert_qemu_ok(&o);
}

/// A checkpoint of the VPG on `agent`, acknowledged durable; returns its id.
async fn checkpoint(agent: &Agent, name: &str) -> u64 {
    let r = agent
        .checkpoint(&CheckpointRequest {
            group: Some(VPG.into()),
            ..CheckpointRequest::default()
        })
        .unwrap();
    assert!(r.disks[0].queued, "{r:?}");
    let seq = r.disks[0].seq;
    wait(agent, "checkpoint acknowledged", |s| {
        disk(s, name).acked_seq >= seq
    })
    .await;
    r.id
}

/// (received seq, durable seq) of `host`'s disk `id` at `rec`.
fn journal_head(rec: &Agent, host: &str, id: u64) -> (u64, u64) {
    rec.status()
        .received
        .iter()
        .find(|r| r.host == host && r.disk_id == id)
        .map_or((0, 0), |r| (r.received_seq, r.durable_seq))
}

/// Waits for an event of `kind` (bounded).
async fn event(events: &mut broadcast::Receiver<AgentEvent>, kind: &str) -> AgentEvent {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Ok(e)) if e.kind == kind => return e,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event channel: {e}"),
            Err(_) => panic!("no {kind} event in time"),
        }
    }
}

/// Protected `d1` streaming to the recovery host at generation 1, initial sync done,
/// writes acknowledged.
async fn streaming_at_1(lab: &Lab) -> (Arc<Agent>, Arc<Agent>) {
    let rec = start(lab, REC, REC_SECTION).await;
    rec.apply(&accept(1, &[PROT], 1)).await.unwrap();
    let prot = start(lab, PROT, PROT_SECTION).await;
    write(
        &prot,
        "d1",
        &["write -P 0x5a 0 64k", "write -P 0x33 1M 128k"],
    )
    .await;
    prot.apply(&protect(1, "d1", 1, &rec, REC, 1))
        .await
        .unwrap();
    assert_eq!(synced(&prot, "d1", 1).await, SyncKind::Initial);
    write(&prot, "d1", &["write -P 0x44 2M 64k"]).await;
    checkpoint(&prot, "d1").await;
    (prot, rec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_protected_host_is_fenced_and_admitted_again_at_the_new_generation() {
    let lab = Lab::new(&[]);
    let (prot, rec) = streaming_at_1(&lab).await;
    let mut events = prot.subscribe_events();
    let before = journal_head(&rec, PROT, 1);
    assert!(before.1 > 0, "writes arrived: {before:?}");

    // A failover elsewhere: the recovery host learns generation 2.
    rec.apply(&accept(2, &[PROT], 2)).await.unwrap();
    assert_eq!(rec.fencing().current(VPG), 2);
    // The old primary, still at 1, keeps writing: the connection it has is closed at
    // its next batch and the new Hello is refused.
    write(&prot, "d1", &["write -P 0x99 3M 64k"]).await;
    let e = event(&mut events, "stream_fenced").await;
    assert_eq!(e.disk_id, Some(1));
    assert!(e.message.contains("fenced"), "{e:?}");
    write(&prot, "d1", &["write -P 0x98 3M 4k"]).await;
    wait(&prot, "writes tracked in the bitmap only", |s| {
        disk(s, "d1").owes_sync && disk(s, "d1").dirty_regions > 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        journal_head(&rec, PROT, 1),
        before,
        "the fenced stream changed nothing"
    );
    assert_eq!(rec.fencing().current(VPG), 2, "never lowered");

    // The manager gives the protected host generation 2: it streams again.
    prot.apply(&protect(2, "d1", 1, &rec, REC, 2))
        .await
        .unwrap();
    assert_eq!(prot.fencing().current(VPG), 2);
    synced(&prot, "d1", 2).await;
    write(&prot, "d1", &["write -P 0x17 512k 64k"]).await;
    let ckpt = checkpoint(&prot, "d1").await;
    let after = journal_head(&rec, PROT, 1);
    assert!(
        after.1 > before.1,
        "streaming again: {before:?} → {after:?}"
    );
    let storage = lab.path(REC).join("replicas").join(PROT);
    prot.shutdown().await.unwrap();
    rec.shutdown().await.unwrap();
    let j = open_journal(&storage, 1, SIZE);
    let img = std::fs::read(lab.path(PROT).join("disks").join("d1.img")).unwrap();
    assert_same(
        "replica after re-admission",
        &read_view(&j, ckpt, SIZE),
        &img,
    );
}

/// A move or failover raises the generation on every host at once; here the recovery
/// host learns it first. The protected host's live stream is closed and its next Hello
/// refused, but its own new generation follows within the fenced bound: the queue was
/// kept, so the stream resends from the durable seq — no bitmap-only, no sync, nothing
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_change_racing_the_stream_keeps_the_queue_and_needs_no_sync() {
    let lab = Lab::new(&[]);
    let (prot, rec) = streaming_at_1(&lab).await;
    let mut events = prot.subscribe_events();
    let before = journal_head(&rec, PROT, 1);

    rec.apply(&accept(2, &[PROT], 2)).await.unwrap();
    write(&prot, "d1", &["write -P 0x99 3M 64k"]).await;
    event(&mut events, "stream_fenced").await;
    write(
        &prot,
        "d1",
        &["write -P 0x98 3M 4k", "write -P 0x97 256k 8k"],
    )
    .await;
    let s = prot.status();
    let d = disk(&s, "d1");
    assert_eq!(d.mode, ReplicationMode::Streaming, "queue kept: {d:#?}");
    assert!(!d.owes_sync && d.queued_records > 0, "{d:#?}");
    assert_eq!(
        journal_head(&rec, PROT, 1),
        before,
        "nothing of the old generation was appended"
    );

    // Its own generation arrives (within the bound): streaming again, nothing owed.
    prot.apply(&protect(2, "d1", 1, &rec, REC, 2))
        .await
        .unwrap();
    let s = wait(&prot, "the queue resent and acknowledged", |s| {
        let d = disk(s, "d1");
        d.queued_records == 0 && d.acked_seq >= d.last_seq
    })
    .await;
    let d = disk(&s, "d1");
    assert_eq!(d.mode, ReplicationMode::Streaming, "{d:#?}");
    assert!(!d.owes_sync, "{d:#?}");
    let ckpt = checkpoint(&prot, "d1").await;
    // Time for a wrongly started sync to show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = prot.status();
    let d = disk(&s, "d1");
    assert_eq!(
        d.sync.completed, 1,
        "only the Initial Sync ran: {:#?}",
        d.sync
    );
    assert!(d.sync.running.is_none() && !d.owes_sync, "{:#?}", d.sync);
    let storage = lab.path(REC).join("replicas").join(PROT);
    prot.shutdown().await.unwrap();
    rec.shutdown().await.unwrap();
    let j = open_journal(&storage, 1, SIZE);
    let img = std::fs::read(lab.path(PROT).join("disks").join("d1.img")).unwrap();
    assert_same("replica after the race", &read_view(&j, ckpt, SIZE), &img);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fencing_record_survives_a_restart_of_the_recovery_host() {
    let lab = Lab::new(&[]);
    let (prot, rec) = streaming_at_1(&lab).await;
    rec.apply(&accept(2, &[PROT], 2)).await.unwrap();
    // Restart the recovery host; its persisted desired state is not what fences here
    // (a desired state at generation 1 is applied after the restart, as a stale manager
    // might): the record is.
    let data = rec.endpoints().data.unwrap();
    rec.shutdown().await.unwrap();
    drop(rec);
    let section = format!("data_listen = '{data}'\n");
    let rec = start(&lab, REC, &section).await;
    assert_eq!(rec.fencing().current(VPG), 2);
    rec.apply(&accept(3, &[PROT], 1)).await.unwrap();
    assert_eq!(
        rec.fencing().current(VPG),
        2,
        "a desired state never lowers it"
    );
    let before = journal_head(&rec, PROT, 1);

    let mut events = prot.subscribe_events();
    write(&prot, "d1", &["write -P 0x61 1M 64k"]).await;
    event(&mut events, "stream_fenced").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        journal_head(&rec, PROT, 1),
        before,
        "nothing appended after the restart"
    );
    prot.shutdown().await.unwrap();
    rec.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_reverse_makes_the_old_disk_the_replica_and_the_delta_sync_sends_only_changes() {
    let lab = Lab::new(&[]);
    let (prot, rec) = streaming_at_1(&lab).await;
    let old_image = lab.path(PROT).join("disks").join("d1.img");

    // The recovered disk at the recovery host: the old disk's content plus what the
    // recovered VM wrote (three 4 KiB blocks).
    let r1_path = lab.path(REC).join("disks").join("r1.img");
    std::fs::create_dir_all(r1_path.parent().unwrap()).unwrap();
    std::fs::copy(&old_image, &r1_path).unwrap();
    rec.add_disk(DiskConfig {
        name: "r1".into(),
        id: 11,
        size: SIZE,
        path: r1_path.clone(),
        group: "default".into(),
        recovery_host: None,
        resync: ResyncPolicy::Automatic,
        priority: Priority::Medium,
    })
    .await
    .unwrap();
    write(
        &rec,
        "r1",
        &[
            "write -P 0xe1 8k 4k",
            "write -P 0xe2 1M 4k",
            "write -P 0xe3 3M 4k",
        ],
    )
    .await;

    // The old protected host: stale generations are refused, then the seed.
    let seed = ReverseSeed {
        disk_id: 1,
        vm: "vm1".into(),
        new_host: REC.into(),
        new_disk_id: 11,
    };
    prot.apply(&accept(2, &[REC], 2)).await.unwrap();
    let stale = prot
        .seed_reverse("op-1", VPG, 1, std::slice::from_ref(&seed))
        .await
        .unwrap_err();
    assert!(stale.to_string().contains("fenced"), "{stale}");
    let seeded = prot
        .seed_reverse("op-1", VPG, 2, std::slice::from_ref(&seed))
        .await
        .unwrap();
    assert_eq!(seeded.len(), 1);
    assert!(!seeded[0].already);
    let replica = seeded[0].replica.clone();
    assert!(
        replica.exists() && !old_image.exists(),
        "moved: {replica:?}"
    );
    assert!(
        prot.status().protected.iter().all(|d| d.name != "d1"),
        "no longer served"
    );
    // Again (a retried command): nothing more to do.
    let again = prot
        .seed_reverse("op-1", VPG, 2, std::slice::from_ref(&seed))
        .await
        .unwrap();
    assert!(again[0].already && again[0].replica == replica);
    // A crash after the move, before the VM was removed: the restart recreated an
    // empty image at the old path. Running the command again deletes it, moves nothing.
    std::fs::write(&old_image, vec![0u8; SIZE as usize]).unwrap();
    let again = prot
        .seed_reverse("op-1", VPG, 2, std::slice::from_ref(&seed))
        .await
        .unwrap();
    assert!(again[0].already, "{again:?}");
    assert!(!old_image.exists(), "the recreated image is gone");
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), SIZE);

    // The recovered disk is protected back to the old host.
    rec.apply(&protect(3, "r1", 11, &prot, PROT, 2))
        .await
        .unwrap();
    assert_eq!(synced(&rec, "r1", 1).await, SyncKind::Delta);
    let last = disk(&rec.status(), "r1").sync.last.clone().unwrap();
    assert!(
        last.blocks_compared >= SIZE / 4096 / 2,
        "compared the disk: {last:?}"
    );
    assert!(
        (3..=8).contains(&last.blocks_sent) && last.data_bytes <= 8 * 4096,
        "only the changed blocks: {last:?}"
    );
    let ckpt = checkpoint(&rec, "r1").await;
    let storage: PathBuf = replica.parent().unwrap().parent().unwrap().to_path_buf();
    prot.shutdown().await.unwrap();
    rec.shutdown().await.unwrap();
    let j = open_journal(&storage, 11, SIZE);
    let want = std::fs::read(&r1_path).unwrap();
    assert_same(
        "reverse replica vs recovered disk",
        &read_view(&j, ckpt, SIZE),
        &want,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seeded_vm_is_removed_from_the_simulated_hypervisor_once() {
    use bulwark::agent::hypervisor::{HypervisorDriver, VmCatalog, VmSpec};
    use bulwark::proto::control::NewDisk;
    let lab = Lab::new(&[]);
    let cfg = AgentConfig::loopback(
        lab.dir.path(),
        PROT,
        "[[disks]]\nname = 'bare'\nid = 1\nsize = '1 MiB'\n",
        Some(lab.path("certs")),
    )
    .unwrap();
    let hv = VmCatalog::open(&cfg).unwrap();
    hv.create_vm(&VmSpec {
        name: "web".into(),
        cpus: 1,
        memory_mib: 512,
        disks: vec![NewDisk {
            name: "web-0".into(),
            size_bytes: 1 << 20,
        }],
        boot: None,
        nics: vec![],
    })
    .unwrap();
    assert!(hv.remove_seeded_vm("web").unwrap());
    assert!(!hv.remove_seeded_vm("web").unwrap(), "already gone");
    // A VM of the configuration file goes too.
    assert!(hv.remove_seeded_vm("bare").unwrap());
    drop(hv);
    let names = |c: &AgentConfig| -> Vec<String> {
        let hv = VmCatalog::open(c).unwrap();
        hv.inventory().vms.into_iter().map(|v| v.name).collect()
    };
    // Without a seed record the file brings its VM back; the run-time VM stays removed.
    assert_eq!(names(&cfg), vec!["bare".to_string()]);
    // With one (what SeedReverse writes first), the disk and its VM stay out.
    let seed = bulwark::agent::host::SeededDisk {
        operation: "op-1".into(),
        vpg_id: VPG.into(),
        disk_id: 1,
        vm: "bare".into(),
        new_host: REC.into(),
        new_disk_id: 7,
        image: lab.path("bare.img"),
        replica: lab.path("replica.img"),
        size: 1 << 20,
        already: false,
    };
    std::fs::write(
        cfg.state_dir()
            .join(bulwark::agent::host::REVERSE_SEEDS_FILE),
        serde_json::to_vec(&std::collections::BTreeMap::from([(1u64, seed)])).unwrap(),
    )
    .unwrap();
    let kept = bulwark::agent::host::without_seeded_disks(cfg.clone()).unwrap();
    assert!(kept.disks.is_empty(), "{:?}", kept.disks);
    assert!(names(&kept).is_empty());
}
