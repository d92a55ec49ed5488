//! Tidemark's block engine: protection groups of thin volumes stored as a CDP journal plus base
//! images, with point-in-time reads, rollback as a forward operation, bookmarks and images.
//!
//! The engine is synchronous and thread-safe. It knows nothing of NBD, HTTP or async runtimes:
//! the site daemon adapts it to those. Time comes from a [`Clock`] and files from a
//! [`StorageProvider`], so tests can control both.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use tidemark_journal::storage::{OsStorage, Storage};
use tidemark_journal::{Control, VolumeId, ZeroMode};

pub mod base;
pub mod baseline;
pub mod catalog;
pub mod error;
pub mod events;
pub mod group;
pub mod image;
pub mod index;
pub mod persist;
pub mod times;
pub mod types;
pub mod writeback;

pub use error::{EngineError, Result};
pub use events::{EngineEvent, EventSink, MemoryEvents, NullEvents};
pub use types::*;

use catalog::{Catalog, GroupRecord, ImageRecord, SledCatalog};
use group::{Group, Health};
use image::Image;

/// Where time comes from.
pub trait Clock: Send + Sync {
    /// Now, as wall-clock nanoseconds since the Unix epoch.
    fn now(&self) -> UnixNanos;
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> UnixNanos {
        let d = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        UnixNanos(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A clock tests move by hand.
#[derive(Default)]
pub struct ManualClock(pub std::sync::atomic::AtomicU64);

impl ManualClock {
    /// Move forward by `d`.
    pub fn advance(&self, d: Duration) {
        self.0.fetch_add(d.as_nanos() as u64, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> UnixNanos {
        UnixNanos(self.0.load(std::sync::atomic::Ordering::SeqCst))
    }
}

/// Where groups and images keep their files.
pub trait StorageProvider: Send + Sync {
    /// The directory of group `id`.
    fn group(&self, id: u64) -> std::io::Result<Arc<dyn Storage>>;
    /// The directory of image `name`'s overlay.
    fn image(&self, name: &str) -> std::io::Result<Arc<dyn Storage>>;
    /// Remove image `name`'s directory.
    fn remove_image(&self, name: &str) -> std::io::Result<()>;
}

/// Directories under a data directory: `groups/<id>/` and `images/<name>/`.
pub struct DirStorage(pub PathBuf);

impl StorageProvider for DirStorage {
    fn group(&self, id: u64) -> std::io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(OsStorage::new(self.0.join("groups").join(format!("{id:016x}")))?))
    }
    fn image(&self, name: &str) -> std::io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(OsStorage::new(self.0.join("images").join(name))?))
    }
    fn remove_image(&self, name: &str) -> std::io::Result<()> {
        match std::fs::remove_dir_all(self.0.join("images").join(name)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }
}

/// How an engine is set up.
pub struct EngineConfig {
    /// Data directory (catalog, groups, images).
    pub data_dir: PathBuf,
    /// Where events go.
    pub events: Arc<dyn EventSink>,
    /// How often retention trimming and checkpoints run.
    pub maintenance_interval: Duration,
}

impl EngineConfig {
    /// Defaults for `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>, events: Arc<dyn EventSink>) -> Self {
        EngineConfig { data_dir: data_dir.into(), events, maintenance_interval: Duration::from_secs(1) }
    }
}

/// Whether a write must be durable before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Durable at the next flush.
    Buffered,
    /// Durable before the call returns (NBD FUA).
    Fua,
}

/// Whether zeroed blocks may be deallocated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Punch {
    /// They may become holes.
    Allowed,
    /// They must stay allocated (NBD_CMD_FLAG_NO_HOLE).
    Forbidden,
}

/// An export as the NBD server lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportDesc {
    /// `VOLUME` or `IMAGE/VOLUME`.
    pub name: String,
    /// For people.
    pub description: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Block size in bytes.
    pub block_size_bytes: u32,
    /// Refuses writes.
    pub read_only: bool,
}

/// A run of an allocation map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes.
    pub length_bytes: u64,
    /// Backed by storage (not a hole).
    pub allocated: bool,
    /// Reads as zeroes.
    pub zero: bool,
}

enum GroupSlot {
    Open(Arc<Group>),
    Failed { options: GroupOptions, reason: String },
}

/// The engine of one site.
pub struct Engine {
    catalog: Box<dyn Catalog>,
    storage: Box<dyn StorageProvider>,
    clock: Arc<dyn Clock>,
    events: Arc<dyn EventSink>,
    groups: RwLock<BTreeMap<String, GroupSlot>>,
    images: RwLock<BTreeMap<String, Arc<Image>>>,
    /// Serialises catalog changes so names stay unique.
    admin: Mutex<()>,
    /// History holds by other parts of the site: (group, holder) -> oldest seq still needed.
    pins: Mutex<BTreeMap<(String, String), Seq>>,
    maintenance: Mutex<Option<(mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
    /// Background writeback (see [`writeback`]); `None` for engines opened with
    /// [`Engine::open_with`], whose groups are flushed only when asked.
    writeback: Mutex<Option<(Arc<writeback::Writeback>, std::thread::JoinHandle<()>)>>,
}

impl Drop for Engine {
    fn drop(&mut self) {
        // The writeback thread holds no reference to the engine, so it must be told to stop.
        if let Some((writeback, handle)) = self.writeback.get_mut().take() {
            writeback.stop();
            let _ = handle.join();
        }
    }
}

impl Engine {
    /// Open the engine in `config.data_dir` (sled catalog, group directories) and start its
    /// maintenance thread.
    pub fn open(config: EngineConfig, clock: Arc<dyn Clock>) -> Result<Arc<Engine>> {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| EngineError::Io {
            action: "create data directory",
            path: config.data_dir.clone(),
            source,
        })?;
        let catalog = SledCatalog::open(&config.data_dir.join("catalog"))?;
        let engine = Engine::open_with(
            Box::new(catalog),
            Box::new(DirStorage(config.data_dir.clone())),
            clock,
            config.events.clone(),
        )?;
        engine.start_maintenance(config.maintenance_interval);
        engine.start_writeback();
        Ok(engine)
    }

    /// Open with an explicit catalog and storage (tests use memory and simulated disks).
    /// No maintenance thread is started; call [`Engine::maintain`] by hand.
    pub fn open_with(
        catalog: Box<dyn Catalog>,
        storage: Box<dyn StorageProvider>,
        clock: Arc<dyn Clock>,
        events: Arc<dyn EventSink>,
    ) -> Result<Arc<Engine>> {
        let mut groups = BTreeMap::new();
        for record in catalog.groups()? {
            let slot = match storage
                .group(record.id)
                .map_err(|source| EngineError::Io {
                    action: "open group directory",
                    path: record.name.clone().into(),
                    source,
                })
                .and_then(|st| {
                    Group::open(
                        st,
                        record.id,
                        &record.name,
                        record.options.clone(),
                        clock.clone(),
                        events.clone(),
                    )
                }) {
                Ok(group) => GroupSlot::Open(Arc::new(group)),
                Err(e) => {
                    // One damaged group must not take the site down: it is listed as failed.
                    let reason = e.to_string();
                    tracing::error!(group = %record.name, %reason, "group failed to open");
                    events.event(EngineEvent::GroupFailed {
                        group: record.name.clone(),
                        reason: reason.clone(),
                    });
                    GroupSlot::Failed { options: record.options.clone(), reason }
                }
            };
            groups.insert(record.name.clone(), slot);
        }
        let mut images = BTreeMap::new();
        for record in catalog.images()? {
            let Some(GroupSlot::Open(group)) = groups.get(&record.group) else { continue };
            let st = match record.mode.has_overlay() {
                true => Some(storage.image(&record.name).map_err(|source| EngineError::Io {
                    action: "open image directory",
                    path: record.name.clone().into(),
                    source,
                })?),
                false => None,
            };
            let image = Image::open(record.clone(), group.clone(), st)?;
            images.insert(record.name.clone(), Arc::new(image));
        }
        Ok(Arc::new(Engine {
            catalog,
            storage,
            clock,
            events,
            groups: RwLock::new(groups),
            images: RwLock::new(images),
            admin: Mutex::new(()),
            pins: Mutex::new(BTreeMap::new()),
            maintenance: Mutex::new(None),
            writeback: Mutex::new(None),
        }))
    }

    fn start_maintenance(self: &Arc<Self>, interval: Duration) {
        let (tx, rx) = mpsc::channel::<()>();
        let weak = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("tidemark-maintenance".into())
            .spawn(move || {
                // A message or a closed channel means stop; a timeout means another round.
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                    let Some(engine) = weak.upgrade() else { break };
                    engine.maintain();
                }
            })
            .expect("spawn the maintenance thread");
        *self.maintenance.lock() = Some((tx, handle));
    }

    fn start_writeback(&self) {
        let (writeback, handle) = writeback::start();
        for group in self.open_groups() {
            group.attach_writeback(writeback.clone());
        }
        *self.writeback.lock() = Some((writeback, handle));
    }

    /// Register a newly created group, attached to the background writeback if there is one.
    fn insert_group(&self, name: &str, group: Arc<Group>) {
        if let Some((writeback, _)) = &*self.writeback.lock() {
            group.attach_writeback(writeback.clone());
        }
        self.groups.write().insert(name.into(), GroupSlot::Open(group));
    }

    /// One round of maintenance: trim history that retention or size limits release, write
    /// checkpoints that are due. Errors are logged and raised as events, never fatal.
    pub fn maintain(&self) {
        for group in self.open_groups() {
            let images =
                self.images.read().values().filter(|i| i.group.name == group.name).map(|i| i.seq()).min();
            let held = self.pins.lock().iter().filter(|((g, _), _)| *g == group.name).map(|(_, s)| *s).min();
            let pin = images.into_iter().chain(held).min();
            if let Err(e) = group.trim(pin) {
                tracing::warn!(group = %group.name, error = %e, "trimming history failed");
            }
            if let Err(e) = group.checkpoint(false) {
                tracing::warn!(group = %group.name, error = %e, "writing the index checkpoint failed");
            }
        }
    }

    /// Keep `group`'s history from `seq` on (trimming stops before it) for `holder`, e.g.
    /// replication holding what the partner has not acknowledged. `None` releases the hold.
    pub fn pin(&self, group: &str, holder: &str, seq: Option<Seq>) {
        let key = (group.to_string(), holder.to_string());
        let mut pins = self.pins.lock();
        match seq {
            Some(s) => pins.insert(key, s),
            None => pins.remove(&key),
        };
    }

    /// Stop maintenance, write checkpoints, flush images. Call before exit.
    pub fn shutdown(&self) -> Result<()> {
        if let Some((tx, handle)) = self.maintenance.lock().take() {
            drop(tx);
            let _ = handle.join();
        }
        if let Some((writeback, handle)) = self.writeback.lock().take() {
            writeback.stop();
            let _ = handle.join();
        }
        for image in self.images.read().values() {
            image.flush()?;
        }
        for group in self.open_groups() {
            if group.health() == Health::Ok {
                group.flush()?;
                group.checkpoint(true)?;
            }
        }
        Ok(())
    }

    fn open_groups(&self) -> Vec<Arc<Group>> {
        self.groups
            .read()
            .values()
            .filter_map(|s| match s {
                GroupSlot::Open(g) => Some(g.clone()),
                GroupSlot::Failed { .. } => None,
            })
            .collect()
    }

    /// Records replayed from the journal when `group` was opened (test and start-up metrics).
    pub fn records_replayed(&self, group: &str) -> Result<u64> {
        Ok(self.group_arc(group)?.records_replayed)
    }

    fn group_arc(&self, name: &str) -> Result<Arc<Group>> {
        match self.groups.read().get(name) {
            Some(GroupSlot::Open(g)) => Ok(g.clone()),
            Some(GroupSlot::Failed { reason, .. }) => {
                Err(EngineError::Failed { group: name.into(), reason: reason.clone() })
            }
            None => Err(EngineError::NotFound { kind: "group", name: name.into() }),
        }
    }

    /// Create a protection group.
    pub fn create_group(&self, name: &str, options: GroupOptions) -> Result<GroupInfo> {
        validate_name("group", name)?;
        if options.retention_seconds == 0 {
            return Err(EngineError::InvalidArgument("retention must be at least 1 second".into()));
        }
        if options.journal_max_bytes < 16 << 20 {
            return Err(EngineError::InvalidArgument("journal_max must be at least 16 MiB".into()));
        }
        let _admin = self.admin.lock();
        if self.groups.read().contains_key(name) {
            return Err(EngineError::AlreadyExists { kind: "group", name: name.into() });
        }
        let id = rand::random::<u64>() >> 1;
        let storage = self.storage.group(id).map_err(|source| EngineError::Io {
            action: "create group directory",
            path: name.into(),
            source,
        })?;
        let group =
            Group::create(storage, id, name, options.clone(), self.clock.clone(), self.events.clone())?;
        // The group's files exist before the catalog names it: a crash in between leaves an
        // unnamed directory, never a catalog entry without files.
        self.catalog.put_group(&GroupRecord { id, name: name.into(), options })?;
        let group = Arc::new(group);
        self.insert_group(name, group.clone());
        Ok(self.group_info(name, &GroupSlot::Open(group)))
    }

    /// Create the secondary copy of a partner's group: same id (it seeds the hash chain), no
    /// volumes yet (they arrive in-band), refusing host writes until promoted.
    pub fn create_secondary_group(
        &self,
        name: &str,
        id: u64,
        options: GroupOptions,
        generation: u64,
    ) -> Result<GroupInfo> {
        validate_name("group", name)?;
        let _admin = self.admin.lock();
        if self.groups.read().contains_key(name) {
            return Err(EngineError::AlreadyExists { kind: "group", name: name.into() });
        }
        let storage = self.storage.group(id).map_err(|source| EngineError::Io {
            action: "create group directory",
            path: name.into(),
            source,
        })?;
        let group = Group::create_as(
            storage,
            id,
            name,
            options.clone(),
            (persist::Role::Secondary, generation),
            self.clock.clone(),
            self.events.clone(),
        )?;
        self.catalog.put_group(&GroupRecord { id, name: name.into(), options })?;
        let group = Arc::new(group);
        self.insert_group(name, group.clone());
        Ok(self.group_info(name, &GroupSlot::Open(group)))
    }

    /// The group itself, for the site's replication tasks.
    pub fn group_handle(&self, name: &str) -> Result<Arc<Group>> {
        self.group_arc(name)
    }

    /// Every group.
    pub fn groups(&self) -> Vec<GroupInfo> {
        self.groups.read().iter().map(|(name, slot)| self.group_info(name, slot)).collect()
    }

    /// One group.
    pub fn group(&self, name: &str) -> Result<GroupInfo> {
        let groups = self.groups.read();
        let slot =
            groups.get(name).ok_or_else(|| EngineError::NotFound { kind: "group", name: name.into() })?;
        Ok(self.group_info(name, slot))
    }

    fn group_info(&self, name: &str, slot: &GroupSlot) -> GroupInfo {
        match slot {
            GroupSlot::Open(g) => {
                let s = g.summary();
                let (state, state_reason) = match g.health() {
                    Health::Ok => ("ok".to_string(), None),
                    Health::Poisoned(r) => ("poisoned".to_string(), Some(r)),
                    Health::Failed(r) => ("failed".to_string(), Some(r)),
                };
                GroupInfo {
                    name: name.into(),
                    volumes: s.volumes,
                    last_seq: s.last_seq.0,
                    oldest_point: s.oldest.time,
                    newest_point: s.newest.time,
                    oldest_seq: s.oldest.seq,
                    retention_seconds: g.options.retention_seconds,
                    journal_max_bytes: g.options.journal_max_bytes,
                    journal_bytes: s.journal_bytes,
                    state,
                    state_reason,
                    role: role_name(g.role()).into(),
                    generation: g.generation(),
                    index_versions: s.index_versions,
                    index_bytes: s.index_bytes,
                }
            }
            GroupSlot::Failed { options, reason } => GroupInfo {
                name: name.into(),
                volumes: Vec::new(),
                last_seq: 0,
                oldest_point: String::new(),
                newest_point: String::new(),
                oldest_seq: 0,
                retention_seconds: options.retention_seconds,
                journal_max_bytes: options.journal_max_bytes,
                journal_bytes: 0,
                state: "failed".into(),
                state_reason: Some(reason.clone()),
                role: "unknown".into(),
                generation: 0,
                index_versions: 0,
                index_bytes: 0,
            },
        }
    }

    /// Find a volume by name: its group and id.
    fn find_volume(&self, name: &str) -> Result<(Arc<Group>, VolumeId)> {
        for group in self.open_groups() {
            if let Some(id) = group.with_state(|st| st.volume_id(name)) {
                return Ok((group, id));
            }
        }
        Err(EngineError::NotFound { kind: "volume", name: name.into() })
    }

    /// Create a thin volume in `group`.
    pub fn create_volume(
        &self,
        group: &str,
        name: &str,
        size_bytes: u64,
        block_size_bytes: u32,
    ) -> Result<VolumeInfo> {
        validate_name("volume", name)?;
        if !BLOCK_SIZES_ALLOWED.contains(&block_size_bytes) {
            return Err(EngineError::InvalidArgument(format!(
                "block size {block_size_bytes} is not supported (use 512 or 4096)"
            )));
        }
        validate_size(size_bytes, block_size_bytes)?;
        let _admin = self.admin.lock();
        if self.find_volume(name).is_ok() {
            return Err(EngineError::AlreadyExists { kind: "volume", name: name.into() });
        }
        let g = self.group_arc(group)?;
        let volume = g.with_state(|st| st.next_volume_id());
        g.append_control(Control::VolumeCreated { volume, name: name.into(), size_bytes, block_size_bytes })?;
        Ok(VolumeInfo { name: name.into(), group: group.into(), size_bytes, block_size_bytes })
    }

    /// Every volume.
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.open_groups()
            .iter()
            .flat_map(|g| {
                g.volumes().into_iter().map(|m| VolumeInfo {
                    name: m.name,
                    group: g.name.clone(),
                    size_bytes: m.size_bytes,
                    block_size_bytes: m.block_size_bytes,
                })
            })
            .collect()
    }

    /// One volume.
    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        self.volumes()
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| EngineError::NotFound { kind: "volume", name: name.into() })
    }

    /// Grow a volume.
    pub fn resize_volume(&self, name: &str, size_bytes: u64) -> Result<VolumeInfo> {
        let _admin = self.admin.lock();
        let (g, id) = self.find_volume(name)?;
        let meta = g
            .with_state(|st| st.volume_meta(id))
            .ok_or_else(|| EngineError::NotFound { kind: "volume", name: name.into() })?;
        validate_size(size_bytes, meta.block_size_bytes)?;
        if size_bytes < meta.size_bytes {
            return Err(EngineError::InvalidArgument(format!(
                "volume {name:?} is {} bytes; shrinking is not supported (it would destroy data hosts may still use)",
                meta.size_bytes
            )));
        }
        if size_bytes > meta.size_bytes {
            g.append_control(Control::VolumeResized { volume: id, size_bytes })?;
        }
        self.volume(name)
    }

    /// Delete a volume. Refused while an image of its group exists (the image may show it).
    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let _admin = self.admin.lock();
        let (g, id) = self.find_volume(name)?;
        if let Some(image) = self.images.read().values().find(|i| i.group.name == g.name) {
            return Err(EngineError::Conflict(format!(
                "volume {name:?} cannot be deleted while image {:?} of group {:?} exists; delete the image first",
                image.record.name, g.name
            )));
        }
        g.append_control(Control::VolumeDeleted { volume: id })?;
        Ok(())
    }

    /// Bookmark the newest point of `group`.
    pub fn create_bookmark(&self, group: &str, name: &str) -> Result<BookmarkInfo> {
        validate_name("bookmark", name)?;
        let g = self.group_arc(group)?;
        let (seq, _) = g.bookmark(name)?;
        Ok(BookmarkInfo { name: name.into(), point: g.point_info(seq) })
    }

    /// Bookmarks of `group`, oldest first.
    pub fn bookmarks(&self, group: &str) -> Result<Vec<BookmarkInfo>> {
        let g = self.group_arc(group)?;
        Ok(g.bookmarks()
            .into_iter()
            .map(|b| BookmarkInfo { name: b.name, point: g.point_info(b.seq) })
            .collect())
    }

    /// Recoverable range, bookmarks and rollbacks of `group`.
    pub fn history(&self, group: &str) -> Result<HistoryInfo> {
        let g = self.group_arc(group)?;
        let s = g.summary();
        Ok(HistoryInfo {
            group: group.into(),
            oldest: s.oldest,
            newest: s.newest,
            bookmarks: self.bookmarks(group)?,
            rollbacks: g
                .rollbacks()
                .iter()
                .filter(|r| r.end.is_some())
                .map(|r| self.rollback_info(&g, r))
                .collect(),
        })
    }

    fn rollback_info(&self, g: &Group, r: &persist::RollbackEntry) -> RollbackInfo {
        RollbackInfo {
            target: g.point_info(r.target),
            before: g.point_info(Seq(r.begin.0.saturating_sub(1))),
            after: g.point_info(r.end.unwrap_or(r.begin)),
            bytes_rewritten: r.bytes_rewritten,
        }
    }

    /// Roll `group` back to `to`, as a journaled forward operation.
    pub fn rollback(&self, group: &str, to: &Point, progress: &dyn Fn(Progress)) -> Result<RollbackInfo> {
        let g = self.group_arc(group)?;
        let target = g.resolve(to)?;
        let entry = g.rollback(target, progress)?;
        self.events.event(EngineEvent::RollbackCompleted {
            group: group.into(),
            target: target.0,
            bytes_rewritten: entry.bytes_rewritten,
        });
        let entry = g.rollbacks().into_iter().rev().find(|r| r.begin == entry.begin).unwrap_or(entry);
        Ok(self.rollback_info(&g, &entry))
    }

    /// Undo the newest rollback: roll back to the point just before it began.
    pub fn undo_rollback(&self, group: &str, progress: &dyn Fn(Progress)) -> Result<RollbackInfo> {
        let g = self.group_arc(group)?;
        let last = g.rollbacks().into_iter().rev().find(|r| r.end.is_some()).ok_or_else(|| {
            EngineError::Conflict(format!("group {group:?} has no rollback in its history to undo"))
        })?;
        self.rollback(group, &Point::Seq(Seq(last.begin.0 - 1)), progress)
    }

    /// Take over `group` at this site (a secondary whose primary is lost): become primary under
    /// a new generation at the newest record, then, when `at` names an earlier point, roll the
    /// volumes back to it as a journaled operation of the new generation. Returns the fork point.
    pub fn takeover(&self, group: &str, at: Option<&Point>, reason: &str) -> Result<persist::ForkPoint> {
        let g = self.group_arc(group)?;
        if g.role() != persist::Role::Secondary {
            return Err(EngineError::Conflict(format!("group {group:?} is already primary here")));
        }
        // Resolve the point first: a bad point must not leave a promoted group behind.
        let target = at.map(|p| g.resolve(p)).transpose()?;
        let generation = g.generation() + 1;
        let fork = g.promote(generation, group::Promotion::Takeover, reason)?;
        self.events.event(EngineEvent::RoleChanged {
            group: group.into(),
            from: "secondary".into(),
            to: "primary".into(),
            generation,
            reason: reason.into(),
        });
        if let Some(target) = target.filter(|t| *t < fork.seq) {
            self.rollback(group, &Point::Seq(target), &|_| {})?;
        }
        Ok(fork)
    }

    /// Make a returning primary a secondary that continues its partner's history: keep the
    /// records after `fork` (which the partner never received) as a read-only salvage image,
    /// then cut them from the journal. Idempotent across crashes: a salvage image already made
    /// for this fork is kept and the rewind finishes. Returns the salvage image, if there was a
    /// tail. The group must already be a secondary (see [`Group::demote`]).
    pub fn failback(&self, group: &str, fork: Seq, fork_generation: u64) -> Result<Option<ImageInfo>> {
        let _admin = self.admin.lock();
        let g = self.group_arc(group)?;
        if g.role() != persist::Role::Secondary {
            return Err(EngineError::Conflict(format!("group {group:?} must be demoted before failback")));
        }
        let last = g.position().last_seq;
        if last <= fork {
            return Ok(None);
        }
        if let Some(image) = self
            .images
            .read()
            .values()
            .find(|i| i.group.name == group && i.seq() > fork && i.record.mode != ImageMode::Salvage)
        {
            return Err(EngineError::Conflict(format!(
                "image {} shows seq {}, after the fork point at seq {}; failback would cut its history away. \
                 Copy out what you need and delete the image; failback then continues",
                image.record.name,
                image.seq().0,
                fork.0
            )));
        }
        let created = g.volumes_created_after(fork)?;
        if !created.is_empty() {
            return Err(EngineError::Conflict(format!(
                "the divergent tail of group {group:?} after seq {} creates volume(s) {}, which a salvage image \
                 cannot hold; copy them out and take over from this site instead, or remove the group",
                fork.0,
                created.join(", ")
            )));
        }
        let name = format!("{group}-salvage-g{fork_generation}-s{}", fork.0);
        let existing = self.images.read().get(&name).cloned();
        let image = match existing {
            Some(image) => image,
            None => self.make_salvage(&g, &name, fork, fork_generation, last)?,
        };
        let info = self.image_info(&image);
        let removed = g.rewind(fork)?;
        self.events.event(EngineEvent::Rewound { group: group.into(), seq: fork.0, records: removed });
        Ok(Some(info))
    }

    fn make_salvage(
        &self,
        g: &Arc<Group>,
        name: &str,
        fork: Seq,
        fork_generation: u64,
        last: Seq,
    ) -> Result<Arc<Image>> {
        let io = |action: &'static str| {
            let path: std::path::PathBuf = name.into();
            move |source| EngineError::Io { action, path, source }
        };
        // A directory left by a crash before the catalog entry was written is incomplete.
        self.storage.remove_image(name).map_err(io("remove incomplete salvage image"))?;
        let storage = self.storage.image(name).map_err(io("create image directory"))?;
        let record =
            ImageRecord { name: name.into(), group: g.name.clone(), seq: fork.0, mode: ImageMode::Salvage };
        let image = Image::open(record.clone(), g.clone(), Some(storage))?;
        let mut blocks = BTreeMap::new();
        let mut bytes = 0u64;
        for (meta, changed) in g.blocks_changed_after(fork) {
            let bs = u64::from(meta.block_size_bytes);
            blocks.insert(meta.name.clone(), changed.len() as u64);
            // Copy runs of adjacent blocks, up to a bounded buffer at a time.
            for run in runs(&changed, (SALVAGE_COPY_BYTES_MAX / bs).max(1)) {
                let mut buf = vec![0u8; ((run.end - run.start) * bs) as usize];
                let offset = run.start * bs;
                g.read(meta.id, offset, &mut buf, None)?;
                image.write(meta.id, offset, &buf)?;
                bytes += buf.len() as u64;
            }
        }
        image.flush()?;
        let info = SalvageInfo {
            fork_seq: fork.0,
            fork_generation,
            first_seq: fork.0 + 1,
            last_seq: last.0,
            first_time: g.time_of(Seq(fork.0 + 1)).rfc3339(),
            last_time: g.time_of(last).rfc3339(),
            blocks: blocks.clone(),
            bytes,
        };
        image.set_salvage_info(&info)?;
        self.catalog.put_image(&record)?;
        let image = Arc::new(image);
        self.images.write().insert(name.into(), image.clone());
        self.events.event(EngineEvent::SalvageKept {
            group: g.name.clone(),
            image: name.into(),
            fork_seq: fork.0,
            blocks: blocks.values().sum(),
        });
        Ok(image)
    }

    /// Start receiving a baseline for secondary group `group`. Refused while the group has
    /// images here: they read history the baseline replaces.
    pub fn begin_baseline(
        &self,
        group: &str,
        target: baseline::BaselineTarget,
    ) -> Result<baseline::StagedBaseline> {
        let g = self.group_arc(group)?;
        self.refuse_images_of(group, "receive a baseline")?;
        for meta in &target.volumes {
            if let Some(other) = self.volumes().into_iter().find(|v| v.name == meta.name && v.group != group)
            {
                return Err(EngineError::Conflict(format!(
                    "the baseline of group {group:?} has volume {:?}, a name group {:?} uses at this site",
                    meta.name, other.group
                )));
            }
        }
        g.stage_baseline(target)
    }

    /// Switch secondary group `group` to a complete staged baseline (see
    /// [`Group::install_baseline`]).
    pub fn finish_baseline(&self, group: &str, staged: baseline::StagedBaseline) -> Result<Seq> {
        let _admin = self.admin.lock();
        let g = self.group_arc(group)?;
        self.refuse_images_of(group, "switch to its baseline")?;
        let bytes = staged.bytes();
        let seq = g.install_baseline(staged)?;
        self.events.event(EngineEvent::BaselineInstalled { group: group.into(), seq: seq.0, bytes });
        Ok(seq)
    }

    fn refuse_images_of(&self, group: &str, action: &str) -> Result<()> {
        let images: Vec<String> = self
            .images
            .read()
            .values()
            .filter(|i| i.group.name == group)
            .map(|i| i.record.name.clone())
            .collect();
        if images.is_empty() {
            return Ok(());
        }
        Err(EngineError::Conflict(format!(
            "group {group:?} has image(s) {} at this site, which read history a baseline replaces; \
             copy out what you need and delete them, and the group can {action}",
            images.join(", ")
        )))
    }

    /// Create an image of `group` at `at`.
    pub fn create_image(&self, group: &str, at: &Point, name: &str, mode: ImageMode) -> Result<ImageInfo> {
        validate_name("image", name)?;
        let _admin = self.admin.lock();
        if self.images.read().contains_key(name) {
            return Err(EngineError::AlreadyExists { kind: "image", name: name.into() });
        }
        let g = self.group_arc(group)?;
        let seq = g.resolve(at)?;
        let record = ImageRecord { name: name.into(), group: group.into(), seq: seq.0, mode };
        if mode == ImageMode::Salvage {
            return Err(EngineError::InvalidArgument(
                "salvage images are made by failback, not by hand".into(),
            ));
        }
        let storage = match mode {
            ImageMode::Writable | ImageMode::Salvage => Some(self.storage.image(name).map_err(|source| {
                EngineError::Io { action: "create image directory", path: name.into(), source }
            })?),
            ImageMode::ReadOnly => None,
        };
        let image = Arc::new(Image::open(record.clone(), g, storage)?);
        self.catalog.put_image(&record)?;
        self.images.write().insert(name.into(), image.clone());
        Ok(self.image_info(&image))
    }

    fn image_info(&self, image: &Image) -> ImageInfo {
        ImageInfo {
            name: image.record.name.clone(),
            group: image.record.group.clone(),
            point: image.group.point_info(image.seq()),
            mode: image.record.mode,
            salvage: image.salvage_info(),
            exports: image
                .group
                .volumes()
                .iter()
                .map(|v| format!("{}/{}", image.record.name, v.name))
                .collect(),
        }
    }

    /// Every image.
    pub fn images(&self) -> Vec<ImageInfo> {
        self.images.read().values().map(|i| self.image_info(i)).collect()
    }

    /// Delete an image and its overlay; the history it pinned may be trimmed again.
    pub fn delete_image(&self, name: &str) -> Result<()> {
        let _admin = self.admin.lock();
        if self.images.write().remove(name).is_none() {
            return Err(EngineError::NotFound { kind: "image", name: name.into() });
        }
        self.catalog.remove_image(name)?;
        self.storage.remove_image(name).map_err(|source| EngineError::Io {
            action: "remove image directory",
            path: name.into(),
            source,
        })
    }

    /// Every export: each volume, and each volume of each image.
    pub fn exports(&self) -> Vec<ExportDesc> {
        let mut out: Vec<ExportDesc> = self
            .volumes()
            .into_iter()
            .map(|v| ExportDesc {
                description: format!("volume {} of group {}", v.name, v.group),
                name: v.name,
                size_bytes: v.size_bytes,
                block_size_bytes: v.block_size_bytes,
                read_only: self.group_arc(&v.group).map_or(true, |g| g.role() != persist::Role::Primary),
            })
            .collect();
        for image in self.images.read().values() {
            for v in image.group.volumes() {
                out.push(ExportDesc {
                    name: format!("{}/{}", image.record.name, v.name),
                    description: format!(
                        "image {} of group {} at seq {}",
                        image.record.name, image.record.group, image.record.seq
                    ),
                    size_bytes: v.size_bytes,
                    block_size_bytes: v.block_size_bytes,
                    read_only: !image.record.mode.is_writable(),
                });
            }
        }
        out
    }

    /// Open an export by name.
    pub fn open_export(&self, name: &str) -> Option<Arc<ExportHandle>> {
        if let Some((image_name, volume)) = name.split_once('/') {
            let image = self.images.read().get(image_name)?.clone();
            let (id, block_size_bytes) = image.group.with_state(|st| {
                let id = st.volume_id(volume)?;
                Some((id, st.volume_meta(id)?.block_size_bytes))
            })?;
            return Some(Arc::new(ExportHandle {
                name: name.into(),
                group: image.group.clone(),
                volume: id,
                block_size_bytes,
                image: Some(image),
            }));
        }
        let (group, volume) = self.find_volume(name).ok()?;
        let block_size_bytes = group.with_state(|st| st.volume_meta(volume))?.block_size_bytes;
        Some(Arc::new(ExportHandle { name: name.into(), group, volume, block_size_bytes, image: None }))
    }
}

/// An open export: a volume, or a volume of an image.
pub struct ExportHandle {
    name: String,
    group: Arc<Group>,
    volume: VolumeId,
    /// The volume's block size, learned at open so writes can hash before the group lock.
    block_size_bytes: u32,
    image: Option<Arc<Image>>,
}

impl ExportHandle {
    /// Its current description.
    pub fn desc(&self) -> ExportDesc {
        let meta = self.group.with_state(|st| st.volume_meta(self.volume));
        ExportDesc {
            name: self.name.clone(),
            description: self.name.clone(),
            size_bytes: meta.as_ref().map_or(0, |m| m.size_bytes),
            block_size_bytes: meta.as_ref().map_or(4096, |m| m.block_size_bytes),
            read_only: self
                .image
                .as_ref()
                .map_or(self.group.role() != persist::Role::Primary, |i| !i.record.mode.is_writable()),
        }
    }

    fn check_range(&self, offset: u64, length: u64) -> Result<()> {
        let size = self.desc().size_bytes;
        match offset.checked_add(length) {
            Some(end) if end <= size => Ok(()),
            _ => Err(EngineError::InvalidArgument(format!(
                "range [{offset}, +{length}) is outside {} of {size} bytes",
                self.name
            ))),
        }
    }

    fn writable_image(&self) -> Result<Option<&Arc<Image>>> {
        match &self.image {
            Some(i) if !i.record.mode.is_writable() => Err(EngineError::ReadOnly(self.name.clone())),
            other => Ok(other.as_ref()),
        }
    }

    /// Read at `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        match &self.image {
            Some(image) => {
                self.check_range(offset, buf.len() as u64)?;
                image.read(self.volume, offset, buf)
            }
            None => self.group.read(self.volume, offset, buf, None),
        }
    }

    /// [`ExportHandle::read`], only when it cannot wait ([`Group::try_read`]); `None`, having
    /// read nothing useful, otherwise (and always for an image).
    pub fn try_read(&self, offset: u64, buf: &mut [u8]) -> Option<Result<()>> {
        if self.image.is_some() {
            return None;
        }
        self.group.try_read(self.volume, offset, buf)
    }

    /// Write at `offset`.
    pub fn write(&self, offset: u64, data: &[u8], durability: Durability) -> Result<()> {
        if let Some(image) = self.writable_image()? {
            self.check_range(offset, data.len() as u64)?;
            image.write(self.volume, offset, data)?;
            return if durability == Durability::Fua { image.flush() } else { Ok(()) };
        }
        let seq = self.group.write(self.volume, self.block_size_bytes, offset, data)?;
        if durability == Durability::Fua {
            self.group.sync_through(seq)?;
        }
        Ok(())
    }

    /// [`ExportHandle::write`] without FUA, only when it cannot wait ([`Group::try_write`]);
    /// `None`, having done nothing, otherwise (and always for an image).
    pub fn try_write(&self, offset: u64, data: &[u8]) -> Option<Result<()>> {
        if self.image.is_some() {
            return None;
        }
        self.group.try_write(self.volume, self.block_size_bytes, offset, data).map(|r| r.map(|_| ()))
    }

    /// Zero `[offset, offset+length)`.
    pub fn write_zeroes(&self, offset: u64, length: u64, durability: Durability, punch: Punch) -> Result<()> {
        if let Some(image) = self.writable_image()? {
            self.check_range(offset, length)?;
            image.zero(self.volume, offset, length)?;
            return if durability == Durability::Fua { image.flush() } else { Ok(()) };
        }
        let mode = if punch == Punch::Allowed { ZeroMode::Punch } else { ZeroMode::Allocate };
        let seq = self.group.zero(self.volume, offset, length, mode)?;
        if durability == Durability::Fua {
            self.group.sync_through(seq)?;
        }
        Ok(())
    }

    /// Discard `[offset, offset+length)`: reads as zeroes afterwards.
    pub fn trim(&self, offset: u64, length: u64, durability: Durability) -> Result<()> {
        self.write_zeroes(offset, length, durability, Punch::Allowed)
    }

    /// Make every replied write durable.
    pub fn flush(&self) -> Result<()> {
        match &self.image {
            Some(image) => image.flush(),
            None => self.group.flush(),
        }
    }

    /// Allocation map of `[offset, offset+length)`.
    pub fn allocation(&self, offset: u64, length: u64) -> Result<Vec<Extent>> {
        let runs = match &self.image {
            Some(image) => {
                self.check_range(offset, length)?;
                image.allocation(self.volume, offset, length)?
            }
            None => self.group.allocation(self.volume, offset, length, None)?,
        };
        Ok(runs
            .into_iter()
            .map(|(length_bytes, allocated, zero)| Extent { length_bytes, allocated, zero })
            .collect())
    }
}

fn role_name(role: persist::Role) -> &'static str {
    match role {
        persist::Role::Primary => "primary",
        persist::Role::Secondary => "secondary",
    }
}

/// Most bytes a salvage copy reads and writes at once.
const SALVAGE_COPY_BYTES_MAX: u64 = 1 << 20;

/// Sorted block numbers as runs of adjacent blocks, each at most `len_max` long.
fn runs(blocks: &[u64], len_max: u64) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for &b in blocks {
        match out.last_mut() {
            Some(r) if r.end == b && r.end - r.start < len_max => r.end += 1,
            _ => out.push(b..b + 1),
        }
    }
    out
}

/// Names of groups, volumes, images and bookmarks: 1 to 64 of `[A-Za-z0-9._-]`, not starting
/// with `.` or `-`.
pub fn validate_name(kind: &'static str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(EngineError::InvalidArgument(format!(
            "{kind} name {name:?} is invalid: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        )))
    }
}

fn validate_size(size_bytes: u64, block_size_bytes: u32) -> Result<()> {
    if size_bytes == 0
        || size_bytes > VOLUME_SIZE_BYTES_MAX
        || !size_bytes.is_multiple_of(u64::from(block_size_bytes))
    {
        return Err(EngineError::InvalidArgument(format!(
            "volume size {size_bytes} must be a non-zero multiple of the block size ({block_size_bytes}) up to 64 TiB"
        )));
    }
    Ok(())
}
