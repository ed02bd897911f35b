//! Power edges with real QEMU: a guest that ignores ACPI power-down is ended by `quit`
//! after the timeout; a QEMU that cannot start (its kernel is missing at the recovery
//! host) fails the failover test with QEMU's own words in the step, and the operation
//! rolls back.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::failover_test::{eventually, post, settings, wait_task, BOOT, MANAGER};
use crate::guest::*;
use crate::orch_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deaf_guest_is_quit_and_a_qemu_that_cannot_start_fails_the_operation() {
    let _g = crate::SERIAL.lock().await;
    let w = world(&["prot", "rec"], MANAGER).await;
    let (lab, m, token) = (&w.lab, &w.m, &w.token);
    // The kernel of `gone` exists on the protected host only: a copy removed after the
    // guest booted, so its recovery cannot start it.
    let kernel_copy = lab.path("gone-vmlinuz");
    std::fs::copy(&image().kernel, &kernel_copy).unwrap();
    let mut gone = GuestVm::new("gone", 2, "");
    gone.kernel = Some(kernel_copy.display().to_string());
    let prot = start_qemu_agent(
        lab,
        m,
        token,
        "prot",
        "prod",
        false,
        &[GuestVm::new("deaf", 1, "bulwark.acpi=ignore"), gone],
        "powerdown_timeout_secs = 3",
    )
    .await;
    let rec = start_qemu_agent(lab, m, token, "rec", "dr", true, &[], "").await;
    let agents = [&prot, &rec];
    m.wait_hosts_connected(&["prot", "rec"], &agents).await;
    wait_inventory(m, &["deaf", "gone"]).await;
    for vm in ["deaf", "gone"] {
        wait_line(&prot, vm, "ready", 0, BOOT).await;
    }

    // --- ACPI power-down ignored: `quit` after the 3 s timeout.
    let pid = qemu_pid(&prot, "deaf").unwrap();
    let started = Instant::now();
    let (code, v) = prot
        .admin_call("POST", "/v1/vms/deaf/power", Some(json!({"state": "off"})))
        .await;
    let took = started.elapsed();
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["power_state"], "off", "{v}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(20),
        "power-off took {took:?}: the timeout is 3 s"
    );
    assert_eq!(
        count(&prot, "deaf", "shutdown"),
        0,
        "the guest never shut down"
    );
    assert!(qemu_pid(&prot, "deaf").is_none(), "QEMU {pid} quit");
    assert!(
        prot.stderr().contains("guest ignored the ACPI power-down"),
        "{}",
        tail(&prot.stderr(), 20)
    );

    // --- A recovery whose QEMU cannot start: the operation fails, saying why, and
    // rolls back.
    std::fs::remove_file(&kernel_copy).unwrap();
    let vpg = m
        .create_vpg("bad", &["gone"], "dr", "rec", settings())
        .await;
    m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &agents, |v| {
        v["status"] == "meeting_sla" && v["sub_status"] == "none"
    })
    .await;
    let t = post(m, &format!("/api/v1/vpgs/{vpg}/failover-test"), json!({})).await;
    let tid = t["id"].as_str().unwrap().to_string();
    let t = wait_task(m, &tid, "failed", &agents).await;
    let steps = t["steps"].as_array().unwrap();
    let failed = steps
        .iter()
        .find(|s| s["state"] == "failed")
        .unwrap_or_else(|| panic!("a failed step: {t:#}"));
    let msg = failed["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("QEMU") && msg.contains("gone-vmlinuz"),
        "the step says what QEMU said: {t:#}"
    );
    eventually("the test VM removed", Duration::from_secs(30), || {
        qemu_pid(&rec, "gone - Test").is_none()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while m.vm("gone - Test").await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the test VM stays in the inventory"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let v = m
        .wait_vpg(&vpg, "back to Meeting SLA", SLA_WAIT, &agents, |v| {
            v["status"] == "meeting_sla" && v["sub_status"] == "none"
        })
        .await;
    assert!(v["operation_id"].is_null(), "{v}");
    // The original never noticed.
    assert!(qemu_pid(&prot, "gone").is_some());
}
