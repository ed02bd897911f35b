//! Shared helpers of the agent process tests: `bulwark agent` as a real child process
//! (config file, stderr captured to a file, killed on drop), its admin endpoint, qemu-io /
//! qemu-img runners, a random qemu-io workload with a model, a cuttable TCP proxy, and
//! offline checks of journals and dirty-tracking files.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark::agent::dirty::{ActivityLog, DirtyBitmap};
use bulwark::agent::journal::{CheckpointKind, Journal, JournalConfig, JournalStats, Record};
use bulwark::proto::agent::{AgentEndpoints, AgentStatus, CheckpointReport, CheckpointRequest};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
/// The protected and the recovery host of the lab.
pub const PROT: &str = "prot1";
pub const REC: &str = "rec1";

/// One test's world: a temp dir with a lab CA and certificates for [`PROT`], [`REC`] and
/// `more` hosts.
pub struct Lab {
    pub dir: tempfile::TempDir,
}

impl Lab {
    pub fn new(more: &[&str]) -> Lab {
        let dir = tempfile::tempdir().unwrap();
        let hosts: Vec<String> = [PROT, REC]
            .iter()
            .chain(more)
            .map(|h| h.to_string())
            .collect();
        bulwark::agent::tls::lab_certs(&dir.path().join("certs"), &hosts).unwrap();
        Lab { dir }
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    /// Mutual TLS with the lab certificates.
    pub fn tls(&self) -> Sec {
        Sec::Dir(self.path("certs"))
    }
}

/// Bits of the per-epoch counter in a sequence number.
pub const EPOCH_SHIFT: u32 = 40;
/// How long any wait may take before the test gives up.
pub const WAIT: Duration = Duration::from_secs(30);

pub fn seq_counter(seq: u64) -> u64 {
    seq & ((1 << EPOCH_SHIFT) - 1)
}

pub fn seq_epoch(seq: u64) -> u64 {
    seq >> EPOCH_SHIFT
}

/// A port nothing listens on right now (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------
// Configuration files
// ---------------------------------------------------------------------------------------

/// How an agent protects its stream.
#[derive(Debug, Clone)]
pub enum Sec {
    /// `tls_dir` (ca.pem, <host>.pem, <host>.key).
    Dir(PathBuf),
    /// The three files one by one.
    Files {
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
    /// No TLS settings in the file: the test passes `--insecure` on the command line.
    Flag,
}

impl Sec {
    fn toml(&self) -> String {
        match self {
            Sec::Dir(d) => format!("tls_dir = {:?}\n", d.display().to_string()),
            Sec::Files { ca, cert, key } => format!(
                "tls_ca = {:?}\ntls_cert = {:?}\ntls_key = {:?}\n",
                ca.display().to_string(),
                cert.display().to_string(),
                key.display().to_string()
            ),
            Sec::Flag => String::new(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct DiskDef {
    pub name: String,
    pub id: u64,
    pub size: u64,
    pub group: String,
}

impl DiskDef {
    pub fn new(name: &str, id: u64, size: u64) -> DiskDef {
        DiskDef {
            name: name.into(),
            id,
            size,
            group: "vpg1".into(),
        }
    }
}

/// `[[agent.peers]]` of a protected agent: the recovery host and any extra lines
/// (`queue_memory = …`, `compression = …`).
#[derive(Debug, Clone)]
pub struct PeerDef {
    pub host: String,
    pub address: SocketAddr,
    pub extra: String,
}

pub fn protected_toml(
    data_dir: &Path,
    host: &str,
    sec: &Sec,
    disks: &[DiskDef],
    peer: Option<&PeerDef>,
) -> String {
    let mut s = format!(
        "[agent]\ndata_dir = {:?}\nsite = \"prod\"\nhost_name = {host:?}\nnbd_listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}",
        data_dir.display().to_string(),
        sec.toml()
    );
    for d in disks {
        write!(
            s,
            "[[agent.disks]]\nname = {:?}\nid = {}\nsize = {}\ngroup = {:?}\n",
            d.name, d.id, d.size, d.group
        )
        .unwrap();
        if let Some(p) = peer {
            writeln!(s, "recovery_host = {:?}", p.host).unwrap();
        }
    }
    if let Some(p) = peer {
        write!(
            s,
            "[[agent.peers]]\nhost_name = {:?}\naddress = \"{}\"\n{}\n",
            p.host, p.address, p.extra
        )
        .unwrap();
    }
    s
}

pub fn recovery_toml(
    data_dir: &Path,
    host: &str,
    data_listen: SocketAddr,
    sec: &Sec,
    allow: &[(&str, &Path)],
) -> String {
    let mut s = format!(
        "[agent]\ndata_dir = {:?}\nsite = \"dr\"\nhost_name = {host:?}\nnbd_listen = \"127.0.0.1:0\"\ndata_listen = \"{data_listen}\"\nadmin_listen = \"127.0.0.1:0\"\n{}",
        data_dir.display().to_string(),
        sec.toml()
    );
    for (h, st) in allow {
        write!(
            s,
            "[[agent.allow]]\nhost_name = {h:?}\nstorage = {:?}\n",
            st.display().to_string()
        )
        .unwrap();
    }
    s
}

/// Writes a config file next to the agent's data directory and returns its path.
pub fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    p
}

// ---------------------------------------------------------------------------------------
// The agent process
// ---------------------------------------------------------------------------------------

/// `bulwark --config FILE agent [args]` as a child process. Stderr goes to a file (all
/// starts appended), so it can be read at any time and never blocks the agent. Dropping
/// it kills the process.
pub struct AgentProc {
    pub name: String,
    pub config: PathBuf,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    /// Environment for the next (re)start, e.g. fault injection.
    pub env: Vec<(String, String)>,
    /// Network namespace to run in (`ip netns exec`), for partition tests.
    pub netns: Option<String>,
    pub endpoints: AgentEndpoints,
    child: Option<Child>,
    http: reqwest::Client,
}

fn command(config: &Path, args: &[String], log: &Path) -> std::process::Command {
    command_in(None, config, args, log)
}

/// The agent's command line, run in network namespace `netns` if given.
fn command_in(
    netns: Option<&str>,
    config: &Path,
    args: &[String],
    log: &Path,
) -> std::process::Command {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    // `ip netns exec` execs the agent in place: the child's pid is the agent's.
    let mut c = match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_bulwark")]);
            c
        }
        None => std::process::Command::new(env!("CARGO_BIN_EXE_bulwark")),
    };
    c.arg("--config")
        .arg(config)
        .arg("agent")
        .args(args)
        .env_remove("BULWARK_LOG")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err);
    c
}

impl AgentProc {
    /// Starts the agent and waits (bounded) until it has written its endpoints.
    pub async fn start(name: &str, config: &Path, data_dir: &Path, args: &[&str]) -> AgentProc {
        Self::start_with(name, config, data_dir, args, Vec::new(), None).await
    }

    /// [`AgentProc::start`] with environment variables and, optionally, in a network
    /// namespace.
    pub async fn start_with(
        name: &str,
        config: &Path,
        data_dir: &Path,
        args: &[&str],
        env: Vec<(String, String)>,
        netns: Option<&str>,
    ) -> AgentProc {
        let log = data_dir
            .parent()
            .unwrap()
            .join(format!("{name}.stderr.log"));
        let mut a = AgentProc {
            name: name.into(),
            config: config.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            log,
            args: args.iter().map(|s| s.to_string()).collect(),
            env,
            netns: netns.map(String::from),
            endpoints: AgentEndpoints {
                host_name: String::new(),
                site: String::new(),
                pid: 0,
                nbd: String::new(),
                data: None,
                admin: None,
                nbd_socket: None,
            },
            child: None,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .unwrap(),
        };
        a.spawn().await;
        a
    }

    /// (Re)starts the process with the same config and arguments.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.name);
        let ep = self.data_dir.join("run").join("endpoints.json");
        let _ = std::fs::remove_file(&ep);
        writeln!(
            LogAppend(&self.log),
            "===== test: starting {} =====",
            self.name
        )
        .unwrap();
        let child = command_in(self.netns.as_deref(), &self.config, &self.args, &self.log)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start bulwark: {e}"));
        let pid = child.id();
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "agent {} exited during start ({st}):\n{}",
                    self.name,
                    self.stderr()
                );
            }
            if let Ok(bytes) = std::fs::read(&ep) {
                if let Ok(e) = serde_json::from_slice::<AgentEndpoints>(&bytes) {
                    if e.pid == pid {
                        // Readiness promises that a SIGTERM from now on means a clean
                        // shutdown: the handler must already be installed.
                        assert!(
                            handles_sigterm(pid),
                            "agent {} wrote endpoints.json before installing its SIGTERM handler",
                            self.name
                        );
                        self.endpoints = e;
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent {} did not write {} (and install its SIGTERM handler) in time:\n{}",
                self.name,
                ep.display(),
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("agent running").id()
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => c.try_wait().unwrap().is_none(),
            None => false,
        }
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn nbd_url(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.endpoints.nbd)
    }

    pub fn data_addr(&self) -> SocketAddr {
        self.endpoints
            .data
            .as_ref()
            .expect("agent has a data listener")
            .parse()
            .unwrap()
    }

    fn admin(&self) -> String {
        format!(
            "http://{}",
            self.endpoints.admin.as_ref().expect("admin endpoint")
        )
    }

    pub async fn status(&self) -> AgentStatus {
        let r = self
            .http
            .get(format!("{}/v1/status", self.admin()))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: status: {e}\n{}", self.name, self.stderr()));
        assert_eq!(r.status(), 200, "{}: status", self.name);
        r.json().await.unwrap()
    }

    /// A request to the admin endpoint: status and JSON body (Null if none).
    pub async fn admin_call(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut rb = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.admin()));
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: {method} {path}: {e}", self.name));
        let code = r.status().as_u16();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        (code, v)
    }

    pub async fn checkpoint(&self, req: &CheckpointRequest) -> CheckpointReport {
        let r = self
            .http
            .post(format!("{}/v1/checkpoints", self.admin()))
            .json(req)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: checkpoint: {e}\n{}", self.name, self.stderr()));
        let code = r.status();
        let body = r.text().await.unwrap();
        assert_eq!(code, 201, "{}: checkpoint: {body}", self.name);
        serde_json::from_str(&body).unwrap()
    }

    /// Polls the status every 100 ms until `pred` holds; panics after [`WAIT`] with the
    /// last status and the stderr of this agent and of `others`.
    pub async fn wait_status(
        &self,
        what: &str,
        others: &[&AgentProc],
        pred: impl Fn(&AgentStatus) -> bool,
    ) -> AgentStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            let s = self.status().await;
            if pred(&s) {
                return s;
            }
            if Instant::now() >= deadline {
                let mut logs = format!("--- {} stderr:\n{}", self.name, self.stderr());
                for o in others {
                    write!(logs, "\n--- {} stderr:\n{}", o.name, o.stderr()).unwrap();
                }
                panic!(
                    "{}: gave up waiting for {what} after {WAIT:?}; last status:\n{s:#?}\n{logs}",
                    self.name
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then waits (bounded) for the exit.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = self.pid();
        let o = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .output()
            .unwrap();
        assert!(o.status.success(), "kill -TERM {pid}: {o:?}");
        self.wait_exit("after SIGTERM (clean shutdown)").await
    }

    async fn wait_exit(&mut self, what: &str) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "agent {} did not exit within {WAIT:?} {what}:\n{}",
                self.name,
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM and asserts a clean exit (status 0).
    pub async fn stop_clean(&mut self) {
        let st = self.terminate().await;
        assert!(
            st.success(),
            "agent {} exited with {st} after SIGTERM:\n{}",
            self.name,
            self.stderr()
        );
    }

    /// SIGKILL: no clean shutdown at all.
    pub async fn kill9(&mut self) {
        let c = self.child.as_mut().expect("agent running");
        c.kill().unwrap();
        self.wait_exit("after SIGKILL").await;
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if std::thread::panicking() {
                eprintln!("--- {} stderr:\n{}", self.name, self.stderr());
            }
        }
    }
}

/// Whether the process has a handler for SIGTERM installed (`SigCgt` in
/// /proc/PID/status). Once endpoints.json exists it must be: a SIGTERM that met the
/// default action would kill the agent without its clean shutdown (a bug once).
pub fn handles_sigterm(pid: u32) -> bool {
    let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    st.lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGTERM - 1)) != 0)
}

struct LogAppend<'a>(&'a Path);

impl std::fmt::Write for LogAppend<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.0)
            .map_err(|_| std::fmt::Error)?;
        f.write_all(s.as_bytes()).map_err(|_| std::fmt::Error)
    }
}

/// Runs `bulwark --config FILE agent` expecting it to exit by itself (bounded); returns
/// its exit status and stderr.
pub async fn run_agent_to_exit(config: &Path, log: &Path) -> (ExitStatus, String) {
    let mut child = command(config, &[], log).spawn().unwrap();
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return (st, std::fs::read_to_string(log).unwrap_or_default());
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "agent did not exit by itself:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------
// qemu-io / qemu-img
// ---------------------------------------------------------------------------------------

/// Runs a program with a timeout; the child is killed if the timeout fires.
pub async fn run(program: &str, args: &[String], timeout: Duration) -> Output {
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
    tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {:?}… timed out", &args[..args.len().min(6)]))
        .unwrap()
}

/// `qemu-io -f raw -d unmap -t CACHE URL -c cmd …`.
pub async fn qemu_io(url: &str, cache: &str, cmds: &[String], timeout: Duration) -> Output {
    let mut args: Vec<String> = ["-f", "raw", "-d", "unmap", "-t", cache]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for c in cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(url.into());
    run("qemu-io", &args, timeout).await
}

pub fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout (tail):\n{}\nstderr:\n{}",
        o.status,
        tail(&String::from_utf8_lossy(&o.stdout), 3000),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tail(s: &str, n: usize) -> &str {
    let mut i = s.len().saturating_sub(n);
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// Asserts qemu-io succeeded and reported no failed command or pattern mismatch.
pub fn assert_qemu_ok(o: &Output) {
    let t = text(o);
    assert!(o.status.success(), "{t}");
    for bad in ["failed", "Pattern verification", "error", "Error"] {
        assert!(!t.contains(bad), "qemu-io reported {bad:?}:\n{t}");
    }
}

/// `qemu-img convert` of an export into a local raw file: the source as it is now.
pub async fn copy_export(url: &str, out: &Path) -> Vec<u8> {
    let args: Vec<String> = [
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        url,
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = run("qemu-img", &args, Duration::from_secs(60)).await;
    assert!(o.status.success(), "qemu-img convert: {}", text(&o));
    std::fs::read(out).unwrap()
}

/// The byte ranges a qemu-io run reports as completed (`wrote` and `discard` lines).
pub fn completed_ranges(stdout: &str) -> Vec<(u64, u64)> {
    let mut v = Vec::new();
    for line in stdout.lines() {
        let rest = line
            .strip_prefix("wrote ")
            .or_else(|| line.strip_prefix("discard "));
        let Some(rest) = rest else { continue };
        // "4096/4096 bytes at offset 12345"
        let mut it = rest.split_whitespace();
        let Some(len) = it
            .next()
            .and_then(|l| l.split('/').next())
            .and_then(|l| l.parse::<u64>().ok())
        else {
            continue;
        };
        let Some(off) = it.last().and_then(|o| o.parse::<u64>().ok()) else {
            continue;
        };
        v.push((off, len));
    }
    v
}

/// Random but reproducible qemu-io commands of mixed kinds and sizes (512 B … 1 MiB,
/// odd lengths, bursts of aio writes in flight, write-zeroes, discards, FUA writes,
/// flushes) within `[base, base + span)`, applied to `model` (the whole disk) as they
/// are generated. Returns the commands and the ranges they write.
pub struct Workload {
    rng: StdRng,
    pub model: Vec<u8>,
    pub written: Vec<(u64, u64)>,
}

impl Workload {
    pub fn new(seed: u64, disk_size: u64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            model: vec![0u8; disk_size as usize],
            written: Vec::new(),
        }
    }

    /// Without a model (big sparse disks): only the written ranges are kept.
    pub fn without_model(seed: u64) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            model: Vec::new(),
            written: Vec::new(),
        }
    }

    fn apply(&mut self, off: u64, len: u64, fill: u8) {
        self.written.push((off, len));
        if !self.model.is_empty() {
            self.model[off as usize..(off + len) as usize].fill(fill);
        }
    }

    pub fn commands(&mut self, n: usize, base: u64, span: u64) -> Vec<String> {
        let mut cmds = Vec::new();
        while cmds.len() < n {
            let len = match self.rng.random_range(0..7) {
                0 => 512,
                1 => 4096,
                2 => 65536,
                3 => MIB,
                4 => self.rng.random_range(1..200_000),
                _ => 4096 * self.rng.random_range(1..64),
            };
            let off = base + self.rng.random_range(0..=span - len);
            let off = if self.rng.random_bool(0.7) {
                off / 512 * 512
            } else {
                off
            };
            let pat: u8 = self.rng.random_range(1..=255);
            match self.rng.random_range(0..12) {
                0..=2 => {
                    cmds.push(format!("write -P {pat} {off} {len}"));
                    self.apply(off, len, pat);
                }
                3 => {
                    cmds.push(format!("write -f -P {pat} {off} {len}"));
                    self.apply(off, len, pat);
                }
                4 => {
                    cmds.push(format!("write -z {off} {len}"));
                    self.apply(off, len, 0);
                }
                5 => {
                    cmds.push(format!("write -z -u {off} {len}"));
                    self.apply(off, len, 0);
                }
                6 => {
                    cmds.push(format!("discard {off} {len}"));
                    self.apply(off, len, 0);
                }
                7..=9 => {
                    // A burst of non-overlapping writes, all in flight at once.
                    let k = self.rng.random_range(8..32u64);
                    let slot = span / k;
                    for i in 0..k {
                        let l = self.rng.random_range(1..=slot.min(256 * KIB));
                        let o = base + i * slot + self.rng.random_range(0..=slot - l);
                        let p: u8 = self.rng.random_range(1..=255);
                        cmds.push(format!("aio_write -P {p} {o} {l}"));
                        self.apply(o, l, p);
                    }
                    cmds.push("aio_flush".into());
                }
                10 => {
                    cmds.push(format!("write -P {pat} {off} {len}"));
                    self.apply(off, len, pat);
                    cmds.push(format!("read -P {pat} {off} {len}"));
                }
                _ => cmds.push("flush".into()),
            }
        }
        cmds
    }
}

/// Bitmap regions `[off, off + len)` touches.
pub fn regions_of(ranges: &[(u64, u64)], region_size: u64) -> BTreeSet<u64> {
    let mut s = BTreeSet::new();
    for &(off, len) in ranges {
        if len == 0 {
            continue;
        }
        for r in off / region_size..=(off + len - 1) / region_size {
            s.insert(r);
        }
    }
    s
}

pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    // Compare in chunks first (fast), then find the byte.
    const C: usize = 1 << 16;
    for (i, (x, y)) in a.chunks(C).zip(b.chunks(C)).enumerate() {
        if x != y {
            return x.iter().zip(y).position(|(p, q)| p != q).map(|p| i * C + p);
        }
    }
    None
}

pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_difference(got, want) {
        panic!(
            "{what}: differs first at byte {i} (lengths {} and {}); blake3 {} vs {}",
            got.len(),
            want.len(),
            blake3::hash(got).to_hex(),
            blake3::hash(want).to_hex()
        );
    }
}

// ---------------------------------------------------------------------------------------
// Offline checks
// ---------------------------------------------------------------------------------------

/// The journal of disk `id` (from one protected host) under its storage path, opened
/// offline (the recovery agent must be stopped).
pub fn open_journal(storage: &Path, id: u64, size: u64) -> Journal {
    let dir = storage.join(format!("disk-{id:016x}"));
    Journal::open(
        dir.join("journal"),
        dir.join("replica.img"),
        JournalConfig::new(id, size),
    )
    .unwrap_or_else(|e| panic!("open journal of disk {id} in {}: {e}", dir.display()))
}

/// Opens a journal offline and appends a checkpoint marker after its last record, so a
/// view shows everything the journal holds. Returns the journal and the marker's id.
pub fn journal_head(storage: &Path, id: u64, size: u64) -> (Journal, u64) {
    let mut j = open_journal(storage, id, size);
    let cid = j.checkpoints().iter().map(|c| c.id).max().unwrap_or(0) + 1;
    let seq = j.last_seq() + 1;
    j.append(Record::checkpoint(
        seq,
        0,
        cid,
        CheckpointKind::Scheduled,
        Some("test-head"),
    ))
    .unwrap();
    j.sync().unwrap();
    (j, cid)
}

/// Reads the whole point-in-time view at checkpoint `ckpt`.
pub fn read_view(j: &Journal, ckpt: u64, size: u64) -> Vec<u8> {
    let v = j
        .open_view(ckpt)
        .unwrap_or_else(|e| panic!("open view at checkpoint {ckpt}: {e}"));
    let mut buf = vec![0u8; size as usize];
    v.read_at(&mut buf, 0).unwrap();
    buf
}

/// Checks one received disk: the checkpoint is in the journal with its tag, the view
/// equals `want`, and the journal holds every record of the (single-epoch) stream
/// exactly once: as many records as the protected side numbered, up to its last seq.
pub fn verify_journal(
    storage: &Path,
    id: u64,
    size: u64,
    ckpt: u64,
    tag: Option<&str>,
    last_seq: u64,
    want: &[u8],
) -> JournalStats {
    let j = open_journal(storage, id, size);
    let cps = j.checkpoints();
    let c = cps
        .iter()
        .find(|c| c.id == ckpt)
        .unwrap_or_else(|| panic!("disk {id}: checkpoint {ckpt} not in the journal: {cps:?}"));
    assert_eq!(c.tag.as_deref(), tag, "disk {id}: checkpoint tag");
    let got = read_view(&j, ckpt, size);
    assert_same(
        &format!("disk {id}: view at checkpoint {ckpt} vs source"),
        &got,
        want,
    );
    let st = j.stats();
    assert_eq!(st.last_seq, last_seq, "disk {id}: journal last seq");
    assert_eq!(st.durable_seq, last_seq, "disk {id}: journal durable seq");
    assert_eq!(
        st.records,
        seq_counter(last_seq),
        "disk {id}: records in the journal vs records numbered (epoch {}): lost or duplicated records",
        seq_epoch(last_seq)
    );
    st
}

/// The persisted bitmap of a disk (empty if never persisted) and its clean flag.
pub fn load_bitmap(path: &Path) -> Option<(DirtyBitmap, bool)> {
    match DirtyBitmap::load(path) {
        Ok(v) => Some(v),
        Err(e) if e.is_not_found() => None,
        Err(e) => panic!("load {}: {e}", path.display()),
    }
}

/// Regions covered by the persisted bitmap ∪ the activity-log extents (what a restart
/// after a crash treats as possibly different from the replica).
pub fn crash_coverage(dirty_dir: &Path, disk: &str, region_size: u64) -> (BTreeSet<u64>, usize) {
    let mut set = BTreeSet::new();
    if let Some((bm, _clean)) = load_bitmap(&dirty_dir.join(format!("{disk}.dirty"))) {
        assert_eq!(bm.region_size(), region_size);
        set.extend(bm.dirty_regions());
    }
    let al = ActivityLog::recover(&dirty_dir.join(format!("{disk}.al")))
        .unwrap_or_else(|e| panic!("recover activity log of {disk}: {e}"));
    let n = al.extents.len();
    for r in al.ranges() {
        for reg in r.start / region_size..r.end.div_ceil(region_size) {
            set.insert(reg);
        }
    }
    (set, n)
}

// ---------------------------------------------------------------------------------------
// A TCP proxy that can drop its connections on demand
// ---------------------------------------------------------------------------------------

pub struct Proxy {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    cut: tokio::sync::watch::Sender<u64>,
    cancel: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let connections = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let (n, c) = (connections.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let (down, _) = tokio::select! {
                    _ = c.cancelled() => return,
                    r = l.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                let Ok(up) = TcpStream::connect(target).await else {
                    continue;
                };
                n.fetch_add(1, Ordering::SeqCst);
                let mut cut_rx = cut_rx.clone();
                cut_rx.mark_unchanged();
                let c = c.clone();
                tokio::spawn(async move {
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let a = tokio::io::copy(&mut dr, &mut uw);
                    let b = tokio::io::copy(&mut ur, &mut dw);
                    tokio::select! {
                        _ = c.cancelled() => {}
                        _ = cut_rx.changed() => {}
                        _ = async { tokio::join!(a, b) } => {}
                    }
                    // Dropping both halves of both sockets here closes them.
                });
            }
        });
        Proxy {
            addr,
            connections,
            cut,
            cancel,
        }
    }

    /// Drops every connection open now.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
