//! The crate's error type, and the partner label every connection-level error carries.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::Fingerprint;

/// Who a connection-level error is about: the partner's fingerprint and the address it was
/// reached at when the connection was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The partner's certificate fingerprint.
    pub fingerprint: Fingerprint,
    /// The partner's UDP address when the connection was established.
    pub addr: SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "partner {} at {}", self.fingerprint, self.addr)
    }
}

/// Everything that can fail in the link: identity files, TLS setup, sockets, handshakes, streams
/// and frames.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Reading, writing or syncing an identity file or its directory failed.
    #[error("identity file {path}: {operation} failed: {source}")]
    IdentityIo {
        /// The file or directory.
        path: PathBuf,
        /// What was being done ("read", "write", "rename", ...).
        operation: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
    /// An identity file exists but cannot be used. It is never replaced automatically, because a
    /// new identity has a new fingerprint that every partner would have to pin again.
    #[error(
        "identity file {path} is corrupt: {reason}; it is never replaced automatically: restore \
         it from a backup, or delete both site.crt and site.key to create a new identity (every \
         partner must then pin the new fingerprint)"
    )]
    IdentityCorrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// Exactly one of the identity's two files exists.
    #[error(
        "identity is incomplete: {present} exists but {missing} does not; restore {missing} from \
         a backup, or delete {present} to create a new identity (every partner must then pin the \
         new fingerprint)"
    )]
    IdentityIncomplete {
        /// The file that exists.
        present: PathBuf,
        /// The file that is missing.
        missing: PathBuf,
    },
    /// Generating the site's key or self-signed certificate failed.
    #[error("creating the certificate for site {site_name:?}: {source}")]
    CertificateGeneration {
        /// The site name that was to be the certificate's subject alternative name.
        site_name: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// Building the TLS or QUIC configuration failed (a bug or an unusable identity).
    #[error("building the TLS configuration: {reason}")]
    TlsConfig {
        /// What failed.
        reason: String,
    },
    /// Creating, configuring or binding the UDP socket failed.
    #[error("UDP socket {addr}: {operation} failed: {source}")]
    Bind {
        /// The local address to bind.
        addr: SocketAddr,
        /// What was being done ("create", "bind", ...).
        operation: &'static str,
        /// The operating system's error.
        source: io::Error,
    },
    /// A connection to a partner could not even be started (for example the link is closed, or
    /// the address family does not match the local socket).
    #[error("connecting to {addr}: {source}")]
    Connect {
        /// The partner address dialled.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectError,
    },
    /// The server presented a certificate other than the pinned one; the handshake was aborted.
    #[error(
        "partner at {addr} presented certificate {actual}, but {expected} is pinned: connection \
         refused; if the partner's identity was replaced on purpose, pin its new fingerprint"
    )]
    FingerprintMismatch {
        /// The partner address dialled.
        addr: SocketAddr,
        /// The pinned fingerprint.
        expected: Fingerprint,
        /// The fingerprint of the certificate the server presented.
        actual: Fingerprint,
    },
    /// The partner refused this site's certificate: it does not trust our fingerprint.
    #[error(
        "{peer} refused this site's certificate: add this site's fingerprint to that site's \
         partners"
    )]
    RefusedByPeer {
        /// The partner that refused us.
        peer: Peer,
    },
    /// The handshake with a partner failed for another reason (timeout, protocol error, no
    /// common ALPN protocol, ...).
    #[error("handshake with {addr} failed: {source}")]
    Handshake {
        /// The partner address.
        addr: SocketAddr,
        /// quinn's reason.
        source: quinn::ConnectionError,
    },
    /// The partner completed the TLS handshake but did not confirm the connection in time, or
    /// confirmed it with something other than the link's confirmation message.
    #[error("{peer} did not confirm the connection within {timeout:?}: {reason}")]
    Unconfirmed {
        /// The partner.
        peer: Peer,
        /// How long we waited.
        timeout: Duration,
        /// What went wrong.
        reason: String,
    },
    /// The connection to a partner was closed or lost.
    #[error("connection to {peer} lost: {source}")]
    ConnectionLost {
        /// The partner.
        peer: Peer,
        /// quinn's reason (closed locally, closed by the partner, timed out, reset, ...).
        source: quinn::ConnectionError,
    },
    /// The partner reset a stream we were reading, or stopped one we were writing.
    #[error("stream {stream} with {peer} was {action} by the partner with code {code}")]
    StreamAborted {
        /// The partner.
        peer: Peer,
        /// The QUIC stream id.
        stream: u64,
        /// "reset" (their sending side) or "stopped" (our sending side).
        action: &'static str,
        /// The application error code the partner gave.
        code: u64,
    },
    /// A stream was used after it was already closed locally.
    #[error("stream {stream} with {peer} is already closed")]
    StreamClosed {
        /// The partner.
        peer: Peer,
        /// The QUIC stream id.
        stream: u64,
    },
    /// The partner announced a frame longer than the limit; the stream was stopped and nothing
    /// of that length was allocated.
    #[error(
        "{peer} announced a frame of {claimed_bytes} bytes on stream {stream}, over the limit of \
         {limit_bytes} bytes: stream stopped"
    )]
    FrameTooLarge {
        /// The partner.
        peer: Peer,
        /// The QUIC stream id.
        stream: u64,
        /// The length in the frame's header.
        claimed_bytes: u64,
        /// The reader's limit.
        limit_bytes: u64,
    },
    /// We were asked to send a frame longer than the partner would accept.
    #[error(
        "refusing to send a frame of {frame_bytes} bytes to {peer} on stream {stream}: the limit \
         is {limit_bytes} bytes"
    )]
    FrameTooLargeToSend {
        /// The partner.
        peer: Peer,
        /// The QUIC stream id.
        stream: u64,
        /// The frame's length.
        frame_bytes: u64,
        /// The limit.
        limit_bytes: u64,
    },
    /// The stream ended in the middle of a frame.
    #[error(
        "stream {stream} from {peer} ended inside a frame: {received_bytes} of {expected_bytes} \
         bytes received"
    )]
    FrameTruncated {
        /// The partner.
        peer: Peer,
        /// The QUIC stream id.
        stream: u64,
        /// How many bytes of the header or body arrived.
        received_bytes: u64,
        /// How many the header (4 bytes) or body should have had.
        expected_bytes: u64,
    },
    /// An earlier `send` on this stream was cancelled part-way through a frame, so the stream
    /// now holds a partial frame and can carry nothing more.
    #[error(
        "stream {stream} to {peer} is unusable: an earlier send was cancelled inside a frame; \
         open a new stream"
    )]
    WriterPoisoned {
        /// The partner.
        peer: Peer,
        /// The QUIC stream id.
        stream: u64,
    },
}

impl LinkError {
    /// Maps a connection-level failure: a partner that closed the connection with the TLS
    /// `access_denied` alert refused our certificate, anything else is a lost connection.
    pub(crate) fn from_connection(peer: Peer, source: quinn::ConnectionError) -> LinkError {
        if is_refused_by_peer(&source) {
            LinkError::RefusedByPeer { peer }
        } else {
            LinkError::ConnectionLost { peer, source }
        }
    }

    pub(crate) fn from_read(peer: Peer, stream: u64, source: quinn::ReadError) -> LinkError {
        match source {
            quinn::ReadError::Reset(code) => {
                LinkError::StreamAborted { peer, stream, action: "reset", code: code.into_inner() }
            }
            quinn::ReadError::ConnectionLost(e) => LinkError::from_connection(peer, e),
            // 0-RTT is never enabled and reads are always ordered, so what is left is a stream
            // that was already stopped locally.
            quinn::ReadError::ClosedStream
            | quinn::ReadError::IllegalOrderedRead
            | quinn::ReadError::ZeroRttRejected => LinkError::StreamClosed { peer, stream },
        }
    }

    pub(crate) fn from_write(peer: Peer, stream: u64, source: quinn::WriteError) -> LinkError {
        match source {
            quinn::WriteError::Stopped(code) => {
                LinkError::StreamAborted { peer, stream, action: "stopped", code: code.into_inner() }
            }
            quinn::WriteError::ConnectionLost(e) => LinkError::from_connection(peer, e),
            quinn::WriteError::ClosedStream | quinn::WriteError::ZeroRttRejected => {
                LinkError::StreamClosed { peer, stream }
            }
        }
    }
}

/// The QUIC error code for a TLS alert is 0x100 plus the alert's number.
pub(crate) fn access_denied_code() -> quinn::TransportErrorCode {
    quinn::TransportErrorCode::crypto(u8::from(rustls::AlertDescription::AccessDenied))
}

/// True when the partner closed the connection with `access_denied`, which is what our own
/// verifiers send for an untrusted certificate.
pub(crate) fn is_refused_by_peer(error: &quinn::ConnectionError) -> bool {
    matches!(error, quinn::ConnectionError::ConnectionClosed(close)
        if close.error_code == access_denied_code())
}
