//! How a VM boots and its NICs, checked by the same rules wherever a definition enters:
//! the manager's API and the inventories agents report, and the agent's own
//! configuration and create requests (a MAC and the boot paths reach QEMU's command
//! line, where a comma would add options).

use super::validation::ValidationError;

/// Most NICs a VM may have (virtio NICs each take a PCI slot of the VM).
pub const MAX_NICS_PER_VM: usize = 8;
/// Longest boot path or kernel command line.
pub const MAX_BOOT_TEXT: usize = 4096;

pub fn check_nic_count(n: usize) -> Result<(), ValidationError> {
    if n > MAX_NICS_PER_VM {
        return Err(ValidationError::new(
            "vm.too_many_nics",
            "nics",
            format!("a VM has at most {MAX_NICS_PER_VM} NICs, not {n}"),
        ));
    }
    Ok(())
}

/// A MAC address as `xx:xx:xx:xx:xx:xx` (hex digits, either case).
pub fn check_mac(field: &str, mac: &Option<String>) -> Result<(), ValidationError> {
    let Some(mac) = mac else { return Ok(()) };
    let groups: Vec<&str> = mac.split(':').collect();
    let ok = groups.len() == 6
        && groups
            .iter()
            .all(|g| g.len() == 2 && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(ValidationError::new(
            "vm.nic_mac_invalid",
            field,
            format!("`{mac}` is not a MAC address such as 52:54:00:12:34:56 (six pairs of hex digits separated by colons)"),
        ))
    }
}

/// A boot file on the host: an absolute path, no control characters.
fn check_boot_path(field: &str, what: &str, p: &str) -> Result<(), ValidationError> {
    if p.trim().is_empty() {
        return Err(ValidationError::new(
            "vm.boot_path_invalid",
            field,
            format!("the {what} path is empty: give the absolute path of the file on the host"),
        ));
    }
    if !p.starts_with('/') {
        return Err(ValidationError::new(
            "vm.boot_path_invalid",
            field,
            format!("the {what} path `{p}` is not absolute: it must start with `/`"),
        ));
    }
    if p.len() > MAX_BOOT_TEXT || p.chars().any(char::is_control) {
        return Err(ValidationError::new(
            "vm.boot_path_invalid",
            field,
            format!(
                "the {what} path must be at most {MAX_BOOT_TEXT} bytes without control characters"
            ),
        ));
    }
    Ok(())
}

/// A kernel boot: absolute kernel (and initrd) paths and a bounded command line.
pub fn check_kernel_boot(
    kernel: &str,
    initrd: Option<&str>,
    cmdline: &str,
) -> Result<(), ValidationError> {
    check_boot_path("boot.kernel", "kernel", kernel)?;
    if let Some(i) = initrd {
        check_boot_path("boot.initrd", "initrd", i)?;
    }
    if cmdline.len() > MAX_BOOT_TEXT || cmdline.chars().any(char::is_control) {
        return Err(ValidationError::new(
            "vm.boot_cmdline_invalid",
            "boot.cmdline",
            format!(
                "the kernel command line must be at most {MAX_BOOT_TEXT} bytes without control characters"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_paths_macs_and_nic_counts() {
        assert!(check_kernel_boot("/k/vmlinuz", Some("/k/initrd"), "console=ttyS0").is_ok());
        assert_eq!(
            check_kernel_boot("vmlinuz", None, "").unwrap_err().code,
            "vm.boot_path_invalid"
        );
        assert_eq!(
            check_kernel_boot("/k", Some(""), "").unwrap_err().field,
            "boot.initrd"
        );
        assert!(check_kernel_boot("/k", None, "a\nb").is_err());
        assert!(check_mac("m", &Some("52:54:00:AB:cd:01".into())).is_ok());
        assert!(check_mac("m", &None).is_ok());
        for bad in [
            "52:54:00:00:00:01,romfile=/x",
            "52:54:00:00:00",
            "5g:54:00:00:00:01",
        ] {
            assert_eq!(
                check_mac("m", &Some(bad.into())).unwrap_err().code,
                "vm.nic_mac_invalid",
                "{bad}"
            );
        }
        assert!(check_nic_count(MAX_NICS_PER_VM).is_ok());
        assert!(check_nic_count(MAX_NICS_PER_VM + 1).is_err());
    }
}
