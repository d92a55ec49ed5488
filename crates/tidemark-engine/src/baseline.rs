//! Receiving a baseline: the partner's whole image at one seq S, staged beside the group's
//! current copy and switched to in one crash-safe step once it is complete, so a secondary
//! always holds a consistent image (DESIGN.md, "Initial sync and resync").
//!
//! Staged files live in the group's own directory under [`STAGED_PREFIX`]: the base chunks
//! (`baseline.base-*.img`) and, once every chunk is durable, the new control state
//! ([`STAGED_CONTROL`]), whose presence is the commit point. The switch, which start-up finishes
//! when a crash interrupts it:
//!
//! 1. while `control` still holds the old state: remove the old journal segments, checkpoint
//!    and base chunks;
//! 2. replace `control` with the staged state (horizon S, the volumes, the partner's lineage);
//! 3. rename the staged chunks to their live names;
//! 4. create an empty journal whose first record is S + 1, after the chain hash at S;
//! 5. remove the staged control file.
//!
//! Before the commit point, start-up removes the staged files and the old copy is untouched.

use std::sync::Arc;

use tidemark_journal::journal::JournalConfig;
use tidemark_journal::storage::{read_file, replace_file, Storage};
use tidemark_journal::{ChainHash, GenerationStart, Journal, Seq, UnixNanos};

use crate::base::{BaseImage, STAGED_PREFIX};
use crate::error::{EngineError, Result};
use crate::persist::{
    read_control_from, read_framed, write_control_to, write_framed, ControlState, Role, VolumeMeta,
    CONTROL_FILE,
};

/// The staged control state: its presence means the staged baseline is complete.
pub const STAGED_CONTROL: &str = "baseline.control";
/// The chain hash at the baseline's seq, written just before the staged control state.
pub const STAGED_CHAIN: &str = "baseline.chain";
const CHAIN_MAGIC: [u8; 8] = *b"TMBLCHN1";

/// What a baseline installs: the partner's state at `seq`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaselineTarget {
    /// The seq whose image the baseline is.
    pub seq: Seq,
    /// Chain hash after `seq`: the next record must continue it.
    pub chain: ChainHash,
    /// Source time of `seq`.
    pub time: UnixNanos,
    /// The partner's generation.
    pub generation: u64,
    /// The partner's lineage.
    pub generations: Vec<GenerationStart>,
    /// The volumes at `seq`.
    pub volumes: Vec<VolumeMeta>,
}

/// A baseline being received into a group's directory.
pub struct StagedBaseline {
    storage: Arc<dyn Storage>,
    target: BaselineTarget,
    bases: Vec<(VolumeMeta, BaseImage)>,
    bytes: u64,
}

impl StagedBaseline {
    /// Start staging `target` in `storage`, discarding whatever an earlier, unfinished baseline
    /// left there.
    pub fn begin(storage: Arc<dyn Storage>, target: BaselineTarget) -> Result<StagedBaseline> {
        discard(&storage)?;
        for (i, meta) in target.volumes.iter().enumerate() {
            if meta.block_size_bytes == 0 || !meta.block_size_bytes.is_power_of_two() {
                return Err(EngineError::InvalidArgument(format!(
                    "baseline volume {:?}: block size {} is not a power of two",
                    meta.name, meta.block_size_bytes
                )));
            }
            if target.volumes[..i].iter().any(|m| m.id == meta.id || m.name == meta.name) {
                return Err(EngineError::InvalidArgument(format!(
                    "baseline volume {:?} (id {}) is listed twice",
                    meta.name, meta.id.0
                )));
            }
        }
        let bases = target
            .volumes
            .iter()
            .map(|meta| (meta.clone(), BaseImage::staged(storage.clone(), meta.id)))
            .collect();
        Ok(StagedBaseline { storage, target, bases, bytes: 0 })
    }

    /// What is being staged.
    pub fn target(&self) -> &BaselineTarget {
        &self.target
    }

    /// Bytes staged so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Stage `data` at `offset` of volume `volume` (its id): whole blocks inside the volume.
    pub fn write(&mut self, volume: u32, offset: u64, data: &[u8]) -> Result<()> {
        let Some((meta, base)) = self.bases.iter().find(|(m, _)| m.id.0 == volume) else {
            return Err(EngineError::InvalidArgument(format!(
                "baseline data for unknown volume id {volume}"
            )));
        };
        let bs = u64::from(meta.block_size_bytes);
        let len = data.len() as u64;
        let end = offset.checked_add(len).filter(|&e| e <= meta.size_bytes);
        if end.is_none() || !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(EngineError::InvalidArgument(format!(
                "baseline data for volume {:?} at {offset}+{len} is not whole blocks of {bs} bytes inside its {} bytes",
                meta.name, meta.size_bytes
            )));
        }
        base.write(offset, data).map_err(|source| EngineError::Io {
            action: "write staged baseline",
            path: base.describe(offset),
            source,
        })?;
        self.bytes += len;
        Ok(())
    }

    /// Make every staged chunk durable and write the staged control state: the commit point.
    /// `current` is the group's control state now (its id and role history are kept).
    pub fn commit(self, current: &ControlState) -> Result<()> {
        for (_, base) in &self.bases {
            base.sync().map_err(|source| EngineError::Io {
                action: "sync staged baseline",
                path: base.describe(0),
                source,
            })?;
        }
        self.storage.sync_dir().map_err(io("sync group directory", &*self.storage, ""))?;
        let t = &self.target;
        let mut control = current.clone();
        control.horizon = t.seq;
        control.horizon_time = t.time;
        control.base_applied = t.seq;
        control.volumes = t.volumes.clone();
        control.role = Role::Secondary;
        control.generation = t.generation;
        control.generations = t.generations.clone();
        control.fork_point = None;
        control.swap_pending = None;
        control.rewind_to = None;
        write_framed(&*self.storage, STAGED_CHAIN, CHAIN_MAGIC, &t.chain.0).map_err(io(
            "write staged chain",
            &*self.storage,
            STAGED_CHAIN,
        ))?;
        write_control_to(&*self.storage, STAGED_CONTROL, &control).map_err(io(
            "write staged control file",
            &*self.storage,
            STAGED_CONTROL,
        ))
    }
}

fn io(action: &'static str, storage: &dyn Storage, name: &str) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = storage.describe(name);
    move |source| EngineError::Io { action, path, source }
}

/// Remove a staged baseline that never reached its commit point.
pub fn discard(storage: &Arc<dyn Storage>) -> Result<()> {
    let staged: Vec<String> = list(storage)?.into_iter().filter(|n| n.starts_with(STAGED_PREFIX)).collect();
    for name in &staged {
        storage.remove(name).map_err(io("remove staged baseline file", &**storage, name))?;
    }
    if !staged.is_empty() {
        storage.sync_dir().map_err(io("sync group directory", &**storage, ""))?;
    }
    Ok(())
}

fn list(storage: &Arc<dyn Storage>) -> Result<Vec<String>> {
    storage.list().map_err(io("list group directory", &**storage, ""))
}

/// Finish a committed baseline's switch (steps 1 to 5 above), or discard an uncommitted one.
/// Returns the seq of the baseline installed, if one was. Call before reading the control file.
pub fn recover(
    storage: &Arc<dyn Storage>,
    group_id: u64,
    name: &str,
    config: JournalConfig,
) -> Result<Option<Seq>> {
    let failed = |reason: String| EngineError::Failed { group: name.into(), reason };
    let staged = read_file(&**storage, STAGED_CONTROL).map_err(io(
        "read staged control file",
        &**storage,
        STAGED_CONTROL,
    ))?;
    let Some(staged) = staged else {
        discard(storage)?;
        return Ok(None);
    };
    let control = read_control_from(&**storage, STAGED_CONTROL)
        .map_err(|reason| {
            failed(format!("staged control file {}: {reason}", storage.describe(STAGED_CONTROL).display()))
        })?
        .ok_or_else(|| failed(format!("staged control file {STAGED_CONTROL} vanished")))?;
    let chain: [u8; 32] = read_framed(&**storage, STAGED_CHAIN, CHAIN_MAGIC)
        .map_err(|reason| {
            failed(format!("staged chain {}: {reason}", storage.describe(STAGED_CHAIN).display()))
        })?
        .ok_or_else(|| {
            failed(format!("staged baseline: {STAGED_CHAIN} is missing beside {STAGED_CONTROL}"))
        })?;
    let chain = ChainHash(chain);
    let live =
        read_file(&**storage, CONTROL_FILE).map_err(io("read control file", &**storage, CONTROL_FILE))?;
    if live.as_deref() != Some(&staged[..]) {
        // 1: the old copy goes; 2: the new state is the group's.
        for file in list(storage)? {
            if file != CONTROL_FILE && !file.starts_with(STAGED_PREFIX) {
                storage.remove(&file).map_err(io("remove replaced file", &**storage, &file))?;
            }
        }
        storage.sync_dir().map_err(io("sync group directory", &**storage, ""))?;
        replace_file(&**storage, CONTROL_FILE, &staged).map_err(io(
            "write control file",
            &**storage,
            CONTROL_FILE,
        ))?;
    }
    // 3: the staged chunks become the base.
    for file in list(storage)? {
        if let Some(live) =
            file.strip_prefix(STAGED_PREFIX).filter(|n| n.starts_with("base-") && n.ends_with(".img"))
        {
            storage.rename(&file, live).map_err(io("install staged base chunk", &**storage, &file))?;
        }
    }
    storage.sync_dir().map_err(io("sync group directory", &**storage, ""))?;
    // 4: an empty journal continuing the partner's chain after the baseline's seq.
    let next = Seq(control.horizon.0 + 1);
    drop(Journal::create(storage.clone(), group_id, config, next, chain)?);
    // 5: done.
    storage.remove(STAGED_CONTROL).map_err(io("remove staged control file", &**storage, STAGED_CONTROL))?;
    discard(storage)?;
    storage.sync_dir().map_err(io("sync group directory", &**storage, ""))?;
    Ok(Some(control.horizon))
}
