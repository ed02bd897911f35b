//! Promotion (history window, hard size limit, pins), commit, rollback, and their redo
//! after a crash.
//!
//! Crash safety rests on three rules. (1) The state file names the target before the
//! replica is touched (intent), and says "done" only after the replica is fsynced.
//! (2) Applying records to the replica is idempotent: re-applying any run of records in
//! order, on top of any prefix of that run already applied, ends in the same bytes. So
//! `open` simply redoes an unfinished intent from the promoted point. (3) Segments are
//! deleted oldest first and only once the state file no longer needs them, so a crash
//! between deletions leaves a suffix that `open` finishes deleting.
//!
//! A commit has two phases in the state file: `CommitApply` (records ≤ C, then the
//! persisted scratch map, then replica fsync) and `CommitClean` (delete every segment and
//! the scratch files). Records after C live until the clean phase: a rollback before
//! the commit started keeps them all.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use super::error::{io_at, io_err};
use super::format::{
    decode_scratch_map, Header, Intent, Kind, StateFile, FLAG_COMPRESSED, SEGMENT_HEADER_LEN,
};
use super::segment::{segment_path, Next, RecordReader};
use super::view::scratch_paths;
use super::{
    sync_dir, write_file_durably, CheckpointInfo, FaultPoint, Journal, JournalError, Shared, View,
    STATE_FILE,
};

type Result<T, E = JournalError> = std::result::Result<T, E>;

/// What the promoter is asked to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PromotePolicy {
    /// Current wall time, unix ms.
    pub now_ms: i64,
    /// Journal history to keep: everything older than the newest checkpoint at or before
    /// `now - history` goes into the replica.
    pub history_ms: i64,
    /// Report `size_warning` at or above this many bytes.
    pub warn_bytes: Option<u64>,
    /// Promote further (shortening history) to stay at or below this many bytes.
    pub hard_limit_bytes: Option<u64>,
}

/// What one `promote` call did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PromoteReport {
    /// The new oldest checkpoint, if promotion moved.
    pub promoted_to: Option<CheckpointInfo>,
    /// Records (markers included) moved out of the journal.
    pub records_applied: u64,
    pub segments_deleted: usize,
    pub bytes_freed: u64,
    /// The hard limit made promotion go past the history window ("History Not Meeting SLA").
    pub history_short: bool,
    pub size_warning: bool,
    /// Still above the hard limit after promoting (blocked by a view, or no checkpoint
    /// to promote to).
    pub over_hard_limit: bool,
    /// An open view kept promotion from going as far as asked.
    pub blocked_by_view: bool,
    /// How far the history window's target is ahead of what is promoted, in wall time
    /// and in journal bytes.
    pub lag_ms: i64,
    pub lag_bytes: u64,
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitReport {
    pub checkpoint: CheckpointInfo,
    /// Records ≤ the checkpoint moved into the replica.
    pub records_applied: u64,
    /// Records after the checkpoint dropped.
    pub records_discarded: u64,
    /// Bytes of the scratch layer merged into the replica.
    pub scratch_bytes: u64,
}

impl Journal {
    /// Applies to the replica every record older than the history window (or more, to
    /// meet the hard limit), never past the oldest open view, then deletes the segments
    /// that hold only promoted records. Promotion always ends at a checkpoint, which
    /// becomes the oldest retained one.
    pub fn promote(&mut self, policy: &PromotePolicy) -> Result<PromoteReport> {
        self.check_ok()?;
        let r = self.promote_inner(policy);
        let r = self.guard(r);
        if let Ok(rep) = &r {
            self.last_promote = Some((*policy, rep.clone()));
        }
        r
    }

    fn promote_inner(&mut self, policy: &PromotePolicy) -> Result<PromoteReport> {
        let cands: Vec<(u64, i64)> = self
            .ckpts
            .range(self.promoted_seq..=self.durable_seq().max(self.promoted_seq))
            .map(|(&s, c)| (s, c.info.wall_ms))
            .collect();
        let mut rep = PromoteReport::default();
        let cutoff = policy.now_ms.saturating_sub(policy.history_ms);
        let window = cands.iter().rev().find(|c| c.1 <= cutoff).map(|c| c.0);
        let mut target = window.unwrap_or(self.promoted_seq).max(self.promoted_seq);
        let used = self.bytes_used();
        if let Some(limit) = policy.hard_limit_bytes {
            if used > limit {
                let fits = cands
                    .iter()
                    .filter(|c| c.0 >= target)
                    .find(|c| used.saturating_sub(self.freed_by(c.0)) <= limit)
                    .map(|c| c.0);
                let forced = fits.or(cands.last().map(|c| c.0)).unwrap_or(target);
                if forced > target {
                    target = forced;
                    rep.history_short = true;
                }
            }
        }
        {
            let mut pins = self.shared.pins();
            if let Some(&p) = pins.by_seq.keys().next() {
                if p < target {
                    target = p.max(self.promoted_seq);
                    rep.blocked_by_view = true;
                }
            }
            pins.floor = pins.floor.max(target);
        }
        if target > self.promoted_seq {
            let ckpt = self
                .ckpts
                .get(&target)
                .map(|c| c.info.clone())
                .ok_or_else(|| JournalError::Closed("promotion target vanished".into()))?;
            let segs_before = self.segs.len();
            rep.records_applied = self.do_promote(&ckpt, true)?;
            rep.bytes_freed = used.saturating_sub(self.bytes_used());
            rep.segments_deleted = segs_before.saturating_sub(self.segs.len());
            rep.promoted_to = Some(ckpt);
        }
        let after = self.bytes_used();
        rep.size_warning = policy.warn_bytes.is_some_and(|w| after >= w);
        rep.over_hard_limit = policy.hard_limit_bytes.is_some_and(|l| after > l);
        if let Some(w) = window.filter(|&w| w > self.promoted_seq) {
            let base = self
                .ckpts
                .get(&self.promoted_seq)
                .or_else(|| self.ckpts.values().next());
            if let (Some(wc), Some(b)) = (self.ckpts.get(&w), base) {
                rep.lag_ms = wc.info.wall_ms - b.info.wall_ms;
                rep.lag_bytes = wc.log_at.saturating_sub(b.log_at);
            }
        }
        Ok(rep)
    }

    /// Segment bytes that promotion to `seq` would free.
    fn freed_by(&self, seq: u64) -> u64 {
        self.segs
            .iter()
            .filter(|s| s.records > 0 && s.last_seq <= seq)
            .map(|s| s.len)
            .sum()
    }

    pub(crate) fn write_state(&self, base: Option<&CheckpointInfo>, intent: Intent) -> Result<()> {
        let s = StateFile {
            disk: self.cfg.disk_id,
            promoted_seq: self.promoted_seq,
            seq_floor: self.seq_floor,
            base: base.cloned(),
            intent,
        };
        write_file_durably(&self.shared.dir, STATE_FILE, &s.encode())
    }

    /// Promotes to `ckpt`; `write_intent` is false when redoing an intent found on open.
    fn do_promote(&mut self, ckpt: &CheckpointInfo, write_intent: bool) -> Result<u64> {
        self.flush_buf()?;
        if write_intent {
            self.write_state(self.base.as_ref(), Intent::Promote { ckpt: ckpt.clone() })?;
            self.fault(FaultPoint::PromoteIntentWritten)?;
        }
        let applied = self.apply_range(self.promoted_seq, ckpt.seq)?;
        self.fault(FaultPoint::PromoteApplied)?;
        self.shared
            .replica
            .sync_data()
            .map_err(|e| io_at("fdatasync replica", &self.shared.replica_path, e))?;
        self.fault(FaultPoint::PromoteReplicaSynced)?;
        self.promoted_seq = ckpt.seq;
        self.base = Some(ckpt.clone());
        self.write_state(Some(ckpt), Intent::None)?;
        self.fault(FaultPoint::PromoteStateWritten)?;
        // The replica holds everything ≤ ckpt now; forget it in memory.
        self.retire_ckpts_below(ckpt.seq);
        self.records = self.records.saturating_sub(applied);
        {
            let mut rs = self.shared.write_side();
            rs.index.prune(ckpt.seq);
            rs.index.set_records(self.records);
        }
        self.drop_promoted_segments()?;
        Ok(applied)
    }

    /// Deletes segments whose records are all promoted, oldest first. The active segment
    /// is replaced by a fresh one first if it is among them.
    pub(crate) fn drop_promoted_segments(&mut self) -> Result<usize> {
        let mut deleted = 0;
        while let Some(first) = self.segs.first() {
            let is_active = self.segs.len() == 1;
            let done = if first.records == 0 {
                !is_active
            } else {
                first.last_seq <= self.promoted_seq
            };
            if !done {
                break;
            }
            if is_active {
                self.flush_buf()?;
                self.create_segment()?;
            }
            self.delete_first_segment()?;
            deleted += 1;
        }
        if deleted > 0 || self.dir_dirty {
            sync_dir(&self.shared.dir)?;
            self.dir_dirty = false;
        }
        Ok(deleted)
    }

    fn delete_first_segment(&mut self) -> Result<()> {
        let s = self.segs.remove(0);
        self.shared.write_side().segs.remove(&s.id);
        let path = segment_path(&self.shared.dir, s.id);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_at("delete segment", &path, e)),
        }
        self.fault(FaultPoint::SegmentDeleted)
    }

    /// Applies every record with `from < seq ≤ to` to the replica, in order; returns how
    /// many records (markers included) that was. Each record's CRC is checked again: the
    /// replica never receives bytes the journal cannot vouch for.
    fn apply_range(&mut self, from: u64, to: u64) -> Result<u64> {
        if to <= from {
            return Ok(0);
        }
        let dir = self.shared.dir.clone();
        let active = self.segs.last().map(|s| s.id);
        let segs: Vec<(u32, Arc<File>, u64)> = self
            .segs
            .iter()
            .filter(|s| s.records > 0 && s.last_seq > from && s.first_seq <= to)
            .map(|s| {
                let end = if Some(s.id) == active {
                    self.buf_pos
                } else {
                    s.len
                };
                (s.id, s.file.clone(), end)
            })
            .collect();
        let mut rbuf = std::mem::take(&mut self.rbuf);
        let mut dbuf = std::mem::take(&mut self.dbuf);
        let mut n = 0u64;
        let mut reached = false;
        'segs: for (id, file, end) in segs {
            let path = segment_path(&dir, id);
            let mut reader = RecordReader::new(&file, &path, SEGMENT_HEADER_LEN as u64, end, rbuf);
            loop {
                match reader.next()? {
                    Next::End => break,
                    Next::Bad { pos, reason } => {
                        return Err(JournalError::corrupt(&path, pos, reason))
                    }
                    Next::Record {
                        pos,
                        header,
                        payload,
                    } => {
                        if header.seq <= from {
                            continue;
                        }
                        if header.seq > to {
                            rbuf = reader.into_buf();
                            break 'segs;
                        }
                        apply_record(&self.shared, &header, payload, &mut dbuf).map_err(
                            |e| match e {
                                JournalError::Corrupt { reason, .. } => {
                                    JournalError::corrupt(&path, pos, reason)
                                }
                                e => e,
                            },
                        )?;
                        n += 1;
                        reached |= header.seq == to;
                        self.fault(FaultPoint::RecordApplied)?;
                    }
                }
            }
            rbuf = reader.into_buf();
        }
        self.rbuf = rbuf;
        self.dbuf = dbuf;
        if !reached {
            return Err(JournalError::corrupt(
                &dir,
                0,
                format!("record {to} to promote to is missing from the journal"),
            ));
        }
        Ok(n)
    }

    /// Commits `view`: the replica becomes the view (its checkpoint plus its scratch
    /// layer), records after the checkpoint are dropped, the journal is empty after.
    /// No other view may be open.
    pub fn commit(&mut self, view: View) -> Result<CommitReport> {
        self.check_ok()?;
        if !Arc::ptr_eq(&view.shared, &self.shared) {
            return Err(JournalError::Config(
                "the view belongs to another journal".into(),
            ));
        }
        let open: usize = self.shared.pins().by_seq.values().sum();
        if open > 1 {
            return Err(JournalError::Pinned(format!(
                "{} other view(s) open; close them before committing",
                open - 1
            )));
        }
        let ckpt = view.ckpt.clone();
        if ckpt.id == super::HEAD_VIEW_ID {
            return Err(JournalError::Config(
                "a head view is not a checkpoint and cannot be committed".into(),
            ));
        }
        if ckpt.seq < self.promoted_seq || !self.ckpts.contains_key(&ckpt.seq) {
            return Err(JournalError::CheckpointNotRetained(ckpt.id));
        }
        let r = self.commit_inner(&view, &ckpt);
        drop(view);
        self.guard(r)
    }

    /// Commits at checkpoint `id` with no scratch layer.
    pub fn commit_checkpoint(&mut self, id: u64) -> Result<CommitReport> {
        let v = self.open_view(id)?;
        self.commit(v)
    }

    fn commit_inner(&mut self, view: &View, ckpt: &CheckpointInfo) -> Result<CommitReport> {
        let scratch_bytes = view.scratch_bytes();
        view.persist_scratch()?;
        self.fault(FaultPoint::CommitScratchPersisted)?;
        let floor = self.last_seq.max(self.seq_floor);
        let records_before = self.records;
        self.write_state(
            self.base.as_ref(),
            Intent::CommitApply {
                ckpt: ckpt.clone(),
                view: view.id,
                floor,
            },
        )?;
        self.fault(FaultPoint::CommitIntentWritten)?;
        let applied = self.finish_commit(ckpt, view.id, floor, false)?;
        Ok(CommitReport {
            checkpoint: ckpt.clone(),
            records_applied: applied,
            records_discarded: records_before.saturating_sub(applied),
            scratch_bytes,
        })
    }

    /// The commit after its intent is durable; also the redo on open.
    fn finish_commit(
        &mut self,
        ckpt: &CheckpointInfo,
        view: u64,
        floor: u64,
        clean_only: bool,
    ) -> Result<u64> {
        let mut applied = 0;
        if !clean_only {
            applied = self.apply_range(self.promoted_seq, ckpt.seq)?;
            self.fault(FaultPoint::CommitApplied)?;
            self.apply_scratch(view)?;
            self.fault(FaultPoint::CommitScratchApplied)?;
            self.shared
                .replica
                .sync_data()
                .map_err(|e| io_at("fdatasync replica", &self.shared.replica_path, e))?;
            self.fault(FaultPoint::CommitReplicaSynced)?;
            self.write_state(
                self.base.as_ref(),
                Intent::CommitClean {
                    ckpt: ckpt.clone(),
                    view,
                    floor,
                },
            )?;
            self.fault(FaultPoint::CommitCleanWritten)?;
        }
        // No sync may run on a segment about to be deleted, nor complete after the
        // durable seq is set below.
        self.syncer.wait_idle()?;
        // Records after the checkpoint, buffered or not, are discarded with the segments.
        self.buf.clear();
        while !self.segs.is_empty() {
            self.delete_first_segment()?;
        }
        sync_dir(&self.shared.dir)?;
        self.fault(FaultPoint::CommitSegmentsDeleted)?;
        self.promoted_seq = ckpt.seq;
        self.seq_floor = floor;
        self.base = Some(ckpt.clone());
        self.write_state(Some(ckpt), Intent::None)?;
        self.fault(FaultPoint::CommitStateWritten)?;
        let (data, map) = scratch_paths(&self.shared, view);
        for p in [data, map] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_at("remove committed scratch", &p, e)),
            }
        }
        // The journal is now empty at `ckpt`: older checkpoints were promoted past, newer
        // ones discarded.
        let later: Vec<u64> = self.ckpts.range(ckpt.seq + 1..).map(|(&s, _)| s).collect();
        if let Some(&last) = later.last() {
            self.retire_ckpts_below(last + 1);
        } else {
            self.retire_ckpts_below(ckpt.seq);
        }
        self.ckpts.clear();
        self.ckpt_ids.clear();
        self.retired.remove(&ckpt.id);
        self.insert_ckpt(ckpt.clone(), 0);
        self.records = 0;
        self.log_bytes = 0;
        self.last_seq = self.last_seq.max(floor);
        {
            let mut rs = self.shared.write_side();
            rs.index.clear();
        }
        self.shared.pins().floor = ckpt.seq;
        self.create_segment()?;
        sync_dir(&self.shared.dir)?;
        self.dir_dirty = false;
        // Every record ≤ the floor is in the replica or discarded: acknowledge them all.
        self.force_durable();
        Ok(applied)
    }

    fn apply_scratch(&mut self, view: u64) -> Result<()> {
        let (data, map) = scratch_paths(&self.shared, view);
        let bytes = match std::fs::read(&map) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_at("read scratch map", &map, e)),
        };
        let ranges = decode_scratch_map(&bytes).map_err(|r| JournalError::corrupt(&map, 0, r))?;
        let f = File::open(&data).map_err(|e| io_at("open scratch layer", &data, e))?;
        let mut buf = std::mem::take(&mut self.dbuf);
        const STEP: u64 = 1 << 20;
        for (s, e) in ranges {
            let mut at = s;
            while at < e {
                let n = (e - at).min(STEP) as usize;
                buf.resize(n, 0);
                f.read_exact_at(&mut buf[..n], at)
                    .map_err(|e| io_at("read scratch layer", &data, e))?;
                self.shared
                    .replica
                    .write_all_at(&buf[..n], at)
                    .map_err(|e| io_at("write replica", &self.shared.replica_path, e))?;
                at += n as u64;
            }
        }
        self.dbuf = buf;
        Ok(())
    }

    /// Discards `view` and its scratch layer; the journal is left as it was (records
    /// after the view's checkpoint were never dropped).
    pub fn rollback(&mut self, view: View) -> Result<()> {
        if !Arc::ptr_eq(&view.shared, &self.shared) {
            return Err(JournalError::Config(
                "the view belongs to another journal".into(),
            ));
        }
        drop(view);
        Ok(())
    }

    /// Finishes what the state file says was in flight when the process stopped.
    pub(crate) fn redo(&mut self, state: &StateFile) -> Result<()> {
        match &state.intent {
            Intent::None => Ok(()),
            Intent::Promote { ckpt } => {
                tracing::info!(seq = ckpt.seq, "redoing interrupted promotion");
                self.do_promote(ckpt, false).map(|_| ())
            }
            Intent::CommitApply { ckpt, view, floor } => {
                tracing::info!(seq = ckpt.seq, "redoing interrupted commit");
                self.finish_commit(ckpt, *view, *floor, false).map(|_| ())
            }
            Intent::CommitClean { ckpt, view, floor } => {
                tracing::info!(seq = ckpt.seq, "finishing interrupted commit");
                self.finish_commit(ckpt, *view, *floor, true).map(|_| ())
            }
        }
    }
}

/// Writes one record's effect into the replica.
fn apply_record(shared: &Shared, h: &Header, payload: &[u8], dbuf: &mut Vec<u8>) -> Result<()> {
    let replica = &shared.replica;
    let werr = |e| io_at("write replica", &shared.replica_path, e);
    match h.kind {
        Kind::Checkpoint => Ok(()),
        Kind::Write if h.flags & FLAG_COMPRESSED != 0 => {
            dbuf.clear();
            dbuf.reserve(h.length as usize);
            let n = zstd::bulk::Decompressor::new()
                .and_then(|mut d| d.decompress_to_buffer(payload, dbuf))
                .map_err(|e| JournalError::corrupt(&shared.dir, 0, format!("zstd: {e}")))?;
            if n as u64 != h.length {
                return Err(JournalError::corrupt(
                    &shared.dir,
                    0,
                    "decompressed length differs",
                ));
            }
            replica.write_all_at(&dbuf[..n], h.offset).map_err(werr)
        }
        Kind::Write => replica.write_all_at(payload, h.offset).map_err(werr),
        Kind::Zero | Kind::Trim => zero_range(shared, h.offset, h.length),
    }
}

/// Zeros a range of the replica: a punched hole where the file system can (keeps the
/// replica sparse and is instant for a large TRIM), written zeros otherwise.
fn zero_range(shared: &Shared, offset: u64, len: u64) -> Result<()> {
    use rustix::fs::{fallocate, FallocateFlags};
    let replica = &shared.replica;
    if fallocate(
        replica,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    )
    .is_ok()
    {
        return Ok(());
    }
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut at = offset;
    let end = offset + len;
    while at < end {
        let n = (end - at).min(ZEROS.len() as u64) as usize;
        replica
            .write_all_at(&ZEROS[..n], at)
            .map_err(io_err("write zeros to replica"))?;
        at += n as u64;
    }
    Ok(())
}
