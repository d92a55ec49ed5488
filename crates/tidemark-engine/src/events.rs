//! Operator events the engine raises: things an administrator must hear about.

use serde::Serialize;

/// Something an operator should know happened.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EngineEvent {
    /// The journal's size limit cut into the retention window: older history is gone.
    HistoryTrimmed {
        /// Group name.
        group: String,
        /// New oldest recoverable seq.
        oldest_seq: u64,
        /// New oldest recoverable time (RFC 3339).
        oldest_time: String,
        /// Journal bytes after trimming.
        journal_bytes: u64,
    },
    /// The journal passed 80% of its limit: history will soon be trimmed, or, if something pins
    /// it (an image, a partner that has not caught up), the journal will pass its limit.
    JournalNearLimit {
        /// Group name.
        group: String,
        /// Journal bytes now.
        journal_bytes: u64,
        /// The group's limit.
        journal_max_bytes: u64,
    },
    /// The journal is over its limit but an image pins the history it would trim.
    JournalPinned {
        /// Group name.
        group: String,
        /// Journal bytes now.
        journal_bytes: u64,
        /// Oldest seq an image still needs.
        pinned_seq: u64,
    },
    /// A torn tail was cut off at start-up (unsynced writes from before a crash).
    TornTailTruncated {
        /// Group name.
        group: String,
        /// Segment index.
        segment: u64,
        /// Byte offset where the tail was cut.
        offset: u64,
        /// Bytes discarded.
        bytes: u64,
    },
    /// An fsync failed: the group refuses writes until the site restarts.
    GroupPoisoned {
        /// Group name.
        group: String,
        /// The failure.
        reason: String,
    },
    /// The group could not be opened (corruption); other groups keep running.
    GroupFailed {
        /// Group name.
        group: String,
        /// What was found, with file and offset.
        reason: String,
    },
    /// The index checkpoint was unusable and was rebuilt from the journal.
    CheckpointDiscarded {
        /// Group name.
        group: String,
        /// Why it was unusable.
        reason: String,
    },
    /// A rollback interrupted by a crash was resumed at start-up.
    RollbackResumed {
        /// Group name.
        group: String,
        /// The seq being restored.
        target: u64,
    },
    /// A rollback finished.
    RollbackCompleted {
        /// Group name.
        group: String,
        /// The seq restored.
        target: u64,
        /// Bytes rewritten.
        bytes_rewritten: u64,
    },
    /// The group's role here changed.
    RoleChanged {
        /// Group name.
        group: String,
        /// `primary` or `secondary` before.
        from: String,
        /// After.
        to: String,
        /// Generation after.
        generation: u64,
        /// Why.
        reason: String,
    },
    /// A returning primary kept the writes its partner never received as a salvage image.
    SalvageKept {
        /// Group name.
        group: String,
        /// The image.
        image: String,
        /// Last shared seq.
        fork_seq: u64,
        /// Blocks kept.
        blocks: u64,
    },
    /// The group's history was cut back to a fork point (failback).
    Rewound {
        /// Group name.
        group: String,
        /// The fork point.
        seq: u64,
        /// Records removed.
        records: u64,
    },
    /// A secondary switched to a complete baseline from its partner: its copy is the partner's
    /// image at `seq`, and its own history before it is gone.
    BaselineInstalled {
        /// Group name.
        group: String,
        /// The baseline's seq.
        seq: u64,
        /// Bytes received (allocated, non-zero blocks).
        bytes: u64,
    },
}

impl EngineEvent {
    /// Short machine name of the event kind.
    pub fn kind(&self) -> &'static str {
        match self {
            EngineEvent::HistoryTrimmed { .. } => "history_trimmed",
            EngineEvent::JournalNearLimit { .. } => "journal_near_limit",
            EngineEvent::JournalPinned { .. } => "journal_pinned",
            EngineEvent::TornTailTruncated { .. } => "torn_tail_truncated",
            EngineEvent::GroupPoisoned { .. } => "group_poisoned",
            EngineEvent::GroupFailed { .. } => "group_failed",
            EngineEvent::CheckpointDiscarded { .. } => "checkpoint_discarded",
            EngineEvent::RollbackResumed { .. } => "rollback_resumed",
            EngineEvent::RollbackCompleted { .. } => "rollback_completed",
            EngineEvent::RoleChanged { .. } => "role_changed",
            EngineEvent::SalvageKept { .. } => "salvage_kept",
            EngineEvent::Rewound { .. } => "rewound",
            EngineEvent::BaselineInstalled { .. } => "baseline_installed",
        }
    }

    /// The group it concerns.
    pub fn group(&self) -> Option<&str> {
        match self {
            EngineEvent::HistoryTrimmed { group, .. }
            | EngineEvent::JournalNearLimit { group, .. }
            | EngineEvent::JournalPinned { group, .. }
            | EngineEvent::TornTailTruncated { group, .. }
            | EngineEvent::GroupPoisoned { group, .. }
            | EngineEvent::GroupFailed { group, .. }
            | EngineEvent::CheckpointDiscarded { group, .. }
            | EngineEvent::RollbackResumed { group, .. }
            | EngineEvent::RollbackCompleted { group, .. }
            | EngineEvent::RoleChanged { group, .. }
            | EngineEvent::SalvageKept { group, .. }
            | EngineEvent::Rewound { group, .. }
            | EngineEvent::BaselineInstalled { group, .. } => Some(group),
        }
    }

    /// One line for people.
    pub fn message(&self) -> String {
        match self {
            EngineEvent::HistoryTrimmed { group, oldest_time, journal_bytes, .. } => format!(
                "group {group}: journal reached its size limit ({journal_bytes} bytes); history before {oldest_time} was trimmed inside the retention window"
            ),
            EngineEvent::JournalNearLimit { group, journal_bytes, journal_max_bytes } => format!(
                "group {group}: journal at {journal_bytes} bytes, past 80% of its {journal_max_bytes}-byte limit; history will be trimmed or, if pinned, the limit passed"
            ),
            EngineEvent::JournalPinned { group, journal_bytes, pinned_seq } => format!(
                "group {group}: journal is over its limit ({journal_bytes} bytes) but an image pins seq {pinned_seq}; delete old images to let history be trimmed"
            ),
            EngineEvent::TornTailTruncated { group, segment, offset, bytes } => format!(
                "group {group}: cut a torn journal tail of {bytes} bytes at segment {segment} offset {offset} (writes never flushed before a crash)"
            ),
            EngineEvent::GroupPoisoned { group, reason } => {
                format!("group {group}: refusing writes after a failed fsync ({reason}); restart the site")
            }
            EngineEvent::GroupFailed { group, reason } => format!("group {group}: failed to open: {reason}"),
            EngineEvent::CheckpointDiscarded { group, reason } => {
                format!("group {group}: index checkpoint unusable ({reason}); rebuilt from the journal")
            }
            EngineEvent::RollbackResumed { group, target } => {
                format!("group {group}: resuming the rollback to seq {target} interrupted by a crash")
            }
            EngineEvent::RollbackCompleted { group, target, bytes_rewritten } => {
                format!("group {group}: rolled back to seq {target}, {bytes_rewritten} bytes rewritten")
            }
            EngineEvent::RoleChanged { group, from, to, generation, reason } => {
                format!("group {group}: {from} -> {to} at generation {generation} ({reason})")
            }
            EngineEvent::SalvageKept { group, image, fork_seq, blocks } => format!(
                "group {group}: kept {blocks} blocks written after fork point seq {fork_seq}, which the partner never received, as image {image}"
            ),
            EngineEvent::Rewound { group, seq, records } => {
                format!("group {group}: rewound to fork point seq {seq}, {records} divergent records removed")
            }
            EngineEvent::BaselineInstalled { group, seq, bytes } => format!(
                "group {group}: switched to a baseline of the partner's image at seq {seq} ({bytes} bytes); history before it is gone"
            ),
        }
    }
}

/// Where the engine sends events.
pub trait EventSink: Send + Sync {
    /// Record one event.
    fn event(&self, event: EngineEvent);
}

/// Drops events; for tests that do not look at them.
pub struct NullEvents;

impl EventSink for NullEvents {
    fn event(&self, _event: EngineEvent) {}
}

/// Keeps events in memory; for tests.
#[derive(Default)]
pub struct MemoryEvents(pub parking_lot::Mutex<Vec<EngineEvent>>);

impl EventSink for MemoryEvents {
    fn event(&self, event: EngineEvent) {
        self.0.lock().push(event);
    }
}
