//! Telegram: the Bot API's updates in (long polling, or a webhook on the webhook listener),
//! `sendMessage` out. A small client on the gateway's hyper stack (`api`), so that the
//! gateway decides when an offset is confirmed and how a send is retried.
//!
//! What is taken: a new message with text, or a photo/document with a caption (the
//! caption). In groups, only messages that mention the bot, reply to it, or are commands.
//! Everything else (edits, stickers, photos without caption, joins, callback queries,
//! channel posts, messages from bots) is logged at debug and let go — confirmed like the
//! rest, never retried.

pub mod api;
mod markdown;

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};

use super::webhook::{Refused, Reply, Request, Taken, WebhookInbox};
use super::{Adapter, Inbound, Instance, Part, Platforms, chunk};
use crate::config::{GroupSessions, RateLimit, Secret, TelegramConfig, TelegramMode};
use crate::gateway::deliveries::ChatTarget;
use crate::gateway::deliveries::chat::SendFuture;
use crate::gateway::webhooks::signature;
use crate::lifecycle::Shutdown;
use api::{ApiError, BotApi};

/// `sendMessage`'s limit, in UTF-16 code units (as Telegram counts).
pub const MAX_MESSAGE: usize = 4096;
const SECRET_HEADER: &str = "X-Telegram-Bot-Api-Secret-Token";

/// What a reload may change.
#[derive(Debug, Clone)]
struct Settings {
    group_sessions: GroupSessions,
    markdown: bool,
    poll_timeout: Duration,
}

pub struct Telegram {
    instance: Arc<Instance>,
    api: BotApi,
    pub(super) mode: TelegramMode,
    /// Webhook mode: what Telegram sends in `X-Telegram-Bot-Api-Secret-Token`.
    secret: Option<Secret>,
    send_rate: RateLimit,
    settings: RwLock<Settings>,
    /// The bot's username (for mentions in groups): configured, or asked with `getMe`.
    username: RwLock<Option<String>>,
    bot_id: Option<i64>,
    /// What the configuration said, to tell a reload what it cannot change live.
    config: TelegramConfig,
}

fn telegram_secret(s: &Secret) -> bool {
    let v = s.expose();
    !v.is_empty()
        && v.len() <= 256
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Telegram {
    /// Reads the token and secret (errors name the key and source, never the value).
    pub fn new(cfg: &TelegramConfig) -> Result<Self, String> {
        let key = format!("[[platforms.telegram]] `{}`", cfg.name);
        let token = cfg.token.read().map_err(|e| format!("{key}: token: {e}"))?;
        if !crate::config::looks_like_bot_token(token.expose()) {
            return Err(format!(
                "{key}: token: what was read is not a bot token (123456789:AA…)"
            ));
        }
        let secret = match &cfg.webhook_secret {
            Some(s) => {
                let s = s
                    .read()
                    .map_err(|e| format!("{key}: webhook_secret: {e}"))?;
                if !telegram_secret(&s) {
                    return Err(format!(
                        "{key}: webhook_secret: Telegram's secret token is 1 to 256 characters of A-Z, a-z, 0-9, `_` and `-`"
                    ));
                }
                Some(s)
            }
            None => None,
        };
        let mode = match cfg.mode {
            TelegramMode::Polling => "polling",
            TelegramMode::Webhook => "webhook",
        };
        let api = BotApi::new(&cfg.api_base, token);
        Ok(Telegram {
            instance: Instance::new(
                "telegram",
                &cfg.name,
                mode,
                false,
                &cfg.access,
                cfg.chat_rate_limit,
            ),
            bot_id: api.bot_id(),
            api,
            mode: cfg.mode,
            secret,
            send_rate: cfg.send_rate_limit,
            settings: RwLock::new(Settings {
                group_sessions: cfg.group_sessions,
                markdown: cfg.markdown,
                poll_timeout: cfg.poll_timeout,
            }),
            username: RwLock::new(cfg.username.clone()),
            config: cfg.clone(),
        })
    }

    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    pub fn send_rate(&self) -> RateLimit {
        self.send_rate
    }

    pub fn api(&self) -> &BotApi {
        &self.api
    }

    fn settings(&self) -> Settings {
        self.settings
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn username(&self) -> Option<String> {
        self.username
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A reload: access, limits, group sessions, Markdown and the poll timeout change now.
    pub fn update(&self, cfg: &TelegramConfig) {
        *self
            .instance
            .access
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Arc::new(cfg.access.clone());
        if cfg.chat_rate_limit != self.instance.chat_limit().limit() {
            *self
                .instance
                .chat_limit
                .write()
                .unwrap_or_else(PoisonError::into_inner) =
                Arc::new(crate::gateway::rate::KeyedBuckets::new(cfg.chat_rate_limit));
        }
        *self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Settings {
            group_sessions: cfg.group_sessions,
            markdown: cfg.markdown,
            poll_timeout: cfg.poll_timeout,
        };
        let old = &self.config;
        if cfg.token != old.token
            || cfg.mode != old.mode
            || cfg.api_base != old.api_base
            || cfg.webhook_secret != old.webhook_secret
            || cfg.send_rate_limit != old.send_rate_limit
        {
            tracing::warn!(
                platform = "telegram",
                "telegram `{}`: token, mode, api_base, webhook_secret or send_rate_limit changed: this takes a restart (SIGUSR1)",
                cfg.name
            );
        }
    }

    /// Learns the bot's username (unless configured: mentions in groups need it), then
    /// polls in polling mode. A poll waits for the username, so that no group message is
    /// judged without it; a webhook meanwhile answers 503 to a group message with a mention
    /// (Telegram sends it again).
    pub fn start(self: Arc<Self>, platforms: Platforms, shutdown: Shutdown) {
        match self.mode {
            TelegramMode::Polling => {
                tokio::spawn(async move {
                    let mut stop = shutdown.clone();
                    if self.learn_username(&mut stop).await {
                        self.poll(platforms, shutdown).await;
                    }
                });
            }
            TelegramMode::Webhook => {
                self.instance.set_state("webhook");
                tokio::spawn(async move {
                    let mut stop = shutdown;
                    self.learn_username(&mut stop).await;
                });
            }
        }
    }

    /// `false` when the drain began first.
    async fn learn_username(&self, shutdown: &mut Shutdown) -> bool {
        if self.username().is_some() {
            return true;
        }
        let mut wait = Duration::from_secs(1);
        loop {
            let got = tokio::select! {
                _ = shutdown.started() => return false,
                r = self.api.get_me() => r,
            };
            match got {
                Ok(me) => {
                    let u = me["username"].as_str().unwrap_or("").to_owned();
                    tracing::info!(
                        platform = "telegram",
                        "telegram `{}` is @{u}",
                        self.instance.name
                    );
                    *self
                        .username
                        .write()
                        .unwrap_or_else(PoisonError::into_inner) = Some(u);
                    return true;
                }
                Err(e) => {
                    tracing::warn!(
                        platform = "telegram",
                        "telegram `{}`: getMe failed ({e}); again in {wait:?} (polling starts once it works)",
                        self.instance.name
                    );
                    self.instance.failed(&e.to_string());
                    self.instance.set_state("error");
                }
            }
            tokio::select! {
                _ = shutdown.started() => return false,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    }

    /// Long polling: a batch is committed (with the next offset), and only the next
    /// `getUpdates` confirms it. Stops when the drain begins, abandoning a poll in flight:
    /// its updates are fetched again by the next start.
    async fn poll(self: Arc<Self>, platforms: Platforms, mut shutdown: Shutdown) {
        let (platform, name) = ("telegram", self.instance.name.clone());
        let stored = {
            let n = name.clone();
            platforms
                .store()
                .read(move |c| crate::store::platforms::offset(c, platform, &n))
                .await
        };
        let mut offset = match stored {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(
                    platform,
                    "telegram `{name}`: cannot read the stored offset: {e}; polling from Telegram's first unconfirmed update"
                );
                None
            }
        };
        tracing::info!(
            platform,
            "telegram `{name}`: polling from offset {}",
            offset.map_or_else(|| "(none stored)".to_owned(), |o| o.to_string())
        );
        let mut backoff = Duration::from_secs(1);
        loop {
            let timeout = self.settings().poll_timeout;
            let got = tokio::select! {
                _ = shutdown.started() => break,
                r = self.api.get_updates(offset, timeout) => r,
            };
            let wait = match got {
                Ok(updates) => {
                    self.instance.ok("polling");
                    backoff = Duration::from_secs(1);
                    if updates.is_empty() {
                        continue;
                    }
                    let mut next = offset;
                    let mut items = Vec::with_capacity(updates.len());
                    for u in &updates {
                        let Some(id) = u["update_id"].as_i64() else {
                            tracing::warn!(
                                platform,
                                "telegram `{name}`: an update without update_id: ignored"
                            );
                            continue;
                        };
                        match self.map(u) {
                            Ok(m) => items.push(m),
                            Err(Unmapped::LetGo(why)) => tracing::debug!(
                                platform,
                                source_id = id,
                                "telegram `{name}`: update {id} let go: {why}"
                            ),
                            // Not confirmed: the next poll brings it (and those after) again.
                            Err(Unmapped::Later(_)) => break,
                        }
                        next = Some(next.map_or(id + 1, |n| n.max(id + 1)));
                    }
                    let n = items.len();
                    match platforms.receive(&self.instance, items, next).await {
                        Ok(()) => {
                            offset = next;
                            continue;
                        }
                        Err(e) => {
                            // A store that cannot write: said once per episode by the store.
                            if e.is_unavailable() {
                                tracing::debug!(
                                    platform,
                                    "telegram `{name}`: cannot store {n} messages ({e}); they are fetched again"
                                );
                            } else {
                                tracing::error!(
                                    platform,
                                    "telegram `{name}`: cannot store {n} messages ({e}); they are fetched again"
                                );
                            }
                            self.instance.failed(&format!("store: {e}"));
                            Duration::from_secs(1)
                        }
                    }
                }
                Err(ApiError::RetryAfter(d, _)) => d,
                Err(e) => {
                    let hint = match &e {
                        ApiError::Refused { code: 409, .. } => {
                            "; another program polls this bot, or a webhook is set (hermes-gateway platforms telegram delete-webhook NAME)"
                        }
                        ApiError::Refused {
                            code: 401 | 404, ..
                        } => {
                            "; Telegram does not know this token (check token in the configuration)"
                        }
                        _ => "",
                    };
                    tracing::warn!(
                        platform,
                        "telegram `{name}`: getUpdates failed: {e}{hint}; again in {backoff:?}"
                    );
                    self.instance.failed(&format!("{e}{hint}"));
                    if matches!(e, ApiError::Refused { .. }) {
                        self.instance.set_state("error");
                    }
                    let w = backoff;
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    w
                }
            };
            tokio::select! {
                _ = shutdown.started() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
        self.instance.set_state("stopped");
        tracing::info!(platform, "telegram `{name}`: polling stopped for the drain");
    }

    /// An update as a message to take, or why it is not.
    pub fn map(&self, u: &Value) -> Result<Inbound, Unmapped> {
        let update_id = u["update_id"].as_i64().ok_or("no update_id")?;
        let Some(msg) = u.get("message").filter(|m| m.is_object()) else {
            let kind = u
                .as_object()
                .and_then(|o| o.keys().find(|k| *k != "update_id"))
                .map_or("an empty", String::as_str);
            return Err(format!("{kind} update, not a new message").into());
        };
        let chat = &msg["chat"];
        let chat_id = chat["id"].as_i64().ok_or("a message without chat.id")?;
        let chat_type = chat["type"].as_str().unwrap_or("private");
        if chat_type == "channel" {
            return Err("a channel post".into());
        }
        let from = &msg["from"];
        let user_id = from["id"].as_i64().ok_or("a message without a sender")?;
        if from["is_bot"].as_bool() == Some(true) {
            return Err("a message from a bot".into());
        }
        let text = msg["text"]
            .as_str()
            .or_else(|| msg["caption"].as_str())
            .filter(|t| !t.trim().is_empty())
            .ok_or("no text (a sticker, a photo without caption, a service message…)")?;
        let thread = if msg["is_topic_message"].as_bool() == Some(true) {
            msg["message_thread_id"].as_i64()
        } else {
            None
        };
        let group = matches!(chat_type, "group" | "supergroup");
        let username = self.username();
        if group && username.is_none() && text.contains('@') {
            return Err(Unmapped::Later(
                "a group message that may mention the bot, whose username is not known yet",
            ));
        }
        let mut text = text.to_owned();
        // `/cmd@ourbot args` → `/cmd args`; a command for another bot is not ours.
        if text.starts_with('/') {
            let (first, rest) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
            if let Some((cmd, to)) = first.split_once('@') {
                match &username {
                    Some(u) if to.eq_ignore_ascii_case(u) => {}
                    Some(_) => return Err("a command for another bot".into()),
                    // Unknown username: only in a private chat is it certainly ours.
                    None if group => {
                        return Err("a command for a bot (our username is not known yet)".into());
                    }
                    None => {}
                }
                text = format!("{cmd} {rest}").trim_end().to_owned();
            }
        }
        if group {
            let mention = username.as_ref().map(|u| format!("@{u}"));
            let mentioned = mention
                .as_ref()
                .is_some_and(|m| text.to_ascii_lowercase().contains(&m.to_ascii_lowercase()))
                || msg["entities"].as_array().is_some_and(|es| {
                    es.iter().any(|e| {
                        e["type"] == "text_mention" && e["user"]["id"].as_i64() == self.bot_id
                    })
                });
            let replied = self.bot_id.is_some()
                && msg["reply_to_message"]["from"]["id"].as_i64() == self.bot_id;
            if !(text.starts_with('/') || mentioned || replied) {
                return Err("a group message not addressed to the bot".into());
            }
            if let Some(m) = &mention {
                text = strip_ci(&text, m).trim().to_owned();
            }
            if text.is_empty() {
                return Err("a bare mention".into());
            }
        }
        let name = self.instance.name.clone();
        let settings = self.settings();
        let shared = group && settings.group_sessions == GroupSessions::Shared;
        let mut chat_key = format!("telegram:{name}:{chat_id}");
        if group && !shared {
            chat_key.push_str(&format!(":{user_id}"));
        }
        if let Some(t) = thread {
            chat_key.push_str(&format!(":{t}"));
        }
        Ok(Inbound {
            source_id: update_id.to_string(),
            message_id: msg["message_id"].as_i64().unwrap_or(0).to_string(),
            chat_id: chat_id.to_string(),
            thread_id: thread.map(|t| t.to_string()),
            user_id: user_id.to_string(),
            user_name: display_name(from),
            chat_key,
            text,
            sender_prefix: shared,
            unsupported: None,
        })
    }
}

/// Why an update is not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmapped {
    /// Never: it is let go (and confirmed) — an edit, a sticker, a group chat message not
    /// addressed to the bot…
    LetGo(String),
    /// Not yet: it cannot be judged now (the bot's username is not known yet); a webhook
    /// answers 503 so that Telegram sends it again.
    Later(&'static str),
}

impl From<&str> for Unmapped {
    fn from(s: &str) -> Self {
        Unmapped::LetGo(s.to_owned())
    }
}

impl From<String> for Unmapped {
    fn from(s: String) -> Self {
        Unmapped::LetGo(s)
    }
}

impl std::fmt::Display for Unmapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unmapped::LetGo(s) => f.write_str(s),
            Unmapped::Later(s) => f.write_str(s),
        }
    }
}

/// `s` without any case-insensitive occurrence of `what`.
fn strip_ci(s: &str, what: &str) -> String {
    let lower = s.to_ascii_lowercase();
    let w = what.to_ascii_lowercase();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while let Some(p) = lower[i..].find(&w) {
        out.push_str(&s[i..i + p]);
        i += p + w.len();
    }
    out.push_str(&s[i..]);
    out
}

/// `First Last (@username)`, as far as Telegram says.
fn display_name(from: &Value) -> String {
    let mut n = from["first_name"].as_str().unwrap_or("").to_owned();
    if let Some(l) = from["last_name"].as_str() {
        n.push(' ');
        n.push_str(l);
    }
    if let Some(u) = from["username"].as_str() {
        if n.is_empty() {
            n = format!("@{u}");
        } else {
            n.push_str(&format!(" (@{u})"));
        }
    }
    if n.trim().is_empty() {
        from["id"].to_string()
    } else {
        n.chars().filter(|c| !c.is_control()).take(100).collect()
    }
}

fn id_value(s: &str) -> Value {
    s.parse::<i64>()
        .map_or_else(|_| Value::from(s), Value::from)
}

impl Adapter for Telegram {
    fn typing<'a>(&'a self, target: &'a ChatTarget) -> super::Typing<'a> {
        Box::pin(async move {
            let mut body = json!({"chat_id": id_value(&target.chat_id), "action": "typing"});
            if let Some(t) = &target.thread_id {
                body["message_thread_id"] = id_value(t);
            }
            if let Err(e) = self
                .api
                .call("sendChatAction", &body, Duration::from_secs(10))
                .await
            {
                tracing::debug!(platform = "telegram", chat_id = %target.chat_id, "sendChatAction: {e}");
            }
        })
    }

    fn max_len(&self) -> usize {
        MAX_MESSAGE
    }

    fn unit(&self) -> chunk::Unit {
        chunk::utf16
    }

    fn send_part<'a>(&'a self, target: &'a ChatTarget, part: Part<'a>) -> SendFuture<'a> {
        let (text, first) = (part.text, part.index == 0);
        Box::pin(async move {
            let timeout = Duration::from_secs(30);
            let mut body = json!({"chat_id": id_value(&target.chat_id), "text": text});
            if let Some(t) = &target.thread_id {
                body["message_thread_id"] = id_value(t);
            }
            if first && let Some(r) = &target.reply_to {
                body["reply_parameters"] =
                    json!({"message_id": id_value(r), "allow_sending_without_reply": true});
            }
            let html = if self.settings().markdown {
                markdown::to_html(text)
            } else {
                None
            };
            if let Some(h) = html {
                body["text"] = h.into();
                body["parse_mode"] = "HTML".into();
                match self.api.call("sendMessage", &body, timeout).await {
                    Ok(_) => return Ok(1),
                    Err(ApiError::Refused {
                        code: 400,
                        description,
                        ..
                    }) if description.contains("parse") => {
                        tracing::info!(platform = "telegram", chat_id = %target.chat_id,
                            "Telegram refused the reply's HTML ({description}): sending it as plain text");
                    }
                    Err(e) => return Err(e.into_send_error()),
                }
                body["text"] = text.into();
                if let Some(o) = body.as_object_mut() {
                    o.remove("parse_mode");
                }
            }
            self.api
                .call("sendMessage", &body, timeout)
                .await
                .map(|_| 1)
                .map_err(ApiError::into_send_error)
        })
    }
}

impl WebhookInbox for Telegram {
    fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// Telegram sends the configured secret in `X-Telegram-Bot-Api-Secret-Token`.
    fn verify(&self, req: &Request<'_>) -> Result<(), Refused> {
        let Some(secret) = &self.secret else {
            return Err(Refused::unauthorized(
                "invalid_secret_token",
                "no webhook_secret is configured",
            ));
        };
        signature::verify_token(secret.expose().as_bytes(), SECRET_HEADER, req.headers).map_err(
            |e| Refused::unauthorized("invalid_secret_token", format!("{SECRET_HEADER}: {e}")),
        )
    }

    /// One update: 200 once it is committed; a repeated `update_id` is 200 and runs
    /// nothing; an update let go is 200 at once.
    fn read(&self, req: &Request<'_>) -> Result<Taken, Refused> {
        let update: Value = match serde_json::from_slice(req.body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Err(malformed("the body is not a JSON object")),
            Err(e) => return Err(malformed(format!("the body is not JSON: {e}"))),
        };
        let Some(id) = update["update_id"].as_i64() else {
            return Err(malformed("the update has no integer update_id"));
        };
        match self.map(&update) {
            Ok(m) => Ok(Taken {
                messages: vec![m],
                reply: Reply::Empty,
            }),
            Err(Unmapped::Later(why)) => Err(Refused::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                format!("update {id} cannot be judged yet: {why}; Telegram sends it again"),
            )),
            Err(Unmapped::LetGo(why)) => {
                tracing::debug!(
                    platform = "telegram",
                    source_id = id,
                    "telegram `{}`: update {id} let go: {why}",
                    self.instance.name
                );
                Ok(Taken::nothing(Reply::Empty))
            }
        }
    }
}

fn malformed(message: impl Into<String>) -> Refused {
    Refused::new(StatusCode::BAD_REQUEST, "malformed_update", message)
}
