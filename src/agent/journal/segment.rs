//! Segment files: naming, the sequential record reader used by recovery and promotion,
//! and the torn-tail analysis.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::error::{io_at, JournalError};
use super::format::{record_len, Header, HEADER_LEN, RECORD_MAGIC};

/// Bytes read at a time when scanning a segment.
const READ_CHUNK: usize = 8 << 20;

pub(crate) fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08x}.seg"))
}

/// Segment ids present in `dir`, ascending.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<u32>, JournalError> {
    let mut ids = Vec::new();
    let rd = std::fs::read_dir(dir).map_err(|e| io_at("list journal directory", dir, e))?;
    for ent in rd {
        let ent = ent.map_err(|e| io_at("list journal directory", dir, e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        if stem.len() != 8 {
            continue;
        }
        if let Ok(id) = u32::from_str_radix(stem, 16) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Reads `buf.len()` bytes at `pos`, or fewer at end of file; returns how many.
pub(crate) fn read_full_at(file: &File, buf: &mut [u8], pos: u64) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], pos + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

pub(crate) enum Next<'a> {
    Record {
        pos: u64,
        header: Header,
        payload: &'a [u8],
    },
    End,
    /// The bytes at `pos` are not a whole valid record.
    Bad {
        pos: u64,
        reason: &'static str,
    },
}

/// Reads a segment's records in order, through one reusable buffer.
pub(crate) struct RecordReader<'f> {
    file: &'f File,
    path: &'f Path,
    buf: Vec<u8>,
    buf_start: u64,
    buf_len: usize,
    end: u64,
    pos: u64,
}

impl<'f> RecordReader<'f> {
    /// Reads records from `start` up to `end` (the file length or less).
    pub(crate) fn new(file: &'f File, path: &'f Path, start: u64, end: u64, buf: Vec<u8>) -> Self {
        RecordReader {
            file,
            path,
            buf,
            buf_start: start,
            buf_len: 0,
            end,
            pos: start,
        }
    }

    pub(crate) fn into_buf(self) -> Vec<u8> {
        self.buf
    }

    /// Makes `[pos, pos + n)` present in the buffer; the caller checked it is ≤ `end`.
    fn ensure(&mut self, pos: u64, n: usize) -> Result<usize, JournalError> {
        let have_end = self.buf_start + self.buf_len as u64;
        if pos >= self.buf_start && pos + n as u64 <= have_end {
            return Ok((pos - self.buf_start) as usize);
        }
        // Keep what we already have from `pos` on, then read the rest.
        let keep = if pos >= self.buf_start && pos < have_end {
            let from = (pos - self.buf_start) as usize;
            self.buf.copy_within(from..self.buf_len, 0);
            self.buf_len - from
        } else {
            0
        };
        let want = n.max(READ_CHUNK).min((self.end - pos) as usize).max(n);
        if self.buf.len() < want {
            self.buf.resize(want, 0);
        }
        self.buf_start = pos;
        let got = read_full_at(self.file, &mut self.buf[keep..want], pos + keep as u64)
            .map_err(|e| io_at("read segment", self.path, e))?;
        self.buf_len = keep + got;
        if self.buf_len < n {
            return Err(JournalError::corrupt(
                self.path,
                pos,
                "segment shorter than its length while reading",
            ));
        }
        Ok(0)
    }

    pub(crate) fn next(&mut self) -> Result<Next<'_>, JournalError> {
        let pos = self.pos;
        if pos >= self.end {
            return Ok(Next::End);
        }
        if self.end - pos < HEADER_LEN as u64 {
            return Ok(Next::Bad {
                pos,
                reason: "truncated record header",
            });
        }
        let at = self.ensure(pos, HEADER_LEN)?;
        let header = match Header::decode(&self.buf[at..at + HEADER_LEN]) {
            Ok(h) => h,
            Err(reason) => return Ok(Next::Bad { pos, reason }),
        };
        let total = record_len(header.stored_len);
        if self.end - pos < total {
            return Ok(Next::Bad {
                pos,
                reason: "truncated record",
            });
        }
        let at = self.ensure(pos, total as usize)?;
        let stored = header.stored_len as usize;
        let hb = &self.buf[at..at + HEADER_LEN];
        let payload = &self.buf[at + HEADER_LEN..at + HEADER_LEN + stored];
        if !Header::crc_ok(hb, payload) {
            return Ok(Next::Bad {
                pos,
                reason: "record CRC mismatch",
            });
        }
        // Padding is outside the CRC; the writer always zeroes it.
        if self.buf[at + HEADER_LEN + stored..at + total as usize]
            .iter()
            .any(|&b| b != 0)
        {
            return Ok(Next::Bad {
                pos,
                reason: "non-zero record padding",
            });
        }
        self.pos = pos + total;
        Ok(Next::Record {
            pos,
            header,
            payload,
        })
    }
}

/// After damage at `from` in the last segment: is there a later valid record of this
/// disk whose durable hint says something after `last_good_seq` had been made durable?
/// Then the damage hit acknowledged data and must not be cut away as a torn tail.
/// Returns the position of such a record. Records are 8-aligned, so only those
/// positions are tried.
pub(crate) fn find_durable_after(
    file: &File,
    path: &Path,
    from: u64,
    end: u64,
    disk: u64,
    last_good_seq: u64,
) -> Result<Option<u64>, JournalError> {
    if end <= from {
        return Ok(None);
    }
    let mut tail = vec![0u8; (end - from) as usize];
    let got =
        read_full_at(file, &mut tail, from).map_err(|e| io_at("read segment tail", path, e))?;
    tail.truncate(got);
    let magic = RECORD_MAGIC.to_le_bytes();
    let mut at = ((from + 7) & !7) - from;
    while (at as usize) + HEADER_LEN <= tail.len() {
        let i = at as usize;
        if tail[i..i + 4] == magic {
            if let Ok(h) = Header::decode(&tail[i..i + HEADER_LEN]) {
                let stop = i + HEADER_LEN + h.stored_len as usize;
                if h.disk == disk
                    && stop <= tail.len()
                    && h.durable > last_good_seq
                    && Header::crc_ok(&tail[i..i + HEADER_LEN], &tail[i + HEADER_LEN..stop])
                {
                    return Ok(Some(from + at));
                }
            }
        }
        at += 8;
    }
    Ok(None)
}
