//! Overflow policies with two real sites: a partner out of reach while the journal passes its
//! limit. `resync` lets the journal trim, tracks the changed blocks and, when the partner
//! returns, sends only those (a staged resync); `throttle` keeps the journal and slows writes.
//! A partner that is connected but too slow for the writes gets the same resync: the journal's
//! limit holds whether the partner is gone or only behind.

use std::time::Duration;

use tidemark_tests::{
    assert_replica_identical, pseudo_random, replication, run_ok, wait_caught_up, wait_for, Site,
};

/// `site`'s events, as JSON text.
fn events(site: &Site) -> String {
    site.cli_ok(&["events", "--json"])
}

const CATCH_UP: Duration = Duration::from_secs(180);

/// Write `mib` MiB of incompressible data at `offset_mib`, `rounds` times over (new data each
/// time): the journal grows by `rounds * mib`, the changed blocks stay `mib`.
fn rewrite(dir: &tempfile::TempDir, a: &Site, offset_mib: u64, mib: usize, rounds: u64) {
    for round in 0..rounds {
        let path = dir.path().join(format!("round-{offset_mib}-{round}.raw"));
        std::fs::write(&path, pseudo_random(offset_mib * 1000 + round, mib << 20)).expect("write data");
        let command = format!("write -s {} {} {}", path.display(), offset_mib << 20, mib << 20);
        run_ok("qemu-io", &["-f", "raw", "-c", &command, &a.uri("v")]);
    }
}

/// A protected pair, caught up, with a 16 MiB journal limit on `g` and 8 MiB of data in `v`.
fn protected(dir: &tempfile::TempDir, policy: &str) -> (Site, Site) {
    let (a, b) = tidemark_tests::paired_sites(dir.path());
    a.cli_ok(&["group", "create", "g", "--journal-max", "16MiB"]);
    a.cli_ok(&["volume", "create", "v", "--size", "64MiB", "--group", "g"]);
    rewrite(dir, &a, 0, 8, 1);
    a.cli_ok(&["group", "protect", "g", "--partner", "b", "--overflow", policy, "--wait"]);
    (a, b)
}

#[test]
fn resync_sends_only_the_blocks_changed_while_the_partner_was_away() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, mut b) = protected(&dir, "resync");
    assert_eq!(replication(&a, "g")["overflow"]["policy"], "resync");
    b.kill9();
    // 1 MiB of data zeroed (the resync must carry zeroes too), then 4 MiB of blocks rewritten
    // 8 times: 32 MiB of journal, twice the limit, for 5 MiB of changed blocks.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -z 6M 1M", &a.uri("v")]);
    rewrite(&dir, &a, 0, 4, 8);
    wait_for("resync tracking to start", CATCH_UP, || replication(&a, "g")["overflow"]["tracking"] == true);
    wait_for("the journal to trim past the partner", CATCH_UP, || {
        let acked = replication(&a, "g")["acked_seq"].as_u64().unwrap_or(0);
        a.cli_json(&["history", "g"])["oldest"]["seq"].as_u64().is_some_and(|s| s > acked + 1)
    });
    wait_for("the 5 changed MiB to be tracked", CATCH_UP, || {
        replication(&a, "g")["overflow"]["dirty_bytes"] == 5 << 20
    });
    let events = events(&a);
    assert!(events.contains("replication.overflow"), "{events}");

    // Counted from here: batches sent into the dead connection before it timed out count too.
    let before = replication(&a, "g")["bytes_sent_total"].as_u64().expect("bytes");
    b.restart();
    wait_caught_up(&a, "g", CATCH_UP);
    assert_replica_identical(&a, &b, "g", "v", "resynced");
    let r = replication(&a, "g");
    let resync = r["bytes_sent_total"].as_u64().expect("bytes") - before;
    eprintln!("resync: {resync} bytes sent for 5 MiB of changed blocks (33 MiB written)");
    assert!(
        resync < 6 << 20,
        "a resync sends the changed blocks, not the journal or the image: {resync} bytes; {r}"
    );
    assert_eq!(r["baseline"]["completed_total"], 1, "the resync (the initial sync was by the journal): {r}");
    assert_eq!(r["baseline"]["bytes_total"], 5 << 20, "the resync covers the changed blocks only: {r}");
    // The policy's next round (twice a second) sees the partner past the tracked blocks.
    wait_for("tracking to end once the partner has the blocks", CATCH_UP, || {
        replication(&a, "g")["overflow"]["tracking"] == false
    });

    // Streaming goes on after the resync.
    rewrite(&dir, &a, 32, 2, 1);
    wait_caught_up(&a, "g", CATCH_UP);
    assert_replica_identical(&a, &b, "g", "v", "after");
}

#[test]
fn resync_keeps_the_journal_bounded_for_a_connected_partner_too_slow_for_the_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 8 Mbit/s: about 1 MB/s, far slower than qemu-io writes.
    let (a, b) = tidemark_tests::paired_sites_with(dir.path(), &["--bandwidth-limit-mbit", "8"]);
    a.cli_ok(&["group", "create", "g", "--journal-max", "16MiB"]);
    a.cli_ok(&["volume", "create", "v", "--size", "64MiB", "--group", "g"]);
    a.cli_ok(&["group", "protect", "g", "--partner", "b", "--overflow", "resync", "--wait"]);
    let before = replication(&a, "g")["bytes_sent_total"].as_u64().expect("bytes");

    // 4 MiB of blocks rewritten 8 times: 32 MiB of journal, twice the limit, while the partner
    // stays connected and takes about 1 MB/s.
    rewrite(&dir, &a, 0, 4, 8);
    wait_for("the resync to track the blocks", CATCH_UP, || events(&a).contains("is connected but behind"));
    wait_caught_up(&a, "g", CATCH_UP);
    assert_replica_identical(&a, &b, "g", "v", "resynced");
    let r = replication(&a, "g");
    let sent = r["bytes_sent_total"].as_u64().expect("bytes") - before;
    eprintln!("slow partner: {sent} bytes sent for 32 MiB written to 4 MiB of blocks");
    assert!(sent < 24 << 20, "the journal's records past the limit were not all shipped: {sent} bytes");
    assert!(r["baseline"]["completed_total"].as_u64() >= Some(1), "a resync ran: {r}");
    assert!(
        r["baseline"]["bytes_total"].as_u64() <= Some(4 << 20),
        "the resync covers no more than the changed blocks: {r}"
    );
    wait_for("tracking to end once the partner has the blocks", CATCH_UP, || {
        replication(&a, "g")["overflow"]["tracking"] == false
    });
}

#[test]
fn throttle_slows_writes_while_the_partner_is_away_and_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, mut b) = protected(&dir, "throttle");
    b.kill9();
    rewrite(&dir, &a, 0, 4, 5);
    wait_for("writes to be throttled", CATCH_UP, || {
        replication(&a, "g")["overflow"]["write_delay_ms"].as_f64().is_some_and(|d| d > 0.0)
    });
    let events = events(&a);
    assert!(events.contains("policy throttle"), "{events}");
    // Nothing was trimmed past the partner: it resumes from the journal, no baseline.
    b.restart();
    wait_caught_up(&a, "g", CATCH_UP);
    assert_replica_identical(&a, &b, "g", "v", "throttled");
    let r = replication(&a, "g");
    assert!(r["baseline"].is_null(), "no baseline, the journal had everything: {r}");
    wait_for("the throttle to lift", CATCH_UP, || replication(&a, "g")["overflow"]["write_delay_ms"] == 0.0);
}
