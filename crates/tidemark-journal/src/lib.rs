//! Tidemark's journal: the write-order-preserving, checksummed, hash-chained log of a group.
//!
//! This crate knows nothing of volumes' contents, networks or async runtimes: it never uses
//! tokio, never reads a clock (times are passed in) and does all file access through
//! [`storage::Storage`], so tests can cut power between any two writes.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod journal;
pub mod recent;
pub mod record;
pub mod stats;
pub mod storage;

pub use journal::{
    genesis_chain, Appended, Journal, JournalConfig, JournalReader, RawRecords, RecoveryReport,
    ReplicaAppend, ResumePoint, SegmentSummary, SyncTicket,
};
pub use record::{Control, Record, RecordBody, VerifiedRecord, ZeroMode};

/// A record's position in its group's history; grows by one per record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Seq(pub u64);

/// Fencing number of the group's primary role; only ever grows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Generation(pub u64);

/// The first seq written under a generation: one step of a group's lineage. Two sites compare
/// lineages to find where their histories fork (records with the same seq and generation were
/// written by the same primary, so they are the same record).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenerationStart {
    /// The generation.
    pub generation: u64,
    /// Its first record's seq (records before it belong to older generations).
    pub first_seq: Seq,
}

/// A volume's id within its group.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VolumeId(pub u32);

/// Nanoseconds since the Unix epoch (UTC).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UnixNanos(pub u64);

impl UnixNanos {
    /// RFC 3339 with millisecond precision, UTC (`2026-11-22T09:41:07.250Z`).
    pub fn rfc3339(self) -> String {
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(self.0);
        humantime::format_rfc3339_millis(t).to_string()
    }
}

/// The running hash of a journal: blake3 over the previous chain hash and a record's checksum.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChainHash(pub [u8; 32]);

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0.iter().take(8) {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Where a record starts: segment index and byte offset within the segment file.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Location {
    /// Segment index.
    pub segment: u64,
    /// Byte offset of the record's first byte in the segment file.
    pub offset: u64,
}

/// What can go wrong with a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Data on disk fails its checks somewhere other than a torn tail.
    #[error("journal corrupt in {} at offset {offset}: {reason}", file.display())]
    Corrupt {
        /// The segment file.
        file: PathBuf,
        /// Byte offset of the bad record or header.
        offset: u64,
        /// What check failed.
        reason: String,
    },
    /// There is no journal where one was expected.
    #[error("no journal segments in {}", .0.display())]
    Missing(PathBuf),
    /// fdatasync failed: the page cache can no longer be trusted, so the group must stop.
    #[error("fdatasync failed: {0}")]
    SyncFailed(String),
    /// A file operation failed.
    #[error("{action} {}: {source}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A partner's record would not continue this journal's chain: the histories differ.
    #[error("histories diverge at seq {seq}: chain here would be {ours:?}, the partner's is {theirs:?}")]
    Diverged {
        /// The seq where they differ.
        seq: u64,
        /// Our chain after it.
        ours: ChainHash,
        /// Theirs.
        theirs: ChainHash,
    },
    /// Bytes handed in are not a valid record.
    #[error("invalid record: {0}")]
    Invalid(String),
}

impl JournalError {
    fn io(action: &'static str, path: PathBuf, source: std::io::Error) -> Self {
        JournalError::Io { action, path, source }
    }
}
