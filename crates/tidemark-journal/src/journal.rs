//! A group's journal: a series of segment files appended in seq order, recovered at open.
//!
//! Crash safety rests on three rules (argued in docs/internals/journal.md):
//! 1. A record is appended whole after the previous one; nothing is ever overwritten.
//! 2. A new segment's header and directory entry are durable before any record goes into it.
//!    A sealed segment is synced by the next flush, together with the newest one (not when it
//!    is sealed: that fsync would stall every writer under the group lock).
//! 3. Recovery accepts a record only when its checksum, its seq (previous + 1) and its chain hash
//!    (from the previous record) all hold. The first failure is corruption only if a later
//!    record (in that segment or a later one) verifies and says it was written after the failed
//!    one was durable; otherwise it is an unsynced tail, cut there with every later segment.
//!    Corruption is reported with the segment and offset, and the journal refuses to open.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use crate::recent::Recent;
use crate::record::{
    self, DecodeError, RecordBody, RecordHeader, RecordMeta, VerifiedRecord, HEADER_BYTES, TRAILER_BYTES,
};
use crate::stats::JournalStats;
use crate::storage::{Storage, StorageFile};
use crate::{ChainHash, Generation, JournalError, Location, Record, Seq, UnixNanos, VolumeId};

/// Magic at the start of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"TDMKJSEG";
/// Segment format version.
pub const SEGMENT_VERSION: u32 = 1;
/// Bytes of a segment header; records start here.
pub const SEGMENT_HEADER_BYTES: u64 = 128;

/// Limits of one journal.
#[derive(Clone, Copy, Debug)]
pub struct JournalConfig {
    /// A new segment is started when a record would take a segment past this size.
    pub segment_bytes_max: u64,
}

impl Default for JournalConfig {
    fn default() -> Self {
        JournalConfig { segment_bytes_max: 64 << 20 }
    }
}

/// Where to resume scanning at open: the state just after a record the caller already knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResumePoint {
    /// Where the next record starts.
    pub location: Location,
    /// The seq the next record must have.
    pub next_seq: Seq,
    /// The chain hash after the last known record.
    pub chain: ChainHash,
}

/// What recovery found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Records scanned (after the resume point).
    pub records_scanned: u64,
    /// A torn tail that was cut off: (segment, offset, bytes discarded).
    pub torn_tail: Option<(u64, u64, u64)>,
}

/// A record just appended.
#[derive(Clone, Copy, Debug)]
pub struct Appended {
    /// Its seq.
    pub seq: Seq,
    /// Where it starts.
    pub location: Location,
    /// The chain hash after it.
    pub chain: ChainHash,
}

/// What [`Journal::append_replicas`] did: the records it appended, in order, and why it stopped
/// before the rest, if it did.
#[derive(Debug, Default)]
pub struct ReplicaAppend {
    /// The records appended, a prefix of those given.
    pub appended: Vec<Appended>,
    /// Why the next record was not appended; `None` when every one was.
    pub refused: Option<JournalError>,
}

/// What a flush must sync to make every record up to `upto` durable. Taken under the group's
/// lock, synced outside it, so one fdatasync covers every writer that came before (group commit).
pub struct SyncTicket {
    /// The newest segment's file.
    pub file: Arc<dyn StorageFile>,
    /// Sealed segments not yet synced, oldest first.
    sealed: Vec<Arc<dyn StorageFile>>,
    /// The newest seq the sync covers.
    pub upto: Seq,
    durable: Arc<AtomicU64>,
    /// The journal's counters: whoever times the sync records it here.
    pub stats: Arc<JournalStats>,
}

impl SyncTicket {
    /// fdatasync the sealed segments and the newest one; on success every record up to `upto`
    /// is durable, and records appended from now on say so (see [`RecordHeader::durable_lag`]).
    pub fn sync(&self) -> std::io::Result<()> {
        for file in &self.sealed {
            file.sync_data()?;
            // Sealed and clean: let its pages go, so new appends reuse them instead of
            // touching fresh memory.
            file.drop_cache();
        }
        self.file.sync_data()?;
        self.durable.fetch_max(self.upto.0, Ordering::AcqRel);
        Ok(())
    }
}

/// Summary of one segment, oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentSummary {
    /// Segment index.
    pub index: u64,
    /// Seq of its first record.
    pub first_seq: Seq,
    /// Bytes it occupies.
    pub bytes: u64,
}

struct Segment {
    file: Arc<dyn StorageFile>,
    first_seq: Seq,
    len: u64,
}

/// An open journal. Not synchronised: the engine holds it under its group lock.
pub struct Journal {
    storage: Arc<dyn Storage>,
    group_id: u64,
    config: JournalConfig,
    segments: BTreeMap<u64, Segment>,
    next_seq: Seq,
    chain: ChainHash,
    last_time: UnixNanos,
    encode_buf: Vec<u8>,
    /// Newest seq known to be durable.
    durable: Arc<AtomicU64>,
    /// Sealed segments not yet synced, with their last seq: the next flush syncs them.
    sealed_unsynced: Vec<(Arc<dyn StorageFile>, Seq)>,
    /// Counters for metrics.
    stats: Arc<JournalStats>,
    /// Called (under the owner's lock, so it must not block) each time another `every` bytes
    /// have been appended: the owner's cue to sync in the background.
    writeback: Option<WritebackHook>,
    /// The newest records, for readers that ship them (see [`crate::recent`]).
    recent: Arc<Recent>,
}

/// See [`Journal::set_writeback`].
struct WritebackHook {
    every: u64,
    since: u64,
    hook: Box<dyn Fn() + Send + Sync>,
}

/// The chain hash a new journal starts from.
pub fn genesis_chain(group_id: u64) -> ChainHash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(b"tidemark-journal-genesis");
    hasher.update(&group_id.to_le_bytes());
    ChainHash(*hasher.finalize().as_bytes())
}

/// File name of segment `index`.
pub fn segment_name(index: u64) -> String {
    format!("journal-{index:016x}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let hex = name.strip_prefix("journal-")?.strip_suffix(".seg")?;
    u64::from_str_radix(hex, 16).ok()
}

impl Journal {
    /// Create an empty journal whose first record will have seq `first_seq`, after `chain`.
    pub fn create(
        storage: Arc<dyn Storage>,
        group_id: u64,
        config: JournalConfig,
        first_seq: Seq,
        chain: ChainHash,
    ) -> Result<Journal, JournalError> {
        let mut journal = Journal {
            storage,
            group_id,
            config,
            segments: BTreeMap::new(),
            next_seq: first_seq,
            chain,
            last_time: UnixNanos(0),
            encode_buf: Vec::new(),
            durable: Arc::new(AtomicU64::new(first_seq.0.saturating_sub(1))),
            sealed_unsynced: Vec::new(),
            stats: Arc::default(),
            writeback: None,
            recent: Arc::default(),
        };
        journal.start_segment(0)?;
        Ok(journal)
    }

    /// Open an existing journal, calling `visit` for every record after `resume` (or from the
    /// oldest record when `resume` is `None`), in seq order. Truncates a torn tail.
    pub fn open(
        storage: Arc<dyn Storage>,
        group_id: u64,
        config: JournalConfig,
        resume: Option<ResumePoint>,
        mut visit: impl FnMut(&Record, Location) -> Result<(), JournalError>,
    ) -> Result<(Journal, RecoveryReport), JournalError> {
        let mut indices: Vec<u64> = storage
            .list()
            .map_err(|e| JournalError::io("list journal segments", storage.describe(""), e))?
            .iter()
            .filter_map(|n| parse_segment_name(n))
            .collect();
        indices.sort_unstable();
        let mut segments = BTreeMap::new();
        let last_index = indices.last().copied();
        for &index in &indices {
            let name = segment_name(index);
            let file = storage
                .open(&name)
                .map_err(|e| JournalError::io("open journal segment", storage.describe(&name), e))?;
            let len = file
                .len()
                .map_err(|e| JournalError::io("stat journal segment", storage.describe(&name), e))?;
            match read_segment_header(&*file, group_id) {
                Ok((first_seq, _prev_chain)) => {
                    segments.insert(index, Segment { file, first_seq, len });
                }
                // A newest segment with no valid header was being created when the site stopped:
                // it holds no records, so dropping it loses nothing.
                Err(_) if Some(index) == last_index && segments.contains_key(&index.wrapping_sub(1)) => {
                    storage
                        .remove(&name)
                        .map_err(|e| JournalError::io("remove torn segment", storage.describe(&name), e))?;
                    storage
                        .sync_dir()
                        .map_err(|e| JournalError::io("sync journal directory", storage.describe(""), e))?;
                }
                Err(reason) => {
                    return Err(JournalError::Corrupt { file: storage.describe(&name), offset: 0, reason });
                }
            }
        }
        let Some((&first_index, first)) = segments.iter().next() else {
            return Err(JournalError::Missing(storage.describe("")));
        };
        for (expected, &index) in (first_index..).zip(segments.keys()) {
            if index != expected {
                return Err(JournalError::Corrupt {
                    file: storage.describe(&segment_name(expected)),
                    offset: 0,
                    reason: "segment missing from the middle of the journal".into(),
                });
            }
        }
        let (mut location, mut next_seq, mut chain) = match resume {
            Some(r) => (r.location, r.next_seq, r.chain),
            None => {
                let (_, prev_chain) =
                    read_segment_header(&*first.file, group_id).map_err(|reason| JournalError::Corrupt {
                        file: storage.describe(&segment_name(first_index)),
                        offset: 0,
                        reason,
                    })?;
                (Location { segment: first_index, offset: SEGMENT_HEADER_BYTES }, first.first_seq, prev_chain)
            }
        };
        if !segments.contains_key(&location.segment) {
            return Err(JournalError::Corrupt {
                file: storage.describe(&segment_name(location.segment)),
                offset: location.offset,
                reason: "the checkpoint points into a segment that does not exist".into(),
            });
        }
        let mut report = RecoveryReport::default();
        let mut last_time = UnixNanos(0);
        // Where the previous segment ended, once the scan has crossed into a later one.
        let mut prev_end: Option<Location> = None;
        while let Some(segment) = segments.get(&location.segment) {
            let name = segment_name(location.segment);
            let newest = *segments.keys().next_back().unwrap_or(&first_index);
            // Entering a segment: its header must continue the history exactly. If it does not,
            // the previous segment lost its unsynced tail (or something is corrupt).
            if location.offset == SEGMENT_HEADER_BYTES && segment.first_seq != next_seq {
                let reason = format!(
                    "segment starts at seq {} but seq {} was expected",
                    segment.first_seq.0, next_seq.0
                );
                match prev_end {
                    Some(at) => {
                        cut_or_refuse(&storage, &mut segments, at, next_seq, &reason, &mut report)?;
                        break;
                    }
                    None => {
                        return Err(JournalError::Corrupt {
                            file: storage.describe(&name),
                            offset: 0,
                            reason,
                        })
                    }
                }
            }
            // One outcome for both ways a record can fail: unreadable bytes, or bytes that do
            // not decode and chain.
            let outcome = read_record_at(&*segment.file, location.offset, segment.len)
                .and_then(|bytes| bytes.map(|b| record::decode(&b, Some(&chain))).transpose());
            match outcome {
                Ok(Some(rec)) if rec.seq != next_seq => {
                    return Err(JournalError::Corrupt {
                        file: storage.describe(&name),
                        offset: location.offset,
                        reason: format!("record has seq {} where seq {} was expected", rec.seq.0, next_seq.0),
                    });
                }
                Ok(Some(rec)) => {
                    visit(&rec, location)?;
                    report.records_scanned += 1;
                    location.offset += (HEADER_BYTES + payload_len(&rec.body) + TRAILER_BYTES) as u64;
                    next_seq = Seq(next_seq.0 + 1);
                    chain = rec.chain;
                    last_time = rec.time;
                }
                Ok(None) => {
                    // Clean end of this segment.
                    if location.segment == newest {
                        break;
                    }
                    prev_end = Some(location);
                    location = Location { segment: location.segment + 1, offset: SEGMENT_HEADER_BYTES };
                }
                Err(e) => {
                    cut_or_refuse(&storage, &mut segments, location, next_seq, &e.to_string(), &mut report)?;
                    break;
                }
            }
        }
        let newest = *segments.keys().next_back().unwrap_or(&first_index);
        if let Some(seg) = segments.get_mut(&newest) {
            seg.len = seg
                .file
                .len()
                .map_err(|e| JournalError::io("stat journal segment", storage.describe(""), e))?;
        }
        // What recovery found may still sit only in the page cache (after a process kill): sync
        // it once, so that what the next records vouch for as durable really is.
        if let Some(seg) = segments.get(&newest) {
            seg.file.sync_data().map_err(|e| JournalError::SyncFailed(e.to_string()))?;
        }
        let durable = Arc::new(AtomicU64::new(next_seq.0.saturating_sub(1)));
        let journal = Journal {
            storage,
            group_id,
            config,
            segments,
            next_seq,
            chain,
            last_time,
            encode_buf: Vec::new(),
            durable,
            sealed_unsynced: Vec::new(),
            stats: Arc::default(),
            writeback: None,
            recent: Arc::default(),
        };
        Ok((journal, report))
    }

    /// Append a record; returns its seq and location. Not durable until a sync covers it.
    pub fn append(
        &mut self,
        generation: Generation,
        time: UnixNanos,
        body: &RecordBody,
    ) -> Result<Appended, JournalError> {
        self.append_with(generation, time, |meta, prev, out| (record::encode(meta, body, prev, out), &[]))
    }

    /// Append a write record of borrowed data (the host write path). `data_hash`, when given,
    /// is [`record::payload_hash`] of `data`, computed by the caller outside its lock.
    pub fn append_write(
        &mut self,
        generation: Generation,
        time: UnixNanos,
        volume: VolumeId,
        offset: u64,
        data: &[u8],
        data_hash: Option<[u8; 32]>,
    ) -> Result<Appended, JournalError> {
        self.append_with(generation, time, |meta, prev, out| {
            (record::frame_write(meta, volume, offset, data, data_hash, prev, out), data)
        })
    }

    /// Append a record received from a partner: the same seq, generation, time and content.
    /// The chain it produces here must equal the partner's; that is checked before anything is
    /// written, so a divergent record never enters the journal. See [`Journal::append_replicas`].
    pub fn append_replica(&mut self, record: &VerifiedRecord) -> Result<Appended, JournalError> {
        let ReplicaAppend { mut appended, refused } = self.append_replicas(std::slice::from_ref(record));
        match (refused, appended.pop()) {
            (Some(e), _) => Err(e),
            (None, Some(appended)) => Ok(appended),
            (None, None) => Err(JournalError::Invalid("replicated record was not appended".into())),
        }
    }

    /// Append records received from a partner, in order, with one write per segment they fill
    /// rather than one per record. Each keeps its seq, generation, time and content; the chain
    /// it produces here must equal the partner's, which is checked before anything is written.
    ///
    /// Each record's verified content hash is reused, not computed again (see
    /// [`record::encode_replica`]).
    ///
    /// Stops at the first record it refuses (out of order, back in time, divergent) or the first
    /// write that fails; the records before it are appended and reported, so the owner can apply
    /// exactly those.
    pub fn append_replicas(&mut self, records: &[VerifiedRecord]) -> ReplicaAppend {
        let mut done = ReplicaAppend { appended: Vec::with_capacity(records.len()), refused: None };
        // The records' headers and trailers (and small records whole), back to back; their
        // data is written from where it lies (see `record::frame_replica`).
        let mut framing = std::mem::take(&mut self.encode_buf);
        framing.clear();
        // What is staged but not written: each record's framing in `framing` and its data, the
        // bytes they make, and the tail as it will be once they are written.
        let mut pending: Vec<FramedRecord> = Vec::new();
        let mut pending_bytes = 0u64;
        let mut staged: Vec<Appended> = Vec::new();
        let (mut next_seq, mut chain, mut last_time) = (self.next_seq, self.chain, self.last_time);
        let (mut index, mut start) = self.tail_segment();
        for record in records {
            if record.seq != next_seq {
                done.refused = Some(JournalError::Invalid(format!(
                    "replicated record has seq {} but seq {} is next here",
                    record.seq.0, next_seq.0
                )));
                break;
            }
            if record.time < last_time {
                done.refused = Some(JournalError::Invalid(format!(
                    "replicated record {} goes back in time",
                    record.seq.0
                )));
                break;
            }
            let framing_start = framing.len();
            let meta = RecordMeta {
                seq: next_seq,
                generation: record.generation,
                time: record.time,
                durable: Seq(self.durable.load(Ordering::Acquire)),
            };
            let (ours, payload) = record::frame_replica(meta, record, &chain, &mut framing);
            if ours != record.chain {
                framing.truncate(framing_start);
                done.refused = Some(JournalError::Diverged { seq: next_seq.0, ours, theirs: record.chain });
                break;
            }
            let len = (framing.len() - framing_start + payload.len()) as u64;
            let mut offset = start + pending_bytes;
            if offset + len > self.config.segment_bytes_max && offset > SEGMENT_HEADER_BYTES {
                // This record starts the next segment: write what precedes it, then roll over.
                let written =
                    self.write_staged(index, start, (&framing, &pending), &mut staged, last_time, &mut done);
                pending.clear();
                pending_bytes = 0;
                if let Err(e) = written.and_then(|()| self.start_segment(index + 1)) {
                    done.refused = Some(e);
                    staged.clear();
                    break;
                }
                (index, start) = self.tail_segment();
                offset = start;
            }
            pending.push((framing_start..framing.len(), payload));
            pending_bytes += len;
            staged.push(Appended {
                seq: next_seq,
                location: Location { segment: index, offset },
                chain: ours,
            });
            next_seq = Seq(next_seq.0 + 1);
            chain = ours;
            last_time = record.time;
        }
        if !staged.is_empty() {
            if let Err(e) =
                self.write_staged(index, start, (&framing, &pending), &mut staged, last_time, &mut done)
            {
                done.refused.get_or_insert(e);
            }
        }
        self.encode_buf = framing;
        done
    }

    /// Write the records `staged` describes (the newest at `last_time`) at `start` of tail
    /// segment `index`, in one `pwritev`: each one's framing (a range of the first buffer) split
    /// around its data. Then move the tail past them: they become part of `done`.
    fn write_staged(
        &mut self,
        index: u64,
        start: u64,
        (framing, pending): (&[u8], &Framed),
        staged: &mut Vec<Appended>,
        last_time: UnixNanos,
        done: &mut ReplicaAppend,
    ) -> Result<(), JournalError> {
        let Some(last) = staged.last().copied() else { return Ok(()) };
        let mut parts: Vec<&[u8]> = Vec::with_capacity(3 * pending.len());
        for (range, payload) in pending {
            let parts_of = record::framed_parts(framing.get(range.clone()).unwrap_or_default(), payload);
            parts.extend(parts_of.into_iter().filter(|p| !p.is_empty()));
        }
        let bytes: u64 = parts.iter().map(|p| p.len() as u64).sum();
        let segment = self.segments.get_mut(&index).ok_or(JournalError::Invalid("no tail segment".into()))?;
        segment.file.write_all_vectored_at(&parts, start).map_err(|e| {
            JournalError::io("append to journal", self.storage.describe(&segment_name(index)), e)
        })?;
        segment.len += bytes;
        self.stats.record_appends(staged.len() as u64, bytes);
        self.cue_writeback(bytes);
        self.next_seq = Seq(last.seq.0 + 1);
        self.chain = last.chain;
        self.last_time = last_time;
        done.appended.append(staged);
        Ok(())
    }

    /// Append the record `encode` writes into the journal's buffer after the meta and chain
    /// it is given; it returns the new chain and the payload it left out of the buffer (see
    /// [`record::frame_write`]; empty when the buffer holds the whole record).
    fn append_with<'p>(
        &mut self,
        generation: Generation,
        time: UnixNanos,
        encode: impl FnOnce(RecordMeta, &ChainHash, &mut Vec<u8>) -> (ChainHash, &'p [u8]),
    ) -> Result<Appended, JournalError> {
        let seq = self.next_seq;
        // Source times never go backwards within a group, so "the last record with time <= T"
        // is a binary search.
        let time = UnixNanos(time.0.max(self.last_time.0));
        let meta = RecordMeta { seq, generation, time, durable: Seq(self.durable.load(Ordering::Acquire)) };
        let mut buf = std::mem::take(&mut self.encode_buf);
        let (chain, payload) = encode(meta, &self.chain, &mut buf);
        let parts = record::framed_parts(&buf, payload);
        let len = (buf.len() + payload.len()) as u64;
        // Assertion for our own bugs: what we are about to write must read back as itself.
        debug_assert!(record::decode(&parts.concat(), Some(&self.chain)).is_ok());
        let (index, mut segment_len) = self.tail_segment();
        if segment_len + len > self.config.segment_bytes_max && segment_len > SEGMENT_HEADER_BYTES {
            self.start_segment(index + 1)?;
            segment_len = SEGMENT_HEADER_BYTES;
        }
        let (index, _) = self.tail_segment();
        let segment = self.segments.get_mut(&index).ok_or(JournalError::Invalid("no tail segment".into()))?;
        let location = Location { segment: index, offset: segment_len };
        if let Err(e) = segment.file.write_all_vectored_at(&parts, segment_len) {
            self.encode_buf = buf;
            return Err(JournalError::io(
                "append to journal",
                self.storage.describe(&segment_name(index)),
                e,
            ));
        }
        segment.len += len;
        self.recent.push(seq, location, &parts);
        self.stats.record_append(len);
        self.cue_writeback(len);
        self.encode_buf = buf;
        self.next_seq = Seq(seq.0 + 1);
        self.chain = chain;
        self.last_time = time;
        Ok(Appended { seq, location, chain })
    }

    /// Whether a write record of `data_bytes` of data would go into the tail segment as it
    /// stands: an append that starts no new segment, so waits for no fdatasync.
    pub fn write_fits_tail(&self, data_bytes: u64) -> bool {
        let (_, len) = self.tail_segment();
        len + (HEADER_BYTES + TRAILER_BYTES) as u64 + data_bytes <= self.config.segment_bytes_max
    }

    /// Call `hook` each time another `every` bytes have been appended (it runs inside
    /// [`Journal::append`], so it must only signal, never block or sync).
    pub fn set_writeback(&mut self, every: u64, hook: Box<dyn Fn() + Send + Sync>) {
        self.writeback = Some(WritebackHook { every: every.max(1), since: 0, hook });
    }

    /// Counters of what this journal appended and synced, for metrics.
    pub fn stats(&self) -> Arc<JournalStats> {
        self.stats.clone()
    }

    /// What to sync so that every record appended so far is durable.
    pub fn sync_ticket(&mut self) -> Option<SyncTicket> {
        let durable = self.durable_seq();
        self.sealed_unsynced.retain(|(_, last)| *last > durable);
        let (index, _) = self.tail_segment();
        let segment = self.segments.get(&index)?;
        Some(SyncTicket {
            file: segment.file.clone(),
            sealed: self.sealed_unsynced.iter().map(|(f, _)| f.clone()).collect(),
            upto: self.last_seq(),
            durable: self.durable.clone(),
            stats: self.stats.clone(),
        })
    }

    /// The file of segment `index`, for reading record data outside the group lock.
    pub fn segment_file(&self, index: u64) -> Option<Arc<dyn StorageFile>> {
        self.segments.get(&index).map(|s| s.file.clone())
    }

    /// The segment holding record `seq` (the last one starting at or before it); `None` when
    /// `seq` is older than the journal. Segment indexes and first seqs both increase, so this is
    /// a bisection over indexes (which may have gaps).
    pub fn segment_of(&self, seq: Seq) -> Option<u64> {
        let first_at_or_before =
            |index: u64| self.segments.range(..=index).next_back().map(|(_, s)| s.first_seq);
        let (&first, oldest) = self.segments.iter().next()?;
        if oldest.first_seq > seq {
            return None;
        }
        let (mut lo, mut hi) = (first, *self.segments.keys().next_back()?);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if first_at_or_before(mid).is_some_and(|f| f <= seq) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        self.segments.range(..=lo).next_back().map(|(&i, _)| i)
    }

    /// Read and verify the whole record at `location`.
    pub fn read_record(&self, location: Location) -> Result<Record, JournalError> {
        let name = segment_name(location.segment);
        let segment = self.segments.get(&location.segment).ok_or_else(|| JournalError::Corrupt {
            file: self.storage.describe(&name),
            offset: location.offset,
            reason: "segment no longer exists".into(),
        })?;
        let corrupt = |reason: String| JournalError::Corrupt {
            file: self.storage.describe(&name),
            offset: location.offset,
            reason,
        };
        let bytes = read_record_at(&*segment.file, location.offset, segment.len)
            .map_err(|e| corrupt(e.to_string()))?
            .ok_or_else(|| corrupt("no record at this location".into()))?;
        record::decode(&bytes, None).map_err(|e| corrupt(e.to_string()))
    }

    /// Call `visit` for every record of segment `index`, in order, verifying each.
    pub fn scan_segment(
        &self,
        index: u64,
        mut visit: impl FnMut(&Record, Location) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        let Some(segment) = self.segments.get(&index) else { return Ok(()) };
        let mut offset = SEGMENT_HEADER_BYTES;
        while offset < segment.len {
            let location = Location { segment: index, offset };
            let record = self.read_record(location)?;
            offset += (HEADER_BYTES + payload_len(&record.body) + TRAILER_BYTES) as u64;
            visit(&record, location)?;
        }
        Ok(())
    }

    /// Where record `seq` starts. Scans the record headers of its segment (at most one
    /// segment's worth of headers); replication keeps a cursor so it does this once per
    /// connection, not per batch.
    pub fn locate(&self, seq: Seq) -> Result<Location, JournalError> {
        let (&index, segment) = self
            .segments
            .range(..)
            .rev()
            .find(|(_, s)| s.first_seq <= seq)
            .ok_or_else(|| JournalError::Invalid(format!("seq {} is older than the journal", seq.0)))?;
        if seq >= self.next_seq {
            return Err(JournalError::Invalid(format!("seq {} is not in the journal yet", seq.0)));
        }
        let mut offset = SEGMENT_HEADER_BYTES;
        let mut at = segment.first_seq;
        while at < seq {
            let mut head = [0u8; HEADER_BYTES];
            segment.file.read_exact_at(&mut head, offset).map_err(|e| {
                JournalError::io("read record header", self.storage.describe(&segment_name(index)), e)
            })?;
            let header = RecordHeader::decode(&head).map_err(|reason| JournalError::Corrupt {
                file: self.storage.describe(&segment_name(index)),
                offset,
                reason: reason.into(),
            })?;
            offset += u64::from(header.total_len);
            at = Seq(at.0 + 1);
        }
        Ok(Location { segment: index, offset })
    }

    /// The chain hash after record `seq` (`seq` may be the one before the oldest record held);
    /// `None` when the journal no longer reaches back that far.
    pub fn chain_at(&self, seq: Seq) -> Result<Option<ChainHash>, JournalError> {
        if seq == self.last_seq() {
            return Ok(Some(self.chain));
        }
        if seq > self.last_seq() {
            return Ok(None);
        }
        if let Some((&index, first)) = self.segments.iter().find(|(_, s)| s.first_seq.0 == seq.0 + 1) {
            // The chain before a segment's first record is in the segment's header.
            return read_segment_header(&*first.file, self.group_id).map(|(_, chain)| Some(chain)).map_err(
                |reason| JournalError::Corrupt {
                    file: self.storage.describe(&segment_name(index)),
                    offset: 0,
                    reason,
                },
            );
        }
        if seq < self.first_seq() {
            return Ok(None);
        }
        Ok(Some(self.read_record(self.locate(seq)?)?.chain))
    }

    /// A view of the segment files for reading records outside the group lock.
    pub fn reader(&self) -> JournalReader {
        JournalReader {
            segments: self.segments.iter().map(|(&i, s)| (i, s.file.clone(), s.len)).collect(),
            storage: self.storage.clone(),
            recent: self.recent.clone(),
        }
    }

    /// Delete every segment older than `index` (their records are no longer needed).
    pub fn remove_segments_before(&mut self, index: u64) -> Result<(), JournalError> {
        let old: Vec<u64> = self.segments.range(..index).map(|(&i, _)| i).collect();
        if old.is_empty() {
            return Ok(());
        }
        for i in old {
            let name = segment_name(i);
            self.storage
                .remove(&name)
                .map_err(|e| JournalError::io("remove journal segment", self.storage.describe(&name), e))?;
            self.segments.remove(&i);
        }
        self.storage
            .sync_dir()
            .map_err(|e| JournalError::io("sync journal directory", self.storage.describe(""), e))
    }

    /// Segments, oldest first.
    pub fn segments(&self) -> Vec<SegmentSummary> {
        self.segments
            .iter()
            .map(|(&index, s)| SegmentSummary { index, first_seq: s.first_seq, bytes: s.len })
            .collect()
    }

    /// Bytes all segments occupy.
    pub fn bytes(&self) -> u64 {
        self.segments.values().map(|s| s.len).sum()
    }

    /// Seq of the newest record (the one before the first record when empty).
    pub fn last_seq(&self) -> Seq {
        Seq(self.next_seq.0.saturating_sub(1))
    }

    /// Newest seq known to be durable.
    pub fn durable_seq(&self) -> Seq {
        Seq(self.durable.load(Ordering::Acquire))
    }

    /// Seq the next record will get.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// Seq of the oldest record still in the journal.
    pub fn first_seq(&self) -> Seq {
        self.segments.values().next().map_or(self.next_seq, |s| s.first_seq)
    }

    /// The chain hash after the newest record.
    pub fn chain(&self) -> ChainHash {
        self.chain
    }

    /// Source time of the newest record.
    pub fn last_time(&self) -> UnixNanos {
        self.last_time
    }

    /// Where a scan would resume after the newest record.
    pub fn resume_point(&self) -> ResumePoint {
        let (index, len) = self.tail_segment();
        ResumePoint {
            location: Location { segment: index, offset: len },
            next_seq: self.next_seq,
            chain: self.chain,
        }
    }

    fn tail_segment(&self) -> (u64, u64) {
        self.segments.iter().next_back().map_or((0, SEGMENT_HEADER_BYTES), |(&i, s)| (i, s.len))
    }

    /// Count `bytes` more appended; call the writeback hook each time another interval passes.
    fn cue_writeback(&mut self, bytes: u64) {
        if let Some(w) = &mut self.writeback {
            w.since += bytes;
            if w.since >= w.every {
                w.since = 0;
                (w.hook)();
            }
        }
    }

    /// Seal the current segment (sync it) and start segment `index`, durably, before any record
    /// goes into it.
    fn start_segment(&mut self, index: u64) -> Result<(), JournalError> {
        if let Some(current) = self.segments.values().next_back() {
            // Sealed, but not synced here: the next flush syncs it (outside the group lock) with
            // the new tail. Recovery tells a lost unsynced tail of a sealed segment from
            // corruption the same way as for the newest one.
            self.sealed_unsynced.push((current.file.clone(), Seq(self.next_seq.0.saturating_sub(1))));
        }
        let name = segment_name(index);
        let file = self
            .storage
            .open(&name)
            .map_err(|e| JournalError::io("create journal segment", self.storage.describe(&name), e))?;
        let header = encode_segment_header(self.group_id, index, self.next_seq, &self.chain);
        let io = |e| JournalError::io("write segment header", self.storage.describe(&name), e);
        file.set_len(0).map_err(io)?;
        file.write_all_at(&header, 0).map_err(io)?;
        file.sync_data().map_err(|e| JournalError::SyncFailed(e.to_string()))?;
        self.storage.sync_dir().map_err(|e| JournalError::SyncFailed(e.to_string()))?;
        self.segments.insert(index, Segment { file, first_seq: self.next_seq, len: SEGMENT_HEADER_BYTES });
        Ok(())
    }
}

/// A record staged for a vectored write: its framing (a range of a buffer of framings, see
/// [`record::frame_replica`]) and its data.
type FramedRecord<'a> = (Range<usize>, &'a [u8]);
/// Records staged for one vectored write.
type Framed<'a> = [FramedRecord<'a>];

/// Encoded records read for shipping.
#[derive(Debug)]
pub struct RawRecords {
    /// The records' bytes, exactly as in the journal, in pieces that are back to back there;
    /// each piece holds whole records (records served from memory are not copied into one).
    pub pieces: Vec<Bytes>,
    /// Seq of the first record.
    pub first: Seq,
    /// Seq of the last record.
    pub last: Seq,
    /// Where the record after `last` starts.
    pub next: Location,
}

impl RawRecords {
    /// Bytes of the records.
    pub fn len(&self) -> usize {
        self.pieces.iter().map(Bytes::len).sum()
    }

    /// Whether no record was read.
    pub fn is_empty(&self) -> bool {
        self.pieces.iter().all(Bytes::is_empty)
    }

    /// The records' bytes in one buffer (a copy).
    pub fn concat(&self) -> Vec<u8> {
        self.pieces.concat()
    }
}

/// Segment files captured under the group lock, read without it, and the journal's newest
/// records in memory. Records appended later are not seen in the files (they may be in memory);
/// segments removed later stay readable (their files are open).
pub struct JournalReader {
    segments: Vec<(u64, Arc<dyn StorageFile>, u64)>,
    storage: Arc<dyn Storage>,
    recent: Arc<Recent>,
}

impl JournalReader {
    /// Read whole records from `from` (which holds seq `first`) up to seq `upto`, stopping
    /// before `bytes_max` is passed (one record is always read). Records still held in memory
    /// are taken from there, as written (see [`crate::recent`]); each record read from a file
    /// is verified first, so a damaged record is never shipped. Reading starts the journal
    /// keeping its newest records in memory.
    pub fn read(
        &self,
        from: Location,
        first: Seq,
        upto: Seq,
        bytes_max: u64,
    ) -> Result<RawRecords, JournalError> {
        if let Some(served) = self.recent.read(first, upto, bytes_max) {
            if served.last < first {
                return Ok(RawRecords { pieces: Vec::new(), first, last: served.last, next: from });
            }
            return Ok(RawRecords { pieces: served.pieces, first, last: served.last, next: served.next });
        }
        self.read_files(from, first, upto, bytes_max)
    }

    /// [`JournalReader::read`] from the segment files only, never from memory: what a check
    /// compares the records in memory with.
    pub fn read_files(
        &self,
        from: Location,
        first: Seq,
        upto: Seq,
        bytes_max: u64,
    ) -> Result<RawRecords, JournalError> {
        let mut bytes = Vec::new();
        let mut out =
            RawRecords { pieces: Vec::new(), first, last: Seq(first.0.saturating_sub(1)), next: from };
        let mut at = from;
        let mut seq = first;
        let mut window = Window::default();
        while seq <= upto {
            let Some((_, file, len)) = self.segments.iter().find(|(i, _, _)| *i == at.segment) else { break };
            let name = segment_name(at.segment);
            let corrupt = |reason: String| JournalError::Corrupt {
                file: self.storage.describe(&name),
                offset: at.offset,
                reason,
            };
            if at.offset >= *len {
                // Clean end of a segment: continue in the next one.
                if !self.segments.iter().any(|(i, _, _)| *i == at.segment + 1) {
                    break;
                }
                at = Location { segment: at.segment + 1, offset: SEGMENT_HEADER_BYTES };
                continue;
            }
            // Read ahead as far as the batch may still grow, so a batch of small records takes
            // a few reads instead of two per record.
            let ahead = bytes_max.saturating_sub(bytes.len() as u64).clamp(HEADER_BYTES as u64, READ_AHEAD);
            let head = window
                .get(&**file, at, HEADER_BYTES as u64, ahead, *len)
                .map_err(|e| corrupt(e.to_string()))?;
            let header = <&[u8; HEADER_BYTES]>::try_from(head)
                .map_err(|_| DecodeError::Truncated)
                .and_then(|h| RecordHeader::decode(h).map_err(DecodeError::Malformed))
                .map_err(|e| corrupt(e.to_string()))?;
            let total = u64::from(header.total_len);
            if !bytes.is_empty() && bytes.len() as u64 + total > bytes_max {
                break;
            }
            let record = window.get(&**file, at, total, ahead, *len).map_err(|e| corrupt(e.to_string()))?;
            let verified = record::verify(record).map_err(|e| corrupt(e.to_string()))?;
            if verified.seq != seq {
                return Err(corrupt(format!(
                    "record has seq {} where seq {} was expected",
                    verified.seq.0, seq.0
                )));
            }
            bytes.extend_from_slice(record);
            at.offset += total;
            out.last = seq;
            out.next = at;
            seq = Seq(seq.0 + 1);
        }
        if !bytes.is_empty() {
            out.pieces.push(Bytes::from(bytes));
        }
        Ok(out)
    }
}

/// Cut a closed journal after record `last`: every later record is removed (the segment holding
/// the next record is truncated where it starts, later segments are deleted), and the cut is made
/// durable. Idempotent: a journal that ends at or before `last` is left alone. Returns the bytes
/// removed. Used to rewind a returning site to a fork point; the caller keeps what it must of the
/// removed tail first.
pub fn truncate_after(storage: &Arc<dyn Storage>, group_id: u64, last: Seq) -> Result<u64, JournalError> {
    let mut indices: Vec<u64> = storage
        .list()
        .map_err(|e| JournalError::io("list journal segments", storage.describe(""), e))?
        .iter()
        .filter_map(|n| parse_segment_name(n))
        .collect();
    indices.sort_unstable();
    let target = Seq(last.0 + 1);
    // Segment headers say where each segment starts; the cut falls in the last one starting at
    // or before the target.
    let mut starts = Vec::with_capacity(indices.len());
    for &index in &indices {
        let name = segment_name(index);
        let file = storage
            .open(&name)
            .map_err(|e| JournalError::io("open journal segment", storage.describe(&name), e))?;
        let (first_seq, prev_chain) = read_segment_header(&*file, group_id)
            .map_err(|reason| JournalError::Corrupt { file: storage.describe(&name), offset: 0, reason })?;
        starts.push((index, first_seq, prev_chain, file));
    }
    let Some(pos) = starts.iter().rposition(|(_, first, _, _)| *first <= target) else {
        return Err(JournalError::Invalid(format!(
            "cannot cut the journal after seq {}: it begins later",
            last.0
        )));
    };
    let mut removed = 0;
    for (index, _, _, file) in starts.drain(pos + 1..) {
        removed += file.len().unwrap_or(0);
        let name = segment_name(index);
        storage
            .remove(&name)
            .map_err(|e| JournalError::io("remove journal segment", storage.describe(&name), e))?;
    }
    let Some((index, first_seq, prev_chain, file)) = starts.pop() else { return Ok(removed) };
    let name = segment_name(index);
    let len = file.len().map_err(|e| JournalError::io("stat journal segment", storage.describe(&name), e))?;
    let (mut offset, mut seq, mut chain) = (SEGMENT_HEADER_BYTES, first_seq, prev_chain);
    while seq < target {
        let bytes = read_record_at(&*file, offset, len).map_err(|e| JournalError::Corrupt {
            file: storage.describe(&name),
            offset,
            reason: e.to_string(),
        })?;
        let Some(bytes) = bytes else { break };
        let rec = record::decode(&bytes, Some(&chain)).map_err(|e| JournalError::Corrupt {
            file: storage.describe(&name),
            offset,
            reason: e.to_string(),
        })?;
        offset += bytes.len() as u64;
        seq = Seq(rec.seq.0 + 1);
        chain = rec.chain;
    }
    if offset < len {
        removed += len - offset;
        file.set_len(offset).map_err(|e| JournalError::io("truncate journal", storage.describe(&name), e))?;
        file.sync_data().map_err(|e| JournalError::io("sync journal segment", storage.describe(&name), e))?;
    }
    storage.sync_dir().map_err(|e| JournalError::io("sync journal directory", storage.describe(""), e))?;
    Ok(removed)
}

fn payload_len(body: &RecordBody) -> usize {
    match body {
        RecordBody::Write { data, .. } => data.len(),
        RecordBody::Zero { .. } => 0,
        RecordBody::Control(c) => postcard::to_stdvec(c).map_or(0, |v| v.len()),
    }
}

fn encode_segment_header(group_id: u64, index: u64, first_seq: Seq, prev_chain: &ChainHash) -> Vec<u8> {
    let mut out = Vec::with_capacity(SEGMENT_HEADER_BYTES as usize);
    out.extend_from_slice(&SEGMENT_MAGIC);
    out.extend_from_slice(&SEGMENT_VERSION.to_le_bytes());
    out.extend_from_slice(&(SEGMENT_HEADER_BYTES as u32).to_le_bytes());
    out.extend_from_slice(&group_id.to_le_bytes());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(&first_seq.0.to_le_bytes());
    out.extend_from_slice(&prev_chain.0);
    out.resize(SEGMENT_HEADER_BYTES as usize - 16, 0);
    let checksum = record::checksum_of(&out);
    out.extend_from_slice(&checksum);
    out
}

/// Damage at `at` (where seq `next_seq` should be): corruption if any later record, in this
/// segment or a later one, verifies and says it was written after `next_seq` was durable;
/// otherwise an unsynced tail, cut off here together with every later segment.
fn cut_or_refuse(
    storage: &Arc<dyn Storage>,
    segments: &mut BTreeMap<u64, Segment>,
    at: Location,
    next_seq: Seq,
    what: &str,
    report: &mut RecoveryReport,
) -> Result<(), JournalError> {
    let name = segment_name(at.segment);
    for (&index, segment) in segments.range(at.segment..) {
        let from = if index == at.segment { at.offset } else { SEGMENT_HEADER_BYTES - 1 };
        if let Some(offset) = find_valid_record_after(&*segment.file, from, segment.len, next_seq) {
            return Err(JournalError::Corrupt {
                file: storage.describe(&name),
                offset: at.offset,
                reason: format!(
                    "{what}, and the record at offset {offset} of {} was written after seq {} was durable",
                    segment_name(index),
                    next_seq.0
                ),
            });
        }
    }
    let mut discarded = 0;
    let later: Vec<u64> = segments.range(at.segment + 1..).map(|(&i, _)| i).collect();
    for index in later {
        if let Some(segment) = segments.remove(&index) {
            discarded += segment.len;
        }
        let later_name = segment_name(index);
        storage
            .remove(&later_name)
            .map_err(|e| JournalError::io("remove cut segment", storage.describe(&later_name), e))?;
    }
    if let Some(segment) = segments.get_mut(&at.segment) {
        discarded += segment.len.saturating_sub(at.offset);
        segment
            .file
            .set_len(at.offset)
            .map_err(|e| JournalError::io("truncate torn tail", storage.describe(&name), e))?;
        segment
            .file
            .sync_data()
            .map_err(|e| JournalError::io("sync truncated segment", storage.describe(&name), e))?;
        segment.len = at.offset;
    }
    storage.sync_dir().map_err(|e| JournalError::io("sync journal directory", storage.describe(""), e))?;
    report.torn_tail = Some((at.segment, at.offset, discarded));
    Ok(())
}

/// Parse and verify a segment header: (first seq, chain before its first record).
fn read_segment_header(file: &dyn StorageFile, group_id: u64) -> Result<(Seq, ChainHash), String> {
    let mut buf = [0u8; SEGMENT_HEADER_BYTES as usize];
    file.read_exact_at(&mut buf, 0).map_err(|e| format!("segment header unreadable: {e}"))?;
    let (body, checksum) = buf.split_at(SEGMENT_HEADER_BYTES as usize - 16);
    if record::checksum_of(body) != checksum {
        return Err("segment header checksum mismatch".into());
    }
    let field = |range: std::ops::Range<usize>| body.get(range).unwrap_or_default();
    if field(0..8) != SEGMENT_MAGIC {
        return Err("not a journal segment (bad magic)".into());
    }
    let version = u32::from_le_bytes(field(8..12).try_into().unwrap_or_default());
    if version != SEGMENT_VERSION {
        return Err(format!(
            "segment format version {version} is not supported (this build reads {SEGMENT_VERSION})"
        ));
    }
    let gid = u64::from_le_bytes(field(16..24).try_into().unwrap_or_default());
    if gid != group_id {
        return Err(format!("segment belongs to group id {gid}, not {group_id}"));
    }
    let first_seq = Seq(u64::from_le_bytes(field(32..40).try_into().unwrap_or_default()));
    let mut chain = ChainHash([0; 32]);
    chain.0.copy_from_slice(field(40..72));
    Ok((first_seq, chain))
}

/// How far a [`JournalReader`] reads ahead of the record it needs.
const READ_AHEAD: u64 = 256 << 10;

/// Bytes of one segment read ahead by a [`JournalReader`].
#[derive(Default)]
struct Window {
    segment: u64,
    start: u64,
    bytes: Vec<u8>,
}

impl Window {
    /// The `n` bytes at `at` in a segment of `len` bytes; when they are not in the window, reads
    /// `max(n, ahead)` bytes from `at` (never past `len`).
    fn get(
        &mut self,
        file: &dyn StorageFile,
        at: Location,
        n: u64,
        ahead: u64,
        len: u64,
    ) -> Result<&[u8], DecodeError> {
        if len.saturating_sub(at.offset) < n {
            return Err(DecodeError::Truncated);
        }
        let end = self.start + self.bytes.len() as u64;
        let held = self.segment == at.segment && at.offset >= self.start && at.offset + n <= end;
        if !held {
            let size = n.max(ahead).min(len - at.offset);
            self.bytes.resize(size as usize, 0);
            if file.read_exact_at(&mut self.bytes, at.offset).is_err() {
                self.bytes.clear();
                return Err(DecodeError::Truncated);
            }
            (self.segment, self.start) = (at.segment, at.offset);
        }
        let from = (at.offset - self.start) as usize;
        self.bytes.get(from..from + n as usize).ok_or(DecodeError::Truncated)
    }
}

/// Read the raw bytes of the record at `offset`: `Ok(None)` at a clean end of the segment.
fn read_record_at(file: &dyn StorageFile, offset: u64, len: u64) -> Result<Option<Vec<u8>>, DecodeError> {
    if offset >= len {
        return Ok(None);
    }
    if len - offset < HEADER_BYTES as u64 {
        return Err(DecodeError::Truncated);
    }
    let mut head = [0u8; HEADER_BYTES];
    file.read_exact_at(&mut head, offset).map_err(|_| DecodeError::Truncated)?;
    let header = RecordHeader::decode(&head).map_err(DecodeError::Malformed)?;
    let total = header.total_len as u64;
    if len - offset < total {
        return Err(DecodeError::Truncated);
    }
    let mut bytes = vec![0u8; total as usize];
    file.read_exact_at(&mut bytes, offset).map_err(|_| DecodeError::Truncated)?;
    Ok(Some(bytes))
}

/// Search the rest of a segment for a record that proves the damage at `from` is corruption and
/// not a torn tail: one that verifies on its own and was written after the damaged record
/// (seq `next_seq`) was known durable. Later records without that proof may have reached the
/// disk out of order before a crash; they were never acknowledged as durable and are cut too.
fn find_valid_record_after(file: &dyn StorageFile, from: u64, len: u64, next_seq: Seq) -> Option<u64> {
    let start = from + 1;
    if start >= len {
        return None;
    }
    let mut rest = vec![0u8; (len - start) as usize];
    file.read_exact_at(&mut rest, start).ok()?;
    let mut i = 0;
    while i + HEADER_BYTES <= rest.len() {
        if rest.get(i..i + 4) == Some(&record::RECORD_MAGIC[..]) {
            let header = rest.get(i..i + HEADER_BYTES).and_then(|h| <&[u8; HEADER_BYTES]>::try_from(h).ok());
            let vouches = header.and_then(|h| RecordHeader::decode(h).ok()).is_some_and(|h| {
                h.seq > next_seq
                    && h.durable_lag != u32::MAX
                    && h.seq.0 - u64::from(h.durable_lag) >= next_seq.0
            });
            if vouches && rest.get(i..).is_some_and(|tail| record::decode(tail, None).is_ok()) {
                return Some(start + i as u64);
            }
        }
        i += 1;
    }
    None
}
