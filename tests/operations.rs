//! Recovery operations end to end: a manager on PostgreSQL and agents as processes on
//! loopback, driven through the REST API as an operator would. Recovered disks are read
//! by a real NBD client (`qemu-img convert`) and compared byte for byte with the
//! sources copied at the checkpoint.
#![allow(clippy::unwrap_used)]

mod agent_common;
mod orch_common;

use std::time::{Duration, Instant};

use agent_common::*;
use orch_common::*;
use serde_json::{json, Value};

/// These tests start several processes each; on two cores they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MANAGER: &str =
    "heartbeat_ms = 200\ndisconnect_after_ms = 1500\ncheckpoint_hold_bound_ms = 200";
const PROTECTED_EXTRA: &str = "away_bound_secs = 2";
const SIZE: u64 = 4 * MIB;

fn meeting_sla(v: &Value) -> bool {
    v["status"] == "meeting_sla" && v["sub_status"] == "none"
}

struct World {
    lab: Lab,
    _db: PgDb,
    m: ManagerProc,
    token: String,
    prot: AgentProc,
    rec: AgentProc,
    vpg: String,
}

impl World {
    /// `prot` (site prod) with VMs `app` and `db`, `rec` (site dr); VPG `shop` at
    /// Meeting SLA with some data written before and under protection.
    async fn new() -> World {
        let lab = Lab::new(&["prot", "rec"]);
        let db = PgDb::new().await;
        let m = ManagerProc::start(lab.dir.path(), &db.url, MANAGER).await;
        let token = m.enrolment_token().await;
        // `web` stays out of the VPG unless a test protects it in a VPG of its own.
        let vms = [
            VmDef::new("app", 1, SIZE),
            VmDef::new("db", 2, SIZE),
            VmDef::new("web", 3, SIZE),
        ];
        let prot = start_managed(
            &lab,
            &m,
            &token,
            "prot",
            "prod",
            // A data listener: reverse protection streams back to it.
            true,
            &vms,
            PROTECTED_EXTRA,
        )
        .await;
        let rec = start_managed(&lab, &m, &token, "rec", "dr", true, &[], "").await;
        m.wait_hosts_connected(&["prot", "rec"], &[&prot, &rec])
            .await;
        for (i, vm) in ["app", "db"].iter().enumerate() {
            write(&prot, vm, &[format!("write -P {} 0 1M", 0x10 + i)]).await;
        }
        let vpg = m
            .create_vpg(
                "shop",
                &["app", "db"],
                "dr",
                "rec",
                json!({"checkpoint_interval_ms": 1000, "rpo_target_secs": 10, "journal_history_secs": 3600}),
            )
            .await;
        m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &[&prot, &rec], meeting_sla)
            .await;
        World {
            lab,
            _db: db,
            m,
            token,
            prot,
            rec,
            vpg,
        }
    }

    fn agents(&self) -> [&AgentProc; 2] {
        [&self.prot, &self.rec]
    }

    /// Copies of the protected disks now, after a tagged checkpoint of a quiet moment.
    async fn tagged_sources(&self, tag: &str) -> (i64, Vec<Vec<u8>>) {
        wait_quiet(&self.prot).await;
        let id = self.m.tag(&self.vpg, tag).await;
        let mut out = Vec::new();
        for vm in ["app", "db"] {
            let p = self.lab.path(&format!("{vm}-{tag}.src"));
            out.push(copy_export(&self.prot.nbd_url(vm), &p).await);
        }
        self.m.wait_recoverable(&self.vpg, id, &self.agents()).await;
        (id, out)
    }

    async fn post(&self, path: &str, body: Value) -> Value {
        let (st, v) = self.m.call("POST", path, Some(body)).await;
        assert_eq!(st.as_u16(), 202, "{path}: {v}");
        v
    }

    /// Waits for the operation's task to reach `state`.
    async fn wait_task(&self, id: &str, state: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let t = self.m.ok("GET", &format!("/api/v1/tasks/{id}"), None).await;
            if t["state"] == state {
                return t;
            }
            assert!(
                t["state"] != "failed" || state == "failed",
                "operation failed: {t:#}\n{}",
                agent_logs(&self.agents(), 40)
            );
            assert!(
                Instant::now() < deadline,
                "task {id} never reached {state}: {t:#}\n{}\n{}",
                tail(&self.m.stderr(), 40),
                agent_logs(&self.agents(), 40)
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The recovered disks' NBD URLs at the recovery host, by source VM, from the task.
    fn exports(&self, task: &Value) -> Vec<(String, String)> {
        self.exports_at(&self.rec, task)
    }

    /// The recovered disks' NBD URLs at `host`, by source VM, from the task.
    fn exports_at(&self, host: &AgentProc, task: &Value) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for r in task["details"]["recovered"].as_array().unwrap() {
            for vm in r["vms"].as_array().unwrap() {
                for d in vm["disks"].as_array().unwrap() {
                    out.push((
                        vm["source_vm"].as_str().unwrap().to_string(),
                        host.nbd_url(d["export"].as_str().unwrap()),
                    ));
                }
            }
        }
        out.sort();
        out
    }
}

async fn write(agent: &AgentProc, export: &str, cmds: &[String]) {
    let o = qemu_io(
        &agent.nbd_url(export),
        "none",
        cmds,
        Duration::from_secs(30),
    )
    .await;
    assert_qemu_ok(&o);
}

async fn wait_quiet(agent: &AgentProc) {
    agent
        .wait_status("stream drained", &[], |s| {
            s.protected.iter().all(|d| {
                d.recovery_host.is_none()
                    || (d.queued_records == 0 && d.sync.running.is_none() && !d.owes_sync)
            })
        })
        .await;
}

async fn assert_recovered_equal(w: &World, task: &Value, sources: &[Vec<u8>], what: &str) {
    let exports = w.exports(task);
    assert_eq!(exports.len(), 2, "{task:#}");
    for ((vm, url), src) in exports.iter().zip(sources) {
        let got = copy_export(url, &w.lab.path(&format!("{vm}-{what}.rec"))).await;
        assert!(
            got == *src,
            "{what}: recovered {vm} differs from its source at the checkpoint"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_test_then_failover_rollback_then_failover_commit() {
    let _g = SERIAL.lock().await;
    let w = World::new().await;
    let (tagged, sources) = w.tagged_sources("before-test").await;
    // Writes after the checkpoint: no recovery at `tagged` may show them.
    for vm in ["app", "db"] {
        write(&w.prot, vm, &["write -P 0x77 0 256k".into()]).await;
    }

    // --- Failover test from the tagged checkpoint.
    let t = w
        .post(
            &format!("/api/v1/vpgs/{}/failover-test", w.vpg),
            json!({"checkpoint": "tag:before-test", "notes": "quarterly"}),
        )
        .await;
    let tid = t["id"].as_str().unwrap().to_string();
    // A second operation is refused while one runs.
    let (st, p) =
        w.m.call(
            "POST",
            &format!("/api/v1/vpgs/{}/failover", w.vpg),
            Some(json!({})),
        )
        .await;
    assert_eq!(st.as_u16(), 409, "{p}");
    assert_eq!(p["code"], "vpg.operation_running", "{p}");
    let t = w.wait_task(&tid, "waiting").await;
    assert_eq!(t["details"]["checkpoint_id"], tagged, "{t:#}");
    for r in t["details"]["recovered"].as_array().unwrap() {
        for vm in r["vms"].as_array().unwrap() {
            assert_eq!(vm["power_state"], "on", "{t:#}");
        }
    }
    let v = w.m.vpg(&w.vpg).await;
    assert_eq!(v["sub_status"], "testing_failover", "{v}");
    assert_eq!(v["operation_id"], tid.as_str(), "{v}");
    assert_eq!(v["operation_phase"], "testing_failover", "{v}");
    assert_recovered_equal(&w, &t, &sources, "test").await;
    // Test VMs are named "<vm> - Test" and run at the recovery host.
    let test_vm =
        w.m.vm("app - Test")
            .await
            .expect("test VM in the inventory");
    assert_eq!(test_vm["power_state"], "on", "{test_vm}");
    // Guest writes in the test VM go to its scratch layer only.
    let (_, url) = w.exports(&t)[0].clone();
    let o = qemu_io(
        &url,
        "none",
        &["write -P 0x5a 0 64k".into()],
        Duration::from_secs(30),
    )
    .await;
    assert_qemu_ok(&o);
    // Protection goes on meanwhile.
    write(&w.prot, "app", &["write -P 0x78 1M 64k".into()]).await;
    w.post(
        &format!("/api/v1/vpgs/{}/failover-test/stop", w.vpg),
        json!({"result": "passed", "notes": "all good"}),
    )
    .await;
    let t = w.wait_task(&tid, "succeeded").await;
    assert!(
        t["steps"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] == "succeeded" || s["state"] == "skipped"),
        "{t:#}"
    );
    assert!(
        w.m.vm("app - Test").await.is_none() || {
            // The inventory may lag a heartbeat behind.
            tokio::time::sleep(Duration::from_secs(2)).await;
            w.m.vm("app - Test").await.is_none()
        },
        "test VM removed"
    );
    let v = w.m.vpg(&w.vpg).await;
    assert!(v["last_test_at"].is_string(), "the test is recorded: {v}");
    assert!(v["operation_id"].is_null(), "{v}");
    assert_eq!(v["fencing_generation"], 1, "a test does not fence: {v}");
    let reports =
        w.m.ok("GET", &format!("/api/v1/reports?vpg={}", w.vpg), None)
            .await["items"]
            .clone();
    let r = &reports.as_array().unwrap()[0];
    assert_eq!(r["kind"], "failover_test", "{r}");
    assert_eq!(r["result"], "stopped", "{r}");
    assert!(r["rto_ms"].as_u64().is_some(), "{r}");
    assert!(r["notes"].as_str().unwrap().contains("all good"), "{r}");
    w.m.wait_vpg(
        &w.vpg,
        "Meeting SLA after the test",
        SLA_WAIT,
        &w.agents(),
        meeting_sla,
    )
    .await;

    // --- Failover to the same checkpoint, then rollback: the originals run again and
    // no write is lost.
    let t = w
        .post(
            &format!("/api/v1/vpgs/{}/failover", w.vpg),
            json!({"checkpoint": tagged.to_string()}),
        )
        .await;
    let fid = t["id"].as_str().unwrap().to_string();
    let t = w.wait_task(&fid, "waiting").await;
    let v = w.m.vpg(&w.vpg).await;
    assert_eq!(v["status"], "failing_over", "{v}");
    assert_eq!(v["sub_status"], "failing_over_before_commit", "{v}");
    assert_recovered_equal(&w, &t, &sources, "failover").await;
    // The protected VMs are shut down and locked.
    let app = w.m.vm("app").await.unwrap();
    assert_eq!(app["power_state"], "off", "{app}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = w.m.vpg(&w.vpg).await;
        let states: Vec<&Value> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| &m["replication_state"])
            .collect();
        if states.iter().all(|s| *s == "prepared_for_planned_failover") {
            break;
        }
        assert!(Instant::now() < deadline, "per-VM states: {states:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.post(&format!("/api/v1/vpgs/{}/rollback", w.vpg), json!({}))
        .await;
    w.wait_task(&fid, "succeeded").await;
    let app = w.m.vm("app").await.unwrap();
    assert_eq!(app["power_state"], "on", "the original runs again: {app}");
    // Protection as before: a new write reaches a new recoverable checkpoint.
    write(&w.prot, "db", &["write -P 0x79 2M 64k".into()]).await;
    let (_, sources2) = w.tagged_sources("after-rollback").await;
    w.m.wait_vpg(
        &w.vpg,
        "Meeting SLA after rollback",
        SLA_WAIT,
        &w.agents(),
        meeting_sla,
    )
    .await;

    // --- Failover from the latest checkpoint, then commit (no reverse protection).
    let t = w
        .post(
            &format!("/api/v1/vpgs/{}/failover", w.vpg),
            json!({"checkpoint": "tag:after-rollback"}),
        )
        .await;
    let cid = t["id"].as_str().unwrap().to_string();
    let t = w.wait_task(&cid, "waiting").await;
    assert_recovered_equal(&w, &t, &sources2, "before-commit").await;
    w.post(
        &format!("/api/v1/vpgs/{}/commit", w.vpg),
        json!({"reverse_protection": false}),
    )
    .await;
    let t = w.wait_task(&cid, "succeeded").await;
    w.m.wait_vpg(&w.vpg, "Recovered", SLA_WAIT, &w.agents(), |v| {
        v["status"] == "recovered"
    })
    .await;
    // The recovered VMs run on plain local disks of the recovery host, whose bytes are
    // the checkpoint's.
    let t2 = w.m.ok("GET", &format!("/api/v1/tasks/{cid}"), None).await;
    assert_recovered_equal(&w, &t2, &sources2, "committed").await;
    let reports =
        w.m.ok("GET", &format!("/api/v1/reports?vpg={}", w.vpg), None)
            .await["items"]
            .clone();
    let kinds: Vec<(&str, &str)> = reports
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("failover", "committed"),
            ("failover", "rolled_back"),
            ("failover_test", "stopped")
        ],
        "{t:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_has_rpo_zero_and_rolls_back() {
    let _g = SERIAL.lock().await;
    let w = World::new().await;
    // The last writes before the move: a move must carry them (RPO 0).
    for vm in ["app", "db"] {
        write(&w.prot, vm, &["write -P 0x6d 3M 128k".into()]).await;
    }
    let mut sources = Vec::new();
    for vm in ["app", "db"] {
        sources.push(copy_export(&w.prot.nbd_url(vm), &w.lab.path(&format!("{vm}.last"))).await);
    }
    // A checkpoint cannot be chosen for a move.
    let (st, p) =
        w.m.call(
            "POST",
            &format!("/api/v1/vpgs/{}/move", w.vpg),
            Some(json!({"checkpoint": "latest"})),
        )
        .await;
    assert_eq!(st.as_u16(), 422, "{p}");
    let t = w
        .post(&format!("/api/v1/vpgs/{}/move", w.vpg), json!({}))
        .await;
    let id = t["id"].as_str().unwrap().to_string();
    let t = w.wait_task(&id, "waiting").await;
    let v = w.m.vpg(&w.vpg).await;
    assert_eq!(v["sub_status"], "moving_before_commit", "{v}");
    let cp = w.m.checkpoints(&w.vpg, true).await;
    let fin = cp
        .iter()
        .find(|c| c["tag"] == "move: final checkpoint")
        .expect("final checkpoint");
    assert_eq!(t["details"]["checkpoint_id"], fin["id"], "{t:#}");
    assert_recovered_equal(&w, &t, &sources, "move").await;
    // While a move waits, the locked originals refuse to start.
    let app = w.m.vm("app").await.unwrap();
    assert_eq!(app["power_state"], "off", "{app}");
    w.post(&format!("/api/v1/vpgs/{}/rollback", w.vpg), json!({}))
        .await;
    w.wait_task(&id, "succeeded").await;
    let app = w.m.vm("app").await.unwrap();
    assert_eq!(app["power_state"], "on", "{app}");
    let reports =
        w.m.ok("GET", &format!("/api/v1/reports?vpg={}", w.vpg), None)
            .await["items"]
            .clone();
    assert_eq!(reports[0]["kind"], "move");
    assert_eq!(reports[0]["result"], "rolled_back");
}

/// The manager aborts at a step boundary (injected), is restarted, and the operation
/// goes on to a consistent end: up before commit with the right bytes, then rolled
/// back, every time; finally a commit interrupted before its promotion completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_killed_at_every_step_boundary_of_a_failover_and_a_move_resumes_it() {
    let _g = SERIAL.lock().await;
    let mut w = World::new().await;
    let (tagged, sources) = w.tagged_sources("crash").await;
    let _ = &w.token;
    let boundaries = [
        "prepare:after",
        "bump_fencing:before",
        "bump_fencing:after",
        "shut_down_protected:after",
        "recover:before",
        "recover:after",
        "power_on:after",
    ];
    for fault in boundaries {
        w.m.stop().await;
        w.m.env = vec![("BULWARK_FAULT_STEP".into(), fault.into())];
        w.m.spawn().await;
        w.m.wait_hosts_connected(&["prot", "rec"], &w.agents())
            .await;
        let t = w
            .post(
                &format!("/api/v1/vpgs/{}/failover", w.vpg),
                json!({"checkpoint": tagged.to_string()}),
            )
            .await;
        let id = t["id"].as_str().unwrap().to_string();
        assert!(
            w.m.wait_exit(Duration::from_secs(60)).await,
            "{fault}: the manager did not abort"
        );
        w.m.env.clear();
        w.m.spawn().await;
        let t = w.wait_task(&id, "waiting").await;
        assert_recovered_equal(&w, &t, &sources, fault).await;
        w.post(&format!("/api/v1/vpgs/{}/rollback", w.vpg), json!({}))
            .await;
        w.wait_task(&id, "succeeded").await;
        let app = w.m.vm("app").await.unwrap();
        assert_eq!(app["power_state"], "on", "{fault}: {app}");
        w.m.wait_vpg(&w.vpg, "Meeting SLA", SLA_WAIT, &w.agents(), meeting_sla)
            .await;
    }
    // A move killed around its final checkpoint still comes up with the last write
    // made before the shutdown (RPO 0).
    for (i, fault) in [
        "shut_down_protected:after",
        "final_checkpoint:before",
        "final_checkpoint:after",
    ]
    .into_iter()
    .enumerate()
    {
        let mut last = Vec::new();
        for vm in ["app", "db"] {
            write(&w.prot, vm, &[format!("write -P {} 2M 64k", 0x90 + i)]).await;
            last.push(copy_export(&w.prot.nbd_url(vm), &w.lab.path(&format!("{vm}-{i}.mv"))).await);
        }
        w.m.stop().await;
        w.m.env = vec![("BULWARK_FAULT_STEP".into(), fault.into())];
        w.m.spawn().await;
        w.m.wait_hosts_connected(&["prot", "rec"], &w.agents())
            .await;
        let t = w
            .post(&format!("/api/v1/vpgs/{}/move", w.vpg), json!({}))
            .await;
        let id = t["id"].as_str().unwrap().to_string();
        assert!(
            w.m.wait_exit(Duration::from_secs(60)).await,
            "move {fault}: the manager did not abort"
        );
        w.m.env.clear();
        w.m.spawn().await;
        let t = w.wait_task(&id, "waiting").await;
        assert_recovered_equal(&w, &t, &last, &format!("move-{fault}")).await;
        w.post(&format!("/api/v1/vpgs/{}/rollback", w.vpg), json!({}))
            .await;
        w.wait_task(&id, "succeeded").await;
        w.m.wait_vpg(&w.vpg, "Meeting SLA", SLA_WAIT, &w.agents(), meeting_sla)
            .await;
    }
    // A commit killed before its promotion ends Recovered with the bytes of the
    // checkpoint.
    for fault in ["promote:before"] {
        w.m.stop().await;
        w.m.env = vec![("BULWARK_FAULT_STEP".into(), fault.into())];
        w.m.spawn().await;
        w.m.wait_hosts_connected(&["prot", "rec"], &w.agents())
            .await;
        let t = w
            .post(
                &format!("/api/v1/vpgs/{}/failover", w.vpg),
                json!({"checkpoint": tagged.to_string()}),
            )
            .await;
        let id = t["id"].as_str().unwrap().to_string();
        w.wait_task(&id, "waiting").await;
        w.post(&format!("/api/v1/vpgs/{}/commit", w.vpg), json!({}))
            .await;
        assert!(
            w.m.wait_exit(Duration::from_secs(60)).await,
            "{fault}: no abort"
        );
        w.m.env.clear();
        w.m.spawn().await;
        let t = w.wait_task(&id, "succeeded").await;
        assert_recovered_equal(&w, &t, &sources, fault).await;
        w.m.wait_vpg(&w.vpg, "Recovered", SLA_WAIT, &w.agents(), |v| {
            v["status"] == "recovered"
        })
        .await;
    }
}

/// The bytes behind each export (in the order given).
async fn read_all(w: &World, exports: &[(String, String)], what: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (vm, url) in exports {
        out.push(copy_export(url, &w.lab.path(&format!("{vm}-{what}.raw"))).await);
    }
    out
}

/// A move committed with reverse protection, writes at the new primary, then a move
/// back (failback) committed with reverse protection again: the original site runs
/// with every write made at the recovery site, and protection runs the original way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn move_commit_with_reverse_protection_then_failback() {
    let _g = SERIAL.lock().await;
    let w = World::new().await;
    for vm in ["app", "db"] {
        write(&w.prot, vm, &["write -P 0x31 1M 256k".into()]).await;
    }
    let mut sources = Vec::new();
    for vm in ["app", "db"] {
        sources.push(copy_export(&w.prot.nbd_url(vm), &w.lab.path(&format!("{vm}.out"))).await);
    }
    // The definition cannot change while an operation runs.
    let t = w
        .post(&format!("/api/v1/vpgs/{}/move", w.vpg), json!({}))
        .await;
    let out = t["id"].as_str().unwrap().to_string();
    for (method, body) in [
        ("DELETE", None),
        ("PATCH", Some(json!({"description": "x"}))),
    ] {
        let (st, p) =
            w.m.call(method, &format!("/api/v1/vpgs/{}", w.vpg), body)
                .await;
        assert_eq!(st.as_u16(), 409, "{method}: {p}");
        assert_eq!(p["code"], "vpg.operation_running", "{method}: {p}");
    }
    let t = w.wait_task(&out, "waiting").await;
    assert_recovered_equal(&w, &t, &sources, "out").await;
    w.post(
        &format!("/api/v1/vpgs/{}/commit", w.vpg),
        json!({"reverse_protection": true}),
    )
    .await;
    let t = w.wait_task(&out, "succeeded").await;
    let at_rec = w.exports_at(&w.rec, &t);
    w.m.wait_vpg(
        &w.vpg,
        "Meeting SLA in reverse",
        SLA_WAIT,
        &w.agents(),
        meeting_sla,
    )
    .await;
    let v = w.m.vpg(&w.vpg).await;
    assert_eq!(
        v["recovery_site_id"],
        w.m.site_id("prod").await,
        "roles swapped: {v}"
    );
    let rec_id = w.m.host("rec").await.unwrap()["id"].clone();
    for vm in ["app", "db"] {
        let row = w.m.vm(vm).await.unwrap();
        assert_eq!(
            row["host_id"], rec_id,
            "{vm} runs at the recovery site: {row}"
        );
        assert_eq!(row["power_state"], "on", "{row}");
    }

    // The recovery site is primary now: its writes must come home.
    for (i, (_, url)) in at_rec.iter().enumerate() {
        let o = qemu_io(
            url,
            "none",
            &[
                format!("write -P {} 2M 512k", 0x41 + i),
                "write -P 0x4f 0 4k".into(),
            ],
            Duration::from_secs(30),
        )
        .await;
        assert_qemu_ok(&o);
    }
    wait_quiet(&w.rec).await;
    let sources_back = read_all(&w, &at_rec, "at-rec").await;
    assert_ne!(
        sources_back, sources,
        "the writes at the recovery site changed the disks"
    );

    // Failback: a move back, committed with reverse protection.
    let t = w
        .post(&format!("/api/v1/vpgs/{}/move", w.vpg), json!({}))
        .await;
    let back = t["id"].as_str().unwrap().to_string();
    let t = w.wait_task(&back, "waiting").await;
    let at_prot = w.exports_at(&w.prot, &t);
    assert_eq!(at_prot.len(), 2, "{t:#}");
    let got = read_all(&w, &at_prot, "back-before-commit").await;
    assert!(
        got == sources_back,
        "the move back carries every write made at rec"
    );
    w.post(
        &format!("/api/v1/vpgs/{}/commit", w.vpg),
        json!({"reverse_protection": true}),
    )
    .await;
    let t = w.wait_task(&back, "succeeded").await;
    let got = read_all(&w, &w.exports_at(&w.prot, &t), "home").await;
    assert!(
        got == sources_back,
        "after failback the original site has rec's writes"
    );
    w.m.wait_vpg(
        &w.vpg,
        "Meeting SLA after failback",
        SLA_WAIT,
        &w.agents(),
        meeting_sla,
    )
    .await;
    let v = w.m.vpg(&w.vpg).await;
    assert_eq!(v["recovery_site_id"], w.m.site_id("dr").await, "{v}");
    let prot_id = w.m.host("prot").await.unwrap()["id"].clone();
    for vm in ["app", "db"] {
        let row = w.m.vm(vm).await.unwrap();
        assert_eq!(row["host_id"], prot_id, "{vm} is home: {row}");
        assert_eq!(row["power_state"], "on", "{row}");
    }
    let reports =
        w.m.ok("GET", &format!("/api/v1/reports?vpg={}", w.vpg), None)
            .await["items"]
            .clone();
    let kinds: Vec<(&str, &str)> = reports
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["kind"].as_str().unwrap(), r["result"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("move", "committed_reverse_protected"),
            ("move", "committed_reverse_protected")
        ]
    );
}

/// The protected host dies; the VPG fails over and is committed; the old primary comes
/// back with its old state. Its stream carries the old fencing generation and is
/// refused: nothing at the new primary changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_primary_after_a_committed_failover_is_fenced() {
    let _g = SERIAL.lock().await;
    let mut w = World::new().await;
    // Another VPG from the same host to the same recovery host keeps protecting: the
    // recovery host still accepts the old primary, so only fencing can refuse its
    // stale disks.
    let other =
        w.m.create_vpg(
            "blog",
            &["web"],
            "dr",
            "rec",
            json!({"checkpoint_interval_ms": 1000, "rpo_target_secs": 10}),
        )
        .await;
    w.m.wait_vpg(&other, "Meeting SLA", SLA_WAIT, &w.agents(), meeting_sla)
        .await;
    let (tagged, sources) = w.tagged_sources("disaster").await;
    w.prot.kill9().await;
    let t = w
        .post(
            &format!("/api/v1/vpgs/{}/failover", w.vpg),
            json!({"checkpoint": tagged.to_string()}),
        )
        .await;
    let id = t["id"].as_str().unwrap().to_string();
    let t = w.wait_task(&id, "waiting").await;
    assert_eq!(
        t["details"]["unreachable_hosts"],
        json!(["prot"]),
        "the dead host could not be shut down: {t:#}"
    );
    w.post(
        &format!("/api/v1/vpgs/{}/commit", w.vpg),
        json!({"reverse_protection": false}),
    )
    .await;
    let t = w.wait_task(&id, "succeeded").await;
    let exports = w.exports(&t);
    let before = read_all(&w, &exports, "committed").await;
    assert!(
        before == sources,
        "the committed disks are the checkpoint's"
    );
    let generation = w.m.vpg(&w.vpg).await["fencing_generation"].clone();
    assert_eq!(generation, json!(2), "the failover raised the generation");

    // The old primary returns with the state it died with, cut off from the manager (the
    // manager is down): it streams under its old generation, its guests write.
    w.m.stop().await;
    w.prot.spawn().await;
    for vm in ["app", "db"] {
        write(&w.prot, vm, &["write -P 0x66 0 1M".into()]).await;
    }
    w.prot
        .wait_status("the stale stream refused as fenced", &[], |s| {
            // Reported on the disks (sync errors) and the peer, whichever saw it last.
            format!("{s:?}").contains("a failover or move has happened since")
        })
        .await;
    let after = read_all(&w, &exports, "after-stale").await;
    assert!(
        after == before,
        "the stale primary changed the new primary's disks"
    );
    // Once the manager is back, the old primary learns the new generation and stops.
    w.m.spawn().await;
    w.prot
        .wait_status("stale protection stopped", &[], |s| {
            s.protected
                .iter()
                .filter(|d| d.name != "web")
                .all(|d| d.recovery_host.is_none())
        })
        .await;
    for vm in ["app", "db"] {
        write(&w.prot, vm, &["write -P 0x67 1M 1M".into()]).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = read_all(&w, &exports, "after-manager").await;
    assert!(
        after == before,
        "the stale primary changed the new primary's disks"
    );
    let v = w.m.vpg(&w.vpg).await;
    assert_eq!(v["status"], "recovered", "{v}");
    assert_eq!(v["fencing_generation"], generation, "{v}");
    // The other VPG is protected again from the returned host.
    w.m.wait_vpg(&other, "other VPG back", SLA_WAIT, &w.agents(), meeting_sla)
        .await;
}

/// With the manager and the protected site gone, `bulwark agent recover` on the
/// recovery host brings the VPG up from what the manager had told it (desired state),
/// at the latest checkpoint, and `bulwark agent end-recovery --commit` makes it stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_recovery_with_the_manager_stopped() {
    let _g = SERIAL.lock().await;
    let mut w = World::new().await;
    let (_, sources) = w.tagged_sources("last-good").await;
    // The disaster: the protected site and the manager are gone.
    w.prot.kill9().await;
    w.m.stop().await;
    let data_dir = w.rec.data_dir.to_str().unwrap().to_string();
    let o = run(
        env!("CARGO_BIN_EXE_bulwark"),
        &[
            "agent".into(),
            "recover".into(),
            "--data-dir".into(),
            data_dir,
            "--vpg".into(),
            "shop".into(),
        ],
        Duration::from_secs(60),
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let mut urls: Vec<(String, String)> = out
        .lines()
        .filter_map(|l| {
            let url = l.split_whitespace().find(|w| w.starts_with("nbd://"))?;
            let vm = if l.contains("app") { "app" } else { "db" };
            Some((vm.to_string(), url.to_string()))
        })
        .collect();
    urls.sort();
    assert_eq!(urls.len(), 2, "one export per disk: {out}");
    let got = read_all(&w, &urls, "break-glass").await;
    assert!(
        got == sources,
        "break-glass disks are the last checkpoint's: {out}"
    );
    // A live recovery: the VMs keep their names and run.
    for vm in ["VM app (on)", "VM db (on)"] {
        assert!(out.contains(vm), "{vm}: {out}");
    }
    // Still no manager: the operator commits it on the host; the VMs are its own now.
    let op = out
        .split("operation ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no operation id printed: {out}"))
        .to_string();
    let o = run(
        env!("CARGO_BIN_EXE_bulwark"),
        &[
            "agent".into(),
            "end-recovery".into(),
            "--data-dir".into(),
            w.rec.data_dir.to_str().unwrap().to_string(),
            "--operation".into(),
            op,
            "--commit".into(),
        ],
        Duration::from_secs(120),
    )
    .await;
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    let report: Value = serde_json::from_str(out.split_once(": ").unwrap().1.trim())
        .unwrap_or_else(|e| panic!("{e}: {out}"));
    let mut urls = Vec::new();
    for vm in report["vms"].as_array().unwrap() {
        assert_eq!(vm["power_state"], "on", "{report}");
        for d in vm["disks"].as_array().unwrap() {
            urls.push((
                vm["source_vm"].as_str().unwrap().to_string(),
                w.rec.nbd_url(d["export"].as_str().unwrap()),
            ));
        }
    }
    urls.sort();
    let got = read_all(&w, &urls, "break-glass-committed").await;
    assert!(got == sources, "committed break-glass disks: {report}");
}

/// Open alerts of a kind for the VPG.
async fn open_alerts(w: &World, kind: &str) -> Vec<Value> {
    w.m.items(&format!(
        "/api/v1/alerts?vpg={}&kind={kind}&open=true",
        w.vpg
    ))
    .await
}

/// A test stopped by its time box raises `test_time_boxed`; a failed operation raises
/// `operation_failed` (and was rolled back); the next operation that ends as asked
/// clears both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operation_alerts_are_raised_and_cleared() {
    let _g = SERIAL.lock().await;
    let mut w = World::new().await;
    let t = w
        .post(
            &format!("/api/v1/vpgs/{}/failover-test", w.vpg),
            json!({"max_duration_secs": 1}),
        )
        .await;
    let id = t["id"].as_str().unwrap().to_string();
    let t = w.wait_task(&id, "succeeded").await;
    assert!(
        t["details"]["decision_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("time box"),
        "{t:#}"
    );
    let boxed = open_alerts(&w, "test_time_boxed").await;
    assert_eq!(boxed.len(), 1, "{boxed:?}");
    assert_eq!(boxed[0]["severity"], "warning");
    assert!(
        boxed[0]["message"].as_str().unwrap().contains("shop"),
        "{boxed:?}"
    );
    w.m.wait_vpg(&w.vpg, "Meeting SLA", SLA_WAIT, &w.agents(), meeting_sla)
        .await;

    // A step that fails before the decision: the test is undone and the task fails.
    w.m.stop().await;
    w.m.env = vec![("BULWARK_FAULT_STEP".into(), "power_on:fail".into())];
    w.m.spawn().await;
    w.m.wait_hosts_connected(&["prot", "rec"], &w.agents())
        .await;
    let t = w
        .post(&format!("/api/v1/vpgs/{}/failover-test", w.vpg), json!({}))
        .await;
    let id = t["id"].as_str().unwrap().to_string();
    let t = w.wait_task(&id, "failed").await;
    assert!(t["error"].as_str().unwrap().contains("power_on"), "{t:#}");
    let failed = open_alerts(&w, "operation_failed").await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["severity"], "error");
    assert!(
        w.m.vm("app - Test").await.is_none(),
        "the failed test's VMs were removed"
    );
    assert_eq!(open_alerts(&w, "test_time_boxed").await.len(), 1);

    // A restart keeps them open (no condition owns them), and a good test clears them.
    w.m.stop().await;
    w.m.env.clear();
    w.m.spawn().await;
    w.m.wait_hosts_connected(&["prot", "rec"], &w.agents())
        .await;
    w.m.wait_vpg(&w.vpg, "Meeting SLA", SLA_WAIT, &w.agents(), meeting_sla)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(open_alerts(&w, "operation_failed").await.len(), 1);
    let t = w
        .post(&format!("/api/v1/vpgs/{}/failover-test", w.vpg), json!({}))
        .await;
    let id = t["id"].as_str().unwrap().to_string();
    w.wait_task(&id, "waiting").await;
    // No body: the stop takes its defaults (result `passed`).
    let (st, p) =
        w.m.call(
            "POST",
            &format!("/api/v1/vpgs/{}/failover-test/stop", w.vpg),
            None,
        )
        .await;
    assert_eq!(st.as_u16(), 202, "{p}");
    w.wait_task(&id, "succeeded").await;
    assert!(open_alerts(&w, "operation_failed").await.is_empty());
    assert!(open_alerts(&w, "test_time_boxed").await.is_empty());
}
