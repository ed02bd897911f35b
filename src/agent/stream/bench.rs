//! `bulwark bench stream`: sender → receiver over loopback TLS into a journal on the same
//! disk, against the journal's own ingest measured in the same run (DESIGN §11: the
//! machines are shared and noisy, so ratios), and ack latency at half the measured
//! stream capacity.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{RngCore, SeedableRng};
use tokio_util::sync::CancellationToken;

use super::{
    ClientTransport, DiskSpec, Receiver, ReceiverConfig, Sender, SenderConfig, ServerTransport,
    StreamError,
};
use crate::agent::journal::{Journal, JournalConfig, Record};
use crate::agent::tls;
use crate::proto::stream::{RecordBody, StreamRecord};

const DISK: u64 = 1;
const DISK_SIZE: u64 = 1 << 30;

/// How big a run to make.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Scratch directory (certificates, journals); emptied at the end.
    pub dir: PathBuf,
    /// Bytes of write data per record size for the throughput runs.
    pub bytes: u64,
    /// Record sizes to measure.
    pub record_sizes: Vec<usize>,
    /// How long the latency run lasts, per record size.
    pub latency_run: Duration,
}

impl BenchOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BenchOptions {
            dir: dir.into(),
            bytes: 512 << 20,
            record_sizes: vec![64 << 10, 4 << 10],
            latency_run: Duration::from_secs(5),
        }
    }

    /// Tiny sizes: checks the benchmark runs, measures nothing useful.
    pub fn quick(dir: impl Into<PathBuf>) -> Self {
        BenchOptions {
            dir: dir.into(),
            bytes: 2 << 20,
            record_sizes: vec![64 << 10, 4 << 10],
            latency_run: Duration::from_millis(300),
        }
    }
}

/// One record size's figures.
#[derive(Debug, Clone)]
pub struct Row {
    pub record_size: usize,
    /// Journal alone: append + a sync every 8 MiB, MB/s of write data.
    pub journal_mb_s: f64,
    /// Through the stream (TLS, loopback) until everything is acknowledged durable.
    pub stream_mb_s: f64,
    /// Offered load of the latency run (half of `stream_mb_s`).
    pub offered_mb_s: f64,
    pub ack_p50: Duration,
    pub ack_p99: Duration,
    pub samples: usize,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub rows: Vec<Row>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:>8} {:>12} {:>12} {:>7} {:>12} {:>10} {:>10} {:>8}",
            "record",
            "journal MB/s",
            "stream MB/s",
            "ratio",
            "offered MB/s",
            "ack p50",
            "ack p99",
            "samples"
        )?;
        for r in &self.rows {
            writeln!(
                f,
                "{:>8} {:>12.1} {:>12.1} {:>7.2} {:>12.1} {:>8.2}ms {:>8.2}ms {:>8}",
                format!("{} KiB", r.record_size / 1024),
                r.journal_mb_s,
                r.stream_mb_s,
                r.stream_mb_s / r.journal_mb_s.max(f64::MIN_POSITIVE),
                r.offered_mb_s,
                r.ack_p50.as_secs_f64() * 1e3,
                r.ack_p99.as_secs_f64() * 1e3,
                r.samples
            )?;
        }
        Ok(())
    }
}

fn data_pool(size: usize) -> Vec<Vec<u8>> {
    // Incompressible data; a few buffers cycled so the run measures the stream, not
    // the random generator.
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    (0..16)
        .map(|_| {
            let mut v = vec![0u8; size];
            rng.fill_bytes(&mut v);
            v
        })
        .collect()
}

fn journal_alone(dir: PathBuf, size: usize, bytes: u64) -> Result<f64, StreamError> {
    std::fs::create_dir_all(&dir).map_err(super::io("create bench directory"))?;
    let mut j = Journal::open(
        dir.join("journal"),
        dir.join("replica.img"),
        JournalConfig::new(DISK, DISK_SIZE),
    )?;
    let pool = data_pool(size);
    let n = (bytes / size as u64).max(1);
    let t = Instant::now();
    let mut since_sync = 0usize;
    for i in 0..n {
        let off = (i * size as u64) % (DISK_SIZE - size as u64);
        j.append(Record::write(i + 1, 0, off, &pool[i as usize % pool.len()]))?;
        since_sync += size;
        if since_sync >= 8 << 20 {
            j.sync()?;
            since_sync = 0;
        }
    }
    j.sync()?;
    let secs = t.elapsed().as_secs_f64();
    Ok((n * size as u64) as f64 / 1e6 / secs)
}

struct Setup {
    sender: Sender,
    cancel: CancellationToken,
    recv: tokio::task::JoinHandle<Result<(), StreamError>>,
    recv_cancel: CancellationToken,
}

async fn setup(opts: &BenchOptions, run: &str) -> Result<Setup, StreamError> {
    let certs = opts.dir.join("certs");
    if !certs.join(tls::CA_CERT).exists() {
        tls::lab_certs(&certs, &["bench-pro".into(), "bench-rec".into()])
            .map_err(|e| StreamError::Tls(e.to_string()))?;
    }
    let tls_err = |e: tls::TlsError| StreamError::Tls(e.to_string());
    let server =
        tls::server_config(&tls::TlsFiles::in_dir(&certs, "bench-rec")).map_err(tls_err)?;
    let client =
        tls::client_config(&tls::TlsFiles::in_dir(&certs, "bench-pro")).map_err(tls_err)?;
    let listen = "127.0.0.1:0"
        .parse()
        .map_err(|_| StreamError::Config("listen address".into()))?;
    let mut rc = ReceiverConfig::new(listen, ServerTransport::Tls(server));
    rc.allow = HashMap::from([("bench-pro".to_string(), opts.dir.join(run))]);
    let receiver = Receiver::bind(rc).await?;
    let addr = receiver.local_addr()?;
    let recv_cancel = CancellationToken::new();
    let recv = tokio::spawn(receiver.run(recv_cancel.clone()));
    let mut sc = SenderConfig::new(
        "bench-pro",
        addr,
        ClientTransport::Tls {
            config: client,
            server_name: "bench-rec".into(),
        },
    );
    sc.queue_memory = 256 << 20;
    let cancel = CancellationToken::new();
    let (sender, _events) = Sender::start(
        sc,
        vec![DiskSpec {
            disk_id: DISK,
            size: DISK_SIZE,
            vpg_id: String::new(),
            fencing_generation: 0,
            generation: 1,
        }],
        cancel.clone(),
    )?;
    Ok(Setup {
        sender,
        cancel,
        recv,
        recv_cancel,
    })
}

impl Setup {
    async fn stop(self) -> Result<(), StreamError> {
        self.cancel.cancel();
        self.recv_cancel.cancel();
        self.recv
            .await
            .map_err(|e| StreamError::Protocol(format!("receiver task: {e}")))?
    }
}

fn record(seq: u64, size: usize, pool: &[Vec<u8>]) -> StreamRecord {
    let off = (seq * size as u64) % (DISK_SIZE - size as u64);
    StreamRecord {
        disk: DISK,
        seq,
        timestamp_ms: 0,
        body: RecordBody::Write {
            offset: off,
            data: pool[seq as usize % pool.len()].clone(),
        },
    }
}

fn acked(sender: &Sender) -> u64 {
    sender.stats().first().map_or(0, |s| s.acked_seq)
}

async fn stream_throughput(opts: &BenchOptions, size: usize) -> Result<f64, StreamError> {
    let s = setup(opts, &format!("tput-{size}")).await?;
    let pool = data_pool(size);
    let n = (opts.bytes / size as u64).max(1);
    let t = Instant::now();
    let window = 64u64 << 20;
    for seq in 1..=n {
        // Stay well inside the queue bound: this measures the stream, not bitmap-only.
        while (seq - acked(&s.sender)) * size as u64 > window {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        s.sender.enqueue(record(seq, size, &pool))?;
    }
    while acked(&s.sender) < n {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let secs = t.elapsed().as_secs_f64();
    s.stop().await?;
    Ok((n * size as u64) as f64 / 1e6 / secs)
}

async fn ack_latency(
    opts: &BenchOptions,
    size: usize,
    mb_s: f64,
) -> Result<(Duration, Duration, usize), StreamError> {
    let s = setup(opts, &format!("lat-{size}")).await?;
    let pool = data_pool(size);
    let per_sec = (mb_s * 1e6 / size as f64).max(1.0);
    let interval = Duration::from_secs_f64(1.0 / per_sec);
    let sent: Arc<Mutex<Vec<Instant>>> = Arc::new(Mutex::new(Vec::new()));
    let done = CancellationToken::new();
    // Samples acks every 200 µs: each newly acknowledged seq gets its latency.
    let watcher = {
        let sender = s.sender.clone();
        let sent = sent.clone();
        let done = done.clone();
        tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut seen = 0u64;
            loop {
                let a = acked(&sender);
                if a > seen {
                    let now = Instant::now();
                    let sent = sent.lock().unwrap_or_else(|e| e.into_inner());
                    for seq in seen + 1..=a {
                        if let Some(t) = sent.get(seq as usize - 1) {
                            lat.push(now.duration_since(*t));
                        }
                    }
                    seen = a;
                }
                if done.is_cancelled() && seen as usize >= sent.lock().map_or(0, |v| v.len()) {
                    return lat;
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
        })
    };
    let start = Instant::now();
    let mut seq = 0u64;
    while start.elapsed() < opts.latency_run {
        // Open loop: records go out on schedule whatever the acks do.
        let due = start + interval.mul_f64(seq as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        seq += 1;
        sent.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Instant::now());
        s.sender.enqueue(record(seq, size, &pool))?;
    }
    done.cancel();
    let mut lat = tokio::time::timeout(Duration::from_secs(60), watcher)
        .await
        .map_err(|_| StreamError::Timeout("acks of the latency run"))?
        .map_err(|e| StreamError::Protocol(format!("latency watcher: {e}")))?;
    s.stop().await?;
    lat.sort();
    let pick = |q: f64| {
        lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Ok((pick(0.5), pick(0.99), lat.len()))
}

/// Runs the benchmark. Needs a Tokio runtime with at least two worker threads.
pub async fn run(opts: &BenchOptions) -> Result<Report, StreamError> {
    std::fs::create_dir_all(&opts.dir).map_err(super::io("create bench directory"))?;
    let mut rows = Vec::new();
    for &size in &opts.record_sizes {
        let dir = opts.dir.join(format!("alone-{size}"));
        let bytes = opts.bytes;
        let journal_mb_s = tokio::task::spawn_blocking(move || journal_alone(dir, size, bytes))
            .await
            .map_err(|e| StreamError::Protocol(format!("journal bench: {e}")))??;
        let stream_mb_s = stream_throughput(opts, size).await?;
        let offered = stream_mb_s / 2.0;
        let (p50, p99, samples) = ack_latency(opts, size, offered).await?;
        rows.push(Row {
            record_size: size,
            journal_mb_s,
            stream_mb_s,
            offered_mb_s: offered,
            ack_p50: p50,
            ack_p99: p99,
            samples,
        });
        for sub in ["alone", "tput", "lat"] {
            let _ = std::fs::remove_dir_all(opts.dir.join(format!("{sub}-{size}")));
        }
    }
    let _ = std::fs::remove_dir_all(opts.dir.join("certs"));
    Ok(Report { rows })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn quick_run_completes() {
        let d = tempfile::tempdir().unwrap();
        let r = run(&BenchOptions::quick(d.path())).await.unwrap();
        assert_eq!(r.rows.len(), 2);
        assert!(r
            .rows
            .iter()
            .all(|row| row.stream_mb_s > 0.0 && row.samples > 0));
        assert!(r.to_string().contains("stream MB/s"));
    }
}
