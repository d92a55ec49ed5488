//! The group's small durable files: the control file (horizon, volumes at the horizon, role and
//! generation) and the index checkpoint (derived state that makes start-up time independent of
//! the journal's length).
//!
//! Both use one frame: magic (8 bytes), format version (u32 LE), body length (u32 LE), postcard
//! body, blake3 of everything before it truncated to 16 bytes. Both are replaced atomically
//! (temp file, fdatasync, rename, directory sync).

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tidemark_journal::storage::{read_file, replace_file, Storage};
use tidemark_journal::{ResumePoint, Seq, UnixNanos, VolumeId};

use crate::index::Versions;

/// Magic of the control file.
pub const CONTROL_MAGIC: [u8; 8] = *b"TDMKCTRL";
/// Magic of the checkpoint file.
pub const CHECKPOINT_MAGIC: [u8; 8] = *b"TDMKCKPT";
/// Format version of both files.
pub const FORMAT_VERSION: u32 = 1;
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
    /// Fencing generation of the primary role.
    pub generation: u64,
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

/// The index checkpoint: the group's derived state after the record before `resume`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Checkpoint {
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
    /// Seq of `times[0]`.
    pub times_first_seq: Seq,
    /// Source time of every record from `times_first_seq` on.
    pub times: Vec<u64>,
    /// Per volume, every block with versions.
    pub index: Vec<(VolumeId, Vec<(u64, Versions)>)>,
}

/// Write `value` framed under `magic` to `name`, atomically.
pub fn write_framed<T: Serialize>(
    storage: &dyn Storage,
    name: &str,
    magic: [u8; 8],
    value: &T,
) -> std::io::Result<()> {
    let body = postcard::to_stdvec(value).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(body.len() + 32);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let len = u32::try_from(body.len()).map_err(|_| std::io::Error::other("state too large for one file"))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    let sum = blake3::hash(&out);
    out.extend_from_slice(&sum.as_bytes()[..16]);
    replace_file(storage, name, &out)
}

/// Read a framed file: `Ok(None)` when absent, `Err(reason)` when present but invalid.
pub fn read_framed<T: DeserializeOwned>(
    storage: &dyn Storage,
    name: &str,
    magic: [u8; 8],
) -> Result<Option<T>, String> {
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
    if version != FORMAT_VERSION {
        return Err(format!("format version {version} is not supported (this build reads {FORMAT_VERSION})"));
    }
    let len =
        u32::from_le_bytes(framed.get(12..16).and_then(|b| b.try_into().ok()).unwrap_or_default()) as usize;
    let body = framed.get(16..).filter(|b| b.len() == len).ok_or("body length mismatch")?;
    postcard::from_bytes(body).map(Some).map_err(|e| format!("undecodable: {e}"))
}
