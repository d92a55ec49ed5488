//! `tidemark-bench`: measures a real Tidemark site on this machine and reports, never asserts.
//!
//! `host-io` runs three sections: host I/O through fio's nbd engine against Tidemark and
//! against qemu-nbd on the same filesystem (ratios of medians against targets), index memory
//! per journaled block, and start-up time with a large journal. It builds the release binary
//! first (`cargo build --release -p tidemark-cli`, a no-op when it is current), installs fio
//! and qemu-utils with apt-get when they are missing, prints one line per figure, and with
//! `--out` writes the Markdown report (docs/benchmarks.md).

mod children;
mod fio;
mod host_io;
mod memory;
mod pair;
mod procfs;
mod report;
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
const JOB_SECONDS_QUICK: u64 = 5;
/// Bytes of the export the host I/O jobs touch.
const REGION_BYTES: u64 = 4 << 30;
const REGION_BYTES_QUICK: u64 = 1 << 30;
/// Size of the volume and of qemu-nbd's raw file, in bytes.
const VOLUME_BYTES: u64 = 8 << 30;
/// Distinct 4 KiB blocks written by the index memory test.
const MEMORY_BLOCKS: u64 = 262_144;
const MEMORY_BLOCKS_QUICK: u64 = 65_536;
/// Journal written before the start-up timings, in bytes.
const STARTUP_JOURNAL_BYTES: u64 = 10 << 30;
const STARTUP_JOURNAL_BYTES_QUICK: u64 = 1 << 30;
/// 4 KiB random writes before each `kill -9`, in bytes.
const STARTUP_TAIL_BYTES: u64 = 64 << 20;
const STARTUP_TAIL_BYTES_QUICK: u64 = 16 << 20;
/// Timed starts per start-up case.
const STARTUP_TRIALS: usize = 3;
/// Tools the benchmark runs, with the Debian package that has each.
const TOOLS: [(&str, &str); 3] = [("fio", "fio"), ("qemu-nbd", "qemu-utils"), ("qemu-img", "qemu-utils")];

/// Measure Tidemark against qemu-nbd with the same fio client, and its index memory and
/// start-up time; prints one line per figure and optionally writes a Markdown report.
#[derive(Parser, Debug)]
#[command(name = "tidemark-bench", about, max_term_width = 100)]
struct Cli {
    /// Which benchmarks: `host-io` (host I/O, index memory, start-up) or `all` (the same, for now).
    set: Set,
    /// Short runs (5 s jobs, 1 GiB region and journal, 1 run) that finish in a few minutes.
    #[arg(long)]
    quick: bool,
    /// Runs per target in the host I/O section [default: 5, or 1 with --quick].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: Option<u64>,
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
    /// Replication goodput and RPO through simnet's link profiles, and the cost of protection
    /// on host writes (its own section of the report).
    Wan,
    /// Every benchmark.
    All,
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

    let scratch_parent = root.join("target").join("bench-tmp");
    std::fs::create_dir_all(&scratch_parent)
        .with_context(|| format!("create scratch directory {}", scratch_parent.display()))?;
    let scratch = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&scratch_parent)
        .with_context(|| format!("create a scratch directory in {}", scratch_parent.display()))?;
    children::register_scratch(scratch.path().to_path_buf());
    let machine = procfs::machine(scratch.path())?;
    let source = source_revision(&root);
    let load_average = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim().to_string();
    if matches!(cli.set, Set::Roles | Set::Wan) {
        let context = format!(
            "Generated by `{}` at {} from {} ({} CPUs), load average {load_average}.",
            command_line(cli),
            humantime::format_rfc3339_seconds(started),
            source,
            machine.cpus
        );
        let simnet = build_simnet(&root)?;
        let (section, begin, end) = if cli.set == Set::Roles {
            let trials = cli.runs.map_or(if cli.quick { 1 } else { 3 }, |n| n as usize);
            let report = roles::run(trials, &binary, &simnet, &["wan"], scratch.path())?;
            (roles::markdown(&report, &context), report::ROLES_BEGIN, report::ROLES_END)
        } else {
            let config = wan::Config {
                profiles: if cli.quick {
                    vec!["wan".into()]
                } else {
                    ["metro", "wan", "intercontinental", "satellite", "flapping"].map(String::from).to_vec()
                },
                backlog_link_seconds: if cli.quick { 5 } else { 20 },
                load_seconds: if cli.quick { 10 } else { 20 },
                runs: cli.runs.map_or(if cli.quick { 1 } else { 3 }, |n| n as usize),
                job_seconds: if cli.quick { 5 } else { 15 },
            };
            let report = wan::run(&config, &binary, &simnet, scratch.path())?;
            (wan::markdown(&report, &context, &config), report::WAN_BEGIN, report::WAN_END)
        };
        print!("{section}");
        if let Some(out) = &cli.out {
            let previous = std::fs::read_to_string(out).unwrap_or_default();
            let text = report::replace_section(&previous, begin, end, &section);
            std::fs::write(out, text).with_context(|| format!("write report {}", out.display()))?;
            eprintln!("section written to {}", out.display());
        }
        scratch.close().context("remove the scratch directory")?;
        return Ok(());
    }
    let can_drop_caches = procfs::drop_caches()?;
    if !can_drop_caches {
        eprintln!("note: the page cache cannot be dropped here; cold-cache figures are left out");
    }

    let runs = cli.runs.map_or(if cli.quick { RUNS_QUICK } else { RUNS_DEFAULT }, |n| n as usize);
    let host_io_config = host_io::Config {
        runs,
        job_seconds: if cli.quick { JOB_SECONDS_QUICK } else { JOB_SECONDS },
        region_bytes: if cli.quick { REGION_BYTES_QUICK } else { REGION_BYTES },
        volume_bytes: VOLUME_BYTES,
        cold_read: can_drop_caches,
    };
    let startup_config = startup::Config {
        journal_bytes: if cli.quick { STARTUP_JOURNAL_BYTES_QUICK } else { STARTUP_JOURNAL_BYTES },
        tail_bytes: if cli.quick { STARTUP_TAIL_BYTES_QUICK } else { STARTUP_TAIL_BYTES },
        trials: STARTUP_TRIALS,
        cold: can_drop_caches,
    };
    let memory_blocks = if cli.quick { MEMORY_BLOCKS_QUICK } else { MEMORY_BLOCKS };

    let host_io = host_io::run(&host_io_config, &binary, scratch.path())?;
    let memory = memory::run(memory_blocks, &binary, scratch.path())?;
    let startup = startup::run(&startup_config, &binary, scratch.path())?;

    let results = Results {
        command: command_line(cli),
        started,
        seconds: clock.elapsed().as_secs_f64(),
        quick: cli.quick,
        machine,
        source,
        load_average,
        host_io,
        memory,
        startup,
    };
    for line in report::summary_lines(&results) {
        println!("{line}");
    }
    if let Some(out) = &cli.out {
        let previous = std::fs::read_to_string(out).ok();
        let text = report::markdown(&results, previous.as_deref());
        std::fs::write(out, text).with_context(|| format!("write report {}", out.display()))?;
        eprintln!("report written to {}", out.display());
    }
    scratch.close().context("remove the scratch directory")?;
    Ok(())
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
    let mut command = format!(
        "cargo run --release -p tidemark-bench -- {}",
        match cli.set {
            Set::HostIo => "host-io",
            Set::Roles => "roles",
            Set::Wan => "wan",
            Set::All => "all",
        }
    );
    if cli.quick {
        command.push_str(" --quick");
    }
    if let Some(runs) = cli.runs {
        command.push_str(&format!(" --runs {runs}"));
    }
    if let Some(out) = &cli.out {
        command.push_str(&format!(" --out {}", out.display()));
    }
    command
}
