//! The block index: for every block written within the retention window, each version's seq,
//! where its bytes are in the journal, and their checksum.
//!
//! A point-in-time read of block `b` at seq `S` takes the newest version with seq <= S, or
//! falls back to the base image (the state at the horizon) when there is none.
//!
//! The index is the engine's largest structure in memory (one entry per block version in the
//! retention window), so it is laid out for size: one sequence of 20-byte entries sorted by
//! (block, seq), cut into leaves of at most [`LEAF_MAX`] entries that grow in small exact steps,
//! so that memory stays close to 20 bytes per version whatever the write pattern. A leaf is
//! found through a `BTreeMap` keyed by its first (block, seq). Entries keep only the low 32 bits
//! of the block number (a leaf never mixes two values of the high bits) and no journal segment
//! number: the journal maps a seq to the segment that holds it.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use serde::de::{SeqAccess, Visitor};
use serde::ser::SerializeSeq;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tidemark_journal::Seq;

/// Most entries in one leaf: a leaf is split when an insert would pass it. Inserts shift half a
/// leaf on average (1.3 KB), and per-leaf overhead is under one byte per entry.
const LEAF_MAX: usize = 128;

/// Entries a growing leaf allocates at a time: exact small steps keep the unused capacity near
/// 4%. (Fewer, coarser capacity classes, meant to let one leaf reuse what another freed, measured
/// worse: more slack and no less fragmentation.)
const GROW_STEP: usize = 8;

/// The capacity to allocate for `len` entries.
fn capacity_for(len: usize) -> usize {
    len.div_ceil(GROW_STEP).max(1).saturating_mul(GROW_STEP).min(LEAF_MAX).max(len)
}

/// One version of a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// Seq of the record that wrote it.
    pub seq: u64,
    /// Byte offset of the block's bytes in the segment holding record `seq`, or
    /// [`Version::ZERO`] when the record zeroed the block.
    offset: u32,
    /// crc32c of the block's bytes (for zero versions, a marker of how it was zeroed), checked
    /// on every read.
    pub crc: u32,
}

impl Version {
    const ZERO: u32 = u32::MAX;

    /// A data version at byte `offset` of the segment holding record `seq`. Segments are at
    /// most a few tens of MiB (`SEGMENT_BYTES_MAX` plus one record), far below 4 GiB.
    pub fn data(seq: Seq, offset: u64, crc: u32) -> Version {
        let offset = u32::try_from(offset)
            .ok()
            .filter(|&o| o != Self::ZERO)
            .unwrap_or_else(|| panic!("journal offset {offset} does not fit the index's 32 bits"));
        Version { seq: seq.0, offset, crc }
    }

    /// A zeroing version.
    pub fn zero(seq: Seq, crc: u32) -> Version {
        Version { seq: seq.0, offset: Self::ZERO, crc }
    }

    /// True when the block reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.offset == Self::ZERO
    }

    /// Byte offset of the data in the segment holding record `seq`; `None` for zero versions.
    pub fn offset(&self) -> Option<u64> {
        (!self.is_zero()).then_some(u64::from(self.offset))
    }
}

/// One version as a leaf stores it: 20 bytes, 4-byte aligned.
#[derive(Clone, Copy, Debug)]
struct Entry {
    block_lo: u32,
    seq_lo: u32,
    seq_hi: u32,
    offset: u32,
    crc: u32,
}

impl Entry {
    fn new(block: u64, v: Version) -> Entry {
        Entry {
            block_lo: block as u32,
            seq_lo: v.seq as u32,
            seq_hi: (v.seq >> 32) as u32,
            offset: v.offset,
            crc: v.crc,
        }
    }

    fn seq(&self) -> u64 {
        (u64::from(self.seq_hi) << 32) | u64::from(self.seq_lo)
    }

    fn version(&self) -> Version {
        Version { seq: self.seq(), offset: self.offset, crc: self.crc }
    }
}

/// A run of consecutive entries, all with the same high 32 bits of the block number.
#[derive(Clone, Debug)]
struct Leaf {
    hi: u32,
    min_seq: u64,
    entries: Vec<Entry>,
}

impl Leaf {
    fn new(block: u64, entries: Vec<Entry>) -> Leaf {
        let min_seq = entries.iter().map(Entry::seq).min().unwrap_or(u64::MAX);
        Leaf { hi: (block >> 32) as u32, min_seq, entries }
    }

    fn single(block: u64, entry: Entry) -> Leaf {
        Leaf::new(block, vec![entry])
    }

    fn block(&self, e: &Entry) -> u64 {
        (u64::from(self.hi) << 32) | u64::from(e.block_lo)
    }

    fn key(&self, e: &Entry) -> (u64, u64) {
        (self.block(e), e.seq())
    }

    /// The map key: the first entry's (block, seq).
    fn first_key(&self) -> Option<(u64, u64)> {
        self.entries.first().map(|e| self.key(e))
    }

    fn insert(&mut self, pos: usize, entry: Entry) {
        let len = self.entries.len();
        if len == self.entries.capacity() {
            self.entries.reserve_exact(capacity_for(len + 1) - len);
        }
        self.min_seq = self.min_seq.min(entry.seq());
        self.entries.insert(pos, entry);
    }

    /// Give back spare capacity beyond the entries' capacity class.
    fn trim(&mut self) {
        let class = capacity_for(self.entries.len());
        if self.entries.capacity() > class {
            self.entries.shrink_to(class);
        }
    }
}

/// The index of one volume.
#[derive(Clone, Debug, Default)]
pub struct VolumeIndex {
    leaves: BTreeMap<(u64, u64), Leaf>,
    versions: usize,
}

impl VolumeIndex {
    /// Record a version of `block`. Versions of one block arrive in increasing seq order.
    pub fn push(&mut self, block: u64, version: Version) {
        let key = (block, version.seq);
        let entry = Entry::new(block, version);
        self.versions += 1;
        // The leaf whose range holds `key`: the last starting at or before it, else the first.
        let found = self.leaves.range(..=key).next_back().or_else(|| self.leaves.iter().next());
        let leaf_key = match found {
            Some((&k, leaf)) if leaf.hi == (block >> 32) as u32 => k,
            // No leaf, or the neighbouring leaf has other high bits: nothing else lies between.
            _ => {
                self.leaves.insert(key, Leaf::single(block, entry));
                return;
            }
        };
        let Some(leaf) = self.leaves.get_mut(&leaf_key) else { return };
        let pos = leaf.entries.partition_point(|e| leaf.key(e) < key);
        debug_assert!(leaf.entries.get(pos).is_none_or(|e| leaf.key(e) != key), "a block version twice");
        if pos > 0 && leaf.entries.len() < LEAF_MAX {
            leaf.insert(pos, entry);
            return;
        }
        // The leaf's first key changes or it splits: take it out and put the pieces back.
        let Some(mut leaf) = self.leaves.remove(&leaf_key) else { return };
        if leaf.entries.len() < LEAF_MAX {
            leaf.insert(pos, entry);
            self.put(leaf);
        } else if pos == leaf.entries.len() {
            // Appending past a full leaf (sequential writes): leave it full, start a new one.
            self.put(leaf);
            self.leaves.insert(key, Leaf::single(block, entry));
        } else {
            let mut right = Vec::with_capacity(capacity_for(LEAF_MAX / 2 + 1));
            right.extend(leaf.entries.drain(LEAF_MAX / 2..));
            let mut right = Leaf::new(block, right);
            right.hi = leaf.hi;
            leaf.min_seq = leaf.entries.iter().map(Entry::seq).min().unwrap_or(u64::MAX);
            leaf.trim();
            if pos <= leaf.entries.len() {
                leaf.insert(pos, entry);
            } else {
                right.insert(pos - leaf.entries.len(), entry);
            }
            self.put(leaf);
            self.put(right);
        }
    }

    fn put(&mut self, leaf: Leaf) {
        if let Some(key) = leaf.first_key() {
            self.leaves.insert(key, leaf);
        }
    }

    /// The version of `block` at `at` (the newest with seq <= `at`; `None` = newest of all).
    pub fn at(&self, block: u64, at: Option<Seq>) -> Option<Version> {
        let key = (block, at.map_or(u64::MAX, |s| s.0));
        let (_, leaf) = self.leaves.range(..=key).next_back()?;
        let pos = leaf.entries.partition_point(|e| leaf.key(e) <= key);
        let entry = leaf.entries.get(pos.checked_sub(1)?)?;
        (leaf.block(entry) == block).then(|| entry.version())
    }

    /// Every version of every block in `range`, in (block, seq) order.
    pub fn versions(&self, range: Range<u64>) -> impl Iterator<Item = (u64, Version)> + '_ {
        let from = self.leaves.range(..=(range.start, 0)).next_back().map_or((0, 0), |(&k, _)| k);
        self.leaves
            .range(from..)
            .flat_map(|(_, leaf)| leaf.entries.iter().map(move |e| (leaf.block(e), e.version())))
            .skip_while(move |&(b, _)| b < range.start)
            .take_while(move |&(b, _)| b < range.end)
    }

    /// For each block in `range` that has a version at `at` (`None` = newest), that version.
    pub fn blocks_at(&self, range: Range<u64>, at: Option<Seq>) -> impl Iterator<Item = (u64, Version)> + '_ {
        let at = at.map_or(u64::MAX, |s| s.0);
        let mut versions = self.versions(range).peekable();
        std::iter::from_fn(move || loop {
            let (block, first) = versions.next()?;
            let mut chosen = (first.seq <= at).then_some(first);
            while let Some((_, v)) = versions.next_if(|&(b, _)| b == block) {
                if v.seq <= at {
                    chosen = Some(v);
                }
            }
            if let Some(v) = chosen {
                return Some((block, v));
            }
        })
    }

    /// Number of versions held.
    pub fn len(&self) -> usize {
        self.versions
    }

    /// Bytes the index has allocated: its leaves' entries (with their spare capacity) and the
    /// leaves themselves with their map keys. The map's inner nodes and the allocator's own
    /// overhead come on top.
    pub fn memory_bytes(&self) -> usize {
        let per_leaf = std::mem::size_of::<Leaf>() + std::mem::size_of::<(u64, u64)>();
        self.leaves.values().map(|l| l.entries.capacity() * std::mem::size_of::<Entry>() + per_leaf).sum()
    }

    /// True when no block has a version.
    pub fn is_empty(&self) -> bool {
        self.versions == 0
    }

    /// Drop every version with seq <= `upto`; returns, in block order, for each affected block
    /// the newest such version (what the base image must now hold).
    pub fn take_through(&mut self, upto: Seq) -> Vec<(u64, Version)> {
        let upto = upto.0;
        let mut moved: Vec<(u64, Version)> = Vec::new();
        let mut changed = Vec::new();
        for (&key, leaf) in self.leaves.iter_mut() {
            if leaf.min_seq > upto {
                continue;
            }
            let hi = u64::from(leaf.hi) << 32;
            // A block's versions are consecutive and oldest first, across leaves too: the last
            // one dropped is the newest.
            leaf.entries.retain(|e| {
                if e.seq() > upto {
                    return true;
                }
                let (block, version) = (hi | u64::from(e.block_lo), e.version());
                match moved.last_mut() {
                    Some((b, v)) if *b == block => *v = version,
                    _ => moved.push((block, version)),
                }
                false
            });
            leaf.min_seq = leaf.entries.iter().map(Entry::seq).min().unwrap_or(u64::MAX);
            changed.push(key);
        }
        // Re-key the changed leaves (their first entry may be gone), dropping empty ones and
        // merging small ones into the leaf before them. In key order, so a predecessor that
        // changed too is already settled.
        for key in changed {
            let Some(mut leaf) = self.leaves.remove(&key) else { continue };
            let Some(first) = leaf.first_key() else { continue };
            if let Some((_, prev)) = self.leaves.range_mut(..first).next_back() {
                if prev.hi == leaf.hi && prev.entries.len() + leaf.entries.len() <= LEAF_MAX {
                    let len = prev.entries.len() + leaf.entries.len();
                    prev.entries.reserve_exact(capacity_for(len).saturating_sub(prev.entries.len()));
                    prev.entries.extend_from_slice(&leaf.entries);
                    prev.min_seq = prev.min_seq.min(leaf.min_seq);
                    continue;
                }
            }
            leaf.trim();
            self.leaves.insert(first, leaf);
        }
        self.versions = self.leaves.values().map(|l| l.entries.len()).sum();
        moved
    }
}

/// Serialized as the flat sequence of (block, version) pairs in (block, seq) order, without
/// building it in memory; read back by pushing them in that order.
impl Serialize for VolumeIndex {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut seq = serializer.serialize_seq(Some(self.versions))?;
        for leaf in self.leaves.values() {
            for e in &leaf.entries {
                seq.serialize_element(&(leaf.block(e), e.version()))?;
            }
        }
        seq.end()
    }
}

impl<'de> Deserialize<'de> for VolumeIndex {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<VolumeIndex, D::Error> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = VolumeIndex;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a sequence of (block, version) pairs")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut pairs: A) -> Result<VolumeIndex, A::Error> {
                let mut index = VolumeIndex::default();
                while let Some((block, version)) = pairs.next_element::<(u64, Version)>()? {
                    index.push(block, version);
                }
                Ok(index)
            }
        }
        deserializer.deserialize_seq(Pairs)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    /// The obvious index: every block's versions, oldest first.
    type Model = BTreeMap<u64, Vec<Version>>;

    #[derive(Clone, Debug)]
    enum Op {
        Push(u64),
        Trim,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        // Blocks from a small set (many versions per block), a wide one (sparse), and near the
        // 32-bit boundary (leaves must not mix high bits).
        let block = prop_oneof![
            0u64..40,
            0u64..100_000,
            ((1u64 << 32) - 20)..((1u64 << 32) + 20),
            (3u64 << 40)..((3u64 << 40) + 5),
        ];
        proptest::collection::vec(prop_oneof![20 => block.prop_map(Op::Push), 1 => Just(Op::Trim)], 0..1500)
    }

    fn check(index: &VolumeIndex, model: &Model, seq: u64) {
        let flat: Vec<(u64, Version)> =
            model.iter().flat_map(|(&b, vs)| vs.iter().map(move |&v| (b, v))).collect();
        assert_eq!(index.versions(0..u64::MAX).collect::<Vec<_>>(), flat);
        assert_eq!(index.len(), flat.len());
        for leaf in index.leaves.values() {
            assert!(!leaf.entries.is_empty() && leaf.entries.len() <= LEAF_MAX);
            assert_eq!(leaf.min_seq, leaf.entries.iter().map(Entry::seq).min().unwrap_or(u64::MAX));
        }
        for (&block, vs) in model.iter().take(200) {
            for at in [None, Some(Seq(seq / 2)), Some(Seq(seq / 3)), vs.first().map(|v| Seq(v.seq))] {
                let want = match at {
                    None => vs.last().copied(),
                    Some(s) => vs.iter().rev().find(|v| v.seq <= s.0).copied(),
                };
                assert_eq!(index.at(block, at), want, "block {block} at {at:?}");
            }
            assert_eq!(index.at(block + 1, None), model.get(&(block + 1)).and_then(|v| v.last().copied()));
        }
        let at = Some(Seq(seq / 2));
        let want: Vec<(u64, Version)> = model
            .iter()
            .filter_map(|(&b, vs)| vs.iter().rev().find(|v| v.seq <= seq / 2).map(|&v| (b, v)))
            .filter(|(b, _)| (10..70_000).contains(b))
            .collect();
        assert_eq!(index.blocks_at(10..70_000, at).collect::<Vec<_>>(), want);
    }

    proptest! {
        #[test]
        fn the_index_answers_as_the_obvious_map_does(ops in ops()) {
            let (mut index, mut model) = (VolumeIndex::default(), Model::new());
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Op::Push(block) => {
                        seq += 1;
                        let v = if seq.is_multiple_of(7) {
                            Version::zero(Seq(seq), 1)
                        } else {
                            Version::data(Seq(seq), seq * 4096, seq as u32)
                        };
                        index.push(block, v);
                        model.entry(block).or_default().push(v);
                    }
                    Op::Trim => {
                        let upto = seq.saturating_sub(300);
                        let mut want = Vec::new();
                        model.retain(|&b, vs| {
                            let keep = vs.iter().position(|v| v.seq > upto).unwrap_or(vs.len());
                            if keep > 0 {
                                want.push((b, vs[keep - 1]));
                            }
                            vs.drain(..keep);
                            !vs.is_empty()
                        });
                        prop_assert_eq!(index.take_through(Seq(upto)), want);
                    }
                }
            }
            check(&index, &model, seq);
            let bytes = postcard::to_stdvec(&index).expect("encode");
            let decoded: VolumeIndex = postcard::from_bytes(&bytes).expect("decode");
            check(&decoded, &model, seq);
        }
    }

    #[test]
    fn sequential_writes_fill_leaves_completely() {
        let mut index = VolumeIndex::default();
        for b in 0..(LEAF_MAX as u64 * 10) {
            index.push(b, Version::data(Seq(b + 1), 4096, 0));
        }
        assert_eq!(index.leaves.len(), 10);
        assert!(index
            .leaves
            .values()
            .all(|l| l.entries.len() == LEAF_MAX && l.entries.capacity() == LEAF_MAX));
    }

    #[test]
    fn an_entry_is_20_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 20);
    }
}
