//! A silent partition of the replication link: a cable cut without resets.
//!
//! The protected agent and the recovery agent run in network namespaces of their own,
//! linked to each other by a veth pair (the data link) and each to the root namespace,
//! where the manager listens (the control links). The cut is a `blackhole` qdisc on
//! both ends of the data link: packets vanish, nothing is reset, and the control links
//! stay up. Under guest writes the protected agent must notice the silent peer within
//! its peer timeout, report it (the VPG shows Site disconnection), keep the records
//! until the away bound and then go bitmap-only; when the link returns a Bitmap Sync
//! brings the VPG back to Meeting SLA with nothing lost.

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark::agent::nbd::client::NbdClient;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::agent_common::*;
use crate::orch_common::*;

const MANAGER: &str =
    "heartbeat_ms = 200\ndisconnect_after_ms = 1500\ncheckpoint_hold_bound_ms = 200";
/// Both agents give up on a silent stream peer after 4 s; the protected one keeps
/// records for 8 s more before its disks go bitmap-only.
const PEER_TIMEOUT_SECS: u64 = 4;
const AWAY_BOUND_SECS: u64 = 8;
const SIZE: u64 = 8 * MIB;
/// The guest writes in the first half of its disk.
const SPAN: u64 = 4 * MIB;

/// Runs `ip …`; panics with its output on failure.
fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs `ip netns exec NS tc …`; returns whether it succeeded.
fn tc(ns: &str, args: &[&str]) -> bool {
    Command::new("ip")
        .args(["netns", "exec", ns, "tc"])
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

/// Two namespaces (`p`: protected site, `r`: recovery site), a control link from each to
/// the root namespace and a data link between them. Addresses are 10.201.N.0/28 with N
/// from the process id, on these links only. Everything goes with the namespaces.
struct Sites {
    p: String,
    r: String,
    /// Control link, root end / protected end.
    root_p: String,
    prot_ctl: String,
    /// Control link, root end / recovery end.
    root_r: String,
    rec_ctl: String,
    /// Data link, protected end / recovery end.
    prot_data: String,
    rec_data: String,
}

impl Sites {
    fn new() -> Sites {
        let id = std::process::id();
        let n = id % 250;
        let a = |host: u32| format!("10.201.{n}.{host}");
        let s = Sites {
            p: format!("bwp{id}"),
            r: format!("bwr{id}"),
            root_p: a(1),
            prot_ctl: a(2),
            root_r: a(5),
            rec_ctl: a(6),
            prot_data: a(9),
            rec_data: a(10),
        };
        // Leftovers of an earlier run with the same pid.
        s.remove();
        let (vp, vr) = (format!("bwp{id}c"), format!("bwr{id}c"));
        ip(&["netns", "add", &s.p]);
        ip(&["netns", "add", &s.r]);
        ip(&[
            "link", "add", &vp, "type", "veth", "peer", "name", "ctl", "netns", &s.p,
        ]);
        ip(&[
            "link", "add", &vr, "type", "veth", "peer", "name", "ctl", "netns", &s.r,
        ]);
        ip(&[
            "link", "add", "name", "data", "netns", &s.p, "type", "veth", "peer", "name", "data",
            "netns", &s.r,
        ]);
        ip(&["addr", "add", &format!("{}/30", s.root_p), "dev", &vp]);
        ip(&["link", "set", &vp, "up"]);
        ip(&["addr", "add", &format!("{}/30", s.root_r), "dev", &vr]);
        ip(&["link", "set", &vr, "up"]);
        for (ns, ctl, data) in [
            (&s.p, &s.prot_ctl, &s.prot_data),
            (&s.r, &s.rec_ctl, &s.rec_data),
        ] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", &format!("{ctl}/30"), "dev", "ctl"]);
            ip(&["-n", ns, "link", "set", "ctl", "up"]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{data}/30"),
                "dev",
                "data",
            ]);
            ip(&["-n", ns, "link", "set", "data", "up"]);
        }
        // The manager listens on the root end of the protected site's control link; the
        // recovery site reaches it through its own.
        ip(&[
            "-n",
            &s.r,
            "route",
            "add",
            &format!("{}/32", s.root_p),
            "via",
            &s.root_r,
        ]);
        s
    }

    /// Cuts the data link silently: every packet either way is dropped, no reset.
    fn cut(&self) {
        for ns in [&self.p, &self.r] {
            assert!(tc(
                ns,
                &["qdisc", "add", "dev", "data", "root", "blackhole"]
            ));
        }
    }

    fn heal(&self) {
        for ns in [&self.p, &self.r] {
            assert!(tc(ns, &["qdisc", "del", "dev", "data", "root"]));
        }
    }

    fn remove(&self) {
        // Deleting a namespace deletes its veth ends, and with them their peers.
        for ns in [&self.p, &self.r] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        self.remove();
    }
}

/// Whether this process may make network namespaces (root with `ip` and `tc`).
fn namespaces_available() -> bool {
    let probe = format!("bwprobe{}", std::process::id());
    let ok = Command::new("ip")
        .args(["netns", "add", &probe])
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        let _ = Command::new("ip").args(["netns", "del", &probe]).status();
    }
    ok && Command::new("tc")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The agent config of a host in a test namespace: NBD and data listeners on its own
/// addresses (the admin endpoint stays on the namespace's loopback, as it must; the test
/// reads everything through the manager, as an operator would).
#[allow(clippy::too_many_arguments)]
fn agent_toml(
    lab: &Lab,
    data: &std::path::Path,
    host: &str,
    site: &str,
    m: &ManagerProc,
    token: &str,
    ctl: &str,
    data_listen: Option<&str>,
    vms: &[VmDef],
) -> String {
    let extra =
        format!("peer_timeout_secs = {PEER_TIMEOUT_SECS}\naway_bound_secs = {AWAY_BOUND_SECS}");
    let text = managed_toml(
        lab,
        data,
        host,
        site,
        &m.ws_url(),
        token,
        data_listen.is_some(),
        vms,
        &extra,
    )
    .replace(
        "nbd_listen = \"127.0.0.1:0\"",
        &format!("nbd_listen = \"{ctl}:0\""),
    );
    match data_listen {
        Some(d) => text.replace(
            "data_listen = \"127.0.0.1:0\"",
            &format!("data_listen = \"{d}:0\""),
        ),
        None => text,
    }
}

/// A guest writing random 4 KiB blocks through NBD until stopped; returns the disk's
/// content as every acknowledged write left it.
fn start_guest(
    nbd: String,
    initial: Vec<u8>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<u8>, u64)> {
    tokio::spawn(async move {
        let mut client = NbdClient::connect(nbd.as_str(), "app").await.unwrap();
        let mut model = initial;
        let mut rng = rand::rngs::StdRng::seed_from_u64(18);
        let mut writes = 0u64;
        // Bounded in count and time: at most 100 writes a second, for at most 3 min.
        let deadline = Instant::now() + Duration::from_secs(180);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let off = rng.random_range(0..SPAN / 4096) * 4096;
            let mut buf = vec![0u8; 4096];
            rng.fill(&mut buf[..]);
            client.write(off, &buf, false).await.unwrap();
            model[off as usize..off as usize + 4096].copy_from_slice(&buf);
            writes += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (model, writes)
    })
}

/// The VPG's one disk as `GET /vpgs/{id}/disks` shows it.
async fn disk(m: &ManagerProc, vpg: &str) -> Value {
    let v = m
        .ok("GET", &format!("/api/v1/vpgs/{vpg}/disks"), None)
        .await;
    let list = v["items"].as_array().or_else(|| v.as_array()).cloned();
    list.and_then(|l| l.into_iter().next())
        .unwrap_or_else(|| panic!("one disk in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_partition_is_noticed_and_a_bitmap_sync_heals_it() {
    let _g = crate::SERIAL.lock().await;
    if !namespaces_available() {
        // Only a machine where this process is not root (or has no iproute2) gets here;
        // CI runs as root.
        eprintln!("SKIPPED: network namespaces cannot be made here (needs root, ip, tc)");
        return;
    }
    let sites = Sites::new();
    let lab = Lab::new(&["prot", "rec"]);
    let db = PgDb::new().await;
    let m = ManagerProc::start_on(
        lab.dir.path(),
        &db.url,
        MANAGER,
        &format!("{}:0", sites.root_p),
    )
    .await;
    let token = m.enrolment_token().await;

    let vms = [VmDef::new("app", 1, SIZE)];
    let data_dir = |host: &str| {
        let data = lab.path(host);
        std::fs::create_dir_all(&data).unwrap();
        data
    };
    let pdata = data_dir("prot");
    let ptoml = agent_toml(
        &lab,
        &pdata,
        "prot",
        "prod",
        &m,
        &token,
        &sites.prot_ctl,
        None,
        &vms,
    );
    let pcfg = write_config(lab.dir.path(), "prot", &ptoml);
    let prot = AgentProc::start_with("prot", &pcfg, &pdata, &[], Vec::new(), Some(&sites.p)).await;
    let rdata = data_dir("rec");
    let rtoml = agent_toml(
        &lab,
        &rdata,
        "rec",
        "dr",
        &m,
        &token,
        &sites.rec_ctl,
        Some(&sites.rec_data),
        &[],
    );
    let rcfg = write_config(lab.dir.path(), "rec", &rtoml);
    let rec = AgentProc::start_with("rec", &rcfg, &rdata, &[], Vec::new(), Some(&sites.r)).await;
    let all = [&prot, &rec];
    m.wait_hosts_connected(&["prot", "rec"], &all).await;
    assert!(
        rec.endpoints
            .data
            .as_deref()
            .is_some_and(|d| d.starts_with(&sites.rec_data)),
        "the recovery agent listens on the data link: {:?}",
        rec.endpoints
    );

    let vpg = m
        .create_vpg(
            "partitioned",
            &["app"],
            "dr",
            "rec",
            json!({
                "checkpoint_interval_ms": 1000,
                "rpo_target_secs": 10,
                "journal_history_secs": 3600,
            }),
        )
        .await;
    let meeting = |v: &Value| v["status"] == "meeting_sla" && v["sub_status"] == "none";
    m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &all, meeting)
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let guest = start_guest(
        prot.endpoints.nbd.clone(),
        vec![0; SIZE as usize],
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = m.vpg(&vpg).await;
    assert!(meeting(&v), "{v}");

    // The cut, under writes. The control links stay up: only the protected agent's
    // stream can tell the manager that its peer is gone.
    sites.cut();
    let cut_at = Instant::now();
    let noticed = loop {
        let v = m.vpg(&vpg).await;
        if v["sub_status"] == "site_disconnection" {
            break cut_at.elapsed();
        }
        assert!(
            cut_at.elapsed() < Duration::from_secs(PEER_TIMEOUT_SECS + 6),
            "the silent peer went unnoticed {:?} after the cut (peer timeout {PEER_TIMEOUT_SECS} s): \
             VPG {v:#}\n--- prot:\n{}",
            cut_at.elapsed(),
            tail(&prot.stderr(), 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("silent peer noticed (Site disconnection) {noticed:?} after the cut");
    let v = m.vpg(&vpg).await;
    assert_eq!(v["status"], "not_meeting_sla", "{v}");
    // Records are kept while the peer is away, then the disk goes bitmap-only.
    let d = disk(&m, &vpg).await;
    assert_eq!(d["mode"], "streaming", "before the away bound: {d:#}");
    assert!(
        d["queued_bytes"].as_u64().unwrap() > 0,
        "records kept for the peer: {d:#}"
    );
    let to_bitmap = loop {
        let d = disk(&m, &vpg).await;
        if d["mode"] == "bitmap_only" {
            break cut_at.elapsed();
        }
        assert!(
            cut_at.elapsed() < noticed + Duration::from_secs(AWAY_BOUND_SECS + 6),
            "the disk never went bitmap-only: {d:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("bitmap-only {to_bitmap:?} after the cut");
    // The away bound starts when the peer is found gone (within the peer timeout of
    // the cut): not earlier.
    assert!(
        to_bitmap + Duration::from_secs(1) >= Duration::from_secs(AWAY_BOUND_SECS),
        "bitmap-only at {to_bitmap:?}, before the away bound ran out"
    );
    let v = m.vpg(&vpg).await;
    assert_eq!(v["sub_status"], "site_disconnection", "{v}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The link returns: a Bitmap Sync, then Meeting SLA, with the guest still writing.
    sites.heal();
    let healed = Instant::now();
    m.wait_vpg(
        &vpg,
        "Meeting SLA after the partition",
        SLA_WAIT,
        &all,
        meeting,
    )
    .await;
    eprintln!("Meeting SLA {:?} after the link returned", healed.elapsed());
    let events = m.events(&format!("?vpg_id={vpg}")).await;
    let bitmap_sync = events.iter().any(|e| {
        e["kind"]
            .as_str()
            .is_some_and(|k| k.contains("sync_started"))
            && e["details"]["kind"]
                .as_str()
                .is_some_and(|k| k.eq_ignore_ascii_case("bitmap"))
    });
    assert!(
        bitmap_sync,
        "a Bitmap Sync ran after the partition: {:#?}",
        events
            .iter()
            .filter(|e| e["kind"].as_str().is_some_and(|k| k.contains("sync")))
            .collect::<Vec<_>>()
    );

    // Nothing lost: the guest stops, a tagged checkpoint equals its disk byte for byte.
    stop.store(true, Ordering::SeqCst);
    let (model, writes) = guest.await.unwrap();
    assert!(
        writes > 100,
        "the guest wrote through the cut ({writes} writes)"
    );
    let tagged = m.tag(&vpg, "after-partition").await;
    m.wait_recoverable(&vpg, tagged, &all).await;
    let source = copy_export(&prot.nbd_url("app"), &lab.path("app.copy")).await;
    assert_same(
        "the protected disk against the guest's model",
        &source,
        &model,
    );
    let mut rec = rec;
    rec.stop_clean().await;
    let j = journal_of(&rec, "prot", 1, SIZE);
    let got = view_bytes(&j, tagged as u64, 0, SIZE as usize);
    assert_same("the view at the tag after the partition", &got, &model);
    drop(prot);
    drop(sites);
}
