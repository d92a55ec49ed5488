//! The secondary's side of one group's stream: which batches to accept, in what order, and what
//! to acknowledge. A batch is applied whole or not at all, after every check has passed.

use tidemark_journal::{ChainHash, GenerationStart, Seq, VerifiedRecord};

use crate::wire::{BatchFrame, GroupPosition, Message, WireError};

/// Why a batch was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReceiverError {
    /// The batch is for another group.
    #[error("batch for group {theirs:#x} on the stream of group {ours:#x}")]
    WrongGroup {
        /// Ours.
        ours: u64,
        /// Received.
        theirs: u64,
    },
    /// The sender's generation is older than one we know: a deposed primary (fencing).
    #[error("batch from generation {theirs}, older than generation {ours} known here")]
    StaleGeneration {
        /// Ours.
        ours: u64,
        /// Received.
        theirs: u64,
    },
    /// The batch does not start where our history ends.
    #[error("batch starts at seq {first} but seq {expected} is next here")]
    Gap {
        /// Its first seq.
        first: u64,
        /// Ours.
        expected: u64,
    },
    /// The frame failed its checks.
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// The receiving side of one group.
#[derive(Debug)]
pub struct Receiver {
    group_id: u64,
    generation: u64,
    /// Newest durable seq.
    durable: Seq,
    /// Next seq expected and the chain before it. Accepted records are in the store (appended,
    /// perhaps not yet durable), so a dropped connection changes neither; only a crash of this
    /// site does, and then the receiver is rebuilt from what the store recovered.
    next: Seq,
    chain: ChainHash,
    generations: Vec<GenerationStart>,
}

impl Receiver {
    /// A receiver for a store that holds `position`.
    pub fn new(position: &GroupPosition) -> Receiver {
        Receiver {
            group_id: position.group_id,
            generation: position.generation,
            durable: position.durable_seq.min(position.last_seq),
            next: Seq(position.last_seq.0 + 1),
            chain: position.chain,
            generations: position.generations.clone(),
        }
    }

    /// Where this copy stands, for the handshake.
    pub fn position(&self) -> GroupPosition {
        GroupPosition {
            group_id: self.group_id,
            generation: self.generation,
            last_seq: Seq(self.next.0 - 1),
            chain: self.chain,
            durable_seq: self.durable,
            generations: self.generations.clone(),
        }
    }

    /// Check a batch. `Ok(None)`: a duplicate of what is already here (ignore). `Ok(Some)`: the
    /// records to append, in order; the caller appends them, makes them durable, then calls
    /// [`Receiver::on_durable`].
    pub fn on_batch(&mut self, frame: &BatchFrame) -> Result<Option<Vec<VerifiedRecord>>, ReceiverError> {
        if frame.group_id != self.group_id {
            return Err(ReceiverError::WrongGroup { ours: self.group_id, theirs: frame.group_id });
        }
        if frame.generation < self.generation {
            return Err(ReceiverError::StaleGeneration { ours: self.generation, theirs: frame.generation });
        }
        if frame.last_seq < self.next {
            return Ok(None);
        }
        if frame.first_seq != self.next {
            return Err(ReceiverError::Gap { first: frame.first_seq.0, expected: self.next.0 });
        }
        let records = frame.open(&self.chain)?;
        if let Some(last) = records.last() {
            self.next = Seq(last.seq.0 + 1);
            self.chain = last.chain;
        }
        self.generation = frame.generation;
        Ok(Some(records))
    }

    /// Records through `seq` are durable here: the ack to send.
    pub fn on_durable(&mut self, seq: Seq) -> Message {
        assert!(seq < self.next, "only accepted records can become durable");
        self.durable = self.durable.max(seq);
        Message::Ack { group_id: self.group_id, generation: self.generation, durable_seq: self.durable }
    }
}
