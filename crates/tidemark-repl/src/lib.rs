//! Tidemark's replication protocol core. It takes bytes and time as inputs and returns
//! decisions; it never reads a clock, touches a socket or spawns a task, so it can be tested
//! deterministically under loss, delay, reordering, duplication and crashes. The QUIC
//! transport (`tidemark-link`) and the site's tasks are a thin shell around it.

pub mod bucket;
pub mod lineage;
pub mod receiver;
pub mod roles;
pub mod sender;
pub mod wire;

pub use bucket::TokenBucket;
pub use lineage::fork_point;
pub use receiver::{Receiver, ReceiverError};
pub use sender::{BatchPlan, Pending, Sender, SenderConfig, SenderError, SenderState};
pub use wire::{
    BaselineChunk, BaselineHeader, BaselineVolume, BatchCompressor, BatchFrame, GroupPosition, Message,
    WireError, PROTOCOL_VERSION,
};
