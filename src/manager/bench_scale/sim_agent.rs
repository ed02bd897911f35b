//! A simulated agent for `bulwark bench scale`: one WebSocket to the manager's control
//! channel speaking `proto::control` exactly as a real agent does (enrol, inventory,
//! desired state → applied, heartbeats, checkpoint rounds), with no data path behind it.
//!
//! - Protected side: every disk of its desired state is reported as streaming in its
//!   group, replication healthy, no sync running; `Hold` is answered `Held` and
//!   `Release` `Released` at once (on time).
//! - Recovery side: the checkpoints the protected hosts released are put in the shared
//!   [`Journals`] keyed by recovery host; the recovery host's next heartbeat reports
//!   them as recoverable (`JournalReport`), so checkpoints become recoverable as a real
//!   journal would make them (one heartbeat later).
//!
//! Cheap by design (hundreds in one process): the status part of a heartbeat is
//! serialised once per desired-state change and reused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::model::status::SyncKind;
use crate::proto::agent::{
    AgentEndpoints, AgentStatus, CheckpointDisk, DiskSyncStatus, PeerStatus, ProtectedDiskStatus,
    ReplicationMode, StartState, SyncPhase, SyncProgress, WriteActivity,
};
use crate::proto::control::{
    AgentHello, AgentMessage, CommandResult, Credential, DesiredState, Inventory, JournalReport,
    ManagerMessage, RoundHeld, RoundReleased, CONTROL_PATH, CONTROL_PROTOCOL,
};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long a connection waits for `Welcome`.
const WELCOME_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause before reconnecting after a connection ended.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Refusals a real agent also answers by connecting again (a race the manager lost, a
/// database error); every other refusal ends the simulated agent.
const TRANSIENT_REFUSALS: [&str; 2] = ["agent.retry", "agent.internal"];
/// How many transient refusals in a row a simulated agent takes before giving up.
const MAX_TRANSIENT_REFUSALS: u32 = 30;
/// Nominal bytes a simulated journal grows per recoverable checkpoint.
const JOURNAL_BYTES_PER_CHECKPOINT: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{host}: {what}")]
    Failed { host: String, what: String },
}

/// What the simulated journals of every recovery host hold, shared by all simulated
/// agents of the bench (the protected side writes, the recovery side reports).
#[derive(Default)]
pub struct Journals {
    /// Recovery host → (protected host, disk id) → journal.
    hosts: Mutex<HashMap<String, HostJournals>>,
}

/// The journals one recovery host keeps: (protected host, disk id) → journal.
type HostJournals = HashMap<(String, u64), SimJournal>;

#[derive(Default)]
struct SimJournal {
    /// Every checkpoint id held (for the complete report after a reconnect).
    all: Vec<u64>,
    /// Not reported on the current connection yet.
    fresh: Vec<u64>,
}

impl Journals {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HostJournals>> {
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Checkpoint `round` is durable in the journals of these disks of `protected`.
    fn record(&self, recovery: &str, protected: &str, disks: &[u64], round: u64) {
        let mut g = self.lock();
        let host = g.entry(recovery.to_string()).or_default();
        for d in disks {
            let j = host.entry((protected.to_string(), *d)).or_default();
            j.all.push(round);
            j.fresh.push(round);
        }
    }

    /// The journal reports of a heartbeat from `recovery`: everything when `complete`
    /// (first heartbeat of a connection), else what is new since the last one.
    fn reports(&self, recovery: &str, complete: bool) -> Vec<JournalReport> {
        let mut g = self.lock();
        let Some(host) = g.get_mut(recovery) else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(host.len());
        for ((protected, disk_id), j) in host.iter_mut() {
            let fresh = std::mem::take(&mut j.fresh);
            if !complete && fresh.is_empty() {
                continue;
            }
            out.push(JournalReport {
                host: protected.clone(),
                disk_id: *disk_id,
                recoverable: if complete { j.all.clone() } else { fresh },
                oldest_recoverable: j.all.first().copied(),
                newest_recoverable: j.all.last().copied(),
                journal_bytes: (j.all.len() as u64).saturating_mul(JOURNAL_BYTES_PER_CHECKPOINT),
                storage_error: None,
            });
        }
        out
    }
}

/// Counters and switches shared by every simulated agent of a run.
#[derive(Default)]
pub struct Shared {
    pub journals: Journals,
    /// VPGs whose protected disks report a Bitmap Sync running (to make a status change
    /// when the manager has no pause switch).
    syncing: Mutex<HashSet<String>>,
    /// Bumped when `syncing` changes, so agents rebuild their cached status.
    syncing_gen: AtomicU64,
    pub holds: AtomicU64,
    pub releases: AtomicU64,
    pub aborts: AtomicU64,
    pub heartbeats: AtomicU64,
    pub desired: AtomicU64,
    pub connects: AtomicU64,
    pub disconnects: AtomicU64,
    /// Hellos refused for a passing reason (`agent.retry`, `agent.internal`) and retried.
    pub refusals: AtomicU64,
}

impl Shared {
    /// Starts or ends the simulated sync of `vpg`'s disks.
    pub fn set_syncing(&self, vpg: &str, on: bool) {
        let mut g = self.syncing.lock().unwrap_or_else(PoisonError::into_inner);
        if on {
            g.insert(vpg.to_string());
        } else {
            g.remove(vpg);
        }
        self.syncing_gen.fetch_add(1, Ordering::SeqCst);
    }

    fn syncing(&self) -> HashSet<String> {
        self.syncing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// One simulated host.
#[derive(Debug, Clone)]
pub struct SimSpec {
    pub host: String,
    pub site: String,
    pub inventory: Inventory,
    /// `ws://addr` of the manager.
    pub manager: String,
    pub enrolment_token: String,
}

/// The protection a Desired state gives this host, indexed for rounds.
#[derive(Default)]
struct Protection {
    version: Option<u64>,
    /// VPG id → its disks here: (disk id, name, recovery host).
    groups: HashMap<String, Vec<(u64, String, String)>>,
    /// The heartbeat's `status`, serialised.
    status_json: String,
    /// `syncing_gen` the cached status was built for.
    status_gen: u64,
    desired: DesiredState,
}

/// Runs the agent until `cancel`: connects, reconnects with its host key after a
/// connection ends. Errors only when the manager refuses it.
pub async fn run(
    spec: SimSpec,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Result<(), SimError> {
    let url = format!("{}{CONTROL_PATH}", spec.manager);
    let mut credential = Credential::Enrolment {
        token: spec.enrolment_token.clone(),
    };
    let mut desired_version = None;
    let mut refusals = 0u32;
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        let ended = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = connection(&spec, &url, &mut credential, &mut desired_version, &shared, &cancel) => r,
        };
        match ended {
            Ok(()) => refusals = 0,
            Err(Ended::Rejected { code, what })
                if TRANSIENT_REFUSALS.contains(&code.as_str())
                    && refusals < MAX_TRANSIENT_REFUSALS =>
            {
                refusals += 1;
                shared.refusals.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(host = %spec.host, %what, "simulated agent refused for now; connecting again");
            }
            Err(Ended::Rejected { what, .. }) => {
                return Err(SimError::Failed {
                    host: spec.host.clone(),
                    what,
                })
            }
            Err(Ended::Lost(what)) => {
                refusals = 0;
                shared.disconnects.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(host = %spec.host, %what, "simulated agent lost its connection");
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(RECONNECT_AFTER) => {}
        }
    }
}

enum Ended {
    Rejected { code: String, what: String },
    Lost(String),
}

async fn send(ws: &mut Ws, text: String) -> Result<(), Ended> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| Ended::Lost(format!("send: {e}")))
}

fn to_json(m: &AgentMessage) -> Result<String, Ended> {
    serde_json::to_string(m).map_err(|e| Ended::Lost(format!("serialise: {e}")))
}

async fn recv(ws: &mut Ws) -> Result<Option<ManagerMessage>, Ended> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(t.as_str())
                    .map(Some)
                    .map_err(|e| Ended::Lost(format!("bad message from the manager: {e}")))
            }
            Some(Ok(Message::Close(_))) | None => return Ok(None),
            Some(Err(e)) => return Err(Ended::Lost(format!("receive: {e}"))),
            Some(Ok(_)) => continue,
        }
    }
}

/// One connection: hello, welcome, then the message pump and heartbeats.
async fn connection(
    spec: &SimSpec,
    url: &str,
    credential: &mut Credential,
    desired_version: &mut Option<u64>,
    shared: &Shared,
    cancel: &CancellationToken,
) -> Result<(), Ended> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| Ended::Lost(format!("connect {url}: {e}")))?;
    let hello = AgentHello {
        protocol: CONTROL_PROTOCOL,
        host_name: spec.host.clone(),
        site: spec.site.clone(),
        agent_version: format!("bench-sim-{}", env!("CARGO_PKG_VERSION")),
        credential: credential.clone(),
        nbd_address: "127.0.0.1:10809".into(),
        data_address: Some("127.0.0.1:9701".into()),
        storage_path: Some(format!("/srv/bulwark/{}", spec.host)),
        inventory: spec.inventory.clone(),
        desired_version: *desired_version,
    };
    send(&mut ws, to_json(&AgentMessage::Hello(hello))?).await?;
    let heartbeat_ms = match tokio::time::timeout(WELCOME_TIMEOUT, recv(&mut ws)).await {
        Err(_) => return Err(Ended::Lost("no welcome in time".into())),
        Ok(r) => match r? {
            Some(ManagerMessage::Welcome {
                host_key,
                heartbeat_ms,
                ..
            }) => {
                if let Some(key) = host_key {
                    *credential = Credential::HostKey { key };
                }
                heartbeat_ms
            }
            Some(ManagerMessage::Rejected { code, reason }) => {
                return Err(Ended::Rejected {
                    what: format!("rejected: {code}: {reason}"),
                    code,
                })
            }
            other => return Err(Ended::Lost(format!("expected welcome, got {other:?}"))),
        },
    };
    shared.connects.fetch_add(1, Ordering::Relaxed);
    let mut prot = Protection {
        version: *desired_version,
        ..Protection::default()
    };
    rebuild_status(spec, &mut prot, shared);
    // Rounds held: id → (VPG, since).
    let mut held: HashMap<u64, (String, Instant)> = HashMap::new();
    let period = Duration::from_millis(heartbeat_ms.clamp(100, 60_000));
    // Spread the hosts' heartbeats over the period.
    let offset = Duration::from_millis(
        u64::from(crc32c::crc32c(spec.host.as_bytes())) % period.as_millis().max(1) as u64,
    );
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut first = true;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let _ = ws.close(None).await;
                return Ok(());
            }
            _ = tick.tick() => {
                if prot.status_gen != shared.syncing_gen.load(Ordering::SeqCst) {
                    rebuild_status(spec, &mut prot, shared);
                }
                let journals = shared.journals.reports(&spec.host, first);
                first = false;
                let journals = serde_json::to_string(&journals)
                    .map_err(|e| Ended::Lost(format!("serialise: {e}")))?;
                let dv = prot.version.map_or_else(|| "null".to_string(), |v| v.to_string());
                let text = format!(
                    r#"{{"type":"heartbeat","status":{},"journals":{journals},"desired_version":{dv}}}"#,
                    prot.status_json
                );
                send(&mut ws, text).await?;
                shared.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            m = recv(&mut ws) => {
                let Some(m) = m? else {
                    return Err(Ended::Lost("the manager closed the connection".into()));
                };
                handle(spec, &mut ws, m, &mut prot, &mut held, shared).await?;
                *desired_version = prot.version;
            }
        }
    }
}

async fn handle(
    spec: &SimSpec,
    ws: &mut Ws,
    m: ManagerMessage,
    prot: &mut Protection,
    held: &mut HashMap<u64, (String, Instant)>,
    shared: &Shared,
) -> Result<(), Ended> {
    match m {
        ManagerMessage::Desired(d) => {
            shared.desired.fetch_add(1, Ordering::Relaxed);
            let version = d.version;
            let mut groups: HashMap<String, Vec<(u64, String, String)>> = HashMap::new();
            for p in &d.protect {
                groups.entry(p.vpg_id.clone()).or_default().push((
                    p.disk_id,
                    p.disk_name.clone(),
                    p.recovery_host.clone(),
                ));
            }
            prot.groups = groups;
            prot.version = Some(version);
            prot.desired = d;
            rebuild_status(spec, prot, shared);
            let m = AgentMessage::Applied {
                version,
                error: None,
            };
            send(ws, to_json(&m)?).await
        }
        ManagerMessage::Hold(h) => {
            shared.holds.fetch_add(1, Ordering::Relaxed);
            let reply = match prot.groups.get(&h.vpg_id) {
                Some(disks) => {
                    held.insert(h.round, (h.vpg_id.clone(), Instant::now()));
                    RoundHeld {
                        round: h.round,
                        vpg_id: h.vpg_id,
                        timestamp_ms: chrono::Utc::now().timestamp_millis(),
                        disks: disks
                            .iter()
                            .map(|(id, name, _)| CheckpointDisk {
                                name: name.clone(),
                                disk_id: *id,
                                seq: h.round,
                                queued: true,
                            })
                            .collect(),
                        error: None,
                        quiesce: None,
                    }
                }
                None => RoundHeld {
                    round: h.round,
                    vpg_id: h.vpg_id,
                    timestamp_ms: chrono::Utc::now().timestamp_millis(),
                    disks: Vec::new(),
                    error: Some("no disk of the VPG on this host".into()),
                    quiesce: None,
                },
            };
            send(ws, to_json(&AgentMessage::Held(reply))?).await
        }
        ManagerMessage::Release { round } => {
            let Some((vpg_id, since)) = held.remove(&round) else {
                return Ok(());
            };
            shared.releases.fetch_add(1, Ordering::Relaxed);
            let hold_us = u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX);
            if let Some(disks) = prot.groups.get(&vpg_id) {
                // The markers reach the journals: per recovery host, the disks of the
                // group that go there.
                let mut by_recovery: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
                for (id, _, rh) in disks {
                    by_recovery.entry(rh.as_str()).or_default().push(*id);
                }
                for (rh, ids) in by_recovery {
                    shared.journals.record(rh, &spec.host, &ids, round);
                }
            }
            let m = AgentMessage::Released(RoundReleased {
                round,
                vpg_id,
                hold_us,
                on_time: true,
            });
            send(ws, to_json(&m)?).await
        }
        ManagerMessage::Abort { round } => {
            shared.aborts.fetch_add(1, Ordering::Relaxed);
            let Some((vpg_id, since)) = held.remove(&round) else {
                return Ok(());
            };
            let m = AgentMessage::Released(RoundReleased {
                round,
                vpg_id,
                hold_us: u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX),
                on_time: true,
            });
            send(ws, to_json(&m)?).await
        }
        ManagerMessage::Command(c) => {
            let m = AgentMessage::CommandResult(CommandResult {
                id: c.id,
                ok: true,
                error: None,
                output: serde_json::Value::Null,
            });
            send(ws, to_json(&m)?).await
        }
        ManagerMessage::Welcome { .. } | ManagerMessage::Rejected { .. } => Ok(()),
    }
}

/// Serialises the status once per change of the desired state (or of the simulated
/// syncs).
fn rebuild_status(spec: &SimSpec, prot: &mut Protection, shared: &Shared) {
    prot.status_gen = shared.syncing_gen.load(Ordering::SeqCst);
    let syncing = shared.syncing();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let sizes: HashMap<u64, u64> = spec
        .inventory
        .vms
        .iter()
        .flat_map(|vm| vm.disks.iter().map(|d| (d.disk_id, d.size_bytes)))
        .collect();
    let protected = prot
        .desired
        .protect
        .iter()
        .map(|p| {
            let running = syncing.contains(&p.vpg_id).then(|| SyncProgress {
                kind: SyncKind::Bitmap,
                reason: "simulated".into(),
                started_ms: now_ms,
                bytes_total: 1 << 20,
                bytes_done: 0,
                percent: 0,
                bytes_per_sec: 0,
                eta_secs: None,
                blocks_compared: 0,
                blocks_sent: 0,
                data_bytes: 0,
                wire_bytes: 0,
            });
            ProtectedDiskStatus {
                name: p.disk_name.clone(),
                disk_id: p.disk_id,
                size_bytes: sizes.get(&p.disk_id).copied().unwrap_or(0),
                export: p.disk_name.clone(),
                group: p.vpg_id.clone(),
                recovery_host: Some(p.recovery_host.clone()),
                mode: ReplicationMode::Streaming,
                paused: p.paused,
                start_state: StartState::Clean,
                start_al_extents: 0,
                dirty_regions: 0,
                region_size: 1 << 20,
                queued_records: 0,
                queued_bytes: 0,
                spilled_bytes: 0,
                oldest_unacked_ms: 0,
                last_seq: 0,
                acked_seq: 0,
                epoch: 1,
                owes_sync: false,
                replica_behind: false,
                sync: DiskSyncStatus {
                    phase: if running.is_some() {
                        SyncPhase::Running
                    } else {
                        SyncPhase::Idle
                    },
                    running,
                    ..DiskSyncStatus::default()
                },
                writes: WriteActivity::default(),
            }
        })
        .collect();
    let status = AgentStatus {
        endpoints: AgentEndpoints {
            host_name: spec.host.clone(),
            site: spec.site.clone(),
            pid: std::process::id(),
            nbd: "127.0.0.1:10809".into(),
            data: Some("127.0.0.1:9701".into()),
            admin: None,
            nbd_socket: None,
        },
        protected,
        peers: prot
            .desired
            .peers
            .iter()
            .map(|p| PeerStatus {
                host_name: p.host_name.clone(),
                address: p.address.clone(),
                connected: true,
                last_error: None,
            })
            .collect(),
        received: Vec::new(),
        checkpoints: 0,
        max_hold_us: 0,
    };
    // An AgentStatus always serialises; an empty object keeps the heartbeat well formed
    // (the manager then refuses it, which the run would show).
    prot.status_json = serde_json::to_string(&status).unwrap_or_else(|_| "{}".into());
}
