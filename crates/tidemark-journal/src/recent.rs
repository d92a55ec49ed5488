//! The newest records a journal appended, kept in memory for its replication sender.
//!
//! A sender ships records moments after they are appended. Reading them back from the segment
//! files costs a copy out of the page cache and a second blake3 over every payload (a record read
//! from a file is verified before it is shipped); the same bytes are still in memory, encoded and
//! checksummed by the append that wrote them. So a journal keeps its newest records here, at
//! most [`RECENT_BYTES`] (and one spare run's buffer), and its reader serves a batch from them
//! when they hold its first seq.
//!
//! Only records whose write to the segment succeeded enter, so what is served is exactly what
//! the file holds, as written. Nothing is kept until a reader asks (a group that is not
//! replicated pays nothing), and the records are dropped again once appends run far ahead of
//! the reads (the sender stopped).

use std::collections::VecDeque;

use parking_lot::Mutex;

use crate::{Location, Seq};

/// Most bytes of records kept per journal.
pub const RECENT_BYTES: u64 = 16 << 20;

/// Bytes of one run: records are kept in runs of about this size, the oldest run dropped first.
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
    /// Contiguous runs of records, oldest first; each run's records are contiguous in seq and in
    /// one segment.
    runs: VecDeque<Run>,
    /// Bytes in `runs`.
    bytes: u64,
    /// Bytes appended since the last read.
    unread: u64,
    /// The buffer of the run dropped last, for the next run: a fresh buffer would cost a page
    /// fault (and the kernel zeroing the page) every few records.
    spare: Option<Vec<u8>>,
}

/// Records with consecutive seqs, back to back in one segment.
struct Run {
    /// Seq of the first record.
    first: Seq,
    /// Where the first record starts.
    start: Location,
    /// The records, as written.
    bytes: Vec<u8>,
    /// Where each record ends in `bytes`.
    ends: Vec<usize>,
}

impl Run {
    fn next_seq(&self) -> Seq {
        Seq(self.first.0 + self.ends.len() as u64)
    }

    /// Whether record `seq` at `at` continues this run.
    fn continued_by(&self, seq: Seq, at: Location) -> bool {
        seq == self.next_seq()
            && at.segment == self.start.segment
            && at.offset == self.start.offset + self.bytes.len() as u64
    }
}

/// Records served from memory: whole records, concatenated, from seq `first` to `last`.
pub(crate) struct Served {
    /// The records' bytes.
    pub bytes: Vec<u8>,
    /// Seq of the last record (`first` - 1 when none was served).
    pub last: Seq,
    /// Where the record after `last` starts (or would start in `last`'s segment).
    pub next: Location,
}

impl Recent {
    /// Keep record `seq`, `record` as written at `at` (its segment file holds it now).
    pub(crate) fn push(&self, seq: Seq, at: Location, record: &[u8]) {
        let mut inner = self.inner.lock();
        if !inner.keeping {
            return;
        }
        inner.unread += record.len() as u64;
        if inner.unread > IDLE_BYTES {
            // Nobody reads: let the memory go until somebody does.
            *inner = Inner::default();
            return;
        }
        let fits = |run: &Run| run.continued_by(seq, at) && run.bytes.len() + record.len() <= RUN_BYTES;
        match inner.runs.back_mut() {
            Some(run) if fits(run) => {
                run.bytes.extend_from_slice(record);
                run.ends.push(run.bytes.len());
            }
            _ => {
                let mut bytes = inner.spare.take().unwrap_or_default();
                bytes.clear();
                bytes.reserve(RUN_BYTES.max(record.len()));
                bytes.extend_from_slice(record);
                inner.runs.push_back(Run { first: seq, start: at, bytes, ends: vec![record.len()] });
            }
        }
        inner.bytes += record.len() as u64;
        while inner.bytes > RECENT_BYTES {
            let Some(oldest) = inner.runs.pop_front() else { break };
            inner.bytes -= oldest.bytes.len() as u64;
            inner.spare = Some(oldest.bytes);
        }
    }

    /// Records from seq `first` up to seq `upto`, stopping before `bytes_max` would be passed
    /// (one record is always served); `None` when `first` is not held. Starts keeping records
    /// if it was not.
    pub(crate) fn read(&self, first: Seq, upto: Seq, bytes_max: u64) -> Option<Served> {
        let mut inner = self.inner.lock();
        inner.keeping = true;
        inner.unread = 0;
        let at = inner.runs.iter().position(|run| run.first <= first && first < run.next_seq())?;
        // Sized once: growing it as records are copied in would copy them again.
        let bytes = Vec::with_capacity(inner.bytes.min(bytes_max) as usize);
        let mut served = Served { bytes, last: Seq(first.0.saturating_sub(1)), next: Location::default() };
        let mut seq = first;
        for run in inner.runs.range(at..) {
            if run.first != seq && served.last >= first {
                break; // a gap: what follows is read from the files
            }
            let skip = (seq.0 - run.first.0) as usize;
            let begin = skip.checked_sub(1).and_then(|i| run.ends.get(i)).copied().unwrap_or(0);
            let mut end = begin;
            for &record_end in run.ends.iter().skip(skip) {
                let taken = served.bytes.len() + end - begin;
                let too_big = taken > 0 && (served.bytes.len() + record_end - begin) as u64 > bytes_max;
                if seq > upto || too_big {
                    break;
                }
                end = record_end;
                served.last = seq;
                seq = Seq(seq.0 + 1);
                if (served.bytes.len() + end - begin) as u64 >= bytes_max {
                    break;
                }
            }
            served.bytes.extend_from_slice(run.bytes.get(begin..end).unwrap_or_default());
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
            recent.push(Seq(seq), Location { segment: 0, offset }, &bytes);
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
        recent.push(Seq(4), Location { segment: 0, offset: 9000 }, &bytes);
        let served = recent.read(Seq(4), Seq(4), u64::MAX).expect("held");
        assert_eq!(served.bytes, bytes);
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
        assert_eq!(served.bytes, all[2..6].concat());
        assert_eq!(served.last, Seq(6));
        assert_eq!(served.next.offset, 128 + 6 * len as u64);
        // Up to a size, never splitting a record; one record always.
        let served = recent.read(Seq(2), Seq(10), 3 * len as u64 + 10).expect("held");
        assert_eq!((served.bytes.len(), served.last), (3 * len, Seq(4)));
        let served = recent.read(Seq(2), Seq(10), 1).expect("held");
        assert_eq!((served.bytes, served.last), (all[1].clone(), Seq(2)));
        // Nothing past the newest record, nothing before `first` when upto is behind it.
        let served = recent.read(Seq(10), Seq(20), u64::MAX).expect("held");
        assert_eq!((served.bytes, served.last), (all[9].clone(), Seq(10)));
        let served = recent.read(Seq(5), Seq(4), u64::MAX).expect("held");
        assert_eq!((served.bytes.len(), served.last), (0, Seq(4)));
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
        assert_eq!(served.bytes, all.concat());
        assert_eq!(served.last, Seq(n));
        // A record that does not continue the newest run (another segment) starts a new run;
        // one with a gap in seqs is served on its own, never joined to what precedes it.
        let (late, _) = encoded(n + 2, &genesis_chain(1));
        recent.push(Seq(n + 2), Location { segment: 1, offset: 128 }, &late);
        let served = recent.read(Seq(n), Seq(n + 2), u64::MAX).expect("held");
        assert_eq!(served.last, Seq(n));
        assert!(recent.read(Seq(n + 1), Seq(n + 2), u64::MAX).is_none());
        let served = recent.read(Seq(n + 2), Seq(n + 2), u64::MAX).expect("held");
        assert_eq!(
            (served.bytes, served.next),
            (late.clone(), Location { segment: 1, offset: 128 + late.len() as u64 })
        );
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
