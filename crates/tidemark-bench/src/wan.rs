//! Replication over a simulated WAN (simnet, one profile at a time): goodput while catching up a
//! backlog of incompressible and of 3:1-compressible data, as a fraction of the link's rate, and
//! rpo_seconds while a host writes at a share of the link's rate. (The cost of protection on
//! host I/O is measured with the host I/O jobs, in `host_io.rs`.)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::children::Guarded;
use crate::pair::{wait_streaming, Pair, CATCH_UP};
use crate::stats::Summary;
use crate::targets::Site;

/// Issue 3's targets on the `wan` profile.
pub const GOODPUT_TARGET_FRACTION: f64 = 0.9;
/// Effective throughput of 3:1-compressible data, as a multiple of the link rate.
pub const COMPRESSIBLE_TARGET_MULTIPLE: f64 = 2.0;
/// rpo_seconds p99 at half the link's rate.
pub const RPO_P99_TARGET_SECONDS: f64 = 1.0;
/// How often rpo_seconds is sampled.
const RPO_SAMPLE_INTERVAL: Duration = Duration::from_millis(200);

/// How the WAN benchmark runs.
pub struct Config {
    /// simnet profiles to measure.
    pub profiles: Vec<String>,
    /// Seconds of link time each backlog takes at the link's rate.
    pub backlog_link_seconds: u64,
    /// Seconds of steady load per rpo measurement.
    pub load_seconds: u64,
    /// Trials per profile, each on a new pair of sites.
    pub runs: usize,
}

/// The link loads (percent of its rate) rpo_seconds is measured at.
const RPO_LOADS: [u32; 2] = [50, 90];

/// One trial's figures on one profile.
#[derive(Clone, Debug)]
pub struct Trial {
    /// Incompressible backlog: journal bytes caught up per second over the link rate.
    pub goodput_fraction: f64,
    /// 3:1 backlog: uncompressed bytes replicated per second over the link rate.
    pub compressible_multiple: f64,
    /// The compression ratio zstd achieved on the 3:1 data.
    pub compressible_ratio: f64,
    /// rpo_seconds p50 and p99 at each of [`RPO_LOADS`], in that order.
    pub rpo: Vec<(f64, f64)>,
}

/// One profile's trials.
#[derive(Clone, Debug)]
pub struct ProfileReport {
    /// Profile name.
    pub profile: String,
    /// The link's rate, bits per second.
    pub rate_bits: u64,
    /// One per run.
    pub trials: Vec<Trial>,
}

impl ProfileReport {
    fn summary(&self, figure: impl Fn(&Trial) -> Option<f64>) -> Option<Summary> {
        Summary::of(&self.trials.iter().filter_map(figure).collect::<Vec<_>>())
    }

    /// Goodput over the trials.
    pub fn goodput(&self) -> Option<Summary> {
        self.summary(|t| Some(t.goodput_fraction))
    }

    /// Effective throughput of 3:1 data over the trials.
    pub fn compressible(&self) -> Option<Summary> {
        self.summary(|t| Some(t.compressible_multiple))
    }

    /// zstd's ratio on the 3:1 data over the trials.
    pub fn ratio(&self) -> Option<Summary> {
        self.summary(|t| Some(t.compressible_ratio))
    }

    /// rpo_seconds (p50, p99) at `load` percent over the trials.
    pub fn rpo(&self, load: u32) -> Option<(Summary, Summary)> {
        let i = RPO_LOADS.iter().position(|l| *l == load)?;
        Some((self.summary(|t| t.rpo.get(i).map(|r| r.0))?, self.summary(|t| t.rpo.get(i).map(|r| r.1))?))
    }
}

/// Everything the WAN benchmark measured.
#[derive(Clone, Debug)]
pub struct Report {
    /// Per profile.
    pub profiles: Vec<ProfileReport>,
}

impl Report {
    /// One line per figure (the targets apply to the `wan` profile).
    pub fn summary_lines(&self) -> Vec<String> {
        let verdict = |ok: bool| if ok { "MET" } else { "NOT MET" };
        let mut lines = Vec::new();
        for p in &self.profiles {
            let target = p.profile == "wan";
            let (Some(goodput), Some(compressible)) = (p.goodput(), p.compressible()) else { continue };
            lines.push(format!(
                "goodput ({}): {:.2} of the link {}",
                p.profile,
                goodput.median,
                if target {
                    format!(
                        "(target >={GOODPUT_TARGET_FRACTION}) {}",
                        verdict(goodput.median >= GOODPUT_TARGET_FRACTION)
                    )
                } else {
                    "(no target on this profile)".to_string()
                }
            ));
            lines.push(format!(
                "3:1 data effective ({}): {:.2}x the link {}",
                p.profile,
                compressible.median,
                if target {
                    format!(
                        "(target >={COMPRESSIBLE_TARGET_MULTIPLE}x) {}",
                        verdict(compressible.median >= COMPRESSIBLE_TARGET_MULTIPLE)
                    )
                } else {
                    "(no target on this profile)".to_string()
                }
            ));
            for load in RPO_LOADS {
                let Some((_, p99)) = p.rpo(load) else { continue };
                let p99 = p99.median;
                let rated = target && load == 50;
                lines.push(format!(
                    "rpo p99 at {load}% load ({}): {p99:.2} s {}",
                    p.profile,
                    if rated {
                        format!(
                            "(target <={RPO_P99_TARGET_SECONDS} s) {}",
                            verdict(p99 <= RPO_P99_TARGET_SECONDS)
                        )
                    } else {
                        "(no target)".to_string()
                    }
                ));
            }
        }
        lines
    }
}

/// Run every profile.
pub fn run(config: &Config, binary: &Path, simnet: &Path, scratch: &Path) -> Result<Report> {
    let mut profiles = Vec::new();
    for name in &config.profiles {
        let profile =
            simnet::Profile::load(name).map_err(|e| anyhow::anyhow!("simnet profile {name}: {e}"))?;
        let rate_bits =
            profile.settings.a_to_b.rate.map(|r| r.bits_per_second()).context("the profile has no rate")?;
        let mut trials = Vec::new();
        for run in 1..=config.runs {
            let dir = scratch.join(format!("wan-{name}-{run}"));
            std::fs::create_dir_all(&dir)?;
            let trial = measure_profile(config, binary, simnet, name, rate_bits, &dir)
                .with_context(|| format!("WAN benchmark on profile {name}, run {run}"))?;
            eprintln!(
                "wan {name} run {run}/{}: goodput {:.2} of the link (incompressible), {:.2}x the link (3:1 data, ratio {:.2}), rpo {}",
                config.runs,
                trial.goodput_fraction,
                trial.compressible_multiple,
                trial.compressible_ratio,
                RPO_LOADS
                    .iter()
                    .zip(&trial.rpo)
                    .map(|(l, (p50, p99))| format!("{l}%: p50 {p50:.2}s p99 {p99:.2}s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            trials.push(trial);
            std::fs::remove_dir_all(&dir).ok();
        }
        profiles.push(ProfileReport { profile: name.clone(), rate_bits, trials });
    }
    Ok(Report { profiles })
}

fn measure_profile(
    config: &Config,
    binary: &Path,
    simnet: &Path,
    profile: &str,
    rate_bits: u64,
    dir: &Path,
) -> Result<Trial> {
    let pair = Pair::start(binary, Some((simnet, profile)), dir)?;
    let a = &pair.a;
    let backlog = (rate_bits / 8 * config.backlog_link_seconds).max(16 << 20) / (1 << 20) * (1 << 20);
    a.create_volume("g", "16GiB", "v", &format!("{}", 8u64 << 30))?;
    a.cli(&["group", "protect", "g", "--partner", "b"])?;
    wait_streaming(a)?;

    let of_link = |bytes: u64, seconds: f64| bytes as f64 * 8.0 / seconds / rate_bits as f64;
    let c = catch_up(a, backlog, 0, Compression::None)?;
    // Goodput counts the backlog once: a batch sent again after a reconnect is not progress.
    let goodput_fraction = of_link(c.backlog_bytes, c.seconds);
    eprintln!(
        "  incompressible backlog: {} bytes of journal, {} sent ({} after zstd) in {:.1}s",
        c.backlog_bytes, c.raw_sent, c.wire_sent, c.seconds
    );
    let c3 = catch_up(a, backlog, backlog, Compression::ThreeToOne)?;
    let compressible_multiple = of_link(c3.backlog_bytes, c3.seconds);
    let compressible_ratio = c3.raw_sent as f64 / c3.wire_sent.max(1) as f64;
    eprintln!(
        "  3:1 backlog: {} bytes of journal, {} sent ({} after zstd) in {:.1}s",
        c3.backlog_bytes, c3.raw_sent, c3.wire_sent, c3.seconds
    );
    let mut rpo = Vec::new();
    for load_percent in RPO_LOADS {
        let bytes_per_second = rate_bits / 8 * u64::from(load_percent) / 100;
        rpo.push(rpo_under_load(a, bytes_per_second, config.load_seconds, 2 * backlog)?);
    }
    Ok(Trial { goodput_fraction, compressible_multiple, compressible_ratio, rpo })
}

/// What fio writes.
#[derive(Clone, Copy)]
enum Compression {
    /// Fresh random bytes in every buffer.
    None,
    /// Buffers zstd compresses about 3:1.
    ThreeToOne,
}

fn fio_data_args(compression: Compression) -> Vec<String> {
    match compression {
        Compression::None => vec!["--refill_buffers".into(), "--buffer_compress_percentage=0".into()],
        // fio fills two thirds of each 4 KiB chunk with a repeated pattern and the rest randomly.
        Compression::ThreeToOne => vec![
            "--refill_buffers".into(),
            "--buffer_compress_percentage=67".into(),
            "--buffer_compress_chunk=4k".into(),
        ],
    }
}

/// One catch-up.
struct CatchUp {
    /// Journal bytes waiting when replication resumed (`lag_bytes`).
    backlog_bytes: u64,
    /// Uncompressed bytes sent while catching up (more than the backlog if batches were resent).
    raw_sent: u64,
    /// The same after zstd.
    wire_sent: u64,
    /// From resuming until nothing was left to send.
    seconds: f64,
}

/// Pause replication, write `bytes` at `offset` with `compression`, resume, and time the
/// catch-up.
fn catch_up(a: &Site, bytes: u64, offset: u64, compression: Compression) -> Result<CatchUp> {
    a.cli(&["group", "pause", "g"])?;
    let mut args = vec![
        "--name=backlog".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={}", a.uri("v")),
        "--rw=write".to_string(),
        "--bs=1m".to_string(),
        "--iodepth=8".to_string(),
        format!("--offset={offset}"),
        format!("--size={bytes}"),
        "--thread".to_string(),
    ];
    args.extend(fio_data_args(compression));
    let status = Command::new("fio").args(&args).stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    if !status.success() {
        bail!("fio backlog write failed ({status})");
    }
    let before = sent(a)?;
    let backlog_bytes = a.group("g")?["replication"]["lag_bytes"].as_u64().context("lag_bytes")?;
    a.cli(&["group", "resume", "g"])?;
    let start = Instant::now();
    wait_streaming(a)?;
    let seconds = start.elapsed().as_secs_f64();
    let after = sent(a)?;
    Ok(CatchUp { backlog_bytes, raw_sent: after.0 - before.0, wire_sent: after.1 - before.1, seconds })
}

/// (raw, compressed) bytes sent so far.
fn sent(a: &Site) -> Result<(u64, u64)> {
    let r = &a.group("g")?["replication"];
    Ok((
        r["bytes_sent_total"].as_u64().context("bytes_sent_total")?,
        r["bytes_sent_compressed_total"].as_u64().context("bytes_sent_compressed_total")?,
    ))
}

/// Write incompressible data at `bytes_per_second` for `seconds` and sample rpo_seconds;
/// returns its p50 and p99 after the first two seconds.
fn rpo_under_load(a: &Site, bytes_per_second: u64, seconds: u64, offset: u64) -> Result<(f64, f64)> {
    wait_streaming(a)?;
    let mut args = vec![
        "--name=load".to_string(),
        "--ioengine=nbd".to_string(),
        format!("--uri={}", a.uri("v")),
        "--rw=write".to_string(),
        "--bs=64k".to_string(),
        "--iodepth=4".to_string(),
        format!("--rate={bytes_per_second}"),
        format!("--offset={offset}"),
        "--size=4g".to_string(),
        "--time_based".to_string(),
        format!("--runtime={seconds}s"),
        "--thread".to_string(),
    ];
    args.extend(fio_data_args(Compression::None));
    let mut command = Command::new("fio");
    command.args(&args).stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut fio = Guarded::spawn(&mut command, "fio steady load")?;
    let start = Instant::now();
    let mut samples = Vec::new();
    while fio.try_wait()?.is_none() {
        if start.elapsed() > Duration::from_secs(seconds) + CATCH_UP {
            let _ = fio.kill();
            bail!("the load did not end");
        }
        if start.elapsed() > Duration::from_secs(2) {
            if let Some(rpo) = a.group("g")?["replication"]["rpo_seconds"].as_f64() {
                samples.push(rpo);
            }
        }
        std::thread::sleep(RPO_SAMPLE_INTERVAL);
    }
    if samples.len() < 10 {
        bail!("only {} rpo samples", samples.len());
    }
    samples.sort_by(f64::total_cmp);
    let at =
        |q: f64| samples.get(((samples.len() - 1) as f64 * q).round() as usize).copied().unwrap_or(f64::NAN);
    Ok((at(0.5), at(0.99)))
}

/// The Markdown section (between the WAN markers of docs/benchmarks.md).
pub fn markdown(report: &Report, context: &str, config: &Config) -> String {
    let met = |ok: bool| if ok { "met" } else { "NOT MET" };
    let mut out = String::new();
    out.push_str("## Replication over a simulated WAN\n\n");
    out.push_str(context);
    out.push_str(&format!(
        "\n\nTwo sites on this machine joined by two `simnet` relays with the named profile; {} trials per \
         profile, each on a new pair of sites, each figure the median of the trials with their range in \
         brackets (min–max), and the verdicts on the medians. **Goodput**: \
         replication is paused, a backlog of {} s of link time is written with fio (1 MiB sequential writes; \
         incompressible, or fio's `--buffer_compress_percentage=67`), replication resumes, and the catch-up is timed \
         from the resume command until `lag_records` is 0 (ramp-up included): the journal bytes that were waiting \
         (`lag_bytes`, each counted once however often it was sent) per second, over the link's rate. **RPO**: fio writes incompressible \
         64 KiB blocks at 50% and 90% of the link's rate for {} s while `rpo_seconds` is sampled every {} ms (the \
         first 2 s left out). The link rate counts UDP payload, so QUIC's headers and acknowledgements come out of it.\n\n",
        config.runs,
        config.backlog_link_seconds,
        config.load_seconds,
        RPO_SAMPLE_INTERVAL.as_millis()
    ));
    out.push_str("| Profile | Link | Goodput, incompressible | 3:1 data, effective | rpo p50 / p99 at 50% load | rpo p50 / p99 at 90% load |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    let spread = |s: Summary, unit: &str| format!("{:.2}{unit} ({:.2}–{:.2})", s.median, s.min, s.max);
    for p in &report.profiles {
        let target = p.profile == "wan";
        let (Some(goodput), Some(compressible), Some(ratio)) = (p.goodput(), p.compressible(), p.ratio())
        else {
            continue;
        };
        let rpo = |load: u32| {
            p.rpo(load).map_or("-".to_string(), |(p50, p99)| {
                let verdict = if target && load == 50 {
                    format!(
                        " ({}: p99 at most {RPO_P99_TARGET_SECONDS} s)",
                        met(p99.median <= RPO_P99_TARGET_SECONDS)
                    )
                } else {
                    String::new()
                };
                format!("{} / {}{verdict}", spread(p50, " s"), spread(p99, " s"))
            })
        };
        out.push_str(&format!(
            "| {} | {} Mbit/s | {} of the link{} | {} the link (zstd ratio {:.2}){} | {} | {} |\n",
            p.profile,
            p.rate_bits / 1_000_000,
            spread(goodput, ""),
            if target {
                format!(
                    " ({}: at least {GOODPUT_TARGET_FRACTION})",
                    met(goodput.median >= GOODPUT_TARGET_FRACTION)
                )
            } else {
                String::new()
            },
            spread(compressible, "x"),
            ratio.median,
            if target {
                format!(
                    " ({}: at least {COMPRESSIBLE_TARGET_MULTIPLE}x)",
                    met(compressible.median >= COMPRESSIBLE_TARGET_MULTIPLE)
                )
            } else {
                String::new()
            },
            rpo(50),
            rpo(90),
        ));
    }
    out.push_str(
        "\nThe cost of protection on host I/O (every host-I/O job on a protected group against an \
         unprotected one) is in the host I/O section.\n",
    );
    out
}
