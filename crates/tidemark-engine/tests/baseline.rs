//! Baselines at the engine level: a secondary stages its partner's image at one seq beside its
//! own copy, switches to it atomically, and continues with the partner's journal after it; a
//! crash before the commit point leaves the old copy, a crash after it finishes the switch.

mod common;

use std::sync::Arc;

use common::{open, ship};

use tidemark_engine::baseline::StagedBaseline;
use tidemark_engine::{Durability, Engine, EngineError, GroupOptions, ImageMode, Point};
use tidemark_journal::storage::OsStorage;
use tidemark_journal::Seq;

const VOLUME_BYTES: u64 = 8 << 20;

fn write(engine: &Engine, block: u64, fill: u8) {
    let v = engine.open_export("data").expect("export");
    v.write(block * 4096, &[fill; 4096], Durability::Buffered).expect("write");
}

fn image(engine: &Engine) -> Vec<u8> {
    let mut buf = vec![0u8; VOLUME_BYTES as usize];
    engine.open_export("data").expect("export").read(0, &mut buf).expect("read");
    buf
}

/// A primary with history, and an empty secondary of its group.
fn pair(a: &std::path::Path, b: &std::path::Path) -> (Arc<Engine>, Arc<Engine>) {
    let primary = open(a);
    let secondary = open(b);
    primary.create_group("db", GroupOptions::default()).expect("group");
    let id = primary.group_handle("db").expect("g").id;
    secondary.create_secondary_group("db", id, GroupOptions::default(), 1).expect("secondary group");
    primary.create_volume("db", "data", VOLUME_BYTES, 4096).expect("volume");
    for block in 0..64 {
        write(&primary, block * 3, (block % 250) as u8 + 1);
    }
    (primary, secondary)
}

/// Stage the primary's image at its baseline point in the secondary, block by block, skipping
/// zero blocks (as the replication session does).
fn stage(primary: &Engine, secondary: &Engine) -> StagedBaseline {
    let p = primary.group_handle("db").expect("g");
    let target = p.baseline_point().expect("baseline point");
    let seq = target.seq;
    let volume = target.volumes[0].id;
    let mut staged = secondary.begin_baseline("db", target).expect("begin");
    let mut buf = vec![0u8; 4096];
    for block in 0..VOLUME_BYTES / 4096 {
        p.read(volume, block * 4096, &mut buf, Some(seq)).expect("read at the point");
        if buf.iter().any(|&b| b != 0) {
            staged.write(volume.0, block * 4096, &buf).expect("stage");
        }
    }
    staged
}

#[test]
fn a_baseline_switches_atomically_and_the_journal_continues_after_it() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (primary, secondary) = pair(a.path(), b.path());
    let staged = stage(&primary, &secondary);
    assert_eq!(staged.bytes(), 64 * 4096, "only the non-zero blocks are staged");
    let seq = staged.target().seq;
    // Until the switch, the secondary has no volume: its old copy is what it shows.
    assert!(secondary.open_export("data").is_none());
    let at = secondary.finish_baseline("db", staged).expect("finish");
    assert_eq!(at, seq);
    assert!(image(&primary) == image(&secondary), "the secondary is the primary's image");
    let (pp, sp) = (
        primary.group_handle("db").expect("p").position(),
        secondary.group_handle("db").expect("s").position(),
    );
    assert_eq!((sp.last_seq, sp.chain, sp.first_seq), (pp.last_seq, pp.chain, Seq(seq.0 + 1)));
    // History before the baseline is not there to roll back to; after it, it is.
    assert!(secondary.create_image("db", &Point::Seq(Seq(seq.0 - 1)), "old", ImageMode::ReadOnly).is_err());
    // The journal continues: later records apply on top, chain checked.
    write(&primary, 1, 0xEE);
    primary.group_handle("db").expect("g").flush().expect("flush");
    assert_eq!(ship(&primary, &secondary, "db", 1 << 20), 1);
    assert!(image(&primary) == image(&secondary));
    // And all of it survives a restart.
    drop(secondary);
    let secondary = open(b.path());
    assert!(image(&primary) == image(&secondary), "after a restart");
    assert_eq!(secondary.group("db").expect("g").role, "secondary");
}

#[test]
fn a_baseline_cut_short_leaves_the_old_copy_and_no_staged_files() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (primary, secondary) = pair(a.path(), b.path());
    primary.group_handle("db").expect("g").flush().expect("flush");
    ship(&primary, &secondary, "db", 1 << 20);
    let before = image(&secondary);
    write(&primary, 5, 0x55);
    let staged = stage(&primary, &secondary);
    drop(staged);
    drop(secondary); // a crash before the commit point
    let secondary = open(b.path());
    assert!(image(&secondary) == before, "the old copy is intact");
    let id = secondary.group_handle("db").expect("g").id;
    let dir = b.path().join("groups").join(format!("{id:016x}"));
    let staged: Vec<_> = std::fs::read_dir(&dir)
        .expect("group dir")
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("baseline."))
        .collect();
    assert!(staged.is_empty(), "start-up removed {staged:?}");
}

#[test]
fn a_crash_after_the_commit_point_finishes_the_switch_at_start_up() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (primary, secondary) = pair(a.path(), b.path());
    let staged = stage(&primary, &secondary);
    let id = secondary.group_handle("db").expect("g").id;
    let dir = b.path().join("groups").join(format!("{id:016x}"));
    let storage = OsStorage::new(dir).expect("storage");
    let control = tidemark_engine::persist::read_control(&storage).expect("control").expect("present");
    staged.commit(&control).expect("commit"); // and the site dies before switching
    drop(secondary);
    let secondary = open(b.path());
    assert!(image(&primary) == image(&secondary), "start-up finished the switch");
    let sp = secondary.group_handle("db").expect("s").position();
    assert_eq!(sp.chain, primary.group_handle("db").expect("p").position().chain);
}

#[test]
fn a_baseline_is_refused_while_images_read_the_history_it_replaces() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (primary, secondary) = pair(a.path(), b.path());
    primary.group_handle("db").expect("g").flush().expect("flush");
    ship(&primary, &secondary, "db", 1 << 20);
    secondary.create_image("db", &Point::Latest, "look", ImageMode::ReadOnly).expect("image");
    let target = primary.group_handle("db").expect("g").baseline_point().expect("point");
    match secondary.begin_baseline("db", target) {
        Err(EngineError::Conflict(reason)) => assert!(reason.contains("look"), "{reason}"),
        Err(other) => panic!("expected a conflict naming the image, got {other}"),
        Ok(_) => panic!("expected a conflict naming the image, got a staged baseline"),
    }
    // A primary never takes one.
    let target = primary.group_handle("db").expect("g").baseline_point().expect("point");
    assert!(matches!(primary.begin_baseline("db", target), Err(EngineError::Conflict(_))));
}
