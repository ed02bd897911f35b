//! A minimal NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies) for tests, probes and
//! diagnostics against our server or any other. Requests may be pipelined with
//! [`send`](NbdClient::send) / [`recv`](NbdClient::recv).

use std::collections::HashMap;

use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, ToSocketAddrs};

use super::codec::FrameReader;
use super::proto::*;
use super::NbdError;

/// What an export looks like from the client side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    /// Block sizes (min, preferred, max) if the server sent them.
    pub block_size: Option<(u32, u32, u32)>,
}

/// One reply as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientReply {
    /// Handle of the request.
    pub handle: u64,
    /// NBD error (0 = success).
    pub error: u32,
    /// Data of a successful read.
    pub data: Vec<u8>,
}

/// A connected client in transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    rd: FrameReader<OwnedReadHalf>,
    wr: OwnedWriteHalf,
    info: ExportInfo,
    next_handle: u64,
    /// Read lengths of outstanding reads, by handle (simple replies carry no length).
    reads: HashMap<u64, u32>,
}

async fn greet(
    stream: TcpStream,
) -> Result<(FrameReader<OwnedReadHalf>, OwnedWriteHalf), NbdError> {
    stream.set_nodelay(true)?;
    let (rd, mut wr) = stream.into_split();
    let mut rd = FrameReader::new(rd);
    let mut hello = [0u8; 18];
    rd.read_exact_into(&mut hello).await?;
    if hello[0..8] != NBD_MAGIC.to_be_bytes() || hello[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(NbdError::Protocol("not a newstyle NBD server".into()));
    }
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::Protocol("server is not fixed-newstyle".into()));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if flags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    wr.write_all(&cflags.to_be_bytes()).await?;
    Ok((rd, wr))
}

async fn send_option(wr: &mut OwnedWriteHalf, option: u32, data: &[u8]) -> Result<(), NbdError> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    wr.write_all(&b).await?;
    Ok(())
}

async fn option_reply(
    rd: &mut FrameReader<OwnedReadHalf>,
) -> Result<(OptionReply, Vec<u8>), NbdError> {
    let rep = rd
        .read_frame(parse_option_reply)
        .await?
        .ok_or_else(|| NbdError::Protocol("server closed during negotiation".into()))?;
    if rep.length > 1 << 20 {
        return Err(NbdError::Protocol("option reply too long".into()));
    }
    let mut data = vec![0u8; rep.length as usize];
    rd.read_exact_into(&mut data).await?;
    Ok((rep, data))
}

fn refused(rep: &OptionReply, data: &[u8]) -> NbdError {
    NbdError::OptionRefused {
        option: rep.option,
        reply: rep.reply,
        message: String::from_utf8_lossy(data).into_owned(),
    }
}

impl NbdClient {
    /// Connects and enters transmission on `export` with `NBD_OPT_GO`.
    pub async fn connect(addr: impl ToSocketAddrs, export: &str) -> Result<Self, NbdError> {
        let (mut rd, mut wr) = greet(TcpStream::connect(addr).await?).await?;
        let mut d = Vec::new();
        d.extend_from_slice(&(export.len() as u32).to_be_bytes());
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        send_option(&mut wr, OPT_GO, &d).await?;
        let mut info = ExportInfo {
            size: 0,
            flags: 0,
            block_size: None,
        };
        let mut got_export = false;
        loop {
            let (rep, data) = option_reply(&mut rd).await?;
            match rep.reply {
                REP_INFO if data.len() >= 2 => {
                    let kind = u16::from_be_bytes([data[0], data[1]]);
                    if kind == INFO_EXPORT && data.len() == 12 {
                        let mut s = [0u8; 8];
                        s.copy_from_slice(&data[2..10]);
                        info.size = u64::from_be_bytes(s);
                        info.flags = u16::from_be_bytes([data[10], data[11]]);
                        got_export = true;
                    } else if kind == INFO_BLOCK_SIZE && data.len() == 14 {
                        let be = |o: usize| {
                            u32::from_be_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]])
                        };
                        info.block_size = Some((be(2), be(6), be(10)));
                    }
                }
                REP_INFO => {}
                REP_ACK if got_export => break,
                REP_ACK => {
                    return Err(NbdError::Protocol(
                        "GO acknowledged without export info".into(),
                    ))
                }
                _ => return Err(refused(&rep, &data)),
            }
        }
        Ok(NbdClient {
            rd,
            wr,
            info,
            next_handle: 1,
            reads: HashMap::new(),
        })
    }

    /// Lists the server's exports with `NBD_OPT_LIST`, then aborts.
    pub async fn list(addr: impl ToSocketAddrs) -> Result<Vec<String>, NbdError> {
        let (mut rd, mut wr) = greet(TcpStream::connect(addr).await?).await?;
        send_option(&mut wr, OPT_LIST, &[]).await?;
        let mut names = Vec::new();
        loop {
            let (rep, data) = option_reply(&mut rd).await?;
            match rep.reply {
                REP_SERVER if data.len() >= 4 => {
                    let n = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                    let name = data
                        .get(4..4 + n)
                        .ok_or_else(|| NbdError::Protocol("bad NBD_REP_SERVER".into()))?;
                    names.push(String::from_utf8_lossy(name).into_owned());
                }
                REP_ACK => break,
                _ => return Err(refused(&rep, &data)),
            }
        }
        send_option(&mut wr, OPT_ABORT, &[]).await?;
        Ok(names)
    }

    /// The export as negotiated.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// Sends one request (with `payload` for a write); returns its handle.
    pub async fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<u64, NbdError> {
        let handle = self.next_handle;
        self.next_handle += 1;
        let hdr = encode_request(&Request {
            flags,
            kind,
            handle,
            offset,
            length,
        });
        self.wr.write_all(&hdr).await?;
        if !payload.is_empty() {
            self.wr.write_all(payload).await?;
        }
        if kind == CMD_READ {
            self.reads.insert(handle, length);
        }
        Ok(handle)
    }

    /// Receives the next reply (any handle).
    pub async fn recv(&mut self) -> Result<ClientReply, NbdError> {
        let rep = self
            .rd
            .read_frame(parse_simple_reply)
            .await?
            .ok_or_else(|| NbdError::Protocol("server closed the connection".into()))?;
        let mut data = Vec::new();
        if let Some(len) = self.reads.remove(&rep.handle) {
            if rep.error == 0 {
                data = vec![0u8; len as usize];
                self.rd.read_exact_into(&mut data).await?;
            }
        }
        Ok(ClientReply {
            handle: rep.handle,
            error: rep.error,
            data,
        })
    }

    async fn call(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> Result<Vec<u8>, NbdError> {
        let h = self.send(kind, flags, offset, length, payload).await?;
        let r = self.recv().await?;
        if r.handle != h {
            return Err(NbdError::Protocol(format!(
                "reply for handle {} while waiting for {h}",
                r.handle
            )));
        }
        if r.error != 0 {
            return Err(NbdError::Remote(r.error));
        }
        Ok(r.data)
    }

    /// Reads `len` bytes at `offset`.
    pub async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, NbdError> {
        self.call(CMD_READ, 0, offset, len, &[]).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        self.call(CMD_WRITE, flags, offset, data.len() as u32, data)
            .await
            .map(drop)
    }

    /// Flushes.
    pub async fn flush(&mut self) -> Result<(), NbdError> {
        self.call(CMD_FLUSH, 0, 0, 0, &[]).await.map(drop)
    }

    /// Trims.
    pub async fn trim(&mut self, offset: u64, len: u32) -> Result<(), NbdError> {
        self.call(CMD_TRIM, 0, offset, len, &[]).await.map(drop)
    }

    /// Writes zeroes (`no_hole`: must stay allocated).
    pub async fn write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        no_hole: bool,
    ) -> Result<(), NbdError> {
        let flags = if no_hole { CMD_FLAG_NO_HOLE } else { 0 };
        self.call(CMD_WRITE_ZEROES, flags, offset, len, &[])
            .await
            .map(drop)
    }

    /// Sends `NBD_CMD_DISC` and closes.
    pub async fn disconnect(mut self) -> Result<(), NbdError> {
        self.send(CMD_DISC, 0, 0, 0, &[]).await?;
        self.wr.shutdown().await?;
        Ok(())
    }
}
