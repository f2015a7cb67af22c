//! Durable runs: `POST /v1/runs` → 202 `{"run_id"}`, `GET /v1/runs/{id}`,
//! `GET /v1/runs/{id}/events` (SSE, from the first event), `POST /v1/runs/{id}/cancel`.
//!
//! `Idempotency-Key` is kept with the run: the same key with the same body answers the same
//! run; with another body, 409.

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Shared, busy, parse_json, read_body, sse, store_error, valid_session_id};
use crate::gateway::error::ApiError;
use crate::gateway::ids::new_id;
use crate::store::runs::{self, RunRow, RunStatus};
use crate::store::{self, StoreError};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRun {
    input: Input,
    #[serde(default)]
    session_id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    instructions: Option<String>,
}

/// A string (one user message) or a list of chat messages.
#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Messages(Vec<InputMessage>),
}

#[derive(Deserialize)]
struct InputMessage {
    role: String,
    content: Value,
}

fn bad_request(message: String) -> Response {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message).into_response()
}

fn view(r: &RunRow) -> Value {
    json!({
        "id": r.id,
        "run_id": r.id,
        "object": "run",
        "status": r.status.as_str(),
        "session_id": r.session_id,
        "model": r.model,
        "input": serde_json::from_str::<Value>(&r.input).unwrap_or(Value::Null),
        "output": r.output,
        "error": r.error,
        "attempt": r.attempt,
        "created_at": r.created_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
    })
}

pub async fn create(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    match create_inner(s, headers, body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn create_inner(s: Shared, headers: HeaderMap, body: Body) -> Result<Response, Response> {
    let bytes = read_body(&s, &headers, body)
        .await
        .map_err(IntoResponse::into_response)?;
    let req: CreateRun = parse_json(&bytes).map_err(IntoResponse::into_response)?;
    // The canonical body (keys sorted) tells a repeat from another request under one key.
    let canonical = serde_json::from_slice::<Value>(&bytes)
        .map(|v| crate::gateway::json_text(&v))
        .unwrap_or_default();
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => {
            let k = v
                .to_str()
                .ok()
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    bad_request(
                        "header `Idempotency-Key` must be 1 to 255 printable characters".into(),
                    )
                })?;
            Some(k.to_owned())
        }
    };
    if let Some(k) = &key
        && let Some(r) = existing(&s, k, &canonical).await?
    {
        return Ok(r);
    }
    if let Some(sid) = &req.session_id {
        valid_session_id(sid)
            .map_err(|m| bad_request(format!("invalid field `session_id`: {m}")))?;
    }
    let mut messages: Vec<Value> = Vec::new();
    if let Some(i) = &req.instructions {
        messages.push(json!({"role": "system", "content": i}));
    }
    match req.input {
        Input::Text(t) => messages.push(json!({"role": "user", "content": t})),
        Input::Messages(ms) => {
            if ms.is_empty() {
                return Err(bad_request(
                    "invalid field `input`: must not be empty".into(),
                ));
            }
            for m in ms {
                messages.push(json!({"role": m.role, "content": m.content}));
            }
        }
    }
    s.sessions
        .check(req.session_id.as_deref())
        .map_err(|b| busy(&b))?;
    let row = RunRow {
        id: new_id("run_"),
        session_id: req.session_id,
        status: RunStatus::Queued,
        model: req.model.unwrap_or_else(|| s.model()),
        input: crate::gateway::json_text(&Value::Array(messages.clone())),
        output: None,
        error: None,
        idempotency_key: key.clone(),
        request: key.as_ref().map(|_| canonical.clone()),
        attempt: 0,
        created_at: store::now_ms(),
        started_at: None,
        finished_at: None,
    };
    let id = row.id.clone();
    match s.sessions.create_run(row, messages).await {
        Ok(()) => Ok(accepted(&id, RunStatus::Queued)),
        // Another request with the same key won the race: answer as a repeat.
        Err(StoreError::Sqlite(e))
            if key.is_some()
                && e.sqlite_error_code() == Some(rusqlite::ErrorCode::ConstraintViolation) =>
        {
            let k = key.unwrap_or_default();
            existing(&s, &k, &canonical)
                .await?
                .ok_or_else(|| ApiError::internal("idempotency conflict").into_response())
        }
        Err(e) => Err(store_error(e)),
    }
}

fn accepted(id: &str, status: RunStatus) -> Response {
    let mut resp = (
        StatusCode::ACCEPTED,
        Json(json!({"run_id": id, "status": status.as_str()})),
    )
        .into_response();
    resp.extensions_mut()
        .insert(crate::lifecycle::serve::LogFields {
            session_key: None,
            run_id: Some(id.to_owned()),
        });
    resp
}

/// The run already created under `key`: the same answer again, or 409 for another body.
async fn existing(s: &Shared, key: &str, canonical: &str) -> Result<Option<Response>, Response> {
    let k = key.to_owned();
    let found = s
        .sessions
        .store()
        .read(move |c| runs::by_idempotency_key(c, &k))
        .await
        .map_err(store_error)?;
    let Some(run) = found else {
        return Ok(None);
    };
    if run.request.as_deref() != Some(canonical) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "invalid_request_error",
            format!(
                "Idempotency-Key `{}` was already used with another request body (run {})",
                key.escape_default(),
                run.id
            ),
        )
        .with_code("idempotency_key_reused")
        .into_response());
    }
    Ok(Some(accepted(&run.id, run.status)))
}

async fn load(s: &Shared, id: &str) -> Result<RunRow, Response> {
    let rid = id.to_owned();
    s.sessions
        .store()
        .read(move |c| runs::get(c, &rid))
        .await
        .map_err(store_error)?
        .ok_or_else(|| ApiError::not_found("run", id).into_response())
}

pub async fn get(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match load(&s, &id).await {
        Ok(r) => Json(view(&r)).into_response(),
        Err(r) => r,
    }
}

pub async fn cancel(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match s.sessions.cancel_run(&id).await {
        Err(e) => store_error(e),
        Ok(None) => ApiError::not_found("run", &id).into_response(),
        Ok(Some(_)) => match load(&s, &id).await {
            Ok(r) => Json(view(&r)).into_response(),
            Err(r) => r,
        },
    }
}

/// The run's events as SSE, from the first (or after `Last-Event-ID`), until it finishes.
pub async fn events(
    State(s): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let after: i64 = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    let live = s.sessions.runs().get(&id);
    let (tx, response) = sse::response();
    match live {
        Some(live) => {
            let shutdown = s.shutdown.clone();
            tokio::spawn(async move {
                let mut rx = live.subscribe();
                let notice = sse::restart_notice(shutdown);
                tokio::pin!(notice);
                let mut next = 0usize;
                loop {
                    rx.borrow_and_update();
                    let (evs, finished) = live.events_from(next);
                    next += evs.len();
                    for e in evs.iter().filter(|e| e.seq > after) {
                        if tx
                            .send(sse::event(Some(e.seq), Some(&e.kind), &e.data))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    if finished {
                        return;
                    }
                    tokio::select! {
                        biased;
                        r = rx.changed() => if r.is_err() { return },
                        () = &mut notice => {
                            let _ = tx.send(sse::restarting_event()).await;
                            return;
                        }
                    }
                }
            });
        }
        None => {
            // Not live: finished, or unknown. The store has every event of a finished run.
            let rid = id.clone();
            let found = s
                .sessions
                .store()
                .read(move |c| {
                    let run = runs::get(c, &rid)?;
                    Ok(match run {
                        Some(_) => Some(runs::events(c, &rid)?),
                        None => None,
                    })
                })
                .await;
            let evs = match found {
                Err(e) => return store_error(e),
                Ok(None) => return ApiError::not_found("run", &id).into_response(),
                Ok(Some(evs)) => evs,
            };
            tokio::spawn(async move {
                for e in evs.iter().filter(|e| e.seq > after) {
                    if tx
                        .send(sse::event(Some(e.seq), Some(&e.kind), &e.data))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    }
    response
}

/// Prunes finished `/v1/runs` runs past `[api] run_retention` (read anew each pass: a
/// reload applies), at start and then hourly (or each retention, when shorter), 500 a
/// commit so that a large backlog does not hold the writer.
pub fn spawn_pruner(s: Shared) {
    tokio::spawn(async move {
        loop {
            let retention = s.run_retention();
            let cutoff = crate::store::now_ms()
                - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 2);
            let mut pruned = 0;
            loop {
                let r = s
                    .sessions
                    .store()
                    .write(move |c| crate::store::runs::prune_finished(c, cutoff, 500))
                    .await;
                match r {
                    Ok(n) => {
                        pruned += n;
                        if n < 500 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::error!("store: pruning finished runs failed: {e}");
                        break;
                    }
                }
            }
            if pruned > 0 {
                tracing::info!("{pruned} finished runs older than {retention:?} pruned");
            }
            tokio::time::sleep(std::time::Duration::from_secs(3600).min(retention)).await;
        }
    });
}
