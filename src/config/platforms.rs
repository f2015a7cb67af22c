//! `[[platforms.telegram]]` (and the platforms to come): which chat platforms the gateway
//! serves, with which credentials, and who may talk to the agent through them.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::HumanDuration;
use super::sections::Secret;
use super::webhook::{RateLimit, SecretSource, rate, secret_source, valid_route_name};

type SectionError = (String, String);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePlatforms {
    #[serde(default)]
    telegram: Vec<FileTelegram>,
}

/// A platform's user id: Telegram's are numbers, other platforms' are strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum UserId {
    Number(i64),
    Text(String),
}

impl UserId {
    fn into_string(self) -> String {
        match self {
            UserId::Number(n) => n.to_string(),
            UserId::Text(s) => s,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTelegram {
    name: String,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    token_credential: Option<String>,
    mode: Option<TelegramMode>,
    api_base: Option<String>,
    webhook_secret: Option<Secret>,
    webhook_secret_file: Option<PathBuf>,
    webhook_secret_credential: Option<String>,
    allowed_users: Option<Vec<UserId>>,
    #[serde(default)]
    allow_all: bool,
    #[serde(default)]
    pairing: bool,
    admins: Option<Vec<UserId>>,
    group_sessions: Option<GroupSessions>,
    username: Option<String>,
    chat_rate_limit: Option<String>,
    send_rate_limit: Option<String>,
    poll_timeout: Option<HumanDuration>,
    markdown: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TelegramMode {
    /// `getUpdates` long polling: works behind NAT, no public URL.
    Polling,
    /// Telegram POSTs each update to `/platforms/telegram/NAME` on the webhook listener.
    Webhook,
}

/// In a group, whose conversation a message belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupSessions {
    /// Each member of a group talks to the agent in a session of their own.
    PerUser,
    /// The group shares one session (each message is prefixed with its sender's name).
    Shared,
}

/// Who may talk to the agent through one platform instance. Deny by default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessConfig {
    /// The platform's user ids allowed.
    pub allowed_users: Vec<String>,
    /// Everyone may.
    pub allow_all: bool,
    /// An unknown user gets a one-time code for the operator to approve.
    pub pairing: bool,
    /// May use `/restart` (and are allowed).
    pub admins: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelegramConfig {
    pub name: String,
    pub token: SecretSource,
    pub mode: TelegramMode,
    /// Without a trailing slash.
    pub api_base: String,
    pub webhook_secret: Option<SecretSource>,
    pub access: AccessConfig,
    pub group_sessions: GroupSessions,
    /// The bot's username (without `@`), when it should not be asked with `getMe`.
    pub username: Option<String>,
    /// Messages one chat may send (beyond: refused with one notice per episode).
    pub chat_rate_limit: RateLimit,
    /// Messages the gateway sends through this bot, all chats together.
    pub send_rate_limit: RateLimit,
    /// `getUpdates`' long-poll timeout.
    pub poll_timeout: Duration,
    /// Replies in Markdown go out as Telegram HTML when they convert safely.
    pub markdown: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlatformsConfig {
    pub telegram: Vec<TelegramConfig>,
}

impl PlatformsConfig {
    pub fn is_empty(&self) -> bool {
        self.telegram.is_empty()
    }
}

pub const DEFAULT_TELEGRAM_API: &str = "https://api.telegram.org";
pub const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_secs(50);
/// A person types a few messages a minute; a flood is far beyond.
pub const DEFAULT_CHAT_RATE: RateLimit = RateLimit {
    count: 20,
    per: Duration::from_secs(60),
    burst: 20,
};
/// Telegram's broadcast limit: about 30 messages a second per bot.
pub const DEFAULT_TELEGRAM_SEND_RATE: RateLimit = RateLimit {
    count: 30,
    per: Duration::from_secs(1),
    burst: 30,
};

fn users(v: Option<Vec<UserId>>, key: &str) -> Result<Vec<String>, SectionError> {
    let mut out = Vec::new();
    for (i, u) in v.unwrap_or_default().into_iter().enumerate() {
        let s = u.into_string();
        if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((
                format!("{key}[{i}]"),
                format!(
                    "`{}` is not a user id: a platform's user id, e.g. 123456789",
                    s.escape_default()
                ),
            ));
        }
        out.push(s);
    }
    Ok(out)
}

fn rate_limit(s: Option<String>, default: RateLimit, key: &str) -> Result<RateLimit, SectionError> {
    match s {
        None => Ok(default),
        Some(s) => {
            let (count, per) = rate(&s).ok_or((
                key.to_owned(),
                format!("`{s}` is not a rate: expected \"N/s\", \"N/min\" or \"N/h\""),
            ))?;
            Ok(RateLimit {
                count,
                per,
                burst: count,
            })
        }
    }
}

fn http_url(url: &str, key: &str) -> Result<String, SectionError> {
    if !(url.starts_with("http://") || url.starts_with("https://"))
        || url.parse::<http::Uri>().is_err()
    {
        return Err((
            key.to_owned(),
            format!("`{url}` is not an http:// or https:// URL"),
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Telegram's `secret_token`: 1–256 characters of `A-Z a-z 0-9 _ -`.
fn check_telegram_secret(s: &SecretSource, key: &str) -> Result<(), SectionError> {
    if let SecretSource::Inline(v) = s {
        let v = v.expose();
        if v.len() > 256
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err((
                key.to_owned(),
                "Telegram's secret token is 1 to 256 characters of A-Z, a-z, 0-9, `_` and `-`"
                    .into(),
            ));
        }
    }
    Ok(())
}

pub(super) fn platforms(f: FilePlatforms) -> Result<PlatformsConfig, SectionError> {
    let mut telegram: Vec<TelegramConfig> = Vec::with_capacity(f.telegram.len());
    for (i, t) in f.telegram.into_iter().enumerate() {
        let key = format!("platforms.telegram[{i}]");
        if !valid_route_name(&t.name) {
            return Err((
                format!("{key}.name"),
                format!(
                    "`{}` is not a platform name: use 1 to 64 letters, digits, `-`, `_` or `.` (the webhook URL is /platforms/telegram/NAME)",
                    t.name.escape_default()
                ),
            ));
        }
        if telegram.iter().any(|o| o.name == t.name) {
            return Err((
                format!("{key}.name"),
                format!(
                    "telegram `{}` is defined twice: each [[platforms.telegram]] needs a name of its own",
                    t.name
                ),
            ));
        }
        let token = secret_source(&key, "token", t.token, t.token_file, t.token_credential)?
            .ok_or((
                format!("{key}.token"),
                format!(
                    "telegram `{}` has no bot token: set token, token_file or token_credential (BotFather gives it)",
                    t.name
                ),
            ))?;
        if let SecretSource::Inline(v) = &token
            && !looks_like_bot_token(v.expose())
        {
            return Err((
                format!("{key}.token"),
                "a bot token looks like 123456789:AA… (digits, a colon, then letters, digits, `_` or `-`)".into(),
            ));
        }
        let mode = t.mode.unwrap_or(TelegramMode::Polling);
        let webhook_secret = secret_source(
            &key,
            "webhook_secret",
            t.webhook_secret,
            t.webhook_secret_file,
            t.webhook_secret_credential,
        )?;
        if let Some(s) = &webhook_secret {
            check_telegram_secret(s, &format!("{key}.webhook_secret"))?;
        }
        if mode == TelegramMode::Webhook && webhook_secret.is_none() {
            return Err((
                format!("{key}.webhook_secret"),
                format!(
                    "telegram `{}` is in webhook mode without a secret: set webhook_secret (or _file, _credential); Telegram sends it in X-Telegram-Bot-Api-Secret-Token and nothing else proves an update came from Telegram",
                    t.name
                ),
            ));
        }
        let allowed_users = users(t.allowed_users, &format!("{key}.allowed_users"))?;
        if t.allow_all && !allowed_users.is_empty() {
            return Err((
                format!("{key}.allow_all"),
                "allow_all = true lets everyone in, which makes allowed_users meaningless: keep one of them".into(),
            ));
        }
        let admins = users(t.admins, &format!("{key}.admins"))?;
        let api_base = http_url(
            t.api_base.as_deref().unwrap_or(DEFAULT_TELEGRAM_API),
            &format!("{key}.api_base"),
        )?;
        if let Some(u) = &t.username
            && (u.is_empty()
                || !u
                    .trim_start_matches('@')
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_'))
        {
            return Err((
                format!("{key}.username"),
                format!("`{}` is not a bot username", u.escape_default()),
            ));
        }
        let poll_timeout = t.poll_timeout.map_or(DEFAULT_POLL_TIMEOUT, |d| d.0);
        if poll_timeout > Duration::from_secs(120) {
            return Err((
                format!("{key}.poll_timeout"),
                "must be at most 120s (Telegram caps long polling; 50s is usual)".into(),
            ));
        }
        telegram.push(TelegramConfig {
            name: t.name,
            token,
            mode,
            api_base,
            webhook_secret,
            access: AccessConfig {
                allowed_users,
                allow_all: t.allow_all,
                pairing: t.pairing,
                admins,
            },
            group_sessions: t.group_sessions.unwrap_or(GroupSessions::PerUser),
            username: t.username.map(|u| u.trim_start_matches('@').to_owned()),
            chat_rate_limit: rate_limit(
                t.chat_rate_limit,
                DEFAULT_CHAT_RATE,
                &format!("{key}.chat_rate_limit"),
            )?,
            send_rate_limit: rate_limit(
                t.send_rate_limit,
                DEFAULT_TELEGRAM_SEND_RATE,
                &format!("{key}.send_rate_limit"),
            )?,
            poll_timeout,
            markdown: t.markdown.unwrap_or(true),
        });
    }
    Ok(PlatformsConfig { telegram })
}

/// `123456789:AAE…`: the bot's id, a colon, the secret part.
pub fn looks_like_bot_token(t: &str) -> bool {
    match t.split_once(':') {
        Some((id, rest)) => {
            !id.is_empty()
                && id.bytes().all(|b| b.is_ascii_digit())
                && !rest.is_empty()
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        }
        None => false,
    }
}
