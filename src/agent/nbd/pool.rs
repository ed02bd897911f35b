//! Reusable payload buffers. Filling fresh memory runs ~10× slower here than reused memory
//! (page faults), so request payloads come from per-size-class free lists.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

const MIN_CLASS_SHIFT: u32 = 12; // 4 KiB
const MAX_CLASS_SHIFT: u32 = 26; // 64 MiB
const CLASSES: usize = (MAX_CLASS_SHIFT - MIN_CLASS_SHIFT + 1) as usize;

/// Free lists of buffers by power-of-two size class.
#[derive(Debug)]
pub struct BufPool {
    classes: Vec<Mutex<Vec<Vec<u8>>>>,
    /// Idle bytes kept at most, all classes together.
    keep_bytes: usize,
    /// Idle bytes currently kept.
    idle: AtomicUsize,
}

impl BufPool {
    /// A pool that keeps up to `keep_bytes` of idle buffers in all.
    pub fn new(keep_bytes: usize) -> Arc<Self> {
        Arc::new(BufPool {
            classes: (0..CLASSES).map(|_| Mutex::new(Vec::new())).collect(),
            keep_bytes,
            idle: AtomicUsize::new(0),
        })
    }

    /// Idle bytes held by the pool.
    pub fn idle_bytes(&self) -> usize {
        self.idle.load(Ordering::Relaxed)
    }

    fn class_of(len: usize) -> Option<usize> {
        let shift = len
            .max(1)
            .next_power_of_two()
            .trailing_zeros()
            .max(MIN_CLASS_SHIFT);
        (shift <= MAX_CLASS_SHIFT).then(|| (shift - MIN_CLASS_SHIFT) as usize)
    }

    /// A buffer of exactly `len` usable bytes (contents unspecified).
    pub fn get(self: &Arc<Self>, len: usize) -> PooledBuf {
        let buf = match Self::class_of(len) {
            Some(c) => {
                let reused = self.classes[c]
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .pop();
                match reused {
                    Some(b) => {
                        self.idle.fetch_sub(b.len(), Ordering::Relaxed);
                        b
                    }
                    None => vec![0u8; 1 << (c as u32 + MIN_CLASS_SHIFT)],
                }
            }
            None => vec![0u8; len],
        };
        PooledBuf {
            buf,
            len,
            pool: Arc::clone(self),
        }
    }

    fn put(&self, buf: Vec<u8>) {
        let Some(c) = Self::class_of(buf.len()) else {
            return;
        };
        if buf.len() != 1 << (c as u32 + MIN_CLASS_SHIFT) {
            return; // an odd size (oversize request): not pooled
        }
        // Reserve room in the idle budget first; give it back if over.
        let n = buf.len();
        if self.idle.fetch_add(n, Ordering::Relaxed) + n > self.keep_bytes {
            self.idle.fetch_sub(n, Ordering::Relaxed);
            return;
        }
        self.classes[c]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(buf);
    }
}

/// A buffer on loan from a [`BufPool`]; goes back on drop.
#[derive(Debug)]
pub struct PooledBuf {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufPool>,
}

impl PooledBuf {
    /// The usable bytes.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// The usable bytes, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.buf[..self.len]
    }

    /// Number of usable bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_by_class() {
        let pool = BufPool::new(1 << 20);
        let mut a = pool.get(5000);
        assert_eq!(a.len(), 5000);
        a.as_mut_slice()[4999] = 7;
        let ptr = a.as_slice().as_ptr();
        drop(a);
        let b = pool.get(8192);
        assert_eq!(b.as_slice().as_ptr(), ptr);
        assert_eq!(b.len(), 8192);
        let big = pool.get((1 << 26) + 1);
        assert_eq!(big.len(), (1 << 26) + 1);
        drop(big);
        drop(b);
        assert_eq!(pool.idle_bytes(), 8192);
        // Over the budget: not kept.
        drop(pool.get(1 << 20));
        assert_eq!(pool.idle_bytes(), 8192);
    }
}
