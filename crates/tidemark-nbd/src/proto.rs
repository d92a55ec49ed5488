//! Wire constants and byte layouts of the NBD protocol (fixed newstyle with structured replies).
//!
//! Everything here is pure encoding and decoding of byte buffers, with no I/O, so each layout can
//! be checked byte for byte in unit tests. All integers on the wire are big-endian. The numbers and
//! names follow `shared/reference/nbd-protocol.md`.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub(crate) const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the greeting, and the first 8 bytes of every client option.
pub(crate) const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic that starts every fixed-newstyle option reply.
pub(crate) const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// `NBD_REQUEST_MAGIC`: first 4 bytes of every transmission request.
pub(crate) const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`: first 4 bytes of a simple reply.
pub(crate) const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`: first 4 bytes of a structured reply chunk.
pub(crate) const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE` (server to client).
pub(crate) const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES` (server to client).
pub(crate) const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub(crate) const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub(crate) const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag `NBD_FLAG_HAS_FLAGS`: always set.
pub(crate) const TFLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag `NBD_FLAG_READ_ONLY`.
pub(crate) const TFLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag `NBD_FLAG_SEND_FLUSH`.
pub(crate) const TFLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag `NBD_FLAG_SEND_FUA`.
pub(crate) const TFLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag `NBD_FLAG_SEND_TRIM`.
pub(crate) const TFLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag `NBD_FLAG_SEND_WRITE_ZEROES`.
pub(crate) const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag `NBD_FLAG_SEND_DF`.
pub(crate) const TFLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag `NBD_FLAG_CAN_MULTI_CONN`.
pub(crate) const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag `NBD_FLAG_SEND_CACHE`.
pub(crate) const TFLAG_SEND_CACHE: u16 = 1 << 10;
/// Transmission flag `NBD_FLAG_SEND_FAST_ZERO`.
pub(crate) const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option `NBD_OPT_EXPORT_NAME`.
pub(crate) const OPT_EXPORT_NAME: u32 = 1;
/// Option `NBD_OPT_ABORT`.
pub(crate) const OPT_ABORT: u32 = 2;
/// Option `NBD_OPT_LIST`.
pub(crate) const OPT_LIST: u32 = 3;
/// Option `NBD_OPT_INFO`.
pub(crate) const OPT_INFO: u32 = 6;
/// Option `NBD_OPT_GO`.
pub(crate) const OPT_GO: u32 = 7;
/// Option `NBD_OPT_STRUCTURED_REPLY`.
pub(crate) const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option `NBD_OPT_LIST_META_CONTEXT`.
pub(crate) const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option `NBD_OPT_SET_META_CONTEXT`.
pub(crate) const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply `NBD_REP_ACK`.
pub(crate) const REP_ACK: u32 = 1;
/// Option reply `NBD_REP_SERVER`.
pub(crate) const REP_SERVER: u32 = 2;
/// Option reply `NBD_REP_INFO`.
pub(crate) const REP_INFO: u32 = 3;
/// Option reply `NBD_REP_META_CONTEXT`.
pub(crate) const REP_META_CONTEXT: u32 = 4;
/// Option reply `NBD_REP_ERR_UNSUP`.
pub(crate) const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option reply `NBD_REP_ERR_INVALID`.
pub(crate) const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option reply `NBD_REP_ERR_UNKNOWN`.
pub(crate) const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option reply `NBD_REP_ERR_SHUTDOWN`.
pub(crate) const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
/// Option reply `NBD_REP_ERR_TOO_BIG`.
pub(crate) const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information type `NBD_INFO_EXPORT`.
pub(crate) const INFO_EXPORT: u16 = 0;
/// Information type `NBD_INFO_NAME`.
pub(crate) const INFO_NAME: u16 = 1;
/// Information type `NBD_INFO_DESCRIPTION`.
pub(crate) const INFO_DESCRIPTION: u16 = 2;
/// Information type `NBD_INFO_BLOCK_SIZE`.
pub(crate) const INFO_BLOCK_SIZE: u16 = 3;

/// Command `NBD_CMD_READ`.
pub(crate) const CMD_READ: u16 = 0;
/// Command `NBD_CMD_WRITE`.
pub(crate) const CMD_WRITE: u16 = 1;
/// Command `NBD_CMD_DISC`.
pub(crate) const CMD_DISC: u16 = 2;
/// Command `NBD_CMD_FLUSH`.
pub(crate) const CMD_FLUSH: u16 = 3;
/// Command `NBD_CMD_TRIM`.
pub(crate) const CMD_TRIM: u16 = 4;
/// Command `NBD_CMD_CACHE`.
pub(crate) const CMD_CACHE: u16 = 5;
/// Command `NBD_CMD_WRITE_ZEROES`.
pub(crate) const CMD_WRITE_ZEROES: u16 = 6;
/// Command `NBD_CMD_BLOCK_STATUS`.
pub(crate) const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag `NBD_CMD_FLAG_FUA`.
pub(crate) const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE`.
pub(crate) const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag `NBD_CMD_FLAG_DF`.
pub(crate) const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag `NBD_CMD_FLAG_REQ_ONE`.
pub(crate) const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag `NBD_CMD_FLAG_FAST_ZERO`.
pub(crate) const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag `NBD_REPLY_FLAG_DONE`.
pub(crate) const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply type `NBD_REPLY_TYPE_NONE`.
pub(crate) const REPLY_TYPE_NONE: u16 = 0;
/// Structured reply type `NBD_REPLY_TYPE_OFFSET_DATA`.
pub(crate) const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Structured reply type `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub(crate) const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Structured reply type `NBD_REPLY_TYPE_ERROR`.
pub(crate) const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` flag `NBD_STATE_HOLE`.
pub(crate) const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` flag `NBD_STATE_ZERO`.
pub(crate) const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context this server offers.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";

/// Size of the server greeting: NBDMAGIC, IHAVEOPT, 16-bit handshake flags.
pub(crate) const GREETING_BYTES: usize = 18;
/// Size of an option header: IHAVEOPT, 32-bit option, 32-bit data length.
pub(crate) const OPTION_HEADER_BYTES: usize = 16;
/// Size of a transmission request header.
pub(crate) const REQUEST_HEADER_BYTES: usize = 28;
/// Size of a simple reply header.
pub(crate) const SIMPLE_REPLY_BYTES: usize = 16;
/// Size of a structured reply chunk header.
pub(crate) const CHUNK_HEADER_BYTES: usize = 20;
/// Size of the offset field that starts an `NBD_REPLY_TYPE_OFFSET_DATA` payload.
pub(crate) const OFFSET_DATA_PREFIX_BYTES: usize = 8;
/// Reserved zero bytes after the `NBD_OPT_EXPORT_NAME` reply unless NO_ZEROES was negotiated.
pub(crate) const EXPORT_NAME_ZEROES_BYTES: usize = 124;
/// Strings on the wire must not exceed this many bytes.
pub(crate) const STRING_BYTES_MAX: usize = 4096;

/// An NBD error value, as sent in simple replies and error chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum WireError {
    /// `NBD_EPERM`: write to a read-only export.
    Perm,
    /// `NBD_EIO`: storage failure.
    Io,
    /// `NBD_EINVAL`: bad flags, bad command, out-of-range read.
    Inval,
    /// `NBD_ENOSPC`: out of space, or a write past the end of the export.
    NoSpc,
    /// `NBD_EOVERFLOW`: a structured read longer than the maximum payload.
    Overflow,
    /// `NBD_ESHUTDOWN`: the export or server is shutting down.
    Shutdown,
}

impl WireError {
    /// The number sent on the wire.
    pub(crate) fn code(self) -> u32 {
        match self {
            WireError::Perm => 1,
            WireError::Io => 5,
            WireError::Inval => 22,
            WireError::NoSpc => 28,
            WireError::Overflow => 75,
            WireError::Shutdown => 108,
        }
    }
}

/// A decoded transmission request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub(crate) flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub(crate) kind: u16,
    /// Opaque client cookie, echoed in the reply.
    pub(crate) cookie: u64,
    /// First byte of the request, in bytes from the start of the export.
    pub(crate) offset: u64,
    /// Length of the request in bytes.
    pub(crate) length: u32,
}

/// Decode a request header; `Err` carries the magic when it is not `NBD_REQUEST_MAGIC`.
pub(crate) fn parse_request(header: &[u8; REQUEST_HEADER_BYTES]) -> Result<Request, u32> {
    let mut cursor = Cursor::new(header);
    // The header is exactly REQUEST_HEADER_BYTES long, so these reads cannot run short; the
    // fallbacks only keep the function free of panics.
    let magic = cursor.u32().unwrap_or(0);
    if magic != REQUEST_MAGIC {
        return Err(magic);
    }
    Ok(Request {
        flags: cursor.u16().unwrap_or(0),
        kind: cursor.u16().unwrap_or(0),
        cookie: cursor.u64().unwrap_or(0),
        offset: cursor.u64().unwrap_or(0),
        length: cursor.u32().unwrap_or(0),
    })
}

/// Decode an option header into (magic, option, data length in bytes).
pub(crate) fn parse_option_header(header: [u8; OPTION_HEADER_BYTES]) -> (u64, u32, u32) {
    let [m0, m1, m2, m3, m4, m5, m6, m7, o0, o1, o2, o3, l0, l1, l2, l3] = header;
    (
        u64::from_be_bytes([m0, m1, m2, m3, m4, m5, m6, m7]),
        u32::from_be_bytes([o0, o1, o2, o3]),
        u32::from_be_bytes([l0, l1, l2, l3]),
    )
}

/// Append a simple reply header.
pub(crate) fn put_simple_reply(buf: &mut Vec<u8>, error: u32, cookie: u64) {
    buf.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&error.to_be_bytes());
    buf.extend_from_slice(&cookie.to_be_bytes());
}

/// Append a structured reply chunk header announcing `length` payload bytes.
pub(crate) fn put_chunk_header(buf: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, length: u32) {
    buf.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&flags.to_be_bytes());
    buf.extend_from_slice(&kind.to_be_bytes());
    buf.extend_from_slice(&cookie.to_be_bytes());
    buf.extend_from_slice(&length.to_be_bytes());
}

/// Append a final `NBD_REPLY_TYPE_ERROR` chunk carrying `message` (cut to a valid length).
pub(crate) fn put_error_chunk(buf: &mut Vec<u8>, cookie: u64, error: WireError, message: &str) {
    let message = truncate_utf8(message, ERROR_MESSAGE_BYTES_MAX);
    // ERROR_MESSAGE_BYTES_MAX fits in u16, so the casts below cannot truncate.
    let message_bytes = message.len() as u16;
    put_chunk_header(buf, REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, 6 + u32::from(message_bytes));
    buf.extend_from_slice(&error.code().to_be_bytes());
    buf.extend_from_slice(&message_bytes.to_be_bytes());
    buf.extend_from_slice(message.as_bytes());
}

/// Longest human-readable message put in an error chunk; the spec allows 4096 but a line of
/// text is all a client shows.
const ERROR_MESSAGE_BYTES_MAX: usize = 256;

/// Append a fixed-newstyle option reply.
pub(crate) fn put_option_reply(buf: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    buf.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&kind.to_be_bytes());
    // Option reply data is built by this server from bounded pieces (names, descriptions of at
    // most a few KiB), so it always fits the 32-bit length.
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
}

/// The longest prefix of `text` that is at most `bytes_max` bytes and ends on a char boundary.
pub(crate) fn truncate_utf8(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.get(..end).unwrap_or("")
}

/// A reader over a byte slice that never panics: every read past the end returns `None`.
pub(crate) struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Start reading at the beginning of `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Cursor { rest: bytes }
    }

    /// Take the next `count` bytes.
    pub(crate) fn bytes(&mut self, count: usize) -> Option<&'a [u8]> {
        let (head, tail) = self.rest.split_at_checked(count)?;
        self.rest = tail;
        Some(head)
    }

    /// Take a big-endian u16.
    pub(crate) fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes(self.bytes(2)?.try_into().ok()?))
    }

    /// Take a big-endian u32.
    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.bytes(4)?.try_into().ok()?))
    }

    /// Take a big-endian u64.
    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.bytes(8)?.try_into().ok()?))
    }

    /// Bytes not yet read.
    pub(crate) fn remaining(&self) -> usize {
        self.rest.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_header_decodes_big_endian_fields() {
        let mut header = [0u8; REQUEST_HEADER_BYTES];
        header[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&0x0011u16.to_be_bytes());
        header[6..8].copy_from_slice(&CMD_WRITE.to_be_bytes());
        header[8..16].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        header[16..24].copy_from_slice(&4096u64.to_be_bytes());
        header[24..28].copy_from_slice(&512u32.to_be_bytes());
        let request = parse_request(&header).expect("valid magic");
        assert_eq!(
            request,
            Request {
                flags: 0x11,
                kind: CMD_WRITE,
                cookie: 0x0102_0304_0506_0708,
                offset: 4096,
                length: 512
            }
        );
        header[0] ^= 0xff;
        assert_eq!(parse_request(&header), Err(REQUEST_MAGIC ^ 0xff00_0000));
    }

    #[test]
    fn error_chunk_layout_matches_the_spec() {
        let mut buf = Vec::new();
        put_error_chunk(&mut buf, 7, WireError::Inval, "bad");
        let mut expected = Vec::new();
        expected.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        expected.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        expected.extend_from_slice(&REPLY_TYPE_ERROR.to_be_bytes());
        expected.extend_from_slice(&7u64.to_be_bytes());
        expected.extend_from_slice(&9u32.to_be_bytes());
        expected.extend_from_slice(&22u32.to_be_bytes());
        expected.extend_from_slice(&3u16.to_be_bytes());
        expected.extend_from_slice(b"bad");
        assert_eq!(buf, expected);
    }

    #[test]
    fn long_error_messages_are_cut_on_a_char_boundary() {
        let message = "é".repeat(200); // 400 bytes of two-byte characters
        let mut buf = Vec::new();
        put_error_chunk(&mut buf, 1, WireError::Io, &message);
        let message_bytes = u16::from_be_bytes([buf[24], buf[25]]) as usize;
        assert_eq!(message_bytes, ERROR_MESSAGE_BYTES_MAX);
        assert!(std::str::from_utf8(&buf[26..]).is_ok());
        assert_eq!(buf.len(), CHUNK_HEADER_BYTES + 6 + message_bytes);
        assert_eq!(truncate_utf8("aé", 2), "a");
    }

    #[test]
    fn cursor_never_reads_past_the_end() {
        let mut cursor = Cursor::new(&[0, 1, 2]);
        assert_eq!(cursor.u16(), Some(1));
        assert_eq!(cursor.u32(), None);
        assert_eq!(cursor.remaining(), 1);
        assert_eq!(cursor.bytes(2), None);
        assert_eq!(cursor.bytes(1), Some(&[2u8][..]));
    }
}
