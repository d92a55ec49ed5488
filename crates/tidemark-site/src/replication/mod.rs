//! Replication of protected groups to a partner site.
//!
//! The site has a self-generated identity (key and certificate, `DATA_DIR/identity/`), a list of
//! partners pinned by certificate fingerprint, and a list of protected groups, both kept in
//! `DATA_DIR/replication.json` (replaced atomically). For every protected group that is not
//! paused, a task dials the partner over the QUIC link and runs the primary's session; the
//! link's accept loop runs the secondary's session for groups partners protect to us. Sessions
//! that end for a passing reason (the partner went away) are retried with bounded backoff;
//! divergence and fencing stop the group's replication with an event and are never retried.

pub mod session;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tidemark_engine::{Engine, EngineError};
use tidemark_journal::Seq;
use tidemark_link::{Fingerprint, FrameReader, FrameWriter, Identity, Link, LinkProfile, PinnedPeers};
use tokio::sync::{mpsc, watch};

use crate::events::{Event, EventLog, EventSource};
use session::{
    run_primary, run_secondary, Channel, Limiter, PrimaryContext, ReplState, ReplStats, SessionConfig,
    SessionError,
};

/// File of partners and protections in the data directory.
pub const STORE_FILE_NAME: &str = "replication.json";
/// Directory of the site's key and certificate in the data directory.
pub const IDENTITY_DIR_NAME: &str = "identity";
/// The name replication holds history under (see [`Engine::pin`]).
const PIN_HOLDER: &str = "replication";
/// Frames buffered between a stream and its session, each way.
const CHANNEL_FRAMES_MAX: usize = 64;
/// First and largest wait between attempts to reach a partner.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(200);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(10);

/// How replication is set up at a site.
#[derive(Clone, Debug)]
pub struct ReplicationConfig {
    /// UDP address of the QUIC link.
    pub listen: SocketAddr,
    /// The link to partners, for sizing windows and buffers.
    pub profile: LinkProfile,
    /// Batching and compression.
    pub session: SessionConfig,
}

/// A partner site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Partner {
    /// Name used in commands.
    pub name: String,
    /// `HOST:PORT` of its replication link.
    pub address: String,
    /// SHA-256 fingerprint of its certificate (`sha256:...`).
    pub fingerprint: String,
    /// Most megabits per second sent to it, over all its groups (`None`: no limit).
    #[serde(default)]
    pub bandwidth_limit_mbit: Option<u64>,
}

/// A group this site protects to a partner.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protection {
    /// Group name.
    pub group: String,
    /// Partner name.
    pub partner: String,
    /// Stopped by the operator.
    pub paused: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Store {
    partners: BTreeMap<String, Partner>,
    protections: BTreeMap<String, Protection>,
}

/// Why a replication request failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// No such partner.
    #[error("no partner named {0:?}; add it with `tidemark partner add`")]
    UnknownPartner(String),
    /// The name is taken.
    #[error("a partner named {0:?} already exists")]
    PartnerExists(String),
    /// The partner is still used.
    #[error("partner {partner:?} still protects group {group:?}; unprotect it first")]
    PartnerInUse {
        /// Partner name.
        partner: String,
        /// A group using it.
        group: String,
    },
    /// The group is not protected.
    #[error("group {0:?} is not protected")]
    NotProtected(String),
    /// The group is already protected.
    #[error("group {group:?} is already protected to partner {partner:?}")]
    AlreadyProtected {
        /// Group name.
        group: String,
        /// Its partner.
        partner: String,
    },
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// The engine refused.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The link could not start.
    #[error(transparent)]
    Link(#[from] tidemark_link::LinkError),
    /// The store file could not be written or read.
    #[error("{action} {path}: {reason}")]
    Store {
        /// What was being done.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
}

/// What `tidemark site show` prints.
#[derive(Clone, Debug, Serialize)]
pub struct SiteIdentity {
    /// Site name.
    pub name: String,
    /// Certificate fingerprint partners pin.
    pub fingerprint: String,
    /// Replication link address.
    pub replication_address: String,
}

/// A group's replication as `group show` reports it.
#[derive(Clone, Debug, Serialize)]
pub struct ReplicationStatus {
    /// `connecting`, `baseline`, `streaming`, `paused`, `diverged`, `fenced` or `receiving`.
    pub state: ReplState,
    /// Newest seq durable at the partner (at the secondary: newest applied and durable here).
    pub acked_seq: u64,
    /// Records not yet durable at the partner.
    pub lag_records: u64,
    /// Journal bytes not yet durable at the partner.
    pub lag_bytes: u64,
    /// Age of the oldest write not yet durable at the partner, in seconds (0 when none).
    pub rpo_seconds: f64,
    /// Uncompressed bytes sent.
    pub bytes_sent_total: u64,
    /// Bytes sent after compression.
    pub bytes_sent_compressed_total: u64,
    /// Batches sent.
    pub batches_sent_total: u64,
    /// Frames refused from the partner.
    pub frames_rejected_total: u64,
    /// The last error, if the group is not streaming.
    pub last_error: Option<String>,
}

struct Task {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<()>,
}

/// Replication at one site.
pub struct Replication {
    engine: Arc<Engine>,
    events: Arc<EventLog>,
    site_name: String,
    identity: Identity,
    trust: Arc<PinnedPeers>,
    link: Arc<Link>,
    config: ReplicationConfig,
    store_path: PathBuf,
    store: Mutex<Store>,
    stats: Mutex<HashMap<String, Arc<ReplStats>>>,
    tasks: Mutex<HashMap<String, Task>>,
    /// Bandwidth limits by partner name, shared by the partner's groups.
    limiters: Mutex<HashMap<String, Arc<Mutex<Limiter>>>>,
    /// Itself, so that tasks it starts can hold it.
    me: std::sync::Weak<Replication>,
}

impl Replication {
    /// Load or create the identity, load partners and protections, bind the link, and start
    /// the accept loop and a task per protected group.
    pub fn start(
        engine: Arc<Engine>,
        events: Arc<EventLog>,
        data_dir: &Path,
        site_name: &str,
        config: ReplicationConfig,
    ) -> Result<Arc<Replication>, ReplicationError> {
        let identity = Identity::load_or_create(&data_dir.join(IDENTITY_DIR_NAME), site_name)?;
        let store_path = data_dir.join(STORE_FILE_NAME);
        let store = load_store(&store_path)?;
        let mut pins = Vec::new();
        for p in store.partners.values() {
            pins.push(parse_fingerprint(&p.fingerprint)?);
        }
        let trust = Arc::new(PinnedPeers::new(pins));
        let link = Arc::new(Link::bind(config.listen, &identity, trust.clone(), config.profile)?);
        let repl = Arc::new_cyclic(|me| Replication {
            me: me.clone(),
            engine,
            events,
            site_name: site_name.to_string(),
            identity,
            trust,
            link,
            config,
            store_path,
            store: Mutex::new(store),
            stats: Mutex::new(HashMap::new()),
            tasks: Mutex::new(HashMap::new()),
            limiters: Mutex::new(HashMap::new()),
        });
        tokio::spawn(accept_loop(repl.clone()));
        let protections: Vec<Protection> = repl.store.lock().protections.values().cloned().collect();
        for p in protections.iter().filter(|p| !p.paused) {
            repl.start_task(&p.group);
        }
        Ok(repl)
    }

    /// The site's identity as partners see it.
    pub fn identity(&self) -> SiteIdentity {
        SiteIdentity {
            name: self.site_name.clone(),
            fingerprint: self.identity.fingerprint().to_string(),
            replication_address: self.link.local_addr().to_string(),
        }
    }

    /// Trust a partner.
    pub fn add_partner(
        &self,
        name: &str,
        address: &str,
        fingerprint: &str,
        bandwidth_limit_mbit: Option<u64>,
    ) -> Result<Partner, ReplicationError> {
        if bandwidth_limit_mbit == Some(0) {
            return Err(ReplicationError::Invalid("a bandwidth limit must be at least 1 Mbit/s".into()));
        }
        crate::names::validate_name("partner", name).map_err(|e| ReplicationError::Invalid(e.to_string()))?;
        if address.rsplit_once(':').is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
        {
            return Err(ReplicationError::Invalid(format!("address {address:?} is not HOST:PORT")));
        }
        let fp = parse_fingerprint(fingerprint)?;
        let partner = Partner {
            name: name.into(),
            address: address.into(),
            fingerprint: fp.to_string(),
            bandwidth_limit_mbit,
        };
        let mut store = self.store.lock();
        if store.partners.contains_key(name) {
            return Err(ReplicationError::PartnerExists(name.into()));
        }
        let mut next = store.clone();
        next.partners.insert(name.into(), partner.clone());
        save_store(&self.store_path, &next)?;
        *store = next;
        self.trust.add(fp);
        Ok(partner)
    }

    /// Every partner.
    pub fn partners(&self) -> Vec<Partner> {
        self.store.lock().partners.values().cloned().collect()
    }

    /// Stop trusting a partner (refused while a group is protected to it).
    pub fn remove_partner(&self, name: &str) -> Result<(), ReplicationError> {
        let mut store = self.store.lock();
        let partner =
            store.partners.get(name).cloned().ok_or_else(|| ReplicationError::UnknownPartner(name.into()))?;
        if let Some(p) = store.protections.values().find(|p| p.partner == name) {
            return Err(ReplicationError::PartnerInUse { partner: name.into(), group: p.group.clone() });
        }
        let mut next = store.clone();
        next.partners.remove(name);
        save_store(&self.store_path, &next)?;
        *store = next;
        self.limiters.lock().remove(name);
        self.trust.remove(&parse_fingerprint(&partner.fingerprint)?);
        Ok(())
    }

    /// Start protecting `group` to `partner`: the partner creates the secondary group and its
    /// volumes from the journal as it arrives.
    pub fn protect(&self, group: &str, partner: &str) -> Result<Protection, ReplicationError> {
        let handle = self.engine.group_handle(group)?;
        if handle.role() != tidemark_engine::persist::Role::Primary {
            return Err(ReplicationError::Invalid(format!(
                "group {group:?} is a secondary here; protect it on its primary"
            )));
        }
        let protection = Protection { group: group.into(), partner: partner.into(), paused: false };
        {
            let mut store = self.store.lock();
            if !store.partners.contains_key(partner) {
                return Err(ReplicationError::UnknownPartner(partner.into()));
            }
            if let Some(p) = store.protections.get(group) {
                return Err(ReplicationError::AlreadyProtected {
                    group: group.into(),
                    partner: p.partner.clone(),
                });
            }
            let mut next = store.clone();
            next.protections.insert(group.into(), protection.clone());
            save_store(&self.store_path, &next)?;
            *store = next;
        }
        self.start_task(group);
        Ok(protection)
    }

    /// Stop protecting `group` (the partner keeps its copy, as a secondary).
    pub fn unprotect(&self, group: &str) -> Result<(), ReplicationError> {
        self.update_protection(group, |store| {
            store.protections.remove(group);
        })?;
        self.stop_task(group);
        self.stats.lock().remove(group);
        self.engine.pin(group, PIN_HOLDER, None);
        Ok(())
    }

    /// Pause or resume replication of `group`.
    pub fn set_paused(&self, group: &str, paused: bool) -> Result<Protection, ReplicationError> {
        self.update_protection(group, |store| {
            if let Some(p) = store.protections.get_mut(group) {
                p.paused = paused;
            }
        })?;
        if paused {
            self.stop_task(group);
            *self.stats_for(group).state.lock() = ReplState::Paused;
        } else {
            self.start_task(group);
        }
        self.store
            .lock()
            .protections
            .get(group)
            .cloned()
            .ok_or_else(|| ReplicationError::NotProtected(group.into()))
    }

    /// The partner `group` is protected to, if any.
    pub fn partner_of(&self, group: &str) -> Option<String> {
        self.store.lock().protections.get(group).map(|p| p.partner.clone())
    }

    /// Replication status of `group`, if it is protected here or received from a partner.
    pub fn status(&self, group: &str) -> Option<ReplicationStatus> {
        let stats = self.stats.lock().get(group).cloned()?;
        let handle = self.engine.group_handle(group).ok()?;
        let position = handle.position();
        let acked = Seq(stats.acked_seq.load(Ordering::Acquire).min(position.last_seq.0));
        let receiving = *stats.state.lock() == ReplState::Receiving;
        let (lag_records, lag_bytes, rpo_seconds) = if receiving || acked >= position.last_seq {
            (0, 0, 0.0)
        } else {
            let lag_bytes = match *stats.acked_location.lock() {
                Some(loc) => handle.bytes_after(loc),
                None => handle.bytes_after(tidemark_journal::Location { segment: 0, offset: 0 }),
            };
            let oldest = handle.time_of(Seq(acked.0 + 1));
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_nanos()
                as u64;
            (position.last_seq.0 - acked.0, lag_bytes, now.saturating_sub(oldest.0) as f64 / 1e9)
        };
        let state = stats.state.lock().clone();
        let last_error = stats.last_error.lock().clone();
        Some(ReplicationStatus {
            state,
            acked_seq: acked.0,
            lag_records,
            lag_bytes,
            rpo_seconds,
            bytes_sent_total: stats.bytes_sent_total.load(Ordering::Relaxed),
            bytes_sent_compressed_total: stats.bytes_sent_compressed_total.load(Ordering::Relaxed),
            batches_sent_total: stats.batches_sent_total.load(Ordering::Relaxed),
            frames_rejected_total: stats.frames_rejected_total.load(Ordering::Relaxed),
            last_error,
        })
    }

    /// Stop every task and close the link.
    pub async fn shutdown(&self) {
        let tasks: Vec<Task> = self.tasks.lock().drain().map(|(_, t)| t).collect();
        for t in &tasks {
            let _ = t.stop.send(true);
        }
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t.handle).await;
        }
        self.link.close();
        self.link.wait_idle().await;
    }

    fn update_protection(
        &self,
        group: &str,
        change: impl FnOnce(&mut Store),
    ) -> Result<(), ReplicationError> {
        let mut store = self.store.lock();
        if !store.protections.contains_key(group) {
            return Err(ReplicationError::NotProtected(group.into()));
        }
        let mut next = store.clone();
        change(&mut next);
        save_store(&self.store_path, &next)?;
        *store = next;
        Ok(())
    }

    fn stats_for(&self, group: &str) -> Arc<ReplStats> {
        self.stats.lock().entry(group.to_string()).or_insert_with(|| Arc::new(ReplStats::new(Seq(0)))).clone()
    }

    fn event(&self, action: &str, group: &str, message: String) {
        let mut event = Event::now(EventSource::Site, action, message);
        event.group = Some(group.to_string());
        self.events.record(event);
    }

    fn start_task(&self, group: &str) {
        // Until the partner acknowledges something, all of the history may be needed.
        let acked = Seq(self.stats_for(group).acked_seq.load(Ordering::Acquire));
        self.engine.pin(group, PIN_HOLDER, Some(acked));
        let (stop, stop_rx) = watch::channel(false);
        let Some(repl) = self.me.upgrade() else { return };
        let name = group.to_string();
        let handle = tokio::spawn(protect_loop(repl, name.clone(), stop_rx));
        if let Some(old) = self.tasks.lock().insert(name, Task { stop, handle }) {
            let _ = old.stop.send(true);
        }
    }

    fn stop_task(&self, group: &str) {
        if let Some(task) = self.tasks.lock().remove(group) {
            let _ = task.stop.send(true);
        }
    }
}

/// Dial the partner and run the primary's session for `group`, again and again with bounded
/// backoff, until stopped, or until the group diverges or is fenced (never retried: an
/// operator must look).
async fn protect_loop(repl: Arc<Replication>, group: String, mut stop: watch::Receiver<bool>) {
    let stats = repl.stats_for(&group);
    let mut delay = RETRY_DELAY_MIN;
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        let outcome = protect_once(&repl, &group, &stats, stop.clone()).await;
        match outcome {
            Ok(()) => return,
            Err(e) => {
                let terminal = matches!(e, SessionError::Diverged(_) | SessionError::Fenced(_));
                let message = e.to_string();
                let changed =
                    stats.last_error.lock().replace(message.clone()).as_deref() != Some(message.as_str());
                if changed || terminal {
                    tracing::warn!(%group, error = %message, "replication session ended");
                    let action = match e {
                        SessionError::Diverged(_) => "replication.diverged",
                        SessionError::Fenced(_) => "replication.fenced",
                        SessionError::NeedsBaseline(_) => "replication.baseline_needed",
                        _ => "replication.interrupted",
                    };
                    repl.event(action, &group, format!("group {group}: {message}"));
                }
                if terminal {
                    return;
                }
                if !matches!(*stats.state.lock(), ReplState::Baseline) {
                    *stats.state.lock() = ReplState::Connecting;
                }
            }
        }
        if started.elapsed() > RETRY_DELAY_MAX {
            delay = RETRY_DELAY_MIN;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = stop.changed() => return,
        }
        delay = (delay * 2).min(RETRY_DELAY_MAX);
    }
}

async fn protect_once(
    repl: &Arc<Replication>,
    group: &str,
    stats: &Arc<ReplStats>,
    stop: watch::Receiver<bool>,
) -> Result<(), SessionError> {
    let partner = {
        let store = repl.store.lock();
        let name = store.protections.get(group).map(|p| p.partner.clone()).ok_or(SessionError::Closed)?;
        store.partners.get(&name).cloned().ok_or(SessionError::Closed)?
    };
    let fingerprint =
        parse_fingerprint(&partner.fingerprint).map_err(|e| SessionError::Protocol(e.to_string()))?;
    let addr =
        tokio::net::lookup_host(&partner.address).await.ok().and_then(|mut a| a.next()).ok_or_else(|| {
            SessionError::Protocol(format!("cannot resolve partner address {}", partner.address))
        })?;
    let connection = repl
        .link
        .connect(addr, fingerprint)
        .await
        .map_err(|e| SessionError::Protocol(format!("connect to partner {}: {e}", partner.name)))?;
    let (writer, reader) =
        connection.open_stream().await.map_err(|e| SessionError::Protocol(format!("open stream: {e}")))?;
    let handle = repl.engine.group_handle(group)?;
    let (engine, name) = (repl.engine.clone(), group.to_string());
    let hold = move |acked: Seq| engine.pin(&name, PIN_HOLDER, Some(acked));
    let limiter = partner.bandwidth_limit_mbit.map(|mbit| {
        repl.limiters
            .lock()
            .entry(partner.name.clone())
            .or_insert_with(|| Arc::new(Mutex::new(Limiter::new(mbit))))
            .clone()
    });
    let context = PrimaryContext {
        site: repl.site_name.clone(),
        stats: stats.clone(),
        config: repl.config.session,
        hold,
        limiter,
    };
    let result = run_primary(handle, pump(writer, reader), context, stop).await;
    if result.is_ok() {
        connection.close("stopped");
    }
    result
}

/// Serve partners that protect groups to this site: every stream runs a secondary session.
async fn accept_loop(repl: Arc<Replication>) {
    while let Some(connection) = repl.link.accept().await {
        let repl = repl.clone();
        tokio::spawn(async move {
            while let Ok((writer, reader)) = connection.accept_stream().await {
                let repl = repl.clone();
                tokio::spawn(async move {
                    let stats_repl = repl.clone();
                    let result = run_secondary(
                        repl.engine.clone(),
                        repl.site_name.clone(),
                        pump(writer, reader),
                        move |g| stats_repl.stats_for(g),
                    )
                    .await;
                    match result {
                        Err(
                            e @ (SessionError::Protocol(_)
                            | SessionError::Diverged(_)
                            | SessionError::Refused(_)),
                        ) => {
                            // Something the partner sent was refused: operators must hear of it.
                            tracing::warn!(error = %e, "incoming replication refused");
                            let event = Event::now(
                                EventSource::Site,
                                "replication.rejected",
                                format!("from a partner: {e}"),
                            );
                            repl.events.record(event);
                        }
                        Err(e) => tracing::info!(error = %e, "incoming replication session ended"),
                        Ok(()) => {}
                    }
                });
            }
        });
    }
}

/// Join a stream to a session's channel: one task per direction.
fn pump(mut writer: FrameWriter, mut reader: FrameReader) -> Channel {
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_FRAMES_MAX);
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_FRAMES_MAX);
    tokio::spawn(async move {
        while let Some(frame) = out_rx.recv().await {
            if writer.send(&frame).await.is_err() {
                return;
            }
        }
        let _ = writer.finish().await;
    });
    tokio::spawn(async move {
        while let Ok(Some(frame)) = reader.recv().await {
            if in_tx.send(frame).await.is_err() {
                return;
            }
        }
    });
    Channel { tx: out_tx, rx: in_rx }
}

fn parse_fingerprint(text: &str) -> Result<Fingerprint, ReplicationError> {
    text.parse::<Fingerprint>().map_err(|e| ReplicationError::Invalid(format!("fingerprint {text:?}: {e}")))
}

fn load_store(path: &Path) -> Result<Store, ReplicationError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ReplicationError::Store {
            action: "parse",
            path: path.to_path_buf(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Store::default()),
        Err(e) => {
            Err(ReplicationError::Store { action: "read", path: path.to_path_buf(), reason: e.to_string() })
        }
    }
}

/// Replace the store file atomically: temp file, fsync, rename, directory fsync.
fn save_store(path: &Path, store: &Store) -> Result<(), ReplicationError> {
    let err = |action: &'static str| {
        let path = path.to_path_buf();
        move |e: std::io::Error| ReplicationError::Store { action, path, reason: e.to_string() }
    };
    let bytes = serde_json::to_vec_pretty(store).map_err(|e| ReplicationError::Store {
        action: "encode",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp).map_err(err("create"))?;
        f.write_all(&bytes).map_err(err("write"))?;
        f.sync_all().map_err(err("sync"))?;
    }
    std::fs::rename(&tmp, path).map_err(err("rename"))?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(err("sync directory"))?;
    }
    Ok(())
}
