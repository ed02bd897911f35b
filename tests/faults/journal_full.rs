//! Issue 18, item 2: a journal that hit a full file system recovers by itself once space
//! is freed, without restarting any agent.
//!
//! The recovery agent's replica storage (`<data>/replicas`: journals and replica disks)
//! is a size-limited tmpfs the test mounts. A guest writes through the protected agent's
//! NBD export until the journal's file system is full: the VPG shows Journal storage
//! error with its alert, and stays so while the file system is full. The guest goes on
//! writing until the protected agent's queue (32 MiB here) overflows and the disk goes
//! bitmap-only, so a sync is owed. Then the tmpfs is remounted bigger, and by itself:
//! the recovery agent reopens the journal, the protected agent offers the disk again, a
//! Bitmap Sync runs whose stated reason is the journal storage error, the VPG returns to
//! Meeting SLA and the alert clears. Checkpoints tagged before the fill and after the
//! recovery open as views equal, byte for byte, to the source disk at those moments.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bulwark::agent::nbd::client::NbdClient;
use bulwark::proto::agent::ReplicationMode;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::agent_common::*;
use crate::orch_common::*;

/// Manager timings for tests: fast heartbeats and disconnection.
const MANAGER: &str =
    "heartbeat_ms = 200\ndisconnect_after_ms = 1500\ncheckpoint_hold_bound_ms = 200";

/// The protected agent's stream to `rec`: 32 MiB of queue (more than a stalled
/// receiver lets pile up while the guest fills the journal) and no spill log, so the
/// writes made while the journal refuses the disk overflow it (the address is the
/// manager's; only the options are taken from here).
const PROT_EXTRA: &str = "[[agent.peers]]\nhost_name = \"rec\"\naddress = \"127.0.0.1:9\"\n\
                          queue_memory = \"32 MiB\"\nspill_limit = 0";

/// The journal file system, then after the space is freed.
const FS_MIB: u64 = 24;
const FREED_MIB: u64 = 256;
const DISK: u64 = 64 * MIB;
const EXPORT: &str = "vm-j";
/// What `model::sync::SyncReason::JournalStorageError` says.
const JOURNAL_REASON: &str = "the recovery journal had a storage error";

/// A size-limited tmpfs mounted by the test; unmounted on drop (lazily if busy), so a
/// failing test leaves no mount behind.
struct Tmpfs {
    path: PathBuf,
}

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let o = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "mount a {mib} MiB tmpfs at {} (this test needs root): {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    fn resize(&self, mib: u64) {
        let o = Command::new("mount")
            .args(["-o", &format!("remount,size={mib}m")])
            .arg(&self.path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "remount {} at {mib} MiB: {}",
            self.path.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let plain = Command::new("umount").arg(&self.path).status();
        if !plain.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

/// Where the guest's n-th 1 MiB write goes: anywhere past the first 4 MiB.
fn slot(n: u64) -> u64 {
    ((n % 56) + 4) * MIB
}

fn meeting_sla(v: &Value) -> bool {
    v["status"] == "meeting_sla" && v["sub_status"] == "none"
}

fn journal_error(v: &Value) -> bool {
    v["sub_status"] == "journal_storage_error"
}

async fn alerts(m: &ManagerProc, vpg: &str, open: bool) -> Vec<Value> {
    m.items(&format!(
        "/api/v1/alerts?vpg={vpg}&kind=journal_storage_error&open={open}"
    ))
    .await
}

/// Waits (bounded) until the protected disk has nothing unacknowledged, owes no sync and
/// runs none.
async fn wait_drained(prot: &AgentProc, others: &[&AgentProc]) {
    prot.wait_status("stream drained", others, |s| {
        s.protected
            .iter()
            .all(|d| d.queued_records == 0 && d.sync.running.is_none() && !d.owes_sync)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_journal_recovers_by_itself_once_space_is_freed() {
    let _g = crate::SERIAL.lock().await;
    let test_started = Instant::now();
    let lab = Lab::new(&["prot-a", "rec"]);
    let db = PgDb::new().await;
    let m = ManagerProc::start(lab.dir.path(), &db.url, MANAGER).await;
    let token = m.enrolment_token().await;
    // Declared before the agents: they are killed before it is unmounted.
    let fs = Tmpfs::mount(&lab.path("rec").join("replicas"), FS_MIB);
    let prot = start_managed(
        &lab,
        &m,
        &token,
        "prot-a",
        "prod",
        false,
        &[VmDef::new(EXPORT, 1, DISK)],
        PROT_EXTRA,
    )
    .await;
    let mut rec = start_managed(&lab, &m, &token, "rec", "dr", true, &[], "").await;
    m.wait_hosts_connected(&["prot-a", "rec"], &[&prot, &rec])
        .await;
    let vpg = m
        .create_vpg(
            "journal-full",
            &[EXPORT],
            "dr",
            "rec",
            json!({
                "checkpoint_interval_ms": 1000,
                "rpo_target_secs": 30,
                "journal_history_secs": 3600,
            }),
        )
        .await;
    m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &[&prot, &rec], meeting_sla)
        .await;
    let pids = (prot.pid(), rec.pid());

    // A checkpoint before the fill, with the source as it was then.
    let o = qemu_io(
        &prot.nbd_url(EXPORT),
        "none",
        &["write -P 0x5a 0 4M".into(), "write -P 0x3c 40M 1M".into()],
        Duration::from_secs(30),
    )
    .await;
    assert_qemu_ok(&o);
    wait_drained(&prot, &[&rec]).await;
    let before = m.tag(&vpg, "before-fill").await;
    let before_src = copy_export(&prot.nbd_url(EXPORT), &lab.path("before.raw")).await;
    m.wait_recoverable(&vpg, before, &[&prot, &rec]).await;

    // Fill the journal's file system: 1 MiB writes of random data until the VPG says so
    // (bounded: far more than the file system holds).
    let mut guest = NbdClient::connect(prot.endpoints.nbd.as_str(), EXPORT)
        .await
        .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(18);
    let mut buf = vec![0u8; MIB as usize];
    let mut n = 0u64;
    let mut seen = false;
    while n < 200 && !seen {
        rng.fill(&mut buf[..]);
        guest.write(slot(n), &buf, false).await.unwrap();
        n += 1;
        if n % 4 == 0 {
            seen = journal_error(&m.vpg(&vpg).await);
        }
        // ~20 MiB/s: the stream keeps up until the journal fails (no overflow before).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let filled_after = n;
    let v = m
        .wait_vpg(
            &vpg,
            "Journal storage error",
            Duration::from_secs(30),
            &[&prot, &rec],
            journal_error,
        )
        .await;
    assert_eq!(v["status"], "not_meeting_sla", "{v:#}");
    eprintln!("journal file system full after {filled_after} MiB written");
    let st = prot.status().await;
    assert_eq!(
        st.protected[0].mode,
        ReplicationMode::Streaming,
        "the queue did not overflow before the journal failed: {st:#?}"
    );

    // Writes go on while the journal refuses the disk: the queue overflows and the disk
    // goes bitmap-only (what a sync must bring over afterwards).
    for _ in 0..40 {
        rng.fill(&mut buf[..]);
        guest.write(slot(n), &buf, false).await.unwrap();
        n += 1;
    }
    prot.wait_status("disk bitmap-only", &[&rec], |s| {
        s.protected
            .iter()
            .all(|d| d.mode == ReplicationMode::BitmapOnly)
    })
    .await;

    // The alert is raised, and nothing recovers while the file system stays full.
    let deadline = Instant::now() + Duration::from_secs(20);
    while alerts(&m, &vpg, true).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "no journal_storage_error alert: {:#}",
            m.vpg(&vpg).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let raised = alerts(&m, &vpg, true).await;
    assert_eq!(raised.len(), 1, "{raised:#?}");
    assert_eq!(raised[0]["severity"], "error", "{raised:#?}");
    for _ in 0..10 {
        let v = m.vpg(&vpg).await;
        assert!(journal_error(&v), "while the file system is full: {v:#}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }

    // Free the space. Everything else happens by itself.
    fs.resize(FREED_MIB);
    let freed = Instant::now();
    let freed_ms = chrono::Utc::now();
    m.wait_vpg(
        &vpg,
        "Meeting SLA after the space was freed",
        Duration::from_secs(60),
        &[&prot, &rec],
        meeting_sla,
    )
    .await;
    let back_in = freed.elapsed();
    eprintln!("Meeting SLA again {back_in:?} after the space was freed");
    assert_eq!((prot.pid(), rec.pid()), pids, "no agent was restarted");
    assert!(
        rec.stderr()
            .contains("journal reopened after a storage error"),
        "the recovery agent reopened the journal"
    );

    // The alert clears by itself (after its clear margin).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !alerts(&m, &vpg, true).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "journal_storage_error alert still open: {:#?}",
            alerts(&m, &vpg, true).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cleared = alerts(&m, &vpg, false).await;
    assert!(
        cleared
            .iter()
            .any(|a| a["id"] == raised[0]["id"] && a["cleared_at"].is_string()),
        "{cleared:#?}"
    );

    // The sync that followed: a Bitmap Sync (the stream dropped records while the journal
    // refused the disk), for the reason that is true, and it completed.
    let syncs = m
        .events(&format!("?vpg={vpg}&kind=agent.sync_started"))
        .await;
    let after: Vec<&Value> = syncs
        .iter()
        .filter(|e| {
            e["at"]
                .as_str()
                .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                .is_some_and(|t| t >= freed_ms - chrono::Duration::seconds(1))
        })
        .collect();
    assert!(
        !after.is_empty(),
        "a sync after the space was freed: {syncs:#?}"
    );
    for e in &after {
        assert_eq!(e["details"]["reason"], JOURNAL_REASON, "{e:#}");
        assert_eq!(e["details"]["kind"], "bitmap", "{e:#}");
    }
    let ended = m.events(&format!("?vpg={vpg}&kind=agent.sync_ended")).await;
    assert!(
        ended
            .iter()
            .any(|e| e["details"]["reason"] == JOURNAL_REASON
                && e["details"]["result"] == "completed"),
        "{ended:#?}"
    );

    // A checkpoint after the recovery recovers the source as it was then.
    wait_drained(&prot, &[&rec]).await;
    let after_tag = m.tag(&vpg, "after-recovery").await;
    let after_src = copy_export(&prot.nbd_url(EXPORT), &lab.path("after.raw")).await;
    guest
        .write(0, &vec![0x99u8; MIB as usize], false)
        .await
        .unwrap();
    m.wait_recoverable(&vpg, after_tag, &[&prot, &rec]).await;
    let listed: Vec<i64> = m
        .checkpoints(&vpg, true)
        .await
        .iter()
        .filter_map(|c| c["id"].as_i64())
        .collect();
    assert!(listed.contains(&before), "before-fill still recoverable");
    drop(guest);

    rec.stop_clean().await;
    let j = journal_of(&rec, "prot-a", 1, DISK);
    assert_same(
        "view at the checkpoint tagged after the recovery",
        &view_bytes(&j, after_tag as u64, 0, DISK as usize),
        &after_src,
    );
    assert_same(
        "view at the checkpoint tagged before the fill",
        &view_bytes(&j, before as u64, 0, DISK as usize),
        &before_src,
    );
    eprintln!(
        "journal_full: {:?} in all ({back_in:?} from freeing the space to Meeting SLA)",
        test_started.elapsed()
    );
}
