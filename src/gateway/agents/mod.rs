//! Agent backends: what runs one turn. Each takes the turn's messages and streams its reply
//! through `on_delta` (text, and from an upstream hermes API server its reasoning and tool
//! progress), returning the whole reply at the end.
//!
//! - `echo` (the default): the last user message's text.
//! - `openai`: any OpenAI-compatible chat-completions server (its stream read by `sse`).
//! - `command`: a program per turn, the turn as JSON on stdin, the reply from stdout.

mod command;
mod echo;
mod openai;
pub mod sse;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::config::{AgentBackend, AgentConfig};

/// One turn, as an agent sees it.
#[derive(Debug, Clone)]
pub struct TurnInput {
    pub session_id: Option<String>,
    /// The client's `X-Hermes-Session-Key` (a long-term memory scope), passed on as is.
    pub session_key: Option<String>,
    pub run_id: String,
    pub model: String,
    /// The whole conversation: stored history, then the turn's new messages. Shared with
    /// the session's history in memory, so a turn does not copy its conversation.
    pub messages: Vec<Arc<Value>>,
    /// Other chat-completion parameters from the client (temperature, max_tokens, …).
    pub params: Map<String, Value>,
    /// Whether the caller wants the reply as it is produced.
    pub stream: bool,
}

/// Why a turn failed; each maps to an HTTP status for the client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AgentError {
    #[error("the upstream answered {status}: {message}")]
    Upstream { status: u16, message: String },
    #[error("the upstream cannot be reached: {0}")]
    Unreachable(String),
    #[error("the agent timed out: {0}")]
    Timeout(String),
    #[error("the agent failed: {0}")]
    Failed(String),
}

impl AgentError {
    /// For metrics: `upstream`, `unreachable`, `timeout` or `failed`.
    pub fn kind(&self) -> &'static str {
        match self {
            AgentError::Upstream { .. } => "upstream",
            AgentError::Unreachable(_) => "unreachable",
            AgentError::Timeout(_) => "timeout",
            AgentError::Failed(_) => "failed",
        }
    }

    pub fn http_status(&self) -> http::StatusCode {
        match self {
            AgentError::Timeout(_) => http::StatusCode::GATEWAY_TIMEOUT,
            _ => http::StatusCode::BAD_GATEWAY,
        }
    }
}

/// A piece of a turn as it is produced.
#[derive(Debug, Clone, Copy)]
pub enum Delta<'a> {
    /// Reply text.
    Text(&'a str),
    /// Reasoning text (`delta.reasoning_content` upstream): streamed on, never stored.
    Reasoning(&'a str),
    /// A named SSE event of an upstream hermes API server (`hermes.tool.progress`), its
    /// data as JSON text: streamed on, never stored.
    Event { name: &'a str, data: &'a str },
}

/// Token counts, when the backend reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
}

/// A finished turn.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    pub text: String,
    pub usage: Option<Usage>,
    /// The backend stopped at its length limit (`finish_reason: "length"`).
    pub truncated: bool,
}

impl Reply {
    pub fn text(text: String) -> Self {
        Reply {
            text,
            ..Reply::default()
        }
    }
}

pub type DeltaSink<'a> = &'a mut (dyn FnMut(Delta<'_>) + Send);
pub type AgentFuture<'a> = Pin<Box<dyn Future<Output = Result<Reply, AgentError>> + Send + 'a>>;

/// What every backend offers.
pub trait Agent: Send + Sync + 'static {
    /// Runs one turn. Dropping the future cancels the turn (and kills what it started).
    fn run<'a>(&'a self, input: &'a TurnInput, on_delta: DeltaSink<'a>) -> AgentFuture<'a>;
    /// For logs and `STATUS=`: `echo`, `openai`, `command`.
    fn kind(&self) -> &'static str;
    /// For `GET /health/detailed`: whether the backend looks usable, or why not.
    fn check(&self) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }
}

/// Builds the configured backend. Reads the upstream key, if any (never logged).
pub fn build(config: &AgentConfig) -> Result<Arc<dyn Agent>, String> {
    Ok(match &config.backend {
        AgentBackend::Echo => Arc::new(echo::Echo),
        AgentBackend::OpenAi(o) => Arc::new(openai::OpenAi::new(o, config)?),
        AgentBackend::Command { argv } => Arc::new(command::CommandAgent::new(argv, config)),
    })
}

/// The text of a message's `content`: a string, or the `text` parts of an array.
pub fn content_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}
