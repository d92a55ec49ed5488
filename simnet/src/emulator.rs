//! The emulator core: decides, for each packet arriving on a link, whether it is dropped and
//! when it is delivered. It never reads a clock, touches a socket or spawns: time comes in as
//! [`SimTime`], randomness as a caller's seeded RNG, and decisions go out as [`Verdict`]s.
//!
//! # The rules, in the order a packet meets them
//!
//! 1. **Partition** ([`DirectionSettings::partitioned`]) and **outage**
//!    ([`DirectionSettings::outages`], evaluated at the arrival time): the packet is dropped.
//! 2. **Queue and rate** ([`DirectionSettings::rate`], [`DirectionSettings::queue_bytes_max`]):
//!    the link serialises one packet at a time, so a packet starts when the link is free and
//!    departs `len × 8 / rate` later: `depart = max(arrival, link_free_at) + len × 8 / rate`.
//!    The backlog at arrival is the bytes the link has yet to send,
//!    `(link_free_at − arrival) × rate / 8`; when the backlog plus the packet would exceed
//!    `queue_bytes_max` the packet is dropped (tail drop) and uses no link time.
//! 3. **Loss** ([`DirectionSettings::loss`]): a packet is lost on the wire after it was
//!    serialised, so lost packets use bandwidth as they do on a real link.
//! 4. **Delay and jitter**: the packet arrives at the far end `delay ± jitter` after it departs
//!    (uniform, never before it departs). Jitter never reorders: a packet is held until the
//!    packet before it has been delivered, which keeps every delay within
//!    `[delay − jitter, delay + jitter]` (measured from departure) because the earlier packet
//!    departed earlier. Reordering is a separate, explicit setting so that a profile with jitter
//!    does not surprise a transport with reordering it did not ask for.
//! 5. **Reordering** ([`DirectionSettings::reorder_probability`]): a reordered packet gets
//!    [`DirectionSettings::reorder_extra_delay`] more and does not hold back later packets,
//!    which overtake it if they arrive within that extra delay.
//! 6. **Duplication** ([`DirectionSettings::duplicate_probability`]): the packet is delivered
//!    twice at the same moment. The copy is made at the far end and uses no bandwidth.
//!
//! A packet in flight is still lost if its direction is partitioned or in an outage at the
//! moment it reaches the far end ([`Direction::check_delivery`]): cutting a link loses what is
//! on the wire.

use std::ops::Add;
use std::time::Duration;

use rand::Rng;

use crate::settings::{duration_nanos, DirectionSettings, LinkSettings, LossModel, Way};

/// Virtual time: nanoseconds since the link started. The core only ever sees this; the relay
/// derives it from a monotonic clock and tests make it up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct SimTime(u64);

impl SimTime {
    /// The moment the link started.
    pub const ZERO: SimTime = SimTime(0);

    /// The time `nanos` nanoseconds after the start.
    pub const fn from_nanos(nanos: u64) -> SimTime {
        SimTime(nanos)
    }

    /// The time `since_start` after the start, saturating after 584 years.
    pub fn from_duration(since_start: Duration) -> SimTime {
        SimTime(duration_nanos(since_start))
    }

    /// Nanoseconds since the start.
    pub const fn as_nanos(self) -> u64 {
        self.0
    }

    /// Time since the start.
    pub const fn since_start(self) -> Duration {
        Duration::from_nanos(self.0)
    }

    /// How long after `earlier` this is, or zero if it is not after it.
    pub const fn saturating_duration_since(self, earlier: SimTime) -> Duration {
        Duration::from_nanos(self.0.saturating_sub(earlier.0))
    }
}

impl Add<Duration> for SimTime {
    type Output = SimTime;

    /// Saturates instead of overflowing.
    fn add(self, duration: Duration) -> SimTime {
        SimTime(self.0.saturating_add(duration_nanos(duration)))
    }
}

/// Why the emulator dropped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The direction is partitioned.
    Partition,
    /// The direction is in a scheduled outage.
    Outage,
    /// The queue in front of the rate limit was full (tail drop).
    QueueFull,
    /// The loss model lost it on the wire.
    Loss,
}

impl DropReason {
    /// Every reason.
    pub const ALL: [DropReason; 4] =
        [DropReason::Partition, DropReason::Outage, DropReason::QueueFull, DropReason::Loss];

    /// The reason's name in stats and logs.
    pub const fn name(self) -> &'static str {
        match self {
            DropReason::Partition => "partition",
            DropReason::Outage => "outage",
            DropReason::QueueFull => "queue_full",
            DropReason::Loss => "loss",
        }
    }
}

/// What happens to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It is dropped.
    Drop(DropReason),
    /// It is delivered.
    Deliver(Delivery),
}

/// When a packet reaches the far end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// When it is delivered.
    pub at: SimTime,
    /// When its duplicate is delivered, if it was duplicated.
    pub duplicate_at: Option<SimTime>,
    /// Whether it was picked for reordering (delayed so that later packets may overtake it).
    pub reordered: bool,
}

/// The emulator of one direction of a link: its settings and the state that carries from one
/// packet to the next (when the link is next free, the last in-order delivery, the burst-loss
/// state).
#[derive(Debug, Clone)]
pub struct Direction {
    settings: DirectionSettings,
    /// When the rate limiter finishes serialising the packets accepted so far.
    link_free_at: SimTime,
    /// The latest delivery time given to a packet that was not reordered; later packets are
    /// not delivered before it.
    in_order_at: SimTime,
    /// The Gilbert-Elliott chain's state, kept across settings changes.
    burst_state: BurstState,
    /// The latest arrival so far: arrivals must come in time order.
    last_arrival: SimTime,
}

/// The state of a Gilbert-Elliott loss chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BurstState {
    Good,
    Bad,
}

impl Direction {
    /// An idle direction with `settings`.
    ///
    /// # Panics
    ///
    /// If the settings do not pass [`DirectionSettings::validate`]: that is the caller's bug.
    pub fn new(settings: DirectionSettings) -> Direction {
        assert!(settings.validate().is_ok(), "direction settings must be validated first: {settings:?}");
        Direction {
            settings,
            link_free_at: SimTime::ZERO,
            in_order_at: SimTime::ZERO,
            burst_state: BurstState::Good,
            last_arrival: SimTime::ZERO,
        }
    }

    /// The current settings.
    pub fn settings(&self) -> &DirectionSettings {
        &self.settings
    }

    /// Change the settings. Packets already accepted keep the fate they were given; the queue,
    /// the in-order bound and the burst-loss state carry over.
    ///
    /// # Panics
    ///
    /// If the settings do not pass [`DirectionSettings::validate`].
    pub fn set_settings(&mut self, settings: DirectionSettings) {
        assert!(settings.validate().is_ok(), "direction settings must be validated first: {settings:?}");
        self.settings = settings;
    }

    /// Cut (`true`) or heal (`false`) the direction.
    pub fn set_partitioned(&mut self, partitioned: bool) {
        self.settings.partitioned = partitioned;
    }

    /// Whether the direction is partitioned or in an outage at `now`, and so drops everything.
    pub fn down_reason(&self, now: SimTime) -> Option<DropReason> {
        if self.settings.partitioned {
            Some(DropReason::Partition)
        } else if self.settings.outages.is_some_and(|schedule| schedule.is_down(now)) {
            Some(DropReason::Outage)
        } else {
            None
        }
    }

    /// Bytes waiting for the rate limiter at `now`.
    pub fn queued_bytes(&self, now: SimTime) -> u64 {
        match self.settings.rate {
            Some(rate) => rate.bytes_in_nanos(self.link_free_at.as_nanos().saturating_sub(now.as_nanos())),
            None => 0,
        }
    }

    /// Decide the fate of a packet of `len_bytes` bytes of payload arriving at `now`, drawing
    /// randomness from `rng`.
    ///
    /// # Panics
    ///
    /// If `now` is before an earlier arrival: the caller must feed packets in time order.
    pub fn on_arrival<R: Rng + ?Sized>(&mut self, now: SimTime, len_bytes: u64, rng: &mut R) -> Verdict {
        assert!(
            now >= self.last_arrival,
            "arrival at {now:?} before an earlier one at {:?}",
            self.last_arrival
        );
        self.last_arrival = now;
        if let Some(reason) = self.down_reason(now) {
            return Verdict::Drop(reason);
        }

        let depart = match self.settings.rate {
            None => now,
            Some(rate) => {
                let backlog_bytes = self.queued_bytes(now);
                if backlog_bytes.saturating_add(len_bytes) > self.settings.queue_bytes_max {
                    return Verdict::Drop(DropReason::QueueFull);
                }
                let start = now.max(self.link_free_at);
                self.link_free_at = SimTime(start.0.saturating_add(rate.serialization_nanos(len_bytes)));
                self.link_free_at
            }
        };

        if self.lose(rng) {
            return Verdict::Drop(DropReason::Loss);
        }

        let delay = duration_nanos(self.settings.delay);
        let jitter = duration_nanos(self.settings.jitter);
        let propagation = if jitter == 0 {
            delay
        } else {
            // Uniform in [delay − jitter, delay + jitter], clamped at zero.
            let offset = rng.random_range(0..=jitter.saturating_mul(2));
            delay.saturating_add(offset).saturating_sub(jitter)
        };
        let arrives = SimTime(depart.0.saturating_add(propagation));

        let reordered = self.settings.reorder_probability.happens(rng.random());
        let at = if reordered {
            arrives + self.settings.reorder_extra_delay
        } else {
            let at = arrives.max(self.in_order_at);
            self.in_order_at = at;
            at
        };
        let duplicate_at = self.settings.duplicate_probability.happens(rng.random()).then_some(at);
        Verdict::Deliver(Delivery { at, duplicate_at, reordered })
    }

    /// Whether a packet reaching the far end at `now` is delivered: it is lost if the direction
    /// is partitioned or in an outage at that moment.
    pub fn check_delivery(&self, now: SimTime) -> Result<(), DropReason> {
        match self.down_reason(now) {
            Some(reason) => Err(reason),
            None => Ok(()),
        }
    }

    /// Step the loss model once and say whether this packet is lost.
    fn lose<R: Rng + ?Sized>(&mut self, rng: &mut R) -> bool {
        match self.settings.loss {
            LossModel::None => false,
            LossModel::Random { probability } => probability.happens(rng.random()),
            LossModel::Bursty { good_to_bad, bad_to_good, loss_in_good, loss_in_bad } => {
                let step: f64 = rng.random();
                self.burst_state = match self.burst_state {
                    BurstState::Good if good_to_bad.happens(step) => BurstState::Bad,
                    BurstState::Bad if bad_to_good.happens(step) => BurstState::Good,
                    state => state,
                };
                let loss = match self.burst_state {
                    BurstState::Good => loss_in_good,
                    BurstState::Bad => loss_in_bad,
                };
                loss.happens(rng.random())
            }
        }
    }
}

/// Both directions of a link.
#[derive(Debug, Clone)]
pub struct Link {
    /// From site A to site B.
    pub a_to_b: Direction,
    /// From site B to site A.
    pub b_to_a: Direction,
}

impl Link {
    /// An idle link with `settings`.
    ///
    /// # Panics
    ///
    /// If the settings do not pass [`LinkSettings::validate`].
    pub fn new(settings: LinkSettings) -> Link {
        Link { a_to_b: Direction::new(settings.a_to_b), b_to_a: Direction::new(settings.b_to_a) }
    }

    /// The settings of both directions.
    pub fn settings(&self) -> LinkSettings {
        LinkSettings { a_to_b: self.a_to_b.settings.clone(), b_to_a: self.b_to_a.settings.clone() }
    }

    /// Change both directions' settings; see [`Direction::set_settings`].
    pub fn set_settings(&mut self, settings: LinkSettings) {
        self.a_to_b.set_settings(settings.a_to_b);
        self.b_to_a.set_settings(settings.b_to_a);
    }

    /// One direction.
    pub fn direction(&self, way: Way) -> &Direction {
        match way {
            Way::AToB => &self.a_to_b,
            Way::BToA => &self.b_to_a,
        }
    }

    /// One direction, to change or to send packets through.
    pub fn direction_mut(&mut self, way: Way) -> &mut Direction {
        match way {
            Way::AToB => &mut self.a_to_b,
            Way::BToA => &mut self.b_to_a,
        }
    }
}
