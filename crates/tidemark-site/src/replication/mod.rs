//! Replication of protected groups to a partner site: the sessions that ship and apply a
//! group's journal (`session`), over streams of the QUIC link.

pub mod session;
