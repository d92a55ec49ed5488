//! `tidemark up` and `tidemark drill`: thin shells around `tidemark-drill`, which starts sites
//! with this very binary (`serve`).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tidemark_drill::{run_drill, run_up, DrillOptions, Scenario, UpOptions};

use crate::{Cli, DrillArgs, UpArgs};

/// Where `tidemark up` keeps its sites when `--data-dir` is not given.
pub const UP_DIR_DEFAULT: &str = "tidemark-up";

/// `tidemark up`: run the pair until Ctrl-C.
pub fn up(cli: &Cli, args: &UpArgs) -> Result<()> {
    tidemark_drill::supervisor::install_signal_handler().context("install signal handlers")?;
    let options = UpOptions {
        binary: std::env::current_exe().context("find the tidemark binary")?,
        dir: cli.data_dir.clone().unwrap_or_else(|| PathBuf::from(UP_DIR_DEFAULT)),
        profile: args.profile.clone(),
        free_ports: args.free_ports,
        cli: invoked_as(),
    };
    let mut stdout = std::io::stdout();
    run_up(&options, &mut stdout).map_err(anyhow::Error::msg)
}

/// How this binary was called, for commands printed to paste: as given when it was a path
/// (`target/release/tidemark`), else `tidemark`.
fn invoked_as() -> String {
    std::env::args().next().filter(|arg0| arg0.contains('/')).unwrap_or_else(|| "tidemark".into())
}

/// `tidemark drill SCENARIO`: run it, print the summary, write the report, fail if it failed.
pub fn drill(args: &DrillArgs) -> Result<()> {
    tidemark_drill::supervisor::install_signal_handler().context("install signal handlers")?;
    let scenario = Scenario::load(&args.scenario)?;
    let options = DrillOptions {
        binary: std::env::current_exe().context("find the tidemark binary")?,
        workdir: args.workdir.clone(),
        keep: args.keep,
    };
    let mut stdout = std::io::stdout();
    let report = run_drill(&scenario, &options, &mut stdout).map_err(anyhow::Error::msg)?;
    write!(stdout, "{}", report.summary()).context("write to stdout")?;
    if let Some(dir) = &report.workdir {
        writeln!(stdout, "  scratch directory kept: {dir}").context("write to stdout")?;
    }
    if let Some(path) = &args.report {
        let text = serde_json::to_string_pretty(&report).context("encode the report")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("write the report to {}", path.display()))?;
        writeln!(stdout, "  report: {}", path.display()).context("write to stdout")?;
    }
    stdout.flush().context("write to stdout")?;
    if let Some(f) = &report.failure {
        bail!(
            "drill {:?} failed at step {} (`{}`): {}: {}",
            scenario.name,
            f.step,
            f.step_text,
            f.check,
            f.reason
        );
    }
    Ok(())
}
