//! Wire format of the replication stream between a protected and a recovery agent: the
//! frame header, the messages, and their codec. No I/O here.
//!
//! A frame is a 16-byte header followed by `len` payload bytes:
//!
//! ```text
//! 0  magic   "BS"            2 bytes
//! 2  version  u8             PROTOCOL_VERSION
//! 3  type     u8             FrameType
//! 4  flags    u8             bits 0-1: compression (0 none, 1 zstd, 2 lz4)
//! 5  reserved 3 bytes        zero
//! 8  len      u32 LE         payload bytes on the wire (≤ MAX_FRAME_LEN)
//! 12 crc      u32 LE         CRC32C of header (crc field zeroed) + payload on the wire
//! ```
//!
//! A compressed payload starts with the uncompressed length (u32 LE, ≤ MAX_FRAME_LEN), so
//! decompression allocates only what a valid frame can need. The CRC covers the bytes as
//! they travel, so a damaged frame is refused before anything decompresses or decodes it.
//! Integers in payloads are little-endian; strings are u16 length + UTF-8.

use std::io::Cursor;

/// Frame magic: "BS" (Bulwark Stream).
pub const MAGIC: [u8; 2] = *b"BS";
/// The one version this build speaks; `Hello` repeats it for a clear refusal.
///
/// Version 2: each disk of a `Hello` and each sync `Hello` carries its VPG id and
/// fencing generation; the `Welcome` lists the disks it refused, with the reason.
pub const PROTOCOL_VERSION: u8 = 2;
pub const HEADER_LEN: usize = 16;
/// Largest payload (compressed or not) a frame may carry; a header announcing more is
/// `FrameError::TooLarge` and nothing is allocated for it.
pub const MAX_FRAME_LEN: usize = 16 << 20;
/// Largest write data in one record: leaves room for the record header in a frame.
pub const MAX_WRITE_DATA: usize = MAX_FRAME_LEN - 64;
/// Longest string (host name, reason, tag) on the wire.
pub const MAX_STR: usize = 4096;
/// Most disks one Hello, Welcome, Ack or Ping may list.
pub const MAX_DISKS: usize = 4096;

/// How a frame's payload is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    #[default]
    None,
    Zstd,
    Lz4,
}

impl Compression {
    fn bits(self) -> u8 {
        match self {
            Compression::None => 0,
            Compression::Zstd => 1,
            Compression::Lz4 => 2,
        }
    }
}

/// Why bytes are not a frame.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// Not enough bytes yet: read more and try again. Nothing was consumed.
    #[error("incomplete frame")]
    Incomplete,
    /// The header announces more than `MAX_FRAME_LEN` bytes.
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// Bytes that no correct peer sends: bad magic, version, CRC, or content.
    #[error("corrupt frame: {0}")]
    Corrupt(String),
}

fn corrupt(why: impl Into<String>) -> FrameError {
    FrameError::Corrupt(why.into())
}

/// A disk the protected side wants to stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskHello {
    pub disk_id: u64,
    /// Size of the protected disk in bytes.
    pub size: u64,
    /// Bumped by the protected side when the disk's sequence restarts (after a full or
    /// delta sync); carried for the manager's checks. Not the fencing generation.
    pub generation: u64,
    /// The disk's VPG (consistency group for a static configuration).
    pub vpg_id: String,
    /// The VPG's fencing generation as the protected side knows it (0: not fenced, a
    /// static configuration). A recovery side that has seen a newer one refuses the disk.
    pub fencing_generation: u64,
}

/// A disk of a `Hello` the receiver did not accept, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRefused {
    pub disk_id: u64,
    /// Refused by fencing: the recovery side knows a newer generation of the disk's VPG
    /// (a failover or move happened); the same Hello will never be accepted again.
    pub fenced: bool,
    pub reason: String,
}

/// Where the receiver stands for one disk: the sender resends everything above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskAck {
    pub disk_id: u64,
    pub durable_seq: u64,
}

/// How far behind the sender is on one disk, sent with every Ping so the recovery side
/// can report lag too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DiskLag {
    pub disk_id: u64,
    pub queued_records: u64,
    pub queued_bytes: u64,
    pub oldest_unacked_ms: u64,
}

/// What a record does to its disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordBody {
    Write {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    Trim {
        offset: u64,
        len: u64,
    },
    /// A checkpoint marker; `kind` is the journal's `CheckpointKind` as a byte.
    Checkpoint {
        id: u64,
        kind: u8,
        tag: Option<String>,
    },
}

/// One record of one disk's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamRecord {
    pub disk: u64,
    /// Strictly increasing per disk, assigned by the protected disk.
    pub seq: u64,
    /// Unix ms of the write (for a checkpoint: its wall time).
    pub timestamp_ms: i64,
    pub body: RecordBody,
}

impl StreamRecord {
    /// Bytes of write data this record carries (0 for the others): what the memory and
    /// bandwidth accounting counts, plus a fixed overhead.
    pub fn cost(&self) -> usize {
        64 + match &self.body {
            RecordBody::Write { data, .. } => data.len(),
            RecordBody::Checkpoint { tag, .. } => tag.as_ref().map_or(0, |t| t.len()),
            _ => 0,
        }
    }
}

/// Every message of the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello {
        protocol_version: u8,
        host_name: String,
        disks: Vec<DiskHello>,
    },
    Welcome {
        disks: Vec<DiskAck>,
        /// Disks of the Hello left out, with the reason (fencing, size mismatch, …).
        refused: Vec<DiskRefused>,
    },
    Refused {
        reason: String,
    },
    Record(StreamRecord),
    /// Highest durable seq per disk (many disks per frame).
    Ack {
        disks: Vec<DiskAck>,
    },
    Ping {
        nonce: u64,
        lag: Vec<DiskLag>,
    },
    Pong {
        nonce: u64,
    },
    /// A message of a sync session (its own connection; see [`SyncFrame`]).
    Sync(SyncFrame),
}

/// What the recovery side holds for a disk, as a sync session's `Info` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaState {
    /// Created by this agent and never written: reads as zeroes (Initial Sync skips zero
    /// blocks).
    Empty,
    /// An operator registered a copy made elsewhere (restored backup, external media).
    PreSeeded,
    /// The replica has been replicated into before.
    Existing,
}

impl ReplicaState {
    fn byte(self) -> u8 {
        match self {
            ReplicaState::Empty => 0,
            ReplicaState::PreSeeded => 1,
            ReplicaState::Existing => 2,
        }
    }
    fn from_byte(b: u8) -> Result<Self, FrameError> {
        Ok(match b {
            0 => ReplicaState::Empty,
            1 => ReplicaState::PreSeeded,
            2 => ReplicaState::Existing,
            _ => return Err(corrupt(format!("unknown replica state {b}"))),
        })
    }
}

/// A sync's kind on the wire (`model::status::SyncKind`).
pub fn sync_kind_byte(k: crate::model::status::SyncKind) -> u8 {
    use crate::model::status::SyncKind;
    match k {
        SyncKind::Initial => 1,
        SyncKind::Delta => 2,
        SyncKind::Bitmap => 3,
        SyncKind::Full => 4,
    }
}

/// The inverse of [`sync_kind_byte`].
pub fn sync_kind_from_byte(b: u8) -> Option<crate::model::status::SyncKind> {
    use crate::model::status::SyncKind;
    Some(match b {
        1 => SyncKind::Initial,
        2 => SyncKind::Delta,
        3 => SyncKind::Bitmap,
        4 => SyncKind::Full,
        _ => return None,
    })
}

/// Level-1 digest of one chunk, as the recovery side computed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHash {
    pub chunk: u64,
    pub strong: [u8; 32],
    pub zero: bool,
}

/// Most chunks one digest request may name, and most block digests one chunk may have.
pub const MAX_SYNC_ITEMS: usize = 65536;

/// A sync session: one connection per (disk, sync) from the protected agent to the
/// recovery agent's data listener, beside the stream. Comparison travels here; data never
/// does (it goes in band, as stream records). Source S, target T:
/// - S→T `Hello` (first frame; T applies the stream's allow-list) → T→S `Info`, or
///   `Frame::Refused` (unknown host, size mismatch — before anything is sent).
/// - S→T `Begin` → T persists "sync running" (checkpoints after `start_seq` are not
///   recoverable; for Full/Initial nor are earlier ones) → `Ok`.
/// - Delta only: `ChunkDigestsReq` → `ChunkDigests` (T hashes its disk as of its durable
///   seq), `BlockDigestsReq` → `BlockDigests`; requests may be pipelined, answers come
///   in order.
/// - S→T `End{end_seq}` once every sync record up to `end_seq` is acknowledged → T
///   persists the end (checkpoints after `end_seq` are recoverable) → `Ok`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncFrame {
    Hello {
        host_name: String,
        disk_id: u64,
        size: u64,
        /// As in the stream's [`DiskHello`]: a stale generation is refused.
        vpg_id: String,
        fencing_generation: u64,
    },
    Info {
        size: u64,
        replica: ReplicaState,
        durable_seq: u64,
        /// The kind of a sync that began and did not end (a resumed session).
        running: Option<u8>,
        /// The journal was reopened after a storage error holding less than it had made
        /// durable: the replica must be rewritten whole (Full Sync), and no checkpoint
        /// after the loss is recoverable until that ends. On the wire a trailing flags
        /// byte (bit 0) that is only sent when set, so a peer of an earlier build reads
        /// every other Info as before.
        journal_lost: bool,
    },
    Begin {
        kind: u8,
        start_seq: u64,
        block_size: u32,
        chunk_blocks: u32,
    },
    ChunkDigestsReq {
        req: u64,
        chunks: Vec<u64>,
    },
    ChunkDigests {
        req: u64,
        digests: Vec<ChunkHash>,
    },
    BlockDigestsReq {
        req: u64,
        chunk: u64,
    },
    BlockDigests {
        req: u64,
        chunk: u64,
        digests: Vec<u64>,
    },
    End {
        end_seq: u64,
    },
    Ok,
}

const S_HELLO: u8 = 1;
const S_INFO: u8 = 2;
const S_BEGIN: u8 = 3;
const S_CHUNK_REQ: u8 = 4;
const S_CHUNK_DIGESTS: u8 = 5;
const S_BLOCK_REQ: u8 = 6;
const S_BLOCK_DIGESTS: u8 = 7;
const S_END: u8 = 8;
const S_OK: u8 = 9;
/// `SyncFrame::Info`'s optional trailing flags byte.
const INFO_JOURNAL_LOST: u8 = 1;

impl SyncFrame {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            SyncFrame::Hello {
                host_name,
                disk_id,
                size,
                vpg_id,
                fencing_generation,
            } => {
                out.push(S_HELLO);
                put_str(out, host_name);
                put_u64(out, *disk_id);
                put_u64(out, *size);
                put_str(out, vpg_id);
                put_u64(out, *fencing_generation);
            }
            SyncFrame::Info {
                size,
                replica,
                durable_seq,
                running,
                journal_lost,
            } => {
                out.push(S_INFO);
                put_u64(out, *size);
                out.push(replica.byte());
                put_u64(out, *durable_seq);
                out.push(running.unwrap_or(0));
                if *journal_lost {
                    out.push(INFO_JOURNAL_LOST);
                }
            }
            SyncFrame::Begin {
                kind,
                start_seq,
                block_size,
                chunk_blocks,
            } => {
                out.push(S_BEGIN);
                out.push(*kind);
                put_u64(out, *start_seq);
                put_u32(out, *block_size);
                put_u32(out, *chunk_blocks);
            }
            SyncFrame::ChunkDigestsReq { req, chunks } => {
                out.push(S_CHUNK_REQ);
                put_u64(out, *req);
                put_u32(out, chunks.len() as u32);
                for c in chunks {
                    put_u64(out, *c);
                }
            }
            SyncFrame::ChunkDigests { req, digests } => {
                out.push(S_CHUNK_DIGESTS);
                put_u64(out, *req);
                put_u32(out, digests.len() as u32);
                for d in digests {
                    put_u64(out, d.chunk);
                    out.extend_from_slice(&d.strong);
                    out.push(u8::from(d.zero));
                }
            }
            SyncFrame::BlockDigestsReq { req, chunk } => {
                out.push(S_BLOCK_REQ);
                put_u64(out, *req);
                put_u64(out, *chunk);
            }
            SyncFrame::BlockDigests {
                req,
                chunk,
                digests,
            } => {
                out.push(S_BLOCK_DIGESTS);
                put_u64(out, *req);
                put_u64(out, *chunk);
                put_u32(out, digests.len() as u32);
                for d in digests {
                    put_u64(out, *d);
                }
            }
            SyncFrame::End { end_seq } => {
                out.push(S_END);
                put_u64(out, *end_seq);
            }
            SyncFrame::Ok => out.push(S_OK),
        }
    }

    fn decode(r: &mut Rd<'_>) -> Result<SyncFrame, FrameError> {
        let items = |r: &mut Rd<'_>| -> Result<usize, FrameError> {
            let n = r.u32()? as usize;
            if n > MAX_SYNC_ITEMS {
                return Err(corrupt("too many items in a sync frame"));
            }
            Ok(n)
        };
        Ok(match r.u8()? {
            S_HELLO => SyncFrame::Hello {
                host_name: r.string()?,
                disk_id: r.u64()?,
                size: r.u64()?,
                vpg_id: r.string()?,
                fencing_generation: r.u64()?,
            },
            S_INFO => SyncFrame::Info {
                size: r.u64()?,
                replica: ReplicaState::from_byte(r.u8()?)?,
                durable_seq: r.u64()?,
                running: Some(r.u8()?).filter(|&k| k != 0),
                // Optional trailing flags (absent from earlier builds, and when clear).
                journal_lost: match r.rest() {
                    [] => false,
                    [flags] if flags & !INFO_JOURNAL_LOST == 0 => {
                        let lost = flags & INFO_JOURNAL_LOST != 0;
                        r.take(1)?;
                        lost
                    }
                    _ => return Err(corrupt("bad Info flags")),
                },
            },
            S_BEGIN => SyncFrame::Begin {
                kind: r.u8()?,
                start_seq: r.u64()?,
                block_size: r.u32()?,
                chunk_blocks: r.u32()?,
            },
            S_CHUNK_REQ => {
                let req = r.u64()?;
                let n = items(r)?;
                let mut chunks = Vec::with_capacity(n);
                for _ in 0..n {
                    chunks.push(r.u64()?);
                }
                SyncFrame::ChunkDigestsReq { req, chunks }
            }
            S_CHUNK_DIGESTS => {
                let req = r.u64()?;
                let n = items(r)?;
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    let chunk = r.u64()?;
                    let mut strong = [0u8; 32];
                    strong.copy_from_slice(r.take(32)?);
                    let zero = match r.u8()? {
                        0 => false,
                        1 => true,
                        _ => return Err(corrupt("bad zero flag")),
                    };
                    digests.push(ChunkHash {
                        chunk,
                        strong,
                        zero,
                    });
                }
                SyncFrame::ChunkDigests { req, digests }
            }
            S_BLOCK_REQ => SyncFrame::BlockDigestsReq {
                req: r.u64()?,
                chunk: r.u64()?,
            },
            S_BLOCK_DIGESTS => {
                let req = r.u64()?;
                let chunk = r.u64()?;
                let n = items(r)?;
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.u64()?);
                }
                SyncFrame::BlockDigests {
                    req,
                    chunk,
                    digests,
                }
            }
            S_END => SyncFrame::End { end_seq: r.u64()? },
            S_OK => SyncFrame::Ok,
            other => return Err(corrupt(format!("unknown sync message {other}"))),
        })
    }
}

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_REFUSED: u8 = 3;
const T_WRITE: u8 = 4;
const T_ZERO: u8 = 5;
const T_TRIM: u8 = 6;
const T_CHECKPOINT: u8 = 7;
const T_ACK: u8 = 8;
const T_PING: u8 = 9;
const T_PONG: u8 = 10;
const T_SYNC: u8 = 11;

impl Frame {
    fn type_byte(&self) -> u8 {
        match self {
            Frame::Hello { .. } => T_HELLO,
            Frame::Welcome { .. } => T_WELCOME,
            Frame::Refused { .. } => T_REFUSED,
            Frame::Record(r) => match r.body {
                RecordBody::Write { .. } => T_WRITE,
                RecordBody::Zero { .. } => T_ZERO,
                RecordBody::Trim { .. } => T_TRIM,
                RecordBody::Checkpoint { .. } => T_CHECKPOINT,
            },
            Frame::Ack { .. } => T_ACK,
            Frame::Ping { .. } => T_PING,
            Frame::Pong { .. } => T_PONG,
            Frame::Sync(_) => T_SYNC,
        }
    }

    /// Appends the uncompressed payload of this frame to `out`.
    pub fn encode_payload(&self, out: &mut Vec<u8>) {
        match self {
            Frame::Hello {
                protocol_version,
                host_name,
                disks,
            } => {
                out.push(*protocol_version);
                put_str(out, host_name);
                put_u32(out, disks.len() as u32);
                for d in disks {
                    put_u64(out, d.disk_id);
                    put_u64(out, d.size);
                    put_u64(out, d.generation);
                    put_str(out, &d.vpg_id);
                    put_u64(out, d.fencing_generation);
                }
            }
            Frame::Welcome { disks, refused } => {
                put_acks(out, disks);
                put_u32(out, refused.len() as u32);
                for d in refused {
                    put_u64(out, d.disk_id);
                    out.push(u8::from(d.fenced));
                    put_str(out, &d.reason);
                }
            }
            Frame::Ack { disks } => put_acks(out, disks),
            Frame::Refused { reason } => put_str(out, reason),
            Frame::Record(r) => {
                put_u64(out, r.disk);
                put_u64(out, r.seq);
                put_u64(out, r.timestamp_ms as u64);
                match &r.body {
                    RecordBody::Write { offset, data } => {
                        put_u64(out, *offset);
                        out.extend_from_slice(data);
                    }
                    RecordBody::Zero { offset, len } | RecordBody::Trim { offset, len } => {
                        put_u64(out, *offset);
                        put_u64(out, *len);
                    }
                    RecordBody::Checkpoint { id, kind, tag } => {
                        put_u64(out, *id);
                        out.push(*kind);
                        match tag {
                            Some(t) => {
                                out.push(1);
                                put_str(out, t);
                            }
                            None => out.push(0),
                        }
                    }
                }
            }
            Frame::Ping { nonce, lag } => {
                put_u64(out, *nonce);
                put_u32(out, lag.len() as u32);
                for l in lag {
                    put_u64(out, l.disk_id);
                    put_u64(out, l.queued_records);
                    put_u64(out, l.queued_bytes);
                    put_u64(out, l.oldest_unacked_ms);
                }
            }
            Frame::Pong { nonce } => put_u64(out, *nonce),
            Frame::Sync(m) => m.encode(out),
        }
    }

    /// Appends the whole frame (header + possibly compressed payload) to `out`.
    /// `scratch` is a reusable buffer for the uncompressed payload. Compression is kept
    /// only for record frames it makes smaller.
    pub fn encode(
        &self,
        compression: Compression,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<(), FrameError> {
        scratch.clear();
        self.encode_payload(scratch);
        if scratch.len() > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(scratch.len() as u64));
        }
        let start = out.len();
        out.extend_from_slice(&[0u8; HEADER_LEN]);
        let mut comp = Compression::None;
        if compression != Compression::None
            && matches!(self, Frame::Record(_))
            && scratch.len() >= 256
        {
            put_u32(out, scratch.len() as u32);
            let before = out.len();
            let ok = match compression {
                Compression::Zstd => {
                    out.resize(before + zstd::zstd_safe::compress_bound(scratch.len()), 0);
                    match zstd::bulk::compress_to_buffer(scratch, &mut out[before..], 1) {
                        Ok(n) => {
                            out.truncate(before + n);
                            true
                        }
                        Err(_) => false,
                    }
                }
                Compression::Lz4 => {
                    out.resize(
                        before + lz4_flex::block::get_maximum_output_size(scratch.len()),
                        0,
                    );
                    match lz4_flex::block::compress_into(scratch, &mut out[before..]) {
                        Ok(n) => {
                            out.truncate(before + n);
                            true
                        }
                        Err(_) => false,
                    }
                }
                Compression::None => false,
            };
            if ok && out.len() - start - HEADER_LEN < scratch.len() {
                comp = compression;
            } else {
                out.truncate(start + HEADER_LEN);
            }
        }
        if comp == Compression::None {
            out.extend_from_slice(scratch);
        }
        let len = out.len() - start - HEADER_LEN;
        let h = &mut out[start..start + HEADER_LEN];
        h[0..2].copy_from_slice(&MAGIC);
        h[2] = PROTOCOL_VERSION;
        h[3] = self.type_byte();
        h[4] = comp.bits();
        h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&out[start..start + HEADER_LEN]),
            &out[start + HEADER_LEN..],
        );
        out[start + 12..start + 16].copy_from_slice(&crc.to_le_bytes());
        Ok(())
    }

    /// Convenience for tests and rare frames: a fresh buffer with one encoded frame.
    pub fn to_bytes(&self, compression: Compression) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::new();
        self.encode(compression, &mut Vec::new(), &mut out)?;
        Ok(out)
    }

    /// Checks whether a whole, valid frame starts at the cursor's position; returns its
    /// total length without consuming anything. `Incomplete` means "read more".
    pub fn check(src: &Cursor<&[u8]>) -> Result<usize, FrameError> {
        let buf = &src.get_ref()[src.position() as usize..];
        // Check what the bytes present can already refute, so garbage is refused at once
        // instead of waiting for a length that never arrives.
        if !buf.is_empty() && buf[0] != MAGIC[0] {
            return Err(corrupt("bad magic"));
        }
        if buf.len() >= 2 && buf[1] != MAGIC[1] {
            return Err(corrupt("bad magic"));
        }
        if buf.len() >= 3 && buf[2] != PROTOCOL_VERSION {
            return Err(corrupt(format!("unsupported frame version {}", buf[2])));
        }
        if buf.len() < HEADER_LEN {
            return Err(FrameError::Incomplete);
        }
        if !(T_HELLO..=T_SYNC).contains(&buf[3]) {
            return Err(corrupt(format!("unknown frame type {}", buf[3])));
        }
        if buf[4] > 2 || buf[5..8] != [0, 0, 0] {
            return Err(corrupt("bad flags"));
        }
        let len = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::TooLarge(len as u64));
        }
        if buf.len() < HEADER_LEN + len {
            return Err(FrameError::Incomplete);
        }
        let want = u32::from_le_bytes([buf[12], buf[13], buf[14], buf[15]]);
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&buf[..HEADER_LEN]);
        h[12..16].fill(0);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&h), &buf[HEADER_LEN..HEADER_LEN + len]);
        if crc != want {
            return Err(corrupt("CRC mismatch"));
        }
        Ok(HEADER_LEN + len)
    }

    /// Parses one frame at the cursor and advances past it. On `Incomplete` the cursor
    /// has not moved. `scratch` is reused for decompression.
    pub fn parse_with(src: &mut Cursor<&[u8]>, scratch: &mut Vec<u8>) -> Result<Frame, FrameError> {
        let total = Frame::check(src)?;
        let start = src.position() as usize;
        let buf = &src.get_ref()[start..start + total];
        let ty = buf[3];
        let wire = &buf[HEADER_LEN..];
        let payload: &[u8] = match buf[4] {
            0 => wire,
            bits => {
                if wire.len() < 4 {
                    return Err(corrupt("compressed payload without length"));
                }
                let n = u32::from_le_bytes([wire[0], wire[1], wire[2], wire[3]]) as usize;
                if n > MAX_FRAME_LEN {
                    return Err(FrameError::TooLarge(n as u64));
                }
                scratch.clear();
                scratch.resize(n, 0);
                let got = if bits == 1 {
                    zstd::bulk::decompress_to_buffer(&wire[4..], &mut scratch[..])
                        .map_err(|e| corrupt(format!("zstd: {e}")))?
                } else {
                    lz4_flex::block::decompress_into(&wire[4..], &mut scratch[..])
                        .map_err(|e| corrupt(format!("lz4: {e}")))?
                };
                if got != n {
                    return Err(corrupt("decompressed length mismatch"));
                }
                &scratch[..]
            }
        };
        let frame = decode_payload(ty, payload)?;
        src.set_position((start + total) as u64);
        Ok(frame)
    }

    /// [`Frame::parse_with`] with a fresh scratch buffer.
    pub fn parse(src: &mut Cursor<&[u8]>) -> Result<Frame, FrameError> {
        Frame::parse_with(src, &mut Vec::new())
    }
}

fn put_acks(out: &mut Vec<u8>, disks: &[DiskAck]) {
    put_u32(out, disks.len() as u32);
    for d in disks {
        put_u64(out, d.disk_id);
        put_u64(out, d.durable_seq);
    }
}
fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_str(out: &mut Vec<u8>, s: &str) {
    // Longer strings are cut (at a char boundary) rather than refused: they are names
    // and reasons, and the decoder bounds them anyway.
    let mut end = s.len().min(MAX_STR);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

/// A bounds-checked reader over a payload: running short is corruption (the frame's
/// length was already checked, so a short payload is never "incomplete").
struct Rd<'a> {
    b: &'a [u8],
}

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if self.b.len() < n {
            return Err(corrupt("payload too short"));
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, FrameError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, FrameError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, FrameError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, FrameError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn string(&mut self) -> Result<String, FrameError> {
        let n = self.u16()? as usize;
        if n > MAX_STR {
            return Err(corrupt("string too long"));
        }
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| corrupt("string is not UTF-8"))
    }
    fn count(&mut self) -> Result<usize, FrameError> {
        let n = self.u32()? as usize;
        if n > MAX_DISKS {
            return Err(corrupt("too many disks"));
        }
        Ok(n)
    }
    /// What is left of the payload, without consuming it.
    fn rest(&self) -> &'a [u8] {
        self.b
    }
    fn end(&self) -> Result<(), FrameError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(corrupt("trailing bytes in payload"))
        }
    }
}

fn decode_payload(ty: u8, payload: &[u8]) -> Result<Frame, FrameError> {
    let mut r = Rd { b: payload };
    let f = match ty {
        T_HELLO => {
            let protocol_version = r.u8()?;
            let host_name = r.string()?;
            let n = r.count()?;
            let mut disks = Vec::with_capacity(n);
            for _ in 0..n {
                disks.push(DiskHello {
                    disk_id: r.u64()?,
                    size: r.u64()?,
                    generation: r.u64()?,
                    vpg_id: r.string()?,
                    fencing_generation: r.u64()?,
                });
            }
            Frame::Hello {
                protocol_version,
                host_name,
                disks,
            }
        }
        T_WELCOME | T_ACK => {
            let n = r.count()?;
            let mut disks = Vec::with_capacity(n);
            for _ in 0..n {
                disks.push(DiskAck {
                    disk_id: r.u64()?,
                    durable_seq: r.u64()?,
                });
            }
            if ty == T_WELCOME {
                let n = r.count()?;
                let mut refused = Vec::with_capacity(n);
                for _ in 0..n {
                    refused.push(DiskRefused {
                        disk_id: r.u64()?,
                        fenced: match r.u8()? {
                            0 => false,
                            1 => true,
                            _ => return Err(corrupt("bad fenced flag")),
                        },
                        reason: r.string()?,
                    });
                }
                Frame::Welcome { disks, refused }
            } else {
                Frame::Ack { disks }
            }
        }
        T_REFUSED => Frame::Refused {
            reason: r.string()?,
        },
        T_WRITE..=T_CHECKPOINT => {
            let disk = r.u64()?;
            let seq = r.u64()?;
            let timestamp_ms = r.u64()? as i64;
            if seq == 0 {
                return Err(corrupt("record seq 0"));
            }
            let body = match ty {
                T_WRITE => {
                    let offset = r.u64()?;
                    let data = r.take(r.b.len())?;
                    if data.is_empty() {
                        return Err(corrupt("empty write"));
                    }
                    RecordBody::Write {
                        offset,
                        data: data.to_vec(),
                    }
                }
                T_ZERO => RecordBody::Zero {
                    offset: r.u64()?,
                    len: r.u64()?,
                },
                T_TRIM => RecordBody::Trim {
                    offset: r.u64()?,
                    len: r.u64()?,
                },
                _ => {
                    let id = r.u64()?;
                    let kind = r.u8()?;
                    let tag = match r.u8()? {
                        0 => None,
                        1 => Some(r.string()?),
                        _ => return Err(corrupt("bad tag flag")),
                    };
                    RecordBody::Checkpoint { id, kind, tag }
                }
            };
            Frame::Record(StreamRecord {
                disk,
                seq,
                timestamp_ms,
                body,
            })
        }
        T_PING => {
            let nonce = r.u64()?;
            let n = r.count()?;
            let mut lag = Vec::with_capacity(n);
            for _ in 0..n {
                lag.push(DiskLag {
                    disk_id: r.u64()?,
                    queued_records: r.u64()?,
                    queued_bytes: r.u64()?,
                    oldest_unacked_ms: r.u64()?,
                });
            }
            Frame::Ping { nonce, lag }
        }
        T_PONG => Frame::Pong { nonce: r.u64()? },
        T_SYNC => Frame::Sync(SyncFrame::decode(&mut r)?),
        other => return Err(corrupt(format!("unknown frame type {other}"))),
    };
    r.end()?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    fn arb_record() -> impl Strategy<Value = StreamRecord> {
        let body = prop_oneof![
            (any::<u64>(), prop::collection::vec(any::<u8>(), 1..600))
                .prop_map(|(offset, data)| RecordBody::Write { offset, data }),
            // Compressible data so compression actually engages.
            (any::<u64>(), 1usize..2000, any::<u8>()).prop_map(|(offset, n, b)| {
                RecordBody::Write {
                    offset,
                    data: vec![b; n],
                }
            }),
            (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| RecordBody::Zero { offset, len }),
            (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| RecordBody::Trim { offset, len }),
            (
                any::<u64>(),
                any::<u8>(),
                proptest::option::of("[a-zé ]{0,20}")
            )
                .prop_map(|(id, kind, tag)| RecordBody::Checkpoint { id, kind, tag }),
        ];
        (any::<u64>(), 1u64.., any::<i64>(), body).prop_map(|(disk, seq, timestamp_ms, body)| {
            StreamRecord {
                disk,
                seq,
                timestamp_ms,
                body,
            }
        })
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        let acks = prop::collection::vec(
            (any::<u64>(), any::<u64>()).prop_map(|(disk_id, durable_seq)| DiskAck {
                disk_id,
                durable_seq,
            }),
            0..5,
        );
        prop_oneof![
            (
                any::<u8>(),
                "[a-z0-9.-]{0,30}",
                prop::collection::vec(
                    (
                        any::<u64>(),
                        any::<u64>(),
                        any::<u64>(),
                        "[a-z0-9-]{0,20}",
                        any::<u64>()
                    )
                        .prop_map(|(a, b, c, v, f)| DiskHello {
                            disk_id: a,
                            size: b,
                            generation: c,
                            vpg_id: v,
                            fencing_generation: f,
                        }),
                    0..4
                )
            )
                .prop_map(|(v, h, d)| Frame::Hello {
                    protocol_version: v,
                    host_name: h,
                    disks: d
                }),
            (
                acks.clone(),
                prop::collection::vec(
                    (any::<u64>(), any::<bool>(), ".{0,40}").prop_map(
                        |(disk_id, fenced, reason)| {
                            DiskRefused {
                                disk_id,
                                fenced,
                                reason,
                            }
                        }
                    ),
                    0..3
                )
            )
                .prop_map(|(disks, refused)| Frame::Welcome { disks, refused }),
            acks.prop_map(|disks| Frame::Ack { disks }),
            ".{0,40}".prop_map(|reason| Frame::Refused { reason }),
            arb_record().prop_map(Frame::Record),
            (
                any::<u64>(),
                prop::collection::vec(any::<(u64, u64, u64, u64)>(), 0..3)
            )
                .prop_map(|(nonce, l)| Frame::Ping {
                    nonce,
                    lag: l
                        .into_iter()
                        .map(|(a, b, c, d)| DiskLag {
                            disk_id: a,
                            queued_records: b,
                            queued_bytes: c,
                            oldest_unacked_ms: d
                        })
                        .collect()
                }),
            any::<u64>().prop_map(|nonce| Frame::Pong { nonce }),
            arb_sync().prop_map(Frame::Sync),
        ]
    }

    fn arb_sync() -> impl Strategy<Value = SyncFrame> {
        prop_oneof![
            (
                "[a-z0-9.-]{0,30}",
                any::<u64>(),
                any::<u64>(),
                "[a-z0-9-]{0,20}",
                any::<u64>()
            )
                .prop_map(|(h, d, s, v, f)| SyncFrame::Hello {
                    host_name: h,
                    disk_id: d,
                    size: s,
                    vpg_id: v,
                    fencing_generation: f,
                }),
            (
                any::<u64>(),
                0u8..3,
                any::<u64>(),
                proptest::option::of(1u8..5),
                any::<bool>(),
            )
                .prop_map(|(size, r, durable_seq, running, journal_lost)| {
                    SyncFrame::Info {
                        size,
                        replica: ReplicaState::from_byte(r).unwrap(),
                        durable_seq,
                        running,
                        journal_lost,
                    }
                }),
            (any::<u8>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(k, s, b, c)| {
                SyncFrame::Begin {
                    kind: k,
                    start_seq: s,
                    block_size: b,
                    chunk_blocks: c,
                }
            }),
            (any::<u64>(), prop::collection::vec(any::<u64>(), 0..20))
                .prop_map(|(req, chunks)| SyncFrame::ChunkDigestsReq { req, chunks }),
            (
                any::<u64>(),
                prop::collection::vec((any::<u64>(), any::<[u8; 32]>(), any::<bool>()), 0..5)
            )
                .prop_map(|(req, d)| SyncFrame::ChunkDigests {
                    req,
                    digests: d
                        .into_iter()
                        .map(|(chunk, strong, zero)| ChunkHash {
                            chunk,
                            strong,
                            zero
                        })
                        .collect()
                }),
            (any::<u64>(), any::<u64>())
                .prop_map(|(req, chunk)| SyncFrame::BlockDigestsReq { req, chunk }),
            (
                any::<u64>(),
                any::<u64>(),
                prop::collection::vec(any::<u64>(), 0..40)
            )
                .prop_map(|(req, chunk, digests)| SyncFrame::BlockDigests {
                    req,
                    chunk,
                    digests
                }),
            any::<u64>().prop_map(|end_seq| SyncFrame::End { end_seq }),
            Just(SyncFrame::Ok),
        ]
    }

    fn arb_comp() -> impl Strategy<Value = Compression> {
        prop_oneof![
            Just(Compression::None),
            Just(Compression::Zstd),
            Just(Compression::Lz4)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        #[test]
        fn round_trip(frames in prop::collection::vec(arb_frame(), 1..5), comp in arb_comp()) {
            let mut buf = Vec::new();
            let mut scratch = Vec::new();
            for f in &frames {
                f.encode(comp, &mut scratch, &mut buf).unwrap();
            }
            let mut c = Cursor::new(&buf[..]);
            for f in &frames {
                prop_assert_eq!(&Frame::parse_with(&mut c, &mut scratch).unwrap(), f);
            }
            prop_assert_eq!(c.position() as usize, buf.len());
            prop_assert_eq!(Frame::parse(&mut c), Err(FrameError::Incomplete));
        }

        #[test]
        fn every_corruption_and_truncation_detected(f in arb_frame(), comp in arb_comp(), flip in 1u8..) {
            let bytes = f.to_bytes(comp).unwrap();
            for cut in 0..bytes.len() {
                let mut c = Cursor::new(&bytes[..cut]);
                prop_assert_eq!(Frame::parse(&mut c), Err(FrameError::Incomplete));
                prop_assert_eq!(c.position(), 0);
            }
            for i in 0..bytes.len() {
                let mut b = bytes.clone();
                b[i] ^= flip;
                let mut c = Cursor::new(&b[..]);
                match Frame::parse(&mut c) {
                    Err(FrameError::Corrupt(_)) | Err(FrameError::Incomplete) | Err(FrameError::TooLarge(_)) => {}
                    Ok(g) => prop_assert!(false, "byte {} flipped decoded as {:?}", i, g),
                }
            }
        }
    }

    #[test]
    fn oversized_header_is_refused_without_allocation() {
        let mut b = Frame::Pong { nonce: 1 }
            .to_bytes(Compression::None)
            .unwrap();
        b[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut c = Cursor::new(&b[..]);
        assert_eq!(
            Frame::parse(&mut c),
            Err(FrameError::TooLarge(u32::MAX as u64))
        );
    }

    #[test]
    fn a_version_1_peer_is_refused_clearly() {
        let mut b = Frame::Pong { nonce: 1 }
            .to_bytes(Compression::None)
            .unwrap();
        assert_eq!(b[2], PROTOCOL_VERSION);
        b[2] = 1;
        let mut c = Cursor::new(&b[..]);
        match Frame::parse(&mut c) {
            Err(FrameError::Corrupt(why)) => assert!(why.contains("version 1"), "{why}"),
            other => panic!("expected a version refusal, got {other:?}"),
        }
    }

    #[test]
    fn fencing_travels_in_hellos_and_welcome() {
        let frames = [
            Frame::Hello {
                protocol_version: PROTOCOL_VERSION,
                host_name: "a".into(),
                disks: vec![DiskHello {
                    disk_id: 7,
                    size: 4096,
                    generation: 3,
                    vpg_id: "vpg-1".into(),
                    fencing_generation: 2,
                }],
            },
            Frame::Welcome {
                disks: vec![DiskAck {
                    disk_id: 8,
                    durable_seq: 5,
                }],
                refused: vec![DiskRefused {
                    disk_id: 7,
                    fenced: true,
                    reason: "fenced: VPG vpg-1".into(),
                }],
            },
            Frame::Sync(SyncFrame::Hello {
                host_name: "a".into(),
                disk_id: 7,
                size: 4096,
                vpg_id: "vpg-1".into(),
                fencing_generation: 2,
            }),
        ];
        for f in frames {
            let b = f.to_bytes(Compression::Zstd).unwrap();
            assert_eq!(Frame::parse(&mut Cursor::new(&b[..])).unwrap(), f);
        }
        // A fenced flag other than 0/1 is corrupt, not "true".
        let mut p = Vec::new();
        Frame::Welcome {
            disks: vec![],
            refused: vec![DiskRefused {
                disk_id: 1,
                fenced: true,
                reason: String::new(),
            }],
        }
        .encode_payload(&mut p);
        p[4 + 4 + 8] = 2;
        assert!(matches!(
            decode_payload(T_WELCOME, &p),
            Err(FrameError::Corrupt(_))
        ));
    }

    #[test]
    fn info_carries_journal_loss_as_an_optional_trailing_flag() {
        let info = |journal_lost| {
            Frame::Sync(SyncFrame::Info {
                size: 4096,
                replica: ReplicaState::Existing,
                durable_seq: 9,
                running: None,
                journal_lost,
            })
        };
        let mut clear = Vec::new();
        info(false).encode_payload(&mut clear);
        let mut lost = Vec::new();
        info(true).encode_payload(&mut lost);
        // Unset, the bytes are those of earlier builds (type, size, replica, seq, running).
        assert_eq!(clear.len(), 1 + 8 + 1 + 8 + 1);
        assert_eq!(lost.len(), clear.len() + 1);
        assert_eq!(&lost[..clear.len()], &clear[..]);
        assert_eq!(decode_payload(T_SYNC, &clear).unwrap(), info(false));
        assert_eq!(decode_payload(T_SYNC, &lost).unwrap(), info(true));
        // Unknown flag bits, or more bytes, are corrupt.
        let mut bad = clear.clone();
        bad.push(2);
        assert!(matches!(
            decode_payload(T_SYNC, &bad),
            Err(FrameError::Corrupt(_))
        ));
        lost.push(0);
        assert!(matches!(
            decode_payload(T_SYNC, &lost),
            Err(FrameError::Corrupt(_))
        ));
    }

    #[test]
    fn garbage_is_corrupt_at_once() {
        // A TLS ClientHello where a frame is expected (insecure server, TLS client).
        let mut c = Cursor::new(&[0x16u8, 0x03, 0x01][..]);
        assert!(matches!(Frame::parse(&mut c), Err(FrameError::Corrupt(_))));
    }
}
