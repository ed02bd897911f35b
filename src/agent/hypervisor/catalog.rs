//! [`VmCatalog`]: the VMs of a host, their definitions and power states. On its own it
//! is the simulated hypervisor driver (`hypervisor = "sim"`: power is a flag, quiesce
//! always succeeds); the QEMU driver keeps its VMs in one too.
//!
//! The catalog owns `<data-dir>/state/vms.json`: VMs created at run time, every VM's
//! power state and the next free disk id, replaced crash-safely on every change. VMs
//! come from three places: `[[agent.vms]]` (their definition is the file's, their power
//! state is remembered), `[[agent.disks]]` entries that belong to no VM (each shown as a
//! VM of the disk's name), and VMs created at run time (kept whole in the state file).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use super::{
    event, invalid, vm_disk_config, HypervisorDriver, HypervisorError, PowerChange, VmSpec,
};
use crate::agent::crashsafe;
use crate::agent::host::config::{check_disk_name, check_vm_name, DiskConfig};
use crate::agent::host::AgentConfig;
use crate::proto::control::{
    AgentEvent, Boot, Inventory, InventoryDisk, InventoryVm, Nic, PowerState, QuiesceMethod,
};

/// Largest disk (64 TiB): a bound on what a request may make us allocate.
const MAX_DISK_SIZE: u64 = 64 << 40;
/// Most disks per VM.
const MAX_DISKS_PER_VM: usize = 64;

/// Where a simulated VM's definition comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Origin {
    /// `[[agent.vms]]`: the file defines it; only its power state is ours.
    Config,
    /// A `[[agent.disks]]` entry of no VM, shown as a VM of the disk's name.
    Disk,
    /// Created at run time: kept whole in the state file.
    Runtime,
    /// Brought up by a recovery, not committed yet: kept whole in the state file; its
    /// disks are the recovery's NBD exports (`agent::recovery`), not opened as local disks.
    Recovered,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct DiskRecord {
    name: String,
    id: u64,
    size: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VmRecord {
    name: String,
    origin: Origin,
    cpus: u32,
    memory_mib: u64,
    power_state: PowerState,
    disks: Vec<DiskRecord>,
    /// Locked against power-on by a planned failover (`PrepareFailover`).
    #[serde(default)]
    prepared: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    boot: Option<Boot>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    nics: Vec<Nic>,
}

impl VmRecord {
    fn inventory(&self) -> InventoryVm {
        InventoryVm {
            name: self.name.clone(),
            power_state: self.power_state,
            cpus: self.cpus,
            memory_mib: self.memory_mib,
            disks: self
                .disks
                .iter()
                .map(|d| InventoryDisk {
                    disk_id: d.id,
                    name: d.name.clone(),
                    size_bytes: d.size,
                    export: d.name.clone(),
                })
                .collect(),
            prepared_for_failover: self.prepared,
            boot: self.boot.clone(),
            nics: self.nics.clone(),
        }
    }
}

/// `state/vms.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StateFile {
    /// Every disk id below it has been handed out (ids are never reused, even if a
    /// configuration entry disappears).
    next_disk_id: u64,
    vms: Vec<VmRecord>,
}

impl StateFile {
    /// Adds the VM `spec` describes (its name is free): new disk ids for its disks,
    /// whose names must be unused on the host.
    fn add(
        &mut self,
        spec: &VmSpec,
        origin: Origin,
        power_state: PowerState,
    ) -> Result<InventoryVm, HypervisorError> {
        if let Some(d) = spec.disks.iter().find(|d| {
            self.vms
                .iter()
                .flat_map(|v| &v.disks)
                .any(|o| o.name == d.name)
        }) {
            return Err(HypervisorError::DuplicateDisk(d.name.clone()));
        }
        let mut disks = Vec::new();
        for d in &spec.disks {
            let id = self.next_disk_id;
            self.next_disk_id = id
                .checked_add(1)
                .ok_or_else(|| invalid("disks", "disk ids exhausted"))?;
            disks.push(DiskRecord {
                name: d.name.clone(),
                id,
                size: d.size_bytes,
            });
        }
        let vm = VmRecord {
            name: spec.name.clone(),
            origin,
            cpus: spec.cpus,
            memory_mib: spec.memory_mib,
            power_state,
            disks,
            prepared: false,
            boot: spec.boot.clone(),
            nics: spec.nics.clone(),
        };
        self.vms.push(vm.clone());
        Ok(vm.inventory())
    }
}

/// The VMs of a host; the simulated driver. See the module documentation.
pub struct VmCatalog {
    path: PathBuf,
    state: Mutex<StateFile>,
    quiesce_error: Mutex<Option<String>>,
    quiesces: AtomicU64,
    thaws: AtomicU64,
    events: broadcast::Sender<AgentEvent>,
}

impl std::fmt::Debug for VmCatalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmCatalog")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl VmCatalog {
    /// Opens the simulated hypervisor of the agent configured by `cfg` (blocking): the
    /// configuration's VMs and bare disks, and the run-time VMs and power states of
    /// `<data-dir>/state/vms.json`. A run-time VM that now clashes with the
    /// configuration (name, disk name or disk id) is refused, never silently dropped.
    pub fn open(cfg: &AgentConfig) -> Result<VmCatalog, HypervisorError> {
        let state_dir = cfg.state_dir();
        std::fs::create_dir_all(&state_dir).map_err(|e| HypervisorError::State {
            path: state_dir.clone(),
            reason: e.to_string(),
        })?;
        let path = state_dir.join("vms.json");
        let saved: StateFile = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| HypervisorError::State {
                path: path.clone(),
                reason: format!("not a VM state file: {e}"),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => {
                return Err(HypervisorError::State {
                    path,
                    reason: e.to_string(),
                })
            }
        };
        let saved_power = |name: &str, origin: Origin| {
            saved
                .vms
                .iter()
                .find(|v| v.name == name && v.origin == origin)
                .map_or(PowerState::On, |v| v.power_state)
        };
        let saved_prepared = |name: &str, origin: Origin| {
            saved
                .vms
                .iter()
                .any(|v| v.name == name && v.origin == origin && v.prepared)
        };
        let runtime: Vec<&VmRecord> = saved
            .vms
            .iter()
            .filter(|v| matches!(v.origin, Origin::Runtime | Origin::Recovered))
            .collect();
        let in_vm: BTreeSet<&str> = cfg
            .vms
            .iter()
            .flat_map(|v| v.disks.iter().map(String::as_str))
            .chain(
                runtime
                    .iter()
                    .flat_map(|v| v.disks.iter().map(|d| d.name.as_str())),
            )
            .collect();
        let mut vms = Vec::new();
        for v in &cfg.vms {
            check_machine(v.boot.as_ref(), &v.nics).map_err(|e| HypervisorError::State {
                path: path.clone(),
                reason: format!("[[agent.vms]] `{}`: {e}", v.name),
            })?;
            let mut disks = Vec::new();
            for name in &v.disks {
                let d = cfg.disks.iter().find(|d| &d.name == name).ok_or_else(|| {
                    invalid(
                        format!("vms.{}", v.name),
                        format!("disk `{name}` is not among the agent's disks"),
                    )
                })?;
                disks.push(DiskRecord {
                    name: d.name.clone(),
                    id: d.id,
                    size: d.size,
                });
            }
            vms.push(VmRecord {
                name: v.name.clone(),
                origin: Origin::Config,
                cpus: v.cpus,
                memory_mib: v.memory_mib,
                power_state: saved_power(&v.name, Origin::Config),
                disks,
                prepared: saved_prepared(&v.name, Origin::Config),
                boot: v.boot.clone(),
                nics: v.nics.clone(),
            });
        }
        for d in cfg
            .disks
            .iter()
            .filter(|d| !in_vm.contains(d.name.as_str()))
        {
            vms.push(VmRecord {
                name: d.name.clone(),
                origin: Origin::Disk,
                cpus: 1,
                memory_mib: 1024,
                power_state: saved_power(&d.name, Origin::Disk),
                disks: vec![DiskRecord {
                    name: d.name.clone(),
                    id: d.id,
                    size: d.size,
                }],
                prepared: saved_prepared(&d.name, Origin::Disk),
                boot: None,
                nics: Vec::new(),
            });
        }
        for v in runtime {
            if vms.iter().any(|o| o.name == v.name) {
                return Err(HypervisorError::State {
                    path,
                    reason: format!(
                        "VM `{}` was created at run time and is now also in the configuration; remove one of them",
                        v.name
                    ),
                });
            }
            for d in &v.disks {
                // A run-time disk may be in the configuration's disk list only as itself
                // (a caller that already added the run-time disks).
                let clash = cfg.disks.iter().any(|c| {
                    (c.name == d.name || c.id == d.id) && !(c.name == d.name && c.id == d.id)
                }) || vms
                    .iter()
                    .flat_map(|o| &o.disks)
                    .any(|o| o.name == d.name || o.id == d.id);
                if clash {
                    return Err(HypervisorError::State {
                        path,
                        reason: format!(
                            "disk `{}` (id {}) of run-time VM `{}` clashes with a disk of the configuration",
                            d.name, d.id, v.name
                        ),
                    });
                }
            }
            vms.push(v.clone());
        }
        let max_id = vms
            .iter()
            .flat_map(|v| &v.disks)
            .map(|d| d.id)
            .chain(cfg.disks.iter().map(|d| d.id))
            .max();
        let next_disk_id = saved
            .next_disk_id
            .max(max_id.map_or(1, |m| m.saturating_add(1)));
        let state = StateFile { next_disk_id, vms };
        let hv = VmCatalog {
            path,
            state: Mutex::new(StateFile::default()),
            quiesce_error: Mutex::new(None),
            quiesces: AtomicU64::new(0),
            thaws: AtomicU64::new(0),
            events: broadcast::channel(256).0,
        };
        // What the configuration changed (VMs gone, new ones) is on disk before anyone
        // can ask.
        hv.persist(&state)?;
        *hv.lock() = state;
        Ok(hv)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, StateFile> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn persist(&self, state: &StateFile) -> Result<(), HypervisorError> {
        let body = serde_json::to_vec_pretty(state).map_err(|e| HypervisorError::State {
            path: self.path.clone(),
            reason: e.to_string(),
        })?;
        crashsafe::write_atomically(&self.path, &body)?;
        Ok(())
    }

    /// Applies `change` to a copy of the state, persists it, and only then makes it the
    /// state: a failed write changes nothing.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut StateFile) -> Result<T, HypervisorError>,
    ) -> Result<T, HypervisorError> {
        let mut state = self.lock();
        let mut next = state.clone();
        let out = change(&mut next)?;
        self.persist(&next)?;
        *state = next;
        Ok(out)
    }

    /// Disks of the VMs created at run time, to open at start with the configuration's.
    pub fn runtime_disks(&self, data_dir: &Path) -> Vec<DiskConfig> {
        self.lock()
            .vms
            .iter()
            .filter(|v| v.origin == Origin::Runtime)
            .flat_map(|v| v.inventory().disks)
            .map(|d| vm_disk_config(data_dir, &d))
            .collect()
    }

    /// Names of the disks of powered-off VMs (their exports are not served). Recovered
    /// VMs' disks are the recovery's business.
    pub fn powered_off_disks(&self) -> Vec<String> {
        self.lock()
            .vms
            .iter()
            .filter(|v| v.power_state == PowerState::Off && v.origin != Origin::Recovered)
            .flat_map(|v| v.disks.iter().map(|d| d.name.clone()))
            .collect()
    }

    /// The VM named `name`, as the inventory shows it.
    pub fn get(&self, name: &str) -> Option<InventoryVm> {
        self.lock()
            .vms
            .iter()
            .find(|v| v.name == name)
            .map(VmRecord::inventory)
    }

    /// Whether `name` was brought up by a recovery not committed yet.
    pub fn is_recovered(&self, name: &str) -> bool {
        self.lock()
            .vms
            .iter()
            .any(|v| v.name == name && v.origin == Origin::Recovered)
    }

    /// Sends an event to the subscribers.
    pub fn emit(&self, ev: AgentEvent) {
        let _ = self.events.send(ev);
    }

    /// Test/demo knob: quiesce fails with `reason` (or succeeds again with `None`).
    pub fn fail_quiesce(&self, reason: Option<String>) {
        *self
            .quiesce_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = reason;
    }

    /// Quiesce requests seen (successful or not).
    pub fn quiesce_count(&self) -> u64 {
        self.quiesces.load(Ordering::SeqCst)
    }

    pub fn thaw_count(&self) -> u64 {
        self.thaws.load(Ordering::SeqCst)
    }

    /// Records `name`'s power state (a power-on of a prepared VM is refused) and, if it
    /// changed, sends a `vm_power` event saying `cause` (`request`, `guest`, `exited`…).
    pub fn set_power(
        &self,
        name: &str,
        power: PowerState,
        cause: &str,
    ) -> Result<PowerChange, HypervisorError> {
        let change = self.update(|s| {
            let vm = s
                .vms
                .iter_mut()
                .find(|v| v.name == name)
                .ok_or_else(|| HypervisorError::NoSuchVm(name.to_string()))?;
            if power == PowerState::On && vm.prepared {
                return Err(HypervisorError::Prepared(name.to_string()));
            }
            let changed = vm.power_state != power;
            vm.power_state = power;
            Ok(PowerChange {
                vm: vm.inventory(),
                changed,
            })
        })?;
        if change.changed {
            tracing::info!(
                vm = name,
                state = power.as_str(),
                "VM powered {}",
                power.as_str()
            );
            let _ = self.events.send(event(
                "vm_power",
                name,
                format!("VM {name} powered {}", power.as_str()),
                serde_json::json!({ "state": power, "cause": cause }),
            ));
        }
        Ok(change)
    }
}

/// How a VM boots and its NICs: the rules of [`crate::model::machine`], as the manager
/// checks them.
pub fn check_machine(boot: Option<&Boot>, nics: &[Nic]) -> Result<(), HypervisorError> {
    use crate::model::machine;
    let checked = (|| {
        if let Some(Boot::Kernel {
            kernel,
            initrd,
            cmdline,
        }) = boot
        {
            machine::check_kernel_boot(kernel, initrd.as_deref(), cmdline)?;
        }
        machine::check_nic_count(nics.len())?;
        for (i, n) in nics.iter().enumerate() {
            machine::check_mac(&format!("nics[{i}].mac"), &n.mac)?;
        }
        Ok(())
    })();
    checked.map_err(|e: crate::model::ValidationError| invalid(e.field, e.message))
}

fn check_spec(spec: &VmSpec) -> Result<(), HypervisorError> {
    check_vm_name(&spec.name).map_err(|r| invalid("name", r))?;
    check_machine(spec.boot.as_ref(), &spec.nics)?;
    if spec.cpus == 0 || spec.cpus > 1024 {
        return Err(invalid("cpus", "must be 1 to 1024"));
    }
    if spec.memory_mib == 0 || spec.memory_mib > 64 << 20 {
        return Err(invalid("memory_mib", "must be 1 MiB to 64 TiB"));
    }
    if spec.disks.len() > MAX_DISKS_PER_VM {
        return Err(invalid(
            "disks",
            format!("at most {MAX_DISKS_PER_VM} disks per VM"),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, d) in spec.disks.iter().enumerate() {
        check_disk_name(&d.name).map_err(|r| invalid(format!("disks[{i}].name"), r))?;
        if !names.insert(&d.name) {
            return Err(invalid(
                format!("disks[{i}].name"),
                format!("`{}` is listed twice", d.name),
            ));
        }
        if d.size_bytes == 0 || d.size_bytes % 512 != 0 || d.size_bytes > MAX_DISK_SIZE {
            return Err(invalid(
                format!("disks[{i}].size_bytes"),
                "must be a non-zero multiple of 512 bytes, at most 64 TiB",
            ));
        }
    }
    Ok(())
}

impl HypervisorDriver for VmCatalog {
    fn inventory(&self) -> Inventory {
        Inventory {
            vms: self.lock().vms.iter().map(VmRecord::inventory).collect(),
        }
    }

    fn create_vm(&self, spec: &VmSpec) -> Result<InventoryVm, HypervisorError> {
        check_spec(spec)?;
        let vm = self.update(|s| {
            if s.vms.iter().any(|v| v.name == spec.name) {
                return Err(HypervisorError::DuplicateVm(spec.name.clone()));
            }
            s.add(spec, Origin::Runtime, PowerState::On)
        })?;
        tracing::info!(vm = %vm.name, disks = vm.disks.len(), "VM created");
        let _ = self.events.send(event(
            "vm_created",
            &vm.name,
            format!("VM {} created with {} disk(s)", vm.name, vm.disks.len()),
            serde_json::json!({ "disk_ids": vm.disks.iter().map(|d| d.disk_id).collect::<Vec<_>>() }),
        ));
        Ok(vm)
    }

    fn power_on(&self, vm: &str) -> Result<PowerChange, HypervisorError> {
        self.set_power(vm, PowerState::On, "request")
    }

    fn power_off(&self, vm: &str) -> Result<PowerChange, HypervisorError> {
        self.set_power(vm, PowerState::Off, "request")
    }

    fn quiesce(&self, vms: &[String], _within: Duration) -> Result<QuiesceMethod, HypervisorError> {
        self.quiesces.fetch_add(1, Ordering::SeqCst);
        {
            let s = self.lock();
            if let Some(missing) = vms.iter().find(|n| !s.vms.iter().any(|v| &v.name == *n)) {
                return Err(HypervisorError::NoSuchVm(missing.clone()));
            }
        }
        let failure = self
            .quiesce_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        match (failure, vms.first()) {
            (Some(reason), Some(vm)) => Err(HypervisorError::Quiesce {
                vm: vm.clone(),
                reason,
            }),
            // The simulated guests have nothing to flush: acknowledged at once, as a guest
            // agent would.
            _ => Ok(QuiesceMethod::GuestAgent),
        }
    }

    fn thaw(&self, _vms: &[String]) {
        self.thaws.fetch_add(1, Ordering::SeqCst);
    }

    fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    fn create_recovered_vm(&self, spec: &VmSpec) -> Result<InventoryVm, HypervisorError> {
        check_spec(spec)?;
        let vm = self.update(|s| {
            if let Some(v) = s.vms.iter().find(|v| v.name == spec.name) {
                let same = v.origin == Origin::Recovered
                    && v.disks.len() == spec.disks.len()
                    && v.disks
                        .iter()
                        .zip(&spec.disks)
                        .all(|(a, b)| a.name == b.name);
                return if same {
                    Ok(v.inventory())
                } else {
                    Err(HypervisorError::DuplicateVm(spec.name.clone()))
                };
            }
            s.add(spec, Origin::Recovered, PowerState::Off)
        })?;
        tracing::info!(vm = %vm.name, disks = vm.disks.len(), "recovered VM created");
        let _ = self.events.send(event(
            "vm_created",
            &vm.name,
            format!(
                "recovered VM {} created with {} disk(s)",
                vm.name,
                vm.disks.len()
            ),
            serde_json::json!({ "recovered": true }),
        ));
        Ok(vm)
    }

    fn remove_recovered_vm(&self, name: &str) -> Result<bool, HypervisorError> {
        self.update(|s| match s.vms.iter().position(|v| v.name == name) {
            None => Ok(false),
            Some(i) if s.vms[i].origin == Origin::Recovered => {
                s.vms.remove(i);
                Ok(true)
            }
            Some(_) => Err(invalid(
                "vm",
                format!("`{name}` is not a recovered VM: it is not removed"),
            )),
        })
    }

    fn adopt_recovered_vm(&self, name: &str) -> Result<InventoryVm, HypervisorError> {
        self.update(|s| {
            let vm = s
                .vms
                .iter_mut()
                .find(|v| v.name == name)
                .ok_or_else(|| HypervisorError::NoSuchVm(name.to_string()))?;
            match vm.origin {
                Origin::Recovered | Origin::Runtime => {
                    vm.origin = Origin::Runtime;
                    Ok(vm.inventory())
                }
                _ => Err(invalid("vm", format!("`{name}` is not a recovered VM"))),
            }
        })
    }

    fn set_prepared(&self, name: &str, prepared: bool) -> Result<InventoryVm, HypervisorError> {
        self.update(|s| {
            let vm = s
                .vms
                .iter_mut()
                .find(|v| v.name == name)
                .ok_or_else(|| HypervisorError::NoSuchVm(name.to_string()))?;
            if prepared && vm.power_state == PowerState::On {
                return Err(invalid(
                    "vm",
                    format!("`{name}` is still running: power it off first"),
                ));
            }
            vm.prepared = prepared;
            Ok(vm.inventory())
        })
    }

    fn remove_seeded_vm(&self, name: &str) -> Result<bool, HypervisorError> {
        let removed = self.update(|s| {
            let Some(i) = s.vms.iter().position(|v| v.name == name) else {
                return Ok(false);
            };
            if matches!(s.vms[i].origin, Origin::Config | Origin::Disk) {
                // The seed record keeps it out at the next start (`without_seeded_disks`),
                // whatever the file says.
                tracing::warn!(
                    vm = name,
                    "VM of the configuration file moved to another site: remove it from the file"
                );
            }
            s.vms.remove(i);
            Ok(true)
        })?;
        if removed {
            tracing::info!(
                vm = name,
                "VM removed: its disks are reverse-protection seeds"
            );
            let _ = self.events.send(event(
                "vm_removed",
                name,
                format!("VM {name} removed: its disks became replicas of the recovered VM"),
                serde_json::json!({}),
            ));
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::control::NewDisk;

    fn cfg(dir: &Path, section: &str) -> AgentConfig {
        AgentConfig::loopback(dir, "h1", section, None).unwrap()
    }

    fn spec(name: &str, disks: &[(&str, u64)]) -> VmSpec {
        VmSpec {
            name: name.into(),
            cpus: 2,
            memory_mib: 2048,
            disks: disks
                .iter()
                .map(|(n, s)| NewDisk {
                    name: n.to_string(),
                    size_bytes: *s,
                })
                .collect(),
            boot: None,
            nics: vec![],
        }
    }

    const SECTION: &str = r#"
        [[disks]]
        name = "bare"
        id = 3
        size = "1 MiB"
        [[vms]]
        name = "web"
        cpus = 4
        memory_mib = 4096
        disks = [{ name = "web-0", id = 10, size = "1 MiB" }, { name = "web-1", id = 11, size = 1048576 }]
    "#;

    #[test]
    fn config_vms_and_bare_disks_are_vms() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), SECTION);
        // VM disks are protected disks like [[disks]].
        let names: Vec<_> = c.disks.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["bare", "web-0", "web-1"]);
        let hv = VmCatalog::open(&c).unwrap();
        let inv = hv.inventory();
        assert_eq!(inv.vms.len(), 2);
        let web = inv.vms.iter().find(|v| v.name == "web").unwrap();
        assert_eq!((web.cpus, web.memory_mib), (4, 4096));
        assert_eq!(
            web.disks.iter().map(|d| d.disk_id).collect::<Vec<_>>(),
            [10, 11]
        );
        assert_eq!(web.power_state, PowerState::On);
        let bare = inv.vms.iter().find(|v| v.name == "bare").unwrap();
        assert_eq!(bare.disks.len(), 1);
        assert_eq!(bare.disks[0].export, "bare");
        assert!(dir.path().join("h1/state/vms.json").exists());
    }

    #[test]
    fn runtime_vms_and_power_state_survive_a_reopen_and_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), SECTION);
        let hv = VmCatalog::open(&c).unwrap();
        let db = hv
            .create_vm(&spec("db", &[("db-0", 1 << 20), ("db-1", 2 << 20)]))
            .unwrap();
        // Above every id in use (3, 10, 11).
        assert_eq!(
            db.disks.iter().map(|d| d.disk_id).collect::<Vec<_>>(),
            [12, 13]
        );
        assert_eq!(db.power_state, PowerState::On);
        assert!(hv.power_off("web").unwrap().changed);
        assert!(!hv.power_off("web").unwrap().changed);
        hv.power_off("db").unwrap();
        drop(hv);

        let hv = VmCatalog::open(&c).unwrap();
        let inv = hv.inventory();
        let db2 = inv.vms.iter().find(|v| v.name == "db").unwrap();
        assert_eq!(db2.disks, db.disks);
        assert_eq!(db2.power_state, PowerState::Off);
        let web = inv.vms.iter().find(|v| v.name == "web").unwrap();
        assert_eq!(web.power_state, PowerState::Off);
        let mut off = hv.powered_off_disks();
        off.sort();
        assert_eq!(off, ["db-0", "db-1", "web-0", "web-1"]);
        let rt = hv.runtime_disks(&c.data_dir);
        assert_eq!(rt.len(), 2);
        assert_eq!(rt[1].path, c.data_dir.join("disks/db-1.img"));
        assert_eq!(rt[1].size, 2 << 20);
        let next = hv.create_vm(&spec("app", &[("app-0", 512)])).unwrap();
        assert_eq!(next.disks[0].disk_id, 14);
        drop(hv);

        // A configuration that drops the VM "web" does not free its ids for reuse.
        let c2 = cfg(dir.path(), "");
        let hv = VmCatalog::open(&c2).unwrap();
        let x = hv.create_vm(&spec("x", &[("x-0", 512)])).unwrap();
        assert_eq!(x.disks[0].disk_id, 15);
        // The same configuration with the run-time disks already added opens too.
        let mut c3 = c2.clone();
        c3.disks.extend(hv.runtime_disks(&c3.data_dir));
        drop(hv);
        let hv = VmCatalog::open(&c3).unwrap();
        assert_eq!(hv.inventory().vms.len(), 3);
    }

    #[test]
    fn duplicate_and_invalid_names_are_refused_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), SECTION);
        let hv = VmCatalog::open(&c).unwrap();
        let before = hv.inventory();
        let e = hv.create_vm(&spec("web", &[])).unwrap_err();
        assert!(matches!(e, HypervisorError::DuplicateVm(_)), "{e}");
        assert!(e.to_string().contains("already exists"), "{e}");
        let e = hv.create_vm(&spec("bare", &[])).unwrap_err();
        assert!(matches!(e, HypervisorError::DuplicateVm(_)), "{e}");
        let e = hv.create_vm(&spec("new", &[("web-0", 512)])).unwrap_err();
        assert!(matches!(e, HypervisorError::DuplicateDisk(_)), "{e}");
        let long = "x".repeat(129);
        for bad in ["", "a/b", "..\\x", " pad", "tab\there", long.as_str()] {
            let e = hv.create_vm(&spec(bad, &[])).unwrap_err();
            assert!(matches!(e, HypervisorError::Invalid { .. }), "{bad:?}: {e}");
        }
        for bad in ["../d", ".hidden", "a b", ""] {
            let e = hv.create_vm(&spec("ok", &[(bad, 512)])).unwrap_err();
            assert!(e.to_string().contains("disks[0].name"), "{bad:?}: {e}");
        }
        let e = hv
            .create_vm(&spec("ok", &[("d", 512), ("d", 512)]))
            .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = hv.create_vm(&spec("ok", &[("d", 1000)])).unwrap_err();
        assert!(e.to_string().contains("size_bytes"), "{e}");
        assert!(matches!(
            hv.power_on("nobody").unwrap_err(),
            HypervisorError::NoSuchVm(_)
        ));
        // Spaces are fine in a VM name ("web - Test" at the recovery site).
        hv.create_vm(&spec("web - Test", &[])).unwrap();
        assert_eq!(hv.inventory().vms.len(), before.vms.len() + 1);
        // Ids were not consumed by the refused requests.
        let v = hv.create_vm(&spec("ok", &[("ok-0", 512)])).unwrap();
        assert_eq!(v.disks[0].disk_id, 12);
    }

    #[test]
    fn a_runtime_vm_that_now_clashes_with_the_configuration_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "");
        let hv = VmCatalog::open(&c).unwrap();
        hv.create_vm(&spec("web", &[("w0", 512)])).unwrap();
        drop(hv);
        let e = VmCatalog::open(&cfg(dir.path(), SECTION)).unwrap_err();
        assert!(e.to_string().contains("also in the configuration"), "{e}");
        let e = VmCatalog::open(&cfg(
            dir.path(),
            "[[disks]]\nname = 'w0'\nid = 99\nsize = 512\n",
        ))
        .unwrap_err();
        assert!(e.to_string().contains("clashes"), "{e}");
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_an_empty_host() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "");
        std::fs::create_dir_all(c.state_dir()).unwrap();
        std::fs::write(c.state_dir().join("vms.json"), b"{ not json").unwrap();
        let e = VmCatalog::open(&c).unwrap_err();
        assert!(e.to_string().contains("not a VM state file"), "{e}");
    }

    #[test]
    fn quiesce_counts_and_fails_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let hv = VmCatalog::open(&cfg(dir.path(), SECTION)).unwrap();
        assert_eq!(
            hv.quiesce(&["web".into()], Duration::from_secs(1)).unwrap(),
            QuiesceMethod::GuestAgent
        );
        hv.thaw(&["web".into()]);
        assert_eq!((hv.quiesce_count(), hv.thaw_count()), (1, 1));
        assert!(matches!(
            hv.quiesce(&["nobody".into()], Duration::from_secs(1))
                .unwrap_err(),
            HypervisorError::NoSuchVm(_)
        ));
        hv.fail_quiesce(Some("guest agent not responding".into()));
        let e = hv
            .quiesce(&["web".into()], Duration::from_secs(1))
            .unwrap_err();
        assert!(e.to_string().contains("guest agent not responding"), "{e}");
        assert_eq!(hv.quiesce_count(), 3);
    }

    #[test]
    fn power_changes_are_events() {
        let dir = tempfile::tempdir().unwrap();
        let hv = VmCatalog::open(&cfg(dir.path(), SECTION)).unwrap();
        let mut rx = hv.subscribe();
        hv.power_off("web").unwrap();
        hv.power_off("web").unwrap();
        let e = rx.try_recv().unwrap();
        assert_eq!(
            (e.kind.as_str(), e.vm.as_deref()),
            ("vm_power", Some("web"))
        );
        assert_eq!(e.details["state"], "off");
        assert!(rx.try_recv().is_err(), "no event for a VM already off");
    }

    #[test]
    fn machine_definitions_are_checked() {
        let kernel = |k: &str| Boot::Kernel {
            kernel: k.into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
        };
        let nic = |m: &str| Nic {
            network: None,
            mac: Some(m.into()),
        };
        assert!(check_machine(Some(&kernel("/k/vmlinuz")), &[nic("52:54:00:AB:cd:01")]).is_ok());
        assert!(check_machine(Some(&Boot::Firmware), &[]).is_ok());
        assert!(
            check_machine(Some(&kernel("vmlinuz")), &[]).is_err(),
            "relative"
        );
        assert!(
            check_machine(None, &[nic("52:54:00:00:00:01,romfile=/x")]).is_err(),
            "injection"
        );
        assert!(check_machine(None, &[nic("52:54:00:00:00")]).is_err());
        let many: Vec<Nic> = (0..9).map(|_| nic("52:54:00:00:00:01")).collect();
        assert!(check_machine(None, &many).is_err());
    }
}
