//! The test guest of `scripts/guest/`: building it (cached in `target/guest`) and
//! reading what it says on its serial console, one `BULWARK-GUEST <event> key=value …`
//! line per fact (the contract is `scripts/guest/README.md`). Used by the demo with
//! real VMs, `bulwark bench guests` and the real-VM tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::lab::{self, LabError};

/// The guest (kernel, initramfs): built by its script into
/// `target/guest` of the source tree (cached there), the way the tests and the benches
/// get it. Needs the Debian packages the script names.
pub fn image() -> Result<(PathBuf, PathBuf), LabError> {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = repo.join("scripts/guest/build.sh");
    if !script.exists() {
        return Err(lab::setup(format!(
            "{} not found: give the guest's kernel and initramfs instead",
            script.display()
        )));
    }
    let out = repo.join("target/guest");
    let o = std::process::Command::new("bash")
        .arg(&script)
        .arg(&out)
        .output()
        .map_err(|source| LabError::Io {
            what: format!("run {}", script.display()),
            source,
        })?;
    if !o.status.success() {
        return Err(lab::setup(format!(
            "building the test guest failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    Ok((out.join("vmlinuz"), out.join("initrd.img")))
}

/// One guest line. The progress line `BULWARK-GUEST wrote=N …` has the event `wrote`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLine {
    pub event: String,
    pub kv: BTreeMap<String, String>,
}

impl GuestLine {
    /// The value of `key` (empty when absent).
    pub fn get(&self, key: &str) -> &str {
        self.kv.get(key).map_or("", String::as_str)
    }

    /// The value of `key` as a number.
    pub fn number(&self, key: &str) -> Option<u64> {
        self.kv.get(key).and_then(|v| v.parse().ok())
    }
}

/// Every guest line of a serial log, in order (kernel messages and `\r` ignored).
pub fn lines(log: &str) -> Vec<GuestLine> {
    log.lines()
        .filter_map(|l| l.trim_end_matches('\r').split_once("BULWARK-GUEST "))
        .map(|(_, rest)| {
            let mut words = rest.split_whitespace();
            let first = words.next().unwrap_or("");
            let mut kv = BTreeMap::new();
            let event = match first.split_once('=') {
                Some((k, v)) => {
                    kv.insert(k.to_string(), v.to_string());
                    k.to_string()
                }
                None => first.to_string(),
            };
            for w in words {
                if let Some((k, v)) = w.split_once('=') {
                    kv.insert(k.to_string(), v.to_string());
                }
            }
            GuestLine { event, kv }
        })
        .collect()
}

/// The guest lines of `event`, in order.
pub fn events(log: &str, event: &str) -> Vec<GuestLine> {
    lines(log)
        .into_iter()
        .filter(|l| l.event == event)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_lines_parse() {
        let log = "noise\r\nBULWARK-GUEST ready fs=new verified=0 bad=0 io_errors=0 ready_ms=3030\r\n[ 1.0] x\nBULWARK-GUEST wrote=10 io_errors=0\nBULWARK-GUEST dd bytes=268435456 ms=300 io_errors=0\n";
        let l = lines(log);
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].event, "ready");
        assert_eq!(l[0].get("fs"), "new");
        assert_eq!(l[0].number("ready_ms"), Some(3030));
        assert_eq!(l[0].number("missing"), None);
        assert_eq!(l[1].event, "wrote");
        assert_eq!(l[1].number("wrote"), Some(10));
        let dd = events(log, "dd");
        assert_eq!(dd.len(), 1);
        assert_eq!(dd[0].number("bytes"), Some(268_435_456));
        assert!(events(log, "shutdown").is_empty());
    }
}
