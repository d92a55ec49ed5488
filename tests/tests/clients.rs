//! The real binary driven by real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy and fio.

use tidemark_tests::{pseudo_random, run, run_ok, Site};

fn site_with_volume(dir: &tempfile::TempDir, size: &str) -> Site {
    let site = Site::start(&dir.path().join("site"));
    site.cli_ok(&["group", "create", "g"]);
    site.cli_ok(&["volume", "create", "v", "--size", size, "--group", "g"]);
    site
}

fn qemu_io(site: &Site, export: &str, commands: &[&str]) -> String {
    let uri = site.uri(export);
    let mut args = vec!["-f", "raw"];
    // Image exports are read-only; qemu-io must open them so.
    if export.contains('/') {
        args.push("-r");
    }
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(&uri);
    let out = run_ok("qemu-io", &args);
    assert!(!out.contains("Pattern verification failed"), "qemu-io {commands:?}: {out}");
    out
}

fn now_rfc3339() -> String {
    run_ok("date", &["-u", "+%Y-%m-%dT%H:%M:%S.%3NZ"]).trim().to_string()
}

fn pause() {
    // Keep record times on either side of a timestamp apart (the clock has ms display precision).
    std::thread::sleep(std::time::Duration::from_millis(30));
}

#[test]
fn patterns_round_trip_and_nbdinfo_shows_every_capability() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = site_with_volume(&dir, "64MiB");
    qemu_io(
        &site,
        "v",
        &["write -P 0xab 0 64k", "write -P 0xcd 1M 4k", "write -P 0x11 100000 1000", "write -P 0x22 8M 3M"],
    );
    qemu_io(
        &site,
        "v",
        &[
            "read -P 0xab 0 64k",
            "read -P 0xcd 1M 4k",
            "read -P 0x11 100000 1000",
            "read -P 0x22 8M 3M",
            "read -P 0 32M 1M",
        ],
    );
    // Trim and zero read back as zeroes.
    qemu_io(
        &site,
        "v",
        &["discard 0 64k", "write -z 1M 4k", "read -P 0 0 64k", "read -P 0 1M 4k", "read -P 0x22 8M 3M"],
    );

    let info: serde_json::Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--json", &site.uri("v")])).expect("json");
    let export = &info["exports"][0];
    for cap in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(export[cap], serde_json::Value::Bool(true), "nbdinfo {cap}: {export}");
    }
    assert_eq!(export["export-size"], 64u64 << 20);
    let contexts = export["contexts"].to_string();
    assert!(contexts.contains("base:allocation"), "contexts: {contexts}");
    // The map reports the trimmed start as a hole and the written range as data.
    let map = run_ok("nbdinfo", &["--map", &site.uri("v")]);
    assert!(map.lines().any(|l| l.contains("hole")), "map has no hole:\n{map}");
    assert!(map.lines().any(|l| l.contains("data")), "map has no data:\n{map}");
    let list = run_ok("nbdinfo", &["--list", &format!("nbd://{}", site.nbd)]);
    assert!(list.contains("export=\"v\"") || list.contains("export=v") || list.contains("\"v\""), "{list}");
}

#[test]
fn a_256_mib_image_copies_in_and_compares_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = site_with_volume(&dir, "256MiB");
    let src = dir.path().join("src.raw");
    // Mixed content: random runs, zero runs and holes, so both data and zero paths are used.
    let mut image = vec![0u8; 256 << 20];
    for (i, chunk) in image.chunks_mut(1 << 20).enumerate() {
        match i % 4 {
            0 | 1 => chunk.copy_from_slice(&pseudo_random(i as u64, 1 << 20)),
            2 => chunk[..4096].copy_from_slice(&pseudo_random(1000 + i as u64, 4096)),
            _ => {}
        }
    }
    std::fs::write(&src, &image).expect("write source");
    let src = src.to_str().expect("utf8");
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src, &site.uri("v")]);
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", src, &site.uri("v")]);
    // nbdcopy out again, skipping holes via base:allocation, byte-identical.
    let out = dir.path().join("out.raw");
    run_ok("nbdcopy", &[&site.uri("v"), out.to_str().expect("utf8")]);
    assert!(std::fs::read(&out).expect("read copy") == image, "nbdcopy output differs from the source");
    // qemu-img map sees zero/hole extents, so copies skip them.
    let map = run_ok("qemu-img", &["map", "--output=json", "-f", "raw", &site.uri("v")]);
    assert!(map.contains("\"data\": false"), "qemu-img map found no holes: {map}");
}

#[test]
fn rollback_to_a_timestamp_and_a_bookmark_then_undo() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = site_with_volume(&dir, "16MiB");
    qemu_io(&site, "v", &["write -P 0x0a 0 1M"]);
    pause();
    let t1 = now_rfc3339();
    pause();
    qemu_io(&site, "v", &["write -P 0x0b 0 1M", "write -P 0x0b 4M 64k"]);
    site.cli_ok(&["bookmark", "create", "g", "bm1"]);
    qemu_io(&site, "v", &["write -P 0x0c 0 1M"]);

    site.cli_ok(&["rollback", "g", "--to", &t1, "--yes"]);
    qemu_io(&site, "v", &["read -P 0x0a 0 1M", "read -P 0 4M 64k"]);

    site.cli_ok(&["rollback", "g", "--to", "bookmark:bm1", "--yes"]);
    qemu_io(&site, "v", &["read -P 0x0b 0 1M", "read -P 0x0b 4M 64k"]);

    site.cli_ok(&["rollback", "g", "--undo", "--yes"]);
    qemu_io(&site, "v", &["read -P 0x0a 0 1M", "read -P 0 4M 64k"]);

    let history = site.cli_json(&["history", "g"]);
    assert_eq!(history["rollbacks"].as_array().map(Vec::len), Some(3), "{history}");
    assert_eq!(history["bookmarks"][0]["name"], "bm1");
    let group = site.cli_json(&["group", "show", "g"]);
    for key in ["name", "volumes", "last_seq", "oldest_point", "newest_point"] {
        assert!(!group[key].is_null(), "group show lacks {key}: {group}");
    }
    // Without --yes nothing happens.
    let refused = site.cli(&["rollback", "g", "--to", "bookmark:bm1"]);
    assert!(!refused.status.success());
    qemu_io(&site, "v", &["read -P 0x0a 0 1M"]);
    // A point outside the history is an error that states the range.
    let out = site.cli(&["rollback", "g", "--to", "2001-01-01T00:00:00Z", "--yes"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("recoverable range"), "{err}");
}

#[test]
fn an_image_of_the_past_reads_true_while_the_volume_keeps_changing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = site_with_volume(&dir, "16MiB");
    qemu_io(&site, "v", &["write -P 0x5a 0 2M"]);
    site.cli_ok(&["bookmark", "create", "g", "before"]);
    site.cli_ok(&["image", "create", "g", "--at", "bookmark:before", "--name", "past"]);
    let writer = {
        let uri = site.uri("v");
        std::thread::spawn(move || {
            for i in 0..20 {
                let cmd = format!("write -P {} 0 2M", 0x60 + i);
                run_ok("qemu-io", &["-f", "raw", "-c", &cmd, &uri]);
            }
        })
    };
    for _ in 0..10 {
        qemu_io(&site, "past/v", &["read -P 0x5a 0 2M"]);
    }
    writer.join().expect("writer");
    qemu_io(&site, "v", &["read -P 0x73 0 2M"]);
    qemu_io(&site, "past/v", &["read -P 0x5a 0 2M"]);
    let info: serde_json::Value =
        serde_json::from_str(&run_ok("nbdinfo", &["--json", &site.uri("past/v")])).expect("json");
    assert_eq!(info["exports"][0]["is_read_only"], serde_json::Value::Bool(true), "{info}");
    let denied = run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &site.uri("past/v")]);
    assert!(
        !String::from_utf8_lossy(&denied.stdout).contains("wrote 4096"),
        "a read-only image accepted a write"
    );
    let images = site.cli_json(&["image", "list"]);
    assert!(images.to_string().contains("past/v"), "{images}");
    site.cli_ok(&["image", "delete", "past"]);
}

#[test]
fn fio_verifies_concurrent_out_of_order_io() {
    let dir = tempfile::tempdir().expect("tempdir");
    let site = site_with_volume(&dir, "64MiB");
    let uri = site.uri("v");
    let out = run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--iodepth=32",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // No verify state file: fio would leave it in the working directory (the repo).
            "--verify_state_save=0",
            "--output-format=json",
        ],
    );
    let report: serde_json::Value =
        serde_json::from_str(out.trim_start_matches(|c| c != '{')).expect("fio json");
    assert_eq!(report["jobs"][0]["error"], 0, "{report}");
}
