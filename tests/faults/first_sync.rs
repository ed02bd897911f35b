//! The first checkpoints of a VPG race its Initial Sync. The protected agent's stream is
//! admitted and checkpoint rounds reach the recovery journal before the first sync
//! begins (forced by `BULWARK_FAULT_SYNC_DELAY_MS`: the sync session waits with the
//! stream connected, as when it was refused and retried later than the stream). Those
//! checkpoints lie over an empty replica that lacks everything written before
//! protection: none may ever be listed as recoverable, and every checkpoint that is must
//! recover the disk's exact content.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::agent_common::*;
use crate::orch_common::*;

const MANAGER: &str =
    "heartbeat_ms = 200\ndisconnect_after_ms = 1500\ncheckpoint_hold_bound_ms = 200";
const SIZE: u64 = 4 * MIB;
/// How long the first sync attempt waits with the stream connected: several scheduled
/// checkpoints (one a second) land in the journal meanwhile.
const SYNC_DELAY_MS: u64 = 5000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_taken_before_the_initial_sync_are_never_recoverable() {
    let _g = crate::SERIAL.lock().await;
    let lab = Lab::new(&["prot", "rec"]);
    let db = PgDb::new().await;
    let m = ManagerProc::start(lab.dir.path(), &db.url, MANAGER).await;
    let token = m.enrolment_token().await;

    let data = lab.path("prot");
    std::fs::create_dir_all(&data).unwrap();
    let vms = [VmDef::new("app", 1, SIZE)];
    let text = managed_toml(
        &lab,
        &data,
        "prot",
        "prod",
        &m.ws_url(),
        &token,
        false,
        &vms,
        "",
    );
    let cfg = write_config(lab.dir.path(), "prot", &text);
    let env = vec![(
        "BULWARK_FAULT_SYNC_DELAY_MS".to_string(),
        SYNC_DELAY_MS.to_string(),
    )];
    let prot = AgentProc::start_with("prot", &cfg, &data, &[], env, None).await;
    let rec = start_managed(&lab, &m, &token, "rec", "dr", true, &[], "").await;
    let all = [&prot, &rec];
    m.wait_hosts_connected(&["prot", "rec"], &all).await;

    // The whole disk written before protection: an empty replica differs everywhere.
    let o = qemu_io(
        &prot.nbd_url("app"),
        "none",
        &["write -P 0x5a 0 4M".to_string()],
        Duration::from_secs(30),
    )
    .await;
    assert_qemu_ok(&o);
    let source = copy_export(&prot.nbd_url("app"), &lab.path("app.copy")).await;
    assert!(source.iter().all(|&b| b == 0x5a));

    let started = Instant::now();
    let vpg = m
        .create_vpg(
            "first",
            &["app"],
            "dr",
            "rec",
            json!({
                "checkpoint_interval_ms": 1000,
                "rpo_target_secs": 10,
                "journal_history_secs": 3600,
            }),
        )
        .await;
    m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &all, |v| {
        v["status"] == "meeting_sla" && v["sub_status"] == "none"
    })
    .await;
    eprintln!(
        "Meeting SLA {:?} after the VPG was created",
        started.elapsed()
    );
    assert!(
        prot.stderr()
            .contains("fault injection: the first sync attempt waits"),
        "the sync delay was applied"
    );

    let all_cps = m.checkpoints(&vpg, false).await;
    let recoverable: Vec<i64> = m
        .checkpoints(&vpg, true)
        .await
        .iter()
        .map(|c| c["id"].as_i64().unwrap())
        .collect();
    assert!(
        !recoverable.is_empty(),
        "checkpoints after the sync are recoverable"
    );
    // Unrecoverable checkpoints all predate the oldest recoverable one (or are too new
    // to be reported yet): nothing from before the sync's end counts, nothing after it
    // is lost.
    let oldest_ok = *recoverable.iter().min().unwrap();
    let newest_ok = *recoverable.iter().max().unwrap();
    assert!(
        all_cps
            .iter()
            .map(|c| c["id"].as_i64().unwrap())
            .filter(|id| !recoverable.contains(id))
            .all(|id| id < oldest_ok || id > newest_ok),
        "an unrecoverable checkpoint between recoverable ones: {all_cps:#?}"
    );

    // Every checkpoint listed as recoverable recovers the disk as it was (the guest wrote
    // nothing after protection began).
    let mut rec = rec;
    rec.stop_clean().await;
    let j = journal_of(&rec, "prot", 1, SIZE);
    for id in &recoverable {
        let got = view_bytes(&j, *id as u64, 0, SIZE as usize);
        assert_same(
            &format!("view at recoverable checkpoint {id}"),
            &got,
            &source,
        );
    }
    // The race happened: rounds ran while the sync waited, and their markers are in the
    // journal, older than every checkpoint the manager lists as recoverable (the manager
    // no longer lists them at all: nothing can recover to them).
    let before_sync: Vec<u64> = j
        .checkpoints()
        .iter()
        .map(|c| c.id)
        .filter(|&id| id < oldest_ok as u64)
        .collect();
    assert!(
        before_sync.len() >= 2,
        "checkpoints reached the journal before the Initial Sync: {before_sync:?}"
    );
    for id in &before_sync {
        assert!(
            !all_cps
                .iter()
                .any(|c| c["id"].as_i64() == Some(*id as i64) && c["recoverable"] == true),
            "checkpoint {id}, taken before the Initial Sync, is listed as recoverable"
        );
    }
    eprintln!(
        "{} checkpoints before the sync stayed unrecoverable; {} recoverable ones equal the source",
        before_sync.len(),
        recoverable.len()
    );
}
