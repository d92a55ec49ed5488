//! Running a scenario: start the pair in a scratch directory, run the steps in order against
//! the real sites, keep the model of which writes each history holds, check copies, measure
//! role changes, and write the report.
//!
//! The drill's model of history is a [`Lineage`] of write ids. Writes append to it; a takeover
//! cuts it where the new primary's copy ends (read from an image at the fork point) and
//! continues with the writes sent to the new primary; a rollback cuts it at the bookmark's
//! write and continues. Bookmarks, rollbacks and the checks of test-failover images quiesce the
//! workload first, as an application would, so their points are known exactly.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

use crate::api::Api;
use crate::check::{check_copy, Copy, CopyCheck, Fate, Lineage, ProblemKind, Requirements};
use crate::nbd::Client;
use crate::pair::{Layout, LinkTotals, Pair};
use crate::pattern::{
    encode_block, BlockContent, SplitMix, WorkloadShape, WriteId, IMAGE_WRITE_ID_BASE, WRITE_MAGIC,
};
use crate::report::{
    CheckRecord, Failure, LinkSummary, Report, RoleChange, ScenarioSummary, StepRecord, WorkloadSummary,
    REPORT_FORMAT,
};
use crate::scenario::{PointRef, Scenario, SiteIndex, Step};
use crate::supervisor::interrupted;
use crate::workload::{Outcome, Target, Workload, WorkloadConfig, WriteRecord};

/// How long the pair may take to start streaming the new group.
pub const SETUP_DEADLINE: Duration = Duration::from_secs(120);
/// How long a rollback job may take.
pub const ROLLBACK_DEADLINE: Duration = Duration::from_secs(300);
/// How long the workload may take to come to rest (finish its write, flush).
pub const QUIESCE_DEADLINE: Duration = Duration::from_secs(60);
/// Bytes read from a copy per NBD request.
const READ_CHUNK_BYTES: u64 = 1 << 20;
/// Blocks a test-failover image gets written, to show it takes writes.
const FAILOVER_BLOCKS: u64 = 8;
/// How often waits poll the API.
const POLL: Duration = Duration::from_millis(200);

/// How to run a drill.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// The tidemark binary to start sites with.
    pub binary: PathBuf,
    /// Where to make the scratch directory [default: the system's temporary directory].
    pub workdir: Option<PathBuf>,
    /// Keep the scratch directory even when the drill passes.
    pub keep: bool,
}

/// Run `scenario`; progress lines go to `progress`. The report says whether it passed; an
/// `Err` is only for a drill that could not run at all (no scratch directory).
pub fn run_drill(
    scenario: &Scenario,
    options: &DrillOptions,
    progress: &mut dyn Write,
) -> Result<Report, String> {
    let epoch = Instant::now();
    let started = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
    let base = options.workdir.clone().unwrap_or_else(std::env::temp_dir);
    let stamp = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let slug: String = scenario
        .name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let slug: String = slug.chars().take(40).collect();
    let scratch = base.join(format!("tidemark-drill-{slug}-{}-{stamp}", std::process::id()));
    std::fs::create_dir_all(&scratch)
        .map_err(|e| format!("create scratch directory {}: {e}", scratch.display()))?;

    let _ = writeln!(progress, "drill {:?}: {}", scenario.name, scenario.path.display());
    let _ = writeln!(
        progress,
        "  seed {}, link {}, scratch {}",
        scenario.seed,
        scenario.link_name,
        scratch.display()
    );
    let mut drill = match Drill::set_up(scenario, options, &scratch, epoch) {
        Ok(drill) => drill,
        Err(reason) => {
            let failure = Failure { step: 0, step_text: "setup".into(), check: "setup".into(), reason };
            let report = setup_failure_report(scenario, options, started, epoch, failure, &scratch);
            return Ok(report);
        }
    };
    let _ = writeln!(
        progress,
        "  sites up, group {} replicating ({:.1} s)",
        scenario.group,
        epoch.elapsed().as_secs_f64()
    );
    drill.run_steps(progress);
    let mut report = drill.finish(started);
    if report.passed && !options.keep {
        // The scratch directory holds only what this drill made; a failure to remove it leaves
        // files in the temporary directory and changes nothing about the verdict.
        let _ = std::fs::remove_dir_all(&scratch);
    } else {
        report.workdir = Some(scratch.display().to_string());
    }
    Ok(report)
}

fn setup_failure_report(
    scenario: &Scenario,
    options: &DrillOptions,
    started: String,
    epoch: Instant,
    failure: Failure,
    scratch: &Path,
) -> Report {
    Report {
        format: REPORT_FORMAT,
        scenario: scenario_summary(scenario),
        tidemark_version: binary_version(&options.binary),
        started,
        seconds: epoch.elapsed().as_secs_f64(),
        passed: false,
        failure: Some(failure.clone()),
        failures: vec![failure],
        consistent: false,
        rpo_seconds: None,
        rto_seconds: None,
        data_lost_writes: 0,
        rolled_back_writes: 0,
        workload: WorkloadSummary::default(),
        role_changes: Vec::new(),
        checks: Vec::new(),
        steps: scenario
            .steps
            .iter()
            .enumerate()
            .map(|(i, (text, _))| StepRecord {
                number: i + 1,
                text: text.clone(),
                started_seconds: 0.0,
                seconds: 0.0,
                result: "skipped",
                detail: String::new(),
                link: LinkTotals::default(),
            })
            .collect(),
        link: LinkSummary { totals: LinkTotals::default(), relays: Vec::new() },
        workdir: Some(scratch.display().to_string()),
    }
}

fn scenario_summary(s: &Scenario) -> ScenarioSummary {
    ScenarioSummary {
        name: s.name.clone(),
        description: s.description.clone(),
        file: s.path.display().to_string(),
        seed: s.seed,
        sites: s.sites.clone(),
        link: s.link_name.clone(),
        group: s.group.clone(),
        volumes: s.volumes.iter().map(|v| (v.name.clone(), v.size_bytes, v.region_bytes)).collect(),
        rate_per_second: s.workload.rate_per_second,
        block_bytes: s.workload.block_bytes,
    }
}

fn binary_version(binary: &Path) -> String {
    std::process::Command::new(binary)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// A bookmark the drill made: the history at it.
struct Bookmark {
    lineage: Lineage,
    last: Option<WriteId>,
}

/// A history a takeover superseded, kept to check the old primary's salvage image.
struct Superseded {
    site: SiteIndex,
    step: usize,
    lineage: Lineage,
    /// The newest write sent to the old primary that a flush made durable before it was lost.
    durable_last: Option<WriteId>,
    /// The fork point's seq: the salvage image names it.
    fork_seq: u64,
    /// The newest write of it the new primary held at the fork.
    survivor_cut: Option<WriteId>,
    checked: bool,
}

/// A history a rollback replaced; a secondary may still show it until the rollback reaches it.
struct Era {
    lineage: Lineage,
    ended_step: usize,
}

/// A role change, measured as it happened; the RTO is filled in at the end.
struct PendingRoleChange {
    record: RoleChange,
    new_site: SiteIndex,
    first_new_write: WriteId,
    command_done_seconds: f64,
}

/// Why a step failed: which action or check, and the reason.
struct StepFailure {
    check: String,
    reason: String,
}

impl StepFailure {
    fn interrupted() -> StepFailure {
        StepFailure { check: "interrupted".into(), reason: "a signal stopped the drill".into() }
    }
}

impl From<String> for StepFailure {
    fn from(reason: String) -> StepFailure {
        StepFailure { check: "step".into(), reason }
    }
}

impl From<&str> for StepFailure {
    fn from(reason: &str) -> StepFailure {
        StepFailure { check: "step".into(), reason: reason.into() }
    }
}

struct Drill<'a> {
    sc: &'a Scenario,
    binary: PathBuf,
    pair: Pair,
    workload: Workload,
    shape: WorkloadShape,
    volumes: Vec<String>,
    epoch: Instant,
    primary: SiteIndex,
    lineage: Lineage,
    eras: Vec<Era>,
    superseded: Vec<Superseded>,
    bookmarks: BTreeMap<String, Bookmark>,
    replicated: Option<(WriteId, usize)>,
    swap_mark: Option<WriteId>,
    role_changes: Vec<PendingRoleChange>,
    killed_at: [Option<f64>; 2],
    partitioned_at: Option<f64>,
    reported_at_kill: [Option<(f64, u64)>; 2],
    checks: Vec<CheckRecord>,
    failures: Vec<Failure>,
    steps: Vec<StepRecord>,
    rolled_back: u64,
    /// The blocks the last [`Drill::check_image`] read, for a second look.
    read_last: Option<Vec<Vec<BlockContent>>>,
}

impl<'a> Drill<'a> {
    fn set_up(
        sc: &'a Scenario,
        options: &DrillOptions,
        scratch: &Path,
        epoch: Instant,
    ) -> Result<Drill<'a>, String> {
        let layout = Layout::free().map_err(|e| format!("find free ports: {e}"))?;
        let pair = Pair::start(&options.binary, scratch, &sc.sites, layout, sc.link.clone(), sc.seed)?;
        pair.join()?;
        let volumes: Vec<(String, u64)> = sc.volumes.iter().map(|v| (v.name.clone(), v.size_bytes)).collect();
        pair.create_group(&sc.group, &volumes)?;
        let api = pair.sites[0].api()?;
        let started = Instant::now();
        loop {
            let g = api.get(&format!("/v1/groups/{}", sc.group))?;
            let state = g.pointer("/replication/state").and_then(Value::as_str).unwrap_or("none");
            if state == "streaming" {
                break;
            }
            if started.elapsed() > SETUP_DEADLINE {
                return Err(format!(
                    "group {} did not start replicating within {} s (state {state}; {}); see {}",
                    sc.group,
                    SETUP_DEADLINE.as_secs(),
                    g.pointer("/replication/last_error").and_then(Value::as_str).unwrap_or("no error"),
                    pair.sites[0].log_path().display()
                ));
            }
            if interrupted().is_some() {
                return Err("interrupted".into());
            }
            std::thread::sleep(POLL);
        }
        let shape = WorkloadShape {
            seed: sc.seed,
            pattern: sc.workload.pattern,
            block_bytes: sc.workload.block_bytes,
            blocks_per_write_max: sc.workload.blocks_per_write_max,
            region_blocks: sc
                .volumes
                .iter()
                .map(|v| v.region_bytes / u64::from(sc.workload.block_bytes))
                .collect(),
        };
        let names: Vec<String> = sc.volumes.iter().map(|v| v.name.clone()).collect();
        let workload = Workload::spawn(
            WorkloadConfig {
                shape: shape.clone(),
                volumes: names.clone(),
                rate_per_second: sc.workload.rate_per_second,
                flush_every: sc.workload.flush_every,
            },
            epoch,
        )
        .map_err(|e| format!("start the workload thread: {e}"))?;
        workload.retarget(Some(Target { site: 0, nbd: pair.sites[0].ports.nbd }));
        Ok(Drill {
            sc,
            binary: options.binary.clone(),
            pair,
            workload,
            shape,
            volumes: names,
            epoch,
            primary: 0,
            lineage: Lineage::from_start(),
            eras: Vec::new(),
            superseded: Vec::new(),
            bookmarks: BTreeMap::new(),
            replicated: None,
            swap_mark: None,
            role_changes: Vec::new(),
            killed_at: [None, None],
            partitioned_at: None,
            reported_at_kill: [None, None],
            checks: Vec::new(),
            failures: Vec::new(),
            steps: Vec::new(),
            rolled_back: 0,
            read_last: None,
        })
    }

    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn name(&self, site: SiteIndex) -> &str {
        self.sc.sites.get(site).map_or("?", String::as_str)
    }

    fn api(&self, site: SiteIndex) -> Result<&Api, String> {
        self.pair.sites.get(site).ok_or("no such site")?.api()
    }

    fn group_path(&self) -> String {
        format!("/v1/groups/{}", self.sc.group)
    }

    fn run_steps(&mut self, progress: &mut dyn Write) {
        let total = self.sc.steps.len();
        let mut aborted: Option<usize> = None;
        for (index, (text, step)) in self.sc.steps.iter().enumerate() {
            let number = index + 1;
            let started = self.now();
            let before = self.pair.totals();
            if aborted.is_some() || interrupted().is_some() {
                if aborted.is_none() {
                    self.fail(number, text, "interrupted", "a signal stopped the drill".into());
                    aborted = Some(number);
                }
                self.steps.push(StepRecord {
                    number,
                    text: text.clone(),
                    started_seconds: started,
                    seconds: 0.0,
                    result: "skipped",
                    detail: String::new(),
                    link: LinkTotals::default(),
                });
                continue;
            }
            let _ = write!(progress, "  {number:>3}/{total} {text:<36} ");
            let _ = progress.flush();
            let checks_before = self.failures.len();
            let outcome = self.step(number, step);
            let action_failed = outcome.is_err();
            let seconds = self.now() - started;
            let link = self.pair.totals().since(&before);
            let (result, detail) = match outcome {
                Ok(detail) if self.failures.len() == checks_before => ("ok", detail),
                Ok(detail) => ("failed", detail),
                Err(f) => {
                    let detail = format!("{}: {}", f.check, f.reason);
                    self.fail(number, text, &f.check, f.reason);
                    if f.check == "step" || f.check == "interrupted" {
                        aborted = Some(number);
                    }
                    ("failed", detail)
                }
            };
            let _ = writeln!(progress, "{result:<6} {seconds:>6.1} s  {}", first_line(&detail));
            if !action_failed {
                // The checks that failed, each with its reason (an action's is on its line).
                for f in self.failures.get(checks_before..).unwrap_or(&[]) {
                    let _ = writeln!(progress, "          {}: {}", f.check, f.reason);
                }
            }
            self.steps.push(StepRecord {
                number,
                text: text.clone(),
                started_seconds: started,
                seconds,
                result,
                detail,
                link,
            });
        }
    }

    fn fail(&mut self, step: usize, text: &str, check: &str, reason: String) {
        self.failures.push(Failure { step, step_text: text.to_string(), check: check.to_string(), reason });
    }

    fn step(&mut self, number: usize, step: &Step) -> Result<String, StepFailure> {
        match step {
            Step::WorkloadStart => {
                self.workload.run(None);
                Ok(format!(
                    "writing to {} at {}/s",
                    self.name(self.primary),
                    self.sc.workload.rate_per_second
                ))
            }
            Step::WorkloadStop => {
                self.workload.quiesce(true, QUIESCE_DEADLINE)?;
                Ok(format!("{} writes issued so far", self.workload.last_issued().map_or(0, |w| w.0)))
            }
            Step::WorkloadRun(d) => {
                let writes = (self.sc.workload.rate_per_second * d.as_secs_f64()).round().max(1.0) as u64;
                let first = self.workload.last_issued().map_or(1, |w| w.0 + 1);
                self.workload.run(Some(writes));
                let deadline = *d * 3 + Duration::from_secs(30);
                if let Err(e) = self.workload.wait_done(deadline) {
                    let _ = self.workload.quiesce(true, QUIESCE_DEADLINE);
                    return Err(e.into());
                }
                Ok(format!("writes {first}..={} issued", first + writes - 1))
            }
            Step::Link { name, settings } => {
                self.pair.set_link(settings.as_ref().clone())?;
                Ok(format!("link is now {name}"))
            }
            Step::Partition(cut) => {
                self.pair.partition(*cut);
                self.partitioned_at.get_or_insert(self.now());
                Ok("link cut".into())
            }
            Step::Heal => {
                self.pair.heal();
                self.partitioned_at = None;
                Ok("link healed".into())
            }
            Step::Kill(site) => self.kill(*site),
            Step::Stop(site) => {
                let site = *site;
                self.pair.sites[site].stop()?;
                Ok(format!("site {} stopped cleanly", self.name(site)))
            }
            Step::Start(site) => {
                let site = *site;
                self.pair.sites[site].start()?;
                self.killed_at[site] = None;
                Ok(format!(
                    "site {} started (pid {})",
                    self.name(site),
                    self.pair.sites[site].pid().unwrap_or(0)
                ))
            }
            Step::Swap(asker) => self.swap(number, asker.unwrap_or(self.primary)),
            Step::Takeover { site, at, force } => self.takeover(number, *site, at, *force),
            Step::Bookmark(name) => self.bookmark(name),
            Step::Rollback { site, to } => self.rollback(number, *site, to),
            Step::Image { site, at, name } => {
                let name = name.clone().unwrap_or_else(|| format!("drill-image-{number}"));
                self.image(number, *site, at, &name)
            }
            Step::WaitReplicated(timeout) => self.wait_replicated(number, *timeout),
            Step::Verify => self.verify(number),
            Step::Sleep(d) => {
                let end = Instant::now() + *d;
                while Instant::now() < end {
                    if interrupted().is_some() {
                        return Err(StepFailure::interrupted());
                    }
                    std::thread::sleep((end - Instant::now()).min(POLL));
                }
                Ok(String::new())
            }
            Step::Corrupt { site, blocks } => self.corrupt(number, *site, *blocks),
        }
    }

    fn kill(&mut self, site: SiteIndex) -> Result<String, StepFailure> {
        let mut detail = String::new();
        if site == self.primary {
            // What the primary itself says of its lag, just before it dies, for the report.
            if let Ok(g) = self.api(site).and_then(|api| api.get(&self.group_path())) {
                let rpo = g.pointer("/replication/rpo_seconds").and_then(Value::as_f64).unwrap_or(0.0);
                let lag = g.pointer("/replication/lag_records").and_then(Value::as_u64).unwrap_or(0);
                self.reported_at_kill[site] = Some((rpo, lag));
                detail = format!("; it reported lag {lag} records, RPO {rpo:.3} s");
            }
        }
        self.pair.sites[site].kill();
        self.killed_at[site] = Some(self.now());
        self.workload.site_killed(site);
        Ok(format!("site {} killed (SIGKILL){detail}", self.name(site)))
    }

    /// The log as it is now.
    fn log(&self) -> Vec<WriteRecord> {
        self.workload.with_log(<[WriteRecord]>::to_vec)
    }

    /// The newest acknowledged write of `lineage` that a check may count on.
    fn last_acknowledged(log: &[WriteRecord], lineage: &Lineage) -> Option<WriteId> {
        log.iter()
            .rev()
            .find(|r| lineage.contains(r.id) && matches!(r.fate(), Fate::Acknowledged(_)))
            .map(|r| r.id)
    }

    fn swap(&mut self, number: usize, asker: SiteIndex) -> Result<String, StepFailure> {
        let old = self.primary;
        let new = 1 - old;
        let outage_began = self.now();
        let started = Instant::now();
        let answer = self.api(asker)?.post(&format!("{}/swap", self.group_path()), &json!({}))?;
        let command_seconds = started.elapsed().as_secs_f64();
        let generation = answer.get("generation").and_then(Value::as_u64).unwrap_or(0);
        let last_seq = answer.get("last_seq").and_then(Value::as_u64).unwrap_or(0);
        self.primary = new;
        let first_new =
            self.workload.retarget(Some(Target { site: new, nbd: self.pair.sites[new].ports.nbd }));
        let command_done = self.now();

        // The new primary must hold every write the old one acknowledged: read it at the swap.
        let log = self.log();
        let before: Lineage = self.lineage.truncated(Some(WriteId(first_new.0.saturating_sub(1))));
        let must = Drill::last_acknowledged(&log, &before);
        self.swap_mark = must;
        let check = self.check_image(
            new,
            &format!("seq:{last_seq}"),
            &format!("drill-swap-{number}"),
            &before,
            Requirements { must_include: must, at_most: None },
        )?;
        let lost = check.missing_acknowledged.iter().filter(|id| id.0 < first_new.0).count() as u64;
        let rpo = rpo_of(&self.log(), &check.missing_acknowledged, first_new, outage_began);
        self.record_check(number, new, &format!("seq:{last_seq}"), "swap lost no acknowledged write", &check, lost == 0, format!(
            "the new primary at the swap's last seq {last_seq} holds writes through {}; {lost} acknowledged writes missing",
            opt_id(check.cut)
        ));
        self.role_changes.push(PendingRoleChange {
            record: RoleChange {
                step: number,
                kind: "swap",
                from: self.name(old).into(),
                to: self.name(new).into(),
                at: "latest".into(),
                generation,
                seq: last_seq,
                command_seconds,
                outage_began_seconds: outage_began,
                outage_began_by: format!("swap asked at {}", self.name(asker)),
                first_write_seconds: None,
                rto_seconds: None,
                rto_basis: "",
                lost_writes: lost,
                rpo_seconds: rpo,
                rpo_reported_seconds: None,
                lag_records_reported: None,
                discarded_writes: 0,
            },
            new_site: new,
            first_new_write: first_new,
            command_done_seconds: command_done,
        });
        Ok(format!(
            "generation {generation}, {} is primary; the swap took {command_seconds:.2} s",
            self.name(new)
        ))
    }

    fn takeover(
        &mut self,
        number: usize,
        site: SiteIndex,
        at: &PointRef,
        force: bool,
    ) -> Result<String, StepFailure> {
        if site == self.primary {
            return Err(format!("site {} is already the primary", self.name(site)).into());
        }
        let old = self.primary;
        let now = self.now();
        let (outage_began, began_by) = match (self.killed_at[old], self.partitioned_at) {
            (Some(t), _) => (t, format!("kill of {}", self.name(old))),
            (None, Some(t)) => (t, "partition".to_string()),
            (None, None) => (now, "takeover command (the old primary was running)".to_string()),
        };
        let mut body = json!({ "force": force });
        if let PointRef::Bookmark(_) = at {
            body["at"] = json!(at.api_text());
        }
        let started = Instant::now();
        let answer = self.api(site)?.post(&format!("{}/takeover", self.group_path()), &body)?;
        let command_seconds = started.elapsed().as_secs_f64();
        let generation = answer.get("generation").and_then(Value::as_u64).unwrap_or(0);
        let fork_seq = answer.get("fork_seq").and_then(Value::as_u64).unwrap_or(0);
        self.primary = site;
        // Writes go to the new primary at once: the RTO is measured by them.
        let first_new = self.workload.retarget(Some(Target { site, nbd: self.pair.sites[site].ports.nbd }));
        let command_done = self.now();

        // Where the survivor's copy ends: read it at the fork point.
        let log = self.log();
        let old_history = self.lineage.truncated(Some(WriteId(first_new.0.saturating_sub(1))));
        let check = self.check_image(
            site,
            &format!("seq:{fork_seq}"),
            &format!("drill-fork-{number}"),
            &old_history,
            Requirements::default(),
        )?;
        let missing: Vec<WriteId> =
            check.missing_acknowledged.iter().copied().filter(|id| id.0 < first_new.0).collect();
        let lost = missing.len() as u64;
        let rpo = rpo_of(&self.log(), &missing, first_new, outage_began);
        self.record_check(number, site, &format!("seq:{fork_seq}"), "the survivor is a prefix of the lost primary's history", &check, check.consistent(), format!(
            "at the fork point (seq {fork_seq}) it holds writes through {}; {lost} acknowledged writes of {} never reached it",
            opt_id(check.cut),
            self.name(old)
        ));
        let (base, discarded) = match at {
            PointRef::Latest => (old_history.truncated(check.cut), 0),
            PointRef::Bookmark(name) => {
                let b = self.bookmarks.get(name).ok_or_else(|| format!("no bookmark {name}"))?;
                let discarded = log
                    .iter()
                    .filter(|r| b.last.is_none_or(|last| r.id > last))
                    .filter(|r| check.cut.is_some_and(|cut| r.id <= cut) && old_history.contains(r.id))
                    .filter(|r| r.acknowledged().is_some())
                    .count() as u64;
                (b.lineage.clone(), discarded)
            }
        };
        self.rolled_back += discarded;
        let durable_last =
            log.iter().rev().find(|r| r.site == old && r.durable_seconds.is_some()).map(|r| r.id);
        self.superseded.push(Superseded {
            site: old,
            step: number,
            lineage: old_history,
            durable_last,
            fork_seq,
            survivor_cut: check.cut,
            checked: false,
        });
        self.lineage = base.continued_from(first_new);
        let reported = self.reported_at_kill[old].take();
        self.role_changes.push(PendingRoleChange {
            record: RoleChange {
                step: number,
                kind: "takeover",
                from: self.name(old).into(),
                to: self.name(site).into(),
                at: at.api_text(),
                generation,
                seq: fork_seq,
                command_seconds,
                outage_began_seconds: outage_began,
                outage_began_by: began_by,
                first_write_seconds: None,
                rto_seconds: None,
                rto_basis: "",
                lost_writes: lost,
                rpo_seconds: rpo,
                rpo_reported_seconds: reported.map(|r| r.0),
                lag_records_reported: reported.map(|r| r.1),
                discarded_writes: discarded,
            },
            new_site: site,
            first_new_write: first_new,
            command_done_seconds: command_done,
        });
        Ok(format!(
            "generation {generation}, fork seq {fork_seq}; {lost} acknowledged writes lost, RPO {rpo:.3} s; the takeover took {command_seconds:.2} s"
        ))
    }

    /// Pause a running workload for the duration of `f`, as an application quiesces.
    fn quiesced<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R, StepFailure>) -> Result<R, StepFailure> {
        let was_running = self.workload.is_running();
        if was_running {
            self.workload.quiesce(false, QUIESCE_DEADLINE)?;
        }
        let result = f(self);
        if was_running {
            self.workload.run(None);
        }
        result
    }

    fn bookmark(&mut self, name: &str) -> Result<String, StepFailure> {
        self.quiesced(|d| {
            let primary = d.primary;
            d.api(primary)?.post(&format!("{}/bookmarks", d.group_path()), &json!({ "name": name }))?;
            let last = d.workload.last_issued();
            let lineage = d.lineage.truncated(last);
            d.bookmarks.insert(name.to_string(), Bookmark { lineage, last });
            Ok(format!("bookmark {name} at {} after write {}", d.name(primary), opt_id(last)))
        })
    }

    fn rollback(&mut self, number: usize, site: SiteIndex, to: &PointRef) -> Result<String, StepFailure> {
        let PointRef::Bookmark(name) = to else {
            return Err("a rollback to `latest` changes nothing; roll back to a bookmark".into());
        };
        let (target, last) = {
            let b = self.bookmarks.get(name).ok_or_else(|| format!("no bookmark {name}"))?;
            (b.lineage.clone(), b.last)
        };
        self.quiesced(|d| {
            let api = d.api(site)?.clone();
            let job = api.post(&format!("{}/rollback", d.group_path()), &json!({ "to": to.api_text() }))?;
            let id = job.get("job").and_then(Value::as_u64).ok_or("the rollback answer names no job")?;
            let started = Instant::now();
            loop {
                let j = api.get(&format!("/v1/jobs/{id}"))?;
                match j.get("state").and_then(Value::as_str) {
                    Some("done") => break,
                    Some("failed") => {
                        return Err(format!(
                            "rollback job {id} failed: {}",
                            j.get("error").unwrap_or(&Value::Null)
                        )
                        .into())
                    }
                    _ if started.elapsed() > ROLLBACK_DEADLINE => {
                        return Err(format!(
                            "rollback job {id} still running after {} s",
                            ROLLBACK_DEADLINE.as_secs()
                        )
                        .into())
                    }
                    _ => std::thread::sleep(POLL),
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            let log = d.log();
            let must = Drill::last_acknowledged(&log, &target);
            let check = d.check_image(
                site,
                "latest",
                &format!("drill-rollback-{number}"),
                &target,
                Requirements { must_include: must, at_most: last },
            )?;
            let passed = check.passed();
            d.record_check(
                number,
                site,
                "latest",
                "a rollback equals the history at its point",
                &check,
                passed,
                format!(
                    "after the rollback to {name} (write {}) it holds writes through {}",
                    opt_id(last),
                    opt_id(check.cut)
                ),
            );
            let discarded = log
                .iter()
                .filter(|r| {
                    last.is_none_or(|l| r.id > l) && d.lineage.contains(r.id) && r.acknowledged().is_some()
                })
                .count() as u64;
            d.rolled_back += discarded;
            let next = WriteId(d.workload.last_issued().map_or(1, |w| w.0 + 1));
            let old = std::mem::replace(&mut d.lineage, target.continued_from(next));
            d.eras.push(Era { lineage: old, ended_step: number });
            Ok(format!("rolled back to {name} in {seconds:.2} s; {discarded} acknowledged writes undone"))
        })
    }

    fn image(
        &mut self,
        number: usize,
        site: SiteIndex,
        at: &PointRef,
        name: &str,
    ) -> Result<String, StepFailure> {
        let log = self.log();
        let (history, req, what) = match at {
            PointRef::Latest => {
                let req = self.copy_requirements(site, &log);
                (self.lineage.clone(), req, "a test-failover image is a prefix of the history".to_string())
            }
            PointRef::Bookmark(b) => {
                let bm = self.bookmarks.get(b).ok_or_else(|| format!("no bookmark {b}"))?;
                let must = Drill::last_acknowledged(&log, &bm.lineage);
                (
                    bm.lineage.clone(),
                    Requirements { must_include: must, at_most: bm.last },
                    format!("a test-failover image equals the history at {b}"),
                )
            }
        };
        let api = self.api(site)?.clone();
        api.post(
            "/v1/images",
            &json!({"group": self.sc.group, "at": at.api_text(), "name": name, "writable": true}),
        )?;
        let blocks = self.read_copy(site, Some(name))?;
        let mut check = self.check_blocks(&history, req, &blocks);
        let mut detail = format!(
            "image {name} at {} holds writes through {}, {} acknowledged writes behind",
            at.api_text(),
            opt_id(check.cut),
            check.missing_acknowledged.len()
        );
        if !check.consistent() && site != self.primary {
            if let Some(note) = self.try_eras(&mut check, &blocks) {
                detail.push_str(&note);
            }
        }
        let passed = check.passed();
        self.record_check(number, site, name, &what, &check, passed, detail.clone());

        // A test failover writes to its image: the writes must read back, and must never show
        // in the group (a later verify would find them).
        let volume = self.volumes.first().cloned().ok_or("no volume")?;
        let region = self.shape.region_blocks.first().copied().unwrap_or(1);
        let mut rng = SplitMix::new(self.sc.seed ^ (number as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let export = format!("{name}/{volume}");
        let nbd = self.pair.sites[site].ports.nbd;
        let mut client = Client::connect(nbd, &export).map_err(|e| format!("connect to {export}: {e}"))?;
        let block_bytes = u64::from(self.shape.block_bytes);
        let mut written = Vec::new();
        for k in 0..FAILOVER_BLOCKS.min(region) {
            let block = rng.below(region);
            let id = WriteId(IMAGE_WRITE_ID_BASE + number as u64 * 1000 + k);
            let data = encode_block(WRITE_MAGIC, self.sc.seed, id, 0, block, self.shape.block_bytes);
            client
                .write(block * block_bytes, &data)
                .map_err(|e| format!("test-failover write to {export}: {e}"))?;
            written.push((block, id));
        }
        client.flush().map_err(|e| format!("flush {export}: {e}"))?;
        let mut wrong = Vec::new();
        // Later writes win where two landed on one block.
        let mut last_by_block: BTreeMap<u64, WriteId> = BTreeMap::new();
        for (block, id) in &written {
            last_by_block.insert(*block, *id);
        }
        for (block, id) in &last_by_block {
            let data = client
                .read(block * block_bytes, self.shape.block_bytes)
                .map_err(|e| format!("read {export}: {e}"))?;
            if self.shape.decode(0, *block, &data) != BlockContent::Write(*id) {
                wrong.push(*block);
            }
        }
        client.disconnect();
        let ok = wrong.is_empty();
        self.checks.push(CheckRecord {
            step: number,
            site: self.name(site).into(),
            target: name.into(),
            check: "a test-failover image takes writes".into(),
            passed: ok,
            consistent: true,
            cut: None,
            writes_seen: last_by_block.len(),
            blocks: last_by_block.len() as u64,
            behind_writes: 0,
            problems: Vec::new(),
            problem_count: wrong.len(),
            detail: format!(
                "{} blocks written to {export}; {} read back wrong",
                last_by_block.len(),
                wrong.len()
            ),
        });
        if !ok {
            self.fail(
                number,
                &format!("image {name}"),
                "test-failover writes",
                format!("blocks {wrong:?} of {export} did not read back what was written"),
            );
        }
        Ok(detail)
    }

    fn wait_replicated(&mut self, number: usize, timeout: Duration) -> Result<String, StepFailure> {
        let primary = self.primary;
        let other = 1 - primary;
        let log = self.log();
        let mark = Drill::last_acknowledged(&log, &self.lineage);
        let api = self.api(primary)?.clone();
        let g = api.get(&self.group_path())?;
        let target = g.get("last_seq").and_then(Value::as_u64).unwrap_or(0);
        let started = Instant::now();
        loop {
            let g = api.get(&self.group_path())?;
            let state = g.pointer("/replication/state").and_then(Value::as_str).unwrap_or("none").to_string();
            let acked = g.pointer("/replication/acked_seq").and_then(Value::as_u64).unwrap_or(0);
            if !self.pair.sites[other].is_running() {
                return Err(format!(
                    "site {} is not running: there is nothing to replicate to",
                    self.name(other)
                )
                .into());
            }
            let role = self
                .api(other)?
                .get(&self.group_path())
                .ok()
                .and_then(|o| o.get("role").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| "none".into());
            if state == "streaming" && acked >= target && role == "secondary" {
                break;
            }
            if started.elapsed() > timeout {
                let error = g.pointer("/replication/last_error").and_then(Value::as_str).unwrap_or("none");
                return Err(StepFailure {
                    check: "wait replicated".into(),
                    reason: format!(
                        "not replicated within {} s: {} reports state {state}, acked seq {acked} of {target} (last error: {error}); {} reports role {role}",
                        timeout.as_secs(),
                        self.name(primary),
                        self.name(other)
                    ),
                });
            }
            if interrupted().is_some() {
                return Err(StepFailure::interrupted());
            }
            std::thread::sleep(POLL);
        }
        if mark.is_some() {
            self.replicated = mark.map(|m| (m, number));
        }
        Ok(format!("{} acked seq {target} in {:.1} s", self.name(other), started.elapsed().as_secs_f64()))
    }

    /// What a check of `site`'s newest copy must find beyond consistency.
    fn copy_requirements(&self, site: SiteIndex, log: &[WriteRecord]) -> Requirements {
        let mut must: Option<WriteId> = None;
        if site == self.primary {
            // Read-your-writes: everything acknowledged before the image is asked for.
            must = Drill::last_acknowledged(log, &self.lineage);
        } else if let Some((mark, _)) = self.replicated.filter(|(m, _)| self.lineage.contains(*m)) {
            must = Some(mark);
        }
        if let Some(swap) = self.swap_mark.filter(|m| self.lineage.contains(*m)) {
            must = must.max(Some(swap));
        }
        Requirements { must_include: must, at_most: None }
    }

    /// A secondary may still show the history a rollback replaced, until the rollback reaches
    /// it (and only if no `wait replicated` has passed since).
    fn try_eras(&self, check: &mut CopyCheck, blocks: &[Vec<BlockContent>]) -> Option<String> {
        let since = self.replicated.map_or(0, |(_, step)| step);
        for era in self.eras.iter().rev().filter(|e| e.ended_step > since) {
            let alt = self.check_blocks(&era.lineage, Requirements::default(), blocks);
            if alt.passed() {
                *check = alt;
                return Some(format!(
                    "; it shows the history before the rollback at step {} (not yet replicated)",
                    era.ended_step
                ));
            }
        }
        None
    }

    fn verify(&mut self, number: usize) -> Result<String, StepFailure> {
        let mut notes = Vec::new();
        for site in 0..2 {
            if !self.pair.sites[site].is_running() {
                notes.push(format!("{} not running", self.name(site)));
                continue;
            }
            let api = self.api(site)?.clone();
            let g = api.get(&self.group_path())?;
            let role = g.get("role").and_then(Value::as_str).unwrap_or("none").to_string();
            let state = g.get("state").and_then(Value::as_str).unwrap_or("none").to_string();
            let expected = if site == self.primary { "primary" } else { "secondary" };
            if role != expected || state != "ok" {
                let reason = g.get("state_reason").and_then(Value::as_str).unwrap_or("");
                self.fail(number, "verify", "roles", format!(
                    "site {} reports role {role}, state {state} {reason}; the drill expects role {expected}, state ok",
                    self.name(site)
                ));
            }
            let log = self.log();
            let req = self.copy_requirements(site, &log);
            let image = format!("drill-verify-{number}-{}", self.name(site));
            let mut check = self.check_image(site, "latest", &image, &self.lineage.clone(), req)?;
            let mut detail =
                format!("{} ({role}) holds writes through {}", self.name(site), opt_id(check.cut));
            if site != self.primary {
                detail
                    .push_str(&format!(", {} acknowledged writes behind", check.missing_acknowledged.len()));
            }
            if !check.consistent() && site != self.primary {
                let blocks = self.read_last.take().unwrap_or_default();
                if let Some(note) = self.try_eras(&mut check, &blocks) {
                    detail.push_str(&note);
                }
            }
            let passed = check.passed();
            let what = if site == self.primary {
                "the primary is consistent and holds every acknowledged write"
            } else {
                "the secondary is a consistent prefix holding every write known replicated"
            };
            self.record_check(number, site, "group", what, &check, passed, detail.clone());
            notes.push(detail);
            self.check_salvage(number, site, &api)?;
        }
        Ok(notes.join("; "))
    }

    /// The salvage image a failed-back site kept must hold its divergent tail: consistent with
    /// the superseded history and holding every write a flush made durable there.
    fn check_salvage(&mut self, number: usize, site: SiteIndex, api: &Api) -> Result<(), StepFailure> {
        let pending: Vec<usize> = self
            .superseded
            .iter()
            .enumerate()
            .filter(|(_, s)| s.site == site && !s.checked)
            .map(|(i, _)| i)
            .collect();
        if pending.is_empty() {
            return Ok(());
        }
        let images = api.get("/v1/images")?;
        // Salvage images of this group, by the fork point they keep the tail after.
        let salvage: Vec<(u64, String)> = images
            .as_array()
            .map(|list| {
                list.iter()
                    .filter(|i| i.get("mode").and_then(Value::as_str) == Some("salvage"))
                    .filter(|i| i.get("group").and_then(Value::as_str) == Some(self.sc.group.as_str()))
                    .filter_map(|i| {
                        let fork = i.pointer("/salvage/fork_seq").and_then(Value::as_u64)?;
                        Some((fork, i.get("name").and_then(Value::as_str)?.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let role = api.get(&self.group_path())?.get("role").and_then(Value::as_str).unwrap_or("").to_string();
        let primary_streaming =
            self.api(self.primary).and_then(|p| p.get(&self.group_path())).ok().is_some_and(|g| {
                g.pointer("/replication/state").and_then(Value::as_str) == Some("streaming")
            });
        for index in pending {
            let (lineage, durable_last, fork_seq, survivor_cut, step) = {
                let s = &self.superseded[index];
                (s.lineage.clone(), s.durable_last, s.fork_seq, s.survivor_cut, s.step)
            };
            let Some(name) = salvage.iter().find(|(fork, _)| *fork == fork_seq).map(|(_, n)| n.clone())
            else {
                // No tail kept. Only wrong once failback is over (secondary, and the new
                // primary streams to it), and only if the old primary had made durable writes
                // the new primary never received.
                if role == "secondary" && primary_streaming && durable_last > survivor_cut {
                    self.fail(number, "verify", "salvage", format!(
                        "site {} failed back after the takeover at step {step} (fork seq {fork_seq}) without a salvage image, yet it had made writes up to {} durable that the new primary never received (it ends at write {})",
                        self.name(site),
                        opt_id(durable_last),
                        opt_id(survivor_cut)
                    ));
                    self.superseded[index].checked = true;
                }
                continue;
            };
            let blocks = self.read_copy(site, Some(&name))?;
            let check = self.check_blocks(
                &lineage,
                Requirements { must_include: durable_last, at_most: None },
                &blocks,
            );
            let passed = check.passed();
            self.record_check(number, site, &name, "the salvage image keeps the lost primary's durable writes", &check, passed, format!(
                "salvage image {name} holds the superseded history through {}; writes durable there before it was lost: through {}",
                opt_id(check.cut),
                opt_id(durable_last)
            ));
            self.superseded[index].checked = true;
        }
        Ok(())
    }

    /// Damage blocks of the first volume through NBD, behind the workload's back: flip a byte
    /// in the middle of a block that holds data, or fill an empty one with 0xFF, as a bad write
    /// (a bug, ransomware, a wrong `dd`) would.
    fn corrupt(&mut self, number: usize, site: SiteIndex, blocks: u32) -> Result<String, StepFailure> {
        let volume = self.volumes.first().cloned().ok_or("no volume")?;
        let region = self.shape.region_blocks.first().copied().unwrap_or(1);
        let nbd = self.pair.sites[site].ports.nbd;
        let at = self.name(site).to_string();
        let mut client =
            Client::connect(nbd, &volume).map_err(|e| format!("connect to {volume} at {at}: {e}"))?;
        let mut rng = SplitMix::new(self.sc.seed ^ 0xBAD0_0000 ^ number as u64);
        let block_bytes = u64::from(self.shape.block_bytes);
        let mut damaged = std::collections::BTreeSet::new();
        while damaged.len() < (blocks as usize).min(region as usize) {
            let block = rng.below(region);
            if !damaged.insert(block) {
                continue;
            }
            let offset = block * block_bytes;
            let mut data = client
                .read(offset, self.shape.block_bytes)
                .map_err(|e| format!("read {volume} at {at}: {e}"))?;
            if data.iter().all(|&b| b == 0) {
                data.fill(0xFF);
            } else if let Some(byte) = data.get_mut(self.shape.block_bytes as usize / 2) {
                *byte ^= 0x01;
            }
            client.write(offset, &data).map_err(|e| format!("bad write to {volume} at {at}: {e}"))?;
        }
        client.flush().map_err(|e| format!("flush {volume}: {e}"))?;
        client.disconnect();
        let list: Vec<String> = damaged.iter().take(8).map(u64::to_string).collect();
        Ok(format!(
            "{} blocks of {volume} at {at} damaged (blocks {}{})",
            damaged.len(),
            list.join(", "),
            if damaged.len() > 8 { ", ..." } else { "" }
        ))
    }

    /// Create a read-only image at `at` on `site`, read it, delete it, and check it.
    fn check_image(
        &mut self,
        site: SiteIndex,
        at: &str,
        name: &str,
        history: &Lineage,
        req: Requirements,
    ) -> Result<CopyCheck, StepFailure> {
        let api = self.api(site)?.clone();
        api.post("/v1/images", &json!({"group": self.sc.group, "at": at, "name": name}))
            .map_err(|e| format!("create image {name} at {at} on {}: {e}", self.name(site)))?;
        let blocks = self.read_copy(site, Some(name));
        // The image pins journal space; it goes whatever the read did.
        let deleted = api.delete(&format!("/v1/images/{name}"));
        let blocks = blocks?;
        deleted.map_err(|e| format!("delete image {name}: {e}"))?;
        let check = self.check_blocks(history, req, &blocks);
        self.read_last = Some(blocks);
        Ok(check)
    }

    /// Check blocks against `history`, with the log as it is now: the copy was read after any
    /// write it can hold was logged as issued.
    fn check_blocks(&self, history: &Lineage, req: Requirements, blocks: &[Vec<BlockContent>]) -> CopyCheck {
        let log = self.log();
        let fate =
            |id: WriteId| log.get((id.0.saturating_sub(1)) as usize).map_or(Fate::Unknown, WriteRecord::fate);
        let issued_last = log.last().map(|r| r.id);
        check_copy(&self.shape, history, &fate, issued_last, &Copy { volumes: &self.volumes, blocks }, req)
    }

    /// Read every volume's region at `site`, from image `image`'s exports or the volumes'.
    fn read_copy(&self, site: SiteIndex, image: Option<&str>) -> Result<Vec<Vec<BlockContent>>, String> {
        let nbd = self.pair.sites[site].ports.nbd;
        let block_bytes = u64::from(self.shape.block_bytes);
        let mut out = Vec::new();
        for (v, volume) in self.volumes.iter().enumerate() {
            let export = image.map_or_else(|| volume.clone(), |i| format!("{i}/{volume}"));
            let mut client = Client::connect(nbd, &export)
                .map_err(|e| format!("connect to {export} at {}: {e}", self.name(site)))?;
            let region_blocks = self.shape.region_blocks.get(v).copied().unwrap_or(0);
            let per_read = (READ_CHUNK_BYTES / block_bytes).max(1);
            let mut blocks = Vec::with_capacity(region_blocks as usize);
            let mut block = 0;
            while block < region_blocks {
                let n = per_read.min(region_blocks - block);
                let data = client
                    .read(block * block_bytes, (n * block_bytes) as u32)
                    .map_err(|e| format!("read {export} at {}: {e}", self.name(site)))?;
                for (i, chunk) in data.chunks(block_bytes as usize).enumerate() {
                    blocks.push(self.shape.decode(v as u32, block + i as u64, chunk));
                }
                block += n;
            }
            client.disconnect();
            out.push(blocks);
        }
        Ok(out)
    }

    #[allow(clippy::too_many_arguments)]
    fn record_check(
        &mut self,
        step: usize,
        site: SiteIndex,
        target: &str,
        what: &str,
        check: &CopyCheck,
        passed: bool,
        detail: String,
    ) {
        let passed = passed && check.consistent();
        self.checks.push(CheckRecord {
            step,
            site: self.name(site).into(),
            target: target.into(),
            check: what.into(),
            passed,
            consistent: check.consistent(),
            cut: check.cut,
            writes_seen: check.writes_seen,
            blocks: check.blocks,
            behind_writes: check.missing_acknowledged.len(),
            problems: check.problems.clone(),
            problem_count: check.problem_count,
            detail: detail.clone(),
        });
        if !passed {
            let first = check
                .problems
                .iter()
                .find(|p| p.kind.is_inconsistency())
                .or(check.problems.first())
                .map(|p| p.text.clone())
                .unwrap_or(detail);
            let more = check.problem_count.saturating_sub(1);
            let reason = format!(
                "site {}, {target}: {first}{}",
                self.name(site),
                if more > 0 { format!(" (and {more} more findings)") } else { String::new() }
            );
            let text = self.sc.steps.get(step.wrapping_sub(1)).map_or("", |(t, _)| t.as_str()).to_string();
            let kind = if check.problems.iter().any(|p| p.kind.is_inconsistency()) {
                "consistency"
            } else if check.problems.iter().any(|p| p.kind == ProblemKind::Incomplete) {
                "completeness"
            } else {
                what
            };
            self.fail(step, &text, &format!("{what} ({kind})"), reason);
        }
    }

    fn finish(mut self, started: String) -> Report {
        // Rest the workload so its log is final.
        if let Err(e) = self.workload.quiesce(true, QUIESCE_DEADLINE) {
            let last = self.sc.steps.len();
            self.fail(last, "end", "workload", e);
        }
        let log = self.log();
        let mut role_changes = Vec::new();
        for pending in std::mem::take(&mut self.role_changes) {
            let mut rc = pending.record;
            let first = log
                .iter()
                .filter(|r| r.id >= pending.first_new_write && r.site == pending.new_site)
                .find_map(WriteRecord::acknowledged);
            match first {
                Some(t) => {
                    rc.first_write_seconds = Some(t);
                    rc.rto_seconds = Some(t - rc.outage_began_seconds);
                    rc.rto_basis = "outage start to the first write the new primary acknowledged";
                }
                None => {
                    rc.rto_seconds = Some(pending.command_done_seconds - rc.outage_began_seconds);
                    rc.rto_basis = "outage start to the end of the command (no write followed)";
                }
            }
            role_changes.push(rc);
        }
        let max = |v: &mut dyn Iterator<Item = f64>| {
            v.fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
        };
        let rpo = max(&mut role_changes.iter().map(|r| r.rpo_seconds));
        let rto = max(&mut role_changes.iter().filter_map(|r| r.rto_seconds));
        let lost: u64 = role_changes.iter().map(|r| r.lost_writes).sum();

        let expect = &self.sc.expect;
        let end = self.sc.steps.len() + 1;
        let mut limits = Vec::new();
        if let (Some(max), Some(v)) = (expect.rpo_seconds_max, rpo) {
            if v > max {
                limits
                    .push(("expect.rpo_seconds_max", format!("RPO {v:.3} s is above the expected {max} s")));
            }
        }
        if let (Some(max), Some(v)) = (expect.rto_seconds_max, rto) {
            if v > max {
                limits
                    .push(("expect.rto_seconds_max", format!("RTO {v:.3} s is above the expected {max} s")));
            }
        }
        if let Some(max) = expect.data_lost_writes_max {
            if lost > max {
                limits.push((
                    "expect.data_lost_writes_max",
                    format!("{lost} acknowledged writes lost, expected at most {max}"),
                ));
            }
        }
        for (check, reason) in limits {
            self.fail(end, "expect", check, reason);
        }

        let workload = summarize(&self.shape, &log, self.workload.flushes());
        let consistent = !self.checks.is_empty() && self.checks.iter().all(|c| c.consistent);
        let totals = self.pair.totals();
        let relays = self.pair.relay_stats().to_vec();
        let epoch = self.epoch;
        let Drill { sc, binary, pair, checks, failures, steps, rolled_back, workload: writer, .. } = self;
        drop(writer);
        let mut failures = failures;
        for error in pair.shutdown() {
            failures.push(Failure {
                step: end,
                step_text: "end".into(),
                check: "clean stop".into(),
                reason: error,
            });
        }
        Report {
            format: REPORT_FORMAT,
            scenario: scenario_summary(sc),
            tidemark_version: binary_version(&binary),
            started,
            seconds: epoch.elapsed().as_secs_f64(),
            passed: failures.is_empty(),
            failure: failures.first().cloned(),
            failures,
            consistent,
            rpo_seconds: rpo,
            rto_seconds: rto,
            data_lost_writes: lost,
            rolled_back_writes: rolled_back,
            workload,
            role_changes,
            checks,
            steps,
            link: LinkSummary { totals, relays },
            workdir: None,
        }
    }
}

/// RPO of a role change: from the acknowledgement of the oldest lost write to the outage start
/// (or to the newest lost write's acknowledgement, when a cut-off primary kept acknowledging).
fn rpo_of(log: &[WriteRecord], missing: &[WriteId], before: WriteId, outage_began: f64) -> f64 {
    let acks: Vec<f64> = missing
        .iter()
        .filter(|id| id.0 < before.0)
        .filter_map(|id| log.get((id.0 - 1) as usize).and_then(WriteRecord::acknowledged))
        .collect();
    let Some(oldest) = acks.iter().copied().reduce(f64::min) else { return 0.0 };
    let newest = acks.iter().copied().fold(outage_began, f64::max);
    (newest - oldest).max(0.0)
}

fn summarize(shape: &WorkloadShape, log: &[WriteRecord], flushes: u64) -> WorkloadSummary {
    let mut s = WorkloadSummary { flushes, ..WorkloadSummary::default() };
    let mut digest = blake3::Hasher::new();
    for r in log {
        let spec = shape.write(r.id);
        digest.update(&r.id.0.to_le_bytes());
        digest.update(&spec.volume.to_le_bytes());
        digest.update(&spec.block.to_le_bytes());
        digest.update(&spec.blocks.to_le_bytes());
        s.issued += 1;
        let fate = match (&r.outcome, r.volatile) {
            (Outcome::Acknowledged { .. }, false) => "ack",
            (Outcome::Acknowledged { .. }, true) => "ack-volatile",
            (Outcome::Refused { .. }, _) => "refused",
            (Outcome::Unanswered { .. }, _) => "unanswered",
            (Outcome::InFlight, _) => "in-flight",
        };
        match r.outcome {
            Outcome::Acknowledged { .. } => {
                s.acknowledged += 1;
                s.bytes_acknowledged += u64::from(spec.blocks) * u64::from(shape.block_bytes);
            }
            Outcome::Refused { .. } => s.refused += 1,
            Outcome::Unanswered { .. } | Outcome::InFlight => s.unanswered += 1,
        }
        if r.durable_seconds.is_some() {
            s.durable += 1;
        }
        s.log.push((r.id.0, spec.volume, spec.block, spec.blocks, r.site, fate));
    }
    s.digest = digest.finalize().to_hex().to_string();
    s
}

fn opt_id(id: Option<WriteId>) -> String {
    id.map_or_else(|| "none".into(), |w| w.0.to_string())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or("")
}
