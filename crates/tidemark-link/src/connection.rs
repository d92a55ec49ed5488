//! An authenticated QUIC connection to one partner, and the framed streams opened on it.

use std::net::SocketAddr;
use std::time::Duration;

use quinn::VarInt;

use crate::{Fingerprint, FrameReader, FrameWriter, LinkError, Peer};

/// Application close code for an orderly close.
pub const CLOSE_CODE_NORMAL: u32 = 0;

/// A connection to a partner whose certificate fingerprint was checked during the handshake.
///
/// Cheap to clone; every clone is the same connection. The connection closes when
/// [`Connection::close`] is called or the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Connection {
    inner: quinn::Connection,
    peer: Peer,
}

/// Transport counters of one connection, since it was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionStats {
    /// UDP payload bytes sent, including QUIC headers and retransmissions.
    pub bytes_sent: u64,
    /// UDP payload bytes received.
    pub bytes_received: u64,
    /// Packets declared lost by loss detection.
    pub lost_packets: u64,
    /// The congestion controller's current window, in bytes.
    pub congestion_window_bytes: u64,
}

impl Connection {
    pub(crate) fn new(inner: quinn::Connection, peer: Peer) -> Connection {
        Connection { inner, peer }
    }

    /// The partner's certificate fingerprint, as checked during the handshake.
    pub fn peer(&self) -> Fingerprint {
        self.peer.fingerprint
    }

    /// The partner's fingerprint and the address the connection was made with.
    pub fn partner(&self) -> Peer {
        self.peer
    }

    /// The partner's current address (it can change if the partner's network path changes).
    pub fn remote_addr(&self) -> SocketAddr {
        self.inner.remote_address()
    }

    /// Opens a bidirectional framed stream. The partner's [`Connection::accept_stream`] sees it
    /// once the first frame is sent on it.
    ///
    /// Waits while the partner's limit on concurrent streams is reached
    /// (see [`crate::BIDI_STREAMS_MAX`]).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if cancelled, no stream was opened.
    pub async fn open_stream(&self) -> Result<(FrameWriter, FrameReader), LinkError> {
        let (send, recv) =
            self.inner.open_bi().await.map_err(|e| LinkError::from_connection(self.peer, e))?;
        Ok((FrameWriter::new(send, self.peer), FrameReader::new(recv, self.peer)))
    }

    /// Waits for the partner to open a bidirectional framed stream.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: if cancelled, no stream was taken from the connection.
    pub async fn accept_stream(&self) -> Result<(FrameWriter, FrameReader), LinkError> {
        let (send, recv) =
            self.inner.accept_bi().await.map_err(|e| LinkError::from_connection(self.peer, e))?;
        Ok((FrameWriter::new(send, self.peer), FrameReader::new(recv, self.peer)))
    }

    /// The current smoothed round-trip time estimate.
    pub fn rtt(&self) -> Duration {
        self.inner.rtt()
    }

    /// Closes the connection at once: unsent and unacknowledged data is abandoned, and the
    /// partner's pending operations fail with [`LinkError::ConnectionLost`] giving `reason`.
    /// Finish streams with [`FrameWriter::finish`] first for an orderly end.
    pub fn close(&self, reason: &str) {
        self.inner.close(VarInt::from_u32(CLOSE_CODE_NORMAL), reason.as_bytes());
    }

    /// Waits until the connection is closed, by either side or by a timeout, and says why.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn closed(&self) -> LinkError {
        let reason = self.inner.closed().await;
        LinkError::from_connection(self.peer, reason)
    }

    /// Transport counters since the connection was established.
    pub fn stats(&self) -> ConnectionStats {
        let stats = self.inner.stats();
        ConnectionStats {
            bytes_sent: stats.udp_tx.bytes,
            bytes_received: stats.udp_rx.bytes,
            lost_packets: stats.path.lost_packets,
            congestion_window_bytes: stats.path.cwnd,
        }
    }
}
