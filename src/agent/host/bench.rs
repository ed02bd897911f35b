//! `bulwark bench agent`: end-to-end replication. A protected agent (one disk exported
//! over NBD, written through to its image and streamed over TLS 1.3) and a recovery agent
//! (journal, fdatasync before the ack) run in this process, against a plain `qemu-nbd`
//! export of a file on the same disk, driven by the same clients in the same run and
//! reported as ratios (DESIGN §11: the machines are shared and noisy).
//!
//! Both agents sit on the same disk as the baseline: every guest byte is written twice
//! (image and journal) plus the journal's fdatasyncs, so the physical ceiling of the
//! replicated path is about half the disk's raw write rate.
//!
//! Measured:
//! 1. `qemu-img convert -n` of a `size` file of non-zero data into the export: until the
//!    guest's writes completed, and (ours) until the recovery journal holds all of it
//!    durably (`acked_seq == last_seq`).
//! 2. Random writes (4 KiB and 64 KiB, queue depth 16) with our [`NbdClient`].
//! 3. 4 KiB writes at queue depth 1: per-request latency, p50/p99.
//! 4. Lag: 64 KiB writes paced at half the measured end-to-end capacity while
//!    `Agent::status` is sampled every 50 ms (oldest unacknowledged record's age), with a
//!    checkpoint round every 2 s (its hold time).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use super::config::{AllowSection, ByteSize, DiskSection, PeerSection};
use super::{Agent, AgentConfig, AgentError, AgentFlags, AgentSection};
use crate::agent::nbd::bench::{
    convert_into_args, fill_file, free_port, prealloc_file, proc_cpu, run_cmd, wait_listening,
};
use crate::agent::nbd::proto::CMD_WRITE;
use crate::agent::nbd::{NbdClient, NbdError};
use crate::agent::tls;
use crate::proto::agent::{CheckpointRequest, ProtectedDiskStatus, ReplicationMode};

const PROT_HOST: &str = "prot";
const REC_HOST: &str = "rec";
const DISK: &str = "disk";
const QEMU_EXPORT: &str = "bench";

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("agent bench: {0}")]
    Io(#[from] std::io::Error),
    #[error("agent bench: {0}")]
    Bench(String),
}

fn bench_err(what: impl Into<String>) -> BenchError {
    BenchError::Bench(what.into())
}

impl From<super::AgentConfigError> for BenchError {
    fn from(e: super::AgentConfigError) -> Self {
        BenchError::Agent(e.into())
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Directory for every file (images, journal, certificates); on the disk to measure.
    pub dir: PathBuf,
    /// Size of the exports and of the converted file.
    pub size: u64,
    /// Runs per measurement and target (best kept; the targets alternate who goes first).
    pub rounds: usize,
    /// Requests per random-write run, 4 KiB and 64 KiB.
    pub random_4k: u64,
    pub random_64k: u64,
    /// Queue depth of the random writes.
    pub depth: usize,
    /// 4 KiB depth-1 writes per latency run.
    pub latency_writes: u64,
    /// Length of the lag run.
    pub lag_run: Duration,
    /// Status sampling period of the lag run.
    pub sample_every: Duration,
    /// Checkpoint period of the lag run.
    pub checkpoint_every: Duration,
    /// Bound on any wait for the journal to catch up.
    pub drain_timeout: Duration,
}

impl BenchOpts {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BenchOpts {
            dir: dir.into(),
            size: 2 << 30,
            rounds: 2,
            random_4k: 20_000,
            random_64k: 5_000,
            depth: 16,
            latency_writes: 5_000,
            lag_run: Duration::from_secs(20),
            sample_every: Duration::from_millis(50),
            checkpoint_every: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(300),
        }
    }

    /// Tiny sizes: checks the benchmark runs, measures nothing useful.
    pub fn quick(dir: impl Into<PathBuf>) -> Self {
        BenchOpts {
            size: 16 << 20,
            rounds: 1,
            random_4k: 200,
            random_64k: 100,
            latency_writes: 100,
            lag_run: Duration::from_millis(600),
            checkpoint_every: Duration::from_millis(200),
            drain_timeout: Duration::from_secs(30),
            ..BenchOpts::new(dir)
        }
    }
}

/// Percentiles of a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pcts {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

impl Pcts {
    fn of(mut v: Vec<f64>) -> Pcts {
        if v.is_empty() {
            return Pcts::default();
        }
        v.sort_by(f64::total_cmp);
        let pick = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
        Pcts {
            p50: pick(0.5),
            p99: pick(0.99),
            max: v[v.len() - 1],
            n: v.len(),
        }
    }
}

/// One throughput line: plain qemu-nbd against the protected export.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub name: String,
    /// Requests and bytes per run.
    pub ops: u64,
    pub bytes: u64,
    /// Best wall seconds.
    pub qemu_secs: f64,
    pub ours_secs: f64,
    /// Least server CPU seconds (ours: the whole process, both agents and the client).
    pub qemu_cpu: f64,
    pub ours_cpu: f64,
}

impl Row {
    /// Throughput ours / qemu-nbd.
    pub fn ratio(&self) -> f64 {
        self.qemu_secs / self.ours_secs
    }
    fn mb_s(&self, secs: f64) -> f64 {
        self.bytes as f64 / 1e6 / secs
    }
}

/// The lag run's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Lag {
    /// End-to-end capacity it was derived from (durable MB/s of the convert) and the
    /// rate offered (half of it).
    pub capacity_mb_s: f64,
    pub offered_mb_s: f64,
    /// What the writer achieved.
    pub achieved_mb_s: f64,
    pub seconds: f64,
    /// Oldest unacknowledged record's age, ms, sampled.
    pub oldest_unacked_ms: Pcts,
    /// Queued bytes in the sender, sampled, MiB.
    pub queued_mib: Pcts,
    /// Recovery side: received but not yet durable, MiB, sampled.
    pub pending_mib: Pcts,
    /// Longest stretch between two samples that saw the acknowledged seq move, ms
    /// (while records were queued).
    pub longest_ack_gap_ms: f64,
    /// From the end of the load until everything was durable.
    pub drain_ms: f64,
    /// Guest write latency during the load, µs.
    pub write_us: Pcts,
    /// Checkpoint hold time, µs.
    pub hold_us: Pcts,
    /// Spilled bytes seen at most.
    pub spilled_max: u64,
    /// Whether the disk ever went bitmap-only.
    pub bitmap_only: bool,
}

/// The result of [`run`].
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub qemu_version: String,
    pub rounds: usize,
    pub depth: usize,
    /// Guest-visible convert and random writes.
    pub rows: Vec<Row>,
    /// The convert until durable in the recovery journal (ours only).
    pub convert_durable_secs: f64,
    /// The most the sender spilled during the converts, and whether a disk went
    /// bitmap-only (then the durable time is meaningless).
    pub convert_spilled_max: u64,
    pub convert_bitmap_only: bool,
    /// 4 KiB depth-1 write latency, µs.
    pub qemu_lat: Pcts,
    pub ours_lat: Pcts,
    pub lag: Lag,
}

const SEQ_TARGET: f64 = 0.70;
const LAT_TARGET: f64 = 1.10;
const LAG_TARGET_MS: f64 = 1000.0;

fn met(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "NOT met"
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "Agent end-to-end benchmark: protected agent (NBD export, write-through, TLS 1.3 stream over loopback) ->"
        )?;
        writeln!(
            f,
            "recovery agent (journal, fdatasync before ack), one process; baseline {} -f raw --cache=writeback --aio=threads.",
            self.qemu_version
        )?;
        writeln!(
            f,
            "Image, journal and baseline share one disk: each replicated byte is written twice plus journal fsyncs,"
        )?;
        writeln!(
            f,
            "so the physical ceiling of the replicated path is about half the raw write rate. Best of {} runs, alternating.",
            self.rounds
        )?;
        writeln!(
            f,
            "{:<34} {:>9} {:>8} {:>7}   {:>9} {:>8} {:>7}   {:>9}",
            "test", "qemu op/s", "MB/s", "cpu s", "ours op/s", "MB/s", "cpu s", "ours/qemu"
        )?;
        for r in &self.rows {
            let ops = |s: f64| {
                if r.ops > 1 {
                    format!("{:.0}", r.ops as f64 / s)
                } else {
                    "-".into()
                }
            };
            writeln!(
                f,
                "{:<34} {:>9} {:>8.1} {:>7.2}   {:>9} {:>8.1} {:>7.2}   {:>9.2}",
                r.name,
                ops(r.qemu_secs),
                r.mb_s(r.qemu_secs),
                r.qemu_cpu,
                ops(r.ours_secs),
                r.mb_s(r.ours_secs),
                r.ours_cpu,
                r.ratio()
            )?;
        }
        let conv = self.rows.first();
        if let Some(c) = conv {
            writeln!(
                f,
                "{:<34} {:>9} {:>8.1} {:>7}   {:>9} {:>8.1} {:>7}   {:>9.2}   ({:.2} s; drain after the guest finished {:.2} s)",
                "convert: durable in the journal",
                "-",
                c.mb_s(c.qemu_secs),
                "",
                "-",
                c.mb_s(self.convert_durable_secs),
                "",
                c.qemu_secs / self.convert_durable_secs,
                self.convert_durable_secs,
                self.convert_durable_secs - c.ours_secs
            )?;
            writeln!(
                f,
                "  (convert: sender spilled at most {:.0} MiB{})",
                self.convert_spilled_max as f64 / (1u64 << 20) as f64,
                if self.convert_bitmap_only {
                    "; the disk went BITMAP-ONLY"
                } else {
                    ""
                }
            )?;
        }
        let (q, o) = (&self.qemu_lat, &self.ours_lat);
        writeln!(
            f,
            "4 KiB write latency, depth 1 ({} writes each): qemu-nbd p50 {:.1} µs p99 {:.1} µs; ours p50 {:.1} µs p99 {:.1} µs; added p50 {:+.1} µs ({:+.1} %), p99 {:+.1} µs",
            o.n,
            q.p50,
            q.p99,
            o.p50,
            o.p99,
            o.p50 - q.p50,
            100.0 * (o.p50 / q.p50 - 1.0),
            o.p99 - q.p99
        )?;
        let l = &self.lag;
        writeln!(
            f,
            "lag: 64 KiB writes paced at {:.1} MB/s (half of {:.1} MB/s end-to-end), achieved {:.1} MB/s for {:.1} s",
            l.offered_mb_s, l.capacity_mb_s, l.achieved_mb_s, l.seconds
        )?;
        writeln!(
            f,
            "  oldest unacked age ({} samples): p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; longest gap between ack advances {:.0} ms",
            l.oldest_unacked_ms.n,
            l.oldest_unacked_ms.p50,
            l.oldest_unacked_ms.p99,
            l.oldest_unacked_ms.max,
            l.longest_ack_gap_ms
        )?;
        writeln!(
            f,
            "  sender queue MiB p50 {:.1} p99 {:.1} max {:.1}; recovery not-yet-durable MiB p50 {:.1} p99 {:.1} max {:.1}; spilled max {:.0} MiB{}",
            l.queued_mib.p50,
            l.queued_mib.p99,
            l.queued_mib.max,
            l.pending_mib.p50,
            l.pending_mib.p99,
            l.pending_mib.max,
            l.spilled_max as f64 / (1u64 << 20) as f64,
            if l.bitmap_only { "; BITMAP-ONLY" } else { "" }
        )?;
        writeln!(
            f,
            "  drain after the load {:.0} ms; guest 64 KiB write latency p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
            l.drain_ms, l.write_us.p50, l.write_us.p99, l.write_us.max
        )?;
        writeln!(
            f,
            "  checkpoint hold ({} rounds): p50 {:.0} µs, max {:.0} µs",
            l.hold_us.n, l.hold_us.p50, l.hold_us.max
        )?;
        writeln!(f, "targets:")?;
        if let Some(c) = conv {
            writeln!(
                f,
                "  sequential guest-visible ours/qemu >= {SEQ_TARGET:.2}: {} ({:.2})",
                met(c.ratio() >= SEQ_TARGET),
                c.ratio()
            )?;
        }
        let lat = o.p50 / q.p50;
        writeln!(
            f,
            "  4 KiB depth-1 latency <= +10 % (p50): {} ({:+.1} %, {:+.1} µs)",
            met(lat <= LAT_TARGET),
            100.0 * (lat - 1.0),
            o.p50 - q.p50
        )?;
        writeln!(
            f,
            "  lag p99 of oldest unacked < 1 s at half capacity: {} ({:.0} ms)",
            met(l.oldest_unacked_ms.p99 < LAG_TARGET_MS && l.oldest_unacked_ms.n > 0),
            l.oldest_unacked_ms.p99
        )?;
        Ok(())
    }
}

/// Deletes the scratch directory whatever happens.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Cheap non-zero pseudo-random buffers (xorshift64).
fn data_pool(size: usize, n: usize, seed: u64) -> Vec<Vec<u8>> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            let mut v = vec![0u8; size];
            for c in v.chunks_exact_mut(8) {
                c.copy_from_slice(&xorshift(&mut x).to_le_bytes());
            }
            v
        })
        .collect()
}

fn xorshift(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

/// Flushes the filesystem so one measurement's writeback does not land in the next.
async fn settle(dir: &Path) -> Result<(), BenchError> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let f = std::fs::File::open(&dir)?;
        rustix::fs::syncfs(&f)?;
        Ok(())
    })
    .await
    .map_err(|e| bench_err(e.to_string()))??;
    Ok(())
}

fn disk_status(agent: &Agent) -> Result<ProtectedDiskStatus, BenchError> {
    agent
        .status()
        .protected
        .into_iter()
        .next()
        .ok_or_else(|| bench_err("the protected agent has no disk"))
}

/// Everything written is durable at the recovery side (no write yet counts as done).
fn replicated(s: &ProtectedDiskStatus) -> bool {
    let first_of_epoch = s.last_seq & ((1u64 << super::splitter::EPOCH_SHIFT) - 1) == 0;
    s.acked_seq >= s.last_seq || first_of_epoch
}

/// Waits until the journal holds every write; returns when that was seen and the most
/// the sender spilled meanwhile.
async fn wait_replicated(
    agent: &Agent,
    timeout: Duration,
) -> Result<(Instant, u64, bool), BenchError> {
    let deadline = Instant::now() + timeout;
    let mut spilled = 0;
    loop {
        let s = disk_status(agent)?;
        spilled = spilled.max(s.spilled_bytes);
        if replicated(&s) {
            return Ok((Instant::now(), spilled, false));
        }
        if s.mode == ReplicationMode::BitmapOnly {
            return Ok((Instant::now(), spilled, true));
        }
        if Instant::now() > deadline {
            return Err(bench_err(format!(
                "the journal did not catch up within {} s (acked {} of {})",
                timeout.as_secs(),
                s.acked_seq,
                s.last_seq
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// `count` writes of `bs` bytes at random aligned offsets, `depth` in flight, through
/// our client; returns wall seconds.
async fn random_writes(
    addr: SocketAddr,
    export: &str,
    size: u64,
    bs: usize,
    depth: usize,
    count: u64,
    seed: u64,
) -> Result<f64, BenchError> {
    let mut c = NbdClient::connect(addr, export).await?;
    let pool = data_pool(bs, 8, seed);
    let blocks = (size / bs as u64).max(1);
    let mut rng = seed | 1;
    let depth = depth.max(1) as u64;
    let start = Instant::now();
    let (mut sent, mut done) = (0u64, 0u64);
    while done < count {
        while sent < count && sent - done < depth {
            let off = (xorshift(&mut rng) % blocks) * bs as u64;
            let data = &pool[sent as usize % pool.len()];
            c.send(CMD_WRITE, 0, off, bs as u32, data).await?;
            sent += 1;
        }
        let r = c.recv().await?;
        if r.error != 0 {
            return Err(NbdError::Remote(r.error).into());
        }
        done += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    c.disconnect().await?;
    Ok(secs)
}

/// `count` 4 KiB writes at depth 1, random offsets; returns each one's µs.
async fn latency_writes(
    addr: SocketAddr,
    export: &str,
    size: u64,
    count: u64,
    seed: u64,
) -> Result<Vec<f64>, BenchError> {
    const BS: u64 = 4096;
    let mut c = NbdClient::connect(addr, export).await?;
    let pool = data_pool(BS as usize, 8, seed);
    let blocks = (size / BS).max(1);
    let mut rng = seed | 1;
    let mut lat = Vec::with_capacity(count as usize);
    for i in 0..count {
        let off = (xorshift(&mut rng) % blocks) * BS;
        let t = Instant::now();
        c.write(off, &pool[i as usize % pool.len()], false).await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    c.disconnect().await?;
    Ok(lat)
}

/// The two exports under test.
struct Targets {
    qemu: SocketAddr,
    qemu_pid: String,
    ours: SocketAddr,
}

/// Runs `job(addr, export)` against each target `rounds` times, alternating who goes
/// first, with the filesystem flushed and the journal caught up before every run;
/// returns ((best qemu secs, least cpu), (best ours secs, least cpu)).
async fn measure<F, Fut>(
    t: &Targets,
    prot: &Agent,
    opts: &BenchOpts,
    scratch: &Path,
    job: F,
) -> Result<[(f64, f64); 2], BenchError>
where
    F: Fn(SocketAddr, &'static str) -> Fut,
    Fut: std::future::Future<Output = Result<f64, BenchError>>,
{
    let mut best = [(f64::MAX, f64::MAX); 2];
    for r in 0..opts.rounds.max(1) {
        for k in 0..2 {
            let i = (k + r) % 2;
            wait_replicated(prot, opts.drain_timeout).await?;
            settle(scratch).await?;
            let (addr, export, pid) = if i == 0 {
                (t.qemu, QEMU_EXPORT, t.qemu_pid.as_str())
            } else {
                (t.ours, DISK, "self")
            };
            let cpu0 = proc_cpu(pid).unwrap_or(0.0);
            let secs = job(addr, export).await?;
            let cpu = proc_cpu(pid).unwrap_or(0.0) - cpu0;
            best[i] = (best[i].0.min(secs), best[i].1.min(cpu));
        }
    }
    Ok(best)
}

/// Phase 1: the convert, guest-visible and until durable.
async fn convert(
    t: &Targets,
    prot: &Agent,
    opts: &BenchOpts,
    scratch: &Path,
    src: &Path,
) -> Result<(Row, f64, u64, bool), BenchError> {
    let src = src.display().to_string();
    let mut best_q = (f64::MAX, f64::MAX);
    let mut best_o = (f64::MAX, f64::MAX);
    let mut best_durable = f64::MAX;
    let (mut spilled, mut bitmap_only) = (0u64, false);
    for r in 0..opts.rounds.max(1) {
        for k in 0..2 {
            wait_replicated(prot, opts.drain_timeout).await?;
            settle(scratch).await?;
            let ours = (k + r) % 2 == 1;
            let (addr, export, pid) = if ours {
                (t.ours, DISK, "self")
            } else {
                (t.qemu, QEMU_EXPORT, t.qemu_pid.as_str())
            };
            let url = format!("nbd://{addr}/{export}");
            let args = convert_into_args(src.as_str(), &url);
            let cpu0 = proc_cpu(pid).unwrap_or(0.0);
            let start = Instant::now();
            // The guest is done when qemu-img exits (it flushes at the end), meanwhile
            // the sender's spill is watched.
            let job = run_cmd("qemu-img", &args);
            tokio::pin!(job);
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            let res = loop {
                tokio::select! {
                    r = &mut job => break r,
                    _ = tick.tick(), if ours => {
                        let s = disk_status(prot)?;
                        spilled = spilled.max(s.spilled_bytes);
                        bitmap_only |= s.mode == ReplicationMode::BitmapOnly;
                    }
                }
            };
            res?;
            let secs = start.elapsed().as_secs_f64();
            let cpu = proc_cpu(pid).unwrap_or(0.0) - cpu0;
            if ours {
                let (at, sp, bo) = wait_replicated(prot, opts.drain_timeout).await?;
                spilled = spilled.max(sp);
                bitmap_only |= bo;
                best_durable = best_durable.min(at.duration_since(start).as_secs_f64());
                best_o = (best_o.0.min(secs), best_o.1.min(cpu));
            } else {
                best_q = (best_q.0.min(secs), best_q.1.min(cpu));
            }
        }
    }
    let row = Row {
        name: format!("convert {} MiB: guest-visible", opts.size >> 20),
        ops: 1,
        bytes: opts.size,
        qemu_secs: best_q.0,
        ours_secs: best_o.0,
        qemu_cpu: best_q.1,
        ours_cpu: best_o.1,
    };
    Ok((row, best_durable, spilled, bitmap_only))
}

/// Phase 4: paced load, status sampling, checkpoints.
async fn lag_run(
    prot: &Arc<Agent>,
    rec: &Agent,
    ours: SocketAddr,
    opts: &BenchOpts,
    capacity_mb_s: f64,
) -> Result<Lag, BenchError> {
    const BS: usize = 64 << 10;
    let offered = (capacity_mb_s / 2.0).max(1.0);
    let interval = Duration::from_secs_f64(BS as f64 / (offered * 1e6));
    let size = opts.size;
    let run = opts.lag_run;
    let writer = tokio::spawn(async move {
        let mut c = NbdClient::connect(ours, DISK).await?;
        let pool = data_pool(BS, 8, 99);
        let blocks = (size / BS as u64).max(1);
        let mut lat = Vec::new();
        let start = Instant::now();
        let mut i = 0u64;
        // Open loop: writes are due on schedule whatever the previous ones took.
        while start.elapsed() < run {
            let due = start + interval.mul_f64(i as f64);
            if let Some(w) = due.checked_duration_since(Instant::now()) {
                tokio::time::sleep(w).await;
            }
            let off = (i % blocks) * BS as u64;
            let t = Instant::now();
            c.write(off, &pool[i as usize % pool.len()], false).await?;
            lat.push(t.elapsed().as_secs_f64() * 1e6);
            i += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        c.disconnect().await?;
        Ok::<_, BenchError>((lat, secs, i))
    });

    let mut oldest = Vec::new();
    let mut queued = Vec::new();
    let mut pending = Vec::new();
    let mut holds = Vec::new();
    let (mut spilled_max, mut bitmap_only) = (0u64, false);
    let mut last_acked = 0u64;
    let mut last_move = Instant::now();
    let mut longest_gap = Duration::ZERO;
    let mut next_cp = Instant::now() + opts.checkpoint_every;
    let mut tick = tokio::time::interval(opts.sample_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hard_stop = Instant::now() + run + Duration::from_secs(30);
    while !writer.is_finished() && Instant::now() < hard_stop {
        tick.tick().await;
        let st = prot.status();
        if let Some(s) = st.protected.first() {
            oldest.push(s.oldest_unacked_ms as f64);
            queued.push(s.queued_bytes as f64 / (1u64 << 20) as f64);
            spilled_max = spilled_max.max(s.spilled_bytes);
            bitmap_only |= s.mode == ReplicationMode::BitmapOnly;
            let now = Instant::now();
            if s.acked_seq != last_acked || s.queued_records == 0 {
                last_acked = s.acked_seq;
                last_move = now;
            } else {
                longest_gap = longest_gap.max(now - last_move);
            }
        }
        if Instant::now() >= next_cp {
            next_cp += opts.checkpoint_every;
            let r = prot.checkpoint(&CheckpointRequest::default())?;
            holds.push(r.hold_us as f64);
        }
        let b: u64 = rec.status().received.iter().map(|r| r.pending_bytes).sum();
        pending.push(b as f64 / (1u64 << 20) as f64);
    }
    let (lat, secs, n) = match tokio::time::timeout(Duration::from_secs(30), writer).await {
        Ok(r) => r.map_err(|e| bench_err(format!("lag writer: {e}")))??,
        Err(_) => return Err(bench_err("the lag writer did not finish")),
    };
    let end = Instant::now();
    let (at, sp, bo) = wait_replicated(prot, opts.drain_timeout).await?;
    Ok(Lag {
        capacity_mb_s,
        offered_mb_s: offered,
        achieved_mb_s: (n * BS as u64) as f64 / 1e6 / secs,
        seconds: secs,
        oldest_unacked_ms: Pcts::of(oldest),
        queued_mib: Pcts::of(queued),
        pending_mib: Pcts::of(pending),
        longest_ack_gap_ms: longest_gap.as_secs_f64() * 1e3,
        drain_ms: at.duration_since(end).as_secs_f64() * 1e3,
        write_us: Pcts::of(lat),
        hold_us: Pcts::of(holds),
        spilled_max: spilled_max.max(sp),
        bitmap_only: bitmap_only || bo,
    })
}

/// The two agents of the run.
struct Agents {
    rec: Arc<Agent>,
    prot: Option<Arc<Agent>>,
}

impl Agents {
    /// Shuts both down, each bounded (a shutdown that hangs must not hang the bench;
    /// before 5a3ea1f an agent with a peer never finished it: its stream-event watcher
    /// waited for a channel the agent itself kept open). The run's files are removed
    /// anyway and the process exits after the report.
    async fn stop(self) {
        const BOUND: Duration = Duration::from_secs(8);
        if let Some(p) = self.prot {
            match tokio::time::timeout(BOUND, p.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "protected agent shutdown failed"),
                Err(_) => tracing::warn!(
                    "protected agent shutdown did not finish within {} s",
                    BOUND.as_secs()
                ),
            }
        }
        match tokio::time::timeout(BOUND, self.rec.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "recovery agent shutdown failed"),
            Err(_) => tracing::warn!(
                "recovery agent shutdown did not finish within {} s",
                BOUND.as_secs()
            ),
        }
    }
}

async fn start_agents(scratch: &Path, image: &Path, size: u64) -> Result<Agents, BenchError> {
    let certs = scratch.join("certs");
    tls::lab_certs(&certs, &[PROT_HOST.into(), REC_HOST.into()])?;
    let flags = |host: &str, site: &str, data_listen: Option<&str>| AgentFlags {
        data_dir: Some(scratch.join(host)),
        site: Some(site.into()),
        host_name: Some(host.into()),
        nbd_listen: Some("127.0.0.1:0".into()),
        data_listen: data_listen.map(String::from),
        admin_listen: None,
        tls_dir: Some(certs.clone()),
        insecure: false,
    };
    let rec_cfg = AgentConfig::resolve(
        &AgentSection {
            allow: vec![AllowSection {
                host_name: PROT_HOST.into(),
                storage: scratch.join(REC_HOST).join("storage"),
            }],
            ..AgentSection::default()
        },
        flags(REC_HOST, "recovery", Some("127.0.0.1:0")),
    )?;
    let rec = Agent::start(rec_cfg).await?;
    let Some(data) = rec.endpoints().data else {
        let _ = rec.shutdown().await;
        return Err(bench_err("the recovery agent has no stream listener"));
    };
    let mut agents = Agents { rec, prot: None };
    let prot_cfg = AgentConfig::resolve(
        &AgentSection {
            disks: vec![DiskSection {
                name: DISK.into(),
                id: 1,
                size: ByteSize(size),
                path: Some(image.to_path_buf()),
                group: None,
                recovery_host: Some(REC_HOST.into()),
                resync: None,
                priority: None,
            }],
            // Production defaults for everything but the address.
            peers: vec![PeerSection {
                host_name: REC_HOST.into(),
                address: data,
                compression: None,
                bandwidth_limit: None,
                queue_memory: None,
                spill_limit: None,
                away_bound_secs: None,
            }],
            ..AgentSection::default()
        },
        flags(PROT_HOST, "production", None),
    );
    let started = match prot_cfg {
        Ok(cfg) => Agent::start(cfg).await.map_err(BenchError::from),
        Err(e) => Err(e.into()),
    };
    match started {
        Ok(p) => {
            agents.prot = Some(p);
            Ok(agents)
        }
        Err(e) => {
            agents.stop().await;
            Err(e)
        }
    }
}

async fn spawn_qemu_nbd(image: &Path) -> Result<(Child, SocketAddr), BenchError> {
    // As `bulwark bench nbd` runs it, so the baselines match.
    let port = free_port()?;
    let mut child = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "--cache=writeback",
            "--aio=threads",
            "--discard=unmap",
        ])
        .args([
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-x",
            QEMU_EXPORT,
        ])
        .args(["--persistent", "--shared=8"])
        .arg(image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| bench_err(format!("cannot start qemu-nbd: {e}")))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    if let Err(e) = wait_listening(addr, &mut child).await {
        let _ = child.kill().await;
        return Err(e.into());
    }
    Ok((child, addr))
}

/// Every phase, once the agents and qemu-nbd run.
async fn phases(
    t: &Targets,
    prot: &Arc<Agent>,
    rec: &Arc<Agent>,
    opts: &BenchOpts,
    scratch: &Path,
    src: &Path,
) -> Result<Report, BenchError> {
    let (conv, durable, spilled, bitmap_only) = convert(t, prot, opts, scratch, src).await?;
    let mut rows = vec![conv];
    let size = opts.size;
    for (bs, count) in [(4096usize, opts.random_4k), (64 << 10, opts.random_64k)] {
        let depth = opts.depth;
        let res = measure(t, prot, opts, scratch, |addr, export| {
            random_writes(addr, export, size, bs, depth, count, 0x5eed ^ bs as u64)
        })
        .await?;
        rows.push(Row {
            name: format!("random write {} KiB depth {depth}", bs >> 10),
            ops: count,
            bytes: count * bs as u64,
            qemu_secs: res[0].0,
            ours_secs: res[1].0,
            qemu_cpu: res[0].1,
            ours_cpu: res[1].1,
        });
    }

    let (mut ql, mut ol) = (Vec::new(), Vec::new());
    for r in 0..opts.rounds.max(1) {
        for k in 0..2 {
            wait_replicated(prot, opts.drain_timeout).await?;
            settle(scratch).await?;
            let seed = 0x1a7 + r as u64;
            if (k + r) % 2 == 0 {
                ql.extend(
                    latency_writes(t.qemu, QEMU_EXPORT, size, opts.latency_writes, seed).await?,
                );
            } else {
                ol.extend(latency_writes(t.ours, DISK, size, opts.latency_writes, seed).await?);
            }
        }
    }

    wait_replicated(prot, opts.drain_timeout).await?;
    settle(scratch).await?;
    let capacity = opts.size as f64 / 1e6 / durable;
    let lag = lag_run(prot, rec, t.ours, opts, capacity).await?;
    Ok(Report {
        qemu_version: String::new(),
        rounds: opts.rounds.max(1),
        depth: opts.depth,
        rows,
        convert_durable_secs: durable,
        convert_spilled_max: spilled,
        convert_bitmap_only: bitmap_only,
        qemu_lat: Pcts::of(ql),
        ours_lat: Pcts::of(ol),
        lag,
    })
}

/// Runs the benchmark; removes its files and stops what it started on every path.
pub async fn run(opts: &BenchOpts) -> Result<Report, BenchError> {
    let (_, version) = run_cmd("qemu-nbd", &["--version".to_string()]).await?;
    let qemu_version = version
        .lines()
        .next()
        .unwrap_or("qemu-nbd")
        .trim()
        .to_string();
    let size = (opts.size.max(1 << 20) >> 16) << 16;
    let opts = BenchOpts {
        size,
        ..opts.clone()
    };
    let dir = opts
        .dir
        .join(format!("bulwark-agent-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let scratch = Scratch(dir.clone());
    let prot_img = dir.join("protected.img");
    let qemu_img = dir.join("qemu.img");
    let src = dir.join("src.raw");
    {
        let (a, b, c) = (prot_img.clone(), qemu_img.clone(), src.clone());
        tokio::task::spawn_blocking(move || -> Result<(), NbdError> {
            prealloc_file(&a, size)?;
            prealloc_file(&b, size)?;
            fill_file(&c, size, 7)
        })
        .await
        .map_err(|e| bench_err(e.to_string()))??;
    }
    let agents = start_agents(&dir, &prot_img, size).await?;
    let result = async {
        let Some(prot) = agents.prot.as_ref() else {
            return Err(bench_err("no protected agent"));
        };
        let ours: SocketAddr = prot
            .endpoints()
            .nbd
            .parse()
            .map_err(|_| bench_err("bad NBD address"))?;
        let (mut qemu, qemu_addr) = spawn_qemu_nbd(&qemu_img).await?;
        let t = Targets {
            qemu: qemu_addr,
            qemu_pid: qemu.id().map(|p| p.to_string()).unwrap_or_default(),
            ours,
        };
        let r = phases(&t, prot, &agents.rec, &opts, &dir, &src).await;
        let _ = qemu.kill().await;
        r
    }
    .await;
    agents.stop().await;
    drop(scratch);
    let mut report = result?;
    report.qemu_version = qemu_version;
    Ok(report)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn percentiles() {
        let p = Pcts::of((1..=100).map(f64::from).collect());
        assert_eq!((p.p50, p.p99, p.max, p.n), (51.0, 100.0, 100.0, 100));
        assert_eq!(Pcts::of(Vec::new()), Pcts::default());
    }

    /// Needs qemu-nbd and qemu-img (as the NBD tests do); a few seconds.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quick_run_completes_and_cleans_up() {
        let d = tempfile::tempdir().unwrap();
        let r = run(&BenchOpts::quick(d.path())).await.unwrap();
        assert_eq!(r.rows.len(), 3);
        assert!(r.convert_durable_secs > 0.0 && r.lag.oldest_unacked_ms.n > 0);
        assert!(r.to_string().contains("targets:"));
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }
}
