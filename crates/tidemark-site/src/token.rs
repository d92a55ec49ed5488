//! The API bearer token: made once per data directory, kept in `DATA_DIR/api-token` (mode 0600).
//!
//! For now there is one token and it has the admin role; roles (admin, operator, viewer) and
//! several named tokens may come later, which is why callers get a [`Caller`] and not a bool.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// File name of the token inside the data directory.
pub const TOKEN_FILE_NAME: &str = "api-token";
/// Random bytes in a new token (written as twice as many hex digits).
pub const TOKEN_RANDOM_BYTES: usize = 32;
/// Largest token file read, in bytes.
pub const TOKEN_FILE_BYTES_MAX: u64 = 4096;
/// Shortest token accepted from an existing file, in characters.
pub const TOKEN_CHARS_MIN: usize = 16;

/// Who made an API request. Every change is recorded in the event log with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The token's id; the one token there is now is `admin`.
    pub who: &'static str,
}

/// A bearer token. Its `Debug` does not show the secret.
#[derive(Clone)]
pub struct ApiToken {
    secret: String,
}

/// Why the token file could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Creating, reading or syncing the token file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file exists but does not hold a usable token.
    #[error("{path}: {reason}; delete the file to have a new token made at the next start")]
    Invalid {
        /// The token file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiToken(..)")
    }
}

impl ApiToken {
    /// A token with this secret (for tests and for clients that were handed one).
    pub fn new(secret: impl Into<String>) -> ApiToken {
        ApiToken { secret: secret.into() }
    }

    /// The secret, to hand to clients.
    pub fn secret(&self) -> &str {
        &self.secret
    }

    /// Read `DATA_DIR/api-token`, or make it if it is not there yet.
    ///
    /// A new token is written to a private temporary file, synced, then hard-linked into
    /// place, so the token file appears complete or not at all, and two sites started on
    /// the same directory at once agree on one token (the second link fails and reads the
    /// first's).
    pub fn load_or_create(data_dir: &Path) -> Result<ApiToken, TokenError> {
        let path = data_dir.join(TOKEN_FILE_NAME);
        match ApiToken::read(&path) {
            Err(TokenError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let mut random = [0u8; TOKEN_RANDOM_BYTES];
        rand::rng().fill_bytes(&mut random);
        let secret: String = random.iter().map(|b| format!("{b:02x}")).collect();

        let temp = data_dir.join(format!(".{TOKEN_FILE_NAME}.{}.tmp", std::process::id()));
        let io = |action, path: &Path| {
            let path = path.to_path_buf();
            move |source| TokenError::Io { action, path, source }
        };
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io("create token file", &temp))?;
        let written = file.write_all(format!("{secret}\n").as_bytes()).and_then(|()| file.sync_all());
        drop(file);
        let linked =
            written.map_err(io("write token file", &temp)).and_then(|()| match fs::hard_link(&temp, &path) {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(io("link token file", &path)(e)),
            });
        // The temporary name is never needed again, whatever happened above.
        let _ = fs::remove_file(&temp);
        if !linked? {
            return ApiToken::read(&path);
        }
        File::open(data_dir).and_then(|dir| dir.sync_all()).map_err(io("sync data directory", data_dir))?;
        Ok(ApiToken { secret })
    }

    /// Read a token file, refusing one that is empty, short or holds more than a token.
    pub fn read(path: &Path) -> Result<ApiToken, TokenError> {
        let io = |action| {
            let path = path.to_path_buf();
            move |source| TokenError::Io { action, path, source }
        };
        let file = File::open(path).map_err(io("open token file"))?;
        let metadata = file.metadata().map_err(io("stat token file"))?;
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "the API token file can be read by other users; chmod 600 it"
            );
        }
        let mut text = String::new();
        file.take(TOKEN_FILE_BYTES_MAX).read_to_string(&mut text).map_err(io("read token file"))?;
        let secret = text.trim();
        let invalid =
            |reason: &str| TokenError::Invalid { path: path.to_path_buf(), reason: reason.to_string() };
        if secret.chars().count() < TOKEN_CHARS_MIN {
            return Err(invalid("the token is shorter than 16 characters"));
        }
        if !secret.chars().all(|c| c.is_ascii_graphic()) {
            return Err(invalid("the token must be one word of printable ASCII"));
        }
        Ok(ApiToken { secret: secret.to_string() })
    }

    /// Whether `presented` is this token, in time that does not depend on where they differ.
    pub fn matches(&self, presented: &str) -> bool {
        constant_time_eq(self.secret.as_bytes(), presented.as_bytes())
    }
}

/// Compare without an early exit, so response time does not reveal how much of a guess was
/// right. Only the length can leak, and every token made here has the same length.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let difference = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(difference) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_is_created_private_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = ApiToken::load_or_create(dir.path()).expect("create");
        assert_eq!(first.secret().len(), TOKEN_RANDOM_BYTES * 2);
        assert!(first.secret().chars().all(|c| c.is_ascii_hexdigit()));
        let mode = fs::metadata(dir.path().join(TOKEN_FILE_NAME)).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let second = ApiToken::load_or_create(dir.path()).expect("reuse");
        assert_eq!(first.secret(), second.secret());
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
        let other = tempfile::tempdir().expect("tempdir");
        let third = ApiToken::load_or_create(other.path()).expect("create");
        assert_ne!(first.secret(), third.secret());
    }

    #[test]
    fn unusable_token_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join(TOKEN_FILE_NAME), "short\n").expect("write");
        let err = ApiToken::load_or_create(dir.path()).expect_err("short token");
        assert!(err.to_string().contains("shorter than 16"), "{err}");
        fs::write(dir.path().join(TOKEN_FILE_NAME), "a token with spaces in it\n").expect("write");
        assert!(ApiToken::load_or_create(dir.path()).is_err());
    }

    #[test]
    fn matches_only_the_exact_token() {
        let token = ApiToken::new("0123456789abcdef0123456789abcdef");
        assert!(token.matches("0123456789abcdef0123456789abcdef"));
        assert!(!token.matches("0123456789abcdef0123456789abcdeF"));
        assert!(!token.matches("0123456789abcdef0123456789abcde"));
        assert!(!token.matches(""));
        assert_eq!(format!("{token:?}"), "ApiToken(..)");
    }
}
