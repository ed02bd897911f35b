//! kill -9 of the protected agent while its guest writes: QEMU holds the guest's I/O
//! on the lost NBD connection (`reconnect-delay`), the restarted agent serves the
//! socket again and re-attaches to the running guest; the guest sees no I/O error,
//! nothing it was told is durable is lost, and the VPG converges.

use std::time::Duration;

use serde_json::json;

use crate::failover_test::{settings, BOOT, MANAGER};
use crate::guest::*;
use crate::orch_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_agent_costs_the_guest_no_io_error_and_no_file() {
    let _g = crate::SERIAL.lock().await;
    let w = world(&["prot", "rec"], MANAGER).await;
    let (lab, m, token) = (&w.lab, &w.m, &w.token);
    let mut prot = start_qemu_agent(
        lab,
        m,
        token,
        "prot",
        "prod",
        false,
        &[GuestVm::new("vm-1", 1, "")],
        "",
    )
    .await;
    let rec = start_qemu_agent(lab, m, token, "rec", "dr", true, &[], "").await;
    m.wait_hosts_connected(&["prot", "rec"], &[&prot, &rec])
        .await;
    wait_inventory(m, &["vm-1"]).await;
    let vpg = m
        .create_vpg("kill", &["vm-1"], "dr", "rec", settings())
        .await;
    m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &[&prot, &rec], |v| {
        v["status"] == "meeting_sla" && v["sub_status"] == "none"
    })
    .await;
    wait_line(&prot, "vm-1", "wrote", 1, BOOT).await;
    let pid = qemu_pid(&prot, "vm-1").expect("guest runs");

    // Killed mid-write (the guest writes a file every 50 ms), restarted 2 s later:
    // well inside the 60 s reconnect-delay.
    for round in 0..2 {
        let before = count(&prot, "vm-1", "wrote");
        prot.kill9().await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        prot.spawn().await;
        assert_eq!(
            prot.stderr()
                .matches("re-attached to a running guest")
                .count(),
            round + 1,
            "round {round}: the agent re-attached\n{}",
            tail(&prot.stderr(), 30)
        );
        assert_eq!(qemu_pid(&prot, "vm-1"), Some(pid), "the same QEMU runs on");
        // The guest goes on writing through the new agent.
        wait_line(&prot, "vm-1", "wrote", before + 2, BOOT).await;
        assert_eq!(io_errors(&prot, "vm-1"), 0, "{}", serial(&prot, "vm-1"));
    }
    m.wait_vpg(
        &vpg,
        "Meeting SLA after the restarts",
        SLA_WAIT,
        &[&prot, &rec],
        |v| v["status"] == "meeting_sla" && v["sub_status"] == "none",
    )
    .await;
    let io_events = m.events("?kind=agent.vm_block_io_error").await;
    assert!(
        io_events.is_empty(),
        "QMP reported guest I/O errors: {io_events:#?}"
    );

    // Nothing acknowledged is lost: a clean reboot verifies every file written.
    let (code, v) = prot
        .admin_call("POST", "/v1/vms/vm-1/power", Some(json!({"state": "off"})))
        .await;
    assert_eq!(code, 200, "{v}");
    let s = wait_line(&prot, "vm-1", "shutdown", 0, BOOT).await;
    assert_eq!(s.get("clean"), "1", "{s:?}");
    let (code, v) = prot
        .admin_call("POST", "/v1/vms/vm-1/power", Some(json!({"state": "on"})))
        .await;
    assert_eq!(code, 200, "{v}");
    let r = wait_line(&prot, "vm-1", "ready", 1, BOOT).await;
    assert_eq!(r.get("fs"), "clean", "{r:?}");
    assert_eq!(r.num("bad"), 0, "{r:?}");
    assert_eq!(
        r.num("verified"),
        s.num("wrote"),
        "every file the guest wrote verifies: {r:?} after {s:?}"
    );
    assert_eq!(io_errors(&prot, "vm-1"), 0, "{}", serial(&prot, "vm-1"));
}
