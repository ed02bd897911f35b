//! `bulwark bench checkpoints`: the whole system in one process on loopback — a manager
//! on SQLite, a recovery agent and N protected agents (each with one VM), driven over
//! their real control channels — to measure what DESIGN §4 asks of checkpoint rounds:
//! how long guests' write completions are held (p50/p99, VPGs spanning 2 and 10 hosts),
//! and the RPO that 1 s checkpoints give under a sustained write load at half of the
//! measured capacity (actual, and as the status reports it).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::control::{ControlClient, ControlError, ControlSettings as AgentControl};
use crate::agent::host::{Agent, AgentConfig, AgentConfigError, AgentError, AgentFlags};
use crate::agent::hypervisor::{self, HostVms, HypervisorError};
use crate::agent::nbd::client::NbdClient;
use crate::agent::nbd::NbdError;
use crate::manager::config::ManagerConfig;
use crate::manager::control::{ControlPlane, ControlSettings};
use crate::manager::server::{Application, ServerError};

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    AgentConfig(#[from] AgentConfigError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("REST: {0}")]
    Http(#[from] reqwest::Error),
    #[error(transparent)]
    Nbd(#[from] NbdError),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    pub dir: PathBuf,
    /// Protected hosts per VPG, one system each (e.g. 2 and 10).
    pub hosts: Vec<usize>,
    /// Tagged rounds per system for the hold time.
    pub rounds: usize,
    /// Seconds of sustained load for the RPO measurement (on the first system only).
    pub load_secs: u64,
    pub disk_size: u64,
}

impl BenchOpts {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            hosts: vec![2, 10],
            rounds: 500,
            load_secs: 20,
            disk_size: 256 << 20,
        }
    }
}

struct RunningAgent {
    agent: Arc<Agent>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// One manager + agents, with a VPG over every protected host, Meeting SLA.
struct System {
    control: Arc<ControlPlane>,
    base: String,
    http: reqwest::Client,
    token: String,
    vpg: String,
    protected: Vec<RunningAgent>,
    recovery: RunningAgent,
    stop_manager: CancellationToken,
    manager: JoinHandle<Result<(), ServerError>>,
}

fn setup(what: impl Into<String>) -> BenchError {
    BenchError::Setup(what.into())
}

impl System {
    async fn get(&self, path: &str) -> Result<Value, BenchError> {
        Ok(self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, BenchError> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(&body)
            .send()
            .await?;
        let code = r.status();
        let text = r.text().await?;
        if !code.is_success() {
            return Err(setup(format!("POST {path} → {code}: {text}")));
        }
        serde_json::from_str(&text).map_err(|e| setup(format!("POST {path}: {e}")))
    }

    async fn items(&self, path: &str) -> Result<Vec<Value>, BenchError> {
        let v = self.get(path).await?;
        Ok(v["items"].as_array().cloned().unwrap_or_default())
    }

    async fn wait(
        &self,
        what: &str,
        within: Duration,
        mut check: impl FnMut(&Value) -> bool,
        path: &str,
    ) -> Result<Value, BenchError> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.get(path).await?;
            if check(&v) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                return Err(setup(format!("gave up waiting for {what}: {v}")));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn stop(self) {
        for a in self.protected.into_iter().chain([self.recovery]) {
            a.stop.cancel();
            let _ = a.task.await;
            let _ = a.agent.shutdown().await;
        }
        self.stop_manager.cancel();
        let _ = self.manager.await;
    }
}

async fn start_agent(
    dir: &Path,
    host: &str,
    site: &str,
    section: &str,
    manager: &str,
    token: &str,
) -> Result<RunningAgent, BenchError> {
    let file: crate::agent::host::AgentSection =
        toml::from_str(section).map_err(|e| setup(format!("agent section: {e}")))?;
    let data_dir = dir.join(host);
    let cfg = AgentConfig::resolve(
        &file,
        AgentFlags {
            data_dir: Some(data_dir.clone()),
            site: Some(site.into()),
            host_name: Some(host.into()),
            nbd_listen: Some("127.0.0.1:0".into()),
            insecure: true,
            ..AgentFlags::default()
        },
    )?;
    let (agent, hv) = hypervisor::start_agent(cfg).await?;
    let vms = Arc::new(HostVms::new(hv, Arc::clone(&agent)));
    let settings = AgentControl::new(manager, Some(token.to_string()), &data_dir)?;
    let client = ControlClient::new(settings, Arc::clone(&agent), vms)?;
    let stop = CancellationToken::new();
    let task = tokio::spawn(client.run(stop.clone()));
    Ok(RunningAgent { agent, stop, task })
}

async fn start_system(dir: &Path, hosts: usize, disk_size: u64) -> Result<System, BenchError> {
    std::fs::create_dir_all(dir).map_err(|source| BenchError::Io {
        what: format!("create {}", dir.display()),
        source,
    })?;
    let config = ManagerConfig {
        listen: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        database_url: format!("sqlite://{}?mode=rwc", dir.join("bulwark.db").display()),
        web_dir: None,
        bootstrap_token: true,
        // Production timings: the RPO figures include the heartbeat that carries the
        // journals' reports.
        control: ControlSettings::default(),
    };
    let app = Application::build(&config).await?;
    let base = format!("http://{}", app.local_addr());
    let ws = format!("ws://{}", app.local_addr());
    let control = Arc::clone(app.control());
    let token = app
        .bootstrap_secret
        .clone()
        .ok_or_else(|| setup("the fresh database made no admin token"))?;
    let stop_manager = CancellationToken::new();
    let s = stop_manager.clone();
    let manager = tokio::spawn(app.run_until(async move { s.cancelled().await }));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let enrol: Value = http
        .post(format!("{base}/api/v1/enrolment-tokens"))
        .bearer_auth(&token)
        .json(&json!({"description": "bench"}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let etoken = enrol["secret"]
        .as_str()
        .ok_or_else(|| setup(format!("no secret in {enrol}")))?
        .to_string();
    let recovery = start_agent(
        dir,
        "rec",
        "dr",
        "data_listen = \"127.0.0.1:0\"\n",
        &ws,
        &etoken,
    )
    .await?;
    let mut protected = Vec::new();
    for i in 0..hosts {
        let section = format!("[[disks]]\nname = \"vm-{i:02}\"\nid = 1\nsize = {disk_size}\n");
        protected
            .push(start_agent(dir, &format!("prot-{i:02}"), "prod", &section, &ws, &etoken).await?);
    }
    let mut sys = System {
        control,
        base,
        http,
        token,
        vpg: String::new(),
        protected,
        recovery,
        stop_manager,
        manager,
    };
    // Every VM in the inventory, then one VPG over all of them.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (vms, rec_host, dr) = loop {
        let vms = sys.items("/api/v1/vms?limit=1000").await?;
        let hosts_now = sys.items("/api/v1/hosts?limit=1000").await?;
        let sites = sys.items("/api/v1/sites?limit=1000").await?;
        let rec = hosts_now.iter().find(|h| h["name"] == "rec").cloned();
        let dr = sites.iter().find(|s| s["name"] == "dr").cloned();
        if let (true, Some(rec), Some(dr)) = (vms.len() == hosts, rec, dr) {
            break (vms, rec, dr);
        }
        if Instant::now() > deadline {
            return Err(setup(format!(
                "{} of {hosts} VMs reported in time",
                vms.len()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let members: Vec<Value> = vms
        .iter()
        .map(|v| json!({"vm_id": v["id"], "recovery_host_id": rec_host["id"]}))
        .collect();
    let vpg = sys
        .post(
            "/api/v1/vpgs",
            json!({
                "name": format!("bench-{hosts}"),
                "recovery_site_id": dr["id"],
                "settings": {"checkpoint_interval_ms": 1000, "rpo_target_secs": 10},
                "members": members,
            }),
        )
        .await?;
    sys.vpg = vpg["id"]
        .as_str()
        .ok_or_else(|| setup("VPG without id"))?
        .to_string();
    let path = format!("/api/v1/vpgs/{}", sys.vpg);
    sys.wait(
        "Meeting SLA",
        Duration::from_secs(120),
        |v| v["status"] == "meeting_sla",
        &path,
    )
    .await?;
    Ok(sys)
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Guest writes through NBD: 64 KiB writes at random offsets, one client per VM, as fast
/// as acknowledged or paced to `rate` bytes/s in total. Returns bytes written.
async fn load(
    sys: &System,
    disk_size: u64,
    secs: f64,
    rate: Option<f64>,
) -> Result<u64, BenchError> {
    let mut tasks = Vec::new();
    let per = rate.map(|r| r / sys.protected.len() as f64);
    for (i, a) in sys.protected.iter().enumerate() {
        let addr = a.agent.endpoints().nbd;
        let export = format!("vm-{i:02}");
        tasks.push(tokio::spawn(async move {
            let mut c = NbdClient::connect(addr.as_str(), &export).await?;
            let buf = vec![0x5au8; 64 << 10];
            let start = Instant::now();
            let mut written = 0u64;
            let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ i as u64;
            let blocks = (disk_size / (64 << 10)).max(1);
            while start.elapsed().as_secs_f64() < secs {
                if let Some(per) = per {
                    let due = written as f64 / per;
                    let now = start.elapsed().as_secs_f64();
                    if due > now {
                        tokio::time::sleep(Duration::from_secs_f64((due - now).min(0.05))).await;
                        continue;
                    }
                }
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                c.write((x % blocks) * (64 << 10), &buf, false).await?;
                written += buf.len() as u64;
            }
            c.disconnect().await?;
            Ok::<u64, NbdError>(written)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| setup(format!("load task: {e}")))??;
    }
    Ok(total)
}

/// Waits until no protected disk has records queued.
async fn drained(sys: &System, within: Duration) -> Result<Duration, BenchError> {
    let start = Instant::now();
    loop {
        let busy = sys.protected.iter().any(|a| {
            a.agent
                .status()
                .protected
                .iter()
                .any(|d| d.queued_records > 0)
        });
        if !busy {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            return Err(setup("streams did not drain"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the benchmark and returns the report (Markdown-ish text).
pub async fn run(opts: &BenchOpts) -> Result<String, BenchError> {
    let mut out = String::new();
    out.push_str(
        "checkpoint rounds across hosts (loopback, manager on SQLite, insecure streams)\n",
    );
    for (k, &hosts) in opts.hosts.iter().enumerate() {
        let dir = opts.dir.join(format!("bench-checkpoints-{hosts}"));
        let _ = std::fs::remove_dir_all(&dir);
        let setup_start = Instant::now();
        let sys = start_system(&dir, hosts, opts.disk_size).await?;
        let to_sla = setup_start.elapsed();
        let before = sys.control.rounds.hold_stats();
        let t0 = Instant::now();
        let mut lat = Vec::with_capacity(opts.rounds);
        let mut refused = 0;
        for i in 0..opts.rounds {
            let s = Instant::now();
            let r = sys
                .http
                .post(format!("{}/api/v1/vpgs/{}/checkpoints", sys.base, sys.vpg))
                .bearer_auth(&sys.token)
                .json(&json!({"tag": format!("b{i}")}))
                .send()
                .await?;
            // An aborted round (a host past the hold bound) is a result, not an error:
            // it shows in the aborted count.
            if r.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
                refused += 1;
            } else if !r.status().is_success() {
                let code = r.status();
                return Err(setup(format!(
                    "tagged checkpoint → {code}: {}",
                    r.text().await?
                )));
            }
            lat.push(s.elapsed().as_secs_f64() * 1000.0);
        }

        let took = t0.elapsed();
        let st = sys.control.rounds.hold_stats();
        out.push_str(&format!(
            "\n{hosts} protected hosts (VPG of {hosts} VMs): Meeting SLA {:.1} s after start\n  \
             rounds: {} completed, {} aborted in this run ({} tagged in {:.2} s)\n  \
             hold (longest across hosts): p50 {} µs, p99 {} µs   [target p99 < 5000 µs: {}]\n  \
             round latency (manager, Hold → last Released): p50 {:.2} ms, p99 {:.2} ms\n  \
             tagged checkpoint via REST: p50 {:.2} ms, p99 {:.2} ms\n",
            to_sla.as_secs_f64(),
            st.completed.saturating_sub(before.completed),
            st.aborted.saturating_sub(before.aborted),
            opts.rounds,
            took.as_secs_f64(),
            st.hold_p50_us,
            st.hold_p99_us,
            if st.hold_p99_us < 5000 {
                "met"
            } else {
                "NOT met"
            },
            st.latency_p50_us as f64 / 1000.0,
            st.latency_p99_us as f64 / 1000.0,
            pct(&mut lat.clone(), 50.0),
            pct(&mut lat, 99.0),
        ));
        if refused > 0 {
            out.push_str(&format!(
                "  ({refused} tagged rounds answered 503: aborted)\n"
            ));
        }

        if k == 0 && opts.load_secs > 0 {
            // Capacity: a burst as fast as the guests' writes are acknowledged, plus the
            // time the streams need to drain it into the journals.
            let burst = 3.0;
            let bytes = load(&sys, opts.disk_size, burst, None).await?;
            let drain = drained(&sys, Duration::from_secs(120)).await?;
            let capacity = bytes as f64 / (burst + drain.as_secs_f64());
            let half = capacity / 2.0;
            let path = format!("/api/v1/vpgs/{}", sys.vpg);
            let cps = format!(
                "/api/v1/vpgs/{}/checkpoints?recoverable=true&limit=1",
                sys.vpg
            );
            let stop = CancellationToken::new();
            let sampler = {
                let stop = stop.clone();
                let http = sys.http.clone();
                let base = sys.base.clone();
                let token = sys.token.clone();
                tokio::spawn(async move {
                    let mut actual = Vec::new();
                    let mut reported = Vec::new();
                    while !stop.is_cancelled() {
                        let get = |p: String| {
                            let http = http.clone();
                            let token = token.clone();
                            let base = base.clone();
                            async move {
                                let r = http
                                    .get(format!("{base}{p}"))
                                    .bearer_auth(token)
                                    .send()
                                    .await?;
                                r.json::<Value>().await
                            }
                        };
                        if let (Ok(c), Ok(v)) = (get(cps.clone()).await, get(path.clone()).await) {
                            let newest = c["items"][0]["taken_at"]
                                .as_str()
                                .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok());
                            if let Some(t) = newest {
                                let age =
                                    (chrono::Utc::now() - t).num_milliseconds() as f64 / 1000.0;
                                actual.push(age);
                            }
                            if let Some(r) = v["rpo_actual_secs"].as_f64() {
                                reported.push(r);
                            }
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    (actual, reported)
                })
            };
            let written = load(&sys, opts.disk_size, opts.load_secs as f64, Some(half)).await?;
            stop.cancel();
            let (mut actual, mut reported) =
                sampler.await.map_err(|e| setup(format!("sampler: {e}")))?;
            let p99 = pct(&mut actual, 99.0);
            out.push_str(&format!(
                "  RPO under load: capacity {:.0} MB/s (3 s burst + {:.2} s drain), load {:.0} MB/s for {} s ({:.0} MB/s achieved)\n  \
                 actual RPO (now − newest recoverable checkpoint, {} samples): p50 {:.2} s, p99 {:.2} s, max {:.2} s   [target p99 ≤ 2 s: {}]\n  \
                 RPO the status reports: p50 {:.2} s, p99 {:.2} s, max {:.2} s\n",
                capacity / 1e6,
                drain.as_secs_f64(),
                half / 1e6,
                opts.load_secs,
                written as f64 / opts.load_secs as f64 / 1e6,
                actual.len(),
                pct(&mut actual, 50.0),
                p99,
                actual.last().copied().unwrap_or(0.0),
                if p99 <= 2.0 { "met" } else { "NOT met" },
                pct(&mut reported, 50.0),
                pct(&mut reported, 99.0),
                reported.last().copied().unwrap_or(0.0),
            ));
        }
        sys.stop().await;
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(out)
}
