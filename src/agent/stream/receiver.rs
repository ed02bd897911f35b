//! The recovery side of the stream: listener, one handler per connection (TLS, Hello,
//! allow-list, Welcome, frames) and one journal thread per connection that appends,
//! group-commits and produces the acks.
//!
//! Journals live in a registry shared by all connections of a receiver, keyed by
//! (protected host, disk): a reconnect finds its journal open, with records buffered by
//! the previous connection; the journal's seq check drops the resent ones. A new
//! connection from a host cancels the one it replaces. A connection whose first frame
//! is a sync `Hello` is a sync session (`sync_target`): same admission, same registry,
//! and it leaves the host's stream connection alone.
//!
//! A journal that failed (a full file system, an I/O error: it closes itself on the first
//! one) stays in the registry, its error reported, and its disk is refused (not fenced)
//! until a connection or a recovery asks for it once its storage takes writes again:
//! then it is replaced by a freshly opened one, checked against what it had made durable
//! (`reopen_if_failed`). The sender offers a refused disk again by itself.
//!
//! The allow-list changes at run time ([`ReceiverHandle::set_allow`]): new connections
//! are admitted against the current list, and every live connection of a host taken off
//! it is closed. Each open journal counts the connections using it, so a journal in use
//! is never dropped ([`ReceiverHandle::drop_disk`]).
//!
//! Fencing: with [`ReceiverConfig::fencing`] set (the agent's record), every disk of a
//! stream `Hello` and every sync session is admitted through it by its VPG id and fencing
//! generation before its journal is opened: a stale one is refused (listed in the
//! `Welcome`'s `refused` with `fenced`, or a `Refused` frame for a session) and its
//! journal is not touched. A connection admitted earlier is checked again before each
//! batch is appended, so a generation recorded meanwhile (the manager's desired state
//! after a failover) ends it without appending anything more.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::conn::{FrameReader, FrameWriter};
use super::sync_target::{self, recoverable, OpenDisk, SyncCell, SyncState};
use super::{io, now_ms, Io, ServerTransport, StreamError};
use crate::agent::fencing::{Fencing, FencingError};
use crate::agent::journal::{
    CheckpointInfo, CheckpointKind, CommitReport, Durability, Journal, JournalConfig, Record, View,
};
use crate::agent::tls::cert_names_host;
use crate::proto::stream::{
    Compression, DiskAck, DiskHello, DiskLag, DiskRefused, Frame, RecordBody, StreamRecord,
    SyncFrame, PROTOCOL_VERSION,
};

/// How the receiver runs.
#[derive(Debug, Clone)]
pub struct ReceiverConfig {
    pub listen: SocketAddr,
    pub transport: ServerTransport,
    /// Protected hosts allowed to stream here, each with its storage path (journals and
    /// replica disks go under it, one directory per disk).
    pub allow: HashMap<String, PathBuf>,
    /// Journal tuning for disks opened by this receiver.
    pub segment_size: u64,
    pub write_buffer: usize,
    /// Group commit: a sync at the latest after this many received bytes (otherwise
    /// whenever no more frames are waiting).
    pub sync_bytes: usize,
    pub handshake_timeout: Duration,
    /// No frame from the sender for this long ends the connection (it pings every
    /// second or so).
    pub peer_timeout: Duration,
    /// The host's fencing record; `None` admits every generation (tools and tests that
    /// run a bare receiver).
    pub fencing: Option<Arc<Fencing>>,
}

impl ReceiverConfig {
    pub fn new(listen: SocketAddr, transport: ServerTransport) -> Self {
        ReceiverConfig {
            listen,
            transport,
            allow: HashMap::new(),
            segment_size: 64 << 20,
            write_buffer: 4 << 20,
            sync_bytes: 8 << 20,
            handshake_timeout: Duration::from_secs(10),
            peer_timeout: Duration::from_secs(15),
            fencing: None,
        }
    }
}

/// Replication lag of one disk as the recovery side sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskLagReport {
    pub host: String,
    pub disk_id: u64,
    /// Highest seq received (maybe not durable yet).
    pub received_seq: u64,
    pub durable_seq: u64,
    /// Received, not yet durable.
    pub pending_records: u64,
    pub pending_bytes: u64,
    /// Now minus the write time of the newest durable record.
    pub durable_age_ms: u64,
    /// As the sender last reported (Ping): records and bytes it holds unacknowledged,
    /// and the age of the oldest.
    pub sender: DiskLag,
}

type SharedJournal = Arc<Mutex<Journal>>;

/// (protected host, disk id) → connections (stream or sync session) using the journal.
type BusyMap = Arc<Mutex<HashMap<(String, u64), usize>>>;

/// One connection's use of a journal; dropping it ends the use.
pub(crate) struct Busy {
    map: BusyMap,
    key: (String, u64),
}

impl Busy {
    /// Counts a use; called under the journal registry's lock (see `open_disk`).
    fn take(map: &BusyMap, key: (String, u64)) -> Busy {
        *lock(map).entry(key.clone()).or_insert(0) += 1;
        Busy {
            map: Arc::clone(map),
            key,
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut m = lock(&self.map);
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// A host on the allow-list: where its disks go, and the token that closes its live
/// connections when it is taken off the list.
struct Allowed {
    storage: PathBuf,
    token: CancellationToken,
}

#[derive(Default)]
struct LagState {
    report: DiskLagReport,
    /// Write time of the newest received / durable record, unix ms.
    received_ts: i64,
    durable_ts: i64,
}

struct Shared {
    cfg: ReceiverConfig,
    /// The current allow-list (starts as `cfg.allow`).
    allow: Mutex<HashMap<String, Allowed>>,
    busy: BusyMap,
    /// The last journal storage error of a disk (cleared when its journal syncs again).
    errors: Mutex<HashMap<(String, u64), String>>,
    journals: Mutex<HashMap<(String, u64), SharedJournal>>,
    /// Beside each journal of `journals` (both are inserted under its lock).
    syncs: Mutex<HashMap<(String, u64), Arc<SyncCell>>>,
    conns: Mutex<HashMap<String, CancellationToken>>,
    lag: Mutex<BTreeMap<(String, u64), LagState>>,
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads figures of a running [`Receiver`].
#[derive(Clone)]
pub struct ReceiverHandle {
    shared: Arc<Shared>,
}

impl ReceiverHandle {
    /// Per-disk lag, every disk that ever connected to this receiver.
    pub fn lag(&self) -> Vec<DiskLagReport> {
        let now = now_ms();
        lock(&self.shared.lag)
            .values()
            .map(|l| {
                let mut r = l.report.clone();
                r.durable_age_ms = if l.durable_ts == 0 {
                    0
                } else {
                    (now - l.durable_ts).max(0) as u64
                };
                r
            })
            .collect()
    }

    /// The sync state of a disk opened since this receiver started.
    pub fn sync_state(&self, host: &str, disk_id: u64) -> Option<SyncState> {
        let cell = lock(&self.shared.syncs)
            .get(&(host.to_string(), disk_id))
            .cloned()?;
        Some(cell.get())
    }

    /// Replaces the allow-list. Hosts no longer on it (or whose storage moved) have
    /// their live stream and sync connections closed; new connections see the new list.
    pub fn set_allow(&self, allow: HashMap<String, PathBuf>) {
        let mut cur = lock(&self.shared.allow);
        cur.retain(|host, a| {
            let keep = allow.get(host) == Some(&a.storage);
            if !keep {
                tracing::info!(%host, "host taken off the allow-list: closing its connections");
                a.token.cancel();
            }
            keep
        });
        for (host, storage) in allow {
            cur.entry(host).or_insert_with(|| Allowed {
                storage,
                token: CancellationToken::new(),
            });
        }
    }

    /// The current allow-list.
    pub fn allowed(&self) -> HashMap<String, PathBuf> {
        lock(&self.shared.allow)
            .iter()
            .map(|(h, a)| (h.clone(), a.storage.clone()))
            .collect()
    }

    /// (protected host, disk id) of every journal open in this receiver.
    pub fn journal_keys(&self) -> Vec<(String, u64)> {
        let mut keys: Vec<_> = lock(&self.shared.journals).keys().cloned().collect();
        keys.sort();
        keys
    }

    /// Bytes a journal occupies (segments, buffered bytes included). Takes the journal's
    /// lock, as [`ReceiverHandle::checkpoints`] does.
    pub fn journal_bytes(&self, host: &str, disk_id: u64) -> Option<u64> {
        let j = lock(&self.shared.journals)
            .get(&(host.to_string(), disk_id))
            .cloned()?;
        let bytes = lock(&j).stats().bytes_used;
        Some(bytes)
    }

    /// The last storage error of a journal, until it syncs again.
    pub fn storage_error(&self, host: &str, disk_id: u64) -> Option<String> {
        lock(&self.shared.errors)
            .get(&(host.to_string(), disk_id))
            .cloned()
    }

    /// Whether a connection (stream or sync session) uses the disk's journal now.
    pub fn is_busy(&self, host: &str, disk_id: u64) -> bool {
        lock(&self.shared.busy).contains_key(&(host.to_string(), disk_id))
    }

    /// Closes the journal of (host, disk) and deletes `dir` (its journal, replica disk and
    /// sync state). Refused while a connection streams or syncs the disk; a connection
    /// arriving meanwhile waits for the registry and starts a new, empty replica.
    /// Blocking.
    pub fn drop_disk(&self, host: &str, disk_id: u64, dir: &Path) -> Result<(), StreamError> {
        let key = (host.to_string(), disk_id);
        let mut reg = lock(&self.shared.journals);
        if lock(&self.shared.busy).contains_key(&key) {
            return Err(StreamError::Refused(format!(
                "host {host:?} still streams disk {disk_id}: stop its protection first"
            )));
        }
        if let Some(j) = reg.remove(&key) {
            if let Err(e) = lock(&j).sync() {
                tracing::warn!(%host, disk = disk_id, error = %e, "journal sync before drop failed");
            }
        }
        lock(&self.shared.syncs).remove(&key);
        lock(&self.shared.lag).remove(&key);
        lock(&self.shared.errors).remove(&key);
        match std::fs::remove_dir_all(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("delete replica directory")(e)),
        }
        drop(reg);
        tracing::info!(%host, disk = disk_id, dir = %dir.display(), "replica dropped");
        Ok(())
    }

    /// Background promotion of (host, disk)'s journal under `policy` (see
    /// [`Journal::promote`]): None when the journal is not open here or a sync runs over
    /// it (a sync's bytes and its recoverability bookkeeping must see one replica).
    /// Takes the journal's lock for as long as the promotion writes. Blocking.
    pub fn promote(
        &self,
        host: &str,
        disk_id: u64,
        policy: &crate::agent::journal::PromotePolicy,
    ) -> Result<Option<crate::agent::journal::PromoteReport>, StreamError> {
        let key = (host.to_string(), disk_id);
        let Some(j) = lock(&self.shared.journals).get(&key).cloned() else {
            return Ok(None);
        };
        if self
            .sync_state(host, disk_id)
            .is_none_or(|s| s.running.is_some())
        {
            return Ok(None);
        }
        let mut g = lock(&j);
        // A journal closed by a storage error waits to be reopened (a connection asking
        // for it does that once its storage works); its error is reported already.
        if g.failure().is_some() {
            return Ok(None);
        }
        match g.promote(policy) {
            Ok(report) => Ok(Some(report)),
            Err(e) => {
                if g.failure().is_some() {
                    note_error(&self.shared, host, disk_id, &e);
                }
                Err(e.into())
            }
        }
    }

    /// Every durable checkpoint of a disk opened since this receiver started, with
    /// whether it may be recovered to (no sync made it unrecoverable). Takes the
    /// journal's lock: not for the reactor thread when the journal is busy.
    pub fn checkpoints(&self, host: &str, disk_id: u64) -> Option<Vec<(CheckpointInfo, bool)>> {
        let key = (host.to_string(), disk_id);
        let j = lock(&self.shared.journals).get(&key).cloned()?;
        let state = self.sync_state(host, disk_id)?;
        let cps = lock(&j).checkpoints();
        Some(
            cps.into_iter()
                .map(|c| {
                    let ok = recoverable(&state, c.seq);
                    (c, ok)
                })
                .collect(),
        )
    }
}

/// Recovery (`agent::recovery`): journals opened without a connection, views, commits.
impl ReceiverHandle {
    /// The journal and sync state of (host, disk) from the registry, or opened from
    /// `<storage>/disk-XXXXXXXXXXXXXXXX` when no connection opened them since start (a
    /// recovery after a restart, with the protected site gone). The disk must exist: its
    /// size is the replica's. Uses no connection slot (`is_busy` stays false). Blocking.
    fn recovery_journal(
        &self,
        host: &str,
        disk_id: u64,
        storage: &Path,
    ) -> Result<(SharedJournal, Arc<SyncCell>), StreamError> {
        let key = (host.to_string(), disk_id);
        let dir = storage.join(format!("disk-{disk_id:016x}"));
        let mut reg = lock(&self.shared.journals);
        // A journal that failed is no use to a recovery: reopened if its storage works.
        reopen_if_failed(&self.shared, &mut reg, &key, &dir)?;
        let sync = lock(&self.shared.syncs).get(&key).cloned();
        if let (Some(j), Some(sync)) = (reg.get(&key), sync) {
            return Ok((j.clone(), sync));
        }
        let replica = dir.join("replica.img");
        let size = match std::fs::metadata(&replica) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StreamError::Refused(format!(
                    "no replica of disk {disk_id} from host {host:?} here ({})",
                    dir.display()
                )))
            }
            Err(e) => return Err(io("stat replica")(e)),
        };
        let sync = Arc::new(SyncCell::load_or_init(&dir)?);
        let j = match reg.get(&key) {
            Some(j) => j.clone(),
            None => {
                let mut cfg = JournalConfig::new(disk_id, size);
                cfg.segment_size = self.shared.cfg.segment_size;
                cfg.write_buffer = self.shared.cfg.write_buffer;
                let j = Arc::new(Mutex::new(Journal::open(
                    dir.join("journal"),
                    &replica,
                    cfg,
                )?));
                reg.insert(key.clone(), j.clone());
                j
            }
        };
        lock(&self.shared.syncs).insert(key, sync.clone());
        Ok((j, sync))
    }

    /// Durable checkpoints of a disk with their recoverability, opening the journal
    /// from `storage` if needed (see [`ReceiverHandle::checkpoints`]). Blocking.
    pub fn recovery_checkpoints(
        &self,
        host: &str,
        disk_id: u64,
        storage: &Path,
    ) -> Result<Vec<(CheckpointInfo, bool)>, StreamError> {
        let (j, sync) = self.recovery_journal(host, disk_id, storage)?;
        let state = sync.get();
        let cps = lock(&j).checkpoints();
        Ok(cps
            .into_iter()
            .map(|c| {
                let ok = recoverable(&state, c.seq);
                (c, ok)
            })
            .collect())
    }

    /// Opens a view of (host, disk) at `checkpoint`, which must be durable and
    /// recoverable (a sync can make checkpoints unrecoverable: such a view would show a
    /// disk that never existed). Blocking.
    pub fn open_view(
        &self,
        host: &str,
        disk_id: u64,
        storage: &Path,
        checkpoint: u64,
    ) -> Result<View, StreamError> {
        let (j, sync) = self.recovery_journal(host, disk_id, storage)?;
        let j = lock(&j);
        let state = sync.get();
        match j.checkpoints().into_iter().find(|c| c.id == checkpoint) {
            Some(c) if !recoverable(&state, c.seq) => Err(StreamError::Refused(format!(
                "checkpoint {checkpoint} of disk {disk_id} from host {host:?} is not \
                 recoverable (a sync made it unrecoverable)"
            ))),
            _ => Ok(j.open_view(checkpoint)?),
        }
    }

    /// Commits `view` into its journal's replica (see [`Journal::commit`]). Refused while
    /// a connection streams or syncs the disk. Blocking.
    pub fn commit_view(
        &self,
        host: &str,
        disk_id: u64,
        view: View,
    ) -> Result<CommitReport, StreamError> {
        let key = (host.to_string(), disk_id);
        let j = lock(&self.shared.journals)
            .get(&key)
            .cloned()
            .ok_or_else(|| {
                StreamError::Refused(format!(
                    "no journal of disk {disk_id} from host {host:?} is open"
                ))
            })?;
        if self.is_busy(host, disk_id) {
            return Err(StreamError::Refused(format!(
                "host {host:?} still streams or syncs disk {disk_id}: stop its protection first"
            )));
        }
        let r = lock(&j).commit(view)?;
        Ok(r)
    }
}

/// The recovery side's listener. [`Receiver::bind`] then [`Receiver::run`].
pub struct Receiver {
    listener: TcpListener,
    shared: Arc<Shared>,
}

impl Receiver {
    pub async fn bind(cfg: ReceiverConfig) -> Result<Receiver, StreamError> {
        if matches!(cfg.transport, ServerTransport::Insecure) {
            tracing::warn!(listen = %cfg.listen, "replication receiver without TLS (--insecure): data and identity are unprotected");
        }
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(io("bind replication listener"))?;
        Ok(Receiver {
            listener,
            shared: Arc::new(Shared {
                allow: Mutex::new(
                    cfg.allow
                        .iter()
                        .map(|(h, p)| {
                            (
                                h.clone(),
                                Allowed {
                                    storage: p.clone(),
                                    token: CancellationToken::new(),
                                },
                            )
                        })
                        .collect(),
                ),
                busy: Arc::new(Mutex::new(HashMap::new())),
                errors: Mutex::new(HashMap::new()),
                cfg,
                journals: Mutex::new(HashMap::new()),
                syncs: Mutex::new(HashMap::new()),
                conns: Mutex::new(HashMap::new()),
                lag: Mutex::new(BTreeMap::new()),
            }),
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, StreamError> {
        self.listener.local_addr().map_err(io("local address"))
    }

    pub fn handle(&self) -> ReceiverHandle {
        ReceiverHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves until `cancel`; then stops every connection, waits for them, and syncs and
    /// closes every journal.
    pub async fn run(self, cancel: CancellationToken) -> Result<(), StreamError> {
        let mut handlers = JoinSet::new();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok((tcp, peer)) => {
                        let shared = self.shared.clone();
                        let token = cancel.child_token();
                        handlers.spawn(
                            handle(shared, tcp, peer, token)
                                .instrument(tracing::info_span!("stream-receiver-conn", %peer)),
                        );
                    }
                    Err(e) => {
                        // Out of descriptors and the like: wait a little, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = handlers.join_next(), if !handlers.is_empty() => {}
            }
        }
        drop(self.listener);
        while handlers.join_next().await.is_some() {}
        let journals: Vec<SharedJournal> = lock(&self.shared.journals)
            .drain()
            .map(|(_, j)| j)
            .collect();
        tokio::task::spawn_blocking(move || {
            for j in journals {
                if let Err(e) = lock(&j).sync() {
                    tracing::error!(error = %e, "journal sync at shutdown failed");
                }
            }
        })
        .await
        .map_err(|e| StreamError::Protocol(format!("journal close task: {e}")))?;
        Ok(())
    }
}

async fn handle(shared: Arc<Shared>, tcp: TcpStream, peer: SocketAddr, cancel: CancellationToken) {
    match serve(&shared, tcp, cancel).await {
        Ok(()) => tracing::info!(%peer, "replication connection closed"),
        Err(StreamError::Refused(reason)) => {
            tracing::warn!(%peer, %reason, "replication stream refused")
        }
        Err(e @ StreamError::Frame(_)) => {
            tracing::error!(%peer, error = %e, "bad frame: closing the connection")
        }
        Err(e) => tracing::warn!(%peer, error = %e, "replication connection ended"),
    }
}

/// Sends a refusal (best effort), closes, and returns the error for the caller's log.
pub(crate) async fn refuse<W: tokio::io::AsyncWrite + Unpin>(
    writer: &mut FrameWriter<W>,
    reason: String,
) -> StreamError {
    let _ = writer
        .send(&Frame::Refused {
            reason: reason.clone(),
        })
        .await;
    writer.shutdown().await;
    StreamError::Refused(reason)
}

async fn serve(
    shared: &Arc<Shared>,
    tcp: TcpStream,
    cancel: CancellationToken,
) -> Result<(), StreamError> {
    let cfg = &shared.cfg;
    let _ = tcp.set_nodelay(true);
    crate::net::tune_long_lived(&tcp, cfg.peer_timeout);
    let (stream, cert): (Box<dyn Io>, Option<CertificateDer<'static>>) = match &cfg.transport {
        ServerTransport::Insecure => (Box::new(tcp), None),
        ServerTransport::Tls(config) => {
            let accept = tokio::time::timeout(
                cfg.handshake_timeout,
                tokio_rustls::TlsAcceptor::from(config.clone()).accept(tcp),
            );
            let tls = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = accept => r,
            }
            .map_err(|_| StreamError::Timeout("TLS handshake"))?
            .map_err(|e| StreamError::Tls(e.to_string()))?;
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.clone().into_owned());
            if cert.is_none() {
                return Err(StreamError::Tls("no client certificate".into()));
            }
            (Box::new(tls), cert)
        }
    };
    let (rd, wr) = tokio::io::split(stream);
    let mut reader = FrameReader::new(rd);
    let mut writer = FrameWriter::new(wr, Compression::None);

    // Shutdown does not wait out a slow handshake.
    let hello = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        r = tokio::time::timeout(cfg.handshake_timeout, reader.read_frame()) => r,
    }
    .map_err(|_| StreamError::Timeout("waiting for Hello"))??;
    let (version, host, disks) = match hello {
        Some(Frame::Hello {
            protocol_version,
            host_name,
            disks,
        }) => (protocol_version, host_name, disks),
        Some(Frame::Sync(SyncFrame::Hello {
            host_name,
            disk_id,
            size,
            vpg_id,
            fencing_generation,
        })) => {
            let (storage, host_token) = match admit(shared, &host_name, cert.as_ref()) {
                Ok(s) => s,
                Err(reason) => return Err(refuse(&mut writer, reason).await),
            };
            let _link = link(&host_token, &cancel);
            let s2 = shared.clone();
            let h2 = host_name.clone();
            let opened = tokio::task::spawn_blocking(move || {
                // Fencing first: a stale session must not even open the journal.
                admit_fencing(&s2, &vpg_id, fencing_generation)
                    .map_err(|e| StreamError::Refused(e.to_string()))?;
                open_disk(&s2, &h2, &storage, disk_id, size)
            })
            .await
            .map_err(|e| StreamError::Protocol(format!("journal open task: {e}")))?;
            let disk = match opened {
                Ok(d) => d,
                Err(StreamError::Refused(reason)) => return Err(refuse(&mut writer, reason).await),
                Err(e) => {
                    let reason = format!("cannot open disk {disk_id:016x}: {e}");
                    return Err(refuse(&mut writer, reason).await);
                }
            };
            tracing::info!(host = %host_name, disk = disk_id, "sync session accepted");
            let r = sync_target::session(
                &mut reader,
                &mut writer,
                disk,
                size,
                cfg.peer_timeout,
                &cancel,
            )
            .await;
            writer.shutdown().await;
            return r;
        }
        Some(other) => {
            let reason = format!("expected Hello, got {other:?}");
            return Err(refuse(&mut writer, reason).await);
        }
        None => return Err(StreamError::Closed),
    };
    if version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version {version} not supported (this agent speaks {PROTOCOL_VERSION})"
        );
        return Err(refuse(&mut writer, reason).await);
    }
    let (storage, host_token) = match admit(shared, &host, cert.as_ref()) {
        Ok(s) => s,
        Err(reason) => return Err(refuse(&mut writer, reason).await),
    };
    // This connection replaces any earlier one from the same host.
    let cancel = cancel.child_token();
    let _link = link(&host_token, &cancel);
    if let Some(old) = lock(&shared.conns).insert(host.clone(), cancel.clone()) {
        old.cancel();
    }

    let s2 = shared.clone();
    let (h2, st2) = (host.clone(), storage.clone());
    let (opened, refused) = tokio::task::spawn_blocking(move || open_disks(&s2, &h2, &st2, &disks))
        .await
        .map_err(|e| StreamError::Protocol(format!("journal open task: {e}")))?;
    let welcome: Vec<DiskAck> = opened
        .iter()
        .map(|o| DiskAck {
            disk_id: o.disk_id,
            durable_seq: o.durable,
        })
        .collect();
    tokio::time::timeout(
        cfg.handshake_timeout,
        writer.send(&Frame::Welcome {
            disks: welcome,
            refused,
        }),
    )
    .await
    .map_err(|_| StreamError::Timeout("sending Welcome"))??;
    tracing::info!(%host, disks = opened.len(), "replication stream accepted");
    // The journals are in use until this connection ends.
    let mut _busy = Vec::with_capacity(opened.len());
    let mut fences = HashMap::with_capacity(opened.len());
    let journals: HashMap<u64, SharedJournal> = opened
        .into_iter()
        .map(|o| {
            _busy.push(o.busy);
            fences.insert(o.disk_id, o.fence);
            (o.disk_id, o.journal)
        })
        .collect();

    // Reader (this task) → journal thread → writer task.
    let (btx, brx) = mpsc::channel::<Vec<StreamRecord>>(16);
    let (atx, mut arx) = mpsc::unbounded_channel::<Frame>();
    let jshared = shared.clone();
    let jhost = host.clone();
    let jatx = atx.clone();
    let sync_bytes = cfg.sync_bytes;
    let span = tracing::info_span!("stream-journal", %host);
    let jcancel = cancel.clone();
    let journal_task = tokio::task::spawn_blocking(move || {
        let _e = span.enter();
        let r = journal_loop(brx, &journals, &fences, &jatx, &jshared, &jhost, sync_bytes);
        if let Err(e) = &r {
            tracing::error!(error = %e, "journal append failed or fenced: closing the connection");
            // The reader would otherwise go on reading pings from a connection that
            // can no longer append (the sender would wait for acks forever).
            jcancel.cancel();
        }
        r
    });
    let writer_task = tokio::spawn(
        async move {
            while let Some(f) = arx.recv().await {
                writer.push(&f)?;
                while let Ok(f) = arx.try_recv() {
                    writer.push(&f)?;
                }
                writer.flush().await?;
            }
            Ok::<(), StreamError>(())
        }
        .instrument(tracing::info_span!("stream-receiver-acks")),
    );

    let r = read_loop(
        &mut reader,
        &btx,
        &atx,
        shared,
        &host,
        cfg.peer_timeout,
        &cancel,
    )
    .await;
    drop(btx);
    drop(atx);
    // The journal thread finishes what it was handed (and syncs it) before we go.
    let jr = journal_task
        .await
        .map_err(|e| StreamError::Protocol(format!("journal task: {e}")));
    writer_task.abort();
    // Forget our entry, but not a newer connection's (which is not cancelled).
    cancel.cancel();
    {
        let mut conns = lock(&shared.conns);
        if conns.get(&host).is_some_and(|t| t.is_cancelled()) {
            conns.remove(&host);
        }
    }
    r?;
    jr?
}

/// Cancels `conn` when `host` (the host's allow-list token) is cancelled, until the
/// returned guard is dropped.
fn link(
    host: &CancellationToken,
    conn: &CancellationToken,
) -> tokio_util::task::AbortOnDropHandle<()> {
    let (h, c) = (host.clone(), conn.clone());
    tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
        tokio::select! {
            _ = h.cancelled() => c.cancel(),
            _ = c.cancelled() => {}
        }
    }))
}

/// The allow-list and certificate checks of a Hello: the host's storage and its
/// allow-list token, or why not.
fn admit(
    shared: &Shared,
    host: &str,
    cert: Option<&CertificateDer<'static>>,
) -> Result<(PathBuf, CancellationToken), String> {
    let Some((storage, token)) = lock(&shared.allow)
        .get(host)
        .map(|a| (a.storage.clone(), a.token.clone()))
    else {
        return Err(format!(
            "host {host:?} is not on this recovery agent's allow-list"
        ));
    };
    if let Some(cert) = cert {
        if !cert_names_host(cert, host) {
            return Err(format!(
                "the client certificate does not name host {host:?}"
            ));
        }
    }
    Ok((storage, token))
}

async fn read_loop<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut FrameReader<R>,
    btx: &mpsc::Sender<Vec<StreamRecord>>,
    atx: &mpsc::UnboundedSender<Frame>,
    shared: &Shared,
    host: &str,
    peer_timeout: Duration,
    cancel: &CancellationToken,
) -> Result<(), StreamError> {
    const MAX_BATCH: usize = 4 << 20;
    let mut batch: Vec<StreamRecord> = Vec::new();
    let mut batch_bytes = 0usize;
    loop {
        // Everything already buffered goes to the journal thread as one batch.
        let mut failure = None;
        loop {
            match reader.try_frame() {
                Ok(Some(Frame::Record(r))) => {
                    batch_bytes += r.cost();
                    batch.push(r);
                    if batch_bytes >= MAX_BATCH {
                        break;
                    }
                }
                Ok(Some(Frame::Ping { nonce, lag })) => {
                    let _ = atx.send(Frame::Pong { nonce });
                    let mut all = lock(&shared.lag);
                    for l in lag {
                        let e = all.entry((host.to_string(), l.disk_id)).or_default();
                        e.report.host = host.to_string();
                        e.report.disk_id = l.disk_id;
                        e.report.sender = l;
                    }
                }
                Ok(Some(Frame::Pong { .. })) => {}
                Ok(Some(other)) => {
                    failure = Some(StreamError::Protocol(format!(
                        "unexpected frame from sender: {other:?}"
                    )));
                    break;
                }
                Ok(None) => break,
                Err(e) => {
                    // Records before the bad frame are good; nothing after it is used.
                    failure = Some(e);
                    break;
                }
            }
        }
        if !batch.is_empty() {
            batch_bytes = 0;
            if btx.send(std::mem::take(&mut batch)).await.is_err() {
                return Err(StreamError::Protocol("journal thread stopped".into()));
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if batch_bytes > 0 {
            continue;
        }
        let more = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = tokio::time::timeout(peer_timeout, reader.fill()) => {
                r.map_err(|_| StreamError::Timeout("no frame from the sender"))??
            }
        };
        if !more {
            return Ok(());
        }
    }
}

/// A disk a stream connection was admitted for.
struct Admitted {
    disk_id: u64,
    journal: SharedJournal,
    durable: u64,
    busy: Busy,
    /// (VPG id, fencing generation) it was admitted with.
    fence: (String, u64),
}

/// Admits a VPG's fencing generation through the host's record (records a newer one,
/// durably). Blocking.
fn admit_fencing(shared: &Shared, vpg_id: &str, generation: u64) -> Result<(), FencingError> {
    match &shared.cfg.fencing {
        Some(f) => f.admit(vpg_id, generation),
        None => Ok(()),
    }
}

/// Opens (or finds in the registry) the journal of every disk of a Hello. A disk that is
/// fenced, whose journal cannot be opened, or whose size differs, is left out of the
/// Welcome and listed as refused, with the reason. Blocking.
fn open_disks(
    shared: &Shared,
    host: &str,
    storage: &Path,
    disks: &[DiskHello],
) -> (Vec<Admitted>, Vec<DiskRefused>) {
    let mut out = Vec::new();
    let mut refused = Vec::new();
    for d in disks {
        if let Err(e) = admit_fencing(shared, &d.vpg_id, d.fencing_generation) {
            tracing::error!(%host, disk = d.disk_id, vpg = %d.vpg_id, error = %e, "disk's stream fenced");
            refused.push(DiskRefused {
                disk_id: d.disk_id,
                fenced: matches!(e, FencingError::Stale { .. }),
                reason: e.to_string(),
            });
            continue;
        }
        let (j, busy) = match open_disk(shared, host, storage, d.disk_id, d.size) {
            Ok(o) => (o.journal, o.busy),
            Err(e) => {
                tracing::error!(disk = d.disk_id, error = %e, "disk not accepted");
                refused.push(DiskRefused {
                    disk_id: d.disk_id,
                    fenced: false,
                    reason: match e {
                        StreamError::Refused(r) => r,
                        other => other.to_string(),
                    },
                });
                continue;
            }
        };
        // Records a dropped connection left buffered become durable now, so the
        // Welcome's seq is what the journal really holds.
        let durable = match lock(&j).sync() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(disk = d.disk_id, error = %e, "journal sync failed");
                note_error(shared, host, d.disk_id, &e);
                refused.push(DiskRefused {
                    disk_id: d.disk_id,
                    fenced: false,
                    reason: format!("journal storage error: {e}"),
                });
                continue;
            }
        };
        lock(&shared.errors).remove(&(host.to_string(), d.disk_id));
        let mut lag = lock(&shared.lag);
        let l = &mut lag.entry((host.to_string(), d.disk_id)).or_default().report;
        l.host = host.to_string();
        l.disk_id = d.disk_id;
        l.durable_seq = durable;
        l.received_seq = l.received_seq.max(durable);
        out.push(Admitted {
            disk_id: d.disk_id,
            journal: j,
            durable,
            busy,
            fence: (d.vpg_id.clone(), d.fencing_generation),
        });
    }
    (out, refused)
}

fn size_mismatch(protected: u64, replica: u64) -> StreamError {
    StreamError::Refused(format!(
        "disk size mismatch: protected disk is {protected} bytes, replica is {replica} bytes"
    ))
}

/// Finds a disk's journal and sync state in the registry, or opens them: creates the
/// disk directory with its sync state (replica `Empty`) before the journal if it is new.
/// A size differing from the journal's or the replica's is `StreamError::Refused`, and
/// then nothing was created or changed. Blocking.
fn open_disk(
    shared: &Shared,
    host: &str,
    storage: &Path,
    disk_id: u64,
    size: u64,
) -> Result<OpenDisk, StreamError> {
    let key = (host.to_string(), disk_id);
    let dir = storage.join(format!("disk-{disk_id:016x}"));
    let mut reg = lock(&shared.journals);
    reopen_if_failed(shared, &mut reg, &key, &dir)?;
    if let Some(j) = reg.get(&key) {
        let have = lock(j).disk_size();
        if have != size {
            return Err(size_mismatch(size, have));
        }
        let sync = lock(&shared.syncs).get(&key).cloned();
        if let Some(sync) = sync {
            return Ok(OpenDisk {
                journal: j.clone(),
                sync,
                busy: Busy::take(&shared.busy, key),
            });
        }
    }
    let replica = dir.join("replica.img");
    // Checked before opening: the journal would extend a shorter replica.
    match std::fs::metadata(&replica) {
        Ok(m) if m.len() != size => return Err(size_mismatch(size, m.len())),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("stat replica")(e)),
    }
    let sync = Arc::new(SyncCell::load_or_init(&dir)?);
    let j = match reg.get(&key) {
        Some(j) => j.clone(),
        None => {
            let mut cfg = JournalConfig::new(disk_id, size);
            cfg.segment_size = shared.cfg.segment_size;
            cfg.write_buffer = shared.cfg.write_buffer;
            let j = Arc::new(Mutex::new(Journal::open(
                dir.join("journal"),
                &replica,
                cfg,
            )?));
            reg.insert(key.clone(), j.clone());
            j
        }
    };
    lock(&shared.syncs).insert(key.clone(), sync.clone());
    Ok(OpenDisk {
        journal: j,
        sync,
        busy: Busy::take(&shared.busy, key),
    })
}

/// File a storage probe writes in a disk's directory (removed again at once).
const PROBE_FILE: &str = "storage-probe.tmp";
/// Bytes a storage probe writes before a failed journal is reopened.
const PROBE_BYTES: usize = 4 << 20;

/// Whether the file system under `dir` takes writes again: writes `bytes` to a probe
/// file, fdatasyncs it and removes it (also after a failure, to give the space back).
fn probe_storage(dir: &Path, bytes: usize) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(PROBE_FILE);
    let written = (|| {
        let mut f = std::fs::File::create(&path)?;
        let buf = vec![0u8; 256 << 10];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len());
            f.write_all(&buf[..n])?;
            left -= n;
        }
        f.sync_data()
    })();
    let removed = match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    written.and(removed)
}

/// Replaces a journal of the registry that failed (an I/O error, a full file system:
/// it closed itself on the first error) by a freshly opened one, so that a connection
/// asking for the disk again — or a recovery — finds it working. Only once its storage
/// takes writes again ([`probe_storage`]) and only while nothing else holds it (no view
/// of a recovery, no other connection, no report in progress); otherwise the caller is
/// refused with the reason and a later request tries again.
///
/// The failed journal's sync thread is stopped first, and its durable seq then is what
/// it may have acknowledged. Opening cuts a torn tail at the last valid record; if the
/// journal holds less than that afterwards, records it had made durable were lost:
/// the disk's sync state records it (durably, before anyone sees the new journal), so no
/// checkpoint after the loss is recoverable until a Full Sync ends, and sync sessions
/// say so in their `Info`. If it holds at least that, the sender resends from the
/// Welcome's durable seq and nothing is missing. Called with the registry locked (`reg`).
/// Blocking.
fn reopen_if_failed(
    shared: &Shared,
    reg: &mut HashMap<(String, u64), SharedJournal>,
    key: &(String, u64),
    dir: &Path,
) -> Result<(), StreamError> {
    let Some(j) = reg.get(key) else {
        return Ok(());
    };
    let (failure, views, size) = {
        let g = lock(j);
        (g.failure(), g.open_views(), g.disk_size())
    };
    let Some(failure) = failure else {
        return Ok(());
    };
    // Whatever closed it (an append, a sync, a promotion, a commit), it is reported until
    // the disk streams again.
    lock(&shared.errors)
        .entry(key.clone())
        .or_insert_with(|| failure.clone());
    let refused = |why: String| {
        StreamError::Refused(format!(
            "journal storage error: {failure}; the journal {why}"
        ))
    };
    if views > 0 {
        return Err(refused(format!(
            "is not reopened while {views} view(s) of a recovery hold it"
        )));
    }
    if Arc::strong_count(j) > 1 || lock(&shared.busy).contains_key(key) {
        return Err(refused(
            "is not reopened while another connection still holds it".into(),
        ));
    }
    if let Err(e) = probe_storage(dir, PROBE_BYTES) {
        return Err(refused(format!(
            "is reopened once its storage takes writes again (probe: {e})"
        )));
    }
    // Nothing may touch the files while they are opened again.
    let durable_before = lock(j).retire();
    let mut cfg = JournalConfig::new(key.1, size);
    cfg.segment_size = shared.cfg.segment_size;
    cfg.write_buffer = shared.cfg.write_buffer;
    let fresh = match Journal::open(dir.join("journal"), dir.join("replica.img"), cfg) {
        Ok(f) => f,
        Err(e) => {
            // The retired journal stays in the registry (closed): the error is still
            // reported, and the next request tries again.
            tracing::error!(host = %key.0, disk = key.1, error = %e, "reopening the journal failed");
            note_error(shared, &key.0, key.1, &e);
            return Err(refused(format!("could not be reopened: {e}")));
        }
    };
    let held = fresh.durable_seq();
    if held < durable_before {
        let cell = match lock(&shared.syncs).get(key).cloned() {
            Some(c) => c,
            None => Arc::new(SyncCell::load_or_init(dir)?),
        };
        if let Err(e) = cell.lose_after(held) {
            return Err(refused(format!(
                "lost records and recording that failed: {e}"
            )));
        }
        lock(&shared.syncs).insert(key.clone(), cell);
        tracing::error!(host = %key.0, disk = key.1, durable_before, held,
            "the reopened journal holds less than it had made durable: no checkpoint after \
             the loss is recoverable until a Full Sync ends");
    }
    tracing::warn!(host = %key.0, disk = key.1, durable_before, held, first_failure = %failure,
        "journal reopened after a storage error");
    reg.insert(key.clone(), Arc::new(Mutex::new(fresh)));
    Ok(())
}

fn checkpoint_kind(k: u8) -> Option<CheckpointKind> {
    match k {
        1 => Some(CheckpointKind::Scheduled),
        2 => Some(CheckpointKind::UserTagged),
        3 => Some(CheckpointKind::AppConsistent),
        _ => None,
    }
}

/// Appends batches to the journals and asks for a sync when no batch is waiting (or
/// every `sync_bytes`) without waiting for it: the journal's sync thread runs the
/// fdatasync while the next batch is appended (pipelined group commit). An acker thread
/// waits for each requested seq to be durable and sends one Ack per round, so an ack
/// never precedes durability. On the way out everything handed over is made durable and
/// acknowledged.
fn journal_loop(
    mut rx: mpsc::Receiver<Vec<StreamRecord>>,
    journals: &HashMap<u64, SharedJournal>,
    fences: &HashMap<u64, (String, u64)>,
    acks: &mpsc::UnboundedSender<Frame>,
    shared: &Shared,
    host: &str,
    sync_bytes: usize,
) -> Result<(), StreamError> {
    let durability: HashMap<u64, Durability> = journals
        .iter()
        .map(|(id, j)| (*id, lock(j).durability()))
        .collect();
    let (tickets_tx, tickets_rx) = std::sync::mpsc::channel::<Vec<Ticket>>();
    std::thread::scope(|scope| {
        let acker = std::thread::Builder::new()
            .name("stream-acker".into())
            .spawn_scoped(scope, || {
                ack_loop(tickets_rx, &durability, acks, shared, host)
            })
            .map_err(io("spawning the acker thread"))?;
        let appended = append_loop(
            &mut rx,
            journals,
            fences,
            &tickets_tx,
            shared,
            host,
            sync_bytes,
        );
        drop(tickets_tx);
        let acked = acker
            .join()
            .map_err(|_| StreamError::Protocol("acker thread panicked".into()))?;
        appended.and(acked)
    })
}

/// A requested sync: disk, the seq durable once it completes, and the write time of
/// that record (for the lag report).
type Ticket = (u64, u64, i64);

fn append_loop(
    rx: &mut mpsc::Receiver<Vec<StreamRecord>>,
    journals: &HashMap<u64, SharedJournal>,
    fences: &HashMap<u64, (String, u64)>,
    tickets: &std::sync::mpsc::Sender<Vec<Ticket>>,
    shared: &Shared,
    host: &str,
    sync_bytes: usize,
) -> Result<(), StreamError> {
    // Disk → write time of its newest appended record.
    let mut touched = BTreeMap::<u64, i64>::new();
    let mut pending = 0usize;
    let mut pending_records = BTreeMap::<u64, (u64, u64)>::new();
    while let Some(batch) = rx.blocking_recv() {
        let mut next = Some(batch);
        while let Some(batch) = next.take() {
            // A generation recorded since the Hello (a failover) fences this connection:
            // nothing more of it is appended. One lookup per disk and batch.
            if let Some(f) = &shared.cfg.fencing {
                for (disk, (vpg, generation)) in fences {
                    if let Err(e) = f.admit(vpg, *generation) {
                        tracing::error!(%host, disk, error = %e, "stream fenced while connected: closing it");
                        return Err(StreamError::Refused(e.to_string()));
                    }
                }
            }
            for rec in &batch {
                let Some(j) = journals.get(&rec.disk) else {
                    return Err(StreamError::Protocol(format!(
                        "record for disk {} which was not accepted",
                        rec.disk
                    )));
                };
                let r = match &rec.body {
                    RecordBody::Write { offset, data } => {
                        Record::write(rec.seq, rec.timestamp_ms, *offset, data)
                    }
                    RecordBody::Zero { offset, len } => {
                        Record::zero(rec.seq, rec.timestamp_ms, *offset, *len)
                    }
                    RecordBody::Trim { offset, len } => {
                        Record::trim(rec.seq, rec.timestamp_ms, *offset, *len)
                    }
                    RecordBody::Checkpoint { id, kind, tag } => {
                        let Some(kind) = checkpoint_kind(*kind) else {
                            return Err(StreamError::Protocol(format!(
                                "unknown checkpoint kind {kind}"
                            )));
                        };
                        Record::checkpoint(rec.seq, rec.timestamp_ms, *id, kind, tag.as_deref())
                    }
                };
                if let Err(e) = lock(j).append(r) {
                    note_error(shared, host, rec.disk, &e);
                    return Err(e.into());
                }
                let t = touched.entry(rec.disk).or_insert(rec.timestamp_ms);
                *t = (*t).max(rec.timestamp_ms);
                pending += rec.cost();
                let p = pending_records.entry(rec.disk).or_default();
                p.0 += 1;
                p.1 += rec.cost() as u64;
            }
            update_received(shared, host, &batch, &pending_records);
            if pending < sync_bytes {
                next = rx.try_recv().ok();
            }
        }
        let mut round = Vec::with_capacity(touched.len());
        for (id, ts) in std::mem::take(&mut touched) {
            if let Some(j) = journals.get(&id) {
                match lock(j).request_sync() {
                    Ok(seq) => round.push((id, seq, ts)),
                    Err(e) => {
                        note_error(shared, host, id, &e);
                        return Err(e.into());
                    }
                }
            }
        }
        pending = 0;
        pending_records.clear();
        if tickets.send(round).is_err() {
            // The acker stopped on an error; it reports it.
            break;
        }
    }
    Ok(())
}

/// Waits for every requested seq to be durable, then acknowledges it. Rounds queued
/// meanwhile are merged, so a slow sync costs one Ack, not many.
fn ack_loop(
    tickets: std::sync::mpsc::Receiver<Vec<Ticket>>,
    durability: &HashMap<u64, Durability>,
    acks: &mpsc::UnboundedSender<Frame>,
    shared: &Shared,
    host: &str,
) -> Result<(), StreamError> {
    // A sync that takes this long means the journal's disk is gone; the connection
    // closes and the sender keeps the records.
    const SYNC_TIMEOUT: Duration = Duration::from_secs(60);
    while let Ok(first) = tickets.recv() {
        let mut want = BTreeMap::<u64, (u64, i64)>::new();
        for round in std::iter::once(first).chain(tickets.try_iter()) {
            for (id, seq, ts) in round {
                let w = want.entry(id).or_default();
                *w = (w.0.max(seq), w.1.max(ts));
            }
        }
        let mut done = Vec::with_capacity(want.len());
        for (id, (seq, ts)) in want {
            let Some(d) = durability.get(&id) else {
                continue;
            };
            let durable = match d.wait_durable(seq, SYNC_TIMEOUT) {
                Ok(s) => s,
                Err(e) => {
                    note_error(shared, host, id, &e);
                    return Err(e.into());
                }
            };
            done.push((
                DiskAck {
                    disk_id: id,
                    durable_seq: durable,
                },
                ts,
            ));
        }
        update_durable(shared, host, &done);
        let disks = done.into_iter().map(|(a, _)| a).collect();
        // The writer may be gone (connection closing); the journal is durable anyway.
        let _ = acks.send(Frame::Ack { disks });
    }
    Ok(())
}

/// Remembers a journal's storage error for the reports (`JournalReport::storage_error`).
fn note_error(shared: &Shared, host: &str, disk: u64, e: &dyn std::fmt::Display) {
    lock(&shared.errors).insert((host.to_string(), disk), e.to_string());
}

fn update_received(
    shared: &Shared,
    host: &str,
    batch: &[StreamRecord],
    pending: &BTreeMap<u64, (u64, u64)>,
) {
    let mut lag = lock(&shared.lag);
    for rec in batch {
        let l = lag.entry((host.to_string(), rec.disk)).or_default();
        l.report.received_seq = l.report.received_seq.max(rec.seq);
        l.received_ts = l.received_ts.max(rec.timestamp_ms);
    }
    for (disk, (n, b)) in pending {
        let l = lag.entry((host.to_string(), *disk)).or_default();
        l.report.pending_records = *n;
        l.report.pending_bytes = *b;
    }
}

/// `disks`: (ack, write time of the newest record the ack covers).
fn update_durable(shared: &Shared, host: &str, disks: &[(DiskAck, i64)]) {
    let mut lag = lock(&shared.lag);
    for (a, ts) in disks {
        let l = lag.entry((host.to_string(), a.disk_id)).or_default();
        l.report.durable_seq = a.durable_seq;
        if a.durable_seq >= l.report.received_seq {
            l.report.pending_records = 0;
            l.report.pending_bytes = 0;
        }
        l.durable_ts = l.durable_ts.max(*ts);
    }
}
