//! What partners say to each other: postcard-encoded messages, one per frame, and the batch
//! frame that carries a contiguous run of journal records, zstd-compressed, with a blake3 hash
//! of the uncompressed content checked before anything is applied.

use serde::{Deserialize, Serialize};
use tidemark_journal::record::{self, RecordHeader, HEADER_BYTES};
use tidemark_journal::{ChainHash, GenerationStart, Record, Seq};

/// Version of this protocol; a peer with another version is refused at the handshake.
pub const PROTOCOL_VERSION: u32 = 2;
/// Largest uncompressed content of one batch, in bytes (a record carries at most 4 MiB of
/// data, so a batch always has room for at least one).
pub const BATCH_RAW_BYTES_MAX: u64 = 16 << 20;
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
    /// blake3 of the uncompressed content.
    pub content_hash: [u8; 32],
    /// zstd-compressed content.
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
    /// The content hash does not match: corrupted in transit or in the sender's memory.
    #[error("batch {first}..={last} content hash mismatch")]
    HashMismatch {
        /// First seq claimed.
        first: u64,
        /// Last seq claimed.
        last: u64,
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
    /// Build a batch from encoded journal records (`raw` is their concatenation).
    pub fn build(
        group_id: u64,
        generation: u64,
        first_seq: Seq,
        last_seq: Seq,
        raw: &[u8],
        level: i32,
    ) -> BatchFrame {
        assert!(raw.len() as u64 <= BATCH_RAW_BYTES_MAX, "batch over BATCH_RAW_BYTES_MAX");
        let payload = zstd::bulk::compress(raw, level).expect("zstd compresses any input");
        BatchFrame {
            group_id,
            generation,
            first_seq,
            last_seq,
            raw_bytes: raw.len() as u64,
            content_hash: *blake3::hash(raw).as_bytes(),
            payload,
        }
    }

    /// Decompress, verify the content hash, and decode the records, checking that their seqs
    /// run from `first_seq` to `last_seq` without a gap and that each continues the chain from
    /// `chain` (the receiver's chain after `first_seq - 1`).
    pub fn open(&self, chain: &ChainHash) -> Result<Vec<Record>, WireError> {
        if self.raw_bytes > BATCH_RAW_BYTES_MAX || self.last_seq < self.first_seq {
            return Err(WireError::Oversized { bytes: self.raw_bytes });
        }
        let raw = zstd::bulk::decompress(&self.payload, self.raw_bytes as usize)
            .map_err(|e| WireError::Decompress(e.to_string()))?;
        if raw.len() as u64 != self.raw_bytes {
            return Err(WireError::Decompress(format!("{} bytes, {} claimed", raw.len(), self.raw_bytes)));
        }
        if blake3::hash(&raw).as_bytes() != &self.content_hash {
            return Err(WireError::HashMismatch { first: self.first_seq.0, last: self.last_seq.0 });
        }
        let bad = |seq: u64, reason: String| WireError::BadRecord {
            first: self.first_seq.0,
            last: self.last_seq.0,
            seq,
            reason,
        };
        let mut records = Vec::new();
        let mut rest: &[u8] = &raw;
        let mut prev = *chain;
        let mut expected = self.first_seq;
        while !rest.is_empty() {
            let head: &[u8; HEADER_BYTES] = rest
                .get(..HEADER_BYTES)
                .and_then(|h| h.try_into().ok())
                .ok_or_else(|| bad(expected.0, "truncated header".into()))?;
            let header = RecordHeader::decode(head).map_err(|e| bad(expected.0, e.into()))?;
            let (bytes, tail) = rest
                .split_at_checked(header.total_len as usize)
                .ok_or_else(|| bad(expected.0, "truncated record".into()))?;
            let rec = record::decode(bytes, Some(&prev)).map_err(|e| bad(expected.0, e.to_string()))?;
            if rec.seq != expected {
                return Err(bad(expected.0, format!("has seq {}", rec.seq.0)));
            }
            prev = rec.chain;
            expected = Seq(expected.0 + 1);
            records.push(rec);
            rest = tail;
        }
        if expected.0 != self.last_seq.0 + 1 {
            return Err(bad(expected.0, format!("batch ends before its last seq {}", self.last_seq.0)));
        }
        Ok(records)
    }
}
