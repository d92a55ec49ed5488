//! What the benchmark reads from /proc and the system: a process's memory and CPU time, the
//! machine's facts for the report, free disk space, and dropping the page cache.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Bytes in a kB as /proc/PID/status counts them.
const KIB_BYTES: u64 = 1024;
/// Where the kernel takes a request to drop clean caches.
const DROP_CACHES_PATH: &str = "/proc/sys/vm/drop_caches";

/// A process's memory as /proc/PID/status shows it, in bytes.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// `VmRSS`: resident memory, anonymous plus file-backed plus shared.
    pub rss_bytes: u64,
    /// `RssAnon`: resident anonymous memory (the heap, stacks), without the mapped binary.
    pub rss_anon_bytes: u64,
}

/// Read a process's resident memory.
pub fn memory(pid: u32) -> Result<Memory> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    let field = |name: &str| -> Result<u64> {
        let line = status
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':')))
            .with_context(|| format!("{path} has no {name} line"))?;
        let kib: u64 = line
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .with_context(|| format!("parse {name} in {path}: {line:?}"))?;
        Ok(kib * KIB_BYTES)
    };
    Ok(Memory { rss_bytes: field("VmRSS")?, rss_anon_bytes: field("RssAnon")? })
}

/// CPU time a process has used so far (user plus system), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    // The command name (field 2) may hold spaces and parentheses; fields after the last ')'
    // start with field 3 (state), so utime (field 14) and stime (field 15) are the 12th and 13th.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).with_context(|| format!("parse {path}"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .with_context(|| format!("{path} has too few fields"))?
            .parse::<u64>()
            .with_context(|| format!("parse field {} of {path}", i + 3))
    };
    let total = ticks(11)? + ticks(12)?;
    Ok(total as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// CPU time the whole machine has spent busy so far (all CPUs, everything but idle and
/// iowait), in seconds.
pub fn machine_busy_seconds() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    let line = stat.lines().find(|l| l.starts_with("cpu ")).context("/proc/stat has no cpu line")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|v| v.parse::<u64>().with_context(|| format!("parse /proc/stat cpu line {line:?}")))
        .collect::<Result<_>>()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice, already in user/nice].
    let busy: u64 =
        ticks.iter().take(8).enumerate().filter(|&(i, _)| i != 3 && i != 4).map(|(_, &t)| t).sum();
    Ok(busy as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// Bytes free for an unprivileged user on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> Result<u64> {
    let stat = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

/// Write back dirty pages, so one measurement does not pay for the previous one's writes.
pub fn sync() {
    rustix::fs::sync();
}

/// Write back dirty pages and drop clean ones from the page cache; `Ok(false)` when this
/// machine does not allow it (not root, or /proc/sys read-only).
pub fn drop_caches() -> Result<bool> {
    sync();
    match std::fs::write(DROP_CACHES_PATH, "3\n") {
        Ok(()) => Ok(true),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem
            ) =>
        {
            Ok(false)
        }
        Err(e) => Err(e).with_context(|| format!("write {DROP_CACHES_PATH}")),
    }
}

/// Facts about the machine a report was measured on.
#[derive(Clone, Debug)]
pub struct Machine {
    /// CPUs this process may use.
    pub cpus: usize,
    /// CPU model name from /proc/cpuinfo.
    pub cpu_model: String,
    /// `MemTotal`, in bytes.
    pub memory_bytes: u64,
    /// `uname -r`.
    pub kernel: String,
    /// The `df -T` line of the filesystem holding the scratch directory.
    pub filesystem: String,
    /// `fio --version`.
    pub fio: String,
    /// First line of `qemu-nbd --version`.
    pub qemu_nbd: String,
    /// First line of `nbdkit --version`.
    pub nbdkit: String,
}

/// Gather the machine's facts; `scratch` is the directory both targets keep their data in.
pub fn machine(scratch: &Path) -> Result<Machine> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").context("read /proc/cpuinfo")?;
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim()))
        .unwrap_or("unknown")
        .to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").context("read /proc/meminfo")?;
    let memory_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("parse MemTotal in /proc/meminfo")?;
    let kernel = first_line(Command::new("uname").arg("-r"))?;
    let df = output(Command::new("df").arg("-T").arg(scratch))?;
    let filesystem =
        df.lines().nth(1).map(|l| l.split_whitespace().collect::<Vec<_>>().join(" ")).unwrap_or_default();
    Ok(Machine {
        cpus,
        cpu_model,
        memory_bytes: memory_kib * KIB_BYTES,
        kernel,
        filesystem,
        fio: first_line(Command::new("fio").arg("--version"))?,
        qemu_nbd: first_line(Command::new("qemu-nbd").arg("--version"))?,
        nbdkit: first_line(Command::new("nbdkit").arg("--version"))?,
    })
}

fn output(command: &mut Command) -> Result<String> {
    let out = command.output().with_context(|| format!("run {command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn first_line(command: &mut Command) -> Result<String> {
    Ok(output(command)?.lines().next().unwrap_or_default().trim().to_string())
}
