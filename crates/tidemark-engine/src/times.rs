//! The source time of every record in the retention window, in 4 bytes per record.
//!
//! Times never decrease from one record to the next. They are kept in chunks: a chunk holds the
//! time of its first record and, for every record in it, a 32-bit nanosecond offset from that
//! time; a record more than ~4.29 s after its chunk began starts a new chunk. Times stay exact
//! to the nanosecond, so a point given as a time resolves to the same seq as before.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use tidemark_journal::{Seq, UnixNanos};

/// Most records in one chunk.
const CHUNK_MAX: usize = 4096;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Chunk {
    /// Seq of the chunk's first record.
    first_seq: u64,
    /// Time the offsets count from (the first record's time, until that record is dropped).
    base: u64,
    offsets: Vec<u32>,
}

impl Chunk {
    fn end_seq(&self) -> u64 {
        self.first_seq + self.offsets.len() as u64
    }

    fn time(&self, i: usize) -> Option<u64> {
        self.offsets.get(i).map(|&o| self.base + u64::from(o))
    }
}

/// Times of consecutive records, oldest first.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RecordTimes {
    chunks: VecDeque<Chunk>,
}

impl RecordTimes {
    /// True when no record's time is held.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Seq of the oldest record held.
    pub fn first_seq(&self) -> Option<Seq> {
        self.chunks.front().map(|c| Seq(c.first_seq))
    }

    /// Seq the next record must have (`None` when empty: any).
    pub fn next_seq(&self) -> Option<Seq> {
        self.chunks.back().map(|c| Seq(c.end_seq()))
    }

    /// Add the time of record `seq`, which must follow the newest one held.
    pub fn push(&mut self, seq: Seq, time: UnixNanos) {
        debug_assert!(self.next_seq().is_none_or(|n| n == seq), "records must be added in seq order");
        if let Some(chunk) = self.chunks.back_mut() {
            let offset = time.0.checked_sub(chunk.base).and_then(|o| u32::try_from(o).ok());
            if let Some(offset) =
                offset.filter(|_| chunk.offsets.len() < CHUNK_MAX && chunk.end_seq() == seq.0)
            {
                chunk.offsets.push(offset);
                return;
            }
            chunk.offsets.shrink_to_fit();
        }
        self.chunks.push_back(Chunk { first_seq: seq.0, base: time.0, offsets: vec![0] });
    }

    /// Time of record `seq`, if held.
    pub fn get(&self, seq: Seq) -> Option<UnixNanos> {
        let i = self.chunks.partition_point(|c| c.end_seq() <= seq.0);
        let chunk = self.chunks.get(i)?;
        let at = seq.0.checked_sub(chunk.first_seq)?;
        chunk.time(usize::try_from(at).ok()?).map(UnixNanos)
    }

    /// The newest record with time <= `t`, if any.
    pub fn last_at_or_before(&self, t: UnixNanos) -> Option<Seq> {
        // The last chunk that starts at or before `t`, then the last record in it.
        let i = self.chunks.partition_point(|c| c.time(0).is_some_and(|first| first <= t.0));
        let chunk = self.chunks.get(i.checked_sub(1)?)?;
        let n = chunk.offsets.partition_point(|&o| chunk.base + u64::from(o) <= t.0);
        Some(Seq(chunk.first_seq + n.checked_sub(1)? as u64))
    }

    /// Forget every record with seq <= `upto`.
    pub fn drop_through(&mut self, upto: Seq) {
        while let Some(chunk) = self.chunks.front_mut() {
            if chunk.end_seq() <= upto.0 + 1 {
                self.chunks.pop_front();
                continue;
            }
            if let Some(n) = (upto.0 + 1).checked_sub(chunk.first_seq).filter(|&n| n > 0) {
                chunk.offsets.drain(..n as usize);
                chunk.first_seq += n;
            }
            break;
        }
    }

    /// Bytes allocated for the times (chunks and their offsets).
    pub fn memory_bytes(&self) -> usize {
        self.chunks.iter().map(|c| std::mem::size_of::<Chunk>() + c.offsets.capacity() * 4).sum()
    }

    /// Number of records held.
    pub fn len(&self) -> u64 {
        self.chunks.iter().map(|c| c.offsets.len() as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn times_answer_as_a_plain_list_does(
            first in 1u64..1000,
            steps in proptest::collection::vec(prop_oneof![0u64..3, 0u64..2_000_000_000, 4_000_000_000u64..9_000_000_000], 0..6000),
            drops in proptest::collection::vec(0u64..7000, 0..4),
        ) {
            let mut times = RecordTimes::default();
            let mut plain: Vec<(u64, u64)> = Vec::new();
            let mut t = 1_700_000_000_000_000_000u64;
            for (i, step) in steps.iter().enumerate() {
                t += step;
                times.push(Seq(first + i as u64), UnixNanos(t));
                plain.push((first + i as u64, t));
            }
            for d in drops {
                let upto = first + d;
                times.drop_through(Seq(upto));
                plain.retain(|&(s, _)| s > upto);
                prop_assert_eq!(times.len(), plain.len() as u64);
                prop_assert_eq!(times.first_seq(), plain.first().map(|&(s, _)| Seq(s)));
                for &(s, t) in plain.iter().step_by(97) {
                    prop_assert_eq!(times.get(Seq(s)), Some(UnixNanos(t)));
                    let want = plain.iter().rev().find(|&&(_, x)| x <= t).map(|&(s, _)| Seq(s));
                    prop_assert_eq!(times.last_at_or_before(UnixNanos(t)), want);
                    prop_assert_eq!(times.last_at_or_before(UnixNanos(t - 1)), plain.iter().rev().find(|&&(_, x)| x < t).map(|&(s, _)| Seq(s)));
                }
                prop_assert_eq!(times.get(Seq(first.saturating_sub(1))), None);
            }
        }
    }
}
