//! The whole system as processes on loopback, for the orchestration tests and nothing
//! faked: `bulwark manager` on a throwaway PostgreSQL database, `bulwark agent`s that
//! enrol with a token and are driven over the control channel, the REST API as an
//! operator uses it, and offline reads of the recovery journals.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::agent_common::{open_journal, AgentProc, Lab};

/// Bound of every wait in these tests.
pub const SLA_WAIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// PostgreSQL
// ---------------------------------------------------------------------------------------

/// A PostgreSQL database for one test (dropped at the end, connections forced out).
pub struct PgDb {
    pub url: String,
    name: String,
    admin: String,
}

impl PgDb {
    pub async fn new() -> PgDb {
        use sea_orm::ConnectionTrait;
        let admin = std::env::var("BULWARK_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_string());
        let name = format!("bulwark_orch_{}", uuid::Uuid::now_v7().simple());
        let db = sea_orm::Database::connect(&admin)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {admin} is needed for these tests: {e}"));
        db.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        db.close().await.unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b.to_string()).unwrap();
        PgDb {
            url: format!("{base}/{name}"),
            name,
            admin,
        }
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let admin = self.admin.clone();
        let name = self.name.clone();
        // A fresh runtime on a plain thread: Drop may run inside a runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                use sea_orm::ConnectionTrait;
                if let Ok(db) = sea_orm::Database::connect(&admin).await {
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

// ---------------------------------------------------------------------------------------
// The manager process
// ---------------------------------------------------------------------------------------

/// `bulwark manager` as a child process; stderr to a file. Restartable on the same port.
pub struct ManagerProc {
    pub config: PathBuf,
    pub db_url: String,
    pub log: PathBuf,
    pub addr: String,
    pub admin_token: String,
    /// Environment for the next (re)start, e.g. fault injection.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    http: reqwest::Client,
}

impl ManagerProc {
    /// Starts a manager on a free port with `[manager]` settings `extra` (TOML lines).
    pub async fn start(dir: &Path, db_url: &str, extra: &str) -> ManagerProc {
        Self::start_on(dir, db_url, extra, "127.0.0.1:0").await
    }

    /// [`ManagerProc::start`] listening on `listen` (an address of a test namespace's
    /// link, for agents in other namespaces).
    pub async fn start_on(dir: &Path, db_url: &str, extra: &str, listen: &str) -> ManagerProc {
        let config = dir.join("manager.toml");
        std::fs::write(&config, format!("[manager]\n{extra}\n")).unwrap();
        let mut m = ManagerProc {
            config,
            db_url: db_url.to_string(),
            log: dir.join("manager.stderr.log"),
            addr: listen.into(),
            admin_token: String::new(),
            env: Vec::new(),
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        m.spawn().await;
        assert!(
            !m.admin_token.is_empty(),
            "a fresh database bootstraps an admin token"
        );
        m
    }

    /// (Re)starts on the address of the previous start.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none());
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_bulwark"))
            .arg("--config")
            .arg(&self.config)
            .args([
                "manager",
                "--listen",
                &self.addr,
                "--database-url",
                &self.db_url,
            ])
            .env_remove("BULWARK_LOG")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = self.log.clone();
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .unwrap();
            let _ = writeln!(f, "===== test: starting the manager =====");
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(f, "{line}");
                let _ = tx.send(line);
            }
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .unwrap_or_else(|_| panic!("manager did not start:\n{}", self.stderr()));
            if let Some(t) = line.trim().strip_prefix("bwk_") {
                self.admin_token = format!("bwk_{t}");
            }
            if let Some(rest) = line.strip_prefix("Bulwark manager on http://") {
                self.addr = rest.trim_end_matches('/').to_string();
                std::thread::spawn(move || while rx.recv().is_ok() {});
                return;
            }
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Waits for the manager to exit by itself (an injected fault); true if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if c.try_wait().unwrap().is_some() {
                    self.child = None;
                    return true;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    pub async fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(30);
            while c.try_wait().unwrap().is_none() {
                assert!(Instant::now() < deadline, "manager did not stop");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// A REST call with the admin token; returns status and JSON body (Null if none).
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let url = format!("http://{}{path}", self.addr);
        let mut rb = self
            .http
            .request(method.parse().unwrap(), &url)
            .bearer_auth(&self.admin_token);
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        let code = r.status();
        let text = r.text().await.unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (code, v)
    }

    /// A REST call that must succeed (2xx).
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (code, v) = self.call(method, path, body).await;
        assert!(code.is_success(), "{method} {path} → {code}: {v}");
        v
    }

    pub async fn enrolment_token(&self) -> String {
        let v = self
            .ok(
                "POST",
                "/api/v1/enrolment-tokens",
                Some(json!({"description": "orchestration test", "expires_in_secs": 3600})),
            )
            .await;
        v["token"]
            .as_str()
            .or_else(|| v["secret"].as_str())
            .unwrap_or_else(|| panic!("enrolment token in {v}"))
            .to_string()
    }

    pub async fn items(&self, path: &str) -> Vec<Value> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let v = self
            .ok("GET", &format!("{path}{sep}limit=1000"), None)
            .await;
        v["items"].as_array().cloned().unwrap_or_default()
    }

    pub async fn host(&self, name: &str) -> Option<Value> {
        self.items("/api/v1/hosts")
            .await
            .into_iter()
            .find(|h| h["name"] == name)
    }

    pub async fn vm(&self, name: &str) -> Option<Value> {
        self.items("/api/v1/vms")
            .await
            .into_iter()
            .find(|v| v["name"] == name)
    }

    pub async fn site_id(&self, name: &str) -> String {
        self.items("/api/v1/sites")
            .await
            .into_iter()
            .find(|s| s["name"] == name)
            .and_then(|s| s["id"].as_str().map(String::from))
            .unwrap_or_else(|| panic!("site {name}"))
    }

    pub async fn vpg(&self, id: &str) -> Value {
        self.ok("GET", &format!("/api/v1/vpgs/{id}"), None).await
    }

    pub async fn checkpoints(&self, vpg: &str, recoverable_only: bool) -> Vec<Value> {
        let q = if recoverable_only {
            "?recoverable=true"
        } else {
            ""
        };
        self.items(&format!("/api/v1/vpgs/{vpg}/checkpoints{q}"))
            .await
    }

    /// Polls until `pred` holds on the VPG; panics with the VPG, the manager's log tail
    /// and `agents`' logs after `within`.
    pub async fn wait_vpg(
        &self,
        id: &str,
        what: &str,
        within: Duration,
        agents: &[&AgentProc],
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let v = self.vpg(id).await;
            if pred(&v) {
                return v;
            }
            if Instant::now() >= deadline {
                let logs = agent_logs(agents, 60);
                panic!(
                    "VPG {id}: gave up waiting for {what} after {within:?}; last:\n{v:#}\n--- manager (tail):\n{}{logs}",
                    tail(&self.stderr(), 80)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn wait_hosts_connected(&self, names: &[&str], agents: &[&AgentProc]) {
        let deadline = Instant::now() + SLA_WAIT;
        loop {
            let hosts = self.items("/api/v1/hosts").await;
            let connected = names.iter().all(|n| {
                hosts
                    .iter()
                    .any(|h| h["name"] == *n && h["connectivity"] == "connected")
            });
            if connected {
                return;
            }
            if Instant::now() >= deadline {
                let logs = agent_logs(agents, 40);
                panic!(
                    "hosts {names:?} not connected: {hosts:#?}\n--- manager:\n{}{logs}",
                    tail(&self.stderr(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Creates a VPG of `vms` (names) replicating to `recovery_host` at `recovery_site`.
    pub async fn create_vpg(
        &self,
        name: &str,
        vms: &[&str],
        recovery_site: &str,
        recovery_host: &str,
        settings: Value,
    ) -> String {
        let site = self.site_id(recovery_site).await;
        let rec = self.host(recovery_host).await.unwrap();
        let mut members = Vec::new();
        for vm in vms {
            let v = self
                .vm(vm)
                .await
                .unwrap_or_else(|| panic!("VM {vm} in the inventory"));
            members.push(json!({"vm_id": v["id"], "recovery_host_id": rec["id"]}));
        }
        let v = self
            .ok(
                "POST",
                "/api/v1/vpgs",
                Some(json!({
                    "name": name,
                    "recovery_site_id": site,
                    "settings": settings,
                    "members": members,
                })),
            )
            .await;
        v["id"].as_str().unwrap().to_string()
    }

    /// A user-tagged checkpoint through the API; returns its id. A round aborted by the
    /// hold bound (a host answered late: possible on a loaded 2-core machine) is retried
    /// a few times, as an operator would; anything else must succeed at once.
    pub async fn tag(&self, vpg: &str, tag: &str) -> i64 {
        for attempt in 1..=5 {
            let (code, v) = self
                .call(
                    "POST",
                    &format!("/api/v1/vpgs/{vpg}/checkpoints"),
                    Some(json!({ "tag": tag })),
                )
                .await;
            // A host whose control channel is being re-established (seen once right
            // after a manager restart under a loaded full suite) is also retried.
            if code == StatusCode::SERVICE_UNAVAILABLE
                && (v["code"] == "checkpoint.round_aborted"
                    || v["code"] == "checkpoint.host_unreachable")
                && attempt < 5
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
                eprintln!("tag {tag}: round aborted ({}), retrying", v["detail"]);
                continue;
            }
            assert_eq!(code, StatusCode::CREATED, "tag {tag}: {v}");
            return v["id"].as_i64().unwrap();
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Waits until checkpoint `id` of the VPG is recoverable.
    pub async fn wait_recoverable(&self, vpg: &str, id: i64, agents: &[&AgentProc]) {
        let deadline = Instant::now() + SLA_WAIT;
        loop {
            let cps = self.checkpoints(vpg, true).await;
            if cps.iter().any(|c| c["id"].as_i64() == Some(id)) {
                return;
            }
            if Instant::now() >= deadline {
                let logs = agent_logs(agents, 40);
                panic!(
                    "checkpoint {id} of VPG {vpg} never became recoverable; VPG: {:#}\n--- manager:\n{}{logs}",
                    self.vpg(vpg).await,
                    tail(&self.stderr(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn events(&self, query: &str) -> Vec<Value> {
        self.items(&format!("/api/v1/events{query}")).await
    }
}

impl Drop for ManagerProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- manager stderr (tail):\n{}", tail(&self.stderr(), 200));
            }
        }
    }
}

/// The last `lines` lines of each agent's stderr, for a failure message.
pub fn agent_logs(agents: &[&AgentProc], lines: usize) -> String {
    agents
        .iter()
        .map(|a| {
            format!(
                "\n--- {} stderr (tail):\n{}",
                a.name,
                tail(&a.stderr(), lines)
            )
        })
        .collect()
}

pub fn tail(s: &str, lines: usize) -> String {
    let v: Vec<&str> = s.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

// ---------------------------------------------------------------------------------------
// Managed agents
// ---------------------------------------------------------------------------------------

/// A VM of the simulated hypervisor with one disk.
#[derive(Debug, Clone)]
pub struct VmDef {
    pub name: String,
    pub disk_id: u64,
    pub size: u64,
}

impl VmDef {
    pub fn new(name: &str, disk_id: u64, size: u64) -> VmDef {
        VmDef {
            name: name.into(),
            disk_id,
            size,
        }
    }
}

/// Config of an agent driven by the manager: VMs of the simulated hypervisor (one disk
/// each, the disk named like the VM), a data listener on recovery hosts, and `extra`
/// lines for the `[agent]` section.
#[allow(clippy::too_many_arguments)]
pub fn managed_toml(
    lab: &Lab,
    data_dir: &Path,
    host: &str,
    site: &str,
    manager_ws: &str,
    token: &str,
    recovery: bool,
    vms: &[VmDef],
    extra: &str,
) -> String {
    let mut s = format!(
        "[agent]\ndata_dir = {:?}\nsite = {site:?}\nhost_name = {host:?}\nnbd_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\ntls_dir = {:?}\nmanager_url = {manager_ws:?}\nenrolment_token = {token:?}\n",
        data_dir.display().to_string(),
        lab.path("certs").display().to_string(),
    );
    if recovery {
        s.push_str("data_listen = \"127.0.0.1:0\"\n");
    }
    s.push_str(extra);
    s.push('\n');
    for vm in vms {
        s.push_str(&format!(
            "[[agent.disks]]\nname = {:?}\nid = {}\nsize = {}\n",
            vm.name, vm.disk_id, vm.size
        ));
    }
    s
}

/// Starts a managed agent (config written under the lab).
#[allow(clippy::too_many_arguments)]
pub async fn start_managed(
    lab: &Lab,
    m: &ManagerProc,
    token: &str,
    host: &str,
    site: &str,
    recovery: bool,
    vms: &[VmDef],
    extra: &str,
) -> AgentProc {
    start_configured(lab, host, |data| {
        managed_toml(
            lab,
            data,
            host,
            site,
            &m.ws_url(),
            token,
            recovery,
            vms,
            extra,
        )
    })
    .await
}

/// Starts an agent from the config file `config(data_dir)` makes, its data directory
/// `lab.path(host)`.
pub async fn start_configured(
    lab: &Lab,
    host: &str,
    config: impl FnOnce(&Path) -> String,
) -> AgentProc {
    let data = lab.path(host);
    std::fs::create_dir_all(&data).unwrap();
    let cfg = crate::agent_common::write_config(lab.dir.path(), host, &config(&data));
    AgentProc::start(host, &cfg, &data, &[]).await
}

/// Where a recovery agent keeps what `protected_host` sends it (the default storage).
pub fn storage_of(recovery: &AgentProc, protected_host: &str) -> PathBuf {
    recovery.data_dir.join("replicas").join(protected_host)
}

/// Reads `len` bytes at `offset` of the point-in-time view at checkpoint `id` of a
/// journal (offline: the recovery agent must be stopped).
pub fn view_bytes(
    j: &bulwark::agent::journal::Journal,
    id: u64,
    offset: u64,
    len: usize,
) -> Vec<u8> {
    let v = j
        .open_view(id)
        .unwrap_or_else(|e| panic!("open view at checkpoint {id}: {e}"));
    let mut buf = vec![0u8; len];
    v.read_at(&mut buf, offset).unwrap();
    buf
}

/// The journal of (protected host, disk) at a stopped recovery agent.
pub fn journal_of(
    recovery: &AgentProc,
    protected_host: &str,
    disk_id: u64,
    size: u64,
) -> bulwark::agent::journal::Journal {
    open_journal(&storage_of(recovery, protected_host), disk_id, size)
}
