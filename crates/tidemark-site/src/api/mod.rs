//! The HTTP/JSON management API (`/v1/...`), served with axum.
//!
//! Every request must carry `Authorization: Bearer TOKEN` (401 without, 403 with a wrong one).
//! Every change (POST, PUT, PATCH, DELETE), done or refused, is written to the event log with
//! who asked, what, on which object and how it ended. Every error is `{"error": "..."}`: 400
//! bad input, 404 no such object, 409 exists or conflicts, 413 body too large, 503 the group is
//! poisoned or failed, 500 anything else. Request bodies are bounded by `api_body_bytes_max`.
//!
//! Engine calls block (they may fsync), so handlers run them on tokio's blocking pool.

mod error;
mod handlers;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{to_bytes, Body};
use axum::extract::{DefaultBodyLimit, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tidemark_engine::{Engine, GroupOptions};

pub use error::{ApiError, ApiJson, ApiPath, ErrorMessage};

use crate::events::{Event, EventLog, EventSource, Outcome};
use crate::jobs::Jobs;
use crate::replication::Replication;
use crate::token::{ApiToken, Caller};

/// What the API needs to know about the site it serves.
#[derive(Clone, Debug)]
pub struct ApiSettings {
    /// The site's name, for `status`.
    pub site_name: String,
    /// Where the API listens, for `status`.
    pub api_listen: SocketAddr,
    /// Where the NBD server listens, for `status`.
    pub nbd_listen: SocketAddr,
    /// Largest request body, in bytes.
    pub body_bytes_max: usize,
    /// Finished jobs kept.
    pub jobs_finished_max: usize,
    /// Options for groups created without their own.
    pub group_defaults: GroupOptions,
}

/// Shared state of every request.
pub struct ApiState {
    settings: ApiSettings,
    engine: Arc<Engine>,
    events: Arc<EventLog>,
    jobs: Jobs,
    token: ApiToken,
    replication: Arc<Replication>,
    started: Instant,
}

impl ApiState {
    /// State for an API over `engine`, recording to `events`, accepting `token`.
    pub fn new(
        settings: ApiSettings,
        engine: Arc<Engine>,
        events: Arc<EventLog>,
        token: ApiToken,
        replication: Arc<Replication>,
    ) -> Arc<ApiState> {
        let jobs = Jobs::new(settings.jobs_finished_max);
        Arc::new(ApiState { settings, engine, events, jobs, token, replication, started: Instant::now() })
    }
}

/// The API's router, ready for `axum::serve`.
pub fn router(state: Arc<ApiState>) -> Router {
    let body_bytes_max = state.settings.body_bytes_max;
    Router::new()
        .route("/v1/status", get(handlers::status))
        .route("/v1/groups", get(handlers::list_groups).post(handlers::create_group))
        .route("/v1/groups/{group}", get(handlers::show_group))
        .route("/v1/groups/{group}/bookmarks", get(handlers::list_bookmarks).post(handlers::create_bookmark))
        .route("/v1/groups/{group}/history", get(handlers::history))
        .route("/v1/groups/{group}/rollback", post(handlers::rollback))
        .route("/v1/groups/{group}/protect", post(handlers::protect))
        .route("/v1/groups/{group}/unprotect", post(handlers::unprotect))
        .route("/v1/groups/{group}/pause", post(handlers::pause))
        .route("/v1/groups/{group}/resume", post(handlers::resume))
        .route("/v1/groups/{group}/swap", post(handlers::swap))
        .route("/v1/groups/{group}/takeover", post(handlers::takeover))
        .route("/v1/site", get(handlers::site))
        .route("/v1/partners", get(handlers::list_partners).post(handlers::add_partner))
        .route("/v1/partners/{name}", axum::routing::delete(handlers::remove_partner))
        .route("/v1/volumes", get(handlers::list_volumes).post(handlers::create_volume))
        .route("/v1/volumes/{name}", get(handlers::show_volume).delete(handlers::delete_volume))
        .route("/v1/volumes/{name}/resize", post(handlers::resize_volume))
        .route("/v1/images", get(handlers::list_images).post(handlers::create_image))
        .route("/v1/images/{name}", get(handlers::show_image).delete(handlers::delete_image))
        .route("/v1/jobs/{id}", get(handlers::show_job))
        .route("/v1/events", get(handlers::events))
        .route_layer(middleware::from_fn_with_state(state.clone(), audit))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(body_bytes_max))
        .with_state(state)
}

/// The audit action for a change, by method and route.
fn action_of(method: &Method, route: &str) -> &'static str {
    match (method.as_str(), route) {
        ("POST", "/v1/groups") => "group.create",
        ("POST", "/v1/groups/{group}/bookmarks") => "bookmark.create",
        ("POST", "/v1/groups/{group}/rollback") => "rollback.start",
        ("POST", "/v1/volumes") => "volume.create",
        ("POST", "/v1/volumes/{name}/resize") => "volume.resize",
        ("DELETE", "/v1/volumes/{name}") => "volume.delete",
        ("POST", "/v1/images") => "image.create",
        ("DELETE", "/v1/images/{name}") => "image.delete",
        ("POST", "/v1/groups/{group}/protect") => "group.protect",
        ("POST", "/v1/groups/{group}/unprotect") => "group.unprotect",
        ("POST", "/v1/groups/{group}/pause") => "group.pause",
        ("POST", "/v1/groups/{group}/resume") => "group.resume",
        ("POST", "/v1/groups/{group}/swap") => "group.swap",
        ("POST", "/v1/groups/{group}/takeover") => "group.takeover",
        ("POST", "/v1/partners") => "partner.add",
        ("DELETE", "/v1/partners/{name}") => "partner.remove",
        _ => "request",
    }
}

fn is_change(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH | Method::DELETE)
}

/// Check the bearer token; let the request through with a [`Caller`], or refuse it.
async fn authenticate(State(state): State<Arc<ApiState>>, mut req: Request, next: Next) -> Response {
    let presented =
        req.headers().get(header::AUTHORIZATION).map(|value| value.to_str().ok().and_then(bearer_token));
    let refusal = match presented {
        None => Some(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing bearer token: send `Authorization: Bearer TOKEN`; the token is in the site's DATA_DIR/api-token",
        )),
        Some(None) => Some(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "malformed Authorization header: expected `Bearer TOKEN`",
        )),
        Some(Some(token)) if !state.token.matches(token) => Some(ApiError::new(
            StatusCode::FORBIDDEN,
            "the bearer token is not valid for this site",
        )),
        Some(Some(_)) => None,
    };
    let Some(refusal) = refusal else {
        // One token exists for now and it is the admin's.
        req.extensions_mut().insert(Caller { who: "admin" });
        return next.run(req).await;
    };
    tracing::warn!(method = %req.method(), path = %req.uri().path(), status = refusal.status.as_u16(), "refused API request");
    if is_change(req.method()) {
        let mut event = Event::now(
            EventSource::Api,
            "auth.refuse",
            format!("{} {} refused: {}", req.method(), req.uri().path(), refusal.message),
        );
        event.who = Some("anonymous".into());
        event.object = Some(req.uri().path().to_string());
        event.result = Some(Outcome::Denied);
        event.status = Some(refusal.status.as_u16());
        state.events.record(event);
    }
    refusal.into_response()
}

/// `Bearer TOKEN` → `TOKEN` (the scheme is case-insensitive, as RFC 7235 says).
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Record every change in the event log with who, what, the object and how it ended.
///
/// The body is read here (bounded) so the record can name the object being created and keep
/// the request as its detail, then handed on to the handler unchanged.
async fn audit(State(state): State<Arc<ApiState>>, req: Request, next: Next) -> Response {
    if !is_change(req.method()) {
        return next.run(req).await;
    }
    let who = req.extensions().get::<Caller>().map(|c| c.who).unwrap_or("anonymous");
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_default();
    let action = action_of(req.method(), &route);
    let (mut parts, body) = req.into_parts();
    let params: Vec<(String, String)> = RawPathParams::from_request_parts(&mut parts, &())
        .await
        .map(|p| p.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
        .unwrap_or_default();
    let param = |key: &str| params.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());

    let (response, detail) = match to_bytes(body, state.settings.body_bytes_max).await {
        Ok(bytes) => {
            let detail: Option<serde_json::Value> = serde_json::from_slice(&bytes).ok();
            let response = next.run(Request::from_parts(parts, Body::from(bytes))).await;
            (response, detail)
        }
        Err(_) => {
            let error = ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body is larger than {} bytes", state.settings.body_bytes_max),
            );
            (error.into_response(), None)
        }
    };
    let body_field =
        |key: &str| detail.as_ref().and_then(|d| d.get(key)).and_then(|v| v.as_str()).map(str::to_string);
    let object = body_field("name").or_else(|| param("name")).or_else(|| param("group"));
    let group = param("group").or_else(|| body_field("group"));
    let status = response.status();
    let error = response.extensions().get::<ErrorMessage>().map(|m| m.0.clone());
    let target = object.clone().unwrap_or_else(|| parts_path(&route));
    let mut event = Event::now(
        EventSource::Api,
        action,
        match &error {
            None => format!("{action} {target}"),
            Some(e) => format!("{action} {target} failed: {e}"),
        },
    );
    event.who = Some(who.to_string());
    event.object = object;
    event.group = group;
    event.result = Some(if status.is_success() { Outcome::Ok } else { Outcome::Failed });
    event.status = Some(status.as_u16());
    event.detail = detail;
    state.events.record(event);
    response
}

fn parts_path(route: &str) -> String {
    if route.is_empty() {
        "(unknown route)".to_string()
    } else {
        route.to_string()
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no such API route: {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn every_change_route_has_an_audit_action() {
        for (method, route) in [
            (Method::POST, "/v1/groups"),
            (Method::POST, "/v1/groups/{group}/bookmarks"),
            (Method::POST, "/v1/groups/{group}/rollback"),
            (Method::POST, "/v1/volumes"),
            (Method::POST, "/v1/volumes/{name}/resize"),
            (Method::DELETE, "/v1/volumes/{name}"),
            (Method::POST, "/v1/images"),
            (Method::DELETE, "/v1/images/{name}"),
            (Method::POST, "/v1/groups/{group}/protect"),
            (Method::POST, "/v1/groups/{group}/unprotect"),
            (Method::POST, "/v1/groups/{group}/pause"),
            (Method::POST, "/v1/groups/{group}/resume"),
            (Method::POST, "/v1/partners"),
            (Method::DELETE, "/v1/partners/{name}"),
        ] {
            assert_ne!(action_of(&method, route), "request", "{method} {route}");
        }
    }
}
