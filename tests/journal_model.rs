//! Model-based property test of the journal: random writes, zeros, trims, checkpoints,
//! blocking syncs, requested-but-not-awaited syncs, resends, promotions, views with
//! scratch writes, commits, rollbacks and crashes (tail truncated at a random byte past
//! what was reported durable, optionally a flipped byte there; the sync in flight either
//! finishes or fails), checked after every step against a plain in-memory model of the
//! disk.
//!
//! The sync thread is driven by the test through a gate in the fault hook: it stops
//! before every `fdatasync` until the test grants it one (`SyncStep`, `WaitDurable`) or
//! a caller blocks on it (`SyncWait` opens the gate for that operation). Between
//! operations the thread is parked, so syncs stay requested-but-not-done across appends,
//! promotions and crashes, and each run is reproducible (except which queued syncs a
//! back-pressure wait lets through).
//!
//! The crash model is physical, not the journal's word: the gate notes each segment's
//! length when an `fdatasync` of it is let through (bytes written before the call
//! started), and a crash may cut the last segment anywhere past that. Every seq the
//! journal reports durable must lie below that line when it is reported, every segment
//! but the last must be wholly synced, and every seq ever reported durable must survive
//! every later crash.
// Helpers outside #[test] fns are test code too (clippy's allow-unwrap-in-tests misses them).
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bulwark::agent::journal::{
    Appended, CheckpointKind, Durability, FaultPoint, Journal, JournalConfig, JournalError,
    PromotePolicy, Record, View,
};
use proptest::prelude::*;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// How often the interesting things happened, printed with `--nocapture`, to show the
/// generator reaches them: promotions that moved, commits, crashes, cuts at a flipped
/// byte, checkpoint views compared, crashes with a sync requested and not done, syncs
/// that failed, single sync steps granted, appends that blocked on the sync thread
/// (rotation, back-pressure).
static COUNTS: [AtomicUsize; 9] = [const { AtomicUsize::new(0) }; 9];

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
    /// `request_sync` without waiting.
    RequestSync,
    /// Let the sync thread do one `fdatasync`, if it is waiting for one; with `hold`, it
    /// stops again after the call returned, before the durable seq moves (the window in
    /// which later appends and requests must not be claimed by it).
    SyncStep {
        hold: bool,
    },
    /// Let it run until what was requested is durable, then `wait_durable`.
    WaitDurable,
    /// `wait_durable` on a sync that cannot progress: times out, nothing moves.
    WaitTimeout,
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
        /// The sync in flight fails (the process died before its `fdatasync` was done)
        /// instead of finishing.
        fail: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let r = || (any::<u16>(), any::<u16>());
    prop_oneof![
        30 => (r(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        4 => r().prop_map(|(off, len)| Op::Zero { off, len }),
        4 => r().prop_map(|(off, len)| Op::Trim { off, len }),
        12 => (any::<bool>(), any::<bool>()).prop_map(|(tag, gap)| Op::Checkpoint { tag, gap }),
        8 => Just(Op::Sync),
        10 => Just(Op::RequestSync),
        8 => any::<bool>().prop_map(|hold| Op::SyncStep { hold }),
        3 => Just(Op::WaitDurable),
        2 => Just(Op::WaitTimeout),
        3 => any::<u8>().prop_map(|back| Op::Resend { back }),
        8 => (any::<u8>(), any::<bool>()).prop_map(|(history, hard)| Op::Promote { history, hard }),
        6 => any::<u8>().prop_map(|pick| Op::OpenView { pick }),
        6 => (any::<u8>(), r(), any::<u8>()).prop_map(|(pick, (off, len), seed)| Op::ScratchWrite { pick, off, len, seed }),
        4 => any::<u8>().prop_map(|pick| Op::CloseView { pick }),
        2 => any::<u8>().prop_map(|pick| Op::Commit { pick }),
        6 => (any::<u16>(), prop::option::of(any::<u16>()), any::<bool>()).prop_map(|(cut, flip, fail)| Op::Crash { cut, flip, fail }),
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

/// What the sync thread may do; see the module documentation.
/// Where the sync thread parks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Park {
    /// Before its `fdatasync` (every time, unless the gate is open).
    Before,
    /// After the `fdatasync` returned, before the durable seq moves (when `hold_after`).
    After,
}

#[derive(Default)]
struct GateState {
    /// Run freely (a caller blocks on the thread).
    open: bool,
    /// Parkings let go one by one.
    credits: u32,
    /// Park the next sync again once its `fdatasync` returned.
    hold_after: bool,
    /// Fail the sync in flight and every later one (a crash before it was done).
    fail: bool,
    /// Where the thread is parked, if it is.
    waiting: Option<Park>,
    /// Per segment file: its length when an `fdatasync` of it was last let through.
    synced: HashMap<PathBuf, u64>,
}

struct Gate {
    dir: PathBuf,
    st: Mutex<GateState>,
    cv: Condvar,
}

impl Gate {
    fn hook(self: &Arc<Self>) -> bulwark::agent::journal::FaultHook {
        let g = self.clone();
        Arc::new(move |p| {
            let mut st = g.st.lock().unwrap();
            match p {
                FaultPoint::SyncWait => {
                    st.open = true;
                    g.cv.notify_all();
                }
                FaultPoint::SegmentSync { segment } => {
                    st = g.park(st, Park::Before, p)?;
                    // The fdatasync starts after this: it covers what the file holds now.
                    let path = g.dir.join(format!("{segment:08x}.seg"));
                    // Absent: a promotion deleted it while the sync was queued.
                    if let Ok(m) = std::fs::metadata(&path) {
                        let e = st.synced.entry(path).or_insert(0);
                        *e = (*e).max(m.len());
                    }
                }
                FaultPoint::SegmentSynced { .. } if st.hold_after => {
                    st = g.park(st, Park::After, p)?;
                    st.hold_after = false;
                }
                _ => {}
            }
            drop(st);
            Ok(())
        })
    }

    fn park<'a>(
        &self,
        mut st: std::sync::MutexGuard<'a, GateState>,
        at: Park,
        p: FaultPoint,
    ) -> Result<std::sync::MutexGuard<'a, GateState>, JournalError> {
        loop {
            if st.fail {
                st.waiting = None;
                self.cv.notify_all();
                return Err(JournalError::Injected(p));
            }
            if st.open || st.credits > 0 {
                if !st.open {
                    st.credits -= 1;
                }
                st.waiting = None;
                self.cv.notify_all();
                return Ok(st);
            }
            st.waiting = Some(at);
            self.cv.notify_all();
            st = self.cv.wait(st).unwrap();
        }
    }

    /// Everything in the directory is on disk (after `open`, which synced it).
    fn all_synced(&self) {
        let mut st = self.st.lock().unwrap();
        st.synced.clear();
        for p in segments(&self.dir) {
            let len = std::fs::metadata(&p).unwrap().len();
            st.synced.insert(p, len);
        }
    }

    fn synced(&self, p: &Path) -> u64 {
        self.st.lock().unwrap().synced.get(p).copied().unwrap_or(0)
    }

    fn set(&self, f: impl FnOnce(&mut GateState)) {
        f(&mut self.st.lock().unwrap());
        self.cv.notify_all();
    }

    fn waiting(&self) -> bool {
        self.st.lock().unwrap().waiting.is_some()
    }

    fn parked_at(&self) -> Option<Park> {
        self.st.lock().unwrap().waiting
    }
}

/// Polls `cond` until it holds; a stuck pipeline fails the test instead of hanging it.
fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "stuck waiting for {what}"
        );
        std::thread::sleep(Duration::from_micros(200));
    }
}

struct Harness {
    dir: PathBuf,
    replica: PathBuf,
    cfg: JournalConfig,
    gate: Arc<Gate>,
    /// `None` only inside a crash, between dropping the old journal and opening anew.
    j: Option<Journal>,
    dur: Durability,
    // The model.
    durable_disk: Vec<u8>,
    /// Highest durable seq the journal ever reported.
    durable_seq: u64,
    durable_ckpts: Vec<MCkpt>,
    pending: Vec<Rec>,
    disk: Vec<u8>,
    seq: u64,
    next_ckpt: u64,
    clock: i64,
    recent: VecDeque<Rec>,
    views: Vec<MView>,
    /// For each appended seq not yet durable: its segment file and where its record
    /// ends there.
    ends: BTreeMap<u64, (PathBuf, u64)>,
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

impl Drop for Harness {
    fn drop(&mut self) {
        // Let a parked sync thread go, or dropping the journal (which joins it) hangs,
        // e.g. while a failed assertion unwinds.
        self.gate.set(|g| g.open = true);
    }
}

impl Harness {
    fn new(root: &Path, throttle: bool) -> Harness {
        let dir = root.join("j");
        let replica = root.join("replica");
        std::fs::write(&replica, vec![0u8; DISK as usize]).unwrap();
        let gate = Arc::new(Gate {
            dir: dir.clone(),
            st: Mutex::default(),
            cv: Condvar::new(),
        });
        let mut cfg = JournalConfig::new(7, DISK);
        cfg.segment_size = 8192;
        cfg.write_buffer = 1024;
        // Small enough that appends run into it between granted syncs.
        cfg.max_unsynced = if throttle { 3000 } else { 0 };
        cfg.index_chunk_shift = 12;
        cfg.index_mark_min = 2;
        cfg.fault = Some(gate.hook());
        let j = Journal::open(&dir, &replica, cfg.clone()).unwrap();
        let dur = j.durability();
        let mut h = Harness {
            dir,
            replica,
            cfg,
            gate,
            j: Some(j),
            dur,
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
            ends: BTreeMap::new(),
        };
        h.gate.all_synced();
        h.all_durable();
        h
    }

    fn j(&mut self) -> &mut Journal {
        self.j.as_mut().unwrap()
    }

    /// The end of the newest record, as the journal places it.
    fn position(&mut self) -> (PathBuf, u64) {
        let st = self.j().stats();
        let path = self.dir.join(format!("{:08x}.seg", st.active_segment));
        (path, st.active_segment_bytes)
    }

    /// After open and commit: everything the journal holds is durable (open synced it,
    /// a commit put it in the replica), nothing is queued.
    fn all_durable(&mut self) {
        let l = self.j().last_seq();
        assert_eq!(self.j().durable_seq(), l);
        assert_eq!(self.dur.requested_seq(), l);
        self.ends.clear();
        self.fold_durable(l);
    }

    /// Folds records the journal now says are durable into the durable model, after
    /// checking that their bytes were synced.
    fn note_durable(&mut self) {
        let d = self.dur.durable_seq();
        assert!(d >= self.durable_seq, "durable seq went back");
        if d == self.durable_seq {
            return;
        }
        let (file, end) = self
            .ends
            .get(&d)
            .cloned()
            .unwrap_or_else(|| panic!("durable seq {d} is not the end of a record appended"));
        if file.exists() {
            let synced = self.gate.synced(&file);
            assert!(
                synced >= end,
                "seq {d} reported durable, but only {synced} of the {end} bytes up to its end \
                 in {} were synced",
                file.display()
            );
        }
        self.fold_durable(d);
    }

    fn fold_durable(&mut self, d: u64) {
        self.ends = self.ends.split_off(&(d + 1));
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
    }

    /// After each step: park the sync thread again and wait until it is parked (at the
    /// gate) or idle (caught up), so the durable seq holds still until the next step.
    fn settle(&mut self) {
        self.gate.set(|g| g.open = false);
        let (gate, dur) = (self.gate.clone(), self.dur.clone());
        until("the sync thread to settle", || {
            gate.waiting() || dur.durable_seq() >= dur.requested_seq()
        });
        self.note_durable();
    }

    /// Lets a parked thread go on: through its `fdatasync` and on to park right after it
    /// (`hold`, from before it), or until the durable seq moved.
    fn step_sync(&mut self, hold: bool) -> bool {
        let Some(at) = self.gate.parked_at() else {
            return false;
        };
        let before = self.dur.durable_seq();
        let (gate, dur) = (self.gate.clone(), self.dur.clone());
        if at == Park::Before && hold {
            self.gate.set(|g| {
                g.credits += 1;
                g.hold_after = true;
            });
            until("the sync thread to park after its fdatasync", || {
                gate.parked_at() == Some(Park::After)
            });
            assert_eq!(
                dur.durable_seq(),
                before,
                "durable before the sync was done"
            );
            COUNTS[7].fetch_add(1, Relaxed);
            return true;
        }
        self.gate.set(|g| g.credits += 1);
        until("a granted sync", || dur.durable_seq() > before);
        until("the sync thread to settle", || {
            gate.waiting() || dur.durable_seq() >= dur.requested_seq()
        });
        COUNTS[7].fetch_add(1, Relaxed);
        true
    }

    fn append(&mut self, body: Body, gap: bool) {
        self.seq += if gap { 3 } else { 1 };
        self.clock += 1000;
        let rec = Rec {
            seq: self.seq,
            ts: self.clock,
            body,
        };
        let waits = |g: &Gate| g.st.lock().unwrap().open;
        assert_eq!(self.j().append(rec.record()).unwrap(), Appended::Accepted);
        if waits(&self.gate) {
            COUNTS[8].fetch_add(1, Relaxed);
        }
        let pos = self.position();
        self.ends.insert(rec.seq, pos);
        apply(&mut self.disk, &rec.body);
        self.pending.push(rec.clone());
        self.recent.push_back(rec);
        if self.recent.len() > 8 {
            self.recent.pop_front();
        }
    }

    fn reopen(&mut self) {
        self.gate.set(|g| *g = GateState::default());
        let j = Journal::open(&self.dir, &self.replica, self.cfg.clone()).unwrap();
        self.dur = j.durability();
        self.j = Some(j);
        self.gate.all_synced();
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
                let d = self.j().sync().unwrap();
                assert_eq!(d, self.j().last_seq());
                assert_eq!(d, self.seq);
                assert_eq!(self.dur.durable_seq(), d);
            }
            Op::RequestSync => {
                let t = self.j().request_sync().unwrap();
                assert_eq!(t, self.seq);
                assert!(self.dur.requested_seq() >= t);
                if t > self.dur.durable_seq() {
                    // The thread takes the request and parks before its fdatasync.
                    let gate = self.gate.clone();
                    until("the sync thread to take a request", || gate.waiting());
                }
            }
            Op::SyncStep { hold } => {
                self.step_sync(hold);
            }
            Op::WaitDurable => {
                let t = self.dur.requested_seq();
                while self.dur.durable_seq() < t {
                    assert!(self.step_sync(false), "a requested sync is not running");
                }
                let d = self.j().wait_durable(t, Duration::from_secs(5)).unwrap();
                assert!(d >= t);
                assert_eq!(self.dur.wait_durable(t, Duration::ZERO).unwrap(), d);
            }
            Op::WaitTimeout => {
                let (t, d) = (self.dur.requested_seq(), self.dur.durable_seq());
                if t > d {
                    let got = self.dur.wait_durable(t, Duration::from_millis(5)).unwrap();
                    assert_eq!(got, d, "durable seq moved with the sync thread parked");
                }
            }
            Op::Resend { back } => {
                if self.recent.is_empty() {
                    return;
                }
                let r = self.recent[back as usize % self.recent.len()].clone();
                assert_eq!(self.j().append(r.record()).unwrap(), Appended::Duplicate);
            }
            Op::Promote { history, hard } => self.promote(history, hard),
            Op::OpenView { pick } => {
                let cps = self.j().checkpoints();
                if cps.is_empty() || self.views.len() >= 4 {
                    return;
                }
                let c = &cps[pick as usize % cps.len()];
                let content = self.ckpt_content(c.id).clone();
                let view = self.j().open_view(c.id).unwrap();
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
                self.j().rollback(v.view).unwrap();
            }
            Op::Commit { pick } => self.commit(pick),
            Op::Crash { cut, flip, fail } => self.crash(cut, flip, fail),
        }
        self.settle();
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
        let before = self.j().checkpoints();
        let rep = self.j().promote(&policy).unwrap();
        let after = self.j().checkpoints();
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
            // Only durable records are promoted.
            assert!(base.seq <= self.durable_seq);
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
            let err = self.j().commit(other.view).unwrap_err();
            assert!(matches!(err, JournalError::Pinned(_)), "{err}");
            for v in std::mem::take(&mut self.views) {
                self.j().rollback(v.view).unwrap();
            }
        }
        let id = chosen.view.checkpoint().id;
        let rep = self.j().commit(chosen.view).unwrap();
        COUNTS[1].fetch_add(1, Relaxed);
        assert_eq!(rep.checkpoint.id, id);
        let seq = rep.checkpoint.seq;
        let replica = std::fs::read(&self.replica).unwrap();
        assert!(
            replica == chosen.content,
            "replica differs from the committed view"
        );
        self.durable_ckpts.retain(|c| c.id == id);
        self.durable_ckpts[0].content = chosen.content.clone();
        self.durable_disk = chosen.content.clone();
        self.disk = chosen.content;
        self.pending.clear();
        self.recent.clear();
        self.seq = self.j().last_seq();
        assert!(self.seq >= seq);
        // The new segment holds nothing durable and was not synced.
        self.gate.set(|g| g.synced.clear());
        self.all_durable();
    }

    fn crash(&mut self, cut: u16, flip: Option<u16>, fail: bool) {
        // A crash: views die without cleaning up, buffered records are lost, the sync in
        // flight finishes or fails, queued ones never run, and the tail of the active
        // segment past what was reported durable is cut at a random byte.
        for v in self.views.drain(..) {
            std::mem::forget(v.view);
        }
        let in_flight = self.dur.requested_seq() > self.dur.durable_seq();
        if in_flight {
            COUNTS[5].fetch_add(1, Relaxed);
        }
        if fail {
            let before = self.dur.durable_seq();
            self.gate.set(|g| g.fail = true);
            if in_flight {
                // The failure reaches every waiter and the journal, and moves nothing.
                COUNTS[6].fetch_add(1, Relaxed);
                let err = self
                    .dur
                    .wait_durable(u64::MAX, Duration::from_secs(20))
                    .unwrap_err();
                assert!(matches!(err, JournalError::Closed(_)), "{err}");
                assert_eq!(self.dur.durable_seq(), before);
                let next = self.seq + 1;
                let e = self.j().append(Record::zero(next, 0, 0, 1)).unwrap_err();
                assert!(matches!(e, JournalError::Closed(_)), "{e}");
                let e = self.j().sync().unwrap_err();
                assert!(matches!(e, JournalError::Closed(_)), "{e}");
                let e = self.j().request_sync().unwrap_err();
                assert!(matches!(e, JournalError::Closed(_)), "{e}");
                assert_eq!(self.j().stats().durable_seq, before);
            }
        } else {
            self.gate.set(|g| g.open = true);
        }
        // Dropping joins the sync thread: from here on nothing touches the files, and
        // whatever it made durable last was reported through `dur`.
        drop(self.j.take());
        self.note_durable();
        let mut segs = segments(&self.dir);
        let last = segs.pop().unwrap();
        for s in segs {
            let len = std::fs::metadata(&s).unwrap().len();
            assert!(
                self.gate.synced(&s) >= len,
                "{} is not the last segment but was not synced to its end",
                s.display()
            );
        }
        // Whatever no fdatasync covered may be lost.
        let lo = self.gate.synced(&last);
        let len = std::fs::metadata(&last).unwrap().len();
        assert!(len >= lo, "a segment shrank");
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
        let l = self.j().last_seq();
        assert!(
            l >= self.durable_seq,
            "record reported durable lost in a crash: {} < {}",
            l,
            self.durable_seq
        );
        assert!(l <= self.seq.max(self.durable_seq));
        assert_eq!(self.j().durable_seq(), l);
        // The model keeps what the journal recovered of the unsynced tail.
        self.pending.retain(|r| r.seq <= l);
        self.recent.retain(|r| r.seq <= l);
        self.seq = l;
        self.disk = self.durable_disk.clone();
        for r in &self.pending {
            apply(&mut self.disk, &r.body);
        }
        self.all_durable();
    }

    fn check(&mut self) {
        let cps = self.j().checkpoints();
        let model: Vec<u64> = self.durable_ckpts.iter().map(|c| c.id).collect();
        let got: Vec<u64> = cps.iter().map(|c| c.id).collect();
        assert_eq!(got, model, "retained checkpoints differ");
        for (c, m) in cps.iter().zip(&self.durable_ckpts) {
            assert_eq!((c.seq, c.wall_ms), (m.seq, m.wall));
        }
        let mut buf = vec![0u8; DISK as usize];
        let j = self.j.as_ref().unwrap();
        for c in &self.durable_ckpts {
            let v = j.open_view(c.id).unwrap();
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
        // A checkpoint appended but not durable is known and refused.
        for r in &self.pending {
            if let Body::Ckpt(id) = r.body {
                let e = j.open_view(id).unwrap_err();
                assert!(matches!(e, JournalError::CheckpointNotDurable(_)), "{e}");
            }
        }
        for v in &self.views {
            v.view.read_at(&mut buf, 0).unwrap();
            assert!(
                buf == v.content,
                "open view {} differs from its model",
                v.view.checkpoint().id
            );
        }
        let st = j.stats();
        assert_eq!(st.durable_seq, self.durable_seq);
        assert_eq!(st.durable_seq, j.durable_seq());
        assert_eq!(st.checkpoints, self.durable_ckpts.len());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn journal_matches_model(throttle in any::<bool>(), ops in prop::collection::vec(op(), 1..90)) {
        let root = tempfile::tempdir().unwrap();
        let mut h = Harness::new(root.path(), throttle);
        for op in &ops {
            h.step(op);
            h.check();
        }
        let c: Vec<usize> = COUNTS.iter().map(|c| c.load(Relaxed)).collect();
        println!(
            "promotions {} commits {} crashes {} flips {} views compared {} crashes with a sync \
             in flight {} failed syncs {} sync steps {} blocking waits in append {}",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8]
        );
    }
}
