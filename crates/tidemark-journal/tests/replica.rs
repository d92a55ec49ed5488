//! Copying a journal record by record to a partner's journal (what replication does), with the
//! chain checked at every step.
#![allow(clippy::indexing_slicing)]

use std::sync::Arc;

use tidemark_journal::record::{self, decode_all, decode_verified, RecordMeta};
use tidemark_journal::storage::{SimStorage, Storage};
use tidemark_journal::{
    genesis_chain, Control, Generation, Journal, JournalConfig, JournalError, Record, RecordBody,
    ReplicaAppend, Seq, UnixNanos, VerifiedRecord, VolumeId, ZeroMode,
};

const GROUP: u64 = 11;

fn journal() -> Journal {
    let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
    journal_on(&storage, 16 << 10)
}

/// A new journal in `storage` with segments of at most `segment_bytes_max`.
fn journal_on(storage: &Arc<dyn Storage>, segment_bytes_max: u64) -> Journal {
    Journal::create(storage.clone(), GROUP, JournalConfig { segment_bytes_max }, Seq(1), genesis_chain(GROUP))
        .expect("create")
}

fn write(i: u64) -> RecordBody {
    RecordBody::Write {
        volume: VolumeId(1),
        offset: i * 4096,
        data: vec![i as u8; 1024 * (1 + (i as usize % 5))].into(),
    }
}

#[test]
fn a_copied_journal_has_the_same_chain_at_every_seq() {
    let mut a = journal();
    for i in 0..40 {
        a.append(Generation(1), UnixNanos(100 + i), &write(i)).expect("append");
    }
    assert!(a.segments().len() > 3);
    let mut b = journal();
    // Ship in small batches, as a sender would, continuing from a cursor.
    let mut from = a.locate(Seq(1)).expect("locate");
    let mut next = Seq(1);
    let reader = a.reader();
    while next <= a.last_seq() {
        let raw = reader.read(from, next, a.last_seq(), 10 << 10).expect("read");
        let joined = raw.concat();
        let mut rest: &[u8] = &joined;
        while !rest.is_empty() {
            let rec = decode_verified(rest, None).expect("decode");
            let len =
                64 + match &rec.body {
                    RecordBody::Write { data, .. } => data.len(),
                    _ => 0,
                } + 48;
            b.append_replica(&rec).expect("append replica");
            rest = &rest[len..];
        }
        from = raw.next;
        next = Seq(raw.last.0 + 1);
    }
    assert_eq!(b.last_seq(), a.last_seq());
    for seq in 0..=40 {
        assert_eq!(a.chain_at(Seq(seq)).expect("a"), b.chain_at(Seq(seq)).expect("b"), "seq {seq}");
    }
    assert_eq!(a.locate(Seq(17)).expect("locate"), b.locate(Seq(17)).expect("locate"));
}

#[test]
fn a_divergent_record_is_refused_before_it_is_written() {
    let mut a = journal();
    let mut b = journal();
    for i in 0..3 {
        a.append(Generation(1), UnixNanos(i), &write(i)).expect("append");
        b.append(Generation(1), UnixNanos(i), &write(i)).expect("append");
    }
    // b takes a different write at seq 4.
    b.append(Generation(1), UnixNanos(5), &write(99)).expect("append");
    a.append(Generation(1), UnixNanos(5), &write(4)).expect("append");
    a.append(Generation(1), UnixNanos(6), &write(5)).expect("append");
    let records = all_records(&a);
    let rec5 = &records[4];
    let before = b.bytes();
    match b.append_replica(rec5) {
        Err(JournalError::Diverged { seq: 5, .. }) => {}
        other => panic!("expected divergence at seq 5, got {other:?}"),
    }
    assert_eq!(b.bytes(), before, "nothing was written");
    // A record out of order is refused too.
    let mut c = journal();
    assert!(c.append_replica(&records[3]).is_err());
}

/// Writes of 1 KiB to 5 KiB, zeroes, and a control record every 11.
fn varied(i: u64) -> RecordBody {
    match i % 11 {
        4 => RecordBody::Zero { volume: VolumeId(1), offset: i * 4096, length: 8192, mode: ZeroMode::Punch },
        9 => RecordBody::Control(Control::Bookmark { name: format!("b{i}") }),
        _ => write(i),
    }
}

/// Every record of `a`, as decoded from its journal (what a receiver holds).
fn all_records(a: &Journal) -> Vec<VerifiedRecord> {
    let raw =
        a.reader().read(a.locate(Seq(1)).expect("locate"), Seq(1), a.last_seq(), u64::MAX).expect("read");
    decode_all(&raw.concat()).expect("valid")
}

#[test]
fn records_appended_in_batches_make_the_same_journal_as_one_at_a_time() {
    let mut a = journal();
    for i in 0..60 {
        a.append(Generation(1), UnixNanos(100 + i), &varied(i)).expect("append");
    }
    let records = all_records(&a);
    assert_eq!(records.len(), 60);
    for batch in [1, 2, 5, 13, 60] {
        let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
        let config = JournalConfig { segment_bytes_max: 16 << 10 };
        let mut b =
            Journal::create(storage.clone(), GROUP, config, Seq(1), genesis_chain(GROUP)).expect("create");
        for chunk in records.chunks(batch) {
            let ReplicaAppend { appended, refused } = b.append_replicas(chunk);
            assert!(refused.is_none(), "batches of {batch}: {refused:?}");
            assert_eq!(
                appended.iter().map(|a| a.seq).collect::<Vec<_>>(),
                chunk.iter().map(|r| r.seq).collect::<Vec<_>>()
            );
            for (appended, record) in appended.iter().zip(chunk) {
                assert_eq!(appended.chain, record.chain);
                assert_eq!(appended.location, a.locate(record.seq).expect("locate"), "batches of {batch}");
            }
        }
        assert_eq!(
            b.segments(),
            a.segments(),
            "batches of {batch}: the same segments, rolled over at the same records"
        );
        assert_eq!(b.last_seq(), a.last_seq());
        for seq in 0..=60 {
            assert_eq!(a.chain_at(Seq(seq)).expect("a"), b.chain_at(Seq(seq)).expect("b"), "seq {seq}");
        }
        // What went to disk is a valid journal: every record's checksum (computed here, over this
        // site's durable lag) verifies when the journal is opened again.
        drop(b);
        let mut seen = Vec::new();
        let (b, report) = Journal::open(storage, GROUP, config, None, |rec, _| {
            seen.push(rec.clone());
            Ok(())
        })
        .expect("reopen");
        assert!(report.torn_tail.is_none());
        assert_eq!(seen, records.iter().map(|r| (**r).clone()).collect::<Vec<_>>(), "batches of {batch}");
        assert_eq!(b.chain(), a.chain());
    }
}

#[test]
fn a_batch_stops_at_a_refused_record_and_keeps_the_ones_before() {
    let mut a = journal();
    let mut b = journal();
    for i in 0..3 {
        a.append(Generation(1), UnixNanos(i), &write(i)).expect("append");
        b.append(Generation(1), UnixNanos(i), &write(i)).expect("append");
    }
    for i in 3..8 {
        a.append(Generation(1), UnixNanos(i), &write(i)).expect("append");
    }
    let records = all_records(&a);
    // b took the partner's record 4, then one of its own at 5: the partner's 5 diverges.
    b.append_replica(&records[3]).expect("record 4");
    b.append(Generation(1), UnixNanos(4), &write(99)).expect("append");
    let mut c = journal();
    for record in &records[..3] {
        c.append_replica(record).expect("append");
    }
    let before = c.bytes();
    let ReplicaAppend { appended, refused } = b.append_replicas(&records[5..]);
    assert!(appended.is_empty());
    assert!(matches!(refused, Some(JournalError::Diverged { seq: 6, .. })), "{refused:?}");
    // A batch with a gap: the records before the gap are appended, the rest refused.
    let gapped: Vec<VerifiedRecord> = records[3..5].iter().chain(&records[6..]).cloned().collect();
    let ReplicaAppend { appended, refused } = c.append_replicas(&gapped);
    assert_eq!(appended.iter().map(|a| a.seq).collect::<Vec<_>>(), vec![Seq(4), Seq(5)]);
    assert!(matches!(refused, Some(JournalError::Invalid(_))), "{refused:?}");
    assert_eq!(c.last_seq(), Seq(5));
    assert!(c.bytes() > before);
    // The good prefix is really there: the rest of the history continues it.
    let ReplicaAppend { appended, refused } = c.append_replicas(&records[5..]);
    assert!(refused.is_none(), "{refused:?}");
    assert_eq!(appended.len(), 3);
    assert_eq!(c.chain(), a.chain());
}

#[test]
fn truncate_after_cuts_at_any_seq_across_segments_and_is_idempotent() {
    for cut in [0u64, 1, 7, 13, 25, 39, 40] {
        let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
        let config = JournalConfig { segment_bytes_max: 16 << 10 };
        let mut a =
            Journal::create(storage.clone(), GROUP, config, Seq(1), genesis_chain(GROUP)).expect("create");
        for i in 0..40 {
            a.append(Generation(1), UnixNanos(100 + i), &write(i)).expect("append");
        }
        a.sync_ticket().expect("ticket").sync().expect("sync");
        let chain = a.chain_at(Seq(cut)).expect("chain").unwrap_or_else(|| genesis_chain(GROUP));
        drop(a);
        let removed = tidemark_journal::journal::truncate_after(&storage, GROUP, Seq(cut)).expect("truncate");
        assert_eq!(removed > 0, cut < 40, "cut after {cut}");
        assert_eq!(tidemark_journal::journal::truncate_after(&storage, GROUP, Seq(cut)).expect("again"), 0);
        let mut seen = 0;
        let (mut b, report) = Journal::open(storage.clone(), GROUP, config, None, |_, _| {
            seen += 1;
            Ok(())
        })
        .expect("reopen");
        assert!(report.torn_tail.is_none(), "a deliberate cut is not a torn tail");
        assert_eq!((seen, b.last_seq(), b.chain()), (cut, Seq(cut), chain), "cut after {cut}");
        // The journal continues from the cut.
        b.append(Generation(2), UnixNanos(1000), &write(99)).expect("append after the cut");
        assert_eq!(b.last_seq(), Seq(cut + 1));
    }
}

/// Records of 1 KiB to 5 KiB, with one of 300 KiB every 7 (longer than the reader reads ahead).
fn mixed(i: u64) -> RecordBody {
    let len = if i % 7 == 3 { 300 << 10 } else { 1024 * (1 + (i as usize % 5)) };
    RecordBody::Write { volume: VolumeId(1), offset: i * 4096, data: vec![i as u8; len].into() }
}

#[test]
fn reading_in_batches_of_any_size_returns_every_record_once_within_the_limit() {
    // Small segments (a read crosses many, each read ahead whole) and larger ones.
    for segment_bytes_max in [16 << 10, 512 << 10] {
        read_in_batches(JournalConfig { segment_bytes_max });
    }
}

fn read_in_batches(config: JournalConfig) {
    let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
    let mut a = Journal::create(storage, GROUP, config, Seq(1), genesis_chain(GROUP)).expect("create");
    let mut expected = Vec::new();
    for i in 0..60 {
        let at = a.append(Generation(1), UnixNanos(100 + i), &mixed(i)).expect("append");
        expected.push(a.read_record(at.location).expect("read back"));
    }
    assert!(a.segments().len() > 3);
    let reader = a.reader();
    for bytes_max in [1, 3000, 64 << 10, 256 << 10, 300 << 10, 1 << 20, u64::MAX] {
        let (mut from, mut next) = (a.locate(Seq(1)).expect("locate"), Seq(1));
        let mut got = Vec::new();
        while next <= a.last_seq() {
            let raw = reader.read(from, next, a.last_seq(), bytes_max).expect("read");
            let batch: Vec<Record> = decode_all(&raw.concat())
                .expect("whole, valid records")
                .into_iter()
                .map(VerifiedRecord::into_inner)
                .collect();
            assert!(!batch.is_empty(), "a read always makes progress");
            assert!(batch.len() == 1 || raw.len() as u64 <= bytes_max, "{bytes_max}: over the limit");
            assert_eq!((batch[0].seq, raw.last), (next, batch[batch.len() - 1].seq));
            got.extend(batch);
            from = raw.next;
            next = Seq(raw.last.0 + 1);
        }
        assert_eq!(got, expected, "batches of at most {bytes_max} bytes");
    }
    // Nothing past `upto` is read.
    let raw = reader.read(a.locate(Seq(5)).expect("locate"), Seq(5), Seq(9), u64::MAX).expect("read");
    assert_eq!((raw.first, raw.last), (Seq(5), Seq(9)));
    // And the read continues where it stopped (at the record, or at the end of its segment).
    let rest = reader.read(raw.next, Seq(10), Seq(10), 1).expect("read on");
    assert_eq!((rest.first, rest.last), (Seq(10), Seq(10)));
    let rest = decode_all(&rest.concat()).expect("valid");
    assert_eq!(rest.iter().map(|r| (**r).clone()).collect::<Vec<_>>(), vec![expected[9].clone()]);
}

#[test]
fn a_damaged_record_is_reported_with_its_place_and_never_read_for_shipping() {
    let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
    let mut a = journal_on(&storage, 1 << 20);
    for i in 0..10 {
        a.append(Generation(1), UnixNanos(100 + i), &write(i)).expect("append");
    }
    let damaged = damage_payload(&storage, &a, Seq(6));
    let reader = a.reader();
    // Records before the damage are read; the batch ends before it, and the next read reports it.
    let raw = reader.read(a.locate(Seq(1)).expect("locate"), Seq(1), a.last_seq(), 5 * 2048 + 1000);
    match raw {
        Ok(raw) => {
            assert!(raw.last < Seq(6), "the damaged record was shipped");
            let err = reader.read(raw.next, Seq(raw.last.0 + 1), a.last_seq(), u64::MAX).expect_err("damage");
            assert_damage_reported(&err, damaged.offset);
        }
        Err(err) => assert_damage_reported(&err, damaged.offset),
    }
    let err =
        reader.read(a.locate(Seq(1)).expect("locate"), Seq(1), a.last_seq(), u64::MAX).expect_err("damage");
    assert_damage_reported(&err, damaged.offset);
}

/// Change one payload byte of record `seq` in its segment file; where the record starts.
fn damage_payload(storage: &Arc<dyn Storage>, journal: &Journal, seq: Seq) -> tidemark_journal::Location {
    let at = journal.locate(seq).expect("locate");
    let file = storage.open(&tidemark_journal::journal::segment_name(at.segment)).expect("open");
    file.write_all_at(&[0xEE], at.offset + 100).expect("damage");
    at
}

fn assert_damage_reported(err: &JournalError, offset: u64) {
    match err {
        JournalError::Corrupt { file, offset: at, reason } => {
            assert!(file.to_string_lossy().contains("journal-"), "{}", file.display());
            assert_eq!(*at, offset);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected a corrupt-record error, got {other:?}"),
    }
}

/// A record decoded from a shared buffer (a partner's batch) keeps its data in that buffer, and
/// decodes to the same record as a copying decode; damage is refused either way.
#[test]
fn a_record_decoded_from_a_shared_buffer_borrows_its_data() {
    let meta = RecordMeta { seq: Seq(1), generation: Generation(1), time: UnixNanos(5), durable: Seq(0) };
    let mut encoded = Vec::new();
    record::encode(meta, &write(3), &genesis_chain(1), &mut encoded);
    let shared = bytes::Bytes::from(encoded.clone());
    let borrowed = record::decode_verified_shared(&shared, Some(&genesis_chain(1))).expect("decodes");
    let copied = record::decode_verified(&encoded, Some(&genesis_chain(1))).expect("decodes");
    assert_eq!(borrowed, copied);
    let RecordBody::Write { data, .. } = &borrowed.body else { panic!("a write") };
    let inside = shared.as_ptr_range();
    assert!(inside.contains(&data.as_ptr()), "the data is a slice of the buffer, not a copy");
    let mut damaged = encoded;
    damaged[100] ^= 1;
    let damaged = bytes::Bytes::from(damaged);
    assert_eq!(
        record::decode_verified_shared(&damaged, None).map(|_| ()),
        Err(record::DecodeError::ChecksumMismatch)
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Records a reader serves from memory are exactly what the segment files hold, for any
    /// start, end and size of batch, across segment boundaries, and the batch continues where
    /// it says.
    #[test]
    fn records_served_from_memory_are_the_records_in_the_files(
        before in 0u64..30,
        after in 1u64..60,
        reads in proptest::collection::vec((0u64..100, 0u64..100, 1u64..40_000), 1..20),
    ) {
        let mut a = journal();
        let mut time = 100;
        let mut append = |a: &mut Journal, n: u64| {
            for _ in 0..n {
                time += 1;
                a.append(Generation(1), UnixNanos(time), &write(time)).expect("append");
            }
        };
        append(&mut a, before);
        // The first read starts keeping records in memory; the records appended after it are
        // served from there.
        let start = a.next_seq();
        let reader = a.reader();
        let _ = reader.read(a.locate(Seq(1)).unwrap_or_default(), Seq(1), a.last_seq(), 1);
        append(&mut a, after);
        let last = a.last_seq();
        let reader = a.reader();
        for (from, span, bytes_max) in reads {
            let first = Seq(start.0 + from % after);
            let upto = Seq((first.0 + span).min(last.0 + 3));
            let at = a.locate(first).expect("locate");
            let served = reader.read(at, first, upto, bytes_max).expect("from memory");
            let read = reader.read_files(at, first, upto, bytes_max).expect("from the files");
            proptest::prop_assert_eq!(&served.concat(), &read.concat());
            proptest::prop_assert_eq!((served.first, served.last), (read.first, read.last));
            if served.last < last {
                // Where the next record starts, or the end of the segment before it.
                let next = a.locate(Seq(served.last.0 + 1)).expect("locate");
                proptest::prop_assert!(
                    served.next == next || (served.next.segment + 1 == next.segment),
                    "next {:?}, the record is at {:?}", served.next, next
                );
                let on = reader.read(served.next, Seq(served.last.0 + 1), last, u64::MAX).expect("read on");
                proptest::prop_assert_eq!(on.first, Seq(served.last.0 + 1));
                proptest::prop_assert!(!on.is_empty());
            }
        }
    }
}

/// Once a reader has asked, newly appended records are served from memory, as written: damage
/// to the file after the write does not reach a partner (reading the files still reports it).
#[test]
fn records_appended_after_a_read_are_served_as_written() {
    let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
    let mut a = journal_on(&storage, 1 << 20);
    a.append(Generation(1), UnixNanos(100), &write(0)).expect("append");
    let first = a.reader().read(a.locate(Seq(1)).expect("locate"), Seq(1), Seq(1), u64::MAX).expect("read");
    for i in 1..10 {
        a.append(Generation(1), UnixNanos(100 + i), &write(i)).expect("append");
    }
    let damaged = damage_payload(&storage, &a, Seq(6));
    let reader = a.reader();
    let raw = reader.read(first.next, Seq(2), a.last_seq(), u64::MAX).expect("served from memory");
    assert_eq!((raw.first, raw.last), (Seq(2), Seq(10)));
    let records = decode_all(&raw.concat()).expect("as written");
    assert_eq!(records.len(), 9);
    for (i, record) in (1..).zip(&records) {
        assert_eq!(record.body, write(i));
    }
    let err = reader.read_files(first.next, Seq(2), a.last_seq(), u64::MAX).expect_err("damage");
    assert_damage_reported(&err, damaged.offset);
}
