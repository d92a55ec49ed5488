//! What partners say to each other: postcard-encoded messages, one per frame, and the batch
//! frame that carries a contiguous run of journal records, zstd-compressed, with a blake3 hash
//! tree over the uncompressed content checked before anything is applied.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use tidemark_journal::record::{self, DecodeError, RecordHeader, HEADER_BYTES, TRAILER_BYTES};
use tidemark_journal::{ChainHash, GenerationStart, Seq, UnixNanos, VerifiedRecord};

/// Version of this protocol; a peer with another version is refused at the handshake.
pub const PROTOCOL_VERSION: u32 = 4;
/// Largest uncompressed content of one batch, in bytes (a record carries at most 4 MiB of
/// data, so a batch always has room for at least one).
pub const BATCH_RAW_BYTES_MAX: u64 = 16 << 20;
/// Largest uncompressed content of one baseline chunk, in bytes.
pub const BASELINE_CHUNK_BYTES_MAX: u64 = 4 << 20;
/// Most volumes a baseline may describe.
pub const BASELINE_VOLUMES_MAX: usize = 1024;
/// Largest encoded message other than a batch's payload, in bytes.
pub const MESSAGE_BYTES_MAX: usize = 64 << 10;

/// A group's place in history at one site, exchanged at the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupPosition {
    /// Group id (the same at both sites: it seeds the chain).
    pub group_id: u64,
    /// Primary generation this site knows.
    pub generation: u64,
    /// Newest seq in this site's journal (durable or not): where a sender resumes after.
    pub last_seq: Seq,
    /// Chain hash after `last_seq`: equal at both sites unless the histories diverged.
    pub chain: ChainHash,
    /// Newest seq known durable here (at most `last_seq`): what may be acknowledged.
    pub durable_seq: Seq,
    /// Where each generation's history begins here, oldest first (see [`crate::lineage`]).
    pub generations: Vec<GenerationStart>,
}

/// One protocol message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message each way on a connection.
    Hello {
        /// [`PROTOCOL_VERSION`].
        protocol: u32,
        /// The sender's site name, for logs and events.
        site: String,
    },
    /// Primary to secondary: where the primary's journal of a group stands, and what it still holds.
    Offer {
        /// The primary's position.
        position: GroupPosition,
        /// Oldest seq the primary's journal still holds (a receiver behind it needs a baseline).
        first_seq: Seq,
        /// Group name.
        name: String,
        /// The group's retention, in seconds (the secondary keeps the same history).
        retention_seconds: u64,
        /// The group's journal limit, in bytes.
        journal_max_bytes: u64,
    },
    /// Secondary to primary: where its copy stands, so the primary resumes after it.
    Position(GroupPosition),
    /// A batch of records (see [`BatchFrame`]).
    Batch(BatchFrame),
    /// Secondary to primary: every record up to `durable_seq` is durable here.
    Ack {
        /// Group id.
        group_id: u64,
        /// Generation the secondary acknowledges under.
        generation: u64,
        /// Newest seq durable at the secondary.
        durable_seq: Seq,
    },
    /// Secondary to primary: an operator asked for a planned swap at the secondary.
    SwapRequest {
        /// Group id.
        group_id: u64,
    },
    /// Primary to secondary: writes are stopped and everything through `last_seq` is durable at
    /// both sites; become primary under `generation` if your history ends exactly here.
    SwapPrepare {
        /// Group id.
        group_id: u64,
        /// The generation the secondary is to become primary under.
        generation: u64,
        /// The last seq of the shared history.
        last_seq: Seq,
        /// Chain hash after `last_seq`.
        chain: ChainHash,
    },
    /// Secondary to primary: it is primary under `generation` now (durably); demote.
    SwapPromoted {
        /// Group id.
        group_id: u64,
        /// Its generation.
        generation: u64,
    },
    /// Primary to secondary: the secondary is behind what the journal holds, so it gets the
    /// primary's whole image at one seq instead ([`BaselineHeader`]), then
    /// [`Message::BaselineData`] chunks, then [`Message::BaselineEnd`]; the secondary stages it
    /// beside its copy, switches when it is complete, and acknowledges the seq.
    BaselineBegin(BaselineHeader),
    /// A run of a baseline's non-zero blocks.
    BaselineData(BaselineChunk),
    /// The baseline is complete: `chunks` chunks with `raw_bytes` bytes in all were sent.
    BaselineEnd {
        /// Group id.
        group_id: u64,
        /// The baseline's seq.
        seq: Seq,
        /// Chunks sent.
        chunks: u64,
        /// Bytes of data sent (uncompressed).
        raw_bytes: u64,
    },
    /// Either side: this group stops here, with the reason (divergence, stale generation, bad frame).
    Refuse {
        /// Group id.
        group_id: u64,
        /// Why.
        reason: String,
    },
}

impl Message {
    /// Encode for a frame.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("messages always serialize")
    }

    /// Decode a frame, refusing anything malformed or oversized.
    pub fn decode(bytes: &[u8]) -> Result<Message, WireError> {
        if bytes.len() > MESSAGE_BYTES_MAX + BATCH_RAW_BYTES_MAX as usize {
            return Err(WireError::Oversized { bytes: bytes.len() as u64 });
        }
        postcard::from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))
    }
}

/// Decompress `payload` to exactly `raw_bytes` (the caller bounds it).
fn decompress(payload: &[u8], raw_bytes: u64) -> Result<Vec<u8>, WireError> {
    let raw = zstd::bulk::decompress(payload, raw_bytes as usize)
        .map_err(|e| WireError::Decompress(e.to_string()))?;
    if raw.len() as u64 != raw_bytes {
        return Err(WireError::Decompress(format!("{} bytes, {raw_bytes} claimed", raw.len())));
    }
    Ok(raw)
}

/// The hash a batch carries of its content, the concatenation of `pieces`: blake3 over the
/// stored checksums of its records, in order; `None` when a piece is not a run of whole records.
///
/// Each record's checksum is blake3 over its header and the blake3 of its payload (see
/// docs/internals/journal.md), so this is a hash tree over every byte of the content, the chain
/// trailers aside (each is checked against the receiver's own chain). Both ends verify every
/// record's checksum anyway (the sender's journal reader as it reads, the receiver as it
/// decodes), so a tree costs neither a second pass over the payloads.
pub fn content_hash_of<P: AsRef<[u8]>>(pieces: &[P]) -> Option<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    for piece in pieces {
        hash_spans(&mut hasher, piece.as_ref(), &record_spans(piece.as_ref())?);
    }
    Some(*hasher.finalize().as_bytes())
}

/// Where each record of `raw` lies, in order; `None` when `raw` is not a run of whole records.
fn record_spans(raw: &[u8]) -> Option<Vec<Range<usize>>> {
    let mut spans = Vec::new();
    let mut at = 0;
    while at < raw.len() {
        let head: &[u8; HEADER_BYTES] = raw.get(at..at + HEADER_BYTES)?.try_into().ok()?;
        let end = at.checked_add(RecordHeader::decode(head).ok()?.total_len as usize)?;
        if end > raw.len() {
            return None;
        }
        spans.push(at..end);
        at = end;
    }
    Some(spans)
}

/// blake3 over the stored checksum of each record at `spans` of `raw`.
fn hash_of_spans(raw: &[u8], spans: &[Range<usize>]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hash_spans(&mut hasher, raw, spans);
    *hasher.finalize().as_bytes()
}

/// Feed `hasher` the stored checksum of each record at `spans` of `raw`.
fn hash_spans(hasher: &mut blake3::Hasher, raw: &[u8], spans: &[Range<usize>]) {
    for span in spans {
        // A record is longer than its trailer (RecordHeader::decode checks the total length).
        let checksum = span.end - TRAILER_BYTES..span.end - TRAILER_BYTES + 16;
        hasher.update(raw.get(checksum).unwrap_or_default());
    }
}

/// A volume as a baseline describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineVolume {
    /// Id within the group.
    pub id: u32,
    /// Name.
    pub name: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Block size in bytes.
    pub block_size_bytes: u32,
}

/// What a baseline is: the primary's image at `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineHeader {
    /// Group id.
    pub group_id: u64,
    /// The primary's generation.
    pub generation: u64,
    /// The primary's lineage.
    pub generations: Vec<GenerationStart>,
    /// The seq whose image it is.
    pub seq: Seq,
    /// Chain hash after `seq`: the journal continues from it.
    pub chain: ChainHash,
    /// Source time of `seq`.
    pub time: UnixNanos,
    /// The volumes at `seq`.
    pub volumes: Vec<BaselineVolume>,
    /// Allocated bytes the primary found (an upper bound of the data to come: zero blocks are
    /// elided), for progress.
    pub bytes_total: u64,
    /// A resync: only blocks changed since this seq (with the chain hash after it) are sent,
    /// zero blocks included; the secondary must hold exactly that history and keeps the rest of
    /// its copy. `None`: the whole image, zero blocks elided.
    pub delta_from: Option<(Seq, ChainHash)>,
}

/// A run of a baseline's blocks, zstd-compressed, with a blake3 hash of the uncompressed data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineChunk {
    /// Group id.
    pub group_id: u64,
    /// Volume id.
    pub volume: u32,
    /// Byte offset in the volume.
    pub offset: u64,
    /// Bytes of data.
    pub raw_bytes: u64,
    /// blake3 of the data.
    pub content_hash: [u8; 32],
    /// zstd-compressed data (encoded as one byte string, not a sequence of bytes: the same on
    /// the wire with postcard, and decoded without a call per byte).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

impl BaselineChunk {
    /// Build a chunk of `data` at `offset` of `volume`.
    pub fn build(group_id: u64, volume: u32, offset: u64, data: &[u8], level: i32) -> BaselineChunk {
        assert!(data.len() as u64 <= BASELINE_CHUNK_BYTES_MAX, "chunk over BASELINE_CHUNK_BYTES_MAX");
        BaselineChunk {
            group_id,
            volume,
            offset,
            raw_bytes: data.len() as u64,
            content_hash: *blake3::hash(data).as_bytes(),
            payload: zstd::bulk::compress(data, level).expect("zstd compresses any input"),
        }
    }

    /// Decompress (bounded) and verify the data.
    pub fn open(&self) -> Result<Vec<u8>, WireError> {
        if self.raw_bytes > BASELINE_CHUNK_BYTES_MAX {
            return Err(WireError::Oversized { bytes: self.raw_bytes });
        }
        let data = decompress(&self.payload, self.raw_bytes)?;
        if blake3::hash(&data).as_bytes() != &self.content_hash {
            return Err(WireError::ChunkHashMismatch { volume: self.volume, offset: self.offset });
        }
        Ok(data)
    }
}

/// The zstd context a sender compresses its batches with, kept from batch to batch: a new one
/// allocates and clears its tables every time.
pub struct BatchCompressor(zstd::bulk::Compressor<'static>);

impl BatchCompressor {
    /// A compressor at zstd `level` (levels past zstd's range are clamped to it).
    pub fn new(level: i32) -> BatchCompressor {
        let range = zstd::compression_level_range();
        let level = level.clamp(*range.start(), *range.end());
        BatchCompressor(zstd::bulk::Compressor::new(level).expect("a level in zstd's range"))
    }

    /// `pieces` (`raw_bytes` in all) as one zstd frame. Several pieces are streamed through
    /// the context, which keeps the window across them, so the frame is what their
    /// concatenation would give; a single piece is compressed in one call.
    fn compress<P: AsRef<[u8]>>(&mut self, pieces: &[P], raw_bytes: usize) -> Vec<u8> {
        use zstd::zstd_safe::{zstd_sys::ZSTD_EndDirective, InBuffer, OutBuffer, ResetDirective};
        let mut payload = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw_bytes));
        if pieces.len() <= 1 {
            let one = pieces.first().map_or(&[][..], |p| p.as_ref());
            self.0.compress_to_buffer(one, &mut payload).expect("room for the frame");
            return payload;
        }
        let cctx = self.0.context_mut();
        let started = cctx
            .reset(ResetDirective::SessionOnly)
            .and_then(|_| cctx.set_pledged_src_size(Some(raw_bytes as u64)));
        started.expect("a new frame starts");
        let mut output = OutBuffer::around(&mut payload);
        for (i, piece) in pieces.iter().enumerate() {
            let mut input = InBuffer::around(piece.as_ref());
            let end = if i + 1 == pieces.len() {
                ZSTD_EndDirective::ZSTD_e_end
            } else {
                ZSTD_EndDirective::ZSTD_e_continue
            };
            // The output has room for the whole frame, so each call takes all the input, and
            // the last one ends the frame.
            loop {
                let left = cctx.compress_stream2(&mut output, &mut input, end).expect("room for the frame");
                let taken = input.pos == piece.as_ref().len();
                if taken && (left == 0 || end == ZSTD_EndDirective::ZSTD_e_continue) {
                    break;
                }
            }
        }
        payload
    }
}

/// A contiguous run of records, as sent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFrame {
    /// Group id.
    pub group_id: u64,
    /// Generation of the primary that sent it.
    pub generation: u64,
    /// Seq of the first record.
    pub first_seq: Seq,
    /// Seq of the last record.
    pub last_seq: Seq,
    /// Bytes of the uncompressed content (the concatenated records).
    pub raw_bytes: u64,
    /// Hash tree over the uncompressed content ([`content_hash_of`]).
    pub content_hash: [u8; 32],
    /// zstd-compressed content (one byte string, as for baseline chunks).
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
}

/// Why a frame or batch was refused. Each is counted by reason and raised as an event; the
/// group stops or reconnects, and nothing from the frame is applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The frame is not a message.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// The frame or its decompressed content is larger than allowed.
    #[error("frame of {bytes} bytes is over the limit")]
    Oversized {
        /// Claimed or actual size.
        bytes: u64,
    },
    /// The payload does not decompress to the size it claims.
    #[error("batch payload does not decompress: {0}")]
    Decompress(String),
    /// The content does not match its hash (the batch's, or a record's own checksum): corrupted
    /// in transit or in the sender's memory.
    #[error("batch {first}..={last} content hash mismatch")]
    HashMismatch {
        /// First seq claimed.
        first: u64,
        /// Last seq claimed.
        last: u64,
    },
    /// A baseline chunk's hash does not match its data.
    #[error("baseline chunk of volume {volume} at offset {offset}: content hash mismatch")]
    ChunkHashMismatch {
        /// Volume id.
        volume: u32,
        /// Offset claimed.
        offset: u64,
    },
    /// A record inside the batch is invalid, out of order, or does not continue the chain.
    #[error("batch {first}..={last}: record {seq}: {reason}")]
    BadRecord {
        /// First seq claimed.
        first: u64,
        /// Last seq claimed.
        last: u64,
        /// Seq where it went wrong.
        seq: u64,
        /// What was wrong.
        reason: String,
    },
}

impl BatchFrame {
    /// Build a batch from whole, verified journal records (`raw` is their concatenation, as a
    /// journal reader returns them); `None` when `raw` is not a run of whole records.
    pub fn build(
        group_id: u64,
        generation: u64,
        first_seq: Seq,
        last_seq: Seq,
        raw: &[u8],
        level: i32,
    ) -> Option<BatchFrame> {
        BatchFrame::build_with(
            &mut BatchCompressor::new(level),
            group_id,
            generation,
            first_seq,
            last_seq,
            &[raw],
        )
    }

    /// [`BatchFrame::build`] with a compressor kept from batch to batch, from the records in
    /// `pieces` (back to back in the journal, each holding whole records, as a journal reader
    /// returns them), without joining them first: they are compressed as one zstd frame, as
    /// their concatenation would be. `None` when a piece is not a run of whole records.
    pub fn build_with<P: AsRef<[u8]>>(
        compressor: &mut BatchCompressor,
        group_id: u64,
        generation: u64,
        first_seq: Seq,
        last_seq: Seq,
        pieces: &[P],
    ) -> Option<BatchFrame> {
        let raw_bytes: usize = pieces.iter().map(|p| p.as_ref().len()).sum();
        assert!(raw_bytes as u64 <= BATCH_RAW_BYTES_MAX, "batch over BATCH_RAW_BYTES_MAX");
        let content_hash = content_hash_of(pieces)?;
        Some(BatchFrame {
            group_id,
            generation,
            first_seq,
            last_seq,
            raw_bytes: raw_bytes as u64,
            content_hash,
            payload: compressor.compress(pieces, raw_bytes),
        })
    }

    /// Decompress, verify the content hash, and decode the records, checking that their seqs
    /// run from `first_seq` to `last_seq` without a gap and that each continues the chain from
    /// `chain` (the receiver's chain after `first_seq - 1`).
    pub fn open(&self, chain: &ChainHash) -> Result<Vec<VerifiedRecord>, WireError> {
        if self.raw_bytes > BATCH_RAW_BYTES_MAX || self.last_seq < self.first_seq {
            return Err(WireError::Oversized { bytes: self.raw_bytes });
        }
        let raw = bytes::Bytes::from(decompress(&self.payload, self.raw_bytes)?);
        let mismatch = WireError::HashMismatch { first: self.first_seq.0, last: self.last_seq.0 };
        let spans = record_spans(&raw)
            .filter(|spans| hash_of_spans(&raw, spans) == self.content_hash)
            .ok_or_else(|| mismatch.clone())?;
        let bad = |seq: u64, reason: String| WireError::BadRecord {
            first: self.first_seq.0,
            last: self.last_seq.0,
            seq,
            reason,
        };
        let mut records = Vec::with_capacity(spans.len());
        let mut prev = *chain;
        let mut expected = self.first_seq;
        for span in spans {
            // The record's data stays in the batch's buffer: no copy of any payload.
            let rec = record::decode_verified_shared(&raw.slice(span), Some(&prev)).map_err(|e| match e {
                // The batch's hash covers only the checksums: a record whose content does not
                // match its checksum is content that does not match the hash.
                DecodeError::ChecksumMismatch => mismatch.clone(),
                e => bad(expected.0, e.to_string()),
            })?;
            if rec.seq != expected {
                return Err(bad(expected.0, format!("has seq {}", rec.seq.0)));
            }
            prev = rec.chain;
            expected = Seq(expected.0 + 1);
            records.push(rec);
        }
        if expected.0 != self.last_seq.0 + 1 {
            return Err(bad(expected.0, format!("batch ends before its last seq {}", self.last_seq.0)));
        }
        Ok(records)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_encode_as_a_length_and_the_bytes_as_before() {
        // postcard writes a byte string and a sequence of u8 alike (varint length, then the
        // bytes), so peers built before payloads were byte strings read the same frames.
        #[derive(Serialize)]
        struct Old {
            payload: Vec<u8>,
        }
        #[derive(Serialize)]
        struct New {
            #[serde(with = "serde_bytes")]
            payload: Vec<u8>,
        }
        let payload: Vec<u8> = (0..300u32).map(|i| i as u8).collect();
        let old = postcard::to_stdvec(&Old { payload: payload.clone() }).expect("old");
        let new = postcard::to_stdvec(&New { payload }).expect("new");
        assert_eq!(old, new);
    }

    /// Three encoded records after genesis, and the chain before them.
    fn three_records() -> (Vec<u8>, ChainHash) {
        let genesis = tidemark_journal::genesis_chain(7);
        let (mut raw, mut one, mut chain) = (Vec::new(), Vec::new(), genesis);
        for seq in 1..=3u64 {
            let data: Vec<u8> = (0..4096u32).map(|i| (i as u64 * seq % 251) as u8).collect();
            let meta = record::RecordMeta {
                seq: Seq(seq),
                generation: tidemark_journal::Generation(1),
                time: UnixNanos(seq),
                durable: Seq(0),
            };
            let body = record::RecordBody::Write {
                volume: tidemark_journal::VolumeId(0),
                offset: 0,
                data: data.into(),
            };
            chain = record::encode(meta, &body, &chain, &mut one);
            raw.extend_from_slice(&one);
        }
        (raw, genesis)
    }

    #[test]
    fn a_batch_of_pieces_is_the_batch_of_their_concatenation() {
        let (raw, genesis) = three_records();
        let joined = BatchFrame::build(7, 1, Seq(1), Seq(3), &raw, 1).expect("whole records");
        let record_len = raw.len() / 3;
        let pieces = [&raw[..record_len], &raw[record_len..]];
        let mut compressor = BatchCompressor::new(1);
        let split = BatchFrame::build_with(&mut compressor, 7, 1, Seq(1), Seq(3), &pieces).expect("whole");
        // The same content, hash and frame: one zstd frame over both pieces, with matches
        // across them.
        assert_eq!((split.raw_bytes, split.content_hash), (joined.raw_bytes, joined.content_hash));
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&split.payload).ok(),
            Some(Some(raw.len() as u64))
        );
        let three = [&raw[..record_len], &raw[record_len..2 * record_len], &raw[2 * record_len..]];
        let streamed = BatchFrame::build_with(&mut compressor, 7, 1, Seq(1), Seq(3), &three).expect("whole");
        assert_eq!(streamed.payload, split.payload, "the same frame however the records are cut");
        assert_eq!(split.open(&genesis).expect("opens"), joined.open(&genesis).expect("opens"));
        // No records at all is an empty frame, as for empty content.
        let none =
            BatchFrame::build_with(&mut compressor, 7, 1, Seq(1), Seq(0), &[] as &[&[u8]]).expect("empty");
        assert_eq!(none.payload, BatchFrame::build(7, 1, Seq(1), Seq(0), &[], 1).expect("empty").payload);
        // A piece that is not whole records cannot be built, even when the pieces add up.
        let torn = [&raw[..record_len + 1], &raw[record_len + 1..]];
        assert!(BatchFrame::build_with(&mut compressor, 7, 1, Seq(1), Seq(3), &torn).is_none());
    }

    #[test]
    fn a_batch_hash_covers_every_byte_of_every_record() {
        let (raw, genesis) = three_records();
        let batch = BatchFrame::build(7, 1, Seq(1), Seq(3), &raw, 1).expect("whole records");
        assert_eq!(batch.open(&genesis).expect("opens").len(), 3);
        // Any byte of the content changed, in a header, a payload or a checksum, is a hash
        // mismatch; in a chain trailer, a broken chain. Either way nothing is returned.
        let record_len = raw.len() / 3;
        for at in
            [0, 20, 64, 2000, 64 + 4096, 64 + 4096 + 15, 64 + 4096 + 16, record_len + 100, raw.len() - 1]
        {
            let mut damaged = raw.clone();
            damaged[at] ^= 0x10;
            let mut frame = batch.clone();
            frame.payload = zstd::bulk::compress(&damaged, 1).expect("compress");
            match frame.open(&genesis) {
                Err(WireError::HashMismatch { first: 1, last: 3 }) => {}
                Err(WireError::BadRecord { .. }) if at % record_len >= 64 + 4096 + 16 => {}
                other => panic!("byte {at} changed: {other:?}"),
            }
        }
        // A hash that is not the content's: refused before any record is decoded.
        let mut wrong = batch.clone();
        wrong.content_hash[31] ^= 1;
        assert!(matches!(wrong.open(&genesis), Err(WireError::HashMismatch { .. })));
        // Content that is not whole records cannot be built, and never opens.
        assert!(BatchFrame::build(7, 1, Seq(1), Seq(3), &raw[..raw.len() - 1], 1).is_none());
        let mut cut = batch;
        cut.payload = zstd::bulk::compress(&raw[..raw.len() - 1], 1).expect("compress");
        cut.raw_bytes -= 1;
        assert!(matches!(cut.open(&genesis), Err(WireError::HashMismatch { .. })));
    }

    #[test]
    fn a_baseline_chunk_round_trips_and_refuses_damage_and_size() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let chunk = BaselineChunk::build(7, 1, 8192, &data, 3);
        let frame = Message::BaselineData(chunk.clone()).encode();
        let Ok(Message::BaselineData(decoded)) = Message::decode(&frame) else { panic!("decodes") };
        assert_eq!(decoded.open().expect("opens"), data);

        let mut flipped = chunk.clone();
        flipped.content_hash[0] ^= 1;
        assert!(matches!(flipped.open(), Err(WireError::ChunkHashMismatch { volume: 1, offset: 8192 })));

        let mut short = chunk.clone();
        short.raw_bytes -= 1;
        assert!(matches!(short.open(), Err(WireError::Decompress(_))));

        let mut huge = chunk.clone();
        huge.raw_bytes = BASELINE_CHUNK_BYTES_MAX + 1;
        assert!(matches!(huge.open(), Err(WireError::Oversized { .. })));

        let mut garbage = chunk;
        garbage.payload.truncate(10);
        assert!(garbage.open().is_err(), "a truncated payload never opens");
        assert!(Message::decode(&frame[..frame.len() / 2]).is_err(), "a truncated frame never decodes");
    }
}
