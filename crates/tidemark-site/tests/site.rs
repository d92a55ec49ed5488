//! A whole site started and stopped in-process: listeners on port 0, the token made on first
//! start and reused, a clean stop that leaves `site.start` and `site.stop` in the event log, and
//! a port already in use refused before the engine is touched.

use std::time::Duration;

use tidemark_site::events::EVENTS_FILE_NAME;
use tidemark_site::token::TOKEN_FILE_NAME;
use tidemark_site::{Config, Overrides, Site, SiteError};

fn config(dir: &std::path::Path) -> Config {
    let mut config = Config::default();
    config
        .apply(Overrides {
            name: Some("it-site".into()),
            data_dir: Some(dir.to_path_buf()),
            nbd_listen: Some("127.0.0.1:0".parse().expect("addr")),
            api_listen: Some("127.0.0.1:0".parse().expect("addr")),
            repl_listen: Some("127.0.0.1:0".parse().expect("addr")),
            metrics_listen: Some("127.0.0.1:0".parse().expect("addr")),
        })
        .expect("config");
    config
}

fn status(api: std::net::SocketAddr, token: &str) -> serde_json::Value {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(30))).build().into();
    agent
        .get(format!("http://{api}/v1/status"))
        .header("Authorization", format!("Bearer {token}"))
        .call()
        .expect("status")
        .body_mut()
        .read_json()
        .expect("status json")
}

#[test]
fn site_starts_serves_and_stops_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let mut first_token = String::new();
    for round in 0..2 {
        let site = runtime.block_on(Site::start(config(dir.path()))).expect("start");
        let (api, nbd) = (site.api_addr(), site.nbd_addr());
        assert_ne!(api.port(), 0);
        assert_ne!(nbd.port(), 0);
        let token = std::fs::read_to_string(dir.path().join(TOKEN_FILE_NAME)).expect("token file");
        let token = token.trim().to_string();
        if round == 0 {
            first_token = token.clone();
        } else {
            assert_eq!(token, first_token, "the token must be reused across restarts");
        }
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let running = runtime.spawn(site.run(async move {
            let _ = stop_rx.await;
        }));
        // The NBD port accepts connections while the site runs.
        std::net::TcpStream::connect(nbd).expect("connect to nbd");
        // The multi-threaded runtime serves while this thread makes a blocking call.
        let status = status(api, &token);
        assert_eq!(status["site"], "it-site");
        assert_eq!(status["listeners"]["nbd"], nbd.to_string());
        stop_tx.send(()).expect("signal stop");
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(30), running).await })
            .expect("site stops in time")
            .expect("join")
            .expect("clean stop");
        assert!(std::net::TcpStream::connect(api).is_err(), "the API must stop listening");
    }
    let log = std::fs::read_to_string(dir.path().join(EVENTS_FILE_NAME)).expect("events");
    assert_eq!(log.matches("\"site.start\"").count(), 2, "{log}");
    assert_eq!(log.matches("\"site.stop\"").count(), 2, "{log}");
}

#[test]
fn port_in_use_is_refused_with_the_address() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let mut config = config(dir.path());
    config.api.listen = addr;
    let err = runtime.block_on(Site::start(config)).err().expect("port in use");
    assert!(matches!(err, SiteError::Listen { service: "api", .. }), "{err}");
    assert!(err.to_string().contains(&addr.to_string()), "{err}");
}
