//! `bulwark demo`: the whole system on this machine, with the embedded SQLite database,
//! until Ctrl-C — a manager; two sites of two hosts each, every host an agent running as
//! tasks of this process (own data directory, NBD listener, data listener, mutual TLS
//! from a lab CA made in the demo directory) that enrols over the real control channel;
//! six VMs with synthetic guest workloads written through their NBD exports; two VPGs
//! with different SLAs, one in each direction (New York → London, London → New York).
//!
//! Everything is set up through the public REST API, as an operator would, so the
//! console shows exactly what a real installation shows.
//!
//! With real VMs (`--real-vms`) every host runs the QEMU driver and New York protects
//! two real guests (the test guest of `scripts/guest/`, writing files with a checksum
//! manifest) to London in one VPG; the guests are powered off when the demo ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use serde_json::{json, Value};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::agent::nbd::client::NbdClient;
use crate::lab::{self, AgentSpec, Api, LabAgent, LabError, Manager};

/// What to run.
#[derive(Debug, Clone)]
pub struct DemoOpts {
    /// Where the database, certificates and agents' data go; none: a new directory under
    /// the system's temp dir (kept, printed).
    pub dir: Option<PathBuf>,
    pub listen: SocketAddr,
    /// Stop by itself after this long.
    pub duration: Option<Duration>,
    /// No periodic status line.
    pub quiet: bool,
    /// The console's files (`web/`), if found.
    pub web_dir: Option<PathBuf>,
    /// Real guests under QEMU instead of simulated VMs.
    pub real_vms: Option<RealVms>,
}

/// The guest image of a demo with real VMs.
#[derive(Debug, Clone)]
pub struct RealVms {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `auto`, `kvm` or `tcg`.
    pub accel: String,
}

/// The real guests: (VM, host), each protected to London.
const REAL_VMS: [(&str, &str, &str); 2] = [
    ("web-01", "ny-esx-01", "ldn-esx-01"),
    ("app-01", "ny-esx-02", "ldn-esx-02"),
];

const NY: &str = "new-york";
const LDN: &str = "london";

/// (host, site).
const HOSTS: [(&str, &str); 4] = [
    ("ny-esx-01", NY),
    ("ny-esx-02", NY),
    ("ldn-esx-01", LDN),
    ("ldn-esx-02", LDN),
];

#[derive(Clone, Copy)]
enum Workload {
    /// Writes at a steady rate (bytes/s).
    Steady(u64),
    /// Idle for 4–12 s, then 1–3 s of writes at this rate (bytes/s).
    Bursty(u64),
}

struct VmDef {
    name: &'static str,
    host: &'static str,
    size: u64,
    workload: Workload,
    /// Where its VPG recovers it.
    recovery_host: &'static str,
}

const MIB: u64 = 1 << 20;

const VMS: [VmDef; 6] = [
    VmDef {
        name: "web-01",
        host: "ny-esx-01",
        size: 256 * MIB,
        workload: Workload::Steady(2 * MIB),
        recovery_host: "ldn-esx-01",
    },
    VmDef {
        name: "db-01",
        host: "ny-esx-01",
        size: 512 * MIB,
        workload: Workload::Bursty(8 * MIB),
        recovery_host: "ldn-esx-02",
    },
    VmDef {
        name: "app-01",
        host: "ny-esx-02",
        size: 128 * MIB,
        workload: Workload::Steady(MIB),
        recovery_host: "ldn-esx-01",
    },
    VmDef {
        name: "cache-01",
        host: "ny-esx-02",
        size: 64 * MIB,
        workload: Workload::Bursty(4 * MIB),
        recovery_host: "ldn-esx-02",
    },
    VmDef {
        name: "erp-01",
        host: "ldn-esx-01",
        size: 384 * MIB,
        workload: Workload::Steady(MIB),
        recovery_host: "ny-esx-01",
    },
    VmDef {
        name: "mail-01",
        host: "ldn-esx-02",
        size: 128 * MIB,
        workload: Workload::Bursty(4 * MIB),
        recovery_host: "ny-esx-02",
    },
];

/// (name, recovery site, settings): a tight SLA one way, a looser one back.
fn vpgs() -> [(&'static str, &'static str, Value); 2] {
    // Journals are capped small: a demo left running must not fill the disk.
    [
        (
            "ny-to-london",
            LDN,
            json!({
                "rpo_target_secs": 10,
                "journal_history_secs": 3600,
                "checkpoint_interval_ms": 2000,
                "journal_hard_limit_bytes": 2u64 << 30,
                "journal_warning_bytes": 3u64 << 29,
                "priority": "high",
            }),
        ),
        (
            "london-to-ny",
            NY,
            json!({
                "rpo_target_secs": 30,
                "journal_history_secs": 4 * 3600,
                "checkpoint_interval_ms": 5000,
                "journal_hard_limit_bytes": 1u64 << 30,
                "journal_warning_bytes": 3u64 << 28,
            }),
        ),
    ]
}

fn demo_dir(dir: Option<PathBuf>) -> Result<PathBuf, LabError> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!(
            "bulwark-demo-{}-{}",
            chrono::Utc::now().format("%Y%m%d-%H%M%S"),
            std::process::id()
        )),
    };
    lab::create_dir(&dir)?;
    // Absolute, so what is printed can be pasted from anywhere.
    std::path::absolute(&dir).map_err(|source| LabError::Io {
        what: format!("resolve {}", dir.display()),
        source,
    })
}

/// Everything running; torn down in reverse order of start.
struct Demo {
    dir: PathBuf,
    real: Option<RealVms>,
    manager: Manager,
    agents: Vec<(String, LabAgent)>,
    workloads: Vec<JoinHandle<()>>,
    stop_workloads: CancellationToken,
    written: Arc<AtomicU64>,
    vpg_ids: Vec<(String, String)>,
}

impl Demo {
    fn api(&self) -> &Api {
        &self.manager.api
    }

    async fn setup(&mut self, quiet: bool) -> Result<(), LabError> {
        let certs = self.dir.join("certs");
        let names: Vec<String> = HOSTS.iter().map(|(h, _)| h.to_string()).collect();
        crate::agent::tls::lab_certs(&certs, &names)?;
        let etoken = self.api().enrolment_token("demo").await?;
        let ws = self.manager.ws.clone();
        let mut disk_id = 0;
        for (host, site) in HOSTS {
            // Every host can be both: VMs protected from it and replicas received.
            let mut section = String::from("data_listen = \"127.0.0.1:0\"\n");
            if let Some(real) = &self.real {
                section.push_str(&real_section(real, host, &mut disk_id));
            }
            for vm in VMS.iter().filter(|v| v.host == host && self.real.is_none()) {
                disk_id += 1;
                section.push_str(&format!(
                    "[[vms]]\nname = {:?}\ncpus = 2\nmemory_mib = 4096\ndisks = [{{ name = {:?}, id = {disk_id}, size = {} }}]\n",
                    vm.name,
                    disk_name(vm.name),
                    vm.size
                ));
            }
            let agent = LabAgent::start(AgentSpec {
                data_dir: self.dir.join("hosts").join(host),
                host,
                site,
                section: &section,
                manager: &ws,
                enrolment_token: &etoken,
                tls_dir: Some(certs.clone()),
            })
            .await?;
            self.agents.push((host.to_string(), agent));
        }
        let hosts: Vec<&str> = HOSTS.iter().map(|(h, _)| *h).collect();
        let count = if self.real.is_some() {
            REAL_VMS.len()
        } else {
            VMS.len()
        };
        let inv = self
            .api()
            .wait_inventory(count, &hosts, Duration::from_secs(60))
            .await?;
        if self.real.is_some() {
            // The guests write by themselves; one VPG, New York to London.
            let (name, site, settings) = vpgs()[0].clone();
            let members: Vec<(&str, &str)> =
                REAL_VMS.iter().map(|(vm, _, rec)| (*vm, *rec)).collect();
            let id = self
                .api()
                .ensure_vpg(&inv, name, site, settings, &members)
                .await?;
            self.vpg_ids.push((name.to_string(), id));
            return Ok(());
        }
        self.start_workloads(quiet);
        for (name, recovery_site, settings) in vpgs() {
            let members: Vec<(&str, &str)> = VMS
                .iter()
                .filter(|v| {
                    HOSTS
                        .iter()
                        .any(|(h, s)| *h == v.recovery_host && *s == recovery_site)
                })
                .map(|v| (v.name, v.recovery_host))
                .collect();
            let id = self
                .api()
                .ensure_vpg(&inv, name, recovery_site, settings, &members)
                .await?;
            self.vpg_ids.push((name.to_string(), id));
        }
        Ok(())
    }

    fn start_workloads(&mut self, quiet: bool) {
        for (i, vm) in VMS.iter().enumerate() {
            let Some(agent) = self
                .agents
                .iter()
                .find(|(h, _)| h == vm.host)
                .map(|(_, a)| a)
            else {
                continue;
            };
            let addr = agent.agent.endpoints().nbd;
            let stop = self.stop_workloads.clone();
            let written = Arc::clone(&self.written);
            let (name, size, workload) = (vm.name, vm.size, vm.workload);
            self.workloads.push(tokio::spawn(async move {
                // A guest whose disk went away (agent restarting) reconnects after a
                // pause; only the demo's stop ends it.
                while !stop.is_cancelled() {
                    if let Err(e) =
                        guest(&addr, name, size, workload, i as u64, &stop, &written).await
                    {
                        if !quiet {
                            tracing::warn!(vm = name, error = %e, "guest workload interrupted");
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }));
        }
    }

    /// One line: each VPG's status, sub-status and RPO.
    async fn status_line(&self) -> Result<(String, bool), LabError> {
        let vpgs = self.api().items("/api/v1/vpgs?limit=100").await?;
        let mut parts = Vec::new();
        let mut all_meeting = !self.vpg_ids.is_empty();
        for (name, _) in &self.vpg_ids {
            let Some(v) = vpgs.iter().find(|v| v["name"] == name.as_str()) else {
                all_meeting = false;
                continue;
            };
            let status = v["status"].as_str().unwrap_or("?");
            all_meeting &= status == "meeting_sla";
            let sub = match v["sub_status"].as_str() {
                Some("none") | None => String::new(),
                Some(s) => format!("/{s}"),
            };
            let rpo = v["rpo_actual_secs"]
                .as_f64()
                .map_or("–".to_string(), |r| format!("{r:.1} s"));
            parts.push(format!("{name}: {status}{sub} RPO {rpo}"));
        }
        if self.real.is_some() {
            return Ok((
                format!("{} | {}", parts.join(" | "), self.guest_progress().await),
                all_meeting,
            ));
        }
        let mb = self.written.load(Ordering::Relaxed) as f64 / 1e6;
        Ok((
            format!("{} | guests wrote {mb:.0} MB", parts.join(" | ")),
            all_meeting,
        ))
    }

    /// Each real guest's last progress line (`wrote=N`), from its serial console.
    async fn guest_progress(&self) -> String {
        let mut out = Vec::new();
        for (vm, host, _) in REAL_VMS {
            let Some((_, a)) = self.agents.iter().find(|(h, _)| h == host) else {
                continue;
            };
            let files = match a.vms.console(vm, 4096).await {
                Ok(tail) => crate::guest::events(&tail.text, "wrote")
                    .last()
                    .and_then(|l| l.number("wrote"))
                    .map_or("booting".to_string(), |n| format!("{n} files")),
                Err(_) => "off".to_string(),
            };
            out.push(format!("{vm} {files}"));
        }
        out.join(", ")
    }

    async fn shutdown(self) -> Result<(), LabError> {
        self.stop_workloads.cancel();
        for w in self.workloads {
            let _ = w.await;
        }
        let mut first_error = None;
        if self.real.is_some() {
            for (_, a) in &self.agents {
                a.power_off_guests().await;
            }
        }
        for (host, a) in self.agents.into_iter().rev() {
            if let Err(e) = a.stop().await {
                tracing::warn!(host, error = %e, "agent shutdown");
                first_error.get_or_insert(e);
            }
        }
        self.manager.stop().await?;
        first_error.map_or(Ok(()), Err)
    }
}

/// The `[agent]` lines of a host with real guests: the QEMU driver and its VMs.
fn real_section(real: &RealVms, host: &str, disk_id: &mut u64) -> String {
    let mut s = format!(
        "hypervisor = \"qemu\"\n[qemu]\naccel = {:?}\npowerdown_timeout_secs = 15\n",
        real.accel
    );
    for (vm, _, _) in REAL_VMS.iter().filter(|(_, h, _)| *h == host) {
        *disk_id += 1;
        s.push_str(&format!(
            "[[vms]]\nname = {vm:?}\nmemory_mib = 256\ndisks = [{{ name = {:?}, id = {disk_id}, size = {} }}]\nboot = {{ kind = \"kernel\", kernel = {:?}, initrd = {:?}, cmdline = \"console=ttyS0 panic=-1 bulwark.interval_ms=1000\" }}\n",
            disk_name(vm),
            64 * MIB,
            real.kernel.display().to_string(),
            real.initrd.display().to_string(),
        ));
    }
    s
}

fn disk_name(vm: &str) -> String {
    format!("{vm}-disk0")
}

/// A guest writing 4–64 KiB blocks (4 KiB aligned, inside the disk) through the VM's
/// NBD export, paced to its workload's rate.
async fn guest(
    addr: &str,
    vm: &str,
    size: u64,
    workload: Workload,
    seed: u64,
    stop: &CancellationToken,
    written: &AtomicU64,
) -> Result<(), LabError> {
    let mut c = NbdClient::connect(addr, &disk_name(vm)).await?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xb01_0a4c ^ seed);
    let mut buf = vec![0u8; 64 << 10];
    let (rate, bursty) = match workload {
        Workload::Steady(r) => (r, false),
        Workload::Bursty(r) => (r, true),
    };
    let blocks = size / 4096;
    'outer: while !stop.is_cancelled() {
        let active = if bursty {
            let idle = Duration::from_millis(rng.random_range(4000..12000));
            tokio::select! {
                _ = stop.cancelled() => break 'outer,
                _ = tokio::time::sleep(idle) => {}
            }
            Duration::from_millis(rng.random_range(1000..3000))
        } else {
            // Steady: pace in 1 s periods.
            Duration::from_secs(1)
        };
        let start = Instant::now();
        let mut bytes = 0u64;
        while start.elapsed() < active {
            if stop.is_cancelled() {
                break 'outer;
            }
            let due = Duration::from_secs_f64(bytes as f64 / rate as f64);
            if due > start.elapsed() {
                tokio::select! {
                    _ = stop.cancelled() => break 'outer,
                    _ = tokio::time::sleep(due - start.elapsed()) => {}
                }
                continue;
            }
            let len = 4096 * rng.random_range(1..=16u64);
            let offset = 4096 * rng.random_range(0..blocks.saturating_sub(len / 4096).max(1));
            let data = &mut buf[..len as usize];
            rng.fill_bytes(&mut data[..64]);
            c.write(offset, data, false).await?;
            bytes += len;
            written.fetch_add(len, Ordering::Relaxed);
        }
    }
    c.disconnect().await?;
    Ok(())
}

/// Runs the demo until `signal` completes (or `opts.duration` passes), then stops
/// everything cleanly.
pub async fn run(
    opts: DemoOpts,
    signal: impl std::future::Future<Output = ()> + Send,
) -> Result<(), LabError> {
    let started = Instant::now();
    let dir = demo_dir(opts.dir)?;
    let config = lab::sqlite_config(&dir, opts.listen, opts.web_dir);
    let manager = Manager::start(&config, "demo").await?;
    if opts.real_vms.is_some() {
        print_real_banner(&dir, &manager);
    } else {
        print_banner(&dir, &manager);
    }
    let mut demo = Demo {
        dir,
        real: opts.real_vms,
        manager,
        agents: Vec::new(),
        workloads: Vec::new(),
        stop_workloads: CancellationToken::new(),
        written: Arc::new(AtomicU64::new(0)),
        vpg_ids: Vec::new(),
    };
    let stop = async {
        match opts.duration {
            Some(d) => {
                tokio::select! {
                    _ = signal => {}
                    _ = tokio::time::sleep(d) => println!("--duration reached"),
                }
            }
            None => signal.await,
        }
    };
    tokio::pin!(stop);
    let set_up = tokio::select! {
        r = demo.setup(opts.quiet) => Some(r),
        _ = &mut stop => None,
    };
    let outcome = match set_up {
        Some(Err(e)) => Err(e),
        Some(Ok(())) => {
            let mut sla_reported = false;
            let mut tick =
                tokio::time::interval(Duration::from_secs(if opts.quiet { 1 } else { 3 }));
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = tick.tick() => {}
                }
                match demo.status_line().await {
                    Ok((line, all_meeting)) => {
                        if all_meeting && !sla_reported {
                            sla_reported = true;
                            println!(
                                "All VPGs Meeting SLA {:.1} s after start",
                                started.elapsed().as_secs_f64()
                            );
                        }
                        if !opts.quiet {
                            println!("[{:>5.0} s] {line}", started.elapsed().as_secs_f64());
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "status"),
                }
            }
            Ok(())
        }
        None => Ok(()),
    };
    println!("stopping: guest workloads, agents, manager");
    let stopped = demo.shutdown().await;
    outcome.and(stopped)
}

fn print_banner(dir: &Path, manager: &Manager) {
    println!("Bulwark demo");
    println!("  directory:  {}", dir.display());
    println!("  console:    http://{}/", manager.addr);
    println!("  API token:  {}", manager.api.token);
    println!(
        "  try:        curl -s -H 'Authorization: Bearer {}' http://{}/api/v1/vpgs",
        manager.api.token, manager.addr
    );
    println!(
        "  starting sites {NY} and {LDN} (2 hosts each, agents with mutual TLS), 6 VMs with guest workloads, VPGs ny-to-london (RPO 10 s) and london-to-ny (RPO 30 s); Ctrl-C stops"
    );
}

fn print_real_banner(dir: &Path, manager: &Manager) {
    println!("Bulwark demo with real VMs");
    println!("  directory:  {}", dir.display());
    println!("  console:    http://{}/", manager.addr);
    println!("  API token:  {}", manager.api.token);
    println!(
        "  starting sites {NY} and {LDN} (2 hosts each, QEMU driver), real guests web-01 and app-01 writing files, VPG ny-to-london; serial consoles under <dir>/hosts/<host>/vms/; Ctrl-C stops"
    );
}
