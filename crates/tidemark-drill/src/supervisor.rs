//! Site processes: `tidemark serve` children with their own data directory, ports, config file
//! and log, started, killed, stopped and started again on the same ports and data.
//!
//! Each child leads its own process group, so a Ctrl-C at the terminal reaches only the drill
//! (or `tidemark up`), which then stops its sites in order. Every child is listed in a registry;
//! [`install_signal_handler`] makes SIGINT and SIGTERM set a flag the caller polls, and kills
//! every child itself if the caller has not finished within [`SIGNAL_GRACE`].

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};
use serde::Serialize;

use crate::api::Api;

/// How long a site may take to start answering its API.
pub const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long a site may take to stop after SIGTERM before it is killed.
pub const STOP_DEADLINE: Duration = Duration::from_secs(30);
/// After a terminating signal, how long the program has to stop its children itself before
/// the signal thread kills them and exits.
pub const SIGNAL_GRACE: Duration = Duration::from_secs(20);
/// How often a wait for a process looks again.
const POLL: Duration = Duration::from_millis(20);

/// Ids of the children alive now.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The terminating signal received, or 0.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);

/// Make SIGINT and SIGTERM set the flag [`interrupted`] reads. If the program is still running
/// [`SIGNAL_GRACE`] later, every child is killed and the program exits with 128 + the signal.
pub fn install_signal_handler() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        if let Some(signal) = signals.forever().next() {
            INTERRUPTED.store(signal, Ordering::SeqCst);
            std::thread::sleep(SIGNAL_GRACE);
            eprintln!(
                "tidemark: still running {} s after signal {signal}: killing every site",
                SIGNAL_GRACE.as_secs()
            );
            kill_all();
            std::process::exit(128 + signal);
        }
    })?;
    Ok(())
}

/// The terminating signal received, if one was.
pub fn interrupted() -> Option<i32> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

fn kill_all() {
    let children = std::mem::take(&mut *CHILDREN.lock().unwrap_or_else(|e| e.into_inner()));
    for id in children {
        if let Some(pid) = Pid::from_raw(id as i32) {
            // The child may have exited already; there is nothing else to do either way.
            let _ = kill_process(pid, Signal::KILL);
        }
    }
}

fn unregister(id: u32) {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).retain(|&c| c != id);
}

/// Picks free loopback ports, each one different from every other it picked: each socket stays
/// bound until the picker is dropped, so the kernel cannot hand the same port out twice (it did:
/// a site was once given one port for NBD and metrics, and refused to start). Free when picked;
/// another process may still take one before the sites bind it.
#[derive(Default)]
pub struct FreePorts {
    tcp: Vec<TcpListener>,
    udp: Vec<UdpSocket>,
    taken: std::collections::BTreeSet<u16>,
}

/// Tries before [`FreePorts`] gives up finding a port not yet picked.
const FREE_PORT_TRIES: usize = 64;

impl FreePorts {
    /// A free TCP port.
    pub fn tcp(&mut self) -> std::io::Result<SocketAddr> {
        self.pick(|| {
            let socket = TcpListener::bind("127.0.0.1:0")?;
            Ok((socket.local_addr()?, Socket::Tcp(socket)))
        })
    }

    /// A free UDP port.
    pub fn udp(&mut self) -> std::io::Result<SocketAddr> {
        self.pick(|| {
            let socket = UdpSocket::bind("127.0.0.1:0")?;
            Ok((socket.local_addr()?, Socket::Udp(socket)))
        })
    }

    /// A port number not picked before (in either protocol: a site's config refuses two
    /// listeners on one address whatever they speak).
    fn pick(
        &mut self,
        bind: impl Fn() -> std::io::Result<(SocketAddr, Socket)>,
    ) -> std::io::Result<SocketAddr> {
        for _ in 0..FREE_PORT_TRIES {
            let (addr, socket) = bind()?;
            if self.taken.insert(addr.port()) {
                match socket {
                    Socket::Tcp(s) => self.tcp.push(s),
                    Socket::Udp(s) => self.udp.push(s),
                }
                return Ok(addr);
            }
        }
        Err(std::io::Error::other(format!(
            "no loopback port left that was not picked already ({FREE_PORT_TRIES} tries)"
        )))
    }
}

enum Socket {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

/// A site's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct SitePorts {
    /// NBD (TCP).
    pub nbd: SocketAddr,
    /// Management API (HTTP).
    pub api: SocketAddr,
    /// Replication (QUIC, UDP).
    pub repl: SocketAddr,
    /// Prometheus metrics (HTTP).
    pub metrics: SocketAddr,
}

impl SitePorts {
    /// Free loopback ports for each listener, none of them picked by `ports` before.
    pub fn free(ports: &mut FreePorts) -> std::io::Result<SitePorts> {
        Ok(SitePorts { nbd: ports.tcp()?, api: ports.tcp()?, repl: ports.udp()?, metrics: ports.tcp()? })
    }
}

/// The link the sites are told about, to size their QUIC windows.
#[derive(Debug, Clone, Copy)]
pub struct LinkHint {
    /// Bandwidth in megabits per second.
    pub mbit_per_second: u64,
    /// Round-trip time.
    pub rtt: Duration,
}

/// One `tidemark serve` child.
pub struct SiteProcess {
    /// The site's name.
    pub name: String,
    /// Its data directory.
    pub data_dir: PathBuf,
    /// Its listeners.
    pub ports: SitePorts,
    binary: PathBuf,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    api: Option<Api>,
    terminating: bool,
}

impl SiteProcess {
    /// A site (not started) with data in `dir/NAME`, config `dir/NAME.toml`, log `dir/NAME.log`.
    pub fn new(
        binary: &Path,
        dir: &Path,
        name: &str,
        ports: SitePorts,
        link: LinkHint,
    ) -> std::io::Result<SiteProcess> {
        let data_dir = dir.join(name);
        let config = dir.join(format!("{name}.toml"));
        let text = format!(
            "# Written by tidemark (drill or up) for site {name}.\n\
             [site]\nname = \"{name}\"\ndata_dir = \"{data}\"\n\n\
             [nbd]\nlisten = \"{nbd}\"\n\n[api]\nlisten = \"{api}\"\n\n\
             [replication]\nlisten = \"{repl}\"\nlink_mbit_per_second = {mbit}\nlink_rtt = \"{rtt}ms\"\n\n\
             [metrics]\nlisten = \"{metrics}\"\n",
            data = data_dir.display().to_string().replace('\\', "\\\\").replace('"', "\\\""),
            nbd = ports.nbd,
            api = ports.api,
            repl = ports.repl,
            metrics = ports.metrics,
            mbit = link.mbit_per_second.clamp(1, 400_000),
            rtt = link.rtt.as_millis().clamp(1, 10_000),
        );
        std::fs::write(&config, text)?;
        Ok(SiteProcess {
            name: name.to_string(),
            data_dir,
            ports,
            binary: binary.to_path_buf(),
            config,
            log: dir.join(format!("{name}.log")),
            child: None,
            api: None,
            terminating: false,
        })
    }

    /// Its log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Its config file.
    pub fn config_path(&self) -> &Path {
        &self.config
    }

    /// Start it and wait until its API answers.
    pub fn start(&mut self) -> Result<(), String> {
        if self.is_running() {
            return Err(format!("site {} is already running", self.name));
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let err_log = log.try_clone().map_err(|e| format!("open {}: {e}", self.log.display()))?;
        let mut command = Command::new(&self.binary);
        command
            .arg("serve")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .process_group(0);
        let child = {
            // Held across spawn so the signal thread never misses a child that exists.
            let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
            let child = command
                .spawn()
                .map_err(|e| format!("start site {} ({}): {e}", self.name, self.binary.display()))?;
            children.push(child.id());
            child
        };
        self.child = Some(child);
        self.terminating = false;
        let started = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Err(format!(
                    "site {} exited at start ({status}); its log {} says:\n{}",
                    self.name,
                    self.log.display(),
                    tail(&self.log, 20)
                ));
            }
            if let Some(token) = Api::read_token(&self.data_dir) {
                let api = Api::new(self.ports.api, token);
                if api.get("/v1/status").is_ok() {
                    self.api = Some(api);
                    return Ok(());
                }
            }
            if started.elapsed() > START_DEADLINE {
                self.kill();
                return Err(format!(
                    "site {} did not answer its API within {} s; its log {}:\n{}",
                    self.name,
                    START_DEADLINE.as_secs(),
                    self.log.display(),
                    tail(&self.log, 20)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Its API, while it runs.
    pub fn api(&self) -> Result<&Api, String> {
        match (&self.child, &self.api) {
            (Some(_), Some(api)) => Ok(api),
            _ => Err(format!("site {} is not running", self.name)),
        }
    }

    /// Whether its process is alive.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// The exit status, if the process has exited (and forget it).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                unregister(child.id());
                self.child = None;
                self.api = None;
                Some(status)
            }
            _ => None,
        }
    }

    /// Kill it with SIGKILL and reap it: no shutdown path runs, as in a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Either it dies now or it was already dead; wait reaps it in both cases.
            let _ = child.kill();
            let _ = child.wait();
            unregister(child.id());
        }
        self.api = None;
    }

    /// Send SIGTERM without waiting, so several sites stop at once; [`SiteProcess::stop`]
    /// then waits.
    pub fn terminate(&mut self) {
        if let (Some(child), false) = (&self.child, self.terminating) {
            if let Some(pid) = Pid::from_raw(child.id() as i32) {
                // It may have exited on its own; the wait in `stop` tells.
                let _ = kill_process(pid, Signal::TERM);
            }
            self.terminating = true;
        }
    }

    /// Stop it with SIGTERM; fails unless it exits cleanly within [`STOP_DEADLINE`] (it is
    /// killed then).
    pub fn stop(&mut self) -> Result<(), String> {
        self.terminate();
        self.terminating = false;
        let Some(mut child) = self.child.take() else { return Ok(()) };
        self.api = None;
        let started = Instant::now();
        let result = loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => break Ok(()),
                Ok(Some(status)) => {
                    break Err(format!(
                        "site {} stopped with {status}; see {}",
                        self.name,
                        self.log.display()
                    ))
                }
                Ok(None) if started.elapsed() > STOP_DEADLINE => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break Err(format!(
                        "site {} did not stop within {} s of SIGTERM and was killed; see {}",
                        self.name,
                        STOP_DEADLINE.as_secs(),
                        self.log.display()
                    ));
                }
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => break Err(format!("wait for site {}: {e}", self.name)),
            }
        };
        unregister(child.id());
        result
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for SiteProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of a file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all.get(all.len().saturating_sub(lines)..).unwrap_or(&[]).join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_all_different_and_held_until_dropped() {
        let mut ports = FreePorts::default();
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..100 {
            let addr = if i % 3 == 0 { ports.udp() } else { ports.tcp() }.expect("a free port");
            assert!(seen.insert(addr.port()), "port {} picked twice", addr.port());
        }
        let held = ports.tcp().expect("one more");
        assert!(TcpListener::bind(held).is_err(), "a picked port stays bound while the picker lives");
        drop(ports);
        assert!(TcpListener::bind(held).is_ok(), "and is free once it is dropped");
    }
}
