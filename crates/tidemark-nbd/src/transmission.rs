//! The transmission phase: read requests, run them on storage concurrently, and write their
//! replies in completion order.
//!
//! One connection is two halves polled by one task. The reader takes a slot (and, for reads
//! and writes, payload bytes) from per-connection semaphores before it reads each request, so a
//! client with everything in flight is simply not read from until a reply goes out. Each valid
//! request runs on the blocking pool and hands its encoded reply to the writer through a bounded
//! channel; the reply carries the slot, so the slot frees once the reply is written. The writer
//! ends when every sender is gone: after the reader stopped and every in-flight request replied.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use crate::export::{AllocationExtent, Export, ExportError, Operation};
use crate::framing::{discard, read_header_or_stop, unless_stopped, HeaderRead};
use crate::handshake::Session;
use crate::proto::*;
use crate::stats::NbdStats;
use crate::{Limits, NbdError, NbdServer, REPLY_WRITE_TIMEOUT, WRITE_DISCARD_BYTES_MAX};

/// Buffer for reading requests, in bytes: many small headers per read syscall at queue depth.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Buffer for writing replies, in bytes; larger replies bypass it.
const WRITE_BUFFER_BYTES: usize = 64 * 1024;
/// Most descriptors in one block-status chunk, as the spec recommends (2^20).
const BLOCK_STATUS_DESCRIPTORS_MAX: usize = 1 << 20;
/// Largest read or write tried on the connection's task ([`Export::try_read`],
/// [`Export::try_write`]): the two context switches of a trip to the blocking pool cost more
/// than a small request, but next to a large one they are nothing, and on the pool large
/// requests are hashed and copied on several CPUs at once instead of one after another.
const INLINE_BYTES_MAX: u32 = 128 * 1024;

/// Serve requests on `stream` until the client disconnects, then return once every reply to a
/// request already read has been written.
///
/// # Cancel safety
///
/// Not cancel safe: dropping the future drops the connection; requests already on the
/// blocking pool still run to completion, and their replies are discarded.
pub(crate) async fn run<S>(
    stream: S,
    session: Session,
    server: &NbdServer,
    stop: watch::Receiver<bool>,
) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let limits = &server.limits;
    let rules = Rules {
        size_bytes: session.size_bytes,
        read_only: session.read_only,
        structured: session.structured,
        allocation_context: session.allocation_context,
        payload_bytes_max: limits.payload_bytes_max,
    };
    let connection = Arc::new(Connection {
        export: session.export,
        rules,
        stats: Arc::clone(&server.stats),
        // Each descriptor is 8 bytes after a 4-byte context id, and no chunk may exceed the
        // advertised maximum payload.
        descriptors_max: BLOCK_STATUS_DESCRIPTORS_MAX.min((limits.payload_bytes_max as usize - 4) / 8),
        buffers: BufferPool::new(limits.inflight_bytes_max),
    });
    let (read_half, write_half) = tokio::io::split(stream);
    let (sender, receiver) = mpsc::channel(limits.inflight_requests_max);
    let reader = read_requests(
        BufReader::with_capacity(READ_BUFFER_BYTES, read_half),
        connection,
        sender,
        stop,
        limits,
    );
    let writer = write_replies(write_half, receiver);
    tokio::pin!(reader, writer);
    tokio::select! {
        read = &mut reader => {
            // In-flight requests still hold senders, so this waits for their replies.
            let written = writer.await;
            read.and(written)
        }
        // The reader holds a sender while it runs, so the writer only ends first when writing
        // to the client failed; without it the reader has nothing useful left to do.
        written = &mut writer => written,
    }
}

/// What requests may do on this connection, fixed when the handshake ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rules {
    /// Export size announced to the client, in bytes.
    size_bytes: u64,
    /// `NBD_FLAG_READ_ONLY` was announced.
    read_only: bool,
    /// Structured replies were negotiated.
    structured: bool,
    /// The `base:allocation` context id, when selected.
    allocation_context: Option<u32>,
    /// Largest read or write payload, in bytes.
    payload_bytes_max: u32,
}

/// A request that passed validation, ready for storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Read { offset: u64, length: u32 },
    Write { offset: u64, length: u32, fua: bool },
    Flush,
    Trim { offset: u64, length: u32, fua: bool },
    Cache,
    WriteZeroes { offset: u64, length: u32, fua: bool, may_punch: bool },
    BlockStatus { offset: u64, length: u32, req_one: bool, context: u32 },
}

/// Why a request was refused before reaching storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rejection {
    error: WireError,
    message: &'static str,
}

fn reject(error: WireError, message: &'static str) -> Rejection {
    Rejection { error, message }
}

/// Check a request against the session; `NBD_CMD_DISC` never gets here.
fn decode(request: &Request, rules: &Rules) -> Result<Command, Rejection> {
    let allowed_flags = match request.kind {
        CMD_READ if rules.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_CACHE => CMD_FLAG_FUA,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => return Err(reject(WireError::Inval, "unknown command")),
    };
    if request.flags & !allowed_flags != 0 {
        return Err(reject(WireError::Inval, "command flags not valid for this command"));
    }
    let writes = matches!(request.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && rules.read_only {
        return Err(reject(WireError::Perm, "export is read-only"));
    }
    let Request { flags, offset, length, .. } = *request;
    let fua = flags & CMD_FLAG_FUA != 0;
    let in_range = offset.checked_add(u64::from(length)).is_some_and(|end| end <= rules.size_bytes);
    // The spec's error section: writes past the end SHOULD get ENOSPC, reads, trims and the
    // rest EINVAL.
    let past_end = if matches!(request.kind, CMD_WRITE | CMD_WRITE_ZEROES) {
        reject(WireError::NoSpc, "request extends past the end of the export")
    } else {
        reject(WireError::Inval, "request extends past the end of the export")
    };
    let checked = |command: Command| if in_range { Ok(command) } else { Err(past_end) };
    match request.kind {
        CMD_READ if length > rules.payload_bytes_max => Err(reject(
            // A structured client can retry with smaller reads on EOVERFLOW; simple replies
            // have only EINVAL for this.
            if rules.structured { WireError::Overflow } else { WireError::Inval },
            "read longer than the maximum payload size",
        )),
        CMD_READ => checked(Command::Read { offset, length }),
        CMD_WRITE if length > rules.payload_bytes_max => {
            Err(reject(WireError::Inval, "write longer than the maximum payload size"))
        }
        CMD_WRITE => checked(Command::Write { offset, length, fua }),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => checked(Command::Trim { offset, length, fua }),
        CMD_CACHE => checked(Command::Cache),
        CMD_WRITE_ZEROES => {
            checked(Command::WriteZeroes { offset, length, fua, may_punch: flags & CMD_FLAG_NO_HOLE == 0 })
        }
        _ => {
            let Some(context) = rules.allocation_context else {
                return Err(reject(WireError::Inval, "no metadata context was negotiated"));
            };
            if length == 0 {
                // A descriptor must be nonzero and, with REQ_ONE, no longer than the request,
                // so a zero-length query has no valid answer.
                return Err(reject(WireError::Inval, "zero-length block status"));
            }
            checked(Command::BlockStatus { offset, length, req_one: flags & CMD_FLAG_REQ_ONE != 0, context })
        }
    }
}

/// State shared by a connection's requests on the blocking pool.
struct Connection {
    export: Arc<dyn Export>,
    rules: Rules,
    stats: Arc<NbdStats>,
    /// Most descriptors in one block-status reply.
    descriptors_max: usize,
    /// Write payload buffers for reuse.
    buffers: BufferPool,
}

/// Write payload buffers, reused: a fresh buffer of a large write costs the allocator a new
/// mapping (glibc maps allocations over 128 KiB), a page fault and a zeroed page per 4 KiB, and
/// an unmapping when it is freed, which profiles of 1 MiB writes showed as a tenth of the
/// site's CPU. Holds at most `bytes_max` bytes of buffers (the connection's in-flight budget).
struct BufferPool {
    free: std::sync::Mutex<Vec<Vec<u8>>>,
    bytes_max: usize,
}

impl BufferPool {
    fn new(bytes_max: usize) -> BufferPool {
        BufferPool { free: std::sync::Mutex::new(Vec::new()), bytes_max }
    }

    /// A buffer of exactly `len` bytes (contents unspecified: the caller overwrites them).
    fn take(&self, len: usize) -> Vec<u8> {
        let mut buf = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        buf.resize(len, 0);
        buf
    }

    /// Return a buffer for reuse, unless the pool is full or the buffer has no memory (an
    /// empty one would only pile up).
    fn give(&self, buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let held: usize = free.iter().map(Vec::capacity).sum();
        if held + buf.capacity() <= self.bytes_max {
            free.push(buf);
        }
    }
}

impl Connection {
    /// Count an answered request in the server's stats and the export's.
    fn record(&self, kind: u16, outcome: &Outcome, started: Instant) {
        match self.stats.command(kind) {
            Some(stats) => {
                let (bytes, failed, latency) =
                    (outcome.as_ref().copied().unwrap_or(0), outcome.is_err(), started.elapsed());
                stats.record(bytes, failed, latency);
                if let Some(operation) = operation_of(kind) {
                    self.export.observe(operation, bytes, failed, latency);
                }
            }
            None => {
                self.stats.unknown_commands_total.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The reply for a request that storage refused. `write` selects ENOSPC over EINVAL for a
    /// range the export no longer has (it may have shrunk since the handshake).
    fn failure(&self, cookie: u64, error: &ExportError, write: bool) -> (Vec<u8>, Outcome) {
        let wire = match error {
            ExportError::ReadOnly => WireError::Perm,
            ExportError::OutOfRange { .. } if write => WireError::NoSpc,
            ExportError::OutOfRange { .. } => WireError::Inval,
            ExportError::NoSpace(_) => WireError::NoSpc,
            ExportError::ShuttingDown => WireError::Shutdown,
            ExportError::Io(_) => WireError::Io,
        };
        let message = if let ExportError::Io(_) = error {
            // The detail (paths, segment numbers) is for the operator's log, not the host.
            tracing::warn!(%error, "storage error answered with NBD_EIO");
            "storage I/O error".to_owned()
        } else {
            tracing::debug!(%error, "storage refused an NBD request");
            error.to_string()
        };
        (error_reply(self.rules.structured, cookie, wire, &message), Err(wire))
    }
}

/// The export-facing name of a known command (none for `NBD_CMD_DISC` and unknown ones).
fn operation_of(kind: u16) -> Option<Operation> {
    match kind {
        CMD_READ => Some(Operation::Read),
        CMD_WRITE => Some(Operation::Write),
        CMD_FLUSH => Some(Operation::Flush),
        CMD_TRIM => Some(Operation::Trim),
        CMD_CACHE => Some(Operation::Cache),
        CMD_WRITE_ZEROES => Some(Operation::WriteZeroes),
        CMD_BLOCK_STATUS => Some(Operation::BlockStatus),
        _ => None,
    }
}

/// Bytes a request covered on success, or the error it was answered with.
type Outcome = Result<u64, WireError>;

/// An encoded reply, with the permits it keeps taken until it is written.
struct Reply {
    bytes: Vec<u8>,
    _slot: OwnedSemaphorePermit,
    _payload: Option<OwnedSemaphorePermit>,
}

/// Read and dispatch requests until the client disconnects or the server stops.
async fn read_requests<R>(
    mut reader: R,
    connection: Arc<Connection>,
    replies: mpsc::Sender<Reply>,
    mut stop: watch::Receiver<bool>,
    limits: &Limits,
) -> Result<(), NbdError>
where
    R: AsyncRead + Unpin,
{
    let slots = Arc::new(Semaphore::new(limits.inflight_requests_max));
    let payload_bytes = Arc::new(Semaphore::new(limits.inflight_bytes_max));
    let discard_bytes_max = limits.payload_bytes_max.max(WRITE_DISCARD_BYTES_MAX);
    loop {
        // Taking the slot before reading is the backpressure: with every slot in use, nothing
        // more is read from this client until a reply has been written.
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return Ok(());
        };
        let mut header = [0u8; REQUEST_HEADER_BYTES];
        match read_header_or_stop(&mut reader, &mut header, &mut stop).await? {
            HeaderRead::Complete => {}
            HeaderRead::Closed => {
                tracing::debug!("NBD client closed the connection without NBD_CMD_DISC");
                return Ok(());
            }
            HeaderRead::Stopped => return Ok(()),
        }
        let started = Instant::now();
        let request = parse_request(&header).map_err(|magic| NbdError::BadRequestMagic { magic })?;
        if request.kind == CMD_DISC {
            return Ok(());
        }
        let command = match decode(&request, &connection.rules) {
            Ok(command) => command,
            Err(rejection) => {
                tracing::debug!(
                    kind = request.kind,
                    flags = request.flags,
                    offset = request.offset,
                    length = request.length,
                    reason = rejection.message,
                    "NBD request rejected"
                );
                let outcome = Err(rejection.error);
                connection.record(request.kind, &outcome, started);
                let bytes = error_reply(
                    connection.rules.structured,
                    request.cookie,
                    rejection.error,
                    rejection.message,
                );
                let reply = Reply { bytes, _slot: slot, _payload: None };
                if replies.send(reply).await.is_err() {
                    return Ok(());
                }
                if request.kind == CMD_WRITE {
                    if request.length > discard_bytes_max {
                        return Err(NbdError::PayloadTooLarge {
                            length_bytes: request.length,
                            limit_bytes: discard_bytes_max,
                        });
                    }
                    let skipping = discard(&mut reader, u64::from(request.length));
                    if unless_stopped(&mut stop, skipping).await?.is_none() {
                        return Ok(());
                    }
                }
                continue;
            }
        };
        let payload_length = match command {
            Command::Read { length, .. } | Command::Write { length, .. } => length,
            _ => 0,
        };
        let payload_permit = if payload_length == 0 {
            None
        } else {
            // A request larger than the whole budget takes all of it and runs alone.
            let cost = (payload_length as usize).min(limits.inflight_bytes_max);
            let Ok(permit) = Arc::clone(&payload_bytes).acquire_many_owned(cost as u32).await else {
                return Ok(());
            };
            Some(permit)
        };
        let mut payload = Vec::new();
        if let Command::Write { length, .. } = command {
            payload = connection.buffers.take(length as usize);
            // A shutdown abandons a payload still arriving: the write was never acknowledged.
            if unless_stopped(&mut stop, reader.read_exact(&mut payload)).await?.is_none() {
                return Ok(());
            }
        }
        // A write or read that cannot wait is done here: handing it to a blocking thread and
        // the reply back costs more than the copy (two context switches).
        if let Some((bytes, outcome)) =
            try_inline(&connection, request.kind, request.cookie, command, &payload)
        {
            connection.record(request.kind, &outcome, started);
            connection.buffers.give(payload);
            let reply = Reply { bytes, _slot: slot, _payload: payload_permit };
            if replies.send(reply).await.is_err() {
                return Ok(());
            }
            continue;
        }
        let connection = Arc::clone(&connection);
        let replies = replies.clone();
        // Detached: the reply reaches the writer through the channel, and a panic in storage
        // is caught inside, so the handle has nothing to report.
        drop(tokio::task::spawn_blocking(move || {
            let (bytes, outcome) = unwinding(
                &connection,
                (request.kind, request.cookie),
                || execute(&connection, request.cookie, command, &payload),
                |reply| reply,
            );
            connection.record(request.kind, &outcome, started);
            connection.buffers.give(payload);
            let reply = Reply { bytes, _slot: slot, _payload: payload_permit };
            // A closed channel means the connection is gone and the reply has nowhere to go.
            let _ = replies.blocking_send(reply);
        }));
    }
}

/// A write without FUA or a read, of at most [`INLINE_BYTES_MAX`], done at once if the
/// export can do it without waiting ([`Export::try_write`], [`Export::try_read`]), with its
/// reply; `None` for anything else.
fn try_inline(
    connection: &Connection,
    kind: u16,
    cookie: u64,
    command: Command,
    payload: &[u8],
) -> Option<(Vec<u8>, Outcome)> {
    let attempt = || match command {
        Command::Write { offset, fua: false, length } if length > 0 && length <= INLINE_BYTES_MAX => {
            Some(match connection.export.try_write(offset, payload)? {
                Ok(()) => (success_reply(cookie), Ok(payload.len() as u64)),
                Err(error) => connection.failure(cookie, &error, true),
            })
        }
        Command::Read { offset, length } if length > 0 && length <= INLINE_BYTES_MAX => {
            read_reply(connection, cookie, offset, length, |data| connection.export.try_read(offset, data))
        }
        _ => None,
    };
    unwinding(connection, (kind, cookie), attempt, Some)
}

/// Run `f` on the export; if the export panics, `panicked` of an NBD_EIO reply instead.
fn unwinding<T>(
    connection: &Connection,
    (kind, cookie): (u16, u64),
    f: impl FnOnce() -> T,
    panicked: impl FnOnce((Vec<u8>, Outcome)) -> T,
) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        tracing::error!(kind, "export panicked; answering the request with NBD_EIO");
        let error = WireError::Io;
        panicked((
            error_reply(connection.rules.structured, cookie, error, "internal server error"),
            Err(error),
        ))
    })
}

/// Run one command on storage (on the blocking pool) and encode its reply.
fn execute(connection: &Connection, cookie: u64, command: Command, payload: &[u8]) -> (Vec<u8>, Outcome) {
    let export = &*connection.export;
    let finish = |result: Result<(), ExportError>, bytes: u64, write: bool| match result {
        Ok(()) => (success_reply(cookie), Ok(bytes)),
        Err(error) => connection.failure(cookie, &error, write),
    };
    // The last argument of `finish` is whether a range past the end is ENOSPC (writes and
    // zeroes) rather than EINVAL (everything else), as in `decode`.
    match command {
        Command::Read { offset, length } => read(connection, cookie, offset, length),
        // Zero-length writes, trims and zeroings are valid no-ops; storage never sees them.
        Command::Write { length: 0, .. }
        | Command::Trim { length: 0, .. }
        | Command::WriteZeroes { length: 0, .. } => (success_reply(cookie), Ok(0)),
        Command::Write { offset, fua, .. } => {
            finish(export.write(offset, payload, fua), payload.len() as u64, true)
        }
        Command::Flush => finish(export.flush(), 0, false),
        Command::Trim { offset, length, fua } => {
            finish(export.trim(offset, u64::from(length), fua), u64::from(length), false)
        }
        // The data is local, so there is nothing to fetch: the range was checked, and that is
        // all a successful CACHE promises.
        Command::Cache => (success_reply(cookie), Ok(0)),
        Command::WriteZeroes { offset, length, fua, may_punch } => {
            finish(export.write_zeroes(offset, u64::from(length), fua, may_punch), u64::from(length), true)
        }
        Command::BlockStatus { offset, length, req_one, context } => {
            match export.block_status(offset, u64::from(length)) {
                Ok(extents) => block_status_reply(connection, cookie, &extents, length, req_one, context),
                Err(error) => connection.failure(cookie, &error, false),
            }
        }
    }
}

/// Read into the reply buffer itself, after the header, so the data is never copied.
fn read(connection: &Connection, cookie: u64, offset: u64, length: u32) -> (Vec<u8>, Outcome) {
    read_reply(connection, cookie, offset, length, |data| Some(connection.export.read(offset, data)))
        .expect("a waiting read always answers")
}

/// [`read`] with `fill` reading the data; `None` when `fill` does.
fn read_reply(
    connection: &Connection,
    cookie: u64,
    offset: u64,
    length: u32,
    fill: impl FnOnce(&mut [u8]) -> Option<Result<(), ExportError>>,
) -> Option<(Vec<u8>, Outcome)> {
    let structured = connection.rules.structured;
    let mut reply = Vec::new();
    if length == 0 {
        // An OFFSET_DATA chunk must carry at least one byte, so an empty read is just "done".
        if structured {
            put_chunk_header(&mut reply, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
        } else {
            put_simple_reply(&mut reply, 0, cookie);
        }
        return Some((reply, Ok(0)));
    }
    reply.reserve_exact(CHUNK_HEADER_BYTES + OFFSET_DATA_PREFIX_BYTES + length as usize);
    if structured {
        // One chunk holds the whole read and also ends the reply: the data is in memory before
        // the header goes out, so no error can be found while it is being sent. `length` is at
        // most the clamped payload maximum (1 GiB), so adding the offset field cannot overflow.
        let chunk_bytes = length + OFFSET_DATA_PREFIX_BYTES as u32;
        put_chunk_header(&mut reply, REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, chunk_bytes);
        reply.extend_from_slice(&offset.to_be_bytes());
    } else {
        put_simple_reply(&mut reply, 0, cookie);
    }
    let header_bytes = reply.len();
    reply.resize(header_bytes + length as usize, 0);
    let (_, data) = reply.split_at_mut(header_bytes);
    Some(match fill(data)? {
        Ok(()) => (reply, Ok(u64::from(length))),
        Err(error) => connection.failure(cookie, &error, false),
    })
}

/// Encode the one `NBD_REPLY_TYPE_BLOCK_STATUS` chunk that answers a block-status request.
fn block_status_reply(
    connection: &Connection,
    cookie: u64,
    extents: &[AllocationExtent],
    length: u32,
    req_one: bool,
    context: u32,
) -> (Vec<u8>, Outcome) {
    let descriptors = descriptors(extents, length, req_one, connection.descriptors_max);
    if descriptors.is_empty() {
        tracing::error!(
            extents = extents.len(),
            "export broke its contract: block_status described no bytes"
        );
        let error = WireError::Io;
        let bytes =
            error_reply(connection.rules.structured, cookie, error, "storage returned no allocation extents");
        return (bytes, Err(error));
    }
    // descriptors_max keeps this within the payload maximum, far below 4 GiB.
    let payload_bytes = 4 + 8 * descriptors.len() as u32;
    let mut reply = Vec::with_capacity(CHUNK_HEADER_BYTES + payload_bytes as usize);
    put_chunk_header(&mut reply, REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, payload_bytes);
    reply.extend_from_slice(&context.to_be_bytes());
    for (extent_bytes, flags) in &descriptors {
        reply.extend_from_slice(&extent_bytes.to_be_bytes());
        reply.extend_from_slice(&flags.to_be_bytes());
    }
    (reply, Ok(u64::from(length)))
}

/// Turn the export's extents into wire descriptors `(length, flags)`: empty extents dropped,
/// neighbours with equal flags merged (the spec asks for alternating statuses), the total cut to
/// the requested `length`, at most `descriptors_max` of them, and exactly one with `req_one`.
fn descriptors(
    extents: &[AllocationExtent],
    length: u32,
    req_one: bool,
    descriptors_max: usize,
) -> Vec<(u32, u32)> {
    let descriptors_max = if req_one { 1 } else { descriptors_max.max(1) };
    let mut descriptors: Vec<(u32, u32)> = Vec::new();
    let mut remaining = length;
    for extent in extents {
        if remaining == 0 {
            break;
        }
        // Cutting to `remaining` (a u32) also makes the cast lossless.
        let extent_bytes = extent.length_bytes.min(u64::from(remaining)) as u32;
        if extent_bytes == 0 {
            continue;
        }
        let flags = if extent.hole { STATE_HOLE } else { 0 } | if extent.zero { STATE_ZERO } else { 0 };
        let count = descriptors.len();
        match descriptors.last_mut() {
            // The sum stays within `length`, so it fits in u32.
            Some((last_bytes, last_flags)) if *last_flags == flags => *last_bytes += extent_bytes,
            _ if count == descriptors_max => break,
            _ => descriptors.push((extent_bytes, flags)),
        }
        remaining -= extent_bytes;
    }
    descriptors
}

/// A successful reply without payload: a simple reply is allowed for every command but READ
/// even with structured replies, and it is the shortest.
fn success_reply(cookie: u64) -> Vec<u8> {
    let mut reply = Vec::with_capacity(SIMPLE_REPLY_BYTES);
    put_simple_reply(&mut reply, 0, cookie);
    reply
}

/// An error reply: an error chunk with a message when structured replies are on (the spec
/// prefers it, and it is required for READ), else a simple reply with no payload.
fn error_reply(structured: bool, cookie: u64, error: WireError, message: &str) -> Vec<u8> {
    let mut reply = Vec::new();
    if structured {
        put_error_chunk(&mut reply, cookie, error, message);
    } else {
        put_simple_reply(&mut reply, error.code(), cookie);
    }
    reply
}

/// Write replies as they arrive until every sender is gone, then close the write side.
async fn write_replies<W>(writer: W, mut replies: mpsc::Receiver<Reply>) -> Result<(), NbdError>
where
    W: AsyncWrite + Unpin,
{
    let mut out = BufWriter::with_capacity(WRITE_BUFFER_BYTES, writer);
    while let Some(reply) = replies.recv().await {
        with_deadline(out.write_all(&reply.bytes)).await?;
        drop(reply);
        // Replies that completed meanwhile share one flush: fewer syscalls and packets when
        // many requests are in flight, and no extra wait when only one is.
        while let Ok(reply) = replies.try_recv() {
            with_deadline(out.write_all(&reply.bytes)).await?;
        }
        with_deadline(out.flush()).await?;
    }
    // Every reply is already flushed; a client that closed right after NBD_CMD_DISC may make
    // the shutdown fail, and that changes nothing.
    let _ = tokio::time::timeout(REPLY_WRITE_TIMEOUT, out.shutdown()).await;
    Ok(())
}

/// Bound a write to the client by [`REPLY_WRITE_TIMEOUT`].
async fn with_deadline(
    write: impl std::future::Future<Output = std::io::Result<()>>,
) -> Result<(), NbdError> {
    match tokio::time::timeout(REPLY_WRITE_TIMEOUT, write).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(NbdError::ReplyTimeout { timeout: REPLY_WRITE_TIMEOUT }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            size_bytes: 1 << 20,
            read_only: false,
            structured: true,
            allocation_context: Some(1),
            payload_bytes_max: 1 << 16,
        }
    }

    fn request(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request { flags, kind, cookie: 9, offset, length }
    }

    fn error_of(result: Result<Command, Rejection>) -> WireError {
        result.expect_err("should be rejected").error
    }

    #[test]
    fn ranges_past_the_end_get_enospc_for_writes_and_einval_otherwise() {
        let rules = rules();
        let size = rules.size_bytes;
        for kind in [CMD_WRITE, CMD_WRITE_ZEROES] {
            assert_eq!(error_of(decode(&request(kind, 0, size, 1), &rules)), WireError::NoSpc);
        }
        for kind in [CMD_READ, CMD_TRIM, CMD_CACHE, CMD_BLOCK_STATUS] {
            assert_eq!(error_of(decode(&request(kind, 0, size - 1, 2), &rules)), WireError::Inval);
        }
        // offset + length overflowing u64 is past the end, not a wrap-around.
        assert_eq!(error_of(decode(&request(CMD_READ, 0, u64::MAX, 2), &rules)), WireError::Inval);
        assert_eq!(
            decode(&request(CMD_READ, 0, size - 4096, 4096), &rules),
            Ok(Command::Read { offset: size - 4096, length: 4096 })
        );
        // A zero-length request at the very end is inside the export.
        assert!(decode(&request(CMD_WRITE, 0, size, 0), &rules).is_ok());
    }

    #[test]
    fn flags_are_checked_per_command() {
        let rules = rules();
        assert_eq!(error_of(decode(&request(CMD_WRITE, CMD_FLAG_NO_HOLE, 0, 1), &rules)), WireError::Inval);
        assert_eq!(error_of(decode(&request(CMD_READ, 1 << 9, 0, 1), &rules)), WireError::Inval);
        assert_eq!(
            decode(
                &request(CMD_WRITE_ZEROES, CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, 0, 8),
                &rules
            ),
            Ok(Command::WriteZeroes { offset: 0, length: 8, fua: true, may_punch: false })
        );
        assert!(decode(&request(CMD_READ, CMD_FLAG_DF, 0, 1), &rules).is_ok());
        let simple = Rules { structured: false, ..rules };
        assert_eq!(
            error_of(decode(&request(CMD_READ, CMD_FLAG_DF, 0, 1), &simple)),
            WireError::Inval,
            "DF is only advertised with structured replies"
        );
        assert_eq!(error_of(decode(&request(99, 0, 0, 0), &rules)), WireError::Inval);
    }

    #[test]
    fn payload_limits_and_policy_checks() {
        let rules = rules();
        let over = rules.payload_bytes_max + 1;
        assert_eq!(error_of(decode(&request(CMD_READ, 0, 0, over), &rules)), WireError::Overflow);
        let simple = Rules { structured: false, ..rules };
        assert_eq!(error_of(decode(&request(CMD_READ, 0, 0, over), &simple)), WireError::Inval);
        assert_eq!(error_of(decode(&request(CMD_WRITE, 0, 0, over), &rules)), WireError::Inval);
        // Commands without payload may cover more than the payload maximum.
        assert!(decode(&request(CMD_TRIM, 0, 0, over), &rules).is_ok());

        let read_only = Rules { read_only: true, ..rules };
        for kind in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(error_of(decode(&request(kind, 0, 0, 1), &read_only)), WireError::Perm);
        }
        assert!(decode(&request(CMD_FLUSH, 0, 0, 0), &read_only).is_ok());

        let no_context = Rules { allocation_context: None, ..rules };
        assert_eq!(error_of(decode(&request(CMD_BLOCK_STATUS, 0, 0, 1), &no_context)), WireError::Inval);
        assert_eq!(error_of(decode(&request(CMD_BLOCK_STATUS, 0, 0, 0), &rules)), WireError::Inval);
    }

    fn extent(length_bytes: u64, hole: bool) -> AllocationExtent {
        AllocationExtent { length_bytes, hole, zero: hole }
    }

    #[test]
    fn descriptors_merge_clip_and_respect_req_one() {
        let extents = [
            extent(4096, false),
            extent(0, true),
            extent(4096, false),
            extent(8192, true),
            extent(1 << 40, false),
        ];
        assert_eq!(descriptors(&extents, 20_000, false, 100), vec![(8192, 0), (8192, 3), (3616, 0)]);
        assert_eq!(descriptors(&extents, 20_000, true, 100), vec![(8192, 0)]);
        assert_eq!(descriptors(&extents, 100, true, 100), vec![(100, 0)]);
        assert_eq!(descriptors(&extents, 20_000, false, 2), vec![(8192, 0), (8192, 3)]);
        // An extent longer than 4 GiB is cut to the request, whose length fits in 32 bits.
        assert_eq!(descriptors(&[extent(1 << 40, true)], u32::MAX, false, 10), vec![(u32::MAX, 3)]);
        assert!(descriptors(&[extent(0, false)], 10, false, 10).is_empty());
    }
}
