//! Black-box test harness: starts the real `tidemark` binary, drives it with its own CLI and
//! with real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio), and a small NBD client of
//! our own for tests that must know exactly which writes were acknowledged.
//!
//! The binary is found through `TIDEMARK_BIN`, or next to the test executable
//! (`target/<profile>/tidemark`); `scripts/test` builds it first.

pub mod nbd;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a site may take to start listening.
pub const START_DEADLINE: Duration = Duration::from_secs(30);

/// The tidemark binary under test.
pub fn binary() -> PathBuf {
    if let Ok(path) = std::env::var("TIDEMARK_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> -> target/<profile>/tidemark
    let candidate = exe.parent().and_then(Path::parent).map(|p| p.join("tidemark")).expect("target dir");
    assert!(
        candidate.exists(),
        "the tidemark binary is not built at {}: run `cargo build -p tidemark-cli` (scripts/test does) or set TIDEMARK_BIN",
        candidate.display()
    );
    candidate
}

/// Path of an external tool; panics (never skips) when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let out = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().expect("sh");
    let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(!path.is_empty(), "required tool {name} is missing: run scripts/test, which installs it");
    PathBuf::from(path)
}

/// Run a tool; returns its output (does not check the status).
pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(tool(name)).args(args).output().unwrap_or_else(|e| panic!("run {name}: {e}"))
}

/// Run a tool and require success; returns stdout.
pub fn run_ok(name: &str, args: &[&str]) -> String {
    let out = run(name, args);
    assert!(
        out.status.success(),
        "{name} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A free UDP port on loopback.
pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Poll `check` until it holds or the deadline passes.
pub fn wait_for(what: &str, deadline: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One running site.
pub struct Site {
    child: Option<Child>,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// NBD listener.
    pub nbd: SocketAddr,
    /// API listener.
    pub api: SocketAddr,
    /// Replication (UDP) listener.
    pub repl: SocketAddr,
    /// Prometheus metrics listener.
    pub metrics: SocketAddr,
    /// Extra arguments it was started with.
    extra: Vec<String>,
    log: PathBuf,
}

impl Site {
    /// Start a site on fresh loopback ports with data in `data_dir`.
    pub fn start(data_dir: &Path) -> Site {
        Site::start_with(data_dir, &[])
    }

    /// Start with extra `serve` arguments.
    pub fn start_with(data_dir: &Path, extra: &[&str]) -> Site {
        let nbd: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let repl: SocketAddr = format!("127.0.0.1:{}", free_udp_port()).parse().expect("addr");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
        let mut site = Site {
            child: None,
            data_dir: data_dir.to_path_buf(),
            nbd,
            api,
            repl,
            metrics,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log: data_dir.with_extension("log"),
        };
        site.spawn();
        site
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let child = Command::new(binary())
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--nbd-listen")
            .arg(self.nbd.to_string())
            .arg("--api-listen")
            .arg(self.api.to_string())
            .arg("--repl-listen")
            .arg(self.repl.to_string())
            .arg("--metrics-listen")
            .arg(self.metrics.to_string())
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tidemark serve");
        self.child = Some(child);
        let (nbd, api) = (self.nbd, self.api);
        let log = self.log.clone();
        wait_for(&format!("site to listen (log: {})", log.display()), START_DEADLINE, || {
            TcpStream::connect(nbd).is_ok() && TcpStream::connect(api).is_ok()
        });
    }

    /// The site's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The site's metrics, as Prometheus would scrape them (panics unless the answer is 200).
    pub fn scrape(&self) -> String {
        let mut stream = TcpStream::connect(self.metrics).expect("connect to the metrics endpoint");
        stream.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        use std::io::{Read, Write};
        write!(stream, "GET /metrics HTTP/1.0\r\nHost: {}\r\n\r\n", self.metrics).expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "scrape failed: {head}"
        );
        body.to_string()
    }

    /// `nbd://` URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.nbd, export)
    }

    /// Run the CLI against this site.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(binary())
            .arg("--api")
            .arg(format!("http://{}", self.api))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()
            .expect("run tidemark")
    }

    /// Run the CLI and require success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "tidemark {args:?} failed ({}):\nstdout: {}\nstderr: {}\nsite log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Run a read command with `--json` and parse it.
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = args.to_vec();
        full.push("--json");
        let out = self.cli_ok(&full);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("tidemark {args:?} --json gave invalid JSON ({e}): {out}"))
    }

    /// Kill the process with SIGKILL (no shutdown path runs).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stop with SIGTERM and wait; returns whether it exited cleanly.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else { return true };
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if start.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Start again on the same ports and data directory.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop or kill the site first");
        self.spawn();
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Two sites under `dir` (`a` and `b`) that trust each other as partners `b` and `a`.
pub fn paired_sites(dir: &Path) -> (Site, Site) {
    paired_sites_with(dir, &[])
}

/// [`paired_sites`], with `partner_b` added to the arguments of `a`'s `partner add b` (such as
/// a bandwidth limit).
pub fn paired_sites_with(dir: &Path, partner_b: &[&str]) -> (Site, Site) {
    let a = Site::start(&dir.join("a"));
    let b = Site::start(&dir.join("b"));
    let fingerprint =
        |s: &Site| s.cli_json(&["site", "show"])["fingerprint"].as_str().expect("fingerprint").to_string();
    let (fa, fb) = (fingerprint(&a), fingerprint(&b));
    let repl_b = b.repl.to_string();
    let add_b = ["partner", "add", "b", "--address", &repl_b, "--fingerprint", &fb];
    a.cli_ok(&[&add_b[..], partner_b].concat());
    b.cli_ok(&["partner", "add", "a", "--address", &a.repl.to_string(), "--fingerprint", &fa]);
    (a, b)
}

/// Deterministic pseudo-random bytes (xorshift), for content that does not compress to nothing.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// `group show GROUP`'s `replication` at `site`.
pub fn replication(site: &Site, group: &str) -> serde_json::Value {
    site.cli_json(&["group", "show", group])["replication"].clone()
}

/// Wait until `primary` reports `group` streaming with no lag.
pub fn wait_caught_up(primary: &Site, group: &str, deadline: Duration) {
    wait_for("replication to catch up (lag_records 0)", deadline, || {
        let r = replication(primary, group);
        r["lag_records"] == 0 && r["state"] == "streaming"
    });
}

/// `qemu-img compare` of `primary`'s `volume` with a fresh read-only image (named `image`) of
/// `secondary`'s newest point of `group`.
pub fn assert_replica_identical(primary: &Site, secondary: &Site, group: &str, volume: &str, image: &str) {
    secondary.cli_ok(&["image", "create", group, "--at", "latest", "--name", image]);
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &primary.uri(volume),
            &secondary.uri(&format!("{image}/{volume}")),
        ],
    );
    secondary.cli_ok(&["image", "delete", image]);
}
