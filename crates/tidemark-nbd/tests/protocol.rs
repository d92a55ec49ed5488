//! Black-box tests of the NBD server with a raw client: handshake options, every command's
//! round trip, concurrency and ordering, disconnect and shutdown.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tidemark_nbd::{Export, ExportError, NbdServer, ServerConfig};

const WRITABLE_FLAGS: u16 = NBD_FLAG_HAS_FLAGS
    | NBD_FLAG_SEND_FLUSH
    | NBD_FLAG_SEND_FUA
    | NBD_FLAG_SEND_TRIM
    | NBD_FLAG_SEND_WRITE_ZEROES
    | NBD_FLAG_SEND_DF
    | NBD_FLAG_CAN_MULTI_CONN
    | NBD_FLAG_SEND_CACHE
    | NBD_FLAG_SEND_FAST_ZERO;

fn pattern(length: usize, seed: u8) -> Vec<u8> {
    (0..length).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

#[tokio::test]
async fn go_describes_the_export_and_its_flags() {
    let server = TestServer::standard().await;
    let (client, details) = Client::negotiate(server.addr, "disk").await;
    assert_eq!(details.size_bytes, DISK_BYTES);
    assert_eq!(details.flags, WRITABLE_FLAGS);
    assert_eq!(details.name.as_deref(), Some("disk"));
    assert_eq!(details.description.as_deref(), Some("memory export disk"));
    assert_eq!(details.block_size, Some((1, 4096, 32 << 20)));
    assert!(details.allocation_context.is_some());
    client.disconnect().await;

    let (client, details) = Client::negotiate(server.addr, "image").await;
    assert_eq!(
        details.flags,
        NBD_FLAG_HAS_FLAGS
            | NBD_FLAG_READ_ONLY
            | NBD_FLAG_SEND_FLUSH
            | NBD_FLAG_SEND_FUA
            | NBD_FLAG_SEND_DF
            | NBD_FLAG_CAN_MULTI_CONN
            | NBD_FLAG_SEND_CACHE,
        "a read-only export offers no trim or zeroes"
    );
    client.disconnect().await;

    // Without structured replies, DF is not offered; block size comes even unrequested.
    let (client, details) = Client::negotiate_simple(server.addr, "disk").await;
    assert_eq!(details.flags, WRITABLE_FLAGS & !NBD_FLAG_SEND_DF);
    assert_eq!(details.block_size, Some((1, 4096, 32 << 20)));
    assert_eq!(details.name, None, "name only when asked for");
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn list_names_every_export_and_info_matches_go() {
    let server = TestServer::standard().await;
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    client.send_option(OPT_LIST, &[]).await;
    let replies = client.option_replies(OPT_LIST).await;
    assert_eq!(replies.len(), 3);
    let mut names = Vec::new();
    for reply in &replies[..2] {
        assert_eq!(reply.kind, REP_SERVER);
        let name_bytes = u32::from_be_bytes(reply.data[..4].try_into().unwrap()) as usize;
        let name = std::str::from_utf8(&reply.data[4..4 + name_bytes]).unwrap();
        let description = std::str::from_utf8(&reply.data[4 + name_bytes..]).unwrap();
        assert_eq!(description, format!("memory export {name}"));
        names.push(name.to_owned());
    }
    assert_eq!(names, ["disk", "image"]);
    assert_eq!(replies[2].kind, REP_ACK);

    let info = client.info_or_go(OPT_INFO, "image", &[INFO_NAME]).await.unwrap();
    let go = client.go("image", &[INFO_NAME]).await.unwrap();
    assert_eq!(info.flags, go.flags);
    assert_eq!(info.size_bytes, go.size_bytes);
    assert_eq!(go.name.as_deref(), Some("image"));
    let reply = client.read(0, 512).await;
    assert_eq!(reply.error, 0);
    assert_eq!(reply.data(), vec![0; 512]);
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn export_name_sends_zeroes_unless_no_zeroes_was_negotiated() {
    let server = TestServer::standard().await;
    server.provider.export("disk").write(0, b"hello", false).unwrap();

    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    client.send_option(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(client.u64().await, DISK_BYTES);
    assert_eq!(client.u16().await, WRITABLE_FLAGS & !NBD_FLAG_SEND_DF);
    assert_eq!(client.bytes(124).await, vec![0; 124]);
    let reply = client.read(0, 5).await;
    assert!(reply.simple);
    assert_eq!(reply.data(), b"hello");
    client.disconnect().await;

    // With NO_ZEROES the very next bytes after the flags are the reply to the first request.
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    client.send_option(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(client.u64().await, DISK_BYTES);
    client.u16().await;
    let reply = client.read(0, 5).await;
    assert_eq!(reply.data(), b"hello");
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn abort_is_acknowledged_and_the_connection_closed() {
    let server = TestServer::standard().await;
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    // The spec asks servers to ignore data sent with NBD_OPT_ABORT.
    client.send_option(OPT_ABORT, b"ignored").await;
    let reply = client.option_reply().await;
    assert_eq!((reply.option, reply.kind), (OPT_ABORT, REP_ACK));
    client.expect_closed().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn metadata_contexts_offer_exactly_base_allocation() {
    let server = TestServer::standard().await;
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let contexts = |replies: &[OptionReply]| -> Vec<(u32, String)> {
        assert_eq!(replies.last().unwrap().kind, REP_ACK);
        replies[..replies.len() - 1]
            .iter()
            .map(|reply| {
                assert_eq!(reply.kind, REP_META_CONTEXT);
                (
                    u32::from_be_bytes(reply.data[..4].try_into().unwrap()),
                    String::from_utf8(reply.data[4..].to_vec()).unwrap(),
                )
            })
            .collect()
    };
    let allocation = vec![(0, "base:allocation".to_owned())];
    assert_eq!(client.structured_reply().await.kind, REP_ACK);
    let replies = client.meta_context(OPT_LIST_META_CONTEXT, "disk", &[]).await;
    assert_eq!(contexts(&replies), allocation, "no query lists everything");
    let replies = client.meta_context(OPT_LIST_META_CONTEXT, "disk", &["base:"]).await;
    assert_eq!(contexts(&replies), allocation, "base: is a wildcard when listing");
    let replies =
        client.meta_context(OPT_LIST_META_CONTEXT, "disk", &["qemu:dirty-bitmap:x", "base:nope"]).await;
    assert_eq!(contexts(&replies), vec![], "unknown contexts are ignored");

    let replies = client.meta_context(OPT_SET_META_CONTEXT, "disk", &["base:"]).await;
    assert_eq!(contexts(&replies), vec![], "base: selects nothing in SET");
    let replies = client
        .meta_context(OPT_SET_META_CONTEXT, "disk", &["x-foo:bar", "base:allocation", "base:allocation"])
        .await;
    let selected = contexts(&replies);
    assert_eq!(selected.len(), 1);
    assert_eq!(selected[0].1, "base:allocation");
    let replies = client.meta_context(OPT_SET_META_CONTEXT, "nope", &["base:allocation"]).await;
    assert_eq!(replies.last().unwrap().kind, REP_ERR_UNKNOWN);
    client.send_option(OPT_ABORT, &[]).await;
    client.option_reply().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn every_command_round_trips() {
    let server = TestServer::standard().await;
    let disk = server.provider.export("disk");
    let (mut client, details) = Client::negotiate(server.addr, "disk").await;
    let context = details.allocation_context.unwrap();

    // Write and read back, in one 64 KiB request and a few unaligned small ones.
    let data = pattern(65536, 7);
    assert_eq!(client.write(0, &data, 0).await.error, 0);
    let reply = client.read(0, 65536).await;
    assert_eq!(reply.error, 0);
    assert_eq!(reply.chunk_types, vec![REPLY_TYPE_OFFSET_DATA]);
    assert_eq!(reply.chunks[0].0, 0, "chunk offset is absolute");
    assert_eq!(reply.data(), data);
    assert_eq!(client.write(70_001, b"unaligned", 0).await.error, 0);
    let reply = client.call(CMD_FLAG_DF, CMD_READ, 70_000, 11, &[]).await;
    assert_eq!(reply.chunks, vec![(70_000, b"\0unaligned\0".to_vec())]);
    assert_eq!(disk.contents(70_001, 9), b"unaligned");

    // FUA reaches storage; FLUSH reaches storage.
    assert_eq!(disk.fua_calls.load(Ordering::SeqCst), 0);
    assert_eq!(client.write(131_072, &data[..4096], CMD_FLAG_FUA).await.error, 0);
    assert_eq!(disk.fua_calls.load(Ordering::SeqCst), 1);
    assert_eq!(client.call(0, CMD_FLUSH, 0, 0, &[]).await.error, 0);
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 1);

    // Block status: 64 KiB data, hole up to 70 000's block, data, hole, data, hole.
    let reply = client.block_status(0, 196_608, 0).await;
    assert_eq!(reply.error, 0);
    assert_eq!(reply.chunk_types, vec![REPLY_TYPE_BLOCK_STATUS]);
    assert_eq!(reply.extents.len(), 1);
    assert_eq!(reply.extents[0].0, context);
    assert_eq!(
        reply.extents[0].1,
        vec![
            (65536, 0),
            (4096, STATE_HOLE | STATE_ZERO),
            (4096, 0),
            (57344, STATE_HOLE | STATE_ZERO),
            (4096, 0),
            (61440, STATE_HOLE | STATE_ZERO),
        ]
    );
    let reply = client.block_status(4096, 100_000, CMD_FLAG_REQ_ONE).await;
    assert_eq!(reply.extents[0].1, vec![(61440, 0)]);
    let reply = client.block_status(0, 1000, CMD_FLAG_REQ_ONE).await;
    assert_eq!(reply.extents[0].1, vec![(1000, 0)], "REQ_ONE never exceeds the request");

    // TRIM punches whole blocks and reads back as zeroes.
    assert_eq!(client.call(0, CMD_TRIM, 8192, 16384, &[]).await.error, 0);
    assert_eq!(client.read(8192, 16384).await.data(), vec![0; 16384]);
    assert!(!disk.is_allocated(8192));
    let reply = client.block_status(0, 32768, 0).await;
    assert_eq!(reply.extents[0].1, vec![(8192, 0), (16384, STATE_HOLE | STATE_ZERO), (8192, 0)]);

    // WRITE_ZEROES: NO_HOLE keeps the blocks allocated, otherwise they may be punched; both
    // read back as zeroes and FAST_ZERO is accepted.
    let reply = client.call(CMD_FLAG_NO_HOLE | CMD_FLAG_FUA, CMD_WRITE_ZEROES, 32768, 8192, &[]).await;
    assert_eq!(reply.error, 0);
    assert!(disk.is_allocated(32768));
    let reply = client.call(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 40960, 8192, &[]).await;
    assert_eq!(reply.error, 0);
    assert!(!disk.is_allocated(40960));
    assert_eq!(
        *disk.zeroes_calls.lock().unwrap(),
        vec![(32768, 8192, true, false), (40960, 8192, false, true)]
    );
    assert_eq!(client.read(32768, 16384).await.data(), vec![0; 16384]);
    assert_eq!(client.read(49152, 16).await.data(), data[49152..49168]);

    // CACHE checks the range and succeeds.
    assert_eq!(client.call(0, CMD_CACHE, 0, 1 << 20, &[]).await.error, 0);

    // A whole-disk trim leaves one hole.
    let reply = client.call(0, CMD_TRIM, 0, DISK_BYTES as u32, &[]).await;
    assert_eq!(reply.error, 0);
    let reply = client.block_status(0, DISK_BYTES as u32, 0).await;
    assert_eq!(reply.extents[0].1, vec![(DISK_BYTES as u32, STATE_HOLE | STATE_ZERO)]);
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn simple_replies_work_and_a_failed_read_sends_no_payload() {
    let server = TestServer::standard().await;
    let (mut client, _) = Client::negotiate_simple(server.addr, "disk").await;
    let data = pattern(8192, 3);
    let reply = client.write(4096, &data, CMD_FLAG_FUA).await;
    assert!(reply.simple);
    assert_eq!(reply.error, 0);
    let reply = client.read(4096, 8192).await;
    assert!(reply.simple);
    assert_eq!(reply.data(), data);

    // The failed read's reply must be a bare header: if the server sent 4096 payload bytes,
    // the next reply would be misparsed and this test would fail on its magic.
    let reply = client.read(DISK_BYTES - 1024, 4096).await;
    assert_eq!(reply.error, NBD_EINVAL);
    server.provider.export("disk").fail_next.lock().unwrap().replace(ExportError::Io("disk on fire".into()));
    let reply = client.read(0, 4096).await;
    assert_eq!(reply.error, NBD_EIO);
    assert!(reply.chunks.is_empty());
    assert_eq!(client.read(4096, 16).await.data(), data[..16]);
    client.disconnect().await;
    server.stop().await.unwrap();
}

/// Writes the export can do without waiting are done on the connection's task (up to 128 KiB),
/// the rest on the blocking pool; either way the data lands, failures and panics are answered with an error,
/// and the connection goes on.
#[tokio::test]
async fn writes_done_at_once_and_on_the_pool_both_land() {
    let server = TestServer::standard().await;
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    for block in 0..8u64 {
        let reply = client.write(block * 4096, &pattern(4096, block as u8), 0).await;
        assert_eq!(reply.error, 0);
    }
    for block in 0..8u64 {
        assert_eq!(client.read(block * 4096, 4096).await.data(), pattern(4096, block as u8));
    }
    let export = server.provider.export("disk");
    assert_eq!(export.inline_writes.load(Ordering::SeqCst), 4, "the even blocks were written at once");
    // A write with FUA waits for durability: never done at once.
    assert_eq!(client.write(0, &pattern(4096, 9), CMD_FLAG_FUA).await.error, 0);
    assert_eq!(export.inline_writes.load(Ordering::SeqCst), 4);
    assert_eq!(export.fua_calls.load(Ordering::SeqCst), 1);
    // Past 128 KiB a write goes to the pool whatever the export could do.
    assert_eq!(client.write(64 * 4096, &pattern(256 << 10, 5), 0).await.error, 0);
    assert_eq!(export.inline_writes.load(Ordering::SeqCst), 4);
    assert_eq!(client.read(64 * 4096, 256 << 10).await.data(), pattern(256 << 10, 5));

    export.fail_next.lock().unwrap().replace(ExportError::Io("disk on fire".into()));
    assert_eq!(client.write(2 * 4096, &pattern(4096, 7), 0).await.error, NBD_EIO);
    assert_eq!(
        client.read(2 * 4096, 4096).await.data(),
        pattern(4096, 2),
        "the failed write changed nothing"
    );
    client.disconnect().await;
    server.stop().await.unwrap();

    let provider =
        MemProvider::default().with(MemExport::new("disk", DISK_BYTES, false).with_panic_at(4 * 4096));
    let server = TestServer::start(provider, ServerConfig::default()).await;
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    assert_eq!(client.write(4 * 4096, &pattern(4096, 1), 0).await.error, NBD_EIO);
    assert_eq!(client.write(6 * 4096, &pattern(4096, 1), 0).await.error, 0);
    assert_eq!(client.read(6 * 4096, 4096).await.data(), pattern(4096, 1));
    client.disconnect().await;
    server.stop().await.unwrap();
}

/// Reads the export can do without waiting are done on the connection's task (up to 128 KiB),
/// the rest on the blocking pool; either way the data is right, failures and panics are
/// answered with an error, and the connection goes on.
#[tokio::test]
async fn reads_done_at_once_and_on_the_pool_both_return_the_data() {
    let provider =
        MemProvider::default().with(MemExport::new("disk", DISK_BYTES, false).with_panic_at(10 * 4096));
    let server = TestServer::start(provider, ServerConfig::default()).await;
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    for block in 0..8u64 {
        assert_eq!(client.write(block * 4096, &pattern(4096, block as u8), CMD_FLAG_FUA).await.error, 0);
    }
    for block in 0..8u64 {
        assert_eq!(client.read(block * 4096, 4096).await.data(), pattern(4096, block as u8));
    }
    let export = server.provider.export("disk");
    assert_eq!(export.inline_reads.load(Ordering::SeqCst), 4, "the even blocks were read at once");
    let both = [pattern(4096, 0), pattern(4096, 1)].concat();
    assert_eq!(client.read(0, 8192).await.data(), both);
    assert_eq!(export.inline_reads.load(Ordering::SeqCst), 5);
    // Past 128 KiB a read goes to the pool whatever the export could do.
    let large = client.read(0, 256 << 10).await.data();
    assert_eq!(large.get(..8192), Some(&both[..]));
    assert_eq!(export.inline_reads.load(Ordering::SeqCst), 5);

    export.fail_next.lock().unwrap().replace(ExportError::Io("disk on fire".into()));
    assert_eq!(client.read(2 * 4096, 4096).await.error, NBD_EIO);
    assert_eq!(client.read(10 * 4096, 4096).await.error, NBD_EIO, "a panic is an error");
    assert_eq!(client.read(2 * 4096, 4096).await.data(), pattern(4096, 2), "the connection goes on");
    assert_eq!(export.inline_reads.load(Ordering::SeqCst), 6);
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn zero_length_requests_succeed_without_touching_storage() {
    let server = TestServer::standard().await;
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    let reply = client.read(DISK_BYTES, 0).await;
    assert_eq!(reply.error, 0);
    assert_eq!(reply.chunk_types, vec![REPLY_TYPE_NONE]);
    assert_eq!(client.write(100, &[], 0).await.error, 0);
    assert_eq!(client.call(0, CMD_TRIM, 0, 0, &[]).await.error, 0);
    assert_eq!(client.call(0, CMD_WRITE_ZEROES, 0, 0, &[]).await.error, 0);
    assert_eq!(client.call(0, CMD_CACHE, 0, 0, &[]).await.error, 0);
    // A zero-length block status has no valid answer.
    assert_eq!(client.block_status(0, 0, 0).await.error, NBD_EINVAL);
    assert!(server.provider.export("disk").zeroes_calls.lock().unwrap().is_empty());
    client.disconnect().await;

    let (mut client, _) = Client::negotiate_simple(server.addr, "disk").await;
    let reply = client.read(0, 0).await;
    assert_eq!((reply.simple, reply.error), (true, 0));
    assert!(reply.data().is_empty());
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn requests_run_concurrently_and_replies_come_back_out_of_order() {
    const GATED: u64 = 1 << 20;
    let provider = MemProvider::default().with(MemExport::new("disk", DISK_BYTES, false).with_gate_at(GATED));
    let server = TestServer::start(provider, ServerConfig::default()).await;
    let disk = server.provider.export("disk");
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;

    // The first read is held in storage until the test opens the gate, which it only does
    // after the later requests have been answered: a server that ran requests one at a time
    // would never answer them, and the test would time out.
    let held = client.request(0, CMD_READ, GATED, 4096, &[]).await;
    disk.gate.wait_for_waiting(1).await;
    let data = pattern(4096, 9);
    let write = client.request(0, CMD_WRITE, 0, 4096, &data).await;
    let read = client.request(0, CMD_READ, 8192, 4096, &[]).await;
    let flush = client.request(0, CMD_FLUSH, 0, 0, &[]).await;
    let mut early = Vec::new();
    for _ in 0..3 {
        let reply = client.reply().await;
        assert_eq!(reply.error, 0);
        early.push(reply.cookie);
    }
    early.sort();
    assert_eq!(early, vec![write, read, flush]);
    disk.gate.open();
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (held, 0));
    assert_eq!(reply.data(), vec![0; 4096]);
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_full_connection_stops_reading_until_a_reply_goes_out() {
    const GATED: u64 = 1 << 20;
    let provider = MemProvider::default().with(MemExport::new("disk", DISK_BYTES, false).with_gate_at(GATED));
    let config = ServerConfig { inflight_requests_max: 2, ..ServerConfig::default() };
    let server = TestServer::start(provider, config).await;
    let disk = server.provider.export("disk");
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    let first = client.request(0, CMD_READ, GATED, 512, &[]).await;
    let second = client.request(0, CMD_READ, GATED, 512, &[]).await;
    disk.gate.wait_for_waiting(2).await;
    // Both slots are held in storage, so this write must wait unread in the socket.
    let write = client.request(0, CMD_WRITE, 0, 4, b"late").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.server.stats().write.ops_total.load(Ordering::SeqCst), 0);
    assert_eq!(disk.contents(0, 4), vec![0; 4], "the write was not executed yet");
    disk.gate.open();
    let order: Vec<u64> =
        [client.reply().await.cookie, client.reply().await.cookie, client.reply().await.cookie].into();
    assert_ne!(order[0], write, "the write only ran after a read freed its slot");
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, vec![first, second, write]);
    assert_eq!(disk.contents(0, 4), b"late");
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn disconnect_finishes_in_flight_requests_before_closing() {
    const GATED: u64 = 1 << 20;
    let provider = MemProvider::default().with(MemExport::new("disk", DISK_BYTES, false).with_gate_at(GATED));
    let server = TestServer::start(provider, ServerConfig::default()).await;
    let disk = server.provider.export("disk");
    disk.write(GATED, b"still here", false).unwrap();
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    let held = client.request(0, CMD_READ, GATED, 10, &[]).await;
    disk.gate.wait_for_waiting(1).await;
    client.request(0, CMD_DISC, 0, 0, &[]).await;
    disk.gate.open();
    let reply = client.reply().await;
    assert_eq!(reply.cookie, held);
    assert_eq!(reply.data(), b"still here");
    client.expect_closed().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_lets_in_flight_requests_finish_then_returns() {
    const GATED: u64 = 1 << 20;
    let provider = MemProvider::default().with(MemExport::new("disk", DISK_BYTES, false).with_gate_at(GATED));
    let mut server = TestServer::start(provider, ServerConfig::default()).await;
    let disk = server.provider.export("disk");
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    let (mut idle, _) = Client::negotiate(server.addr, "disk").await;
    let mut haggling = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let held = client.request(0, CMD_READ, GATED, 4096, &[]).await;
    disk.gate.wait_for_waiting(1).await;

    server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!server.is_finished(), "serve waits for the in-flight read");
    // Idle connections, in either phase, are closed at once.
    idle.expect_closed().await;
    haggling.expect_closed().await;
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err(), "no longer accepting");

    disk.gate.open();
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (held, 0));
    client.expect_closed().await;
    server.stop().await.unwrap();
}

// Regression: a client that stopped in the middle of a write payload (or of a request header)
// used to keep `serve` from returning after shutdown, because payload reads had no bound.
#[tokio::test]
async fn a_client_stalled_mid_message_does_not_hold_up_shutdown() {
    let server = TestServer::standard().await;
    let (mut mid_payload, _) = Client::negotiate(server.addr, "disk").await;
    let mut message = REQUEST_MAGIC.to_be_bytes().to_vec();
    message.extend_from_slice(&0u16.to_be_bytes());
    message.extend_from_slice(&CMD_WRITE.to_be_bytes());
    message.extend_from_slice(&1u64.to_be_bytes());
    message.extend_from_slice(&0u64.to_be_bytes());
    message.extend_from_slice(&4096u32.to_be_bytes());
    message.extend_from_slice(&[0xee; 100]);
    mid_payload.send(&message).await;
    let (mut mid_header, _) = Client::negotiate(server.addr, "disk").await;
    mid_header.send(&REQUEST_MAGIC.to_be_bytes()).await;
    // Whether or not the server has read these partial messages yet when the stop comes,
    // `serve` must return and close both connections.
    server.stop().await.unwrap();
    mid_payload.expect_closed().await;
    mid_header.expect_closed().await;
}

#[tokio::test]
async fn serve_connection_runs_over_any_stream() {
    let provider = Arc::new(standard_provider());
    let server = Arc::new(NbdServer::new(provider.clone(), ServerConfig::default()));
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let connection = tokio::spawn(Arc::clone(&server).serve_connection(server_end));
    let mut client = Client::over(Box::new(client_end)).await;
    client.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).await;
    assert_eq!(client.structured_reply().await.kind, REP_ACK);
    client.go("disk", &[]).await.unwrap();
    let data = pattern(100_000, 1);
    assert_eq!(client.write(12345, &data, 0).await.error, 0);
    assert_eq!(client.read(12345, 100_000).await.data(), data);
    assert_eq!(server.stats().connections_active.load(Ordering::SeqCst), 1);
    client.disconnect().await;
    within("serve_connection to return", connection).await.unwrap().unwrap();
    assert_eq!(server.stats().connections_active.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn storage_errors_map_to_nbd_errors() {
    let server = TestServer::standard().await;
    let disk = server.provider.export("disk");
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    let out_of_range = || ExportError::OutOfRange { offset: 0, length: 1, size_bytes: 0 };
    let cases = [
        (ExportError::ReadOnly, CMD_WRITE, NBD_EPERM),
        (out_of_range(), CMD_WRITE, NBD_ENOSPC),
        (out_of_range(), CMD_WRITE_ZEROES, NBD_ENOSPC),
        (out_of_range(), CMD_READ, NBD_EINVAL),
        (out_of_range(), CMD_TRIM, NBD_EINVAL),
        (ExportError::NoSpace("journal full".into()), CMD_WRITE, NBD_ENOSPC),
        (ExportError::ShuttingDown, CMD_FLUSH, NBD_ESHUTDOWN),
        (ExportError::Io("segment 7 checksum".into()), CMD_BLOCK_STATUS, NBD_EIO),
        (ExportError::Io("segment 7 checksum".into()), CMD_READ, NBD_EIO),
    ];
    for (error, kind, expected) in cases {
        disk.fail_next.lock().unwrap().replace(error);
        let payload = if kind == CMD_WRITE { vec![1u8; 512] } else { vec![] };
        let reply = client.call(0, kind, 0, 512, &payload).await;
        assert_eq!(reply.error, expected, "command {kind}");
        assert_eq!(reply.chunk_types, vec![REPLY_TYPE_ERROR]);
        assert!(!reply.error_message.is_empty());
        assert!(!reply.error_message.contains("segment 7"), "storage details stay in the server log");
    }
    let stats = server.server.stats();
    assert_eq!(stats.write.errors_total.load(Ordering::SeqCst), 3);
    assert_eq!(stats.read.errors_total.load(Ordering::SeqCst), 2);
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_panicking_export_fails_only_that_request() {
    let provider = MemProvider::default().with(MemExport::new("disk", DISK_BYTES, false).with_panic_at(8192));
    let server = TestServer::start(provider, ServerConfig::default()).await;
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    let reply = client.read(8192, 512).await;
    assert_eq!(reply.error, NBD_EIO);
    assert_eq!(client.read(0, 512).await.error, 0);
    client.disconnect().await;
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn stats_count_operations_bytes_and_connections() {
    let server = TestServer::standard().await;
    let nbd = Arc::clone(&server.server);
    let stats = nbd.stats();
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    client.write(0, &[1; 4096], 0).await;
    client.read(0, 4096).await;
    client.read(0, 1024).await;
    client.read(DISK_BYTES, 1).await;
    client.call(0, CMD_FLUSH, 0, 0, &[]).await;
    client.call(0, 77, 0, 0, &[]).await;
    assert_eq!(stats.connections_active.load(Ordering::SeqCst), 1);
    assert_eq!(stats.write.ops_total.load(Ordering::SeqCst), 1);
    assert_eq!(stats.write.bytes_total.load(Ordering::SeqCst), 4096);
    assert_eq!(stats.read.ops_total.load(Ordering::SeqCst), 3);
    assert_eq!(stats.read.bytes_total.load(Ordering::SeqCst), 5120);
    assert_eq!(stats.read.errors_total.load(Ordering::SeqCst), 1);
    assert!(stats.read.latency_nanoseconds_sum.load(Ordering::SeqCst) > 0);
    assert_eq!(stats.flush.ops_total.load(Ordering::SeqCst), 1);
    assert_eq!(stats.unknown_commands_total.load(Ordering::SeqCst), 1);
    client.disconnect().await;
    server.stop().await.unwrap();
    assert_eq!(stats.connections_active.load(Ordering::SeqCst), 0);
    assert_eq!(stats.connections_accepted_total.load(Ordering::SeqCst), 1);
    assert_eq!(stats.transmissions_failed_total.load(Ordering::SeqCst), 0);
}
