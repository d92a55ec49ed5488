//! A blocking client of a site's management API: bearer token in, JSON out, and the API's own
//! error message as the error when a request fails.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

/// How long one API request may take, in seconds, before the client gives up on it.
pub const REQUEST_TIMEOUT_SECONDS: u64 = 120;
/// Default API address when neither `--api`, `TIDEMARK_API` nor a config file names one.
pub const API_URL_DEFAULT: &str = "http://127.0.0.1:7600";

/// A site's API with the token to use.
pub struct ApiClient {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl ApiClient {
    /// A client of the API at `base` (`http://HOST:PORT`).
    pub fn new(base: &str, token: String) -> ApiClient {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(REQUEST_TIMEOUT_SECONDS)))
            .user_agent(concat!("tidemark/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        ApiClient { base: base.trim_end_matches('/').to_string(), token, agent }
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Value> {
        self.send("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value> {
        self.send("POST", path, Some(body))
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Value> {
        self.send("DELETE", path, None)
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = format!("{}{}", self.base, path);
        let authorization = format!("Bearer {}", self.token);
        let result = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", &authorization).call(),
            ("DELETE", _) => self.agent.delete(&url).header("Authorization", &authorization).call(),
            (_, body) => self
                .agent
                .post(&url)
                .header("Authorization", &authorization)
                .header("Content-Type", "application/json")
                .send(serde_json::to_vec(body.unwrap_or(&Value::Null)).context("encode request")?),
        };
        let mut response = result.map_err(|e| {
            anyhow!("cannot reach the site's API at {}: {e}; is `tidemark serve` running there?", self.base)
        })?;
        let status = response.status();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("read the response to {method} {path}"))?;
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).with_context(|| {
                format!("the API answered {method} {path} with {status} and a body that is not JSON")
            })?
        };
        if status.is_success() {
            return Ok(value);
        }
        match value.get("error").and_then(Value::as_str) {
            Some(message) => bail!("{message}"),
            None => bail!("{method} {path} failed with {status}"),
        }
    }
}

/// Find the token: the one given, or the one in `DATA_DIR/api-token`.
pub fn resolve_token(given: Option<String>, data_dir: &Path) -> Result<String> {
    if let Some(token) = given {
        return Ok(token);
    }
    let path: PathBuf = data_dir.join(tidemark_site::token::TOKEN_FILE_NAME);
    let token = tidemark_site::token::ApiToken::read(&path).map_err(|e| {
        anyhow!("no API token: pass --token or set TIDEMARK_TOKEN, or give --data-dir (or --config) of the site ({e})")
    })?;
    Ok(token.secret().to_string())
}

/// Percent-encode one path segment (names are validated by the API; this keeps odd input
/// from changing the path).
pub fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(segment("db-data_1.x"), "db-data_1.x");
        assert_eq!(segment("a/b c"), "a%2Fb%20c");
        assert_eq!(segment(".."), "..");
        assert_eq!(segment("é"), "%C3%A9");
    }

    #[test]
    fn given_token_wins_and_missing_file_is_explained() {
        let dir = std::env::temp_dir().join("tidemark-cli-test-no-such-dir");
        assert_eq!(resolve_token(Some("t".into()), &dir).expect("given"), "t");
        let err = resolve_token(None, &dir).expect_err("no token").to_string();
        assert!(err.contains("--token") && err.contains("api-token"), "{err}");
    }
}
