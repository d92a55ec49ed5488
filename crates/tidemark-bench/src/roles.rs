//! Role changes between two real sites on this machine: how long a planned swap takes with a
//! steady host workload running on the primary, how long a takeover takes from the command
//! to a writable export after the primary is killed, and how many bytes the failback sends when
//! the killed site returns. Each trial starts a fresh pair.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::children::Guarded;
use crate::pair::{last_seq, wait_streaming, Pair};
use crate::targets::Site;

/// The swap target, in seconds (issue: at most 5 s with a steady workload).
pub const SWAP_TARGET_SECONDS: f64 = 5.0;
/// The takeover target, in seconds (issue: at most 2 s from the command to a writable export).
pub const TAKEOVER_TARGET_SECONDS: f64 = 2.0;
/// The steady workload: 4 KiB random writes at this rate, with this many in flight.
const WORKLOAD_RATE: &str = "20m";
const WORKLOAD_IODEPTH: u32 = 4;
/// The most a workload runs (each is killed long before).
const WORKLOAD_RUNTIME: Duration = Duration::from_secs(60);
/// How long the workload runs before the role change.
const WORKLOAD_WARMUP: Duration = Duration::from_secs(5);
/// How long replication may take to catch up before a trial gives up.
const CATCH_UP: Duration = Duration::from_secs(120);
/// Bytes the new primary writes after the takeover, before the old primary returns.
const FAILBACK_WRITE_BYTES: u64 = 64 << 20;

/// One trial's timings, in seconds.
#[derive(Clone, Copy, Debug)]
pub struct Trial {
    /// Records the workload wrote during the warm-up before the swap (evidence that it ran).
    pub workload_records: u64,
    /// `tidemark group swap` from start to its answer.
    pub swap_seconds: f64,
    /// From the swap command to the first write the new primary's export accepted.
    pub swap_to_write_seconds: f64,
    /// `tidemark group takeover` from start to its answer.
    pub takeover_seconds: f64,
    /// From the takeover command to the first write the new primary's export accepted.
    pub takeover_to_write_seconds: f64,
    /// Bytes written on the new primary after the takeover (the fill job, plus the 4 KiB
    /// probe write).
    pub failback_written_bytes: u64,
    /// Bytes (uncompressed) the new primary sent to the returning old primary until it was
    /// caught up: its history since the fork point, not the volume.
    pub failback_sent_bytes: u64,
    /// From restarting the old primary to its being caught up, in seconds.
    pub failback_seconds: f64,
}

/// Everything the roles benchmark measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// The workload's fio command, for the report.
    pub workload: String,
    /// Trials per link: `loopback`, or a simnet profile name.
    pub links: Vec<(String, Vec<Trial>)>,
}

/// Run `trials` trials per link with fresh pairs of sites under `scratch`: on loopback, and
/// through simnet (`simnet` binary) with each of `profiles`.
pub fn run(trials: usize, binary: &Path, simnet: &Path, profiles: &[&str], scratch: &Path) -> Result<Report> {
    let mut links = Vec::new();
    let mut workload = String::new();
    let mut names: Vec<Option<&str>> = vec![None];
    names.extend(profiles.iter().map(|p| Some(*p)));
    for profile in names {
        let label = profile.unwrap_or("loopback").to_string();
        let mut out = Vec::new();
        for n in 0..trials {
            let dir = scratch.join(format!("roles-{label}-{n}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let link = profile.map(|p| (simnet, p));
            let (trial, command) =
                trial(binary, link, &dir).with_context(|| format!("roles trial {n} ({label})"))?;
            eprintln!(
                "roles {label} trial {n}: {} records in warm-up; swap {:.2}s (write after {:.2}s), takeover {:.2}s (write after {:.2}s), failback sent {} bytes for {} written in {:.2}s",
                trial.workload_records,
                trial.swap_seconds,
                trial.swap_to_write_seconds,
                trial.takeover_seconds,
                trial.takeover_to_write_seconds,
                trial.failback_sent_bytes,
                trial.failback_written_bytes,
                trial.failback_seconds
            );
            workload = command;
            out.push(trial);
            std::fs::remove_dir_all(&dir).ok();
        }
        links.push((label, out));
    }
    Ok(Report { workload, links })
}

fn trial(binary: &Path, link: Option<(&Path, &str)>, dir: &Path) -> Result<(Trial, String)> {
    let Pair { mut a, mut b, relays } = Pair::start(binary, link, dir)?;
    a.create_volume("g", "4GiB", "v", "1GiB")?;
    a.cli(&["group", "protect", "g", "--partner", "b"])?;
    wait_streaming(&a)?;

    // Swap with the workload running on the primary.
    let (mut fio, command) = workload(&a)?;
    let before = last_seq(&a)?;
    std::thread::sleep(WORKLOAD_WARMUP);
    let workload_records = last_seq(&a)? - before;
    if workload_records < 100 {
        bail!("the workload wrote only {workload_records} records in {WORKLOAD_WARMUP:?}");
    }
    let start = Instant::now();
    a.cli(&["group", "swap", "g", "--json"])?;
    let swap_seconds = start.elapsed().as_secs_f64();
    wait_writable(&b)?;
    let swap_to_write_seconds = start.elapsed().as_secs_f64();
    let _ = fio.kill();

    // Takeover: the workload runs on the new primary, which is then killed.
    wait_streaming(&b)?;
    let (mut fio, _) = workload(&b)?;
    std::thread::sleep(WORKLOAD_WARMUP);
    b.kill9()?;
    let _ = fio.kill();
    let start = Instant::now();
    a.cli(&["group", "takeover", "g", "--yes", "--json"])?;
    let takeover_seconds = start.elapsed().as_secs_f64();
    wait_writable(&a)?;
    let takeover_to_write_seconds = start.elapsed().as_secs_f64();

    // Failback: the new primary writes, the old one returns, is fenced, keeps its unreplicated
    // tail as a salvage image, cuts it, and receives what was written since the fork.
    let fill = format!("--size={FAILBACK_WRITE_BYTES}");
    let status = Command::new("fio")
        .args(["--name=after-takeover", "--ioengine=nbd", &format!("--uri={}", a.uri("v"))])
        .args(["--rw=write", "--bs=1m", "--iodepth=8", "--offset=0", &fill, "--thread", "--refill_buffers"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("run fio")?;
    if !status.success() {
        bail!("fio on the new primary failed ({status})");
    }
    let sent = |site: &Site| -> Result<u64> {
        site.group("g")?["replication"]["bytes_sent_total"]
            .as_u64()
            .context("no replication.bytes_sent_total")
    };
    let sent_before = sent(&a)?;
    let start = Instant::now();
    b.start()?;
    wait_streaming(&a)?;
    let failback_seconds = start.elapsed().as_secs_f64();
    let failback_sent_bytes = sent(&a)? - sent_before;
    a.stop()?;
    b.stop()?;
    drop(relays);
    Ok((
        Trial {
            workload_records,
            swap_seconds,
            swap_to_write_seconds,
            takeover_seconds,
            takeover_to_write_seconds,
            failback_written_bytes: FAILBACK_WRITE_BYTES + 4096,
            failback_sent_bytes,
            failback_seconds,
        },
        command,
    ))
}

/// Start the steady workload against `site`'s volume; returns it and its command line.
fn workload(site: &Site) -> Result<(Guarded, String)> {
    let args = [
        "--name=steady".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={}", site.uri("v")),
        "--rw=randwrite".to_string(),
        "--bs=4k".to_string(),
        format!("--iodepth={WORKLOAD_IODEPTH}"),
        format!("--rate={WORKLOAD_RATE}"),
        "--size=512m".to_string(),
        // Jobs as threads: fio's forked job processes make themselves group leaders and
        // survive a kill of the process fio was started as.
        "--thread".to_string(),
        "--time_based".to_string(),
        // Bounded, so that no workload can outlive the benchmark by long even if killing it fails.
        format!("--runtime={}s", WORKLOAD_RUNTIME.as_secs()),
    ];
    // fio reports every refused write once the role changes; none of that is needed.
    let mut command = Command::new("fio");
    command.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let fio = Guarded::spawn(&mut command, "fio steady workload")?;
    Ok((fio, format!("fio {}", args.join(" "))))
}

/// Poll until a 4 KiB write to `site`'s volume succeeds.
fn wait_writable(site: &Site) -> Result<()> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let out = Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 4k", &site.uri("v")])
            .output()
            .context("run qemu-io")?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the new primary's export did not accept a write: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The median of `values` (NaN when there are none).
pub fn median(values: Vec<f64>) -> f64 {
    crate::stats::Summary::of(&values).map_or(f64::NAN, |s| s.median)
}

/// The median of `values` with their range, "1.23 s (1.01–2.34)" ("-" when there are none).
fn spread(values: Vec<f64>, unit: &str) -> String {
    crate::stats::Summary::of(&values)
        .map_or("-".to_string(), |s| format!("{:.2}{unit} ({:.2}–{:.2})", s.median, s.min, s.max))
}

/// One line per figure.
pub fn summary_lines(report: &Report) -> Vec<String> {
    let verdict = |v: f64, target: f64| if v <= target { "MET" } else { "NOT MET" };
    let mut lines = Vec::new();
    for (label, trials) in &report.links {
        let col = |f: fn(&Trial) -> f64| median(trials.iter().map(f).collect());
        let swap = col(|t| t.swap_seconds);
        let takeover = col(|t| t.takeover_to_write_seconds);
        lines.push(format!(
            "swap ({label}): {swap:.2} s (target <={SWAP_TARGET_SECONDS} s) {}",
            verdict(swap, SWAP_TARGET_SECONDS)
        ));
        lines.push(format!(
            "takeover to writable ({label}): {takeover:.2} s (target <={TAKEOVER_TARGET_SECONDS} s) {}",
            verdict(takeover, TAKEOVER_TARGET_SECONDS)
        ));
        lines.push(format!(
            "failback bytes sent / written since takeover ({label}): {:.2}x (no target stated)",
            col(|t| t.failback_sent_bytes as f64 / t.failback_written_bytes as f64)
        ));
    }
    lines
}

/// The Markdown section (between the roles markers of docs/benchmarks.md).
pub fn markdown(report: &Report, context: &str) -> String {
    let verdict = |v: f64, target: f64| if v <= target { "met" } else { "NOT MET" };
    let mut out = String::new();
    out.push_str("## Role changes\n\n");
    out.push_str(context);
    out.push_str(&format!(
        "\n\nTwo sites, a fresh pair per trial; medians of each link's trials with their range (min–max), the \
         verdicts on the medians. On loopback the sites talk \
         directly; otherwise through two `simnet` relays (one per dialling direction) with the named profile. \
         The workload runs on the primary during the swap and until the primary is killed: `{}`.\n\n",
        report.workload
    ));
    out.push_str("| Link | Trials | Swap: command to answer | Swap: to first write on the new primary | Takeover: command to writable export | Takeover: command to answer | Failback: bytes sent / written since the takeover | Failback: restart to caught up |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for (label, trials) in &report.links {
        let col = |f: fn(&Trial) -> f64| median(trials.iter().map(f).collect());
        let range = |f: fn(&Trial) -> f64, unit: &str| spread(trials.iter().map(f).collect(), unit);
        let swap = col(|t| t.swap_seconds);
        let takeover_write = col(|t| t.takeover_to_write_seconds);
        out.push_str(&format!(
            "| {label} | {} | {} ({}: at most {SWAP_TARGET_SECONDS} s) | {} | {} ({}: at most {TAKEOVER_TARGET_SECONDS} s) | {} | {:.1} MiB / {:.1} MiB ({}) | {} |\n",
            trials.len(),
            range(|t| t.swap_seconds, " s"),
            verdict(swap, SWAP_TARGET_SECONDS),
            range(|t| t.swap_to_write_seconds, " s"),
            range(|t| t.takeover_to_write_seconds, " s"),
            verdict(takeover_write, TAKEOVER_TARGET_SECONDS),
            range(|t| t.takeover_seconds, " s"),
            col(|t| t.failback_sent_bytes as f64) / (1u64 << 20) as f64,
            col(|t| t.failback_written_bytes as f64) / (1u64 << 20) as f64,
            range(|t| t.failback_sent_bytes as f64 / t.failback_written_bytes as f64, "x"),
            range(|t| t.failback_seconds, " s"),
        ));
    }
    out.push_str(
        "\nFailback: after the takeover the new primary writes 64 MiB (`fio --rw=write --bs=1m --size=64m`) \
         plus the 4 KiB probe write, then the killed site is started again; it is fenced, keeps its \
         unreplicated tail as a salvage image and receives the new primary's history since the fork. \
         Bytes sent are the new primary's `bytes_sent_total` (uncompressed) from the restart until \
         `lag_records` is 0; a ratio near 1 means only what changed since the fork crossed the link \
         (the volume is 1 GiB). Issue 7 states no target for failback bytes.\n\
         \nThe takeover's time is mostly its reachability check: it tries to reach the primary for one second \
         (`REACHABLE_TIMEOUT`) before it concludes the primary is gone; `--force` skips the check. The swap \
         stops writes, waits for the partner to acknowledge the last record and trades roles in one round trip \
         each way, so it grows with the link's RTT and with the unacknowledged backlog; over `wan` (50 ms RTT) \
         that is a few round trips.\n",
    );
    out
}
