//! A failover test of two real guests on two protected hosts at a tagged checkpoint:
//! both recovered guests boot and find every file their manifest held at the tag, the
//! journal views still equal the disks as they were at the tag, and protection of the
//! running originals never stops.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::agent_common::*;
use crate::guest::*;
use crate::orch_common::*;

pub const MANAGER: &str =
    "heartbeat_ms = 200\ndisconnect_after_ms = 3000\ncheckpoint_hold_bound_ms = 1000";
/// A test guest boots in 4–6 s under TCG alone; give a loaded machine room.
pub const BOOT: Duration = Duration::from_secs(60);
const SIZE: u64 = 64 * MIB;

pub fn settings() -> Value {
    json!({"checkpoint_interval_ms": 1000, "rpo_target_secs": 30, "journal_history_secs": 3600})
}

pub async fn wait_task(m: &ManagerProc, id: &str, state: &str, agents: &[&AgentProc]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = m.ok("GET", &format!("/api/v1/tasks/{id}"), None).await;
        if t["state"] == state {
            return t;
        }
        assert!(
            (t["state"] != "failed" || state == "failed") && Instant::now() < deadline,
            "task {id} never reached {state}: {t:#}\n--- manager:\n{}{}",
            tail(&m.stderr(), 40),
            agent_logs(agents, 40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn post(m: &ManagerProc, path: &str, body: Value) -> Value {
    let (st, v) = m.call("POST", path, Some(body)).await;
    assert_eq!(st.as_u16(), 202, "{path}: {v}");
    v
}

/// Waits until `pred` holds, polling every 200 ms; panics with `what` after `within`.
pub async fn eventually(what: &str, within: Duration, mut pred: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !pred() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_test_boots_both_guests_at_the_tag_and_protection_goes_on() {
    let _g = crate::SERIAL.lock().await;
    let w = world(&["prot-a", "prot-b", "rec"], MANAGER).await;
    let (lab, m, token) = (&w.lab, &w.m, &w.token);
    let guests = [("prot-a", "vm-1", 1u64), ("prot-b", "vm-2", 2u64)];
    let pa = start_qemu_agent(
        lab,
        m,
        token,
        "prot-a",
        "prod",
        false,
        &[GuestVm::new("vm-1", 1, "")],
        "",
    )
    .await;
    let pb = start_qemu_agent(
        lab,
        m,
        token,
        "prot-b",
        "prod",
        false,
        &[GuestVm::new("vm-2", 2, "")],
        "",
    )
    .await;
    let rec = start_qemu_agent(lab, m, token, "rec", "dr", true, &[], "").await;
    let agents = [&pa, &pb, &rec];
    let host = |h: &str| if h == "prot-a" { &pa } else { &pb };
    m.wait_hosts_connected(&["prot-a", "prot-b", "rec"], &agents)
        .await;
    wait_inventory(m, &["vm-1", "vm-2"]).await;
    for (h, vm, _) in guests {
        let r = wait_line(host(h), vm, "ready", 0, BOOT).await;
        assert_eq!(r.get("fs"), "new", "{vm}: {r:?}");
    }
    let vms = m.vm("vm-1").await.unwrap();
    assert_eq!(vms["power_state"], "on", "{vms}");

    let vpg = m
        .create_vpg("real", &["vm-1", "vm-2"], "dr", "rec", settings())
        .await;
    m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &agents, |v| {
        v["status"] == "meeting_sla" && v["sub_status"] == "none"
    })
    .await;
    // The guests write a while under protection.
    for (h, vm, _) in guests {
        wait_line(host(h), vm, "wrote", 1, BOOT).await;
    }

    // Both guests paused (the test guest runs no guest agent: QMP stop), their disks
    // copied through the agents' NBD exports, the checkpoint tagged, then resumed.
    for (h, vm, _) in guests {
        let (code, v) = host(h)
            .admin_call("POST", &format!("/v1/vms/{vm}/quiesce"), None)
            .await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(v["quiesce"], "paused", "{v}");
    }
    let wrote_at_pause: Vec<usize> = guests
        .iter()
        .map(|(h, vm, _)| count(host(h), vm, "wrote"))
        .collect();
    let mut copies = Vec::new();
    for (h, vm, _) in guests {
        let p = lab.path(&format!("{vm}.at-tag"));
        copies.push(copy_export(&host(h).nbd_url(vm), &p).await);
    }
    let tag = m.tag(&vpg, "t1").await;
    let still: Vec<usize> = guests
        .iter()
        .map(|(h, vm, _)| count(host(h), vm, "wrote"))
        .collect();
    assert_eq!(still, wrote_at_pause, "the guests wrote while paused");
    for (h, vm, _) in guests {
        let (code, v) = host(h)
            .admin_call("POST", &format!("/v1/vms/{vm}/thaw"), None)
            .await;
        assert_eq!(code, 200, "{v}");
    }
    m.wait_recoverable(&vpg, tag, &agents).await;
    // They keep writing after the tag.
    for ((h, vm, _), n) in guests.iter().zip(&wrote_at_pause) {
        wait_line(host(h), vm, "wrote", n + 1, BOOT).await;
    }
    let pids: Vec<Option<i32>> = guests
        .iter()
        .map(|(h, vm, _)| qemu_pid(host(h), vm))
        .collect();

    // --- Failover test at the tag: both recovered guests boot and verify.
    let t = post(
        m,
        &format!("/api/v1/vpgs/{vpg}/failover-test"),
        json!({"checkpoint": "tag:t1"}),
    )
    .await;
    let tid = t["id"].as_str().unwrap().to_string();
    let t = wait_task(m, &tid, "waiting", &agents).await;
    assert_eq!(t["details"]["checkpoint_id"], tag, "{t:#}");
    for (_, vm, _) in guests {
        let test_vm = format!("{vm} - Test");
        let r = wait_line(&rec, &test_vm, "ready", 0, BOOT).await;
        assert_eq!(
            r.num("bad"),
            0,
            "{test_vm}: files of the manifest at the tag are bad: {r:?}"
        );
        assert!(
            r.num("verified") >= 20,
            "{test_vm}: the tag had at least 20 files: {r:?}"
        );
        // A crash-consistent image: the journal of ext4 is replayed at mount.
        assert!(
            ["recovered", "clean"].contains(&r.get("fs")),
            "{test_vm}: {r:?}"
        );
        assert_eq!(r.num("io_errors"), 0, "{test_vm}: {r:?}");
        assert!(qemu_pid(&rec, &test_vm).is_some(), "{test_vm} runs");
    }
    // Protection goes on: the originals run the same QEMU and keep writing.
    let v = m.vpg(&vpg).await;
    assert_eq!(v["sub_status"], "testing_failover", "{v}");
    for ((h, vm, _), pid) in guests.iter().zip(&pids) {
        assert_eq!(qemu_pid(host(h), vm), *pid, "{vm} was not restarted");
        let n = count(host(h), vm, "wrote");
        wait_line(host(h), vm, "wrote", n, BOOT).await;
    }

    // --- Stop the test: the test VMs are gone, protection meets its SLA.
    post(
        m,
        &format!("/api/v1/vpgs/{vpg}/failover-test/stop"),
        json!({"result": "passed"}),
    )
    .await;
    wait_task(m, &tid, "succeeded", &agents).await;
    for (_, vm, _) in guests {
        let test_vm = format!("{vm} - Test");
        eventually(
            &format!("{test_vm}'s QEMU ended"),
            Duration::from_secs(30),
            || qemu_pid(&rec, &test_vm).is_none(),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while m.vm("vm-1 - Test").await.is_some() || m.vm("vm-2 - Test").await.is_some() {
        assert!(Instant::now() < deadline, "test VMs still in the inventory");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    m.wait_vpg(&vpg, "Meeting SLA after the test", SLA_WAIT, &agents, |v| {
        v["status"] == "meeting_sla" && v["sub_status"] == "none"
    })
    .await;
    for (h, vm, _) in guests {
        assert_eq!(io_errors(host(h), vm), 0, "{vm}: {}", serial(host(h), vm));
    }

    // --- The journal's view at the tag is byte for byte the disks as paused.
    let mut rec = rec;
    rec.stop_clean().await;
    for ((h, _, id), copy) in guests.iter().zip(&copies) {
        let j = journal_of(&rec, h, *id, SIZE);
        let view = view_bytes(&j, tag as u64, 0, SIZE as usize);
        assert_same(&format!("{h} disk {id} at the tag"), &view, copy);
    }
}
