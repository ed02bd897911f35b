//! The agent process of one host (`bulwark agent`): it owns the host's protected disks
//! (raw images exported over NBD, each write split into the replication stream and the
//! dirty bitmap) and, at a recovery host, the journals and replica disks it receives.
//!
//! Code map:
//! - `config`: the `[agent]` section and flags, resolved and checked.
//! - `splitter`: the WriteSink of one disk — sequence numbers, the sender hand-off, and
//!   the bookkeeping that clears the dirty bitmap only behind durable acknowledgements.
//! - `sync`: the per-disk sync task (decision, policy, slots, in-band pass, events).
//! - `admin`: the local, loopback-only HTTP endpoint (status, checkpoint trigger).
//! - here: [`Agent`] — start (open disks, receiver, NBD server), protection as a desired
//!   state converged at run time, checkpoint rounds (one-shot and two-phase), journal
//!   reports, events, status, clean shutdown.
//!
//! Protection comes about one way: [`Agent::apply`] of a [`DesiredState`]. At start the
//! disks are opened unprotected and the state the static configuration describes
//! (`[[disks]] recovery_host/group`, `[[peers]]`, `[[allow]]`) is converged, with the
//! manager's last desired state (`state/desired.json`) laid over it: a disk the manager
//! lists follows the manager, the others keep their static protection.
//!
//! Start order matters: the receiver and the senders exist before any export is served,
//! so the first guest write already has its splitter; a clean shutdown runs in reverse
//! (exports drained, queues drained, disks flushed, bitmaps marked clean).

pub mod admin;
pub mod bench;
pub mod config;
pub mod meter;
mod reverse;
pub mod splitter;
pub mod sync;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::agent::crashsafe;
use crate::agent::dirty::{DirtyConfig, DirtyPaths, DirtyTracker, RecoveryState};
use crate::agent::journal::CheckpointKind;
use crate::agent::nbd::{
    BlockDevice, CompletionGate, ExportRegistry, FileDevice, HoldGuard, NbdServer, ProtectedDevice,
    ServerConfig,
};
use crate::agent::stream::{
    ClientTransport, DiskMode, DiskSpec, Receiver, ReceiverConfig, ReceiverHandle, Sender,
    SenderConfig, ServerTransport, StreamError, StreamEvent,
};
use crate::agent::tls;
use crate::model::sync::Tracking;
use crate::proto::agent::{
    AgentEndpoints, AgentStatus, CheckpointDisk, CheckpointReport, CheckpointRequest, PeerStatus,
    ProtectedDiskStatus, ReceivedCheckpoint, ReceivedDiskStatus, ReplicationMode, StartState,
    SyncAction,
};
use crate::proto::control::{
    AgentEvent, DesiredState, DiskProtection, JournalReport, PeerTarget, RoundHeld, RoundHold,
    RoundReleased,
};
use crate::proto::stream::ReplicaState;

pub use config::{AgentConfig, AgentConfigError, AgentFlags, AgentSection, Security};
use config::{DiskConfig, PeerConfig};
/// How often a recovery host promotes the journals it keeps.
pub const PROMOTE_EVERY: Duration = Duration::from_secs(5);

pub use reverse::{without_seeded_disks, SeededDisk, REVERSE_SEEDS_FILE};
use splitter::Splitter;

/// Name of the persisted desired state under `state/`.
pub const DESIRED_FILE: &str = "desired.json";
/// Events kept for a slow subscriber before it starts missing some.
const EVENT_CAPACITY: usize = 1024;
/// How long converging waits for a disk's sync task to stop before moving on.
const SYNC_STOP_WAIT: Duration = Duration::from_secs(10);

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
    /// Parts of a desired state could not be applied (the rest was).
    #[error("desired state not fully applied: {}", .0.join("; "))]
    Apply(Vec<String>),
    #[error("this agent has no replication listener (data_listen): it keeps no replicas")]
    NotRecoveryHost,
    #[error("the replica of disk {disk_id} from host {host} is in use: {reason}")]
    ReplicaInUse {
        host: String,
        disk_id: u64,
        reason: String,
    },
    #[error(transparent)]
    Fencing(#[from] crate::agent::fencing::FencingError),
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Names used in file names, exports and storage paths: letters, digits, `-`, `_`, `.`;
/// no leading dot (the configuration's rule, for names that arrive at run time).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn tracking_of(start: StartState) -> Tracking {
    match start {
        StartState::New => Tracking::New,
        StartState::Clean => Tracking::Clean,
        StartState::Unclean => Tracking::Unclean,
        StartState::Lost => Tracking::Lost,
    }
}

/// One disk of this host, protected or not.
struct HostDisk {
    cfg: DiskConfig,
    device: Arc<ProtectedDevice<FileDevice>>,
    splitter: Arc<Splitter>,
    /// Held by checkpoint rounds of the disk's group. One gate per disk, because group
    /// membership changes at run time: a round holds every member's gate.
    gate: Arc<CompletionGate>,
    epoch: u64,
    start: StartState,
    start_al_extents: u64,
    /// The disk's sync task state, created at its first protection and kept (status,
    /// tracking) across later ones.
    sync: OnceLock<Arc<sync::DiskSync>>,
    /// The recovery host the dirty bitmap is exact against (the one the disk was last
    /// protected to), and how exact: another host's replica gets `New` (a whole-disk
    /// comparison, or an Initial Sync when it is empty).
    tracked: Mutex<(Option<String>, Tracking)>,
    prot: Mutex<Option<Protection>>,
}

/// How a disk is protected now.
struct Protection {
    vpg_id: String,
    recovery_host: String,
    paused: bool,
    peer: Arc<Peer>,
    /// Stops the disk's sync task; the handle says when it has stopped.
    task: CancellationToken,
    handle: tokio::task::JoinHandle<()>,
}

impl HostDisk {
    /// The consistency group: the VPG while protected, else the configured group.
    fn group(&self) -> String {
        lock(&self.prot)
            .as_ref()
            .map_or_else(|| self.cfg.group.clone(), |p| p.vpg_id.clone())
    }

    /// The stream this disk goes to, if protected.
    fn sender(&self) -> Option<Sender> {
        lock(&self.prot).as_ref().map(|p| p.peer.sender.clone())
    }
}

/// A recovery host this host streams to.
struct Peer {
    host_name: String,
    address: SocketAddr,
    sender: Sender,
    /// Stops the sender and its event watcher.
    cancel: CancellationToken,
    last_error: Arc<Mutex<Option<String>>>,
    /// Disks attached to the sender (stream events are routed to them).
    routes: Arc<Mutex<HashMap<u64, Arc<HostDisk>>>>,
}

/// A two-phase round holding completions until the manager's release or its bound.
struct HeldRound {
    vpg_id: String,
    guards: Vec<HoldGuard>,
    started: Instant,
    /// Stops the bound's timer when the release comes first.
    timer: CancellationToken,
    tx: oneshot::Sender<RoundReleased>,
}

#[derive(Default)]
struct Rounds {
    last_id: u64,
    count: u64,
    max_hold_us: u64,
    held: HashMap<u64, HeldRound>,
}

/// A running agent. See the module documentation.
pub struct Agent {
    cfg: AgentConfig,
    endpoints: AgentEndpoints,
    /// In the order they were opened (the configuration's, then `add_disk`'s).
    disks: RwLock<Vec<Arc<HostDisk>>>,
    peers: Mutex<BTreeMap<String, Arc<Peer>>>,
    receiver: Option<ReceiverHandle>,
    client_tls: Option<Arc<rustls::ClientConfig>>,
    sync_host: Arc<sync::SyncHost>,
    registry: ExportRegistry,
    rounds: Mutex<Rounds>,
    events: broadcast::Sender<AgentEvent>,
    /// Serialises converging (apply, add_disk).
    apply_lock: tokio::sync::Mutex<()>,
    /// The manager's desired state this agent runs (persisted in `state/desired.json`).
    managed: Mutex<Option<DesiredState>>,
    /// The highest fencing generation seen per VPG (persisted in `state/fencing.json`);
    /// shared with the receiver, which admits every stream and sync session through it.
    fencing: Arc<crate::agent::fencing::Fencing>,
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
            .field("disks", &self.disks_now().len())
            .finish_non_exhaustive()
    }
}

/// The desired state the static configuration describes: each disk with a recovery host
/// replicates with its configured group as consistency group.
pub fn static_desired(cfg: &AgentConfig) -> DesiredState {
    DesiredState {
        version: 0,
        protect: cfg
            .disks
            .iter()
            .filter_map(|d| {
                d.recovery_host.as_ref().map(|r| DiskProtection {
                    disk_id: d.id,
                    disk_name: d.name.clone(),
                    vm: String::new(),
                    vpg_id: d.group.clone(),
                    recovery_host: r.clone(),
                    paused: false,
                    priority: d.priority,
                    resync: d.resync,
                    fencing_generation: 0,
                })
            })
            .collect(),
        peers: cfg
            .peers
            .iter()
            .map(|p| PeerTarget {
                host_name: p.host_name.clone(),
                address: p.address.to_string(),
                bandwidth_limit: p.bandwidth_limit,
            })
            .collect(),
        accept: cfg.allow.keys().cloned().collect(),
        fencing: BTreeMap::new(),
        recovery: Vec::new(),
    }
}

/// The manager's desired state laid over the static one: a disk the manager lists
/// follows it; peers and accepted hosts are the union (the manager's address wins).
fn merged(base: DesiredState, managed: Option<&DesiredState>) -> DesiredState {
    let Some(m) = managed else { return base };
    let listed: HashSet<u64> = m.protect.iter().map(|p| p.disk_id).collect();
    let mut protect: Vec<DiskProtection> = base
        .protect
        .into_iter()
        .filter(|p| !listed.contains(&p.disk_id))
        .collect();
    protect.extend(m.protect.iter().cloned());
    let mut peers: Vec<PeerTarget> = m.peers.clone();
    for p in base.peers {
        if !peers.iter().any(|q| q.host_name == p.host_name) {
            peers.push(p);
        }
    }
    let mut accept = base.accept;
    for h in &m.accept {
        if !accept.contains(h) {
            accept.push(h.clone());
        }
    }
    DesiredState {
        version: m.version,
        protect,
        peers,
        accept,
        fencing: m.fencing.clone(),
        recovery: m.recovery.clone(),
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

/// Builds the parts of one opened disk (unprotected: its splitter has no sender) and
/// starts its bitmap persister.
fn install_disk(
    d: &DiskConfig,
    o: Opened,
    persist_every: Duration,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Arc<HostDisk>, AgentError> {
    let splitter = Arc::new(Splitter::new(d.id, o.epoch, None, Arc::clone(&o.tracker)));
    let gate = CompletionGate::new();
    let device = Arc::new(ProtectedDevice::new(
        o.device,
        Arc::clone(&o.tracker),
        splitter.clone(),
        Arc::clone(&gate),
    )?);
    tasks.spawn(
        o.tracker
            .spawn_persister(persist_every, cancel.child_token()),
    );
    Ok(Arc::new(HostDisk {
        cfg: d.clone(),
        device,
        splitter,
        gate,
        epoch: o.epoch,
        start: o.start,
        start_al_extents: o.start_al_extents,
        sync: OnceLock::new(),
        // The static recovery host is the one the bitmap was kept against.
        tracked: Mutex::new((d.recovery_host.clone(), tracking_of(o.start))),
        prot: Mutex::new(None),
    }))
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

        // Before the receiver: it admits every stream through the record.
        let fencing = Arc::new(crate::agent::fencing::Fencing::open(&cfg.state_dir())?);
        // Recovery side first: a peer may already be dialling.
        let mut data_addr = None;
        let receiver = match cfg.data_listen {
            Some(listen) => {
                for storage in cfg.allow.values() {
                    std::fs::create_dir_all(storage).map_err(io_err("create", storage))?;
                }
                let mut rc = ReceiverConfig::new(listen, server);
                rc.allow = cfg.allow.clone().into_iter().collect::<HashMap<_, _>>();
                rc.fencing = Some(Arc::clone(&fencing));
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
        let mut disks = Vec::new();
        for (d, o) in cfg.disks.iter().zip(opened) {
            disks.push(install_disk(d, o, cfg.persist_every, &tasks, &cancel)?);
        }

        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let sync_cancel = cancel.child_token();
        let sync_host = Arc::new(sync::SyncHost {
            host_name: cfg.host_name.clone(),
            settings: cfg.sync,
            clock,
            slots: sync::SyncSlots::new(cfg.sync.max_concurrent),
            events: sync::SyncEventLog::new(cfg.state_dir().join("sync-events.jsonl"))
                .broadcasting(events.clone()),
        });

        // Bound now (its address goes into the endpoints), served once protection is in
        // place.
        let registry = ExportRegistry::new();
        let mut server =
            NbdServer::bind(cfg.nbd_listen, registry.clone(), ServerConfig::default()).await?;
        let nbd_addr = server.local_addr()?;
        let socket = cfg.nbd_socket();
        if socket.as_os_str().len() < crate::agent::host::config::MAX_UNIX_PATH {
            server.listen_unix(&socket)?;
        } else {
            tracing::warn!(path = %socket.display(), "data directory path too long for a unix socket: NBD over TCP only");
        }
        let nbd_socket = server.unix_path().map(|p| p.display().to_string());

        let endpoints = AgentEndpoints {
            host_name: cfg.host_name.clone(),
            site: cfg.site.clone(),
            pid: std::process::id(),
            nbd: nbd_addr.to_string(),
            data: data_addr.map(|a| a.to_string()),
            admin: None,
            nbd_socket,
        };
        let agent = Arc::new(Agent {
            cfg,
            endpoints,
            disks: RwLock::new(disks),
            peers: Mutex::new(BTreeMap::new()),
            receiver,
            client_tls: client,
            sync_host,
            registry,
            rounds: Mutex::new(Rounds::default()),
            events,
            apply_lock: tokio::sync::Mutex::new(()),
            managed: Mutex::new(None),
            fencing,
            nbd_cancel,
            sync_cancel,
            cancel,
            tasks,
            stopping: std::sync::atomic::AtomicBool::new(false),
            admin: std::sync::OnceLock::new(),
        });

        // Protection: the static configuration must apply in full (it was checked);
        // the manager's persisted state is applied over it as far as it can be (disks
        // it names may only appear later, through `add_disk`).
        {
            let _g = agent.apply_lock.lock().await;
            agent.converge(&static_desired(&agent.cfg)).await?;
            if let Some(m) = agent.persisted_desired() {
                // The bitmap of a disk the manager protected was kept against that host.
                for p in &m.protect {
                    if let Some(d) = agent.disk_by_id(p.disk_id) {
                        let mut t = lock(&d.tracked);
                        if t.0.is_none() {
                            t.0 = Some(p.recovery_host.clone());
                        }
                    }
                }
                *lock(&agent.managed) = Some(m);
                let eff = agent.effective();
                if let Err(e) = agent.converge(&eff).await {
                    tracing::warn!(error = %e, "the persisted desired state did not fully apply at start");
                }
            }
        }

        for d in agent.disks_now() {
            agent.export(&d)?;
        }
        {
            let c = agent.nbd_cancel.clone();
            agent.tasks.spawn(async move {
                if let Err(e) = server.run(c).await {
                    tracing::error!(error = %e, "nbd server stopped");
                }
            });
        }
        let (c, n) = abort_start;
        c.disarm();
        n.disarm();
        {
            let a = Arc::clone(&agent);
            let c = agent.cancel.clone();
            agent.tasks.spawn(
                async move { a.clear_behind_acks(c).await }
                    .instrument(tracing::info_span!("bitmap-clearer")),
            );
        }
        if agent.receiver.is_some() {
            let a = Arc::clone(&agent);
            let c = agent.cancel.clone();
            agent.tasks.spawn(
                async move { a.promote_journals(c).await }
                    .instrument(tracing::info_span!("promoter")),
            );
        }
        tracing::info!(
            host = %agent.cfg.host_name,
            site = %agent.cfg.site,
            nbd = %nbd_addr,
            data = ?data_addr,
            disks = agent.disks_now().len(),
            peers = lock(&agent.peers).len(),
            "agent started"
        );
        Ok(agent)
    }

    /// Recovery side, in the background: every [`PROMOTE_EVERY`], each journal of a VPG
    /// the manager named (its `recovery` entries) moves the records older than the VPG's
    /// journal history — or more, to stay under its share of the hard limit — into the
    /// replica disk. Open views (a test, a failover before commit) hold it back by
    /// themselves; a journal a sync runs over waits for the next round.
    async fn promote_journals(self: Arc<Self>, cancel: CancellationToken) {
        use crate::agent::journal::PromotePolicy;
        let Some(receiver) = self.receiver.clone() else {
            return;
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(PROMOTE_EVERY) => {}
            }
            let Some(desired) = lock(&self.managed).clone() else {
                continue;
            };
            let mut work = Vec::new();
            for v in desired
                .recovery
                .iter()
                .filter(|v| v.journal_history_secs > 0)
            {
                let policy = PromotePolicy {
                    now_ms: chrono::Utc::now().timestamp_millis(),
                    history_ms: i64::try_from(v.journal_history_secs.saturating_mul(1000))
                        .unwrap_or(i64::MAX),
                    warn_bytes: (v.journal_warning_bytes_per_disk > 0)
                        .then_some(v.journal_warning_bytes_per_disk),
                    hard_limit_bytes: (v.journal_hard_limit_bytes_per_disk > 0)
                        .then_some(v.journal_hard_limit_bytes_per_disk),
                };
                for d in v.vms.iter().flat_map(|m| &m.vm.disks) {
                    work.push((d.host.clone(), d.disk_id, policy));
                }
            }
            let r = receiver.clone();
            let done = tokio::task::spawn_blocking(move || {
                for (host, disk, policy) in work {
                    match r.promote(&host, disk, &policy) {
                        Ok(Some(rep)) if rep.records_applied > 0 => {
                            tracing::info!(%host, disk, records = rep.records_applied,
                                freed = rep.bytes_freed, to = ?rep.promoted_to.map(|c| c.id),
                                history_short = rep.history_short,
                                blocked_by_view = rep.blocked_by_view,
                                "journal promoted into the replica");
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(%host, disk, error = %e, "journal promotion failed");
                        }
                    }
                }
            })
            .await;
            if let Err(e) = done {
                tracing::warn!(error = %e, "the promotion task failed");
            }
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    fn disks_now(&self) -> Vec<Arc<HostDisk>> {
        self.disks
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn disk_by_id(&self, id: u64) -> Option<Arc<HostDisk>> {
        self.disks_now().into_iter().find(|d| d.cfg.id == id)
    }

    fn disk_by_name(&self, name: &str) -> Option<Arc<HostDisk>> {
        self.disks_now().into_iter().find(|d| d.cfg.name == name)
    }

    fn peers_now(&self) -> Vec<Arc<Peer>> {
        lock(&self.peers).values().cloned().collect()
    }

    /// Serves the disk's NBD export.
    fn export(&self, d: &HostDisk) -> Result<(), AgentError> {
        self.registry.add_with_description(
            &d.cfg.name,
            &format!("bulwark protected disk {} (id {})", d.cfg.name, d.cfg.id),
            d.device.clone() as Arc<dyn BlockDevice>,
        )?;
        Ok(())
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

    /// Holds the gates of `members` and inserts marker `id` into each one's stream.
    /// Nothing in here waits for I/O. Called with `rounds` locked, so markers enter the
    /// streams in id order.
    fn place_markers(
        members: &[Arc<HostDisk>],
        id: u64,
        kind: u8,
        tag: &Option<String>,
        timestamp_ms: i64,
    ) -> (Vec<HoldGuard>, Vec<CheckpointDisk>) {
        let guards: Vec<HoldGuard> = members.iter().map(|d| d.gate.hold()).collect();
        let disks = members
            .iter()
            .map(|d| {
                let placed = d
                    .splitter
                    .insert_checkpoint(id, kind, tag.clone(), timestamp_ms);
                CheckpointDisk {
                    name: d.cfg.name.clone(),
                    disk_id: d.cfg.id,
                    seq: placed.seq,
                    queued: placed.queued,
                }
            })
            .collect();
        (guards, disks)
    }

    /// One checkpoint round on this host: hold the write completions of the group, insert
    /// the marker into every disk's stream, release. Nothing in between waits for I/O, so
    /// the hold lasts microseconds.
    pub fn checkpoint(&self, req: &CheckpointRequest) -> Result<CheckpointReport, AgentError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        let members: Vec<Arc<HostDisk>> = self
            .disks_now()
            .into_iter()
            .filter(|d| req.group.as_ref().is_none_or(|g| &d.group() == g))
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
        let mut rounds = lock(&self.rounds);
        let id = req
            .id
            .unwrap_or_else(|| (timestamp_ms.max(0) as u64).max(rounds.last_id + 1));
        let started = Instant::now();
        let (guards, disks) = Self::place_markers(&members, id, kind, &req.tag, timestamp_ms);
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
            .disk_by_name(disk)
            .ok_or_else(|| AgentError::NoSuchDisk(disk.to_string()))?;
        let s = d
            .sync
            .get()
            .filter(|_| lock(&d.prot).is_some())
            .ok_or_else(|| AgentError::Disk {
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
        for d in self.disks_now() {
            if let Some(s) = d.sync.get() {
                s.poke();
            }
        }
    }

    pub fn status(&self) -> AgentStatus {
        let now_ms = crate::agent::stream::now_ms();
        let mut stats = HashMap::new();
        for p in self.peers_now() {
            for s in p.sender.stats() {
                stats.insert(s.disk_id, s);
            }
        }
        let protected = self
            .disks_now()
            .iter()
            .map(|d| {
                let (recovery_host, group, paused) = match lock(&d.prot).as_ref() {
                    Some(p) => (Some(p.recovery_host.clone()), p.vpg_id.clone(), p.paused),
                    None => (None, d.cfg.group.clone(), false),
                };
                let s = recovery_host.as_ref().and_then(|_| stats.get(&d.cfg.id));
                let bitmap = d.device.tracker().bitmap();
                let mode = match (&recovery_host, s.map(|s| s.mode)) {
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
                    group,
                    recovery_host,
                    mode,
                    paused,
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
                    sync: d.sync.get().map(|s| s.status()).unwrap_or_default(),
                    writes: d.splitter.write_activity(now_ms),
                }
            })
            .collect();
        let peers = self
            .peers_now()
            .iter()
            .map(|p| PeerStatus {
                host_name: p.host_name.clone(),
                address: p.address.to_string(),
                connected: p.sender.is_connected(),
                last_error: lock(&p.last_error).clone(),
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
        let rounds = lock(&self.rounds);
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
        for d in self.disks_now() {
            let Some(sender) = d.sender() else { continue };
            let Some((_, seq)) = sender.disk_backlog(d.cfg.id) else {
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

    /// Clean shutdown: release any held round, stop serving the exports (every
    /// in-flight request answered), let the streams drain (bounded by the configured
    /// timeout), flush every disk and mark its bitmap clean, then stop the receiver (its
    /// journals synced) and the rest.
    pub async fn shutdown(&self) -> Result<(), AgentError> {
        if self
            .stopping
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        tracing::info!("agent shutting down");
        let held: Vec<u64> = lock(&self.rounds).held.keys().copied().collect();
        for round in held {
            self.end_round(round, false);
        }
        // A sync pass stops queueing; what it left owed stays in the bitmap.
        self.sync_cancel.cancel();
        let disks = self.disks_now();
        for d in &disks {
            self.registry.remove_and_drain(&d.cfg.name).await;
        }
        self.nbd_cancel.cancel();
        let deadline = Instant::now() + self.cfg.drain_timeout;
        let drained = |peers: &[Arc<Peer>]| peers.iter().all(|p| p.sender.is_drained());
        while !drained(&self.peers_now()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !drained(&self.peers_now()) {
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
        for d in &disks {
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

/// Converging: the machinery behind [`Agent::apply`] (and the start).
impl Agent {
    /// The state to converge to: the static one with the manager's laid over it.
    /// The bandwidth limit of the stream to `host`: the smaller of the static
    /// `[[agent.peers]]` limit and the manager's share of the site limit (either may be
    /// absent; neither = unlimited).
    fn peer_limit(&self, host: &str) -> Option<u64> {
        let own = self
            .cfg
            .peers
            .iter()
            .find(|p| p.host_name == host)
            .and_then(|p| p.bandwidth_limit);
        let managed = lock(&self.managed).as_ref().and_then(|m| {
            m.peers
                .iter()
                .find(|p| p.host_name == host)
                .and_then(|p| p.bandwidth_limit)
        });
        match (own, managed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn effective(&self) -> DesiredState {
        merged(static_desired(&self.cfg), lock(&self.managed).as_ref())
    }

    /// Converges to `eff` (the apply lock held). Every part that can be applied is; the
    /// others are collected in the error.
    async fn converge(&self, eff: &DesiredState) -> Result<(), AgentError> {
        let mut errors = Vec::new();

        // Where the recovery hosts are.
        let mut addrs: HashMap<String, SocketAddr> = HashMap::new();
        for p in &eff.peers {
            match tokio::net::lookup_host(p.address.as_str()).await {
                Ok(mut it) => match it.next() {
                    Some(a) => {
                        addrs.insert(p.host_name.clone(), a);
                    }
                    None => errors.push(format!(
                        "recovery host {}: address {} resolves to nothing",
                        p.host_name, p.address
                    )),
                },
                Err(e) => errors.push(format!(
                    "recovery host {}: address {}: {e}",
                    p.host_name, p.address
                )),
            }
        }

        // Which disk goes where. A disk whose entry cannot be applied keeps whatever
        // protection it has (the manager hears why and sends a better state).
        let disks = self.disks_now();
        let mut wanted: HashMap<u64, &DiskProtection> = HashMap::new();
        let mut untouched: HashSet<u64> = HashSet::new();
        for dp in &eff.protect {
            // Our own record knows a newer generation of the VPG: this protection is
            // stale (a failover happened) and the disk must not stream; it is
            // unprotected below, its writes kept in the dirty bitmap.
            let known = self.fencing.current(&dp.vpg_id);
            if dp.fencing_generation < known {
                errors.push(format!(
                    "disk {} ({}): fenced: VPG {} is at fencing generation {known}, this \
                     protection carries {}; not streamed",
                    dp.disk_id, dp.disk_name, dp.vpg_id, dp.fencing_generation
                ));
                continue;
            }
            let why = if !disks.iter().any(|d| d.cfg.id == dp.disk_id) {
                Some("is not on this host".to_string())
            } else if dp.recovery_host == self.cfg.host_name {
                Some("cannot replicate to its own host".to_string())
            } else if !valid_name(&dp.recovery_host) {
                Some(format!(
                    "recovery host {:?} is not a valid name",
                    dp.recovery_host
                ))
            } else if !addrs.contains_key(&dp.recovery_host) {
                Some(format!(
                    "recovery host {} has no (valid) address among the peers",
                    dp.recovery_host
                ))
            } else {
                None
            };
            match why {
                Some(why) => {
                    errors.push(format!("disk {} ({}) {why}", dp.disk_id, dp.disk_name));
                    untouched.insert(dp.disk_id);
                }
                None => {
                    wanted.insert(dp.disk_id, dp);
                }
            }
        }

        // A recovery host whose address changed gets a new sender: its disks are moved.
        let moved: HashSet<String> = self
            .peers_now()
            .iter()
            .filter(|p| addrs.get(&p.host_name).is_some_and(|a| *a != p.address))
            .map(|p| p.host_name.clone())
            .collect();

        for d in &disks {
            if untouched.contains(&d.cfg.id) {
                continue;
            }
            let current = lock(&d.prot).as_ref().map(|p| p.recovery_host.clone());
            match (wanted.get(&d.cfg.id), current) {
                (None, None) => {}
                (None, Some(_)) => self.unprotect(d).await,
                (Some(w), Some(host)) if host == w.recovery_host && !moved.contains(&host) => {
                    self.update_protection(d, w);
                }
                (Some(w), current) => {
                    if current.is_some() {
                        self.unprotect(d).await;
                    }
                    let Some(&addr) = addrs.get(&w.recovery_host) else {
                        continue;
                    };
                    if let Err(e) = self.protect(d, w, addr) {
                        errors.push(format!("disk {} ({}): {e}", d.cfg.id, d.cfg.name));
                    }
                }
            }
        }

        // Running streams follow a changed bandwidth limit in place (no reconnect, the
        // queue kept).
        for p in self.peers_now() {
            let before = p.sender.bandwidth_limit();
            let limit = self.peer_limit(&p.host_name);
            if p.sender.set_bandwidth_limit(limit) {
                tracing::info!(
                    peer = %p.host_name,
                    from = ?before,
                    to = ?limit,
                    "bandwidth limit of the stream changed"
                );
            }
        }

        // Peers left without disks stop (their connection closes).
        lock(&self.peers).retain(|host, p| {
            let keep = !lock(&p.routes).is_empty();
            if !keep {
                tracing::info!(peer = %host, "no disk streams to this recovery host any more: stream stopped");
                p.cancel.cancel();
            }
            keep
        });

        // Recovery side: exactly the accepted hosts may stream here.
        match &self.receiver {
            Some(r) => {
                let mut allow = HashMap::new();
                for h in &eff.accept {
                    if !valid_name(h) {
                        errors.push(format!("accepted host {h:?} is not a valid name"));
                        continue;
                    }
                    let storage = self
                        .cfg
                        .allow
                        .get(h)
                        .cloned()
                        .unwrap_or_else(|| self.cfg.storage.join(h));
                    if let Err(e) = std::fs::create_dir_all(&storage) {
                        errors.push(format!("storage {} of host {h}: {e}", storage.display()));
                        continue;
                    }
                    allow.insert(h.clone(), storage);
                }
                r.set_allow(allow);
            }
            None if !eff.accept.is_empty() => errors.push(format!(
                "{} protected host(s) to accept, but this agent has no data_listen",
                eff.accept.len()
            )),
            None => {}
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(AgentError::Apply(errors))
        }
    }

    /// The sender to `host` at `addr`, started if missing.
    fn peer_for(&self, host: &str, addr: SocketAddr) -> Result<Arc<Peer>, AgentError> {
        let mut peers = lock(&self.peers);
        if let Some(p) = peers.get(host) {
            if p.address == addr {
                return Ok(Arc::clone(p));
            }
            // Moved: disks still on the old sender were detached by the caller.
            p.cancel.cancel();
            peers.remove(host);
        }
        let opts = self.cfg.peers.iter().find(|p| p.host_name == host);
        let transport = match &self.client_tls {
            Some(c) => ClientTransport::Tls {
                config: Arc::clone(c),
                server_name: host.to_string(),
            },
            None => ClientTransport::Insecure,
        };
        let mut sc = SenderConfig::new(self.cfg.host_name.clone(), addr, transport);
        // Per-peer options from a static `[[peers]]` entry of that host, else the
        // configuration's defaults.
        let defaults = PeerConfig::with_defaults(host, addr, self.cfg.away_bound);
        let o = opts.unwrap_or(&defaults);
        sc.compression = o.compression;
        sc.bandwidth_limit = self.peer_limit(host);
        sc.queue_memory = o.queue_memory;
        sc.spill_limit = o.spill_limit;
        sc.spill_dir = (o.spill_limit > 0).then(|| self.cfg.spill_dir(host));
        sc.away_bound = o.away_bound;
        if let Some(t) = self.cfg.peer_timeout {
            sc.peer_timeout = t;
        }
        let cancel = self.cancel.child_token();
        let (sender, events) = Sender::start(sc, Vec::new(), cancel.clone())?;
        let peer = Arc::new(Peer {
            host_name: host.to_string(),
            address: addr,
            sender,
            cancel: cancel.clone(),
            last_error: Arc::new(Mutex::new(None)),
            routes: Arc::new(Mutex::new(HashMap::new())),
        });
        self.tasks.spawn(
            watch_events(
                events,
                host.to_string(),
                Arc::clone(&peer.routes),
                Arc::clone(&peer.last_error),
                self.events.clone(),
                cancel,
            )
            .instrument(tracing::info_span!("stream-events", peer = %host)),
        );
        tracing::info!(peer = %host, %addr, "stream to recovery host started");
        peers.insert(host.to_string(), Arc::clone(&peer));
        Ok(peer)
    }

    /// Protects an unprotected disk: attach it to the peer's sender, give the splitter
    /// the sender, start its sync task.
    fn protect(
        &self,
        d: &Arc<HostDisk>,
        w: &DiskProtection,
        addr: SocketAddr,
    ) -> Result<(), AgentError> {
        let peer = self.peer_for(&w.recovery_host, addr)?;
        peer.sender.add_disk(DiskSpec {
            disk_id: d.cfg.id,
            size: d.cfg.size,
            generation: d.epoch,
            vpg_id: w.vpg_id.clone(),
            fencing_generation: w.fencing_generation,
        })?;
        lock(&peer.routes).insert(d.cfg.id, Arc::clone(d));
        // Paused first, so no record slips into the stream between attach and pause.
        d.splitter.set_paused(w.paused);
        d.splitter.attach(peer.sender.clone());
        let tracking = {
            let mut t = lock(&d.tracked);
            let tracking = if t.0.as_deref() == Some(w.recovery_host.as_str()) {
                t.1
            } else {
                // Nothing says what that replica holds relative to this bitmap.
                Tracking::New
            };
            *t = (Some(w.recovery_host.clone()), tracking);
            tracking
        };
        let ds = d.sync.get_or_init(|| {
            let mut dc = d.cfg.clone();
            dc.priority = w.priority;
            dc.resync = w.resync;
            Arc::new(sync::DiskSync::new(
                dc,
                Arc::clone(&d.device),
                Arc::clone(&d.splitter),
                peer.sender.clone(),
                tracking,
                Arc::clone(&self.sync_host),
            ))
        });
        ds.set_target(peer.sender.clone(), tracking);
        ds.set_policy(w.priority, w.resync);
        let task = self.sync_cancel.child_token();
        let handle = self.tasks.spawn(
            Arc::clone(ds)
                .run(task.clone())
                .instrument(tracing::info_span!("sync", disk = %d.cfg.name)),
        );
        *lock(&d.prot) = Some(Protection {
            vpg_id: w.vpg_id.clone(),
            recovery_host: w.recovery_host.clone(),
            paused: w.paused,
            peer,
            task,
            handle,
        });
        tracing::info!(
            disk = %d.cfg.name, recovery_host = %w.recovery_host, vpg = %w.vpg_id,
            paused = w.paused, ?tracking, "disk protected"
        );
        Ok(())
    }

    /// Same recovery host: group, policy and pause change in place.
    fn update_protection(&self, d: &HostDisk, w: &DiskProtection) {
        let resumed = {
            let mut g = lock(&d.prot);
            let Some(p) = g.as_mut() else { return };
            p.vpg_id = w.vpg_id.clone();
            // A new fencing generation renews the stream (queue kept) with it.
            match p
                .peer
                .sender
                .set_fencing(d.cfg.id, &w.vpg_id, w.fencing_generation)
            {
                Ok(true) => tracing::info!(disk = %d.cfg.name, vpg = %w.vpg_id,
                    fencing_generation = w.fencing_generation, "fencing generation of the stream changed"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(disk = %d.cfg.name, error = %e, "cannot change the stream's fencing")
                }
            }
            let was = p.paused;
            p.paused = w.paused;
            if was != w.paused {
                d.splitter.set_paused(w.paused);
                tracing::info!(disk = %d.cfg.name, paused = w.paused, "protection paused/resumed");
            }
            was && !w.paused
        };
        if let Some(ds) = d.sync.get() {
            // Also pokes the task: a resumed disk's sync decision runs now.
            ds.set_policy(w.priority, w.resync);
            if resumed {
                ds.poke();
            }
        }
    }

    /// Stops protecting a disk: its sync task stops, the splitter loses its sender (what
    /// was queued and not acknowledged is marked owed in the bitmap), the sender drops it.
    async fn unprotect(&self, d: &HostDisk) {
        let Some(p) = lock(&d.prot).take() else {
            return;
        };
        p.task.cancel();
        if tokio::time::timeout(SYNC_STOP_WAIT, p.handle)
            .await
            .is_err()
        {
            tracing::warn!(disk = %d.cfg.name, "sync task did not stop in time");
        }
        if let Some(ds) = d.sync.get() {
            lock(&d.tracked).1 = ds.tracking();
        }
        // The splitter first: no record may reach the sender once it forgot the disk.
        d.splitter.detach();
        lock(&p.peer.routes).remove(&d.cfg.id);
        p.peer.sender.remove_disk(d.cfg.id);
        tracing::info!(disk = %d.cfg.name, recovery_host = %p.recovery_host, "disk no longer protected");
    }

    fn end_round(&self, round: u64, on_time: bool) -> bool {
        let mut rounds = lock(&self.rounds);
        let Some(h) = rounds.held.remove(&round) else {
            return false;
        };
        drop(h.guards);
        let hold_us = h.started.elapsed().as_micros() as u64;
        rounds.max_hold_us = rounds.max_hold_us.max(hold_us);
        drop(rounds);
        h.timer.cancel();
        if !on_time {
            tracing::warn!(round, vpg = %h.vpg_id, hold_us, "round released by its bound (no release in time)");
        }
        // The caller may have stopped listening; the hold is over either way.
        let _ = h.tx.send(RoundReleased {
            round,
            vpg_id: h.vpg_id,
            hold_us,
            on_time,
        });
        true
    }

    fn persist_desired(&self, desired: &DesiredState) -> Result<(), AgentError> {
        let path = self.cfg.state_dir().join(DESIRED_FILE);
        let body =
            serde_json::to_vec_pretty(desired).map_err(|e| AgentError::Task(e.to_string()))?;
        crashsafe::write_atomically(&path, &body).map_err(|e| AgentError::Io {
            what: "write",
            path: e.path,
            source: e.source,
        })
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
    pub async fn apply(&self, desired: &DesiredState) -> Result<(), AgentError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        let _g = self.apply_lock.lock().await;
        // Newer fencing generations are recorded before anything of this state acts.
        self.fencing.observe(&desired.fencing)?;
        *lock(&self.managed) = Some(desired.clone());
        let eff = self.effective();
        let r = self.converge(&eff).await;
        // Persisted even when parts failed: it is what the manager wants, and a disk it
        // names may appear later (`add_disk` converges again).
        self.persist_desired(desired)?;
        tracing::info!(
            version = desired.version,
            ok = r.is_ok(),
            "desired state applied"
        );
        r
    }

    /// The bandwidth limit each running stream has now (`None`: unlimited), by
    /// recovery host name.
    pub fn peer_bandwidth_limits(&self) -> Vec<(String, Option<u64>)> {
        let mut v: Vec<(String, Option<u64>)> = self
            .peers_now()
            .iter()
            .map(|p| (p.host_name.clone(), p.sender.bandwidth_limit()))
            .collect();
        v.sort();
        v
    }

    /// The highest fencing generation seen per VPG.
    pub fn fencing(&self) -> &crate::agent::fencing::Fencing {
        &self.fencing
    }

    /// The replication receiver (recovery hosts only): journals, views, commits.
    pub fn receiver(&self) -> Option<&ReceiverHandle> {
        self.receiver.as_ref()
    }

    /// The NBD exports this agent serves (recoveries add their views here).
    pub fn registry(&self) -> &ExportRegistry {
        &self.registry
    }

    /// Where the journals and replicas of `host` are kept here (the allow-list's
    /// storage, else the configuration's, else `<storage>/<host>`).
    pub fn received_storage(&self, host: &str) -> PathBuf {
        self.receiver
            .as_ref()
            .and_then(|r| r.allowed().remove(host))
            .or_else(|| self.cfg.allow.get(host).cloned())
            .unwrap_or_else(|| self.cfg.storage.join(host))
    }

    /// Whether the agent is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Version of the desired state this agent runs (persisted), if any.
    pub fn desired_version(&self) -> Option<u64> {
        lock(&self.managed).as_ref().map(|d| d.version)
    }

    /// The desired state persisted by the last [`Agent::apply`] (`state/desired.json`),
    /// if any: applied at start, before the manager is reachable.
    pub fn persisted_desired(&self) -> Option<DesiredState> {
        let path = self.cfg.state_dir().join(DESIRED_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the persisted desired state");
                return None;
            }
        };
        match serde_json::from_slice(&bytes) {
            Ok(d) => Some(d),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "persisted desired state is unreadable: ignored");
                None
            }
        }
    }

    /// Phase one of a round: hold write completions of every disk of `hold.vpg_id` on
    /// this host, insert marker `hold.round` into each disk's stream, and keep holding
    /// until [`Agent::release_round`] or `hold.bound_ms` (then release by itself). With
    /// `barrier: false` release at once. The receiver resolves when completions flow
    /// again, with how long they were held and whether the release was on time.
    pub fn hold_round(
        self: &Arc<Self>,
        hold: &RoundHold,
    ) -> (RoundHeld, Option<oneshot::Receiver<RoundReleased>>) {
        let refuse = |error: String| {
            (
                RoundHeld {
                    round: hold.round,
                    vpg_id: hold.vpg_id.clone(),
                    timestamp_ms: crate::agent::stream::now_ms(),
                    disks: vec![],
                    error: Some(error),
                    quiesce: None,
                },
                None,
            )
        };
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return refuse(AgentError::ShuttingDown.to_string());
        }
        let members: Vec<Arc<HostDisk>> = self
            .disks_now()
            .into_iter()
            .filter(|d| d.group() == hold.vpg_id)
            .collect();
        if members.is_empty() {
            return refuse(format!("no disk of VPG {} on this host", hold.vpg_id));
        }
        let kind = match hold.kind {
            crate::proto::control::CheckpointKind::Scheduled => CheckpointKind::Scheduled,
            crate::proto::control::CheckpointKind::UserTagged => CheckpointKind::UserTagged,
            crate::proto::control::CheckpointKind::AppConsistent => CheckpointKind::AppConsistent,
        } as u8;
        let timestamp_ms = crate::agent::stream::now_ms();
        let (tx, rx) = oneshot::channel();
        let mut rounds = lock(&self.rounds);
        if rounds.held.contains_key(&hold.round) {
            drop(rounds);
            return refuse(format!("round {} is already held", hold.round));
        }
        let started = Instant::now();
        let (guards, disks) =
            Self::place_markers(&members, hold.round, kind, &hold.tag, timestamp_ms);
        rounds.last_id = rounds.last_id.max(hold.round);
        rounds.count += 1;
        let held = RoundHeld {
            round: hold.round,
            vpg_id: hold.vpg_id.clone(),
            timestamp_ms,
            disks,
            error: None,
            quiesce: None,
        };
        if !hold.barrier {
            drop(guards);
            let hold_us = started.elapsed().as_micros() as u64;
            rounds.max_hold_us = rounds.max_hold_us.max(hold_us);
            drop(rounds);
            let _ = tx.send(RoundReleased {
                round: hold.round,
                vpg_id: hold.vpg_id.clone(),
                hold_us,
                on_time: true,
            });
            return (held, Some(rx));
        }
        let timer = self.cancel.child_token();
        rounds.held.insert(
            hold.round,
            HeldRound {
                vpg_id: hold.vpg_id.clone(),
                guards,
                started,
                timer: timer.clone(),
                tx,
            },
        );
        drop(rounds);
        // The bound: the agent never holds longer, whatever the manager does.
        let weak = Arc::downgrade(self);
        let round = hold.round;
        let bound = Duration::from_millis(hold.bound_ms);
        self.tasks.spawn(async move {
            let expired = tokio::select! {
                _ = tokio::time::sleep(bound) => true,
                _ = timer.cancelled() => false,
            };
            if let Some(agent) = weak.upgrade() {
                // Cancelled by a release (nothing to do) or by shutdown (which releases).
                if expired {
                    agent.end_round(round, false);
                }
            }
        });
        (held, Some(rx))
    }

    /// Phase two: release the round's hold (no-op if it already ended). Returns whether
    /// it was still held.
    pub fn release_round(&self, round: u64) -> bool {
        self.end_round(round, true)
    }

    /// Recovery side: one report per journal this host keeps. `reported` remembers, per
    /// (host, disk), the newest checkpoint id already reported on the current control
    /// connection (reset it on reconnect to report everything again).
    pub fn journal_reports(
        &self,
        reported: &mut HashMap<(String, u64), u64>,
    ) -> Vec<JournalReport> {
        let Some(r) = &self.receiver else {
            return vec![];
        };
        let mut out = Vec::new();
        for (host, disk_id) in r.journal_keys() {
            let cps = r.checkpoints(&host, disk_id).unwrap_or_default();
            let mut ok: Vec<_> = cps
                .into_iter()
                .filter(|(_, ok)| *ok)
                .map(|(c, _)| c)
                .collect();
            ok.sort_by_key(|c| c.seq);
            let key = (host.clone(), disk_id);
            let seen = reported.get(&key).copied();
            let recoverable: Vec<u64> = ok
                .iter()
                .map(|c| c.id)
                .filter(|id| seen.is_none_or(|s| *id > s))
                .collect();
            if let Some(&newest) = recoverable.iter().max() {
                reported.insert(key, newest.max(seen.unwrap_or(0)));
            }
            out.push(JournalReport {
                journal_bytes: r.journal_bytes(&host, disk_id).unwrap_or(0),
                storage_error: r.storage_error(&host, disk_id),
                oldest_recoverable: ok.first().map(|c| c.id),
                newest_recoverable: ok.last().map(|c| c.id),
                recoverable,
                host,
                disk_id,
            });
        }
        out
    }

    /// Events worth recording at the manager (sync start/end, stream connected/lost,
    /// bitmap-only, replica behind).
    pub fn subscribe_events(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    /// Opens (creating a sparse image if missing) and exports a new disk at run time.
    /// The same disk again is a no-op; a disk the current desired state protects is
    /// protected at once.
    pub async fn add_disk(&self, disk: config::DiskConfig) -> Result<(), AgentError> {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(AgentError::ShuttingDown);
        }
        let bad = |reason: &str| AgentError::Disk {
            name: disk.name.clone(),
            reason: reason.to_string(),
        };
        if !valid_name(&disk.name) {
            return Err(bad(
                "use 1–128 letters, digits, '-', '_' or '.' (not leading)",
            ));
        }
        if disk.size == 0 || disk.size % 512 != 0 {
            return Err(bad("size must be a non-zero multiple of 512 bytes"));
        }
        let _g = self.apply_lock.lock().await;
        for d in self.disks_now() {
            if d.cfg.name == disk.name || d.cfg.id == disk.id {
                if d.cfg.name == disk.name
                    && d.cfg.id == disk.id
                    && d.cfg.size == disk.size
                    && d.cfg.path == disk.path
                {
                    return Ok(());
                }
                return Err(bad(&format!(
                    "another disk has this name or id {} on this host",
                    disk.id
                )));
            }
        }
        let (cfg2, d2) = (self.cfg.clone(), disk.clone());
        let opened = tokio::task::spawn_blocking(move || open_disk(&cfg2, &d2))
            .await
            .map_err(|e| AgentError::Task(e.to_string()))??;
        let hd = install_disk(
            &disk,
            opened,
            self.cfg.persist_every,
            &self.tasks,
            &self.cancel,
        )?;
        self.disks
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::clone(&hd));
        let eff = self.effective();
        if let Err(e) = self.converge(&eff).await {
            // About other entries (e.g. disks still to come): the manager hears of them
            // on its next apply.
            tracing::debug!(error = %e, "converging after a new disk");
        }
        self.export(&hd)?;
        tracing::info!(disk = %disk.name, id = disk.id, size = disk.size, "disk added");
        Ok(())
    }

    /// Serves or withdraws a disk's NBD export (a powered-off VM's disks are not served).
    /// Withdrawing drains in-flight requests first.
    pub async fn set_exported(&self, disk_name: &str, exported: bool) -> Result<(), AgentError> {
        let d = self
            .disk_by_name(disk_name)
            .ok_or_else(|| AgentError::NoSuchDisk(disk_name.to_string()))?;
        if exported {
            if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(AgentError::ShuttingDown);
            }
            if !self.registry.contains(disk_name) {
                self.export(&d)?;
            }
        } else {
            self.registry.remove_and_drain(disk_name).await;
        }
        Ok(())
    }

    /// Recovery side: deletes the journal and replica of (host, disk_id), which must not
    /// be streaming any more.
    pub async fn drop_replica(&self, host: &str, disk_id: u64) -> Result<(), AgentError> {
        let r = self.receiver.clone().ok_or(AgentError::NotRecoveryHost)?;
        if !valid_name(host) {
            return Err(AgentError::ReplicaInUse {
                host: host.to_string(),
                disk_id,
                reason: "not a valid host name".into(),
            });
        }
        let storage = r
            .allowed()
            .remove(host)
            .or_else(|| self.cfg.allow.get(host).cloned())
            .unwrap_or_else(|| self.cfg.storage.join(host));
        let dir = config::received_disk_dir(&storage, disk_id);
        let h = host.to_string();
        tokio::task::spawn_blocking(move || r.drop_disk(&h, disk_id, &dir))
            .await
            .map_err(|e| AgentError::Task(e.to_string()))?
            .map_err(|e| match e {
                StreamError::Refused(reason) => AgentError::ReplicaInUse {
                    host: host.to_string(),
                    disk_id,
                    reason,
                },
                other => AgentError::Stream(other),
            })
    }
}

fn stream_event(
    kind: &str,
    disk_id: Option<u64>,
    message: String,
    details: serde_json::Value,
) -> AgentEvent {
    AgentEvent {
        kind: kind.to_string(),
        disk_id,
        vm: None,
        message,
        details,
        at_ms: crate::agent::stream::now_ms(),
    }
}

/// Routes one sender's events to its disks and to the agent's event channel.
async fn watch_events(
    mut events: mpsc::UnboundedReceiver<StreamEvent>,
    peer: String,
    routes: Arc<Mutex<HashMap<u64, Arc<HostDisk>>>>,
    last_error: Arc<Mutex<Option<String>>>,
    out: broadcast::Sender<AgentEvent>,
    cancel: CancellationToken,
) {
    let set = |v: Option<String>| *lock(&last_error) = v;
    let route = |disk: u64| lock(&routes).get(&disk).cloned();
    // No subscriber (no control connection) is not an error.
    let emit = |e: AgentEvent| {
        let _ = out.send(e);
    };
    loop {
        // The sender outlives this task (the peer holds it), so the channel never closes
        // by itself: stop on the peer's token.
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
                // The recovery side may have changed while the stream was down (a journal
                // reopened after a storage error, lost records): each disk's sync task
                // asks it once whether a sync is needed.
                for d in lock(&routes).values() {
                    if let Some(ds) = d.sync.get() {
                        ds.poke();
                    }
                }
                emit(stream_event(
                    "stream_connected",
                    None,
                    format!("replication stream to {peer} connected"),
                    serde_json::json!({ "peer": peer }),
                ));
            }
            StreamEvent::Disconnected { error } => {
                tracing::info!(%error, "stream disconnected");
                emit(stream_event(
                    "stream_disconnected",
                    None,
                    format!("replication stream to {peer} lost: {error}"),
                    serde_json::json!({ "peer": peer, "error": error }),
                ));
                set(Some(error));
            }
            StreamEvent::Refused { reason } => {
                tracing::warn!(%reason, "stream refused by the recovery host");
                emit(stream_event(
                    "stream_disconnected",
                    None,
                    format!("replication stream refused by {peer}: {reason}"),
                    serde_json::json!({ "peer": peer, "refused": reason }),
                ));
                set(Some(format!("refused: {reason}")));
            }
            StreamEvent::NeedsBitmapSync {
                disk,
                acked_seq,
                reason,
            } => {
                tracing::warn!(disk, acked_seq, %reason, "disk is bitmap-only: a Bitmap Sync is needed");
                emit(stream_event(
                    "disk_bitmap_only",
                    Some(disk),
                    format!("disk {disk} went bitmap-only: {reason}"),
                    serde_json::json!({ "peer": peer, "acked_seq": acked_seq, "reason": reason }),
                ));
                if let Some(d) = route(disk) {
                    d.splitter.on_needs_bitmap_sync();
                    if let Some(ds) = d.sync.get() {
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
                emit(stream_event(
                    "replica_behind",
                    Some(disk),
                    format!(
                        "{peer} lost acknowledged records of disk {disk}: a Full Sync is needed"
                    ),
                    serde_json::json!({ "peer": peer, "durable_seq": durable_seq, "acked_seq": acked_seq }),
                ));
                if let Some(d) = route(disk) {
                    d.splitter.on_replica_behind();
                    if let Some(ds) = d.sync.get() {
                        ds.poke();
                    }
                }
            }
            StreamEvent::DiskRefused {
                disk,
                fenced,
                reason,
            } => {
                tracing::warn!(disk, fenced, %reason, "recovery host refused the disk");
                let kind = if fenced {
                    "stream_fenced"
                } else {
                    "disk_refused"
                };
                emit(stream_event(
                    kind,
                    Some(disk),
                    format!("{peer} refused the stream of disk {disk}: {reason}"),
                    serde_json::json!({ "peer": peer, "fenced": fenced, "reason": reason }),
                ));
                // Not fenced and not a size mismatch: the recovery journal could not take
                // records (a storage error there).
                let journal = !fenced && !reason.contains("size mismatch");
                set(Some(format!("disk {disk} refused: {reason}")));
                if journal {
                    if let Some(d) = route(disk) {
                        d.splitter.on_journal_refused();
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
