//! A drill's report: what ran, what was measured, what was checked and what failed, as JSON
//! (`--report FILE.json`) and as a terminal summary. The JSON format is documented in
//! `docs/drills.md`; `format` names its version.

use std::fmt::Write as _;

use serde::Serialize;

use crate::check::Problem;
use crate::pair::LinkTotals;
use crate::pattern::WriteId;

/// The report format's name and version.
pub const REPORT_FORMAT: &str = "tidemark-drill-report/1";

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// [`REPORT_FORMAT`].
    pub format: &'static str,
    /// The scenario that ran.
    pub scenario: ScenarioSummary,
    /// Version of the tidemark binary.
    pub tidemark_version: String,
    /// Wall-clock start, RFC 3339.
    pub started: String,
    /// Seconds the drill took.
    pub seconds: f64,
    /// Whether every step ran and every check and expectation held.
    pub passed: bool,
    /// The first failure (the reason the drill failed), if any.
    pub failure: Option<Failure>,
    /// Every failure.
    pub failures: Vec<Failure>,
    /// Whether every copy checked was write-order consistent (invariant 3).
    pub consistent: bool,
    /// The worst recovery point of the role changes: seconds of acknowledged writes lost.
    pub rpo_seconds: Option<f64>,
    /// The worst recovery time of the role changes: seconds without a primary accepting writes.
    pub rto_seconds: Option<f64>,
    /// Acknowledged writes the new primaries did not have, over all role changes.
    pub data_lost_writes: u64,
    /// Acknowledged writes rolled back on purpose (rollbacks and takeovers at an earlier point).
    pub rolled_back_writes: u64,
    /// The workload and what became of its writes.
    pub workload: WorkloadSummary,
    /// Each swap and takeover, measured.
    pub role_changes: Vec<RoleChange>,
    /// Each check of a copy.
    pub checks: Vec<CheckRecord>,
    /// Each step, timed.
    pub steps: Vec<StepRecord>,
    /// The link's traffic.
    pub link: LinkSummary,
    /// The scratch directory, when it was kept (site logs are there).
    pub workdir: Option<String>,
}

/// What ran.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioSummary {
    /// Its name.
    pub name: String,
    /// What it exercises.
    pub description: String,
    /// The file.
    pub file: String,
    /// The seed.
    pub seed: u64,
    /// The two sites; the first started as the primary.
    pub sites: [String; 2],
    /// The link at start.
    pub link: String,
    /// The group.
    pub group: String,
    /// Its volumes: name, size and region written, in bytes.
    pub volumes: Vec<(String, u64, u64)>,
    /// Writes per second.
    pub rate_per_second: f64,
    /// Bytes per block.
    pub block_bytes: u32,
}

/// Why a drill failed.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failure {
    /// The step's number (0: setup, after the last step: expectations).
    pub step: usize,
    /// The step as written.
    pub step_text: String,
    /// Which check or action failed.
    pub check: String,
    /// Why.
    pub reason: String,
}

/// The workload's writes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct WorkloadSummary {
    /// Writes sent.
    pub issued: u64,
    /// Writes acknowledged.
    pub acknowledged: u64,
    /// Writes refused by the site (EPERM during a swap's freeze, say).
    pub refused: u64,
    /// Writes without an answer (the site died or the connection broke).
    pub unanswered: u64,
    /// Acknowledged writes made durable by a flush.
    pub durable: u64,
    /// Flushes acknowledged.
    pub flushes: u64,
    /// Bytes acknowledged.
    pub bytes_acknowledged: u64,
    /// blake3 of the sequence of writes issued (id, volume, block, blocks): equal for runs
    /// that issued the same writes.
    pub digest: String,
    /// Every write: `[id, volume, block, blocks, site, fate]`, fate one of `ack`, `ack-volatile`,
    /// `refused`, `unanswered`, `in-flight`.
    pub log: Vec<(u64, u32, u64, u32, usize, &'static str)>,
}

/// One swap or takeover.
#[derive(Debug, Clone, Serialize)]
pub struct RoleChange {
    /// The step.
    pub step: usize,
    /// `swap` or `takeover`.
    pub kind: &'static str,
    /// The old primary.
    pub from: String,
    /// The new primary.
    pub to: String,
    /// The point (`latest` or `bookmark:NAME`).
    pub at: String,
    /// The generation after it.
    pub generation: u64,
    /// The seq the new primary's history continues from (fork point or swap's last seq).
    pub seq: u64,
    /// Seconds the API call took.
    pub command_seconds: f64,
    /// When the outage began (the kill or partition of the old primary, or the swap's start),
    /// in seconds since the drill started.
    pub outage_began_seconds: f64,
    /// What began the outage.
    pub outage_began_by: String,
    /// When the new primary acknowledged its first write, if the workload wrote.
    pub first_write_seconds: Option<f64>,
    /// Recovery time: outage start to the first acknowledged write (or to the end of the
    /// command when the workload was not running).
    pub rto_seconds: Option<f64>,
    /// How the RTO was measured.
    pub rto_basis: &'static str,
    /// Acknowledged writes the new primary lacks.
    pub lost_writes: u64,
    /// Recovery point: outage start minus the acknowledgement of the oldest lost write (0 when
    /// none was lost).
    pub rpo_seconds: f64,
    /// The RPO the old primary's API reported just before it was killed, if it was.
    pub rpo_reported_seconds: Option<f64>,
    /// The replication lag the old primary's API reported just before it was killed.
    pub lag_records_reported: Option<u64>,
    /// Acknowledged writes after the chosen point, discarded on purpose (takeover `at`).
    pub discarded_writes: u64,
}

/// One check of one copy.
#[derive(Debug, Clone, Serialize)]
pub struct CheckRecord {
    /// The step.
    pub step: usize,
    /// The site.
    pub site: String,
    /// What was read: `group`, an image's name, a salvage image's name.
    pub target: String,
    /// What was checked.
    pub check: String,
    /// Whether it held.
    pub passed: bool,
    /// Whether the copy was write-order consistent.
    pub consistent: bool,
    /// The newest write the copy holds.
    pub cut: Option<WriteId>,
    /// Writes seen in it.
    pub writes_seen: usize,
    /// Blocks read.
    pub blocks: u64,
    /// Acknowledged writes it lacks (lag, for a secondary).
    pub behind_writes: usize,
    /// The findings (at most 10).
    pub problems: Vec<Problem>,
    /// All findings, counted.
    pub problem_count: usize,
    /// What it means.
    pub detail: String,
}

/// One step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    /// Its number, from 1.
    pub number: usize,
    /// As written.
    pub text: String,
    /// When it began, in seconds since the drill started.
    pub started_seconds: f64,
    /// How long it took.
    pub seconds: f64,
    /// `ok`, `failed` or `skipped`.
    pub result: &'static str,
    /// What it did or why it failed.
    pub detail: String,
    /// Traffic on the link during the step.
    pub link: LinkTotals,
}

/// The link's traffic over the whole drill.
#[derive(Debug, Clone, Serialize)]
pub struct LinkSummary {
    /// By site direction, over both relays.
    pub totals: LinkTotals,
    /// Each relay's own counters (relay 0 carries the first site's connections).
    pub relays: Vec<simnet::Stats>,
}

impl Report {
    /// The terminal summary: verdict, measurements, workload, link, and failures.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let verdict = if self.passed { "PASSED" } else { "FAILED" };
        let opt = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.3} s"));
        let _ = writeln!(
            out,
            "{verdict}: drill {:?} (seed {}) in {:.1} s",
            self.scenario.name, self.scenario.seed, self.seconds
        );
        let _ = writeln!(
            out,
            "  consistent {}  data lost {} writes  RPO {}  RTO {}  rolled back {} writes",
            if self.consistent { "yes" } else { "NO" },
            self.data_lost_writes,
            opt(self.rpo_seconds),
            opt(self.rto_seconds),
            self.rolled_back_writes
        );
        for rc in &self.role_changes {
            let _ = writeln!(
                out,
                "  step {} {} {}->{} at {}: generation {}, lost {} writes, RPO {:.3} s, RTO {} ({})",
                rc.step,
                rc.kind,
                rc.from,
                rc.to,
                rc.at,
                rc.generation,
                rc.lost_writes,
                rc.rpo_seconds,
                opt(rc.rto_seconds),
                rc.rto_basis
            );
        }
        let w = &self.workload;
        let _ = writeln!(
            out,
            "  workload: {} writes issued, {} acknowledged ({} durable), {} refused, {} unanswered; {} flushes",
            w.issued, w.acknowledged, w.durable, w.refused, w.unanswered, w.flushes
        );
        let t = &self.link.totals;
        for (name, way) in [
            (format!("{}->{}", self.scenario.sites[0], self.scenario.sites[1]), &t.a_to_b),
            (format!("{}->{}", self.scenario.sites[1], self.scenario.sites[0]), &t.b_to_a),
        ] {
            let _ = writeln!(
                out,
                "  link {name}: {} packets delivered ({} bytes), dropped {} cut, {} loss, {} queue",
                way.delivered_packets,
                way.delivered_bytes,
                way.dropped_cut,
                way.dropped_loss,
                way.dropped_queue
            );
        }
        let passed = self.checks.iter().filter(|c| c.passed).count();
        let _ = writeln!(out, "  checks: {passed} of {} passed", self.checks.len());
        for f in &self.failures {
            let _ =
                writeln!(out, "  failed at step {} (`{}`), {}: {}", f.step, f.step_text, f.check, f.reason);
        }
        out
    }
}
