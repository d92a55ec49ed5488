//! Accuracy of the emulator core, in virtual time with seeded RNGs: every number here is
//! deterministic, so the bounds are tight and a test fails only when the emulation is wrong.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::SeedableRng;
use simnet::{
    BitRate, Delivery, Direction, DirectionSettings, DropReason, Link, LinkSettings, LossModel,
    OutageSchedule, Probability, Profile, SimTime, Verdict, Way,
};

const SEED: u64 = 0x5eed;

/// One packet sent through a direction: when it arrived and what became of it.
struct Sent {
    arrival: SimTime,
    len_bytes: u64,
    verdict: Verdict,
}

impl Sent {
    fn delivery(&self) -> Option<Delivery> {
        match self.verdict {
            Verdict::Deliver(delivery) => Some(delivery),
            Verdict::Drop(_) => None,
        }
    }

    fn dropped(&self, reason: DropReason) -> bool {
        self.verdict == Verdict::Drop(reason)
    }

    /// One-way delay of a delivered packet.
    fn delay(&self) -> Option<Duration> {
        self.delivery().map(|delivery| delivery.at.saturating_duration_since(self.arrival))
    }
}

/// Send `count` packets of `len_bytes`, one every `interval`, starting at `start`.
fn send_evenly(
    direction: &mut Direction,
    rng: &mut StdRng,
    start: SimTime,
    count: u64,
    interval: Duration,
    len_bytes: u64,
) -> Vec<Sent> {
    (0..count)
        .map(|index| {
            let arrival = SimTime::from_nanos(start.as_nanos() + index * interval.as_nanos() as u64);
            Sent { arrival, len_bytes, verdict: direction.on_arrival(arrival, len_bytes, rng) }
        })
        .collect()
}

fn rate(megabits: u64) -> Option<BitRate> {
    BitRate::from_megabits_per_second(megabits)
}

fn probability(fraction: f64) -> Probability {
    Probability::new(fraction).expect("a probability")
}

fn millis(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

fn count(sent: &[Sent], reason: DropReason) -> usize {
    sent.iter().filter(|packet| packet.dropped(reason)).count()
}

/// Delivered payload rate, in bits per second, between the first and last delivery.
fn delivered_bits_per_second(sent: &[Sent]) -> f64 {
    let mut deliveries: Vec<(SimTime, u64)> = sent
        .iter()
        .filter_map(|packet| packet.delivery().map(|delivery| (delivery.at, packet.len_bytes)))
        .collect();
    deliveries.sort();
    let (first, last) = (deliveries.first().expect("deliveries").0, deliveries.last().expect("deliveries").0);
    // The first packet's bytes were serialised before its delivery time, so they do not count
    // towards the rate over [first, last].
    let bytes: u64 = deliveries.iter().skip(1).map(|(_, len)| len).sum();
    bytes as f64 * 8.0 / last.saturating_duration_since(first).as_secs_f64()
}

#[test]
fn saturating_flow_gets_the_configured_rate() {
    for (megabits, len_bytes) in [(1000, 1452), (200, 1200), (50, 1200), (20, 1200)] {
        let settings = DirectionSettings {
            rate: rate(megabits),
            queue_bytes_max: 1_000_000,
            delay: millis(25),
            ..DirectionSettings::default()
        };
        let mut direction = Direction::new(settings);
        let mut rng = StdRng::seed_from_u64(SEED);
        // Offer 1.5 times the rate for two seconds.
        let offered_bits_per_second = megabits as f64 * 1e6 * 1.5;
        let interval = Duration::from_secs_f64(len_bytes as f64 * 8.0 / offered_bits_per_second);
        let packets = (2.0 / interval.as_secs_f64()) as u64;
        let sent = send_evenly(&mut direction, &mut rng, SimTime::ZERO, packets, interval, len_bytes);

        let achieved = delivered_bits_per_second(&sent);
        let ratio = achieved / (megabits as f64 * 1e6);
        assert!(
            (ratio - 1.0).abs() < 0.01,
            "{megabits} Mbit/s: achieved {achieved:.0} bit/s, ratio {ratio:.4}"
        );
        assert!(count(&sent, DropReason::QueueFull) > 0, "{megabits} Mbit/s: an overloaded queue tail-drops");

        // The queue never holds more than its limit, so no packet waits longer than the time to
        // send a full queue, plus its own serialisation and the propagation delay.
        let queue_nanos =
            BitRate::from_megabits_per_second(megabits).expect("rate").serialization_nanos(1_000_000);
        let worst = millis(25) + Duration::from_nanos(queue_nanos) + Duration::from_micros(1);
        let longest = sent.iter().filter_map(Sent::delay).max().expect("deliveries");
        assert!(longest <= worst, "{megabits} Mbit/s: a packet waited {longest:?}, more than {worst:?}");
    }
}

#[test]
fn one_way_delay_is_the_setting() {
    // Unlimited rate: the delay is exact.
    let mut direction =
        Direction::new(DirectionSettings { delay: millis(25), ..DirectionSettings::default() });
    let mut rng = StdRng::seed_from_u64(SEED);
    for packet in send_evenly(&mut direction, &mut rng, SimTime::ZERO, 1000, Duration::from_micros(10), 1200)
    {
        assert_eq!(packet.delay(), Some(millis(25)));
    }

    // With a rate, a packet on an idle link also takes its serialisation time: 48 µs for 1200
    // bytes at 200 Mbit/s, well within 1 ms of the setting.
    let settings = DirectionSettings { delay: millis(25), rate: rate(200), ..DirectionSettings::default() };
    let mut direction = Direction::new(settings);
    for packet in send_evenly(&mut direction, &mut rng, SimTime::ZERO, 1000, millis(1), 1200) {
        let delay = packet.delay().expect("delivered");
        assert_eq!(delay, millis(25) + Duration::from_micros(48));
        assert!(delay.abs_diff(millis(25)) < millis(1));
    }
}

#[test]
fn jitter_stays_within_its_bound_and_spreads_across_it() {
    let settings = DirectionSettings { delay: millis(75), jitter: millis(2), ..DirectionSettings::default() };
    let mut direction = Direction::new(settings);
    let mut rng = StdRng::seed_from_u64(SEED);
    // Packets 10 ms apart, more than twice the jitter, so none is held back by the one before.
    let sent = send_evenly(&mut direction, &mut rng, SimTime::ZERO, 20_000, millis(10), 1200);
    let delays: Vec<f64> =
        sent.iter().map(|packet| packet.delay().expect("delivered").as_secs_f64() * 1e3).collect();
    assert!(delays.iter().all(|delay| (73.0..=77.0).contains(delay)), "every delay within 75 ± 2 ms");
    let mean = delays.iter().sum::<f64>() / delays.len() as f64;
    assert!((mean - 75.0).abs() < 0.05, "mean delay {mean} ms");
    // Uniform on [73, 77]: a quarter of the samples in each millisecond.
    for (low, high) in [(73.0, 74.0), (74.0, 75.0), (75.0, 76.0), (76.0, 77.0)] {
        let share =
            delays.iter().filter(|delay| (low..high).contains(*delay)).count() as f64 / delays.len() as f64;
        assert!((share - 0.25).abs() < 0.02, "share of delays in [{low}, {high}) ms is {share}");
    }
}

#[test]
fn jitter_alone_never_reorders() {
    let settings = DirectionSettings { delay: millis(75), jitter: millis(2), ..DirectionSettings::default() };
    let mut direction = Direction::new(settings);
    let mut rng = StdRng::seed_from_u64(SEED);
    // Packets 100 µs apart: with independent jitter most would overtake each other.
    let sent = send_evenly(&mut direction, &mut rng, SimTime::ZERO, 50_000, Duration::from_micros(100), 1200);
    let times: Vec<SimTime> = sent.iter().map(|packet| packet.delivery().expect("delivered").at).collect();
    assert!(times.windows(2).all(|pair| pair.first() <= pair.last()), "delivered in the order sent");
    for packet in &sent {
        let delay = packet.delay().expect("delivered");
        assert!(delay >= millis(73) && delay <= millis(77), "delay {delay:?} outside 75 ± 2 ms");
    }
}

#[test]
fn random_loss_is_near_the_setting() {
    for (fraction, tolerance) in [(0.01, 0.001), (0.001, 0.0003), (0.005, 0.0007)] {
        let settings = DirectionSettings {
            loss: LossModel::Random { probability: probability(fraction) },
            ..Default::default()
        };
        let mut direction = Direction::new(settings);
        let mut rng = StdRng::seed_from_u64(SEED);
        let sent =
            send_evenly(&mut direction, &mut rng, SimTime::ZERO, 200_000, Duration::from_micros(10), 1200);
        // Binomial: the standard deviation of the rate is sqrt(p(1 − p) / n), 0.022% for 1%; the
        // tolerances are four to five of those.
        let lost = count(&sent, DropReason::Loss) as f64 / sent.len() as f64;
        assert!((lost - fraction).abs() < tolerance, "loss {lost} for setting {fraction}");
    }
}

/// Lengths of the runs of consecutive losses.
fn loss_bursts(sent: &[Sent]) -> Vec<usize> {
    let mut bursts = Vec::new();
    let mut run = 0;
    for packet in sent {
        if packet.dropped(DropReason::Loss) {
            run += 1;
        } else if run > 0 {
            bursts.push(run);
            run = 0;
        }
    }
    bursts
}

#[test]
fn bursty_loss_has_the_mean_rate_in_longer_bursts() {
    let mean_burst = |bursts: &[usize]| bursts.iter().sum::<usize>() as f64 / bursts.len() as f64;
    let run = |loss: LossModel| {
        let mut direction = Direction::new(DirectionSettings { loss, ..Default::default() });
        let mut rng = StdRng::seed_from_u64(SEED);
        send_evenly(&mut direction, &mut rng, SimTime::ZERO, 500_000, Duration::from_micros(10), 1200)
    };

    let bursty = run(LossModel::bursty(0.01, 5.0).expect("a possible model"));
    let lost = count(&bursty, DropReason::Loss) as f64 / bursty.len() as f64;
    assert!((lost - 0.01).abs() < 0.0015, "bursty mean loss {lost}");
    let bursty_mean = mean_burst(&loss_bursts(&bursty));
    assert!((bursty_mean - 5.0).abs() < 0.4, "bursty mean burst {bursty_mean} packets");

    let random = run(LossModel::Random { probability: probability(0.01) });
    let random_mean = mean_burst(&loss_bursts(&random));
    assert!(random_mean < 1.1, "random mean burst {random_mean} packets");
    assert!(bursty_mean > 3.0 * random_mean);

    // A Gilbert-Elliott chain with some loss in both states has the mean its formula says.
    let general = LossModel::Bursty {
        good_to_bad: probability(0.002),
        bad_to_good: probability(0.1),
        loss_in_good: probability(0.001),
        loss_in_bad: probability(0.5),
    };
    let sent = run(general);
    let lost = count(&sent, DropReason::Loss) as f64 / sent.len() as f64;
    assert!((lost - general.mean_loss()).abs() < 0.0015, "loss {lost}, expected {}", general.mean_loss());
}

#[test]
fn a_full_queue_tail_drops_until_it_drains() {
    // 10 Mbit/s with a 10 000 byte queue: 10 packets of 1000 bytes fit, counting the one being
    // sent.
    let settings = DirectionSettings { rate: rate(10), queue_bytes_max: 10_000, ..Default::default() };
    let mut direction = Direction::new(settings);
    let mut rng = StdRng::seed_from_u64(SEED);
    let burst = send_evenly(&mut direction, &mut rng, SimTime::ZERO, 100, Duration::ZERO, 1000);
    let accepted: Vec<&Sent> = burst.iter().filter(|packet| packet.delivery().is_some()).collect();
    assert_eq!(accepted.len(), 10);
    assert_eq!(count(&burst, DropReason::QueueFull), 90);
    assert!(
        burst.iter().take(10).all(|packet| packet.delivery().is_some()),
        "the first ten are the ones kept"
    );
    assert_eq!(direction.queued_bytes(SimTime::ZERO), 10_000);
    // Each takes 800 µs to send: the last of the ten leaves at 8 ms.
    assert_eq!(
        accepted.last().and_then(|packet| packet.delivery()).map(|d| d.at),
        Some(SimTime::from_nanos(8_000_000))
    );

    // 4 ms later half the queue has drained, so five more fit and the sixth does not.
    let later =
        send_evenly(&mut direction, &mut rng, SimTime::from_nanos(4_000_000), 6, Duration::ZERO, 1000);
    assert_eq!(later.iter().filter(|packet| packet.delivery().is_some()).count(), 5);
    assert!(later.last().is_some_and(|packet| packet.dropped(DropReason::QueueFull)));
}

#[test]
fn partition_cuts_one_direction_only() {
    let mut link =
        Link::new(LinkSettings::symmetric(DirectionSettings { delay: millis(25), ..Default::default() }));
    let mut rng = StdRng::seed_from_u64(SEED);

    // A packet is on the wire when the cut happens.
    let in_flight = link.a_to_b.on_arrival(SimTime::ZERO, 1200, &mut rng);
    assert!(matches!(in_flight, Verdict::Deliver(_)));
    link.direction_mut(Way::AToB).set_partitioned(true);

    let a_to_b = send_evenly(
        &mut link.a_to_b,
        &mut rng,
        SimTime::from_nanos(1),
        1000,
        Duration::from_micros(100),
        1200,
    );
    let b_to_a = send_evenly(
        &mut link.b_to_a,
        &mut rng,
        SimTime::from_nanos(1),
        1000,
        Duration::from_micros(100),
        1200,
    );
    assert_eq!(count(&a_to_b, DropReason::Partition), 1000, "everything A to B is dropped");
    assert!(b_to_a.iter().all(|packet| packet.delivery().is_some()), "everything B to A is delivered");
    assert_eq!(link.a_to_b.check_delivery(SimTime::from_nanos(25_000_000)), Err(DropReason::Partition));
    assert_eq!(link.b_to_a.check_delivery(SimTime::from_nanos(25_000_000)), Ok(()));

    link.a_to_b.set_partitioned(false);
    let healed =
        send_evenly(&mut link.a_to_b, &mut rng, SimTime::from_nanos(200_000_000), 100, millis(1), 1200);
    assert!(healed.iter().all(|packet| packet.delivery().is_some()), "healed");
}

#[test]
fn duplication_is_near_the_setting() {
    let settings = DirectionSettings { duplicate_probability: probability(0.02), ..Default::default() };
    let mut direction = Direction::new(settings);
    let mut rng = StdRng::seed_from_u64(SEED);
    let sent = send_evenly(&mut direction, &mut rng, SimTime::ZERO, 100_000, Duration::from_micros(10), 1200);
    let deliveries: Vec<Delivery> = sent.iter().filter_map(Sent::delivery).collect();
    let duplicated = deliveries.iter().filter(|delivery| delivery.duplicate_at.is_some()).count() as f64;
    let share = duplicated / sent.len() as f64;
    assert!((share - 0.02).abs() < 0.002, "duplicated {share}");
    assert!(deliveries.iter().all(|delivery| delivery.duplicate_at.is_none_or(|at| at == delivery.at)));
}

#[test]
fn reordering_is_near_the_setting() {
    let settings = DirectionSettings {
        delay: millis(25),
        reorder_probability: probability(0.05),
        reorder_extra_delay: millis(5),
        ..Default::default()
    };
    let mut direction = Direction::new(settings);
    let mut rng = StdRng::seed_from_u64(SEED);
    // Packets 100 µs apart: about 50 later packets overtake each reordered one.
    let sent =
        send_evenly(&mut direction, &mut rng, SimTime::ZERO, 100_000, Duration::from_micros(100), 1200);
    let times: Vec<SimTime> = sent.iter().map(|packet| packet.delivery().expect("delivered").at).collect();
    // A packet is out of order if some packet sent after it is delivered before it.
    let mut earliest_later = SimTime::from_nanos(u64::MAX);
    let mut overtaken = 0;
    for &at in times.iter().rev() {
        if earliest_later < at {
            overtaken += 1;
        }
        earliest_later = earliest_later.min(at);
    }
    let share = overtaken as f64 / times.len() as f64;
    assert!((share - 0.05).abs() < 0.004, "overtaken {share}");
    let flagged = sent.iter().filter(|packet| packet.delivery().is_some_and(|d| d.reordered)).count();
    assert_eq!(flagged, overtaken, "exactly the packets picked for reordering are overtaken");
}

#[test]
fn flapping_follows_its_outage_schedule() {
    let profile = Profile::load("flapping").expect("built-in");
    let schedule = profile.settings.a_to_b.outages.expect("flapping has outages");
    assert_eq!(schedule, OutageSchedule { up: Duration::from_secs(20), down: Duration::from_secs(3) });
    let mut link = Link::new(profile.settings);
    let mut rng = StdRng::seed_from_u64(SEED);
    // 100 packets a second for 70 s: three periods of 23 s and a bit.
    let sent = send_evenly(&mut link.a_to_b, &mut rng, SimTime::ZERO, 7000, millis(10), 1200);
    for packet in &sent {
        let seconds = packet.arrival.since_start().as_secs_f64() % 23.0;
        assert_eq!(packet.dropped(DropReason::Outage), seconds >= 20.0, "at {:?}", packet.arrival);
    }
    assert_eq!(count(&sent, DropReason::Outage), 900, "three outages of 3 s at 100 packets a second");
    // The outage also loses what is in flight when it starts.
    assert_eq!(link.a_to_b.check_delivery(SimTime::from_nanos(20_000_000_000)), Err(DropReason::Outage));
    assert_eq!(link.a_to_b.check_delivery(SimTime::from_nanos(23_000_000_000)), Ok(()));
    // Both directions flap together.
    assert_eq!(link.b_to_a.check_delivery(SimTime::from_nanos(21_000_000_000)), Err(DropReason::Outage));
}

#[test]
fn settings_changed_mid_run_take_effect() {
    let mut direction = Direction::new(DirectionSettings { delay: millis(25), ..Default::default() });
    let mut rng = StdRng::seed_from_u64(SEED);
    let before = send_evenly(&mut direction, &mut rng, SimTime::ZERO, 100, millis(1), 1200);
    assert!(before.iter().all(|packet| packet.delay() == Some(millis(25))));

    // Longer delay: takes effect at once.
    direction.set_settings(DirectionSettings { delay: millis(75), ..Default::default() });
    let longer =
        send_evenly(&mut direction, &mut rng, SimTime::from_nanos(100_000_000), 100, millis(1), 1200);
    assert!(longer.iter().all(|packet| packet.delay() == Some(millis(75))));

    // Shorter delay: packets are not reordered past those still in flight (the last of which
    // arrives at 199 + 75 = 274 ms), so those sent in the first 49 ms wait behind them, and
    // after that the new delay holds.
    direction.set_settings(DirectionSettings { delay: millis(25), ..Default::default() });
    let shorter =
        send_evenly(&mut direction, &mut rng, SimTime::from_nanos(200_000_000), 200, millis(1), 1200);
    assert!(shorter.iter().take(49).all(|packet| packet.delay() > Some(millis(25))));
    assert!(shorter.iter().skip(49).all(|packet| packet.delay() == Some(millis(25))));

    // A rate and full loss.
    direction.set_settings(DirectionSettings {
        loss: LossModel::Random { probability: Probability::ONE },
        ..Default::default()
    });
    let lossy = send_evenly(&mut direction, &mut rng, SimTime::from_nanos(500_000_000), 100, millis(1), 1200);
    assert_eq!(count(&lossy, DropReason::Loss), 100);
    direction.set_settings(DirectionSettings {
        rate: rate(20),
        queue_bytes_max: 100_000,
        ..Default::default()
    });
    let interval = Duration::from_micros(200); // 48 Mbit/s offered
    let limited =
        send_evenly(&mut direction, &mut rng, SimTime::from_nanos(600_000_000), 10_000, interval, 1200);
    let ratio = delivered_bits_per_second(&limited) / 20e6;
    assert!((ratio - 1.0).abs() < 0.01, "rate after the change: ratio {ratio}");
}

#[test]
fn the_same_seed_gives_the_same_verdicts() {
    let settings = Profile::load("intercontinental").expect("built-in").settings.a_to_b;
    let run = |seed| {
        let mut direction = Direction::new(settings.clone());
        let mut rng = StdRng::seed_from_u64(seed);
        send_evenly(&mut direction, &mut rng, SimTime::ZERO, 10_000, Duration::from_micros(150), 1200)
            .into_iter()
            .map(|packet| packet.verdict)
            .collect::<Vec<_>>()
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}
