//! Does KVM run a guest here? Boots a one-sector guest under KVM that writes a byte to
//! its serial port, and says whether the byte arrived within a few seconds.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The probe guest: a boot sector that writes `K\n` to COM1 and halts.
fn boot_sector() -> Vec<u8> {
    let code: [u8; 13] = [
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xB0, b'K', // mov al, 'K'
        0xEE, // out dx, al
        0xB0, b'\n', // mov al, '\n'
        0xEE,  // out dx, al
        0xFA,  // cli
        0xF4,  // hlt
        0xEB, 0xFE, // jmp $
    ];
    let mut s = vec![0u8; 512];
    s[..code.len()].copy_from_slice(&code);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

/// Whether a KVM guest printed its byte within the bound.
pub fn kvm_runs_a_guest(binary: &Path, dir: &Path) -> std::io::Result<bool> {
    std::fs::create_dir_all(dir)?;
    let disk = dir.join("probe.img");
    let mut image = boot_sector();
    image.resize(1 << 20, 0);
    std::fs::write(&disk, image)?;
    let serial = dir.join("serial.log");
    let _ = std::fs::remove_file(&serial);
    let mut child = Command::new(binary)
        .args([
            "-accel",
            "kvm",
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
        .args(["-serial", "chardev:s0", "-no-reboot"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ran = false;
    while Instant::now() < deadline {
        if std::fs::read(&serial).is_ok_and(|b| b.starts_with(b"K")) {
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
        assert_eq!(&s[510..], &[0x55, 0xAA]);
    }
}
