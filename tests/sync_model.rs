//! Property test of syncs between two real agents (in one process, loopback): a random
//! protected disk, and a recovery side that has no replica (Initial Sync) or a pre-seeded
//! one that diverges at random — changed blocks, zeroed runs — (Delta
//! Sync), sometimes followed by an operator's Full Sync. After each, the journal's view
//! at a checkpoint equals the disk byte for byte, an Initial sends no more blocks than are
//! non-zero, and a Delta sends exactly the blocks that differ.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use bulwark::agent::host::{Agent, AgentConfig};
use bulwark::agent::journal::{Journal, JournalConfig};
use bulwark::model::status::SyncKind;
use bulwark::proto::agent::{CheckpointRequest, SyncAction, SyncOutcome};
use proptest::prelude::*;

const BLOCK: usize = 4096;
const SIZE: usize = 4 << 20;

fn config(dir: &Path, host: &str, text: &str) -> AgentConfig {
    AgentConfig::loopback(dir, host, text, None).unwrap()
}

async fn synced(agent: &Agent, n: u64) -> SyncOutcome {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = agent.status();
        let d = &st.protected[0];
        if d.sync.completed >= n && !d.owes_sync {
            return d.sync.last.clone().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "sync #{n} not done: {:#?}",
            d.sync
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Checkpoint, everything acknowledged; returns the checkpoint id.
async fn checkpoint(agent: &Agent) -> u64 {
    let r = agent.checkpoint(&CheckpointRequest::default()).unwrap();
    let seq = r.disks[0].seq;
    let deadline = Instant::now() + Duration::from_secs(30);
    while agent.status().protected[0].acked_seq < seq {
        assert!(Instant::now() < deadline, "checkpoint not acknowledged");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r.id
}

fn view(storage: &Path, ckpt: u64) -> Vec<u8> {
    let dir = storage.join(format!("disk-{:016x}", 1));
    let j = Journal::open(
        dir.join("journal"),
        dir.join("replica.img"),
        JournalConfig::new(1, SIZE as u64),
    )
    .unwrap();
    let v = j.open_view(ckpt).unwrap();
    let mut buf = vec![0u8; SIZE];
    v.read_at(&mut buf, 0).unwrap();
    buf
}

fn blocks_differing(a: &[u8], b: &[u8]) -> u64 {
    a.chunks(BLOCK)
        .zip(b.chunks(BLOCK))
        .filter(|(x, y)| x != y)
        .count() as u64
}

#[derive(Debug, Clone)]
enum Change {
    /// Overwrite one block with a byte.
    Block(usize, u8),
    /// Zero a run of blocks (a trim on one side).
    Zero(usize, usize),
}

fn disk() -> impl Strategy<Value = Vec<u8>> {
    // Runs of blocks: zero, one repeated byte, or pseudo-random bytes.
    prop::collection::vec((0u8..3, 1usize..64, any::<u8>()), 1..40).prop_map(|runs| {
        let mut d = Vec::with_capacity(SIZE);
        let mut x = 0x9e37_79b9_u32;
        'fill: for (kind, blocks, b) in runs.into_iter().cycle() {
            for _ in 0..blocks * BLOCK {
                if d.len() == SIZE {
                    break 'fill;
                }
                d.push(match kind {
                    0 => 0,
                    1 => b,
                    _ => {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    }
                });
            }
        }
        d
    })
}

fn changes() -> impl Strategy<Value = Vec<Change>> {
    let nb = SIZE / BLOCK;
    prop::collection::vec(
        prop_oneof![
            4 => (0..nb, 1u8..).prop_map(|(i, b)| Change::Block(i, b)),
            1 => (0..nb, 1usize..32).prop_map(|(i, n)| Change::Zero(i, n)),
        ],
        0..24,
    )
}

async fn run_case(
    content: Vec<u8>,
    seed: Option<Vec<Change>>,
    full: bool,
) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    std::fs::write(&image, &content).unwrap();
    let storage = dir.path().join("storage");
    let mut replica = None;
    if let Some(changes) = &seed {
        let mut r = content.clone();
        for c in changes {
            match *c {
                Change::Block(i, b) => r[i * BLOCK..(i + 1) * BLOCK].fill(b),
                Change::Zero(i, n) => {
                    let end = ((i + n) * BLOCK).min(SIZE);
                    r[i * BLOCK..end].fill(0);
                }
            }
        }
        let p = dir.path().join("seed.img");
        std::fs::write(&p, &r).unwrap();
        bulwark::agent::stream::preseed(&storage, 1, &p, SIZE as u64).unwrap();
        replica = Some(r);
    }
    let rec = Agent::start(config(
        dir.path(),
        "rec",
        &format!(
            "data_listen = '127.0.0.1:0'\n[[allow]]\nhost_name = 'prot'\nstorage = '{}'\n",
            storage.display()
        ),
    ))
    .await
    .unwrap();
    let data = rec.endpoints().data.unwrap();
    let prot = Agent::start(config(
        dir.path(),
        "prot",
        &format!(
            "sync_chunk_size = '64 KiB'\n[[disks]]\nname = 'd'\nid = 1\nsize = {SIZE}\npath = '{}'\n\
             recovery_host = 'rec'\n[[peers]]\nhost_name = 'rec'\naddress = '{data}'\n",
            image.display()
        ),
    ))
    .await
    .unwrap();
    let first = synced(&prot, 1).await;
    match &replica {
        None => {
            prop_assert_eq!(first.kind, SyncKind::Initial);
            let nonzero = content
                .chunks(BLOCK)
                .filter(|b| b.iter().any(|&x| x != 0))
                .count() as u64;
            prop_assert!(
                first.blocks_sent <= nonzero,
                "Initial sent {} blocks, {} are non-zero",
                first.blocks_sent,
                nonzero
            );
        }
        Some(r) => {
            prop_assert_eq!(first.kind, SyncKind::Delta);
            prop_assert_eq!(first.blocks_sent, blocks_differing(&content, r));
        }
    }
    let mut ckpts = vec![checkpoint(&prot).await];
    if full {
        prot.request_sync("d", SyncAction::Full).unwrap();
        let o = synced(&prot, 2).await;
        prop_assert_eq!(o.kind, SyncKind::Full);
        // Every block, unless an attempt was cut short under load: the pass resumes at
        // its cursor and the outcome counts only the last attempt (the views below are
        // what must hold either way).
        prop_assert!(o.blocks_sent > 0 && o.blocks_sent as usize <= SIZE / BLOCK);
        ckpts.push(checkpoint(&prot).await);
    }
    prot.shutdown().await.unwrap();
    rec.shutdown().await.unwrap();
    drop((prot, rec));
    for c in ckpts {
        let got = view(&storage, c);
        prop_assert!(
            got == content,
            "view at checkpoint {c} differs from the disk"
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn every_sync_kind_makes_the_replica_equal(
        content in disk(),
        seed in proptest::option::of(changes()),
        full in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(run_case(content, seed, full))?;
    }
}
