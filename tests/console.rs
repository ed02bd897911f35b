//! The web console in a real browser: starts `bulwark demo` (the real binary, fresh
//! directory, port 0), waits for both VPGs to have a recoverable checkpoint, then runs
//! the Playwright script `tests/console/run.mjs` (headless Debian Chromium through
//! `playwright-core`) against it and asserts that it passes. The script's own checks are
//! listed at its top; its output is printed here.
//!
//! Needs `node`/`npm` and `/usr/bin/chromium` (or `$CHROMIUM`); fails, never skips, when
//! one is missing. Installs `tests/console/node_modules` with `npm ci` when absent.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// From start to both VPGs having a recoverable checkpoint (about 6–10 s when idle).
const READY_BOUND: Duration = Duration::from_secs(60);
/// The whole browser script (about 30 s when idle, a failover test started and stopped
/// included; its own waits are 15–30 s each).
const SCRIPT_BOUND: Duration = Duration::from_secs(240);
/// `npm ci` of one package from the registry.
const NPM_BOUND: Duration = Duration::from_secs(300);

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn console_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/console")
}

/// Runs `cmd` to completion within `bound`, returning (success, stdout+stderr).
fn run_bounded(mut cmd: Command, bound: Duration, what: &str) -> (bool, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let mut child = Killed(child);
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(child);
    let text = format!("{}{}", t_out.join().unwrap(), t_err.join().unwrap());
    match status {
        Some(s) => (s.success(), text),
        None => panic!("{what} did not finish within {bound:?}; output so far:\n{text}"),
    }
}

fn ensure_tools() -> String {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's browser (`apt-get install -y chromium`) or set CHROMIUM"
    );
    for tool in ["node", "npm"] {
        let ok = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        assert!(
            ok,
            "`{tool}` is missing: the console test needs Node.js 18+ and npm"
        );
    }
    let dir = console_dir();
    if !dir
        .join("node_modules/playwright-core/package.json")
        .exists()
    {
        let mut npm = Command::new("npm");
        npm.args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(&dir);
        let (ok, text) = run_bounded(npm, NPM_BOUND, "npm ci");
        assert!(ok, "npm ci in {} failed:\n{text}", dir.display());
    }
    chromium
}

async fn get(http: &reqwest::Client, base: &str, token: &str, path: &str) -> Value {
    let r = http
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .and_then(|r| r.error_for_status());
    match r {
        Ok(r) => r.json().await.unwrap(),
        Err(e) => panic!("GET {path}: {e}"),
    }
}

fn items(v: &Value) -> Vec<Value> {
    v["items"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_in_a_real_browser() {
    let chromium = ensure_tools();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let start = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulwark"))
        .args([
            "demo",
            "--quiet",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "300",
            "--dir",
        ])
        .arg(&dir)
        .env("BULWARK_CONFIG", tmp.path().join("none.toml"))
        .env("RUST_LOG", "warn")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let _demo = Killed(child);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            println!("demo| {line}");
            // The test may have stopped reading; keep draining so the demo never blocks.
            let _ = tx.send(line);
        }
    });
    let (mut base, mut token) = (None, None);
    while base.is_none() || token.is_none() {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("demo printed its console URL and token");
        if let Some(u) = line.trim().strip_prefix("console:") {
            base = Some(u.trim().trim_end_matches('/').to_string());
        }
        if let Some(t) = line.trim().strip_prefix("API token:") {
            token = Some(t.trim().to_string());
        }
    }
    let (base, token) = (base.unwrap(), token.unwrap());

    // The console is served, and both VPGs can be recovered (checkpoints to show and tag).
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let index = http.get(format!("{base}/")).send().await.unwrap();
    assert!(index.status().is_success(), "GET /: {}", index.status());
    assert!(
        index.text().await.unwrap().contains("/js/app.js"),
        "the manager serves web/index.html"
    );
    let last = loop {
        let vpgs = items(&get(&http, &base, &token, "/api/v1/vpgs?limit=100").await);
        let mut ready = vpgs.len() == 2;
        for v in &vpgs {
            let id = v["id"].as_str().unwrap();
            let path = format!("/api/v1/vpgs/{id}/checkpoints?recoverable=true&limit=1");
            ready &= !items(&get(&http, &base, &token, &path).await).is_empty();
        }
        let last: Vec<String> = vpgs
            .iter()
            .map(|v| format!("{}={}/{}", v["name"], v["status"], v["sub_status"]))
            .collect();
        if ready {
            break last;
        }
        assert!(
            start.elapsed() < READY_BOUND,
            "VPGs without a recoverable checkpoint after {READY_BOUND:?}: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    println!(
        "demo ready after {:.1} s: {last:?}",
        start.elapsed().as_secs_f64()
    );

    // Screenshots (the operation dialog, a running failover test, and any failure) stay
    // after the run, in the target directory.
    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-screenshots");
    let _ = std::fs::remove_dir_all(&shots);
    std::fs::create_dir_all(&shots).unwrap();
    let mut node = Command::new("node");
    node.arg(console_dir().join("run.mjs"))
        .current_dir(console_dir())
        .env("BULWARK_URL", &base)
        .env("BULWARK_TOKEN", &token)
        .env("CHROMIUM", &chromium)
        .env("ARTIFACTS", &shots);
    let (ok, text) = tokio::task::spawn_blocking(move || {
        run_bounded(node, SCRIPT_BOUND, "node tests/console/run.mjs")
    })
    .await
    .unwrap();
    println!("{text}");
    println!("screenshots in {}", shots.display());
    if !ok {
        // Keep the demo's directory too, for whoever reads the failure.
        let kept = tmp.keep();
        panic!(
            "the console browser test failed (screenshots in {}, demo directory {})",
            shots.display(),
            kept.display()
        );
    }
}
