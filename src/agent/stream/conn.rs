//! Frames over a byte stream: a reading buffer that parses whole frames (and says when
//! one is buffered already) and a writing buffer that coalesces frames into one write.

use std::io::Cursor;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{io, StreamError};
use crate::proto::stream::{Compression, Frame, FrameError};

/// Reads frames; the buffer is reused for the life of the connection.
pub struct FrameReader<R> {
    rd: R,
    buf: Vec<u8>,
    /// Bytes before this are consumed.
    pos: usize,
    scratch: Vec<u8>,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(rd: R) -> Self {
        FrameReader {
            rd,
            buf: Vec::with_capacity(256 << 10),
            pos: 0,
            scratch: Vec::new(),
        }
    }

    /// A frame from what is already buffered, without reading: `None` if none is whole.
    pub fn try_frame(&mut self) -> Result<Option<Frame>, StreamError> {
        let mut c = Cursor::new(&self.buf[self.pos..]);
        match Frame::parse_with(&mut c, &mut self.scratch) {
            Ok(f) => {
                self.pos += c.position() as usize;
                Ok(Some(f))
            }
            Err(FrameError::Incomplete) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The next frame; `Ok(None)` on a clean end of stream between frames.
    pub async fn read_frame(&mut self) -> Result<Option<Frame>, StreamError> {
        loop {
            if let Some(f) = self.try_frame()? {
                return Ok(Some(f));
            }
            if !self.fill().await? {
                return if self.pos == self.buf.len() {
                    Ok(None)
                } else {
                    Err(StreamError::Closed)
                };
            }
        }
    }

    /// Reads more bytes from the peer into the buffer; `false` at end of stream.
    pub async fn fill(&mut self) -> Result<bool, StreamError> {
        // Slide the unconsumed tail to the front instead of growing forever.
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.reserve(64 << 10);
        let n = self
            .rd
            .read_buf(&mut self.buf)
            .await
            .map_err(io("read from peer"))?;
        Ok(n > 0)
    }
}

/// Buffers encoded frames and writes them in one go.
pub struct FrameWriter<W> {
    wr: W,
    out: Vec<u8>,
    scratch: Vec<u8>,
    compression: Compression,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(wr: W, compression: Compression) -> Self {
        FrameWriter {
            wr,
            out: Vec::with_capacity(256 << 10),
            scratch: Vec::new(),
            compression,
        }
    }

    /// Encodes a frame into the buffer (nothing is sent yet).
    pub fn push(&mut self, f: &Frame) -> Result<(), StreamError> {
        f.encode(self.compression, &mut self.scratch, &mut self.out)?;
        Ok(())
    }

    /// Bytes buffered and not yet written.
    pub fn buffered(&self) -> usize {
        self.out.len()
    }

    /// Writes everything buffered and flushes (TLS needs the flush to send a record).
    pub async fn flush(&mut self) -> Result<(), StreamError> {
        if !self.out.is_empty() {
            self.wr
                .write_all(&self.out)
                .await
                .map_err(io("write to peer"))?;
            self.out.clear();
        }
        self.wr.flush().await.map_err(io("flush to peer"))
    }

    /// Sends one frame now.
    pub async fn send(&mut self, f: &Frame) -> Result<(), StreamError> {
        self.push(f)?;
        self.flush().await
    }

    pub async fn shutdown(&mut self) {
        let _ = self.wr.shutdown().await;
    }
}
