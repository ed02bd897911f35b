//! `bulwark agent` as real processes on loopback: a protected agent exporting disks over
//! NBD (driven by qemu-io / qemu-img) streams to a recovery agent; the journals are then
//! opened offline and their point-in-time views compared with copies of the source.
//! Also: connection cuts, kill -9 of either side, a full outbound buffer with the peer
//! away, TLS refusals, `--insecure`, and bad input.
//!
//! Corrupted frames on the wire are covered at the stream level by tests/stream_e2e.rs
//! (the proxy flips a byte; the CRC check refuses the frame) and are not repeated here.
#![allow(clippy::unwrap_used)]

mod agent_common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agent_common::*;
use bulwark::agent::dirty::DEFAULT_AL_CAPACITY;
use bulwark::proto::agent::{
    AgentStatus, CheckpointReport, CheckpointRequest, ReplicationMode, StartState, SyncPhase,
};

fn lab() -> Lab {
    Lab::new(&["prot2"])
}

impl Lab {
    /// Where the recovery agent keeps what `host` sends.
    fn storage(&self, host: &str) -> PathBuf {
        self.path("rec").join(format!("from-{host}"))
    }

    /// Starts the recovery agent on `port` (0: any) accepting `hosts`.
    async fn recovery(&self, sec: &Sec, port: u16, hosts: &[&str], args: &[&str]) -> AgentProc {
        let storages: Vec<(&str, PathBuf)> = hosts.iter().map(|h| (*h, self.storage(h))).collect();
        let allow: Vec<(&str, &Path)> = storages.iter().map(|(h, p)| (*h, p.as_path())).collect();
        let text = recovery_toml(
            &self.path("rec"),
            REC,
            format!("127.0.0.1:{port}").parse().unwrap(),
            sec,
            &allow,
        );
        let cfg = write_config(self.dir.path(), REC, &text);
        AgentProc::start(REC, &cfg, &self.path("rec"), args).await
    }

    /// Starts a protected agent `host` with `disks`, streaming to `peer`.
    async fn protected(
        &self,
        host: &str,
        sec: &Sec,
        disks: &[DiskDef],
        peer: Option<&PeerDef>,
        args: &[&str],
    ) -> AgentProc {
        let data = self.path(host);
        let text = protected_toml(&data, host, sec, disks, peer);
        let cfg = write_config(self.dir.path(), host, &text);
        AgentProc::start(host, &cfg, &data, args).await
    }
}

fn peer(address: std::net::SocketAddr, extra: &str) -> PeerDef {
    PeerDef {
        host: REC.into(),
        address,
        extra: extra.into(),
    }
}

fn disk_status<'a>(
    s: &'a AgentStatus,
    name: &str,
) -> &'a bulwark::proto::agent::ProtectedDiskStatus {
    s.protected
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("no disk {name} in {s:#?}"))
}

/// Every protected disk has all its records acknowledged (and numbered at least one).
fn converged(s: &AgentStatus) -> bool {
    s.protected
        .iter()
        .all(|d| d.last_seq > 0 && d.acked_seq == d.last_seq && d.queued_records == 0)
}

/// No disk owes or runs a sync.
fn synced(s: &AgentStatus) -> bool {
    s.protected
        .iter()
        .all(|d| !d.owes_sync && d.sync.phase == SyncPhase::Idle && d.sync.completed > 0)
}

/// Checkpoint on the group; every disk's marker must be queued.
async fn checkpoint(prot: &AgentProc, tag: &str) -> CheckpointReport {
    let r = prot
        .checkpoint(&CheckpointRequest {
            group: Some("vpg1".into()),
            tag: Some(tag.into()),
            id: None,
        })
        .await;
    assert!(r.disks.iter().all(|d| d.queued), "{r:?}");
    r
}

/// After the writes: checkpoint, copy every export (the source at that instant), wait
/// until everything is acknowledged and the recovery side holds it durably, stop both
/// agents cleanly, and check each journal's view at the checkpoint against the copy
/// (and the model, when there is one) and its record count.
async fn checkpoint_copy_and_verify(
    lab: &Lab,
    prot: &mut AgentProc,
    rec: &mut AgentProc,
    disks: &[DiskDef],
    models: &[&[u8]],
) {
    // Syncs (the Initial Sync of the new disks, one after a reconnect) have ended, so the
    // checkpoint is recoverable and nothing follows its marker.
    prot.wait_status("syncs ended", &[rec], synced).await;
    let report = checkpoint(prot, "after-load").await;
    // Completions are held for microseconds (DESIGN §4: low milliseconds at most).
    assert!(
        report.hold_us < 100_000,
        "checkpoint hold {} µs",
        report.hold_us
    );
    let mut copies = Vec::new();
    for d in disks {
        let out = lab.path(&format!("{}.copy.img", d.name));
        copies.push(copy_export(&prot.nbd_url(&d.name), &out).await);
    }
    let st = prot
        .wait_status("every record acknowledged", &[rec], converged)
        .await;
    for d in disks {
        let ds = disk_status(&st, &d.name);
        let marker = report.disks.iter().find(|c| c.name == d.name).unwrap();
        assert_eq!(
            ds.last_seq, marker.seq,
            "{}: nothing after the marker",
            d.name
        );
        assert_eq!(ds.mode, ReplicationMode::Streaming, "{}", d.name);
    }
    // The clearer runs every 250 ms behind the acknowledgements.
    let st = prot
        .wait_status("bitmaps cleared behind the acks", &[rec], |s| {
            s.protected.iter().all(|d| d.dirty_regions == 0)
        })
        .await;
    let last: Vec<u64> = disks
        .iter()
        .map(|d| disk_status(&st, &d.name).last_seq)
        .collect();
    rec.wait_status("durable at the recovery side", &[prot], |s| {
        disks.iter().zip(&last).all(|(d, &l)| {
            s.received
                .iter()
                .any(|r| r.host == PROT && r.disk_id == d.id && r.durable_seq == l)
        })
    })
    .await;
    prot.stop_clean().await;
    rec.stop_clean().await;
    for (i, d) in disks.iter().enumerate() {
        if let Some(m) = models.get(i) {
            assert_same(&format!("{}: source copy vs model", d.name), &copies[i], m);
        }
        verify_journal(
            &lab.storage(PROT),
            d.id,
            d.size,
            report.id,
            Some("after-load"),
            last[i],
            &copies[i],
        );
    }
}

/// Runs `cmds` on the export with qemu-io and asserts every command succeeded.
async fn qemu_ok(prot: &AgentProc, disk: &str, cache: &str, cmds: Vec<String>) {
    let o = qemu_io(&prot.nbd_url(disk), cache, &cmds, Duration::from_secs(60)).await;
    assert_qemu_ok(&o);
}

// -----------------------------------------------------------------------------------------

/// 1. Two disks of one group over mutual TLS: mixed qemu-io workloads on both, then a
///    checkpoint at a quiet point; the journal views equal copies of the sources.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_disks_over_mutual_tls_match_the_source_at_the_checkpoint() {
    let lab = lab();
    let mut rec = lab.recovery(&lab.tls(), 0, &[PROT], &[]).await;
    let disks = [
        DiskDef::new("vm1-d0", 11, 40 * MIB),
        DiskDef::new("vm1-d1", 12, 24 * MIB + 4096),
    ];
    let p = peer(rec.data_addr(), "compression = \"zstd\"");
    let mut prot = lab.protected(PROT, &lab.tls(), &disks, Some(&p), &[]).await;
    let mut w0 = Workload::new(1, disks[0].size);
    let mut w1 = Workload::new(2, disks[1].size);
    for (round, cache) in ["writethrough", "writeback", "writeback"]
        .into_iter()
        .enumerate()
    {
        let c0 = w0.commands(150 + round * 50, 0, disks[0].size);
        let c1 = w1.commands(150 + round * 50, 0, disks[1].size);
        tokio::join!(
            qemu_ok(&prot, "vm1-d0", cache, c0),
            qemu_ok(&prot, "vm1-d1", cache, c1)
        );
    }
    let st = prot.status().await;
    assert!(st.peers[0].connected, "{st:#?}");
    assert!(!prot.stderr().contains("insecure"), "{}", prot.stderr());
    checkpoint_copy_and_verify(&lab, &mut prot, &mut rec, &disks, &[&w0.model, &w1.model]).await;
}

/// Polls `cond` every 20 ms; panics after [`WAIT`] with the agents' stderr.
async fn wait_until(what: &str, agents: &[&AgentProc], cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        if Instant::now() >= deadline {
            let logs: Vec<String> = agents
                .iter()
                .map(|a| format!("--- {} stderr:\n{}", a.name, a.stderr()))
                .collect();
            panic!(
                "gave up waiting for {what} after {WAIT:?}\n{}",
                logs.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs qemu-io rounds on every disk (all disks at once, alternating cache modes) until
/// `stop` is set and at least `min_rounds` ran.
async fn load_until(
    prot: &AgentProc,
    disks: &[DiskDef],
    works: &mut [Workload],
    stop: &std::sync::atomic::AtomicBool,
    min_rounds: usize,
    per_round: usize,
) -> usize {
    let mut round = 0;
    while round < min_rounds || !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let cache = if round % 2 == 0 {
            "writeback"
        } else {
            "writethrough"
        };
        let runs = disks.iter().zip(works.iter_mut()).map(|(d, w)| {
            let cmds = w.commands(per_round, 0, d.size);
            qemu_ok(prot, &d.name, cache, cmds)
        });
        futures::future::join_all(runs).await;
        round += 1;
        assert!(round < 200, "the load never ended");
    }
    round
}

/// 2. The connection is cut three times while qemu-io writes to both disks: nothing is
///    lost or repeated (the journal holds exactly the numbered records), the view at a
///    later checkpoint equals the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cuts_mid_load_lose_and_repeat_nothing() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let lab = lab();
    let mut rec = lab.recovery(&lab.tls(), 0, &[PROT], &[]).await;
    let proxy = Proxy::start(rec.data_addr()).await;
    let disks = [
        DiskDef::new("vm2-d0", 21, 32 * MIB),
        DiskDef::new("vm2-d1", 22, 16 * MIB),
    ];
    let p = peer(proxy.addr, "compression = \"lz4\"");
    let mut prot = lab.protected(PROT, &lab.tls(), &disks, Some(&p), &[]).await;
    prot.wait_status("connected", &[&rec], |s| s.peers[0].connected)
        .await;
    let mut works = [
        Workload::new(21, disks[0].size),
        Workload::new(22, disks[1].size),
    ];
    let done = AtomicBool::new(false);
    let mut seen_acked = Vec::new();
    let conns = || proxy.connections.load(Ordering::SeqCst);
    let mut reconnect_times = Vec::new();
    let cutter = async {
        let mut cut_at: Option<Instant> = None;
        for k in 1..=3u64 {
            // Connection k is up (the first, or the one after cut k - 1).
            wait_until(&format!("proxy connection {k}"), &[&prot, &rec], || {
                conns() >= k
            })
            .await;
            if let Some(t) = cut_at {
                reconnect_times.push(t.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            // Cut it while it carries records.
            let s = prot
                .wait_status("connected, records numbered", &[&rec], |s| {
                    s.peers[0].connected && s.protected.iter().any(|d| d.last_seq > 0)
                })
                .await;
            seen_acked.push(s.protected.iter().map(|d| d.acked_seq).collect::<Vec<_>>());
            proxy.cut();
            cut_at = Some(Instant::now());
        }
        done.store(true, Ordering::SeqCst);
    };
    let (rounds, ()) = tokio::join!(load_until(&prot, &disks, &mut works, &done, 2, 120), cutter);
    wait_until("a connection after the last cut", &[&prot, &rec], || {
        conns() >= 4
    })
    .await;
    eprintln!("load rounds during the cuts: {rounds}; reconnects took {reconnect_times:?}");
    assert!(
        prot.stderr().contains("stream disconnected"),
        "no disconnect seen:\n{}",
        prot.stderr()
    );
    // Acknowledged sequence numbers never went back across the cuts.
    for w in seen_acked.windows(2) {
        assert!(
            w[0].iter().zip(&w[1]).all(|(a, b)| a <= b),
            "{seen_acked:?}"
        );
    }
    let models: Vec<&[u8]> = works.iter().map(|w| w.model.as_slice()).collect();
    checkpoint_copy_and_verify(&lab, &mut prot, &mut rec, &disks, &models).await;
}

/// 3. The recovery agent is killed with SIGKILL under load and restarted with the same
///    config: the stream resumes, everything converges, the checkpoint view equals the
///    source, every record is in the journal exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_agent_kill9_under_load_converges() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let lab = lab();
    let port = free_port();
    let mut rec = lab.recovery(&lab.tls(), port, &[PROT], &[]).await;
    let disks = [
        DiskDef::new("vm3-d0", 31, 32 * MIB),
        DiskDef::new("vm3-d1", 32, 20 * MIB),
    ];
    let p = peer(rec.data_addr(), "");
    let mut prot = lab.protected(PROT, &lab.tls(), &disks, Some(&p), &[]).await;
    let mut works = [
        Workload::new(31, disks[0].size),
        Workload::new(32, disks[1].size),
    ];
    let done = AtomicBool::new(false);
    let killer = async {
        prot.wait_status("records acknowledged", &[&rec], |s| {
            s.protected.iter().all(|d| d.acked_seq > 0)
        })
        .await;
        rec.kill9().await;
        tokio::time::sleep(Duration::from_millis(700)).await;
        let s = prot.status().await;
        assert!(!s.peers[0].connected, "{s:#?}");
        rec.spawn().await;
        prot.wait_status("reconnected", &[&rec], |s| s.peers[0].connected)
            .await;
        done.store(true, Ordering::SeqCst);
    };
    tokio::join!(load_until(&prot, &disks, &mut works, &done, 2, 120), killer);
    let models: Vec<&[u8]> = works.iter().map(|w| w.model.as_slice()).collect();
    checkpoint_copy_and_verify(&lab, &mut prot, &mut rec, &disks, &models).await;
}

/// 4. A small outbound buffer, no spill, the recovery agent not there: writes never
///    block, the disk goes bitmap-only, and the bitmap persisted at the clean stop marks
///    every region written meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffer_with_peer_away_goes_bitmap_only_without_blocking() {
    let lab = lab();
    let nobody = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let disks = [DiskDef::new("vm4-d0", 41, 32 * MIB)];
    let p = peer(nobody, "queue_memory = \"256 KiB\"\nspill_limit = 0");
    let mut prot = lab.protected(PROT, &lab.tls(), &disks, Some(&p), &[]).await;
    let mut w = Workload::new(41, disks[0].size);
    for cache in ["writethrough", "writeback", "writethrough"] {
        let cmds = w.commands(80, 0, disks[0].size);
        let t = Instant::now();
        let o = qemu_io(
            &prot.nbd_url("vm4-d0"),
            cache,
            &cmds,
            Duration::from_secs(20),
        )
        .await;
        assert_qemu_ok(&o);
        // 80-odd commands of up to 1 MiB on a local file: seconds at most, unless a
        // write waits for the absent peer.
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "writes took {:?}",
            t.elapsed()
        );
    }
    let st = prot
        .wait_status("bitmap-only", &[], |s| {
            s.protected[0].mode == ReplicationMode::BitmapOnly
        })
        .await;
    let d = &st.protected[0];
    assert!(!st.peers[0].connected, "{st:#?}");
    assert_eq!(d.acked_seq, 0, "{d:#?}");
    assert_eq!(d.queued_records, 0, "bitmap-only drops the queue: {d:#?}");
    let expect = regions_of(&w.written, d.region_size);
    assert!(
        d.dirty_regions >= expect.len() as u64,
        "{} regions written, {} dirty",
        expect.len(),
        d.dirty_regions
    );
    let region_size = d.region_size;
    prot.stop_clean().await;
    let (bm, clean) =
        load_bitmap(&lab.path(PROT).join("dirty").join("vm4-d0.dirty")).expect("bitmap persisted");
    assert!(clean, "the clean stop marks the bitmap clean");
    assert_eq!(bm.region_size(), region_size);
    let missing: Vec<u64> = expect
        .iter()
        .copied()
        .filter(|&r| !bm.is_dirty(r))
        .collect();
    assert!(
        missing.is_empty(),
        "regions written while away but clean in the bitmap: {missing:?}"
    );
}

/// 5. The protected agent is killed with SIGKILL while qemu-io writes to both disks (one
///    a 2 GiB sparse disk written in two small areas) and streams to a running recovery
///    agent. The restart finds an unclean stop, a bounded activity log and a new epoch;
///    and, offline, the crash invariant holds exactly: every region where the local disk
///    differs from what the recovery journal holds is dirty in the persisted bitmap or
///    inside an activity-log extent. (Regions already acknowledged and cleared, in extents
///    that went idle, may legitimately be in neither.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_agent_kill9_restarts_unclean_with_bounded_activity_log() {
    let lab = lab();
    let mut rec = lab.recovery(&lab.tls(), free_port(), &[PROT], &[]).await;
    let disks = [
        DiskDef::new("vm5-big", 51, 2048 * MIB),
        DiskDef::new("vm5-small", 52, 16 * MIB),
    ];
    // A bandwidth limit keeps the stream behind the writes, so the kill leaves regions
    // the replica does not have yet.
    let p = peer(rec.data_addr(), "bandwidth_limit = \"4 MiB\"");
    let mut prot = lab.protected(PROT, &lab.tls(), &disks, Some(&p), &[]).await;
    let before = prot.status().await;
    let region = before.protected[0].region_size;
    let extent = bulwark::agent::dirty::DEFAULT_EXTENT_SIZE;
    // The big disk is written in two small areas only: 12 MiB at 64 MiB and 4 MiB at
    // 1 GiB (3 + 1 extents of 4 MiB out of 512).
    let areas: [&[(u64, u64)]; 2] = [
        &[(64 * MIB, 12 * MIB), (1024 * MIB, 4 * MIB)],
        &[(0, 16 * MIB)],
    ];
    let mut works = [Workload::without_model(51), Workload::without_model(52)];
    // A first round, complete: streamed, acknowledged, cleared behind the acks.
    for (i, d) in disks.iter().enumerate() {
        let mut cmds = Vec::new();
        for &(base, span) in areas[i] {
            cmds.extend(works[i].commands(8, base, span));
        }
        qemu_ok(&prot, &d.name, "writeback", cmds).await;
    }
    prot.wait_status("first round acknowledged", &[&rec], converged)
        .await;
    // Then qemu-io batches in the background (areas interleaved, so every extent stays
    // hot) until one fails, and SIGKILL in the middle.
    let mut runs = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let url = prot.nbd_url(&d.name);
        let mut w = std::mem::replace(&mut works[i], Workload::without_model(0));
        let area = areas[i];
        runs.push(tokio::spawn(async move {
            let mut completed = 0;
            for _ in 0..500 {
                let mut cmds = Vec::new();
                while cmds.len() < 400 {
                    for &(base, span) in area {
                        cmds.extend(w.commands(4, base, span));
                    }
                }
                let o = qemu_io(&url, "writeback", &cmds, Duration::from_secs(30)).await;
                completed += completed_ranges(&String::from_utf8_lossy(&o.stdout)).len();
                let t = text(&o);
                if t.contains("failed") || t.contains("error") || !o.status.success() {
                    return (completed, t);
                }
            }
            panic!("qemu-io never saw the agent die");
        }));
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mid = prot.status().await;
    prot.kill9().await;
    for r in runs {
        let (completed, t) = r.await.unwrap();
        assert!(completed > 0, "no write completed before the kill:\n{t}");
    }
    eprintln!(
        "at the kill: {:?}",
        mid.protected
            .iter()
            .map(|d| (
                d.name.as_str(),
                seq_counter(d.last_seq),
                seq_counter(d.acked_seq)
            ))
            .collect::<Vec<_>>()
    );
    // What the crash left, copied before the restart touches it.
    let dirty = lab.path(PROT).join("dirty");
    let saved = lab.path("dirty-after-kill");
    std::fs::create_dir_all(&saved).unwrap();
    for e in std::fs::read_dir(&dirty).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), saved.join(e.file_name())).unwrap();
    }
    // What the recovery side holds: stop it, add a marker at the head of each journal
    // offline and read the view there.
    rec.stop_clean().await;
    let mut touched_extents = Vec::new();
    let mut differing = Vec::new();
    let mut covers = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        let (cover, al_n) = crash_coverage(&saved, &d.name, region);
        let (j, head) = journal_head(&lab.storage(PROT), d.id, d.size);
        let view = j.open_view(head).unwrap();
        let img = std::fs::File::open(lab.path(PROT).join("disks").join(format!("{}.img", d.name)))
            .unwrap();
        let mut diff = std::collections::BTreeSet::new();
        for &(base, span) in areas[i] {
            let mut local = vec![0u8; span as usize];
            std::os::unix::fs::FileExt::read_exact_at(&img, &mut local, base).unwrap();
            let mut replica = vec![0u8; span as usize];
            view.read_at(&mut replica, base).unwrap();
            for (k, (a, b)) in local
                .chunks(region as usize)
                .zip(replica.chunks(region as usize))
                .enumerate()
            {
                if a != b {
                    diff.insert(base / region + k as u64);
                }
            }
        }
        let missing: Vec<u64> = diff.difference(&cover).copied().collect();
        assert!(
            missing.is_empty(),
            "{}: regions differing from the replica but in neither bitmap nor activity log: {missing:?} ({} differ, {} covered)",
            d.name,
            diff.len(),
            cover.len()
        );
        let ext: usize = areas[i]
            .iter()
            .map(|&(_, span)| span.div_ceil(extent) as usize)
            .sum();
        assert!(
            (1..=ext).contains(&al_n),
            "{}: {al_n} activity-log extents, {ext} touched",
            d.name
        );
        eprintln!(
            "{}: {} regions differ from the replica at the kill, {} covered by bitmap ∪ AL ({al_n} extents)",
            d.name,
            diff.len(),
            cover.len()
        );
        touched_extents.push(ext);
        differing.push(diff);
        covers.push(cover);
    }

    // Both back: the restart is unclean, so a Delta Sync compares what the bitmap and the
    // activity log cover — not the 2 GiB disk — and sends only what differs.
    rec.spawn().await;
    prot.spawn().await;
    let st = prot.status().await;
    for (i, d) in disks.iter().enumerate() {
        let s = disk_status(&st, &d.name);
        let b = disk_status(&before, &d.name);
        assert_eq!(s.start_state, StartState::Unclean, "{s:#?}");
        assert!(
            s.start_al_extents > 0
                && s.start_al_extents <= DEFAULT_AL_CAPACITY as u64
                && s.start_al_extents <= touched_extents[i] as u64,
            "{}: {} activity-log extents after the crash, {} extents touched: {s:#?}",
            d.name,
            s.start_al_extents,
            touched_extents[i]
        );
        assert_eq!(s.epoch, b.epoch + 1, "{s:#?}");
    }
    assert!(
        differing.iter().any(|d| !d.is_empty()),
        "the kill left nothing unreplicated: the coverage check proved nothing"
    );
    let st = prot
        .wait_status("the recovery syncs", &[&rec], synced)
        .await;
    let big = disk_status(&st, "vm5-big");
    assert_eq!(big.size_bytes / extent, 512);
    for (i, d) in disks.iter().enumerate() {
        let s = disk_status(&st, &d.name);
        let last = s.sync.last.clone().unwrap();
        assert_eq!(
            last.kind,
            bulwark::model::status::SyncKind::Delta,
            "{last:?}"
        );
        // The pass compares whole 1 MiB chunks of the covered regions.
        let chunks: std::collections::BTreeSet<u64> =
            covers[i].iter().map(|r| r * region / MIB).collect();
        let compared = last.blocks_compared * 4096;
        assert!(
            compared <= chunks.len() as u64 * MIB,
            "{}: compared {compared} bytes, {} chunks covered",
            d.name,
            chunks.len()
        );
        assert!(last.blocks_sent * 4096 <= compared, "{}: {last:?}", d.name);
        eprintln!(
            "{}: recovery check after kill -9 read {compared} of {} bytes ({:.4} of the disk), sent {} blocks",
            d.name,
            d.size,
            compared as f64 / d.size as f64,
            last.blocks_sent
        );
    }
    // Nothing is owed any more: a clean stop leaves empty bitmaps.
    prot.stop_clean().await;
    rec.stop_clean().await;
    for d in &disks {
        let (bm, clean) = load_bitmap(&dirty.join(format!("{}.dirty", d.name))).unwrap();
        assert!(clean, "{}", d.name);
        assert_eq!(bm.dirty_count(), 0, "{}", d.name);
    }
}

/// 6. TLS at process level: a protected host whose certificate comes from another CA,
///    and one with a valid certificate that is not on the allow-list, are both refused;
///    the recovery agent receives nothing from either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_certificate_and_unlisted_host_are_refused() {
    let lab = lab();
    let foreign = lab.path("foreign-ca");
    bulwark::agent::tls::lab_certs(&foreign, &[PROT.into(), "prot3".into()]).unwrap();
    // Only prot1 is allowed; prot1 shows up with a certificate of the foreign CA.
    let mut rec = lab.recovery(&lab.tls(), 0, &[PROT], &[]).await;
    // Away for a second: bitmap-only, the queue dropped (a clean stop does not wait
    // for a drain that cannot happen).
    let p = peer(rec.data_addr(), "away_bound_secs = 1");
    let foreign_sec = Sec::Files {
        ca: lab.path("certs").join("ca.pem"),
        cert: foreign.join(format!("{PROT}.pem")),
        key: foreign.join(format!("{PROT}.key")),
    };
    let mut p1 = lab
        .protected(
            PROT,
            &foreign_sec,
            &[DiskDef::new("vm6-a", 61, 8 * MIB)],
            Some(&p),
            &[],
        )
        .await;
    // prot2 has a certificate of the right CA but is not on the allow-list.
    let mut p2 = lab
        .protected(
            "prot2",
            &lab.tls(),
            &[DiskDef::new("vm6-b", 62, 8 * MIB)],
            Some(&p),
            &[],
        )
        .await;
    // prot3 lives entirely in the foreign PKI: it does not trust the recovery agent
    // either (the refusal happens at its end of the handshake).
    let mut p3 = lab
        .protected(
            "prot3",
            &Sec::Dir(foreign.clone()),
            &[DiskDef::new("vm6-c", 63, 8 * MIB)],
            Some(&p),
            &[],
        )
        .await;
    for (a, disk) in [(&p1, "vm6-a"), (&p2, "vm6-b"), (&p3, "vm6-c")] {
        let mut w = Workload::without_model(6);
        qemu_ok(a, disk, "writeback", w.commands(20, 0, 8 * MIB)).await;
    }
    let s1 = p1
        .wait_status("an error from the stream", &[&rec], |s| {
            !s.peers[0].connected && s.peers[0].last_error.is_some()
        })
        .await;
    let s2 = p2
        .wait_status("refused", &[&rec], |s| {
            !s.peers[0].connected
                && s.peers[0]
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("refused"))
        })
        .await;
    let s3 = p3
        .wait_status("an error from the stream", &[&rec], |s| {
            !s.peers[0].connected && s.peers[0].last_error.is_some()
        })
        .await;
    // The recovery agent rejects prot1's certificate: prot1 sees the TLS alert.
    let e1 = s1.peers[0].last_error.clone().unwrap();
    assert!(e1.contains("alert"), "{e1}");
    // prot3 rejects the recovery agent's certificate itself.
    let e3 = s3.peers[0].last_error.clone().unwrap();
    assert!(e3.contains("invalid peer certificate"), "{e3}");
    let e2 = s2.peers[0].last_error.clone().unwrap();
    assert!(e2.contains("allow-list"), "{e2}");
    // They retry, stay refused, and go bitmap-only past the away bound.
    for a in [&p1, &p2, &p3] {
        let s = a
            .wait_status("bitmap-only", &[&rec], |s| {
                s.protected[0].mode == ReplicationMode::BitmapOnly
            })
            .await;
        assert!(!s.peers[0].connected, "{s:#?}");
        assert!(s.peers[0].last_error.is_some(), "{s:#?}");
        assert_eq!(s.protected[0].acked_seq, 0, "{s:#?}");
        assert!(s.protected[0].last_seq > 0, "{s:#?}");
    }
    let r = rec.status().await;
    assert!(r.received.is_empty(), "{r:#?}");
    let st = lab.storage(PROT);
    let entries: Vec<_> = std::fs::read_dir(&st)
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(entries.is_empty(), "storage of {PROT}: {entries:?}");
    assert!(!lab.storage("prot2").exists());
    assert!(!lab.storage("prot3").exists());
    let log = rec.stderr();
    assert!(
        log.contains("invalid peer certificate"),
        "the recovery agent logs the rejected certificate:\n{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains("refused") && l.contains("prot2")),
        "the refusal names the host:\n{log}"
    );
    tokio::join!(p1.stop_clean(), p2.stop_clean(), p3.stop_clean());
    rec.stop_clean().await;
}

/// 7. `--insecure` on both sides: plain TCP works end to end, and both agents warn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_flag_works_and_warns() {
    let lab = lab();
    let mut rec = lab.recovery(&Sec::Flag, 0, &[PROT], &["--insecure"]).await;
    let disks = [DiskDef::new("vm7-d0", 71, 16 * MIB)];
    let p = peer(rec.data_addr(), "");
    let mut prot = lab
        .protected(PROT, &Sec::Flag, &disks, Some(&p), &["--insecure"])
        .await;
    let mut w = Workload::new(71, disks[0].size);
    qemu_ok(
        &prot,
        "vm7-d0",
        "writeback",
        w.commands(100, 0, disks[0].size),
    )
    .await;
    for a in [&prot, &rec] {
        let log = a.stderr();
        assert!(
            log.lines()
                .any(|l| l.contains("WARN") && l.contains("insecure")),
            "{} does not warn about --insecure:\n{log}",
            a.name
        );
    }
    checkpoint_copy_and_verify(&lab, &mut prot, &mut rec, &disks, &[&w.model]).await;
}

/// 8. Bad input: a disk size that is not a multiple of 512, and an existing image whose
///    size differs from the configuration: the agent exits non-zero with a clear message
///    and leaves the image alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_disk_sizes_are_refused_and_images_left_alone() {
    let lab = lab();
    // Not a multiple of 512.
    let data = lab.path("odd");
    let text = protected_toml(
        &data,
        PROT,
        &lab.tls(),
        &[DiskDef::new("vm8-odd", 81, 1000)],
        None,
    );
    let cfg = write_config(lab.dir.path(), "odd", &text);
    let (st, log) = run_agent_to_exit(&cfg, &lab.path("odd.stderr.log")).await;
    assert!(!st.success(), "{st}\n{log}");
    assert!(
        log.contains("disks[0].size") && log.contains("multiple of 512"),
        "{log}"
    );
    assert!(!data.join("disks").join("vm8-odd.img").exists());

    // An existing image of 1 MiB, configured as 2 MiB.
    let data = lab.path("resized");
    let img = data.join("disks").join("vm8-d0.img");
    std::fs::create_dir_all(img.parent().unwrap()).unwrap();
    let mut content = vec![0u8; MIB as usize];
    for (i, b) in content.iter_mut().enumerate() {
        *b = (i * 7 % 251) as u8;
    }
    std::fs::write(&img, &content).unwrap();
    let mtime = std::fs::metadata(&img).unwrap().modified().unwrap();
    let text = protected_toml(
        &data,
        PROT,
        &lab.tls(),
        &[DiskDef::new("vm8-d0", 82, 2 * MIB)],
        None,
    );
    let cfg = write_config(lab.dir.path(), "resized", &text);
    let (st, log) = run_agent_to_exit(&cfg, &lab.path("resized.stderr.log")).await;
    assert!(!st.success(), "{st}\n{log}");
    assert!(
        log.contains("vm8-d0") && log.contains("1048576") && log.contains("2097152"),
        "{log}"
    );
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), MIB, "image resized");
    assert_eq!(meta.modified().unwrap(), mtime, "image touched");
    assert!(
        std::fs::read(&img).unwrap() == content,
        "image content changed"
    );
}

/// 9. The recovery host loses its journal (storage wiped while it was down): on
///    reconnect it holds less than it acknowledged, so the protected side learns the
///    replica is behind, and — the recovery side now having no replica at all — an
///    Initial Sync rebuilds it while writes go on; the view at a later checkpoint is the
///    source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_recovery_journal_is_rebuilt_by_a_sync() {
    let lab = lab();
    let port = free_port();
    let mut rec = lab.recovery(&lab.tls(), port, &[PROT], &[]).await;
    let disks = [DiskDef::new("vm9-d0", 91, 16 * MIB)];
    let p = peer(rec.data_addr(), "");
    let mut prot = lab.protected(PROT, &lab.tls(), &disks, Some(&p), &[]).await;
    let mut w = Workload::new(91, disks[0].size);
    qemu_ok(
        &prot,
        "vm9-d0",
        "writeback",
        w.commands(30, 0, disks[0].size),
    )
    .await;
    let st = prot
        .wait_status("everything acknowledged and synced", &[&rec], |s| {
            converged(s) && synced(s)
        })
        .await;
    assert!(!st.protected[0].replica_behind, "{st:#?}");
    rec.stop_clean().await;
    std::fs::remove_dir_all(lab.storage(PROT)).unwrap();
    rec.spawn().await;
    qemu_ok(
        &prot,
        "vm9-d0",
        "writeback",
        w.commands(10, 0, disks[0].size),
    )
    .await;
    let st = prot
        .wait_status("the replica rebuilt", &[&rec], |s| {
            synced(s) && s.protected[0].sync.completed >= 2
        })
        .await;
    let last = st.protected[0].sync.last.clone().unwrap();
    assert_eq!(
        last.kind,
        bulwark::model::status::SyncKind::Initial,
        "{last:?}"
    );
    assert!(last.data_bytes > 0, "{last:?}");
    let report = checkpoint(&prot, "after-rebuild").await;
    let copy = copy_export(&prot.nbd_url("vm9-d0"), &lab.path("vm9.copy.img")).await;
    assert_same("source vs model", &copy, &w.model);
    let st = prot
        .wait_status("everything acknowledged", &[&rec], converged)
        .await;
    let last_seq = st.protected[0].last_seq;
    rec.wait_status("durable at the recovery side", &[&prot], |s| {
        s.received
            .iter()
            .any(|r| r.disk_id == 91 && r.durable_seq >= last_seq)
    })
    .await;
    prot.stop_clean().await;
    rec.stop_clean().await;
    let j = open_journal(&lab.storage(PROT), 91, disks[0].size);
    let got = read_view(&j, report.id, disks[0].size);
    assert_same("view after the rebuild vs source", &got, &copy);
}
