//! Scenario files: a drill as data. A TOML file names the link, the seed, the group's volumes,
//! the workload and the steps; every error names the file and, for a step, its number and
//! text. `docs/drills.md` is the reference.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use simnet::{LinkSettings, Profile};

use crate::pattern::{Pattern, BLOCK_BYTES_MAX, BLOCK_BYTES_MIN};

/// Largest scenario file read, in bytes.
pub const SCENARIO_FILE_BYTES_MAX: u64 = 1 << 20;
/// Most steps in a scenario.
pub const STEPS_MAX: usize = 1000;
/// Most volumes in a scenario's group.
pub const VOLUMES_MAX: usize = 16;
/// Largest region the workload writes to and the checker reads, per volume, in bytes.
pub const REGION_BYTES_MAX: u64 = 1 << 30;
/// Highest workload rate, in writes per second.
pub const RATE_PER_SECOND_MAX: f64 = 10_000.0;
/// Longest `sleep` or `workload run`, and timeout of `wait replicated`.
pub const STEP_SECONDS_MAX: u64 = 3600;
/// `wait replicated` without a timeout waits this long.
pub const WAIT_REPLICATED_DEFAULT: Duration = Duration::from_secs(120);

/// Why a scenario cannot be run.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The file is not valid TOML for a scenario.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the line where TOML knows it.
        message: String,
    },
    /// A step is wrong.
    #[error("{path}: step {number} (`{text}`): {message}")]
    Step {
        /// The file.
        path: PathBuf,
        /// The step's number, from 1.
        number: usize,
        /// The step as written.
        text: String,
        /// What is wrong with it.
        message: String,
    },
}

/// One of the two sites, by index: 0 starts as the primary.
pub type SiteIndex = usize;

/// A point a step refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointRef {
    /// The newest point.
    Latest,
    /// A bookmark the scenario made earlier.
    Bookmark(String),
}

impl PointRef {
    /// The point as the API takes it.
    pub fn api_text(&self) -> String {
        match self {
            PointRef::Latest => "latest".into(),
            PointRef::Bookmark(name) => format!("bookmark:{name}"),
        }
    }
}

/// Which way a partition cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Both ways.
    Both,
    /// Only what this site sends to the other.
    From(SiteIndex),
}

/// One step of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Start the workload on the primary; it runs until `workload stop`.
    WorkloadStart,
    /// Stop it (after a flush).
    WorkloadStop,
    /// Issue the writes of this many seconds at the workload's rate, then stop.
    WorkloadRun(Duration),
    /// Change the link's settings to a profile or a `[links.NAME]` table.
    Link {
        /// The name written.
        name: String,
        /// The settings, from site A's point of view (a_to_b is from the first site).
        settings: Box<LinkSettings>,
    },
    /// Cut the link.
    Partition(Cut),
    /// Heal every cut.
    Heal,
    /// Kill a site's process with SIGKILL.
    Kill(SiteIndex),
    /// Stop a site cleanly (SIGTERM).
    Stop(SiteIndex),
    /// Start a stopped or killed site again, on its ports and data.
    Start(SiteIndex),
    /// A planned swap, asked at this site (default: the primary).
    Swap(Option<SiteIndex>),
    /// A takeover at this site.
    Takeover {
        /// The site that takes over.
        site: SiteIndex,
        /// The point it takes over at.
        at: PointRef,
        /// Take over even though the primary answers.
        force: bool,
    },
    /// Quiesce the workload and bookmark the primary.
    Bookmark(String),
    /// Roll the group back at this site (the primary) to a point.
    Rollback {
        /// The site.
        site: SiteIndex,
        /// The point.
        to: PointRef,
    },
    /// Create a writable test-failover image and check it.
    Image {
        /// The site.
        site: SiteIndex,
        /// The point.
        at: PointRef,
        /// The image's name (default `drill-image-STEP`).
        name: Option<String>,
    },
    /// Wait until everything written before the step is durable at the secondary.
    WaitReplicated(Duration),
    /// Check every copy.
    Verify,
    /// Do nothing for a while.
    Sleep(Duration),
    /// Write blocks of foreign data to the group's first volume at this site.
    Corrupt {
        /// The site.
        site: SiteIndex,
        /// How many blocks.
        blocks: u32,
    },
}

/// One volume of the group.
#[derive(Debug, Clone, PartialEq)]
pub struct VolumeSpec {
    /// Its name (and NBD export).
    pub name: String,
    /// Its size in bytes.
    pub size_bytes: u64,
    /// Bytes from its start the workload writes to.
    pub region_bytes: u64,
}

/// The workload's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadSpec {
    /// Where writes go.
    pub pattern: Pattern,
    /// Bytes per block.
    pub block_bytes: u32,
    /// Most blocks per write.
    pub blocks_per_write_max: u32,
    /// Writes per second.
    pub rate_per_second: f64,
    /// A flush after this many writes.
    pub flush_every: u32,
}

/// Limits a drill's measurements must meet.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectations {
    /// Largest acceptable RPO, in seconds.
    pub rpo_seconds_max: Option<f64>,
    /// Largest acceptable RTO, in seconds.
    pub rto_seconds_max: Option<f64>,
    /// Most acknowledged writes a role change may lose.
    pub data_lost_writes_max: Option<u64>,
}

/// A parsed, checked scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// The file it came from.
    pub path: PathBuf,
    /// Its name.
    pub name: String,
    /// What it exercises.
    pub description: String,
    /// Seed of the workload and of the link's random draws.
    pub seed: u64,
    /// The two sites' names; the first starts as the primary.
    pub sites: [String; 2],
    /// The name of the link at start.
    pub link_name: String,
    /// The link at start, from the first site's point of view.
    pub link: LinkSettings,
    /// The group's name.
    pub group: String,
    /// Its volumes.
    pub volumes: Vec<VolumeSpec>,
    /// The workload.
    pub workload: WorkloadSpec,
    /// The steps, in order, with their text.
    pub steps: Vec<(String, Step)>,
    /// Limits on the measurements.
    pub expect: Expectations,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScenarioFile {
    name: String,
    #[serde(default)]
    description: String,
    seed: u64,
    link: String,
    #[serde(default)]
    sites: Option<[String; 2]>,
    steps: Vec<String>,
    #[serde(default)]
    group: GroupFile,
    workload: WorkloadFile,
    #[serde(default)]
    links: BTreeMap<String, LinkSettings>,
    #[serde(default)]
    expect: Expectations,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    #[serde(default = "default_group")]
    name: String,
    #[serde(default = "default_volumes")]
    volumes: Vec<VolumeFile>,
}

impl Default for GroupFile {
    fn default() -> GroupFile {
        GroupFile { name: default_group(), volumes: default_volumes() }
    }
}

fn default_group() -> String {
    "drill".into()
}

fn default_volumes() -> Vec<VolumeFile> {
    vec![VolumeFile { name: "data".into(), size: "64MiB".into(), region: None }]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VolumeFile {
    name: String,
    size: String,
    #[serde(default)]
    region: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkloadFile {
    #[serde(default = "default_pattern")]
    pattern: Pattern,
    #[serde(default = "default_block_size")]
    block_size: String,
    #[serde(default = "default_one")]
    blocks_per_write_max: u32,
    rate: f64,
    #[serde(default = "default_flush_every")]
    flush_every: u32,
}

fn default_pattern() -> Pattern {
    Pattern::Random
}
fn default_block_size() -> String {
    "4KiB".into()
}
fn default_one() -> u32 {
    1
}
fn default_flush_every() -> u32 {
    8
}

impl Scenario {
    /// Read and check a scenario file.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let read = |source| ScenarioError::Read { path: path.to_path_buf(), source };
        let len = std::fs::metadata(path).map_err(read)?.len();
        if len > SCENARIO_FILE_BYTES_MAX {
            return Err(ScenarioError::Invalid {
                path: path.into(),
                message: format!("is {len} bytes; a scenario is at most {SCENARIO_FILE_BYTES_MAX}"),
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Scenario::parse(path, &text)
    }

    /// Check a scenario's text; `path` names it in errors and anchors relative profile paths.
    pub fn parse(path: &Path, text: &str) -> Result<Scenario, ScenarioError> {
        let invalid = |message: String| ScenarioError::Invalid { path: path.to_path_buf(), message };
        let file: ScenarioFile =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim_end().to_string()))?;
        if file.name.trim().is_empty() {
            return Err(invalid("`name` is empty: give the drill a name an auditor will recognise".into()));
        }
        let sites = file.sites.clone().unwrap_or_else(|| ["a".to_string(), "b".to_string()]);
        for site in &sites {
            if !valid_name(site) {
                return Err(invalid(format!("site name {site:?}: use 1-64 of A-Z a-z 0-9 . _ -")));
            }
        }
        if sites[0] == sites[1] {
            return Err(invalid(format!("the two sites are both called {:?}", sites[0])));
        }
        if !valid_name(&file.group.name) {
            return Err(invalid(format!("group name {:?}: use 1-64 of A-Z a-z 0-9 . _ -", file.group.name)));
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let link = resolve_link(&file.link, &file.links, base).map_err(|e| invalid(format!("link: {e}")))?;

        let block_bytes = parse_size(&file.workload.block_size)
            .map_err(|e| invalid(format!("workload.block_size: {e}")))?;
        if !(u64::from(BLOCK_BYTES_MIN)..=u64::from(BLOCK_BYTES_MAX)).contains(&block_bytes)
            || block_bytes % 512 != 0
        {
            return Err(invalid(format!(
                "workload.block_size: {block_bytes} bytes; use a multiple of 512 from {BLOCK_BYTES_MIN} to {BLOCK_BYTES_MAX}"
            )));
        }
        let rate = file.workload.rate;
        if !(rate > 0.0 && rate <= RATE_PER_SECOND_MAX) {
            return Err(invalid(format!(
                "workload.rate: {rate}; use a number of writes per second in (0, {RATE_PER_SECOND_MAX}]"
            )));
        }
        if file.workload.blocks_per_write_max == 0 || file.workload.blocks_per_write_max > 256 {
            return Err(invalid("workload.blocks_per_write_max: use 1 to 256".into()));
        }
        if file.workload.flush_every == 0 {
            return Err(invalid("workload.flush_every: use 1 or more writes".into()));
        }
        let workload = WorkloadSpec {
            pattern: file.workload.pattern,
            block_bytes: block_bytes as u32,
            blocks_per_write_max: file.workload.blocks_per_write_max,
            rate_per_second: rate,
            flush_every: file.workload.flush_every,
        };

        if file.group.volumes.is_empty() || file.group.volumes.len() > VOLUMES_MAX {
            return Err(invalid(format!("group.volumes: give 1 to {VOLUMES_MAX} volumes")));
        }
        let mut volumes = Vec::new();
        let mut seen = BTreeSet::new();
        for v in &file.group.volumes {
            if !valid_name(&v.name) || !seen.insert(v.name.clone()) {
                return Err(invalid(format!(
                    "volume name {:?}: a unique name of 1-64 of A-Z a-z 0-9 . _ -",
                    v.name
                )));
            }
            let size_bytes =
                parse_size(&v.size).map_err(|e| invalid(format!("volume {}: size: {e}", v.name)))?;
            let region_bytes = match &v.region {
                Some(r) => parse_size(r).map_err(|e| invalid(format!("volume {}: region: {e}", v.name)))?,
                None => size_bytes.min(REGION_BYTES_MAX),
            };
            let min_region = block_bytes * u64::from(workload.blocks_per_write_max);
            if region_bytes > size_bytes || region_bytes > REGION_BYTES_MAX || region_bytes < min_region {
                return Err(invalid(format!(
                    "volume {}: region of {region_bytes} bytes; it must hold one write ({min_region} bytes), fit the volume and be at most {REGION_BYTES_MAX}",
                    v.name
                )));
            }
            if size_bytes % 4096 != 0 || region_bytes % block_bytes != 0 {
                return Err(invalid(format!(
                    "volume {}: size must be a multiple of 4 KiB and the region of the block size",
                    v.name
                )));
            }
            volumes.push(VolumeSpec { name: v.name.clone(), size_bytes, region_bytes });
        }

        if file.steps.len() > STEPS_MAX {
            return Err(invalid(format!("{} steps; at most {STEPS_MAX}", file.steps.len())));
        }
        let mut steps = Vec::new();
        let mut state = StaticState {
            running: [true, true],
            workload: false,
            bookmarks: BTreeSet::new(),
            images: BTreeSet::new(),
        };
        for (index, text) in file.steps.iter().enumerate() {
            let step_error = |message: String| ScenarioError::Step {
                path: path.to_path_buf(),
                number: index + 1,
                text: text.clone(),
                message,
            };
            let step = parse_step(text, &sites, &file.links, base).map_err(step_error)?;
            state.admit(&step, index + 1, &sites).map_err(step_error)?;
            steps.push((text.trim().to_string(), step));
        }
        if !steps.iter().any(|(_, s)| *s == Step::Verify) {
            return Err(invalid("no `verify` step: a drill that checks nothing proves nothing".into()));
        }
        Ok(Scenario {
            path: path.to_path_buf(),
            name: file.name,
            description: file.description,
            seed: file.seed,
            sites,
            link_name: file.link,
            link,
            group: file.group.name,
            volumes,
            workload,
            steps,
            expect: file.expect,
        })
    }
}

/// What the steps so far have done, to refuse a step that cannot work before anything runs.
struct StaticState {
    running: [bool; 2],
    workload: bool,
    bookmarks: BTreeSet<String>,
    images: BTreeSet<String>,
}

impl StaticState {
    fn admit(&mut self, step: &Step, number: usize, sites: &[String; 2]) -> Result<(), String> {
        let name = |site: SiteIndex| sites.get(site).cloned().unwrap_or_default();
        let point = |p: &PointRef, bookmarks: &BTreeSet<String>| match p {
            PointRef::Bookmark(b) if !bookmarks.contains(b) => {
                Err(format!("no earlier step makes bookmark {b:?}"))
            }
            _ => Ok(()),
        };
        let running = |site: SiteIndex, running: &[bool; 2]| {
            if running.get(site).copied().unwrap_or(false) {
                Ok(())
            } else {
                Err(format!("site {} is not running at this step (`start {}` first)", name(site), name(site)))
            }
        };
        match step {
            Step::WorkloadStart | Step::WorkloadRun(_) if self.workload => {
                return Err("the workload is already running".into())
            }
            Step::WorkloadStart => self.workload = true,
            Step::WorkloadStop if !self.workload => return Err("the workload is not running".into()),
            Step::WorkloadStop => self.workload = false,
            Step::Kill(site) | Step::Stop(site) => {
                running(*site, &self.running)?;
                self.running[*site] = false;
            }
            Step::Start(site) => {
                if self.running[*site] {
                    return Err(format!("site {} is already running", name(*site)));
                }
                self.running[*site] = true;
            }
            Step::Takeover { site, at, .. } => {
                running(*site, &self.running)?;
                point(at, &self.bookmarks)?;
            }
            Step::Swap(Some(site)) => running(*site, &self.running)?,
            Step::Bookmark(b) if !self.bookmarks.insert(b.clone()) => {
                return Err(format!("bookmark {b:?} is made twice"))
            }
            Step::Rollback { site, to } => {
                running(*site, &self.running)?;
                point(to, &self.bookmarks)?;
            }
            Step::Image { site, at, name: image } => {
                running(*site, &self.running)?;
                point(at, &self.bookmarks)?;
                let image = image.clone().unwrap_or_else(|| format!("drill-image-{number}"));
                if !valid_name(&image) || !self.images.insert(image.clone()) {
                    return Err(format!("image name {image:?} is invalid or used twice"));
                }
            }
            Step::Corrupt { site, .. } => running(*site, &self.running)?,
            _ => {}
        }
        Ok(())
    }
}

fn parse_step(
    text: &str,
    sites: &[String; 2],
    links: &BTreeMap<String, LinkSettings>,
    base: &Path,
) -> Result<Step, String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    let site = |word: Option<&&str>| -> Result<SiteIndex, String> {
        let word = word.ok_or_else(|| format!("name a site: {} or {}", sites[0], sites[1]))?;
        sites
            .iter()
            .position(|s| s == word)
            .ok_or_else(|| format!("unknown site {word:?}; the sites are {} and {}", sites[0], sites[1]))
    };
    let duration = |word: Option<&&str>| -> Result<Duration, String> {
        let word = word.ok_or("give a duration, such as 10s or 500ms")?;
        let d = humantime::parse_duration(word).map_err(|e| format!("duration {word:?}: {e}"))?;
        if d > Duration::from_secs(STEP_SECONDS_MAX) {
            return Err(format!("duration {word:?} is over {STEP_SECONDS_MAX} s"));
        }
        Ok(d)
    };
    let point = |word: Option<&&str>| -> Result<PointRef, String> {
        match word {
            Some(&"latest") => Ok(PointRef::Latest),
            Some(w) => match w.strip_prefix("bookmark:") {
                Some(name) if valid_name(name) => Ok(PointRef::Bookmark(name.to_string())),
                _ => Err(format!(
                    "point {w:?}: use `latest` or `bookmark:NAME` (points the checker knows exactly)"
                )),
            },
            None => Err("give a point: `latest` or `bookmark:NAME`".into()),
        }
    };
    let end = |rest: &[&str]| -> Result<(), String> {
        match rest.first() {
            None => Ok(()),
            Some(extra) => Err(format!("unexpected {extra:?}")),
        }
    };
    let Some((&verb, args)) = words.split_first() else { return Err("empty step".into()) };
    let step = match verb {
        "workload" => match args {
            ["start"] => Step::WorkloadStart,
            ["stop"] => Step::WorkloadStop,
            ["run", d] => Step::WorkloadRun(duration(Some(d))?),
            _ => return Err("use `workload start`, `workload stop` or `workload run DURATION`".into()),
        },
        "link" => {
            let [name] = args else { return Err("use `link NAME`: a profile, or a [links.NAME] table".into()) };
            Step::Link { name: name.to_string(), settings: Box::new(resolve_link(name, links, base)?) }
        }
        "partition" => match args {
            [] | ["both"] => Step::Partition(Cut::Both),
            [way] => {
                let (from, to) = way.split_once("->").ok_or_else(|| {
                    format!("use `partition`, or `partition {}->{}` for one way", sites[0], sites[1])
                })?;
                let (from, to) = (site(Some(&from))?, site(Some(&to))?);
                if from == to {
                    return Err("a one-way partition goes from one site to the other".into());
                }
                Step::Partition(Cut::From(from))
            }
            _ => return Err("use `partition` or `partition A->B`".into()),
        },
        "heal" => {
            end(args)?;
            Step::Heal
        }
        "kill" | "stop" | "start" => {
            let s = site(args.first())?;
            end(args.get(1..).unwrap_or(&[]))?;
            match verb {
                "kill" => Step::Kill(s),
                "stop" => Step::Stop(s),
                _ => Step::Start(s),
            }
        }
        "swap" => match args {
            [] => Step::Swap(None),
            [s] => Step::Swap(Some(site(Some(s))?)),
            _ => return Err("use `swap` or `swap SITE` (the site that asks)".into()),
        },
        "takeover" => {
            let s = site(args.first())?;
            let mut at = PointRef::Latest;
            let mut force = false;
            let mut rest = args.get(1..).unwrap_or(&[]);
            while let Some((&word, tail)) = rest.split_first() {
                match word {
                    "at" => {
                        at = point(tail.first())?;
                        rest = tail.get(1..).unwrap_or(&[]);
                    }
                    "force" => {
                        force = true;
                        rest = tail;
                    }
                    other => return Err(format!("unexpected {other:?}: use `takeover SITE [at POINT] [force]`")),
                }
            }
            Step::Takeover { site: s, at, force }
        }
        "bookmark" => match args {
            [name] if valid_name(name) => Step::Bookmark(name.to_string()),
            _ => return Err("use `bookmark NAME` (1-64 of A-Z a-z 0-9 . _ -)".into()),
        },
        "rollback" => match args {
            [s, "to", p] => Step::Rollback { site: site(Some(s))?, to: point(Some(p))? },
            _ => return Err("use `rollback SITE to POINT`".into()),
        },
        "image" => match args {
            [s, "at", p] => Step::Image { site: site(Some(s))?, at: point(Some(p))?, name: None },
            [s, "at", p, "as", name] => {
                Step::Image { site: site(Some(s))?, at: point(Some(p))?, name: Some(name.to_string()) }
            }
            _ => return Err("use `image SITE at POINT [as NAME]`".into()),
        },
        "wait" => match args {
            ["replicated"] => Step::WaitReplicated(WAIT_REPLICATED_DEFAULT),
            ["replicated", d] => Step::WaitReplicated(duration(Some(d))?),
            _ => return Err("use `wait replicated [TIMEOUT]`".into()),
        },
        "verify" => {
            end(args)?;
            Step::Verify
        }
        "sleep" => {
            let [d] = args else { return Err("use `sleep DURATION`".into()) };
            Step::Sleep(duration(Some(d))?)
        }
        "corrupt" => match args {
            [s] => Step::Corrupt { site: site(Some(s))?, blocks: 1 },
            [s, n] => {
                let blocks: u32 = n.parse().map_err(|_| format!("block count {n:?} is not a number"))?;
                if blocks == 0 || blocks > 4096 {
                    return Err("corrupt 1 to 4096 blocks".into());
                }
                Step::Corrupt { site: site(Some(s))?, blocks }
            }
            _ => return Err("use `corrupt SITE [BLOCKS]`".into()),
        },
        other => {
            return Err(format!(
                "unknown step {other:?}; steps are workload, link, partition, heal, kill, stop, start, swap, takeover, bookmark, rollback, image, wait, verify, sleep, corrupt"
            ))
        }
    };
    Ok(step)
}

/// A link by name: a `[links.NAME]` table of the scenario, a built-in profile, or a profile file
/// (relative to the scenario's directory).
fn resolve_link(
    name: &str,
    links: &BTreeMap<String, LinkSettings>,
    base: &Path,
) -> Result<LinkSettings, String> {
    if let Some(settings) = links.get(name) {
        return Ok(settings.clone());
    }
    if let Some(profile) = Profile::built_in(name) {
        return profile.map(|p| p.settings).map_err(|e| e.to_string());
    }
    if name.contains('/') || name.ends_with(".toml") {
        return Profile::from_path(&base.join(name)).map(|p| p.settings).map_err(|e| e.to_string());
    }
    let mut known: Vec<String> = links.keys().cloned().collect();
    known.extend(Profile::names().iter().map(|s| s.to_string()));
    Err(format!(
        "no link {name:?}: give a [links.{name}] table, a profile file, or one of {}",
        known.join(", ")
    ))
}

fn parse_size(text: &str) -> Result<u64, String> {
    parse_size::parse_size(text.trim()).map_err(|e| format!("{text:?} is not a size ({e}); write e.g. 64MiB"))
}

/// Names the API accepts: 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "t"
seed = 5
link = "slow"
steps = ["workload start", "sleep 2s", "bookmark b1", "partition a->b", "heal", "kill a",
         "takeover b at bookmark:b1", "start a", "wait replicated 30s", "link wan",
         "image b at latest as check", "workload stop", "verify"]
[group]
name = "g"
volumes = [{ name = "v", size = "16MiB", region = "4MiB" }, { name = "w", size = "8MiB" }]
[workload]
rate = 100
blocks_per_write_max = 2
[links.slow]
both = { rtt = "300ms", rate = "10Mbit/s" }
"#;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse(Path::new("s.toml"), text)
    }

    #[test]
    fn a_full_scenario_parses() {
        let s = parse(GOOD).expect("parse");
        assert_eq!(s.steps.len(), 13);
        assert_eq!(s.steps[3].1, Step::Partition(Cut::From(0)));
        assert_eq!(
            s.steps[6].1,
            Step::Takeover { site: 1, at: PointRef::Bookmark("b1".into()), force: false }
        );
        assert_eq!(s.volumes[0].region_bytes, 4 << 20);
        assert_eq!(s.volumes[1].region_bytes, 8 << 20);
        assert_eq!(s.link.a_to_b.delay, Duration::from_millis(150));
        assert_eq!(s.workload.block_bytes, 4096);
    }

    #[test]
    fn errors_name_the_file_the_step_and_the_fix() {
        let bad_step = GOOD.replace("\"kill a\"", "\"kill c\"");
        let e = parse(&bad_step).expect_err("unknown site").to_string();
        assert!(e.starts_with("s.toml: step 6 (`kill c`): unknown site \"c\""), "{e}");
        let e = parse(&GOOD.replace("bookmark:b1", "bookmark:nope")).expect_err("bookmark").to_string();
        assert!(e.contains("step 7") && e.contains("no earlier step makes bookmark"), "{e}");
        let e = parse(&GOOD.replace("\"start a\"", "\"kill a\"")).expect_err("not running").to_string();
        assert!(e.contains("step 8") && e.contains("not running"), "{e}");
        let e = parse(&GOOD.replace("rate = 100", "rate = 100\nspeed = 3")).expect_err("unknown").to_string();
        assert!(e.contains("s.toml") && e.contains("speed"), "{e}");
        let e = parse(&GOOD.replace(", \"verify\"", "")).expect_err("no verify").to_string();
        assert!(e.contains("no `verify` step"), "{e}");
        let e = parse(&GOOD.replace("link = \"slow\"", "link = \"moon\"")).expect_err("link").to_string();
        assert!(e.contains("no link \"moon\"") && e.contains("wan"), "{e}");
        let e = parse(&GOOD.replace("\"heal\"", "\"heal now\"")).expect_err("extra").to_string();
        assert!(e.contains("step 5") && e.contains("unexpected \"now\""), "{e}");
    }
}
