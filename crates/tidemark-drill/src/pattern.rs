//! The workload's writes as a pure function of the seed: which blocks write N touches, and the
//! bytes it puts there, which name the write, so a checker can tell from a volume's content
//! exactly which write each block holds.
//!
//! Every block a write covers is self-describing:
//!
//! | bytes | field |
//! | --- | --- |
//! | 0..8 | magic `TMDRILL1` |
//! | 8..16 | the scenario's seed, u64 little endian |
//! | 16..24 | the write's id, u64 (1, 2, 3, ... in issue order) |
//! | 24..28 | the volume's index in the scenario, u32 |
//! | 28..32 | the block size in bytes, u32 |
//! | 32..40 | the block's number within the volume, u64 |
//! | 40..len-8 | filler: xorshift from (seed, id, volume, block), incompressible like real data |
//! | len-8..len | the first 8 bytes of blake3 over everything before it |
//!
//! A block that fails the checksum, or names another seed, volume or block, is foreign: no
//! workload write put it there.

use serde::{Deserialize, Serialize};

/// Magic of a block written by the workload.
pub const WRITE_MAGIC: [u8; 8] = *b"TMDRILL1";
/// Bytes of header before the filler.
pub const HEADER_BYTES: usize = 40;
/// Bytes of checksum at the end of a block.
pub const CHECKSUM_BYTES: usize = 8;
/// Smallest workload block: header, some filler, checksum.
pub const BLOCK_BYTES_MIN: u32 = 512;
/// Largest workload block.
pub const BLOCK_BYTES_MAX: u32 = 1 << 20;
/// Write ids from here on are test-failover writes into images, never into a group's volumes.
pub const IMAGE_WRITE_ID_BASE: u64 = 1 << 62;

/// One write's identity: its position in the order the workload issued writes, from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct WriteId(pub u64);

impl std::fmt::Display for WriteId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where the workload writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// Each write at a uniformly drawn block of a uniformly drawn volume.
    Random,
    /// Writes follow each other through each volume's region, volumes taking turns, wrapping
    /// at the end of the region.
    Sequential,
}

/// The workload's shape: everything that decides which write goes where.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadShape {
    /// The scenario's seed.
    pub seed: u64,
    /// Where writes go.
    pub pattern: Pattern,
    /// Bytes per workload block (the unit of writes and of checking).
    pub block_bytes: u32,
    /// Most blocks in one write; each write covers 1 to this many (exactly this many with the
    /// sequential pattern).
    pub blocks_per_write_max: u32,
    /// Blocks of each volume the workload writes to, from its start, by volume index.
    pub region_blocks: Vec<u64>,
}

/// Where one write goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteSpec {
    /// The write.
    pub id: WriteId,
    /// Index of the volume in the scenario.
    pub volume: u32,
    /// First block (in workload blocks).
    pub block: u64,
    /// Number of blocks.
    pub blocks: u32,
}

impl WriteSpec {
    /// The blocks it covers.
    pub fn block_range(&self) -> std::ops::Range<u64> {
        self.block..self.block + u64::from(self.blocks)
    }
}

impl WorkloadShape {
    /// Where write `id` goes: a pure function of the seed and the id, so the same scenario
    /// always issues the same writes in the same order.
    pub fn write(&self, id: WriteId) -> WriteSpec {
        let volumes = self.region_blocks.len().max(1) as u64;
        let mut rng = SplitMix::new(self.seed ^ id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        match self.pattern {
            Pattern::Random => {
                let volume = rng.below(volumes);
                let region = self.region(volume);
                let blocks = 1 + rng.below(u64::from(self.blocks_per_write_max.max(1)));
                let blocks = blocks.min(region);
                let block = rng.below(region - blocks + 1);
                WriteSpec { id, volume: volume as u32, block, blocks: blocks as u32 }
            }
            Pattern::Sequential => {
                let n = id.0.saturating_sub(1);
                let volume = n % volumes;
                let region = self.region(volume);
                let blocks = u64::from(self.blocks_per_write_max.max(1)).min(region);
                let slots = region / blocks;
                let block = ((n / volumes) % slots) * blocks;
                WriteSpec { id, volume: volume as u32, block, blocks: blocks as u32 }
            }
        }
    }

    /// Blocks of volume `volume`'s region (at least 1).
    fn region(&self, volume: u64) -> u64 {
        self.region_blocks.get(volume as usize).copied().unwrap_or(1).max(1)
    }

    /// The bytes of write `spec`: each block self-describing (see the module docs).
    pub fn payload(&self, spec: &WriteSpec) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.block_bytes as usize * spec.blocks as usize);
        for block in spec.block_range() {
            out.extend_from_slice(&encode_block(
                WRITE_MAGIC,
                self.seed,
                spec.id,
                spec.volume,
                block,
                self.block_bytes,
            ));
        }
        out
    }

    /// What block `block` of volume `volume` holds, from its bytes.
    pub fn decode(&self, volume: u32, block: u64, data: &[u8]) -> BlockContent {
        decode_block(self.seed, volume, block, data)
    }
}

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockContent {
    /// Zeros: never written (or zeroed).
    Zero,
    /// A workload write's data, intact and in its place.
    Write(WriteId),
    /// Data no write of this drill put here.
    Foreign(Foreign),
}

/// Why a block's content is foreign.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Foreign {
    /// It does not start with a drill magic: some other data.
    NotDrillData,
    /// The checksum does not match: the block is damaged or torn.
    ChecksumMismatch,
    /// Written by a drill with another seed.
    OtherSeed(u64),
    /// A workload block of another place: (volume, block) it names.
    Misplaced(u32, u64),
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Foreign::NotDrillData => write!(f, "data no write of this drill wrote"),
            Foreign::ChecksumMismatch => write!(f, "a damaged or torn block (checksum mismatch)"),
            Foreign::OtherSeed(seed) => write!(f, "data of a drill with another seed ({seed})"),
            Foreign::Misplaced(volume, block) => {
                write!(f, "data that belongs at block {block} of volume #{volume} (misplaced)")
            }
        }
    }
}

/// One self-describing block.
pub fn encode_block(
    magic: [u8; 8],
    seed: u64,
    id: WriteId,
    volume: u32,
    block: u64,
    block_bytes: u32,
) -> Vec<u8> {
    let len = block_bytes as usize;
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&seed.to_le_bytes());
    out.extend_from_slice(&id.0.to_le_bytes());
    out.extend_from_slice(&volume.to_le_bytes());
    out.extend_from_slice(&block_bytes.to_le_bytes());
    out.extend_from_slice(&block.to_le_bytes());
    let mut x =
        SplitMix::new(seed ^ id.0.rotate_left(17) ^ block.rotate_left(41) ^ u64::from(volume)).next() | 1;
    while out.len() < len - CHECKSUM_BYTES {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len - CHECKSUM_BYTES);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes().get(..CHECKSUM_BYTES).unwrap_or(&[0; CHECKSUM_BYTES]));
    assert_eq!(out.len(), len, "an encoded block has the block size");
    out
}

/// What a block holds (see [`BlockContent`]).
pub fn decode_block(seed: u64, volume: u32, block: u64, data: &[u8]) -> BlockContent {
    if data.iter().all(|&b| b == 0) {
        return BlockContent::Zero;
    }
    let Some(magic) = data.get(..8) else { return BlockContent::Foreign(Foreign::NotDrillData) };
    if magic != WRITE_MAGIC {
        return BlockContent::Foreign(Foreign::NotDrillData);
    }
    if data.len() < HEADER_BYTES + CHECKSUM_BYTES {
        return BlockContent::Foreign(Foreign::NotDrillData);
    }
    let (body, sum) = data.split_at(data.len() - CHECKSUM_BYTES);
    if blake3::hash(body).as_bytes().get(..CHECKSUM_BYTES) != Some(sum) {
        return BlockContent::Foreign(Foreign::ChecksumMismatch);
    }
    let field = |range: std::ops::Range<usize>| -> u64 {
        let mut bytes = [0u8; 8];
        let src = body.get(range).unwrap_or(&[]);
        if let Some(dst) = bytes.get_mut(..src.len()) {
            dst.copy_from_slice(src);
        }
        u64::from_le_bytes(bytes)
    };
    let (their_seed, id, their_volume, their_block) =
        (field(8..16), field(16..24), field(24..28), field(32..40));
    if their_seed != seed {
        return BlockContent::Foreign(Foreign::OtherSeed(their_seed));
    }
    if their_volume != u64::from(volume) || their_block != block {
        return BlockContent::Foreign(Foreign::Misplaced(their_volume as u32, their_block));
    }
    BlockContent::Write(WriteId(id))
}

/// SplitMix64: a small, stable generator, so the workload does not change when a dependency's
/// RNG does.
pub struct SplitMix(u64);

impl SplitMix {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> SplitMix {
        SplitMix(seed)
    }

    /// The next 64 random bits.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(pattern: Pattern) -> WorkloadShape {
        WorkloadShape {
            seed: 7,
            pattern,
            block_bytes: 4096,
            blocks_per_write_max: 4,
            region_blocks: vec![100, 30],
        }
    }

    #[test]
    fn writes_are_a_function_of_seed_and_id_and_stay_in_their_region() {
        for pattern in [Pattern::Random, Pattern::Sequential] {
            let s = shape(pattern);
            for id in 1..2000 {
                let w = s.write(WriteId(id));
                assert_eq!(w, s.write(WriteId(id)));
                let region = s.region_blocks[w.volume as usize];
                assert!(w.blocks >= 1 && w.block + u64::from(w.blocks) <= region, "{w:?}");
            }
        }
        let other = WorkloadShape { seed: 8, ..shape(Pattern::Random) };
        assert!((1..50).any(|id| other.write(WriteId(id)) != shape(Pattern::Random).write(WriteId(id))));
    }

    #[test]
    fn blocks_decode_to_their_write_and_damage_is_named() {
        let s = shape(Pattern::Random);
        let w = s.write(WriteId(42));
        let payload = s.payload(&w);
        for (i, block) in w.block_range().enumerate() {
            let data = &payload[i * 4096..(i + 1) * 4096];
            assert_eq!(s.decode(w.volume, block, data), BlockContent::Write(WriteId(42)));
            assert_eq!(
                s.decode(w.volume, block + 1, data),
                BlockContent::Foreign(Foreign::Misplaced(w.volume, block))
            );
            let mut damaged = data.to_vec();
            damaged[100] ^= 1;
            assert_eq!(s.decode(w.volume, block, &damaged), BlockContent::Foreign(Foreign::ChecksumMismatch));
        }
        assert_eq!(s.decode(0, 0, &[0; 4096]), BlockContent::Zero);
        assert_eq!(s.decode(0, 0, &[0xab; 4096]), BlockContent::Foreign(Foreign::NotDrillData));
        let other = WorkloadShape { seed: 9, ..s.clone() };
        assert_eq!(
            other.decode(w.volume, w.block, &payload[..4096]),
            BlockContent::Foreign(Foreign::OtherSeed(7))
        );
    }

    #[test]
    fn the_generator_is_stable_across_releases() {
        // The workload of a given seed is part of a drill's record: it must not change.
        // SplitMix64's published first output for seed 0.
        let mut rng = SplitMix::new(0);
        assert_eq!(rng.next(), 0xe220_a839_7b1d_cdaf);
        let first = WriteSpec { id: WriteId(1), volume: 1, block: 11, blocks: 4 };
        assert_eq!(shape(Pattern::Random).write(WriteId(1)), first);
        let s = shape(Pattern::Random);
        assert_eq!(s.write(WriteId(1)), s.write(WriteId(1)));
    }
}
