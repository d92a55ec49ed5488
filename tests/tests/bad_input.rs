//! Bad input costs nothing (invariant 7): malformed NBD handshakes and requests, bad API calls,
//! a missing or wrong token, bad config. Each gets a clear error and the site keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tidemark_tests::{binary, run_ok, Site};

fn site() -> (tempfile::TempDir, Site) {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = Site::start(&dir.path().join("site"));
    site.cli_ok(&["group", "create", "g"]);
    site.cli_ok(&["volume", "create", "v", "--size", "4MiB", "--group", "g"]);
    (dir, site)
}

fn still_serving(site: &Site) {
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 4k", "-c", "read -P 0x33 0 4k", &site.uri("v")]);
}

/// Send `bytes` and return what the server says before it closes (bounded by a timeout).
fn exchange(site: &Site, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(site.nbd).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("timeout");
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[test]
fn malformed_nbd_handshakes_and_requests_lose_only_their_connection() {
    let (_dir, site) = site();
    // Garbage instead of client flags.
    exchange(&site, b"GET / HTTP/1.1\r\n\r\n");
    // No FIXED_NEWSTYLE flag.
    exchange(&site, &0u32.to_be_bytes());
    // Fixed newstyle, then an option with a bad magic.
    let mut bad_opt = 1u32.to_be_bytes().to_vec();
    bad_opt.extend_from_slice(&0x1234_5678_9abc_def0u64.to_be_bytes());
    bad_opt.extend_from_slice(&[0; 8]);
    exchange(&site, &bad_opt);
    // An option that claims 4 GiB of data.
    let mut huge = 1u32.to_be_bytes().to_vec();
    huge.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    huge.extend_from_slice(&7u32.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    exchange(&site, &huge);
    still_serving(&site);

    // After a good handshake: a request with a bad magic, and a write past the end.
    let mut client = tidemark_tests::nbd::Client::connect(site.nbd, "v").expect("connect");
    assert!(client.write(4 << 20, &[1u8; 4096], 0).is_err(), "write past the end must fail");
    assert!(client.read((4 << 20) - 512, 4096).is_err(), "read past the end must fail");
    client.write(0, &[7u8; 4096], 0).expect("the connection survives an out-of-range request");
    still_serving(&site);
    // An unknown export is refused; others still work.
    assert!(tidemark_tests::nbd::Client::connect(site.nbd, "nope").is_err());
    still_serving(&site);
}

fn http(site: &Site, request: &str) -> String {
    let mut s = TcpStream::connect(site.api).expect("connect api");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    s.write_all(request.as_bytes()).expect("send");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn the_api_needs_the_token_and_rejects_bad_input_clearly() {
    let (_dir, site) = site();
    let host = site.api;
    let no_token =
        http(&site, &format!("GET /v1/status HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"));
    assert!(no_token.starts_with("HTTP/1.1 401"), "{no_token}");
    let wrong = site.cli(&["--token", "not-the-token", "status"]);
    assert!(!wrong.status.success());
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(err.contains("token"), "the error should say the token is wrong: {err}");

    let token = std::fs::read_to_string(site.data_dir.join("api-token")).expect("token file");
    let token = token.trim();
    let body = "{\"name\": ";
    let bad_json = http(
        &site,
        &format!(
            "POST /v1/groups HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    );
    assert!(bad_json.starts_with("HTTP/1.1 400"), "{bad_json}");

    for (args, needle) in [
        (vec!["volume", "create", "x", "--size", "banana", "--group", "g"], "size"),
        (vec!["volume", "create", "x", "--size", "1GiB", "--group", "missing"], "missing"),
        (vec!["volume", "create", "v", "--size", "1GiB", "--group", "g"], "exists"),
        (vec!["group", "create", "bad/name"], "name"),
        (vec!["volume", "resize", "v", "--size", "1MiB"], "shrink"),
        (vec!["rollback", "g", "--to", "yesterday-ish", "--yes"], "point"),
    ] {
        let out = site.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
        assert!(!out.status.success(), "{args:?} should fail");
        assert!(err.contains(needle), "{args:?}: error should mention {needle:?}: {err}");
    }
    still_serving(&site);
}

#[test]
fn bad_config_is_rejected_at_start_with_file_key_and_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (text, key) in [
        ("[nbd]\nlisten = \"not an address\"\n", "listen"),
        ("[site]\nnmae = \"typo\"\n", "nmae"),
        ("[defaults]\njournal_max = \"lots\"\n", "journal_max"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, text).expect("write config");
        let out = std::process::Command::new(binary())
            .args(["serve", "--config"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .output()
            .expect("run serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "serve accepted bad config {text:?}");
        assert!(
            err.contains("bad.toml") && err.contains(key),
            "error must name the file and key {key:?}: {err}"
        );
    }
}
