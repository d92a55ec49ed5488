//! Crash tests: `kill -9` during a write workload, over and over; torn and corrupted journals.

use std::collections::HashMap;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use tidemark_tests::nbd::Client;
use tidemark_tests::{pseudo_random, run_ok, Site};

const BLOCK: usize = 4096;
const BLOCKS: u64 = 1024;
/// Crash rounds in the default test run.
const ROUNDS: usize = 25;

fn block_of(k: u64) -> u64 {
    k.wrapping_mul(2_654_435_761) % BLOCKS
}

/// Write number `k`'s bytes: its number and block, then noise derived from `k`.
fn content(k: u64) -> Vec<u8> {
    let mut data = pseudo_random(k, BLOCK);
    data[..8].copy_from_slice(&k.to_le_bytes());
    data[8..16].copy_from_slice(&block_of(k).to_le_bytes());
    data
}

#[test]
fn kill_9_during_writes_keeps_every_flushed_write_and_a_prefix_of_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut site = Site::start(&dir.path().join("site"));
    site.cli_ok(&["group", "create", "g"]);
    site.cli_ok(&["volume", "create", "v", "--size", "4MiB", "--group", "g"]);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7ead);
    // Writes of the surviving history, in order.
    let mut history: Vec<u64> = Vec::new();
    let mut next = 1u64;
    for round in 0..ROUNDS {
        let mut client = Client::connect(site.nbd, "v").expect("connect");
        let delay = Duration::from_millis(rng.random_range(20..300));
        let mut killed = false;
        let mut flushed_upto = history.last().copied().unwrap_or(0);
        let mut acked = flushed_upto;
        let mut sent = Vec::new();
        let start = std::time::Instant::now();
        let flush_every = rng.random_range(3..20u64);
        // Write until the kill lands (the killer is this thread, at a random moment).
        loop {
            if start.elapsed() >= delay && !killed {
                site.kill9();
                killed = true;
            }
            let k = next;
            next += 1;
            sent.push(k);
            if client.write(block_of(k) * BLOCK as u64, &content(k), 0).is_err() {
                break;
            }
            acked = k;
            if k.is_multiple_of(flush_every) {
                if client.flush().is_err() {
                    break;
                }
                flushed_upto = k;
            }
        }
        drop(client);
        site.restart();
        let mut client = Client::connect(site.nbd, "v").expect("reconnect");
        let image = client.read(0, (BLOCKS as usize * BLOCK) as u32).expect("read volume");
        client.disconnect();
        // Which write each block holds now.
        let mut found: HashMap<u64, u64> = HashMap::new();
        for (b, data) in image.chunks(BLOCK).enumerate() {
            if data.iter().any(|&x| x != 0) {
                let k = u64::from_le_bytes(data[..8].try_into().expect("8"));
                assert_eq!(
                    data,
                    content(k).as_slice(),
                    "round {round}: block {b} holds a torn or foreign write"
                );
                assert_eq!(block_of(k), b as u64, "round {round}: write {k} landed in the wrong block");
                found.insert(b as u64, k);
            }
        }
        let newest = found.values().copied().max().unwrap_or(0);
        eprintln!("round {round}: sent {} writes, acked through {acked}, flushed through {flushed_upto}, newest present {newest}", sent.len());
        assert!(
            newest >= flushed_upto,
            "round {round}: flushed write {flushed_upto} lost; newest present is {newest}"
        );
        assert!(newest <= acked + 1, "round {round}: write {newest} present but never sent");
        // The volume must be exactly history + sent writes up to `newest`.
        let prefix: Vec<u64> =
            history.iter().copied().chain(sent.iter().copied()).filter(|&k| k <= newest).collect();
        let mut expected: HashMap<u64, u64> = HashMap::new();
        for &k in &prefix {
            expected.insert(block_of(k), k);
        }
        assert_eq!(
            found, expected,
            "round {round}: the volume is not a prefix of the write history (newest {newest})"
        );
        history = prefix;
    }
}

fn segment_files(data_dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for group in std::fs::read_dir(data_dir.join("groups")).expect("groups") {
        for f in std::fs::read_dir(group.expect("group").path()).expect("group dir") {
            let p = f.expect("file").path();
            if p.extension().is_some_and(|e| e == "seg") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn a_torn_tail_is_cut_at_start_up_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("site");
    let mut site = Site::start(&data);
    site.cli_ok(&["group", "create", "g"]);
    site.cli_ok(&["volume", "create", "v", "--size", "4MiB", "--group", "g"]);
    let uri = site.uri("v");
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x42 0 64k", &uri]);
    site.kill9();
    // Half a record at the end of the newest segment, as a crash mid-append leaves it.
    let seg = segment_files(&data).pop().expect("segment");
    let mut bytes = std::fs::read(&seg).expect("read");
    bytes.extend_from_slice(b"TMR1");
    bytes.extend_from_slice(&pseudo_random(7, 3000));
    std::fs::write(&seg, &bytes).expect("write");
    site.restart();
    run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x42 0 64k", &uri]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x43 64k 4k", "-c", "read -P 0x43 64k 4k", &uri]);
    let group = site.cli_json(&["group", "show", "g"]);
    assert_eq!(group["state"], "ok", "{group}");
    let events = site.cli_ok(&["events", "--json"]);
    assert!(events.contains("torn_tail"), "no torn-tail event: {events}");
}

#[test]
fn corruption_before_the_tail_stops_the_group_with_segment_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("site");
    let mut site = Site::start(&data);
    site.cli_ok(&["group", "create", "g"]);
    site.cli_ok(&["group", "create", "other"]);
    site.cli_ok(&["volume", "create", "v", "--size", "4MiB", "--group", "g"]);
    site.cli_ok(&["volume", "create", "w", "--size", "4MiB", "--group", "other"]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x42 0 64k", &site.uri("v")]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x44 0 64k", &site.uri("v")]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x45 0 4k", &site.uri("w")]);
    // No clean shutdown: no checkpoint, so start-up reads the whole journal.
    site.kill9();
    let mut corrupted = false;
    for seg in segment_files(&data) {
        let mut bytes = std::fs::read(&seg).expect("read");
        if let Some(pos) = bytes.windows(4096).position(|w| w.iter().all(|&b| b == 0x42)) {
            bytes[pos + 100] ^= 0x01;
            std::fs::write(&seg, &bytes).expect("write");
            corrupted = true;
        }
    }
    assert!(corrupted, "found the record to corrupt");
    site.restart();
    let group = site.cli_json(&["group", "show", "g"]);
    assert_eq!(group["state"], "failed", "{group}");
    let reason = group["state_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains(".seg") && reason.contains("offset"),
        "reason must name segment and offset: {reason}"
    );
    // The other group keeps serving.
    run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x45 0 4k", &site.uri("w")]);
}
