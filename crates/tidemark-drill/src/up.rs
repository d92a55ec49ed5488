//! `tidemark up`: a paired deployment on one machine for newcomers and demos. Two sites with
//! their own data directories and ports, joined through simnet, a protected demo group with
//! one volume, a printout of where everything is, and a clean stop on Ctrl-C.
//!
//! The layout is kept in `DIR/up.json`, so a second `tidemark up` in the same directory finds
//! its sites, their data and their pairing again.

use std::io::Write;
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;
use simnet::Profile;

use crate::pair::{Layout, Pair};
use crate::supervisor::{interrupted, SitePorts};

/// The demo group's name.
pub const DEMO_GROUP: &str = "demo";
/// The demo volume's name (and NBD export).
pub const DEMO_VOLUME: &str = "disk";
/// The demo volume's size in bytes (thin: it costs nothing until written).
pub const DEMO_VOLUME_BYTES: u64 = 1 << 30;
/// The sites' names.
pub const SITE_NAMES: [&str; 2] = ["site-a", "site-b"];
/// The file in the directory that records the layout.
pub const LAYOUT_FILE: &str = "up.json";
/// How long the demo group may take to start replicating.
const STREAMING_DEADLINE: Duration = Duration::from_secs(60);

/// How to run `tidemark up`.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The tidemark binary to start sites with.
    pub binary: PathBuf,
    /// Where the sites keep their data, configs and logs.
    pub dir: PathBuf,
    /// The link: a simnet profile name or file.
    pub profile: String,
    /// Pick free ports instead of the standard ones (only when the directory is new).
    pub free_ports: bool,
    /// How to call the CLI in the commands printed (`tidemark`, or the path it was run as).
    pub cli: String,
}

/// The standard layout: the ports of `config/site-a.toml` and `config/site-b.toml`, and the
/// relays next to them.
pub fn standard_layout() -> Layout {
    let at = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    Layout {
        sites: [
            SitePorts { nbd: at(10809), api: at(7600), repl: at(7601), metrics: at(9600) },
            SitePorts { nbd: at(10819), api: at(7610), repl: at(7611), metrics: at(9610) },
        ],
        relays: [at(7602), at(7612)],
        controls: [Some(at(7603)), Some(at(7613))],
    }
}

/// Run the pair until SIGINT or SIGTERM (the caller installs the handler,
/// [`crate::supervisor::install_signal_handler`]).
pub fn run_up(options: &UpOptions, out: &mut dyn Write) -> Result<(), String> {
    let profile = Profile::load(&options.profile).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&options.dir).map_err(|e| format!("create {}: {e}", options.dir.display()))?;
    let layout_path = options.dir.join(LAYOUT_FILE);
    let layout = match std::fs::read_to_string(&layout_path) {
        Ok(text) => serde_json::from_str::<Layout>(&text)
            .map_err(|e| format!("{}: {e}; delete the directory to start afresh", layout_path.display()))?,
        Err(_) if options.free_ports => {
            let mut ports = crate::supervisor::FreePorts::default();
            let free = Layout::free_from(&mut ports).map_err(|e| format!("find free ports: {e}"))?;
            let mut control = || ports.tcp().ok();
            Layout { controls: [control(), control()], ..free }
        }
        Err(_) => standard_layout(),
    };
    check_free(&layout)?;
    let text = serde_json::to_string_pretty(&layout).map_err(|e| e.to_string())?;
    std::fs::write(&layout_path, text + "\n").map_err(|e| format!("write {}: {e}", layout_path.display()))?;

    let names = SITE_NAMES.map(String::from);
    let _ = writeln!(out, "tidemark up: starting two sites in {} ...", options.dir.display());
    let _ = out.flush();
    let pair = Pair::start(&options.binary, &options.dir, &names, layout, profile.settings.clone(), 0)?;
    let ready = (|| {
        pair.join()?;
        pair.create_group(DEMO_GROUP, &[(DEMO_VOLUME.to_string(), DEMO_VOLUME_BYTES)])?;
        wait_streaming(&pair)
    })();
    if let Err(e) = ready {
        let _ = pair.shutdown();
        return Err(e);
    }
    let _ = write!(out, "{}", banner(&pair, &options.dir, &profile, &options.cli));
    let _ = out.flush();

    let mut pair = pair;
    let mut failed = None;
    while interrupted().is_none() {
        for site in pair.sites.iter_mut() {
            if let Some(status) = site.exited() {
                failed = Some(format!(
                    "site {} exited unexpectedly ({status}); its log {} ends:\n{}",
                    site.name,
                    site.log_path().display(),
                    crate::supervisor::tail(site.log_path(), 10)
                ));
            }
        }
        if failed.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = writeln!(out, "\ntidemark up: stopping both sites and the link ...");
    let _ = out.flush();
    let errors = pair.shutdown();
    if let Some(e) = failed {
        return Err(e);
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let _ = writeln!(
        out,
        "tidemark up: stopped cleanly; the data stays in {} (run `tidemark up` again to resume)",
        options.dir.display()
    );
    Ok(())
}

/// Refuse to start when a port is taken, naming it and what to do.
fn check_free(layout: &Layout) -> Result<(), String> {
    let taken = |what: &str, addr: SocketAddr| {
        format!("{what} {addr} is in use (is another site or `tidemark up` running?); stop it, or use another directory with `tidemark up --free-ports`")
    };
    for (i, site) in layout.sites.iter().enumerate() {
        let name = SITE_NAMES.get(i).copied().unwrap_or("site");
        for (what, addr) in [("NBD", site.nbd), ("API", site.api), ("metrics", site.metrics)] {
            TcpListener::bind(addr).map_err(|_| taken(&format!("{name}'s {what} port"), addr))?;
        }
        UdpSocket::bind(site.repl).map_err(|_| taken(&format!("{name}'s replication port"), site.repl))?;
    }
    for relay in layout.relays {
        UdpSocket::bind(relay).map_err(|_| taken("the link's port", relay))?;
    }
    for control in layout.controls.into_iter().flatten() {
        TcpListener::bind(control).map_err(|_| taken("the link's control port", control))?;
    }
    Ok(())
}

fn wait_streaming(pair: &Pair) -> Result<(), String> {
    let api = pair.sites[0].api()?;
    let started = Instant::now();
    loop {
        let g = api.get(&format!("/v1/groups/{DEMO_GROUP}"))?;
        let state = g.pointer("/replication/state").and_then(Value::as_str).unwrap_or("none");
        let role = g.get("role").and_then(Value::as_str).unwrap_or("none");
        // A second `up` after a swap finds site-b primary: it replicates the other way.
        if state == "streaming" || role == "secondary" {
            return Ok(());
        }
        if started.elapsed() > STREAMING_DEADLINE {
            return Err(format!(
                "the demo group did not start replicating within {} s (state {state})",
                STREAMING_DEADLINE.as_secs()
            ));
        }
        if interrupted().is_some() {
            return Err("interrupted".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn role(pair: &Pair, site: usize) -> String {
    pair.sites[site]
        .api()
        .and_then(|api| api.get(&format!("/v1/groups/{DEMO_GROUP}")))
        .ok()
        .and_then(|g| g.get("role").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// What `tidemark up` prints once everything runs.
fn banner(pair: &Pair, dir: &Path, profile: &Profile, tidemark: &str) -> String {
    let l = &pair.layout;
    let mut s = String::new();
    let data = |i: usize| dir.join(SITE_NAMES.get(i).copied().unwrap_or("site"));
    let primary = (0..2).find(|&i| role(pair, i) == "primary").unwrap_or(0);
    s += &format!(
        "\ntidemark up: two sites joined by a simulated {} link ({})\n\n",
        profile.name, profile.description
    );
    for (i, site) in pair.sites.iter().enumerate() {
        let ports = l.sites[i];
        let r = if i == primary { "primary" } else { "secondary" };
        s += &format!(
            "  {}  {r} of group {DEMO_GROUP}  (data {}, log {})\n",
            site.name,
            data(i).display(),
            site.log_path().display()
        );
        if i == primary {
            s += &format!(
                "    NBD      nbd://{}/{DEMO_VOLUME}   the demo volume, 1 GiB, read-write\n",
                ports.nbd
            );
        } else {
            s += &format!("    NBD      nbd://{}/IMAGE/{DEMO_VOLUME}   images of the replica (the volume itself is read-only here)\n", ports.nbd);
        }
        s += &format!(
            "    API      http://{}   token in {}\n",
            ports.api,
            data(i).join("api-token").display()
        );
        s += &format!("    metrics  http://{}/metrics\n", ports.metrics);
    }
    let control = |c: Option<SocketAddr>| c.map_or_else(String::new, |c| format!(", control {c}"));
    s += &format!(
        "  link     {} -> {} via simnet {}{}; {} -> {} via {}{}\n\n",
        SITE_NAMES[0],
        SITE_NAMES[1],
        l.relays[0],
        control(l.controls[0]),
        SITE_NAMES[1],
        SITE_NAMES[0],
        l.relays[1],
        control(l.controls[1]),
    );
    let (p, q) = (primary, 1 - primary);
    let cli =
        |i: usize| format!("{tidemark} --api http://{} --data-dir {}", l.sites[i].api, data(i).display());
    s += "Try, in another terminal:\n";
    s += &format!("  P=\"{}\"   # the primary's CLI\n", cli(p));
    s += &format!("  S=\"{}\"   # the secondary's\n", cli(q));
    s += &format!("  qemu-io -f raw -c 'write -P 0xab 0 64M' nbd://{}/{DEMO_VOLUME}\n", l.sites[p].nbd);
    s += &format!("  $P group show {DEMO_GROUP}                          # replication state, lag, RPO\n");
    s += &format!(
        "  $S image create {DEMO_GROUP} --at latest --name check  # the replica's newest consistent point\n"
    );
    s += &format!(
        "  qemu-io -r -f raw -c 'read -P 0xab 0 64M' nbd://{}/check/{DEMO_VOLUME}\n",
        l.sites[q].nbd
    );
    s += &format!("  $P group swap {DEMO_GROUP}                          # trade roles, nothing lost\n\n");
    s += "Ctrl-C stops both sites and the link.\n";
    s
}
