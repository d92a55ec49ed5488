//! The primary's side of one group's stream: where to resume, when to cut a batch, how much may
//! be in flight, and what an ack means. Time is an input; no clock is read.

use std::collections::VecDeque;
use std::time::Duration;

use tidemark_journal::{ChainHash, Seq};

use crate::wire::{GroupPosition, BATCH_RAW_BYTES_MAX};

/// Limits of a sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SenderConfig {
    /// A batch is cut once this many unsent bytes wait (at most [`BATCH_RAW_BYTES_MAX`]).
    pub batch_bytes_max: u64,
    /// A batch is cut once the oldest unsent record has waited this long.
    pub batch_delay: Duration,
    /// Most uncompressed bytes sent and not yet acknowledged.
    pub inflight_bytes_max: u64,
    /// Most batches sent and not yet acknowledged.
    pub inflight_batches_max: usize,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            batch_bytes_max: 4 << 20,
            batch_delay: Duration::from_millis(20),
            inflight_bytes_max: 64 << 20,
            inflight_batches_max: 32,
        }
    }
}

/// Where the sender stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SenderState {
    /// Waiting for the receiver's position.
    Connecting,
    /// Shipping records.
    Streaming,
    /// The receiver is behind what the journal still holds: it needs a baseline.
    NeedsBaseline,
    /// The histories differ: the group stops; nothing is overwritten.
    Diverged(String),
    /// The receiver knows a newer generation: this site is not the primary any more.
    Fenced {
        /// The generation the receiver knows.
        theirs: u64,
    },
}

/// What the journal has that is not yet sent, as the caller measures it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    /// Newest seq in the journal.
    pub last_seq: Seq,
    /// Bytes of records after the last sent one.
    pub unsent_bytes: u64,
    /// When the oldest unsent record was appended (on the sender's time line).
    pub oldest_unsent_at: Option<Duration>,
}

/// A batch the sender decided to cut: records from `from`, up to `bytes_max` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchPlan {
    /// First seq to include.
    pub from: Seq,
    /// Most uncompressed bytes to include (at least one record is always included).
    pub bytes_max: u64,
}

/// Why the sender refused something the receiver said.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SenderError {
    /// The message is about another group.
    #[error("message for group {theirs:#x} on the stream of group {ours:#x}")]
    WrongGroup {
        /// Our group id.
        ours: u64,
        /// The id received.
        theirs: u64,
    },
    /// An ack for records never sent: the receiver is confused or hostile.
    #[error("ack for seq {acked} but only up to seq {sent} was sent")]
    AckBeyondSent {
        /// The acked seq.
        acked: u64,
        /// The newest seq sent.
        sent: u64,
    },
    /// The receiver's generation is newer than ours: stop sending (fencing).
    #[error(
        "the partner knows generation {theirs}, newer than ours ({ours}); this site is no longer primary"
    )]
    Fenced {
        /// Our generation.
        ours: u64,
        /// Theirs.
        theirs: u64,
    },
    /// The histories differ at the receiver's position.
    #[error("diverged: {0}")]
    Diverged(String),
}

#[derive(Clone, Copy, Debug)]
struct Flight {
    last: Seq,
    raw_bytes: u64,
    sent_at: Duration,
}

/// The sending side of one group.
#[derive(Debug)]
pub struct Sender {
    group_id: u64,
    generation: u64,
    config: SenderConfig,
    state: SenderState,
    acked: Seq,
    next: Seq,
    inflight: VecDeque<Flight>,
}

impl Sender {
    /// A sender for `group_id` under `generation`, whose receiver is known to hold `acked`.
    pub fn new(group_id: u64, generation: u64, acked: Seq, config: SenderConfig) -> Sender {
        let config =
            SenderConfig { batch_bytes_max: config.batch_bytes_max.min(BATCH_RAW_BYTES_MAX), ..config };
        Sender {
            group_id,
            generation,
            config,
            state: SenderState::Connecting,
            acked,
            next: Seq(acked.0 + 1),
            inflight: VecDeque::new(),
        }
    }

    /// Current state.
    pub fn state(&self) -> &SenderState {
        &self.state
    }

    /// Newest seq durable at the receiver.
    pub fn acked(&self) -> Seq {
        self.acked
    }

    /// First seq not yet sent.
    pub fn next(&self) -> Seq {
        self.next
    }

    /// Uncompressed bytes sent and not acknowledged.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight.iter().map(|f| f.raw_bytes).sum()
    }

    /// The receiver's position arrived: decide where to resume. `chain_at(seq)` is our chain
    /// after `seq` (`None` when our journal no longer holds it); `first_seq` is our oldest held
    /// seq; `last_seq` our newest.
    pub fn on_position(
        &mut self,
        peer: &GroupPosition,
        first_seq: Seq,
        last_seq: Seq,
        chain_at: impl FnOnce(Seq) -> Option<ChainHash>,
    ) -> Result<Seq, SenderError> {
        if peer.group_id != self.group_id {
            return Err(SenderError::WrongGroup { ours: self.group_id, theirs: peer.group_id });
        }
        if peer.generation > self.generation {
            self.state = SenderState::Fenced { theirs: peer.generation };
            return Err(SenderError::Fenced { ours: self.generation, theirs: peer.generation });
        }
        if peer.last_seq > last_seq {
            let reason =
                format!("the partner holds seq {} but this site's newest is {}", peer.last_seq.0, last_seq.0);
            self.state = SenderState::Diverged(reason.clone());
            return Err(SenderError::Diverged(reason));
        }
        self.acked = peer.durable_seq.min(peer.last_seq);
        self.next = Seq(peer.last_seq.0 + 1);
        self.inflight.clear();
        if self.next < first_seq {
            // Our journal no longer reaches back to where the receiver is.
            self.state = SenderState::NeedsBaseline;
            return Ok(self.next);
        }
        match chain_at(peer.last_seq) {
            Some(chain) if chain == peer.chain => {}
            Some(_) => {
                let reason = format!("chain hashes differ at seq {}", peer.last_seq.0);
                self.state = SenderState::Diverged(reason.clone());
                return Err(SenderError::Diverged(reason));
            }
            None => {
                self.state = SenderState::NeedsBaseline;
                return Ok(self.next);
            }
        }
        self.state = SenderState::Streaming;
        Ok(self.next)
    }

    /// Should a batch be cut now? Returns what to read from the journal.
    pub fn plan(&self, now: Duration, pending: Pending) -> Option<BatchPlan> {
        if self.state != SenderState::Streaming || self.next > pending.last_seq {
            return None;
        }
        let inflight = self.inflight_bytes();
        if self.inflight.len() >= self.config.inflight_batches_max
            || inflight >= self.config.inflight_bytes_max
        {
            return None;
        }
        let full = pending.unsent_bytes >= self.config.batch_bytes_max;
        let due = pending.oldest_unsent_at.is_some_and(|t| now.saturating_sub(t) >= self.config.batch_delay);
        // With nothing in flight the link is idle: waiting longer only adds to the RPO.
        let idle = self.inflight.is_empty();
        if !(full || due || idle) {
            return None;
        }
        let room = self.config.inflight_bytes_max - inflight;
        Some(BatchPlan { from: self.next, bytes_max: self.config.batch_bytes_max.min(room).max(1) })
    }

    /// A batch `first..=last` of `raw_bytes` went out at `now`.
    pub fn on_sent(&mut self, first: Seq, last: Seq, raw_bytes: u64, now: Duration) {
        assert_eq!(first, self.next, "batches must be sent in order without gaps");
        assert!(last >= first, "a batch holds at least one record");
        self.inflight.push_back(Flight { last, raw_bytes, sent_at: now });
        self.next = Seq(last.0 + 1);
    }

    /// An ack arrived. Returns the send-to-ack latency of the newest batch it completes.
    pub fn on_ack(
        &mut self,
        generation: u64,
        seq: Seq,
        now: Duration,
    ) -> Result<Option<Duration>, SenderError> {
        if generation > self.generation {
            self.state = SenderState::Fenced { theirs: generation };
            return Err(SenderError::Fenced { ours: self.generation, theirs: generation });
        }
        if seq <= self.acked {
            return Ok(None); // a duplicate or late ack: nothing new
        }
        let sent = Seq(self.next.0 - 1);
        if seq > sent {
            return Err(SenderError::AckBeyondSent { acked: seq.0, sent: sent.0 });
        }
        let mut latency = None;
        while self.inflight.front().is_some_and(|f| f.last <= seq) {
            if let Some(f) = self.inflight.pop_front() {
                latency = Some(now.saturating_sub(f.sent_at));
            }
        }
        self.acked = seq;
        Ok(latency)
    }

    /// The connection dropped: everything unacknowledged will be sent again.
    pub fn on_disconnect(&mut self) {
        self.inflight.clear();
        self.next = Seq(self.acked.0 + 1);
        if self.state == SenderState::Streaming || self.state == SenderState::NeedsBaseline {
            self.state = SenderState::Connecting;
        }
    }
}
