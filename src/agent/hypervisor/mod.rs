//! The hypervisor seen from the agent: the [`HypervisorDriver`] trait (inventory, VM
//! creation, power, quiesce/thaw for app-consistent checkpoints, serial console), its
//! two drivers, and [`HostVms`], which keeps a VM's power state and its disks' NBD
//! exports in step (a VM's disks are the agent's protected disks, served only while it
//! runs).
//!
//! - [`catalog`]: [`VmCatalog`], the VMs of a host, their definitions and power states,
//!   persisted in `<data-dir>/state/vms.json`. On its own it is the simulated driver
//!   (`hypervisor = "sim"`): power is a flag, quiesce always succeeds.
//! - [`qemu`]: [`QemuHypervisor`] (`hypervisor = "qemu"`): the same catalog, and every
//!   running VM a `qemu-system-x86_64` process the agent supervises over QMP.

pub mod catalog;
pub mod qemu;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::agent::crashsafe;
use crate::agent::host::config::{DiskConfig, DEFAULT_GROUP};
use crate::agent::host::{Agent, AgentConfig, AgentError};
use crate::model::settings::{Priority, ResyncPolicy};
use crate::proto::control::{
    AgentEvent, Boot, ConsoleTail, Inventory, InventoryDisk, InventoryVm, NewDisk, Nic, PowerState,
    QuiesceMethod,
};

pub use catalog::VmCatalog;
pub use qemu::{QemuHypervisor, QemuSettings};

/// Errors of the hypervisor driver and of the VM operations around it.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("no VM named `{0}`")]
    NoSuchVm(String),
    #[error("a VM named `{0}` already exists")]
    DuplicateVm(String),
    #[error("a disk named `{0}` already exists on this host")]
    DuplicateDisk(String),
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("quiesce of VM `{vm}` failed: {reason}")]
    Quiesce { vm: String, reason: String },
    #[error("VM state {}: {reason}", path.display())]
    State { path: PathBuf, reason: String },
    #[error(transparent)]
    Persist(#[from] crashsafe::CrashSafeError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("background task failed: {0}")]
    Task(String),
    #[error("VM `{0}` is prepared for planned failover: it cannot be powered on until the failover is released")]
    Prepared(String),
    #[error("VM `{0}` belongs to a recovery: end the recovery instead")]
    Recovered(String),
    #[error("this hypervisor driver cannot {0}")]
    Unsupported(&'static str),
    /// QEMU refused to start the VM or stopped answering; `reason` carries what it said.
    #[error("QEMU, VM `{vm}`: {reason}")]
    Qemu { vm: String, reason: String },
    #[error("hypervisor settings: {0}")]
    Settings(String),
}

pub(crate) fn invalid(field: impl Into<String>, reason: impl Into<String>) -> HypervisorError {
    HypervisorError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

pub(crate) fn event(
    kind: &str,
    vm: &str,
    message: String,
    details: serde_json::Value,
) -> AgentEvent {
    AgentEvent {
        kind: kind.into(),
        disk_id: None,
        vm: Some(vm.to_string()),
        message,
        details,
        at_ms: crate::agent::stream::now_ms(),
    }
}

/// A VM to create.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub cpus: u32,
    pub memory_mib: u64,
    #[serde(default)]
    pub disks: Vec<NewDisk>,
    /// How it boots (needed by a real hypervisor; the simulated one only records it).
    #[serde(default)]
    pub boot: Option<Boot>,
    #[serde(default)]
    pub nics: Vec<Nic>,
}

/// The outcome of a power request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PowerChange {
    pub vm: InventoryVm,
    /// `false` when the VM already was in the requested state.
    pub changed: bool,
}

/// What the agent needs of a hypervisor. Methods may block (state files, a real
/// hypervisor's API): call them off the reactor.
pub trait HypervisorDriver: Send + Sync + 'static {
    /// Every VM on the host.
    fn inventory(&self) -> Inventory;
    /// A new VM with new (sparse, zeroed) disks, powered on. Disk ids are chosen here.
    fn create_vm(&self, spec: &VmSpec) -> Result<InventoryVm, HypervisorError>;
    fn power_on(&self, vm: &str) -> Result<PowerChange, HypervisorError>;
    fn power_off(&self, vm: &str) -> Result<PowerChange, HypervisorError>;
    /// Quiesces the guests for a checkpoint, within `within`: the guest agent freezes
    /// the filesystems (application consistent) or, without one, the VM's CPUs pause
    /// (crash consistent); the answer says which one the weakest VM got. Every VM or
    /// none (on error the ones already quiesced are thawed).
    fn quiesce(&self, vms: &[String], within: Duration) -> Result<QuiesceMethod, HypervisorError>;
    /// Undoes [`HypervisorDriver::quiesce`]. Never fails: a guest that cannot be thawed
    /// is the hypervisor's problem to report.
    fn thaw(&self, vms: &[String]);
    /// Events worth recording at the manager (`vm_created`, `vm_power`, and from a real
    /// hypervisor `vm_shutdown`, `vm_stopped`, `vm_resumed`, `vm_block_io_error`).
    fn subscribe(&self) -> broadcast::Receiver<AgentEvent>;
    /// The last `max_bytes` of the VM's serial console log.
    fn console(&self, _vm: &str, _max_bytes: u64) -> Result<ConsoleTail, HypervisorError> {
        Err(HypervisorError::Unsupported(
            "keep a serial console (the simulated driver has no guests)",
        ))
    }
    /// After the agent (and its NBD listener) started: brings the VMs whose recorded
    /// state is `on` back to running (a real hypervisor re-attaches to the guests that
    /// survived the agent, and starts the others). Per VM, what failed.
    fn resume(&self) -> Vec<(String, HypervisorError)> {
        Vec::new()
    }
    /// A VM brought up by a recovery, powered off: its disks (`spec.disks`, named by
    /// their NBD export) are journal views served by `agent::recovery`, not local disks;
    /// their disk ids are allocated now and kept if the recovery is committed. The same
    /// VM again (same name and disks) answers the existing one.
    fn create_recovered_vm(&self, _spec: &VmSpec) -> Result<InventoryVm, HypervisorError> {
        Err(HypervisorError::Unsupported("create recovered VMs"))
    }
    /// Removes a VM [`HypervisorDriver::create_recovered_vm`] made (false: no such VM).
    fn remove_recovered_vm(&self, _name: &str) -> Result<bool, HypervisorError> {
        Err(HypervisorError::Unsupported("remove recovered VMs"))
    }
    /// A committed recovery: the recovered VM becomes a regular VM of this host whose
    /// disks are local disks (same names and ids). Idempotent.
    fn adopt_recovered_vm(&self, _name: &str) -> Result<InventoryVm, HypervisorError> {
        Err(HypervisorError::Unsupported("adopt recovered VMs"))
    }
    /// Locks (or unlocks) a VM against power-on ("Prepared for planned failover").
    fn set_prepared(&self, _name: &str, _prepared: bool) -> Result<InventoryVm, HypervisorError> {
        Err(HypervisorError::Unsupported(
            "lock VMs for a planned failover",
        ))
    }
    /// Reverse protection: removes a VM whose disks all became pre-seeded replicas
    /// (`SeedReverse`). `Ok(false)` if there is no such VM (already removed).
    fn remove_seeded_vm(&self, _name: &str) -> Result<bool, HypervisorError> {
        Err(HypervisorError::Unsupported("remove VMs"))
    }
}

/// The protected disk a VM disk is: `<data-dir>/disks/<name>.img`, default group, not
/// replicated until the manager's desired state says where.
pub fn vm_disk_config(data_dir: &Path, disk: &InventoryDisk) -> DiskConfig {
    DiskConfig {
        name: disk.name.clone(),
        id: disk.disk_id,
        size: disk.size_bytes,
        path: data_dir.join("disks").join(format!("{}.img", disk.name)),
        group: DEFAULT_GROUP.to_string(),
        recovery_host: None,
        resync: ResyncPolicy::Automatic,
        priority: Priority::Medium,
    }
}

/// The VMs of a running agent: the driver and the agent's exports kept in step, one VM
/// operation at a time (a power-off racing a power-on could otherwise leave a running
/// VM without its disks). Shared by the control channel and the admin endpoint.
pub struct HostVms {
    driver: Arc<dyn HypervisorDriver>,
    agent: Arc<Agent>,
    /// Shared with `recoveries`: one VM operation at a time, recoveries included.
    ops: Arc<tokio::sync::Mutex<()>>,
    recoveries: Arc<crate::agent::recovery::Recoveries>,
}

impl std::fmt::Debug for HostVms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostVms").finish_non_exhaustive()
    }
}

impl HostVms {
    /// Also restores the recoveries persisted under `state/recoveries/` (in the
    /// background when called inside a runtime; every recovery call waits for it).
    pub fn new(driver: Arc<dyn HypervisorDriver>, agent: Arc<Agent>) -> HostVms {
        let ops = Arc::new(tokio::sync::Mutex::new(()));
        let recoveries = crate::agent::recovery::Recoveries::new(
            Arc::clone(&driver),
            Arc::clone(&agent),
            Arc::clone(&ops),
        );
        let vms = HostVms {
            driver,
            agent,
            ops,
            recoveries,
        };
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let r = Arc::clone(&vms.recoveries);
            let d = Arc::clone(&vms.driver);
            rt.spawn(async move {
                r.restored().await;
                // Guests come back once every disk they need is served again (recovered
                // VMs' exports are the restored recoveries').
                let failed = tokio::task::spawn_blocking(move || d.resume()).await;
                for (vm, e) in failed.unwrap_or_default() {
                    tracing::error!(%vm, error = %e, "VM not resumed after the agent started");
                }
            });
            rt.spawn(withdraw_when_guests_stop(
                vms.driver.subscribe(),
                Arc::clone(&vms.driver),
                Arc::clone(&vms.agent),
                Arc::clone(&vms.recoveries),
                Arc::clone(&vms.ops),
            ));
        }
        vms
    }

    /// Quiesces one VM outside a checkpoint round (an operator taking a copy of its
    /// disks): see [`HypervisorDriver::quiesce`]. Undo with [`HostVms::thaw`].
    pub async fn quiesce(
        &self,
        vm: &str,
        within: Duration,
    ) -> Result<QuiesceMethod, HypervisorError> {
        let vms = vec![vm.to_string()];
        self.blocking(move |d| d.quiesce(&vms, within)).await
    }

    pub async fn thaw(&self, vm: &str) -> Result<(), HypervisorError> {
        let vms = vec![vm.to_string()];
        self.blocking(move |d| {
            d.thaw(&vms);
            Ok(())
        })
        .await
    }

    /// The last `max_bytes` of a VM's serial console.
    pub async fn console(&self, vm: &str, max_bytes: u64) -> Result<ConsoleTail, HypervisorError> {
        let vm = vm.to_string();
        self.blocking(move |d| d.console(&vm, max_bytes)).await
    }

    /// The recoveries this host runs (recovery side) and the planned-failover locks.
    pub fn recoveries(&self) -> &Arc<crate::agent::recovery::Recoveries> {
        &self.recoveries
    }

    pub fn driver(&self) -> &Arc<dyn HypervisorDriver> {
        &self.driver
    }

    pub fn agent(&self) -> &Arc<Agent> {
        &self.agent
    }

    pub fn inventory(&self) -> Inventory {
        self.driver.inventory()
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn HypervisorDriver) -> Result<T, HypervisorError> + Send + 'static,
    ) -> Result<T, HypervisorError> {
        let d = Arc::clone(&self.driver);
        tokio::task::spawn_blocking(move || f(d.as_ref()))
            .await
            .map_err(|e| HypervisorError::Task(e.to_string()))?
    }

    /// Creates the VM, then opens and exports its disks. A disk that fails to open stays
    /// in the VM (it is opened again at the next start) and the error is returned.
    pub async fn create(&self, spec: VmSpec) -> Result<InventoryVm, HypervisorError> {
        let _one = self.ops.lock().await;
        let vm = self.blocking(move |d| d.create_vm(&spec)).await?;
        let data_dir = self.agent.config().data_dir.clone();
        for disk in &vm.disks {
            self.agent.add_disk(vm_disk_config(&data_dir, disk)).await?;
        }
        // A new VM runs: its guest starts now that its disks are served.
        let n = vm.name.clone();
        Ok(self.blocking(move |d| d.power_on(&n)).await?.vm)
    }

    /// Powers a VM on (its exports served first, so the guest finds its disks) or off
    /// (the guest stops, then its exports are withdrawn, in-flight requests drained).
    pub async fn set_power(
        &self,
        name: &str,
        power: PowerState,
    ) -> Result<PowerChange, HypervisorError> {
        // Recovered VMs re-created after a restart must be known before their power
        // changes (the restore takes the operations lock itself).
        self.recoveries.restored().await;
        let _one = self.ops.lock().await;
        let vm = self
            .driver
            .inventory()
            .vms
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| HypervisorError::NoSuchVm(name.to_string()))?;
        let n = name.to_string();
        match power {
            PowerState::On => {
                if vm.prepared_for_failover {
                    return Err(HypervisorError::Prepared(name.to_string()));
                }
                serve_disks(&self.agent, &self.recoveries, &vm, true).await?;
                let on = self.blocking(move |d| d.power_on(&n)).await;
                if on.is_err() {
                    // A guest that never started has no business with its disks.
                    if let Err(e) = serve_disks(&self.agent, &self.recoveries, &vm, false).await {
                        tracing::warn!(vm = name, error = %e, "exports of a VM that failed to start stay served");
                    }
                }
                on
            }
            PowerState::Off => {
                let change = self.blocking(move |d| d.power_off(&n)).await?;
                serve_disks(&self.agent, &self.recoveries, &vm, false).await?;
                Ok(change)
            }
        }
    }
}

/// Serves (or withdraws) the NBD exports of `vm`'s disks: a recovered VM's disks are its
/// recovery's exports, the others the agent's protected disks.
async fn serve_disks(
    agent: &Agent,
    recoveries: &crate::agent::recovery::Recoveries,
    vm: &InventoryVm,
    serve: bool,
) -> Result<(), HypervisorError> {
    for d in &vm.disks {
        if !recoveries.set_exported(&d.export, serve).await? {
            agent.set_exported(&d.export, serve).await?;
        }
    }
    Ok(())
}

/// A guest that powered itself off (or whose QEMU ended) leaves its disks: the exports
/// are withdrawn as a requested power-off would (requested ones are done by
/// [`HostVms::set_power`] itself).
async fn withdraw_when_guests_stop(
    mut events: broadcast::Receiver<AgentEvent>,
    driver: Arc<dyn HypervisorDriver>,
    agent: Arc<Agent>,
    recoveries: Arc<crate::agent::recovery::Recoveries>,
    ops: Arc<tokio::sync::Mutex<()>>,
) {
    loop {
        let ev = match events.recv().await {
            Ok(ev) => ev,
            Err(broadcast::error::RecvError::Lagged(_)) => continue,
            Err(broadcast::error::RecvError::Closed) => return,
        };
        let stopped_by_itself = ev.kind == "vm_power"
            && ev.details.get("state").and_then(|s| s.as_str()) == Some("off")
            && ev.details.get("cause").and_then(|s| s.as_str()) != Some("request");
        let Some(name) = ev.vm.filter(|_| stopped_by_itself) else {
            continue;
        };
        let _one = ops.lock().await;
        // Started again meanwhile: its disks are needed.
        let Some(vm) = driver
            .inventory()
            .vms
            .into_iter()
            .find(|v| v.name == name && v.power_state == PowerState::Off)
        else {
            continue;
        };
        if let Err(e) = serve_disks(&agent, &recoveries, &vm, false).await {
            tracing::warn!(vm = %name, error = %e, "exports of a stopped guest stay served");
        }
    }
}

/// Which hypervisor driver an agent runs.
#[derive(Debug, Clone)]
pub enum DriverChoice {
    Sim,
    Qemu(QemuSettings),
}

impl DriverChoice {
    /// `hypervisor = "sim" | "qemu"` (or `--hypervisor`) and `[agent.qemu]`.
    pub fn resolve(
        section: &crate::agent::host::config::AgentSection,
        flag: Option<&str>,
        data_dir: &Path,
    ) -> Result<DriverChoice, HypervisorError> {
        match flag.or(section.hypervisor.as_deref()).unwrap_or("sim") {
            "sim" => Ok(DriverChoice::Sim),
            "qemu" => Ok(DriverChoice::Qemu(QemuSettings::resolve(
                &section.qemu,
                data_dir,
            )?)),
            other => Err(HypervisorError::Settings(format!(
                "hypervisor `{other}`: expected `sim` or `qemu`"
            ))),
        }
    }
}

/// A started agent and its hypervisor driver; `catalog` is the driver's VM catalog
/// (the whole driver when simulated).
pub struct Started {
    pub agent: Arc<Agent>,
    pub driver: Arc<dyn HypervisorDriver>,
    pub catalog: Arc<VmCatalog>,
}

/// Starts an agent with the driver chosen: the run-time VMs' disks are opened with the
/// configuration's, and the disks of powered-off VMs are not served. With QEMU, guests
/// that survived a previous agent are re-attached now; the others whose state is `on`
/// start once [`HostVms`] has restored the recoveries ([`HypervisorDriver::resume`]).
pub async fn start_agent_with(
    cfg: AgentConfig,
    choice: DriverChoice,
) -> Result<Started, HypervisorError> {
    let mut cfg = crate::agent::host::without_seeded_disks(cfg)?;
    let c = cfg.clone();
    let catalog = tokio::task::spawn_blocking(move || VmCatalog::open(&c))
        .await
        .map_err(|e| HypervisorError::Task(e.to_string()))??;
    let catalog = Arc::new(catalog);
    for d in catalog.runtime_disks(&cfg.data_dir) {
        if !cfg.disks.iter().any(|c| c.name == d.name) {
            cfg.disks.push(d);
        }
    }
    let driver: Arc<dyn HypervisorDriver> = match choice {
        DriverChoice::Sim => Arc::clone(&catalog) as Arc<dyn HypervisorDriver>,
        DriverChoice::Qemu(settings) => {
            let c = Arc::clone(&catalog);
            tokio::task::spawn_blocking(move || QemuHypervisor::open(c, settings))
                .await
                .map_err(|e| HypervisorError::Task(e.to_string()))??
        }
    };
    let agent = Agent::start(cfg).await?;
    for disk in catalog.powered_off_disks() {
        // The export was served for the moment between start and here; a guest of a VM
        // that is off has no business writing, so this only matters to stray clients.
        if let Err(e) = agent.set_exported(&disk, false).await {
            tracing::warn!(%disk, error = %e, "cannot withdraw the export of a powered-off VM's disk");
        }
    }
    Ok(Started {
        agent,
        driver,
        catalog,
    })
}

/// [`start_agent_with`] the simulated driver.
pub async fn start_agent(
    cfg: AgentConfig,
) -> Result<(Arc<Agent>, Arc<VmCatalog>), HypervisorError> {
    let s = start_agent_with(cfg, DriverChoice::Sim).await?;
    Ok((s.agent, s.catalog))
}
