//! The interface between the NBD server and whatever stores the bytes.
//!
//! The server knows nothing about journals or groups: it asks an [`ExportProvider`] for exports
//! by name and calls the blocking methods of [`Export`] from `tokio::task::spawn_blocking`; only
//! [`Export::try_write`] and [`Export::try_read`], which must never wait, are called on the
//! connection's async task.

use std::sync::Arc;
use std::time::Duration;

/// What a client learns about an export during the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name, as the client asks for it (`VOLUME` or `IMAGE/VOLUME`).
    pub name: String,
    /// Human-readable description sent with NBD_INFO_DESCRIPTION and NBD_REP_SERVER.
    pub description: String,
    /// Current size of the export in bytes.
    pub size_bytes: u64,
    /// Preferred (and minimum) I/O size in bytes: 512 or 4096.
    pub block_size_bytes: u32,
    /// Writes, trims and zeroes are refused with EPERM when set.
    pub read_only: bool,
}

/// One extent of a `base:allocation` answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AllocationExtent {
    /// Length of the extent in bytes.
    pub length_bytes: u64,
    /// The extent is unallocated (NBD_STATE_HOLE).
    pub hole: bool,
    /// The extent reads as zeroes (NBD_STATE_ZERO).
    pub zero: bool,
}

/// An NBD command that reaches an export, for per-export accounting in [`Export::observe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE`.
    Write,
    /// `NBD_CMD_FLUSH`.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_CACHE`.
    Cache,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
}

impl Operation {
    /// Every operation, in command-number order.
    pub const ALL: [Operation; 7] = [
        Operation::Read,
        Operation::Write,
        Operation::Flush,
        Operation::Trim,
        Operation::Cache,
        Operation::WriteZeroes,
        Operation::BlockStatus,
    ];

    /// Lower-case name (`write_zeroes`), as metrics label it.
    pub fn name(self) -> &'static str {
        match self {
            Operation::Read => "read",
            Operation::Write => "write",
            Operation::Flush => "flush",
            Operation::Trim => "trim",
            Operation::Cache => "cache",
            Operation::WriteZeroes => "write_zeroes",
            Operation::BlockStatus => "block_status",
        }
    }

    /// Position in [`Operation::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Why an export operation failed; each maps to one NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The export is read-only (or the group lost its primary role): NBD_EPERM.
    #[error("export is read-only")]
    ReadOnly,
    /// The request reaches past the end of the export: NBD_EINVAL (or ENOSPC for writes).
    #[error("request [{offset}, +{length}) is outside the export of {size_bytes} bytes")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        length: u64,
        /// Size of the export in bytes.
        size_bytes: u64,
    },
    /// The store refused for lack of space or a journal limit: NBD_ENOSPC.
    #[error("no space: {0}")]
    NoSpace(String),
    /// The export or its group is shutting down or was deleted: NBD_ESHUTDOWN.
    #[error("export is shutting down")]
    ShuttingDown,
    /// Any other storage failure (corruption, poisoned group, I/O error): NBD_EIO.
    #[error("I/O error: {0}")]
    Io(String),
}

/// An open export. Implementations must be safe to call from many connections at once
/// (the server advertises NBD_FLAG_CAN_MULTI_CONN): a `flush` covers every write that any
/// connection has already had a reply for.
pub trait Export: Send + Sync + 'static {
    /// The export's current description (size may change after a resize).
    fn info(&self) -> ExportInfo;
    /// Fill `buf` with the bytes at `offset`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError>;
    /// [`Export::read`], but only if it can be done without waiting (for a lock or the disk:
    /// only copying from memory); `None` otherwise, with `buf` in any state. The server calls
    /// it on its async task and hands a `None` to the blocking pool as `read`. The default
    /// never tries.
    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), ExportError>> {
        let _ = (offset, buf);
        None
    }
    /// Write `data` at `offset`; with `fua`, return only once it is durable.
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError>;
    /// [`Export::write`] without FUA, but only if it can be done without waiting (for a lock,
    /// a sync, a throttle: anything but copying into memory); `None`, having done nothing,
    /// otherwise. The server calls it on its async task and hands a `None` to the blocking pool
    /// as `write`. The default never tries.
    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), ExportError>> {
        let _ = (offset, data);
        None
    }
    /// Make `[offset, offset+length)` read as zeroes. `may_punch` is false with NBD_CMD_FLAG_NO_HOLE.
    fn write_zeroes(&self, offset: u64, length: u64, fua: bool, may_punch: bool) -> Result<(), ExportError>;
    /// Discard `[offset, offset+length)`; afterwards it reads as zeroes.
    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError>;
    /// Make every write already replied to durable.
    fn flush(&self) -> Result<(), ExportError>;
    /// Describe allocation of `[offset, offset+length)`; the extents must cover at least one
    /// byte and may stop early. Their lengths sum to at most `length`.
    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<AllocationExtent>, ExportError>;
    /// Called once for every answered request of a known command, refused ones included, with
    /// the bytes it covered (zero when it failed; see [`crate::CommandStats::bytes_total`]),
    /// whether it was answered with an error, and the time from reading its header to queueing
    /// its reply. Runs on the request's path: keep it to a few atomic adds. Does nothing unless
    /// the export wants per-export metrics.
    fn observe(&self, _operation: Operation, _bytes: u64, _failed: bool, _latency: Duration) {}
}

/// The set of exports a server offers.
pub trait ExportProvider: Send + Sync + 'static {
    /// Every export, for NBD_OPT_LIST.
    fn list(&self) -> Vec<ExportInfo>;
    /// Open an export by name, or `None` when there is no such export.
    fn open(&self, name: &str) -> Option<Arc<dyn Export>>;
}
