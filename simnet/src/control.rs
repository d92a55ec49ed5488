//! The control interface: one JSON object per line over TCP, to read and change a running
//! relay's link.
//!
//! A client sends a [`Request`] on one line and reads one [`Response`] line back, as many times
//! as it likes on one connection. For example, with `nc 127.0.0.1 7700`:
//!
//! ```text
//! {"op":"partition","direction":"both"}
//! {"ok":true,"settings":{"a_to_b":{...,"partitioned":true,...},"b_to_a":{...}}}
//! {"op":"heal"}
//! {"ok":true,"settings":{...}}
//! {"op":"stats"}
//! {"ok":true,"stats":{"a_to_b":{"received_packets":12,...},"b_to_a":{...},"clients":1}}
//! {"op":"dance"}
//! {"ok":false,"error":"bad request: unknown variant `dance`, expected one of ..."}
//! ```
//!
//! The interface has no authentication: bind it to a loopback or lab-only address.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;

use crate::relay::{Shared, Stats};
use crate::settings::{DirectionSettings, LinkSettings, Ways};

/// Longest request line the server reads, in bytes; a longer one gets an error and the
/// connection is closed.
pub const CONTROL_LINE_BYTES_MAX: usize = 64 * 1024;
/// Longest response line the client reads, in bytes.
pub const CONTROL_RESPONSE_BYTES_MAX: usize = 1024 * 1024;
/// Most control connections open at once; more are closed at once.
pub const CONTROL_CONNECTIONS_MAX: usize = 16;
/// How long a control connection may stay silent before the server closes it, in seconds.
pub const CONTROL_IDLE_SECONDS: u64 = 300;

/// What a control client asks for. On the wire, `op` names the operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Read the settings of both directions.
    Get,
    /// Replace the settings of both directions (partitions included). `settings` may use the
    /// `both` shorthand.
    Set {
        /// The new settings.
        settings: LinkSettings,
    },
    /// Replace the settings of one direction, or give both directions the same settings.
    SetDirection {
        /// Which direction: `a_to_b`, `b_to_a` or `both`.
        direction: Ways,
        /// The new settings.
        settings: DirectionSettings,
    },
    /// Cut one direction or both.
    Partition {
        /// Which direction: `a_to_b`, `b_to_a` or `both`.
        direction: Ways,
    },
    /// Undo a partition; both directions unless `direction` says otherwise.
    Heal {
        /// Which direction: `a_to_b`, `b_to_a` or `both` (the default).
        #[serde(default = "both")]
        direction: Ways,
    },
    /// Read the counters.
    Stats,
}

fn both() -> Ways {
    Ways::Both
}

/// The answer to a [`Request`]: `ok` and the settings after the operation (every operation but
/// `stats`) or the counters (`stats`), or `ok: false` and an error message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// Whether the operation was done.
    pub ok: bool,
    /// The settings after the operation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<LinkSettings>,
    /// The counters, for `stats`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// Why the operation was not done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    fn settings(settings: LinkSettings) -> Response {
        Response { ok: true, settings: Some(settings), stats: None, error: None }
    }

    fn error(error: String) -> Response {
        Response { ok: false, settings: None, stats: None, error: Some(error) }
    }
}

/// A control interface failure, seen from the client.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The address did not resolve.
    #[error("resolve control address {addr}: {source}")]
    Resolve {
        /// The address as given.
        addr: String,
        /// The resolver's error.
        source: std::io::Error,
    },
    /// No connection could be made.
    #[error("connect to the simnet control interface at {addr}: {source}; is simnet running with --control {addr}?")]
    Connect {
        /// The address.
        addr: String,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Sending the request or reading the response failed.
    #[error("talk to the simnet control interface: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection without answering.
    #[error("the simnet control interface closed the connection without answering")]
    Closed,
    /// The answer is not a response line.
    #[error("the simnet control interface answered something that is not a response: {0}")]
    Malformed(#[from] serde_json::Error),
    /// The server refused the operation.
    #[error("simnet refused: {0}")]
    Refused(String),
}

/// A blocking client of the control interface, for the `simnet ctl` command and for tests.
pub struct ControlClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl ControlClient {
    /// Connect to the control interface at `addr` (`host:port`), waiting at most `timeout` for
    /// the connection and for each answer.
    pub fn connect(addr: &str, timeout: Duration) -> Result<ControlClient, ControlError> {
        let resolved: Vec<SocketAddr> = addr
            .to_socket_addrs()
            .map_err(|source| ControlError::Resolve { addr: addr.to_owned(), source })?
            .collect();
        let mut last_error = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for candidate in resolved {
            match TcpStream::connect_timeout(&candidate, timeout) {
                Ok(stream) => {
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    let writer = stream.try_clone()?;
                    return Ok(ControlClient { reader: BufReader::new(stream), writer });
                }
                Err(error) => last_error = error,
            }
        }
        Err(ControlError::Connect { addr: addr.to_owned(), source: last_error })
    }

    /// Send a request and read its response, whether `ok` or not.
    pub fn request(&mut self, request: &Request) -> Result<Response, ControlError> {
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut answer = Vec::new();
        (&mut self.reader).take(CONTROL_RESPONSE_BYTES_MAX as u64).read_until(b'\n', &mut answer)?;
        if answer.is_empty() {
            return Err(ControlError::Closed);
        }
        Ok(serde_json::from_slice(&answer)?)
    }

    /// Read the settings.
    pub fn settings(&mut self) -> Result<LinkSettings, ControlError> {
        self.expect_settings(&Request::Get)
    }

    /// Replace the settings of both directions.
    pub fn set_settings(&mut self, settings: LinkSettings) -> Result<LinkSettings, ControlError> {
        self.expect_settings(&Request::Set { settings })
    }

    /// Cut one direction or both.
    pub fn partition(&mut self, direction: Ways) -> Result<LinkSettings, ControlError> {
        self.expect_settings(&Request::Partition { direction })
    }

    /// Undo a partition.
    pub fn heal(&mut self, direction: Ways) -> Result<LinkSettings, ControlError> {
        self.expect_settings(&Request::Heal { direction })
    }

    /// Read the counters.
    pub fn stats(&mut self) -> Result<Stats, ControlError> {
        let response = self.expect_ok(&Request::Stats)?;
        response.stats.ok_or_else(|| ControlError::Refused("the response has no stats".into()))
    }

    fn expect_settings(&mut self, request: &Request) -> Result<LinkSettings, ControlError> {
        let response = self.expect_ok(request)?;
        response.settings.ok_or_else(|| ControlError::Refused("the response has no settings".into()))
    }

    fn expect_ok(&mut self, request: &Request) -> Result<Response, ControlError> {
        let response = self.request(request)?;
        if response.ok {
            Ok(response)
        } else {
            Err(ControlError::Refused(response.error.unwrap_or_default()))
        }
    }
}

/// Serve the control interface on `listener` until aborted.
///
/// # Cancel safety
///
/// Meant to be aborted at shutdown: aborting it also aborts every connection, which live in its
/// `JoinSet`.
pub(crate) async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "simnet control interface could not accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= CONTROL_CONNECTIONS_MAX {
            tracing::warn!(%peer, CONTROL_CONNECTIONS_MAX, "simnet control interface refused a connection: too many open");
            continue;
        }
        let shared = Arc::clone(&shared);
        connections.spawn(async move {
            if let Err(error) = serve_connection(stream, &shared).await {
                tracing::debug!(%peer, %error, "simnet control connection ended");
            }
        });
    }
}

/// Answer one connection's requests until it closes, goes quiet or sends garbage.
async fn serve_connection(stream: tokio::net::TcpStream, shared: &Shared) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(reader);
    let mut line = Vec::new();
    loop {
        line.clear();
        let idle = Duration::from_secs(CONTROL_IDLE_SECONDS);
        let mut limited = (&mut reader).take(CONTROL_LINE_BYTES_MAX as u64 + 1);
        let len = match tokio::time::timeout(idle, limited.read_until(b'\n', &mut line)).await {
            Ok(len) => len?,
            Err(_) => return Ok(()),
        };
        if len == 0 {
            return Ok(());
        }
        let too_long = line.len() > CONTROL_LINE_BYTES_MAX;
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        let response = if too_long {
            Response::error(format!("request longer than {CONTROL_LINE_BYTES_MAX} bytes"))
        } else {
            match serde_json::from_slice::<Request>(text) {
                Ok(request) => execute(shared, request),
                Err(error) => Response::error(format!("bad request: {error}")),
            }
        };
        let mut answer = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        answer.push(b'\n');
        writer.write_all(&answer).await?;
        if too_long {
            return Ok(());
        }
    }
}

/// Do what a request asks.
fn execute(shared: &Shared, request: Request) -> Response {
    let done = match request {
        Request::Get => Ok(()),
        Request::Set { settings } => shared.set_settings(settings),
        Request::SetDirection { direction, settings } => shared.set_direction(direction, settings),
        Request::Partition { direction } => {
            shared.set_partitioned(direction, true);
            Ok(())
        }
        Request::Heal { direction } => {
            shared.set_partitioned(direction, false);
            Ok(())
        }
        Request::Stats => {
            return Response { ok: true, settings: None, stats: Some(shared.stats()), error: None };
        }
    };
    match done {
        Ok(()) => Response::settings(shared.settings()),
        Err(error) => Response::error(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let cases = [
            (r#"{"op":"get"}"#, Request::Get),
            (r#"{"op":"stats"}"#, Request::Stats),
            (r#"{"op":"heal"}"#, Request::Heal { direction: Ways::Both }),
            (r#"{"op":"heal","direction":"b_to_a"}"#, Request::Heal { direction: Ways::BToA }),
            (r#"{"op":"partition","direction":"a_to_b"}"#, Request::Partition { direction: Ways::AToB }),
        ];
        for (text, expected) in cases {
            let request: Request =
                serde_json::from_str(text).unwrap_or_else(|error| panic!("{text}: {error}"));
            assert_eq!(request, expected);
        }
        let set: Request =
            serde_json::from_str(r#"{"op":"set","settings":{"both":{"delay":"25ms","loss":{"model":"random","probability":"1%"}}}}"#)
                .expect("set parses");
        let Request::Set { settings } = set else { panic!("set expected") };
        assert_eq!(settings.b_to_a.delay, Duration::from_millis(25));
    }

    #[test]
    fn malformed_requests_are_refused() {
        for text in [
            r#"{"op":"dance"}"#,
            r#"{"op":"partition"}"#,
            r#"{"op":"partition","direction":"sideways"}"#,
            r#"{"op":"heal","direction":"both","extra":1}"#,
            r#"{"settings":{}}"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Request>(text).is_err(), "{text} should be refused");
        }
    }
}
