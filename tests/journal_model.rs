//! Model-based property test of the journal: random writes, zeros, trims, checkpoints,
//! syncs, resends, promotions, views with scratch writes, commits, rollbacks and crashes
//! (tail truncated at a random byte, optionally a flipped byte in the unsynced tail),
//! checked after every step against a plain in-memory model of the disk.
// Helpers outside #[test] fns are test code too (clippy's allow-unwrap-in-tests misses them).
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use bulwark::agent::journal::{
    Appended, CheckpointKind, Journal, JournalConfig, JournalError, PromotePolicy, Record, View,
};
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// How often the interesting things happened, printed with `--nocapture`, to show the
/// generator reaches them: promotions that moved, commits, crashes, cuts at a flipped
/// byte, checkpoint views compared.
static COUNTS: [AtomicUsize; 5] = [const { AtomicUsize::new(0) }; 5];

const DISK: u64 = 48 << 10;
const MAX_LEN: u64 = 6000;

#[derive(Debug, Clone)]
enum Op {
    Write {
        off: u16,
        len: u16,
        seed: u8,
    },
    Zero {
        off: u16,
        len: u16,
    },
    Trim {
        off: u16,
        len: u16,
    },
    Checkpoint {
        tag: bool,
        gap: bool,
    },
    Sync,
    Resend {
        back: u8,
    },
    Promote {
        history: u8,
        hard: bool,
    },
    OpenView {
        pick: u8,
    },
    ScratchWrite {
        pick: u8,
        off: u16,
        len: u16,
        seed: u8,
    },
    CloseView {
        pick: u8,
    },
    Commit {
        pick: u8,
    },
    Crash {
        cut: u16,
        flip: Option<u16>,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let r = || (any::<u16>(), any::<u16>());
    prop_oneof![
        30 => (r(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        4 => r().prop_map(|(off, len)| Op::Zero { off, len }),
        4 => r().prop_map(|(off, len)| Op::Trim { off, len }),
        12 => (any::<bool>(), any::<bool>()).prop_map(|(tag, gap)| Op::Checkpoint { tag, gap }),
        12 => Just(Op::Sync),
        3 => any::<u8>().prop_map(|back| Op::Resend { back }),
        8 => (any::<u8>(), any::<bool>()).prop_map(|(history, hard)| Op::Promote { history, hard }),
        6 => any::<u8>().prop_map(|pick| Op::OpenView { pick }),
        6 => (any::<u8>(), r(), any::<u8>()).prop_map(|(pick, (off, len), seed)| Op::ScratchWrite { pick, off, len, seed }),
        4 => any::<u8>().prop_map(|pick| Op::CloseView { pick }),
        2 => any::<u8>().prop_map(|pick| Op::Commit { pick }),
        5 => (any::<u16>(), prop::option::of(any::<u16>())).prop_map(|(cut, flip)| Op::Crash { cut, flip }),
    ]
}

fn range(off: u16, len: u16) -> (u64, u64) {
    let off = u64::from(off) % DISK;
    let len = 1 + u64::from(len) % MAX_LEN.min(DISK - off);
    (off, len)
}

fn fill(seed: u8, seq: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u8)
                .wrapping_mul(31)
                .wrapping_add(seed)
                .wrapping_add(seq as u8)
        })
        .collect()
}

#[derive(Debug, Clone)]
enum Body {
    Write(u64, Vec<u8>),
    Zero(u64, u64),
    Trim(u64, u64),
    Ckpt(u64),
}

#[derive(Debug, Clone)]
struct Rec {
    seq: u64,
    ts: i64,
    body: Body,
}

impl Rec {
    fn record(&self) -> Record<'_> {
        match &self.body {
            Body::Write(o, d) => Record::write(self.seq, self.ts, *o, d),
            Body::Zero(o, l) => Record::zero(self.seq, self.ts, *o, *l),
            Body::Trim(o, l) => Record::trim(self.seq, self.ts, *o, *l),
            Body::Ckpt(id) => Record::checkpoint(
                self.seq,
                self.ts,
                *id,
                CheckpointKind::Scheduled,
                if id % 3 == 0 { Some("tagged") } else { None },
            ),
        }
    }
}

fn apply(disk: &mut [u8], b: &Body) {
    match b {
        Body::Write(o, d) => disk[*o as usize..*o as usize + d.len()].copy_from_slice(d),
        Body::Zero(o, l) | Body::Trim(o, l) => disk[*o as usize..(*o + *l) as usize].fill(0),
        Body::Ckpt(_) => {}
    }
}

struct MCkpt {
    id: u64,
    seq: u64,
    wall: i64,
    content: Vec<u8>,
}

struct MView {
    view: View,
    content: Vec<u8>,
}

struct Harness {
    dir: PathBuf,
    replica: PathBuf,
    cfg: JournalConfig,
    j: Journal,
    // The model.
    durable_disk: Vec<u8>,
    durable_seq: u64,
    durable_ckpts: Vec<MCkpt>,
    pending: Vec<Rec>,
    disk: Vec<u8>,
    seq: u64,
    next_ckpt: u64,
    clock: i64,
    recent: VecDeque<Rec>,
    views: Vec<MView>,
    /// Segment file and its length when `durable_seq` last moved: bytes before it are
    /// durable, bytes after it may be lost in a crash.
    mark: Option<(PathBuf, u64)>,
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

impl Harness {
    fn new(root: &Path) -> Harness {
        let dir = root.join("j");
        let replica = root.join("replica");
        std::fs::write(&replica, vec![0u8; DISK as usize]).unwrap();
        let mut cfg = JournalConfig::new(7, DISK);
        cfg.segment_size = 8192;
        cfg.write_buffer = 1024;
        cfg.index_chunk_shift = 12;
        cfg.index_mark_min = 2;
        let j = Journal::open(&dir, &replica, cfg.clone()).unwrap();
        let mut h = Harness {
            dir,
            replica,
            cfg,
            j,
            durable_disk: vec![0; DISK as usize],
            durable_seq: 0,
            durable_ckpts: Vec::new(),
            pending: Vec::new(),
            disk: vec![0; DISK as usize],
            seq: 0,
            next_ckpt: 1,
            clock: 1_000_000,
            recent: VecDeque::new(),
            views: Vec::new(),
            mark: None,
        };
        h.note_durable();
        h
    }

    /// Folds records the journal now says are durable into the durable model.
    fn note_durable(&mut self) {
        let d = self.j.durable_seq();
        if d == self.durable_seq && self.mark.is_some() {
            return;
        }
        assert!(d >= self.durable_seq, "durable seq went back");
        let (done, rest): (Vec<Rec>, Vec<Rec>) = self.pending.drain(..).partition(|r| r.seq <= d);
        self.pending = rest;
        for r in done {
            apply(&mut self.durable_disk, &r.body);
            if let Body::Ckpt(id) = r.body {
                self.durable_ckpts.push(MCkpt {
                    id,
                    seq: r.seq,
                    wall: r.ts,
                    content: self.durable_disk.clone(),
                });
            }
        }
        self.durable_seq = d;
        let last = segments(&self.dir).pop().unwrap();
        let len = std::fs::metadata(&last).unwrap().len();
        self.mark = Some((last, len));
    }

    fn append(&mut self, body: Body, gap: bool) {
        self.seq += if gap { 3 } else { 1 };
        self.clock += 1000;
        let rec = Rec {
            seq: self.seq,
            ts: self.clock,
            body,
        };
        assert_eq!(self.j.append(rec.record()).unwrap(), Appended::Accepted);
        apply(&mut self.disk, &rec.body);
        self.pending.push(rec.clone());
        self.recent.push_back(rec);
        if self.recent.len() > 8 {
            self.recent.pop_front();
        }
        self.note_durable();
    }

    fn reopen(&mut self) {
        let j = Journal::open(&self.dir, &self.replica, self.cfg.clone()).unwrap();
        self.j = j;
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Write { off, len, seed } => {
                let (o, l) = range(off, len);
                let data = fill(seed, self.seq + 1, l);
                self.append(Body::Write(o, data), false);
            }
            Op::Zero { off, len } => {
                let (o, l) = range(off, len);
                self.append(Body::Zero(o, l), false);
            }
            Op::Trim { off, len } => {
                let (o, l) = range(off, len);
                self.append(Body::Trim(o, l), false);
            }
            Op::Checkpoint { tag, gap } => {
                let id = self.next_ckpt * 3 + u64::from(tag);
                self.next_ckpt += 1;
                self.append(Body::Ckpt(id), gap);
            }
            Op::Sync => {
                let d = self.j.sync().unwrap();
                assert_eq!(d, self.j.last_seq());
                assert_eq!(d, self.seq);
                self.note_durable();
            }
            Op::Resend { back } => {
                if self.recent.is_empty() {
                    return;
                }
                let r = self.recent[back as usize % self.recent.len()].clone();
                assert_eq!(self.j.append(r.record()).unwrap(), Appended::Duplicate);
            }
            Op::Promote { history, hard } => self.promote(history, hard),
            Op::OpenView { pick } => {
                let cps = self.j.checkpoints();
                if cps.is_empty() || self.views.len() >= 4 {
                    return;
                }
                let c = &cps[pick as usize % cps.len()];
                let content = self.ckpt_content(c.id).clone();
                let view = self.j.open_view(c.id).unwrap();
                self.views.push(MView { view, content });
            }
            Op::ScratchWrite {
                pick,
                off,
                len,
                seed,
            } => {
                if self.views.is_empty() {
                    return;
                }
                let n = self.views.len();
                let v = &mut self.views[pick as usize % n];
                let (o, l) = range(off, len);
                let data = fill(seed, 99, l);
                v.view.write_at(&data, o).unwrap();
                v.content[o as usize..(o + l) as usize].copy_from_slice(&data);
            }
            Op::CloseView { pick } => {
                if self.views.is_empty() {
                    return;
                }
                let n = self.views.len();
                let v = self.views.remove(pick as usize % n);
                self.j.rollback(v.view).unwrap();
            }
            Op::Commit { pick } => self.commit(pick),
            Op::Crash { cut, flip } => self.crash(cut, flip),
        }
    }

    fn ckpt_content(&self, id: u64) -> &Vec<u8> {
        &self
            .durable_ckpts
            .iter()
            .find(|c| c.id == id)
            .unwrap_or_else(|| panic!("journal offers checkpoint {id} the model does not retain"))
            .content
    }

    fn promote(&mut self, history: u8, hard: bool) {
        let history_ms = [0i64, 3_000, 10_000, 1 << 40][history as usize % 4];
        let policy = PromotePolicy {
            now_ms: self.clock,
            history_ms,
            warn_bytes: Some(12 << 10),
            hard_limit_bytes: hard.then_some(10 << 10),
        };
        let before = self.j.checkpoints();
        let rep = self.j.promote(&policy).unwrap();
        let after = self.j.checkpoints();
        // A suffix of what was retained, never losing the newest, never an open view's.
        assert!(after.len() <= before.len());
        assert_eq!(after[..], before[before.len() - after.len()..]);
        if !before.is_empty() {
            assert!(!after.is_empty());
        }
        for v in &self.views {
            assert!(
                after.iter().any(|c| c.id == v.view.checkpoint().id),
                "promotion passed an open view"
            );
        }
        // Without views or a hard limit, promotion goes exactly to the window.
        if self.views.is_empty() && !hard && !before.is_empty() {
            let cutoff = self.clock - history_ms;
            let want = before
                .iter()
                .rev()
                .find(|c| c.wall_ms <= cutoff)
                .map_or(before[0].seq, |c| c.seq);
            assert_eq!(after[0].seq, want.max(before[0].seq));
        }
        if let Some(base) = &rep.promoted_to {
            COUNTS[0].fetch_add(1, Relaxed);
            assert_eq!(after[0].id, base.id);
            self.durable_ckpts.retain(|c| c.seq >= base.seq);
            let replica = std::fs::read(&self.replica).unwrap();
            assert!(
                replica == self.durable_ckpts[0].content,
                "replica is not the oldest checkpoint"
            );
        }
    }

    fn commit(&mut self, pick: u8) {
        if self.views.is_empty() {
            return;
        }
        let n = self.views.len();
        let chosen = self.views.remove(pick as usize % n);
        if let Some(other) = self.views.pop() {
            // Another view is open: the commit is refused (consuming that view).
            let err = self.j.commit(other.view).unwrap_err();
            assert!(matches!(err, JournalError::Pinned(_)), "{err}");
            for v in self.views.drain(..) {
                self.j.rollback(v.view).unwrap();
            }
        }
        self.views.push(chosen);
        let v = self.views.pop().unwrap();
        let id = v.view.checkpoint().id;
        let rep = self.j.commit(v.view).unwrap();
        COUNTS[1].fetch_add(1, Relaxed);
        assert_eq!(rep.checkpoint.id, id);
        let seq = rep.checkpoint.seq;
        let replica = std::fs::read(&self.replica).unwrap();
        assert!(
            replica == v.content,
            "replica differs from the committed view"
        );
        self.durable_ckpts.retain(|c| c.id == id);
        self.durable_ckpts[0].content = v.content.clone();
        self.durable_disk = v.content.clone();
        self.disk = v.content;
        self.pending.clear();
        self.recent.clear();
        self.seq = self.j.last_seq();
        assert!(self.seq >= seq);
        self.durable_seq = self.j.durable_seq();
        self.mark = None;
        self.note_durable();
    }

    fn crash(&mut self, cut: u16, flip: Option<u16>) {
        // A crash: views die without cleaning up, buffered records are lost, and the
        // unsynced tail of the active segment is cut at a random byte.
        for v in self.views.drain(..) {
            std::mem::forget(v.view);
        }
        // The old journal is dropped when replaced by the reopened one: it has no Drop
        // that writes, so its buffer is simply lost.
        let (mark_file, mark_len) = self.mark.clone().unwrap();
        let last = segments(&self.dir).pop().unwrap();
        let lo = if last == mark_file { mark_len } else { 0 };
        let len = std::fs::metadata(&last).unwrap().len();
        let mut flipped_at = None;
        if len > lo {
            let new_len = lo + u64::from(cut) % (len - lo + 1);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&last)
                .unwrap();
            f.set_len(new_len).unwrap();
            if let Some(fl) = flip {
                if new_len > lo {
                    use std::os::unix::fs::FileExt;
                    let at = lo + u64::from(fl) % (new_len - lo);
                    let mut b = [0u8];
                    f.read_exact_at(&mut b, at).unwrap();
                    f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
                    flipped_at = Some(at);
                }
            }
        }
        self.reopen();
        COUNTS[2].fetch_add(1, Relaxed);
        if let Some(at) = flipped_at {
            COUNTS[3].fetch_add(1, Relaxed);
            let now = std::fs::metadata(&last).map(|m| m.len()).unwrap_or(0);
            assert!(
                now <= at,
                "journal kept bytes past a corrupt record ({now} > {at})"
            );
        }
        let l = self.j.last_seq();
        assert!(
            l >= self.durable_seq,
            "durable record lost: {} < {}",
            l,
            self.durable_seq
        );
        assert!(l <= self.seq.max(self.durable_seq));
        assert_eq!(self.j.durable_seq(), l);
        // The model keeps what the journal recovered of the unsynced tail.
        self.pending.retain(|r| r.seq <= l);
        self.recent.retain(|r| r.seq <= l);
        self.seq = l;
        self.disk = self.durable_disk.clone();
        for r in &self.pending {
            apply(&mut self.disk, &r.body);
        }
        self.mark = None;
        self.note_durable();
    }

    fn check(&mut self) {
        let cps = self.j.checkpoints();
        let model: Vec<u64> = self.durable_ckpts.iter().map(|c| c.id).collect();
        let got: Vec<u64> = cps.iter().map(|c| c.id).collect();
        assert_eq!(got, model, "retained checkpoints differ");
        for (c, m) in cps.iter().zip(&self.durable_ckpts) {
            assert_eq!((c.seq, c.wall_ms), (m.seq, m.wall));
        }
        let mut buf = vec![0u8; DISK as usize];
        for c in &self.durable_ckpts {
            let v = self.j.open_view(c.id).unwrap();
            COUNTS[4].fetch_add(1, Relaxed);
            v.read_at(&mut buf, 0).unwrap();
            assert!(
                buf == c.content,
                "view at checkpoint {} differs from the model",
                c.id
            );
            // Odd-sized reads at odd offsets cross chunk and extent edges.
            let mut small = vec![0u8; 5000];
            v.read_at(&mut small, 4093).unwrap();
            assert!(small[..] == c.content[4093..9093]);
        }
        for v in &self.views {
            v.view.read_at(&mut buf, 0).unwrap();
            assert!(
                buf == v.content,
                "open view {} differs from its model",
                v.view.checkpoint().id
            );
        }
        let st = self.j.stats();
        assert_eq!(st.durable_seq, self.j.durable_seq());
        assert_eq!(st.checkpoints, self.durable_ckpts.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn journal_matches_model(ops in prop::collection::vec(op(), 1..90)) {
        let root = tempfile::tempdir().unwrap();
        let mut h = Harness::new(root.path());
        for op in &ops {
            h.step(op);
            h.check();
        }
        let c: Vec<usize> = COUNTS.iter().map(|c| c.load(Relaxed)).collect();
        println!("promotions {} commits {} crashes {} flips {} views compared {}", c[0], c[1], c[2], c[3], c[4]);
    }
}
