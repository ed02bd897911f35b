//! `bulwark bench nbd`: our server against `qemu-nbd` on the same disk, driven by the same
//! real client (`qemu-img bench`, `qemu-img convert`), in the same run, reported as ratios.
//!
//! Both servers serve a raw file through the page cache: ours with pread/pwrite
//! ([`FileDevice`]), qemu-nbd with `--cache=writeback --aio=threads`. FLUSH = fdatasync on
//! both. Each measurement alternates the two servers and keeps the best of `rounds` runs
//! (the machines are shared and noisy).

use std::fmt;
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
use super::server::{NbdServer, ServerConfig};
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
    /// Mean time per request in microseconds (meaningful at depth 1).
    pub fn mean_us(&self) -> f64 {
        self.seconds * 1e6 / self.ops as f64
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
}

impl BenchReport {
    fn row(&self, prefix: &str) -> Option<&BenchRow> {
        self.rows.iter().find(|r| r.name.starts_with(prefix))
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "NBD server benchmark over 127.0.0.1 TCP, client qemu-img; best of {} runs per cell",
            self.rounds
        )?;
        writeln!(
            f,
            "qemu-nbd: {} (-f raw --cache=writeback --aio=threads); ours: FileDevice (pread/pwrite, page cache); (protected) = ProtectedDevice: FileDevice + dirty bitmap + activity log + gate, no-op sink",
            self.qemu_version
        )?;
        writeln!(
            f,
            "{:<30} {:>10} {:>8} {:>8}   {:>10} {:>8} {:>8}   {:>9}",
            "test", "qemu op/s", "MB/s", "mean µs", "ours op/s", "MB/s", "mean µs", "ours/qemu"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<30} {:>10.0} {:>8.1} {:>8.1}   {:>10.0} {:>8.1} {:>8.1}   {:>9.2}",
                r.name,
                r.qemu.ops_per_sec(),
                r.qemu.mb_per_sec(),
                r.qemu.mean_us(),
                r.ours.ops_per_sec(),
                r.ours.mb_per_sec(),
                r.ours.mean_us(),
                r.ratio()
            )?;
        }
        if let Some(r) = self.row("write 4k depth 1") {
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
            .filter(|r| r.name.starts_with("convert"))
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
fn fill_file(path: &Path, size: u64, seed: u64) -> Result<(), NbdError> {
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

fn free_port() -> Result<u16, NbdError> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_listening(addr: SocketAddr, child: &mut Child) -> Result<(), NbdError> {
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

async fn run_cmd(program: &str, args: &[String]) -> Result<(f64, String), NbdError> {
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
async fn qemu_img_bench(
    url: &str,
    write: bool,
    size: &str,
    depth: u32,
    count: u32,
) -> Result<f64, NbdError> {
    let mut args: Vec<String> = vec!["bench".into()];
    if write {
        args.push("-w".into());
    }
    for a in ["-t", "none", "-f", "raw", "-s", size] {
        args.push(a.into());
    }
    args.extend([
        "-d".into(),
        depth.to_string(),
        "-c".into(),
        count.to_string(),
        url.into(),
    ]);
    let (_, out) = run_cmd("qemu-img", &args).await?;
    // "Run completed in 1.234 seconds."
    out.split("Run completed in ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<f64>().ok())
        .ok_or_else(|| bench_err(format!("unexpected qemu-img bench output: {out}")))
}

/// Runs the benchmark. Takes about a minute with the defaults; removes its files.
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
    let src_img = dir.join("src.raw");
    let out_img = dir.join("out.raw");
    let prot_img = dir.join("protected.img");
    let (a, b, c, d) = (
        ours_img.clone(),
        qemu_img.clone(),
        src_img.clone(),
        prot_img.clone(),
    );
    let (skip_convert, protected) = (opts.skip_convert, opts.protected);
    tokio::task::spawn_blocking(move || -> Result<(), NbdError> {
        fill_file(&a, size, 1)?;
        fill_file(&b, size, 1)?;
        if protected {
            fill_file(&d, size, 1)?;
        }
        if !skip_convert {
            fill_file(&c, size, 7)?;
        }
        Ok(())
    })
    .await
    .map_err(|e| bench_err(e.to_string()))??;

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
    let ours_url = format!("nbd://{}/bench", server.local_addr()?);
    let prot_url = format!("nbd://{}/protected", server.local_addr()?);
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
    let qemu_url = format!("nbd://{qemu_addr}/bench");

    let result = async {
        wait_listening(qemu_addr, &mut qemu).await?;
        let rounds = opts.rounds.max(1);
        let n = opts.count.max(1);
        let mut rows = Vec::new();
        let cases: [(&str, bool, &str, u64, u32); 4] = [
            ("write 4k depth 1", true, "4k", 4096, 1),
            ("write 4k depth 16", true, "4k", 4096, 16),
            ("write 64k depth 1", true, "64k", 65536, 1),
            ("read 4k depth 1", false, "4k", 4096, 1),
        ];
        for (name, write, bs, bytes, depth) in cases {
            let (mut q, mut o) = (f64::MAX, f64::MAX);
            for r in 0..rounds {
                // Alternate who goes first, so neither always inherits the other's
                // page-cache writeback.
                if r % 2 == 0 {
                    q = q.min(qemu_img_bench(&qemu_url, write, bs, depth, n).await?);
                    o = o.min(qemu_img_bench(&ours_url, write, bs, depth, n).await?);
                } else {
                    o = o.min(qemu_img_bench(&ours_url, write, bs, depth, n).await?);
                    q = q.min(qemu_img_bench(&qemu_url, write, bs, depth, n).await?);
                }
            }
            let m = |s| Measure {
                seconds: s,
                ops: u64::from(n),
                bytes: u64::from(n) * bytes,
            };
            rows.push(BenchRow {
                name: name.to_string(),
                qemu: m(q),
                ours: m(o),
            });
        }
        if opts.protected {
            for (name, write, bs, _, depth) in cases.into_iter().filter(|c| c.1) {
                let mut p = f64::MAX;
                for _ in 0..rounds {
                    p = p.min(qemu_img_bench(&prot_url, write, bs, depth, n).await?);
                }
                if let Some(base) = rows.iter().find(|r| r.name == name).cloned() {
                    rows.push(BenchRow {
                        name: format!("{name} (protected)"),
                        qemu: base.qemu,
                        ours: Measure {
                            seconds: p,
                            ..base.ours
                        },
                    });
                }
            }
        }
        if !opts.skip_convert {
            let src = src_img.display().to_string();
            let out = out_img.display().to_string();
            let mut conv = |name: &str, q: f64, o: f64| {
                let m = |s| Measure {
                    seconds: s,
                    ops: 1,
                    bytes: size,
                };
                rows.push(BenchRow {
                    name: name.to_string(),
                    qemu: m(q),
                    ours: m(o),
                });
            };
            let into = |url: &str| {
                ["convert", "-n", "-f", "raw", "-O", "raw", src.as_str(), url]
                    .map(String::from)
                    .to_vec()
            };
            let outof = |url: &str| {
                ["convert", "-f", "raw", "-O", "raw", url, out.as_str()]
                    .map(String::from)
                    .to_vec()
            };
            let (mut q, mut o) = (f64::MAX, f64::MAX);
            for r in 0..rounds {
                let (first, second) = if r % 2 == 0 {
                    (&qemu_url, &ours_url)
                } else {
                    (&ours_url, &qemu_url)
                };
                let a = run_cmd("qemu-img", &into(first)).await?.0;
                let b = run_cmd("qemu-img", &into(second)).await?.0;
                let (tq, to) = if r % 2 == 0 { (a, b) } else { (b, a) };
                q = q.min(tq);
                o = o.min(to);
            }
            conv("convert file -> nbd", q, o);
            let (mut q, mut o) = (f64::MAX, f64::MAX);
            for r in 0..rounds {
                let (first, second) = if r % 2 == 0 {
                    (&qemu_url, &ours_url)
                } else {
                    (&ours_url, &qemu_url)
                };
                let a = run_cmd("qemu-img", &outof(first)).await?.0;
                let _ = std::fs::remove_file(&out_img);
                let b = run_cmd("qemu-img", &outof(second)).await?.0;
                let _ = std::fs::remove_file(&out_img);
                let (tq, to) = if r % 2 == 0 { (a, b) } else { (b, a) };
                q = q.min(tq);
                o = o.min(to);
            }
            conv("convert nbd -> file", q, o);
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
    })
}
