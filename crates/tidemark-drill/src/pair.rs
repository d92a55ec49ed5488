//! Two sites joined through simnet, as a drill and `tidemark up` run them.
//!
//! QUIC is UDP, and each site dials its partner from its replication socket. simnet relays a
//! client's datagrams to one forward address and relays the replies back to that client, so one
//! relay carries both directions of every connection the first site opens to the second. The
//! second site's own connections to the first (it dials once a role change makes it the
//! primary) need a second relay the other way:
//!
//! ```text
//! site 0 --dials--> relay 0 (listen L0, forward site 1's repl)   site 0's partner address: L0
//! site 1 --dials--> relay 1 (listen L1, forward site 0's repl)   site 1's partner address: L1
//! ```
//!
//! Link settings are kept from site 0's point of view (`a_to_b` is what site 0 sends) and
//! applied to both relays, mirrored on relay 1; partitions likewise, so every datagram from one
//! site to the other meets the same emulated direction whichever site opened the connection.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Value};
use simnet::{DirectionStats, LinkSettings, Simnet, SimnetConfig, Stats, Ways};

use crate::scenario::Cut;
use crate::supervisor::{FreePorts, LinkHint, SitePorts, SiteProcess};

/// Mixed into the seed of the second relay, so the two draw differently.
const RELAY_SEED_MIX: u64 = 0xD1B5_4A32_D192_ED03;

/// Where everything listens.
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Layout {
    /// Each site's listeners.
    pub sites: [SitePorts; 2],
    /// Each relay's listen address (relay 0 forwards to site 1, relay 1 to site 0).
    pub relays: [SocketAddr; 2],
    /// Each relay's control interface, if served.
    pub controls: [Option<SocketAddr>; 2],
}

impl Layout {
    /// Free loopback ports for everything, all different, without control interfaces.
    pub fn free() -> std::io::Result<Layout> {
        Layout::free_from(&mut FreePorts::default())
    }

    /// [`Layout::free`], with ports none of which `ports` picked before (the caller may pick
    /// more from it, still all different).
    pub fn free_from(ports: &mut FreePorts) -> std::io::Result<Layout> {
        Ok(Layout {
            sites: [SitePorts::free(ports)?, SitePorts::free(ports)?],
            relays: [ports.udp()?, ports.udp()?],
            controls: [None, None],
        })
    }
}

/// Traffic from one site to the other, over both relays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct WayTotals {
    /// Datagrams sent into the link.
    pub received_packets: u64,
    /// Datagrams delivered (duplicates included).
    pub delivered_packets: u64,
    /// Payload bytes delivered.
    pub delivered_bytes: u64,
    /// Dropped: partition or outage.
    pub dropped_cut: u64,
    /// Dropped: random or bursty loss.
    pub dropped_loss: u64,
    /// Dropped: the emulated queue was full.
    pub dropped_queue: u64,
    /// Dropped for any other reason (relay limits, send failures).
    pub dropped_other: u64,
}

impl WayTotals {
    fn add(&mut self, s: &DirectionStats) {
        self.received_packets += s.received_packets;
        self.delivered_packets += s.delivered_packets;
        self.delivered_bytes += s.delivered_bytes;
        self.dropped_cut += s.dropped.partition + s.dropped.outage;
        self.dropped_loss += s.dropped.loss;
        self.dropped_queue += s.dropped.queue_full;
        self.dropped_other += s.dropped.delay_line_full + s.dropped.clients_full + s.dropped.send_failed;
    }

    /// `self - earlier`, counter by counter.
    pub fn since(&self, earlier: &WayTotals) -> WayTotals {
        WayTotals {
            received_packets: self.received_packets.saturating_sub(earlier.received_packets),
            delivered_packets: self.delivered_packets.saturating_sub(earlier.delivered_packets),
            delivered_bytes: self.delivered_bytes.saturating_sub(earlier.delivered_bytes),
            dropped_cut: self.dropped_cut.saturating_sub(earlier.dropped_cut),
            dropped_loss: self.dropped_loss.saturating_sub(earlier.dropped_loss),
            dropped_queue: self.dropped_queue.saturating_sub(earlier.dropped_queue),
            dropped_other: self.dropped_other.saturating_sub(earlier.dropped_other),
        }
    }
}

/// Traffic both ways, by site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LinkTotals {
    /// From site 0 to site 1.
    pub a_to_b: WayTotals,
    /// From site 1 to site 0.
    pub b_to_a: WayTotals,
}

impl LinkTotals {
    /// `self - earlier`.
    pub fn since(&self, earlier: &LinkTotals) -> LinkTotals {
        LinkTotals { a_to_b: self.a_to_b.since(&earlier.a_to_b), b_to_a: self.b_to_a.since(&earlier.b_to_a) }
    }
}

/// Two sites, two relays, and the runtime the relays run on.
pub struct Pair {
    /// The sites, 0 first.
    pub sites: [SiteProcess; 2],
    relays: [Simnet; 2],
    runtime: tokio::runtime::Runtime,
    settings: LinkSettings,
    cut: [bool; 2],
    /// Where everything listens.
    pub layout: Layout,
}

/// What the sites are told of the link, to size their QUIC windows (1000 Mbit/s when
/// unlimited).
fn link_hint(settings: &LinkSettings) -> LinkHint {
    let mbit = settings.a_to_b.rate.map_or(1000, |r| (r.bits_per_second() / 1_000_000).max(1));
    LinkHint {
        mbit_per_second: mbit,
        rtt: (settings.a_to_b.delay + settings.b_to_a.delay).max(Duration::from_millis(1)),
    }
}

fn mirrored(settings: &LinkSettings) -> LinkSettings {
    LinkSettings { a_to_b: settings.b_to_a.clone(), b_to_a: settings.a_to_b.clone() }
}

impl Pair {
    /// Start both relays, then both sites (in `dir`), with `settings` on the link.
    pub fn start(
        binary: &Path,
        dir: &Path,
        names: &[String; 2],
        layout: Layout,
        settings: LinkSettings,
        seed: u64,
    ) -> Result<Pair, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("drill-simnet")
            .build()
            .map_err(|e| format!("start the link's runtime: {e}"))?;
        let relay = |i: usize, forward: SocketAddr, settings: LinkSettings, seed: u64| {
            let mut config = SimnetConfig::new(layout.relays[i], forward, settings);
            config.seed = seed;
            config.control = layout.controls[i];
            runtime.block_on(Simnet::start(config)).map_err(|e| format!("start simnet relay {i}: {e}"))
        };
        let relay0 = relay(0, layout.sites[1].repl, settings.clone(), seed)?;
        let relay1 = relay(1, layout.sites[0].repl, mirrored(&settings), seed ^ RELAY_SEED_MIX)?;
        let layout = Layout {
            relays: [relay0.listen_addr(), relay1.listen_addr()],
            controls: [relay0.control_addr(), relay1.control_addr()],
            ..layout
        };
        let hint = link_hint(&settings);
        let site = |i: usize| {
            SiteProcess::new(binary, dir, &names[i], layout.sites[i], hint)
                .map_err(|e| format!("write the config of site {}: {e}", names[i]))
        };
        let mut pair = Pair {
            sites: [site(0)?, site(1)?],
            relays: [relay0, relay1],
            runtime,
            settings,
            cut: [false, false],
            layout,
        };
        for site in pair.sites.iter_mut() {
            site.start()?;
        }
        Ok(pair)
    }

    /// Make each site trust the other, reached through its relay. Partners already there with
    /// the same address and fingerprint are kept (a second `tidemark up`).
    pub fn join(&self) -> Result<(), String> {
        let mut fingerprints = Vec::new();
        for site in &self.sites {
            let info = site.api()?.get("/v1/site")?;
            let fp =
                info.get("fingerprint").and_then(Value::as_str).ok_or("the site API shows no fingerprint")?;
            fingerprints.push(fp.to_string());
        }
        for (i, site) in self.sites.iter().enumerate() {
            let other = 1 - i;
            let name = &self.sites[other].name;
            let address = self.layout.relays[i].to_string();
            let fingerprint = &fingerprints[other];
            let api = site.api()?;
            let partners = api.get("/v1/partners")?;
            let existing = partners.as_array().and_then(|list| {
                list.iter().find(|p| p.get("name").and_then(Value::as_str) == Some(name.as_str()))
            });
            match existing {
                Some(p)
                    if p.get("address").and_then(Value::as_str) == Some(address.as_str())
                        && p.get("fingerprint").and_then(Value::as_str) == Some(fingerprint.as_str()) => {}
                Some(p) => {
                    return Err(format!(
                        "site {} already trusts a partner {name} at another address or with another certificate ({p}); start from an empty directory",
                        site.name
                    ))
                }
                None => {
                    api.post("/v1/partners", &json!({"name": name, "address": address, "fingerprint": fingerprint}))?;
                }
            }
        }
        Ok(())
    }

    /// Create `group` with `volumes` (name, bytes) at site 0 and protect it to site 1, unless
    /// it exists. Returns whether it was created.
    pub fn create_group(&self, group: &str, volumes: &[(String, u64)]) -> Result<bool, String> {
        let api = self.sites[0].api()?;
        let groups = api.get("/v1/groups")?;
        let exists = groups
            .as_array()
            .is_some_and(|list| list.iter().any(|g| g.get("name").and_then(Value::as_str) == Some(group)));
        if exists {
            return Ok(false);
        }
        api.post("/v1/groups", &json!({"name": group}))?;
        for (name, size) in volumes {
            api.post("/v1/volumes", &json!({"name": name, "group": group, "size": size}))?;
        }
        api.post(&format!("/v1/groups/{group}/protect"), &json!({"partner": self.sites[1].name}))?;
        Ok(true)
    }

    /// The link's settings now, from site 0's point of view.
    pub fn settings(&self) -> &LinkSettings {
        &self.settings
    }

    /// Put new settings on the link; cuts made by [`Pair::partition`] stay.
    pub fn set_link(&mut self, settings: LinkSettings) -> Result<(), String> {
        let mut s = settings.clone();
        s.a_to_b.partitioned = self.cut[0];
        s.b_to_a.partitioned = self.cut[1];
        self.relays[0].set_settings(s.clone()).map_err(|e| e.to_string())?;
        self.relays[1].set_settings(mirrored(&s)).map_err(|e| e.to_string())?;
        self.settings = settings;
        Ok(())
    }

    /// Cut the link both ways, or only what one site sends.
    pub fn partition(&mut self, cut: Cut) {
        let (zero_to_one, one_to_zero) = match cut {
            Cut::Both => (true, true),
            Cut::From(0) => (true, false),
            Cut::From(_) => (false, true),
        };
        if zero_to_one {
            self.relays[0].partition(Ways::AToB);
            self.relays[1].partition(Ways::BToA);
            self.cut[0] = true;
        }
        if one_to_zero {
            self.relays[0].partition(Ways::BToA);
            self.relays[1].partition(Ways::AToB);
            self.cut[1] = true;
        }
    }

    /// Heal every cut.
    pub fn heal(&mut self) {
        for relay in &self.relays {
            relay.heal(Ways::Both);
        }
        self.cut = [false, false];
    }

    /// Whether any direction is cut.
    pub fn is_cut(&self) -> bool {
        self.cut.iter().any(|&c| c)
    }

    /// Traffic so far, by site direction.
    pub fn totals(&self) -> LinkTotals {
        let (s0, s1) = (self.relays[0].stats(), self.relays[1].stats());
        let mut totals = LinkTotals::default();
        totals.a_to_b.add(&s0.a_to_b);
        totals.a_to_b.add(&s1.b_to_a);
        totals.b_to_a.add(&s0.b_to_a);
        totals.b_to_a.add(&s1.a_to_b);
        totals
    }

    /// Each relay's own counters.
    pub fn relay_stats(&self) -> [Stats; 2] {
        [self.relays[0].stats(), self.relays[1].stats()]
    }

    /// Stop both sites (SIGTERM) and both relays. Returns the sites' stop errors.
    pub fn shutdown(mut self) -> Vec<String> {
        let mut errors = Vec::new();
        for site in self.sites.iter_mut() {
            site.terminate();
        }
        for site in self.sites.iter_mut() {
            if let Err(e) = site.stop() {
                errors.push(e);
            }
        }
        for relay in &self.relays {
            self.runtime.block_on(relay.shutdown());
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sites_are_told_the_links_rate_and_rtt() {
        let wan = simnet::Profile::load("wan").expect("wan").settings;
        let hint = link_hint(&wan);
        assert_eq!(hint.mbit_per_second, 200);
        assert_eq!(hint.rtt, Duration::from_millis(50));
    }
}
