//! The live stream (`GET /api/v1/stream`) against a real manager, on SQLite and
//! PostgreSQL: a snapshot then deltas of what changes; a client that reconnects with
//! `since` gets exactly the frames a client that stayed connected got; one too far
//! behind gets a fresh snapshot; a client that never reads is dropped while memory stays
//! bounded and the other clients carry on.

use crate::helpers::{
    assert_problem, spawn_app, spawn_app_with, Backend, ControlSettings, TestApp,
};
use bulwark::manager::live::LiveSettings;
use bulwark::manager::store::NewAlert;
use bulwark::model::access::Role;
use bulwark::proto::api::Event;
use bulwark::proto::live::{Delta, CLOSE_TOO_SLOW};
use futures::{SinkExt, StreamExt};
use reqwest::StatusCode;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const WAIT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A stream client that keeps every frame it read.
struct Client {
    ws: Ws,
    frames: Vec<(u64, String)>,
}

fn stream_url(app: &TestApp, query: &str) -> String {
    format!("ws://{}/api/v1/stream{query}", app.addr)
}

impl Client {
    async fn connect(app: &TestApp, since: Option<u64>) -> Client {
        let q = match since {
            Some(n) => format!("?since={n}&access_token={}", app.admin),
            None => format!("?access_token={}", app.admin),
        };
        let (ws, _) = tokio_tungstenite::connect_async(stream_url(app, &q))
            .await
            .expect("stream connects");
        Client {
            ws,
            frames: Vec::new(),
        }
    }

    /// The next frame, parsed; panics after `WAIT`.
    async fn next(&mut self) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let m = tokio::time::timeout(left, self.ws.next())
                .await
                .expect("a frame in time")
                .expect("stream open")
                .expect("stream readable");
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(t.as_str()).unwrap();
                self.frames
                    .push((v["seq"].as_u64().unwrap(), t.to_string()));
                return v;
            }
        }
    }

    /// Reads frames until `f` returns Some; panics after `WAIT`.
    async fn until<T>(&mut self, mut f: impl FnMut(&Value) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            let v = self.next().await;
            if let Some(t) = f(&v) {
                return t;
            }
        }
        panic!("condition not met in {WAIT:?}; frames: {:?}", self.frames);
    }

    fn last_seq(&self) -> u64 {
        self.frames.last().map(|f| f.0).unwrap()
    }
}

fn names(v: &Value, list: &str) -> Vec<String> {
    v[list]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| x["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn ids(v: &Value, list: &str) -> Vec<String> {
    v[list]
        .as_array()
        .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

on_both!(snapshot_then_deltas, snapshot_then_deltas_on);
on_both!(reconnect_with_since_misses_nothing, reconnect_on);

async fn snapshot_then_deltas_on(backend: Backend) {
    let app = spawn_app(backend).await;
    let w = app.world(2).await;
    let vpg = app
        .create(
            "/api/v1/vpgs",
            json!({"name": "web", "recovery_site_id": w.recovery_site,
                   "members": [{"vm_id": w.vms[0]}]}),
        )
        .await;

    let mut c = Client::connect(&app, None).await;
    let snap = c.next().await;
    assert_eq!(snap["type"], "snapshot", "{snap}");
    assert_eq!(snap["reason"], "connect");
    let mut sites = names(&snap, "sites");
    sites.sort();
    assert_eq!(sites, ["dr", "prod"]);
    assert_eq!(names(&snap, "hosts").len(), 2);
    let vpgs = snap["vpgs"].as_array().unwrap();
    assert_eq!(vpgs.len(), 1);
    assert_eq!(vpgs[0]["id"], vpg.as_str());
    assert_eq!(vpgs[0]["vm_count"], 1);
    assert!(
        snap["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "vpg.created"),
        "{snap}"
    );
    let s0 = snap["seq"].as_u64().unwrap();

    // A change on the server arrives as a delta carrying the whole record and its event.
    let site = app
        .create("/api/v1/sites", json!({"name": "cold-site"}))
        .await;
    let d = c
        .until(|v| {
            names(v, "sites")
                .contains(&"cold-site".into())
                .then(|| v.clone())
        })
        .await;
    assert_eq!(d["type"], "delta");
    assert!(d["events"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "site.created" && e["subject_id"] == site.as_str()));

    // A member joins: the VPG comes whole, with its new count.
    let (s, _) = app
        .post(
            &format!("/api/v1/vpgs/{vpg}/members"),
            json!({"vm_id": w.vms[1]}),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    c.until(|v| {
        v["vpgs"]
            .as_array()?
            .iter()
            .any(|x| x["id"] == vpg.as_str() && x["vm_count"] == 2)
            .then_some(())
    })
    .await;

    // Alerts: raised, then cleared (the record carries `cleared_at`).
    let alert = app
        .store
        .raise_alert(&NewAlert {
            kind: "rpo_exceeded".into(),
            severity: "warning".into(),
            vpg_id: Some(vpg.clone()),
            host_id: None,
            site_id: None,
            message: "RPO 30 s over the 10 s target".into(),
            affected_count: 1,
            details: None,
        })
        .await
        .unwrap();
    c.until(|v| {
        v["alerts"]
            .as_array()?
            .iter()
            .any(|a| a["id"] == alert.as_str() && a["cleared_at"].is_null())
            .then_some(())
    })
    .await;
    assert!(app.store.clear_alert(&alert).await.unwrap());
    c.until(|v| {
        v["alerts"]
            .as_array()?
            .iter()
            .any(|a| a["id"] == alert.as_str() && a["cleared_at"].is_string())
            .then_some(())
    })
    .await;

    // Removals name the id.
    let (s, _) = app.delete(&format!("/api/v1/sites/{site}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    c.until(|v| ids(v, "sites_removed").contains(&site).then_some(()))
        .await;

    // Every frame after the snapshot is the next number.
    let seqs: Vec<u64> = c.frames.iter().map(|f| f.0).collect();
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(*s, s0 + i as u64, "frames not consecutive: {seqs:?}");
    }

    // Auth: none → 401; a bad token → 401; a viewer in the header may watch.
    let plain = app.url("/api/v1/stream");
    let r = app.http.get(&plain).send().await.unwrap();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    assert_eq!(body["code"], "auth.missing_token", "{body}");
    let r = app
        .http
        .get(format!("{plain}?access_token=nope"))
        .send()
        .await
        .unwrap();
    let got = (r.status(), r.json::<Value>().await.unwrap());
    assert_problem(&got, StatusCode::UNAUTHORIZED, "auth.invalid_token");
    let viewer = app.token(Role::Viewer).await;
    let mut req = stream_url(&app, "").into_client_request().unwrap();
    req.headers_mut()
        .insert("authorization", format!("Bearer {viewer}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let first = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let v: Value = serde_json::from_str(first.to_text().unwrap()).unwrap();
    assert_eq!(v["type"], "snapshot");
    // Not a WebSocket upgrade, but authenticated: a clear 400.
    let r = app
        .http
        .get(&plain)
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    let got = (r.status(), r.json::<Value>().await.unwrap());
    assert_problem(&got, StatusCode::BAD_REQUEST, "stream.websocket_required");
}

async fn reconnect_on(backend: Backend) {
    let app = spawn_app(backend).await;
    let mut stayed = Client::connect(&app, None).await;
    let mut left = Client::connect(&app, None).await;
    stayed.next().await;
    left.next().await;
    app.create("/api/v1/sites", json!({"name": "before"})).await;
    left.until(|v| names(v, "sites").contains(&"before".into()).then_some(()))
        .await;
    let since = left.last_seq();
    drop(left);

    // Changes while away, from two writers at once (on PostgreSQL, ids can commit out
    // of order: the publisher must not lose the one committed late).
    let want: BTreeSet<String> = (0..30).map(|i| format!("site-{i:02}")).collect();
    let mut writers = Vec::new();
    for half in 0..2 {
        let http = app.http.clone();
        let url = app.url("/api/v1/sites");
        let admin = app.admin.clone();
        writers.push(tokio::spawn(async move {
            for i in (half..30).step_by(2) {
                let r = http
                    .post(&url)
                    .bearer_auth(&admin)
                    .json(&json!({"name": format!("site-{i:02}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), StatusCode::CREATED);
            }
        }));
    }
    for w in writers {
        w.await.unwrap();
    }
    let mut seen = BTreeSet::new();
    stayed
        .until(|v| {
            seen.extend(names(v, "sites"));
            want.is_subset(&seen).then_some(())
        })
        .await;
    let target = stayed.last_seq();

    let mut back = Client::connect(&app, Some(since)).await;
    let first = back.next().await;
    assert_eq!(first["type"], "delta", "resumed, not a snapshot: {first}");
    while back.last_seq() < target {
        back.next().await;
    }
    let after = |c: &Client| -> Vec<(u64, String)> {
        c.frames
            .iter()
            .filter(|f| f.0 > since && f.0 <= target)
            .cloned()
            .collect()
    };
    assert_eq!(
        after(&back),
        after(&stayed),
        "the resumed client saw other frames"
    );
    assert_eq!(back.frames[0].0, since + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn since_too_old_or_unknown_gets_a_fresh_snapshot() {
    let control = ControlSettings {
        live: LiveSettings {
            history_frames: 4,
            ..LiveSettings::default()
        },
        ..ControlSettings::default()
    };
    let app = spawn_app_with(Backend::Sqlite, control).await;
    let mut c = Client::connect(&app, None).await;
    let since = c.next().await["seq"].as_u64().unwrap();
    for i in 0..10 {
        app.create("/api/v1/sites", json!({"name": format!("s{i}")}))
            .await;
        // One frame each: wait for it.
        c.until(|v| names(v, "sites").contains(&format!("s{i}")).then_some(()))
            .await;
    }
    let mut late = Client::connect(&app, Some(since)).await;
    let snap = late.next().await;
    assert_eq!(snap["type"], "snapshot");
    assert_eq!(snap["reason"], "since_too_old");
    assert_eq!(names(&snap, "sites").len(), 10);
    assert_eq!(snap["seq"].as_u64(), Some(c.last_seq()));
    // A number from nowhere (another run of the manager) is no better.
    let mut odd = Client::connect(&app, Some(c.last_seq() + 1_000_000)).await;
    assert_eq!(odd.next().await["reason"], "since_too_old");
    // Garbage is a clear 400, not a hang.
    let r = app
        .http
        .get(app.url("/api/v1/stream?since=soon"))
        .bearer_auth(&app.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_and_memory_stays_bounded() {
    const FRAME: usize = 256 << 10;
    const FRAMES: usize = 400; // 100 MiB through the stream
    let control = ControlSettings {
        live: LiveSettings {
            history_frames: 1000,
            history_bytes: 2 << 20,
            client_queue: 8,
            send_timeout: Duration::from_millis(300),
            ..LiveSettings::default()
        },
        ..ControlSettings::default()
    };
    let app = spawn_app_with(Backend::Sqlite, control).await;

    // The sleeper: a small receive buffer, and it never reads after the handshake.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let tcp = sock.connect(app.addr).await.unwrap();
    let (mut sleeper, _) = tokio_tungstenite::client_async(
        stream_url(&app, &format!("?access_token={}", app.admin)),
        MaybeTlsStream::Plain(tcp),
    )
    .await
    .unwrap();

    // The reader keeps up; it tells how many big frames it has.
    let mut reader = Client::connect(&app, None).await;
    reader.next().await;
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let reading = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < FRAMES {
            let v = reader.next().await;
            // Not kept: the point is the manager's memory, not this client's.
            reader.frames.clear();
            if v["events"][0]["kind"] == "test.big" {
                seqs.push(v["seq"].as_u64().unwrap());
                count_tx.send_replace(seqs.len());
            }
        }
        // The reader stays connected: it is the client that keeps up.
        (seqs, reader)
    });
    let eventually = |f: &dyn Fn() -> bool| {
        let deadline = Instant::now() + WAIT;
        let ok = loop {
            if f() {
                break true;
            }
            if Instant::now() > deadline {
                break false;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(ok);
    };
    eventually(&|| app.live.stats().clients == 2);

    let rss_before = rss_bytes();
    let big = "x".repeat(FRAME);
    let mut published = Vec::new();
    for i in 0..FRAMES {
        let delta = Delta {
            events: vec![Event {
                id: -(i as i64) - 1,
                at: chrono::Utc::now(),
                kind: "test.big".into(),
                severity: "info".into(),
                actor: "test".into(),
                vpg_id: None,
                subject_type: "test".into(),
                subject_id: None,
                message: big.clone(),
                details: None,
            }],
            ..Delta::default()
        };
        published.push(app.live.publish(delta).unwrap());
        // Paced by the reader, so only the sleeper falls behind.
        tokio::time::timeout(WAIT, count_rx.wait_for(|n| *n > i))
            .await
            .expect("the reading client keeps receiving")
            .unwrap();
    }
    let (seqs, _reader) = reading.await.unwrap();
    assert_eq!(seqs, published, "the reader got every frame in order");
    // The sleeper's socket filled, its send timed out: dropped (the reader stays).
    eventually(&|| {
        let s = app.live.stats();
        s.clients == 1 && s.dropped == 1
    });
    let stats = app.live.stats();
    let rss_after = rss_bytes();
    let metrics = app
        .http
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("bulwark_stream_clients_dropped_total 1")
            && metrics.contains("bulwark_stream_clients 1"),
        "{metrics}"
    );
    assert!(stats.history_bytes <= 2 << 20, "{stats:?}");
    // 100 MiB went through; what stays is the bounded history and buffers.
    let grown = rss_after.saturating_sub(rss_before);
    assert!(
        grown < 48 << 20,
        "RSS grew {} MiB while 100 MiB streamed",
        grown >> 20
    );

    // The sleeper, reading at last, finds its stream ended (with a close saying why,
    // when it got through).
    let ended = tokio::time::timeout(WAIT, async {
        loop {
            match sleeper.next().await {
                None | Some(Err(_)) => return None,
                Some(Ok(Message::Close(f))) => return f.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
            }
        }
    })
    .await
    .expect("the sleeper's stream ends");
    if let Some(code) = ended {
        assert_eq!(code, CLOSE_TOO_SLOW);
    }
    let _ = sleeper.close(None).await;
    let _ = sleeper.send(Message::Ping(Default::default())).await;
}
