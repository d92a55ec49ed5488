//! Drills and `tidemark up`: real `tidemark serve` processes joined through simnet, a workload
//! whose every write carries its own identity, and a checker that reads a copy of a group and
//! says exactly which writes it holds.
//!
//! - [`scenario`]: scenario files (TOML), parsed and checked before anything runs.
//! - [`pattern`]: the workload's writes as a pure function of the seed, and the self-describing
//!   block format.
//! - [`check`]: the checker (no I/O): write-order consistency, completeness, points in time.
//! - [`workload`]: the writer thread and its log of what each write became.
//! - [`supervisor`], [`pair`]: site processes, and two of them joined by two simnet relays.
//! - [`drill`]: running a scenario; [`report`]: what it found.
//! - [`up`]: `tidemark up`.
//!
//! The crate drives sites only through their HTTP API and NBD, like an operator and a host:
//! it knows nothing of the engine.

#![deny(clippy::unwrap_used)]

pub mod api;
pub mod check;
pub mod drill;
pub mod nbd;
pub mod pair;
pub mod pattern;
pub mod report;
pub mod scenario;
pub mod supervisor;
pub mod up;
pub mod workload;

pub use drill::{run_drill, DrillOptions};
pub use report::Report;
pub use scenario::Scenario;
pub use up::{run_up, UpOptions};
