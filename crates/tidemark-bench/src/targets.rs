//! The NBD servers under test: a Tidemark site (the release binary, its own data directory),
//! qemu-nbd and nbdkit's file plugin serving a raw file, all started on free loopback ports.
//!
//! A server counts as started when it sends the NBD greeting, not when its port takes a TCP
//! connection: a site binds its listeners before it opens the engine, so the kernel completes
//! connections for it while it is still replaying its journal.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rustix::process::Signal;
use serde_json::Value;

use crate::children::Guarded;

/// How long a server may take to send its NBD greeting, in seconds (a full journal rebuild of
/// 10 GiB from a cold cache is well within this).
pub const START_DEADLINE_SECONDS: u64 = 600;
/// How long a clean stop (drain, final checkpoint) may take, in seconds.
pub const STOP_DEADLINE_SECONDS: u64 = 300;
/// Pause between connection attempts while a server starts, in milliseconds.
const CONNECT_RETRY_MILLISECONDS: u64 = 2;

/// `NBDMAGIC`, the first 8 bytes a server sends.
const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, the next 8 bytes, and the start of every client option.
const NBD_IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Client flags `NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES`.
const NBD_CLIENT_FLAGS: u32 = 0b11;
/// Option `NBD_OPT_ABORT`: end the handshake politely.
const NBD_OPT_ABORT: u32 = 2;

/// A Tidemark site started from the release binary.
pub struct Site {
    binary: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    nbd: SocketAddr,
    api: SocketAddr,
    /// The replication link's UDP address: a free loopback port, so that a benchmark site
    /// neither listens on every interface nor collides with another site on the default port.
    repl: SocketAddr,
    /// The Prometheus endpoint, on a free loopback port so the benchmark can read counters.
    metrics: SocketAddr,
    /// A site config file (`tidemark serve --config`), if any.
    config: Option<PathBuf>,
    log: PathBuf,
    child: Option<Guarded>,
}

impl Site {
    /// A site (not yet started) with data in `data_dir` and its log beside it.
    pub fn new(binary: &Path, data_dir: &Path) -> Result<Site> {
        Ok(Site {
            binary: binary.to_path_buf(),
            data_dir: data_dir.to_path_buf(),
            nbd: free_loopback_port()?,
            api: free_loopback_port()?,
            repl: free_loopback_udp_port()?,
            metrics: free_loopback_port()?,
            config: None,
            log: data_dir.with_extension("log"),
            child: None,
        })
    }

    /// The same, started with a config file holding `toml` (written beside the data directory);
    /// the command-line addresses still win over the file's.
    pub fn with_config(binary: &Path, data_dir: &Path, toml: &str) -> Result<Site> {
        let mut site = Site::new(binary, data_dir)?;
        let path = data_dir.with_extension("toml");
        std::fs::write(&path, toml).with_context(|| format!("write site config {}", path.display()))?;
        site.config = Some(path);
        Ok(site)
    }

    /// Start `tidemark serve` and wait for its NBD greeting; returns how long that took from
    /// the spawn.
    pub fn start(&mut self) -> Result<Duration> {
        if self.child.is_some() {
            bail!("site {} is already running", self.data_dir.display());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("open site log {}", self.log.display()))?;
        let mut command = Command::new(&self.binary);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        command
            .arg("serve")
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--nbd-listen")
            .arg(self.nbd.to_string())
            .arg("--api-listen")
            .arg(self.api.to_string())
            .arg("--repl-listen")
            .arg(self.repl.to_string())
            // A free port keeps it off a real site's 9600; the benchmark reads counters there.
            .arg("--metrics-listen")
            .arg(self.metrics.to_string())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicate site log handle")?)
            .stderr(log);
        let start = Instant::now();
        let mut child = Guarded::spawn(&mut command, &format!("tidemark site {}", self.data_dir.display()))?;
        let ready = wait_for_greeting(self.nbd, &mut child);
        let elapsed = start.elapsed();
        self.child = Some(child);
        ready.with_context(|| format!("start site (log: {})", self.log.display()))?;
        Ok(elapsed)
    }

    /// Stop with SIGTERM (the site drains and writes its checkpoint) and require a clean exit;
    /// returns how long the stop took.
    pub fn stop(&mut self) -> Result<Duration> {
        let mut child = self.child.take().context("stop a site that is not running")?;
        let start = Instant::now();
        let status = child.signal_and_wait(Signal::TERM, Duration::from_secs(STOP_DEADLINE_SECONDS))?;
        if !status.success() {
            bail!("site exited with {status} on SIGTERM (log: {})", self.log.display());
        }
        Ok(start.elapsed())
    }

    /// Kill with SIGKILL: no shut-down path runs, no checkpoint is written.
    pub fn kill9(&mut self) -> Result<()> {
        let mut child = self.child.take().context("kill a site that is not running")?;
        child.kill()?;
        Ok(())
    }

    /// The replication link's address.
    pub fn repl_addr(&self) -> SocketAddr {
        self.repl
    }

    /// Process id of the running site.
    pub fn pid(&self) -> Result<u32> {
        Ok(self.child.as_ref().context("the site is not running")?.id())
    }

    /// `nbd://` URI of an export.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.nbd)
    }

    /// Run the CLI against this site; returns stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.binary)
            .arg("--api")
            .arg(format!("http://{}", self.api))
            .arg("--data-dir")
            .arg(&self.data_dir)
            .args(args)
            .output()
            .with_context(|| format!("run tidemark {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "tidemark {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Create group `group` (default retention, `journal_max`) with one volume `volume`.
    pub fn create_volume(&self, group: &str, journal_max: &str, volume: &str, size: &str) -> Result<()> {
        self.cli(&["group", "create", group, "--journal-max", journal_max])?;
        self.cli(&["volume", "create", volume, "--size", size, "--group", group])?;
        Ok(())
    }

    /// `group show GROUP --json`.
    pub fn group(&self, group: &str) -> Result<Value> {
        let text = self.cli(&["group", "show", group, "--json"])?;
        serde_json::from_str(&text).with_context(|| format!("parse `group show {group} --json`: {text}"))
    }

    /// The group's journal size, in bytes, and newest seq.
    pub fn journal(&self, group: &str) -> Result<(u64, u64)> {
        let info = self.group(group)?;
        let field = |name: &str| info.get(name).and_then(Value::as_u64).with_context(|| format!("no {name}"));
        Ok((field("journal_bytes")?, field("last_seq")?))
    }

    /// The sum of every sample of the Prometheus metric `name` whose labels contain each of
    /// `labels` (e.g. `operation="flush"`), read from the site's metrics endpoint.
    pub fn metric(&self, name: &str, labels: &[&str]) -> Result<f64> {
        let text = http_get(self.metrics, "/metrics")?;
        let mut sum = 0.0;
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else { continue };
            let metric = series.split('{').next().unwrap_or_default();
            if metric == name && labels.iter().all(|l| series.contains(l)) {
                sum += value.parse::<f64>().with_context(|| format!("parse metric line {line:?}"))?;
            }
        }
        Ok(sum)
    }

    /// Remove every group's index checkpoint, so the next start rebuilds from the journal.
    pub fn remove_checkpoints(&self) -> Result<usize> {
        let groups = self.data_dir.join("groups");
        let mut removed = 0;
        for entry in std::fs::read_dir(&groups).with_context(|| format!("list {}", groups.display()))? {
            let path = entry.context("list groups")?.path().join("checkpoint");
            match std::fs::remove_file(&path) {
                Ok(()) => removed += 1,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("remove {}", path.display())),
            }
        }
        Ok(removed)
    }
}

/// Another NBD server serving a raw file (qemu-nbd or nbdkit), started and stopped by the bench.
pub struct ExternalServer {
    child: Guarded,
    addr: SocketAddr,
    export: String,
}

impl ExternalServer {
    /// Run `program` with `args`, its output in `log_path`, and wait for its greeting at `addr`.
    fn spawn(
        program: &str,
        args: &[String],
        log_path: &Path,
        addr: SocketAddr,
        export: &str,
    ) -> Result<Self> {
        let log =
            std::fs::File::create(log_path).with_context(|| format!("create {}", log_path.display()))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().with_context(|| format!("duplicate {program} log handle"))?)
            .stderr(log);
        let mut child = Guarded::spawn(&mut command, program)?;
        wait_for_greeting(addr, &mut child)
            .with_context(|| format!("start {program} (log: {})", log_path.display()))?;
        Ok(ExternalServer { child, addr, export: export.to_string() })
    }

    /// `nbd://` URI of its export.
    pub fn uri(&self) -> String {
        format!("nbd://{}/{}", self.addr, self.export)
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stop it with SIGTERM.
    pub fn stop(mut self) -> Result<()> {
        self.child.signal_and_wait(Signal::TERM, Duration::from_secs(STOP_DEADLINE_SECONDS))?;
        Ok(())
    }
}

/// qemu-nbd serving a raw file, the baseline.
pub struct QemuNbd;

impl QemuNbd {
    /// The arguments qemu-nbd runs with (besides port, export name and file).
    pub const OPTIONS: [&'static str; 6] =
        ["--cache=none", "--aio=native", "-f", "raw", "--persistent", "--shared=8"];

    /// Serve `image` as `export` and wait for the greeting.
    pub fn start(image: &Path, export: &str) -> Result<ExternalServer> {
        let addr = free_loopback_port()?;
        let mut args: Vec<String> = ["-t", "-b"].map(String::from).to_vec();
        args.extend([
            addr.ip().to_string(),
            "-p".into(),
            addr.port().to_string(),
            "-x".into(),
            export.into(),
        ]);
        args.extend(Self::OPTIONS.map(String::from));
        args.push(image.display().to_string());
        ExternalServer::spawn("qemu-nbd", &args, &image.with_extension("log"), addr, export)
    }

    /// The command line, for the report.
    pub fn command_line(image: &str, export: &str) -> String {
        format!("qemu-nbd -t -b 127.0.0.1 -p PORT -x {export} {} {image}", Self::OPTIONS.join(" "))
    }
}

/// nbdkit's file plugin serving a raw file, the second baseline.
pub struct Nbdkit;

impl Nbdkit {
    /// The plugin and its settings (besides the file): the plugin's defaults, which go
    /// through the page cache, with nbdkit's default thread pool (16 threads).
    pub const OPTIONS: [&'static str; 2] = ["--foreground", "--exit-with-parent"];

    /// Serve `image` and wait for the greeting. The file plugin serves the same file under
    /// any export name; `export` is the name clients ask for.
    pub fn start(image: &Path, export: &str) -> Result<ExternalServer> {
        let addr = free_loopback_port()?;
        let mut args: Vec<String> = Self::OPTIONS.map(String::from).to_vec();
        args.extend([
            "-i".into(),
            addr.ip().to_string(),
            "-p".into(),
            addr.port().to_string(),
            "file".into(),
        ]);
        args.push(format!("file={}", image.display()));
        ExternalServer::spawn("nbdkit", &args, &image.with_extension("nbdkit.log"), addr, export)
    }

    /// The command line, for the report.
    pub fn command_line(image: &str) -> String {
        format!("nbdkit {} -i 127.0.0.1 -p PORT file file={image}", Self::OPTIONS.join(" "))
    }
}

/// A plain HTTP/1.0 GET on loopback; returns the body. Enough for a Prometheus endpoint.
fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = TcpStream::connect(addr).with_context(|| format!("connect to {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).context("set read timeout")?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").context("send HTTP request")?;
    let mut text = String::new();
    stream.read_to_string(&mut text).with_context(|| format!("read http://{addr}{path}"))?;
    let (head, body) = text.split_once("\r\n\r\n").context("HTTP answer without a header")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET http://{addr}{path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}

/// Create a sparse raw image of `size_bytes` with qemu-img.
pub fn create_raw_image(path: &Path, size_bytes: u64) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(path)
        .arg(size_bytes.to_string())
        .output()
        .context("run qemu-img create")?;
    if !out.status.success() {
        bail!("qemu-img create {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// A size as the tidemark CLI takes it: `8GiB`, `16MiB` or bytes.
pub fn size_arg(bytes: u64) -> String {
    match bytes {
        b if b != 0 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b != 0 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b => b.to_string(),
    }
}

/// A loopback address with a port that was free a moment ago.
fn free_loopback_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").context("find a free loopback port")?;
    listener.local_addr().context("find a free loopback port")
}

/// A loopback UDP address with a port that was free a moment ago.
pub fn free_loopback_udp_port() -> Result<SocketAddr> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").context("find a free loopback UDP port")?;
    socket.local_addr().context("find a free loopback UDP port")
}

/// Wait until the server at `addr` sends a valid NBD greeting, then end the handshake with
/// `NBD_OPT_ABORT`. Fails if `child` exits first or the deadline passes.
fn wait_for_greeting(addr: SocketAddr, child: &mut Guarded) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(START_DEADLINE_SECONDS);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("{} exited with {status} before it served NBD", child.name());
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            bail!("{} sent no NBD greeting on {addr} within {START_DEADLINE_SECONDS} s", child.name());
        }
        let Ok(mut stream) = TcpStream::connect(addr) else {
            std::thread::sleep(Duration::from_millis(CONNECT_RETRY_MILLISECONDS));
            continue;
        };
        stream.set_read_timeout(Some(remaining)).context("set read timeout")?;
        let mut greeting = [0u8; 18];
        match stream.read_exact(&mut greeting) {
            Ok(()) => {}
            // Closed before greeting (the process is going away, or shedding connections).
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => continue,
            Err(e) => return Err(e).with_context(|| format!("read the NBD greeting from {addr}")),
        }
        let magic = u64::from_be_bytes(greeting[..8].try_into().context("greeting")?);
        let opt = u64::from_be_bytes(greeting[8..16].try_into().context("greeting")?);
        if magic != NBD_MAGIC || opt != NBD_IHAVEOPT {
            bail!("{addr} sent something other than a newstyle NBD greeting: {greeting:02x?}");
        }
        let mut abort = Vec::with_capacity(20);
        abort.extend_from_slice(&NBD_CLIENT_FLAGS.to_be_bytes());
        abort.extend_from_slice(&NBD_IHAVEOPT.to_be_bytes());
        abort.extend_from_slice(&NBD_OPT_ABORT.to_be_bytes());
        abort.extend_from_slice(&0u32.to_be_bytes());
        // The server may close as soon as it reads the abort; a failed write changes nothing.
        let _ = stream.write_all(&abort);
        return Ok(());
    }
}
