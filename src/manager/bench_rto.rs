//! `bulwark bench rto`: recovery time and commit throughput, through the real manager
//! REST API, in one process on loopback (a manager on SQLite, one recovery agent, one
//! protected agent per VM, a VPG over all of them — the lab of `bulwark bench
//! checkpoints`).
//!
//! 1. **RTO**: guest writes through the VMs' NBD exports fill the journals with a given
//!    amount of history (1 GiB, then 8 GiB in total; nothing is promoted in between: the
//!    VPG keeps 24 h of history under a hard limit far above what is written; the
//!    agents run no background promoter anyway). At each size failover tests, then live
//!    failovers (rolled back), are requested with `POST /api/v1/vpgs/{id}/failover-test`
//!    (`…/failover`), each timed until the operation's task waits for its decision
//!    (`waiting`: the VMs were recovered from their views, their disks served as NBD
//!    exports and powered on); the medians are compared. Every recovered export is then
//!    read through NBD and every recovered VM checked to be on in the inventory (not
//!    timed). The journal bytes the API reports for the VPG at the moment of each
//!    request are printed with its figure.
//! 2. **Commit**: the last live failover at the large size is committed
//!    (`POST …/commit`, no reverse protection) with the recovery host's files dropped
//!    from the page cache first; its `Promote` step (every journal applied up to the
//!    checkpoint into its replica disk) is timed from the task's step times, and
//!    compared with a raw sequential copy of the same number of bytes (read a file not
//!    in the page cache, write another, `fdatasync`) on the same filesystem in the same
//!    run.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::agent::nbd::client::NbdClient;
use crate::lab::{self, setup, Api, LabAgent, Manager};

pub use crate::lab::LabError as BenchError;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// What to run.
#[derive(Debug, Clone)]
pub struct RtoOpts {
    pub dir: PathBuf,
    /// VMs in the VPG (one protected host each).
    pub vms: usize,
    /// Size of each VM's disk (writes wrap around it).
    pub disk_size: u64,
    /// Journal history (guest bytes written) at the first measurement.
    pub small_bytes: u64,
    /// Journal history in total at the second measurement.
    pub large_bytes: u64,
    /// Failover tests, and live failovers, at each size (the medians are compared).
    pub repeats: usize,
    /// Also live failovers at each size, rolled back (but the last one, committed when
    /// `commit`).
    pub live: bool,
    /// A live failover at the large size, committed, with the promote timed.
    pub commit: bool,
    /// Longest wait for one fill, one operation step, or one commit.
    pub step_timeout: Duration,
}

impl RtoOpts {
    /// The full run at `scale` 1.0: 10 VMs with 1 GiB disks, 1 and 8 GiB of journal
    /// history.
    pub fn new(dir: PathBuf, scale: f64) -> Self {
        let s = |b: u64| ((b as f64 * scale.max(0.0)) as u64).max(MIB);
        Self {
            dir,
            vms: 10,
            // Each VM's share of the large history fills its disk about once, so the
            // promote writes (nearly) every byte it reads, as a raw copy does.
            disk_size: (s(GIB) / MIB).max(64) * MIB,
            small_bytes: s(GIB),
            large_bytes: s(8 * GIB),
            repeats: 5,
            live: true,
            commit: true,
            step_timeout: Duration::from_secs(900),
        }
    }
}

/// One recovery operation brought up.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// `failover test` or `live failover`.
    pub kind: &'static str,
    pub task_id: String,
    /// What the API reported for the VPG just before the request.
    pub journal_bytes: u64,
    pub history_secs: Option<u64>,
    /// Request → task `waiting` (all VMs recovered, exported, powered on).
    pub rto: Duration,
    /// The manager's own figure, from the operation's report once it ended.
    pub report_rto_ms: Option<u64>,
    pub checkpoint: Option<u64>,
    /// (step, ms) from the task's step times.
    pub steps: Vec<(String, f64)>,
    pub vms_recovered: usize,
    pub vms_on: usize,
    pub exports_read: usize,
    /// `sync(2)` before the request (untimed for the RTO).
    pub writeback: Duration,
}

/// The commit of the large live failover.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Journal bytes to promote (the API's figure at the failover request).
    pub bytes: u64,
    /// Guest bytes written in the journals (payload).
    pub payload_bytes: u64,
    /// The `Promote` step, from the task's step times.
    pub promote: Duration,
    /// `POST …/commit` → task succeeded.
    pub total: Duration,
    /// Raw sequential copy of `bytes` (read + write + fdatasync), same filesystem, the
    /// source dropped from the page cache first (as the journals were before the commit).
    pub raw_copy: Duration,
    /// The same copy with the source in the page cache.
    pub raw_copy_warm: Duration,
    /// Journal and replica files of the recovery host dropped from the page cache.
    pub dropped_bytes: u64,
}

impl Commit {
    pub fn promote_mb_s(&self) -> f64 {
        mb_s(self.bytes, self.promote)
    }
    pub fn raw_mb_s(&self) -> f64 {
        mb_s(self.bytes, self.raw_copy)
    }
    pub fn raw_warm_mb_s(&self) -> f64 {
        mb_s(self.bytes, self.raw_copy_warm)
    }
    pub fn ratio(&self) -> f64 {
        let raw = self.raw_mb_s();
        if raw > 0.0 {
            self.promote_mb_s() / raw
        } else {
            0.0
        }
    }
}

fn mb_s(bytes: u64, d: Duration) -> f64 {
    let s = d.as_secs_f64();
    if s > 0.0 {
        bytes as f64 / s / 1e6
    } else {
        0.0
    }
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct RtoReport {
    pub vms: usize,
    pub disk_size: u64,
    pub setup: Duration,
    /// (guest bytes written, seconds) of each fill.
    pub fills: Vec<(u64, Duration)>,
    pub small: Vec<Recovery>,
    pub large: Vec<Recovery>,
    pub commit: Option<Commit>,
}

impl RtoReport {
    /// The median RTO of the operations of `kind` in `list`.
    pub fn median(list: &[Recovery], kind: &str) -> Option<Duration> {
        let mut v: Vec<Duration> = list
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| r.rto)
            .collect();
        v.sort();
        v.get(v.len() / 2).copied()
    }

    /// The median time of the recovery host's steps (`recover` + `power_on`): the part
    /// of the RTO that views over the journals could make depend on their size.
    pub fn median_recovery_steps(list: &[Recovery], kind: &str) -> Option<f64> {
        let mut v: Vec<f64> = list
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| {
                r.steps
                    .iter()
                    .filter(|(n, _)| n == "recover" || n == "power_on")
                    .map(|(_, ms)| ms)
                    .sum::<f64>()
            })
            .collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len() / 2).copied()
    }

    /// Large / small median RTO of the same kind.
    pub fn ratio(&self, kind: &str) -> Option<f64> {
        let s = Self::median(&self.small, kind)?.as_secs_f64();
        let l = Self::median(&self.large, kind)?.as_secs_f64();
        (s > 0.0).then(|| l / s)
    }

    /// The report as text.
    pub fn text(&self) -> String {
        let mut o = String::new();
        o.push_str(&format!(
            "RTO and commit through the manager REST API (loopback, manager on SQLite, insecure streams)\n\
             VPG of {} VMs (one protected host each, {} MiB disks), one recovery host; Meeting SLA {:.1} s after start\n",
            self.vms,
            self.disk_size / MIB,
            self.setup.as_secs_f64()
        ));
        for (b, d) in &self.fills {
            o.push_str(&format!(
                "  fill: {:.2} GiB of guest writes (1 MiB, through NBD → stream → journal) in {:.1} s ({:.0} MB/s, durable)\n",
                *b as f64 / GIB as f64,
                d.as_secs_f64(),
                mb_s(*b, *d)
            ));
        }
        o.push_str(
            "\nRTO: request → task waiting with every recovered VM exported and on\n\
             (before each request the page cache is written back with sync(2), untimed: the\n\
             simulated protected hosts' image writes share this disk)\n",
        );
        o.push_str(
            "| journal at request | operation | RTO | manager's rto_ms | VMs on / exports read | steps (ms) | sync before |\n\
             | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for r in self.small.iter().chain(&self.large) {
            let steps: Vec<String> = r
                .steps
                .iter()
                .filter(|(_, ms)| *ms >= 1.0)
                .map(|(n, ms)| format!("{n} {ms:.0}"))
                .collect();
            o.push_str(&format!(
                "| {:.2} GiB (history {} s) | {} | {:.3} s | {} | {}/{} / {} | {} | {:.2} s |\n",
                r.journal_bytes as f64 / GIB as f64,
                r.history_secs.map_or("?".into(), |h| h.to_string()),
                r.kind,
                r.rto.as_secs_f64(),
                r.report_rto_ms.map_or("-".into(), |m| format!("{m} ms")),
                r.vms_on,
                r.vms_recovered,
                r.exports_read,
                steps.join(", "),
                r.writeback.as_secs_f64(),
            ));
        }
        let worst = self
            .small
            .iter()
            .chain(&self.large)
            .map(|r| r.rto)
            .max()
            .unwrap_or_default();
        o.push_str(&format!(
            "  every RTO < 5 s: {} (longest {:.3} s)\n",
            if worst < Duration::from_secs(5) {
                "met"
            } else {
                "NOT met"
            },
            worst.as_secs_f64()
        ));
        for kind in ["failover test", "live failover"] {
            let n = |l: &[Recovery]| l.iter().filter(|r| r.kind == kind).count();
            if let (Some(x), Some(s), Some(l)) = (
                self.ratio(kind),
                Self::median(&self.small, kind),
                Self::median(&self.large, kind),
            ) {
                o.push_str(&format!(
                    "  {kind}: median RTO {:.3} s (small journal, {} run(s)) → {:.3} s (large, {} run(s)): ratio {x:.2}   [target ≤ 1.2: {}]\n",
                    s.as_secs_f64(),
                    n(&self.small),
                    l.as_secs_f64(),
                    n(&self.large),
                    if x <= 1.2 { "met" } else { "NOT met" }
                ));
            }
            if let (Some(s), Some(l)) = (
                Self::median_recovery_steps(&self.small, kind),
                Self::median_recovery_steps(&self.large, kind),
            ) {
                o.push_str(&format!(
                    "    of which the recovery host's steps (recover + power_on), median: {s:.0} ms → {l:.0} ms: ratio {:.2}\n",
                    if s > 0.0 { l / s } else { 0.0 }
                ));
            }
        }
        if let Some(c) = &self.commit {
            o.push_str(&format!(
                "\nCommit of the live failover (through the manager: POST …/commit, task step Promote;\n\
                 the recovery host's journal and replica files, {:.2} GiB, dropped from the page cache first)\n  \
                 {:.2} GiB of journal ({:.2} GiB guest payload) promoted into the replicas in {:.2} s: {:.0} MB/s (whole commit {:.2} s)\n  \
                 raw sequential copy of the same {:.2} GiB (read + write + fdatasync, same filesystem, source not cached): {:.2} s: {:.0} MB/s\n  \
                 (the same copy with the source cached: {:.2} s: {:.0} MB/s)\n  \
                 promote / raw copy: {:.2}  (/ cached-source copy: {:.2})\n",
                c.dropped_bytes as f64 / GIB as f64,
                c.bytes as f64 / GIB as f64,
                c.payload_bytes as f64 / GIB as f64,
                c.promote.as_secs_f64(),
                c.promote_mb_s(),
                c.total.as_secs_f64(),
                c.bytes as f64 / GIB as f64,
                c.raw_copy.as_secs_f64(),
                c.raw_mb_s(),
                c.raw_copy_warm.as_secs_f64(),
                c.raw_warm_mb_s(),
                c.ratio(),
                if c.raw_warm_mb_s() > 0.0 {
                    c.promote_mb_s() / c.raw_warm_mb_s()
                } else {
                    0.0
                }
            ));
        }
        o
    }
}

/// One manager + agents, a VPG over every VM, Meeting SLA.
struct System {
    api: Api,
    vpg: String,
    rec_host_id: String,
    protected: Vec<LabAgent>,
    recovery: LabAgent,
    manager: Manager,
    /// Next write offset per VM.
    pos: Vec<u64>,
    /// Guest bytes written so far.
    written: u64,
}

impl System {
    async fn stop(self) {
        for a in self.protected.into_iter().chain([self.recovery]) {
            if let Err(e) = a.stop().await {
                tracing::warn!(error = %e, "agent stop");
            }
        }
        if let Err(e) = self.manager.stop().await {
            tracing::warn!(error = %e, "manager stop");
        }
    }
}

fn export(i: usize) -> String {
    format!("vm-{i:02}")
}

async fn start_system(dir: &Path, opts: &RtoOpts) -> Result<System, BenchError> {
    let disks: Vec<String> = (0..opts.vms).map(export).collect();
    let lab::OneDiskPerHost {
        manager,
        api,
        recovery,
        protected,
        inventory: inv,
    } = lab::OneDiskPerHost::start(dir, "bench-rto", &disks, opts.disk_size).await?;
    let rec_host_id = inv
        .host("rec")
        .and_then(|h| h["id"].as_str())
        .map(str::to_string)
        .ok_or_else(|| setup("no recovery host in the inventory"))?;
    let names: Vec<String> = (0..opts.vms).map(export).collect();
    let members: Vec<(&str, &str)> = names.iter().map(|v| (v.as_str(), "rec")).collect();
    // History is kept: 24 h of it, under a hard limit far above what the run writes.
    let hard = (opts.large_bytes.saturating_mul(4)).max(150_000_000_000);
    let vpg = api
        .ensure_vpg(
            &inv,
            "bench-rto",
            "dr",
            json!({
                "checkpoint_interval_ms": 1000,
                "rpo_target_secs": 10,
                "journal_history_secs": 24 * 3600,
                "journal_hard_limit_bytes": hard,
                "journal_warning_bytes": hard / 4 * 3,
            }),
            &members,
        )
        .await?;
    api.wait_vpg(&vpg, "meeting_sla", Duration::from_secs(180))
        .await?;
    Ok(System {
        api,
        vpg,
        rec_host_id,
        protected,
        recovery,
        manager,
        pos: vec![0; opts.vms],
        written: 0,
    })
}

/// Incompressible bytes.
fn random_fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

/// Queued + spilled bytes of `export` at its protected agent.
fn backlog(a: &crate::agent::host::Agent, export: &str) -> u64 {
    a.status()
        .protected
        .iter()
        .filter(|d| d.name == export)
        .map(|d| d.queued_bytes + d.spilled_bytes)
        .sum()
}

/// Guest writes of 1 MiB (sequential, wrapping round each disk) through every VM's NBD
/// export, `bytes` in total, paced so no outbound queue overflows; then waits until
/// every stream is drained, a checkpoint newer than the last write is recoverable and
/// the API reports at least the bytes written as journal.
async fn fill(sys: &mut System, bytes: u64, opts: &RtoOpts) -> Result<Duration, BenchError> {
    let start = Instant::now();
    let n = sys.protected.len().max(1) as u64;
    let chunk = MIB.min(opts.disk_size);
    let per = bytes.div_ceil(n).div_ceil(chunk).max(1);
    let mut tasks = Vec::new();
    for (i, a) in sys.protected.iter().enumerate() {
        let addr = a.agent.endpoints().nbd;
        let name = export(i);
        let agent = a.agent.clone();
        let mut pos = sys.pos[i];
        let disk = opts.disk_size;
        let timeout = opts.step_timeout;
        tasks.push(tokio::spawn(async move {
            let mut c = NbdClient::connect(addr.as_str(), &name).await?;
            let mut buf = vec![0u8; chunk as usize];
            random_fill(&mut buf, 0x9e37_79b9_7f4a_7c15 ^ (i as u64 + 1));
            let deadline = Instant::now() + timeout;
            for k in 0..per {
                if k % 16 == 0 {
                    // Pacing: the outbound queue (256 MiB) plus spill log bound what may
                    // wait; past them records are dropped and a Bitmap Sync follows.
                    let mut waited = 0u32;
                    while waited < 60_000 {
                        if backlog(&agent, &name) < 128 * MIB {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        waited += 10;
                    }
                }
                if Instant::now() > deadline {
                    return Err(setup(format!("fill of {name} timed out")));
                }
                let stamp = (k + 1).to_le_bytes();
                buf[..8].copy_from_slice(&stamp);
                if pos + chunk > disk {
                    pos = 0;
                }
                c.write(pos, &buf, false).await?;
                pos += chunk;
            }
            c.disconnect().await?;
            Ok::<(u64, u64), BenchError>((pos, per * chunk))
        }));
    }
    for (i, t) in tasks.into_iter().enumerate() {
        let (pos, w) = t.await.map_err(|e| setup(format!("fill task: {e}")))??;
        sys.pos[i] = pos;
        sys.written += w;
    }
    // Drained into the journals.
    let deadline = Instant::now() + opts.step_timeout;
    loop {
        let busy = sys
            .protected
            .iter()
            .enumerate()
            .any(|(i, a)| backlog(&a.agent, &export(i)) > 0);
        if !busy {
            break;
        }
        if Instant::now() > deadline {
            return Err(setup("streams did not drain"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = start.elapsed();
    let drained_at = chrono::Utc::now();
    let cps = format!(
        "/api/v1/vpgs/{}/checkpoints?recoverable=true&limit=1",
        sys.vpg
    );
    let after = |c: &Value| {
        c["items"][0]["taken_at"]
            .as_str()
            .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
            .is_some_and(|t| t > drained_at)
    };
    sys.api
        .wait(
            "a recoverable checkpoint after the fill",
            Duration::from_secs(120),
            &cps,
            after,
        )
        .await?;
    let written = sys.written;
    sys.api
        .wait(
            "the journal bytes of the fill, Meeting SLA",
            Duration::from_secs(120),
            &format!("/api/v1/vpgs/{}", sys.vpg),
            |v| v["journal_bytes"].as_u64().unwrap_or(0) >= written && v["status"] == "meeting_sla",
        )
        .await?;
    Ok(took)
}

fn ms_between(s: &Value) -> Option<f64> {
    let p = |k: &str| {
        s[k].as_str()
            .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
    };
    let (a, b) = (p("started_at")?, p("finished_at")?);
    Some((b - a).num_microseconds()? as f64 / 1000.0)
}

pub(crate) fn steps_of(task: &Value) -> Vec<(String, f64)> {
    task["steps"]
        .as_array()
        .map(|s| {
            s.iter()
                .filter_map(|s| Some((s["name"].as_str()?.to_string(), ms_between(s)?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls the task until `state` (or fails on `failed`/`cancelled`): every 5 ms while
/// `waiting` is timed, every 100 ms otherwise (the client's load stays off a commit).
pub(crate) async fn wait_task(
    api: &Api,
    id: &str,
    state: &str,
    within: Duration,
) -> Result<Value, BenchError> {
    let deadline = Instant::now() + within;
    loop {
        let t = api.get(&format!("/api/v1/tasks/{id}")).await?;
        if t["state"] == state {
            return Ok(t);
        }
        if t["state"] == "failed" || t["state"] == "cancelled" {
            return Err(setup(format!(
                "operation {id} ended {} waiting for {state}: {}",
                t["state"], t["error"]
            )));
        }
        if Instant::now() > deadline {
            return Err(setup(format!(
                "operation {id} not {state} after {within:?}: {t}"
            )));
        }
        let every = if state == "waiting" { 5 } else { 100 };
        tokio::time::sleep(Duration::from_millis(every)).await;
    }
}

/// Requests a failover test (`live` false) or a live failover at the latest checkpoint
/// and times it until the task waits for its decision; then checks what came up.
async fn recover(sys: &System, live: bool, opts: &RtoOpts) -> Result<Recovery, BenchError> {
    // The simulated protected hosts share this disk: their image writes sit unflushed in
    // the page cache, and any fsync of the recovery host would wait for them (ext4
    // ordered mode). A real recovery host has its own storage: written back first.
    let s0 = Instant::now();
    tokio::task::spawn_blocking(rustix::fs::sync)
        .await
        .map_err(|e| setup(format!("sync: {e}")))?;
    let writeback = s0.elapsed();
    let v = sys.api.get(&format!("/api/v1/vpgs/{}", sys.vpg)).await?;
    let journal_bytes = v["journal_bytes"].as_u64().unwrap_or(0);
    let history_secs = v["history_actual_secs"].as_u64();
    let (path, body) = if live {
        (
            format!("/api/v1/vpgs/{}/failover", sys.vpg),
            json!({"checkpoint": "latest", "notes": "bench rto"}),
        )
    } else {
        (
            format!("/api/v1/vpgs/{}/failover-test", sys.vpg),
            json!({"checkpoint": "latest", "notes": "bench rto"}),
        )
    };
    let t0 = Instant::now();
    let t = sys.api.post(&path, body).await?;
    let id = t["id"]
        .as_str()
        .ok_or_else(|| setup(format!("no task id in {t}")))?
        .to_string();
    let task = wait_task(&sys.api, &id, "waiting", opts.step_timeout).await?;
    let rto = t0.elapsed();

    // What came up: every export answers a read, every VM is on in the inventory.
    let mut names = Vec::new();
    let mut exports = Vec::new();
    for r in task["details"]["recovered"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for vm in r["vms"].as_array().into_iter().flatten() {
            if let Some(n) = vm["name"].as_str() {
                names.push(n.to_string());
            }
            for d in vm["disks"].as_array().into_iter().flatten() {
                if let Some(e) = d["export"].as_str() {
                    exports.push(e.to_string());
                }
            }
        }
    }
    let nbd = sys.recovery.agent.endpoints().nbd;
    let mut exports_read = 0;
    for e in &exports {
        let mut c = NbdClient::connect(nbd.as_str(), e).await?;
        let got = c.read(0, 4096).await?;
        c.disconnect().await?;
        if got.len() == 4096 {
            exports_read += 1;
        }
    }
    let rec = sys.rec_host_id.clone();
    let on = |vms: &Value| {
        vms["items"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|v| {
                        v["host_id"] == rec.as_str()
                            && v["power_state"] == "on"
                            && v["name"]
                                .as_str()
                                .is_some_and(|n| names.iter().any(|x| x == n))
                    })
                    .count()
            })
            .unwrap_or(0)
    };
    let vms_on = match sys
        .api
        .wait(
            "the recovered VMs on in the inventory",
            Duration::from_secs(30),
            "/api/v1/vms?limit=1000",
            |v| on(v) >= names.len(),
        )
        .await
    {
        Ok(v) => on(&v),
        Err(_) => on(&sys.api.get("/api/v1/vms?limit=1000").await?),
    };
    Ok(Recovery {
        kind: if live {
            "live failover"
        } else {
            "failover test"
        },
        task_id: id,
        journal_bytes,
        history_secs,
        rto,
        report_rto_ms: None,
        checkpoint: task["details"]["checkpoint_id"].as_u64(),
        steps: steps_of(&task),
        vms_recovered: names.len(),
        vms_on,
        exports_read,
        writeback,
    })
}

/// The manager's `rto_ms` of the ended operation `task`.
async fn report_rto(sys: &System, task: &str) -> Result<Option<u64>, BenchError> {
    let v = sys
        .api
        .get(&format!("/api/v1/reports?vpg={}&limit=100", sys.vpg))
        .await?;
    let list = v
        .as_array()
        .cloned()
        .or_else(|| v["items"].as_array().cloned())
        .unwrap_or_default();
    Ok(list
        .iter()
        .find(|r| r["details"]["operation"] == task)
        .and_then(|r| r["rto_ms"].as_u64()))
}

/// Ends a test (stop) or a live failover (rollback) and waits for Meeting SLA again.
async fn end(sys: &System, r: &mut Recovery, opts: &RtoOpts) -> Result<(), BenchError> {
    let path = if r.kind == "live failover" {
        format!("/api/v1/vpgs/{}/rollback", sys.vpg)
    } else {
        format!("/api/v1/vpgs/{}/failover-test/stop", sys.vpg)
    };
    sys.api.post(&path, json!({})).await?;
    wait_task(&sys.api, &r.task_id, "succeeded", opts.step_timeout).await?;
    r.report_rto_ms = report_rto(sys, &r.task_id).await?;
    sys.api
        .wait_vpg(&sys.vpg, "meeting_sla", Duration::from_secs(300))
        .await
}

/// Commits the live failover `r`; returns (Promote step, whole commit).
async fn commit(
    sys: &System,
    r: &mut Recovery,
    opts: &RtoOpts,
) -> Result<(Duration, Duration), BenchError> {
    let t0 = Instant::now();
    sys.api
        .post(
            &format!("/api/v1/vpgs/{}/commit", sys.vpg),
            json!({"reverse_protection": false}),
        )
        .await?;
    let task = wait_task(
        &sys.api,
        &r.task_id,
        "succeeded",
        opts.step_timeout.max(Duration::from_secs(1800)),
    )
    .await?;
    let total = t0.elapsed();
    r.report_rto_ms = report_rto(sys, &r.task_id).await?;
    let promote = steps_of(&task)
        .into_iter()
        .find(|(n, _)| n == "promote")
        .map(|(_, ms)| Duration::from_secs_f64(ms / 1000.0))
        .ok_or_else(|| setup(format!("no timed promote step in {task}")))?;
    Ok((promote, total))
}

fn io_err(what: &str, p: &Path) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = format!("{what} {}", p.display());
    move |source| BenchError::Io { what, source }
}

/// Drops a file's clean pages from the page cache (synced first). Blocking.
fn drop_cached(p: &Path) -> Result<u64, BenchError> {
    let f = std::fs::File::open(p).map_err(io_err("open", p))?;
    f.sync_data().map_err(io_err("fdatasync", p))?;
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
        .map_err(|e| io_err("fadvise", p)(e.into()))?;
    Ok(f.metadata().map_err(io_err("stat", p))?.len())
}

/// Drops every file under `dir` from the page cache; returns their bytes. Blocking.
fn drop_tree(dir: &Path) -> Result<u64, BenchError> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    let mut seen = 0usize;
    while let Some(d) = stack.pop() {
        seen += 1;
        if seen > 100_000 {
            break;
        }
        for e in std::fs::read_dir(&d).map_err(io_err("list", &d))? {
            let e = e.map_err(io_err("list", &d))?;
            let ty = e.file_type().map_err(io_err("stat", &e.path()))?;
            if ty.is_dir() {
                stack.push(e.path());
            } else if ty.is_file() {
                total += drop_cached(&e.path())?;
            }
        }
    }
    Ok(total)
}

/// A raw sequential copy of `bytes`: the source is written (and fdatasync'd) first, then
/// timed twice: read it, write a new file, fdatasync — with the source dropped from the
/// page cache, then with it cached. Returns (cold, warm). Both files are deleted.
/// Blocking.
fn raw_copy(dir: &Path, bytes: u64) -> Result<(Duration, Duration), BenchError> {
    lab::create_dir(dir)?;
    let src = dir.join("raw-src");
    let dst = dir.join("raw-dst");
    let mut buf = vec![0u8; MIB as usize];
    random_fill(&mut buf, 0xdead_beef);
    let r = (|| {
        {
            let mut f = std::fs::File::create(&src).map_err(io_err("create", &src))?;
            let mut left = bytes;
            while left > 0 {
                let n = left.min(MIB) as usize;
                f.write_all(&buf[..n]).map_err(io_err("write", &src))?;
                left -= n as u64;
            }
            f.sync_data().map_err(io_err("fdatasync", &src))?;
        }
        let copy = |buf: &mut [u8]| -> Result<Duration, BenchError> {
            let t0 = Instant::now();
            let mut i = std::fs::File::open(&src).map_err(io_err("open", &src))?;
            let mut o = std::fs::File::create(&dst).map_err(io_err("create", &dst))?;
            let mut left = bytes;
            while left > 0 {
                let n = left.min(MIB) as usize;
                i.read_exact(&mut buf[..n]).map_err(io_err("read", &src))?;
                o.write_all(&buf[..n]).map_err(io_err("write", &dst))?;
                left -= n as u64;
            }
            o.sync_data().map_err(io_err("fdatasync", &dst))?;
            let took = t0.elapsed();
            drop(o);
            std::fs::remove_file(&dst).map_err(io_err("remove", &dst))?;
            Ok(took)
        };
        drop_cached(&src)?;
        let cold = copy(&mut buf)?;
        // Warm: the source was just read whole; read it once more if it did not stay.
        let warm = copy(&mut buf)?;
        Ok((cold, warm))
    })();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    r
}

/// Runs the benchmark; everything under `opts.dir/bench-rto` is deleted afterwards.
pub async fn run(opts: &RtoOpts) -> Result<RtoReport, BenchError> {
    if opts.vms == 0 || opts.large_bytes < opts.small_bytes || opts.disk_size < MIB {
        return Err(setup(
            "bench rto: at least one VM, disks of at least 1 MiB, large ≥ small",
        ));
    }
    let dir = opts.dir.join("bench-rto");
    let _ = std::fs::remove_dir_all(&dir);
    let r = run_in(&dir, opts).await;
    let _ = std::fs::remove_dir_all(&dir);
    r
}

async fn run_in(dir: &Path, opts: &RtoOpts) -> Result<RtoReport, BenchError> {
    let t0 = Instant::now();
    let mut sys = start_system(&dir.join("lab"), opts).await?;
    let setup_took = t0.elapsed();
    let r = measure(&mut sys, dir, opts, setup_took).await;
    sys.stop().await;
    r
}

async fn measure(
    sys: &mut System,
    dir: &Path,
    opts: &RtoOpts,
    setup_took: Duration,
) -> Result<RtoReport, BenchError> {
    let mut report = RtoReport {
        vms: opts.vms,
        disk_size: opts.disk_size,
        setup: setup_took,
        fills: Vec::new(),
        small: Vec::new(),
        large: Vec::new(),
        commit: None,
    };
    // Small journal.
    let took = fill(sys, opts.small_bytes, opts).await?;
    report.fills.push((sys.written, took));
    for _ in 0..opts.repeats.max(1) {
        let mut t = recover(sys, false, opts).await?;
        end(sys, &mut t, opts).await?;
        report.small.push(t);
    }
    if opts.live {
        for _ in 0..opts.repeats.max(1) {
            let mut l = recover(sys, true, opts).await?;
            end(sys, &mut l, opts).await?;
            report.small.push(l);
        }
    }
    // Large journal: the rest of the history on top.
    let before = sys.written;
    let took = fill(sys, opts.large_bytes.saturating_sub(before), opts).await?;
    report.fills.push((sys.written - before, took));
    for _ in 0..opts.repeats.max(1) {
        let mut t = recover(sys, false, opts).await?;
        end(sys, &mut t, opts).await?;
        report.large.push(t);
    }
    let committed = usize::from(opts.commit);
    if opts.live {
        for _ in committed..opts.repeats.max(1) {
            let mut l = recover(sys, true, opts).await?;
            end(sys, &mut l, opts).await?;
            report.large.push(l);
        }
    }
    if opts.commit {
        let mut l = recover(sys, true, opts).await?;
        // The journals cold, as after hours of history: their pages dropped.
        let rec_dir = dir.join("lab").join("rec");
        let dropped = tokio::task::spawn_blocking(move || drop_tree(&rec_dir))
            .await
            .map_err(|e| setup(format!("drop cache: {e}")))??;
        let (promote, total) = commit(sys, &mut l, opts).await?;
        let bytes = l.journal_bytes;
        report.large.push(l);
        let raw_dir = dir.join("raw");
        let (raw, raw_warm) = tokio::task::spawn_blocking(move || raw_copy(&raw_dir, bytes))
            .await
            .map_err(|e| setup(format!("raw copy: {e}")))??;
        report.commit = Some(Commit {
            bytes,
            payload_bytes: sys.written,
            promote,
            total,
            raw_copy: raw,
            raw_copy_warm: raw_warm,
            dropped_bytes: dropped,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bench_rto_runs_end_to_end_at_a_tiny_scale() {
        let base = std::env::temp_dir().join(format!("bulwark-bench-rto-{}", std::process::id()));
        let opts = RtoOpts {
            vms: 3,
            disk_size: 4 * MIB,
            small_bytes: 3 * MIB,
            large_bytes: 12 * MIB,
            repeats: 1,
            step_timeout: Duration::from_secs(50),
            ..RtoOpts::new(base.clone(), 1.0)
        };
        let started = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(60), run(&opts))
            .await
            .expect("bench rto within its time")
            .expect("bench rto ran");
        let text = r.text();
        assert_eq!(r.small.len(), 2, "{text}");
        assert_eq!(r.large.len(), 2, "{text}");
        for x in r.small.iter().chain(&r.large) {
            assert_eq!(x.vms_recovered, 3, "{text}");
            assert_eq!(x.exports_read, 3, "{text}");
            assert_eq!(x.vms_on, 3, "{text}");
            assert!(x.rto > Duration::ZERO, "{text}");
        }
        assert!(r.large[0].journal_bytes >= 12 * MIB, "{text}");
        assert!(r.small[0].journal_bytes >= 3 * MIB, "{text}");
        assert!(r.ratio("failover test").is_some(), "{text}");
        let c = r.commit.as_ref().expect("commit measured");
        assert!(c.bytes >= 12 * MIB && c.raw_copy > Duration::ZERO, "{text}");
        assert!(text.contains("promote / raw copy"), "{text}");
        assert!(!base.join("bench-rto").exists(), "cleaned up");
        eprintln!("{text}\n(took {:?})", started.elapsed());
        let _ = std::fs::remove_dir_all(&base);
    }
}
