//! Checkpoint rounds across hosts, recoverability from journal reports, and the VPG
//! status the evaluator derives from live facts: the real manager, fake agents over the
//! control WebSocket, on SQLite and PostgreSQL.
//!
//! Each fake agent runs in a task ([`Sim`]) that heartbeats every 100 ms with the status
//! the test sets, answers desired state, and answers checkpoint rounds the way the test
//! says (promptly, late, never, or releasing by itself). Everything the manager sends is
//! logged with its arrival time, next to the time each Held was sent, so a test can
//! check the order across hosts.

use crate::fake_agent::{kernel_boot, nic, vm, vm_with, FakeAgent};
use crate::helpers::{assert_problem, spawn_app_with, Backend, ControlSettings, TestApp};
use bulwark::proto::agent::{AgentStatus, PeerStatus, ProtectedDiskStatus};
use bulwark::proto::control::{
    AgentMessage, CommandBody, Heartbeat, JournalReport, ManagerMessage, QuiesceMethod, RoundHeld,
    RoundReleased,
};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How a fake agent answers `Hold`.
#[derive(Debug, Clone, Copy)]
enum HoldMode {
    /// Held after this delay; Released on time when released.
    Answer(Duration),
    /// Never answers.
    Silent,
    /// Held at once, but answers the Release as if it had let go by itself.
    ReleasedLate,
}

enum Cmd {
    Protected(Vec<ProtectedDiskStatus>),
    Peers(Vec<PeerStatus>),
    /// Sent in the next heartbeat only (reports are incremental).
    Journals(Vec<JournalReport>),
    Mode(HoldMode),
    /// How the agent says it quiesced a round's VMs when a Hold asks it to (default:
    /// `guest_agent`; `None`: it does not say).
    Quiesce(Option<QuiesceMethod>),
    /// Answered once every command before it is applied.
    Ping(tokio::sync::oneshot::Sender<()>),
    Disconnect,
}

/// Something that happened, in order.
#[derive(Debug, Clone)]
enum Seen {
    Got(String, Instant, ManagerMessage),
    SentHeld(String, Instant, u64),
}

type Log = Arc<Mutex<Vec<Seen>>>;

struct Sim {
    tx: mpsc::UnboundedSender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

impl Sim {
    fn start(agent: FakeAgent, log: Log) -> Sim {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(sim_loop(agent, rx, log));
        Sim { tx, task }
    }

    fn set(&self, c: Cmd) {
        let _ = self.tx.send(c);
    }

    /// Sets and waits until the agent applied it (before the test makes the manager act).
    async fn set_now(&self, c: Cmd) {
        self.set(c);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.set(Cmd::Ping(tx));
        let _ = rx.await;
    }

    async fn disconnect(self) {
        let _ = self.tx.send(Cmd::Disconnect);
        let _ = self.task.await;
    }
}

async fn sim_loop(mut a: FakeAgent, mut rx: mpsc::UnboundedReceiver<Cmd>, log: Log) {
    let host = a.host_name.clone();
    let mut status: AgentStatus = a.status();
    let mut journals: Vec<JournalReport> = Vec::new();
    let mut mode = HoldMode::Answer(Duration::ZERO);
    let mut quiesce = Some(QuiesceMethod::GuestAgent);
    let mut due_helds: Vec<(Instant, RoundHeld)> = Vec::new();
    let mut held_at: std::collections::HashMap<u64, Instant> = Default::default();
    let mut next_hb = Instant::now();
    loop {
        while let Ok(c) = rx.try_recv() {
            match c {
                Cmd::Protected(p) => status.protected = p,
                Cmd::Peers(p) => status.peers = p,
                Cmd::Journals(j) => journals.extend(j),
                Cmd::Mode(m) => mode = m,
                Cmd::Quiesce(q) => quiesce = q,
                Cmd::Ping(tx) => {
                    let _ = tx.send(());
                }
                Cmd::Disconnect => {
                    a.drop_hard();
                    return;
                }
            }
        }
        if Instant::now() >= next_hb {
            let hb = Heartbeat {
                status: status.clone(),
                journals: std::mem::take(&mut journals),
                desired_version: a.desired_version,
                recoveries: Vec::new(),
            };
            a.send(AgentMessage::Heartbeat(hb)).await;
            next_hb = Instant::now() + Duration::from_millis(100);
        }
        let now = Instant::now();
        let (ready, later): (Vec<_>, Vec<_>) = due_helds.into_iter().partition(|(t, _)| *t <= now);
        due_helds = later;
        for (_, h) in ready {
            let round = h.round;
            log.lock()
                .unwrap()
                .push(Seen::SentHeld(host.clone(), Instant::now(), round));
            held_at.insert(round, Instant::now());
            a.send(AgentMessage::Held(h)).await;
        }
        let Some(m) = a.recv_within(Duration::from_millis(10)).await else {
            continue;
        };
        let Some(m) = m else { return };
        log.lock()
            .unwrap()
            .push(Seen::Got(host.clone(), Instant::now(), m.clone()));
        match m {
            ManagerMessage::Desired(d) => {
                a.desired_version = Some(d.version);
                a.applied(d.version).await;
            }
            ManagerMessage::Hold(h) => {
                let held = RoundHeld {
                    round: h.round,
                    vpg_id: h.vpg_id.clone(),
                    timestamp_ms: chrono::Utc::now().timestamp_millis(),
                    disks: vec![],
                    error: None,
                    quiesce: if h.quiesce.is_empty() { None } else { quiesce },
                };
                match mode {
                    HoldMode::Answer(d) => due_helds.push((Instant::now() + d, held)),
                    HoldMode::ReleasedLate => due_helds.push((Instant::now(), held)),
                    HoldMode::Silent => {}
                }
            }
            ManagerMessage::Release { round } => {
                let hold_us = held_at
                    .get(&round)
                    .map_or(0, |t| t.elapsed().as_micros() as u64);
                a.send(AgentMessage::Released(RoundReleased {
                    round,
                    vpg_id: String::new(),
                    hold_us,
                    on_time: !matches!(mode, HoldMode::ReleasedLate),
                }))
                .await;
            }
            _ => {}
        }
    }
}

/// A protected disk in `group`, optionally running a sync of `running` kind.
fn disk(
    id: u64,
    name: &str,
    group: &str,
    recovery: &str,
    running: Option<&str>,
) -> ProtectedDiskStatus {
    let sync = match running {
        Some(kind) => json!({
            "phase": "running", "detail": null, "completed": 0, "last": null,
            "running": {"kind": kind, "reason": "the disk has no replica yet", "started_ms": 0,
                "bytes_total": 100, "bytes_done": 10, "percent": 10, "bytes_per_sec": 1,
                "eta_secs": null, "blocks_compared": 0, "blocks_sent": 0, "data_bytes": 0,
                "wire_bytes": 0}
        }),
        None => {
            json!({"phase": "idle", "detail": null, "running": null, "last": null, "completed": 1})
        }
    };
    serde_json::from_value(json!({
        "name": name, "disk_id": id, "size_bytes": 1u64 << 30, "export": name,
        "group": group, "recovery_host": recovery, "mode": "streaming",
        "start_state": "new", "start_al_extents": 0, "dirty_regions": 0, "region_size": 65536,
        "queued_records": 0, "queued_bytes": 0, "spilled_bytes": 0, "oldest_unacked_ms": 0,
        "last_seq": 0, "acked_seq": 0, "epoch": 1, "owes_sync": false, "replica_behind": false,
        "sync": sync,
    }))
    .unwrap()
}

fn peer(host: &str, connected: bool) -> PeerStatus {
    PeerStatus {
        host_name: host.into(),
        address: "127.0.0.1:9701".into(),
        connected,
        last_error: None,
    }
}

fn journal(disk_id: u64, ids: &[u64], oldest: Option<u64>) -> JournalReport {
    JournalReport {
        host: if disk_id == 1 { "esx-a" } else { "esx-b" }.into(),
        disk_id,
        recoverable: ids.to_vec(),
        oldest_recoverable: oldest,
        newest_recoverable: ids.iter().max().copied(),
        journal_bytes: 4096,
        storage_error: None,
    }
}

fn settings() -> ControlSettings {
    ControlSettings {
        heartbeat: Duration::from_millis(100),
        disconnect_after: Duration::from_secs(3),
        // Generous: the machine is shared by several builds; the silent-host tests wait
        // this long once.
        hold_bound: Duration::from_millis(1500),
        ..ControlSettings::default()
    }
}

/// Two protected hosts (esx-a: vm-a with disk 1, a QEMU VM booting a kernel with one
/// NIC; esx-b: vm-b with disk 2, simulated) and a recovery host, each a running [`Sim`],
/// and a VPG protecting both VMs (no scheduled rounds unless `interval_ms` is short).
struct Lab {
    a: Sim,
    b: Option<Sim>,
    dr: Sim,
    log: Log,
    vpg: String,
}

async fn vm_id(app: &TestApp, name: &str) -> String {
    app.eventually(&format!("VM {name} registered"), || async {
        let (_, v) = app.get(&format!("/api/v1/vms?name={name}")).await;
        v["items"][0]["id"].as_str().map(str::to_string)
    })
    .await
}

async fn lab(app: &TestApp, two_hosts: bool, interval_ms: u32, rpo_secs: u32) -> Lab {
    let log: Log = Arc::default();
    let a = app
        .agent(
            "esx-a",
            "prod",
            vec![vm_with(
                "vm-a",
                &[(1, "vm-a-root", 1 << 30)],
                Some(kernel_boot()),
                vec![nic(Some("lan"), Some("52:54:00:00:00:0a"))],
            )],
        )
        .await;
    let b = if two_hosts {
        Some(
            app.agent(
                "esx-b",
                "prod",
                vec![vm("vm-b", &[(2, "vm-b-root", 1 << 30)])],
            )
            .await,
        )
    } else {
        None
    };
    let dr = app.agent("esx-dr", "dr", vec![]).await;
    let dr_id = app.host_id("esx-dr").await;
    let (_, hosts) = app.get(&format!("/api/v1/hosts/{dr_id}")).await;
    let dr_site = hosts["site_id"].as_str().unwrap().to_string();
    let mut members = vec![json!({"vm_id": vm_id(app, "vm-a").await, "recovery_host_id": dr_id})];
    if two_hosts {
        members.push(json!({"vm_id": vm_id(app, "vm-b").await, "recovery_host_id": dr_id}));
    }
    let vpg = app
        .create(
            "/api/v1/vpgs",
            json!({"name": "web", "recovery_site_id": dr_site, "members": members,
                "settings": {"checkpoint_interval_ms": interval_ms, "rpo_target_secs": rpo_secs}}),
        )
        .await;
    Lab {
        a: Sim::start(a, log.clone()),
        b: b.map(|b| Sim::start(b, log.clone())),
        dr: Sim::start(dr, log.clone()),
        log,
        vpg,
    }
}

impl Lab {
    fn protect(&self, running: Option<&str>) {
        self.a.set(Cmd::Protected(vec![disk(
            1,
            "vm-a-root",
            &self.vpg,
            "esx-dr",
            running,
        )]));
        self.a.set(Cmd::Peers(vec![peer("esx-dr", true)]));
        if let Some(b) = &self.b {
            b.set(Cmd::Protected(vec![disk(
                2,
                "vm-b-root",
                &self.vpg,
                "esx-dr",
                running,
            )]));
            b.set(Cmd::Peers(vec![peer("esx-dr", true)]));
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.log.lock().unwrap().clone()
    }

    fn got(&self, host: &str) -> Vec<ManagerMessage> {
        self.seen()
            .into_iter()
            .filter_map(|s| match s {
                Seen::Got(h, _, m) if h == host => Some(m),
                _ => None,
            })
            .filter(|m| !matches!(m, ManagerMessage::Desired(_) | ManagerMessage::Command(_)))
            .collect()
    }
}

/// Waits until a round may start: both hosts report the VPG's disks.
async fn ready(app: &TestApp, lab: &Lab) {
    app.eventually("VPG protecting", || async {
        let (_, v) = app.get(&format!("/api/v1/vpgs/{}", lab.vpg)).await;
        (v["sub_status"] != "creating_vpg").then_some(())
    })
    .await;
}

async fn checkpoints(app: &TestApp, vpg: &str) -> Vec<Value> {
    let (s, v) = app.get(&format!("/api/v1/vpgs/{vpg}/checkpoints")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["items"].as_array().unwrap().clone()
}

async fn tag(app: &TestApp, vpg: &str, t: &str) -> (StatusCode, Value) {
    app.post(
        &format!("/api/v1/vpgs/{vpg}/checkpoints"),
        json!({"tag": t}),
    )
    .await
}

async fn event_kinds(app: &TestApp, vpg: &str) -> Vec<String> {
    let (_, ev) = app
        .get(&format!("/api/v1/events?vpg={vpg}&limit=1000"))
        .await;
    ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_string())
        .collect()
}

macro_rules! both_ctl {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let app = spawn_app_with(Backend::Sqlite, settings()).await;
                ($body)(app).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let app = spawn_app_with(Backend::Postgres, settings()).await;
                ($body)(app).await;
            }
        }
    };
}

both_ctl!(
    round_releases_only_after_every_host_held,
    |app: TestApp| async move {
        let lab = lab(&app, true, 3_600_000, 7200).await;
        lab.protect(None);
        ready(&app, &lab).await;
        // esx-b answers 300 ms late: esx-a must hold all that time.
        lab.b
            .as_ref()
            .unwrap()
            .set_now(Cmd::Mode(HoldMode::Answer(Duration::from_millis(300))))
            .await;
        let (s, c) = tag(&app, &lab.vpg, "before upgrade").await;
        assert_eq!(s, StatusCode::CREATED, "{c}");
        assert_eq!(c["kind"], "user_tagged");
        assert_eq!(c["tag"], "before upgrade");
        assert_eq!(c["recoverable"], false);
        let round = c["id"].as_u64().unwrap();

        let seen = lab.seen();
        let b_held = seen
            .iter()
            .find_map(|s| match s {
                Seen::SentHeld(h, t, r) if h == "esx-b" && *r == round => Some(*t),
                _ => None,
            })
            .expect("esx-b sent Held");
        for host in ["esx-a", "esx-b"] {
            let release = seen
                .iter()
                .find_map(|s| match s {
                    Seen::Got(h, t, ManagerMessage::Release { round: r })
                        if h == host && *r == round =>
                    {
                        Some(*t)
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{host} got no Release"));
            assert!(release >= b_held, "{host} released before esx-b held");
            let msgs = lab.got(host);
            assert!(
                matches!(&msgs[..], [ManagerMessage::Hold(h), ManagerMessage::Release { round: r }]
                if h.round == round && *r == round && h.barrier && h.quiesce.is_empty()
                    && h.tag.as_deref() == Some("before upgrade") && h.vpg_id == lab.vpg),
                "{host}: {msgs:?}"
            );
        }
        let rows = checkpoints(&app, &lab.vpg).await;
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0]["id"].as_u64(), Some(round));
        assert!(event_kinds(&app, &lab.vpg)
            .await
            .contains(&"checkpoint.created".to_string()));

        // App-consistent: each host is told to quiesce its own member VMs.
        let (s, c) = app
            .post(
                &format!("/api/v1/vpgs/{}/checkpoints", lab.vpg),
                json!({"tag": "db", "app_consistent": true}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{c}");
        assert_eq!(c["kind"], "app_consistent");
        assert!(c["id"].as_u64().unwrap() > round, "round ids increase");
        let quiesced = lab.got("esx-b").into_iter().find_map(|m| match m {
            ManagerMessage::Hold(h) if h.tag.as_deref() == Some("db") => Some(h.quiesce),
            _ => None,
        });
        assert_eq!(quiesced, Some(vec!["vm-b".to_string()]));
    }
);

/// (kind, quiesce, app_consistent) of a checkpoint as the API shows it.
fn consistency(c: &Value) -> (String, Value, bool) {
    (
        c["kind"].as_str().unwrap().to_string(),
        c["quiesce"].clone(),
        c["app_consistent"].as_bool().unwrap(),
    )
}

both_ctl!(
    a_round_is_as_consistent_as_its_least_quiesced_host_and_recovery_boots_as_protected,
    |app: TestApp| async move {
        let lab = lab(&app, true, 3_600_000, 7200).await;
        lab.protect(None);
        ready(&app, &lab).await;
        let b = lab.b.as_ref().unwrap();
        let app_consistent = |t: &'static str| {
            let app = &app;
            let vpg = lab.vpg.clone();
            async move {
                let (s, c) = app
                    .post(
                        &format!("/api/v1/vpgs/{vpg}/checkpoints"),
                        json!({"tag": t, "app_consistent": true}),
                    )
                    .await;
                assert_eq!(s, StatusCode::CREATED, "{t}: {c}");
                c
            }
        };
        let s = |v: &str| v.to_string();
        // Every guest agent froze its file systems: application consistent.
        let frozen = app_consistent("frozen").await;
        assert_eq!(
            consistency(&frozen),
            (s("app_consistent"), json!("guest_agent"), true)
        );
        // esx-b's guest has no agent: its CPUs were paused. Crash consistent only, and
        // a tagged round says so by its kind.
        b.set_now(Cmd::Quiesce(Some(QuiesceMethod::Paused))).await;
        let paused = app_consistent("paused").await;
        assert_eq!(
            consistency(&paused),
            (s("user_tagged"), json!("paused"), false)
        );
        // A host that does not say how it quiesced counts as paused.
        b.set_now(Cmd::Quiesce(None)).await;
        let unsaid = app_consistent("unsaid").await;
        assert_eq!(
            consistency(&unsaid),
            (s("user_tagged"), json!("paused"), false)
        );
        // A plain tagged round asks nobody to quiesce.
        b.set_now(Cmd::Quiesce(Some(QuiesceMethod::GuestAgent)))
            .await;
        let (st, plain) = tag(&app, &lab.vpg, "plain").await;
        assert_eq!(st, StatusCode::CREATED, "{plain}");
        assert_eq!(consistency(&plain), (s("user_tagged"), Value::Null, false));
        // The rows say the same as the answers.
        let rows = checkpoints(&app, &lab.vpg).await;
        let stored: Vec<(String, (String, Value, bool))> = rows
            .iter()
            .map(|c| (c["tag"].as_str().unwrap().to_string(), consistency(c)))
            .collect();
        let want: Vec<(String, (String, Value, bool))> = [&plain, &unsaid, &paused, &frozen]
            .iter()
            .map(|c| (c["tag"].as_str().unwrap().to_string(), consistency(c)))
            .collect();
        assert_eq!(stored, want, "newest first");

        // Every journal holds all four.
        let ids: Vec<u64> = rows.iter().map(|c| c["id"].as_u64().unwrap()).collect();
        let oldest = ids.iter().min().copied();
        lab.dr.set(Cmd::Journals(vec![
            journal(1, &ids, oldest),
            journal(2, &ids, oldest),
        ]));
        app.eventually("all recoverable", || async {
            let rows = checkpoints(&app, &lab.vpg).await;
            (rows.len() == 4 && rows.iter().all(|r| r["recoverable"] == true)).then_some(())
        })
        .await;
        // The latest app-consistent checkpoint is the frozen one, not a newer paused one.
        let (st, task) = app
            .post(
                &format!("/api/v1/vpgs/{}/failover-test", lab.vpg),
                json!({"checkpoint": "latest_app_consistent"}),
            )
            .await;
        assert_eq!(st, StatusCode::ACCEPTED, "{task}");
        assert_eq!(task["details"]["checkpoint_id"], frozen["id"], "{task:#}");
        // The recovery host brings vm-a up booting as it did on esx-a; vm-b, simulated,
        // has no boot to carry.
        let vms = app
            .eventually("Recover sent to esx-dr", || async {
                lab.seen().into_iter().find_map(|x| match x {
                    Seen::Got(h, _, ManagerMessage::Command(c)) if h == "esx-dr" => match c.body {
                        CommandBody::Recover {
                            vms, checkpoint, ..
                        } => {
                            assert_eq!(Some(checkpoint), frozen["id"].as_u64());
                            Some(vms)
                        }
                        _ => None,
                    },
                    _ => None,
                })
            })
            .await;
        let boots: Vec<(&str, Option<_>)> = vms
            .iter()
            .map(|v| (v.source_vm.as_str(), v.boot.clone()))
            .collect();
        assert_eq!(
            boots,
            vec![("vm-a", Some(kernel_boot())), ("vm-b", None)],
            "{vms:?}"
        );
        assert_eq!(vms[0].name, "vm-a - Test");
        // So does break-glass recovery: the recovery host's desired state carries it.
        let desired = lab
            .seen()
            .into_iter()
            .rev()
            .find_map(|x| match x {
                Seen::Got(h, _, ManagerMessage::Desired(d)) if h == "esx-dr" => Some(d),
                _ => None,
            })
            .expect("esx-dr got its desired state");
        let r = desired
            .recovery
            .iter()
            .find(|r| r.vpg_id == lab.vpg)
            .expect("break-glass metadata of the VPG");
        let vm_a = r.vms.iter().find(|v| v.vm.name == "vm-a").expect("vm-a");
        assert_eq!(vm_a.vm.boot, Some(kernel_boot()));
    }
);

both_ctl!(a_silent_host_aborts_the_round, |app: TestApp| async move {
    let lab = lab(&app, true, 3_600_000, 7200).await;
    lab.protect(None);
    ready(&app, &lab).await;
    lab.b
        .as_ref()
        .unwrap()
        .set_now(Cmd::Mode(HoldMode::Silent))
        .await;
    assert_problem(
        &tag(&app, &lab.vpg, "never").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "checkpoint.round_aborted",
    );
    let a = lab.got("esx-a");
    assert!(
        matches!(&a[..], [ManagerMessage::Hold(h), ManagerMessage::Abort { round }] if h.round == *round),
        "esx-a is aborted, never released: {a:?}"
    );
    assert!(checkpoints(&app, &lab.vpg).await.is_empty(), "no row");
    assert!(event_kinds(&app, &lab.vpg)
        .await
        .contains(&"checkpoint.rounds_aborted".to_string()));
});

both_ctl!(a_late_release_stores_nothing, |app: TestApp| async move {
    let lab = lab(&app, true, 3_600_000, 7200).await;
    lab.protect(None);
    ready(&app, &lab).await;
    lab.b
        .as_ref()
        .unwrap()
        .set_now(Cmd::Mode(HoldMode::ReleasedLate))
        .await;
    assert_problem(
        &tag(&app, &lab.vpg, "late").await,
        StatusCode::SERVICE_UNAVAILABLE,
        "checkpoint.round_aborted",
    );
    assert!(
        lab.got("esx-a")
            .iter()
            .any(|m| matches!(m, ManagerMessage::Release { .. })),
        "both held, so both were released"
    );
    assert!(checkpoints(&app, &lab.vpg).await.is_empty(), "no row");
    // The next round, answered properly, counts.
    lab.b
        .as_ref()
        .unwrap()
        .set_now(Cmd::Mode(HoldMode::Answer(Duration::ZERO)))
        .await;
    let (s, v) = tag(&app, &lab.vpg, "ok").await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
});

both_ctl!(
    recoverable_only_when_every_journal_holds_it,
    |app: TestApp| async move {
        let lab = lab(&app, true, 3_600_000, 7200).await;
        lab.protect(None);
        ready(&app, &lab).await;
        let mut ids = Vec::new();
        for t in ["c1", "c2", "c3"] {
            let (s, c) = tag(&app, &lab.vpg, t).await;
            assert_eq!(s, StatusCode::CREATED, "{c}");
            ids.push(c["id"].as_u64().unwrap());
        }
        let (c1, c2, c3) = (ids[0], ids[1], ids[2]);
        // Only disk 1's journal reports: nothing is recoverable yet.
        lab.dr
            .set(Cmd::Journals(vec![journal(1, &[c1, c2, c3], Some(c1))]));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let rows = checkpoints(&app, &lab.vpg).await;
        assert_eq!(rows.len(), 3);
        assert!(rows.iter().all(|r| r["recoverable"] == false), "{rows:?}");

        // Disk 2's journal holds c2 and c3 only: those become recoverable, and c1 can never
        // be (disk 2 has nothing that old), so it goes.
        lab.dr
            .set(Cmd::Journals(vec![journal(2, &[c2, c3], Some(c2))]));
        let rows = app
            .eventually("c2, c3 recoverable and c1 thinned", || async {
                let rows = checkpoints(&app, &lab.vpg).await;
                (rows.len() == 2 && rows.iter().all(|r| r["recoverable"] == true)).then_some(rows)
            })
            .await;
        let kept: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
        assert_eq!(kept, [c3, c2], "newest first");

        // Disk 1's journal promotes past c2: only c3 stays.
        lab.dr.set(Cmd::Journals(vec![JournalReport {
            recoverable: vec![],
            ..journal(1, &[c3], Some(c3))
        }]));
        app.eventually("c2 thinned", || async {
            let rows = checkpoints(&app, &lab.vpg).await;
            (rows.len() == 1 && rows[0]["id"].as_u64() == Some(c3)).then_some(())
        })
        .await;
        let (_, v) = app.get(&format!("/api/v1/vpgs/{}", lab.vpg)).await;
        assert_eq!(v["journal_bytes"], 8192, "{v}");
    }
);

both_ctl!(
    tagging_checks_its_input_and_the_hosts,
    |app: TestApp| async move {
        let lab = lab(&app, true, 3_600_000, 7200).await;
        lab.protect(None);
        ready(&app, &lab).await;
        for bad in ["", "   ", &"x".repeat(65)] {
            assert_problem(
                &tag(&app, &lab.vpg, bad).await,
                StatusCode::BAD_REQUEST,
                "checkpoint.invalid_tag",
            );
        }
        assert_problem(
            &tag(&app, "nope", "t").await,
            StatusCode::NOT_FOUND,
            "vpg.not_found",
        );
        let viewer = app.token(bulwark::model::access::Role::Viewer).await;
        let res = app
            .req(
                reqwest::Method::POST,
                &format!("/api/v1/vpgs/{}/checkpoints", lab.vpg),
                Some(&viewer),
            )
            .json(&json!({"tag": "t"}))
            .send()
            .await
            .unwrap();
        assert_problem(
            &crate::helpers::split(res).await,
            StatusCode::FORBIDDEN,
            "auth.forbidden",
        );
        let operator = app.token(bulwark::model::access::Role::Operator).await;
        let res = app
            .req(
                reqwest::Method::POST,
                &format!("/api/v1/vpgs/{}/checkpoints", lab.vpg),
                Some(&operator),
            )
            .json(&json!({"tag": "by an operator"}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        lab.b.unwrap().disconnect().await;
        let got = app
            .eventually("esx-b gone", || async {
                let r = tag(&app, &lab.vpg, "t").await;
                (r.0 == StatusCode::SERVICE_UNAVAILABLE).then_some(r)
            })
            .await;
        assert_problem(
            &got,
            StatusCode::SERVICE_UNAVAILABLE,
            "checkpoint.host_unreachable",
        );
        assert_eq!(checkpoints(&app, &lab.vpg).await.len(), 1);
    }
);

both_ctl!(status_follows_the_live_facts, |app: TestApp| async move {
    // Scheduled rounds every second, RPO target 10 s.
    let lab = lab(&app, false, 1000, 10).await;
    let status = |want: &'static str, sub: &'static str| {
        let app = &app;
        let vpg = lab.vpg.clone();
        async move {
            app.eventually(&format!("{want}/{sub}"), || async {
                let (_, v) = app.get(&format!("/api/v1/vpgs/{vpg}")).await;
                (v["status"] == want && v["sub_status"] == sub).then_some(v)
            })
            .await
        }
    };
    status("initializing", "creating_vpg").await;
    // The host applied the desired state and runs the initial sync.
    lab.protect(Some("initial"));
    let v = status("initializing", "initial_sync").await;
    assert_eq!(
        v["members"][0]["replication_state"], "pending_initial_replication",
        "{v}"
    );
    // Synced; rounds run; the recovery host reports what its journal holds.
    lab.protect(None);
    // The recovery host reports every stored checkpoint as it appears.
    let mut reported = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    let v = loop {
        let mut new = Vec::new();
        for c in checkpoints(&app, &lab.vpg).await {
            let id = c["id"].as_u64().unwrap();
            if reported.insert(id) {
                new.push(id);
            }
        }
        let oldest = reported.iter().next().copied();
        lab.dr.set(Cmd::Journals(vec![journal(1, &new, oldest)]));
        let (_, v) = app.get(&format!("/api/v1/vpgs/{}", lab.vpg)).await;
        if v["status"] == "meeting_sla" && v["sub_status"] == "none" {
            break v;
        }
        assert!(Instant::now() < deadline, "never meeting SLA: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(v["rpo_actual_secs"].as_f64().unwrap() <= 10.0, "{v}");
    assert!(v["history_actual_secs"].as_u64().is_some(), "{v}");
    let (_, m) = app.get(&format!("/api/v1/vpgs/{}/members", lab.vpg)).await;
    assert_eq!(m[0]["replication_state"], "replication_enabled", "{m}");
    // The recovery host goes away.
    let Lab { dr, .. } = lab;
    dr.disconnect().await;
    let v = app
        .eventually("site disconnection", || async {
            let (_, v) = app
                .get(&format!("/api/v1/vpgs/{}", v["id"].as_str().unwrap()))
                .await;
            (v["sub_status"] == "site_disconnection").then_some(v)
        })
        .await;
    assert_eq!(v["status"], "not_meeting_sla");
    let kinds = event_kinds(&app, v["id"].as_str().unwrap()).await;
    for k in [
        "vpg.protecting",
        "vpg.status_changed",
        "vpg.first_recoverable_checkpoint",
    ] {
        assert!(kinds.iter().any(|e| e == k), "{k} in {kinds:?}");
    }
});

both_ctl!(
    delete_waits_for_the_hosts_or_is_forced,
    |app: TestApp| async move {
        let lab = lab(&app, true, 3_600_000, 7200).await;
        lab.protect(None);
        ready(&app, &lab).await;
        let path = format!("/api/v1/vpgs/{}", lab.vpg);
        let (s, v) = app.delete(&path).await;
        assert_eq!(s, StatusCode::ACCEPTED, "{v}");
        assert_eq!(v["status"], "deleting");
        assert_eq!(v["sub_status"], "deleting_the_vpg");
        // Asking again is the same operation.
        assert_eq!(app.delete(&path).await.0, StatusCode::ACCEPTED);
        // The hosts still protect the disks: the VPG stays while they do.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(app.get(&path).await.0, StatusCode::OK);
        // esx-b dies: the VPG waits to be removed.
        let Lab { a, b, vpg, .. } = lab;
        b.unwrap().disconnect().await;
        app.eventually("waiting removal", || async {
            let (_, v) = app.get(&path).await;
            (v["sub_status"] == "vpg_waiting_to_be_removed").then_some(())
        })
        .await;
        // esx-a stops protecting; esx-b is still away, so the VPG still waits.
        a.set(Cmd::Protected(vec![]));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(app.get(&path).await.0, StatusCode::OK);
        let (s, _) = app.delete(&format!("{path}?force=true")).await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        assert_problem(
            &app.get(&path).await,
            StatusCode::NOT_FOUND,
            "vpg.not_found",
        );
        let kinds = event_kinds(&app, &vpg).await;
        assert_eq!(
            kinds.first().map(String::as_str),
            Some("vpg.force_removed"),
            "{kinds:?}"
        );
        assert!(
            kinds.iter().any(|k| k == "vpg.waiting_removal"),
            "{kinds:?}"
        );
    }
);

both_ctl!(
    delete_completes_once_no_host_protects,
    |app: TestApp| async move {
        let lab = lab(&app, false, 3_600_000, 7200).await;
        lab.protect(None);
        ready(&app, &lab).await;
        let path = format!("/api/v1/vpgs/{}", lab.vpg);
        assert_eq!(app.delete(&path).await.0, StatusCode::ACCEPTED);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(
            app.get(&path).await.0,
            StatusCode::OK,
            "esx-a still protects"
        );
        lab.a.set(Cmd::Protected(vec![]));
        app.eventually("removed", || async {
            (app.get(&path).await.0 == StatusCode::NOT_FOUND).then_some(())
        })
        .await;
        let kinds = event_kinds(&app, &lab.vpg).await;
        assert_eq!(&kinds[..2], ["vpg.deleted", "vpg.deleting"], "{kinds:?}");
    }
);

both_ctl!(round_latency_across_two_hosts, |app: TestApp| async move {
    // Not a benchmark of the agents (their hold is µs, measured there): what the manager
    // adds per round — two WebSocket round trips to two hosts, the row, the HTTP call.
    let lab = lab(&app, true, 3_600_000, 7200).await;
    lab.protect(None);
    ready(&app, &lab).await;
    let mut times = Vec::new();
    for i in 0..60 {
        let t = Instant::now();
        let (s, v) = tag(&app, &lab.vpg, &format!("r{i}")).await;
        times.push(t.elapsed());
        assert_eq!(s, StatusCode::CREATED, "{v}");
    }
    times.sort();
    let p50 = times[times.len() / 2];
    let p99 = times[times.len() * 99 / 100];
    eprintln!("tagged round via REST, 2 hosts: p50 {p50:?}, p99 {p99:?}");
    assert!(p99 < Duration::from_secs(1), "p99 {p99:?}");
    assert_eq!(checkpoints(&app, &lab.vpg).await.len(), 60);
});

/// The value of the first sample whose line starts with `prefix` (name and labels).
fn sample(m: &str, prefix: &str) -> Option<f64> {
    m.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `/metrics` shows the live per-VPG and per-disk values and the rounds: one backend is
/// enough (the values come from the control plane, not from SQL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_rounds_and_the_vpg() {
    let app = spawn_app_with(Backend::Sqlite, settings()).await;
    // Scheduled rounds every second, RPO target 10 s.
    let lab = lab(&app, false, 1000, 10).await;
    lab.protect(None);
    ready(&app, &lab).await;
    let mut reported = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut new = Vec::new();
        for c in checkpoints(&app, &lab.vpg).await {
            let id = c["id"].as_u64().unwrap();
            if reported.insert(id) {
                new.push(id);
            }
        }
        let oldest = reported.iter().next().copied();
        lab.dr.set(Cmd::Journals(vec![journal(1, &new, oldest)]));
        let (_, v) = app.get(&format!("/api/v1/vpgs/{}", lab.vpg)).await;
        if v["status"] == "meeting_sla" && v["sub_status"] == "none" {
            break;
        }
        assert!(Instant::now() < deadline, "never meeting SLA: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = || async {
        app.req(reqwest::Method::GET, "/metrics", None)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let vpg = format!("{{vpg=\"{}\",name=\"web\"", lab.vpg);
    // The evaluator sets the gauges after the status it stores: wait for a scrape that
    // shows the status the API already reported.
    let m = app
        .eventually("metrics show meeting SLA", || async {
            let m = metrics().await;
            let status = format!(
                "bulwark_vpg_status{{vpg=\"{}\",name=\"web\",status=\"meeting_sla\",sub_status=\"none\"}} 1",
                lab.vpg
            );
            m.contains(&status).then_some(m)
        })
        .await;
    let rpo = sample(&m, &format!("bulwark_vpg_rpo_seconds{vpg}")).expect("RPO gauge");
    assert!((0.0..=10.0).contains(&rpo), "RPO {rpo}: {m}");
    let recoverable = sample(&m, &format!("bulwark_vpg_checkpoints_recoverable{vpg}"))
        .expect("recoverable checkpoints");
    assert!(recoverable >= 1.0, "{m}");
    assert_eq!(
        sample(&m, &format!("bulwark_vpg_journal_bytes{vpg}")),
        Some(4096.0),
        "{m}"
    );
    // Only the current status is exposed for the VPG (the initializing one was removed).
    let statuses = m
        .lines()
        .filter(|l| l.starts_with(&format!("bulwark_vpg_status{vpg}")))
        .count();
    assert_eq!(statuses, 1, "{m}");
    let holds = sample(&m, "bulwark_checkpoint_hold_seconds_count").expect("hold histogram");
    assert!(holds >= 1.0, "{m}");
    let completed = sample(&m, "bulwark_checkpoint_rounds_total{result=\"completed\"}")
        .expect("completed rounds");
    assert!(completed >= 1.0, "{m}");
    assert_eq!(
        sample(
            &m,
            "bulwark_disk_lag_seconds{host=\"esx-a\",disk=\"vm-a-root\"}"
        ),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "bulwark_hosts{connectivity=\"connected\"}"),
        Some(2.0),
        "{m}"
    );
    assert!(
        m.contains("bulwark_alerts_open{severity=\"error\"} 0"),
        "{m}"
    );
}

// A move's final checkpoint that never became recoverable is discarded when a new one
// replaces it: the listing keeps recoverable rows and other tags, and the discard is an
// event.
both_ctl!(
    superseded_final_checkpoints_are_discarded_not_listed,
    |app: TestApp| async move {
        use bulwark::manager::store::NewCheckpoint;
        use bulwark::proto::control::CheckpointKind;
        let w = app.world(1).await;
        let vpg = app
            .create(
                "/api/v1/vpgs",
                json!({"name": "moving", "recovery_site_id": w.recovery_site,
                    "members": [{"vm_id": w.vms[0], "recovery_host_id": w.recovery_host}]}),
            )
            .await;
        let final_tag = "move: final checkpoint";
        for (id, tag) in [
            (1_000u64, final_tag),
            (1_001, final_tag),
            (1_002, "before the move"),
        ] {
            app.store
                .insert_checkpoint(
                    NewCheckpoint {
                        id,
                        vpg_id: vpg.clone(),
                        taken_at: chrono::Utc::now(),
                        kind: CheckpointKind::UserTagged,
                        tag: Some(tag.into()),
                        quiesce: None,
                    },
                    None,
                )
                .await
                .unwrap();
        }
        app.store.mark_recoverable(&vpg, &[1_001]).await.unwrap();
        let gone = app
            .store
            .discard_unrecoverable_tagged(&vpg, final_tag, "replaced by a new one")
            .await
            .unwrap();
        assert_eq!(gone, vec![1_000]);
        let (_, cps) = app
            .get(&format!("/api/v1/vpgs/{vpg}/checkpoints?limit=100"))
            .await;
        let mut ids: Vec<i64> = cps["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["id"].as_i64().unwrap())
            .collect();
        ids.sort();
        assert_eq!(ids, vec![1_001, 1_002], "{cps:#}");
        assert!(event_kinds(&app, &vpg)
            .await
            .contains(&"checkpoint.discarded".to_string()));
        // Nothing left to discard: a no-op.
        let again = app
            .store
            .discard_unrecoverable_tagged(&vpg, final_tag, "replaced by a new one")
            .await
            .unwrap();
        assert!(again.is_empty());
    }
);
