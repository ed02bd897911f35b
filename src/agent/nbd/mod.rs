//! The NBD server through which guests read and write protected disks.
//!
//! Code map (mini-redis shape: listener → connection handler → frame codec):
//! - [`server`]: [`NbdServer`] binds, accepts, spawns one handler per connection, and on
//!   shutdown (a cancellation token) waits for every handler to drain.
//! - [`handshake`]: fixed-newstyle option haggling (GO, INFO, EXPORT_NAME, LIST, ABORT).
//! - [`connection`]: transmission — a reader that keeps many requests in flight, device calls
//!   on blocking threads, one writer task sending replies out of order, honouring the
//!   [`CompletionGate`].
//! - [`codec`] and [`proto`]: frame reading (with `Incomplete`) and the wire format.
//! - [`registry`]: [`ExportRegistry`], exports added and removed at run time, by name.
//! - [`device`]: the [`BlockDevice`] trait and [`FileDevice`] (a raw image file).
//! - [`protected`]: [`ProtectedDevice`] = file + dirty tracking + [`WriteSink`] + gate.
//! - [`gate`]: [`CompletionGate`], holding write completions for a consistency checkpoint.
//! - [`pool`]: reusable payload buffers.
//! - [`client`]: a minimal client for tests and probes.
//! - [`bench`](mod@bench): `bulwark bench nbd`, our server against `qemu-nbd` with `qemu-img`.
//!
//! How the agent wires a protected disk (blocking calls belong on a blocking thread):
//!
//! ```no_run
//! # async fn demo() -> Result<(), bulwark::agent::nbd::NbdError> {
//! use std::{path::Path, sync::Arc, time::Duration};
//! use bulwark::agent::dirty::{DirtyConfig, DirtyPaths, DirtyTracker};
//! use bulwark::agent::nbd::*;
//! use tokio_util::sync::CancellationToken;
//!
//! let size = FileDevice::open(Path::new("/var/lib/vm/web-0.raw"), false)?.size();
//! let (tracker, recovery) = DirtyTracker::open(
//!     DirtyPaths::in_dir(Path::new("/var/lib/bulwark/dirty"), "web-0"),
//!     size,
//!     DirtyConfig::default(),
//! )?; // recovery.state: New / Clean / Unclean / Lost → which sync to run
//! let tracker = Arc::new(tracker);
//! let stop = CancellationToken::new();
//! tracker.spawn_persister(Duration::from_secs(5), stop.clone());
//! let gate = CompletionGate::new(); // one per group of disks checkpointed together
//! let disk = Arc::new(ProtectedDevice::new(
//!     FileDevice::open(Path::new("/var/lib/vm/web-0.raw"), false)?,
//!     tracker,
//!     Arc::new(NullSink), // the replication splitter goes here
//!     gate.clone(),
//! )?);
//! let registry = ExportRegistry::new();
//! registry.add("web-0", disk.clone())?;
//! let server = NbdServer::bind("127.0.0.1:10809", registry.clone(), ServerConfig::default()).await?;
//! tokio::spawn(server.run(stop.clone()));
//!
//! // Checkpoint: hold completions, put marker C in every disk's stream, release.
//! let hold = gate.hold();
//! /* splitter.insert_marker(C) for every disk */
//! let held_for = hold.release();
//!
//! // Clean shutdown of the disk.
//! registry.remove_and_drain("web-0").await;
//! tokio::task::spawn_blocking(move || disk.shutdown_clean()).await.ok();
//! # let _ = (recovery, held_for);
//! # Ok(()) }
//! ```

pub mod bench;
pub mod client;
pub mod codec;
pub mod connection;
pub mod device;
pub mod gate;
pub mod handshake;
pub mod pool;
pub mod protected;
pub mod proto;
pub mod registry;
pub mod server;

pub use client::NbdClient;
pub use device::{BlockDevice, FileDevice};
pub use gate::{CompletionGate, HoldGuard};
pub use protected::{
    NullSink, ProtectedDevice, RecordedEvent, RecordingSink, WriteEvent, WriteSink,
};
pub use registry::ExportRegistry;
pub use server::{NbdServer, ServerConfig, ServerStats, StatsSnapshot};

use std::path::PathBuf;

use crate::agent::dirty::DirtyError;

/// Errors of the NBD server, its client and its devices.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Socket I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Opening or sizing a backing file failed.
    #[error("device {}: {source}", path.display())]
    Device {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The peer broke the protocol (bad magic, impossible lengths, …).
    #[error("protocol: {0}")]
    Protocol(String),
    /// The client asked for an export we do not have.
    #[error("unknown export {0:?}")]
    UnknownExport(String),
    /// An export of that name exists already.
    #[error("export {0:?} already exists")]
    ExportExists(String),
    /// The export name (or description) is not a valid NBD string.
    #[error("invalid export name {0}")]
    InvalidExportName(String),
    /// Inconsistent set-up.
    #[error("configuration: {0}")]
    Config(String),
    /// Dirty tracking failed.
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    /// (Client) the server refused an option.
    #[error("server refused option {option} with reply {reply:#x}: {message}")]
    OptionRefused {
        /// The option.
        option: u32,
        /// The error reply type.
        reply: u32,
        /// The server's message.
        message: String,
    },
    /// (Client) the server answered a request with an NBD error value.
    #[error("server returned NBD error {0}")]
    Remote(u32),
    /// The benchmark could not run.
    #[error("benchmark: {0}")]
    Bench(String),
}
