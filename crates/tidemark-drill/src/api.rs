//! A blocking client of one site's management API (bearer token, JSON), the same requests the
//! CLI sends; an error carries the API's own message.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

/// How long one request may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// A site's API.
#[derive(Clone)]
pub struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    /// A client of `http://addr` with the token in `data_dir/api-token`.
    pub fn new(addr: std::net::SocketAddr, token: String) -> Api {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .user_agent(concat!("tidemark-drill/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Api { base: format!("http://{addr}"), token, agent }
    }

    /// The token a site keeps in its data directory, if it has made one.
    pub fn read_token(data_dir: &Path) -> Option<String> {
        let text = std::fs::read_to_string(data_dir.join("api-token")).ok()?;
        let token = text.trim().to_string();
        (!token.is_empty()).then_some(token)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Result<Value, String> {
        self.send("GET", path, None)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        self.send("POST", path, Some(body))
    }

    /// `DELETE path`.
    pub fn delete(&self, path: &str) -> Result<Value, String> {
        self.send("DELETE", path, None)
    }

    fn send(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, String> {
        let url = format!("{}{}", self.base, path);
        let authorization = format!("Bearer {}", self.token);
        let result = match method {
            "GET" => self.agent.get(&url).header("Authorization", &authorization).call(),
            "DELETE" => self.agent.delete(&url).header("Authorization", &authorization).call(),
            _ => self
                .agent
                .post(&url)
                .header("Authorization", &authorization)
                .header("Content-Type", "application/json")
                .send(serde_json::to_vec(body.unwrap_or(&Value::Null)).map_err(|e| e.to_string())?),
        };
        let mut response = result.map_err(|e| format!("{method} {path}: cannot reach {}: {e}", self.base))?;
        let status = response.status();
        let text = response.body_mut().read_to_string().map_err(|e| format!("{method} {path}: {e}"))?;
        let value: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .map_err(|_| format!("{method} {path}: {status} with a body that is not JSON"))?
        };
        if status.is_success() {
            return Ok(value);
        }
        match value.get("error").and_then(Value::as_str) {
            Some(message) => Err(format!("{method} {path}: {message}")),
            None => Err(format!("{method} {path}: {status}")),
        }
    }
}
