//! `[[platforms.telegram]]`: a bot's token, polling or webhook, and Telegram's own knobs.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::super::HumanDuration;
use super::super::sections::Secret;
use super::super::webhook::{RateLimit, SecretSource, secret_source, valid_route_name};
use super::{AccessConfig, DEFAULT_CHAT_RATE, SectionError, UserId, access, http_url, rate_limit};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTelegram {
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

pub const DEFAULT_TELEGRAM_API: &str = "https://api.telegram.org";
pub const DEFAULT_POLL_TIMEOUT: Duration = Duration::from_secs(50);
/// Telegram's broadcast limit: about 30 messages a second per bot.
pub const DEFAULT_TELEGRAM_SEND_RATE: RateLimit = RateLimit {
    count: 30,
    per: Duration::from_secs(1),
    burst: 30,
};

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

pub(super) fn telegram(list: Vec<FileTelegram>) -> Result<Vec<TelegramConfig>, SectionError> {
    let mut telegram: Vec<TelegramConfig> = Vec::with_capacity(list.len());
    for (i, t) in list.into_iter().enumerate() {
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
        let access = access(&key, t.allowed_users, t.allow_all, t.pairing, t.admins)?;
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
            access,
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
    Ok(telegram)
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
