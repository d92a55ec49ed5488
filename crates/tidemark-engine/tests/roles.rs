//! Role changes at the engine level: takeover with a fork point, a returning primary that keeps
//! its divergent tail as a salvage image and rewinds to the fork, takeover at an earlier point,
//! and the engine's half of a planned swap.

mod common;

use std::sync::Arc;

use common::{open, ship};

use tidemark_engine::group::Promotion;
use tidemark_engine::persist::Role;
use tidemark_engine::{Durability, Engine, EngineError, GroupOptions, ImageMode, Point};

fn block(engine: &Engine, export: &str, n: u64) -> Vec<u8> {
    let e = engine.open_export(export).expect("export");
    let mut buf = vec![0u8; 4096];
    e.read(n * 4096, &mut buf).expect("read");
    buf
}

fn write(engine: &Engine, n: u64, fill: u8) {
    let v = engine.open_export("data").expect("export");
    v.write(n * 4096, &[fill; 4096], Durability::Buffered).expect("write");
}

/// A protected pair: `db` with volume `data`, blocks 0..4 written with 1s and replicated.
fn pair(a: &std::path::Path, b: &std::path::Path) -> (Arc<Engine>, Arc<Engine>) {
    let primary = open(a);
    let secondary = open(b);
    primary.create_group("db", GroupOptions::default()).expect("group");
    let id = primary.group_handle("db").expect("g").id;
    secondary.create_secondary_group("db", id, GroupOptions::default(), 1).expect("secondary group");
    primary.create_volume("db", "data", 8 << 20, 4096).expect("volume");
    for n in 0..4 {
        write(&primary, n, 1);
    }
    primary.group_handle("db").expect("g").flush().expect("flush");
    assert!(ship(&primary, &secondary, "db", 1 << 20) > 0);
    (primary, secondary)
}

#[test]
fn takeover_then_failback_keeps_the_divergent_tail_and_rewinds_to_the_fork() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (old, new) = pair(a.path(), b.path());
    // The old primary writes a tail its partner never receives.
    write(&old, 1, 7);
    write(&old, 10, 8);
    old.group_handle("db").expect("g").flush().expect("flush");
    let old_last = old.group_handle("db").expect("g").position().last_seq;

    let fork = new.takeover("db", None, "test takeover").expect("takeover");
    assert_eq!(fork.generation, 2);
    assert!(fork.seq < old_last, "the fork is before the old primary's tail");
    assert_eq!(new.group("db").expect("group").role, "primary");
    write(&new, 2, 9);
    new.group_handle("db").expect("g").flush().expect("flush");

    // The old primary returns, learns generation 2 and demotes; hosts can no longer write.
    let g = old.group_handle("db").expect("g");
    g.demote(2, "fenced by partner").expect("demote");
    let v = old.open_export("data").expect("export");
    assert!(matches!(v.write(0, &[5u8; 4096], Durability::Fua), Err(EngineError::NotPrimary { .. })));
    let salvage = old.failback("db", fork.seq, fork.generation).expect("failback").expect("a salvage image");
    assert_eq!(salvage.mode, ImageMode::Salvage);
    let info = salvage.salvage.clone().expect("salvage info");
    assert_eq!((info.fork_seq, info.last_seq), (fork.seq.0, old_last.0));
    assert_eq!(info.blocks.get("data"), Some(&2), "blocks 1 and 10 were written after the fork");
    // The salvage image holds the tail's writes on top of the fork point.
    let export = format!("{}/data", salvage.name);
    assert_eq!(block(&old, &export, 1), vec![7u8; 4096]);
    assert_eq!(block(&old, &export, 10), vec![8u8; 4096]);
    assert_eq!(block(&old, &export, 0), vec![1u8; 4096]);
    assert_eq!(block(&old, &export, 2), vec![1u8; 4096], "not the new primary's write");
    let e = old.open_export(&export).expect("salvage export");
    assert!(e.desc().read_only);
    assert!(e.write(0, &[1u8; 4096], Durability::Fua).is_err(), "salvage images are read-only");

    // The rewound volume is the fork point's state, and the chain matches the new primary's.
    let p = g.position();
    assert_eq!(p.last_seq, fork.seq);
    assert_eq!(p.chain.0, fork.chain);
    assert_eq!(block(&old, "data", 1), vec![1u8; 4096]);
    assert_eq!(block(&old, "data", 10), vec![0u8; 4096]);

    // It continues the new primary's history with only what was written since the fork.
    let lineage = new.group_handle("db").expect("g").role_state();
    g.adopt_lineage(lineage.generation, &lineage.generations).expect("adopt");
    let shipped = ship(&new, &old, "db", 1 << 20);
    assert_eq!(shipped, new.group_handle("db").expect("g").position().last_seq.0 - fork.seq.0);
    for n in 0..12 {
        assert_eq!(block(&old, "data", n), block(&new, "data", n), "block {n}");
    }

    // All of it survives a restart.
    old.shutdown().expect("shutdown");
    drop((old, v, e, g));
    let old = open(a.path());
    assert_eq!(old.group("db").expect("group").role, "secondary");
    assert_eq!(block(&old, &export, 1), vec![7u8; 4096]);
    assert_eq!(block(&old, "data", 2), vec![9u8; 4096]);
    let listed = old.images().into_iter().find(|i| i.name == salvage.name).expect("listed");
    assert_eq!(listed.salvage, Some(info));
}

#[test]
fn failback_is_idempotent_and_needs_no_salvage_without_a_tail() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (old, new) = pair(a.path(), b.path());
    let fork = new.takeover("db", None, "test").expect("takeover");
    let g = old.group_handle("db").expect("g");
    g.demote(2, "fenced").expect("demote");
    assert!(old.failback("db", fork.seq, 2).expect("failback").is_none());
    assert!(old.images().is_empty());
    assert!(old.failback("db", fork.seq, 2).expect("again").is_none());
}

#[test]
fn failback_refuses_to_cut_history_an_image_shows() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (old, new) = pair(a.path(), b.path());
    write(&old, 5, 3);
    old.group_handle("db").expect("g").flush().expect("flush");
    old.create_image("db", &Point::Latest, "late", ImageMode::ReadOnly).expect("image");
    let fork = new.takeover("db", None, "test").expect("takeover");
    old.group_handle("db").expect("g").demote(2, "fenced").expect("demote");
    let err = old.failback("db", fork.seq, 2).expect_err("refused");
    assert!(err.to_string().contains("image late"), "{err}");
    old.delete_image("late").expect("delete");
    assert!(old.failback("db", fork.seq, 2).expect("failback").is_some());
}

#[test]
fn takeover_at_an_earlier_point_rolls_back_under_the_new_generation() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (old, new) = pair(a.path(), b.path());
    old.create_bookmark("db", "good").expect("bookmark");
    write(&old, 0, 66); // the "bad write"
    old.group_handle("db").expect("g").flush().expect("flush");
    ship(&old, &new, "db", 1 << 20);
    assert_eq!(block(&new, "data", 0), vec![66u8; 4096]);
    let fork = new.takeover("db", Some(&Point::Bookmark("good".into())), "recover").expect("takeover");
    assert_eq!(block(&new, "data", 0), vec![1u8; 4096]);
    let g = new.group_handle("db").expect("g");
    assert!(g.position().last_seq > fork.seq, "the rollback is journaled after the fork");
    assert_eq!(g.role_state().fork_point, Some(fork));
    write(&new, 3, 4);
}

#[test]
fn a_bad_takeover_point_leaves_the_secondary_untouched() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (_old, new) = pair(a.path(), b.path());
    assert!(new.takeover("db", Some(&Point::Bookmark("nope".into())), "x").is_err());
    let g = new.group_handle("db").expect("g");
    assert_eq!(g.role(), Role::Secondary);
    assert_eq!(g.generation(), 1);
}

#[test]
fn a_swap_refuses_writes_from_its_start_and_leaves_one_primary_per_generation() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (old, new) = pair(a.path(), b.path());
    let g = old.group_handle("db").expect("g");
    let position = g.begin_swap(2).expect("begin");
    let v = old.open_export("data").expect("export");
    assert!(matches!(v.write(0, &[5u8; 4096], Durability::Fua), Err(EngineError::RoleChanging { .. })));
    ship(&old, &new, "db", 1 << 20);
    let s = new.group_handle("db").expect("g");
    assert_eq!(s.position().last_seq, position.last_seq);
    assert_eq!(s.position().chain, position.chain);
    s.promote(2, Promotion::Swap, "swap").expect("promote");
    assert_eq!(s.role_state().fork_point, None, "a swap forks nothing");
    g.demote(2, "swap").expect("demote");
    assert_eq!(g.role(), Role::Secondary);
    g.adopt_lineage(2, &s.role_state().generations).expect("adopt");
    write(&new, 7, 7);
    s.flush().expect("flush");
    assert_eq!(ship(&new, &old, "db", 1 << 20), 1);
    assert_eq!(block(&old, "data", 7), vec![7u8; 4096]);
    let changes = g.role_state().role_changes;
    assert_eq!(
        changes.last().map(|c| (c.from, c.to, c.generation)),
        Some((Role::Primary, Role::Secondary, 2))
    );
}

#[test]
fn an_unfinished_swap_still_refuses_writes_after_a_restart_until_called_off() {
    let (a, b) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (old, _new) = pair(a.path(), b.path());
    old.group_handle("db").expect("g").begin_swap(2).expect("begin");
    old.shutdown().expect("shutdown");
    drop(old);
    let old = open(a.path());
    let g = old.group_handle("db").expect("g");
    assert_eq!(g.role_state().swap_pending.map(|s| s.generation), Some(2));
    let v = old.open_export("data").expect("export");
    assert!(matches!(v.write(0, &[5u8; 4096], Durability::Fua), Err(EngineError::RoleChanging { .. })));
    g.abort_swap().expect("abort");
    v.write(0, &[5u8; 4096], Durability::Fua).expect("writes resume");
}
