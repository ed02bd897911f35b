//! Fixed-newstyle negotiation (option haggling): greeting, client flags, then options until
//! the client picks an export (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Supported: `EXPORT_NAME`, `GO`, `INFO` (`NBD_INFO_EXPORT`, `_BLOCK_SIZE`, `_NAME`,
//! `_DESCRIPTION`), `LIST`, `ABORT`. Everything else — `STARTTLS`, `STRUCTURED_REPLY`,
//! `EXTENDED_HEADERS`, meta contexts — gets `NBD_REP_ERR_UNSUP`, so clients fall back to
//! simple replies.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::codec::FrameReader;
use super::proto::{self, *};
use super::registry::{Export, ExportRegistry};
use super::server::ServerConfig;
use super::NbdError;

/// Option data we read into memory at most; larger options are skipped and refused.
const MAX_OPTION_DATA: u32 = 16 * 1024;
/// Larger option payloads are not even skipped: the client is disconnected.
const MAX_OPTION_SKIP: u32 = 1 << 20;
/// Options per connection before we decide the client is looping.
const MAX_OPTIONS: usize = 1024;

/// How negotiation ended.
pub(crate) enum Outcome {
    /// Enter transmission on this export.
    Transmission(Arc<Export>),
    /// The client aborted or went away.
    Closed,
}

/// The transmission flags we advertise for a device.
pub(crate) fn transmission_flags(export: &Export) -> u16 {
    let dev = export.device();
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if dev.read_only() {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
    }
    if dev.can_multi_conn() {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// Runs the negotiation on a fresh connection.
pub(crate) async fn negotiate<R, W>(
    rd: &mut FrameReader<R>,
    wr: &mut W,
    registry: &ExportRegistry,
    config: &ServerConfig,
) -> Result<Outcome, NbdError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&NBD_MAGIC.to_be_bytes());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&out).await?;

    let Some(client_flags) = rd.read_frame(parse_client_flags).await? else {
        return Ok(Outcome::Closed);
    };
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let fixed = client_flags & FLAG_C_FIXED_NEWSTYLE != 0;
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let max_block = config.max_request;

    for _ in 0..MAX_OPTIONS {
        let Some(opt) = rd.read_frame(parse_option_header).await? else {
            return Ok(Outcome::Closed);
        };
        out.clear();
        if opt.length > MAX_OPTION_DATA {
            if !fixed || opt.length > MAX_OPTION_SKIP {
                return Err(NbdError::Protocol(format!(
                    "option {} with {} bytes of data",
                    opt.option, opt.length
                )));
            }
            rd.skip(u64::from(opt.length)).await?;
            put_option_reply(
                &mut out,
                opt.option,
                REP_ERR_TOO_BIG,
                b"option data too large",
            );
            wr.write_all(&out).await?;
            continue;
        }
        let mut data = vec![0u8; opt.length as usize];
        rd.read_exact_into(&mut data).await?;
        if !fixed && opt.option != OPT_EXPORT_NAME {
            // Non-fixed newstyle has no way to refuse an option: hang up.
            return Err(NbdError::Protocol(format!(
                "option {} from a non-fixed-newstyle client",
                opt.option
            )));
        }
        match opt.option {
            OPT_EXPORT_NAME => {
                let name = proto::parse_name(&data).map_err(|e| NbdError::Protocol(e.0.into()))?;
                // No error reply exists for EXPORT_NAME: an unknown name ends the session.
                let export = registry.get(&name).ok_or(NbdError::UnknownExport(name))?;
                out.extend_from_slice(&export.device().size().to_be_bytes());
                out.extend_from_slice(&transmission_flags(&export).to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                wr.write_all(&out).await?;
                return Ok(Outcome::Transmission(export));
            }
            OPT_ABORT => {
                put_option_reply(&mut out, opt.option, REP_ACK, &[]);
                // The client may already be gone; that is fine.
                let _ = wr.write_all(&out).await;
                return Ok(Outcome::Closed);
            }
            OPT_LIST => {
                if data.is_empty() {
                    for e in registry.list() {
                        put_rep_server(&mut out, e.name(), e.description());
                    }
                    put_option_reply(&mut out, opt.option, REP_ACK, &[]);
                } else {
                    put_option_reply(&mut out, opt.option, REP_ERR_INVALID, b"LIST takes no data");
                }
            }
            OPT_INFO | OPT_GO => match parse_info_request(&data) {
                Err(e) => put_option_reply(&mut out, opt.option, REP_ERR_INVALID, e.0.as_bytes()),
                Ok(req) => match registry.get(&req.name) {
                    None => {
                        let msg = format!("no export named {:?}", req.name);
                        put_option_reply(&mut out, opt.option, REP_ERR_UNKNOWN, msg.as_bytes());
                    }
                    Some(export) => {
                        let size = export.device().size();
                        put_info_export(&mut out, opt.option, size, transmission_flags(&export));
                        if req.requests.contains(&INFO_NAME) {
                            put_info_string(&mut out, opt.option, INFO_NAME, export.name());
                        }
                        if req.requests.contains(&INFO_DESCRIPTION)
                            && !export.description().is_empty()
                        {
                            put_info_string(
                                &mut out,
                                opt.option,
                                INFO_DESCRIPTION,
                                export.description(),
                            );
                        }
                        // Sent even unrequested (allowed): byte-granular, 4 KiB preferred.
                        put_info_block_size(&mut out, opt.option, 1, 4096, max_block.max(4096));
                        put_option_reply(&mut out, opt.option, REP_ACK, &[]);
                        if opt.option == OPT_GO {
                            wr.write_all(&out).await?;
                            return Ok(Outcome::Transmission(export));
                        }
                    }
                },
            },
            OPT_STARTTLS => {
                put_option_reply(&mut out, opt.option, REP_ERR_UNSUP, b"TLS is not supported");
            }
            _ => {
                // STRUCTURED_REPLY, EXTENDED_HEADERS, meta contexts and unknown options.
                put_option_reply(&mut out, opt.option, REP_ERR_UNSUP, &[]);
            }
        }
        wr.write_all(&out).await?;
    }
    Err(NbdError::Protocol("too many options".into()))
}
