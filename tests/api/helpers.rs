//! `spawn_app`: a manager on port 0 over a fresh database of either kind.

use crate::fake_agent::FakeAgent;
use bulwark::manager::config::ManagerConfig;
pub use bulwark::manager::control::ControlSettings;
use bulwark::manager::server::Application;
use bulwark::manager::store::{Actor, Store};
use bulwark::model::access::Role;
use bulwark::proto::api::TokenCreate;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde_json::{json, Value};
use std::net::SocketAddr;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Where the test PostgreSQL answers; `BULWARK_TEST_PG` overrides.
pub fn pg_admin_url() -> String {
    std::env::var("BULWARK_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string())
}

/// A database that exists for one test only.
pub struct TestDb {
    pub url: String,
    pg_name: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let url = format!(
                    "sqlite://{}?mode=rwc",
                    dir.path().join("bulwark.db").display()
                );
                TestDb {
                    url,
                    pg_name: None,
                    _dir: Some(dir),
                }
            }
            Backend::Postgres => {
                let name = format!("bulwark_test_{}", uuid::Uuid::now_v7().simple());
                let admin = pg_admin_url();
                let db = sea_orm::Database::connect(&admin)
                    .await
                    .unwrap_or_else(|e| {
                        panic!("PostgreSQL at {admin} is needed for these tests: {e}")
                    });
                use sea_orm::ConnectionTrait;
                db.execute_unprepared(&format!("CREATE DATABASE {name}"))
                    .await
                    .unwrap();
                db.close().await.unwrap();
                let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap();
                TestDb {
                    url: format!("{base}/{name}"),
                    pg_name: Some(name),
                    _dir: None,
                }
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs inside the test's runtime; use a thread with its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sea_orm::ConnectionTrait;
                if let Ok(db) = sea_orm::Database::connect(&pg_admin_url()).await {
                    let _ = db
                        .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await;
                    let _ = db.close().await;
                }
            });
        })
        .join();
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub admin: String,
    pub http: reqwest::Client,
    pub store: Store,
    /// The live stream engine (tests publish raw frames to load a client).
    pub live: std::sync::Arc<bulwark::manager::live::Live>,
    /// Kept alive (and dropped) with the app.
    pub _db: TestDb,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub async fn spawn_app(backend: Backend) -> TestApp {
    spawn_app_with(backend, Default::default()).await
}

/// A manager with these control-plane timings (tests shorten them).
pub async fn spawn_app_with(backend: Backend, control: ControlSettings) -> TestApp {
    let db = TestDb::new(backend).await;
    let config = ManagerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        database_url: db.url.clone(),
        web_dir: None,
        bootstrap_token: true,
        control,
    };
    let app = Application::build(&config).await.expect("manager starts");
    let addr = app.local_addr();
    let admin = app
        .bootstrap_secret
        .clone()
        .expect("a fresh database bootstraps an admin token");
    let store = app.store().clone();
    let live = std::sync::Arc::clone(&app.control().live);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(app.run_until(async {
        let _ = rx.await;
    }));
    TestApp {
        addr,
        admin,
        http: reqwest::Client::new(),
        store,
        live,
        _db: db,
        shutdown: Some(tx),
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The control WebSocket of this manager.
    pub fn ws_url(&self) -> String {
        crate::fake_agent::ws_url(self.addr)
    }

    /// A fresh enrolment token (one use, one hour), via REST as the admin.
    pub async fn enrolment_token(&self) -> String {
        let (s, v) = self
            .post(
                "/api/v1/enrolment-tokens",
                json!({"description": "test", "expires_in_secs": 3600, "max_uses": 1}),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED, "{v}");
        v["secret"].as_str().unwrap().to_string()
    }

    /// Enrols a fake agent for `host` at `site` (both created if missing) with these
    /// VMs, and consumes the first Desired the manager sends after the Welcome.
    pub async fn agent(
        &self,
        host: &str,
        site: &str,
        vms: Vec<bulwark::proto::control::InventoryVm>,
    ) -> FakeAgent {
        let token = self.enrolment_token().await;
        let mut hello = FakeAgent::enrol(host, site, &token);
        hello.inventory.vms = vms;
        let mut a = FakeAgent::connect(&self.ws_url(), hello)
            .await
            .unwrap_or_else(|r| panic!("{host} rejected: {r:?}"));
        a.desired().await;
        a
    }

    /// Host id by name (panics if missing).
    pub async fn host_id(&self, name: &str) -> String {
        let (_, v) = self.get("/api/v1/hosts?limit=1000").await;
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["name"] == name)
            .unwrap_or_else(|| panic!("no host {name}: {v}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Polls `f` every 50 ms until it returns Some, for at most 10 s.
    pub async fn eventually<T, F, Fut>(&self, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if let Some(t) = f().await {
                return t;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    pub fn req(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    /// As the bootstrap admin; returns status and JSON (Null for an empty body).
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (StatusCode, Value) {
        let mut r = self.req(method, path, Some(&self.admin));
        if let Some(b) = body {
            r = r.json(&b);
        }
        split(r.send().await.unwrap()).await
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::GET, path, None).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn patch(&self, path: &str, body: Value) -> (StatusCode, Value) {
        self.call(Method::PATCH, path, Some(body)).await
    }

    pub async fn delete(&self, path: &str) -> (StatusCode, Value) {
        self.call(Method::DELETE, path, None).await
    }

    /// Creates and returns the id, asserting 201.
    pub async fn create(&self, path: &str, body: Value) -> String {
        let (s, v) = self.post(path, body).await;
        assert_eq!(s, StatusCode::CREATED, "{path}: {v}");
        v["id"].as_str().unwrap().to_string()
    }

    pub async fn token(&self, role: Role) -> String {
        self.store
            .create_token(
                &Actor("test".into()),
                TokenCreate {
                    name: format!("{role}-token"),
                    role,
                    expires_in_days: None,
                },
            )
            .await
            .unwrap()
            .secret
    }

    /// How many events exist (to show a rejected request changed nothing).
    pub async fn event_count(&self) -> usize {
        let mut n = 0;
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/api/v1/events?limit=1000&cursor={c}"),
                None => "/api/v1/events?limit=1000".to_string(),
            };
            let (_, v) = self.get(&path).await;
            n += v["items"].as_array().unwrap().len();
            match v["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return n,
            }
        }
    }

    /// Two sites, a host in each, and `vms` VMs with one disk on the protected host.
    pub async fn world(&self, vms: usize) -> World {
        let protected_site = self
            .create(
                "/api/v1/sites",
                json!({"name": "prod", "location": "Frankfurt"}),
            )
            .await;
        let recovery_site = self.create("/api/v1/sites", json!({"name": "dr"})).await;
        let protected_host = self
            .create(
                "/api/v1/hosts",
                json!({"name": "esx-prod-1", "site_id": protected_site}),
            )
            .await;
        let recovery_host = self
            .create("/api/v1/hosts", json!({"name": "esx-dr-1", "site_id": recovery_site, "storage_path": "/srv/bulwark"}))
            .await;
        let mut vm_ids = Vec::new();
        for i in 0..vms {
            vm_ids.push(
                self.create(
                    "/api/v1/vms",
                    json!({
                        "name": format!("vm{i}"),
                        "host_id": protected_host,
                        "nics": [{"name": "eth0", "network": "prod-net", "addresses": [format!("10.1.0.{}/24", i + 10)]}],
                        "disks": [{"name": "root", "size_bytes": 1u64 << 30}],
                    }),
                )
                .await,
            );
        }
        World {
            protected_site,
            recovery_site,
            protected_host,
            recovery_host,
            vms: vm_ids,
        }
    }
}

pub struct World {
    pub protected_site: String,
    pub recovery_site: String,
    pub protected_host: String,
    pub recovery_host: String,
    pub vms: Vec<String>,
}

pub async fn split(res: Response) -> (StatusCode, Value) {
    let status = res.status();
    let text = res.text().await.unwrap();
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or(Value::String(text))
    };
    (status, v)
}

/// Asserts a problem document with this status and code.
pub fn assert_problem(got: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(got.0, status, "{}", got.1);
    assert_eq!(got.1["code"], code, "{}", got.1);
    assert_eq!(got.1["status"], status.as_u16());
    assert!(got.1["type"].as_str().unwrap().ends_with(code));
    assert!(!got.1["detail"].as_str().unwrap().is_empty());
}

/// Runs an async test body once on SQLite and once on PostgreSQL.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let app = $crate::helpers::spawn_app($crate::helpers::Backend::Sqlite).await;
                ($body)(app).await;
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let app = $crate::helpers::spawn_app($crate::helpers::Backend::Postgres).await;
                ($body)(app).await;
            }
        }
    };
}
