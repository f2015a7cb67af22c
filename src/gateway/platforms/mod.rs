//! Chat platforms, on one durable core. A platform (a folder: `telegram/`) maps what its
//! service sends into [`Inbound`] messages and sends replies through an [`Adapter`];
//! everything else is the core's, written once:
//!
//! - **The inbox**: a message is committed to the store before it is acknowledged (a
//!   webhook answered 2xx, a polling offset confirmed). It is a delivery of the ledger
//!   (route `telegram:NAME`, deduplicated by the platform's own id) and, when it asks the
//!   agent something, a durable run of its chat's session, both in the same commit.
//! - **Order**: runs are queued for their sessions in the order their messages committed
//!   ([`crate::store::Store::write_then`]), so one chat's turns run strictly in order while
//!   chats run concurrently; replies of a chat go out in that order too (the ledger's
//!   lanes).
//! - **Replies** are ledger deliveries: retried with backoff and jitter, paced by the
//!   platform's rate limit, waiting its `retry_after`, split at its length limit
//!   ([`chunk`]); each part confirmed is recorded, so a restart re-sends at most the part
//!   in flight, marked as possibly repeated.
//! - **Access** (deny by default, `allowed_users`, `allow_all`, pairing codes approved by
//!   the operator), **commands** (`/new`, `/stop`, `/status`, `/help`, `/start`,
//!   `/restart`), a per-chat inbound limit and the queue bound.

mod access;
pub mod chunk;
mod commands;
pub mod http;
mod inbox;
pub mod line;
mod outbox;
pub mod slack;
pub mod telegram;
pub mod twilio;
pub mod webhook;
pub mod whatsapp;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use serde::Serialize;
use serde_json::{Value, json};

use super::deliveries::chat::SendFuture;
use super::deliveries::{ChatOutbox, ChatTarget, DeliveryLedger};
use super::rate::{KeyedBuckets, TokenBucket};
use super::sessions::Sessions;
use crate::config::{AccessConfig, Config, RateLimit};
use crate::lifecycle::LifecycleHandle;
use crate::store::deliveries as rows;
use crate::store::platforms as stored;
use crate::store::{self, Store};
use outbox::Outbox;

/// A message from a chat, as a platform maps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inbound {
    /// The platform's id for this delivery (Telegram's `update_id`): the dedupe key.
    pub source_id: String,
    pub message_id: String,
    pub chat_id: String,
    /// A forum topic or thread: replies go there.
    pub thread_id: Option<String>,
    pub user_id: String,
    /// How the platform names the user, for logs and the operator's pairing list.
    pub user_name: String,
    /// The conversation it belongs to (`telegram:NAME:CHAT[:USER][:THREAD]`): the session,
    /// until `/new` moves the chat to another.
    pub chat_key: String,
    pub text: String,
    /// Shared group session: the agent sees who is speaking.
    pub sender_prefix: bool,
    /// What the message holds instead of text that the agent cannot be given (`a voice
    /// message`): the gateway answers it itself, saying so; no turn runs.
    pub unsupported: Option<String>,
}

/// How a platform sends one message of a reply.
pub trait Adapter: Send + Sync + 'static {
    /// The most one message may hold, as [`Adapter::unit`] counts.
    fn max_len(&self) -> usize;
    fn unit(&self) -> chunk::Unit;
    /// How many parts one request may carry (LINE's push takes 5 messages); 1 by default.
    fn batch(&self) -> usize {
        1
    }
    /// Sends one part of a reply.
    fn send_part<'a>(&'a self, target: &'a ChatTarget, part: Part<'a>) -> SendFuture<'a>;
    /// Sends consecutive parts (2 to [`Adapter::batch`]) in one request: all of them are
    /// confirmed, or none. The outbox only calls it when `batch() > 1`; by default the
    /// parts go one by one.
    fn send_parts<'a>(&'a self, target: &'a ChatTarget, parts: &'a [Part<'a>]) -> SendFuture<'a> {
        Box::pin(async move {
            for p in parts {
                self.send_part(target, *p).await?;
            }
            Ok(parts.len())
        })
    }
    /// "typing…" in the chat, best effort (a platform without it does nothing).
    fn typing<'a>(&'a self, target: &'a ChatTarget) -> Typing<'a>;
}

/// One part of a reply, as an adapter sends it.
#[derive(Debug, Clone, Copy)]
pub struct Part<'a> {
    pub text: &'a str,
    /// 0 for the first part (which quotes the user's message, where the platform can).
    pub index: usize,
    /// The reply's ledger id: stable across attempts and restarts, so a platform that
    /// deduplicates requests (LINE's `X-Line-Retry-Key`) can be given a stable key.
    pub delivery_id: &'a str,
}

pub type Typing<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;

/// What one platform instance (`[[platforms.telegram]] name = "main"`) shares with the
/// core: its access rules, its inbound limit and its health for `status`.
pub struct Instance {
    pub platform: &'static str,
    pub name: String,
    /// `telegram:main`: the ledger route and outbox key.
    key: String,
    mode: &'static str,
    /// Commands are plain words on this platform (no slash commands).
    words: bool,
    access: RwLock<Arc<AccessConfig>>,
    chat_limit: RwLock<Arc<KeyedBuckets>>,
    /// Chats told they send too fast, until their bucket lets a message through again.
    flooded: Mutex<HashSet<String>>,
    health: Mutex<Health>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct Health {
    /// `starting`, `polling`, `webhook`, `error`, `stopped`.
    state: &'static str,
    last_error: Option<String>,
    last_error_unix_ms: Option<i64>,
    /// The last request that worked (a poll, a send, an accepted webhook).
    last_ok_unix_ms: Option<i64>,
}

impl Health {
    /// The last request worked (or none failed yet, before the first one).
    fn up(&self) -> bool {
        match (self.last_ok_unix_ms, self.last_error_unix_ms) {
            (Some(ok), Some(err)) => ok >= err,
            (_, None) => true,
            (None, Some(_)) => false,
        }
    }
}

impl Instance {
    /// `words`: the platform has no slash commands; `new`, `stop`, … alone in a message
    /// are the commands.
    fn new(
        platform: &'static str,
        name: &str,
        mode: &'static str,
        words: bool,
        access: &AccessConfig,
        chat_limit: RateLimit,
    ) -> Arc<Self> {
        Arc::new(Instance {
            platform,
            name: name.to_owned(),
            key: format!("{platform}:{name}"),
            mode,
            words,
            access: RwLock::new(Arc::new(access.clone())),
            chat_limit: RwLock::new(Arc::new(KeyedBuckets::new(chat_limit))),
            flooded: Mutex::new(HashSet::new()),
            health: Mutex::new(Health {
                state: "starting",
                ..Health::default()
            }),
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A request to the platform worked; `state` names what the instance is doing.
    pub fn ok(&self, state: &'static str) {
        let mut h = self.health();
        h.state = state;
        h.last_ok_unix_ms = Some(store::now_ms());
    }

    /// A request to the platform failed (logged by the caller).
    pub fn failed(&self, error: &str) {
        let mut h = self.health();
        h.last_error = Some(error.to_owned());
        h.last_error_unix_ms = Some(store::now_ms());
    }

    /// The instance cannot work until something changes (polling refused, say).
    pub fn set_state(&self, state: &'static str) {
        self.health().state = state;
    }

    /// A reload: the access rules now, and the inbound limit if it changed.
    pub fn reload(&self, access: &AccessConfig, chat_limit: RateLimit) {
        *self.access.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(access.clone());
        if chat_limit != self.chat_limit().limit() {
            *self
                .chat_limit
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Arc::new(KeyedBuckets::new(chat_limit));
        }
    }

    fn access(&self) -> Arc<AccessConfig> {
        self.access
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A reload: the access rules and the per-chat inbound limit change now.
    pub fn reconfigure(&self, access: &AccessConfig, chat_limit: RateLimit) {
        *self.access.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(access.clone());
        if chat_limit != self.chat_limit().limit() {
            *self
                .chat_limit
                .write()
                .unwrap_or_else(PoisonError::into_inner) = Arc::new(KeyedBuckets::new(chat_limit));
        }
    }

    fn chat_limit(&self) -> Arc<KeyedBuckets> {
        self.chat_limit
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn target(&self, m: &Inbound, ordered: bool) -> ChatTarget {
        ChatTarget {
            platform: self.platform.to_owned(),
            name: self.name.clone(),
            chat_id: m.chat_id.clone(),
            thread_id: m.thread_id.clone(),
            reply_to: Some(m.message_id.clone()),
            ordered,
        }
    }
}

#[derive(Clone)]
pub struct Platforms {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    sessions: Sessions,
    ledger: DeliveryLedger,
    lifecycle: LifecycleHandle,
    model: RwLock<String>,
    instances: Vec<Arc<Instance>>,
    telegram: HashMap<String, Arc<telegram::Telegram>>,
    slack: HashMap<String, Arc<slack::Slack>>,
    whatsapp: HashMap<String, Arc<whatsapp::WhatsApp>>,
    line: HashMap<String, Arc<line::Line>>,
    twilio: HashMap<String, Arc<twilio::Twilio>>,
    /// The instances that take webhooks, by `platform:name`.
    inboxes: HashMap<String, Arc<dyn webhook::WebhookInbox>>,
    /// Webhook bodies: `[webhook] max_body` and `body_timeout`.
    body_limits: RwLock<(u64, Duration)>,
    /// Chats moved to a session of their own by `/new`: chat key → session id.
    chats: RwLock<HashMap<String, String>>,
    /// (instance key, user id) approved by the operator.
    approved: RwLock<HashSet<(String, String)>>,
    /// (instance key, user id) → the pairing code handed out.
    pending: Mutex<HashMap<(String, String), String>>,
    /// (instance key, user id) → when the user was last told they may not.
    told: Mutex<HashMap<(String, String), Instant>>,
}

impl Platforms {
    /// Reads every platform's secrets (errors name the platform and the key, never a
    /// value) and what the store remembers. Blocking: call off the runtime's workers.
    pub fn new(
        config: &Config,
        store: Store,
        sessions: Sessions,
        ledger: DeliveryLedger,
        lifecycle: LifecycleHandle,
    ) -> Result<Platforms, String> {
        let mut instances = Vec::new();
        let mut tg = HashMap::new();
        let mut inboxes: HashMap<String, Arc<dyn webhook::WebhookInbox>> = HashMap::new();
        for t in &config.platforms.telegram {
            let telegram = Arc::new(telegram::Telegram::new(t)?);
            instances.push(telegram.instance().clone());
            if t.mode == crate::config::TelegramMode::Webhook {
                inboxes.insert(telegram.instance().key().to_owned(), telegram.clone());
            }
            tg.insert(t.name.clone(), telegram);
        }
        let mut outboxes: Vec<(String, Arc<dyn ChatOutbox>)> = Vec::new();
        let mut slack = HashMap::new();
        for c in &config.platforms.slack {
            let s = Arc::new(slack::Slack::new(c)?);
            webhook_platform(
                &s,
                c.send_rate_limit,
                &mut instances,
                &mut inboxes,
                &mut outboxes,
            );
            slack.insert(c.name.clone(), s);
        }
        let mut whatsapp = HashMap::new();
        for c in &config.platforms.whatsapp {
            let w = Arc::new(whatsapp::WhatsApp::new(c)?);
            webhook_platform(
                &w,
                c.send_rate_limit,
                &mut instances,
                &mut inboxes,
                &mut outboxes,
            );
            whatsapp.insert(c.name.clone(), w);
        }
        let mut lines = HashMap::new();
        for c in &config.platforms.line {
            let l = Arc::new(line::Line::new(c)?);
            webhook_platform(
                &l,
                l.send_rate(),
                &mut instances,
                &mut inboxes,
                &mut outboxes,
            );
            lines.insert(c.name.clone(), l);
        }
        let mut twilios = HashMap::new();
        for c in &config.platforms.twilio {
            let t = Arc::new(twilio::Twilio::new(c)?);
            webhook_platform(
                &t,
                t.send_rate(),
                &mut instances,
                &mut inboxes,
                &mut outboxes,
            );
            twilios.insert(c.name.clone(), t);
        }
        let chats: HashMap<String, String> = store
            .read_blocking(stored::chat_sessions)
            .map_err(|e| format!("cannot read the chats' sessions: {e}"))?
            .into_iter()
            .collect();
        let users = store
            .read_blocking(stored::users)
            .map_err(|e| format!("cannot read the paired users: {e}"))?;
        let mut approved = HashSet::new();
        let mut pending = HashMap::new();
        for u in users {
            let k = (format!("{}:{}", u.platform, u.name), u.user_id);
            match u.code {
                Some(code) if u.state == "pending" => {
                    pending.insert(k, code);
                }
                _ if u.state == "approved" => {
                    approved.insert(k);
                }
                _ => {}
            }
        }
        let platforms = Platforms {
            inner: Arc::new(Inner {
                store,
                sessions,
                ledger,
                lifecycle,
                model: RwLock::new(config.agent.model.clone()),
                instances,
                telegram: tg,
                slack,
                whatsapp,
                line: lines,
                twilio: twilios,
                inboxes,
                body_limits: RwLock::new((config.webhook.max_body, config.webhook.body_timeout)),
                chats: RwLock::new(chats),
                approved: RwLock::new(approved),
                pending: Mutex::new(pending),
                told: Mutex::new(HashMap::new()),
            }),
        };
        for t in platforms.inner.telegram.values() {
            let outbox = Outbox {
                instance: t.instance().clone(),
                adapter: t.clone(),
                pace: Mutex::new(TokenBucket::new(t.send_rate())),
            };
            platforms
                .inner
                .ledger
                .register_outbox(t.instance().key().to_owned(), Arc::new(outbox));
        }
        for (key, outbox) in outboxes {
            platforms.inner.ledger.register_outbox(key, outbox);
        }
        for i in &platforms.inner.instances {
            let a = i.access();
            if !a.allow_all && !a.pairing && a.allowed_users.is_empty() && a.admins.is_empty() {
                tracing::warn!(
                    platform = i.platform,
                    "{} `{}`: nobody may talk to the agent (no allowed_users, admins, allow_all or pairing): every message is refused",
                    i.platform,
                    i.name
                );
            }
        }
        Ok(platforms)
    }

    /// Starts what runs on its own: polling, the bots' self-description, and the restart
    /// notices owed. Polling stops when the drain begins.
    pub fn start(&self) {
        for t in self.inner.telegram.values() {
            t.clone()
                .start(self.clone(), self.inner.lifecycle.shutdown());
        }
        let this = self.clone();
        tokio::spawn(async move {
            if let Err(e) = this.send_restart_notices().await {
                tracing::error!(
                    "cannot send the restart notices: {e}; they are sent at the next start"
                );
            }
        });
    }

    pub fn is_empty(&self) -> bool {
        self.inner.instances.is_empty()
    }

    /// A reload: access rules, limits and the model change live; adding, removing or
    /// re-keying a platform takes a restart.
    pub fn update(&self, config: &Config) {
        *self
            .inner
            .model
            .write()
            .unwrap_or_else(PoisonError::into_inner) = config.agent.model.clone();
        *self
            .inner
            .body_limits
            .write()
            .unwrap_or_else(PoisonError::into_inner) =
            (config.webhook.max_body, config.webhook.body_timeout);
        let mut seen = HashSet::new();
        for t in &config.platforms.telegram {
            seen.insert(format!("telegram:{}", t.name));
            match self.inner.telegram.get(&t.name) {
                Some(live) => live.update(t),
                None => tracing::warn!(
                    platform = "telegram",
                    "telegram `{}` was added: this takes a restart (SIGUSR1)",
                    t.name
                ),
            }
        }
        for c in &config.platforms.slack {
            seen.insert(format!("slack:{}", c.name));
            match self.inner.slack.get(&c.name) {
                Some(live) => live.update(c),
                None => added("slack", &c.name),
            }
        }
        for c in &config.platforms.whatsapp {
            seen.insert(format!("whatsapp:{}", c.name));
            match self.inner.whatsapp.get(&c.name) {
                Some(live) => live.update(c),
                None => added("whatsapp", &c.name),
            }
        }
        for c in &config.platforms.line {
            seen.insert(format!("line:{}", c.name));
            match self.inner.line.get(&c.name) {
                Some(live) => live.update(c),
                None => added("line", &c.name),
            }
        }
        for c in &config.platforms.twilio {
            seen.insert(format!("twilio:{}", c.name));
            match self.inner.twilio.get(&c.name) {
                Some(live) => live.update(c),
                None => added("twilio", &c.name),
            }
        }
        for i in &self.inner.instances {
            if !seen.contains(i.key()) {
                tracing::warn!(
                    platform = i.platform,
                    "{} `{}` was removed from the configuration: it keeps running until a restart",
                    i.platform,
                    i.name
                );
            }
        }
    }

    /// Each instance with its backlog (messages taken and replies not yet delivered; `None`
    /// when the store cannot be read) and its health now.
    async fn snapshot(&self) -> Vec<(&Arc<Instance>, Option<i64>, Health)> {
        let mut out = Vec::with_capacity(self.inner.instances.len());
        for i in &self.inner.instances {
            let route = i.key.clone();
            let backlog = self
                .inner
                .store
                .read(move |c| rows::count_open(c, &route))
                .await
                .ok();
            out.push((i, backlog, i.health().clone()));
        }
        out
    }

    /// Each platform instance for `status`: its state, last error, and backlog.
    pub async fn status(&self) -> Vec<Value> {
        self.snapshot()
            .await
            .into_iter()
            .map(|(i, backlog, h)| {
                json!({
                    "platform": i.platform,
                    "name": i.name,
                    "mode": i.mode,
                    "state": h.state,
                    "last_error": h.last_error,
                    "last_error_unix_ms": h.last_error_unix_ms,
                    "last_ok_unix_ms": h.last_ok_unix_ms,
                    "backlog": backlog,
                })
            })
            .collect()
    }

    /// For `/health/detailed`: each instance (`telegram:main`) ok, or in error with its last
    /// error, with its state and backlog.
    pub async fn health(&self) -> Value {
        let mut out = serde_json::Map::new();
        for (i, backlog, h) in self.snapshot().await {
            let failing = !h.up() || h.state == "error";
            let mut v = json!({
                "status": if failing { "error" } else { "ok" },
                "state": h.state,
                "mode": i.mode,
                "backlog": backlog,
                "last_ok_unix_ms": h.last_ok_unix_ms,
            });
            if failing {
                v["error"] = Value::from(h.last_error.unwrap_or_else(|| h.state.to_owned()));
            }
            out.insert(i.key.clone(), v);
        }
        Value::Object(out)
    }

    /// For a scrape: each instance's backlog, whether its last request worked, and when one
    /// last did.
    pub async fn export_metrics(&self) {
        for (i, backlog, h) in self.snapshot().await {
            let last = h.last_ok_unix_ms.map_or(0.0, |t| t as f64 / 1000.0);
            crate::metrics::platform_state(i.platform, &i.name, backlog.unwrap_or(0), h.up(), last);
        }
    }

    fn inbox(&self, platform: &str, name: &str) -> Option<Arc<dyn webhook::WebhookInbox>> {
        self.inner
            .inboxes
            .get(&format!("{platform}:{name}"))
            .cloned()
    }

    fn body_limits(&self) -> (u64, Duration) {
        *self
            .inner
            .body_limits
            .read()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }
}

fn added(platform: &'static str, name: &str) {
    tracing::warn!(
        platform,
        "{platform} `{name}` was added: this takes a restart (SIGUSR1)"
    );
}

/// A platform instance that only takes webhooks: its instance, its inbox and its outbox
/// (paced by `send_rate`) join the core's.
fn webhook_platform<P: webhook::WebhookInbox + Adapter>(
    p: &Arc<P>,
    send_rate: RateLimit,
    instances: &mut Vec<Arc<Instance>>,
    inboxes: &mut HashMap<String, Arc<dyn webhook::WebhookInbox>>,
    outboxes: &mut Vec<(String, Arc<dyn ChatOutbox>)>,
) {
    let instance = p.instance().clone();
    let key = instance.key().to_owned();
    instances.push(instance.clone());
    inboxes.insert(key.clone(), p.clone());
    let outbox = Outbox {
        instance,
        adapter: p.clone(),
        pace: Mutex::new(TokenBucket::new(send_rate)),
    };
    outboxes.push((key, Arc::new(outbox)));
}

/// The webhook routes of every platform: `GET|POST /platforms/PLATFORM/NAME`.
pub fn router(platforms: Platforms) -> Router {
    webhook::router(platforms)
}
