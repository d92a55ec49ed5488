//! `simnet`: relay UDP between two sites' replication endpoints through an emulated link, drive
//! a running relay over its control interface (`simnet ctl`), list the profiles
//! (`simnet profiles`), or measure the relay on loopback (`simnet bench`).
//!
//! When relaying, the first line on stdout says where simnet listens, for scripts and tests:
//! `listen=ADDR forward=ADDR control=ADDR profile=NAME` (`control=-` without `--control`).
//! Logs go to stderr (`RUST_LOG` filters them).

mod bench;
mod ctl;

use std::io::Write;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use simnet::{Limits, Profile, Simnet, SimnetConfig};

/// A userspace UDP link emulator between two sites' replication endpoints.
#[derive(Parser, Debug)]
#[command(
    name = "simnet",
    version,
    about,
    max_term_width = 100,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    run: RunArgs,
}

/// Relay from `--listen` to `--forward` through the link of `--profile`.
#[derive(Args, Debug)]
struct RunArgs {
    /// Where site A's endpoint sends (host:port); site A must be configured with this as its
    /// partner's address.
    #[arg(long, required = true, value_name = "ADDR", value_parser = resolve)]
    listen: Option<SocketAddr>,

    /// Site B's endpoint (host:port), where datagrams are relayed to.
    #[arg(long, required = true, value_name = "ADDR", value_parser = resolve)]
    forward: Option<SocketAddr>,

    /// Link profile: a built-in name (metro, wan, intercontinental, satellite, flapping) or a
    /// path to a profile file.
    #[arg(long, required = true, value_name = "NAME")]
    profile: Option<String>,

    /// Seed of the emulator's random draws (loss, jitter, reordering, duplication).
    #[arg(long, default_value_t = 0)]
    seed: u64,

    /// Serve the control interface (line-delimited JSON over TCP) here; it has no
    /// authentication, so keep it on loopback or a lab network.
    #[arg(long, value_name = "ADDR", value_parser = resolve)]
    control: Option<SocketAddr>,

    /// Most site-A source addresses relayed at once.
    #[arg(long, default_value_t = Limits::default().clients_max, value_name = "N")]
    clients_max: usize,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
enum Command {
    /// Drive a running simnet over its control interface.
    Ctl(Box<ctl::CtlArgs>),
    /// List the built-in profiles, or print one as TOML.
    Profiles {
        /// The profile to print.
        name: Option<String>,
    },
    /// Measure rate, delay and loss accuracy and throughput of a real relay on loopback.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Some(Command::Ctl(args)) => ctl::run(*args),
        Some(Command::Profiles { name }) => profiles(name.as_deref()),
        Some(Command::Bench(args)) => runtime().and_then(|runtime| runtime.block_on(bench::run(args))),
        None => runtime().and_then(|runtime| runtime.block_on(relay(cli.run))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start the tokio runtime")
}

/// Relay until SIGINT or SIGTERM.
async fn relay(args: RunArgs) -> anyhow::Result<()> {
    let (Some(listen), Some(forward), Some(profile_name)) = (args.listen, args.forward, args.profile) else {
        anyhow::bail!("--listen, --forward and --profile are required");
    };
    let profile = Profile::load(&profile_name).context("load the link profile")?;
    let config = SimnetConfig {
        listen,
        forward,
        settings: profile.settings,
        seed: args.seed,
        control: args.control,
        limits: Limits { clients_max: args.clients_max, ..Limits::default() },
    };
    let simnet = Simnet::start(config).await.context("start simnet")?;
    let control = simnet.control_addr().map_or_else(|| "-".to_owned(), |addr| addr.to_string());
    let mut stdout = std::io::stdout();
    writeln!(
        stdout,
        "listen={} forward={} control={control} profile={}",
        simnet.listen_addr(),
        simnet.forward_addr(),
        profile.name
    )
    .and_then(|()| stdout.flush())
    .context("write the addresses to stdout")?;
    tracing::info!(profile = %profile.name, description = %profile.description, "link profile");

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    simnet.shutdown().await;
    Ok(())
}

/// List the built-in profiles, or print one.
fn profiles(name: Option<&str>) -> anyhow::Result<()> {
    match name {
        Some(name) => {
            let known = simnet::BUILT_IN.iter().find(|(known, _)| *known == name);
            match known {
                Some((_, text)) => print!("{text}"),
                None => {
                    let profile = Profile::load(name)?;
                    print!("{}", toml::to_string(&profile.settings).context("print the profile")?);
                }
            }
        }
        None => {
            for name in Profile::names() {
                let profile = Profile::load(name)?;
                println!("{:<18} {}", profile.name, profile.description);
            }
        }
    }
    Ok(())
}

/// Parse `host:port`, resolving the host name to its first address.
fn resolve(text: &str) -> Result<SocketAddr, String> {
    text.to_socket_addrs()
        .map_err(|error| format!("{text}: {error}"))?
        .next()
        .ok_or_else(|| format!("{text} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_usage_in_the_issue_parses() {
        let cli = Cli::try_parse_from([
            "simnet",
            "--listen",
            "127.0.0.1:7000",
            "--forward",
            "127.0.0.1:7001",
            "--profile",
            "wan",
        ])
        .expect("parses");
        assert!(cli.command.is_none());
        assert_eq!(cli.run.profile.as_deref(), Some("wan"));
        let cli = Cli::try_parse_from([
            "simnet",
            "ctl",
            "127.0.0.1:7700",
            "set",
            "--delay",
            "25ms",
            "--loss",
            "0.1%",
        ])
        .expect("parses");
        assert!(matches!(cli.command, Some(Command::Ctl(_))));
        assert!(
            Cli::try_parse_from(["simnet", "--listen", "127.0.0.1:7000"]).is_err(),
            "--forward is required"
        );
    }
}
