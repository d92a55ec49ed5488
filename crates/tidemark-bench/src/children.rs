//! Child processes that must not outlive the benchmark: every site, qemu-nbd and fio it starts
//! is held by a [`Guarded`], which kills it on drop, and is listed in a registry that a signal
//! handler empties (SIGKILL to each) before the program exits on SIGINT, SIGTERM or SIGHUP.
//!
//! Each child leads its own process group and is killed as a group, because fio forks a
//! process per job that would otherwise outlive its parent.

use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use std::os::unix::process::CommandExt;

use rustix::process::{kill_process, kill_process_group, Pid, Signal};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// How often a wait for a child's exit looks again, in milliseconds.
const EXIT_POLL_MILLISECONDS: u64 = 10;

/// How long the signal handler waits for killed children to die, in seconds.
const KILL_DEADLINE_SECONDS: u64 = 5;

/// Ids of the children alive now.
static CHILDREN: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The terminating signal received, or 0.
static INTERRUPTED: AtomicI32 = AtomicI32::new(0);
/// Scratch directories to remove when a signal ends the program (drop handlers do not run then).
static SCRATCH: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Kill every registered child and remove scratch directories when a terminating signal
/// arrives, then exit with 128 + the signal's number.
pub fn install_signal_handler() -> Result<()> {
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP]).context("install signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                // Set first: the main thread, seeing its children die, must know why.
                INTERRUPTED.store(signal, Ordering::SeqCst);
                eprintln!("tidemark-bench: signal {signal}: stopping every child process");
                kill_all();
                let dirs = std::mem::take(&mut *SCRATCH.lock().unwrap_or_else(|e| e.into_inner()));
                for dir in dirs {
                    // Best effort: the program is going away and has no one left to tell.
                    let _ = std::fs::remove_dir_all(dir);
                }
                std::process::exit(128 + signal);
            }
        })
        .context("start signal thread")?;
    Ok(())
}

/// The terminating signal that is stopping the program, if one arrived.
pub fn interrupted() -> Option<i32> {
    match INTERRUPTED.load(Ordering::SeqCst) {
        0 => None,
        signal => Some(signal),
    }
}

/// Remember a scratch directory for removal when a signal ends the program.
pub fn register_scratch(dir: PathBuf) {
    SCRATCH.lock().unwrap_or_else(|e| e.into_inner()).push(dir);
}

/// A running child that is killed (SIGKILL) and reaped when dropped.
pub struct Guarded {
    child: Child,
    name: String,
    exited: Option<ExitStatus>,
}

impl Guarded {
    /// Start `command`; `name` says what it is in errors.
    pub fn spawn(command: &mut Command, name: &str) -> Result<Guarded> {
        // The lock is held across spawn so the signal handler never misses a child that exists.
        let mut children = CHILDREN.lock().unwrap_or_else(|e| e.into_inner());
        let child = command.process_group(0).spawn().with_context(|| format!("start {name}"))?;
        children.push(child.id());
        Ok(Guarded { child, name: name.to_string(), exited: None })
    }

    /// Process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// What it is.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its exit status, if it has exited (reaps it).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().with_context(|| format!("wait for {}", self.name))?;
            if self.exited.is_some() {
                unregister(self.child.id());
            }
        }
        Ok(self.exited)
    }

    /// Wait for it to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.exited {
            return Ok(status);
        }
        let status = self.child.wait().with_context(|| format!("wait for {}", self.name))?;
        self.exited = Some(status);
        unregister(self.child.id());
        Ok(status)
    }

    /// Wait for it to exit and collect what it wrote to piped stdout and stderr.
    pub fn wait_with_output(mut self) -> Result<std::process::Output> {
        use std::io::Read as _;
        let stdout = self.child.stdout.take();
        let reader = std::thread::spawn(move || {
            let mut bytes = Vec::new();
            if let Some(mut out) = stdout {
                // A read error leaves what was read; the exit status tells the story.
                let _ = out.read_to_end(&mut bytes);
            }
            bytes
        });
        let mut stderr = Vec::new();
        if let Some(mut err) = self.child.stderr.take() {
            let _ = err.read_to_end(&mut stderr);
        }
        let status = self.wait()?;
        let stdout = reader.join().unwrap_or_default();
        Ok(std::process::Output { status, stdout, stderr })
    }

    /// Send `signal` and wait at most `deadline` for it to exit.
    pub fn signal_and_wait(&mut self, signal: Signal, deadline: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        self.signal(signal)?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > deadline {
                bail!("{} (pid {}) did not exit within {deadline:?} of {signal:?}", self.name, self.id());
            }
            std::thread::sleep(Duration::from_millis(EXIT_POLL_MILLISECONDS));
        }
    }

    /// Kill it and everything in its process group with SIGKILL, and reap it. The group is
    /// killed even when the leader has exited: fio's job processes outlive a parent that quit
    /// on an I/O error, and would otherwise run (and log) forever.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        // Until it is reaped, even an exited leader holds its pid, so the group id is still ours.
        if self.exited.is_none() {
            kill_group(self.id());
        }
        self.wait()
    }

    fn signal(&self, signal: Signal) -> Result<()> {
        let pid = i32::try_from(self.id())
            .ok()
            .and_then(Pid::from_raw)
            .with_context(|| format!("{} has an invalid pid {}", self.name, self.id()))?;
        kill_process(pid, signal).with_context(|| format!("send {signal:?} to {}", self.name))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if self.exited.is_none() {
            // Best effort: the child may have exited already, and drop cannot report anyway.
            kill_group(self.id());
            let _ = self.child.wait();
            unregister(self.child.id());
        }
    }
}

fn unregister(id: u32) {
    CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).retain(|&c| c != id);
}

/// SIGKILL every registered child and wait (bounded) until each is dead, so that none is still
/// writing into a scratch directory while it is removed.
fn kill_all() {
    let children: Vec<u32> = CHILDREN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    for &id in &children {
        kill_group(id);
    }
    let deadline = Instant::now() + Duration::from_secs(KILL_DEADLINE_SECONDS);
    // The main thread owns the handles and reaps; here a zombie (state Z) counts as dead.
    while children.iter().any(|id| is_alive(*id)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(EXIT_POLL_MILLISECONDS));
    }
}

/// SIGKILL the process group led by child `id` (the child and whatever it forked).
fn kill_group(id: u32) {
    if let Some(pid) = i32::try_from(id).ok().and_then(Pid::from_raw) {
        // Best effort: a group that is already gone is fine.
        let _ = kill_process_group(pid, Signal::KILL);
        let _ = kill_process(pid, Signal::KILL);
    }
}

fn is_alive(id: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{id}/stat"))
        .ok()
        .and_then(|stat| {
            stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next().map(String::from))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}
