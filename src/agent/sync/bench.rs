//! `bulwark bench sync`: the sync engine against rsync and against the raw read limit of
//! this machine, one run, same files, ratios (DESIGN §11: the machines are shared and
//! noisy). Everything runs on warm page cache: the files are written or copied just
//! before each run, so this measures CPU and protocol, not the disk.
//!
//! 1. Delta of a pair with 1 % of the 4 KiB blocks changed at random: ours
//!    ([`run_threaded`]) vs `rsync --no-whole-file --inplace` (default block size,
//!    `-B 4096`, default block size with `--checksum`); wall time and wire bytes. The
//!    replica is re-copied from a pristine copy before each run and compared with the
//!    source byte for byte (`cmp`) after it.
//! 2. Delta of an unchanged pair vs `cat` of both files.
//! 3. Bitmap of random dirty 64 KiB regions: wire bytes / dirty bytes.
//! 4. The same Delta between two real agents (in one process, mutual TLS over
//!    loopback): the pristine copy pre-seeded as the replica, the changed image as the
//!    protected disk; the sync runs in band through the stream into the journal (made
//!    durable), and is checked against the journal's view at a checkpoint after it. Then
//!    a Force Sync of the now-equal pair, against `cat` of both files.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{run_threaded, Extent, SourceConfig, SyncPlan, SyncSource, SyncStats, SyncTarget};
use super::{HashConfig, TargetConfig};

const BLOCK: u64 = 4096;
/// Share of the 4 KiB blocks changed for the Delta runs, in basis points (1 %).
const CHANGED_BP: u64 = 100;
/// Dirty regions of the Bitmap run.
const BITMAP_REGIONS: u64 = 2000;
const BITMAP_REGION: u64 = 64 << 10;
const SEED: u64 = 0x5eed_0005;

/// How big a run to make.
#[derive(Debug, Clone)]
pub struct BenchOpts {
    /// Scratch directory: a subdirectory is made in it and removed at the end.
    pub dir: PathBuf,
    /// Size of each disk image (rounded down to 4 KiB).
    pub size: u64,
    /// Drop the files from the page cache before every timed run, so reads come from
    /// the device (what a real replica pair looks like) instead of memory.
    pub cold: bool,
}

impl BenchOpts {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BenchOpts {
            dir: dir.into(),
            size: 2 << 30,
            cold: false,
        }
    }
}

/// One measured run.
#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub wall: Duration,
    /// Wire bytes source → target (rsync: "Total bytes sent").
    pub to_target: u64,
    /// Wire bytes target → source (rsync: "Total bytes received").
    pub to_source: u64,
    /// Ours: blocks sent × 4 KiB; rsync: "Literal data".
    pub literal: u64,
    /// Ours: blocks sent; rsync: none.
    pub blocks_sent: Option<u64>,
    /// The replica equalled the source byte for byte afterwards.
    pub exact: bool,
}

impl Row {
    pub fn wire(&self) -> u64 {
        self.to_target + self.to_source
    }

    fn ours(name: &str, wall: Duration, st: &SyncStats, block: u64, exact: bool) -> Self {
        Row {
            name: name.into(),
            wall,
            to_target: st.bytes_to_target,
            to_source: st.bytes_to_source,
            literal: st.blocks_sent * block,
            blocks_sent: Some(st.blocks_sent),
            exact,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Report {
    pub size: u64,
    pub dir: PathBuf,
    pub cold: bool,
    pub changed_blocks: u64,
    pub rsync_version: String,
    pub ours_delta: Row,
    pub rsync_default: Row,
    pub rsync_4k: Row,
    pub rsync_checksum: Row,
    pub ours_unchanged: Row,
    /// `cat source; cat replica` into /dev/null.
    pub cat_both: Duration,
    pub ours_bitmap: Row,
    pub dirty_bytes: u64,
    /// Between agents: the pre-seeded Delta, then a Force Sync of the equal pair. Wire
    /// bytes are both ways together (in `to_target`).
    pub agents_delta: Row,
    pub agents_unchanged: Row,
    /// Setup times (not measured against anything; shown for context).
    pub setup: Duration,
}

fn ratio(a: f64, b: f64) -> f64 {
    a / b.max(f64::MIN_POSITIVE)
}

fn target_line(
    f: &mut fmt::Formatter<'_>,
    what: &str,
    value: f64,
    le: bool,
    bound: f64,
) -> fmt::Result {
    let met = if le { value <= bound } else { value >= bound };
    writeln!(
        f,
        "target {what}: {value:.3} {} {bound}: {}",
        if le { "<=" } else { ">=" },
        if met { "met" } else { "NOT met" }
    )
}

impl Report {
    pub fn delta_vs_default(&self) -> f64 {
        ratio(
            self.ours_delta.wall.as_secs_f64(),
            self.rsync_default.wall.as_secs_f64(),
        )
    }
    pub fn delta_vs_4k(&self) -> f64 {
        ratio(
            self.ours_delta.wall.as_secs_f64(),
            self.rsync_4k.wall.as_secs_f64(),
        )
    }
    pub fn delta_vs_checksum(&self) -> f64 {
        ratio(
            self.ours_delta.wall.as_secs_f64(),
            self.rsync_checksum.wall.as_secs_f64(),
        )
    }
    pub fn wire_vs_4k(&self) -> f64 {
        ratio(self.ours_delta.wire() as f64, self.rsync_4k.wire() as f64)
    }
    /// Our throughput on an unchanged pair as a share of reading both files.
    pub fn unchanged_vs_cat(&self) -> f64 {
        ratio(
            self.cat_both.as_secs_f64(),
            self.ours_unchanged.wall.as_secs_f64(),
        )
    }
    pub fn agents_delta_vs_4k(&self) -> f64 {
        ratio(
            self.agents_delta.wall.as_secs_f64(),
            self.rsync_4k.wall.as_secs_f64(),
        )
    }
    pub fn agents_wire_vs_4k(&self) -> f64 {
        ratio(self.agents_delta.wire() as f64, self.rsync_4k.wire() as f64)
    }
    pub fn agents_unchanged_vs_cat(&self) -> f64 {
        ratio(
            self.cat_both.as_secs_f64(),
            self.agents_unchanged.wall.as_secs_f64(),
        )
    }
    pub fn bitmap_overhead(&self) -> f64 {
        ratio(self.ours_bitmap.wire() as f64, self.dirty_bytes as f64)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        writeln!(
            f,
            "bench sync: {:.0} MiB pair in {}, {} of {} 4 KiB blocks changed (1 %, seed {SEED:#x}); {}",
            mib(self.size),
            self.dir.display(),
            self.changed_blocks,
            self.size / BLOCK,
            self.rsync_version
        )?;
        if self.cold {
            writeln!(
                f,
                "page cache cold: every file was fdatasync'd and dropped from the cache \
                 (fadvise DONTNEED) before each run; setup took {:.1} s",
                self.setup.as_secs_f64()
            )?;
        } else {
            writeln!(
                f,
                "page cache warm: every file was written or copied just before its run (and \
                 fdatasync'd), so reads come from memory; setup took {:.1} s",
                self.setup.as_secs_f64()
            )?;
        }
        writeln!(
            f,
            "{:<38} {:>8} {:>14} {:>14} {:>14} {:>13} {:>9} {:>6}",
            "run", "wall s", "to target B", "to source B", "wire B", "literal B", "blocks", "exact"
        )?;
        let rows = [
            &self.ours_delta,
            &self.rsync_default,
            &self.rsync_4k,
            &self.rsync_checksum,
            &self.ours_unchanged,
            &self.ours_bitmap,
            &self.agents_delta,
            &self.agents_unchanged,
        ];
        for r in rows {
            writeln!(
                f,
                "{:<38} {:>8.3} {:>14} {:>14} {:>14} {:>13} {:>9} {:>6}",
                r.name,
                r.wall.as_secs_f64(),
                r.to_target,
                r.to_source,
                r.wire(),
                r.literal,
                r.blocks_sent.map_or("-".to_string(), |b| b.to_string()),
                if r.exact { "yes" } else { "NO" }
            )?;
        }
        writeln!(
            f,
            "{:<38} {:>8.3}   ({:.0} MB/s over both files; ours unchanged: {:.0} MB/s)",
            "cat source; cat replica > /dev/null",
            self.cat_both.as_secs_f64(),
            2.0 * self.size as f64 / 1e6 / self.cat_both.as_secs_f64().max(1e-9),
            2.0 * self.size as f64 / 1e6 / self.ours_unchanged.wall.as_secs_f64().max(1e-9),
        )?;
        writeln!(
            f,
            "bitmap: {} regions of 64 KiB, {} dirty bytes after merging overlaps",
            BITMAP_REGIONS, self.dirty_bytes
        )?;
        target_line(
            f,
            "delta wall ours/rsync (default block)",
            self.delta_vs_default(),
            true,
            0.2,
        )?;
        target_line(
            f,
            "delta wall ours/rsync -B 4096",
            self.delta_vs_4k(),
            true,
            0.2,
        )?;
        target_line(
            f,
            "delta wall ours/rsync --checksum",
            self.delta_vs_checksum(),
            true,
            0.2,
        )?;
        target_line(
            f,
            "delta wire bytes ours/rsync -B 4096 (sent+received)",
            self.wire_vs_4k(),
            true,
            1.0,
        )?;
        target_line(
            f,
            "unchanged-pair throughput ours/cat both",
            self.unchanged_vs_cat(),
            false,
            0.7,
        )?;
        target_line(
            f,
            "bitmap wire bytes/dirty bytes",
            self.bitmap_overhead(),
            true,
            1.05,
        )?;
        target_line(
            f,
            "agents: delta wall / rsync -B 4096",
            self.agents_delta_vs_4k(),
            true,
            0.2,
        )?;
        target_line(
            f,
            "agents: delta wire bytes / rsync -B 4096",
            self.agents_wire_vs_4k(),
            true,
            1.0,
        )?;
        target_line(
            f,
            "agents: unchanged-pair throughput / cat both",
            self.agents_unchanged_vs_cat(),
            false,
            0.7,
        )?;
        let all_exact = rows.iter().all(|r| r.exact);
        write!(
            f,
            "every run ended with the replica equal to the source: {}",
            if all_exact { "yes" } else { "NO" }
        )
    }
}

/// Removes the scratch directory however the run ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// xorshift64 bytes: not zero, not compressible.
fn fill_random(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_exact_mut(8) {
        let mut x = *state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *state = x;
        chunk.copy_from_slice(&x.to_le_bytes());
    }
}

fn write_random_file(path: &Path, size: u64, seed: u64) -> anyhow::Result<()> {
    let mut f = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut x = seed | 1;
    let mut left = size;
    while left > 0 {
        fill_random(&mut buf, &mut x);
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n])?;
        left -= n as u64;
    }
    f.sync_data()?;
    Ok(())
}

/// Copies `from` over `to` (truncating) and makes it durable, so no writeback of the
/// copy lands in the measured run.
fn copy_synced(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::copy(from, to)
        .with_context(|| format!("copy {} to {}", from.display(), to.display()))?;
    File::open(to)?.sync_all()?;
    Ok(())
}

/// With `cold`, makes the files durable and drops them from the page cache (clean pages
/// only, hence the sync first), so the next run reads them from the device.
fn settle(cold: bool, paths: &[&Path]) -> anyhow::Result<()> {
    if !cold {
        return Ok(());
    }
    for p in paths {
        let f = File::open(p).with_context(|| format!("open {}", p.display()))?;
        f.sync_all()?;
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed)
            .with_context(|| format!("fadvise {}", p.display()))?;
    }
    Ok(())
}

/// Byte-for-byte comparison with `cmp`.
fn same(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let st = Command::new("cmp")
        .arg("--silent")
        .arg(a)
        .arg(b)
        .status()
        .context("run cmp")?;
    match st.code() {
        Some(0) => Ok(true),
        Some(1) => Ok(false),
        _ => bail!("cmp failed: {st}"),
    }
}

fn open_rw(path: &Path) -> anyhow::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("open {}", path.display()))
}

/// One sync with our engine, both sides on their own thread.
fn ours(
    src: &Path,
    dst: &Path,
    progress: &Path,
    id: u64,
    plan: SyncPlan,
) -> anyhow::Result<(Duration, SyncStats)> {
    let _ = std::fs::remove_file(progress);
    let s_disk = open_rw(src)?;
    let t_disk = open_rw(dst)?;
    let t0 = Instant::now();
    let mut s = SyncSource::new(s_disk, SourceConfig::new(id, plan))?;
    let mut t = SyncTarget::new(t_disk, TargetConfig::new(progress))?;
    run_threaded(&mut s, &mut t)?;
    let wall = t0.elapsed();
    let _ = std::fs::remove_file(progress);
    Ok((wall, s.stats().clone()))
}

/// A number from an rsync `--stats` line such as `Total bytes sent: 1,234`.
fn stat_field(out: &str, key: &str) -> anyhow::Result<u64> {
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .with_context(|| format!("rsync --stats has no `{key}` line:\n{out}"))?;
    let digits: String = line
        .trim_start_matches(':')
        .split_whitespace()
        .next()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    digits
        .parse()
        .with_context(|| format!("rsync --stats `{key}`: `{line}`"))
}

fn rsync(name: &str, extra: &[&str], src: &Path, dst: &Path) -> anyhow::Result<Row> {
    let t0 = Instant::now();
    let out = Command::new("rsync")
        .args(["--no-whole-file", "--inplace", "--stats"])
        .args(extra)
        .arg(src)
        .arg(dst)
        .stdin(Stdio::null())
        .output()
        .context("run rsync")?;
    let wall = t0.elapsed();
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "rsync {extra:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(Row {
        name: name.into(),
        wall,
        to_target: stat_field(&text, "Total bytes sent")?,
        to_source: stat_field(&text, "Total bytes received")?,
        literal: stat_field(&text, "Literal data")?,
        blocks_sent: None,
        exact: same(src, dst)?,
    })
}

/// Overwrites `offsets` (each `len` bytes) of `path` with fresh random data.
fn scribble(path: &Path, offsets: &[u64], len: u64, seed: u64) -> anyhow::Result<()> {
    let f = open_rw(path)?;
    let mut buf = vec![0u8; len as usize];
    let mut x = seed | 1;
    for &off in offsets {
        fill_random(&mut buf, &mut x);
        f.write_all_at(&buf, off)?;
    }
    f.sync_data()?;
    Ok(())
}

/// Runs the whole benchmark; the scratch files are removed however it ends.
pub fn run(opts: &BenchOpts) -> anyhow::Result<Report> {
    let size = opts.size / BLOCK * BLOCK;
    if size < 16 << 20 {
        bail!("--size must be at least 16 MiB");
    }
    let version = Command::new("rsync")
        .arg("--version")
        .output()
        .context("rsync is needed for this benchmark")?;
    let rsync_version = String::from_utf8_lossy(&version.stdout)
        .lines()
        .next()
        .unwrap_or("rsync")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");

    let dir = opts
        .dir
        .join(format!("bulwark-bench-sync-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let scratch = Scratch(dir.clone());
    let src = dir.join("source.img");
    let pristine = dir.join("replica.orig");
    let dst = dir.join("replica.img");
    let progress = dir.join("sync.progress");

    // Setup: source, pristine replica (= source before the change), 1 % of blocks changed.
    let t_setup = Instant::now();
    write_random_file(&src, size, SEED)?;
    copy_synced(&src, &pristine)?;
    let blocks = size / BLOCK;
    let changed_blocks = (blocks * CHANGED_BP / 10_000).max(1);
    let mut rng = StdRng::seed_from_u64(SEED);
    let mut offsets: Vec<u64> =
        rand::seq::index::sample(&mut rng, blocks as usize, changed_blocks as usize)
            .into_iter()
            .map(|b| b as u64 * BLOCK)
            .collect();
    offsets.sort_unstable();
    scribble(&src, &offsets, BLOCK, SEED ^ 0xdead_beef)?;
    if same(&src, &pristine)? {
        bail!("the changed source still equals the replica");
    }
    let setup = t_setup.elapsed();

    let cold = opts.cold;
    // 1. Delta, ours.
    copy_synced(&pristine, &dst)?;
    settle(cold, &[&src, &dst])?;
    let (wall, st) = ours(&src, &dst, &progress, 1, SyncPlan::Delta(None))?;
    let hash = HashConfig::default();
    let ours_delta = Row::ours(
        "ours delta (run_threaded)",
        wall,
        &st,
        hash.block(),
        same(&src, &dst)?,
    );

    // 2. Unchanged pair (the replica now equals the source), against cat of both.
    settle(cold, &[&src, &dst])?;
    let (wall, st) = ours(&src, &dst, &progress, 2, SyncPlan::Delta(None))?;
    let ours_unchanged = Row::ours(
        "ours delta, unchanged pair",
        wall,
        &st,
        hash.block(),
        same(&src, &dst)?,
    );
    settle(cold, &[&src, &dst])?;
    let t0 = Instant::now();
    for p in [&src, &dst] {
        let st = Command::new("cat")
            .arg(p)
            .stdout(Stdio::null())
            .status()
            .context("run cat")?;
        if !st.success() {
            bail!("cat {} failed: {st}", p.display());
        }
    }
    let cat_both = t0.elapsed();

    // 1b. rsync, each from the pristine replica.
    copy_synced(&pristine, &dst)?;
    settle(cold, &[&src, &dst])?;
    let rsync_default = rsync("rsync --no-whole-file --inplace", &[], &src, &dst)?;
    copy_synced(&pristine, &dst)?;
    settle(cold, &[&src, &dst])?;
    let rsync_4k = rsync("rsync ... -B 4096", &["-B", "4096"], &src, &dst)?;
    copy_synced(&pristine, &dst)?;
    settle(cold, &[&src, &dst])?;
    let rsync_checksum = rsync("rsync ... --checksum", &["--checksum"], &src, &dst)?;

    // 3. Bitmap: the replica equals the source again; dirty random 64 KiB regions.
    std::fs::remove_file(&pristine)?;
    if !rsync_checksum.exact {
        copy_synced(&src, &dst)?;
    }
    let regions = (size / BITMAP_REGION).min(BITMAP_REGIONS.max(1));
    let mut starts: Vec<u64> = (0..regions)
        .map(|_| rng.random_range(0..(size - BITMAP_REGION) / BLOCK) * BLOCK)
        .collect();
    starts.sort_unstable();
    scribble(&src, &starts, BITMAP_REGION, SEED ^ 0xb17_3a9)?;
    let mut extents: Vec<Extent> = Vec::with_capacity(starts.len());
    for &o in &starts {
        match extents.last_mut() {
            Some(e) if o <= e.offset + e.len => {
                e.len = e.len.max(o + BITMAP_REGION - e.offset);
            }
            _ => extents.push(Extent::new(o, BITMAP_REGION)),
        }
    }
    let dirty_bytes: u64 = extents.iter().map(|e| e.len).sum();
    settle(cold, &[&src, &dst])?;
    let (wall, st) = ours(&src, &dst, &progress, 3, SyncPlan::Bitmap(extents))?;
    let ours_bitmap = Row::ours(
        "ours bitmap (run_threaded)",
        wall,
        &st,
        hash.block(),
        same(&src, &dst)?,
    );

    // 4. Between agents, from the same pair: the pristine replica pre-seeded.
    std::fs::remove_file(&dst)?;
    copy_synced(&src, &pristine)?;
    scribble(&src, &offsets, BLOCK, SEED ^ 0x000a_9e47)?;
    let (agents_delta, agents_unchanged) = std::thread::scope(|s| {
        s.spawn(|| agents::run(&dir.join("agents"), &src, &pristine, size, cold))
            .join()
            .map_err(|_| anyhow::anyhow!("the agents' bench thread panicked"))?
    })?;

    drop(scratch);
    Ok(Report {
        size,
        dir: opts.dir.clone(),
        cold,
        changed_blocks,
        rsync_version,
        ours_delta,
        rsync_default,
        rsync_4k,
        rsync_checksum,
        ours_unchanged,
        cat_both,
        ours_bitmap,
        dirty_bytes,
        agents_delta,
        agents_unchanged,
        setup,
    })
}

/// Part 4: two agents in one process.
mod agents {
    use std::path::Path;
    use std::time::{Duration, Instant};

    use anyhow::{bail, Context};

    use super::{same_as_view, Row};
    use crate::agent::host::{Agent, AgentConfig};
    use crate::proto::agent::{AgentStatus, CheckpointRequest, SyncAction, SyncOutcome};

    fn config(dir: &Path, host: &str, text: &str) -> anyhow::Result<AgentConfig> {
        Ok(AgentConfig::loopback(
            dir,
            host,
            text,
            Some(dir.join("certs")),
        )?)
    }

    async fn completed(agent: &Agent, n: u64) -> anyhow::Result<SyncOutcome> {
        let deadline = Instant::now() + Duration::from_secs(1200);
        loop {
            let st: AgentStatus = agent.status();
            let d = &st.protected[0];
            if d.sync.completed >= n && !d.owes_sync {
                return d.sync.last.clone().context("no sync outcome");
            }
            if Instant::now() > deadline {
                bail!("the sync did not finish: {:#?}", d.sync);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn row(name: &str, o: &SyncOutcome, exact: bool) -> Row {
        Row {
            name: name.into(),
            wall: Duration::from_millis(o.duration_ms),
            to_target: o.wire_bytes,
            to_source: 0,
            literal: o.data_bytes,
            blocks_sent: Some(o.blocks_sent),
            exact,
        }
    }

    pub(super) fn run(
        dir: &Path,
        src: &Path,
        pristine: &Path,
        size: u64,
        cold: bool,
    ) -> anyhow::Result<(Row, Row)> {
        std::fs::create_dir_all(dir)?;
        crate::agent::tls::lab_certs(&dir.join("certs"), &["prot".into(), "rec".into()])?;
        let storage = dir.join("storage");
        let replica = crate::agent::stream::preseed(&storage, 1, pristine, size)?;
        std::fs::remove_file(pristine)?;
        super::settle(cold, &[src, &replica])?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let (delta, unchanged, ckpt) = rt.block_on(async {
            let rec = Agent::start(config(
                dir,
                "rec",
                &format!(
                    "data_listen = '127.0.0.1:0'\n[[allow]]\nhost_name = 'prot'\nstorage = '{}'\n",
                    storage.display()
                ),
            )?)
            .await?;
            let data = rec.endpoints().data.context("no data listener")?;
            let prot = Agent::start(config(
                dir,
                "prot",
                &format!(
                    "[[disks]]\nname = 'bench'\nid = 1\nsize = {size}\npath = '{}'\n\
                     recovery_host = 'rec'\n[[peers]]\nhost_name = 'rec'\naddress = '{data}'\n",
                    src.display()
                ),
            )?)
            .await?;
            let delta = completed(&prot, 1).await?;
            super::settle(cold, &[src, &replica])?;
            prot.request_sync("bench", SyncAction::Force)?;
            let unchanged = completed(&prot, 2).await?;
            let ckpt = prot.checkpoint(&CheckpointRequest::default())?;
            let seq = ckpt.disks[0].seq;
            let deadline = Instant::now() + Duration::from_secs(60);
            while prot.status().protected[0].acked_seq < seq {
                if Instant::now() > deadline {
                    bail!("checkpoint not acknowledged");
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            prot.shutdown().await?;
            rec.shutdown().await?;
            drop((prot, rec));
            anyhow::Ok((delta, unchanged, ckpt.id))
        })?;
        drop(rt);
        let exact = same_as_view(
            src,
            &storage.join(format!("disk-{:016x}", 1)),
            1,
            size,
            ckpt,
        )?;
        Ok((
            row("agents delta (in band, pre-seeded)", &delta, exact),
            row("agents force sync, unchanged pair", &unchanged, exact),
        ))
    }
}

/// Whether the journal's view at checkpoint `ckpt` equals `src` byte for byte.
fn same_as_view(
    src: &Path,
    disk_dir: &Path,
    id: u64,
    size: u64,
    ckpt: u64,
) -> anyhow::Result<bool> {
    use crate::agent::journal::{Journal, JournalConfig};
    let j = Journal::open(
        disk_dir.join("journal"),
        disk_dir.join("replica.img"),
        JournalConfig::new(id, size),
    )?;
    let view = j.open_view(ckpt)?;
    let f = File::open(src)?;
    let mut a = vec![0u8; 4 << 20];
    let mut b = vec![0u8; 4 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(a.len() as u64) as usize;
        f.read_exact_at(&mut a[..n], off)?;
        view.read_at(&mut b[..n], off)?;
        if a[..n] != b[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rsync_stats() {
        let out = "Number of files: 1 (reg: 1)\nLiteral data: 21,474,836 bytes\n\
                   Total bytes sent: 24,123,456\nTotal bytes received: 4,321\n";
        assert_eq!(stat_field(out, "Literal data").ok(), Some(21_474_836));
        assert_eq!(stat_field(out, "Total bytes sent").ok(), Some(24_123_456));
        assert_eq!(stat_field(out, "Total bytes received").ok(), Some(4321));
        assert!(stat_field(out, "Matched data").is_err());
    }
}
