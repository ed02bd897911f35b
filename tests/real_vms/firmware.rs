//! Firmware boot (`boot = { kind = "firmware" }`): SeaBIOS boots the first disk, an
//! export of the agent, on the protected host and, from the journal's view, at the
//! recovery host. The disk holds a boot sector that enters long mode and writes `RK` to
//! the serial port.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::agent_common::*;
use crate::failover_test::{post, settings, wait_task, BOOT, MANAGER};
use crate::guest::*;
use crate::orch_common::*;

async fn wait_serial(agent: &AgentProc, vm: &str, what: &str) {
    let deadline = Instant::now() + BOOT;
    while !serial(agent, vm).contains(what) {
        assert!(
            Instant::now() < deadline,
            "{vm} on {}: no {what:?} on the serial console: {:?}",
            agent.name,
            serial(agent, vm)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_boot_from_the_protected_and_the_recovered_disk() {
    let _g = crate::SERIAL.lock().await;
    let w = world(&["prot", "rec"], MANAGER).await;
    let (lab, m, token) = (&w.lab, &w.m, &w.token);
    // The VM's disk holds the boot sector before the agent first opens it.
    let disks = lab.path("prot").join("disks");
    std::fs::create_dir_all(&disks).unwrap();
    let mut image = bulwark::agent::hypervisor::qemu::probe::boot_sector();
    image.resize(MIB as usize, 0);
    std::fs::write(disks.join("fw.img"), &image).unwrap();
    let mut fw = GuestVm::new("fw", 1, "");
    fw.firmware = true;
    fw.size = MIB;
    let prot = start_qemu_agent(lab, m, token, "prot", "prod", false, &[fw], "").await;
    let rec = start_qemu_agent(lab, m, token, "rec", "dr", true, &[], "").await;
    let agents = [&prot, &rec];
    m.wait_hosts_connected(&["prot", "rec"], &agents).await;
    wait_inventory(m, &["fw"]).await;
    wait_serial(&prot, "fw", "RK\n").await;
    let vm = m.vm("fw").await.unwrap();
    assert_eq!(vm["boot"]["kind"], "firmware", "{vm}");

    let vpg = m.create_vpg("fw", &["fw"], "dr", "rec", settings()).await;
    m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &agents, |v| {
        v["status"] == "meeting_sla" && v["sub_status"] == "none"
    })
    .await;
    let t = post(m, &format!("/api/v1/vpgs/{vpg}/failover-test"), json!({})).await;
    let tid = t["id"].as_str().unwrap().to_string();
    wait_task(m, &tid, "waiting", &agents).await;
    wait_serial(&rec, "fw - Test", "RK\n").await;
    post(
        m,
        &format!("/api/v1/vpgs/{vpg}/failover-test/stop"),
        json!({"result": "passed"}),
    )
    .await;
    wait_task(m, &tid, "succeeded", &agents).await;
}
