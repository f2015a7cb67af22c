//! `POST /v1/chat/completions` (plain and `stream: true`) and `GET /v1/models`.
//!
//! Without `X-Hermes-Session-Id` the client's messages go to the agent as they are. With
//! it, the session's stored history is prepended, and the turn (the client's messages and
//! the reply) is stored before the reply is sent.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use super::{SESSION_HEADER, Shared, busy, parse_json, read_body, sse, valid_session_id};
use crate::gateway::error::ApiError;
use crate::gateway::ids::new_id;
use crate::gateway::sessions::{Turn, TurnError, TurnKind};

const ROLES: &[&str] = &[
    "system",
    "developer",
    "user",
    "assistant",
    "tool",
    "function",
];

#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    #[serde(flatten)]
    params: Map<String, Value>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Content,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// A message's content: text, an array of parts, or absent (a tool-calling assistant turn).
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
    #[default]
    Null,
}

impl Message {
    fn into_value(self) -> Value {
        let mut m = self.rest;
        m.insert("role".into(), Value::String(self.role));
        m.insert(
            "content".into(),
            match self.content {
                Content::Text(t) => Value::String(t),
                Content::Parts(p) => Value::Array(p),
                Content::Null => Value::Null,
            },
        );
        Value::Object(m)
    }
}

/// A chat completion, serialized straight from these borrowed fields (a `json!` value
/// would build a map of owned strings first).
#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize, Default)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

/// `application/json` from a `Vec` (axum's `Json` writes through a `BytesMut` writer, which
/// costs more per small write than the serialization itself).
fn json_response<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(body) => (
            [(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => ApiError::internal(format!("cannot encode the reply: {e}")).into_response(),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{
            "id": s.model(),
            "object": "model",
            "created": 0,
            "owned_by": "hermes-gateway",
        }],
    }))
}

fn bad_request(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

pub async fn completions(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    match completions_inner(s, headers, body).await {
        Ok(r) => r,
        Err(e) => e,
    }
}

fn turn_error(e: &TurnError) -> ApiError {
    match e {
        TurnError::Agent(a) => ApiError::new(
            a.http_status(),
            if a.http_status() == StatusCode::GATEWAY_TIMEOUT {
                "timeout_error"
            } else {
                "upstream_error"
            },
            a.to_string(),
        ),
        TurnError::Store(m) => ApiError::internal(format!("cannot store the turn: {m}")),
    }
}

async fn completions_inner(
    s: Shared,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, Response> {
    let bytes = read_body(&s, &headers, body)
        .await
        .map_err(IntoResponse::into_response)?;
    let req: ChatRequest = parse_json(&bytes).map_err(IntoResponse::into_response)?;
    if req.messages.is_empty() {
        return Err(
            bad_request("invalid field `messages`: must not be empty".into()).into_response(),
        );
    }
    for (i, m) in req.messages.iter().enumerate() {
        if !ROLES.contains(&m.role.as_str()) {
            return Err(bad_request(format!(
                "invalid field `messages[{i}].role`: `{}` is not one of {}",
                m.role.escape_default(),
                ROLES.join(", ")
            ))
            .into_response());
        }
        // Only an assistant turn (one that calls tools) may come without content.
        if m.role == "user" && matches!(m.content, Content::Null) {
            return Err(bad_request(format!(
                "invalid field `messages[{i}].content`: a user message needs content, a string or an array of parts"
            ))
            .into_response());
        }
    }
    let session_id = match headers.get(SESSION_HEADER) {
        None => None,
        Some(v) => {
            let id = v.to_str().map_err(|_| {
                bad_request(format!("header `{SESSION_HEADER}` is not printable ASCII"))
                    .into_response()
            })?;
            valid_session_id(id).map_err(|m| {
                bad_request(format!("header `{SESSION_HEADER}`: {m}")).into_response()
            })?;
            Some(id.to_owned())
        }
    };
    let model = req.model.clone().unwrap_or_else(|| s.model());
    let id = new_id("chatcmpl-");
    let stream = req.stream;
    let mut params = req.params;
    // Options the gateway handles itself are not passed upstream.
    params.remove("stream_options");
    let messages: Vec<Value> = req.messages.into_iter().map(Message::into_value).collect();

    let (done_tx, done_rx) = oneshot::channel();
    let created = unix_now();
    // The reply's pieces as they come, for a client that streams.
    let (dtx, drx) = if stream {
        let (tx, rx) = mpsc::unbounded_channel::<String>();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    let turn = Turn {
        run_id: id.clone(),
        session_id,
        messages,
        model: model.clone(),
        params,
        stream,
        kind: TurnKind::Chat {
            deltas: dtx,
            done: done_tx,
        },
    };
    let Some(mut drx) = drx else {
        // Nothing to send before the reply: an idle session's turn runs on this task.
        s.sessions.run_here(turn).await.map_err(|b| busy(&b))?;
        let result = done_rx
            .await
            .map_err(|_| ApiError::internal("the turn was dropped").into_response())?;
        let reply = result.map_err(|e| turn_error(&e).into_response())?;
        return Ok(json_response(&Completion {
            id: &id,
            object: "chat.completion",
            created,
            model: &model,
            choices: [Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &reply,
                },
                finish_reason: "stop",
            }],
            usage: Usage::default(),
        }));
    };

    // Streamed: the turn runs on a task of its own while the pieces are sent on.
    s.sessions.submit(turn).map_err(|b| busy(&b))?;
    let (tx, response) = sse::response();
    let shutdown = s.shutdown.clone();
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Value| {
            json!({
                "id": id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })
            .to_string()
        };
        if tx
            .send(sse::event(
                None,
                None,
                &chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            ))
            .await
            .is_err()
        {
            return;
        }
        let notice = sse::restart_notice(shutdown);
        tokio::pin!(notice);
        let mut done_rx = done_rx;
        loop {
            tokio::select! {
                biased;
                d = drx.recv() => match d {
                    Some(d) => {
                        if tx.send(sse::event(None, None, &chunk(json!({"content": d}), Value::Null))).await.is_err() {
                            return;
                        }
                    }
                    // The turn ended: its result follows on `done_rx`.
                    None => break,
                },
                () = &mut notice => {
                    let _ = tx.send(sse::restarting_event()).await;
                    return;
                }
                // The client went away: dropping `done_rx` abandons the turn.
                () = tx.closed() => return,
            }
        }
        let result = tokio::select! {
            r = &mut done_rx => r,
            () = &mut notice => {
                let _ = tx.send(sse::restarting_event()).await;
                return;
            }
            () = tx.closed() => return,
        };
        let last = match result {
            Ok(Ok(_)) => vec![
                sse::event(None, None, &chunk(json!({}), Value::from("stop"))),
                sse::event(None, None, "[DONE]"),
            ],
            Ok(Err(e)) => vec![sse::event(None, None, &turn_error(&e).body().to_string())],
            Err(_) => vec![sse::event(
                None,
                None,
                &ApiError::internal("the turn was dropped")
                    .body()
                    .to_string(),
            )],
        };
        for b in last {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    });
    Ok(response)
}
