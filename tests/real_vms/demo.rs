//! `bulwark demo --real-vms` as a user runs it: two real guests protected from New York
//! to London reach Meeting SLA with recoverable checkpoints while they write files, and
//! SIGTERM powers the guests off and exits 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::guest::*;

struct Demo(std::process::Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_with_real_vms_protects_writing_guests_and_stops_cleanly() {
    let _g = crate::SERIAL.lock().await;
    let img = image();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let _reaper = QemuReaper { root: dir.clone() };
    let child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args([
            "demo",
            "--real-vms",
            "--accel",
            "tcg",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--duration", "240", "--dir"])
        .arg(&dir)
        .arg("--guest-kernel")
        .arg(&img.kernel)
        .arg("--guest-initrd")
        .arg(&img.initrd)
        .env("BULWARK_CONFIG", tmp.path().join("none.toml"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut demo = Demo(child);
    let stdout = demo.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            println!("demo| {line}");
            let _ = tx.send(line);
        }
    });
    // Meeting SLA, then a status line where both guests wrote files under protection.
    let deadline = Instant::now() + Duration::from_secs(150);
    let (mut meeting, mut writing) = (false, false);
    while !(meeting && writing) {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("demo: meeting {meeting}, writing {writing} after 150 s"));
        meeting |= line.contains("All VPGs Meeting SLA");
        let files = |vm: &str| {
            line.split(&format!("{vm} "))
                .nth(1)
                .and_then(|r| r.split(" files").next())
                .and_then(|n| n.trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        writing |= meeting && files("web-01") >= 10 && files("app-01") >= 10;
    }
    assert_eq!(qemus_under(&dir).len(), 2, "two guests run");
    let pid = demo.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(s) = demo.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "demo did not stop within 60 s of SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "demo exit status {exit}");
    assert!(qemus_under(&dir).is_empty(), "the guests were powered off");
    for host in ["ny-esx-01", "ny-esx-02"] {
        let vms = dir.join("hosts").join(host).join("vms");
        let log: String = std::fs::read_dir(&vms)
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("serial.log")).ok())
            .collect();
        let shutdown = lines(&log).into_iter().find(|l| l.event == "shutdown");
        assert_eq!(
            shutdown.map(|l| l.get("clean").to_string()),
            Some("1".to_string()),
            "{host}: the guest shut down cleanly:\n{log}"
        );
    }
}
