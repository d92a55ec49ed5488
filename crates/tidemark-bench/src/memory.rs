//! Index memory per journaled block: how much a site's resident memory grows per distinct
//! 4 KiB block written, and per further version of each block.
//!
//! Resident memory is what the operator pays for, but it is not the index alone: it includes
//! the allocator's slack and freed memory it has not returned, and any transient copy of the
//! index (a checkpoint serializes one) that was at its peak, and the stacks of threads the
//! runtime starts while the writes are in flight. The figures are therefore upper bounds on
//! what the index itself takes. Beside them the report gives the index's own account
//! (`index_bytes` and `index_versions` in `group show --json`): the bytes its leaves and the
//! table of record times have allocated, per version.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::fio::{Job, Pattern};
use crate::procfs::{self, Memory};
use crate::targets::{self, Site};

/// Block size written, in bytes (the volume's block size).
pub const BLOCK_BYTES: u64 = 4 << 10;
/// Queue depth of the writes.
const IODEPTH: u32 = 32;
/// Bytes written before the baseline is taken, so that buffers, threads and connection state
/// that any write needs are already in the baseline.
const WARMUP_BYTES: u64 = 16 << 20;
/// Pause before each memory reading, in seconds, so that the site's maintenance pass (which
/// runs every second and may write a checkpoint) is not caught half-way.
const SETTLE_SECONDS: u64 = 3;
/// Journal limit of the group: far more than the test writes, so nothing is trimmed.
const JOURNAL_MAX: &str = "64GiB";
/// Group and export names.
const GROUP: &str = "mem";
const EXPORT: &str = "v";

/// What the section measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Distinct blocks written per pass.
    pub blocks: u64,
    /// Memory after the warm-up.
    pub before: Memory,
    /// After each block was written once.
    pub once: Memory,
    /// After each block was written twice.
    pub twice: Memory,
    /// After a clean stop and a start (the index loaded from its checkpoint into a fresh
    /// heap) and the warm-up job once more.
    pub restarted: Memory,
    /// Newest seq after each pass (one record per 4 KiB write, plus the group's own records).
    pub seqs: [u64; 2],
    /// The index's own account after each pass and after the restart: (versions, bytes).
    pub index: [(u64, u64); 3],
    /// The job of each pass.
    pub job: Job,
}

impl Report {
    /// Bytes of `VmRSS` per block after one version of each.
    pub fn rss_per_block_once(&self) -> f64 {
        per_block(self.once.rss_bytes, self.before.rss_bytes, self.blocks)
    }

    /// Bytes of `VmRSS` per block after two versions of each.
    pub fn rss_per_block_twice(&self) -> f64 {
        per_block(self.twice.rss_bytes, self.before.rss_bytes, self.blocks)
    }

    /// Bytes of `VmRSS` per block after the restart (two versions of each).
    pub fn rss_per_block_restarted(&self) -> f64 {
        per_block(self.restarted.rss_bytes, self.before.rss_bytes, self.blocks)
    }

    /// Bytes of `RssAnon` per block after the restart (two versions of each).
    pub fn anon_per_block_restarted(&self) -> f64 {
        per_block(self.restarted.rss_anon_bytes, self.before.rss_anon_bytes, self.blocks)
    }

    /// Bytes of `RssAnon` per block after one version of each.
    pub fn anon_per_block_once(&self) -> f64 {
        per_block(self.once.rss_anon_bytes, self.before.rss_anon_bytes, self.blocks)
    }

    /// Bytes of `RssAnon` per block after two versions of each.
    /// Bytes the index allocated per version it holds, in state `i` (0: once, 1: twice, 2:
    /// after the restart).
    pub fn index_bytes_per_version(&self, i: usize) -> f64 {
        let (versions, bytes) = self.index[i];
        bytes as f64 / versions.max(1) as f64
    }

    pub fn anon_per_block_twice(&self) -> f64 {
        per_block(self.twice.rss_anon_bytes, self.before.rss_anon_bytes, self.blocks)
    }
}

/// Run the section with `blocks` distinct blocks.
pub fn run(blocks: u64, binary: &Path, scratch: &Path) -> Result<Report> {
    let dir = scratch.join("memory");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let region_bytes = blocks * BLOCK_BYTES;
    let volume_bytes = (region_bytes + WARMUP_BYTES).next_multiple_of(1 << 30);
    let mut site = Site::new(binary, &dir.join("site"))?;
    site.start()?;
    site.create_volume(GROUP, JOURNAL_MAX, EXPORT, &targets::size_arg(volume_bytes))?;
    let uri = site.uri(EXPORT);
    let pid = site.pid()?;

    let warmup = Job {
        name: "memory-warmup".into(),
        pattern: Pattern::RandWrite,
        block_bytes: BLOCK_BYTES,
        iodepth: IODEPTH,
        region_bytes: WARMUP_BYTES,
        offset_bytes: region_bytes,
        runtime_seconds: None,
        fsync_every: None,
    };
    // fio's random map (on by default) makes each pass write every block exactly once, in
    // random order.
    let job = Job {
        name: "memory-pass".into(),
        pattern: Pattern::RandWrite,
        block_bytes: BLOCK_BYTES,
        iodepth: IODEPTH,
        region_bytes,
        offset_bytes: 0,
        runtime_seconds: None,
        fsync_every: None,
    };
    eprintln!("index memory: {blocks} blocks, two passes");
    warmup.run(&uri, &dir)?;
    let before = settled_memory(pid)?;
    job.run(&uri, &dir)?;
    let once = settled_memory(pid)?;
    let seq_once = site.journal(GROUP)?.1;
    let index_once = index_account(&site)?;
    job.run(&uri, &dir)?;
    let twice = settled_memory(pid)?;
    let seq_twice = site.journal(GROUP)?.1;
    let index_twice = index_account(&site)?;
    // A restart shows the index without what the write path left in the heap: the site loads
    // it from the checkpoint written at the stop. The warm-up job runs again so the baseline's
    // write buffers and threads exist here too (its blocks already had versions).
    site.stop()?;
    site.start()?;
    let pid = site.pid()?;
    warmup.run(&uri, &dir)?;
    let restarted = settled_memory(pid)?;
    let index_restarted = index_account(&site)?;
    site.stop()?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(Report {
        blocks,
        before,
        once,
        twice,
        restarted,
        seqs: [seq_once, seq_twice],
        index: [index_once, index_twice, index_restarted],
        job,
    })
}

/// The group's index: (versions, bytes allocated), from `group show --json`.
fn index_account(site: &Site) -> Result<(u64, u64)> {
    let info = site.group(GROUP)?;
    let field =
        |name: &str| info.get(name).and_then(serde_json::Value::as_u64).with_context(|| format!("no {name}"));
    Ok((field("index_versions")?, field("index_bytes")?))
}

fn settled_memory(pid: u32) -> Result<Memory> {
    std::thread::sleep(Duration::from_secs(SETTLE_SECONDS));
    procfs::memory(pid)
}

fn per_block(after: u64, before: u64, blocks: u64) -> f64 {
    (after as f64 - before as f64) / blocks.max(1) as f64
}
