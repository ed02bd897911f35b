//! `bulwark bench move`: the time of a planned move, idle and while the guests write,
//! through the real manager REST API, in one process on loopback (a manager on SQLite
//! with production timings, a recovery agent `rec`, and a VPG of three VMs on two
//! protected hosts: `vm-01` and `vm-02` on `prot-00`, `vm-03` on `prot-01`).
//!
//! Moves alternate between idle guests and guests writing (one NBD client per VM,
//! random blocks of `write_block` bytes every `write_interval`, until the move shuts the
//! VM down). Each move (`POST /api/v1/vpgs/{id}/move`) is timed until its task waits
//! for the decision (`waiting`: shut down, final checkpoint durable everywhere, VMs
//! recovered and on), then rolled back (timed too) and the VPG let settle to Meeting SLA
//! with its streams drained. A move's time should not depend on guest load: the report
//! gives both medians and their ratio (target ≤ 2), and per move the syncs the agents
//! started meanwhile and the final checkpoint step's time (a retake after a final
//! checkpoint that never became recoverable costs 10 s).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use super::bench_rto::{steps_of, wait_task};
use crate::agent::nbd::client::NbdClient;
use crate::lab::{self, setup, AgentSpec, Api, LabAgent, Manager};

pub use crate::lab::LabError as BenchError;

const MIB: u64 = 1 << 20;
const FINAL_TAG: &str = "move: final checkpoint";

/// The VMs: (protected host index, VM name, disk id on its host).
const VMS: [(usize, &str, u64); 3] = [(0, "vm-01", 1), (0, "vm-02", 2), (1, "vm-03", 1)];
const HOSTS: usize = 2;

/// What to run.
#[derive(Debug, Clone)]
pub struct MoveOpts {
    pub dir: std::path::PathBuf,
    /// Moves of each kind (idle, loaded); they alternate.
    pub moves: usize,
    /// Size of each VM's disk.
    pub disk_size: u64,
    /// Bytes of each guest write.
    pub write_block: usize,
    /// Pause between one guest's writes.
    pub write_interval: Duration,
    /// How long the guests write before the move is requested.
    pub warmup: Duration,
    /// Longest wait for one operation state or one settling.
    pub step_timeout: Duration,
}

impl MoveOpts {
    pub fn new(dir: std::path::PathBuf) -> Self {
        MoveOpts {
            dir,
            moves: 10,
            disk_size: 64 * MIB,
            write_block: 16 << 10,
            write_interval: Duration::from_millis(2),
            warmup: Duration::from_millis(1000),
            step_timeout: Duration::from_secs(120),
        }
    }
}

/// One move, brought up and rolled back.
#[derive(Debug, Clone)]
pub struct MoveRun {
    pub loaded: bool,
    /// Request → task `waiting`.
    pub up: Duration,
    /// Rollback request → task succeeded.
    pub rollback: Duration,
    /// (step, ms) of the move's steps up to the decision, from the task.
    pub steps: Vec<(String, f64)>,
    /// Guest writes acknowledged while the move ran (warm-up included).
    pub guest_writes: u64,
    /// Syncs the protected agents started between the request and `waiting`.
    pub syncs: u64,
    /// Final checkpoints of the VPG listed but not recoverable once it was up.
    pub unrecoverable_final: usize,
}

impl MoveRun {
    fn step_ms(&self, name: &str) -> f64 {
        self.steps
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, ms)| ms)
            .sum()
    }
}

/// Everything measured.
#[derive(Debug, Clone)]
pub struct MoveReport {
    pub disk_size: u64,
    pub setup: Duration,
    pub runs: Vec<MoveRun>,
    pub opts: MoveOpts,
}

fn median(mut v: Vec<Duration>) -> Option<Duration> {
    v.sort();
    v.get(v.len() / 2).copied()
}

impl MoveReport {
    /// Median time to `waiting` of the idle (`false`) or loaded (`true`) moves.
    pub fn median_up(&self, loaded: bool) -> Option<Duration> {
        median(
            self.runs
                .iter()
                .filter(|r| r.loaded == loaded)
                .map(|r| r.up)
                .collect(),
        )
    }

    /// Loaded / idle median.
    pub fn ratio(&self) -> Option<f64> {
        let i = self.median_up(false)?.as_secs_f64();
        let l = self.median_up(true)?.as_secs_f64();
        (i > 0.0).then(|| l / i)
    }

    pub fn text(&self) -> String {
        let mut o = String::new();
        o.push_str(&format!(
            "Planned move of a VPG of 3 VMs on 2 protected hosts through the manager REST API\n\
             (loopback, manager on SQLite with production timings, insecure streams; {} MiB disks;\n\
             Meeting SLA {:.1} s after start). Load: one guest per VM writing {} KiB blocks at\n\
             random offsets every {} ms through NBD, from {} ms before the request until the\n\
             move shuts it down. Moves alternate idle / loaded; each is rolled back.\n",
            self.disk_size / MIB,
            self.setup.as_secs_f64(),
            self.opts.write_block >> 10,
            self.opts.write_interval.as_millis(),
            self.opts.warmup.as_millis(),
        ));
        o.push_str(
            "| # | guests | up (request → waiting) | final checkpoint step | syncs started | unrecoverable final rows | guest writes | rollback |\n\
             | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        );
        for (i, r) in self.runs.iter().enumerate() {
            o.push_str(&format!(
                "| {} | {} | {:.3} s | {:.0} ms | {} | {} | {} | {:.2} s |\n",
                i + 1,
                if r.loaded { "writing" } else { "idle" },
                r.up.as_secs_f64(),
                r.step_ms("final_checkpoint"),
                r.syncs,
                r.unrecoverable_final,
                r.guest_writes,
                r.rollback.as_secs_f64(),
            ));
        }
        let n = |loaded: bool| self.runs.iter().filter(|r| r.loaded == loaded).count();
        if let (Some(i), Some(l)) = (self.median_up(false), self.median_up(true)) {
            let x = self.ratio().unwrap_or(f64::INFINITY);
            o.push_str(&format!(
                "  median up: idle {:.3} s ({} moves), writing {:.3} s ({} moves): ratio {x:.2}   [target ≤ 2: {}]\n",
                i.as_secs_f64(),
                n(false),
                l.as_secs_f64(),
                n(true),
                if x <= 2.0 { "met" } else { "NOT met" }
            ));
        }
        let syncs: u64 = self.runs.iter().map(|r| r.syncs).sum();
        let stale: usize = self.runs.iter().map(|r| r.unrecoverable_final).sum();
        let slowest = self.runs.iter().map(|r| r.up).max().unwrap_or_default();
        o.push_str(&format!(
            "  syncs started during moves: {syncs}; unrecoverable final checkpoints left listed: {stale}; slowest move {:.3} s\n",
            slowest.as_secs_f64()
        ));
        o
    }
}

/// The lab: manager, recovery agent, two protected agents, the VPG at Meeting SLA.
struct System {
    api: Api,
    vpg: String,
    protected: Vec<LabAgent>,
    recovery: LabAgent,
    manager: Manager,
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

    /// The protected agent of a VM.
    fn host_of(&self, vm: usize) -> Option<&LabAgent> {
        self.protected.get(VMS[vm].0)
    }

    /// Syncs started so far on the protected hosts (completed + running).
    fn syncs(&self) -> u64 {
        self.protected
            .iter()
            .flat_map(|a| a.agent.status().protected)
            .map(|d| d.sync.completed + u64::from(d.sync.running.is_some()))
            .sum()
    }

    /// Every replicated disk streams with nothing queued, owed or syncing.
    fn quiet(&self) -> bool {
        self.protected.iter().all(|a| {
            a.agent.status().protected.iter().all(|d| {
                d.recovery_host.is_none()
                    || (d.queued_records == 0 && d.sync.running.is_none() && !d.owes_sync)
            })
        })
    }
}

async fn start_system(dir: &std::path::Path, opts: &MoveOpts) -> Result<System, BenchError> {
    lab::create_dir(dir)?;
    let config = lab::sqlite_config(dir, std::net::SocketAddr::from(([127, 0, 0, 1], 0)), None);
    let manager = Manager::start(&config, "bench-move").await?;
    let api = manager.api.clone();
    let etoken = api.enrolment_token("bench-move").await?;
    let start = |host: String, site: &'static str, section: String| {
        let ws = manager.ws.clone();
        let etoken = etoken.clone();
        async move {
            LabAgent::start(AgentSpec {
                data_dir: dir.join(&host),
                host: &host,
                site,
                section: &section,
                manager: &ws,
                enrolment_token: &etoken,
                tls_dir: None,
            })
            .await
        }
    };
    let recovery = start("rec".into(), "dr", "data_listen = \"127.0.0.1:0\"\n".into()).await?;
    let mut protected = Vec::new();
    for h in 0..HOSTS {
        let mut section = String::new();
        for (_, name, id) in VMS.iter().filter(|(x, _, _)| *x == h) {
            section.push_str(&format!(
                "[[disks]]\nname = \"{name}\"\nid = {id}\nsize = {}\n",
                opts.disk_size
            ));
        }
        protected.push(start(format!("prot-{h:02}"), "prod", section).await?);
    }
    let inv = api
        .wait_inventory(VMS.len(), &["rec"], Duration::from_secs(60))
        .await?;
    let members: Vec<(&str, &str)> = VMS.iter().map(|(_, v, _)| (*v, "rec")).collect();
    let vpg = api
        .ensure_vpg(
            &inv,
            "bench-move",
            "dr",
            json!({
                "checkpoint_interval_ms": 1000,
                "rpo_target_secs": 10,
                "journal_history_secs": 3600,
            }),
            &members,
        )
        .await?;
    api.wait_vpg(&vpg, "meeting_sla", Duration::from_secs(180))
        .await?;
    Ok(System {
        api,
        vpg,
        protected,
        recovery,
        manager,
    })
}

/// Guests writing until `stop`, their connection closes (the VM was shut down) or
/// `within` passes; each counts its acknowledged writes into `acked`.
fn start_guests(
    sys: &System,
    opts: &MoveOpts,
    stop: &Arc<AtomicBool>,
    acked: &Arc<AtomicU64>,
    round: usize,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut out = Vec::new();
    for (i, &(_, name, _)) in VMS.iter().enumerate() {
        let Some(a) = sys.host_of(i) else { continue };
        let addr = a.agent.endpoints().nbd;
        let (stop, acked) = (stop.clone(), acked.clone());
        let (block, every, disk) = (
            opts.write_block.max(512),
            opts.write_interval,
            opts.disk_size,
        );
        let within = opts.step_timeout;
        let mut seed = 0x9e37_79b9_7f4a_7c15 ^ ((round * 8 + i) as u64 + 1);
        out.push(tokio::spawn(async move {
            let Ok(mut c) = NbdClient::connect(addr.as_str(), name).await else {
                return;
            };
            let mut buf = vec![0u8; block];
            let slots = (disk / block as u64).max(1);
            let deadline = Instant::now() + within;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                // xorshift: offset and contents.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let off = (seed % slots) * block as u64;
                for (k, b) in buf.iter_mut().enumerate().step_by(64) {
                    *b = (seed >> (k % 56)) as u8;
                }
                match tokio::time::timeout(Duration::from_secs(5), c.write(off, &buf, false)).await
                {
                    Ok(Ok(())) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    // The VM was shut down (its export closed), or the write hangs.
                    _ => return,
                }
                tokio::time::sleep(every).await;
            }
        }));
    }
    out
}

/// One move (loaded or not): up, checked, rolled back, settled.
async fn one_move(
    sys: &System,
    opts: &MoveOpts,
    loaded: bool,
    round: usize,
) -> Result<MoveRun, BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let guests = if loaded {
        let g = start_guests(sys, opts, &stop, &acked, round);
        tokio::time::sleep(opts.warmup).await;
        g
    } else {
        Vec::new()
    };
    let syncs_before = sys.syncs();
    let t0 = Instant::now();
    let t = sys
        .api
        .post(&format!("/api/v1/vpgs/{}/move", sys.vpg), json!({}))
        .await;
    let t = match t {
        Ok(t) => t,
        Err(e) => {
            stop.store(true, Ordering::SeqCst);
            return Err(e);
        }
    };
    let id = t["id"]
        .as_str()
        .ok_or_else(|| setup(format!("no task id in {t}")))?
        .to_string();
    let up_task = wait_task(&sys.api, &id, "waiting", opts.step_timeout).await;
    let up = t0.elapsed();
    stop.store(true, Ordering::SeqCst);
    for g in guests {
        let _ = tokio::time::timeout(Duration::from_secs(10), g).await;
    }
    let task = up_task?;
    let syncs = sys.syncs().saturating_sub(syncs_before);
    let unrecoverable_final = sys
        .api
        .items(&format!("/api/v1/vpgs/{}/checkpoints?limit=1000", sys.vpg))
        .await?
        .iter()
        .filter(|c| c["tag"] == FINAL_TAG && c["recoverable"] != true)
        .count();
    let steps = steps_of(&task);

    let r0 = Instant::now();
    sys.api
        .post(&format!("/api/v1/vpgs/{}/rollback", sys.vpg), json!({}))
        .await?;
    wait_task(&sys.api, &id, "succeeded", opts.step_timeout).await?;
    let rollback = r0.elapsed();
    settle(sys, opts).await?;
    Ok(MoveRun {
        loaded,
        up,
        rollback,
        steps,
        guest_writes: acked.load(Ordering::Relaxed),
        syncs,
        unrecoverable_final,
    })
}

/// Waits for Meeting SLA and drained streams.
async fn settle(sys: &System, opts: &MoveOpts) -> Result<(), BenchError> {
    sys.api
        .wait_vpg(&sys.vpg, "meeting_sla", opts.step_timeout)
        .await?;
    let deadline = Instant::now() + opts.step_timeout;
    while !sys.quiet() {
        if Instant::now() > deadline {
            return Err(setup("the streams did not drain after a rollback"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Runs the benchmark; everything under `opts.dir/bench-move` is deleted afterwards.
pub async fn run(opts: &MoveOpts) -> Result<MoveReport, BenchError> {
    if opts.moves == 0 || opts.disk_size < MIB || opts.write_block as u64 > opts.disk_size {
        return Err(setup(
            "bench move: at least one move, disks of at least 1 MiB, writes smaller than a disk",
        ));
    }
    let dir = opts.dir.join("bench-move");
    let _ = std::fs::remove_dir_all(&dir);
    let r = run_in(&dir, opts).await;
    let _ = std::fs::remove_dir_all(&dir);
    r
}

async fn run_in(dir: &std::path::Path, opts: &MoveOpts) -> Result<MoveReport, BenchError> {
    let t0 = Instant::now();
    let sys = start_system(&dir.join("lab"), opts).await?;
    let setup_took = t0.elapsed();
    let r = async {
        settle(&sys, opts).await?;
        let mut runs = Vec::new();
        for i in 0..opts.moves {
            for loaded in [false, true] {
                let r = one_move(&sys, opts, loaded, i).await?;
                tracing::info!(
                    move_no = runs.len() + 1,
                    loaded,
                    up_ms = r.up.as_millis() as u64,
                    syncs = r.syncs,
                    "bench move: one move"
                );
                runs.push(r);
            }
        }
        Ok::<_, BenchError>(runs)
    }
    .await;
    sys.stop().await;
    Ok(MoveReport {
        disk_size: opts.disk_size,
        setup: setup_took,
        runs: r?,
        opts: opts.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bench_move_runs_end_to_end_at_a_tiny_scale() {
        let base = std::env::temp_dir().join(format!("bulwark-bench-move-{}", std::process::id()));
        let opts = MoveOpts {
            moves: 1,
            disk_size: 4 * MIB,
            warmup: Duration::from_millis(300),
            step_timeout: Duration::from_secs(40),
            ..MoveOpts::new(base.clone())
        };
        let r = tokio::time::timeout(Duration::from_secs(110), run(&opts))
            .await
            .expect("bench move within its time")
            .expect("bench move ran");
        let text = r.text();
        assert_eq!(r.runs.len(), 2, "{text}");
        assert!(!r.runs[0].loaded && r.runs[1].loaded, "{text}");
        assert!(r.runs[1].guest_writes > 0, "the guests wrote: {text}");
        for x in &r.runs {
            assert!(x.up > Duration::ZERO, "{text}");
            assert!(
                x.steps.iter().any(|(n, _)| n == "final_checkpoint"),
                "{text}"
            );
        }
        assert!(r.ratio().is_some(), "{text}");
        assert!(text.contains("ratio"), "{text}");
        assert!(!base.join("bench-move").exists(), "cleaned up");
        eprintln!("{text}");
        let _ = std::fs::remove_dir_all(&base);
    }
}
