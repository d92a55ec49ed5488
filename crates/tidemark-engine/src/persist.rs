//! The group's small durable files: the control file (horizon, volumes at the horizon, role and
//! generation) and the index checkpoint (derived state that makes start-up time independent of
//! the journal's length).
//!
//! Both use one frame: magic (8 bytes), format version (u32 LE), body length (u32 LE), postcard
//! body, blake3 of everything before it truncated to 16 bytes. Both are replaced atomically
//! (temp file, fdatasync, rename, directory sync).

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tidemark_journal::storage::{read_file, replace_file, Storage};
pub use tidemark_journal::GenerationStart;
use tidemark_journal::{ResumePoint, Seq, UnixNanos, VolumeId};

use crate::index::VolumeIndex;
use crate::times::RecordTimes;

/// Magic of the control file.
pub const CONTROL_MAGIC: [u8; 8] = *b"TDMKCTRL";
/// Magic of the checkpoint file.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"TDMKCKPT";
/// Format version of the framed files but the control file and the checkpoint (which have
/// their own, [`CONTROL_FORMAT_VERSION`] and [`CHECKPOINT_FORMAT_VERSION`]).
pub const FORMAT_VERSION: u32 = 1;
/// Format version of the checkpoint. 2: the index as one flat list of (block, version) pairs
/// without segment numbers, record times in chunks of 32-bit offsets. A checkpoint of another
/// version is discarded at start-up (it is derived state) and the index rebuilt from the journal.
pub const CHECKPOINT_FORMAT_VERSION: u32 = 2;
/// File name of the control file in a group's directory.
pub const CONTROL_FILE: &str = "control";
/// File name of the checkpoint in a group's directory.
pub const CHECKPOINT_FILE: &str = "checkpoint";

/// A volume's description, as the journal's control records establish it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Id within the group.
    pub id: VolumeId,
    /// Site-unique name.
    pub name: String,
    /// Logical size in bytes.
    pub size_bytes: u64,
    /// Block size in bytes.
    pub block_size_bytes: u32,
}

/// The group's role at this site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Accepts host writes.
    Primary,
    /// Applies a partner's journal; refuses host writes.
    Secondary,
}

/// The control file: what must be known before the journal can be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// The group's id (also in every segment header).
    pub group_id: u64,
    /// Oldest recoverable seq: points before it are refused. Raised before the base changes.
    pub horizon: Seq,
    /// Source time of the record at the horizon.
    pub horizon_time: UnixNanos,
    /// The base images hold the state at this seq. Equals `horizon` except after a crash in the
    /// middle of advancing it, which start-up finishes.
    pub base_applied: Seq,
    /// Volumes as they were at the horizon (their creation records may have been trimmed).
    pub volumes: Vec<VolumeMeta>,
    /// The group's role here.
    pub role: Role,
    /// Fencing generation of the primary role: the newest this site knows.
    pub generation: u64,
    /// Where each generation's history begins, oldest first: the group's lineage, compared
    /// with a partner's to find where two histories fork.
    pub generations: Vec<GenerationStart>,
    /// Role changes at this site, oldest first, at most [`ROLE_CHANGES_MAX`].
    pub role_changes: Vec<RoleChange>,
    /// Where this site's newest takeover forked the history (`None` if it never took over).
    pub fork_point: Option<ForkPoint>,
    /// A swap this site started as primary and that has not finished: no host writes are
    /// admitted until the partner's answer settles which site is primary.
    pub swap_pending: Option<SwapPending>,
    /// A rewind to this seq was started and not finished (start-up finishes it).
    pub rewind_to: Option<Seq>,
}

/// Role changes kept in the control file; older ones are dropped (the event log keeps them all).
pub const ROLE_CHANGES_MAX: usize = 64;

/// One role change at this site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChange {
    /// When, as a Unix time.
    pub time: UnixNanos,
    /// Role before.
    pub from: Role,
    /// Role after.
    pub to: Role,
    /// Generation after.
    pub generation: u64,
    /// Why (`swap`, `takeover`, `fenced by partner ...`, `failback ...`).
    pub reason: String,
}

/// Where a takeover forked the history: the last record both sites share.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkPoint {
    /// The generation the takeover started.
    pub generation: u64,
    /// Last seq of the shared history.
    pub seq: Seq,
    /// Chain hash after `seq`.
    pub chain: [u8; 32],
    /// Source time of `seq`.
    pub time: UnixNanos,
}

/// A swap in progress at the old primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwapPending {
    /// The generation the partner is to become primary under.
    pub generation: u64,
    /// The last seq both sites hold.
    pub last_seq: Seq,
}

impl ControlState {
    /// A new group's control state: the given role, one generation starting at seq 1.
    pub fn new(group_id: u64, time: UnixNanos, role: Role, generation: u64) -> ControlState {
        ControlState {
            group_id,
            horizon: Seq(0),
            horizon_time: time,
            base_applied: Seq(0),
            volumes: Vec::new(),
            role,
            generation,
            generations: vec![GenerationStart { generation, first_seq: Seq(1) }],
            role_changes: Vec::new(),
            fork_point: None,
            swap_pending: None,
            rewind_to: None,
        }
    }

    /// Record a role change, keeping at most [`ROLE_CHANGES_MAX`].
    pub fn note_role_change(&mut self, change: RoleChange) {
        self.role_changes.push(change);
        let excess = self.role_changes.len().saturating_sub(ROLE_CHANGES_MAX);
        self.role_changes.drain(..excess);
    }
}

/// The control file as format version 1 wrote it (before generations had a history); read and
/// upgraded at start-up, written back as version 2 at the next change.
#[derive(Deserialize, Serialize)]
struct ControlStateV1 {
    group_id: u64,
    horizon: Seq,
    horizon_time: UnixNanos,
    base_applied: Seq,
    volumes: Vec<VolumeMeta>,
    role: Role,
    generation: u64,
}

/// Format version of the control file this build writes.
pub const CONTROL_FORMAT_VERSION: u32 = 2;

/// Read the control file, upgrading a version 1 file: `Ok(None)` when absent.
pub fn read_control(storage: &dyn Storage) -> Result<Option<ControlState>, String> {
    read_control_from(storage, CONTROL_FILE)
}

/// Read a control state from file `name` (the control file, or a staged one).
pub fn read_control_from(storage: &dyn Storage, name: &str) -> Result<Option<ControlState>, String> {
    let Some((version, body)) = read_frame(storage, name, CONTROL_MAGIC)? else { return Ok(None) };
    match version {
        1 => {
            let v1: ControlStateV1 = postcard::from_bytes(&body).map_err(|e| format!("undecodable: {e}"))?;
            let mut control = ControlState::new(v1.group_id, v1.horizon_time, v1.role, v1.generation);
            control.horizon = v1.horizon;
            control.base_applied = v1.base_applied;
            control.volumes = v1.volumes;
            // Version 1 never changed generations: the whole history is the one it knows.
            Ok(Some(control))
        }
        CONTROL_FORMAT_VERSION => {
            postcard::from_bytes(&body).map(Some).map_err(|e| format!("undecodable: {e}"))
        }
        other => Err(format!(
            "format version {other} is not supported (this build reads 1 and {CONTROL_FORMAT_VERSION})"
        )),
    }
}

/// Write the control file atomically (format version [`CONTROL_FORMAT_VERSION`]).
pub fn write_control(storage: &dyn Storage, control: &ControlState) -> std::io::Result<()> {
    write_control_to(storage, CONTROL_FILE, control)
}

/// Write a control state atomically to file `name` (the control file, or a staged one).
pub fn write_control_to(storage: &dyn Storage, name: &str, control: &ControlState) -> std::io::Result<()> {
    write_frame(storage, name, CONTROL_MAGIC, CONTROL_FORMAT_VERSION, control)
}

/// A bookmark in the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookmarkEntry {
    /// Name.
    pub name: String,
    /// Seq of the bookmark record (the state it names).
    pub seq: Seq,
    /// Its time.
    pub time: UnixNanos,
}

/// A rollback in the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollbackEntry {
    /// The seq whose state was restored.
    pub target: Seq,
    /// Seq of the begin record.
    pub begin: Seq,
    /// Seq of the end record (`None` while in progress).
    pub end: Option<Seq>,
    /// Bytes rewritten so far.
    pub bytes_rewritten: u64,
}

/// The index checkpoint: the group's derived state after the record before `resume`. It borrows
/// the large tables when written (encoded under the group lock without a copy) and owns them
/// when read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checkpoint<'a> {
    /// Where the journal scan resumes.
    pub resume: ResumePoint,
    /// Horizon at the time of the checkpoint; versions at or before it were dropped.
    pub horizon: Seq,
    /// Volumes (live, not deleted).
    pub volumes: Vec<VolumeMeta>,
    /// Bookmarks after the horizon.
    pub bookmarks: Vec<BookmarkEntry>,
    /// Rollbacks after the horizon.
    pub rollbacks: Vec<RollbackEntry>,
    /// Source time of every record after the horizon.
    pub times: Cow<'a, RecordTimes>,
    /// Per volume, every version of every block after the horizon.
    pub index: Vec<(VolumeId, Cow<'a, VolumeIndex>)>,
}

/// Encode a checkpoint as its file's bytes (written later, outside the group lock, with
/// [`replace_file`]).
pub fn encode_checkpoint(checkpoint: &Checkpoint) -> std::io::Result<Vec<u8>> {
    encode_frame(CHECKPOINT_MAGIC, CHECKPOINT_FORMAT_VERSION, checkpoint)
}

/// Read the checkpoint: `Ok(None)` when absent, `Err(reason)` when present but unusable.
pub fn read_checkpoint(storage: &dyn Storage) -> Result<Option<Checkpoint<'static>>, String> {
    let Some((version, body)) = read_frame(storage, CHECKPOINT_FILE, CHECKPOINT_MAGIC)? else {
        return Ok(None);
    };
    if version != CHECKPOINT_FORMAT_VERSION {
        return Err(format!(
            "format version {version} is not supported (this build reads {CHECKPOINT_FORMAT_VERSION})"
        ));
    }
    postcard::from_bytes(&body).map(Some).map_err(|e| format!("undecodable: {e}"))
}

/// Write `value` framed under `magic` to `name`, atomically.
pub fn write_framed<T: Serialize>(
    storage: &dyn Storage,
    name: &str,
    magic: [u8; 8],
    value: &T,
) -> std::io::Result<()> {
    write_frame(storage, name, magic, FORMAT_VERSION, value)
}

fn write_frame<T: Serialize>(
    storage: &dyn Storage,
    name: &str,
    magic: [u8; 8],
    version: u32,
    value: &T,
) -> std::io::Result<()> {
    replace_file(storage, name, &encode_frame(magic, version, value)?)
}

fn encode_frame<T: Serialize>(magic: [u8; 8], version: u32, value: &T) -> std::io::Result<Vec<u8>> {
    // Header with a length placeholder, then the body encoded in place (no second copy of a
    // checkpoint's body).
    let mut out = Vec::new();
    out.extend_from_slice(&magic);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    let mut out = postcard::to_extend(value, out).map_err(std::io::Error::other)?;
    let len =
        u32::try_from(out.len() - 16).map_err(|_| std::io::Error::other("state too large for one file"))?;
    out[12..16].copy_from_slice(&len.to_le_bytes());
    let sum = blake3::hash(&out);
    out.extend_from_slice(&sum.as_bytes()[..16]);
    Ok(out)
}

/// Read a framed file: `Ok(None)` when absent, `Err(reason)` when present but invalid.
pub fn read_framed<T: DeserializeOwned>(
    storage: &dyn Storage,
    name: &str,
    magic: [u8; 8],
) -> Result<Option<T>, String> {
    let Some((version, body)) = read_frame(storage, name, magic)? else { return Ok(None) };
    if version != FORMAT_VERSION {
        return Err(format!("format version {version} is not supported (this build reads {FORMAT_VERSION})"));
    }
    postcard::from_bytes(&body).map(Some).map_err(|e| format!("undecodable: {e}"))
}

/// Read and check a frame: its format version and body.
fn read_frame(storage: &dyn Storage, name: &str, magic: [u8; 8]) -> Result<Option<(u32, Vec<u8>)>, String> {
    let Some(bytes) = read_file(storage, name).map_err(|e| format!("cannot read: {e}"))? else {
        return Ok(None);
    };
    if bytes.len() < 32 {
        return Err("file is too short".into());
    }
    let (framed, sum) = bytes.split_at(bytes.len() - 16);
    if &blake3::hash(framed).as_bytes()[..16] != sum {
        return Err("checksum mismatch".into());
    }
    if framed.get(..8) != Some(&magic[..]) {
        return Err("bad magic".into());
    }
    let version = u32::from_le_bytes(framed.get(8..12).and_then(|b| b.try_into().ok()).unwrap_or_default());
    let len =
        u32::from_le_bytes(framed.get(12..16).and_then(|b| b.try_into().ok()).unwrap_or_default()) as usize;
    let body = framed.get(16..).filter(|b| b.len() == len).ok_or("body length mismatch")?;
    Ok(Some((version, body.to_vec())))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tidemark_journal::storage::SimStorage;

    use super::*;

    #[test]
    fn a_version_1_control_file_is_read_and_upgraded() {
        let storage: Arc<dyn Storage> = Arc::new(SimStorage::new());
        let v1 = ControlStateV1 {
            group_id: 7,
            horizon: Seq(10),
            horizon_time: UnixNanos(5),
            base_applied: Seq(10),
            volumes: Vec::new(),
            role: Role::Secondary,
            generation: 3,
        };
        write_frame(&*storage, CONTROL_FILE, CONTROL_MAGIC, 1, &v1).expect("write v1");
        let control = read_control(&*storage).expect("read").expect("present");
        assert_eq!((control.group_id, control.horizon, control.base_applied), (7, Seq(10), Seq(10)));
        assert_eq!((control.role, control.generation), (Role::Secondary, 3));
        assert_eq!(control.generations, vec![GenerationStart { generation: 3, first_seq: Seq(1) }]);
        assert!(control.role_changes.is_empty() && control.swap_pending.is_none());
        write_control(&*storage, &control).expect("write v2");
        assert_eq!(read_control(&*storage).expect("read").expect("present"), control);
    }

    #[test]
    fn role_changes_are_bounded() {
        let mut control = ControlState::new(1, UnixNanos(0), Role::Primary, 1);
        for generation in 0..(ROLE_CHANGES_MAX as u64 + 10) {
            control.note_role_change(RoleChange {
                time: UnixNanos(generation),
                from: Role::Primary,
                to: Role::Secondary,
                generation,
                reason: "test".into(),
            });
        }
        assert_eq!(control.role_changes.len(), ROLE_CHANGES_MAX);
        assert_eq!(control.role_changes.first().map(|c| c.generation), Some(10));
    }
}
