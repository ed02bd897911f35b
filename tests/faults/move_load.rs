//! A planned move while the guests write (issue 18, item 4).
//!
//! Three VMs on two protected hosts, a guest writing to each through our NBD client
//! while `POST /vpgs/{id}/move` runs. The move bumps the VPG's fencing generation while
//! the streams are busy; the recovery host may learn the new generation before a
//! protected host does. That must cost at most a reconnect and a resend: no sync (nothing
//! was lost), no final checkpoint that never becomes recoverable, so the move comes up
//! in about the same time as an idle one, far inside the 10 s retake of the final
//! checkpoint. RPO 0: the recovered disks equal the protected disks as the shutdown left
//! them. Each move is rolled back and the next one starts under load again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark::agent::nbd::client::NbdClient;
use bulwark::proto::agent::AgentStatus;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::agent_common::*;
use crate::orch_common::*;

const MANAGER: &str =
    "heartbeat_ms = 200\ndisconnect_after_ms = 1500\ncheckpoint_hold_bound_ms = 200";
const SIZE: u64 = 8 * MIB;
/// Moves in a row: the race shows in about half of them without the fix.
const MOVES: usize = 3;
/// Up before commit within this (an idle move takes ~0.5 s; the final checkpoint's
/// retake waits 10 s).
const UP_BOUND: Duration = Duration::from_secs(3);
/// Bound of every wait of an operation.
const OP_WAIT: Duration = Duration::from_secs(40);

/// The VMs: two on `prot-a`, one on `prot-b`.
const VMS: [(&str, &str); 3] = [("prot-a", "vm-1"), ("prot-a", "vm-2"), ("prot-b", "vm-3")];

/// A guest writing 16 KiB blocks of random data at random places of its disk until
/// told to stop, its VM is shut down (the export closes its connection), or 60 s pass.
/// Returns how many writes were acknowledged.
fn guest(nbd: String, export: &'static str, seed: u64, stop: Arc<AtomicBool>) -> GuestTask {
    let acked = Arc::new(AtomicU64::new(0));
    let count = acked.clone();
    let handle = tokio::spawn(async move {
        let Ok(mut c) = NbdClient::connect(nbd.as_str(), export).await else {
            return;
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut buf = vec![0u8; 16 << 10];
        let deadline = Instant::now() + Duration::from_secs(60);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let off = rng.random_range(0..SIZE / buf.len() as u64) * buf.len() as u64;
            rng.fill(&mut buf[..]);
            match tokio::time::timeout(Duration::from_secs(5), c.write(off, &buf, false)).await {
                Ok(Ok(())) => {
                    count.fetch_add(1, Ordering::SeqCst);
                }
                // Shut down (connection closed) or stuck: this guest is done.
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(3)).await;
        }
    });
    GuestTask { acked, handle }
}

struct GuestTask {
    acked: Arc<AtomicU64>,
    handle: tokio::task::JoinHandle<()>,
}

fn protected_disks(s: &AgentStatus) -> Vec<String> {
    s.protected
        .iter()
        .filter(|d| d.recovery_host.is_some())
        .map(|d| {
            format!(
                "{}: mode {:?}, owes_sync {}, syncs {}, running {:?}, last {:?}",
                d.name,
                d.mode,
                d.owes_sync,
                d.sync.completed,
                d.sync.running.as_ref().map(|r| (r.kind, r.reason.clone())),
                d.sync
                    .last
                    .as_ref()
                    .map(|l| (l.kind, l.reason.clone(), l.result.clone())),
            )
        })
        .collect()
}

/// Completed syncs per protected disk of `s`, plus one for a running sync.
fn sync_count(s: &AgentStatus) -> u64 {
    s.protected
        .iter()
        .map(|d| d.sync.completed + u64::from(d.sync.running.is_some()))
        .sum()
}

/// Every replicated disk streams, owes nothing, has nothing queued and no sync running.
fn quiet(s: &AgentStatus) -> bool {
    s.protected.iter().all(|d| {
        d.recovery_host.is_none()
            || (d.queued_records == 0 && d.sync.running.is_none() && !d.owes_sync)
    })
}

async fn wait_task(m: &ManagerProc, id: &str, state: &str, agents: &[&AgentProc]) -> Value {
    let deadline = Instant::now() + OP_WAIT;
    loop {
        let t = m.ok("GET", &format!("/api/v1/tasks/{id}"), None).await;
        if t["state"] == state {
            return t;
        }
        assert!(
            t["state"] != "failed" && Instant::now() < deadline,
            "task {id} never reached {state}: {t:#}\n--- manager:\n{}{}",
            tail(&m.stderr(), 40),
            agent_logs(agents, 40)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lines of the agents' logs that tell the fencing race and its consequences.
fn race_lines(agents: &[&AgentProc]) -> String {
    let keys = [
        "fenced",
        "bitmap-only",
        "sync started",
        "disk set changed",
        "not recoverable",
    ];
    agents
        .iter()
        .flat_map(|a| {
            a.stderr()
                .lines()
                .filter(|l| keys.iter().any(|k| l.contains(k)))
                .map(|l| format!("{}: {l}", a.name))
                .collect::<Vec<_>>()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moves_under_guest_writes_take_no_sync_and_keep_rpo_zero() {
    let _g = crate::SERIAL.lock().await;
    let lab = Lab::new(&["prot-a", "prot-b", "rec"]);
    let db = PgDb::new().await;
    let m = ManagerProc::start(lab.dir.path(), &db.url, MANAGER).await;
    let token = m.enrolment_token().await;
    let vm = |n: &str, id| VmDef::new(n, id, SIZE);
    let pa = start_managed(
        &lab,
        &m,
        &token,
        "prot-a",
        "prod",
        false,
        &[vm("vm-1", 1), vm("vm-2", 2)],
        "",
    )
    .await;
    let pb = start_managed(
        &lab,
        &m,
        &token,
        "prot-b",
        "prod",
        false,
        &[vm("vm-3", 3)],
        "",
    )
    .await;
    let rec = start_managed(&lab, &m, &token, "rec", "dr", true, &[], "").await;
    let agents = [&pa, &pb, &rec];
    m.wait_hosts_connected(&["prot-a", "prot-b", "rec"], &agents)
        .await;
    let vpg = m
        .create_vpg(
            "busy",
            &["vm-1", "vm-2", "vm-3"],
            "dr",
            "rec",
            json!({"checkpoint_interval_ms": 1000, "rpo_target_secs": 10, "journal_history_secs": 3600}),
        )
        .await;
    m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &agents, |v| {
        v["status"] == "meeting_sla" && v["sub_status"] == "none"
    })
    .await;
    let host = |h: &str| if h == "prot-a" { &pa } else { &pb };

    let mut up_times = Vec::new();
    for round in 0..MOVES {
        for p in [&pa, &pb] {
            p.wait_status("streams quiet before the move", &[&rec], quiet)
                .await;
        }
        let syncs_before = sync_count(&pa.status().await) + sync_count(&pb.status().await);
        let sync_events_before = m
            .events(&format!("?vpg={vpg}&kind=agent.sync_started"))
            .await
            .len();

        // The guests write; the streams are busy when the move starts.
        let stop = Arc::new(AtomicBool::new(false));
        let guests: Vec<GuestTask> = VMS
            .iter()
            .enumerate()
            .map(|(i, (h, name))| {
                guest(
                    host(h).endpoints.nbd.clone(),
                    name,
                    (round * 10 + i) as u64,
                    stop.clone(),
                )
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let t0 = Instant::now();
        let t = m
            .ok("POST", &format!("/api/v1/vpgs/{vpg}/move"), Some(json!({})))
            .await;
        let id = t["id"].as_str().unwrap().to_string();
        let t = wait_task(&m, &id, "waiting", &agents).await;
        let up = t0.elapsed();
        stop.store(true, Ordering::SeqCst);
        let mut writes = 0;
        for g in guests {
            tokio::time::timeout(Duration::from_secs(10), g.handle)
                .await
                .expect("guest stops")
                .unwrap();
            writes += g.acked.load(Ordering::SeqCst);
        }
        eprintln!("move {round}: up before commit after {up:?}; {writes} guest writes");
        up_times.push(up);
        assert!(writes > 30, "the guests wrote during the move: {writes}");

        // No sync because of the fencing change: nothing was lost.
        let (sa, sb) = (pa.status().await, pb.status().await);
        let syncs = sync_count(&sa) + sync_count(&sb);
        let sync_events = m
            .events(&format!("?vpg={vpg}&kind=agent.sync_started"))
            .await;
        assert!(
            syncs == syncs_before && sync_events.len() == sync_events_before,
            "move {round}: a sync ran ({syncs_before} → {syncs} syncs, {sync_events_before} → {} \
             sync_started events: {:#?})\n{:#?}\n{:#?}\n--- race:\n{}",
            sync_events.len(),
            sync_events.iter().take(3).collect::<Vec<_>>(),
            protected_disks(&sa),
            protected_disks(&sb),
            race_lines(&agents)
        );

        // No final checkpoint left behind that can never be recovered.
        let cps = m.checkpoints(&vpg, false).await;
        let stale: Vec<&Value> = cps
            .iter()
            .filter(|c| c["tag"] == "move: final checkpoint" && c["recoverable"] != true)
            .collect();
        assert!(
            stale.is_empty(),
            "move {round}: unrecoverable final checkpoints listed: {stale:#?}\n{}",
            race_lines(&agents)
        );
        let fin = t["details"]["checkpoint_id"].as_i64().unwrap();
        assert!(
            cps.iter()
                .any(|c| c["id"].as_i64() == Some(fin) && c["recoverable"] == true),
            "move {round}: the final checkpoint {fin} is listed recoverable"
        );

        assert!(
            up <= UP_BOUND,
            "move {round}: up before commit after {up:?} (bound {UP_BOUND:?}); task: {t:#}\n--- race:\n{}",
            race_lines(&agents)
        );

        // RPO 0: each recovered disk equals its protected disk as the shutdown left it
        // (the VMs are off and locked: nothing writes to them).
        let mut exports = Vec::new();
        for r in t["details"]["recovered"].as_array().unwrap() {
            for v in r["vms"].as_array().unwrap() {
                for d in v["disks"].as_array().unwrap() {
                    exports.push((
                        v["source_vm"].as_str().unwrap().to_string(),
                        d["export"].as_str().unwrap().to_string(),
                    ));
                }
            }
        }
        assert_eq!(exports.len(), 3, "{t:#}");
        for (h, name) in VMS {
            let (_, export) = exports.iter().find(|(v, _)| v == name).unwrap();
            let src =
                std::fs::read(host(h).data_dir.join("disks").join(format!("{name}.img"))).unwrap();
            let got = copy_export(
                &rec.nbd_url(export),
                &lab.path(&format!("{name}-{round}.rec")),
            )
            .await;
            assert_same(
                &format!("move {round}: recovered {name} at the final checkpoint"),
                &got,
                &src,
            );
        }

        m.ok(
            "POST",
            &format!("/api/v1/vpgs/{vpg}/rollback"),
            Some(json!({})),
        )
        .await;
        wait_task(&m, &id, "succeeded", &agents).await;
    }
    eprintln!("moves under load came up after {up_times:?}");
    // How often the race happened (it is not forced; the assertions hold either way).
    let logs: String = agents.iter().map(|a| a.stderr()).collect();
    eprintln!(
        "fenced while connected: {}; Hellos refused by fencing: {}",
        logs.matches("stream fenced while connected").count(),
        logs.matches("disk's stream fenced").count()
    );
}
