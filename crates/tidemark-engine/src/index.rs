//! The block index: for every block written within the retention window, each version's seq
//! and where its bytes are in the journal.
//!
//! A point-in-time read of block `b` at seq `S` takes the newest version with seq <= S, or
//! falls back to the base image (the state at the horizon) when there is none.

use std::collections::BTreeMap;
use std::ops::Range;

use tidemark_journal::{Location, Seq};

/// Where one version of a block lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Version {
    /// Seq of the record that wrote it.
    pub seq: u64,
    /// Packed journal position of the block's bytes (segment << 40 | byte offset), or
    /// [`Version::ZERO`] when the record zeroed the block.
    pub loc: u64,
    /// crc32c of the block's bytes (0 for zero versions), checked on every read.
    pub crc: u32,
}

impl Version {
    /// The `loc` of a version that reads as zeroes.
    pub const ZERO: u64 = u64::MAX;
    const OFFSET_BITS: u32 = 40;

    /// A data version at byte `offset` of segment `segment`.
    pub fn data(seq: Seq, segment: u64, offset: u64, crc: u32) -> Version {
        assert!(offset < (1 << Self::OFFSET_BITS) && segment < (1 << 23), "journal position out of range");
        Version { seq: seq.0, loc: (segment << Self::OFFSET_BITS) | offset, crc }
    }

    /// A zeroing version.
    pub fn zero(seq: Seq) -> Version {
        Version { seq: seq.0, loc: Self::ZERO, crc: 0 }
    }

    /// True when the block reads as zeroes.
    pub fn is_zero(&self) -> bool {
        self.loc == Self::ZERO
    }

    /// The journal position of the bytes (segment, byte offset); `None` for zero versions.
    pub fn location(&self) -> Option<Location> {
        (!self.is_zero()).then_some(Location {
            segment: self.loc >> Self::OFFSET_BITS,
            offset: self.loc & ((1 << Self::OFFSET_BITS) - 1),
        })
    }
}

/// Versions of one block, oldest first. Most blocks have one, kept inline.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Versions(smallvec::SmallVec<[Version; 1]>);

impl Versions {
    /// The newest version with seq <= `at` (`None` = newest of all).
    pub fn at(&self, at: Option<Seq>) -> Option<&Version> {
        match at {
            None => self.0.last(),
            Some(s) => self.0.iter().rev().find(|v| v.seq <= s.0),
        }
    }

    /// Newest version.
    pub fn newest(&self) -> Option<&Version> {
        self.0.last()
    }

    /// All versions, oldest first.
    pub fn iter(&self) -> impl Iterator<Item = &Version> {
        self.0.iter()
    }
}

/// The index of one volume.
#[derive(Clone, Debug, Default)]
pub struct VolumeIndex {
    blocks: BTreeMap<u64, Versions>,
}

impl VolumeIndex {
    /// Record a new version of `block` (seqs arrive in increasing order).
    pub fn push(&mut self, block: u64, version: Version) {
        let versions = self.blocks.entry(block).or_default();
        debug_assert!(versions.0.last().is_none_or(|v| v.seq < version.seq), "versions out of order");
        versions.0.push(version);
    }

    /// Versions of `block`.
    pub fn get(&self, block: u64) -> Option<&Versions> {
        self.blocks.get(&block)
    }

    /// Blocks in `range` that have versions.
    pub fn range(&self, range: Range<u64>) -> impl Iterator<Item = (u64, &Versions)> {
        self.blocks.range(range).map(|(&b, v)| (b, v))
    }

    /// Every block with versions.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &Versions)> {
        self.blocks.iter().map(|(&b, v)| (b, v))
    }

    /// Drop every version with seq <= `upto`; returns for each affected block the newest such
    /// version (what the base image must now hold).
    pub fn take_through(&mut self, blocks: impl IntoIterator<Item = u64>, upto: Seq) -> Vec<(u64, Version)> {
        let mut moved = Vec::new();
        for block in blocks {
            let Some(versions) = self.blocks.get_mut(&block) else { continue };
            let keep_from = versions.0.iter().position(|v| v.seq > upto.0).unwrap_or(versions.0.len());
            if keep_from == 0 {
                continue;
            }
            if let Some(newest_old) = versions.0.get(keep_from - 1) {
                moved.push((block, *newest_old));
            }
            versions.0.drain(..keep_from);
            if versions.0.is_empty() {
                self.blocks.remove(&block);
            }
        }
        moved
    }

    /// Rebuild from (block, versions) pairs.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (u64, Versions)>) -> VolumeIndex {
        VolumeIndex { blocks: pairs.into_iter().collect() }
    }
}
