//! The per-disk dirty bitmap: one bit per fixed-size region, set lock-free on every write,
//! cleared region by region once the replica has the data, persisted crash-safely.
//!
//! File format (little-endian), written with [`crate::agent::crashsafe::write_atomically`]:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `BWDIRTY\0` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | flags: bit 0 = clean (written only by a clean shutdown) |
//! | 16 | 8 | disk size in bytes |
//! | 24 | 4 | log2(region size) |
//! | 28 | 4 | reserved, 0 |
//! | 32 | 8 | number of bits (regions) |
//! | 40 | 8 | reserved, 0 |
//! | 48 | 4 | crc32c of the payload |
//! | 52 | 8 | reserved, 0 |
//! | 60 | 4 | crc32c of bytes 0..60 |
//! | 64 | 8 × ⌈bits/64⌉ | the bitmap as little-endian u64 words, bit i of word w = region 64·w + i |

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use super::DirtyError;
use crate::agent::crashsafe;

/// Default region size: 64 KiB.
pub const DEFAULT_REGION_SIZE: u32 = 64 * 1024;

const MAGIC: [u8; 8] = *b"BWDIRTY\0";
const VERSION: u32 = 1;
const HEADER_LEN: usize = 64;
const FLAG_CLEAN: u32 = 1;

/// A bitmap of dirty regions of one disk. All methods take `&self`: bits are atomics, so the
/// write path marks without a lock while a persister snapshots and a sync clears.
#[derive(Debug)]
pub struct DirtyBitmap {
    disk_size: u64,
    region_shift: u32,
    nbits: u64,
    words: Box<[AtomicU64]>,
}

impl DirtyBitmap {
    /// An all-clean bitmap for a disk of `disk_size` bytes. `region_size` must be a power of
    /// two between 512 bytes and 1 GiB.
    pub fn new(disk_size: u64, region_size: u32) -> Result<Self, DirtyError> {
        if !region_size.is_power_of_two() || !(512..=1 << 30).contains(&region_size) {
            return Err(DirtyError::Config(format!(
                "region size {region_size} is not a power of two in 512 B..1 GiB"
            )));
        }
        Self::with_shift(disk_size, region_size.trailing_zeros())
    }

    fn with_shift(disk_size: u64, region_shift: u32) -> Result<Self, DirtyError> {
        let nbits = disk_size.div_ceil(1u64 << region_shift);
        let nwords = usize::try_from(nbits.div_ceil(64))
            .map_err(|_| DirtyError::Config(format!("disk of {disk_size} bytes is too large")))?;
        let words = (0..nwords).map(|_| AtomicU64::new(0)).collect();
        Ok(DirtyBitmap {
            disk_size,
            region_shift,
            nbits,
            words,
        })
    }

    /// Size of the disk this bitmap describes.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Bytes per region (per bit).
    pub fn region_size(&self) -> u64 {
        1 << self.region_shift
    }

    /// Number of regions (bits).
    pub fn region_count(&self) -> u64 {
        self.nbits
    }

    /// Regions touched by `offset..offset+len`, clipped to the disk; `None` when empty.
    fn touched(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.disk_size);
        if len == 0 || offset >= end {
            return None;
        }
        Some((offset >> self.region_shift, (end - 1) >> self.region_shift))
    }

    /// Marks every region touched by `offset..offset+len` dirty. Lock-free; a word already
    /// holding all the bits is only read, so hot regions cost no cache-line write.
    pub fn mark(&self, offset: u64, len: u64) {
        if let Some((first, last)) = self.touched(offset, len) {
            self.set_bits(first, last);
        }
    }

    /// Marks every region dirty (used when nothing better is known).
    pub fn mark_all(&self) {
        if self.nbits > 0 {
            self.set_bits(0, self.nbits - 1);
        }
    }

    /// Marks regions `first..=last` (region indices, clipped to the disk).
    pub fn mark_regions(&self, first: u64, last: u64) {
        if self.nbits == 0 || first >= self.nbits {
            return;
        }
        self.set_bits(first, last.min(self.nbits - 1));
    }

    fn set_bits(&self, first: u64, last: u64) {
        for_each_word(first, last, |w, mask| {
            let word = &self.words[w];
            // SeqCst: the activity log's epoch argument orders this store before the epoch
            // load that follows it on the write path (see `activity_log`).
            if word.load(Ordering::SeqCst) & mask != mask {
                word.fetch_or(mask, Ordering::SeqCst);
            }
        });
    }

    /// Clears the regions lying *entirely* inside `offset..offset+len` (a region only partly
    /// covered stays dirty: its other part may not be on the replica). Call only once the
    /// replica made that data durable and no newer write to the range is still unsent.
    pub fn clear_range(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.disk_size);
        if len == 0 || offset >= end {
            return;
        }
        let rs = self.region_size();
        let first = offset.div_ceil(rs);
        // The last region may be short (disk end); it counts as fully covered if the range
        // reaches the end of the disk.
        let last_excl = if end == self.disk_size {
            self.nbits
        } else {
            end / rs
        };
        if first >= last_excl {
            return;
        }
        for_each_word(first, last_excl - 1, |w, mask| {
            self.words[w].fetch_and(!mask, Ordering::SeqCst);
        });
    }

    /// Whether region `region` is dirty.
    pub fn is_dirty(&self, region: u64) -> bool {
        if region >= self.nbits {
            return false;
        }
        let w = (region / 64) as usize;
        self.words[w].load(Ordering::SeqCst) & (1 << (region % 64)) != 0
    }

    /// Whether any region touched by `offset..offset+len` is dirty.
    pub fn is_range_dirty(&self, offset: u64, len: u64) -> bool {
        match self.touched(offset, len) {
            Some((first, last)) => (first..=last).any(|r| self.is_dirty(r)),
            None => false,
        }
    }

    /// Number of dirty regions.
    pub fn dirty_count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Dirty region indices, ascending. A snapshot per word: bits changing meanwhile may or
    /// may not be seen.
    pub fn dirty_regions(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, word)| {
            let mut bits = word.load(Ordering::SeqCst);
            std::iter::from_fn(move || {
                if bits == 0 {
                    return None;
                }
                let i = bits.trailing_zeros();
                bits &= bits - 1;
                Some(w as u64 * 64 + u64::from(i))
            })
        })
    }

    /// Dirty byte ranges, ascending, adjacent regions coalesced, clipped to the disk.
    pub fn dirty_ranges(&self) -> impl Iterator<Item = Range<u64>> + '_ {
        let rs = self.region_size();
        let size = self.disk_size;
        let mut regions = self.dirty_regions().peekable();
        std::iter::from_fn(move || {
            let first = regions.next()?;
            let mut last = first;
            while regions.peek() == Some(&(last + 1)) {
                last += 1;
                regions.next();
            }
            Some(first * rs..((last + 1) * rs).min(size))
        })
    }

    /// Serialises the bitmap (header + words) into `out`, replacing its contents.
    pub fn encode_into(&self, clean: bool, out: &mut Vec<u8>) {
        out.clear();
        out.resize(HEADER_LEN, 0);
        out.reserve(self.words.len() * 8);
        for w in self.words.iter() {
            out.extend_from_slice(&w.load(Ordering::SeqCst).to_le_bytes());
        }
        let payload_crc = crc32c::crc32c(&out[HEADER_LEN..]);
        let h = &mut out[..HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(if clean { FLAG_CLEAN } else { 0 }).to_le_bytes());
        h[16..24].copy_from_slice(&self.disk_size.to_le_bytes());
        h[24..28].copy_from_slice(&self.region_shift.to_le_bytes());
        h[32..40].copy_from_slice(&self.nbits.to_le_bytes());
        h[48..52].copy_from_slice(&payload_crc.to_le_bytes());
        let header_crc = crc32c::crc32c(&h[..60]);
        h[60..64].copy_from_slice(&header_crc.to_le_bytes());
    }

    /// Parses a bitmap file's bytes; `path` is only used in errors.
    pub fn decode(bytes: &[u8], path: &Path) -> Result<(DirtyBitmap, bool), DirtyError> {
        if bytes.len() < HEADER_LEN {
            return Err(DirtyError::corrupt(
                path,
                "bitmap file shorter than its header",
            ));
        }
        let h = &bytes[..HEADER_LEN];
        if h[0..8] != MAGIC {
            return Err(DirtyError::corrupt(
                path,
                "not a dirty-bitmap file (bad magic)",
            ));
        }
        let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_le_bytes(b)
        };
        if crc32c::crc32c(&h[..60]) != u32_at(60) {
            return Err(DirtyError::corrupt(path, "bitmap header checksum mismatch"));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(DirtyError::corrupt(
                path,
                format!("unsupported bitmap version {version}"),
            ));
        }
        let clean = u32_at(12) & FLAG_CLEAN != 0;
        let disk_size = u64_at(16);
        let region_shift = u32_at(24);
        let nbits = u64_at(32);
        if !(9..=30).contains(&region_shift) || nbits != disk_size.div_ceil(1 << region_shift) {
            return Err(DirtyError::corrupt(path, "inconsistent bitmap geometry"));
        }
        let payload = &bytes[HEADER_LEN..];
        if payload.len() as u64 != nbits.div_ceil(64) * 8 {
            return Err(DirtyError::corrupt(
                path,
                "bitmap payload has the wrong length",
            ));
        }
        if crc32c::crc32c(payload) != u32_at(48) {
            return Err(DirtyError::corrupt(
                path,
                "bitmap payload checksum mismatch",
            ));
        }
        let bm = DirtyBitmap::with_shift(disk_size, region_shift)?;
        for (word, chunk) in bm.words.iter().zip(payload.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            word.store(u64::from_le_bytes(b), Ordering::Relaxed);
        }
        Ok((bm, clean))
    }

    /// Persists the bitmap crash-safely (temp → fsync → rename → fsync dir).
    pub fn save(&self, path: &Path, clean: bool) -> Result<(), DirtyError> {
        let mut buf = Vec::new();
        self.save_with(path, clean, &mut buf)
    }

    /// [`save`](Self::save) reusing `buf` for the encoding (the periodic persister's path).
    pub fn save_with(&self, path: &Path, clean: bool, buf: &mut Vec<u8>) -> Result<(), DirtyError> {
        self.encode_into(clean, buf);
        Ok(crashsafe::write_atomically(path, buf)?)
    }

    /// Loads a persisted bitmap and its `clean` flag. `clean == false` means the agent did
    /// not shut down cleanly after this was written: the bits alone are not the truth.
    pub fn load(path: &Path) -> Result<(DirtyBitmap, bool), DirtyError> {
        let bytes = std::fs::read(path).map_err(|e| DirtyError::io("read", path, e))?;
        Self::decode(&bytes, path)
    }

    /// Sets every bit that is set in `other` (same geometry required).
    pub fn union_with(&self, other: &DirtyBitmap) -> Result<(), DirtyError> {
        if other.disk_size != self.disk_size || other.region_shift != self.region_shift {
            return Err(DirtyError::Config(
                "cannot merge bitmaps of different geometry".into(),
            ));
        }
        for (a, b) in self.words.iter().zip(other.words.iter()) {
            let v = b.load(Ordering::SeqCst);
            if v != 0 {
                a.fetch_or(v, Ordering::SeqCst);
            }
        }
        Ok(())
    }
}

/// Calls `f(word_index, mask)` for every word covering bits `first..=last`.
fn for_each_word(first: u64, last: u64, mut f: impl FnMut(usize, u64)) {
    let mut bit = first;
    while bit <= last {
        let w = bit / 64;
        let lo = bit % 64;
        let hi = if last / 64 == w { last % 64 } else { 63 };
        let width = hi - lo + 1;
        let mask = if width == 64 {
            u64::MAX
        } else {
            ((1u64 << width) - 1) << lo
        };
        f(w as usize, mask);
        bit = (w + 1) * 64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_clear_and_ranges() {
        let bm = DirtyBitmap::new(10 * 65536 + 100, 65536).unwrap();
        assert_eq!(bm.region_count(), 11);
        bm.mark(65536 - 1, 2); // regions 0 and 1
        bm.mark(10 * 65536 + 50, 1000); // clipped, last region
        assert_eq!(bm.dirty_regions().collect::<Vec<_>>(), vec![0, 1, 10]);
        assert_eq!(
            bm.dirty_ranges().collect::<Vec<_>>(),
            vec![0..2 * 65536, 10 * 65536..10 * 65536 + 100]
        );
        // Partial coverage does not clear.
        bm.clear_range(1, 65536);
        assert!(bm.is_dirty(0) && bm.is_dirty(1));
        bm.clear_range(0, 65536);
        assert!(!bm.is_dirty(0) && bm.is_dirty(1));
        // The short last region clears when the range reaches the disk end.
        bm.clear_range(10 * 65536, 100);
        assert!(!bm.is_dirty(10));
    }

    #[test]
    fn words_spanning() {
        let bm = DirtyBitmap::new(200 * 512, 512).unwrap();
        bm.mark(512 * 60, 512 * 80);
        assert_eq!(bm.dirty_count(), 80);
        assert_eq!(
            bm.dirty_ranges().collect::<Vec<_>>(),
            vec![512 * 60..512 * 140]
        );
        bm.mark_all();
        assert_eq!(bm.dirty_count(), 200);
    }

    #[test]
    fn encode_decode_roundtrip_and_corruption() {
        let bm = DirtyBitmap::new(1 << 30, 65536).unwrap();
        bm.mark(12345, 999_999);
        let mut buf = Vec::new();
        bm.encode_into(true, &mut buf);
        let (back, clean) = DirtyBitmap::decode(&buf, Path::new("x")).unwrap();
        assert!(clean);
        assert_eq!(
            back.dirty_regions().collect::<Vec<_>>(),
            bm.dirty_regions().collect::<Vec<_>>()
        );
        for i in [0usize, 13, 60, HEADER_LEN + 3] {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            assert!(
                DirtyBitmap::decode(&bad, Path::new("x")).is_err(),
                "byte {i}"
            );
        }
        assert!(DirtyBitmap::decode(&buf[..buf.len() - 8], Path::new("x")).is_err());
    }
}
