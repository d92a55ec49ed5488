//! Trust: which certificate fingerprints may connect, and the TLS verifiers that enforce the pins.
//!
//! There is no certificate chain validation and no validity-date check: each site's certificate
//! is self-signed, and the pinned SHA-256 fingerprint is the whole of the trust, as with SSH known
//! hosts. The handshake signatures are still verified with the crypto provider's algorithms, so
//! a peer must hold the private key of the pinned certificate.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::Fingerprint;

/// Decides which partners may connect to this site: consulted for every incoming handshake, so
/// changes take effect for the next connection. Existing connections are not re-checked.
pub trait TrustStore: Send + Sync {
    /// True when a client presenting a certificate with this fingerprint may connect.
    fn trusts(&self, fingerprint: &Fingerprint) -> bool;
}

/// A [`TrustStore`] holding a set of pinned fingerprints, changeable at run time.
#[derive(Debug, Default)]
pub struct PinnedPeers(RwLock<HashSet<Fingerprint>>);

impl PinnedPeers {
    /// A store that trusts exactly these fingerprints.
    pub fn new(fingerprints: impl IntoIterator<Item = Fingerprint>) -> PinnedPeers {
        PinnedPeers(RwLock::new(fingerprints.into_iter().collect()))
    }

    /// Trusts `fingerprint` from the next handshake on. Returns false if it was already trusted.
    pub fn add(&self, fingerprint: Fingerprint) -> bool {
        self.0.write().insert(fingerprint)
    }

    /// Stops trusting `fingerprint` for new connections. Returns false if it was not trusted.
    pub fn remove(&self, fingerprint: &Fingerprint) -> bool {
        self.0.write().remove(fingerprint)
    }

    /// The trusted fingerprints, sorted.
    pub fn fingerprints(&self) -> Vec<Fingerprint> {
        let mut all: Vec<Fingerprint> = self.0.read().iter().copied().collect();
        all.sort();
        all
    }
}

impl TrustStore for PinnedPeers {
    fn trusts(&self, fingerprint: &Fingerprint) -> bool {
        self.0.read().contains(fingerprint)
    }
}

/// The server side's check of one incoming handshake: the client's certificate must have a
/// trusted fingerprint. One instance per incoming connection, so a refusal can be told apart from
/// other handshake failures and reported with the client's address.
pub(crate) struct TrustedClientVerifier {
    trust: Arc<dyn TrustStore>,
    algorithms: WebPkiSupportedAlgorithms,
    remote: SocketAddr,
    /// Set when this verifier refused the client's certificate.
    refused: OnceLock<Fingerprint>,
}

impl TrustedClientVerifier {
    pub(crate) fn new(
        trust: Arc<dyn TrustStore>,
        algorithms: WebPkiSupportedAlgorithms,
        remote: SocketAddr,
    ) -> TrustedClientVerifier {
        TrustedClientVerifier { trust, algorithms, remote, refused: OnceLock::new() }
    }

    /// The fingerprint this verifier refused, if it refused one.
    pub(crate) fn refused(&self) -> Option<Fingerprint> {
        self.refused.get().copied()
    }
}

impl fmt::Debug for TrustedClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TrustedClientVerifier").field("remote", &self.remote).finish_non_exhaustive()
    }
}

impl ClientCertVerifier for TrustedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let fingerprint = Fingerprint::of_certificate(end_entity.as_ref());
        if self.trust.trusts(&fingerprint) {
            Ok(ClientCertVerified::assertion())
        } else {
            // Logged and counted by the accept loop, which knows how the handshake ended.
            let _ = self.refused.set(fingerprint);
            // Sent to the client as the `access_denied` alert, which it reports as a refusal.
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The client side's check of one outgoing handshake: the server's certificate must have exactly
/// the pinned fingerprint. The server name is not checked; the pin is stronger.
pub(crate) struct PinnedServerVerifier {
    expected: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
    /// Set when the server presented another certificate.
    mismatch: OnceLock<Fingerprint>,
}

impl PinnedServerVerifier {
    pub(crate) fn new(expected: Fingerprint, algorithms: WebPkiSupportedAlgorithms) -> PinnedServerVerifier {
        PinnedServerVerifier { expected, algorithms, mismatch: OnceLock::new() }
    }

    /// The fingerprint the server presented instead of the expected one, if it did.
    pub(crate) fn mismatch(&self) -> Option<Fingerprint> {
        self.mismatch.get().copied()
    }
}

impl fmt::Debug for PinnedServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedServerVerifier").field("expected", &self.expected).finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let actual = Fingerprint::of_certificate(end_entity.as_ref());
        if actual == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            let _ = self.mismatch.set(actual);
            Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Both configurations allow only TLS 1.3, so rustls never calls the TLS 1.2 hooks; refuse
/// rather than trust if it ever did.
fn tls12_refused() -> rustls::Error {
    rustls::Error::General("TLS 1.2 is not allowed on the replication link".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinned_peers_add_remove() {
        let a = Fingerprint([1; 32]);
        let b = Fingerprint([2; 32]);
        let pins = PinnedPeers::new([a]);
        assert!(pins.trusts(&a));
        assert!(!pins.trusts(&b));
        assert!(pins.add(b));
        assert!(!pins.add(b), "already trusted");
        assert!(pins.trusts(&b));
        assert_eq!(pins.fingerprints(), vec![a, b]);
        assert!(pins.remove(&a));
        assert!(!pins.remove(&a), "no longer trusted");
        assert!(!pins.trusts(&a));
        assert_eq!(pins.fingerprints(), vec![b]);
    }
}
