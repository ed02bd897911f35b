//! The sync protocol's messages and their byte encoding (tag byte, little-endian fields,
//! u32 counts). The engine counts `wire_len() + FRAME_OVERHEAD` per message, so its byte
//! statistics are what the framed stream will carry (before optional compression).

use super::plan::Extent;
use super::SyncError;

/// Bytes a frame header adds per message on the replication connection (length prefix).
pub const FRAME_OVERHEAD: u64 = 4;

/// One protocol message. Source → target: `Start`, `Compare`, `Data`, `Zero`, `ChunkEnd`,
/// `Mark`, `Finish`. Target → source: the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncMsg {
    /// Opens (or resumes) sync `id`; `extents` only for a ranged Delta, whose target
    /// must know what to hash. `plan` fingerprints the work so a resume with a different
    /// plan starts over.
    Start {
        id: u64,
        kind: u8,
        size: u64,
        block_size: u32,
        chunk_blocks: u32,
        plan: u64,
        extents: Vec<Extent>,
    },
    /// The source's verdict on the oldest outstanding digest batch: these chunks differ.
    Compare {
        differing: Vec<u64>,
    },
    Data {
        offset: u64,
        data: Vec<u8>,
    },
    Zero {
        offset: u64,
        len: u64,
    },
    /// Everything of this chunk has been sent; the target re-hashes and compares.
    ChunkEnd {
        chunk: u64,
        strong: [u8; 32],
    },
    /// Bitmap: everything below `upto` has been sent.
    Mark {
        upto: u64,
    },
    Finish,
    Accept {
        resume_from: u64,
        known_zero: bool,
    },
    Refuse {
        target_size: u64,
    },
    /// Level-1 digests of the target's next chunks; `last` ends the stream.
    ChunkDigests {
        digests: Vec<(u64, [u8; 32])>,
        last: bool,
    },
    /// Level-2 digests of one chunk of the target.
    BlockDigests {
        chunk: u64,
        digests: Vec<u64>,
    },
    /// Outcome of a `ChunkEnd`; `durable` is the target's persisted cursor.
    Verified {
        chunk: u64,
        ok: bool,
        durable: u64,
    },
    Marked {
        upto: u64,
        durable: u64,
    },
    Done {
        cursor: u64,
    },
}

mod tag {
    pub const START: u8 = 1;
    pub const COMPARE: u8 = 2;
    pub const DATA: u8 = 3;
    pub const ZERO: u8 = 4;
    pub const CHUNK_END: u8 = 5;
    pub const MARK: u8 = 6;
    pub const FINISH: u8 = 7;
    pub const ACCEPT: u8 = 16;
    pub const REFUSE: u8 = 17;
    pub const CHUNK_DIGESTS: u8 = 18;
    pub const BLOCK_DIGESTS: u8 = 19;
    pub const VERIFIED: u8 = 20;
    pub const MARKED: u8 = 21;
    pub const DONE: u8 = 22;
}

impl SyncMsg {
    /// True for messages the source sends.
    pub fn from_source(&self) -> bool {
        matches!(
            self,
            SyncMsg::Start { .. }
                | SyncMsg::Compare { .. }
                | SyncMsg::Data { .. }
                | SyncMsg::Zero { .. }
                | SyncMsg::ChunkEnd { .. }
                | SyncMsg::Mark { .. }
                | SyncMsg::Finish
        )
    }

    /// Exactly `self.encode()`'s length, without encoding.
    pub fn wire_len(&self) -> u64 {
        1 + match self {
            SyncMsg::Start { extents, .. } => 8 + 1 + 8 + 4 + 4 + 8 + 4 + 16 * extents.len() as u64,
            SyncMsg::Compare { differing } => 4 + 8 * differing.len() as u64,
            SyncMsg::Data { data, .. } => 8 + 4 + data.len() as u64,
            SyncMsg::Zero { .. } => 16,
            SyncMsg::ChunkEnd { .. } => 8 + 32,
            SyncMsg::Mark { .. } => 8,
            SyncMsg::Finish => 0,
            SyncMsg::Accept { .. } => 9,
            SyncMsg::Refuse { .. } => 8,
            SyncMsg::ChunkDigests { digests, .. } => 1 + 4 + 40 * digests.len() as u64,
            SyncMsg::BlockDigests { digests, .. } => 8 + 4 + 8 * digests.len() as u64,
            SyncMsg::Verified { .. } => 8 + 1 + 8,
            SyncMsg::Marked { .. } => 16,
            SyncMsg::Done { .. } => 8,
        }
    }

    /// Appends the encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        fn u64_(out: &mut Vec<u8>, v: u64) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        fn u32_(out: &mut Vec<u8>, v: u32) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        fn count(out: &mut Vec<u8>, n: usize) {
            u32_(out, u32::try_from(n).unwrap_or(u32::MAX));
        }
        match self {
            SyncMsg::Start {
                id,
                kind,
                size,
                block_size,
                chunk_blocks,
                plan,
                extents,
            } => {
                out.push(tag::START);
                u64_(out, *id);
                out.push(*kind);
                u64_(out, *size);
                u32_(out, *block_size);
                u32_(out, *chunk_blocks);
                u64_(out, *plan);
                count(out, extents.len());
                for e in extents {
                    u64_(out, e.offset);
                    u64_(out, e.len);
                }
            }
            SyncMsg::Compare { differing } => {
                out.push(tag::COMPARE);
                count(out, differing.len());
                for c in differing {
                    u64_(out, *c);
                }
            }
            SyncMsg::Data { offset, data } => {
                out.push(tag::DATA);
                u64_(out, *offset);
                count(out, data.len());
                out.extend_from_slice(data);
            }
            SyncMsg::Zero { offset, len } => {
                out.push(tag::ZERO);
                u64_(out, *offset);
                u64_(out, *len);
            }
            SyncMsg::ChunkEnd { chunk, strong } => {
                out.push(tag::CHUNK_END);
                u64_(out, *chunk);
                out.extend_from_slice(strong);
            }
            SyncMsg::Mark { upto } => {
                out.push(tag::MARK);
                u64_(out, *upto);
            }
            SyncMsg::Finish => out.push(tag::FINISH),
            SyncMsg::Accept {
                resume_from,
                known_zero,
            } => {
                out.push(tag::ACCEPT);
                u64_(out, *resume_from);
                out.push(u8::from(*known_zero));
            }
            SyncMsg::Refuse { target_size } => {
                out.push(tag::REFUSE);
                u64_(out, *target_size);
            }
            SyncMsg::ChunkDigests { digests, last } => {
                out.push(tag::CHUNK_DIGESTS);
                out.push(u8::from(*last));
                count(out, digests.len());
                for (c, d) in digests {
                    u64_(out, *c);
                    out.extend_from_slice(d);
                }
            }
            SyncMsg::BlockDigests { chunk, digests } => {
                out.push(tag::BLOCK_DIGESTS);
                u64_(out, *chunk);
                count(out, digests.len());
                for d in digests {
                    u64_(out, *d);
                }
            }
            SyncMsg::Verified { chunk, ok, durable } => {
                out.push(tag::VERIFIED);
                u64_(out, *chunk);
                out.push(u8::from(*ok));
                u64_(out, *durable);
            }
            SyncMsg::Marked { upto, durable } => {
                out.push(tag::MARKED);
                u64_(out, *upto);
                u64_(out, *durable);
            }
            SyncMsg::Done { cursor } => {
                out.push(tag::DONE);
                u64_(out, *cursor);
            }
        }
    }

    /// Decodes one whole message (the frame's payload).
    pub fn decode(bytes: &[u8]) -> Result<SyncMsg, SyncError> {
        let mut r = Reader(bytes);
        let msg = match r.u8()? {
            tag::START => {
                let id = r.u64()?;
                let kind = r.u8()?;
                let size = r.u64()?;
                let block_size = r.u32()?;
                let chunk_blocks = r.u32()?;
                let plan = r.u64()?;
                let n = r.count(16)?;
                let mut extents = Vec::with_capacity(n);
                for _ in 0..n {
                    extents.push(Extent {
                        offset: r.u64()?,
                        len: r.u64()?,
                    });
                }
                SyncMsg::Start {
                    id,
                    kind,
                    size,
                    block_size,
                    chunk_blocks,
                    plan,
                    extents,
                }
            }
            tag::COMPARE => {
                let n = r.count(8)?;
                let mut differing = Vec::with_capacity(n);
                for _ in 0..n {
                    differing.push(r.u64()?);
                }
                SyncMsg::Compare { differing }
            }
            tag::DATA => {
                let offset = r.u64()?;
                let n = r.count(1)?;
                SyncMsg::Data {
                    offset,
                    data: r.take(n)?.to_vec(),
                }
            }
            tag::ZERO => SyncMsg::Zero {
                offset: r.u64()?,
                len: r.u64()?,
            },
            tag::CHUNK_END => SyncMsg::ChunkEnd {
                chunk: r.u64()?,
                strong: r.digest()?,
            },
            tag::MARK => SyncMsg::Mark { upto: r.u64()? },
            tag::FINISH => SyncMsg::Finish,
            tag::ACCEPT => SyncMsg::Accept {
                resume_from: r.u64()?,
                known_zero: r.bool()?,
            },
            tag::REFUSE => SyncMsg::Refuse {
                target_size: r.u64()?,
            },
            tag::CHUNK_DIGESTS => {
                let last = r.bool()?;
                let n = r.count(40)?;
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push((r.u64()?, r.digest()?));
                }
                SyncMsg::ChunkDigests { digests, last }
            }
            tag::BLOCK_DIGESTS => {
                let chunk = r.u64()?;
                let n = r.count(8)?;
                let mut digests = Vec::with_capacity(n);
                for _ in 0..n {
                    digests.push(r.u64()?);
                }
                SyncMsg::BlockDigests { chunk, digests }
            }
            tag::VERIFIED => SyncMsg::Verified {
                chunk: r.u64()?,
                ok: r.bool()?,
                durable: r.u64()?,
            },
            tag::MARKED => SyncMsg::Marked {
                upto: r.u64()?,
                durable: r.u64()?,
            },
            tag::DONE => SyncMsg::Done { cursor: r.u64()? },
            _ => return Err(SyncError::Decode("unknown message tag")),
        };
        if !r.0.is_empty() {
            return Err(SyncError::Decode("trailing bytes"));
        }
        Ok(msg)
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SyncError> {
        if self.0.len() < n {
            return Err(SyncError::Decode("truncated message"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, SyncError> {
        Ok(self.take(1)?[0])
    }
    fn bool(&mut self) -> Result<bool, SyncError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(SyncError::Decode("bad boolean")),
        }
    }
    fn u32(&mut self) -> Result<u32, SyncError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }
    fn u64(&mut self) -> Result<u64, SyncError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }
    fn digest(&mut self) -> Result<[u8; 32], SyncError> {
        let mut b = [0u8; 32];
        b.copy_from_slice(self.take(32)?);
        Ok(b)
    }
    /// A count of items of `item` bytes each, checked against what is left so a hostile
    /// count cannot make us allocate.
    fn count(&mut self, item: usize) -> Result<usize, SyncError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(item) > self.0.len() {
            return Err(SyncError::Decode("count exceeds message"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_message_round_trips_with_exact_wire_len() {
        let msgs = vec![
            SyncMsg::Start {
                id: 7,
                kind: 2,
                size: 1 << 30,
                block_size: 4096,
                chunk_blocks: 256,
                plan: 99,
                extents: vec![Extent {
                    offset: 0,
                    len: 4096,
                }],
            },
            SyncMsg::Compare {
                differing: vec![1, 5],
            },
            SyncMsg::Data {
                offset: 512,
                data: vec![1, 2, 3],
            },
            SyncMsg::Zero { offset: 1, len: 2 },
            SyncMsg::ChunkEnd {
                chunk: 3,
                strong: [9; 32],
            },
            SyncMsg::Mark { upto: 4 },
            SyncMsg::Finish,
            SyncMsg::Accept {
                resume_from: 5,
                known_zero: true,
            },
            SyncMsg::Refuse { target_size: 6 },
            SyncMsg::ChunkDigests {
                digests: vec![(1, [2; 32])],
                last: true,
            },
            SyncMsg::BlockDigests {
                chunk: 1,
                digests: vec![3, 4],
            },
            SyncMsg::Verified {
                chunk: 1,
                ok: false,
                durable: 8,
            },
            SyncMsg::Marked {
                upto: 1,
                durable: 2,
            },
            SyncMsg::Done { cursor: 3 },
        ];
        for m in msgs {
            let mut buf = Vec::new();
            m.encode(&mut buf);
            assert_eq!(buf.len() as u64, m.wire_len(), "{m:?}");
            assert_eq!(SyncMsg::decode(&buf).unwrap(), m);
            assert!(SyncMsg::decode(&buf[..buf.len() - 1]).is_err() || buf.len() == 1);
        }
        assert!(SyncMsg::decode(&[0xff]).is_err());
        assert!(SyncMsg::decode(&[tag::COMPARE, 0xff, 0xff, 0xff, 0xff]).is_err());
    }
}
