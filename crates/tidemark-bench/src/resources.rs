//! Resources: the primary's CPU seconds per replicated GiB at each zstd level
//! (`[replication] zstd_level`), replicating the same data to a partner on loopback, and the
//! resident memory of a site holding 1 TiB of logical volumes and a large journal.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::children::Guarded;
use crate::fio::{Job, Pattern};
use crate::pair::{wait_streaming, Pair};
use crate::procfs::{self, Memory};
use crate::stats::Summary;
use crate::targets::{self, Site};

/// Request size of the replicated data and of the memory test's journal fill, in bytes.
const WRITE_BLOCK_BYTES: u64 = 1 << 20;
const WRITE_IODEPTH: u32 = 8;
/// fio's `--buffer_compress_percentage` of the replicated data: about 3:1 for zstd, as in the
/// WAN section.
const COMPRESS_PERCENT: u32 = 67;
/// Pause before each memory reading, in seconds, so a maintenance pass is not caught half-way.
const SETTLE_SECONDS: u64 = 3;
/// Disk space kept free beyond what the section writes, in bytes.
const DISK_MARGIN_BYTES: u64 = 4 << 30;

/// How the section runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// zstd levels to measure.
    pub levels: Vec<u32>,
    /// Bytes replicated per run.
    pub replicated_bytes: u64,
    /// Runs per level.
    pub runs: usize,
    /// Logical size of the memory test's volumes, in bytes, in all.
    pub logical_bytes: u64,
    /// Volumes the logical size is split into.
    pub volumes: u64,
    /// Bytes written into the memory test's journal.
    pub journal_bytes: u64,
    /// Restarts (each followed by a memory reading) in the memory test.
    pub restarts: usize,
}

/// One zstd level's runs.
#[derive(Clone, Debug)]
pub struct LevelRuns {
    /// The level.
    pub level: u32,
    /// The primary's CPU seconds per replicated GiB (uncompressed), per run.
    pub primary_cpu_per_gib: Vec<f64>,
    /// The partner's CPU seconds per replicated GiB, per run.
    pub partner_cpu_per_gib: Vec<f64>,
    /// Uncompressed bytes over compressed bytes sent, per run.
    pub compression_ratio: Vec<f64>,
    /// Replicated GiB per second of catch-up, per run.
    pub gib_per_second: Vec<f64>,
}

/// The memory test.
#[derive(Clone, Debug)]
pub struct MemoryReport {
    /// After the volumes were created, before any write.
    pub empty: Memory,
    /// After the journal was written.
    pub written: Memory,
    /// After each restart (the index loaded from its checkpoint).
    pub restarted: Vec<Memory>,
    /// The journal's size as the site reports it, in bytes.
    pub journal_bytes: u64,
    /// The fill job of one volume.
    pub fill: Job,
}

/// What the section measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// How it ran.
    pub config: Config,
    /// Per level.
    pub levels: Vec<LevelRuns>,
    /// Resident memory.
    pub memory: MemoryReport,
}

impl Report {
    /// One line per figure.
    pub fn summary_lines(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for l in &self.levels {
            let med = |v: &[f64]| Summary::of(v).map_or(f64::NAN, |s| s.median);
            lines.push(format!(
                "primary CPU per replicated GiB at zstd level {}: {:.2} s (compression {:.2}:1; no target stated)",
                l.level,
                med(&l.primary_cpu_per_gib),
                med(&l.compression_ratio)
            ));
        }
        let m = &self.memory;
        lines.push(format!(
            "resident memory with {} of volumes and a {} journal: {:.1} MiB after writing, {:.1} MiB after a restart (no target stated)",
            tib(self.config.logical_bytes),
            gib(m.journal_bytes),
            mib(m.written.rss_bytes),
            mib(median_rss(&m.restarted))
        ));
        lines
    }
}

/// Run the section in `scratch`.
pub fn run(config: &Config, binary: &Path, scratch: &Path) -> Result<Report> {
    let needed = 2 * config.replicated_bytes * config.runs as u64 + config.journal_bytes + DISK_MARGIN_BYTES;
    let free = procfs::free_bytes(scratch)?;
    if free < needed {
        bail!(
            "the resources benchmark needs {} GiB free in {}, but {} GiB are free",
            needed >> 30,
            scratch.display(),
            free >> 30
        );
    }
    let mut levels = Vec::new();
    for &level in &config.levels {
        let dir = scratch.join(format!("zstd-{level}"));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let runs = zstd_level(config, level, binary, &dir).with_context(|| format!("zstd level {level}"))?;
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        levels.push(runs);
    }
    let dir = scratch.join("resident");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let memory = resident(config, binary, &dir)?;
    std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    Ok(Report { config: config.clone(), levels, memory })
}

/// Replicate the same kind of data `runs` times through a pair whose primary compresses at
/// `level`.
fn zstd_level(config: &Config, level: u32, binary: &Path, dir: &Path) -> Result<LevelRuns> {
    let toml = format!("[replication]\nzstd_level = {level}\n");
    let mut pair = Pair::start_with_config(binary, None, dir, Some(&toml))?;
    let volume = (config.replicated_bytes * config.runs as u64 + (1 << 30)).next_multiple_of(1 << 30);
    let journal_max = targets::size_arg((2 * volume).next_multiple_of(1 << 30));
    let (a, b) = (&pair.a, &pair.b);
    a.create_volume("g", &journal_max, "v", &targets::size_arg(volume))?;
    a.cli(&["group", "protect", "g", "--partner", "b"])?;
    wait_streaming(a)?;
    let mut out = LevelRuns {
        level,
        primary_cpu_per_gib: Vec::new(),
        partner_cpu_per_gib: Vec::new(),
        compression_ratio: Vec::new(),
        gib_per_second: Vec::new(),
    };
    for run in 0..config.runs {
        a.cli(&["group", "pause", "g"])?;
        let offset = run as u64 * config.replicated_bytes;
        fio(&backlog_args(&a.uri("v"), offset, config.replicated_bytes))?;
        procfs::sync();
        let before = sent(a)?;
        let (cpu_a, cpu_b) = (procfs::cpu_seconds(a.pid()?)?, procfs::cpu_seconds(b.pid()?)?);
        let start = Instant::now();
        a.cli(&["group", "resume", "g"])?;
        wait_streaming(a)?;
        let seconds = start.elapsed().as_secs_f64();
        let (cpu_a, cpu_b) = (procfs::cpu_seconds(a.pid()?)? - cpu_a, procfs::cpu_seconds(b.pid()?)? - cpu_b);
        let after = sent(a)?;
        let (raw, wire) = (after.0 - before.0, after.1 - before.1);
        if raw == 0 || wire == 0 {
            bail!("the primary sent nothing while catching up");
        }
        let gib = raw as f64 / (1u64 << 30) as f64;
        eprintln!(
            "resources: zstd {level}, run {}: {raw} bytes ({wire} compressed) in {seconds:.2} s; primary {cpu_a:.2} CPU-s, partner {cpu_b:.2} CPU-s",
            run + 1
        );
        out.primary_cpu_per_gib.push(cpu_a / gib);
        out.partner_cpu_per_gib.push(cpu_b / gib);
        out.compression_ratio.push(raw as f64 / wire as f64);
        out.gib_per_second.push(gib / seconds);
    }
    pair.a.stop()?;
    pair.b.stop()?;
    Ok(out)
}

/// A site with `logical_bytes` of volumes and `journal_bytes` written into them.
fn resident(config: &Config, binary: &Path, dir: &Path) -> Result<MemoryReport> {
    let mut site = Site::new(binary, &dir.join("site"))?;
    site.start()?;
    let journal_max = targets::size_arg((2 * config.journal_bytes).next_multiple_of(1 << 30));
    site.cli(&["group", "create", "big", "--journal-max", &journal_max])?;
    let volume_bytes = config.logical_bytes / config.volumes.max(1);
    for n in 0..config.volumes {
        site.cli(&[
            "volume",
            "create",
            &format!("v{n}"),
            "--size",
            &targets::size_arg(volume_bytes),
            "--group",
            "big",
        ])?;
    }
    let empty = settled(site.pid()?)?;
    let per_volume = (config.journal_bytes / config.volumes.max(1)).next_multiple_of(WRITE_BLOCK_BYTES);
    let fill = Job {
        name: "resident-fill".into(),
        pattern: Pattern::SeqWrite,
        block_bytes: WRITE_BLOCK_BYTES,
        iodepth: WRITE_IODEPTH,
        region_bytes: per_volume,
        offset_bytes: 0,
        runtime_seconds: None,
        fsync_every: None,
    };
    eprintln!("resources: writing {} MiB over {} volumes", config.journal_bytes >> 20, config.volumes);
    for n in 0..config.volumes {
        fill.run(&site.uri(&format!("v{n}")), dir)?;
    }
    let journal_bytes = site.journal("big")?.0;
    let written = settled(site.pid()?)?;
    let mut restarted = Vec::new();
    for _ in 0..config.restarts {
        site.stop()?;
        site.start()?;
        restarted.push(settled(site.pid()?)?);
    }
    site.stop()?;
    Ok(MemoryReport { empty, written, restarted, journal_bytes, fill })
}

/// The Markdown section (between the resources markers of docs/benchmarks.md).
pub fn markdown(r: &Report, context: &str) -> String {
    let c = &r.config;
    let mut out = String::new();
    out.push_str("## Resources: CPU per replicated GiB by zstd level, and resident memory\n\n");
    out.push_str(context);
    out.push_str(&format!(
        "\n\n**CPU per replicated GiB.** Per level, a new pair of sites on loopback, the primary \
         started with a config file holding `[replication] zstd_level = N`; one group, protected, \
         caught up. Then {} times: replication is paused, {} of about 3:1-compressible data is \
         written with fio (`--rw=write --bs=1m --iodepth=8 --refill_buffers \
         --buffer_compress_percentage={COMPRESS_PERCENT} --buffer_compress_chunk=4k`, each run at a \
         new offset), the primary's and the partner's CPU time (user + system, /proc/PID/stat) are \
         read, replication resumes, and they are read again when `lag_records` is 0. CPU per GiB \
         counts the uncompressed bytes sent (`bytes_sent_total`). The polling of `group show` every \
         20 ms while waiting is included in the primary's CPU (a few ms per second). Catch-up GiB/s \
         is those bytes over the time from the resume command until `lag_records` is 0, \
         reconnection included; both sites share this machine's two CPUs.\n\n",
        c.runs,
        mib_or_gib(c.replicated_bytes)
    ));
    out.push_str("| zstd level | primary CPU-s per GiB, median (min–max) | partner CPU-s per GiB, median (min–max) | compression ratio, median | catch-up GiB/s, median (min–max) |\n");
    out.push_str("|---|---|---|---|---|\n");
    for l in &r.levels {
        let spread = |v: &[f64]| {
            Summary::of(v)
                .map_or("–".to_string(), |s| format!("{:.2} ({:.2}–{:.2})", s.median, s.min, s.max))
        };
        let med = |v: &[f64]| Summary::of(v).map_or("–".to_string(), |s| format!("{:.2}", s.median));
        out.push_str(&format!(
            "| {} | {} | {} | {}:1 | {} |\n",
            l.level,
            spread(&l.primary_cpu_per_gib),
            spread(&l.partner_cpu_per_gib),
            med(&l.compression_ratio),
            spread(&l.gib_per_second)
        ));
    }
    let m = &r.memory;
    out.push_str(&format!(
        "\nIssue 7 states no target for CPU per GiB; the table is for choosing a level (the `auto` \
         default picks 1 at 800 Mbit/s and faster links, up to 12 on slow ones).\n\n\
         **Resident memory.** A new site with one group and {} volumes of {} each ({} of logical \
         volumes, sparse), memory read (VmRSS, RssAnon from /proc/PID/status, {SETTLE_SECONDS} s after \
         the last action); then {} written with 1 MiB sequential writes ({} per volume, `{}`), leaving \
         a journal of {:.2} GiB; memory read again; then {} clean restarts (the index loaded from its \
         checkpoint), memory read after each.\n\n",
        c.volumes,
        tib_or_gib(c.logical_bytes / c.volumes.max(1)),
        tib(c.logical_bytes),
        mib_or_gib(c.journal_bytes),
        mib_or_gib(m.fill.region_bytes),
        m.fill.command_line("nbd://127.0.0.1:PORT/vN"),
        m.journal_bytes as f64 / (1u64 << 30) as f64,
        c.restarts
    ));
    out.push_str("| state | VmRSS | RssAnon |\n|---|---|---|\n");
    out.push_str(&format!(
        "| volumes created, nothing written | {:.1} MiB | {:.1} MiB |\n",
        mib(m.empty.rss_bytes),
        mib(m.empty.rss_anon_bytes)
    ));
    out.push_str(&format!(
        "| journal written | {:.1} MiB | {:.1} MiB |\n",
        mib(m.written.rss_bytes),
        mib(m.written.rss_anon_bytes)
    ));
    let rss: Vec<f64> = m.restarted.iter().map(|x| mib(x.rss_bytes)).collect();
    let anon: Vec<f64> = m.restarted.iter().map(|x| mib(x.rss_anon_bytes)).collect();
    if let (Some(s), Some(a)) = (Summary::of(&rss), Summary::of(&anon)) {
        out.push_str(&format!(
            "| after a restart, median of {} (min–max) | {:.1} MiB ({:.1}–{:.1}) | {:.1} MiB ({:.1}–{:.1}) |\n",
            rss.len(),
            s.median,
            s.min,
            s.max,
            a.median,
            a.min,
            a.max
        ));
    }
    let blocks = (m.fill.region_bytes * c.volumes / 4096).max(1);
    out.push_str(&format!(
        "\nIssue 7 states no target for resident memory. The journal holds {blocks} distinct 4 KiB \
         blocks; VmRSS grew by {:.1} bytes per block while they were written and stands {:.1} bytes \
         per block above the empty site after a restart (the index memory section measures the same \
         per-block cost on its own).\n",
        (m.written.rss_bytes as f64 - m.empty.rss_bytes as f64) / blocks as f64,
        (median_rss(&m.restarted) as f64 - m.empty.rss_bytes as f64) / blocks as f64
    ));
    out
}

fn backlog_args(uri: &str, offset: u64, bytes: u64) -> Vec<String> {
    vec![
        "--name=replicated".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={uri}"),
        "--rw=write".to_string(),
        format!("--bs={}", crate::fio::fio_size(WRITE_BLOCK_BYTES)),
        format!("--iodepth={WRITE_IODEPTH}"),
        format!("--offset={offset}"),
        format!("--size={bytes}"),
        "--refill_buffers".to_string(),
        format!("--buffer_compress_percentage={COMPRESS_PERCENT}"),
        "--buffer_compress_chunk=4k".to_string(),
        "--thread".to_string(),
    ]
}

fn fio(args: &[String]) -> Result<()> {
    let mut command = Command::new("fio");
    command.args(args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let out = Guarded::spawn(&mut command, "fio backlog")?.wait_with_output()?;
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

/// (raw, compressed) bytes the primary has sent for group `g`.
fn sent(a: &Site) -> Result<(u64, u64)> {
    let r = &a.group("g")?["replication"];
    Ok((
        r["bytes_sent_total"].as_u64().context("bytes_sent_total")?,
        r["bytes_sent_compressed_total"].as_u64().context("bytes_sent_compressed_total")?,
    ))
}

fn settled(pid: u32) -> Result<Memory> {
    std::thread::sleep(Duration::from_secs(SETTLE_SECONDS));
    procfs::memory(pid)
}

fn median_rss(m: &[Memory]) -> u64 {
    let v: Vec<f64> = m.iter().map(|x| x.rss_bytes as f64).collect();
    Summary::of(&v).map_or(0, |s| s.median as u64)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn tib(bytes: u64) -> String {
    format!("{:.0} TiB", bytes as f64 / (1u64 << 40) as f64)
}

fn tib_or_gib(bytes: u64) -> String {
    if bytes >= 1 << 40 {
        tib(bytes)
    } else {
        format!("{} GiB", bytes >> 30)
    }
}

fn mib_or_gib(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes % (1 << 30) == 0 {
        format!("{} GiB", bytes >> 30)
    } else {
        format!("{} MiB", bytes >> 20)
    }
}
