//! The agent end of the control channel (`proto::control`): [`ControlClient`] dials the
//! manager's WebSocket, proves the host's identity (enrolment token once, then the host
//! key it stores in `<data-dir>/state/host.key`), and then serves the manager: desired
//! state → [`Agent::apply`], checkpoint rounds (hold → held, release → released),
//! one-off commands (idempotent by id), heartbeats, events, inventory. It reconnects with
//! exponential back-off for as long as the agent runs, and the agent keeps protecting
//! with the last desired state it was given while the manager is away.
//!
//! Shape of the socket: one reader loop (decodes, dispatches, never awaits anything slow:
//! applies, commands and quiesces run in their own tasks) and one writer task fed by two
//! queues, the urgent one (held, released, applied, command results) always drained
//! before the ordinary one (heartbeats, events), so a round's answer never waits behind a
//! report. Heartbeats are built off the reactor by their own task. No lock is held across
//! an await.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::agent::crashsafe;
use crate::agent::host::{Agent, AgentSection};
use crate::agent::hypervisor::{HostVms, VmSpec};
use crate::proto::agent::ControlStatus;
use crate::proto::control::{
    AgentEvent, AgentHello, AgentMessage, CheckpointKind, Command, CommandBody, CommandResult,
    Credential, DesiredState, Heartbeat, ManagerMessage, PowerState, QuiesceMethod, RoundHeld,
    RoundHold, CONTROL_PATH, CONTROL_PROTOCOL,
};

/// Command results remembered for answering a resent command.
const REMEMBERED_COMMANDS: usize = 256;
/// Events kept while no connection is up (oldest dropped first).
const PENDING_EVENTS: usize = 1024;
/// Heartbeats and events waiting for the writer; when full, a heartbeat is skipped
/// (the next one carries the same news) rather than queued behind a slow manager.
const ORDINARY_QUEUE: usize = 256;
/// Heartbeats missed before the manager is taken for dead.
const SILENT_HEARTBEATS: u32 = 4;
/// Bound of the TCP connect and of the WebSocket handshake to the manager.
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Data sent to the manager and unacknowledged this long ends the connection (the
/// floor under the heartbeat check: a writer blocked on a silent peer returns).
const SOCKET_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why the control channel could not be set up or a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("manager URL `{url}`: {reason}")]
    Url { url: String, reason: String },
    #[error("not enrolled: pass --enrolment-token (or set [agent] enrolment_token) for the first contact with the manager")]
    NotEnrolled,
    #[error("host key {}: {reason}", path.display())]
    HostKey { path: PathBuf, reason: String },
    #[error("connecting to {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("rejected by the manager ({code}): {reason}")]
    Rejected { code: String, reason: String },
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("no message or pong from the manager for {0:?}")]
    Silent(Duration),
    #[error("the manager closed the connection")]
    Closed,
    #[error("websocket: {0}")]
    Socket(String),
}

/// How to reach the manager, and the pacing of reconnects.
#[derive(Debug, Clone)]
pub struct ControlSettings {
    /// `ws://host:port` (no path): the channel is at `{manager_url}{CONTROL_PATH}`.
    pub manager_url: String,
    pub enrolment_token: Option<String>,
    /// `<data-dir>/state/host.key`.
    pub key_path: PathBuf,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Wait after the manager rejected us: retrying fast cannot fix a credential.
    pub rejected_backoff: Duration,
    /// Bound on TCP connect + WebSocket handshake + Welcome.
    pub connect_timeout: Duration,
    /// A connection that lasted this long resets the back-off.
    pub stable_after: Duration,
}

impl ControlSettings {
    pub fn new(
        manager_url: &str,
        enrolment_token: Option<String>,
        data_dir: &Path,
    ) -> Result<ControlSettings, ControlError> {
        let url = manager_url.trim().trim_end_matches('/');
        let bad = |reason: &str| ControlError::Url {
            url: manager_url.to_string(),
            reason: reason.to_string(),
        };
        if url.starts_with("wss://") || url.starts_with("https://") {
            return Err(bad("TLS to the manager is not supported yet: use ws://"));
        }
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| bad("must start with ws://"))?;
        if rest.is_empty() || rest.contains('/') {
            return Err(bad(
                "give only ws://host:port (the path is the agent's business)",
            ));
        }
        let full = format!("{url}{CONTROL_PATH}");
        full.as_str()
            .into_client_request()
            .map_err(|e| bad(&e.to_string()))?;
        Ok(ControlSettings {
            manager_url: url.to_string(),
            enrolment_token: enrolment_token.filter(|t| !t.trim().is_empty()),
            key_path: data_dir.join("state").join("host.key"),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
            rejected_backoff: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            stable_after: Duration::from_secs(10),
        })
    }

    /// Flags (already merged with `BULWARK_MANAGER_URL` / `BULWARK_ENROLMENT_TOKEN`) over
    /// the `[agent]` section; `None` when no manager is configured.
    pub fn resolve(
        file: &AgentSection,
        manager_url: Option<String>,
        enrolment_token: Option<String>,
        data_dir: &Path,
    ) -> Result<Option<ControlSettings>, ControlError> {
        let Some(url) = manager_url.or_else(|| file.manager_url.clone()) else {
            return Ok(None);
        };
        let token = enrolment_token.or_else(|| file.enrolment_token.clone());
        ControlSettings::new(&url, token, data_dir).map(Some)
    }

    /// The WebSocket URL dialled.
    pub fn url(&self) -> String {
        format!("{}{CONTROL_PATH}", self.manager_url)
    }

    /// The credential of the next Hello: the stored host key, else the enrolment token.
    pub fn credential(&self) -> Result<Credential, ControlError> {
        match read_host_key(&self.key_path)? {
            Some(key) => Ok(Credential::HostKey { key }),
            None => match &self.enrolment_token {
                Some(token) => Ok(Credential::Enrolment {
                    token: token.clone(),
                }),
                None => Err(ControlError::NotEnrolled),
            },
        }
    }
}

/// The stored host key, if any.
pub fn read_host_key(path: &Path) -> Result<Option<String>, ControlError> {
    let err = |reason: String| ControlError::HostKey {
        path: path.to_path_buf(),
        reason,
    };
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let key = s.trim();
            if key.is_empty() {
                return Err(err(
                    "the file is empty: delete it and enrol again with --enrolment-token".into(),
                ));
            }
            if let Ok(m) = std::fs::metadata(path) {
                if m.permissions().mode() & 0o077 != 0 {
                    tracing::warn!(path = %path.display(), "host key is readable by other users: chmod 600 it");
                }
            }
            Ok(Some(key.to_string()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Stores the host key crash-safely, readable by this user only (temp file created 0600,
/// fsynced, renamed over, directory fsynced).
pub fn store_host_key(path: &Path, key: &str) -> Result<(), ControlError> {
    let err = |e: &dyn std::fmt::Display| ControlError::HostKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| err(&e))?;
    }
    let tmp = crashsafe::temp_path(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| err(&e))?;
    // `mode` applies only to a file it creates: a leftover temp file keeps its own.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| err(&e))?;
    f.write_all(format!("{key}\n").as_bytes())
        .map_err(|e| err(&e))?;
    f.sync_all().map_err(|e| err(&e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| err(&e))?;
    crashsafe::sync_parent_dir(path).map_err(|e| err(&e))
}

/// Exponential back-off with "equal jitter": the n-th wait is uniformly in
/// [d/2, d] with d = min(min·2ⁿ, max), so agents that lost the manager together do not
/// come back in step.
#[derive(Debug, Clone)]
struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    fn next_wait(&mut self) -> Duration {
        let d = self.next;
        self.next = (d * 2).min(self.max);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

/// The two queues of the current connection's writer.
#[derive(Clone)]
struct Outbox {
    session: u64,
    urgent: mpsc::UnboundedSender<Message>,
    ordinary: mpsc::Sender<Message>,
}

/// Results of recent commands, by id. `None`: still running (a resend is not run again;
/// the running one answers).
#[derive(Default)]
struct CommandMemory {
    results: HashMap<String, Option<CommandResult>>,
    order: VecDeque<String>,
}

impl CommandMemory {
    fn finish(&mut self, r: &CommandResult) {
        if self.results.insert(r.id.clone(), Some(r.clone())).is_none() {
            self.order.push_back(r.id.clone());
        }
        while self.order.len() > REMEMBERED_COMMANDS {
            if let Some(old) = self.order.pop_front() {
                self.results.remove(&old);
            }
        }
    }
}

/// How a connection ended (besides the error).
struct SessionEnd {
    welcomed_at: Option<Instant>,
    result: Result<(), ControlError>,
}

/// The agent's control channel. See the module documentation.
pub struct ControlClient {
    settings: ControlSettings,
    agent: Arc<Agent>,
    vms: Arc<HostVms>,
    status: Mutex<ControlStatus>,
    outbox: Mutex<Option<Outbox>>,
    commands: Mutex<CommandMemory>,
    /// Commands actually run (not answered from memory).
    commands_run: std::sync::atomic::AtomicU64,
    desired: watch::Sender<Option<DesiredState>>,
    /// Rounds whose quiesce is in progress; a Release/Abort meanwhile removes the entry.
    quiescing: Mutex<HashSet<u64>>,
    pending_events: Mutex<VecDeque<Message>>,
}

impl std::fmt::Debug for ControlClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlClient")
            .field("manager_url", &self.settings.manager_url)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn text(msg: &AgentMessage) -> Option<Message> {
    match serde_json::to_string(msg) {
        Ok(s) => Some(Message::text(s)),
        Err(e) => {
            tracing::error!(kind = msg.kind(), error = %e, "cannot encode a control message");
            None
        }
    }
}

impl ControlClient {
    /// Checks that the host can prove who it is (a stored key or an enrolment token), so
    /// a missing credential fails `bulwark agent` at start instead of retrying forever.
    pub fn new(
        settings: ControlSettings,
        agent: Arc<Agent>,
        vms: Arc<HostVms>,
    ) -> Result<Arc<ControlClient>, ControlError> {
        let enrolled = read_host_key(&settings.key_path)?.is_some();
        settings.credential()?;
        let status = ControlStatus {
            configured: true,
            manager_url: Some(settings.manager_url.clone()),
            state: "connecting".into(),
            enrolled,
            ..ControlStatus::default()
        };
        Ok(Arc::new(ControlClient {
            settings,
            agent,
            vms,
            status: Mutex::new(status),
            outbox: Mutex::new(None),
            commands: Mutex::new(CommandMemory::default()),
            commands_run: std::sync::atomic::AtomicU64::new(0),
            desired: watch::channel(None).0,
            quiescing: Mutex::new(HashSet::new()),
            pending_events: Mutex::new(VecDeque::new()),
        }))
    }

    /// For the admin endpoint.
    pub fn status(&self) -> ControlStatus {
        let mut s = lock(&self.status).clone();
        s.desired_version = self.agent.desired_version();
        s
    }

    /// Commands run since start (a resent one answered from memory does not count).
    pub fn commands_run(&self) -> u64 {
        self.commands_run.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn set_state(&self, state: &str, f: impl FnOnce(&mut ControlStatus)) {
        let mut s = lock(&self.status);
        s.state = state.to_string();
        f(&mut s);
    }

    /// Runs until `cancel`: applies the persisted desired state, then connects, serves,
    /// and reconnects with back-off.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let tasks = tokio_util::task::TaskTracker::new();
        let rx = self.desired.subscribe();
        tasks.spawn(Arc::clone(&self).apply_desired(rx, cancel.clone()));
        tasks.spawn(Arc::clone(&self).forward_events(cancel.clone()));
        // The host keeps protecting while the manager is away: what it was last told is
        // applied before the first dial.
        if let Some(d) = self.agent.persisted_desired() {
            tracing::info!(
                version = d.version,
                "applying the persisted desired state before the manager is reachable"
            );
            self.desired.send_replace(Some(d));
        }
        let mut backoff = Backoff::new(self.settings.backoff_min, self.settings.backoff_max);
        let url = self.settings.url();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            self.set_state("connecting", |_| {});
            tracing::debug!(%url, "control channel: connecting");
            let end = self.session(&cancel).await;
            let was_connected = end.welcomed_at.is_some();
            let error = match end.result {
                Ok(()) => break,
                Err(e) => e,
            };
            if end
                .welcomed_at
                .is_some_and(|t| t.elapsed() >= self.settings.stable_after)
            {
                backoff.reset();
            }
            let (state, wait) = match &error {
                ControlError::Rejected { .. } => ("rejected", self.settings.rejected_backoff),
                _ => ("waiting", backoff.next_wait()),
            };
            let msg = error.to_string();
            self.set_state(state, |s| {
                s.connected = false;
                s.last_error = Some(msg.clone());
                s.enrolled = read_host_key(&self.settings.key_path).is_ok_and(|k| k.is_some());
            });
            match &error {
                ControlError::Rejected { code, reason } => tracing::error!(
                    %url, %code, %reason, retry_in_s = wait.as_secs(),
                    "control channel: the manager rejected this host"
                ),
                _ if was_connected => tracing::warn!(
                    %url, error = %msg, retry_in_ms = wait.as_millis() as u64,
                    "control channel: disconnected"
                ),
                _ => tracing::info!(
                    %url, error = %msg, retry_in_ms = wait.as_millis() as u64,
                    "control channel: cannot connect"
                ),
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        self.set_state("stopped", |s| s.connected = false);
        tasks.close();
        tasks.wait().await;
        tracing::info!("control channel: stopped");
    }

    async fn dial(&self) -> Result<tokio_tungstenite::WebSocketStream<TcpStream>, ControlError> {
        let url = self.settings.url();
        let connect_err = |reason: String| ControlError::Connect {
            url: url.clone(),
            reason,
        };
        let request = url
            .as_str()
            .into_client_request()
            .map_err(|e| connect_err(e.to_string()))?;
        let host = request
            .uri()
            .host()
            .ok_or_else(|| connect_err("no host in the URL".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = request.uri().port_u16().unwrap_or(80);
        // A partitioned manager drops the SYN: without a bound the kernel would retry
        // for about two minutes before the back-off could try again.
        let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| connect_err(format!("no answer within {DIAL_TIMEOUT:?}")))?
            .map_err(|e| connect_err(e.to_string()))?;
        // Held/Released are small and must not wait for Nagle behind a heartbeat.
        tcp.set_nodelay(true)
            .map_err(|e| connect_err(e.to_string()))?;
        crate::net::tune_long_lived(&tcp, SOCKET_USER_TIMEOUT);
        let (ws, _) =
            tokio::time::timeout(DIAL_TIMEOUT, tokio_tungstenite::client_async(request, tcp))
                .await
                .map_err(|_| {
                    connect_err(format!("no WebSocket handshake within {DIAL_TIMEOUT:?}"))
                })?
                .map_err(|e| connect_err(e.to_string()))?;
        Ok(ws)
    }

    fn hello(&self, credential: Credential) -> AgentHello {
        let cfg = self.agent.config();
        let e = self.agent.endpoints();
        AgentHello {
            protocol: CONTROL_PROTOCOL,
            host_name: cfg.host_name.clone(),
            site: cfg.site.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            credential,
            nbd_address: e.nbd,
            // Only a host that listens for streams keeps replicas.
            storage_path: e.data.as_ref().map(|_| cfg.storage.display().to_string()),
            data_address: e.data,
            inventory: self.vms.inventory(),
            desired_version: self.agent.desired_version(),
        }
    }

    /// Connect, Hello, Welcome (the host key stored first), then serve until the socket
    /// fails, the manager goes silent, or `cancel` (then `Ok`).
    async fn session(self: &Arc<Self>, cancel: &CancellationToken) -> SessionEnd {
        let mut welcomed_at = None;
        let result = self.session_inner(cancel, &mut welcomed_at).await;
        SessionEnd {
            welcomed_at,
            result,
        }
    }

    /// Dial, Hello, and wait for Welcome (or Rejected).
    async fn handshake(
        &self,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<TcpStream>,
            String,
            Option<String>,
            u64,
        ),
        ControlError,
    > {
        let credential = self.settings.credential()?;
        let mut ws = self.dial().await?;
        let hello = AgentMessage::Hello(self.hello(credential));
        let hello = text(&hello).ok_or_else(|| ControlError::Protocol("hello".into()))?;
        ws.send(hello)
            .await
            .map_err(|e| ControlError::Socket(e.to_string()))?;
        loop {
            match ws.next().await {
                None => return Err(ControlError::Closed),
                Some(Err(e)) => return Err(ControlError::Socket(e.to_string())),
                Some(Ok(Message::Text(t))) => {
                    return match serde_json::from_str::<ManagerMessage>(t.as_str()) {
                        Ok(ManagerMessage::Welcome {
                            host_id,
                            host_key,
                            heartbeat_ms,
                        }) => Ok((ws, host_id, host_key, heartbeat_ms)),
                        Ok(ManagerMessage::Rejected { code, reason }) => {
                            Err(ControlError::Rejected { code, reason })
                        }
                        Ok(other) => Err(ControlError::Protocol(format!(
                            "expected welcome, got {other:?}"
                        ))),
                        Err(e) => Err(ControlError::Protocol(e.to_string())),
                    }
                }
                Some(Ok(Message::Close(_))) => return Err(ControlError::Closed),
                Some(Ok(_)) => {}
            }
        }
    }

    async fn session_inner(
        self: &Arc<Self>,
        cancel: &CancellationToken,
        welcomed_at: &mut Option<Instant>,
    ) -> Result<(), ControlError> {
        let timeout = self.settings.connect_timeout;
        let url = self.settings.url();
        let (ws, host_id, host_key, heartbeat_ms) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = tokio::time::timeout(timeout, self.handshake()) => r.map_err(|_| ControlError::Connect {
                url: url.clone(),
                reason: format!("no Welcome within {timeout:?}"),
            })??,
        };
        // The manager issued the key once: it is on disk before anything else happens,
        // or the host could never prove itself again.
        if let Some(key) = host_key {
            let path = self.settings.key_path.clone();
            tokio::task::spawn_blocking(move || store_host_key(&path, &key))
                .await
                .map_err(|e| ControlError::HostKey {
                    path: self.settings.key_path.clone(),
                    reason: e.to_string(),
                })?
                .inspect_err(|e| {
                    tracing::error!(error = %e, "cannot store the host key the manager issued; the next connection enrols again with the token (the key was never used)");
                })?;
            tracing::info!(path = %self.settings.key_path.display(), "enrolled: host key stored");
        }
        let heartbeat = Duration::from_millis(heartbeat_ms.max(10));
        *welcomed_at = Some(Instant::now());
        let session = {
            let mut s = lock(&self.status);
            s.state = "connected".into();
            s.connected = true;
            s.host_id = Some(host_id.clone());
            s.heartbeat_ms = Some(heartbeat_ms);
            s.enrolled = true;
            s.connects += 1;
            s.connects
        };
        tracing::info!(%url, %host_id, heartbeat_ms, "control channel: connected");

        let (sink, stream) = ws.split();
        let (urgent_tx, urgent_rx) = mpsc::unbounded_channel();
        let (ordinary_tx, ordinary_rx) = mpsc::channel(ORDINARY_QUEUE);
        // Events that happened while no connection was up go first.
        {
            let mut pending = lock(&self.pending_events);
            while let Some(m) = pending.pop_front() {
                if ordinary_tx.try_send(m).is_err() {
                    break;
                }
            }
            pending.clear();
        }
        *lock(&self.outbox) = Some(Outbox {
            session,
            urgent: urgent_tx.clone(),
            ordinary: ordinary_tx.clone(),
        });
        let mut writer = tokio::spawn(write_loop(sink, urgent_rx, ordinary_rx, heartbeat));
        let beats = tokio::spawn(heartbeat_loop(
            Arc::clone(&self.agent),
            Arc::clone(self.vms.recoveries()),
            ordinary_tx,
            heartbeat,
        ));
        // Whatever way this ends (error, cancel, the future dropped), the session's
        // tasks stop and its outbox goes: late results of its tasks are dropped, the
        // manager asks again on the next connection.
        let guard = SessionGuard {
            client: Arc::clone(self),
            session,
            tasks: vec![writer.abort_handle(), beats.abort_handle()],
        };
        let result = tokio::select! {
            r = self.read_loop(stream, heartbeat * SILENT_HEARTBEATS, cancel) => r,
            r = &mut writer => match r {
                Ok(Ok(())) => Err(ControlError::Closed),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(ControlError::Socket(format!("writer: {e}"))),
            },
        };
        if result.is_ok() && !writer.is_finished() {
            // Cancelled: a close frame after whatever is queued, briefly.
            beats.abort();
            guard.clear_outbox();
            let _ = urgent_tx.send(Message::Close(None));
            drop(urgent_tx);
            let _ = tokio::time::timeout(Duration::from_millis(200), &mut writer).await;
        }
        drop(guard);
        result
    }

    async fn read_loop(
        self: &Arc<Self>,
        mut stream: futures::stream::SplitStream<tokio_tungstenite::WebSocketStream<TcpStream>>,
        silent_limit: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), ControlError> {
        let mut deadline = tokio::time::Instant::now() + silent_limit;
        loop {
            let msg = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                m = stream.next() => m,
                _ = tokio::time::sleep_until(deadline) => return Err(ControlError::Silent(silent_limit)),
            };
            let msg = match msg {
                None => return Err(ControlError::Closed),
                Some(Err(e)) => return Err(ControlError::Socket(e.to_string())),
                Some(Ok(m)) => m,
            };
            // Any frame, a pong included, proves the manager alive.
            deadline = tokio::time::Instant::now() + silent_limit;
            match msg {
                Message::Text(t) => match serde_json::from_str::<ManagerMessage>(t.as_str()) {
                    Ok(m) => self.on_message(m)?,
                    // A newer manager may say things we do not know: skip, stay connected.
                    Err(e) => tracing::warn!(error = %e, "control channel: message not understood"),
                },
                Message::Close(_) => return Err(ControlError::Closed),
                Message::Binary(_) => {
                    tracing::warn!("control channel: unexpected binary message")
                }
                Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => {}
            }
        }
    }

    /// Dispatches one manager message; never awaits.
    fn on_message(self: &Arc<Self>, m: ManagerMessage) -> Result<(), ControlError> {
        match m {
            ManagerMessage::Welcome { .. } => {
                tracing::warn!("control channel: a second welcome, ignored")
            }
            ManagerMessage::Rejected { code, reason } => {
                return Err(ControlError::Rejected { code, reason })
            }
            ManagerMessage::Desired(d) => {
                tracing::debug!(version = d.version, "desired state received");
                self.desired.send_replace(Some(d));
            }
            ManagerMessage::Hold(h) => self.on_hold(h),
            ManagerMessage::Release { round } => {
                lock(&self.quiescing).remove(&round);
                if !self.agent.release_round(round) {
                    tracing::debug!(round, "release of a round no longer held");
                }
            }
            ManagerMessage::Abort { round } => {
                lock(&self.quiescing).remove(&round);
                let held = self.agent.release_round(round);
                tracing::info!(round, held, "round aborted by the manager");
            }
            ManagerMessage::Command(c) => self.on_command(c),
        }
        Ok(())
    }

    fn send_urgent(&self, msg: &AgentMessage) {
        let Some(m) = text(msg) else { return };
        let outbox = lock(&self.outbox).clone();
        match outbox {
            Some(o) => {
                let _ = o.urgent.send(m);
            }
            None => tracing::debug!(
                kind = msg.kind(),
                "control channel down: message dropped (the manager asks again)"
            ),
        }
    }

    fn on_hold(self: &Arc<Self>, hold: RoundHold) {
        if hold.quiesce.is_empty() {
            self.hold_now(hold, None);
            return;
        }
        // Quiescing guests can take a real hypervisor seconds: never on the reader loop.
        lock(&self.quiescing).insert(hold.round);
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let driver = Arc::clone(me.vms.driver());
            let vms = hold.quiesce.clone();
            // The guests get the round's hold bound: one that does not answer in time
            // aborts the round rather than hold its I/O longer.
            let within = std::time::Duration::from_millis(hold.bound_ms);
            let r = tokio::task::spawn_blocking(move || driver.quiesce(&vms, within))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            let still_wanted = lock(&me.quiescing).remove(&hold.round);
            let refuse = |error: String| RoundHeld {
                round: hold.round,
                vpg_id: hold.vpg_id.clone(),
                timestamp_ms: crate::agent::stream::now_ms(),
                disks: vec![],
                error: Some(error),
                quiesce: None,
            };
            match r {
                Err(e) => {
                    tracing::warn!(round = hold.round, error = %e, "quiesce failed: nothing held");
                    me.send_urgent(&AgentMessage::Held(refuse(format!("quiesce failed: {e}"))));
                }
                Ok(_) if !still_wanted => {
                    me.thaw(hold.quiesce.clone());
                    me.send_urgent(&AgentMessage::Held(refuse(
                        "the round was released or aborted while the guests were quiesced".into(),
                    )));
                }
                Ok(method) => {
                    let vms = hold.quiesce.clone();
                    me.hold_now(hold, Some((vms, method)));
                }
            }
        });
    }

    fn thaw(&self, vms: Vec<String>) {
        let driver = Arc::clone(self.vms.driver());
        tokio::task::spawn_blocking(move || driver.thaw(&vms));
    }

    /// Holds, answers Held at once, and answers Released when the hold ends (thawing the
    /// quiesced guests after it).
    /// A round whose guests were only paused is crash consistent: its markers say so.
    fn hold_now(
        self: &Arc<Self>,
        mut hold: RoundHold,
        quiesced: Option<(Vec<String>, QuiesceMethod)>,
    ) {
        let method = quiesced.as_ref().map(|(_, m)| *m);
        if method == Some(QuiesceMethod::Paused) && hold.kind == CheckpointKind::AppConsistent {
            hold.kind = CheckpointKind::Scheduled;
        }
        let quiesced = quiesced.map(|(vms, _)| vms);
        let (mut held, released) = self.agent.hold_round(&hold);
        held.quiesce = method.filter(|_| held.error.is_none());
        self.send_urgent(&AgentMessage::Held(held));
        match released {
            Some(rx) => {
                let me = Arc::clone(self);
                tokio::spawn(async move {
                    match rx.await {
                        Ok(r) => {
                            if !r.on_time {
                                tracing::warn!(
                                    round = r.round,
                                    hold_us = r.hold_us,
                                    "round released by the agent at its bound"
                                );
                            }
                            me.send_urgent(&AgentMessage::Released(r));
                        }
                        Err(_) => tracing::warn!(
                            round = hold.round,
                            "round ended without a release report"
                        ),
                    }
                    if let Some(vms) = quiesced {
                        me.thaw(vms);
                    }
                });
            }
            None => {
                if let Some(vms) = quiesced {
                    self.thaw(vms);
                }
            }
        }
    }

    fn on_command(self: &Arc<Self>, c: Command) {
        {
            let mut mem = lock(&self.commands);
            match mem.results.get(&c.id) {
                Some(Some(r)) => {
                    let r = r.clone();
                    drop(mem);
                    tracing::debug!(id = %c.id, "command already run: answered from memory");
                    self.send_urgent(&AgentMessage::CommandResult(r));
                    return;
                }
                Some(None) => {
                    tracing::debug!(id = %c.id, "command still running: it answers when done");
                    return;
                }
                None => {
                    mem.results.insert(c.id.clone(), None);
                    mem.order.push_back(c.id.clone());
                }
            }
        }
        self.commands_run
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let changes_vms = matches!(
                c.body,
                CommandBody::CreateVm { .. }
                    | CommandBody::PowerOn { .. }
                    | CommandBody::PowerOff { .. }
                    | CommandBody::Recover { .. }
                    | CommandBody::EndRecovery { .. }
                    | CommandBody::PrepareFailover { .. }
                    | CommandBody::ReleaseFailover { .. }
                    | CommandBody::SeedReverse { .. }
            );
            let out = me.run_command(c.body).await;
            let result = match out {
                Ok(output) => CommandResult {
                    id: c.id,
                    ok: true,
                    error: None,
                    output,
                },
                Err(e) => CommandResult {
                    id: c.id,
                    ok: false,
                    error: Some(e),
                    output: serde_json::Value::Null,
                },
            };
            lock(&me.commands).finish(&result);
            // The inventory first, on the same queue, so the manager sees the new state
            // when it reads the result.
            if changes_vms {
                me.send_urgent(&AgentMessage::Inventory(me.vms.inventory()));
            }
            me.send_urgent(&AgentMessage::CommandResult(result));
        });
    }

    async fn run_command(&self, body: CommandBody) -> Result<serde_json::Value, String> {
        match body {
            CommandBody::Sync { disk_id, action } => {
                let name = self
                    .vms
                    .inventory()
                    .vms
                    .into_iter()
                    .flat_map(|v| v.disks)
                    .find(|d| d.disk_id == disk_id)
                    .map(|d| d.name)
                    .or_else(|| {
                        self.agent
                            .status()
                            .protected
                            .into_iter()
                            .find(|d| d.disk_id == disk_id)
                            .map(|d| d.name)
                    })
                    .ok_or_else(|| format!("no disk with id {disk_id} on this host"))?;
                self.agent
                    .request_sync(&name, action)
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "disk": name }))
            }
            CommandBody::CreateVm {
                name,
                cpus,
                memory_mib,
                disks,
                boot,
                nics,
            } => {
                let vm = self
                    .vms
                    .create(VmSpec {
                        name,
                        cpus,
                        memory_mib,
                        disks,
                        boot,
                        nics,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                serde_json::to_value(vm).map_err(|e| e.to_string())
            }
            CommandBody::ReadConsole { vm, max_bytes } => {
                let tail = self
                    .vms
                    .console(&vm, max_bytes)
                    .await
                    .map_err(|e| e.to_string())?;
                serde_json::to_value(tail).map_err(|e| e.to_string())
            }
            CommandBody::PowerOn { vm } => self.power(&vm, PowerState::On).await,
            CommandBody::PowerOff { vm } => self.power(&vm, PowerState::Off).await,
            CommandBody::DropReplica { host, disk_id } => {
                self.agent
                    .drop_replica(&host, disk_id)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "host": host, "disk_id": disk_id }))
            }
            CommandBody::Recover {
                operation,
                vpg_id,
                fencing_generation,
                checkpoint,
                test,
                scratch_budget_bytes,
                vms,
            } => {
                let report = self
                    .vms
                    .recoveries()
                    .recover(crate::agent::recovery::RecoverRequest {
                        operation,
                        vpg_id,
                        fencing_generation,
                        checkpoint,
                        test,
                        scratch_budget_bytes,
                        vms,
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                serde_json::to_value(report).map_err(|e| e.to_string())
            }
            CommandBody::EndRecovery {
                operation,
                vpg_id,
                fencing_generation,
                end,
            } => self
                .vms
                .recoveries()
                .end(&operation, &vpg_id, fencing_generation, end)
                .await
                .map_err(|e| e.to_string()),
            CommandBody::PrepareFailover {
                operation: _,
                vpg_id,
                fencing_generation,
                vms,
            } => {
                let vms = self
                    .vms
                    .recoveries()
                    .prepare_failover(&vpg_id, fencing_generation, &vms)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "vms": vms }))
            }
            CommandBody::ReleaseFailover {
                operation: _,
                vpg_id,
                fencing_generation,
                vms,
                power_on,
            } => {
                let vms = self
                    .vms
                    .recoveries()
                    .release_failover(&vpg_id, fencing_generation, &vms, power_on)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(serde_json::json!({ "vms": vms }))
            }
            CommandBody::SeedReverse {
                operation,
                vpg_id,
                fencing_generation,
                seeds,
            } => {
                // The disks first (each idempotent, crash-safe), then the VMs left with
                // no disk of their own (`agent::host::reverse`).
                let seeded = self
                    .agent
                    .seed_reverse(&operation, &vpg_id, fencing_generation, &seeds)
                    .await
                    .map_err(|e| e.to_string())?;
                let inventory = self.vms.inventory();
                let mut removed = Vec::new();
                let mut kept = Vec::new();
                let vms: std::collections::BTreeSet<&str> =
                    seeds.iter().map(|s| s.vm.as_str()).collect();
                for vm in vms {
                    let Some(v) = inventory.vms.iter().find(|v| v.name == vm) else {
                        continue;
                    };
                    if !v
                        .disks
                        .iter()
                        .all(|d| seeds.iter().any(|s| s.disk_id == d.disk_id))
                    {
                        kept.push(vm.to_string());
                        continue;
                    }
                    let driver = std::sync::Arc::clone(self.vms.driver());
                    let name = vm.to_string();
                    let gone = tokio::task::spawn_blocking(move || driver.remove_seeded_vm(&name))
                        .await
                        .map_err(|e| e.to_string())?
                        .map_err(|e| e.to_string())?;
                    if gone {
                        removed.push(vm.to_string());
                    }
                }
                Ok(serde_json::json!({
                    "operation": operation,
                    "vpg_id": vpg_id,
                    "seeds": seeded,
                    "removed_vms": removed,
                    "kept_vms": kept,
                }))
            }
        }
    }

    async fn power(&self, vm: &str, state: PowerState) -> Result<serde_json::Value, String> {
        let change = self
            .vms
            .set_power(vm, state)
            .await
            .map_err(|e| e.to_string())?;
        Ok(serde_json::json!({
            "vm": vm,
            "power_state": change.vm.power_state,
            "changed": change.changed,
        }))
    }

    /// Applies the newest desired state, one at a time (states that arrive meanwhile
    /// coalesce: reconcile, never replay); a failed apply is retried until a newer one
    /// comes.
    async fn apply_desired(
        self: Arc<Self>,
        mut rx: watch::Receiver<Option<DesiredState>>,
        cancel: CancellationToken,
    ) {
        const RETRY: Duration = Duration::from_secs(10);
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            let retry = async {
                match retry_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                r = rx.changed() => if r.is_err() { break },
                _ = retry => {}
            }
            let Some(desired) = rx.borrow_and_update().clone() else {
                continue;
            };
            let error = match self.agent.apply(&desired).await {
                Ok(()) => {
                    tracing::info!(version = desired.version, "desired state applied");
                    retry_at = None;
                    None
                }
                Err(e) => {
                    tracing::warn!(version = desired.version, error = %e, "desired state not applied; retrying");
                    retry_at = Some(tokio::time::Instant::now() + RETRY);
                    Some(e.to_string())
                }
            };
            self.send_urgent(&AgentMessage::Applied {
                version: desired.version,
                error,
            });
        }
    }

    /// The agent's and the hypervisor's events, as Event messages; kept (bounded) while
    /// no connection is up.
    async fn forward_events(self: Arc<Self>, cancel: CancellationToken) {
        use tokio::sync::broadcast::error::RecvError;
        let mut sources = [
            Some(self.agent.subscribe_events()),
            Some(self.vms.driver().subscribe()),
        ];
        loop {
            let live: Vec<usize> = (0..sources.len())
                .filter(|&i| sources[i].is_some())
                .collect();
            if live.is_empty() {
                return;
            }
            let next = {
                let recvs = sources.iter_mut().enumerate().filter_map(|(i, s)| {
                    s.as_mut()
                        .map(|rx| Box::pin(async move { (i, rx.recv().await) }))
                });
                let any = futures::future::select_all(recvs);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    (r, _, _) = any => r,
                }
            };
            match next {
                (_, Ok(e)) => {
                    // A guest that powered itself off (or whose QEMU ended) changed the
                    // inventory without a command: the manager hears it now.
                    let unrequested_power = e.kind == "vm_power"
                        && e.details.get("cause").and_then(|c| c.as_str()) != Some("request");
                    self.send_event(e);
                    if unrequested_power {
                        self.send_urgent(&AgentMessage::Inventory(self.vms.inventory()));
                    }
                }
                (_, Err(RecvError::Lagged(n))) => {
                    tracing::warn!(lost = n, "control channel: events lost (too many at once)")
                }
                (i, Err(RecvError::Closed)) => sources[i] = None,
            }
        }
    }

    fn send_event(&self, e: AgentEvent) {
        let Some(m) = text(&AgentMessage::Event(e)) else {
            return;
        };
        let outbox = lock(&self.outbox).clone();
        match outbox {
            Some(o) => {
                if o.ordinary.try_send(m).is_err() {
                    tracing::warn!("control channel: event dropped (the manager is slow)");
                }
            }
            None => {
                let mut p = lock(&self.pending_events);
                if p.len() >= PENDING_EVENTS {
                    p.pop_front();
                }
                p.push_back(m);
            }
        }
    }
}

/// Stops a session's tasks and clears its outbox, however the session ends.
struct SessionGuard {
    client: Arc<ControlClient>,
    session: u64,
    tasks: Vec<tokio::task::AbortHandle>,
}

impl SessionGuard {
    fn clear_outbox(&self) {
        let mut o = lock(&self.client.outbox);
        if o.as_ref().is_some_and(|o| o.session == self.session) {
            *o = None;
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.clear_outbox();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The only code that writes to the socket: urgent messages first, then ordinary ones,
/// and a ping every heartbeat (its pong, like any message, keeps the reader's deadline).
async fn write_loop(
    mut sink: futures::stream::SplitSink<tokio_tungstenite::WebSocketStream<TcpStream>, Message>,
    mut urgent: mpsc::UnboundedReceiver<Message>,
    mut ordinary: mpsc::Receiver<Message>,
    heartbeat: Duration,
) -> Result<(), ControlError> {
    let mut ping = tokio::time::interval(heartbeat);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await;
    loop {
        let msg = tokio::select! {
            biased;
            m = urgent.recv() => m,
            m = ordinary.recv() => m,
            _ = ping.tick() => Some(Message::Ping(Default::default())),
        };
        let Some(msg) = msg else { return Ok(()) };
        sink.send(msg)
            .await
            .map_err(|e| ControlError::Socket(e.to_string()))?;
    }
}

/// How often a recovery host looks for checkpoints that became recoverable in its
/// journals between heartbeats: a new one is reported at once (with a full heartbeat),
/// because the VPG's RPO only moves when the manager learns of it.
const JOURNAL_POLL: Duration = Duration::from_millis(100);

/// A heartbeat every `every`, the first at once, and an early one whenever a journal
/// holds newly recoverable checkpoints; the journal cursor is this connection's, so a
/// new connection reports every recoverable checkpoint again.
async fn heartbeat_loop(
    agent: Arc<Agent>,
    recoveries: Arc<crate::agent::recovery::Recoveries>,
    queue: mpsc::Sender<Message>,
    every: Duration,
) {
    let mut cursor: HashMap<(String, u64), u64> = HashMap::new();
    let receives = agent.endpoints().data.is_some();
    let poll = if receives {
        JOURNAL_POLL.min(every)
    } else {
        every
    };
    let mut tick = tokio::time::interval(poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_full: Option<Instant> = None;
    loop {
        tick.tick().await;
        let full_due = last_full.is_none_or(|t| t.elapsed() + poll / 2 >= every);
        let permit = match queue.try_reserve() {
            Ok(p) => p,
            Err(mpsc::error::TrySendError::Full(())) => {
                tracing::debug!("control channel: heartbeat skipped (queue full)");
                continue;
            }
            Err(mpsc::error::TrySendError::Closed(())) => return,
        };
        // Status and journal reports take the agent's and the journals' locks: off the
        // reactor.
        let a = Arc::clone(&agent);
        let rec = Arc::clone(&recoveries);
        let built = tokio::task::spawn_blocking(move || {
            let journals = a.journal_reports(&mut cursor);
            let fresh = journals.iter().any(|j| !j.recoverable.is_empty());
            let hb = (full_due || fresh).then(|| Heartbeat {
                status: a.status(),
                journals,
                desired_version: a.desired_version(),
                recoveries: rec.reports(),
            });
            (hb, cursor)
        })
        .await;
        let (hb, c) = match built {
            Ok(x) => x,
            Err(e) => {
                tracing::error!(error = %e, "building a heartbeat failed");
                return;
            }
        };
        cursor = c;
        let Some(hb) = hb else {
            continue;
        };
        last_full = Some(Instant::now());
        if let Some(m) = text(&AgentMessage::Heartbeat(hb)) {
            permit.send(m);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked() {
        let d = Path::new("/tmp/x");
        let s = ControlSettings::new("ws://127.0.0.1:8470/", None, d).unwrap();
        assert_eq!(s.url(), format!("ws://127.0.0.1:8470{CONTROL_PATH}"));
        assert_eq!(s.key_path, d.join("state/host.key"));
        for bad in ["http://h:1", "wss://h:1", "ws://", "ws://h:1/x", "h:1"] {
            assert!(ControlSettings::new(bad, None, d).is_err(), "{bad}");
        }
        let file = AgentSection {
            manager_url: Some("ws://file:1".into()),
            enrolment_token: Some("t-file".into()),
            ..AgentSection::default()
        };
        let s = ControlSettings::resolve(&file, Some("ws://flag:2".into()), None, d)
            .unwrap()
            .unwrap();
        assert_eq!(s.manager_url, "ws://flag:2");
        assert_eq!(s.enrolment_token.as_deref(), Some("t-file"));
        assert!(
            ControlSettings::resolve(&AgentSection::default(), None, None, d)
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn the_credential_is_the_key_once_stored_else_the_token() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ControlSettings::new("ws://h:1", None, dir.path()).unwrap();
        let e = s.credential().unwrap_err();
        assert!(
            e.to_string()
                .contains("not enrolled: pass --enrolment-token"),
            "{e}"
        );
        s.enrolment_token = Some("tok".into());
        assert_eq!(
            s.credential().unwrap(),
            Credential::Enrolment {
                token: "tok".into()
            }
        );
        store_host_key(&s.key_path, "k-1").unwrap();
        let mode = std::fs::metadata(&s.key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            s.credential().unwrap(),
            Credential::HostKey { key: "k-1".into() }
        );
        // A leftover temp file with a wide mode does not widen the key.
        let tmp = crashsafe::temp_path(&s.key_path);
        std::fs::write(&tmp, "junk").unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        store_host_key(&s.key_path, "k-2").unwrap();
        let mode = std::fs::metadata(&s.key_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(read_host_key(&s.key_path).unwrap().as_deref(), Some("k-2"));
        std::fs::write(&s.key_path, "\n").unwrap();
        assert!(s.credential().is_err());
    }

    #[test]
    fn backoff_grows_with_jitter_to_its_bound_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let mut bound = Duration::from_millis(200);
        for _ in 0..12 {
            let w = b.next_wait();
            assert!(w >= bound / 2 && w <= bound, "{w:?} vs {bound:?}");
            bound = (bound * 2).min(Duration::from_secs(10));
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(200));
    }

    #[test]
    fn command_memory_keeps_the_last_results() {
        let mut m = CommandMemory::default();
        for i in 0..(REMEMBERED_COMMANDS + 10) {
            let id = format!("c{i}");
            m.results.insert(id.clone(), None);
            m.order.push_back(id.clone());
            m.finish(&CommandResult {
                id,
                ok: true,
                error: None,
                output: serde_json::Value::Null,
            });
        }
        assert_eq!(m.results.len(), REMEMBERED_COMMANDS);
        assert!(!m.results.contains_key("c0"));
        assert!(m
            .results
            .contains_key(&format!("c{}", REMEMBERED_COMMANDS + 9)));
    }
}
