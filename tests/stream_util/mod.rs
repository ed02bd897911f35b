//! Shared helpers of the stream tests: certificates, a receiver on port 0, a workload
//! with an in-memory disk model, a cuttable and corrupting TCP proxy, journal checks.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bulwark::agent::journal::{Journal, JournalConfig};
use bulwark::agent::stream::{
    ClientTransport, DiskSpec, Receiver, ReceiverConfig, ReceiverHandle, Sender, SenderConfig,
    ServerTransport, StreamEvent,
};
use bulwark::agent::tls;
use bulwark::proto::stream::{RecordBody, StreamRecord};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const PRO: &str = "pro-1";
pub const REC: &str = "rec-1";
pub const DISK_SIZE: u64 = 4 << 20;

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .try_init();
}

pub struct Certs {
    pub dir: tempfile::TempDir,
}

impl Certs {
    pub fn new() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        tls::lab_certs(dir.path(), &[PRO.into(), REC.into(), "pro-2".into()]).unwrap();
        Certs { dir }
    }
    pub fn files(&self, host: &str) -> tls::TlsFiles {
        tls::TlsFiles::in_dir(self.dir.path(), host)
    }
    pub fn client(&self, host: &str) -> ClientTransport {
        ClientTransport::Tls {
            config: tls::client_config(&self.files(host)).unwrap(),
            server_name: REC.into(),
        }
    }
    pub fn server(&self) -> ServerTransport {
        ServerTransport::Tls(tls::server_config(&self.files(REC)).unwrap())
    }
}

pub struct RunningReceiver {
    pub addr: SocketAddr,
    pub handle: ReceiverHandle,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

impl RunningReceiver {
    pub async fn start(
        addr: SocketAddr,
        transport: ServerTransport,
        allow: &[(&str, &Path)],
    ) -> RunningReceiver {
        let mut cfg = ReceiverConfig::new(addr, transport);
        cfg.allow = allow
            .iter()
            .map(|(h, p)| (h.to_string(), p.to_path_buf()))
            .collect::<HashMap<_, _>>();
        cfg.segment_size = 1 << 20;
        cfg.peer_timeout = Duration::from_secs(3);
        let r = Receiver::bind(cfg).await.unwrap();
        let addr = r.local_addr().unwrap();
        let handle = r.handle();
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move { r.run(c).await.unwrap() });
        RunningReceiver {
            addr,
            handle,
            cancel,
            task,
        }
    }

    /// Stops it and waits until every journal is synced and released.
    pub async fn stop(self) {
        self.cancel.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

pub fn sender_config(peer: SocketAddr, transport: ClientTransport) -> SenderConfig {
    let mut c = SenderConfig::new(PRO, peer, transport);
    c.backoff_min = Duration::from_millis(20);
    c.backoff_max = Duration::from_millis(400);
    c.ping_interval = Duration::from_millis(200);
    c.peer_timeout = Duration::from_secs(3);
    c.connect_timeout = Duration::from_secs(2);
    c.away_bound = Duration::from_secs(60);
    c
}

pub fn specs(disks: &[u64]) -> Vec<DiskSpec> {
    disks
        .iter()
        .map(|&disk_id| DiskSpec {
            disk_id,
            size: DISK_SIZE,
            vpg_id: String::new(),
            fencing_generation: 0,
            generation: 1,
        })
        .collect()
}

/// Generates records for several disks and keeps what each disk must hold.
pub struct Workload {
    rng: StdRng,
    pub model: HashMap<u64, Vec<u8>>,
    pub next_seq: HashMap<u64, u64>,
    pub last_ckpt: HashMap<u64, u64>,
    next_ckpt_id: u64,
    pub records: HashMap<u64, u64>,
}

impl Workload {
    pub fn new(seed: u64, disks: &[u64]) -> Workload {
        Workload {
            rng: StdRng::seed_from_u64(seed),
            model: disks
                .iter()
                .map(|&d| (d, vec![0u8; DISK_SIZE as usize]))
                .collect(),
            next_seq: disks.iter().map(|&d| (d, 1)).collect(),
            last_ckpt: HashMap::new(),
            next_ckpt_id: 1,
            records: HashMap::new(),
        }
    }

    fn seq(&mut self, disk: u64) -> u64 {
        let s = self.next_seq.get_mut(&disk).unwrap();
        let v = *s;
        *s += 1;
        *self.records.entry(disk).or_default() += 1;
        v
    }

    /// A random record for `disk` (mixed sizes, some zero/trim, some checkpoints).
    pub fn next(&mut self, disk: u64, max_write: usize) -> StreamRecord {
        let seq = self.seq(disk);
        let ts = now_ms();
        let roll = self.rng.random_range(0..100);
        let body = if roll < 5 {
            return self.checkpoint_with_seq(disk, seq);
        } else if roll < 12 {
            let off = self.rng.random_range(0..DISK_SIZE / 512) * 512;
            let len = (self.rng.random_range(1..=128u64) * 512).min(DISK_SIZE - off);
            self.model.get_mut(&disk).unwrap()[off as usize..(off + len) as usize].fill(0);
            if roll < 9 {
                RecordBody::Zero { offset: off, len }
            } else {
                RecordBody::Trim { offset: off, len }
            }
        } else {
            let sizes = [512usize, 4096, 4096, 16384, 65536];
            let len = sizes[self.rng.random_range(0..sizes.len())].min(max_write);
            let off = self.rng.random_range(0..(DISK_SIZE - len as u64) / 512) * 512;
            let mut data = vec![0u8; len];
            // Half compressible, half random.
            if self.rng.random_bool(0.5) {
                data.fill(self.rng.random());
                data[0] = self.rng.random();
            } else {
                self.rng.fill(&mut data[..]);
            }
            self.model.get_mut(&disk).unwrap()[off as usize..off as usize + len]
                .copy_from_slice(&data);
            RecordBody::Write { offset: off, data }
        };
        StreamRecord {
            disk,
            seq,
            timestamp_ms: ts,
            body,
        }
    }

    fn checkpoint_with_seq(&mut self, disk: u64, seq: u64) -> StreamRecord {
        let id = self.next_ckpt_id;
        self.next_ckpt_id += 1;
        self.last_ckpt.insert(disk, id);
        StreamRecord {
            disk,
            seq,
            timestamp_ms: now_ms(),
            body: RecordBody::Checkpoint {
                id,
                kind: 1,
                tag: Some(format!("c{id}")),
            },
        }
    }

    pub fn checkpoint(&mut self, disk: u64) -> StreamRecord {
        let seq = self.seq(disk);
        self.checkpoint_with_seq(disk, seq)
    }
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Enqueues and returns the longest time one `enqueue` took.
pub fn enqueue_all(sender: &Sender, recs: Vec<StreamRecord>) -> Duration {
    let mut worst = Duration::ZERO;
    for r in recs {
        let t = Instant::now();
        sender.enqueue(r).unwrap();
        worst = worst.max(t.elapsed());
    }
    worst
}

/// Waits (bounded) until the sender has nothing unacknowledged.
pub async fn wait_drained(sender: &Sender, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !sender.is_drained() {
        assert!(
            Instant::now() < deadline,
            "not drained in time: {:?}",
            sender.stats()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn drain_events(rx: &mut mpsc::UnboundedReceiver<StreamEvent>) -> Vec<StreamEvent> {
    let mut v = Vec::new();
    while let Ok(e) = rx.try_recv() {
        v.push(e);
    }
    v
}

/// Opens the journal of `disk` (the receiver must be stopped) and checks the view at
/// the workload's last checkpoint against the model, and the record count.
pub fn verify_disk(storage: &Path, disk: u64, w: &Workload) {
    let dir = storage.join(format!("disk-{disk:016x}"));
    let mut cfg = JournalConfig::new(disk, DISK_SIZE);
    cfg.segment_size = 1 << 20;
    let j = Journal::open(dir.join("journal"), dir.join("replica.img"), cfg).unwrap();
    let id = w.last_ckpt[&disk];
    let view = j.open_view(id).unwrap();
    let mut got = vec![0u8; DISK_SIZE as usize];
    view.read_at(&mut got, 0).unwrap();
    let want = &w.model[&disk];
    if let Some(i) = got.iter().zip(want.iter()).position(|(a, b)| a != b) {
        panic!("disk {disk}: first difference at byte {i}");
    }
    let st = j.stats();
    assert_eq!(st.last_seq, w.next_seq[&disk] - 1, "disk {disk} last seq");
    assert_eq!(st.durable_seq, st.last_seq);
    // Every record exactly once: the journal holds as many as were sent.
    assert_eq!(st.records, w.records[&disk], "disk {disk} record count");
}

/// A TCP proxy in front of the receiver that the test can cut, or make flip one byte
/// of the sender → receiver direction.
pub struct Proxy {
    pub addr: SocketAddr,
    pub connections: Arc<AtomicU64>,
    cut: tokio::sync::watch::Sender<u64>,
    flip_at: Arc<Mutex<Option<u64>>>,
    cancel: CancellationToken,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (cut, cut_rx) = tokio::sync::watch::channel(0u64);
        let flip_at = Arc::new(Mutex::new(None));
        let connections = Arc::new(AtomicU64::new(0));
        let cancel = CancellationToken::new();
        let (f, n, c) = (flip_at.clone(), connections.clone(), cancel.clone());
        tokio::spawn(async move {
            loop {
                let (down, _) = tokio::select! {
                    _ = c.cancelled() => return,
                    r = l.accept() => r.unwrap(),
                };
                n.fetch_add(1, Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(target).await else {
                    continue;
                };
                let mut cut_rx = cut_rx.clone();
                cut_rx.mark_unchanged();
                let f = f.clone();
                let c = c.clone();
                tokio::spawn(async move {
                    let (mut dr, mut dw) = down.into_split();
                    let (mut ur, mut uw) = up.into_split();
                    let upstream = async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 << 10];
                        let mut pos = 0u64;
                        loop {
                            let n = dr.read(&mut buf).await?;
                            if n == 0 {
                                return Ok::<(), std::io::Error>(());
                            }
                            {
                                let mut fa = f.lock().unwrap();
                                if let Some(at) = *fa {
                                    if at >= pos && at < pos + n as u64 {
                                        buf[(at - pos) as usize] ^= 0x5a;
                                        *fa = None;
                                    }
                                }
                            }
                            pos += n as u64;
                            uw.write_all(&buf[..n]).await?;
                        }
                    };
                    let downstream = async move {
                        tokio::io::copy(&mut ur, &mut dw).await?;
                        Ok::<(), std::io::Error>(())
                    };
                    tokio::select! {
                        _ = c.cancelled() => {}
                        _ = cut_rx.changed() => {}
                        _ = async { tokio::join!(upstream, downstream) } => {}
                    }
                });
            }
        });
        Proxy {
            addr,
            connections,
            cut,
            flip_at,
            cancel,
        }
    }

    /// Drops every connection now open.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }

    /// Flips the byte at this offset of the next bytes the sender sends on the
    /// connection open now (or the next one).
    pub fn flip_at(&self, offset: u64) {
        *self.flip_at.lock().unwrap() = Some(offset);
    }

    pub fn stop(&self) {
        self.cancel.cancel();
    }
}

pub fn storage(dir: &Path) -> PathBuf {
    dir.join("storage")
}
