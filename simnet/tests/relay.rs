//! The relay on real loopback sockets, embedded as a library: datagrams go both ways, clients
//! are kept apart, partitions and settings take effect, and the counters add up. Nothing here
//! asserts a timing: every wait is for a condition, with a generous deadline.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use simnet::control::{ControlClient, Request};
use simnet::{
    DirectionSettings, Limits, LinkSettings, LossModel, Probability, Simnet, SimnetConfig, Stats, Ways,
};
use tokio::net::UdpSocket;

/// How long any one condition may take before the test gives up.
const DEADLINE: Duration = Duration::from_secs(20);

fn loopback() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// A UDP echo server on loopback that counts what it receives.
struct Echo {
    addr: SocketAddr,
    received: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    async fn start() -> Echo {
        let socket = UdpSocket::bind(loopback()).await.expect("bind the echo server");
        let addr = socket.local_addr().expect("echo address");
        let received = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&received);
        let task = tokio::spawn(async move {
            let mut buffer = vec![0_u8; 65_536];
            loop {
                let (len, from) = socket.recv_from(&mut buffer).await.expect("echo receive");
                counter.fetch_add(1, Ordering::SeqCst);
                socket.send_to(&buffer[..len], from).await.expect("echo send");
            }
        });
        Echo { addr, received, task }
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(settings: LinkSettings, echo: &Echo) -> Simnet {
    start_with(SimnetConfig::new(loopback(), echo.addr, settings)).await
}

async fn start_with(config: SimnetConfig) -> Simnet {
    Simnet::start(config).await.expect("start simnet")
}

/// A client socket connected to the relay.
async fn client(simnet: &Simnet) -> UdpSocket {
    let socket = UdpSocket::bind(loopback()).await.expect("bind a client");
    socket.connect(simnet.listen_addr()).await.expect("connect the client");
    socket
}

async fn receive(socket: &UdpSocket) -> Vec<u8> {
    let mut buffer = vec![0_u8; 65_536];
    let len = tokio::time::timeout(DEADLINE, socket.recv(&mut buffer))
        .await
        .expect("a reply within the deadline")
        .expect("receive a reply");
    buffer.truncate(len);
    buffer
}

/// Wait until `condition` holds of the relay's counters.
async fn wait_for_stats(simnet: &Simnet, what: &str, condition: impl Fn(&Stats) -> bool) -> Stats {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let stats = simnet.stats();
        if condition(&stats) {
            return stats;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting for {what}: {stats:#?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn delay(millis: u64) -> LinkSettings {
    LinkSettings::symmetric(DirectionSettings { delay: Duration::from_millis(millis), ..Default::default() })
}

/// Datagram `index`: its number, then filler to a size that varies from 8 bytes to 60 000.
fn datagram(index: u64) -> Vec<u8> {
    let len = match index % 4 {
        0 => 8,
        1 => 1200,
        2 => 1452,
        _ => 60_000,
    };
    let mut payload = index.to_le_bytes().to_vec();
    payload.resize(len, (index % 251) as u8);
    payload
}

#[test]
fn a_relay_can_be_shared_between_tasks_and_threads() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Simnet>();
    shareable::<LinkSettings>();
    shareable::<Stats>();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_relay_both_ways_and_are_counted() {
    let echo = Echo::start().await;
    let simnet = start(delay(1), &echo).await;
    let client = client(&simnet).await;

    let sent: Vec<Vec<u8>> = (0..100).map(datagram).collect();
    let mut replies = BTreeMap::new();
    // A few at a time, so that no socket buffer on the way can overflow.
    for chunk in sent.chunks(4) {
        for payload in chunk {
            client.send(payload).await.expect("send");
        }
        for _ in chunk {
            let reply = receive(&client).await;
            *replies.entry(reply).or_insert(0) += 1;
        }
    }
    let expected: BTreeMap<Vec<u8>, i32> = sent.iter().map(|payload| (payload.clone(), 1)).collect();
    assert_eq!(replies, expected, "every datagram came back once, unchanged");

    let bytes: u64 = sent.iter().map(|payload| payload.len() as u64).sum();
    let stats = wait_for_stats(&simnet, "both directions to count 100 deliveries", |stats| {
        stats.a_to_b.delivered_packets == 100 && stats.b_to_a.delivered_packets == 100
    })
    .await;
    for direction in [&stats.a_to_b, &stats.b_to_a] {
        assert_eq!(direction.received_packets, 100);
        assert_eq!(direction.received_bytes, bytes);
        assert_eq!(direction.delivered_bytes, bytes);
        assert_eq!(direction.dropped.total(), 0);
        assert_eq!((direction.in_flight_packets, direction.in_flight_bytes), (0, 0));
    }
    assert_eq!(stats.clients, 1);
    assert_eq!(echo.received(), 100);
    simnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_client_gets_its_own_replies() {
    let echo = Echo::start().await;
    let simnet = start(delay(1), &echo).await;
    let first = client(&simnet).await;
    let second = client(&simnet).await;
    for round in 0..10_u8 {
        first.send(&[1, round]).await.expect("send");
        second.send(&[2, round]).await.expect("send");
        assert_eq!(receive(&first).await, [1, round]);
        assert_eq!(receive(&second).await, [2, round]);
    }
    assert_eq!(simnet.stats().clients, 2);
    simnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_cuts_one_way_at_a_time_until_healed() {
    let echo = Echo::start().await;
    let simnet = start(delay(1), &echo).await;
    let client = client(&simnet).await;
    client.send(b"before").await.expect("send");
    assert_eq!(receive(&client).await, b"before");

    // A to B cut: nothing reaches the echo server.
    simnet.partition(Ways::AToB);
    assert!(simnet.settings().a_to_b.partitioned && !simnet.settings().b_to_a.partitioned);
    for _ in 0..10 {
        client.send(b"lost on the way out").await.expect("send");
    }
    wait_for_stats(&simnet, "10 partition drops A to B", |stats| stats.a_to_b.dropped.partition == 10).await;
    assert_eq!(echo.received(), 1, "only the first datagram reached B");

    // B to A cut instead: B hears every datagram, A hears no reply.
    simnet.heal(Ways::AToB);
    simnet.partition(Ways::BToA);
    for _ in 0..10 {
        client.send(b"lost on the way back").await.expect("send");
    }
    let stats =
        wait_for_stats(&simnet, "10 partition drops B to A", |stats| stats.b_to_a.dropped.partition == 10)
            .await;
    assert_eq!(echo.received(), 11);
    assert_eq!(stats.b_to_a.delivered_packets, 1);

    simnet.heal(Ways::Both);
    client.send(b"after").await.expect("send");
    assert_eq!(receive(&client).await, b"after", "no stale reply came back before this one");
    simnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_loses_what_is_in_flight() {
    let echo = Echo::start().await;
    // Long enough that the datagrams are surely still in flight when the cut comes.
    let simnet = start(delay(2000), &echo).await;
    let client = client(&simnet).await;
    for _ in 0..5 {
        client.send(b"in flight").await.expect("send");
    }
    wait_for_stats(&simnet, "5 datagrams in flight", |stats| stats.a_to_b.in_flight_packets == 5).await;
    simnet.partition(Ways::Both);
    let stats = wait_for_stats(&simnet, "the in-flight datagrams to be dropped", |stats| {
        stats.a_to_b.dropped.partition == 5
    })
    .await;
    assert_eq!(stats.a_to_b.delivered_packets, 0);
    assert_eq!(echo.received(), 0);
    simnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loss_and_duplication_settings_take_effect_while_running() {
    let echo = Echo::start().await;
    let simnet = start(delay(1), &echo).await;
    let client = client(&simnet).await;

    let lossy =
        DirectionSettings { loss: LossModel::Random { probability: Probability::ONE }, ..Default::default() };
    simnet.set_direction(Ways::AToB, lossy).expect("valid settings");
    for _ in 0..50 {
        client.send(b"lost").await.expect("send");
    }
    wait_for_stats(&simnet, "50 losses", |stats| stats.a_to_b.dropped.loss == 50).await;
    assert_eq!(echo.received(), 0);

    let doubling = DirectionSettings { duplicate_probability: Probability::ONE, ..Default::default() };
    simnet.set_direction(Ways::AToB, doubling).expect("valid settings");
    for index in 0..10_u8 {
        client.send(&[index]).await.expect("send");
    }
    let mut replies = Vec::new();
    for _ in 0..20 {
        replies.extend(receive(&client).await);
    }
    replies.sort_unstable();
    let expected: Vec<u8> = (0..10).flat_map(|index| [index, index]).collect();
    assert_eq!(replies, expected, "each datagram reached B twice, and each copy was echoed");
    let stats =
        wait_for_stats(&simnet, "20 deliveries back", |stats| stats.b_to_a.delivered_packets == 20).await;
    assert_eq!(stats.a_to_b.duplicated_packets, 10);
    assert_eq!(stats.a_to_b.delivered_packets, 20);
    // received + duplicated = delivered + dropped + in flight
    let a_to_b = &stats.a_to_b;
    assert_eq!(
        a_to_b.received_packets + a_to_b.duplicated_packets,
        a_to_b.delivered_packets + a_to_b.dropped.total()
    );

    let invalid = DirectionSettings { delay: Duration::from_secs(3600), ..Default::default() };
    assert!(simnet.set_direction(Ways::Both, invalid).is_err(), "an hour of delay is refused");
    assert_eq!(simnet.settings().b_to_a.delay, Duration::from_millis(1), "a refused change changes nothing");
    simnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_limit_are_dropped_and_counted() {
    let echo = Echo::start().await;
    let mut config = SimnetConfig::new(loopback(), echo.addr, delay(1));
    config.limits = Limits { clients_max: 1, client_idle: Duration::from_secs(3600), ..Limits::default() };
    let simnet = start_with(config).await;
    let first = client(&simnet).await;
    let second = client(&simnet).await;
    first.send(b"first").await.expect("send");
    assert_eq!(receive(&first).await, b"first");
    for _ in 0..3 {
        second.send(b"second").await.expect("send");
    }
    let stats =
        wait_for_stats(&simnet, "3 refused datagrams", |stats| stats.a_to_b.dropped.clients_full == 3).await;
    assert_eq!(stats.clients, 1);
    assert_eq!(echo.received(), 1);
    simnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_interface_reads_and_changes_the_link() {
    let echo = Echo::start().await;
    let mut config = SimnetConfig::new(loopback(), echo.addr, delay(1));
    config.control = Some(loopback());
    let simnet = Arc::new(start_with(config).await);
    let control = simnet.control_addr().expect("control interface").to_string();
    let client = client(&simnet).await;

    // The blocking control client runs on a blocking thread.
    let control_clone = control.clone();
    let settings = tokio::task::spawn_blocking(move || {
        let mut control = ControlClient::connect(&control_clone, DEADLINE).expect("connect");
        let before = control.settings().expect("get");
        let cut = control.partition(Ways::Both).expect("partition");
        (before, cut)
    })
    .await
    .expect("control thread");
    assert_eq!(settings.0, delay(1));
    assert!(settings.1.a_to_b.partitioned && settings.1.b_to_a.partitioned);
    assert!(simnet.settings().a_to_b.partitioned, "the relay itself is cut");

    client.send(b"cut").await.expect("send");
    wait_for_stats(&simnet, "a partition drop", |stats| stats.a_to_b.dropped.partition == 1).await;

    let control_clone = control.clone();
    let (healed, stats, set, refused, garbage) = tokio::task::spawn_blocking(move || {
        let mut control = ControlClient::connect(&control_clone, DEADLINE).expect("connect");
        let healed = control.heal(Ways::Both).expect("heal");
        let stats = control.stats().expect("stats");
        let set = control
            .request(&Request::SetDirection {
                direction: Ways::BToA,
                settings: DirectionSettings { delay: Duration::from_millis(7), ..Default::default() },
            })
            .expect("set_direction");
        let refused = control
            .request(&Request::Set {
                settings: LinkSettings::symmetric(DirectionSettings {
                    delay: Duration::from_secs(3600),
                    ..Default::default()
                }),
            })
            .expect("an answer");
        let garbage = raw_exchange(&control_clone, "{\"op\":\"dance\"}\n");
        (healed, stats, set, refused, garbage)
    })
    .await
    .expect("control thread");
    assert!(!healed.a_to_b.partitioned && !healed.b_to_a.partitioned);
    assert_eq!(stats.a_to_b.dropped.partition, 1);
    assert!(set.ok);
    assert_eq!(set.settings.map(|settings| settings.b_to_a.delay), Some(Duration::from_millis(7)));
    assert!(!refused.ok && refused.error.is_some_and(|error| error.contains("limit")), "too long a delay");
    assert!(garbage.contains("\"ok\":false") && garbage.contains("bad request"), "{garbage}");

    client.send(b"healed").await.expect("send");
    assert_eq!(receive(&client).await, b"healed");
    assert_eq!(simnet.settings().b_to_a.delay, Duration::from_millis(7));
    simnet.shutdown().await;
}

/// Send raw text to the control interface and read one line back.
fn raw_exchange(addr: &str, text: &str) -> String {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.write_all(text.as_bytes()).expect("write");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("read");
    line
}
