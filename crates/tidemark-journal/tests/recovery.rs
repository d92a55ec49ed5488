//! Recovery of the journal after clean stops, torn tails, corruption and power cuts.
#![allow(clippy::indexing_slicing)] // Tests index freely; the lint guards the library code.

use std::sync::Arc;

use proptest::prelude::*;
use tidemark_journal::storage::{CrashMode, SimStorage, Storage};
use tidemark_journal::{
    genesis_chain, Generation, Journal, JournalConfig, JournalError, Record, RecordBody, Seq, UnixNanos,
    VolumeId,
};

const GROUP: u64 = 7;

fn small() -> JournalConfig {
    JournalConfig { segment_bytes_max: 16 << 10 }
}

fn write(i: u64) -> RecordBody {
    RecordBody::Write { volume: VolumeId(1), offset: i * 4096, data: vec![(i % 251) as u8; 4096].into() }
}

fn create(storage: &SimStorage) -> Journal {
    let storage: Arc<dyn Storage> = Arc::new(storage.clone());
    Journal::create(storage, GROUP, small(), Seq(1), genesis_chain(GROUP)).expect("create")
}

fn reopen(
    storage: &SimStorage,
) -> Result<(Journal, Vec<Record>, tidemark_journal::RecoveryReport), JournalError> {
    let mut seen = Vec::new();
    let st: Arc<dyn Storage> = Arc::new(storage.clone());
    let (j, report) = Journal::open(st, GROUP, small(), None, |r, _| {
        seen.push(r.clone());
        Ok(())
    })?;
    Ok((j, seen, report))
}

fn append_n(j: &mut Journal, n: u64) {
    for i in 0..n {
        j.append(Generation(1), UnixNanos(1000 + i), &write(i)).expect("append");
    }
}

#[test]
fn records_survive_a_clean_reopen_across_segments() {
    let storage = SimStorage::new();
    let mut j = create(&storage);
    append_n(&mut j, 20);
    assert!(j.segments().len() > 2, "small segments must rotate");
    j.sync_ticket().expect("ticket").sync().expect("sync");
    let (j2, seen, report) = reopen(&storage).expect("reopen");
    assert_eq!(seen.len(), 20);
    assert_eq!(report.torn_tail, None);
    for (i, r) in seen.iter().enumerate() {
        assert_eq!(r.seq, Seq(i as u64 + 1));
        assert_eq!(r.body, write(i as u64));
    }
    assert_eq!(j2.last_seq(), Seq(20));
    assert_eq!(j2.chain(), j.chain());
}

#[test]
fn resume_point_skips_known_records() {
    let storage = SimStorage::new();
    let mut j = create(&storage);
    append_n(&mut j, 5);
    let resume = j.resume_point();
    append_n(&mut j, 5);
    j.sync_ticket().expect("ticket").sync().expect("sync");
    let st: Arc<dyn Storage> = Arc::new(storage.clone());
    let mut seqs = Vec::new();
    let (j2, _) = Journal::open(st, GROUP, small(), Some(resume), |r, _| {
        seqs.push(r.seq.0);
        Ok(())
    })
    .expect("open");
    assert_eq!(seqs, vec![6, 7, 8, 9, 10]);
    assert_eq!(j2.chain(), j.chain());
}

#[test]
fn torn_tail_is_truncated_and_appends_continue() {
    let storage = SimStorage::new();
    let mut j = create(&storage);
    append_n(&mut j, 2);
    j.sync_ticket().expect("ticket").sync().expect("sync");
    let tail = j.resume_point().location;
    // Half a record at the tail, as a crash in the middle of a write leaves it.
    let file = storage.open(&tidemark_journal::journal::segment_name(tail.segment)).expect("open");
    let mut buf = Vec::new();
    tidemark_journal::record::encode(
        tidemark_journal::record::RecordMeta {
            seq: Seq(3),
            generation: Generation(1),
            time: UnixNanos(5),
            durable: Seq(2),
        },
        &write(3),
        &j.chain(),
        &mut buf,
    );
    file.write_all_at(&buf[..buf.len() / 2], tail.offset).expect("write");
    let (mut j2, seen, report) = reopen(&storage).expect("reopen");
    assert_eq!(seen.len(), 2);
    let (segment, offset, discarded) = report.torn_tail.expect("torn tail reported");
    assert_eq!((segment, offset, discarded), (tail.segment, tail.offset, buf.len() as u64 / 2));
    let appended = j2.append(Generation(1), UnixNanos(9), &write(9)).expect("append after recovery");
    assert_eq!(appended.seq, Seq(3));
}

#[test]
fn corruption_before_the_tail_is_reported_with_file_and_offset() {
    let storage = SimStorage::new();
    let mut j = create(&storage);
    append_n(&mut j, 1);
    j.sync_ticket().expect("ticket").sync().expect("sync");
    append_n(&mut j, 2);
    j.sync_ticket().expect("ticket").sync().expect("sync");
    // Flip one payload byte of the first record; records written after it was durable follow.
    let file = storage.open(&tidemark_journal::journal::segment_name(0)).expect("open");
    let offset = tidemark_journal::journal::SEGMENT_HEADER_BYTES + 100;
    file.write_all_at(&[0xff], offset).expect("corrupt");
    match reopen(&storage) {
        Err(JournalError::Corrupt { file, offset, reason }) => {
            assert!(file.ends_with("journal-0000000000000000.seg"), "{file:?}");
            assert_eq!(offset, tidemark_journal::journal::SEGMENT_HEADER_BYTES);
            assert!(reason.contains("checksum"), "{reason}");
        }
        Err(other) => panic!("wrong error: {other}"),
        Ok(_) => panic!("corruption before the tail was accepted"),
    }
}

#[test]
fn corruption_in_a_sealed_segment_is_reported() {
    let storage = SimStorage::new();
    let mut j = create(&storage);
    append_n(&mut j, 12);
    j.sync_ticket().expect("ticket").sync().expect("sync");
    // Records written after that flush vouch that everything before them was durable.
    append_n(&mut j, 2);
    j.sync_ticket().expect("ticket").sync().expect("sync");
    let file = storage.open(&tidemark_journal::journal::segment_name(0)).expect("open");
    let len = file.len().expect("len");
    // The last record of a sealed segment is damaged, and later records vouch it was durable.
    file.write_all_at(&[0xee], len - 1).expect("corrupt");
    assert!(matches!(reopen(&storage), Err(JournalError::Corrupt { .. })));
}

/// Sealed segments are synced by the next flush, not when they are sealed (that fsync used to
/// stall every writer under the group lock). A crash can then lose the unsynced tail of a
/// sealed segment while a later segment exists; recovery cuts both, as one torn tail.
#[test]
fn a_lost_unsynced_tail_of_a_sealed_segment_is_cut_with_the_later_segments() {
    let storage = SimStorage::new();
    let mut j = create(&storage);
    append_n(&mut j, 2);
    j.sync_ticket().expect("ticket").sync().expect("sync");
    append_n(&mut j, 10);
    assert!(j.segments().len() >= 3, "the unsynced appends crossed segments");
    storage.sync_dir().expect("the new segments' names are durable, their data is not");
    storage.crash(tidemark_journal::storage::CrashMode::DropUnsynced, 1);
    let (_j, seen, report) = reopen(&storage).expect("an unsynced tail is not corruption");
    assert_eq!(seen.len(), 2, "the synced records survive, the unsynced ones are gone");
    assert!(report.torn_tail.is_some());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Power cuts at random moments, with torn unsynced writes: every synced record survives,
    /// and what recovery returns is exactly a prefix of what was appended.
    #[test]
    fn power_cut_keeps_a_prefix_with_every_synced_record(
        ops in proptest::collection::vec(0u8..4, 1..60),
        seed in any::<u64>(),
    ) {
        let storage = SimStorage::new();
        let mut j = create(&storage);
        storage.sync_dir().expect("sync dir");
        let mut appended = Vec::new();
        let mut synced = 0usize;
        for (i, op) in ops.iter().enumerate() {
            if *op == 0 {
                j.sync_ticket().expect("ticket").sync().expect("sync");
                synced = appended.len();
            } else {
                let body = write(i as u64);
                j.append(Generation(1), UnixNanos(i as u64), &body).expect("append");
                appended.push(body);
            }
        }
        storage.crash(CrashMode::TearUnsynced, seed);
        let (_j, seen, _) = reopen(&storage).expect("recovery must succeed after a power cut");
        prop_assert!(seen.len() >= synced, "lost synced records: {} < {}", seen.len(), synced);
        prop_assert!(seen.len() <= appended.len());
        for (r, body) in seen.iter().zip(&appended) {
            prop_assert_eq!(&r.body, body);
        }
    }
}

/// Regression: with torn writes, the kernel may write back a later unsynced record while an
/// earlier one is lost. Recovery once refused such a journal as "corrupt"; both records were
/// unsynced, so cutting them is right.
#[test]
fn unsynced_records_after_a_torn_one_are_a_tail_not_corruption() {
    let storage = SimStorage::new();
    let mut j = create(&storage);
    append_n(&mut j, 1);
    j.sync_ticket().expect("ticket").sync().expect("sync");
    let torn_at = j.resume_point().location;
    append_n(&mut j, 2);
    let file = storage.open(&tidemark_journal::journal::segment_name(torn_at.segment)).expect("open");
    file.write_all_at(&[0xff; 8], torn_at.offset + 200).expect("tear the first unsynced record");
    let (_j, seen, report) = reopen(&storage).expect("a torn tail is not corruption");
    assert_eq!(seen.len(), 1);
    assert_eq!(report.torn_tail.map(|t| t.1), Some(torn_at.offset));
}

/// Partners compare chain hashes to detect divergence, so a record's chain must not depend on
/// site-local bookkeeping (how far behind the durable point it was written).
#[test]
fn the_chain_depends_on_content_not_on_local_durability() {
    use tidemark_journal::record::{encode, RecordMeta};
    let meta = |durable| RecordMeta {
        seq: Seq(9),
        generation: Generation(1),
        time: UnixNanos(5),
        durable: Seq(durable),
    };
    let prev = genesis_chain(GROUP);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    let chain_a = encode(meta(8), &write(1), &prev, &mut a);
    let chain_b = encode(meta(1), &write(1), &prev, &mut b);
    assert_ne!(a, b, "the durable lag is stored");
    assert_eq!(chain_a, chain_b);
    let chain_c = encode(meta(8), &write(2), &prev, &mut b);
    assert_ne!(chain_a, chain_c);
    // Damage to the lag field is still caught.
    a[61] ^= 1;
    assert!(tidemark_journal::record::decode(&a, Some(&prev)).is_err());
}
