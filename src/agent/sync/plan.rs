//! What a sync has to cover: the disk ranges of each kind, aligned (whole chunks for
//! hashing kinds, whole blocks for Bitmap), clipped, sorted and merged, and the plan's
//! fingerprint that ties a persisted progress cursor to exactly this work.

use super::hash::HashConfig;
use super::SyncPlan;

/// A byte range of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub fn new(offset: u64, len: u64) -> Self {
        Extent { offset, len }
    }
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// Widens each extent to multiples of `align`, clips to `size`, sorts and merges
/// overlapping or adjacent ones; empty extents vanish.
pub fn normalize(extents: &[Extent], align: u64, size: u64) -> Vec<Extent> {
    let mut v: Vec<(u64, u64)> = extents
        .iter()
        .filter(|e| e.len > 0 && e.offset < size)
        .map(|e| {
            let start = e.offset / align * align;
            let end = e
                .end()
                .min(size)
                .div_ceil(align)
                .saturating_mul(align)
                .min(size);
            (start, end)
        })
        .collect();
    v.sort_unstable();
    let mut out: Vec<Extent> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.end() => {
                let end = last.end().max(e);
                last.len = end - last.offset;
            }
            _ => out.push(Extent::new(s, e - s)),
        }
    }
    out
}

/// The normalised work of `kind` on a disk of `size` bytes.
pub fn work_extents(kind: &SyncPlan, size: u64, cfg: HashConfig) -> Vec<Extent> {
    let whole = || {
        if size == 0 {
            Vec::new()
        } else {
            vec![Extent::new(0, size)]
        }
    };
    match kind {
        SyncPlan::Full | SyncPlan::Delta(None) => whole(),
        SyncPlan::Delta(Some(r)) => normalize(r, cfg.chunk_size(), size),
        SyncPlan::Bitmap(r) => normalize(r, cfg.block(), size),
    }
}

/// Fingerprint of a sync's work, stored with its progress cursor.
pub fn plan_digest(kind: u8, size: u64, cfg: HashConfig, extents: &[Extent]) -> u64 {
    let mut h = blake3::Hasher::new();
    h.update(&[kind]);
    h.update(&size.to_le_bytes());
    h.update(&cfg.block_size.to_le_bytes());
    h.update(&cfg.chunk_blocks.to_le_bytes());
    for e in extents {
        h.update(&e.offset.to_le_bytes());
        h.update(&e.len.to_le_bytes());
    }
    let b = h.finalize();
    let b = b.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// The chunks touched by chunk-aligned `extents` at or after byte `from`, in order.
pub fn chunks_from(
    extents: &[Extent],
    cfg: HashConfig,
    from: u64,
) -> impl Iterator<Item = u64> + '_ {
    let cs = cfg.chunk_size();
    extents
        .iter()
        .filter(move |e| e.end() > from)
        .flat_map(move |e| {
            // Floor: a cursor inside a chunk means that chunk is not done.
            let first = e.offset.max(from) / cs;
            let end = e.end().div_ceil(cs);
            first..end.max(first)
        })
}

/// The next piece of `extents` at or after byte `from`: at most up to the end of the
/// chunk `from` lies in, so every piece fits a chunk buffer.
pub fn next_piece(extents: &[Extent], cfg: HashConfig, from: u64) -> Option<Extent> {
    let e = extents.iter().find(|e| e.end() > from)?;
    let start = e.offset.max(from);
    let chunk_end = (start / cfg.chunk_size() + 1) * cfg.chunk_size();
    Some(Extent::new(start, e.end().min(chunk_end) - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: HashConfig = HashConfig {
        block_size: 512,
        chunk_blocks: 4,
    };

    #[test]
    fn normalize_aligns_clips_merges() {
        let r = normalize(
            &[
                Extent::new(5000, 10),
                Extent::new(100, 10),
                Extent::new(600, 500),
                Extent::new(9000, 0),
                Extent::new(20000, 5),
            ],
            512,
            10_000,
        );
        assert_eq!(r, vec![Extent::new(0, 1536), Extent::new(4608, 512)]);
        // The last partial block is clipped to the disk.
        assert_eq!(
            normalize(&[Extent::new(9990, 100)], 512, 10_000),
            vec![Extent::new(9728, 272)]
        );
    }

    #[test]
    fn chunk_iteration_and_pieces() {
        let ext = vec![Extent::new(0, 4096), Extent::new(8192, 2048)];
        assert_eq!(chunks_from(&ext, CFG, 0).collect::<Vec<_>>(), vec![0, 1, 4]);
        assert_eq!(chunks_from(&ext, CFG, 2048).collect::<Vec<_>>(), vec![1, 4]);
        assert_eq!(chunks_from(&ext, CFG, 4096).collect::<Vec<_>>(), vec![4]);
        assert_eq!(chunks_from(&ext, CFG, 10240).count(), 0);
        // A short last chunk: its end is not the start of another chunk.
        let short = vec![Extent::new(0, 5000)];
        assert_eq!(chunks_from(&short, CFG, 4096).collect::<Vec<_>>(), vec![2]);
        assert_eq!(chunks_from(&short, CFG, 5000).count(), 0);
        let bm = vec![Extent::new(512, 3000)];
        assert_eq!(next_piece(&bm, CFG, 0), Some(Extent::new(512, 1536)));
        assert_eq!(next_piece(&bm, CFG, 2048), Some(Extent::new(2048, 1464)));
        assert_eq!(next_piece(&bm, CFG, 3512), None);
    }
}
