//! The journal's one error type, [`JournalError`].

use std::path::PathBuf;

use super::FaultPoint;

/// Everything that can go wrong in the journal. I/O and corruption errors mean
/// "Journal storage error" to the manager: the journal refuses further work until it is
/// reopened, and the disk needs a sync afterwards.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// An operating-system call failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A file of the journal holds bytes that cannot be what the journal wrote (bad CRC,
    /// bad magic, a record missing) where a torn tail is not a possible explanation.
    #[error("corrupt journal file {path} at byte {offset}: {reason}")]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// The caller handed a record the journal cannot take (out of the disk, empty, ...).
    #[error("invalid record seq {seq}: {reason}")]
    InvalidRecord { seq: u64, reason: String },
    /// No checkpoint with this id was ever seen by this journal.
    #[error("unknown checkpoint {0}")]
    UnknownCheckpoint(u64),
    /// The checkpoint was promoted past (or discarded by a commit).
    #[error("checkpoint {0} is no longer retained")]
    CheckpointNotRetained(u64),
    /// The checkpoint marker was appended but is not durable yet (call `sync`).
    #[error("checkpoint {0} is not durable yet")]
    CheckpointNotDurable(u64),
    /// An open view prevents the operation.
    #[error("{0}")]
    Pinned(String),
    /// The journal failed earlier (I/O error, corruption, injected fault) and must be
    /// reopened; what it says is the first failure.
    #[error("journal closed after an earlier failure: {0}")]
    Closed(String),
    /// A read or write outside the disk.
    #[error("range {offset}+{len} is outside the disk of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The configuration or the directory does not fit this journal.
    #[error("journal configuration: {0}")]
    Config(String),
    /// A test hook asked the journal to stop here, as if the process had died.
    #[error("injected fault at {0:?}")]
    Injected(FaultPoint),
}

impl JournalError {
    pub(crate) fn corrupt(
        path: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        JournalError::Corrupt {
            path: path.into(),
            offset,
            reason: reason.into(),
        }
    }
}

/// `map_err` helper: wraps an `io::Error` with a short verb-phrase context. The context
/// string is only built when the error happens (hot paths call this).
pub(crate) fn io_err(context: &'static str) -> impl FnOnce(std::io::Error) -> JournalError {
    move |source| JournalError::Io {
        context: context.to_string(),
        source,
    }
}

/// Like [`io_err`], naming the file.
pub(crate) fn io_at(context: &str, path: &std::path::Path, source: std::io::Error) -> JournalError {
    JournalError::Io {
        context: format!("{context} {}", path.display()),
        source,
    }
}
