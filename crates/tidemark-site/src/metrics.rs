//! The site's Prometheus endpoint (`GET /metrics` on `metrics.listen`): what the site is doing,
//! in the Prometheus text format, for dashboards and alerts.
//!
//! Almost everything is read at scrape time by one [`Collector`] from state that exists anyway:
//! the engine's groups, volumes, bookmarks and images, replication's status and counters, the
//! event log's counts and the NBD server's counters. Only the hot paths count as they go, with
//! plain atomics and fixed-bucket histograms ([`tidemark_journal::stats`]): NBD requests per
//! export (counted by [`ExportIo`] through the NBD server's per-export hook), journal appends and
//! fdatasyncs, and replication batches. Nothing here takes a lock on a write path.
//!
//! Names follow `tidemark_<component>_<name>_<unit>[_total]` in base units; labels come from small
//! fixed sets (group, volume and image names, partner, operation, reason, state), never a seq or
//! an offset. `docs/metrics.md` lists every family; a black-box test holds the two equal.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::marker::PhantomData;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use parking_lot::Mutex;
use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{Encoder, Registry, TextEncoder};
use tidemark_engine::Engine;
use tidemark_journal::stats::{Histogram, HistogramSnapshot};
use tidemark_journal::Seq;
use tidemark_nbd::{NbdServer, Operation};
use tidemark_repl::{ReceiverError, WireError};

use crate::events::EventLog;
use crate::replication::session::SessionError;
use crate::replication::Replication;

/// A metric family: its name, help text, type and label names.
#[derive(Clone, Copy, Debug)]
pub struct Def {
    /// Full name, `tidemark_...`.
    pub name: &'static str,
    /// One sentence for the `# HELP` line.
    pub help: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricType,
    /// Label names, in the order values are given.
    pub labels: &'static [&'static str],
}

const fn def(
    name: &'static str,
    kind: MetricType,
    labels: &'static [&'static str],
    help: &'static str,
) -> Def {
    Def { name, help, kind, labels }
}

use MetricType::{COUNTER, GAUGE, HISTOGRAM};

const EXPORT_LABELS: &[&str] = &["group", "volume", "image", "operation"];

/// `tidemark_build_info`.
pub const BUILD_INFO: Def =
    def("tidemark_build_info", GAUGE, &["version"], "Always 1; the version label names the running build.");
/// `tidemark_site_start_time_seconds`.
pub const SITE_START_TIME: Def = def(
    "tidemark_site_start_time_seconds",
    GAUGE,
    &[],
    "When the site started, in seconds since the Unix epoch.",
);
/// `tidemark_nbd_connections`.
pub const NBD_CONNECTIONS: Def =
    def("tidemark_nbd_connections", GAUGE, &[], "NBD connections open now (in handshake or transmission).");
/// `tidemark_nbd_connections_accepted_total`.
pub const NBD_CONNECTIONS_ACCEPTED: Def =
    def("tidemark_nbd_connections_accepted_total", COUNTER, &[], "NBD connections accepted.");
/// `tidemark_nbd_connections_rejected_total`.
pub const NBD_CONNECTIONS_REJECTED: Def = def(
    "tidemark_nbd_connections_rejected_total",
    COUNTER,
    &[],
    "NBD connections closed at once because limits.nbd_connections_max were already open.",
);
/// `tidemark_nbd_handshakes_failed_total`.
pub const NBD_HANDSHAKES_FAILED: Def = def(
    "tidemark_nbd_handshakes_failed_total",
    COUNTER,
    &[],
    "NBD handshakes that failed (protocol violation, timeout, unknown export).",
);
/// `tidemark_nbd_connections_failed_total`.
pub const NBD_CONNECTIONS_FAILED: Def = def(
    "tidemark_nbd_connections_failed_total",
    COUNTER,
    &[],
    "NBD connections the server closed in transmission because of a protocol violation or an I/O error.",
);
/// `tidemark_nbd_unknown_commands_total`.
pub const NBD_UNKNOWN_COMMANDS: Def = def(
    "tidemark_nbd_unknown_commands_total",
    COUNTER,
    &[],
    "NBD requests with a command type the server does not know (answered with EINVAL).",
);
/// `tidemark_nbd_operations_total`.
pub const NBD_OPERATIONS: Def = def(
    "tidemark_nbd_operations_total",
    COUNTER,
    EXPORT_LABELS,
    "NBD requests answered, by export and operation, failed ones included.",
);
/// `tidemark_nbd_operation_errors_total`.
pub const NBD_OPERATION_ERRORS: Def = def(
    "tidemark_nbd_operation_errors_total",
    COUNTER,
    EXPORT_LABELS,
    "NBD requests answered with an error, by export and operation.",
);
/// `tidemark_nbd_bytes_total`.
pub const NBD_BYTES: Def = def(
    "tidemark_nbd_bytes_total",
    COUNTER,
    EXPORT_LABELS,
    "Bytes covered by successful NBD requests: the payload of reads and writes, the length of trims, zeroes, cache and block-status requests.",
);
/// `tidemark_nbd_operation_duration_seconds`.
pub const NBD_OPERATION_DURATION: Def = def(
    "tidemark_nbd_operation_duration_seconds",
    HISTOGRAM,
    EXPORT_LABELS,
    "Time from reading an NBD request's header to queueing its reply, by export and operation.",
);
/// `tidemark_volume_size_bytes`.
pub const VOLUME_SIZE: Def =
    def("tidemark_volume_size_bytes", GAUGE, &["group", "volume"], "Logical size of each volume.");
/// `tidemark_group_role`.
pub const GROUP_ROLE: Def = def(
    "tidemark_group_role",
    GAUGE,
    &["group", "role"],
    "1 for the group's role at this site (primary or secondary), 0 for the other.",
);
/// `tidemark_group_generation`.
pub const GROUP_GENERATION: Def = def(
    "tidemark_group_generation",
    GAUGE,
    &["group"],
    "Fencing generation of the group's primary role, as this site knows it.",
);
/// `tidemark_group_state`.
pub const GROUP_STATE: Def = def(
    "tidemark_group_state",
    GAUGE,
    &["group", "state"],
    "1 for the group's health (ok, poisoned after a failed fsync, failed after corruption), 0 for the others.",
);
/// `tidemark_group_bookmarks`.
pub const GROUP_BOOKMARKS: Def =
    def("tidemark_group_bookmarks", GAUGE, &["group"], "Bookmarks in the group's recoverable history.");
/// `tidemark_group_images`.
pub const GROUP_IMAGES: Def = def(
    "tidemark_group_images",
    GAUGE,
    &["group", "mode"],
    "Images of the group, by mode as the API names it (read-only, writable, and any other).",
);
/// `tidemark_group_rollbacks_total`.
pub const GROUP_ROLLBACKS: Def = def(
    "tidemark_group_rollbacks_total",
    COUNTER,
    &["group"],
    "Rollbacks of the group completed at this site since it started.",
);
/// `tidemark_journal_size_bytes`.
pub const JOURNAL_SIZE: Def =
    def("tidemark_journal_size_bytes", GAUGE, &["group"], "Bytes the group's journal occupies now.");
/// `tidemark_index_versions`.
pub const INDEX_VERSIONS: Def = def(
    "tidemark_index_versions",
    GAUGE,
    &["group"],
    "Block versions in the group's index: one per block per write within the retention window.",
);
/// `tidemark_index_memory_bytes`.
pub const INDEX_MEMORY: Def = def(
    "tidemark_index_memory_bytes",
    GAUGE,
    &["group"],
    "Bytes of memory the group's block index and table of record times have allocated.",
);
/// `tidemark_journal_limit_bytes`.
pub const JOURNAL_LIMIT: Def = def(
    "tidemark_journal_limit_bytes",
    GAUGE,
    &["group"],
    "The group's journal size limit (journal_max); past it the oldest history is trimmed unless pinned.",
);
/// `tidemark_journal_near_limit`.
pub const JOURNAL_NEAR_LIMIT: Def = def(
    "tidemark_journal_near_limit",
    GAUGE,
    &["group"],
    "1 while the journal is past 80% of its limit (the warning before trimming or an overflow policy), else 0.",
);
/// `tidemark_journal_appended_bytes_total`.
pub const JOURNAL_APPENDED_BYTES: Def = def(
    "tidemark_journal_appended_bytes_total",
    COUNTER,
    &["group"],
    "Bytes of records appended to the group's journal (host writes, control records, replicated records).",
);
/// `tidemark_journal_appended_records_total`.
pub const JOURNAL_APPENDED_RECORDS: Def = def(
    "tidemark_journal_appended_records_total",
    COUNTER,
    &["group"],
    "Records appended to the group's journal.",
);
/// `tidemark_journal_fsync_duration_seconds`.
pub const JOURNAL_FSYNC_DURATION: Def = def(
    "tidemark_journal_fsync_duration_seconds",
    HISTOGRAM,
    &["group"],
    "Time each group commit's fdatasync of the journal took.",
);
/// `tidemark_history_retention_seconds`.
pub const HISTORY_RETENTION: Def = def(
    "tidemark_history_retention_seconds",
    GAUGE,
    &["group"],
    "The group's configured retention: how far back history is kept when the journal limit allows.",
);
/// `tidemark_history_window_seconds`.
pub const HISTORY_WINDOW: Def = def(
    "tidemark_history_window_seconds",
    GAUGE,
    &["group"],
    "How far back the group can be recovered now: from its oldest recoverable point to now.",
);
/// `tidemark_history_oldest_timestamp_seconds`.
pub const HISTORY_OLDEST: Def = def(
    "tidemark_history_oldest_timestamp_seconds",
    GAUGE,
    &["group"],
    "Time of the group's oldest recoverable point, in seconds since the Unix epoch.",
);
/// `tidemark_history_trimmed_total`.
pub const HISTORY_TRIMMED: Def = def(
    "tidemark_history_trimmed_total",
    COUNTER,
    &["group"],
    "Times the journal limit trimmed history inside the retention window (history_trimmed events) since the site started.",
);
/// `tidemark_replication_protected`.
pub const REPLICATION_PROTECTED: Def = def(
    "tidemark_replication_protected",
    GAUGE,
    &["group", "partner"],
    "1 for each group this site protects to a partner (paused or not).",
);
/// `tidemark_replication_state`.
pub const REPLICATION_STATE: Def = def(
    "tidemark_replication_state",
    GAUGE,
    &["group", "state"],
    "1 for the group's replication state (connecting, baseline, streaming, paused, diverged, fenced, receiving), 0 for the others.",
);
/// `tidemark_replication_lag_records`.
pub const REPLICATION_LAG_RECORDS: Def = def(
    "tidemark_replication_lag_records",
    GAUGE,
    &["group"],
    "Journal records not yet durable at the partner (0 at a secondary).",
);
/// `tidemark_replication_lag_bytes`.
pub const REPLICATION_LAG_BYTES: Def = def(
    "tidemark_replication_lag_bytes",
    GAUGE,
    &["group"],
    "Journal bytes not yet durable at the partner (0 at a secondary).",
);
/// `tidemark_replication_rpo_seconds`.
pub const REPLICATION_RPO: Def = def(
    "tidemark_replication_rpo_seconds",
    GAUGE,
    &["group"],
    "Age of the oldest write not yet durable at the partner: the data a loss of this site now would lose (0 when none).",
);
/// `tidemark_replication_sent_bytes_total`.
pub const REPLICATION_SENT_BYTES: Def = def(
    "tidemark_replication_sent_bytes_total",
    COUNTER,
    &["group"],
    "Journal bytes sent to the partner, before compression.",
);
/// `tidemark_replication_sent_compressed_bytes_total`.
pub const REPLICATION_SENT_COMPRESSED_BYTES: Def = def(
    "tidemark_replication_sent_compressed_bytes_total",
    COUNTER,
    &["group"],
    "Batch payload bytes sent to the partner, after compression.",
);
/// `tidemark_replication_batches_sent_total`.
pub const REPLICATION_BATCHES_SENT: Def =
    def("tidemark_replication_batches_sent_total", COUNTER, &["group"], "Batches sent to the partner.");
/// `tidemark_replication_batch_size_bytes`.
pub const REPLICATION_BATCH_SIZE: Def = def(
    "tidemark_replication_batch_size_bytes",
    HISTOGRAM,
    &["group"],
    "Uncompressed size of each batch sent.",
);
/// `tidemark_replication_batch_send_duration_seconds`.
pub const REPLICATION_BATCH_SEND_DURATION: Def = def(
    "tidemark_replication_batch_send_duration_seconds",
    HISTOGRAM,
    &["group"],
    "Time to read, compress and hand each batch to the link, bandwidth-limit waits excluded.",
);
/// `tidemark_replication_batch_ack_duration_seconds`.
pub const REPLICATION_BATCH_ACK_DURATION: Def = def(
    "tidemark_replication_batch_ack_duration_seconds",
    HISTOGRAM,
    &["group"],
    "Time from sending a batch to the partner's ack that it is durable there.",
);
/// `tidemark_replication_throttled_seconds_total`.
pub const REPLICATION_THROTTLED: Def = def(
    "tidemark_replication_throttled_seconds_total",
    COUNTER,
    &["group"],
    "Time batches waited for the partner's bandwidth limit.",
);
/// `tidemark_replication_baseline_bytes`.
pub const REPLICATION_BASELINE_BYTES: Def = def(
    "tidemark_replication_baseline_bytes",
    GAUGE,
    &["group"],
    "Allocated bytes of the baseline under way or last finished (zero blocks among them are not sent).",
);
/// `tidemark_replication_baseline_done_bytes`.
pub const REPLICATION_BASELINE_DONE: Def = def(
    "tidemark_replication_baseline_done_bytes",
    GAUGE,
    &["group"],
    "Of those, bytes read and sent (at the secondary: received) so far.",
);
/// `tidemark_replication_baselines_total`.
pub const REPLICATION_BASELINES: Def = def(
    "tidemark_replication_baselines_total",
    COUNTER,
    &["group"],
    "Baselines completed: acknowledged by the partner (primary) or switched to (secondary).",
);
/// `tidemark_replication_overflow_dirty_bytes`.
pub const REPLICATION_OVERFLOW_DIRTY: Def = def(
    "tidemark_replication_overflow_dirty_bytes",
    GAUGE,
    &["group"],
    "Overflow policy resync: bytes of blocks changed since the partner's last acknowledgement that the journal no longer holds (sent as a resync when it returns); 0 when not tracking.",
);
/// `tidemark_replication_write_delay_seconds`.
pub const REPLICATION_WRITE_DELAY: Def = def(
    "tidemark_replication_write_delay_seconds",
    GAUGE,
    &["group"],
    "Overflow policy throttle: how long each host write waits now; 0 when not throttling.",
);
/// `tidemark_replication_link_errors_total`.
pub const REPLICATION_LINK_ERRORS: Def = def(
    "tidemark_replication_link_errors_total",
    COUNTER,
    &["group", "reason"],
    "Replication sessions of this primary that ended with an error, by reason; each is retried with backoff unless diverged or fenced.",
);
/// `tidemark_replication_frames_rejected_total`.
pub const REPLICATION_FRAMES_REJECTED: Def = def(
    "tidemark_replication_frames_rejected_total",
    COUNTER,
    &["group", "reason"],
    "Frames from the partner this secondary refused, by reason; nothing from them was applied.",
);
/// `tidemark_events_total`.
pub const EVENTS: Def = def(
    "tidemark_events_total",
    COUNTER,
    &["source", "action"],
    "Operator events recorded since the site started (audit records, engine and replication events), by source and action.",
);

/// Every metric family the site exports.
pub const FAMILIES: &[Def] = &[
    BUILD_INFO,
    SITE_START_TIME,
    NBD_CONNECTIONS,
    NBD_CONNECTIONS_ACCEPTED,
    NBD_CONNECTIONS_REJECTED,
    NBD_HANDSHAKES_FAILED,
    NBD_CONNECTIONS_FAILED,
    NBD_UNKNOWN_COMMANDS,
    NBD_OPERATIONS,
    NBD_OPERATION_ERRORS,
    NBD_BYTES,
    NBD_OPERATION_DURATION,
    VOLUME_SIZE,
    GROUP_ROLE,
    GROUP_GENERATION,
    GROUP_STATE,
    GROUP_BOOKMARKS,
    GROUP_IMAGES,
    GROUP_ROLLBACKS,
    JOURNAL_SIZE,
    INDEX_VERSIONS,
    INDEX_MEMORY,
    JOURNAL_LIMIT,
    JOURNAL_NEAR_LIMIT,
    JOURNAL_APPENDED_BYTES,
    JOURNAL_APPENDED_RECORDS,
    JOURNAL_FSYNC_DURATION,
    HISTORY_RETENTION,
    HISTORY_WINDOW,
    HISTORY_OLDEST,
    HISTORY_TRIMMED,
    REPLICATION_PROTECTED,
    REPLICATION_STATE,
    REPLICATION_LAG_RECORDS,
    REPLICATION_LAG_BYTES,
    REPLICATION_RPO,
    REPLICATION_SENT_BYTES,
    REPLICATION_SENT_COMPRESSED_BYTES,
    REPLICATION_BATCHES_SENT,
    REPLICATION_BASELINE_BYTES,
    REPLICATION_BASELINE_DONE,
    REPLICATION_BASELINES,
    REPLICATION_OVERFLOW_DIRTY,
    REPLICATION_WRITE_DELAY,
    REPLICATION_BATCH_SIZE,
    REPLICATION_BATCH_SEND_DURATION,
    REPLICATION_BATCH_ACK_DURATION,
    REPLICATION_THROTTLED,
    REPLICATION_LINK_ERRORS,
    REPLICATION_FRAMES_REJECTED,
    EVENTS,
];

/// Replication states a group's state set always lists (a state not listed here is still
/// exported when a group is in it).
const REPLICATION_STATES: [&str; 7] =
    ["connecting", "baseline", "streaming", "paused", "diverged", "fenced", "receiving"];
/// Roles a group's role set always lists.
const ROLES: [&str; 2] = ["primary", "secondary"];
/// Image modes a group's image counts always list.
const IMAGE_MODES: [&str; 2] = ["read-only", "writable"];
/// Health states a group's state set always lists.
const GROUP_STATES: [&str; 3] = ["ok", "poisoned", "failed"];

/// A small fixed set of reasons something is counted by.
pub trait Reason: Copy + std::fmt::Debug + 'static {
    /// Every reason, in index order.
    const ALL: &'static [Self];
    /// Its label value.
    fn name(self) -> &'static str;
    /// Its position in [`Reason::ALL`].
    fn index(self) -> usize;
}

/// One counter per reason.
#[derive(Debug)]
pub struct ReasonCounts<R: Reason> {
    counts: Box<[AtomicU64]>,
    reason: PhantomData<R>,
}

impl<R: Reason> Default for ReasonCounts<R> {
    fn default() -> Self {
        ReasonCounts { counts: R::ALL.iter().map(|_| AtomicU64::new(0)).collect(), reason: PhantomData }
    }
}

impl<R: Reason> ReasonCounts<R> {
    /// Count one.
    pub fn add(&self, reason: R) {
        if let Some(count) = self.counts.get(reason.index()) {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Every reason with its count, zeros included.
    pub fn snapshot(&self) -> Vec<(R, u64)> {
        R::ALL.iter().zip(self.counts.iter()).map(|(r, c)| (*r, c.load(Ordering::Relaxed))).collect()
    }
}

/// Why a secondary refused a frame from its partner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameRejection {
    /// The frame is not a message.
    Malformed,
    /// The frame, or what it decompresses to, is over the size limit.
    Oversized,
    /// The payload does not decompress.
    Decompress,
    /// The content hash does not match.
    HashMismatch,
    /// A record inside is invalid, out of order, or breaks the chain.
    BadRecord,
    /// The batch names another group.
    WrongGroup,
    /// The sender's generation is older than this site's (a deposed primary).
    StaleGeneration,
    /// The batch does not start where this copy ends.
    Gap,
    /// The records do not continue this copy's history.
    Diverged,
    /// A reason this build does not name.
    Other,
}

impl Reason for FrameRejection {
    const ALL: &'static [FrameRejection] = &[
        FrameRejection::Malformed,
        FrameRejection::Oversized,
        FrameRejection::Decompress,
        FrameRejection::HashMismatch,
        FrameRejection::BadRecord,
        FrameRejection::WrongGroup,
        FrameRejection::StaleGeneration,
        FrameRejection::Gap,
        FrameRejection::Diverged,
        FrameRejection::Other,
    ];

    fn name(self) -> &'static str {
        match self {
            FrameRejection::Malformed => "malformed",
            FrameRejection::Oversized => "oversized",
            FrameRejection::Decompress => "decompress",
            FrameRejection::HashMismatch => "hash_mismatch",
            FrameRejection::BadRecord => "bad_record",
            FrameRejection::WrongGroup => "wrong_group",
            FrameRejection::StaleGeneration => "stale_generation",
            FrameRejection::Gap => "gap",
            FrameRejection::Diverged => "diverged",
            FrameRejection::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl FrameRejection {
    /// The reason for a frame that failed its own checks.
    pub fn of_wire(error: &WireError) -> FrameRejection {
        #[allow(unreachable_patterns)] // the protocol crate may grow reasons before this names them
        match error {
            WireError::Malformed(_) => FrameRejection::Malformed,
            WireError::Oversized { .. } => FrameRejection::Oversized,
            WireError::Decompress(_) => FrameRejection::Decompress,
            WireError::HashMismatch { .. } | WireError::ChunkHashMismatch { .. } => {
                FrameRejection::HashMismatch
            }
            WireError::BadRecord { .. } => FrameRejection::BadRecord,
            _ => FrameRejection::Other,
        }
    }

    /// The reason for a batch the receiver refused.
    pub fn of_receiver(error: &ReceiverError) -> FrameRejection {
        #[allow(unreachable_patterns)] // as above
        match error {
            ReceiverError::WrongGroup { .. } => FrameRejection::WrongGroup,
            ReceiverError::StaleGeneration { .. } => FrameRejection::StaleGeneration,
            ReceiverError::Gap { .. } => FrameRejection::Gap,
            ReceiverError::Wire(e) => FrameRejection::of_wire(e),
            _ => FrameRejection::Other,
        }
    }
}

/// Why a primary's replication session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkError {
    /// The stream closed (the partner or the link went away).
    Closed,
    /// The partner did not answer the handshake in time.
    Timeout,
    /// Connecting failed, or the partner said something malformed or out of place.
    Protocol,
    /// The partner refused the group.
    Refused,
    /// The histories differ (never retried).
    Diverged,
    /// A newer primary exists (never retried).
    Fenced,
    /// A local engine call failed.
    Engine,
    /// A reason this build does not name.
    Other,
}

impl Reason for LinkError {
    const ALL: &'static [LinkError] = &[
        LinkError::Closed,
        LinkError::Timeout,
        LinkError::Protocol,
        LinkError::Refused,
        LinkError::Diverged,
        LinkError::Fenced,
        LinkError::Engine,
        LinkError::Other,
    ];

    fn name(self) -> &'static str {
        match self {
            LinkError::Closed => "closed",
            LinkError::Timeout => "timeout",
            LinkError::Protocol => "protocol",
            LinkError::Refused => "refused",
            LinkError::Diverged => "diverged",
            LinkError::Fenced => "fenced",
            LinkError::Engine => "engine",
            LinkError::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl LinkError {
    /// The reason a session ended with `error`.
    pub fn of(error: &SessionError) -> LinkError {
        #[allow(unreachable_patterns)] // the session may grow errors before this names them
        match error {
            SessionError::Closed => LinkError::Closed,
            SessionError::Timeout(_) => LinkError::Timeout,
            SessionError::Protocol(_) => LinkError::Protocol,
            SessionError::Refused(_) => LinkError::Refused,
            SessionError::Diverged(_) => LinkError::Diverged,
            SessionError::Fenced(_) => LinkError::Fenced,
            SessionError::Engine(_) => LinkError::Engine,
            _ => LinkError::Other,
        }
    }
}

/// NBD requests to one export, counted by the export as they are answered.
#[derive(Debug)]
pub struct ExportIo {
    operations: [OperationIo; Operation::ALL.len()],
}

#[derive(Debug)]
struct OperationIo {
    operations_total: AtomicU64,
    errors_total: AtomicU64,
    bytes_total: AtomicU64,
    duration: Histogram,
}

impl Default for ExportIo {
    fn default() -> Self {
        ExportIo {
            operations: std::array::from_fn(|_| OperationIo {
                operations_total: AtomicU64::new(0),
                errors_total: AtomicU64::new(0),
                bytes_total: AtomicU64::new(0),
                duration: Histogram::latency(),
            }),
        }
    }
}

impl ExportIo {
    /// Count one answered request.
    pub fn observe(&self, operation: Operation, bytes: u64, failed: bool, latency: Duration) {
        let Some(io) = self.operations.get(operation.index()) else { return };
        io.operations_total.fetch_add(1, Ordering::Relaxed);
        if failed {
            io.errors_total.fetch_add(1, Ordering::Relaxed);
        } else {
            io.bytes_total.fetch_add(bytes, Ordering::Relaxed);
        }
        io.duration.observe_duration(latency);
    }
}

/// The [`ExportIo`] of every export by name, shared by all connections to it.
#[derive(Debug, Default)]
pub struct NbdIo {
    exports: Mutex<HashMap<String, Arc<ExportIo>>>,
}

impl NbdIo {
    /// The counters of export `name` (made on first use).
    pub fn export(&self, name: &str) -> Arc<ExportIo> {
        self.exports.lock().entry(name.to_string()).or_default().clone()
    }

    /// Forget exports that no longer exist and that no connection still holds, so that creating
    /// and deleting images does not grow this map without end.
    fn retain(&self, live: &HashSet<String>) {
        self.exports.lock().retain(|name, io| live.contains(name) || Arc::strong_count(io) > 1);
    }
}

/// What the collector reads.
pub struct Sources {
    /// The engine.
    pub engine: Arc<Engine>,
    /// Replication.
    pub replication: Arc<Replication>,
    /// The event log.
    pub events: Arc<EventLog>,
    /// The NBD server.
    pub nbd: Arc<NbdServer>,
    /// Per-export NBD counters.
    pub nbd_io: Arc<NbdIo>,
    /// When the site started.
    pub started: SystemTime,
}

/// The site's one collector: every family in [`FAMILIES`], read at scrape time.
pub struct SiteCollector {
    sources: Sources,
    descs: Vec<Desc>,
}

impl SiteCollector {
    /// A collector over `sources`.
    pub fn new(sources: Sources) -> SiteCollector {
        let descs = FAMILIES
            .iter()
            .map(|d| {
                Desc::new(
                    d.name.to_string(),
                    d.help.to_string(),
                    d.labels.iter().map(|l| l.to_string()).collect(),
                    HashMap::new(),
                )
                .expect("metric definitions are valid (checked by a unit test)")
            })
            .collect();
        SiteCollector { sources, descs }
    }

    fn gather(&self, out: &mut Families) {
        let Sources { engine, replication, events, nbd, nbd_io, started } = &self.sources;
        let now = SystemTime::now();
        out.add(BUILD_INFO, &[env!("CARGO_PKG_VERSION")], 1.0);
        out.add(SITE_START_TIME, &[], unix_seconds(*started));

        let stats = nbd.stats();
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        out.add(NBD_CONNECTIONS, &[], load(&stats.connections_active));
        out.add(NBD_CONNECTIONS_ACCEPTED, &[], load(&stats.connections_accepted_total));
        out.add(NBD_CONNECTIONS_REJECTED, &[], load(&stats.connections_rejected_total));
        out.add(NBD_HANDSHAKES_FAILED, &[], load(&stats.handshakes_failed_total));
        out.add(NBD_CONNECTIONS_FAILED, &[], load(&stats.transmissions_failed_total));
        out.add(NBD_UNKNOWN_COMMANDS, &[], load(&stats.unknown_commands_total));

        // Exports: every volume, and every volume of every image.
        let volumes = engine.volumes();
        let images = engine.images();
        let mut live = HashSet::new();
        let exports = volumes.iter().map(|v| (v.name.clone(), v.group.as_str(), v.name.as_str(), "")).chain(
            images.iter().flat_map(|i| {
                i.exports.iter().map(move |e| {
                    let volume = e.split_once('/').map_or(e.as_str(), |(_, v)| v);
                    (e.clone(), i.group.as_str(), volume, i.name.as_str())
                })
            }),
        );
        for (name, group, volume, image) in exports {
            let io = nbd_io.export(&name);
            for operation in Operation::ALL {
                let Some(op) = io.operations.get(operation.index()) else { continue };
                let labels = [group, volume, image, operation.name()];
                out.add(NBD_OPERATIONS, &labels, load(&op.operations_total));
                out.add(NBD_OPERATION_ERRORS, &labels, load(&op.errors_total));
                out.add(NBD_BYTES, &labels, load(&op.bytes_total));
                out.histogram(NBD_OPERATION_DURATION, &labels, &op.duration.snapshot(), 1e-9);
            }
            live.insert(name);
        }
        nbd_io.retain(&live);
        for v in &volumes {
            out.add(VOLUME_SIZE, &[&v.group, &v.name], v.size_bytes as f64);
        }

        let mut images_by_group: BTreeMap<(&str, String), u64> = BTreeMap::new();
        for i in &images {
            *images_by_group.entry((i.group.as_str(), serde_name(&i.mode))).or_default() += 1;
        }

        for info in engine.groups() {
            let g = info.name.as_str();
            state_set(out, GROUP_ROLE, g, &ROLES, &info.role);
            state_set(out, GROUP_STATE, g, &GROUP_STATES, &info.state);
            out.add(GROUP_GENERATION, &[g], info.generation as f64);
            out.add(JOURNAL_SIZE, &[g], info.journal_bytes as f64);
            out.add(JOURNAL_LIMIT, &[g], info.journal_max_bytes as f64);
            out.add(INDEX_VERSIONS, &[g], info.index_versions as f64);
            out.add(INDEX_MEMORY, &[g], info.index_bytes as f64);
            let near = u128::from(info.journal_bytes) * 100 > u128::from(info.journal_max_bytes) * 80;
            out.add(JOURNAL_NEAR_LIMIT, &[g], f64::from(u8::from(near)));
            out.add(HISTORY_RETENTION, &[g], info.retention_seconds as f64);
            out.add(HISTORY_TRIMMED, &[g], events.engine_count("history_trimmed", g) as f64);
            out.add(GROUP_ROLLBACKS, &[g], events.engine_count("rollback_completed", g) as f64);
            for mode in IMAGE_MODES {
                if !images_by_group.contains_key(&(g, mode.to_string())) {
                    out.add(GROUP_IMAGES, &[g, mode], 0.0);
                }
            }
            for ((_, mode), count) in
                images_by_group.range((g, String::new())..).take_while(|((ig, _), _)| *ig == g)
            {
                out.add(GROUP_IMAGES, &[g, mode], *count as f64);
            }
            // A failed group has no journal to read; its state says so.
            let Ok(handle) = engine.group_handle(g) else { continue };
            let journal = handle.journal_stats();
            out.add(JOURNAL_APPENDED_BYTES, &[g], load(&journal.appended_bytes_total));
            out.add(JOURNAL_APPENDED_RECORDS, &[g], load(&journal.appended_records_total));
            out.histogram(JOURNAL_FSYNC_DURATION, &[g], &journal.sync_duration.snapshot(), 1e-9);
            let oldest = Duration::from_nanos(handle.time_of(Seq(info.oldest_seq)).0);
            let oldest = UNIX_EPOCH + oldest;
            out.add(HISTORY_OLDEST, &[g], unix_seconds(oldest));
            out.add(HISTORY_WINDOW, &[g], now.duration_since(oldest).unwrap_or_default().as_secs_f64());
            if let Ok(bookmarks) = engine.bookmarks(g) {
                out.add(GROUP_BOOKMARKS, &[g], bookmarks.len() as f64);
            }

            if let Some(partner) = replication.partner_of(g) {
                out.add(REPLICATION_PROTECTED, &[g, &partner], 1.0);
            }
            let (Some(status), Some(repl)) = (replication.status(g), replication.stats(g)) else { continue };
            let state = serde_name(&status.state);
            state_set(out, REPLICATION_STATE, g, &REPLICATION_STATES, &state);
            out.add(REPLICATION_LAG_RECORDS, &[g], status.lag_records as f64);
            out.add(REPLICATION_LAG_BYTES, &[g], status.lag_bytes as f64);
            out.add(REPLICATION_RPO, &[g], status.rpo_seconds);
            out.add(REPLICATION_SENT_BYTES, &[g], status.bytes_sent_total as f64);
            out.add(REPLICATION_SENT_COMPRESSED_BYTES, &[g], status.bytes_sent_compressed_total as f64);
            out.add(REPLICATION_BATCHES_SENT, &[g], status.batches_sent_total as f64);
            let (total, done) = status.baseline.as_ref().map_or((0, 0), |b| (b.bytes_total, b.bytes_done));
            out.add(REPLICATION_BASELINE_BYTES, &[g], total as f64);
            out.add(REPLICATION_BASELINE_DONE, &[g], done as f64);
            out.add(REPLICATION_BASELINES, &[g], load(&repl.baselines_total));
            if let Some(overflow) = &status.overflow {
                out.add(REPLICATION_OVERFLOW_DIRTY, &[g], overflow.dirty_bytes as f64);
                out.add(REPLICATION_WRITE_DELAY, &[g], overflow.write_delay_ms / 1e3);
            }
            out.histogram(REPLICATION_BATCH_SIZE, &[g], &repl.batch_bytes.snapshot(), 1.0);
            out.histogram(REPLICATION_BATCH_SEND_DURATION, &[g], &repl.batch_send_duration.snapshot(), 1e-9);
            out.histogram(REPLICATION_BATCH_ACK_DURATION, &[g], &repl.batch_ack_duration.snapshot(), 1e-9);
            out.add(REPLICATION_THROTTLED, &[g], load(&repl.throttled_nanos_total) / 1e9);
            for (reason, count) in repl.link_errors.snapshot() {
                out.add(REPLICATION_LINK_ERRORS, &[g, reason.name()], count as f64);
            }
            for (reason, count) in repl.frames_rejected.snapshot() {
                out.add(REPLICATION_FRAMES_REJECTED, &[g, reason.name()], count as f64);
            }
        }

        for (source, action, count) in events.counts() {
            out.add(EVENTS, &[source.name(), &action], count as f64);
        }
    }
}

impl Collector for SiteCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let mut families = Families::default();
        self.gather(&mut families);
        families.0.into_values().collect()
    }
}

/// The metric families of one scrape, by name.
#[derive(Default)]
struct Families(BTreeMap<&'static str, MetricFamily>);

impl Families {
    fn family(&mut self, def: Def) -> &mut MetricFamily {
        self.0.entry(def.name).or_insert_with(|| {
            let mut family = MetricFamily::default();
            family.set_name(def.name.to_string());
            family.set_help(def.help.to_string());
            family.set_field_type(def.kind);
            family
        })
    }

    fn metric(def: Def, values: &[&str]) -> proto::Metric {
        debug_assert_eq!(def.labels.len(), values.len(), "{}", def.name);
        let labels = def
            .labels
            .iter()
            .zip(values)
            .map(|(name, value)| {
                let mut pair = proto::LabelPair::default();
                pair.set_name(name.to_string());
                pair.set_value(value.to_string());
                pair
            })
            .collect();
        proto::Metric::from_label(labels)
    }

    /// One sample of a counter or gauge.
    fn add(&mut self, def: Def, labels: &[&str], value: f64) {
        let mut metric = Families::metric(def, labels);
        match def.kind {
            MetricType::COUNTER => {
                let mut counter = proto::Counter::default();
                counter.set_value(value);
                metric.set_counter(counter);
            }
            _ => {
                let mut gauge = proto::Gauge::default();
                gauge.set_value(value);
                metric.set_gauge(gauge);
            }
        }
        self.family(def).mut_metric().push(metric);
    }

    /// One histogram; `scale` turns the snapshot's unit into the family's base unit.
    fn histogram(&mut self, def: Def, labels: &[&str], snapshot: &HistogramSnapshot, scale: f64) {
        let mut metric = Families::metric(def, labels);
        let mut histogram = proto::Histogram::default();
        let mut cumulative = 0;
        let buckets = snapshot
            .bounds
            .iter()
            .zip(&snapshot.counts)
            .map(|(bound, count)| {
                cumulative += count;
                let mut bucket = proto::Bucket::default();
                bucket.set_upper_bound(*bound as f64 * scale);
                bucket.set_cumulative_count(cumulative);
                bucket
            })
            .collect();
        histogram.set_bucket(buckets);
        histogram.set_sample_count(snapshot.count());
        histogram.set_sample_sum(snapshot.sum as f64 * scale);
        metric.set_histogram(histogram);
        self.family(def).mut_metric().push(metric);
    }
}

/// A state set: 1 for `current`, 0 for every other state in `known` (and `current` exported
/// even when `known` does not list it).
fn state_set(out: &mut Families, def: Def, group: &str, known: &[&str], current: &str) {
    for state in known {
        out.add(def, &[group, state], if *state == current { 1.0 } else { 0.0 });
    }
    if !known.contains(&current) {
        out.add(def, &[group, current], 1.0);
    }
}

/// How the API names a value (`read-only`, `streaming`), for a label.
fn serde_name(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

fn unix_seconds(time: SystemTime) -> f64 {
    time.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64()
}

/// A registry holding the site's collector.
pub fn registry(sources: Sources) -> Registry {
    let registry = Registry::new();
    registry
        .register(Box::new(SiteCollector::new(sources)))
        .expect("the site collector is the registry's only collector");
    registry
}

/// The metrics endpoint's router: `GET /metrics`, nothing else.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new().route("/metrics", get(scrape)).fallback(not_found).with_state(registry)
}

/// The address the endpoint serves, for messages.
pub fn endpoint_url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}

async fn scrape(State(registry): State<Arc<Registry>>) -> Response {
    // Gathering calls the engine, which may wait on a group's lock: not on the async workers.
    let encoded = tokio::task::spawn_blocking(move || {
        let families = registry.gather();
        let mut body = Vec::new();
        TextEncoder::new().encode(&families, &mut body).map(|()| body)
    })
    .await;
    match encoded {
        Ok(Ok(body)) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], body).into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}\n")).into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "gathering metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "gathering metrics failed\n").into_response()
        }
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found: metrics are at /metrics\n").into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names follow docs/metrics.md's rules: prefix, base units last, `_total` exactly on
    /// counters, no unit a histogram's suffixes would clash with, bounded label names only.
    #[test]
    fn metric_definitions_follow_the_naming_rules() {
        let mut seen = HashSet::new();
        for d in FAMILIES {
            assert!(seen.insert(d.name), "{} is defined twice", d.name);
            assert!(d.name.starts_with("tidemark_"), "{}", d.name);
            assert!(
                d.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
                "{}",
                d.name
            );
            assert_eq!(
                d.kind == COUNTER,
                d.name.ends_with("_total"),
                "{}: _total exactly on counters",
                d.name
            );
            for unit in
                ["milliseconds", "microseconds", "nanoseconds", "kilobytes", "megabytes", "_ms", "_us"]
            {
                assert!(!d.name.contains(unit), "{}: use base units", d.name);
            }
            if d.kind == HISTOGRAM {
                assert!(d.name.ends_with("_seconds") || d.name.ends_with("_bytes"), "{}", d.name);
            }
            assert!(d.help.ends_with('.'), "{}: help is a sentence", d.name);
            for label in d.labels {
                assert!(
                    [
                        "group",
                        "volume",
                        "image",
                        "operation",
                        "reason",
                        "partner",
                        "state",
                        "role",
                        "mode",
                        "source",
                        "action",
                        "version"
                    ]
                    .contains(label),
                    "{}: label {label} is not one of the bounded label names",
                    d.name
                );
            }
            Desc::new(
                d.name.into(),
                d.help.into(),
                d.labels.iter().map(|l| l.to_string()).collect(),
                HashMap::new(),
            )
            .unwrap_or_else(|e| panic!("{}: {e}", d.name));
        }
    }

    #[test]
    fn histograms_export_cumulative_buckets_in_base_units() {
        let h = Histogram::latency();
        h.observe_duration(Duration::from_micros(20));
        h.observe_duration(Duration::from_millis(3));
        h.observe_duration(Duration::from_secs(20));
        let mut families = Families::default();
        families.histogram(JOURNAL_FSYNC_DURATION, &["g"], &h.snapshot(), 1e-9);
        let family = families.0.remove(JOURNAL_FSYNC_DURATION.name).expect("family");
        let mut text = Vec::new();
        TextEncoder::new().encode(&[family], &mut text).expect("encode");
        let text = String::from_utf8(text).expect("utf8");
        assert!(
            text.contains("tidemark_journal_fsync_duration_seconds_bucket{group=\"g\",le=\"0.000025\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tidemark_journal_fsync_duration_seconds_bucket{group=\"g\",le=\"0.005\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tidemark_journal_fsync_duration_seconds_bucket{group=\"g\",le=\"10\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tidemark_journal_fsync_duration_seconds_bucket{group=\"g\",le=\"+Inf\"} 3"),
            "{text}"
        );
        assert!(text.contains("tidemark_journal_fsync_duration_seconds_count{group=\"g\"} 3"), "{text}");
        assert!(text.contains("tidemark_journal_fsync_duration_seconds_sum{group=\"g\"} 20.00302"), "{text}");
    }

    #[test]
    fn reason_counts_list_every_reason() {
        let counts = ReasonCounts::<FrameRejection>::default();
        counts.add(FrameRejection::Gap);
        counts.add(FrameRejection::Gap);
        let snapshot = counts.snapshot();
        assert_eq!(snapshot.len(), FrameRejection::ALL.len());
        assert!(snapshot.contains(&(FrameRejection::Gap, 2)));
        assert!(snapshot.iter().all(|(r, c)| *r == FrameRejection::Gap || *c == 0));
        for (i, r) in FrameRejection::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        for (i, r) in LinkError::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }
}
