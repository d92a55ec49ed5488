//! The operator's event log: audit records of every API change and the engine's own events,
//! appended to `DATA_DIR/events.jsonl` (one JSON object a line) and served by `GET /v1/events`.
//!
//! The file is bounded: past `events_file_bytes_max` it is renamed to `events.jsonl.1` (the
//! previous `.1` is dropped) and a new one begun. The newest [`EVENTS_RECENT_MAX`] events are
//! also kept in memory, loaded from both files at start, so queries never read the disk.
//! Lines are appended without fsync: the log is for people, the journal is what must survive a
//! crash. A torn last line after a crash is skipped when the log is loaded.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tidemark_engine::{EngineEvent, EventSink};

/// File name of the current event log inside the data directory.
pub const EVENTS_FILE_NAME: &str = "events.jsonl";
/// File name the current log is rotated to.
pub const EVENTS_OLD_FILE_NAME: &str = "events.jsonl.1";
/// Events kept in memory for queries.
pub const EVENTS_RECENT_MAX: usize = 10_000;
/// Most events one query returns.
pub const EVENTS_RETURNED_MAX: usize = 1_000;

/// Where an event came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventSource {
    /// A management API request (an audit record).
    Api,
    /// The engine (rollbacks, overflow, corruption, role changes).
    Engine,
    /// The site daemon itself (start, stop).
    Site,
}

/// How an audited request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It was done.
    Ok,
    /// It was refused or failed.
    Failed,
    /// The caller was not allowed to ask.
    Denied,
}

/// One line of the event log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When it was recorded (RFC 3339, UTC, nanoseconds).
    pub time: String,
    /// Who recorded it.
    pub source: EventSource,
    /// What happened: `volume.create`, `rollback.finish`, or the engine's event kind.
    pub action: String,
    /// Token id of the caller for API events (`admin`), or `anonymous` when none was valid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub who: Option<String>,
    /// The object acted on (a volume, image, bookmark or group name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<String>,
    /// The group concerned, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// How an audited request ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Outcome>,
    /// HTTP status of an audited request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// One line for people.
    pub message: String,
    /// The request body, or the engine event, as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    /// `time` as nanoseconds since the epoch, for filtering; not stored.
    #[serde(skip)]
    time_unix_nanos: u64,
}

impl Event {
    /// A new event stamped with the current time.
    pub fn now(source: EventSource, action: impl Into<String>, message: impl Into<String>) -> Event {
        let now = SystemTime::now();
        Event {
            time: humantime::format_rfc3339_nanos(now).to_string(),
            source,
            action: action.into(),
            who: None,
            object: None,
            group: None,
            result: None,
            status: None,
            message: message.into(),
            detail: None,
            time_unix_nanos: unix_nanos(now),
        }
    }

    /// The event's time in nanoseconds since the epoch.
    pub fn time_unix_nanos(&self) -> u64 {
        self.time_unix_nanos
    }
}

/// The event log. Cheap to share; every method takes `&self`.
pub struct EventLog {
    dir: PathBuf,
    file_bytes_max: u64,
    inner: Mutex<Inner>,
}

struct Inner {
    /// The open current file, or `None` after a failure (retried on the next event).
    file: Option<File>,
    file_bytes: u64,
    recent: VecDeque<Event>,
    /// Events that could not be written since the last success; logged once per run of failures.
    write_failures: u64,
    /// Events recorded since the site started, by source and action, for metrics. Actions are
    /// names in the code, so this stays small.
    counts: BTreeMap<(EventSource, String), u64>,
    /// Engine events recorded since the site started, by kind and group. Only the engine's: its
    /// group names are groups that exist, where an API request's may be anything a client sent.
    engine_counts: BTreeMap<(String, String), u64>,
}

impl EventSource {
    /// Its name in the log and in metrics (`api`, `engine`, `site`).
    pub fn name(self) -> &'static str {
        match self {
            EventSource::Api => "api",
            EventSource::Engine => "engine",
            EventSource::Site => "site",
        }
    }
}

/// Why the event log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {source}")]
pub struct EventLogError {
    /// What was being done.
    pub action: &'static str,
    /// On which file.
    pub path: PathBuf,
    /// The OS error.
    pub source: std::io::Error,
}

impl EventLog {
    /// Open (creating if needed) the event log in `dir` and load its newest events.
    pub fn open(dir: &Path, file_bytes_max: u64) -> Result<EventLog, EventLogError> {
        let mut recent = VecDeque::new();
        let mut skipped = 0;
        for name in [EVENTS_OLD_FILE_NAME, EVENTS_FILE_NAME] {
            skipped += load_tail(&dir.join(name), file_bytes_max, &mut recent)?;
        }
        if skipped > 0 {
            tracing::warn!(lines = skipped, dir = %dir.display(), "skipped unreadable event log lines");
        }
        let path = dir.join(EVENTS_FILE_NAME);
        let file = open_append(&path)?;
        let file_bytes = file
            .metadata()
            .map_err(|source| EventLogError { action: "stat event log", path: path.clone(), source })?
            .len();
        Ok(EventLog {
            dir: dir.to_path_buf(),
            file_bytes_max,
            inner: Mutex::new(Inner {
                file: Some(file),
                file_bytes,
                recent,
                write_failures: 0,
                counts: BTreeMap::new(),
                engine_counts: BTreeMap::new(),
            }),
        })
    }

    /// Append an event to the file and to memory. A failed write is logged, not returned:
    /// an operator's log that cannot be written must not fail the operation it describes.
    pub fn record(&self, event: Event) {
        let mut line = match serde_json::to_vec(&event) {
            Ok(line) => line,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode event");
                return;
            }
        };
        line.push(b'\n');
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match self.append(&mut inner, &line) {
            Ok(()) => {
                if inner.write_failures > 0 {
                    tracing::info!(lost = inner.write_failures, "event log writable again");
                    inner.write_failures = 0;
                }
            }
            Err(e) => {
                if inner.write_failures == 0 {
                    tracing::error!(error = %e, dir = %self.dir.display(), "cannot write event log; events are kept in memory only until it works again");
                }
                inner.write_failures += 1;
                inner.file = None;
            }
        }
        if inner.recent.len() == EVENTS_RECENT_MAX {
            inner.recent.pop_front();
        }
        *inner.counts.entry((event.source, event.action.clone())).or_default() += 1;
        if let (EventSource::Engine, Some(group)) = (event.source, &event.group) {
            *inner.engine_counts.entry((event.action.clone(), group.clone())).or_default() += 1;
        }
        inner.recent.push_back(event);
    }

    /// Events recorded since the site started (those loaded from the file at start are not
    /// counted), by source and action.
    pub fn counts(&self) -> Vec<(EventSource, String, u64)> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.counts.iter().map(|((source, action), count)| (*source, action.clone(), *count)).collect()
    }

    /// Engine events of `kind` (`history_trimmed`) about `group` recorded since the site started.
    pub fn engine_count(&self, kind: &str, group: &str) -> u64 {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.engine_counts.get(&(kind.to_string(), group.to_string())).copied().unwrap_or(0)
    }

    /// The newest events at or after `since` (nanoseconds since the epoch), at most `limit`
    /// (itself at most [`EVENTS_RETURNED_MAX`]), newest last.
    pub fn query(&self, since_unix_nanos: Option<u64>, limit: usize) -> Vec<Event> {
        let limit = limit.min(EVENTS_RETURNED_MAX);
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut events: Vec<Event> = inner
            .recent
            .iter()
            .rev()
            .take_while(|e| since_unix_nanos.is_none_or(|since| e.time_unix_nanos >= since))
            .take(limit)
            .cloned()
            .collect();
        events.reverse();
        events
    }

    /// Push what was written to the disk (at shutdown).
    pub fn sync(&self) {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(file) = &inner.file {
            if let Err(e) = file.sync_data() {
                tracing::warn!(error = %e, "cannot sync event log");
            }
        }
    }

    fn append(&self, inner: &mut Inner, line: &[u8]) -> std::io::Result<()> {
        let path = self.dir.join(EVENTS_FILE_NAME);
        if inner.file.is_none() {
            let file = open_append(&path).map_err(|e| e.source)?;
            inner.file_bytes = file.metadata()?.len();
            inner.file = Some(file);
        }
        if inner.file_bytes > 0 && inner.file_bytes + line.len() as u64 > self.file_bytes_max {
            inner.file = None;
            fs::rename(&path, self.dir.join(EVENTS_OLD_FILE_NAME))?;
            inner.file = Some(open_append(&path).map_err(|e| e.source)?);
            inner.file_bytes = 0;
        }
        if let Some(file) = inner.file.as_mut() {
            file.write_all(line)?;
            inner.file_bytes += line.len() as u64;
        }
        Ok(())
    }
}

impl EventSink for EventLog {
    fn event(&self, event: EngineEvent) {
        let mut record = Event::now(EventSource::Engine, event.kind(), event.message());
        record.group = event.group().map(str::to_string);
        record.detail = serde_json::to_value(&event).ok();
        self.record(record);
    }
}

/// Parse an RFC 3339 time (`2024-05-01T12:00:00Z`) into nanoseconds since the epoch.
pub fn parse_time_unix_nanos(text: &str) -> Result<u64, String> {
    let time = humantime::parse_rfc3339_weak(text.trim())
        .map_err(|e| format!("invalid time {text:?}: {e} (expected RFC 3339, like 2024-05-01T12:00:00Z)"))?;
    Ok(unix_nanos(time))
}

fn unix_nanos(time: SystemTime) -> u64 {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
}

fn open_append(path: &Path) -> Result<File, EventLogError> {
    OpenOptions::new().create(true).append(true).open(path).map_err(|source| EventLogError {
        action: "open event log",
        path: path.to_path_buf(),
        source,
    })
}

/// Load the last `bytes_max` bytes of `path` into `recent`; return the count of lines skipped.
fn load_tail(path: &Path, bytes_max: u64, recent: &mut VecDeque<Event>) -> Result<usize, EventLogError> {
    let io = |action| {
        let path = path.to_path_buf();
        move |source| EventLogError { action, path, source }
    };
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io("open event log")(e)),
    };
    let length = file.metadata().map_err(io("stat event log"))?.len();
    let start = length.saturating_sub(bytes_max);
    file.seek(SeekFrom::Start(start)).map_err(io("seek event log"))?;
    let mut reader = BufReader::new(file);
    if start > 0 {
        // We landed inside a line; the first whole line starts after the next newline.
        let mut partial = Vec::new();
        reader.read_until(b'\n', &mut partial).map_err(io("read event log"))?;
    }
    let mut skipped = 0;
    for line in reader.split(b'\n') {
        let line = line.map_err(io("read event log"))?;
        if line.is_empty() {
            continue;
        }
        let parsed = serde_json::from_slice::<Event>(&line).ok().and_then(|mut e| {
            parse_time_unix_nanos(&e.time).ok().map(|t| {
                e.time_unix_nanos = t;
                e
            })
        });
        match parsed {
            Some(event) => {
                if recent.len() == EVENTS_RECENT_MAX {
                    recent.pop_front();
                }
                recent.push_back(event);
            }
            None => skipped += 1,
        }
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn audit(n: usize) -> Event {
        let mut e = Event::now(EventSource::Api, "volume.create", format!("event {n}"));
        e.who = Some("admin".into());
        e.object = Some(format!("v{n}"));
        e.result = Some(Outcome::Ok);
        e
    }

    #[test]
    fn events_survive_reopen_and_torn_tail_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let log = EventLog::open(dir.path(), 1 << 20).expect("open");
            log.record(audit(1));
            log.record(audit(2));
        }
        // A crash can leave half a line behind.
        let mut file = OpenOptions::new().append(true).open(dir.path().join(EVENTS_FILE_NAME)).expect("open");
        file.write_all(b"{\"time\":\"2024-").expect("write");
        drop(file);
        let log = EventLog::open(dir.path(), 1 << 20).expect("reopen");
        let events = log.query(None, 100);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].message, "event 1");
        assert_eq!(events[1].object.as_deref(), Some("v2"));
        assert!(events[0].time_unix_nanos() <= events[1].time_unix_nanos());
        assert!(events[0].time_unix_nanos() > 0);
    }

    #[test]
    fn log_rotates_and_keeps_one_old_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bytes_max = 4096;
        let log = EventLog::open(dir.path(), bytes_max).expect("open");
        for n in 0..200 {
            log.record(audit(n));
        }
        let current = fs::metadata(dir.path().join(EVENTS_FILE_NAME)).expect("current").len();
        let old = fs::metadata(dir.path().join(EVENTS_OLD_FILE_NAME)).expect("old").len();
        assert!(current <= bytes_max, "{current}");
        assert!(old <= bytes_max, "{old}");
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 2);
        // Reloading sees only what the two files still hold, newest last.
        drop(log);
        let log = EventLog::open(dir.path(), bytes_max).expect("reopen");
        let events = log.query(None, EVENTS_RETURNED_MAX);
        assert!(!events.is_empty() && events.len() < 200);
        assert_eq!(events.last().map(|e| e.message.as_str()), Some("event 199"));
    }

    #[test]
    fn query_filters_by_time_and_bounds_the_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = EventLog::open(dir.path(), 1 << 20).expect("open");
        for n in 0..5 {
            log.record(audit(n));
        }
        let all = log.query(None, 100);
        assert_eq!(all.len(), 5);
        let since = all[3].time_unix_nanos();
        let newer = log.query(Some(since), 100);
        assert!(newer.iter().all(|e| e.time_unix_nanos() >= since));
        assert_eq!(newer.last().map(|e| e.message.as_str()), Some("event 4"));
        assert!(newer.len() <= 2 || all[2].time_unix_nanos() == since);
        let last_two = log.query(None, 2);
        assert_eq!(last_two.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(), ["event 3", "event 4"]);
        assert!(log.query(Some(u64::MAX), 100).is_empty());
    }

    #[test]
    fn rfc3339_times_parse() {
        assert_eq!(parse_time_unix_nanos("1970-01-01T00:00:01Z"), Ok(1_000_000_000));
        assert!(parse_time_unix_nanos("yesterday").is_err());
    }
}
