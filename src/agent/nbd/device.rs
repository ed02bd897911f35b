//! The storage behind an export: the [`BlockDevice`] trait and [`FileDevice`], a raw image
//! file served with pread/pwrite (page cache, like `qemu-nbd --cache=writeback`).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rustix::fs::FallocateFlags;
use rustix::io::ReadWriteFlags;

use super::gate::CompletionGate;
use super::NbdError;

/// Storage behind one export. Methods are blocking: the server calls them on blocking
/// threads, several at once, so implementations must be internally synchronised.
///
/// After `trim` or `write_zeroes` the range reads as zeroes (our `trim` is deterministic
/// on purpose: a replica must end up byte-identical, so "content undefined" is not allowed).
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes (fixed while exported).
    fn size(&self) -> u64;

    /// Whether writes are refused (`NBD_FLAG_READ_ONLY`; the server answers EPERM).
    fn read_only(&self) -> bool {
        false
    }

    /// Whether flush/FUA effects are visible to every connection (`NBD_FLAG_CAN_MULTI_CONN`).
    fn can_multi_conn(&self) -> bool {
        true
    }

    /// Fills `buf` from `offset` (`offset + buf.len() <= size()`, checked by the server).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Fast path for small reads, called on the async thread: does what `read_at` does if
    /// that cannot wait for the disk (data in the page cache), else returns `None` having
    /// done nothing observable; the server then calls `read_at` on a blocking thread.
    fn read_nowait(&self, _buf: &mut [u8], _offset: u64) -> Option<io::Result<()>> {
        None
    }

    /// Fast path for small non-FUA writes, called on the async thread: does what
    /// `write_at(buf, offset, false)` does if that completes in microseconds, else returns
    /// `None` (possibly after writing part of `buf`: the blocking retry writes it all again).
    fn write_nowait(&self, _buf: &[u8], _offset: u64) -> Option<io::Result<()>> {
        None
    }

    /// Writes `buf` at `offset`; with `fua`, durable before returning.
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()>;

    /// Zeroes `len` bytes at `offset`; may deallocate (punch a hole) only if `may_trim`.
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()>;

    /// Discards `len` bytes at `offset`; the range reads as zeroes afterwards.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()>;

    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;

    /// The gate the server must pass before acknowledging a write, trim or write-zeroes
    /// (see [`CompletionGate`]); `None` for devices without consistency barriers.
    fn completion_gate(&self) -> Option<Arc<CompletionGate>> {
        None
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_only(&self) -> bool {
        (**self).read_only()
    }
    fn can_multi_conn(&self) -> bool {
        (**self).can_multi_conn()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        (**self).read_nowait(buf, offset)
    }
    fn write_nowait(&self, buf: &[u8], offset: u64) -> Option<io::Result<()>> {
        (**self).write_nowait(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        (**self).write_at(buf, offset, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        (**self).write_zeroes(offset, len, may_trim, fua)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        (**self).trim(offset, len, fua)
    }
    fn flush(&self) -> io::Result<()> {
        (**self).flush()
    }
    fn completion_gate(&self) -> Option<Arc<CompletionGate>> {
        (**self).completion_gate()
    }
}

/// 1 MiB of zeroes for the write-zeroes fallback (static: no allocation on that path).
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

/// A raw image file. TRIM punches a hole (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`),
/// WRITE_ZEROES uses `FALLOC_FL_ZERO_RANGE` (or a hole if allowed), each falling back to
/// writing zeroes where the filesystem refuses. FUA writes use `pwritev2(RWF_DSYNC)`
/// (falling back to pwrite + fdatasync); FLUSH is `fdatasync`.
///
/// Fast paths: reads try `preadv2(RWF_NOWAIT)` (served from the page cache or not at all);
/// writes try `pwritev2(RWF_NOWAIT)` and, where the filesystem does not support that for
/// buffered writes (ext4), a plain buffered pwrite (microseconds unless the kernel is
/// throttling dirty pages, which the server's inline breaker detects and backs off from).
#[derive(Debug)]
pub struct FileDevice {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    punch_hole: AtomicBool,
    zero_range: AtomicBool,
    dsync_write: AtomicBool,
    nowait_read: AtomicBool,
    nowait_write: AtomicBool,
}

fn unsupported(e: &rustix::io::Errno) -> bool {
    *e == rustix::io::Errno::OPNOTSUPP || *e == rustix::io::Errno::NOSYS
}

impl FileDevice {
    /// Opens an existing image; its current length is the export size.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, NbdError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| NbdError::Device {
                path: path.to_path_buf(),
                source: e,
            })?;
        Self::from_file(file, path, read_only)
    }

    /// Creates (or truncates) a sparse image of `size` bytes and opens it read-write.
    pub fn create(path: &Path, size: u64) -> Result<Self, NbdError> {
        let dev_err = |e| NbdError::Device {
            path: path.to_path_buf(),
            source: e,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(dev_err)?;
        file.set_len(size).map_err(dev_err)?;
        Self::from_file(file, path, false)
    }

    /// The first offset at or after `offset` that may hold data; `None` when only holes
    /// follow (they read as zeroes). Where the filesystem cannot tell, everything is data.
    pub fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(offset)) {
            Ok(o) => Ok(Some(o)),
            Err(e) if e == rustix::io::Errno::NXIO => Ok(None),
            Err(e) if e == rustix::io::Errno::INVAL || unsupported(&e) => Ok(Some(offset)),
            Err(e) => Err(e.into()),
        }
    }

    fn from_file(file: File, path: &Path, read_only: bool) -> Result<Self, NbdError> {
        let size = file
            .metadata()
            .map_err(|e| NbdError::Device {
                path: path.to_path_buf(),
                source: e,
            })?
            .len();
        Ok(FileDevice {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            punch_hole: AtomicBool::new(true),
            zero_range: AtomicBool::new(true),
            dsync_write: AtomicBool::new(true),
            nowait_read: AtomicBool::new(true),
            nowait_write: AtomicBool::new(true),
        })
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write_plain_zeroes(&self, mut offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        while offset < end {
            let n = (end - offset).min(ZEROES.len() as u64) as usize;
            self.file.write_all_at(&ZEROES[..n], offset)?;
            offset += n as u64;
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.punch_hole.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => {
                self.punch_hole.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn zero_range(&self, offset: u64, len: u64) -> io::Result<bool> {
        if !self.zero_range.load(Ordering::Relaxed) {
            return Ok(false);
        }
        match rustix::fs::fallocate(
            &self.file,
            FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(true),
            Err(e) if unsupported(&e) => {
                self.zero_range.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn write_dsync(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match rustix::io::pwritev2(
                &self.file,
                &[IoSlice::new(buf)],
                offset,
                ReadWriteFlags::DSYNC,
            ) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) if unsupported(&e) || e == rustix::io::Errno::INVAL => {
                    // Old kernel or filesystem without RWF_DSYNC: pwrite + fdatasync.
                    self.dsync_write.store(false, Ordering::Relaxed);
                    self.file.write_all_at(buf, offset)?;
                    return self.file.sync_data();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn read_nowait(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if !self.nowait_read.load(Ordering::Relaxed) {
            return None;
        }
        let want = buf.len();
        match rustix::io::preadv2(
            &self.file,
            &mut [IoSliceMut::new(buf)],
            offset,
            ReadWriteFlags::NOWAIT,
        ) {
            Ok(n) if n == want => Some(Ok(())),
            Err(e) if unsupported(&e) => {
                self.nowait_read.store(false, Ordering::Relaxed);
                None
            }
            // Short (partly cached), EAGAIN (not cached), or an error the blocking path
            // will report properly.
            _ => None,
        }
    }

    fn write_nowait(&self, buf: &[u8], offset: u64) -> Option<io::Result<()>> {
        if self.read_only {
            return None;
        }
        if self.nowait_write.load(Ordering::Relaxed) {
            match rustix::io::pwritev2(
                &self.file,
                &[IoSlice::new(buf)],
                offset,
                ReadWriteFlags::NOWAIT,
            ) {
                Ok(n) if n == buf.len() => return Some(Ok(())),
                Err(e) if unsupported(&e) => self.nowait_write.store(false, Ordering::Relaxed),
                _ => return None,
            }
        }
        // No RWF_NOWAIT for buffered writes here: a buffered pwrite only copies into the
        // page cache.
        Some(self.file.write_all_at(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64, fua: bool) -> io::Result<()> {
        if fua {
            if self.dsync_write.load(Ordering::Relaxed) {
                return self.write_dsync(buf, offset);
            }
            self.file.write_all_at(buf, offset)?;
            return self.file.sync_data();
        }
        self.file.write_all_at(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let done = (may_trim && self.punch(offset, len)?) || self.zero_range(offset, len)?;
        if !done {
            self.write_plain_zeroes(offset, len)?;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if !self.punch(offset, len)? {
            self.write_plain_zeroes(offset, len)?;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}
