//! simnet: a userspace UDP link emulator that sits between two sites' replication endpoints,
//! because the kernel it runs on has no netem.
//!
//! Site A sends its QUIC datagrams to simnet's listen address; simnet relays them to site B (the
//! forward address) and B's replies back to A, each direction through its own emulated link:
//! delay, jitter, random or bursty loss, reordering, duplication, a rate limit with a bounded
//! queue, partitions and periodic outages, all changeable while it runs.
//!
//! - **Settings** ([`LinkSettings`], [`DirectionSettings`]): the link as data, per direction,
//!   with serde, read from profiles and sent over the control interface.
//! - **Profiles** ([`Profile`]): named settings in `simnet/profiles/*.toml`, built in.
//! - **Core** ([`Link`], [`Direction`]): decides each packet's fate from its length, its arrival
//!   in virtual time ([`SimTime`]) and a seeded RNG. No clock, no sockets.
//! - **Relay** ([`Simnet`]): the tokio UDP relay around the core, to embed in-process.
//! - **Control** ([`control`]): line-delimited JSON over TCP to change a running relay.
//!
//! ```no_run
//! # async fn drill() -> Result<(), Box<dyn std::error::Error>> {
//! use simnet::{Profile, Simnet, SimnetConfig, Ways};
//!
//! let profile = Profile::load("wan")?;
//! let config = SimnetConfig::new("127.0.0.1:0".parse()?, "127.0.0.1:7443".parse()?, profile.settings);
//! let simnet = Simnet::start(config).await?;
//! // Point site A at simnet.listen_addr(), then:
//! simnet.partition(Ways::Both);
//! simnet.heal(Ways::Both);
//! println!("{:?}", simnet.stats().a_to_b.dropped);
//! simnet.shutdown().await;
//! # Ok(())
//! # }
//! ```

#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod control;
mod emulator;
mod profile;
mod relay;
mod send;
mod settings;

pub use emulator::{Delivery, Direction, DropReason, Link, SimTime, Verdict};
pub use profile::{Profile, ProfileError, BUILT_IN, PROFILE_FILE_BYTES_MAX};
pub use relay::{
    DirectionStats, DroppedPackets, Limits, Simnet, SimnetConfig, SimnetError, Stats, DATAGRAM_BYTES_MAX,
};
pub use settings::{
    BitRate, DirectionSettings, LinkSettings, LossModel, OutageSchedule, Probability, SettingsError, Way,
    Ways, DELAY_SECONDS_MAX, QUEUE_BYTES_MAX_DEFAULT, REORDER_EXTRA_DELAY_DEFAULT,
};
