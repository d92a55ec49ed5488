//! Tidemark's replication transport: the site's identity, trust in pinned partners, QUIC
//! endpoints and connections, and length-prefixed frames on streams.
//!
//! This crate is the thin I/O shell around the replication protocol, which lives elsewhere and
//! does no I/O. It knows nothing of journals, batches or acks: it moves frames of bytes between
//! two sites that have pinned each other's certificates.
//!
//! - **Identity** ([`Identity`]): each site has an ECDSA P-256 key and a self-signed certificate,
//!   created on first start and kept in `site.key` / `site.crt` (PEM).
//! - **Trust** ([`TrustStore`], [`PinnedPeers`]): partners are pinned by the SHA-256 fingerprint
//!   of their certificate ([`Fingerprint`]), like SSH known hosts. There is no certificate
//!   authority, no chain validation and no plaintext mode.
//! - **Transport** ([`Link`], [`Connection`]): QUIC (quinn) over rustls with the ring provider,
//!   TLS 1.3 only, mutual authentication, ALPN `tidemark/1`. A client pins the server's exact
//!   fingerprint; a server accepts only clients its trust store trusts, refusing others during
//!   the handshake with the TLS `access_denied` alert. After accepting a client, the server sends
//!   [`CONFIRMATION`] on a unidirectional stream, so that `connect` returns only when the server
//!   accepted us (in TLS 1.3 the client finishes before the server has checked it).
//!   Flow-control windows and UDP socket buffers are sized from the link's bandwidth-delay
//!   product ([`LinkProfile`]); congestion control is BBR by default, or Cubic ([`CongestionControl`]).
//! - **Frames** ([`FrameWriter`], [`FrameReader`]): a u32 big-endian length, then that many
//!   bytes, at most [`FRAME_BYTES_MAX`].

mod connection;
mod error;
mod fingerprint;
mod frame;
mod identity;
mod link;
mod profile;
mod trust;

pub use connection::{Connection, ConnectionStats, CLOSE_CODE_NORMAL};
pub use error::{LinkError, Peer};
pub use fingerprint::{Fingerprint, FingerprintParseError};
pub use frame::{
    FrameReader, FrameWriter, FRAME_BYTES_MAX, FRAME_PREALLOCATION_BYTES_MAX, STREAM_STOP_CODE_PROTOCOL,
};
pub use identity::{Identity, CERTIFICATE_FILE_NAME, KEY_FILE_MODE, KEY_FILE_NAME};
pub use link::{
    Link, LinkStats, SocketBuffers, ACCEPT_QUEUE_MAX, ALPN, BIDI_STREAMS_MAX, CONFIRMATION,
    CONFIRMATION_TIMEOUT, HANDSHAKES_INFLIGHT_MAX, IDLE_TIMEOUT, KEEP_ALIVE_INTERVAL, SERVER_NAME,
};
pub use profile::{
    CongestionControl, LinkProfile, Windows, CONNECTION_WINDOW_BYTES_MAX, CONNECTION_WINDOW_STREAMS,
    SOCKET_BUFFER_BYTES_MAX, SOCKET_BUFFER_BYTES_MIN, STREAM_WINDOW_BYTES_MAX, STREAM_WINDOW_BYTES_MIN,
    WINDOW_HEADROOM_FACTOR,
};
pub use trust::{PinnedPeers, TrustStore};
