//! Disk synchronisation outside the write stream (DESIGN §5): Full, Delta and Bitmap
//! syncs between a protected disk (the source) and its replica (the target).
//!
//! This module owns the transport-agnostic engine: the hash tree ([`hash`]), the typed
//! messages and their wire encoding ([`msg`]), the work planning ([`plan`]) and the two
//! state machines with their in-process drivers ([`engine`]). Framing the messages over
//! the agents' replication connection is the stream's job, not this module's.

pub mod bench;
pub mod engine;
pub mod hash;
pub mod msg;
pub mod plan;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

pub use engine::{
    run_local, run_threaded, Endpoint, LocalOutcome, SourceConfig, SyncSource, SyncTarget,
    TargetConfig,
};
pub use hash::{ChunkDigest, HashConfig, Hasher};
pub use msg::SyncMsg;
pub use plan::Extent;

use crate::agent::crashsafe::CrashSafeError;

/// What a sync brings across: the kind (`model::status::SyncKind` names it for
/// operators; Initial is a Full onto a known-zero target) with its ranges.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncPlan {
    /// Every non-zero block; zero blocks are zeroed on the target unless it is known zero.
    Full,
    /// Hash compare; only differing blocks cross. `None` = the whole disk, otherwise the
    /// given ranges (e.g. activity-log extents), widened to whole chunks.
    Delta(Option<Vec<Extent>>),
    /// The current content of the given dirty ranges (widened to whole blocks), no hashing.
    Bitmap(Vec<Extent>),
}

impl SyncPlan {
    /// Wire and progress-file tag.
    pub fn tag(&self) -> u8 {
        match self {
            SyncPlan::Full => 1,
            SyncPlan::Delta(_) => 2,
            SyncPlan::Bitmap(_) => 3,
        }
    }
}

/// Why a sync failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(
        "disk size mismatch: source is {source_size} bytes, target is {target_size} bytes; \
         refused before any data was sent"
    )]
    SizeMismatch { source_size: u64, target_size: u64 },
    #[error("invalid sync configuration: {0}")]
    Config(String),
    #[error("{op} at offset {offset}: {source}")]
    Io {
        op: &'static str,
        offset: u64,
        source: io::Error,
    },
    #[error("sync progress file: {0}")]
    Progress(#[from] CrashSafeError),
    #[error("sync protocol error: {0}")]
    Protocol(String),
    #[error(
        "chunk {chunk} still differs after {attempts} whole-chunk resends (is it being written?)"
    )]
    Unstable { chunk: u64, attempts: u32 },
    #[error("sync peer went away")]
    Disconnected,
    #[error("malformed sync message: {0}")]
    Decode(&'static str),
}

impl SyncError {
    pub(crate) fn io(op: &'static str, offset: u64, source: io::Error) -> Self {
        SyncError::Io { op, offset, source }
    }
}

/// Counters for the end event (Hyper-V's 29244 equivalent). Bytes are wire bytes
/// ([`SyncMsg::wire_len`] plus [`msg::FRAME_OVERHEAD`] per message).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// Blocks covered by a hash comparison (Delta).
    pub blocks_compared: u64,
    /// Blocks whose content crossed (in `Data` messages).
    pub blocks_sent: u64,
    /// Blocks zeroed by a `Zero` command (no payload).
    pub blocks_zeroed: u64,
    /// Payload bytes in `Data` messages.
    pub data_bytes: u64,
    /// Wire bytes source → target.
    pub bytes_to_target: u64,
    /// Wire bytes target → source.
    pub bytes_to_source: u64,
    /// Messages each way.
    pub msgs_to_target: u64,
    pub msgs_to_source: u64,
    /// Chunks resent whole after a failed verification.
    pub chunks_retried: u64,
    pub duration: std::time::Duration,
}

impl SyncStats {
    /// Wire bytes both ways.
    pub fn wire_bytes(&self) -> u64 {
        self.bytes_to_target + self.bytes_to_source
    }
}

/// A readable disk image. `read_at` fills the whole buffer (callers stay within `size`).
/// `Sync` because hashing reads from several threads at once.
pub trait BlockRead: Sync {
    fn size(&self) -> io::Result<u64>;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// A writable disk image (the replica).
pub trait BlockWrite {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every earlier write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Zeroes `len` bytes; the default writes from a shared zero buffer.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64) as usize;
            self.write_at(&ZEROS[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn out_of_range() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "access beyond the end of the disk",
    )
}

impl BlockRead for [u8] {
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let src = self
            .get(start..start.saturating_add(buf.len()))
            .ok_or_else(out_of_range)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl BlockRead for Vec<u8> {
    fn size(&self) -> io::Result<u64> {
        self.as_slice().size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_at(buf, offset)
    }
}

impl BlockWrite for Vec<u8> {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let dst = self
            .get_mut(start..start.saturating_add(buf.len()))
            .ok_or_else(out_of_range)?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<T: BlockRead + ?Sized> BlockRead for &T {
    fn size(&self) -> io::Result<u64> {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
}

impl BlockRead for File {
    // Regular files only for now: a block device reports length 0 here.
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

impl BlockWrite for File {
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}
