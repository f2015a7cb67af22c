//! The control socket: local administration over HTTP on a Unix socket.
//! `curl --unix-socket /run/hermes-gateway/control.sock http://localhost/status`

use crate::gateway::scrape::RouteExt;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::error::ApiError;
use super::platforms::Platforms;
use super::schedules::Schedules;
use crate::lifecycle::LifecycleHandle;

#[derive(Clone)]
struct Control {
    lifecycle: LifecycleHandle,
    platforms: Platforms,
    schedules: Schedules,
}

pub fn router(lifecycle: LifecycleHandle, platforms: Platforms, schedules: Schedules) -> Router {
    Router::new()
        .route_tagged("/status", get(status))
        .route_tagged("/health", get(status))
        .route_tagged("/pairing", get(pairing_list))
        .route_tagged("/pairing/{code}/approve", post(approve))
        .route_tagged("/pairing/revoke/{user}", post(revoke))
        .route_tagged("/schedules", get(schedule_list))
        .route_tagged("/schedules/{name}/run", post(schedule_run))
        .with_state(Control {
            lifecycle,
            platforms,
            schedules,
        })
}

/// The lifecycle's report, with each chat platform's state and the schedule due next.
async fn status(State(c): State<Control>) -> Response {
    let mut v = serde_json::to_value(c.lifecycle.report()).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.insert("platforms".into(), c.platforms.status().await.into());
        let store = match c.platforms.store().degraded() {
            None => json!({"status": "ok"}),
            Some(why) => json!({"status": "degraded", "error": why}),
        };
        m.insert("store".into(), store);
        let next = c.schedules.next_due().map(|(name, at)| {
            json!({"name": name, "at_unix_ms": at, "at": super::schedules::slot_id(at)})
        });
        m.insert("next_schedule".into(), next.unwrap_or_default());
        m.insert(
            "tasks".into(),
            tokio::runtime::Handle::current()
                .metrics()
                .num_alive_tasks()
                .into(),
        );
    }
    Json(v).into_response()
}

async fn schedule_list(State(c): State<Control>) -> Result<Response, ApiError> {
    let list = c
        .schedules
        .list()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({"object": "list", "data": list})).into_response())
}

async fn schedule_run(
    State(c): State<Control>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    match c
        .schedules
        .run_now(&name)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
    {
        Some(id) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"status": "accepted", "schedule": name, "delivery_id": id})),
        )
            .into_response()),
        None => Err(ApiError::not_found("schedule", &name)),
    }
}

async fn pairing_list(State(c): State<Control>) -> Result<Response, ApiError> {
    let users = c
        .platforms
        .pairing_list()
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({"object": "list", "data": users})).into_response())
}

async fn approve(State(c): State<Control>, Path(code): Path<String>) -> Result<Response, ApiError> {
    match c
        .platforms
        .approve(&code)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
    {
        Some(u) => Ok(Json(u).into_response()),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "no pairing request has the code `{}` (see `hermes-gateway pairing list`)",
                code.escape_default()
            ),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct RevokeQuery {
    platform: Option<String>,
    name: Option<String>,
}

async fn revoke(
    State(c): State<Control>,
    Path(user): Path<String>,
    Query(q): Query<RevokeQuery>,
) -> Result<Response, ApiError> {
    let removed = c
        .platforms
        .revoke(&user, q.platform, q.name)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if removed.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!(
                "user `{}` is neither approved nor waiting to pair",
                user.escape_default()
            ),
        ));
    }
    Ok(Json(json!({"object": "list", "data": removed})).into_response())
}
