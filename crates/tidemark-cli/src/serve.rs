//! `tidemark serve`: run a site in the foreground until SIGINT or SIGTERM.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result};
use tidemark_site::{Config, Overrides, Site};
use tokio::signal::unix::{signal, SignalKind};
use tracing_subscriber::EnvFilter;

use crate::{Cli, ServeArgs};

/// Threads for blocking calls (every NBD request runs one engine call on them). Tokio's default,
/// 512, let a site start a thread per request in flight: 100 threads on a 2-core machine under
/// one fio job at depth 32, each with its stack and its share of context switches. Requests
/// beyond this wait in the pool's queue, in order.
const BLOCKING_THREADS_MAX: usize = 32;

/// Load the config, apply flags, start the site, print its listeners and serve until a signal.
pub fn run(cli: &Cli, args: &ServeArgs) -> Result<()> {
    tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let mut config = Config::load(cli.config.as_deref())?;
    config.apply(Overrides {
        name: args.name.clone(),
        data_dir: cli.data_dir.clone(),
        nbd_listen: args.nbd_listen,
        api_listen: args.api_listen,
        repl_listen: args.repl_listen,
        metrics_listen: args.metrics_listen,
    })?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tidemark")
        .max_blocking_threads(BLOCKING_THREADS_MAX)
        .build()
        .context("start async runtime")?;
    runtime.block_on(async move {
        // Signal handlers go in before anything starts, so a signal during start-up is not lost.
        let mut interrupt = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
        let mut terminate = signal(SignalKind::terminate()).context("install SIGTERM handler")?;

        let site = Site::start(config).await?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "nbd listening on {}", site.nbd_addr()).context("write to stdout")?;
        writeln!(stdout, "api listening on http://{}", site.api_addr()).context("write to stdout")?;
        writeln!(stdout, "metrics listening on http://{}/metrics", site.metrics_addr())
            .context("write to stdout")?;
        stdout.flush().context("write to stdout")?;
        drop(stdout);
        tracing::info!(
            site = %site.config().site.name,
            data_dir = %site.config().site.data_dir.display(),
            token = %site.token_path().display(),
            nbd = %site.nbd_addr(),
            api = %site.api_addr(),
            metrics = %site.metrics_addr(),
            "site started"
        );

        site.run(async move {
            tokio::select! {
                _ = interrupt.recv() => tracing::info!("SIGINT received"),
                _ = terminate.recv() => tracing::info!("SIGTERM received"),
            }
        })
        .await?;
        tracing::info!("site stopped cleanly");
        Ok(())
    })
}

/// Bound the C allocator's overhead for a long-running site whose largest structure (the block
/// index) grows by many small allocations. glibc raises its mmap threshold each time a large
/// block is freed (up to 32 MiB), after which large transient buffers such as a checkpoint's
/// encoding come from the heap and fragment it; a fixed threshold of 4 MiB keeps those in their
/// own mappings, returned when freed, while the 1 MiB buffers of every record stay in the heap.
/// Fixing the threshold also fixes the trim threshold at 128 KiB unless it is set too, and then
/// each freed record buffer was handed back to the kernel and faulted in again by the next one
/// (a journal rebuild took 3.3 times as long); 32 MiB of free heap may stay resident instead.
/// And glibc gives up to eight arenas per core to the threads that allocate, each keeping its own
/// free memory; two are enough for a site. Measured on 262,144 random 4 KiB writes: 55 bytes of
/// resident memory per block with glibc's defaults, about 39 with these, for an index of 25.
#[allow(unsafe_code)]
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before the site starts any
    // thread, and these three parameters are documented as settable at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}
