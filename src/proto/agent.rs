//! What an agent reports about itself: its endpoints, its protected disks (replication
//! mode, queue, dirty regions, what the last run left) and the disks it receives (lag).
//! Served by the agent's local admin endpoint today; the manager's control channel
//! carries the same types.

use serde::{Deserialize, Serialize};

use crate::model::status::SyncKind;

/// The addresses an agent actually bound (ports chosen by the OS when asked for port 0).
/// Written to `<data-dir>/run/endpoints.json` once the agent is up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEndpoints {
    pub host_name: String,
    pub site: String,
    pub pid: u32,
    /// NBD exports of the protected disks.
    pub nbd: String,
    /// Replication stream listener (recovery side), if this agent receives.
    pub data: Option<String>,
    /// Local admin HTTP endpoint, if enabled.
    pub admin: Option<String>,
    /// The NBD listener's unix socket (where the local hypervisor attaches disks).
    #[serde(default)]
    pub nbd_socket: Option<String>,
}

/// How a protected disk's writes currently reach its recovery host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReplicationMode {
    /// Every write is queued for the stream.
    Streaming,
    /// Records are dropped and only the dirty bitmap keeps what changed: a Bitmap Sync
    /// is needed to bring the replica level ("Ahead/Behind").
    BitmapOnly,
    /// The disk has no recovery host: writes go to the local disk and the bitmap only.
    Unprotected,
}

impl ReplicationMode {
    pub const ALL: [ReplicationMode; 3] = [
        ReplicationMode::Streaming,
        ReplicationMode::BitmapOnly,
        ReplicationMode::Unprotected,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReplicationMode::Streaming => "streaming",
            ReplicationMode::BitmapOnly => "bitmap_only",
            ReplicationMode::Unprotected => "unprotected",
        }
    }
}

/// What the dirty tracking found when the disk was opened at agent start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StartState {
    /// Never tracked here before.
    New,
    /// The previous run shut down cleanly: the bitmap is exact.
    Clean,
    /// The previous run crashed: the bitmap plus the activity-log extents cover every
    /// region that may differ from the replica (a Delta Sync over those regions).
    Unclean,
    /// Tracking files missing or damaged: everything is dirty.
    Lost,
}

/// One protected disk of this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProtectedDiskStatus {
    pub name: String,
    pub disk_id: u64,
    pub size_bytes: u64,
    /// NBD export name (the disk's name).
    pub export: String,
    /// Consistency group (checkpoint rounds hold every disk of a group together).
    pub group: String,
    pub recovery_host: Option<String>,
    pub mode: ReplicationMode,
    /// "User paused protection": writes are tracked in the dirty bitmap only.
    #[serde(default)]
    pub paused: bool,
    pub start_state: StartState,
    /// Activity-log extents found after an unclean start (0 otherwise).
    pub start_al_extents: u64,
    /// Regions the dirty bitmap marks now.
    pub dirty_regions: u64,
    pub region_size: u64,
    /// Records (and their bytes) queued, not yet acknowledged durable.
    pub queued_records: u64,
    pub queued_bytes: u64,
    pub spilled_bytes: u64,
    /// Age of the oldest unacknowledged record, ms (0 when none).
    pub oldest_unacked_ms: u64,
    /// Last sequence number assigned, and the highest the recovery journal holds durably.
    pub last_seq: u64,
    pub acked_seq: u64,
    /// Stream epoch: bumped at every agent start so sequence numbers keep increasing.
    pub epoch: u64,
    /// Dirty regions wait for a sync (dirty at start, or written while bitmap-only):
    /// acknowledgements do not clear them.
    pub owes_sync: bool,
    /// The recovery host lost records it had acknowledged: a Full Sync is needed.
    pub replica_behind: bool,
    pub sync: DiskSyncStatus,
    /// What the guest writes to the disk (throughput and IOPS).
    #[serde(default)]
    pub writes: WriteActivity,
}

/// Writes a guest made to one disk: totals since the agent started, and the writes of
/// the last `window_ms` (whole seconds, the current one not included). Counts every
/// write command; bytes are data written (zeroing and trimming carry none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteActivity {
    pub writes_total: u64,
    pub bytes_total: u64,
    pub window_ms: u64,
    pub window_writes: u64,
    pub window_bytes: u64,
}

impl WriteActivity {
    /// Data bytes written per second over the window (0 without a window).
    pub fn bytes_per_sec(&self) -> f64 {
        per_sec(self.window_bytes, self.window_ms)
    }

    /// Write commands per second over the window (IOPS).
    pub fn writes_per_sec(&self) -> f64 {
        per_sec(self.window_writes, self.window_ms)
    }
}

fn per_sec(n: u64, window_ms: u64) -> f64 {
    if window_ms == 0 {
        0.0
    } else {
        n as f64 * 1000.0 / window_ms as f64
    }
}

/// Where a protected disk stands with respect to syncs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SyncPhase {
    /// Nothing owed: the stream alone keeps the replica level.
    #[default]
    Idle,
    /// A sync is owed; the recovery host is not reachable (or has not accepted the disk).
    WaitingForPeer,
    /// "Resynchronization required": the resync policy holds the sync until an operator
    /// resumes it or the off-peak window opens (`detail` says which).
    Required,
    /// Waiting for a free sync slot (other VPGs' syncs run first by priority).
    Queued,
    Running,
    /// The last attempt failed (`detail`); it is retried, except a size mismatch, which
    /// waits for the operator.
    Failed,
}

impl SyncPhase {
    pub const ALL: [SyncPhase; 6] = [
        SyncPhase::Idle,
        SyncPhase::WaitingForPeer,
        SyncPhase::Required,
        SyncPhase::Queued,
        SyncPhase::Running,
        SyncPhase::Failed,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncPhase::Idle => "idle",
            SyncPhase::WaitingForPeer => "waiting_for_peer",
            SyncPhase::Required => "required",
            SyncPhase::Queued => "queued",
            SyncPhase::Running => "running",
            SyncPhase::Failed => "failed",
        }
    }
}

/// A sync in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncProgress {
    pub kind: SyncKind,
    /// Why it runs (`model::sync::SyncReason::describe`).
    pub reason: String,
    pub started_ms: i64,
    /// Bytes of the disk this pass covers, and how far it got (resumed passes start
    /// part-way).
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub percent: u8,
    pub bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    pub blocks_compared: u64,
    pub blocks_sent: u64,
    /// Content bytes queued as sync records.
    pub data_bytes: u64,
    /// Session bytes both ways (digests, control) plus sync record bytes.
    pub wire_bytes: u64,
}

/// How the last sync of a disk ended (the start and end events carry the same).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOutcome {
    pub kind: SyncKind,
    pub reason: String,
    /// `completed`, `interrupted` (resumes from where it stopped) or `failed`.
    pub result: String,
    pub error: Option<String>,
    pub blocks_compared: u64,
    pub blocks_sent: u64,
    pub data_bytes: u64,
    pub wire_bytes: u64,
    pub duration_ms: u64,
    pub ended_ms: i64,
}

/// Sync state of one protected disk.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSyncStatus {
    pub phase: SyncPhase,
    pub detail: Option<String>,
    pub running: Option<SyncProgress>,
    pub last: Option<SyncOutcome>,
    pub completed: u64,
}

/// Body of `POST /v1/disks/{name}/sync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub struct SyncRequest {
    pub action: SyncAction,
}

/// What an operator asks of a disk's sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncAction {
    /// Start a sync the resync policy holds ("Resynchronization required").
    Resume,
    /// Force Sync: a Delta Sync of the whole disk.
    Force,
    /// A Full Sync.
    Full,
}

/// One disk this host receives (recovery side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedDiskStatus {
    /// The protected host it comes from.
    pub host: String,
    pub disk_id: u64,
    pub received_seq: u64,
    pub durable_seq: u64,
    pub pending_records: u64,
    pub pending_bytes: u64,
    /// Now minus the write time of the newest durable record, ms.
    pub durable_age_ms: u64,
    /// As the sender last reported: records and bytes it holds unacknowledged, and the
    /// age of the oldest.
    pub sender_queued_records: u64,
    pub sender_queued_bytes: u64,
    pub sender_oldest_unacked_ms: u64,
    /// `empty` (never synced), `pre_seeded` or `existing`.
    pub replica: Option<String>,
    /// A sync that began and has not ended: checkpoints since its start are not
    /// recoverable.
    pub sync_running: Option<SyncKind>,
}

/// A checkpoint of a received disk (`GET /v1/received/{host}/{disk_id}/checkpoints`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReceivedCheckpoint {
    pub id: u64,
    pub seq: u64,
    pub wall_ms: i64,
    pub tag: Option<String>,
    /// Durable and not made unrecoverable by a sync (DESIGN §5).
    pub recoverable: bool,
}

/// A peer recovery host this agent streams to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub host_name: String,
    pub address: String,
    pub connected: bool,
    /// Last error or refusal reported by the stream, if any since it last connected.
    pub last_error: Option<String>,
}

/// Everything `GET /v1/status` returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    pub endpoints: AgentEndpoints,
    pub protected: Vec<ProtectedDiskStatus>,
    pub peers: Vec<PeerStatus>,
    pub received: Vec<ReceivedDiskStatus>,
    /// Checkpoint rounds run by this agent, and the longest write-completion hold, µs.
    pub checkpoints: u64,
    pub max_hold_us: u64,
}

/// Body of `POST /v1/checkpoints`: insert a checkpoint marker into every disk of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRequest {
    /// Consistency group; `None`: every protected disk of the host.
    #[serde(default)]
    pub group: Option<String>,
    /// Checkpoint id; `None`: the agent picks one above every earlier id.
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default)]
    pub tag: Option<String>,
}

/// Where a checkpoint marker went on one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDisk {
    pub name: String,
    pub disk_id: u64,
    /// The marker's sequence number in the disk's stream.
    pub seq: u64,
    /// `false` when the disk is bitmap-only or unprotected: the marker was not queued and
    /// the checkpoint is not recoverable for this disk.
    pub queued: bool,
}

/// Result of one checkpoint round on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointReport {
    pub id: u64,
    pub timestamp_ms: i64,
    /// How long write completions were held, µs.
    pub hold_us: u64,
    pub disks: Vec<CheckpointDisk>,
}

/// State of the agent's control channel to the manager (`GET /v1/control` on the admin
/// endpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlStatus {
    /// `false` when no manager URL is configured (the agent runs from its file alone).
    pub configured: bool,
    pub manager_url: Option<String>,
    /// `connecting`, `connected`, `waiting` (back-off after a failure), `rejected` (long
    /// back-off after the manager refused the credential), `stopped`.
    pub state: String,
    pub connected: bool,
    /// The id the manager knows this host by (from its last Welcome).
    pub host_id: Option<String>,
    /// A host key is stored: the agent is enrolled.
    pub enrolled: bool,
    /// The last reason a connection failed or ended.
    pub last_error: Option<String>,
    /// Version of the desired state the agent runs.
    pub desired_version: Option<u64>,
    /// Connections that reached Welcome since the agent started.
    pub connects: u64,
    pub heartbeat_ms: Option<u64>,
}

/// `POST /v1/vms/{name}/power` on the admin endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PowerRequest {
    pub state: crate::proto::control::PowerState,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_are_the_serde_names() {
        for m in ReplicationMode::ALL {
            assert_eq!(serde_json::to_value(m).ok(), Some(m.as_str().into()));
        }
        for p in SyncPhase::ALL {
            assert_eq!(serde_json::to_value(p).ok(), Some(p.as_str().into()));
        }
        let mut names: Vec<&str> = SyncPhase::ALL.iter().map(|p| p.as_str()).collect();
        names.dedup();
        assert_eq!(names.len(), SyncPhase::ALL.len());
    }
}
