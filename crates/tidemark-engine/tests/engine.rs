//! The engine through its public API, on a real data directory.

use std::sync::Arc;
use std::time::Duration;

use tidemark_engine::{
    Durability, Engine, EngineConfig, EngineError, EngineEvent, GroupOptions, ImageMode, MemoryEvents, Point,
    SystemClock,
};

fn open(dir: &std::path::Path, events: Arc<MemoryEvents>) -> Arc<Engine> {
    let mut config = EngineConfig::new(dir, events);
    // Maintenance is driven by hand in these tests.
    config.maintenance_interval = Duration::from_secs(3600);
    Engine::open(config, Arc::new(SystemClock)).expect("open engine")
}

/// An engine in `dir` with group `g`, whose 16 MiB journal has 2 MiB segments, and its volume
/// `v` of `volume_bytes` in 4 KiB blocks, opened.
fn small_journal(
    dir: &std::path::Path,
    volume_bytes: u64,
) -> (Arc<Engine>, Arc<tidemark_engine::ExportHandle>) {
    let engine = open(dir, Arc::new(MemoryEvents::default()));
    engine
        .create_group("g", GroupOptions { retention_seconds: 86400, journal_max_bytes: 16 << 20 })
        .expect("group");
    engine.create_volume("g", "v", volume_bytes, 4096).expect("volume");
    let export = engine.open_export("v").expect("export");
    (engine, export)
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| seed.wrapping_mul(31).wrapping_add((i % 251) as u8)).collect()
}

#[test]
fn unflushed_writes_are_written_back_in_the_background() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), Arc::new(MemoryEvents::default()));
    engine.create_group("db", GroupOptions::default()).expect("group");
    engine.create_volume("db", "data", 256 << 20, 4096).expect("volume");
    let export = engine.open_export("data").expect("export");
    let group = engine.group_handle("db").expect("group");
    let before = group.durable_seq();
    // Twice the writeback interval, never flushed by the "host".
    let chunk = pattern(3, 1 << 20);
    for i in 0..((2 * tidemark_engine::writeback::WRITEBACK_BYTES) >> 20) {
        export.write(i << 20, &chunk, Durability::Buffered).expect("write");
    }
    // The writeback thread flushes once an interval's worth of appends is in: the durable seq
    // moves without any flush from here. (A liveness check with a generous deadline, not a timing.)
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while group.durable_seq() <= before {
        assert!(std::time::Instant::now() < deadline, "no background writeback within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(group.durable_seq() <= group.position().last_seq);
}

#[test]
fn data_survives_shutdown_and_the_checkpoint_bounds_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = Arc::new(MemoryEvents::default());
    let engine = open(dir.path(), events.clone());
    engine.create_group("db", GroupOptions::default()).expect("group");
    engine.create_volume("db", "data", 64 << 20, 4096).expect("volume");
    let export = engine.open_export("data").expect("export");
    for i in 0..300u64 {
        export.write(i * 4096, &pattern(i as u8, 4096), Durability::Buffered).expect("write");
    }
    export.flush().expect("flush");
    engine.shutdown().expect("shutdown writes a checkpoint");
    drop(export);
    drop(engine);

    let engine = open(dir.path(), events.clone());
    assert_eq!(
        engine.records_replayed("db").expect("group"),
        0,
        "a fresh checkpoint leaves nothing to replay"
    );
    let export = engine.open_export("data").expect("export");
    for i in 0..300u64 {
        let mut buf = vec![0u8; 4096];
        export.read(i * 4096, &mut buf).expect("read");
        assert_eq!(buf, pattern(i as u8, 4096), "block {i}");
    }
    for i in 0..7u64 {
        export.write(i * 4096, &pattern(99, 4096), Durability::Fua).expect("write");
    }
    // No shutdown: the seven writes after the checkpoint are replayed from the journal.
    drop(export);
    drop(engine);
    let engine = open(dir.path(), events);
    assert_eq!(engine.records_replayed("db").expect("group"), 7);
    let mut buf = vec![0u8; 4096];
    engine.open_export("data").expect("export").read(6 * 4096, &mut buf).expect("read");
    assert_eq!(buf, pattern(99, 4096));
}

#[test]
fn images_show_the_past_while_the_volume_changes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), Arc::new(MemoryEvents::default()));
    engine.create_group("g", GroupOptions::default()).expect("group");
    engine.create_volume("g", "v", 1 << 20, 4096).expect("volume");
    let v = engine.open_export("v").expect("export");
    v.write(0, &[1u8; 8192], Durability::Fua).expect("write");
    engine.create_bookmark("g", "before").expect("bookmark");
    let ro = engine
        .create_image("g", &Point::Bookmark("before".into()), "past", ImageMode::ReadOnly)
        .expect("image");
    assert_eq!(ro.exports, vec!["past/v".to_string()]);
    let rw = engine.create_image("g", &Point::Latest, "test", ImageMode::Writable).expect("writable image");
    v.write(0, &[2u8; 8192], Durability::Fua).expect("write after image");

    let past = engine.open_export("past/v").expect("image export");
    assert!(past.desc().read_only);
    let mut buf = vec![0u8; 8192];
    past.read(0, &mut buf).expect("read image");
    assert_eq!(buf, vec![1u8; 8192], "the image keeps the bookmarked content");
    assert!(matches!(past.write(0, &[9u8; 512], Durability::Buffered), Err(EngineError::ReadOnly(_))));

    let test = engine.open_export(&format!("{}/v", rw.name)).expect("writable export");
    test.write(512, &[7u8; 100], Durability::Fua).expect("write overlay");
    test.read(0, &mut buf).expect("read overlay");
    let mut expected = vec![1u8; 8192];
    expected[512..612].fill(7);
    assert_eq!(buf, expected, "overlay on top of the image's point");
    v.read(0, &mut buf).expect("read volume");
    assert_eq!(buf, vec![2u8; 8192], "the overlay never touches the volume");

    engine.delete_image("test").expect("delete");
    assert!(engine.open_export("test/v").is_none());
    assert!(
        matches!(engine.delete_volume("v"), Err(EngineError::Conflict(_))),
        "image 'past' still views the group"
    );
}

#[test]
fn the_size_limit_trims_history_with_an_event_and_points_before_it_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = Arc::new(MemoryEvents::default());
    let engine = open(dir.path(), events.clone());
    engine
        .create_group("g", GroupOptions { retention_seconds: 86400, journal_max_bytes: 16 << 20 })
        .expect("group");
    engine.create_volume("g", "v", 8 << 20, 4096).expect("volume");
    let v = engine.open_export("v").expect("export");
    let first = engine.group("g").expect("group").newest_point;
    // 40 MiB of writes into a 16 MiB journal over an 8 MiB volume.
    for round in 0..5u8 {
        for i in 0..8u64 {
            v.write(i << 20, &pattern(round, 1 << 20), Durability::Buffered).expect("write");
        }
    }
    v.flush().expect("flush");
    engine.maintain();
    let info = engine.group("g").expect("group");
    assert!(info.journal_bytes <= 16 << 20, "journal is {} bytes after trimming", info.journal_bytes);
    assert!(info.oldest_seq > 0);
    let trimmed = events
        .0
        .lock()
        .iter()
        .any(|e| matches!(e, EngineEvent::HistoryTrimmed { group, .. } if group == "g"));
    assert!(trimmed, "trimming inside the retention window must raise an event");
    let mut buf = vec![0u8; 1 << 20];
    v.read(3 << 20, &mut buf).expect("read");
    assert_eq!(buf, pattern(4, 1 << 20), "trimming never changes the newest content");
    let point: Point = first.parse().expect("point");
    match engine.rollback("g", &point, &|_| {}) {
        Err(EngineError::PointOutOfRange { oldest_seq, .. }) => assert_eq!(oldest_seq, info.oldest_seq),
        other => panic!("expected an out-of-range error, got {other:?}"),
    }
}

#[test]
fn a_corrupt_group_fails_alone_and_the_site_keeps_serving_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = Arc::new(MemoryEvents::default());
    let engine = open(dir.path(), events.clone());
    for g in ["bad", "good"] {
        engine.create_group(g, GroupOptions::default()).expect("group");
        engine.create_volume(g, &format!("{g}-v"), 1 << 20, 4096).expect("volume");
        let v = engine.open_export(&format!("{g}-v")).expect("export");
        v.write(0, &[3u8; 4096], Durability::Fua).expect("write");
        v.write(4096, &[4u8; 4096], Durability::Fua).expect("write");
    }
    drop(engine);
    // Damage the first data record of group "bad" (a later record vouches it was durable).
    let groups = std::fs::read_dir(dir.path().join("groups")).expect("groups dir");
    let mut damaged = false;
    for entry in groups {
        let seg = entry.expect("entry").path().join("journal-0000000000000000.seg");
        let bytes = std::fs::read(&seg).expect("segment");
        if bytes.windows(6).any(|w| w == b"bad-v\0" || w.starts_with(b"bad-v")) {
            let mut bytes = bytes;
            let pos = bytes.windows(4096).position(|w| w.iter().all(|&b| b == 3)).expect("data record");
            bytes[pos + 10] ^= 0xff;
            std::fs::write(&seg, bytes).expect("write");
            damaged = true;
        }
    }
    assert!(damaged);
    let engine = open(dir.path(), events.clone());
    let bad = engine.group("bad").expect("listed");
    assert_eq!(bad.state, "failed");
    let reason = bad.state_reason.expect("reason");
    assert!(reason.contains("journal-0000000000000000.seg") && reason.contains("offset"), "{reason}");
    assert!(engine.open_export("bad-v").is_none());
    let mut buf = vec![0u8; 4096];
    engine.open_export("good-v").expect("good export").read(4096, &mut buf).expect("read");
    assert_eq!(buf, vec![4u8; 4096]);
}

#[test]
fn bad_arguments_are_refused_with_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = open(dir.path(), Arc::new(MemoryEvents::default()));
    assert!(matches!(
        engine.create_group("../x", GroupOptions::default()),
        Err(EngineError::InvalidArgument(_))
    ));
    engine.create_group("g", GroupOptions::default()).expect("group");
    assert!(matches!(
        engine.create_group("g", GroupOptions::default()),
        Err(EngineError::AlreadyExists { .. })
    ));
    assert!(matches!(engine.create_volume("g", "v", 1000, 4096), Err(EngineError::InvalidArgument(_))));
    assert!(matches!(engine.create_volume("g", "v", 4096, 1024), Err(EngineError::InvalidArgument(_))));
    assert!(matches!(engine.create_volume("g", "v", 65 << 40, 4096), Err(EngineError::InvalidArgument(_))));
    engine.create_volume("g", "v", 64 << 40, 4096).expect("64 TiB volume");
    assert!(matches!(engine.resize_volume("v", 1 << 30), Err(EngineError::InvalidArgument(_))));
    let v = engine.open_export("v").expect("export");
    assert!(v.write((64 << 40) - 4096, &[1u8; 8192], Durability::Buffered).is_err());
    v.write((64 << 40) - 4096, &[1u8; 4096], Durability::Buffered).expect("last block of 64 TiB");
    v.trim(0, 64 << 40, Durability::Fua).expect("trim the whole 64 TiB volume");
    let err =
        engine.rollback("g", &Point::Seq(tidemark_engine::Seq(1_000_000)), &|_| {}).expect_err("future seq");
    assert!(err.to_string().contains("outside the recoverable range"), "{err}");
}

#[test]
fn a_pinned_history_is_never_trimmed_past_the_pin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let events = Arc::new(MemoryEvents::default());
    let engine = open(dir.path(), events.clone());
    engine
        .create_group("g", GroupOptions { retention_seconds: 86400, journal_max_bytes: 16 << 20 })
        .expect("group");
    engine.create_volume("g", "v", 8 << 20, 4096).expect("volume");
    engine.pin("g", "replication", Some(tidemark_engine::Seq(3)));
    let v = engine.open_export("v").expect("export");
    for round in 0..5u8 {
        for i in 0..8u64 {
            v.write(i << 20, &pattern(round, 1 << 20), Durability::Buffered).expect("write");
        }
    }
    v.flush().expect("flush");
    engine.maintain();
    let info = engine.group("g").expect("group");
    assert!(info.oldest_seq <= 3, "trimmed past the pin to seq {}", info.oldest_seq);
    assert!(
        events.0.lock().iter().any(|e| matches!(e, EngineEvent::JournalPinned { .. })),
        "no journal_pinned event"
    );
    engine.pin("g", "replication", None);
    engine.maintain();
    assert!(engine.group("g").expect("group").oldest_seq > 3, "released: trimming proceeds");
}

/// `try_read` reads only what is in memory; where it answers, it answers as `read` does, from the
/// journal, the base image and never-written blocks alike. An unaligned read it leaves to
/// `read`; errors are errors.
#[test]
fn a_read_from_memory_reads_what_a_waiting_read_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, v) = small_journal(dir.path(), 16 << 20);
    // The first 8 MiB once, then its first half 8 times over: past the journal's limit, so the
    // first round is trimmed into the base image; the last 8 MiB are never written.
    for i in 0..8u64 {
        v.write(i << 20, &pattern(i as u8, 1 << 20), Durability::Buffered).expect("write");
    }
    for round in 1..=8u8 {
        for i in 0..4u64 {
            v.write(
                i << 20,
                &pattern(round.wrapping_mul(16).wrapping_add(i as u8), 1 << 20),
                Durability::Buffered,
            )
            .expect("write");
        }
    }
    v.flush().expect("flush");
    engine.maintain();
    assert!(engine.group("g").expect("group").oldest_seq > 8, "the first round is in the base image");
    let reads = [(0, 4096), (4 << 20, 4096), ((4 << 20) - 8192, 16384), (6 << 20, 65536), (12 << 20, 4096)];
    let mut answered = 0;
    for (offset, len) in reads {
        let mut want = vec![0u8; len];
        v.read(offset, &mut want).expect("read");
        let mut got = vec![0xAAu8; len];
        if let Some(read) = v.try_read(offset, &mut got) {
            read.expect("read from memory");
            assert_eq!(got, want, "{len} bytes at {offset}");
            answered += 1;
        }
    }
    // Each range was just read, so its bytes are in the page cache.
    assert_eq!(answered, reads.len(), "every read found its bytes in memory");
    assert!(v.try_read(100, &mut [0; 10]).is_none(), "unaligned");
    assert!(matches!(v.try_read(16 << 20, &mut [0; 4096]), Some(Err(EngineError::InvalidArgument(_)))));
}

/// The inline paths never wait for the group lock: while anything holds it, `try_write` and
/// `try_read` step aside (`None`), and a write left this way has written nothing.
#[test]
fn the_inline_paths_step_aside_while_the_group_lock_is_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, export) = small_journal(dir.path(), 64 << 20);
    let group = engine.group_handle("g").expect("group");
    export.write(0, &pattern(1, 4096), Durability::Buffered).expect("write");
    let mut buf = vec![0; 4096];
    assert!(export.try_read(0, &mut buf).is_some(), "answered at once with the lock free");
    let before = group.position().last_seq;
    let (wrote, read) = group.with_state(|_| {
        let mut buf = vec![0; 4096];
        (export.try_write(4096, &pattern(2, 4096)).is_none(), export.try_read(0, &mut buf).is_none())
    });
    assert!(wrote && read, "a held lock sends both to the caller's waiting path");
    assert_eq!(group.position().last_seq, before, "the write stepped aside unwritten");
    assert!(
        matches!(export.try_write(4096, &pattern(2, 4096)), Some(Ok(_))),
        "and is done once the lock is free"
    );
}

/// `try_write` writes only what cannot wait; the rest (here: an unaligned write and the writes
/// that would start a journal segment) it leaves, untouched, to `write`. Errors are errors.
#[test]
fn a_write_that_could_wait_is_left_to_the_caller() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, export) = small_journal(dir.path(), 64 << 20);
    let group = engine.group_handle("g").expect("group");
    let before = group.position().last_seq;
    assert!(export.try_write(100, &[1; 10]).is_none());
    assert_eq!(group.position().last_seq, before, "a write left to the caller wrote nothing");
    let (mut inline, mut left) = (0, 0);
    for i in 0..1024u64 {
        let data = pattern(i as u8, 4096);
        match export.try_write(i * 4096, &data) {
            Some(written) => {
                written.expect("write at once");
                inline += 1;
            }
            None => {
                export.write(i * 4096, &data, Durability::Buffered).expect("write");
                left += 1;
            }
        }
    }
    assert!(left >= 1 && inline >= 1000, "{inline} written at once, {left} left");
    let mut buf = vec![0; 4096];
    for i in 0..1024u64 {
        export.read(i * 4096, &mut buf).expect("read");
        assert_eq!(buf, pattern(i as u8, 4096), "block {i}");
    }
    assert!(matches!(export.try_write(64 << 20, &[0; 4096]), Some(Err(EngineError::InvalidArgument(_)))));
}
