//! The newest records a journal appended, kept in memory for its replication sender.
//!
//! A sender ships records moments after they are appended. Reading them back from the segment
//! files costs a copy out of the page cache and a second blake3 over every payload (a record read
//! from a file is verified before it is shipped); the same bytes are still in memory, encoded and
//! checksummed by the append that wrote them. So a journal keeps its newest records here, at
//! most [`RECENT_BYTES`], and its reader serves a batch from them when they hold its first seq.
//!
//! A batch is served without copying: records are appended to an open buffer, and a read seals
//! what it may take of it (records up to the seq it reads to) into a shared, immutable run, so
//! the reader gets reference-counted slices of the runs that the appends never touch again.
//!
//! Only records whose write to the segment succeeded enter, so what is served is exactly what
//! the file holds, as written. Nothing is kept until a reader asks (a group that is not
//! replicated pays nothing), and the records are dropped again once appends run far ahead of
//! the reads (the sender stopped).

use std::collections::VecDeque;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;

use crate::{Location, Seq};

/// Most bytes of records kept per journal.
pub const RECENT_BYTES: u64 = 16 << 20;

/// Bytes of one buffer: records are appended into buffers of about this size (a bigger record
/// gets one of its own), and runs are sealed out of them.
const RUN_BYTES: usize = 1 << 20;

/// Appended bytes without a read after which the records are dropped and no more are kept
/// until the next read.
const IDLE_BYTES: u64 = 4 * RECENT_BYTES;

/// See the module documentation. Shared by a journal (which appends under its owner's lock) and
/// its readers (which read without it).
#[derive(Default)]
pub struct Recent {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Whether records are being kept (a reader asked since the last idle spell).
    keeping: bool,
    /// Sealed runs of records, oldest first; each run's records are contiguous in seq and in
    /// one segment.
    runs: VecDeque<Run<Bytes>>,
    /// The records appended since the last seal, after the newest run; its buffer's spare
    /// capacity takes the next records.
    open: Option<Run<BytesMut>>,
    /// Bytes of records in `runs` and `open`.
    bytes: u64,
    /// Bytes appended since the last read.
    unread: u64,
    /// A dropped run's buffer, for the next one: a fresh buffer would cost a page fault (and the
    /// kernel zeroing the page) every few records.
    spare: Option<BytesMut>,
}

/// Records with consecutive seqs, back to back in one segment: sealed (`Bytes`, shared with
/// readers) or open (`BytesMut`, appended to).
struct Run<B> {
    /// Seq of the first record.
    first: Seq,
    /// Where the first record starts.
    start: Location,
    /// The records, as written.
    bytes: B,
    /// Where each record ends in `bytes`.
    ends: Vec<usize>,
}

impl<B: AsRef<[u8]>> Run<B> {
    fn next_seq(&self) -> Seq {
        Seq(self.first.0 + self.ends.len() as u64)
    }

    fn holds(&self, seq: Seq) -> bool {
        self.first <= seq && seq < self.next_seq()
    }

    /// Whether record `seq` at `at` continues this run.
    fn continued_by(&self, seq: Seq, at: Location) -> bool {
        seq == self.next_seq()
            && at.segment == self.start.segment
            && at.offset == self.start.offset + self.bytes.as_ref().len() as u64
    }
}

/// Records served from memory: whole records, in pieces that are back to back in the journal,
/// from seq `first` to `last`.
pub(crate) struct Served {
    /// The records' bytes, in order; each piece holds whole records.
    pub pieces: Vec<Bytes>,
    /// Seq of the last record (`first` - 1 when none was served).
    pub last: Seq,
    /// Where the record after `last` starts (or would start in `last`'s segment).
    pub next: Location,
}

impl Inner {
    /// Seal the open run's records up to seq `upto` (all of them when it holds no later one)
    /// into a run of their own; the later ones stay open, in the rest of the same buffer.
    fn seal(&mut self, upto: Seq) {
        let Some(open) = self.open.as_mut() else { return };
        let count =
            (upto.0.saturating_add(1)).saturating_sub(open.first.0).min(open.ends.len() as u64) as usize;
        let Some(&end) = count.checked_sub(1).and_then(|i| open.ends.get(i)) else { return };
        let ends: Vec<usize> = open.ends.drain(..count).collect();
        for e in &mut open.ends {
            *e -= end;
        }
        let sealed =
            Run { first: open.first, start: open.start, bytes: open.bytes.split_to(end).freeze(), ends };
        open.first = sealed.next_seq();
        open.start.offset += end as u64;
        self.runs.push_back(sealed);
    }

    /// Drop the oldest runs until at most [`RECENT_BYTES`] are kept.
    fn evict(&mut self) {
        while self.bytes > RECENT_BYTES {
            let Some(oldest) = self.runs.pop_front() else { break };
            self.bytes -= oldest.bytes.len() as u64;
            // The last reference to its buffer (no reader holds a piece, and nothing else of it
            // is kept) can take the next records.
            if let Ok(buffer) = oldest.bytes.try_into_mut() {
                self.spare = Some(buffer);
            }
        }
    }
}

impl Recent {
    /// Keep record `seq`, written at `at` as `parts` one after another (its segment file holds
    /// it now).
    pub(crate) fn push(&self, seq: Seq, at: Location, parts: &[&[u8]]) {
        let mut inner = self.inner.lock();
        if !inner.keeping {
            return;
        }
        let len: usize = parts.iter().map(|p| p.len()).sum();
        inner.unread += len as u64;
        if inner.unread > IDLE_BYTES {
            // Nobody reads: let the memory go until somebody does.
            *inner = Inner::default();
            return;
        }
        let fits = |open: &Run<BytesMut>| {
            open.continued_by(seq, at) && open.bytes.capacity() - open.bytes.len() >= len
        };
        match inner.open.as_mut() {
            Some(open) if fits(open) => {
                parts.iter().for_each(|p| open.bytes.extend_from_slice(p));
                open.ends.push(open.bytes.len());
            }
            _ => {
                // Seal what is open; the rest of its buffer, if the record fits there, or else a
                // new buffer (never a grown one: growing would copy the records) takes it.
                inner.seal(Seq(u64::MAX));
                let rest = inner.open.take().map(|open| open.bytes);
                let mut bytes = match rest {
                    Some(rest) if rest.capacity() >= len => rest,
                    _ => {
                        let mut spare = inner.spare.take().unwrap_or_default();
                        spare.clear();
                        spare.reserve(RUN_BYTES.max(len));
                        spare
                    }
                };
                parts.iter().for_each(|p| bytes.extend_from_slice(p));
                inner.open = Some(Run { first: seq, start: at, bytes, ends: vec![len] });
            }
        }
        inner.bytes += len as u64;
        inner.evict();
    }

    /// Records from seq `first` up to seq `upto`, stopping before `bytes_max` would be passed
    /// (one record is always served); `None` when `first` is not held. Starts keeping records
    /// if it was not.
    pub(crate) fn read(&self, first: Seq, upto: Seq, bytes_max: u64) -> Option<Served> {
        let mut inner = self.inner.lock();
        inner.keeping = true;
        inner.unread = 0;
        inner.seal(upto);
        let mut served =
            Served { pieces: Vec::new(), last: Seq(first.0.saturating_sub(1)), next: Location::default() };
        let Some(at) = inner.runs.iter().position(|run| run.holds(first)) else {
            // Only records after `upto` are still open: nothing to serve yet, from memory.
            return inner.open.as_ref().filter(|open| open.holds(first)).map(|_| served);
        };
        let mut taken = 0usize;
        let mut seq = first;
        for run in inner.runs.range(at..) {
            if run.first != seq && served.last >= first {
                break; // a gap: what follows is read from the files
            }
            let skip = (seq.0 - run.first.0) as usize;
            let begin = skip.checked_sub(1).and_then(|i| run.ends.get(i)).copied().unwrap_or(0);
            let mut end = begin;
            for &record_end in run.ends.iter().skip(skip) {
                let too_big = taken + end - begin > 0 && (taken + record_end - begin) as u64 > bytes_max;
                if seq > upto || too_big {
                    break;
                }
                end = record_end;
                served.last = seq;
                seq = Seq(seq.0 + 1);
                if (taken + end - begin) as u64 >= bytes_max {
                    break;
                }
            }
            if end > begin {
                served.pieces.push(run.bytes.slice(begin..end));
                taken += end - begin;
            }
            served.next = Location { segment: run.start.segment, offset: run.start.offset + end as u64 };
            if seq != run.next_seq() {
                break; // stopped inside this run
            }
        }
        Some(served)
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // Tests index freely; the lint guards the library code.
mod tests {
    use super::*;
    use crate::record::{self, RecordHeader, RecordMeta, HEADER_BYTES};
    use crate::{genesis_chain, ChainHash, Generation, RecordBody, UnixNanos, VolumeId};

    fn joined(served: &Served) -> Vec<u8> {
        served.pieces.concat()
    }

    /// The total length of the record whose encoding starts `bytes`.
    fn record_len(bytes: &[u8]) -> usize {
        let head: &[u8; HEADER_BYTES] = bytes[..HEADER_BYTES].try_into().expect("a header");
        RecordHeader::decode(head).expect("a record").total_len as usize
    }

    fn encoded(seq: u64, chain: &ChainHash) -> (Vec<u8>, ChainHash) {
        let meta =
            RecordMeta { seq: Seq(seq), generation: Generation(1), time: UnixNanos(seq), durable: Seq(0) };
        let body =
            RecordBody::Write { volume: VolumeId(0), offset: seq * 4096, data: vec![seq as u8; 3000].into() };
        let mut out = Vec::new();
        let next = record::encode(meta, &body, chain, &mut out);
        (out, next)
    }

    /// Seqs 1..=n pushed back to back in segment 0 from offset 128, with their bytes.
    fn filled(recent: &Recent, n: u64) -> Vec<Vec<u8>> {
        let mut chain = genesis_chain(1);
        let mut offset = 128;
        let mut all = Vec::new();
        for seq in 1..=n {
            let (bytes, next) = encoded(seq, &chain);
            recent.push(Seq(seq), Location { segment: 0, offset }, &[&bytes]);
            offset += bytes.len() as u64;
            chain = next;
            all.push(bytes);
        }
        all
    }

    #[test]
    fn nothing_is_kept_until_a_reader_asks() {
        let recent = Recent::default();
        filled(&recent, 3);
        assert!(recent.read(Seq(1), Seq(3), u64::MAX).is_none());
        // The read started keeping; the records appended since are served.
        let (bytes, _) = encoded(4, &genesis_chain(1));
        recent.push(Seq(4), Location { segment: 0, offset: 9000 }, &[&bytes]);
        let served = recent.read(Seq(4), Seq(4), u64::MAX).expect("held");
        assert_eq!(joined(&served), bytes);
        assert_eq!(served.last, Seq(4));
        assert_eq!(served.next, Location { segment: 0, offset: 9000 + bytes.len() as u64 });
    }

    #[test]
    fn a_read_serves_whole_records_up_to_its_seq_and_size() {
        let recent = Recent::default();
        assert!(recent.read(Seq(1), Seq(1), 1).is_none());
        let all = filled(&recent, 10);
        let len = all[0].len();
        assert!(all.iter().all(|r| r.len() == len && record_len(r) == len));

        // Up to a seq.
        let served = recent.read(Seq(3), Seq(6), u64::MAX).expect("held");
        assert_eq!(joined(&served), all[2..6].concat());
        assert_eq!(served.last, Seq(6));
        assert_eq!(served.next.offset, 128 + 6 * len as u64);
        // Up to a size, never splitting a record; one record always.
        let served = recent.read(Seq(2), Seq(10), 3 * len as u64 + 10).expect("held");
        assert_eq!((joined(&served).len(), served.last), (3 * len, Seq(4)));
        let served = recent.read(Seq(2), Seq(10), 1).expect("held");
        assert_eq!((joined(&served), served.last), (all[1].clone(), Seq(2)));
        // Nothing past the newest record, nothing before `first` when upto is behind it.
        let served = recent.read(Seq(10), Seq(20), u64::MAX).expect("held");
        assert_eq!((joined(&served), served.last), (all[9].clone(), Seq(10)));
        let served = recent.read(Seq(5), Seq(4), u64::MAX).expect("held");
        assert_eq!((joined(&served).len(), served.last), (0, Seq(4)));
        assert!(recent.read(Seq(11), Seq(11), u64::MAX).is_none());
    }

    #[test]
    fn a_read_crosses_runs_and_stops_at_a_gap() {
        let recent = Recent::default();
        recent.read(Seq(1), Seq(1), 1);
        // More than a run's worth, so the records span several runs.
        let n = (RUN_BYTES / 3000 * 3) as u64;
        let all = filled(&recent, n);
        let served = recent.read(Seq(1), Seq(n), u64::MAX).expect("held");
        assert_eq!(joined(&served), all.concat());
        assert_eq!(served.last, Seq(n));
        // A record that does not continue the newest run (another segment) starts a new run;
        // one with a gap in seqs is served on its own, never joined to what precedes it.
        let (late, _) = encoded(n + 2, &genesis_chain(1));
        recent.push(Seq(n + 2), Location { segment: 1, offset: 128 }, &[&late]);
        let served = recent.read(Seq(n), Seq(n + 2), u64::MAX).expect("held");
        assert_eq!(served.last, Seq(n));
        assert!(recent.read(Seq(n + 1), Seq(n + 2), u64::MAX).is_none());
        let served = recent.read(Seq(n + 2), Seq(n + 2), u64::MAX).expect("held");
        assert_eq!(
            (joined(&served), served.next),
            (late.clone(), Location { segment: 1, offset: 128 + late.len() as u64 })
        );
    }

    #[test]
    fn a_read_shares_the_records_instead_of_copying_them() {
        let recent = Recent::default();
        recent.read(Seq(1), Seq(1), 1);
        let all = filled(&recent, 10);
        // A read seals the records it may take; the later ones stay open and keep being
        // appended to, in the same buffer.
        let first = recent.read(Seq(1), Seq(4), u64::MAX).expect("held");
        assert_eq!((joined(&first), first.pieces.len()), (all[..4].concat(), 1));
        let again = recent.read(Seq(3), Seq(4), u64::MAX).expect("held");
        assert_eq!(again.pieces[0].as_ptr(), first.pieces[0][all[0].len() * 2..].as_ptr(), "not a copy");
        let (more, _) = encoded(11, &genesis_chain(1));
        let len = all[0].len() as u64;
        recent.push(Seq(11), Location { segment: 0, offset: 128 + 10 * len }, &[&more]);
        let rest = recent.read(Seq(5), Seq(11), u64::MAX).expect("held");
        assert_eq!(joined(&rest), [all[4..].concat(), more].concat());
        assert_eq!(rest.pieces.len(), 1, "records 5 to 11 are one sealed run");
        assert_eq!(rest.pieces[0].as_ptr(), first.pieces[0][first.pieces[0].len()..].as_ptr());
        // Nothing up to `upto` yet: served empty from memory, not looked for in the files.
        let (late, _) = encoded(12, &genesis_chain(1));
        recent.push(Seq(12), Location { segment: 0, offset: 128 + 11 * len }, &[&late]);
        let none = recent.read(Seq(12), Seq(11), u64::MAX).expect("held");
        assert_eq!((none.pieces.len(), none.last), (0, Seq(11)));
    }

    #[test]
    fn memory_is_bounded_and_let_go_when_nobody_reads() {
        let recent = Recent::default();
        recent.read(Seq(1), Seq(1), 1);
        let per_run = (RUN_BYTES / 3000) as u64;
        let n = RECENT_BYTES / 3000 + 2 * per_run;
        filled(&recent, n);
        assert!(recent.inner.lock().bytes <= RECENT_BYTES);
        assert!(recent.read(Seq(1), Seq(1), 1).is_none(), "the oldest records were dropped");
        assert!(recent.read(Seq(n), Seq(n), 1).is_some());
        // Appends far past the last read: everything goes, and nothing is kept until a read.
        filled(&recent, IDLE_BYTES / 3000 + 1);
        assert_eq!(recent.inner.lock().bytes, 0);
        assert!(!recent.inner.lock().keeping);
    }
}
