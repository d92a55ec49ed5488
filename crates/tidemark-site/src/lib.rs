//! The Tidemark site daemon: configuration, the NBD listener, the HTTP/JSON management API,
//! replication and the metrics endpoint around one engine.
//!
//! `tidemark serve` builds a [`Config`], calls [`Site::start`] and then [`Site::run`] until a
//! signal arrives. Everything else in the CLI talks to the API this crate serves.

pub mod api;
pub mod config;
pub mod events;
pub mod jobs;
pub mod metrics;
pub mod names;
pub mod nbd_adapter;
pub mod replication;
pub mod site;
pub mod token;
pub mod units;

pub use config::{Config, ConfigError, Overrides};
pub use site::{Site, SiteError};
