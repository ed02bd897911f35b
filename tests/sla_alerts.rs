//! An SLA breach end to end, with real processes: a manager on PostgreSQL, a protected
//! and a recovery agent on loopback, a guest writing through NBD. The protected site's
//! replication bandwidth is throttled until the RPO passes its target: the
//! `rpo_exceeded` alert is raised, a webhook receiver gets it signed, and a live stream
//! client sees the alert and the VPG's status. The throttle is lifted: the alert clears,
//! a second webhook follows (in order), the stream shows it cleared, and the VPG is back
//! to Meeting SLA.
#![allow(clippy::unwrap_used)]

mod agent_common;
mod orch_common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent_common::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use bulwark::agent::nbd::client::NbdClient;
use bulwark::proto::webhooks::{HEADER_EVENT, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use futures::StreamExt;
use orch_common::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// What the receiver got: kind, timestamp, signature, body.
#[derive(Clone, Debug)]
struct Delivery {
    kind: String,
    timestamp: i64,
    signature: String,
    body: Bytes,
}

type Got = Arc<Mutex<Vec<Delivery>>>;

async fn receive(State(got): State<Got>, h: HeaderMap, body: Bytes) -> &'static str {
    let get = |n: &str| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    got.lock().unwrap().push(Delivery {
        kind: get(HEADER_EVENT),
        timestamp: get(HEADER_TIMESTAMP).parse().unwrap_or(0),
        signature: get(HEADER_SIGNATURE),
        body,
    });
    "ok"
}

async fn receiver() -> (SocketAddr, Got) {
    let got: Got = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(receive))
        .with_state(got.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, got)
}

/// Every frame a stream client read, parsed.
type Frames = Arc<Mutex<Vec<Value>>>;

async fn stream_client(m: &ManagerProc) -> Frames {
    let url = format!(
        "ws://{}/api/v1/stream?access_token={}",
        m.addr, m.admin_token
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let frames: Frames = Arc::default();
    let keep = frames.clone();
    tokio::spawn(async move {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                keep.lock()
                    .unwrap()
                    .push(serde_json::from_str(t.as_str()).unwrap());
            }
        }
    });
    frames
}

/// Polls `f` every 100 ms until it returns Some; panics with `what` after `within`.
async fn until<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn verify(d: &Delivery, secret: &str) -> Value {
    assert_eq!(
        d.signature,
        bulwark::manager::webhooks::signature(secret, d.timestamp, &d.body),
        "signature of {}",
        d.kind
    );
    assert!((chrono::Utc::now().timestamp() - d.timestamp).abs() < 120);
    serde_json::from_slice(&d.body).unwrap()
}

fn stream_alert(frames: &Frames, id: &str, cleared: bool) -> bool {
    frames.lock().unwrap().iter().any(|f| {
        f["alerts"].as_array().is_some_and(|a| {
            a.iter()
                .any(|a| a["id"] == id && a["cleared_at"].is_null() != cleared)
        })
    })
}

fn stream_vpg_status(frames: &Frames, id: &str, status: &str) -> bool {
    frames.lock().unwrap().iter().any(|f| {
        f["vpgs"]
            .as_array()
            .is_some_and(|v| v.iter().any(|v| v["id"] == id && v["status"] == status))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_replication_raises_the_rpo_alert_everywhere_and_lifting_it_clears() {
    let lab = Lab::new(&["prot", "rec"]);
    let db = PgDb::new().await;
    let m = ManagerProc::start(
        lab.dir.path(),
        &db.url,
        "heartbeat_ms = 200\ndisconnect_after_ms = 3000",
    )
    .await;
    let token = m.enrolment_token().await;
    let size = 64 * MIB;
    let prot = start_managed(
        &lab,
        &m,
        &token,
        "prot",
        "prod",
        false,
        &[VmDef::new("app", 1, size)],
        "",
    )
    .await;
    let rec = start_managed(&lab, &m, &token, "rec", "dr", true, &[], "").await;
    let agents = [&prot, &rec];
    m.wait_hosts_connected(&["prot", "rec"], &agents).await;

    let (hook, got) = receiver().await;
    let created = m
        .ok(
            "POST",
            "/api/v1/webhooks",
            Some(
                json!({"name": "pager", "url": format!("http://{hook}/hook"),
                        "event_kinds": ["alert.raised", "alert.cleared"]}),
            ),
        )
        .await;
    let secret = created["secret"].as_str().unwrap().to_string();
    let frames = stream_client(&m).await;

    let vpg = m
        .create_vpg(
            "app",
            &["app"],
            "dr",
            "rec",
            json!({"checkpoint_interval_ms": 1000, "rpo_target_secs": 10,
                   "journal_history_secs": 3600}),
        )
        .await;
    m.wait_vpg(&vpg, "Meeting SLA", Duration::from_secs(60), &agents, |v| {
        v["status"] == "meeting_sla"
    })
    .await;

    // A guest writes 1 MiB/s of random 64 KiB blocks; the site may send 64 KiB/s.
    let writing = Arc::new(AtomicBool::new(true));
    let writer = {
        let writing = writing.clone();
        let nbd = prot.endpoints.nbd.clone();
        tokio::spawn(async move {
            let mut client = NbdClient::connect(nbd.as_str(), "app").await.unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            let start = Instant::now();
            let mut n = 0u64;
            // Bounded: at most 90 s and 90 MiB.
            while writing.load(Ordering::SeqCst) && n < 1440 {
                let off = rng.random_range(0..size / 65536) * 65536;
                let mut buf = vec![0u8; 65536];
                rng.fill(&mut buf[..]);
                client.write(off, &buf, false).await.unwrap();
                n += 1;
                let due = start + Duration::from_millis(n * 1000 / 16);
                tokio::time::sleep_until(due.into()).await;
            }
            n
        })
    };
    let prod = m.site_id("prod").await;
    m.ok(
        "PATCH",
        &format!("/api/v1/sites/{prod}"),
        Some(json!({"bandwidth_limit": 65536})),
    )
    .await;
    let throttled = Instant::now();

    // Raised: webhook (signed), stream (alert and status), REST.
    let raised = until("the alert.raised webhook", Duration::from_secs(60), || {
        got.lock()
            .unwrap()
            .iter()
            .find(|d| d.kind == "alert.raised")
            .cloned()
    })
    .await;
    eprintln!(
        "RPO alert raised {:?} after the throttle",
        throttled.elapsed()
    );
    let ev = verify(&raised, &secret);
    assert_eq!(ev["kind"], "alert.raised");
    assert_eq!(ev["details"]["kind"], "rpo_exceeded", "{ev}");
    assert_eq!(ev["vpg_id"], vpg.as_str());
    let alert_id = ev["subject_id"].as_str().unwrap().to_string();
    until(
        "the stream to show the alert",
        Duration::from_secs(5),
        || stream_alert(&frames, &alert_id, false).then_some(()),
    )
    .await;
    until(
        "the stream to show RPO Not Meeting SLA",
        Duration::from_secs(5),
        || stream_vpg_status(&frames, &vpg, "rpo_not_meeting_sla").then_some(()),
    )
    .await;
    let open = m.items("/api/v1/alerts?open=true").await;
    assert!(
        open.iter()
            .any(|a| a["id"] == alert_id.as_str() && a["kind"] == "rpo_exceeded"),
        "{open:#?}"
    );

    // Lifted: the backlog drains, the alert clears after its quiet period.
    writing.store(false, Ordering::SeqCst);
    let written = writer.await.unwrap();
    m.ok(
        "PATCH",
        &format!("/api/v1/sites/{prod}"),
        Some(json!({"bandwidth_limit": null})),
    )
    .await;
    let lifted = Instant::now();
    let cleared = until("the alert.cleared webhook", Duration::from_secs(60), || {
        got.lock()
            .unwrap()
            .iter()
            .find(|d| d.kind == "alert.cleared")
            .cloned()
    })
    .await;
    eprintln!(
        "{written} writes of 64 KiB; alert cleared {:?} after the throttle was lifted",
        lifted.elapsed()
    );
    let ev = verify(&cleared, &secret);
    assert_eq!(ev["subject_id"], alert_id.as_str());
    until(
        "the stream to show the alert cleared",
        Duration::from_secs(5),
        || stream_alert(&frames, &alert_id, true).then_some(()),
    )
    .await;
    let kinds: Vec<String> = got.lock().unwrap().iter().map(|d| d.kind.clone()).collect();
    assert_eq!(
        kinds,
        ["alert.raised", "alert.cleared"],
        "in order, once each"
    );
    m.wait_vpg(
        &vpg,
        "Meeting SLA again",
        Duration::from_secs(30),
        &agents,
        |v| v["status"] == "meeting_sla",
    )
    .await;
    assert!(stream_vpg_status(&frames, &vpg, "meeting_sla"));
    // Every stream frame was the next number.
    let seqs: Vec<u64> = frames
        .lock()
        .unwrap()
        .iter()
        .map(|f| f["seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}
