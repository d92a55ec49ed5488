//! Two sites that trust each other as partners, joined directly on loopback or through two
//! simnet relays (one per dialling direction: QUIC connections are dialled both ways once roles
//! change), with group `g` and volume `v` created on the first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::children::Guarded;
use crate::targets::Site;

/// How long replication may take to catch up before a measurement gives up.
pub const CATCH_UP: Duration = Duration::from_secs(300);

/// A pair of running sites.
pub struct Pair {
    /// The primary of `g`.
    pub a: Site,
    /// Its partner.
    pub b: Site,
    /// The simnet relays between them, if any (killed when dropped).
    pub relays: Vec<Guarded>,
}

impl Pair {
    /// Start both sites, the relays when `link` names simnet and a profile, and pair them.
    pub fn start(binary: &Path, link: Option<(&Path, &str)>, dir: &Path) -> Result<Pair> {
        Pair::start_with_config(binary, link, dir, None)
    }

    /// The same, the first site started with a config file holding `config_a`.
    pub fn start_with_config(
        binary: &Path,
        link: Option<(&Path, &str)>,
        dir: &Path,
        config_a: Option<&str>,
    ) -> Result<Pair> {
        let mut a = match config_a {
            Some(toml) => Site::with_config(binary, &dir.join("a"), toml)?,
            None => Site::new(binary, &dir.join("a"))?,
        };
        let mut b = Site::new(binary, &dir.join("b"))?;
        a.start()?;
        b.start()?;
        let mut relays = Vec::new();
        let (to_b, to_a) = match link {
            Some((simnet, profile)) => {
                let (r1, to_b) = relay(simnet, profile, b.repl_addr(), dir)?;
                let (r2, to_a) = relay(simnet, profile, a.repl_addr(), dir)?;
                relays.push(r1);
                relays.push(r2);
                (to_b, to_a)
            }
            None => (b.repl_addr(), a.repl_addr()),
        };
        let fingerprint = |s: &Site| -> Result<String> {
            let v: Value = serde_json::from_str(&s.cli(&["site", "show", "--json"])?)?;
            v["fingerprint"].as_str().map(str::to_string).context("site show has no fingerprint")
        };
        let (fa, fb) = (fingerprint(&a)?, fingerprint(&b)?);
        a.cli(&["partner", "add", "b", "--address", &to_b.to_string(), "--fingerprint", &fb])?;
        b.cli(&["partner", "add", "a", "--address", &to_a.to_string(), "--fingerprint", &fa])?;
        Ok(Pair { a, b, relays })
    }
}

/// A simnet relay forwarding to `forward`; returns it and its listen address.
fn relay(simnet: &Path, profile: &str, forward: SocketAddr, dir: &Path) -> Result<(Guarded, SocketAddr)> {
    let listen = crate::targets::free_loopback_udp_port()?;
    let log = std::fs::File::create(dir.join(format!("simnet-{}.log", forward.port())))
        .context("create simnet log")?;
    let mut command = Command::new(simnet);
    command
        .args(["--listen", &listen.to_string(), "--forward", &forward.to_string(), "--profile", profile])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    Ok((Guarded::spawn(&mut command, "simnet relay")?, listen))
}

/// Newest seq of group `g` at `site`.
pub fn last_seq(site: &Site) -> Result<u64> {
    site.group("g")?["last_seq"].as_u64().context("group show has no last_seq")
}

/// Wait until `site` streams group `g` with nothing left to send.
pub fn wait_streaming(site: &Site) -> Result<()> {
    wait_group_streaming(site, "g")
}

/// Wait until `site` streams `group` with nothing left to send.
pub fn wait_group_streaming(site: &Site, group: &str) -> Result<()> {
    let deadline = Instant::now() + CATCH_UP;
    loop {
        let g = site.group(group)?;
        if g["replication"]["state"] == "streaming" && g["replication"]["lag_records"] == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("replication did not catch up within {CATCH_UP:?}: {}", g["replication"]);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
