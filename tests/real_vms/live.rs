//! Live failover of real guests: rolled back, the original guests boot again on clean
//! filesystems with every file; failed over again and committed, the recovered guests
//! go on running at the recovery host as its own VMs, without a restart and without an
//! I/O error while their disks change from journal views to local disks.

use std::time::Duration;

use serde_json::json;

use crate::failover_test::{eventually, post, settings, wait_task, BOOT, MANAGER};
use crate::guest::*;
use crate::orch_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_failover_rolls_back_to_clean_originals_then_commits_running_guests() {
    let _g = crate::SERIAL.lock().await;
    let w = world(&["prot", "rec"], MANAGER).await;
    let (lab, m, token) = (&w.lab, &w.m, &w.token);
    let vms = ["vm-1", "vm-2"];
    let prot = start_qemu_agent(
        lab,
        m,
        token,
        "prot",
        "prod",
        false,
        &[GuestVm::new("vm-1", 1, ""), GuestVm::new("vm-2", 2, "")],
        "",
    )
    .await;
    let rec = start_qemu_agent(lab, m, token, "rec", "dr", true, &[], "").await;
    let agents = [&prot, &rec];
    m.wait_hosts_connected(&["prot", "rec"], &agents).await;
    wait_inventory(m, &vms).await;
    let vpg = m.create_vpg("live", &vms, "dr", "rec", settings()).await;
    m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &agents, |v| {
        v["status"] == "meeting_sla" && v["sub_status"] == "none"
    })
    .await;
    for vm in vms {
        wait_line(&prot, vm, "wrote", 1, BOOT).await;
    }

    // --- Live failover at the latest checkpoint: the originals shut down cleanly, the
    // recovered guests boot at the recovery host and find their files.
    let t = post(m, &format!("/api/v1/vpgs/{vpg}/failover"), json!({})).await;
    let fid = t["id"].as_str().unwrap().to_string();
    wait_task(m, &fid, "waiting", &agents).await;
    for vm in vms {
        let s = wait_line(&prot, vm, "shutdown", 0, BOOT).await;
        assert_eq!(s.get("clean"), "1", "{vm}: {s:?}");
        assert_eq!(s.num("io_errors"), 0, "{vm}: {s:?}");
        assert!(qemu_pid(&prot, vm).is_none(), "{vm} stopped");
        // The latest checkpoint at the request: files after it are the RPO's.
        let r = wait_line(&rec, vm, "ready", 0, BOOT).await;
        assert_eq!(r.num("bad"), 0, "{vm} recovered: {r:?}");
        assert!(
            r.num("verified") >= 10 && r.num("verified") <= s.num("wrote"),
            "{vm} recovered: {r:?}, the original wrote {s:?}"
        );
    }

    // --- Rollback: the recovered guests go, the originals boot again on clean
    // filesystems with every file they wrote before the shutdown.
    post(m, &format!("/api/v1/vpgs/{vpg}/rollback"), json!({})).await;
    wait_task(m, &fid, "succeeded", &agents).await;
    for vm in vms {
        eventually(
            &format!("recovered {vm} gone"),
            Duration::from_secs(30),
            || qemu_pid(&rec, vm).is_none(),
        )
        .await;
        let before = lines(&serial(&prot, vm))
            .into_iter()
            .find(|l| l.event == "shutdown")
            .unwrap()
            .num("wrote");
        let r = wait_line(&prot, vm, "ready", 1, BOOT).await;
        assert_eq!(r.get("fs"), "clean", "{vm} after rollback: {r:?}");
        assert_eq!(r.num("bad"), 0, "{vm} after rollback: {r:?}");
        assert!(
            r.num("verified") >= before,
            "{vm}: {} files verified, {before} written before the shutdown",
            r.num("verified")
        );
    }
    m.wait_vpg(&vpg, "Meeting SLA after rollback", SLA_WAIT, &agents, |v| {
        v["status"] == "meeting_sla" && v["sub_status"] == "none"
    })
    .await;

    // --- Failover again and commit: the recovered guests keep running as the recovery
    // host's VMs, the same QEMU processes, still writing, never an I/O error.
    let t = post(m, &format!("/api/v1/vpgs/{vpg}/failover"), json!({})).await;
    let cid = t["id"].as_str().unwrap().to_string();
    wait_task(m, &cid, "waiting", &agents).await;
    let mut pids = Vec::new();
    for vm in vms {
        wait_line(&rec, vm, "ready", 0, BOOT).await;
        pids.push(qemu_pid(&rec, vm).expect("recovered guest runs"));
    }
    post(
        m,
        &format!("/api/v1/vpgs/{vpg}/commit"),
        json!({"reverse_protection": false}),
    )
    .await;
    wait_task(m, &cid, "succeeded", &agents).await;
    for (vm, pid) in vms.iter().zip(&pids) {
        assert_eq!(qemu_pid(&rec, vm), Some(*pid), "{vm} was not restarted");
        let n = count(&rec, vm, "wrote");
        wait_line(&rec, vm, "wrote", n + 1, BOOT).await;
        assert_eq!(io_errors(&rec, vm), 0, "{vm}: {}", serial(&rec, vm));
        let (code, inv) = rec.admin_call("GET", "/v1/vms", None).await;
        assert_eq!(code, 200);
        let v = inv["vms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == *vm)
            .cloned()
            .unwrap_or_else(|| panic!("{vm} at the recovery host: {inv}"));
        assert_eq!(v["power_state"], "on", "{v}");
        assert!(v["boot"].is_object(), "it boots as the original did: {v}");
    }
    // It is the recovery host's own VM now: a power cycle through its agent boots it
    // from its local disk with every file.
    let (code, v) = rec
        .admin_call("POST", "/v1/vms/vm-1/power", Some(json!({"state": "off"})))
        .await;
    assert_eq!(code, 200, "{v}");
    let (code, v) = rec
        .admin_call("POST", "/v1/vms/vm-1/power", Some(json!({"state": "on"})))
        .await;
    assert_eq!(code, 200, "{v}");
    let r = wait_line(&rec, "vm-1", "ready", 1, BOOT).await;
    assert_eq!(r.get("fs"), "clean", "{r:?}");
    assert_eq!(r.num("bad"), 0, "{r:?}");
}
