//! Copying a journal record by record to a partner's journal (what replication does), with the
//! chain checked at every step.
#![allow(clippy::indexing_slicing)]

use std::sync::Arc;

use tidemark_journal::record::decode;
use tidemark_journal::storage::{SimStorage, Storage};
use tidemark_journal::{
    genesis_chain, Generation, Journal, JournalConfig, JournalError, RecordBody, Seq, UnixNanos, VolumeId,
};

const GROUP: u64 = 11;

fn journal() -> Journal {
    let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
    Journal::create(
        storage,
        GROUP,
        JournalConfig { segment_bytes_max: 16 << 10 },
        Seq(1),
        genesis_chain(GROUP),
    )
    .expect("create")
}

fn write(i: u64) -> RecordBody {
    RecordBody::Write {
        volume: VolumeId(1),
        offset: i * 4096,
        data: vec![i as u8; 1024 * (1 + (i as usize % 5))],
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
        let mut rest: &[u8] = &raw.bytes;
        while !rest.is_empty() {
            let rec = decode(rest, None).expect("decode");
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
    let rec5 = a.read_record(a.locate(Seq(5)).expect("locate")).expect("read");
    let before = b.bytes();
    match b.append_replica(&rec5) {
        Err(JournalError::Diverged { seq: 5, .. }) => {}
        other => panic!("expected divergence at seq 5, got {other:?}"),
    }
    assert_eq!(b.bytes(), before, "nothing was written");
    // A record out of order is refused too.
    let rec4 = a.read_record(a.locate(Seq(4)).expect("locate")).expect("read");
    let mut c = journal();
    assert!(c.append_replica(&rec4).is_err());
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
