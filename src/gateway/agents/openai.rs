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

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use serde_json::{Value, json};

use super::{Agent, AgentError, AgentFuture, Delta, DeltaSink, Reply, TurnInput, Usage};
use crate::config::{AgentConfig, OpenAiConfig, Secret};

/// Upstream error bodies are read up to this size for their message.
const ERROR_BODY_LIMIT: usize = 16 * 1024;

pub struct OpenAi {
    client: crate::gateway::http_client::Client,
    url: http::Uri,
    models_url: Option<http::Uri>,
    model: String,
    key: Option<Secret>,
    idle_timeout: Duration,
    retries: u32,
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

/// `error.message` of an OpenAI error body, or the start of the body.
fn error_message(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body)
        && let Some(m) = v.pointer("/error/message").and_then(Value::as_str)
    {
        return m.to_owned();
    }
    let text = String::from_utf8_lossy(body);
    let t = text.trim();
    if t.is_empty() {
        "(no body)".into()
    } else {
        t.chars().take(300).collect()
    }
}

impl Agent for OpenAi {
    fn run<'a>(&'a self, input: &'a TurnInput, on_delta: DeltaSink<'a>) -> AgentFuture<'a> {
        Box::pin(async move {
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
            let mut body = resp.into_body();
            if !status.is_success() {
                let mut buf = Vec::new();
                while buf.len() < ERROR_BODY_LIMIT {
                    match self.next_chunk(&mut body).await {
                        Ok(Some(c)) => buf.extend_from_slice(&c),
                        _ => break,
                    }
                }
                return Err(AgentError::Upstream {
                    status: status.as_u16(),
                    message: error_message(&buf),
                });
            }
            if !input.stream {
                let mut buf = Vec::new();
                while let Some(c) = self.next_chunk(&mut body).await? {
                    buf.extend_from_slice(&c);
                }
                let v: Value = serde_json::from_slice(&buf).map_err(|e| {
                    AgentError::Failed(format!("the upstream's answer is not JSON: {e}"))
                })?;
                let text = v
                    .pointer("/choices/0/message/content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                on_delta(Delta::Text(&text));
                return Ok(Reply {
                    text,
                    usage: usage(&v),
                    truncated: v
                        .pointer("/choices/0/finish_reason")
                        .and_then(Value::as_str)
                        == Some("length"),
                });
            }
            // Server-sent events: `event:` and `data:` lines, a blank line ending each
            // event, until `data: [DONE]`.
            let mut reply = Reply::default();
            let mut pending: Vec<u8> = Vec::new();
            let mut event: Option<String> = None;
            'read: while let Some(c) = self.next_chunk(&mut body).await? {
                pending.extend_from_slice(&c);
                while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line);
                    let line = line.trim_end();
                    if line.is_empty() {
                        event = None;
                        continue;
                    }
                    if let Some(name) = line.strip_prefix("event:") {
                        event = Some(name.trim().to_owned());
                        continue;
                    }
                    let Some(data) = line.strip_prefix("data:") else {
                        continue;
                    };
                    let data = data.trim_start();
                    if let Some(name) = event.as_deref().filter(|n| *n != "message") {
                        // Only well-formed JSON goes on: it is written into our own stream.
                        if serde_json::from_str::<Value>(data).is_ok_and(|v| v.is_object()) {
                            on_delta(Delta::Event { name, data });
                        }
                        continue;
                    }
                    if data == "[DONE]" {
                        break 'read;
                    }
                    let Ok(v) = serde_json::from_str::<Value>(data) else {
                        continue;
                    };
                    if v.get("error").is_some() {
                        return Err(AgentError::Upstream {
                            status: 502,
                            message: error_message(data.as_bytes()),
                        });
                    }
                    if let Some(u) = usage(&v) {
                        reply.usage = Some(u);
                    }
                    let choice = v.pointer("/choices/0");
                    if let Some(d) = choice
                        .and_then(|c| c.pointer("/delta/reasoning_content"))
                        .and_then(Value::as_str)
                        && !d.is_empty()
                    {
                        on_delta(Delta::Reasoning(d));
                    }
                    if let Some(d) = choice
                        .and_then(|c| c.pointer("/delta/content"))
                        .and_then(Value::as_str)
                        && !d.is_empty()
                    {
                        on_delta(Delta::Text(d));
                        reply.text.push_str(d);
                    }
                    if choice
                        .and_then(|c| c.get("finish_reason"))
                        .and_then(Value::as_str)
                        == Some("length")
                    {
                        reply.truncated = true;
                    }
                }
            }
            Ok(reply)
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

/// `usage` of a completion or chunk, when it has one.
fn usage(v: &Value) -> Option<Usage> {
    let u = v.get("usage")?;
    let n = |k: &str| u.get(k).and_then(Value::as_u64);
    let (p, c) = (n("prompt_tokens")?, n("completion_tokens")?);
    Some(Usage {
        prompt_tokens: p,
        completion_tokens: c,
        total_tokens: n("total_tokens").unwrap_or(p + c),
    })
}
