//! Recoveries on a recovery host (failover test, failover live, move; then commit or
//! discard), planned-failover locks on a protected host, and break-glass recovery.
//!
//! [`Recoveries`] owns every recovery this host runs, by operation id. A recovery is a
//! point-in-time view ([`View`]) per recovered disk at one checkpoint of its journal,
//! wrapped in a [`BlockDevice`] (reads through the view; writes, zeroes and trims go to
//! the view's scratch layer, within a scratch budget shared by the whole recovery: past
//! it guest writes fail with ENOSPC, so a test never fills the journal storage and stops
//! replication). The recovered VMs are created in the hypervisor powered off; each disk
//! is an NBD export of this host, served **only while its VM runs** (as a protected VM's
//! disks are), so `PowerOn`/`PowerOff` of a recovered VM serve and withdraw its exports.
//!
//! Export names: `<vm>.<disk>` for a live recovery and `<vm>.<disk>.t<operation>` for a
//! test (each part reduced to `[A-Za-z0-9_-]`, the operation to its first 12 characters),
//! so a test and a live recovery of the same VM never collide and every name is a valid
//! `nbd://127.0.0.1:PORT/EXPORT` path and a valid local disk name (after a commit the
//! disk keeps its export's name).
//!
//! Persistence: each recovery's spec is `<data-dir>/state/recoveries/<operation>.json`,
//! replaced crash-safely, written before anything is created and deleted last. After an
//! agent restart every recovery is re-created from its checkpoint (views reopened, VMs
//! kept, exports of running VMs served again): **scratch writes are lost then** (the
//! journal does not persist scratch layers of uncommitted views), and `EndRecovery`
//! still works.
//!
//! Commit, in this order (each step recorded in the spec, so a crash is finished on
//! restart or by a repeated `EndRecovery Commit`):
//! 1. refuse while a stream or sync session uses one of the journals;
//! 2. spec phase `committing` persisted; exports withdrawn (in-flight requests drained);
//! 3. per disk: `Journal::commit(view)` (crash-safe inside the journal; redone by the
//!    journal's open), then the disk is recorded `committed` — a disk found committed by
//!    a crash before the record (its checkpoint is gone from the journal) counts as
//!    committed;
//! 4. per disk: the replica file is renamed to `<data-dir>/disks/<export>.img` (copied
//!    and fsynced first if on another filesystem), the rest of the journal directory is
//!    deleted and the journal closed; recorded `moved` (a missing source with the target
//!    present counts as moved);
//! 5. the VM becomes a regular VM in `vms.json` (same disk ids, allocated at `Recover`),
//!    its disks are opened as local disks of the agent and served under the same export
//!    names while it runs; a restart opens them like any run-time VM's;
//! 6. the spec is deleted.
//!
//! Planned failover (protected side): `PrepareFailover` powers the VMs off (exports
//! drained and flushed) and locks them in `vms.json`; a power-on is refused with
//! "prepared for planned failover" until `ReleaseFailover`.
//!
//! Break-glass ([`Recoveries::break_glass`]): with the manager gone, the running agent
//! recovers a VPG from the `recovery` part of its persisted desired state, at the newest
//! checkpoint recoverable in every journal (or a given one), then powers the VMs on in
//! boot order. Its operation id is `break-glass-<vpg id>-<checkpoint>[-test]`.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::crashsafe::{self, CrashSafeError};
use crate::agent::fencing::FencingError;
use crate::agent::host::config::received_disk_dir;
use crate::agent::host::{Agent, AgentError};
use crate::agent::hypervisor::{vm_disk_config, HypervisorDriver, HypervisorError, VmSpec};
use crate::agent::journal::View;
use crate::agent::nbd::BlockDevice;
use crate::agent::stream::StreamError;
use crate::proto::control::{
    InventoryVm, NewDisk, PowerState, RecoverDisk, RecoverVm, RecoveredDisk, RecoveredVm,
    RecoveryEnd, RecoveryReport,
};

/// Directory under the agent's state directory.
pub const RECOVERIES_DIR: &str = "recoveries";

/// Why a recovery command failed.
#[derive(Debug, thiserror::Error)]
pub enum RecoveryError {
    #[error(transparent)]
    Fencing(#[from] FencingError),
    #[error("this agent has no replication listener: it keeps no journals to recover from")]
    NotRecoveryHost,
    #[error("{0}")]
    Invalid(String),
    #[error("disk {disk} of VM {vm}: {source}")]
    Disk {
        vm: String,
        disk: String,
        #[source]
        source: StreamError,
    },
    #[error("cannot commit: {0}")]
    Busy(String),
    #[error("operation {operation} is another recovery ({reason})")]
    Mismatch { operation: String, reason: String },
    #[error("no VPG named `{name}` in this host's desired state (known: {known})")]
    UnknownVpg { name: String, known: String },
    #[error("no checkpoint of VPG `{vpg}` is recoverable in every journal here{detail}")]
    NoCheckpoint { vpg: String, detail: String },
    #[error("recovery state {}: {reason}", path.display())]
    State { path: PathBuf, reason: String },
    #[error(transparent)]
    Persist(#[from] CrashSafeError),
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("background task failed: {0}")]
    Task(String),
}

type Result<T, E = RecoveryError> = std::result::Result<T, E>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RecoveryError::Task(e.to_string()))?
}

/// What a `Recover` command asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverRequest {
    pub operation: String,
    pub vpg_id: String,
    pub fencing_generation: u64,
    pub checkpoint: u64,
    pub test: bool,
    pub scratch_budget_bytes: Option<u64>,
    pub vms: Vec<RecoverVm>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Phase {
    #[default]
    Running,
    Committing,
}

/// `state/recoveries/<operation>.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RecoverySpec {
    req: RecoverRequest,
    #[serde(default)]
    phase: Phase,
    /// Exports whose journal is committed (commit step 3).
    #[serde(default)]
    committed: BTreeSet<String>,
    /// Exports whose replica is a local disk file now (commit step 4).
    #[serde(default)]
    moved: BTreeSet<String>,
}

/// The export name of a recovered disk (see the module documentation).
pub fn export_name(vm: &str, disk: &str, operation: &str, test: bool) -> String {
    fn clean(s: &str, max: usize) -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(max)
            .collect()
    }
    let mut n = format!("{}.{}", clean(vm, 56), clean(disk, 56));
    if test {
        n.push_str(".t");
        n.push_str(&clean(operation, 12));
    }
    if !n.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        n.insert(0, 'r');
    }
    n
}

/// The scratch budget of one recovery, shared by its disks.
struct Budget {
    limit: Option<u64>,
    /// An upper bound of the scratch bytes (every admitted write counted whole); made
    /// exact again whenever it would refuse a write.
    used: Mutex<u64>,
    full: AtomicBool,
    devices: RwLock<Vec<Weak<ViewDevice>>>,
}

impl Budget {
    fn exact(&self) -> u64 {
        self.devices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter_map(Weak::upgrade)
            .map(|d| d.scratch_bytes())
            .sum()
    }

    /// Admits a guest write of `len` bytes, or refuses it with ENOSPC.
    fn admit(&self, len: u64) -> io::Result<()> {
        let Some(limit) = self.limit else {
            return Ok(());
        };
        let mut used = lock(&self.used);
        if used.saturating_add(len) > limit {
            *used = self.exact();
            if used.saturating_add(len) > limit {
                self.full.store(true, Ordering::SeqCst);
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
        }
        *used += len;
        self.full.store(false, Ordering::SeqCst);
        Ok(())
    }
}

/// A recovered disk served over NBD: the view, until the recovery ends.
struct ViewDevice {
    view: RwLock<Option<View>>,
    size: u64,
    budget: Arc<Budget>,
}

/// 1 MiB of zeroes for WRITE_ZEROES and TRIM (written into the scratch layer).
static ZEROES: [u8; 1 << 20] = [0; 1 << 20];

fn ended() -> io::Error {
    io::Error::other("the recovery of this disk has ended")
}

impl ViewDevice {
    fn scratch_bytes(&self) -> u64 {
        self.view
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, View::scratch_bytes)
    }

    fn take(&self) -> Option<View> {
        self.view
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    fn scratch_write(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let g = self.view.read().unwrap_or_else(PoisonError::into_inner);
        let v = g.as_ref().ok_or_else(ended)?;
        self.budget.admit(data.len() as u64)?;
        v.write_at(data, offset).map_err(io::Error::other)
    }
}

impl BlockDevice for ViewDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let g = self.view.read().unwrap_or_else(PoisonError::into_inner);
        g.as_ref()
            .ok_or_else(ended)?
            .read_at(buf, offset)
            .map_err(io::Error::other)
    }

    fn write_at(&self, buf: &[u8], offset: u64, _fua: bool) -> io::Result<()> {
        self.scratch_write(buf, offset)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> io::Result<()> {
        // The scratch layer has no holes: zeroes are data that hides the view's bytes.
        let mut at = offset;
        let end = offset + len;
        while at < end {
            let n = (end - at).min(ZEROES.len() as u64);
            self.scratch_write(&ZEROES[..n as usize], at)?;
            at += n;
        }
        Ok(())
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> io::Result<()> {
        self.write_zeroes(offset, len, true, fua)
    }

    fn flush(&self) -> io::Result<()> {
        // Scratch layers are not durable before a commit (documented above).
        Ok(())
    }
}

/// One recovered disk of a running recovery.
struct RunDisk {
    vm: String,
    disk: RecoverDisk,
    export: String,
    device: Arc<ViewDevice>,
}

/// A recovery this host runs.
struct Running {
    spec: Mutex<RecoverySpec>,
    budget: Arc<Budget>,
    disks: Vec<RunDisk>,
}

/// The recoveries of this host. See the module documentation.
pub struct Recoveries {
    driver: Arc<dyn HypervisorDriver>,
    agent: Arc<Agent>,
    /// The VM operations lock shared with `HostVms`.
    ops: Arc<tokio::sync::Mutex<()>>,
    dir: PathBuf,
    running: Mutex<BTreeMap<String, Arc<Running>>>,
    restored: tokio::sync::OnceCell<()>,
}

impl std::fmt::Debug for Recoveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recoveries")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

/// What a break-glass recovery did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BreakGlassReport {
    pub vpg: String,
    /// The agent's NBD listener (exports are `nbd://<nbd>/<export>`).
    pub nbd: String,
    pub report: RecoveryReport,
}

impl Recoveries {
    pub fn new(
        driver: Arc<dyn HypervisorDriver>,
        agent: Arc<Agent>,
        ops: Arc<tokio::sync::Mutex<()>>,
    ) -> Arc<Recoveries> {
        let dir = agent.config().state_dir().join(RECOVERIES_DIR);
        Arc::new(Recoveries {
            driver,
            agent,
            ops,
            dir,
            running: Mutex::new(BTreeMap::new()),
            restored: tokio::sync::OnceCell::new(),
        })
    }

    /// Waits until the recoveries persisted before a restart are re-created (the first
    /// caller does it).
    pub async fn restored(&self) {
        self.restored.get_or_init(|| self.restore()).await;
    }

    fn spec_path(&self, operation: &str) -> PathBuf {
        self.dir.join(format!("{}.json", spec_file_stem(operation)))
    }

    fn persist(&self, spec: &RecoverySpec) -> Result<()> {
        std::fs::create_dir_all(&self.dir).map_err(|e| RecoveryError::Io {
            what: "create",
            path: self.dir.clone(),
            source: e,
        })?;
        let body = serde_json::to_vec_pretty(spec).map_err(|e| RecoveryError::State {
            path: self.dir.clone(),
            reason: e.to_string(),
        })?;
        crashsafe::write_atomically(&self.spec_path(&spec.req.operation), &body)?;
        Ok(())
    }

    fn delete_spec(&self, operation: &str) -> Result<()> {
        let path = self.spec_path(operation);
        match std::fs::remove_file(&path) {
            Ok(()) => crashsafe::sync_parent_dir(&path)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(RecoveryError::Io {
                    what: "delete",
                    path,
                    source: e,
                })
            }
        }
        Ok(())
    }

    async fn restore(&self) {
        let _one = self.ops.lock().await;
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "cannot list the persisted recoveries");
                return;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let spec: RecoverySpec = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "unreadable recovery state: left alone");
                    continue;
                }
            };
            let op = spec.req.operation.clone();
            let phase = spec.phase;
            match self.start(spec, true).await {
                Ok(r) => {
                    tracing::info!(operation = %op, "recovery re-created after a restart (scratch writes before it are lost)");
                    if phase == Phase::Committing {
                        if let Err(e) = self.finish_commit(&r).await {
                            tracing::error!(operation = %op, error = %e, "interrupted commit not finished: EndRecovery Commit retries it");
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(operation = %op, error = %e, "cannot re-create a recovery")
                }
            }
        }
    }

    /// Opens the views, creates the VMs (powered off; kept as they are when they exist)
    /// and records the recovery; the exports of its running VMs are served. With
    /// `tolerant` (a restart) a view that cannot be opened leaves its disk unreadable
    /// rather than losing the recovery, so it can still be ended.
    async fn start(&self, spec: RecoverySpec, tolerant: bool) -> Result<Arc<Running>> {
        let receiver = self
            .agent
            .receiver()
            .cloned()
            .ok_or(RecoveryError::NotRecoveryHost)?;
        let req = spec.req.clone();
        let budget = Arc::new(Budget {
            limit: req.scratch_budget_bytes,
            used: Mutex::new(0),
            full: AtomicBool::new(false),
            devices: RwLock::new(Vec::new()),
        });
        let mut wanted = Vec::new();
        for vm in &req.vms {
            for d in &vm.disks {
                let export = export_name(&vm.name, &d.name, &req.operation, req.test);
                let storage = self.agent.received_storage(&d.host);
                let skip = spec.moved.contains(&export) || spec.committed.contains(&export);
                wanted.push((vm.name.clone(), d.clone(), export, storage, skip));
            }
        }
        let ckpt = req.checkpoint;
        let w2 = wanted.clone();
        let opened = blocking(move || {
            let mut out = Vec::new();
            for (vm, d, _, storage, skip) in w2 {
                if skip {
                    out.push(Ok(None));
                    continue;
                }
                let r = receiver
                    .open_view(&d.host, d.disk_id, &storage, ckpt)
                    .map(Some)
                    .map_err(|e| RecoveryError::Disk {
                        vm: vm.clone(),
                        disk: d.name.clone(),
                        source: e,
                    });
                out.push(r);
            }
            Ok(out)
        })
        .await?;
        let mut disks = Vec::new();
        let mut sizes: BTreeMap<String, u64> = BTreeMap::new();
        for ((vm, d, export, _, _), r) in wanted.into_iter().zip(opened) {
            let view = match r {
                Ok(v) => v,
                Err(e) if tolerant => {
                    tracing::error!(operation = %req.operation, %export, error = %e, "recovered disk cannot be opened");
                    None
                }
                // Views opened so far are dropped with `disks` (rolled back).
                Err(e) => return Err(e),
            };
            let size = view.as_ref().map_or(0, View::size);
            sizes.insert(export.clone(), size);
            let device = Arc::new(ViewDevice {
                view: RwLock::new(view),
                size,
                budget: Arc::clone(&budget),
            });
            budget
                .devices
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Arc::downgrade(&device));
            disks.push(RunDisk {
                vm,
                disk: d,
                export,
                device,
            });
        }
        // The VMs, powered off (existing ones are kept, with their power state).
        let have: BTreeMap<String, InventoryVm> = self
            .driver
            .inventory()
            .vms
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect();
        for vm in &req.vms {
            if have.contains_key(&vm.name) {
                continue;
            }
            let spec_vm = VmSpec {
                name: vm.name.clone(),
                cpus: vm.cpus,
                memory_mib: vm.memory_mib,
                disks: vm
                    .disks
                    .iter()
                    .map(|d| {
                        let export = export_name(&vm.name, &d.name, &req.operation, req.test);
                        NewDisk {
                            size_bytes: sizes.get(&export).copied().unwrap_or(0),
                            name: export,
                        }
                    })
                    .collect(),
                // It boots as the protected VM did, on the recovery (or test) network.
                boot: vm.boot.clone(),
                nics: vm
                    .network
                    .iter()
                    .map(|n| crate::proto::control::Nic {
                        network: Some(n.clone()),
                        mac: None,
                    })
                    .collect(),
            };
            let driver = Arc::clone(&self.driver);
            blocking(move || Ok(driver.create_recovered_vm(&spec_vm)?)).await?;
        }
        let running = Arc::new(Running {
            spec: Mutex::new(spec),
            budget,
            disks,
        });
        lock(&self.running).insert(req.operation.clone(), Arc::clone(&running));
        // A restart: the VMs that were running get their disks back.
        let on: BTreeSet<String> = self
            .driver
            .inventory()
            .vms
            .into_iter()
            .filter(|v| v.power_state == PowerState::On)
            .map(|v| v.name)
            .collect();
        for d in &running.disks {
            if on.contains(&d.vm) && !self.agent.registry().contains(&d.export) {
                self.serve(d)?;
            }
        }
        Ok(running)
    }

    fn serve(&self, d: &RunDisk) -> Result<()> {
        self.agent
            .registry()
            .add_with_description(
                &d.export,
                &format!(
                    "bulwark recovered disk {} of VM {} (from {} disk {})",
                    d.disk.name, d.vm, d.disk.host, d.disk.disk_id
                ),
                Arc::clone(&d.device) as Arc<dyn BlockDevice>,
            )
            .map_err(|e| RecoveryError::Agent(AgentError::Nbd(e)))
    }

    /// Serves or withdraws `export` if it is a recovered disk; `false` if it is not one
    /// (the caller's VM is then a local one). For `HostVms::set_power`, which holds the
    /// VM operations lock.
    pub async fn set_exported(
        &self,
        export: &str,
        exported: bool,
    ) -> Result<bool, HypervisorError> {
        let found = lock(&self.running).values().find_map(|r| {
            r.disks
                .iter()
                .position(|d| d.export == export)
                .map(|i| (Arc::clone(r), i))
        });
        let Some((r, i)) = found else {
            return Ok(false);
        };
        let d = &r.disks[i];
        if exported {
            if !self.agent.registry().contains(export) {
                self.serve(d).map_err(|e| HypervisorError::Invalid {
                    field: "export".into(),
                    reason: e.to_string(),
                })?;
            }
        } else {
            self.agent.registry().remove_and_drain(export).await;
        }
        Ok(true)
    }

    fn report_of(&self, r: &Running) -> RecoveryReport {
        let spec = lock(&r.spec).clone();
        let inv: BTreeMap<String, InventoryVm> = self
            .driver
            .inventory()
            .vms
            .into_iter()
            .map(|v| (v.name.clone(), v))
            .collect();
        let vms = spec
            .req
            .vms
            .iter()
            .map(|vm| {
                let have = inv.get(&vm.name);
                RecoveredVm {
                    name: vm.name.clone(),
                    source_vm: vm.source_vm.clone(),
                    power_state: have.map_or(PowerState::Off, |v| v.power_state),
                    disks: r
                        .disks
                        .iter()
                        .filter(|d| d.vm == vm.name)
                        .map(|d| RecoveredDisk {
                            name: d.disk.name.clone(),
                            host: d.disk.host.clone(),
                            source_disk_id: d.disk.disk_id,
                            export: d.export.clone(),
                            size_bytes: d.device.size,
                            disk_id: None,
                        })
                        .collect(),
                }
            })
            .collect();
        let scratch = r.budget.exact();
        RecoveryReport {
            operation: spec.req.operation.clone(),
            vpg_id: spec.req.vpg_id.clone(),
            checkpoint: spec.req.checkpoint,
            test: spec.req.test,
            scratch_bytes: scratch,
            scratch_budget_bytes: spec.req.scratch_budget_bytes,
            scratch_full: r.budget.full.load(Ordering::SeqCst)
                || spec.req.scratch_budget_bytes.is_some_and(|b| scratch >= b),
            vms,
        }
    }

    /// Every recovery this host runs, for the heartbeat. Blocking (reads the views'
    /// scratch maps).
    pub fn reports(&self) -> Vec<RecoveryReport> {
        let all: Vec<Arc<Running>> = lock(&self.running).values().cloned().collect();
        all.iter().map(|r| self.report_of(r)).collect()
    }

    /// `Recover`: see the module documentation. The same operation again answers the
    /// same recovery.
    pub async fn recover(&self, req: RecoverRequest) -> Result<RecoveryReport> {
        self.restored().await;
        let _one = self.ops.lock().await;
        self.agent
            .fencing()
            .admit(&req.vpg_id, req.fencing_generation)?;
        let existing = lock(&self.running).get(&req.operation).cloned();
        if let Some(r) = existing {
            let have = lock(&r.spec).req.clone();
            if have.vpg_id != req.vpg_id || have.checkpoint != req.checkpoint {
                return Err(RecoveryError::Mismatch {
                    operation: req.operation,
                    reason: format!("VPG {} at checkpoint {}", have.vpg_id, have.checkpoint),
                });
            }
            return Ok(self.report_of(&r));
        }
        if self.agent.receiver().is_none() {
            return Err(RecoveryError::NotRecoveryHost);
        }
        self.check_new(&req)?;
        let spec = RecoverySpec {
            req: req.clone(),
            phase: Phase::Running,
            committed: BTreeSet::new(),
            moved: BTreeSet::new(),
        };
        self.persist(&spec)?;
        match self.start(spec, false).await {
            Ok(r) => {
                tracing::info!(operation = %req.operation, vpg = %req.vpg_id, checkpoint = req.checkpoint, test = req.test, "recovery started");
                Ok(self.report_of(&r))
            }
            Err(e) => {
                // Undo what was created: VMs of this recovery, the record, the spec.
                lock(&self.running).remove(&req.operation);
                for vm in &req.vms {
                    let (d, n) = (Arc::clone(&self.driver), vm.name.clone());
                    if let Err(e2) = blocking(move || Ok(d.remove_recovered_vm(&n)?)).await {
                        tracing::warn!(vm = %vm.name, error = %e2, "cannot remove a VM of a failed recovery");
                    }
                }
                self.delete_spec(&req.operation)?;
                Err(e)
            }
        }
    }

    fn check_new(&self, req: &RecoverRequest) -> Result<()> {
        if req.operation.is_empty() || req.operation.len() > 200 {
            return Err(RecoveryError::Invalid(
                "operation: 1 to 200 characters".into(),
            ));
        }
        if req.vms.is_empty() {
            return Err(RecoveryError::Invalid("no VM to recover".into()));
        }
        let inv = self.driver.inventory();
        let mut exports = BTreeSet::new();
        let mut names = BTreeSet::new();
        for vm in &req.vms {
            if !names.insert(vm.name.as_str()) {
                return Err(RecoveryError::Invalid(format!(
                    "VM `{}` is listed twice",
                    vm.name
                )));
            }
            if inv.vms.iter().any(|v| v.name == vm.name) {
                return Err(RecoveryError::Invalid(format!(
                    "a VM named `{}` already exists on this host",
                    vm.name
                )));
            }
            if vm.disks.is_empty() {
                return Err(RecoveryError::Invalid(format!(
                    "VM `{}` has no disk to recover",
                    vm.name
                )));
            }
            for d in &vm.disks {
                let e = export_name(&vm.name, &d.name, &req.operation, req.test);
                let taken = self.agent.registry().contains(&e)
                    || inv.vms.iter().flat_map(|v| &v.disks).any(|x| x.export == e);
                if !exports.insert(e.clone()) || taken {
                    return Err(RecoveryError::Invalid(format!(
                        "export `{e}` of VM `{}` disk `{}` is already in use on this host",
                        vm.name, d.name
                    )));
                }
            }
        }
        let busy = lock(&self.running).values().any(|r| {
            let s = lock(&r.spec);
            s.req.vpg_id == req.vpg_id && s.req.test == req.test
        });
        if busy {
            return Err(RecoveryError::Invalid(format!(
                "VPG {} already has a {} recovery on this host",
                req.vpg_id,
                if req.test { "test" } else { "live" }
            )));
        }
        Ok(())
    }

    /// `EndRecovery`: discard or commit. An unknown operation answers `{"known": false}`.
    pub async fn end(
        &self,
        operation: &str,
        vpg_id: &str,
        fencing_generation: u64,
        end: RecoveryEnd,
    ) -> Result<serde_json::Value> {
        self.restored().await;
        let _one = self.ops.lock().await;
        self.agent.fencing().admit(vpg_id, fencing_generation)?;
        let Some(r) = lock(&self.running).get(operation).cloned() else {
            return Ok(serde_json::json!({ "known": false }));
        };
        if lock(&r.spec).req.vpg_id != vpg_id {
            return Err(RecoveryError::Mismatch {
                operation: operation.to_string(),
                reason: format!("of VPG {}", lock(&r.spec).req.vpg_id),
            });
        }
        let report = match end {
            RecoveryEnd::Discard => self.discard(&r).await?,
            RecoveryEnd::Commit => {
                let receiver = self
                    .agent
                    .receiver()
                    .cloned()
                    .ok_or(RecoveryError::NotRecoveryHost)?;
                if lock(&r.spec).phase == Phase::Running {
                    if let Some(d) = r
                        .disks
                        .iter()
                        .find(|d| receiver.is_busy(&d.disk.host, d.disk.disk_id))
                    {
                        return Err(RecoveryError::Busy(format!(
                            "host {} still streams or syncs disk {} (VM {}): stop protection first",
                            d.disk.host, d.disk.disk_id, d.vm
                        )));
                    }
                    // Only a commit resumed after a crash may find a disk without its
                    // view (and then take a vanished checkpoint as committed).
                    if let Some(d) = r.disks.iter().find(|d| {
                        d.device
                            .view
                            .read()
                            .unwrap_or_else(PoisonError::into_inner)
                            .is_none()
                    }) {
                        return Err(RecoveryError::Busy(format!(
                            "disk {} of VM {} could not be reopened at checkpoint {} after a restart: discard this recovery instead",
                            d.disk.name, d.vm, lock(&r.spec).req.checkpoint
                        )));
                    }
                    let mut s = lock(&r.spec).clone();
                    s.phase = Phase::Committing;
                    self.persist(&s)?;
                    *lock(&r.spec) = s;
                }
                self.finish_commit(&r).await?
            }
        };
        let mut out = serde_json::to_value(report).map_err(|e| RecoveryError::State {
            path: self.dir.clone(),
            reason: e.to_string(),
        })?;
        if let Some(o) = out.as_object_mut() {
            o.insert("known".into(), serde_json::Value::Bool(true));
        }
        Ok(out)
    }

    async fn discard(&self, r: &Arc<Running>) -> Result<RecoveryReport> {
        let mut report = self.report_of(r);
        let (op, vms) = {
            let s = lock(&r.spec);
            (s.req.operation.clone(), s.req.vms.clone())
        };
        if lock(&r.spec).phase == Phase::Committing {
            return Err(RecoveryError::Invalid(format!(
                "operation {op} is being committed: it can no longer be discarded"
            )));
        }
        for vm in &vms {
            let (d, n) = (Arc::clone(&self.driver), vm.name.clone());
            match blocking(move || Ok(d.power_off(&n)?)).await {
                Ok(_) | Err(RecoveryError::Hypervisor(HypervisorError::NoSuchVm(_))) => {}
                Err(e) => return Err(e),
            }
        }
        for d in &r.disks {
            self.agent.registry().remove_and_drain(&d.export).await;
            // Dropping the view rolls it back: scratch discarded, pin released.
            drop(d.device.take());
        }
        for vm in &vms {
            let (d, n) = (Arc::clone(&self.driver), vm.name.clone());
            blocking(move || Ok(d.remove_recovered_vm(&n)?)).await?;
        }
        self.delete_spec(&op)?;
        lock(&self.running).remove(&op);
        for v in &mut report.vms {
            v.power_state = PowerState::Off;
        }
        tracing::info!(operation = %op, "recovery discarded");
        Ok(report)
    }

    /// Commit steps 2–6 (see the module documentation); every step is idempotent.
    async fn finish_commit(&self, r: &Arc<Running>) -> Result<RecoveryReport> {
        let receiver = self
            .agent
            .receiver()
            .cloned()
            .ok_or(RecoveryError::NotRecoveryHost)?;
        let mut report = self.report_of(r);
        let req = lock(&r.spec).req.clone();
        for d in &r.disks {
            self.agent.registry().remove_and_drain(&d.export).await;
        }
        let data_dir = self.agent.config().data_dir.clone();
        for d in &r.disks {
            if lock(&r.spec).committed.contains(&d.export) {
                continue;
            }
            let rc = receiver.clone();
            let (host, id) = (d.disk.host.clone(), d.disk.disk_id);
            let view = d.device.take();
            let storage = self.agent.received_storage(&host);
            let ckpt = req.checkpoint;
            let export = d.export.clone();
            blocking(move || {
                let view = match view {
                    Some(v) => v,
                    None => match rc.open_view(&host, id, &storage, ckpt) {
                        Ok(v) => v,
                        // A crash after the journal's commit, before it was recorded:
                        // the checkpoint is gone because it was committed.
                        Err(StreamError::Journal(e)) => {
                            tracing::warn!(%export, error = %e, "checkpoint gone from the journal: taken as committed before a restart");
                            return Ok(());
                        }
                        Err(e) => {
                            return Err(RecoveryError::Disk {
                                vm: String::new(),
                                disk: export,
                                source: e,
                            })
                        }
                    },
                };
                let rep = rc
                    .commit_view(&host, id, view)
                    .map_err(|e| RecoveryError::Disk {
                        vm: String::new(),
                        disk: export.clone(),
                        source: e,
                    })?;
                tracing::info!(%export, applied = rep.records_applied, discarded = rep.records_discarded, scratch = rep.scratch_bytes, "journal committed");
                Ok(())
            })
            .await?;
            let mut s = lock(&r.spec).clone();
            s.committed.insert(d.export.clone());
            self.persist(&s)?;
            *lock(&r.spec) = s;
        }
        for d in &r.disks {
            if lock(&r.spec).moved.contains(&d.export) {
                continue;
            }
            let storage = self.agent.received_storage(&d.disk.host);
            let dir = received_disk_dir(&storage, d.disk.disk_id);
            let target = data_dir.join("disks").join(format!("{}.img", d.export));
            let rc = receiver.clone();
            let (host, id) = (d.disk.host.clone(), d.disk.disk_id);
            blocking(move || {
                move_file(&dir.join("replica.img"), &target)?;
                rc.drop_disk(&host, id, &dir)
                    .map_err(|e| RecoveryError::Disk {
                        vm: String::new(),
                        disk: target.display().to_string(),
                        source: e,
                    })
            })
            .await?;
            let mut s = lock(&r.spec).clone();
            s.moved.insert(d.export.clone());
            self.persist(&s)?;
            *lock(&r.spec) = s;
        }
        for vm in &req.vms {
            let (drv, n) = (Arc::clone(&self.driver), vm.name.clone());
            let inv = blocking(move || Ok(drv.adopt_recovered_vm(&n)?)).await?;
            for disk in &inv.disks {
                self.agent.add_disk(vm_disk_config(&data_dir, disk)).await?;
                if inv.power_state == PowerState::Off {
                    self.agent.set_exported(&disk.name, false).await?;
                }
                for rv in report.vms.iter_mut().filter(|v| v.name == inv.name) {
                    rv.power_state = inv.power_state;
                    for rd in rv.disks.iter_mut().filter(|x| x.export == disk.export) {
                        rd.disk_id = Some(disk.disk_id);
                        rd.size_bytes = disk.size_bytes;
                    }
                }
            }
        }
        self.delete_spec(&req.operation)?;
        lock(&self.running).remove(&req.operation);
        tracing::info!(operation = %req.operation, "recovery committed: the recovered VMs run on local disks");
        Ok(report)
    }

    /// `PrepareFailover`: power the VMs off (exports drained, disks flushed) and lock
    /// them against power-on. Idempotent.
    pub async fn prepare_failover(
        &self,
        vpg_id: &str,
        fencing_generation: u64,
        vms: &[String],
    ) -> Result<Vec<InventoryVm>> {
        self.restored().await;
        let _one = self.ops.lock().await;
        self.agent.fencing().admit(vpg_id, fencing_generation)?;
        let inv = self.driver.inventory();
        let mut out = Vec::new();
        for name in vms {
            let vm = inv
                .vms
                .iter()
                .find(|v| &v.name == name)
                .ok_or_else(|| HypervisorError::NoSuchVm(name.clone()))?;
            let (d, n) = (Arc::clone(&self.driver), name.clone());
            blocking(move || Ok(d.power_off(&n)?)).await?;
            for disk in &vm.disks {
                if let Some(dev) = self.agent.registry().remove_and_drain(&disk.export).await {
                    blocking(move || {
                        dev.flush().map_err(|e| RecoveryError::Io {
                            what: "flush",
                            path: PathBuf::from(disk_label(&dev)),
                            source: e,
                        })
                    })
                    .await?;
                }
            }
            let (d, n) = (Arc::clone(&self.driver), name.clone());
            out.push(blocking(move || Ok(d.set_prepared(&n, true)?)).await?);
            tracing::info!(vm = %name, "VM shut down and prepared for planned failover");
        }
        Ok(out)
    }

    /// `ReleaseFailover`: unlock the VMs and, if asked, power them on. Idempotent.
    pub async fn release_failover(
        &self,
        vpg_id: &str,
        fencing_generation: u64,
        vms: &[String],
        power_on: bool,
    ) -> Result<Vec<InventoryVm>> {
        self.restored().await;
        let _one = self.ops.lock().await;
        self.agent.fencing().admit(vpg_id, fencing_generation)?;
        let mut out = Vec::new();
        for name in vms {
            let (d, n) = (Arc::clone(&self.driver), name.clone());
            let mut vm = blocking(move || Ok(d.set_prepared(&n, false)?)).await?;
            if power_on {
                for disk in &vm.disks {
                    self.agent.set_exported(&disk.export, true).await?;
                }
                let (d, n) = (Arc::clone(&self.driver), name.clone());
                vm = blocking(move || Ok(d.power_on(&n)?)).await?.vm;
            }
            out.push(vm);
        }
        Ok(out)
    }

    /// Powers a recovered VM on (its exports served first).
    async fn power_on_recovered(&self, name: &str) -> Result<()> {
        let _one = self.ops.lock().await;
        let disks: Vec<String> = lock(&self.running)
            .values()
            .flat_map(|r| {
                r.disks
                    .iter()
                    .filter(|d| d.vm == name)
                    .map(|d| d.export.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        for e in &disks {
            self.set_exported(e, true).await?;
        }
        let (d, n) = (Arc::clone(&self.driver), name.to_string());
        blocking(move || Ok(d.power_on(&n)?)).await?;
        Ok(())
    }

    /// Break-glass recovery of VPG `vpg` (name or id) from the persisted desired state,
    /// with no manager: at `checkpoint` (None: the newest recoverable in every journal),
    /// VMs powered on in boot order with their delays.
    pub async fn break_glass(
        &self,
        vpg: &str,
        checkpoint: Option<u64>,
        test: bool,
    ) -> Result<BreakGlassReport> {
        self.restored().await;
        let receiver = self
            .agent
            .receiver()
            .cloned()
            .ok_or(RecoveryError::NotRecoveryHost)?;
        let desired = self.agent.persisted_desired().unwrap_or_default();
        let Some(rv) = desired
            .recovery
            .iter()
            .find(|r| r.name == vpg || r.vpg_id == vpg)
            .cloned()
        else {
            let known: Vec<&str> = desired.recovery.iter().map(|r| r.name.as_str()).collect();
            return Err(RecoveryError::UnknownVpg {
                name: vpg.to_string(),
                known: if known.is_empty() {
                    "none".into()
                } else {
                    known.join(", ")
                },
            });
        };
        // Checkpoints recoverable in every journal of the VPG here.
        let disks: Vec<RecoverDisk> = rv
            .vms
            .iter()
            .flat_map(|v| v.vm.disks.iter().cloned())
            .collect();
        let agent = Arc::clone(&self.agent);
        let common = blocking(move || {
            let mut common: Option<BTreeSet<u64>> = None;
            for d in &disks {
                let storage = agent.received_storage(&d.host);
                let ids: BTreeSet<u64> = receiver
                    .recovery_checkpoints(&d.host, d.disk_id, &storage)
                    .map_err(|e| RecoveryError::Disk {
                        vm: String::new(),
                        disk: d.name.clone(),
                        source: e,
                    })?
                    .into_iter()
                    .filter(|(_, ok)| *ok)
                    .map(|(c, _)| c.id)
                    .collect();
                common = Some(match common {
                    None => ids,
                    Some(c) => c.intersection(&ids).copied().collect(),
                });
            }
            Ok(common.unwrap_or_default())
        })
        .await?;
        let ckpt = match checkpoint {
            None => *common
                .iter()
                .next_back()
                .ok_or_else(|| RecoveryError::NoCheckpoint {
                    vpg: rv.name.clone(),
                    detail: String::new(),
                })?,
            Some(c) if common.contains(&c) => c,
            Some(c) => {
                return Err(RecoveryError::NoCheckpoint {
                    vpg: rv.name.clone(),
                    detail: format!(
                        " with id {c} (recoverable: {})",
                        common
                            .iter()
                            .map(u64::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                })
            }
        };
        let mut order = rv.vms.clone();
        order.sort_by_key(|v| v.boot_group);
        let vms: Vec<RecoverVm> = order
            .iter()
            .map(|v| {
                let mut vm = v.vm.clone();
                if test && !vm.name.ends_with(" - Test") {
                    vm.name = format!("{} - Test", vm.name);
                }
                vm
            })
            .collect();
        let generation = self
            .agent
            .fencing()
            .current(&rv.vpg_id)
            .max(rv.fencing_generation);
        let req = RecoverRequest {
            operation: format!(
                "break-glass-{}-{ckpt}{}",
                rv.vpg_id,
                if test { "-test" } else { "" }
            ),
            vpg_id: rv.vpg_id.clone(),
            fencing_generation: generation,
            checkpoint: ckpt,
            test,
            scratch_budget_bytes: None,
            vms: vms.clone(),
        };
        self.recover(req.clone()).await?;
        let mut group = None;
        for (v, vm) in order.iter().zip(&vms) {
            if group.is_some_and(|g| g != v.boot_group) && v.boot_delay_secs > 0 {
                tokio::time::sleep(Duration::from_secs(v.boot_delay_secs)).await;
            }
            group = Some(v.boot_group);
            self.power_on_recovered(&vm.name).await?;
            tracing::info!(vm = %vm.name, group = v.boot_group, "break-glass: VM powered on");
        }
        let r = lock(&self.running)
            .get(&req.operation)
            .cloned()
            .ok_or_else(|| RecoveryError::Invalid("the recovery ended meanwhile".into()))?;
        Ok(BreakGlassReport {
            vpg: rv.name,
            nbd: self.agent.endpoints().nbd,
            report: self.report_of(&r),
        })
    }
}

/// Why `bulwark agent recover` could not ask the running agent.
#[derive(Debug, thiserror::Error)]
pub enum BreakGlassError {
    #[error("no running agent found: {} is missing (is `bulwark agent` running with this data directory?)", path.display())]
    NoEndpoints { path: PathBuf },
    #[error("{}: {reason}", path.display())]
    Endpoints { path: PathBuf, reason: String },
    #[error("the agent (pid {pid}) serves no admin endpoint: set `admin_listen` (or --admin-listen) and restart it")]
    NoAdmin { pid: u32 },
    #[error("the agent is not running (its admin endpoint {admin} does not answer: {reason})")]
    NotRunning { admin: String, reason: String },
    #[error("{0}")]
    Refused(String),
}

/// Break-glass from the command line: asks the agent running with `data_dir` (found by
/// its `run/endpoints.json`) to recover `vpg` through its admin endpoint.
pub async fn break_glass_via_admin(
    data_dir: &Path,
    vpg: &str,
    checkpoint: Option<u64>,
    test: bool,
) -> Result<BreakGlassReport, BreakGlassError> {
    let body = serde_json::json!({ "vpg": vpg, "checkpoint": checkpoint, "test": test });
    let out = admin_post(data_dir, "/v1/recoveries", &body).await?;
    serde_json::from_slice(&out).map_err(|e| BreakGlassError::Refused(e.to_string()))
}

/// Ends a recovery from the command line (a break-glass one, with no manager to do it):
/// commit makes its VMs this host's own, discard removes them.
pub async fn end_via_admin(
    data_dir: &Path,
    operation: &str,
    end: RecoveryEnd,
) -> Result<serde_json::Value, BreakGlassError> {
    let path = format!("/v1/recoveries/{operation}/end");
    let out = admin_post(data_dir, &path, &serde_json::json!({ "end": end })).await?;
    serde_json::from_slice(&out).map_err(|e| BreakGlassError::Refused(e.to_string()))
}

/// POSTs `body` to the admin endpoint of the agent running with `data_dir`; the
/// response body, or the problem's detail as the error.
async fn admin_post(
    data_dir: &Path,
    path: &str,
    body: &serde_json::Value,
) -> Result<Vec<u8>, BreakGlassError> {
    let ep_path = data_dir.join("run").join("endpoints.json");
    let bytes = match std::fs::read(&ep_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(BreakGlassError::NoEndpoints { path: ep_path })
        }
        Err(e) => {
            return Err(BreakGlassError::Endpoints {
                path: ep_path,
                reason: e.to_string(),
            })
        }
    };
    let ep: crate::proto::agent::AgentEndpoints =
        serde_json::from_slice(&bytes).map_err(|e| BreakGlassError::Endpoints {
            path: ep_path.clone(),
            reason: e.to_string(),
        })?;
    let admin = ep.admin.ok_or(BreakGlassError::NoAdmin { pid: ep.pid })?;
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        // Boot-order delays make a recovery's answer take as long as the groups' delays.
        .timeout(Duration::from_secs(3600))
        .build()
        .map_err(|e| BreakGlassError::Refused(e.to_string()))?;
    let resp = client
        .post(format!("http://{admin}{path}"))
        .json(body)
        .send()
        .await
        .map_err(|e| BreakGlassError::NotRunning {
            admin: admin.clone(),
            reason: e.to_string(),
        })?;
    let status = resp.status();
    let body = resp
        .bytes()
        .await
        .map_err(|e| BreakGlassError::Refused(e.to_string()))?;
    if !status.is_success() {
        let detail = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(BreakGlassError::Refused(detail));
    }
    Ok(body.to_vec())
}

fn disk_label(_dev: &Arc<dyn BlockDevice>) -> String {
    "protected disk".into()
}

/// A file name for an operation id (ids are the manager's: keep only safe characters,
/// with a hash so that two ids differing only in the others do not share a file).
fn spec_file_stem(operation: &str) -> String {
    let clean: String = operation
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if clean == operation {
        clean
    } else {
        format!("{clean}-{:08x}", crc32c::crc32c(operation.as_bytes()))
    }
}

/// Moves `src` to `dst` durably: rename, or (another filesystem) copy, fsync, rename
/// into place, then delete `src`. Done already (source gone, target there) is success.
fn move_file(src: &Path, dst: &Path) -> Result<()> {
    let io_e = |what: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| RecoveryError::Io { what, path, source }
    };
    if !src.exists() && dst.exists() {
        return Ok(());
    }
    if let Some(parent) = dst.parent() {
        std::fs::create_dir_all(parent).map_err(io_e("create", parent))?;
    }
    if dst.exists() {
        return Err(RecoveryError::Invalid(format!(
            "{} already exists: a local disk of that name is in the way",
            dst.display()
        )));
    }
    match std::fs::rename(src, dst) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let tmp = crashsafe::temp_path(dst);
            std::fs::copy(src, &tmp).map_err(io_e("copy", src))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io_e("fsync", &tmp))?;
            std::fs::rename(&tmp, dst).map_err(io_e("rename", &tmp))?;
            crashsafe::sync_parent_dir(dst)?;
            std::fs::remove_file(src).map_err(io_e("delete", src))?;
        }
        Err(e) => return Err(io_e("rename", src)(e)),
    }
    crashsafe::sync_parent_dir(dst)?;
    crashsafe::sync_parent_dir(src)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_names_are_safe_and_tests_never_collide_with_live() {
        let live = export_name("web", "disk0", "op-1", false);
        let test = export_name("web - Test", "disk0", "op-1", true);
        assert_eq!(live, "web.disk0");
        assert_eq!(test, "web_-_Test.disk0.top-1");
        assert!(crate::agent::host::config::check_disk_name(&test).is_ok());
        let odd = export_name(".x/y", "a b", "1234567890abcdefgh", true);
        assert!(
            crate::agent::host::config::check_disk_name(&odd).is_ok(),
            "{odd}"
        );
        assert!(!odd.contains('/') && !odd.contains(' '));
        assert_ne!(spec_file_stem("a/b"), spec_file_stem("a_b"));
        assert_eq!(spec_file_stem("op-1"), "op-1");
    }
}
