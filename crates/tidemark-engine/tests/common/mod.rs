//! What the engine tests of two sites share: opening an engine on a directory, and shipping a
//! group's durable records to its copy the way replication does.

use std::sync::Arc;
use std::time::Duration;

use tidemark_engine::{Engine, EngineConfig, MemoryEvents, SystemClock};
use tidemark_journal::record::decode_all;
use tidemark_journal::Seq;

/// An engine on `dir`, with maintenance left to the test.
pub fn open(dir: &std::path::Path) -> Arc<Engine> {
    let mut config = EngineConfig::new(dir, Arc::new(MemoryEvents::default()));
    config.maintenance_interval = Duration::from_secs(3600);
    Engine::open(config, Arc::new(SystemClock)).expect("open engine")
}

/// Ship everything durable on `from`'s `group` after the copy's last seq to `to`'s, reading at
/// most `batch_bytes` at a time; returns records shipped.
pub fn ship(from: &Engine, to: &Engine, group: &str, batch_bytes: u64) -> u64 {
    let p = from.group_handle(group).expect("primary group");
    let s = to.group_handle(group).expect("secondary group");
    let start = Seq(s.position().last_seq.0 + 1);
    let end = p.position().durable_seq;
    if start > end {
        return 0;
    }
    let (mut location, mut next) = (p.locate(start).expect("locate"), start);
    let mut shipped = 0;
    while next <= end {
        let raw = p.read_for_shipping(location, next, batch_bytes).expect("read");
        let records = decode_all(&raw.concat()).expect("decode");
        shipped += records.len() as u64;
        s.apply_replicated(&records).expect("apply");
        s.flush().expect("flush");
        location = raw.next;
        next = Seq(raw.last.0 + 1);
    }
    shipped
}
