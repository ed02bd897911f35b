//! The control channel between an agent and the manager: one WebSocket per agent, dialled
//! by the agent (so it works through NAT and firewalls), JSON text messages.
//!
//! Shape of a connection:
//! 1. agent → [`AgentMessage::Hello`] with its credential (an enrolment token the first
//!    time, the host key it was given afterwards), endpoints and inventory;
//! 2. manager → [`ManagerMessage::Welcome`] (with the host key, once, on enrolment) or
//!    [`ManagerMessage::Rejected`] and close;
//! 3. manager → [`ManagerMessage::Desired`]: the whole protection this host must have.
//!    The agent converges to it and answers [`AgentMessage::Applied`]. Desired state is
//!    resent in full on every change and on every reconnect: reconcile, never replay;
//! 4. agent → [`AgentMessage::Heartbeat`] every `heartbeat_ms` (status, recoverable
//!    checkpoints of the journals it keeps); events as they happen;
//! 5. checkpoint rounds: manager → `Hold`, agent → `Held`, manager → `Release` (or
//!    `Abort`), agent → `Released`. The agent never holds longer than the round's bound;
//! 6. one-off commands carry an id; the agent remembers recent results, so a command
//!    resent after a reconnect is answered, not run twice.
//!
//! This module imports neither axum nor sea-orm (nor tungstenite): both ends own their
//! socket; this is only the vocabulary.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::settings::{Priority, ResyncPolicy};
use crate::proto::agent::{AgentStatus, CheckpointDisk, SyncAction};

/// Path of the control WebSocket on the manager.
pub const CONTROL_PATH: &str = "/api/v1/agents/connect";
/// Version of this vocabulary; the manager refuses agents it does not speak.
pub const CONTROL_PROTOCOL: u32 = 1;

/// How an agent proves which host it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Credential {
    /// First contact: an enrolment token an administrator created. Exchanged for a host
    /// key, which the agent stores and uses from then on.
    Enrolment { token: String },
    /// Every later contact.
    HostKey { key: String },
}

impl std::fmt::Display for Credential {
    /// Never prints the secret.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credential::Enrolment { .. } => f.write_str("enrolment token"),
            Credential::HostKey { .. } => f.write_str("host key"),
        }
    }
}

/// One disk of a VM, as the hypervisor driver reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryDisk {
    /// Stable per host; the replication stream and the recovery journal know the disk
    /// by (protected host, disk_id).
    pub disk_id: u64,
    pub name: String,
    pub size_bytes: u64,
    /// NBD export that serves it on the agent's NBD listener.
    pub export: String,
}

/// Power state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerState {
    On,
    Off,
}

impl PowerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PowerState::On => "on",
            PowerState::Off => "off",
        }
    }
}

/// One VM on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryVm {
    pub name: String,
    pub power_state: PowerState,
    pub cpus: u32,
    pub memory_mib: u64,
    pub disks: Vec<InventoryDisk>,
    /// Locked by `PrepareFailover` ("Prepared for planned failover"): it may not be
    /// powered on until `ReleaseFailover`.
    #[serde(default)]
    pub prepared_for_failover: bool,
    /// How the VM boots; `None` for a simulated VM. A recovered VM boots the same way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
    /// Its network interfaces, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
}

/// How a VM boots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Boot {
    /// Direct kernel boot: files on the host that runs the VM (a recovery host needs
    /// the same paths).
    Kernel {
        kernel: String,
        #[serde(default)]
        initrd: Option<String>,
        #[serde(default)]
        cmdline: String,
    },
    /// The firmware boots the first disk.
    Firmware,
}

/// A network interface of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    /// The network it is attached to (a name the host knows); `None`: not connected.
    #[serde(default)]
    pub network: Option<String>,
    /// `52:54:00:xx:xx:xx`; `None`: the hypervisor picks one.
    #[serde(default)]
    pub mac: Option<String>,
}

/// How the guests of a checkpoint round were quiesced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuiesceMethod {
    /// The guest agent froze the filesystems (`guest-fsfreeze-freeze`): application
    /// consistent.
    GuestAgent,
    /// The VM's CPUs were paused around the marker: crash consistent only.
    Paused,
}

impl QuiesceMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            QuiesceMethod::GuestAgent => "guest_agent",
            QuiesceMethod::Paused => "paused",
        }
    }

    /// The weaker of two (a round is as consistent as its least quiesced VM).
    pub fn weakest(self, other: QuiesceMethod) -> QuiesceMethod {
        if self == QuiesceMethod::Paused || other == QuiesceMethod::Paused {
            QuiesceMethod::Paused
        } else {
            QuiesceMethod::GuestAgent
        }
    }
}

/// Everything the host's hypervisor driver knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    pub vms: Vec<InventoryVm>,
}

/// First message of every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    pub protocol: u32,
    pub host_name: String,
    pub site: String,
    pub agent_version: String,
    pub credential: Credential,
    /// NBD listener (exports of the protected disks and, later, recovery views).
    pub nbd_address: String,
    /// Replication listener, if this host can be a recovery host.
    pub data_address: Option<String>,
    /// Where this host keeps the journals and replica disks it receives.
    pub storage_path: Option<String>,
    pub inventory: Inventory,
    /// Version of the desired state the agent currently runs (persisted across restarts),
    /// if any.
    pub desired_version: Option<u64>,
}

/// Protection of one disk of this host: where it replicates and with which group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskProtection {
    pub disk_id: u64,
    /// The disk's name (its export).
    pub disk_name: String,
    pub vm: String,
    /// Consistency group = the VPG: checkpoint rounds hold every disk of it together.
    pub vpg_id: String,
    pub recovery_host: String,
    /// "User paused protection": writes are tracked in the dirty bitmap only; resuming
    /// runs a Bitmap Sync.
    pub paused: bool,
    pub priority: Priority,
    pub resync: ResyncPolicy,
    /// The VPG's fencing generation (see [`DesiredState::fencing`]); the disk's stream
    /// carries it and a recovery host that knows a newer one refuses the stream.
    #[serde(default)]
    pub fencing_generation: u64,
}

/// A recovery host this host streams to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerTarget {
    pub host_name: String,
    /// Its replication listener.
    pub address: String,
    /// Bytes per second this link may use: its share of the protected site's bandwidth
    /// limit. None = unlimited (the agent's own `[[agent.peers]]` limit still applies; the
    /// smaller of the two wins). Changes apply to the running stream without reconnecting.
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
}

/// The whole protection a host must have. Anything the agent runs that is not in here is
/// stopped (a disk no longer listed stops replicating; its replica is kept unless a
/// `DropReplica` command says otherwise).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Increases with every change the manager makes for this host.
    pub version: u64,
    /// Protected side: this host's disks that replicate.
    pub protect: Vec<DiskProtection>,
    /// Protected side: the recovery hosts those disks go to.
    pub peers: Vec<PeerTarget>,
    /// Recovery side: protected hosts allowed to stream here (journals under
    /// `<storage_path>/<host_name>`).
    pub accept: Vec<String>,
    /// Fencing: the current generation of every VPG this host takes part in (either
    /// side), by VPG id. A generation only goes up; a failover or move bumps it. The
    /// agent keeps the highest it has seen per VPG (across restarts) and refuses a
    /// stream, sync session or command of that VPG that carries an older one, so an old
    /// primary that comes back after a disaster cannot overwrite the new one.
    #[serde(default)]
    pub fencing: BTreeMap<String, u64>,
    /// Recovery side: what this host needs to recover each VPG it is the recovery host
    /// of, even with the manager gone (break-glass recovery reads it from the persisted
    /// desired state).
    #[serde(default)]
    pub recovery: Vec<RecoveryVpg>,
}

/// A VPG as its recovery host must know it to bring it up alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryVpg {
    pub vpg_id: String,
    pub name: String,
    pub fencing_generation: u64,
    /// Journal history each of this VPG's journals here keeps; older records go into the
    /// replica disks (background promotion). 0: nothing is promoted.
    #[serde(default)]
    pub journal_history_secs: u64,
    /// Each journal's share of the VPG's journal hard limit (the VPG's limit over its
    /// disks): past it, promotion goes further than the history. 0: no limit.
    #[serde(default)]
    pub journal_hard_limit_bytes_per_disk: u64,
    /// Each journal's share of the VPG's journal warning size. 0: none.
    #[serde(default)]
    pub journal_warning_bytes_per_disk: u64,
    /// The VMs whose disks this host keeps journals of, in boot order (boot group, then
    /// name); each with its recovery network and re-IP setting.
    pub vms: Vec<RecoveryVpgVm>,
}

/// One VM of a [`RecoveryVpg`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryVpgVm {
    pub vm: RecoverVm,
    /// Boot-order group (lower starts first) and the delay after the previous group.
    pub boot_group: u32,
    pub boot_delay_secs: u64,
}

/// Kind of a checkpoint (the journal records the same byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    Scheduled,
    UserTagged,
    AppConsistent,
}

impl CheckpointKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckpointKind::Scheduled => "scheduled",
            CheckpointKind::UserTagged => "user_tagged",
            CheckpointKind::AppConsistent => "app_consistent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "scheduled" => Some(CheckpointKind::Scheduled),
            "user_tagged" => Some(CheckpointKind::UserTagged),
            "app_consistent" => Some(CheckpointKind::AppConsistent),
            _ => None,
        }
    }
}

/// Phase one of a checkpoint round on one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundHold {
    /// The checkpoint id (the same on every host and disk of the round).
    pub round: u64,
    pub vpg_id: String,
    pub kind: CheckpointKind,
    pub tag: Option<String>,
    /// The longest the agent may hold write completions: past it the agent releases by
    /// itself and the round is aborted.
    pub bound_ms: u64,
    /// VMs to quiesce through the hypervisor driver first (app-consistent checkpoints).
    #[serde(default)]
    pub quiesce: Vec<String>,
    /// `false` only in tests that show what the barrier prevents: the agent inserts its
    /// markers and releases at once.
    #[serde(default = "yes")]
    pub barrier: bool,
}

fn yes() -> bool {
    true
}

/// The markers are in every disk's stream; completions are held (unless the round said
/// `barrier: false` or failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundHeld {
    pub round: u64,
    pub vpg_id: String,
    pub timestamp_ms: i64,
    pub disks: Vec<CheckpointDisk>,
    /// Why the host could not take part (no disk of the VPG here, quiesce failed,
    /// shutting down). Nothing is held then.
    pub error: Option<String>,
    /// How this host quiesced the round's VMs (none asked: `None`). Only a round whose
    /// every host answered `guest_agent` is app consistent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<QuiesceMethod>,
}

/// Completions flow again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoundReleased {
    pub round: u64,
    pub vpg_id: String,
    /// How long completions were held, µs.
    pub hold_us: u64,
    /// `true` when the release came from the manager within the bound; `false` when the
    /// agent had to release by itself (the round cannot be consistent).
    pub on_time: bool,
}

/// Recoverable checkpoints of one journal this host keeps (recovery side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalReport {
    /// The protected host the disk belongs to, and its disk id there.
    pub host: String,
    pub disk_id: u64,
    /// Checkpoint ids durable and recoverable in this journal that were not reported on
    /// this connection yet (all of them in the first heartbeat after a connect).
    pub recoverable: Vec<u64>,
    /// The oldest recoverable checkpoint the journal still holds: anything older was
    /// promoted away or made unrecoverable by a sync.
    pub oldest_recoverable: Option<u64>,
    /// Newest recoverable checkpoint id.
    pub newest_recoverable: Option<u64>,
    /// Bytes the journal occupies on disk.
    pub journal_bytes: u64,
    /// The journal reports a storage error (I/O, corruption).
    pub storage_error: Option<String>,
}

/// Periodic report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub status: AgentStatus,
    pub journals: Vec<JournalReport>,
    /// Version of the desired state the agent runs.
    pub desired_version: Option<u64>,
    /// Recovery side: the recoveries (test or live, before commit) this host runs.
    #[serde(default)]
    pub recoveries: Vec<RecoveryReport>,
}

/// A recovery a recovery host runs (from `Recover` until `EndRecovery`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    pub operation: String,
    pub vpg_id: String,
    pub checkpoint: u64,
    pub test: bool,
    /// Bytes the recovered VMs wrote into their scratch layers, and the budget.
    pub scratch_bytes: u64,
    pub scratch_budget_bytes: Option<u64>,
    /// The budget is used up: further guest writes fail (ENOSPC) rather than fill the
    /// journal storage and stop replication.
    pub scratch_full: bool,
    pub vms: Vec<RecoveredVm>,
}

/// A VM to bring up at this (recovery) host from the journals it keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverVm {
    /// Name of the VM to create here: the protected VM's name, or "<vm> - Test" for a
    /// failover test.
    pub name: String,
    /// The protected VM it recovers.
    pub source_vm: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Network the VM's NIC is attached to (the recovery or the test network) and its
    /// re-IP setting, recorded in the recovered VM's configuration.
    #[serde(default)]
    pub network: Option<String>,
    #[serde(default)]
    pub ip_address: Option<String>,
    pub disks: Vec<RecoverDisk>,
    /// How the protected VM boots (the recovered VM boots the same way); `None` for a
    /// simulated VM.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
}

/// One disk of a VM to recover: the journal it comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverDisk {
    /// The protected host and its disk id: the journal's key on this host.
    pub host: String,
    pub disk_id: u64,
    /// The disk's name on the protected VM.
    pub name: String,
}

/// A VM a recovery brought up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveredVm {
    pub name: String,
    pub source_vm: String,
    pub power_state: PowerState,
    pub disks: Vec<RecoveredDisk>,
}

/// A recovered disk: served as an NBD export of this host's NBD listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveredDisk {
    pub name: String,
    /// Where it comes from (protected host, disk id).
    pub host: String,
    pub source_disk_id: u64,
    /// Export name on this host's NBD listener.
    pub export: String,
    pub size_bytes: u64,
    /// After a commit: the disk id the disk now has on this host (a plain local disk,
    /// which reverse protection can protect).
    #[serde(default)]
    pub disk_id: Option<u64>,
}

/// How a recovery ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecoveryEnd {
    /// Test stop or rollback: the recovered VMs are powered off and removed, their
    /// exports closed, the scratch layers discarded; the journals are as before.
    Discard,
    /// Commit: each journal is promoted up to the checkpoint into its replica disk, the
    /// scratch layer merged; records after the checkpoint are dropped. The recovered VMs
    /// keep running on the replica disks, now plain local disks of this host.
    Commit,
}

/// The old protected host's disk that becomes the pre-seeded replica of a recovered
/// disk when protection is reversed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReverseSeed {
    /// The protected disk here (its content is the replica's starting point).
    pub disk_id: u64,
    /// The VM it belongs to (removed from this host's hypervisor once all its disks
    /// are seeds).
    pub vm: String,
    /// The new protected host and the recovered disk's id there.
    pub new_host: String,
    pub new_disk_id: u64,
}
/// Something that happened on the agent that the manager records as an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// Stable kind, e.g. `sync_started`, `sync_ended`, `stream_connected`,
    /// `stream_disconnected`, `disk_bitmap_only`, `replica_behind`, `vm_power`.
    pub kind: String,
    pub disk_id: Option<u64>,
    pub vm: Option<String>,
    pub message: String,
    #[serde(default)]
    pub details: serde_json::Value,
    pub at_ms: i64,
}

/// A one-off request to an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CommandBody {
    /// Resume a held sync, Force Sync (Delta over the whole disk) or Full Sync.
    Sync {
        disk_id: u64,
        action: SyncAction,
    },
    /// A new VM with new (sparse, zeroed) disks, powered on.
    CreateVm {
        name: String,
        cpus: u32,
        memory_mib: u64,
        disks: Vec<NewDisk>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot: Option<Boot>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        nics: Vec<Nic>,
    },
    /// The tail of a VM's serial console log (at most `max_bytes`). Output:
    /// [`ConsoleTail`].
    ReadConsole {
        vm: String,
        max_bytes: u64,
    },
    PowerOn {
        vm: String,
    },
    PowerOff {
        vm: String,
    },
    /// Recovery side: delete the journal and replica disk of a disk no longer protected.
    DropReplica {
        host: String,
        disk_id: u64,
    },
    /// Recovery side: bring VMs up from `checkpoint` of the journals here (a view per
    /// disk with a writable scratch layer, served over NBD), powered off; the manager
    /// powers them on in boot order. Running it again for the same operation answers the
    /// same recovery. Output: [`RecoveryReport`].
    Recover {
        operation: String,
        vpg_id: String,
        fencing_generation: u64,
        checkpoint: u64,
        test: bool,
        /// Guest writes the recovery may hold in scratch layers (all its disks).
        #[serde(default)]
        scratch_budget_bytes: Option<u64>,
        vms: Vec<RecoverVm>,
    },
    /// Recovery side: end a recovery (discard or commit). An operation this host does
    /// not run (any more) answers ok with `"known": false`.
    EndRecovery {
        operation: String,
        vpg_id: String,
        fencing_generation: u64,
        end: RecoveryEnd,
    },
    /// Protected side, failover and move: shut these VMs down (if running) and lock
    /// them against starting ("Prepared for planned failover") until released.
    PrepareFailover {
        operation: String,
        vpg_id: String,
        fencing_generation: u64,
        vms: Vec<String>,
    },
    /// Protected side, rollback: unlock the VMs and, if asked, power them on again.
    ReleaseFailover {
        operation: String,
        vpg_id: String,
        fencing_generation: u64,
        vms: Vec<String>,
        power_on: bool,
    },
    /// Old protected side, reverse protection: each disk becomes the pre-seeded replica
    /// of the recovered disk that replaces it (a Delta Sync then brings it level).
    SeedReverse {
        operation: String,
        vpg_id: String,
        fencing_generation: u64,
        seeds: Vec<ReverseSeed>,
    },
}

/// The end of a VM's serial console log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsoleTail {
    pub vm: String,
    /// The text (invalid UTF-8 replaced), starting at a line boundary when truncated.
    pub text: String,
    /// Bytes the whole log holds.
    pub total_bytes: u64,
    /// Older output was left out.
    pub truncated: bool,
}

/// A disk to create with a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewDisk {
    pub name: String,
    pub size_bytes: u64,
}

/// A command with its id (idempotency key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    pub id: String,
    pub body: CommandBody,
}

/// The answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandResult {
    pub id: String,
    pub ok: bool,
    pub error: Option<String>,
    #[serde(default)]
    pub output: serde_json::Value,
}

/// Agent → manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AgentMessage {
    Hello(AgentHello),
    Heartbeat(Heartbeat),
    Inventory(Inventory),
    /// The agent now runs desired state `version` (or failed to, with the reason; it
    /// keeps converging and reports again).
    Applied {
        version: u64,
        error: Option<String>,
    },
    Held(RoundHeld),
    Released(RoundReleased),
    CommandResult(CommandResult),
    Event(AgentEvent),
}

/// Manager → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ManagerMessage {
    Welcome {
        host_id: String,
        /// Issued once, when an enrolment token was exchanged: the agent must store it.
        host_key: Option<String>,
        heartbeat_ms: u64,
    },
    /// The connection is refused (bad credential, protocol, name taken); the socket
    /// closes after this.
    Rejected {
        code: String,
        reason: String,
    },
    Desired(DesiredState),
    Hold(RoundHold),
    Release {
        round: u64,
    },
    /// Release now: the round failed elsewhere.
    Abort {
        round: u64,
    },
    Command(Command),
}

impl AgentMessage {
    /// For logs.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentMessage::Hello(_) => "hello",
            AgentMessage::Heartbeat(_) => "heartbeat",
            AgentMessage::Inventory(_) => "inventory",
            AgentMessage::Applied { .. } => "applied",
            AgentMessage::Held(_) => "held",
            AgentMessage::Released(_) => "released",
            AgentMessage::CommandResult(_) => "command_result",
            AgentMessage::Event(_) => "event",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_tagged_json_and_round_trip() {
        let m = ManagerMessage::Hold(RoundHold {
            round: 7,
            vpg_id: "v".into(),
            kind: CheckpointKind::UserTagged,
            tag: Some("before upgrade".into()),
            bound_ms: 50,
            quiesce: vec![],
            barrier: true,
        });
        let s = serde_json::to_string(&m).unwrap();
        assert!(s.contains(r#""type":"hold""#), "{s}");
        assert!(s.contains(r#""kind":"user_tagged""#), "{s}");
        assert_eq!(serde_json::from_str::<ManagerMessage>(&s).unwrap(), m);
        // An older manager that does not send `barrier` means a real barrier.
        let old =
            r#"{"type":"hold","round":1,"vpg_id":"v","kind":"scheduled","tag":null,"bound_ms":5}"#;
        match serde_json::from_str::<ManagerMessage>(old).unwrap() {
            ManagerMessage::Hold(h) => assert!(h.barrier && h.quiesce.is_empty()),
            other => panic!("{other:?}"),
        }
        let c = Credential::HostKey {
            key: "secret".into(),
        };
        assert_eq!(c.to_string(), "host key");
        assert!(!format!("{c}").contains("secret"));
    }
}
