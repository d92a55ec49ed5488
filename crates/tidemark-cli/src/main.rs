//! `tidemark`: runs a site (`tidemark serve`) and drives a site's management API (every other
//! subcommand).
//!
//! Errors print as `error: MESSAGE` on stderr with exit status 1; usage errors are clap's
//! (status 2). Read commands take `--json` to print the API's answer as it is, pretty.

mod client;
mod commands;
mod drill;
mod output;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Block replication and continuous data protection: run a site, or manage one.
#[derive(Parser, Debug)]
#[command(name = "tidemark", version, about, max_term_width = 100)]
pub struct Cli {
    /// URL of the site's management API [default: the config's api.listen, or http://127.0.0.1:7600].
    #[arg(long, global = true, env = "TIDEMARK_API", value_name = "URL")]
    pub api: Option<String>,

    /// API bearer token [default: read from DATA_DIR/api-token].
    #[arg(long, global = true, env = "TIDEMARK_TOKEN", hide_env_values = true, value_name = "TOKEN")]
    pub token: Option<String>,

    /// The site's data directory (for `serve`, and where clients find the token) [default: the config's site.data_dir, or ./tidemark-data].
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// Site config file (TOML); clients read the API address and data directory from it too.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Print the API's JSON answer instead of tables.
    #[arg(long, global = true)]
    pub json: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a site in the foreground until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Protection groups: volumes that share one journal and one history.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Volumes: thin virtual disks, exported over NBD under their name.
    #[command(subcommand)]
    Volume(VolumeCommand),
    /// Bookmarks: named points in a group's history.
    #[command(subcommand)]
    Bookmark(BookmarkCommand),
    /// This site's identity for partners: name, certificate fingerprint, replication address.
    #[command(subcommand)]
    Site(SiteCommand),
    /// Partner sites, pinned by certificate fingerprint.
    #[command(subcommand)]
    Partner(PartnerCommand),
    /// Show a group's recoverable range, bookmarks and rollbacks.
    History {
        /// Group name.
        group: String,
    },
    /// Put every volume of a group back to a point (a journaled, undoable operation).
    Rollback(RollbackArgs),
    /// Images: read-only or writable views of a group at a point, exported over NBD.
    #[command(subcommand)]
    Image(ImageCommand),
    /// Show the site's state.
    Status,
    /// Show the event log: audit records and engine events, newest last.
    Events {
        /// Only events at or after TIME: RFC 3339 (2024-05-01T12:00:00Z) or a duration ago (1h).
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// At most N events (1..=1000).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
    /// Run two paired sites on this machine, joined by a simulated WAN, with a protected demo
    /// group, until Ctrl-C (their data goes under --data-dir, default ./tidemark-up).
    Up(UpArgs),
    /// Run a drill scenario against real sites over a simulated WAN and check every copy;
    /// exits non-zero when a check fails (docs/drills.md).
    Drill(DrillArgs),
}

/// `tidemark up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// The link between the sites: a simnet profile (metro, wan, intercontinental, satellite,
    /// flapping) or a profile file.
    #[arg(long, value_name = "NAME", default_value = "wan")]
    pub profile: String,
    /// Use free ports instead of the standard ones (10809/7600/7601/9600 for site-a,
    /// 10819/7610/7611/9610 for site-b); only for a new directory, which keeps its ports.
    #[arg(long)]
    pub free_ports: bool,
}

/// `tidemark drill`.
#[derive(Args, Debug)]
pub struct DrillArgs {
    /// The scenario file (TOML; simnet/scenarios/ has examples).
    pub scenario: PathBuf,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Make the scratch directory (sites' data and logs) in DIR [default: the temporary directory].
    #[arg(long, value_name = "DIR")]
    pub workdir: Option<PathBuf>,
    /// Keep the scratch directory even when the drill passes (it is always kept when it fails).
    #[arg(long)]
    pub keep: bool,
}

/// `tidemark serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Site name (overrides site.name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// NBD listen address (overrides nbd.listen).
    #[arg(long, value_name = "ADDR")]
    pub nbd_listen: Option<SocketAddr>,
    /// Management API listen address (overrides api.listen).
    #[arg(long, value_name = "ADDR")]
    pub api_listen: Option<SocketAddr>,
    /// Replication (QUIC, UDP) listen address (overrides replication.listen).
    #[arg(long, value_name = "ADDR")]
    pub repl_listen: Option<SocketAddr>,
    /// Prometheus metrics listen address (overrides metrics.listen).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// `tidemark group ...`.
#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a group.
    Create {
        /// Group name: 1-64 of A-Z a-z 0-9 . _ -, not starting with . or -.
        name: String,
        /// How long history is kept (24h, 7days) [default: the site's defaults.retention].
        #[arg(long, value_name = "DURATION")]
        retention: Option<String>,
        /// Most bytes the journal may hold (20GiB) [default: the site's defaults.journal_max].
        #[arg(long, value_name = "SIZE")]
        journal_max: Option<String>,
    },
    /// List groups.
    List,
    /// Show one group.
    Show {
        /// Group name.
        name: String,
    },
    /// Replicate a group to a partner (run on the primary; the partner creates its copy).
    Protect {
        /// Group name.
        group: String,
        /// Partner name (see `tidemark partner add`).
        #[arg(long, value_name = "NAME")]
        partner: String,
        /// When the partner is out of reach so long that the journal it needs passes the
        /// group's limit: `resync` lets the journal trim, tracks the changed blocks and sends
        /// only those when the partner returns; `throttle` keeps the journal and slows host
        /// writes.
        #[arg(long, value_name = "POLICY", default_value = "resync", value_parser = ["resync", "throttle"])]
        overflow: String,
        /// Wait until the partner has caught up (a baseline, if one is needed, then the
        /// journal), showing progress on a terminal.
        #[arg(long)]
        wait: bool,
    },
    /// Stop replicating a group (the partner keeps its copy).
    Unprotect {
        /// Group name.
        group: String,
    },
    /// Pause a group's replication.
    Pause {
        /// Group name.
        group: String,
    },
    /// Resume a group's replication.
    Resume {
        /// Group name.
        group: String,
    },
    /// Trade roles with the partner, planned and with no data loss (either site, both connected).
    Swap {
        /// Group name.
        group: String,
    },
    /// Make this site's copy the primary because the primary site is lost (run on the secondary).
    Takeover {
        /// Group name.
        group: String,
        /// Take over at an earlier point of this site's history (recover from before a bad
        /// write): `latest`, `seq:N`, `bookmark:NAME`, an RFC 3339 time or `-5m`.
        #[arg(long, value_name = "POINT", allow_hyphen_values = true)]
        at: Option<String>,
        /// Take over even though the primary answers (it is fenced when it next connects).
        #[arg(long)]
        force: bool,
        /// Confirm: the old primary's unreplicated writes will be kept aside, not in the volumes.
        #[arg(long)]
        yes: bool,
    },
}

/// `tidemark site ...`.
#[derive(Subcommand, Debug)]
pub enum SiteCommand {
    /// Show the site's name, fingerprint and replication address.
    Show,
}

/// `tidemark partner ...`.
#[derive(Subcommand, Debug)]
pub enum PartnerCommand {
    /// Trust a partner site.
    Add {
        /// Partner name.
        name: String,
        /// Its replication address, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        address: String,
        /// Its certificate fingerprint, as `tidemark site show` prints it there.
        #[arg(long, value_name = "SHA256")]
        fingerprint: String,
        /// Most megabits per second sent to it, over all its groups [default: no limit].
        #[arg(long, value_name = "MBIT")]
        bandwidth_limit_mbit: Option<u64>,
    },
    /// List partners.
    List,
    /// Stop trusting a partner.
    Remove {
        /// Partner name.
        name: String,
    },
}

/// `tidemark volume ...`.
#[derive(Subcommand, Debug)]
pub enum VolumeCommand {
    /// Create a volume in a group.
    Create {
        /// Volume (and NBD export) name.
        name: String,
        /// Logical size (10GiB); a whole number of blocks.
        #[arg(long, value_name = "SIZE")]
        size: String,
        /// The group it belongs to.
        #[arg(long, value_name = "GROUP")]
        group: String,
        /// Block size in bytes: 512 or 4096.
        #[arg(long, value_name = "BYTES", default_value_t = 4096)]
        block_size: u32,
    },
    /// List volumes.
    List,
    /// Show one volume.
    Show {
        /// Volume name.
        name: String,
    },
    /// Change a volume's size.
    Resize {
        /// Volume name.
        name: String,
        /// New logical size (20GiB).
        #[arg(long, value_name = "SIZE")]
        size: String,
    },
    /// Delete a volume.
    Delete {
        /// Volume name.
        name: String,
    },
}

/// `tidemark bookmark ...`.
#[derive(Subcommand, Debug)]
pub enum BookmarkCommand {
    /// Name the group's current point.
    Create {
        /// Group name.
        group: String,
        /// Bookmark name, unique in the group.
        name: String,
    },
    /// List a group's bookmarks.
    List {
        /// Group name.
        group: String,
    },
}

/// `tidemark rollback ...`.
#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// Group name.
    pub group: String,
    /// Point to go back to: RFC 3339 time, -DURATION (-5m), bookmark:NAME, seq:N or latest.
    #[arg(
        long,
        value_name = "POINT",
        required_unless_present = "undo",
        conflicts_with = "undo",
        allow_hyphen_values = true
    )]
    pub to: Option<String>,
    /// Undo the group's last rollback.
    #[arg(long)]
    pub undo: bool,
    /// Really do it: without --yes, only say what would be done.
    #[arg(long)]
    pub yes: bool,
}

/// `tidemark image ...`.
#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Create an image of a group at a point; its exports are IMAGE/VOLUME.
    Create {
        /// Group name.
        group: String,
        /// Point to show: RFC 3339 time, -DURATION, bookmark:NAME, seq:N or latest.
        #[arg(long, value_name = "POINT", allow_hyphen_values = true)]
        at: String,
        /// Image name.
        #[arg(long, value_name = "NAME")]
        name: String,
        /// Accept writes into a private overlay (test failover, recovery).
        #[arg(long)]
        writable: bool,
    },
    /// List images.
    List,
    /// Delete an image.
    Delete {
        /// Image name.
        name: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match commands::run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rollback_needs_a_target_and_not_two() {
        assert!(Cli::try_parse_from(["tidemark", "rollback", "g", "--yes"]).is_err());
        assert!(Cli::try_parse_from(["tidemark", "rollback", "g", "--to", "latest", "--undo"]).is_err());
        let cli = Cli::try_parse_from(["tidemark", "rollback", "g", "--undo", "--yes"]).expect("undo");
        assert!(matches!(cli.command, Command::Rollback(RollbackArgs { undo: true, yes: true, .. })));
    }

    /// Regression: relative points (`-5m`) were taken for unknown flags.
    #[test]
    fn relative_points_are_values_not_flags() {
        let cli =
            Cli::try_parse_from(["tidemark", "rollback", "g", "--to", "-5m", "--yes"]).expect("rollback");
        assert!(matches!(cli.command, Command::Rollback(RollbackArgs { to: Some(ref t), .. }) if t == "-5m"));
        Cli::try_parse_from(["tidemark", "image", "create", "g", "--at", "-1s", "--name", "i"])
            .expect("image");
    }

    #[test]
    fn up_and_drill_parse() {
        let cli = Cli::try_parse_from(["tidemark", "up", "--profile", "satellite", "--data-dir", "/d"])
            .expect("up");
        assert!(
            matches!(cli.command, Command::Up(UpArgs { ref profile, free_ports: false }) if profile == "satellite")
        );
        let cli = Cli::try_parse_from(["tidemark", "drill", "s.toml", "--report", "r.json", "--keep"])
            .expect("drill");
        assert!(matches!(cli.command, Command::Drill(DrillArgs { keep: true, report: Some(_), .. })));
        assert!(Cli::try_parse_from(["tidemark", "drill"]).is_err(), "a drill needs a scenario");
    }

    #[test]
    fn global_flags_work_after_the_subcommand() {
        let cli = Cli::try_parse_from(["tidemark", "volume", "list", "--json", "--api", "http://h:1"])
            .expect("parse");
        assert!(cli.json);
        assert_eq!(cli.api.as_deref(), Some("http://h:1"));
        let cli =
            Cli::try_parse_from(["tidemark", "serve", "--data-dir", "/d", "--nbd-listen", "127.0.0.1:0"])
                .expect("serve");
        assert_eq!(cli.data_dir, Some(PathBuf::from("/d")));
        assert!(Cli::try_parse_from(["tidemark", "serve", "--nbd-listen", "nowhere"]).is_err());
    }
}
