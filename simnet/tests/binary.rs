//! The `simnet` binary, black-box: relay between a real client and a real echo server, cut and
//! heal the link with `simnet ctl`, and read the counters. No timings are asserted; every wait is
//! for a condition, with a generous deadline.

use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SIMNET: &str = env!("CARGO_BIN_EXE_simnet");
const DEADLINE: Duration = Duration::from_secs(20);

/// A running `simnet` process, killed when dropped.
struct Relay {
    child: Child,
    listen: String,
    control: String,
}

impl Relay {
    fn start(forward: &str, profile: &str) -> Relay {
        let mut child = Command::new(SIMNET)
            .args(["--listen", "127.0.0.1:0", "--forward", forward, "--profile", profile])
            .args(["--control", "127.0.0.1:0", "--seed", "7"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start simnet");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read the address line");
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|field| field.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {line:?}"))
                .to_owned()
        };
        let (listen, control) = (field("listen="), field("control="));
        assert_eq!(field("profile="), profile);
        Relay { child, listen, control }
    }

    /// Run `simnet ctl CONTROL ARGS...` and return its stdout, asserting success.
    fn ctl(&self, args: &[&str]) -> String {
        let output = Command::new(SIMNET).arg("ctl").arg(&self.control).args(args).output().expect("run ctl");
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "ctl {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        stdout
    }

    fn ctl_json(&self, args: &[&str]) -> serde_json::Value {
        let text = self.ctl(args);
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("ctl {args:?} printed {text:?}: {error}"))
    }

    /// Wait until `condition` holds of `ctl stats`.
    fn wait_for_stats(&self, what: &str, condition: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let stats = self.ctl_json(&["stats"]);
            if condition(&stats) {
                return;
            }
            assert!(Instant::now() < deadline, "gave up waiting for {what}: {stats:#}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An echo server on a thread; it stops when the test process ends.
fn echo_server() -> String {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the echo server");
    let addr = socket.local_addr().expect("echo address").to_string();
    std::thread::spawn(move || {
        let mut buffer = vec![0_u8; 65_536];
        while let Ok((len, from)) = socket.recv_from(&mut buffer) {
            let _ = socket.send_to(&buffer[..len], from);
        }
    });
    addr
}

fn client(relay: &Relay) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind a client");
    socket.connect(&relay.listen).expect("connect");
    socket.set_read_timeout(Some(DEADLINE)).expect("timeout");
    socket
}

fn echo(socket: &UdpSocket, payload: &[u8]) {
    socket.send(payload).expect("send");
    let mut buffer = vec![0_u8; 65_536];
    let len = socket.recv(&mut buffer).expect("a reply within the deadline");
    assert_eq!(&buffer[..len], payload);
}

#[test]
fn relays_and_obeys_ctl() {
    let relay = Relay::start(&echo_server(), "metro");
    let client = client(&relay);
    echo(&client, b"hello through metro");

    let cut = relay.ctl_json(&["partition", "both"]);
    assert_eq!(cut["a_to_b"]["partitioned"], true);
    assert_eq!(cut["b_to_a"]["partitioned"], true);
    client.send(b"into the void").expect("send");
    relay.wait_for_stats("a partition drop", |stats| stats["a_to_b"]["dropped"]["partition"] == 1);

    let healed = relay.ctl_json(&["heal"]);
    assert_eq!(healed["a_to_b"]["partitioned"], false);
    echo(&client, b"healed");

    let set = relay.ctl_json(&["set", "--rtt", "10ms", "--loss", "0.5%", "--rate", "100Mbit/s"]);
    for direction in ["a_to_b", "b_to_a"] {
        assert_eq!(set[direction]["delay"], "5ms");
        assert_eq!(set[direction]["rate"], "100Mbit/s");
        assert_eq!(set[direction]["loss"]["probability"], 0.005);
    }
    let one_way = relay.ctl_json(&["set", "--direction", "b_to_a", "--delay", "30ms", "--loss", "0"]);
    assert_eq!(one_way["a_to_b"]["delay"], "5ms");
    assert_eq!(one_way["b_to_a"]["delay"], "30ms");
    assert_eq!(one_way["b_to_a"]["loss"]["model"], "none");
    assert_eq!(relay.ctl_json(&["get"]), one_way);

    relay.wait_for_stats("the counters to add up", |stats| {
        stats["a_to_b"]["received_packets"] == 3
            && stats["a_to_b"]["delivered_packets"] == 2
            && stats["b_to_a"]["delivered_packets"] == 2
            && stats["clients"] == 1
    });
}

#[test]
fn ctl_reports_refusals_and_unreachable_relays() {
    let relay = Relay::start(&echo_server(), "wan");
    let output =
        Command::new(SIMNET).args(["ctl", &relay.control, "set", "--delay", "2h"]).output().expect("run ctl");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("limit"), "the refusal says why");

    // A port nobody listens on: bind one, note it, close it.
    let unused =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").to_string();
    let output = Command::new(SIMNET).args(["ctl", &unused, "stats"]).output().expect("run ctl");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is simnet running"));
}

#[test]
fn profiles_are_listed_and_unknown_ones_refused() {
    let output = Command::new(SIMNET).arg("profiles").output().expect("run simnet profiles");
    assert!(output.status.success());
    let listing = String::from_utf8_lossy(&output.stdout);
    for name in ["metro", "wan", "intercontinental", "satellite", "flapping"] {
        assert!(listing.lines().any(|line| line.starts_with(name)), "{name} missing from {listing}");
    }

    let output = Command::new(SIMNET)
        .args(["--listen", "127.0.0.1:0", "--forward", "127.0.0.1:9", "--profile", "dialup"])
        .output()
        .expect("run simnet");
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(error.contains("dialup") && error.contains("metro, wan"), "{error}");
}
