//! `GET /v1/sessions`, `GET /v1/sessions/{id}` (with its history), `DELETE /v1/sessions/{id}`.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Shared, store_error};
use crate::gateway::error::ApiError;
use crate::gateway::sessions::Deleted;
use crate::store;

#[derive(Deserialize)]
pub struct Page {
    limit: Option<u32>,
    offset: Option<u32>,
}

fn page(q: Result<Query<Page>, QueryRejection>) -> Result<Page, ApiError> {
    q.map(|Query(p)| p).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("invalid query: {}", e.body_text()),
        )
    })
}

pub async fn list(State(s): State<Shared>, q: Result<Query<Page>, QueryRejection>) -> Response {
    let p = match page(q) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let (limit, offset) = (p.limit.unwrap_or(100).clamp(1, 1000), p.offset.unwrap_or(0));
    // Logged sessions included: every turn answered before this request is counted.
    let listed = s
        .sessions
        .store()
        .read(move |c| store::sessions::list(c, limit, offset))
        .await;
    match listed {
        Err(e) => store_error(e),
        Ok(rows) => Json(json!({
            "object": "list",
            "data": rows.iter().map(|r| json!({
                "id": r.id,
                "object": "session",
                "created_at": r.created_at,
                "updated_at": r.updated_at,
                "messages": r.messages,
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
    }
}

pub async fn get(
    State(s): State<Shared>,
    Path(id): Path<String>,
    q: Result<Query<Page>, QueryRejection>,
) -> Response {
    let limit = match page(q) {
        Ok(p) => p.limit.unwrap_or(10_000).clamp(1, 100_000),
        Err(e) => return e.into_response(),
    };
    let sid = id.clone();
    let found = s
        .sessions
        .store()
        .read(move |c| {
            Ok(match store::sessions::get(c, &sid)? {
                None => None,
                Some(row) => Some((row, store::sessions::history(c, &sid, limit)?)),
            })
        })
        .await;
    match found {
        Err(e) => store_error(e),
        Ok(None) => ApiError::not_found("session", &id).into_response(),
        Ok(Some((row, history))) => Json(json!({
            "id": row.id,
            "object": "session",
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "busy": s.sessions.is_busy(&row.id),
            "messages": history
                .iter()
                .map(|m| serde_json::from_str::<Value>(m).unwrap_or(Value::Null))
                .collect::<Vec<_>>(),
        }))
        .into_response(),
    }
}

pub async fn delete(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match s.sessions.delete(&id).await {
        Err(e) => store_error(e),
        Ok(Deleted::Busy) => ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!(
                "session `{}` has a turn running; delete it once the turn ends",
                id.escape_default()
            ),
        )
        .into_response(),
        Ok(Deleted::Missing) => ApiError::not_found("session", &id).into_response(),
        Ok(Deleted::Deleted) => {
            tracing::info!(session_key = %id, "session deleted");
            Json(json!({"id": id, "object": "session.deleted", "deleted": true})).into_response()
        }
    }
}
