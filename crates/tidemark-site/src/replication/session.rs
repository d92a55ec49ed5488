//! One group's replication over one stream: the primary's session ships durable records and
//! takes acks; the secondary's session checks batches, appends them, syncs and acks.
//!
//! Sessions speak in frames over a pair of channels, so the QUIC transport is only a pump and
//! tests can join two sessions directly. The protocol decisions are `tidemark-repl`'s; this is
//! the async shell that feeds it bytes and time and does the blocking engine calls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_engine::group::{Group, Position, Promotion};
use tidemark_engine::persist::Role;
use tidemark_engine::{Engine, EngineError, GroupOptions};
use tidemark_journal::stats::Histogram;
use tidemark_journal::{JournalError, Location, Seq};
use tidemark_repl::roles::{may_take_swap, on_offer, settle_swap, LocalRole, OfferDecision, PendingSwap};
use tidemark_repl::{
    BatchCompressor, BatchFrame, GroupPosition, Message, Pending, Receiver, Sender, SenderConfig, SenderState,
};
use tokio::sync::{mpsc, oneshot, watch};

use super::baseline::{receive_baseline, send_baseline, Sending};
use super::overflow::DirtyBlocks;
use crate::metrics::{FrameRejection, LinkError, ReasonCounts};

/// How long a peer may take to answer the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the primary's session looks for new durable records when nothing else wakes it.
pub const POLL_INTERVAL: Duration = Duration::from_millis(5);
/// A primary whose hosts do not flush still has its records shipped: the session makes them
/// durable (one group commit) when they have waited this long.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(20);

/// A partner's bandwidth limit, shared by every group replicated to it.
#[derive(Debug)]
pub struct Limiter {
    origin: Instant,
    bucket: tidemark_repl::TokenBucket,
}

impl Limiter {
    /// A limit of `mbit_per_second`, with bursts of a tenth of a second's worth (at least 64 KiB).
    pub fn new(mbit_per_second: u64) -> Limiter {
        let rate = mbit_per_second.saturating_mul(1_000_000) / 8;
        Limiter {
            origin: Instant::now(),
            bucket: tidemark_repl::TokenBucket::new(rate.max(1), (rate / 10).max(64 << 10), Duration::ZERO),
        }
    }

    /// How long to wait before sending `bytes` on the wire.
    pub fn wait_for(&mut self, bytes: u64) -> Duration {
        self.bucket.take(self.origin.elapsed(), bytes)
    }

    /// Bytes that went through the limit so far.
    pub fn taken_bytes_total(&self) -> u64 {
        self.bucket.taken_bytes_total()
    }
}

/// Frames in and out of one stream.
pub struct Channel {
    /// Frames to send.
    pub tx: mpsc::Sender<Vec<u8>>,
    /// Frames received.
    pub rx: mpsc::Receiver<Vec<u8>>,
}

impl Channel {
    /// Two channels joined back to back (for tests, and for an in-process loopback).
    pub fn pair(depth: usize) -> (Channel, Channel) {
        let (a_tx, b_rx) = mpsc::channel(depth);
        let (b_tx, a_rx) = mpsc::channel(depth);
        (Channel { tx: a_tx, rx: a_rx }, Channel { tx: b_tx, rx: b_rx })
    }
}

/// Settings of a session.
#[derive(Clone, Copy, Debug)]
pub struct SessionConfig {
    /// Batching and in-flight limits.
    pub sender: SenderConfig,
    /// zstd level for batch payloads.
    pub zstd_level: i32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig { sender: SenderConfig::default(), zstd_level: 1 }
    }
}

/// Replication state of a group as operators see it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplState {
    /// Dialling or handshaking.
    Connecting,
    /// The partner is behind what the journal holds; a baseline is needed.
    Baseline,
    /// Shipping records.
    Streaming,
    /// Stopped by the operator.
    Paused,
    /// The histories differ; the group stopped and nothing was overwritten.
    Diverged,
    /// The partner knows a newer generation; this site is no longer primary.
    Fenced,
    /// Receiving (this site is the secondary).
    Receiving,
}

/// Counters of one group's replication, shared with status and metrics.
#[derive(Debug)]
pub struct ReplStats {
    /// State now.
    pub state: Mutex<ReplState>,
    /// The last error, for `group show`.
    pub last_error: Mutex<Option<String>>,
    /// Newest seq durable at the partner.
    pub acked_seq: AtomicU64,
    /// Where the record after `acked_seq` starts in the journal (for lag in bytes).
    pub acked_location: Mutex<Option<Location>>,
    /// Uncompressed bytes sent.
    pub bytes_sent_total: AtomicU64,
    /// Bytes sent after compression.
    pub bytes_sent_compressed_total: AtomicU64,
    /// Batches sent.
    pub batches_sent_total: AtomicU64,
    /// Frames refused (corrupt, out of order, stale generation).
    pub frames_rejected_total: AtomicU64,
    /// The newer generation a partner fenced this site with (0 when never fenced).
    pub fenced_by: AtomicU64,
    /// Latency from sending a batch to its ack, newest, in microseconds.
    pub ack_latency_micros: AtomicU64,
    /// Uncompressed bytes of each batch sent.
    pub batch_bytes: Histogram,
    /// Time to read, compress and hand each batch to the link, in nanoseconds (bandwidth-limit
    /// waits excluded: they are `throttled_nanos_total`).
    pub batch_send_duration: Histogram,
    /// Time from sending a batch to the ack that covers it, in nanoseconds.
    pub batch_ack_duration: Histogram,
    /// Time batches waited for the partner's bandwidth limit, in nanoseconds.
    pub throttled_nanos_total: AtomicU64,
    /// Frames refused, by reason (their sum is `frames_rejected_total`).
    pub frames_rejected: ReasonCounts<FrameRejection>,
    /// Primary sessions that ended with an error, by reason.
    pub link_errors: ReasonCounts<LinkError>,
    /// The seq of the baseline under way or last finished (0: none yet).
    pub baseline_seq: AtomicU64,
    /// Allocated bytes of the baseline under way or last finished.
    pub baseline_bytes_total: AtomicU64,
    /// Of those, bytes read and sent (or received) so far.
    pub baseline_bytes_done: AtomicU64,
    /// Baselines completed (acknowledged by the partner, or switched to here).
    pub baselines_total: AtomicU64,
    /// Set by the `resync` overflow policy when the journal passes its limit while the partner
    /// is connected but too slow: the session stops sending, waits for its batches' acks and
    /// ends with [`SessionEnd::Overflowed`], so tracking starts exactly at the partner's position.
    pub overflowing: AtomicBool,
}

impl ReplStats {
    /// Fresh counters.
    pub fn new(acked: Seq) -> ReplStats {
        ReplStats {
            state: Mutex::new(ReplState::Connecting),
            last_error: Mutex::new(None),
            acked_seq: AtomicU64::new(acked.0),
            acked_location: Mutex::new(None),
            bytes_sent_total: AtomicU64::new(0),
            bytes_sent_compressed_total: AtomicU64::new(0),
            batches_sent_total: AtomicU64::new(0),
            frames_rejected_total: AtomicU64::new(0),
            ack_latency_micros: AtomicU64::new(0),
            fenced_by: AtomicU64::new(0),
            batch_bytes: Histogram::size(),
            batch_send_duration: Histogram::latency(),
            batch_ack_duration: Histogram::latency(),
            throttled_nanos_total: AtomicU64::new(0),
            frames_rejected: ReasonCounts::default(),
            link_errors: ReasonCounts::default(),
            baseline_seq: AtomicU64::new(0),
            baseline_bytes_total: AtomicU64::new(0),
            baseline_bytes_done: AtomicU64::new(0),
            baselines_total: AtomicU64::new(0),
            overflowing: AtomicBool::new(false),
        }
    }

    /// Count a refused frame.
    pub fn reject(&self, reason: FrameRejection) {
        self.frames_rejected_total.fetch_add(1, Ordering::Relaxed);
        self.frames_rejected.add(reason);
    }

    pub(super) fn set_state(&self, state: ReplState) {
        *self.state.lock() = state;
    }
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The stream closed.
    #[error("the partner closed the stream")]
    Closed,
    /// The partner did not answer in time.
    #[error("the partner did not answer the handshake within {0:?}")]
    Timeout(Duration),
    /// The partner said something out of place or malformed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The partner refused the group.
    #[error("the partner refused: {0}")]
    Refused(String),
    /// The histories differ.
    #[error("diverged: {0}")]
    Diverged(String),
    /// A newer primary exists.
    #[error("fenced: {0}")]
    Fenced(String),
    /// A newer session from a partner replaced this one.
    #[error("a newer replication session for the group replaced this one")]
    Superseded,
    /// An engine call failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

pub(super) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking engine call panicked")
}

pub(super) async fn send(ch: &Channel, msg: &Message) -> Result<(), SessionError> {
    ch.tx.send(msg.encode()).await.map_err(|_| SessionError::Closed)
}

pub(super) async fn recv(ch: &mut Channel, timeout: Option<Duration>) -> Result<Message, SessionError> {
    let frame = match timeout {
        Some(t) => tokio::time::timeout(t, ch.rx.recv()).await.map_err(|_| SessionError::Timeout(t))?,
        None => ch.rx.recv().await,
    }
    .ok_or(SessionError::Closed)?;
    Message::decode(&frame).map_err(|e| SessionError::Protocol(e.to_string()))
}

/// A group's position as the wire carries it.
pub fn to_wire(p: &Position) -> GroupPosition {
    GroupPosition {
        group_id: p.group_id,
        generation: p.generation,
        last_seq: p.last_seq,
        chain: p.chain,
        durable_seq: p.durable_seq,
        generations: p.generations.clone(),
    }
}

/// An operator's swap, handed to the group's running session and answered when the swap has
/// finished or failed.
pub type SwapCall = oneshot::Sender<Result<SwapOutcome, String>>;

/// A finished swap.
#[derive(Clone, Debug, serde::Serialize)]
pub struct SwapOutcome {
    /// The generation the new primary holds.
    pub generation: u64,
    /// The last seq of the history both sites share.
    pub last_seq: u64,
}

/// How a session ended without an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// Stopped by this site (pause, unprotect, shut-down).
    Stopped,
    /// A swap made the partner primary under `generation`; this site is a secondary now.
    SwappedOut {
        /// The partner's generation.
        generation: u64,
    },
    /// A swap made this site primary under `generation`.
    Promoted {
        /// This site's generation.
        generation: u64,
    },
    /// A baseline at `seq` is complete at the secondary; the next session streams after it.
    Baselined {
        /// The baseline's seq.
        seq: u64,
    },
    /// The journal passed its limit with the partner connected but behind (see
    /// [`ReplStats::overflowing`]): the partner holds everything through `acked`, and nothing
    /// after it is in flight unless the drain timed out (`drained` false).
    Overflowed {
        /// Newest seq the partner acknowledged.
        acked: Seq,
        /// Whether every batch sent was acknowledged.
        drained: bool,
    },
}

/// What sessions need from the site around them.
pub trait SessionHost: Send + Sync + 'static {
    /// The counters of `group`.
    fn stats_for(&self, group: &str) -> Arc<ReplStats>;
    /// A new session of `group` starts: the channel operators' swap calls arrive on.
    fn swap_calls(&self, group: &str) -> mpsc::Receiver<SwapCall>;
    /// One incoming session per group at a time: a new one waits for the old to end.
    fn session_lock(&self, group: &str) -> Arc<tokio::sync::Mutex<()>>;
    /// Incoming sessions of `group` so far: a new one bumps it, and an older one still running
    /// ends (its primary reconnected, or died and another took its place, and the old
    /// connection may not time out for a long while). The default never supersedes.
    fn session_epoch(&self, _group: &str) -> Arc<watch::Sender<u64>> {
        Arc::new(watch::channel(0).0)
    }
    /// This site receives `group` from the partner `peer` (its primary).
    fn receiving(&self, group: &str, peer: &str);
    /// `group` was promoted here by a swap: the partner `peer` is its secondary now.
    fn promoted(&self, group: &str, peer: &str, generation: u64);
    /// `group` was demoted here: the partner `peer` is primary under `generation`.
    fn demoted(&self, group: &str, peer: &str, generation: u64);
}

/// How long a swap waits for the secondary to acknowledge everything before it is called off.
pub const SWAP_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a session the overflow policy stopped waits for its batches' acks before it ends
/// anyway (the resync then starts from wherever the partner turns out to be).
pub const OVERFLOW_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a swap waits for the secondary's answer once it has been asked to take over.
pub const SWAP_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// A swap the primary's session is running.
struct Swap {
    generation: u64,
    target: Seq,
    chain: tidemark_journal::ChainHash,
    deadline: Instant,
    prepared: bool,
    reply: Option<SwapCall>,
}

fn answer(reply: Option<SwapCall>, result: Result<SwapOutcome, String>) {
    if let Some(reply) = reply {
        let _ = reply.send(result);
    }
}

/// What a primary session needs besides its group, stream and stop signal.
pub struct PrimaryContext<H> {
    /// This site's name, for the partner's logs.
    pub site: String,
    /// The group's counters.
    pub stats: Arc<ReplStats>,
    /// Batching and compression.
    pub config: SessionConfig,
    /// Called with every newly acknowledged seq (see [`run_primary`]).
    pub hold: H,
    /// The partner's bandwidth limit, if it has one.
    pub limiter: Option<Arc<Mutex<Limiter>>>,
    /// Operators' swap calls for this group.
    pub swaps: mpsc::Receiver<SwapCall>,
    /// Blocks changed since the partner's last acknowledgement that the journal no longer holds
    /// (the `resync` overflow policy): a partner at exactly that point gets only those.
    pub resync: Option<DirtyBlocks>,
}

/// Run the primary's side for `group` until the stream ends, the partner refuses, or `stop`.
/// `hold(seq)` is called with every newly acknowledged seq: history after it must not be
/// trimmed, since the partner still needs it. With a `limiter`, each batch waits for its share
/// of the partner's bandwidth limit before it is sent.
///
/// # Cancel safety
/// Dropping the future loses only in-flight batches, which the next session sends again from
/// the partner's position.
pub async fn run_primary(
    group: Arc<Group>,
    mut ch: Channel,
    context: PrimaryContext<impl Fn(Seq) + Send>,
    mut stop: watch::Receiver<bool>,
) -> Result<SessionEnd, SessionError> {
    let PrimaryContext { site, stats, config, hold, limiter, mut swaps, resync } = context;
    stats.set_state(ReplState::Connecting);
    let epoch = Instant::now();
    let g = group.clone();
    let position = blocking(move || g.position()).await;
    send(&ch, &Message::Hello { protocol: tidemark_repl::PROTOCOL_VERSION, site }).await?;
    send(
        &ch,
        &Message::Offer {
            position: to_wire(&position),
            first_seq: position.first_seq,
            name: group.name.clone(),
            retention_seconds: group.options.retention_seconds,
            journal_max_bytes: group.options.journal_max_bytes,
        },
    )
    .await?;
    let peer = loop {
        match recv(&mut ch, Some(HANDSHAKE_TIMEOUT)).await? {
            Message::Hello { protocol, .. } if protocol != tidemark_repl::PROTOCOL_VERSION => {
                return Err(SessionError::Protocol(format!("partner speaks protocol {protocol}")))
            }
            Message::Hello { .. } => continue,
            Message::Position(p) => break p,
            Message::Refuse { reason, .. } => return Err(SessionError::Refused(reason)),
            other => {
                return Err(SessionError::Protocol(format!("expected the partner's position, got {other:?}")))
            }
        }
    };
    // A swap this site started and never heard the end of is settled by the partner's answer:
    // it promoted itself (finish: demote) or it did not (call the swap off; writes resume).
    if let Some(pending) = group.role_state().swap_pending {
        let g = group.clone();
        match settle_swap(pending.generation, peer.generation) {
            PendingSwap::Finish { generation } => {
                let reason = format!("swap finished: the partner is primary under generation {generation}");
                blocking(move || g.demote(generation, &reason)).await?;
                return Ok(SessionEnd::SwappedOut { generation });
            }
            PendingSwap::CallOff => {
                blocking(move || g.abort_swap()).await?;
                tracing::warn!(group = %group.name, "an unfinished swap was called off: the partner never took over");
            }
        }
    }
    let g = group.clone();
    let seq = peer.last_seq;
    let ours = blocking(move || g.chain_at(seq)).await?;
    let mut sender = Sender::new(group.id, position.generation, peer.durable_seq, config.sender);
    let resume = sender.on_position(&peer, position.first_seq, position.last_seq, |_| ours);
    match (resume, sender.state().clone()) {
        (Err(e), SenderState::Fenced { theirs }) => {
            stats.fenced_by.store(theirs, Ordering::Release);
            stats.set_state(ReplState::Fenced);
            return Err(SessionError::Fenced(e.to_string()));
        }
        (Err(e), _) => {
            stats.set_state(ReplState::Diverged);
            let _ = send(&ch, &Message::Refuse { group_id: group.id, reason: e.to_string() }).await;
            return Err(SessionError::Diverged(e.to_string()));
        }
        (Ok(_), state) => {
            // Once the overflow policy tracks blocks for this partner it gets them as a resync,
            // even if the journal has not trimmed yet; a partner behind the journal that the
            // tracked blocks do not fit gets everything.
            let behind = state == SenderState::NeedsBaseline;
            let delta = resync.and_then(|d| resync_from(d, &peer, !behind));
            if behind || delta.is_some() {
                let sending = Sending {
                    stats: &stats,
                    level: config.zstd_level,
                    hold: &hold,
                    limiter: &limiter,
                    delta,
                };
                return send_baseline(&group, &mut ch, sending, &mut stop).await;
            }
        }
    }
    stats.acked_seq.store(sender.acked().0, Ordering::Release);
    hold(sender.acked());
    stats.set_state(ReplState::Streaming);
    // Where the next record to send starts, and where each sent batch ends (for lag in bytes).
    let mut cursor: Option<Location> = None;
    let mut flights: VecDeque<(Seq, Location)> = VecDeque::new();
    let mut last_flush = Instant::now();
    let mut swap: Option<Swap> = None;
    // One zstd context for the session's batches.
    let compressor = Arc::new(Mutex::new(BatchCompressor::new(config.zstd_level)));
    // Set once the overflow policy asked this session to hand over to a resync.
    let mut overflow_deadline: Option<Instant> = None;
    loop {
        if swap.is_none() && stats.overflowing.load(Ordering::Acquire) {
            let deadline = *overflow_deadline.get_or_insert_with(|| {
                tracing::info!(group = %group.name, "journal past its limit: draining for a resync");
                Instant::now() + OVERFLOW_DRAIN_TIMEOUT
            });
            if flights.is_empty() || Instant::now() >= deadline {
                return Ok(SessionEnd::Overflowed { acked: sender.acked(), drained: flights.is_empty() });
            }
        }
        // Make records durable when hosts do not: only durable records are shipped.
        let (last, durable) = {
            let p = group.position();
            (p.last_seq, p.durable_seq)
        };
        if last > durable && last_flush.elapsed() >= FLUSH_INTERVAL {
            let g = group.clone();
            blocking(move || g.flush()).await?;
            last_flush = Instant::now();
        }
        let durable = group.durable_seq();
        let now = epoch.elapsed();
        while let Some(plan) = sender
            .plan(now, Pending { last_seq: durable, unsent_bytes: 0, oldest_unsent_at: Some(Duration::ZERO) })
            // A swap ships everything whatever the overflow policy asked.
            .filter(|_| overflow_deadline.is_none() || swap.is_some())
        {
            let building = Instant::now();
            let from = match cursor {
                Some(c) => c,
                None => {
                    let (g, at) = (group.clone(), plan.from);
                    blocking(move || g.locate(at)).await?
                }
            };
            let (g, first, max) = (group.clone(), plan.from, plan.bytes_max);
            let zstd = compressor.clone();
            let built = blocking(move || build_batch(&g, &mut zstd.lock(), from, first, max)).await?;
            let Some((frame, next, raw_bytes)) = built else { break };
            let (first, last) = (frame.first_seq, frame.last_seq);
            let compressed = frame.payload.len() as u64;
            let mut throttled = Duration::ZERO;
            if let Some(limiter) = &limiter {
                let wait = limiter.lock().wait_for(compressed);
                if !wait.is_zero() {
                    let waiting = Instant::now();
                    tokio::time::sleep(wait).await;
                    throttled = waiting.elapsed();
                    stats.throttled_nanos_total.fetch_add(throttled.as_nanos() as u64, Ordering::Relaxed);
                }
            }
            send(&ch, &Message::Batch(frame)).await?;
            stats.batch_send_duration.observe_duration(building.elapsed().saturating_sub(throttled));
            stats.batch_bytes.observe(raw_bytes);
            sender.on_sent(first, last, raw_bytes, epoch.elapsed());
            flights.push_back((last, next));
            cursor = Some(next);
            stats.bytes_sent_total.fetch_add(raw_bytes, Ordering::Relaxed);
            stats.bytes_sent_compressed_total.fetch_add(compressed, Ordering::Relaxed);
            stats.batches_sent_total.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(end) = drive_swap(&group, &ch, &mut swap, sender.acked()).await? {
            return Ok(end);
        }
        tokio::select! {
            Some(call) = swaps.recv(), if swap.is_none() => {
                swap = start_swap(&group, Some(call)).await;
            }
            frame = ch.rx.recv() => {
                let frame = frame.ok_or(SessionError::Closed)?;
                match Message::decode(&frame).map_err(|e| SessionError::Protocol(e.to_string()))? {
                    Message::SwapRequest { .. } if swap.is_none() => {
                        swap = start_swap(&group, None).await;
                    }
                    Message::SwapRequest { .. } => {}
                    Message::SwapPromoted { generation, .. } => {
                        let Some(s) = swap.take().filter(|s| s.prepared && s.generation == generation) else {
                            return Err(SessionError::Protocol(format!(
                                "the partner says it is primary under generation {generation}, but no such swap was asked"
                            )));
                        };
                        let g = group.clone();
                        let reason = format!("swap: the partner is primary under generation {generation}");
                        blocking(move || g.demote(generation, &reason)).await?;
                        answer(s.reply, Ok(SwapOutcome { generation, last_seq: s.target.0 }));
                        return Ok(SessionEnd::SwappedOut { generation });
                    }
                    Message::Refuse { reason, .. } if swap.is_some() => {
                        if let Some(s) = swap.take() {
                            let g = group.clone();
                            blocking(move || g.abort_swap()).await?;
                            answer(s.reply, Err(format!("the partner refused the swap: {reason}")));
                        }
                        return Err(SessionError::Refused(reason));
                    }
                    Message::Ack { generation, durable_seq, .. } => {
                        let latency = match sender.on_ack(generation, durable_seq, epoch.elapsed()) {
                            Ok(latency) => latency,
                            Err(e @ tidemark_repl::SenderError::Fenced { theirs, .. }) => {
                                stats.fenced_by.store(theirs, Ordering::Release);
                                stats.set_state(ReplState::Fenced);
                                return Err(SessionError::Fenced(e.to_string()));
                            }
                            Err(e) => return Err(SessionError::Protocol(e.to_string())),
                        };
                        if let Some(l) = latency {
                            stats.ack_latency_micros.store(l.as_micros() as u64, Ordering::Relaxed);
                            stats.batch_ack_duration.observe_duration(l);
                        }
                        while flights.front().is_some_and(|(last, _)| *last <= durable_seq) {
                            if let Some((_, loc)) = flights.pop_front() {
                                *stats.acked_location.lock() = Some(loc);
                            }
                        }
                        stats.acked_seq.store(sender.acked().0, Ordering::Release);
                        hold(sender.acked());
                    }
                    Message::Refuse { reason, .. } => return Err(SessionError::Refused(reason)),
                    other => return Err(SessionError::Protocol(format!("unexpected {other:?} while streaming"))),
                }
            }
            () = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = stop.changed() => {
                if let Some(s) = swap.take() {
                    // Stopping mid-swap: call it off unless the partner may already have it.
                    if !s.prepared {
                        let g = group.clone();
                        blocking(move || g.abort_swap()).await?;
                    }
                    answer(s.reply, Err("replication of the group was stopped during the swap".into()));
                }
                return Ok(SessionEnd::Stopped);
            }
        }
    }
}

/// The tracked blocks `dirty` as a resync from the partner's position `peer`, if they fit it.
/// When `in_journal` (the journal still holds that position, and its chain there matched the
/// partner's), a partner from where tracking began up to before `through` gets one: what
/// changed since is among the tracked blocks and the journal's changes after `through`; at or
/// past `through` the journal has all it lacks. Otherwise only a partner exactly where
/// tracking began fits.
fn resync_from(dirty: DirtyBlocks, peer: &GroupPosition, in_journal: bool) -> Option<DirtyBlocks> {
    let at = peer.last_seq.0;
    let fits = if in_journal {
        dirty.from_seq <= at && at < dirty.through
    } else {
        at == dirty.from_seq && peer.chain.0 == dirty.from_chain
    };
    fits.then_some(DirtyBlocks { from_seq: at, from_chain: peer.chain.0, ..dirty })
}

/// The batch of durable records from `from` (where seq `first` starts), at most `bytes_max`
/// bytes, with where the record after it starts and its uncompressed size; `None` when no
/// record is ready.
fn build_batch(
    group: &Group,
    compressor: &mut BatchCompressor,
    from: Location,
    first: Seq,
    bytes_max: u64,
) -> Result<Option<(BatchFrame, Location, u64)>, EngineError> {
    let raw = group.read_for_shipping(from, first, bytes_max)?;
    if raw.is_empty() {
        return Ok(None);
    }
    let frame =
        BatchFrame::build_with(compressor, group.id, group.generation(), raw.first, raw.last, &raw.pieces)
            .ok_or_else(|| {
                let reason =
                    format!("records {}..={} read for shipping are not whole", raw.first.0, raw.last.0);
                JournalError::Invalid(reason)
            })?;
    Ok(Some((frame, raw.next, raw.len() as u64)))
}

/// Start a swap: stop host writes (durably) and note how far the partner must catch up.
async fn start_swap(group: &Arc<Group>, reply: Option<SwapCall>) -> Option<Swap> {
    let g = group.clone();
    let generation = group.generation() + 1;
    match blocking(move || g.begin_swap(generation)).await {
        Ok(position) => {
            tracing::info!(group = %group.name, generation, seq = position.last_seq.0, "swap: writes stopped, draining");
            Some(Swap {
                generation,
                target: position.last_seq,
                chain: position.chain,
                deadline: Instant::now() + SWAP_DRAIN_TIMEOUT,
                prepared: false,
                reply,
            })
        }
        Err(e) => {
            answer(reply, Err(e.to_string()));
            None
        }
    }
}

/// Move a running swap on: once the partner holds everything, ask it to take over; past a
/// deadline, call the swap off (before asking) or give up on this session (after asking: only
/// the partner knows whether it took over, and the next handshake will tell).
async fn drive_swap(
    group: &Arc<Group>,
    ch: &Channel,
    swap: &mut Option<Swap>,
    acked: Seq,
) -> Result<Option<SessionEnd>, SessionError> {
    let Some(s) = swap.as_mut() else { return Ok(None) };
    if !s.prepared && acked >= s.target {
        let prepare = Message::SwapPrepare {
            group_id: group.id,
            generation: s.generation,
            last_seq: s.target,
            chain: s.chain,
        };
        send(ch, &prepare).await?;
        s.prepared = true;
        s.deadline = Instant::now() + SWAP_ANSWER_TIMEOUT;
        return Ok(None);
    }
    if Instant::now() < s.deadline {
        return Ok(None);
    }
    let Some(s) = swap.take() else { return Ok(None) };
    if s.prepared {
        answer(
            s.reply,
            Err("the partner did not answer the swap; host writes stay stopped until the sites reconnect and settle which one is primary".into()),
        );
        return Err(SessionError::Timeout(SWAP_ANSWER_TIMEOUT));
    }
    let g = group.clone();
    blocking(move || g.abort_swap()).await?;
    answer(
        s.reply,
        Err(format!("the partner did not catch up within {SWAP_DRAIN_TIMEOUT:?}; the swap was called off and writes resumed")),
    );
    Ok(None)
}

/// Run the secondary's side of one stream: accept the partner's offer (creating the secondary
/// group on first contact), settle roles, then append, sync and acknowledge batches.
///
/// Roles are settled at the handshake by generation. An offer from an older generation than
/// this site knows comes from a deposed primary: it is answered with this site's position, which
/// fences it. An offer from a newer generation fences this site if it is primary here (it demotes
/// at once); then, if this site's history runs past the fork point of the partner's lineage (the
/// writes of a returning primary that never reached its partner), that tail is kept as a
/// salvage image and cut (failback), so only what the partner wrote since the fork is sent.
///
/// # Cancel safety
/// Dropping the future between batches loses nothing: applied records are in the journal and
/// the next session resumes after them.
pub async fn run_secondary(
    engine: Arc<Engine>,
    site: String,
    peer: String,
    mut ch: Channel,
    host: Arc<dyn SessionHost>,
) -> Result<SessionEnd, SessionError> {
    send(&ch, &Message::Hello { protocol: tidemark_repl::PROTOCOL_VERSION, site }).await?;
    let (offer, name, options) = loop {
        match recv(&mut ch, Some(HANDSHAKE_TIMEOUT)).await? {
            Message::Hello { protocol, .. } if protocol != tidemark_repl::PROTOCOL_VERSION => {
                return Err(SessionError::Protocol(format!("partner speaks protocol {protocol}")))
            }
            Message::Hello { .. } => continue,
            Message::Offer { position, name, retention_seconds, journal_max_bytes, .. } => {
                break (position, name, GroupOptions { retention_seconds, journal_max_bytes })
            }
            other => return Err(SessionError::Protocol(format!("expected an offer, got {other:?}"))),
        }
    };
    // A newer session supersedes an older one still holding the lock (see `session_epoch`).
    let epoch = host.session_epoch(&name);
    let mut mine = 0;
    epoch.send_modify(|e| {
        *e += 1;
        mine = *e;
    });
    let mut superseded = epoch.subscribe();
    let lock = host.session_lock(&name);
    let _session = tokio::time::timeout(HANDSHAKE_TIMEOUT, lock.lock_owned())
        .await
        .map_err(|_| SessionError::Timeout(HANDSHAKE_TIMEOUT))?;
    let (e, n, generation) = (engine.clone(), name.clone(), offer.generation);
    let group = blocking(move || match e.group_handle(&n) {
        Err(EngineError::NotFound { .. }) => {
            e.create_secondary_group(&n, offer.group_id, options, generation)?;
            e.group_handle(&n)
        }
        other => other,
    })
    .await;
    let group = match group {
        Ok(g) if g.id != offer.group_id => {
            let reason = format!("a different group named {name:?} exists here");
            let _ = send(&ch, &Message::Refuse { group_id: offer.group_id, reason: reason.clone() }).await;
            return Err(SessionError::Refused(reason));
        }
        Ok(g) => g,
        Err(e) => {
            let _ = send(&ch, &Message::Refuse { group_id: offer.group_id, reason: e.to_string() }).await;
            return Err(e.into());
        }
    };
    let stats = host.stats_for(&name);
    let roles = group.role_state();
    let g = group.clone();
    let ours = to_wire(&blocking(move || g.position()).await);
    let local = LocalRole { primary: roles.role == Role::Primary, generation: roles.generation };
    let (demote, rewind_to) = match on_offer(&local, &ours, &offer) {
        OfferDecision::StandDown => {
            // A deposed primary: our position tells it of the newer generation; it stands down.
            send(&ch, &Message::Position(ours)).await?;
            return Err(SessionError::Refused(format!(
                "partner {peer} offered generation {} of group {name:?}, older than generation {} here; it was told to stand down",
                offer.generation, roles.generation
            )));
        }
        OfferDecision::Conflict => {
            let reason = format!(
                "both sites claim the primary role of group {name:?} under generation {}",
                roles.generation
            );
            let _ = send(&ch, &Message::Refuse { group_id: group.id, reason: reason.clone() }).await;
            return Err(SessionError::Diverged(reason));
        }
        OfferDecision::Follow { demote, rewind_to } => (demote, rewind_to),
    };
    if demote {
        let g = group.clone();
        let generation = offer.generation;
        let reason = format!("fenced: partner {peer} is primary under generation {generation}");
        blocking(move || g.demote(generation, &reason)).await?;
        host.demoted(&name, &peer, generation);
    }
    if let Err(e) = follow(&engine, &group, &offer, rewind_to).await {
        stats.set_state(ReplState::Diverged);
        let _ = send(&ch, &Message::Refuse { group_id: group.id, reason: e.to_string() }).await;
        return Err(SessionError::Diverged(e.to_string()));
    }
    stats.set_state(ReplState::Receiving);
    host.receiving(&name, &peer);
    let g = group.clone();
    let position = blocking(move || g.position()).await;
    let mut receiver = Receiver::new(&to_wire(&position));
    send(&ch, &Message::Position(receiver.position())).await?;
    let mut swaps = host.swap_calls(&name);
    let mut asked: Option<SwapCall> = None;
    loop {
        let frame = tokio::select! {
            frame = ch.rx.recv() => frame.ok_or(SessionError::Closed)?,
            () = replaced(&mut superseded, mine) => return Err(SessionError::Superseded),
            Some(call) = swaps.recv(), if asked.is_none() => {
                send(&ch, &Message::SwapRequest { group_id: group.id }).await?;
                asked = Some(call);
                continue;
            }
        };
        let batch = match Message::decode(&frame) {
            Ok(Message::Batch(b)) => b,
            Ok(Message::BaselineBegin(header)) => {
                // Cut short by a newer session, the staged part is discarded by the next one.
                return tokio::select! {
                    end = receive_baseline(&engine, &group, &mut ch, header, &stats) => end,
                    () = replaced(&mut superseded, mine) => Err(SessionError::Superseded),
                };
            }
            Ok(Message::SwapPrepare { generation, last_seq, chain, .. }) => {
                let position = group.position();
                if !may_take_swap(&to_wire(&position), last_seq, &chain) {
                    let reason = format!(
                        "swap: this site holds seq {} (durable {}), not the primary's seq {}",
                        position.last_seq.0, position.durable_seq.0, last_seq.0
                    );
                    answer(asked.take(), Err(reason.clone()));
                    send(&ch, &Message::Refuse { group_id: group.id, reason: reason.clone() }).await?;
                    return Err(SessionError::Refused(reason));
                }
                let g = group.clone();
                let reason = format!("swap: planned, from partner {peer}");
                blocking(move || g.promote(generation, Promotion::Swap, &reason)).await?;
                // Tell the old primary, and start protecting to it, whether or not the message
                // arrives: the old primary settles an unanswered swap at the next handshake.
                let _ = send(&ch, &Message::SwapPromoted { group_id: group.id, generation }).await;
                host.promoted(&name, &peer, generation);
                answer(asked.take(), Ok(SwapOutcome { generation, last_seq: last_seq.0 }));
                return Ok(SessionEnd::Promoted { generation });
            }
            Ok(Message::Refuse { reason, .. }) => {
                answer(asked.take(), Err(format!("the primary refused: {reason}")));
                return Err(SessionError::Refused(reason));
            }
            Ok(other) => return Err(SessionError::Protocol(format!("unexpected {other:?} while receiving"))),
            Err(e) => {
                stats.reject(FrameRejection::of_wire(&e));
                return Err(SessionError::Protocol(e.to_string()));
            }
        };
        let records = match receiver.on_batch(&batch) {
            Ok(Some(records)) => records,
            Ok(None) => continue,
            Err(e) => {
                stats.reject(FrameRejection::of_receiver(&e));
                let _ = send(&ch, &Message::Refuse { group_id: group.id, reason: e.to_string() }).await;
                return Err(SessionError::Protocol(e.to_string()));
            }
        };
        let g = group.clone();
        let applied = blocking(move || -> Result<Seq, EngineError> {
            let last = g.apply_replicated(&records)?;
            g.sync_through(last)?;
            Ok(last)
        })
        .await;
        let last = match applied {
            Ok(last) => last,
            Err(e @ EngineError::Diverged { .. }) => {
                stats.reject(FrameRejection::Diverged);
                stats.set_state(ReplState::Diverged);
                let _ = send(&ch, &Message::Refuse { group_id: group.id, reason: e.to_string() }).await;
                return Err(SessionError::Diverged(e.to_string()));
            }
            Err(e) => return Err(e.into()),
        };
        stats.acked_seq.store(last.0, Ordering::Release);
        send(&ch, &receiver.on_durable(last)).await?;
    }
}

/// Resolves when a session newer than `mine` has started (never, if the epoch is gone).
async fn replaced(epoch: &mut watch::Receiver<u64>, mine: u64) {
    if epoch.wait_for(|e| *e != mine).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Follow the partner's history: keep a superseded tail as a salvage image and cut it
/// (failback, when `rewind_to` is set), then take the partner's lineage as ours if our history
/// is a prefix of it (if it is not, the sender finds the divergence at the handshake).
async fn follow(
    engine: &Arc<Engine>,
    group: &Arc<Group>,
    offer: &GroupPosition,
    rewind_to: Option<Seq>,
) -> Result<(), EngineError> {
    let ours = group.position();
    let fork =
        tidemark_repl::fork_point(&ours.generations, ours.last_seq, &offer.generations, offer.last_seq);
    if let Some(fork) = rewind_to {
        let (e, name, generation) = (engine.clone(), group.name.clone(), offer.generation);
        let salvage = blocking(move || e.failback(&name, fork, generation)).await?;
        if let Some(image) = salvage {
            tracing::warn!(group = %group.name, image = %image.name, fork = fork.0, "failback kept a divergent tail");
        }
    }
    if group.position().last_seq <= fork {
        let (g, generation, lineage) = (group.clone(), offer.generation, offer.generations.clone());
        blocking(move || g.adopt_lineage(generation, &lineage)).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tidemark_journal::ChainHash;

    use super::*;

    fn peer_at(seq: u64, chain: u8) -> GroupPosition {
        GroupPosition {
            group_id: 1,
            generation: 1,
            last_seq: Seq(seq),
            chain: ChainHash([chain; 32]),
            durable_seq: Seq(seq),
            generations: Vec::new(),
        }
    }

    /// Blocks tracked from seq 10 (chain 7) through seq 20.
    fn tracked() -> DirtyBlocks {
        DirtyBlocks { through: 20, ..DirtyBlocks::new(10, [7; 32]) }
    }

    #[test]
    fn a_partner_behind_the_journal_fits_a_resync_only_where_tracking_began() {
        let resync = resync_from(tracked(), &peer_at(10, 7), false).expect("fits");
        assert_eq!((resync.from_seq, resync.from_chain, resync.through), (10, [7; 32], 20));
        assert_eq!(resync_from(tracked(), &peer_at(10, 8), false), None, "another history");
        assert_eq!(resync_from(tracked(), &peer_at(12, 7), false), None, "unverifiable position");
        assert_eq!(resync_from(tracked(), &peer_at(9, 7), false), None, "before tracking");
    }

    #[test]
    fn a_partner_the_journal_still_holds_gets_a_resync_from_its_own_position_before_through() {
        for at in [10, 15, 19] {
            let resync = resync_from(tracked(), &peer_at(at, 3), true).expect("fits");
            assert_eq!((resync.from_seq, resync.from_chain, resync.through), (at, [3; 32], 20));
        }
        // At or past `through` the journal has everything it lacks: it streams.
        assert_eq!(resync_from(tracked(), &peer_at(20, 3), true), None);
        assert_eq!(resync_from(tracked(), &peer_at(25, 3), true), None);
        assert_eq!(resync_from(tracked(), &peer_at(9, 3), true), None, "before tracking");
    }
}
