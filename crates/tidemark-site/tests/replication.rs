//! Two engines joined by replication sessions over in-memory channels.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_engine::{Durability, Engine, EngineConfig, GroupOptions, NullEvents, SystemClock};
use tidemark_site::replication::session::{
    run_primary, run_secondary, Channel, Limiter, PrimaryContext, ReplStats, SessionConfig,
};
use tokio::sync::watch;

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
    primary: tokio::task::JoinHandle<Result<(), tidemark_site::replication::session::SessionError>>,
    secondary: tokio::task::JoinHandle<Result<(), tidemark_site::replication::session::SessionError>>,
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
    let (a, b) = Channel::pair(64);
    let (stop, stop_rx) = watch::channel(false);
    let group = p.group_handle("db").expect("group");
    let context = PrimaryContext {
        site: "a".into(),
        stats: stats.clone(),
        config: SessionConfig::default(),
        hold: |_| {},
        limiter,
    };
    let primary = tokio::spawn(run_primary(group, a, context, stop_rx));
    let rs = rstats.clone();
    let secondary = tokio::spawn(run_secondary(s.clone(), "b".into(), b, move |_| rs.clone()));
    Pair { stop, primary, secondary }
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
    let mut batch = BatchFrame::build(id, 1, Seq(1), Seq(1), &[0u8; 200], 1);
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
