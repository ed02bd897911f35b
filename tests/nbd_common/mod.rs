//! Shared helpers of the NBD integration tests: a server on 127.0.0.1:0 that stops on drop,
//! and `qemu-io` / `qemu-img` runners with timeouts that kill the child on drop.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use bulwark::agent::nbd::{ExportRegistry, NbdServer, ServerConfig, ServerStats};
use tokio::process::Command;
use tokio_util::sync::CancellationToken;

/// A running server; dropping it cancels it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub registry: ExportRegistry,
    pub stats: std::sync::Arc<ServerStats>,
    pub stop: CancellationToken,
    pub task: Option<tokio::task::JoinHandle<Result<(), bulwark::agent::nbd::NbdError>>>,
}

impl TestServer {
    pub async fn start(registry: ExportRegistry) -> Self {
        Self::start_with(registry, ServerConfig::default()).await
    }

    pub async fn start_with(registry: ExportRegistry, config: ServerConfig) -> Self {
        let server = NbdServer::bind("127.0.0.1:0", registry.clone(), config)
            .await
            .unwrap();
        let addr = server.local_addr().unwrap();
        let stats = server.stats();
        let stop = CancellationToken::new();
        let task = tokio::spawn(server.run(stop.clone()));
        TestServer {
            addr,
            registry,
            stats,
            stop,
            task: Some(task),
        }
    }

    pub fn url(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// Stops the server and waits (bounded) for every connection to finish.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .expect("server stops within 10 s")
                .unwrap()
                .unwrap();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Runs a program with a timeout; the child is killed if the timeout fires.
pub async fn run(program: &str, args: &[String], timeout: Duration) -> Output {
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} timed out"))
        .unwrap()
}

/// `qemu-io -f raw [extra] URL -c cmd …`.
pub async fn qemu_io(url: &str, extra: &[&str], cmds: &[String]) -> Output {
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(url.into());
    run("qemu-io", &args, Duration::from_secs(60)).await
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Asserts qemu-io succeeded and reported no failed command or pattern mismatch.
pub fn assert_qemu_ok(o: &Output) {
    let t = text(o);
    assert!(o.status.success(), "{t}");
    for bad in ["failed", "Pattern verification", "error", "Error"] {
        assert!(!t.contains(bad), "qemu-io reported {bad:?}:\n{t}");
    }
}

/// Deterministic pseudo-random bytes.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
}

pub fn write_file(path: &Path, data: &[u8]) {
    std::fs::write(path, data).unwrap();
}
