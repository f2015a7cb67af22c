//! `openai`: any OpenAI-compatible chat-completions server (the upstream hermes API
//! server, vLLM, llama.cpp, Ollama, a hosted API), over http:// or https:// (rustls).
//!
//! Only a request the upstream never accepted is retried (a failed connect): once it may
//! have started the turn, a retry could run it twice.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use serde_json::{Value, json};

use super::{Agent, AgentError, AgentFuture, DeltaSink, TurnInput};
use crate::config::{AgentConfig, OpenAiConfig, Secret};

/// Upstream error bodies are read up to this size for their message.
const ERROR_BODY_LIMIT: usize = 16 * 1024;

pub struct OpenAi {
    client: crate::gateway::http_client::Client,
    url: http::Uri,
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
        Ok(OpenAi {
            client,
            url,
            model: agent.model.clone(),
            key,
            idle_timeout: c.idle_timeout,
            retries: c.retries,
        })
    }

    fn request(&self, body: &Bytes) -> Result<http::Request<Full<Bytes>>, AgentError> {
        let mut b = http::Request::post(self.url.clone())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json, text/event-stream");
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
    async fn send(&self, body: Bytes) -> Result<http::Response<Incoming>, AgentError> {
        let mut attempt = 0u32;
        loop {
            let req = self.request(&body)?;
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
            let resp = self.send(Bytes::from(body)).await?;
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
                let reply = v
                    .pointer("/choices/0/message/content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                on_delta(&reply);
                return Ok(reply);
            }
            // Server-sent events: `data: {chunk}` lines until `data: [DONE]`.
            let mut reply = String::new();
            let mut pending: Vec<u8> = Vec::new();
            'read: while let Some(c) = self.next_chunk(&mut body).await? {
                pending.extend_from_slice(&c);
                while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = pending.drain(..=nl).collect();
                    let line = String::from_utf8_lossy(&line);
                    let Some(data) = line.trim_end().strip_prefix("data:") else {
                        continue;
                    };
                    let data = data.trim_start();
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
                    if let Some(d) = v
                        .pointer("/choices/0/delta/content")
                        .and_then(Value::as_str)
                        && !d.is_empty()
                    {
                        on_delta(d);
                        reply.push_str(d);
                    }
                }
            }
            Ok(reply)
        })
    }

    fn kind(&self) -> &'static str {
        "openai"
    }
}
