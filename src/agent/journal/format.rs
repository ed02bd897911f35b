//! The on-disk encodings: record header, segment header, checkpoint payload, state file.
//!
//! All integers are little-endian. Every structure starts with a magic and a format
//! version and is covered by a CRC32C, so a reader never trusts bytes it cannot check.
//!
//! Record (64-byte header, then `stored_len` payload bytes, then zero padding to 8):
//!
//! | off | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `BJRN` |
//! | 4 | 2 | format version (1) |
//! | 6 | 1 | kind: 1 write, 2 zero, 3 trim, 4 checkpoint |
//! | 7 | 1 | flags: bit 0 = payload is one zstd frame |
//! | 8 | 8 | sequence number (strictly increasing per disk) |
//! | 16 | 8 | disk id |
//! | 24 | 8 | disk offset (0 for checkpoints) |
//! | 32 | 8 | logical length (0 for checkpoints) |
//! | 40 | 8 | timestamp, unix ms (the wall time for checkpoints) |
//! | 48 | 8 | durable hint: highest durable seq when the record was written |
//! | 56 | 4 | stored payload length |
//! | 60 | 4 | CRC32C of the header (this field zero) and the stored payload |
//!
//! The durable hint lets recovery tell a torn tail (nothing after the damage was ever
//! durable) from damage to acknowledged data (a later valid record says it was durable).

use super::{CheckpointInfo, CheckpointKind};

pub(crate) const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"BJRN");
pub(crate) const SEGMENT_MAGIC: u32 = u32::from_le_bytes(*b"BJSG");
pub(crate) const STATE_MAGIC: u32 = u32::from_le_bytes(*b"BJST");
pub(crate) const SCRATCH_MAGIC: u32 = u32::from_le_bytes(*b"BJSC");
pub(crate) const FORMAT_VERSION: u16 = 1;

pub(crate) const HEADER_LEN: usize = 64;
pub(crate) const SEGMENT_HEADER_LEN: usize = 32;
/// Longest tag accepted on a checkpoint.
pub const MAX_TAG_LEN: usize = 1024;
/// Longest logical length of one write record (the header could say more; a bound keeps
/// one record's buffer sane).
pub const MAX_WRITE_LEN: u64 = u32::MAX as u64;

pub(crate) const FLAG_COMPRESSED: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Write = 1,
    Zero = 2,
    Trim = 3,
    Checkpoint = 4,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        match v {
            1 => Some(Kind::Write),
            2 => Some(Kind::Zero),
            3 => Some(Kind::Trim),
            4 => Some(Kind::Checkpoint),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Header {
    pub kind: Kind,
    pub flags: u8,
    pub seq: u64,
    pub disk: u64,
    pub offset: u64,
    pub length: u64,
    pub timestamp: i64,
    pub durable: u64,
    pub stored_len: u32,
    pub crc: u32,
}

/// Bytes one record takes in a segment, padding included.
pub(crate) fn record_len(stored_len: u32) -> u64 {
    (HEADER_LEN as u64 + u64::from(stored_len) + 7) & !7
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_le_bytes(a)
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Encodes with the CRC field as stored in `self.crc`.
    pub(crate) fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        out[6] = self.kind as u8;
        out[7] = self.flags;
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.disk.to_le_bytes());
        out[24..32].copy_from_slice(&self.offset.to_le_bytes());
        out[32..40].copy_from_slice(&self.length.to_le_bytes());
        out[40..48].copy_from_slice(&self.timestamp.to_le_bytes());
        out[48..56].copy_from_slice(&self.durable.to_le_bytes());
        out[56..60].copy_from_slice(&self.stored_len.to_le_bytes());
        out[60..64].copy_from_slice(&self.crc.to_le_bytes());
    }

    /// Encodes and fills in the CRC over the header and `payload`.
    pub(crate) fn seal(&mut self, payload: &[u8], out: &mut [u8; HEADER_LEN]) {
        self.crc = 0;
        self.encode(out);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&out[..]), payload);
        self.crc = crc;
        out[60..64].copy_from_slice(&crc.to_le_bytes());
    }

    /// Decodes and checks everything that can be checked without the payload.
    pub(crate) fn decode(b: &[u8]) -> Result<Header, &'static str> {
        if b.len() < HEADER_LEN {
            return Err("short header");
        }
        if u32_at(b, 0) != RECORD_MAGIC {
            return Err("bad record magic");
        }
        if u16_at(b, 4) != FORMAT_VERSION {
            return Err("unknown record format version");
        }
        let kind = Kind::from_u8(b[6]).ok_or("unknown record kind")?;
        let h = Header {
            kind,
            flags: b[7],
            seq: u64_at(b, 8),
            disk: u64_at(b, 16),
            offset: u64_at(b, 24),
            length: u64_at(b, 32),
            timestamp: u64_at(b, 40) as i64,
            durable: u64_at(b, 48),
            stored_len: u32_at(b, 56),
            crc: u32_at(b, 60),
        };
        if h.flags & !FLAG_COMPRESSED != 0 {
            return Err("unknown record flags");
        }
        match kind {
            Kind::Write => {
                if h.length == 0 || h.length > MAX_WRITE_LEN || h.stored_len == 0 {
                    return Err("bad write length");
                }
                if h.flags & FLAG_COMPRESSED == 0 && u64::from(h.stored_len) != h.length {
                    return Err("stored length differs from length");
                }
            }
            Kind::Zero | Kind::Trim => {
                if h.length == 0 || h.stored_len != 0 || h.flags != 0 {
                    return Err("bad zero/trim record");
                }
            }
            Kind::Checkpoint => {
                if h.length != 0 || h.flags != 0 || (h.stored_len as usize) < CKPT_FIXED {
                    return Err("bad checkpoint record");
                }
            }
        }
        if h.offset.checked_add(h.length).is_none() {
            return Err("range overflows");
        }
        Ok(h)
    }

    /// Checks the CRC of an encoded header `b` (as read, CRC field included) and payload.
    pub(crate) fn crc_ok(b: &[u8], payload: &[u8]) -> bool {
        let mut hdr = [0u8; HEADER_LEN];
        hdr.copy_from_slice(&b[..HEADER_LEN]);
        let stored = u32_at(&hdr, 60);
        hdr[60..64].fill(0);
        crc32c::crc32c_append(crc32c::crc32c(&hdr), payload) == stored
    }
}

const CKPT_FIXED: usize = 8 + 1 + 2;

pub(crate) fn encode_checkpoint(
    id: u64,
    kind: CheckpointKind,
    tag: Option<&str>,
    out: &mut Vec<u8>,
) {
    out.clear();
    out.extend_from_slice(&id.to_le_bytes());
    out.push(kind as u8);
    let tag = tag.unwrap_or("");
    out.extend_from_slice(&(tag.len() as u16).to_le_bytes());
    out.extend_from_slice(tag.as_bytes());
}

/// Decodes a checkpoint payload; `seq` and `wall_ms` come from the header.
pub(crate) fn decode_checkpoint(
    p: &[u8],
    seq: u64,
    wall_ms: i64,
) -> Result<CheckpointInfo, &'static str> {
    if p.len() < CKPT_FIXED {
        return Err("short checkpoint payload");
    }
    let id = u64_at(p, 0);
    let kind = CheckpointKind::from_u8(p[8]).ok_or("unknown checkpoint kind")?;
    let tag_len = u16_at(p, 9) as usize;
    if p.len() != CKPT_FIXED + tag_len {
        return Err("checkpoint tag length mismatch");
    }
    let tag = if tag_len == 0 {
        None
    } else {
        Some(
            std::str::from_utf8(&p[CKPT_FIXED..])
                .map_err(|_| "checkpoint tag is not UTF-8")?
                .to_string(),
        )
    };
    Ok(CheckpointInfo {
        id,
        seq,
        wall_ms,
        kind,
        tag,
    })
}

/// The 32-byte header at the start of every segment file.
pub(crate) fn encode_segment_header(disk: u64, segment: u32) -> [u8; SEGMENT_HEADER_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    b[0..4].copy_from_slice(&SEGMENT_MAGIC.to_le_bytes());
    b[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[8..16].copy_from_slice(&disk.to_le_bytes());
    b[16..20].copy_from_slice(&segment.to_le_bytes());
    let crc = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    b
}

pub(crate) fn check_segment_header(b: &[u8], disk: u64, segment: u32) -> Result<(), &'static str> {
    if b.len() < SEGMENT_HEADER_LEN {
        return Err("short segment header");
    }
    if u32_at(b, 0) != SEGMENT_MAGIC {
        return Err("bad segment magic");
    }
    if crc32c::crc32c(&b[..28]) != u32_at(b, 28) {
        return Err("bad segment header CRC");
    }
    if u16_at(b, 4) != FORMAT_VERSION {
        return Err("unknown segment format version");
    }
    if u64_at(b, 8) != disk {
        return Err("segment belongs to another disk");
    }
    if u32_at(b, 16) != segment {
        return Err("segment id differs from its file name");
    }
    Ok(())
}

/// What the promoter is in the middle of, as recorded in the state file before it touches
/// the replica. Redone on open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Intent {
    None,
    /// Apply every record ≤ `ckpt.seq` to the replica.
    Promote {
        ckpt: CheckpointInfo,
    },
    /// Commit at `ckpt`: apply records ≤ it, then the scratch of view `view` (if it left
    /// a map file), then drop every segment. `floor` is the highest seq ever accepted,
    /// kept so resent records stay de-duplicated after the journal is emptied.
    CommitApply {
        ckpt: CheckpointInfo,
        view: u64,
        floor: u64,
    },
    /// The replica holds the commit; what is left is deleting segments and scratch.
    CommitClean {
        ckpt: CheckpointInfo,
        view: u64,
        floor: u64,
    },
}

/// The crash-safe state file `journal.state`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StateFile {
    pub disk: u64,
    /// Every record with seq ≤ this is in the replica.
    pub promoted_seq: u64,
    /// Records with seq ≤ this are duplicates even if the journal no longer holds them.
    pub seq_floor: u64,
    /// The checkpoint the replica is at (the oldest retained one), if any.
    pub base: Option<CheckpointInfo>,
    pub intent: Intent,
}

fn put_ckpt(out: &mut Vec<u8>, c: Option<&CheckpointInfo>) {
    match c {
        None => out.push(0),
        Some(c) => {
            out.push(1);
            out.extend_from_slice(&c.seq.to_le_bytes());
            out.extend_from_slice(&c.wall_ms.to_le_bytes());
            let mut p = Vec::new();
            encode_checkpoint(c.id, c.kind, c.tag.as_deref(), &mut p);
            out.extend_from_slice(&(p.len() as u32).to_le_bytes());
            out.extend_from_slice(&p);
        }
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        let end = self.at.checked_add(n).ok_or("state file truncated")?;
        let s = self.b.get(self.at..end).ok_or("state file truncated")?;
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, &'static str> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, &'static str> {
        Ok(u32_at(self.take(4)?, 0))
    }
    fn u64(&mut self) -> Result<u64, &'static str> {
        Ok(u64_at(self.take(8)?, 0))
    }
    fn ckpt(&mut self) -> Result<Option<CheckpointInfo>, &'static str> {
        if self.u8()? == 0 {
            return Ok(None);
        }
        let seq = self.u64()?;
        let wall = self.u64()? as i64;
        let n = self.u32()? as usize;
        let p = self.take(n)?;
        decode_checkpoint(p, seq, wall).map(Some)
    }
}

impl StateFile {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&STATE_MAGIC.to_le_bytes());
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        let (kind, ckpt, view, floor) = match &self.intent {
            Intent::None => (0u8, None, 0, 0),
            Intent::Promote { ckpt } => (1, Some(ckpt), 0, 0),
            Intent::CommitApply { ckpt, view, floor } => (2, Some(ckpt), *view, *floor),
            Intent::CommitClean { ckpt, view, floor } => (3, Some(ckpt), *view, *floor),
        };
        out.push(kind);
        out.push(0);
        out.extend_from_slice(&self.disk.to_le_bytes());
        out.extend_from_slice(&self.promoted_seq.to_le_bytes());
        out.extend_from_slice(&self.seq_floor.to_le_bytes());
        put_ckpt(&mut out, self.base.as_ref());
        out.extend_from_slice(&view.to_le_bytes());
        out.extend_from_slice(&floor.to_le_bytes());
        put_ckpt(&mut out, ckpt);
        let crc = crc32c::crc32c(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    pub(crate) fn decode(b: &[u8]) -> Result<StateFile, &'static str> {
        if b.len() < 12 {
            return Err("state file too short");
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body) != u32_at(crc, 0) {
            return Err("state file CRC mismatch");
        }
        let mut c = Cursor { b: body, at: 0 };
        if c.u32()? != STATE_MAGIC {
            return Err("bad state file magic");
        }
        if u16_at(c.take(2)?, 0) != FORMAT_VERSION {
            return Err("unknown state file version");
        }
        let kind = c.u8()?;
        c.u8()?;
        let disk = c.u64()?;
        let promoted_seq = c.u64()?;
        let seq_floor = c.u64()?;
        let base = c.ckpt()?;
        let view = c.u64()?;
        let floor = c.u64()?;
        let ckpt = c.ckpt()?;
        let intent = match (kind, ckpt) {
            (0, None) => Intent::None,
            (1, Some(ckpt)) => Intent::Promote { ckpt },
            (2, Some(ckpt)) => Intent::CommitApply { ckpt, view, floor },
            (3, Some(ckpt)) => Intent::CommitClean { ckpt, view, floor },
            _ => return Err("bad intent in state file"),
        };
        if c.at != body.len() {
            return Err("trailing bytes in state file");
        }
        Ok(StateFile {
            disk,
            promoted_seq,
            seq_floor,
            base,
            intent,
        })
    }
}

/// The map of a view's scratch layer, written when the view is committed so a crash in
/// the middle of the commit can redo it: `(start, end)` byte ranges, sorted, disjoint.
pub(crate) fn encode_scratch_map(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(16 + ranges.len() * 16);
    out.extend_from_slice(&SCRATCH_MAGIC.to_le_bytes());
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
    for (s, e) in ranges {
        out.extend_from_slice(&s.to_le_bytes());
        out.extend_from_slice(&e.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

pub(crate) fn decode_scratch_map(b: &[u8]) -> Result<Vec<(u64, u64)>, &'static str> {
    if b.len() < 20 {
        return Err("scratch map too short");
    }
    let (body, crc) = b.split_at(b.len() - 4);
    if crc32c::crc32c(body) != u32_at(crc, 0) {
        return Err("scratch map CRC mismatch");
    }
    let mut c = Cursor { b: body, at: 0 };
    if c.u32()? != SCRATCH_MAGIC || u16_at(c.take(2)?, 0) != FORMAT_VERSION {
        return Err("bad scratch map header");
    }
    c.take(2)?;
    let n = c.u64()?;
    if n.checked_mul(16) != Some((body.len() - c.at) as u64) {
        return Err("scratch map length mismatch");
    }
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let s = c.u64()?;
        let e = c.u64()?;
        if e <= s {
            return Err("empty scratch range");
        }
        v.push((s, e));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_crc() {
        let payload = b"hello world";
        let mut h = Header {
            kind: Kind::Write,
            flags: 0,
            seq: 7,
            disk: 3,
            offset: 4096,
            length: payload.len() as u64,
            timestamp: 1_700_000_000_000,
            durable: 6,
            stored_len: payload.len() as u32,
            crc: 0,
        };
        let mut b = [0u8; HEADER_LEN];
        h.seal(payload, &mut b);
        let d = Header::decode(&b).unwrap();
        assert_eq!(d, h);
        assert!(Header::crc_ok(&b, payload));
        assert!(!Header::crc_ok(&b, b"hello worle"));
        let mut bad = b;
        bad[30] ^= 1;
        assert!(!Header::crc_ok(&bad, payload));
        assert_eq!(record_len(11), 80);
        assert_eq!(record_len(0), 64);
    }

    #[test]
    fn state_round_trip() {
        let c = CheckpointInfo {
            id: 9,
            seq: 100,
            wall_ms: 5,
            kind: CheckpointKind::UserTagged,
            tag: Some("before upgrade".into()),
        };
        for intent in [
            Intent::None,
            Intent::Promote { ckpt: c.clone() },
            Intent::CommitApply {
                ckpt: c.clone(),
                view: 4,
                floor: 200,
            },
            Intent::CommitClean {
                ckpt: c.clone(),
                view: 4,
                floor: 200,
            },
        ] {
            let s = StateFile {
                disk: 1,
                promoted_seq: 50,
                seq_floor: 60,
                base: Some(c.clone()),
                intent,
            };
            let b = s.encode();
            assert_eq!(StateFile::decode(&b).unwrap(), s);
            let mut bad = b.clone();
            bad[20] ^= 0x10;
            assert!(StateFile::decode(&bad).is_err());
        }
    }

    #[test]
    fn scratch_map_round_trip() {
        let r = vec![(0, 10), (4096, 8192)];
        assert_eq!(decode_scratch_map(&encode_scratch_map(&r)).unwrap(), r);
    }
}
