//! `simnet ctl ADDR ...`: the control interface from the command line. Every operation prints
//! the relay's answer as pretty JSON: the settings after the change, or the counters.

use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use simnet::control::ControlClient;
use simnet::{BitRate, DirectionSettings, LossModel, OutageSchedule, Probability, Profile, Ways};

/// How long `ctl` waits to connect and for each answer.
const CTL_TIMEOUT: Duration = Duration::from_secs(10);

/// Drive a running simnet over its control interface.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The control interface's address (simnet's `--control`).
    #[arg(value_name = "ADDR")]
    addr: String,

    #[command(subcommand)]
    operation: Operation,
}

/// What to do.
#[derive(Subcommand, Debug)]
enum Operation {
    /// Print the settings of both directions.
    Get,
    /// Print the counters.
    Stats,
    /// Cut one direction or both: every datagram is dropped, including those in flight.
    Partition {
        /// a_to_b, b_to_a or both.
        direction: Ways,
    },
    /// Undo a partition.
    Heal {
        /// a_to_b, b_to_a or both.
        #[arg(default_value = "both")]
        direction: Ways,
    },
    /// Change the link: the options given replace those settings, the rest stay as they are.
    Set(Box<SetArgs>),
}

/// Changes to a link's settings.
#[derive(Args, Debug)]
struct SetArgs {
    /// Which direction to change: a_to_b, b_to_a or both.
    #[arg(long, default_value = "both")]
    direction: Ways,
    /// Start from this profile's settings (partitions healed) instead of the current ones.
    #[arg(long, value_name = "NAME")]
    profile: Option<String>,
    /// One-way delay, e.g. 25ms.
    #[arg(long, value_name = "DURATION")]
    delay: Option<humantime::Duration>,
    /// Round-trip time: sets each direction's delay to half of it.
    #[arg(long, value_name = "DURATION", conflicts_with = "delay")]
    rtt: Option<humantime::Duration>,
    /// Jitter bound, e.g. 2ms: delays spread uniformly over delay ± jitter.
    #[arg(long, value_name = "DURATION")]
    jitter: Option<humantime::Duration>,
    /// Rate limit, e.g. 200Mbit/s, or `unlimited`.
    #[arg(long, value_name = "RATE")]
    rate: Option<String>,
    /// Queue in front of the rate limit, e.g. 2.5MB or 1MiB; fuller queues tail-drop.
    #[arg(long, value_name = "SIZE")]
    queue: Option<String>,
    /// Random loss, e.g. 0.1% or 0.001 (with --loss-burst: the mean loss of bursty loss).
    #[arg(long, value_name = "PROBABILITY")]
    loss: Option<Probability>,
    /// Make the loss bursty (Gilbert) with bursts of this many packets on average.
    #[arg(long, value_name = "PACKETS", requires = "loss")]
    loss_burst: Option<f64>,
    /// Chance that a packet is reordered (delayed by --reorder-delay so later ones overtake it).
    #[arg(long, value_name = "PROBABILITY")]
    reorder: Option<Probability>,
    /// Extra delay of a reordered packet.
    #[arg(long, value_name = "DURATION")]
    reorder_delay: Option<humantime::Duration>,
    /// Chance that a packet is delivered twice.
    #[arg(long, value_name = "PROBABILITY")]
    duplicate: Option<Probability>,
    /// Periodic outages as UP/DOWN, e.g. 20s/3s, or `none`.
    #[arg(long, value_name = "UP/DOWN")]
    outages: Option<String>,
}

/// Run `simnet ctl`.
pub fn run(args: CtlArgs) -> anyhow::Result<()> {
    let mut client = ControlClient::connect(&args.addr, CTL_TIMEOUT)?;
    let output = match args.operation {
        Operation::Get => serde_json::to_string_pretty(&client.settings()?),
        Operation::Stats => serde_json::to_string_pretty(&client.stats()?),
        Operation::Partition { direction } => serde_json::to_string_pretty(&client.partition(direction)?),
        Operation::Heal { direction } => serde_json::to_string_pretty(&client.heal(direction)?),
        Operation::Set(set) => {
            let mut settings = match &set.profile {
                Some(name) => Profile::load(name)?.settings,
                None => client.settings()?,
            };
            for way in set.direction.iter() {
                set.apply(settings.direction_mut(way))?;
            }
            serde_json::to_string_pretty(&client.set_settings(settings)?)
        }
    };
    println!("{}", output.context("print the answer")?);
    Ok(())
}

impl SetArgs {
    /// Change `settings` as the options say.
    fn apply(&self, settings: &mut DirectionSettings) -> anyhow::Result<()> {
        if let Some(delay) = self.delay {
            settings.delay = delay.into();
        }
        if let Some(rtt) = self.rtt {
            settings.delay = Duration::from(rtt) / 2;
        }
        if let Some(jitter) = self.jitter {
            settings.jitter = jitter.into();
        }
        if let Some(rate) = &self.rate {
            settings.rate = match rate.as_str() {
                "unlimited" | "none" => None,
                rate => Some(rate.parse::<BitRate>()?),
            };
        }
        if let Some(queue) = &self.queue {
            settings.queue_bytes_max =
                parse_size::parse_size(queue).with_context(|| format!("--queue {queue:?} is not a size"))?;
        }
        if let Some(loss) = self.loss {
            settings.loss = match self.loss_burst {
                Some(burst) => LossModel::bursty(loss.fraction(), burst)?,
                None if loss.is_possible() => LossModel::Random { probability: loss },
                None => LossModel::None,
            };
        }
        if let Some(reorder) = self.reorder {
            settings.reorder_probability = reorder;
        }
        if let Some(reorder_delay) = self.reorder_delay {
            settings.reorder_extra_delay = reorder_delay.into();
        }
        if let Some(duplicate) = self.duplicate {
            settings.duplicate_probability = duplicate;
        }
        if let Some(outages) = &self.outages {
            settings.outages = parse_outages(outages)?;
        }
        Ok(())
    }
}

/// Parse `UP/DOWN` (`20s/3s`) or `none`.
fn parse_outages(text: &str) -> anyhow::Result<Option<OutageSchedule>> {
    if text == "none" {
        return Ok(None);
    }
    let (up, down) = text
        .split_once('/')
        .with_context(|| format!("--outages {text:?}: expected UP/DOWN like 20s/3s, or none"))?;
    let parse =
        |part: &str| humantime::parse_duration(part.trim()).with_context(|| format!("--outages {text:?}"));
    Ok(Some(OutageSchedule { up: parse(up)?, down: parse(down)? }))
}
