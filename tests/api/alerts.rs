//! SLA alerts end to end: the real manager with short alert delays, fake agents over the
//! control WebSocket (two protected hosts, one recovery host, two VPGs), on SQLite and
//! PostgreSQL. Recoverable checkpoints stop for one VPG → one `rpo_exceeded` alert
//! (listed, filtered, with its `alert.raised` event); acknowledged once; reports resume
//! → cleared after the clear delay; the recovery host goes away → ONE site alert for
//! both VPGs.

use crate::fake_agent::{vm, FakeAgent};
use crate::helpers::{assert_problem, spawn_app_with, Backend, ControlSettings, TestApp};
use bulwark::model::access::Role;
use bulwark::model::alerts::Hysteresis;
use bulwark::proto::agent::{AgentStatus, PeerStatus, ProtectedDiskStatus, WriteActivity};
use bulwark::proto::control::{
    AgentMessage, Heartbeat, JournalReport, ManagerMessage, RoundHeld, RoundReleased,
};
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a simulated agent reports; the test changes it while the agent runs.
#[derive(Default)]
struct Report {
    protected: Vec<ProtectedDiskStatus>,
    peers: Vec<PeerStatus>,
    /// Journal reports sent with every heartbeat (recovery host).
    journals: Vec<JournalReport>,
}

type Shared = Arc<Mutex<Report>>;

/// Heartbeats every 100 ms with the shared report, applies every desired state, holds
/// and releases rounds at once. Ends (dropping the connection) when aborted.
fn run_agent(mut a: FakeAgent, report: Shared) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut status: AgentStatus = a.status();
        let mut next = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next {
                let journals = {
                    let r = report.lock().unwrap();
                    status.protected = r.protected.clone();
                    status.peers = r.peers.clone();
                    r.journals.clone()
                };
                let hb = Heartbeat {
                    status: status.clone(),
                    journals,
                    desired_version: a.desired_version,
                    recoveries: Vec::new(),
                };
                a.send(AgentMessage::Heartbeat(hb)).await;
                next = tokio::time::Instant::now() + Duration::from_millis(100);
            }
            let Some(m) = a.recv_within(Duration::from_millis(20)).await else {
                continue;
            };
            let Some(m) = m else { return };
            match m {
                ManagerMessage::Desired(d) => {
                    a.desired_version = Some(d.version);
                    a.applied(d.version).await;
                }
                ManagerMessage::Hold(h) => {
                    a.send(AgentMessage::Held(RoundHeld {
                        round: h.round,
                        vpg_id: h.vpg_id.clone(),
                        timestamp_ms: chrono::Utc::now().timestamp_millis(),
                        disks: vec![],
                        error: None,
                        quiesce: None,
                    }))
                    .await;
                }
                ManagerMessage::Release { round } => {
                    a.send(AgentMessage::Released(RoundReleased {
                        round,
                        vpg_id: String::new(),
                        hold_us: 10,
                        on_time: true,
                    }))
                    .await;
                }
                _ => {}
            }
        }
    })
}

fn disk(id: u64, name: &str, group: &str) -> ProtectedDiskStatus {
    serde_json::from_value(json!({
        "name": name, "disk_id": id, "size_bytes": 1u64 << 30, "export": name,
        "group": group, "recovery_host": "esx-dr", "mode": "streaming",
        "start_state": "new", "start_al_extents": 0, "dirty_regions": 0, "region_size": 65536,
        "queued_records": 0, "queued_bytes": 0, "spilled_bytes": 0, "oldest_unacked_ms": 0,
        "last_seq": 0, "acked_seq": 0, "epoch": 1, "owes_sync": false, "replica_behind": false,
        "sync": {"phase": "idle", "detail": null, "running": null, "last": null, "completed": 1},
    }))
    .unwrap()
}

fn peer_dr() -> PeerStatus {
    PeerStatus {
        host_name: "esx-dr".into(),
        address: "127.0.0.1:9701".into(),
        connected: true,
        last_error: None,
    }
}

fn settings() -> ControlSettings {
    ControlSettings {
        heartbeat: Duration::from_millis(100),
        disconnect_after: Duration::from_secs(2),
        hold_bound: Duration::from_millis(1500),
        alerts: Hysteresis {
            raise_after: Duration::from_secs(1),
            clear_after: Duration::from_secs(2),
        },
        ..ControlSettings::default()
    }
}

async fn vm_id(app: &TestApp, name: &str) -> String {
    app.eventually(&format!("VM {name} registered"), || async {
        let (_, v) = app.get(&format!("/api/v1/vms?name={name}")).await;
        v["items"][0]["id"].as_str().map(str::to_string)
    })
    .await
}

/// Polls `f` every 100 ms for at most `secs`.
async fn wait_for<T, F, Fut>(what: &str, secs: u64, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn alerts(app: &TestApp, query: &str) -> Vec<Value> {
    let (s, v) = app.get(&format!("/api/v1/alerts?limit=1000&{query}")).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["items"].as_array().unwrap().clone()
}

async fn checkpoint_ids(app: &TestApp, vpg: &str) -> Vec<u64> {
    let (_, v) = app
        .get(&format!("/api/v1/vpgs/{vpg}/checkpoints?limit=1000"))
        .await;
    v["items"]
        .as_array()
        .map(|a| a.iter().filter_map(|c| c["id"].as_u64()).collect())
        .unwrap_or_default()
}

fn journal(host: &str, disk_id: u64, ids: &[u64]) -> JournalReport {
    JournalReport {
        host: host.into(),
        disk_id,
        recoverable: ids.to_vec(),
        // None would mean "nothing recoverable" (a sync running).
        oldest_recoverable: ids.iter().min().copied(),
        newest_recoverable: ids.iter().max().copied(),
        journal_bytes: 4096,
        storage_error: None,
    }
}

async fn run(backend: Backend) {
    let app = spawn_app_with(backend, settings()).await;
    let a = app
        .agent(
            "esx-a",
            "prod",
            vec![vm("vm-a", &[(1, "vm-a-root", 1 << 30)])],
        )
        .await;
    let b = app
        .agent(
            "esx-b",
            "prod",
            vec![vm("vm-b", &[(2, "vm-b-root", 1 << 30)])],
        )
        .await;
    let dr = app.agent("esx-dr", "dr", vec![]).await;
    let dr_id = app.host_id("esx-dr").await;
    let (_, h) = app.get(&format!("/api/v1/hosts/{dr_id}")).await;
    let dr_site = h["site_id"].as_str().unwrap().to_string();
    let mut vpgs = HashMap::new();
    for (name, vm_name) in [("web", "vm-a"), ("db", "vm-b")] {
        let id = app
            .create(
                "/api/v1/vpgs",
                json!({"name": name, "recovery_site_id": dr_site,
                    "members": [{"vm_id": vm_id(&app, vm_name).await, "recovery_host_id": dr_id}],
                    "settings": {"checkpoint_interval_ms": 1000, "rpo_target_secs": 10}}),
            )
            .await;
        vpgs.insert(name, id);
    }
    let (web, db) = (vpgs["web"].clone(), vpgs["db"].clone());
    let ra: Shared = Arc::default();
    let rb: Shared = Arc::default();
    let rdr: Shared = Arc::default();
    *ra.lock().unwrap() = Report {
        protected: vec![disk(1, "vm-a-root", &web)],
        peers: vec![peer_dr()],
        journals: vec![],
    };
    *rb.lock().unwrap() = Report {
        protected: vec![disk(2, "vm-b-root", &db)],
        peers: vec![peer_dr()],
        journals: vec![],
    };
    let _ta = run_agent(a, ra.clone());
    let _tb = run_agent(b, rb.clone());
    let tdr = run_agent(dr, rdr.clone());

    // The recovery host's journals: every checkpoint of a VPG whose flag is on.
    let feeding: Arc<Mutex<(bool, bool)>> = Arc::new(Mutex::new((true, true)));
    let feeder = {
        let (app_url, admin) = (app.url(""), app.admin.clone());
        let (web, db, rdr, feeding) = (web.clone(), db.clone(), rdr.clone(), feeding.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let ids = |vpg: String| {
                let (http, url, admin) = (http.clone(), app_url.clone(), admin.clone());
                async move {
                    let v: Value = http
                        .get(format!("{url}/api/v1/vpgs/{vpg}/checkpoints?limit=1000"))
                        .bearer_auth(admin)
                        .send()
                        .await
                        .ok()?
                        .json()
                        .await
                        .ok()?;
                    Some(
                        v["items"]
                            .as_array()?
                            .iter()
                            .filter_map(|c| c["id"].as_u64())
                            .collect::<Vec<u64>>(),
                    )
                }
            };
            loop {
                let (fw, fd) = *feeding.lock().unwrap();
                let mut reports = Vec::new();
                if fw {
                    if let Some(i) = ids(web.clone()).await {
                        reports.push(journal("esx-a", 1, &i));
                    }
                }
                if fd {
                    if let Some(i) = ids(db.clone()).await {
                        reports.push(journal("esx-b", 2, &i));
                    }
                }
                rdr.lock().unwrap().journals = reports;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    for vpg in [&web, &db] {
        wait_for("a recoverable checkpoint", 20, || async {
            let (_, v) = app.get(&format!("/api/v1/vpgs/{vpg}")).await;
            (v["status"] == "meeting_sla").then_some(())
        })
        .await;
    }
    assert!(!checkpoint_ids(&app, &web).await.is_empty());
    assert!(
        alerts(&app, "").await.is_empty(),
        "a healthy lab has no alert"
    );

    // Throughput: web's disk reports 10 MiB in 100 writes over its 5 s window.
    ra.lock().unwrap().protected[0].writes = WriteActivity {
        writes_total: 1000,
        bytes_total: 100 << 20,
        window_ms: 5000,
        window_writes: 100,
        window_bytes: 10 << 20,
    };
    let disks = wait_for("web's throughput", 10, || async {
        let (_, d) = app.get(&format!("/api/v1/vpgs/{web}/disks")).await;
        (d[0]["throughput_bytes_per_sec"].as_f64() > Some(0.0)).then_some(d)
    })
    .await;
    let d = &disks[0];
    assert_eq!(disks.as_array().unwrap().len(), 1, "{disks}");
    assert_eq!(
        (
            d["vm_name"].as_str(),
            d["disk_name"].as_str(),
            d["host_name"].as_str()
        ),
        (Some("vm-a"), Some("vm-a-root"), Some("esx-a")),
        "{d}"
    );
    assert_eq!(d["reported"], true);
    assert_eq!(d["mode"], "streaming");
    assert_eq!(
        d["throughput_bytes_per_sec"].as_f64(),
        Some(f64::from(2u32 << 20))
    );
    assert_eq!(d["iops"].as_f64(), Some(20.0));
    assert_eq!(d["sync"]["phase"], "idle");
    let (_, other) = app.get(&format!("/api/v1/vpgs/{db}/disks")).await;
    assert_eq!(
        other[0]["throughput_bytes_per_sec"].as_f64(),
        Some(0.0),
        "{other}"
    );
    // The stream: the evaluator's next pass sends web's figures as a sample; a client
    // that connects after that finds them in its snapshot, before any delta.
    let frames = |url: String| async move {
        let (ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        ws.filter_map(|m| async move {
            match m.ok()? {
                tokio_tungstenite::tungstenite::Message::Text(t) => {
                    serde_json::from_str::<Value>(t.as_str()).ok()
                }
                _ => None,
            }
        })
        .boxed()
    };
    let url = format!("ws://{}/api/v1/stream?access_token={}", app.addr, app.admin);
    let busy = |s: &Value| {
        s["id"] == web.as_str()
            && s["throughput_bytes_per_sec"].as_f64() == Some(f64::from(2u32 << 20))
            && s["iops"].as_f64() == Some(20.0)
    };
    let mut first = frames(url.clone()).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(f) = first.next().await {
            let samples = f["samples"].as_array().cloned().unwrap_or_default();
            if samples.iter().any(busy) {
                return;
            }
        }
    })
    .await
    .expect("a sample with web's throughput within 10 s");
    drop(first);
    let snap = frames(url).await.next().await.unwrap();
    assert_eq!(snap["type"], "snapshot");
    let samples = snap["samples"].as_array().unwrap();
    assert!(samples.iter().any(busy), "{snap}");
    let idle = samples.iter().find(|s| s["id"] == db.as_str()).unwrap();
    assert_eq!(
        idle["throughput_bytes_per_sec"].as_f64(),
        Some(0.0),
        "{idle}"
    );
    // An unknown VPG is a 404 problem, not an empty list.
    assert_problem(
        &app.get("/api/v1/vpgs/nope/disks").await,
        StatusCode::NOT_FOUND,
        "vpg.not_found",
    );

    // The recovery host stops reporting web's journal: its RPO grows past 10 s.
    feeding.lock().unwrap().0 = false;
    let alert = wait_for("rpo_exceeded raised", 30, || async {
        alerts(&app, &format!("open=true&kind=rpo_exceeded&vpg_id={web}"))
            .await
            .pop()
    })
    .await;
    assert_eq!(alert["severity"], "error");
    assert_eq!(alert["affected_count"], 1);
    assert!(alert["cleared_at"].is_null());
    let id = alert["id"].as_str().unwrap().to_string();
    assert!(alerts(&app, &format!("kind=rpo_exceeded&vpg={db}"))
        .await
        .is_empty());
    assert_eq!(
        alerts(&app, "severity=warning&kind=rpo_exceeded")
            .await
            .len(),
        0
    );
    assert_eq!(alerts(&app, "open=false").await.len(), 0);
    let (_, ev) = app.get("/api/v1/events?kind=alert.raised").await;
    let raised: Vec<&Value> = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["subject_id"] == id.as_str())
        .collect();
    assert_eq!(raised.len(), 1, "{ev}");
    assert_eq!(raised[0]["vpg_id"], web.as_str());
    assert_eq!(raised[0]["severity"], "error");

    // Acknowledge: operators only, once.
    let ack = format!("/api/v1/alerts/{id}/acknowledge");
    let viewer = app.token(Role::Viewer).await;
    let operator = app.token(Role::Operator).await;
    let r = app
        .req(Method::POST, &ack, Some(&viewer))
        .send()
        .await
        .unwrap();
    let got = crate::helpers::split(r).await;
    assert_problem(&got, StatusCode::FORBIDDEN, "auth.forbidden");
    let r = app
        .req(Method::POST, &ack, Some(&operator))
        .send()
        .await
        .unwrap();
    let (s, v) = crate::helpers::split(r).await;
    assert_eq!(s, StatusCode::OK, "{v}");
    assert!(v["acknowledged_by"].as_str().unwrap().starts_with("token:"));
    assert!(v["acknowledged_at"].is_string());
    let got = app.post(&ack, json!({})).await;
    assert_problem(&got, StatusCode::CONFLICT, "alert.already_acknowledged");
    let got = app.post("/api/v1/alerts/nope/acknowledge", json!({})).await;
    assert_eq!(got.0, StatusCode::NOT_FOUND, "{}", got.1);
    assert_eq!(alerts(&app, "acknowledged=true").await.len(), 1);

    // Reports resume: RPO falls far below the target and the alert clears after the
    // clear delay — not at once.
    feeding.lock().unwrap().0 = true;
    let cleared = wait_for("rpo_exceeded cleared", 20, || async {
        let (_, a) = app.get(&format!("/api/v1/alerts/{id}")).await;
        (!a["cleared_at"].is_null()).then_some(a)
    })
    .await;
    let raised_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(cleared["raised_at"].clone()).unwrap();
    let cleared_at: chrono::DateTime<chrono::Utc> =
        serde_json::from_value(cleared["cleared_at"].clone()).unwrap();
    assert!(cleared_at - raised_at >= chrono::Duration::seconds(2));
    assert_eq!(alerts(&app, "open=false").await.len(), 1);
    let (_, ev) = app.get("/api/v1/events?kind=alert.cleared").await;
    assert_eq!(ev["items"].as_array().unwrap().len(), 1, "{ev}");
    assert!(
        alerts(&app, "open=true").await.is_empty(),
        "{:?}",
        alerts(&app, "").await
    );

    // The recovery host of both VPGs goes away: one alert, for the site, naming two VPGs.
    feeder.abort();
    tdr.abort();
    let site = wait_for("site_disconnection raised", 20, || async {
        alerts(&app, "open=true&kind=site_disconnection")
            .await
            .pop()
    })
    .await;
    assert_eq!(site["site_id"], dr_site.as_str());
    assert_eq!(site["affected_count"], 2, "{site}");
    assert_eq!(site["severity"], "error");
    let mut named: Vec<String> = site["details"]["vpg_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    named.sort();
    let mut both = vec![web.clone(), db.clone()];
    both.sort();
    assert_eq!(named, both);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let open = alerts(&app, "open=true").await;
    assert_eq!(open.len(), 1, "one root cause, one alert: {open:?}");
    for vpg in [&web, &db] {
        let (_, v) = app.get(&format!("/api/v1/vpgs/{vpg}")).await;
        assert_eq!(v["sub_status"], "site_disconnection", "{v}");
    }
}

mod rpo_ack_clear_and_site {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        run(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        run(Backend::Postgres).await;
    }
}

/// A host alert raised by one manager process is resumed, not raised again, by the next
/// one on the same database, and that one clears it when the host is back.
async fn restart(backend: Backend) {
    use crate::helpers::TestDb;
    use bulwark::manager::config::ManagerConfig;
    use bulwark::manager::server::Application;
    let db = TestDb::new(backend).await;
    let config = ManagerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: db.url.clone(),
        web_dir: None,
        bootstrap_token: true,
        control: ControlSettings {
            heartbeat: Duration::from_millis(100),
            disconnect_after: Duration::from_secs(1),
            alerts: Hysteresis {
                raise_after: Duration::from_millis(300),
                clear_after: Duration::from_secs(1),
            },
            ..ControlSettings::default()
        },
    };
    let start = |config: ManagerConfig| async move {
        let app = Application::build(&config).await.unwrap();
        let addr = app.local_addr();
        let secret = app.bootstrap_secret.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let h = tokio::spawn(app.run_until(async {
            let _ = rx.await;
        }));
        (addr, secret, tx, h)
    };
    let (addr, admin, stop, running) = start(config.clone()).await;
    let admin = admin.unwrap();
    let http = reqwest::Client::new();
    let get = |addr: std::net::SocketAddr, path: String| {
        let (http, admin) = (http.clone(), admin.clone());
        async move {
            let v: Value = http
                .get(format!("http://{addr}{path}"))
                .bearer_auth(admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            v["items"].as_array().unwrap().clone()
        }
    };
    let v: Value = http
        .post(format!("http://{addr}/api/v1/enrolment-tokens"))
        .bearer_auth(&admin)
        .json(&json!({"description": "t", "expires_in_secs": 3600, "max_uses": 1}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = v["secret"].as_str().unwrap().to_string();
    let ws = crate::fake_agent::ws_url(addr);
    let spare = FakeAgent::connect(&ws, FakeAgent::enrol("spare", "lab", &token))
        .await
        .unwrap();
    let key = spare.host_key.clone().unwrap();
    let task = run_agent(spare, Arc::default());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(get(addr, "/api/v1/alerts".into()).await.is_empty());

    task.abort();
    let first = wait_for("host_disconnected raised", 15, || async {
        get(
            addr,
            "/api/v1/alerts?open=true&kind=host_disconnected".into(),
        )
        .await
        .pop()
    })
    .await;
    let _ = stop.send(());
    let _ = running.await;

    let (addr, _, stop, running) = start(config.clone()).await;
    // Past the reconnect grace and the raise delay: the condition still holds.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let all = get(addr, "/api/v1/alerts".into()).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0]["id"], first["id"]);
    assert!(all[0]["cleared_at"].is_null());
    let raised = get(addr, "/api/v1/events?kind=alert.raised".into()).await;
    assert_eq!(
        raised.len(),
        1,
        "raised once across the restart: {raised:?}"
    );

    let spare = FakeAgent::connect(
        &crate::fake_agent::ws_url(addr),
        FakeAgent::with_key("spare", "lab", &key),
    )
    .await
    .unwrap();
    let task = run_agent(spare, Arc::default());
    let id = first["id"].as_str().unwrap().to_string();
    wait_for("host_disconnected cleared", 15, || async {
        let all = get(addr, "/api/v1/alerts?open=false".into()).await;
        all.iter().any(|a| a["id"] == id.as_str()).then_some(())
    })
    .await;
    assert_eq!(
        get(addr, "/api/v1/events?kind=alert.cleared".into())
            .await
            .len(),
        1
    );
    task.abort();
    let _ = stop.send(());
    let _ = running.await;
}

mod survives_a_manager_restart {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sqlite() {
        restart(Backend::Sqlite).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() {
        restart(Backend::Postgres).await;
    }
}

/// The store's alert writes, each with its event: update follows a cause that grew,
/// clear is once only, acknowledge is once only.
async fn store_writes(app: crate::helpers::TestApp) {
    use bulwark::manager::store::{Actor, NewAlert};
    let id = app
        .store
        .raise_alert(&NewAlert {
            kind: "site_disconnection".into(),
            severity: "warning".into(),
            vpg_id: None,
            host_id: None,
            site_id: Some("s1".into()),
            message: "site s1 disconnected".into(),
            affected_count: 1,
            details: None,
        })
        .await
        .unwrap();
    app.store
        .update_alert(&id, "error", 3, "site s1 disconnected: 3 VPGs")
        .await
        .unwrap();
    // Unchanged: no write, no event.
    app.store
        .update_alert(&id, "error", 3, "site s1 disconnected: 3 VPGs")
        .await
        .unwrap();
    let (_, a) = app.get(&format!("/api/v1/alerts/{id}")).await;
    assert_eq!(a["affected_count"], 3);
    assert_eq!(a["severity"], "error");
    assert_eq!(alerts(&app, "site_id=s1&open=true").await.len(), 1);
    assert!(app.store.clear_alert(&id).await.unwrap());
    assert!(!app.store.clear_alert(&id).await.unwrap(), "cleared once");
    // Updating a cleared alert changes nothing.
    app.store
        .update_alert(&id, "warning", 9, "x")
        .await
        .unwrap();
    let (_, a) = app.get(&format!("/api/v1/alerts/{id}")).await;
    assert_eq!(a["affected_count"], 3);
    let actor = Actor("token:op".into());
    app.store.acknowledge_alert(&actor, &id).await.unwrap();
    assert!(app.store.acknowledge_alert(&actor, &id).await.is_err());
    let (_, ev) = app.get("/api/v1/events?kind=alert.&limit=100").await;
    let mut kinds: Vec<&str> = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    kinds.reverse();
    assert_eq!(
        kinds,
        vec![
            "alert.raised",
            "alert.updated",
            "alert.cleared",
            "alert.acknowledged"
        ]
    );
    assert_eq!(
        ev["items"][3]["severity"], "warning",
        "raised at its severity"
    );
    assert_eq!(ev["items"][0]["actor"], "token:op");
}

crate::both!(store_writes_with_events, store_writes);
