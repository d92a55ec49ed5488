//! `tidemark-bench`: measures real Tidemark sites on this machine and reports, never asserts.
//!
//! Sets: `host-io` (host I/O through fio's nbd engine against Tidemark, a protected Tidemark
//! group, qemu-nbd and nbdkit; index memory; start-up time), `roles` (swap, takeover,
//! failback), `wan` (replication through simnet), `recovery` (rollback time against volume
//! size) and `resources` (CPU per replicated GiB by zstd level, resident memory), or `all`. It
//! builds the release binaries first (a no-op when they are current), installs the tools it
//! needs with apt-get when they are missing (failing with the tool's name when it cannot),
//! prints one line per figure, and with `--out` writes the Markdown report (docs/benchmarks.md):
//! `host-io` writes the file's head and keeps the other sets' sections, each other set replaces
//! its own section between markers.

mod children;
mod fio;
mod host_io;
mod memory;
mod pair;
mod procfs;
mod recovery;
mod report;
mod resources;
mod roles;
mod startup;
mod stats;
mod targets;
mod wan;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

/// Runs per target in a full run.
const RUNS_DEFAULT: usize = 5;
/// Runs per target with --quick.
const RUNS_QUICK: usize = 1;
/// Length of each measured host I/O job, in seconds.
const JOB_SECONDS: u64 = 20;
const JOB_SECONDS_QUICK: u64 = 2;
/// Bytes of the export the host I/O jobs touch.
const REGION_BYTES: u64 = 4 << 30;
const REGION_BYTES_QUICK: u64 = 256 << 20;
/// Size of the volume and of qemu-nbd's raw file, in bytes.
const VOLUME_BYTES: u64 = 8 << 30;
/// Distinct 4 KiB blocks written by the index memory test.
const MEMORY_BLOCKS: u64 = 262_144;
const MEMORY_BLOCKS_QUICK: u64 = 32_768;
/// Journal written before the start-up timings, in bytes.
const STARTUP_JOURNAL_BYTES: u64 = 10 << 30;
const STARTUP_JOURNAL_BYTES_QUICK: u64 = 256 << 20;
/// 4 KiB random writes before each `kill -9`, in bytes.
const STARTUP_TAIL_BYTES: u64 = 64 << 20;
const STARTUP_TAIL_BYTES_QUICK: u64 = 16 << 20;
/// Timed starts per start-up case.
const STARTUP_TRIALS: usize = 3;
const STARTUP_TRIALS_QUICK: usize = 1;
/// Runs of the sets other than host-io (trials, rollbacks, replications per level).
const SET_RUNS_DEFAULT: usize = 3;
/// Volume sizes of the rollback test, and the changes rolled back, in bytes.
const RECOVERY_VOLUME_BYTES: [u64; 2] = [16 << 30, 64 << 30];
const RECOVERY_VOLUME_BYTES_QUICK: [u64; 2] = [1 << 30, 4 << 30];
const RECOVERY_CHANGE_BYTES: u64 = 1 << 30;
const RECOVERY_CHANGE_BYTES_QUICK: u64 = 128 << 20;
/// zstd levels of the CPU test, and the bytes replicated per run.
const ZSTD_LEVELS: [u32; 6] = [1, 3, 6, 9, 12, 19];
const ZSTD_LEVELS_QUICK: [u32; 2] = [1, 19];
const ZSTD_REPLICATED_BYTES: u64 = 256 << 20;
const ZSTD_REPLICATED_BYTES_QUICK: u64 = 32 << 20;
/// Logical size of the resident-memory test's volumes, its volume count and its journal.
const RESIDENT_LOGICAL_BYTES: u64 = 1 << 40;
const RESIDENT_VOLUMES: u64 = 4;
const RESIDENT_JOURNAL_BYTES: u64 = 10 << 30;
const RESIDENT_JOURNAL_BYTES_QUICK: u64 = 256 << 20;
/// Tools the benchmark runs, with the Debian package that has each.
const TOOLS: [(&str, &str); 5] = [
    ("fio", "fio"),
    ("qemu-nbd", "qemu-utils"),
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("nbdkit", "nbdkit"),
];

/// Measure Tidemark sites on this machine with real clients (fio, qemu-io, dd) against
/// qemu-nbd and nbdkit; prints one line per figure and optionally writes a Markdown report.
#[derive(Parser, Debug)]
#[command(name = "tidemark-bench", about, max_term_width = 100)]
struct Cli {
    /// Which benchmarks (`all` runs every set and writes one report).
    set: Set,
    /// Short runs with small sizes and one run each, for a regression check in under five
    /// minutes; the report is written only with --out.
    #[arg(long)]
    quick: bool,
    /// Runs per target in host-io [default: 5], and runs of the other sets [default: 3]
    /// (1 each with --quick).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: Option<u64>,
    /// Length of each host I/O job, in seconds [default: 20, or 2 with --quick].
    #[arg(long, value_name = "SECONDS", value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: Option<u64>,
    /// A sentence for the report about the conditions of the run (e.g. that the machine was
    /// shared).
    #[arg(long, value_name = "TEXT")]
    note: Option<String>,
    /// Write the Markdown report here (e.g. docs/benchmarks.md).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

/// Benchmark sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Set {
    /// Host I/O against qemu-nbd, index memory, start-up time.
    HostIo,
    /// Swap and takeover times between two sites (its own section of the report).
    Roles,
    /// Replication goodput and RPO through simnet's link profiles (its own section).
    Wan,
    /// Rollback time on a small and a large volume against dd (its own section).
    Recovery,
    /// CPU per replicated GiB by zstd level, resident memory with 1 TiB of volumes (its own
    /// section).
    Resources,
    /// Every set, in the order above, into one report.
    All,
}

impl Set {
    fn name(self) -> &'static str {
        match self {
            Set::HostIo => "host-io",
            Set::Roles => "roles",
            Set::Wan => "wan",
            Set::Recovery => "recovery",
            Set::Resources => "resources",
            Set::All => "all",
        }
    }
}

/// Everything one invocation measured, with how it was run.
pub struct Results {
    /// The command line as typed.
    pub command: String,
    /// When the run started.
    pub started: SystemTime,
    /// How long it took, in seconds.
    pub seconds: f64,
    /// Whether it was a --quick run.
    pub quick: bool,
    /// The machine.
    pub machine: procfs::Machine,
    /// The source measured: commit, and whether the work tree had changes.
    pub source: String,
    /// /proc/loadavg when the run started.
    pub load_average: String,
    /// The operator's note about the run's conditions.
    pub note: Option<String>,
    /// Host I/O.
    pub host_io: host_io::Report,
    /// Index memory.
    pub memory: memory::Report,
    /// Start-up time.
    pub startup: startup::Report,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        // An error caused by the signal handler killing the children is not the real story.
        Err(_) if children::interrupted().is_some() => {
            let signal = children::interrupted().unwrap_or(0);
            eprintln!("tidemark-bench: stopped by signal {signal}");
            ExitCode::from(u8::try_from(128 + signal).unwrap_or(u8::MAX))
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> Result<()> {
    children::install_signal_handler()?;
    let started = SystemTime::now();
    let clock = Instant::now();
    let root = workspace_root()?;
    ensure_tools()?;
    let binary = build_tidemark(&root)?;
    let sets: Vec<Set> = match cli.set {
        Set::All => vec![Set::HostIo, Set::Roles, Set::Wan, Set::Recovery, Set::Resources],
        set => vec![set],
    };
    let simnet = if sets.iter().any(|s| matches!(s, Set::Roles | Set::Wan)) {
        Some(build_simnet(&root)?)
    } else {
        None
    };

    // Scratch data lives under the system's temporary directory and is removed at the end,
    // or by the signal handler when the run is interrupted.
    let scratch = tempfile::Builder::new()
        .prefix("tidemark-bench-")
        .tempdir_in(std::env::temp_dir())
        .context("create a scratch directory in the temporary directory")?;
    children::register_scratch(scratch.path().to_path_buf());
    let machine = procfs::machine(scratch.path())?;
    let source = source_revision(&root);
    let load_average = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    let context = format!(
        "Generated by `{}` at {} from {} ({} CPUs), load average {load_average}.{}{}",
        command_line(cli),
        humantime::format_rfc3339_seconds(started),
        source,
        machine.cpus,
        cli.note.as_ref().map_or(String::new(), |n| format!(" {n}")),
        if cli.quick { " **A `--quick` run**: small sizes, one run each; not numbers to quote." } else { "" }
    );
    let runs = |default: usize| cli.runs.map_or(if cli.quick { 1 } else { default }, |n| n as usize);
    let mut report = cli.out.as_ref().map(|out| std::fs::read_to_string(out).unwrap_or_default());
    let mut lines = Vec::new();

    for set in sets {
        let set_clock = Instant::now();
        eprintln!("== {} ==", set.name());
        let set_lines = match set {
            Set::HostIo => {
                let results = host_io_set(
                    cli,
                    &binary,
                    scratch.path(),
                    &machine,
                    &source,
                    &load_average,
                    started,
                    clock,
                )?;
                if let Some(text) = report.as_mut() {
                    *text = report::markdown(&results, Some(text.as_str()));
                }
                report::summary_lines(&results)
            }
            Set::Roles => {
                let simnet = simnet.as_deref().context("simnet was not built")?;
                let profiles: &[&str] = if cli.quick { &[] } else { &["wan"] };
                let r = roles::run(runs(SET_RUNS_DEFAULT), &binary, simnet, profiles, scratch.path())?;
                replace(&mut report, report::ROLES_BEGIN, report::ROLES_END, &roles::markdown(&r, &context));
                roles::summary_lines(&r)
            }
            Set::Wan => {
                let simnet = simnet.as_deref().context("simnet was not built")?;
                let config = wan::Config {
                    profiles: if cli.quick {
                        vec!["wan".into()]
                    } else {
                        ["metro", "wan", "intercontinental", "satellite", "flapping"]
                            .map(String::from)
                            .to_vec()
                    },
                    backlog_link_seconds: if cli.quick { 3 } else { 20 },
                    load_seconds: if cli.quick { 6 } else { 20 },
                    runs: runs(SET_RUNS_DEFAULT),
                };
                let r = wan::run(&config, &binary, simnet, scratch.path())?;
                replace(
                    &mut report,
                    report::WAN_BEGIN,
                    report::WAN_END,
                    &wan::markdown(&r, &context, &config),
                );
                r.summary_lines()
            }
            Set::Recovery => {
                let config = recovery::Config {
                    volume_bytes: if cli.quick { RECOVERY_VOLUME_BYTES_QUICK } else { RECOVERY_VOLUME_BYTES }
                        .to_vec(),
                    change_bytes: if cli.quick { RECOVERY_CHANGE_BYTES_QUICK } else { RECOVERY_CHANGE_BYTES },
                    runs: runs(SET_RUNS_DEFAULT),
                };
                let r = recovery::run(&config, &binary, scratch.path())?;
                replace(
                    &mut report,
                    report::RECOVERY_BEGIN,
                    report::RECOVERY_END,
                    &recovery::markdown(&r, &context),
                );
                r.summary_lines()
            }
            Set::Resources => {
                let config = resources::Config {
                    levels: if cli.quick { ZSTD_LEVELS_QUICK.to_vec() } else { ZSTD_LEVELS.to_vec() },
                    replicated_bytes: if cli.quick {
                        ZSTD_REPLICATED_BYTES_QUICK
                    } else {
                        ZSTD_REPLICATED_BYTES
                    },
                    runs: runs(SET_RUNS_DEFAULT),
                    logical_bytes: RESIDENT_LOGICAL_BYTES,
                    volumes: RESIDENT_VOLUMES,
                    journal_bytes: if cli.quick {
                        RESIDENT_JOURNAL_BYTES_QUICK
                    } else {
                        RESIDENT_JOURNAL_BYTES
                    },
                    restarts: runs(SET_RUNS_DEFAULT),
                };
                let r = resources::run(&config, &binary, scratch.path())?;
                replace(
                    &mut report,
                    report::RESOURCES_BEGIN,
                    report::RESOURCES_END,
                    &resources::markdown(&r, &context),
                );
                r.summary_lines()
            }
            Set::All => bail!("`all` is not a set of its own"),
        };
        eprintln!("== {} took {:.0} s ==", set.name(), set_clock.elapsed().as_secs_f64());
        for line in &set_lines {
            println!("{line}");
        }
        lines.extend(set_lines);
        // Written after every set, so a later set's failure keeps the earlier sets' results.
        if let (Some(out), Some(text)) = (&cli.out, &report) {
            std::fs::write(out, text).with_context(|| format!("write report {}", out.display()))?;
            eprintln!("report written to {}", out.display());
        }
    }
    if lines.len() > 1 && cli.set == Set::All {
        println!("-- summary ({:.0} s) --", clock.elapsed().as_secs_f64());
        for line in &lines {
            println!("{line}");
        }
    }
    scratch.close().context("remove the scratch directory")?;
    Ok(())
}

/// Replace a section of the report being built, if one is.
fn replace(report: &mut Option<String>, begin: &str, end: &str, section: &str) {
    if let Some(text) = report.as_mut() {
        *text = report::replace_section(text, begin, end, section);
    }
}

/// The host-io set: host I/O, index memory, start-up time.
#[allow(clippy::too_many_arguments)]
fn host_io_set(
    cli: &Cli,
    binary: &Path,
    scratch: &Path,
    machine: &procfs::Machine,
    source: &str,
    load_average: &str,
    started: SystemTime,
    clock: Instant,
) -> Result<Results> {
    let can_drop_caches = procfs::drop_caches()?;
    if !can_drop_caches {
        eprintln!("note: the page cache cannot be dropped here; cold-cache figures are left out");
    }
    let runs = cli.runs.map_or(if cli.quick { RUNS_QUICK } else { RUNS_DEFAULT }, |n| n as usize);
    let host_io_config = host_io::Config {
        runs,
        job_seconds: cli.seconds.unwrap_or(if cli.quick { JOB_SECONDS_QUICK } else { JOB_SECONDS }),
        region_bytes: if cli.quick { REGION_BYTES_QUICK } else { REGION_BYTES },
        volume_bytes: VOLUME_BYTES,
        // A quick run leaves out the cold row: it measures the page cache, not a regression.
        cold_read: can_drop_caches && !cli.quick,
    };
    let startup_config = startup::Config {
        journal_bytes: if cli.quick { STARTUP_JOURNAL_BYTES_QUICK } else { STARTUP_JOURNAL_BYTES },
        tail_bytes: if cli.quick { STARTUP_TAIL_BYTES_QUICK } else { STARTUP_TAIL_BYTES },
        trials: if cli.quick { STARTUP_TRIALS_QUICK } else { STARTUP_TRIALS },
        cold: can_drop_caches,
    };
    let memory_blocks = if cli.quick { MEMORY_BLOCKS_QUICK } else { MEMORY_BLOCKS };

    let host_io = host_io::run(&host_io_config, binary, scratch)?;
    let memory = memory::run(memory_blocks, binary, scratch)?;
    let startup = startup::run(&startup_config, binary, scratch)?;
    Ok(Results {
        command: command_line(cli),
        started,
        seconds: clock.elapsed().as_secs_f64(),
        quick: cli.quick,
        machine: machine.clone(),
        source: source.to_string(),
        load_average: load_average.to_string(),
        note: cli.note.clone(),
        host_io,
        memory,
        startup,
    })
}

/// The workspace root: two levels above this crate's manifest.
fn workspace_root() -> Result<PathBuf> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = manifest.parent().and_then(Path::parent).context("find the workspace root")?;
    Ok(root.to_path_buf())
}

/// Make sure every tool is installed, installing missing ones with apt-get (as root).
fn ensure_tools() -> Result<()> {
    let missing: Vec<&str> =
        TOOLS.iter().filter(|(tool, _)| !have(tool)).map(|&(_, package)| package).collect();
    if !missing.is_empty() {
        let mut packages = missing.clone();
        packages.dedup();
        if !rustix::process::geteuid().is_root() {
            bail!(
                "missing Debian packages: {}; install them (apt-get install) or run as root",
                packages.join(" ")
            );
        }
        eprintln!("installing {}", packages.join(" "));
        apt_get(&["update", "-qq"])?;
        let mut args = vec!["install", "-y", "-qq"];
        args.extend(&packages);
        apt_get(&args)?;
        if let Some((tool, package)) = TOOLS.iter().find(|(tool, _)| !have(tool)) {
            bail!("{tool} is still missing after installing {package}");
        }
    }
    let out = Command::new("fio").arg("--enghelp=nbd").output().context("run fio --enghelp=nbd")?;
    if !out.status.success() {
        bail!("this fio has no nbd engine (fio --enghelp=nbd failed); install Debian's fio package");
    }
    Ok(())
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn apt_get(args: &[&str]) -> Result<()> {
    let status = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("run apt-get")?;
    if !status.success() {
        bail!("apt-get {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Build the tidemark binary in release mode (a no-op when it is current); returns its path.
fn build_tidemark(root: &Path) -> Result<PathBuf> {
    build_release(root, "tidemark-cli", "tidemark")
}

/// Build the simnet relay in release mode; returns its path.
fn build_simnet(root: &Path) -> Result<PathBuf> {
    build_release(root, "simnet", "simnet")
}

/// `cargo build --release -p PACKAGE`; returns the path of its binary `name`.
fn build_release(root: &Path, package: &str, name: &str) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let what = format!("cargo build --release -p {package}");
    eprintln!("building: {what}");
    let mut command = Command::new(cargo);
    command.args(["build", "--release", "-p", package]).current_dir(root);
    // Guarded like every other child, so an interrupted benchmark leaves no build running.
    let status = children::Guarded::spawn(&mut command, &what)?.wait()?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    let target_dir = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    let binary = target_dir.join("release").join(name);
    if !binary.exists() {
        bail!("the build did not produce {}", binary.display());
    }
    Ok(binary)
}

/// Crates the tidemark binary is built from.
const BINARY_SOURCES: [&str; 5] = [
    "crates/tidemark-journal",
    "crates/tidemark-engine",
    "crates/tidemark-nbd",
    "crates/tidemark-site",
    "crates/tidemark-cli",
];

/// The commit the binary was built from, and how many of its source files differed from it.
fn source_revision(root: &Path) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let Some(commit) = git(&["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown (not a git work tree)".to_string();
    };
    let mut args = vec!["status", "--porcelain", "--"];
    args.extend(BINARY_SOURCES);
    let changed = git(&args).map_or(0, |s| s.lines().count());
    match changed {
        0 => format!("commit {}", commit.trim()),
        n => format!(
            "commit {} plus uncommitted changes in {n} paths under crates/ and Cargo.*",
            commit.trim()
        ),
    }
}

/// The invocation as the report shows it.
fn command_line(cli: &Cli) -> String {
    let mut command = format!("cargo run --release -p tidemark-bench -- {}", cli.set.name());
    if cli.quick {
        command.push_str(" --quick");
    }
    if let Some(runs) = cli.runs {
        command.push_str(&format!(" --runs {runs}"));
    }
    if let Some(seconds) = cli.seconds {
        command.push_str(&format!(" --seconds {seconds}"));
    }
    if let Some(note) = &cli.note {
        command.push_str(&format!(" --note {note:?}"));
    }
    if let Some(out) = &cli.out {
        command.push_str(&format!(" --out {}", out.display()));
    }
    command
}
