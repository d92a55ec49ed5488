//! Black-box tests of the link over loopback: two sites with their own identities, pinned trust,
//! framed streams in both directions, refusals, and a throughput sanity run.
#![allow(clippy::indexing_slicing)] // Tests index freely; the lint guards the library code.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tidemark_link::{
    Connection, Fingerprint, FrameReader, FrameWriter, Identity, Link, LinkError, LinkProfile, LinkStats,
    PinnedPeers,
};

/// A site for the tests: its identity (kept in a temporary directory), its trust store and its
/// bound link.
struct Site {
    identity: Identity,
    pins: Arc<PinnedPeers>,
    link: Link,
    _dir: TempDir,
}

impl Site {
    fn new(name: &str) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::load_or_create(dir.path(), name).expect("identity");
        let pins = Arc::new(PinnedPeers::default());
        let link = Link::bind(loopback(), &identity, pins.clone(), LinkProfile::default()).expect("bind");
        Site { identity, pins, link, _dir: dir }
    }

    fn fingerprint(&self) -> Fingerprint {
        self.identity.fingerprint()
    }

    fn addr(&self) -> SocketAddr {
        self.link.local_addr()
    }

    fn trust(&self, other: &Site) {
        self.pins.add(other.fingerprint());
    }
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Connects `client` to `server` and returns both ends.
async fn connect(client: &Site, server: &Site) -> (Connection, Connection) {
    let (dialled, accepted) =
        tokio::join!(client.link.connect(server.addr(), server.fingerprint()), server.link.accept());
    (dialled.expect("connect"), accepted.expect("the link is open"))
}

/// Waits until `link`'s stats satisfy `condition`, failing after a deadline.
async fn wait_for_stats(link: &Link, condition: impl Fn(&LinkStats) -> bool) -> LinkStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stats = link.stats();
        if condition(&stats) {
            return stats;
        }
        assert!(Instant::now() < deadline, "stats never matched: {stats:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Frame `index` of a sequence tagged `tag`: sizes vary from 0 bytes to about 200 KiB, and
/// the content depends on tag, index and position, so any mix-up shows.
fn frame(tag: u8, index: usize) -> Vec<u8> {
    let length = match index % 10 {
        0 => 0,
        1 => 1,
        2 => 4,
        _ => (index * 7919) % (200 * 1024),
    };
    (0..length).map(|position| (position as u8) ^ (index as u8).wrapping_mul(31) ^ tag).collect()
}

const FRAMES: usize = 1000;

async fn send_all(mut writer: FrameWriter, tag: u8, big: &[u8]) {
    for index in 0..FRAMES {
        writer.send(&frame(tag, index)).await.expect("send");
    }
    writer.send(big).await.expect("send big frame");
    writer.finish().await.expect("finish");
}

async fn receive_all(mut reader: FrameReader, tag: u8, big: &[u8]) {
    for index in 0..FRAMES {
        let received = reader.recv().await.expect("recv").expect("a frame");
        assert!(received == frame(tag, index), "frame {index} differs");
    }
    let received = reader.recv().await.expect("recv big").expect("the big frame");
    assert_eq!(received.len(), big.len());
    assert!(received == big, "the 32 MiB frame differs");
    assert_eq!(reader.recv().await.expect("clean end"), None);
}

fn big_frame(seed: u8) -> Vec<u8> {
    (0..32 * 1024 * 1024usize).map(|i| (i as u8).wrapping_mul(13) ^ seed ^ (i >> 16) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_round_trip_both_ways() {
    let a = Site::new("site-a");
    let b = Site::new("site-b");
    a.trust(&b);
    b.trust(&a);
    let (at_a, at_b) = connect(&a, &b).await;
    assert_eq!(at_a.peer(), b.fingerprint());
    assert_eq!(at_b.peer(), a.fingerprint());
    assert_eq!(at_a.remote_addr(), b.addr());

    let big_a = Arc::new(big_frame(0xa));
    let big_b = Arc::new(big_frame(0xb));
    let (writer_a, reader_a) = at_a.open_stream().await.expect("open");
    // The stream reaches b with a's first frame, so a starts sending before b accepts.
    let a_sends = tokio::spawn({
        let big = big_a.clone();
        async move { send_all(writer_a, 0xa, &big).await }
    });
    let (writer_b, reader_b) = at_b.accept_stream().await.expect("accept stream");
    let b_sends = tokio::spawn({
        let big = big_b.clone();
        async move { send_all(writer_b, 0xb, &big).await }
    });
    let b_receives = tokio::spawn({
        let big = big_a.clone();
        async move { receive_all(reader_b, 0xa, &big).await }
    });
    receive_all(reader_a, 0xb, &big_b).await;
    for task in [a_sends, b_sends, b_receives] {
        tokio::time::timeout(Duration::from_secs(120), task).await.expect("transfer finishes").expect("task");
    }

    let stats = at_a.stats();
    let payload = 32 * 1024 * 1024;
    assert!(stats.bytes_sent > payload, "{stats:?}");
    assert!(stats.bytes_received > payload, "{stats:?}");
    assert!(at_a.rtt() < Duration::from_secs(1));
    assert_eq!(b.link.stats().connections_accepted, 1);

    // b can dial a as well, over the same links.
    let (at_b_again, at_a_again) = connect(&b, &a).await;
    assert_eq!(at_b_again.peer(), a.fingerprint());
    assert_eq!(at_a_again.peer(), b.fingerprint());

    // An orderly close reaches the partner with its reason.
    at_a.close("done");
    let reason = at_b.closed().await;
    assert!(matches!(reason, LinkError::ConnectionLost { .. }), "{reason}");
    assert!(reason.to_string().contains("done"), "{reason}");
}

#[tokio::test]
async fn wrong_server_fingerprint_is_refused() {
    let a = Site::new("site-a");
    let b = Site::new("site-b");
    let impostor = Site::new("site-c");
    b.trust(&a);
    let err = a.link.connect(b.addr(), impostor.fingerprint()).await.expect_err("b is not the pinned site");
    match &err {
        LinkError::FingerprintMismatch { addr, expected, actual } => {
            assert_eq!(*addr, b.addr());
            assert_eq!(*expected, impostor.fingerprint());
            assert_eq!(*actual, b.fingerprint());
        }
        other => panic!("expected FingerprintMismatch, got {other}"),
    }
    let message = err.to_string();
    assert!(message.contains(&b.fingerprint().to_string()), "{message}");
    assert!(message.contains(&impostor.fingerprint().to_string()), "{message}");
    // The server sees the client abort its handshake.
    let stats = wait_for_stats(&b.link, |s| s.refused_handshake_failed == 1).await;
    assert_eq!(stats.connections_accepted, 0);

    // With the right pin the same link connects.
    let (at_a, _at_b) = connect(&a, &b).await;
    assert_eq!(at_a.peer(), b.fingerprint());
}

#[tokio::test]
async fn untrusted_client_is_refused_and_counted() {
    let a = Site::new("site-a");
    let b = Site::new("site-b");
    let stranger = Site::new("stranger");
    b.trust(&a);

    let err =
        stranger.link.connect(b.addr(), b.fingerprint()).await.expect_err("b does not trust the stranger");
    match &err {
        LinkError::RefusedByPeer { peer } => {
            assert_eq!(peer.fingerprint, b.fingerprint());
            assert_eq!(peer.addr, b.addr());
        }
        other => panic!("expected RefusedByPeer, got {other}"),
    }
    assert!(err.to_string().contains("refused"), "{err}");
    let stats = wait_for_stats(&b.link, |s| s.refused_untrusted == 1).await;
    assert_eq!(stats.connections_accepted, 0);
    assert_eq!(stats.refused_handshake_failed, 0);

    // b keeps accepting trusted partners afterwards.
    let (_at_a, at_b) = connect(&a, &b).await;
    assert_eq!(at_b.peer(), a.fingerprint());
    assert_eq!(b.link.stats().connections_accepted, 1);

    // Trust changes at run time: added, the stranger gets in; removed, it is refused again.
    b.trust(&stranger);
    let (_at_stranger, at_b) = connect(&stranger, &b).await;
    assert_eq!(at_b.peer(), stranger.fingerprint());
    b.pins.remove(&stranger.fingerprint());
    let err = stranger.link.connect(b.addr(), b.fingerprint()).await.expect_err("trust was removed");
    assert!(matches!(err, LinkError::RefusedByPeer { .. }), "{err}");
    wait_for_stats(&b.link, |s| s.refused_untrusted == 2).await;
    assert_eq!(b.link.stats().connections_accepted, 2);
}

#[tokio::test]
async fn unreachable_or_closed_links_fail_cleanly() {
    let a = Site::new("site-a");
    let b = Site::new("site-b");
    a.trust(&b);
    b.trust(&a);
    let (at_a, _at_b) = connect(&a, &b).await;

    b.link.close();
    assert!(b.link.accept().await.is_none(), "accept ends once closed");
    let err = at_a.closed().await;
    assert!(matches!(err, LinkError::ConnectionLost { .. }), "{err}");
    assert!(at_a.open_stream().await.is_err());

    let err = b.link.connect(a.addr(), a.fingerprint()).await.expect_err("a closed link cannot dial");
    assert!(matches!(err, LinkError::Connect { .. }), "{err}");
}

#[test]
fn identity_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Identity::load_or_create(dir.path(), "site-a").expect("create");
    let again = Identity::load_or_create(dir.path(), "site-a").expect("reload");
    assert_eq!(first.fingerprint(), again.fingerprint());
    let text = first.fingerprint().to_string();
    assert_eq!(text.parse::<Fingerprint>().expect("parse"), first.fingerprint());
}

/// Prints loopback throughput for one stream; a sanity run, never a timed assertion.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_throughput() {
    const TOTAL_BYTES: usize = 256 * 1024 * 1024;
    const FRAME_BYTES: usize = 1024 * 1024;
    let a = Site::new("site-a");
    let b = Site::new("site-b");
    a.trust(&b);
    b.trust(&a);
    let (at_a, at_b) = connect(&a, &b).await;
    let windows = a.link.windows();
    let buffers = a.link.socket_buffers();

    let started = Instant::now();
    let (mut writer, _) = at_a.open_stream().await.expect("open");
    let sender = tokio::spawn(async move {
        let frame = vec![0x5au8; FRAME_BYTES];
        for _ in 0..TOTAL_BYTES / FRAME_BYTES {
            writer.send(&frame).await.expect("send");
        }
        writer.finish().await.expect("finish");
    });
    let (_, mut reader) = at_b.accept_stream().await.expect("accept");
    let mut received = 0usize;
    while let Some(frame) = reader.recv().await.expect("recv") {
        received += frame.len();
    }
    sender.await.expect("sender");
    let elapsed = started.elapsed();
    assert_eq!(received, TOTAL_BYTES);
    let stats = at_a.stats();
    println!(
        "loopback: {} MiB in {:.2} s = {:.0} MB/s (lost packets {}, stream window {} B, \
         connection window {} B, socket buffers requested {} B, granted rcv {} B / snd {} B)",
        TOTAL_BYTES >> 20,
        elapsed.as_secs_f64(),
        TOTAL_BYTES as f64 / elapsed.as_secs_f64() / 1e6,
        stats.lost_packets,
        windows.stream_receive_window_bytes,
        windows.connection_receive_window_bytes,
        buffers.requested_bytes,
        buffers.receive_bytes,
        buffers.send_bytes,
    );
}
