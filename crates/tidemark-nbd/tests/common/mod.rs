//! Test support: an in-memory export with 4 KiB hole tracking, a raw NBD client written from
//! the spec (independently of the server's own constants), and a server harness.

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use tidemark_nbd::{
    AllocationExtent, Export, ExportError, ExportInfo, ExportProvider, NbdServer, ServerConfig,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Every wait in these tests gives up (and fails the test) after this long.
pub const DEADLINE: Duration = Duration::from_secs(20);
/// Granularity of the in-memory export's allocation map, in bytes.
pub const MEM_BLOCK_BYTES: u64 = 4096;

pub const NBDMAGIC: u64 = 0x4e42444d41474943;
pub const IHAVEOPT: u64 = 0x49484156454F5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x3e889045565a9;
pub const REQUEST_MAGIC: u32 = 0x25609513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x67446698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e33ef;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
pub const FLAG_NO_ZEROES: u16 = 2;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
pub const FLAG_C_NO_ZEROES: u32 = 2;

pub const NBD_FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const NBD_FLAG_READ_ONLY: u16 = 1 << 1;
pub const NBD_FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const NBD_FLAG_SEND_FUA: u16 = 1 << 3;
pub const NBD_FLAG_ROTATIONAL: u16 = 1 << 4;
pub const NBD_FLAG_SEND_TRIM: u16 = 1 << 5;
pub const NBD_FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const NBD_FLAG_SEND_DF: u16 = 1 << 7;
pub const NBD_FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
pub const NBD_FLAG_SEND_CACHE: u16 = 1 << 10;
pub const NBD_FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

pub const REPLY_FLAG_DONE: u16 = 1;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = 0x8001;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = 0x8002;

pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ESHUTDOWN: u32 = 108;

pub const STATE_HOLE: u32 = 1;
pub const STATE_ZERO: u32 = 2;

/// Await `future`, failing the test if it takes longer than [`DEADLINE`].
pub async fn within<T>(what: &str, future: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(DEADLINE, future).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {DEADLINE:?} waiting for {what}"),
    }
}

/// A one-shot barrier a storage call can be held at until the test opens it.
#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    waiting: usize,
}

impl Gate {
    pub fn open(&self) {
        self.state.lock().unwrap().open = true;
        self.changed.notify_all();
    }

    /// Block until opened; gives up after [`DEADLINE`] so a broken server fails the test
    /// instead of hanging it.
    fn pass(&self) -> Result<(), ExportError> {
        let mut state = self.state.lock().unwrap();
        state.waiting += 1;
        self.changed.notify_all();
        let (mut state, timeout) =
            self.changed.wait_timeout_while(state, DEADLINE, |state| !state.open).unwrap();
        state.waiting -= 1;
        if timeout.timed_out() {
            return Err(ExportError::Io("gate never opened".into()));
        }
        Ok(())
    }

    /// Wait (on a blocking thread) until `count` storage calls are held at the gate.
    pub async fn wait_for_waiting(self: &Arc<Self>, count: usize) {
        let gate = Arc::clone(self);
        tokio::task::spawn_blocking(move || {
            let state = gate.state.lock().unwrap();
            let (_state, timeout) =
                gate.changed.wait_timeout_while(state, DEADLINE, |state| state.waiting < count).unwrap();
            assert!(!timeout.timed_out(), "no storage call reached the gate");
        })
        .await
        .unwrap();
    }
}

/// An export held in memory, with an allocation map of 4 KiB blocks.
pub struct MemExport {
    info: ExportInfo,
    state: Mutex<MemState>,
    /// Successful `flush` calls.
    pub flushes: AtomicU64,
    /// Write-like calls made with `fua`.
    pub fua_calls: AtomicU64,
    /// Every `write_zeroes` call: (offset, length, fua, may_punch).
    pub zeroes_calls: Mutex<Vec<(u64, u64, bool, bool)>>,
    /// Reads at this offset wait at [`MemExport::gate`].
    pub gated_offset: Option<u64>,
    pub gate: Arc<Gate>,
    /// Reads at this offset panic, standing in for a storage bug.
    pub panic_offset: Option<u64>,
    /// Returned (once) by the next storage call instead of doing it.
    pub fail_next: Mutex<Option<ExportError>>,
    /// Writes done by `try_write` (it writes blocks with an even index, and leaves the rest to
    /// `write`, as a store that cannot always write without waiting).
    pub inline_writes: AtomicU64,
    /// Reads done by `try_read` (it reads from a block with an even index, unless gated, and
    /// leaves the rest to `read`).
    pub inline_reads: AtomicU64,
}

struct MemState {
    data: Vec<u8>,
    allocated: Vec<bool>,
}

impl MemExport {
    pub fn new(name: &str, size_bytes: u64, read_only: bool) -> Self {
        let blocks = size_bytes.div_ceil(MEM_BLOCK_BYTES) as usize;
        MemExport {
            info: ExportInfo {
                name: name.to_owned(),
                description: format!("memory export {name}"),
                size_bytes,
                block_size_bytes: 4096,
                read_only,
            },
            state: Mutex::new(MemState {
                data: vec![0; size_bytes as usize],
                allocated: vec![false; blocks],
            }),
            flushes: AtomicU64::new(0),
            fua_calls: AtomicU64::new(0),
            zeroes_calls: Mutex::new(Vec::new()),
            gated_offset: None,
            gate: Arc::new(Gate::default()),
            panic_offset: None,
            fail_next: Mutex::new(None),
            inline_writes: AtomicU64::new(0),
            inline_reads: AtomicU64::new(0),
        }
    }

    pub fn with_gate_at(mut self, offset: u64) -> Self {
        self.gated_offset = Some(offset);
        self
    }

    pub fn with_panic_at(mut self, offset: u64) -> Self {
        self.panic_offset = Some(offset);
        self
    }

    /// Copy of the bytes at `[offset, offset + length)`.
    pub fn contents(&self, offset: u64, length: usize) -> Vec<u8> {
        let state = self.state.lock().unwrap();
        state.data[offset as usize..offset as usize + length].to_vec()
    }

    /// Whether the 4 KiB block holding `offset` is allocated.
    pub fn is_allocated(&self, offset: u64) -> bool {
        self.state.lock().unwrap().allocated[(offset / MEM_BLOCK_BYTES) as usize]
    }

    fn check(&self, offset: u64, length: u64, writing: bool) -> Result<(), ExportError> {
        if let Some(error) = self.fail_next.lock().unwrap().take() {
            return Err(error);
        }
        if writing && self.info.read_only {
            return Err(ExportError::ReadOnly);
        }
        match offset.checked_add(length) {
            Some(end) if end <= self.info.size_bytes => Ok(()),
            _ => Err(ExportError::OutOfRange { offset, length, size_bytes: self.info.size_bytes }),
        }
    }

    /// Zero `[offset, offset + length)`; whole blocks become holes when `punch`.
    fn zero(&self, offset: u64, length: u64, punch: bool) {
        let mut state = self.state.lock().unwrap();
        let end = offset + length;
        state.data[offset as usize..end as usize].fill(0);
        let first_whole = offset.div_ceil(MEM_BLOCK_BYTES);
        let last_whole = end / MEM_BLOCK_BYTES;
        for block in (offset / MEM_BLOCK_BYTES)..end.div_ceil(MEM_BLOCK_BYTES) {
            if punch && block >= first_whole && block < last_whole {
                state.allocated[block as usize] = false;
            } else if !punch {
                state.allocated[block as usize] = true;
            }
        }
    }
}

impl Export for MemExport {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        if Some(offset) == self.gated_offset {
            self.gate.pass()?;
        }
        if Some(offset) == self.panic_offset {
            panic!("simulated storage bug at offset {offset}");
        }
        self.check(offset, buf.len() as u64, false)?;
        let state = self.state.lock().unwrap();
        buf.copy_from_slice(&state.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ExportError> {
        self.check(offset, data.len() as u64, true)?;
        if fua {
            self.fua_calls.fetch_add(1, Ordering::SeqCst);
        }
        let mut state = self.state.lock().unwrap();
        state.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        let end = offset + data.len() as u64;
        for block in (offset / MEM_BLOCK_BYTES)..end.div_ceil(MEM_BLOCK_BYTES) {
            state.allocated[block as usize] = true;
        }
        Ok(())
    }

    fn try_read(&self, offset: u64, buf: &mut [u8]) -> Option<Result<(), ExportError>> {
        if (offset / MEM_BLOCK_BYTES) % 2 == 1 || Some(offset) == self.gated_offset {
            return None;
        }
        let read = self.read(offset, buf);
        if read.is_ok() {
            self.inline_reads.fetch_add(1, Ordering::SeqCst);
        }
        Some(read)
    }

    fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<(), ExportError>> {
        if (offset / MEM_BLOCK_BYTES) % 2 == 1 {
            return None;
        }
        if Some(offset) == self.panic_offset {
            panic!("simulated storage bug at offset {offset}");
        }
        let written = self.write(offset, data, false);
        if written.is_ok() {
            self.inline_writes.fetch_add(1, Ordering::SeqCst);
        }
        Some(written)
    }

    fn write_zeroes(&self, offset: u64, length: u64, fua: bool, may_punch: bool) -> Result<(), ExportError> {
        self.check(offset, length, true)?;
        self.zeroes_calls.lock().unwrap().push((offset, length, fua, may_punch));
        if fua {
            self.fua_calls.fetch_add(1, Ordering::SeqCst);
        }
        self.zero(offset, length, may_punch);
        Ok(())
    }

    fn trim(&self, offset: u64, length: u64, fua: bool) -> Result<(), ExportError> {
        self.check(offset, length, true)?;
        if fua {
            self.fua_calls.fetch_add(1, Ordering::SeqCst);
        }
        self.zero(offset, length, true);
        Ok(())
    }

    fn flush(&self) -> Result<(), ExportError> {
        self.check(0, 0, false)?;
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn block_status(&self, offset: u64, length: u64) -> Result<Vec<AllocationExtent>, ExportError> {
        self.check(offset, length, false)?;
        let state = self.state.lock().unwrap();
        let end = offset + length;
        let mut extents: Vec<AllocationExtent> = Vec::new();
        let mut position = offset;
        while position < end {
            let block = position / MEM_BLOCK_BYTES;
            let block_end = ((block + 1) * MEM_BLOCK_BYTES).min(end);
            let hole = !state.allocated[block as usize];
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.length_bytes += block_end - position,
                _ => extents.push(AllocationExtent { length_bytes: block_end - position, hole, zero: hole }),
            }
            position = block_end;
        }
        Ok(extents)
    }
}

/// A provider over a fixed set of memory exports.
#[derive(Default)]
pub struct MemProvider {
    exports: Vec<Arc<MemExport>>,
}

impl MemProvider {
    pub fn with(mut self, export: MemExport) -> Self {
        self.exports.push(Arc::new(export));
        self
    }

    pub fn export(&self, name: &str) -> Arc<MemExport> {
        self.exports.iter().find(|export| export.info.name == name).cloned().expect("export exists")
    }
}

impl ExportProvider for MemProvider {
    fn list(&self) -> Vec<ExportInfo> {
        self.exports.iter().map(|export| export.info()).collect()
    }

    fn open(&self, name: &str) -> Option<Arc<dyn Export>> {
        self.exports
            .iter()
            .find(|export| export.info.name == name)
            .map(|export| Arc::clone(export) as Arc<dyn Export>)
    }
}

/// Size of the standard test exports.
pub const DISK_BYTES: u64 = 4 << 20;

/// The standard provider: writable `disk`, read-only `image`.
pub fn standard_provider() -> MemProvider {
    MemProvider::default()
        .with(MemExport::new("disk", DISK_BYTES, false))
        .with(MemExport::new("image", DISK_BYTES, true))
}

/// A server listening on 127.0.0.1 with `serve`.
pub struct TestServer {
    pub addr: SocketAddr,
    pub server: Arc<NbdServer>,
    pub provider: Arc<MemProvider>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    pub async fn start(provider: MemProvider, config: ServerConfig) -> Self {
        let provider = Arc::new(provider);
        let server = Arc::new(NbdServer::new(provider.clone(), config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(Arc::clone(&server).serve(listener, async move {
            let _ = stop.await;
        }));
        TestServer { addr, server, provider, shutdown: Some(shutdown), task: Some(task) }
    }

    pub async fn standard() -> Self {
        Self::start(standard_provider(), ServerConfig::default()).await
    }

    /// Ask `serve` to stop (without waiting for it).
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Whether `serve` has returned.
    pub fn is_finished(&self) -> bool {
        self.task.as_ref().is_none_or(|task| task.is_finished())
    }

    /// Stop and wait for `serve` to return.
    pub async fn stop(mut self) -> std::io::Result<()> {
        self.begin_shutdown();
        let task = self.task.take().expect("not stopped twice");
        within("serve to return", task).await.unwrap()
    }

    /// A healthy client still gets through the whole protocol: proof that whatever the
    /// previous client did cost only its own connection.
    pub async fn assert_healthy(&self) {
        let (mut client, _) = Client::negotiate(self.addr, "disk").await;
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let reply = client.write(4096 * 3, &pattern, 0).await;
        assert_eq!(reply.error, 0);
        let reply = client.read(4096 * 3, 4096).await;
        assert_eq!(reply.error, 0);
        assert_eq!(reply.data(), pattern);
        client.disconnect().await;
    }
}

/// One option reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OptionReply {
    pub option: u32,
    pub kind: u32,
    pub data: Vec<u8>,
}

/// What `NBD_OPT_GO` told the client.
#[derive(Clone, Debug, Default)]
pub struct ExportDetails {
    pub size_bytes: u64,
    pub flags: u16,
    pub name: Option<String>,
    pub description: Option<String>,
    /// (minimum, preferred, maximum payload).
    pub block_size: Option<(u32, u32, u32)>,
    /// Id of `base:allocation`, when selected.
    pub allocation_context: Option<u32>,
}

/// A reply to one request, assembled from a simple reply or all chunks of a structured one.
#[derive(Clone, Debug, Default)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    pub simple: bool,
    pub error_message: String,
    /// OFFSET_DATA chunks: (offset, bytes); a simple read reply is one at offset 0.
    pub chunks: Vec<(u64, Vec<u8>)>,
    /// BLOCK_STATUS chunks: (context id, [(length, flags)]).
    pub extents: Vec<(u32, Vec<(u32, u32)>)>,
    /// Structured chunk types in arrival order.
    pub chunk_types: Vec<u16>,
}

impl Reply {
    /// All data bytes, in chunk order.
    pub fn data(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|(_, data)| data.iter().copied()).collect()
    }
}

/// Any byte stream a client can run over (TCP, or an in-memory pipe).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A minimal NBD client for driving the server byte by byte.
pub struct Client {
    pub stream: Box<dyn Stream>,
    pub handshake_flags: u16,
    pub structured: bool,
    next_cookie: u64,
    /// Lengths of simple-reply reads in flight, by cookie (a simple reply does not say).
    pending_reads: HashMap<u64, u32>,
    partial: HashMap<u64, Reply>,
}

impl Client {
    /// Connect and read the greeting, checking its magics; no client flags sent yet.
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Client::over(Box::new(stream)).await
    }

    /// Read the greeting from an already connected stream.
    pub async fn over(stream: Box<dyn Stream>) -> Client {
        let mut client = Client {
            stream,
            handshake_flags: 0,
            structured: false,
            next_cookie: 1,
            pending_reads: HashMap::new(),
            partial: HashMap::new(),
        };
        assert_eq!(client.u64().await, NBDMAGIC);
        assert_eq!(client.u64().await, IHAVEOPT);
        client.handshake_flags = client.u16().await;
        client
    }

    /// Connect and send `client_flags`.
    pub async fn start(addr: SocketAddr, client_flags: u32) -> Client {
        let mut client = Client::connect(addr).await;
        assert_eq!(client.handshake_flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        client.send(&client_flags.to_be_bytes()).await;
        client
    }

    /// Full handshake: fixed newstyle + no zeroes, structured replies, `base:allocation`,
    /// then GO asking for name, description and block size.
    pub async fn negotiate(addr: SocketAddr, name: &str) -> (Client, ExportDetails) {
        let mut client = Client::start(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        assert_eq!(client.structured_reply().await.kind, REP_ACK);
        let replies = client.meta_context(OPT_SET_META_CONTEXT, name, &["base:allocation"]).await;
        assert_eq!(replies.last().unwrap().kind, REP_ACK, "{replies:?}");
        let context = replies.iter().find(|reply| reply.kind == REP_META_CONTEXT).map(|reply| {
            assert_eq!(&reply.data[4..], b"base:allocation");
            u32::from_be_bytes(reply.data[..4].try_into().unwrap())
        });
        let mut details =
            client.go(name, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]).await.expect("GO succeeds");
        details.allocation_context = context;
        (client, details)
    }

    /// Negotiate without structured replies (simple replies only).
    pub async fn negotiate_simple(addr: SocketAddr, name: &str) -> (Client, ExportDetails) {
        let mut client = Client::start(addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        let details = client.go(name, &[]).await.expect("GO succeeds");
        (client, details)
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        within("send", self.stream.write_all(bytes)).await.unwrap();
    }

    pub async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut message = IHAVEOPT.to_be_bytes().to_vec();
        message.extend_from_slice(&option.to_be_bytes());
        message.extend_from_slice(&(data.len() as u32).to_be_bytes());
        message.extend_from_slice(data);
        self.send(&message).await;
    }

    pub async fn option_reply(&mut self) -> OptionReply {
        assert_eq!(self.u64().await, OPTION_REPLY_MAGIC);
        let option = self.u32().await;
        let kind = self.u32().await;
        let length = self.u32().await;
        let data = self.bytes(length as usize).await;
        OptionReply { option, kind, data }
    }

    /// Replies up to and including the final one (an ACK or an error).
    pub async fn option_replies(&mut self, option: u32) -> Vec<OptionReply> {
        let mut replies = Vec::new();
        loop {
            let reply = self.option_reply().await;
            assert_eq!(reply.option, option, "reply is for the option sent");
            let last = reply.kind == REP_ACK || reply.kind & 0x8000_0000 != 0;
            replies.push(reply);
            if last {
                return replies;
            }
        }
    }

    pub async fn structured_reply(&mut self) -> OptionReply {
        self.send_option(OPT_STRUCTURED_REPLY, &[]).await;
        let reply = self.option_reply().await;
        if reply.kind == REP_ACK {
            self.structured = true;
        }
        reply
    }

    pub async fn meta_context(&mut self, option: u32, name: &str, queries: &[&str]) -> Vec<OptionReply> {
        self.send_option(option, &meta_request(name, queries)).await;
        self.option_replies(option).await
    }

    /// `NBD_OPT_INFO` or `NBD_OPT_GO` data for `name` with `requests`.
    pub async fn info_or_go(
        &mut self,
        option: u32,
        name: &str,
        requests: &[u16],
    ) -> Result<ExportDetails, OptionReply> {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        data.extend_from_slice(&(requests.len() as u16).to_be_bytes());
        for request in requests {
            data.extend_from_slice(&request.to_be_bytes());
        }
        self.send_option(option, &data).await;
        let mut details = ExportDetails::default();
        let mut saw_export = false;
        for reply in self.option_replies(option).await {
            match reply.kind {
                REP_INFO => {
                    let kind = u16::from_be_bytes(reply.data[..2].try_into().unwrap());
                    let rest = &reply.data[2..];
                    match kind {
                        INFO_EXPORT => {
                            assert_eq!(rest.len(), 10, "NBD_INFO_EXPORT length");
                            details.size_bytes = u64::from_be_bytes(rest[..8].try_into().unwrap());
                            details.flags = u16::from_be_bytes(rest[8..].try_into().unwrap());
                            saw_export = true;
                        }
                        INFO_NAME => details.name = Some(String::from_utf8(rest.to_vec()).unwrap()),
                        INFO_DESCRIPTION => {
                            details.description = Some(String::from_utf8(rest.to_vec()).unwrap())
                        }
                        INFO_BLOCK_SIZE => {
                            assert_eq!(rest.len(), 12, "NBD_INFO_BLOCK_SIZE length");
                            let field =
                                |i: usize| u32::from_be_bytes(rest[i * 4..i * 4 + 4].try_into().unwrap());
                            details.block_size = Some((field(0), field(1), field(2)));
                        }
                        other => panic!("unexpected info type {other}"),
                    }
                }
                REP_ACK => {
                    assert!(saw_export, "ACK without NBD_INFO_EXPORT");
                    return Ok(details);
                }
                _ => return Err(reply),
            }
        }
        unreachable!("option_replies ends with ACK or an error")
    }

    pub async fn go(&mut self, name: &str, requests: &[u16]) -> Result<ExportDetails, OptionReply> {
        self.info_or_go(OPT_GO, name, requests).await
    }

    /// Send a request header (and `payload` for writes); returns the cookie used.
    pub async fn request(&mut self, flags: u16, kind: u16, offset: u64, length: u32, payload: &[u8]) -> u64 {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        self.request_with_cookie(cookie, flags, kind, offset, length, payload).await;
        cookie
    }

    pub async fn request_with_cookie(
        &mut self,
        cookie: u64,
        flags: u16,
        kind: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) {
        let mut message = REQUEST_MAGIC.to_be_bytes().to_vec();
        message.extend_from_slice(&flags.to_be_bytes());
        message.extend_from_slice(&kind.to_be_bytes());
        message.extend_from_slice(&cookie.to_be_bytes());
        message.extend_from_slice(&offset.to_be_bytes());
        message.extend_from_slice(&length.to_be_bytes());
        message.extend_from_slice(payload);
        if kind == CMD_READ && !self.structured {
            self.pending_reads.insert(cookie, length);
        }
        self.send(&message).await;
    }

    /// The next complete reply (for whichever request finishes first).
    pub async fn reply(&mut self) -> Reply {
        loop {
            let magic = self.u32().await;
            match magic {
                SIMPLE_REPLY_MAGIC => {
                    let error = self.u32().await;
                    let cookie = self.u64().await;
                    let mut reply = Reply { cookie, error, simple: true, ..Reply::default() };
                    if let Some(length) = self.pending_reads.remove(&cookie) {
                        if error == 0 {
                            let data = self.bytes(length as usize).await;
                            reply.chunks.push((0, data));
                        }
                    }
                    return reply;
                }
                STRUCTURED_REPLY_MAGIC => {
                    assert!(self.structured, "structured chunk without negotiation");
                    let flags = self.u16().await;
                    let kind = self.u16().await;
                    let cookie = self.u64().await;
                    let length = self.u32().await;
                    let payload = self.bytes(length as usize).await;
                    let reply =
                        self.partial.entry(cookie).or_insert_with(|| Reply { cookie, ..Reply::default() });
                    reply.chunk_types.push(kind);
                    match kind {
                        REPLY_TYPE_NONE => assert_eq!(length, 0),
                        REPLY_TYPE_OFFSET_DATA => {
                            assert!(length >= 9, "OFFSET_DATA carries at least one byte");
                            let offset = u64::from_be_bytes(payload[..8].try_into().unwrap());
                            reply.chunks.push((offset, payload[8..].to_vec()));
                        }
                        REPLY_TYPE_BLOCK_STATUS => {
                            assert!(length >= 12 && (length - 4) % 8 == 0, "block status length");
                            let context = u32::from_be_bytes(payload[..4].try_into().unwrap());
                            let descriptors = payload[4..]
                                .chunks_exact(8)
                                .map(|d| {
                                    (
                                        u32::from_be_bytes(d[..4].try_into().unwrap()),
                                        u32::from_be_bytes(d[4..].try_into().unwrap()),
                                    )
                                })
                                .collect();
                            reply.extents.push((context, descriptors));
                        }
                        REPLY_TYPE_ERROR => {
                            assert!(length >= 6);
                            reply.error = u32::from_be_bytes(payload[..4].try_into().unwrap());
                            assert_ne!(reply.error, 0, "error chunk with error zero");
                            let message_bytes =
                                u16::from_be_bytes(payload[4..6].try_into().unwrap()) as usize;
                            assert!(message_bytes <= payload.len() - 6);
                            reply.error_message = String::from_utf8(payload[6..6 + message_bytes].to_vec())
                                .expect("error message is UTF-8");
                        }
                        other => panic!("unexpected structured reply type {other:#x}"),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        return self.partial.remove(&cookie).unwrap();
                    }
                }
                other => panic!("unexpected reply magic {other:#x}"),
            }
        }
    }

    /// Send a request and wait for its reply (no other request may be in flight).
    pub async fn call(&mut self, flags: u16, kind: u16, offset: u64, length: u32, payload: &[u8]) -> Reply {
        let cookie = self.request(flags, kind, offset, length, payload).await;
        let reply = self.reply().await;
        assert_eq!(reply.cookie, cookie, "reply cookie matches the request");
        reply
    }

    pub async fn read(&mut self, offset: u64, length: u32) -> Reply {
        self.call(0, CMD_READ, offset, length, &[]).await
    }

    pub async fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Reply {
        self.call(flags, CMD_WRITE, offset, data.len() as u32, data).await
    }

    pub async fn block_status(&mut self, offset: u64, length: u32, flags: u16) -> Reply {
        self.call(flags, CMD_BLOCK_STATUS, offset, length, &[]).await
    }

    /// Send NBD_CMD_DISC and wait for the server to close the connection.
    pub async fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, &[]).await;
        self.expect_closed().await;
    }

    /// Wait for the server to close the connection, failing on any further byte.
    pub async fn expect_closed(&mut self) {
        let mut byte = [0u8; 1];
        match within("the server to close", self.stream.read(&mut byte)).await {
            Ok(0) => {}
            Ok(_) => panic!("expected the connection to close, got byte {:#x}", byte[0]),
            Err(error) => assert!(
                matches!(error.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe),
                "unexpected error while waiting for close: {error}"
            ),
        }
    }

    pub async fn bytes(&mut self, length: usize) -> Vec<u8> {
        let mut data = vec![0u8; length];
        within("reply bytes", self.stream.read_exact(&mut data)).await.unwrap();
        data
    }

    pub async fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.bytes(2).await.try_into().unwrap())
    }

    pub async fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.bytes(4).await.try_into().unwrap())
    }

    pub async fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.bytes(8).await.try_into().unwrap())
    }
}

/// Data of a metadata context option.
pub fn meta_request(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut data = (name.len() as u32).to_be_bytes().to_vec();
    data.extend_from_slice(name.as_bytes());
    data.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for query in queries {
        data.extend_from_slice(&(query.len() as u32).to_be_bytes());
        data.extend_from_slice(query.as_bytes());
    }
    data
}
