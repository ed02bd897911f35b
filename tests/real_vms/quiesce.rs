//! Quiesce with real guests: a guest running qemu-guest-agent is frozen around the
//! marker (`guest-fsfreeze-freeze`), and its checkpoint is application consistent — the
//! recovered filesystem is clean, no journal to replay; a guest without one is paused
//! (QMP `stop`) and its checkpoint is recorded crash consistent; a QEMU that does not
//! answer aborts the round within its hold bound and holds nothing.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::failover_test::{post, settings, wait_task, BOOT, MANAGER};
use crate::guest::*;
use crate::orch_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_agent_checkpoints_are_app_consistent_and_paused_ones_are_not() {
    let _g = crate::SERIAL.lock().await;
    let w = world(&["prot", "rec"], MANAGER).await;
    let (lab, m, token) = (&w.lab, &w.m, &w.token);
    let prot = start_qemu_agent(
        lab,
        m,
        token,
        "prot",
        "prod",
        false,
        &[
            GuestVm::new("frozen", 1, "bulwark.qga=1"),
            GuestVm::new("plain", 2, ""),
        ],
        "",
    )
    .await;
    let rec = start_qemu_agent(lab, m, token, "rec", "dr", true, &[], "").await;
    let agents = [&prot, &rec];
    m.wait_hosts_connected(&["prot", "rec"], &agents).await;
    wait_inventory(m, &["frozen", "plain"]).await;
    wait_line(&prot, "frozen", "qga", 0, BOOT).await;
    let fz = m
        .create_vpg("fz", &["frozen"], "dr", "rec", settings())
        .await;
    let pl = m
        .create_vpg("pl", &["plain"], "dr", "rec", settings())
        .await;
    for v in [&fz, &pl] {
        m.wait_vpg(v, "Meeting SLA", SLA_WAIT, &agents, |v| {
            v["status"] == "meeting_sla" && v["sub_status"] == "none"
        })
        .await;
    }
    wait_line(&prot, "frozen", "wrote", 1, BOOT).await;

    let app = |vpg: &str, tag: &str| {
        let path = format!("/api/v1/vpgs/{vpg}/checkpoints");
        let body = json!({"tag": tag, "app_consistent": true});
        let m = &m;
        async move { m.call("POST", &path, Some(body)).await }
    };
    // --- The guest agent freezes: application consistent.
    let (code, c) = app(&fz, "frozen-1").await;
    assert_eq!(code.as_u16(), 201, "{c}");
    let id = c["id"].as_i64().unwrap();
    m.wait_recoverable(&fz, id, &agents).await;
    let cp = m
        .checkpoints(&fz, true)
        .await
        .into_iter()
        .find(|c| c["id"].as_i64() == Some(id))
        .unwrap();
    assert_eq!(cp["quiesce"], "guest_agent", "{cp}");
    assert_eq!(cp["app_consistent"], true, "{cp}");
    // The guest goes on writing after the thaw.
    let n = count(&prot, "frozen", "wrote");
    wait_line(&prot, "frozen", "wrote", n + 1, BOOT).await;
    assert_eq!(io_errors(&prot, "frozen"), 0);

    // --- No guest agent: paused, crash consistent, and never picked as app consistent.
    let (code, c) = app(&pl, "paused-1").await;
    assert_eq!(code.as_u16(), 201, "{c}");
    let pid = c["id"].as_i64().unwrap();
    m.wait_recoverable(&pl, pid, &agents).await;
    let cp = m
        .checkpoints(&pl, true)
        .await
        .into_iter()
        .find(|c| c["id"].as_i64() == Some(pid))
        .unwrap();
    assert_eq!(cp["quiesce"], "paused", "{cp}");
    assert_eq!(cp["app_consistent"], false, "{cp}");
    let (code, p) = m
        .call(
            "POST",
            &format!("/api/v1/vpgs/{pl}/failover-test"),
            Some(json!({"checkpoint": "latest_app_consistent"})),
        )
        .await;
    assert!(
        code.is_client_error(),
        "no app-consistent checkpoint to recover: {code} {p}"
    );

    // --- Recovered from the app-consistent checkpoint the filesystem is clean: the
    // freeze left nothing in the ext4 journal.
    let t = post(
        m,
        &format!("/api/v1/vpgs/{fz}/failover-test"),
        json!({"checkpoint": "latest_app_consistent"}),
    )
    .await;
    let tid = t["id"].as_str().unwrap().to_string();
    let t = wait_task(m, &tid, "waiting", &agents).await;
    assert_eq!(t["details"]["checkpoint_id"], id, "{t:#}");
    let r = wait_line(&rec, "frozen - Test", "ready", 0, BOOT).await;
    assert_eq!(
        r.get("fs"),
        "clean",
        "an app-consistent image needs no recovery: {r:?}"
    );
    assert_eq!(r.num("bad"), 0, "{r:?}");
    post(
        m,
        &format!("/api/v1/vpgs/{fz}/failover-test/stop"),
        json!({"result": "passed"}),
    )
    .await;
    wait_task(m, &tid, "succeeded", &agents).await;

    // --- A QEMU that does not answer (stopped with SIGSTOP): the round is aborted
    // within its bound, nothing is held, and the next round works again.
    let qemu = qemu_pid(&prot, "plain").unwrap();
    let sig = |s: &str| {
        std::process::Command::new("kill")
            .args([s, &qemu.to_string()])
            .status()
            .unwrap()
    };
    sig("-STOP");
    let started = Instant::now();
    let (code, p) = app(&pl, "stuck").await;
    let took = started.elapsed();
    sig("-CONT");
    assert!(
        code.is_server_error(),
        "a stuck QEMU aborts the round: {code} {p}"
    );
    assert!(
        took < Duration::from_secs(8),
        "the round gave up within its bound, not QMP's: {took:?}"
    );
    let (code, c) = app(&pl, "paused-2").await;
    assert_eq!(code.as_u16(), 201, "{c}");
    let n = count(&prot, "plain", "wrote");
    wait_line(&prot, "plain", "wrote", n + 1, BOOT).await;
    assert_eq!(io_errors(&prot, "plain"), 0);
}
