//! The QUIC endpoint: binds the UDP socket, accepts trusted partners and dials pinned ones.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::server::NoServerSessionStorage;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;

use crate::error::is_refused_by_peer;
use crate::identity::crypto_provider;
use crate::trust::{PinnedServerVerifier, TrustedClientVerifier};
use crate::{
    CongestionControl, Connection, Fingerprint, Identity, LinkError, LinkProfile, Peer, PinnedPeers,
    TrustStore, Windows,
};

/// The ALPN protocol both sides must offer: the link's wire version.
pub const ALPN: &[u8] = b"tidemark/1";
/// The TLS server name a client sends. It is never checked: the server is identified by its
/// pinned fingerprint, not by a name.
pub const SERVER_NAME: &str = "tidemark";
/// The message a server sends on its first unidirectional stream once it has accepted a client,
/// so the client knows it was not refused (in TLS 1.3 the client finishes its handshake before
/// the server has checked the client's certificate).
pub const CONFIRMATION: &[u8] = b"tidemark/1 accepted";
/// How long `connect` waits for the server's confirmation after the TLS handshake.
pub const CONFIRMATION_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle connection sends a keep-alive, so NAT and firewall state stays open and a
/// dead partner is noticed.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// A connection with no packets from the partner for this long is closed. It also bounds a
/// handshake with a partner that stopped answering.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bidirectional streams a partner may have open towards us at once.
pub const BIDI_STREAMS_MAX: u32 = 128;
/// Handshakes the server runs at once; more incoming connections are refused and counted.
pub const HANDSHAKES_INFLIGHT_MAX: usize = 64;
/// Established connections waiting for [`Link::accept`]; handshakes wait while it is full.
pub const ACCEPT_QUEUE_MAX: usize = 16;

/// A bound QUIC endpoint that accepts connections from trusted partners and dials pinned ones.
///
/// Must be created inside a tokio runtime. Dropping it stops accepting; existing connections
/// keep running until they are closed or dropped.
pub struct Link {
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    incoming: tokio::sync::Mutex<mpsc::Receiver<Connection>>,
    accept_task: JoinHandle<()>,
    windows: Windows,
    socket_buffers: SocketBuffers,
}

/// Counters of a link's incoming connections since it was bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkStats {
    /// Incoming connections that completed the handshake and were queued for `accept`.
    pub connections_accepted: u64,
    /// Handshakes refused because the client's certificate fingerprint is not trusted.
    pub refused_untrusted: u64,
    /// Handshakes that failed for another reason (protocol error, timeout, wrong ALPN, the
    /// client refusing our certificate, ...).
    pub refused_handshake_failed: u64,
    /// Incoming connections refused because [`HANDSHAKES_INFLIGHT_MAX`] handshakes were running.
    pub refused_overload: u64,
}

/// The UDP socket buffer sizes asked for and what the kernel granted.
///
/// Linux reports twice the size it was given (it counts its bookkeeping), and caps unprivileged
/// requests at `net.core.rmem_max` / `net.core.wmem_max`; the link retries with the
/// privileged `SO_RCVBUFFORCE` / `SO_SNDBUFFORCE`, which works for root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketBuffers {
    /// The size requested for each buffer, in bytes.
    pub requested_bytes: u64,
    /// `SO_RCVBUF` as the kernel reports it, in bytes.
    pub receive_bytes: u64,
    /// `SO_SNDBUF` as the kernel reports it, in bytes.
    pub send_bytes: u64,
}

impl Link {
    /// Binds a UDP endpoint on `addr` (port 0 picks a free port) that accepts connections from
    /// clients whose certificates `trust` trusts, and can dial partners.
    ///
    /// Flow-control windows and socket buffers are sized from `profile` (see
    /// [`LinkProfile::windows`]); congestion control is the profile's.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime.
    pub fn bind(
        addr: SocketAddr,
        identity: &Identity,
        trust: Arc<dyn TrustStore>,
        profile: LinkProfile,
    ) -> Result<Link, LinkError> {
        let windows = profile.windows();
        let (socket, socket_buffers) = bind_socket(addr, windows.socket_buffer_bytes)?;
        let shared = Arc::new(Shared {
            provider: crypto_provider(),
            certified_key: identity.certified_key(),
            trust,
            server_transport: Arc::new(transport_config(&windows, 0, profile.congestion)),
            // The client allows the server's one confirmation stream.
            client_transport: Arc::new(transport_config(&windows, 1, profile.congestion)),
            counters: Counters::default(),
        });
        // Every incoming connection gets its own configuration (see `handshake`); this default
        // trusts nobody, so anything that ever used it would fail closed.
        let (default_server_config, _) = shared.server_config(Arc::new(PinnedPeers::default()), addr)?;
        let endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(default_server_config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )
        .map_err(|source| LinkError::Bind { addr, operation: "start QUIC endpoint", source })?;
        let (sender, receiver) = mpsc::channel(ACCEPT_QUEUE_MAX);
        let accept_task = tokio::spawn(accept_loop(endpoint.clone(), Arc::clone(&shared), sender));
        let link = Link {
            endpoint,
            shared,
            incoming: tokio::sync::Mutex::new(receiver),
            accept_task,
            windows,
            socket_buffers,
        };
        tracing::info!(
            addr = %link.local_addr(),
            stream_window_bytes = windows.stream_receive_window_bytes,
            connection_window_bytes = windows.connection_receive_window_bytes,
            socket_receive_bytes = socket_buffers.receive_bytes,
            socket_send_bytes = socket_buffers.send_bytes,
            "replication link bound"
        );
        Ok(link)
    }

    /// The bound UDP address.
    pub fn local_addr(&self) -> SocketAddr {
        // The endpoint's socket is bound and ours alone; fall back to the unspecified address
        // only if the OS cannot report it.
        self.endpoint.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Dials the partner at `addr`. The handshake fails unless the server's certificate has
    /// exactly the fingerprint `expected`, and `connect` returns only once the server has also
    /// accepted our certificate.
    ///
    /// # Errors
    ///
    /// [`LinkError::FingerprintMismatch`] when the server presents another certificate,
    /// [`LinkError::RefusedByPeer`] when the server does not trust ours,
    /// [`LinkError::Handshake`] or [`LinkError::Unconfirmed`] otherwise; a partner that does
    /// not answer fails after [`IDLE_TIMEOUT`].
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a cancelled attempt's half-open connection is closed when dropped.
    pub async fn connect(&self, addr: SocketAddr, expected: Fingerprint) -> Result<Connection, LinkError> {
        let (config, verifier) = self.shared.client_config(expected)?;
        let connecting = self
            .endpoint
            .connect_with(config, addr, SERVER_NAME)
            .map_err(|source| LinkError::Connect { addr, source })?;
        let peer = Peer { fingerprint: expected, addr };
        let connection = match connecting.await {
            Ok(connection) => connection,
            Err(source) => {
                return Err(if let Some(actual) = verifier.mismatch() {
                    LinkError::FingerprintMismatch { addr, expected, actual }
                } else if is_refused_by_peer(&source) {
                    LinkError::RefusedByPeer { peer }
                } else {
                    LinkError::Handshake { addr, source }
                })
            }
        };
        // The verifier already checked this; checking the certificate the connection reports
        // keeps a verifier bug from ever becoming a trusted connection.
        match peer_fingerprint(&connection) {
            Some(actual) if actual == expected => {}
            actual => {
                connection.close(VarInt::from_u32(0), b"unexpected certificate");
                return Err(LinkError::FingerprintMismatch {
                    addr,
                    expected,
                    actual: actual.unwrap_or(Fingerprint([0; 32])),
                });
            }
        }
        await_confirmation(&connection, peer).await?;
        tracing::debug!(%peer, "connected to partner");
        Ok(Connection::new(connection, peer))
    }

    /// The next incoming connection from a trusted partner, or `None` once the link is closed.
    ///
    /// Untrusted clients are refused during the handshake and never returned: each refusal is
    /// logged (`tracing::warn!`, with the client's fingerprint and address) and counted in
    /// [`Link::stats`], and so are other failed handshakes.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe: a connection is removed from the queue only when it is returned.
    pub async fn accept(&self) -> Option<Connection> {
        self.incoming.lock().await.recv().await
    }

    /// Closes every connection at once and stops accepting; [`Link::accept`] then returns
    /// `None` and `connect` fails. Call [`Link::wait_idle`] afterwards to let the close reach
    /// the partners.
    pub fn close(&self) {
        self.endpoint.close(VarInt::from_u32(crate::CLOSE_CODE_NORMAL), b"link closed");
    }

    /// Waits until every connection is fully closed, so that partners were told.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait_idle(&self) {
        self.endpoint.wait_idle().await;
    }

    /// Counters of incoming connections: accepted, and refused by reason.
    pub fn stats(&self) -> LinkStats {
        let counters = &self.shared.counters;
        LinkStats {
            connections_accepted: counters.connections_accepted.load(Ordering::Relaxed),
            refused_untrusted: counters.refused_untrusted.load(Ordering::Relaxed),
            refused_handshake_failed: counters.refused_handshake_failed.load(Ordering::Relaxed),
            refused_overload: counters.refused_overload.load(Ordering::Relaxed),
        }
    }

    /// The flow-control windows in use, derived from the link profile.
    pub fn windows(&self) -> Windows {
        self.windows
    }

    /// The UDP socket buffer sizes requested and granted.
    pub fn socket_buffers(&self) -> SocketBuffers {
        self.socket_buffers
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // The accept loop holds a handle on the endpoint; without this it would keep the
        // socket bound after the link is gone.
        self.accept_task.abort();
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("local_addr", &self.local_addr())
            .field("windows", &self.windows)
            .field("socket_buffers", &self.socket_buffers)
            .finish_non_exhaustive()
    }
}

/// What the endpoint's tasks and `connect` share.
struct Shared {
    provider: Arc<CryptoProvider>,
    certified_key: Arc<CertifiedKey>,
    trust: Arc<dyn TrustStore>,
    server_transport: Arc<TransportConfig>,
    client_transport: Arc<TransportConfig>,
    counters: Counters,
}

#[derive(Default)]
struct Counters {
    connections_accepted: AtomicU64,
    refused_untrusted: AtomicU64,
    refused_handshake_failed: AtomicU64,
    refused_overload: AtomicU64,
}

impl Shared {
    /// A server configuration for one incoming connection from `remote`: TLS 1.3 only, client
    /// certificate required and checked against `trust`, no session resumption (a resumed
    /// session would skip the check, so a partner removed from trust could come back).
    fn server_config(
        &self,
        trust: Arc<dyn TrustStore>,
        remote: SocketAddr,
    ) -> Result<(quinn::ServerConfig, Arc<TrustedClientVerifier>), LinkError> {
        let verifier = Arc::new(TrustedClientVerifier::new(
            trust,
            self.provider.signature_verification_algorithms,
            remote,
        ));
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_config_error)?
            .with_client_cert_verifier(verifier.clone())
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::clone(&self.certified_key))));
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.session_storage = Arc::new(NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        tls.max_early_data_size = 0;
        let quic = QuicServerConfig::try_from(tls).map_err(tls_config_error)?;
        let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
        config.transport_config(Arc::clone(&self.server_transport));
        Ok((config, verifier))
    }

    /// A client configuration for one outgoing connection: TLS 1.3 only, our certificate
    /// offered, the server's certificate pinned to `expected`, no resumption or early data.
    fn client_config(
        &self,
        expected: Fingerprint,
    ) -> Result<(quinn::ClientConfig, Arc<PinnedServerVerifier>), LinkError> {
        let verifier =
            Arc::new(PinnedServerVerifier::new(expected, self.provider.signature_verification_algorithms));
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls_config_error)?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_client_cert_resolver(Arc::new(SingleCertAndKey::from(Arc::clone(&self.certified_key))));
        tls.alpn_protocols = vec![ALPN.to_vec()];
        tls.resumption = Resumption::disabled();
        tls.enable_early_data = false;
        let quic = QuicClientConfig::try_from(tls).map_err(tls_config_error)?;
        let mut config = quinn::ClientConfig::new(Arc::new(quic));
        config.transport_config(Arc::clone(&self.client_transport));
        Ok((config, verifier))
    }
}

fn tls_config_error(error: impl std::fmt::Display) -> LinkError {
    LinkError::TlsConfig { reason: error.to_string() }
}

/// Transport parameters for the link: windows and congestion control from the profile, keep-alives, and
/// `uni_streams` unidirectional streams allowed from the peer.
fn transport_config(windows: &Windows, uni_streams: u32, congestion: CongestionControl) -> TransportConfig {
    let varint = |bytes: u64| VarInt::from_u64(bytes).unwrap_or(VarInt::MAX);
    let mut transport = TransportConfig::default();
    transport
        .stream_receive_window(varint(windows.stream_receive_window_bytes))
        .receive_window(varint(windows.connection_receive_window_bytes))
        .send_window(windows.send_window_bytes)
        .max_concurrent_bidi_streams(VarInt::from_u32(BIDI_STREAMS_MAX))
        .max_concurrent_uni_streams(VarInt::from_u32(uni_streams))
        .keep_alive_interval(Some(KEEP_ALIVE_INTERVAL))
        .max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
            u32::try_from(IDLE_TIMEOUT.as_millis()).unwrap_or(u32::MAX),
        ))))
        .datagram_receive_buffer_size(None);
    match congestion {
        CongestionControl::Bbr => {
            transport.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()))
        }
        CongestionControl::Cubic => {
            transport.congestion_controller_factory(Arc::new(quinn::congestion::CubicConfig::default()))
        }
    };
    transport
}

/// Creates the UDP socket with enlarged buffers and binds it.
fn bind_socket(
    addr: SocketAddr,
    buffer_bytes: u64,
) -> Result<(std::net::UdpSocket, SocketBuffers), LinkError> {
    let bind_error = |operation| move |source| LinkError::Bind { addr, operation, source };
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))
        .map_err(bind_error("create socket"))?;
    let requested = usize::try_from(buffer_bytes).unwrap_or(usize::MAX);
    // The kernel silently caps these at net.core.{r,w}mem_max; the forced variants lift the cap
    // for a privileged process and fail harmlessly for others.
    socket.set_recv_buffer_size(requested).map_err(bind_error("set SO_RCVBUF"))?;
    if socket.recv_buffer_size().unwrap_or(0) < requested {
        if let Err(e) = rustix::net::sockopt::set_socket_recv_buffer_size_force(&socket, requested) {
            tracing::debug!(error = %e, "SO_RCVBUFFORCE not permitted");
        }
    }
    socket.set_send_buffer_size(requested).map_err(bind_error("set SO_SNDBUF"))?;
    if socket.send_buffer_size().unwrap_or(0) < requested {
        if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size_force(&socket, requested) {
            tracing::debug!(error = %e, "SO_SNDBUFFORCE not permitted");
        }
    }
    socket.bind(&addr.into()).map_err(bind_error("bind"))?;
    socket.set_nonblocking(true).map_err(bind_error("set non-blocking"))?;
    let receive = socket.recv_buffer_size().map_err(bind_error("read SO_RCVBUF"))?;
    let send = socket.send_buffer_size().map_err(bind_error("read SO_SNDBUF"))?;
    if receive < requested || send < requested {
        tracing::warn!(
            %addr,
            requested_bytes = requested,
            receive_bytes = receive,
            send_bytes = send,
            "UDP socket buffers are smaller than the link needs; raise net.core.rmem_max and \
             net.core.wmem_max, or run as root"
        );
    }
    Ok((
        socket.into(),
        SocketBuffers {
            requested_bytes: buffer_bytes,
            receive_bytes: receive as u64,
            send_bytes: send as u64,
        },
    ))
}

/// Takes incoming connections off the endpoint and runs their handshakes concurrently, at most
/// [`HANDSHAKES_INFLIGHT_MAX`] at a time.
async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>, sender: mpsc::Sender<Connection>) {
    let handshakes = Arc::new(Semaphore::new(HANDSHAKES_INFLIGHT_MAX));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = Arc::clone(&handshakes).try_acquire_owned() else {
            tracing::warn!(
                remote = %incoming.remote_address(),
                limit = HANDSHAKES_INFLIGHT_MAX,
                "refused a connection: too many handshakes in progress"
            );
            shared.counters.refused_overload.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        };
        let shared = Arc::clone(&shared);
        let sender = sender.clone();
        tokio::spawn(async move {
            handshake(incoming, &shared, sender).await;
            drop(permit);
        });
    }
}

/// Runs one incoming handshake to completion: the TLS handshake with the per-connection trust
/// check, the ALPN check, and the confirmation; then queues the connection for `accept`.
async fn handshake(incoming: quinn::Incoming, shared: &Shared, sender: mpsc::Sender<Connection>) {
    let remote = incoming.remote_address();
    let failed = |reason: &dyn std::fmt::Display| {
        tracing::warn!(%remote, %reason, "partner handshake failed");
        shared.counters.refused_handshake_failed.fetch_add(1, Ordering::Relaxed);
    };
    let (config, verifier) = match shared.server_config(Arc::clone(&shared.trust), remote) {
        Ok(config) => config,
        Err(e) => {
            incoming.refuse();
            return failed(&e);
        }
    };
    let connecting = match incoming.accept_with(Arc::new(config)) {
        Ok(connecting) => connecting,
        Err(e) => return failed(&e),
    };
    let connection = match connecting.await {
        Ok(connection) => connection,
        Err(e) => {
            if let Some(fingerprint) = verifier.refused() {
                tracing::warn!(
                    %remote,
                    %fingerprint,
                    "refused a connection: the certificate fingerprint is not a trusted partner"
                );
                shared.counters.refused_untrusted.fetch_add(1, Ordering::Relaxed);
                return;
            }
            return failed(&e);
        }
    };
    let Some(fingerprint) = peer_fingerprint(&connection) else {
        connection.close(VarInt::from_u32(0), b"no client certificate");
        return failed(&"no client certificate after the handshake");
    };
    let protocol = connection
        .handshake_data()
        .and_then(|data| data.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|data| data.protocol);
    if protocol.as_deref() != Some(ALPN) {
        connection.close(VarInt::from_u32(0), b"ALPN tidemark/1 required");
        return failed(&"the client did not negotiate ALPN tidemark/1");
    }
    let peer = Peer { fingerprint, addr: remote };
    if let Err(e) = send_confirmation(&connection).await {
        return failed(&format_args!("sending the confirmation to {peer}: {e}"));
    }
    shared.counters.connections_accepted.fetch_add(1, Ordering::Relaxed);
    tracing::info!(%peer, "accepted partner connection");
    if sender.send(Connection::new(connection, peer)).await.is_err() {
        // The link was dropped while this handshake ran; dropping the connection closes it.
        tracing::debug!(%peer, "link gone before the connection was accepted");
    }
}

/// The SHA-256 fingerprint of the end-entity certificate the peer presented.
fn peer_fingerprint(connection: &quinn::Connection) -> Option<Fingerprint> {
    let identity = connection.peer_identity()?;
    let chain = identity.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>().ok()?;
    chain.first().map(|certificate| Fingerprint::of_certificate(certificate.as_ref()))
}

async fn send_confirmation(connection: &quinn::Connection) -> Result<(), quinn::WriteError> {
    let mut stream = connection.open_uni().await?;
    stream.write_all(CONFIRMATION).await?;
    // The stream ends with the message; its delivery needs no wait here.
    let _ = stream.finish();
    Ok(())
}

async fn await_confirmation(connection: &quinn::Connection, peer: Peer) -> Result<(), LinkError> {
    let unconfirmed = |reason: String| LinkError::Unconfirmed { peer, timeout: CONFIRMATION_TIMEOUT, reason };
    let received = tokio::time::timeout(CONFIRMATION_TIMEOUT, async {
        let mut stream = connection.accept_uni().await.map_err(|e| LinkError::from_connection(peer, e))?;
        let stream_id = stream.id().index();
        stream.read_to_end(CONFIRMATION.len()).await.map_err(|e| match e {
            quinn::ReadToEndError::Read(e) => LinkError::from_read(peer, stream_id, e),
            quinn::ReadToEndError::TooLong => unconfirmed("the confirmation message is too long".into()),
        })
    })
    .await;
    match received {
        Ok(Ok(message)) if message == CONFIRMATION => Ok(()),
        Ok(Ok(message)) => {
            connection.close(VarInt::from_u32(0), b"bad confirmation");
            Err(unconfirmed(format!(
                "unexpected confirmation message {:?}",
                String::from_utf8_lossy(&message)
            )))
        }
        Ok(Err(e)) => Err(e),
        Err(_elapsed) => {
            connection.close(VarInt::from_u32(0), b"no confirmation");
            Err(unconfirmed("no confirmation arrived".into()))
        }
    }
}
