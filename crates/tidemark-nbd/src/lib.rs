//! NBD server (fixed newstyle) for Tidemark exports.
//!
//! [`NbdServer`] speaks the protocol in `shared/reference/nbd-protocol.md` to hosts and turns
//! their requests into calls on an [`Export`] found through an [`ExportProvider`]. It knows
//! nothing about journals: storage calls run on `tokio::task::spawn_blocking`, except a write
//! or read of at most 128 KiB that the export can do without waiting ([`Export::try_write`],
//! [`Export::try_read`]), done on the connection's task.
//!
//! What is served:
//!
//! - Fixed newstyle handshake only (clients without `NBD_FLAG_C_FIXED_NEWSTYLE` are closed), with
//!   `NBD_FLAG_C_NO_ZEROES`; no TLS (`NBD_OPT_STARTTLS` gets `NBD_REP_ERR_UNSUP`).
//! - Options `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`,
//!   `LIST_META_CONTEXT` and `SET_META_CONTEXT` (the only context is `base:allocation`); any
//!   other option gets `NBD_REP_ERR_UNSUP`.
//! - Commands `READ`, `WRITE`, `DISC`, `FLUSH`, `TRIM`, `CACHE`, `WRITE_ZEROES` (with `NO_HOLE`
//!   and `FAST_ZERO`: a zeroing is a journal record, always faster than the equivalent write)
//!   and `BLOCK_STATUS`, each with `FUA`. Requests on one connection run concurrently and their
//!   replies go out in completion order.
//!
//! Limits and what happens when one is reached (each is a policy, not an accident):
//!
//! - Connections: at most [`ServerConfig::connections_max`]; a connection beyond it is closed at
//!   once and counted in [`NbdStats::connections_rejected_total`].
//! - Handshake: it must finish within [`ServerConfig::handshake_timeout`] and use at most
//!   [`OPTIONS_MAX`] options, else the connection is closed. Option data above
//!   [`OPTION_BYTES_MAX`] is read and dropped and answered with `NBD_REP_ERR_TOO_BIG`; above
//!   [`OPTION_DISCARD_BYTES_MAX`] (or for `NBD_OPT_EXPORT_NAME`, which cannot be refused) the
//!   connection is closed.
//! - Requests in flight per connection: at most [`ServerConfig::inflight_requests_max`] requests
//!   and [`ServerConfig::inflight_bytes_max`] bytes of read and write payload. When either is
//!   reached the server stops reading from that connection until replies go out, so a fast
//!   client is slowed down rather than queued without bound.
//! - Payloads: a read longer than [`ServerConfig::payload_bytes_max`] fails with
//!   `NBD_EOVERFLOW` (structured replies) or `NBD_EINVAL` (simple replies). A longer write fails
//!   with `NBD_EINVAL`; its payload is read and dropped when it is at most
//!   [`WRITE_DISCARD_BYTES_MAX`] (the spec asks servers not to treat up to 32 MiB as an attack),
//!   otherwise the server sends the error and closes the connection, since skipping gigabytes
//!   costs as much as accepting them. Trim, zeroes, cache and block-status carry no payload and
//!   may cover any range inside the export.
//! - Replies: a reply the client does not read within [`REPLY_WRITE_TIMEOUT`] closes the
//!   connection, so a client that stops reading cannot pin its requests' memory forever.
//! - Shutdown: see [`NbdServer::serve`]; storage calls still running and replies not yet read
//!   (bounded by the timeout above) are all a shutdown waits for.
//!
//! A request header without `NBD_REQUEST_MAGIC` closes the connection (the stream cannot be
//! resynchronised); every other bad request gets an error reply and the connection goes on.
//! Whatever a client sends, only its own connection is affected.

pub mod export;
mod framing;
mod handshake;
mod proto;
mod stats;
mod transmission;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use export::{AllocationExtent, Export, ExportError, ExportInfo, ExportProvider, Operation};
pub use stats::{CommandStats, NbdStats};

/// Largest option data the server reads and acts on, in bytes. Real options are a name and a
/// few queries; the spec caps strings at 4 KiB.
pub const OPTION_BYTES_MAX: u32 = 64 * 1024;
/// Largest option data the server reads and drops to answer `NBD_REP_ERR_TOO_BIG`, in bytes;
/// anything larger closes the connection.
pub const OPTION_DISCARD_BYTES_MAX: u32 = 1024 * 1024;
/// Most options one handshake may send before the server closes the connection.
pub const OPTIONS_MAX: usize = 1024;
/// Largest refused write payload the server reads and drops while keeping the connection, in
/// bytes (2^25, the size the spec says must not be treated as an attack).
pub const WRITE_DISCARD_BYTES_MAX: u32 = 1 << 25;
/// How long one reply may wait for the client to read it before the connection is closed.
pub const REPLY_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bounds applied to [`ServerConfig::payload_bytes_max`]: at least the largest preferred block
/// size (64 KiB), at most 1 GiB so a structured read chunk's length always fits in 32 bits.
pub const PAYLOAD_BYTES_MAX_RANGE: std::ops::RangeInclusive<u32> = (64 * 1024)..=(1 << 30);

/// Tunables of an [`NbdServer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest read or write payload a request may carry, in bytes; advertised as the maximum
    /// payload in `NBD_INFO_BLOCK_SIZE`. Clamped to [`PAYLOAD_BYTES_MAX_RANGE`].
    pub payload_bytes_max: u32,
    /// Requests one connection may have in flight; at least 1.
    pub inflight_requests_max: usize,
    /// Read and write payload bytes one connection may have in flight; a single request larger
    /// than this runs alone. At least 1.
    pub inflight_bytes_max: usize,
    /// Time a client has to finish option haggling.
    pub handshake_timeout: Duration,
    /// Connections open at once; more are closed right after accept.
    pub connections_max: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            payload_bytes_max: 32 * 1024 * 1024,
            inflight_requests_max: 64,
            inflight_bytes_max: 64 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            connections_max: 256,
        }
    }
}

/// Why a connection ended other than cleanly (`NBD_CMD_DISC`, `NBD_OPT_ABORT`, the client
/// closing between messages, or a server shutdown).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// Reading from or writing to the client failed, including the client closing the
    /// connection in the middle of a message.
    #[error("connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
    /// The client did not finish option haggling in time.
    #[error("handshake not finished within {timeout:?}")]
    HandshakeTimeout {
        /// The configured [`ServerConfig::handshake_timeout`].
        timeout: Duration,
    },
    /// The client did not set `NBD_FLAG_C_FIXED_NEWSTYLE`; only fixed newstyle is served.
    #[error("client flags {flags:#x} lack NBD_FLAG_C_FIXED_NEWSTYLE; only fixed newstyle is served")]
    FixedNewstyleRequired {
        /// The client flags as received.
        flags: u32,
    },
    /// The client set flags the server did not advertise; the spec requires closing.
    #[error("client flags {flags:#x} include flags the server did not advertise")]
    UnknownClientFlags {
        /// The client flags as received.
        flags: u32,
    },
    /// An option did not start with `IHAVEOPT`.
    #[error("option magic {magic:#018x} is not IHAVEOPT")]
    BadOptionMagic {
        /// The 8 bytes received instead, big-endian.
        magic: u64,
    },
    /// The client sent more than [`OPTIONS_MAX`] options.
    #[error("client sent more than {limit} options")]
    TooManyOptions {
        /// [`OPTIONS_MAX`].
        limit: usize,
    },
    /// An option carried more data than the server reads or skips.
    #[error("option {option} carries {length_bytes} bytes, more than the {limit_bytes}-byte limit")]
    OptionTooLarge {
        /// The option number.
        option: u32,
        /// The announced data length in bytes.
        length_bytes: u32,
        /// The limit that was exceeded, in bytes.
        limit_bytes: u32,
    },
    /// `NBD_OPT_EXPORT_NAME` named an export that does not exist (or a name that is not
    /// UTF-8); that option has no error reply, so the spec requires closing.
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {name:?}")]
    UnknownExport {
        /// The requested name (lossily decoded, cut to 256 bytes).
        name: String,
    },
    /// A request did not start with `NBD_REQUEST_MAGIC`; the stream cannot be resynchronised.
    #[error("request magic {magic:#010x} is not NBD_REQUEST_MAGIC")]
    BadRequestMagic {
        /// The 4 bytes received instead, big-endian.
        magic: u32,
    },
    /// A write announced a payload too large to read or skip; the server replied with an
    /// error and closed the connection.
    #[error("write payload of {length_bytes} bytes is above the {limit_bytes}-byte limit")]
    PayloadTooLarge {
        /// The announced payload length in bytes.
        length_bytes: u32,
        /// The largest payload the server reads or skips, in bytes.
        limit_bytes: u32,
    },
    /// The client did not read a reply within [`REPLY_WRITE_TIMEOUT`].
    #[error("client did not read a reply within {timeout:?}")]
    ReplyTimeout {
        /// [`REPLY_WRITE_TIMEOUT`].
        timeout: Duration,
    },
    /// Looking up an export failed inside the storage task (it panicked or was cancelled).
    #[error("export lookup failed: {0}")]
    LookupFailed(String),
}

/// Serves exports of one [`ExportProvider`] over NBD.
pub struct NbdServer {
    provider: Arc<dyn ExportProvider>,
    limits: Limits,
    stats: Arc<NbdStats>,
}

impl NbdServer {
    /// A server for the exports of `provider`; out-of-range `config` values are clamped as
    /// documented on [`ServerConfig`].
    pub fn new(provider: Arc<dyn ExportProvider>, config: ServerConfig) -> Self {
        NbdServer { provider, limits: Limits::from_config(&config), stats: Arc::new(NbdStats::default()) }
    }

    /// Counters for metrics.
    pub fn stats(&self) -> &NbdStats {
        &self.stats
    }

    /// Serve connections from `listener` until `shutdown` resolves; then stop accepting, let
    /// in-flight requests finish, and return.
    ///
    /// On shutdown each connection stops reading new requests (one still arriving is dropped
    /// unanswered: nothing about it was acknowledged), sends the replies of the requests it
    /// already read, and closes. A connection still haggling is closed between options; an
    /// option already arriving gets `NBD_REP_ERR_SHUTDOWN`, and the handshake timeout bounds
    /// the rest. A failing `accept` that is per-connection or a
    /// resource shortage (out of file descriptors) is logged and retried after a pause; one
    /// that means the listener itself is broken stops the server the same way as `shutdown`
    /// and is returned.
    ///
    /// # Cancel safety
    ///
    /// Dropping the future stops accepting, but connections already accepted keep running
    /// as detached tasks until they end; resolve `shutdown` instead to stop them.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let (stop_sender, stop) = watch::channel(false);
        let mut connections = JoinSet::new();
        tokio::pin!(shutdown);
        let mut result = Ok(());
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => self.admit(stream, peer, &stop, &mut connections),
                    Err(error) if accept_error_is_fatal(&error) => {
                        tracing::error!(%error, "NBD listener failed; stopping the NBD server");
                        result = Err(error);
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "accepting an NBD connection failed; retrying");
                        tokio::time::sleep(ACCEPT_RETRY_PAUSE).await;
                    }
                },
                Some(joined) = connections.join_next(), if !connections.is_empty() => {
                    log_connection_task(joined);
                }
            }
        }
        drop(listener);
        stop_sender.send_replace(true);
        while let Some(joined) = connections.join_next().await {
            log_connection_task(joined);
        }
        result
    }

    /// Serve one already-accepted stream until the client disconnects, then return.
    ///
    /// `Ok` means the connection ended the way the protocol allows (`NBD_CMD_DISC`,
    /// `NBD_OPT_ABORT`, or the client closing between messages); `Err` says why the server
    /// closed it. The stream counts against [`ServerConfig::connections_max`] while it runs but
    /// is not refused by it, and no shutdown reaches it: drop the future to abandon it.
    pub async fn serve_connection<S>(self: Arc<Self>, stream: S) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        // Nothing ever stops this connection: framing::stop_signalled treats a dropped sender
        // as "never".
        let (_, stop) = watch::channel(false);
        let guard = ConnectionGuard::new(self.stats.clone());
        self.run_connection(stream, stop, guard).await
    }

    /// Start a task for a freshly accepted connection, or refuse it when full.
    fn admit(
        self: &Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: &watch::Receiver<bool>,
        connections: &mut JoinSet<()>,
    ) {
        let active = self.stats.connections_active.load(Ordering::Relaxed);
        if active >= self.limits.connections_max as u64 {
            self.stats.connections_rejected_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                %peer,
                connections_max = self.limits.connections_max,
                "refusing NBD connection: connections_max reached"
            );
            return;
        }
        // The spec asks both sides to disable Nagle so a reply header is not held back while
        // waiting for an ACK of the previous packet.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        let guard = ConnectionGuard::new(self.stats.clone());
        let server = Arc::clone(self);
        let stop = stop.clone();
        connections.spawn(async move {
            match server.run_connection(stream, stop, guard).await {
                Ok(()) => tracing::debug!(%peer, "NBD connection closed"),
                Err(error) => tracing::info!(%peer, %error, "NBD connection closed by the server"),
            }
        });
    }

    /// Handshake, then transmission, on one stream.
    async fn run_connection<S>(
        self: Arc<Self>,
        mut stream: S,
        mut stop: watch::Receiver<bool>,
        _guard: ConnectionGuard,
    ) -> Result<(), NbdError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let timeout = self.limits.handshake_timeout;
        let negotiated = tokio::time::timeout(timeout, handshake::negotiate(&mut stream, &self, &mut stop))
            .await
            .unwrap_or(Err(NbdError::HandshakeTimeout { timeout }));
        let session = match negotiated {
            Ok(Some(session)) => session,
            Ok(None) => return Ok(()),
            Err(error) => {
                self.stats.handshakes_failed_total.fetch_add(1, Ordering::Relaxed);
                return Err(error);
            }
        };
        let result = transmission::run(stream, session, &self, stop).await;
        if result.is_err() {
            self.stats.transmissions_failed_total.fetch_add(1, Ordering::Relaxed);
        }
        result
    }
}

/// Pause after an `accept` failure such as running out of file descriptors, so the loop does
/// not spin while the shortage lasts.
const ACCEPT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// [`ServerConfig`] after clamping, as the connections use it.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    /// Largest read or write payload, in bytes.
    pub(crate) payload_bytes_max: u32,
    /// Requests in flight per connection.
    pub(crate) inflight_requests_max: usize,
    /// Payload bytes in flight per connection.
    pub(crate) inflight_bytes_max: usize,
    /// Time allowed for option haggling.
    pub(crate) handshake_timeout: Duration,
    /// Connections open at once.
    pub(crate) connections_max: usize,
}

impl Limits {
    fn from_config(config: &ServerConfig) -> Self {
        Limits {
            payload_bytes_max: config
                .payload_bytes_max
                .clamp(*PAYLOAD_BYTES_MAX_RANGE.start(), *PAYLOAD_BYTES_MAX_RANGE.end()),
            inflight_requests_max: config.inflight_requests_max.max(1),
            inflight_bytes_max: config.inflight_bytes_max.clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
            handshake_timeout: config.handshake_timeout,
            connections_max: config.connections_max,
        }
    }
}

/// Keeps [`NbdStats::connections_active`] true for as long as a connection runs.
struct ConnectionGuard {
    stats: Arc<NbdStats>,
}

impl ConnectionGuard {
    fn new(stats: Arc<NbdStats>) -> Self {
        stats.connections_active.fetch_add(1, Ordering::Relaxed);
        stats.connections_accepted_total.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard { stats }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.stats.connections_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Errors from `accept` that mean the listening socket itself is unusable, as opposed to one
/// failed connection or a passing shortage of descriptors or memory.
fn accept_error_is_fatal(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EOPNOTSUPP | libc::EFAULT)
    )
}

/// Report a connection task that panicked; a panic is a server bug, never the client's doing.
fn log_connection_task(joined: Result<(), tokio::task::JoinError>) {
    if let Err(error) = joined {
        if error.is_panic() {
            tracing::error!(%error, "NBD connection task panicked");
        }
    }
}
