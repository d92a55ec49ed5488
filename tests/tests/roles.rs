//! Role changes between two real sites (RFC 001): a planned swap under a running workload, a
//! takeover after the primary is killed and the failback when it returns, a takeover at an
//! earlier point, and a test-failover image on the secondary while replication continues.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tidemark_tests::nbd::Client;
use tidemark_tests::{run_ok, wait_for, Site};

/// How long replication may take to catch up in these tests.
const CATCH_UP: Duration = Duration::from_secs(180);
/// Blocks the workload writes to (4 KiB each, at the start of the volume).
const WORKLOAD_BLOCKS: u64 = 2048;

fn pair(dir: &tempfile::TempDir) -> (Site, Site) {
    let (a, b) = tidemark_tests::paired_sites(dir.path());
    a.cli_ok(&["group", "create", "g"]);
    a.cli_ok(&["volume", "create", "v", "--size", "64MiB", "--group", "g"]);
    a.cli_ok(&["group", "protect", "g", "--partner", "b"]);
    (a, b)
}

fn replication(site: &Site) -> serde_json::Value {
    site.cli_json(&["group", "show", "g"])["replication"].clone()
}

fn wait_caught_up(primary: &Site) {
    wait_for("replication to catch up (lag_records 0)", CATCH_UP, || {
        let r = replication(primary);
        r["lag_records"] == 0 && r["state"] == "streaming"
    });
}

/// Compare two exports byte for byte with qemu-img.
fn assert_same(x: &str, y: &str) {
    run_ok("qemu-img", &["compare", "-f", "raw", "-F", "raw", x, y]);
}

/// The content of workload write `i`: its number in every 8 bytes.
fn pattern(i: u64) -> Vec<u8> {
    i.to_le_bytes().repeat(4096 / 8)
}

/// Which write a block holds (`None`: never written by the workload, or not a workload pattern).
fn write_number(block: &[u8]) -> Option<u64> {
    let first = u64::from_le_bytes(block.get(..8)?.try_into().ok()?);
    (block == pattern(first).as_slice()).then_some(first)
}

/// Per block: every write issued to it, and the last one acknowledged.
type WriteLog = BTreeMap<u64, (Vec<u64>, Option<u64>)>;

/// A workload that writes block after block (write `i` to block `i % WORKLOAD_BLOCKS`) until a
/// write fails or it is stopped. Returns, per block, every write issued to it and the last one
/// acknowledged.
fn workload(site: &Site, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<WriteLog> {
    let addr = site.nbd;
    std::thread::spawn(move || {
        let mut log = WriteLog::new();
        let Ok(mut client) = Client::connect(addr, "v") else { return log };
        for i in 1.. {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let block = i % WORKLOAD_BLOCKS;
            let entry = log.entry(block).or_default();
            entry.0.push(i);
            if client.write(block * 4096, &pattern(i), 0).is_err() {
                break;
            }
            entry.1 = Some(i);
        }
        log
    })
}

/// Check that every block the workload wrote holds its last acknowledged write, or a write
/// issued after it (which reached the journal though its reply never arrived); returns the
/// blocks checked.
fn assert_holds_acknowledged(site: &Site, export: &str, log: &WriteLog) -> usize {
    let mut client = Client::connect(site.nbd, export).expect("connect");
    let mut checked = 0;
    for (block, (issued, last_acked)) in log {
        let Some(last_acked) = last_acked else { continue };
        let data = client.read(block * 4096, 4096).expect("read");
        let held = write_number(&data);
        assert!(
            held.is_some_and(|h| h >= *last_acked && issued.contains(&h)),
            "{export} block {block}: acknowledged write {last_acked} lost (holds {held:?})"
        );
        checked += 1;
    }
    client.disconnect();
    checked
}

fn read_block(site: &Site, export: &str, block: u64) -> Vec<u8> {
    let mut client = Client::connect(site.nbd, export).expect("connect");
    let data = client.read(block * 4096, 4096).expect("read");
    client.disconnect();
    data
}

#[test]
fn a_swap_under_a_workload_loses_no_acknowledged_write_and_resends_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = pair(&dir);
    wait_caught_up(&a);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(&a, stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    let swap = a.cli_json(&["group", "swap", "g"]);
    let swap_seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let log = writer.join().expect("workload");
    eprintln!("swap took {swap_seconds:.2}s: {swap}");
    assert_eq!(swap["generation"], 2, "{swap}");
    let acked: u64 = log.values().filter(|(_, last)| last.is_some()).count() as u64;
    assert!(acked > 100, "the workload ran up to the swap ({acked} blocks written)");

    assert_eq!(a.cli_json(&["group", "show", "g"])["role"], "secondary");
    let shown = b.cli_json(&["group", "show", "g"]);
    assert_eq!(shown["role"], "primary", "{shown}");
    assert_eq!(shown["generation"], 2);
    // Every acknowledged write is on the new primary (or a later write to the same block that
    // reached the old primary's journal before the swap stopped writes).
    assert_holds_acknowledged(&b, "v", &log);
    // The old primary's exports refuse writes; the new one's accept them.
    assert!(!tidemark_tests::run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &a.uri("v")])
        .status
        .success());
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 32M 1M", &b.uri("v")]);

    // Replication reversed without copying the disks again: only the new megabyte is sent.
    wait_caught_up(&b);
    let sent = replication(&b)["bytes_sent_total"].as_u64().expect("bytes");
    assert!(sent < (1 << 20) + (64 << 10), "after a swap only new writes are sent ({sent} bytes)");
    let r = replication(&b);
    assert!(r["baseline"].is_null(), "no baseline or resync after a swap: {r}");
    let history = a.cli_json(&["history", "g"]);
    let changes = history["role_changes"].as_array().expect("role changes");
    assert_eq!(changes.last().map(|c| c["to"].clone()), Some("secondary".into()), "{history}");
    b.cli_ok(&["image", "create", "g", "--at", "latest", "--name", "check"]);
    a.cli_ok(&["image", "create", "g", "--at", "latest", "--name", "check"]);
    assert_same(&a.uri("check/v"), &b.uri("check/v"));

    // And back again.
    b.cli_json(&["group", "swap", "g"]);
    assert_eq!(a.cli_json(&["group", "show", "g"])["role"], "primary");
    assert_eq!(a.cli_json(&["group", "show", "g"])["generation"], 3);
}

#[test]
fn takeover_after_the_primary_dies_then_failback_keeps_its_tail_and_sends_only_new_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, b) = pair(&dir);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 16M 8M", &a.uri("v")]);
    wait_caught_up(&a);
    let stop = Arc::new(AtomicBool::new(false));
    let writer = workload(&a, stop);
    std::thread::sleep(Duration::from_millis(1500));
    a.kill9();
    let log = writer.join().expect("workload");

    // The primary is gone: takeover needs no --force, and says where history forked.
    let refused = b.cli(&["group", "takeover", "g"]);
    assert!(!refused.status.success(), "takeover without --yes must refuse");
    let started = Instant::now();
    let takeover = b.cli_json(&["group", "takeover", "g", "--yes"]);
    eprintln!("takeover took {:.2}s: {takeover}", started.elapsed().as_secs_f64());
    assert_eq!(takeover["generation"], 2, "{takeover}");
    let fork = takeover["fork_seq"].as_u64().expect("fork seq");
    assert_eq!(b.cli_json(&["group", "show", "g"])["fork_point"]["seq"], fork);
    // New writes on the new primary: 1 MiB over the workload's blocks, 8 MiB elsewhere.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "write -P 0x78 40M 8M", &b.uri("v")]);
    let written_since_fork = 9u64 << 20;

    // The old primary returns: it is fenced, keeps its divergent tail aside, rewinds, follows.
    a.restart();
    wait_for("the old primary to demote", CATCH_UP, || {
        a.cli_json(&["group", "show", "g"])["role"] == "secondary"
    });
    wait_caught_up(&b);
    let images = a.cli_json(&["image", "list"]);
    let salvage = images
        .as_array()
        .expect("images")
        .iter()
        .find(|i| i["mode"] == "salvage")
        .unwrap_or_else(|| panic!("no salvage image: {images}"))
        .clone();
    assert_eq!(salvage["salvage"]["fork_seq"], fork, "{salvage}");
    let name = salvage["name"].as_str().expect("name").to_string();
    // The salvage image holds the old primary's last writes to every block the workload touched
    // (each is the last acknowledged write or one issued after it), not the new primary's data.
    assert!(assert_holds_acknowledged(&a, &format!("{name}/v"), &log) > 0);
    let salvage_uri = a.uri(&format!("{name}/v"));
    let denied = tidemark_tests::run("qemu-io", &["-f", "raw", "-c", "write 0 4k", &salvage_uri]);
    assert!(!denied.status.success(), "a salvage image must be read-only");

    // Failback sent about what the new primary wrote since the fork, not the disks.
    let sent = replication(&b)["bytes_sent_total"].as_u64().expect("bytes");
    eprintln!("failback sent {sent} bytes for {written_since_fork} bytes written since the fork");
    assert!(
        sent as f64 <= 1.1 * written_since_fork as f64 + (256 << 10) as f64,
        "failback sent {sent} bytes for {written_since_fork} written since the fork"
    );
    let r = replication(&b);
    assert!(r["baseline"].is_null(), "failback needs no baseline or resync: {r}");
    b.cli_ok(&["image", "create", "g", "--at", "latest", "--name", "check"]);
    a.cli_ok(&["image", "create", "g", "--at", "latest", "--name", "check"]);
    assert_same(&a.uri("check/v"), &b.uri("check/v"));
    assert_eq!(read_block(&a, "check/v", 0), vec![0x77; 4096]);
    let history = a.cli_ok(&["history", "g"]);
    assert!(history.contains("fenced"), "{history}");
}

#[test]
fn takeover_refuses_while_the_primary_answers_unless_forced() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = pair(&dir);
    wait_caught_up(&a);
    let refused = b.cli(&["group", "takeover", "g", "--yes"]);
    assert!(!refused.status.success());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.contains("reachable") && message.contains("swap"), "{message}");
    assert_eq!(b.cli_json(&["group", "show", "g"])["role"], "secondary");
    b.cli_json(&["group", "takeover", "g", "--yes", "--force"]);
    // The old primary learns of generation 2 and stands down: one primary.
    wait_for("the old primary to demote", CATCH_UP, || {
        a.cli_json(&["group", "show", "g"])["role"] == "secondary"
    });
    assert_eq!(b.cli_json(&["group", "show", "g"])["role"], "primary");
}

#[test]
fn takeover_at_an_earlier_point_recovers_from_a_bad_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, b) = pair(&dir);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x42 0 1M", &a.uri("v")]);
    a.cli_ok(&["bookmark", "create", "g", "good"]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x66 0 1M", &a.uri("v")]);
    wait_caught_up(&a);
    a.kill9();
    let t = b.cli_json(&["group", "takeover", "g", "--at", "bookmark:good", "--yes"]);
    assert_eq!(t["generation"], 2, "{t}");
    assert_eq!(read_block(&b, "v", 0), vec![0x42; 4096]);
    assert_eq!(read_block(&b, "v", 255), vec![0x42; 4096]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x43 1M 4k", &b.uri("v")]);
}

#[test]
fn a_test_failover_image_on_the_secondary_leaves_the_replica_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = pair(&dir);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x21 0 4M", &a.uri("v")]);
    wait_caught_up(&a);
    b.cli_ok(&["image", "create", "g", "--at", "latest", "--name", "drill", "--writable"]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x99 0 2M", &b.uri("drill/v")]);
    // Replication carries on while the image is written.
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x22 8M 4M", &a.uri("v")]);
    wait_caught_up(&a);
    assert_eq!(read_block(&b, "drill/v", 0), vec![0x99; 4096]);
    assert_eq!(read_block(&b, "drill/v", 2048), vec![0; 4096], "the image shows its own point in time");
    b.cli_ok(&["image", "create", "g", "--at", "latest", "--name", "check"]);
    assert_same(&a.uri("v"), &b.uri("check/v"));
    b.cli_ok(&["image", "delete", "drill"]);
    assert!(!b.cli_ok(&["image", "list"]).contains("drill"));
    assert_eq!(replication(&a)["state"], "streaming");
}
