//! Overflow policies: what a primary does when its partner has been out of reach long enough
//! that the journal it keeps for the partner passes the group's limit.
//!
//! - `resync` (the default): let the journal trim again, but first record which blocks the
//!   trimmed records changed (the dirty blocks, kept durably in `overflow/GROUP.dirty`). When the
//!   partner returns behind the journal, it gets a resync: only the dirty blocks and those
//!   changed since, as a staged baseline it switches to atomically (its copy stays consistent
//!   until then), not the whole image.
//! - `throttle`: keep everything for the partner and slow host writes instead, more the further
//!   the journal is past its limit.
//!
//! Both are preceded by the engine's `journal_near_limit` event and `tidemark_journal_near_limit`.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tidemark_engine::persist::{read_framed, write_framed};
use tidemark_journal::storage::{OsStorage, Storage};

/// What a primary does when its partner's backlog passes the journal's limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OverflowPolicy {
    /// Track changed blocks, let the journal trim, resync those blocks later.
    #[default]
    Resync,
    /// Keep the journal for the partner and slow host writes.
    Throttle,
}

impl FromStr for OverflowPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "resync" => Ok(OverflowPolicy::Resync),
            "throttle" => Ok(OverflowPolicy::Throttle),
            other => Err(format!("overflow policy {other:?} is not one of resync, throttle")),
        }
    }
}

/// The longest wait `throttle` puts on one host write.
pub const THROTTLE_DELAY_MAX: Duration = Duration::from_millis(500);
/// The wait at the limit itself.
const THROTTLE_DELAY_MIN: Duration = Duration::from_millis(1);

/// The wait for each host write under `throttle`, with the journal at `bytes` of `max`: none up
/// to the limit, then growing with the excess, from 1 ms at the limit to
/// [`THROTTLE_DELAY_MAX`] at a quarter over it.
pub fn throttle_delay(bytes: u64, max: u64) -> Duration {
    if bytes <= max || max == 0 {
        return Duration::ZERO;
    }
    let over = (bytes - max) as f64 / (max as f64 / 4.0);
    let span = (THROTTLE_DELAY_MAX - THROTTLE_DELAY_MIN).as_secs_f64();
    THROTTLE_DELAY_MIN + Duration::from_secs_f64(span * over.min(1.0))
}

/// The blocks a partner lacks that the journal no longer holds: everything changed after its
/// last acknowledged seq `from_seq` up to `through`. The journal holds every record after
/// `through`, so dirty blocks plus the journal's changes after `through` are all a resync sends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyBlocks {
    /// The partner's last acknowledged seq when tracking began: a resync is a delta from there.
    pub from_seq: u64,
    /// Chain hash after `from_seq`: the partner must hold exactly that history.
    pub from_chain: [u8; 32],
    /// Every block changed in `(from_seq, through]` is listed.
    pub through: u64,
    /// Per volume id: runs of blocks `(first, count)`, sorted and disjoint.
    pub volumes: BTreeMap<u32, Vec<(u64, u64)>>,
    /// Block size of each volume listed.
    pub block_sizes: BTreeMap<u32, u32>,
}

impl DirtyBlocks {
    /// Start tracking from the partner's position.
    pub fn new(from_seq: u64, from_chain: [u8; 32]) -> DirtyBlocks {
        DirtyBlocks { from_seq, from_chain, through: from_seq, ..DirtyBlocks::default() }
    }

    /// Add `blocks` (sorted) of volume `volume`.
    pub fn add(&mut self, volume: u32, block_size: u32, blocks: &[u64]) {
        if blocks.is_empty() {
            return;
        }
        self.block_sizes.insert(volume, block_size);
        let runs = self.volumes.entry(volume).or_default();
        *runs = merge_runs(runs, blocks);
    }

    /// Bytes the dirty blocks hold.
    pub fn bytes(&self) -> u64 {
        self.volumes
            .iter()
            .map(|(v, runs)| {
                let bs = u64::from(self.block_sizes.get(v).copied().unwrap_or(0));
                runs.iter().map(|(_, n)| n * bs).sum::<u64>()
            })
            .sum()
    }
}

/// The union of sorted disjoint runs and sorted blocks, as sorted disjoint runs.
pub fn merge_runs(runs: &[(u64, u64)], blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut starts: Vec<(u64, u64)> = runs.to_vec();
    starts.extend(blocks.iter().map(|&b| (b, 1)));
    starts.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(starts.len());
    for (first, count) in starts {
        match out.last_mut() {
            Some((f, n)) if first <= *f + *n => *n = (*n).max(first + count - *f),
            _ => out.push((first, count)),
        }
    }
    out
}

const DIRTY_MAGIC: [u8; 8] = *b"TMDIRTY1";
/// The directory under the data directory that keeps dirty blocks.
pub const OVERFLOW_DIR_NAME: &str = "overflow";

fn storage(data_dir: &Path) -> std::io::Result<Arc<dyn Storage>> {
    Ok(Arc::new(OsStorage::new(data_dir.join(OVERFLOW_DIR_NAME))?))
}

fn file_name(group: &str) -> String {
    format!("{group}.dirty")
}

/// The dirty blocks kept for `group`, if any.
pub fn load(data_dir: &Path, group: &str) -> Result<Option<DirtyBlocks>, String> {
    let storage = storage(data_dir).map_err(|e| e.to_string())?;
    read_framed(&*storage, &file_name(group), DIRTY_MAGIC)
}

/// Keep `dirty` for `group`, durably (before the journal may trim what it describes).
pub fn save(data_dir: &Path, group: &str, dirty: &DirtyBlocks) -> std::io::Result<()> {
    write_framed(&*storage(data_dir)?, &file_name(group), DIRTY_MAGIC, dirty)
}

/// Forget `group`'s dirty blocks (its partner caught up, or it is no longer protected).
pub fn remove(data_dir: &Path, group: &str) -> std::io::Result<()> {
    let storage = storage(data_dir)?;
    match storage.remove(&file_name(group)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    }
    storage.sync_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_merge_overlapping_and_adjacent_blocks() {
        assert_eq!(merge_runs(&[], &[1, 2, 3, 7]), vec![(1, 3), (7, 1)]);
        assert_eq!(merge_runs(&[(1, 3), (7, 1)], &[4, 6, 8, 20]), vec![(1, 4), (6, 3), (20, 1)]);
        assert_eq!(merge_runs(&[(0, 10)], &[3, 9]), vec![(0, 10)]);
        assert_eq!(merge_runs(&[(5, 2)], &[]), vec![(5, 2)]);
    }

    #[test]
    fn dirty_bytes_count_each_block_once() {
        let mut d = DirtyBlocks::new(7, [0; 32]);
        d.add(1, 4096, &[0, 1, 2]);
        d.add(1, 4096, &[2, 3]);
        d.add(2, 512, &[10]);
        assert_eq!(d.bytes(), 4 * 4096 + 512);
    }

    #[test]
    fn throttle_waits_only_past_the_limit_and_never_more_than_the_cap() {
        assert_eq!(throttle_delay(100, 100), Duration::ZERO);
        assert_eq!(throttle_delay(101, 100), THROTTLE_DELAY_MIN + Duration::from_secs_f64(0.499 * 0.04));
        assert!(throttle_delay(110, 100) > throttle_delay(105, 100));
        assert_eq!(throttle_delay(125, 100), THROTTLE_DELAY_MAX);
        assert_eq!(throttle_delay(1000, 100), THROTTLE_DELAY_MAX);
    }

    #[test]
    fn policies_parse_by_name() {
        assert_eq!("resync".parse(), Ok(OverflowPolicy::Resync));
        assert_eq!("throttle".parse(), Ok(OverflowPolicy::Throttle));
        assert!("drop".parse::<OverflowPolicy>().is_err());
    }
}
