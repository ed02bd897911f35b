//! The resync policy of a disk, judged by an injected clock: a sync the policy governs
//! (here a Delta after the dirty tracking was lost) waits as "Resynchronization required"
//! outside the off-peak window or until an operator resumes it; Initial Syncs do not
//! wait. Two agents in one process, on loopback.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bulwark::agent::host::sync::Clock;
use bulwark::agent::host::{Agent, AgentConfig};
use bulwark::model::status::SyncKind;
use bulwark::proto::agent::{AgentStatus, ProtectedDiskStatus, SyncAction, SyncPhase};

struct FixedClock(AtomicU16);

impl Clock for FixedClock {
    fn minute_of_day(&self) -> u16 {
        self.0.load(Ordering::SeqCst)
    }
}

fn config(dir: &Path, host: &str, text: &str) -> AgentConfig {
    AgentConfig::loopback(dir, host, text, None).unwrap()
}

fn disk<'a>(s: &'a AgentStatus, name: &str) -> &'a ProtectedDiskStatus {
    s.protected.iter().find(|d| d.name == name).unwrap()
}

async fn wait(agent: &Agent, what: &str, pred: impl Fn(&AgentStatus) -> bool) -> AgentStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = agent.status();
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_and_manual_policies_hold_a_resync_until_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let rec = Agent::start(config(
        dir.path(),
        "rec",
        &format!(
            "data_listen = '127.0.0.1:0'\n[[allow]]\nhost_name = 'prot'\nstorage = '{}'\n",
            dir.path().join("storage").display()
        ),
    ))
    .await
    .unwrap();
    let data = rec.endpoints().data.unwrap();
    let prot_text = format!(
        "[[disks]]\nname = 'win'\nid = 1\nsize = '4 MiB'\nrecovery_host = 'rec'\n\
         resync = {{ mode = 'window', start = '22:00', end = '06:00' }}\n\
         [[disks]]\nname = 'man'\nid = 2\nsize = '4 MiB'\nrecovery_host = 'rec'\n\
         resync = {{ mode = 'manual' }}\n\
         [[peers]]\nhost_name = 'rec'\naddress = '{data}'\n"
    );
    // Noon: outside the window.
    let clock = Arc::new(FixedClock(AtomicU16::new(12 * 60)));
    let prot = Agent::start_with_clock(config(dir.path(), "prot", &prot_text), clock.clone())
        .await
        .unwrap();
    // Initial Syncs are not governed by the policy.
    let st = wait(&prot, "initial syncs", |s| {
        s.protected
            .iter()
            .all(|d| d.sync.completed == 1 && d.sync.phase == SyncPhase::Idle)
    })
    .await;
    for d in &st.protected {
        assert_eq!(d.sync.last.as_ref().unwrap().kind, SyncKind::Initial);
    }
    prot.shutdown().await.unwrap();
    drop(prot);
    // The dirty tracking is lost: nothing says what differs, a whole-disk Delta is due.
    for name in ["win", "man"] {
        std::fs::write(
            dir.path().join("prot/dirty").join(format!("{name}.dirty")),
            b"garbage",
        )
        .unwrap();
    }
    let prot = Agent::start_with_clock(config(dir.path(), "prot", &prot_text), clock.clone())
        .await
        .unwrap();
    let st = wait(&prot, "both held", |s| {
        s.protected
            .iter()
            .all(|d| d.sync.phase == SyncPhase::Required)
    })
    .await;
    let win = disk(&st, "win").sync.detail.clone().unwrap();
    assert!(win.contains("window opens in 600 min"), "{win}");
    let man = disk(&st, "man").sync.detail.clone().unwrap();
    assert!(man.contains("operator"), "{man}");
    assert!(st
        .protected
        .iter()
        .all(|d| d.owes_sync && d.sync.completed == 0));
    // 22:30: the window is open; the manual disk still waits.
    clock.0.store(22 * 60 + 30, Ordering::SeqCst);
    prot.recheck_syncs();
    let st = wait(&prot, "the window's sync", |s| {
        disk(s, "win").sync.completed == 1
    })
    .await;
    let last = disk(&st, "win").sync.last.clone().unwrap();
    assert_eq!(last.kind, SyncKind::Delta);
    assert_eq!(last.blocks_sent, 0, "the replica was level: {last:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = prot.status();
    assert_eq!(disk(&st, "man").sync.phase, SyncPhase::Required);
    assert_eq!(disk(&st, "man").sync.completed, 0);
    // The operator resumes it.
    prot.request_sync("man", SyncAction::Resume).unwrap();
    let st = wait(&prot, "the resumed sync", |s| {
        disk(s, "man").sync.completed == 1 && !disk(s, "man").owes_sync
    })
    .await;
    assert_eq!(
        disk(&st, "man").sync.last.as_ref().unwrap().kind,
        SyncKind::Delta
    );
    assert!(prot.request_sync("nope", SyncAction::Resume).is_err());
    prot.shutdown().await.unwrap();
    rec.shutdown().await.unwrap();
}
