//! Broken and hostile clients: each gets an error reply or loses its own connection, as the
//! spec says, and a second client on the same server still works afterwards.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tidemark_nbd::{ServerConfig, OPTIONS_MAX, OPTION_BYTES_MAX};

#[tokio::test]
async fn wrong_option_magic_closes_the_connection() {
    let server = TestServer::standard().await;
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let mut message = 0x1122_3344_5566_7788u64.to_be_bytes().to_vec();
    message.extend_from_slice(&OPT_LIST.to_be_bytes());
    message.extend_from_slice(&0u32.to_be_bytes());
    client.send(&message).await;
    client.expect_closed().await;
    server.assert_healthy().await;
    assert_eq!(server.server.stats().handshakes_failed_total.load(Ordering::SeqCst), 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn clients_without_fixed_newstyle_or_with_unknown_flags_are_closed() {
    let server = TestServer::standard().await;
    for flags in [0, FLAG_C_NO_ZEROES, FLAG_C_FIXED_NEWSTYLE | 4, 0xffff_ffff] {
        let mut client = Client::start(server.addr, flags).await;
        client.expect_closed().await;
        server.assert_healthy().await;
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_options_get_unsup_and_haggling_continues() {
    let server = TestServer::standard().await;
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    for (option, data) in [
        (99u32, &b"whatever"[..]),
        (OPT_STARTTLS, &b""[..]),
        (OPT_EXTENDED_HEADERS, &b""[..]),
        (4, &b""[..]),
        (u32::MAX, &b"x"[..]),
    ] {
        client.send_option(option, data).await;
        let reply = client.option_reply().await;
        assert_eq!((reply.option, reply.kind), (option, REP_ERR_UNSUP));
    }
    client.go("disk", &[]).await.expect("the connection still works");
    assert_eq!(client.read(0, 16).await.error, 0);
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_options_get_too_big_and_absurd_ones_close() {
    let server = TestServer::standard().await;
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let big = vec![0x55u8; OPTION_BYTES_MAX as usize + 1];
    for option in [OPT_GO, OPT_SET_META_CONTEXT, 99] {
        client.send_option(option, &big).await;
        let reply = client.option_reply().await;
        assert_eq!((reply.option, reply.kind), (option, REP_ERR_TOO_BIG));
    }
    client.go("disk", &[]).await.expect("the skipped data was all consumed");
    client.disconnect().await;

    // A length no real option has: closed without reading gigabytes.
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_INFO.to_be_bytes());
    header.extend_from_slice(&u32::MAX.to_be_bytes());
    client.send(&header).await;
    client.expect_closed().await;

    // NBD_OPT_EXPORT_NAME cannot be answered with an error, so too long a name closes.
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    client.send_option(OPT_EXPORT_NAME, &big).await;
    client.expect_closed().await;
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn missing_exports_get_unknown_or_close_for_export_name() {
    let server = TestServer::standard().await;
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    for option in [OPT_INFO, OPT_GO] {
        let reply = client.info_or_go(option, "nope", &[INFO_NAME]).await.expect_err("unknown export");
        assert_eq!((reply.option, reply.kind), (option, REP_ERR_UNKNOWN));
        assert!(!reply.data.is_empty(), "error replies carry a message");
    }
    // Names that are not UTF-8 cannot name an export either.
    let mut data = 2u32.to_be_bytes().to_vec();
    data.extend_from_slice(&[0xff, 0xfe, 0, 0]);
    client.send_option(OPT_GO, &data).await;
    assert_eq!(client.option_reply().await.kind, REP_ERR_UNKNOWN);
    client.go("disk", &[]).await.expect("haggling continues");
    client.disconnect().await;

    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    client.send_option(OPT_EXPORT_NAME, b"nope").await;
    client.expect_closed().await;
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn malformed_and_misordered_options_get_invalid() {
    let server = TestServer::standard().await;
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let expect_invalid = |reply: OptionReply, option: u32| {
        assert_eq!((reply.option, reply.kind), (option, REP_ERR_INVALID));
    };

    // SET_META_CONTEXT before structured replies.
    client.send_option(OPT_SET_META_CONTEXT, &meta_request("disk", &["base:allocation"])).await;
    expect_invalid(client.option_reply().await, OPT_SET_META_CONTEXT);
    // NBD_OPT_LIST and NBD_OPT_STRUCTURED_REPLY take no data.
    client.send_option(OPT_LIST, b"x").await;
    expect_invalid(client.option_reply().await, OPT_LIST);
    client.send_option(OPT_STRUCTURED_REPLY, b"x").await;
    expect_invalid(client.option_reply().await, OPT_STRUCTURED_REPLY);
    assert_eq!(client.structured_reply().await.kind, REP_ACK);
    let reply = client.structured_reply().await;
    expect_invalid(reply, OPT_STRUCTURED_REPLY);

    // GO whose name length runs past the data, or with trailing bytes.
    let mut data = 100u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"disk\0\0");
    client.send_option(OPT_GO, &data).await;
    expect_invalid(client.option_reply().await, OPT_GO);
    let mut data = 4u32.to_be_bytes().to_vec();
    data.extend_from_slice(b"disk\0\0junk");
    client.send_option(OPT_GO, &data).await;
    expect_invalid(client.option_reply().await, OPT_GO);
    // A metadata query count larger than the data holds.
    let mut data = meta_request("disk", &[]);
    let count_at = data.len() - 4;
    data[count_at..].copy_from_slice(&1000u32.to_be_bytes());
    client.send_option(OPT_LIST_META_CONTEXT, &data).await;
    expect_invalid(client.option_reply().await, OPT_LIST_META_CONTEXT);
    client.send_option(OPT_SET_META_CONTEXT, &[1, 2, 3]).await;
    expect_invalid(client.option_reply().await, OPT_SET_META_CONTEXT);

    client.go("disk", &[]).await.expect("haggling continues");
    client.disconnect().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn too_many_options_close_the_connection() {
    let server = TestServer::standard().await;
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    for _ in 0..OPTIONS_MAX {
        client.send_option(99, &[]).await;
        assert_eq!(client.option_reply().await.kind, REP_ERR_UNSUP);
    }
    client.send_option(99, &[]).await;
    client.expect_closed().await;
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_slow_handshake_times_out() {
    let config = ServerConfig { handshake_timeout: Duration::from_millis(300), ..ServerConfig::default() };
    let server = TestServer::start(standard_provider(), config).await;
    // One client never sends its flags, one stops after a partial option.
    let mut silent = Client::connect(server.addr).await;
    let mut partial = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    partial.send(&IHAVEOPT.to_be_bytes()).await;
    silent.expect_closed().await;
    partial.expect_closed().await;
    assert_eq!(server.server.stats().handshakes_failed_total.load(Ordering::SeqCst), 2);
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn wrong_request_magic_closes_the_connection() {
    let server = TestServer::standard().await;
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    let mut message = 0x2560_9514u32.to_be_bytes().to_vec();
    message.extend_from_slice(&[0; 24]);
    client.send(&message).await;
    client.expect_closed().await;
    assert_eq!(server.server.stats().transmissions_failed_total.load(Ordering::SeqCst), 1);
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn unknown_commands_and_flags_get_einval() {
    let server = TestServer::standard().await;
    for structured in [true, false] {
        let (mut client, _) = if structured {
            Client::negotiate(server.addr, "disk").await
        } else {
            Client::negotiate_simple(server.addr, "disk").await
        };
        for kind in [8u16, 42, 0xffff] {
            let reply = client.call(0, kind, 0, 4096, &[]).await;
            assert_eq!(reply.error, NBD_EINVAL, "command {kind}");
        }
        // Unknown flags on a read (the reply must still be an error chunk when structured),
        // and flags valid elsewhere but not on this command.
        let reply = client.call(1 << 9, CMD_READ, 0, 512, &[]).await;
        assert_eq!(reply.error, NBD_EINVAL);
        assert_eq!(reply.simple, !structured);
        let reply = client.call(CMD_FLAG_REQ_ONE, CMD_TRIM, 0, 512, &[]).await;
        assert_eq!(reply.error, NBD_EINVAL);
        // A write with bad flags still carries its payload, which must be skipped: the next
        // request would be misparsed otherwise.
        let reply = client.call(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 1000, &[0xab; 1000]).await;
        assert_eq!(reply.error, NBD_EINVAL);
        assert_eq!(client.read(0, 1000).await.data(), vec![0; 1000]);
        if !structured {
            // DF is only offered with structured replies.
            let reply = client.call(CMD_FLAG_DF, CMD_READ, 0, 512, &[]).await;
            assert_eq!(reply.error, NBD_EINVAL);
        }
        client.disconnect().await;
    }
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn out_of_range_requests_get_einval_or_enospc_for_writes() {
    let server = TestServer::standard().await;
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    let end = DISK_BYTES;
    assert_eq!(client.read(end - 512, 1024).await.error, NBD_EINVAL);
    assert_eq!(client.read(u64::MAX - 100, 512).await.error, NBD_EINVAL);
    let reply = client.write(end - 512, &[1; 1024], 0).await;
    assert_eq!(reply.error, NBD_ENOSPC);
    let reply = client.write(u64::MAX, &[1; 512], 0).await;
    assert_eq!(reply.error, NBD_ENOSPC);
    for (kind, expected) in [
        (CMD_TRIM, NBD_EINVAL),
        (CMD_CACHE, NBD_EINVAL),
        (CMD_BLOCK_STATUS, NBD_EINVAL),
        (CMD_WRITE_ZEROES, NBD_ENOSPC),
    ] {
        let reply = client.call(0, kind, end, 1, &[]).await;
        assert_eq!(reply.error, expected, "command {kind}");
    }
    assert_eq!(server.provider.export("disk").contents(end - 512, 512), vec![0; 512], "nothing was written");
    client.disconnect().await;
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn writes_to_a_read_only_export_get_eperm() {
    let server = TestServer::standard().await;
    let (mut client, _) = Client::negotiate(server.addr, "image").await;
    assert_eq!(client.write(0, &[1; 512], 0).await.error, NBD_EPERM);
    for kind in [CMD_TRIM, CMD_WRITE_ZEROES] {
        assert_eq!(client.call(0, kind, 0, 512, &[]).await.error, NBD_EPERM);
    }
    assert_eq!(client.read(0, 512).await.data(), vec![0; 512]);
    assert_eq!(client.call(0, CMD_FLUSH, 0, 0, &[]).await.error, 0);
    client.disconnect().await;
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn block_status_needs_a_context_selected_for_the_same_export() {
    let server = TestServer::standard().await;
    // Structured replies but no metadata context.
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    client.structured_reply().await;
    client.go("disk", &[]).await.unwrap();
    let reply = client.block_status(0, 4096, 0).await;
    assert_eq!(reply.error, NBD_EINVAL);
    client.disconnect().await;

    // A context selected for one export does not carry over to another.
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    client.structured_reply().await;
    client.meta_context(OPT_SET_META_CONTEXT, "image", &["base:allocation"]).await;
    client.go("disk", &[]).await.unwrap();
    assert_eq!(client.block_status(0, 4096, 0).await.error, NBD_EINVAL);
    client.disconnect().await;

    // A later SET that selects nothing clears the earlier selection.
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    client.structured_reply().await;
    client.meta_context(OPT_SET_META_CONTEXT, "disk", &["base:allocation"]).await;
    client.meta_context(OPT_SET_META_CONTEXT, "disk", &["qemu:nothing"]).await;
    client.go("disk", &[]).await.unwrap();
    assert_eq!(client.block_status(0, 4096, 0).await.error, NBD_EINVAL);
    client.disconnect().await;
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn oversized_payloads_are_refused_by_policy() {
    // The smallest maximum payload the server accepts, so "too big" is cheap to send.
    let config = ServerConfig { payload_bytes_max: 64 * 1024, ..ServerConfig::default() };
    let server = TestServer::start(standard_provider(), config).await;
    let (mut client, details) = Client::negotiate(server.addr, "disk").await;
    assert_eq!(details.block_size, Some((1, 4096, 65536)));
    let too_big = 65536 + 4096;
    let reply = client.read(0, too_big).await;
    assert_eq!(reply.error, NBD_EOVERFLOW);
    // A refused write up to 32 MiB is read and dropped; the connection goes on.
    let reply = client.write(0, &vec![0xcd; too_big as usize], 0).await;
    assert_eq!(reply.error, NBD_EINVAL);
    assert_eq!(client.read(0, 4096).await.data(), vec![0; 4096]);
    // Payload-free commands may exceed the maximum payload.
    assert_eq!(client.call(0, CMD_WRITE_ZEROES, 0, 1 << 20, &[]).await.error, 0);
    assert_eq!(client.block_status(0, 1 << 20, 0).await.error, 0);
    // Above 32 MiB the server answers and then closes instead of skipping.
    let cookie = client.request(0, CMD_WRITE, 0, (32 << 20) + 1, &[]).await;
    let reply = client.reply().await;
    assert_eq!((reply.cookie, reply.error), (cookie, NBD_EINVAL));
    client.expect_closed().await;

    let (mut client, _) = Client::negotiate_simple(server.addr, "disk").await;
    let reply = client.read(0, too_big).await;
    assert_eq!(reply.error, NBD_EINVAL, "simple replies have no EOVERFLOW");
    assert!(reply.chunks.is_empty());
    assert_eq!(client.read(0, 16).await.error, 0);
    client.disconnect().await;
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_at_once() {
    let config = ServerConfig { connections_max: 1, ..ServerConfig::default() };
    let server = TestServer::start(standard_provider(), config).await;
    let (first, _) = Client::negotiate(server.addr, "disk").await;
    let mut second = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = within("the refused connection to close", async {
        tokio::io::AsyncReadExt::read(&mut second, &mut byte).await
    })
    .await;
    assert!(matches!(read, Ok(0) | Err(_)), "no greeting for a refused client");
    let stats = server.server.stats();
    assert_eq!(stats.connections_rejected_total.load(Ordering::SeqCst), 1);
    first.disconnect().await;
    within("the first connection to be released", async {
        while stats.connections_active.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    server.assert_healthy().await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn garbage_and_truncated_messages_cost_only_the_sender() {
    let server = TestServer::standard().await;
    // Garbage instead of client flags.
    let mut client = Client::connect(server.addr).await;
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    client.expect_closed().await;

    // A client that hangs up in the middle of an option, a request header, or a write payload.
    let mut client = Client::start(server.addr, FLAG_C_FIXED_NEWSTYLE).await;
    let mut message = IHAVEOPT.to_be_bytes().to_vec();
    message.extend_from_slice(&OPT_GO.to_be_bytes());
    message.extend_from_slice(&100u32.to_be_bytes());
    message.extend_from_slice(b"dis");
    client.send(&message).await;
    drop(client);
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    client.send(&REQUEST_MAGIC.to_be_bytes()).await;
    drop(client);
    let (mut client, _) = Client::negotiate(server.addr, "disk").await;
    let mut message = REQUEST_MAGIC.to_be_bytes().to_vec();
    message.extend_from_slice(&0u16.to_be_bytes());
    message.extend_from_slice(&CMD_WRITE.to_be_bytes());
    message.extend_from_slice(&1u64.to_be_bytes());
    message.extend_from_slice(&0u64.to_be_bytes());
    message.extend_from_slice(&4096u32.to_be_bytes());
    message.extend_from_slice(&[0xee; 100]);
    client.send(&message).await;
    drop(client);

    server.assert_healthy().await;
    let stats = server.server.stats();
    within("the broken connections to be released", async {
        while stats.connections_active.load(Ordering::SeqCst) != 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert_eq!(
        server.provider.export("disk").contents(0, 100),
        vec![0; 100],
        "a truncated write is never applied"
    );
    server.stop().await.unwrap();
}
