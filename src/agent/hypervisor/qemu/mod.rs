//! The QEMU driver (`hypervisor = "qemu"`): every running VM is a `qemu-system-x86_64`
//! process the agent supervises.
//!
//! - The VMs, their definitions and power states are a [`VmCatalog`]'s, as with the
//!   simulated driver; this driver makes the power state real.
//! - A VM's disks are the agent's NBD exports on its unix socket
//!   (`<data-dir>/run/nbd.sock`) with `reconnect-delay`: every guest write goes through
//!   the protected device, and an agent restart holds the guest's I/O instead of failing
//!   it.
//! - QEMU runs daemonized (its own session, not the agent's child): it outlives a killed
//!   agent, and the next agent re-attaches through the VM's QMP socket
//!   (`<data-dir>/vms/<vm>/qmp.sock`) instead of restarting the guest.
//! - Power-off asks the guest first (ACPI `system_powerdown`), then `quit` after
//!   `powerdown_timeout`, then SIGKILL.
//! - QMP events become agent events: `vm_shutdown`, `vm_stopped`, `vm_resumed`,
//!   `vm_block_io_error`; a QEMU that ends by itself is a `vm_power` off.
//! - Quiesce: `guest-fsfreeze-freeze` through the guest agent when the guest has its
//!   channel open (application consistent), else QMP `stop`/`cont` (crash consistent).
//! - The serial console goes to `serial.log` in the VM's directory.

pub mod cmdline;
pub mod qmp;

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use self::cmdline::{Accel, MachineArgs, NbdEndpoint, VmFiles};
use self::qmp::{Monitor, QmpEvent};
use super::{event, HypervisorDriver, HypervisorError, PowerChange, VmCatalog, VmSpec};
use crate::agent::host::config::{nbd_socket_path, QemuSection, MAX_UNIX_PATH};
use crate::proto::control::{
    AgentEvent, ConsoleTail, Inventory, InventoryVm, PowerState, QuiesceMethod,
};

/// A serial log larger than this is rotated (when the VM starts, and every
/// `HOUSEKEEPING_EVERY` while it runs), keeping its last `SERIAL_KEEP_BYTES`.
const SERIAL_ROTATE_BYTES: u64 = 1 << 20;
const SERIAL_KEEP_BYTES: u64 = 256 << 10;
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(30);
/// Bound on QMP commands that should answer at once.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on QEMU's start (until it daemonizes, its disks connected and kernel loaded).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a `quit` or a SIGKILL may take to end the process.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// `BLOCK_IO_ERROR` events of one VM become at most one agent event per this period.
const IO_ERROR_EVENT_EVERY: Duration = Duration::from_secs(1);

/// `accel` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Force(Accel),
}

/// The driver's settings (`[agent.qemu]`).
#[derive(Debug, Clone)]
pub struct QemuSettings {
    pub binary: PathBuf,
    pub accel: AccelChoice,
    pub powerdown_timeout: Duration,
    pub reconnect_delay: Duration,
    /// `<data-dir>/vms`: one directory per VM.
    pub vms_dir: PathBuf,
    pub nbd: NbdEndpoint,
}

impl QemuSettings {
    pub fn resolve(
        section: &QemuSection,
        data_dir: &Path,
    ) -> Result<QemuSettings, HypervisorError> {
        let accel = match section.accel.as_deref().unwrap_or("auto") {
            "auto" => AccelChoice::Auto,
            "kvm" => AccelChoice::Force(Accel::Kvm),
            "tcg" => AccelChoice::Force(Accel::Tcg),
            other => {
                return Err(HypervisorError::Settings(format!(
                    "qemu.accel `{other}`: expected `auto`, `kvm` or `tcg`"
                )))
            }
        };
        let socket = nbd_socket_path(data_dir);
        let vms_dir = data_dir.join("vms");
        // The longest socket path is a VM's `<vms>/<dir>/qmp.sock`.
        let longest = vms_dir.as_os_str().len() + 1 + VM_DIR_MAX + "/qmp.sock".len();
        if longest >= MAX_UNIX_PATH || socket.as_os_str().len() >= MAX_UNIX_PATH {
            return Err(HypervisorError::Settings(format!(
                "data directory {} is too long for the QEMU driver's unix sockets (at most {} bytes)",
                data_dir.display(),
                MAX_UNIX_PATH - 1 - (longest - data_dir.as_os_str().len())
            )));
        }
        let secs = |v: Option<u64>, default: u64, field: &str| match v.unwrap_or(default) {
            0 => Err(HypervisorError::Settings(format!(
                "qemu.{field} must be at least 1"
            ))),
            s => Ok(Duration::from_secs(s)),
        };
        Ok(QemuSettings {
            binary: section
                .binary
                .clone()
                .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64")),
            accel,
            powerdown_timeout: secs(section.powerdown_timeout_secs, 30, "powerdown_timeout_secs")?,
            reconnect_delay: secs(section.reconnect_delay_secs, 60, "reconnect_delay_secs")?,
            vms_dir,
            nbd: NbdEndpoint::Unix(socket),
        })
    }
}

/// Longest VM directory name: a readable prefix and a hash of the whole name.
const VM_DIR_MAX: usize = 24 + 1 + 8;

/// The directory of `vm`: its name reduced to `[A-Za-z0-9_-]` (24 characters at most)
/// and 8 hex digits of its hash, so every name maps to its own short path.
pub fn vm_dir_name(vm: &str) -> String {
    let clean: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(24)
        .collect();
    let hash = blake3::hash(vm.as_bytes());
    format!("{clean}-{}", &hash.to_hex()[..8])
}

/// A running VM's process and monitor.
#[derive(Debug)]
struct Machine {
    name: String,
    pid: i32,
    monitor: Arc<Monitor>,
    /// A power-off was asked for: the end of the process is expected.
    stopping: AtomicBool,
    /// The guest asked for its shutdown (ACPI power-off, `poweroff`).
    guest_shutdown: AtomicBool,
    exited: Mutex<bool>,
    exit_cv: Condvar,
    /// How the VM is quiesced now, if it is.
    quiesced: Mutex<Option<QuiesceMethod>>,
    /// Our own `stop`/`cont` around a checkpoint is not news.
    pausing: AtomicBool,
    io_errors: AtomicU64,
    last_io_event: Mutex<Option<Instant>>,
}

impl Machine {
    fn wait_exit(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut exited = lock(&self.exited);
        while !*exited {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                return false;
            };
            exited = self
                .exit_cv
                .wait_timeout(exited, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        true
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `pid (comm) S …`: the state follows the last `)`.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone (or a zombie), up to `within`.
fn wait_gone(pid: i32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn qemu_err(vm: &str, reason: impl Into<String>) -> HypervisorError {
    HypervisorError::Qemu {
        vm: vm.to_string(),
        reason: reason.into(),
    }
}

/// The QEMU driver. See the module documentation.
pub struct QemuHypervisor {
    catalog: Arc<VmCatalog>,
    settings: QemuSettings,
    accel: Accel,
    machines: Mutex<BTreeMap<String, Arc<Machine>>>,
    me: Weak<QemuHypervisor>,
}

impl std::fmt::Debug for QemuHypervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuHypervisor")
            .field("settings", &self.settings)
            .field("accel", &self.accel)
            .finish_non_exhaustive()
    }
}

impl QemuHypervisor {
    /// The driver over `catalog` (blocking): picks the accelerator, and re-attaches to
    /// the guests of VMs recorded `on` whose QEMU still runs (a previous agent's).
    pub fn open(
        catalog: Arc<VmCatalog>,
        settings: QemuSettings,
    ) -> Result<Arc<QemuHypervisor>, HypervisorError> {
        std::fs::create_dir_all(&settings.vms_dir).map_err(|e| HypervisorError::State {
            path: settings.vms_dir.clone(),
            reason: e.to_string(),
        })?;
        let accel = match settings.accel {
            AccelChoice::Force(a) => a,
            AccelChoice::Auto => {
                // A kernel some VM boots is the best probe there is (see `probe`).
                let kernel = catalog
                    .inventory()
                    .vms
                    .into_iter()
                    .find_map(|v| match v.boot {
                        Some(crate::proto::control::Boot::Kernel { kernel, .. }) => Some(kernel),
                        _ => None,
                    });
                probe_accel(&settings.binary, &settings.vms_dir, kernel.as_deref())
            }
        };
        tracing::info!(accel = accel.as_str(), binary = %settings.binary.display(), "QEMU driver");
        let hv = Arc::new_cyclic(|me| QemuHypervisor {
            catalog,
            settings,
            accel,
            machines: Mutex::new(BTreeMap::new()),
            me: me.clone(),
        });
        // Keeps the running guests' serial logs bounded; ends with the driver.
        let weak = Arc::downgrade(&hv);
        std::thread::Builder::new()
            .name("qemu-housekeeping".into())
            .spawn(move || loop {
                std::thread::sleep(HOUSEKEEPING_EVERY);
                let Some(hv) = weak.upgrade() else { return };
                let running: Vec<String> = lock(&hv.machines).keys().cloned().collect();
                for vm in running {
                    rotate_serial(&hv.files(&vm), SERIAL_ROTATE_BYTES);
                }
            })
            .map_err(|e| HypervisorError::Task(e.to_string()))?;
        for vm in hv.catalog.inventory().vms {
            if vm.power_state != PowerState::On {
                continue;
            }
            match hv.attach(&vm.name) {
                Ok(true) => tracing::info!(vm = %vm.name, "re-attached to a running guest"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(vm = %vm.name, error = %e, "cannot re-attach to the guest")
                }
            }
        }
        Ok(hv)
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.accel
    }

    /// The files of `vm`.
    pub fn files(&self, vm: &str) -> VmFiles {
        VmFiles {
            dir: self.settings.vms_dir.join(vm_dir_name(vm)),
        }
    }

    /// The QEMU process of a running VM.
    pub fn pid(&self, vm: &str) -> Option<i32> {
        lock(&self.machines).get(vm).map(|m| m.pid)
    }

    /// `BLOCK_IO_ERROR` events seen for `vm` since this agent attached to it.
    pub fn io_errors(&self, vm: &str) -> Option<u64> {
        lock(&self.machines)
            .get(vm)
            .map(|m| m.io_errors.load(Ordering::SeqCst))
    }

    fn machine(&self, vm: &str) -> Option<Arc<Machine>> {
        lock(&self.machines)
            .get(vm)
            .filter(|m| !*lock(&m.exited))
            .cloned()
    }

    /// Connects to a QEMU left running by an earlier agent. `Ok(false)`: none runs.
    fn attach(&self, vm: &str) -> Result<bool, HypervisorError> {
        let files = self.files(vm);
        let Some(pid) = read_pid(&files.pid()) else {
            return Ok(false);
        };
        if !alive(pid) {
            return Ok(false);
        }
        self.monitor(vm, pid, &files)?;
        Ok(true)
    }

    /// Opens the QMP connection of a started (or surviving) QEMU and registers it.
    fn monitor(
        &self,
        vm: &str,
        pid: i32,
        files: &VmFiles,
    ) -> Result<Arc<Machine>, HypervisorError> {
        let slot: Arc<Mutex<Option<Weak<Machine>>>> = Arc::default();
        let (on_event, on_close) = {
            let (me, slot) = (self.me.clone(), Arc::clone(&slot));
            let (me2, slot2) = (self.me.clone(), Arc::clone(&slot));
            (
                move |ev: QmpEvent| {
                    let m = lock(&slot).as_ref().and_then(Weak::upgrade);
                    if let (Some(hv), Some(m)) = (me.upgrade(), m) {
                        hv.on_event(&m, ev);
                    }
                },
                move || {
                    let m = lock(&slot2).as_ref().and_then(Weak::upgrade);
                    if let (Some(hv), Some(m)) = (me2.upgrade(), m) {
                        hv.on_exit(&m);
                    }
                },
            )
        };
        let monitor = Monitor::connect(&files.qmp(), QMP_TIMEOUT, on_event, on_close)
            .map_err(|e| qemu_err(vm, format!("QMP {}: {e}", files.qmp().display())))?;
        let machine = Arc::new(Machine {
            name: vm.to_string(),
            pid,
            monitor: Arc::clone(&monitor),
            stopping: AtomicBool::new(false),
            guest_shutdown: AtomicBool::new(false),
            exited: Mutex::new(false),
            exit_cv: Condvar::new(),
            quiesced: Mutex::new(None),
            pausing: AtomicBool::new(false),
            io_errors: AtomicU64::new(0),
            last_io_event: Mutex::new(None),
        });
        *lock(&slot) = Some(Arc::downgrade(&machine));
        lock(&self.machines).insert(vm.to_string(), Arc::clone(&machine));
        if monitor.is_closed() {
            // It ended between the connect and the registration.
            self.on_exit(&machine);
        }
        Ok(machine)
    }

    fn on_event(&self, m: &Machine, ev: QmpEvent) {
        let data = &ev.data;
        let emit = |kind: &str, message: String| {
            self.catalog.emit(event(
                kind,
                &m.name,
                message,
                json!({ "qmp": ev.name, "data": data }),
            ));
        };
        match ev.name.as_str() {
            "SHUTDOWN" => {
                let guest = data.get("guest").and_then(Value::as_bool).unwrap_or(false);
                m.guest_shutdown.store(guest, Ordering::SeqCst);
                let reason = data
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown");
                emit(
                    "vm_shutdown",
                    format!(
                        "VM {} shut down ({}, {reason})",
                        m.name,
                        if guest { "by the guest" } else { "by the host" }
                    ),
                );
            }
            "STOP" if !m.pausing.load(Ordering::SeqCst) => {
                emit("vm_stopped", format!("VM {} paused", m.name));
            }
            "RESUME" if !m.pausing.load(Ordering::SeqCst) => {
                emit("vm_resumed", format!("VM {} resumed", m.name));
            }
            "BLOCK_IO_ERROR" => {
                let n = m.io_errors.fetch_add(1, Ordering::SeqCst) + 1;
                let mut last = lock(&m.last_io_event);
                if last.is_some_and(|t| t.elapsed() < IO_ERROR_EVENT_EVERY) {
                    return;
                }
                *last = Some(Instant::now());
                let op = data.get("operation").and_then(Value::as_str).unwrap_or("?");
                let reason = data.get("reason").and_then(Value::as_str).unwrap_or("");
                tracing::error!(vm = %m.name, op, reason, count = n, "guest disk I/O error");
                self.catalog.emit(event(
                    "vm_block_io_error",
                    &m.name,
                    format!("VM {}: disk {op} error ({reason}), {n} so far", m.name),
                    json!({ "qmp": ev.name, "data": data, "count": n }),
                ));
            }
            other => tracing::debug!(vm = %m.name, event = other, "QMP event"),
        }
    }

    /// The QMP connection ended: QEMU exited (or was killed).
    fn on_exit(&self, m: &Arc<Machine>) {
        {
            let mut exited = lock(&m.exited);
            if *exited {
                return;
            }
            *exited = true;
        }
        m.exit_cv.notify_all();
        {
            let mut machines = lock(&self.machines);
            if machines.get(&m.name).is_some_and(|x| Arc::ptr_eq(x, m)) {
                machines.remove(&m.name);
            }
        }
        if m.stopping.load(Ordering::SeqCst) {
            return; // power_off records the new state itself
        }
        let cause = if m.guest_shutdown.load(Ordering::SeqCst) {
            "guest"
        } else {
            "exited"
        };
        tracing::warn!(vm = %m.name, cause, "QEMU ended without a power-off request");
        if let Err(e) = self.catalog.set_power(&m.name, PowerState::Off, cause) {
            tracing::warn!(vm = %m.name, error = %e, "cannot record the VM as off");
        }
    }

    /// Starts QEMU for `vm` and attaches to it.
    fn start(&self, vm: &InventoryVm) -> Result<Arc<Machine>, HypervisorError> {
        let boot = vm.boot.as_ref().ok_or_else(|| {
            qemu_err(
                &vm.name,
                "the VM has no boot definition (`boot` of [[agent.vms]] or of the create request)",
            )
        })?;
        let files = self.files(&vm.name);
        std::fs::create_dir_all(&files.dir)
            .map_err(|e| qemu_err(&vm.name, format!("{}: {e}", files.dir.display())))?;
        for stale in [files.qmp(), files.guest_agent(), files.pid()] {
            let _ = std::fs::remove_file(stale);
        }
        rotate_serial(&files, SERIAL_ROTATE_BYTES);
        let args = cmdline::args(&MachineArgs {
            name: &vm.name,
            cpus: vm.cpus,
            memory_mib: vm.memory_mib,
            exports: vm.disks.iter().map(|d| d.export.as_str()).collect(),
            boot,
            nics: &vm.nics,
            accel: self.accel,
            nbd: &self.settings.nbd,
            reconnect_delay: self.settings.reconnect_delay,
            files: &files,
        });
        tracing::debug!(vm = %vm.name, ?args, "starting QEMU");
        run_daemonizing(&self.settings.binary, &args, START_TIMEOUT)
            .map_err(|reason| qemu_err(&vm.name, reason))?;
        let pid = read_pid(&files.pid())
            .ok_or_else(|| qemu_err(&vm.name, "QEMU started but wrote no pid file"))?;
        match self.monitor(&vm.name, pid, &files) {
            Ok(m) => {
                tracing::info!(vm = %vm.name, pid, accel = self.accel.as_str(), "QEMU started");
                Ok(m)
            }
            Err(e) => {
                kill(pid);
                Err(e)
            }
        }
    }

    /// Ends `vm`'s QEMU: ACPI power-down first when `graceful`, `quit` after the
    /// timeout, SIGKILL last.
    fn stop(&self, m: &Arc<Machine>, graceful: bool) {
        m.stopping.store(true, Ordering::SeqCst);
        if graceful {
            match m.monitor.execute("system_powerdown", None, QMP_TIMEOUT) {
                Ok(_) => {
                    if m.wait_exit(self.settings.powerdown_timeout) {
                        wait_gone(m.pid, EXIT_TIMEOUT);
                        return;
                    }
                    tracing::warn!(vm = %m.name, timeout = ?self.settings.powerdown_timeout, "guest ignored the ACPI power-down: quitting QEMU");
                }
                Err(e) => {
                    tracing::warn!(vm = %m.name, error = %e, "ACPI power-down failed: quitting QEMU")
                }
            }
        }
        let _ = m.monitor.execute("quit", None, QMP_TIMEOUT);
        if m.wait_exit(EXIT_TIMEOUT) && wait_gone(m.pid, EXIT_TIMEOUT) {
            return;
        }
        tracing::warn!(vm = %m.name, pid = m.pid, "QEMU did not quit: killing it");
        kill(m.pid);
        wait_gone(m.pid, EXIT_TIMEOUT);
    }

    /// Stops `vm`'s QEMU if one runs (without asking the guest), then forgets it.
    fn stop_hard(&self, vm: &str) {
        if let Some(m) = self.machine(vm) {
            self.stop(&m, false);
        }
        lock(&self.machines).remove(vm);
    }

    fn quiesce_one(&self, vm: &str, deadline: Instant) -> Result<QuiesceMethod, HypervisorError> {
        let Some(m) = self.machine(vm) else {
            // Off: nothing writes to its disks.
            return Ok(QuiesceMethod::GuestAgent);
        };
        let left = || {
            deadline
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero())
                .ok_or_else(|| HypervisorError::Quiesce {
                    vm: vm.to_string(),
                    reason: "no time left within the round's bound".into(),
                })
        };
        let fail = |reason: String| HypervisorError::Quiesce {
            vm: vm.to_string(),
            reason,
        };
        if guest_agent_open(&m.monitor, left()?) {
            let path = self.files(vm).guest_agent();
            match qmp::guest_agent(&path, "guest-fsfreeze-freeze", None, left()?) {
                Ok(_) => {
                    *lock(&m.quiesced) = Some(QuiesceMethod::GuestAgent);
                    return Ok(QuiesceMethod::GuestAgent);
                }
                Err(e) => {
                    // A freeze that timed out may still complete in the guest: thaw it,
                    // without making the round wait.
                    std::thread::spawn(move || {
                        let _ = qmp::guest_agent(&path, "guest-fsfreeze-thaw", None, QMP_TIMEOUT);
                    });
                    return Err(fail(format!("guest agent: {e}")));
                }
            }
        }
        m.pausing.store(true, Ordering::SeqCst);
        match m.monitor.execute("stop", None, left()?) {
            Ok(_) => {
                *lock(&m.quiesced) = Some(QuiesceMethod::Paused);
                Ok(QuiesceMethod::Paused)
            }
            Err(e) => {
                // A stop that timed out may still happen: undo it without making the
                // round wait for a QEMU that does not answer.
                let (monitor, machine) = (Arc::clone(&m.monitor), Arc::clone(&m));
                std::thread::spawn(move || {
                    let _ = monitor.execute("cont", None, QMP_TIMEOUT);
                    machine.pausing.store(false, Ordering::SeqCst);
                });
                Err(fail(format!("QMP stop: {e}")))
            }
        }
    }

    fn thaw_one(&self, vm: &str) {
        let Some(m) = self.machine(vm) else {
            return;
        };
        let method = lock(&m.quiesced).take();
        match method {
            Some(QuiesceMethod::GuestAgent) => {
                let path = self.files(vm).guest_agent();
                if let Err(e) = qmp::guest_agent(&path, "guest-fsfreeze-thaw", None, QMP_TIMEOUT) {
                    tracing::error!(vm, error = %e, "guest agent thaw failed: the guest's filesystems may stay frozen");
                }
            }
            Some(QuiesceMethod::Paused) => {
                if let Err(e) = m.monitor.execute("cont", None, QMP_TIMEOUT) {
                    tracing::error!(vm, error = %e, "QMP cont failed: the VM stays paused");
                }
                m.pausing.store(false, Ordering::SeqCst);
            }
            None => {}
        }
    }
}

/// Whether the guest has the guest agent's channel open (qemu-guest-agent runs).
fn guest_agent_open(monitor: &Monitor, within: Duration) -> bool {
    let Ok(chardevs) = monitor.execute("query-chardev", None, within.min(QMP_TIMEOUT)) else {
        return false;
    };
    chardevs.as_array().is_some_and(|list| {
        list.iter().any(|c| {
            c.get("label").and_then(Value::as_str) == Some("qga0")
                && c.get("frontend-open").and_then(Value::as_bool) == Some(true)
        })
    })
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn kill(pid: i32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
    }
}

/// Runs QEMU with `-daemonize`: the command returns once the VM is set up (disks
/// connected, kernel loaded) or failed; on failure the answer is what QEMU said.
fn run_daemonizing(binary: &Path, args: &[String], within: Duration) -> Result<(), String> {
    let mut child = Command::new(binary)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", binary.display()))?;
    // Read stderr on a thread: the daemon keeps the pipe until it has set up.
    let mut stderr = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(s) = stderr.as_mut() {
            let _ = s.take(64 << 10).read_to_string(&mut text);
        }
        text
    });
    let deadline = Instant::now() + within;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("QEMU did not finish starting within {within:?}"));
            }
            Err(e) => return Err(format!("waiting for QEMU: {e}")),
        }
    };
    let text = reader.join().unwrap_or_default();
    let text = text.trim();
    if status.success() {
        if !text.is_empty() {
            tracing::info!(output = text, "QEMU said while starting");
        }
        return Ok(());
    }
    Err(if text.is_empty() {
        format!("QEMU exited with {status}")
    } else {
        // The last lines say why; keep the message readable.
        let tail: String = text
            .chars()
            .rev()
            .take(2000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        tail
    })
}

/// Moves a serial log larger than `limit` to `serial.log.0` (replacing the older one).
/// Keeps a serial log under `limit`: past it, its last `SERIAL_KEEP_BYTES` replace
/// `serial.log.0` and the log starts over. Safe while QEMU runs: it opened the log for
/// appending, so its next line lands at the new end (a line written between the copy
/// and the truncation is lost).
fn rotate_serial(files: &VmFiles, limit: u64) {
    let rotate = || -> std::io::Result<bool> {
        let len = match std::fs::metadata(files.serial()) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        if len <= limit {
            return Ok(false);
        }
        let log = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(files.serial())?;
        let keep = len.min(SERIAL_KEEP_BYTES);
        let mut tail = vec![0u8; keep as usize];
        std::os::unix::fs::FileExt::read_exact_at(&log, &mut tail, len - keep)?;
        std::fs::write(files.serial_old(), &tail)?;
        log.set_len(0)?;
        Ok(true)
    };
    match rotate() {
        Ok(true) => tracing::debug!(log = %files.serial().display(), "serial log rotated"),
        Ok(false) => {}
        Err(e) => {
            tracing::warn!(log = %files.serial().display(), error = %e, "cannot rotate the serial log")
        }
    }
}

/// The last `max` bytes of `old` followed by `cur`, starting at a line when cut.
fn tail_of(old: &[u8], cur: &[u8], max: usize) -> (Vec<u8>, bool) {
    let total = old.len() + cur.len();
    if total <= max {
        return ([old, cur].concat(), false);
    }
    let skip = total - max;
    let byte = |i: usize| {
        if i < old.len() {
            old[i]
        } else {
            cur[i - old.len()]
        }
    };
    let mut out = if skip >= old.len() {
        cur[skip - old.len()..].to_vec()
    } else {
        [&old[skip..], cur].concat()
    };
    // Cut inside a line: its rest goes.
    if byte(skip - 1) != b'\n' {
        if let Some(nl) = out.iter().position(|&b| b == b'\n') {
            out.drain(..=nl);
        }
    }
    (out, true)
}

/// Picks KVM when `/dev/kvm` is usable and a guest actually boots under it here
/// (`kernel`: one a VM boots); otherwise TCG. Nested KVM on some hosts opens fine and
/// then hangs every Linux guest: only booting one tells.
fn probe_accel(binary: &Path, scratch: &Path, kernel: Option<&str>) -> Accel {
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        return Accel::Tcg;
    }
    match probe::kvm_runs_a_guest(binary, &scratch.join(".kvm-probe"), kernel) {
        Ok(true) => Accel::Kvm,
        Ok(false) => {
            tracing::warn!("KVM is present but a probe guest did not run under it: using TCG");
            Accel::Tcg
        }
        Err(e) => {
            tracing::warn!(error = %e, "KVM probe failed: using TCG");
            Accel::Tcg
        }
    }
}

pub mod probe;

impl HypervisorDriver for QemuHypervisor {
    fn inventory(&self) -> Inventory {
        self.catalog.inventory()
    }

    fn create_vm(&self, spec: &VmSpec) -> Result<InventoryVm, HypervisorError> {
        if spec.boot.is_none() {
            return Err(super::invalid(
                "boot",
                "a QEMU VM needs a boot definition: { kind = \"kernel\", kernel, initrd, cmdline } or { kind = \"firmware\" }",
            ));
        }
        // Recorded `on`; [`HostVms::create`](super::HostVms::create) starts the guest
        // once its disks are served.
        self.catalog.create_vm(spec)
    }

    fn power_on(&self, name: &str) -> Result<PowerChange, HypervisorError> {
        let vm = self
            .catalog
            .get(name)
            .ok_or_else(|| HypervisorError::NoSuchVm(name.to_string()))?;
        if vm.prepared_for_failover {
            return Err(HypervisorError::Prepared(name.to_string()));
        }
        if self.machine(name).is_none() {
            if let Err(e) = self.start(&vm) {
                if vm.power_state == PowerState::On {
                    let _ = self.catalog.set_power(name, PowerState::Off, "failed");
                }
                return Err(e);
            }
        }
        self.catalog.set_power(name, PowerState::On, "request")
    }

    fn power_off(&self, name: &str) -> Result<PowerChange, HypervisorError> {
        if self.catalog.get(name).is_none() {
            return Err(HypervisorError::NoSuchVm(name.to_string()));
        }
        if let Some(m) = self.machine(name) {
            self.stop(&m, true);
            lock(&self.machines).remove(name);
        }
        self.catalog.set_power(name, PowerState::Off, "request")
    }

    fn quiesce(&self, vms: &[String], within: Duration) -> Result<QuiesceMethod, HypervisorError> {
        let deadline = Instant::now() + within;
        let mut done: Vec<&String> = Vec::new();
        let mut method = QuiesceMethod::GuestAgent;
        for vm in vms {
            if self.catalog.get(vm).is_none() {
                self.thaw(&done.into_iter().cloned().collect::<Vec<_>>());
                return Err(HypervisorError::NoSuchVm(vm.clone()));
            }
            match self.quiesce_one(vm, deadline) {
                Ok(m) => {
                    method = method.weakest(m);
                    done.push(vm);
                }
                Err(e) => {
                    self.thaw(&done.into_iter().cloned().collect::<Vec<_>>());
                    return Err(e);
                }
            }
        }
        Ok(method)
    }

    fn thaw(&self, vms: &[String]) {
        for vm in vms {
            self.thaw_one(vm);
        }
    }

    fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.catalog.subscribe()
    }

    fn console(&self, vm: &str, max_bytes: u64) -> Result<ConsoleTail, HypervisorError> {
        if self.catalog.get(vm).is_none() {
            return Err(HypervisorError::NoSuchVm(vm.to_string()));
        }
        let files = self.files(vm);
        let read = |p: PathBuf| match std::fs::read(&p) {
            Ok(b) => Ok(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(HypervisorError::State {
                path: p,
                reason: e.to_string(),
            }),
        };
        let (old, cur) = (read(files.serial_old())?, read(files.serial())?);
        let max = usize::try_from(max_bytes).unwrap_or(usize::MAX);
        let (text, truncated) = tail_of(&old, &cur, max);
        Ok(ConsoleTail {
            vm: vm.to_string(),
            text: String::from_utf8_lossy(&text).into_owned(),
            total_bytes: (old.len() + cur.len()) as u64,
            truncated,
        })
    }

    fn resume(&self) -> Vec<(String, HypervisorError)> {
        let mut failed = Vec::new();
        for vm in self.catalog.inventory().vms {
            if vm.power_state != PowerState::On || self.machine(&vm.name).is_some() {
                continue;
            }
            if vm.boot.is_none() {
                // A bare disk shown as a VM: nothing to boot.
                let _ = self.catalog.set_power(&vm.name, PowerState::Off, "no_boot");
                continue;
            }
            tracing::info!(vm = %vm.name, "starting a VM recorded as running");
            if let Err(e) = self.start(&vm) {
                let _ = self.catalog.set_power(&vm.name, PowerState::Off, "failed");
                failed.push((vm.name.clone(), e));
            }
        }
        failed
    }

    fn create_recovered_vm(&self, spec: &VmSpec) -> Result<InventoryVm, HypervisorError> {
        self.catalog.create_recovered_vm(spec)
    }

    fn remove_recovered_vm(&self, name: &str) -> Result<bool, HypervisorError> {
        if self.catalog.is_recovered(name) {
            self.stop_hard(name);
        }
        let removed = self.catalog.remove_recovered_vm(name)?;
        if removed {
            let _ = std::fs::remove_dir_all(self.files(name).dir);
        }
        Ok(removed)
    }

    fn adopt_recovered_vm(&self, name: &str) -> Result<InventoryVm, HypervisorError> {
        // The guest keeps running: its disks' exports keep their names as local disks.
        self.catalog.adopt_recovered_vm(name)
    }

    fn set_prepared(&self, name: &str, prepared: bool) -> Result<InventoryVm, HypervisorError> {
        self.catalog.set_prepared(name, prepared)
    }

    fn remove_seeded_vm(&self, name: &str) -> Result<bool, HypervisorError> {
        self.stop_hard(name);
        self.catalog.remove_seeded_vm(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_directories_are_short_distinct_and_safe() {
        let a = vm_dir_name("web - Test");
        let b = vm_dir_name("web _ Test");
        assert_ne!(a, b, "same cleaned prefix, different names");
        assert!(a.starts_with("web_-_Test-"), "{a}");
        let long = vm_dir_name(&"x".repeat(200));
        assert_eq!(long.len(), VM_DIR_MAX);
        assert!(vm_dir_name("../../etc")
            .chars()
            .all(|c| c != '/' && c != '.'));
    }

    #[test]
    fn console_tails_start_at_a_line() {
        assert_eq!(tail_of(b"a\n", b"b\n", 10), (b"a\nb\n".to_vec(), false));
        // Cut at a line boundary: whole lines stay.
        assert_eq!(
            tail_of(b"one\ntwo\n", b"three\n", 10),
            (b"two\nthree\n".to_vec(), true)
        );
        assert_eq!(
            tail_of(b"one\ntwo\n", b"three\n", 11),
            (b"two\nthree\n".to_vec(), true)
        );
        // Cut inside a line of the old log: the partial line goes.
        assert_eq!(
            tail_of(b"one\ntwo\n", b"three\n", 9),
            (b"three\n".to_vec(), true)
        );
        assert_eq!(
            tail_of(b"", b"l1\nl2\nl3\n", 7),
            (b"l2\nl3\n".to_vec(), true)
        );
    }

    #[test]
    fn serial_logs_rotate_keeping_their_tail() {
        let dir = tempfile::tempdir().unwrap();
        let files = VmFiles {
            dir: dir.path().to_path_buf(),
        };
        rotate_serial(&files, 10); // no log yet: nothing to do
        let line = b"0123456789abcdef\n";
        let body: Vec<u8> = line.repeat((SERIAL_KEEP_BYTES as usize / line.len()) + 100);
        std::fs::write(files.serial(), &body).unwrap();
        rotate_serial(&files, body.len() as u64);
        assert_eq!(
            std::fs::read(files.serial()).unwrap(),
            body,
            "under the limit"
        );
        rotate_serial(&files, 1024);
        assert!(std::fs::read(files.serial()).unwrap().is_empty());
        let old = std::fs::read(files.serial_old()).unwrap();
        assert_eq!(old.len() as u64, SERIAL_KEEP_BYTES);
        assert!(body.ends_with(&old));
    }

    #[test]
    fn settings_refuse_bad_values_and_long_paths() {
        let dir = Path::new("/tmp/d");
        let ok = QemuSettings::resolve(&QemuSection::default(), dir).unwrap();
        assert_eq!(ok.accel, AccelChoice::Auto);
        assert_eq!(ok.powerdown_timeout, Duration::from_secs(30));
        assert_eq!(ok.nbd, NbdEndpoint::Unix("/tmp/d/run/nbd.sock".into()));
        let bad = QemuSection {
            accel: Some("xen".into()),
            ..Default::default()
        };
        assert!(QemuSettings::resolve(&bad, dir).is_err());
        let zero = QemuSection {
            powerdown_timeout_secs: Some(0),
            ..Default::default()
        };
        assert!(QemuSettings::resolve(&zero, dir).is_err());
        let long = PathBuf::from(format!("/tmp/{}", "d".repeat(90)));
        let e = QemuSettings::resolve(&QemuSection::default(), &long).unwrap_err();
        assert!(e.to_string().contains("too long"), "{e}");
    }
}
