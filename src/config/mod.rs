//! The gateway's configuration: TOML on disk, built-in defaults for every key left out.
//!
//! Errors name the file, the key and what was expected, because the person reading them
//! is usually an operator looking at `journalctl` after a failed start.

mod duration;
mod paths;
mod platforms;
pub mod schedule;
mod sections;
mod template;
mod webhook;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

pub use duration::HumanDuration;
pub use paths::{default_control_path, default_state_dir};
pub use platforms::{
    AccessConfig, GroupSessions, LineConfig, PlatformsConfig, SlackConfig, TelegramConfig,
    TelegramMode, TwilioConfig, WhatsAppConfig, looks_like_bot_token, looks_like_header_value,
    looks_like_slack_bot_token,
};
pub use schedule::{Deliver, Missed, ScheduleConfig};
pub use sections::{
    AgentBackend, AgentConfig, ApiConfig, ByteSize, KeySource, OpenAiConfig, Secret, SessionsConfig,
};
pub use template::{Part, Template, TemplateError};
pub use webhook::{
    RateLimit, RouteConfig, SecretSource, SignatureScheme, TargetConfig, WebhookConfig,
};

/// Where a listener lives when the service manager did not hand one over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// `"off"`: the listener is not served at all.
    Off,
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "{}", p.display()),
            ListenAddr::Off => f.write_str("off"),
        }
    }
}

impl ListenAddr {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(ListenAddr::Off);
        }
        if let Some(rest) = s.strip_prefix("unix:") {
            return Self::unix(rest);
        }
        if s.starts_with('/') {
            return Self::unix(s);
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|_| {
            format!(
                "`{s}` is not a listen address: expected \"host:port\" (e.g. \"127.0.0.1:8642\", \"[::1]:8642\"), an absolute Unix socket path, or \"off\""
            )
        })
    }

    fn unix(p: &str) -> Result<Self, String> {
        let path = PathBuf::from(p);
        if !path.is_absolute() {
            return Err(format!("Unix socket path `{p}` must be absolute"));
        }
        Ok(ListenAddr::Unix(path))
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ListenAddr::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// The effective configuration: what the file said, defaults for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file this came from, if any (`None`: built-in defaults).
    pub source: Option<PathBuf>,
    pub listen: Listen,
    pub state_dir: PathBuf,
    pub drain_timeout: Duration,
    /// During a drain, how long an idle keep-alive connection may still send one last
    /// request (answered with `Connection: close`) before it is closed.
    pub idle_grace: Duration,
    /// How long a client may take to send a request's headers: 408 after that (and an idle
    /// keep-alive connection is closed after it).
    pub header_timeout: Duration,
    /// TCP connections served at once, all listeners together; beyond, new ones wait in
    /// the kernel's backlog. `None`: sized from the descriptor limit at start.
    pub max_connections: Option<usize>,
    pub log_level: Option<String>,
    pub agent: AgentConfig,
    pub api: ApiConfig,
    pub sessions: SessionsConfig,
    pub webhook: WebhookConfig,
    pub platforms: PlatformsConfig,
    pub schedules: Vec<ScheduleConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    pub api: ListenAddr,
    pub webhook: ListenAddr,
    pub control: ListenAddr,
    /// Prometheus metrics (`GET /metrics`); off unless configured or socket-activated.
    pub metrics: ListenAddr,
    /// Permission bits of Unix sockets the gateway binds itself.
    pub socket_mode: u32,
}

impl Listen {
    /// The listeners in the order they are acquired and reported.
    pub fn by_name(&self) -> [(&'static str, &ListenAddr); 4] {
        [
            ("api", &self.api),
            ("webhook", &self.webhook),
            ("control", &self.control),
            ("metrics", &self.metrics),
        ]
    }
}

/// Everything that can be wrong with a configuration. Each variant names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}{line}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        line: LineHint,
        key: String,
        message: String,
    },
    #[error("config file {path}: TOML syntax error{line}: {message}")]
    Syntax {
        path: PathBuf,
        line: LineHint,
        message: String,
    },
    #[error("{0}")]
    Environment(String),
}

/// ` (line N)` when the position is known, nothing otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineHint(Option<usize>);

impl fmt::Display for LineHint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(n) => write!(f, " (line {n})"),
            None => Ok(()),
        }
    }
}

// The on-disk shape. Every field is optional: a file gives only what it changes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    listen: FileListen,
    #[serde(default)]
    state: FileState,
    #[serde(default)]
    gateway: FileGateway,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    agent: sections::FileAgent,
    #[serde(default)]
    api: sections::FileApi,
    #[serde(default)]
    sessions: sections::FileSessions,
    #[serde(default)]
    webhook: webhook::FileWebhook,
    #[serde(default)]
    platforms: platforms::FilePlatforms,
    #[serde(default)]
    schedule: Vec<schedule::FileSchedule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileListen {
    api: Option<ListenAddr>,
    webhook: Option<ListenAddr>,
    control: Option<ListenAddr>,
    metrics: Option<ListenAddr>,
    socket_mode: Option<SocketMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileState {
    dir: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileGateway {
    drain_timeout: Option<HumanDuration>,
    idle_grace: Option<HumanDuration>,
    header_timeout: Option<HumanDuration>,
    max_connections: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    level: Option<LogLevel>,
}

/// An octal permission string such as `"0600"`.
#[derive(Debug, Clone, Copy)]
struct SocketMode(u32);

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
            Ok(m) if m <= 0o777 => Ok(SocketMode(m)),
            _ => Err(serde::de::Error::custom(format!(
                "`{s}` is not a permission mode: expected an octal string such as \"0600\" or \"0660\""
            ))),
        }
    }
}

/// A tracing filter directive, checked when the file is read rather than when it is used.
#[derive(Debug, Clone)]
struct LogLevel(String);

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.parse::<tracing_subscriber::EnvFilter>() {
            Ok(_) => Ok(LogLevel(s)),
            Err(e) => Err(serde::de::Error::custom(format!(
                "`{s}` is not a log level: expected error, warn, info, debug, trace or a filter such as \"info,hermes_gateway=debug\" ({e})"
            ))),
        }
    }
}

pub const DEFAULT_API: &str = "127.0.0.1:8642";
pub const DEFAULT_WEBHOOK: &str = "127.0.0.1:8644";
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_IDLE_GRACE: Duration = Duration::from_millis(1000);
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// Where `FILE` comes from when `--config` is not given.
pub fn default_config_path() -> Option<PathBuf> {
    std::env::var_os("CONFIGURATION_DIRECTORY")
        .map(|d| PathBuf::from(d).join("gateway.toml"))
        .filter(|p| p.exists())
}

impl Config {
    /// Built-in defaults, resolved against the environment (state and runtime folders).
    pub fn defaults() -> Result<Self, ConfigError> {
        Self::from_file_config(None, FileConfig::default())
    }

    /// Reads and validates `path`; every key it leaves out keeps its default.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// `load` when a path is given, else the default file if one exists, else defaults.
    pub fn load_or_default(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path.map(Path::to_path_buf).or_else(default_config_path) {
            Some(p) => Self::load(&p),
            None => Self::defaults(),
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let de = toml::de::Deserializer::parse(text).map_err(|e| ConfigError::Syntax {
            path: path.to_path_buf(),
            line: LineHint(e.span().map(|s| line_of(text, s.start))),
            message: e.message().to_string(),
        })?;
        let file: FileConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line: LineHint(inner.span().map(|s| line_of(text, s.start))),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message: inner.message().to_string(),
            }
        })?;
        Self::from_file_config(Some(path), file)
    }

    fn from_file_config(path: Option<&Path>, f: FileConfig) -> Result<Self, ConfigError> {
        let state_dir = match f.state.dir {
            Some(d) => d,
            None => default_state_dir().map_err(ConfigError::Environment)?,
        };
        let control = match f.listen.control {
            Some(c) => c,
            None => ListenAddr::Unix(default_control_path(&state_dir)),
        };
        let default = |s: &str| ListenAddr::parse(s).map_err(ConfigError::Environment);
        let invalid = |key: &str, message: String| ConfigError::Invalid {
            path: path.map_or_else(|| PathBuf::from("(built-in defaults)"), Path::to_path_buf),
            line: LineHint(None),
            key: key.to_owned(),
            message,
        };
        let max_connections = match f.gateway.max_connections {
            Some(0) => {
                return Err(invalid(
                    "gateway.max_connections",
                    "must be at least 1 (leave it out to size it from the descriptor limit)".into(),
                ));
            }
            n => n.map(|n| n as usize),
        };
        let agent = sections::agent(f.agent).map_err(|(k, m)| invalid(k, m))?;
        let sessions = sections::sessions(f.sessions).map_err(|(k, m)| invalid(k, m))?;
        let api = sections::api(f.api).map_err(|(k, m)| invalid(k, m))?;
        let api_listen = f.listen.api.clone();
        if let Some(ListenAddr::Tcp(a)) = &api_listen
            && !a.ip().is_loopback()
            && !api.has_keys()
        {
            return Err(invalid(
                "listen.api",
                format!(
                    "`{a}` is not a loopback address and no API key is configured: set [api] keys, keys_file or keys_credential, or listen on 127.0.0.1 / [::1]"
                ),
            ));
        }
        let webhook_listen = f
            .listen
            .webhook
            .map_or_else(|| default(DEFAULT_WEBHOOK), Ok)?;
        let webhook =
            webhook::webhook(f.webhook, &webhook_listen).map_err(|(k, m)| invalid(&k, m))?;
        let platforms = platforms::platforms(f.platforms).map_err(|(k, m)| invalid(&k, m))?;
        let schedules = schedule::schedules(f.schedule).map_err(|(k, m)| invalid(&k, m))?;
        for (i, s) in schedules.iter().enumerate() {
            if let Deliver::Chat { platform, name, .. } = &s.deliver
                && !platforms.has(platform, name)
            {
                return Err(invalid(
                    &format!("schedule[{i}].deliver"),
                    format!("no [[platforms.{platform}]] named `{name}` is configured"),
                ));
            }
        }
        Ok(Config {
            source: path.map(Path::to_path_buf),
            listen: Listen {
                api: api_listen.map_or_else(|| default(DEFAULT_API), Ok)?,
                webhook: webhook_listen,
                control,
                metrics: f.listen.metrics.unwrap_or(ListenAddr::Off),
                socket_mode: f.listen.socket_mode.map_or(0o600, |m| m.0),
            },
            state_dir,
            drain_timeout: f
                .gateway
                .drain_timeout
                .map_or(DEFAULT_DRAIN_TIMEOUT, |d| d.0),
            idle_grace: f.gateway.idle_grace.map_or(DEFAULT_IDLE_GRACE, |d| d.0),
            header_timeout: f
                .gateway
                .header_timeout
                .map_or(DEFAULT_HEADER_TIMEOUT, |d| d.0),
            max_connections,
            log_level: f.log.level.map(|l| l.0),
            agent,
            api,
            sessions,
            webhook,
            platforms,
            schedules,
        })
    }

    /// A human description of where the configuration came from.
    pub fn origin(&self) -> String {
        match &self.source {
            Some(p) => p.display().to_string(),
            None => "built-in defaults".into(),
        }
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests;
