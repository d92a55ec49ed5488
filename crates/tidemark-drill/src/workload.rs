//! The workload: one thread writing the seed's writes, one at a time, to the group's primary
//! over NBD, at a steady rate, with a flush every few writes, and logging each write's fate.
//!
//! One request is in flight at a time, so the order writes were acknowledged in is the order
//! they were issued in, and a flush's reply makes every write acknowledged before it durable.
//! A write that the site refuses (EPERM while a swap freezes writes, say) or that gets no
//! answer (the site was killed) has an unknown fate: it is logged so and the workload moves on
//! to the next write after a short pause, reconnecting as needed, like a host that retries
//! elsewhere. Ids are only used by writes actually sent.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::check::Fate;
use crate::nbd::{Client, NbdError};
use crate::pattern::{WorkloadShape, WriteId};
use crate::scenario::SiteIndex;

/// Pause after a refused or unanswered write, or a failed connection, before trying again.
pub const RETRY_PAUSE: Duration = Duration::from_millis(100);
/// When the workload has fallen this far behind its schedule it stops trying to catch up.
const CATCH_UP_MAX: Duration = Duration::from_millis(500);
/// Longest single sleep of the writer thread, so it notices changes promptly.
const NAP: Duration = Duration::from_millis(20);

/// Where the workload writes: the primary's NBD listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Which site.
    pub site: SiteIndex,
    /// Its NBD address.
    pub nbd: SocketAddr,
}

/// What became of a write.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum Outcome {
    /// Sent, no answer yet.
    InFlight,
    /// The site acknowledged it.
    Acknowledged {
        /// When, in seconds since the drill started.
        seconds: f64,
    },
    /// The site answered with an error.
    Refused {
        /// When.
        seconds: f64,
        /// The error.
        error: String,
    },
    /// No answer: the connection failed.
    Unanswered {
        /// What failed.
        error: String,
    },
}

/// One write the workload issued.
#[derive(Debug, Clone, Serialize)]
pub struct WriteRecord {
    /// Its id.
    pub id: WriteId,
    /// The site it was sent to.
    pub site: SiteIndex,
    /// When it was sent, in seconds since the drill started.
    pub issued_seconds: f64,
    /// Its fate.
    pub outcome: Outcome,
    /// When a flush made it durable.
    pub durable_seconds: Option<f64>,
    /// Acknowledged but not yet durable when its site was killed: it may be gone.
    pub volatile: bool,
}

impl WriteRecord {
    /// When it was acknowledged, if it was.
    pub fn acknowledged(&self) -> Option<f64> {
        match self.outcome {
            Outcome::Acknowledged { seconds } => Some(seconds),
            _ => None,
        }
    }

    /// What a check may assume of it.
    pub fn fate(&self) -> Fate {
        match self.acknowledged() {
            Some(seconds) if !self.volatile => Fate::Acknowledged(seconds),
            _ => Fate::Unknown,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Stopped,
    Paused,
    Running { remaining: Option<u64> },
}

struct State {
    mode: Mode,
    idle: bool,
    shutdown: bool,
    target: Option<Target>,
    target_epoch: u64,
    log: Vec<WriteRecord>,
    flushes: u64,
    last_error: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How the workload writes.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Where each write goes and what it carries.
    pub shape: WorkloadShape,
    /// Volume (export) names, by index.
    pub volumes: Vec<String>,
    /// Writes per second.
    pub rate_per_second: f64,
    /// A flush after this many acknowledged writes.
    pub flush_every: u32,
}

/// A running workload thread.
pub struct Workload {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Workload {
    /// Start the thread, stopped, with no target. Times are seconds since `epoch`.
    pub fn spawn(config: WorkloadConfig, epoch: Instant) -> std::io::Result<Workload> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                mode: Mode::Stopped,
                idle: true,
                shutdown: false,
                target: None,
                target_epoch: 0,
                log: Vec::new(),
                flushes: 0,
                last_error: None,
            }),
            changed: Condvar::new(),
        });
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("drill-workload".into())
            .spawn(move || Writer::new(config, epoch, thread_shared).run())?;
        Ok(Workload { shared, thread: Some(thread) })
    }

    /// Send writes to `target` from now on. Returns the id of the first write that goes there.
    pub fn retarget(&self, target: Option<Target>) -> WriteId {
        let mut st = self.shared.lock();
        st.target = target;
        st.target_epoch += 1;
        self.shared.changed.notify_all();
        WriteId(st.log.len() as u64 + 1)
    }

    /// Where writes go now.
    pub fn target(&self) -> Option<Target> {
        self.shared.lock().target
    }

    /// Write until told otherwise (`None`), or this many writes.
    pub fn run(&self, writes: Option<u64>) {
        let mut st = self.shared.lock();
        st.mode = Mode::Running { remaining: writes };
        self.shared.changed.notify_all();
    }

    /// Whether it is writing (or due to).
    pub fn is_running(&self) -> bool {
        matches!(self.shared.lock().mode, Mode::Running { .. })
    }

    /// Stop writing (`stop`: for good; else a pause a later [`Workload::run`] ends), flush, and
    /// wait until no write is in flight. Fails if that takes longer than `deadline`.
    pub fn quiesce(&self, stop: bool, deadline: Duration) -> Result<(), String> {
        let mut st = self.shared.lock();
        st.mode = if stop { Mode::Stopped } else { Mode::Paused };
        st.idle = false;
        self.shared.changed.notify_all();
        let started = Instant::now();
        while !st.idle {
            let left = deadline.checked_sub(started.elapsed()).ok_or_else(|| {
                format!("the workload did not come to rest within {} s", deadline.as_secs())
            })?;
            st = self.shared.changed.wait_timeout(st, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(())
    }

    /// Wait until a [`Workload::run`] of a number of writes has issued them all.
    pub fn wait_done(&self, deadline: Duration) -> Result<(), String> {
        let mut st = self.shared.lock();
        let started = Instant::now();
        while matches!(st.mode, Mode::Running { .. }) || !st.idle {
            let Some(left) = deadline.checked_sub(started.elapsed()) else {
                let issued = st.log.len();
                let why = st.last_error.clone().unwrap_or_else(|| "no error seen".into());
                return Err(format!(
                    "the workload did not finish its writes within {} s ({issued} issued so far; last error: {why})",
                    deadline.as_secs()
                ));
            };
            st = self
                .shared
                .changed
                .wait_timeout(st, left.min(Duration::from_millis(200)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
            if crate::supervisor::interrupted().is_some() {
                return Err("interrupted".into());
            }
        }
        Ok(())
    }

    /// Look at the log.
    pub fn with_log<R>(&self, f: impl FnOnce(&[WriteRecord]) -> R) -> R {
        f(&self.shared.lock().log)
    }

    /// The newest write issued so far.
    pub fn last_issued(&self) -> Option<WriteId> {
        let n = self.shared.lock().log.len() as u64;
        (n > 0).then_some(WriteId(n))
    }

    /// Flushes acknowledged.
    pub fn flushes(&self) -> u64 {
        self.shared.lock().flushes
    }

    /// The last error the writer met.
    pub fn last_error(&self) -> Option<String> {
        self.shared.lock().last_error.clone()
    }

    /// `site` was killed: its acknowledged writes that no flush made durable may be gone.
    pub fn site_killed(&self, site: SiteIndex) {
        let mut st = self.shared.lock();
        for record in st.log.iter_mut().filter(|r| r.site == site && r.durable_seconds.is_none()) {
            if record.acknowledged().is_some() {
                record.volatile = true;
            }
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.shared.lock().shutdown = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            // A panic in the writer has already been printed; the drill reports what it logged.
            let _ = thread.join();
        }
    }
}

/// What the writer thread does next.
enum Action {
    Connect(Target),
    Flush,
    Sleep(Duration),
    Write(WriteId),
    Exit,
}

/// The writer thread's own state.
struct Writer {
    config: WorkloadConfig,
    epoch: Instant,
    shared: Arc<Shared>,
    clients: Vec<Option<Client>>,
    connected_epoch: Option<u64>,
    /// Acknowledged writes on the current connections that no flush has covered yet.
    unflushed: Vec<WriteId>,
    /// Volumes written since the last flush.
    dirty: Vec<bool>,
    next_due: Option<Instant>,
}

impl Writer {
    fn new(config: WorkloadConfig, epoch: Instant, shared: Arc<Shared>) -> Writer {
        let n = config.volumes.len();
        Writer {
            config,
            epoch,
            shared,
            clients: (0..n).map(|_| None).collect(),
            connected_epoch: None,
            unflushed: Vec::new(),
            dirty: vec![false; n],
            next_due: None,
        }
    }

    fn seconds(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn disconnect(&mut self) {
        for client in self.clients.iter_mut() {
            if let Some(client) = client.take() {
                client.disconnect();
            }
        }
        self.connected_epoch = None;
        // Whatever a flush on new connections covers, it is not these writes' incarnation.
        self.unflushed.clear();
        self.dirty.iter_mut().for_each(|d| *d = false);
    }

    fn run(mut self) {
        loop {
            match self.next_action() {
                Action::Exit => {
                    self.disconnect();
                    return;
                }
                Action::Sleep(d) => std::thread::sleep(d),
                Action::Connect(target) => self.connect(target),
                Action::Flush => self.flush(),
                Action::Write(id) => self.write(id),
            }
        }
    }

    fn next_action(&mut self) -> Action {
        let shared = Arc::clone(&self.shared);
        let mut st = shared.lock();
        loop {
            if st.shutdown {
                return Action::Exit;
            }
            if st.target_epoch != self.connected_epoch.unwrap_or(u64::MAX) && self.connected_epoch.is_some() {
                self.disconnect();
            }
            let running = match st.mode {
                Mode::Running { remaining: Some(0) } => {
                    st.mode = Mode::Stopped;
                    false
                }
                Mode::Running { .. } => true,
                Mode::Paused | Mode::Stopped => false,
            };
            if !running {
                self.next_due = None;
                if !self.unflushed.is_empty() && self.connected_epoch.is_some() {
                    return Action::Flush;
                }
                if !st.idle {
                    st.idle = true;
                    shared.changed.notify_all();
                }
                st = shared.changed.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            if st.idle {
                st.idle = false;
                shared.changed.notify_all();
            }
            let Some(target) = st.target else {
                st.last_error = Some("no primary to write to".into());
                return Action::Sleep(RETRY_PAUSE);
            };
            if self.connected_epoch.is_none() {
                return Action::Connect(target);
            }
            if self.unflushed.len() >= self.config.flush_every as usize {
                return Action::Flush;
            }
            let now = Instant::now();
            let due = *self.next_due.get_or_insert(now);
            if due > now {
                return Action::Sleep((due - now).min(NAP));
            }
            let interval = Duration::from_secs_f64(1.0 / self.config.rate_per_second);
            let next = due + interval;
            self.next_due = Some(if now.saturating_duration_since(next) > CATCH_UP_MAX { now } else { next });
            let id = WriteId(st.log.len() as u64 + 1);
            let issued_seconds = self.seconds();
            st.log.push(WriteRecord {
                id,
                site: target.site,
                issued_seconds,
                outcome: Outcome::InFlight,
                durable_seconds: None,
                volatile: false,
            });
            if let Mode::Running { remaining: Some(n) } = &mut st.mode {
                *n -= 1;
            }
            return Action::Write(id);
        }
    }

    fn connect(&mut self, target: Target) {
        let epoch = self.shared.lock().target_epoch;
        let mut clients = Vec::new();
        for volume in &self.config.volumes {
            match Client::connect(target.nbd, volume) {
                Ok(client) => clients.push(Some(client)),
                Err(e) => {
                    self.shared.lock().last_error =
                        Some(format!("connect to {} export {volume}: {e}", target.nbd));
                    std::thread::sleep(RETRY_PAUSE);
                    return;
                }
            }
        }
        self.clients = clients;
        self.connected_epoch = Some(epoch);
    }

    fn write(&mut self, id: WriteId) {
        let spec = self.config.shape.write(id);
        let payload = self.config.shape.payload(&spec);
        let offset = spec.block * u64::from(self.config.shape.block_bytes);
        let volume = spec.volume as usize;
        let result = match self.clients.get_mut(volume).and_then(Option::as_mut) {
            Some(client) => client.write(offset, &payload),
            None => Err(NbdError::Io(std::io::Error::other("not connected"))),
        };
        let seconds = self.seconds();
        let outcome = match &result {
            Ok(()) => Outcome::Acknowledged { seconds },
            Err(NbdError::Refused(_)) => Outcome::Refused {
                seconds,
                error: result.as_ref().err().map(ToString::to_string).unwrap_or_default(),
            },
            Err(e @ NbdError::Io(_)) => Outcome::Unanswered { error: e.to_string() },
        };
        {
            let mut st = self.shared.lock();
            if let Some(record) = st.log.get_mut((id.0 - 1) as usize) {
                record.outcome = outcome;
            }
            if let Err(e) = &result {
                st.last_error = Some(format!("write {id}: {e}"));
            }
            self.shared.changed.notify_all();
        }
        match result {
            Ok(()) => {
                self.unflushed.push(id);
                if let Some(d) = self.dirty.get_mut(volume) {
                    *d = true;
                }
            }
            Err(NbdError::Refused(_)) => std::thread::sleep(RETRY_PAUSE),
            Err(NbdError::Io(_)) => {
                self.disconnect();
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }

    fn flush(&mut self) {
        let mut failed = None;
        for (client, dirty) in self.clients.iter_mut().zip(self.dirty.iter_mut()) {
            if !*dirty {
                continue;
            }
            match client.as_mut().map(Client::flush) {
                Some(Ok(())) => *dirty = false,
                Some(Err(e)) => {
                    failed = Some(e.to_string());
                    break;
                }
                None => {
                    failed = Some("not connected".into());
                    break;
                }
            }
        }
        let seconds = self.seconds();
        let mut st = self.shared.lock();
        match failed {
            None => {
                st.flushes += 1;
                for id in self.unflushed.drain(..) {
                    if let Some(record) = st.log.get_mut((id.0 - 1) as usize) {
                        record.durable_seconds = Some(seconds);
                    }
                }
            }
            Some(e) => {
                st.last_error = Some(format!("flush: {e}"));
                drop(st);
                self.disconnect();
                std::thread::sleep(RETRY_PAUSE);
            }
        }
    }
}
