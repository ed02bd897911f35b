//! `bulwark bench nbd`: our server against `qemu-nbd` on the same disk, driven by the same
//! real client (`qemu-img bench`, `qemu-img convert`), in the same run, reported as ratios.
//!
//! Both servers serve a raw file through the page cache: ours with pread/pwrite
//! ([`FileDevice`]), qemu-nbd with `--cache=writeback --aio=threads`. FLUSH = fdatasync on
//! both. Each cell is the best of `rounds` runs, the servers alternating who goes first
//! (the machines are shared and noisy). Besides wall time, the server's own CPU time per
//! request is reported (from `/proc/<pid>/stat`): it is much less sensitive to other load.

use std::fmt;
use std::future::Future;
use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use super::device::FileDevice;
use super::gate::CompletionGate;
use super::protected::{NullSink, ProtectedDevice};
use super::registry::ExportRegistry;
use super::server::{NbdServer, ServerConfig, StatsSnapshot};
use super::NbdError;
use crate::agent::dirty::{DirtyConfig, DirtyPaths, DirtyTracker};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Directory for the images (both servers' files live here, on the same disk).
    pub dir: PathBuf,
    /// Size of each export and of the converted file.
    pub image_size: u64,
    /// Requests per `qemu-img bench` run.
    pub count: u32,
    /// Runs per measurement and server (best kept).
    pub rounds: usize,
    /// Skip the `qemu-img convert` measurements.
    pub skip_convert: bool,
    /// Also measure the write cases through a [`ProtectedDevice`] (dirty bitmap, activity
    /// log, range locks, completion gate; a no-op sink), against the same qemu-nbd figures.
    pub protected: bool,
}

impl Default for BenchOpts {
    fn default() -> Self {
        BenchOpts {
            dir: std::env::temp_dir(),
            image_size: 1 << 30,
            count: 20_000,
            rounds: 2,
            skip_convert: false,
            protected: true,
        }
    }
}

/// One measurement of one server.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measure {
    /// Wall time of the run (best of the rounds).
    pub seconds: f64,
    /// Server CPU time (user + system) during the run (least of the rounds).
    pub cpu_seconds: f64,
    /// Requests completed.
    pub ops: u64,
    /// Bytes moved.
    pub bytes: u64,
}

impl Measure {
    /// Requests per second.
    pub fn ops_per_sec(&self) -> f64 {
        self.ops as f64 / self.seconds
    }
    /// Megabytes (10^6) per second.
    pub fn mb_per_sec(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.seconds
    }
    /// Mean wall time per request in microseconds (the latency at depth 1).
    pub fn mean_us(&self) -> f64 {
        self.seconds * 1e6 / self.ops as f64
    }
    /// Server CPU microseconds per request.
    pub fn cpu_us_per_op(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.ops as f64
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// What was measured.
    pub name: String,
    /// qemu-nbd's figure.
    pub qemu: Measure,
    /// Ours.
    pub ours: Measure,
}

impl BenchRow {
    /// Throughput ratio ours / qemu-nbd (> 1 = we are faster).
    pub fn ratio(&self) -> f64 {
        self.qemu.seconds / self.ours.seconds
    }
}

/// The result of [`run`].
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// qemu-nbd's version line.
    pub qemu_version: String,
    /// Runs per measurement.
    pub rounds: usize,
    /// The measurements.
    pub rows: Vec<BenchRow>,
    /// Our server's counters at the end.
    pub ours_stats: StatsSnapshot,
}

impl BenchReport {
    /// The row named `name`.
    pub fn row(&self, name: &str) -> Option<&BenchRow> {
        self.rows.iter().find(|r| r.name == name)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "NBD server benchmark, 127.0.0.1 TCP, client qemu-img; best of {} runs per cell, servers alternating",
            self.rounds
        )?;
        writeln!(
            f,
            "qemu-nbd = {} -f raw --cache=writeback --aio=threads; ours = FileDevice (pread/pwrite, page cache);",
            self.qemu_version
        )?;
        writeln!(
            f,
            "(protected) = ProtectedDevice: FileDevice + dirty bitmap + activity log + range lock + gate, no-op sink"
        )?;
        writeln!(
            f,
            "{:<30} {:>9} {:>7} {:>7} {:>6}   {:>9} {:>7} {:>7} {:>6}   {:>9}",
            "test",
            "qemu op/s",
            "MB/s",
            "mean µs",
            "cpu µs",
            "ours op/s",
            "MB/s",
            "mean µs",
            "cpu µs",
            "ours/qemu"
        )?;
        for r in self.rows.iter().filter(|r| r.ours.ops > 1) {
            writeln!(
                f,
                "{:<30} {:>9.0} {:>7.1} {:>7.1} {:>6.1}   {:>9.0} {:>7.1} {:>7.1} {:>6.1}   {:>9.2}",
                r.name,
                r.qemu.ops_per_sec(),
                r.qemu.mb_per_sec(),
                r.qemu.mean_us(),
                r.qemu.cpu_us_per_op(),
                r.ours.ops_per_sec(),
                r.ours.mb_per_sec(),
                r.ours.mean_us(),
                r.ours.cpu_us_per_op(),
                r.ratio()
            )?;
        }
        // Whole-file copies: seconds and server CPU seconds instead of per-request figures.
        for r in self.rows.iter().filter(|r| r.ours.ops <= 1) {
            writeln!(
                f,
                "{:<30} {:>9} {:>7.1} {:>6.2}s {:>5.2}s   {:>9} {:>7.1} {:>6.2}s {:>5.2}s   {:>9.2}",
                format!("{} ({} MiB)", r.name, r.ours.bytes >> 20),
                "-",
                r.qemu.mb_per_sec(),
                r.qemu.seconds,
                r.qemu.cpu_seconds,
                "-",
                r.ours.mb_per_sec(),
                r.ours.seconds,
                r.ours.cpu_seconds,
                r.ratio()
            )?;
        }
        writeln!(
            f,
            "(mean µs = wall time per request, the latency at depth 1; cpu µs = server CPU per request)"
        )?;
        let s = &self.ours_stats;
        writeln!(
            f,
            "ours served {} requests, {:.0}% on the inline fast path, {} errors, {} inline-breaker trips",
            s.requests,
            100.0 * s.inline as f64 / s.requests.max(1) as f64,
            s.errors,
            s.breaker_trips
        )?;
        if let Some(r) = self.row(CASES[0].name) {
            writeln!(
                f,
                "4 KiB depth-1 write mean latency: qemu-nbd {:.1} µs, ours {:.1} µs, ours/qemu {:.2} (target <= 1.10)",
                r.qemu.mean_us(),
                r.ours.mean_us(),
                r.ours.mean_us() / r.qemu.mean_us()
            )?;
        }
        let seq: Vec<String> = self
            .rows
            .iter()
            .filter(|r| r.name.starts_with("convert") || r.name == CASES[2].name)
            .map(|r| format!("{} {:.2}", r.name, r.ratio()))
            .collect();
        if !seq.is_empty() {
            writeln!(
                f,
                "sequential throughput ours/qemu: {} (target >= 0.70)",
                seq.join(", ")
            )?;
        }
        Ok(())
    }
}

/// A `qemu-img bench` case.
struct Case {
    name: &'static str,
    write: bool,
    size: &'static str,
    bytes: u64,
    depth: u32,
}

const CASES: [Case; 4] = [
    Case {
        name: "write 4k depth 1",
        write: true,
        size: "4k",
        bytes: 4096,
        depth: 1,
    },
    Case {
        name: "write 4k depth 16",
        write: true,
        size: "4k",
        bytes: 4096,
        depth: 16,
    },
    Case {
        name: "write 64k depth 1",
        write: true,
        size: "64k",
        bytes: 65536,
        depth: 1,
    },
    Case {
        name: "read 4k depth 1",
        write: false,
        size: "4k",
        bytes: 4096,
        depth: 1,
    },
];

/// Deletes the scratch directory whatever happens.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bench_err(what: impl Into<String>) -> NbdError {
    NbdError::Bench(what.into())
}

/// Fills `path` with `size` bytes of cheap pseudo-random data (not zero, not compressible
/// into holes), then fdatasyncs it.
pub(crate) fn fill_file(path: &Path, size: u64, seed: u64) -> Result<(), NbdError> {
    let mut f = std::fs::File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut x = seed | 1;
    let mut left = size;
    while left > 0 {
        for chunk in buf.chunks_exact_mut(8) {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_data()?;
    Ok(())
}

/// Creates `path` with `size` bytes allocated (unwritten extents: cheap, reads as zeroes),
/// or sparse where the filesystem cannot preallocate.
pub(crate) fn prealloc_file(path: &Path, size: u64) -> Result<(), NbdError> {
    let f = std::fs::File::create(path)?;
    if rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, size).is_err() {
        f.set_len(size)?;
    }
    f.sync_all()?;
    Ok(())
}

/// User + system CPU seconds of a process (`"self"` or a pid), from `/proc/<pid>/stat`
/// (clock ticks of 1/100 s: USER_HZ is 100 on Linux).
pub(crate) fn proc_cpu(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

pub(crate) fn free_port() -> Result<u16, NbdError> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub(crate) async fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<(), NbdError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(bench_err(format!("qemu-nbd exited early: {status}")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(bench_err("qemu-nbd did not start listening within 10 s"))
}

/// `qemu-img` arguments copying the raw file `src` into the existing raw target `url`
/// (`-n`: the export is not created, only written).
pub(crate) fn convert_into_args(src: &str, url: &str) -> [String; 8] {
    ["convert", "-n", "-f", "raw", "-O", "raw", src, url].map(String::from)
}

pub(crate) async fn run_cmd(program: &str, args: &[String]) -> Result<(f64, String), NbdError> {
    let start = Instant::now();
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|e| bench_err(format!("cannot run {program}: {e}")))?;
    let secs = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(bench_err(format!(
            "{program} {} failed: {}{}",
            args.join(" "),
            stdout,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok((secs, stdout))
}

/// `qemu-img bench` against `url`; returns the run time it reports.
async fn qemu_img_bench(url: String, case: &Case, count: u32) -> Result<f64, NbdError> {
    let mut args: Vec<String> = vec!["bench".into()];
    if case.write {
        args.push("-w".into());
    }
    for a in ["-t", "none", "-f", "raw", "-s", case.size] {
        args.push(a.into());
    }
    args.extend([
        "-d".into(),
        case.depth.to_string(),
        "-c".into(),
        count.to_string(),
        url,
    ]);
    let (_, out) = run_cmd("qemu-img", &args).await?;
    // "Run completed in 1.234 seconds."
    out.split("Run completed in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| bench_err(format!("unexpected qemu-img bench output: {out}")))
}

/// A server under test: where to reach it and whose CPU to count.
struct Target {
    url: String,
    pid: String,
}

/// Runs `job(url)` against each target `rounds` times, rotating who goes first; returns
/// per target (best wall seconds, least server CPU seconds).
async fn measure<F, Fut>(
    targets: &[&Target],
    rounds: usize,
    job: F,
) -> Result<Vec<(f64, f64)>, NbdError>
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<f64, NbdError>>,
{
    let mut best = vec![(f64::MAX, f64::MAX); targets.len()];
    for r in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + r) % targets.len();
            let t = targets[i];
            let cpu0 = proc_cpu(&t.pid).unwrap_or(0.0);
            let wall = job(t.url.clone()).await?;
            let cpu = proc_cpu(&t.pid).unwrap_or(0.0) - cpu0;
            best[i] = (best[i].0.min(wall), best[i].1.min(cpu));
        }
    }
    Ok(best)
}

/// Runs the benchmark (about 1–2 minutes with the defaults); removes its files.
pub async fn run(opts: &BenchOpts) -> Result<BenchReport, NbdError> {
    let (_, version) = run_cmd("qemu-nbd", &["--version".to_string()]).await?;
    let qemu_version = version
        .lines()
        .next()
        .unwrap_or("qemu-nbd")
        .trim()
        .to_string();
    let dir = opts
        .dir
        .join(format!("bulwark-nbd-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let scratch = Scratch(dir.clone());
    let size = opts.image_size.max(1 << 20);
    let ours_img = dir.join("ours.img");
    let qemu_img = dir.join("qemu.img");
    let prot_img = dir.join("protected.img");
    let src_img = dir.join("src.raw");
    let out_img = dir.join("out.raw");
    {
        let (a, b, c, d) = (
            ours_img.clone(),
            qemu_img.clone(),
            prot_img.clone(),
            src_img.clone(),
        );
        let (protected, convert) = (opts.protected, !opts.skip_convert);
        // The exports are preallocated alike (both servers see the same extent state);
        // only the convert source needs real data.
        tokio::task::spawn_blocking(move || -> Result<(), NbdError> {
            prealloc_file(&a, size)?;
            prealloc_file(&b, size)?;
            if protected {
                prealloc_file(&c, size)?;
            }
            if convert {
                fill_file(&d, size, 7)?;
            }
            Ok(())
        })
        .await
        .map_err(|e| bench_err(e.to_string()))??;
    }

    // Our server, in this process.
    let registry = ExportRegistry::new();
    registry.add("bench", Arc::new(FileDevice::open(&ours_img, false)?))?;
    if opts.protected {
        let (tracker, _) = DirtyTracker::open(
            DirtyPaths::in_dir(&dir, "protected"),
            size,
            DirtyConfig::default(),
        )?;
        let dev = ProtectedDevice::new(
            FileDevice::open(&prot_img, false)?,
            Arc::new(tracker),
            Arc::new(NullSink),
            CompletionGate::new(),
        )?;
        registry.add("protected", Arc::new(dev))?;
    }
    let server = NbdServer::bind("127.0.0.1:0", registry, ServerConfig::default()).await?;
    let addr = server.local_addr()?;
    let stats = server.stats();
    let stop = CancellationToken::new();
    let server_task = tokio::spawn(server.run(stop.clone()));

    // qemu-nbd on the same disk.
    let port = free_port()?;
    let mut qemu = Command::new("qemu-nbd")
        .args([
            "-f",
            "raw",
            "--cache=writeback",
            "--aio=threads",
            "--discard=unmap",
        ])
        .args(["-b", "127.0.0.1", "-p", &port.to_string(), "-x", "bench"])
        .args(["--persistent", "--shared=8"])
        .arg(&qemu_img)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| bench_err(format!("cannot start qemu-nbd: {e}")))?;
    let qemu_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let qemu_t = Target {
        url: format!("nbd://{qemu_addr}/bench"),
        pid: qemu.id().map(|p| p.to_string()).unwrap_or_default(),
    };
    let ours_t = Target {
        url: format!("nbd://{addr}/bench"),
        pid: "self".into(),
    };
    let prot_t = Target {
        url: format!("nbd://{addr}/protected"),
        pid: "self".into(),
    };

    let result = async {
        wait_listening(qemu_addr, &mut qemu).await?;
        let rounds = opts.rounds.max(1);
        let n = opts.count.max(1);
        let mut rows = Vec::new();
        for case in &CASES {
            let with_prot = opts.protected && case.write;
            let targets: Vec<&Target> = if with_prot {
                vec![&qemu_t, &ours_t, &prot_t]
            } else {
                vec![&qemu_t, &ours_t]
            };
            let res = measure(&targets, rounds, |url| qemu_img_bench(url, case, n)).await?;
            let m = |(s, c): (f64, f64)| Measure {
                seconds: s,
                cpu_seconds: c,
                ops: u64::from(n),
                bytes: u64::from(n) * case.bytes,
            };
            rows.push(BenchRow {
                name: case.name.to_string(),
                qemu: m(res[0]),
                ours: m(res[1]),
            });
            if with_prot {
                rows.push(BenchRow {
                    name: format!("{} (protected)", case.name),
                    qemu: m(res[0]),
                    ours: m(res[2]),
                });
            }
        }
        if !opts.skip_convert {
            let src = src_img.display().to_string();
            let out = out_img.display().to_string();
            let m = |(s, c): (f64, f64)| Measure {
                seconds: s,
                cpu_seconds: c,
                ops: 1,
                bytes: size,
            };
            let into = |url: String| {
                let args = convert_into_args(&src, &url);
                async move { run_cmd("qemu-img", &args).await.map(|r| r.0) }
            };
            let res = measure(&[&qemu_t, &ours_t], rounds, into).await?;
            rows.push(BenchRow {
                name: "convert file -> nbd".into(),
                qemu: m(res[0]),
                ours: m(res[1]),
            });
            let outof = |url: String| {
                let args =
                    ["convert", "-f", "raw", "-O", "raw", &url, out.as_str()].map(String::from);
                let out_img = out_img.clone();
                async move {
                    let r = run_cmd("qemu-img", &args).await.map(|r| r.0);
                    let _ = std::fs::remove_file(&out_img);
                    r
                }
            };
            let res = measure(&[&qemu_t, &ours_t], rounds, outof).await?;
            rows.push(BenchRow {
                name: "convert nbd -> file".into(),
                qemu: m(res[0]),
                ours: m(res[1]),
            });
        }
        Ok::<_, NbdError>(rows)
    }
    .await;

    let _ = qemu.kill().await;
    stop.cancel();
    match tokio::time::timeout(Duration::from_secs(10), server_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "bench server failed"),
        Ok(Err(e)) => tracing::warn!(error = %e, "bench server task failed"),
        Err(_) => tracing::warn!("bench server did not stop within 10 s"),
    }
    drop(scratch);
    Ok(BenchReport {
        qemu_version,
        rounds: opts.rounds.max(1),
        rows: result?,
        ours_stats: stats.snapshot(),
    })
}
