//! The agent process of one host (`bulwark agent`): it owns the host's protected disks
//! (raw images exported over NBD, each write split into the replication stream and the
//! dirty bitmap) and, at a recovery host, the journals and replica disks it receives.
//!
//! Code map:
//! - `config`: the `[agent]` section and flags, resolved and checked.
//! - `splitter`: the WriteSink of one disk — sequence numbers, the sender hand-off, and
//!   the bookkeeping that clears the dirty bitmap only behind durable acknowledgements.
//! - `admin`: the local, loopback-only HTTP endpoint (status, checkpoint trigger).
//! - here: [`Agent`] — start (open disks, streams, receiver, NBD server), checkpoint
//!   rounds across a consistency group, status, clean shutdown.
//!
//! Start order matters: the receiver and the senders exist before any export is served,
//! so the first guest write already has its splitter; a clean shutdown runs in reverse
//! (exports drained, queues drained, disks flushed, bitmaps marked clean).

pub mod admin;
pub mod bench;
pub mod config;
pub mod splitter;
pub mod sync;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agent::crashsafe;
use crate::agent::dirty::{DirtyConfig, DirtyPaths, DirtyTracker, RecoveryState};
use crate::agent::journal::CheckpointKind;
use crate::agent::nbd::{
    BlockDevice, CompletionGate, ExportRegistry, FileDevice, NbdServer, ProtectedDevice,
    ServerConfig,
};
use crate::agent::stream::{
    ClientTransport, DiskMode, DiskSpec, Receiver, ReceiverConfig, ReceiverHandle, Sender,
    SenderConfig, ServerTransport, StreamEvent,
};
use crate::agent::tls;
use crate::model::sync::Tracking;
use crate::proto::agent::{
    AgentEndpoints, AgentStatus, CheckpointDisk, CheckpointReport, CheckpointRequest, PeerStatus,
    ProtectedDiskStatus, ReceivedCheckpoint, ReceivedDiskStatus, ReplicationMode, StartState,
    SyncAction,
};
use crate::proto::stream::ReplicaState;

pub use config::{AgentConfig, AgentConfigError, AgentFlags, AgentSection, Security};
use config::{DiskConfig, PeerConfig};
use splitter::Splitter;

/// Errors of the agent's boundary.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] AgentConfigError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {name}: {reason}")]
    Disk { name: String, reason: String },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Stream(#[from] crate::agent::stream::StreamError),
    #[error(transparent)]
    Nbd(#[from] crate::agent::nbd::NbdError),
    #[error("no protected disk in group `{0}`")]
    NoSuchGroup(String),
    #[error("no protected disk named `{0}`")]
    NoSuchDisk(String),
    #[error("the agent is shutting down")]
    ShuttingDown,
    #[error("background task failed: {0}")]
    Task(String),
}

fn io_err<'a>(
    what: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> AgentError + 'a {
    move |source| AgentError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One protected disk of this host.
struct HostDisk {
    cfg: DiskConfig,
    device: Arc<ProtectedDevice<FileDevice>>,
    splitter: Arc<Splitter>,
    epoch: u64,
    start: StartState,
    start_al_extents: u64,
    /// Index into `Agent::peers`.
    peer: Option<usize>,
    /// The disk's sync task (replicated disks only).
    sync: Option<Arc<sync::DiskSync>>,
}

struct Peer {
    cfg: PeerConfig,
    sender: Sender,
    last_error: Arc<Mutex<Option<String>>>,
}

#[derive(Default)]
struct Rounds {
    last_id: u64,
    count: u64,
    max_hold_us: u64,
}

/// A running agent. See the module documentation.
pub struct Agent {
    cfg: AgentConfig,
    endpoints: AgentEndpoints,
    disks: Vec<HostDisk>,
    peers: Vec<Peer>,
    receiver: Option<ReceiverHandle>,
    gates: BTreeMap<String, Arc<CompletionGate>>,
    registry: ExportRegistry,
    rounds: Mutex<Rounds>,
    /// Stops the NBD server (first, at shutdown).
    nbd_cancel: CancellationToken,
    /// Stops the sync tasks (before the streams drain, at shutdown).
    sync_cancel: CancellationToken,
    /// Stops everything else.
    cancel: CancellationToken,
    tasks: TaskTracker,
    stopping: std::sync::atomic::AtomicBool,
    /// The admin endpoint's address, once served.
    admin: std::sync::OnceLock<std::net::SocketAddr>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("host_name", &self.cfg.host_name)
            .field("disks", &self.disks.len())
            .finish_non_exhaustive()
    }
}

/// Reads the disk's sequence epoch, bumps it and makes the new one durable.
fn next_epoch(state_dir: &Path, disk: &str) -> Result<u64, AgentError> {
    let path = state_dir.join(format!("{disk}.epoch"));
    let prev = match std::fs::read_to_string(&path) {
        Ok(s) => s.trim().parse::<u64>().map_err(|_| AgentError::Disk {
            name: disk.to_string(),
            reason: format!("{} does not hold an epoch number", path.display()),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_err("read", &path)(e)),
    };
    let epoch = prev + 1;
    if epoch >= 1 << (64 - splitter::EPOCH_SHIFT) {
        return Err(AgentError::Disk {
            name: disk.to_string(),
            reason: "sequence epochs exhausted".into(),
        });
    }
    crashsafe::write_atomically(&path, format!("{epoch}\n").as_bytes()).map_err(|e| {
        AgentError::Io {
            what: "write",
            path: e.path,
            source: e.source,
        }
    })?;
    Ok(epoch)
}

/// What opening one disk produced.
struct Opened {
    device: FileDevice,
    tracker: Arc<DirtyTracker>,
    epoch: u64,
    start: StartState,
    start_al_extents: u64,
}

/// Opens (or creates, sparse) the image, the dirty tracking and the epoch. Blocking.
fn open_disk(cfg: &AgentConfig, d: &DiskConfig) -> Result<Opened, AgentError> {
    if let Some(parent) = d.path.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    }
    let device = if d.path.exists() {
        let dev = FileDevice::open(&d.path, false)?;
        if dev.size() != d.size {
            // Never resize a guest's disk behind its back: the operator decides.
            return Err(AgentError::Disk {
                name: d.name.clone(),
                reason: format!(
                    "image {} is {} bytes, the configuration says {}",
                    d.path.display(),
                    dev.size(),
                    d.size
                ),
            });
        }
        dev
    } else {
        tracing::info!(disk = %d.name, path = %d.path.display(), size = d.size, "creating disk image");
        FileDevice::create(&d.path, d.size)?
    };
    let (tracker, recovery) = DirtyTracker::open(
        DirtyPaths::in_dir(&cfg.dirty_dir(), &d.name),
        d.size,
        DirtyConfig::default(),
    )
    .map_err(|e| AgentError::Disk {
        name: d.name.clone(),
        reason: format!("dirty tracking: {e}"),
    })?;
    let start = match &recovery.state {
        RecoveryState::New => StartState::New,
        RecoveryState::Clean => StartState::Clean,
        RecoveryState::Unclean => StartState::Unclean,
        RecoveryState::Lost { reason } => {
            tracing::warn!(disk = %d.name, %reason, "dirty tracking lost: every region is dirty");
            StartState::Lost
        }
    };
    if start == StartState::Unclean {
        tracing::warn!(
            disk = %d.name,
            al_extents = recovery.al_extents.len(),
            dirty_regions = recovery.dirty_regions,
            "previous run did not shut down cleanly: bitmap plus activity log mark what may differ"
        );
    }
    let epoch = next_epoch(&cfg.state_dir(), &d.name)?;
    Ok(Opened {
        device,
        tracker: Arc::new(tracker),
        epoch,
        start,
        start_al_extents: recovery.al_extents.len() as u64,
    })
}

impl Agent {
    /// Opens everything the configuration names and starts serving. Must run inside a
    /// Tokio runtime.
    pub async fn start(cfg: AgentConfig) -> Result<Arc<Agent>, AgentError> {
        Agent::start_with_clock(cfg, Arc::new(sync::SystemClock)).await
    }

    /// [`Agent::start`] with the clock the resync window is judged by (tests).
    pub async fn start_with_clock(
        cfg: AgentConfig,
        clock: Arc<dyn sync::Clock>,
    ) -> Result<Arc<Agent>, AgentError> {
        for dir in [
            cfg.data_dir.clone(),
            cfg.dirty_dir(),
            cfg.state_dir(),
            cfg.run_dir(),
        ] {
            std::fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        }
        let (client, server) = match &cfg.security {
            Security::Tls(files) => (
                Some(tls::client_config(files)?),
                ServerTransport::Tls(tls::server_config(files)?),
            ),
            Security::Insecure => {
                tracing::warn!("--insecure: replication streams use plain TCP; data and host identities are unprotected");
                (None, ServerTransport::Insecure)
            }
        };
        let cancel = CancellationToken::new();
        let nbd_cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        // A start that fails half-way stops what it already started (receiver, senders,
        // persisters, NBD server) instead of leaving them running in the process.
        let abort_start = (cancel.clone().drop_guard(), nbd_cancel.clone().drop_guard());

        // Recovery side first: a peer may already be dialling.
        let mut data_addr = None;
        let receiver = match cfg.data_listen {
            Some(listen) => {
                for storage in cfg.allow.values() {
                    std::fs::create_dir_all(storage).map_err(io_err("create", storage))?;
                }
                let mut rc = ReceiverConfig::new(listen, server);
                rc.allow = cfg.allow.clone().into_iter().collect::<HashMap<_, _>>();
                if let Some(t) = cfg.peer_timeout {
                    rc.peer_timeout = t;
                }
                let receiver = Receiver::bind(rc).await?;
                data_addr = Some(receiver.local_addr()?);
                let handle = receiver.handle();
                let c = cancel.clone();
                tasks.spawn(async move {
                    if let Err(e) = receiver.run(c).await {
                        tracing::error!(error = %e, "replication receiver stopped");
                    }
                });
                Some(handle)
            }
            None => None,
        };

        // Disks: images, tracking, epochs (blocking work off the reactor).
        let cfg2 = cfg.clone();
        let opened = tokio::task::spawn_blocking(move || {
            cfg2.disks
                .iter()
                .map(|d| open_disk(&cfg2, d))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| AgentError::Task(e.to_string()))??;

        // One sender per recovery host, carrying all its disks.
        let mut peers = Vec::new();
        for p in &cfg.peers {
            let specs: Vec<DiskSpec> = cfg
                .disks
                .iter()
                .zip(&opened)
                .filter(|(d, _)| d.recovery_host.as_deref() == Some(p.host_name.as_str()))
                .map(|(d, o)| DiskSpec {
                    disk_id: d.id,
                    size: d.size,
                    generation: o.epoch,
                })
                .collect();
            let transport = match &client {
                Some(c) => ClientTransport::Tls {
                    config: Arc::clone(c),
                    server_name: p.host_name.clone(),
                },
                None => ClientTransport::Insecure,
            };
            let mut sc = SenderConfig::new(cfg.host_name.clone(), p.address, transport);
            sc.compression = p.compression;
            sc.bandwidth_limit = p.bandwidth_limit;
            sc.queue_memory = p.queue_memory;
            sc.spill_limit = p.spill_limit;
            sc.spill_dir = (p.spill_limit > 0).then(|| cfg.spill_dir(&p.host_name));
            sc.away_bound = p.away_bound;
            if let Some(t) = cfg.peer_timeout {
                sc.peer_timeout = t;
            }
            let (sender, events) = Sender::start(sc, specs, cancel.child_token())?;
            peers.push((p.clone(), sender, events));
        }

        let mut gates: BTreeMap<String, Arc<CompletionGate>> = BTreeMap::new();
        let registry = ExportRegistry::new();
        let sync_cancel = cancel.child_token();
        let sync_host = Arc::new(sync::SyncHost {
            host_name: cfg.host_name.clone(),
            settings: cfg.sync,
            clock,
            slots: sync::SyncSlots::new(cfg.sync.max_concurrent),
            events: sync::SyncEventLog::new(cfg.state_dir().join("sync-events.jsonl")),
        });
        let mut disks = Vec::new();
        for (d, o) in cfg.disks.iter().zip(opened) {
            let peer = d
                .recovery_host
                .as_ref()
                .and_then(|r| peers.iter().position(|(p, _, _)| &p.host_name == r));
            let sender = peer.map(|i| peers[i].1.clone());
            let splitter = Arc::new(Splitter::new(d.id, o.epoch, sender, Arc::clone(&o.tracker)));
            let gate = Arc::clone(gates.entry(d.group.clone()).or_default());
            let device = Arc::new(ProtectedDevice::new(
                o.device,
                Arc::clone(&o.tracker),
                splitter.clone(),
                gate,
            )?);
            registry.add_with_description(
                &d.name,
                &format!("bulwark protected disk {} (id {})", d.name, d.id),
                device.clone() as Arc<dyn BlockDevice>,
            )?;
            tasks.spawn(
                o.tracker
                    .spawn_persister(cfg.persist_every, cancel.child_token()),
            );
            let sync = peer.map(|i| {
                let tracking = match o.start {
                    StartState::New => Tracking::New,
                    StartState::Clean => Tracking::Clean,
                    StartState::Unclean => Tracking::Unclean,
                    StartState::Lost => Tracking::Lost,
                };
                let ds = Arc::new(sync::DiskSync::new(
                    d.clone(),
                    Arc::clone(&device),
                    Arc::clone(&splitter),
                    peers[i].1.clone(),
                    tracking,
                    Arc::clone(&sync_host),
                ));
                tasks.spawn(
                    Arc::clone(&ds)
                        .run(sync_cancel.clone())
                        .instrument(tracing::info_span!("sync", disk = %d.name)),
                );
                ds
            });
            disks.push(HostDisk {
                cfg: d.clone(),
                device,
                splitter,
                epoch: o.epoch,
                start: o.start,
                start_al_extents: o.start_al_extents,
                peer,
                sync,
            });
        }

        let mut peer_handles = Vec::new();
        for (pcfg, sender, events) in peers {
            let last_error = Arc::new(Mutex::new(None));
            let splitters: HashMap<u64, (Arc<Splitter>, Option<Arc<sync::DiskSync>>)> = disks
                .iter()
                .filter(|d| d.cfg.recovery_host.as_deref() == Some(pcfg.host_name.as_str()))
                .map(|d| (d.cfg.id, (d.splitter.clone(), d.sync.clone())))
                .collect();
            tasks.spawn(
                watch_events(events, splitters, last_error.clone(), cancel.clone())
                    .instrument(tracing::info_span!("stream-events", peer = %pcfg.host_name)),
            );
            peer_handles.push(Peer {
                cfg: pcfg,
                sender,
                last_error,
            });
        }

        let server =
            NbdServer::bind(cfg.nbd_listen, registry.clone(), ServerConfig::default()).await?;
        let nbd_addr = server.local_addr()?;
        {
            let c = nbd_cancel.clone();
            tasks.spawn(async move {
                if let Err(e) = server.run(c).await {
                    tracing::error!(error = %e, "nbd server stopped");
                }
            });
        }

        let endpoints = AgentEndpoints {
            host_name: cfg.host_name.clone(),
            site: cfg.site.clone(),
            pid: std::process::id(),
            nbd: nbd_addr.to_string(),
            data: data_addr.map(|a| a.to_string()),
            admin: None,
        };
        let (c, n) = abort_start;
        c.disarm();
        n.disarm();
        let agent = Arc::new(Agent {
            cfg,
            endpoints,
            disks,
            peers: peer_handles,
            receiver,
            gates,
            registry,
            rounds: Mutex::new(Rounds::default()),
            nbd_cancel,
            sync_cancel,
            cancel,
            tasks,
            stopping: std::sync::atomic::AtomicBool::new(false),
            admin: std::sync::OnceLock::new(),
        });
        {
            let a = Arc::clone(&agent);
            let c = agent.cancel.clone();
            agent.tasks.spawn(
                async move { a.clear_behind_acks(c).await }
                    .instrument(tracing::info_span!("bitmap-clearer")),
            );
        }
        tracing::info!(
            host = %agent.cfg.host_name,
            site = %agent.cfg.site,
            nbd = %nbd_addr,
            data = ?data_addr,
            disks = agent.disks.len(),
            peers = agent.peers.len(),
            "agent started"
        );
        Ok(agent)
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    /// The bound addresses.
    pub fn endpoints(&self) -> AgentEndpoints {
        let mut e = self.endpoints.clone();
        e.admin = self.admin.get().map(|a| a.to_string());
        e
    }

    /// Records where the admin endpoint is served (see [`admin::serve`]).
    pub fn set_admin_addr(&self, addr: std::net::SocketAddr) {
        let _ = self.admin.set(addr);
    }

    /// Writes `<data-dir>/run/endpoints.json` (crash-safe), so tools and tests can find
    /// ports chosen by the OS.
    pub fn write_endpoints(&self) -> Result<PathBuf, AgentError> {
        let e = self.endpoints();
        let path = self.cfg.run_dir().join("endpoints.json");
        let body =
            serde_json::to_vec_pretty(&e).map_err(|err| AgentError::Task(err.to_string()))?;
        crashsafe::write_atomically(&path, &body).map_err(|err| AgentError::Io {
            what: "write",
            path: err.path,
            source: err.source,
        })?;
        Ok(path)
    }

    /// One checkpoint round on this host: hold the write completions of the group, insert
    /// the marker into every disk's stream, release. Nothing in between waits for I/O, so
    /// the hold lasts microseconds.
    pub fn checkpoint(&self, req: &CheckpointRequest) -> Result<CheckpointReport, AgentError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        let members: Vec<&HostDisk> = self
            .disks
            .iter()
            .filter(|d| req.group.as_ref().is_none_or(|g| &d.cfg.group == g))
            .collect();
        if members.is_empty() {
            return Err(AgentError::NoSuchGroup(
                req.group.clone().unwrap_or_else(|| "*".into()),
            ));
        }
        let timestamp_ms = crate::agent::stream::now_ms();
        let kind = if req.tag.is_some() {
            CheckpointKind::UserTagged
        } else {
            CheckpointKind::Scheduled
        } as u8;
        // Rounds are serialised: ids increase in the order markers enter the streams.
        let mut rounds = self.rounds.lock().unwrap_or_else(PoisonError::into_inner);
        let id = req
            .id
            .unwrap_or_else(|| (timestamp_ms.max(0) as u64).max(rounds.last_id + 1));
        let started = Instant::now();
        let guards: Vec<_> = self
            .gates
            .iter()
            .filter(|(g, _)| members.iter().any(|d| &d.cfg.group == *g))
            .map(|(_, gate)| gate.hold())
            .collect();
        let disks: Vec<CheckpointDisk> = members
            .iter()
            .map(|d| {
                let placed = d
                    .splitter
                    .insert_checkpoint(id, kind, req.tag.clone(), timestamp_ms);
                CheckpointDisk {
                    name: d.cfg.name.clone(),
                    disk_id: d.cfg.id,
                    seq: placed.seq,
                    queued: placed.queued,
                }
            })
            .collect();
        drop(guards);
        let hold_us = started.elapsed().as_micros() as u64;
        rounds.last_id = rounds.last_id.max(id);
        rounds.count += 1;
        rounds.max_hold_us = rounds.max_hold_us.max(hold_us);
        drop(rounds);
        tracing::debug!(id, hold_us, disks = disks.len(), "checkpoint inserted");
        Ok(CheckpointReport {
            id,
            timestamp_ms,
            hold_us,
            disks,
        })
    }

    /// An operator's request for a disk's sync (resume a held one, Force Sync, Full Sync).
    pub fn request_sync(&self, disk: &str, action: SyncAction) -> Result<(), AgentError> {
        let d = self
            .disks
            .iter()
            .find(|d| d.cfg.name == disk)
            .ok_or_else(|| AgentError::NoSuchDisk(disk.to_string()))?;
        let s = d.sync.as_ref().ok_or_else(|| AgentError::Disk {
            name: disk.to_string(),
            reason: "the disk is not replicated (no recovery host)".into(),
        })?;
        s.request(action);
        Ok(())
    }

    /// The checkpoints of a disk this agent receives, each with its recoverability;
    /// `None` when the disk is not known here (not opened since this agent started).
    pub fn received_checkpoints(
        &self,
        host: &str,
        disk_id: u64,
    ) -> Option<Vec<ReceivedCheckpoint>> {
        let cps = self.receiver.as_ref()?.checkpoints(host, disk_id)?;
        Some(
            cps.into_iter()
                .map(|(c, recoverable)| ReceivedCheckpoint {
                    id: c.id,
                    seq: c.seq,
                    wall_ms: c.wall_ms,
                    tag: c.tag,
                    recoverable,
                })
                .collect(),
        )
    }

    /// Makes every disk's sync task look again now (a setting or the clock changed).
    pub fn recheck_syncs(&self) {
        for s in self.disks.iter().filter_map(|d| d.sync.as_ref()) {
            s.poke();
        }
    }

    pub fn status(&self) -> AgentStatus {
        let mut stats = HashMap::new();
        for p in &self.peers {
            for s in p.sender.stats() {
                stats.insert(s.disk_id, s);
            }
        }
        let protected = self
            .disks
            .iter()
            .map(|d| {
                let s = stats.get(&d.cfg.id);
                let bitmap = d.device.tracker().bitmap();
                let mode = match (d.peer, s.map(|s| s.mode)) {
                    (None, _) => ReplicationMode::Unprotected,
                    (Some(_), Some(DiskMode::BitmapOnly)) => ReplicationMode::BitmapOnly,
                    _ if d.splitter.is_bitmap_only() => ReplicationMode::BitmapOnly,
                    _ => ReplicationMode::Streaming,
                };
                ProtectedDiskStatus {
                    name: d.cfg.name.clone(),
                    disk_id: d.cfg.id,
                    size_bytes: d.cfg.size,
                    export: d.cfg.name.clone(),
                    group: d.cfg.group.clone(),
                    recovery_host: d.cfg.recovery_host.clone(),
                    mode,
                    start_state: d.start,
                    start_al_extents: d.start_al_extents,
                    dirty_regions: bitmap.dirty_count(),
                    region_size: bitmap.region_size(),
                    queued_records: s.map_or(0, |s| s.queued_records),
                    queued_bytes: s.map_or(0, |s| s.queued_bytes),
                    spilled_bytes: s.map_or(0, |s| s.spilled_bytes),
                    oldest_unacked_ms: s.map_or(0, |s| s.oldest_unacked_ms),
                    last_seq: d.splitter.last_seq(),
                    acked_seq: s.map_or(0, |s| s.acked_seq),
                    epoch: d.epoch,
                    owes_sync: d.splitter.owes_sync(),
                    replica_behind: d.splitter.replica_behind(),
                    sync: d.sync.as_ref().map(|s| s.status()).unwrap_or_default(),
                }
            })
            .collect();
        let peers = self
            .peers
            .iter()
            .map(|p| PeerStatus {
                host_name: p.cfg.host_name.clone(),
                address: p.cfg.address.to_string(),
                connected: p.sender.is_connected(),
                last_error: p
                    .last_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone(),
            })
            .collect();
        let received = self
            .receiver
            .as_ref()
            .map(|r| {
                r.lag()
                    .into_iter()
                    .map(|l| {
                        let sync = r.sync_state(&l.host, l.disk_id);
                        ReceivedDiskStatus {
                            disk_id: l.disk_id,
                            received_seq: l.received_seq,
                            durable_seq: l.durable_seq,
                            pending_records: l.pending_records,
                            pending_bytes: l.pending_bytes,
                            durable_age_ms: l.durable_age_ms,
                            sender_queued_records: l.sender.queued_records,
                            sender_queued_bytes: l.sender.queued_bytes,
                            sender_oldest_unacked_ms: l.sender.oldest_unacked_ms,
                            replica: sync.as_ref().map(|st| {
                                match st.replica {
                                    ReplicaState::Empty => "empty",
                                    ReplicaState::PreSeeded => "pre_seeded",
                                    ReplicaState::Existing => "existing",
                                }
                                .to_string()
                            }),
                            sync_running: sync.and_then(|st| st.running.map(|run| run.kind)),
                            host: l.host,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let rounds = self.rounds.lock().unwrap_or_else(PoisonError::into_inner);
        AgentStatus {
            endpoints: self.endpoints(),
            protected,
            peers,
            received,
            checkpoints: rounds.count,
            max_hold_us: rounds.max_hold_us,
        }
    }

    /// One pass of the bitmap clearer: forget acknowledged records; flush the local disk
    /// and clear the regions no pending record touches any more.
    async fn clear_once(&self) {
        let mut acked = HashMap::new();
        for p in &self.peers {
            for s in p.sender.stats() {
                acked.insert(s.disk_id, s.acked_seq);
            }
        }
        for d in &self.disks {
            let Some(&seq) = acked.get(&d.cfg.id) else {
                continue;
            };
            let ranges = d.splitter.on_acked(seq);
            if ranges.is_empty() {
                continue;
            }
            let dev = Arc::clone(&d.device);
            let name = d.cfg.name.clone();
            match tokio::task::spawn_blocking(move || dev.clear_replicated(&ranges)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(disk = %name, error = %e, "clearing replicated regions failed")
                }
                Err(e) => tracing::warn!(disk = %name, error = %e, "clear task failed"),
            }
        }
    }

    async fn clear_behind_acks(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            self.clear_once().await;
        }
    }

    /// Clean shutdown: stop serving the exports (every in-flight request answered), let
    /// the streams drain (bounded by the configured timeout), flush every disk and mark
    /// its bitmap clean, then stop the receiver (its journals synced) and the rest.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        if self
            .stopping
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        tracing::info!("agent shutting down");
        // A sync pass stops queueing; what it left owed stays in the bitmap.
        self.sync_cancel.cancel();
        for d in &self.disks {
            self.registry.remove_and_drain(&d.cfg.name).await;
        }
        self.nbd_cancel.cancel();
        let deadline = Instant::now() + self.cfg.drain_timeout;
        while !self.peers.iter().all(|p| p.sender.is_drained()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.peers.iter().all(|p| p.sender.is_drained()) {
            tracing::warn!(
                timeout_s = self.cfg.drain_timeout.as_secs(),
                "stream not drained before shutdown: the bitmap keeps the unacknowledged regions"
            );
        }
        self.clear_once().await;
        // Persisters stop before the clean close, so none writes after it.
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        let mut first_err = None;
        for d in &self.disks {
            let dev = Arc::clone(&d.device);
            let r = tokio::task::spawn_blocking(move || dev.shutdown_clean())
                .await
                .map_err(|e| AgentError::Task(e.to_string()))
                .and_then(|r| r.map_err(AgentError::from));
            if let Err(e) = r {
                tracing::error!(disk = %d.cfg.name, error = %e, "clean shutdown of disk failed");
                first_err.get_or_insert(e);
            }
        }
        tracing::info!("agent stopped");
        first_err.map_or(Ok(()), Err)
    }
}

/// Managed protection: what the control channel (`agent::control`) drives. The agent
/// converges to the desired state the manager sends; checkpoint rounds are two-phase
/// (hold → the manager's release) and bounded.
impl Agent {
    /// Converges to `desired`: disks listed replicate to their recovery host with their
    /// VPG as consistency group (paused ones track in the bitmap only); disks not listed
    /// stop replicating; peers are added/removed; the receiver accepts exactly the
    /// protected hosts listed. Idempotent. Persists `desired` under `state/` so a restart
    /// resumes it before the manager is reachable.
    pub async fn apply(
        &self,
        desired: &crate::proto::control::DesiredState,
    ) -> Result<(), AgentError> {
        let _ = desired;
        Err(AgentError::Task("apply: not built yet".into()))
    }

    /// Version of the desired state this agent runs (persisted), if any.
    pub fn desired_version(&self) -> Option<u64> {
        None
    }

    /// The desired state persisted by the last [`Agent::apply`] (`state/desired.json`),
    /// if any: applied at start, before the manager is reachable.
    pub fn persisted_desired(&self) -> Option<crate::proto::control::DesiredState> {
        None
    }

    /// Phase one of a round: hold write completions of every disk of `hold.vpg_id` on
    /// this host, insert marker `hold.round` into each disk's stream, and keep holding
    /// until [`Agent::release_round`] or `hold.bound_ms` (then release by itself). With
    /// `barrier: false` release at once. The receiver resolves when completions flow
    /// again, with how long they were held and whether the release was on time.
    pub fn hold_round(
        self: &Arc<Self>,
        hold: &crate::proto::control::RoundHold,
    ) -> (
        crate::proto::control::RoundHeld,
        Option<tokio::sync::oneshot::Receiver<crate::proto::control::RoundReleased>>,
    ) {
        (
            crate::proto::control::RoundHeld {
                round: hold.round,
                vpg_id: hold.vpg_id.clone(),
                timestamp_ms: 0,
                disks: vec![],
                error: Some("hold_round: not built yet".into()),
            },
            None,
        )
    }

    /// Phase two: release the round's hold (no-op if it already ended). Returns whether
    /// it was still held.
    pub fn release_round(&self, round: u64) -> bool {
        let _ = round;
        false
    }

    /// Recovery side: one report per journal this host keeps. `reported` remembers, per
    /// (host, disk), the newest checkpoint id already reported on the current control
    /// connection (reset it on reconnect to report everything again).
    pub fn journal_reports(
        &self,
        reported: &mut HashMap<(String, u64), u64>,
    ) -> Vec<crate::proto::control::JournalReport> {
        let _ = reported;
        vec![]
    }

    /// Events worth recording at the manager (sync start/end, stream connected/lost,
    /// bitmap-only, replica behind).
    pub fn subscribe_events(
        &self,
    ) -> tokio::sync::broadcast::Receiver<crate::proto::control::AgentEvent> {
        tokio::sync::broadcast::channel(1).1
    }

    /// Opens (creating a sparse image if missing) and exports a new disk at run time.
    pub async fn add_disk(&self, disk: config::DiskConfig) -> Result<(), AgentError> {
        Err(AgentError::Disk {
            name: disk.name,
            reason: "add_disk: not built yet".into(),
        })
    }

    /// Serves or withdraws a disk's NBD export (a powered-off VM's disks are not served).
    /// Withdrawing drains in-flight requests first.
    pub async fn set_exported(&self, disk_name: &str, exported: bool) -> Result<(), AgentError> {
        let _ = exported;
        Err(AgentError::NoSuchDisk(disk_name.to_string()))
    }

    /// Recovery side: deletes the journal and replica of (host, disk_id), which must not
    /// be streaming any more.
    pub async fn drop_replica(&self, host: &str, disk_id: u64) -> Result<(), AgentError> {
        let _ = (host, disk_id);
        Err(AgentError::Task("drop_replica: not built yet".into()))
    }
}

async fn watch_events(
    mut events: mpsc::UnboundedReceiver<StreamEvent>,
    splitters: HashMap<u64, (Arc<Splitter>, Option<Arc<sync::DiskSync>>)>,
    last_error: Arc<Mutex<Option<String>>>,
    cancel: CancellationToken,
) {
    let set = |v: Option<String>| *last_error.lock().unwrap_or_else(PoisonError::into_inner) = v;
    loop {
        // The senders outlive this task (the agent holds them), so the channel never
        // closes by itself: stop on the agent's token.
        let ev = tokio::select! {
            _ = cancel.cancelled() => break,
            ev = events.recv() => match ev {
                Some(ev) => ev,
                None => break,
            },
        };
        match ev {
            StreamEvent::Connected => {
                tracing::info!("stream connected");
                set(None);
            }
            StreamEvent::Disconnected { error } => {
                tracing::info!(%error, "stream disconnected");
                set(Some(error));
            }
            StreamEvent::Refused { reason } => {
                tracing::warn!(%reason, "stream refused by the recovery host");
                set(Some(format!("refused: {reason}")));
            }
            StreamEvent::NeedsBitmapSync {
                disk,
                acked_seq,
                reason,
            } => {
                tracing::warn!(disk, acked_seq, %reason, "disk is bitmap-only: a Bitmap Sync is needed");
                if let Some((s, ds)) = splitters.get(&disk) {
                    s.on_needs_bitmap_sync();
                    if let Some(ds) = ds {
                        ds.poke();
                    }
                }
            }
            StreamEvent::ReplicaBehind {
                disk,
                durable_seq,
                acked_seq,
            } => {
                tracing::error!(
                    disk,
                    durable_seq,
                    acked_seq,
                    "recovery host lost acknowledged records: a Full Sync is needed"
                );
                if let Some((s, ds)) = splitters.get(&disk) {
                    s.on_replica_behind();
                    if let Some(ds) = ds {
                        ds.poke();
                    }
                }
            }
            StreamEvent::DiskNotAccepted { disk } => {
                tracing::warn!(disk, "recovery host did not accept the disk");
                set(Some(format!(
                    "disk {disk} not accepted by the recovery host"
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn insecure_config(dir: &Path, section: &str) -> AgentConfig {
        let file: AgentSection = toml::from_str(section).unwrap();
        AgentConfig::resolve(
            &file,
            AgentFlags {
                data_dir: Some(dir.to_path_buf()),
                site: Some("s".into()),
                host_name: Some("h1".into()),
                nbd_listen: Some("127.0.0.1:0".into()),
                insecure: true,
                ..AgentFlags::default()
            },
        )
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_start_releases_what_it_started() {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let image = dir.path().join("disks").join("d.img");
        std::fs::create_dir_all(image.parent().unwrap()).unwrap();
        std::fs::write(&image, vec![7u8; 1 << 20]).unwrap();
        let cfg = insecure_config(
            dir.path(),
            &format!(
                "data_listen = '127.0.0.1:{port}'\n\
                 [[allow]]\nhost_name = 'p'\nstorage = '{}'\n\
                 [[disks]]\nname = 'd'\nid = 1\nsize = '2 MiB'\n",
                dir.path().join("from-p").display()
            ),
        );
        let err = Agent::start(cfg).await.unwrap_err();
        assert!(err.to_string().contains("2097152"), "{err}");
        assert_eq!(
            std::fs::read(&image).unwrap(),
            vec![7u8; 1 << 20],
            "image untouched"
        );
        // The receiver had bound the port before the disk failed; it must let go of it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
                Ok(_) => break,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("port {port} still held after a failed start: {e}"),
            }
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoint_of_an_unknown_group_is_refused_and_rounds_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = insecure_config(
            dir.path(),
            "[[disks]]\nname = 'a'\nid = 1\nsize = '1 MiB'\ngroup = 'g1'\n\
             [[disks]]\nname = 'b'\nid = 2\nsize = '1 MiB'\ngroup = 'g2'\n",
        );
        let agent = Agent::start(cfg).await.unwrap();
        let e = agent
            .checkpoint(&CheckpointRequest {
                group: Some("nope".into()),
                ..CheckpointRequest::default()
            })
            .unwrap_err();
        assert!(matches!(e, AgentError::NoSuchGroup(_)), "{e}");
        let r = agent
            .checkpoint(&CheckpointRequest {
                group: Some("g2".into()),
                tag: Some("t".into()),
                ..CheckpointRequest::default()
            })
            .unwrap();
        assert_eq!(r.disks.len(), 1);
        assert_eq!(r.disks[0].name, "b");
        assert!(!r.disks[0].queued, "an unreplicated disk queues no marker");
        let r2 = agent.checkpoint(&CheckpointRequest::default()).unwrap();
        assert_eq!(r2.disks.len(), 2);
        assert!(r2.id > r.id, "ids increase");
        let st = agent.status();
        assert_eq!(st.checkpoints, 2);
        assert!(st
            .protected
            .iter()
            .all(|d| d.mode == ReplicationMode::Unprotected));
        agent.shutdown().await.unwrap();
        assert!(matches!(
            agent.checkpoint(&CheckpointRequest::default()),
            Err(AgentError::ShuttingDown)
        ));
        // Clean shutdown: both bitmaps persisted with the clean flag.
        for d in ["a", "b"] {
            let (_, clean) = crate::agent::dirty::DirtyBitmap::load(
                &dir.path().join("dirty").join(format!("{d}.dirty")),
            )
            .unwrap();
            assert!(clean, "{d}");
        }
    }
}
