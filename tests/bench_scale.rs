//! `bulwark bench scale` with tiny numbers on SQLite through the built binary: the run
//! completes, every VPG reaches Meeting SLA, and the numbers are sane.

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn bench_scale_tiny_run_reaches_meeting_sla() {
    let dir = std::env::temp_dir().join(format!("bulwark-bench-scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args([
            "bench",
            "scale",
            "--hosts",
            "4",
            "--vms",
            "16",
            "--vpgs",
            "4",
            "--measure-secs",
            "3",
            "--clients",
            "2",
            "--settle-secs",
            "40",
            "--output",
            "json",
            "--dir",
        ])
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run bulwark bench scale");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(r["vpgs"], 4, "{r}");
    assert!(
        r["all_meeting_sla_secs"].as_f64().is_some(),
        "not all Meeting SLA: {r}\n{stderr}"
    );
    assert_eq!(r["meeting_sla_after"], 4, "{r}");
    assert!(r["rounds_completed"].as_u64().unwrap() >= 4, "{r}");
    assert!(
        r["vpgs_default_page"]["count"].as_u64().unwrap() >= 3,
        "{r}"
    );
    assert_eq!(r["vpgs_default_page"]["errors"], 0, "{r}");
    let p99 = r["vpgs_default_page"]["p99_ms"].as_f64().unwrap();
    assert!(p99 > 0.0 && p99 < 5_000.0, "{r}");
    let rss = r["rss_mib"].as_f64().unwrap();
    assert!(rss > 1.0 && rss < 1024.0, "{r}");
    let cpu = r["cpu_percent"].as_f64().unwrap();
    assert!((0.0..=400.0).contains(&cpu), "{r}");
    // The stream part either measured something or said why it did not.
    let s = &r["stream"];
    assert!(
        s["skipped"].is_string() || s["clients_connected"] == 2,
        "stream: {s}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
