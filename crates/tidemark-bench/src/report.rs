//! The results as one summary line per figure and as the Markdown report (docs/benchmarks.md).
//!
//! The report is generated whole from a run, except for the hand-written analysis between
//! [`ANALYSIS_BEGIN`] and [`ANALYSIS_END`], which is carried over from the previous file so
//! that regenerating the numbers does not erase it.

use std::fmt::Write as _;

use crate::fio::fio_size;
use crate::host_io::{self, Target, Unit};
use crate::memory;
use crate::startup::{self, Case};
use crate::stats::Summary;
use crate::targets::{self, Nbdkit, QemuNbd};
use crate::Results;

/// Marks the start of the hand-written analysis kept across regenerations.
pub const ANALYSIS_BEGIN: &str =
    "<!-- analysis:begin (hand-written; kept when the report is regenerated) -->";
/// Marks its end.
pub const ANALYSIS_END: &str = "<!-- analysis:end -->";
/// Upper bound on index memory per journaled block, in bytes.
pub const INDEX_BYTES_PER_BLOCK_TARGET: f64 = 32.0;
const GIB_BYTES: f64 = (1u64 << 30) as f64;

/// One line per figure: `name: value (target X) MET|NOT MET`.
pub fn summary_lines(results: &Results) -> Vec<String> {
    let mut lines = Vec::new();
    for (figure, what, r, target) in results.host_io.ratios() {
        let line = match r {
            Some(r) => {
                format!("{}, {what}: {r:.2}x (target >={target}x) {}", figure.name, verdict(r >= target))
            }
            None => format!("{}, {what}: no samples", figure.name),
        };
        lines.push(line);
    }
    let m = &results.memory;
    lines.push(format!(
        "index memory per journaled block (the index's allocation): {:.1} bytes (target <={INDEX_BYTES_PER_BLOCK_TARGET}) {}",
        m.index_bytes_per_version(0),
        verdict(m.index_bytes_per_version(0) <= INDEX_BYTES_PER_BLOCK_TARGET)
    ));
    lines.push(format!(
        "site resident memory growth per block, written once (VmRSS): {:.1} bytes (upper bound, no target)",
        m.rss_per_block_once(),
    ));
    lines.push(format!(
        "index memory per block, written twice (VmRSS): {:.1} bytes (no target)",
        m.rss_per_block_twice()
    ));
    lines.push(format!(
        "index memory per block, written twice, after a restart (VmRSS): {:.1} bytes (no target)",
        m.rss_per_block_restarted()
    ));
    let s = &results.startup;
    for t in &s.timings {
        if let Some(sum) = Summary::of(&t.seconds) {
            lines.push(format!(
                "start-up with {} journal, {}, {} cache: {:.2} s (no target)",
                gib(s.journal_bytes),
                t.case.label(),
                if t.cold { "cold" } else { "warm" },
                sum.median
            ));
        }
    }
    lines
}

/// The whole report; `previous` is the file it replaces (for the hand-written analysis).
pub fn markdown(results: &Results, previous: Option<&str>) -> String {
    let mut out = String::new();
    header(&mut out, results);
    host_io_section(&mut out, &results.host_io);
    memory_section(&mut out, &results.memory);
    startup_section(&mut out, &results.startup);
    out.push_str("## Analysis\n\n");
    out.push_str(ANALYSIS_BEGIN);
    out.push('\n');
    match previous.and_then(analysis) {
        Some(text) => out.push_str(text),
        None => out.push_str("\nNo analysis has been written for these numbers yet.\n\n"),
    }
    out.push_str(ANALYSIS_END);
    out.push('\n');
    // Sections other benchmark sets wrote after the analysis are carried over.
    if let Some(rest) = previous.and_then(|p| p.find(ANALYSIS_END).map(|i| &p[i + ANALYSIS_END.len()..])) {
        out.push_str(rest.strip_prefix('\n').unwrap_or(rest));
    }
    out
}

/// Markers of the role-change section (`tidemark-bench roles`).
pub const ROLES_BEGIN: &str = "<!-- roles:begin (written by `tidemark-bench roles`) -->";
/// End marker of the role-change section.
pub const ROLES_END: &str = "<!-- roles:end -->";
/// Markers of the recovery section (`tidemark-bench recovery`).
pub const RECOVERY_BEGIN: &str = "<!-- recovery:begin (written by `tidemark-bench recovery`) -->";
/// End marker of the recovery section.
pub const RECOVERY_END: &str = "<!-- recovery:end -->";
/// Markers of the resources section (`tidemark-bench resources`).
pub const RESOURCES_BEGIN: &str = "<!-- resources:begin (written by `tidemark-bench resources`) -->";
/// End marker of the resources section.
pub const RESOURCES_END: &str = "<!-- resources:end -->";
/// Markers of the WAN section (`tidemark-bench wan`).
pub const WAN_BEGIN: &str = "<!-- wan:begin (written by `tidemark-bench wan`) -->";
/// End marker of the WAN section.
pub const WAN_END: &str = "<!-- wan:end -->";

/// `previous` with the text between `begin` and `end` replaced by `section` (appended, with the
/// markers, when they are absent).
pub fn replace_section(previous: &str, begin: &str, end: &str, section: &str) -> String {
    let body = format!("{begin}\n{section}{end}\n");
    if let (Some(start), Some(stop)) = (previous.find(begin), previous.find(end)) {
        if stop > start {
            return format!(
                "{}{body}{}",
                &previous[..start],
                previous[stop + end.len()..].trim_start_matches('\n')
            );
        }
    }
    let mut out = previous.to_string();
    if !out.is_empty() && !out.ends_with("\n\n") {
        out.push('\n');
    }
    out.push_str(&body);
    out
}

fn header(out: &mut String, r: &Results) {
    let m = &r.machine;
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Generated by `{}` on {} (its host-I/O set took {:.0} minutes). Everything from the machine table to \
         the analysis is the output of that run on that machine; the hand-written analysis follows, \
         and after it the sections of the other sets (roles, wan, recovery, resources), each saying \
         which run wrote it. The program measures and reports; nothing here is asserted by a test.\n",
        r.command,
        humantime::format_rfc3339_seconds(r.started),
        r.seconds / 60.0
    );
    if let Some(note) = &r.note {
        let _ = writeln!(out, "{note}\n");
    }
    if r.quick {
        let _ = writeln!(
            out,
            "**This is a `--quick` run**: shorter jobs, a smaller region, a smaller journal and fewer \
             blocks in the memory test, one run each. Use a full run for numbers to quote.\n"
        );
    }
    let _ = writeln!(out, "## Machine\n");
    let _ = writeln!(out, "| | |\n|---|---|");
    let _ = writeln!(out, "| CPUs (`nproc`) | {} ({}) |", m.cpus, m.cpu_model);
    let _ = writeln!(out, "| memory (`MemTotal`) | {:.1} GiB |", m.memory_bytes as f64 / GIB_BYTES);
    let _ = writeln!(out, "| kernel (`uname -r`) | {} |", m.kernel);
    let _ = writeln!(out, "| data filesystem (`df -T`) | `{}` |", m.filesystem);
    let _ = writeln!(out, "| fio | {} |", m.fio);
    let _ = writeln!(out, "| qemu-nbd | {} |", m.qemu_nbd);
    let _ = writeln!(out, "| nbdkit | {} |", m.nbdkit);
    let _ = writeln!(out, "| Tidemark source | {} |", r.source);
    let _ = writeln!(out, "| load average at start (`/proc/loadavg`) | {} |", r.load_average);
    let _ = writeln!(
        out,
        "\nEvery target keeps its data in a scratch directory under `/tmp` on that filesystem; the \
         fio client, the servers and anything else running share the same CPUs.\n"
    );
}

fn host_io_section(out: &mut String, h: &host_io::Report) {
    let c = &h.config;
    let _ = writeln!(out, "## Host I/O: Tidemark against qemu-nbd and nbdkit, and the cost of protection\n");
    let _ = writeln!(
        out,
        "{} runs per target, taking the four targets in turn (Tidemark, Tidemark protected, qemu-nbd, \
         nbdkit, Tidemark, ...). Each run starts a new target: a new site with one group (default \
         retention, journal limit {}) and one {} volume; the same as a pair of sites on loopback whose \
         group replicates to the second site (`group protect`; both sites share this machine's disk and \
         CPUs, so the partner's own work is part of the cost measured here, which a partner on another \
         machine would not add); or a new sparse {} raw file served by qemu-nbd or by nbdkit's file \
         plugin (its defaults: buffered I/O through the page cache, 16 threads). The first {} of the \
         export is filled once with 1 MiB sequential writes so that every read finds written data, \
         then the jobs below run in order, {} s each, over that region. The page cache is written back \
         (`sync`) before every job, and the protected group's partner has caught up (`lag_records` 0); \
         the cold row drops the page cache first (`echo 3 > /proc/sys/vm/drop_caches`).\n",
        c.runs,
        h.journal_max,
        targets::size_arg(c.volume_bytes),
        targets::size_arg(c.volume_bytes),
        targets::size_arg(c.region_bytes),
        c.job_seconds
    );
    let _ = writeln!(
        out,
        "Commands (PORT is a free loopback port; the fio jobs are identical for every target):\n"
    );
    let _ = writeln!(out, "```sh");
    let _ = writeln!(
        out,
        "tidemark serve --data-dir DIR --nbd-listen 127.0.0.1:PORT --api-listen 127.0.0.1:PORT --repl-listen 127.0.0.1:PORT --metrics-listen 127.0.0.1:PORT"
    );
    let _ = writeln!(
        out,
        "tidemark --api http://127.0.0.1:PORT --data-dir DIR group create {} --journal-max {}",
        host_io::GROUP,
        h.journal_max
    );
    let _ = writeln!(
        out,
        "tidemark --api http://127.0.0.1:PORT --data-dir DIR volume create {} --size {} --group {}",
        host_io::EXPORT,
        targets::size_arg(c.volume_bytes),
        host_io::GROUP
    );
    let _ = writeln!(
        out,
        "# protected: a second site B, `partner add` both ways with each other's fingerprint, then\n\
         tidemark --api http://127.0.0.1:PORT --data-dir DIR group protect {} --partner b",
        host_io::GROUP
    );
    let _ = writeln!(out, "qemu-img create -f raw disk.raw {}", c.volume_bytes);
    let _ = writeln!(out, "{}", QemuNbd::command_line("disk.raw", host_io::EXPORT));
    let _ = writeln!(out, "{}", Nbdkit::command_line("disk.raw"));
    let uri = format!("nbd://127.0.0.1:PORT/{}", host_io::EXPORT);
    let _ = writeln!(out, "{}", h.fill.command_line(&uri));
    for f in &h.figures {
        let _ = writeln!(out, "{}", f.job.command_line(&uri));
    }
    let _ = writeln!(out, "```\n");

    let _ = writeln!(out, "Medians, with the spread (min–max) of the runs:\n");
    let _ = writeln!(out, "| figure | Tidemark | Tidemark protected | qemu-nbd | nbdkit |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for f in &h.figures {
        let unit = f.unit.label();
        let cell = |t: Target| {
            f.samples.get(t.index()).and_then(|s| Summary::of(&s.value)).map_or("–".to_string(), |s| {
                format!(
                    "{} {unit} ({}–{})",
                    value(f.unit, s.median),
                    value(f.unit, s.min),
                    value(f.unit, s.max)
                )
            })
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            f.name,
            cell(Target::Tidemark),
            cell(Target::TidemarkProtected),
            cell(Target::QemuNbd),
            cell(Target::Nbdkit)
        );
    }
    let _ = writeln!(
        out,
        "\nRatios of the medians, each against its target (Tidemark against the two baselines; the \
         protected group against the unprotected one, the cost of protection):\n"
    );
    let _ = writeln!(out, "| figure | Tidemark / qemu-nbd | Tidemark / nbdkit | protected / unprotected |");
    let _ = writeln!(out, "|---|---|---|---|");
    for f in &h.figures {
        let cell = |r: Option<f64>, target: f64| match r {
            Some(r) => format!("{r:.2}x (≥{target}x: {})", verdict(r >= target)),
            None => "no samples".to_string(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            f.name,
            cell(f.ratio(Target::Tidemark, Target::QemuNbd), f.target_ratio),
            cell(f.ratio(Target::Tidemark, Target::Nbdkit), f.target_ratio),
            cell(f.ratio(Target::TidemarkProtected, Target::Tidemark), host_io::PROTECTION_TARGET_RATIO)
        );
    }
    // Evidence that fio's --fsync reached the server as NBD flushes.
    for f in h.figures.iter().filter(|f| f.job.fsync_every.is_some()) {
        let counts: Vec<(f64, f64)> = [Target::Tidemark, Target::TidemarkProtected]
            .iter()
            .filter_map(|t| f.samples.get(t.index()))
            .flat_map(|s| s.flushes_writes.iter().copied())
            .collect();
        let (flushes, writes) = counts.iter().fold((0.0, 0.0), |(a, b), (f, w)| (a + f, b + w));
        let _ = writeln!(
            out,
            "\nFlushes: in the `{}` job the sites counted {flushes:.0} NBD flushes for {writes:.0} \
             writes over all runs (`tidemark_nbd_operations_total`), one per {:.1} writes: fio's nbd \
             engine turns `--fsync={}` into NBD_CMD_FLUSH.",
            f.job.name,
            if flushes > 0.0 { writes / flushes } else { f64::NAN },
            f.job.fsync_every.unwrap_or(0)
        );
    }
    let _ = writeln!(
        out,
        "\nWhere the time goes (medians over the runs): fio's completion latency (for the mixed job, \
         the slower of reads and writes), and the server process's CPU time (user + system, from \
         /proc/PID/stat; for the protected target the primary site only) per GiB moved and per second \
         of the job (1.0 = one core busy all the time), and the whole machine's busy CPU per second of \
         the job (from /proc/stat: the servers, fio, kernel writeback; at most {} here).\n",
        h.cpus
    );
    let _ = writeln!(
        out,
        "| figure | target | clat p50 | clat p99 | server CPU per GiB | server cores busy | machine cores busy |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|");
    for f in &h.figures {
        for target in Target::ALL {
            let Some(s) = f.samples.get(target.index()) else { continue };
            let med = |v: &[f64]| Summary::of(v).map_or(f64::NAN, |s| s.median);
            let _ = writeln!(
                out,
                "| {} | {} | {:.0} µs | {:.0} µs | {:.2} s | {:.2} | {:.2} |",
                f.name,
                target.label(),
                med(&s.clat_p50_us),
                med(&s.clat_p99_us),
                med(&s.cpu_seconds_per_gib),
                med(&s.cpu_cores),
                med(&s.machine_cores)
            );
        }
    }
    let unmet: Vec<_> = h.ratios().into_iter().filter(|(_, _, r, t)| r.is_some_and(|r| r < *t)).collect();
    if !unmet.is_empty() {
        let _ = writeln!(out, "\nTargets not met, with the measured evidence:\n");
        for (f, what, r, target) in unmet {
            let (of, over) = match what {
                "Tidemark / qemu-nbd" => (Target::Tidemark, Target::QemuNbd),
                "Tidemark / nbdkit" => (Target::Tidemark, Target::Nbdkit),
                _ => (Target::TidemarkProtected, Target::Tidemark),
            };
            let med = |t: Target, pick: fn(&host_io::Samples) -> &Vec<f64>| {
                f.samples.get(t.index()).and_then(|s| Summary::of(pick(s))).map_or(f64::NAN, |s| s.median)
            };
            let (cpu_t, cpu_q) = (med(of, |s| &s.cpu_seconds_per_gib), med(over, |s| &s.cpu_seconds_per_gib));
            let (busy_t, busy_q) = (med(of, |s| &s.cpu_cores), med(over, |s| &s.cpu_cores));
            let (p99_t, p99_q) = (med(of, |s| &s.clat_p99_us), med(over, |s| &s.clat_p99_us));
            let (all_t, all_q) = (med(of, |s| &s.machine_cores), med(over, |s| &s.machine_cores));
            let _ = writeln!(
                out,
                "- **{}, {what}** ({:.2}x of ≥{target}x): {} spent {cpu_t:.2} CPU-s per GiB against \
                 {}'s {cpu_q:.2} and kept {busy_t:.2} cores busy against {busy_q:.2} (the whole \
                 machine: {all_t:.2} against {all_q:.2} of {} cores); p99 completion latency \
                 {p99_t:.0} µs against {p99_q:.0} µs.",
                f.name,
                r.unwrap_or(f64::NAN),
                of.label(),
                over.label(),
                h.cpus
            );
        }
    }
    let _ = writeln!(out);
}

fn memory_section(out: &mut String, m: &memory::Report) {
    let _ = writeln!(out, "## Index memory per journaled block\n");
    let _ = writeln!(
        out,
        "A new site, one volume; 16 MiB of warm-up writes elsewhere on the volume, then the site's \
         memory is read from /proc/PID/status; then {} distinct 4 KiB blocks ({}) are written once \
         in random order (fio's random map writes each block exactly once), memory is read again, \
         and the same job runs a second time (two versions of every block). Last, the site is \
         stopped and started again, which builds the index anew from its checkpoint, and the \
         warm-up job runs again before the last reading; that start leaves its own freed copies \
         in the heap (the decoded checkpoint), so it is not a cleaner measure, only another one. \
         Each reading waits 3 s so a maintenance pass (and any checkpoint it writes) is not \
         caught half-way. At each reading the group's own account of its index is read too \
         (`index_versions` and `index_bytes` of `group show --json`: what the index's leaves and \
         its table of record times have allocated, without the allocator's overhead). Job:\n",
        m.blocks,
        fio_size(m.blocks * memory::BLOCK_BYTES)
    );
    let _ = writeln!(out, "```sh\n{}\n```\n", m.job.command_line("nbd://127.0.0.1:PORT/v"));
    let _ = writeln!(
        out,
        "| state | newest seq | index versions | index bytes per version | target | result | VmRSS | VmRSS growth per block | RssAnon growth per block |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    let _ = writeln!(
        out,
        "| after warm-up (baseline) | – | – | – | | | {:.1} MiB | – | – |",
        m.before.rss_bytes as f64 / (1 << 20) as f64
    );
    let once = m.index_bytes_per_version(0);
    let _ = writeln!(
        out,
        "| each block written once | {} | {} | {once:.1} B | ≤{INDEX_BYTES_PER_BLOCK_TARGET} B | {} | {:.1} MiB | {:.1} B | {:.1} B |",
        m.seqs[0],
        m.index[0].0,
        verdict(once <= INDEX_BYTES_PER_BLOCK_TARGET),
        m.once.rss_bytes as f64 / (1 << 20) as f64,
        m.rss_per_block_once(),
        m.anon_per_block_once(),
    );
    let _ = writeln!(
        out,
        "| each block written twice | {} | {} | {:.1} B | – | | {:.1} MiB | {:.1} B | {:.1} B |",
        m.seqs[1],
        m.index[1].0,
        m.index_bytes_per_version(1),
        m.twice.rss_bytes as f64 / (1 << 20) as f64,
        m.rss_per_block_twice(),
        m.anon_per_block_twice()
    );
    let _ = writeln!(
        out,
        "| after a clean restart (the same index loaded from its checkpoint) | {} | {} | {:.1} B | – | | {:.1} MiB | {:.1} B | {:.1} B |",
        m.seqs[1],
        m.index[2].0,
        m.index_bytes_per_version(2),
        m.restarted.rss_bytes as f64 / (1 << 20) as f64,
        m.rss_per_block_restarted(),
        m.anon_per_block_restarted()
    );
    let _ = writeln!(
        out,
        "\nThe target is judged on the index's own allocation: about 20 bytes per version in its \
         leaves and 4 per record for the record's time (one record per block here). Resident \
         memory is an upper bound on it: it also holds the allocator's slack and freed memory it \
         has not given back, and the stacks of the threads the runtime started for the writes in \
         flight. RssAnon leaves out the mapped binary and files.\n"
    );
}

fn startup_section(out: &mut String, s: &startup::Report) {
    let (fill, outcome) = &s.fill;
    let _ = writeln!(out, "## Start-up time with a {} journal\n", gib(s.config.journal_bytes));
    let _ = writeln!(
        out,
        "A new site, one volume; {} written with 1 MiB sequential writes ({:.0} MB/s), leaving a \
         journal of {} bytes (newest seq {}). The clean stop after it took {:.2} s (drain plus \
         the final index checkpoint). A start is timed from spawning `tidemark serve` to the NBD \
         greeting on its port (a site binds its port before it opens the engine, so a TCP connect \
         alone would succeed too early), median of {} starts each. Before each crash start, {} \
         of 4 KiB random writes go in after a clean start and the site is killed with SIGKILL; \
         before each rebuild start, `DATA/groups/*/checkpoint` is deleted. Cold starts follow \
         `echo 3 > /proc/sys/vm/drop_caches`; warm ones find the page cache as the previous step \
         left it. CPU is the site's user + system time when it greeted. Jobs:\n",
        gib(s.config.journal_bytes),
        outcome.bytes_per_second / 1e6,
        s.journal_bytes,
        s.last_seq,
        s.stop_seconds,
        s.config.trials,
        fio_size(s.config.tail_bytes)
    );
    let uri = "nbd://127.0.0.1:PORT/v";
    let _ = writeln!(out, "```sh\n{}\n{}\n```\n", fill.command_line(uri), s.tail.command_line(uri));
    let _ = writeln!(out, "| start | cache | median | min–max | CPU at greeting (median) |");
    let _ = writeln!(out, "|---|---|---|---|---|");
    for case in Case::ALL {
        for t in s.timings.iter().filter(|t| t.case == case) {
            let (Some(time), Some(cpu)) = (Summary::of(&t.seconds), Summary::of(&t.cpu_seconds)) else {
                continue;
            };
            let _ = writeln!(
                out,
                "| {} | {} | {:.2} s | {:.2}–{:.2} s | {:.2} s |",
                case.label(),
                if t.cold { "cold" } else { "warm" },
                time.median,
                time.min,
                time.max,
                cpu.median
            );
        }
    }
    let _ = writeln!(out);
}

fn value(unit: Unit, v: f64) -> String {
    match unit {
        Unit::MegabytesPerSecond => format!("{v:.0}"),
        Unit::Iops => format!("{:.1}k", v / 1000.0),
    }
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / GIB_BYTES;
    if (g - g.round()).abs() < 0.05 {
        format!("{g:.0} GiB")
    } else {
        format!("{g:.2} GiB")
    }
}

/// The text between the analysis markers of a previous report.
fn analysis(previous: &str) -> Option<&str> {
    let start = previous.find(ANALYSIS_BEGIN)? + ANALYSIS_BEGIN.len();
    let end = previous.get(start..)?.find(ANALYSIS_END)? + start;
    previous.get(start..end).map(|t| t.strip_prefix('\n').unwrap_or(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn analysis_survives_regeneration() {
        let old = format!("# x\n{ANALYSIS_BEGIN}\nkept text\n{ANALYSIS_END}\n");
        assert_eq!(analysis(&old), Some("kept text\n"));
        assert_eq!(analysis("# no markers"), None);
    }

    #[test]
    fn sizes_read_as_gib() {
        assert_eq!(gib(10 << 30), "10 GiB");
        assert_eq!(gib((10u64 << 30) + (300 << 20)), "10.29 GiB");
    }
}
