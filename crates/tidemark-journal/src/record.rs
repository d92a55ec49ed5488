//! One journal record: its on-disk encoding, checksum and place in the hash chain.
//!
//! Layout (little-endian), see docs/internals/journal.md:
//!
//! ```text
//! 0   4  magic "TMR1"                8  8  seq
//! 4   4  total length in bytes       ...
//! ```
//!
//! Header (64 bytes), payload (`payload_len` bytes), checksum (16 bytes: blake3 of header and
//! payload, truncated), chain (32 bytes: blake3 of the previous chain and this checksum).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{ChainHash, Generation, JournalError, Seq, UnixNanos, VolumeId};

/// Marks the first byte of every record.
pub const RECORD_MAGIC: [u8; 4] = *b"TMR1";
/// Bytes of the fixed header.
pub const HEADER_BYTES: usize = 64;
/// Bytes after the payload: checksum (16) and chain (32).
pub const TRAILER_BYTES: usize = 48;
/// Offset of the durable-lag field in the header; it is excluded from the content hash.
const DURABLE_LAG_OFFSET: usize = 60;
/// Largest payload one record may carry (a 32 MiB NBD write fits in one record).
pub const PAYLOAD_BYTES_MAX: usize = 32 << 20;

/// What a record does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordBody {
    /// Write `data` at byte `offset` of `volume`.
    Write {
        /// Target volume.
        volume: VolumeId,
        /// Byte offset (block-aligned).
        offset: u64,
        /// Whole blocks of data (shared: a record decoded from a partner's batch borrows its
        /// payload from the batch instead of copying it).
        data: Bytes,
    },
    /// Make `[offset, offset+length)` of `volume` read as zeroes (write-zeroes or trim).
    Zero {
        /// Target volume.
        volume: VolumeId,
        /// Byte offset (block-aligned).
        offset: u64,
        /// Length in bytes (whole blocks).
        length: u64,
        /// Whether the range may be deallocated.
        mode: ZeroMode,
    },
    /// A change to the group's catalog or history, replayed like data.
    Control(Control),
}

/// Catalog and history events that live in the journal so they replay and replicate in order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Control {
    /// A volume joined the group.
    VolumeCreated {
        /// Its id within the group.
        volume: VolumeId,
        /// Its name (site-unique).
        name: String,
        /// Logical size in bytes.
        size_bytes: u64,
        /// Block size in bytes.
        block_size_bytes: u32,
    },
    /// A volume grew.
    VolumeResized {
        /// Which volume.
        volume: VolumeId,
        /// New logical size in bytes.
        size_bytes: u64,
    },
    /// A volume was deleted; its blocks read as nothing from here on.
    VolumeDeleted {
        /// Which volume.
        volume: VolumeId,
    },
    /// A named point: the state after the previous record.
    Bookmark {
        /// Bookmark name.
        name: String,
    },
    /// A rollback to `target` starts; the records up to the matching end restore that state.
    RollbackBegin {
        /// The seq whose state is being restored.
        target: Seq,
    },
    /// The rollback that began at `begin` is complete.
    RollbackEnd {
        /// The seq whose state was restored.
        target: Seq,
        /// Seq of the matching begin record.
        begin: Seq,
    },
}

/// Whether zeroed blocks may be deallocated (trim, or write-zeroes without NO_HOLE) or must
/// stay allocated (write-zeroes with NBD_CMD_FLAG_NO_HOLE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ZeroMode {
    /// The blocks may become holes.
    Punch,
    /// The blocks stay allocated, holding zeroes.
    Allocate,
}

const FLAG_ZERO_ALLOCATE: u8 = 1;

const KIND_WRITE: u8 = 1;
const KIND_ZERO: u8 = 2;
const KIND_CONTROL: u8 = 3;

/// A decoded record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Position in the group's history.
    pub seq: Seq,
    /// Primary generation that wrote it.
    pub generation: Generation,
    /// Source time (when the primary applied it).
    pub time: UnixNanos,
    /// What it does.
    pub body: RecordBody,
    /// Content hash of header and payload (the same at every site that holds this record).
    pub checksum: [u8; 16],
    /// Running hash chain after this record.
    pub chain: ChainHash,
}

/// The fixed fields of a record, readable without its payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// Total bytes: header, payload and trailer.
    pub total_len: u32,
    /// Kind byte.
    pub kind: u8,
    /// Flags byte (for zero records: bit 0 = keep allocated).
    pub flags: u8,
    /// Volume for data records, 0 otherwise.
    pub volume: VolumeId,
    /// Position in the group's history.
    pub seq: Seq,
    /// Primary generation.
    pub generation: Generation,
    /// Source time.
    pub time: UnixNanos,
    /// Byte offset in the volume (data records).
    pub offset: u64,
    /// Length in bytes the record covers in the volume (data records).
    pub length: u64,
    /// Payload bytes that follow the header.
    pub payload_len: u32,
    /// How far behind this record the newest durable record was when it was written
    /// (`seq - durable_seq`, saturated): lets recovery tell a torn tail from corruption.
    pub durable_lag: u32,
}

impl RecordHeader {
    /// Parse a header from its 64 bytes; checks the magic and that the lengths agree.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<RecordHeader, &'static str> {
        if bytes[0..4] != RECORD_MAGIC {
            return Err("bad record magic");
        }
        // Fixed offsets inside a fixed-size array: `get` cannot fail, but stays panic-free.
        let u32_at = |o: usize| {
            u32::from_le_bytes(bytes.get(o..o + 4).and_then(|b| b.try_into().ok()).unwrap_or_default())
        };
        let u64_at = |o: usize| {
            u64::from_le_bytes(bytes.get(o..o + 8).and_then(|b| b.try_into().ok()).unwrap_or_default())
        };
        let header = RecordHeader {
            total_len: u32_at(4),
            kind: bytes[8],
            flags: bytes[9],
            volume: VolumeId(u32_at(12)),
            seq: Seq(u64_at(16)),
            generation: Generation(u64_at(24)),
            time: UnixNanos(u64_at(32)),
            offset: u64_at(40),
            length: u64_at(48),
            payload_len: u32_at(56),
            durable_lag: u32_at(60),
        };
        if header.payload_len as usize > PAYLOAD_BYTES_MAX {
            return Err("payload length over the limit");
        }
        if header.total_len as usize != HEADER_BYTES + header.payload_len as usize + TRAILER_BYTES {
            return Err("record length disagrees with payload length");
        }
        if !matches!(header.kind, KIND_WRITE | KIND_ZERO | KIND_CONTROL) {
            return Err("unknown record kind");
        }
        Ok(header)
    }

    /// Byte offset of the payload from the start of the record.
    pub const fn payload_offset() -> u64 {
        HEADER_BYTES as u64
    }
}

/// The record's fields as they go into [`encode`].
#[derive(Clone, Copy, Debug)]
pub struct RecordMeta {
    /// Position in the group's history.
    pub seq: Seq,
    /// Primary generation.
    pub generation: Generation,
    /// Source time.
    pub time: UnixNanos,
    /// Newest seq known durable when this record is written.
    pub durable: Seq,
}

/// Encode a record after `prev_chain` into `out` (cleared first); returns its new chain hash.
pub fn encode(meta: RecordMeta, body: &RecordBody, prev_chain: &ChainHash, out: &mut Vec<u8>) -> ChainHash {
    out.clear();
    append_body(meta, body, Hash::Unknown, prev_chain, out)
}

/// Append the encoding of a record with `body` to `out`; returns its new chain hash.
fn append_body(
    meta: RecordMeta,
    body: &RecordBody,
    known: Hash,
    prev_chain: &ChainHash,
    out: &mut Vec<u8>,
) -> ChainHash {
    match body {
        RecordBody::Write { volume, offset, data } => {
            let length = data.len() as u64;
            append_parts(meta, (KIND_WRITE, 0), *volume, *offset, length, data, known, prev_chain, out)
        }
        RecordBody::Zero { volume, offset, length, mode } => {
            let flags = if *mode == ZeroMode::Allocate { FLAG_ZERO_ALLOCATE } else { 0 };
            append_parts(meta, (KIND_ZERO, flags), *volume, *offset, *length, &[], known, prev_chain, out)
        }
        RecordBody::Control(control) => {
            let payload = postcard::to_stdvec(control).expect("control records always serialize");
            append_parts(meta, (KIND_CONTROL, 0), VolumeId(0), 0, 0, &payload, known, prev_chain, out)
        }
    }
}

/// blake3 of a record's payload, the part of its content hash that does not depend on the
/// record's place in the journal.
pub fn payload_hash(payload: &[u8]) -> [u8; 32] {
    *blake3::hash(payload).as_bytes()
}

/// Frame a write record of borrowed data (the hot path) without copying the data: `out`
/// (cleared first) gets the record's header and trailer back to back, and the record is
/// written as the header, `data`, then the trailer ([`framed_parts`]). The journal's appends
/// write records this way, one `pwritev` each, so a write's data is copied once, into the page
/// cache. `data_hash`, when given, must be [`payload_hash`] of `data`: writers compute it
/// before they take the group lock, so the expensive hashing runs on every core at once.
pub fn frame_write(
    meta: RecordMeta,
    volume: VolumeId,
    offset: u64,
    data: &[u8],
    data_hash: Option<[u8; 32]>,
    prev_chain: &ChainHash,
    out: &mut Vec<u8>,
) -> ChainHash {
    debug_assert!(data_hash.is_none_or(|h| h == payload_hash(data)), "wrong precomputed payload hash");
    out.clear();
    let known = data_hash.map_or(Hash::Unknown, Hash::Payload);
    let length = data.len() as u64;
    append_framed(meta, (KIND_WRITE, 0), volume, offset, length, data, known, prev_chain, out, true)
}

/// [`encode_replica`] without copying a write's data: appends the record's header and trailer
/// to `out` and returns the payload that goes between them ([`framed_parts`]); any other
/// record (small) is appended whole and the payload returned is empty.
pub fn frame_replica<'r>(
    meta: RecordMeta,
    record: &'r VerifiedRecord,
    prev_chain: &ChainHash,
    out: &mut Vec<u8>,
) -> (ChainHash, &'r [u8]) {
    match &record.body {
        RecordBody::Write { volume, offset, data } => {
            let known = Hash::Content(record.checksum);
            let length = data.len() as u64;
            let kind = (KIND_WRITE, 0);
            let chain =
                append_framed(meta, kind, *volume, *offset, length, data, known, prev_chain, out, true);
            (chain, data)
        }
        _ => (encode_replica(meta, record, prev_chain, out), &[]),
    }
}

/// A record framed by [`frame_write`] or [`frame_replica`] as the pieces to write in order:
/// `framing` (its header and trailer back to back) split around `payload`. A record appended
/// whole (`payload` empty) is `framing` alone.
pub fn framed_parts<'a>(framing: &'a [u8], payload: &'a [u8]) -> [&'a [u8]; 3] {
    if payload.is_empty() {
        return [framing, &[], &[]];
    }
    let (header, trailer) = framing.split_at(HEADER_BYTES.min(framing.len()));
    [header, payload, trailer]
}

/// Encode a record received from a partner after `prev_chain`, appending it to `out` (not
/// cleared: a batch of records goes out in one write); returns its chain hash here.
///
/// The record's verified content hash does not depend on the site-local durable lag, so it is
/// reused instead of hashing the payload again; only the checksum, which covers the lag, is
/// computed here.
pub fn encode_replica(
    meta: RecordMeta,
    record: &VerifiedRecord,
    prev_chain: &ChainHash,
    out: &mut Vec<u8>,
) -> ChainHash {
    append_body(meta, &record.body, Hash::Content(record.checksum), prev_chain, out)
}

/// What an encoder already knows of a record's hashes.
#[derive(Clone, Copy)]
enum Hash {
    /// Nothing: hash the payload.
    Unknown,
    /// The payload's [`payload_hash`].
    Payload([u8; 32]),
    /// The record's content hash (see [`hashes_of`]).
    Content([u8; 16]),
}

#[allow(clippy::too_many_arguments)]
fn append_parts(
    meta: RecordMeta,
    kind_flags: (u8, u8),
    volume: VolumeId,
    offset: u64,
    length: u64,
    payload: &[u8],
    known: Hash,
    prev_chain: &ChainHash,
    out: &mut Vec<u8>,
) -> ChainHash {
    append_framed(meta, kind_flags, volume, offset, length, payload, known, prev_chain, out, false)
}

/// [`append_parts`], leaving the payload out of `out` when `apart` (the header and the trailer
/// then lie back to back: see [`frame_write`]).
#[allow(clippy::too_many_arguments)]
fn append_framed(
    meta: RecordMeta,
    (kind, flags): (u8, u8),
    volume: VolumeId,
    offset: u64,
    length: u64,
    payload: &[u8],
    known: Hash,
    prev_chain: &ChainHash,
    out: &mut Vec<u8>,
    apart: bool,
) -> ChainHash {
    assert!(payload.len() <= PAYLOAD_BYTES_MAX, "record payload over PAYLOAD_BYTES_MAX");
    let start = out.len();
    let total_len = (HEADER_BYTES + payload.len() + TRAILER_BYTES) as u32;
    out.extend_from_slice(&RECORD_MAGIC);
    out.extend_from_slice(&total_len.to_le_bytes());
    out.extend_from_slice(&[kind, flags, 0, 0]);
    out.extend_from_slice(&volume.0.to_le_bytes());
    out.extend_from_slice(&meta.seq.0.to_le_bytes());
    out.extend_from_slice(&meta.generation.0.to_le_bytes());
    out.extend_from_slice(&meta.time.0.to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(&length.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let durable_lag = u32::try_from(meta.seq.0.saturating_sub(meta.durable.0)).unwrap_or(u32::MAX);
    out.extend_from_slice(&durable_lag.to_le_bytes());
    let header_end = out.len();
    debug_assert_eq!(header_end - start, HEADER_BYTES);
    if !apart {
        out.extend_from_slice(payload);
    }
    let header = out.get(start..header_end).unwrap_or_default();
    let (content, checksum) = match known {
        Hash::Unknown => hashes_of(header, &payload_hash(payload)),
        Hash::Payload(hash) => hashes_of(header, &hash),
        Hash::Content(content) => {
            debug_assert_eq!(
                content,
                hashes_of(header, &payload_hash(payload)).0,
                "a replicated record's content hash does not match its content"
            );
            (content, checksum_after(&content, header))
        }
    };
    let chain = chain_next(prev_chain, &content);
    out.extend_from_slice(&checksum);
    out.extend_from_slice(&chain.0);
    chain
}

/// A record decoded from bytes whose checksum verified, so its content hash (`checksum`) is
/// known to match its header and body. Only decoding makes one: an append that reuses the
/// content hash instead of hashing the payload again ([`encode_replica`]) cannot be handed a
/// record whose body or hash was changed after it was read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedRecord(Record);

impl VerifiedRecord {
    /// The record.
    pub fn into_inner(self) -> Record {
        self.0
    }
}

impl std::ops::Deref for VerifiedRecord {
    type Target = Record;
    fn deref(&self) -> &Record {
        &self.0
    }
}

/// [`decode`], keeping the proof that the record verified.
pub fn decode_verified(bytes: &[u8], prev_chain: Option<&ChainHash>) -> Result<VerifiedRecord, DecodeError> {
    decode_from(bytes, prev_chain, Bytes::copy_from_slice).map(VerifiedRecord)
}

/// [`decode_verified`] of a record held in a shared buffer: a write's data is a slice of
/// `bytes`, not a copy (a partner's batch is decoded this way, and applied from its buffer).
pub fn decode_verified_shared(
    bytes: &Bytes,
    prev_chain: Option<&ChainHash>,
) -> Result<VerifiedRecord, DecodeError> {
    decode_from(bytes, prev_chain, |payload| bytes.slice_ref(payload)).map(VerifiedRecord)
}

/// Decode and verify consecutive whole records (as a journal reader returns them).
pub fn decode_all(mut bytes: &[u8]) -> Result<Vec<VerifiedRecord>, DecodeError> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let head: &[u8; HEADER_BYTES] =
            bytes.get(..HEADER_BYTES).and_then(|h| h.try_into().ok()).ok_or(DecodeError::Truncated)?;
        let header = RecordHeader::decode(head).map_err(DecodeError::Malformed)?;
        let (one, rest) = bytes.split_at_checked(header.total_len as usize).ok_or(DecodeError::Truncated)?;
        records.push(decode_verified(one, None)?);
        bytes = rest;
    }
    Ok(records)
}

/// A record whose checksum has been verified, its payload still borrowed.
struct Checked<'a> {
    header: RecordHeader,
    content: [u8; 16],
    chain: ChainHash,
    payload: &'a [u8],
}

fn verified(bytes: &[u8]) -> Result<Checked<'_>, DecodeError> {
    let head: &[u8; HEADER_BYTES] =
        bytes.get(..HEADER_BYTES).and_then(|h| h.try_into().ok()).ok_or(DecodeError::Truncated)?;
    let header = RecordHeader::decode(head).map_err(DecodeError::Malformed)?;
    let total = header.total_len as usize;
    let body_end = HEADER_BYTES + header.payload_len as usize;
    let record = bytes.get(..total).ok_or(DecodeError::Truncated)?;
    let (covered, trailer) = record.split_at(body_end);
    let (stored_checksum, stored_chain) = trailer.split_at(16);
    let (head_bytes, payload) = covered.split_at(HEADER_BYTES);
    let (content, checksum) = hashes_of(head_bytes, &payload_hash(payload));
    if checksum != stored_checksum {
        return Err(DecodeError::ChecksumMismatch);
    }
    let mut chain = ChainHash([0; 32]);
    chain.0.copy_from_slice(stored_chain);
    Ok(Checked { header, content, chain, payload })
}

/// Verify a whole record's checksum without decoding its body (no copy of the payload), and
/// return its header. For readers that pass records on as bytes.
pub fn verify(bytes: &[u8]) -> Result<RecordHeader, DecodeError> {
    verified(bytes).map(|v| v.header)
}

/// Decode and verify a whole record. `prev_chain`, when known, is checked against the stored chain.
pub fn decode(bytes: &[u8], prev_chain: Option<&ChainHash>) -> Result<Record, DecodeError> {
    decode_from(bytes, prev_chain, Bytes::copy_from_slice)
}

/// [`decode`], with `data` making a write's data out of its payload (a slice of `bytes`).
fn decode_from<'a>(
    bytes: &'a [u8],
    prev_chain: Option<&ChainHash>,
    data: impl FnOnce(&'a [u8]) -> Bytes,
) -> Result<Record, DecodeError> {
    let Checked { header, content, chain, payload } = verified(bytes)?;
    if let Some(prev) = prev_chain {
        if chain_next(prev, &content) != chain {
            return Err(DecodeError::ChainMismatch);
        }
    }
    let body = match header.kind {
        KIND_WRITE => {
            if header.length != payload.len() as u64 {
                return Err(DecodeError::Malformed("write length disagrees with payload"));
            }
            RecordBody::Write { volume: header.volume, offset: header.offset, data: data(payload) }
        }
        KIND_ZERO => RecordBody::Zero {
            volume: header.volume,
            offset: header.offset,
            length: header.length,
            mode: if header.flags & FLAG_ZERO_ALLOCATE != 0 { ZeroMode::Allocate } else { ZeroMode::Punch },
        },
        _ => RecordBody::Control(
            postcard::from_bytes(payload)
                .map_err(|_| DecodeError::Malformed("undecodable control payload"))?,
        ),
    };
    Ok(Record {
        seq: header.seq,
        generation: header.generation,
        time: header.time,
        body,
        checksum: content,
        chain,
    })
}

/// Why bytes are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end before the record does.
    #[error("record is truncated")]
    Truncated,
    /// The header is not a record header.
    #[error("malformed record: {0}")]
    Malformed(&'static str),
    /// The checksum does not match the content.
    #[error("record checksum mismatch")]
    ChecksumMismatch,
    /// The record does not follow the previous record's chain hash.
    #[error("hash chain broken")]
    ChainMismatch,
}

impl From<DecodeError> for JournalError {
    fn from(e: DecodeError) -> Self {
        JournalError::Invalid(e.to_string())
    }
}

/// The two hashes of a record, from its encoded header and its payload's [`payload_hash`]:
///
/// - the *content hash*: blake3 of the header with the durable-lag field zeroed, then the
///   payload hash; first 16 bytes. It depends only on what the record says, so two sites
///   holding the same history compute the same chain, which is how partners compare histories;
/// - the *checksum*: blake3 of the content hash and the durable-lag field, first 16 bytes,
///   stored in the record. It protects every byte, the site-local lag included.
pub fn hashes_of(header: &[u8], payload_hash: &[u8; 32]) -> ([u8; 16], [u8; 16]) {
    let mut hasher = blake3::Hasher::new();
    hasher.update(header.get(..DURABLE_LAG_OFFSET).unwrap_or_default());
    hasher.update(&[0; HEADER_BYTES - DURABLE_LAG_OFFSET]);
    hasher.update(payload_hash);
    let content = truncate16(hasher.finalize().as_bytes());
    (content, checksum_after(&content, header))
}

/// The checksum of a record from its content hash and its encoded header's durable-lag field.
fn checksum_after(content: &[u8; 16], header: &[u8]) -> [u8; 16] {
    let lag = header.get(DURABLE_LAG_OFFSET..HEADER_BYTES).unwrap_or_default();
    let mut hasher = blake3::Hasher::new();
    hasher.update(content);
    hasher.update(lag);
    truncate16(hasher.finalize().as_bytes())
}

fn truncate16(hash: &[u8; 32]) -> [u8; 16] {
    let mut out = [0; 16];
    out.copy_from_slice(&hash[..16]);
    out
}

/// Checksum of a block of bytes (segment headers): blake3, truncated to 16 bytes.
pub fn checksum_of(bytes: &[u8]) -> [u8; 16] {
    let hash = blake3::hash(bytes);
    let mut out = [0; 16];
    out.copy_from_slice(&hash.as_bytes()[..16]);
    out
}

/// The chain hash after a record with `checksum` that follows `prev`.
pub fn chain_next(prev: &ChainHash, checksum: &[u8; 16]) -> ChainHash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&prev.0);
    hasher.update(checksum);
    ChainHash(*hasher.finalize().as_bytes())
}
