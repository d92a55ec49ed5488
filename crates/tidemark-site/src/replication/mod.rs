//! Replication of protected groups to a partner site.
//!
//! The site has a self-generated identity (key and certificate, `DATA_DIR/identity/`), a list of
//! partners pinned by certificate fingerprint, and a list of protected groups, both kept in
//! `DATA_DIR/replication.json` (replaced atomically). For every protected group that is not
//! paused, a task dials the partner over the QUIC link and runs the primary's session; the
//! link's accept loop runs the secondary's session for groups partners protect to us. Sessions
//! that end for a passing reason (the partner went away) are retried with bounded backoff;
//! divergence and fencing stop the group's replication with an event and are never retried.

pub mod baseline;
pub mod overflow;
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
use crate::metrics::LinkError;
pub use overflow::{DirtyBlocks, OverflowPolicy};
use session::{
    run_primary, run_secondary, Channel, Limiter, PrimaryContext, ReplState, ReplStats, SessionConfig,
    SessionEnd, SessionError, SessionHost, SwapCall, SwapOutcome,
};

/// File of partners and protections in the data directory.
pub const STORE_FILE_NAME: &str = "replication.json";
/// Directory of the site's key and certificate in the data directory.
pub const IDENTITY_DIR_NAME: &str = "identity";
/// How long a takeover waits for the old primary's link to answer before deciding it is gone.
pub const REACHABLE_TIMEOUT: Duration = Duration::from_secs(1);
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
    /// What happens when the partner's backlog passes the journal's limit.
    #[serde(default)]
    pub overflow: OverflowPolicy,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Store {
    partners: BTreeMap<String, Partner>,
    protections: BTreeMap<String, Protection>,
    /// For each group that is a secondary here, the partner its primary is at: where a takeover
    /// sends the history from then on, and whom a takeover first checks is really gone.
    #[serde(default)]
    sources: BTreeMap<String, String>,
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
    /// The primary answers: a takeover would make two primaries.
    #[error("the primary of group {group:?} at partner {partner:?} ({address}) is reachable; use `tidemark group swap {group}` for a planned change, or `--force` if it must be replaced anyway")]
    PrimaryReachable {
        /// Group name.
        group: String,
        /// Partner name.
        partner: String,
        /// Its address.
        address: String,
    },
    /// A swap needs both sites connected.
    #[error("group {0:?} has no replication session with its partner right now; a swap needs both sites connected and streaming")]
    NotConnected(String),
    /// The swap did not happen.
    #[error("swap of group {group:?} failed: {reason}")]
    SwapFailed {
        /// Group name.
        group: String,
        /// Why.
        reason: String,
    },
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
    /// The baseline under way (state `baseline`) or the last one, if there was one.
    pub baseline: Option<BaselineStatus>,
    /// The overflow policy and what it is doing (at the primary).
    pub overflow: Option<OverflowStatus>,
    /// The last error, if the group is not streaming.
    pub last_error: Option<String>,
}

/// What the overflow policy is doing.
#[derive(Clone, Debug, Serialize)]
pub struct OverflowStatus {
    /// `resync` or `throttle`.
    pub policy: OverflowPolicy,
    /// `resync`: the journal is trimming past the partner; these blocks await a resync.
    pub tracking: bool,
    /// Bytes of blocks changed since the partner's last acknowledgement that the journal no
    /// longer holds.
    pub dirty_bytes: u64,
    /// `throttle`: how long each host write waits now, in milliseconds.
    pub write_delay_ms: f64,
}

/// A baseline's progress.
#[derive(Clone, Debug, Serialize)]
pub struct BaselineStatus {
    /// The seq whose image is sent.
    pub seq: u64,
    /// Allocated bytes to read (zero blocks among them are not sent).
    pub bytes_total: u64,
    /// Bytes read and sent so far (received, at the secondary).
    pub bytes_done: u64,
    /// Baselines completed so far.
    pub completed_total: u64,
}

/// A finished takeover.
#[derive(Clone, Debug, Serialize)]
pub struct TakeoverOutcome {
    /// The new generation.
    pub generation: u64,
    /// Last seq of the history shared with the old primary.
    pub fork_seq: u64,
    /// Its time (RFC 3339).
    pub fork_time: String,
    /// The old primary's site, now protected to (it fails back when it returns).
    pub partner: Option<String>,
    /// Seconds from the command to a writable primary.
    pub seconds: f64,
}

/// A group's roles as `group show` reports them.
#[derive(Clone, Debug, Serialize)]
pub struct RolesView {
    /// Newest generation known here.
    pub generation: u64,
    /// The partner the group is received from (secondaries).
    pub source_partner: Option<String>,
    /// Where this site's takeover forked the history.
    pub fork_point: Option<ForkPointView>,
    /// A swap started here and not settled (host writes are refused).
    pub swap_pending: bool,
    /// Role changes here, oldest first.
    pub role_changes: Vec<RoleChangeView>,
}

/// A fork point.
#[derive(Clone, Debug, Serialize)]
pub struct ForkPointView {
    /// Generation the takeover started.
    pub generation: u64,
    /// Last shared seq.
    pub seq: u64,
    /// Its time (RFC 3339).
    pub time: String,
}

/// One role change.
#[derive(Clone, Debug, Serialize)]
pub struct RoleChangeView {
    /// When (RFC 3339).
    pub time: String,
    /// Role before.
    pub from: &'static str,
    /// Role after.
    pub to: &'static str,
    /// Generation after.
    pub generation: u64,
    /// Why.
    pub reason: String,
}

fn role_name(role: tidemark_engine::persist::Role) -> &'static str {
    match role {
        tidemark_engine::persist::Role::Primary => "primary",
        tidemark_engine::persist::Role::Secondary => "secondary",
    }
}

impl SessionHost for Replication {
    fn stats_for(&self, group: &str) -> Arc<ReplStats> {
        Replication::stats_for(self, group)
    }

    fn swap_calls(&self, group: &str) -> mpsc::Receiver<SwapCall> {
        let (tx, rx) = mpsc::channel(1);
        self.swap_calls.lock().insert(group.into(), tx);
        rx
    }

    fn session_lock(&self, group: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.session_locks.lock().entry(group.into()).or_default().clone()
    }

    fn session_epoch(&self, group: &str) -> Arc<watch::Sender<u64>> {
        self.session_epochs
            .lock()
            .entry(group.into())
            .or_insert_with(|| Arc::new(watch::channel(0).0))
            .clone()
    }

    fn receiving(&self, group: &str, peer: &str) {
        let mut store = self.store.lock();
        if store.sources.get(group).map(String::as_str) == Some(peer) {
            return;
        }
        let mut next = store.clone();
        next.sources.insert(group.into(), peer.into());
        match save_store(&self.store_path, &next) {
            Ok(()) => *store = next,
            Err(e) => tracing::error!(%group, error = %e, "could not record where the group comes from"),
        }
    }

    fn promoted(&self, group: &str, peer: &str, generation: u64) {
        self.event(
            "role.promoted",
            group,
            format!("group {group}: primary here under generation {generation} (swap with partner {peer})"),
        );
        self.became_primary(group, peer);
    }

    fn demoted(&self, group: &str, peer: &str, generation: u64) {
        self.event(
            "role.fenced",
            group,
            format!("group {group}: partner {peer} is primary under generation {generation}; this site demoted itself to secondary"),
        );
        self.became_secondary(group, peer);
    }
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
    /// Where operators' swap calls go: the running session of each group.
    swap_calls: Mutex<HashMap<String, mpsc::Sender<SwapCall>>>,
    /// One incoming session per group at a time.
    session_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Incoming sessions per group so far (a newer one supersedes an older one).
    session_epochs: Mutex<HashMap<String, Arc<watch::Sender<u64>>>>,
    /// The data directory (dirty blocks live in `overflow/` under it).
    data_dir: PathBuf,
    /// Dirty blocks of groups whose partner overflowed the journal (`resync`), as on disk.
    dirty: Mutex<HashMap<String, DirtyBlocks>>,
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
            swap_calls: Mutex::new(HashMap::new()),
            session_locks: Mutex::new(HashMap::new()),
            session_epochs: Mutex::new(HashMap::new()),
            data_dir: data_dir.to_path_buf(),
            dirty: Mutex::new(HashMap::new()),
        });
        repl.settle_store();
        tokio::spawn(accept_loop(repl.clone()));
        let protections: Vec<Protection> = repl.store.lock().protections.values().cloned().collect();
        for p in &protections {
            match overflow::load(data_dir, &p.group) {
                Ok(Some(dirty)) => {
                    repl.dirty.lock().insert(p.group.clone(), dirty);
                }
                Ok(None) => {}
                // Without them a resync could miss blocks: the partner gets a full baseline.
                Err(reason) => {
                    tracing::error!(group = %p.group, %reason, "dirty blocks unreadable; a full baseline will follow")
                }
            }
        }
        for p in protections.iter().filter(|p| !p.paused) {
            repl.start_task(&p.group);
        }
        tokio::spawn(overflow_loop(Arc::downgrade(&repl)));
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
    pub fn protect(
        &self,
        group: &str,
        partner: &str,
        overflow: OverflowPolicy,
    ) -> Result<Protection, ReplicationError> {
        let handle = self.engine.group_handle(group)?;
        if handle.role() != tidemark_engine::persist::Role::Primary {
            return Err(ReplicationError::Invalid(format!(
                "group {group:?} is a secondary here; protect it on its primary"
            )));
        }
        let protection = Protection { group: group.into(), partner: partner.into(), paused: false, overflow };
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
        self.forget_dirty(group);
        if let Ok(handle) = self.engine.group_handle(group) {
            handle.set_write_delay(Duration::ZERO);
        }
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
        let policy = self.store.lock().protections.get(group).map(|p| p.overflow);
        let dirty_bytes = self.dirty.lock().get(group).map(DirtyBlocks::bytes);
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
            baseline: match stats.baseline_seq.load(Ordering::Acquire) {
                0 => None,
                seq => Some(BaselineStatus {
                    seq,
                    bytes_total: stats.baseline_bytes_total.load(Ordering::Relaxed),
                    bytes_done: stats.baseline_bytes_done.load(Ordering::Relaxed),
                    completed_total: stats.baselines_total.load(Ordering::Relaxed),
                }),
            },
            overflow: policy.map(|policy| OverflowStatus {
                policy,
                tracking: dirty_bytes.is_some(),
                dirty_bytes: dirty_bytes.unwrap_or(0),
                write_delay_ms: handle.write_delay().as_secs_f64() * 1e3,
            }),
            last_error,
        })
    }

    fn forget_dirty(&self, group: &str) {
        if self.dirty.lock().remove(group).is_some() {
            if let Err(e) = overflow::remove(&self.data_dir, group) {
                tracing::warn!(%group, error = %e, "could not remove the dirty-block file");
            }
        }
    }

    /// Apply `group`'s overflow policy once (see [`overflow`]). Blocking.
    fn overflow_round(&self, group: &str) -> Result<(), String> {
        let Some(protection) = self.store.lock().protections.get(group).cloned() else { return Ok(()) };
        let handle = self.engine.group_handle(group).map_err(|e| e.to_string())?;
        if handle.role() != tidemark_engine::persist::Role::Primary {
            return Ok(());
        }
        let stats = self.stats_for(group);
        let acked = Seq(stats.acked_seq.load(Ordering::Acquire));
        let position = handle.position();
        if self.dirty.lock().get(group).is_some_and(|d| acked.0 >= d.through) {
            // The partner caught up past everything tracked (a resync, or the journal).
            self.forget_dirty(group);
        }
        let behind = acked < position.last_seq;
        let (bytes, max) = (handle.journal_bytes(), handle.options.journal_max_bytes);
        match protection.overflow {
            OverflowPolicy::Throttle => {
                let delay = if behind { overflow::throttle_delay(bytes, max) } else { Duration::ZERO };
                let before = handle.write_delay();
                handle.set_write_delay(delay);
                if before.is_zero() && !delay.is_zero() {
                    self.event(
                        "replication.overflow",
                        group,
                        format!(
                            "group {group}: the journal holds {bytes} bytes for partner {}, past its {max}-byte limit; policy throttle: host writes are slowed until the partner catches up",
                            protection.partner
                        ),
                    );
                }
                Ok(())
            }
            OverflowPolicy::Resync => {
                handle.set_write_delay(Duration::ZERO);
                if bytes <= max || !behind {
                    stats.overflowing.store(false, Ordering::Release);
                    return Ok(());
                }
                match *stats.state.lock() {
                    // Connected but too slow for the writes: the session drains its batches and
                    // ends, and `protect_loop` starts tracking exactly where the partner is;
                    // unless the blocks tracked already cover every record (nothing to add).
                    ReplState::Streaming => {
                        let covered =
                            self.dirty.lock().get(group).is_some_and(|d| d.through >= position.last_seq.0);
                        stats.overflowing.store(!covered, Ordering::Release);
                        return Ok(());
                    }
                    // A baseline's point stays readable until the partner has it, and the
                    // journal after it is kept: the policy applies once it is done.
                    ReplState::Baseline => return Ok(()),
                    _ => {}
                }
                self.track_dirty(group, &protection.partner, acked, "has been out of reach")
            }
        }
    }

    /// The `resync` policy for `group`, whose `partner` holds everything through `acked`:
    /// record the blocks changed since (adding to those already tracked) and let the journal
    /// trim past them. `why` says how the partner fell behind, for the event. Blocking.
    fn track_dirty(&self, group: &str, partner: &str, acked: Seq, why: &str) -> Result<(), String> {
        // Whatever follows, a session's request to hand over is answered.
        self.stats_for(group).overflowing.store(false, Ordering::Release);
        let handle = self.engine.group_handle(group).map_err(|e| e.to_string())?;
        let position = handle.position();
        let existing = self.dirty.lock().get(group).cloned();
        if existing.as_ref().is_some_and(|d| d.through >= position.last_seq.0) {
            // Nothing written since the last round: no index walk under the group lock.
            return Ok(());
        }
        let first = existing.is_none();
        let chain = handle.chain_at(acked).map_err(|e| e.to_string())?;
        let mut dirty = match (existing, chain) {
            // The partner moved on since tracking began and the journal still says where to:
            // a resync from there sends a subset of the blocks tracked since the old point.
            (Some(d), Some(chain)) if acked.0 > d.from_seq => {
                DirtyBlocks { from_seq: acked.0, from_chain: chain.0, ..d }
            }
            (Some(d), _) => d,
            (None, Some(chain)) => DirtyBlocks::new(acked.0, chain.0),
            (None, None) => {
                // The journal was trimmed past the partner before it was protected (or it never
                // acknowledged anything): it needs a full baseline whatever happens, so there is
                // nothing to keep for it.
                let last = position.last_seq;
                self.engine.pin(group, PIN_HOLDER, Some(last));
                tracing::info!(%group, seq = last.0, "partner needs a full baseline; journal released");
                return Ok(());
            }
        };
        // Everything after `through` is read off the index before the pin moves past it.
        let through = handle.position().last_seq;
        for (meta, blocks) in handle.blocks_changed_after(Seq(dirty.through)) {
            dirty.add(meta.id.0, meta.block_size_bytes, &blocks);
        }
        dirty.through = through.0;
        overflow::save(&self.data_dir, group, &dirty).map_err(|e| format!("save dirty blocks: {e}"))?;
        let dirty_bytes = dirty.bytes();
        self.dirty.lock().insert(group.to_string(), dirty);
        self.engine.pin(group, PIN_HOLDER, Some(through));
        if first {
            let (bytes, max) = (handle.journal_bytes(), handle.options.journal_max_bytes);
            self.event(
                "replication.overflow",
                group,
                format!(
                    "group {group}: partner {partner} {why} while the journal grew to {bytes} bytes, past its {max}-byte limit; policy resync: the journal trims again, the {dirty_bytes} bytes of blocks changed since seq {} are tracked and sent as a resync",
                    acked.0
                ),
            );
        }
        Ok(())
    }

    /// `group`'s dirty blocks, if its partner overflowed the journal.
    fn dirty_for(&self, group: &str) -> Option<DirtyBlocks> {
        self.dirty.lock().get(group).cloned()
    }

    /// The counters of `group`'s replication, if it is protected here or received from a partner.
    pub fn stats(&self, group: &str) -> Option<Arc<ReplStats>> {
        self.stats.lock().get(group).cloned()
    }

    /// Swap roles of `group` with its partner (planned, no data loss): run at either site while
    /// both are connected. Returns when the partner is primary (or this site is, when run at the
    /// secondary), with the generation and the last shared seq.
    pub async fn swap(&self, group: &str) -> Result<SwapOutcome, ReplicationError> {
        self.engine.group_handle(group)?;
        let calls = self.swap_calls.lock().get(group).cloned();
        let calls = calls.ok_or_else(|| ReplicationError::NotConnected(group.into()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        calls.send(tx).await.map_err(|_| ReplicationError::NotConnected(group.into()))?;
        let deadline = session::SWAP_DRAIN_TIMEOUT + session::SWAP_ANSWER_TIMEOUT + Duration::from_secs(5);
        let result = tokio::time::timeout(deadline, rx).await;
        let failed = |reason: String| ReplicationError::SwapFailed { group: group.into(), reason };
        let outcome = match result {
            Ok(Ok(Ok(outcome))) => outcome,
            Ok(Ok(Err(reason))) => return Err(failed(reason)),
            Ok(Err(_)) => return Err(failed("the replication session ended during the swap".into())),
            Err(_) => return Err(failed(format!("no answer within {deadline:?}"))),
        };
        self.event(
            "role.swapped",
            group,
            format!(
                "group {group}: swapped roles with the partner; generation {} from seq {}",
                outcome.generation, outcome.last_seq
            ),
        );
        Ok(outcome)
    }

    /// Take over `group` here, its primary being lost: become primary under a new generation
    /// (at `at`, when given, by rolling back to it), and protect the group to the old primary's
    /// site, so that when it returns it fails back as a secondary. Refused while the old primary
    /// answers, unless `force`.
    pub async fn takeover(
        &self,
        group: &str,
        at: Option<tidemark_engine::Point>,
        force: bool,
    ) -> Result<TakeoverOutcome, ReplicationError> {
        let started = Instant::now();
        let handle = self.engine.group_handle(group)?;
        if handle.role() != tidemark_engine::persist::Role::Secondary {
            return Err(ReplicationError::Invalid(format!("group {group:?} is already primary here")));
        }
        let source = self.store.lock().sources.get(group).cloned();
        let partner = source.as_ref().and_then(|name| self.store.lock().partners.get(name).cloned());
        if !force {
            let Some(partner) = &partner else {
                return Err(ReplicationError::Invalid(format!(
                    "this site does not know where the primary of group {group:?} is, so it cannot check that it is gone; use --force"
                )));
            };
            if self.reachable(partner).await {
                return Err(ReplicationError::PrimaryReachable {
                    group: group.into(),
                    partner: partner.name.clone(),
                    address: partner.address.clone(),
                });
            }
        }
        let (engine, name) = (self.engine.clone(), group.to_string());
        let reason = if force { "takeover (forced)" } else { "takeover: the primary is unreachable" };
        let fork = tokio::task::spawn_blocking(move || engine.takeover(&name, at.as_ref(), reason))
            .await
            .map_err(|e| ReplicationError::Invalid(format!("takeover task failed: {e}")))??;
        if let Some(partner) = &partner {
            let mut store = self.store.lock();
            let mut next = store.clone();
            next.sources.remove(group);
            next.protections.insert(
                group.into(),
                Protection {
                    group: group.into(),
                    partner: partner.name.clone(),
                    paused: false,
                    overflow: OverflowPolicy::default(),
                },
            );
            save_store(&self.store_path, &next)?;
            *store = next;
        }
        self.stats.lock().remove(group);
        if partner.is_some() {
            self.start_task(group);
        }
        let seconds = started.elapsed().as_secs_f64();
        self.event(
            "role.takeover",
            group,
            format!(
                "group {group}: took over as primary under generation {} at fork point seq {}",
                fork.generation, fork.seq.0
            ),
        );
        Ok(TakeoverOutcome {
            generation: fork.generation,
            fork_seq: fork.seq.0,
            fork_time: fork.time.rfc3339(),
            partner: partner.map(|p| p.name),
            seconds,
        })
    }

    /// Whether `partner`'s replication link answers within [`REACHABLE_TIMEOUT`].
    async fn reachable(&self, partner: &Partner) -> bool {
        let Ok(fingerprint) = parse_fingerprint(&partner.fingerprint) else { return false };
        let Some(addr) = tokio::net::lookup_host(&partner.address).await.ok().and_then(|mut a| a.next())
        else {
            return false;
        };
        match tokio::time::timeout(REACHABLE_TIMEOUT, self.link.connect(addr, fingerprint)).await {
            Ok(Ok(connection)) => {
                connection.close("reachability check");
                true
            }
            _ => false,
        }
    }

    /// Make the store agree with the groups' roles after a crash between a role change and the
    /// store update: a primary protects to its source partner, a secondary protects nothing.
    fn settle_store(&self) {
        let mut store = self.store.lock();
        let mut next = store.clone();
        for info in self.engine.groups() {
            let primary = info.role == "primary";
            if primary {
                if let Some(partner) = next.sources.remove(&info.name) {
                    next.protections.entry(info.name.clone()).or_insert(Protection {
                        group: info.name.clone(),
                        partner,
                        paused: false,
                        overflow: OverflowPolicy::default(),
                    });
                }
            } else if let Some(p) = next.protections.remove(&info.name) {
                next.sources.insert(info.name.clone(), p.partner);
            }
        }
        if next.protections != store.protections || next.sources != store.sources {
            match save_store(&self.store_path, &next) {
                Ok(()) => *store = next,
                Err(e) => tracing::error!(error = %e, "could not settle the replication store"),
            }
        }
    }

    /// `group` is a secondary now, receiving from `partner`: stop protecting it.
    fn became_secondary(&self, group: &str, partner: &str) {
        {
            let mut store = self.store.lock();
            let mut next = store.clone();
            next.protections.remove(group);
            next.sources.insert(group.into(), partner.into());
            match save_store(&self.store_path, &next) {
                Ok(()) => *store = next,
                Err(e) => tracing::error!(%group, error = %e, "could not record the role change"),
            }
        }
        self.stop_task(group);
        self.engine.pin(group, PIN_HOLDER, None);
    }

    /// `group` is primary now (a swap): protect it to `partner`, the old primary.
    fn became_primary(&self, group: &str, partner: &str) {
        {
            let mut store = self.store.lock();
            let mut next = store.clone();
            next.sources.remove(group);
            next.protections.insert(
                group.into(),
                Protection {
                    group: group.into(),
                    partner: partner.into(),
                    paused: false,
                    overflow: OverflowPolicy::default(),
                },
            );
            match save_store(&self.store_path, &next) {
                Ok(()) => *store = next,
                Err(e) => tracing::error!(%group, error = %e, "could not record the role change"),
            }
        }
        self.stats.lock().remove(group);
        self.start_task(group);
    }

    fn partner_by_fingerprint(&self, fingerprint: &Fingerprint) -> Option<String> {
        let text = fingerprint.to_string();
        self.store.lock().partners.values().find(|p| p.fingerprint == text).map(|p| p.name.clone())
    }

    /// Role changes of `group` as `group show` and `history` report them.
    pub fn roles(&self, group: &str) -> Option<RolesView> {
        let handle = self.engine.group_handle(group).ok()?;
        let state = handle.role_state();
        Some(RolesView {
            generation: state.generation,
            source_partner: self.store.lock().sources.get(group).cloned(),
            fork_point: state.fork_point.map(|f| ForkPointView {
                generation: f.generation,
                seq: f.seq.0,
                time: f.time.rfc3339(),
            }),
            swap_pending: state.swap_pending.is_some(),
            role_changes: state
                .role_changes
                .iter()
                .map(|c| RoleChangeView {
                    time: c.time.rfc3339(),
                    from: role_name(c.from),
                    to: role_name(c.to),
                    generation: c.generation,
                    reason: c.reason.clone(),
                })
                .collect(),
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
            Ok(SessionEnd::Stopped) | Ok(SessionEnd::Promoted { .. }) => return,
            Ok(SessionEnd::Overflowed { acked, drained }) => {
                tracing::info!(%group, acked = acked.0, drained, "journal past its limit with the partner behind: resync");
                let (r, g) = (repl.clone(), group.clone());
                let tracked = tokio::task::spawn_blocking(move || {
                    r.track_dirty(&g, &r.partner_of(&g).unwrap_or_default(), acked, "is connected but behind")
                })
                .await;
                if let Ok(Err(reason)) | Err(reason) = tracked.map_err(|e| e.to_string()) {
                    tracing::warn!(%group, %reason, "could not start tracking dirty blocks");
                    *stats.last_error.lock() = Some(reason);
                }
                delay = RETRY_DELAY_MIN;
                continue;
            }
            Ok(SessionEnd::Baselined { seq }) => {
                // Stream after it at once.
                tracing::info!(%group, seq, "baseline complete at the partner");
                delay = RETRY_DELAY_MIN;
                continue;
            }
            Ok(SessionEnd::SwappedOut { generation }) => {
                let partner = repl.partner_of(&group).unwrap_or_default();
                tracing::info!(%group, generation, %partner, "swapped out: this site is a secondary now");
                repl.became_secondary(&group, &partner);
                return;
            }
            Err(SessionError::Fenced(message)) => {
                // A partner knows a newer generation: stop admitting writes at once.
                let partner = repl.partner_of(&group).unwrap_or_default();
                let generation = stats.fenced_by.load(Ordering::Acquire);
                let handle = repl.engine.group_handle(&group);
                let reason = format!("fenced: partner {partner} is primary under generation {generation}");
                let demoted = match handle {
                    Ok(h) => tokio::task::spawn_blocking(move || h.demote(generation, &reason)).await.ok(),
                    Err(_) => None,
                };
                *stats.last_error.lock() = Some(message.clone());
                match demoted {
                    Some(Ok(())) => SessionHost::demoted(&*repl, &group, &partner, generation),
                    _ => {
                        tracing::error!(%group, "fenced but could not demote");
                        repl.event(
                            "replication.fenced",
                            &group,
                            format!("group {group}: {message}; demotion failed"),
                        );
                    }
                }
                return;
            }
            Err(e) => {
                stats.link_errors.add(LinkError::of(&e));
                let terminal = matches!(e, SessionError::Diverged(_) | SessionError::Fenced(_));
                let message = e.to_string();
                let changed =
                    stats.last_error.lock().replace(message.clone()).as_deref() != Some(message.as_str());
                if changed || terminal {
                    tracing::warn!(%group, error = %message, "replication session ended");
                    let action = match e {
                        SessionError::Diverged(_) => "replication.diverged",
                        SessionError::Fenced(_) => "replication.fenced",
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
) -> Result<SessionEnd, SessionError> {
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
        swaps: SessionHost::swap_calls(&**repl, group),
        resync: repl.dirty_for(group),
    };
    let result = run_primary(handle, pump(writer, reader), context, stop).await;
    if result.is_ok() {
        connection.close("stopped");
    }
    result
}

/// Apply every protected group's overflow policy, twice a second, while the site runs.
async fn overflow_loop(repl: std::sync::Weak<Replication>) {
    let mut tick = tokio::time::interval(OVERFLOW_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(r) = repl.upgrade() else { return };
        let groups: Vec<String> = r.store.lock().protections.keys().cloned().collect();
        for group in groups {
            let r = r.clone();
            let outcome = tokio::task::spawn_blocking(move || {
                let result = r.overflow_round(&group);
                (group, result)
            })
            .await;
            if let Ok((group, Err(reason))) = outcome {
                tracing::warn!(%group, %reason, "overflow policy round failed");
            }
        }
    }
}

/// How often overflow policies are applied.
const OVERFLOW_INTERVAL: Duration = Duration::from_millis(500);

/// Serve partners that protect groups to this site: every stream runs a secondary session.
async fn accept_loop(repl: Arc<Replication>) {
    while let Some(connection) = repl.link.accept().await {
        let repl = repl.clone();
        tokio::spawn(async move {
            let fingerprint = connection.peer();
            while let Ok((writer, reader)) = connection.accept_stream().await {
                let repl = repl.clone();
                tokio::spawn(async move {
                    let Some(peer) = repl.partner_by_fingerprint(&fingerprint) else {
                        tracing::warn!("a stream from a peer that is no longer a partner was dropped");
                        return;
                    };
                    let host: Arc<dyn SessionHost> = repl.clone();
                    let result = run_secondary(
                        repl.engine.clone(),
                        repl.site_name.clone(),
                        peer,
                        pump(writer, reader),
                        host,
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
                        Ok(_) => {}
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
