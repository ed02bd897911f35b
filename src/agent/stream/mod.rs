//! The replication stream: one framed, acknowledged, TLS-protected connection per
//! (protected host, recovery host) pair carrying the write records of all its disks.
//!
//! Code map (the mini-redis shape):
//! - [`Sender`] (`sender`): protected side. A non-blocking `enqueue` per record; the
//!   outbound queue (memory, then the spill log), the connection task with back-off,
//!   resend from the receiver's durable seq, bandwidth limit, bitmap-only fallback.
//! - `spill`: the append-only, CRC'd local log a disk's queue overflows into.
//! - [`Receiver`] (`receiver`): recovery side. Listener → handler per connection →
//!   journal thread per connection (blocking journal calls never run on the reactor).
//! - `conn`: [`FrameReader`] / [`FrameWriter`] over any byte stream (TCP or TLS), the
//!   frame buffer with its `Incomplete` case; the wire format is `crate::proto::stream`.
//! - `sync_target`: the recovery side of a sync session (a second connection to the
//!   same listener, first frame `SyncFrame::Hello`) and the per-disk `sync.state`.
//! - [`bench`]: `bulwark bench stream`.
//!
//! Invariants:
//! 1. The sender forgets a record only once the receiver acknowledged its seq as durable
//!    (fsynced in the journal), or when the disk goes bitmap-only (then the dirty bitmap
//!    is the record of what changed, and `NeedsBitmapSync` says so).
//! 2. Per disk, records are sent in seq order; after a reconnect everything above the
//!    `Welcome`'s durable seq is sent again; the journal drops seqs it already holds.
//! 3. A frame that fails its CRC ends the connection; nothing after it is applied.
//! 4. `Sender::enqueue` takes one short lock and at most one buffered file write: it
//!    never waits for the network or the peer.

pub mod bench;
mod conn;
mod receiver;
mod sender;
mod spill;
mod sync_target;

use std::sync::Arc;

pub use conn::{FrameReader, FrameWriter};
pub use receiver::{DiskLagReport, Receiver, ReceiverConfig, ReceiverHandle};
pub use sender::{
    DiskMode, DiskSpec, DiskStats, Enqueued, Sender, SenderConfig, SessionConn, StreamEvent,
};
pub use sync_target::{
    preseed, preseed_move, recoverable, LastSync, RunningSync, SyncState, SYNC_STATE_FILE,
};

use crate::agent::journal::JournalError;
use crate::proto::stream::FrameError;

/// Errors at the stream's boundary.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("peer refused the stream: {0}")]
    Refused(String),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("peer closed the connection")]
    Closed,
    #[error("timed out: {0}")]
    Timeout(&'static str),
    #[error("unknown disk {0}")]
    UnknownDisk(u64),
    #[error("disk {disk}: seq {seq} is not above the last enqueued {last}")]
    OutOfOrder { disk: u64, seq: u64, last: u64 },
    #[error("record too large: {0} bytes")]
    TooLarge(usize),
    #[error("spill log {path}: {source}")]
    Spill {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("configuration: {0}")]
    Config(String),
    /// The sender's disk set changed: the connection is renewed (not a failure).
    #[error("the disk set changed; reconnecting")]
    Reconfigured,
    /// Disks the receiver refused (not fenced) are offered again by a new connection
    /// (not a failure).
    #[error("offering refused disks again; reconnecting")]
    Reoffer,
    #[error("protection of disk {0} is paused")]
    Paused(u64),
    #[error("sync state {path}: {reason}")]
    SyncState {
        path: std::path::PathBuf,
        reason: String,
    },
}

pub(crate) fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> StreamError {
    move |source| StreamError::Io { context, source }
}

/// How the protected side dials.
#[derive(Clone)]
pub enum ClientTransport {
    /// Mutual TLS; `server_name` is the recovery host's name in its certificate.
    Tls {
        config: Arc<rustls::ClientConfig>,
        server_name: String,
    },
    /// Plain TCP: only with the operator's explicit `--insecure`.
    Insecure,
}

/// How the recovery side listens.
#[derive(Clone)]
pub enum ServerTransport {
    /// Mutual TLS: client certificates required, verified against the CA.
    Tls(Arc<rustls::ServerConfig>),
    /// Plain TCP: only with the operator's explicit `--insecure`. The allow-list still
    /// applies, to the host name the `Hello` claims, which nothing proves.
    Insecure,
}

impl std::fmt::Debug for ClientTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientTransport::Tls { server_name, .. } => write!(f, "Tls({server_name})"),
            ClientTransport::Insecure => f.write_str("Insecure"),
        }
    }
}

impl std::fmt::Debug for ServerTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ServerTransport::Tls(_) => f.write_str("Tls"),
            ServerTransport::Insecure => f.write_str("Insecure"),
        }
    }
}

/// Any byte stream a connection runs over (TCP, or TLS over TCP).
pub(crate) trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
