//! `simnet bench`: measures a real relay on loopback, end to end through the kernel's UDP, and
//! reports each result against its setting: the rate a saturating flow gets, the relay's
//! capacity with no rate limit, one-way delay, and loss.
//!
//! It is a separate command rather than a test because its numbers depend on the machine and on
//! what else runs on it; tests never assert wall-clock timings.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use simnet::{
    BitRate, DirectionSettings, DirectionStats, LinkSettings, LossModel, Probability, Profile, Simnet,
    SimnetConfig,
};

/// Bytes at the start of each datagram: sequence number and send time, both u64 little-endian.
const HEADER_BYTES: usize = 16;
/// Socket buffers of the bench's sender and sink, in bytes.
const SOCKET_BUFFER_BYTES: usize = 4 * 1024 * 1024;
/// How long the sink waits after the sender stops and the link's delay has passed.
const DRAIN: Duration = Duration::from_millis(500);
/// Most datagrams the sender sends back to back when it has fallen behind its schedule.
const SENDER_BURST_PACKETS_MAX: u64 = 64;

/// Options of `simnet bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Seconds each measurement sends for.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// UDP payload per datagram, in bytes (QUIC sends about 1200 to 1452).
    #[arg(long, default_value_t = 1400)]
    payload_bytes: usize,
    /// The rate to measure at: the rate limit of the throughput measurement and the offered
    /// load of the capacity measurement.
    #[arg(long, default_value = "1Gbit/s")]
    rate: BitRate,
    /// Run only these measurements (rate, capacity, delay, loss); all by default.
    #[arg(long, value_name = "NAME", value_delimiter = ',')]
    only: Vec<Phase>,
}

/// One of the bench's measurements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Phase {
    /// Throughput of a saturating flow against the rate limit.
    Rate,
    /// Throughput and delay with no rate limit.
    Capacity,
    /// One-way delay at light load.
    Delay,
    /// Random loss.
    Loss,
}

/// Run `simnet bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.payload_bytes >= HEADER_BYTES, "--payload-bytes must be at least {HEADER_BYTES}");
    anyhow::ensure!(args.seconds > 0.0 && args.seconds <= 600.0, "--seconds must be from 0 to 600");
    let duration = Duration::from_secs_f64(args.seconds);
    let rate = args.rate.bits_per_second() as f64;
    let payload_bits = (args.payload_bytes * 8) as f64;
    println!(
        "simnet bench: {} byte datagrams, {:.1} s per measurement, 127.0.0.1, {} build",
        args.payload_bytes,
        args.seconds,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );

    let runs = |phase| args.only.is_empty() || args.only.contains(&phase);

    // 1. Throughput at the rate limit: the metro profile's link, offered 5% more than it carries.
    if runs(Phase::Rate) {
        let mut metro = Profile::load("metro")?.settings.a_to_b;
        metro.rate = Some(args.rate);
        let offered = rate * 1.05 / payload_bits;
        let result = measure(&args, metro.clone(), offered, duration).await?;
        let achieved = result.received_bits_per_second(args.payload_bytes);
        println!("\nrate limit {} (metro link, 1 ms one way, offered 1.05x):", args.rate);
        println!("  achieved {}  = {:.4} x setting", human_rate(achieved), achieved / rate);
        result.print_losses();
    }

    // 2. Capacity: no rate limit, no delay, offered exactly the rate.
    if runs(Phase::Capacity) {
        let unlimited = DirectionSettings::default();
        let result = measure(&args, unlimited, rate / payload_bits, duration).await?;
        let achieved = result.received_bits_per_second(args.payload_bytes);
        println!("\nrelay capacity, unlimited link, offered {}:", human_rate(rate));
        println!(
            "  sent {}  received {}  = {:.4} x offered",
            human_rate(result.sent_bits_per_second(args.payload_bytes)),
            human_rate(achieved),
            achieved / rate
        );
        result.print_delays(Duration::ZERO);
        result.print_losses();
    }

    // 3. Delay: the metro and wan one-way delays, light load.
    let delays = [("metro", Duration::from_millis(1)), ("wan", Duration::from_millis(25))];
    for (name, delay) in delays.into_iter().filter(|_| runs(Phase::Delay)) {
        let settings = DirectionSettings { delay, ..DirectionSettings::default() };
        let result = measure(&args, settings, 2000.0, duration).await?;
        println!("\none-way delay {delay:?} ({name}), 2000 datagrams/s:");
        result.print_delays(delay);
    }

    // 4. Loss: 1% random loss at a fifth of the rate.
    if runs(Phase::Loss) {
        let settings = DirectionSettings {
            loss: LossModel::Random { probability: Probability::new(0.01).context("1% is a probability")? },
            ..DirectionSettings::default()
        };
        let result = measure(&args, settings, rate / 5.0 / payload_bits, duration).await?;
        let lost = 1.0 - result.received_packets as f64 / result.sent_packets as f64;
        let sd = (0.01 * 0.99 / result.sent_packets as f64).sqrt();
        println!("\nrandom loss 1%, {} datagrams at {}:", result.sent_packets, human_rate(rate / 5.0));
        println!(
            "  measured {:.4}%  = {:.3} x setting (binomial sd {:.4}%)",
            lost * 100.0,
            lost / 0.01,
            sd * 100.0
        );
        result.print_losses();
    }
    Ok(())
}

/// What one measurement saw.
struct Measurement {
    sent_packets: u64,
    send_seconds: f64,
    received_packets: u64,
    /// Seconds from the first datagram received to the last.
    receive_seconds: f64,
    /// One-way delays, in nanoseconds, sorted.
    delays_nanos: Vec<u64>,
    relay: DirectionStats,
}

impl Measurement {
    fn sent_bits_per_second(&self, payload_bytes: usize) -> f64 {
        (self.sent_packets * payload_bytes as u64 * 8) as f64 / self.send_seconds
    }

    /// Received payload rate between the first datagram and the last.
    fn received_bits_per_second(&self, payload_bytes: usize) -> f64 {
        (self.received_packets.saturating_sub(1) * payload_bytes as u64 * 8) as f64 / self.receive_seconds
    }

    fn print_delays(&self, setting: Duration) {
        let percentile = |fraction: f64| {
            let index = ((self.delays_nanos.len() as f64 - 1.0) * fraction).round() as usize;
            Duration::from_nanos(self.delays_nanos.get(index).copied().unwrap_or(0))
        };
        let mean = self.delays_nanos.iter().sum::<u64>() as f64 / self.delays_nanos.len().max(1) as f64;
        let mean = Duration::from_nanos(mean as u64);
        let error = |measured: Duration| {
            let micros = measured.as_secs_f64() * 1e6 - setting.as_secs_f64() * 1e6;
            format!("{micros:+.0} µs")
        };
        println!(
            "  delay min {:?}  median {:?} ({})  mean {:?} ({})  p99 {:?}  max {:?}",
            percentile(0.0),
            percentile(0.5),
            error(percentile(0.5)),
            mean,
            error(mean),
            percentile(0.99),
            percentile(1.0)
        );
    }

    fn print_losses(&self) {
        let dropped = &self.relay.dropped;
        let unseen = self.sent_packets.saturating_sub(self.relay.received_packets);
        println!(
            "  sent {}  relay received {} (kernel dropped {})  emulator dropped {} (queue {}, loss {})  \
             send failed {}  sink received {}",
            self.sent_packets,
            self.relay.received_packets,
            unseen,
            dropped.total() - dropped.send_failed,
            dropped.queue_full,
            dropped.loss,
            dropped.send_failed,
            self.received_packets,
        );
    }
}

/// Relay a flow of `packets_per_second` through a link with `settings` for `duration`, and
/// measure what arrives.
async fn measure(
    args: &BenchArgs,
    settings: DirectionSettings,
    packets_per_second: f64,
    duration: Duration,
) -> anyhow::Result<Measurement> {
    let sink = bench_socket().context("bind the sink")?;
    let sink_addr = sink.local_addr()?;
    let delay = settings.delay + settings.jitter;
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let config = SimnetConfig::new(loopback, sink_addr, LinkSettings::symmetric(settings));
    let simnet = Simnet::start(config).await.context("start the relay")?;
    let relay_addr = simnet.listen_addr();

    let clock = Instant::now();
    let sending = Arc::new(AtomicBool::new(true));
    let sink_thread = {
        let sending = Arc::clone(&sending);
        std::thread::Builder::new()
            .name("bench-sink".into())
            .spawn(move || receive(&sink, clock, &sending, delay + DRAIN))
            .context("start the sink thread")?
    };
    let payload_bytes = args.payload_bytes;
    let sender = std::thread::Builder::new()
        .name("bench-sender".into())
        .spawn(move || send(relay_addr, clock, packets_per_second, duration, payload_bytes))
        .context("start the sender thread")?;
    let (sent, sink_result) = tokio::task::spawn_blocking(move || {
        let sent = sender.join();
        sending.store(false, Ordering::Relaxed);
        (sent, sink_thread.join())
    })
    .await?;
    let (sent_packets, send_seconds) = sent.map_err(|_| anyhow::anyhow!("the sender panicked"))??;
    let received = sink_result.map_err(|_| anyhow::anyhow!("the sink panicked"))??;
    let relay = simnet.stats().a_to_b;
    simnet.shutdown().await;
    Ok(Measurement {
        sent_packets,
        send_seconds,
        received_packets: received.packets,
        receive_seconds: received.seconds,
        delays_nanos: received.delays_nanos,
        relay,
    })
}

fn bench_socket() -> anyhow::Result<UdpSocket> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let socket2 = socket2::SockRef::from(&socket);
    socket2.set_recv_buffer_size(SOCKET_BUFFER_BYTES)?;
    socket2.set_send_buffer_size(SOCKET_BUFFER_BYTES)?;
    Ok(socket)
}

/// Send numbered, timestamped datagrams to `target` at `packets_per_second` for `duration`.
/// Returns how many were sent and over how many seconds.
fn send(
    target: SocketAddr,
    clock: Instant,
    packets_per_second: f64,
    duration: Duration,
    payload_bytes: usize,
) -> anyhow::Result<(u64, f64)> {
    let socket = bench_socket().context("bind the sender")?;
    socket.connect(target)?;
    let mut payload = vec![0_u8; payload_bytes];
    let start = Instant::now();
    let mut sent = 0_u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration {
            break;
        }
        let due = (elapsed.as_secs_f64() * packets_per_second) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        for _ in 0..(due - sent).min(SENDER_BURST_PACKETS_MAX) {
            let now = clock.elapsed().as_nanos() as u64;
            if let Some(header) = payload.get_mut(..HEADER_BYTES) {
                header[..8].copy_from_slice(&sent.to_le_bytes());
                header[8..].copy_from_slice(&now.to_le_bytes());
            }
            socket.send(&payload).context("send a datagram")?;
            sent += 1;
        }
    }
    Ok((sent, start.elapsed().as_secs_f64()))
}

/// What the sink saw.
struct Received {
    packets: u64,
    seconds: f64,
    delays_nanos: Vec<u64>,
}

/// Receive until the sender has stopped and nothing came for `quiet`.
fn receive(
    socket: &UdpSocket,
    clock: Instant,
    sending: &AtomicBool,
    quiet: Duration,
) -> anyhow::Result<Received> {
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buffer = vec![0_u8; 65_536];
    let mut delays_nanos = Vec::new();
    let (mut first, mut last) = (None, Instant::now());
    loop {
        match socket.recv(&mut buffer) {
            Ok(len) => {
                let now = Instant::now();
                last = now;
                first.get_or_insert(now);
                let sent_nanos = buffer
                    .get(8..HEADER_BYTES.min(len))
                    .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
                    .map(u64::from_le_bytes);
                if let Some(sent_nanos) = sent_nanos {
                    let received_nanos = now.duration_since(clock).as_nanos() as u64;
                    delays_nanos.push(received_nanos.saturating_sub(sent_nanos));
                }
            }
            Err(error)
                if matches!(error.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) =>
            {
                if !sending.load(Ordering::Relaxed) && last.elapsed() >= quiet {
                    break;
                }
            }
            Err(error) => return Err(error).context("receive a datagram"),
        }
    }
    delays_nanos.sort_unstable();
    let seconds = first.map_or(0.0, |first| last.duration_since(first).as_secs_f64());
    Ok(Received { packets: delays_nanos.len() as u64, seconds, delays_nanos })
}

fn human_rate(bits_per_second: f64) -> String {
    if bits_per_second >= 1e9 {
        format!("{:.3} Gbit/s", bits_per_second / 1e9)
    } else {
        format!("{:.1} Mbit/s", bits_per_second / 1e6)
    }
}
