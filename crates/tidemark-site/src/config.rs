//! The site's configuration: a TOML file over embedded defaults, then command-line flags over both.
//!
//! No file is needed: every key has a default. A file that is there must be entirely right:
//! unknown keys, bad addresses, sizes or durations stop the site at start with the file, the
//! key and the reason (`config/site-a.toml: key nbd.listen: invalid socket address "x"`),
//! because a typo that silently falls back to a default is worse than not starting.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{Deserializer, Error as _};
use serde::Deserialize;
use tidemark_engine::GroupOptions;

use crate::names::validate_name;
use crate::units::{ByteSize, HumanDuration};

/// Largest config file read, in bytes; anything bigger is surely not a config file.
pub const CONFIG_FILE_BYTES_MAX: u64 = 1 << 20;
/// Site name used when none is configured and the host name is not a valid name.
pub const SITE_NAME_FALLBACK: &str = "site";

/// Largest NBD request payload a site may be configured to accept, in bytes.
pub const NBD_PAYLOAD_BYTES_CEILING: u64 = 256 << 20;
/// Smallest NBD request payload limit, in bytes: the NBD server's own floor (the largest
/// preferred block size).
pub const NBD_PAYLOAD_BYTES_FLOOR: u64 = *tidemark_nbd::PAYLOAD_BYTES_MAX_RANGE.start() as u64;
/// Smallest per-connection in-flight payload limit, in bytes.
pub const NBD_INFLIGHT_BYTES_FLOOR: u64 = 64 << 10;
/// Largest per-connection in-flight payload limit, in bytes.
pub const NBD_INFLIGHT_BYTES_CEILING: u64 = 1 << 30;
/// Largest API request body limit a site may be configured with, in bytes.
pub const API_BODY_BYTES_CEILING: u64 = 16 << 20;
/// Smallest event log rotation size, in bytes.
pub const EVENTS_FILE_BYTES_FLOOR: u64 = 64 << 10;

/// A whole site configuration, with every default filled in.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[site]`: identity and storage.
    pub site: SiteConfig,
    /// `[nbd]`: the NBD listener hosts attach to.
    pub nbd: NbdConfig,
    /// `[api]`: the HTTP/JSON management listener.
    pub api: ApiConfig,
    /// `[limits]`: named bounds on what the site accepts.
    pub limits: Limits,
    /// `[defaults]`: values for objects created without them.
    pub defaults: Defaults,
    /// `[replication]`: the QUIC link to partner sites.
    pub replication: ReplicationSection,
    /// `[metrics]`: the Prometheus endpoint.
    pub metrics: MetricsConfig,
}

/// `[metrics]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus text endpoint (`GET /metrics`, no token). Default
    /// `127.0.0.1:9600`.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: SocketAddr::from(([127, 0, 0, 1], 9600)) }
    }
}

/// `[replication]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationSection {
    /// UDP address of the replication link. Default `0.0.0.0:7601`.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// Bandwidth of the link to partners, in megabits per second; sizes QUIC windows and
    /// socket buffers (with the RTT) so a long fat link can be filled. Default 1000.
    pub link_mbit_per_second: u64,
    /// Round-trip time of the link to partners (`"50ms"`). Default 50 ms.
    #[serde(deserialize_with = "duration")]
    pub link_rtt: Duration,
    /// zstd level of batch payloads: 1 to 19, or `"auto"` (the default), which picks by
    /// `link_mbit_per_second` (see [`ZstdLevel::resolve`]).
    pub zstd_level: ZstdLevel,
    /// Congestion control of the link: `"bbr"` (default: keeps a lossy WAN full) or `"cubic"`
    /// (yields to other traffic as TCP does).
    pub congestion: Congestion,
}

/// `replication.zstd_level`: a level, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ZstdLevel {
    /// Pick by the link's speed.
    Auto,
    /// This level.
    Level(i32),
}

impl ZstdLevel {
    /// The level to use on a link of `mbit` megabits per second. `auto` takes the highest level
    /// whose single-core compression speed (zstd's own benchmarks, rounded down) is at least
    /// four times the link's rate, so compression never limits the link and a slow link gets
    /// the most out of its bytes: 1 from 800 Mbit/s (about 500 MB/s), 3 from 200 (about
    /// 300 MB/s), 6 from 50 (about 100 MB/s), 9 from 10 (about 60 MB/s), else 12.
    pub fn resolve(self, mbit: u64) -> i32 {
        match self {
            ZstdLevel::Level(level) => level,
            ZstdLevel::Auto => match mbit {
                800.. => 1,
                200..=799 => 3,
                50..=199 => 6,
                10..=49 => 9,
                _ => 12,
            },
        }
    }
}

impl<'de> Deserialize<'de> for ZstdLevel {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Level(i64),
            Name(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Level(level) => i32::try_from(level)
                .map(ZstdLevel::Level)
                .map_err(|_| serde::de::Error::custom(format!("{level} is outside 1..=19"))),
            Raw::Name(name) if name == "auto" => Ok(ZstdLevel::Auto),
            Raw::Name(name) => {
                Err(serde::de::Error::custom(format!("{name:?} is neither a level (1 to 19) nor \"auto\"")))
            }
        }
    }
}

/// `replication.congestion`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Congestion {
    /// BBR.
    Bbr,
    /// Cubic.
    Cubic,
}

impl From<Congestion> for tidemark_link::CongestionControl {
    fn from(c: Congestion) -> Self {
        match c {
            Congestion::Bbr => tidemark_link::CongestionControl::Bbr,
            Congestion::Cubic => tidemark_link::CongestionControl::Cubic,
        }
    }
}

impl Default for ReplicationSection {
    fn default() -> Self {
        ReplicationSection {
            listen: SocketAddr::from(([0, 0, 0, 0], 7601)),
            link_mbit_per_second: 1000,
            link_rtt: Duration::from_millis(50),
            zstd_level: ZstdLevel::Auto,
            congestion: Congestion::Bbr,
        }
    }
}

/// `[site]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SiteConfig {
    /// The site's name, shown in status and events. Default: the host name, or `site`.
    pub name: String,
    /// Where the journal, catalog, API token and event log live. Relative paths are relative
    /// to the working directory. Default: `./tidemark-data`.
    pub data_dir: PathBuf,
}

impl Default for SiteConfig {
    fn default() -> Self {
        SiteConfig { name: default_site_name(), data_dir: PathBuf::from("tidemark-data") }
    }
}

/// `[nbd]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NbdConfig {
    /// Address the NBD server listens on. Default `127.0.0.1:10809`.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig { listen: SocketAddr::from(([127, 0, 0, 1], 10809)) }
    }
}

/// `[api]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Address the management API listens on. Default `127.0.0.1:7600`.
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig { listen: SocketAddr::from(([127, 0, 0, 1], 7600)) }
    }
}

/// `[limits]`: what the site accepts at most. Sizes take a number of bytes or `"32MiB"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest NBD read or write payload, in bytes (larger requests get EINVAL/EOVERFLOW).
    #[serde(deserialize_with = "size_bytes")]
    pub nbd_payload_bytes_max: u64,
    /// Most NBD connections open at once; further connections are refused.
    pub nbd_connections_max: usize,
    /// Most NBD requests in flight per connection; the server stops reading until one finishes.
    pub nbd_inflight_requests_max: usize,
    /// Most read and write payload bytes in flight per connection, in bytes; a larger single
    /// request runs alone.
    #[serde(deserialize_with = "size_bytes")]
    pub nbd_inflight_bytes_max: u64,
    /// Largest API request body, in bytes (larger bodies get 413).
    #[serde(deserialize_with = "size_bytes")]
    pub api_body_bytes_max: u64,
    /// Finished API jobs kept for `GET /v1/jobs/{id}`; the oldest are forgotten first.
    pub api_jobs_finished_max: usize,
    /// Size at which `events.jsonl` is rotated to `events.jsonl.1`, in bytes.
    #[serde(deserialize_with = "size_bytes")]
    pub events_file_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nbd_payload_bytes_max: 32 << 20,
            nbd_connections_max: 128,
            nbd_inflight_requests_max: 64,
            nbd_inflight_bytes_max: 64 << 20,
            api_body_bytes_max: 64 << 10,
            api_jobs_finished_max: 64,
            events_file_bytes_max: 16 << 20,
        }
    }
}

/// `[defaults]`: used when a group is created without its own values.
#[derive(Clone, Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Defaults {
    /// How long history is kept (`"24h"`).
    #[serde(deserialize_with = "duration")]
    pub retention: Duration,
    /// Most bytes a group's journal may occupy (`"20GiB"`).
    #[serde(rename = "journal_max", deserialize_with = "size_bytes")]
    pub journal_max_bytes: u64,
}

impl Default for Defaults {
    fn default() -> Self {
        let options = GroupOptions::default();
        Defaults {
            retention: Duration::from_secs(options.retention_seconds),
            journal_max_bytes: options.journal_max_bytes,
        }
    }
}

impl Defaults {
    /// The group options these defaults stand for.
    pub fn group_options(&self) -> GroupOptions {
        GroupOptions {
            retention_seconds: self.retention.as_secs(),
            journal_max_bytes: self.journal_max_bytes,
        }
    }
}

/// Values given on the command line; each one replaces the config file's.
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--name`.
    pub name: Option<String>,
    /// `--data-dir`.
    pub data_dir: Option<PathBuf>,
    /// `--nbd-listen`.
    pub nbd_listen: Option<SocketAddr>,
    /// `--api-listen`.
    pub api_listen: Option<SocketAddr>,
    /// `--repl-listen`.
    pub repl_listen: Option<SocketAddr>,
    /// `--metrics-listen`.
    pub metrics_listen: Option<SocketAddr>,
}

/// Why a configuration was refused. The message names the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: cannot read config file: {source}")]
    Read {
        /// The file as named.
        file: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is larger than [`CONFIG_FILE_BYTES_MAX`].
    #[error("{file}: config file is {size_bytes} bytes, more than the {CONFIG_FILE_BYTES_MAX} bytes a config may have")]
    TooLarge {
        /// The file as named.
        file: String,
        /// Its size in bytes.
        size_bytes: u64,
    },
    /// The file is not valid TOML.
    #[error("{file}: {location}{reason}")]
    Syntax {
        /// The file as named.
        file: String,
        /// `line L, column C: `, when known.
        location: Location,
        /// What the parser found.
        reason: String,
    },
    /// A key is unknown or its value is wrong.
    #[error("{file}: key {key}: {reason}{location}")]
    Key {
        /// The file as named (or `command line` for flags).
        file: String,
        /// The dotted key (`nbd.listen`).
        key: String,
        /// What is wrong.
        reason: String,
        /// ` (line L, column C)`, when known.
        location: Location,
    },
}

/// Where in a file an error is, printed only when known.
#[derive(Debug, Default)]
pub struct Location {
    /// 1-based line and column.
    pub line_column: Option<(usize, usize)>,
    /// Whether the location leads the message (`line 3, column 1: `) or trails it.
    leading: bool,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line_column, self.leading) {
            (Some((line, column)), true) => write!(f, "line {line}, column {column}: "),
            (Some((line, column)), false) => write!(f, " (line {line}, column {column})"),
            (None, _) => Ok(()),
        }
    }
}

impl Config {
    /// Read and check `path`, or return the embedded defaults when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let Some(path) = path else {
            let config = Config::default();
            config.check("built-in defaults")?;
            return Ok(config);
        };
        let file = path.display().to_string();
        let metadata =
            std::fs::metadata(path).map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        if metadata.len() > CONFIG_FILE_BYTES_MAX {
            return Err(ConfigError::TooLarge { file, size_bytes: metadata.len() });
        }
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { file: file.clone(), source })?;
        Config::parse(&text, &file)
    }

    /// Parse and check TOML `text`; `file` names it in error messages.
    pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
        let deserializer = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            file: file.to_string(),
            location: Location { line_column: e.span().map(|s| line_column(text, s.start)), leading: true },
            reason: e.message().trim_end().to_string(),
        })?;
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let location =
                Location { line_column: inner.span().map(|s| line_column(text, s.start)), leading: false };
            key_error(file, &path, inner.message(), location)
        })?;
        config.check(file)?;
        Ok(config)
    }

    /// Replace values with the command line's, and check the result.
    pub fn apply(&mut self, overrides: Overrides) -> Result<(), ConfigError> {
        if let Some(name) = overrides.name {
            validate_name("site", &name).map_err(|e| ConfigError::Key {
                file: "command line".into(),
                key: "--name".into(),
                reason: e.to_string(),
                location: Location::default(),
            })?;
            self.site.name = name;
        }
        if let Some(dir) = overrides.data_dir {
            self.site.data_dir = dir;
        }
        if let Some(addr) = overrides.nbd_listen {
            self.nbd.listen = addr;
        }
        if let Some(addr) = overrides.api_listen {
            self.api.listen = addr;
        }
        if let Some(addr) = overrides.repl_listen {
            self.replication.listen = addr;
        }
        if let Some(addr) = overrides.metrics_listen {
            self.metrics.listen = addr;
        }
        self.check("command line")
    }

    /// Check the values serde cannot: ranges, names, and listeners that collide.
    fn check(&self, file: &str) -> Result<(), ConfigError> {
        let refuse = |key: &str, reason: String| ConfigError::Key {
            file: file.to_string(),
            key: key.to_string(),
            reason,
            location: Location::default(),
        };
        validate_name("site", &self.site.name).map_err(|e| refuse("site.name", e.to_string()))?;
        if self.site.data_dir.as_os_str().is_empty() {
            return Err(refuse("site.data_dir", "must not be empty".into()));
        }
        if self.nbd.listen == self.api.listen && self.nbd.listen.port() != 0 {
            return Err(refuse(
                "api.listen",
                format!("{} is also nbd.listen; give each listener its own port", self.api.listen),
            ));
        }
        for (other, addr) in [("nbd.listen", self.nbd.listen), ("api.listen", self.api.listen)] {
            if self.metrics.listen == addr && addr.port() != 0 {
                return Err(refuse(
                    "metrics.listen",
                    format!("{addr} is also {other}; give each listener its own port"),
                ));
            }
        }
        let limits = &self.limits;
        if !(NBD_PAYLOAD_BYTES_FLOOR..=NBD_PAYLOAD_BYTES_CEILING).contains(&limits.nbd_payload_bytes_max) {
            return Err(refuse(
                "limits.nbd_payload_bytes_max",
                format!(
                    "{} bytes is outside {NBD_PAYLOAD_BYTES_FLOOR}..={NBD_PAYLOAD_BYTES_CEILING}",
                    limits.nbd_payload_bytes_max
                ),
            ));
        }
        if !(NBD_INFLIGHT_BYTES_FLOOR..=NBD_INFLIGHT_BYTES_CEILING).contains(&limits.nbd_inflight_bytes_max) {
            return Err(refuse(
                "limits.nbd_inflight_bytes_max",
                format!(
                    "{} bytes is outside {NBD_INFLIGHT_BYTES_FLOOR}..={NBD_INFLIGHT_BYTES_CEILING}",
                    limits.nbd_inflight_bytes_max
                ),
            ));
        }
        for (key, value) in [
            ("limits.nbd_connections_max", limits.nbd_connections_max),
            ("limits.nbd_inflight_requests_max", limits.nbd_inflight_requests_max),
            ("limits.api_jobs_finished_max", limits.api_jobs_finished_max),
        ] {
            if !(1..=65_536).contains(&value) {
                return Err(refuse(key, format!("{value} is outside 1..=65536")));
            }
        }
        if !(1024..=API_BODY_BYTES_CEILING).contains(&limits.api_body_bytes_max) {
            return Err(refuse(
                "limits.api_body_bytes_max",
                format!("{} bytes is outside 1024..={API_BODY_BYTES_CEILING}", limits.api_body_bytes_max),
            ));
        }
        if limits.events_file_bytes_max < EVENTS_FILE_BYTES_FLOOR {
            return Err(refuse(
                "limits.events_file_bytes_max",
                format!("{} bytes is less than {EVENTS_FILE_BYTES_FLOOR}", limits.events_file_bytes_max),
            ));
        }
        let repl = &self.replication;
        if !(1..=400_000).contains(&repl.link_mbit_per_second) {
            return Err(refuse(
                "replication.link_mbit_per_second",
                format!("{} is outside 1..=400000", repl.link_mbit_per_second),
            ));
        }
        if repl.link_rtt.is_zero() || repl.link_rtt > Duration::from_secs(10) {
            return Err(refuse("replication.link_rtt", format!("{:?} is outside (0, 10s]", repl.link_rtt)));
        }
        if let ZstdLevel::Level(level) = repl.zstd_level {
            if !(1..=19).contains(&level) {
                return Err(refuse("replication.zstd_level", format!("{level} is outside 1..=19")));
            }
        }
        if self.defaults.retention.as_secs() == 0 {
            return Err(refuse("defaults.retention", "must be at least one second".into()));
        }
        if self.defaults.journal_max_bytes == 0 {
            return Err(refuse("defaults.journal_max", "must be more than zero bytes".into()));
        }
        Ok(())
    }
}

/// The host name when it is a valid site name, else [`SITE_NAME_FALLBACK`].
pub fn default_site_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| validate_name("site", h).is_ok())
        .unwrap_or_else(|| SITE_NAME_FALLBACK.to_string())
}

/// Turn serde's messages into `key K: reason`, naming an unknown key itself rather than its table.
fn key_error(file: &str, path: &str, message: &str, location: Location) -> ConfigError {
    let message = message.trim_end();
    let (key, reason) = match unknown_field(message) {
        Some((field, expected)) => {
            // serde_path_to_error usually already ends the path with the unknown key.
            let key = if path == "." || path.is_empty() {
                field.to_string()
            } else if path.rsplit('.').next() == Some(field) {
                path.to_string()
            } else {
                format!("{path}.{field}")
            };
            (key, format!("unknown key{expected}"))
        }
        None => {
            let key =
                if path == "." || path.is_empty() { "(top level)".to_string() } else { path.to_string() };
            (key, message.to_string())
        }
    };
    ConfigError::Key { file: file.to_string(), key, reason, location }
}

/// Split serde's "unknown field `x`, expected one of `a`, `b`" into the field and the rest.
fn unknown_field(message: &str) -> Option<(&str, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (field, rest) = rest.split_once('`')?;
    let expected = rest.strip_prefix(", ").map(|e| format!(" ({e})")).unwrap_or_default();
    Some((field, expected))
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, column)
}

fn socket_addr<'de, D: Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(|_| {
        D::Error::custom(format!(
            "invalid socket address {text:?} (expected IP:PORT, like 127.0.0.1:7600 or [::1]:7600)"
        ))
    })
}

fn size_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    ByteSize::deserialize(deserializer).map(|s| s.0)
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    HumanDuration::deserialize(deserializer).map(|d| d.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::parse(text, "config/test.toml").expect_err("config should be refused").to_string()
    }

    #[test]
    fn zstd_level_is_a_level_or_auto_by_link_speed() {
        let config = Config::parse("[replication]\nzstd_level = 7\n", "c.toml").expect("config");
        assert_eq!(config.replication.zstd_level, ZstdLevel::Level(7));
        let config = Config::parse("[replication]\nzstd_level = \"auto\"\n", "c.toml").expect("config");
        assert_eq!(config.replication.zstd_level, ZstdLevel::Auto);
        assert_eq!(Config::parse("", "c.toml").expect("defaults").replication.zstd_level, ZstdLevel::Auto);
        assert_eq!(ZstdLevel::Auto.resolve(1000), 1);
        assert_eq!(ZstdLevel::Auto.resolve(200), 3);
        assert_eq!(ZstdLevel::Auto.resolve(50), 6);
        assert_eq!(ZstdLevel::Auto.resolve(20), 9);
        assert_eq!(ZstdLevel::Auto.resolve(5), 12);
        assert_eq!(ZstdLevel::Level(4).resolve(5), 4);
        assert!(error_of("[replication]\nzstd_level = 25\n").contains("replication.zstd_level"));
        assert!(error_of("[replication]\nzstd_level = \"fast\"\n").contains("auto"));
    }

    #[test]
    fn congestion_control_is_bbr_or_cubic() {
        let config = Config::parse("[replication]\ncongestion = \"cubic\"\n", "c.toml").expect("config");
        assert_eq!(config.replication.congestion, Congestion::Cubic);
        let error = error_of("[replication]\ncongestion = \"reno\"\n");
        assert!(error.contains("replication.congestion") && error.contains("reno"), "{error}");
    }

    #[test]
    fn empty_file_gives_the_embedded_defaults() {
        let config = Config::parse("", "empty.toml").expect("empty config");
        assert_eq!(config.nbd.listen, "127.0.0.1:10809".parse().expect("addr"));
        assert_eq!(config.api.listen, "127.0.0.1:7600".parse().expect("addr"));
        assert_eq!(config.site.data_dir, PathBuf::from("tidemark-data"));
        assert_eq!(config.defaults.retention, Duration::from_secs(24 * 3600));
        assert_eq!(config.defaults.journal_max_bytes, 20 << 30);
        assert_eq!(config.limits.api_body_bytes_max, 64 << 10);
        assert_eq!(config.metrics.listen, "127.0.0.1:9600".parse().expect("addr"));
        assert_eq!(config.replication.congestion, Congestion::Bbr);
        assert!(validate_name("site", &config.site.name).is_ok());
        let loaded = Config::load(None).expect("defaults");
        assert_eq!(loaded.api.listen, config.api.listen);
    }

    #[test]
    fn every_key_is_read() {
        let config = Config::parse(
            r#"
            [site]
            name = "site-a"
            data_dir = "/var/lib/tidemark"
            [nbd]
            listen = "0.0.0.0:10810"
            [api]
            listen = "[::1]:7601"
            [limits]
            nbd_payload_bytes_max = "16MiB"
            nbd_connections_max = 8
            nbd_inflight_requests_max = 16
            nbd_inflight_bytes_max = "32MiB"
            api_body_bytes_max = 131072
            api_jobs_finished_max = 10
            events_file_bytes_max = "1MiB"
            [defaults]
            retention = "7days"
            journal_max = "100GiB"
            [metrics]
            listen = "0.0.0.0:9700"
            "#,
            "full.toml",
        )
        .expect("full config");
        assert_eq!(config.site.name, "site-a");
        assert_eq!(config.site.data_dir, PathBuf::from("/var/lib/tidemark"));
        assert_eq!(config.nbd.listen.port(), 10810);
        assert_eq!(config.api.listen, "[::1]:7601".parse().expect("addr"));
        assert_eq!(config.limits.nbd_payload_bytes_max, 16 << 20);
        assert_eq!(config.limits.nbd_connections_max, 8);
        assert_eq!(config.limits.nbd_inflight_requests_max, 16);
        assert_eq!(config.limits.nbd_inflight_bytes_max, 32 << 20);
        assert_eq!(config.limits.api_body_bytes_max, 128 << 10);
        assert_eq!(config.limits.api_jobs_finished_max, 10);
        assert_eq!(config.limits.events_file_bytes_max, 1 << 20);
        assert_eq!(config.defaults.retention, Duration::from_secs(7 * 86_400));
        assert_eq!(config.defaults.group_options().journal_max_bytes, 100 << 30);
        assert_eq!(config.defaults.group_options().retention_seconds, 7 * 86_400);
        assert_eq!(config.metrics.listen, "0.0.0.0:9700".parse().expect("addr"));
    }

    #[test]
    fn bad_address_names_file_and_key() {
        let err = error_of("[nbd]\nlisten = \"x\"\n");
        assert!(err.starts_with("config/test.toml: key nbd.listen: invalid socket address \"x\""), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let err = error_of("[api]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n");
        assert!(err.starts_with("config/test.toml: key api.listen_port: unknown key"), "{err}");
        let err = error_of("[sight]\nname = \"a\"\n");
        assert!(err.starts_with("config/test.toml: key sight: unknown key"), "{err}");
    }

    #[test]
    fn bad_size_names_file_and_key() {
        let err = error_of("[defaults]\njournal_max = \"20 gigs\"\n");
        assert!(
            err.starts_with("config/test.toml: key defaults.journal_max: invalid size \"20 gigs\""),
            "{err}"
        );
        let err = error_of("[limits]\nnbd_payload_bytes_max = -4\n");
        assert!(err.starts_with("config/test.toml: key limits.nbd_payload_bytes_max:"), "{err}");
        let err = error_of("[limits]\nnbd_payload_bytes_max = \"1TiB\"\n");
        assert!(
            err.starts_with(
                "config/test.toml: key limits.nbd_payload_bytes_max: 1099511627776 bytes is outside"
            ),
            "{err}"
        );
    }

    #[test]
    fn bad_duration_and_wrong_type_name_the_key() {
        let err = error_of("[defaults]\nretention = \"a while\"\n");
        assert!(err.starts_with("config/test.toml: key defaults.retention: invalid duration"), "{err}");
        let err = error_of("[limits]\nnbd_connections_max = \"many\"\n");
        assert!(err.starts_with("config/test.toml: key limits.nbd_connections_max:"), "{err}");
        let err = error_of("[limits]\nnbd_connections_max = 0\n");
        assert!(err.starts_with("config/test.toml: key limits.nbd_connections_max: 0 is outside"), "{err}");
    }

    #[test]
    fn bad_site_name_and_colliding_listeners_are_refused() {
        let err = error_of("[site]\nname = \"my site\"\n");
        assert!(err.starts_with("config/test.toml: key site.name: invalid site name"), "{err}");
        let err = error_of("[nbd]\nlisten = \"127.0.0.1:9000\"\n[api]\nlisten = \"127.0.0.1:9000\"\n");
        assert!(err.starts_with("config/test.toml: key api.listen:"), "{err}");
        let err = error_of("[api]\nlisten = \"127.0.0.1:9000\"\n[metrics]\nlisten = \"127.0.0.1:9000\"\n");
        assert!(
            err.starts_with("config/test.toml: key metrics.listen: 127.0.0.1:9000 is also api.listen"),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_names_file_and_line() {
        let err = error_of("[site\nname = 1\n");
        assert!(err.starts_with("config/test.toml: line 1, column"), "{err}");
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut config = Config::parse("[site]\nname = \"a\"\n", "x.toml").expect("config");
        config
            .apply(Overrides {
                name: Some("b".into()),
                data_dir: Some("/tmp/b".into()),
                nbd_listen: Some("127.0.0.1:1".parse().expect("addr")),
                api_listen: Some("127.0.0.1:2".parse().expect("addr")),
                repl_listen: Some("127.0.0.1:3".parse().expect("addr")),
                metrics_listen: Some("127.0.0.1:4".parse().expect("addr")),
            })
            .expect("overrides");
        assert_eq!(config.site.name, "b");
        assert_eq!(config.site.data_dir, PathBuf::from("/tmp/b"));
        assert_eq!(config.nbd.listen.port(), 1);
        assert_eq!(config.api.listen.port(), 2);
        assert_eq!(config.metrics.listen.port(), 4);
        let err = config
            .apply(Overrides { name: Some("-x".into()), ..Overrides::default() })
            .expect_err("bad name");
        assert!(err.to_string().starts_with("command line: key --name: invalid site name"), "{err}");
    }

    #[test]
    fn missing_file_is_reported_with_its_name() {
        let err = Config::load(Some(Path::new("/nonexistent/tidemark.toml"))).expect_err("missing");
        assert!(err.to_string().starts_with("/nonexistent/tidemark.toml: cannot read config file"), "{err}");
    }

    /// Every example shipped under config/ and deploy/ must load, so the examples never rot.
    #[test]
    fn shipped_examples_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for (dir, expected) in [("config", 2), ("deploy/systemd", 1), ("deploy/compose", 2)] {
            let dir = root.join(dir);
            let mut seen = 0;
            for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
                let path = entry.expect("directory entry").path();
                if path.extension().is_some_and(|e| e == "toml") {
                    let config = Config::load(Some(&path)).unwrap_or_else(|e| panic!("{e}"));
                    assert_ne!(config.nbd.listen, config.api.listen);
                    seen += 1;
                }
            }
            assert!(seen >= expected, "expected {expected} example configs in {}", dir.display());
        }
    }
}
