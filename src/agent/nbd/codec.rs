//! Buffered frame reading for both protocol phases: parse frames from a buffer and read more
//! on `Incomplete`; payloads go straight into the caller's buffer (only the bytes already
//! buffered are copied); skipping never allocates more than a fixed scratch buffer.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::proto::{BadMagic, Parse};
use super::NbdError;

const READ_BUF: usize = 64 * 1024;

/// Reads NBD frames from `R`.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// Wraps a reader.
    pub fn new(inner: R) -> Self {
        FrameReader {
            inner,
            buf: BytesMut::with_capacity(READ_BUF),
        }
    }

    /// Reads one frame with `parse`. `Ok(None)` on a clean end of stream at a frame
    /// boundary; an error if the stream ends inside a frame or the magic is wrong.
    pub async fn read_frame<T>(
        &mut self,
        parse: impl Fn(&[u8]) -> Result<Parse<T>, BadMagic>,
    ) -> Result<Option<T>, NbdError> {
        loop {
            match parse(&self.buf) {
                Ok(Parse::Done(frame, used)) => {
                    self.buf.advance(used);
                    return Ok(Some(frame));
                }
                Ok(Parse::Incomplete) => {}
                Err(BadMagic(m)) => {
                    return Err(NbdError::Protocol(format!("bad magic {m:#x}")));
                }
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                // Reclaims the consumed front when nothing else references the buffer.
                self.buf.reserve(READ_BUF);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(NbdError::Protocol(
                    "connection closed inside a frame".into(),
                ));
            }
        }
    }

    /// Fills `dst` completely: first from buffered bytes, the rest straight from the stream.
    pub async fn read_exact_into(&mut self, dst: &mut [u8]) -> std::io::Result<()> {
        let n = self.buf.len().min(dst.len());
        dst[..n].copy_from_slice(&self.buf[..n]);
        self.buf.advance(n);
        if n < dst.len() {
            self.inner.read_exact(&mut dst[n..]).await?;
        }
        Ok(())
    }

    /// Discards `n` bytes of the stream, with bounded memory.
    pub async fn skip(&mut self, mut n: u64) -> std::io::Result<()> {
        let from_buf = (self.buf.len() as u64).min(n) as usize;
        self.buf.advance(from_buf);
        n -= from_buf as u64;
        let mut scratch = [0u8; 8192];
        while n > 0 {
            let want = n.min(scratch.len() as u64) as usize;
            let got = self.inner.read(&mut scratch[..want]).await?;
            if got == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            n -= got as u64;
        }
        Ok(())
    }

    /// Bytes buffered but not consumed.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The wrapped reader.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }
}
