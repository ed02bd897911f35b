//! REST request and response bodies of `/api/v1`. Enumerations travel as snake_case
//! strings; `GET /api/v1/lookups` lists every value with its label and description.

use crate::model::access::Role;
use crate::model::settings::{MemberSettings, VpgSettings, VpgSettingsPatch};
use crate::model::status::{VmReplicationState, VpgStatus, VpgSubStatus};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

/// `absent` → None, `null` → Some(None), value → Some(Some(v)): lets a PATCH clear a field.
fn double_option<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// One page of a list. Pass `next_cursor` back as `cursor` for the next page.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page, 1 to 1000 (default 100).
    pub limit: Option<u32>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

// ---- sites -------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Site {
    pub id: String,
    pub name: String,
    pub description: String,
    pub location: Option<String>,
    /// Bytes per second all replication leaving this site may use together, shared
    /// equally by the (protected host, recovery host) links to other sites; null =
    /// unlimited. Changes apply to running streams at once.
    pub bandwidth_limit: Option<u64>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteCreate {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub location: Option<String>,
    /// Bytes per second, at least 65536; absent or null = unlimited.
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SitePatch {
    pub name: Option<String>,
    pub description: Option<String>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub location: Option<Option<String>>,
    /// Bytes per second, at least 65536; null = unlimited; absent = unchanged.
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<u64>)]
    pub bandwidth_limit: Option<Option<u64>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SiteQuery {
    /// Exact name.
    pub name: Option<String>,
}

// ---- hosts -------------------------------------------------------------------------

/// Whether the manager hears from a host's agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Connectivity {
    /// No agent has registered for this host yet.
    Unknown,
    Connected,
    Disconnected,
}

impl Connectivity {
    pub const ALL: [Connectivity; 3] = [Self::Unknown, Self::Connected, Self::Disconnected];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Host {
    pub id: String,
    pub site_id: String,
    pub name: String,
    /// Management address of the host.
    pub address: Option<String>,
    /// Where the agent accepts replication streams (host:port).
    pub data_address: Option<String>,
    /// Where the agent serves NBD exports (host:port).
    pub nbd_address: Option<String>,
    /// Default storage for journals and replica disks received by this host.
    pub storage_path: Option<String>,
    pub connectivity: Connectivity,
    pub agent_version: Option<String>,
    pub last_seen_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostCreate {
    pub site_id: String,
    pub name: String,
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub data_address: Option<String>,
    #[serde(default)]
    pub nbd_address: Option<String>,
    #[serde(default)]
    pub storage_path: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostPatch {
    pub name: Option<String>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub address: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub data_address: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub nbd_address: Option<Option<String>>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub storage_path: Option<Option<String>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HostQuery {
    /// Only hosts of this site.
    pub site: Option<String>,
    pub connectivity: Option<Connectivity>,
}

// ---- VMs and disks -----------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    On,
    Off,
    /// The host's agent no longer reports the VM; the row is kept because the VM is a
    /// VPG member (never deleted behind the operator's back).
    Missing,
}

impl PowerState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::On => "on",
            Self::Off => "off",
            Self::Missing => "missing",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::On, Self::Off, Self::Missing]
            .into_iter()
            .find(|p| p.as_str() == s)
    }
}

/// A network interface. The hypervisor reports `network` and `mac` (in NIC order); the
/// name and the addresses are the operator's (an agent names a NIC it reports first
/// `net0`, `net1`, … by its position).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub name: String,
    #[serde(default)]
    pub network: Option<String>,
    /// `xx:xx:xx:xx:xx:xx` (hex); absent: the hypervisor picks one.
    #[serde(default)]
    #[schema(example = "52:54:00:12:34:56")]
    pub mac: Option<String>,
    /// Addresses in CIDR form, e.g. `10.1.4.20/24`.
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// How a VM boots (`kind`: `kernel` or `firmware`). A recovered VM boots as its
/// protected VM did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Boot {
    /// Direct kernel boot from files on the host that runs the VM (a recovery host needs
    /// the same paths).
    Kernel {
        /// Absolute path of the kernel image on the host.
        #[schema(example = "/var/lib/bulwark/guest/vmlinuz")]
        kernel: String,
        /// Absolute path of the initial ramdisk, if any.
        #[serde(default)]
        initrd: Option<String>,
        /// The kernel command line.
        #[serde(default)]
        cmdline: String,
    },
    /// The firmware boots the first disk.
    Firmware,
}

impl Boot {
    pub fn kind(&self) -> &'static str {
        match self {
            Boot::Kernel { .. } => "kernel",
            Boot::Firmware => "firmware",
        }
    }
}

impl From<crate::proto::control::Boot> for Boot {
    fn from(b: crate::proto::control::Boot) -> Self {
        use crate::proto::control::Boot as C;
        match b {
            C::Kernel {
                kernel,
                initrd,
                cmdline,
            } => Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            },
            C::Firmware => Boot::Firmware,
        }
    }
}

impl From<Boot> for crate::proto::control::Boot {
    fn from(b: Boot) -> Self {
        use crate::proto::control::Boot as C;
        match b {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => C::Kernel {
                kernel,
                initrd,
                cmdline,
            },
            Boot::Firmware => C::Firmware,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Disk {
    pub id: String,
    pub vm_id: String,
    pub name: String,
    pub size_bytes: u64,
    /// Location on the host (raw image file or block device); for disks an agent
    /// reports, its NBD export.
    pub path: Option<String>,
    /// The agent's id of the disk (unique per host), once an agent reported it.
    pub device_id: Option<u64>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskCreate {
    pub name: String,
    pub size_bytes: u64,
    #[serde(default)]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Vm {
    pub id: String,
    pub host_id: String,
    pub site_id: String,
    pub name: String,
    pub power_state: PowerState,
    pub cpus: u32,
    pub memory_mib: u64,
    pub nics: Vec<Nic>,
    /// How it boots, as its host's agent reports it (or as created); null for a
    /// simulated VM or when not known.
    pub boot: Option<Boot>,
    pub disks: Vec<Disk>,
    /// The VPG protecting this VM, if any.
    pub vpg_id: Option<String>,
    pub replication_state: VmReplicationState,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Body of `POST /api/v1/vms`. On a host an agent has registered for, the agent (which
/// must be connected) creates the VM (disks, NICs, boot) and powers it on; on a host
/// without an agent the VM is only recorded.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    pub host_id: String,
    pub name: String,
    /// As recorded on a host without an agent (an agent starts the VMs it creates).
    #[serde(default = "default_power")]
    pub power_state: PowerState,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// At most 8.
    #[serde(default)]
    pub nics: Vec<Nic>,
    #[serde(default)]
    pub disks: Vec<DiskCreate>,
    /// How it boots (a QEMU host needs it; a simulated one records it).
    #[serde(default)]
    pub boot: Option<Boot>,
}

fn default_power() -> PowerState {
    PowerState::Off
}
fn default_cpus() -> u32 {
    1
}
fn default_memory() -> u64 {
    1024
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPatch {
    pub name: Option<String>,
    /// Moving a VM to another host (vMotion-style) within its site.
    pub host_id: Option<String>,
    pub power_state: Option<PowerState>,
    pub cpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub nics: Option<Vec<Nic>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VmQuery {
    pub host: Option<String>,
    pub site: Option<String>,
    /// `true`: only VMs in a VPG; `false`: only VMs in none (candidates for a new VPG).
    pub protected: Option<bool>,
    pub name: Option<String>,
}

/// The most `GET /api/v1/vms/{id}/console` returns (and its default).
pub const CONSOLE_MAX_BYTES: u64 = 64 * 1024;

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ConsoleQuery {
    /// The most bytes of the log's end to return, 1 to 65536 (default 65536).
    pub max_bytes: Option<u64>,
}

/// The end of a VM's serial console log, read from its host.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VmConsole {
    pub vm_id: String,
    /// The VM's name on its host.
    pub vm: String,
    /// The text (invalid UTF-8 replaced), starting at a line boundary when truncated.
    pub text: String,
    /// Bytes the whole log holds.
    pub total_bytes: u64,
    /// Older output was left out.
    pub truncated: bool,
}

// ---- VPGs --------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Member {
    #[serde(flatten)]
    pub settings: MemberSettings,
    pub vm_name: String,
    pub replication_state: VmReplicationState,
}

/// One disk of a VPG's VMs as its protected host reports it now
/// (`GET /api/v1/vpgs/{id}/disks`): the figures behind the VPG's status.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VpgDisk {
    pub vm_id: String,
    pub vm_name: String,
    pub disk_id: String,
    pub disk_name: String,
    pub size_bytes: u64,
    pub host_id: String,
    pub host_name: String,
    /// The protected host reports this disk in this VPG now. When `false` (host away,
    /// disk not yet protected) the live figures below are null or zero.
    pub reported: bool,
    pub mode: Option<crate::proto::agent::ReplicationMode>,
    /// Age of the oldest write the recovery site does not hold durably yet (0 when
    /// level).
    pub lag_secs: Option<f64>,
    /// Writes queued towards the recovery host (memory and spill).
    pub queued_bytes: u64,
    /// Bytes the dirty bitmap marks: written but not yet known durable at the recovery
    /// site, or owed to a sync.
    pub dirty_bytes: u64,
    /// Data the guest writes, bytes per second over the last few seconds.
    pub throughput_bytes_per_sec: f64,
    /// Write commands per second over the same window.
    pub iops: f64,
    pub sync: Option<VpgDiskSync>,
}

/// Where a disk stands with respect to syncs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VpgDiskSync {
    pub phase: crate::proto::agent::SyncPhase,
    /// Why it waits or failed, in words.
    pub detail: Option<String>,
    /// The pass running now, if any.
    pub running: Option<VpgDiskSyncProgress>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VpgDiskSyncProgress {
    pub kind: crate::model::status::SyncKind,
    pub reason: String,
    pub percent: u8,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Vpg {
    pub id: String,
    pub name: String,
    pub description: String,
    pub protected_site_id: Option<String>,
    pub recovery_site_id: String,
    pub status: VpgStatus,
    pub sub_status: VpgSubStatus,
    pub paused: bool,
    pub settings: VpgSettings,
    pub vm_count: u32,
    /// Present on `GET /vpgs/{id}`; omitted from lists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<Member>>,
    /// Seconds since the newest recoverable checkpoint; null before the first one.
    pub rpo_actual_secs: Option<f64>,
    pub history_actual_secs: Option<u64>,
    pub journal_bytes: u64,
    pub last_test_at: Option<DateTime<Utc>>,
    /// The protection relationship's generation: every failover or move raises it, and
    /// agents refuse streams and commands of an older one.
    pub fencing_generation: u64,
    /// The recovery operation running (its task id), if any: one at a time.
    pub operation_id: Option<String>,
    /// Where that operation stands: `testing_failover`, `failover_before_commit`,
    /// `committing_failover`, `promoting_failover`, `rolling_back_failover`, and the same
    /// for `move` (the task has its steps).
    pub operation_phase: Option<String>,
    /// Increases with every change; send it back in `If-Match` to update safely.
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VpgCreate {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Optional: the site of the member VMs is used when absent.
    #[serde(default)]
    pub protected_site_id: Option<String>,
    pub recovery_site_id: String,
    #[serde(default)]
    pub settings: VpgSettings,
    #[serde(default)]
    pub members: Vec<MemberSettings>,
}

/// Full replacement of a VPG's definition (`PUT`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VpgReplace {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub recovery_site_id: String,
    #[serde(default)]
    pub protected_site_id: Option<String>,
    pub settings: VpgSettings,
    pub members: Vec<MemberSettings>,
}

/// Partial update of a VPG (`PATCH`): absent fields keep their value.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VpgPatch {
    pub name: Option<String>,
    pub description: Option<String>,
    pub recovery_site_id: Option<String>,
    pub settings: Option<VpgSettingsPatch>,
    /// Replaces the whole member list when present.
    pub members: Option<Vec<MemberSettings>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VpgQuery {
    pub status: Option<VpgStatus>,
    /// VPGs protecting from or recovering to this site.
    pub site: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MemberRemoveQuery {
    /// Keep the replica disks at the recovery site (default true).
    pub keep_recovery_disks: Option<bool>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct VpgDeleteQuery {
    /// Remove the VPG at once, without waiting for its hosts to stop protecting it
    /// (for a VPG waiting to be removed because a host is gone).
    pub force: Option<bool>,
    /// Keep the replica disks at the recovery site (default true); `false` deletes them
    /// once the protected hosts stopped streaming.
    pub keep_recovery_disks: Option<bool>,
}

/// Query of `GET /api/v1/vpgs/{id}/rpo-history`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RpoHistoryQuery {
    /// Start of the range, RFC 3339 (default: one hour before `until`).
    pub since: Option<String>,
    /// End of the range, RFC 3339, exclusive (default: now).
    pub until: Option<String>,
    /// At most this many samples, 1 to 5000 (default 720): longer ranges are
    /// downsampled into buckets keeping the worst values.
    pub max_points: Option<u32>,
}

/// A VPG's RPO history over a range, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RpoHistory {
    pub vpg_id: String,
    /// Seconds each sample spans (1 for raw samples); samples start at multiples of it.
    pub step_secs: u64,
    /// Buckets without any recorded sample are left out.
    pub samples: Vec<RpoHistorySample>,
}

/// One bucket of the RPO history: the worst of what was seen in it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RpoHistorySample {
    /// Start of the bucket.
    pub at: DateTime<Utc>,
    /// The largest RPO in the bucket; null when at some point no checkpoint was
    /// recoverable.
    pub rpo_ms: Option<i64>,
    /// The smallest journal history in the bucket; null when at some point there was none.
    pub history_secs: Option<i64>,
    /// The worst status in the bucket (`meeting_sla` only if it held throughout):
    /// not_meeting_sla, then rpo_not_meeting_sla, then history_not_meeting_sla, then any
    /// other non-meeting status, the latest among equals.
    pub status: VpgStatus,
}

// ---- checkpoints, tasks, events, alerts ----------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Checkpoint {
    pub id: i64,
    pub vpg_id: String,
    pub taken_at: DateTime<Utc>,
    /// `scheduled`, `user_tagged` or `app_consistent`. A round asked to quiesce whose
    /// guests were only paused is `user_tagged` (or `scheduled`), never `app_consistent`.
    pub kind: String,
    pub tag: Option<String>,
    pub recoverable: bool,
    /// How the guests were quiesced: `guest_agent` (file systems frozen), `paused` (CPUs
    /// paused: crash consistent only), or null when the round did not quiesce.
    pub quiesce: Option<String>,
    /// Application consistent: every guest's file systems were frozen (`quiesce` is
    /// `guest_agent`).
    pub app_consistent: bool,
}

/// Body of `POST /api/v1/vpgs/{id}/checkpoints`: take a tagged checkpoint now.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointCreate {
    /// 1 to 64 characters, shown with the checkpoint and written into every journal.
    #[schema(example = "before upgrade")]
    pub tag: String,
    /// Quiesce the member VMs through the hypervisor first (app-consistent checkpoint).
    #[serde(default)]
    pub app_consistent: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct CheckpointQuery {
    pub recoverable: Option<bool>,
    /// Only checkpoints with a tag.
    pub tagged: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TaskStep {
    pub name: String,
    /// `pending`, `running`, `succeeded`, `failed` or `skipped`.
    pub state: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub message: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Task {
    pub id: String,
    pub vpg_id: Option<String>,
    pub kind: String,
    /// `pending`, `running`, `succeeded`, `failed` or `cancelled`.
    pub state: String,
    /// 0 to 100.
    pub progress: f64,
    pub steps: Vec<TaskStep>,
    pub current_step: u32,
    pub error: Option<String>,
    /// Recovery operations: what each recovery host brought up (VMs, their disks' NBD
    /// exports, scratch use), the checkpoint, the decision and the commit countdown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<serde_json::Value>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct TaskQuery {
    pub vpg: Option<String>,
    pub state: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Event {
    pub id: i64,
    pub at: DateTime<Utc>,
    /// Dotted kind, e.g. `vpg.created`, `sync.finished`.
    pub kind: String,
    /// `info`, `warning` or `error`.
    pub severity: String,
    /// Who caused it: a token name, `system` or an agent.
    pub actor: String,
    pub vpg_id: Option<String>,
    pub subject_type: String,
    pub subject_id: Option<String>,
    pub message: String,
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventQuery {
    pub vpg: Option<String>,
    /// Exact kind, or a prefix ending in `.` (e.g. `vpg.`).
    pub kind: Option<String>,
    pub severity: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    pub id: String,
    pub kind: String,
    /// `warning` or `error`.
    pub severity: String,
    pub vpg_id: Option<String>,
    pub host_id: Option<String>,
    pub site_id: Option<String>,
    pub message: String,
    /// VPGs sharing this alert's root cause.
    pub affected_count: u32,
    pub raised_at: DateTime<Utc>,
    pub cleared_at: Option<DateTime<Utc>>,
    pub acknowledged_by: Option<String>,
    pub acknowledged_at: Option<DateTime<Utc>>,
    /// Kind-specific facts, e.g. the ids of the VPGs a site disconnection affects.
    #[serde(default)]
    pub details: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertQuery {
    /// VPG id (`vpg_id` is accepted too).
    #[serde(alias = "vpg_id")]
    pub vpg: Option<String>,
    /// `true`: not cleared yet; `false`: cleared.
    pub open: Option<bool>,
    /// `warning` or `error`.
    pub severity: Option<String>,
    /// e.g. `rpo_exceeded`, `site_disconnection` (see `model::alerts::AlertKind`).
    pub kind: Option<String>,
    /// Host id (`host_id` is accepted too).
    #[serde(alias = "host_id")]
    pub host: Option<String>,
    /// Site id (`site_id` is accepted too).
    #[serde(alias = "site_id")]
    pub site: Option<String>,
    /// `true`: acknowledged by an operator; `false`: not yet.
    pub acknowledged: Option<bool>,
}

// ---- tokens ------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Token {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// The first characters of the secret, to recognise it.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenCreate {
    pub name: String,
    pub role: Role,
    /// Days until the token stops working; never when absent.
    #[serde(default)]
    pub expires_in_days: Option<u32>,
}

/// The only time a token's secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    pub token: Token,
    pub secret: String,
}

// ---- enrolment tokens ---------------------------------------------------------------

/// A token an agent exchanges once for its host key (`bulwark agent` first contact).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrolmentToken {
    pub id: String,
    pub description: String,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// How many hosts may enrol with it; unlimited when absent.
    pub max_uses: Option<u32>,
    pub uses: u32,
    pub revoked_at: Option<DateTime<Utc>>,
    pub created_by: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnrolmentTokenCreate {
    #[serde(default)]
    pub description: Option<String>,
    /// Seconds until the token stops working: 60 to 2592000 (30 days); 86400 when absent.
    #[serde(default)]
    pub expires_in_secs: Option<u64>,
    /// 1 to 10000; unlimited when absent.
    #[serde(default)]
    pub max_uses: Option<u32>,
}

/// The only time an enrolment token's secret is shown.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnrolmentTokenCreated {
    pub token: EnrolmentToken,
    pub secret: String,
}

/// Who the presented token belongs to.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Session {
    pub token_id: String,
    pub name: String,
    pub role: Role,
}

// ---- lookups and health ------------------------------------------------------------

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LookupValue {
    pub id: String,
    pub label: String,
    pub description: String,
}

/// Every enumeration of the API with its values.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Lookups {
    pub vpg_statuses: Vec<LookupValue>,
    pub vpg_sub_statuses: Vec<LookupValue>,
    pub vm_replication_states: Vec<LookupValue>,
    pub sync_kinds: Vec<LookupValue>,
    /// A disk's `mode` in `GET /vpgs/{id}/disks`.
    pub replication_modes: Vec<LookupValue>,
    /// A disk's `sync.phase` in `GET /vpgs/{id}/disks`.
    pub sync_phases: Vec<LookupValue>,
    pub priorities: Vec<LookupValue>,
    pub resync_modes: Vec<LookupValue>,
    pub roles: Vec<LookupValue>,
    pub connectivity: Vec<LookupValue>,
    pub power_states: Vec<LookupValue>,
    pub checkpoint_kinds: Vec<LookupValue>,
    /// A checkpoint's `quiesce`.
    pub quiesce_methods: Vec<LookupValue>,
    /// A VM's `boot.kind`.
    pub boot_kinds: Vec<LookupValue>,
    pub task_states: Vec<LookupValue>,
    pub alert_severities: Vec<LookupValue>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// RFC 7807 problem document; `code` is stable and meant for programs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    #[serde(rename = "type")]
    pub type_: String,
    pub title: String,
    pub status: u16,
    pub detail: String,
    pub code: String,
    /// The offending input field, when one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Body of `POST /api/v1/vpgs/{id}/failover-test`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverTestStart {
    /// `latest` (default), `latest_tagged`, `latest_app_consistent`, `tag:NAME` or a
    /// checkpoint id.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// Test only these member VMs (ids); all when absent or empty.
    #[serde(default)]
    pub vm_ids: Vec<String>,
    /// The test is stopped by itself (with an alert) after this long. Default 8 hours.
    #[serde(default)]
    pub max_duration_secs: Option<u64>,
    /// Guest writes the test VMs may make (in scratch layers). Default: a tenth of the
    /// VPG's journal hard limit.
    #[serde(default)]
    pub scratch_budget_bytes: Option<u64>,
    #[serde(default)]
    pub notes: Option<String>,
}

/// Body of `POST /api/v1/vpgs/{id}/failover-test/stop`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverTestStop {
    /// `passed` (default) or `failed`: the operator's verdict, kept in the report.
    #[serde(default)]
    pub result: Option<String>,
    #[serde(default)]
    pub notes: Option<String>,
}

/// What happens by itself once the VMs are up (failover and move).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CommitPolicyAction {
    /// Wait for the operator.
    #[default]
    None,
    Commit,
    Rollback,
}

/// Body of `POST /api/v1/vpgs/{id}/failover` and `…/move`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverStart {
    /// Failover only (a move always uses a new final checkpoint): `latest` (default),
    /// `latest_tagged`, `tag:NAME` or a checkpoint id.
    #[serde(default)]
    pub checkpoint: Option<String>,
    #[serde(default)]
    pub commit_policy: CommitPolicyAction,
    /// Seconds before the commit policy acts.
    #[serde(default)]
    pub commit_after_secs: Option<u64>,
    /// Reverse protection when committed by the policy (default: on for a move, off
    /// for a failover).
    #[serde(default)]
    pub reverse_protection: Option<bool>,
    /// Failover only: shut the protected VMs down first when their hosts answer
    /// (default true).
    #[serde(default)]
    pub shut_down_protected: Option<bool>,
    #[serde(default)]
    pub notes: Option<String>,
}

/// Body of `POST /api/v1/vpgs/{id}/commit`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// Default: on for a move, off for a failover (or what the operation was started
    /// with).
    #[serde(default)]
    pub reverse_protection: Option<bool>,
}

/// A recovery report: one per failover, failover test and move.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
pub struct RecoveryReportView {
    pub id: String,
    pub vpg_id: String,
    pub vpg_name: String,
    /// `failover_test`, `failover` or `move`.
    pub kind: String,
    /// `committed`, `committed_reverse_protected`, `rolled_back`, `stopped`,
    /// `failed`.
    pub result: String,
    pub checkpoint_id: Option<u64>,
    pub checkpoint_at: Option<DateTime<Utc>>,
    pub created_by: String,
    pub started_at: DateTime<Utc>,
    pub ended_at: DateTime<Utc>,
    /// From the request to every recovered VM running, ms.
    pub rto_ms: Option<u64>,
    pub notes: String,
    pub steps: Vec<TaskStep>,
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReportQuery {
    /// Only this VPG's reports.
    pub vpg: Option<String>,
}
