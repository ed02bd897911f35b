//! The system as one: a manager on PostgreSQL and agents as separate processes on
//! loopback, enrolled with a token, driven over the control channel. A VPG is created
//! through the REST API and must reach Meeting SLA by itself; checkpoints are cut across
//! hosts with the consistency barrier; agents and the manager are killed and restarted.
//!
//! Guests are real NBD clients: `qemu-io` / `qemu-img`, and our own client where a test
//! needs thousands of acknowledged writes per second (the cross-VM writer).
#![allow(clippy::unwrap_used)]

mod agent_common;
mod orch_common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_common::*;
use bulwark::agent::nbd::client::NbdClient;
use orch_common::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// These tests start several processes each; on two cores they run one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Manager timings for tests: fast heartbeats and disconnection.
const MANAGER: &str =
    "heartbeat_ms = 200\ndisconnect_after_ms = 1500\ncheckpoint_hold_bound_ms = 200";

/// A protected agent's stream gives up on an absent peer after 2 s and goes bitmap-only.
const PROTECTED_EXTRA: &str = "away_bound_secs = 2";

fn settings(interval_ms: u32) -> Value {
    json!({
        "checkpoint_interval_ms": interval_ms,
        "rpo_target_secs": 10,
        "journal_history_secs": 3600,
    })
}

fn meeting_sla(v: &Value) -> bool {
    v["status"] == "meeting_sla" && v["sub_status"] == "none"
}

/// One guest disk written through our NBD client, with the bytes every acknowledged
/// write left (the model).
struct Guest {
    client: NbdClient,
    model: Vec<u8>,
}

impl Guest {
    async fn connect(agent: &AgentProc, export: &str, size: u64, initial: Vec<u8>) -> Guest {
        let client = NbdClient::connect(agent.endpoints.nbd.as_str(), export)
            .await
            .unwrap_or_else(|e| panic!("nbd connect {export}: {e}"));
        assert_eq!(client.info().size, size);
        Guest {
            client,
            model: initial,
        }
    }

    async fn write(&mut self, off: u64, data: &[u8]) {
        self.client.write(off, data, false).await.unwrap();
        self.model[off as usize..off as usize + data.len()].copy_from_slice(data);
    }

    /// `n` random 4 KiB writes in the first `span` bytes.
    async fn random_writes(&mut self, rng: &mut rand::rngs::StdRng, n: usize, span: u64) {
        for _ in 0..n {
            let off = rng.random_range(0..span / 4096) * 4096;
            let mut buf = vec![0u8; 4096];
            rng.fill(&mut buf[..]);
            self.write(off, &buf).await;
        }
    }
}

/// Waits until every replicated disk of `agent` has nothing unacknowledged and no sync
/// running.
async fn wait_drained(agent: &AgentProc, others: &[&AgentProc]) {
    agent
        .wait_status("stream drained", others, |s| {
            s.protected.iter().all(|d| {
                d.recovery_host.is_none()
                    || (d.queued_records == 0 && d.sync.running.is_none() && !d.owes_sync)
            })
        })
        .await;
}

/// The full manager + agents lab of most tests: hosts `prot-a` and `prot-b` at site
/// `prod`, recovery host `rec` at site `dr`.
struct World {
    lab: Lab,
    _db: PgDb,
    m: ManagerProc,
    token: String,
}

impl World {
    async fn new(manager_extra: &str) -> World {
        let lab = Lab::new(&["prot-a", "prot-b", "rec"]);
        let db = PgDb::new().await;
        let m = ManagerProc::start(lab.dir.path(), &db.url, manager_extra).await;
        let token = m.enrolment_token().await;
        World {
            lab,
            _db: db,
            m,
            token,
        }
    }

    async fn agent(
        &self,
        host: &str,
        site: &str,
        recovery: bool,
        vms: &[VmDef],
        extra: &str,
    ) -> AgentProc {
        start_managed(
            &self.lab,
            &self.m,
            &self.token,
            host,
            site,
            recovery,
            vms,
            extra,
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_vms_on_two_hosts_reach_meeting_sla_and_a_tagged_view_equals_the_sources() {
    let _g = SERIAL.lock().await;
    let w = World::new(MANAGER).await;
    let size = 8 * MIB;
    let a_vms = [VmDef::new("web-1", 1, size), VmDef::new("web-2", 2, size)];
    let b_vms = [VmDef::new("db-1", 1, size)];
    let pa = w
        .agent("prot-a", "prod", false, &a_vms, PROTECTED_EXTRA)
        .await;
    let pb = w
        .agent("prot-b", "prod", false, &b_vms, PROTECTED_EXTRA)
        .await;
    let rec = w.agent("rec", "dr", true, &[], "").await;
    let all = [&pa, &pb, &rec];
    w.m.wait_hosts_connected(&["prot-a", "prot-b", "rec"], &all)
        .await;
    for vm in ["web-1", "web-2", "db-1"] {
        let v = w.m.vm(vm).await.unwrap_or_else(|| panic!("{vm} reported"));
        assert_eq!(v["disks"].as_array().unwrap().len(), 1, "{v}");
        assert_eq!(v["disks"][0]["size_bytes"], size, "{v}");
    }

    // Data before protection: the Initial Sync must carry it.
    let exports = [(&pa, "web-1"), (&pa, "web-2"), (&pb, "db-1")];
    for (i, (agent, export)) in exports.iter().enumerate() {
        let cmds = vec![
            format!("write -P {} 0 1M", 0x11 + i),
            format!("write -P {} 5M 64k", 0x21 + i),
        ];
        let o = qemu_io(
            &agent.nbd_url(export),
            "none",
            &cmds,
            Duration::from_secs(30),
        )
        .await;
        assert_qemu_ok(&o);
    }

    let started = Instant::now();
    let vpg =
        w.m.create_vpg(
            "shop",
            &["web-1", "web-2", "db-1"],
            "dr",
            "rec",
            settings(1000),
        )
        .await;
    let v = w.m.vpg(&vpg).await;
    assert_eq!(v["status"], "initializing", "{v}");
    w.m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &all, meeting_sla)
        .await;
    let to_sla = started.elapsed();
    eprintln!("VPG of 3 VMs reached Meeting SLA in {to_sla:?}");
    let events = w.m.events(&format!("?vpg_id={vpg}")).await;
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(
        kinds.iter().any(|k| k.contains("sync_started"))
            && kinds.iter().any(|k| k.contains("sync_ended")),
        "sync start and end events recorded for the VPG: {kinds:?}"
    );

    // Throughput and IOPS per disk: web-1 written at a steady pace for longer than the
    // manager's window, the other two idle.
    let rate = assert_disk_throughput(&w.m, &vpg, &pa, "web-1", &["web-2", "db-1"]).await;
    eprintln!("web-1 written at {rate:.0} B/s; the manager reported it");

    // Writes under protection, then a tagged checkpoint of a quiet moment, the sources
    // copied at that moment, then more writes the view must not show.
    for (i, (agent, export)) in exports.iter().enumerate() {
        let cmds = vec![
            format!("write -P {} 1M 2M", 0x31 + i),
            format!("write -z 512k 128k"),
            format!("write -P {} 7M 4k", 0x41 + i),
        ];
        let o = qemu_io(
            &agent.nbd_url(export),
            "none",
            &cmds,
            Duration::from_secs(30),
        )
        .await;
        assert_qemu_ok(&o);
    }
    wait_drained(&pa, &all).await;
    wait_drained(&pb, &all).await;
    let tagged = w.m.tag(&vpg, "before-upgrade").await;
    let mut sources = Vec::new();
    for (agent, export) in exports {
        let out = w.lab.path(&format!("{export}.copy"));
        sources.push(copy_export(&agent.nbd_url(export), &out).await);
    }
    for (agent, export) in exports {
        let o = qemu_io(
            &agent.nbd_url(export),
            "none",
            &["write -P 0x99 0 2M".to_string()],
            Duration::from_secs(30),
        )
        .await;
        assert_qemu_ok(&o);
    }
    w.m.wait_recoverable(&vpg, tagged, &all).await;
    let cps = w.m.checkpoints(&vpg, false).await;
    let c = cps
        .iter()
        .find(|c| c["id"].as_i64() == Some(tagged))
        .unwrap();
    assert_eq!(c["tag"], "before-upgrade");
    assert_eq!(c["kind"], "user_tagged");
    // Scheduled rounds every second, each recoverable once every journal has it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let scheduled = loop {
        let mut times: Vec<chrono::DateTime<chrono::Utc>> =
            w.m.checkpoints(&vpg, true)
                .await
                .iter()
                .filter(|c| c["kind"] == "scheduled")
                .map(|c| c["taken_at"].as_str().unwrap().parse().unwrap())
                .collect();
        if times.len() >= 5 || Instant::now() > deadline {
            times.sort();
            break times;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert!(
        scheduled.len() >= 5,
        "scheduled checkpoints every second: {scheduled:?}"
    );
    for pair in scheduled.windows(2) {
        let gap = (pair[1] - pair[0]).num_milliseconds();
        assert!(
            (500..=3000).contains(&gap),
            "scheduled checkpoints {gap} ms apart: {scheduled:?}"
        );
    }

    // The recovery journals, offline: the view at the tag equals the sources.
    let mut rec = rec;
    rec.stop_clean().await;
    for ((host, id), want) in [("prot-a", 1), ("prot-a", 2), ("prot-b", 1)]
        .into_iter()
        .zip(&sources)
    {
        let j = journal_of(&rec, host, id, size);
        let got = view_bytes(&j, tagged as u64, 0, size as usize);
        assert_same(
            &format!("{host} disk {id} at the tagged checkpoint"),
            &got,
            want,
        );
    }
}

/// Writes `export` at a steady pace for 7 s (64 KiB every 20 ms, acknowledged), then
/// checks `GET /vpgs/{id}/disks`: the disk's throughput and IOPS match what was written
/// (the agent's window is the last 5 whole seconds), the `idle` disks show none.
/// Returns the rate written, bytes/s.
async fn assert_disk_throughput(
    m: &ManagerProc,
    vpg: &str,
    agent: &AgentProc,
    export: &str,
    idle: &[&str],
) -> f64 {
    const CHUNK: usize = 64 << 10;
    let mut client = NbdClient::connect(agent.endpoints.nbd.as_str(), export)
        .await
        .unwrap();
    let data = vec![0x77u8; CHUNK];
    let started = Instant::now();
    let mut writes = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while started.elapsed() < Duration::from_secs(7) {
        tick.tick().await;
        let off = (writes % 16) * CHUNK as u64 + (6 << 20);
        client.write(off, &data, false).await.unwrap();
        writes += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let (rate, iops) = (writes as f64 * CHUNK as f64 / secs, writes as f64 / secs);
    // The next heartbeat carries the window that ends now.
    let deadline = Instant::now() + Duration::from_secs(3);
    let disks = loop {
        let disks = m
            .ok("GET", &format!("/api/v1/vpgs/{vpg}/disks"), None)
            .await;
        let busy = disks
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["vm_name"] == export);
        if busy.is_some_and(|d| d["throughput_bytes_per_sec"].as_f64() > Some(rate * 0.6))
            || Instant::now() > deadline
        {
            break disks;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let disks = disks.as_array().unwrap();
    assert_eq!(disks.len(), 1 + idle.len(), "{disks:?}");
    for d in disks {
        assert_eq!(d["reported"], true, "{d}");
        assert_eq!(d["mode"], "streaming", "{d}");
        let (got, got_iops) = (
            d["throughput_bytes_per_sec"].as_f64().unwrap(),
            d["iops"].as_f64().unwrap(),
        );
        if d["vm_name"] == export {
            assert!(
                (rate * 0.6..=rate * 1.4).contains(&got),
                "{export}: wrote {rate:.0} B/s, reported {got:.0}: {d}"
            );
            assert!(
                (iops * 0.6..=iops * 1.4).contains(&got_iops),
                "{export}: wrote {iops:.1}/s, reported {got_iops:.1}: {d}"
            );
        } else {
            assert!(idle.contains(&d["vm_name"].as_str().unwrap()), "{d}");
            assert_eq!((got, got_iops), (0.0, 0.0), "idle disk: {d}");
        }
    }
    rate
}

/// Writes counter n to VM A, waits for the acknowledgement, writes n to VM B, while
/// checkpoints are cut as fast as the API allows; then checks B ≤ A at every recoverable
/// checkpoint. Returns (checkpoints checked, violations).
async fn cross_vm_run(manager_extra: &str, rounds: usize) -> (usize, usize) {
    let w = World::new(manager_extra).await;
    let size = 4 * MIB;
    // prot-a sorts before prot-b: without the barrier the manager reaches A's host first,
    // the order in which an unsynchronised checkpoint can capture B ahead of A.
    let pa = w
        .agent(
            "prot-a",
            "prod",
            false,
            &[VmDef::new("vm-a", 1, size)],
            PROTECTED_EXTRA,
        )
        .await;
    let pb = w
        .agent(
            "prot-b",
            "prod",
            false,
            &[VmDef::new("vm-b", 1, size)],
            PROTECTED_EXTRA,
        )
        .await;
    let mut rec = w.agent("rec", "dr", true, &[], "").await;
    let all = [&pa, &pb, &rec];
    w.m.wait_hosts_connected(&["prot-a", "prot-b", "rec"], &all)
        .await;
    let vpg =
        w.m.create_vpg("pair", &["vm-a", "vm-b"], "dr", "rec", settings(1000))
            .await;
    w.m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &all, meeting_sla)
        .await;

    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicU64::new(0));
    let mut a = NbdClient::connect(pa.endpoints.nbd.as_str(), "vm-a")
        .await
        .unwrap();
    let mut b = NbdClient::connect(pb.endpoints.nbd.as_str(), "vm-b")
        .await
        .unwrap();
    let writer = {
        let stop = stop.clone();
        let counter = counter.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline && n < 50_000_000 {
                n += 1;
                let mut blk = [0u8; 4096];
                blk[..8].copy_from_slice(&n.to_le_bytes());
                a.write(0, &blk, false).await.unwrap();
                b.write(0, &blk, false).await.unwrap();
                counter.store(n, Ordering::Relaxed);
            }
            n
        })
    };
    let started = Instant::now();
    let mut tags = Vec::new();
    for i in 0..rounds {
        tags.push(w.m.tag(&vpg, &format!("c{i}")).await);
    }
    let cut_for = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let pairs = writer.await.unwrap();
    eprintln!("{rounds} tagged rounds in {cut_for:?} while the writer did {pairs} pairs");
    assert!(
        pairs > rounds as u64,
        "the writer kept writing between checkpoints ({pairs} pairs)"
    );
    let last = *tags.last().unwrap();
    w.m.wait_recoverable(&vpg, last, &all).await;
    let mut recoverable: Vec<u64> =
        w.m.checkpoints(&vpg, true)
            .await
            .iter()
            .filter_map(|c| c["id"].as_i64().map(|i| i as u64))
            .collect();
    recoverable.sort_unstable();
    rec.stop_clean().await;
    let ja = journal_of(&rec, "prot-a", 1, size);
    let jb = journal_of(&rec, "prot-b", 1, size);
    let counter_at = |j: &bulwark::agent::journal::Journal, id: u64| {
        u64::from_le_bytes(view_bytes(j, id, 0, 8).try_into().unwrap())
    };
    let mut violations = 0;
    let mut progressed = 0;
    let mut prev_a = 0;
    for id in &recoverable {
        let (va, vb) = (counter_at(&ja, *id), counter_at(&jb, *id));
        if vb > va {
            violations += 1;
            if violations <= 5 {
                eprintln!("checkpoint {id}: B = {vb} > A = {va}");
            }
        }
        if va > prev_a {
            progressed += 1;
        }
        prev_a = prev_a.max(va);
    }
    assert!(
        progressed * 2 > recoverable.len(),
        "most checkpoints saw the writer progress ({progressed} of {})",
        recoverable.len()
    );
    (recoverable.len(), violations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_vm_checkpoints_are_consistent_with_the_barrier() {
    let _g = SERIAL.lock().await;
    let (checked, violations) = cross_vm_run(MANAGER, 300).await;
    eprintln!("barrier on: {checked} recoverable checkpoints checked, {violations} violations");
    assert!(
        checked >= 300,
        "hundreds of checkpoints checked ({checked})"
    );
    assert_eq!(violations, 0, "B ahead of A at a recoverable checkpoint");
}

/// The same writer with the barrier switched off (test-only setting): the checkpoints
/// are no longer consistent across hosts, which is what the barrier exists for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_barrier_cross_vm_checkpoints_break() {
    let _g = SERIAL.lock().await;
    let extra = format!("{MANAGER}\ntest_disable_checkpoint_barrier = true");
    let (checked, violations) = cross_vm_run(&extra, 300).await;
    eprintln!("barrier off: {checked} recoverable checkpoints checked, {violations} violations");
    assert!(
        checked >= 300,
        "hundreds of checkpoints checked ({checked})"
    );
    assert!(
        violations > 0,
        "without the barrier some checkpoint should capture B ahead of A"
    );
}

/// Kill -9 of the recovery agent while the guest writes: Site disconnection, the stream
/// gives up and the disk goes bitmap-only, the agent comes back, a Bitmap Sync, Meeting
/// SLA, and the view equals every acknowledged write. Then kill -9 of the protected
/// agent: a Delta Sync bounded by the activity log. Then the manager: restarted, agents
/// reconnect, checkpoints go on, nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_of_either_agent_and_a_manager_restart_lose_nothing() {
    let _g = SERIAL.lock().await;
    let mut w = World::new(MANAGER).await;
    let size = 32 * MIB;
    let mut pa = w
        .agent(
            "prot-a",
            "prod",
            false,
            &[VmDef::new("app", 1, size)],
            PROTECTED_EXTRA,
        )
        .await;
    let mut rec = w.agent("rec", "dr", true, &[], "").await;
    w.m.wait_hosts_connected(&["prot-a", "rec"], &[&pa, &rec])
        .await;
    let vpg =
        w.m.create_vpg("app", &["app"], "dr", "rec", settings(1000))
            .await;
    w.m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &[&pa, &rec], meeting_sla)
        .await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(6);
    let mut g = Guest::connect(&pa, "app", size, vec![0u8; size as usize]).await;
    g.random_writes(&mut rng, 200, 16 * MIB).await;

    // 1. The recovery agent dies; the guest keeps writing.
    rec.kill9().await;
    w.m.wait_vpg(&vpg, "Site disconnection", SLA_WAIT, &[&pa], |v| {
        v["sub_status"]
            .as_str()
            .is_some_and(|s| s.starts_with("site_disconnection"))
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        g.random_writes(&mut rng, 50, 16 * MIB).await;
        let s = pa.status().await;
        if s.protected[0].mode == bulwark::proto::agent::ReplicationMode::BitmapOnly {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "disk never went bitmap-only: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    g.random_writes(&mut rng, 100, 16 * MIB).await;
    let before = pa.status().await.protected[0].sync.completed;
    rec.spawn().await;
    let s = pa
        .wait_status(
            "a Bitmap Sync after the recovery agent came back",
            &[&rec],
            |s| {
                let d = &s.protected[0];
                d.sync.completed > before
                    && d.sync
                        .last
                        .as_ref()
                        .is_some_and(|l| l.kind == bulwark::model::status::SyncKind::Bitmap)
            },
        )
        .await;
    eprintln!("after recovery kill -9: {:?}", s.protected[0].sync.last);
    let reason = &s.protected[0].sync.last.as_ref().unwrap().reason;
    assert!(
        reason.contains("bitmap only"),
        "the Bitmap Sync says the stream dropped records: {reason}"
    );
    w.m.wait_vpg(
        &vpg,
        "Meeting SLA again",
        SLA_WAIT,
        &[&pa, &rec],
        meeting_sla,
    )
    .await;
    let t1 = w.m.tag(&vpg, "after-recovery-crash").await;
    let model1 = g.model.clone();
    g.random_writes(&mut rng, 20, 16 * MIB).await;
    w.m.wait_recoverable(&vpg, t1, &[&pa, &rec]).await;

    // 2. The protected agent dies right after acknowledged writes (after everything
    // before was replicated and cleared): the Delta after the restart covers the
    // activity log's hot extents (4 MiB each; the earlier writes' extents stay hot, as
    // in DRBD), never the whole disk.
    wait_drained(&pa, &[&rec]).await;
    pa.wait_status("bitmap cleared behind the acknowledgements", &[&rec], |s| {
        s.protected[0].dirty_regions == 0
    })
    .await;
    g.random_writes(&mut rng, 300, 4 * MIB).await;
    let acked = std::mem::take(&mut g.model);
    drop(g);
    pa.kill9().await;
    pa.spawn().await;
    let s = pa
        .wait_status("a Delta Sync after the unclean restart", &[&rec], |s| {
            let d = &s.protected[0];
            d.start_state == bulwark::proto::agent::StartState::Unclean
                && d.sync
                    .last
                    .as_ref()
                    .is_some_and(|l| l.kind == bulwark::model::status::SyncKind::Delta)
        })
        .await;
    let last = s.protected[0].sync.last.clone().unwrap();
    eprintln!(
        "after protected kill -9: {last:?}, AL extents {}",
        s.protected[0].start_al_extents
    );
    assert!(
        last.blocks_compared * 4096 <= s.protected[0].start_al_extents * (4 * MIB)
            && last.blocks_compared * 4096 < size,
        "the Delta covers the activity log and bitmap, not the whole disk: {last:?}"
    );
    w.m.wait_vpg(
        &vpg,
        "Meeting SLA after the protected restart",
        SLA_WAIT,
        &[&pa, &rec],
        meeting_sla,
    )
    .await;
    let local = copy_export(&pa.nbd_url("app"), &w.lab.path("app.after-crash")).await;
    assert_same(
        "the protected disk after kill -9 vs every acknowledged write",
        &local,
        &acked,
    );
    let mut g = Guest::connect(&pa, "app", size, acked).await;

    // 3. The manager restarts (kill -9); the agents reconnect, checkpoints go on.
    let before_restart = w.m.checkpoints(&vpg, true).await.len();
    assert!(before_restart > 0);
    w.m.kill9().await;
    g.random_writes(&mut rng, 100, 16 * MIB).await;
    w.m.spawn().await;
    w.m.wait_hosts_connected(&["prot-a", "rec"], &[&pa, &rec])
        .await;
    w.m.wait_vpg(
        &vpg,
        "Meeting SLA after the manager restart",
        SLA_WAIT,
        &[&pa, &rec],
        meeting_sla,
    )
    .await;
    wait_drained(&pa, &[&rec]).await;
    let t2 = w.m.tag(&vpg, "after-manager-restart").await;
    let model2 = g.model.clone();
    w.m.wait_recoverable(&vpg, t2, &[&pa, &rec]).await;
    let still = w.m.checkpoints(&vpg, true).await;
    assert!(
        still.iter().any(|c| c["id"].as_i64() == Some(t1)),
        "checkpoints recoverable before the restart stay recoverable"
    );

    rec.stop_clean().await;
    let j = journal_of(&rec, "prot-a", 1, size);
    assert_same(
        "view after the recovery agent's crash",
        &view_bytes(&j, t1 as u64, 0, size as usize),
        &model1,
    );
    assert_same(
        "view after the protected agent's crash and the manager's restart",
        &view_bytes(&j, t2 as u64, 0, size as usize),
        &model2,
    );
}

/// A VM added to a protected VPG gets its Disk Initial Sync and joins the checkpoints; a
/// VM removed with its recovery disk has the replica deleted at the recovery host once
/// it stopped streaming; a VM removed without stays replicated-to-date on disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vms_added_and_removed_under_protection() {
    let _g = SERIAL.lock().await;
    let w = World::new(MANAGER).await;
    let size = 8 * MIB;
    let vms = [
        VmDef::new("vm-1", 1, size),
        VmDef::new("vm-2", 2, size),
        VmDef::new("vm-3", 3, size),
    ];
    let pa = w
        .agent("prot-a", "prod", false, &vms, PROTECTED_EXTRA)
        .await;
    let mut rec = w.agent("rec", "dr", true, &[], "").await;
    let all = [&pa, &rec];
    w.m.wait_hosts_connected(&["prot-a", "rec"], &all).await;
    let vpg =
        w.m.create_vpg("grow", &["vm-1", "vm-2"], "dr", "rec", settings(1000))
            .await;
    w.m.wait_vpg(&vpg, "Meeting SLA", SLA_WAIT, &all, meeting_sla)
        .await;
    let replica = |id: u64| storage_of(&rec, "prot-a").join(format!("disk-{id:016x}"));
    assert!(replica(1).is_dir() && replica(2).is_dir());
    assert!(!replica(3).exists(), "vm-3 is not protected yet");

    // Add vm-3 (with data written before): Disk Initial Sync, then Meeting SLA.
    let o = qemu_io(
        &pa.nbd_url("vm-3"),
        "none",
        &["write -P 0x33 1M 3M".to_string()],
        Duration::from_secs(30),
    )
    .await;
    assert_qemu_ok(&o);
    let vm3 = w.m.vm("vm-3").await.unwrap();
    let rec_host = w.m.host("rec").await.unwrap();
    w.m.ok(
        "POST",
        &format!("/api/v1/vpgs/{vpg}/members"),
        Some(json!({"vm_id": vm3["id"], "recovery_host_id": rec_host["id"]})),
    )
    .await;
    pa.wait_status("vm-3's Initial Sync", &[&rec], |s| {
        s.protected.iter().any(|d| {
            d.name == "vm-3"
                && d.group == vpg
                && d.sync.last.as_ref().is_some_and(|l| {
                    l.kind == bulwark::model::status::SyncKind::Initial && l.result == "completed"
                })
        })
    })
    .await;
    w.m.wait_vpg(&vpg, "Meeting SLA with vm-3", SLA_WAIT, &all, |v| {
        meeting_sla(v) && v["vm_count"] == 3
    })
    .await;
    wait_drained(&pa, &[&rec]).await;
    let tagged = w.m.tag(&vpg, "with-vm-3").await;
    let source3 = copy_export(&pa.nbd_url("vm-3"), &w.lab.path("vm-3.copy")).await;
    w.m.wait_recoverable(&vpg, tagged, &all).await;

    // Remove vm-1 and its recovery disk; remove vm-2 keeping it.
    let vm1 = w.m.vm("vm-1").await.unwrap();
    let vm2 = w.m.vm("vm-2").await.unwrap();
    w.m.ok(
        "DELETE",
        &format!(
            "/api/v1/vpgs/{vpg}/members/{}?keep_recovery_disks=false",
            vm1["id"].as_str().unwrap()
        ),
        None,
    )
    .await;
    w.m.ok(
        "DELETE",
        &format!("/api/v1/vpgs/{vpg}/members/{}", vm2["id"].as_str().unwrap()),
        None,
    )
    .await;
    let removed_at = Instant::now();
    let deadline = Instant::now() + SLA_WAIT;
    while replica(1).exists() {
        assert!(
            Instant::now() < deadline,
            "vm-1's recovery disk was never deleted\n--- manager:\n{}\n--- rec:\n{}",
            tail(&w.m.stderr(), 60),
            tail(&rec.stderr(), 60)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let events = w.m.events(&format!("?vpg_id={vpg}")).await;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "vpg.recovery_disk_deleted"),
        "deletion recorded: {events:#?}"
    );
    pa.wait_status("vm-1 and vm-2 unprotected", &[&rec], |s| {
        s.protected
            .iter()
            .filter(|d| d.name == "vm-1" || d.name == "vm-2")
            .all(|d| d.mode == bulwark::proto::agent::ReplicationMode::Unprotected)
    })
    .await;
    w.m.wait_vpg(
        &vpg,
        "Meeting SLA with vm-3 alone",
        Duration::from_secs(30),
        &all,
        |v| meeting_sla(v) && v["vm_count"] == 1,
    )
    .await;
    eprintln!(
        "Meeting SLA with vm-3 alone {:?} after the removal",
        removed_at.elapsed()
    );
    assert!(replica(2).is_dir(), "vm-2's recovery disk is kept");

    rec.stop_clean().await;
    let j = journal_of(&rec, "prot-a", 3, size);
    assert_same(
        "vm-3 at the tagged checkpoint",
        &view_bytes(&j, tagged as u64, 0, size as usize),
        &source3,
    );
}
