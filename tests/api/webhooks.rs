//! Webhooks end to end: a real receiver (axum on a loopback port) records every request
//! and the tests check order, filtering, signatures (verified here with the hmac crate,
//! independently of the manager's code), retries through 500s, hangs and a closed
//! listener, independence of subscriptions, secrets shown once and rotation.

use crate::helpers::*;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxStatus};
use axum::response::IntoResponse;
use bulwark::manager::webhooks::WebhookSettings;
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use sha2::Sha256;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const OK: u8 = 0;
const FAIL: u8 = 1;
const HANG: u8 = 2;

#[derive(Debug, Clone)]
struct Rec {
    event: String,
    delivery: String,
    timestamp: String,
    signature: String,
    content_type: String,
    body: Bytes,
    answered: u16,
}

impl Rec {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn id(&self) -> i64 {
        self.json()["id"].as_i64().unwrap()
    }

    fn signed_by(&self, secret: &str) -> bool {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(self.timestamp.as_bytes());
        mac.update(b".");
        mac.update(&self.body);
        let want = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        want == self.signature
    }
}

#[derive(Clone, Default)]
struct RxState {
    recs: Arc<Mutex<Vec<Rec>>>,
    mode: Arc<AtomicU8>,
}

/// A webhook receiver that can answer 2xx, answer 500, hang, or be down.
struct Receiver {
    addr: SocketAddr,
    state: RxState,
    server: Option<tokio::task::JoinHandle<()>>,
}

async fn receive(State(s): State<RxState>, h: HeaderMap, body: Bytes) -> impl IntoResponse {
    let mode = s.mode.load(Ordering::SeqCst);
    if mode == HANG {
        tokio::time::sleep(Duration::from_secs(30)).await;
    }
    let answered = if mode == OK { 204 } else { 500 };
    let get = |n: &str| {
        h.get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    s.recs.lock().unwrap().push(Rec {
        event: get("x-bulwark-event"),
        delivery: get("x-bulwark-delivery"),
        timestamp: get("x-bulwark-timestamp"),
        signature: get("x-bulwark-signature"),
        content_type: get("content-type"),
        body,
        answered,
    });
    // No keep-alive: once the listener is closed the manager must really find the
    // receiver down, not reuse a pooled connection.
    (
        AxStatus::from_u16(answered).unwrap(),
        [("connection", "close")],
    )
}

impl Receiver {
    async fn start() -> Receiver {
        let mut r = Receiver {
            addr: "127.0.0.1:0".parse().unwrap(),
            state: RxState::default(),
            server: None,
        };
        r.up().await;
        r
    }

    async fn up(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(self.state.clone());
        self.server = Some(tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        }));
    }

    async fn down(&mut self) {
        if let Some(h) = self.server.take() {
            h.abort();
            let _ = h.await;
        }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    fn set(&self, mode: u8) {
        self.state.mode.store(mode, Ordering::SeqCst);
    }

    fn recs(&self) -> Vec<Rec> {
        self.state.recs.lock().unwrap().clone()
    }

    /// Event ids answered 2xx, in arrival order.
    fn delivered(&self) -> Vec<i64> {
        self.recs()
            .iter()
            .filter(|r| r.answered < 300)
            .map(Rec::id)
            .collect()
    }
}

async fn fast_app(backend: Backend) -> TestApp {
    spawn_app_with(
        backend,
        ControlSettings {
            webhooks: WebhookSettings {
                poll: Duration::from_millis(100),
                backoff_base: Duration::from_millis(100),
                backoff_cap: Duration::from_millis(400),
                timeout: Duration::from_secs(1),
                settle: Duration::from_secs(2),
                batch: 100,
            },
            ..Default::default()
        },
    )
    .await
}

async fn subscribe(app: &TestApp, name: &str, url: &str, kinds: Value) -> (String, String) {
    let (s, v) = app
        .post(
            "/api/v1/webhooks",
            json!({"name": name, "url": url, "event_kinds": kinds}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    (
        v["webhook"]["id"].as_str().unwrap().to_string(),
        v["secret"].as_str().unwrap().to_string(),
    )
}

async fn site(app: &TestApp, name: &str) -> String {
    app.create("/api/v1/sites", json!({"name": name})).await
}

/// Waits until the receiver has 2xx-answered `n` events.
async fn wait_delivered(app: &TestApp, rx: &Receiver, n: usize, what: &str) -> Vec<i64> {
    app.eventually(what, || async {
        let d = rx.delivered();
        (d.len() >= n).then_some(d)
    })
    .await
}

async fn deliveries(app: &TestApp, id: &str) -> Vec<Value> {
    let (s, v) = app
        .get(&format!("/api/v1/webhooks/{id}/deliveries?limit=1000"))
        .await;
    assert_eq!(s, StatusCode::OK, "{v}");
    v["items"].as_array().unwrap().clone()
}

on_both!(delivered_in_order_signed_filtered, in_order_signed_filtered);
async fn in_order_signed_filtered(backend: Backend) {
    let app = fast_app(backend).await;
    // History before the subscription is not delivered.
    site(&app, "before").await;
    let rx = Receiver::start().await;
    let (wid, secret) = subscribe(&app, "sites", &rx.url(), json!(["site.*"])).await;
    let mut sites = Vec::new();
    for i in 0..3 {
        sites.push(site(&app, &format!("s{i}")).await);
        // Another kind in between: must not reach a `site.*` subscription.
        app.token(bulwark::model::access::Role::Viewer).await;
        let _ = app
            .post(
                "/api/v1/tokens",
                json!({"name": format!("t{i}"), "role": "viewer"}),
            )
            .await;
    }
    let got = wait_delivered(&app, &rx, 3, "three site events delivered").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let recs = rx.recs();
    assert_eq!(recs.len(), 3, "only site events, once each: {recs:?}");
    assert!(got.windows(2).all(|w| w[0] < w[1]), "in order: {got:?}");
    for (r, sid) in recs.iter().zip(&sites) {
        let body = r.json();
        assert_eq!(r.event, "site.created");
        assert_eq!(body["kind"], "site.created");
        assert_eq!(body["subject_id"], sid.as_str());
        assert_eq!(r.content_type, "application/json");
        assert_eq!(r.delivery, format!("{wid}:{}", r.id()));
        assert!(r.signed_by(&secret), "signature verifies: {r:?}");
        assert!(!r.signed_by("another secret"));
        let ts: i64 = r.timestamp.parse().unwrap();
        assert!((chrono::Utc::now().timestamp() - ts).abs() < 60);
    }
    // History: one attempt each, delivered; paginated newest first.
    let d = deliveries(&app, &wid).await;
    assert_eq!(d.len(), 3);
    for x in &d {
        assert_eq!(x["attempts"], 1, "{x}");
        assert_eq!(x["last_status"], 204);
        assert!(x["delivered_at"].is_string());
        assert_eq!(x["event_kind"], "site.created");
    }
    let (_, p1) = app
        .get(&format!("/api/v1/webhooks/{wid}/deliveries?limit=2"))
        .await;
    assert_eq!(p1["items"].as_array().unwrap().len(), 2);
    assert_eq!(p1["items"][0]["event_id"], got[2]);
    let c = p1["next_cursor"].as_str().unwrap();
    let (_, p2) = app
        .get(&format!(
            "/api/v1/webhooks/{wid}/deliveries?limit=2&cursor={c}"
        ))
        .await;
    assert_eq!(p2["items"].as_array().unwrap().len(), 1);
    assert_eq!(p2["items"][0]["event_id"], got[0]);
    assert!(p2["next_cursor"].is_null());
}

on_both!(outage_loses_nothing_and_delays_no_one, outage);
async fn outage(backend: Backend) {
    let app = fast_app(backend).await;
    let mut bad = Receiver::start().await;
    let good = Receiver::start().await;
    let (bad_id, bad_secret) = subscribe(&app, "bad", &bad.url(), json!(["site.*"])).await;
    let (good_id, _) = subscribe(&app, "good", &good.url(), json!(["site.*"])).await;

    // Phase 1: the bad receiver answers 500.
    bad.set(FAIL);
    site(&app, "a1").await;
    site(&app, "a2").await;
    wait_delivered(&app, &good, 2, "good receiver unaffected by 500s").await;
    app.eventually("bad receiver retried", || async {
        (bad.recs().len() >= 3).then_some(())
    })
    .await;
    // Phase 2: it hangs past the timeout; the other subscription still gets events at once.
    bad.set(HANG);
    let t0 = tokio::time::Instant::now();
    site(&app, "a3").await;
    wait_delivered(&app, &good, 3, "good receiver unaffected by a hang").await;
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    // Phase 3: the listener is closed (connection refused).
    bad.down().await;
    site(&app, "a4").await;
    site(&app, "a5").await;
    let good_ids = wait_delivered(&app, &good, 5, "good receiver during the outage").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(bad.delivered().is_empty());
    let d = deliveries(&app, &bad_id).await;
    assert_eq!(
        d.len(),
        1,
        "later events wait behind the failing one: {d:?}"
    );
    assert!(d[0]["attempts"].as_u64().unwrap() >= 3, "{}", d[0]);
    assert!(d[0]["delivered_at"].is_null());
    assert!(d[0]["next_attempt_at"].is_string());
    assert!(d[0]["last_error"].is_string());

    // Back: everything arrives, in order, nothing lost.
    bad.set(OK);
    bad.up().await;
    let got = wait_delivered(&app, &bad, 5, "bad receiver catches up").await;
    assert_eq!(got, good_ids, "same events, same order");
    // Every request, failed or not, came in event order (a later event never overtook).
    let all: Vec<i64> = bad.recs().iter().map(Rec::id).collect();
    assert!(all.windows(2).all(|w| w[0] <= w[1]), "{all:?}");
    assert!(bad.recs().iter().all(|r| r.signed_by(&bad_secret)));
    // The same event keeps its delivery id across attempts.
    let first: Vec<Rec> = bad
        .recs()
        .into_iter()
        .filter(|r| r.id() == got[0])
        .collect();
    assert!(first.len() >= 3);
    assert!(first.iter().all(|r| r.delivery == first[0].delivery));

    let d = deliveries(&app, &bad_id).await;
    assert_eq!(d.len(), 5);
    let oldest = d.last().unwrap();
    assert_eq!(oldest["event_id"], got[0]);
    assert!(oldest["attempts"].as_u64().unwrap() >= 3, "{oldest}");
    assert_eq!(oldest["last_status"], 204);
    assert!(oldest["last_error"].is_null());
    assert!(oldest["delivered_at"].is_string());
    assert!(deliveries(&app, &good_id)
        .await
        .iter()
        .all(|x| x["attempts"] == 1));
}

on_both!(secret_shown_once_and_rotated, secrets);
async fn secrets(backend: Backend) {
    let app = fast_app(backend).await;
    let rx = Receiver::start().await;
    let (s, v) = app
        .post(
            "/api/v1/webhooks",
            json!({"name": "mine", "url": rx.url(), "event_kinds": ["site.created"],
                   "secret": "my-own-secret-0123456789"}),
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{v}");
    assert_eq!(v["secret"], "my-own-secret-0123456789");
    let id = v["webhook"]["id"].as_str().unwrap().to_string();
    let (_, gen) = app
        .post(
            "/api/v1/webhooks",
            json!({"name": "generated", "url": rx.url(), "event_kinds": ["vpg.*"]}),
        )
        .await;
    assert!(gen["secret"].as_str().unwrap().starts_with("whsec_"));
    // Never shown again.
    let (_, got) = app.get(&format!("/api/v1/webhooks/{id}")).await;
    assert!(got.get("secret").is_none(), "{got}");
    assert_eq!(got["event_kinds"], json!(["site.created"]));
    let (_, list) = app.get("/api/v1/webhooks").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 2);
    assert!(!list.to_string().contains("my-own-secret"));
    assert!(!list.to_string().contains(gen["secret"].as_str().unwrap()));

    site(&app, "one").await;
    wait_delivered(&app, &rx, 1, "first delivery").await;
    let (s, rot) = app
        .post(&format!("/api/v1/webhooks/{id}/rotate-secret"), json!({}))
        .await;
    assert_eq!(s, StatusCode::OK, "{rot}");
    let new_secret = rot["secret"].as_str().unwrap().to_string();
    assert_ne!(new_secret, "my-own-secret-0123456789");
    site(&app, "two").await;
    wait_delivered(&app, &rx, 2, "second delivery").await;
    let recs = rx.recs();
    assert!(recs[0].signed_by("my-own-secret-0123456789"));
    assert!(recs[1].signed_by(&new_secret));
    assert!(!recs[1].signed_by("my-own-secret-0123456789"));

    // Disabled: nothing delivered; enabled again: the backlog arrives.
    let (s, v) = app
        .patch(&format!("/api/v1/webhooks/{id}"), json!({"enabled": false}))
        .await;
    assert_eq!((s, &v["enabled"]), (StatusCode::OK, &json!(false)));
    site(&app, "three").await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(rx.recs().len(), 2);
    app.patch(&format!("/api/v1/webhooks/{id}"), json!({"enabled": true}))
        .await;
    wait_delivered(&app, &rx, 3, "backlog after re-enabling").await;

    // Deleted: gone with its history, audited.
    let (s, _) = app.delete(&format!("/api/v1/webhooks/{id}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    assert_problem(
        &app.get(&format!("/api/v1/webhooks/{id}/deliveries")).await,
        StatusCode::NOT_FOUND,
        "webhook.not_found",
    );
    let (_, ev) = app.get("/api/v1/events?kind=webhook.").await;
    let kinds: Vec<&str> = ev["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    for k in [
        "webhook.created",
        "webhook.secret_rotated",
        "webhook.updated",
        "webhook.deleted",
    ] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
}

on_both!(invalid_requests_are_refused, invalid);
async fn invalid(backend: Backend) {
    let app = spawn_app(backend).await;
    let before = app.event_count().await;
    let post = |body: Value| {
        let app = &app;
        async move { app.post("/api/v1/webhooks", body).await }
    };
    let ok_url = "http://127.0.0.1:9/hook";
    for (body, code) in [
        (
            json!({"name": "w", "url": "ftp://x/y", "event_kinds": ["*"]}),
            "webhook.invalid_url",
        ),
        (
            json!({"name": "w", "url": "not a url", "event_kinds": ["*"]}),
            "webhook.invalid_url",
        ),
        (
            json!({"name": "w", "url": ok_url, "event_kinds": []}),
            "webhook.no_event_kinds",
        ),
        (
            json!({"name": "w", "url": ok_url, "event_kinds": ["vpg*"]}),
            "webhook.invalid_event_kind",
        ),
        (
            json!({"name": "w", "url": ok_url, "event_kinds": ["*"], "secret": "short"}),
            "webhook.invalid_secret",
        ),
    ] {
        assert_problem(&post(body).await, StatusCode::UNPROCESSABLE_ENTITY, code);
    }
    assert_problem(
        &post(json!({"name": "w", "url": ok_url})).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "request.invalid_body",
    );
    assert_eq!(app.event_count().await, before, "rejections write nothing");

    let (id, _) = subscribe(&app, "w", ok_url, json!(["*"])).await;
    assert_problem(
        &post(json!({"name": "w", "url": ok_url, "event_kinds": ["*"]})).await,
        StatusCode::CONFLICT,
        "webhook.name_taken",
    );
    assert_problem(
        &app.patch(
            &format!("/api/v1/webhooks/{id}"),
            json!({"url": "gopher://x"}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "webhook.invalid_url",
    );
    assert_problem(
        &app.patch(
            &format!("/api/v1/webhooks/{id}"),
            json!({"event_kinds": []}),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "webhook.no_event_kinds",
    );
    assert_problem(
        &app.get("/api/v1/webhooks/nope").await,
        StatusCode::NOT_FOUND,
        "webhook.not_found",
    );
    assert_problem(
        &app.get(&format!("/api/v1/webhooks/{id}/deliveries?cursor=x"))
            .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "request.invalid_cursor",
    );
    // Admin only.
    let op = app.token(bulwark::model::access::Role::Operator).await;
    let res = app
        .req(Method::GET, "/api/v1/webhooks", Some(&op))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
}

on_both!(survives_a_manager_restart, restart);
/// The receiver is down while events happen and the manager stops; a new manager on
/// the same database delivers all of them, in order, once the receiver is back.
async fn restart(backend: Backend) {
    use bulwark::manager::config::ManagerConfig;
    use bulwark::manager::server::Application;
    let db = TestDb::new(backend).await;
    let config = ManagerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: db.url.clone(),
        web_dir: None,
        bootstrap_token: true,
        control: ControlSettings {
            webhooks: WebhookSettings {
                poll: Duration::from_millis(100),
                backoff_base: Duration::from_millis(100),
                backoff_cap: Duration::from_millis(400),
                timeout: Duration::from_secs(1),
                settle: Duration::from_secs(2),
                batch: 100,
            },
            ..Default::default()
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
    let post = |path: &str, body: Value| {
        http.post(format!("http://{addr}{path}"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    let mut rx = Receiver::start().await;
    rx.down().await;
    let res = post(
        "/api/v1/webhooks",
        json!({"name": "r", "url": rx.url(), "event_kinds": ["site.*"]}),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let secret = res.json::<Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();
    let mut sites = Vec::new();
    for i in 0..4 {
        let res = post("/api/v1/sites", json!({"name": format!("r{i}")}))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CREATED);
        sites.push(
            res.json::<Value>().await.unwrap()["id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(http);
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();

    rx.up().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(rx.recs().is_empty(), "nothing sent while no manager runs");
    let (_addr, none, _stop2, _running2) = start(config).await;
    assert!(none.is_none(), "same database: no second bootstrap");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rx.delivered().len() < 4 {
        assert!(tokio::time::Instant::now() < deadline, "{:?}", rx.recs());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got: Vec<String> = rx
        .recs()
        .iter()
        .map(|r| r.json()["subject_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, sites, "each once, in order");
    assert!(rx.recs().iter().all(|r| r.signed_by(&secret)));
}

on_both!(long_runs_of_other_kinds_are_crossed_at_once, crossing);
/// Many events of other kinds before a matching one: crossed a batch at a time within
/// one pass, not one batch per poll (which here would take 8 polls of 2 s).
async fn crossing(backend: Backend) {
    let app = spawn_app_with(
        backend,
        ControlSettings {
            webhooks: WebhookSettings {
                poll: Duration::from_secs(2),
                batch: 5,
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await;
    let rx = Receiver::start().await;
    let (_, secret) = subscribe(&app, "deletions", &rx.url(), json!(["site.deleted"])).await;
    let mut last = String::new();
    for i in 0..40 {
        last = site(&app, &format!("c{i}")).await;
    }
    let t0 = tokio::time::Instant::now();
    let (s, _) = app.delete(&format!("/api/v1/sites/{last}")).await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    wait_delivered(&app, &rx, 1, "the one matching event").await;
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    let recs = rx.recs();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].event, "site.deleted");
    assert!(recs[0].signed_by(&secret));
}
