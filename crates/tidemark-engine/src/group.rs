//! A protection group: one journal, one block index, the base images of its volumes, and the
//! operations on them (write, zero, read at any point, flush, rollback, trim of old history).
//!
//! Every change goes through [`GroupState::apply`], whether it comes from a host write or from
//! replaying the journal at start-up, so the state after recovery is by construction the state
//! the live path would have built from the same records (invariant 2).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tidemark_journal::record::HEADER_BYTES;
use tidemark_journal::storage::{replace_file, Storage, StorageFile};
use tidemark_journal::{
    genesis_chain, ChainHash, Control, Generation, Journal, JournalConfig, JournalError, Location,
    RawRecords, Record, RecordBody, ReplicaAppend, Seq, UnixNanos, VerifiedRecord, VolumeId, ZeroMode,
};

use crate::base::BaseImage;
use crate::baseline::{BaselineTarget, StagedBaseline};
use crate::error::{EngineError, Result};
use crate::events::{EngineEvent, EventSink};
use crate::index::{Version, VolumeIndex};
use crate::persist::{
    encode_checkpoint, read_checkpoint, read_control, write_control, BookmarkEntry, Checkpoint, ControlState,
    ForkPoint, GenerationStart, Role, RoleChange, RollbackEntry, SwapPending, VolumeMeta, CHECKPOINT_FILE,
    CONTROL_FILE,
};
use crate::times::RecordTimes;
use crate::types::{GroupOptions, Point, PointInfo, Progress};
use crate::Clock;

/// Largest data one write record carries; bigger host writes become several records.
pub const RECORD_DATA_BYTES_MAX: usize = 4 << 20;
/// Bytes of block data a rollback moves per record.
const ROLLBACK_CHUNK_BYTES: u64 = 1 << 20;
/// A checkpoint is written after this many records (and at shutdown).
pub const CHECKPOINT_RECORDS_INTERVAL: u64 = 100_000;
/// Journal segments are at most this large; smaller when the journal limit is small, so that
/// trimming has something to trim.
const SEGMENT_BYTES_MAX: u64 = 64 << 20;
const SEGMENT_BYTES_MIN: u64 = 64 << 10;

/// Why a group cannot take writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    /// Serving.
    Ok,
    /// An fsync failed; writes are refused until restart.
    Poisoned(String),
    /// Corruption was found in the journal or a base image; writes are refused. Reads of
    /// undamaged blocks still work, so data can be copied out.
    Failed(String),
}

/// What a read at a point draws its bytes from, block run by block run.
enum Piece {
    Zero { len: usize },
    Journal { file: Arc<dyn StorageFile>, segment: u64, offset: u64, block_bytes: usize, crcs: Vec<u32> },
    Base { base: Arc<BaseImage>, offset: u64, len: usize },
}

/// A volume as the group holds it.
pub struct VolumeState {
    /// Its description.
    pub meta: VolumeMeta,
    /// Its base image (the state at the horizon).
    pub base: Arc<BaseImage>,
}

/// Everything behind the group lock: the journal and the tables built from it.
pub struct GroupState {
    journal: Journal,
    tables: Tables,
}

/// The state built from the journal's records (by [`Tables::apply`]), plus the control file.
pub struct Tables {
    control: ControlState,
    volumes: BTreeMap<VolumeId, VolumeState>,
    index: HashMap<VolumeId, VolumeIndex>,
    bookmarks: Vec<BookmarkEntry>,
    rollbacks: Vec<RollbackEntry>,
    /// Source time of every record after the horizon (times never decrease).
    times: RecordTimes,
    records_since_checkpoint: u64,
    storage: Arc<dyn Storage>,
}

// The group's code reads the tables through the state (`st.volumes`) as if they were one
// struct; the split exists so that replay can fill the tables before the journal is open.
impl std::ops::Deref for GroupState {
    type Target = Tables;
    fn deref(&self) -> &Tables {
        &self.tables
    }
}

impl std::ops::DerefMut for GroupState {
    fn deref_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }
}

/// One protection group.
pub struct Group {
    /// Site-unique name.
    pub name: String,
    /// Stable id (directory name, segment headers).
    pub id: u64,
    /// Retention and size limits.
    pub options: GroupOptions,
    state: Mutex<GroupState>,
    sync_lock: Mutex<()>,
    durable_seq: AtomicU64,
    health: RwLock<Health>,
    clock: Arc<dyn Clock>,
    events: Arc<dyn EventSink>,
    storage: Arc<dyn Storage>,
    /// Journal records replayed when the group was opened (after its checkpoint).
    pub records_replayed: u64,
    /// Whether the journal is past [`NEAR_LIMIT_PERCENT`] of its limit (the event fires once per
    /// crossing, and re-arms below [`NEAR_LIMIT_REARM_PERCENT`]).
    near_limit: std::sync::atomic::AtomicBool,
    /// How long each host write waits before it is taken (an overflow policy that slows hosts
    /// while the partner is out of reach; 0: no wait), in microseconds.
    write_delay_micros: AtomicU64,
}

/// The journal-near-limit event fires when the journal passes this share of its limit.
pub const NEAR_LIMIT_PERCENT: u64 = 80;
/// ... and can fire again once the journal is back under this share.
pub const NEAR_LIMIT_REARM_PERCENT: u64 = 70;

/// Flushes a baseline point waits through before giving up (each covers every write before it).
const BASELINE_POINT_TRIES: usize = 1000;

/// Build a group's state from its files: control file, checkpoint (if usable), journal replay.
/// A rewind recorded in the control file is finished first: the journal is cut after the rewind
/// point and the checkpoint (which may describe later records) is discarded.
fn load_state(
    storage: &Arc<dyn Storage>,
    id: u64,
    name: &str,
    options: &GroupOptions,
    events: &dyn EventSink,
) -> Result<(GroupState, tidemark_journal::journal::RecoveryReport)> {
    crate::baseline::recover(storage, id, name, journal_config(options))?;
    let mut control: ControlState = read_control(&**storage)
        .map_err(|reason| EngineError::Failed {
            group: name.into(),
            reason: format!("control file {}: {reason}", storage.describe(CONTROL_FILE).display()),
        })?
        .ok_or_else(|| EngineError::Failed {
            group: name.into(),
            reason: format!("control file {} is missing", storage.describe(CONTROL_FILE).display()),
        })?;
    if let Some(to) = control.rewind_to {
        match storage.remove(CHECKPOINT_FILE) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove checkpoint", &**storage, CHECKPOINT_FILE)(e)),
        }
        storage.sync_dir().map_err(io_err("sync group directory", &**storage, ""))?;
        let removed = tidemark_journal::journal::truncate_after(storage, id, to)?;
        tracing::info!(group = %name, seq = to.0, bytes = removed, "journal rewound");
        control.rewind_to = None;
        write_control(&**storage, &control).map_err(io_err(
            "write control file",
            &**storage,
            CONTROL_FILE,
        ))?;
    }
    let checkpoint = match read_checkpoint(&**storage) {
        Ok(c) => c,
        Err(reason) => {
            // Derived state: rebuild from the journal rather than refuse to start.
            events.event(EngineEvent::CheckpointDiscarded { group: name.into(), reason });
            None
        }
    };
    let segment_exists = |location: Location| {
        storage
            .open_existing(&tidemark_journal::journal::segment_name(location.segment))
            .ok()
            .flatten()
            .is_some()
    };
    let checkpoint = checkpoint
        .filter(|c| c.resume.next_seq.0 > control.base_applied.0 && segment_exists(c.resume.location));
    let mut state = Tables::new(control.clone(), storage.clone());
    let resume = match checkpoint {
        Some(c) => {
            for meta in c.volumes {
                state.add_volume(meta);
            }
            state.index = c.index.into_iter().map(|(volume, index)| (volume, index.into_owned())).collect();
            state.times = c.times.into_owned();
            state.bookmarks = c.bookmarks;
            state.rollbacks = c.rollbacks;
            Some(c.resume)
        }
        None => {
            for meta in &control.volumes {
                state.add_volume(meta.clone());
            }
            None
        }
    };
    // Replay goes through the same `apply` as live writes (which also starts the table of
    // record times at the first record replayed when there was no checkpoint).
    let (journal, report) =
        Journal::open(storage.clone(), id, journal_config(options), resume, |record, location| {
            state.apply(record, location).map_err(|e| JournalError::Invalid(e.to_string()))
        })?;
    let mut state = GroupState { journal, tables: state };
    if let Some((segment, offset, bytes)) = report.torn_tail {
        events.event(EngineEvent::TornTailTruncated { group: name.into(), segment, offset, bytes });
    }
    // Versions at or before base_applied are already in the base images.
    let applied = state.control.base_applied;
    for index in state.index.values_mut() {
        index.take_through(applied);
    }
    let horizon = state.control.horizon;
    state.bookmarks.retain(|b| b.seq > horizon);
    Ok((state, report))
}

fn journal_config(options: &GroupOptions) -> JournalConfig {
    JournalConfig {
        segment_bytes_max: (options.journal_max_bytes / 8).clamp(SEGMENT_BYTES_MIN, SEGMENT_BYTES_MAX),
    }
}

fn io_err(
    action: &'static str,
    storage: &dyn Storage,
    name: &str,
) -> impl FnOnce(std::io::Error) -> EngineError {
    let path = storage.describe(name);
    move |source| EngineError::Io { action, path, source }
}

impl Group {
    /// Create a new, empty primary group in `storage`.
    pub fn create(
        storage: Arc<dyn Storage>,
        id: u64,
        name: &str,
        options: GroupOptions,
        clock: Arc<dyn Clock>,
        events: Arc<dyn EventSink>,
    ) -> Result<Group> {
        Group::create_as(storage, id, name, options, (Role::Primary, 1), clock, events)
    }

    /// Create a new, empty group with a role and generation: a secondary takes the primary's
    /// id (it seeds the chain) and receives its history by replication.
    pub fn create_as(
        storage: Arc<dyn Storage>,
        id: u64,
        name: &str,
        options: GroupOptions,
        (role, generation): (Role, u64),
        clock: Arc<dyn Clock>,
        events: Arc<dyn EventSink>,
    ) -> Result<Group> {
        let control = ControlState::new(id, clock.now(), role, generation);
        write_control(&*storage, &control).map_err(io_err("write control file", &*storage, CONTROL_FILE))?;
        let journal =
            Journal::create(storage.clone(), id, journal_config(&options), Seq(1), genesis_chain(id))?;
        let state = GroupState { journal, tables: Tables::new(control, storage.clone()) };
        Ok(Group::assemble(name, id, options, state, clock, events, storage))
    }

    /// Open an existing group: read the control file, load the checkpoint if it is usable,
    /// replay the journal after it, finish any interrupted horizon advance, rewind or rollback.
    pub fn open(
        storage: Arc<dyn Storage>,
        id: u64,
        name: &str,
        options: GroupOptions,
        clock: Arc<dyn Clock>,
        events: Arc<dyn EventSink>,
    ) -> Result<Group> {
        let (state, report) = load_state(&storage, id, name, &options, &*events)?;
        let mut group = Group::assemble(name, id, options, state, clock, events, storage);
        group.records_replayed = report.records_scanned;
        {
            let mut st = group.state.lock();
            if st.control.base_applied < st.control.horizon {
                // A horizon advance was interrupted after the horizon was raised: finish it.
                let horizon = st.control.horizon;
                group.apply_to_base(&mut st, horizon, None)?;
            }
        }
        // A secondary never finishes a rollback itself: the primary's records do.
        let pending = group
            .state
            .lock()
            .rollbacks
            .last()
            .filter(|r| r.end.is_none())
            .cloned()
            .filter(|_| group.role() == Role::Primary);
        if let Some(pending) = pending {
            group.events.event(EngineEvent::RollbackResumed { group: name.into(), target: pending.target.0 });
            group.run_rollback(pending.target, Some(pending.begin), &|_| {})?;
        }
        Ok(group)
    }

    fn assemble(
        name: &str,
        id: u64,
        options: GroupOptions,
        state: GroupState,
        clock: Arc<dyn Clock>,
        events: Arc<dyn EventSink>,
        storage: Arc<dyn Storage>,
    ) -> Group {
        let durable = state.journal.last_seq().0;
        Group {
            name: name.to_string(),
            id,
            options,
            state: Mutex::new(state),
            sync_lock: Mutex::new(()),
            durable_seq: AtomicU64::new(durable),
            health: RwLock::new(Health::Ok),
            clock,
            events,
            storage,
            records_replayed: 0,
            near_limit: std::sync::atomic::AtomicBool::new(false),
            write_delay_micros: AtomicU64::new(0),
        }
    }

    /// Current health.
    pub fn health(&self) -> Health {
        self.health.read().clone()
    }

    /// A fast refusal before any work; the authoritative check is made again under the group
    /// lock, where the role cannot change, right before a record is appended.
    /// Make every host write wait `delay` before it is taken (zero: no wait). Replicated
    /// records, rollbacks and volume changes never wait.
    pub fn set_write_delay(&self, delay: std::time::Duration) {
        self.write_delay_micros.store(delay.as_micros().min(u128::from(u64::MAX)) as u64, Ordering::Relaxed);
    }

    /// The wait [`Group::set_write_delay`] set.
    pub fn write_delay(&self) -> std::time::Duration {
        std::time::Duration::from_micros(self.write_delay_micros.load(Ordering::Relaxed))
    }

    /// Wait out the write delay, outside every lock.
    fn throttle(&self) {
        let delay = self.write_delay();
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }

    fn check_writable(&self) -> Result<()> {
        self.check_healthy()?;
        self.state.lock().check_primary(&self.name)
    }

    /// The group's role at this site.
    pub fn role(&self) -> Role {
        self.state.lock().control.role
    }

    /// The primary generation this site knows.
    pub fn generation(&self) -> u64 {
        self.state.lock().control.generation
    }

    /// The group's role, generation and lineage as the control file holds them.
    pub fn role_state(&self) -> RoleState {
        let st = self.state.lock();
        RoleState {
            role: st.control.role,
            generation: st.control.generation,
            generations: st.control.generations.clone(),
            role_changes: st.control.role_changes.clone(),
            fork_point: st.control.fork_point,
            swap_pending: st.control.swap_pending,
        }
    }

    /// Become primary under `generation`, which must be newer than any this site knows, at the
    /// newest record (made durable first). A takeover records its fork point: the last record
    /// both sites may share. The control file is synced before the first write is admitted.
    pub fn promote(&self, generation: u64, kind: Promotion, reason: &str) -> Result<ForkPoint> {
        self.check_healthy()?;
        let last = self.state.lock().journal.last_seq();
        self.sync_through(last)?;
        let mut st = self.state.lock();
        if st.control.role != Role::Secondary {
            return Err(EngineError::Conflict(format!("group {:?} is already primary here", self.name)));
        }
        if generation <= st.control.generation {
            return Err(EngineError::Conflict(format!(
                "generation {generation} is not newer than generation {} known here",
                st.control.generation
            )));
        }
        let last = st.journal.last_seq();
        if last > self.durable_seq() {
            return Err(EngineError::Conflict("records arrived during promotion; try again".into()));
        }
        let fork = ForkPoint { generation, seq: last, chain: st.journal.chain().0, time: st.time_of(last) };
        let mut control = st.control.clone();
        control.role = Role::Primary;
        control.generation = generation;
        control.generations.push(GenerationStart { generation, first_seq: Seq(last.0 + 1) });
        if kind == Promotion::Takeover {
            control.fork_point = Some(fork);
        }
        control.swap_pending = None;
        control.note_role_change(RoleChange {
            time: self.clock.now(),
            from: Role::Secondary,
            to: Role::Primary,
            generation,
            reason: reason.into(),
        });
        st.replace_control(control)?;
        tracing::info!(group = %self.name, generation, seq = last.0, ?kind, "promoted to primary");
        Ok(fork)
    }

    /// Become secondary because generation `generation` belongs to another primary (a partner
    /// fenced this site, or a swap completed). Host writes are refused from the moment the
    /// control file is synced; a divergent tail, if any, stays until [`Engine::failback`].
    ///
    /// [`Engine::failback`]: crate::Engine::failback
    pub fn demote(&self, generation: u64, reason: &str) -> Result<()> {
        let mut st = self.state.lock();
        if st.control.role == Role::Secondary && st.control.generation >= generation {
            return Ok(());
        }
        let mut control = st.control.clone();
        let from = control.role;
        control.role = Role::Secondary;
        control.generation = control.generation.max(generation);
        control.swap_pending = None;
        control.note_role_change(RoleChange {
            time: self.clock.now(),
            from,
            to: Role::Secondary,
            generation: control.generation,
            reason: reason.into(),
        });
        st.replace_control(control)?;
        tracing::info!(group = %self.name, generation, reason, "demoted to secondary");
        Ok(())
    }

    /// Start handing the primary role to the partner under `generation`: from now on (and
    /// after a restart) no host write is admitted, until [`Group::demote`] finishes the swap or
    /// [`Group::abort_swap`] calls it off. Returns the position to drain to, made durable.
    pub fn begin_swap(&self, generation: u64) -> Result<Position> {
        self.check_healthy()?;
        {
            let mut st = self.state.lock();
            st.check_primary(&self.name)?;
            if generation <= st.control.generation {
                return Err(EngineError::Conflict(format!(
                    "generation {generation} is not newer than generation {}",
                    st.control.generation
                )));
            }
            let mut control = st.control.clone();
            control.swap_pending = Some(SwapPending { generation, last_seq: st.journal.last_seq() });
            st.replace_control(control)?;
        }
        self.flush()?;
        Ok(self.position())
    }

    /// Call off a swap that the partner never acted on: writes are admitted again.
    pub fn abort_swap(&self) -> Result<()> {
        let mut st = self.state.lock();
        if st.control.swap_pending.is_none() {
            return Ok(());
        }
        let mut control = st.control.clone();
        control.swap_pending = None;
        st.replace_control(control)
    }

    /// A secondary takes the primary's lineage (and generation) as its own once its history is a
    /// prefix of the primary's.
    pub fn adopt_lineage(&self, generation: u64, generations: &[GenerationStart]) -> Result<()> {
        let mut st = self.state.lock();
        if st.control.role != Role::Secondary {
            return Err(EngineError::Conflict(format!("group {:?} is primary here", self.name)));
        }
        if st.control.generation == generation && st.control.generations == generations {
            return Ok(());
        }
        if generation < st.control.generation {
            return Err(EngineError::Conflict(format!(
                "generation {generation} is older than generation {} known here",
                st.control.generation
            )));
        }
        let mut control = st.control.clone();
        control.generation = generation;
        control.generations = generations.to_vec();
        st.replace_control(control)
    }

    /// Blocks whose content changed after `seq` (to the newest record), per volume: what a
    /// divergent tail covers. Volumes created after `seq` are listed with all their blocks.
    pub fn blocks_changed_after(&self, seq: Seq) -> Vec<(VolumeMeta, Vec<u64>)> {
        let st = self.state.lock();
        st.volumes
            .values()
            .map(|v| {
                let blocks = st
                    .index
                    .get(&v.meta.id)
                    .map(|index| {
                        index
                            .blocks_at(0..u64::MAX, None)
                            .filter(|(_, newest)| newest.seq > seq.0)
                            .map(|(block, _)| block)
                            .collect()
                    })
                    .unwrap_or_default();
                (v.meta.clone(), blocks)
            })
            .collect()
    }

    /// Names of volumes whose creation record comes after `seq`.
    pub fn volumes_created_after(&self, seq: Seq) -> Result<Vec<String>> {
        let (reader, mut location, last) = {
            let st = self.state.lock();
            let last = st.journal.last_seq();
            if seq >= last {
                return Ok(Vec::new());
            }
            (st.journal.reader(), st.journal.locate(Seq(seq.0 + 1))?, last)
        };
        let mut names = Vec::new();
        let mut next = Seq(seq.0 + 1);
        while next <= last {
            let raw = reader.read(location, next, last, 16 << 20)?;
            if raw.is_empty() {
                break;
            }
            for piece in &raw.pieces {
                for record in tidemark_journal::record::decode_all(piece).map_err(JournalError::from)? {
                    if let RecordBody::Control(Control::VolumeCreated { name, .. }) = record.into_inner().body
                    {
                        names.push(name);
                    }
                }
            }
            location = raw.next;
            next = Seq(raw.last.0 + 1);
        }
        Ok(names)
    }

    /// Cut the history after `seq` and rebuild the group's state from its files, as a returning
    /// primary does at failback. The rewind is recorded in the control file first, so a crash in
    /// the middle is finished at the next start; readers see the state before or after, never
    /// a mix, because the whole rebuild happens under the group lock. The group must be a
    /// secondary; what the cut removes must have been kept elsewhere first.
    pub fn rewind(&self, seq: Seq) -> Result<u64> {
        let mut st = self.state.lock();
        if st.control.role != Role::Secondary {
            return Err(EngineError::Conflict(format!(
                "group {:?} is primary here; only a secondary is rewound",
                self.name
            )));
        }
        let last = st.journal.last_seq();
        if seq >= last {
            return Ok(0);
        }
        if seq < st.control.base_applied {
            return Err(EngineError::Conflict(format!(
                "group {:?} cannot rewind to seq {}: its history starts at seq {}",
                self.name, seq.0, st.control.base_applied.0
            )));
        }
        let mut control = st.control.clone();
        control.rewind_to = Some(seq);
        st.replace_control(control)?;
        let (state, report) = load_state(&self.storage, self.id, &self.name, &self.options, &*self.events)?;
        *st = state;
        let now_last = st.journal.last_seq();
        self.durable_seq.store(now_last.0, Ordering::Release);
        tracing::info!(group = %self.name, seq = seq.0, replayed = report.records_scanned, "rewound");
        Ok(last.0 - now_last.0)
    }

    fn check_healthy(&self) -> Result<()> {
        match &*self.health.read() {
            Health::Ok => Ok(()),
            Health::Poisoned(reason) => {
                Err(EngineError::Poisoned { group: self.name.clone(), reason: reason.clone() })
            }
            Health::Failed(reason) => {
                Err(EngineError::Failed { group: self.name.clone(), reason: reason.clone() })
            }
        }
    }

    /// Stop the group after finding corruption; the error passes through.
    fn fail_on_corruption(&self, error: EngineError) -> EngineError {
        if let EngineError::Failed { reason, .. } = &error {
            let mut health = self.health.write();
            if *health == Health::Ok {
                *health = Health::Failed(reason.clone());
                tracing::error!(group = %self.name, %reason, "corruption found; the group refuses writes");
                self.events
                    .event(EngineEvent::GroupFailed { group: self.name.clone(), reason: reason.clone() });
            }
        }
        error
    }

    /// Stop the group after a failed fsync: the page cache can no longer be trusted.
    fn poison(&self, reason: String) -> EngineError {
        let mut health = self.health.write();
        if *health == Health::Ok {
            *health = Health::Poisoned(reason.clone());
            self.events
                .event(EngineEvent::GroupPoisoned { group: self.name.clone(), reason: reason.clone() });
        }
        EngineError::Poisoned { group: self.name.clone(), reason }
    }

    fn journal_result<T>(&self, result: std::result::Result<T, JournalError>) -> Result<T> {
        match result {
            Err(JournalError::SyncFailed(reason)) => Err(self.poison(reason)),
            other => other.map_err(EngineError::from),
        }
    }

    /// Append `body` as the newest record and apply it.
    fn append(&self, st: &mut GroupState, body: &RecordBody) -> Result<Seq> {
        st.check_primary(&self.name)?;
        let generation = Generation(st.control.generation);
        let appended = self.journal_result(st.journal.append(generation, self.clock.now(), body))?;
        let record = Record {
            seq: appended.seq,
            generation,
            time: st.journal.last_time(),
            body: body.clone(),
            checksum: [0; 16],
            chain: appended.chain,
        };
        st.apply(&record, appended.location)?;
        Ok(appended.seq)
    }

    /// The point a baseline of this copy is taken at: the newest record, once it is durable
    /// (only durable records are ever shipped), with the volumes and lineage there. Hold the
    /// history from its seq (see `Engine::pin`) while reading it with [`Group::read`].
    pub fn baseline_point(&self) -> Result<BaselineTarget> {
        for _ in 0..BASELINE_POINT_TRIES {
            self.flush()?;
            let st = self.state.lock();
            let seq = st.journal.last_seq();
            if self.durable_seq() < seq {
                continue; // written meanwhile: flush again
            }
            return Ok(BaselineTarget {
                seq,
                chain: st.journal.chain(),
                time: st.time_of(seq),
                generation: st.control.generation,
                generations: st.control.generations.clone(),
                volumes: st.volumes.values().map(|v| v.meta.clone()).collect(),
            });
        }
        Err(EngineError::Conflict(format!(
            "group {:?}: writes kept its newest record from becoming durable; try the baseline again",
            self.name
        )))
    }

    /// Start receiving a baseline (the partner's image at `target.seq`) beside this copy,
    /// which stays as it is until [`Group::install_baseline`]. Only a secondary takes one.
    pub fn stage_baseline(&self, target: BaselineTarget) -> Result<StagedBaseline> {
        if self.role() != Role::Secondary {
            return Err(EngineError::Conflict(format!(
                "group {:?} is primary here: it sends baselines, it does not take them",
                self.name
            )));
        }
        StagedBaseline::begin(self.storage.clone(), target)
    }

    /// Switch to a complete staged baseline: from here on this copy is the partner's image at
    /// the baseline's seq and continues with the partner's next record. Crash-safe: start-up
    /// finishes a switch that was committed (see `crate::baseline`).
    pub fn install_baseline(&self, staged: StagedBaseline) -> Result<Seq> {
        let _sync = self.sync_lock.lock();
        let mut st = self.state.lock();
        if st.control.role != Role::Secondary {
            return Err(EngineError::Conflict(format!(
                "group {:?} became primary during its baseline",
                self.name
            )));
        }
        staged.commit(&st.control)?;
        crate::baseline::recover(&self.storage, self.id, &self.name, journal_config(&self.options))?;
        let (state, _) = load_state(&self.storage, self.id, &self.name, &self.options, &*self.events)?;
        *st = state;
        let seq = st.journal.last_seq();
        self.durable_seq.store(seq.0, Ordering::Release);
        Ok(seq)
    }

    /// Append a control record and make it durable before returning.
    pub fn append_control(&self, control: Control) -> Result<Seq> {
        self.check_writable()?;
        let seq = {
            let mut st = self.state.lock();
            self.append(&mut st, &RecordBody::Control(control))?
        };
        self.sync_through(seq)?;
        Ok(seq)
    }

    /// Write whole or partial blocks of `volume`.
    /// `block_size_bytes` is the block size the caller knows the volume by (an export learns it
    /// when it is opened): the data is hashed and checksummed in blocks of that size before the
    /// group lock is taken, which is most of a write's CPU and, outside the lock, runs on every
    /// core at once. It is checked under the lock; if it is stale the work is redone there.
    pub fn write(&self, volume: VolumeId, block_size_bytes: u32, offset: u64, data: &[u8]) -> Result<Seq> {
        self.check_writable()?;
        self.throttle();
        let hint = u64::from(block_size_bytes.max(1));
        let prepared = whole_blocks(offset, data.len(), hint).then(|| prepare(data, hint as usize));
        let mut st = self.state.lock();
        let meta = st.target(volume, offset, data.len() as u64, &self.name).cloned()?;
        let bs = u64::from(meta.block_size_bytes);
        if let Some(prepared) = prepared.filter(|_| bs == hint) {
            return self.append_prepared(&mut st, &meta, offset, data, &prepared);
        }
        if whole_blocks(offset, data.len(), bs) {
            return self.append_aligned(&mut st, &meta, offset, data);
        }
        // Read-modify-write of the partial edge blocks, under the lock so that concurrent
        // unaligned writes to one block cannot lose each other's bytes.
        let start = offset / bs * bs;
        let end = (offset + data.len() as u64).div_ceil(bs) * bs;
        let mut buf = vec![0u8; (end - start) as usize];
        st.read_into(volume, start, &mut buf, None, &self.name)?;
        let at = (offset - start) as usize;
        if let Some(dst) = buf.get_mut(at..at + data.len()) {
            dst.copy_from_slice(data);
        }
        self.append_aligned(&mut st, &meta, start, &buf)
    }

    /// [`Group::write`], but only when it cannot wait: `None`, having done nothing, when the
    /// group lock is taken, host writes are throttled, the write is not whole blocks of one
    /// record, or it would start a new journal segment (which syncs). What is left waits only on
    /// the page cache, so the caller may run it where blocking is costly (the NBD server's
    /// async task) and hand every `None` to a thread that may wait.
    pub fn try_write(
        &self,
        volume: VolumeId,
        block_size_bytes: u32,
        offset: u64,
        data: &[u8],
    ) -> Option<Result<Seq>> {
        let bs = block_size_bytes.max(1) as usize;
        let whole = whole_blocks(offset, data.len(), bs as u64);
        if !self.write_delay().is_zero() || !whole || data.is_empty() || data.len() > record_chunk_bytes(bs) {
            return None;
        }
        if let Err(e) = self.check_healthy() {
            return Some(Err(e));
        }
        let prepared = prepare(data, bs);
        let mut st = self.state.try_lock()?;
        if !st.journal.write_fits_tail(data.len() as u64) {
            return None;
        }
        // `append_prepared` checks the role.
        let meta = match st.target(volume, offset, data.len() as u64, &self.name).cloned() {
            Ok(meta) if meta.block_size_bytes as usize == bs => meta,
            Ok(_) => return None,
            Err(e) => return Some(Err(e)),
        };
        Some(self.append_prepared(&mut st, &meta, offset, data, &prepared))
    }

    fn append_aligned(
        &self,
        st: &mut GroupState,
        meta: &VolumeMeta,
        offset: u64,
        data: &[u8],
    ) -> Result<Seq> {
        let prepared = prepare(data, meta.block_size_bytes as usize);
        self.append_prepared(st, meta, offset, data, &prepared)
    }

    fn append_prepared(
        &self,
        st: &mut GroupState,
        meta: &VolumeMeta,
        offset: u64,
        data: &[u8],
        prepared: &[Prepared],
    ) -> Result<Seq> {
        st.check_primary(&self.name)?;
        let mut last = st.journal.last_seq();
        for ((i, piece), p) in
            data.chunks(record_chunk_bytes(meta.block_size_bytes as usize)).enumerate().zip(prepared)
        {
            let piece_offset = offset + (i * record_chunk_bytes(meta.block_size_bytes as usize)) as u64;
            let generation = Generation(st.control.generation);
            let appended = self.journal_result(st.journal.append_write(
                generation,
                self.clock.now(),
                meta.id,
                piece_offset,
                piece,
                Some(p.hash),
            ))?;
            let time = st.journal.last_time();
            st.apply_write(appended.seq, time, meta.id, piece_offset, appended.location, &p.crcs);
            last = appended.seq;
        }
        Ok(last)
    }

    /// Make `[offset, offset+length)` read as zeroes.
    pub fn zero(&self, volume: VolumeId, offset: u64, length: u64, mode: ZeroMode) -> Result<Seq> {
        self.check_writable()?;
        self.throttle();
        let mut st = self.state.lock();
        let meta = st.target(volume, offset, length, &self.name).cloned()?;
        let bs = u64::from(meta.block_size_bytes);
        let end = offset + length;
        let inner_start = offset.div_ceil(bs) * bs;
        let inner_end = end / bs * bs;
        let mut last = st.journal.last_seq();
        if inner_start >= inner_end {
            // Entirely inside one block (or two partial ones): rewrite them with zeroes.
            let start = offset / bs * bs;
            let stop = end.div_ceil(bs) * bs;
            let mut buf = vec![0u8; (stop - start) as usize];
            st.read_into(volume, start, &mut buf, None, &self.name)?;
            if let Some(z) = buf.get_mut((offset - start) as usize..(end - start) as usize) {
                z.fill(0);
            }
            return self.append_aligned(&mut st, &meta, start, &buf);
        }
        for (lo, hi) in [(offset, inner_start), (inner_end, end)] {
            if lo < hi {
                let block = lo / bs * bs;
                let mut buf = vec![0u8; bs as usize];
                st.read_into(volume, block, &mut buf, None, &self.name)?;
                if let Some(z) = buf.get_mut((lo - block) as usize..(hi - block) as usize) {
                    z.fill(0);
                }
                last = self.append_aligned(&mut st, &meta, block, &buf)?;
            }
        }
        let body = RecordBody::Zero { volume, offset: inner_start, length: inner_end - inner_start, mode };
        last = last.max(self.append(&mut st, &body)?);
        Ok(last)
    }

    /// Read `buf.len()` bytes at `offset` as of `at` (`None` = newest).
    pub fn read(&self, volume: VolumeId, offset: u64, buf: &mut [u8], at: Option<Seq>) -> Result<()> {
        let pieces = {
            let st = self.state.lock();
            let bs = u64::from(st.target(volume, offset, buf.len() as u64, &self.name)?.block_size_bytes);
            if !whole_blocks(offset, buf.len(), bs) {
                drop(st);
                return self.read_unaligned(volume, bs, offset, buf, at);
            }
            st.plan_read(volume, offset, buf.len() as u64, at, &self.name)?
        };
        let read = execute_read(&pieces, buf, &self.name, Reads::Wait);
        read.map(|_| ()).map_err(|e| self.fail_on_corruption(e))
    }

    /// [`Group::read`] of the newest data, but only when it cannot wait: `None`, with `buf` in
    /// any state, when the group lock is taken, the read is not whole blocks, or any of its
    /// bytes is not in memory (it would wait for the disk). The caller may run it where
    /// blocking is costly (the NBD server's async task) and read every `None` with
    /// [`Group::read`] on a thread that may wait.
    pub fn try_read(&self, volume: VolumeId, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        let pieces = {
            let st = self.state.try_lock()?;
            let bs = match st.target(volume, offset, buf.len() as u64, &self.name) {
                Ok(meta) => u64::from(meta.block_size_bytes),
                Err(e) => return Some(Err(e)),
            };
            if !whole_blocks(offset, buf.len(), bs) {
                return None;
            }
            match st.plan_read(volume, offset, buf.len() as u64, None, &self.name) {
                Ok(pieces) => pieces,
                Err(e) => return Some(Err(e)),
            }
        };
        match execute_read(&pieces, buf, &self.name, Reads::Cached) {
            Ok(done) => done.map(Ok),
            Err(e) => Some(Err(self.fail_on_corruption(e))),
        }
    }

    fn read_unaligned(
        &self,
        volume: VolumeId,
        bs: u64,
        offset: u64,
        buf: &mut [u8],
        at: Option<Seq>,
    ) -> Result<()> {
        let start = offset / bs * bs;
        let end = (offset + buf.len() as u64).div_ceil(bs) * bs;
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read(volume, start, &mut tmp, at)?;
        let at = (offset - start) as usize;
        if let Some(src) = tmp.get(at..at + buf.len()) {
            buf.copy_from_slice(src);
        }
        Ok(())
    }

    /// Have `writeback` flush this group every [`crate::writeback::WRITEBACK_BYTES`] of appends,
    /// so unflushed host writes neither pile up as dirty pages nor keep sealed segments cached.
    pub fn attach_writeback(self: &Arc<Self>, writeback: Arc<crate::writeback::Writeback>) {
        let group = Arc::downgrade(self);
        self.state
            .lock()
            .journal
            .set_writeback(crate::writeback::WRITEBACK_BYTES, Box::new(move || writeback.request(&group)));
    }

    /// Make every record appended so far durable (one fdatasync for all waiting writers).
    pub fn flush(&self) -> Result<()> {
        let target = self.state.lock().journal.last_seq();
        self.sync_through(target)
    }

    /// Make every record up to `target` durable.
    pub fn sync_through(&self, target: Seq) -> Result<()> {
        if self.durable_seq.load(Ordering::Acquire) >= target.0 {
            return Ok(());
        }
        let _sync = self.sync_lock.lock();
        if self.durable_seq.load(Ordering::Acquire) >= target.0 {
            return Ok(());
        }
        self.check_healthy()?;
        let Some(ticket) = self.state.lock().journal.sync_ticket() else { return Ok(()) };
        let started = std::time::Instant::now();
        let synced = ticket.sync();
        ticket.stats.record_sync(started.elapsed());
        match synced {
            Ok(()) => {
                self.durable_seq.fetch_max(ticket.upto.0, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => Err(self.poison(format!("fdatasync of the journal failed: {e}"))),
        }
    }

    /// Where the group's history stands, for the replication handshake.
    pub fn position(&self) -> Position {
        let st = self.state.lock();
        Position {
            group_id: self.id,
            generation: st.control.generation,
            generations: st.control.generations.clone(),
            first_seq: st.journal.first_seq(),
            last_seq: st.journal.last_seq(),
            chain: st.journal.chain(),
            durable_seq: self.durable_seq(),
        }
    }

    /// The chain hash after `seq`; `None` when the journal no longer holds it.
    pub fn chain_at(&self, seq: Seq) -> Result<Option<ChainHash>> {
        Ok(self.state.lock().journal.chain_at(seq)?)
    }

    /// Where record `seq` starts in the journal.
    pub fn locate(&self, seq: Seq) -> Result<Location> {
        Ok(self.state.lock().journal.locate(seq)?)
    }

    /// Read records from `from` (where seq `first` starts) for shipping, at most `bytes_max`
    /// bytes, and never past the newest durable record: a primary that loses power must never
    /// find its partner ahead of it. The read happens outside the group lock.
    pub fn read_for_shipping(&self, from: Location, first: Seq, bytes_max: u64) -> Result<RawRecords> {
        let reader = self.state.lock().journal.reader();
        Ok(reader.read(from, first, self.durable_seq(), bytes_max)?)
    }

    /// Append and apply records received from the primary, in order. Each must continue this
    /// journal's chain exactly, or nothing more is written and the group has diverged. Returns
    /// the last seq; the caller makes it durable (flush) before acknowledging.
    pub fn apply_replicated(&self, records: &[VerifiedRecord]) -> Result<Seq> {
        self.check_healthy()?;
        let mut st = self.state.lock();
        if st.control.role != Role::Secondary {
            return Err(EngineError::Conflict(format!(
                "group {:?} is primary here; it does not accept a partner's records",
                self.name
            )));
        }
        let mut last = st.journal.last_seq();
        // One write for the batch; the records it did append are applied even when it stopped
        // early, so the index always describes the journal.
        let ReplicaAppend { appended, refused } = st.journal.append_replicas(records);
        for (record, appended) in records.iter().zip(&appended) {
            st.apply(record, appended.location)?;
            last = appended.seq;
        }
        match refused {
            None => Ok(last),
            Some(JournalError::Diverged { seq, .. }) => Err(EngineError::Diverged {
                group: self.name.clone(),
                reason: format!("the primary's record {seq} does not continue this site's history"),
            }),
            Some(e) => self.journal_result(Err(e)),
        }
    }

    /// Source time of record `seq` (the horizon's time for seqs before the journal).
    pub fn time_of(&self, seq: Seq) -> UnixNanos {
        self.state.lock().time_of(seq)
    }

    /// Bytes of journal from `location` to the tail: what is left to ship after it.
    pub fn bytes_after(&self, location: Location) -> u64 {
        let st = self.state.lock();
        st.journal
            .segments()
            .iter()
            .filter(|s| s.index >= location.segment)
            .map(
                |s| {
                    if s.index == location.segment {
                        s.bytes.saturating_sub(location.offset)
                    } else {
                        s.bytes
                    }
                },
            )
            .sum()
    }

    /// The journal's counters (appended bytes, fdatasync latency), for metrics.
    pub fn journal_bytes(&self) -> u64 {
        self.state.lock().journal.bytes()
    }

    /// Counters of the journal's appends and syncs.
    pub fn journal_stats(&self) -> Arc<tidemark_journal::stats::JournalStats> {
        self.state.lock().journal.stats()
    }

    /// Seq of the newest durable record.
    pub fn durable_seq(&self) -> Seq {
        Seq(self.durable_seq.load(Ordering::Acquire))
    }

    /// Run `f` with the state locked (for the engine's catalog-level operations).
    pub fn with_state<T>(&self, f: impl FnOnce(&mut GroupState) -> T) -> T {
        f(&mut self.state.lock())
    }

    /// Resolve an operator's point to a seq within the recoverable range.
    pub fn resolve(&self, point: &Point) -> Result<Seq> {
        let st = self.state.lock();
        st.resolve(point, self.clock.now(), &self.name)
    }

    /// Describe a seq as a point (seq and time).
    pub fn point_info(&self, seq: Seq) -> PointInfo {
        self.state.lock().point_info(seq)
    }

    /// Add a bookmark at the current newest point.
    pub fn bookmark(&self, name: &str) -> Result<(Seq, UnixNanos)> {
        if self.state.lock().bookmarks.iter().any(|b| b.name == name) {
            return Err(EngineError::AlreadyExists { kind: "bookmark", name: name.into() });
        }
        let seq = self.append_control(Control::Bookmark { name: name.into() })?;
        let time = self.state.lock().time_of(seq);
        Ok((seq, time))
    }

    /// Bookmarks, oldest first.
    pub fn bookmarks(&self) -> Vec<BookmarkEntry> {
        self.state.lock().bookmarks.clone()
    }

    /// Rollbacks, oldest first.
    pub fn rollbacks(&self) -> Vec<RollbackEntry> {
        self.state.lock().rollbacks.clone()
    }

    /// Put the group's volumes back to their state at `target`, by appending records that
    /// rewrite every block changed since. Host I/O to the group waits while it runs.
    pub fn rollback(&self, target: Seq, progress: &dyn Fn(Progress)) -> Result<RollbackEntry> {
        self.check_writable()?;
        self.run_rollback(target, None, progress)
    }

    fn run_rollback(
        &self,
        target: Seq,
        resume: Option<Seq>,
        progress: &dyn Fn(Progress),
    ) -> Result<RollbackEntry> {
        let mut st = self.state.lock();
        let begin = match resume {
            Some(begin) => begin,
            None => self.append(&mut st, &RecordBody::Control(Control::RollbackBegin { target }))?,
        };
        // Every block with a version after the target differs (or may differ) from its state at
        // the target; the rollback rewrites exactly those, in runs.
        let mut plan: Vec<(VolumeMeta, u64, u64)> = Vec::new();
        let mut total = 0u64;
        for (id, vol) in &st.volumes {
            let Some(index) = st.index.get(id) else { continue };
            let bs = u64::from(vol.meta.block_size_bytes);
            let mut run: Option<(u64, u64)> = None;
            for (block, newest) in index.blocks_at(0..u64::MAX, None) {
                if newest.seq <= target.0 {
                    continue;
                }
                run = match run {
                    Some((s, e)) if e == block && (e - s + 1) * bs <= ROLLBACK_CHUNK_BYTES => {
                        Some((s, block + 1))
                    }
                    Some((s, e)) => {
                        plan.push((vol.meta.clone(), s, e));
                        total += (e - s) * bs;
                        Some((block, block + 1))
                    }
                    None => Some((block, block + 1)),
                };
            }
            if let Some((s, e)) = run {
                plan.push((vol.meta.clone(), s, e));
                total += (e - s) * bs;
            }
        }
        let mut done = 0u64;
        progress(Progress { done_bytes: 0, total_bytes: total });
        for (meta, start, end) in plan {
            let bs = u64::from(meta.block_size_bytes);
            let mut buf = vec![0u8; ((end - start) * bs) as usize];
            st.read_into(meta.id, start * bs, &mut buf, Some(target), &self.name)?;
            if buf.iter().all(|&b| b == 0) {
                let body = RecordBody::Zero {
                    volume: meta.id,
                    offset: start * bs,
                    length: (end - start) * bs,
                    mode: ZeroMode::Punch,
                };
                self.append(&mut st, &body)?;
            } else {
                self.append_aligned(&mut st, &meta, start * bs, &buf)?;
            }
            done += buf.len() as u64;
            if let Some(r) = st.rollbacks.last_mut() {
                r.bytes_rewritten = done;
            }
            progress(Progress { done_bytes: done, total_bytes: total });
        }
        let end_seq = self.append(&mut st, &RecordBody::Control(Control::RollbackEnd { target, begin }))?;
        let entry = st
            .rollbacks
            .last()
            .cloned()
            .ok_or_else(|| EngineError::InvalidArgument("rollback lost".into()))?;
        drop(st);
        self.sync_through(end_seq)?;
        Ok(entry)
    }

    /// Advance the horizon past the oldest segments that retention or the size limit let go,
    /// never past `pin` (the oldest seq an image still needs). Returns the new horizon, if moved.
    pub fn trim(&self, pin: Option<Seq>) -> Result<Option<Seq>> {
        let moved = self.trim_history(pin);
        self.check_near_limit();
        moved
    }

    /// Raise the near-limit event on the way up past 80%, once; re-arm below 70%.
    fn check_near_limit(&self) {
        let bytes = self.state.lock().journal.bytes();
        let max = self.options.journal_max_bytes;
        let over = u128::from(bytes) * 100 > u128::from(max) * u128::from(NEAR_LIMIT_PERCENT);
        let under = u128::from(bytes) * 100 < u128::from(max) * u128::from(NEAR_LIMIT_REARM_PERCENT);
        if over && !self.near_limit.swap(true, Ordering::AcqRel) {
            self.events.event(EngineEvent::JournalNearLimit {
                group: self.name.clone(),
                journal_bytes: bytes,
                journal_max_bytes: max,
            });
        } else if under {
            self.near_limit.store(false, Ordering::Release);
        }
    }

    fn trim_history(&self, pin: Option<Seq>) -> Result<Option<Seq>> {
        let now = self.clock.now();
        let mut moved = None;
        loop {
            let st = self.state.lock();
            let segments = st.journal.segments();
            let (Some(_oldest), Some(next)) = (segments.first(), segments.get(1)) else { break };
            let through = Seq(next.first_seq.0 - 1);
            let newest_time = st.time_of(through);
            let retention_ns = self.options.retention_seconds.saturating_mul(1_000_000_000);
            let expired = now.0.saturating_sub(newest_time.0) > retention_ns;
            let over_limit = st.journal.bytes() > self.options.journal_max_bytes;
            if !expired && !over_limit {
                break;
            }
            if pin.is_some_and(|p| through > p) {
                if over_limit {
                    self.events.event(EngineEvent::JournalPinned {
                        group: self.name.clone(),
                        journal_bytes: st.journal.bytes(),
                        pinned_seq: pin.map_or(0, |p| p.0),
                    });
                }
                break;
            }
            // Everything through `through` must be durable before it can become the base.
            drop(st);
            self.sync_through(through)?;
            let mut st = self.state.lock();
            self.apply_to_base(&mut st, through, Some(next.index)).map_err(|e| self.fail_on_corruption(e))?;
            if over_limit && !expired {
                let info = st.point_info(through);
                self.events.event(EngineEvent::HistoryTrimmed {
                    group: self.name.clone(),
                    oldest_seq: info.seq,
                    oldest_time: info.time,
                    journal_bytes: st.journal.bytes(),
                });
            }
            moved = Some(through);
        }
        Ok(moved)
    }

    /// Move the state at `horizon` into the base images and forget older history. Crash-safe:
    /// the raised horizon is durable before any base block changes, and the old segments are
    /// removed only after the base is synced and `base_applied` is durable.
    fn apply_to_base(
        &self,
        st: &mut GroupState,
        horizon: Seq,
        remove_before_segment: Option<u64>,
    ) -> Result<()> {
        st.control.horizon = horizon;
        st.control.horizon_time = st.time_of(horizon);
        st.control.volumes = st.volumes.values().map(|v| v.meta.clone()).collect();
        st.write_control()?;
        let mut touched = BTreeSet::new();
        let ids: Vec<VolumeId> = st.index.keys().copied().collect();
        for id in ids {
            let Some(index) = st.index.get_mut(&id) else { continue };
            let moved = index.take_through(horizon);
            let Some(vol) = st.volumes.get(&id) else { continue };
            let bs = u64::from(vol.meta.block_size_bytes);
            let base = vol.base.clone();
            let base_err = |offset: u64| {
                let path = base.describe(offset);
                move |source| EngineError::Io { action: "update base image", path, source }
            };
            let mut buf = vec![0u8; bs as usize];
            for (block, version) in moved {
                let offset = block * bs;
                match version_location(&st.journal, &version, &self.name)? {
                    Some(loc) => {
                        read_journal_block(&st.journal, loc, version.crc, &mut buf, &self.name)?;
                        base.write(offset, &buf).map_err(base_err(offset))?;
                    }
                    None if version.crc == ZERO_ALLOCATED => {
                        buf.fill(0);
                        base.write(offset, &buf).map_err(base_err(offset))?;
                    }
                    None => base.punch(offset, bs).map_err(base_err(offset))?,
                }
            }
            touched.insert(id);
        }
        for id in touched {
            if let Some(vol) = st.volumes.get(&id) {
                vol.base.sync().map_err(|e| self.poison(format!("fdatasync of a base image failed: {e}")))?;
            }
        }
        st.control.base_applied = horizon;
        st.write_control()?;
        if let Some(segment) = remove_before_segment {
            st.journal.remove_segments_before(segment)?;
        }
        st.times.drop_through(horizon);
        st.bookmarks.retain(|b| b.seq > horizon);
        st.rollbacks.retain(|r| r.begin > horizon);
        Ok(())
    }

    /// Write a checkpoint of the index if enough records arrived since the last (or `force`).
    pub fn checkpoint(&self, force: bool) -> Result<bool> {
        let (checkpoint, ticket) = {
            let mut st = self.state.lock();
            if !force && st.records_since_checkpoint < CHECKPOINT_RECORDS_INTERVAL {
                return Ok(false);
            }
            if st.records_since_checkpoint == 0 {
                return Ok(false);
            }
            st.records_since_checkpoint = 0;
            let bytes =
                st.snapshot().map_err(io_err("encode checkpoint", &*self.storage, CHECKPOINT_FILE))?;
            (bytes, st.journal.sync_ticket())
        };
        // The checkpoint must never point past what the journal holds durably.
        if let Some(ticket) = ticket {
            self.sync_through(ticket.upto)?;
        }
        replace_file(&*self.storage, CHECKPOINT_FILE, &checkpoint).map_err(io_err(
            "write checkpoint",
            &*self.storage,
            CHECKPOINT_FILE,
        ))?;
        Ok(true)
    }

    /// Volumes of the group.
    pub fn volumes(&self) -> Vec<VolumeMeta> {
        self.state.lock().volumes.values().map(|v| v.meta.clone()).collect()
    }

    /// Allocation of `[offset, offset+length)` at `at`: runs of (length, allocated, zero).
    pub fn allocation(
        &self,
        volume: VolumeId,
        offset: u64,
        length: u64,
        at: Option<Seq>,
    ) -> Result<Vec<(u64, bool, bool)>> {
        let st = self.state.lock();
        let vol = st.volume(volume, &self.name)?;
        check_range(&vol.meta, offset, length)?;
        let bs = u64::from(vol.meta.block_size_bytes);
        let end = offset + length;
        let first = offset / bs;
        let last = end.div_ceil(bs);
        let base_ranges = vol.base.data_ranges(first * bs, (last - first) * bs).map_err(|source| {
            EngineError::Io { action: "query base image", path: vol.base.describe(first * bs), source }
        })?;
        // Per block state from the index where it has a version, else from the base.
        let mut overrides: BTreeMap<u64, (bool, bool)> = BTreeMap::new();
        if let Some(index) = st.index.get(&volume) {
            for (block, v) in index.blocks_at(first..last, at) {
                let state = if !v.is_zero() {
                    (true, false)
                } else if v.crc == ZERO_ALLOCATED {
                    (true, true)
                } else {
                    (false, true)
                };
                overrides.insert(block, state);
            }
        }
        let base_state = |block: u64| -> (bool, bool) {
            let pos = block * bs;
            if base_ranges.iter().any(|&(s, e)| pos < e && pos + bs > s) {
                (true, false)
            } else {
                (false, true)
            }
        };
        let mut runs: Vec<(u64, bool, bool)> = Vec::new();
        let mut push = |len: u64, state: (bool, bool)| match runs.last_mut() {
            Some(r) if (r.1, r.2) == state => r.0 += len,
            _ => runs.push((len, state.0, state.1)),
        };
        // Walk block boundaries where something changes: index blocks and base range edges.
        let mut cuts: BTreeSet<u64> = overrides.keys().flat_map(|&b| [b, b + 1]).collect();
        for &(s, e) in &base_ranges {
            cuts.insert(s / bs);
            cuts.insert(e.div_ceil(bs));
        }
        cuts.insert(first);
        cuts.insert(last);
        let cuts: Vec<u64> = cuts.into_iter().filter(|&c| c >= first && c <= last).collect();
        for w in cuts.windows(2) {
            let (a, b) = (w[0], w[1]);
            let state = overrides.get(&a).copied().unwrap_or_else(|| base_state(a));
            let lo = (a * bs).max(offset);
            let hi = (b * bs).min(end);
            if hi > lo {
                push(hi - lo, state);
            }
        }
        Ok(runs)
    }

    /// Summary numbers for `group show`.
    pub fn summary(&self) -> GroupSummary {
        let st = self.state.lock();
        let last_seq = st.journal.last_seq();
        GroupSummary {
            volumes: st.volumes.values().map(|v| v.meta.name.clone()).collect(),
            last_seq,
            oldest: st.point_info(st.control.horizon),
            newest: st.point_info(last_seq),
            journal_bytes: st.journal.bytes(),
            index_versions: st.index.values().map(|i| i.len() as u64).sum(),
            index_bytes: st.index.values().map(|i| i.memory_bytes() as u64).sum::<u64>()
                + st.times.memory_bytes() as u64,
        }
    }
}

/// A group's place in history, for replication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    /// Group id.
    pub group_id: u64,
    /// Primary generation known here.
    pub generation: u64,
    /// Where each generation's history begins, oldest first.
    pub generations: Vec<GenerationStart>,
    /// Oldest seq the journal holds.
    pub first_seq: Seq,
    /// Newest seq in the journal.
    pub last_seq: Seq,
    /// Chain hash after `last_seq`.
    pub chain: ChainHash,
    /// Newest durable seq.
    pub durable_seq: Seq,
}

/// How a secondary becomes primary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Promotion {
    /// A planned swap: both sites hold the same history, nothing forks.
    Swap,
    /// A takeover while the primary is unreachable: the history may fork here.
    Takeover,
}

/// The role fields of the control file (see [`Group::role_state`]).
#[derive(Clone, Debug)]
pub struct RoleState {
    /// Role here.
    pub role: Role,
    /// Newest generation known here.
    pub generation: u64,
    /// Where each generation's history begins, oldest first.
    pub generations: Vec<GenerationStart>,
    /// Role changes here, oldest first.
    pub role_changes: Vec<RoleChange>,
    /// This site's newest takeover's fork point.
    pub fork_point: Option<ForkPoint>,
    /// A swap started here as primary and not finished.
    pub swap_pending: Option<SwapPending>,
}

/// Numbers `group show` reports.
pub struct GroupSummary {
    /// Volume names.
    pub volumes: Vec<String>,
    /// Newest seq.
    pub last_seq: Seq,
    /// Oldest recoverable point.
    pub oldest: PointInfo,
    /// Newest point.
    pub newest: PointInfo,
    /// Journal bytes.
    pub journal_bytes: u64,
    /// Block versions in the index (the retention window's history).
    pub index_versions: u64,
    /// Bytes the index and the table of record times have allocated.
    pub index_bytes: u64,
}

/// One record's worth of a write, hashed ahead of the lock.
struct Prepared {
    /// blake3 of the record's data.
    hash: [u8; 32],
    /// crc32c of each block.
    crcs: Vec<u32>,
}

/// Bytes of data per write record for a volume of `block_bytes` blocks.
fn record_chunk_bytes(block_bytes: usize) -> usize {
    RECORD_DATA_BYTES_MAX / block_bytes * block_bytes
}

fn prepare(data: &[u8], block_bytes: usize) -> Vec<Prepared> {
    data.chunks(record_chunk_bytes(block_bytes))
        .map(|piece| Prepared {
            hash: tidemark_journal::record::payload_hash(piece),
            crcs: piece.chunks(block_bytes).map(crc32c::crc32c).collect(),
        })
        .collect()
}

/// `crc` value that marks a zero version whose blocks stay allocated (NO_HOLE).
const ZERO_ALLOCATED: u32 = 1;

/// Whether `[offset, +len)` is whole blocks of `block_bytes`.
fn whole_blocks(offset: u64, len: usize, block_bytes: u64) -> bool {
    offset.is_multiple_of(block_bytes) && (len as u64).is_multiple_of(block_bytes)
}

fn check_range(meta: &VolumeMeta, offset: u64, length: u64) -> Result<()> {
    match offset.checked_add(length) {
        Some(end) if end <= meta.size_bytes => Ok(()),
        _ => Err(EngineError::InvalidArgument(format!(
            "range [{offset}, +{length}) is outside volume {:?} of {} bytes",
            meta.name, meta.size_bytes
        ))),
    }
}

/// Where a data version's bytes are (in the segment that holds its record); `None` for a zero
/// version.
fn version_location(journal: &Journal, version: &Version, group: &str) -> Result<Option<Location>> {
    let Some(offset) = version.offset() else { return Ok(None) };
    let segment = journal.segment_of(Seq(version.seq)).ok_or_else(|| EngineError::Failed {
        group: group.into(),
        reason: format!("no journal segment holds record {}, which the index refers to", version.seq),
    })?;
    Ok(Some(Location { segment, offset }))
}

fn read_journal_block(journal: &Journal, loc: Location, crc: u32, buf: &mut [u8], group: &str) -> Result<()> {
    let file = journal.segment_file(loc.segment).ok_or_else(|| EngineError::Failed {
        group: group.into(),
        reason: format!("journal segment {} needed at offset {} is gone", loc.segment, loc.offset),
    })?;
    file.read_exact_at(buf, loc.offset).map_err(|e| EngineError::Failed {
        group: group.into(),
        reason: format!("reading journal segment {} at offset {}: {e}", loc.segment, loc.offset),
    })?;
    if crc32c::crc32c(buf) != crc {
        return Err(EngineError::Failed {
            group: group.into(),
            reason: format!(
                "block checksum mismatch in journal segment {} at offset {}",
                loc.segment, loc.offset
            ),
        });
    }
    Ok(())
}

/// How [`execute_read`] may read files.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// From the disk if need be.
    Wait,
    /// Only what is in memory
    /// ([`tidemark_journal::storage::StorageFile::try_read_exact_at`]).
    Cached,
}

/// Fill `buf` from `pieces`, checking every journal block's checksum. `Ok(None)` when `reads`
/// is [`Reads::Cached`] and some bytes were not in memory (`buf` is then in any state).
fn execute_read(pieces: &[Piece], buf: &mut [u8], group: &str, reads: Reads) -> Result<Option<()>> {
    let mut pos = 0usize;
    for piece in pieces {
        match piece {
            Piece::Zero { len } => {
                if let Some(dst) = buf.get_mut(pos..pos + len) {
                    dst.fill(0);
                }
                pos += len;
            }
            Piece::Base { base, offset, len } => {
                let dst = buf
                    .get_mut(pos..pos + len)
                    .ok_or_else(|| EngineError::InvalidArgument("read plan overflow".into()))?;
                if reads == Reads::Cached {
                    let Some(()) = base.try_read(*offset, dst) else { return Ok(None) };
                } else {
                    base.read(*offset, dst).map_err(|source| EngineError::Io {
                        action: "read base image",
                        path: base.describe(*offset),
                        source,
                    })?;
                }
                pos += len;
            }
            Piece::Journal { file, segment, offset, block_bytes, crcs } => {
                let total = block_bytes * crcs.len();
                let dst = buf
                    .get_mut(pos..pos + total)
                    .ok_or_else(|| EngineError::InvalidArgument("read plan overflow".into()))?;
                if reads == Reads::Cached {
                    let Some(()) = file.try_read_exact_at(dst, *offset) else { return Ok(None) };
                } else {
                    file.read_exact_at(dst, *offset).map_err(|e| EngineError::Failed {
                        group: group.into(),
                        reason: format!("reading journal segment {segment} at offset {offset}: {e}"),
                    })?;
                }
                for (i, (chunk, &crc)) in dst.chunks(*block_bytes).zip(crcs).enumerate() {
                    if crc32c::crc32c(chunk) != crc {
                        return Err(EngineError::Failed {
                            group: group.into(),
                            reason: format!(
                                "block checksum mismatch in journal segment {segment} at offset {}",
                                offset + (i * block_bytes) as u64
                            ),
                        });
                    }
                }
                pos += total;
            }
        }
    }
    Ok(Some(()))
}

impl Tables {
    fn new(control: ControlState, storage: Arc<dyn Storage>) -> Tables {
        Tables {
            control,
            volumes: BTreeMap::new(),
            index: HashMap::new(),
            bookmarks: Vec::new(),
            rollbacks: Vec::new(),
            times: RecordTimes::default(),
            records_since_checkpoint: 0,
            storage,
        }
    }

    /// The description of volume `id`, checking that `[offset, +length)` lies inside it.
    fn target(&self, id: VolumeId, offset: u64, length: u64, group: &str) -> Result<&VolumeMeta> {
        let meta = &self.volume(id, group)?.meta;
        check_range(meta, offset, length)?;
        Ok(meta)
    }

    fn volume(&self, id: VolumeId, group: &str) -> Result<&VolumeState> {
        self.volumes
            .get(&id)
            .ok_or_else(|| EngineError::NotFound { kind: "volume", name: format!("{group}/{}", id.0) })
    }

    /// Volume id by name.
    pub fn volume_id(&self, name: &str) -> Option<VolumeId> {
        self.volumes.values().find(|v| v.meta.name == name).map(|v| v.meta.id)
    }

    /// Volume description by id.
    pub fn volume_meta(&self, id: VolumeId) -> Option<VolumeMeta> {
        self.volumes.get(&id).map(|v| v.meta.clone())
    }

    /// The id the next created volume gets.
    pub fn next_volume_id(&self) -> VolumeId {
        let max_known = self.volumes.keys().next_back().map_or(0, |v| v.0);
        let max_index = self.index.keys().map(|v| v.0).max().unwrap_or(0);
        VolumeId(
            max_known.max(max_index).max(self.control.volumes.iter().map(|v| v.id.0).max().unwrap_or(0)) + 1,
        )
    }

    /// Add a volume. Touches no file (chunks are created on first write), so applying a
    /// journaled volume creation cannot fail after the record was appended.
    fn add_volume(&mut self, meta: VolumeMeta) {
        let base = Arc::new(BaseImage::new(self.storage.clone(), meta.id));
        self.volumes.insert(meta.id, VolumeState { meta, base });
    }

    /// Refuse unless this site may append host records: primary, with no swap under way.
    fn check_primary(&self, group: &str) -> Result<()> {
        if self.control.role != Role::Primary {
            return Err(EngineError::NotPrimary { group: group.into() });
        }
        if self.control.swap_pending.is_some() {
            return Err(EngineError::RoleChanging { group: group.into() });
        }
        Ok(())
    }

    /// Make `control` the control state: synced to disk first, then adopted.
    fn replace_control(&mut self, control: ControlState) -> Result<()> {
        write_control(&*self.storage, &control).map_err(io_err(
            "write control file",
            &*self.storage,
            CONTROL_FILE,
        ))?;
        self.control = control;
        Ok(())
    }

    fn write_control(&self) -> Result<()> {
        write_control(&*self.storage, &self.control).map_err(io_err(
            "write control file",
            &*self.storage,
            CONTROL_FILE,
        ))
    }

    /// Apply one record to the in-memory state. The single path for live appends and replay.
    fn apply(&mut self, record: &Record, location: Location) -> Result<()> {
        match &record.body {
            RecordBody::Write { volume, offset, data } => {
                let bs = self.volumes.get(volume).map_or(4096, |v| v.meta.block_size_bytes as usize);
                let crcs: Vec<u32> = data.chunks(bs).map(crc32c::crc32c).collect();
                self.apply_write(record.seq, record.time, *volume, *offset, location, &crcs);
                return Ok(());
            }
            RecordBody::Zero { volume, offset, length, mode } => {
                if let Some(vol) = self.volumes.get(volume) {
                    let bs = u64::from(vol.meta.block_size_bytes);
                    let (first, last) = (offset / bs, (offset + length).div_ceil(bs));
                    // Zero versions only where the block may hold data: blocks with history, and
                    // allocated blocks of the base. Untouched holes already read as zeroes.
                    let mut blocks: BTreeSet<u64> = self
                        .index
                        .get(volume)
                        .map(|i| i.blocks_at(first..last, None).map(|(b, _)| b).collect())
                        .unwrap_or_default();
                    let ranges = vol.base.data_ranges(first * bs, (last - first) * bs).map_err(|source| {
                        EngineError::Io {
                            action: "query base image",
                            path: vol.base.describe(first * bs),
                            source,
                        }
                    })?;
                    for (s, e) in ranges {
                        blocks.extend(s / bs..e.div_ceil(bs));
                    }
                    let marker = if *mode == ZeroMode::Allocate { ZERO_ALLOCATED } else { 0 };
                    let version = Version::zero(record.seq, marker);
                    let index = self.index.entry(*volume).or_default();
                    for b in blocks {
                        index.push(b, version);
                    }
                }
            }
            RecordBody::Control(control) => match control {
                Control::VolumeCreated { volume, name, size_bytes, block_size_bytes } => {
                    let meta = VolumeMeta {
                        id: *volume,
                        name: name.clone(),
                        size_bytes: *size_bytes,
                        block_size_bytes: *block_size_bytes,
                    };
                    self.add_volume(meta);
                }
                Control::VolumeResized { volume, size_bytes } => {
                    if let Some(v) = self.volumes.get_mut(volume) {
                        v.meta.size_bytes = v.meta.size_bytes.max(*size_bytes);
                    }
                }
                Control::VolumeDeleted { volume } => {
                    self.index.remove(volume);
                    if let Some(v) = self.volumes.remove(volume) {
                        // The record is durable; a leftover chunk file is harmless (a new volume
                        // gets a new id) and is retried at the next deletion of this id.
                        if let Err(e) = v.base.remove() {
                            tracing::warn!(volume = %v.meta.name, error = %e, "removing a deleted volume's base image failed");
                        }
                    }
                }
                Control::Bookmark { name } => {
                    self.bookmarks.push(BookmarkEntry {
                        name: name.clone(),
                        seq: record.seq,
                        time: record.time,
                    });
                }
                Control::RollbackBegin { target } => {
                    self.rollbacks.push(RollbackEntry {
                        target: *target,
                        begin: record.seq,
                        end: None,
                        bytes_rewritten: 0,
                    });
                }
                Control::RollbackEnd { begin, .. } => {
                    if let Some(r) = self.rollbacks.iter_mut().rev().find(|r| r.begin == *begin) {
                        r.end = Some(record.seq);
                    }
                }
            },
        }
        self.note_record(record.seq, record.time);
        Ok(())
    }

    fn apply_write(
        &mut self,
        seq: Seq,
        time: UnixNanos,
        volume: VolumeId,
        offset: u64,
        location: Location,
        crcs: &[u32],
    ) {
        if let Some(vol) = self.volumes.get(&volume) {
            let bs = u64::from(vol.meta.block_size_bytes);
            let first = offset / bs;
            let data_start = location.offset + HEADER_BYTES as u64;
            let index = self.index.entry(volume).or_default();
            for (i, &crc) in crcs.iter().enumerate() {
                let i = i as u64;
                index.push(first + i, Version::data(seq, data_start + i * bs, crc));
            }
        }
        self.note_record(seq, time);
    }

    fn note_record(&mut self, seq: Seq, time: UnixNanos) {
        self.times.push(seq, time);
        self.records_since_checkpoint += 1;
    }

    fn time_of(&self, seq: Seq) -> UnixNanos {
        self.times.get(seq).unwrap_or(self.control.horizon_time)
    }

    fn point_info(&self, seq: Seq) -> PointInfo {
        PointInfo { seq: seq.0, time: self.time_of(seq).rfc3339() }
    }
}

impl GroupState {
    fn resolve(&self, point: &Point, now: UnixNanos, group: &str) -> Result<Seq> {
        let oldest = self.control.horizon;
        let newest = self.journal.last_seq();
        let out_of_range = || EngineError::PointOutOfRange {
            group: group.into(),
            point: point.to_string(),
            oldest: self.time_of(oldest).rfc3339(),
            oldest_seq: oldest.0,
            newest: self.time_of(newest).rfc3339(),
            newest_seq: newest.0,
        };
        let by_time = |t: UnixNanos| -> Result<Seq> {
            if t < self.time_of(oldest) {
                return Err(out_of_range());
            }
            // Times are non-decreasing: the last record with time <= t.
            Ok(self.times.last_at_or_before(t).map_or(oldest, |seq| seq.max(oldest)))
        };
        let seq = match point {
            Point::Latest => newest,
            Point::Seq(s) => *s,
            Point::Bookmark(name) => self
                .bookmarks
                .iter()
                .find(|b| &b.name == name)
                .map(|b| b.seq)
                .ok_or_else(|| EngineError::NotFound { kind: "bookmark", name: name.clone() })?,
            Point::Time(t) => by_time(*t)?,
            Point::Ago(d) => {
                by_time(UnixNanos(now.0.saturating_sub(d.as_nanos().min(u128::from(u64::MAX)) as u64)))?
            }
        };
        if seq < oldest || seq > newest {
            return Err(out_of_range());
        }
        Ok(seq)
    }

    /// Plan a block-aligned read: which bytes come from the journal, the base, or are zero.
    fn plan_read(
        &self,
        volume: VolumeId,
        offset: u64,
        len: u64,
        at: Option<Seq>,
        group: &str,
    ) -> Result<Vec<Piece>> {
        let vol = self.volume(volume, group)?;
        let bs = u64::from(vol.meta.block_size_bytes);
        let (first, last) = (offset / bs, (offset + len) / bs);
        let mut versions = self.index.get(&volume).map(|i| i.blocks_at(first..last, at).peekable());
        let mut pieces: Vec<Piece> = Vec::new();
        for block in first..last {
            let version = versions.as_mut().and_then(|v| v.next_if(|&(b, _)| b == block)).map(|(_, v)| v);
            match version {
                Some(v) => match version_location(&self.journal, &v, group)? {
                    Some(loc) => {
                        if let Some(Piece::Journal { offset: o, crcs, segment, .. }) = pieces.last_mut() {
                            if *segment == loc.segment && *o + crcs.len() as u64 * bs == loc.offset {
                                crcs.push(v.crc);
                                continue;
                            }
                        }
                        let file =
                            self.journal.segment_file(loc.segment).ok_or_else(|| EngineError::Failed {
                                group: group.into(),
                                reason: format!("journal segment {} is missing", loc.segment),
                            })?;
                        pieces.push(Piece::Journal {
                            file,
                            segment: loc.segment,
                            offset: loc.offset,
                            block_bytes: bs as usize,
                            crcs: vec![v.crc],
                        });
                    }
                    None => push_zero(&mut pieces, bs as usize),
                },
                None => {
                    if let Some(Piece::Base { offset: o, len, .. }) = pieces.last_mut() {
                        if *o + *len as u64 == block * bs {
                            *len += bs as usize;
                            continue;
                        }
                    }
                    pieces.push(Piece::Base { base: vol.base.clone(), offset: block * bs, len: bs as usize });
                }
            }
        }
        Ok(pieces)
    }

    /// Read with the lock held (read-modify-write, rollback).
    fn read_into(
        &self,
        volume: VolumeId,
        offset: u64,
        buf: &mut [u8],
        at: Option<Seq>,
        group: &str,
    ) -> Result<()> {
        let pieces = self.plan_read(volume, offset, buf.len() as u64, at, group)?;
        execute_read(&pieces, buf, group, Reads::Wait).map(|_| ())
    }

    /// The checkpoint's bytes, encoded from the tables in place.
    fn snapshot(&self) -> std::io::Result<Vec<u8>> {
        encode_checkpoint(&Checkpoint {
            resume: self.journal.resume_point(),
            horizon: self.control.horizon,
            volumes: self.volumes.values().map(|v| v.meta.clone()).collect(),
            bookmarks: self.bookmarks.clone(),
            rollbacks: self.rollbacks.clone(),
            times: Cow::Borrowed(&self.times),
            index: self.index.iter().map(|(id, index)| (*id, Cow::Borrowed(index))).collect(),
        })
    }
}

fn push_zero(pieces: &mut Vec<Piece>, len: usize) {
    if let Some(Piece::Zero { len: l }) = pieces.last_mut() {
        *l += len;
    } else {
        pieces.push(Piece::Zero { len });
    }
}
