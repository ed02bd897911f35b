//! `bulwark bench scale`: the manager at scale with simulated agents. This module owns
//! the run: a manager started as a child process of this executable (SQLite in the work
//! directory, or a throwaway PostgreSQL database), simulated agents as tasks of this
//! process ([`sim_agent`]), sites/hosts/VMs/VPGs set up through the REST API as an
//! operator would, the wait for Meeting SLA, and the measurements: the manager's CPU and
//! RSS (from `/proc/<pid>`), `GET /api/v1/vpgs` latency, checkpoint rounds (from
//! `/metrics`) and the live stream's fan-out latency to many clients.
//!
//! Layout: hosts alternate between `site-a` and `site-b`; host `2k` and `2k+1` are
//! partners, each the recovery host of the other's VPGs. Each host has `vms / hosts`
//! VMs with one disk; VPG `k` protects VMs of host `k % hosts` (that host's VMs are
//! dealt round-robin over its VPGs).

pub mod sim_agent;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::lab::{setup, Api, LabError};
use crate::proto::control::{Inventory, InventoryDisk, InventoryVm, PowerState};
use sim_agent::{Shared, SimSpec};

pub use crate::lab::LabError as BenchError;

/// Longest the manager may take to print its address and token.
const MANAGER_START: Duration = Duration::from_secs(120);
/// Longest the agents may take to enrol and report their inventory.
const INVENTORY_WITHIN: Duration = Duration::from_secs(300);
/// Concurrent `POST /api/v1/vpgs`.
const CREATE_CONCURRENCY: usize = 4;
/// REST latency sampling: sequential, at most this many requests a second.
const REST_RATE: f64 = 5.0;
/// REST samples at least this slow are logged with their time in the window.
const SLOW_MS: f64 = 100.0;
/// A status change is made this often during the fan-out measurement.
const TOGGLE_EVERY: Duration = Duration::from_secs(3);
/// Linux clock ticks per second (`getconf CLK_TCK`: 100 on every mainstream kernel).
const CLK_TCK: f64 = 100.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Database {
    Sqlite,
    Postgres,
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ScaleOpts {
    pub hosts: usize,
    pub vms: usize,
    pub vpgs: usize,
    pub checkpoint_interval_secs: u32,
    pub measure_secs: u64,
    pub clients: usize,
    pub database: Database,
    /// Server URL for PostgreSQL; a throwaway database is created on it.
    pub database_url: String,
    pub dir: PathBuf,
    /// Longest wait for every VPG to reach Meeting SLA before measuring anyway.
    pub settle_secs: u64,
}

impl ScaleOpts {
    pub fn new(dir: PathBuf) -> Self {
        Self {
            hosts: 200,
            vms: 10_000,
            vpgs: 1_000,
            checkpoint_interval_secs: 1,
            measure_secs: 60,
            clients: 50,
            database: Database::Sqlite,
            database_url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            dir,
            settle_secs: 300,
        }
    }
}

/// Latency summary, ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub count: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(mut ms: Vec<f64>, errors: usize) -> Self {
        ms.sort_by(f64::total_cmp);
        let pick = |p: f64| -> f64 {
            if ms.is_empty() {
                return 0.0;
            }
            let rank = ((p / 100.0) * ms.len() as f64).ceil() as usize;
            ms[rank.clamp(1, ms.len()) - 1]
        };
        Latency {
            count: ms.len(),
            errors,
            p50_ms: pick(50.0),
            p99_ms: pick(99.0),
            max_ms: ms.last().copied().unwrap_or(0.0),
        }
    }
}

/// The live stream's fan-out.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StreamReport {
    /// Why it was not measured, if it was not.
    pub skipped: Option<String>,
    pub clients_connected: usize,
    /// From the clients' first connection to the last one holding its snapshot (before
    /// the window; they all connect at once).
    pub connect_secs: f64,
    /// Status changes made (pause toggles, or simulated syncs without a pause switch).
    pub changes_made: usize,
    pub change_method: String,
    /// From an event's `at` to a client receiving its frame, over every client and event.
    pub latency: Latency,
}

/// Everything measured, with the parameters.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ScaleReport {
    pub database: String,
    pub hosts: usize,
    pub vms: usize,
    pub vpgs: usize,
    pub checkpoint_interval_secs: u32,
    pub measure_secs: u64,
    pub clients: usize,
    pub manager_start_secs: f64,
    pub inventory_secs: f64,
    pub create_vpgs_secs: f64,
    /// Seconds from the first VPG created until every VPG was Meeting SLA (None: not
    /// within `settle_secs`).
    pub all_meeting_sla_secs: Option<f64>,
    pub meeting_sla_before: usize,
    pub meeting_sla_after: usize,
    /// Manager CPU over the window, % of one core (average, and the busiest second).
    pub cpu_percent: f64,
    pub cpu_percent_max_1s: f64,
    pub rss_mib: f64,
    pub rss_peak_mib: f64,
    pub vpgs_default_page: Latency,
    pub vpgs_limit_1000: Latency,
    pub rounds_completed: u64,
    pub rounds_aborted: u64,
    pub rounds_per_sec: f64,
    /// One `GET /metrics` at the end: time and size.
    pub metrics_scrape_ms: f64,
    pub metrics_bytes: usize,
    /// Setup requests (enrolment tokens, VPG creation) retried after a failure.
    pub setup_retries: u32,
    pub sim_heartbeats: u64,
    pub sim_disconnects: u64,
    /// Hellos refused for a passing reason and retried by the simulated agents.
    pub sim_refusals: u64,
    pub stream: StreamReport,
}

/// Runs the bench.
pub async fn run(opts: &ScaleOpts) -> Result<ScaleReport, BenchError> {
    if opts.hosts < 2 {
        return Err(setup("--hosts must be at least 2 (two sites)"));
    }
    if opts.vms < opts.hosts || opts.vpgs == 0 || opts.vpgs > opts.vms {
        return Err(setup("need hosts ≤ vms, 1 ≤ vpgs ≤ vms"));
    }
    if opts.vms / opts.hosts < opts.vpgs.div_ceil(opts.hosts) {
        return Err(setup(
            "every VPG needs a VM: vms / hosts must be at least vpgs / hosts",
        ));
    }
    crate::lab::create_dir(&opts.dir)?;
    let pg = match opts.database {
        Database::Sqlite => None,
        Database::Postgres => Some(PgScratch::create(&opts.database_url).await?),
    };
    let url = match &pg {
        Some(p) => p.url.clone(),
        None => {
            let db = opts.dir.join("bench-scale.db");
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", db.display()));
            }
            format!("sqlite://{}?mode=rwc", db.display())
        }
    };
    let result = run_on(opts, &url).await;
    if let Some(p) = pg {
        if let Err(e) = p.drop_db().await {
            eprintln!("bench scale: could not drop {}: {e}", p.name);
        }
    }
    result
}

async fn run_on(opts: &ScaleOpts, url: &str) -> Result<ScaleReport, BenchError> {
    let mut report = ScaleReport {
        database: format!("{:?}", opts.database).to_lowercase(),
        hosts: opts.hosts,
        vms: opts.vms,
        vpgs: opts.vpgs,
        checkpoint_interval_secs: opts.checkpoint_interval_secs,
        measure_secs: opts.measure_secs,
        clients: opts.clients,
        ..ScaleReport::default()
    };
    let t0 = Instant::now();
    let mut manager = ChildManager::start(&opts.dir, url).await?;
    report.manager_start_secs = t0.elapsed().as_secs_f64();
    eprintln!(
        "bench scale: manager pid {} on {} ({:.1} s)",
        manager.pid, manager.base, report.manager_start_secs
    );
    let cancel = CancellationToken::new();
    let shared = Arc::new(Shared::default());
    let mut agents = JoinSet::new();
    let outcome = measure(opts, &manager, &shared, &cancel, &mut agents, &mut report).await;
    cancel.cancel();
    let stop_by = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(r)) = tokio::time::timeout_at(stop_by, agents.join_next()).await {
        if let Ok(Err(e)) = r {
            eprintln!("bench scale: {e}");
        }
    }
    agents.abort_all();
    report.sim_heartbeats = shared.heartbeats.load(Ordering::Relaxed);
    report.sim_disconnects = shared.disconnects.load(Ordering::Relaxed);
    report.sim_refusals = shared.refusals.load(Ordering::Relaxed);
    manager.stop().await;
    outcome.map(|()| report)
}

/// Sets up, waits, measures; fills `report`.
async fn measure(
    opts: &ScaleOpts,
    manager: &ChildManager,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
    agents: &mut JoinSet<Result<(), sim_agent::SimError>>,
    report: &mut ScaleReport,
) -> Result<(), BenchError> {
    let api = Api::new(manager.base.clone(), manager.token.clone())?;
    // Hosts, their VMs, the agents.
    let t = Instant::now();
    let per_host = opts.vms / opts.hosts;
    let extra = opts.vms % opts.hosts;
    let mut host_names = Vec::with_capacity(opts.hosts);
    for h in 0..opts.hosts {
        let name = format!("host-{h:03}");
        let site = if h % 2 == 0 { "site-a" } else { "site-b" };
        let mut token = api.enrolment_token(&format!("bench {name}")).await;
        for attempt in 1..SETUP_ATTEMPTS {
            if token.is_ok() {
                break;
            }
            report.setup_retries += 1;
            tokio::time::sleep(Duration::from_millis(500 << attempt.min(3))).await;
            token = api.enrolment_token(&format!("bench {name}")).await;
        }
        let token = token?;
        let n = per_host + usize::from(h < extra);
        let vms = (0..n)
            .map(|i| InventoryVm {
                name: format!("vm-{h:03}-{i:03}"),
                power_state: PowerState::On,
                cpus: 2,
                memory_mib: 2048,
                disks: vec![InventoryDisk {
                    disk_id: i as u64 + 1,
                    name: format!("vm-{h:03}-{i:03}-disk0"),
                    size_bytes: 1 << 30,
                    export: format!("vm-{h:03}-{i:03}-disk0"),
                }],
                prepared_for_failover: false,
                boot: None,
                nics: Vec::new(),
            })
            .collect();
        let spec = SimSpec {
            host: name.clone(),
            site: site.into(),
            inventory: Inventory { vms },
            manager: manager.ws.clone(),
            enrolment_token: token,
        };
        agents.spawn(sim_agent::run(spec, Arc::clone(shared), cancel.clone()));
        host_names.push(name);
    }
    let inv = wait_inventory(&api, opts.vms, opts.hosts).await?;
    report.inventory_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "bench scale: {} hosts connected, {} VMs listed ({:.1} s)",
        opts.hosts, opts.vms, report.inventory_secs
    );

    // VPGs.
    let t = Instant::now();
    let bodies = vpg_bodies(opts, &inv, &host_names)?;
    let wanted = bodies.len();
    let created: Vec<Result<u32, LabError>> = futures::stream::iter(bodies)
        .map(|body| {
            let api = api.clone();
            async move { post_retrying(&api, "/api/v1/vpgs", body).await }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .collect()
        .await;
    for r in created {
        report.setup_retries += r?;
    }
    // By name: a create retried after a 5xx that had in fact committed answers 409.
    let vpg_ids: Vec<String> = all_items(&api, "/api/v1/vpgs")
        .await?
        .iter()
        .filter(|v| v["name"].as_str().is_some_and(|n| n.starts_with("vpg-")))
        .filter_map(|v| v["id"].as_str().map(str::to_string))
        .collect();
    if vpg_ids.len() != wanted {
        return Err(setup(format!(
            "{} of {wanted} VPGs exist after creating them",
            vpg_ids.len()
        )));
    }
    report.create_vpgs_secs = t.elapsed().as_secs_f64();
    eprintln!(
        "bench scale: {} VPGs created ({:.1} s)",
        vpg_ids.len(),
        report.create_vpgs_secs
    );

    // Meeting SLA.
    let settle_by = Instant::now() + Duration::from_secs(opts.settle_secs);
    let mut last_print = Instant::now();
    loop {
        let statuses = vpg_statuses(&api).await?;
        let meeting = statuses.iter().filter(|s| *s == "meeting_sla").count();
        report.meeting_sla_before = meeting;
        if meeting >= vpg_ids.len() {
            report.all_meeting_sla_secs = Some(t.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() >= settle_by {
            eprintln!(
                "bench scale: only {meeting} of {} VPGs Meeting SLA after {} s; measuring anyway",
                vpg_ids.len(),
                opts.settle_secs
            );
            break;
        }
        if last_print.elapsed() >= Duration::from_secs(10) {
            eprintln!(
                "bench scale: {meeting} of {} VPGs Meeting SLA ({:.0} s)",
                vpg_ids.len(),
                t.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    if let Some(s) = report.all_meeting_sla_secs {
        eprintln!("bench scale: every VPG Meeting SLA {s:.1} s after the first was created");
    }

    // The live-stream clients connect and take their snapshots before the window: the
    // window measures the steady state with them connected (their connection storm is
    // reported on its own, `stream.connect_secs`).
    let window = Duration::from_secs(opts.measure_secs);
    let stop_clients = CancellationToken::new();
    let clients = stream::connect(
        manager.ws.clone(),
        api.token.clone(),
        opts.clients,
        stop_clients.clone(),
    )
    .await;
    if let Ok(c) = &clients {
        eprintln!(
            "bench scale: {} of {} stream clients have their snapshot ({:.1} s)",
            c.ready(),
            opts.clients,
            c.connect_secs
        );
    }

    // The window.
    eprintln!("bench scale: measuring for {} s", opts.measure_secs);
    let rounds_before = rounds(&api).await.unwrap_or_default();
    let cpu_before = cpu_ticks(manager.pid)?;
    let started = Instant::now();
    let stream_task = tokio::spawn(stream::measure(
        clients,
        api.clone(),
        Arc::clone(shared),
        vpg_ids.clone(),
        window,
        stop_clients,
    ));
    let rest_task = tokio::spawn(rest_latency(api.clone(), window));
    let mut cpu_max = 0.0f64;
    let mut prev = (Instant::now(), cpu_before);
    while started.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = (Instant::now(), cpu_ticks(manager.pid)?);
        let pct = (now.1.saturating_sub(prev.1)) as f64
            / CLK_TCK
            / now.0.duration_since(prev.0).as_secs_f64()
            * 100.0;
        cpu_max = cpu_max.max(pct);
        prev = now;
    }
    let cpu_after = cpu_ticks(manager.pid)?;
    let elapsed = started.elapsed().as_secs_f64();
    let rounds_after = rounds(&api).await.unwrap_or_default();
    report.cpu_percent = cpu_after.saturating_sub(cpu_before) as f64 / CLK_TCK / elapsed * 100.0;
    report.cpu_percent_max_1s = cpu_max;
    let (rss, hwm) = memory_kib(manager.pid)?;
    report.rss_mib = rss as f64 / 1024.0;
    report.rss_peak_mib = hwm as f64 / 1024.0;
    report.rounds_completed = rounds_after.0.saturating_sub(rounds_before.0);
    report.rounds_aborted = rounds_after.1.saturating_sub(rounds_before.1);
    report.rounds_per_sec = report.rounds_completed as f64 / elapsed;
    let (default_page, limit_1000) = rest_task
        .await
        .map_err(|e| setup(format!("REST sampler: {e}")))?;
    report.vpgs_default_page = default_page;
    report.vpgs_limit_1000 = limit_1000;
    report.stream = stream_task
        .await
        .map_err(|e| setup(format!("stream clients: {e}")))?;
    let t = Instant::now();
    let body = metrics_text(&api).await?;
    report.metrics_scrape_ms = t.elapsed().as_secs_f64() * 1000.0;
    report.metrics_bytes = body.len();
    let statuses = vpg_statuses(&api).await?;
    report.meeting_sla_after = statuses.iter().filter(|s| *s == "meeting_sla").count();
    Ok(())
}

/// Attempts of a setup request answered 5xx (SQLite answers "database is locked" under
/// load) before the run gives up.
const SETUP_ATTEMPTS: u32 = 8;

/// `POST` that retries a 5xx answer (bounded) and takes 409 (already there, from an
/// attempt that did commit) as done. Returns the retries made.
async fn post_retrying(api: &Api, path: &str, body: Value) -> Result<u32, BenchError> {
    let mut last = String::new();
    for attempt in 0..SETUP_ATTEMPTS {
        let r = api
            .http
            .post(format!("{}{path}", api.base))
            .bearer_auth(&api.token)
            .json(&body)
            .send()
            .await;
        match r {
            Ok(r) if r.status().is_success() || r.status() == reqwest::StatusCode::CONFLICT => {
                return Ok(attempt)
            }
            Ok(r) if r.status().is_server_error() => {
                last = format!("{}: {}", r.status(), r.text().await.unwrap_or_default());
            }
            Ok(r) => {
                let code = r.status();
                return Err(setup(format!(
                    "POST {path} → {code}: {}",
                    r.text().await.unwrap_or_default()
                )));
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(500 << attempt.min(3))).await;
    }
    Err(setup(format!(
        "POST {path}: {SETUP_ATTEMPTS} attempts failed, last: {last}"
    )))
}

/// `GET` that retries a failure (bounded).
async fn get_retrying(api: &Api, path: &str) -> Result<Value, BenchError> {
    let mut last = None;
    for attempt in 0..SETUP_ATTEMPTS {
        match api.get(path).await {
            Ok(v) => return Ok(v),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500 << attempt.min(3))).await;
    }
    Err(last.unwrap_or_else(|| setup(format!("GET {path} failed"))))
}

/// Every item of a paginated list (pages of 1000, bounded).
async fn all_items(api: &Api, path: &str) -> Result<Vec<Value>, BenchError> {
    let mut out = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}limit=1000&cursor={c}"),
            None => format!("{path}{sep}limit=1000"),
        };
        let page = get_retrying(api, &url).await?;
        if let Some(items) = page["items"].as_array() {
            out.extend(items.iter().cloned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return Ok(out),
        }
    }
    Err(setup(format!("{path}: more than 1000 pages")))
}

async fn vpg_statuses(api: &Api) -> Result<Vec<String>, BenchError> {
    Ok(all_items(api, "/api/v1/vpgs")
        .await?
        .iter()
        .map(|v| v["status"].as_str().unwrap_or("").to_string())
        .collect())
}

/// Names → ids of what the manager lists.
struct Listed {
    vms: std::collections::HashMap<String, String>,
    hosts: std::collections::HashMap<String, String>,
    sites: std::collections::HashMap<String, String>,
}

fn by_name(items: &[Value]) -> std::collections::HashMap<String, String> {
    items
        .iter()
        .filter_map(|x| {
            Some((
                x["name"].as_str()?.to_string(),
                x["id"].as_str()?.to_string(),
            ))
        })
        .collect()
}

async fn wait_inventory(api: &Api, vms: usize, hosts: usize) -> Result<Listed, BenchError> {
    let deadline = Instant::now() + INVENTORY_WITHIN;
    loop {
        let h = all_items(api, "/api/v1/hosts").await?;
        let connected = h
            .iter()
            .filter(|x| x["connectivity"] == "connected")
            .count();
        if connected >= hosts {
            let v = all_items(api, "/api/v1/vms").await?;
            if v.len() >= vms {
                let s = all_items(api, "/api/v1/sites").await?;
                return Ok(Listed {
                    vms: by_name(&v),
                    hosts: by_name(&h),
                    sites: by_name(&s),
                });
            }
        }
        if Instant::now() > deadline {
            return Err(setup(format!(
                "inventory incomplete after {INVENTORY_WITHIN:?}: {connected} of {hosts} hosts connected"
            )));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The recovery partner of host `h` (in the other site).
fn partner(h: usize, hosts: usize) -> usize {
    if h % 2 == 1 {
        h - 1
    } else if h + 1 < hosts {
        h + 1
    } else {
        h - 1
    }
}

/// `POST /api/v1/vpgs` bodies: VPG k on host k % hosts, that host's VMs dealt over its
/// VPGs, recovering to the partner host.
fn vpg_bodies(opts: &ScaleOpts, inv: &Listed, hosts: &[String]) -> Result<Vec<Value>, BenchError> {
    let per_host = opts.vms / opts.hosts;
    let extra = opts.vms % opts.hosts;
    let mut out = Vec::with_capacity(opts.vpgs);
    for k in 0..opts.vpgs {
        let h = k % opts.hosts;
        // VPGs on host h: k = h, h + hosts, h + 2·hosts, …
        let on_host = (opts.vpgs - h).div_ceil(opts.hosts);
        let slot = k / opts.hosts;
        let n_vms = per_host + usize::from(h < extra);
        let rh = partner(h, opts.hosts);
        let recovery_site = if rh % 2 == 0 { "site-a" } else { "site-b" };
        let site_id = inv
            .sites
            .get(recovery_site)
            .ok_or_else(|| setup(format!("no site {recovery_site}")))?;
        let rh_id = inv
            .hosts
            .get(&hosts[rh])
            .ok_or_else(|| setup(format!("no host {}", hosts[rh])))?;
        let members = (0..n_vms)
            .filter(|i| i % on_host == slot)
            .map(|i| {
                let name = format!("vm-{h:03}-{i:03}");
                let id = inv
                    .vms
                    .get(&name)
                    .ok_or_else(|| setup(format!("no VM {name}")))?;
                Ok(json!({"vm_id": id, "recovery_host_id": rh_id}))
            })
            .collect::<Result<Vec<_>, BenchError>>()?;
        out.push(json!({
            "name": format!("vpg-{k:04}"),
            "recovery_site_id": site_id,
            "settings": {
                "checkpoint_interval_ms": opts.checkpoint_interval_secs.saturating_mul(1000),
            },
            "members": members,
        }));
    }
    Ok(out)
}

/// The manager's `/metrics` text.
async fn metrics_text(api: &Api) -> Result<String, BenchError> {
    Ok(api
        .http
        .get(format!("{}/metrics", api.base))
        .bearer_auth(&api.token)
        .send()
        .await?
        .text()
        .await?)
}

/// `(completed, aborted)` from `bulwark_checkpoint_rounds_total`.
async fn rounds(api: &Api) -> Result<(u64, u64), BenchError> {
    let body = metrics_text(api).await?;
    let mut out = (0, 0);
    for line in body.lines() {
        if !line.starts_with("bulwark_checkpoint_rounds_total{") {
            continue;
        }
        let n = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        if line.contains(r#"result="completed""#) {
            out.0 += n;
        } else if line.contains(r#"result="aborted""#) {
            out.1 += n;
        }
    }
    Ok(out)
}

/// Sequential `GET /api/v1/vpgs` (default page) and `?limit=1000`, alternating, at
/// most [`REST_RATE`] a second, for `window`.
async fn rest_latency(api: Api, window: Duration) -> (Latency, Latency) {
    let started = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / REST_RATE);
    let mut samples = [(Vec::new(), 0usize), (Vec::new(), 0usize)];
    let paths = ["/api/v1/vpgs", "/api/v1/vpgs?limit=1000"];
    let mut i = 0usize;
    while started.elapsed() < window {
        let which = i % 2;
        i += 1;
        let t = Instant::now();
        let ok = match api
            .http
            .get(format!("{}{}", api.base, paths[which]))
            .bearer_auth(&api.token)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
            _ => false,
        };
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if ok {
            samples[which].0.push(ms);
        } else {
            samples[which].1 += 1;
        }
        if ms >= SLOW_MS {
            eprintln!(
                "bench scale: slow {} {ms:.0} ms at {:.1} s into the window",
                paths[which],
                t.duration_since(started).as_secs_f64()
            );
        }
        if let Some(left) = gap.checked_sub(t.elapsed()) {
            tokio::time::sleep(left).await;
        }
    }
    let [a, b] = samples;
    (Latency::of(a.0, a.1), Latency::of(b.0, b.1))
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let s = std::fs::read_to_string(&path).map_err(|source| LabError::Io {
        what: format!("read {path}"),
        source,
    })?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| setup(format!("{path}: unexpected format")))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based); `rest` starts at field 3.
    let get = |i: usize| -> Result<u64, BenchError> {
        f.get(i - 3)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| setup(format!("{path}: no field {i}")))
    };
    Ok(get(14)? + get(15)?)
}

/// (VmRSS, VmHWM) of `pid`, KiB.
fn memory_kib(pid: u32) -> Result<(u64, u64), BenchError> {
    let path = format!("/proc/{pid}/status");
    let s = std::fs::read_to_string(&path).map_err(|source| LabError::Io {
        what: format!("read {path}"),
        source,
    })?;
    let field = |name: &str| -> u64 {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// `bulwark manager` as a child of this process, its log in `<dir>/manager.log`.
struct ChildManager {
    child: tokio::process::Child,
    pid: u32,
    base: String,
    ws: String,
    token: String,
}

impl ChildManager {
    async fn start(dir: &Path, url: &str) -> Result<ChildManager, BenchError> {
        let io = |what: String| move |source| LabError::Io { what, source };
        let exe = std::env::current_exe().map_err(io("current executable".into()))?;
        let config = dir.join("bench-scale-manager.toml");
        std::fs::write(&config, "log = \"warn,bulwark=info\"\n[manager]\n")
            .map_err(io(format!("write {}", config.display())))?;
        let log_path = dir.join("manager.log");
        let log = std::fs::File::create(&log_path)
            .map_err(io(format!("create {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io(format!("clone {}", log_path.display())))?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--config")
            .arg(&config)
            .args(["manager", "--listen", "127.0.0.1:0", "--database-url", url])
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
            .spawn()
            .map_err(io("start the manager".into()))?;
        let pid = child
            .id()
            .ok_or_else(|| setup("the manager exited at once"))?;
        let deadline = Instant::now() + MANAGER_START;
        loop {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let addr = text
                .lines()
                .find_map(|l| l.strip_prefix("Bulwark manager on http://"))
                .map(|a| a.trim_end_matches('/').to_string());
            let token = text
                .lines()
                .skip_while(|l| !l.contains("shown only now"))
                .skip(1)
                .map(str::trim)
                .find(|l| !l.is_empty())
                .map(str::to_string);
            if let (Some(addr), Some(token)) = (addr, token) {
                return Ok(ChildManager {
                    child,
                    pid,
                    base: format!("http://{addr}"),
                    ws: format!("ws://{addr}"),
                    token,
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(setup(format!(
                    "the manager exited ({status}); see {}",
                    log_path.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(setup(format!(
                    "the manager printed no address and token within {MANAGER_START:?}; see {}",
                    log_path.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then SIGKILL after 10 s.
    async fn stop(&mut self) {
        let _ = tokio::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Connection options without sqlx's statement log.
fn quiet(url: &str) -> sea_orm::ConnectOptions {
    let mut o = sea_orm::ConnectOptions::new(url.to_string());
    o.sqlx_logging(false).max_connections(1);
    o
}

/// A throwaway PostgreSQL database.
struct PgScratch {
    admin: String,
    name: String,
    url: String,
}

impl PgScratch {
    async fn create(admin: &str) -> Result<PgScratch, BenchError> {
        use sea_orm::ConnectionTrait;
        let name = format!("bulwark_bench_{:08x}", rand::random::<u32>());
        let (base, query) = match admin.split_once('?') {
            Some((b, q)) => (b, format!("?{q}")),
            None => (admin, String::new()),
        };
        let scheme_end = base.find("://").map_or(0, |i| i + 3);
        let url = match base[scheme_end..].find('/') {
            Some(i) => format!("{}/{name}{query}", &base[..scheme_end + i]),
            None => format!("{base}/{name}{query}"),
        };
        let db = sea_orm::Database::connect(quiet(admin))
            .await
            .map_err(|e| setup(format!("PostgreSQL at {admin}: {e}")))?;
        db.execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| setup(format!("CREATE DATABASE {name}: {e}")))?;
        let _ = db.close().await;
        eprintln!("bench scale: PostgreSQL database {name} created");
        Ok(PgScratch {
            admin: admin.to_string(),
            name,
            url,
        })
    }

    async fn drop_db(&self) -> Result<(), BenchError> {
        use sea_orm::ConnectionTrait;
        let db = sea_orm::Database::connect(quiet(&self.admin))
            .await
            .map_err(|e| setup(format!("PostgreSQL: {e}")))?;
        db.execute_unprepared(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        ))
        .await
        .map_err(|e| setup(format!("DROP DATABASE: {e}")))?;
        let _ = db.close().await;
        eprintln!("bench scale: PostgreSQL database {} dropped", self.name);
        Ok(())
    }
}

/// Clients of `GET /api/v1/stream`.
mod stream {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use futures::StreamExt;
    use serde_json::{json, Value};
    use tokio::task::JoinSet;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_util::sync::CancellationToken;

    use super::{Latency, StreamReport, TOGGLE_EVERY};
    use crate::lab::Api;
    use crate::manager::bench_scale::sim_agent::Shared;

    const STREAM_PATH: &str = "/api/v1/stream";
    /// Longest wait for every client's snapshot before the window starts anyway.
    const CONNECT_WITHIN: Duration = Duration::from_secs(30);
    /// Longest a client stays connected, whatever happens.
    const CLIENT_AT_MOST: Duration = Duration::from_secs(3600);

    /// Live-stream clients, connected and (mostly) holding their snapshot.
    pub struct Clients {
        set: JoinSet<Result<Vec<f64>, String>>,
        ready: Arc<AtomicUsize>,
        /// From the first connection to the last snapshot received (or the wait's end).
        pub connect_secs: f64,
    }

    impl Clients {
        pub fn ready(&self) -> usize {
            self.ready.load(Ordering::Relaxed)
        }
    }

    /// Connects `clients` and waits (at most [`CONNECT_WITHIN`]) until each has its
    /// snapshot; they collect status-change latencies until `stop`. `Err`: why the
    /// fan-out cannot be measured.
    pub async fn connect(
        ws: String,
        token: String,
        clients: usize,
        stop: CancellationToken,
    ) -> Result<Clients, String> {
        if clients == 0 {
            return Err("--clients 0".into());
        }
        let url = format!("{ws}{STREAM_PATH}?access_token={token}");
        // Probe: is there a stream at all?
        match tokio::time::timeout(
            Duration::from_secs(10),
            tokio_tungstenite::connect_async(&url),
        )
        .await
        {
            Ok(Ok((mut s, _))) => {
                let _ = s.close(None).await;
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "no live stream at {STREAM_PATH} on this manager ({e}); fan-out not measured"
                ));
            }
            Err(_) => return Err(format!("{STREAM_PATH}: no handshake within 10 s")),
        }
        let t = Instant::now();
        let ready = Arc::new(AtomicUsize::new(0));
        let mut set = JoinSet::new();
        for _ in 0..clients {
            set.spawn(client(url.clone(), Arc::clone(&ready), stop.clone()));
        }
        let by = Instant::now() + CONNECT_WITHIN;
        while ready.load(Ordering::Relaxed) < clients && Instant::now() < by {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Clients {
            set,
            ready,
            connect_secs: t.elapsed().as_secs_f64(),
        })
    }

    /// Makes a status change every [`TOGGLE_EVERY`] for `window`, then stops the
    /// clients and gathers their latencies.
    pub async fn measure(
        clients: Result<Clients, String>,
        api: Api,
        shared: Arc<Shared>,
        vpgs: Vec<String>,
        window: Duration,
        stop: CancellationToken,
    ) -> StreamReport {
        let mut report = StreamReport::default();
        let mut clients = match clients {
            Ok(c) => c,
            Err(why) => {
                report.skipped = Some(why);
                return report;
            }
        };
        report.connect_secs = clients.connect_secs;
        let deadline = tokio::time::Instant::now() + window;
        let (made, method) = toggle(&api, &shared, &vpgs, deadline).await;
        report.changes_made = made;
        report.change_method = method;
        tokio::time::sleep_until(deadline).await;
        // The last change's frames are on their way.
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        let mut all = Vec::new();
        let mut errors = 0;
        while let Some(r) = clients.set.join_next().await {
            match r {
                Ok(Ok(ms)) => {
                    report.clients_connected += 1;
                    all.extend(ms);
                }
                _ => errors += 1,
            }
        }
        report.latency = Latency::of(all, errors);
        report
    }

    /// Status changes until `deadline`: pause/resume through `PATCH` if the manager
    /// takes `paused`, else a simulated sync on the VPG's disks.
    async fn toggle(
        api: &Api,
        shared: &Shared,
        vpgs: &[String],
        deadline: tokio::time::Instant,
    ) -> (usize, String) {
        let mut made = 0;
        let mut patch = true;
        let mut i = 0;
        while tokio::time::Instant::now() + TOGGLE_EVERY < deadline && !vpgs.is_empty() {
            let id = &vpgs[i % vpgs.len()];
            i += 1;
            let mut done = false;
            if patch {
                done = set_paused(api, id, true).await;
                if done {
                    tokio::time::sleep(TOGGLE_EVERY / 2).await;
                    done = set_paused(api, id, false).await;
                } else {
                    patch = false;
                }
            }
            if !patch {
                shared.set_syncing(id, true);
                tokio::time::sleep(TOGGLE_EVERY / 2).await;
                shared.set_syncing(id, false);
                done = true;
            }
            if done {
                made += 2;
            }
            tokio::time::sleep(TOGGLE_EVERY / 2).await;
        }
        let method = if patch {
            "PATCH /api/v1/vpgs/{id} {paused}"
        } else {
            "simulated Bitmap Sync on the VPG's disks (PATCH does not take `paused`)"
        };
        (made, method.into())
    }

    async fn set_paused(api: &Api, id: &str, paused: bool) -> bool {
        api.http
            .patch(format!("{}/api/v1/vpgs/{id}", api.base))
            .bearer_auth(&api.token)
            .json(&json!({ "paused": paused }))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    /// One client until `stop`: latencies (ms) of every `vpg.status_changed` event it
    /// received, from the event's `at` to the frame's arrival.
    async fn client(
        url: String,
        ready: Arc<AtomicUsize>,
        stop: CancellationToken,
    ) -> Result<Vec<f64>, String> {
        let (mut s, _) = tokio_tungstenite::connect_async(&url)
            .await
            .map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        let mut snapshot = false;
        let until = tokio::time::Instant::now() + CLIENT_AT_MOST;
        loop {
            let frame = tokio::select! {
                _ = stop.cancelled() => break,
                r = tokio::time::timeout_at(until, s.next()) => match r {
                    Err(_) => break,
                    Ok(None) | Ok(Some(Ok(Message::Close(_)))) => break,
                    Ok(Some(Err(e))) => return Err(e.to_string()),
                    Ok(Some(Ok(Message::Text(t)))) => t,
                    Ok(Some(Ok(_))) => continue,
                },
            };
            let received = chrono::Utc::now();
            let Ok(v) = serde_json::from_str::<Value>(frame.as_str()) else {
                continue;
            };
            match v["type"].as_str() {
                Some("snapshot") => {
                    if !snapshot {
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                    snapshot = true;
                }
                Some("delta") => {
                    for e in v["events"].as_array().into_iter().flatten() {
                        if e["kind"] != "vpg.status_changed" {
                            continue;
                        }
                        let Some(at) = e["at"]
                            .as_str()
                            .and_then(|a| chrono::DateTime::parse_from_rfc3339(a).ok())
                        else {
                            continue;
                        };
                        let ms = (received - at.with_timezone(&chrono::Utc))
                            .num_microseconds()
                            .unwrap_or(0) as f64
                            / 1000.0;
                        out.push(ms.max(0.0));
                    }
                }
                _ => {}
            }
        }
        let _ = s.close(None).await;
        if !snapshot {
            return Err("no snapshot frame".into());
        }
        Ok(out)
    }
}

/// The report as a table.
pub fn table(r: &ScaleReport) -> String {
    let lat = |l: &Latency| {
        format!(
            "p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms  ({} samples, {} errors)",
            l.p50_ms, l.p99_ms, l.max_ms, l.count, l.errors
        )
    };
    let mut s = String::new();
    let mut row = |k: &str, v: String| {
        s.push_str(&format!("{k:<34} {v}\n"));
    };
    row("database", r.database.clone());
    row(
        "hosts / VMs / VPGs",
        format!("{} / {} / {}", r.hosts, r.vms, r.vpgs),
    );
    row(
        "checkpoint interval",
        format!("{} s", r.checkpoint_interval_secs),
    );
    row("measure window", format!("{} s", r.measure_secs));
    row("manager start", format!("{:.1} s", r.manager_start_secs));
    row(
        "agents enrolled + inventory",
        format!("{:.1} s", r.inventory_secs),
    );
    row("VPGs created", format!("{:.1} s", r.create_vpgs_secs));
    row(
        "all VPGs Meeting SLA",
        match r.all_meeting_sla_secs {
            Some(t) => format!("after {t:.1} s"),
            None => format!(
                "NO: {} of {} before measuring",
                r.meeting_sla_before, r.vpgs
            ),
        },
    );
    row(
        "Meeting SLA at the end",
        format!("{} of {}", r.meeting_sla_after, r.vpgs),
    );
    row(
        "manager CPU (% of one core)",
        format!(
            "{:.0} % average, {:.0} % busiest second",
            r.cpu_percent, r.cpu_percent_max_1s
        ),
    );
    row(
        "manager RSS",
        format!(
            "{:.0} MiB now, {:.0} MiB peak (target < 1024)",
            r.rss_mib, r.rss_peak_mib
        ),
    );
    row("GET /api/v1/vpgs", lat(&r.vpgs_default_page));
    row("GET /api/v1/vpgs?limit=1000", lat(&r.vpgs_limit_1000));
    row(
        "checkpoint rounds",
        format!(
            "{} completed ({:.0}/s, {:.0}/s wanted), {} aborted",
            r.rounds_completed,
            r.rounds_per_sec,
            r.vpgs as f64 / f64::from(r.checkpoint_interval_secs.max(1)),
            r.rounds_aborted
        ),
    );
    row(
        "GET /metrics",
        format!("{:.0} ms, {} bytes", r.metrics_scrape_ms, r.metrics_bytes),
    );
    match &r.stream.skipped {
        Some(why) => row("stream fan-out", format!("skipped: {why}")),
        None => {
            row(
                "stream fan-out",
                format!(
                    "{} ({} clients, {} changes by {})",
                    lat(&r.stream.latency),
                    r.stream.clients_connected,
                    r.stream.changes_made,
                    r.stream.change_method
                ),
            );
            row(
                "stream clients connect + snapshot",
                format!("{:.1} s for all (before the window)", r.stream.connect_secs),
            );
        }
    }
    row("setup requests retried", r.setup_retries.to_string());
    row(
        "simulated agents",
        format!(
            "{} heartbeats, {} disconnects, {} refusals retried",
            r.sim_heartbeats, r.sim_disconnects, r.sim_refusals
        ),
    );
    s
}
