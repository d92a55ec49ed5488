//! Model-based test of a group (invariants 1, 2 and 4): random writes, unaligned writes,
//! zeroes, flushes, bookmarks, rollbacks, checkpoints, retention trims and power cuts on a
//! simulated disk, checked against an in-memory model of every volume at every seq.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use tidemark_engine::group::Group;
use tidemark_engine::{Clock, GroupOptions, ManualClock, MemoryEvents};
use tidemark_journal::storage::{CrashMode, SimStorage, Storage};
use tidemark_journal::{Control, Seq, VolumeId, ZeroMode};

/// (id, block size, size in bytes) of the two volumes.
const VOLUMES: [(u32, u32, u64); 2] = [(1, 4096, 64 << 10), (2, 512, 16 << 10)];

#[derive(Clone, Debug)]
enum Op {
    /// `stale_hint`: the caller passes the other volume's block size (as an export opened
    /// before its volume was deleted and its id reused would); the write must still be right.
    Write {
        vol: usize,
        block: u64,
        blocks: u64,
        fill: u8,
        stale_hint: bool,
    },
    Unaligned {
        vol: usize,
        offset: u64,
        len: u64,
        fill: u8,
    },
    Zero {
        vol: usize,
        block: u64,
        blocks: u64,
        keep_allocated: bool,
    },
    Flush,
    Bookmark,
    Rollback {
        back: usize,
    },
    Checkpoint,
    Trim,
    Crash {
        torn: bool,
        seed: u64,
    },
    ReadPast {
        back: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..2usize, 0..16u64, 1..5u64, any::<u8>(), proptest::bool::weighted(0.2))
            .prop_map(|(vol, block, blocks, fill, stale_hint)| Op::Write { vol, block, blocks, fill, stale_hint }),
        2 => (0..2usize, 0..15000u64, 1..3000u64, any::<u8>()).prop_map(|(vol, offset, len, fill)| Op::Unaligned { vol, offset, len, fill }),
        2 => (0..2usize, 0..16u64, 1..6u64, any::<bool>()).prop_map(|(vol, block, blocks, keep_allocated)| Op::Zero { vol, block, blocks, keep_allocated }),
        2 => Just(Op::Flush),
        1 => Just(Op::Bookmark),
        1 => (0..40usize).prop_map(|back| Op::Rollback { back }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::Trim),
        1 => (any::<bool>(), any::<u64>()).prop_map(|(torn, seed)| Op::Crash { torn, seed }),
        2 => (0..40usize).prop_map(|back| Op::ReadPast { back }),
    ]
}

type Image = Vec<Vec<u8>>;

struct Model {
    /// Content after each seq at which a whole operation ended.
    states: BTreeMap<u64, Image>,
    durable: u64,
}

impl Model {
    fn current(&self) -> &Image {
        self.states.values().next_back().expect("model has a state")
    }
}

fn options() -> GroupOptions {
    // A small journal limit gives small segments, so trimming has something to do.
    GroupOptions { retention_seconds: 3600, journal_max_bytes: 1 << 20 }
}

fn open(storage: &SimStorage, clock: &Arc<ManualClock>) -> Group {
    let st: Arc<dyn Storage> = Arc::new(storage.clone());
    Group::open(st, 42, "g", options(), clock.clone(), Arc::new(MemoryEvents::default()))
        .expect("group opens after a crash")
}

fn read_all(group: &Group, at: Option<Seq>) -> Image {
    VOLUMES
        .iter()
        .map(|&(id, _, size)| {
            let mut buf = vec![0u8; size as usize];
            group.read(VolumeId(id), 0, &mut buf, at).expect("read");
            buf
        })
        .collect()
}

/// Compare two images, naming the first differing byte instead of printing megabytes.
fn same(actual: &Image, expected: &Image, what: &str) -> Result<(), TestCaseError> {
    for (v, (a, e)) in actual.iter().zip(expected).enumerate() {
        if let Some(i) = a.iter().zip(e).position(|(x, y)| x != y) {
            return Err(TestCaseError::fail(format!(
                "{what}: volume {v} differs first at byte {i}: {} instead of {}",
                a[i], e[i]
            )));
        }
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let storage = SimStorage::new();
    let clock = Arc::new(ManualClock::default());
    clock.advance(Duration::from_secs(1_700_000_000));
    let st: Arc<dyn Storage> = Arc::new(storage.clone());
    let mut group = Group::create(st, 42, "g", options(), clock.clone(), Arc::new(MemoryEvents::default()))
        .expect("create");
    for &(id, bs, size) in &VOLUMES {
        group
            .append_control(Control::VolumeCreated {
                volume: VolumeId(id),
                name: format!("v{id}"),
                size_bytes: size,
                block_size_bytes: bs,
            })
            .expect("create volume");
    }
    let last = group.summary().last_seq.0;
    let mut model = Model {
        states: BTreeMap::from([(last, VOLUMES.iter().map(|v| vec![0u8; v.2 as usize]).collect())]),
        durable: last,
    };
    for op in ops {
        clock.advance(Duration::from_millis(3));
        let horizon = group.summary().oldest.seq;
        let known: Vec<u64> = model.states.keys().copied().filter(|&s| s >= horizon).collect();
        let pick =
            |back: usize| known.get(known.len().saturating_sub(1 + back % known.len().max(1))).copied();
        match op {
            Op::Write { vol, block, blocks, fill, stale_hint } => {
                let (id, bs, size) = VOLUMES[vol];
                let bs = u64::from(bs);
                let blocks = blocks.min(size / bs - block % (size / bs));
                let offset = (block % (size / bs)) * bs;
                let data = vec![fill; (blocks * bs) as usize];
                let hint = if stale_hint { VOLUMES[1 - vol].1 } else { VOLUMES[vol].1 };
                let seq = group.write(VolumeId(id), hint, offset, &data).expect("write");
                let mut next = model.current().clone();
                next[vol][offset as usize..(offset + blocks * bs) as usize].copy_from_slice(&data);
                model.states.insert(seq.0, next);
            }
            Op::Unaligned { vol, offset, len, fill } => {
                let (id, _, size) = VOLUMES[vol];
                let offset = offset % size;
                let len = len.min(size - offset);
                let data = vec![fill; len as usize];
                let seq = group.write(VolumeId(id), VOLUMES[vol].1, offset, &data).expect("unaligned write");
                let mut next = model.current().clone();
                next[vol][offset as usize..(offset + len) as usize].copy_from_slice(&data);
                model.states.insert(seq.0, next);
            }
            Op::Zero { vol, block, blocks, keep_allocated } => {
                let (id, bs, size) = VOLUMES[vol];
                let bs = u64::from(bs);
                let first = block % (size / bs);
                let blocks = blocks.min(size / bs - first);
                let mode = if keep_allocated { ZeroMode::Allocate } else { ZeroMode::Punch };
                let seq = group.zero(VolumeId(id), first * bs, blocks * bs, mode).expect("zero");
                let mut next = model.current().clone();
                next[vol][(first * bs) as usize..((first + blocks) * bs) as usize].fill(0);
                model.states.insert(seq.0, next);
            }
            Op::Flush => {
                group.flush().expect("flush");
                model.durable = *model.states.keys().next_back().expect("state");
            }
            Op::Bookmark => {
                let name = format!("b{}", model.states.len());
                let (seq, _) = group.bookmark(&name).expect("bookmark");
                let same = model.current().clone();
                model.states.insert(seq.0, same);
                prop_assert_eq!(
                    group.resolve(&tidemark_engine::Point::Bookmark(name)).expect("resolve"),
                    seq
                );
            }
            Op::Rollback { back } => {
                let Some(target) = pick(back) else { continue };
                let entry = group.rollback(Seq(target), &|_| {}).expect("rollback");
                let restored = model.states[&target].clone();
                model.states.insert(entry.end.expect("rollback finished").0, restored);
                model.durable = *model.states.keys().next_back().expect("state");
                same(
                    &read_all(&group, None),
                    model.current(),
                    &format!("content after rollback to seq {target}"),
                )?;
            }
            Op::Checkpoint => {
                group.checkpoint(true).expect("checkpoint");
                model.durable = *model.states.keys().next_back().expect("state");
            }
            Op::Trim => {
                clock.advance(Duration::from_secs(2 * 3600));
                group.trim(None).expect("trim");
                let horizon = group.summary().oldest.seq;
                prop_assert!(horizon <= *model.states.keys().next_back().expect("state"));
                // The newest durable point survives any trim (the tail segment is never trimmed
                // and everything trimmed was synced first).
                model.durable = model.durable.max(horizon);
            }
            Op::Crash { torn, seed } => {
                storage.crash(if torn { CrashMode::TearUnsynced } else { CrashMode::DropUnsynced }, seed);
                group = open(&storage, &clock);
                let last = group.summary().last_seq.0;
                let resumed = group
                    .rollbacks()
                    .last()
                    .and_then(|r| r.end)
                    .filter(|&e| e.0 == last && !model.states.contains_key(&last));
                if let Some(end) = resumed {
                    // A rollback was cut short and resumed at start-up: the group is at its target.
                    let target = group.rollbacks().last().expect("rollback").target.0;
                    let restored = model.states[&target].clone();
                    model.states.retain(|&s, _| s < end.0);
                    model.states.insert(end.0, restored);
                } else {
                    prop_assert!(
                        model.states.contains_key(&last),
                        "recovered to seq {} which is not the end of an operation",
                        last
                    );
                    model.states.retain(|&s, _| s <= last);
                }
                prop_assert!(
                    last >= model.durable,
                    "durable seq {} lost: recovered only to {}",
                    model.durable,
                    last
                );
                model.durable = last;
            }
            Op::ReadPast { back } => {
                if let Some(at) = pick(back) {
                    same(
                        &read_all(&group, Some(Seq(at))),
                        &model.states[&at],
                        &format!("point-in-time read at seq {at}"),
                    )?;
                }
            }
        }
        same(&read_all(&group, None), model.current(), "newest content")?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn group_matches_model_through_crashes(ops in proptest::collection::vec(op(), 1..120)) {
        run(ops)?;
    }
}

#[test]
fn failed_fsync_poisons_the_group_until_reopened() {
    let storage = SimStorage::new();
    let clock = Arc::new(ManualClock::default());
    let st: Arc<dyn Storage> = Arc::new(storage.clone());
    let group = Group::create(st, 42, "g", options(), clock.clone(), Arc::new(MemoryEvents::default()))
        .expect("create");
    group
        .append_control(Control::VolumeCreated {
            volume: VolumeId(1),
            name: "v".into(),
            size_bytes: 1 << 20,
            block_size_bytes: 4096,
        })
        .expect("volume");
    storage.fail_syncs_after(Some(0));
    group.write(VolumeId(1), 4096, 0, &[7u8; 4096]).expect("buffered write succeeds");
    let err = group.flush().expect_err("flush must fail");
    assert!(err.to_string().contains("poisoned"), "{err}");
    let err =
        group.write(VolumeId(1), 4096, 0, &[8u8; 4096]).expect_err("writes refused after a failed fsync");
    assert!(err.to_string().contains("restart"), "{err}");
    storage.fail_syncs_after(None);
    storage.crash(CrashMode::DropUnsynced, 1);
    let group = open(&storage, &clock);
    group.write(VolumeId(1), 4096, 0, &[9u8; 4096]).expect("writes work after a restart");
    let _ = clock.now();
}
