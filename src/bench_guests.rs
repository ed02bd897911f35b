//! `bulwark bench guests`: real guests under QEMU (the test guest of `scripts/guest/`),
//! a manager on SQLite, one protected and one recovery agent in this process, measured
//! against the same guest on a local raw file with the same QEMU settings, in one run.
//!
//! 1. **RTO to guest-ready**: from `POST /api/v1/vpgs/{id}/failover-test` to the
//!    recovered guest's `ready` line on its serial console (it has mounted its disk and
//!    verified every file of its manifest), for a VPG of one VM and a VPG of `group`
//!    VMs in one boot group (until the last one is ready), against a plain cold boot of
//!    a copy of the same disk from a local raw file (from starting QEMU to the same
//!    line), one alone and `group` at once (under TCG a boot is CPU-bound: `group`
//!    guests on fewer cores cannot boot as fast as one, whoever starts them).
//! 2. **Guest write throughput**: `dd oflag=direct` of `dd_mib` MiB inside the guest
//!    (its `dd` line) onto a protected, replicating disk, onto an agent's NBD export that
//!    is not protected, and onto a local raw file, one after the other on an idle host.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::agent::hypervisor::qemu::cmdline::Accel;
use crate::guest::{self, GuestLine};
use crate::lab::{self, setup, AgentSpec, LabAgent, LabError, Manager};
use crate::proto::control::PowerState;

const MIB: u64 = 1 << 20;
/// Size of the verifying guests' disks.
const DISK: u64 = 64 * MIB;
/// Files each verifying guest writes before it idles.
const FILES: u32 = 30;
/// Longest wait for a boot, a sync or an operation step.
const STEP: Duration = Duration::from_secs(180);

/// What to run.
#[derive(Debug, Clone)]
pub struct GuestBenchOpts {
    pub dir: PathBuf,
    /// Failover tests (and cold boots) of each kind; medians are compared.
    pub repeats: usize,
    /// VMs of the boot group.
    pub group: usize,
    /// MiB the write benchmark writes.
    pub dd_mib: u64,
    /// `tcg` or `kvm` (`auto` probes as the agent does).
    pub accel: String,
}

impl GuestBenchOpts {
    pub fn new(dir: PathBuf) -> GuestBenchOpts {
        GuestBenchOpts {
            dir,
            repeats: 3,
            group: 4,
            dd_mib: 256,
            accel: "tcg".into(),
        }
    }
}

/// Medians in milliseconds, and the write figures (bytes, ms).
#[derive(Debug, Clone)]
pub struct GuestBenchReport {
    pub accel: String,
    pub cold_boot_ms: f64,
    pub cold_group_ms: f64,
    pub rto_one_ms: f64,
    pub rto_group_ms: f64,
    pub group: usize,
    pub dd_local: (u64, u64),
    pub dd_unprotected: (u64, u64),
    pub dd_protected: (u64, u64),
}

fn mib_s((bytes, ms): (u64, u64)) -> f64 {
    bytes as f64 / MIB as f64 / (ms.max(1) as f64 / 1000.0)
}

impl GuestBenchReport {
    pub fn text(&self) -> String {
        let (local, plain, prot) = (
            mib_s(self.dd_local),
            mib_s(self.dd_unprotected),
            mib_s(self.dd_protected),
        );
        format!(
            "guests under QEMU ({accel}), medians\n\
             RTO to guest-ready, 1 VM:            {one:>8.0} ms\n\
             plain cold boot, local raw file:     {cold:>8.0} ms\n\
             ratio (target <= 1.30):              {r1:>8.2}\n\
             RTO to guest-ready, {g} VMs, 1 group: {grp:>8.0} ms\n\
             ratio to 1 VM (target <= 1.50):      {r2:>8.2}\n\
             plain cold boot, {g} at once:         {cgrp:>8.0} ms\n\
             \x20 its ratio to one plain boot:        {r5:>8.2}  (the machine's ceiling)\n\
             ratio RTO {g} VMs / {g} plain at once: {r6:>8.2}\n\
             guest dd oflag=direct, {mib} MiB:\n\
             \x20 local raw file:                    {local:>8.1} MiB/s\n\
             \x20 agent NBD, not protected:          {plain:>8.1} MiB/s\n\
             \x20 agent NBD, protected, replicating: {prot:>8.1} MiB/s\n\
             ratio protected / local:             {r3:>8.2}\n\
             ratio protected / not protected:     {r4:>8.2}\n",
            accel = self.accel,
            one = self.rto_one_ms,
            cold = self.cold_boot_ms,
            r1 = self.rto_one_ms / self.cold_boot_ms,
            g = self.group,
            grp = self.rto_group_ms,
            r2 = self.rto_group_ms / self.rto_one_ms,
            cgrp = self.cold_group_ms,
            r5 = self.cold_group_ms / self.cold_boot_ms,
            r6 = self.rto_group_ms / self.cold_group_ms,
            mib = self.dd_local.0 / MIB,
            r3 = prot / local,
            r4 = prot / plain,
        )
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// The same QEMU settings as the driver's (`qemu::cmdline`), with a local raw disk:
/// the plain boot every figure is compared with.
fn plain_qemu(
    accel: Accel,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
    disk: &Path,
    serial: &Path,
) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    let cpu = if accel == Accel::Kvm { "host" } else { "max" };
    c.args(["-nodefaults", "-no-user-config", "-display", "none"])
        .args(["-machine", &format!("q35,accel={}", accel.as_str())])
        .args(["-cpu", cpu, "-smp", "1", "-m", "256", "-no-reboot"])
        .arg("-chardev")
        .arg(format!("file,id=serial0,path={}", serial.display()))
        .args(["-serial", "chardev:serial0"])
        .arg("-blockdev")
        .arg(
            json!({"driver": "file", "node-name": "disk0", "filename": disk.display().to_string()})
                .to_string(),
        )
        .args(["-device", "virtio-blk-pci,drive=disk0,id=vd0"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Boots `cmd` and waits for the first `event` line of its serial log; returns the
/// time from the start and the line. The QEMU is killed afterwards.
async fn boot_until(
    mut cmd: Command,
    serial: &Path,
    event: &str,
) -> Result<(f64, GuestLine), LabError> {
    let _ = std::fs::remove_file(serial);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(io("start qemu-system-x86_64"))?;
    let found = loop {
        let log = std::fs::read_to_string(serial).unwrap_or_default();
        if let Some(l) = guest::events(&log, event).into_iter().next() {
            break Some((started.elapsed().as_secs_f64() * 1000.0, l));
        }
        if started.elapsed() > STEP || child.try_wait().ok().flatten().is_some() {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    found.ok_or_else(|| setup(format!("the plain guest printed no `{event}` line")))
}

/// Waits until `agent`'s VM `vm` has printed `n` lines of `event`; returns the last.
async fn console_line(
    agent: &LabAgent,
    vm: &str,
    event: &str,
    n: usize,
) -> Result<GuestLine, LabError> {
    let deadline = Instant::now() + STEP;
    loop {
        if let Ok(t) = agent.vms.console(vm, 64 << 10).await {
            if let Some(l) = guest::events(&t.text, event).into_iter().nth(n - 1) {
                return Ok(l);
            }
        }
        if Instant::now() > deadline {
            return Err(setup(format!(
                "{vm}: no `{event}` line #{n} within {STEP:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_task(api: &lab::Api, id: &str, state: &str) -> Result<(), LabError> {
    api.wait(state, STEP, &format!("/api/v1/tasks/{id}"), |t| {
        t["state"] == state || t["state"] == "failed"
    })
    .await?;
    let t = api.get(&format!("/api/v1/tasks/{id}")).await?;
    if t["state"] != state {
        return Err(setup(format!("task {id} failed: {t}")));
    }
    Ok(())
}

/// One failover test of `vpg` timed until every VM of `vms` printed its ready line at
/// the recovery host; stopped afterwards.
async fn timed_test(
    api: &lab::Api,
    rec: &LabAgent,
    vpg: &str,
    vms: &[String],
) -> Result<f64, LabError> {
    let started = Instant::now();
    let t = api
        .post(&format!("/api/v1/vpgs/{vpg}/failover-test"), json!({}))
        .await?;
    let id = t["id"].as_str().unwrap_or_default().to_string();
    for vm in vms {
        let line = console_line(rec, &format!("{vm} - Test"), "ready", 1).await?;
        if line.number("bad") != Some(0) || line.number("verified") != Some(u64::from(FILES)) {
            return Err(setup(format!(
                "{vm}: the recovered guest did not verify: {line:?}"
            )));
        }
    }
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    wait_task(api, &id, "waiting").await?;
    api.post(
        &format!("/api/v1/vpgs/{vpg}/failover-test/stop"),
        json!({"result": "passed"}),
    )
    .await?;
    wait_task(api, &id, "succeeded").await?;
    Ok(ms)
}

pub async fn run(opts: &GuestBenchOpts) -> Result<GuestBenchReport, LabError> {
    let (kernel, initrd) = guest::image()?;
    let dir = std::path::absolute(
        opts.dir
            .join(format!("bench-guests-{}", std::process::id())),
    )
    .map_err(io("resolve the bench directory"))?;
    lab::create_dir(&dir)?;
    let out = run_in(opts, &dir, &kernel, &initrd).await;
    let _ = std::fs::remove_dir_all(&dir);
    out
}

async fn run_in(
    opts: &GuestBenchOpts,
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
) -> Result<GuestBenchReport, LabError> {
    let accel = match opts.accel.as_str() {
        "kvm" => Accel::Kvm,
        "tcg" => Accel::Tcg,
        other => return Err(setup(format!("--accel {other}: expected kvm or tcg"))),
    };
    let config = lab::sqlite_config(
        dir,
        "127.0.0.1:0".parse().map_err(|_| setup("address"))?,
        None,
    );
    let manager = Manager::start(&config, "bench-guests").await?;
    let api = manager.api.clone();
    let etoken = api.enrolment_token("bench-guests").await?;
    let verify = format!("console=ttyS0 panic=-1 bulwark.files={FILES} bulwark.interval_ms=20");
    let dd = format!(
        "console=ttyS0 panic=-1 bulwark.mode=ddbench bulwark.ddsize_mib={}",
        opts.dd_mib
    );
    let qemu = format!(
        "hypervisor = \"qemu\"\n[qemu]\naccel = {:?}\npowerdown_timeout_secs = 10\n",
        opts.accel
    );
    let vm = |name: &str, id: usize, size: u64, cmdline: &str| {
        format!(
            "[[vms]]\nname = {name:?}\nmemory_mib = 256\ndisks = [{{ name = {name:?}, id = {id}, size = {size} }}]\nboot = {{ kind = \"kernel\", kernel = {:?}, initrd = {:?}, cmdline = {cmdline:?} }}\n",
            kernel.display().to_string(),
            initrd.display().to_string(),
        )
    };
    let group: Vec<String> = (0..opts.group).map(|i| format!("grp-{i}")).collect();
    let mut section = qemu.clone();
    section.push_str(&vm("solo", 1, DISK, &verify));
    for (i, name) in group.iter().enumerate() {
        section.push_str(&vm(name, i + 2, DISK, &verify));
    }
    section.push_str(&vm("dd", opts.group + 2, (opts.dd_mib + 16) * MIB, &dd));
    section.push_str(&vm(
        "dd-free",
        opts.group + 3,
        (opts.dd_mib + 16) * MIB,
        &dd,
    ));
    let prot = LabAgent::start(AgentSpec {
        data_dir: dir.join("prot"),
        host: "prot",
        site: "prod",
        section: &section,
        manager: &manager.ws,
        enrolment_token: &etoken,
        tls_dir: None,
    })
    .await?;
    let rec_section = format!("data_listen = \"127.0.0.1:0\"\n{qemu}");
    let rec = LabAgent::start(AgentSpec {
        data_dir: dir.join("rec"),
        host: "rec",
        site: "dr",
        section: &rec_section,
        manager: &manager.ws,
        enrolment_token: &etoken,
        tls_dir: None,
    })
    .await?;
    let agents = [prot, rec];
    let out = measure(
        opts, accel, dir, kernel, initrd, &api, &agents, &group, &verify, &dd,
    )
    .await;
    for a in &agents {
        a.power_off_guests().await;
    }
    let [prot, rec] = agents;
    prot.stop().await?;
    rec.stop().await?;
    manager.stop().await?;
    out
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    opts: &GuestBenchOpts,
    accel: Accel,
    dir: &Path,
    kernel: &Path,
    initrd: &Path,
    api: &lab::Api,
    agents: &[LabAgent; 2],
    group: &[String],
    verify: &str,
    dd: &str,
) -> Result<GuestBenchReport, LabError> {
    let [prot, rec] = agents;
    let inv = api
        .wait_inventory(group.len() + 3, &["prot", "rec"], Duration::from_secs(60))
        .await?;
    // The verifying guests write their files, then idle: their disks stay as tagged.
    for vm in std::iter::once("solo").chain(group.iter().map(String::as_str)) {
        console_line(prot, vm, "done", 1).await?;
    }
    // The write guests ran once at start, while the others booted: not measured.
    for vm in ["dd", "dd-free"] {
        console_line(prot, vm, "dd", 1).await?;
        wait_power(prot, vm, PowerState::Off).await?;
    }
    let settings = json!({"checkpoint_interval_ms": 1000, "rpo_target_secs": 30, "journal_history_secs": 3600});
    let one = api
        .ensure_vpg(&inv, "one", "dr", settings.clone(), &[("solo", "rec")])
        .await?;
    let members: Vec<(&str, &str)> = group.iter().map(|v| (v.as_str(), "rec")).collect();
    let grp = api
        .ensure_vpg(&inv, "group", "dr", settings.clone(), &members)
        .await?;
    let ddv = api
        .ensure_vpg(&inv, "dd", "dr", settings, &[("dd", "rec")])
        .await?;
    for v in [&one, &grp, &ddv] {
        api.wait_vpg(v, "meeting_sla", STEP).await?;
    }

    // Plain cold boots of a copy of solo's disk.
    let copy = dir.join("solo-copy.raw");
    copy_disk(&prot.agent.endpoints().nbd, "solo", &copy).await?;
    let serial = dir.join("plain-serial.log");
    let mut cold = Vec::new();
    for _ in 0..opts.repeats {
        let cmd = plain_qemu(accel, kernel, initrd, verify, &copy, &serial);
        let (ms, line) = boot_until(cmd, &serial, "ready").await?;
        if line.number("bad") != Some(0) {
            return Err(setup(format!("plain boot did not verify: {line:?}")));
        }
        cold.push(ms);
    }
    // The same, `group` at once (each on its own copy).
    let mut cold_group = Vec::new();
    for _ in 0..opts.repeats {
        let mut boots = Vec::new();
        for i in 0..group.len() {
            let disk = dir.join(format!("solo-copy-{i}.raw"));
            std::fs::copy(&copy, &disk).map_err(io("copy the plain disk"))?;
            let log = dir.join(format!("plain-serial-{i}.log"));
            let cmd = plain_qemu(accel, kernel, initrd, verify, &disk, &log);
            boots.push(async move { boot_until(cmd, &log, "ready").await });
        }
        let mut slowest: f64 = 0.0;
        for r in futures::future::join_all(boots).await {
            slowest = slowest.max(r?.0);
        }
        cold_group.push(slowest);
    }
    let mut rto_one = Vec::new();
    let mut rto_group = Vec::new();
    for _ in 0..opts.repeats {
        rto_one.push(timed_test(api, rec, &one, &["solo".to_string()]).await?);
        rto_group.push(timed_test(api, rec, &grp, group).await?);
    }

    // Writes, one guest at a time: an unprotected export, a protected and replicating
    // one, then a local raw file.
    let mut second_run = Vec::new();
    for vm in ["dd-free", "dd"] {
        prot.vms
            .set_power(vm, PowerState::On)
            .await
            .map_err(|e| setup(format!("power on {vm}: {e}")))?;
        second_run.push(console_line(prot, vm, "dd", 2).await?);
        wait_power(prot, vm, PowerState::Off).await?;
    }
    let (unprotected, protected) = (second_run[0].clone(), second_run[1].clone());
    let raw = dir.join("dd-local.raw");
    std::fs::File::create(&raw)
        .and_then(|f| f.set_len((opts.dd_mib + 16) * MIB))
        .map_err(io(format!("create {}", raw.display())))?;
    let (_, local) = boot_until(
        plain_qemu(accel, kernel, initrd, dd, &raw, &serial),
        &serial,
        "dd",
    )
    .await?;
    let dd_of = |l: &GuestLine| -> Result<(u64, u64), LabError> {
        match (l.number("bytes"), l.number("ms"), l.number("io_errors")) {
            (Some(b), Some(ms), Some(0)) if b > 0 => Ok((b, ms)),
            _ => Err(setup(format!("bad dd line: {l:?}"))),
        }
    };
    Ok(GuestBenchReport {
        accel: accel.as_str().into(),
        cold_boot_ms: median(cold),
        cold_group_ms: median(cold_group),
        rto_one_ms: median(rto_one),
        rto_group_ms: median(rto_group),
        group: group.len(),
        dd_local: dd_of(&local)?,
        dd_unprotected: dd_of(&unprotected)?,
        dd_protected: dd_of(&protected)?,
    })
}

async fn wait_power(agent: &LabAgent, vm: &str, state: PowerState) -> Result<(), LabError> {
    let deadline = Instant::now() + STEP;
    while !agent
        .vms
        .inventory()
        .vms
        .iter()
        .any(|v| v.name == vm && v.power_state == state)
    {
        if Instant::now() > deadline {
            return Err(setup(format!("{vm} never powered {}", state.as_str())));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// Copies an export of the agent at `nbd` into a raw file.
async fn copy_disk(nbd: &str, export: &str, to: &Path) -> Result<(), LabError> {
    use std::io::Write;
    let mut c = crate::agent::nbd::client::NbdClient::connect(nbd, export).await?;
    let size = c.info().size;
    let mut f = std::fs::File::create(to).map_err(io(format!("create {}", to.display())))?;
    let mut off = 0;
    while off < size {
        let len = (size - off).min(4 * MIB);
        let buf = c.read(off, len as u32).await?;
        f.write_all(&buf).map_err(io("write the copy"))?;
        off += len;
    }
    c.disconnect().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures() {
        assert!((mib_s((256 * MIB, 1000)) - 256.0).abs() < 1e-9);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
    }
}
