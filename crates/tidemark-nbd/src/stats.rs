//! Counters the daemon reads to export NBD metrics; plain atomics, updated once per request.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Counters for one NBD command.
#[derive(Debug, Default)]
pub struct CommandStats {
    /// Requests of this command that were answered (successfully or not).
    pub ops_total: AtomicU64,
    /// Bytes covered by successful requests: the payload for reads and writes, the effect
    /// length for trim, cache, write-zeroes and block-status, zero for flush.
    pub bytes_total: AtomicU64,
    /// Requests answered with an error, including those rejected before reaching storage.
    pub errors_total: AtomicU64,
    /// Sum over answered requests of the time from reading the request header to queueing the
    /// reply, in nanoseconds; divide by `ops_total` for the mean latency.
    pub latency_nanoseconds_sum: AtomicU64,
}

impl CommandStats {
    /// Count one answered request.
    pub(crate) fn record(&self, bytes: u64, failed: bool, latency: Duration) {
        self.ops_total.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors_total.fetch_add(1, Ordering::Relaxed);
        } else {
            self.bytes_total.fetch_add(bytes, Ordering::Relaxed);
        }
        let nanoseconds = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
        self.latency_nanoseconds_sum.fetch_add(nanoseconds, Ordering::Relaxed);
    }
}

/// Counters for a whole [`crate::NbdServer`]: per command, and per connection outcome.
#[derive(Debug, Default)]
pub struct NbdStats {
    /// `NBD_CMD_READ`.
    pub read: CommandStats,
    /// `NBD_CMD_WRITE`.
    pub write: CommandStats,
    /// `NBD_CMD_FLUSH`.
    pub flush: CommandStats,
    /// `NBD_CMD_TRIM`.
    pub trim: CommandStats,
    /// `NBD_CMD_CACHE`.
    pub cache: CommandStats,
    /// `NBD_CMD_WRITE_ZEROES`.
    pub write_zeroes: CommandStats,
    /// `NBD_CMD_BLOCK_STATUS`.
    pub block_status: CommandStats,
    /// Requests with a command type this server does not know (answered with `NBD_EINVAL`).
    pub unknown_commands_total: AtomicU64,
    /// Connections currently open (handshake or transmission).
    pub connections_active: AtomicU64,
    /// Connections accepted since the server started.
    pub connections_accepted_total: AtomicU64,
    /// Connections closed at once because `connections_max` were already open.
    pub connections_rejected_total: AtomicU64,
    /// Connections whose handshake failed (protocol violation, timeout, unknown export).
    pub handshakes_failed_total: AtomicU64,
    /// Connections in transmission closed by the server because of a protocol violation or an
    /// I/O error, rather than by `NBD_CMD_DISC`, the client closing, or a shutdown.
    pub transmissions_failed_total: AtomicU64,
}

impl NbdStats {
    /// The counters of a command, or `None` for `NBD_CMD_DISC` and unknown commands.
    pub(crate) fn command(&self, kind: u16) -> Option<&CommandStats> {
        use crate::proto::*;
        match kind {
            CMD_READ => Some(&self.read),
            CMD_WRITE => Some(&self.write),
            CMD_FLUSH => Some(&self.flush),
            CMD_TRIM => Some(&self.trim),
            CMD_CACHE => Some(&self.cache),
            CMD_WRITE_ZEROES => Some(&self.write_zeroes),
            CMD_BLOCK_STATUS => Some(&self.block_status),
            _ => None,
        }
    }
}
