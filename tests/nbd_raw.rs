//! Protocol-level tests with our own client and raw TCP: negotiation replies, error values,
//! pipelining, malformed and oversize input, export removal, shutdown, completion hold.
#![allow(clippy::unwrap_used)] // helpers outside #[test] fns unwrap too

mod nbd_common;

use std::sync::Arc;
use std::time::Duration;

use bulwark::agent::dirty::{DirtyConfig, DirtyPaths, DirtyTracker};
use bulwark::agent::nbd::proto::*;
use bulwark::agent::nbd::{
    CompletionGate, ExportRegistry, FileDevice, NbdClient, NbdError, ProtectedDevice,
    RecordedEvent, RecordingSink,
};
use nbd_common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: u64 = 1 << 20;
const T: Duration = Duration::from_secs(10);

async fn disk_server(dir: &std::path::Path, size: u64) -> TestServer {
    let registry = ExportRegistry::new();
    registry
        .add(
            "disk",
            Arc::new(FileDevice::create(&dir.join("disk.img"), size).unwrap()),
        )
        .unwrap();
    TestServer::start(registry).await
}

/// Reads the greeting and sends client flags; returns the stream ready for options.
async fn raw_greet(addr: std::net::SocketAddr, cflags: u32) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello[0..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    assert_eq!(
        u16::from_be_bytes([hello[16], hello[17]]),
        FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    );
    s.write_all(&cflags.to_be_bytes()).await.unwrap();
    s
}

async fn raw_option(s: &mut TcpStream, option: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
}

/// Reads one option reply: (option, reply type, data).
async fn raw_reply(s: &mut TcpStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    tokio::time::timeout(T, s.read_exact(&mut h))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&h[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    let be = |o: usize| u32::from_be_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let mut data = vec![0u8; be(16) as usize];
    s.read_exact(&mut data).await.unwrap();
    (be(8), be(12), data)
}

/// True if the peer closed the connection (EOF or reset) within the timeout.
async fn closed(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4096];
    tokio::time::timeout(T, async {
        loop {
            match s.read(&mut b).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {} // whatever the server sent before hanging up
            }
        }
    })
    .await
    .unwrap_or(false)
}

fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negotiation_replies() {
    let dir = tempfile::tempdir().unwrap();
    let server = disk_server(dir.path(), 8 * MIB).await;
    let cf = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

    // Unsupported options get ERR_UNSUP and the session continues; INFO for an unknown
    // export gets ERR_UNKNOWN; INFO for ours gets EXPORT, NAME, BLOCK_SIZE, then ACK.
    let mut s = raw_greet(server.addr, cf).await;
    for opt in [
        OPT_STRUCTURED_REPLY,
        OPT_STARTTLS,
        OPT_EXTENDED_HEADERS,
        OPT_SET_META_CONTEXT,
        4242,
    ] {
        raw_option(&mut s, opt, &[]).await;
        let (o, r, _) = raw_reply(&mut s).await;
        assert_eq!((o, r), (opt, REP_ERR_UNSUP));
    }
    raw_option(&mut s, OPT_INFO, &go_data("nope", &[])).await;
    let (_, r, msg) = raw_reply(&mut s).await;
    assert_eq!(r, REP_ERR_UNKNOWN);
    assert!(String::from_utf8_lossy(&msg).contains("nope"));
    raw_option(
        &mut s,
        OPT_INFO,
        &go_data("disk", &[INFO_NAME, INFO_BLOCK_SIZE]),
    )
    .await;
    let mut kinds = Vec::new();
    loop {
        let (o, r, d) = raw_reply(&mut s).await;
        assert_eq!(o, OPT_INFO);
        if r == REP_ACK {
            break;
        }
        assert_eq!(r, REP_INFO);
        let kind = u16::from_be_bytes([d[0], d[1]]);
        kinds.push(kind);
        if kind == INFO_EXPORT {
            assert_eq!(u64::from_be_bytes(d[2..10].try_into().unwrap()), 8 * MIB);
            let flags = u16::from_be_bytes([d[10], d[11]]);
            let want = FLAG_HAS_FLAGS
                | FLAG_SEND_FLUSH
                | FLAG_SEND_FUA
                | FLAG_SEND_TRIM
                | FLAG_SEND_WRITE_ZEROES
                | FLAG_CAN_MULTI_CONN;
            assert_eq!(flags, want);
        }
        if kind == INFO_NAME {
            assert_eq!(&d[2..], b"disk");
        }
    }
    assert_eq!(kinds, vec![INFO_EXPORT, INFO_NAME, INFO_BLOCK_SIZE]);
    // Malformed INFO (name length beyond the data) → ERR_INVALID.
    let mut bad = go_data("disk", &[]);
    bad[3] = 99;
    raw_option(&mut s, OPT_GO, &bad).await;
    assert_eq!(raw_reply(&mut s).await.1, REP_ERR_INVALID);
    // LIST with data → ERR_INVALID; without → SERVER + ACK.
    raw_option(&mut s, OPT_LIST, b"x").await;
    assert_eq!(raw_reply(&mut s).await.1, REP_ERR_INVALID);
    raw_option(&mut s, OPT_LIST, &[]).await;
    let (_, r, d) = raw_reply(&mut s).await;
    assert_eq!(r, REP_SERVER);
    assert_eq!(&d[4..], b"disk");
    assert_eq!(raw_reply(&mut s).await.1, REP_ACK);
    // Oversize option data: skipped and refused, session continues.
    raw_option(&mut s, OPT_INFO, &vec![0u8; 100_000]).await;
    assert_eq!(raw_reply(&mut s).await.1, REP_ERR_TOO_BIG);
    // ABORT → ACK and close.
    raw_option(&mut s, OPT_ABORT, &[]).await;
    assert_eq!(raw_reply(&mut s).await.1, REP_ACK);
    assert!(closed(&mut s).await);

    // EXPORT_NAME: size + flags, with or without the 124 zeroes.
    for (cflags, extra) in [(cf, 0usize), (FLAG_C_FIXED_NEWSTYLE, 124)] {
        let mut s = raw_greet(server.addr, cflags).await;
        raw_option(&mut s, OPT_EXPORT_NAME, b"disk").await;
        let mut b = vec![0u8; 10 + extra];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(u64::from_be_bytes(b[0..8].try_into().unwrap()), 8 * MIB);
        assert!(b[10..].iter().all(|&x| x == 0));
        // Transmission works on it.
        s.write_all(&encode_request(&Request {
            flags: 0,
            kind: CMD_FLUSH,
            handle: 9,
            offset: 0,
            length: 0,
        }))
        .await
        .unwrap();
        let mut r = [0u8; 16];
        s.read_exact(&mut r).await.unwrap();
        assert_eq!(r, simple_reply(0, 9));
    }
    // EXPORT_NAME for an unknown export: the server hangs up (no error reply exists).
    let mut s = raw_greet(server.addr, cf).await;
    raw_option(&mut s, OPT_EXPORT_NAME, b"nope").await;
    assert!(closed(&mut s).await);
    // Unknown client flags: hang up.
    let mut s = raw_greet(server.addr, 0x80).await;
    assert!(closed(&mut s).await);
    // Our client sees the same through its API.
    let c = NbdClient::connect(server.addr, "nope").await.unwrap_err();
    assert!(
        matches!(
            c,
            NbdError::OptionRefused {
                reply: REP_ERR_UNKNOWN,
                ..
            }
        ),
        "{c}"
    );
    assert_eq!(
        NbdClient::list(server.addr).await.unwrap(),
        vec!["disk".to_string()]
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transmission_errors_keep_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let registry = ExportRegistry::new();
    registry
        .add(
            "disk",
            Arc::new(FileDevice::create(&dir.path().join("d.img"), 8 * MIB).unwrap()),
        )
        .unwrap();
    let ro = dir.path().join("ro.img");
    std::fs::write(&ro, vec![3u8; 65536]).unwrap();
    registry
        .add("ro", Arc::new(FileDevice::open(&ro, true).unwrap()))
        .unwrap();
    let server = TestServer::start(registry).await;
    let mut c = NbdClient::connect(server.addr, "disk").await.unwrap();
    assert_eq!(c.info().size, 8 * MIB);
    assert_eq!(c.info().block_size, Some((1, 4096, 32 << 20)));

    let remote = |r: Result<_, NbdError>| match r {
        Err(NbdError::Remote(e)) => e,
        other => panic!("expected an NBD error, got {other:?}"),
    };
    assert_eq!(remote(c.read(8 * MIB - 100, 200).await.map(drop)), EINVAL);
    assert_eq!(remote(c.read(u64::MAX - 10, 100).await.map(drop)), EINVAL);
    assert_eq!(remote(c.write(8 * MIB - 1, &[1, 2], false).await), ENOSPC);
    assert_eq!(remote(c.write_zeroes(8 * MIB, 1, false).await), ENOSPC);
    assert_eq!(remote(c.trim(8 * MIB - 1, 2).await), EINVAL);
    // Oversize read: refused without allocating 1 GiB.
    assert_eq!(remote(c.read(0, 1 << 30).await.map(drop)), EINVAL);
    // Unknown command, unknown flag, DF without structured replies.
    for (kind, flags) in [
        (CMD_CACHE, 0),
        (99, 0),
        (CMD_BLOCK_STATUS, 0),
        (CMD_READ, 1 << 2),
        (CMD_WRITE_ZEROES, 1 << 4),
    ] {
        let h = c.send(kind, flags, 0, 512, &[]).await.unwrap();
        let r = c.recv().await.unwrap();
        assert_eq!(
            (r.handle, r.error),
            (h, EINVAL),
            "kind {kind} flags {flags}"
        );
    }
    // Oversize write within the drain limit: payload discarded, error, connection fine.
    let big = vec![0x77u8; (40 * MIB) as usize];
    assert_eq!(remote(c.write(0, &big, false).await), EINVAL);
    // Still usable, and the big payload did not land anywhere.
    c.write(4096, b"hello", true).await.unwrap();
    assert_eq!(c.read(4094, 9).await.unwrap(), b"\0\0hello\0\0");
    assert_eq!(c.read(0, 4096).await.unwrap(), vec![0u8; 4096]);
    // Zero-length requests are fine no-ops.
    c.write(0, &[], false).await.unwrap();
    assert!(c.read(8 * MIB, 0).await.unwrap().is_empty());
    c.disconnect().await.unwrap();

    // Read-only export: EPERM for every write-type command, reads fine.
    let mut c = NbdClient::connect(server.addr, "ro").await.unwrap();
    assert_ne!(c.info().flags & FLAG_READ_ONLY, 0);
    assert_eq!(remote(c.write(0, b"x", false).await), EPERM);
    assert_eq!(remote(c.trim(0, 512).await), EPERM);
    assert_eq!(remote(c.write_zeroes(0, 512, true).await), EPERM);
    c.flush().await.unwrap();
    assert_eq!(c.read(0, 4).await.unwrap(), vec![3u8; 4]);
    assert_eq!(std::fs::read(&ro).unwrap(), vec![3u8; 65536]);
    c.disconnect().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_all_answered() {
    // With the inline fast path (default) and without (every request on a blocking thread).
    for inline_max in [64 << 10, 0] {
        pipelined(inline_max).await;
    }
}

async fn pipelined(inline_max: u32) {
    let dir = tempfile::tempdir().unwrap();
    let registry = ExportRegistry::new();
    registry
        .add(
            "disk",
            Arc::new(FileDevice::create(&dir.path().join("disk.img"), 16 * MIB).unwrap()),
        )
        .unwrap();
    let config = bulwark::agent::nbd::ServerConfig {
        inline_max,
        ..Default::default()
    };
    let server = TestServer::start_with(registry, config).await;
    let mut c = NbdClient::connect(server.addr, "disk").await.unwrap();
    // 200 writes in flight (more than the 64 slots: the server must keep reading as slots
    // free), then 200 reads, then check every handle came back once with the right data.
    let mut expect = std::collections::HashMap::new();
    for i in 0..200u64 {
        let data = vec![(i % 251) as u8 + 1; 8192 + (i as usize % 7) * 512];
        let h = c
            .send(
                CMD_WRITE,
                if i % 10 == 0 { CMD_FLAG_FUA } else { 0 },
                i * 65536,
                data.len() as u32,
                &data,
            )
            .await
            .unwrap();
        expect.insert(h, None);
    }
    for _ in 0..200 {
        let r = tokio::time::timeout(T, c.recv()).await.unwrap().unwrap();
        assert_eq!(r.error, 0);
        assert!(
            expect.remove(&r.handle).is_some(),
            "unexpected or duplicate handle {}",
            r.handle
        );
    }
    for i in 0..200u64 {
        let h = c.send(CMD_READ, 0, i * 65536, 8192, &[]).await.unwrap();
        expect.insert(h, Some(vec![(i % 251) as u8 + 1; 8192]));
    }
    for _ in 0..200 {
        let r = tokio::time::timeout(T, c.recv()).await.unwrap().unwrap();
        let want = expect.remove(&r.handle).unwrap().unwrap();
        assert_eq!(r.data, want);
    }
    assert!(expect.is_empty());
    c.disconnect().await.unwrap();
    let st = server.stats.snapshot();
    assert_eq!((st.requests, st.errors, st.connections), (400, 0, 1));
    if inline_max == 0 {
        assert_eq!(st.inline, 0);
    } else {
        assert!(st.inline > 0, "{st:?}");
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_clients_do_not_hurt_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = disk_server(dir.path(), 4 * MIB).await;
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();

    // Garbage instead of client flags / options.
    let mut s = TcpStream::connect(server.addr).await.unwrap();
    s.write_all(&garbage).await.unwrap();
    assert!(closed(&mut s).await);
    let mut s = raw_greet(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    s.write_all(&garbage).await.unwrap();
    assert!(closed(&mut s).await);
    // An option claiming 4 GiB of data: hung up on, nothing allocated.
    let mut s = raw_greet(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    s.write_all(&h).await.unwrap();
    assert!(closed(&mut s).await);

    // In transmission: a write header announcing 4 GiB - 1: EINVAL, then hang up (the
    // payload is not drained, nothing that size is allocated).
    let mut s = raw_greet(server.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    raw_option(&mut s, OPT_EXPORT_NAME, b"disk").await;
    let mut b = [0u8; 10];
    s.read_exact(&mut b).await.unwrap();
    s.write_all(&encode_request(&Request {
        flags: 0,
        kind: CMD_WRITE,
        handle: 5,
        offset: 0,
        length: u32::MAX,
    }))
    .await
    .unwrap();
    let mut r = [0u8; 16];
    s.read_exact(&mut r).await.unwrap();
    assert_eq!(r, simple_reply(EINVAL, 5));
    assert!(closed(&mut s).await);
    // Garbage in transmission: bad magic → hang up.
    let mut s = raw_greet(server.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    raw_option(&mut s, OPT_EXPORT_NAME, b"disk").await;
    s.read_exact(&mut b).await.unwrap();
    s.write_all(&garbage).await.unwrap();
    assert!(closed(&mut s).await);
    // A client that connects and says nothing does not block others (or shutdown).
    let _silent = TcpStream::connect(server.addr).await.unwrap();
    // A client that dies mid-payload.
    let mut s = raw_greet(server.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    raw_option(&mut s, OPT_EXPORT_NAME, b"disk").await;
    s.read_exact(&mut b).await.unwrap();
    s.write_all(&encode_request(&Request {
        flags: 0,
        kind: CMD_WRITE,
        handle: 6,
        offset: 0,
        length: 65536,
    }))
    .await
    .unwrap();
    s.write_all(&[1u8; 1000]).await.unwrap();
    drop(s);

    // The server still serves.
    let mut c = NbdClient::connect(server.addr, "disk").await.unwrap();
    c.write(0, b"alive", false).await.unwrap();
    assert_eq!(c.read(0, 5).await.unwrap(), b"alive");
    c.disconnect().await.unwrap();
    // And shuts down promptly despite the silent client.
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_come_and_go_at_run_time() {
    let dir = tempfile::tempdir().unwrap();
    let registry = ExportRegistry::new();
    let server = TestServer::start(registry.clone()).await;
    assert!(NbdClient::list(server.addr).await.unwrap().is_empty());
    registry
        .add(
            "a",
            Arc::new(FileDevice::create(&dir.path().join("a"), MIB).unwrap()),
        )
        .unwrap();
    registry
        .add(
            "b",
            Arc::new(FileDevice::create(&dir.path().join("b"), 2 * MIB).unwrap()),
        )
        .unwrap();
    assert!(matches!(
        registry.add(
            "a",
            Arc::new(FileDevice::create(&dir.path().join("c"), MIB).unwrap())
        ),
        Err(NbdError::ExportExists(_))
    ));
    assert!(registry
        .add(
            "bad\0name",
            Arc::new(FileDevice::create(&dir.path().join("d"), MIB).unwrap())
        )
        .is_err());
    assert_eq!(
        NbdClient::list(server.addr).await.unwrap(),
        vec!["a".to_string(), "b".to_string()]
    );
    let mut c = NbdClient::connect(server.addr, "a").await.unwrap();
    c.write(0, b"x", false).await.unwrap();
    // Removing "a" disconnects its client; "b" is untouched.
    let mut cb = NbdClient::connect(server.addr, "b").await.unwrap();
    let drained = tokio::time::timeout(T, registry.remove_and_drain("a")).await;
    assert!(
        drained.unwrap().is_some(),
        "drain of a removed export must finish"
    );
    assert!(registry.remove("a").is_none());
    let r = tokio::time::timeout(T, async {
        loop {
            if c.read(0, 1).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(r.is_ok(), "client of a removed export stays connected");
    assert!(NbdClient::connect(server.addr, "a").await.is_err());
    assert_eq!(cb.info().size, 2 * MIB);
    cb.write(0, b"y", false).await.unwrap();
    cb.disconnect().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_completions_are_acknowledged_only_after_release() {
    let dir = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let file = FileDevice::create(&dir.path().join("p.img"), size).unwrap();
    let (tracker, _) = DirtyTracker::open(
        DirtyPaths::in_dir(dir.path(), "p"),
        size,
        DirtyConfig::default(),
    )
    .unwrap();
    let sink = RecordingSink::new();
    let gate = CompletionGate::new();
    let dev = ProtectedDevice::new(file, Arc::new(tracker), sink.clone(), gate.clone()).unwrap();
    let registry = ExportRegistry::new();
    registry.add("p", Arc::new(dev)).unwrap();
    let server = TestServer::start(registry).await;
    let mut c = NbdClient::connect(server.addr, "p").await.unwrap();
    c.write(0, b"before", false).await.unwrap();

    let hold = gate.hold();
    let hw = c.send(CMD_WRITE, 0, 4096, 5, b"held!").await.unwrap();
    let hz = c.send(CMD_WRITE_ZEROES, 0, 0, 3, &[]).await.unwrap();
    // Not acknowledged while held …
    assert!(tokio::time::timeout(Duration::from_millis(300), c.recv())
        .await
        .is_err());
    // … but accepted, applied locally and handed to the sink (bounded wait for the thread).
    for _ in 0..100 {
        if sink.len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sink.len(), 3);
    // Reads and flushes are not held.
    let hr = c.send(CMD_READ, 0, 4096, 5, &[]).await.unwrap();
    let r = tokio::time::timeout(T, c.recv()).await.unwrap().unwrap();
    assert_eq!(
        (r.handle, r.error, r.data.as_slice()),
        (hr, 0, &b"held!"[..])
    );
    let hf = c.send(CMD_FLUSH, 0, 0, 0, &[]).await.unwrap();
    let r = tokio::time::timeout(T, c.recv()).await.unwrap().unwrap();
    assert_eq!((r.handle, r.error), (hf, 0));
    assert!(tokio::time::timeout(Duration::from_millis(100), c.recv())
        .await
        .is_err());

    let held_for = hold.release();
    assert!(held_for >= Duration::from_millis(400));
    let mut got = vec![
        tokio::time::timeout(T, c.recv())
            .await
            .unwrap()
            .unwrap()
            .handle,
        tokio::time::timeout(T, c.recv())
            .await
            .unwrap()
            .unwrap()
            .handle,
    ];
    got.sort_unstable();
    assert_eq!(got, vec![hw, hz]);
    assert_eq!(
        sink.take(),
        vec![
            RecordedEvent::Write {
                offset: 0,
                data: b"before".to_vec(),
                fua: false
            },
            RecordedEvent::Write {
                offset: 4096,
                data: b"held!".to_vec(),
                fua: false
            },
            RecordedEvent::Zeroes { offset: 0, len: 3 },
        ]
    );
    assert_eq!(gate.hold_count(), 1);
    c.disconnect().await.unwrap();
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_in_flight_then_closes() {
    let dir = tempfile::tempdir().unwrap();
    let server = disk_server(dir.path(), 16 * MIB).await;
    let mut c = NbdClient::connect(server.addr, "disk").await.unwrap();
    let data = vec![9u8; MIB as usize];
    let mut handles = Vec::new();
    for i in 0..8u64 {
        handles.push(
            c.send(CMD_WRITE, 0, i * MIB, MIB as u32, &data)
                .await
                .unwrap(),
        );
    }
    let stop = server.stop.clone();
    let waiter = tokio::spawn(server.shutdown());
    stop.cancel();
    // Whatever was read before the stop is answered; then the connection closes.
    let mut answered = 0;
    while let Ok(Ok(r)) = tokio::time::timeout(T, c.recv()).await {
        assert_eq!(r.error, 0);
        answered += 1;
    }
    assert!(answered <= handles.len());
    tokio::time::timeout(T, waiter).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trim_punches_holes_and_no_hole_zeroes_stay_allocated() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let server = disk_server(dir.path(), 8 * MIB).await;
    let blocks = || std::fs::metadata(&img).unwrap().blocks() * 512;
    let mut c = NbdClient::connect(server.addr, "disk").await.unwrap();
    c.write(0, &vec![0xabu8; (3 * MIB) as usize], false)
        .await
        .unwrap();
    c.flush().await.unwrap();
    let full = blocks();
    assert!(full >= 3 * MIB, "{full}");
    // TRIM: a hole, reading as zeroes (unaligned edges zeroed too).
    c.trim(100, (MIB - 100) as u32).await.unwrap();
    assert!(blocks() <= full - MIB + 8192, "trim did not punch a hole");
    assert_eq!(c.read(0, 100).await.unwrap(), vec![0xab; 100]);
    assert!(c
        .read(100, (MIB - 100) as u32)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    // WRITE_ZEROES with NO_HOLE: zeroes, still allocated.
    let before = blocks();
    c.write_zeroes(MIB, MIB as u32, true).await.unwrap();
    assert!(blocks() >= before, "NO_HOLE zeroing deallocated");
    assert!(c
        .read(MIB, MIB as u32)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    // WRITE_ZEROES allowing holes: deallocates.
    c.write_zeroes(2 * MIB, MIB as u32, false).await.unwrap();
    assert!(blocks() < before, "may-trim zeroing kept the blocks");
    assert!(c
        .read(2 * MIB, MIB as u32)
        .await
        .unwrap()
        .iter()
        .all(|&b| b == 0));
    c.disconnect().await.unwrap();
    server.shutdown().await;
}
