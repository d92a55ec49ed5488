//! The client subcommands: each validates its input locally for a quick, clear error, sends
//! the operator's text to the API unchanged, and prints the answer for people or as JSON.

use std::io::IsTerminal;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use tidemark_engine::Point;
use tidemark_site::names::validate_name;
use tidemark_site::units::{format_bytes, parse_duration, parse_size_bytes};
use tidemark_site::Config;

use crate::client::{resolve_token, segment, ApiClient, API_URL_DEFAULT};
use crate::output::{items, key_values, list, number, point, print_json, seconds, text, Table};
use crate::{
    BookmarkCommand, Cli, Command, GroupCommand, ImageCommand, PartnerCommand, RollbackArgs, SiteCommand,
    VolumeCommand,
};

/// How often a running job is polled, in milliseconds.
pub const JOB_POLL_INTERVAL_MILLIS: u64 = 200;
/// Consecutive failed polls of a job after which the client gives up (the job keeps running).
pub const JOB_POLL_FAILURES_MAX: u32 = 10;

/// Run a subcommand: `serve`, or a client of the API.
pub fn run(cli: &Cli) -> Result<()> {
    let json = cli.json;
    match &cli.command {
        Command::Serve(args) => crate::serve::run(cli, args),
        Command::Group(command) => group(&connect(cli)?, json, command),
        Command::Volume(command) => volume(&connect(cli)?, json, command),
        Command::Bookmark(command) => bookmark(&connect(cli)?, json, command),
        Command::Site(SiteCommand::Show) => site(&connect(cli)?, json),
        Command::Partner(command) => partner(&connect(cli)?, json, command),
        Command::History { group } => history(&connect(cli)?, json, group),
        Command::Rollback(args) => rollback(&connect(cli)?, json, args),
        Command::Image(command) => image(&connect(cli)?, json, command),
        Command::Status => status(&connect(cli)?, json),
        Command::Events { since, limit } => events(&connect(cli)?, json, since.as_deref(), *limit),
        Command::Up(args) => crate::drill::up(cli, args),
        Command::Drill(args) => crate::drill::drill(args),
    }
}

/// Work out the API address and token from flags, the environment and the config file.
fn connect(cli: &Cli) -> Result<ApiClient> {
    let config = cli.config.as_deref().map(|path| Config::load(Some(path))).transpose()?;
    let base = match (&cli.api, &config) {
        (Some(url), _) => url.clone(),
        (None, Some(config)) => format!("http://{}", reachable(config.api.listen)),
        (None, None) => API_URL_DEFAULT.to_string(),
    };
    let data_dir = cli
        .data_dir
        .clone()
        .or_else(|| config.as_ref().map(|c| c.site.data_dir.clone()))
        .unwrap_or_else(|| PathBuf::from("tidemark-data"));
    let token = resolve_token(cli.token.clone(), &data_dir)?;
    Ok(ApiClient::new(&base, token))
}

/// A listener bound to every address is reached on loopback.
fn reachable(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

fn group(api: &ApiClient, json: bool, command: &GroupCommand) -> Result<()> {
    match command {
        GroupCommand::Create { name, retention, journal_max } => {
            validate_name("group", name)?;
            let mut body = Map::new();
            body.insert("name".into(), json!(name));
            if let Some(retention) = retention {
                parse_duration(retention)?;
                body.insert("retention".into(), json!(retention));
            }
            if let Some(journal_max) = journal_max {
                parse_size_bytes(journal_max)?;
                body.insert("journal_max".into(), json!(journal_max));
            }
            let info = api.post("/v1/groups", &Value::Object(body))?;
            if json {
                return print_json(&info);
            }
            println!(
                "created group {} (retention {}, journal max {})",
                text(&info, "name"),
                seconds(number(&info, "retention_seconds")),
                format_bytes(number(&info, "journal_max_bytes"))
            );
        }
        GroupCommand::List => {
            let groups = api.get("/v1/groups")?;
            if json {
                return print_json(&groups);
            }
            let mut table = Table::new(&["NAME", "VOLUMES", "LAST SEQ", "JOURNAL", "RETENTION", "STATE"]);
            for g in list(&groups) {
                table.row(vec![
                    text(g, "name"),
                    items(g, "volumes").len().to_string(),
                    number(g, "last_seq").to_string(),
                    format!(
                        "{} / {}",
                        format_bytes(number(g, "journal_bytes")),
                        format_bytes(number(g, "journal_max_bytes"))
                    ),
                    seconds(number(g, "retention_seconds")),
                    text(g, "state"),
                ]);
            }
            table.print()?;
        }
        GroupCommand::Protect { group, partner, overflow, wait } => {
            validate_name("group", group)?;
            let p = api.post(
                &format!("/v1/groups/{}/protect", segment(group)),
                &json!({ "partner": partner, "overflow": overflow }),
            )?;
            if *wait {
                let r = wait_for_sync(api, group)?;
                if json {
                    return print_json(&r);
                }
                println!(
                    "group {group} is protected to partner {partner} and caught up: {}",
                    replication_line(&r)
                );
                return Ok(());
            }
            if json {
                return print_json(&p);
            }
            println!(
                "protecting group {group} to partner {partner}; `tidemark group show {group}` shows progress"
            );
        }
        GroupCommand::Unprotect { group } => {
            api.post(&format!("/v1/groups/{}/unprotect", segment(group)), &json!({}))?;
            println!("group {group} is no longer replicated; the partner keeps its copy");
        }
        GroupCommand::Pause { group } => {
            api.post(&format!("/v1/groups/{}/pause", segment(group)), &json!({}))?;
            println!("paused replication of group {group}");
        }
        GroupCommand::Resume { group } => {
            api.post(&format!("/v1/groups/{}/resume", segment(group)), &json!({}))?;
            println!("resumed replication of group {group}");
        }
        GroupCommand::Swap { group } => {
            validate_name("group", group)?;
            let s = api.post(&format!("/v1/groups/{}/swap", segment(group)), &json!({}))?;
            if json {
                return print_json(&s);
            }
            println!(
                "swapped roles of group {group} in {:.2}s: generation {}, no data lost (both sites at seq {}); \
                 hosts must reconnect to the new primary's exports",
                s["seconds"].as_f64().unwrap_or_default(),
                number(&s, "generation"),
                number(&s, "last_seq")
            );
        }
        GroupCommand::Takeover { group, at, force, yes } => {
            validate_name("group", group)?;
            if let Some(at) = at {
                Point::from_str(at)?;
            }
            if !yes {
                eprintln!(
                    "this makes this site's copy of group {group} the primary{}, under a new generation. Writes the old \
                     primary made that never arrived here are not in it; when the old primary returns it keeps them \
                     as a read-only salvage image, rewinds, and follows this site.",
                    at.as_ref().map(|a| format!(" at {a}")).unwrap_or_default()
                );
                bail!("not taking over without --yes");
            }
            let body = json!({ "at": at, "force": force });
            let t = api.post(&format!("/v1/groups/{}/takeover", segment(group)), &body)?;
            if json {
                return print_json(&t);
            }
            println!(
                "group {group} is primary here under generation {} ({:.2}s); fork point seq {} ({}){}",
                number(&t, "generation"),
                t["seconds"].as_f64().unwrap_or_default(),
                number(&t, "fork_seq"),
                text(&t, "fork_time"),
                if text(&t, "partner").is_empty() {
                    String::new()
                } else {
                    format!("; protecting to {} when it returns", text(&t, "partner"))
                }
            );
        }
        GroupCommand::Show { name } => {
            let g = api.get(&format!("/v1/groups/{}", segment(name)))?;
            if json {
                return print_json(&g);
            }
            let volumes: Vec<String> =
                items(&g, "volumes").iter().filter_map(Value::as_str).map(str::to_string).collect();
            let mut state = text(&g, "state");
            let reason = text(&g, "state_reason");
            if !reason.is_empty() {
                state = format!("{state}: {reason}");
            }
            print!(
                "{}",
                key_values(&[
                    ("name", text(&g, "name")),
                    ("state", state),
                    ("volumes", if volumes.is_empty() { "(none)".into() } else { volumes.join(", ") }),
                    ("last seq", number(&g, "last_seq").to_string()),
                    (
                        "oldest point",
                        format!("seq:{} ({})", number(&g, "oldest_seq"), text(&g, "oldest_point"))
                    ),
                    ("newest point", text(&g, "newest_point")),
                    ("role", format!("{} (generation {})", text(&g, "role"), number(&g, "generation"))),
                    (
                        "partner",
                        if text(&g, "partner").is_empty() { "(none)".into() } else { text(&g, "partner") }
                    ),
                    ("replication", replication_line(&g["replication"])),
                    (
                        "fork point",
                        if g["fork_point"].is_null() {
                            "(none)".into()
                        } else {
                            format!(
                                "seq:{} ({}), generation {}",
                                number(&g["fork_point"], "seq"),
                                text(&g["fork_point"], "time"),
                                number(&g["fork_point"], "generation")
                            )
                        }
                    ),
                    ("retention", seconds(number(&g, "retention_seconds"))),
                    (
                        "journal",
                        format!(
                            "{} of {}",
                            format_bytes(number(&g, "journal_bytes")),
                            format_bytes(number(&g, "journal_max_bytes"))
                        ),
                    ),
                ])
            );
        }
    }
    Ok(())
}

fn replication_line(r: &Value) -> String {
    if r.is_null() {
        return "(not replicated)".into();
    }
    let mut line = format!(
        "{}, acked seq {}, lag {} records / {}, rpo {:.1}s, sent {} ({} compressed)",
        text(r, "state"),
        number(r, "acked_seq"),
        number(r, "lag_records"),
        format_bytes(number(r, "lag_bytes")),
        r["rpo_seconds"].as_f64().unwrap_or(0.0),
        format_bytes(number(r, "bytes_sent_total")),
        format_bytes(number(r, "bytes_sent_compressed_total")),
    );
    let baseline = &r["baseline"];
    if text(r, "state") == "baseline" && !baseline.is_null() {
        line.push_str(&format!(
            "; baseline at seq {}: {} of {}",
            number(baseline, "seq"),
            format_bytes(number(baseline, "bytes_done")),
            format_bytes(number(baseline, "bytes_total"))
        ));
    }
    let error = text(r, "last_error");
    if !error.is_empty() {
        line.push_str(&format!("; last error: {error}"));
    }
    line
}

fn site(api: &ApiClient, json: bool) -> Result<()> {
    let s = api.get("/v1/site")?;
    if json {
        return print_json(&s);
    }
    print!(
        "{}",
        key_values(&[
            ("name", text(&s, "name")),
            ("fingerprint", text(&s, "fingerprint")),
            ("replication address", text(&s, "replication_address")),
        ])
    );
    Ok(())
}

fn partner(api: &ApiClient, json: bool, command: &PartnerCommand) -> Result<()> {
    match command {
        PartnerCommand::Add { name, address, fingerprint, bandwidth_limit_mbit } => {
            validate_name("partner", name)?;
            let p = api.post(
                "/v1/partners",
                &json!({
                    "name": name,
                    "address": address,
                    "fingerprint": fingerprint,
                    "bandwidth_limit_mbit": bandwidth_limit_mbit,
                }),
            )?;
            if json {
                return print_json(&p);
            }
            println!(
                "added partner {} at {} ({})",
                text(&p, "name"),
                text(&p, "address"),
                text(&p, "fingerprint")
            );
        }
        PartnerCommand::List => {
            let partners = api.get("/v1/partners")?;
            if json {
                return print_json(&partners);
            }
            let mut table = Table::new(&["NAME", "ADDRESS", "LIMIT", "FINGERPRINT"]);
            for p in list(&partners) {
                let limit =
                    p["bandwidth_limit_mbit"].as_u64().map_or("none".into(), |m| format!("{m} Mbit/s"));
                table.row(vec![text(p, "name"), text(p, "address"), limit, text(p, "fingerprint")]);
            }
            table.print()?;
        }
        PartnerCommand::Remove { name } => {
            api.delete(&format!("/v1/partners/{}", segment(name)))?;
            println!("removed partner {name}");
        }
    }
    Ok(())
}

fn volume(api: &ApiClient, json: bool, command: &VolumeCommand) -> Result<()> {
    match command {
        VolumeCommand::Create { name, size, group, block_size } => {
            validate_name("volume", name)?;
            validate_name("group", group)?;
            parse_size_bytes(size)?;
            let info = api.post(
                "/v1/volumes",
                &json!({ "name": name, "group": group, "size": size, "block_size": block_size }),
            )?;
            if json {
                return print_json(&info);
            }
            println!(
                "created volume {} in group {} ({}, {}-byte blocks); NBD export {}",
                text(&info, "name"),
                text(&info, "group"),
                format_bytes(number(&info, "size_bytes")),
                number(&info, "block_size_bytes"),
                text(&info, "name")
            );
        }
        VolumeCommand::List => {
            let volumes = api.get("/v1/volumes")?;
            if json {
                return print_json(&volumes);
            }
            let mut table = Table::new(&["NAME", "GROUP", "SIZE", "BLOCK SIZE"]);
            for v in list(&volumes) {
                table.row(vec![
                    text(v, "name"),
                    text(v, "group"),
                    format_bytes(number(v, "size_bytes")),
                    number(v, "block_size_bytes").to_string(),
                ]);
            }
            table.print()?;
        }
        VolumeCommand::Show { name } => {
            let v = api.get(&format!("/v1/volumes/{}", segment(name)))?;
            if json {
                return print_json(&v);
            }
            print!("{}", volume_lines(&v));
        }
        VolumeCommand::Resize { name, size } => {
            parse_size_bytes(size)?;
            let v = api.post(&format!("/v1/volumes/{}/resize", segment(name)), &json!({ "size": size }))?;
            if json {
                return print_json(&v);
            }
            println!("resized volume {} to {}", text(&v, "name"), format_bytes(number(&v, "size_bytes")));
        }
        VolumeCommand::Delete { name } => {
            api.delete(&format!("/v1/volumes/{}", segment(name)))?;
            println!("deleted volume {name}");
        }
    }
    Ok(())
}

fn volume_lines(v: &Value) -> String {
    let size = number(v, "size_bytes");
    key_values(&[
        ("name", text(v, "name")),
        ("group", text(v, "group")),
        ("size", format!("{} ({size} bytes)", format_bytes(size))),
        ("block size", format!("{} bytes", number(v, "block_size_bytes"))),
        ("export", text(v, "name")),
    ])
}

fn bookmark(api: &ApiClient, json: bool, command: &BookmarkCommand) -> Result<()> {
    match command {
        BookmarkCommand::Create { group, name } => {
            validate_name("group", group)?;
            validate_name("bookmark", name)?;
            let b =
                api.post(&format!("/v1/groups/{}/bookmarks", segment(group)), &json!({ "name": name }))?;
            if json {
                return print_json(&b);
            }
            println!("created bookmark {} in group {group} at {}", text(&b, "name"), point(&b["point"]));
        }
        BookmarkCommand::List { group } => {
            let bookmarks = api.get(&format!("/v1/groups/{}/bookmarks", segment(group)))?;
            if json {
                return print_json(&bookmarks);
            }
            bookmark_table(list(&bookmarks)).print()?;
        }
    }
    Ok(())
}

fn bookmark_table(bookmarks: &[Value]) -> Table {
    let mut table = Table::new(&["NAME", "SEQ", "TIME"]);
    for b in bookmarks {
        table.row(vec![text(b, "name"), number(&b["point"], "seq").to_string(), text(&b["point"], "time")]);
    }
    table
}

fn history(api: &ApiClient, json: bool, group: &str) -> Result<()> {
    let h = api.get(&format!("/v1/groups/{}/history", segment(group)))?;
    if json {
        return print_json(&h);
    }
    print!(
        "{}",
        key_values(&[
            ("group", text(&h, "group")),
            ("oldest", point(&h["oldest"])),
            ("newest", point(&h["newest"]))
        ])
    );
    let bookmarks = items(&h, "bookmarks");
    println!("\nbookmarks:");
    if bookmarks.is_empty() {
        println!("(none)");
    } else {
        bookmark_table(bookmarks).print()?;
    }
    let rollbacks = items(&h, "rollbacks");
    println!("\nrollbacks:");
    if rollbacks.is_empty() {
        println!("(none)");
    } else {
        let mut table = Table::new(&["TO", "BEFORE", "AFTER", "REWRITTEN"]);
        for r in rollbacks {
            table.row(vec![
                point(&r["target"]),
                point(&r["before"]),
                point(&r["after"]),
                format_bytes(number(r, "bytes_rewritten")),
            ]);
        }
        table.print()?;
    }
    let changes = items(&h, "role_changes");
    println!("\nrole changes:");
    if changes.is_empty() {
        println!("(none)");
    } else {
        let mut table = Table::new(&["TIME", "FROM", "TO", "GENERATION", "REASON"]);
        for c in changes {
            table.row(vec![
                text(c, "time"),
                text(c, "from"),
                text(c, "to"),
                number(c, "generation").to_string(),
                text(c, "reason"),
            ]);
        }
        table.print()?;
    }
    Ok(())
}

fn rollback(api: &ApiClient, json: bool, args: &RollbackArgs) -> Result<()> {
    validate_name("group", &args.group)?;
    let (body, what) = match &args.to {
        Some(to) => {
            Point::from_str(to)?;
            (json!({ "to": to }), format!("to {to}"))
        }
        None => (json!({ "undo": true }), "back to where it was before its last rollback".to_string()),
    };
    let group_path = format!("/v1/groups/{}", segment(&args.group));
    if !args.yes {
        let g = api.get(&group_path)?;
        let volumes: Vec<&str> = items(&g, "volumes").iter().filter_map(Value::as_str).collect();
        eprintln!(
            "this would roll group {} {what}: every block of its volumes ({}) that changed since then is rewritten \
             with its old contents, and hosts attached to them see the old data at once. The rollback is journaled \
             and can itself be undone with `tidemark rollback {} --undo --yes`.",
            args.group,
            if volumes.is_empty() { "none".to_string() } else { volumes.join(", ") },
            args.group
        );
        bail!("not rolling back without --yes");
    }

    let started = api.post(&format!("{group_path}/rollback"), &body)?;
    let Some(job) = started.get("job").and_then(Value::as_u64) else {
        bail!("the API started a rollback but sent no job id: {started}");
    };
    let finished = wait_for_job(api, job, &args.group)?;
    if json {
        return print_json(&finished);
    }
    match text(&finished, "state").as_str() {
        "done" => {
            let result = &finished["result"];
            println!(
                "rolled back group {} {what}: now at {}, {} rewritten (job {job}); undo with `tidemark rollback {} --undo --yes`",
                args.group,
                point(&result["after"]),
                format_bytes(number(result, "bytes_rewritten")),
                args.group
            );
            Ok(())
        }
        _ => bail!("rollback of group {} failed (job {job}): {}", args.group, text(&finished, "error")),
    }
}

/// A byte progress bar with `message` on a terminal; hidden otherwise.
fn progress_bar(message: String) -> Result<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return Ok(ProgressBar::hidden());
    }
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
            .context("build progress bar style")?
            .progress_chars("=> "),
    );
    bar.set_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    Ok(bar)
}

/// Poll a group until its partner has caught up (streaming, no lag), showing the baseline's
/// progress, then the lag, on a terminal. Stops with an error when replication stops for good
/// (diverged, fenced) or the group is paused; Ctrl-C stops waiting, not replicating.
fn wait_for_sync(api: &ApiClient, group: &str) -> Result<Value> {
    let bar = progress_bar(format!("{group}: connecting"))?;
    let path = format!("/v1/groups/{}", segment(group));
    loop {
        let g = api.get(&path)?;
        let r = &g["replication"];
        match text(r, "state").as_str() {
            "streaming" if number(r, "lag_records") == 0 => {
                bar.finish_and_clear();
                return Ok(r.clone());
            }
            "baseline" => {
                bar.set_message(format!("{group}: baseline at seq {}", number(&r["baseline"], "seq")));
                bar.set_length(number(&r["baseline"], "bytes_total"));
                bar.set_position(number(&r["baseline"], "bytes_done"));
            }
            "diverged" | "fenced" | "paused" => {
                bar.abandon();
                bail!("replication of group {group} stopped: {}", replication_line(r));
            }
            state => {
                bar.set_message(format!("{group}: {state}, {} records behind", number(r, "lag_records")));
                bar.set_length(0);
            }
        }
        std::thread::sleep(Duration::from_millis(JOB_POLL_INTERVAL_MILLIS));
    }
}

/// Poll a job until it is no longer running, showing progress on a terminal.
fn wait_for_job(api: &ApiClient, job: u64, group: &str) -> Result<Value> {
    let bar = progress_bar(format!("rolling back {group}"))?;
    let path = format!("/v1/jobs/{job}");
    let mut failures = 0;
    let started = Instant::now();
    loop {
        match api.get(&path) {
            Ok(view) => {
                failures = 0;
                let progress = &view["progress"];
                bar.set_length(number(progress, "total_bytes"));
                bar.set_position(number(progress, "done_bytes"));
                if text(&view, "state") != "running" {
                    bar.finish_and_clear();
                    return Ok(view);
                }
            }
            Err(e) => {
                failures += 1;
                if failures >= JOB_POLL_FAILURES_MAX {
                    bar.abandon();
                    return Err(e.context(format!(
                        "lost track of rollback job {job} after {:.0?}; it may still be running: check `tidemark history {group}`",
                        started.elapsed()
                    )));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(JOB_POLL_INTERVAL_MILLIS));
    }
}

fn image(api: &ApiClient, json: bool, command: &ImageCommand) -> Result<()> {
    match command {
        ImageCommand::Create { group, at, name, writable } => {
            validate_name("group", group)?;
            validate_name("image", name)?;
            Point::from_str(at)?;
            let i = api.post(
                "/v1/images",
                &json!({ "group": group, "at": at, "name": name, "writable": writable }),
            )?;
            if json {
                return print_json(&i);
            }
            let exports: Vec<&str> = items(&i, "exports").iter().filter_map(Value::as_str).collect();
            println!(
                "created {} image {} of group {} at {}; NBD exports: {}",
                text(&i, "mode"),
                text(&i, "name"),
                text(&i, "group"),
                point(&i["point"]),
                if exports.is_empty() { "(none)".to_string() } else { exports.join(", ") }
            );
        }
        ImageCommand::List => {
            let images = api.get("/v1/images")?;
            if json {
                return print_json(&images);
            }
            let mut table = Table::new(&["NAME", "GROUP", "POINT", "MODE", "EXPORTS"]);
            for i in list(&images) {
                let exports: Vec<&str> = items(i, "exports").iter().filter_map(Value::as_str).collect();
                table.row(vec![
                    text(i, "name"),
                    text(i, "group"),
                    point(&i["point"]),
                    text(i, "mode"),
                    exports.join(","),
                ]);
            }
            table.print()?;
        }
        ImageCommand::Delete { name } => {
            api.delete(&format!("/v1/images/{}", segment(name)))?;
            println!("deleted image {name}");
        }
    }
    Ok(())
}

fn status(api: &ApiClient, json: bool) -> Result<()> {
    let s = api.get("/v1/status")?;
    if json {
        return print_json(&s);
    }
    let problems: Vec<String> = items(&s, "groups_not_ok")
        .iter()
        .map(|g| {
            let reason = text(g, "reason");
            if reason.is_empty() {
                format!("{} {}", text(g, "name"), text(g, "state"))
            } else {
                format!("{} {}: {reason}", text(g, "name"), text(g, "state"))
            }
        })
        .collect();
    print!(
        "{}",
        key_values(&[
            ("site", text(&s, "site")),
            ("version", text(&s, "version")),
            ("uptime", seconds(number(&s, "uptime_seconds"))),
            ("api", text(&s["listeners"], "api")),
            ("nbd", text(&s["listeners"], "nbd")),
            ("groups", number(&s, "groups").to_string()),
            ("volumes", number(&s, "volumes").to_string()),
            ("images", number(&s, "images").to_string()),
            ("jobs running", number(&s, "jobs_running").to_string()),
            ("groups not ok", if problems.is_empty() { "none".into() } else { problems.join("; ") }),
        ])
    );
    Ok(())
}

fn events(api: &ApiClient, json: bool, since: Option<&str>, limit: Option<usize>) -> Result<()> {
    let mut query = Vec::new();
    if let Some(since) = since {
        query.push(format!("since={}", segment(&since_time(since, SystemTime::now())?)));
    }
    if let Some(limit) = limit {
        query.push(format!("limit={limit}"));
    }
    let path =
        if query.is_empty() { "/v1/events".to_string() } else { format!("/v1/events?{}", query.join("&")) };
    let events = api.get(&path)?;
    if json {
        return print_json(&events);
    }
    let mut table = Table::new(&["TIME", "SOURCE", "ACTION", "WHO", "RESULT", "MESSAGE"]);
    for e in list(&events) {
        table.row(vec![
            text(e, "time"),
            text(e, "source"),
            text(e, "action"),
            text(e, "who"),
            text(e, "result"),
            text(e, "message"),
        ]);
    }
    table.print()?;
    Ok(())
}

/// `--since` as RFC 3339: a time as given, or a duration before `now`.
fn since_time(since: &str, now: SystemTime) -> Result<String> {
    if humantime::parse_rfc3339_weak(since).is_ok() {
        return Ok(since.to_string());
    }
    let ago = parse_duration(since.trim_start_matches('-')).with_context(|| {
        format!("invalid --since {since:?}: expected an RFC 3339 time or a duration such as 1h")
    })?;
    let at = now.checked_sub(ago).context("--since reaches before 1970")?;
    Ok(humantime::format_rfc3339(at).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_accepts_times_and_durations_ago() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(10_000);
        assert_eq!(since_time("2024-05-01T12:00:00Z", now).expect("time"), "2024-05-01T12:00:00Z");
        assert_eq!(since_time("1h", now).expect("ago"), "1970-01-01T01:46:40Z");
        assert_eq!(since_time("-1h", now).expect("ago"), "1970-01-01T01:46:40Z");
        assert!(since_time("whenever", now).is_err());
    }

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:7600".parse().expect("addr");
        assert_eq!(reachable(any), "127.0.0.1:7600".parse::<SocketAddr>().expect("addr"));
        let any6: SocketAddr = "[::]:7600".parse().expect("addr");
        assert_eq!(reachable(any6), "[::1]:7600".parse::<SocketAddr>().expect("addr"));
        let host: SocketAddr = "10.0.0.5:7600".parse().expect("addr");
        assert_eq!(reachable(host), host);
    }
}
