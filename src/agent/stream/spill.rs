//! The spill log of one disk: an append-only file of encoded record frames (each with
//! the frame CRC) holding the newest queued records once memory is full. Read back in
//! order as memory frees up; cut to zero length whenever it has been read to the end.
//!
//! Not fsynced: it only has to outlive a lost connection, not a crash of the agent
//! (after a crash the dirty bitmap is unclean and the disk gets a Delta Sync anyway).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Cursor;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use super::StreamError;
use crate::proto::stream::{Compression, Frame, StreamRecord};

pub(crate) struct Spill {
    path: PathBuf,
    file: File,
    write_pos: u64,
    read_pos: u64,
    /// (seq, wall ms, cost, bytes in the file) of each record still in the log.
    pub(crate) index: VecDeque<(u64, i64, usize, u64)>,
    /// Sum of costs of the records in the log.
    pub(crate) cost: usize,
    buf: Vec<u8>,
    scratch: Vec<u8>,
}

impl Spill {
    pub(crate) fn create(path: PathBuf) -> Result<Spill, StreamError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|source| StreamError::Spill {
                path: path.clone(),
                source,
            })?;
        Ok(Spill {
            path,
            file,
            write_pos: 0,
            read_pos: 0,
            index: VecDeque::new(),
            cost: 0,
            buf: Vec::new(),
            scratch: Vec::new(),
        })
    }

    fn err(&self, source: std::io::Error) -> StreamError {
        StreamError::Spill {
            path: self.path.clone(),
            source,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub(crate) fn push(&mut self, rec: &StreamRecord) -> Result<(), StreamError> {
        self.buf.clear();
        Frame::Record(rec.clone()).encode(Compression::None, &mut self.scratch, &mut self.buf)?;
        if let Err(e) = self.file.write_all_at(&self.buf, self.write_pos) {
            return Err(self.err(e));
        }
        self.write_pos += self.buf.len() as u64;
        let cost = rec.cost();
        self.index
            .push_back((rec.seq, rec.timestamp_ms, cost, self.buf.len() as u64));
        self.cost += cost;
        Ok(())
    }

    /// Reads the oldest record back out of the log (it leaves the log).
    pub(crate) fn pop(&mut self) -> Result<Option<StreamRecord>, StreamError> {
        let Some(&(seq, _, cost, len)) = self.index.front() else {
            return Ok(None);
        };
        self.buf.clear();
        self.buf.resize(len as usize, 0);
        if let Err(e) = self.file.read_exact_at(&mut self.buf, self.read_pos) {
            return Err(self.err(e));
        }
        let mut c = Cursor::new(&self.buf[..]);
        let rec = match Frame::parse_with(&mut c, &mut self.scratch)? {
            Frame::Record(r) if r.seq == seq => r,
            _ => {
                return Err(StreamError::Protocol(format!(
                    "spill log {} does not hold seq {seq} where expected",
                    self.path.display()
                )))
            }
        };
        self.skip_front_with(len, cost)?;
        Ok(Some(rec))
    }

    /// Drops the oldest record without reading it (it was acknowledged already).
    pub(crate) fn skip_front(&mut self) -> Result<(), StreamError> {
        if let Some(&(_, _, cost, len)) = self.index.front() {
            self.skip_front_with(len, cost)?;
        }
        Ok(())
    }

    fn skip_front_with(&mut self, len: u64, cost: usize) -> Result<(), StreamError> {
        self.index.pop_front();
        self.cost -= cost;
        self.read_pos += len;
        if self.index.is_empty() {
            self.clear()?;
        }
        Ok(())
    }

    /// Forgets everything and gives the space back.
    pub(crate) fn clear(&mut self) -> Result<(), StreamError> {
        self.index.clear();
        self.cost = 0;
        self.read_pos = 0;
        self.write_pos = 0;
        if let Err(e) = self.file.set_len(0) {
            return Err(self.err(e));
        }
        Ok(())
    }

    pub(crate) fn oldest_ms(&self) -> Option<i64> {
        self.index.front().map(|e| e.1)
    }

    pub(crate) fn bytes(&self) -> u64 {
        self.write_pos - self.read_pos
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
