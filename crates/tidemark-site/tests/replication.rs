//! Two engines joined by replication sessions over in-memory channels.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_engine::{Durability, Engine, EngineConfig, GroupOptions, NullEvents, SystemClock};
use tidemark_journal::record::{self, RecordBody, RecordMeta};
use tidemark_journal::{ChainHash, Generation, UnixNanos, VolumeId};
use tidemark_repl::Message;
use tidemark_site::replication::session::{
    run_primary, run_secondary, to_wire, Channel, Limiter, PrimaryContext, ReplStats, SessionConfig,
    SessionEnd, SessionError, SessionHost, SwapCall,
};
use tokio::sync::{mpsc, watch};

/// The site around a secondary session, as these tests see it.
struct TestHost {
    stats: Arc<ReplStats>,
    calls: parking_lot::Mutex<Option<mpsc::Sender<SwapCall>>>,
    lock: Arc<tokio::sync::Mutex<()>>,
    epoch: Arc<watch::Sender<u64>>,
    changes: parking_lot::Mutex<Vec<String>>,
}

impl TestHost {
    fn new(stats: &Arc<ReplStats>) -> Arc<TestHost> {
        Arc::new(TestHost {
            stats: stats.clone(),
            calls: parking_lot::Mutex::new(None),
            lock: Arc::new(tokio::sync::Mutex::new(())),
            epoch: Arc::new(watch::channel(0).0),
            changes: parking_lot::Mutex::new(Vec::new()),
        })
    }
}

impl SessionHost for TestHost {
    fn stats_for(&self, _group: &str) -> Arc<ReplStats> {
        self.stats.clone()
    }
    fn swap_calls(&self, _group: &str) -> mpsc::Receiver<SwapCall> {
        let (tx, rx) = mpsc::channel(1);
        *self.calls.lock() = Some(tx);
        rx
    }
    fn session_lock(&self, _group: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.lock.clone()
    }
    fn session_epoch(&self, _group: &str) -> Arc<watch::Sender<u64>> {
        self.epoch.clone()
    }
    fn receiving(&self, _group: &str, _peer: &str) {}
    fn promoted(&self, group: &str, peer: &str, generation: u64) {
        self.changes.lock().push(format!("promoted {group} {peer} {generation}"));
    }
    fn demoted(&self, group: &str, peer: &str, generation: u64) {
        self.changes.lock().push(format!("demoted {group} {peer} {generation}"));
    }
}

fn open(dir: &std::path::Path) -> Arc<Engine> {
    let mut config = EngineConfig::new(dir, Arc::new(NullEvents));
    config.maintenance_interval = Duration::from_secs(3600);
    Engine::open(config, Arc::new(SystemClock)).expect("open engine")
}

async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < Duration::from_secs(30), "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Pair {
    stop: watch::Sender<bool>,
    primary: tokio::task::JoinHandle<Result<SessionEnd, SessionError>>,
    secondary: tokio::task::JoinHandle<Result<SessionEnd, SessionError>>,
    /// Swap calls to the primary's session.
    swaps: mpsc::Sender<SwapCall>,
    /// The secondary's host.
    host: Arc<TestHost>,
}

fn connect(p: &Arc<Engine>, s: &Arc<Engine>, stats: &Arc<ReplStats>, rstats: &Arc<ReplStats>) -> Pair {
    connect_limited(p, s, stats, rstats, None)
}

fn connect_limited(
    p: &Arc<Engine>,
    s: &Arc<Engine>,
    stats: &Arc<ReplStats>,
    rstats: &Arc<ReplStats>,
    limiter: Option<Arc<parking_lot::Mutex<Limiter>>>,
) -> Pair {
    connect_to(p, s, stats, TestHost::new(rstats), limiter)
}

fn connect_to(
    p: &Arc<Engine>,
    s: &Arc<Engine>,
    stats: &Arc<ReplStats>,
    host: Arc<TestHost>,
    limiter: Option<Arc<parking_lot::Mutex<Limiter>>>,
) -> Pair {
    let (a, b) = Channel::pair(64);
    let (stop, stop_rx) = watch::channel(false);
    let (swaps, swaps_rx) = mpsc::channel(1);
    let group = p.group_handle("db").expect("group");
    let context = PrimaryContext {
        site: "a".into(),
        stats: stats.clone(),
        config: SessionConfig::default(),
        hold: |_| {},
        limiter,
        swaps: swaps_rx,
        resync: None,
    };
    let primary = tokio::spawn(run_primary(group, a, context, stop_rx));
    let session_host: Arc<dyn SessionHost> = host.clone();
    let secondary = tokio::spawn(run_secondary(s.clone(), "b".into(), "a".into(), b, session_host));
    Pair { stop, primary, secondary, swaps, host }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_replicates_resumes_after_a_disconnect_and_after_a_restart() {
    let (da, db) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let p = open(da.path());
    let mut s = open(db.path());
    p.create_group("db", GroupOptions::default()).expect("group");
    p.create_volume("db", "data", 16 << 20, 4096).expect("volume");
    let v = p.open_export("data").expect("export");
    for i in 0..64u64 {
        // Buffered writes, never flushed by the "host": the session must make them durable.
        v.write(i * 65536, &vec![i as u8 + 1; 65536], Durability::Buffered).expect("write");
    }
    let stats = Arc::new(ReplStats::new(tidemark_journal::Seq(0)));
    let rstats = Arc::new(ReplStats::new(tidemark_journal::Seq(0)));
    let pair = connect(&p, &s, &stats, &rstats);
    let group = p.group_handle("db").expect("group");
    wait_until("everything acked", || stats.acked_seq.load(Ordering::Acquire) == group.position().last_seq.0)
        .await;
    let first_bytes = stats.bytes_sent_total.load(Ordering::Relaxed);
    assert!(first_bytes >= 64 * 65536, "sent {first_bytes} bytes");
    assert!(
        stats.bytes_sent_compressed_total.load(Ordering::Relaxed) < first_bytes / 10,
        "constant blocks compress"
    );
    let compare = |s: &Arc<Engine>| {
        let (mut x, mut y) = (vec![0u8; 16 << 20], vec![0u8; 16 << 20]);
        v.read(0, &mut x).expect("read primary");
        s.open_export("data").expect("replica").read(0, &mut y).expect("read secondary");
        assert!(x == y, "the secondary equals the primary");
    };
    compare(&s);
    assert_eq!(s.group("db").expect("group").role, "secondary");

    // Disconnect, write more, reconnect: only the new records are sent.
    pair.stop.send(true).expect("stop");
    pair.primary.await.expect("join").expect("clean stop");
    pair.secondary.abort();
    v.write(0, &[0xee; 4096], Durability::Fua).expect("write");
    let pair = connect(&p, &s, &stats, &rstats);
    wait_until("the new write acked", || {
        stats.acked_seq.load(Ordering::Acquire) == group.position().last_seq.0
    })
    .await;
    let resent = stats.bytes_sent_total.load(Ordering::Relaxed) - first_bytes;
    assert!(resent < 64 << 10, "resumed from the partner's position, not from the start ({resent} bytes)");
    compare(&s);

    // The secondary site restarts (its engine reopens from disk) and replication resumes.
    pair.stop.send(true).expect("stop");
    let _ = pair.primary.await;
    pair.secondary.abort();
    let _ = pair.secondary.await;
    s.shutdown().expect("shutdown");
    drop(s);
    s = open(db.path());
    v.write(8192, &[0xdd; 4096], Durability::Buffered).expect("write");
    let pair = connect(&p, &s, &stats, &rstats);
    wait_until("acked after the secondary restarted", || {
        stats.acked_seq.load(Ordering::Acquire) == group.position().last_seq.0
    })
    .await;
    compare(&s);
    pair.stop.send(true).expect("stop");
    let _ = pair.primary.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnecting_primary_supersedes_a_stale_session_that_still_holds_the_group() {
    // A primary that died (or was replaced by a takeover) leaves its secondary session waiting
    // on a connection that only times out much later; the next session must not wait for it.
    let (da, db) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let p = open(da.path());
    let s = open(db.path());
    p.create_group("db", GroupOptions::default()).expect("group");
    p.create_volume("db", "data", 1 << 20, 4096).expect("volume");
    let v = p.open_export("data").expect("export");
    v.write(0, &[7u8; 4096], Durability::Fua).expect("write");
    let group = p.group_handle("db").expect("group");
    let rstats = fresh_stats();
    let host = TestHost::new(&rstats);

    // The stale session: a handshake, then silence on a connection that stays open.
    let (mut dead, b) = Channel::pair(64);
    let session_host: Arc<dyn SessionHost> = host.clone();
    let stale = tokio::spawn(run_secondary(s.clone(), "b".into(), "a".into(), b, session_host));
    let position = group.position();
    let offer = Message::Offer {
        position: to_wire(&position),
        first_seq: position.first_seq,
        name: "db".into(),
        retention_seconds: group.options.retention_seconds,
        journal_max_bytes: group.options.journal_max_bytes,
    };
    for message in [Message::Hello { protocol: tidemark_repl::PROTOCOL_VERSION, site: "a".into() }, offer] {
        dead.tx.send(message.encode()).await.expect("send");
    }
    loop {
        let frame = dead.rx.recv().await.expect("the stale session answers");
        if let Ok(Message::Position(_)) = Message::decode(&frame) {
            break; // it holds the group now
        }
    }

    // The primary comes back on a new connection: it streams at once.
    let stats = fresh_stats();
    let pair = connect_to(&p, &s, &stats, host.clone(), None);
    wait_until("the new session's acks", || {
        stats.acked_seq.load(Ordering::Acquire) == group.position().last_seq.0
    })
    .await;
    let ended = tokio::time::timeout(Duration::from_secs(5), stale).await.expect("the stale session ended");
    assert!(
        matches!(ended.expect("join"), Err(SessionError::Superseded)),
        "the stale session was superseded"
    );
    drop(dead);
    pair.stop.send(true).expect("stop");
    let _ = pair.primary.await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_that_is_primary_on_both_sides_is_refused() {
    let (da, db) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let p = open(da.path());
    let s = open(db.path());
    p.create_group("db", GroupOptions::default()).expect("group");
    s.create_group("db", GroupOptions::default()).expect("same name, its own primary group");
    let stats = Arc::new(ReplStats::new(tidemark_journal::Seq(0)));
    let rstats = Arc::new(ReplStats::new(tidemark_journal::Seq(0)));
    let pair = connect(&p, &s, &stats, &rstats);
    let err = pair.primary.await.expect("join").expect_err("refused");
    assert!(err.to_string().contains("different group") || err.to_string().contains("primary here"), "{err}");
    assert!(pair.secondary.await.expect("join").is_err());
}

/// A trusted partner that sends a corrupted batch: the site refuses it, says so in its event
/// log, and keeps accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_batch_from_a_partner_is_refused_with_an_event() {
    use tidemark_journal::{genesis_chain, Seq};
    use tidemark_link::{Identity, Link, LinkProfile, PinnedPeers};
    use tidemark_repl::{BatchFrame, GroupPosition, Message};
    use tidemark_site::events::EventLog;
    use tidemark_site::replication::{Replication, ReplicationConfig};

    let (db, dp) = (tempfile::tempdir().expect("b"), tempfile::tempdir().expect("partner"));
    let events = Arc::new(EventLog::open(db.path(), 1 << 20).expect("events"));
    let mut config = EngineConfig::new(db.path(), events.clone());
    config.maintenance_interval = Duration::from_secs(3600);
    let engine = Engine::open(config, Arc::new(SystemClock)).expect("engine");
    let site = Replication::start(
        engine.clone(),
        events.clone(),
        db.path(),
        "b",
        ReplicationConfig {
            listen: "127.0.0.1:0".parse().expect("addr"),
            profile: LinkProfile::default(),
            session: SessionConfig::default(),
        },
    )
    .expect("replication");
    let partner_id = Identity::load_or_create(dp.path(), "evil").expect("identity");
    site.add_partner("evil", "127.0.0.1:9", &partner_id.fingerprint().to_string(), None).expect("pin");
    let b_fp: tidemark_link::Fingerprint = site.identity().fingerprint.parse().expect("fp");
    let b_addr: std::net::SocketAddr = site.identity().replication_address.parse().expect("addr");
    let link = Link::bind(
        "127.0.0.1:0".parse().expect("addr"),
        &partner_id,
        Arc::new(PinnedPeers::new([b_fp])),
        LinkProfile::default(),
    )
    .expect("bind");
    let conn = link.connect(b_addr, b_fp).await.expect("connect");
    let (mut w, mut r) = conn.open_stream().await.expect("stream");
    let id = 0x5eed;
    let position = GroupPosition {
        group_id: id,
        generation: 1,
        last_seq: Seq(0),
        chain: genesis_chain(id),
        durable_seq: Seq(0),
        generations: vec![tidemark_journal::GenerationStart { generation: 1, first_seq: Seq(1) }],
    };
    w.send(&Message::Hello { protocol: tidemark_repl::PROTOCOL_VERSION, site: "evil".into() }.encode())
        .await
        .expect("hello");
    let offer = Message::Offer {
        position,
        first_seq: Seq(1),
        name: "g".into(),
        retention_seconds: 3600,
        journal_max_bytes: 1 << 30,
    };
    w.send(&offer.encode()).await.expect("offer");
    let mut got_position = false;
    while let Some(frame) = r.recv().await.expect("recv") {
        if matches!(Message::decode(&frame), Ok(Message::Position(_))) {
            got_position = true;
            break;
        }
    }
    assert!(got_position, "the site answers an offer from a trusted partner with its position");
    let (mut raw, body) =
        (Vec::new(), RecordBody::Write { volume: VolumeId(0), offset: 0, data: vec![7; 4096].into() });
    let meta = RecordMeta { seq: Seq(1), generation: Generation(1), time: UnixNanos(1), durable: Seq(0) };
    record::encode(meta, &body, &ChainHash([0; 32]), &mut raw);
    let mut batch = BatchFrame::build(id, 1, Seq(1), Seq(1), &raw, 1).expect("a whole record");
    batch.payload[3] ^= 0xff;
    w.send(&Message::Batch(batch).encode()).await.expect("batch");
    let mut refused = false;
    while let Ok(Some(frame)) = r.recv().await {
        if let Ok(Message::Refuse { reason, .. }) = Message::decode(&frame) {
            assert!(!reason.is_empty());
            refused = true;
            break;
        }
    }
    assert!(refused, "the corrupted batch is refused");
    wait_until("the rejection event", || {
        std::fs::read_to_string(db.path().join("events.jsonl"))
            .unwrap_or_default()
            .contains("replication.rejected")
    })
    .await;
    assert_eq!(engine.group_handle("g").expect("group").position().last_seq, Seq(0), "nothing was applied");
    // The site still accepts partners.
    let conn2 = link.connect(b_addr, b_fp).await.expect("the site still accepts");
    conn2.close("done");
    site.shutdown().await;
}

/// Every byte a limited session puts on the wire goes through the partner's bandwidth limit.
/// (The rate itself is the token bucket's, tested without clocks in tidemark-repl; no timing is
/// asserted here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_session_sends_every_batch_through_the_limit() {
    let (da, db) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let p = open(da.path());
    let s = open(db.path());
    p.create_group("db", GroupOptions::default()).expect("group");
    p.create_volume("db", "data", 4 << 20, 4096).expect("volume");
    let v = p.open_export("data").expect("export");
    for i in 0..16u64 {
        v.write(
            i * 65536,
            &tidemark_journal::record::payload_hash(&i.to_le_bytes()).repeat(2048),
            Durability::Buffered,
        )
        .expect("write");
    }
    let stats = Arc::new(ReplStats::new(tidemark_journal::Seq(0)));
    let rstats = Arc::new(ReplStats::new(tidemark_journal::Seq(0)));
    let limiter = Arc::new(parking_lot::Mutex::new(Limiter::new(1000)));
    let pair = connect_limited(&p, &s, &stats, &rstats, Some(limiter.clone()));
    let group = p.group_handle("db").expect("group");
    wait_until("everything acked", || stats.acked_seq.load(Ordering::Acquire) == group.position().last_seq.0)
        .await;
    assert_eq!(limiter.lock().taken_bytes_total(), stats.bytes_sent_compressed_total.load(Ordering::Relaxed));
    assert!(limiter.lock().taken_bytes_total() > 0);
    pair.stop.send(true).expect("stop");
    let _ = pair.primary.await;
}

fn fresh_stats() -> Arc<ReplStats> {
    Arc::new(ReplStats::new(tidemark_journal::Seq(0)))
}

fn same_volume(x: &Arc<Engine>, y: &Arc<Engine>, bytes: usize) {
    let (mut a, mut b) = (vec![0u8; bytes], vec![0u8; bytes]);
    x.open_export("data").expect("export").read(0, &mut a).expect("read");
    y.open_export("data").expect("export").read(0, &mut b).expect("read");
    assert!(a == b, "the volumes differ");
}

/// A primary `p` with `db`/`data` replicated to `s`, all acked.
async fn replicated_pair(da: &std::path::Path, db: &std::path::Path) -> (Arc<Engine>, Arc<Engine>) {
    let p = open(da);
    let s = open(db);
    p.create_group("db", GroupOptions::default()).expect("group");
    p.create_volume("db", "data", 4 << 20, 4096).expect("volume");
    let v = p.open_export("data").expect("export");
    for i in 0..16u64 {
        v.write(i * 65536, &vec![i as u8 + 1; 65536], Durability::Buffered).expect("write");
    }
    let stats = fresh_stats();
    let pair = connect(&p, &s, &stats, &fresh_stats());
    let group = p.group_handle("db").expect("group");
    wait_until("everything acked", || stats.acked_seq.load(Ordering::Acquire) == group.position().last_seq.0)
        .await;
    pair.stop.send(true).expect("stop");
    let _ = pair.primary.await;
    pair.secondary.abort();
    let _ = pair.secondary.await;
    (p, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_asked_at_either_site_reverses_roles_with_nothing_lost_or_resent() {
    for asked_at_secondary in [false, true] {
        let (da, db) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
        let (p, s) = replicated_pair(da.path(), db.path()).await;
        let v = p.open_export("data").expect("export");
        v.write(0, &[0xaa; 4096], Durability::Buffered).expect("a write just before the swap");
        let stats = fresh_stats();
        let pair = connect(&p, &s, &stats, &fresh_stats());
        let (tx, rx) = tokio::sync::oneshot::channel();
        if asked_at_secondary {
            wait_until("the secondary session is up", || pair.host.calls.lock().is_some()).await;
            let calls = pair.host.calls.lock().clone().expect("calls");
            calls.send(tx).await.expect("ask the secondary");
        } else {
            pair.swaps.send(tx).await.expect("ask the primary");
        }
        let outcome = rx.await.expect("answered").expect("swapped");
        assert_eq!(outcome.generation, 2);
        assert_eq!(pair.primary.await.expect("join").expect("ok"), SessionEnd::SwappedOut { generation: 2 });
        assert_eq!(pair.secondary.await.expect("join").expect("ok"), SessionEnd::Promoted { generation: 2 });
        assert_eq!(pair.host.changes.lock().clone(), vec!["promoted db a 2".to_string()]);
        assert_eq!(p.group("db").expect("g").role, "secondary");
        assert_eq!(s.group("db").expect("g").role, "primary");
        same_volume(&p, &s, 4 << 20);
        assert!(v.write(0, &[1; 4096], Durability::Fua).is_err(), "the old primary refuses host writes");

        // Replication reverses: the new primary sends only what it writes from now on.
        s.open_export("data").expect("export").write(8192, &[0xbb; 4096], Durability::Fua).expect("write");
        let back = fresh_stats();
        let pair = connect(&s, &p, &back, &fresh_stats());
        let group = s.group_handle("db").expect("group");
        wait_until("reverse acked", || back.acked_seq.load(Ordering::Acquire) == group.position().last_seq.0)
            .await;
        assert!(back.bytes_sent_total.load(Ordering::Relaxed) < 64 << 10, "no resync after a swap");
        same_volume(&p, &s, 4 << 20);
        pair.stop.send(true).expect("stop");
        let _ = pair.primary.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_primary_is_fenced_then_fails_back_keeping_its_tail_aside() {
    let (da, db) = (tempfile::tempdir().expect("a"), tempfile::tempdir().expect("b"));
    let (p, s) = replicated_pair(da.path(), db.path()).await;
    // The primary writes a tail that never leaves it, then "is lost"; the secondary takes over.
    let v = p.open_export("data").expect("export");
    v.write(65536, &[0xee; 8192], Durability::Fua).expect("tail write");
    let fork = s.takeover("db", None, "test").expect("takeover");
    let w = s.open_export("data").expect("export");
    w.write(3 * 65536, &[0x33; 65536], Durability::Fua).expect("write on the new primary");

    // The old primary dials its old partner: it learns of generation 2 and is fenced.
    let stats = fresh_stats();
    let pair = connect(&p, &s, &stats, &fresh_stats());
    let err = pair.primary.await.expect("join").expect_err("fenced");
    assert!(matches!(err, SessionError::Fenced(_)), "{err}");
    assert_eq!(stats.fenced_by.load(Ordering::Acquire), 2);
    assert!(pair.secondary.await.expect("join").is_err());

    // The new primary dials the old one: it demotes, keeps its tail as a salvage image, rewinds,
    // and receives only what was written since the fork.
    let back = fresh_stats();
    let pair = connect(&s, &p, &back, &fresh_stats());
    let group = s.group_handle("db").expect("group");
    wait_until("failback acked", || back.acked_seq.load(Ordering::Acquire) == group.position().last_seq.0)
        .await;
    assert_eq!(pair.host.changes.lock().clone(), vec!["demoted db a 2".to_string()]);
    let sent = back.bytes_sent_total.load(Ordering::Relaxed);
    assert!(sent < 65536 + 4096, "only the writes since the fork were sent ({sent} bytes)");
    same_volume(&p, &s, 4 << 20);
    let salvage = p.images().into_iter().find(|i| i.name.contains("salvage")).expect("a salvage image");
    assert_eq!(salvage.salvage.as_ref().map(|i| i.fork_seq), Some(fork.seq.0));
    let mut tail = vec![0u8; 8192];
    p.open_export(&format!("{}/data", salvage.name)).expect("export").read(65536, &mut tail).expect("read");
    assert_eq!(tail, vec![0xee; 8192], "the tail's writes are in the salvage image");
    assert!(v.write(0, &[1; 4096], Durability::Fua).is_err(), "the old primary refuses host writes");
    pair.stop.send(true).expect("stop");
    let _ = pair.primary.await;
}
