//! Metrics, dashboards and alert rules, checked with real tools: a running pair of sites is
//! scraped and `promtool check metrics` must find no problem; what the pair exports must be
//! exactly what docs/metrics.md lists; every PromQL expression in dashboards/ and
//! deploy/prometheus/ must parse (promtool) and name only exported metrics; and a real Prometheus
//! server scraping a pair must see RPO and lag rise while replication is interrupted and fall
//! back to zero as it catches up.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;
use tidemark_tests::{free_port, run_ok, tool, wait_for, Site};

/// How long replication may take to catch up in these tests.
const CATCH_UP: Duration = Duration::from_secs(120);
/// How long a Prometheus server may take to start, scrape, or evaluate what a test waits for.
const PROMETHEUS_DEADLINE: Duration = Duration::from_secs(60);
/// Metrics Prometheus makes itself for every target; dashboards and alerts may use them.
const PROMETHEUS_SYNTHETIC: &[&str] = &["up", "scrape_duration_seconds", "scrape_samples_scraped"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn pair(dir: &tempfile::TempDir) -> (Site, Site) {
    let a = Site::start(&dir.path().join("a"));
    let b = Site::start(&dir.path().join("b"));
    let fa = a.cli_json(&["site", "show"])["fingerprint"].as_str().expect("fingerprint").to_string();
    let fb = b.cli_json(&["site", "show"])["fingerprint"].as_str().expect("fingerprint").to_string();
    a.cli_ok(&["partner", "add", "b", "--address", &b.repl.to_string(), "--fingerprint", &fb]);
    b.cli_ok(&["partner", "add", "a", "--address", &a.repl.to_string(), "--fingerprint", &fa]);
    (a, b)
}

fn wait_caught_up(a: &Site) {
    wait_for("replication to catch up (lag_records 0, streaming)", CATCH_UP, || {
        let r = a.cli_json(&["group", "show", "g"])["replication"].clone();
        r["lag_records"] == 0 && r["state"] == "streaming"
    });
}

/// docs/metrics.md's tables: family name -> type.
fn documented() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(repo().join("docs/metrics.md")).expect("read docs/metrics.md");
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("| `tidemark_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_string();
        let kind = cells[2].to_string();
        assert!(["counter", "gauge", "histogram"].contains(&kind.as_str()), "{name}: type {kind:?}");
        assert!(out.insert(name.clone(), kind).is_none(), "{name} is listed twice in docs/metrics.md");
    }
    assert!(out.len() > 30, "docs/metrics.md lists only {} metrics", out.len());
    out
}

/// The families of a scrape: name -> type, from the `# TYPE` lines.
fn families(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE name type");
            (name.to_string(), kind.to_string())
        })
        .collect()
}

/// One sample's value: the series named `name` whose labels include every pair of `labels`
/// (exactly one must match).
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut found = Vec::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').expect("sample line");
        let (series_name, series_labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if series_name != name {
            continue;
        }
        let have: BTreeMap<&str, &str> = series_labels
            .split("\",")
            .filter(|p| !p.is_empty())
            .filter_map(|p| p.split_once("=\""))
            .map(|(k, v)| (k, v.trim_end_matches('"')))
            .collect();
        if labels.iter().all(|(k, v)| have.get(k) == Some(v)) {
            found.push(value.parse::<f64>().unwrap_or_else(|e| panic!("{line}: {e}")));
        }
    }
    assert_eq!(found.len(), 1, "expected one {name}{labels:?}, found {found:?}");
    found[0]
}

fn promtool_check_metrics(text: &str, site: &str) {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics found problems in site {site}'s metrics ({}):\n{report}",
        out.status
    );
}

#[test]
fn a_running_pair_exports_every_documented_metric_and_promtool_finds_no_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = pair(&dir);
    a.cli_ok(&["group", "create", "g"]);
    a.cli_ok(&["volume", "create", "v", "--size", "64MiB", "--group", "g"]);
    a.cli_ok(&["group", "protect", "g", "--partner", "b"]);
    // Every NBD operation qemu-io can issue, on the volume.
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 4M",
            "-c",
            "write -z 4M 1M",
            "-c",
            "discard 5M 1M",
            "-c",
            "flush",
            "-c",
            "read -P 0xab 0 1M",
            &a.uri("v"),
        ],
    );
    a.cli_ok(&["bookmark", "create", "g", "mark"]);
    a.cli_ok(&["image", "create", "g", "--at", "bookmark:mark", "--name", "snap"]);
    run_ok("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0xab 0 64k", &a.uri("snap/v")]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 0xcd 0 1M", &a.uri("v")]);
    a.cli_ok(&["rollback", "g", "--to", "bookmark:mark", "--yes"]);
    wait_caught_up(&a);
    // The secondary's copy has the bookmark once the records carrying it are applied.
    wait_for("the bookmark to reach the secondary", CATCH_UP, || {
        sample(&b.scrape(), "tidemark_group_bookmarks", &[("group", "g")]) == 1.0
    });

    let (text_a, text_b) = (a.scrape(), b.scrape());
    promtool_check_metrics(&text_a, "a");
    promtool_check_metrics(&text_b, "b");

    // What the pair exports is exactly what docs/metrics.md lists, with the same types.
    let docs = documented();
    let mut exported = families(&text_a);
    for (name, kind) in families(&text_b) {
        let previous = exported.insert(name.clone(), kind.clone());
        assert!(previous.is_none_or(|p| p == kind), "{name} has two types");
    }
    let missing: Vec<_> = docs.keys().filter(|n| !exported.contains_key(*n)).collect();
    let undocumented: Vec<_> = exported.keys().filter(|n| !docs.contains_key(*n)).collect();
    assert!(
        missing.is_empty(),
        "documented in docs/metrics.md but not exported by a running pair: {missing:?}"
    );
    assert!(undocumented.is_empty(), "exported but not documented in docs/metrics.md: {undocumented:?}");
    for (name, kind) in &docs {
        assert_eq!(
            &exported[name], kind,
            "{name}: docs/metrics.md says {kind}, the site says {}",
            exported[name]
        );
    }

    // And the numbers mean what the docs say.
    let a_ = |name: &str, labels: &[(&str, &str)]| sample(&text_a, name, labels);
    let b_ = |name: &str, labels: &[(&str, &str)]| sample(&text_b, name, labels);
    let g = ("group", "g");
    assert_eq!(a_("tidemark_group_role", &[g, ("role", "primary")]), 1.0);
    assert_eq!(b_("tidemark_group_role", &[g, ("role", "secondary")]), 1.0);
    assert_eq!(a_("tidemark_group_state", &[g, ("state", "ok")]), 1.0);
    assert_eq!(a_("tidemark_replication_state", &[g, ("state", "streaming")]), 1.0);
    assert_eq!(b_("tidemark_replication_state", &[g, ("state", "receiving")]), 1.0);
    assert_eq!(a_("tidemark_replication_protected", &[g, ("partner", "b")]), 1.0);
    assert_eq!(a_("tidemark_replication_lag_records", &[g]), 0.0);
    assert_eq!(a_("tidemark_replication_rpo_seconds", &[g]), 0.0);
    assert_eq!(a_("tidemark_group_generation", &[g]), b_("tidemark_group_generation", &[g]));
    let volume = [g, ("volume", "v"), ("image", "")];
    let op = |name: &str, operation: &str| {
        let mut labels = volume.to_vec();
        labels.push(("operation", operation));
        a_(name, &labels)
    };
    assert!(op("tidemark_nbd_bytes_total", "write") >= f64::from(5 << 20), "4 MiB + 1 MiB written");
    assert!(op("tidemark_nbd_bytes_total", "read") >= f64::from(1 << 20));
    assert!(op("tidemark_nbd_operations_total", "read") >= 1.0);
    assert_eq!(op("tidemark_nbd_bytes_total", "write_zeroes"), f64::from(1 << 20));
    assert_eq!(op("tidemark_nbd_bytes_total", "trim"), f64::from(1 << 20));
    assert!(op("tidemark_nbd_operations_total", "flush") >= 1.0);
    assert!(op("tidemark_nbd_operation_duration_seconds_count", "write") >= 2.0);
    assert_eq!(op("tidemark_nbd_operation_errors_total", "write"), 0.0);
    let snap = [g, ("volume", "v"), ("image", "snap"), ("operation", "read")];
    assert!(
        a_("tidemark_nbd_bytes_total", &snap) >= f64::from(64 << 10),
        "the image's export is counted apart"
    );
    assert_eq!(a_("tidemark_volume_size_bytes", &[g, ("volume", "v")]), f64::from(64 << 20));
    assert!(a_("tidemark_journal_appended_bytes_total", &[g]) > f64::from(5 << 20));
    assert!(
        b_("tidemark_journal_appended_bytes_total", &[g]) > f64::from(5 << 20),
        "replicated records count"
    );
    assert!(a_("tidemark_journal_fsync_duration_seconds_count", &[g]) >= 1.0);
    assert!(a_("tidemark_journal_size_bytes", &[g]) <= a_("tidemark_journal_limit_bytes", &[g]));
    assert_eq!(a_("tidemark_group_bookmarks", &[g]), 1.0);
    assert_eq!(a_("tidemark_group_images", &[g, ("mode", "read-only")]), 1.0);
    assert_eq!(a_("tidemark_group_rollbacks_total", &[g]), 1.0);
    assert_eq!(a_("tidemark_history_trimmed_total", &[g]), 0.0);
    assert!(a_("tidemark_history_window_seconds", &[g]) >= 0.0);
    let raw = a_("tidemark_replication_sent_bytes_total", &[g]);
    let compressed = a_("tidemark_replication_sent_compressed_bytes_total", &[g]);
    assert!(raw > f64::from(5 << 20) && compressed < raw / 10.0, "0xab compresses: {compressed} of {raw}");
    let batches = a_("tidemark_replication_batches_sent_total", &[g]);
    assert_eq!(a_("tidemark_replication_batch_size_bytes_count", &[g]), batches);
    assert_eq!(a_("tidemark_replication_batch_size_bytes_sum", &[g]), raw);
    assert!(a_("tidemark_replication_batch_ack_duration_seconds_count", &[g]) >= 1.0);
    assert_eq!(b_("tidemark_replication_frames_rejected_total", &[g, ("reason", "hash_mismatch")]), 0.0);
    assert_eq!(a_("tidemark_events_total", &[("source", "api"), ("action", "rollback.start")]), 1.0);
    assert_eq!(a_("tidemark_events_total", &[("source", "engine"), ("action", "rollback_completed")]), 1.0);
    assert_eq!(a_("tidemark_build_info", &[]), 1.0);
    assert!(a_("tidemark_nbd_connections_accepted_total", &[]) >= 4.0);
}

/// A PromQL expression and where it came from.
struct Expr {
    at: String,
    promql: String,
}

/// Grafana's own variables, and what to put in their place so the expression is PromQL.
const GRAFANA_BUILTINS: &[(&str, &str)] =
    &[("__rate_interval", "1m"), ("__interval", "1m"), ("__range_s", "3600"), ("__range", "1h")];

/// Replace Grafana variables (`$x`, `${x}`, `${x:fmt}`) with something of the same kind: an
/// interval for the interval built-ins, a regex for dashboard variables (they only appear in
/// `=~"..."` matchers). Names that are neither (`$1` in label_replace) are left alone; any other
/// unknown variable is a bug in the dashboard.
fn substitute(expr: &str, variables: &BTreeSet<String>, at: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, len) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced.find('}').unwrap_or_else(|| panic!("{at}: unclosed ${{ in {expr}"));
            (braced[..end].split(':').next().unwrap_or(""), end + 2)
        } else {
            let end = after.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(after.len());
            (&after[..end], end)
        };
        if let Some((_, value)) = GRAFANA_BUILTINS.iter().find(|(n, _)| *n == name) {
            out.push_str(value);
        } else if variables.contains(name) {
            out.push_str(".*");
        } else {
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_digit()),
                "{at}: unknown variable ${name} in {expr}"
            );
            out.push('$');
            out.push_str(name);
        }
        rest = &after[len..];
    }
    out.push_str(rest);
    out
}

/// The metric names a PromQL expression selects: identifiers that are not functions,
/// aggregations, keywords, label names in grouping clauses, or anything inside strings, label
/// matchers and range brackets. Syntax is promtool's to check; this only has to find names.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: &[&str] =
        &["and", "or", "unless", "bool", "offset", "inf", "nan", "start", "end", "atan2"];
    const GROUPING: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];
    const AGGREGATIONS: &[&str] = &[
        "sum",
        "avg",
        "count",
        "min",
        "max",
        "stddev",
        "stdvar",
        "topk",
        "bottomk",
        "quantile",
        "count_values",
        "group",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let skip_string = |i: &mut usize| {
        let quote = chars[*i];
        *i += 1;
        while *i < chars.len() && chars[*i] != quote {
            if chars[*i] == '\\' {
                *i += 1;
            }
            *i += 1;
        }
        *i += 1;
    };
    let skip_to = |i: &mut usize, close: char| {
        while *i < chars.len() && chars[*i] != close {
            if matches!(chars[*i], '"' | '\'' | '`') {
                skip_string(i);
            } else {
                *i += 1;
            }
        }
        *i += 1;
    };
    let next_non_space = |mut j: usize| {
        while j < chars.len() && chars[j].is_whitespace() {
            j += 1;
        }
        j
    };
    while i < chars.len() {
        let c = chars[i];
        if matches!(c, '"' | '\'' | '`') {
            skip_string(&mut i);
        } else if c == '{' {
            skip_to(&mut i, '}');
        } else if c == '[' {
            skip_to(&mut i, ']');
        } else if c.is_ascii_digit() || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number or a duration (`5m`, `1e-9`, `0x1f`).
            while i < chars.len() {
                let d = chars[i];
                let sign = matches!(d, '+' | '-') && matches!(chars.get(i - 1), Some('e' | 'E'));
                if d.is_ascii_alphanumeric() || d == '.' || d == '_' || sign {
                    i += 1;
                } else {
                    break;
                }
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
            {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let j = next_non_space(i);
            let next_word: String =
                chars[j..].iter().take_while(|c| c.is_ascii_alphanumeric() || **c == '_').collect();
            if GROUPING.contains(&word.as_str()) {
                if chars.get(j) == Some(&'(') {
                    i = j + 1;
                    skip_to(&mut i, ')');
                }
            } else if KEYWORDS.contains(&word.as_str()) || chars.get(j) == Some(&'(') {
                // A function or aggregation call, or a keyword.
            } else if AGGREGATIONS.contains(&word.as_str()) && (next_word == "by" || next_word == "without") {
                // `sum by (x) (...)`: an aggregation before its grouping clause.
            } else {
                names.insert(word);
            }
        } else {
            i += 1;
        }
    }
    names
}

/// Every panel of a dashboard, rows' nested panels included.
fn panels(dashboard: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

/// Check one dashboard's structure; return its expressions.
fn check_dashboard(path: &Path, uids: &mut BTreeSet<String>) -> Vec<Expr> {
    let file = path.file_name().expect("file name").to_string_lossy().to_string();
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).expect("read dashboard"))
        .unwrap_or_else(|e| panic!("{file}: not JSON: {e}"));
    let schema = dashboard["schemaVersion"].as_u64().unwrap_or_else(|| panic!("{file}: no schemaVersion"));
    assert!(schema >= 36, "{file}: schemaVersion {schema} predates data source variables by uid");
    let uid = dashboard["uid"].as_str().unwrap_or_else(|| panic!("{file}: no uid"));
    assert!(uids.insert(uid.to_string()), "{file}: uid {uid} is used by another dashboard");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()), "{file}: no title");

    let variables =
        dashboard["templating"]["list"].as_array().unwrap_or_else(|| panic!("{file}: no templating"));
    let datasource = variables.iter().find(|v| v["name"] == "datasource");
    assert!(
        datasource.is_some_and(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "{file}: needs a `datasource` variable of type datasource, query prometheus"
    );
    let names: BTreeSet<String> =
        variables.iter().map(|v| v["name"].as_str().expect("variable name").to_string()).collect();
    let ours = serde_json::json!({"type": "prometheus", "uid": "${datasource}"});

    let mut exprs = Vec::new();
    for v in variables.iter().filter(|v| v["type"] == "query") {
        let at = format!("{file} variable {}", v["name"]);
        assert_eq!(v["datasource"], ours, "{at}: must use the datasource variable");
        let query = v["query"]["query"].as_str().or(v["query"].as_str()).expect("variable query");
        // label_values(SELECTOR, LABEL) is Grafana's; the selector is PromQL.
        let selector = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
            .and_then(|q| q.rsplit_once(','))
            .map_or(query, |(selector, _)| selector);
        exprs.push(Expr { promql: substitute(selector, &names, &at), at });
    }

    let mut ids = BTreeSet::new();
    let mut cells: Vec<(String, [u64; 4])> = Vec::new();
    for panel in panels(&dashboard) {
        let id = panel["id"].as_u64().unwrap_or_else(|| panic!("{file}: a panel has no id: {panel}"));
        assert!(ids.insert(id), "{file}: panel id {id} is used twice");
        let title = panel["title"].as_str().unwrap_or("");
        let at = format!("{file} panel {id} ({title})");
        let grid = &panel["gridPos"];
        let pos: Vec<u64> = ["x", "y", "w", "h"]
            .iter()
            .map(|k| grid[k].as_u64().unwrap_or_else(|| panic!("{at}: gridPos.{k} missing")))
            .collect();
        let (x, y, w, h) = (pos[0], pos[1], pos[2], pos[3]);
        assert!(w >= 1 && h >= 1 && x + w <= 24, "{at}: gridPos {grid} is outside the 24-column grid");
        for (other, [ox, oy, ow, oh]) in &cells {
            let overlap = x < ox + ow && *ox < x + w && y < oy + oh && *oy < y + h;
            assert!(!overlap, "{at}: overlaps {other}");
        }
        cells.push((at.clone(), [x, y, w, h]));
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"], ours, "{at}: must use the datasource variable");
        let targets = panel["targets"].as_array().unwrap_or_else(|| panic!("{at}: no targets"));
        assert!(!targets.is_empty(), "{at}: no targets");
        for target in targets {
            let at = format!("{at} target {}", target["refId"]);
            assert_eq!(target["datasource"], ours, "{at}: must use the datasource variable");
            let expr = target["expr"].as_str().unwrap_or_else(|| panic!("{at}: no expr"));
            exprs.push(Expr { promql: substitute(expr, &names, &at), at });
        }
    }
    exprs
}

fn yaml(path: &Path) -> serde_yaml::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn dashboards_and_alert_rules_parse_and_query_only_exported_metrics() {
    let root = repo();
    let mut uids = BTreeSet::new();
    let mut exprs = Vec::new();
    let mut dashboards = 0;
    for entry in std::fs::read_dir(root.join("dashboards")).expect("read dashboards/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json") {
            exprs.extend(check_dashboard(&path, &mut uids));
            dashboards += 1;
        }
    }
    assert!(dashboards >= 4, "expected the fleet, replication, journal and I/O dashboards");

    let rules_file = root.join("deploy/prometheus/tidemark.rules.yml");
    let rules = yaml(&rules_file);
    let mut alerts = BTreeSet::new();
    for group in rules["groups"].as_sequence().expect("rule groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).expect("rule name");
            alerts.insert(name.to_string());
            let expr = rule["expr"].as_str().expect("rule expr");
            exprs.push(Expr { at: format!("tidemark.rules.yml {name}"), promql: expr.to_string() });
        }
    }
    for alert in [
        "TidemarkSiteDown",
        "TidemarkRpoAboveTarget",
        "TidemarkReplicationNotStreaming",
        "TidemarkJournalNearLimit",
        "TidemarkHistoryTrimmed",
        "TidemarkReplicationDiverged",
        "TidemarkGroupPoisoned",
    ] {
        assert!(alerts.contains(alert), "alert {alert} is missing from {}", rules_file.display());
    }

    // Every expression parses: promtool checks each as a recording rule, one group per
    // expression so that an error names where it came from.
    let dir = tempfile::tempdir().expect("tempdir");
    let mut groups = Vec::new();
    for (n, e) in exprs.iter().enumerate() {
        groups.push(serde_json::json!({"name": e.at, "rules": [{"record": format!("tidemark_check:expr_{n}"), "expr": e.promql}]}));
    }
    let check = dir.path().join("exprs.rules.yml");
    std::fs::write(&check, serde_yaml::to_string(&serde_json::json!({"groups": groups})).expect("yaml"))
        .expect("write rules");
    run_ok("promtool", &["check", "rules", check.to_str().expect("utf8")]);

    // Every metric they name is exported (docs/metrics.md is the list a running pair is held to
    // in the test above), with `_bucket`, `_sum` and `_count` only on histograms.
    let docs = documented();
    let mut unknown = Vec::new();
    let mut used = BTreeSet::new();
    for e in &exprs {
        for name in metric_names(&e.promql) {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| docs.get(*f).is_some_and(|k| k == "histogram")))
                .unwrap_or(&name);
            if docs.contains_key(family) || PROMETHEUS_SYNTHETIC.contains(&family) {
                used.insert(family.to_string());
            } else {
                unknown.push(format!("{}: {name}", e.at));
            }
        }
    }
    assert!(unknown.is_empty(), "dashboards and rules name metrics no site exports:\n{}", unknown.join("\n"));
    for key in ["tidemark_replication_rpo_seconds", "tidemark_nbd_operation_duration_seconds", "up"] {
        assert!(used.contains(key), "the extractor found no use of {key}: {used:?}");
    }

    // The rules as a whole, their unit tests, and the example Prometheus configuration.
    run_ok("promtool", &["check", "rules", rules_file.to_str().expect("utf8")]);
    let tests = root.join("deploy/prometheus/tidemark.rules.test.yml");
    run_ok("promtool", &["test", "rules", tests.to_str().expect("utf8")]);
    let config = root.join("deploy/prometheus/prometheus.yml");
    run_ok("promtool", &["check", "config", config.to_str().expect("utf8")]);

    // Grafana provisioning: a file provider and a Prometheus data source.
    let provider = yaml(&root.join("dashboards/provisioning/dashboards/tidemark.yaml"));
    assert_eq!(provider["apiVersion"].as_u64(), Some(1));
    let path = provider["providers"][0]["options"]["path"].as_str().expect("provider path");
    assert_eq!(provider["providers"][0]["type"].as_str(), Some("file"));
    let compose = std::fs::read_to_string(root.join("deploy/compose.yaml")).expect("compose");
    assert!(
        compose.contains(&format!("../dashboards:{path}:ro")),
        "compose must mount dashboards/ at {path}"
    );
    let sources = yaml(&root.join("dashboards/provisioning/datasources/prometheus.yaml"));
    assert_eq!(sources["datasources"][0]["type"].as_str(), Some("prometheus"));
}

#[test]
fn the_metric_name_extractor_finds_names_and_only_names() {
    let found = metric_names(
        r#"histogram_quantile(0.99, sum by (instance, le) (rate(a_seconds_bucket{job=~".*", x="sum(b)"}[5m])))
           / on (group) group_left (role) max without (le) (b_total offset 1h) > bool 1e-9
           or label_replace(c{d="e"} == 1, "health", "$1", "state", "(.*)") unless sum(vector(0)) and topk(3, up)"#,
    );
    let expected: BTreeSet<String> =
        ["a_seconds_bucket", "b_total", "c", "up"].iter().map(|s| s.to_string()).collect();
    assert_eq!(found, expected);
    let vars: BTreeSet<String> = ["group".to_string()].into();
    assert_eq!(
        substitute(
            r#"rate(x{group=~"$group", g="${group:regex}"}[$__rate_interval]) / $__range_s"#,
            &vars,
            "t"
        ),
        r#"rate(x{group=~".*", g=".*"}[1m]) / 3600"#
    );
}

/// A Prometheus server (Debian's package) with its data in a temporary directory; killed when
/// dropped.
struct Prometheus {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[&Site]) -> Prometheus {
        let targets: Vec<String> = targets.iter().map(|s| format!("\"{}\"", s.metrics)).collect();
        let rules = repo().join("deploy/prometheus/tidemark.rules.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: tidemark\n    static_configs:\n      - targets: [{}]\n",
            rules.display(),
            targets.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let addr = format!("127.0.0.1:{}", free_port());
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("prometheus log");
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("log"))
            .stderr(log_file)
            .spawn()
            .expect("start prometheus");
        let prometheus = Prometheus { child, addr, log };
        wait_for("prometheus to be ready", PROMETHEUS_DEADLINE, || {
            ureq::get(format!("http://{}/-/ready", prometheus.addr)).call().is_ok()
        });
        prometheus
    }

    fn api(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let mut request = ureq::get(format!("http://{}/api/v1/{path}", self.addr));
        for (k, v) in params {
            request = request.query(*k, *v);
        }
        let body: Value = request
            .call()
            .unwrap_or_else(|e| panic!("prometheus {path} {params:?}: {e}\nlog: {}", self.log()))
            .body_mut()
            .read_json()
            .expect("prometheus JSON");
        assert_eq!(body["status"], "success", "{body}");
        body["data"].clone()
    }

    /// The value now of an expression that selects one series, if it has one.
    fn value(&self, expr: &str) -> Option<f64> {
        let data = self.api("query", &[("query", expr)]);
        let result = data["result"].as_array().expect("result");
        assert!(result.len() <= 1, "{expr} selects several series: {data}");
        result.first().map(|r| r["value"][1].as_str().expect("value").parse().expect("number"))
    }

    /// (unix seconds, value) of one series over [start, end], a sample a second.
    fn range(&self, expr: &str, start: f64, end: f64) -> Vec<(f64, f64)> {
        let (start, end) = (format!("{start:.3}"), format!("{end:.3}"));
        let data =
            self.api("query_range", &[("query", expr), ("start", &start), ("end", &end), ("step", "1")]);
        let result = data["result"].as_array().expect("result");
        assert_eq!(result.len(), 1, "{expr} must select one series: {data}");
        result[0]["values"]
            .as_array()
            .expect("values")
            .iter()
            .map(|p| (p[0].as_f64().expect("time"), p[1].as_str().expect("value").parse().expect("number")))
            .collect()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_seconds() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs_f64()
}

/// The interruption is a partition of the link, both ways, by simnet between the two sites'
/// replication endpoints: the primary keeps taking writes that cannot reach the partner, until
/// the partition heals.
#[test]
fn prometheus_sees_rpo_and_lag_rise_during_a_partition_and_fall_as_replication_catches_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let a = Site::start(&dir.path().join("a"));
    let b = Site::start(&dir.path().join("b"));
    // Site a reaches its partner only through simnet (a metro link: 2 ms, 1 Gbit/s).
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let profile = simnet::Profile::load("metro").expect("metro profile");
    let link = runtime
        .block_on(simnet::Simnet::start(simnet::SimnetConfig::new(
            "127.0.0.1:0".parse().expect("addr"),
            b.repl,
            profile.settings,
        )))
        .expect("start simnet");
    let fa = a.cli_json(&["site", "show"])["fingerprint"].as_str().expect("fingerprint").to_string();
    let fb = b.cli_json(&["site", "show"])["fingerprint"].as_str().expect("fingerprint").to_string();
    a.cli_ok(&["partner", "add", "b", "--address", &link.listen_addr().to_string(), "--fingerprint", &fb]);
    b.cli_ok(&["partner", "add", "a", "--address", &a.repl.to_string(), "--fingerprint", &fa]);

    let prometheus_dir = dir.path().join("prometheus");
    std::fs::create_dir_all(&prometheus_dir).expect("mkdir");
    let prometheus = Prometheus::start(&prometheus_dir, &[&a, &b]);
    let start = now_seconds();

    a.cli_ok(&["group", "create", "g"]);
    a.cli_ok(&["volume", "create", "v", "--size", "64MiB", "--group", "g"]);
    a.cli_ok(&["group", "protect", "g", "--partner", "b"]);
    run_ok("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4M", &a.uri("v")]);
    wait_caught_up(&a);
    let at_a = format!("job=\"tidemark\", instance=\"{}\", group=\"g\"", a.metrics);
    let rpo = format!("tidemark_replication_rpo_seconds{{{at_a}}}");
    let lag = format!("tidemark_replication_lag_records{{{at_a}}}");
    let streaming = format!("tidemark_replication_state{{{at_a}, state=\"streaming\"}}");
    wait_for("prometheus to scrape a streaming, caught-up primary", PROMETHEUS_DEADLINE, || {
        prometheus.value(&streaming) == Some(1.0) && prometheus.value(&lag) == Some(0.0)
    });

    // Cut the link, and keep writing: a write a second for four seconds.
    let cut_at = now_seconds();
    link.partition(simnet::Ways::Both);
    for i in 0..4u64 {
        let command = format!("write -P {} {} 1M", i + 2, (i + 4) << 20);
        run_ok("qemu-io", &["-f", "raw", "-c", &command, &a.uri("v")]);
        std::thread::sleep(Duration::from_secs(1));
    }
    wait_for("prometheus to see an RPO of 3 s and a lag", PROMETHEUS_DEADLINE, || {
        prometheus.value(&rpo).is_some_and(|v| v >= 3.0) && prometheus.value(&lag).is_some_and(|v| v >= 4.0)
    });
    assert!(link.stats().a_to_b.dropped.partition > 0, "the partition dropped nothing: {:?}", link.stats());

    let healed_at = now_seconds();
    link.heal(simnet::Ways::Both);
    wait_caught_up(&a);
    let caught_up_at = now_seconds();
    // A range query's samples are evaluated a step (1 s) apart, each showing the newest scrape
    // before it: wait for scrapes two steps past the catch-up, so the range ends on them.
    wait_for("prometheus to scrape the caught-up primary", PROMETHEUS_DEADLINE, || {
        prometheus.value(&format!("{rpo} == 0 and {lag} == 0")).is_some()
            && prometheus.value(&format!("timestamp({lag})")).is_some_and(|t| t > caught_up_at + 2.0)
    });
    let end = now_seconds();
    eprintln!(
        "partition {:.1}s, caught up {:.1}s after healing",
        healed_at - cut_at,
        caught_up_at - healed_at
    );

    let rpo_series = prometheus.range(&rpo, start, end);
    let lag_series = prometheus.range(&lag, start, end);
    let during = |s: &[(f64, f64)]| {
        s.iter().filter(|(t, _)| *t >= cut_at && *t <= healed_at + 1.0).map(|(_, v)| *v).fold(0.0, f64::max)
    };
    assert!(during(&rpo_series) >= 3.0, "RPO never rose during the partition: {rpo_series:?}");
    assert!(during(&lag_series) >= 4.0, "lag never rose during the partition: {lag_series:?}");
    for (name, s) in [("RPO", &rpo_series), ("lag", &lag_series)] {
        // Evaluation times trail the scrapes they show by up to a step.
        let zero_before = s.iter().any(|(t, v)| *t < cut_at + 1.0 && *v == 0.0);
        assert!(zero_before, "{name} was never 0 before the partition: {s:?}");
        let (last_t, last) = *s.last().expect("samples");
        assert!(last == 0.0 && last_t > caught_up_at, "{name} did not come back to 0: {s:?}");
        // Once caught up, it stays caught up (nothing is written after the partition).
        let peak =
            s.iter().enumerate().filter(|(_, (t, _))| *t >= cut_at).max_by(|x, y| x.1 .1.total_cmp(&y.1 .1));
        let (peak_index, _) = peak.expect("a peak");
        let settled =
            s[peak_index..].iter().position(|(_, v)| *v == 0.0).expect("a return to 0") + peak_index;
        assert!(s[settled..].iter().all(|(_, v)| *v == 0.0), "{name} rose again after catching up: {s:?}");
    }

    // Both sites were up throughout, and every alert rule evaluated without error on real data.
    for site in [&a, &b] {
        assert_eq!(prometheus.value(&format!("up{{instance=\"{}\"}}", site.metrics)), Some(1.0));
    }
    for group in prometheus.api("rules", &[])["groups"].as_array().expect("rule groups") {
        for rule in group["rules"].as_array().expect("rules") {
            assert_eq!(
                rule["health"], "ok",
                "rule {} failed on real data: {}",
                rule["name"], rule["lastError"]
            );
        }
    }
    runtime.block_on(link.shutdown());
}
