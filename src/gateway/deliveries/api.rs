//! `GET /v1/deliveries` and `POST /v1/deliveries/{id}/retry` (on the api listener, behind
//! its keys) and the same on the control socket (`/deliveries`, `/deliveries/{id}/retry`)
//! for `hermes-gateway deliveries list|retry`.

use crate::gateway::scrape::RouteExt;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::{DeliveryLedger, RetryOutcome};
use crate::gateway::error::ApiError;

const STATES: [&str; 5] = ["received", "pending", "attempting", "delivered", "failed"];

/// The routes under `prefix` (`/v1` on the api listener, empty on the control socket).
pub fn router(ledger: DeliveryLedger, prefix: &str) -> Router {
    Router::new()
        .route_tagged(&format!("{prefix}/deliveries"), get(list))
        .route_tagged(&format!("{prefix}/deliveries/{{id}}/retry"), post(retry))
        .with_state(ledger)
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    limit: Option<i64>,
}

async fn list(
    State(l): State<DeliveryLedger>,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = q.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            e.body_text(),
        )
    })?;
    if let Some(s) = &q.state
        && !STATES.contains(&s.as_str())
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!(
                "`state` must be one of {}, not `{}`",
                STATES.join(", "),
                s.escape_default()
            ),
        ));
    }
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    let rows = l.list(q.state, limit).await.map_err(ApiError::from)?;
    let counts = l.counts().await.map_err(ApiError::from)?;
    let counts: serde_json::Map<String, serde_json::Value> =
        counts.into_iter().map(|(k, v)| (k, v.into())).collect();
    Ok(Json(json!({"object": "list", "data": rows, "counts": counts})).into_response())
}

async fn retry(
    State(l): State<DeliveryLedger>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    match l
        .retry(&id)
        .await
        .map_err(ApiError::from)?
    {
        RetryOutcome::NotFound => Err(ApiError::not_found("delivery", &id)),
        RetryOutcome::InProgress(state) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!("delivery `{id}` is {state}: it is being worked on; retry a pending, failed or delivered one"),
        )
        .with_code("conflict")),
        RetryOutcome::Queued(row) => Ok((StatusCode::ACCEPTED, Json(row)).into_response()),
    }
}
