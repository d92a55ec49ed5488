//! Start-up time of a site whose group holds a large journal: after a clean stop (the index
//! checkpoint is current), after `kill -9` (the tail after the checkpoint is replayed), and
//! with the checkpoint deleted (the whole journal is replayed to rebuild the index).
//!
//! A start is timed from the spawn of `tidemark serve` to the NBD greeting on its port. Each
//! case is timed with the page cache as the previous step left it (warm: the usual restart of
//! a daemon) and right after dropping it (cold: the first start after a reboot).

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::fio::{Job, Outcome, Pattern};
use crate::procfs;
use crate::targets::{self, Site};

/// Request size of the journal fill, in bytes.
const FILL_BLOCK_BYTES: u64 = 1 << 20;
const FILL_IODEPTH: u32 = 8;
/// Request size of the tail written before a `kill -9`, in bytes.
const TAIL_BLOCK_BYTES: u64 = 4 << 10;
const TAIL_IODEPTH: u32 = 32;
/// Volume size beyond the journal fill, in bytes.
const VOLUME_SLACK_BYTES: u64 = 1 << 30;
/// Disk space kept free beyond the journal, in bytes.
const DISK_MARGIN_BYTES: u64 = 4 << 30;
const GROUP: &str = "start";
const EXPORT: &str = "v";

/// How the section runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Bytes written to the volume before the starts are timed.
    pub journal_bytes: u64,
    /// Bytes of 4 KiB random writes before each `kill -9`.
    pub tail_bytes: u64,
    /// Timed starts per case and cache state.
    pub trials: usize,
    /// Also time starts right after dropping the page cache.
    pub cold: bool,
}

/// What a start had to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Case {
    /// After SIGTERM: the checkpoint is current.
    Clean,
    /// After `kill -9` following a few writes: the tail after the checkpoint is replayed.
    Crash,
    /// After `kill -9` with the checkpoint deleted: the whole journal is replayed.
    Rebuild,
}

impl Case {
    /// All, in the order they run.
    pub const ALL: [Case; 3] = [Case::Clean, Case::Crash, Case::Rebuild];

    /// Its name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Case::Clean => "after SIGTERM (checkpoint current)",
            Case::Crash => "after kill -9 (tail replayed)",
            Case::Rebuild => "after kill -9, checkpoint deleted (full rebuild)",
        }
    }
}

/// Timed starts of one case in one cache state.
#[derive(Clone, Debug)]
pub struct Timings {
    /// The case.
    pub case: Case,
    /// Whether the page cache was dropped before each start.
    pub cold: bool,
    /// Seconds from spawn to NBD greeting, per trial.
    pub seconds: Vec<f64>,
    /// CPU seconds the site had used by then, per trial.
    pub cpu_seconds: Vec<f64>,
}

/// What the section measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// How it ran.
    pub config: Config,
    /// The journal's size after the fill, in bytes, as the site reports it.
    pub journal_bytes: u64,
    /// Newest seq after the fill.
    pub last_seq: u64,
    /// The fill job and what it did.
    pub fill: (Job, Outcome),
    /// The tail job.
    pub tail: Job,
    /// How long the clean stop after the fill took, in seconds (drain plus checkpoint).
    pub stop_seconds: f64,
    /// Timings per case and cache state.
    pub timings: Vec<Timings>,
}

/// Run the section.
pub fn run(config: &Config, binary: &Path, scratch: &Path) -> Result<Report> {
    let needed = config.journal_bytes + config.tail_bytes * 3 * config.trials as u64 + DISK_MARGIN_BYTES;
    let free = procfs::free_bytes(scratch)?;
    if free < needed {
        bail!(
            "the start-up test needs {} GiB free in {}, but {} GiB are free; free some space or use --quick",
            needed >> 30,
            scratch.display(),
            free >> 30
        );
    }
    let dir = scratch.join("startup");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let mut site = Site::new(binary, &dir.join("site"))?;
    site.start()?;
    let journal_max = targets::size_arg((config.journal_bytes * 2).next_multiple_of(1 << 30));
    let volume = targets::size_arg((config.journal_bytes + VOLUME_SLACK_BYTES).next_multiple_of(1 << 30));
    site.create_volume(GROUP, &journal_max, EXPORT, &volume)?;

    let fill = Job {
        name: "startup-fill".into(),
        pattern: Pattern::SeqWrite,
        block_bytes: FILL_BLOCK_BYTES,
        iodepth: FILL_IODEPTH,
        region_bytes: config.journal_bytes,
        offset_bytes: 0,
        runtime_seconds: None,
        fsync_every: None,
    };
    let tail = Job {
        name: "startup-tail".into(),
        pattern: Pattern::RandWrite,
        block_bytes: TAIL_BLOCK_BYTES,
        iodepth: TAIL_IODEPTH,
        region_bytes: config.tail_bytes,
        offset_bytes: 0,
        runtime_seconds: None,
        fsync_every: None,
    };
    eprintln!("start-up: writing {} MiB to the journal", config.journal_bytes >> 20);
    let fill_outcome = fill.run(&site.uri(EXPORT), &dir)?;
    let (journal_bytes, last_seq) = site.journal(GROUP)?;
    let stop_seconds = site.stop()?.as_secs_f64();

    let states: &[bool] = if config.cold { &[true, false] } else { &[false] };
    let mut timings = Vec::new();
    for case in Case::ALL {
        // Cold first: a cold start leaves the journal in the page cache for the warm ones.
        for &cold in states {
            eprintln!("start-up: {}, {}", case.label(), if cold { "cold cache" } else { "warm cache" });
            let mut t = Timings { case, cold, seconds: Vec::new(), cpu_seconds: Vec::new() };
            for _ in 0..config.trials {
                prepare(case, &mut site, &tail, &dir)?;
                if cold && !procfs::drop_caches()? {
                    bail!("dropping the page cache is not allowed here; run as root");
                }
                let elapsed = site.start()?;
                t.seconds.push(elapsed.as_secs_f64());
                t.cpu_seconds.push(procfs::cpu_seconds(site.pid()?)?);
                match case {
                    // Leave a current checkpoint for the next trial.
                    Case::Clean | Case::Crash => {
                        site.stop()?;
                    }
                    Case::Rebuild => site.kill9()?,
                }
            }
            timings.push(t);
        }
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(Report {
        config: config.clone(),
        journal_bytes,
        last_seq,
        fill: (fill, fill_outcome),
        tail,
        stop_seconds,
        timings,
    })
}

/// Bring the stopped site into the state `case` starts from.
fn prepare(case: Case, site: &mut Site, tail: &Job, dir: &Path) -> Result<()> {
    match case {
        Case::Clean => Ok(()),
        Case::Crash => {
            site.start()?;
            tail.run(&site.uri(EXPORT), dir)?;
            site.kill9()
        }
        Case::Rebuild => {
            if site.remove_checkpoints()? == 0 && !site.data_dir.join("groups").exists() {
                bail!("the site has no groups directory to remove checkpoints from");
            }
            Ok(())
        }
    }
}
