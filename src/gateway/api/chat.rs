//! `POST /v1/chat/completions` (plain and `stream: true`) and `GET /v1/models`.
//!
//! Without `X-Hermes-Session-Id` the client's messages go to the agent as they are. With
//! it, the session's stored history is prepended, and the turn (the client's messages and
//! the reply) is stored before the reply is sent.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use super::{
    SESSION_HEADER, SESSION_KEY_HEADER, Shared, busy, parse_json, read_body, sse, valid_session_id,
};
use crate::gateway::agents::{Reply, Usage};
use crate::gateway::error::ApiError;
use crate::gateway::ids::new_id;
use crate::gateway::sessions::{self, Piece, Turn, TurnError, TurnKind};

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

/// `application/json` from a `Vec` (axum's `Json` writes through a `BytesMut` writer, which
/// costs more per small write than the serialization itself).
pub(super) fn json_response<T: Serialize>(v: &T) -> Response {
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

pub(super) fn bad_request(message: String) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

pub async fn completions(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    match completions_inner(s, headers, body).await {
        Ok(r) => r,
        Err(e) => e,
    }
}

pub(super) fn turn_error(e: &TurnError) -> ApiError {
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
        TurnError::Store(e) => ApiError::store(e),
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
    let session_id = session_header(&headers, SESSION_HEADER).map_err(|e| e.into_response())?;
    let session_key =
        session_header(&headers, SESSION_KEY_HEADER).map_err(|e| e.into_response())?;
    let model = req.model.clone().unwrap_or_else(|| s.model());
    let id = new_id("chatcmpl-");
    let stream = req.stream;
    let mut params = req.params;
    // Options the gateway handles itself are not passed upstream.
    let include_usage = params
        .remove("stream_options")
        .and_then(|o| o.get("include_usage").and_then(Value::as_bool))
        .unwrap_or(false);
    let messages: Vec<Value> = req.messages.into_iter().map(Message::into_value).collect();

    let (done_tx, done_rx) = oneshot::channel();
    let created = unix_now();
    // The reply's pieces as they come, for a client that streams.
    let (dtx, drx) = sessions::pieces(stream);
    let echo = SessionEcho {
        id: session_id.clone(),
        key: session_key.clone(),
    };
    let turn = Turn {
        run_id: id.clone(),
        session_id,
        session_key,
        instructions: None,
        messages,
        model: model.clone(),
        params,
        stream,
        kind: TurnKind::Chat {
            deltas: dtx,
            done: done_tx,
            record: None,
        },
    };
    let Some(drx) = drx else {
        // Nothing to send before the reply: an idle session's turn runs on this task.
        s.sessions.run_here(turn).await.map_err(|b| busy(&b))?;
        let result = done_rx
            .await
            .map_err(|_| ApiError::internal("the turn was dropped").into_response())?;
        let reply = result.map_err(|e| turn_error(&e).into_response())?;
        let mut r = json_response(&Completion {
            id: &id,
            object: "chat.completion",
            created,
            model: &model,
            choices: [Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &reply.text,
                },
                finish_reason: if reply.truncated { "length" } else { "stop" },
            }],
            usage: reply.usage.unwrap_or_default(),
        });
        echo.apply(&mut r);
        return Ok(r);
    };

    // Streamed: the turn runs on a task of its own while the pieces are sent on.
    s.sessions.submit(turn).map_err(|b| busy(&b))?;
    let (tx, mut response) = sse::response();
    echo.apply(&mut response);
    let shutdown = s.shutdown.clone();
    let keepalive = s.keepalive();
    tokio::spawn(stream_chat(
        ChatStream {
            id,
            created,
            model,
            include_usage,
        },
        tx,
        drx,
        done_rx,
        shutdown,
        keepalive,
    ));
    Ok(response)
}

/// The session headers a response echoes, as the upstream hermes API server does.
struct SessionEcho {
    id: Option<String>,
    key: Option<String>,
}

impl SessionEcho {
    fn apply(&self, r: &mut Response) {
        for (name, v) in [(SESSION_HEADER, &self.id), (SESSION_KEY_HEADER, &self.key)] {
            if let Some(v) = v
                && let Ok(v) = http::HeaderValue::from_str(v)
            {
                r.headers_mut().insert(name, v);
            }
        }
    }
}

/// What every chunk of one streamed completion repeats.
struct ChatStream {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
}

impl ChatStream {
    fn chunk(&self, delta: Value, finish: Option<&str>) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("id".into(), Value::from(self.id.as_str()));
        m.insert("object".into(), Value::from("chat.completion.chunk"));
        m.insert("created".into(), Value::from(self.created));
        m.insert("model".into(), Value::from(self.model.as_str()));
        m.insert(
            "choices".into(),
            json!([{"index": 0, "delta": delta, "finish_reason": finish}]),
        );
        m
    }

    fn event(&self, delta: Value) -> Bytes {
        sse::event(
            None,
            None,
            &crate::gateway::json_text(&Value::Object(self.chunk(delta, None))),
        )
    }

    /// The finish chunk of a turn that did not complete: its error, and the `hermes`
    /// object the upstream client reads (`error_code`: `agent_error`,
    /// `gateway_restarting`).
    fn failed(&self, error: Value, error_code: &str, partial: bool) -> Bytes {
        let mut m = self.chunk(json!({}), Some("error"));
        let message = error.get("message").cloned().unwrap_or(Value::Null);
        m.insert("error".into(), error);
        m.insert(
            "hermes".into(),
            json!({
                "completed": false,
                "failed": true,
                "partial": partial,
                "error": message,
                "error_code": error_code,
            }),
        );
        sse::event(None, None, &crate::gateway::json_text(&Value::Object(m)))
    }

    fn finished(&self, reply: &Reply) -> Bytes {
        let finish = if reply.truncated { "length" } else { "stop" };
        let mut m = self.chunk(json!({}), Some(finish));
        if self.include_usage {
            m.insert("usage".into(), json!(reply.usage.unwrap_or_default()));
        }
        if reply.truncated {
            m.insert(
                "hermes".into(),
                json!({
                    "completed": false,
                    "failed": false,
                    "partial": true,
                    "error": "the output was truncated at the length limit",
                    "error_code": "output_truncated",
                }),
            );
        }
        sse::event(None, None, &crate::gateway::json_text(&Value::Object(m)))
    }
}

/// Sends a streamed completion: a first chunk with the role alone, the pieces as they
/// come (a `: keepalive` comment after each `keepalive` of silence), then a finish chunk
/// (`stop`, `length`, or `error` with the `hermes` object) and `[DONE]`. A stream open
/// at the drain deadline ends the same way, with `error_code: "gateway_restarting"`.
async fn stream_chat(
    c: ChatStream,
    tx: mpsc::Sender<Bytes>,
    mut drx: mpsc::UnboundedReceiver<Piece>,
    mut done_rx: oneshot::Receiver<Result<Reply, TurnError>>,
    shutdown: crate::lifecycle::Shutdown,
    keepalive: std::time::Duration,
) {
    if tx
        .send(c.event(json!({"role": "assistant"})))
        .await
        .is_err()
    {
        return;
    }
    let notice = sse::restart_notice(shutdown);
    tokio::pin!(notice);
    let mut idle = sse::Idle::new(keepalive);
    // Whether any reply text went out (a failure is then `partial`).
    let mut partial = false;
    let mut pieces_open = true;
    let result = loop {
        let out = tokio::select! {
            biased;
            d = drx.recv(), if pieces_open => match d {
                Some(Piece::Text(t)) => {
                    partial = true;
                    c.event(json!({"content": t}))
                }
                Some(Piece::Reasoning(t)) => {
                    c.event(json!({"role": "assistant", "reasoning_content": t}))
                }
                Some(Piece::Event { name, data }) => sse::event(None, Some(&name), &data),
                // The turn ended: its result follows on `done_rx`.
                None => {
                    pieces_open = false;
                    continue;
                }
            },
            r = &mut done_rx, if !pieces_open => break r,
            () = &mut notice => {
                let _ = tx.send(c.failed(sse::restarting_error(), "gateway_restarting", partial)).await;
                let _ = tx.send(sse::event(None, None, "[DONE]")).await;
                return;
            }
            () = idle.elapsed() => sse::keepalive_comment(),
            // The client went away: dropping `done_rx` abandons the turn.
            () = tx.closed() => return,
        };
        if tx.send(out).await.is_err() {
            return;
        }
        idle.reset();
    };
    let last = match result {
        Ok(Ok(reply)) => c.finished(&reply),
        Ok(Err(e)) => {
            let e = turn_error(&e);
            let body = e.body();
            let error = body.get("error").cloned().unwrap_or(Value::Null);
            c.failed(error, e.code.unwrap_or("agent_error"), partial)
        }
        Err(_) => {
            let body = ApiError::internal("the turn was dropped").body();
            let error = body.get("error").cloned().unwrap_or(Value::Null);
            c.failed(error, "agent_error", partial)
        }
    };
    for b in [last, sse::event(None, None, "[DONE]")] {
        if tx.send(b).await.is_err() {
            return;
        }
    }
}

/// A session header's value: 1 to 256 visible ASCII characters, or absent.
pub(super) fn session_header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| bad_request(format!("header `{name}` is not printable ASCII")))?;
            valid_session_id(v).map_err(|m| bad_request(format!("header `{name}`: {m}")))?;
            Ok(Some(v.to_owned()))
        }
    }
}
