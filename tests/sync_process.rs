//! Syncs between real `bulwark agent` processes on loopback: Initial Sync of a filled
//! disk while qemu-io writes to it, kill -9 of either agent in the middle of Initial,
//! Bitmap, Delta and Full syncs (the sync resumes and the journal receives well under
//! 1.2× what one run sends), a pre-seeded replica brought level by a Delta Sync, and a
//! size mismatch refused before anything is sent. Each ends with the journal's view at
//! a checkpoint taken after the sync compared byte for byte with a copy of the source
//! taken at that checkpoint, and with that checkpoint recoverable.
#![allow(clippy::unwrap_used)]

mod agent_common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_common::*;
use bulwark::agent::stream::{recoverable, SyncState, SYNC_STATE_FILE};
use bulwark::model::status::SyncKind;
use bulwark::proto::agent::{
    AgentStatus, CheckpointRequest, ProtectedDiskStatus, ReceivedCheckpoint, SyncAction, SyncPhase,
};
use rand::{Rng, RngCore, SeedableRng};

impl Lab {
    fn storage(&self) -> PathBuf {
        self.path("rec").join(format!("from-{PROT}"))
    }

    fn disk_dir(&self, id: u64) -> PathBuf {
        self.storage().join(format!("disk-{id:016x}"))
    }

    /// The recovery agent's config; `agent_extra` goes into `[agent]`.
    fn recovery_config_with(&self, port: u16, agent_extra: &str) -> PathBuf {
        let storage = self.storage();
        let text = recovery_toml(
            &self.path("rec"),
            REC,
            format!("127.0.0.1:{port}").parse().unwrap(),
            &self.tls(),
            &[(PROT, storage.as_path())],
        )
        .replacen("[agent]\n", &format!("[agent]\n{agent_extra}\n"), 1);
        write_config(self.dir.path(), REC, &text)
    }

    fn recovery_config(&self, port: u16) -> PathBuf {
        self.recovery_config_with(port, "")
    }

    async fn recovery(&self, port: u16) -> AgentProc {
        let cfg = self.recovery_config(port);
        AgentProc::start(REC, &cfg, &self.path("rec"), &[]).await
    }

    /// The protected agent with one disk; `agent_extra` goes into `[agent]`, `peer_extra`
    /// into its `[[agent.peers]]`.
    async fn protected(
        &self,
        disk: &DiskDef,
        rec: std::net::SocketAddr,
        agent_extra: &str,
        peer_extra: &str,
    ) -> AgentProc {
        let data = self.path(PROT);
        let peer = PeerDef {
            host: REC.into(),
            address: rec,
            extra: peer_extra.into(),
        };
        let text = protected_toml(
            &data,
            PROT,
            &self.tls(),
            std::slice::from_ref(disk),
            Some(&peer),
        )
        .replacen("[agent]\n", &format!("[agent]\n{agent_extra}\n"), 1);
        let cfg = write_config(self.dir.path(), PROT, &text);
        AgentProc::start(PROT, &cfg, &data, &[]).await
    }

    fn image(&self, disk: &DiskDef) -> PathBuf {
        self.path(PROT)
            .join("disks")
            .join(format!("{}.img", disk.name))
    }
}

/// Writes the protected image before the agent first opens it: random 1 MiB chunks
/// where `nonzero(chunk)`, zeros elsewhere. Returns the content.
fn fill_image(path: &Path, size: u64, seed: u64, nonzero: impl Fn(u64) -> bool) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for c in 0..size / MIB {
        if nonzero(c) {
            let chunk = &mut content[(c * MIB) as usize..((c + 1) * MIB) as usize];
            rng.fill_bytes(chunk);
            f.write_all_at(chunk, c * MIB).unwrap();
        }
    }
    f.sync_all().unwrap();
    content
}

fn nonzero_bytes(content: &[u8]) -> u64 {
    content
        .chunks(4096)
        .filter(|b| b.iter().any(|&x| x != 0))
        .map(|b| b.len() as u64)
        .sum()
}

fn disk(s: &AgentStatus) -> &ProtectedDiskStatus {
    &s.protected[0]
}

/// The disk's sync completed `n` times and nothing is owed.
async fn wait_synced(prot: &AgentProc, rec: &AgentProc, n: u64) -> AgentStatus {
    prot.wait_status(&format!("sync #{n} completed"), &[rec], |s| {
        let d = disk(s);
        d.sync.completed >= n && d.sync.phase == SyncPhase::Idle && !d.owes_sync
    })
    .await
}

/// Waits until the running sync has done at least `percent` %.
async fn wait_progress(prot: &AgentProc, rec: &AgentProc, kind: SyncKind, percent: u8) {
    prot.wait_status(&format!("{kind:?} sync at {percent} %"), &[rec], |s| {
        disk(s)
            .sync
            .running
            .as_ref()
            .is_some_and(|r| r.kind == kind && r.percent >= percent)
    })
    .await;
}

/// The recovery agent's list of a disk's checkpoints with their recoverability.
async fn received_checkpoints(rec: &AgentProc, id: u64) -> Vec<ReceivedCheckpoint> {
    let admin = rec.endpoints.admin.clone().unwrap();
    let r = reqwest::get(format!(
        "http://{admin}/v1/received/{PROT}/{id}/checkpoints"
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

fn journal_bytes(lab: &Lab, d: &DiskDef) -> u64 {
    let j = open_journal(&lab.storage(), d.id, d.size);
    j.stats().bytes_used
}

/// A checkpoint after the sync; a copy of the source at that moment; everything
/// acknowledged; both agents stopped; the journal's view at the checkpoint equals the
/// copy and the recovery side's sync state says the checkpoint is recoverable. Returns
/// the copy.
async fn checkpoint_and_verify(
    lab: &Lab,
    prot: &mut AgentProc,
    rec: &mut AgentProc,
    d: &DiskDef,
) -> Vec<u8> {
    let report = prot
        .checkpoint(&CheckpointRequest {
            group: Some(d.group.clone()),
            tag: Some("after-sync".into()),
            id: None,
        })
        .await;
    assert!(report.disks[0].queued, "{report:?}");
    let copy = copy_export(&prot.nbd_url(&d.name), &lab.path("copy.img")).await;
    let st = prot
        .wait_status("everything acknowledged", &[rec], |s| {
            let d = disk(s);
            d.acked_seq == d.last_seq && d.queued_records == 0
        })
        .await;
    let last = disk(&st).last_seq;
    rec.wait_status("durable at the recovery side", &[prot], |s| {
        s.received
            .iter()
            .any(|r| r.disk_id == d.id && r.durable_seq >= last)
    })
    .await;
    let cps = received_checkpoints(rec, d.id).await;
    let listed = cps
        .iter()
        .find(|c| c.id == report.id)
        .unwrap_or_else(|| panic!("checkpoint {} not listed: {cps:?}", report.id));
    assert!(listed.recoverable, "{listed:?}");
    prot.stop_clean().await;
    rec.stop_clean().await;
    let j = open_journal(&lab.storage(), d.id, d.size);
    let c = j
        .checkpoints()
        .into_iter()
        .find(|c| c.id == report.id)
        .expect("checkpoint in the journal");
    let got = read_view(&j, report.id, d.size);
    assert_same(
        "view at the checkpoint after the sync vs source",
        &got,
        &copy,
    );
    let state: SyncState =
        serde_json::from_slice(&std::fs::read(lab.disk_dir(d.id).join(SYNC_STATE_FILE)).unwrap())
            .unwrap();
    assert!(state.running.is_none(), "{state:?}");
    assert!(
        recoverable(&state, c.seq),
        "checkpoint after the sync not recoverable: {state:?} {c:?}"
    );
    copy
}

// -----------------------------------------------------------------------------------------

/// Initial Sync of a disk that already holds data, while qemu-io writes to it: zero
/// blocks are not sent, the writes land in order, and the view at the next checkpoint is
/// the source. A checkpoint taken during the sync is not recoverable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_under_writes_is_exact_and_skips_zero_blocks() {
    let lab = Lab::new(&[]);
    let d = DiskDef::new("vm1-d0", 11, 128 * MIB);
    let content = fill_image(&lab.image(&d), d.size, 1, |c| c % 4 == 1);
    let nonzero = nonzero_bytes(&content);
    let mut rec = lab.recovery(0).await;
    let mut prot = lab
        .protected(&d, rec.data_addr(), "sync_rate_limit = \"24 MiB\"", "")
        .await;
    wait_progress(&prot, &rec, SyncKind::Initial, 5).await;
    let during = prot
        .checkpoint(&CheckpointRequest {
            group: Some(d.group.clone()),
            tag: Some("during".into()),
            id: None,
        })
        .await;
    let mut w = Workload::without_model(7);
    let o = qemu_io(
        &prot.nbd_url(&d.name),
        "writeback",
        &w.commands(120, 0, d.size),
        Duration::from_secs(60),
    )
    .await;
    assert_qemu_ok(&o);
    let st = prot.status().await;
    assert!(
        disk(&st).sync.running.is_some(),
        "the writes ran during the sync (raise the data or lower the rate): {:#?}",
        disk(&st).sync
    );
    let st = wait_synced(&prot, &rec, 1).await;
    let last = disk(&st).sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Initial);
    assert_eq!(last.result, "completed");
    assert!(
        last.data_bytes <= nonzero + 64 * MIB,
        "Initial sent {} bytes for {nonzero} non-zero bytes",
        last.data_bytes
    );
    assert!(
        last.data_bytes < d.size / 2,
        "zero blocks were sent: {} bytes",
        last.data_bytes
    );
    let cps = received_checkpoints(&rec, d.id).await;
    let c = cps.iter().find(|c| c.id == during.id).unwrap();
    assert!(!c.recoverable, "taken during the Initial Sync: {c:?}");
    let events = std::fs::read_to_string(lab.path(PROT).join("state/sync-events.jsonl")).unwrap();
    assert!(events.contains("\"sync_started\"") && events.contains("\"sync_ended\""));
    checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
    let state: SyncState =
        serde_json::from_slice(&std::fs::read(lab.disk_dir(d.id).join(SYNC_STATE_FILE)).unwrap())
            .unwrap();
    let j = open_journal(&lab.storage(), d.id, d.size);
    let c = j
        .checkpoints()
        .into_iter()
        .find(|c| c.id == during.id)
        .unwrap();
    assert!(
        !recoverable(&state, c.seq),
        "a checkpoint taken during an Initial Sync must not be recoverable"
    );
}

/// kill -9 of the protected agent in the middle of an Initial Sync: the restart resumes
/// from the persisted bitmap, not from zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_kill9_mid_initial_resumes() {
    let lab = Lab::new(&[]);
    let d = DiskDef::new("vm2-d0", 21, 160 * MIB);
    let content = fill_image(&lab.image(&d), d.size, 2, |c| c % 5 != 0);
    let nonzero = nonzero_bytes(&content);
    let mut rec = lab.recovery(free_port()).await;
    let mut prot = lab
        .protected(&d, rec.data_addr(), "sync_rate_limit = \"48 MiB\"", "")
        .await;
    let pct = rand::rng().random_range(30..70);
    wait_progress(&prot, &rec, SyncKind::Initial, pct).await;
    prot.kill9().await;
    prot.spawn().await;
    let st = wait_synced(&prot, &rec, 1).await;
    let last = disk(&st).sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Initial, "{last:?}");
    let journal = {
        prot.stop_clean().await;
        rec.stop_clean().await;
        let b = journal_bytes(&lab, &d);
        prot.spawn().await;
        rec.spawn().await;
        b
    };
    assert!(
        (journal as f64) < 1.2 * nonzero as f64,
        "resumed Initial: journal holds {journal} bytes for {nonzero} bytes of data"
    );
    let copy = checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
    assert_same("source unchanged", &copy, &content);
}

/// kill -9 of the recovery agent in the middle of an Initial Sync: the stream resends
/// what was not durable, the sync resumes from its cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_kill9_mid_initial_resumes() {
    let lab = Lab::new(&[]);
    let d = DiskDef::new("vm3-d0", 31, 160 * MIB);
    let content = fill_image(&lab.image(&d), d.size, 3, |c| c % 3 != 0);
    let nonzero = nonzero_bytes(&content);
    let port = free_port();
    let mut rec = lab.recovery(port).await;
    let mut prot = lab
        .protected(&d, rec.data_addr(), "sync_rate_limit = \"48 MiB\"", "")
        .await;
    let pct = rand::rng().random_range(30..70);
    wait_progress(&prot, &rec, SyncKind::Initial, pct).await;
    rec.kill9().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    rec.spawn().await;
    let st = wait_synced(&prot, &rec, 1).await;
    let last = disk(&st).sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Initial, "{last:?}");
    assert!(
        (last.data_bytes as f64) < 1.2 * nonzero as f64,
        "resumed Initial queued {} bytes for {nonzero}",
        last.data_bytes
    );
    let copy = checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
    assert_same("source unchanged", &copy, &content);
    let journal = journal_bytes(&lab, &d);
    assert!(
        (journal as f64) < 1.2 * nonzero as f64,
        "journal holds {journal} bytes for {nonzero} bytes of data"
    );
}

/// Synced, then the recovery agent away while qemu-io writes through a 1 MiB outbound
/// queue with no spill: the disk goes bitmap-only. Returns the dirty bytes and the
/// journal's size then; the recovery agent is stopped.
async fn outage(
    lab: &Lab,
    d: &DiskDef,
    prot: &AgentProc,
    rec: &mut AgentProc,
    seed: u64,
) -> (u64, u64) {
    wait_synced(prot, rec, 1).await;
    rec.stop_clean().await;
    let mut w = Workload::without_model(seed);
    for _ in 0..3 {
        let o = qemu_io(
            &prot.nbd_url(&d.name),
            "writeback",
            &w.commands(60, 0, d.size),
            Duration::from_secs(60),
        )
        .await;
        assert_qemu_ok(&o);
    }
    let st = prot
        .wait_status("bitmap-only", &[], |s| {
            disk(s).mode == bulwark::proto::agent::ReplicationMode::BitmapOnly
        })
        .await;
    let dirty_bytes = disk(&st).dirty_regions * disk(&st).region_size;
    (dirty_bytes, journal_bytes(lab, d))
}

const OUTAGE_PEER: &str = "queue_memory = \"1 MiB\"\nspill_limit = 0";

/// After an outage a Bitmap Sync sends the dirty regions; one side is killed (-9) in its
/// middle and restarted; the sync ends with the journal grown by less than 1.2 × the
/// dirty bytes and the view at the next checkpoint equal to the source. Returns the kind
/// of the sync that finished.
async fn bitmap_after_outage_with_kill9(name: &str, id: u64, kill_protected: bool) -> SyncKind {
    let lab = Lab::new(&[]);
    let d = DiskDef::new(name, id, 96 * MIB);
    let mut rec = lab.recovery(free_port()).await;
    let mut prot = lab
        .protected(
            &d,
            rec.data_addr(),
            "sync_rate_limit = \"16 MiB\"",
            OUTAGE_PEER,
        )
        .await;
    let (dirty_bytes, before) = outage(&lab, &d, &prot, &mut rec, id).await;
    rec.spawn().await;
    let pct = rand::rng().random_range(20..70);
    wait_progress(&prot, &rec, SyncKind::Bitmap, pct).await;
    // The protected side counts syncs per process: after its restart the next is #1.
    let n = if kill_protected {
        prot.kill9().await;
        prot.spawn().await;
        1
    } else {
        rec.kill9().await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        rec.spawn().await;
        2
    };
    let st = wait_synced(&prot, &rec, n).await;
    let last = disk(&st).sync.last.clone().unwrap();
    prot.stop_clean().await;
    rec.stop_clean().await;
    let added = journal_bytes(&lab, &d) - before;
    assert!(
        (added as f64) < 1.2 * dirty_bytes as f64,
        "{last:?}: the syncs added {added} journal bytes for {dirty_bytes} dirty bytes"
    );
    prot.spawn().await;
    rec.spawn().await;
    checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
    last.kind
}

/// kill -9 of the protected agent: the restart (unclean) finishes with a Delta Sync over
/// the bitmap and the activity log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_sync_after_an_outage_survives_a_protected_kill9() {
    let kind = bitmap_after_outage_with_kill9("vm4-d0", 41, true).await;
    assert_eq!(kind, SyncKind::Delta, "unclean restart → Delta");
}

/// kill -9 of the recovery agent: the Bitmap Sync resumes at its cursor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitmap_sync_after_an_outage_survives_a_recovery_kill9() {
    let kind = bitmap_after_outage_with_kill9("vm10-d0", 101, false).await;
    assert_eq!(kind, SyncKind::Bitmap);
}

/// A Force Sync (Delta over the whole disk) of an equal replica sends no block; an
/// operator's Full Sync with kill -9 of the recovery agent in its middle ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn force_and_full_syncs_survive_kill9_of_either_side() {
    let lab = Lab::new(&[]);
    let d = DiskDef::new("vm5-d0", 51, 96 * MIB);
    let content = fill_image(&lab.image(&d), d.size, 5, |c| c % 2 == 0);
    let port = free_port();
    let mut rec = lab.recovery(port).await;
    let mut prot = lab
        .protected(&d, rec.data_addr(), "sync_rate_limit = \"32 MiB\"", "")
        .await;
    wait_synced(&prot, &rec, 1).await;
    let http = reqwest::Client::new();
    let admin = prot.endpoints.admin.clone().unwrap();
    let post = |action: SyncAction, admin: String| {
        let http = http.clone();
        async move {
            let r = http
                .post(format!("http://{admin}/v1/disks/vm5-d0/sync"))
                .json(&serde_json::json!({ "action": action }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
        }
    };
    // Force Sync: a Delta of the whole disk; nothing differs, so only digests cross.
    post(SyncAction::Force, admin.clone()).await;
    let st = wait_synced(&prot, &rec, 2).await;
    let last = disk(&st).sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Delta, "{last:?}");
    assert_eq!(
        last.blocks_sent, 0,
        "an equal replica: no block differs: {last:?}"
    );
    assert_eq!(last.blocks_compared, d.size / 4096, "{last:?}");
    // Full, recovery agent killed half-way.
    post(SyncAction::Full, admin).await;
    wait_progress(&prot, &rec, SyncKind::Full, 30).await;
    rec.kill9().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    rec.spawn().await;
    let st = wait_synced(&prot, &rec, 3).await;
    let last = disk(&st).sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Full, "{last:?}");
    assert!(
        (last.data_bytes as f64) < 1.2 * nonzero_bytes(&content) as f64,
        "{last:?}"
    );
    let copy = checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
    assert_same("source unchanged", &copy, &content);
}

/// A copy of the disk already at the recovery site (restored backup) is registered; the
/// first sync is a Delta that sends only the blocks that differ.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preseeded_replica_is_brought_level_by_a_delta() {
    let lab = Lab::new(&[]);
    let d = DiskDef::new("vm6-d0", 61, 64 * MIB);
    let content = fill_image(&lab.image(&d), d.size, 6, |_| true);
    // The seed: the same disk with 1 % of its 4 KiB blocks changed.
    let mut seed = content.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(66);
    let blocks = d.size / 4096;
    let mut changed = std::collections::BTreeSet::new();
    while changed.len() < (blocks / 100) as usize {
        changed.insert(rng.random_range(0..blocks));
    }
    for b in &changed {
        seed[(*b * 4096) as usize] ^= 0xff;
    }
    let seed_path = lab.path("seed.img");
    std::fs::write(&seed_path, &seed).unwrap();
    let wrong = lab.path("wrong.img");
    std::fs::write(&wrong, vec![0u8; 4096]).unwrap();
    let e = bulwark::agent::stream::preseed(&lab.storage(), d.id, &wrong, d.size).unwrap_err();
    assert!(e.to_string().contains("size"), "{e}");
    // Registered the way an operator does it.
    let cfg = lab.recovery_config(0);
    let o = run(
        env!("CARGO_BIN_EXE_bulwark"),
        &[
            "--config".into(),
            cfg.display().to_string(),
            "agent".into(),
            "preseed".into(),
            "--from-host".into(),
            PROT.into(),
            "--disk-id".into(),
            d.id.to_string(),
            seed_path.display().to_string(),
        ],
        Duration::from_secs(30),
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let mut rec = lab.recovery(0).await;
    let mut prot = lab.protected(&d, rec.data_addr(), "", "").await;
    let st = wait_synced(&prot, &rec, 1).await;
    let last = disk(&st).sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Delta, "{last:?}");
    assert_eq!(last.blocks_sent, changed.len() as u64, "{last:?}");
    assert_eq!(last.data_bytes, changed.len() as u64 * 4096, "{last:?}");
    assert!(
        last.wire_bytes < 4 * last.data_bytes + (1 << 20),
        "hash exchange too large: {last:?}"
    );
    let copy = checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
    assert_same("source unchanged", &copy, &content);
}

/// The protected disk grew while its replica did not: the sync is refused before
/// anything is sent, with both sizes in the reason; the journal is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_mismatch_is_refused_before_anything_is_sent() {
    let lab = Lab::new(&[]);
    let small = DiskDef::new("vm7-d0", 71, 8 * MIB);
    fill_image(&lab.image(&small), small.size, 7, |_| true);
    let port = free_port();
    let mut rec = lab.recovery(port).await;
    let mut prot = lab.protected(&small, rec.data_addr(), "", "").await;
    wait_synced(&prot, &rec, 1).await;
    prot.stop_clean().await;
    rec.stop_clean().await;
    let before = {
        let j = open_journal(&lab.storage(), small.id, small.size);
        (j.last_seq(), j.stats().bytes_used)
    };
    let replica_before = std::fs::read(lab.disk_dir(small.id).join("replica.img")).unwrap();
    // The operator replaced the disk by a bigger one with the same id.
    let big = DiskDef::new("vm7-d0", 71, 16 * MIB);
    std::fs::remove_file(lab.image(&small)).unwrap();
    std::fs::remove_dir_all(lab.path(PROT).join("dirty")).unwrap();
    fill_image(&lab.image(&big), big.size, 8, |_| true);
    rec.spawn().await;
    let prot2 = lab.protected(&big, rec.data_addr(), "", "").await;
    let st = prot2
        .wait_status("size mismatch reported", &[&rec], |s| {
            disk(s).sync.phase == SyncPhase::Failed
        })
        .await;
    let detail = disk(&st).sync.detail.clone().unwrap();
    assert!(
        detail.contains("size mismatch")
            && detail.contains(&big.size.to_string())
            && detail.contains(&small.size.to_string()),
        "{detail}"
    );
    drop(prot2);
    drop(prot);
    rec.stop_clean().await;
    let j = open_journal(&lab.storage(), small.id, small.size);
    assert_eq!((j.last_seq(), j.stats().bytes_used), before);
    assert_eq!(
        std::fs::read(lab.disk_dir(small.id).join("replica.img")).unwrap(),
        replica_before
    );
}

/// A pre-seeded replica a quarter of whose blocks differ; the protected agent stops in
/// the middle of the Delta Sync (kill -9, or a clean stop); the restart goes on
/// comparing what the bitmap still owes — a Delta again, not a Bitmap Sync of whole
/// regions — and the journal receives less than 1.2× the differing data.
async fn delta_interrupted_by_a_protected_stop(name: &str, id: u64, kill: bool) {
    let lab = Lab::new(&[]);
    let d = DiskDef::new(name, id, 64 * MIB);
    let content = fill_image(&lab.image(&d), d.size, id, |_| true);
    let mut seed = content.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(id ^ 0x88);
    let mut differing = 0u64;
    for b in 0..d.size / 4096 {
        if rng.random_bool(0.25) {
            seed[(b * 4096 + 100) as usize] ^= 0x5a;
            differing += 4096;
        }
    }
    let seed_path = lab.path("seed.img");
    std::fs::write(&seed_path, &seed).unwrap();
    bulwark::agent::stream::preseed(&lab.storage(), d.id, &seed_path, d.size).unwrap();
    let mut rec = lab.recovery(free_port()).await;
    let mut prot = lab
        .protected(&d, rec.data_addr(), "sync_rate_limit = \"4 MiB\"", "")
        .await;
    let pct = rand::rng().random_range(20..60);
    wait_progress(&prot, &rec, SyncKind::Delta, pct).await;
    if kill {
        prot.kill9().await;
    } else {
        prot.stop_clean().await;
    }
    prot.spawn().await;
    let st = wait_synced(&prot, &rec, 1).await;
    let last = disk(&st).sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Delta, "{last:?}");
    prot.stop_clean().await;
    rec.stop_clean().await;
    let journal = journal_bytes(&lab, &d);
    assert!(
        (journal as f64) < 1.2 * differing as f64,
        "Delta interrupted and resumed: journal holds {journal} bytes for {differing} differing bytes"
    );
    prot.spawn().await;
    rec.spawn().await;
    let copy = checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
    assert_same("source unchanged", &copy, &content);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_sync_survives_a_protected_kill9() {
    delta_interrupted_by_a_protected_stop("vm8-d0", 81, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_sync_resumes_as_a_delta_after_a_clean_stop() {
    delta_interrupted_by_a_protected_stop("vm13-d0", 131, false).await;
}

/// A pre-seeded Delta and then an operator's Full Sync, each with qemu-io writing to the
/// disk meanwhile and the recovery agent killed (-9) in its middle: each ends with the
/// view at the next checkpoint equal to the source at that moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_and_full_under_writes_survive_a_recovery_kill9() {
    let lab = Lab::new(&[]);
    let d = DiskDef::new("vm9-d0", 91, 48 * MIB);
    let content = fill_image(&lab.image(&d), d.size, 9, |c| c % 3 != 2);
    let mut seed = content.clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    for b in 0..d.size / 4096 {
        if rng.random_bool(0.3) {
            seed[(b * 4096) as usize] ^= 0x11;
        }
    }
    let seed_path = lab.path("seed.img");
    std::fs::write(&seed_path, &seed).unwrap();
    bulwark::agent::stream::preseed(&lab.storage(), d.id, &seed_path, d.size).unwrap();
    let mut rec = lab.recovery(free_port()).await;
    let mut prot = lab
        .protected(&d, rec.data_addr(), "sync_rate_limit = \"6 MiB\"", "")
        .await;
    let mut w = Workload::without_model(19);
    for (kind, n) in [(SyncKind::Delta, 1u64), (SyncKind::Full, 2)] {
        if kind == SyncKind::Full {
            let admin = prot.endpoints.admin.clone().unwrap();
            let r = reqwest::Client::new()
                .post(format!("http://{admin}/v1/disks/{}/sync", d.name))
                .json(&serde_json::json!({ "action": "full" }))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
        }
        wait_progress(&prot, &rec, kind, 5).await;
        let url = prot.nbd_url(&d.name);
        let cmds = w.commands(80, 0, d.size);
        let writes = async {
            let o = qemu_io(&url, "writeback", &cmds, Duration::from_secs(60)).await;
            assert_qemu_ok(&o);
        };
        let kill = async {
            let pct = rand::rng().random_range(20..60);
            wait_progress(&prot, &rec, kind, pct).await;
            rec.kill9().await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            rec.spawn().await;
        };
        tokio::join!(writes, kill);
        let st = wait_synced(&prot, &rec, n).await;
        let last = disk(&st).sync.last.clone().unwrap();
        assert_eq!(last.kind, kind, "{last:?}");
    }
    checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
}

/// kill -9 of the protected agent in the middle of an Initial Sync, and its dirty
/// tracking lost with it: the recovery side still reports the Initial running, but
/// nothing says what was sent, so the restart copies everything again (not "resume"
/// over an empty bitmap) and ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_restarts_whole_when_the_tracking_was_lost() {
    let lab = Lab::new(&[]);
    let d = DiskDef::new("vm11-d0", 111, 64 * MIB);
    let content = fill_image(&lab.image(&d), d.size, 11, |c| c % 2 == 0);
    let nonzero = nonzero_bytes(&content);
    let mut rec = lab.recovery(free_port()).await;
    let mut prot = lab
        .protected(&d, rec.data_addr(), "sync_rate_limit = \"16 MiB\"", "")
        .await;
    wait_progress(&prot, &rec, SyncKind::Initial, 30).await;
    prot.kill9().await;
    std::fs::remove_dir_all(lab.path(PROT).join("dirty")).unwrap();
    prot.spawn().await;
    let st = wait_synced(&prot, &rec, 1).await;
    let d0 = disk(&st);
    assert_eq!(d0.start_state, bulwark::proto::agent::StartState::New);
    let last = d0.sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Initial, "{last:?}");
    assert_eq!(
        last.data_bytes, nonzero,
        "everything non-zero sent again: {last:?}"
    );
    let copy = checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
    assert_same("source unchanged", &copy, &content);
}

/// An Initial Sync's data all goes through the stream, so its session carries nothing
/// for seconds: keepalives hold it open past the recovery agent's peer timeout (2 s
/// here), and the sync runs once, uninterrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_pass_keeps_its_session_alive() {
    let lab = Lab::new(&[]);
    let d = DiskDef::new("vm12-d0", 121, 64 * MIB);
    let content = fill_image(&lab.image(&d), d.size, 12, |c| c % 2 == 1);
    let cfg = lab.recovery_config_with(0, "peer_timeout_secs = 2");
    let mut rec = AgentProc::start(REC, &cfg, &lab.path("rec"), &[]).await;
    let mut prot = lab
        .protected(&d, rec.data_addr(), "sync_rate_limit = \"8 MiB\"", "")
        .await;
    let st = wait_synced(&prot, &rec, 1).await;
    let last = disk(&st).sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Initial);
    assert!(
        last.duration_ms > 3000,
        "the pass must outlast the timeout: {last:?}"
    );
    let events = std::fs::read_to_string(lab.path(PROT).join("state/sync-events.jsonl")).unwrap();
    assert_eq!(
        events.matches("\"sync_started\"").count(),
        1,
        "the sync was interrupted and restarted:\n{events}"
    );
    let copy = checkpoint_and_verify(&lab, &mut prot, &mut rec, &d).await;
    assert_same("source unchanged", &copy, &content);
}
