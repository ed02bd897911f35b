//! The harness of the real-VM tests: the test guest image (built once by
//! `scripts/guest/build.sh`, cached under `target/guest`), agent configurations with
//! `hypervisor = "qemu"`, and the guests' serial consoles read as `BULWARK-GUEST` lines.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bulwark::agent::hypervisor::qemu::vm_dir_name;

use crate::agent_common::*;
use crate::orch_common::*;

/// The guest kernel and initramfs.
pub struct GuestImage {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Builds (or finds in the cache) the test guest. QEMU and the guest are required:
/// `.ci/run` installs `qemu-system-x86`.
pub fn image() -> &'static GuestImage {
    static IMAGE: OnceLock<GuestImage> = OnceLock::new();
    IMAGE.get_or_init(|| {
        assert!(
            std::process::Command::new("qemu-system-x86_64")
                .arg("--version")
                .output()
                .is_ok(),
            "qemu-system-x86_64 is needed by the real-VM tests: apt-get install qemu-system-x86"
        );
        let (kernel, initrd) =
            bulwark::guest::image().unwrap_or_else(|e| panic!("the test guest: {e}"));
        GuestImage { kernel, initrd }
    })
}

/// A VM of the test guest with one disk (named like the VM).
#[derive(Debug, Clone)]
pub struct GuestVm {
    pub name: String,
    pub disk_id: u64,
    pub size: u64,
    /// `bulwark.*` parameters after the defaults.
    pub params: String,
    /// A kernel path instead of the test guest's (a bad one, say).
    pub kernel: Option<String>,
    /// The firmware boots the disk instead of a kernel.
    pub firmware: bool,
}

impl GuestVm {
    pub fn new(name: &str, disk_id: u64, params: &str) -> GuestVm {
        GuestVm {
            name: name.into(),
            disk_id,
            size: 64 * MIB,
            params: params.into(),
            kernel: None,
            firmware: false,
        }
    }
}

/// The `[agent]` configuration of a managed agent whose VMs are test guests under QEMU
/// (TCG: nested KVM hangs Linux guests on these machines).
#[allow(clippy::too_many_arguments)]
pub fn qemu_toml(
    lab: &Lab,
    data_dir: &Path,
    host: &str,
    site: &str,
    manager_ws: &str,
    token: &str,
    recovery: bool,
    vms: &[GuestVm],
    qemu_extra: &str,
) -> String {
    let img = image();
    let mut s = managed_toml(
        lab,
        data_dir,
        host,
        site,
        manager_ws,
        token,
        recovery,
        &[],
        "hypervisor = \"qemu\"",
    );
    // `qemu_extra` may override the defaults.
    s.push_str("[agent.qemu]\naccel = \"tcg\"\n");
    for (key, default) in [("powerdown_timeout_secs", 15), ("reconnect_delay_secs", 60)] {
        if !qemu_extra.contains(key) {
            s.push_str(&format!("{key} = {default}\n"));
        }
    }
    s.push_str(qemu_extra);
    s.push('\n');
    for vm in vms {
        let kernel = vm
            .kernel
            .clone()
            .unwrap_or_else(|| img.kernel.display().to_string());
        if vm.firmware {
            s.push_str(&format!(
                "[[agent.vms]]\nname = {:?}\nmemory_mib = 64\ndisks = [{{ name = {:?}, id = {}, size = {} }}]\nboot = {{ kind = \"firmware\" }}\n",
                vm.name, vm.name, vm.disk_id, vm.size
            ));
            continue;
        }
        s.push_str(&format!(
            "[[agent.vms]]\nname = {:?}\nmemory_mib = 256\ndisks = [{{ name = {:?}, id = {}, size = {} }}]\nboot = {{ kind = \"kernel\", kernel = {:?}, initrd = {:?}, cmdline = {:?} }}\n",
            vm.name,
            vm.name,
            vm.disk_id,
            vm.size,
            kernel,
            img.initrd.display().to_string(),
            format!("console=ttyS0 panic=-1 bulwark.interval_ms=50 {}", vm.params),
        ));
    }
    s
}

/// Starts a managed agent with QEMU guests.
#[allow(clippy::too_many_arguments)]
pub async fn start_qemu_agent(
    lab: &Lab,
    m: &ManagerProc,
    token: &str,
    host: &str,
    site: &str,
    recovery: bool,
    vms: &[GuestVm],
    qemu_extra: &str,
) -> AgentProc {
    start_configured(lab, host, |data| {
        qemu_toml(
            lab,
            data,
            host,
            site,
            &m.ws_url(),
            token,
            recovery,
            vms,
            qemu_extra,
        )
    })
    .await
}

/// What every scenario starts from: a lab, a manager on its own PostgreSQL database,
/// an enrolment token. Its QEMUs are killed when it goes, before the manager.
pub struct World {
    _reaper: QemuReaper,
    pub m: ManagerProc,
    pub token: String,
    _db: PgDb,
    pub lab: Lab,
}

pub async fn world(hosts: &[&str], manager: &str) -> World {
    let lab = Lab::new(hosts);
    let db = PgDb::new().await;
    let m = ManagerProc::start(lab.dir.path(), &db.url, manager).await;
    let token = m.enrolment_token().await;
    World {
        _reaper: QemuReaper {
            root: lab.dir.path().to_path_buf(),
        },
        m,
        token,
        _db: db,
        lab,
    }
}

/// The serial log of `vm` on `agent` (earlier boots included).
pub fn serial(agent: &AgentProc, vm: &str) -> String {
    let dir = agent.data_dir.join("vms").join(vm_dir_name(vm));
    let old = std::fs::read(dir.join("serial.log.0")).unwrap_or_default();
    let cur = std::fs::read(dir.join("serial.log")).unwrap_or_default();
    String::from_utf8_lossy(&[old, cur].concat()).into_owned()
}

/// Whether `pid` is a live process (not a zombie: pid 1 here does not reap daemons).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| Some(s.rsplit_once(')')?.1.split_whitespace().next()? != "Z"))
        .unwrap_or(false)
}

/// The QEMU pid of `vm` on `agent`, if its pid file names a live process.
pub fn qemu_pid(agent: &AgentProc, vm: &str) -> Option<i32> {
    let p = agent
        .data_dir
        .join("vms")
        .join(vm_dir_name(vm))
        .join("qemu.pid");
    let pid: i32 = std::fs::read_to_string(p).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

pub use bulwark::guest::{lines, GuestLine as Line};

/// A number of a guest line the test relies on.
pub trait Num {
    fn num(&self, key: &str) -> u64;
}

impl Num for Line {
    fn num(&self, key: &str) -> u64 {
        self.number(key)
            .unwrap_or_else(|| panic!("{key} in {self:?}"))
    }
}

/// Waits until the `n`-th (0-based) line of `event` appears in `vm`'s log on `agent`;
/// panics with the log after `within`.
pub async fn wait_line(
    agent: &AgentProc,
    vm: &str,
    event: &str,
    n: usize,
    within: Duration,
) -> Line {
    let deadline = Instant::now() + within;
    loop {
        let log = serial(agent, vm);
        if let Some(l) = lines(&log).into_iter().filter(|l| l.event == event).nth(n) {
            return l;
        }
        if Instant::now() >= deadline {
            panic!(
                "{vm} on {}: no `{event}` line #{n} within {within:?}; serial log (tail):\n{}\n--- agent (tail):\n{}",
                agent.name,
                tail(&log, 30),
                tail(&agent.stderr(), 30)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How many `event` lines `vm`'s log holds now.
pub fn count(agent: &AgentProc, vm: &str, event: &str) -> usize {
    lines(&serial(agent, vm))
        .iter()
        .filter(|l| l.event == event)
        .count()
}

/// The test guests' I/O error total over every line of the log.
pub fn io_errors(agent: &AgentProc, vm: &str) -> u64 {
    lines(&serial(agent, vm))
        .iter()
        .filter_map(|l| l.kv.get("io_errors").and_then(|v| v.parse::<u64>().ok()))
        .max()
        .unwrap_or(0)
        + count(agent, vm, "ioerror") as u64
}

/// Kills every QEMU whose pid file lies under `root` when dropped: QEMU runs daemonized
/// and outlives the agents a test kills, so a test cleans up after itself.
pub struct QemuReaper {
    pub root: PathBuf,
}

fn pid_files(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.file_name().is_some_and(|n| n == "qemu.pid") {
            out.push(p);
        } else if depth > 0 && p.is_dir() {
            pid_files(&p, out, depth - 1);
        }
    }
}

/// Live QEMU processes whose pid files lie under `root`.
pub fn qemus_under(root: &Path) -> Vec<i32> {
    let mut files = Vec::new();
    pid_files(root, &mut files, 4);
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok()?.trim().parse::<i32>().ok())
        .filter(|pid| alive(*pid))
        .collect()
}

impl Drop for QemuReaper {
    fn drop(&mut self) {
        for pid in qemus_under(&self.root) {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

/// Waits until the manager's inventory lists every VM of `names`.
pub async fn wait_inventory(m: &ManagerProc, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for n in names {
        while m.vm(n).await.is_none() {
            assert!(Instant::now() < deadline, "VM {n} never in the inventory");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
