//! The two-level BLAKE3 hash tree of a disk region: level 1 is a strong 32-byte digest
//! per chunk (N blocks), level 2 an 8-byte truncated digest per block, computed only for
//! chunks whose level-1 digests differ. Hashing runs on a few threads over striped chunks
//! with buffers reused across calls (DESIGN §12: fresh memory is 10× slower to fill).

use std::io;

use super::{BlockRead, SyncError};

/// Block and chunk geometry; both sides of a sync must use the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashConfig {
    /// Bytes per block: a power of two ≥ 512.
    pub block_size: u32,
    /// Blocks per chunk (≥ 1).
    pub chunk_blocks: u32,
}

impl Default for HashConfig {
    fn default() -> Self {
        HashConfig {
            block_size: 4096,
            chunk_blocks: 256,
        }
    }
}

impl HashConfig {
    pub fn validate(&self) -> Result<(), SyncError> {
        if self.block_size < 512 || !self.block_size.is_power_of_two() {
            return Err(SyncError::Config(format!(
                "block size {} is not a power of two ≥ 512",
                self.block_size
            )));
        }
        if self.chunk_blocks == 0 || self.chunk_size() > 64 << 20 {
            return Err(SyncError::Config(format!(
                "{} blocks per chunk: need 1 ..= 64 MiB per chunk",
                self.chunk_blocks
            )));
        }
        Ok(())
    }
    pub fn block(&self) -> u64 {
        u64::from(self.block_size)
    }
    pub fn chunk_size(&self) -> u64 {
        self.block() * u64::from(self.chunk_blocks)
    }
    /// Number of chunks of a disk of `size` bytes (the last may be short).
    pub fn chunks(&self, size: u64) -> u64 {
        size.div_ceil(self.chunk_size())
    }
    /// Byte range of chunk `c` on a disk of `size` bytes.
    pub fn chunk_range(&self, c: u64, size: u64) -> (u64, u64) {
        let start = c.saturating_mul(self.chunk_size()).min(size);
        let end = start.saturating_add(self.chunk_size()).min(size);
        (start, end)
    }
}

/// Level-1 digest of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkDigest {
    pub chunk: u64,
    pub strong: [u8; 32],
    /// Every byte of the chunk is zero.
    pub zero: bool,
}

/// True if every byte is zero. The OR-fold has no early exit so it vectorises; checked
/// per 4 KiB so an obviously non-zero buffer stops early.
pub fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(4096)
        .all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
}

/// Level-2 digest of one block.
pub fn block_digest(block: &[u8]) -> u64 {
    let h = blake3::hash(block);
    let b = h.as_bytes();
    u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Hashes chunks of a disk with reusable per-thread buffers.
pub struct Hasher {
    cfg: HashConfig,
    bufs: Vec<Vec<u8>>,
    /// Strong digest of an all-zero full chunk, so zero chunks are not hashed.
    zero_digest: [u8; 32],
}

impl Hasher {
    /// `threads` ≥ 1 hashing threads (2 keeps up with reading on this machine).
    pub fn new(cfg: HashConfig, threads: usize) -> Result<Self, SyncError> {
        cfg.validate()?;
        let n = usize::try_from(cfg.chunk_size()).map_err(|_| SyncError::Config("chunk".into()))?;
        let bufs = (0..threads.max(1)).map(|_| vec![0u8; n]).collect();
        let zero_digest = *blake3::hash(&vec![0u8; n]).as_bytes();
        Ok(Hasher {
            cfg,
            bufs,
            zero_digest,
        })
    }

    pub fn config(&self) -> HashConfig {
        self.cfg
    }

    /// Strong digest of chunk bytes, short-cutting all-zero full chunks.
    pub fn strong(&self, bytes: &[u8]) -> ([u8; 32], bool) {
        strong_digest(bytes, self.cfg.chunk_size(), &self.zero_digest)
    }

    /// Level-1 digests of `chunks` (in order) of `src`, whose size is `size`; in parallel.
    pub fn chunk_digests<R: BlockRead + ?Sized>(
        &mut self,
        src: &R,
        size: u64,
        chunks: &[u64],
        out: &mut Vec<ChunkDigest>,
    ) -> Result<(), SyncError> {
        out.clear();
        let cfg = self.cfg;
        let zero = &self.zero_digest;
        let threads = self.bufs.len().min(chunks.len()).max(1);
        if threads == 1 {
            let buf = &mut self.bufs[0];
            for &c in chunks {
                out.push(hash_one(src, size, cfg, c, buf, zero)?);
            }
            return Ok(());
        }
        // Chunks striped over the threads; each thread keeps its own results.
        let results: Vec<Result<Vec<ChunkDigest>, SyncError>> = std::thread::scope(|s| {
            let handles: Vec<_> = self.bufs[..threads]
                .iter_mut()
                .enumerate()
                .map(|(t, buf)| {
                    s.spawn(move || {
                        let mut mine = Vec::with_capacity(chunks.len() / threads + 1);
                        for &c in chunks.iter().skip(t).step_by(threads) {
                            mine.push(hash_one(src, size, cfg, c, buf, zero)?);
                        }
                        Ok(mine)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SyncError::io(
                            "hash",
                            0,
                            io::Error::other("hash thread panicked"),
                        ))
                    })
                })
                .collect()
        });
        let mut per_thread = Vec::with_capacity(threads);
        for r in results {
            per_thread.push(r?.into_iter());
        }
        // Undo the striping.
        for i in 0..chunks.len() {
            if let Some(d) = per_thread[i % threads].next() {
                out.push(d);
            }
        }
        Ok(())
    }

    /// Reads chunk `c` into the first buffer and returns it (for sending or level 2).
    pub fn read_chunk<R: BlockRead + ?Sized>(
        &mut self,
        src: &R,
        size: u64,
        c: u64,
    ) -> Result<&[u8], SyncError> {
        let (start, end) = self.cfg.chunk_range(c, size);
        let buf = &mut self.bufs[0][..(end - start) as usize];
        src.read_at(buf, start)
            .map_err(|e| SyncError::io("read", start, e))?;
        Ok(buf)
    }

    /// Reads chunk `c` and, if `strong`, also returns its level-1 digest and zero flag.
    #[allow(clippy::type_complexity)]
    pub fn read_chunk_hashed<R: BlockRead + ?Sized>(
        &mut self,
        src: &R,
        size: u64,
        c: u64,
        strong: bool,
    ) -> Result<(&[u8], Option<([u8; 32], bool)>), SyncError> {
        let (start, end) = self.cfg.chunk_range(c, size);
        let buf = &mut self.bufs[0][..(end - start) as usize];
        src.read_at(buf, start)
            .map_err(|e| SyncError::io("read", start, e))?;
        let d = strong.then(|| strong_digest(buf, self.cfg.chunk_size(), &self.zero_digest));
        Ok((buf, d))
    }

    /// Reads a byte range no longer than a chunk into the first buffer.
    pub fn read_range<R: BlockRead + ?Sized>(
        &mut self,
        src: &R,
        offset: u64,
        len: u64,
    ) -> Result<&[u8], SyncError> {
        let buf = self.bufs[0]
            .get_mut(..len as usize)
            .ok_or_else(|| SyncError::Protocol(format!("range of {len} bytes exceeds a chunk")))?;
        src.read_at(buf, offset)
            .map_err(|e| SyncError::io("read", offset, e))?;
        Ok(buf)
    }

    /// Level-2 digests of chunk bytes.
    pub fn block_digests(&self, chunk: &[u8], out: &mut Vec<u64>) {
        out.clear();
        out.extend(chunk.chunks(self.cfg.block_size as usize).map(block_digest));
    }
}

fn strong_digest(bytes: &[u8], chunk_size: u64, zero_digest: &[u8; 32]) -> ([u8; 32], bool) {
    if is_zero(bytes) {
        if bytes.len() as u64 == chunk_size {
            return (*zero_digest, true);
        }
        return (*blake3::hash(bytes).as_bytes(), true);
    }
    (*blake3::hash(bytes).as_bytes(), false)
}

fn hash_one<R: BlockRead + ?Sized>(
    src: &R,
    size: u64,
    cfg: HashConfig,
    c: u64,
    buf: &mut [u8],
    zero: &[u8; 32],
) -> Result<ChunkDigest, SyncError> {
    let (start, end) = cfg.chunk_range(c, size);
    let buf = &mut buf[..(end - start) as usize];
    src.read_at(buf, start)
        .map_err(|e| SyncError::io("read", start, e))?;
    let (strong, zero) = strong_digest(buf, cfg.chunk_size(), zero);
    Ok(ChunkDigest {
        chunk: c,
        strong,
        zero,
    })
}

/// Level-2 digests of each of `chunks` (in order), read from `src` and hashed on
/// `threads` threads, each with its own buffer: both sides of a Delta use it for the
/// chunks whose level-1 digests differ, so reading and hashing them is parallel too.
pub fn block_digests_of<R: BlockRead + ?Sized>(
    src: &R,
    cfg: HashConfig,
    size: u64,
    chunks: &[u64],
    threads: usize,
) -> Result<Vec<Vec<u64>>, SyncError> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// One thread's results: (index into `chunks`, its block digests).
    type Part = Result<Vec<(usize, Vec<u64>)>, SyncError>;
    let next = AtomicUsize::new(0);
    let threads = threads.clamp(1, chunks.len().max(1));
    let work = |buf: &mut Vec<u8>| -> Part {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(&c) = chunks.get(i) else {
                return Ok(done);
            };
            let (start, end) = cfg.chunk_range(c, size);
            let b = &mut buf[..(end - start) as usize];
            src.read_at(b, start)
                .map_err(|e| SyncError::io("read", start, e))?;
            done.push((
                i,
                b.chunks(cfg.block_size as usize)
                    .map(block_digest)
                    .collect(),
            ));
        }
    };
    let n = usize::try_from(cfg.chunk_size()).map_err(|_| SyncError::Config("chunk".into()))?;
    let parts: Vec<Part> = if threads == 1 {
        vec![work(&mut vec![0u8; n])]
    } else {
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|_| s.spawn(|| work(&mut vec![0u8; n])))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(SyncError::Protocol("hashing thread panicked".into()))
                    })
                })
                .collect()
        })
    };
    let mut out = vec![Vec::new(); chunks.len()];
    for part in parts {
        for (i, d) in part? {
            out[i] = d;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> HashConfig {
        HashConfig {
            block_size: 512,
            chunk_blocks: 8,
        }
    }

    #[test]
    fn parallel_equals_serial_and_matches_blake3() {
        let mut disk = vec![0u8; 4096 * 5 + 1000];
        for (i, b) in disk.iter_mut().enumerate().skip(4096) {
            *b = (i * 7 % 251) as u8;
        }
        disk[4096 * 3..4096 * 4].fill(0);
        let size = disk.len() as u64;
        let chunks: Vec<u64> = (0..cfg().chunks(size)).collect();
        let mut par = Vec::new();
        Hasher::new(cfg(), 2)
            .unwrap()
            .chunk_digests(&disk, size, &chunks, &mut par)
            .unwrap();
        let mut ser = Vec::new();
        Hasher::new(cfg(), 1)
            .unwrap()
            .chunk_digests(&disk, size, &chunks, &mut ser)
            .unwrap();
        assert_eq!(par, ser);
        for d in &par {
            let (s, e) = cfg().chunk_range(d.chunk, size);
            let bytes = &disk[s as usize..e as usize];
            assert_eq!(d.strong, *blake3::hash(bytes).as_bytes());
            assert_eq!(d.zero, bytes.iter().all(|&b| b == 0));
        }
        assert!(par[0].zero && par[3].zero && !par[1].zero);
        assert_eq!(par.len(), 6);
    }

    #[test]
    fn block_digests_of_many_chunks_match_one_by_one() {
        let mut disk = vec![0u8; 4096 * 5 + 1000];
        for (i, b) in disk.iter_mut().enumerate() {
            *b = (i * 13 % 253) as u8;
        }
        let size = disk.len() as u64;
        let chunks = [5u64, 0, 3, 1];
        for threads in [1, 2, 3] {
            let got = block_digests_of(&disk, cfg(), size, &chunks, threads).unwrap();
            for (k, &c) in chunks.iter().enumerate() {
                let (s, e) = cfg().chunk_range(c, size);
                let want: Vec<u64> = disk[s as usize..e as usize]
                    .chunks(512)
                    .map(block_digest)
                    .collect();
                assert_eq!(got[k], want, "chunk {c}, {threads} threads");
            }
        }
    }

    #[test]
    fn config_validation() {
        assert!(HashConfig::default().validate().is_ok());
        for bad in [
            HashConfig {
                block_size: 256,
                chunk_blocks: 4,
            },
            HashConfig {
                block_size: 3000,
                chunk_blocks: 4,
            },
            HashConfig {
                block_size: 4096,
                chunk_blocks: 0,
            },
        ] {
            assert!(bad.validate().is_err());
        }
    }
}
