//! Two real sites on loopback: protect a group, write through NBD on the primary, and compare
//! the primary's volume with an image of the secondary's newest point. Also with either site
//! killed and restarted mid-stream, and with a partner that presents the wrong certificate.

use std::time::Duration;

use tidemark_tests::{
    assert_replica_identical, pseudo_random, replication, run_ok, wait_caught_up, wait_for, Site,
};

/// How long replication may take to catch up in these tests.
const CATCH_UP: Duration = Duration::from_secs(180);

fn pair(dir: &tempfile::TempDir) -> (Site, Site) {
    tidemark_tests::paired_sites(dir.path())
}

fn mixed_image(dir: &tempfile::TempDir, name: &str, mib: usize, seed: u64) -> String {
    let mut image = vec![0u8; mib << 20];
    for (i, chunk) in image.chunks_mut(1 << 20).enumerate() {
        match i % 4 {
            // Incompressible, compressible, sparse, hole.
            0 => chunk.copy_from_slice(&pseudo_random(seed + i as u64, 1 << 20)),
            1 => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = ((j / 64) % 7) as u8;
                }
            }
            2 => chunk[..4096].copy_from_slice(&pseudo_random(seed + 1000 + i as u64, 4096)),
            _ => {}
        }
    }
    let path = dir.path().join(name);
    std::fs::write(&path, &image).expect("write image");
    path.to_str().expect("utf8").to_string()
}

#[test]
fn a_protected_group_replicates_and_resumes_after_either_site_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, mut b) = pair(&dir);
    a.cli_ok(&["group", "create", "g"]);
    a.cli_ok(&["volume", "create", "v", "--size", "256MiB", "--group", "g"]);
    a.cli_ok(&["group", "protect", "g", "--partner", "b"]);
    let src = mixed_image(&dir, "src.raw", 256, 1);
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &src, &a.uri("v")]);
    wait_caught_up(&a, "g", CATCH_UP);
    let g = b.cli_json(&["group", "show", "g"]);
    assert_eq!(g["role"], "secondary", "{g}");
    assert_eq!(a.cli_json(&["group", "show", "g"])["role"], "primary");
    assert_replica_identical(&a, &b, "g", "v", "check1");
    let r = replication(&a, "g");
    let raw = r["bytes_sent_total"].as_u64().expect("bytes");
    let compressed = r["bytes_sent_compressed_total"].as_u64().expect("bytes");
    assert!(compressed < raw, "compressible data compresses: {compressed} of {raw}");
    // The secondary refuses host writes.
    let denied = tidemark_tests::run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &b.uri("v")]);
    assert!(!denied.status.success(), "a secondary volume accepted a write");

    // Kill the secondary mid-stream, restart it: replication resumes, nothing resent from 0.
    let src2 = mixed_image(&dir, "src2.raw", 64, 2);
    let writer = {
        let (src2, uri) = (src2.clone(), a.uri("v"));
        std::thread::spawn(move || {
            run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &src2, &uri])
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    b.kill9();
    writer.join().expect("writer");
    b.restart();
    wait_caught_up(&a, "g", CATCH_UP);
    assert_replica_identical(&a, &b, "g", "v", "check2");
    let after_b = replication(&a, "g")["bytes_sent_total"].as_u64().expect("bytes");
    assert!(
        after_b - raw < 2 * (64 << 20),
        "resumed after a secondary restart: {} bytes more",
        after_b - raw
    );

    // Kill the primary mid-stream, restart it: it resumes from the partner's position.
    let writer = {
        let (src, uri) = (src.clone(), a.uri("v"));
        std::thread::spawn(move || {
            let _ = tidemark_tests::run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &src, &uri]);
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    a.kill9();
    let _ = writer.join();
    a.restart();
    wait_caught_up(&a, "g", CATCH_UP);
    assert_replica_identical(&a, &b, "g", "v", "check3");
}

#[test]
fn a_partner_with_the_wrong_fingerprint_is_refused_and_nothing_else_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Site::start(&dir.path().join("a"));
    let b = Site::start(&dir.path().join("b"));
    let fa = a.cli_json(&["site", "show"])["fingerprint"].as_str().expect("fingerprint").to_string();
    // a pins a fingerprint that is not b's.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    a.cli_ok(&["partner", "add", "b", "--address", &b.repl.to_string(), "--fingerprint", &wrong]);
    b.cli_ok(&["partner", "add", "a", "--address", &a.repl.to_string(), "--fingerprint", &fa]);
    a.cli_ok(&["group", "create", "g"]);
    a.cli_ok(&["volume", "create", "v", "--size", "16MiB", "--group", "g"]);
    a.cli_ok(&["group", "protect", "g", "--partner", "b"]);
    wait_for("the refusal to be reported", Duration::from_secs(30), || {
        replication(&a, "g")["last_error"].as_str().is_some_and(|e| e.contains("fingerprint"))
    });
    assert_ne!(replication(&a, "g")["state"], "streaming");
    assert!(b.cli(&["group", "show", "g"]).status.code() != Some(0), "b must not have received the group");
    // Both sites keep serving.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", "-c", "read -P 1 0 4k", &a.uri("v")]);
    b.cli_ok(&["status"]);
    let events = a.cli_ok(&["events", "--json"]);
    assert!(events.contains("replication.interrupted"), "{events}");
}

#[test]
fn initial_sync_of_a_sparse_volume_sends_about_the_allocated_bytes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = pair(&dir);
    a.cli_ok(&["group", "create", "g"]);
    a.cli_ok(&["volume", "create", "v", "--size", "1GiB", "--group", "g"]);
    // 10% allocated: 1 MiB of incompressible data at the start of every 10 MiB.
    let mut commands = Vec::new();
    for i in 0..103u64 {
        commands.push(format!("write -P {} {} 1M", (i % 250) + 1, (i * 10) << 20));
    }
    let mut args = vec!["-f", "raw"];
    for c in &commands {
        args.push("-c");
        args.push(c);
    }
    let uri = a.uri("v");
    args.push(&uri);
    run_ok("qemu-io", &args);
    let allocated = 103u64 << 20;
    a.cli_ok(&["group", "protect", "g", "--partner", "b"]);
    wait_caught_up(&a, "g", CATCH_UP);
    assert_replica_identical(&a, &b, "g", "v", "sync");
    let sent = replication(&a, "g")["bytes_sent_total"].as_u64().expect("bytes");
    eprintln!(
        "initial sync: {sent} bytes sent for {allocated} bytes allocated ({:.3}x)",
        sent as f64 / allocated as f64
    );
    assert!(sent >= allocated && sent <= allocated + allocated / 20, "sent {sent} for {allocated} allocated");
}

#[test]
fn a_partner_behind_the_trimmed_journal_gets_a_baseline_then_streams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, mut b) = pair(&dir);
    // A small journal: 64 MiB of writes trim the history well past seq 1 before protection.
    a.cli_ok(&["group", "create", "g", "--journal-max", "16MiB"]);
    a.cli_ok(&["volume", "create", "v", "--size", "128MiB", "--group", "g"]);
    let src = mixed_image(&dir, "src.raw", 64, 3);
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &src, &a.uri("v")]);
    wait_for("the journal to trim its oldest history", CATCH_UP, || {
        a.cli_json(&["history", "g"])["oldest"]["seq"].as_u64().is_some_and(|s| s > 1)
    });
    // --wait returns once the baseline is in and the journal after it has caught up.
    let done = a.cli_ok(&["group", "protect", "g", "--partner", "b", "--wait"]);
    assert!(done.contains("caught up"), "{done}");
    assert_replica_identical(&a, &b, "g", "v", "baseline");
    let r = replication(&a, "g");
    assert_eq!(r["baseline"]["completed_total"], 1, "one baseline: {r}");
    // Allocated data is sent, zero blocks are not: the mixed image holds 64 MiB of which a
    // quarter is holes and a quarter mostly zeroes.
    let sent = r["bytes_sent_total"].as_u64().expect("bytes");
    eprintln!("baseline: {sent} bytes sent for a 64 MiB image with about 33 MiB of non-zero blocks");
    assert!(sent < 40 << 20, "baseline sent {sent} bytes for about 33 MiB of non-zero blocks");
    let events = b.cli_ok(&["events", "--json"]);
    assert!(events.contains("baseline_installed"), "{events}");

    // The journal continues after the baseline, and the switched copy survives a restart.
    let more = mixed_image(&dir, "more.raw", 8, 4);
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", &more, &a.uri("v")]);
    wait_caught_up(&a, "g", CATCH_UP);
    b.kill9();
    b.restart();
    wait_caught_up(&a, "g", CATCH_UP);
    assert_replica_identical(&a, &b, "g", "v", "after");
    assert_eq!(replication(&a, "g")["baseline"]["completed_total"], 1, "no second baseline");
}
