//! One function per route. Each checks its input (names, sizes, points) before the engine sees
//! it, so bad input is a 400 with a clear message and costs the engine nothing.

use std::str::FromStr;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use tidemark_engine::{
    BookmarkInfo, EngineError, GroupInfo, GroupOptions, HistoryInfo, ImageInfo, ImageMode, Point, VolumeInfo,
};

use super::{ApiError, ApiJson, ApiPath, ApiState};
use crate::events::{self, Event, EventSource, Outcome, EVENTS_RETURNED_MAX};
use crate::jobs::JobView;
use crate::names::validate_name;
use crate::replication::{OverflowPolicy, Partner, Protection, ReplicationStatus, SiteIdentity};
use crate::token::Caller;
use crate::units::{ByteSize, HumanDuration};

/// Default block size of a new volume, in bytes.
pub const BLOCK_SIZE_BYTES_DEFAULT: u32 = 4096;

type ApiResult<T> = Result<T, ApiError>;

/// Run a blocking engine call on tokio's blocking pool.
async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(call)
        .await
        .map_err(|e| ApiError::internal(format!("engine call did not complete: {e}")))?
        .map_err(ApiError::from)
}

/// `GET /v1/status`.
#[derive(Serialize)]
pub struct Status {
    site: String,
    version: &'static str,
    uptime_seconds: u64,
    listeners: Listeners,
    groups: usize,
    volumes: usize,
    images: usize,
    jobs_running: usize,
    groups_not_ok: Vec<GroupProblem>,
}

#[derive(Serialize)]
struct Listeners {
    api: String,
    nbd: String,
}

#[derive(Serialize)]
struct GroupProblem {
    name: String,
    state: String,
    reason: Option<String>,
}

pub async fn status(State(state): State<Arc<ApiState>>) -> ApiResult<Json<Status>> {
    let engine = state.engine.clone();
    let (groups, volumes, images) =
        blocking(move || Ok((engine.groups(), engine.volumes().len(), engine.images().len()))).await?;
    Ok(Json(Status {
        site: state.settings.site_name.clone(),
        version: env!("CARGO_PKG_VERSION"),
        uptime_seconds: state.started.elapsed().as_secs(),
        listeners: Listeners {
            api: state.settings.api_listen.to_string(),
            nbd: state.settings.nbd_listen.to_string(),
        },
        groups: groups.len(),
        volumes,
        images,
        jobs_running: state.jobs.running(),
        groups_not_ok: groups
            .into_iter()
            .filter(|g| g.state != "ok")
            .map(|g| GroupProblem { name: g.name, state: g.state, reason: g.state_reason })
            .collect(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateGroup {
    name: String,
    retention: Option<HumanDuration>,
    journal_max: Option<ByteSize>,
}

pub async fn create_group(
    State(state): State<Arc<ApiState>>,
    ApiJson(req): ApiJson<CreateGroup>,
) -> ApiResult<impl IntoResponse> {
    validate_name("group", &req.name)?;
    let defaults = &state.settings.group_defaults;
    let options = GroupOptions {
        retention_seconds: req.retention.map_or(defaults.retention_seconds, |d| d.0.as_secs()),
        journal_max_bytes: req.journal_max.map_or(defaults.journal_max_bytes, |s| s.0),
    };
    if options.retention_seconds == 0 {
        return Err(ApiError::bad_request("retention must be at least one second"));
    }
    if options.journal_max_bytes == 0 {
        return Err(ApiError::bad_request("journal_max must be more than zero bytes"));
    }
    let engine = state.engine.clone();
    let info = blocking(move || engine.create_group(&req.name, options)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// A group as `group show` reports it: the engine's view plus its replication.
#[derive(serde::Serialize)]
pub struct GroupView {
    #[serde(flatten)]
    info: GroupInfo,
    /// The partner it is protected to, if any.
    partner: Option<String>,
    /// Replication status, when protected here or received from a partner.
    replication: Option<ReplicationStatus>,
    /// Where a takeover here forked the history (RFC 001).
    fork_point: Option<crate::replication::ForkPointView>,
    /// Generation, source partner and role changes.
    roles: Option<crate::replication::RolesView>,
}

fn group_view(state: &ApiState, info: GroupInfo) -> GroupView {
    let roles = state.replication.roles(&info.name);
    GroupView {
        partner: state.replication.partner_of(&info.name),
        replication: state.replication.status(&info.name),
        fork_point: roles.as_ref().and_then(|r| r.fork_point.clone()),
        roles,
        info,
    }
}

pub async fn list_groups(State(state): State<Arc<ApiState>>) -> ApiResult<Json<Vec<GroupView>>> {
    let st = state.clone();
    blocking(move || Ok(st.engine.groups().into_iter().map(|g| group_view(&st, g)).collect())).await.map(Json)
}

pub async fn show_group(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<Json<GroupView>> {
    validate_name("group", &group)?;
    let st = state.clone();
    blocking(move || st.engine.group(&group).map(|g| group_view(&st, g))).await.map(Json)
}

pub async fn site(State(state): State<Arc<ApiState>>) -> Json<SiteIdentity> {
    Json(state.replication.identity())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddPartner {
    name: String,
    address: String,
    fingerprint: String,
    bandwidth_limit_mbit: Option<u64>,
}

pub async fn add_partner(
    State(state): State<Arc<ApiState>>,
    ApiJson(req): ApiJson<AddPartner>,
) -> ApiResult<(StatusCode, Json<Partner>)> {
    let partner =
        state.replication.add_partner(&req.name, &req.address, &req.fingerprint, req.bandwidth_limit_mbit)?;
    Ok((StatusCode::CREATED, Json(partner)))
}

pub async fn list_partners(State(state): State<Arc<ApiState>>) -> Json<Vec<Partner>> {
    Json(state.replication.partners())
}

pub async fn remove_partner(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state.replication.remove_partner(&name)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Protect {
    partner: String,
    /// `resync` (default) or `throttle`.
    #[serde(default)]
    overflow: Option<String>,
}

pub async fn protect(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
    ApiJson(req): ApiJson<Protect>,
) -> ApiResult<Json<Protection>> {
    validate_name("group", &group)?;
    let overflow = match req.overflow.as_deref() {
        None => OverflowPolicy::default(),
        Some(name) => name.parse().map_err(|e: String| ApiError::bad_request(e))?,
    };
    Ok(Json(state.replication.protect(&group, &req.partner, overflow)?))
}

/// What a swap answers.
#[derive(Serialize)]
pub struct SwapView {
    #[serde(flatten)]
    outcome: crate::replication::session::SwapOutcome,
    /// Seconds from the request to the new primary.
    seconds: f64,
}

/// `POST /v1/groups/{group}/swap`: hand the primary role to the partner (or take it, at the
/// secondary), with no data loss. Answers when the swap is done.
pub async fn swap(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<Json<SwapView>> {
    validate_name("group", &group)?;
    let started = std::time::Instant::now();
    let outcome = state.replication.swap(&group).await?;
    Ok(Json(SwapView { outcome, seconds: started.elapsed().as_secs_f64() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Takeover {
    at: Option<String>,
    #[serde(default)]
    force: bool,
}

/// `POST /v1/groups/{group}/takeover`: make this site's copy the primary, its primary being lost.
pub async fn takeover(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
    ApiJson(req): ApiJson<Takeover>,
) -> ApiResult<Json<crate::replication::TakeoverOutcome>> {
    validate_name("group", &group)?;
    let at =
        req.at.map(|p| Point::from_str(&p).map_err(|e| ApiError::bad_request(e.to_string()))).transpose()?;
    Ok(Json(state.replication.takeover(&group, at, req.force).await?))
}

pub async fn unprotect(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<StatusCode> {
    state.replication.unprotect(&group)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn pause(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<Json<Protection>> {
    Ok(Json(state.replication.set_paused(&group, true)?))
}

pub async fn resume(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<Json<Protection>> {
    Ok(Json(state.replication.set_paused(&group, false)?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    name: String,
    group: String,
    size: ByteSize,
    block_size: Option<ByteSize>,
}

pub async fn create_volume(
    State(state): State<Arc<ApiState>>,
    ApiJson(req): ApiJson<CreateVolume>,
) -> ApiResult<impl IntoResponse> {
    validate_name("volume", &req.name)?;
    validate_name("group", &req.group)?;
    let block_size = match req.block_size {
        None => BLOCK_SIZE_BYTES_DEFAULT,
        Some(ByteSize(bytes)) => u32::try_from(bytes)
            .ok()
            .filter(|b| tidemark_engine::BLOCK_SIZES_ALLOWED.contains(b))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "invalid block_size {bytes}: it must be one of {:?} bytes",
                    tidemark_engine::BLOCK_SIZES_ALLOWED
                ))
            })?,
    };
    check_volume_size(req.size.0, block_size)?;
    let engine = state.engine.clone();
    let info = blocking(move || engine.create_volume(&req.group, &req.name, req.size.0, block_size)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn list_volumes(State(state): State<Arc<ApiState>>) -> ApiResult<Json<Vec<VolumeInfo>>> {
    let engine = state.engine.clone();
    blocking(move || Ok(engine.volumes())).await.map(Json)
}

pub async fn show_volume(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<VolumeInfo>> {
    validate_name("volume", &name)?;
    let engine = state.engine.clone();
    blocking(move || engine.volume(&name)).await.map(Json)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeVolume {
    size: ByteSize,
}

pub async fn resize_volume(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<ResizeVolume>,
) -> ApiResult<Json<VolumeInfo>> {
    validate_name("volume", &name)?;
    let engine = state.engine.clone();
    blocking(move || {
        let volume = engine.volume(&name)?;
        check_volume_size(req.size.0, volume.block_size_bytes)
            .map_err(|e| EngineError::InvalidArgument(e.message))?;
        engine.resize_volume(&name, req.size.0)
    })
    .await
    .map(Json)
}

pub async fn delete_volume(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    validate_name("volume", &name)?;
    let engine = state.engine.clone();
    blocking(move || engine.delete_volume(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBookmark {
    name: String,
}

pub async fn create_bookmark(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
    ApiJson(req): ApiJson<CreateBookmark>,
) -> ApiResult<impl IntoResponse> {
    validate_name("group", &group)?;
    validate_name("bookmark", &req.name)?;
    let engine = state.engine.clone();
    let info = blocking(move || engine.create_bookmark(&group, &req.name)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn list_bookmarks(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<Json<Vec<BookmarkInfo>>> {
    validate_name("group", &group)?;
    let engine = state.engine.clone();
    blocking(move || engine.bookmarks(&group)).await.map(Json)
}

/// A group's history: points, bookmarks, rollbacks, and its role changes here.
#[derive(Serialize)]
pub struct HistoryView {
    #[serde(flatten)]
    history: HistoryInfo,
    /// Role changes at this site, oldest first.
    role_changes: Vec<crate::replication::RoleChangeView>,
    /// Where a takeover here forked the history.
    fork_point: Option<crate::replication::ForkPointView>,
}

pub async fn history(
    State(state): State<Arc<ApiState>>,
    ApiPath(group): ApiPath<String>,
) -> ApiResult<Json<HistoryView>> {
    validate_name("group", &group)?;
    let engine = state.engine.clone();
    let name = group.clone();
    let history = blocking(move || engine.history(&name)).await?;
    let roles = state.replication.roles(&group);
    Ok(Json(HistoryView {
        history,
        role_changes: roles.as_ref().map(|r| r.role_changes.clone()).unwrap_or_default(),
        fork_point: roles.and_then(|r| r.fork_point),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rollback {
    to: Option<String>,
    #[serde(default)]
    undo: bool,
}

/// What a rollback job does.
enum RollbackTarget {
    To(Point),
    Undo,
}

/// `POST /v1/groups/{group}/rollback`: start a job and return `{"job": id}` (202).
pub async fn rollback(
    State(state): State<Arc<ApiState>>,
    Extension(caller): Extension<Caller>,
    ApiPath(group): ApiPath<String>,
    ApiJson(req): ApiJson<Rollback>,
) -> ApiResult<impl IntoResponse> {
    validate_name("group", &group)?;
    let (target, target_text) = match (req.to, req.undo) {
        (Some(to), false) => {
            let point = Point::from_str(&to).map_err(|e| ApiError::bad_request(e.to_string()))?;
            (RollbackTarget::To(point), to)
        }
        (None, true) => (RollbackTarget::Undo, "undo".to_string()),
        (Some(_), true) => {
            return Err(ApiError::bad_request("give either \"to\" or \"undo\": true, not both"))
        }
        (None, false) => {
            return Err(ApiError::bad_request(
                "give \"to\": POINT, or \"undo\": true to undo the last rollback",
            ))
        }
    };
    // Refuse an unknown group now rather than in a job that fails a moment later.
    let engine = state.engine.clone();
    let lookup = group.clone();
    blocking(move || engine.group(&lookup)).await?;

    let job = state.jobs.start("rollback", &group, &target_text)?;
    let id = job.id();
    let worker_state = state.clone();
    tokio::task::spawn_blocking(move || {
        let engine = &worker_state.engine;
        let progress = |p| job.set_progress(p);
        let result = match &target {
            RollbackTarget::To(point) => engine.rollback(&group, point, &progress),
            RollbackTarget::Undo => engine.undo_rollback(&group, &progress),
        };
        let mut event = Event::now(EventSource::Api, "rollback.finish", String::new());
        event.who = Some(caller.who.to_string());
        event.object = Some(group.clone());
        event.group = Some(group.clone());
        let outcome = match result {
            Ok(info) => {
                event.result = Some(Outcome::Ok);
                event.message = format!(
                    "rollback of group {group} to {target_text} (job {id}) done: now at seq {}, rewrote {} bytes",
                    info.after.seq, info.bytes_rewritten
                );
                serde_json::to_value(&info).map_err(|e| format!("cannot encode the rollback result: {e}"))
            }
            Err(e) => {
                event.result = Some(Outcome::Failed);
                event.message = format!("rollback of group {group} to {target_text} (job {id}) failed: {e}");
                Err(e.to_string())
            }
        };
        event.detail = Some(serde_json::json!({ "job": id, "target": target_text }));
        worker_state.events.record(event);
        worker_state.jobs.finish(&job, outcome);
    });
    Ok((StatusCode::ACCEPTED, Json(serde_json::json!({ "job": id }))))
}

pub async fn show_job(
    State(state): State<Arc<ApiState>>,
    ApiPath(id): ApiPath<u64>,
) -> ApiResult<Json<JobView>> {
    state.jobs.get(id).map(|job| Json(job.view())).ok_or_else(|| {
        ApiError::not_found(format!("no job {id} (finished jobs are forgotten after a while and at restart)"))
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    group: String,
    at: String,
    name: String,
    #[serde(default)]
    writable: bool,
}

pub async fn create_image(
    State(state): State<Arc<ApiState>>,
    ApiJson(req): ApiJson<CreateImage>,
) -> ApiResult<impl IntoResponse> {
    validate_name("group", &req.group)?;
    validate_name("image", &req.name)?;
    let at = Point::from_str(&req.at).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mode = if req.writable { ImageMode::Writable } else { ImageMode::ReadOnly };
    let engine = state.engine.clone();
    let info = blocking(move || engine.create_image(&req.group, &at, &req.name, mode)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

pub async fn list_images(State(state): State<Arc<ApiState>>) -> ApiResult<Json<Vec<ImageInfo>>> {
    let engine = state.engine.clone();
    blocking(move || Ok(engine.images())).await.map(Json)
}

pub async fn show_image(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<Json<ImageInfo>> {
    validate_name("image", &name)?;
    let engine = state.engine.clone();
    let images = blocking(move || Ok(engine.images())).await?;
    images
        .into_iter()
        .find(|i| i.name == name)
        .map(Json)
        .ok_or_else(|| ApiError::from(EngineError::NotFound { kind: "image", name }))
}

pub async fn delete_image(
    State(state): State<Arc<ApiState>>,
    ApiPath(name): ApiPath<String>,
) -> ApiResult<StatusCode> {
    validate_name("image", &name)?;
    let engine = state.engine.clone();
    blocking(move || engine.delete_image(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    since: Option<String>,
    limit: Option<usize>,
}

/// `GET /v1/events?since=RFC3339&limit=N`: newest last, at most [`EVENTS_RETURNED_MAX`].
pub async fn events(
    State(state): State<Arc<ApiState>>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Json<Vec<Event>>> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let since = query
        .since
        .as_deref()
        .map(events::parse_time_unix_nanos)
        .transpose()
        .map_err(ApiError::bad_request)?;
    let limit = query.limit.unwrap_or(EVENTS_RETURNED_MAX);
    if limit == 0 || limit > EVENTS_RETURNED_MAX {
        return Err(ApiError::bad_request(format!("limit must be 1..={EVENTS_RETURNED_MAX}")));
    }
    Ok(Json(state.events.query(since, limit)))
}

/// A volume size must be whole blocks, more than zero, and at most the engine's maximum.
fn check_volume_size(size_bytes: u64, block_size_bytes: u32) -> ApiResult<()> {
    if size_bytes == 0 {
        return Err(ApiError::bad_request("size must be more than zero bytes"));
    }
    if size_bytes % u64::from(block_size_bytes) != 0 {
        return Err(ApiError::bad_request(format!(
            "size {size_bytes} is not a whole number of {block_size_bytes}-byte blocks"
        )));
    }
    if size_bytes > tidemark_engine::VOLUME_SIZE_BYTES_MAX {
        return Err(ApiError::bad_request(format!(
            "size {size_bytes} is more than the largest volume, {} bytes",
            tidemark_engine::VOLUME_SIZE_BYTES_MAX
        )));
    }
    Ok(())
}
