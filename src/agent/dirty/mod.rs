//! Dirty-region tracking for protected disks: which parts of a disk may differ from its replica.
//!
//! Code map:
//! - [`bitmap`]: [`DirtyBitmap`], one bit per region (64 KiB by default), set lock-free on
//!   every write and persisted crash-safely with a `clean` flag.
//! - [`activity_log`]: [`ActivityLog`], after DRBD's: the bounded set of "hot" extents
//!   (4 MiB by default) made durable *before* any write into a new extent is issued.
//! - [`tracker`]: [`DirtyTracker`] ties the two together for one disk and is what the NBD
//!   write path calls.
//! - `crate::agent::crashsafe`: temp → fsync → rename → fsync-dir, for both file formats.
//!
//! Crash argument in one paragraph: every write sets its bitmap bits and makes sure its
//! extents are in the durable activity log *before* the data goes to the local disk. An
//! extent may leave the log only once a bitmap persisted *after* its last write is on disk.
//! So after a crash, "persisted bitmap ∪ activity-log extents" covers every region that may
//! differ from the replica; the bitmap alone (flag `clean == false`) does not.

pub mod activity_log;
pub mod bitmap;
pub mod tracker;

pub use activity_log::{ActivityLog, AlRecovered, DEFAULT_AL_CAPACITY, DEFAULT_EXTENT_SIZE};
pub use bitmap::{DirtyBitmap, DEFAULT_REGION_SIZE};
pub use tracker::{DirtyConfig, DirtyPaths, DirtyTracker, Recovery, RecoveryState};

use std::io;
use std::path::PathBuf;

/// Errors of the dirty-tracking files and their in-memory state.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// An I/O call on one of our files failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What we were doing ("write", "fsync", …).
        op: &'static str,
        /// The file (or directory) concerned.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The file is not ours, is damaged, or is of a version we cannot read.
    #[error("{}: {reason}", path.display())]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The on-disk geometry does not match the disk it is opened for.
    #[error("{}: {reason}", path.display())]
    Geometry {
        /// The file concerned.
        path: PathBuf,
        /// The mismatch.
        reason: String,
    },
    /// A parameter is out of range.
    #[error("invalid dirty-tracking configuration: {0}")]
    Config(String),
    /// The tracker was closed cleanly; no more writes may be marked.
    #[error("dirty tracker is closed")]
    Closed,
}

impl DirtyError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        DirtyError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DirtyError::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// True when the error says the file does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, DirtyError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound)
    }
}

impl From<crate::agent::crashsafe::CrashSafeError> for DirtyError {
    fn from(e: crate::agent::crashsafe::CrashSafeError) -> Self {
        DirtyError::Io {
            op: e.op,
            path: e.path,
            source: e.source,
        }
    }
}
