//! A group copied to a second engine the way replication does it: read durable records on the
//! primary, apply them on a secondary that shares the group id.

mod common;

use common::{open, ship};

use tidemark_engine::{Durability, EngineError, GroupOptions, ImageMode, Point};
use tidemark_journal::record::{self, decode_verified, RecordMeta};
use tidemark_journal::{ChainHash, RecordBody, Seq};

#[test]
fn a_secondary_receives_volumes_data_and_bookmarks_in_band() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let primary = open(a.path());
    let secondary = open(b.path());
    primary.create_group("db", GroupOptions::default()).expect("group");
    let id = primary.group_handle("db").expect("g").id;
    secondary.create_secondary_group("db", id, GroupOptions::default(), 1).expect("secondary group");
    primary.create_volume("db", "data", 8 << 20, 4096).expect("volume");
    let v = primary.open_export("data").expect("export");
    v.write(0, &[1u8; 65536], Durability::Buffered).expect("write");
    primary.create_bookmark("db", "one").expect("bookmark");
    v.write(4096, &[2u8; 4096], Durability::Buffered).expect("write");
    v.trim(1 << 20, 1 << 20, Durability::Buffered).expect("trim");
    // Not yet durable on the primary: nothing past the bookmark ships.
    let before = ship(&primary, &secondary, "db", 64 << 10);
    v.flush().expect("flush");
    let after = ship(&primary, &secondary, "db", 64 << 10);
    assert!(after > 0, "flushed records ship ({before} before the flush)");

    let info = secondary.group("db").expect("group");
    assert_eq!(info.role, "secondary");
    assert_eq!(info.volumes, vec!["data".to_string()]);
    let sv = secondary.open_export("data").expect("replica export");
    assert!(sv.desc().read_only, "a secondary's volume is read-only to hosts");
    assert!(matches!(sv.write(0, &[9u8; 4096], Durability::Fua), Err(EngineError::NotPrimary { .. })));
    assert!(matches!(secondary.create_bookmark("db", "x"), Err(EngineError::NotPrimary { .. })));
    let (mut x, mut y) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    v.read(0, &mut x).expect("read primary");
    sv.read(0, &mut y).expect("read secondary");
    assert!(x == y, "the secondary equals the primary");
    // Bookmarks arrived in-band, and images of the past work on the secondary.
    assert_eq!(secondary.bookmarks("db").expect("bookmarks")[0].name, "one");
    secondary.create_image("db", &Point::Bookmark("one".into()), "past", ImageMode::ReadOnly).expect("image");
    let mut buf = vec![0u8; 4096];
    secondary.open_export("past/data").expect("image export").read(4096, &mut buf).expect("read");
    assert_eq!(buf, vec![1u8; 4096]);
    let (pp, sp) = (
        primary.group_handle("db").expect("p").position(),
        secondary.group_handle("db").expect("s").position(),
    );
    assert_eq!((pp.last_seq, pp.chain), (sp.last_seq, sp.chain));
}

#[test]
fn a_record_that_does_not_continue_the_secondary_history_is_refused_unwritten() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let primary = open(a.path());
    let secondary = open(b.path());
    primary.create_group("g", GroupOptions::default()).expect("group");
    let id = primary.group_handle("g").expect("g").id;
    secondary.create_secondary_group("g", id, GroupOptions::default(), 1).expect("secondary");
    primary.create_volume("g", "v", 1 << 20, 4096).expect("volume");
    let v = primary.open_export("v").expect("export");
    v.write(0, &[5u8; 4096], Durability::Fua).expect("write");
    ship(&primary, &secondary, "g", 64 << 10);
    v.write(0, &[6u8; 4096], Durability::Fua).expect("write");
    let p = primary.group_handle("g").expect("p");
    let s = secondary.group_handle("g").expect("s");
    let next = Seq(s.position().last_seq.0 + 1);
    let raw = p.read_for_shipping(p.locate(next).expect("locate"), next, 1 << 20).expect("read");
    let genuine = decode_verified(&raw.concat(), None).expect("decode");
    // The same seq with other content, whole and checksummed, on top of another history: what
    // a split-brain partner would send.
    let RecordBody::Write { volume, offset, .. } = genuine.body else { panic!("a write") };
    let meta = RecordMeta {
        seq: genuine.seq,
        generation: genuine.generation,
        time: genuine.time,
        durable: genuine.seq,
    };
    let mut bytes = Vec::new();
    let body = RecordBody::Write { volume, offset, data: vec![7; 4096].into() };
    record::encode(meta, &body, &ChainHash([7; 32]), &mut bytes);
    let forged = decode_verified(&bytes, None).expect("a well-formed record");
    let before = s.position();
    match s.apply_replicated(&[forged]) {
        Err(EngineError::Diverged { reason, .. }) => {
            assert!(reason.contains(&next.0.to_string()), "{reason}")
        }
        other => panic!("expected divergence, got {other:?}"),
    }
    assert_eq!(s.position().last_seq, before.last_seq, "nothing was written");
    s.apply_replicated(&[genuine]).expect("the genuine record still applies");
}
