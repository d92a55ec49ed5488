//! The I/O shell: a UDP relay between site A's endpoint and site B's that runs every datagram
//! through the emulator core.
//!
//! Site A sends to the listen socket. For each distinct source address (a "client") the relay
//! opens an upstream socket connected to the forward address (site B), like a NAT, so that B's
//! replies come back on that socket and are relayed back to that client from the listen socket.
//!
//! Receiving is async (tokio): one task reads the listen socket and one task reads each upstream
//! socket, draining what is ready in batches and deciding each datagram's fate under one lock per
//! batch. Delivering is done by one plain thread per direction that sleeps on a condition
//! variable until the earliest pending delivery is due. A thread rather than a tokio timer
//! because tokio's timer has millisecond granularity, and the emulation promises delays accurate
//! to well under a millisecond; the thread's timed wait has the kernel's high-resolution timers.
//! It sends what is due in groups, with UDP GSO where the kernel offers it (see `send.rs`).

use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use tokio::task::{AbortHandle, JoinSet};

use crate::emulator::{Direction, DropReason, SimTime, Verdict};
use crate::send::{Sender, GSO_SEGMENTS_MAX};
use crate::settings::{DirectionSettings, LinkSettings, SettingsError, Way, Ways};

/// Largest datagram relayed, in bytes of UDP payload: the receive buffer's size, so nothing that
/// UDP can carry is truncated.
pub const DATAGRAM_BYTES_MAX: usize = 65_535;

/// Most datagrams read from one socket before they are run through the emulator together.
const RECEIVE_BATCH_PACKETS_MAX: usize = 64;
/// Most datagrams a delivery thread takes off its queue at once.
const DELIVERY_BATCH_PACKETS_MAX: usize = 256;
/// Pause after a receive error that is not about one datagram, so that a broken socket does not
/// spin.
const RECEIVE_ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Mixed into the seed for the B-to-A direction's RNG, so the two directions draw differently.
const B_TO_A_SEED_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// Bounds on what the relay holds. Reaching one is counted in [`DroppedPackets`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most clients (site-A source addresses) relayed at once. A datagram from a new client
    /// when this many are known is dropped (`clients_full`), unless a client idle for
    /// `client_idle` can be forgotten to make room.
    pub clients_max: usize,
    /// How long a client must have been silent in both directions before it may be forgotten.
    pub client_idle: Duration,
    /// Most payload bytes held by one direction for later delivery (accepted, not yet sent).
    /// Beyond it datagrams are dropped (`delay_line_full`). It bounds memory, not the emulated
    /// queue, which is [`DirectionSettings::queue_bytes_max`].
    pub delay_line_bytes_max: u64,
    /// Receive and send buffer asked of the kernel for every socket, in bytes; the kernel caps
    /// it at `net.core.rmem_max` / `wmem_max`.
    pub socket_buffer_bytes: usize,
}

impl Default for Limits {
    /// 64 clients forgotten after 60 s idle, 256 MiB per direction, 4 MiB socket buffers.
    fn default() -> Limits {
        Limits {
            clients_max: 64,
            client_idle: Duration::from_secs(60),
            delay_line_bytes_max: 256 * 1024 * 1024,
            socket_buffer_bytes: 4 * 1024 * 1024,
        }
    }
}

/// How to start a relay.
#[derive(Debug, Clone)]
pub struct SimnetConfig {
    /// Where site A sends; port 0 picks a free port (see [`Simnet::listen_addr`]).
    pub listen: SocketAddr,
    /// Site B's endpoint, where datagrams are relayed to.
    pub forward: SocketAddr,
    /// The link's settings at start.
    pub settings: LinkSettings,
    /// Seed of the emulator's random draws.
    pub seed: u64,
    /// Where to serve the control interface, if at all; port 0 picks a free port.
    pub control: Option<SocketAddr>,
    /// Bounds on what the relay holds.
    pub limits: Limits,
}

impl SimnetConfig {
    /// A relay from `listen` to `forward` with `settings`, seed 0, no control interface and
    /// default limits.
    pub fn new(listen: SocketAddr, forward: SocketAddr, settings: LinkSettings) -> SimnetConfig {
        SimnetConfig { listen, forward, settings, seed: 0, control: None, limits: Limits::default() }
    }
}

/// Why a relay could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimnetError {
    /// The settings cannot be used.
    #[error("invalid link settings: {0}")]
    Settings(#[from] SettingsError),
    /// A socket could not be set up.
    #[error("{what} on {addr}: {source}; is the address in use or not local?")]
    Socket {
        /// Which socket and what was being done.
        what: &'static str,
        /// Its address.
        addr: SocketAddr,
        /// The operating system's error.
        source: io::Error,
    },
    /// A delivery thread could not be started.
    #[error("start a simnet delivery thread: {source}")]
    Thread {
        /// The operating system's error.
        source: io::Error,
    },
}

/// Counters of one direction since the relay started.
///
/// Every datagram received is delivered, dropped or still in flight, and a duplicated datagram
/// counts twice from then on: `received + duplicated = delivered + dropped + in_flight`, exactly
/// when no batch is being sent at the moment the counters are read (one being sent is in none
/// of the three), and always once traffic stops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionStats {
    /// Datagrams that entered this direction.
    pub received_packets: u64,
    /// Payload bytes that entered this direction.
    pub received_bytes: u64,
    /// Datagrams sent on to the far end, duplicates included.
    pub delivered_packets: u64,
    /// Payload bytes sent on to the far end, duplicates included.
    pub delivered_bytes: u64,
    /// Datagrams the emulator duplicated.
    pub duplicated_packets: u64,
    /// Datagrams the emulator picked for reordering.
    pub reordered_packets: u64,
    /// Datagrams accepted and not yet delivered or dropped.
    pub in_flight_packets: u64,
    /// Payload bytes accepted and not yet delivered or dropped.
    pub in_flight_bytes: u64,
    /// Datagrams dropped, by reason.
    pub dropped: DroppedPackets,
}

/// Datagrams dropped in one direction, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DroppedPackets {
    /// The direction was partitioned, at arrival or at delivery.
    pub partition: u64,
    /// The direction was in a scheduled outage, at arrival or at delivery.
    pub outage: u64,
    /// The emulated queue was full (tail drop).
    pub queue_full: u64,
    /// The loss model lost it.
    pub loss: u64,
    /// The relay's own bound on bytes in flight was reached ([`Limits::delay_line_bytes_max`]).
    pub delay_line_full: u64,
    /// It came from a new client when [`Limits::clients_max`] were known.
    pub clients_full: u64,
    /// The operating system refused to send it (for example the far end's port is closed), or
    /// its client's upstream socket could not be opened.
    pub send_failed: u64,
}

impl DroppedPackets {
    /// Datagrams dropped for any reason.
    pub fn total(&self) -> u64 {
        self.partition
            + self.outage
            + self.queue_full
            + self.loss
            + self.delay_line_full
            + self.clients_full
            + self.send_failed
    }

    /// Datagrams dropped for this emulator reason.
    pub fn by_reason(&self, reason: DropReason) -> u64 {
        match reason {
            DropReason::Partition => self.partition,
            DropReason::Outage => self.outage,
            DropReason::QueueFull => self.queue_full,
            DropReason::Loss => self.loss,
        }
    }
}

/// Counters of both directions.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// From site A to site B.
    pub a_to_b: DirectionStats,
    /// From site B to site A.
    pub b_to_a: DirectionStats,
    /// Clients (site-A source addresses) currently known.
    pub clients: u64,
}

impl Stats {
    /// One direction's counters.
    pub fn direction(&self, way: Way) -> &DirectionStats {
        match way {
            Way::AToB => &self.a_to_b,
            Way::BToA => &self.b_to_a,
        }
    }
}

/// A running relay. Dropping it stops the relay without waiting; [`Simnet::shutdown`] waits.
///
/// Every method takes `&self`: share a relay between tasks with an `Arc`.
pub struct Simnet {
    shared: Arc<Shared>,
    listen_addr: SocketAddr,
    forward: SocketAddr,
    control_addr: Option<SocketAddr>,
    workers: Mutex<Workers>,
}

impl Simnet {
    /// Bind the sockets and start relaying. Must be called within a tokio runtime, which runs
    /// the receiving tasks and the control interface; delivery runs on two threads of its own.
    pub async fn start(config: SimnetConfig) -> Result<Simnet, SimnetError> {
        config.settings.validate()?;
        let socket_error = |what, addr| move |source| SimnetError::Socket { what, addr, source };
        let listen_std = udp_socket(config.listen, config.limits.socket_buffer_bytes)
            .map_err(socket_error("bind the listen socket", config.listen))?;
        let listen_addr =
            listen_std.local_addr().map_err(socket_error("read the listen address", config.listen))?;
        let listen_send =
            Arc::new(listen_std.try_clone().map_err(socket_error("clone the listen socket", listen_addr))?);
        let listen_receive = tokio::net::UdpSocket::from_std(listen_std)
            .map_err(socket_error("register the listen socket", listen_addr))?;

        let shared = Arc::new(Shared::new(config.settings, config.seed, config.limits));
        let mut workers = Workers::default();

        let control_addr = match config.control {
            Some(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(socket_error("bind the control interface", addr))?;
                let bound = listener.local_addr().map_err(socket_error("read the control address", addr))?;
                workers.tasks.push(tokio::spawn(crate::control::serve(listener, Arc::clone(&shared))));
                Some(bound)
            }
            None => None,
        };

        for way in Way::ALL {
            let (thread_shared, listen_send) = (Arc::clone(&shared), Arc::clone(&listen_send));
            let spawned = std::thread::Builder::new()
                .name(format!("simnet-{}", way.name().replace('_', "-")))
                .spawn(move || run_delivery(&thread_shared, way, &listen_send));
            match spawned {
                Ok(thread) => workers.threads.push(thread),
                Err(source) => {
                    // Stop what already started: the control task and the other thread.
                    shared.close();
                    workers.tasks.iter().for_each(tokio::task::JoinHandle::abort);
                    return Err(SimnetError::Thread { source });
                }
            }
        }
        workers.tasks.push(tokio::spawn(run_listen(Arc::clone(&shared), listen_receive, config.forward)));

        tracing::info!(listen = %listen_addr, forward = %config.forward, control = ?control_addr, "simnet started");
        Ok(Simnet {
            shared,
            listen_addr,
            forward: config.forward,
            control_addr,
            workers: Mutex::new(workers),
        })
    }

    /// Where site A sends: the listen socket's address.
    pub fn listen_addr(&self) -> SocketAddr {
        self.listen_addr
    }

    /// Site B's address, where datagrams are relayed to.
    pub fn forward_addr(&self) -> SocketAddr {
        self.forward
    }

    /// The control interface's address, if it was asked for.
    pub fn control_addr(&self) -> Option<SocketAddr> {
        self.control_addr
    }

    /// The current settings of both directions.
    pub fn settings(&self) -> LinkSettings {
        self.shared.settings()
    }

    /// Replace the settings of both directions, partitions included. Datagrams already in
    /// flight keep the delivery time they were given, but are still dropped if their direction
    /// is cut when they arrive.
    pub fn set_settings(&self, settings: LinkSettings) -> Result<(), SettingsError> {
        self.shared.set_settings(settings)
    }

    /// Replace the settings of one direction, or give both the same.
    pub fn set_direction(&self, ways: Ways, settings: DirectionSettings) -> Result<(), SettingsError> {
        self.shared.set_direction(ways, settings)
    }

    /// Cut one direction or both: every datagram is dropped, including those in flight, until
    /// [`Simnet::heal`].
    pub fn partition(&self, ways: Ways) {
        self.shared.set_partitioned(ways, true);
    }

    /// Undo a partition of one direction or both.
    pub fn heal(&self, ways: Ways) {
        self.shared.set_partitioned(ways, false);
    }

    /// Counters of both directions since the start.
    pub fn stats(&self) -> Stats {
        self.shared.stats()
    }

    /// Stop relaying and wait for the tasks and threads to finish. Datagrams in flight are
    /// discarded. Calling it again does nothing.
    ///
    /// # Cancel safety
    ///
    /// Cancelling it after it started leaves the relay stopped, but its threads may still be
    /// finishing.
    pub async fn shutdown(&self) {
        let workers = std::mem::take(&mut *self.workers.lock());
        self.shared.close();
        for task in &workers.tasks {
            task.abort();
        }
        for task in workers.tasks {
            // The tasks were aborted; a panic in one is already logged by the runtime.
            let _ = task.await;
        }
        for thread in workers.threads {
            if let Ok(Err(panic)) = tokio::task::spawn_blocking(move || thread.join()).await {
                tracing::error!(?panic, "simnet delivery thread panicked");
            }
        }
        tracing::info!(listen = %self.listen_addr, "simnet stopped");
    }
}

impl Drop for Simnet {
    fn drop(&mut self) {
        self.shared.close();
        for task in &self.workers.lock().tasks {
            task.abort();
        }
    }
}

/// The tasks and threads of a relay, taken at shutdown.
#[derive(Default)]
struct Workers {
    tasks: Vec<tokio::task::JoinHandle<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// The state shared by a relay's tasks, threads and control interface.
pub(crate) struct Shared {
    started: Instant,
    limits: Limits,
    a_to_b: WayState,
    b_to_a: WayState,
    clients: AtomicU64,
}

/// One direction: its emulator, its queue of pending deliveries and its counters.
struct WayState {
    emulator: Mutex<Emulator>,
    line: DelayLine,
    counters: Counters,
}

/// The emulator core of one direction and the RNG it draws from.
struct Emulator {
    direction: Direction,
    rng: StdRng,
}

impl Shared {
    fn new(settings: LinkSettings, seed: u64, limits: Limits) -> Shared {
        let way = |settings, seed| WayState {
            emulator: Mutex::new(Emulator {
                direction: Direction::new(settings),
                rng: StdRng::seed_from_u64(seed),
            }),
            line: DelayLine::default(),
            counters: Counters::default(),
        };
        Shared {
            started: Instant::now(),
            limits,
            a_to_b: way(settings.a_to_b, seed),
            b_to_a: way(settings.b_to_a, seed ^ B_TO_A_SEED_MIX),
            clients: AtomicU64::new(0),
        }
    }

    fn way(&self, way: Way) -> &WayState {
        match way {
            Way::AToB => &self.a_to_b,
            Way::BToA => &self.b_to_a,
        }
    }

    /// Virtual time: time since the relay started.
    fn now(&self) -> SimTime {
        SimTime::from_duration(self.started.elapsed())
    }

    pub(crate) fn settings(&self) -> LinkSettings {
        LinkSettings {
            a_to_b: self.a_to_b.emulator.lock().direction.settings().clone(),
            b_to_a: self.b_to_a.emulator.lock().direction.settings().clone(),
        }
    }

    pub(crate) fn set_settings(&self, settings: LinkSettings) -> Result<(), SettingsError> {
        settings.validate()?;
        self.a_to_b.emulator.lock().direction.set_settings(settings.a_to_b);
        self.b_to_a.emulator.lock().direction.set_settings(settings.b_to_a);
        tracing::info!("simnet settings replaced");
        Ok(())
    }

    pub(crate) fn set_direction(&self, ways: Ways, settings: DirectionSettings) -> Result<(), SettingsError> {
        settings.validate()?;
        for way in ways.iter() {
            self.way(way).emulator.lock().direction.set_settings(settings.clone());
            tracing::info!(direction = %way, "simnet settings replaced");
        }
        Ok(())
    }

    pub(crate) fn set_partitioned(&self, ways: Ways, partitioned: bool) {
        for way in ways.iter() {
            self.way(way).emulator.lock().direction.set_partitioned(partitioned);
            tracing::info!(direction = %way, partitioned, "simnet partition changed");
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let direction = |way: Way| {
            let state = self.way(way);
            let mut stats = state.counters.snapshot();
            let line = state.line.state.lock();
            stats.in_flight_packets = line.heap.len() as u64;
            stats.in_flight_bytes = line.bytes;
            stats
        };
        Stats {
            a_to_b: direction(Way::AToB),
            b_to_a: direction(Way::BToA),
            clients: self.clients.load(Ordering::Relaxed),
        }
    }

    /// Stop the delivery threads, discarding what they hold.
    fn close(&self) {
        for way in Way::ALL {
            let line = &self.way(way).line;
            let mut state = line.state.lock();
            state.closed = true;
            state.heap.clear();
            state.bytes = 0;
            line.wake.notify_all();
        }
    }

    /// Run a batch of datagrams that just arrived through one direction's emulator and queue
    /// those that survive for delivery.
    fn accept(&self, way: Way, batch: &mut Vec<(Vec<u8>, Destination)>, tally: &mut Tally) {
        let state = self.way(way);
        let mut scheduled = Vec::with_capacity(batch.len());
        {
            let mut emulator = state.emulator.lock();
            // Read under the lock, so that arrival times never go backwards even when several
            // upstream tasks feed the same direction.
            let now = self.now();
            let Emulator { direction, rng } = &mut *emulator;
            for (payload, destination) in batch.drain(..) {
                let len_bytes = payload.len() as u64;
                tally.received_packets += 1;
                tally.received_bytes += len_bytes;
                match direction.on_arrival(now, len_bytes, rng) {
                    Verdict::Drop(reason) => tally.drop(reason),
                    Verdict::Deliver(delivery) => {
                        tally.reordered_packets += u64::from(delivery.reordered);
                        if let Some(at) = delivery.duplicate_at {
                            tally.duplicated_packets += 1;
                            scheduled.push(Pending::new(at, payload.clone(), destination.clone()));
                        }
                        scheduled.push(Pending::new(delivery.at, payload, destination));
                    }
                }
            }
        }
        state.line.push(scheduled, self.limits.delay_line_bytes_max, tally);
        state.counters.add(tally);
    }
}

/// Where a delivery goes.
#[derive(Clone)]
enum Destination {
    /// To site B, on the client's upstream socket.
    Upstream(Arc<Upstream>),
    /// To site A's client at this address, from the listen socket.
    Client(SocketAddr),
}

impl Destination {
    /// Whether both go to the same place from the same socket.
    fn same(&self, other: &Destination) -> bool {
        match (self, other) {
            (Destination::Upstream(a), Destination::Upstream(b)) => Arc::ptr_eq(a, b),
            (Destination::Client(a), Destination::Client(b)) => a == b,
            _ => false,
        }
    }
}

/// A datagram waiting to be delivered.
struct Pending {
    at: SimTime,
    /// Order among datagrams due at the same moment: the order they were queued.
    sequence: u64,
    payload: Vec<u8>,
    destination: Destination,
}

impl Pending {
    fn new(at: SimTime, payload: Vec<u8>, destination: Destination) -> Pending {
        Pending { at, sequence: 0, payload, destination }
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Pending) -> bool {
        (self.at, self.sequence) == (other.at, other.sequence)
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Pending) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    /// Reversed, so that the max-heap gives the earliest delivery first.
    fn cmp(&self, other: &Pending) -> std::cmp::Ordering {
        (other.at, other.sequence).cmp(&(self.at, self.sequence))
    }
}

/// One direction's pending deliveries, earliest first, and the condition variable its delivery
/// thread sleeps on.
#[derive(Default)]
struct DelayLine {
    state: Mutex<DelayLineState>,
    wake: Condvar,
}

#[derive(Default)]
struct DelayLineState {
    heap: BinaryHeap<Pending>,
    /// Payload bytes in `heap`.
    bytes: u64,
    next_sequence: u64,
    closed: bool,
}

impl DelayLine {
    /// Queue deliveries, dropping those beyond `bytes_max`, and wake the delivery thread if one
    /// of them is due before what it is waiting for.
    fn push(&self, scheduled: Vec<Pending>, bytes_max: u64, tally: &mut Tally) {
        if scheduled.is_empty() {
            return;
        }
        let mut state = self.state.lock();
        if state.closed {
            return;
        }
        let earliest_before = state.heap.peek().map(|pending| pending.at);
        for mut pending in scheduled {
            let len_bytes = pending.payload.len() as u64;
            if state.bytes.saturating_add(len_bytes) > bytes_max {
                tally.delay_line_full += 1;
                continue;
            }
            pending.sequence = state.next_sequence;
            state.next_sequence += 1;
            state.bytes += len_bytes;
            state.heap.push(pending);
        }
        let earliest_after = state.heap.peek().map(|pending| pending.at);
        if earliest_after.is_some() && (earliest_before.is_none() || earliest_after < earliest_before) {
            self.wake.notify_one();
        }
    }
}

/// Counters of one direction, added to once per batch.
#[derive(Default)]
struct Counters {
    received_packets: AtomicU64,
    received_bytes: AtomicU64,
    delivered_packets: AtomicU64,
    delivered_bytes: AtomicU64,
    duplicated_packets: AtomicU64,
    reordered_packets: AtomicU64,
    partition: AtomicU64,
    outage: AtomicU64,
    queue_full: AtomicU64,
    loss: AtomicU64,
    delay_line_full: AtomicU64,
    clients_full: AtomicU64,
    send_failed: AtomicU64,
}

/// What happened to one batch, before it is added to the [`Counters`].
#[derive(Default)]
struct Tally {
    received_packets: u64,
    received_bytes: u64,
    delivered_packets: u64,
    delivered_bytes: u64,
    duplicated_packets: u64,
    reordered_packets: u64,
    partition: u64,
    outage: u64,
    queue_full: u64,
    loss: u64,
    delay_line_full: u64,
    clients_full: u64,
    send_failed: u64,
}

impl Tally {
    fn drop(&mut self, reason: DropReason) {
        match reason {
            DropReason::Partition => self.partition += 1,
            DropReason::Outage => self.outage += 1,
            DropReason::QueueFull => self.queue_full += 1,
            DropReason::Loss => self.loss += 1,
        }
    }
}

impl Counters {
    /// Add a batch's tally and reset it.
    fn add(&self, tally: &mut Tally) {
        let pairs = [
            (&self.received_packets, tally.received_packets),
            (&self.received_bytes, tally.received_bytes),
            (&self.delivered_packets, tally.delivered_packets),
            (&self.delivered_bytes, tally.delivered_bytes),
            (&self.duplicated_packets, tally.duplicated_packets),
            (&self.reordered_packets, tally.reordered_packets),
            (&self.partition, tally.partition),
            (&self.outage, tally.outage),
            (&self.queue_full, tally.queue_full),
            (&self.loss, tally.loss),
            (&self.delay_line_full, tally.delay_line_full),
            (&self.clients_full, tally.clients_full),
            (&self.send_failed, tally.send_failed),
        ];
        for (counter, value) in pairs {
            if value != 0 {
                counter.fetch_add(value, Ordering::Relaxed);
            }
        }
        *tally = Tally::default();
    }

    fn snapshot(&self) -> DirectionStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DirectionStats {
            received_packets: read(&self.received_packets),
            received_bytes: read(&self.received_bytes),
            delivered_packets: read(&self.delivered_packets),
            delivered_bytes: read(&self.delivered_bytes),
            duplicated_packets: read(&self.duplicated_packets),
            reordered_packets: read(&self.reordered_packets),
            in_flight_packets: 0,
            in_flight_bytes: 0,
            dropped: DroppedPackets {
                partition: read(&self.partition),
                outage: read(&self.outage),
                queue_full: read(&self.queue_full),
                loss: read(&self.loss),
                delay_line_full: read(&self.delay_line_full),
                clients_full: read(&self.clients_full),
                send_failed: read(&self.send_failed),
            },
        }
    }
}

/// A client's upstream socket, connected to site B.
struct Upstream {
    client: SocketAddr,
    /// A clone of the socket for the delivery thread to send on (the async clone receives).
    socket: std::net::UdpSocket,
    /// Virtual time of the last datagram either way, in nanoseconds.
    active_nanos: AtomicU64,
}

impl Upstream {
    fn touch(&self, now: SimTime) {
        self.active_nanos.fetch_max(now.as_nanos(), Ordering::Relaxed);
    }

    fn idle_since(&self, now: SimTime) -> Duration {
        now.saturating_duration_since(SimTime::from_nanos(self.active_nanos.load(Ordering::Relaxed)))
    }
}

/// A known client: its upstream and the task reading it.
struct Client {
    upstream: Arc<Upstream>,
    task: AbortHandle,
}

/// A UDP socket bound to `addr`, non-blocking, with the buffers asked for.
fn udp_socket(addr: SocketAddr, buffer_bytes: usize) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at its maxima, and a smaller buffer still works.
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Open an upstream socket for `client`, connected to `forward`.
fn open_upstream(
    client: SocketAddr,
    forward: SocketAddr,
    buffer_bytes: usize,
    now: SimTime,
) -> io::Result<(Arc<Upstream>, tokio::net::UdpSocket)> {
    let any: SocketAddr = match forward {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = udp_socket(any, buffer_bytes)?;
    socket.connect(forward)?;
    let sender = socket.try_clone()?;
    let receiver = tokio::net::UdpSocket::from_std(socket)?;
    let upstream = Upstream { client, socket: sender, active_nanos: AtomicU64::new(now.as_nanos()) };
    Ok((Arc::new(upstream), receiver))
}

/// Read site A's datagrams from the listen socket and run them through the A-to-B direction,
/// opening an upstream socket for each new client.
///
/// # Cancel safety
///
/// Meant to be aborted at shutdown: aborting it also aborts every upstream task, which live in
/// its `JoinSet`.
async fn run_listen(shared: Arc<Shared>, listen: tokio::net::UdpSocket, forward: SocketAddr) {
    let mut clients: HashMap<SocketAddr, Client> = HashMap::new();
    let mut upstream_tasks = JoinSet::new();
    let mut buffer = vec![0_u8; DATAGRAM_BYTES_MAX];
    let mut received: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(RECEIVE_BATCH_PACKETS_MAX);
    let mut batch = Vec::with_capacity(RECEIVE_BATCH_PACKETS_MAX);
    let mut tally = Tally::default();
    loop {
        if !receive_batch(&listen, &mut buffer, &mut received).await {
            continue;
        }
        let now = shared.now();
        for (payload, from) in received.drain(..) {
            let known = clients.get(&from).map(|client| Arc::clone(&client.upstream));
            let upstream = match known {
                Some(upstream) => upstream,
                None => match add_client(&shared, &mut clients, &mut upstream_tasks, from, forward, now) {
                    Ok(upstream) => upstream,
                    Err(refusal) => {
                        tally.received_packets += 1;
                        tally.received_bytes += payload.len() as u64;
                        match refusal {
                            ClientRefusal::Full => tally.clients_full += 1,
                            ClientRefusal::SocketFailed => tally.send_failed += 1,
                        }
                        continue;
                    }
                },
            };
            upstream.touch(now);
            batch.push((payload, Destination::Upstream(upstream)));
        }
        shared.accept(Way::AToB, &mut batch, &mut tally);
    }
}

/// Why a new client was not taken on.
enum ClientRefusal {
    /// [`Limits::clients_max`] clients are known and none is idle.
    Full,
    /// Its upstream socket could not be opened.
    SocketFailed,
}

/// Start relaying for a new client, forgetting idle clients if the limit is reached.
fn add_client(
    shared: &Arc<Shared>,
    clients: &mut HashMap<SocketAddr, Client>,
    upstream_tasks: &mut JoinSet<()>,
    from: SocketAddr,
    forward: SocketAddr,
    now: SimTime,
) -> Result<Arc<Upstream>, ClientRefusal> {
    if clients.len() >= shared.limits.clients_max {
        let idle = shared.limits.client_idle;
        clients.retain(|addr, client| {
            let keep = client.upstream.idle_since(now) < idle;
            if !keep {
                client.task.abort();
                tracing::info!(client = %addr, "simnet forgot an idle client");
            }
            keep
        });
        while upstream_tasks.try_join_next().is_some() {}
        shared.clients.store(clients.len() as u64, Ordering::Relaxed);
        if clients.len() >= shared.limits.clients_max {
            // Counted in clients_full; logged at debug only, since it happens for every datagram.
            tracing::debug!(
                client = %from,
                clients_max = shared.limits.clients_max,
                "simnet dropped a datagram from a new client: too many clients"
            );
            return Err(ClientRefusal::Full);
        }
    }
    let (upstream, receiver) = match open_upstream(from, forward, shared.limits.socket_buffer_bytes, now) {
        Ok(opened) => opened,
        Err(error) => {
            tracing::warn!(client = %from, %forward, %error, "simnet could not open an upstream socket");
            return Err(ClientRefusal::SocketFailed);
        }
    };
    let task = upstream_tasks.spawn(run_upstream(Arc::clone(shared), Arc::clone(&upstream), receiver));
    clients.insert(from, Client { upstream: Arc::clone(&upstream), task });
    shared.clients.store(clients.len() as u64, Ordering::Relaxed);
    tracing::info!(client = %from, upstream = ?upstream.socket.local_addr().ok(), "simnet relaying a new client");
    Ok(upstream)
}

/// Read site B's replies to one client and run them through the B-to-A direction.
async fn run_upstream(shared: Arc<Shared>, upstream: Arc<Upstream>, socket: tokio::net::UdpSocket) {
    let mut buffer = vec![0_u8; DATAGRAM_BYTES_MAX];
    let mut received: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(RECEIVE_BATCH_PACKETS_MAX);
    let mut batch = Vec::with_capacity(RECEIVE_BATCH_PACKETS_MAX);
    let mut tally = Tally::default();
    loop {
        if !receive_batch(&socket, &mut buffer, &mut received).await {
            continue;
        }
        upstream.touch(shared.now());
        batch.extend(received.drain(..).map(|(payload, _)| (payload, Destination::Client(upstream.client))));
        shared.accept(Way::BToA, &mut batch, &mut tally);
    }
}

/// Wait for a datagram, then take whatever else is ready, up to a batch. `false` if nothing
/// was received because of an error.
async fn receive_batch(
    socket: &tokio::net::UdpSocket,
    buffer: &mut [u8],
    received: &mut Vec<(Vec<u8>, SocketAddr)>,
) -> bool {
    match socket.recv_from(buffer).await {
        Ok((len, from)) => received.push((copy_prefix(buffer, len), from)),
        Err(error) => {
            receive_error(&error).await;
            return false;
        }
    }
    while received.len() < RECEIVE_BATCH_PACKETS_MAX {
        match socket.try_recv_from(buffer) {
            Ok((len, from)) => received.push((copy_prefix(buffer, len), from)),
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
            Err(error) => {
                receive_error(&error).await;
                break;
            }
        }
    }
    true
}

/// The first `len` bytes of `buffer`, copied to a buffer of their own.
fn copy_prefix(buffer: &[u8], len: usize) -> Vec<u8> {
    buffer.get(..len).unwrap_or(buffer).to_vec()
}

/// Log a receive error. A refused connection is the kernel reporting an ICMP "port
/// unreachable" for an earlier send, and says nothing about this socket; anything else pauses
/// briefly so that a broken socket does not spin.
async fn receive_error(error: &io::Error) {
    if error.kind() == io::ErrorKind::ConnectionRefused {
        tracing::debug!(%error, "simnet: far end's port is closed");
    } else {
        tracing::warn!(%error, "simnet could not receive a datagram");
        tokio::time::sleep(RECEIVE_ERROR_PAUSE).await;
    }
}

/// Deliver one direction's datagrams when they are due, until the relay closes.
fn run_delivery(shared: &Shared, way: Way, listen: &std::net::UdpSocket) {
    let state = shared.way(way);
    let mut due: Vec<Pending> = Vec::with_capacity(DELIVERY_BATCH_PACKETS_MAX);
    let mut sender = Sender::new();
    let mut tally = Tally::default();
    loop {
        {
            let mut line = state.line.state.lock();
            loop {
                if line.closed {
                    return;
                }
                let now = shared.now();
                match line.heap.peek().map(|pending| pending.at) {
                    None => state.line.wake.wait(&mut line),
                    Some(at) if at <= now => {
                        while due.len() < DELIVERY_BATCH_PACKETS_MAX
                            && line.heap.peek().is_some_and(|pending| pending.at <= now)
                        {
                            if let Some(pending) = line.heap.pop() {
                                line.bytes -= pending.payload.len() as u64;
                                due.push(pending);
                            }
                        }
                        break;
                    }
                    Some(at) => {
                        let _timed_out =
                            state.line.wake.wait_until(&mut line, shared.started + at.since_start());
                    }
                }
            }
        }
        let verdict = state.emulator.lock().direction.check_delivery(shared.now());
        if let Err(reason) = verdict {
            for _ in due.drain(..) {
                tally.drop(reason);
            }
        }
        // Runs of datagrams with one destination and one size go out together.
        let mut payloads: Vec<&[u8]> = Vec::with_capacity(GSO_SEGMENTS_MAX);
        for group in
            due.chunk_by(|a, b| a.destination.same(&b.destination) && a.payload.len() == b.payload.len())
        {
            let Some(first) = group.first() else { continue };
            let (socket, to) = match &first.destination {
                Destination::Upstream(upstream) => (&upstream.socket, None),
                Destination::Client(client) => (listen, Some(*client)),
            };
            let len_bytes = first.payload.len();
            for part in group.chunks(sender.segments_per_send(len_bytes)) {
                payloads.clear();
                payloads.extend(part.iter().map(|pending| pending.payload.as_slice()));
                let sent = sender.send(socket, to, &payloads);
                tally.delivered_packets += sent.sent_packets;
                tally.delivered_bytes += sent.sent_packets * len_bytes as u64;
                tally.send_failed += sent.failed_packets;
                if let Some(error) = sent.last_error {
                    tracing::debug!(direction = %way, %error, "simnet could not deliver a datagram");
                }
            }
        }
        drop(payloads);
        due.clear();
        state.counters.add(&mut tally);
    }
}
