//! Appending: the writeback cue, vectored writes.
#![allow(clippy::indexing_slicing)] // Tests index freely; the lint guards the library code.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tidemark_journal::storage::{OsStorage, SimStorage, Storage};
use tidemark_journal::{
    genesis_chain, Generation, Journal, JournalConfig, RecordBody, Seq, UnixNanos, VolumeId,
};

#[test]
fn the_writeback_hook_fires_once_per_interval_of_appended_bytes() {
    let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
    let mut j =
        Journal::create(storage, 7, JournalConfig { segment_bytes_max: 64 << 10 }, Seq(1), genesis_chain(7))
            .expect("create");
    let calls = Arc::new(AtomicU64::new(0));
    let counted = calls.clone();
    let every = 10_000;
    j.set_writeback(
        every,
        Box::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }),
    );
    let mut appended = 0u64;
    for i in 0..100u64 {
        let body =
            RecordBody::Write { volume: VolumeId(1), offset: i * 4096, data: vec![i as u8; 4096].into() };
        let before = j.stats().appended_bytes_total.load(Ordering::Relaxed);
        j.append(Generation(1), UnixNanos(1000 + i), &body).expect("append");
        appended += j.stats().appended_bytes_total.load(Ordering::Relaxed) - before;
        // The hook fires when the bytes since the last call reach `every`; records are whole, so
        // each call covers at least `every` bytes and less than `every` plus one record.
        let fired = calls.load(Ordering::SeqCst);
        assert!(fired * every <= appended, "fired {fired} times for {appended} bytes");
        assert!(appended < (fired + 1) * (every + 4096 + 256), "fired {fired} times for {appended} bytes");
    }
    // Each call covers less than `every` plus one record, so 100 records of 4 KiB fire it often.
    assert!(calls.load(Ordering::SeqCst) >= appended / (every + 4096 + 256), "fired too rarely");
    assert!(calls.load(Ordering::SeqCst) >= 25);
}

/// A vectored write of more buffers than one `pwritev` takes lands as their concatenation would,
/// on a real file and on the simulated disk alike.
#[test]
fn a_vectored_write_is_the_write_of_its_buffers_joined() {
    let dir = tempfile::tempdir().expect("tempdir");
    let os: Arc<dyn Storage> = Arc::new(OsStorage::new(dir.path()).expect("storage"));
    let sim: Arc<dyn Storage> = Arc::new(SimStorage::new());
    // 3000 buffers of 0 to 99 bytes (some empty), past IOV_MAX (1024).
    let bufs: Vec<Vec<u8>> = (0..3000u32).map(|i| vec![(i % 251) as u8; (i * 7 % 100) as usize]).collect();
    let slices: Vec<&[u8]> = bufs.iter().map(Vec::as_slice).collect();
    let joined = bufs.concat();
    for storage in [os, sim] {
        let file = storage.open("f").expect("open");
        file.write_all_at(&[0xEE; 10], 0).expect("write");
        file.write_all_vectored_at(&slices, 10).expect("vectored write");
        let mut back = vec![0; joined.len()];
        file.read_exact_at(&mut back, 10).expect("read");
        assert!(back == joined, "the buffers, joined, after the first write");
        assert_eq!(file.len().expect("len"), 10 + joined.len() as u64);
    }
}
