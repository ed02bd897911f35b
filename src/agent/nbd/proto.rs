//! NBD wire format: protocol constants, frame parsers with an `Incomplete` case, and the
//! encoders for option replies and simple replies. No I/O here.
//!
//! Reference: the NBD protocol document (`doc/proto.md` of NetworkBlockDevice/nbd). All
//! integers are big-endian on the wire.

/// `NBDMAGIC`, first thing the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation magic, also prefixes every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Handshake flag: fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the 124 zero bytes after `NBD_OPT_EXPORT_NAME` may be omitted.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag: always set.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag: the export is read-only.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag: `NBD_CMD_FLUSH` supported.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag: `NBD_CMD_FLAG_FUA` supported.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag: `NBD_CMD_TRIM` supported.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag: `NBD_CMD_WRITE_ZEROES` supported.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag: flush/FUA effects visible across connections.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option: choose export and enter transmission (no error reply possible).
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option: abort negotiation.
pub const OPT_ABORT: u32 = 2;
/// Option: list exports.
pub const OPT_LIST: u32 = 3;
/// Option: start TLS.
pub const OPT_STARTTLS: u32 = 5;
/// Option: describe an export.
pub const OPT_INFO: u32 = 6;
/// Option: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// Option: structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option: set metadata contexts.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option: extended headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success / end of a list.
pub const REP_ACK: u32 = 1;
/// Option reply: one export of a list.
pub const REP_SERVER: u32 = 2;
/// Option reply: one piece of export information.
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
/// Option error: unknown option.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// Option error: forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// Option error: syntactically invalid.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// Option error: no such export.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// Option error: server shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// Option error: request too big.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// Info type: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Info type: canonical name.
pub const INFO_NAME: u16 = 1;
/// Info type: description.
pub const INFO_DESCRIPTION: u16 = 2;
/// Info type: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: write (payload follows).
pub const CMD_WRITE: u16 = 1;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: flush.
pub const CMD_FLUSH: u16 = 3;
/// Command: trim.
pub const CMD_TRIM: u16 = 4;
/// Command: cache (not supported).
pub const CMD_CACHE: u16 = 5;
/// Command: write zeroes.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command: block status (needs structured replies; not supported).
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: write zeroes must not punch a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// Error: operation not permitted.
pub const EPERM: u32 = 1;
/// Error: I/O error.
pub const EIO: u32 = 5;
/// Error: out of memory.
pub const ENOMEM: u32 = 12;
/// Error: invalid argument.
pub const EINVAL: u32 = 22;
/// Error: no space (write beyond the end).
pub const ENOSPC: u32 = 28;
/// Error: value too large.
pub const EOVERFLOW: u32 = 75;
/// Error: operation not supported.
pub const ENOTSUP: u32 = 95;
/// Error: server shutting down.
pub const ESHUTDOWN: u32 = 108;

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;

/// A parser needs more bytes than are buffered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse<T> {
    /// A complete frame and how many bytes it used.
    Done(T, usize),
    /// Not enough bytes yet.
    Incomplete,
}

/// A transmission request header (payload, if any, not included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Client's opaque handle, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

/// A bad magic number: the stream cannot be resynchronised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadMagic(pub u64);

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Parses a request header from the front of `buf`.
pub fn parse_request(buf: &[u8]) -> Result<Parse<Request>, BadMagic> {
    if buf.len() < REQUEST_LEN {
        return Ok(Parse::Incomplete);
    }
    let magic = be32(buf);
    if magic != REQUEST_MAGIC {
        return Err(BadMagic(u64::from(magic)));
    }
    Ok(Parse::Done(
        Request {
            flags: be16(&buf[4..]),
            kind: be16(&buf[6..]),
            handle: be64(&buf[8..]),
            offset: be64(&buf[16..]),
            length: be32(&buf[24..]),
        },
        REQUEST_LEN,
    ))
}

/// An option header (its data, `length` bytes, follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code.
    pub option: u32,
    /// Length of the option data.
    pub length: u32,
}

/// Parses an option header from the front of `buf`.
pub fn parse_option_header(buf: &[u8]) -> Result<Parse<OptionHeader>, BadMagic> {
    if buf.len() < OPTION_HEADER_LEN {
        return Ok(Parse::Incomplete);
    }
    let magic = be64(buf);
    if magic != IHAVEOPT {
        return Err(BadMagic(magic));
    }
    Ok(Parse::Done(
        OptionHeader {
            option: be32(&buf[8..]),
            length: be32(&buf[12..]),
        },
        OPTION_HEADER_LEN,
    ))
}

/// Parses the client flags sent after the server greeting.
pub fn parse_client_flags(buf: &[u8]) -> Result<Parse<u32>, BadMagic> {
    if buf.len() < 4 {
        return Ok(Parse::Incomplete);
    }
    Ok(Parse::Done(be32(buf), 4))
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// Requested information types.
    pub requests: Vec<u16>,
}

/// Why option data was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidOption(pub &'static str);

/// Validates an export name (UTF-8, no NUL, at most 4096 bytes).
pub fn parse_name(data: &[u8]) -> Result<String, InvalidOption> {
    if data.len() > 4096 {
        return Err(InvalidOption("export name longer than 4096 bytes"));
    }
    if data.contains(&0) {
        return Err(InvalidOption("export name contains NUL"));
    }
    String::from_utf8(data.to_vec()).map_err(|_| InvalidOption("export name is not UTF-8"))
}

/// Parses the data of `NBD_OPT_INFO` / `NBD_OPT_GO` (the whole option data).
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, InvalidOption> {
    if data.len() < 6 {
        return Err(InvalidOption("option data too short"));
    }
    let name_len = be32(data) as usize;
    let rest = &data[4..];
    if name_len > rest.len().saturating_sub(2) {
        return Err(InvalidOption("name length exceeds option length"));
    }
    let name = parse_name(&rest[..name_len])?;
    let rest = &rest[name_len..];
    let n = be16(rest) as usize;
    let rest = &rest[2..];
    if rest.len() != 2 * n {
        return Err(InvalidOption(
            "information request count does not match length",
        ));
    }
    let requests = rest.chunks_exact(2).map(be16).collect();
    Ok(InfoRequest { name, requests })
}

/// Appends an option reply (header + data) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an `NBD_REP_INFO` / `NBD_INFO_EXPORT` reply.
pub fn put_info_export(out: &mut Vec<u8>, option: u32, size: u64, flags: u16) {
    let mut d = [0u8; 12];
    d[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    d[2..10].copy_from_slice(&size.to_be_bytes());
    d[10..12].copy_from_slice(&flags.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &d);
}

/// Appends an `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` reply.
pub fn put_info_block_size(out: &mut Vec<u8>, option: u32, min: u32, preferred: u32, max: u32) {
    let mut d = [0u8; 14];
    d[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d[2..6].copy_from_slice(&min.to_be_bytes());
    d[6..10].copy_from_slice(&preferred.to_be_bytes());
    d[10..14].copy_from_slice(&max.to_be_bytes());
    put_option_reply(out, option, REP_INFO, &d);
}

/// Appends an `NBD_REP_INFO` reply carrying a string (`NBD_INFO_NAME` / `_DESCRIPTION`).
pub fn put_info_string(out: &mut Vec<u8>, option: u32, info: u16, s: &str) {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&info.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    put_option_reply(out, option, REP_INFO, &d);
}

/// Appends an `NBD_REP_SERVER` reply (name, then an optional description).
pub fn put_rep_server(out: &mut Vec<u8>, name: &str, description: &str) {
    let mut d = Vec::with_capacity(4 + name.len() + description.len());
    d.extend_from_slice(&(name.len() as u32).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(description.as_bytes());
    put_option_reply(out, OPT_LIST, REP_SERVER, &d);
}

/// Encodes a simple reply header.
pub fn simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    h[4..8].copy_from_slice(&error.to_be_bytes());
    h[8..16].copy_from_slice(&handle.to_be_bytes());
    h
}

/// Encodes a request header (used by the test/bench client).
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut h = [0u8; REQUEST_LEN];
    h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    h[4..6].copy_from_slice(&req.flags.to_be_bytes());
    h[6..8].copy_from_slice(&req.kind.to_be_bytes());
    h[8..16].copy_from_slice(&req.handle.to_be_bytes());
    h[16..24].copy_from_slice(&req.offset.to_be_bytes());
    h[24..28].copy_from_slice(&req.length.to_be_bytes());
    h
}

/// A simple reply header, as parsed by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// Error (0 = success).
    pub error: u32,
    /// Handle of the request answered.
    pub handle: u64,
}

/// Parses a simple reply header.
pub fn parse_simple_reply(buf: &[u8]) -> Result<Parse<SimpleReply>, BadMagic> {
    if buf.len() < SIMPLE_REPLY_LEN {
        return Ok(Parse::Incomplete);
    }
    let magic = be32(buf);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(BadMagic(u64::from(magic)));
    }
    Ok(Parse::Done(
        SimpleReply {
            error: be32(&buf[4..]),
            handle: be64(&buf[8..]),
        },
        SIMPLE_REPLY_LEN,
    ))
}

/// An option reply header, as parsed by a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReply {
    /// Option answered.
    pub option: u32,
    /// Reply type.
    pub reply: u32,
    /// Length of the data that follows.
    pub length: u32,
}

/// Parses an option reply header.
pub fn parse_option_reply(buf: &[u8]) -> Result<Parse<OptionReply>, BadMagic> {
    if buf.len() < 20 {
        return Ok(Parse::Incomplete);
    }
    let magic = be64(buf);
    if magic != OPTION_REPLY_MAGIC {
        return Err(BadMagic(magic));
    }
    Ok(Parse::Done(
        OptionReply {
            option: be32(&buf[8..]),
            reply: be32(&buf[12..]),
            length: be32(&buf[16..]),
        },
        20,
    ))
}

/// Maps a local I/O error to the NBD error value sent to the client.
pub fn errno_for(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) | Some(libc::EROFS) => EPERM,
        Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => ENOSPC,
        Some(libc::EINVAL) => EINVAL,
        Some(libc::ENOMEM) => ENOMEM,
        Some(libc::EOVERFLOW) => EOVERFLOW,
        Some(libc::EOPNOTSUPP) => ENOTSUP,
        _ => match e.kind() {
            std::io::ErrorKind::InvalidInput => EINVAL,
            std::io::ErrorKind::PermissionDenied => EPERM,
            _ => EIO,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_incomplete() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            kind: CMD_WRITE,
            handle: 0xdead_beef_0102_0304,
            offset: 1 << 40,
            length: 65536,
        };
        let b = encode_request(&r);
        for n in 0..REQUEST_LEN {
            assert_eq!(parse_request(&b[..n]), Ok(Parse::Incomplete));
        }
        assert_eq!(parse_request(&b), Ok(Parse::Done(r, REQUEST_LEN)));
        let mut bad = b;
        bad[0] ^= 1;
        assert!(parse_request(&bad).is_err());
    }

    #[test]
    fn info_request_validation() {
        let mut d = Vec::new();
        d.extend_from_slice(&3u32.to_be_bytes());
        d.extend_from_slice(b"abc");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, "abc");
        assert_eq!(r.requests, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        let mut long = d.clone();
        long[3] = 200;
        assert!(parse_info_request(&long).is_err());
    }
}
