//! `openai`: any OpenAI-compatible chat-completions server (the upstream hermes API
//! server, vLLM, llama.cpp, Ollama, a hosted API), over http:// or https:// (rustls).
//!
//! Only a request the upstream never accepted is retried (a failed connect): once it may
//! have started the turn, a retry could run it twice.
//!
//! A turn's `X-Hermes-Session-Key` goes upstream as that header. Its session id does not:
//! an upstream hermes API server given `X-Hermes-Session-Id` would answer from its own copy
//! of the history instead of the one this gateway sends. From a streaming upstream,
//! `delta.reasoning_content` and named events (`event: hermes.tool.progress`) are handed
//! on as they come; `usage` and `finish_reason: "length"` are kept for the reply.
//!
//! A misbehaving upstream ends the turn with a clear error and nothing left behind (its
//! connection is dropped with the turn): the whole turn is bounded by `[agent] timeout`
//! (504), what it streams by `[agent] max_reply`, a line or an answer by a multiple of it;
//! a malformed stream (a `data:` that is not JSON, an endless line, an end before
//! `[DONE]` or a `finish_reason`) is a 502, and so is a reply that finishes with
//! `finish_reason: "error"`; an error body is read up to 16 KiB and its message cut; a
//! redirect is not followed (502 naming its `Location`).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use serde_json::{Value, json};

use super::sse::{Item, SseParser, StreamError, excerpt, usage};
use super::{Agent, AgentError, AgentFuture, Delta, DeltaSink, Reply, TurnInput};
use crate::config::{AgentConfig, OpenAiConfig, Secret};

/// Upstream error bodies are read up to this size for their message.
const ERROR_BODY_LIMIT: usize = 16 * 1024;
/// The longest error message of an upstream passed on, in characters.
const ERROR_MESSAGE_CHARS: usize = 500;
/// What an answer may hold beside its reply: the JSON around it, usage, ids.
const ENVELOPE: u64 = 64 * 1024;

pub struct OpenAi {
    client: crate::gateway::http_client::Client,
    url: http::Uri,
    models_url: Option<http::Uri>,
    model: String,
    key: Option<Secret>,
    idle_timeout: Duration,
    retries: u32,
    /// `[agent] timeout`: the whole turn.
    timeout: Duration,
    /// `[agent] max_reply`: the text, reasoning and events one turn streams.
    max_reply: u64,
}

impl OpenAi {
    pub fn new(c: &OpenAiConfig, agent: &AgentConfig) -> Result<Self, String> {
        let key = match &c.key {
            Some(src) => Some(Secret::new(src.read()?)),
            None => None,
        };
        let url: http::Uri = format!("{}/chat/completions", c.base_url)
            .parse()
            .map_err(|e| format!("[agent] base_url `{}`: {e}", c.base_url))?;
        let client = crate::gateway::http_client::build(c.connect_timeout);
        let models_url = format!("{}/models", c.base_url).parse().ok();
        Ok(OpenAi {
            client,
            url,
            models_url,
            model: agent.model.clone(),
            key,
            idle_timeout: c.idle_timeout,
            retries: c.retries,
            timeout: agent.timeout,
            max_reply: agent.max_reply,
        })
    }

    fn request(
        &self,
        body: &Bytes,
        session_key: Option<&str>,
    ) -> Result<http::Request<Full<Bytes>>, AgentError> {
        let mut b = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream");
        if let Some(k) = session_key
            && let Ok(v) = http::HeaderValue::from_str(k)
        {
            b = b.header("x-hermes-session-key", v);
        }
        if let Some(k) = &self.key {
            let mut v = http::HeaderValue::from_str(&format!("Bearer {}", k.expose()))
                .map_err(|_| AgentError::Failed("the upstream key is not a valid header".into()))?;
            v.set_sensitive(true);
            b = b.header(http::header::AUTHORIZATION, v);
        }
        b.body(Full::new(body.clone()))
            .map_err(|e| AgentError::Failed(format!("cannot build the request: {e}")))
    }

    /// Sends the request, retrying only connect failures; waits at most the idle timeout
    /// for the response head.
    async fn send(
        &self,
        body: Bytes,
        session_key: Option<&str>,
    ) -> Result<http::Response<Incoming>, AgentError> {
        let mut attempt = 0u32;
        loop {
            let req = self.request(&body, session_key)?;
            match tokio::time::timeout(self.idle_timeout, self.client.request(req)).await {
                Err(_) => {
                    return Err(AgentError::Timeout(format!(
                        "no answer from {} within {:?}",
                        self.url, self.idle_timeout
                    )));
                }
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(e)) if e.is_connect() && attempt < self.retries => {
                    attempt += 1;
                    let pause = Duration::from_millis(100 << attempt.min(6));
                    tracing::warn!(
                        "upstream {}: connect failed ({e}); retry {attempt}/{} in {pause:?}",
                        self.url,
                        self.retries
                    );
                    tokio::time::sleep(pause).await;
                }
                Ok(Err(e)) => {
                    let detail = std::error::Error::source(&e)
                        .map(|s| format!("{e}: {s}"))
                        .unwrap_or_else(|| e.to_string());
                    return Err(AgentError::Unreachable(format!("{}: {detail}", self.url)));
                }
            }
        }
    }

    /// The next body chunk, within the idle timeout; `None` at the end.
    async fn next_chunk(&self, body: &mut Incoming) -> Result<Option<Bytes>, AgentError> {
        loop {
            match tokio::time::timeout(self.idle_timeout, body.frame()).await {
                Err(_) => {
                    return Err(AgentError::Timeout(format!(
                        "the upstream sent nothing for {:?}",
                        self.idle_timeout
                    )));
                }
                Ok(None) => return Ok(None),
                Ok(Some(Err(e))) => {
                    return Err(AgentError::Unreachable(format!("reading the answer: {e}")));
                }
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

/// `error.message` of an OpenAI error body, or the start of the body; cut at
/// [`ERROR_MESSAGE_CHARS`], and said to go on when the body was not read whole.
fn error_message(body: &[u8], cut: bool) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let Some(m) = v.pointer("/error/message").and_then(Value::as_str)
    {
        return excerpt(m, ERROR_MESSAGE_CHARS);
    }
    let text = String::from_utf8_lossy(body);
    let t = text.trim();
    if t.is_empty() {
        return "(no body)".into();
    }
    let mut m = excerpt(t, ERROR_MESSAGE_CHARS);
    if cut {
        if !m.ends_with('…') {
            m.push('…');
        }
        m.push_str(&format!(
            " (a body of more than {} KiB, cut)",
            ERROR_BODY_LIMIT / 1024
        ));
    }
    m
}

/// What a stream hands on: to the turn's sink, and into the reply, within `max_reply`.
struct Collect<'a> {
    on_delta: DeltaSink<'a>,
    reply: Reply,
    /// Bytes of text, reasoning and events handed on so far.
    streamed: u64,
    max: u64,
    over: bool,
    /// `finish_reason: "error"`: the upstream says its reply failed.
    failed: bool,
}

impl Collect<'_> {
    fn take(&mut self, item: Item<'_>) {
        if self.over {
            return;
        }
        let len = match item {
            Item::Text(t) | Item::Reasoning(t) => t.len(),
            Item::Event { data, .. } => data.len(),
            _ => 0,
        };
        self.streamed = self.streamed.saturating_add(len as u64);
        if self.streamed > self.max {
            self.over = true;
            return;
        }
        match item {
            Item::Text(t) => {
                (self.on_delta)(Delta::Text(t));
                self.reply.text.push_str(t);
            }
            Item::Reasoning(t) => (self.on_delta)(Delta::Reasoning(t)),
            Item::Event { name, data } => (self.on_delta)(Delta::Event { name, data }),
            Item::Usage(u) => self.reply.usage = Some(u),
            Item::Finish(f) => {
                self.reply.truncated |= f == "length";
                self.failed |= f == "error";
            }
            Item::Done => {}
        }
    }
}

fn over_max_reply(max: u64) -> AgentError {
    AgentError::Failed(format!(
        "the upstream's reply went over {max} bytes ([agent] max_reply); its connection was closed"
    ))
}

impl OpenAi {
    /// One turn, without the overall timeout.
    async fn turn(&self, input: &TurnInput, on_delta: DeltaSink<'_>) -> Result<Reply, AgentError> {
        let mut payload = json!({
            "model": self.model,
            "messages": input.messages,
            "stream": input.stream,
        });
        if let Some(obj) = payload.as_object_mut() {
            for (k, v) in &input.params {
                obj.entry(k.clone()).or_insert_with(|| v.clone());
            }
        }
        let body = serde_json::to_vec(&payload)
            .map_err(|e| AgentError::Failed(format!("cannot encode the request: {e}")))?;
        let resp = self
            .send(Bytes::from(body), input.session_key.as_deref())
            .await?;
        let status = resp.status();
        if status.is_redirection() {
            // Not followed: the request (and its key) would go to another address.
            let message = match resp
                .headers()
                .get(http::header::LOCATION)
                .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned())
            {
                Some(l) => format!(
                    "it redirects to `{}`, which is not followed: set [agent] base_url to the address that answers",
                    excerpt(&l, 300)
                ),
                None => "a redirect without a Location, which is not followed".to_owned(),
            };
            return Err(AgentError::Upstream {
                status: status.as_u16(),
                message,
            });
        }
        let sse = match resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_start().to_ascii_lowercase())
        {
            Some(t) if t.starts_with("text/event-stream") => true,
            Some(t) if t.starts_with("application/json") => false,
            _ => input.stream,
        };
        let mut body = resp.into_body();
        if !status.is_success() {
            let (buf, cut) = self.read_error(&mut body).await;
            return Err(AgentError::Upstream {
                status: status.as_u16(),
                message: error_message(&buf, cut),
            });
        }
        // A line, or a whole answer, holds at most the reply escaped (`\uXXXX` for a
        // character of two or three bytes) and the JSON around it.
        let limit = self.max_reply.saturating_mul(4).saturating_add(ENVELOPE);
        let mut out = Collect {
            on_delta,
            reply: Reply::default(),
            streamed: 0,
            max: self.max_reply,
            over: false,
            failed: false,
        };
        if sse {
            self.read_stream(&mut body, limit, &mut out).await?;
        } else {
            self.read_json(&mut body, limit, &mut out).await?;
        }
        if out.failed {
            // As an upstream hermes API server ends a turn whose agent crashed: not a
            // reply to store.
            return Err(AgentError::Upstream {
                status: 502,
                message:
                    "the reply ended with finish_reason \"error\" (the upstream's agent failed)"
                        .into(),
            });
        }
        Ok(out.reply)
    }

    /// Up to [`ERROR_BODY_LIMIT`] bytes of an error body, and whether it went on.
    async fn read_error(&self, body: &mut Incoming) -> (Vec<u8>, bool) {
        let mut buf = Vec::new();
        while let Ok(Some(c)) = self.next_chunk(body).await {
            let room = ERROR_BODY_LIMIT - buf.len();
            if c.len() >= room {
                buf.extend_from_slice(&c[..room]);
                // More than the limit, or exactly it: the rest is not waited for.
                return (buf, true);
            }
            buf.extend_from_slice(&c);
        }
        (buf, false)
    }

    /// A whole chat completion (`stream: false`), read up to `limit` bytes.
    async fn read_json(
        &self,
        body: &mut Incoming,
        limit: u64,
        out: &mut Collect<'_>,
    ) -> Result<(), AgentError> {
        let mut buf = Vec::new();
        while let Some(c) = self.next_chunk(body).await? {
            if (buf.len() + c.len()) as u64 > limit {
                return Err(AgentError::Failed(format!(
                    "the upstream's answer went over {limit} bytes (4 × [agent] max_reply + 64 KiB); its connection was closed"
                )));
            }
            buf.extend_from_slice(&c);
        }
        let v: Value = serde_json::from_slice(&buf).map_err(|e| {
            AgentError::Failed(format!(
                "the upstream's answer is not JSON ({e}): `{}`",
                excerpt(&String::from_utf8_lossy(&buf[..buf.len().min(1024)]), 200)
            ))
        })?;
        if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
            return Err(AgentError::Upstream {
                status: 502,
                message: error_message(json!({ "error": e }).to_string().as_bytes(), false),
            });
        }
        let Some(message) = v.pointer("/choices/0/message").filter(|m| m.is_object()) else {
            return Err(AgentError::Failed(format!(
                "the upstream's answer has no choices[0].message: `{}`",
                excerpt(&v.to_string(), 200)
            )));
        };
        let text = message
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if let Some(u) = usage(&v) {
            out.take(Item::Usage(u));
        }
        if !text.is_empty() {
            out.take(Item::Text(text));
        }
        if let Some(f) = v
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
        {
            out.take(Item::Finish(f));
        }
        if out.over {
            return Err(over_max_reply(self.max_reply));
        }
        Ok(())
    }

    /// A streamed chat completion, until `[DONE]` (or its end after a `finish_reason`).
    async fn read_stream(
        &self,
        body: &mut Incoming,
        limit: u64,
        out: &mut Collect<'_>,
    ) -> Result<(), AgentError> {
        let mut parser = SseParser::new(usize::try_from(limit).unwrap_or(usize::MAX));
        loop {
            let chunk = self.next_chunk(body).await?;
            let r = match &chunk {
                Some(c) => parser.feed(c, &mut |i| out.take(i)),
                None => parser.finish(&mut |i| out.take(i)),
            };
            if out.over {
                return Err(over_max_reply(self.max_reply));
            }
            r.map_err(|e| match e {
                StreamError::Upstream(message) => AgentError::Upstream {
                    status: 502,
                    message,
                },
                e => AgentError::Failed(format!("the upstream's stream is malformed: {e}")),
            })?;
            if parser.is_done() {
                // The rest of the body is not read: the connection goes with it.
                return Ok(());
            }
            if chunk.is_none() {
                if parser.is_complete() {
                    return Ok(());
                }
                return Err(AgentError::Failed(
                    "the upstream's stream ended before its reply did (no finish_reason, no [DONE])"
                        .into(),
                ));
            }
        }
    }
}

impl Agent for OpenAi {
    fn run<'a>(&'a self, input: &'a TurnInput, on_delta: DeltaSink<'a>) -> AgentFuture<'a> {
        Box::pin(async move {
            // Dropping the turn drops its connection: nothing is left reading.
            match tokio::time::timeout(self.timeout, self.turn(input, on_delta)).await {
                Ok(r) => r,
                Err(_) => Err(AgentError::Timeout(format!(
                    "the upstream did not finish the turn within {:?} ([agent] timeout); its connection was closed",
                    self.timeout
                ))),
            }
        })
    }

    fn kind(&self) -> &'static str {
        "openai"
    }

    /// `GET {base_url}/models` answers 2xx within 5 s.
    fn check(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async move {
            let Some(url) = self.models_url.clone() else {
                return Err("[agent] base_url does not make a valid URL".into());
            };
            let mut b = http::Request::get(url.clone());
            if let Some(k) = &self.key {
                let mut v = http::HeaderValue::from_str(&format!("Bearer {}", k.expose()))
                    .map_err(|_| "the upstream key is not a valid header".to_owned())?;
                v.set_sensitive(true);
                b = b.header(http::header::AUTHORIZATION, v);
            }
            let req = b
                .body(Full::new(Bytes::new()))
                .map_err(|e| format!("cannot build the request: {e}"))?;
            match tokio::time::timeout(Duration::from_secs(5), self.client.request(req)).await {
                Err(_) => Err(format!("{url}: no answer within 5s")),
                Ok(Err(e)) => Err(format!("{url}: {e}")),
                Ok(Ok(r)) if r.status().is_success() => Ok(()),
                Ok(Ok(r)) => Err(format!("{url} answered {}", r.status())),
            }
        })
    }
}
