//! The recovery side of sync sessions over loopback: a real `Receiver`, a hand-written
//! client speaking `Frame::Sync`, and a hand-written stream client feeding the journal.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulwark::agent::stream::{
    preseed, FrameReader, FrameWriter, Receiver, ReceiverConfig, ReceiverHandle, ServerTransport,
    SyncState, SYNC_STATE_FILE,
};
use bulwark::agent::sync::{HashConfig, Hasher};
use bulwark::model::status::SyncKind;
use bulwark::proto::stream::{
    sync_kind_byte, ChunkHash, Compression, DiskHello, Frame, RecordBody, ReplicaState,
    StreamRecord, SyncFrame, PROTOCOL_VERSION,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const HOST: &str = "pro";
const SIZE: u64 = 256 << 10;
const HASH: HashConfig = HashConfig {
    block_size: 4096,
    chunk_blocks: 8,
};

struct Running {
    addr: SocketAddr,
    handle: ReceiverHandle,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn start(storage: &Path) -> Running {
        let mut cfg =
            ReceiverConfig::new("127.0.0.1:0".parse().unwrap(), ServerTransport::Insecure);
        cfg.allow.insert(HOST.to_string(), storage.to_path_buf());
        cfg.segment_size = 1 << 20;
        let rx = Receiver::bind(cfg).await.unwrap();
        let addr = rx.local_addr().unwrap();
        let handle = rx.handle();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move { rx.run(c).await.unwrap() });
        Running {
            addr,
            handle,
            cancel,
            task,
        }
    }

    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.unwrap();
    }
}

struct Client {
    rd: FrameReader<OwnedReadHalf>,
    wr: FrameWriter<OwnedWriteHalf>,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let (r, w) = TcpStream::connect(addr).await.unwrap().into_split();
        Client {
            rd: FrameReader::new(r),
            wr: FrameWriter::new(w, Compression::None),
        }
    }

    async fn ask(&mut self, f: SyncFrame) -> Frame {
        self.wr.send(&Frame::Sync(f)).await.unwrap();
        self.next().await
    }

    async fn next(&mut self) -> Frame {
        tokio::time::timeout(Duration::from_secs(20), self.rd.read_frame())
            .await
            .unwrap()
            .unwrap()
            .unwrap()
    }

    /// A sync session's Hello and its answer.
    async fn session(addr: SocketAddr, host: &str, disk: u64, size: u64) -> (Client, Frame) {
        let mut c = Client::connect(addr).await;
        let hello = SyncFrame::Hello {
            host_name: host.to_string(),
            disk_id: disk,
            size,
            vpg_id: String::new(),
            fencing_generation: 0,
        };
        let first = c.ask(hello).await;
        (c, first)
    }
}

fn info(f: &Frame) -> (u64, ReplicaState, u64, Option<u8>) {
    match f {
        Frame::Sync(SyncFrame::Info {
            size,
            replica,
            durable_seq,
            running,
            ..
        }) => (*size, *replica, *durable_seq, *running),
        other => panic!("expected Info, got {other:?}"),
    }
}

fn refused(f: &Frame) -> &str {
    match f {
        Frame::Refused { reason } => reason,
        other => panic!("expected Refused, got {other:?}"),
    }
}

/// Streams `records` of `disk` over a stream connection and waits until they are
/// acknowledged durable.
async fn stream(addr: SocketAddr, disk: u64, records: Vec<StreamRecord>) {
    let mut c = Client::connect(addr).await;
    c.wr.send(&Frame::Hello {
        protocol_version: PROTOCOL_VERSION,
        host_name: HOST.to_string(),
        disks: vec![DiskHello {
            disk_id: disk,
            size: SIZE,
            generation: 0,
            vpg_id: String::new(),
            fencing_generation: 0,
        }],
    })
    .await
    .unwrap();
    match c.next().await {
        Frame::Welcome { disks, .. } => assert_eq!(disks.len(), 1, "disk not accepted"),
        other => panic!("expected Welcome, got {other:?}"),
    }
    let last = records.iter().map(|r| r.seq).max().unwrap();
    for r in records {
        c.wr.push(&Frame::Record(r)).unwrap();
    }
    c.wr.flush().await.unwrap();
    loop {
        if let Frame::Ack { disks } = c.next().await {
            if disks
                .iter()
                .any(|a| a.disk_id == disk && a.durable_seq >= last)
            {
                break;
            }
        }
    }
    c.wr.shutdown().await;
}

fn write(disk: u64, seq: u64, offset: u64, data: Vec<u8>) -> StreamRecord {
    StreamRecord {
        disk,
        seq,
        timestamp_ms: 1_000 + seq as i64,
        body: RecordBody::Write { offset, data },
    }
}

fn checkpoint(disk: u64, seq: u64, id: u64) -> StreamRecord {
    StreamRecord {
        disk,
        seq,
        timestamp_ms: 1_000 + seq as i64,
        body: RecordBody::Checkpoint {
            id,
            kind: 1,
            tag: None,
        },
    }
}

fn disk_dir(storage: &Path, disk: u64) -> PathBuf {
    storage.join(format!("disk-{disk:016x}"))
}

fn read_state(storage: &Path, disk: u64) -> SyncState {
    let b = std::fs::read(disk_dir(storage, disk).join(SYNC_STATE_FILE)).unwrap();
    serde_json::from_slice(&b).unwrap()
}

fn begin(kind: SyncKind, start_seq: u64) -> SyncFrame {
    SyncFrame::Begin {
        kind: sync_kind_byte(kind),
        start_seq,
        block_size: HASH.block_size,
        chunk_blocks: HASH.chunk_blocks,
    }
}

#[tokio::test]
async fn unknown_host_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Running::start(dir.path()).await;
    let (_c, first) = Client::session(rx.addr, "stranger", 1, SIZE).await;
    assert!(refused(&first).contains("allow-list"), "{first:?}");
    assert!(!disk_dir(dir.path(), 1).exists());
    rx.stop().await;
}

#[tokio::test]
async fn size_mismatch_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Running::start(dir.path()).await;
    let (c, first) = Client::session(rx.addr, HOST, 3, SIZE).await;
    info(&first);
    drop(c);
    let state = read_state(dir.path(), 3);
    let replica = disk_dir(dir.path(), 3).join("replica.img");

    // Registered disk (journal open in the registry).
    let (_c, first) = Client::session(rx.addr, HOST, 3, SIZE * 2).await;
    let reason = refused(&first);
    assert!(reason.contains(&format!("{}", SIZE * 2)), "{reason}");
    assert!(reason.contains(&format!("{SIZE}")), "{reason}");
    rx.stop().await;

    // And after a restart (the disk is not open yet): checked before opening.
    let rx = Running::start(dir.path()).await;
    let (_c, first) = Client::session(rx.addr, HOST, 3, SIZE / 2).await;
    let reason = refused(&first);
    assert!(
        reason.contains("disk size mismatch")
            && reason.contains(&format!("{}", SIZE / 2))
            && reason.contains(&format!("{SIZE}")),
        "{reason}"
    );
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), SIZE);
    assert_eq!(read_state(dir.path(), 3), state);
    assert!(rx.handle.sync_state(HOST, 3).is_none());
    rx.stop().await;
}

#[tokio::test]
async fn a_new_disk_is_empty() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Running::start(dir.path()).await;
    let (mut c, first) = Client::session(rx.addr, HOST, 4, SIZE).await;
    assert_eq!(info(&first), (SIZE, ReplicaState::Empty, 0, None));
    assert_eq!(read_state(dir.path(), 4).replica, ReplicaState::Empty);
    assert_eq!(
        rx.handle.sync_state(HOST, 4).unwrap(),
        read_state(dir.path(), 4)
    );
    // Digests are only for a Delta Sync.
    let r = c
        .ask(SyncFrame::ChunkDigestsReq {
            req: 1,
            chunks: vec![0],
        })
        .await;
    assert!(refused(&r).contains("Delta"), "{r:?}");
    rx.stop().await;
}

#[tokio::test]
async fn delta_digests_match_the_journal_content() {
    let dir = tempfile::tempdir().unwrap();
    let rx = Running::start(dir.path()).await;
    let disk = 5;
    let mut model = vec![0u8; SIZE as usize];
    let mut records = Vec::new();
    for (i, (off, len)) in [(0u64, 4096usize), (40_000, 10_000), (131_072, 65_536)]
        .into_iter()
        .enumerate()
    {
        let data: Vec<u8> = (0..len).map(|b| (b * 31 + i * 7 + 1) as u8).collect();
        model[off as usize..off as usize + len].copy_from_slice(&data);
        records.push(write(disk, i as u64 + 1, off, data));
    }
    stream(rx.addr, disk, records).await;

    let (mut c, first) = Client::session(rx.addr, HOST, disk, SIZE).await;
    assert_eq!(info(&first), (SIZE, ReplicaState::Empty, 3, None));
    assert_eq!(
        c.ask(begin(SyncKind::Delta, 4)).await,
        Frame::Sync(SyncFrame::Ok)
    );
    assert_eq!(
        rx.handle
            .sync_state(HOST, disk)
            .unwrap()
            .running
            .unwrap()
            .kind,
        SyncKind::Delta
    );

    let mut hasher = Hasher::new(HASH, 1).unwrap();
    let all: Vec<u64> = (0..HASH.chunks(SIZE)).collect();
    let mut want = Vec::new();
    hasher.chunk_digests(&model, SIZE, &all, &mut want).unwrap();
    let want: Vec<ChunkHash> = want
        .into_iter()
        .map(|d| ChunkHash {
            chunk: d.chunk,
            strong: d.strong,
            zero: d.zero,
        })
        .collect();
    let got = c
        .ask(SyncFrame::ChunkDigestsReq {
            req: 7,
            chunks: all.clone(),
        })
        .await;
    assert_eq!(
        got,
        Frame::Sync(SyncFrame::ChunkDigests {
            req: 7,
            digests: want
        })
    );

    let chunk = 40_000 / HASH.chunk_size();
    let bytes = hasher.read_chunk(&model, SIZE, chunk).unwrap().to_vec();
    let mut blocks = Vec::new();
    hasher.block_digests(&bytes, &mut blocks);
    let got = c.ask(SyncFrame::BlockDigestsReq { req: 8, chunk }).await;
    assert_eq!(
        got,
        Frame::Sync(SyncFrame::BlockDigests {
            req: 8,
            chunk,
            digests: blocks
        })
    );

    // A chunk beyond the disk is refused.
    let (mut c, _) = Client::session(rx.addr, HOST, disk, SIZE).await;
    c.ask(begin(SyncKind::Delta, 4)).await;
    let r = c
        .ask(SyncFrame::BlockDigestsReq {
            req: 9,
            chunk: HASH.chunks(SIZE),
        })
        .await;
    assert!(refused(&r).contains("beyond"), "{r:?}");
    rx.stop().await;
}

#[tokio::test]
async fn full_sync_end_moves_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let disk = 6;
    let rx = Running::start(dir.path()).await;
    stream(
        rx.addr,
        disk,
        vec![
            write(disk, 1, 0, vec![1; 4096]),
            checkpoint(disk, 2, 100),
            write(disk, 3, 8192, vec![2; 4096]),
            checkpoint(disk, 4, 101),
        ],
    )
    .await;
    let (mut c, first) = Client::session(rx.addr, HOST, disk, SIZE).await;
    info(&first);
    assert_eq!(
        c.ask(begin(SyncKind::Full, 5)).await,
        Frame::Sync(SyncFrame::Ok)
    );
    let r = c.ask(SyncFrame::End { end_seq: 7 }).await;
    assert!(refused(&r).contains("end_seq not durable"), "{r:?}");
    assert!(rx.handle.sync_state(HOST, disk).unwrap().running.is_some());
    let cps = rx.handle.checkpoints(HOST, disk).unwrap();
    assert_eq!(
        cps.iter().map(|(c, ok)| (c.id, *ok)).collect::<Vec<_>>(),
        vec![(100, false), (101, false)]
    );

    // The sync's data, in band.
    stream(
        rx.addr,
        disk,
        vec![
            write(disk, 5, 0, vec![3; 4096]),
            write(disk, 6, 4096, vec![4; 4096]),
            write(disk, 7, 8192, vec![5; 4096]),
        ],
    )
    .await;
    let (mut c, first) = Client::session(rx.addr, HOST, disk, SIZE).await;
    assert_eq!(
        info(&first),
        (
            SIZE,
            ReplicaState::Empty,
            7,
            Some(sync_kind_byte(SyncKind::Full))
        )
    );
    assert_eq!(
        c.ask(SyncFrame::End { end_seq: 7 }).await,
        Frame::Sync(SyncFrame::Ok)
    );
    drop(c);
    rx.stop().await;

    let state = read_state(dir.path(), disk);
    assert_eq!(state.replica, ReplicaState::Existing);
    assert_eq!(state.floor_seq, 7);
    assert_eq!(state.running, None);
    let last = state.last.unwrap();
    assert_eq!(
        (last.kind, last.start_seq, last.end_seq),
        (SyncKind::Full, 5, 7)
    );

    let rx = Running::start(dir.path()).await;
    assert!(rx.handle.checkpoints(HOST, disk).is_none());
    stream(rx.addr, disk, vec![checkpoint(disk, 8, 102)]).await;
    assert_eq!(rx.handle.sync_state(HOST, disk).unwrap(), state);
    let cps = rx.handle.checkpoints(HOST, disk).unwrap();
    assert_eq!(
        cps.iter().map(|(c, ok)| (c.id, *ok)).collect::<Vec<_>>(),
        vec![(100, false), (101, false), (102, true)]
    );
    rx.stop().await;
}

#[tokio::test]
async fn preseed_checks_and_registers_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("storage");
    std::fs::create_dir_all(&storage).unwrap();
    let image = dir.path().join("image.raw");
    let content: Vec<u8> = (0..SIZE as usize).map(|i| (i % 253) as u8).collect();
    std::fs::write(&image, &content).unwrap();

    let err = preseed(&storage, 9, &image, SIZE * 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("size"), "{err}");
    assert!(!disk_dir(&storage, 9).exists());

    // A disk with journal records is not pre-seeded; one whose journal is empty is.
    let rx = Running::start(&storage).await;
    stream(rx.addr, 10, vec![write(10, 1, 0, vec![9; 4096])]).await;
    let (c, first) = Client::session(rx.addr, HOST, 11, SIZE).await;
    assert_eq!(info(&first).1, ReplicaState::Empty);
    drop(c);
    rx.stop().await;
    assert!(disk_dir(&storage, 11).join("journal").exists());
    preseed(&storage, 11, &image, SIZE).unwrap();
    assert_eq!(read_state(&storage, 11).replica, ReplicaState::PreSeeded);
    let before = read_state(&storage, 10);
    let err = preseed(&storage, 10, &image, SIZE).unwrap_err().to_string();
    assert!(err.contains("journal holding records"), "{err}");
    assert_eq!(read_state(&storage, 10), before);

    let replica = preseed(&storage, 9, &image, SIZE).unwrap();
    assert_eq!(std::fs::read(&replica).unwrap(), content);
    assert_eq!(read_state(&storage, 9).replica, ReplicaState::PreSeeded);

    let rx = Running::start(&storage).await;
    let (mut c, first) = Client::session(rx.addr, HOST, 9, SIZE).await;
    assert_eq!(info(&first), (SIZE, ReplicaState::PreSeeded, 0, None));
    // The head of a pre-seeded disk is the image.
    c.ask(begin(SyncKind::Delta, 1)).await;
    let mut want = Vec::new();
    Hasher::new(HASH, 1)
        .unwrap()
        .chunk_digests(&content, SIZE, &[0, 3], &mut want)
        .unwrap();
    match c
        .ask(SyncFrame::ChunkDigestsReq {
            req: 1,
            chunks: vec![0, 3],
        })
        .await
    {
        Frame::Sync(SyncFrame::ChunkDigests { digests, .. }) => {
            let got: Vec<_> = digests.iter().map(|d| (d.chunk, d.strong)).collect();
            let want: Vec<_> = want.iter().map(|d| (d.chunk, d.strong)).collect();
            assert_eq!(got, want);
        }
        other => panic!("expected ChunkDigests, got {other:?}"),
    }
    rx.stop().await;
}
