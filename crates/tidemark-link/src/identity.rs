//! The site's identity: its private key and self-signed certificate, created once and kept.
//!
//! Files, both PEM so that `openssl` reads them as they are:
//!
//! - `site.key`: the ECDSA P-256 private key, PKCS#8 (`-----BEGIN PRIVATE KEY-----`), mode 0600.
//! - `site.crt`: the self-signed certificate (`-----BEGIN CERTIFICATE-----`), subject alternative
//!   name and common name = the site name, valid from 1975 to 4096. Validity dates are never
//!   checked by the link: the pinned fingerprint is the trust.
//!
//! Both are written to temporary files, synced, renamed into place and the directory synced.
//! An existing file that cannot be used is an error and is never replaced, because a new identity
//! has a new fingerprint that every partner would have to pin again.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

use crate::{Fingerprint, LinkError};

/// The certificate's file name inside the identity directory.
pub const CERTIFICATE_FILE_NAME: &str = "site.crt";
/// The private key's file name inside the identity directory.
pub const KEY_FILE_NAME: &str = "site.key";
/// The key file's permissions: readable and writable by the owner only.
pub const KEY_FILE_MODE: u32 = 0o600;

/// A site's certificate and private key, checked to belong together.
#[derive(Clone)]
pub struct Identity {
    certificate_der: CertificateDer<'static>,
    /// The parsed key with its certificate, shared by every TLS configuration of the link.
    certified: Arc<CertifiedKey>,
    fingerprint: Fingerprint,
}

impl Identity {
    /// Loads `dir/site.crt` and `dir/site.key`, or creates them when neither exists (`dir` too).
    ///
    /// A new identity is an ECDSA P-256 key and a self-signed certificate whose subject
    /// alternative name is `site_name`. When loading, `site_name` is not compared with the
    /// certificate: renaming a site does not change its identity.
    ///
    /// # Errors
    ///
    /// [`LinkError::IdentityCorrupt`] when a file cannot be parsed or the key does not belong to
    /// the certificate, [`LinkError::IdentityIncomplete`] when only one of the files exists,
    /// [`LinkError::IdentityIo`] on I/O errors. Nothing existing is overwritten in any case.
    pub fn load_or_create(dir: &Path, site_name: &str) -> Result<Identity, LinkError> {
        let certificate_path = dir.join(CERTIFICATE_FILE_NAME);
        let key_path = dir.join(KEY_FILE_NAME);
        let certificate = read_if_exists(&certificate_path)?;
        let key = read_if_exists(&key_path)?;
        match (certificate, key) {
            (Some(certificate), Some(key)) => {
                warn_if_key_readable_by_others(&key_path);
                Identity::from_pem(&certificate_path, &certificate, &key_path, &key)
            }
            (None, None) => Identity::create(dir, site_name),
            (Some(_), None) => {
                Err(LinkError::IdentityIncomplete { present: certificate_path, missing: key_path })
            }
            (None, Some(_)) => {
                Err(LinkError::IdentityIncomplete { present: key_path, missing: certificate_path })
            }
        }
    }

    /// The SHA-256 fingerprint of this site's certificate: what partners pin.
    pub fn fingerprint(&self) -> Fingerprint {
        self.fingerprint
    }

    /// The certificate's DER encoding.
    pub fn certificate_der(&self) -> &[u8] {
        self.certificate_der.as_ref()
    }

    /// The certificate and signing key, in the form rustls' certificate resolvers take.
    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }

    fn create(dir: &Path, site_name: &str) -> Result<Identity, LinkError> {
        let generation_error =
            |source| LinkError::CertificateGeneration { site_name: site_name.to_owned(), source };
        let key_pair =
            rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(generation_error)?;
        let mut params =
            rcgen::CertificateParams::new(vec![site_name.to_owned()]).map_err(generation_error)?;
        params.distinguished_name.push(rcgen::DnType::CommonName, site_name);
        let certificate = params.self_signed(&key_pair).map_err(generation_error)?;
        let certificate_pem = certificate.pem();
        let key_pem = key_pair.serialize_pem();

        fs::create_dir_all(dir).map_err(|source| LinkError::IdentityIo {
            path: dir.to_owned(),
            operation: "create directory",
            source,
        })?;
        // The key goes first: a crash between the two renames leaves a key without a
        // certificate, which the next start reports instead of silently creating another key.
        let key_path = dir.join(KEY_FILE_NAME);
        let certificate_path = dir.join(CERTIFICATE_FILE_NAME);
        write_atomically(&key_path, key_pem.as_bytes(), KEY_FILE_MODE)?;
        write_atomically(&certificate_path, certificate_pem.as_bytes(), 0o644)?;
        sync_directory(dir)?;

        let identity =
            Identity::from_pem(&certificate_path, certificate_pem.as_bytes(), &key_path, key_pem.as_bytes())?;
        tracing::info!(
            site = site_name,
            fingerprint = %identity.fingerprint,
            dir = %dir.display(),
            "created the site identity"
        );
        Ok(identity)
    }

    fn from_pem(
        certificate_path: &Path,
        certificate_pem: &[u8],
        key_path: &Path,
        key_pem: &[u8],
    ) -> Result<Identity, LinkError> {
        let corrupt =
            |path: &Path, reason: String| LinkError::IdentityCorrupt { path: path.to_owned(), reason };
        let certificate_der = CertificateDer::from_pem_slice(certificate_pem)
            .map_err(|e| corrupt(certificate_path, format!("no PEM certificate: {e}")))?;
        let key_der = PrivateKeyDer::from_pem_slice(key_pem)
            .map_err(|e| corrupt(key_path, format!("no PEM private key: {e}")))?;
        let provider = crypto_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key_der)
            .map_err(|e| corrupt(key_path, format!("unusable private key: {e}")))?;
        let certified = CertifiedKey::new(vec![certificate_der.clone()], signing_key);
        certified.keys_match().map_err(|e| {
            corrupt(key_path, format!("the key does not belong to {}: {e}", certificate_path.display()))
        })?;
        let fingerprint = Fingerprint::of_certificate(certificate_der.as_ref());
        Ok(Identity { certificate_der, certified: Arc::new(certified), fingerprint })
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the key.
        f.debug_struct("Identity").field("fingerprint", &self.fingerprint).finish_non_exhaustive()
    }
}

/// The one crypto provider the link uses, chosen explicitly rather than taken from a
/// process-wide default: ring.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>, LinkError> {
    match fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LinkError::IdentityIo { path: path.to_owned(), operation: "read", source }),
    }
}

fn warn_if_key_readable_by_others(key_path: &Path) {
    if let Ok(metadata) = fs::metadata(key_path) {
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            tracing::warn!(
                path = %key_path.display(),
                mode = format_args!("{mode:o}"),
                "the site's private key is readable by other users; run chmod 600 on it"
            );
        }
    }
}

/// Writes `bytes` to `path` through a temporary file in the same directory: created with
/// `mode`, written, synced, then renamed over `path`. The caller syncs the directory.
fn write_atomically(path: &Path, bytes: &[u8], mode: u32) -> Result<(), LinkError> {
    let temporary = temporary_path(path);
    let io_error = |path: &Path, operation| {
        let path = path.to_owned();
        move |source| LinkError::IdentityIo { path, operation, source }
    };
    // A temporary file left by a crash holds nothing anyone relies on.
    match fs::remove_file(&temporary) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(io_error(&temporary, "remove stale temporary file")(source)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temporary)
        .map_err(io_error(&temporary, "create"))?;
    // The mode given at creation is reduced by the umask; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_error(&temporary, "set permissions"))?;
    file.write_all(bytes).map_err(io_error(&temporary, "write"))?;
    file.sync_all().map_err(io_error(&temporary, "fsync"))?;
    drop(file);
    fs::rename(&temporary, path).map_err(io_error(path, "rename into place"))?;
    Ok(())
}

fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_owned();
    name.push(".tmp");
    path.with_file_name(name)
}

fn sync_directory(dir: &Path) -> Result<(), LinkError> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(|source| LinkError::IdentityIo {
        path: dir.to_owned(),
        operation: "fsync directory",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = Identity::load_or_create(dir.path(), "site-a").expect("create");
        let certificate = fs::read(dir.path().join(CERTIFICATE_FILE_NAME)).expect("read crt");
        let key = fs::read(dir.path().join(KEY_FILE_NAME)).expect("read key");
        assert!(certificate.starts_with(b"-----BEGIN CERTIFICATE-----"));
        assert!(key.starts_with(b"-----BEGIN PRIVATE KEY-----"));

        let second = Identity::load_or_create(dir.path(), "another-name").expect("reload");
        assert_eq!(first.fingerprint(), second.fingerprint());
        assert_eq!(first.certificate_der(), second.certificate_der());
        assert_eq!(
            fs::read(dir.path().join(KEY_FILE_NAME)).expect("read key"),
            key,
            "reloading must not rewrite the key"
        );
        assert_eq!(Fingerprint::of_certificate(first.certificate_der()), first.fingerprint());

        let elsewhere = tempfile::tempdir().expect("tempdir");
        let other = Identity::load_or_create(elsewhere.path(), "site-a").expect("create");
        assert_ne!(first.fingerprint(), other.fingerprint());
        // No temporary files are left behind.
        let names: Vec<_> =
            fs::read_dir(dir.path()).expect("read dir").map(|e| e.expect("entry").file_name()).collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn key_file_is_owner_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let nested = dir.path().join("identity");
        Identity::load_or_create(&nested, "site-a").expect("create");
        let mode = fs::metadata(nested.join(KEY_FILE_NAME)).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn certificate_names_the_site() {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::load_or_create(dir.path(), "site-west").expect("create");
        let der = identity.certificate_der();
        // Names are stored as plain ASCII in the DER: the subject's and the issuer's common
        // name (self-signed: the same) and the subject alternative name's dNSName.
        let occurrences = der.windows(b"site-west".len()).filter(|w| w == b"site-west").count();
        assert_eq!(occurrences, 3, "subject, issuer and subject alternative name");
    }

    #[test]
    fn corrupt_key_is_an_error_and_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(dir.path(), "site-a").expect("create");
        let key_path = dir.path().join(KEY_FILE_NAME);
        let garbage = b"-----BEGIN PRIVATE KEY-----\nnot base64 at all!!\n-----END PRIVATE KEY-----\n";
        fs::write(&key_path, garbage).expect("corrupt");

        let err = Identity::load_or_create(dir.path(), "site-a").expect_err("corrupt key");
        assert!(matches!(&err, LinkError::IdentityCorrupt { path, .. } if path == &key_path), "{err}");
        let message = err.to_string();
        assert!(message.contains("site.key"), "{message}");
        assert!(message.contains("never replaced"), "{message}");
        assert_eq!(fs::read(&key_path).expect("read"), garbage, "kept as it was");

        fs::write(&key_path, b"").expect("truncate");
        let err = Identity::load_or_create(dir.path(), "site-a").expect_err("empty key");
        assert!(matches!(err, LinkError::IdentityCorrupt { .. }), "{err}");
    }

    #[test]
    fn key_of_another_identity_is_refused() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(a.path(), "site-a").expect("create a");
        Identity::load_or_create(b.path(), "site-b").expect("create b");
        fs::copy(b.path().join(KEY_FILE_NAME), a.path().join(KEY_FILE_NAME)).expect("swap key");
        let err = Identity::load_or_create(a.path(), "site-a").expect_err("mismatched key");
        assert!(err.to_string().contains("does not belong"), "{err}");
    }

    #[test]
    fn corrupt_certificate_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(dir.path(), "site-a").expect("create");
        let certificate_path = dir.path().join(CERTIFICATE_FILE_NAME);
        fs::write(&certificate_path, b"hello").expect("corrupt");
        let err = Identity::load_or_create(dir.path(), "site-a").expect_err("corrupt cert");
        assert!(
            matches!(&err, LinkError::IdentityCorrupt { path, .. } if path == &certificate_path),
            "{err}"
        );
    }

    #[test]
    fn half_an_identity_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        Identity::load_or_create(dir.path(), "site-a").expect("create");
        let certificate_path = dir.path().join(CERTIFICATE_FILE_NAME);
        fs::remove_file(&certificate_path).expect("remove cert");
        let err = Identity::load_or_create(dir.path(), "site-a").expect_err("incomplete");
        assert!(
            matches!(&err, LinkError::IdentityIncomplete { missing, .. } if missing == &certificate_path),
            "{err}"
        );
        assert!(!certificate_path.exists(), "no new certificate is made for an existing key");
    }
}
