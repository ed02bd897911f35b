//! Agent configuration: the `[agent]` section of `bulwark.toml` (its disks, the recovery
//! hosts it streams to, the protected hosts it accepts), overridden by flags; resolved
//! into an [`AgentConfig`] with every rule checked before anything is opened.
//!
//! Until the manager's control channel drives agents, this file is the agent's desired
//! state; afterwards it stays the way to run an agent without a manager (labs, tests).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::agent::sync::HashConfig;
use crate::agent::tls::TlsFiles;
use crate::model::settings::{Priority, ResyncPolicy};
use crate::proto::control::{Boot, Nic};
use crate::proto::stream::Compression;

pub const DEFAULT_NBD_LISTEN: &str = "127.0.0.1:10809";
pub const DEFAULT_DATA_LISTEN: &str = "127.0.0.1:8471";
/// The consistency group of a disk that names none.
pub const DEFAULT_GROUP: &str = "default";

/// Why a configuration is refused.
#[derive(Debug, thiserror::Error)]
pub enum AgentConfigError {
    #[error("agent config: {0} is required")]
    Missing(&'static str),
    #[error("agent config: {field}: `{value}` is not host:port")]
    Address { field: String, value: String },
    #[error("agent config: {field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> AgentConfigError {
    AgentConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A byte count in the file: an integer, or a string with a binary unit (`"4 GiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SizeRepr")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Int(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for ByteSize {
    type Error = String;
    fn try_from(r: SizeRepr) -> Result<Self, String> {
        match r {
            SizeRepr::Int(n) => Ok(ByteSize(n)),
            SizeRepr::Text(s) => parse_size(&s).map(ByteSize),
        }
    }
}

/// Parses `123`, `64KiB`, `4 MiB`, `2GiB`, `1TiB` (binary units; `K`/`M`/`G`/`T` too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size such as 4GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{s}` (use KiB, MiB, GiB, TiB)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` is too large"))
}

pub const DEFAULT_AWAY_BOUND_SECS: u64 = 300;
/// Outbound queue memory of a peer without its own `queue_memory`.
pub const DEFAULT_QUEUE_MEMORY: u64 = 256 << 20;
/// Spill log of a peer without its own `spill_limit`.
pub const DEFAULT_SPILL_LIMIT: u64 = 1 << 30;

impl PeerConfig {
    /// A peer the manager names that has no `[[peers]]` entry: the defaults, with the
    /// agent-wide away bound.
    pub fn with_defaults(host_name: &str, address: SocketAddr, away_bound: Duration) -> Self {
        PeerConfig {
            host_name: host_name.to_string(),
            address,
            compression: Compression::None,
            bandwidth_limit: None,
            queue_memory: DEFAULT_QUEUE_MEMORY as usize,
            spill_limit: DEFAULT_SPILL_LIMIT as usize,
            away_bound,
        }
    }
}

/// `[agent]` in `bulwark.toml`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    pub data_dir: Option<PathBuf>,
    pub site: Option<String>,
    pub host_name: Option<String>,
    pub nbd_listen: Option<String>,
    pub data_listen: Option<String>,
    pub admin_listen: Option<String>,
    /// Directory holding `ca.pem`, `<host>.pem`, `<host>.key` (what `bulwark agent certs`
    /// writes); or the three files one by one.
    pub tls_dir: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    #[serde(default)]
    pub insecure: bool,
    #[serde(default)]
    pub disks: Vec<DiskSection>,
    #[serde(default)]
    pub peers: Vec<PeerSection>,
    #[serde(default)]
    pub allow: Vec<AllowSection>,
    /// Seconds without a frame after which a stream or sync connection is given up (both
    /// directions; the peers ping every second). Default 15 on the receiving side, 10 on
    /// the sending side.
    pub peer_timeout_secs: Option<u64>,
    /// Seconds a stream keeps records for an unreachable recovery host before the disk
    /// goes bitmap-only (a Bitmap Sync when the host is back). Default 300; a
    /// `[[peers]]` entry's `away_bound_secs` overrides it for that host.
    pub away_bound_secs: Option<u64>,
    /// Bytes per second one sync may queue (its data shares the stream with the guest's).
    pub sync_rate_limit: Option<ByteSize>,
    /// Syncs running at once on this host; the others wait by VPG priority.
    pub max_concurrent_syncs: Option<usize>,
    /// Delta Sync granularity: the block compared (and sent) and the chunk of blocks
    /// compared by one digest first.
    pub sync_block_size: Option<ByteSize>,
    pub sync_chunk_size: Option<ByteSize>,
    /// Recovery side under the manager: journals and replica disks of each protected
    /// host the manager lets stream here go to `<storage>/<host>`. Default
    /// `<data-dir>/replicas`. (`[[allow]]` entries keep their own storage paths.)
    pub storage: Option<PathBuf>,
    /// The manager's control channel, `ws://host:port` (`--manager`); none: the agent
    /// runs from this file alone.
    pub manager_url: Option<String>,
    /// One-time enrolment token for the first contact with the manager
    /// (`--enrolment-token`); afterwards the host key in `state/host.key` is used.
    pub enrolment_token: Option<String>,
    /// `[[agent.vms]]`: VMs of the simulated hypervisor; their disks are protected disks.
    #[serde(default)]
    pub vms: Vec<VmSection>,
    /// Simulated hypervisor: quiesce fails with this message (shows the error path of
    /// app-consistent checkpoints).
    pub sim_quiesce_error: Option<String>,
    /// `"sim"` (default: VMs are records, power is a flag) or `"qemu"` (each VM is a
    /// `qemu-system-x86_64` process the agent supervises); `--hypervisor`.
    pub hypervisor: Option<String>,
    /// `[agent.qemu]`: settings of the QEMU driver.
    #[serde(default)]
    pub qemu: QemuSection,
}

/// `[agent.qemu]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuSection {
    /// The emulator (default `qemu-system-x86_64` on `PATH`).
    pub binary: Option<PathBuf>,
    /// `"auto"` (default: KVM if it boots a guest here, else TCG), `"kvm"` or `"tcg"`.
    pub accel: Option<String>,
    /// Seconds a guest gets to shut down after ACPI power-down before `quit` (default 30).
    pub powerdown_timeout_secs: Option<u64>,
    /// Seconds QEMU queues a guest's disk I/O while the agent's NBD socket is gone (an
    /// agent restart) before failing it (default 60).
    pub reconnect_delay_secs: Option<u64>,
}

/// `[[agent.vms]]`: a VM of the simulated hypervisor.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSection {
    pub name: String,
    #[serde(default = "one_cpu")]
    pub cpus: u32,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default)]
    pub disks: Vec<VmDiskSection>,
    /// How it boots (`hypervisor = "qemu"`): `{ kind = "kernel", kernel, initrd,
    /// cmdline }` or `{ kind = "firmware" }`.
    #[serde(default)]
    pub boot: Option<Boot>,
    #[serde(default)]
    pub nics: Vec<Nic>,
}

fn one_cpu() -> u32 {
    1
}

fn default_memory_mib() -> u64 {
    1024
}

/// `disks = [{ name, id, size }]` of a `[[agent.vms]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDiskSection {
    pub name: String,
    pub id: u64,
    pub size: ByteSize,
}

/// `[[agent.disks]]`: a protected disk of this host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSection {
    /// Export name; also names the image and tracking files.
    pub name: String,
    /// Identity in the stream and at the recovery site (the manager's disk id).
    pub id: u64,
    pub size: ByteSize,
    /// An existing raw image to register; default `<data-dir>/disks/<name>.img`,
    /// created sparse when missing.
    pub path: Option<PathBuf>,
    /// Consistency group (the VPG); checkpoint rounds hold a group together.
    pub group: Option<String>,
    /// The recovery host this disk streams to (a `[[agent.peers]]` host name); none:
    /// not replicated (writes are still tracked in the bitmap).
    pub recovery_host: Option<String>,
    /// When a Delta or Full Sync may start: `{ mode = "automatic" }` (default),
    /// `{ mode = "manual" }`, `{ mode = "window", start = "22:00", end = "06:00" }`.
    pub resync: Option<ResyncPolicy>,
    /// The VPG's priority among waiting syncs: `high`, `medium` (default), `low`.
    pub priority: Option<Priority>,
}

/// `[[agent.peers]]`: a recovery host this agent streams to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub host_name: String,
    pub address: String,
    /// `none`, `zstd` or `lz4`.
    pub compression: Option<String>,
    /// Bytes per second on the wire.
    pub bandwidth_limit: Option<ByteSize>,
    /// Outbound queue in memory (all disks to this peer).
    pub queue_memory: Option<ByteSize>,
    /// Spill log bound on disk (all disks to this peer); 0 disables spilling.
    pub spill_limit: Option<ByteSize>,
    /// Seconds the peer may be away before its disks go bitmap-only.
    pub away_bound_secs: Option<u64>,
}

/// `[[agent.allow]]`: a protected host allowed to stream here, and where its disks go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowSection {
    pub host_name: String,
    pub storage: PathBuf,
}

/// Flags of `bulwark agent`, already merged with `BULWARK_*` variables by clap.
#[derive(Debug, Clone, Default)]
pub struct AgentFlags {
    pub data_dir: Option<PathBuf>,
    pub site: Option<String>,
    pub host_name: Option<String>,
    pub nbd_listen: Option<String>,
    pub data_listen: Option<String>,
    pub admin_listen: Option<String>,
    pub tls_dir: Option<PathBuf>,
    pub insecure: bool,
}

/// A protected disk, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub name: String,
    pub id: u64,
    pub size: u64,
    pub path: PathBuf,
    pub group: String,
    pub recovery_host: Option<String>,
    pub resync: ResyncPolicy,
    pub priority: Priority,
}

/// How syncs run on this host, resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncSettings {
    pub rate_limit: Option<u64>,
    pub max_concurrent: usize,
    pub hash: HashConfig,
}

/// A recovery host to stream to, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    pub host_name: String,
    pub address: SocketAddr,
    pub compression: Compression,
    pub bandwidth_limit: Option<u64>,
    pub queue_memory: usize,
    pub spill_limit: usize,
    pub away_bound: Duration,
}

/// How the stream is protected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    Tls(TlsFiles),
    /// Plain TCP, only by the operator's explicit `--insecure`.
    Insecure,
}

/// Everything an agent needs, checked.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub data_dir: PathBuf,
    pub site: String,
    pub host_name: String,
    pub nbd_listen: SocketAddr,
    /// The stream listener; `None` when the agent accepts no protected host.
    pub data_listen: Option<SocketAddr>,
    pub admin_listen: Option<SocketAddr>,
    pub security: Security,
    pub disks: Vec<DiskConfig>,
    pub peers: Vec<PeerConfig>,
    /// Protected host → storage path.
    pub allow: BTreeMap<String, PathBuf>,
    /// How often dirty bitmaps are persisted.
    pub persist_every: Duration,
    /// How long a clean shutdown waits for queued records to be acknowledged.
    pub drain_timeout: Duration,
    pub sync: SyncSettings,
    /// `peer_timeout_secs`, when set.
    pub peer_timeout: Option<Duration>,
    /// `away_bound_secs`: for every peer without its own.
    pub away_bound: Duration,
    /// Root of the storage of protected hosts accepted under the manager (`storage`).
    pub storage: PathBuf,
    /// VMs declared in the file (their disks are also in `disks`).
    pub vms: Vec<VmConfig>,
}

/// A VM declared in the file, resolved (its disks are protected disks in `disks`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    /// Names of its disks, in order.
    pub disks: Vec<String>,
    pub boot: Option<Boot>,
    pub nics: Vec<Nic>,
}

fn addr(field: &str, value: &str) -> Result<SocketAddr, AgentConfigError> {
    value.parse().map_err(|_| AgentConfigError::Address {
        field: field.into(),
        value: value.into(),
    })
}

/// Names used in file names and exports: letters, digits, `-`, `_`, `.`; no leading dot.
fn check_name(field: &str, name: &str) -> Result<(), AgentConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("`{name}`: use 1–128 letters, digits, '-', '_' or '.' (not leading)"),
        ))
    }
}

fn sync_settings(file: &AgentSection) -> Result<SyncSettings, AgentConfigError> {
    let rate_limit = file.sync_rate_limit.map(|b| b.0);
    if rate_limit == Some(0) {
        return Err(invalid(
            "sync_rate_limit",
            "must be above zero (omit it for no limit)",
        ));
    }
    let max_concurrent = file.max_concurrent_syncs.unwrap_or(2);
    if max_concurrent == 0 {
        return Err(invalid("max_concurrent_syncs", "must be at least 1"));
    }
    let block = file.sync_block_size.map_or(4096, |b| b.0);
    let chunk = file.sync_chunk_size.map_or(1 << 20, |b| b.0);
    if block == 0 || chunk % block != 0 {
        return Err(invalid(
            "sync_chunk_size",
            "must be a multiple of sync_block_size",
        ));
    }
    let hash = HashConfig {
        block_size: u32::try_from(block).map_err(|_| invalid("sync_block_size", "too large"))?,
        chunk_blocks: u32::try_from(chunk / block)
            .map_err(|_| invalid("sync_chunk_size", "too large"))?,
    };
    hash.validate()
        .map_err(|e| invalid("sync_block_size", e.to_string()))?;
    Ok(SyncSettings {
        rate_limit,
        max_concurrent,
        hash,
    })
}

fn compression(field: &str, v: Option<&str>) -> Result<Compression, AgentConfigError> {
    match v.unwrap_or("none") {
        "none" => Ok(Compression::None),
        "zstd" => Ok(Compression::Zstd),
        "lz4" => Ok(Compression::Lz4),
        other => Err(invalid(
            field,
            format!("`{other}` is not one of none, zstd, lz4"),
        )),
    }
}

impl AgentConfig {
    /// An agent on loopback for labs, tests and benchmarks: `section` is the body of an
    /// `[agent]` section, data under `dir/<host>`, the site named after the host, NBD
    /// exports on a port the OS picks; mutual TLS with the certificates in `tls_dir`, or
    /// plain TCP without.
    pub fn loopback(
        dir: &Path,
        host: &str,
        section: &str,
        tls_dir: Option<PathBuf>,
    ) -> Result<AgentConfig, AgentConfigError> {
        let file: AgentSection =
            toml::from_str(section).map_err(|e| invalid("[agent]", e.to_string()))?;
        AgentConfig::resolve(
            &file,
            AgentFlags {
                data_dir: Some(dir.join(host)),
                site: Some(host.into()),
                host_name: Some(host.into()),
                nbd_listen: Some("127.0.0.1:0".into()),
                insecure: tls_dir.is_none(),
                tls_dir,
                ..AgentFlags::default()
            },
        )
    }
}

impl AgentConfig {
    /// Flags over the file over defaults; checks every rule.
    pub fn resolve(file: &AgentSection, flags: AgentFlags) -> Result<Self, AgentConfigError> {
        let data_dir = flags
            .data_dir
            .or_else(|| file.data_dir.clone())
            .ok_or(AgentConfigError::Missing("--data-dir"))?;
        let host_name = flags
            .host_name
            .or_else(|| file.host_name.clone())
            .ok_or(AgentConfigError::Missing("--host-name"))?;
        check_name("host_name", &host_name)?;
        let site = flags
            .site
            .or_else(|| file.site.clone())
            .ok_or(AgentConfigError::Missing("--site"))?;
        if site.trim().is_empty() {
            return Err(invalid("site", "must not be empty"));
        }
        let nbd_listen = addr(
            "nbd_listen",
            flags
                .nbd_listen
                .as_deref()
                .or(file.nbd_listen.as_deref())
                .unwrap_or(DEFAULT_NBD_LISTEN),
        )?;
        let allow: BTreeMap<String, PathBuf> = file
            .allow
            .iter()
            .map(|a| (a.host_name.clone(), a.storage.clone()))
            .collect();
        if allow.len() != file.allow.len() {
            return Err(invalid("allow", "a host is listed twice"));
        }
        for (i, a) in file.allow.iter().enumerate() {
            check_name(&format!("allow[{i}].host_name"), &a.host_name)?;
        }
        let data_listen = match flags.data_listen.as_deref().or(file.data_listen.as_deref()) {
            Some(v) => Some(addr("data_listen", v)?),
            None if !allow.is_empty() => Some(addr("data_listen", DEFAULT_DATA_LISTEN)?),
            None => None,
        };
        let admin_listen = match flags
            .admin_listen
            .as_deref()
            .or(file.admin_listen.as_deref())
        {
            Some(v) => {
                let a = addr("admin_listen", v)?;
                // The admin endpoint has no authentication: it must not leave the host.
                if !a.ip().is_loopback() {
                    return Err(invalid(
                        "admin_listen",
                        "must be a loopback address (the admin endpoint has no authentication)",
                    ));
                }
                Some(a)
            }
            None => None,
        };
        let security = if flags.insecure || file.insecure {
            Security::Insecure
        } else {
            let dir = flags.tls_dir.or_else(|| file.tls_dir.clone());
            let from_dir = dir.as_deref().map(|d| TlsFiles::in_dir(d, &host_name));
            let pick = |one: &Option<PathBuf>, f: fn(&TlsFiles) -> &PathBuf, name: &'static str| {
                one.clone()
                    .or_else(|| from_dir.as_ref().map(|t| f(t).clone()))
                    .ok_or(AgentConfigError::Missing(name))
            };
            Security::Tls(TlsFiles {
                ca: pick(
                    &file.tls_ca,
                    |t| &t.ca,
                    "--tls-dir (or tls_ca), or --insecure",
                )?,
                cert: pick(&file.tls_cert, |t| &t.cert, "--tls-dir (or tls_cert)")?,
                key: pick(&file.tls_key, |t| &t.key, "--tls-dir (or tls_key)")?,
            })
        };
        let mut peers = Vec::new();
        let mut peer_names = BTreeSet::new();
        for (i, p) in file.peers.iter().enumerate() {
            let f = |s: &str| format!("peers[{i}].{s}");
            check_name(&f("host_name"), &p.host_name)?;
            if !peer_names.insert(p.host_name.clone()) {
                return Err(invalid(f("host_name"), "listed twice"));
            }
            if p.host_name == host_name {
                return Err(invalid(f("host_name"), "a host cannot replicate to itself"));
            }
            let queue_memory = p.queue_memory.map_or(DEFAULT_QUEUE_MEMORY, |b| b.0);
            if queue_memory == 0 {
                return Err(invalid(f("queue_memory"), "must be above zero"));
            }
            let bandwidth_limit = p.bandwidth_limit.map(|b| b.0);
            if bandwidth_limit == Some(0) {
                return Err(invalid(
                    f("bandwidth_limit"),
                    "must be above zero (omit it for no limit)",
                ));
            }
            peers.push(PeerConfig {
                host_name: p.host_name.clone(),
                address: addr(&f("address"), &p.address)?,
                compression: compression(&f("compression"), p.compression.as_deref())?,
                bandwidth_limit,
                queue_memory: usize::try_from(queue_memory)
                    .map_err(|_| invalid(f("queue_memory"), "too large"))?,
                spill_limit: usize::try_from(p.spill_limit.map_or(DEFAULT_SPILL_LIMIT, |b| b.0))
                    .map_err(|_| invalid(f("spill_limit"), "too large"))?,
                away_bound: Duration::from_secs(
                    p.away_bound_secs
                        .or(file.away_bound_secs)
                        .unwrap_or(DEFAULT_AWAY_BOUND_SECS),
                ),
            });
        }
        let mut disks = Vec::new();
        let mut names = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for (i, d) in file.disks.iter().enumerate() {
            let f = |s: &str| format!("disks[{i}].{s}");
            check_name(&f("name"), &d.name)?;
            if !names.insert(d.name.clone()) {
                return Err(invalid(f("name"), format!("`{}` is listed twice", d.name)));
            }
            if !ids.insert(d.id) {
                return Err(invalid(
                    f("id"),
                    format!("{} is used by another disk", d.id),
                ));
            }
            if d.size.0 == 0 || d.size.0 % 512 != 0 {
                return Err(invalid(
                    f("size"),
                    "must be a non-zero multiple of 512 bytes",
                ));
            }
            if let Some(r) = &d.recovery_host {
                if !peer_names.contains(r) {
                    return Err(invalid(
                        f("recovery_host"),
                        format!("`{r}` is not among [[agent.peers]]"),
                    ));
                }
            }
            let group = d.group.clone().unwrap_or_else(|| DEFAULT_GROUP.to_string());
            check_name(&f("group"), &group)?;
            disks.push(DiskConfig {
                name: d.name.clone(),
                id: d.id,
                size: d.size.0,
                path: d
                    .path
                    .clone()
                    .unwrap_or_else(|| data_dir.join("disks").join(format!("{}.img", d.name))),
                group,
                recovery_host: d.recovery_host.clone(),
                resync: d.resync.unwrap_or(ResyncPolicy::Automatic),
                priority: d.priority.unwrap_or(Priority::Medium),
            });
        }
        let vms = resolve_vms(file, &data_dir, &mut disks, &mut names, &mut ids)?;
        let sync = sync_settings(file)?;
        let peer_timeout = match file.peer_timeout_secs {
            Some(s) if s < 2 => {
                return Err(invalid(
                    "peer_timeout_secs",
                    "must be at least 2 (peers ping every second)",
                ))
            }
            s => s.map(Duration::from_secs),
        };
        let storage = file
            .storage
            .clone()
            .unwrap_or_else(|| data_dir.join("replicas"));
        Ok(AgentConfig {
            storage,
            data_dir,
            site,
            host_name,
            nbd_listen,
            data_listen,
            admin_listen,
            security,
            disks,
            peers,
            allow,
            persist_every: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(10),
            sync,
            peer_timeout,
            away_bound: Duration::from_secs(
                file.away_bound_secs.unwrap_or(DEFAULT_AWAY_BOUND_SECS),
            ),
            vms,
        })
    }

    /// Dirty bitmaps and activity logs.
    pub fn dirty_dir(&self) -> PathBuf {
        self.data_dir.join("dirty")
    }

    /// Per-disk stream state (the sequence epoch).
    pub fn state_dir(&self) -> PathBuf {
        self.data_dir.join("state")
    }

    /// The NBD listener's unix socket.
    pub fn nbd_socket(&self) -> PathBuf {
        nbd_socket_path(&self.data_dir)
    }

    /// Spill logs of the stream to `peer`.
    pub fn spill_dir(&self, peer: &str) -> PathBuf {
        self.data_dir.join("spill").join(peer)
    }

    /// `endpoints.json` and other files of the running process.
    pub fn run_dir(&self) -> PathBuf {
        self.data_dir.join("run")
    }
}

/// VM names (shown to operators, kept in `state/vms.json`, never a file name): 1–128
/// bytes, no path separator or control character, no surrounding blanks.
pub fn check_vm_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.trim() == name
        && !name
            .chars()
            .any(|c| c == '/' || c == '\\' || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{}`: a VM name has 1–128 bytes, no '/', '\\' or control character, no leading or trailing blank",
            name.escape_debug()
        ))
    }
}

/// Disk names (export and file names): letters, digits, `-`, `_`, `.`; no leading dot.
pub fn check_disk_name(name: &str) -> Result<(), String> {
    check_name("name", name).map_err(|e| match e {
        AgentConfigError::Invalid { reason, .. } => reason,
        other => other.to_string(),
    })
}

/// `[[agent.vms]]`: checked, and each VM disk added to `disks` like a `[[disks]]` entry
/// (default group, no recovery host: the manager's desired state protects it).
fn resolve_vms(
    file: &AgentSection,
    data_dir: &Path,
    disks: &mut Vec<DiskConfig>,
    names: &mut BTreeSet<String>,
    ids: &mut BTreeSet<u64>,
) -> Result<Vec<VmConfig>, AgentConfigError> {
    let mut vms = Vec::new();
    let mut vm_names = BTreeSet::new();
    // A `[[disks]]` entry appears as a VM of its own name: no VM may take that name.
    let bare: BTreeSet<String> = disks.iter().map(|d| d.name.clone()).collect();
    for (i, v) in file.vms.iter().enumerate() {
        let f = |s: &str| format!("vms[{i}].{s}");
        check_vm_name(&v.name).map_err(|r| invalid(f("name"), r))?;
        if bare.contains(&v.name) {
            return Err(invalid(
                f("name"),
                format!(
                    "`{}` is a [[disks]] entry, which appears as a VM of that name",
                    v.name
                ),
            ));
        }
        if !vm_names.insert(v.name.clone()) {
            return Err(invalid(f("name"), format!("`{}` is listed twice", v.name)));
        }
        if v.cpus == 0 || v.cpus > 1024 {
            return Err(invalid(f("cpus"), "must be 1 to 1024"));
        }
        if v.memory_mib == 0 {
            return Err(invalid(f("memory_mib"), "must be above zero"));
        }
        let mut own = Vec::new();
        for (j, d) in v.disks.iter().enumerate() {
            let f = |s: &str| format!("vms[{i}].disks[{j}].{s}");
            check_name(&f("name"), &d.name)?;
            if !names.insert(d.name.clone()) {
                return Err(invalid(
                    f("name"),
                    format!("disk `{}` is used by another disk or VM", d.name),
                ));
            }
            if !ids.insert(d.id) {
                return Err(invalid(
                    f("id"),
                    format!("{} is used by another disk", d.id),
                ));
            }
            if d.size.0 == 0 || d.size.0 % 512 != 0 {
                return Err(invalid(
                    f("size"),
                    "must be a non-zero multiple of 512 bytes",
                ));
            }
            disks.push(DiskConfig {
                name: d.name.clone(),
                id: d.id,
                size: d.size.0,
                path: data_dir.join("disks").join(format!("{}.img", d.name)),
                group: DEFAULT_GROUP.to_string(),
                recovery_host: None,
                resync: ResyncPolicy::Automatic,
                priority: Priority::Medium,
            });
            own.push(d.name.clone());
        }
        vms.push(VmConfig {
            name: v.name.clone(),
            cpus: v.cpus,
            memory_mib: v.memory_mib,
            disks: own,
            boot: v.boot.clone(),
            nics: v.nics.clone(),
        });
    }
    Ok(vms)
}

/// Longest path a unix socket may have (`sun_path` holds 108 bytes with the NUL).
pub const MAX_UNIX_PATH: usize = 108;

/// `<data-dir>/run/nbd.sock`: the agent's NBD listener on a unix socket.
pub fn nbd_socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("run").join("nbd.sock")
}

/// Where the journal and the replica disk of `disk_id` from a protected host live under
/// its storage path (the receiver's layout).
pub fn received_disk_dir(storage: &Path, disk_id: u64) -> PathBuf {
    storage.join(format!("disk-{disk_id:016x}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(toml_text: &str) -> AgentSection {
        toml::from_str(toml_text).unwrap()
    }

    fn flags() -> AgentFlags {
        AgentFlags {
            data_dir: Some("/tmp/a".into()),
            site: Some("prod".into()),
            host_name: Some("h1".into()),
            insecure: true,
            ..AgentFlags::default()
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64KiB").unwrap(), 64 << 10);
        assert_eq!(parse_size("4 MiB").unwrap(), 4 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert!(parse_size("2 GB").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999TiB").is_err());
        let s = section("[[disks]]\nname='a'\nid=1\nsize='1 MiB'\n");
        assert_eq!(s.disks[0].size, ByteSize(1 << 20));
    }

    #[test]
    fn a_full_section_resolves() {
        let s = section(
            r#"
            nbd_listen = "127.0.0.1:0"
            admin_listen = "127.0.0.1:0"
            [[disks]]
            name = "web-0"
            id = 7
            size = "64 MiB"
            group = "web"
            recovery_host = "r1"
            [[disks]]
            name = "scratch"
            id = 8
            size = 1048576
            [[peers]]
            host_name = "r1"
            address = "127.0.0.1:9000"
            compression = "lz4"
            queue_memory = "8 MiB"
            [[allow]]
            host_name = "p9"
            storage = "/srv/p9"
            "#,
        );
        let c = AgentConfig::resolve(&s, flags()).unwrap();
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].path, PathBuf::from("/tmp/a/disks/web-0.img"));
        assert_eq!(c.disks[1].group, DEFAULT_GROUP);
        assert_eq!(c.peers[0].compression, Compression::Lz4);
        assert_eq!(c.peers[0].queue_memory, 8 << 20);
        assert_eq!(c.data_listen.map(|a| a.port()), Some(8471));
        assert_eq!(c.security, Security::Insecure);
    }

    #[test]
    fn rules_are_checked_before_anything_opens() {
        let bad = [
            ("[[disks]]\nname='a'\nid=1\nsize=1000\n", "disks[0].size"),
            ("[[disks]]\nname='../x'\nid=1\nsize=512\n", "disks[0].name"),
            (
                "[[disks]]\nname='a'\nid=1\nsize=512\n[[disks]]\nname='b'\nid=1\nsize=512\n",
                "disks[1].id",
            ),
            (
                "[[disks]]\nname='a'\nid=1\nsize=512\nrecovery_host='nobody'\n",
                "disks[0].recovery_host",
            ),
            (
                "[[peers]]\nhost_name='h1'\naddress='127.0.0.1:1'\n",
                "peers[0].host_name",
            ),
            (
                "[[peers]]\nhost_name='r'\naddress='nowhere'\n",
                "peers[0].address",
            ),
            (
                "[[peers]]\nhost_name='r'\naddress='127.0.0.1:1'\ncompression='gzip'\n",
                "peers[0].compression",
            ),
            ("admin_listen = '0.0.0.0:1'\n", "admin_listen"),
        ];
        for (text, field) in bad {
            let e = AgentConfig::resolve(&section(text), flags()).unwrap_err();
            assert!(e.to_string().contains(field), "{text}: {e}");
        }
        assert!(
            toml::from_str::<AgentSection>("[[disks]]\nname='a'\nid=1\nsize=512\nsz=1\n").is_err()
        );
    }

    #[test]
    fn tls_is_the_default_and_needs_files() {
        let mut f = flags();
        f.insecure = false;
        let e = AgentConfig::resolve(&AgentSection::default(), f.clone()).unwrap_err();
        assert!(e.to_string().contains("--insecure"), "{e}");
        f.tls_dir = Some("/certs".into());
        let c = AgentConfig::resolve(&AgentSection::default(), f).unwrap();
        assert_eq!(
            c.security,
            Security::Tls(TlsFiles::in_dir(Path::new("/certs"), "h1"))
        );
    }
    #[test]
    fn vm_sections_resolve_into_protected_disks_with_their_rules() {
        let c = AgentConfig::resolve(
            &section(
                "[[disks]]\nname='bare'\nid=1\nsize=512\n[[vms]]\nname='web - 1'\ndisks=[{name='w0', id=2, size='1 MiB'}]\n",
            ),
            flags(),
        )
        .unwrap();
        assert_eq!(c.vms.len(), 1);
        assert_eq!((c.vms[0].cpus, c.vms[0].memory_mib), (1, 1024));
        assert_eq!(c.vms[0].disks, ["w0"]);
        let w0 = c.disks.iter().find(|d| d.name == "w0").unwrap();
        assert_eq!((w0.id, w0.size), (2, 1 << 20));
        assert_eq!(w0.path, PathBuf::from("/tmp/a/disks/w0.img"));
        let bad = [
            ("[[disks]]\nname='a'\nid=1\nsize=512\n[[vms]]\nname='v'\ndisks=[{name='a', id=2, size=512}]\n", "vms[0].disks[0].name"),
            ("[[disks]]\nname='a'\nid=1\nsize=512\n[[vms]]\nname='v'\ndisks=[{name='b', id=1, size=512}]\n", "vms[0].disks[0].id"),
            ("[[disks]]\nname='a'\nid=1\nsize=512\n[[vms]]\nname='a'\n", "vms[0].name"),
            ("[[vms]]\nname='v'\n[[vms]]\nname='v'\n", "vms[1].name"),
            ("[[vms]]\nname='a/b'\n", "vms[0].name"),
            ("[[vms]]\nname='v'\ncpus=0\n", "vms[0].cpus"),
            ("[[vms]]\nname='v'\ndisks=[{name='x', id=3, size=100}]\n", "vms[0].disks[0].size"),
        ];
        for (text, field) in bad {
            let e = AgentConfig::resolve(&section(text), flags()).unwrap_err();
            assert!(e.to_string().contains(field), "{text}: {e}");
        }
    }
}
