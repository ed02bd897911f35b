//! The in-memory multi-version extent index: for any retained checkpoint, which journal
//! record (or zero range, or the replica) holds each byte of the disk.
//!
//! Why not one persistent map snapshotted per checkpoint: a path-copying map (e.g.
//! `im::OrdMap`) copies every node a checkpoint interval touches. With random writes and
//! a checkpoint every few seconds that is a large part of the tree per checkpoint, and a
//! day of history keeps ~17,000 checkpoints: tens of GB. Memory must follow the number
//! of records, not checkpoints × tree size.
//!
//! So the disk is cut into fixed chunks (1 MiB by default). Each chunk keeps the pieces of
//! records that fell in it, in sequence order (`entries`, 32 bytes each, append-only),
//! plus now and then a *mark*: the resolved newest-wins extent list of the chunk as of
//! some sequence. A query "bytes `[a, b)` as of seq `C`" takes the last mark ≤ C, walks
//! the entries after it up to C from newest to oldest until the range is covered, fills
//! what is left from the mark, and the rest is the replica. A mark is cut once the
//! entries after the previous one outnumber it (and at least `mark_min`), so the walk
//! stays short and marks cost at most about one extent per entry.
//!
//! Opening a view is then just remembering C: nothing is copied, nothing rescanned.
//! Promotion to P drops entries and marks ≤ P: their bytes are in the replica now, and a
//! view at C ≥ P (the only kind that may exist) reads the replica where nothing newer
//! than P and ≤ C covers a byte.

/// `Entry::pos` of a zero/trim piece.
const ZERO_POS: u64 = u64::MAX;
const COMPRESSED_BIT: u32 = 1 << 31;

/// One record's piece inside one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    seq: u64,
    /// File position of the record's header in its segment, or `ZERO_POS`.
    pos: u64,
    /// Segment id, with `COMPRESSED_BIT` if the record's payload is a zstd frame.
    seg: u32,
    /// Offset into the record's logical data of this piece's first byte.
    skip: u32,
    /// Start of the piece relative to the chunk.
    start: u32,
    len: u32,
}

/// Where a record's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    Zero,
    Data {
        seg: u32,
        pos: u64,
        compressed: bool,
    },
}

/// Where the bytes of one piece of a query come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    Replica,
    Zero {
        seq: u64,
    },
    /// `skip` bytes into the logical data of the record whose header is at `pos`.
    Journal {
        seq: u64,
        seg: u32,
        pos: u64,
        skip: u64,
        compressed: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Piece {
    pub off: u64,
    pub len: u64,
    pub src: Src,
}

#[derive(Debug)]
struct Mark {
    /// The mark is the chunk's resolved state including every entry with seq ≤ this.
    seq: u64,
    /// Index in `entries` of the first entry after the mark.
    first: usize,
    /// Sorted, disjoint.
    exts: Vec<Entry>,
}

#[derive(Debug, Default)]
struct Chunk {
    entries: Vec<Entry>,
    marks: Vec<Mark>,
}

#[derive(Debug)]
pub(crate) struct Index {
    shift: u32,
    mark_min: usize,
    chunks: Vec<Option<Box<Chunk>>>,
    entries: usize,
    records: u64,
}

/// Heap use of the index, in bytes, as owned by its vectors (allocator overhead aside).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IndexMemory {
    /// Record pieces held (one per record per chunk it touches).
    pub entries: u64,
    /// Extents held in marks.
    pub mark_extents: u64,
    /// Records indexed.
    pub records: u64,
    /// Bytes owned by the index.
    pub bytes: u64,
}

impl Entry {
    fn end(&self) -> u32 {
        self.start + self.len
    }
}

impl Index {
    /// `chunk_shift`: log2 of the chunk size (≤ 31); `mark_min`: fewest entries between marks.
    pub(crate) fn new(disk_size: u64, chunk_shift: u32, mark_min: usize) -> Index {
        let n = disk_size.div_ceil(1u64 << chunk_shift) as usize;
        let mut chunks = Vec::with_capacity(n);
        chunks.resize_with(n, || None);
        Index {
            shift: chunk_shift,
            mark_min: mark_min.max(1),
            chunks,
            entries: 0,
            records: 0,
        }
    }

    pub(crate) fn clear(&mut self) {
        for c in &mut self.chunks {
            *c = None;
        }
        self.entries = 0;
        self.records = 0;
    }

    /// Adds a record's range. Sequences must arrive in increasing order.
    pub(crate) fn insert(&mut self, seq: u64, offset: u64, len: u64, loc: Loc) {
        let size = 1u64 << self.shift;
        let end = offset + len;
        let (pos, seg) = match loc {
            Loc::Zero => (ZERO_POS, 0),
            Loc::Data {
                seg,
                pos,
                compressed,
            } => (
                pos,
                if compressed {
                    seg | COMPRESSED_BIT
                } else {
                    seg
                },
            ),
        };
        let mut at = offset;
        while at < end {
            let c = (at >> self.shift) as usize;
            let base = (c as u64) << self.shift;
            let piece_end = end.min(base + size);
            let e = Entry {
                seq,
                pos,
                seg,
                skip: if pos == ZERO_POS {
                    0
                } else {
                    (at - offset) as u32
                },
                start: (at - base) as u32,
                len: (piece_end - at) as u32,
            };
            let Some(slot) = self.chunks.get_mut(c) else {
                // Callers check ranges against the disk size; a range past it has no
                // chunk and nothing can read it.
                break;
            };
            let chunk = slot.get_or_insert_with(Box::default);
            chunk.entries.push(e);
            self.entries += 1;
            maybe_mark(chunk, self.mark_min, size as u32);
            at = piece_end;
        }
        self.records += 1;
    }

    /// Resolves `[off, off + len)` as of `at_seq` into pieces sorted by offset that cover
    /// the range exactly. `out` is cleared first.
    #[cfg(test)]
    pub(crate) fn query(&self, off: u64, len: u64, at_seq: u64, out: &mut Vec<Piece>) {
        self.query_with(off, len, at_seq, out, &mut Vec::new(), &mut Vec::new());
    }

    /// [`Index::query`] with caller-owned work buffers (the view read path reuses them).
    pub(crate) fn query_with(
        &self,
        off: u64,
        len: u64,
        at_seq: u64,
        out: &mut Vec<Piece>,
        unc: &mut Vec<(u32, u32)>,
        tmp: &mut Vec<(u32, u32)>,
    ) {
        out.clear();
        let size = 1u64 << self.shift;
        let end = off + len;
        let mut at = off;
        while at < end {
            let c = (at >> self.shift) as usize;
            let base = (c as u64) << self.shift;
            let stop = end.min(base + size);
            match self.chunks.get(c).and_then(|c| c.as_deref()) {
                None => out.push(Piece {
                    off: at,
                    len: stop - at,
                    src: Src::Replica,
                }),
                Some(ch) => query_chunk(
                    ch,
                    base,
                    (at - base) as u32,
                    (stop - base) as u32,
                    at_seq,
                    out,
                    unc,
                    tmp,
                ),
            }
            at = stop;
        }
        out.sort_unstable_by_key(|p| p.off);
    }

    /// Forgets everything with seq ≤ `seq` (it is in the replica now).
    pub(crate) fn prune(&mut self, seq: u64) {
        let mut entries = 0;
        for slot in &mut self.chunks {
            let Some(ch) = slot.as_deref_mut() else {
                continue;
            };
            let n = ch.entries.partition_point(|e| e.seq <= seq);
            if n > 0 {
                ch.entries.drain(..n);
            }
            ch.marks.retain(|m| m.seq > seq);
            for m in &mut ch.marks {
                m.first -= n.min(m.first);
                m.exts.retain(|e| e.seq > seq);
            }
            if ch.entries.is_empty() && ch.marks.iter().all(|m| m.exts.is_empty()) {
                *slot = None;
                continue;
            }
            if ch.entries.capacity() > 2 * ch.entries.len() + 16 {
                ch.entries.shrink_to_fit();
            }
            entries += ch.entries.len();
        }
        self.entries = entries;
    }

    pub(crate) fn set_records(&mut self, records: u64) {
        self.records = records;
    }

    pub(crate) fn memory(&self) -> IndexMemory {
        let mut m = IndexMemory {
            entries: self.entries as u64,
            records: self.records,
            bytes: (self.chunks.capacity() * std::mem::size_of::<Option<Box<Chunk>>>()) as u64,
            ..IndexMemory::default()
        };
        let es = std::mem::size_of::<Entry>() as u64;
        for ch in self.chunks.iter().flatten() {
            m.bytes += std::mem::size_of::<Chunk>() as u64;
            m.bytes += ch.entries.capacity() as u64 * es;
            m.bytes += ch.marks.capacity() as u64 * std::mem::size_of::<Mark>() as u64;
            for mk in &ch.marks {
                m.mark_extents += mk.exts.len() as u64;
                m.bytes += mk.exts.capacity() as u64 * es;
            }
        }
        m
    }
}

fn maybe_mark(ch: &mut Chunk, mark_min: usize, chunk_len: u32) {
    let (first, prev) = ch.marks.last().map_or((0, 0), |m| (m.first, m.exts.len()));
    if ch.entries.len() - first < mark_min.max(prev) {
        return;
    }
    let Some(last) = ch.entries.last() else {
        return;
    };
    let seq = last.seq;
    let mut pieces = Vec::new();
    query_chunk(
        ch,
        0,
        0,
        chunk_len,
        seq,
        &mut pieces,
        &mut Vec::new(),
        &mut Vec::new(),
    );
    pieces.sort_unstable_by_key(|p| p.off);
    let exts = pieces
        .iter()
        .filter_map(|p| {
            let (seq, pos, seg, skip) = match p.src {
                Src::Replica => return None,
                Src::Zero { seq } => (seq, ZERO_POS, 0, 0),
                Src::Journal {
                    seq,
                    seg,
                    pos,
                    skip,
                    compressed,
                } => (
                    seq,
                    pos,
                    if compressed {
                        seg | COMPRESSED_BIT
                    } else {
                        seg
                    },
                    skip as u32,
                ),
            };
            Some(Entry {
                seq,
                pos,
                seg,
                skip,
                start: p.off as u32,
                len: p.len as u32,
            })
        })
        .collect();
    let first = ch.entries.len();
    ch.marks.push(Mark { seq, first, exts });
}

#[allow(clippy::too_many_arguments)]
fn query_chunk(
    ch: &Chunk,
    base: u64,
    a: u32,
    b: u32,
    at_seq: u64,
    out: &mut Vec<Piece>,
    unc: &mut Vec<(u32, u32)>,
    tmp: &mut Vec<(u32, u32)>,
) {
    unc.clear();
    unc.push((a, b));
    let mi = ch.marks.partition_point(|m| m.seq <= at_seq);
    let mark = mi.checked_sub(1).map(|i| &ch.marks[i]);
    let first = mark.map_or(0, |m| m.first);
    let tail = &ch.entries[first.min(ch.entries.len())..];
    let end = tail.partition_point(|e| e.seq <= at_seq);
    for e in tail[..end].iter().rev() {
        if unc.is_empty() {
            return;
        }
        cover(e, base, unc, tmp, out);
    }
    if let Some(m) = mark {
        // Marks are sorted and disjoint, so each uncovered interval only needs the
        // extents that start before its end.
        let mut i = 0;
        while i < unc.len() {
            let (x, y) = unc[i];
            let from = m.exts.partition_point(|e| e.end() <= x);
            for e in m.exts[from..].iter().take_while(|e| e.start < y) {
                let (s, t) = (e.start.max(x), e.end().min(y));
                out.push(piece(e, base, s, t));
            }
            i += 1;
        }
        // Whatever the mark does not cover is the replica; compute the gaps once more.
        let mut gaps = Vec::new();
        for &(x, y) in unc.iter() {
            let mut at = x;
            let from = m.exts.partition_point(|e| e.end() <= x);
            for e in m.exts[from..].iter().take_while(|e| e.start < y) {
                if e.start > at {
                    gaps.push((at, e.start));
                }
                at = at.max(e.end());
            }
            if at < y {
                gaps.push((at, y));
            }
        }
        *unc = gaps;
    }
    for &(x, y) in unc.iter() {
        out.push(Piece {
            off: base + u64::from(x),
            len: u64::from(y - x),
            src: Src::Replica,
        });
    }
}

fn piece(e: &Entry, base: u64, s: u32, t: u32) -> Piece {
    let src = if e.pos == ZERO_POS {
        Src::Zero { seq: e.seq }
    } else {
        Src::Journal {
            seq: e.seq,
            seg: e.seg & !COMPRESSED_BIT,
            pos: e.pos,
            skip: u64::from(e.skip) + u64::from(s - e.start),
            compressed: e.seg & COMPRESSED_BIT != 0,
        }
    };
    Piece {
        off: base + u64::from(s),
        len: u64::from(t - s),
        src,
    }
}

/// Takes `e`'s range out of the uncovered intervals, emitting what it covers.
fn cover(
    e: &Entry,
    base: u64,
    unc: &mut Vec<(u32, u32)>,
    tmp: &mut Vec<(u32, u32)>,
    out: &mut Vec<Piece>,
) {
    let (s, t) = (e.start, e.end());
    if !unc.iter().any(|&(x, y)| s < y && t > x) {
        return;
    }
    tmp.clear();
    for &(x, y) in unc.iter() {
        if t <= x || s >= y {
            tmp.push((x, y));
            continue;
        }
        let (p, q) = (s.max(x), t.min(y));
        out.push(piece(e, base, p, q));
        if x < p {
            tmp.push((x, p));
        }
        if q < y {
            tmp.push((q, y));
        }
    }
    std::mem::swap(unc, tmp);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Brute force: per byte, the newest record ≤ seq, or the replica.
    fn naive(recs: &[(u64, u64, u64, bool)], size: u64, at: u64) -> Vec<Option<(u64, u64)>> {
        let mut v = vec![None; size as usize];
        for &(seq, off, len, _) in recs.iter().filter(|r| r.0 <= at) {
            for i in off..off + len {
                v[i as usize] = Some((seq, i - off));
            }
        }
        v
    }

    fn resolve(ix: &Index, size: u64, at: u64, floor: u64) -> Vec<Option<(u64, u64)>> {
        let mut out = Vec::new();
        ix.query(0, size, at, &mut out);
        let mut v = vec![None; size as usize];
        let mut next = 0;
        for p in &out {
            assert_eq!(p.off, next, "pieces must tile the range");
            next = p.off + p.len;
            for i in 0..p.len {
                v[(p.off + i) as usize] = match p.src {
                    Src::Replica => None,
                    // Zero pieces lose the seq; tests encode seq in the offset of data.
                    Src::Zero { seq } => {
                        assert!(seq > floor);
                        Some((u64::MAX, 0))
                    }
                    Src::Journal { seq, skip, .. } => {
                        if seq <= floor {
                            None
                        } else {
                            Some((seq, skip + i))
                        }
                    }
                };
            }
        }
        assert_eq!(next, size);
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn query_matches_brute_force(
            ops in prop::collection::vec((0u64..600, 1u64..200, any::<bool>()), 1..120),
            mark_min in 1usize..6,
            prune_at in 0usize..120,
        ) {
            let size = 700u64;
            let mut ix = Index::new(size, 6, mark_min);
            let mut recs = Vec::new();
            for (i, (off, len, zero)) in ops.iter().enumerate() {
                let seq = i as u64 + 1;
                let len = (*len).min(size - off);
                let loc = if *zero { Loc::Zero } else { Loc::Data { seg: 1, pos: seq * 100, compressed: false } };
                ix.insert(seq, *off, len, loc);
                recs.push((seq, *off, len, *zero));
            }
            let floor = (prune_at as u64).min(recs.len() as u64);
            ix.prune(floor);
            for at in floor..=recs.len() as u64 {
                let want: Vec<_> = naive(&recs, size, at)
                    .into_iter()
                    .map(|x| x.and_then(|(seq, k)| {
                        if seq <= floor { None }
                        else if recs[(seq - 1) as usize].3 { Some((u64::MAX, 0)) }
                        else { Some((seq, k)) }
                    }))
                    .collect();
                // Pruned bytes resolve to the replica either way.
                let got = resolve(&ix, size, at, floor);
                prop_assert_eq!(got, want, "at seq {}", at);
            }
        }
    }
}
