//! `tidemark drill` and `tidemark up`, black-box: every scenario shipped in simnet/scenarios/
//! passes against real sites over simnet; a scenario designed to fail fails, non-zero, saying
//! where and why; the same scenario and seed give the same workload and verdict; and `tidemark
//! up` serves what it prints, replicates, and stops cleanly on SIGINT.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tidemark_tests::{binary, run_ok, wait_for};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("repository root").to_path_buf()
}

/// Run `tidemark drill` on a scenario with its scratch directory and report in `dir`.
fn drill(scenario: &Path, dir: &Path) -> (Output, Value) {
    let report = dir.join("report.json");
    let out = Command::new(binary())
        .arg("drill")
        .arg(scenario)
        .arg("--report")
        .arg(&report)
        .arg("--workdir")
        .arg(dir)
        .output()
        .expect("run tidemark drill");
    let text = std::fs::read_to_string(&report).unwrap_or_else(|e| {
        panic!(
            "no report ({e}); stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let report: Value = serde_json::from_str(&text).expect("the report is JSON");
    (out, report)
}

/// Run a shipped scenario and require it to pass, with a consistent report.
fn passes(name: &str) -> Value {
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, report) = drill(&repo().join("simnet/scenarios").join(name), dir.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    assert!(
        out.status.success() && report["passed"] == true,
        "{name} failed ({}):\n{stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(report["format"], "tidemark-drill-report/1");
    assert_eq!(report["consistent"], true);
    assert!(report["failure"].is_null(), "{}", report["failure"]);
    let checks = report["checks"].as_array().expect("checks");
    assert!(!checks.is_empty() && checks.iter().all(|c| c["passed"] == true));
    let steps = report["steps"].as_array().expect("steps");
    assert!(steps.iter().all(|s| s["result"] == "ok"), "{steps:?}");
    assert!(report["workload"]["acknowledged"].as_u64().expect("acknowledged") > 0);
    assert!(stdout.contains("PASSED"), "{stdout}");
    report
}

#[test]
fn planned_swap_over_wan_loses_nothing() {
    let report = passes("planned-swap-wan.toml");
    let changes = report["role_changes"].as_array().expect("role changes");
    assert_eq!(changes.len(), 2);
    for change in changes {
        assert_eq!(change["kind"], "swap");
        assert_eq!(change["lost_writes"], 0, "{change}");
        assert_eq!(change["rpo_seconds"], 0.0, "{change}");
        assert!(change["rto_seconds"].as_f64().expect("rto") > 0.0, "{change}");
    }
    assert_eq!(report["data_lost_writes"], 0);
}

#[test]
fn takeover_and_failback_over_intercontinental_keeps_the_lost_tail() {
    let report = passes("takeover-failback-intercontinental.toml");
    let takeover = &report["role_changes"][0];
    assert_eq!(takeover["kind"], "takeover", "{takeover}");
    // The link was cut two seconds before the primary died: writes it acknowledged then were
    // lost, and the RPO measured from the data covers them.
    let lost = takeover["lost_writes"].as_u64().expect("lost");
    let rpo = takeover["rpo_seconds"].as_f64().expect("rpo");
    assert!(lost > 0 && rpo > 1.0, "{takeover}");
    assert_eq!(report["data_lost_writes"], lost);
    let checks = report["checks"].as_array().expect("checks");
    assert!(
        checks
            .iter()
            .any(|c| c["target"].as_str().is_some_and(|t| t.contains("-salvage-")) && c["passed"] == true),
        "the old primary's salvage image was checked: {checks:?}"
    );
    assert_eq!(report["role_changes"][1]["kind"], "swap");
    assert_eq!(report["role_changes"][1]["lost_writes"], 0);
}

#[test]
fn a_flapping_link_under_load_leaves_a_consistent_replica_that_catches_up() {
    let report = passes("flapping-link-under-load.toml");
    let cut = report["link"]["totals"]["a_to_b"]["dropped_cut"].as_u64().expect("dropped");
    assert!(cut > 0, "the link did drop datagrams: {}", report["link"]["totals"]);
}

#[test]
fn rollback_to_a_bookmark_after_a_bad_write() {
    let report = passes("rollback-bad-write.toml");
    assert!(report["rolled_back_writes"].as_u64().expect("rolled back") > 0);
}

#[test]
fn test_failover_while_replicating() {
    let report = passes("test-failover-while-replicating.toml");
    let checks = report["checks"].as_array().expect("checks");
    assert!(checks.iter().any(|c| c["check"] == "a test-failover image takes writes"), "{checks:?}");
}

/// The failing scenario's verdict and reason, from its run.
fn fails_with_reason(dir: &Path) -> (String, Value) {
    let (out, report) = drill(&repo().join("tests/scenarios/fails-corrupted-volume.toml"), dir);
    assert!(!out.status.success(), "a drill against a corrupted volume must fail");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(report["passed"], false);
    assert_eq!(report["consistent"], false);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (stderr, report)
}

#[test]
fn a_drill_against_a_corrupted_volume_fails_and_says_where_and_why() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (stderr, report) = fails_with_reason(dir.path());
    let failure = &report["failure"];
    assert_eq!(failure["step"], 4, "{failure}");
    assert_eq!(failure["step_text"], "verify");
    let reason = failure["reason"].as_str().expect("reason");
    assert!(
        reason.starts_with("site a, group: volume data, block ") && reason.contains("checksum mismatch"),
        "{reason}"
    );
    assert!(
        stderr.contains("failed at step 4 (`verify`)") && stderr.contains("checksum mismatch"),
        "{stderr}"
    );
    // The failed drill keeps its scratch directory, with the sites' logs, for whoever looks.
    let workdir = report["workdir"].as_str().expect("workdir kept");
    assert!(Path::new(workdir).join("a.log").exists());

    // Designed failures are deterministic too: the same block, the same reason.
    let again = tempfile::tempdir().expect("tempdir");
    let (_, second) = fails_with_reason(again.path());
    assert_eq!(second["failure"], report["failure"]);
}

#[test]
fn the_same_scenario_and_seed_give_the_same_workload_and_verdict() {
    let scenario = repo().join("tests/scenarios/determinism.toml");
    let mut runs = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().expect("tempdir");
        let (out, report) = drill(&scenario, dir.path());
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        runs.push(report);
    }
    let (a, b) = (&runs[0], &runs[1]);
    assert_eq!(a["passed"], b["passed"]);
    assert_eq!(a["workload"]["digest"], b["workload"]["digest"]);
    assert_eq!(
        a["workload"]["log"], b["workload"]["log"],
        "the same writes, to the same places, with the same fates"
    );
    assert_eq!(a["workload"]["issued"], 1000);
    let cuts = |r: &Value| {
        r["checks"].as_array().expect("checks").iter().map(|c| c["cut"].clone()).collect::<Vec<_>>()
    };
    assert_eq!(cuts(a), cuts(b), "every check found the same write last");
    assert_eq!(a["rolled_back_writes"], b["rolled_back_writes"]);
}

/// Process ids whose command line mentions `text`.
fn processes_mentioning(text: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        if pid == std::process::id() {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(text) {
            found.push(pid);
        }
    }
    found
}

/// The first `scheme://...` word on a line.
fn url_on(line: &str, scheme: &str) -> Option<String> {
    line.split_whitespace().find(|w| w.starts_with(scheme)).map(str::to_string)
}

#[test]
fn up_serves_what_it_prints_replicates_and_stops_cleanly_on_sigint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("pair");
    let mut child = Command::new(binary())
        .arg("up")
        .arg("--data-dir")
        .arg(&data)
        .arg("--free-ports")
        .arg("--profile")
        .arg("metro")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tidemark up");
    let stdout = child.stdout.take().expect("stdout");
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut banner = Vec::new();
    let started = Instant::now();
    while !banner.iter().any(|l: &String| l.contains("Ctrl-C stops")) {
        let left = Duration::from_secs(90).checked_sub(started.elapsed()).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("tidemark up printed no endpoints within 90 s: {banner:?}")
        });
        match lines.recv_timeout(left) {
            Ok(line) => banner.push(line),
            Err(_) => {
                let _ = child.kill();
                let out = child.wait_with_output().expect("output");
                panic!("tidemark up ended early: {banner:?}\n{}", String::from_utf8_lossy(&out.stderr));
            }
        }
    }
    let text = banner.join("\n");
    eprintln!("{text}");
    let line = |needle: &str, nth: usize| -> String {
        banner
            .iter()
            .filter(|l| l.trim_start().starts_with(needle))
            .nth(nth)
            .cloned()
            .unwrap_or_else(|| panic!("no {needle} line in {text}"))
    };
    let primary_nbd = url_on(&line("NBD", 0), "nbd://").expect("primary NBD URI");
    assert!(primary_nbd.ends_with("/disk"), "{primary_nbd}");
    let secondary_nbd = url_on(&line("NBD", 1), "nbd://").expect("secondary NBD URI");
    let secondary_nbd = secondary_nbd.trim_end_matches("/IMAGE/disk").to_string();
    let api =
        [url_on(&line("API", 0), "http://").expect("API"), url_on(&line("API", 1), "http://").expect("API")];
    let metrics = url_on(&line("metrics", 0), "http://").expect("metrics");
    let cli = |site: usize, args: &[&str]| -> String {
        let name = ["site-a", "site-b"][site];
        let out = Command::new(binary())
            .arg("--api")
            .arg(&api[site])
            .arg("--data-dir")
            .arg(data.join(name))
            .args(args)
            .output()
            .expect("run the CLI");
        assert!(out.status.success(), "tidemark {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    // The printed endpoints answer.
    let status: Value = serde_json::from_str(&cli(0, &["status", "--json"])).expect("status JSON");
    assert_eq!(status["groups"], 1, "{status}");
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5c 0 4M", &primary_nbd]);
    run_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x5c 0 4M", &primary_nbd]);
    let scrape =
        ureq::get(&metrics).call().expect("scrape").body_mut().read_to_string().expect("metrics text");
    assert!(scrape.contains("tidemark_"), "{scrape}");

    // The demo group replicates to the other site.
    wait_for("the demo group to replicate", Duration::from_secs(60), || {
        let g: Value =
            serde_json::from_str(&cli(0, &["group", "show", "demo", "--json"])).expect("group JSON");
        g["replication"]["state"] == "streaming" && g["replication"]["lag_records"] == 0
    });
    cli(1, &["image", "create", "demo", "--at", "latest", "--name", "check"]);
    run_ok(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5c 0 4M", &format!("{secondary_nbd}/check/disk")],
    );

    // SIGINT stops everything, cleanly, and leaves no process behind.
    let pid = child.id();
    run_ok("kill", &["-INT", &pid.to_string()]);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "tidemark up did not stop within 60 s of SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(status.success(), "tidemark up exited with {status}: {rest:?}");
    assert!(rest.iter().any(|l| l.contains("stopped cleanly")), "{rest:?}");
    let leftovers = processes_mentioning(&data.display().to_string());
    assert!(leftovers.is_empty(), "processes left running: {leftovers:?}");
    for name in ["site-a.log", "site-b.log"] {
        let log = std::fs::read_to_string(data.join(name)).expect("site log");
        assert!(log.contains("site stopped cleanly"), "{name}:\n{log}");
    }
}
