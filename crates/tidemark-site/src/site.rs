//! A running site: the engine, the NBD listener, the management API, replication and the
//! metrics endpoint, started together and stopped together.
//!
//! Start-up is ordered so that a mistake costs nothing: the data directory, the token, the
//! event log and both sockets are set up (bound) before the engine opens, so a port in use or
//! an unwritable directory stops the site before any journal is touched; the sockets listen only
//! once the engine is open, so a client that can connect finds a site that answers. Shut-down stops
//! both listeners, waits a bounded time for open requests, then checkpoints the engine.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tidemark_engine::{Engine, EngineConfig, EngineError, SystemClock};
use tidemark_nbd::{NbdServer, ServerConfig};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;

use crate::api::{self, ApiSettings, ApiState};
use crate::config::Config;
use crate::events::{Event, EventLog, EventLogError, EventSource};
use crate::metrics::{self, NbdIo, Sources};
use crate::nbd_adapter::EngineExports;
use crate::replication::session::SessionConfig;
use crate::replication::{Replication, ReplicationConfig};
use crate::token::{ApiToken, TokenError, TOKEN_FILE_NAME};
use tidemark_link::LinkProfile;

/// Connections the kernel queues for each listener before the site accepts them.
const LISTEN_BACKLOG: u32 = 1024;

/// How long shut-down waits for open NBD connections and API requests to finish, in seconds,
/// before it closes them and checkpoints the engine anyway.
pub const SHUTDOWN_DRAIN_SECONDS: u64 = 10;

/// Why a site could not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The data directory could not be made.
    #[error("create data directory {path}: {source}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The API token could not be made or read.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The event log could not be opened.
    #[error(transparent)]
    Events(#[from] EventLogError),
    /// A listening socket could not be bound.
    #[error("listen for {service} on {addr}: {source}; is another site running, or is the port taken?")]
    Listen {
        /// `nbd`, `api` or `metrics`.
        service: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The engine could not be opened.
    #[error("open engine in {path}: {source}")]
    Engine {
        /// The data directory.
        path: PathBuf,
        /// What the engine said (boxed: it is large, and this path is cold).
        source: Box<EngineError>,
    },
    /// A server stopped with an error while the site was running.
    #[error("{service} server stopped: {reason}")]
    Serve {
        /// `nbd` or `api`.
        service: &'static str,
        /// What happened.
        reason: String,
    },
    /// Replication could not start (identity, partner store or the QUIC link).
    #[error("start replication: {0}")]
    Replication(Box<crate::replication::ReplicationError>),
    /// The engine's final checkpoint failed; the journal is still the truth and the next start
    /// recovers from it.
    #[error("shut down engine: {0}")]
    Shutdown(Box<EngineError>),
}

/// A site whose listeners are bound and whose engine is open, ready to [`run`](Site::run).
pub struct Site {
    config: Config,
    engine: Arc<Engine>,
    events: Arc<EventLog>,
    token: ApiToken,
    nbd_listener: TcpListener,
    api_listener: TcpListener,
    metrics_listener: TcpListener,
    nbd_addr: SocketAddr,
    api_addr: SocketAddr,
    metrics_addr: SocketAddr,
    replication: Arc<Replication>,
    started_at: SystemTime,
}

impl Site {
    /// Set up the data directory, token, event log and listeners, then open the engine.
    pub async fn start(config: Config) -> Result<Site, SiteError> {
        let started_at = SystemTime::now();
        let data_dir = config.site.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .map_err(|source| SiteError::DataDir { path: data_dir.clone(), source })?;
        let token = ApiToken::load_or_create(&data_dir)?;
        let events = Arc::new(EventLog::open(&data_dir, config.limits.events_file_bytes_max)?);

        // Bind now, so a port in use stops the site before any journal is touched; listen only
        // once the engine is open, so that a client (or a health check) that can connect finds
        // a site that answers, even after a long journal rebuild.
        let bind = |service: &'static str, addr: SocketAddr| {
            let err = move |source| SiteError::Listen { service, addr, source };
            let socket =
                if addr.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() }.map_err(err)?;
            socket.set_reuseaddr(true).map_err(err)?;
            socket.bind(addr).map_err(err)?;
            let local = socket.local_addr().map_err(err)?;
            Ok::<_, SiteError>((socket, local, err))
        };
        let (nbd_socket, nbd_addr, nbd_err) = bind("nbd", config.nbd.listen)?;
        let (api_socket, api_addr, api_err) = bind("api", config.api.listen)?;
        let (metrics_socket, metrics_addr, metrics_err) = bind("metrics", config.metrics.listen)?;

        let engine_config = EngineConfig::new(data_dir.clone(), events.clone());
        let engine = tokio::task::spawn_blocking(move || Engine::open(engine_config, Arc::new(SystemClock)))
            .await
            .map_err(|e| SiteError::Engine {
                path: data_dir.clone(),
                source: Box::new(EngineError::Catalog(format!("engine start-up did not complete: {e}"))),
            })?
            .map_err(|source| SiteError::Engine { path: data_dir.clone(), source: Box::new(source) })?;

        let mut started = Event::now(
            EventSource::Site,
            "site.start",
            format!(
                "site {} started (version {}), nbd on {nbd_addr}, api on {api_addr}, metrics on {metrics_addr}",
                config.site.name,
                env!("CARGO_PKG_VERSION")
            ),
        );
        started.object = Some(config.site.name.clone());
        events.record(started);
        let repl_config = ReplicationConfig {
            listen: config.replication.listen,
            profile: LinkProfile {
                bandwidth_bits_per_second: config.replication.link_mbit_per_second * 1_000_000,
                rtt: config.replication.link_rtt,
                congestion: config.replication.congestion.into(),
            },
            session: SessionConfig {
                zstd_level: config.replication.zstd_level.resolve(config.replication.link_mbit_per_second),
                ..SessionConfig::default()
            },
        };
        let replication =
            Replication::start(engine.clone(), events.clone(), &data_dir, &config.site.name, repl_config)
                .map_err(|e| SiteError::Replication(Box::new(e)))?;
        let nbd_listener = nbd_socket.listen(LISTEN_BACKLOG).map_err(nbd_err)?;
        let api_listener = api_socket.listen(LISTEN_BACKLOG).map_err(api_err)?;
        let metrics_listener = metrics_socket.listen(LISTEN_BACKLOG).map_err(metrics_err)?;
        Ok(Site {
            config,
            engine,
            events,
            token,
            nbd_listener,
            api_listener,
            metrics_listener,
            nbd_addr,
            api_addr,
            metrics_addr,
            replication,
            started_at,
        })
    }

    /// Where the NBD server listens (the real port when 0 was asked for).
    pub fn nbd_addr(&self) -> SocketAddr {
        self.nbd_addr
    }

    /// Where the management API listens (the real port when 0 was asked for).
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// Where the Prometheus endpoint listens (the real port when 0 was asked for).
    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Where the replication link listens, and the site's fingerprint.
    pub fn replication(&self) -> &Arc<Replication> {
        &self.replication
    }

    /// The file holding the API token.
    pub fn token_path(&self) -> PathBuf {
        self.config.site.data_dir.join(TOKEN_FILE_NAME)
    }

    /// The configuration the site runs with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Serve until `shutdown` completes (or a server fails), then stop accepting, let open
    /// requests finish for at most [`SHUTDOWN_DRAIN_SECONDS`], and shut the engine down.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), SiteError> {
        let Site {
            config,
            engine,
            events,
            token,
            nbd_listener,
            api_listener,
            metrics_listener,
            nbd_addr,
            api_addr,
            metrics_addr,
            replication,
            started_at,
        } = self;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = |mut rx: watch::Receiver<bool>| async move {
            // An error means the sender is gone, which is a stop too.
            let _ = rx.wait_for(|stop| *stop).await;
        };

        let limits = &config.limits;
        // The config check keeps both byte limits far below u32::MAX, so the fallbacks are
        // never taken; the NBD server clamps them to its own range anyway.
        let server_config = ServerConfig {
            payload_bytes_max: u32::try_from(limits.nbd_payload_bytes_max).unwrap_or(u32::MAX),
            inflight_requests_max: limits.nbd_inflight_requests_max,
            inflight_bytes_max: usize::try_from(limits.nbd_inflight_bytes_max).unwrap_or(usize::MAX),
            connections_max: limits.nbd_connections_max,
            ..ServerConfig::default()
        };
        let nbd_io = Arc::new(NbdIo::default());
        let exports = EngineExports::with_io(engine.clone(), nbd_io.clone());
        let nbd = Arc::new(NbdServer::new(Arc::new(exports), server_config));
        let mut nbd_task = tokio::spawn(nbd.clone().serve(nbd_listener, stopped(stop_rx.clone())));

        // The metrics endpoint is not one of the servers whose failure stops the site: a site
        // that cannot be scraped still serves its hosts (and `up` says it cannot be scraped).
        let registry = Arc::new(metrics::registry(Sources {
            engine: engine.clone(),
            replication: replication.clone(),
            events: events.clone(),
            nbd,
            nbd_io,
            started: started_at,
        }));
        let metrics_task = tokio::spawn(
            axum::serve(metrics_listener, metrics::router(registry))
                .with_graceful_shutdown(stopped(stop_rx.clone()))
                .into_future(),
        );
        tracing::debug!(url = %metrics::endpoint_url(metrics_addr), "metrics endpoint serving");

        let state = ApiState::new(
            ApiSettings {
                site_name: config.site.name.clone(),
                api_listen: api_addr,
                nbd_listen: nbd_addr,
                body_bytes_max: usize::try_from(limits.api_body_bytes_max).unwrap_or(usize::MAX),
                jobs_finished_max: limits.api_jobs_finished_max,
                group_defaults: config.defaults.group_options(),
            },
            engine.clone(),
            events.clone(),
            token,
            replication.clone(),
        );
        let app = api::router(state);
        let mut api_task = tokio::spawn(
            axum::serve(api_listener, app).with_graceful_shutdown(stopped(stop_rx.clone())).into_future(),
        );

        let mut nbd_result = None;
        let mut api_result = None;
        tokio::select! {
            () = shutdown => tracing::info!("shutting down: no longer accepting connections"),
            result = &mut nbd_task => nbd_result = Some(result),
            result = &mut api_task => api_result = Some(result),
        }
        // Ignored: the receivers live in the tasks, and a task that is gone needs no signal.
        let _ = stop_tx.send(true);

        let mut failures = Vec::new();
        let drain = async {
            let nbd = match nbd_result.take() {
                Some(result) => result,
                None => (&mut nbd_task).await,
            };
            let api = match api_result.take() {
                Some(result) => result,
                None => (&mut api_task).await,
            };
            (nbd, api)
        };
        match tokio::time::timeout(Duration::from_secs(SHUTDOWN_DRAIN_SECONDS), drain).await {
            Ok((nbd, api)) => {
                for (service, result) in [("nbd", nbd), ("api", api)] {
                    match result {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => failures.push(SiteError::Serve { service, reason: e.to_string() }),
                        Err(e) => failures.push(SiteError::Serve { service, reason: e.to_string() }),
                    }
                }
            }
            Err(_) => {
                tracing::warn!(
                    seconds = SHUTDOWN_DRAIN_SECONDS,
                    "open connections did not finish in time; closing them"
                );
                nbd_task.abort();
                api_task.abort();
            }
        }
        for failure in &failures {
            tracing::error!(error = %failure, "server failed");
        }
        // Scrapes are short; one still running after the drain is cut off.
        metrics_task.abort();
        if let Ok(Err(e)) = metrics_task.await {
            tracing::error!(error = %e, "metrics server failed");
        }

        replication.shutdown().await;
        let shutdown_engine = engine.clone();
        let engine_result = tokio::task::spawn_blocking(move || shutdown_engine.shutdown())
            .await
            .map_err(|e| {
                SiteError::Shutdown(Box::new(EngineError::Catalog(format!(
                    "engine shut-down did not complete: {e}"
                ))))
            })
            .and_then(|r| r.map_err(|e| SiteError::Shutdown(Box::new(e))));

        let mut stopped_event = Event::now(
            EventSource::Site,
            "site.stop",
            match (&engine_result, failures.first()) {
                (Ok(()), None) => format!("site {} stopped", config.site.name),
                (Err(e), _) => format!("site {} stopped: {e}", config.site.name),
                (Ok(()), Some(e)) => format!("site {} stopped: {e}", config.site.name),
            },
        );
        stopped_event.object = Some(config.site.name.clone());
        events.record(stopped_event);
        events.sync();

        engine_result?;
        match failures.into_iter().next() {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }
}
