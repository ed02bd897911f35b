//! Does KVM run a guest here? Boots a probe guest under KVM and says whether it got as
//! far as it must within a few seconds: a Linux kernel's decompressed start (its
//! `Linux version` line with `earlyprintk`) when a kernel is known, else a one-sector
//! guest that enters long mode and writes to its serial port.
//!
//! The kernel matters: on the nested KVM hosts seen here the boot sector reaches long
//! mode fine, and yet every Linux kernel hangs right after its real-mode setup.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The probe guest (also a firmware-bootable disk for tests): a boot sector (assembled with nasm from the source below) that
/// writes `R` to COM1, enters protected mode, then long mode with an identity-mapped
/// 2 MiB page, writes `K\n` and halts.
///
/// ```text
/// bits 16, org 0x7c00: cli; ds=ss=0; sp=0x7c00; out 0x3f8,'R'; lgdt; cr0.PE=1; jmp 8:pm
/// bits 32: ds=es=ss=0x10; zero 0x1000..0x4000; PML4[0]=0x2003; PDPT[0]=0x3003;
///          PD[0]=0x83; cr3=0x1000; cr4.PAE=1; EFER.LME=1; cr0.PG=1; jmp 0x18:lm
/// bits 64: out 0x3f8,'K'; out 0x3f8,'\n'; hlt
/// gdt: null, code32, data32, code64
/// ```
const BOOT_SECTOR: &[&str] = &[
    "fa31c08ed88ed0bc007cbaf803b052ee0f0116b87c0f20c06683c8010f22c0ea",
    "247c080066b810008ed88ec08ed0bf0010000031c0b9000c0000f3abc7050010",
    "000003200000c7050020000003300000c7050030000083000000b8001000000f",
    "22d80f20e083c8200f22e0b9800000c00f320d000100000f300f20c00d000000",
    "800f22c0ea8b7c0000180066baf803b04beeb00aeef4ebf30000000000000000",
    "ffff0000009acf00ffff00000092cf0000000000009a20001f00987c",
];

pub fn boot_sector() -> Vec<u8> {
    let mut s = hex::decode(BOOT_SECTOR.concat()).unwrap_or_default();
    s.resize(512, 0);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// Whether a KVM guest got far enough within the bound: with `kernel`, its
/// `Linux version` line; without, the boot sector's `RK`.
pub fn kvm_runs_a_guest(binary: &Path, dir: &Path, kernel: Option<&str>) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let serial = dir.join("serial.log");
    let _ = std::fs::remove_file(&serial);
    let mut cmd = Command::new(binary);
    cmd.args(["-accel", "kvm", "-machine", "q35", "-m", "256"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"]);
    let expect: &[u8] = match kernel {
        Some(k) => {
            cmd.args(["-kernel", k])
                .args(["-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1"]);
            b"Linux version"
        }
        None => {
            let disk = dir.join("probe.img");
            let mut image = boot_sector();
            image.resize(1 << 20, 0);
            std::fs::write(&disk, image)?;
            cmd.arg("-drive")
                .arg(format!("file={},format=raw,if=virtio", disk.display()));
            b"RK"
        }
    };
    let mut child = cmd
        .arg("-chardev")
        .arg(format!("file,id=s0,path={}", serial.display()))
        .args(["-serial", "chardev:s0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut ran = false;
    while Instant::now() < deadline {
        let seen =
            std::fs::read(&serial).is_ok_and(|b| b.windows(expect.len()).any(|w| w == expect));
        if seen {
            ran = true;
            break;
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(dir);
    Ok(ran)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_boot_sector_is_bootable() {
        let s = super::boot_sector();
        assert_eq!(s.len(), 512);
        assert_eq!(&s[..3], &[0xfa, 0x31, 0xc0], "cli; xor ax, ax");
        assert_eq!(&s[510..], &[0x55, 0xAA]);
    }

    /// Under TCG the probe guest reaches long mode (KVM may not be here).
    #[test]
    fn the_probe_guest_reaches_long_mode_under_tcg() {
        if std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("qemu-system-x86_64 not installed: skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("p.img");
        let mut image = super::boot_sector();
        image.resize(1 << 20, 0);
        std::fs::write(&disk, image).unwrap();
        let serial = dir.path().join("s.log");
        let mut child = std::process::Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-machine",
                "q35",
                "-nodefaults",
                "-display",
                "none",
            ])
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio", disk.display()))
            .arg("-chardev")
            .arg(format!("file,id=s0,path={}", serial.display()))
            .args(["-serial", "chardev:s0"])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut out = Vec::new();
        while std::time::Instant::now() < deadline {
            out = std::fs::read(&serial).unwrap_or_default();
            if out.starts_with(b"RK") {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            out.starts_with(b"RK\n"),
            "{:?}",
            String::from_utf8_lossy(&out)
        );
    }
}
