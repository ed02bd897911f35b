//! Recovery on the agent side, in process: a protected agent streams to a recovery
//! agent on loopback; recoveries (test, live), their NBD exports read and written with
//! qemu-img / qemu-io, discard, scratch budget, commit, planned-failover locks and
//! fencing. Run with `cargo test --test recovery_agent`.
#![allow(clippy::unwrap_used)]

mod agent_common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::*;
use bulwark::agent::host::admin;
use bulwark::agent::host::{Agent, AgentConfig, AgentFlags, AgentSection};
use bulwark::agent::hypervisor::{start_agent, HostVms};
use bulwark::agent::recovery::RecoverRequest;
use bulwark::proto::agent::{CheckpointRequest, SyncPhase};
use bulwark::proto::control::{
    DesiredState, PowerState, RecoverDisk, RecoverVm, RecoveryEnd, RecoveryVpg, RecoveryVpgVm,
};

const SIZE: u64 = 4 * MIB;
const DISK: &str = "d0";
const VPG: &str = "vpg1";
const WAIT: Duration = Duration::from_secs(30);

fn config(data_dir: &Path, toml_text: &str) -> AgentConfig {
    let file: toml::Value = toml::from_str(toml_text).unwrap();
    let section: AgentSection = file.get("agent").unwrap().clone().try_into().unwrap();
    AgentConfig::resolve(
        &section,
        AgentFlags {
            data_dir: Some(data_dir.to_path_buf()),
            insecure: true,
            ..AgentFlags::default()
        },
    )
    .unwrap()
}

struct Pair {
    _lab: Lab,
    rec_cfg: AgentConfig,
    prot_cfg: AgentConfig,
    rec: Arc<Agent>,
    rec_vms: Arc<HostVms>,
    prot: Arc<Agent>,
    prot_vms: Arc<HostVms>,
}

async fn pair() -> Pair {
    pair_with(None).await
}

/// With `desired` persisted at the recovery agent before it starts (what a manager
/// would have sent).
async fn pair_with(desired: Option<DesiredState>) -> Pair {
    let lab = Lab::new(&[]);
    let rec_dir = lab.path("rec");
    let prot_dir = lab.path("prot");
    let storage = lab.path("journals");
    let port = free_port();
    let data: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let rec_cfg = config(
        &rec_dir,
        &recovery_toml(&rec_dir, REC, data, &Sec::Flag, &[(PROT, &storage)]),
    );
    if let Some(d) = desired {
        let state = rec_cfg.state_dir();
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(state.join("desired.json"), serde_json::to_vec(&d).unwrap()).unwrap();
    }
    let (rec, hv) = start_agent(rec_cfg.clone()).await.unwrap();
    let rec_vms = Arc::new(HostVms::new(hv, Arc::clone(&rec)));
    let peer = PeerDef {
        host: REC.into(),
        address: data,
        extra: String::new(),
    };
    let prot_cfg = config(
        &prot_dir,
        &protected_toml(
            &prot_dir,
            PROT,
            &Sec::Flag,
            &[DiskDef::new(DISK, 1, SIZE)],
            Some(&peer),
        ),
    );
    let (prot, hv) = start_agent(prot_cfg.clone()).await.unwrap();
    let prot_vms = Arc::new(HostVms::new(hv, Arc::clone(&prot)));
    // The initial sync first: checkpoints taken during it are not recoverable.
    let deadline = Instant::now() + WAIT;
    loop {
        let s = prot.status();
        let d = &s.protected[0];
        if d.sync.completed >= 1 && d.sync.phase == SyncPhase::Idle && !d.owes_sync {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "initial sync never completed: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Pair {
        _lab: lab,
        rec_cfg,
        prot_cfg,
        rec,
        rec_vms,
        prot,
        prot_vms,
    }
}

fn url(agent: &Agent, export: &str) -> String {
    format!("nbd://{}/{export}", agent.endpoints().nbd)
}

async fn qemu_write(agent: &Agent, export: &str, cmds: &[&str]) -> std::process::Output {
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    qemu_io(&url(agent, export), "none", &cmds, WAIT).await
}

/// Takes a checkpoint on the protected agent and waits until it is recoverable at the
/// recovery agent.
async fn checkpoint(p: &Pair) -> u64 {
    let rep = p.prot.checkpoint(&CheckpointRequest::default()).unwrap();
    let id = rep.id;
    let deadline = Instant::now() + WAIT;
    loop {
        let a = Arc::clone(&p.rec);
        let ok = tokio::task::spawn_blocking(move || {
            a.received_checkpoints(PROT, 1)
                .is_some_and(|c| c.iter().any(|c| c.id == id && c.recoverable))
        })
        .await
        .unwrap();
        if ok {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "checkpoint {id} never became recoverable"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn request(op: &str, checkpoint: u64, test: bool, budget: Option<u64>) -> RecoverRequest {
    RecoverRequest {
        operation: op.into(),
        vpg_id: VPG.into(),
        fencing_generation: 0,
        checkpoint,
        test,
        scratch_budget_bytes: budget,
        vms: vec![RecoverVm {
            name: if test {
                format!("{DISK} - Test")
            } else {
                DISK.into()
            },
            source_vm: DISK.into(),
            cpus: 1,
            memory_mib: 512,
            network: None,
            ip_address: None,
            disks: vec![RecoverDisk {
                host: PROT.into(),
                disk_id: 1,
                name: DISK.into(),
            }],
            boot: None,
        }],
    }
}

/// What a manager would have sent the recovery host: VPG "web" with the one VM, its
/// journal kept `history_secs` (0: never promoted).
fn managed_desired(history_secs: u64) -> DesiredState {
    let vm = request("unused", 0, false, None).vms.remove(0);
    DesiredState {
        version: 1,
        accept: vec![PROT.into()],
        recovery: vec![RecoveryVpg {
            vpg_id: VPG.into(),
            name: "web".into(),
            fencing_generation: 0,
            journal_history_secs: history_secs,
            journal_hard_limit_bytes_per_disk: 0,
            journal_warning_bytes_per_disk: 0,
            vms: vec![RecoveryVpgVm {
                vm,
                boot_group: 0,
                boot_delay_secs: 0,
            }],
        }],
        ..DesiredState::default()
    }
}

async fn shutdown(p: Pair) {
    p.prot.shutdown().await.unwrap();
    p.rec.shutdown().await.unwrap();
}

/// (a) a test recovery reads the disk as of the checkpoint; (b) guest writes land in the
/// scratch only, a discard leaves the journal as it was and replication goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn test_recovery_reads_the_checkpoint_and_discard_leaves_the_journal() {
    let p = pair().await;
    assert_qemu_ok(
        &qemu_write(
            &p.prot,
            DISK,
            &["write -P 0x11 0 1M", "write -P 0x22 3M 512k"],
        )
        .await,
    );
    let c1 = checkpoint(&p).await;
    let dir = p._lab.path("out");
    std::fs::create_dir_all(&dir).unwrap();
    let expected = copy_export(&url(&p.prot, DISK), &dir.join("src.raw")).await;
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x33 0 256k"]).await);

    let recs = p.rec_vms.recoveries();
    let report = recs
        .recover(request("op-test-1", c1, true, None))
        .await
        .unwrap();
    assert_eq!(report.checkpoint, c1);
    let vm = &report.vms[0];
    assert_eq!(vm.name, "d0 - Test");
    assert_eq!(vm.power_state, PowerState::Off);
    let export = vm.disks[0].export.clone();
    assert_eq!(vm.disks[0].size_bytes, SIZE);
    // The same operation again answers the same recovery.
    let again = recs
        .recover(request("op-test-1", c1, true, None))
        .await
        .unwrap();
    assert_eq!(again.vms[0].disks[0].export, export);
    // Exports are served only while the VM runs.
    assert!(!p.rec.registry().contains(&export));
    p.rec_vms
        .set_power("d0 - Test", PowerState::On)
        .await
        .unwrap();
    let got = copy_export(&url(&p.rec, &export), &dir.join("rec1.raw")).await;
    assert!(
        got == expected,
        "recovered disk differs from the source at the checkpoint"
    );

    // Guest writes go to the scratch layer.
    assert_qemu_ok(&qemu_write(&p.rec, &export, &["write -P 0x5a 0 64k"]).await);
    assert_qemu_ok(&qemu_write(&p.rec, &export, &["read -P 0x5a 0 64k"]).await);
    let hb = recs.reports();
    assert_eq!(hb.len(), 1);
    assert_eq!(hb[0].scratch_bytes, 64 * KIB);

    let out = recs
        .end("op-test-1", VPG, 0, RecoveryEnd::Discard)
        .await
        .unwrap();
    assert_eq!(out["known"], true);
    assert!(!p.rec.registry().contains(&export));
    assert!(!p
        .rec_vms
        .inventory()
        .vms
        .iter()
        .any(|v| v.name == "d0 - Test"));
    assert!(recs.reports().is_empty());
    let unknown = recs
        .end("op-test-1", VPG, 0, RecoveryEnd::Discard)
        .await
        .unwrap();
    assert_eq!(unknown["known"], false);

    // A new recovery at the same checkpoint reads the original bytes.
    let r2 = recs
        .recover(request("op-test-2", c1, true, None))
        .await
        .unwrap();
    let export2 = r2.vms[0].disks[0].export.clone();
    p.rec_vms
        .set_power("d0 - Test", PowerState::On)
        .await
        .unwrap();
    let got = copy_export(&url(&p.rec, &export2), &dir.join("rec2.raw")).await;
    assert!(
        got == expected,
        "the discarded scratch writes are visible again"
    );
    // Replication goes on while the test runs.
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x44 2M 64k"]).await);
    let c2 = checkpoint(&p).await;
    assert!(c2 > c1);
    recs.end("op-test-2", VPG, 0, RecoveryEnd::Discard)
        .await
        .unwrap();
    shutdown(p).await;
}

/// (c) past the scratch budget guest writes fail with ENOSPC; replication continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scratch_budget_refuses_writes_and_replication_continues() {
    let p = pair().await;
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x11 0 1M"]).await);
    let c1 = checkpoint(&p).await;
    let recs = p.rec_vms.recoveries();
    let r = recs
        .recover(request("op-budget", c1, true, Some(128 * KIB)))
        .await
        .unwrap();
    let export = r.vms[0].disks[0].export.clone();
    p.rec_vms
        .set_power("d0 - Test", PowerState::On)
        .await
        .unwrap();
    assert_qemu_ok(&qemu_write(&p.rec, &export, &["write -P 0x5a 0 64k"]).await);
    // Rewriting the same range fits.
    assert_qemu_ok(&qemu_write(&p.rec, &export, &["write -P 0x5b 0 64k"]).await);
    let o = qemu_write(&p.rec, &export, &["write -P 0x5c 1M 128k"]).await;
    let t = text(&o);
    assert!(t.contains("No space left on device"), "{t}");
    let rep = &recs.reports()[0];
    assert!(rep.scratch_full, "{rep:?}");
    assert_eq!(rep.scratch_budget_bytes, Some(128 * KIB));
    assert!(rep.scratch_bytes <= 128 * KIB);
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x44 2M 64k"]).await);
    let c2 = checkpoint(&p).await;
    assert!(c2 > c1);
    recs.end("op-budget", VPG, 0, RecoveryEnd::Discard)
        .await
        .unwrap();
    shutdown(p).await;
}

/// (d) a live recovery committed after protection stopped: the VM runs on a local disk
/// holding the checkpoint plus the scratch writes; (f) a stale generation is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_makes_the_recovered_vm_a_local_vm() {
    let p = pair().await;
    assert_qemu_ok(
        &qemu_write(
            &p.prot,
            DISK,
            &["write -P 0x11 0 1M", "write -P 0x22 3M 512k"],
        )
        .await,
    );
    let c1 = checkpoint(&p).await;
    let dir = p._lab.path("out");
    std::fs::create_dir_all(&dir).unwrap();
    let mut expected = copy_export(&url(&p.prot, DISK), &dir.join("src.raw")).await;
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x33 0 256k"]).await);
    let _ = checkpoint(&p).await;

    let recs = p.rec_vms.recoveries();
    let r = recs
        .recover(request("op-live", c1, false, None))
        .await
        .unwrap();
    let export = r.vms[0].disks[0].export.clone();
    assert_eq!(export, "d0.d0");
    p.rec_vms.set_power(DISK, PowerState::On).await.unwrap();
    assert_qemu_ok(&qemu_write(&p.rec, &export, &["write -P 0x5a 512k 64k"]).await);
    expected[512 * 1024..576 * 1024].fill(0x5a);

    // Protection still streams: refused.
    let e = recs
        .end("op-live", VPG, 0, RecoveryEnd::Commit)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("stop protection first"), "{e}");
    // Protection stops (the protected host is gone).
    p.prot.shutdown().await.unwrap();
    let deadline = Instant::now() + WAIT;
    while p.rec.receiver().unwrap().is_busy(PROT, 1) {
        assert!(Instant::now() < deadline, "stream never ended");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let out = recs
        .end("op-live", VPG, 0, RecoveryEnd::Commit)
        .await
        .unwrap();
    assert_eq!(out["known"], true, "{out}");
    let disk_id = out["vms"][0]["disks"][0]["disk_id"].as_u64().unwrap();
    assert!(recs.reports().is_empty());
    let vm = p
        .rec_vms
        .inventory()
        .vms
        .into_iter()
        .find(|v| v.name == DISK)
        .unwrap();
    assert_eq!(vm.disks[0].disk_id, disk_id);
    assert_eq!(vm.power_state, PowerState::On);
    let local = p.rec_cfg.data_dir.join("disks").join("d0.d0.img");
    assert!(local.exists());
    let got = copy_export(&url(&p.rec, &export), &dir.join("committed.raw")).await;
    assert!(
        got == expected,
        "committed disk differs from checkpoint + scratch"
    );
    assert!(p.rec.receiver().unwrap().journal_keys().is_empty());
    // Power off / on like any local VM.
    p.rec_vms.set_power(DISK, PowerState::Off).await.unwrap();
    assert!(!p.rec.registry().contains(&export));
    p.rec_vms.set_power(DISK, PowerState::On).await.unwrap();
    assert!(p.rec.registry().contains(&export));
    // (f) Once a newer generation is known, an older one is refused.
    let mut newer = request("op-new", c1, true, None);
    newer.fencing_generation = 5;
    let e = recs.recover(newer).await.unwrap_err().to_string();
    assert!(e.contains("no replica"), "{e}");
    let e = recs
        .end("op-old", VPG, 3, RecoveryEnd::Discard)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("fenced"), "{e}");
    p.rec.shutdown().await.unwrap();
}

/// (e) PrepareFailover powers off and locks; the lock survives a restart;
/// ReleaseFailover unlocks and powers on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prepare_failover_locks_across_a_restart_and_release_powers_on() {
    let p = pair().await;
    let recs = p.prot_vms.recoveries();
    let vms = recs
        .prepare_failover(VPG, 0, &[DISK.to_string()])
        .await
        .unwrap();
    assert_eq!(vms[0].power_state, PowerState::Off);
    assert!(vms[0].prepared_for_failover);
    assert!(!p.prot.registry().contains(DISK));
    let e = p
        .prot_vms
        .set_power(DISK, PowerState::On)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("prepared for planned failover"), "{e}");
    // Idempotent.
    recs.prepare_failover(VPG, 0, &[DISK.to_string()])
        .await
        .unwrap();

    let Pair {
        _lab,
        prot_cfg,
        prot,
        rec,
        ..
    } = p;
    prot.shutdown().await.unwrap();
    drop(prot);
    let (prot, hv) = start_agent(prot_cfg).await.unwrap();
    let prot_vms = Arc::new(HostVms::new(hv, Arc::clone(&prot)));
    let vm = prot_vms
        .inventory()
        .vms
        .into_iter()
        .find(|v| v.name == DISK)
        .unwrap();
    assert!(vm.prepared_for_failover);
    assert_eq!(vm.power_state, PowerState::Off);
    let e = prot_vms
        .set_power(DISK, PowerState::On)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("prepared for planned failover"), "{e}");
    let vms = prot_vms
        .recoveries()
        .release_failover(VPG, 0, &[DISK.to_string()], true)
        .await
        .unwrap();
    assert_eq!(vms[0].power_state, PowerState::On);
    assert!(!vms[0].prepared_for_failover);
    assert!(prot.registry().contains(DISK));
    assert_qemu_ok(&qemu_write(&prot, DISK, &["write -P 0x11 0 64k"]).await);
    prot.shutdown().await.unwrap();
    rec.shutdown().await.unwrap();
}

/// A recovery survives an agent restart (re-created from its checkpoint) and can still
/// be discarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_recovery_is_recreated_after_a_restart() {
    let p = pair().await;
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x11 0 1M"]).await);
    let c1 = checkpoint(&p).await;
    let dir = p._lab.path("out");
    std::fs::create_dir_all(&dir).unwrap();
    let expected = copy_export(&url(&p.prot, DISK), &dir.join("src.raw")).await;
    let r = p
        .rec_vms
        .recoveries()
        .recover(request("op-restart", c1, true, None))
        .await
        .unwrap();
    let export = r.vms[0].disks[0].export.clone();
    p.rec_vms
        .set_power("d0 - Test", PowerState::On)
        .await
        .unwrap();
    let Pair {
        _lab,
        rec_cfg,
        rec,
        rec_vms,
        prot,
        ..
    } = p;
    prot.shutdown().await.unwrap();
    drop(rec_vms);
    rec.shutdown().await.unwrap();
    drop(rec);
    let (rec, hv) = start_agent(rec_cfg).await.unwrap();
    let rec_vms = Arc::new(HostVms::new(hv, Arc::clone(&rec)));
    rec_vms.recoveries().restored().await;
    let reps = rec_vms.recoveries().reports();
    assert_eq!(reps.len(), 1);
    assert_eq!(reps[0].vms[0].power_state, PowerState::On);
    let got = copy_export(&url(&rec, &export), &dir.join("after.raw")).await;
    assert!(got == expected);
    let out = rec_vms
        .recoveries()
        .end("op-restart", VPG, 0, RecoveryEnd::Discard)
        .await
        .unwrap();
    assert_eq!(out["known"], true);
    rec.shutdown().await.unwrap();
}

async fn cli(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    run(env!("CARGO_BIN_EXE_bulwark"), &args, WAIT).await
}

/// (g) Break-glass with no manager: `bulwark agent recover` asks the running agent,
/// which recovers the VPG from its persisted desired state at the latest checkpoint and
/// powers the VMs on; the printed export serves the checkpoint's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn break_glass_cli_recovers_from_the_persisted_desired_state() {
    let desired = managed_desired(0);
    let p = pair_with(Some(desired)).await;
    let data_dir = p.rec_cfg.data_dir.to_str().unwrap().to_string();
    // Not running yet (no endpoints file): a clear error.
    let o = cli(&["agent", "recover", "--data-dir", &data_dir, "--vpg", "web"]).await;
    assert!(!o.status.success());
    assert!(text(&o).contains("no running agent found"), "{}", text(&o));

    let listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    p.rec.set_admin_addr(listener.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let state = admin::AdminState {
        agent: Arc::clone(&p.rec),
        vms: Some(Arc::clone(&p.rec_vms)),
        control: None,
    };
    let served = tokio::spawn(admin::serve(listener, state, stop.clone()));
    p.rec.write_endpoints().unwrap();

    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x11 0 1M"]).await);
    let c1 = checkpoint(&p).await;
    let dir = p._lab.path("out");
    std::fs::create_dir_all(&dir).unwrap();
    let expected = copy_export(&url(&p.prot, DISK), &dir.join("src.raw")).await;

    let o = cli(&["agent", "recover", "--data-dir", &data_dir, "--vpg", "nope"]).await;
    assert!(!o.status.success());
    assert!(text(&o).contains("no VPG named `nope`"), "{}", text(&o));
    let o = cli(&[
        "agent",
        "recover",
        "--data-dir",
        &data_dir,
        "--vpg",
        "web",
        "--checkpoint",
        "12345",
    ])
    .await;
    assert!(!o.status.success());
    assert!(text(&o).contains("no checkpoint"), "{}", text(&o));

    let o = cli(&[
        "agent",
        "recover",
        "--data-dir",
        &data_dir,
        "--vpg",
        "web",
        "--test",
    ])
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains(&format!("checkpoint {c1}")), "{out}");
    let export_url = out
        .split_whitespace()
        .find(|w| w.starts_with("nbd://"))
        .unwrap_or_else(|| panic!("no export printed: {out}"))
        .to_string();
    let reps = p.rec_vms.recoveries().reports();
    assert_eq!(reps[0].vms[0].name, "d0 - Test");
    assert_eq!(reps[0].vms[0].power_state, PowerState::On);
    let got = copy_export(&export_url, &dir.join("bg.raw")).await;
    assert!(
        got == expected,
        "break-glass disk differs from the checkpoint"
    );
    let op = reps[0].operation.clone();
    p.rec_vms
        .recoveries()
        .end(&op, VPG, 0, RecoveryEnd::Discard)
        .await
        .unwrap();
    stop.cancel();
    let _ = tokio::time::timeout(WAIT, served).await;
    shutdown(p).await;
}

/// A commit interrupted after its phase was recorded (a crash) is finished when the
/// agent starts again: the VM is a local VM with the checkpoint's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_interrupted_commit_is_finished_at_restart() {
    let p = pair().await;
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x11 0 1M"]).await);
    let c1 = checkpoint(&p).await;
    let dir = p._lab.path("out");
    std::fs::create_dir_all(&dir).unwrap();
    let expected = copy_export(&url(&p.prot, DISK), &dir.join("src.raw")).await;
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x33 0 256k"]).await);
    let _ = checkpoint(&p).await;
    p.rec_vms
        .recoveries()
        .recover(request("op-crash", c1, false, None))
        .await
        .unwrap();
    let Pair {
        _lab,
        rec_cfg,
        rec,
        rec_vms,
        prot,
        ..
    } = p;
    prot.shutdown().await.unwrap();
    drop(rec_vms);
    rec.shutdown().await.unwrap();
    drop(rec);
    // The crash: the spec says "committing", nothing else happened yet.
    let spec = rec_cfg.state_dir().join("recoveries").join("op-crash.json");
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(&spec).unwrap()).unwrap();
    v["phase"] = "committing".into();
    std::fs::write(&spec, serde_json::to_vec(&v).unwrap()).unwrap();

    let (rec, hv) = start_agent(rec_cfg.clone()).await.unwrap();
    let rec_vms = Arc::new(HostVms::new(hv, Arc::clone(&rec)));
    rec_vms.recoveries().restored().await;
    assert!(rec_vms.recoveries().reports().is_empty());
    assert!(!spec.exists());
    let vm = rec_vms
        .inventory()
        .vms
        .into_iter()
        .find(|v| v.name == DISK)
        .unwrap();
    assert!(rec_cfg.data_dir.join("disks").join("d0.d0.img").exists());
    rec_vms.set_power(DISK, PowerState::On).await.unwrap();
    let got = copy_export(&url(&rec, &vm.disks[0].export), &dir.join("c.raw")).await;
    assert!(
        got == expected,
        "the finished commit differs from the checkpoint"
    );
    rec.shutdown().await.unwrap();
}

/// Background promotion: with the VPG's journal history at 1 s, the recovery agent
/// moves older records into the replica by itself; the oldest checkpoint goes, the
/// newest stays recoverable and reads as the source did at it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_recovery_agent_promotes_journal_history_in_the_background() {
    let desired = managed_desired(1);
    let p = pair_with(Some(desired)).await;
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x11 0 1M"]).await);
    let c1 = checkpoint(&p).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_qemu_ok(&qemu_write(&p.prot, DISK, &["write -P 0x22 512k 1M"]).await);
    let c2 = checkpoint(&p).await;
    let dir = p._lab.path("out");
    std::fs::create_dir_all(&dir).unwrap();
    let expected = copy_export(&url(&p.prot, DISK), &dir.join("src.raw")).await;

    // Promotion runs every PROMOTE_EVERY; c1 is past the history window.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let a = Arc::clone(&p.rec);
        let ids: Vec<u64> = tokio::task::spawn_blocking(move || {
            a.received_checkpoints(PROT, 1)
                .unwrap_or_default()
                .iter()
                .map(|c| c.id)
                .collect()
        })
        .await
        .unwrap();
        if !ids.contains(&c1) {
            assert!(ids.contains(&c2), "the newest checkpoint stays: {ids:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "checkpoint {c1} was never promoted away: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let recs = p.rec_vms.recoveries();
    let report = recs
        .recover(request("op-after-promotion", c2, true, None))
        .await
        .unwrap();
    let export = report.vms[0].disks[0].export.clone();
    p.rec_vms
        .set_power("d0 - Test", PowerState::On)
        .await
        .unwrap();
    let got = copy_export(&url(&p.rec, &export), &dir.join("rec.raw")).await;
    assert!(
        got == expected,
        "the view after promotion differs from the source"
    );
    recs.end("op-after-promotion", VPG, 0, RecoveryEnd::Discard)
        .await
        .unwrap();
    shutdown(p).await;
}
