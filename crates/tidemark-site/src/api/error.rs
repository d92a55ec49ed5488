//! The API's one error shape, `{"error": "..."}` with a status, and the extractors that make
//! every kind of bad input (unparsable JSON, unknown fields, bad sizes, bad path segments)
//! come back in that shape instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use tidemark_engine::EngineError;

use crate::jobs::JobError;
use crate::names::NameError;

/// A failed request: the status and the message sent as `{"error": message}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// What went wrong, for the operator.
    pub message: String,
}

/// The message of an error response, kept on the response so the audit record can say why.
#[derive(Clone, Debug)]
pub struct ErrorMessage(pub String);

impl ApiError {
    /// An error with this status and message.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }

    /// 400: the request itself is wrong.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 404.
    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, message)
    }

    /// 500: our fault.
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, Json(serde_json::json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(ErrorMessage(self.message));
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(error: EngineError) -> ApiError {
        let status = match &error {
            EngineError::NotFound { .. } => StatusCode::NOT_FOUND,
            EngineError::AlreadyExists { .. }
            | EngineError::Conflict(_)
            | EngineError::ReadOnly(_)
            | EngineError::NotPrimary { .. }
            | EngineError::RoleChanging { .. } => StatusCode::CONFLICT,
            EngineError::InvalidArgument(_) | EngineError::PointOutOfRange { .. } => StatusCode::BAD_REQUEST,
            EngineError::Poisoned { .. } | EngineError::Failed { .. } | EngineError::Diverged { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            EngineError::Journal(_) | EngineError::Io { .. } | EngineError::Catalog(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        };
        ApiError::new(status, error.to_string())
    }
}

impl From<crate::replication::ReplicationError> for ApiError {
    fn from(error: crate::replication::ReplicationError) -> ApiError {
        use crate::replication::ReplicationError as R;
        match error {
            R::Engine(e) => e.into(),
            R::UnknownPartner(_) | R::NotProtected(_) => {
                ApiError::new(StatusCode::NOT_FOUND, error.to_string())
            }
            R::PartnerExists(_)
            | R::PartnerInUse { .. }
            | R::AlreadyProtected { .. }
            | R::PrimaryReachable { .. }
            | R::NotConnected(_)
            | R::SwapFailed { .. } => ApiError::new(StatusCode::CONFLICT, error.to_string()),
            R::Invalid(_) => ApiError::bad_request(error.to_string()),
            R::Link(_) | R::Store { .. } => {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, error.to_string())
            }
        }
    }
}

impl From<NameError> for ApiError {
    fn from(error: NameError) -> ApiError {
        ApiError::bad_request(error.to_string())
    }
}

impl From<JobError> for ApiError {
    fn from(error: JobError) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, error.to_string())
    }
}

/// A JSON request body. Unlike axum's `Json`, every failure is a 400 (or 413 when too large)
/// with a JSON error body, and no content type is demanded (the bearer token, not the content
/// type, is what keeps browsers' cross-site requests out).
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes =
            Bytes::from_request(req, state).await.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::bad_request("the request needs a JSON object body"));
        }
        serde_json::from_slice(&bytes)
            .map(ApiJson)
            .map_err(|e| ApiError::bad_request(format!("invalid request body: {e}")))
    }
}

/// A path parameter whose failures are 400s in the API's error shape.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Path::<T>::from_request_parts(parts, state)
            .await
            .map(|Path(value)| ApiPath(value))
            .map_err(|r| ApiError::bad_request(r.body_text()))
    }
}
