//! Errors the engine returns; each says what failed, on which object, and what to do next.

use std::path::PathBuf;

/// Anything the engine can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No object of that kind has that name.
    #[error("no {kind} named {name:?}")]
    NotFound {
        /// `group`, `volume`, `image`, `bookmark` or `export`.
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// The name is taken.
    #[error("a {kind} named {name:?} already exists")]
    AlreadyExists {
        /// `group`, `volume`, `image` or `bookmark`.
        kind: &'static str,
        /// The name asked for.
        name: String,
    },
    /// An argument is out of its allowed range or malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The point is outside the group's recoverable history.
    #[error("point {point} is outside the recoverable range of group {group:?}: {oldest} (seq {oldest_seq}) to {newest} (seq {newest_seq})")]
    PointOutOfRange {
        /// Group name.
        group: String,
        /// The point as given.
        point: String,
        /// Oldest recoverable time (RFC 3339).
        oldest: String,
        /// Oldest recoverable seq.
        oldest_seq: u64,
        /// Newest time (RFC 3339).
        newest: String,
        /// Newest seq.
        newest_seq: u64,
    },
    /// The operation conflicts with the object's state (a volume in use, an image pinning history).
    #[error("{0}")]
    Conflict(String),
    /// The group refuses writes after a failed fsync; restart the site to recover it from its journal.
    #[error("group {group:?} is poisoned after a failed fsync ({reason}); restart the site to recover it from the journal")]
    Poisoned {
        /// Group name.
        group: String,
        /// The failure that poisoned it.
        reason: String,
    },
    /// The group stopped because its journal or its files are corrupt.
    #[error("group {group:?} has failed: {reason}")]
    Failed {
        /// Group name.
        group: String,
        /// What was found, with file and offset.
        reason: String,
    },
    /// The group is a secondary here: its history comes from the primary, so hosts and
    /// operators cannot change it until it is promoted.
    #[error("group {group:?} is a secondary at this site: it refuses writes, rollbacks and volume changes until it is promoted")]
    NotPrimary {
        /// Group name.
        group: String,
    },
    /// The group is handing its primary role to its partner.
    #[error("group {group:?} is handing its primary role to its partner (a swap is under way); writes are refused until the swap finishes or is called off")]
    RoleChanging {
        /// Group name.
        group: String,
    },
    /// The partner's history differs from ours: replication of the group stops.
    #[error("group {group:?} diverged from its partner: {reason}")]
    Diverged {
        /// Group name.
        group: String,
        /// Where and how.
        reason: String,
    },
    /// The export is read-only.
    #[error("export {0:?} is read-only")]
    ReadOnly(String),
    /// A journal error (corruption is reported with segment and offset).
    #[error(transparent)]
    Journal(#[from] tidemark_journal::JournalError),
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done (`open base image`).
        action: &'static str,
        /// On which file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The catalog (sled) failed.
    #[error("catalog: {0}")]
    Catalog(String),
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
