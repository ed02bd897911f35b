//! The `qemu-system-x86_64` command line of a VM: a pure function of its definition and
//! the driver's settings, so what a guest gets is table-tested without QEMU.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::proto::control::{Boot, Nic};

/// How a VM's disks reach the agent's NBD server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdEndpoint {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

/// Accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Where a VM's files live: `<data-dir>/vms/<dir>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFiles {
    pub dir: PathBuf,
}

impl VmFiles {
    pub fn qmp(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn guest_agent(&self) -> PathBuf {
        self.dir.join("qga.sock")
    }
    pub fn serial(&self) -> PathBuf {
        self.dir.join("serial.log")
    }
    /// The serial log of earlier boots, once the current one grew too large.
    pub fn serial_old(&self) -> PathBuf {
        self.dir.join("serial.log.0")
    }
    pub fn pid(&self) -> PathBuf {
        self.dir.join("qemu.pid")
    }
}

/// What the command line is made of.
#[derive(Debug, Clone)]
pub struct MachineArgs<'a> {
    pub name: &'a str,
    pub cpus: u32,
    pub memory_mib: u64,
    /// NBD export names, in order (the first is the boot disk for firmware boot).
    pub exports: Vec<&'a str>,
    pub boot: &'a Boot,
    pub nics: &'a [Nic],
    pub accel: Accel,
    pub nbd: &'a NbdEndpoint,
    pub reconnect_delay: Duration,
    pub files: &'a VmFiles,
}

/// QEMU's option syntax doubles a comma inside a value.
fn opt(value: &Path) -> String {
    value.display().to_string().replace(',', ",,")
}

/// The arguments (without the binary).
pub fn args(m: &MachineArgs<'_>) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));
    push(&[
        "-daemonize",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
    ]);
    let cpu = match m.accel {
        Accel::Kvm => "host",
        Accel::Tcg => "max",
    };
    let name = format!("guest={},debug-threads=on", m.name.replace(',', ",,"));
    let machine = format!("q35,accel={}", m.accel.as_str());
    let smp = m.cpus.to_string();
    let mem = m.memory_mib.to_string();
    push(&["-name", &name, "-machine", &machine, "-cpu", cpu]);
    push(&["-smp", &smp, "-m", &mem]);
    push(&["-pidfile", &m.files.pid().display().to_string()]);
    let qmp = format!("unix:{},server=on,wait=off", opt(&m.files.qmp()));
    push(&["-qmp", &qmp]);
    let serial = format!("file,id=serial0,path={},append=on", opt(&m.files.serial()));
    push(&["-chardev", &serial, "-serial", "chardev:serial0"]);
    // The guest agent's channel: used when the guest runs qemu-guest-agent.
    let qga = format!(
        "socket,id=qga0,path={},server=on,wait=off",
        opt(&m.files.guest_agent())
    );
    push(&["-chardev", &qga, "-device", "virtio-serial-pci,id=vser0"]);
    push(&[
        "-device",
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    ]);
    for (i, export) in m.exports.iter().enumerate() {
        let server = match m.nbd {
            NbdEndpoint::Unix(p) => json!({ "type": "unix", "path": p.display().to_string() }),
            NbdEndpoint::Tcp(a) => {
                json!({ "type": "inet", "host": a.ip().to_string(), "port": a.port().to_string() })
            }
        };
        let blockdev = json!({
            "driver": "nbd",
            "node-name": format!("disk{i}"),
            "server": server,
            "export": export,
            "reconnect-delay": m.reconnect_delay.as_secs(),
        });
        push(&["-blockdev", &blockdev.to_string()]);
        let mut dev = format!("virtio-blk-pci,drive=disk{i},id=vd{i}");
        if i == 0 && matches!(m.boot, Boot::Firmware) {
            dev.push_str(",bootindex=1");
        }
        push(&["-device", &dev]);
    }
    for (i, nic) in m.nics.iter().enumerate() {
        // Isolated user-mode networking until the host's networks are modelled: the
        // guest has a NIC and reaches nothing outside the VM.
        let netdev = format!("user,id=net{i},restrict=on");
        let mut dev = format!("virtio-net-pci,netdev=net{i}");
        if let Some(mac) = &nic.mac {
            dev.push_str(&format!(",mac={mac}"));
        }
        push(&["-netdev", &netdev, "-device", &dev]);
    }
    if let Boot::Kernel {
        kernel,
        initrd,
        cmdline,
    } = m.boot
    {
        push(&["-kernel", kernel]);
        if let Some(i) = initrd {
            push(&["-initrd", i]);
        }
        if !cmdline.is_empty() {
            push(&["-append", cmdline]);
        }
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> VmFiles {
        VmFiles {
            dir: PathBuf::from("/d/vms/web,1"),
        }
    }

    fn value_of<'a>(a: &'a [String], flag: &str) -> Vec<&'a str> {
        a.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn kernel_boot_over_the_unix_socket() {
        let f = files();
        let nbd = NbdEndpoint::Unix("/d/run/nbd.sock".into());
        let boot = Boot::Kernel {
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd.img".into()),
            cmdline: "console=ttyS0 bulwark.mode=workload".into(),
        };
        let a = args(&MachineArgs {
            name: "web",
            cpus: 2,
            memory_mib: 256,
            exports: vec!["web-0", "web-1"],
            boot: &boot,
            nics: &[Nic {
                network: Some("lan".into()),
                mac: Some("52:54:00:00:00:01".into()),
            }],
            accel: Accel::Tcg,
            nbd: &nbd,
            reconnect_delay: Duration::from_secs(60),
            files: &f,
        });
        assert_eq!(value_of(&a, "-machine"), ["q35,accel=tcg"]);
        assert_eq!(value_of(&a, "-cpu"), ["max"]);
        assert_eq!(value_of(&a, "-smp"), ["2"]);
        assert_eq!(value_of(&a, "-m"), ["256"]);
        assert_eq!(value_of(&a, "-kernel"), ["/k/vmlinuz"]);
        assert_eq!(value_of(&a, "-initrd"), ["/k/initrd.img"]);
        assert_eq!(
            value_of(&a, "-append"),
            ["console=ttyS0 bulwark.mode=workload"]
        );
        // Commas in paths are doubled in option syntax.
        assert_eq!(
            value_of(&a, "-qmp"),
            ["unix:/d/vms/web,,1/qmp.sock,server=on,wait=off"]
        );
        let disks: Vec<serde_json::Value> = value_of(&a, "-blockdev")
            .iter()
            .map(|s| serde_json::from_str(s).unwrap())
            .collect();
        assert_eq!(disks.len(), 2);
        assert_eq!(disks[0]["export"], "web-0");
        assert_eq!(disks[1]["export"], "web-1");
        assert_eq!(disks[0]["server"]["path"], "/d/run/nbd.sock");
        assert_eq!(disks[0]["reconnect-delay"], 60);
        let devices = value_of(&a, "-device");
        assert!(devices.contains(&"virtio-blk-pci,drive=disk0,id=vd0"));
        assert!(devices.contains(&"virtio-net-pci,netdev=net0,mac=52:54:00:00:00:01"));
        assert!(!devices.iter().any(|d| d.contains("bootindex")));
        assert!(a.contains(&"-daemonize".to_string()));
    }

    #[test]
    fn firmware_boot_over_tcp_with_kvm() {
        let f = files();
        let nbd = NbdEndpoint::Tcp("127.0.0.1:10809".parse().unwrap());
        let a = args(&MachineArgs {
            name: "db",
            cpus: 1,
            memory_mib: 1024,
            exports: vec!["db-0"],
            boot: &Boot::Firmware,
            nics: &[],
            accel: Accel::Kvm,
            nbd: &nbd,
            reconnect_delay: Duration::from_secs(5),
            files: &f,
        });
        assert_eq!(value_of(&a, "-cpu"), ["host"]);
        assert!(value_of(&a, "-kernel").is_empty());
        let d: serde_json::Value = serde_json::from_str(value_of(&a, "-blockdev")[0]).unwrap();
        assert_eq!(d["server"]["type"], "inet");
        assert_eq!(d["server"]["port"], "10809");
        assert!(value_of(&a, "-device").contains(&"virtio-blk-pci,drive=disk0,id=vd0,bootindex=1"));
        assert!(value_of(&a, "-netdev").is_empty());
    }
}
