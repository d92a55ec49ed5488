//! Link settings as data: what a link does to the packets crossing it, per direction.
//!
//! Settings are plain values with serde, so the same shape is read from profile files (TOML),
//! sent over the control interface (JSON) and built in code by the drill runner. Durations are
//! written as humantime text (`"25ms"`), rates with a unit (`"200Mbit/s"`), probabilities as
//! fractions (`0.001`) or percentages (`"0.1%"`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::SimTime;

/// Longest one-way delay a direction may add, counting delay, jitter and the reordering delay.
/// It bounds how long a packet can sit in the relay.
pub const DELAY_SECONDS_MAX: u64 = 60;

/// The queue limit a direction gets when the settings do not name one: 4 MiB.
pub const QUEUE_BYTES_MAX_DEFAULT: u64 = 4 * 1024 * 1024;

/// The extra delay a reordered packet gets when the settings do not name one.
pub const REORDER_EXTRA_DELAY_DEFAULT: Duration = Duration::from_millis(5);

/// Settings that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingsError {
    /// A rate is not a positive number of bits per second with a known unit.
    #[error("invalid rate {input:?}: {reason} (expected a rate like 200Mbit/s, 1Gbit/s, 50mbps or bits per second)")]
    Rate {
        /// The text as given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A probability is outside 0..=1 or not a number.
    #[error("invalid probability {input:?}: expected a fraction from 0 to 1 (0.001) or a percentage (0.1%)")]
    Probability {
        /// The text or number as given.
        input: String,
    },
    /// Delay, jitter and reordering delay together exceed [`DELAY_SECONDS_MAX`].
    #[error("delay {delay:?} + jitter {jitter:?} + reorder delay {reorder:?} exceeds the {DELAY_SECONDS_MAX} s limit")]
    DelayTooLong {
        /// The one-way delay.
        delay: Duration,
        /// The jitter bound.
        jitter: Duration,
        /// The reordering delay.
        reorder: Duration,
    },
    /// Both `delay` and its shorthand `rtt` were given.
    #[error("give either delay (one way) or rtt (round trip, halved for each direction), not both")]
    DelayAndRtt,
    /// An outage schedule with a zero-length up or down phase.
    #[error("outage schedule needs up and down both longer than zero, got up {up:?} down {down:?}")]
    OutageEmpty {
        /// Time up per period.
        up: Duration,
        /// Time down per period.
        down: Duration,
    },
    /// A bursty loss model that can never leave its bad state.
    #[error("bursty loss needs bad_to_good above zero, or the link stays in the bad state forever")]
    BurstStuck,
    /// A bursty loss model asked for by mean loss and burst length that cannot exist.
    #[error("bursty loss with mean {mean_loss} and mean burst {mean_burst_packets} packets is impossible: need 0 <= mean < 1 and burst >= 1")]
    BurstImpossible {
        /// The mean loss rate asked for.
        mean_loss: f64,
        /// The mean burst length asked for, in packets.
        mean_burst_packets: f64,
    },
    /// A direction has neither its own settings nor `both`.
    #[error("settings for {direction} are missing: give `both`, or both `a_to_b` and `b_to_a`")]
    DirectionMissing {
        /// The direction without settings.
        direction: &'static str,
    },
    /// `both` was given together with both directions, so it would be ignored.
    #[error("`both` is unused when `a_to_b` and `b_to_a` are both given; remove one")]
    BothUnused,
}

/// A link rate in bits per second, never zero. Written as `"200Mbit/s"`, `"1Gbit/s"`, `"50mbps"`,
/// or a bare number of bits per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BitRate(u64);

impl BitRate {
    /// The rate of `bits_per_second`, or `None` for zero.
    pub const fn from_bits_per_second(bits_per_second: u64) -> Option<BitRate> {
        if bits_per_second == 0 {
            None
        } else {
            Some(BitRate(bits_per_second))
        }
    }

    /// `megabits_per_second` × 10⁶ bits per second, or `None` for zero.
    pub const fn from_megabits_per_second(megabits_per_second: u64) -> Option<BitRate> {
        BitRate::from_bits_per_second(megabits_per_second.saturating_mul(1_000_000))
    }

    /// The rate in bits per second.
    pub const fn bits_per_second(self) -> u64 {
        self.0
    }

    /// How long `bytes` take to serialise onto the link, in nanoseconds, rounded up.
    pub fn serialization_nanos(self, bytes: u64) -> u64 {
        let bits = u128::from(bytes) * 8 * 1_000_000_000;
        let nanos = bits.div_ceil(u128::from(self.0));
        u64::try_from(nanos).unwrap_or(u64::MAX)
    }

    /// How many bytes the link serialises in `nanos` nanoseconds, rounded down.
    pub fn bytes_in_nanos(self, nanos: u64) -> u64 {
        let bytes = u128::from(nanos) * u128::from(self.0) / (8 * 1_000_000_000);
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }
}

impl fmt::Display for BitRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (factor, unit) in [(1_000_000_000, "Gbit/s"), (1_000_000, "Mbit/s"), (1_000, "kbit/s")] {
            if self.0 % factor == 0 {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}bit/s", self.0)
    }
}

impl FromStr for BitRate {
    type Err = SettingsError;

    fn from_str(input: &str) -> Result<BitRate, SettingsError> {
        let error = |reason| SettingsError::Rate { input: input.to_owned(), reason };
        let text = input.trim();
        let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_')).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let number: f64 = number.replace('_', "").parse().map_err(|_| error("no number"))?;
        let unit = unit.trim().to_ascii_lowercase();
        let unit = unit.strip_suffix("/s").or_else(|| unit.strip_suffix("ps")).unwrap_or(&unit);
        let factor = match unit {
            "" | "b" | "bit" | "bits" => 1.0,
            "k" | "kb" | "kbit" | "kbits" => 1e3,
            "m" | "mb" | "mbit" | "mbits" => 1e6,
            "g" | "gb" | "gbit" | "gbits" => 1e9,
            _ => return Err(error("unknown unit")),
        };
        let bits = (number * factor).round();
        if !(1.0..=1e15).contains(&bits) {
            return Err(error("out of range (1 bit/s to 1 Pbit/s)"));
        }
        // In range by the check above, so the cast is exact for integers.
        BitRate::from_bits_per_second(bits as u64).ok_or_else(|| error("zero"))
    }
}

impl Serialize for BitRate {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for BitRate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<BitRate, D::Error> {
        struct RateVisitor;
        impl Visitor<'_> for RateVisitor {
            type Value = BitRate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate like \"200Mbit/s\" or a number of bits per second")
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<BitRate, E> {
                BitRate::from_bits_per_second(value).ok_or_else(|| E::custom("rate must be above zero"))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<BitRate, E> {
                let value = u64::try_from(value).map_err(|_| E::custom("rate must be above zero"))?;
                self.visit_u64(value)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<BitRate, E> {
                value.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(RateVisitor)
    }
}

/// A probability from 0 to 1. Written as a fraction (`0.001`) or a percentage (`"0.1%"`).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd, Default)]
pub struct Probability(f64);

impl Probability {
    /// Never.
    pub const ZERO: Probability = Probability(0.0);
    /// Always.
    pub const ONE: Probability = Probability(1.0);

    /// The probability `fraction`, or `None` unless it is a number from 0 to 1.
    pub fn new(fraction: f64) -> Option<Probability> {
        (0.0..=1.0).contains(&fraction).then_some(Probability(fraction))
    }

    /// The probability as a fraction from 0 to 1.
    pub const fn fraction(self) -> f64 {
        self.0
    }

    /// Whether the probability is above zero.
    pub fn is_possible(self) -> bool {
        self.0 > 0.0
    }

    /// Draw one event from a uniform sample `uniform` in `[0, 1)`.
    pub(crate) fn happens(self, uniform: f64) -> bool {
        uniform < self.0
    }
}

impl fmt::Display for Probability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}%", self.0 * 100.0)
    }
}

impl FromStr for Probability {
    type Err = SettingsError;

    fn from_str(input: &str) -> Result<Probability, SettingsError> {
        let error = || SettingsError::Probability { input: input.to_owned() };
        let text = input.trim();
        let fraction = match text.strip_suffix('%') {
            Some(percent) => percent.trim().parse::<f64>().map_err(|_| error())? / 100.0,
            None => text.parse::<f64>().map_err(|_| error())?,
        };
        Probability::new(fraction).ok_or_else(error)
    }
}

impl Serialize for Probability {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_f64(self.0)
    }
}

impl<'de> Deserialize<'de> for Probability {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Probability, D::Error> {
        struct ProbabilityVisitor;
        impl Visitor<'_> for ProbabilityVisitor {
            type Value = Probability;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a fraction from 0 to 1 or a percentage like \"0.1%\"")
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<Probability, E> {
                Probability::new(value)
                    .ok_or_else(|| E::custom(SettingsError::Probability { input: value.to_string() }))
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<Probability, E> {
                match value {
                    0 => Ok(Probability::ZERO),
                    1 => Ok(Probability::ONE),
                    _ => Err(E::custom(SettingsError::Probability { input: value.to_string() })),
                }
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<Probability, E> {
                let value = u64::try_from(value)
                    .map_err(|_| E::custom(SettingsError::Probability { input: value.to_string() }))?;
                self.visit_u64(value)
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Probability, E> {
                value.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(ProbabilityVisitor)
    }
}

/// How a direction loses packets on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case", deny_unknown_fields)]
pub enum LossModel {
    /// No packet is lost.
    #[default]
    None,
    /// Each packet is lost independently with `probability` (Bernoulli).
    Random {
        /// Chance that a packet is lost.
        probability: Probability,
    },
    /// Losses come in bursts: a two-state Gilbert-Elliott chain, stepped once per packet.
    ///
    /// The link is in a good or a bad state. Before each packet it moves from good to bad with
    /// `good_to_bad` (p) and from bad to good with `bad_to_good` (r); then the packet is lost with
    /// `loss_in_good` or `loss_in_bad`, by the state. The link is bad a fraction p / (p + r) of
    /// the time, so the mean loss is `(p·loss_in_bad + r·loss_in_good) / (p + r)`, and a stay in
    /// the bad state lasts 1 / r packets on average. With the defaults `loss_in_good = 0` and
    /// `loss_in_bad = 1` (the simple Gilbert model) every bad stay is a burst of losses of mean
    /// length 1 / r; [`LossModel::bursty`] builds one from a mean loss and burst length.
    Bursty {
        /// Chance per packet of moving from the good to the bad state (p).
        good_to_bad: Probability,
        /// Chance per packet of moving from the bad to the good state (r).
        bad_to_good: Probability,
        /// Chance that a packet is lost in the good state (1 − k in the usual notation).
        #[serde(default)]
        loss_in_good: Probability,
        /// Chance that a packet is lost in the bad state (1 − h in the usual notation).
        #[serde(default = "probability_one")]
        loss_in_bad: Probability,
    },
}

impl LossModel {
    /// A simple Gilbert model (every packet lost in the bad state, none in the good) with the
    /// mean loss `mean_loss` and mean burst length `mean_burst_packets`.
    pub fn bursty(mean_loss: f64, mean_burst_packets: f64) -> Result<LossModel, SettingsError> {
        let impossible = SettingsError::BurstImpossible { mean_loss, mean_burst_packets };
        if !(0.0..1.0).contains(&mean_loss) || !(1.0..=f64::MAX).contains(&mean_burst_packets) {
            return Err(impossible);
        }
        // Stationary bad fraction p / (p + r) = mean_loss, so p = mean_loss · r / (1 − mean_loss).
        let bad_to_good = 1.0 / mean_burst_packets;
        let good_to_bad = mean_loss * bad_to_good / (1.0 - mean_loss);
        Ok(LossModel::Bursty {
            good_to_bad: Probability::new(good_to_bad).ok_or(impossible.clone())?,
            bad_to_good: Probability::new(bad_to_good).ok_or(impossible)?,
            loss_in_good: Probability::ZERO,
            loss_in_bad: Probability::ONE,
        })
    }

    /// The long-run fraction of packets lost.
    pub fn mean_loss(&self) -> f64 {
        match *self {
            LossModel::None => 0.0,
            LossModel::Random { probability } => probability.fraction(),
            LossModel::Bursty { good_to_bad, bad_to_good, loss_in_good, loss_in_bad } => {
                let (p, r) = (good_to_bad.fraction(), bad_to_good.fraction());
                if p + r == 0.0 {
                    return loss_in_good.fraction();
                }
                (p * loss_in_bad.fraction() + r * loss_in_good.fraction()) / (p + r)
            }
        }
    }
}

fn probability_one() -> Probability {
    Probability::ONE
}

/// A periodic outage: the direction is up for `up`, then down for `down`, then up again, for
/// ever, counted from the moment the link starts (virtual time zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutageSchedule {
    /// How long the direction is up in each period.
    #[serde(with = "duration_text")]
    pub up: Duration,
    /// How long the direction is down in each period, right after `up`.
    #[serde(with = "duration_text")]
    pub down: Duration,
}

impl OutageSchedule {
    /// Whether the schedule has the direction down at `now`.
    pub fn is_down(&self, now: SimTime) -> bool {
        let up = duration_nanos(self.up);
        let period = up.saturating_add(duration_nanos(self.down));
        period > 0 && now.as_nanos() % period >= up
    }
}

/// What one direction of a link does to the packets crossing it.
///
/// A packet meets these in order: the partition and the outage schedule (dropped while either
/// holds), the queue in front of the rate limit (tail-dropped when full), serialisation at
/// `rate`, loss on the wire, then the propagation `delay` with `jitter`, reordering and
/// duplication. See [`crate::Direction`] for the exact rules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "DirectionSettingsText")]
pub struct DirectionSettings {
    /// One-way propagation delay. In a profile, `rtt` may be given instead: it means
    /// `delay = rtt / 2`.
    #[serde(with = "duration_text")]
    pub delay: Duration,
    /// Bound of the jitter: each packet's delay is drawn uniformly from
    /// `[delay − jitter, delay + jitter]` (never below zero). Jitter never reorders packets: a
    /// packet is held until the one before it has been delivered.
    #[serde(with = "duration_text")]
    pub jitter: Duration,
    /// Bandwidth, in bits per second of UDP payload; `None` is unlimited (no queue, no
    /// serialisation delay).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<BitRate>,
    /// Largest backlog waiting for the rate limit, in bytes of payload, counting the arriving
    /// packet; a packet that would exceed it is dropped (tail drop). Unused without `rate`.
    pub queue_bytes_max: u64,
    /// How packets are lost on the wire.
    pub loss: LossModel,
    /// Chance that a packet is reordered: it gets `reorder_extra_delay` on top of its delay and
    /// does not hold back the packets after it, which overtake it if they come soon enough.
    pub reorder_probability: Probability,
    /// The extra delay of a reordered packet.
    #[serde(with = "duration_text")]
    pub reorder_extra_delay: Duration,
    /// Chance that a packet is delivered twice (both copies at the same moment).
    pub duplicate_probability: Probability,
    /// Whether the direction is cut: while cut it drops every packet, including those already
    /// in flight when they reach the far end.
    pub partitioned: bool,
    /// A periodic outage schedule (flapping), or `None` for always up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outages: Option<OutageSchedule>,
}

impl Default for DirectionSettings {
    /// A perfect link: no delay, unlimited rate, no loss, up.
    fn default() -> DirectionSettings {
        DirectionSettings {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate: None,
            queue_bytes_max: QUEUE_BYTES_MAX_DEFAULT,
            loss: LossModel::None,
            reorder_probability: Probability::ZERO,
            reorder_extra_delay: REORDER_EXTRA_DELAY_DEFAULT,
            duplicate_probability: Probability::ZERO,
            partitioned: false,
            outages: None,
        }
    }
}

impl DirectionSettings {
    /// Check what the types cannot: delay bounds, the outage schedule, the loss model.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let total = self.delay.saturating_add(self.jitter).saturating_add(self.reorder_extra_delay);
        if total > Duration::from_secs(DELAY_SECONDS_MAX) {
            return Err(SettingsError::DelayTooLong {
                delay: self.delay,
                jitter: self.jitter,
                reorder: self.reorder_extra_delay,
            });
        }
        if let Some(OutageSchedule { up, down }) = self.outages {
            if up.is_zero() || down.is_zero() {
                return Err(SettingsError::OutageEmpty { up, down });
            }
        }
        if let LossModel::Bursty { bad_to_good, .. } = self.loss {
            if !bad_to_good.is_possible() {
                return Err(SettingsError::BurstStuck);
            }
        }
        Ok(())
    }
}

/// What a link does in each of its two directions. Site A is the side that sends to simnet's
/// listen address; site B is the forward address.
///
/// When read, `both` is shorthand for the same settings in each direction; a direction's own
/// table, if given, wins over `both`. When written, both directions are always spelled out.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(try_from = "LinkSettingsText")]
pub struct LinkSettings {
    /// From site A (simnet's clients) to site B (the forward address).
    pub a_to_b: DirectionSettings,
    /// From site B back to site A.
    pub b_to_a: DirectionSettings,
}

impl LinkSettings {
    /// The same settings in both directions.
    pub fn symmetric(settings: DirectionSettings) -> LinkSettings {
        LinkSettings { a_to_b: settings.clone(), b_to_a: settings }
    }

    /// Assemble settings from a `both` shorthand and per-direction tables, as they are written.
    pub fn from_parts(
        both: Option<DirectionSettings>,
        a_to_b: Option<DirectionSettings>,
        b_to_a: Option<DirectionSettings>,
    ) -> Result<LinkSettings, SettingsError> {
        if both.is_some() && a_to_b.is_some() && b_to_a.is_some() {
            return Err(SettingsError::BothUnused);
        }
        let a_to_b = a_to_b
            .or_else(|| both.clone())
            .ok_or(SettingsError::DirectionMissing { direction: Way::AToB.name() })?;
        let b_to_a =
            b_to_a.or(both).ok_or(SettingsError::DirectionMissing { direction: Way::BToA.name() })?;
        Ok(LinkSettings { a_to_b, b_to_a })
    }

    /// The settings of one direction.
    pub fn direction(&self, way: Way) -> &DirectionSettings {
        match way {
            Way::AToB => &self.a_to_b,
            Way::BToA => &self.b_to_a,
        }
    }

    /// The settings of one direction, to change.
    pub fn direction_mut(&mut self, way: Way) -> &mut DirectionSettings {
        match way {
            Way::AToB => &mut self.a_to_b,
            Way::BToA => &mut self.b_to_a,
        }
    }

    /// Check both directions.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.a_to_b.validate()?;
        self.b_to_a.validate()
    }
}

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// From site A (simnet's clients) to site B (the forward address).
    AToB,
    /// From site B back to site A.
    BToA,
}

impl Way {
    /// Both directions, A to B first.
    pub const ALL: [Way; 2] = [Way::AToB, Way::BToA];

    /// The direction's name as written in settings: `a_to_b` or `b_to_a`.
    pub const fn name(self) -> &'static str {
        match self {
            Way::AToB => "a_to_b",
            Way::BToA => "b_to_a",
        }
    }
}

impl fmt::Display for Way {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One direction of a link, or both: what a partition, a heal or a settings change applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ways {
    /// From site A to site B only.
    AToB,
    /// From site B to site A only.
    BToA,
    /// Both directions.
    Both,
}

impl Ways {
    /// Whether `way` is among these.
    pub fn contains(self, way: Way) -> bool {
        matches!((self, way), (Ways::Both, _) | (Ways::AToB, Way::AToB) | (Ways::BToA, Way::BToA))
    }

    /// The directions, A to B first.
    pub fn iter(self) -> impl Iterator<Item = Way> {
        Way::ALL.into_iter().filter(move |&way| self.contains(way))
    }
}

impl From<Way> for Ways {
    fn from(way: Way) -> Ways {
        match way {
            Way::AToB => Ways::AToB,
            Way::BToA => Ways::BToA,
        }
    }
}

impl FromStr for Ways {
    type Err = String;

    fn from_str(text: &str) -> Result<Ways, String> {
        match text.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "a_to_b" | "ab" => Ok(Ways::AToB),
            "b_to_a" | "ba" => Ok(Ways::BToA),
            "both" => Ok(Ways::Both),
            _ => Err(format!("unknown direction {text:?}: expected a_to_b, b_to_a or both")),
        }
    }
}

/// Nanoseconds in `duration`, saturating at `u64::MAX` (584 years).
pub(crate) fn duration_nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// [`DirectionSettings`] as written: every field optional, and `rtt` as shorthand for `delay`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DirectionSettingsText {
    #[serde(default, with = "option_duration_text")]
    delay: Option<Duration>,
    #[serde(default, with = "option_duration_text")]
    rtt: Option<Duration>,
    #[serde(default, with = "option_duration_text")]
    jitter: Option<Duration>,
    #[serde(default)]
    rate: Option<BitRate>,
    #[serde(default)]
    queue_bytes_max: Option<u64>,
    #[serde(default)]
    loss: Option<LossModel>,
    #[serde(default)]
    reorder_probability: Option<Probability>,
    #[serde(default, with = "option_duration_text")]
    reorder_extra_delay: Option<Duration>,
    #[serde(default)]
    duplicate_probability: Option<Probability>,
    #[serde(default)]
    partitioned: Option<bool>,
    #[serde(default)]
    outages: Option<OutageSchedule>,
}

impl TryFrom<DirectionSettingsText> for DirectionSettings {
    type Error = SettingsError;

    fn try_from(text: DirectionSettingsText) -> Result<DirectionSettings, SettingsError> {
        let defaults = DirectionSettings::default();
        let delay = match (text.delay, text.rtt) {
            (Some(_), Some(_)) => return Err(SettingsError::DelayAndRtt),
            (Some(delay), None) => delay,
            (None, Some(rtt)) => rtt / 2,
            (None, None) => defaults.delay,
        };
        let settings = DirectionSettings {
            delay,
            jitter: text.jitter.unwrap_or(defaults.jitter),
            rate: text.rate,
            queue_bytes_max: text.queue_bytes_max.unwrap_or(defaults.queue_bytes_max),
            loss: text.loss.unwrap_or(defaults.loss),
            reorder_probability: text.reorder_probability.unwrap_or(defaults.reorder_probability),
            reorder_extra_delay: text.reorder_extra_delay.unwrap_or(defaults.reorder_extra_delay),
            duplicate_probability: text.duplicate_probability.unwrap_or(defaults.duplicate_probability),
            partitioned: text.partitioned.unwrap_or(defaults.partitioned),
            outages: text.outages,
        };
        settings.validate()?;
        Ok(settings)
    }
}

/// [`LinkSettings`] as written: `both`, or per-direction tables, or `both` with one override.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LinkSettingsText {
    #[serde(default)]
    both: Option<DirectionSettings>,
    #[serde(default)]
    a_to_b: Option<DirectionSettings>,
    #[serde(default)]
    b_to_a: Option<DirectionSettings>,
}

impl TryFrom<LinkSettingsText> for LinkSettings {
    type Error = SettingsError;

    fn try_from(text: LinkSettingsText) -> Result<LinkSettings, SettingsError> {
        LinkSettings::from_parts(text.both, text.a_to_b, text.b_to_a)
    }
}

/// Serde for a [`Duration`] as humantime text (`"25ms"`, `"1s 500ms"`).
pub(crate) mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(&humantime::format_duration(*duration))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text).map_err(|error| {
            serde::de::Error::custom(format!("invalid duration {text:?}: {error} (expected e.g. \"25ms\")"))
        })
    }
}

/// Serde for an optional [`Duration`] as humantime text.
mod option_duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Text(#[serde(with = "super::duration_text")] Duration);
        Ok(Option::<Text>::deserialize(deserializer)?.map(|Text(duration)| duration))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units_and_print_back() {
        for (text, bits) in [
            ("200Mbit/s", 200_000_000),
            ("1Gbit/s", 1_000_000_000),
            ("1.5 Gbps", 1_500_000_000),
            ("50mbps", 50_000_000),
            ("64kbit", 64_000),
            ("12345", 12_345),
        ] {
            let rate: BitRate = text.parse().expect(text);
            assert_eq!(rate.bits_per_second(), bits, "{text}");
            let again: BitRate = rate.to_string().parse().expect("printed rate parses");
            assert_eq!(again, rate);
        }
        for bad in ["", "fast", "0", "10 furlongs/s", "-5Mbit/s"] {
            assert!(bad.parse::<BitRate>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn serialization_time_is_length_over_rate() {
        let gigabit = BitRate::from_bits_per_second(1_000_000_000).expect("nonzero");
        assert_eq!(gigabit.serialization_nanos(1250), 10_000);
        assert_eq!(gigabit.bytes_in_nanos(10_000), 1250);
        let odd = BitRate::from_bits_per_second(3).expect("nonzero");
        // 8 bits at 3 bit/s is 2.67 s, rounded up to the nanosecond.
        assert_eq!(odd.serialization_nanos(1), 2_666_666_667);
    }

    #[test]
    fn probabilities_accept_fractions_and_percentages() {
        assert_eq!("0.1%".parse::<Probability>().expect("percent").fraction(), 0.001);
        assert_eq!("0.25".parse::<Probability>().expect("fraction").fraction(), 0.25);
        assert!("101%".parse::<Probability>().is_err());
        assert!("-0.1".parse::<Probability>().is_err());
        assert!("NaN".parse::<Probability>().is_err());
    }

    #[test]
    fn rtt_is_halved_and_both_fills_each_direction() {
        let settings: LinkSettings = toml::from_str(
            r#"
            [both]
            rtt = "50ms"
            rate = "200Mbit/s"
            loss = { model = "random", probability = "0.1%" }

            [b_to_a]
            delay = "40ms"
            "#,
        )
        .expect("parses");
        assert_eq!(settings.a_to_b.delay, Duration::from_millis(25));
        assert_eq!(settings.a_to_b.rate, BitRate::from_megabits_per_second(200));
        assert_eq!(settings.a_to_b.loss.mean_loss(), 0.001);
        assert_eq!(settings.b_to_a.delay, Duration::from_millis(40));
        assert_eq!(settings.b_to_a.rate, None, "a direction's own table replaces `both` whole");
    }

    #[test]
    fn written_settings_read_back_the_same() {
        let mut settings = LinkSettings::symmetric(DirectionSettings {
            delay: Duration::from_micros(1500),
            jitter: Duration::from_millis(2),
            rate: BitRate::from_megabits_per_second(50),
            loss: LossModel::bursty(0.01, 4.0).expect("possible"),
            outages: Some(OutageSchedule { up: Duration::from_secs(20), down: Duration::from_secs(3) }),
            ..DirectionSettings::default()
        });
        settings.b_to_a.partitioned = true;
        let json = serde_json::to_string(&settings).expect("serialises");
        let back: LinkSettings = serde_json::from_str(&json).expect("reads back");
        assert_eq!(back, settings);
        let toml_text = toml::to_string(&settings).expect("serialises to TOML");
        let back: LinkSettings = toml::from_str(&toml_text).expect("reads back from TOML");
        assert_eq!(back, settings);
    }

    #[test]
    fn mistakes_in_settings_are_refused() {
        for (text, why) in [
            (r#"{"both": {"delay": "1ms", "rtt": "2ms"}}"#, "delay and rtt"),
            (r#"{"both": {"dealy": "1ms"}}"#, "misspelt field"),
            (r#"{"a_to_b": {}}"#, "b_to_a missing"),
            (r#"{"both": {}, "a_to_b": {}, "b_to_a": {}}"#, "both unused"),
            (r#"{"both": {"delay": "61s"}}"#, "delay too long"),
            (r#"{"both": {"outages": {"up": "20s", "down": "0s"}}}"#, "empty outage"),
            (r#"{"both": {"loss": {"model": "random", "probability": 2}}}"#, "probability above one"),
            (r#"{"both": {"loss": {"model": "random", "chance": 0.1}}}"#, "unknown loss field"),
            (r#"{"both": {"loss": {"model": "bursty", "good_to_bad": 0.1, "bad_to_good": 0}}}"#, "stuck"),
            (r#"{"both": {"rate": 0}}"#, "zero rate"),
        ] {
            assert!(serde_json::from_str::<LinkSettings>(text).is_err(), "{why}: {text} should be refused");
        }
    }

    #[test]
    fn bursty_from_mean_has_that_mean_and_burst() {
        let model = LossModel::bursty(0.02, 5.0).expect("possible");
        assert!((model.mean_loss() - 0.02).abs() < 1e-12);
        let LossModel::Bursty { bad_to_good, .. } = model else { panic!("bursty model expected") };
        assert!((1.0 / bad_to_good.fraction() - 5.0).abs() < 1e-9);
        assert!(LossModel::bursty(1.0, 5.0).is_err());
        assert!(LossModel::bursty(0.1, 0.5).is_err());
    }

    #[test]
    fn outage_schedule_starts_up_then_goes_down() {
        let schedule = OutageSchedule { up: Duration::from_secs(20), down: Duration::from_secs(3) };
        let at = |seconds: f64| SimTime::from_duration(Duration::from_secs_f64(seconds));
        assert!(!schedule.is_down(at(0.0)));
        assert!(!schedule.is_down(at(19.999)));
        assert!(schedule.is_down(at(20.0)));
        assert!(schedule.is_down(at(22.999)));
        assert!(!schedule.is_down(at(23.0)));
        assert!(schedule.is_down(at(23.0 + 21.0)));
    }
}
