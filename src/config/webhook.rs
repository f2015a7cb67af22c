//! `[webhook]` and `[[webhook.routes]]`: which senders may wake the agent, how each proves
//! who it is, what the turn says and where its result goes.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::sections::{ByteSize, KeySource, Secret};
use super::template::Template;
use super::{HumanDuration, ListenAddr};

type SectionError = (String, String);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileWebhook {
    max_body: Option<ByteSize>,
    body_timeout: Option<HumanDuration>,
    replay_window: Option<HumanDuration>,
    dedup_window: Option<HumanDuration>,
    retention: Option<HumanDuration>,
    max_attempts: Option<u32>,
    retry_initial: Option<HumanDuration>,
    retry_max: Option<HumanDuration>,
    target_timeout: Option<HumanDuration>,
    delivery_concurrency: Option<u32>,
    #[serde(default)]
    routes: Vec<FileRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    name: String,
    scheme: SignatureScheme,
    secret: Option<Secret>,
    secret_file: Option<PathBuf>,
    secret_credential: Option<String>,
    header: Option<String>,
    id_header: Option<String>,
    event_header: Option<String>,
    #[serde(default)]
    insecure: bool,
    template: Option<String>,
    session: Option<String>,
    target: Option<FileTarget>,
    rate_limit: Option<String>,
    burst: Option<u32>,
    max_body: Option<ByteSize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTarget {
    #[serde(rename = "type")]
    kind: TargetKind,
    url: Option<String>,
    secret: Option<Secret>,
    secret_file: Option<PathBuf>,
    secret_credential: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum TargetKind {
    Log,
    Http,
}

/// How a sender signs its deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SignatureScheme {
    /// `X-Hub-Signature-256: sha256=<hex>` over the body.
    Github,
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64>`.
    StandardWebhooks,
    /// A shared token in a configured header.
    Token,
}

impl SignatureScheme {
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureScheme::Github => "github",
            SignatureScheme::StandardWebhooks => "standard-webhooks",
            SignatureScheme::Token => "token",
        }
    }
}

/// A secret given inline or read from a file or credential at start and on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    Inline(Secret),
    From(KeySource),
}

impl SecretSource {
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Inline(s) => Ok(s.clone()),
            SecretSource::From(src) => src.read().map(Secret::new),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetConfig {
    /// The result goes to the journal only.
    Log,
    /// POST of a JSON body; signed with `secret`, else with the route's secret.
    Http {
        url: String,
        secret: Option<SecretSource>,
    },
}

/// `N` deliveries per `per`, with bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub count: u32,
    pub per: Duration,
    pub burst: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    pub name: String,
    pub scheme: SignatureScheme,
    pub secret: Option<SecretSource>,
    /// The token header (`token` scheme).
    pub header: Option<String>,
    /// The header naming the sender's delivery id (repeats are dropped).
    pub id_header: Option<String>,
    /// The header naming the event.
    pub event_header: Option<String>,
    pub insecure: bool,
    /// The turn's prompt.
    pub template: Template,
    /// `None`: a session of its own per delivery; else a key template.
    pub session: Option<Template>,
    pub target: TargetConfig,
    pub rate_limit: Option<RateLimit>,
    pub max_body: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub max_body: u64,
    pub body_timeout: Duration,
    pub replay_window: Duration,
    pub dedup_window: Duration,
    /// How long a delivered or failed delivery (and its run) stays in the store.
    pub retention: Duration,
    pub max_attempts: u32,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub target_timeout: Duration,
    pub delivery_concurrency: usize,
    pub routes: Vec<RouteConfig>,
}

pub const DEFAULT_WEBHOOK_MAX_BODY: u64 = 1024 * 1024;
pub const DEFAULT_REPLAY_WINDOW: Duration = Duration::from_secs(5 * 60);
pub const DEFAULT_DEDUP_WINDOW: Duration = Duration::from_secs(24 * 3600);
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_RETRY_INITIAL: Duration = Duration::from_secs(1);
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(600);
pub const DEFAULT_TARGET_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_DELIVERY_CONCURRENCY: u32 = 32;
pub const DEFAULT_TEMPLATE: &str =
    "Webhook `{route}` delivered event `{event}` (id {source_id}):\n\n{body}";

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            max_body: DEFAULT_WEBHOOK_MAX_BODY,
            body_timeout: Duration::from_secs(30),
            replay_window: DEFAULT_REPLAY_WINDOW,
            dedup_window: DEFAULT_DEDUP_WINDOW,
            retention: DEFAULT_RETENTION,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            retry_initial: DEFAULT_RETRY_INITIAL,
            retry_max: DEFAULT_RETRY_MAX,
            target_timeout: DEFAULT_TARGET_TIMEOUT,
            delivery_concurrency: DEFAULT_DELIVERY_CONCURRENCY as usize,
            routes: Vec::new(),
        }
    }
}

/// A secret given as `FIELD`, `FIELD_file` or `FIELD_credential` (one of them at most).
pub(super) fn secret_source(
    prefix: &str,
    field: &str,
    inline: Option<Secret>,
    file: Option<PathBuf>,
    credential: Option<String>,
) -> Result<Option<SecretSource>, SectionError> {
    let mut found = Vec::new();
    if let Some(s) = inline {
        found.push((field.to_owned(), SecretSource::Inline(s)));
    }
    if let Some(f) = file {
        found.push((
            format!("{field}_file"),
            SecretSource::From(KeySource::File(f)),
        ));
    }
    if let Some(c) = credential {
        found.push((
            format!("{field}_credential"),
            SecretSource::From(KeySource::Credential(c)),
        ));
    }
    if found.len() > 1 {
        let names: Vec<&str> = found.iter().map(|(k, _)| k.as_str()).collect();
        return Err((
            format!("{prefix}.{}", names[1]),
            format!(
                "give the {field} in one way only: {} are all set",
                names.join(", ")
            ),
        ));
    }
    if let Some((k, SecretSource::Inline(s))) = found.last()
        && s.expose().is_empty()
    {
        return Err((format!("{prefix}.{k}"), "must not be empty".into()));
    }
    Ok(found.pop().map(|(_, s)| s))
}

/// `"100/s"`, `"600/min"`, `"5000/h"`.
pub(super) fn rate(s: &str) -> Option<(u32, Duration)> {
    let (n, unit) = s.trim().split_once('/')?;
    let n: u32 = n.trim().parse().ok().filter(|n| *n > 0)?;
    let per = match unit.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        _ => return None,
    };
    Some((n, per))
}

pub(super) fn valid_route_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

pub(super) fn webhook(f: FileWebhook, listen: &ListenAddr) -> Result<WebhookConfig, SectionError> {
    let d = WebhookConfig::default();
    let max_attempts = match f.max_attempts {
        Some(0) => return Err(("webhook.max_attempts".into(), "must be at least 1".into())),
        Some(n) => n,
        None => d.max_attempts,
    };
    let delivery_concurrency = match f.delivery_concurrency {
        Some(0) => {
            return Err((
                "webhook.delivery_concurrency".into(),
                "must be at least 1".into(),
            ));
        }
        Some(n) => n as usize,
        None => d.delivery_concurrency,
    };
    let dedup_window = f.dedup_window.map_or(d.dedup_window, |t| t.0);
    let retention = f.retention.map_or(d.retention, |t| t.0);
    if retention < dedup_window {
        return Err((
            "webhook.retention".into(),
            format!(
                "must be at least webhook.dedup_window ({}s): a repeated delivery is recognised by the deliveries kept",
                dedup_window.as_secs()
            ),
        ));
    }
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(f.routes.len());
    for (i, r) in f.routes.into_iter().enumerate() {
        let key = format!("webhook.routes[{i}]");
        if !valid_route_name(&r.name) {
            return Err((
                format!("{key}.name"),
                format!(
                    "`{}` is not a route name: use 1 to 64 letters, digits, `-`, `_` or `.` (the URL is /webhooks/NAME)",
                    r.name.escape_default()
                ),
            ));
        }
        if routes.iter().any(|o| o.name == r.name) {
            return Err((
                format!("{key}.name"),
                format!("route `{}` is defined twice", r.name),
            ));
        }
        let secret = secret_source(&key, "secret", r.secret, r.secret_file, r.secret_credential)?;
        if secret.is_none() {
            if !r.insecure {
                return Err((
                    format!("{key}.secret"),
                    format!(
                        "route `{}` has no secret: set secret, secret_file or secret_credential (or, for a loopback listener only, insecure = true)",
                        r.name
                    ),
                ));
            }
            let local = match listen {
                ListenAddr::Tcp(a) => a.ip().is_loopback(),
                ListenAddr::Unix(_) | ListenAddr::Off => true,
            };
            if !local {
                return Err((
                    format!("{key}.insecure"),
                    format!(
                        "route `{}` has no secret and the webhook listener {listen} is not a loopback address: an insecure route is only allowed on 127.0.0.1 / [::1]",
                        r.name
                    ),
                ));
            }
        }
        let header = match (r.scheme, r.header) {
            (SignatureScheme::Token, None) => {
                return Err((
                    format!("{key}.header"),
                    "the token scheme needs header, e.g. \"X-Gitlab-Token\"".into(),
                ));
            }
            (_, h) => h,
        };
        for (k, h) in [
            ("header", &header),
            ("id_header", &r.id_header),
            ("event_header", &r.event_header),
        ] {
            if let Some(h) = h
                && http::HeaderName::from_bytes(h.as_bytes()).is_err()
            {
                return Err((format!("{key}.{k}"), format!("`{h}` is not a header name")));
            }
        }
        let (id_header, event_header) = match r.scheme {
            SignatureScheme::Github => (
                r.id_header.or(Some("X-GitHub-Delivery".into())),
                r.event_header.or(Some("X-GitHub-Event".into())),
            ),
            SignatureScheme::StandardWebhooks => (Some("webhook-id".into()), r.event_header),
            SignatureScheme::Token => (r.id_header, r.event_header),
        };
        let template = Template::parse(r.template.as_deref().unwrap_or(DEFAULT_TEMPLATE))
            .map_err(|e| (format!("{key}.template"), e.to_string()))?;
        let session = match &r.session {
            Some(s) => {
                Some(Template::parse(s).map_err(|e| (format!("{key}.session"), e.to_string()))?)
            }
            None => None,
        };
        let target = match r.target {
            None => TargetConfig::Log,
            Some(t) => match t.kind {
                TargetKind::Log => TargetConfig::Log,
                TargetKind::Http => {
                    let url = t.url.ok_or((
                        format!("{key}.target.url"),
                        "an http target needs url = \"https://…\"".to_owned(),
                    ))?;
                    if !(url.starts_with("http://") || url.starts_with("https://"))
                        || url.parse::<http::Uri>().is_err()
                    {
                        return Err((
                            format!("{key}.target.url"),
                            format!("`{url}` is not an http:// or https:// URL"),
                        ));
                    }
                    TargetConfig::Http {
                        url,
                        secret: secret_source(
                            &format!("{key}.target"),
                            "secret",
                            t.secret,
                            t.secret_file,
                            t.secret_credential,
                        )?,
                    }
                }
            },
        };
        let rate_limit = match r.rate_limit {
            None => None,
            Some(s) => {
                let (count, per) = rate(&s).ok_or((
                    format!("{key}.rate_limit"),
                    format!("`{s}` is not a rate: expected \"N/s\", \"N/min\" or \"N/h\""),
                ))?;
                Some(RateLimit {
                    count,
                    per,
                    burst: r.burst.unwrap_or(count).max(1),
                })
            }
        };
        routes.push(RouteConfig {
            name: r.name,
            scheme: r.scheme,
            secret,
            header,
            id_header,
            event_header,
            insecure: r.insecure,
            template,
            session,
            target,
            rate_limit,
            max_body: r.max_body.map(|b| b.0),
        });
    }
    Ok(WebhookConfig {
        max_body: f.max_body.map_or(d.max_body, |b| b.0),
        body_timeout: f.body_timeout.map_or(d.body_timeout, |t| t.0),
        replay_window: f.replay_window.map_or(d.replay_window, |t| t.0),
        dedup_window,
        retention,
        max_attempts,
        retry_initial: f.retry_initial.map_or(d.retry_initial, |t| t.0),
        retry_max: f.retry_max.map_or(d.retry_max, |t| t.0),
        target_timeout: f.target_timeout.map_or(d.target_timeout, |t| t.0),
        delivery_concurrency,
        routes,
    })
}
