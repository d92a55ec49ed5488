//! fio jobs over its nbd engine: one job description gives the exact command line (the same
//! for every target but the URI), runs it, and reads its JSON result.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::children::Guarded;

/// A job that has not finished this long after it should have is stuck, in seconds.
const DEADLINE_SLACK_SECONDS: u64 = 120;
/// The slowest rate at which a size-based job is still deemed to make progress, in bytes per
/// second; used only to bound the wait for it.
const RATE_FLOOR_BYTES_PER_SECOND: u64 = 10 << 20;
/// Bytes in a KiB, MiB, GiB (fio's size suffixes are binary by default).
const KIB_BYTES: u64 = 1 << 10;
const MIB_BYTES: u64 = 1 << 20;
const GIB_BYTES: u64 = 1 << 30;

/// What a job does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Sequential writes.
    SeqWrite,
    /// Random writes; with fio's random map each block is written once per pass.
    RandWrite,
    /// Random reads.
    RandRead,
    /// Random reads and writes mixed, this percentage of them reads (fio's `rwmixread`).
    RandRw(u32),
}

impl Pattern {
    fn rw(self) -> &'static str {
        match self {
            Pattern::SeqWrite => "write",
            Pattern::RandWrite => "randwrite",
            Pattern::RandRead => "randread",
            Pattern::RandRw(_) => "randrw",
        }
    }

    /// The directions of fio's JSON whose figures the job's result adds up.
    fn directions(self) -> &'static [&'static str] {
        match self {
            Pattern::SeqWrite | Pattern::RandWrite => &["write"],
            Pattern::RandRead => &["read"],
            Pattern::RandRw(_) => &["read", "write"],
        }
    }

    /// Whether the job writes.
    pub fn writes(self) -> bool {
        !matches!(self, Pattern::RandRead)
    }
}

/// One fio job over NBD.
#[derive(Clone, Debug)]
pub struct Job {
    /// Job name (also names its output files).
    pub name: String,
    /// Access pattern.
    pub pattern: Pattern,
    /// Request size, in bytes.
    pub block_bytes: u64,
    /// Requests in flight.
    pub iodepth: u32,
    /// Bytes of the export the job touches, from `offset_bytes`.
    pub region_bytes: u64,
    /// Where the region starts, in bytes.
    pub offset_bytes: u64,
    /// Run for this long, going over the region as often as it takes; `None` = once over it.
    pub runtime_seconds: Option<u64>,
    /// Send a flush (NBD_CMD_FLUSH: fio's nbd engine turns its sync into one) after every this
    /// many writes (fio's `--fsync`); `None` = never.
    pub fsync_every: Option<u32>,
}

/// What a job measured.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    /// Bytes moved.
    pub bytes: u64,
    /// Bandwidth, in bytes per second.
    pub bytes_per_second: f64,
    /// Requests per second.
    pub iops: f64,
    /// How long the I/O ran, in seconds (fio's own runtime).
    pub seconds: f64,
    /// Median completion latency, in microseconds.
    pub clat_p50_us: f64,
    /// 99th percentile completion latency, in microseconds.
    pub clat_p99_us: f64,
}

impl Job {
    /// fio's arguments for this job against `uri`, without the output file.
    pub fn args(&self, uri: &str) -> Vec<String> {
        let mut args = vec![
            format!("--name={}", self.name),
            "--ioengine=nbd".to_string(),
            format!("--uri={uri}"),
            format!("--rw={}", self.pattern.rw()),
            format!("--bs={}", fio_size(self.block_bytes)),
            format!("--iodepth={}", self.iodepth),
            format!("--offset={}", fio_size(self.offset_bytes)),
            format!("--size={}", fio_size(self.region_bytes)),
            "--randrepeat=1".to_string(),
            // Jobs as threads: fio's forked job processes make themselves group leaders and
            // would survive a kill of the process fio was started as.
            "--thread".to_string(),
        ];
        if let Pattern::RandRw(read_percent) = self.pattern {
            args.push(format!("--rwmixread={read_percent}"));
        }
        if let Some(writes) = self.fsync_every {
            args.push(format!("--fsync={writes}"));
        }
        if let Some(seconds) = self.runtime_seconds {
            args.push("--time_based".to_string());
            args.push(format!("--runtime={seconds}s"));
        }
        args.push("--output-format=json".to_string());
        args
    }

    /// The command line, for the report.
    pub fn command_line(&self, uri: &str) -> String {
        format!("fio {}", self.args(uri).join(" "))
    }

    /// Run the job against `uri`; fio's output files go to `scratch`.
    pub fn run(&self, uri: &str, scratch: &Path) -> Result<Outcome> {
        let json_path = scratch.join(format!("fio-{}.json", self.name));
        let log_path = scratch.join(format!("fio-{}.log", self.name));
        let log =
            std::fs::File::create(&log_path).with_context(|| format!("create {}", log_path.display()))?;
        let mut command = Command::new("fio");
        command
            .args(self.args(uri))
            .arg(format!("--output={}", json_path.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicate fio log handle")?)
            .stderr(log);
        let mut fio = Guarded::spawn(&mut command, &format!("fio job {}", self.name))?;
        let status = wait_with_deadline(&mut fio, self.deadline())?;
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if !status.success() {
            bail!("fio job {} against {uri} failed ({status}):\n{}", self.name, log.trim());
        }
        let text =
            std::fs::read_to_string(&json_path).with_context(|| format!("read {}", json_path.display()))?;
        parse(&text, self.pattern.directions())
            .with_context(|| format!("parse fio's result for job {} ({})", self.name, json_path.display()))
    }

    fn deadline(&self) -> Duration {
        let expected = match self.runtime_seconds {
            Some(seconds) => seconds,
            None => self.region_bytes / RATE_FLOOR_BYTES_PER_SECOND,
        };
        Duration::from_secs(expected + DEADLINE_SLACK_SECONDS)
    }
}

/// A size as fio writes it: `4g`, `1m`, `4k` or bytes.
pub fn fio_size(bytes: u64) -> String {
    match bytes {
        0 => "0".to_string(),
        b if b % GIB_BYTES == 0 => format!("{}g", b / GIB_BYTES),
        b if b % MIB_BYTES == 0 => format!("{}m", b / MIB_BYTES),
        b if b % KIB_BYTES == 0 => format!("{}k", b / KIB_BYTES),
        b => b.to_string(),
    }
}

fn wait_with_deadline(child: &mut Guarded, deadline: Duration) -> Result<std::process::ExitStatus> {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if start.elapsed() > deadline {
            child.kill()?;
            bail!("{} did not finish within {deadline:?}; killed it", child.name());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Read the figures of the first job in fio's JSON, added up over `dirs` (`read`, `write`);
/// the latencies are those of the slower direction.
fn parse(text: &str, dirs: &[&str]) -> Result<Outcome> {
    // fio may print notes before the JSON even with --output; start at the first brace.
    let start = text.find('{').context("no JSON object in fio's output")?;
    let json: Value = serde_json::from_str(text.get(start..).unwrap_or_default()).context("invalid JSON")?;
    let job = json.get("jobs").and_then(|j| j.get(0)).context("no jobs in fio's output")?;
    let error = job.get("error").and_then(Value::as_i64).unwrap_or(0);
    if error != 0 {
        bail!("fio reports error {error}");
    }
    let mut total = Outcome {
        bytes: 0,
        bytes_per_second: 0.0,
        iops: 0.0,
        seconds: 0.0,
        clat_p50_us: 0.0,
        clat_p99_us: 0.0,
    };
    for dir in dirs {
        let io = job.get(dir).with_context(|| format!("no {dir} section"))?;
        let number = |v: &Value, key: &str| -> Result<f64> {
            v.get(key).and_then(Value::as_f64).with_context(|| format!("no number {dir}.{key}"))
        };
        let percentile = |p: &str| -> Result<f64> {
            let ns = io
                .get("clat_ns")
                .and_then(|c| c.get("percentile"))
                .and_then(|c| c.get(p))
                .and_then(Value::as_f64)
                .with_context(|| format!("no {dir}.clat_ns.percentile.{p}"))?;
            Ok(ns / 1000.0)
        };
        let bytes = io.get("io_bytes").and_then(Value::as_u64).context("no io_bytes")?;
        if bytes == 0 {
            bail!("the job moved no bytes ({dir})");
        }
        total.bytes += bytes;
        total.bytes_per_second += number(io, "bw_bytes")?;
        total.iops += number(io, "iops")?;
        total.seconds = total.seconds.max(number(io, "runtime")? / 1000.0);
        total.clat_p50_us = total.clat_p50_us.max(percentile("50.000000")?);
        total.clat_p99_us = total.clat_p99_us.max(percentile("99.000000")?);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_fio_suffixes() {
        assert_eq!(fio_size(4 << 30), "4g");
        assert_eq!(fio_size(1 << 20), "1m");
        assert_eq!(fio_size(4096), "4k");
        assert_eq!(fio_size(512 + (1 << 20)), "1049088");
        assert_eq!(fio_size(0), "0");
    }

    #[test]
    fn reads_fio_json_after_a_note() {
        let text = r#"fio: connected to NBD server
{"jobs": [{"error": 0, "write": {"io_bytes": 8192, "bw_bytes": 4096.0, "iops": 1.0, "runtime": 2000,
 "clat_ns": {"percentile": {"50.000000": 1500, "99.000000": 9000}}}}]}"#;
        let out = parse(text, &["write"]).expect("parse");
        assert_eq!(out.bytes, 8192);
        assert_eq!(out.seconds, 2.0);
        assert_eq!(out.clat_p50_us, 1.5);
        assert_eq!(out.clat_p99_us, 9.0);
        assert!(parse(text, &["read"]).is_err());
        assert!(parse(text, &["read", "write"]).is_err());
    }
}
