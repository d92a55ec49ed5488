//! Volume and group lifecycle through the CLI, seen by NBD clients: block sizes, growth,
//! deletion, limits, status and the event log.

use tidemark_tests::{run, run_ok, Site};

fn nbdinfo(site: &Site, export: &str) -> serde_json::Value {
    let out = run_ok("nbdinfo", &["--json", &site.uri(export)]);
    serde_json::from_str::<serde_json::Value>(&out).expect("nbdinfo json")["exports"][0].clone()
}

#[test]
fn volumes_grow_are_deleted_and_keep_their_block_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = Site::start(&dir.path().join("site"));
    site.cli_ok(&["group", "create", "g", "--retention", "1h", "--journal-max", "1GiB"]);
    let group = site.cli_json(&["group", "show", "g"]);
    assert_eq!(group["retention_seconds"], 3600, "{group}");
    assert_eq!(group["journal_max_bytes"], 1u64 << 30, "{group}");

    site.cli_ok(&["volume", "create", "small", "--size", "1MiB", "--group", "g", "--block-size", "512"]);
    let info = nbdinfo(&site, "small");
    assert_eq!(info["block_size_preferred"], 512, "{info}");
    // 512-byte writes at 512-byte offsets round-trip.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x21 512 512",
            "-c",
            "read -P 0x21 512 512",
            "-c",
            "read -P 0 0 512",
            &site.uri("small"),
        ],
    );

    site.cli_ok(&["volume", "resize", "small", "--size", "2MiB"]);
    assert_eq!(nbdinfo(&site, "small")["export-size"], 2u64 << 20);
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x22 1536k 4k",
            "-c",
            "read -P 0x22 1536k 4k",
            "-c",
            "read -P 0x21 512 512",
            &site.uri("small"),
        ],
    );
    let volume = site.cli_json(&["volume", "show", "small"]);
    assert_eq!(volume["size_bytes"], 2u64 << 20, "{volume}");
    assert_eq!(volume["block_size_bytes"], 512, "{volume}");

    site.cli_ok(&["volume", "delete", "small"]);
    let gone = run("nbdinfo", &["--json", &site.uri("small")]);
    assert!(!gone.status.success(), "a deleted volume is still exported");
    let volumes = site.cli_json(&["volume", "list"]);
    assert_eq!(volumes.as_array().map(Vec::len), Some(0), "{volumes}");
}

#[test]
fn status_and_events_tell_an_operator_what_happened() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut site = Site::start(&dir.path().join("site"));
    site.cli_ok(&["group", "create", "g"]);
    site.cli_ok(&["volume", "create", "v", "--size", "1MiB", "--group", "g"]);
    let status = site.cli_json(&["status"]);
    assert_eq!(status["groups"], 1, "{status}");
    assert_eq!(status["volumes"], 1, "{status}");
    let events = site.cli_ok(&["events", "--json"]);
    for action in ["group.create", "volume.create"] {
        assert!(events.contains(action), "event log lacks {action}: {events}");
    }
    // Data and catalog survive a clean stop and start.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x31 0 64k", &site.uri("v")]);
    assert!(site.stop(), "serve must exit 0 on SIGTERM");
    site.restart();
    run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x31 0 64k", &site.uri("v")]);
    let group = site.cli_json(&["group", "show", "g"]);
    assert_eq!(group["state"], "ok", "{group}");
}
