//! Option haggling: the fixed-newstyle handshake, from the greeting to transmission, an abort,
//! or a closed connection.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::export::{Export, ExportInfo};
use crate::framing::{discard, read_header_or_stop, HeaderRead};
use crate::proto::*;
use crate::{NbdError, NbdServer, OPTIONS_MAX, OPTION_BYTES_MAX, OPTION_DISCARD_BYTES_MAX};

/// Context id given to `base:allocation` by `NBD_OPT_SET_META_CONTEXT`.
pub(crate) const ALLOCATION_CONTEXT_ID: u32 = 1;

/// What the handshake agreed on, for the transmission phase.
pub(crate) struct Session {
    /// The export in use.
    pub(crate) export: Arc<dyn Export>,
    /// Size of the export when the handshake ended, in bytes; requests are checked against it.
    pub(crate) size_bytes: u64,
    /// The export was read-only when the handshake ended (`NBD_FLAG_READ_ONLY` was sent).
    pub(crate) read_only: bool,
    /// Structured replies were negotiated.
    pub(crate) structured: bool,
    /// The id of `base:allocation` when the client selected it for this export.
    pub(crate) allocation_context: Option<u32>,
}

/// Run the handshake on `stream`: `Some` to enter transmission, `None` when the client aborted
/// or closed the connection between options.
///
/// # Cancel safety
///
/// Not cancel safe (it is cut off by the handshake timeout, after which the stream is dropped).
pub(crate) async fn negotiate<S>(
    stream: &mut S,
    server: &NbdServer,
    stop: &mut watch::Receiver<bool>,
) -> Result<Option<Session>, NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut greeting = Vec::with_capacity(GREETING_BYTES);
    greeting.extend_from_slice(&NBDMAGIC.to_be_bytes());
    greeting.extend_from_slice(&IHAVEOPT.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    stream.write_all(&greeting).await?;
    stream.flush().await?;

    let mut flags = [0u8; 4];
    match read_header_or_stop(stream, &mut flags, stop).await? {
        HeaderRead::Complete => {}
        HeaderRead::Closed | HeaderRead::Stopped => return Ok(None),
    }
    let flags = u32::from_be_bytes(flags);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(NbdError::UnknownClientFlags { flags });
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(NbdError::FixedNewstyleRequired { flags });
    }
    let mut haggle = Haggle {
        stream,
        server,
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        allocation_selected_for: None,
    };
    for _ in 0..OPTIONS_MAX {
        let mut header = [0u8; OPTION_HEADER_BYTES];
        match read_header_or_stop(haggle.stream, &mut header, stop).await? {
            HeaderRead::Complete => {}
            HeaderRead::Closed | HeaderRead::Stopped => return Ok(None),
        }
        let (magic, option, length_bytes) = parse_option_header(header);
        if magic != IHAVEOPT {
            return Err(NbdError::BadOptionMagic { magic });
        }
        let stopping = *stop.borrow();
        match haggle.option(option, length_bytes, stopping).await? {
            Next::Continue => {}
            Next::Transmit(session) => return Ok(Some(session)),
            Next::Close => return Ok(None),
        }
    }
    Err(NbdError::TooManyOptions { limit: OPTIONS_MAX })
}

/// What follows an option.
enum Next {
    /// Read the next option.
    Continue,
    /// Enter transmission.
    Transmit(Session),
    /// Close the connection without an error (abort, or a refusal during shutdown).
    Close,
}

/// The state of option haggling on one connection.
struct Haggle<'a, S> {
    stream: &'a mut S,
    server: &'a NbdServer,
    /// The client set `NBD_FLAG_C_NO_ZEROES`.
    no_zeroes: bool,
    /// `NBD_OPT_STRUCTURED_REPLY` was acknowledged.
    structured: bool,
    /// The export name of the last successful `NBD_OPT_SET_META_CONTEXT` that selected
    /// `base:allocation`; the context is only active if the client then goes to that export.
    allocation_selected_for: Option<String>,
}

impl<S> Haggle<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    /// Handle one option whose header has been read.
    async fn option(&mut self, option: u32, length_bytes: u32, stopping: bool) -> Result<Next, NbdError> {
        if length_bytes > OPTION_BYTES_MAX {
            // NBD_OPT_EXPORT_NAME has no error reply, and skipping more than a little would
            // let one client waste the server's bandwidth, so both close the connection.
            let limit_bytes =
                if option == OPT_EXPORT_NAME { OPTION_BYTES_MAX } else { OPTION_DISCARD_BYTES_MAX };
            if length_bytes > limit_bytes {
                return Err(NbdError::OptionTooLarge { option, length_bytes, limit_bytes });
            }
            discard(self.stream, u64::from(length_bytes)).await?;
            self.reply_error(option, REP_ERR_TOO_BIG, "option data too large").await?;
            return Ok(Next::Continue);
        }
        let mut data = vec![0u8; length_bytes as usize];
        self.stream.read_exact(&mut data).await?;

        if stopping && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                // Cannot be refused with an error reply; closing is all that is left.
                return Ok(Next::Close);
            }
            self.reply_error(option, REP_ERR_SHUTDOWN, "server is shutting down").await?;
            return Ok(Next::Continue);
        }
        match option {
            OPT_EXPORT_NAME => self.export_name(&data).await.map(Next::Transmit),
            OPT_ABORT => {
                // The client may already have closed without waiting for the ACK, which the
                // spec allows, so a failed write here is not an error.
                let mut reply = Vec::new();
                put_option_reply(&mut reply, option, REP_ACK, &[]);
                let _ = self.send(&reply).await;
                Ok(Next::Close)
            }
            OPT_LIST => self.list(&data).await.map(|()| Next::Continue),
            OPT_INFO | OPT_GO => Ok(match self.info_or_go(option, &data).await? {
                Some(session) => Next::Transmit(session),
                None => Next::Continue,
            }),
            OPT_STRUCTURED_REPLY => self.structured_reply(&data).await.map(|()| Next::Continue),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, &data).await.map(|()| Next::Continue)
            }
            _ => {
                self.reply_error(option, REP_ERR_UNSUP, "option not supported").await.map(|()| Next::Continue)
            }
        }
    }

    /// `NBD_OPT_EXPORT_NAME`: enter transmission, or close when the export does not exist.
    async fn export_name(&mut self, data: &[u8]) -> Result<Session, NbdError> {
        let unknown = || NbdError::UnknownExport {
            name: truncate_utf8(&String::from_utf8_lossy(data), 256).to_owned(),
        };
        let name = std::str::from_utf8(data).map_err(|_| unknown())?;
        let (export, info) = self.open(name).await?.ok_or_else(unknown)?;
        let flags = transmission_flags(&info, self.structured);
        let mut reply = Vec::with_capacity(10 + EXPORT_NAME_ZEROES_BYTES);
        reply.extend_from_slice(&info.size_bytes.to_be_bytes());
        reply.extend_from_slice(&flags.to_be_bytes());
        if !self.no_zeroes {
            reply.resize(reply.len() + EXPORT_NAME_ZEROES_BYTES, 0);
        }
        self.send(&reply).await?;
        Ok(self.session(name, export, &info))
    }

    /// `NBD_OPT_LIST`: one `NBD_REP_SERVER` per export, then `NBD_REP_ACK`.
    async fn list(&mut self, data: &[u8]) -> Result<(), NbdError> {
        if !data.is_empty() {
            return self.reply_error(OPT_LIST, REP_ERR_INVALID, "NBD_OPT_LIST takes no data").await;
        }
        let provider = Arc::clone(&self.server.provider);
        let exports = tokio::task::spawn_blocking(move || provider.list())
            .await
            .map_err(|error| NbdError::LookupFailed(error.to_string()))?;
        let mut reply = Vec::new();
        for info in &exports {
            let description = truncate_utf8(&info.description, STRING_BYTES_MAX);
            let mut entry = Vec::with_capacity(4 + info.name.len() + description.len());
            entry.extend_from_slice(&(info.name.len() as u32).to_be_bytes());
            entry.extend_from_slice(info.name.as_bytes());
            entry.extend_from_slice(description.as_bytes());
            put_option_reply(&mut reply, OPT_LIST, REP_SERVER, &entry);
        }
        put_option_reply(&mut reply, OPT_LIST, REP_ACK, &[]);
        self.send(&reply).await
    }

    /// `NBD_OPT_INFO` and `NBD_OPT_GO`: describe the export; `GO` then enters transmission.
    async fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Option<Session>, NbdError> {
        let Some((name, requests)) = parse_info_request(data) else {
            self.reply_error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/NBD_OPT_GO data").await?;
            return Ok(None);
        };
        let Ok(name) = std::str::from_utf8(name) else {
            self.reply_error(option, REP_ERR_UNKNOWN, "export name is not UTF-8").await?;
            return Ok(None);
        };
        let Some((export, info)) = self.open(name).await? else {
            self.reply_error(option, REP_ERR_UNKNOWN, "no such export").await?;
            return Ok(None);
        };
        let flags = transmission_flags(&info, self.structured);
        let mut reply = Vec::new();
        let mut item = Vec::with_capacity(12);
        item.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        item.extend_from_slice(&info.size_bytes.to_be_bytes());
        item.extend_from_slice(&flags.to_be_bytes());
        put_option_reply(&mut reply, option, REP_INFO, &item);
        if requests.contains(&INFO_NAME) {
            let mut item = INFO_NAME.to_be_bytes().to_vec();
            item.extend_from_slice(info.name.as_bytes());
            put_option_reply(&mut reply, option, REP_INFO, &item);
        }
        if requests.contains(&INFO_DESCRIPTION) {
            let mut item = INFO_DESCRIPTION.to_be_bytes().to_vec();
            item.extend_from_slice(truncate_utf8(&info.description, STRING_BYTES_MAX).as_bytes());
            put_option_reply(&mut reply, option, REP_INFO, &item);
        }
        // Sent even when not requested: the spec lets a server send information the client did
        // not ask for, and a client that does not understand it ignores it.
        let mut item = Vec::with_capacity(14);
        item.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        item.extend_from_slice(&1u32.to_be_bytes());
        item.extend_from_slice(&preferred_block_bytes(info.block_size_bytes).to_be_bytes());
        item.extend_from_slice(&self.server.limits.payload_bytes_max.to_be_bytes());
        put_option_reply(&mut reply, option, REP_INFO, &item);
        put_option_reply(&mut reply, option, REP_ACK, &[]);
        self.send(&reply).await?;
        if option == OPT_GO {
            return Ok(Some(self.session(name, export, &info)));
        }
        Ok(None)
    }

    /// `NBD_OPT_STRUCTURED_REPLY`.
    async fn structured_reply(&mut self, data: &[u8]) -> Result<(), NbdError> {
        let refusal = if !data.is_empty() {
            Some("NBD_OPT_STRUCTURED_REPLY takes no data")
        } else if self.structured {
            Some("structured replies are already negotiated")
        } else {
            None
        };
        if let Some(message) = refusal {
            return self.reply_error(OPT_STRUCTURED_REPLY, REP_ERR_INVALID, message).await;
        }
        self.structured = true;
        let mut reply = Vec::new();
        put_option_reply(&mut reply, OPT_STRUCTURED_REPLY, REP_ACK, &[]);
        self.send(&reply).await
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`; the only context is
    /// `base:allocation`, and queries for anything else are ignored as the spec requires.
    async fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.allocation_selected_for = None;
            if !self.structured {
                return self
                    .reply_error(
                        option,
                        REP_ERR_INVALID,
                        "negotiate structured replies before metadata contexts",
                    )
                    .await;
            }
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return self.reply_error(option, REP_ERR_INVALID, "malformed metadata context request").await;
        };
        let Ok(name) = std::str::from_utf8(name) else {
            return self.reply_error(option, REP_ERR_UNKNOWN, "export name is not UTF-8").await;
        };
        if self.open(name).await?.is_none() {
            return self.reply_error(option, REP_ERR_UNKNOWN, "no such export").await;
        }
        let selects_allocation =
            |query: &[u8]| query == BASE_ALLOCATION.as_bytes() || (!set && query == b"base:");
        let matched = if set {
            queries.iter().any(|query| selects_allocation(query))
        } else {
            queries.is_empty() || queries.iter().any(|query| selects_allocation(query))
        };
        let mut reply = Vec::new();
        if matched {
            // LIST replies carry a reserved id of zero; SET replies carry the real one.
            let id = if set { ALLOCATION_CONTEXT_ID } else { 0 };
            let mut item = id.to_be_bytes().to_vec();
            item.extend_from_slice(BASE_ALLOCATION.as_bytes());
            put_option_reply(&mut reply, option, REP_META_CONTEXT, &item);
            if set {
                self.allocation_selected_for = Some(name.to_owned());
            }
        }
        put_option_reply(&mut reply, option, REP_ACK, &[]);
        self.send(&reply).await
    }

    /// The session for `name`, which the client is entering transmission with.
    fn session(&self, name: &str, export: Arc<dyn Export>, info: &ExportInfo) -> Session {
        let allocation_context =
            (self.allocation_selected_for.as_deref() == Some(name)).then_some(ALLOCATION_CONTEXT_ID);
        Session {
            export,
            size_bytes: info.size_bytes,
            read_only: info.read_only,
            structured: self.structured,
            allocation_context,
        }
    }

    /// Look an export up by name off the async threads (the provider may block).
    async fn open(&self, name: &str) -> Result<Option<(Arc<dyn Export>, ExportInfo)>, NbdError> {
        let provider = Arc::clone(&self.server.provider);
        let name = name.to_owned();
        tokio::task::spawn_blocking(move || {
            provider.open(&name).map(|export| {
                let info = export.info();
                (export, info)
            })
        })
        .await
        .map_err(|error| NbdError::LookupFailed(error.to_string()))
    }

    async fn reply_error(&mut self, option: u32, kind: u32, message: &str) -> Result<(), NbdError> {
        let mut reply = Vec::new();
        put_option_reply(&mut reply, option, kind, message.as_bytes());
        self.send(&reply).await
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), NbdError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }
}

/// Transmission flags for `info`: everything this server supports, minus the writing commands
/// on a read-only export, plus `SEND_DF` once structured replies are on (reads are always one
/// chunk, so "don't fragment" costs nothing).
pub(crate) fn transmission_flags(info: &ExportInfo, structured: bool) -> u16 {
    let mut flags =
        TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN | TFLAG_SEND_CACHE;
    if info.read_only {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

/// The preferred block size to advertise: the export's, when it is one the spec allows (a
/// power of two from 512 to 64 KiB), else the spec's default of 4096.
fn preferred_block_bytes(block_size_bytes: u32) -> u32 {
    if block_size_bytes.is_power_of_two() && (512..=65536).contains(&block_size_bytes) {
        block_size_bytes
    } else {
        4096
    }
}

/// Split `NBD_OPT_INFO`/`NBD_OPT_GO` data into the export name and the information requests;
/// `None` when the lengths inside do not add up to the option length.
fn parse_info_request(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut cursor = Cursor::new(data);
    let name_bytes = cursor.u32()?;
    let name = cursor.bytes(usize::try_from(name_bytes).ok()?)?;
    let count = cursor.u16()?;
    let mut requests = Vec::with_capacity(usize::from(count).min(cursor.remaining() / 2));
    for _ in 0..count {
        requests.push(cursor.u16()?);
    }
    (cursor.remaining() == 0).then_some((name, requests))
}

/// Split metadata context option data into the export name and the queries; `None` when the
/// lengths inside do not add up to the option length.
fn parse_meta_request(data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let mut cursor = Cursor::new(data);
    let name_bytes = cursor.u32()?;
    let name = cursor.bytes(usize::try_from(name_bytes).ok()?)?;
    let count = cursor.u32()?;
    // Each query takes at least 4 bytes, which bounds the allocation by the data received
    // rather than by the count the client claims.
    let mut queries = Vec::with_capacity(usize::try_from(count).ok()?.min(cursor.remaining() / 4));
    for _ in 0..count {
        let query_bytes = cursor.u32()?;
        queries.push(cursor.bytes(usize::try_from(query_bytes).ok()?)?);
    }
    (cursor.remaining() == 0).then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(read_only: bool) -> ExportInfo {
        ExportInfo {
            name: "v".into(),
            description: String::new(),
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
            read_only,
        }
    }

    #[test]
    fn read_only_exports_do_not_advertise_writing_commands() {
        let writable = transmission_flags(&info(false), true);
        assert_eq!(writable, 0b1101_1110_1101);
        let read_only = transmission_flags(&info(true), false);
        assert_eq!(read_only & TFLAG_READ_ONLY, TFLAG_READ_ONLY);
        assert_eq!(read_only & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO), 0);
        assert_eq!(read_only & TFLAG_SEND_DF, 0, "DF needs structured replies");
    }

    #[test]
    fn preferred_block_size_falls_back_when_the_export_reports_nonsense() {
        assert_eq!(preferred_block_bytes(512), 512);
        assert_eq!(preferred_block_bytes(65536), 65536);
        assert_eq!(preferred_block_bytes(0), 4096);
        assert_eq!(preferred_block_bytes(256), 4096);
        assert_eq!(preferred_block_bytes(3000), 4096);
        assert_eq!(preferred_block_bytes(1 << 20), 4096);
    }

    #[test]
    fn info_request_lengths_must_add_up() {
        let mut data = 3u32.to_be_bytes().to_vec();
        data.extend_from_slice(b"vol");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&INFO_NAME.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        let (name, requests) = parse_info_request(&data).expect("well formed");
        assert_eq!(name, b"vol");
        assert_eq!(requests, vec![INFO_NAME, INFO_BLOCK_SIZE]);

        let mut trailing = data.clone();
        trailing.push(0);
        assert!(parse_info_request(&trailing).is_none());
        assert!(parse_info_request(&data[..data.len() - 1]).is_none());
        let mut long_name = data.clone();
        long_name[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_info_request(&long_name).is_none());
        assert!(parse_info_request(&[]).is_none());
    }

    #[test]
    fn meta_request_lengths_must_add_up() {
        let mut data = 1u32.to_be_bytes().to_vec();
        data.push(b'v');
        data.extend_from_slice(&2u32.to_be_bytes());
        for query in [&b"base:allocation"[..], b"qemu:dirty-bitmap:x"] {
            data.extend_from_slice(&(query.len() as u32).to_be_bytes());
            data.extend_from_slice(query);
        }
        let (name, queries) = parse_meta_request(&data).expect("well formed");
        assert_eq!(name, b"v");
        assert_eq!(queries, vec![&b"base:allocation"[..], b"qemu:dirty-bitmap:x"]);

        // A count far beyond the data must fail without allocating for it.
        let mut huge_count = 1u32.to_be_bytes().to_vec();
        huge_count.push(b'v');
        huge_count.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_meta_request(&huge_count).is_none());
        assert!(parse_meta_request(&data[..data.len() - 1]).is_none());
    }
}
