//! The engine's vocabulary: identifiers, points in history, and the descriptions it hands out.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use tidemark_journal::{Seq, UnixNanos};

/// The smallest and largest block sizes a volume may be created with.
pub const BLOCK_SIZES_ALLOWED: [u32; 2] = [512, 4096];
/// Largest logical volume size: 64 TiB.
pub const VOLUME_SIZE_BYTES_MAX: u64 = 64 << 40;

/// A moment to recover to, as an operator names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Point {
    /// The newest record.
    Latest,
    /// Exactly after record `seq`.
    Seq(Seq),
    /// The point a bookmark names.
    Bookmark(String),
    /// The state after the last record whose time is <= this instant.
    Time(UnixNanos),
    /// Like `Time`, relative to the engine clock's now (`-5m`).
    Ago(Duration),
}

/// Why a point could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid point {input:?}: {reason} (expected RFC 3339 time, -DURATION, bookmark:NAME, seq:N or latest)"
)]
pub struct PointParseError {
    /// The text that was given.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for Point {
    type Err = PointParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| PointParseError { input: s.to_string(), reason: reason.to_string() };
        if s == "latest" {
            return Ok(Point::Latest);
        }
        if let Some(n) = s.strip_prefix("seq:") {
            return n
                .parse::<u64>()
                .map(|n| Point::Seq(Seq(n)))
                .map_err(|_| err("seq must be a whole number"));
        }
        if let Some(name) = s.strip_prefix("bookmark:") {
            if name.is_empty() {
                return Err(err("bookmark name is empty"));
            }
            return Ok(Point::Bookmark(name.to_string()));
        }
        if let Some(d) = s.strip_prefix('-') {
            return humantime::parse_duration(d).map(Point::Ago).map_err(|e| err(&e.to_string()));
        }
        let t = humantime::parse_rfc3339_weak(s).map_err(|e| err(&e.to_string()))?;
        let ns = t.duration_since(std::time::UNIX_EPOCH).map_err(|_| err("time is before 1970"))?.as_nanos();
        u64::try_from(ns)
            .map(|ns| Point::Time(UnixNanos(ns)))
            .map_err(|_| err("time is too far in the future"))
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Point::Latest => write!(f, "latest"),
            Point::Seq(s) => write!(f, "seq:{}", s.0),
            Point::Bookmark(b) => write!(f, "bookmark:{b}"),
            Point::Time(t) => write!(f, "{}", t.rfc3339()),
            Point::Ago(d) => write!(f, "-{}", humantime::format_duration(*d)),
        }
    }
}

/// Whether an image accepts writes (into its private overlay).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageMode {
    /// Reads only; the export advertises READ_ONLY.
    ReadOnly,
    /// Writes land in a private overlay that never touches the group's journal.
    Writable,
    /// Read-only: a returning primary's divergent tail, kept at failback. Its overlay holds the
    /// blocks the tail wrote, on top of the fork point.
    Salvage,
}

impl ImageMode {
    /// Whether hosts may write to its exports.
    pub fn is_writable(self) -> bool {
        self == ImageMode::Writable
    }

    /// Whether it keeps an overlay on disk.
    pub fn has_overlay(self) -> bool {
        matches!(self, ImageMode::Writable | ImageMode::Salvage)
    }
}

/// What a salvage image holds: the writes a returning primary made after the fork point, which
/// its partner never received.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalvageInfo {
    /// Last seq both sites shared (the image shows the fork point plus the tail's blocks).
    pub fork_seq: u64,
    /// Generation that forked the history (the partner's takeover).
    pub fork_generation: u64,
    /// First and last seq of the divergent tail.
    pub first_seq: u64,
    /// Last seq of the divergent tail.
    pub last_seq: u64,
    /// Source time of the tail's first record (RFC 3339).
    pub first_time: String,
    /// Source time of the tail's last record (RFC 3339).
    pub last_time: String,
    /// Blocks the tail changed, per volume name.
    pub blocks: std::collections::BTreeMap<String, u64>,
    /// Bytes of those blocks.
    pub bytes: u64,
}

/// Options a group is created with.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupOptions {
    /// How long history is kept, in seconds.
    pub retention_seconds: u64,
    /// Most bytes the journal may occupy; past it the oldest history is trimmed (with an event).
    pub journal_max_bytes: u64,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions { retention_seconds: 24 * 3600, journal_max_bytes: 20 << 30 }
    }
}

/// A recoverable point as shown to operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointInfo {
    /// The record the point is after.
    pub seq: u64,
    /// RFC 3339 time of that record (source time).
    pub time: String,
}

/// A group as shown by `group show`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupInfo {
    /// Group name.
    pub name: String,
    /// Names of the group's volumes.
    pub volumes: Vec<String>,
    /// Newest record's seq.
    pub last_seq: u64,
    /// Oldest point history can be recovered to (RFC 3339).
    pub oldest_point: String,
    /// Newest point (RFC 3339).
    pub newest_point: String,
    /// Oldest recoverable seq.
    pub oldest_seq: u64,
    /// Retention window in seconds.
    pub retention_seconds: u64,
    /// Journal size limit in bytes.
    pub journal_max_bytes: u64,
    /// Bytes the journal occupies now.
    pub journal_bytes: u64,
    /// `ok`, or `poisoned` after a failed fsync (refuses writes until restart), or `failed`
    /// after corruption was found.
    pub state: String,
    /// Why the group is not `ok`, when it is not.
    pub state_reason: Option<String>,
    /// `primary` (accepts host writes) or `secondary` (receives the primary's history).
    pub role: String,
    /// Fencing generation of the primary role, as known here.
    pub generation: u64,
    /// Block versions in the index: one per block written within the retention window, per
    /// write.
    #[serde(default)]
    pub index_versions: u64,
    /// Bytes of memory the index and the table of record times have allocated.
    #[serde(default)]
    pub index_bytes: u64,
}

/// A volume as shown by `volume show`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Volume (and export) name.
    pub name: String,
    /// The group it belongs to.
    pub group: String,
    /// Logical size in bytes.
    pub size_bytes: u64,
    /// Block size in bytes.
    pub block_size_bytes: u32,
}

/// A bookmark.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BookmarkInfo {
    /// Bookmark name, unique within its group.
    pub name: String,
    /// The point it names.
    pub point: PointInfo,
}

/// A completed rollback, as shown by `history`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RollbackInfo {
    /// The point the group was put back to.
    pub target: PointInfo,
    /// The point just before the rollback began (roll back to it to undo).
    pub before: PointInfo,
    /// The point after the rollback's last record.
    pub after: PointInfo,
    /// Bytes of block data the rollback rewrote.
    pub bytes_rewritten: u64,
}

/// What `history GROUP` shows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HistoryInfo {
    /// Group name.
    pub group: String,
    /// Oldest recoverable point.
    pub oldest: PointInfo,
    /// Newest point.
    pub newest: PointInfo,
    /// Bookmarks, oldest first.
    pub bookmarks: Vec<BookmarkInfo>,
    /// Rollbacks, oldest first.
    pub rollbacks: Vec<RollbackInfo>,
}

/// An image.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Image name; its exports are `NAME/VOLUME`.
    pub name: String,
    /// The group it views.
    pub group: String,
    /// The point it shows.
    pub point: PointInfo,
    /// Read-only, writable or salvage.
    pub mode: ImageMode,
    /// Its export names.
    pub exports: Vec<String>,
    /// For a salvage image: what the divergent tail covered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub salvage: Option<SalvageInfo>,
}

/// Progress of a long operation, in bytes.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes done so far.
    pub done_bytes: u64,
    /// Bytes to do in all.
    pub total_bytes: u64,
}
