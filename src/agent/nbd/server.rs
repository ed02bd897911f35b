//! The listener: binds, accepts connections (bounded), runs a handler per connection
//! (negotiation, then transmission), and on shutdown stops accepting and waits for every
//! handler to finish its in-flight requests. Besides its TCP address a server may also
//! listen on a unix socket (the local hypervisor attaches its guests' disks there).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, ToSocketAddrs, UnixListener};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::codec::FrameReader;
use super::connection::{self, InlineBreaker};
use super::handshake::{self, Outcome};
use super::pool::BufPool;
use super::registry::ExportRegistry;
use super::NbdError;

/// Limits of one server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE accepted (also advertised as the maximum block size).
    pub max_request: u32,
    /// Requests in flight per connection.
    pub max_inflight: usize,
    /// Payload bytes in flight per connection (reads and writes); raised to at least one
    /// `max_request`. Worst-case payload memory is `max_connections` × this.
    pub max_inflight_bytes: usize,
    /// Concurrent connections; further clients wait in the kernel's backlog.
    pub max_connections: usize,
    /// Time a client gets to finish negotiation.
    pub handshake_timeout: Duration,
    /// A refused WRITE's payload up to this size is read and discarded (keeping the
    /// connection); a larger one ends the connection.
    pub drain_limit: u64,
    /// Idle payload buffers kept for reuse, in bytes, all sizes together.
    pub pool_keep_bytes: usize,
    /// Reads and non-FUA writes up to this size first try the device's non-blocking fast
    /// path on the async thread (no thread hand-off); 0 disables it.
    pub inline_max: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_request: 32 << 20,
            max_inflight: 64,
            max_inflight_bytes: 64 << 20,
            max_connections: 256,
            handshake_timeout: Duration::from_secs(30),
            drain_limit: 64 << 20,
            pool_keep_bytes: 64 << 20,
            inline_max: 64 << 10,
        }
    }
}

/// A bound NBD server. Build with [`bind`](Self::bind), serve with [`run`](Self::run).
#[derive(Debug)]
pub struct NbdServer {
    listener: TcpListener,
    unix: Option<(UnixListener, PathBuf)>,
    registry: ExportRegistry,
    shared: Arc<Shared>,
}

/// What every connection of a server shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) pool: Arc<BufPool>,
    pub(crate) breaker: InlineBreaker,
    pub(crate) stats: Arc<ServerStats>,
}

/// Counters of one server, readable while it runs (for metrics).
#[derive(Debug, Default)]
pub struct ServerStats {
    pub(crate) connections: AtomicU64,
    pub(crate) requests: AtomicU64,
    pub(crate) inline: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) breaker_trips: AtomicU64,
}

/// A copy of [`ServerStats`] at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Connections that reached transmission.
    pub connections: u64,
    /// Requests answered or being answered (DISC excluded).
    pub requests: u64,
    /// Requests served by the device's non-blocking fast path on the async thread.
    pub inline: u64,
    /// Requests answered with an error.
    pub errors: u64,
    /// Times a slow inline call turned the fast path off for a while.
    pub breaker_trips: u64,
}

impl ServerStats {
    /// Reads every counter.
    pub fn snapshot(&self) -> StatsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        StatsSnapshot {
            connections: get(&self.connections),
            requests: get(&self.requests),
            inline: get(&self.inline),
            errors: get(&self.errors),
            breaker_trips: get(&self.breaker_trips),
        }
    }
}

impl NbdServer {
    /// Binds the listening socket (use port 0 for an ephemeral port).
    pub async fn bind(
        addr: impl ToSocketAddrs,
        registry: ExportRegistry,
        config: ServerConfig,
    ) -> Result<Self, NbdError> {
        let listener = TcpListener::bind(addr).await?;
        let pool = BufPool::new(config.pool_keep_bytes);
        Ok(NbdServer {
            listener,
            unix: None,
            registry,
            shared: Arc::new(Shared {
                config,
                pool,
                breaker: InlineBreaker::default(),
                stats: Arc::new(ServerStats::default()),
            }),
        })
    }

    /// Also listens on the unix socket `path` (a stale socket file left by a killed
    /// agent is replaced; the file is removed when the server stops).
    pub fn listen_unix(&mut self, path: &Path) -> Result<(), NbdError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
        self.unix = Some((UnixListener::bind(path)?, path.to_path_buf()));
        Ok(())
    }

    /// The unix socket served, if any.
    pub fn unix_path(&self) -> Option<&Path> {
        self.unix.as_ref().map(|(_, p)| p.as_path())
    }

    /// The bound address.
    pub fn local_addr(&self) -> Result<SocketAddr, NbdError> {
        Ok(self.listener.local_addr()?)
    }

    /// The export registry served.
    pub fn registry(&self) -> &ExportRegistry {
        &self.registry
    }

    /// The server's counters (keep the handle: `run` consumes the server).
    pub fn stats(&self) -> Arc<ServerStats> {
        Arc::clone(&self.shared.stats)
    }

    /// Serves until `shutdown` is cancelled, then waits for every connection to answer
    /// its in-flight requests and close.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), NbdError> {
        let tracker = TaskTracker::new();
        let limit = Arc::new(Semaphore::new(self.shared.config.max_connections.max(1)));
        let mut backoff = Duration::from_millis(10);
        tracing::info!(addr = ?self.listener.local_addr().ok(), "nbd server listening");
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = Arc::clone(&limit).acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.listener.accept() => r.map(|(sock, peer)| Accepted::Tcp(sock, peer)),
                r = accept_unix(self.unix.as_ref()) => r.map(Accepted::Unix),
            };
            let accepted = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            backoff = Duration::from_millis(10);
            let handler = Handler {
                registry: self.registry.clone(),
                shared: Arc::clone(&self.shared),
                shutdown: shutdown.clone(),
                _permit: permit,
            };
            match accepted {
                Accepted::Tcp(sock, peer) => {
                    // Small replies must not wait for Nagle.
                    if let Err(e) = sock.set_nodelay(true) {
                        tracing::debug!(error = %e, "TCP_NODELAY failed");
                    }
                    let (rd, wr) = sock.into_split();
                    let span = tracing::debug_span!("nbd_conn", %peer);
                    tracker.spawn(handler.run(rd, wr).instrument(span));
                }
                Accepted::Unix(sock) => {
                    let (rd, wr) = sock.into_split();
                    let span = tracing::debug_span!("nbd_conn", peer = "unix");
                    tracker.spawn(handler.run(rd, wr).instrument(span));
                }
            }
        }
        tracker.close();
        tracker.wait().await;
        if let Some((_, path)) = &self.unix {
            let _ = std::fs::remove_file(path);
        }
        tracing::info!("nbd server stopped");
        Ok(())
    }
}

/// An accepted connection; each transport gets its own monomorphic handler.
enum Accepted {
    Tcp(tokio::net::TcpStream, SocketAddr),
    Unix(tokio::net::UnixStream),
}

/// The next unix connection; never resolves without a unix listener.
async fn accept_unix(
    unix: Option<&(UnixListener, PathBuf)>,
) -> std::io::Result<tokio::net::UnixStream> {
    match unix {
        Some((l, _)) => l.accept().await.map(|(s, _)| s),
        None => std::future::pending().await,
    }
}

/// Per-connection state.
struct Handler {
    registry: ExportRegistry,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    _permit: OwnedSemaphorePermit,
}

impl Handler {
    async fn run<R, W>(self, rd: R, mut wr: W)
    where
        R: AsyncRead + Send + Unpin + 'static,
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let mut rd = FrameReader::new(rd);
        let negotiated = tokio::select! {
            _ = self.shutdown.cancelled() => return,
            r = tokio::time::timeout(
                self.shared.config.handshake_timeout,
                handshake::negotiate(&mut rd, &mut wr, &self.registry, &self.shared.config),
            ) => r,
        };
        let export = match negotiated {
            Ok(Ok(Outcome::Transmission(export))) => export,
            Ok(Ok(Outcome::Closed)) => return,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "negotiation ended");
                return;
            }
            Err(_) => {
                tracing::debug!("negotiation timed out");
                return;
            }
        };
        // Counted until this handler ends (the export's drain waits for it).
        let _conn = export.connection_token();
        if export.removed().is_cancelled() {
            return; // removed while we negotiated
        }
        tracing::debug!(export = export.name(), "transmission started");
        self.shared
            .stats
            .connections
            .fetch_add(1, Ordering::Relaxed);
        // One token for "server shutting down or export removed".
        let cancel = self.shutdown.child_token();
        let _stop_watch = cancel.clone().drop_guard();
        {
            let cancel = cancel.clone();
            let removed = export.removed().clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = removed.cancelled() => cancel.cancel(),
                    _ = cancel.cancelled() => {}
                }
            });
        }
        let res = connection::serve(rd, wr, Arc::clone(&export), self.shared, cancel).await;
        match res {
            Ok(()) => tracing::debug!(export = export.name(), "connection closed"),
            Err(e) => tracing::debug!(export = export.name(), error = %e, "connection ended"),
        }
    }
}
