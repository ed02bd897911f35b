//! The `bulwark bench journal` benchmark: ingest against raw writes (and the append →
//! durable latency), view open time and index memory against journal size, view reads
//! against replica reads. Every figure is a ratio to a baseline measured in the same run
//! on the same disk, because the machines are shared and noisy (DESIGN §11).

use std::fmt;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};

use super::error::io_at;
use super::{CheckpointKind, Journal, JournalConfig, JournalError, Record};

type Result<T, E = JournalError> = std::result::Result<T, E>;

/// How big a run to make.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Where to put the files (deleted at the end). Use the disk the journal will use.
    pub dir: PathBuf,
    /// 1.0 is the full run: 1 GiB ingested per record size, journals of 1 GiB and 8 GiB
    /// over a 4 GiB replica (~14 GB of disk at the peak). Every size scales with it; the
    /// smoke test uses 1/1024.
    pub scale: f64,
    /// Repeats of each ingest measurement; the median is reported.
    pub repeats: usize,
}

impl BenchOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BenchOptions {
            dir: dir.into(),
            scale: 1.0,
            repeats: 3,
        }
    }

    /// Tiny sizes, one repeat: checks the benchmark runs, measures nothing useful.
    pub fn quick(dir: impl Into<PathBuf>) -> Self {
        BenchOptions {
            dir: dir.into(),
            scale: 1.0 / 1024.0,
            repeats: 1,
        }
    }

    fn bytes(&self, full: u64, min: u64) -> u64 {
        (((full as f64) * self.scale) as u64).max(min) & !4095
    }
}

#[derive(Debug, Clone)]
pub struct IngestRow {
    pub record_size: usize,
    /// One `sync` (journal) / `fdatasync` (raw same) per this many bytes.
    pub group_bytes: u64,
    pub bytes: u64,
    /// Journal: append every record, `request_sync` (not waited for) every
    /// `group_bytes`, one blocking `sync` at the end.
    pub journal_mbps: f64,
    /// Time from the start of a record's `append` to the moment the durable seq covered
    /// it (as a thread waiting on [`super::Durability`] saw it): median and 99th
    /// percentile over the records of the run. This is the acknowledgement latency of
    /// the replication receiver while ingest runs flat out.
    pub durable_p50: Duration,
    pub durable_p99: Duration,
    /// Raw file, 1 MiB writes, `fdatasync` every `group_bytes` (same cadence).
    pub raw_mbps: f64,
    /// Raw file, 1 MiB writes, one `fdatasync` at the end.
    pub raw_once_mbps: f64,
}

#[derive(Debug, Clone)]
pub struct ViewRow {
    pub journal_bytes: u64,
    pub records: u64,
    pub checkpoints: usize,
    /// `Journal::open`: the one full scan (CRC of every record) at agent start.
    pub journal_open: Duration,
    pub view_open_median: Duration,
    pub view_open_max: Duration,
    pub index_entries: u64,
    pub index_bytes: u64,
}

#[derive(Debug, Clone)]
pub struct ReadRow {
    pub journal_bytes: u64,
    pub pattern: &'static str,
    pub view_mbps: f64,
    pub replica_mbps: f64,
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub dir: PathBuf,
    pub replica_bytes: u64,
    pub ingest: Vec<IngestRow>,
    pub views: Vec<ViewRow>,
    pub reads: Vec<ReadRow>,
}

const MIB: f64 = 1024.0 * 1024.0;

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / MIB / d.as_secs_f64().max(1e-9)
}

fn gib(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    } else {
        format!("{:.1} MiB", b as f64 / MIB)
    }
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "journal benchmark in {}", self.dir.display())?;
        writeln!(
            f,
            "\ningest, MB/s = MiB/s: journal (pipelined: a sync requested every `group` bytes, \
             not waited for) vs raw 1 MiB writes with fdatasync at the same cadence, and vs raw \
             with one fdatasync at the end; append -> durable latency p50/p99"
        )?;
        writeln!(
            f,
            "{:>8} {:>9} {:>10} {:>10} {:>10} {:>8} {:>14} {:>8} {:>10} {:>10}",
            "record",
            "group",
            "bytes",
            "journal",
            "raw same",
            "ratio",
            "raw 1 sync",
            "ratio",
            "p50 ms",
            "p99 ms"
        )?;
        for r in &self.ingest {
            writeln!(
                f,
                "{:>8} {:>9} {:>10} {:>10.0} {:>10.0} {:>8.2} {:>14.0} {:>8.2} {:>10.1} {:>10.1}",
                size_label(r.record_size),
                gib(r.group_bytes),
                gib(r.bytes),
                r.journal_mbps,
                r.raw_mbps,
                r.journal_mbps / r.raw_mbps,
                r.raw_once_mbps,
                r.journal_mbps / r.raw_once_mbps,
                r.durable_p50.as_secs_f64() * 1e3,
                r.durable_p99.as_secs_f64() * 1e3,
            )?;
        }
        writeln!(
            f,
            "\nview open and index (random 4-64 KiB writes over a {} replica)",
            gib(self.replica_bytes)
        )?;
        writeln!(
            f,
            "{:>9} {:>9} {:>6} {:>13} {:>11} {:>9} {:>9} {:>10} {:>9} {:>9}",
            "journal",
            "records",
            "ckpts",
            "journal open",
            "view open",
            "max",
            "entries",
            "index",
            "B/entry",
            "B/record"
        )?;
        for r in &self.views {
            writeln!(
                f,
                "{:>9} {:>9} {:>6} {:>11.0}ms {:>9.1}us {:>7.1}us {:>9} {:>10} {:>9.1} {:>9.1}",
                gib(r.journal_bytes),
                r.records,
                r.checkpoints,
                r.journal_open.as_secs_f64() * 1e3,
                r.view_open_median.as_secs_f64() * 1e6,
                r.view_open_max.as_secs_f64() * 1e6,
                r.index_entries,
                gib(r.index_bytes),
                r.index_bytes as f64 / r.index_entries.max(1) as f64,
                r.index_bytes as f64 / r.records.max(1) as f64,
            )?;
        }
        writeln!(
            f,
            "\nreads through a view at the newest checkpoint (warm page cache)"
        )?;
        writeln!(
            f,
            "{:>9} {:>14} {:>10} {:>10} {:>8}",
            "journal", "pattern", "view", "replica", "ratio"
        )?;
        for r in &self.reads {
            writeln!(
                f,
                "{:>9} {:>14} {:>10.0} {:>10.0} {:>8.2}",
                gib(r.journal_bytes),
                r.pattern,
                r.view_mbps,
                r.replica_mbps,
                r.view_mbps / r.replica_mbps
            )?;
        }
        Ok(())
    }
}

fn size_label(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{} MiB", n >> 20)
    } else {
        format!("{} KiB", n >> 10)
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn remove_dir(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_at("remove", p, e)),
    }
}

/// Runs the whole benchmark; every file it makes is removed before it returns.
pub fn run(opts: &BenchOptions) -> Result<BenchReport> {
    let root = opts
        .dir
        .join(format!("bulwark-journal-bench-{}", std::process::id()));
    remove_dir(&root)?;
    std::fs::create_dir_all(&root).map_err(|e| io_at("create", &root, e))?;
    let r = run_in(opts, &root);
    let cleanup = remove_dir(&root);
    let report = r?;
    cleanup?;
    Ok(report)
}

fn run_in(opts: &BenchOptions, root: &Path) -> Result<BenchReport> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6a6f75726e616c);
    // Incompressible data; records are slices of it at random offsets.
    let mut pool = vec![0u8; 32 << 20];
    rng.fill_bytes(&mut pool);
    let mut report = BenchReport {
        dir: opts.dir.clone(),
        replica_bytes: 0,
        ingest: Vec::new(),
        views: Vec::new(),
        reads: Vec::new(),
    };
    ingest_rows(opts, root, &pool, &mut report)?;
    views_and_reads(opts, root, &pool, &mut rng, &mut report)?;
    Ok(report)
}

fn ingest_rows(
    opts: &BenchOptions,
    root: &Path,
    pool: &[u8],
    report: &mut BenchReport,
) -> Result<()> {
    let ingest_bytes = opts.bytes(1 << 30, 8 << 20);
    // 4 MiB groups: ~100 syncs/s at disk speed, each ack covering ~10 ms of writes.
    // 32 MiB groups show what the cadence itself costs.
    for &(size, group) in &[
        (4usize << 10, 4u64 << 20),
        (64 << 10, 4 << 20),
        (1 << 20, 4 << 20),
        (64 << 10, 32 << 20),
        (1 << 20, 32 << 20),
    ] {
        let (mut j, mut raw, mut once) = (Vec::new(), Vec::new(), Vec::new());
        let (mut p50, mut p99) = (Vec::new(), Vec::new());
        for rep in 0..opts.repeats.max(1) {
            raw.push(raw_write(root, pool, ingest_bytes, group)?);
            let r = journal_ingest(root, pool, size, ingest_bytes, group, rep as u64)?;
            j.push(r.mbps);
            p50.push(r.p50.as_secs_f64());
            p99.push(r.p99.as_secs_f64());
            once.push(raw_write(root, pool, ingest_bytes, u64::MAX)?);
        }
        report.ingest.push(IngestRow {
            record_size: size,
            group_bytes: group,
            bytes: ingest_bytes,
            journal_mbps: median(j),
            durable_p50: Duration::from_secs_f64(median(p50)),
            durable_p99: Duration::from_secs_f64(median(p99)),
            raw_mbps: median(raw),
            raw_once_mbps: median(once),
        });
    }
    Ok(())
}

/// Sequential 1 MiB writes of `bytes`, `fdatasync` every `group` bytes and at the end.
fn raw_write(root: &Path, pool: &[u8], bytes: u64, group: u64) -> Result<f64> {
    let path = root.join("raw");
    let mut f = File::create(&path).map_err(|e| io_at("create", &path, e))?;
    let t = Instant::now();
    let (mut done, mut since) = (0u64, 0u64);
    while done < bytes {
        let n = (bytes - done).min(1 << 20) as usize;
        let at = (done as usize) % (pool.len() - n);
        f.write_all(&pool[at..at + n])
            .map_err(|e| io_at("write", &path, e))?;
        done += n as u64;
        since += n as u64;
        if since >= group {
            f.sync_data().map_err(|e| io_at("fdatasync", &path, e))?;
            since = 0;
        }
    }
    f.sync_data().map_err(|e| io_at("fdatasync", &path, e))?;
    let d = t.elapsed();
    drop(f);
    std::fs::remove_file(&path).map_err(|e| io_at("remove", &path, e))?;
    Ok(mbps(bytes, d))
}

struct Ingest {
    mbps: f64,
    p50: Duration,
    p99: Duration,
}

/// Appends `bytes` of `size`-byte records at random offsets, asking for a sync every
/// `group` bytes without waiting (the replication receiver's pattern), and waits once at
/// the end. A second thread watches the durable seq to time each record's way to disk.
fn journal_ingest(
    root: &Path,
    pool: &[u8],
    size: usize,
    bytes: u64,
    group: u64,
    seed: u64,
) -> Result<Ingest> {
    let dir = root.join("ingest");
    remove_dir(&dir)?;
    let disk = 64u64 << 30;
    let mut cfg = JournalConfig::new(1, disk);
    // Leave room for two groups in flight, or back-pressure would impose its own cadence
    // (a sync every `max_unsynced / 2`) on the 32 MiB rows.
    cfg.max_unsynced = cfg.max_unsynced.max(2 * group);
    let mut j = Journal::open(&dir, root.join("ingest.replica"), cfg)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = bytes / size as u64;
    let per_group = (group / size as u64).max(1);
    let durability = j.durability();
    let watcher = std::thread::spawn(move || {
        // (durable seq, when it was seen), one per completed sync.
        let mut seen: Vec<(u64, Instant)> = Vec::new();
        let mut d = durability.durable_seq();
        while d < n {
            match durability.wait_durable(d + 1, Duration::from_secs(1)) {
                Ok(x) if x > d => {
                    seen.push((x, Instant::now()));
                    d = x;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        seen
    });
    let mut started = Vec::with_capacity(n as usize);
    let t = Instant::now();
    for i in 0..n {
        let off = rng.random_range(0..(disk - size as u64) / 4096) * 4096;
        let at = rng.random_range(0..(pool.len() - size) / 8) * 8;
        started.push(Instant::now());
        j.append(Record::write(i + 1, 0, off, &pool[at..at + size]))?;
        if (i + 1) % per_group == 0 {
            j.request_sync()?;
        }
    }
    j.sync()?;
    let d = t.elapsed();
    drop(j);
    let seen = watcher
        .join()
        .map_err(|_| JournalError::Config("the durability watcher panicked".into()))?;
    let mut lat = Vec::with_capacity(started.len());
    let mut k = 0;
    for (i, s) in started.iter().enumerate() {
        let seq = i as u64 + 1;
        while k < seen.len() && seen[k].0 < seq {
            k += 1;
        }
        if let Some(&(_, at)) = seen.get(k) {
            lat.push(at.saturating_duration_since(*s));
        }
    }
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    remove_dir(&dir)?;
    let rp = root.join("ingest.replica");
    std::fs::remove_file(&rp).map_err(|e| io_at("remove", &rp, e))?;
    Ok(Ingest {
        mbps: mbps(n * size as u64, d),
        p50: pct(0.5),
        p99: pct(0.99),
    })
}

fn views_and_reads(
    opts: &BenchOptions,
    root: &Path,
    pool: &[u8],
    rng: &mut rand::rngs::StdRng,
    report: &mut BenchReport,
) -> Result<()> {
    let disk = opts.bytes(4 << 30, 16 << 20);
    report.replica_bytes = disk;
    let replica = root.join("replica");
    {
        let f = File::create(&replica).map_err(|e| io_at("create", &replica, e))?;
        let mut at = 0u64;
        while at < disk {
            let n = (disk - at).min(1 << 20) as usize;
            let p = (at as usize / 4096 * 4096) % (pool.len() - n);
            f.write_all_at(&pool[p..p + n], at)
                .map_err(|e| io_at("write", &replica, e))?;
            at += n as u64;
        }
        f.sync_data().map_err(|e| io_at("fdatasync", &replica, e))?;
    }
    let dir = root.join("journal");
    let cfg = JournalConfig::new(2, disk);
    let mut j = Journal::open(&dir, &replica, cfg.clone())?;
    let mut seq = 0u64;
    let mut ckpt = 0u64;
    for target in [opts.bytes(1 << 30, 8 << 20), opts.bytes(8 << 30, 64 << 20)] {
        while j.stats().bytes_used < target {
            for _ in 0..256 {
                let len = rng.random_range(1..=16u64) * 4096;
                let off = rng.random_range(0..(disk - len) / 4096) * 4096;
                let at = rng.random_range(0..(pool.len() - len as usize) / 8) * 8;
                seq += 1;
                j.append(Record::write(seq, 0, off, &pool[at..at + len as usize]))?;
            }
            seq += 1;
            ckpt += 1;
            j.append(Record::checkpoint(
                seq,
                ckpt as i64 * 1000,
                ckpt,
                CheckpointKind::Scheduled,
                None,
            ))?;
            j.sync()?;
        }
        drop(j);
        let t = Instant::now();
        j = Journal::open(&dir, &replica, cfg.clone())?;
        let journal_open = t.elapsed();
        let st = j.stats();
        let cps = j.checkpoints();
        let mut times = Vec::with_capacity(1000);
        for i in 0..1000 {
            let c = &cps[i * cps.len() / 1000];
            let t = Instant::now();
            let v = j.open_view(c.id)?;
            times.push(t.elapsed());
            drop(v);
        }
        times.sort();
        report.views.push(ViewRow {
            journal_bytes: st.bytes_used,
            records: st.records,
            checkpoints: cps.len(),
            journal_open,
            view_open_median: times[times.len() / 2],
            view_open_max: times[times.len() - 1],
            index_entries: st.index.entries + st.index.mark_extents,
            index_bytes: st.index.bytes,
        });
        let newest = cps.last().map(|c| c.id).unwrap_or(0);
        let view = j.open_view(newest)?;
        let rf = File::open(&replica).map_err(|e| io_at("open", &replica, e))?;
        // Random 4 KiB: the same offsets through the view and straight from the file.
        let n = ((disk / 4096) / 4).clamp(1000, 200_000);
        let offs: Vec<u64> = (0..n)
            .map(|_| rng.random_range(0..disk / 4096) * 4096)
            .collect();
        let mut b = vec![0u8; 4096];
        let t = Instant::now();
        for &o in &offs {
            view.read_at(&mut b, o)?;
        }
        let vt = t.elapsed();
        let t = Instant::now();
        for &o in &offs {
            rf.read_exact_at(&mut b, o)
                .map_err(|e| io_at("read", &replica, e))?;
        }
        let rt = t.elapsed();
        report.reads.push(ReadRow {
            journal_bytes: st.bytes_used,
            pattern: "random 4 KiB",
            view_mbps: mbps(n * 4096, vt),
            replica_mbps: mbps(n * 4096, rt),
        });
        let mut b = vec![0u8; 1 << 20];
        let t = Instant::now();
        let mut o = 0;
        while o + (1 << 20) <= disk {
            view.read_at(&mut b, o)?;
            o += 1 << 20;
        }
        let vt = t.elapsed();
        let t = Instant::now();
        let mut o = 0;
        while o + (1 << 20) <= disk {
            rf.read_exact_at(&mut b, o)
                .map_err(|e| io_at("read", &replica, e))?;
            o += 1 << 20;
        }
        let rt = t.elapsed();
        report.reads.push(ReadRow {
            journal_bytes: st.bytes_used,
            pattern: "seq 1 MiB",
            view_mbps: mbps(o, vt),
            replica_mbps: mbps(o, rt),
        });
        drop(view);
    }
    drop(j);
    remove_dir(&dir)?;
    std::fs::remove_file(&replica).map_err(|e| io_at("remove", &replica, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn quick_bench_runs() {
        let d = tempfile::tempdir().unwrap();
        let r = super::run(&super::BenchOptions::quick(d.path())).unwrap();
        let text = r.to_string();
        assert!(text.contains("ingest"), "{text}");
        assert_eq!(r.ingest.len(), 5);
        assert_eq!(r.views.len(), 2);
        assert_eq!(r.reads.len(), 4);
        assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 0);
    }

    /// The full benchmark until `bulwark bench journal` is wired:
    /// `BULWARK_BENCH_DIR=/tmp cargo test --release --lib agent::journal::bench -- --ignored --nocapture`
    /// (`BULWARK_BENCH_SCALE` shrinks it).
    #[test]
    #[ignore = "minutes long and ~14 GB of disk; run by hand in release"]
    fn full_bench() {
        let dir = std::env::var("BULWARK_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
        let mut opts = super::BenchOptions::new(dir);
        if let Ok(s) = std::env::var("BULWARK_BENCH_SCALE") {
            opts.scale = s.parse().unwrap();
        }
        let t = std::time::Instant::now();
        let r = super::run(&opts).unwrap();
        println!("{r}");
        println!("(bench took {:.0} s)", t.elapsed().as_secs_f64());
    }

    /// Only the ingest rows, for tuning the commit path:
    /// `BULWARK_BENCH_DIR=/tmp BULWARK_BENCH_SCALE=0.25 cargo test --release --lib
    /// agent::journal::bench::tests::ingest_only -- --ignored --nocapture`
    #[test]
    #[ignore = "minutes long; run by hand in release"]
    fn ingest_only() {
        use rand::{RngCore, SeedableRng};
        let dir = std::env::var("BULWARK_BENCH_DIR").unwrap_or_else(|_| "/tmp".into());
        let mut opts = super::BenchOptions::new(dir);
        if let Ok(s) = std::env::var("BULWARK_BENCH_SCALE") {
            opts.scale = s.parse().unwrap();
        }
        let root = opts
            .dir
            .join(format!("bulwark-ingest-bench-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let mut pool = vec![0u8; 32 << 20];
        rand::rngs::StdRng::seed_from_u64(1).fill_bytes(&mut pool);
        let mut r = super::BenchReport {
            dir: opts.dir.clone(),
            replica_bytes: 0,
            ingest: Vec::new(),
            views: Vec::new(),
            reads: Vec::new(),
        };
        let res = super::ingest_rows(&opts, &root, &pool, &mut r);
        std::fs::remove_dir_all(&root).unwrap();
        res.unwrap();
        println!("{r}");
    }
}
