//! The OpenAI Responses API: `POST /v1/responses` (plain, or `stream: true` with OpenAI's
//! event sequence), `GET` and `DELETE /v1/responses/{id}`,
//! `GET /v1/responses/{id}/input_items`.
//!
//! A response's turn is a chat turn of a session, run by the same scheduler and stored by
//! the same append: `conversation: "name"` is the session `name`; a response without
//! `conversation` or `previous_response_id` starts a session named after its own id; one
//! with `previous_response_id` continues that response's session, when that response is
//! still the session's last turn, or else a new session that starts with the
//! conversation as it was at that response (a branch). The stored row (written in the
//! commit of the turn's messages) says which session and how many of its messages it ends
//! at. `store: false` keeps nothing: the turn is given its history and leaves no trace.
//! Stored responses are pruned after `[api] response_retention`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use super::chat::{bad_request, session_header, turn_error};
use super::{
    SESSION_HEADER, SESSION_KEY_HEADER, Shared, busy, parse_json, read_body, sse, store_error,
    valid_session_id,
};
use crate::gateway::agents::Reply;
use crate::gateway::error::ApiError;
use crate::gateway::ids::new_id;
use crate::gateway::sessions::{self, Piece, Record, Turn, TurnError, TurnKind};
use crate::store::responses::{self, ResponseRow};
use crate::store::{self, Store};

mod wire;

use wire::{Events, JsonStr, OutputMessage, Part, UsageOut, View};

#[derive(Deserialize)]
struct CreateResponse {
    input: Input,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    instructions: Option<String>,
    #[serde(default)]
    previous_response_id: Option<String>,
    #[serde(default)]
    conversation: Option<Conversation>,
    #[serde(default)]
    store: Option<bool>,
    #[serde(default)]
    metadata: Option<Map<String, Value>>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    max_output_tokens: Option<u64>,
    // Everything else OpenAI defines (tools, reasoning, text, …) is accepted, not used.
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Items(Vec<InputItem>),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum InputItem {
    Text(String),
    Message(MessageItem),
}

#[derive(Deserialize)]
struct MessageItem {
    #[serde(default, rename = "type")]
    kind: Option<String>,
    role: String,
    content: ItemContent,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ItemContent {
    Text(String),
    Parts(Vec<Value>),
}

/// `"name"` or `{"id": "name"}`.
#[derive(Deserialize)]
#[serde(untagged)]
enum Conversation {
    Name(String),
    Object { id: String },
}

const ROLES: &[&str] = &["user", "assistant", "system", "developer"];

/// Where recent responses' turns ended, and each session's last end, in memory: a turn
/// that continues a recent response needs no read. The store stays the truth; entries
/// may be dropped at any time (two generations, as the sessions' history cache).
#[derive(Default)]
pub struct Index {
    inner: Mutex<Gens>,
}

#[derive(Default)]
struct Gens {
    young: Gen,
    old: Gen,
}

#[derive(Default)]
struct Gen {
    /// response id → (session, session_end)
    ends: HashMap<String, (String, i64)>,
    /// session → its last response's session_end
    heads: HashMap<String, i64>,
}

const INDEX_ENTRIES: usize = 16_384;

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Gens> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn put(&self, id: &str, session: &str, end: i64) {
        let mut g = self.lock();
        g.young
            .ends
            .insert(id.to_owned(), (session.to_owned(), end));
        g.young.heads.insert(session.to_owned(), end);
        if g.young.ends.len() + g.young.heads.len() > INDEX_ENTRIES {
            g.old = std::mem::take(&mut g.young);
        }
    }

    /// `(session, end, is_head)` of a response, when known here.
    fn get(&self, id: &str) -> Option<(String, i64, bool)> {
        let g = self.lock();
        let (session, end) = g
            .young
            .ends
            .get(id)
            .or_else(|| g.old.ends.get(id))
            .cloned()?;
        let head = g
            .young
            .heads
            .get(&session)
            .or_else(|| g.old.heads.get(&session))
            .copied()?;
        Some((session, end, head == end))
    }

    fn forget(&self, id: &str) {
        let mut g = self.lock();
        g.young.ends.remove(id);
        g.old.ends.remove(id);
    }
}

fn err(e: ApiError) -> Response {
    e.into_response()
}

/// The text of message content: a string, or its text parts joined; other parts kept.
fn chat_content(c: &ItemContent) -> Result<Value, String> {
    match c {
        ItemContent::Text(t) => Ok(Value::from(t.as_str())),
        ItemContent::Parts(parts) => {
            let mut text = String::new();
            let mut others = Vec::new();
            for (i, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        match p.get("text").and_then(Value::as_str) {
                            Some(t) => text.push_str(t),
                            None => return Err(format!("content[{i}].text: missing")),
                        }
                    }
                    Some("input_image") => others.push(json!({
                        "type": "image_url",
                        "image_url": {"url": p.get("image_url").cloned().unwrap_or(Value::Null)},
                    })),
                    Some(t) => return Err(format!("content[{i}].type: `{t}` is not supported")),
                    None => return Err(format!("content[{i}].type: missing")),
                }
            }
            if others.is_empty() {
                Ok(Value::from(text))
            } else {
                let mut v = vec![json!({"type": "text", "text": text})];
                v.extend(others);
                Ok(Value::Array(v))
            }
        }
    }
}

/// The request's input as chat messages.
fn input_messages(input: Input) -> Result<Vec<Value>, ApiError> {
    let items = match input {
        Input::Text(t) => return Ok(vec![json!({"role": "user", "content": t})]),
        Input::Items(items) => items,
    };
    if items.is_empty() {
        return Err(bad_request(
            "invalid field `input`: must not be empty".into(),
        ));
    }
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        match item {
            InputItem::Text(t) => out.push(json!({"role": "user", "content": t})),
            InputItem::Message(m) => {
                if let Some(k) = m.kind.as_deref()
                    && k != "message"
                {
                    return Err(bad_request(format!(
                        "invalid field `input[{i}].type`: `{}` is not supported (only messages)",
                        k.escape_default()
                    )));
                }
                if !ROLES.contains(&m.role.as_str()) {
                    return Err(bad_request(format!(
                        "invalid field `input[{i}].role`: `{}` is not one of {}",
                        m.role.escape_default(),
                        ROLES.join(", ")
                    )));
                }
                let content = chat_content(&m.content)
                    .map_err(|e| bad_request(format!("invalid field `input[{i}].{e}`")))?;
                out.push(json!({"role": m.role, "content": content}));
            }
        }
    }
    Ok(out)
}

/// The message item's id of a response.
fn message_id(response_id: &str) -> String {
    format!(
        "msg_{}",
        response_id.strip_prefix("resp_").unwrap_or(response_id)
    )
}

/// What a response object is made of, stored or not; [`Fields::view`] borrows from it.
struct Fields<'a> {
    id: &'a str,
    item_id: &'a str,
    created_at: i64,
    model: &'a str,
    previous_response_id: Option<&'a str>,
    conversation: Option<&'a str>,
    instructions: Option<&'a str>,
    metadata: Option<&'a Value>,
    store: bool,
}

impl<'a> Fields<'a> {
    fn view(
        &self,
        status: &'a str,
        text: Option<&'a Part<'a>>,
        usage: Option<UsageOut>,
        error: Option<&'a Value>,
    ) -> View<'a> {
        View {
            id: self.id,
            created_at: self.created_at,
            status,
            model: self.model,
            output: text.map(|t| OutputMessage {
                id: self.item_id,
                status: "completed",
                content: Some(t),
            }),
            usage,
            previous_response_id: self.previous_response_id,
            conversation: self.conversation,
            instructions: self.instructions,
            metadata: self.metadata,
            store: self.store,
            error,
        }
    }
}

/// A response object as a JSON response.
fn view_response(v: &View<'_>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        )],
        v.to_vec(),
    )
        .into_response()
}

fn usage_out(r: &Reply) -> Option<UsageOut> {
    r.usage.map(|u| UsageOut {
        input_tokens: u.prompt_tokens,
        output_tokens: u.completion_tokens,
        total_tokens: u.total_tokens,
    })
}

fn row_view(r: &ResponseRow) -> Response {
    let item_id = message_id(&r.id);
    let metadata = r
        .metadata
        .as_deref()
        .and_then(|m| serde_json::from_str(m).ok());
    let usage = r
        .usage
        .as_deref()
        .and_then(|u| serde_json::from_str::<Value>(u).ok())
        .map(|u| UsageOut {
            input_tokens: u["input_tokens"].as_u64().unwrap_or(0),
            output_tokens: u["output_tokens"].as_u64().unwrap_or(0),
            total_tokens: u["total_tokens"].as_u64().unwrap_or(0),
        });
    let text = JsonStr::new(&r.output);
    let part = Part { text: &text };
    let f = Fields {
        id: &r.id,
        item_id: &item_id,
        created_at: r.created_at / 1000,
        model: &r.model,
        previous_response_id: r.previous_response_id.as_deref(),
        conversation: r.conversation.as_deref(),
        instructions: r.instructions.as_deref(),
        metadata: metadata.as_ref(),
        store: true,
    };
    view_response(&f.view("completed", Some(&part), usage, None))
}

/// Where a new response's turn goes: its session (`None`: nothing is stored), the
/// messages that start it (a branch's copied history), and the history given to the
/// agent without being stored (`store: false`).
struct Placement {
    session: Option<String>,
    prefix: Vec<Value>,
}

fn parse_rows(rows: Vec<String>) -> Vec<Value> {
    rows.iter()
        .filter_map(|r| serde_json::from_str(r).ok())
        .collect()
}

/// The conversation of `session` as it was at `end` messages (the last `limit`).
async fn history_at(
    store: &Store,
    session: String,
    end: i64,
    limit: u32,
) -> Result<Vec<Value>, Response> {
    store
        .read(move |c| store::sessions::history_until(c, &session, end, limit))
        .await
        .map(parse_rows)
        .map_err(store_error)
}

async fn place(
    s: &Shared,
    id: &str,
    previous: Option<&str>,
    conversation: Option<&str>,
    keep: bool,
) -> Result<Placement, Response> {
    let store = s.sessions.store();
    let limit = s.sessions.limits().history_limit;
    if let Some(c) = conversation {
        if keep {
            return Ok(Placement {
                session: Some(c.to_owned()),
                prefix: Vec::new(),
            });
        }
        let c = c.to_owned();
        let rows = store
            .read(move |conn| store::sessions::history(conn, &c, limit))
            .await
            .map_err(store_error)?;
        return Ok(Placement {
            session: None,
            prefix: parse_rows(rows),
        });
    }
    let Some(p) = previous else {
        return Ok(Placement {
            session: keep.then(|| id.to_owned()),
            prefix: Vec::new(),
        });
    };
    let (session, end, head) = match s.responses.get(p) {
        Some(found) => found,
        None => {
            let pid = p.to_owned();
            let found = store
                .read(move |c| {
                    let Some(row) = responses::get(c, &pid)? else {
                        return Ok(None);
                    };
                    let held = store::sessions::get(c, &row.session_id)?.map_or(0, |r| r.messages);
                    Ok(Some((row.session_id, row.session_end, held)))
                })
                .await
                .map_err(store_error)?;
            match found {
                Some((session, end, held)) => (session, end, held == end),
                None => {
                    return Err(err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "invalid_request_error",
                        format!("previous response `{}` not found", p.escape_default()),
                    )
                    .with_code("previous_response_not_found")));
                }
            }
        }
    };
    if head && keep {
        return Ok(Placement {
            session: Some(session),
            prefix: Vec::new(),
        });
    }
    let prefix = history_at(store, session, end, limit).await?;
    Ok(Placement {
        session: keep.then(|| id.to_owned()),
        prefix,
    })
}

pub async fn create(State(s): State<Shared>, headers: HeaderMap, body: Body) -> Response {
    match create_inner(s, headers, body).await {
        Ok(r) | Err(r) => r,
    }
}

async fn create_inner(s: Shared, headers: HeaderMap, body: Body) -> Result<Response, Response> {
    let bytes = read_body(&s, &headers, body).await.map_err(err)?;
    let req: CreateResponse = parse_json(&bytes).map_err(err)?;
    let session_key = session_header(&headers, SESSION_KEY_HEADER).map_err(err)?;
    let conversation = req.conversation.map(|c| match c {
        Conversation::Name(n) | Conversation::Object { id: n } => n,
    });
    if conversation.is_some() && req.previous_response_id.is_some() {
        return Err(err(bad_request(
            "`conversation` and `previous_response_id` cannot be used together".into(),
        )));
    }
    if let Some(c) = &conversation {
        valid_session_id(c)
            .map_err(|m| err(bad_request(format!("invalid field `conversation`: {m}"))))?;
    }
    if let Some(p) = &req.previous_response_id
        && (p.is_empty() || p.len() > 256)
    {
        return Err(err(bad_request(
            "invalid field `previous_response_id`: must be 1 to 256 characters".into(),
        )));
    }
    if let Some(m) = &req.metadata
        && (m.len() > 16 || m.values().any(|v| !v.is_string()))
    {
        return Err(err(bad_request(
            "invalid field `metadata`: at most 16 string values".into(),
        )));
    }
    let messages = input_messages(req.input).map_err(err)?;
    let keep = req.store.unwrap_or(true);
    let id = new_id("resp_");
    let model = req.model.unwrap_or_else(|| s.model());
    let placement = place(
        &s,
        &id,
        req.previous_response_id.as_deref(),
        conversation.as_deref(),
        keep,
    )
    .await?;
    let mut params = Map::new();
    if let Some(t) = req.temperature {
        params.insert("temperature".into(), Value::from(t));
    }
    if let Some(t) = req.top_p {
        params.insert("top_p".into(), Value::from(t));
    }
    if let Some(t) = req.max_output_tokens {
        params.insert("max_tokens".into(), Value::from(t));
    }
    let created_at = store::now_ms();
    let metadata = req.metadata.map(Value::Object);
    let input_json = serde_json::to_string(&messages).unwrap_or_else(|_| "[]".into());
    // Where the stored turn ended, once its commit is done: for the index.
    let stored_end = Arc::new(AtomicI64::new(-1));
    let record: Option<Record> = match &placement.session {
        Some(session) => {
            let row = ResponseRow {
                id: id.clone(),
                session_id: session.clone(),
                session_end: 0,
                previous_response_id: req.previous_response_id.clone(),
                conversation: conversation.clone(),
                model: model.clone(),
                instructions: req.instructions.clone(),
                input: input_json,
                output: String::new(),
                usage: None,
                metadata: metadata.as_ref().map(crate::gateway::json_text),
                created_at,
            };
            let stored_end = stored_end.clone();
            Some(Box::new(move |c, reply: &Reply, end| {
                let row = ResponseRow {
                    session_end: end,
                    // The commit's time: rows go in in this order (see the pruning).
                    created_at: store::now_ms(),
                    output: reply.text.clone(),
                    usage: usage_out(reply).and_then(|u| serde_json::to_string(&u).ok()),
                    ..row
                };
                responses::insert(c, &row)?;
                stored_end.store(end, Ordering::Relaxed);
                Ok(())
            }))
        }
        None => None,
    };
    let mut turn_messages = placement.prefix;
    turn_messages.extend(messages);
    let (done_tx, done_rx) = oneshot::channel();
    let (dtx, drx) = sessions::pieces(req.stream);
    let turn = Turn {
        run_id: id.clone(),
        session_id: placement.session.clone(),
        session_key: session_key.clone(),
        instructions: req.instructions.clone(),
        messages: turn_messages,
        model: model.clone(),
        params,
        stream: req.stream,
        kind: TurnKind::Chat {
            deltas: dtx,
            done: done_tx,
            record,
        },
    };
    let meta = Meta {
        item_id: message_id(&id),
        id,
        created_at: created_at / 1000,
        model,
        previous_response_id: req.previous_response_id,
        conversation,
        instructions: req.instructions,
        metadata,
        store: keep,
        placed: placement
            .session
            .clone()
            .map(|session| (s.clone(), session, stored_end)),
    };
    let echo = |r: &mut Response| {
        for (name, v) in [
            (SESSION_HEADER, &placement.session),
            (SESSION_KEY_HEADER, &session_key),
        ] {
            if let Some(v) = v
                && let Ok(v) = http::HeaderValue::from_str(v)
            {
                r.headers_mut().insert(name, v);
            }
        }
    };
    let Some(drx) = drx else {
        s.sessions.run_here(turn).await.map_err(|b| busy(&b))?;
        let result = done_rx
            .await
            .map_err(|_| err(ApiError::internal("the turn was dropped")))?;
        let reply = result.map_err(|e| err(turn_error(&e)))?;
        meta.index();
        let text = JsonStr::new(&reply.text);
        let part = Part { text: &text };
        let mut r = view_response(&meta.fields().view(
            "completed",
            Some(&part),
            usage_out(&reply),
            None,
        ));
        echo(&mut r);
        return Ok(r);
    };
    // The turn runs within the stream's body, on the connection's task (no task, channel
    // or wake-up of its own when its session is idle), once the limits said it would be
    // accepted.
    s.sessions
        .check(placement.session.as_deref())
        .map_err(|b| busy(&b))?;
    let sessions = s.sessions.clone();
    let (shutdown, keepalive) = (s.shutdown.clone(), s.keepalive());
    let feed = move |tx| async move {
        let stream = stream_response(meta, tx, drx, done_rx, shutdown, keepalive);
        // Refused after all (the limits changed since the check): the stream says so,
        // its answer having been dropped.
        let _ = tokio::join!(sessions.run_here(turn), stream);
    };
    // The stream sends its first piece within HOLD; the head waits for it. The bound is
    // only a safety net: a near timer costs a wake-up of the runtime's timer, a far one
    // nothing.
    let mut response = sse::primed(feed, PRIMED_AT_MOST).await;
    echo(&mut response);
    Ok(response)
}

/// What the response object repeats in every event.
struct Meta {
    id: String,
    item_id: String,
    created_at: i64,
    model: String,
    previous_response_id: Option<String>,
    conversation: Option<String>,
    instructions: Option<String>,
    metadata: Option<Value>,
    store: bool,
    /// Where a stored response went: remembered in the index once it is committed.
    placed: Option<(Shared, String, Arc<AtomicI64>)>,
}

impl Meta {
    /// After the turn's commit: the response is known to the index, as its session's last.
    fn index(&self) {
        if let Some((s, session, end)) = &self.placed {
            let end = end.load(Ordering::Relaxed);
            if end >= 0 {
                s.responses.put(&self.id, session, end);
            }
        }
    }

    fn fields(&self) -> Fields<'_> {
        Fields {
            id: &self.id,
            item_id: &self.item_id,
            created_at: self.created_at,
            model: &self.model,
            previous_response_id: self.previous_response_id.as_deref(),
            conversation: self.conversation.as_deref(),
            instructions: self.instructions.as_deref(),
            metadata: self.metadata.as_ref(),
            store: self.store,
        }
    }
}

/// How long a streamed response's opening events wait for the rest of a quick turn.
/// Below what a person or a client notices, and far below a model's first token.
const HOLD: Duration = Duration::from_millis(5);

/// The longest a streamed response's head waits for its first piece (which comes within
/// HOLD).
const PRIMED_AT_MOST: Duration = Duration::from_secs(1);

/// OpenAI's event sequence for one streamed response: created, in_progress, the message
/// item and its text part opened, text deltas, then everything closed and `completed`;
/// `response.failed` when the agent fails; an `error` event when the gateway stops first.
/// A `: keepalive` comment after each `[api] keepalive` of silence. The events written
/// in the first HOLD go out together (with the head, see `sse::primed`): a turn done by
/// then is one write.
async fn stream_response(
    meta: Meta,
    tx: mpsc::Sender<Bytes>,
    mut drx: mpsc::UnboundedReceiver<Piece>,
    mut done_rx: oneshot::Receiver<Result<Reply, TurnError>>,
    shutdown: crate::lifecycle::Shutdown,
    keepalive: Duration,
) {
    let mut ev = Events::new();
    let f = meta.fields();
    let item_id = f.item_id;
    // The same object twice: written once.
    let pending = ev.response("response.created", &f.view("in_progress", None, None, None));
    ev.response_again("response.in_progress", pending);
    ev.item(
        "response.output_item.added",
        &OutputMessage {
            id: item_id,
            status: "in_progress",
            content: None,
        },
    );
    let empty = JsonStr::new("");
    ev.part(
        "response.content_part.added",
        item_id,
        &Part { text: &empty },
    );
    // The opening events wait, up to HOLD, for what follows: a quick turn's whole stream
    // then goes out in one write (one wake-up of the client instead of two or three).
    let mut held = true;
    let notice = sse::restart_notice(shutdown);
    tokio::pin!(notice);
    let mut idle = sse::Idle::first_after(HOLD.min(keepalive), keepalive);
    let mut pieces_open = true;
    let result = loop {
        let out = tokio::select! {
            biased;
            d = drx.recv(), if pieces_open => match d {
                Some(Piece::Text(t)) => {
                    ev.delta(item_id, &t);
                    if held {
                        continue;
                    }
                    Bytes::from(ev.take())
                }
                // Reasoning and upstream events have no place in this stream.
                Some(_) => continue,
                None => {
                    pieces_open = false;
                    continue;
                }
            },
            r = &mut done_rx, if !pieces_open => break r,
            () = &mut notice => {
                let e = sse::restarting_error();
                let message = e.get("message").and_then(Value::as_str).unwrap_or("");
                ev.error("gateway_restarting", message);
                let _ = tx.send(Bytes::from(ev.take())).await;
                return;
            }
            () = idle.elapsed() => {
                if held {
                    // The turn takes longer: what is held goes out now.
                    held = false;
                    Bytes::from(ev.take())
                } else {
                    sse::keepalive_comment()
                }
            }
            () = tx.closed() => return,
        };
        if tx.send(out).await.is_err() {
            return;
        }
        idle.reset();
    };
    match result {
        Ok(Ok(reply)) => {
            meta.index();
            let text = JsonStr::new(&reply.text);
            let part = Part { text: &text };
            ev.text_done(item_id, &text);
            ev.part("response.content_part.done", item_id, &part);
            let done = f.view("completed", Some(&part), usage_out(&reply), None);
            if let Some(item) = &done.output {
                ev.item("response.output_item.done", item);
            }
            ev.response("response.completed", &done);
        }
        Ok(Err(e)) => {
            let e = turn_error(&e);
            let error = json!({"code": e.code.unwrap_or("agent_error"), "message": e.message});
            let failed = f.view("failed", None, None, Some(&error));
            ev.response("response.failed", &failed);
        }
        Err(_) => {
            let error = json!({"code": "server_error", "message": "the turn was dropped"});
            let failed = f.view("failed", None, None, Some(&error));
            ev.response("response.failed", &failed);
        }
    }
    // The closing events go out as one piece.
    let _ = tx.send(Bytes::from(ev.take())).await;
}

async fn load(s: &Shared, id: &str) -> Result<ResponseRow, Response> {
    let rid = id.to_owned();
    s.sessions
        .store()
        .read(move |c| responses::get(c, &rid))
        .await
        .map_err(store_error)?
        .ok_or_else(|| err(ApiError::not_found("response", id)))
}

pub async fn get(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    match load(&s, &id).await {
        Ok(r) => row_view(&r),
        Err(r) => r,
    }
}

pub async fn delete(State(s): State<Shared>, Path(id): Path<String>) -> Response {
    let rid = id.clone();
    match s
        .sessions
        .store()
        .write(move |c| responses::delete(c, &rid))
        .await
    {
        Err(e) => store_error(e),
        Ok(false) => err(ApiError::not_found("response", &id)),
        Ok(true) => {
            s.responses.forget(&id);
            Json(json!({"id": id, "object": "response.deleted", "deleted": true})).into_response()
        }
    }
}

#[derive(Deserialize)]
pub struct ItemsQuery {
    limit: Option<u32>,
    order: Option<String>,
    after: Option<String>,
}

/// The response's input items (as the request gave them, as messages), newest first
/// unless `order=asc`; `limit` (1–100, default 20) and `after` (an item id) page.
pub async fn input_items(
    State(s): State<Shared>,
    Path(id): Path<String>,
    q: Result<Query<ItemsQuery>, QueryRejection>,
) -> Response {
    let q = match q {
        Ok(Query(q)) => q,
        Err(e) => return err(bad_request(format!("invalid query: {}", e.body_text()))),
    };
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return err(bad_request("invalid query `limit`: 1 to 100".into()));
    }
    let asc = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(o) => {
            return err(bad_request(format!(
                "invalid query `order`: `{}` is not asc or desc",
                o.escape_default()
            )));
        }
    };
    let row = match load(&s, &id).await {
        Ok(r) => r,
        Err(r) => return r,
    };
    let messages: Vec<Value> = serde_json::from_str(&row.input).unwrap_or_default();
    let base = message_id(&row.id);
    let mut items: Vec<Value> = messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
            let kind = if role == "assistant" {
                "output_text"
            } else {
                "input_text"
            };
            let content = match m.get("content") {
                Some(Value::String(t)) => json!([{"type": kind, "text": t}]),
                Some(Value::Array(parts)) => Value::Array(
                    parts
                        .iter()
                        .map(|p| match p.get("type").and_then(Value::as_str) {
                            Some("text") => json!({"type": kind, "text": p.get("text")}),
                            Some("image_url") => json!({"type": "input_image",
                                "image_url": p.pointer("/image_url/url")}),
                            _ => p.clone(),
                        })
                        .collect(),
                ),
                _ => json!([]),
            };
            json!({"id": format!("{base}_in{i}"), "type": "message", "status": "completed",
                   "role": role, "content": content})
        })
        .collect();
    if !asc {
        items.reverse();
    }
    if let Some(after) = &q.after {
        match items.iter().position(|i| i["id"] == after.as_str()) {
            Some(p) => {
                items.drain(..=p);
            }
            None => {
                return err(bad_request(format!(
                    "invalid query `after`: no item `{}` in this response",
                    after.escape_default()
                )));
            }
        }
    }
    let has_more = items.len() > limit as usize;
    items.truncate(limit as usize);
    Json(json!({
        "object": "list",
        "first_id": items.first().map(|i| i["id"].clone()),
        "last_id": items.last().map(|i| i["id"].clone()),
        "has_more": has_more,
        "data": items,
    }))
    .into_response()
}

/// Prunes stored responses older than the retention: at start, then hourly.
pub fn spawn_pruner(s: Shared) {
    tokio::spawn(async move {
        loop {
            let retention = s.response_retention();
            let cutoff =
                store::now_ms() - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX / 2);
            match s
                .sessions
                .store()
                .write(move |c| responses::prune(c, cutoff))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!("{n} stored responses older than {retention:?} pruned"),
                Err(e) => tracing::error!("store: pruning responses failed: {e}"),
            }
            tokio::time::sleep(Duration::from_secs(3600).min(retention)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::Index;

    #[test]
    fn the_index_knows_a_response_and_whether_it_is_its_session_s_last() {
        let i = Index::default();
        assert!(i.get("a").is_none());
        i.put("a", "s", 2);
        assert_eq!(i.get("a"), Some(("s".into(), 2, true)));
        i.put("b", "s", 4);
        assert_eq!(i.get("a"), Some(("s".into(), 2, false)));
        assert_eq!(i.get("b"), Some(("s".into(), 4, true)));
        i.forget("b");
        assert!(i.get("b").is_none());
    }
}
