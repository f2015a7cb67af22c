//! The `[agent]`, `[api]` and `[sessions]` sections: what runs a turn, who may call the
//! API and how much work the gateway takes on at once.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::HumanDuration;

/// A value that must never reach a log: `Debug` and `Display` print `[redacted]`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret is read from when the gateway starts (and on SIGHUP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// An environment variable's value.
    Env(String),
    /// A file's content (one key per non-empty line for API keys).
    File(PathBuf),
    /// A systemd credential: `$CREDENTIALS_DIRECTORY/NAME`.
    Credential(String),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Env(v) => write!(f, "environment variable {v}"),
            KeySource::File(p) => write!(f, "file {}", p.display()),
            KeySource::Credential(n) => write!(f, "systemd credential {n}"),
        }
    }
}

impl KeySource {
    /// The secret's text, trimmed; errors name the source, never the value.
    pub fn read(&self) -> Result<String, String> {
        let text = match self {
            KeySource::Env(v) => std::env::var(v).map_err(|_| format!("{self} is not set"))?,
            KeySource::File(p) => {
                std::fs::read_to_string(p).map_err(|e| format!("cannot read {self}: {e}"))?
            }
            KeySource::Credential(n) => {
                let dir = std::env::var_os("CREDENTIALS_DIRECTORY").ok_or_else(|| {
                    format!("{self}: CREDENTIALS_DIRECTORY is not set (LoadCredential= in the unit provides it)")
                })?;
                let p = PathBuf::from(dir).join(n);
                std::fs::read_to_string(&p)
                    .map_err(|e| format!("cannot read {self} ({}): {e}", p.display()))?
            }
        };
        let t = text.trim();
        if t.is_empty() {
            return Err(format!("{self} is empty"));
        }
        Ok(t.to_owned())
    }
}

/// A size in bytes: an integer, or a string such as `"1MiB"`, `"512KiB"`, `"64k"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1024,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1024 * 1024,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1024 * 1024 * 1024,
            _ => return None,
        };
        n.checked_mul(mult)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        let expected = "expected a number of bytes or a string such as \"1MiB\" or \"512KiB\"";
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom(format!("not a size: {expected}")))?
        {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map(ByteSize).ok_or_else(|| {
                serde::de::Error::custom(format!("`{s}` is not a size: {expected}"))
            }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BackendName {
    Echo,
    Openai,
    Command,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileAgent {
    backend: Option<BackendName>,
    model: Option<String>,
    timeout: Option<HumanDuration>,
    base_url: Option<String>,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
    api_key_credential: Option<String>,
    connect_timeout: Option<HumanDuration>,
    idle_timeout: Option<HumanDuration>,
    retries: Option<u32>,
    command: Option<Vec<String>>,
    max_reply: Option<ByteSize>,
}

/// `[agent]`: the backend that runs each turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    pub backend: AgentBackend,
    /// The model name `/v1/models` lists and the `openai` backend asks for.
    pub model: String,
    /// Upper bound on one turn.
    pub timeout: Duration,
    /// Upper bound on one reply: beyond, the turn fails (and a command's process group is
    /// killed).
    pub max_reply: u64,
}

pub const DEFAULT_MAX_REPLY: u64 = 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentBackend {
    /// Replies with the last user message.
    Echo,
    /// Any OpenAI-compatible chat-completions server.
    OpenAi(OpenAiConfig),
    /// A program per turn: the messages as JSON on stdin, the reply on stdout.
    Command { argv: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenAiConfig {
    /// e.g. `http://127.0.0.1:8000/v1`; `/chat/completions` is appended.
    pub base_url: String,
    pub key: Option<KeySource>,
    pub connect_timeout: Duration,
    /// Longest silence from the upstream, waiting for its answer or between streamed bytes.
    pub idle_timeout: Duration,
    /// Retries of a request the upstream never accepted (connect failures).
    pub retries: u32,
}

pub const DEFAULT_MODEL: &str = "hermes-agent";
pub const DEFAULT_AGENT_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);
pub const DEFAULT_RETRIES: u32 = 2;

type SectionError = (&'static str, String);

fn one_key_source(
    env: Option<String>,
    file: Option<PathBuf>,
    credential: Option<String>,
    keys: [&'static str; 3],
) -> Result<Option<KeySource>, SectionError> {
    let mut found: Vec<(&'static str, KeySource)> = Vec::new();
    if let Some(v) = env {
        found.push((keys[0], KeySource::Env(v)));
    }
    if let Some(v) = file {
        found.push((keys[1], KeySource::File(v)));
    }
    if let Some(v) = credential {
        found.push((keys[2], KeySource::Credential(v)));
    }
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.pop().map(|(_, s)| s)),
        _ => Err((
            found[1].0,
            format!(
                "give the key in one way only: {} are all set",
                found.iter().map(|(k, _)| *k).collect::<Vec<_>>().join(", ")
            ),
        )),
    }
}

pub(super) fn agent(f: FileAgent) -> Result<AgentConfig, SectionError> {
    let backend = match f.backend.unwrap_or(BackendName::Echo) {
        BackendName::Echo => AgentBackend::Echo,
        BackendName::Openai => {
            let base_url = f.base_url.ok_or((
                "agent.base_url",
                "the openai backend needs base_url, e.g. \"http://127.0.0.1:8000/v1\"".to_owned(),
            ))?;
            if !(base_url.starts_with("http://") || base_url.starts_with("https://"))
                || base_url.parse::<http::Uri>().is_err()
            {
                return Err((
                    "agent.base_url",
                    format!("`{base_url}` is not an http:// or https:// URL"),
                ));
            }
            AgentBackend::OpenAi(OpenAiConfig {
                base_url: base_url.trim_end_matches('/').to_owned(),
                key: one_key_source(
                    f.api_key_env,
                    f.api_key_file,
                    f.api_key_credential,
                    [
                        "agent.api_key_env",
                        "agent.api_key_file",
                        "agent.api_key_credential",
                    ],
                )?,
                connect_timeout: f.connect_timeout.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.0),
                idle_timeout: f.idle_timeout.map_or(DEFAULT_IDLE_TIMEOUT, |d| d.0),
                retries: f.retries.unwrap_or(DEFAULT_RETRIES),
            })
        }
        BackendName::Command => {
            let argv = f.command.unwrap_or_default();
            if argv.first().is_none_or(|p| p.is_empty()) {
                return Err((
                    "agent.command",
                    "the command backend needs command = [\"program\", \"arg\", …] (no shell)"
                        .to_owned(),
                ));
            }
            AgentBackend::Command { argv }
        }
    };
    let model = f.model.unwrap_or_else(|| DEFAULT_MODEL.to_owned());
    if model.is_empty() {
        return Err(("agent.model", "must not be empty".to_owned()));
    }
    let max_reply = match f.max_reply {
        Some(ByteSize(0)) => return Err(("agent.max_reply", "must be at least 1 byte".to_owned())),
        Some(b) => b.0,
        None => DEFAULT_MAX_REPLY,
    };
    Ok(AgentConfig {
        backend,
        model,
        timeout: f.timeout.map_or(DEFAULT_AGENT_TIMEOUT, |d| d.0),
        max_reply,
    })
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            backend: AgentBackend::Echo,
            model: DEFAULT_MODEL.to_owned(),
            timeout: DEFAULT_AGENT_TIMEOUT,
            max_reply: DEFAULT_MAX_REPLY,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileApi {
    keys: Option<Vec<Secret>>,
    keys_file: Option<PathBuf>,
    keys_credential: Option<String>,
    max_body: Option<ByteSize>,
    body_timeout: Option<HumanDuration>,
    keepalive: Option<HumanDuration>,
    response_retention: Option<HumanDuration>,
    run_retention: Option<HumanDuration>,
}

/// `[api]`: who may call the API and how much a request may carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    /// Keys given inline.
    pub keys: Vec<Secret>,
    /// Files or credentials holding more keys, one per line.
    pub key_sources: Vec<KeySource>,
    pub max_body: u64,
    /// Longest time a client may take to send a request body.
    pub body_timeout: Duration,
    /// Longest silence on an open stream before an SSE comment `: keepalive` is sent.
    pub keepalive: Duration,
    /// How long stored responses (`/v1/responses`) are kept.
    pub response_retention: Duration,
    /// How long finished runs of `/v1/runs` (and their events) are kept; a delivery's run
    /// goes with its delivery (`[webhook] retention`).
    pub run_retention: Duration,
}

pub const DEFAULT_MAX_BODY: u64 = 1024 * 1024;
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(15);
pub const DEFAULT_RESPONSE_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
pub const DEFAULT_RUN_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

impl ApiConfig {
    /// Whether any key is configured (its source may still fail to read).
    pub fn has_keys(&self) -> bool {
        !self.keys.is_empty() || !self.key_sources.is_empty()
    }
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            keys: Vec::new(),
            key_sources: Vec::new(),
            max_body: DEFAULT_MAX_BODY,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            keepalive: DEFAULT_KEEPALIVE,
            response_retention: DEFAULT_RESPONSE_RETENTION,
            run_retention: DEFAULT_RUN_RETENTION,
        }
    }
}

pub(super) fn api(f: FileApi) -> Result<ApiConfig, (&'static str, String)> {
    let keepalive = f.keepalive.map_or(DEFAULT_KEEPALIVE, |d| d.0);
    if keepalive < Duration::from_millis(100) {
        return Err(("api.keepalive", "must be at least 100ms".into()));
    }
    let response_retention = f
        .response_retention
        .map_or(DEFAULT_RESPONSE_RETENTION, |d| d.0);
    if response_retention < Duration::from_secs(1) {
        return Err(("api.response_retention", "must be at least 1s".into()));
    }
    let run_retention = f.run_retention.map_or(DEFAULT_RUN_RETENTION, |d| d.0);
    if run_retention < Duration::from_secs(1) {
        return Err(("api.run_retention", "must be at least 1s".into()));
    }
    let mut key_sources = Vec::new();
    if let Some(p) = f.keys_file {
        key_sources.push(KeySource::File(p));
    }
    if let Some(n) = f.keys_credential {
        key_sources.push(KeySource::Credential(n));
    }
    Ok(ApiConfig {
        keys: f.keys.unwrap_or_default(),
        key_sources,
        max_body: f.max_body.map_or(DEFAULT_MAX_BODY, |b| b.0),
        body_timeout: f.body_timeout.map_or(DEFAULT_BODY_TIMEOUT, |d| d.0),
        keepalive,
        response_retention,
        run_retention,
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSessions {
    max_concurrent_runs: Option<u32>,
    queue_depth: Option<u32>,
    history_limit: Option<u32>,
}

/// `[sessions]`: how much work runs at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionsConfig {
    /// Sessions with a turn running or waiting, across the gateway; beyond: 429.
    pub max_concurrent_runs: usize,
    /// Turns that may wait behind the running one in a session; beyond: 429.
    pub queue_depth: usize,
    /// Stored messages prepended to a turn, newest kept.
    pub history_limit: u32,
}

pub const DEFAULT_MAX_CONCURRENT_RUNS: u32 = 64;
pub const DEFAULT_QUEUE_DEPTH: u32 = 16;
pub const DEFAULT_HISTORY_LIMIT: u32 = 200;

impl Default for SessionsConfig {
    fn default() -> Self {
        SessionsConfig {
            max_concurrent_runs: DEFAULT_MAX_CONCURRENT_RUNS as usize,
            queue_depth: DEFAULT_QUEUE_DEPTH as usize,
            history_limit: DEFAULT_HISTORY_LIMIT,
        }
    }
}

pub(super) fn sessions(f: FileSessions) -> Result<SessionsConfig, SectionError> {
    let positive = |v: Option<u32>, d: u32, key: &'static str| match v {
        Some(0) => Err((key, "must be at least 1".to_owned())),
        Some(n) => Ok(n),
        None => Ok(d),
    };
    Ok(SessionsConfig {
        max_concurrent_runs: positive(
            f.max_concurrent_runs,
            DEFAULT_MAX_CONCURRENT_RUNS,
            "sessions.max_concurrent_runs",
        )? as usize,
        queue_depth: positive(f.queue_depth, DEFAULT_QUEUE_DEPTH, "sessions.queue_depth")? as usize,
        history_limit: f.history_limit.unwrap_or(DEFAULT_HISTORY_LIMIT),
    })
}
