#![allow(clippy::unwrap_used)]
//! Sync engine against a byte-array model: each kind brings a diverged replica level with
//! its source, sends no more than it must, resumes after a simulated crash, and refuses a
//! size mismatch.

use std::io;

use bulwark::agent::sync::{
    run_local, run_threaded, BlockRead, BlockWrite, Extent, HashConfig, LocalOutcome, SourceConfig,
    SyncError, SyncPlan, SyncSource, SyncStats, SyncTarget, TargetConfig,
};
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// A replica whose unflushed writes are lost in a crash. Unflushed writes are logged so
/// a flush costs what was written, not a copy of the disk.
#[derive(Clone)]
struct CrashDisk {
    live: Vec<u8>,
    durable: Vec<u8>,
    unflushed: Vec<(u64, Vec<u8>)>,
}

impl CrashDisk {
    fn new(bytes: Vec<u8>) -> Self {
        CrashDisk {
            durable: bytes.clone(),
            live: bytes,
            unflushed: Vec::new(),
        }
    }
    fn crash(&mut self) {
        self.unflushed.clear();
        self.live = self.durable.clone();
    }
}

impl BlockRead for CrashDisk {
    fn size(&self) -> io::Result<u64> {
        self.live.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.live.read_at(buf, offset)
    }
}

impl BlockWrite for CrashDisk {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.live.write_at(buf, offset)?;
        self.unflushed.push((offset, buf.to_vec()));
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        for (off, data) in self.unflushed.drain(..) {
            self.durable.write_at(&data, off)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
struct Case {
    cfg: HashConfig,
    blocks: u64,
    tail: u64,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::sample::select(vec![512u32, 1024, 4096]),
        prop::sample::select(vec![4u32, 16]),
        64u64..512,
        prop::sample::select(vec![0u64, 100]),
        any::<u64>(),
    )
        .prop_map(|(block_size, chunk_blocks, blocks, tail, seed)| Case {
            cfg: HashConfig {
                block_size,
                chunk_blocks,
            },
            blocks,
            tail,
            seed,
        })
}

impl Case {
    fn size(&self) -> usize {
        (self.blocks * self.cfg.block() + self.tail) as usize
    }
    fn bs(&self) -> usize {
        self.cfg.block_size as usize
    }
    fn rng(&self, salt: u64) -> StdRng {
        StdRng::seed_from_u64(self.seed ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// A source disk: random data with zero regions (a sparse, partly used disk).
    fn source(&self) -> Vec<u8> {
        let mut r = self.rng(1);
        let mut d = vec![0u8; self.size()];
        r.fill(&mut d[..]);
        for _ in 0..r.random_range(1..6) {
            let s = r.random_range(0..d.len());
            let e = (s + r.random_range(0..d.len() / 4)).min(d.len());
            d[s..e].fill(0);
        }
        d
    }

    /// The source diverged: random blocks changed, zeroed ranges, a stale region, byte
    /// flips inside blocks.
    fn diverge(&self, src: &[u8]) -> Vec<u8> {
        let mut r = self.rng(2);
        let mut t = src.to_vec();
        let n = t.len();
        for _ in 0..r.random_range(0..20) {
            let b = r.random_range(0..self.blocks as usize) * self.bs();
            r.fill(&mut t[b..b + self.bs()]);
        }
        for _ in 0..r.random_range(0..3) {
            let s = r.random_range(0..n);
            let e = (s + r.random_range(0..n / 8)).min(n);
            t[s..e].fill(0);
        }
        if r.random_bool(0.5) {
            let s = r.random_range(0..n);
            let e = (s + r.random_range(0..n / 8)).min(n);
            for (i, b) in t[s..e].iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31) ^ 0x5a;
            }
        }
        for _ in 0..r.random_range(0..10) {
            let i = r.random_range(0..n);
            t[i] ^= 1 << r.random_range(0..8);
        }
        t
    }

    /// Dirty ranges and a source that differs from `old` only inside them.
    fn dirty(&self, old: &[u8]) -> (Vec<Extent>, Vec<u8>) {
        let mut r = self.rng(3);
        let mut src = old.to_vec();
        let n = src.len() as u64;
        let mut ext = Vec::new();
        for _ in 0..r.random_range(1..12) {
            let off = r.random_range(0..n);
            let len = r.random_range(1..(n / 10).max(2));
            ext.push(Extent::new(off, len));
            let e = (off + len).min(n) as usize;
            if r.random_bool(0.2) {
                src[off as usize..e].fill(0);
            } else {
                r.fill(&mut src[off as usize..e]);
            }
        }
        (ext, src)
    }

    fn src_cfg(&self, id: u64, plan: SyncPlan) -> SourceConfig {
        SourceConfig {
            id,
            plan,
            hash: self.cfg,
            threads: 2,
            window: 4,
        }
    }

    fn tgt_cfg(&self, dir: &tempfile::TempDir, known_zero: bool) -> TargetConfig {
        TargetConfig {
            progress_path: dir.path().join("sync.progress"),
            known_zero,
            flush_interval: self.cfg.chunk_size(),
            batch_chunks: 8,
            window: 2,
            threads: 2,
        }
    }
}

/// One sync to completion; returns the source's stats and the replica.
fn sync(
    c: &Case,
    src: &[u8],
    tgt: CrashDisk,
    kind: SyncPlan,
    id: u64,
    known_zero: bool,
    dir: &tempfile::TempDir,
) -> (SyncStats, CrashDisk) {
    let mut s = SyncSource::new(src, c.src_cfg(id, kind)).unwrap();
    let mut t = SyncTarget::new(tgt, c.tgt_cfg(dir, known_zero)).unwrap();
    assert_eq!(
        run_local(&mut s, &mut t, None).unwrap(),
        LocalOutcome::Completed
    );
    // Both sides see the same traffic.
    assert_eq!(s.stats().bytes_to_target, t.stats().bytes_to_target);
    assert_eq!(s.stats().bytes_to_source, t.stats().bytes_to_source);
    (s.stats().clone(), t.into_disk())
}

fn differing_blocks(c: &Case, a: &[u8], b: &[u8]) -> u64 {
    a.chunks(c.bs())
        .zip(b.chunks(c.bs()))
        .filter(|(x, y)| x != y)
        .count() as u64
}

fn nonzero_blocks(c: &Case, a: &[u8]) -> u64 {
    a.chunks(c.bs())
        .filter(|x| x.iter().any(|&b| b != 0))
        .count() as u64
}

fn dirty_bytes(c: &Case, ext: &[Extent]) -> u64 {
    bulwark::agent::sync::plan::normalize(ext, c.cfg.block(), c.size() as u64)
        .iter()
        .map(|e| e.len)
        .sum()
}

fn kinds(c: &Case, src: &[u8]) -> Vec<(SyncPlan, Vec<u8>, Vec<u8>)> {
    let tgt = c.diverge(src);
    let (ext, bsrc) = c.dirty(&tgt);
    // A ranged Delta over the ranges where the divergence was put by `dirty`.
    vec![
        (SyncPlan::Full, src.to_vec(), tgt.clone()),
        (SyncPlan::Delta(None), src.to_vec(), tgt.clone()),
        (
            SyncPlan::Delta(Some(ext.clone())),
            bsrc.clone(),
            tgt.clone(),
        ),
        (SyncPlan::Bitmap(ext), bsrc, tgt),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32)
    ))]

    #[test]
    fn every_kind_makes_the_replica_exact(c in case()) {
        let src = c.source();
        for (kind, src, tgt) in kinds(&c, &src) {
            let dir = tempfile::tempdir().unwrap();
            let diff = differing_blocks(&c, &src, &tgt);
            let (st, out) = sync(&c, &src, CrashDisk::new(tgt.clone()), kind.clone(), 1, false, &dir);
            prop_assert!(out.live == src, "{kind:?} left the replica different");
            prop_assert_eq!(st.chunks_retried, 0);
            match &kind {
                SyncPlan::Delta(_) => {
                    // Exactly the differing blocks cross, no more.
                    prop_assert_eq!(st.blocks_sent + st.blocks_zeroed, diff, "{:?}", kind);
                }
                SyncPlan::Bitmap(ext) => {
                    let dirty = dirty_bytes(&c, ext);
                    prop_assert!(st.blocks_sent * c.cfg.block() <= dirty + c.cfg.block());
                    if dirty >= 64 * 1024 {
                        let ratio = st.bytes_to_target as f64 / dirty as f64;
                        prop_assert!(ratio <= 1.05, "bitmap ratio {ratio}");
                    }
                }
                SyncPlan::Full => {
                    prop_assert_eq!(st.blocks_sent, nonzero_blocks(&c, &src));
                }
            }
            // Idempotent: the same id again sends nothing; a new Delta finds nothing to
            // send; a new Bitmap resends exactly its dirty ranges.
            let (same, out) = sync(&c, &src, out, kind.clone(), 1, false, &dir);
            prop_assert!(out.live == src);
            prop_assert_eq!(same.blocks_sent + same.blocks_zeroed + same.blocks_compared, 0);
            let (again, out) = sync(&c, &src, out, SyncPlan::Delta(None), 2, false, &dir);
            prop_assert!(out.live == src);
            prop_assert_eq!(again.blocks_sent + again.blocks_zeroed, 0);
            if let SyncPlan::Bitmap(_) = &kind {
                let (re, out) = sync(&c, &src, out, kind.clone(), 3, false, &dir);
                prop_assert!(out.live == src);
                prop_assert_eq!(re.data_bytes, st.data_bytes);
            }
        }
    }

    #[test]
    fn full_on_a_zero_target_skips_zero_blocks(c in case()) {
        let src = c.source();
        let dir = tempfile::tempdir().unwrap();
        let zero = CrashDisk::new(vec![0u8; src.len()]);
        let (st, out) = sync(&c, &src, zero, SyncPlan::Full, 9, true, &dir);
        prop_assert!(out.live == src);
        prop_assert_eq!(st.blocks_sent, nonzero_blocks(&c, &src));
        prop_assert_eq!(st.blocks_zeroed, 0);
        // Payload is exactly the non-zero blocks' bytes.
        let nz: u64 = src.chunks(c.bs()).filter(|x| x.iter().any(|&b| b != 0)).map(|x| x.len() as u64).sum();
        prop_assert_eq!(st.data_bytes, nz);
    }

    #[test]
    fn interrupted_sync_resumes_exactly_and_cheaply(c in case(), at in 0.0f64..1.0) {
        let src0 = c.source();
        for (i, (kind, src, tgt)) in kinds(&c, &src0).into_iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let id = 100 + i as u64;
            // One uninterrupted run, for the message count and the byte budget.
            let (one, _) = sync(&c, &src, CrashDisk::new(tgt.clone()), kind.clone(), id, false, &tempfile::tempdir().unwrap());
            let msgs = one.msgs_to_target + one.msgs_to_source;
            let stop = ((msgs as f64 * at) as u64).max(1);

            let mut s = SyncSource::new(&src[..], c.src_cfg(id, kind.clone())).unwrap();
            let mut t = SyncTarget::new(CrashDisk::new(tgt.clone()), c.tgt_cfg(&dir, false)).unwrap();
            let first = run_local(&mut s, &mut t, Some(stop)).unwrap();
            let before = s.stats().wire_bytes();
            let mut disk = t.into_disk();
            disk.crash();
            drop(s);

            let (rest, out) = sync(&c, &src, disk, kind.clone(), id, false, &dir);
            prop_assert!(out.live == src, "{kind:?} stopped at {stop}/{msgs} ({first:?})");
            let total = before + rest.wire_bytes();
            // What a crash can cost: the work since the last persisted cursor (one flush
            // interval = one chunk here, plus the chunk being applied and the one queued)
            // and a second handshake. For runs large against that, the 1.2×.
            let slack = 3 * (c.cfg.chunk_size() + 64 * u64::from(c.cfg.chunk_blocks)) + 512;
            let budget = if one.wire_bytes() >= 10 * slack {
                one.wire_bytes() as f64 * 1.2
            } else {
                (one.wire_bytes() + slack) as f64
            };
            prop_assert!((total as f64) < budget,
                "{kind:?}: {total} bytes with a stop at {stop}/{msgs}, one run {}", one.wire_bytes());
        }
    }
}

#[test]
fn size_mismatch_is_refused_before_anything_is_written() {
    let c = Case {
        cfg: HashConfig::default(),
        blocks: 64,
        tail: 0,
        seed: 5,
    };
    let src = c.source();
    for kind in [
        SyncPlan::Full,
        SyncPlan::Delta(None),
        SyncPlan::Bitmap(vec![Extent::new(0, 4096)]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let tgt = vec![7u8; src.len() - 4096];
        let mut s = SyncSource::new(&src[..], c.src_cfg(1, kind)).unwrap();
        let mut t = SyncTarget::new(CrashDisk::new(tgt.clone()), c.tgt_cfg(&dir, false)).unwrap();
        let err = run_local(&mut s, &mut t, None).unwrap_err();
        assert!(
            matches!(err, SyncError::SizeMismatch { source_size, target_size }
                if source_size == src.len() as u64 && target_size == tgt.len() as u64),
            "{err}"
        );
        assert!(err.to_string().contains("size mismatch"));
        assert_eq!(s.stats().blocks_sent, 0);
        assert_eq!(s.stats().msgs_to_target, 1, "only Start crossed");
        assert!(t.disk().live == tgt);
        assert!(!dir.path().join("sync.progress").exists());
    }
}

/// A replica that silently corrupts the first write into one chunk: the verification
/// catches it and the chunk is resent whole.
struct FlakyDisk {
    inner: Vec<u8>,
    armed: bool,
}

impl BlockRead for FlakyDisk {
    fn size(&self) -> io::Result<u64> {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
}

impl BlockWrite for FlakyDisk {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)?;
        if std::mem::take(&mut self.armed) {
            self.inner[offset as usize] ^= 0xff;
        }
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_bad_chunk_is_caught_and_resent_whole() {
    let c = Case {
        cfg: HashConfig {
            block_size: 512,
            chunk_blocks: 8,
        },
        blocks: 256,
        tail: 0,
        seed: 11,
    };
    let src = c.source();
    for kind in [SyncPlan::Full, SyncPlan::Delta(None)] {
        let dir = tempfile::tempdir().unwrap();
        let tgt = FlakyDisk {
            inner: c.diverge(&src),
            armed: true,
        };
        let mut s = SyncSource::new(&src[..], c.src_cfg(3, kind)).unwrap();
        let mut t = SyncTarget::new(tgt, c.tgt_cfg(&dir, false)).unwrap();
        run_local(&mut s, &mut t, None).unwrap();
        assert_eq!(s.stats().chunks_retried, 1);
        assert!(t.into_disk().inner == src);
    }
}

#[test]
fn threaded_over_files_matches() {
    let c = Case {
        cfg: HashConfig::default(),
        blocks: 2048, // 8 MiB
        tail: 0,
        seed: 21,
    };
    let src = c.source();
    let tgt = c.diverge(&src);
    let dir = tempfile::tempdir().unwrap();
    let sp = dir.path().join("src.img");
    let tp = dir.path().join("tgt.img");
    std::fs::write(&sp, &src).unwrap();
    for (i, kind) in [SyncPlan::Delta(None), SyncPlan::Full]
        .into_iter()
        .enumerate()
    {
        std::fs::write(&tp, &tgt).unwrap();
        let sf = std::fs::File::open(&sp).unwrap();
        let tf = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&tp)
            .unwrap();
        let mut s = SyncSource::new(sf, c.src_cfg(40 + i as u64, kind.clone())).unwrap();
        let mut tc = TargetConfig::new(dir.path().join("p"));
        tc.batch_chunks = 2;
        let mut t = SyncTarget::new(tf, tc).unwrap();
        run_threaded(&mut s, &mut t).unwrap();
        assert_eq!(std::fs::read(&tp).unwrap(), src, "{kind:?}");
        if kind == SyncPlan::Delta(None) {
            assert_eq!(
                s.stats().blocks_sent + s.stats().blocks_zeroed,
                differing_blocks(&c, &src, &tgt)
            );
        }
    }
}

/// Rough speed check (ignored by default): Delta of a 256 MiB file pair with 1 % of the
/// 4 KiB blocks changed, both sides on their own thread.
#[test]
#[ignore]
fn delta_speed_probe() {
    let size = 256usize << 20;
    let mut r = StdRng::seed_from_u64(1);
    let mut src = vec![0u8; size];
    r.fill(&mut src[..]);
    let mut tgt = src.clone();
    for _ in 0..size / 4096 / 100 {
        let b = r.random_range(0..size / 4096) * 4096;
        tgt[b] ^= 0xff;
    }
    let dir = tempfile::tempdir().unwrap();
    let (sp, tp) = (dir.path().join("s"), dir.path().join("t"));
    std::fs::write(&sp, &src).unwrap();
    std::fs::write(&tp, &tgt).unwrap();
    drop((src, tgt));
    let sf = std::fs::File::open(&sp).unwrap();
    let tf = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&tp)
        .unwrap();
    let t0 = std::time::Instant::now();
    let mut s = SyncSource::new(sf, SourceConfig::new(1, SyncPlan::Delta(None))).unwrap();
    let mut t = SyncTarget::new(tf, TargetConfig::new(dir.path().join("p"))).unwrap();
    run_threaded(&mut s, &mut t).unwrap();
    let st = s.stats();
    eprintln!(
        "delta 256 MiB, 1 %: {:?}, {} blocks sent, {} B to target, {} B to source",
        t0.elapsed(),
        st.blocks_sent,
        st.bytes_to_target,
        st.bytes_to_source
    );
    assert_eq!(std::fs::read(&sp).unwrap(), std::fs::read(&tp).unwrap());
}
