//! Recovery: how long a rollback of the same amount of changes takes on a small and on a large
//! volume (it must not grow with the volume's size), against the time the same disk takes to
//! write that many bytes with `dd` (O_DIRECT, then fsync).
//!
//! The changes are 64 KiB random writes spread over the whole volume, written twice with the
//! same offsets (fio's `--randrepeat` with its random map): once with a fixed pattern, then a
//! bookmark, then with random data. Rolling back to the bookmark rewrites every changed block
//! with its pattern version; undoing that rollback puts the changes back for the next run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::stats::Summary;
use crate::targets::{self, Site};

/// The larger volume's rollback over the smaller one's must be at most this (issue 7: the
/// time must not grow with the volume's size; the margin is for run-to-run noise).
pub const SIZE_GROWTH_TARGET_RATIO: f64 = 1.2;
/// Request size of the changes, in bytes.
const CHANGE_BLOCK_BYTES: u64 = 64 << 10;
/// Requests in flight while writing the changes.
const CHANGE_IODEPTH: u32 = 16;
/// dd's request size, in bytes.
const DD_BLOCK_BYTES: u64 = 1 << 20;
/// Disk space kept free beyond what the section writes, in bytes.
const DISK_MARGIN_BYTES: u64 = 4 << 30;
const GROUP: &str = "rec";
const EXPORT: &str = "v";
const BOOKMARK: &str = "before";

/// How the section runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Volume sizes, in bytes, smallest first.
    pub volume_bytes: Vec<u64>,
    /// Bytes of changes rolled back.
    pub change_bytes: u64,
    /// Timed rollbacks (and dd writes) per volume.
    pub runs: usize,
}

/// One volume's rollbacks.
#[derive(Clone, Debug)]
pub struct VolumeRuns {
    /// The volume's size, in bytes.
    pub volume_bytes: u64,
    /// `tidemark rollback --to bookmark:before --yes` from start to its answer, per run.
    pub rollback_seconds: Vec<f64>,
    /// `tidemark rollback --undo --yes` the same way, per run.
    pub undo_seconds: Vec<f64>,
    /// Bytes each rollback rewrote, as the site reported them.
    pub bytes_rewritten: Vec<u64>,
}

/// What the section measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// How it ran.
    pub config: Config,
    /// Per volume size.
    pub volumes: Vec<VolumeRuns>,
    /// `dd` of `change_bytes`, per run, in seconds.
    pub dd_seconds: Vec<f64>,
    /// The change job's fio command line (with PORT for the port).
    pub change_job: String,
    /// The dd command line.
    pub dd_command: String,
}

impl Report {
    /// Median rollback time of the largest volume over the smallest's.
    pub fn growth_ratio(&self) -> Option<f64> {
        let med = |v: &VolumeRuns| Summary::of(&v.rollback_seconds).map(|s| s.median);
        let (small, large) = (med(self.volumes.first()?)?, med(self.volumes.last()?)?);
        (small > 0.0).then_some(large / small)
    }

    /// Median rollback time of `v` over the median dd time.
    pub fn dd_ratio(&self, v: &VolumeRuns) -> Option<f64> {
        let rollback = Summary::of(&v.rollback_seconds)?.median;
        let dd = Summary::of(&self.dd_seconds)?.median;
        (dd > 0.0).then_some(rollback / dd)
    }

    /// One line per figure.
    pub fn summary_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for v in &self.volumes {
            if let (Some(s), Some(r)) = (Summary::of(&v.rollback_seconds), self.dd_ratio(v)) {
                lines.push(format!(
                    "rollback of {} on a {} volume: {:.2} s, {r:.2}x dd's time (no target stated; for scale)",
                    gib(self.config.change_bytes),
                    gib(v.volume_bytes),
                    s.median
                ));
            }
        }
        if let Some(r) = self.growth_ratio() {
            lines.push(format!(
                "rollback time, largest volume over smallest: {r:.2}x (target <={SIZE_GROWTH_TARGET_RATIO}x) {}",
                verdict(r <= SIZE_GROWTH_TARGET_RATIO)
            ));
        }
        lines
    }
}

/// Run the section in `scratch`.
pub fn run(config: &Config, binary: &Path, scratch: &Path) -> Result<Report> {
    // Changes, their pattern version, and a rewrite per rollback and per undo stay in the journal.
    let journal_bytes = config.change_bytes * (2 + 2 * config.runs as u64);
    let needed = journal_bytes + config.change_bytes + DISK_MARGIN_BYTES;
    let free = crate::procfs::free_bytes(scratch)?;
    if free < needed {
        bail!(
            "the recovery benchmark needs {} GiB free in {}, but {} GiB are free",
            needed >> 30,
            scratch.display(),
            free >> 30
        );
    }
    let journal_max = targets::size_arg((journal_bytes + (1 << 30)).next_multiple_of(1 << 30));
    let mut volumes = Vec::new();
    let mut change_job = String::new();
    for &volume_bytes in &config.volume_bytes {
        let dir = scratch.join(format!("recovery-{}", volume_bytes >> 20));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut site = Site::new(binary, &dir.join("site"))?;
        site.start()?;
        site.create_volume(GROUP, &journal_max, EXPORT, &targets::size_arg(volume_bytes))?;
        eprintln!("recovery: {} volume, writing {} twice", gib(volume_bytes), gib(config.change_bytes));
        let uri = site.uri(EXPORT);
        fio(&change_args(&uri, volume_bytes, config.change_bytes, true))?;
        site.cli(&["bookmark", "create", GROUP, BOOKMARK])?;
        let args = change_args(&uri, volume_bytes, config.change_bytes, false);
        fio(&args)?;
        change_job = format!(
            "fio {}",
            change_args("nbd://127.0.0.1:PORT/v", volume_bytes, config.change_bytes, false).join(" ")
        );
        let mut v = VolumeRuns {
            volume_bytes,
            rollback_seconds: Vec::new(),
            undo_seconds: Vec::new(),
            bytes_rewritten: Vec::new(),
        };
        for run in 0..config.runs {
            crate::procfs::sync();
            let start = Instant::now();
            let out =
                site.cli(&["--json", "rollback", GROUP, "--to", &format!("bookmark:{BOOKMARK}"), "--yes"])?;
            let seconds = start.elapsed().as_secs_f64();
            let job: Value =
                serde_json::from_str(&out).with_context(|| format!("parse rollback answer {out}"))?;
            let rewritten = job["result"]["bytes_rewritten"]
                .as_u64()
                .context("the rollback job has no bytes_rewritten")?;
            crate::procfs::sync();
            let start = Instant::now();
            site.cli(&["--json", "rollback", GROUP, "--undo", "--yes"])?;
            let undo = start.elapsed().as_secs_f64();
            eprintln!(
                "recovery: {} volume, run {}: rollback {seconds:.2} s ({rewritten} bytes rewritten), undo {undo:.2} s",
                gib(volume_bytes),
                run + 1
            );
            v.rollback_seconds.push(seconds);
            v.undo_seconds.push(undo);
            v.bytes_rewritten.push(rewritten);
        }
        site.stop()?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        volumes.push(v);
    }

    let dir = scratch.join("recovery-dd");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let file = dir.join("dd.bin");
    let dd = dd_args(&file.display().to_string(), config.change_bytes);
    let mut dd_seconds = Vec::new();
    for run in 0..config.runs {
        crate::procfs::sync();
        let start = Instant::now();
        let out = Command::new("dd").args(&dd).stdin(Stdio::null()).output().context("run dd")?;
        let seconds = start.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("dd failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
        }
        std::fs::remove_file(&file).with_context(|| format!("remove {}", file.display()))?;
        eprintln!("recovery: dd run {}: {seconds:.2} s", run + 1);
        dd_seconds.push(seconds);
    }
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(Report {
        config: config.clone(),
        volumes,
        dd_seconds,
        change_job,
        dd_command: format!("dd {}", dd_args("FILE", config.change_bytes).join(" ")),
    })
}

/// The Markdown section (between the recovery markers of docs/benchmarks.md).
pub fn markdown(r: &Report, context: &str) -> String {
    let mut out = String::new();
    out.push_str("## Recovery: rollback time against volume size\n\n");
    out.push_str(context);
    out.push_str(&format!(
        "\n\nA new site per volume size, one group and one volume. {} of 64 KiB random writes spread \
         over the whole volume are written with a fixed pattern (`--buffer_pattern=0x5a`), the point is \
         bookmarked, and the same offsets are written again with random data (the job below; fio's \
         random map and `--randrepeat=1` give the same offsets both times). Then, {} times: \
         `tidemark rollback {GROUP} --to bookmark:{BOOKMARK} --yes` is timed from the command to its \
         answer (the CLI waits for the rollback job, polling every 200 ms, so times are good to about \
         0.2 s), and `tidemark rollback {GROUP} --undo --yes` brings the changes back. `sync` runs \
         before each. For scale, `{}` writes the same number of bytes to a file in the same scratch \
         directory, {} times.\n\n```sh\n{}\n```\n\n",
        gib(r.config.change_bytes),
        r.config.runs,
        r.dd_command,
        r.config.runs,
        r.change_job
    ));
    out.push_str(
        "| volume | rollback median (min–max) | undo median (min–max) | bytes rewritten | rollback / dd |\n",
    );
    out.push_str("|---|---|---|---|---|\n");
    for v in &r.volumes {
        let cell = |x: &[f64]| {
            Summary::of(x)
                .map_or("–".to_string(), |s| format!("{:.2} s ({:.2}–{:.2})", s.median, s.min, s.max))
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            gib(v.volume_bytes),
            cell(&v.rollback_seconds),
            cell(&v.undo_seconds),
            v.bytes_rewritten
                .first()
                .map_or("–".to_string(), |b| format!("{:.2} GiB", *b as f64 / (1u64 << 30) as f64)),
            r.dd_ratio(v).map_or("–".to_string(), |x| format!("{x:.2}x"))
        ));
    }
    if let Some(s) = Summary::of(&r.dd_seconds) {
        out.push_str(&format!(
            "| dd of {} (`oflag=direct conv=fsync`) | {:.2} s ({:.2}–{:.2}) | | | 1x |\n",
            gib(r.config.change_bytes),
            s.median,
            s.min,
            s.max
        ));
    }
    match r.growth_ratio() {
        Some(g) => out.push_str(&format!(
            "\nRollback time on the {} volume over the {} volume: **{g:.2}x** (target: at most \
             {SIZE_GROWTH_TARGET_RATIO}x, i.e. it does not grow with the volume's size: **{}**). \
             Rollback against dd has no target in issue 7; it is shown for scale.\n",
            r.volumes.last().map_or("–".to_string(), |v| gib(v.volume_bytes)),
            r.volumes.first().map_or("–".to_string(), |v| gib(v.volume_bytes)),
            verdict(g <= SIZE_GROWTH_TARGET_RATIO)
        )),
        None => out.push_str("\nNo growth ratio: a volume has no samples.\n"),
    }
    out.push_str(
        "\nThe other recovery figures are measured elsewhere: start-up time with a 10 GiB journal \
         (clean, after `kill -9`, full rebuild) in the host-io section above, and swap, takeover and \
         failback in the role-changes section.\n",
    );
    out
}

/// fio's arguments for the change job: `pattern` writes the fixed pattern instead of random data.
fn change_args(uri: &str, volume_bytes: u64, change_bytes: u64, pattern: bool) -> Vec<String> {
    let mut args = vec![
        format!("--name={}", if pattern { "before" } else { "changes" }),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--rw=randwrite".to_string(),
        format!("--bs={}", crate::fio::fio_size(CHANGE_BLOCK_BYTES)),
        format!("--iodepth={CHANGE_IODEPTH}"),
        format!("--size={}", crate::fio::fio_size(volume_bytes)),
        format!("--io_size={}", crate::fio::fio_size(change_bytes)),
        "--randrepeat=1".to_string(),
        "--thread".to_string(),
    ];
    if pattern {
        args.push("--buffer_pattern=0x5a".to_string());
    } else {
        args.push("--refill_buffers".to_string());
    }
    args
}

fn dd_args(file: &str, bytes: u64) -> Vec<String> {
    vec![
        "if=/dev/zero".to_string(),
        format!("of={file}"),
        format!("bs={}", DD_BLOCK_BYTES),
        format!("count={}", bytes / DD_BLOCK_BYTES),
        "oflag=direct".to_string(),
        "conv=fsync".to_string(),
        "status=none".to_string(),
    ]
}

fn fio(args: &[String]) -> Result<()> {
    let mut command = Command::new("fio");
    command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let out = crate::children::Guarded::spawn(&mut command, "fio change job")?.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "fio {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if (g - g.round()).abs() < 0.005 {
        format!("{g:.0} GiB")
    } else {
        format!("{:.0} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}
