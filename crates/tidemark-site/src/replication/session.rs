//! One group's replication over one stream: the primary's session ships durable records and
//! takes acks; the secondary's session checks batches, appends them, syncs and acks.
//!
//! Sessions speak in frames over a pair of channels, so the QUIC transport is only a pump and
//! tests can join two sessions directly. The protocol decisions are `tidemark-repl`'s; this is
//! the async shell that feeds it bytes and time and does the blocking engine calls.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tidemark_engine::group::{Group, Position};
use tidemark_engine::{Engine, EngineError, GroupOptions};
use tidemark_journal::{Location, Seq};
use tidemark_repl::{
    BatchFrame, GroupPosition, Message, Pending, Receiver, Sender, SenderConfig, SenderState,
};
use tokio::sync::{mpsc, watch};

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
    /// Latency from sending a batch to its ack, newest, in microseconds.
    pub ack_latency_micros: AtomicU64,
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
        }
    }

    fn set_state(&self, state: ReplState) {
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
    /// The partner is behind the journal and needs a baseline, which this build cannot send yet.
    #[error("the partner needs a baseline from seq {0}; baseline transfer is not built yet")]
    NeedsBaseline(u64),
    /// An engine call failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking engine call panicked")
}

async fn send(ch: &Channel, msg: &Message) -> Result<(), SessionError> {
    ch.tx.send(msg.encode()).await.map_err(|_| SessionError::Closed)
}

async fn recv(ch: &mut Channel, timeout: Option<Duration>) -> Result<Message, SessionError> {
    let frame = match timeout {
        Some(t) => tokio::time::timeout(t, ch.rx.recv()).await.map_err(|_| SessionError::Timeout(t))?,
        None => ch.rx.recv().await,
    }
    .ok_or(SessionError::Closed)?;
    Message::decode(&frame).map_err(|e| SessionError::Protocol(e.to_string()))
}

fn to_wire(p: &Position) -> GroupPosition {
    GroupPosition {
        group_id: p.group_id,
        generation: p.generation,
        last_seq: p.last_seq,
        chain: p.chain,
        durable_seq: p.durable_seq,
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
) -> Result<(), SessionError> {
    let PrimaryContext { site, stats, config, hold, limiter } = context;
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
    let g = group.clone();
    let seq = peer.last_seq;
    let ours = blocking(move || g.chain_at(seq)).await?;
    let mut sender = Sender::new(group.id, position.generation, peer.durable_seq, config.sender);
    let resume = sender.on_position(&peer, position.first_seq, position.last_seq, |_| ours);
    match (resume, sender.state().clone()) {
        (Err(e), SenderState::Fenced { .. }) => {
            stats.set_state(ReplState::Fenced);
            return Err(SessionError::Fenced(e.to_string()));
        }
        (Err(e), _) => {
            stats.set_state(ReplState::Diverged);
            let _ = send(&ch, &Message::Refuse { group_id: group.id, reason: e.to_string() }).await;
            return Err(SessionError::Diverged(e.to_string()));
        }
        (Ok(next), SenderState::NeedsBaseline) => {
            stats.set_state(ReplState::Baseline);
            return Err(SessionError::NeedsBaseline(next.0));
        }
        (Ok(_), _) => {}
    }
    stats.acked_seq.store(sender.acked().0, Ordering::Release);
    hold(sender.acked());
    stats.set_state(ReplState::Streaming);
    // Where the next record to send starts, and where each sent batch ends (for lag in bytes).
    let mut cursor: Option<Location> = None;
    let mut flights: VecDeque<(Seq, Location)> = VecDeque::new();
    let mut last_flush = Instant::now();
    loop {
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
        {
            let from = match cursor {
                Some(c) => c,
                None => {
                    let (g, at) = (group.clone(), plan.from);
                    blocking(move || g.locate(at)).await?
                }
            };
            let (g, first, max) = (group.clone(), plan.from, plan.bytes_max);
            let level = config.zstd_level;
            let built = blocking(move || -> Result<_, EngineError> {
                let raw = g.read_for_shipping(from, first, max)?;
                if raw.bytes.is_empty() {
                    return Ok(None);
                }
                let frame = BatchFrame::build(g.id, g.generation(), raw.first, raw.last, &raw.bytes, level);
                Ok(Some((frame, raw.next, raw.bytes.len() as u64)))
            })
            .await?;
            let Some((frame, next, raw_bytes)) = built else { break };
            let (first, last) = (frame.first_seq, frame.last_seq);
            let compressed = frame.payload.len() as u64;
            if let Some(limiter) = &limiter {
                let wait = limiter.lock().wait_for(compressed);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
            }
            send(&ch, &Message::Batch(frame)).await?;
            sender.on_sent(first, last, raw_bytes, epoch.elapsed());
            flights.push_back((last, next));
            cursor = Some(next);
            stats.bytes_sent_total.fetch_add(raw_bytes, Ordering::Relaxed);
            stats.bytes_sent_compressed_total.fetch_add(compressed, Ordering::Relaxed);
            stats.batches_sent_total.fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            frame = ch.rx.recv() => {
                let frame = frame.ok_or(SessionError::Closed)?;
                match Message::decode(&frame).map_err(|e| SessionError::Protocol(e.to_string()))? {
                    Message::Ack { generation, durable_seq, .. } => {
                        let latency = sender
                            .on_ack(generation, durable_seq, epoch.elapsed())
                            .map_err(|e| SessionError::Protocol(e.to_string()))?;
                        if let Some(l) = latency {
                            stats.ack_latency_micros.store(l.as_micros() as u64, Ordering::Relaxed);
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
            _ = stop.changed() => return Ok(()),
        }
    }
}

/// Run the secondary's side of one stream: accept the partner's offer (creating the secondary
/// group on first contact), then append, sync and acknowledge batches. `stats_for` gives the
/// counters of a group by name.
///
/// # Cancel safety
/// Dropping the future between batches loses nothing: applied records are in the journal and
/// the next session resumes after them.
pub async fn run_secondary(
    engine: Arc<Engine>,
    site: String,
    mut ch: Channel,
    stats_for: impl Fn(&str) -> Arc<ReplStats>,
) -> Result<(), SessionError> {
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
    let (e, n) = (engine.clone(), name.clone());
    let group = blocking(move || match e.group_handle(&n) {
        Err(EngineError::NotFound { .. }) => {
            e.create_secondary_group(&n, offer.group_id, options, offer.generation)?;
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
        Ok(g) if g.role() != tidemark_engine::persist::Role::Secondary => {
            let reason = format!("group {name:?} is primary here; it will not take the partner's history");
            let _ = send(&ch, &Message::Refuse { group_id: offer.group_id, reason: reason.clone() }).await;
            return Err(SessionError::Refused(reason));
        }
        Ok(g) => g,
        Err(e) => {
            let _ = send(&ch, &Message::Refuse { group_id: offer.group_id, reason: e.to_string() }).await;
            return Err(e.into());
        }
    };
    let stats = stats_for(&name);
    stats.set_state(ReplState::Receiving);
    let g = group.clone();
    let position = blocking(move || g.position()).await;
    let mut receiver = Receiver::new(&to_wire(&position));
    send(&ch, &Message::Position(receiver.position())).await?;
    loop {
        let frame = ch.rx.recv().await.ok_or(SessionError::Closed)?;
        let batch = match Message::decode(&frame) {
            Ok(Message::Batch(b)) => b,
            Ok(other) => return Err(SessionError::Protocol(format!("unexpected {other:?} while receiving"))),
            Err(e) => {
                stats.frames_rejected_total.fetch_add(1, Ordering::Relaxed);
                return Err(SessionError::Protocol(e.to_string()));
            }
        };
        let records = match receiver.on_batch(&batch) {
            Ok(Some(records)) => records,
            Ok(None) => continue,
            Err(e) => {
                stats.frames_rejected_total.fetch_add(1, Ordering::Relaxed);
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
