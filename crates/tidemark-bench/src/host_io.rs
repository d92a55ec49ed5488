//! Host I/O: the same fio jobs over NBD against a Tidemark site (unprotected, and protected by
//! a partner site on loopback), against qemu-nbd and against nbdkit's file plugin serving a raw
//! file on the same filesystem, taking the targets in turn run by run.
//!
//! Each run of each target starts from nothing (a new site or pair, or a new sparse raw file),
//! fills the test region once with 1 MiB sequential writes so that reads find real data
//! everywhere, then runs the measured jobs in a fixed order. Before every job the page cache is
//! written back (`sync`), so no job pays for the previous one's dirty pages, and a protected
//! group's partner has caught up, so no job pays for the previous one's replication.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::fio::{Job, Outcome, Pattern};
use crate::pair::{wait_group_streaming, Pair};
use crate::procfs;
use crate::targets::{self, Nbdkit, QemuNbd, Site};

/// Block size of the sequential job, in bytes.
pub const SEQ_BLOCK_BYTES: u64 = 1 << 20;
/// Block size of the random jobs, in bytes.
pub const RAND_BLOCK_BYTES: u64 = 4 << 10;
/// Queue depth of the sequential job.
pub const SEQ_IODEPTH: u32 = 8;
/// Queue depth of the random jobs.
pub const RAND_IODEPTH: u32 = 32;
/// Block size of the mixed job, in bytes.
pub const MIXED_BLOCK_BYTES: u64 = 64 << 10;
/// Share of the mixed job's requests that are reads, in percent.
pub const MIXED_READ_PERCENT: u32 = 70;
/// Writes per flush in the flushing job (fio's `--fsync`).
pub const FSYNC_EVERY_WRITES: u32 = 16;
/// Protected IOPS or MB/s over unprotected must be at least this (issue 7).
pub const PROTECTION_TARGET_RATIO: f64 = 0.9;
/// Export name on both targets.
pub const EXPORT: &str = "v";
/// Group name on the site.
pub const GROUP: &str = "bench";
/// Write rates no target here reaches, sequential and random, in bytes per second (a buffered
/// single-threaded 1 MiB writer makes about 1.4 GB/s on this machine kind); they size the
/// journal limit and the disk space check for time-based write jobs. Were a site ever faster,
/// its group would trim its oldest history rather than fill the disk.
const SEQ_WRITE_RATE_CEILING_BYTES_PER_SECOND: u64 = 3 << 29;
const RAND_WRITE_RATE_CEILING_BYTES_PER_SECOND: u64 = 400 << 20;
/// The same for 4 KiB writes one at a time with a flush every 16 (an fdatasync each): no
/// target here does a quarter of the queued rate.
const FLUSHING_WRITE_RATE_CEILING_BYTES_PER_SECOND: u64 = 100 << 20;
/// Disk space kept free beyond the estimate, in bytes.
const DISK_MARGIN_BYTES: u64 = 4 << 30;
const GIB_BYTES: f64 = (1u64 << 30) as f64;

/// How the host I/O section runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// Runs per target.
    pub runs: usize,
    /// Length of each measured job, in seconds.
    pub job_seconds: u64,
    /// Bytes of the export the jobs touch.
    pub region_bytes: u64,
    /// Size of the volume and of the raw file, in bytes.
    pub volume_bytes: u64,
    /// Also measure random reads right after dropping the page cache.
    pub cold_read: bool,
}

/// The targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Tidemark site, its group not replicated.
    Tidemark,
    /// A Tidemark site whose group replicates to a partner site on loopback.
    TidemarkProtected,
    /// qemu-nbd on a raw file.
    QemuNbd,
    /// nbdkit's file plugin on a raw file.
    Nbdkit,
}

impl Target {
    /// All, in the order each run starts them (indexes of [`Figure::samples`]).
    pub const ALL: [Target; 4] =
        [Target::Tidemark, Target::TidemarkProtected, Target::QemuNbd, Target::Nbdkit];

    /// Its name in the report.
    pub fn label(self) -> &'static str {
        match self {
            Target::Tidemark => "Tidemark",
            Target::TidemarkProtected => "Tidemark protected",
            Target::QemuNbd => "qemu-nbd",
            Target::Nbdkit => "nbdkit",
        }
    }

    /// Its index in [`Target::ALL`].
    pub fn index(self) -> usize {
        match self {
            Target::Tidemark => 0,
            Target::TidemarkProtected => 1,
            Target::QemuNbd => 2,
            Target::Nbdkit => 3,
        }
    }
}

/// What a figure counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Megabytes (10^6 bytes) per second.
    MegabytesPerSecond,
    /// Requests per second.
    Iops,
}

impl Unit {
    /// Its abbreviation.
    pub fn label(self) -> &'static str {
        match self {
            Unit::MegabytesPerSecond => "MB/s",
            Unit::Iops => "IOPS",
        }
    }

    fn value(self, outcome: &Outcome) -> f64 {
        match self {
            Unit::MegabytesPerSecond => outcome.bytes_per_second / 1e6,
            Unit::Iops => outcome.iops,
        }
    }
}

/// Samples of one target in one figure, one per run.
#[derive(Clone, Debug, Default)]
pub struct Samples {
    /// The figure's value (MB/s or IOPS).
    pub value: Vec<f64>,
    /// Median completion latency, in microseconds.
    pub clat_p50_us: Vec<f64>,
    /// 99th percentile completion latency, in microseconds.
    pub clat_p99_us: Vec<f64>,
    /// The server's CPU time per GiB moved, in seconds.
    pub cpu_seconds_per_gib: Vec<f64>,
    /// The server's CPU time over the job's wall time: cores kept busy.
    pub cpu_cores: Vec<f64>,
    /// The whole machine's busy CPU time over the job's wall time (server, fio, kernel
    /// writeback and anything else running).
    pub machine_cores: Vec<f64>,
    /// NBD flushes and writes the site counted during the job (its
    /// `tidemark_nbd_operations_total`), Tidemark targets only: evidence that fio's sync
    /// reached the server as NBD_CMD_FLUSH.
    pub flushes_writes: Vec<(f64, f64)>,
}

/// One measured job and what each target did in it.
#[derive(Clone, Debug)]
pub struct Figure {
    /// Name in the report and the summary line.
    pub name: &'static str,
    /// Unit of `value`.
    pub unit: Unit,
    /// Tidemark / qemu-nbd and Tidemark / nbdkit of the medians must be at least this.
    pub target_ratio: f64,
    /// Drop the page cache right before the job.
    pub cold: bool,
    /// The fio job.
    pub job: Job,
    /// Samples per target, in [`Target::ALL`] order.
    pub samples: [Samples; 4],
}

impl Figure {
    /// The median of `target`'s values.
    pub fn median(&self, target: Target) -> Option<f64> {
        let samples = self.samples.get(target.index())?;
        crate::stats::Summary::of(&samples.value).map(|s| s.median)
    }

    /// The median of `of` over the median of `over`.
    pub fn ratio(&self, of: Target, over: Target) -> Option<f64> {
        let (a, b) = (self.median(of)?, self.median(over)?);
        (b > 0.0).then_some(a / b)
    }
}

/// Everything the section measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// How it ran.
    pub config: Config,
    /// The fill job run before the measured ones.
    pub fill: Job,
    /// The measured figures.
    pub figures: Vec<Figure>,
    /// The journal limit the site's group was created with.
    pub journal_max: String,
    /// CPUs of the machine (the most "cores busy" can be).
    pub cpus: usize,
}

impl Report {
    /// The figures with the ratios the report shows: (figure, what, ratio, target).
    pub fn ratios(&self) -> Vec<(&Figure, &'static str, Option<f64>, f64)> {
        let mut out = Vec::new();
        for f in &self.figures {
            out.push((f, "Tidemark / qemu-nbd", f.ratio(Target::Tidemark, Target::QemuNbd), f.target_ratio));
            out.push((f, "Tidemark / nbdkit", f.ratio(Target::Tidemark, Target::Nbdkit), f.target_ratio));
            out.push((
                f,
                "protected / unprotected",
                f.ratio(Target::TidemarkProtected, Target::Tidemark),
                PROTECTION_TARGET_RATIO,
            ));
        }
        out
    }
}

/// Run the section: `binary` is the tidemark release binary, `scratch` a directory on the
/// filesystem under test.
pub fn run(config: &Config, binary: &Path, scratch: &Path) -> Result<Report> {
    let fill = Job {
        name: "fill".into(),
        pattern: Pattern::SeqWrite,
        block_bytes: SEQ_BLOCK_BYTES,
        iodepth: SEQ_IODEPTH,
        region_bytes: config.region_bytes,
        offset_bytes: 0,
        runtime_seconds: None,
        fsync_every: None,
    };
    let mut figures = figures(config);
    let written_bytes = config.region_bytes
        + figures
            .iter()
            .map(|f| {
                let rate = match f.job.pattern {
                    Pattern::SeqWrite => SEQ_WRITE_RATE_CEILING_BYTES_PER_SECOND,
                    Pattern::RandWrite if f.job.fsync_every.is_some() => {
                        FLUSHING_WRITE_RATE_CEILING_BYTES_PER_SECOND
                    }
                    Pattern::RandWrite => RAND_WRITE_RATE_CEILING_BYTES_PER_SECOND,
                    // Only the writes' share of the mix goes to the journal.
                    Pattern::RandRw(read_percent) => {
                        RAND_WRITE_RATE_CEILING_BYTES_PER_SECOND * u64::from(100 - read_percent.min(100))
                            / 100
                    }
                    Pattern::RandRead => 0,
                };
                f.job.runtime_seconds.unwrap_or(0) * rate
            })
            .sum::<u64>();
    let journal_max = format!("{}GiB", written_bytes.div_ceil(1 << 30));
    // The protected target keeps every write twice: in its journal and in its partner's.
    let needed = 2 * written_bytes + config.volume_bytes + DISK_MARGIN_BYTES;
    let free = procfs::free_bytes(scratch)?;
    if free < needed {
        bail!(
            "host I/O needs up to {} GiB free in {} (a site's journal keeps every write), but {} GiB are free; \
             free some space or use --quick",
            needed >> 30,
            scratch.display(),
            free >> 30
        );
    }

    for run in 0..config.runs {
        for target in Target::ALL {
            eprintln!("host I/O: run {}/{}, {}", run + 1, config.runs, target.label());
            let dir = scratch.join(format!("host-io-{run}-{}", target.label()));
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            match target {
                Target::Tidemark => {
                    let mut site = Site::new(binary, &dir.join("site"))?;
                    site.start()?;
                    site.create_volume(GROUP, &journal_max, EXPORT, &targets::size_arg(config.volume_bytes))?;
                    let probe = Probe { pid: site.pid()?, site: Some(&site), protected: false };
                    measure(&site.uri(EXPORT), &probe, &fill, &mut figures, target, &dir)?;
                    site.stop()?;
                }
                Target::TidemarkProtected => {
                    let mut pair = Pair::start(binary, None, &dir)?;
                    let a = &pair.a;
                    a.create_volume(GROUP, &journal_max, EXPORT, &targets::size_arg(config.volume_bytes))?;
                    a.cli(&["group", "protect", GROUP, "--partner", "b"])?;
                    wait_group_streaming(a, GROUP)?;
                    let probe = Probe { pid: a.pid()?, site: Some(a), protected: true };
                    measure(&a.uri(EXPORT), &probe, &fill, &mut figures, target, &dir)?;
                    pair.a.stop()?;
                    pair.b.stop()?;
                }
                Target::QemuNbd => {
                    let image = dir.join("disk.raw");
                    targets::create_raw_image(&image, config.volume_bytes)?;
                    let server = QemuNbd::start(&image, EXPORT)?;
                    let probe = Probe { pid: server.pid(), site: None, protected: false };
                    measure(&server.uri(), &probe, &fill, &mut figures, target, &dir)?;
                    server.stop()?;
                }
                Target::Nbdkit => {
                    let image = dir.join("disk.raw");
                    targets::create_raw_image(&image, config.volume_bytes)?;
                    let server = Nbdkit::start(&image, EXPORT)?;
                    let probe = Probe { pid: server.pid(), site: None, protected: false };
                    measure(&server.uri(), &probe, &fill, &mut figures, target, &dir)?;
                    server.stop()?;
                }
            }
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        }
    }
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    Ok(Report { config: config.clone(), fill, figures, journal_max, cpus })
}

/// The measured figures, in the order each run does them.
fn figures(config: &Config) -> Vec<Figure> {
    let job = |name: &str, pattern, block_bytes, iodepth| Job {
        name: name.into(),
        pattern,
        block_bytes,
        iodepth,
        region_bytes: config.region_bytes,
        offset_bytes: 0,
        runtime_seconds: Some(config.job_seconds),
        fsync_every: None,
    };
    let mut figures = vec![
        Figure {
            name: "seq write 1 MiB qd8",
            unit: Unit::MegabytesPerSecond,
            target_ratio: 0.9,
            cold: false,
            job: job("seqwrite", Pattern::SeqWrite, SEQ_BLOCK_BYTES, SEQ_IODEPTH),
            samples: Default::default(),
        },
        Figure {
            name: "rand write 4 KiB qd32",
            unit: Unit::Iops,
            target_ratio: 1.0,
            cold: false,
            job: job("randwrite", Pattern::RandWrite, RAND_BLOCK_BYTES, RAND_IODEPTH),
            samples: Default::default(),
        },
        Figure {
            name: "rand read 4 KiB qd32",
            unit: Unit::Iops,
            target_ratio: 0.9,
            cold: false,
            job: job("randread", Pattern::RandRead, RAND_BLOCK_BYTES, RAND_IODEPTH),
            samples: Default::default(),
        },
        Figure {
            name: "rand write 4 KiB qd1, flush every 16",
            unit: Unit::Iops,
            target_ratio: 0.9,
            cold: false,
            job: Job {
                fsync_every: Some(FSYNC_EVERY_WRITES),
                ..job("randwrite-flush", Pattern::RandWrite, RAND_BLOCK_BYTES, 1)
            },
            samples: Default::default(),
        },
        Figure {
            name: "mixed 64 KiB 70/30 read/write qd32",
            unit: Unit::MegabytesPerSecond,
            target_ratio: 0.9,
            cold: false,
            job: job("randrw", Pattern::RandRw(MIXED_READ_PERCENT), MIXED_BLOCK_BYTES, RAND_IODEPTH),
            samples: Default::default(),
        },
    ];
    if config.cold_read {
        figures.push(Figure {
            name: "rand read 4 KiB qd32, page cache dropped",
            unit: Unit::Iops,
            target_ratio: 0.9,
            cold: true,
            job: job("randread-cold", Pattern::RandRead, RAND_BLOCK_BYTES, RAND_IODEPTH),
            samples: Default::default(),
        });
    }
    figures
}

/// What `measure` watches besides fio: the server's process, and for a site its counters and
/// whether its group has a partner to wait for.
struct Probe<'a> {
    pid: u32,
    site: Option<&'a Site>,
    protected: bool,
}

impl Probe<'_> {
    /// NBD flushes and writes the site has answered so far.
    fn flushes_writes(&self) -> Result<Option<(f64, f64)>> {
        let Some(site) = self.site else { return Ok(None) };
        let count =
            |op: &str| site.metric("tidemark_nbd_operations_total", &[&format!("operation=\"{op}\"")]);
        Ok(Some((count("flush")?, count("write")?)))
    }

    /// Wait until a protected group's partner has everything.
    fn settle(&self) -> Result<()> {
        match self.site {
            Some(site) if self.protected => wait_group_streaming(site, GROUP),
            _ => Ok(()),
        }
    }
}

/// Fill the region, then run every figure's job against `uri` and record `target`'s samples.
fn measure(
    uri: &str,
    probe: &Probe<'_>,
    fill: &Job,
    figures: &mut [Figure],
    target: Target,
    dir: &Path,
) -> Result<()> {
    procfs::sync();
    fill.run(uri, dir)?;
    for figure in figures.iter_mut() {
        probe.settle()?;
        if figure.cold {
            if !procfs::drop_caches()? {
                bail!("dropping the page cache is not allowed here; run as root, or without the cold read");
            }
        } else {
            procfs::sync();
        }
        let pid = probe.pid;
        let counts_before = probe.flushes_writes()?;
        let cpu_before = procfs::cpu_seconds(pid)?;
        let machine_before = procfs::machine_busy_seconds()?;
        let start = Instant::now();
        let outcome = figure.job.run(uri, dir)?;
        let wall_seconds = start.elapsed().as_secs_f64();
        let machine = procfs::machine_busy_seconds()? - machine_before;
        let cpu = procfs::cpu_seconds(pid)? - cpu_before;
        let counts_after = probe.flushes_writes()?;
        let samples = figure.samples.get_mut(target.index()).context("target index")?;
        samples.value.push(figure.unit.value(&outcome));
        samples.clat_p50_us.push(outcome.clat_p50_us);
        samples.clat_p99_us.push(outcome.clat_p99_us);
        samples.cpu_seconds_per_gib.push(cpu / (outcome.bytes as f64 / GIB_BYTES));
        samples.cpu_cores.push(cpu / wall_seconds);
        samples.machine_cores.push(machine / wall_seconds);
        if let (Some(before), Some(after)) = (counts_before, counts_after) {
            samples.flushes_writes.push((after.0 - before.0, after.1 - before.1));
        }
    }
    Ok(())
}
