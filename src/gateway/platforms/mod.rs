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

pub mod chunk;
mod commands;
pub mod telegram;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use serde::Serialize;
use serde_json::{Value, json};

use super::deliveries::chat::{RESENT_MARKER, SendFuture};
use super::deliveries::{ChatDelivery, ChatOutbox, ChatTarget, DeliveryLedger, Target};
use super::ids::{self, new_id};
use super::rate::{KeyedBuckets, TokenBucket};
use super::sessions::{NewRun, Sessions};
use crate::config::{AccessConfig, Config, RateLimit};
use crate::lifecycle::LifecycleHandle;
use crate::store::deliveries::{self as rows, DeliveryRow};
use crate::store::platforms::{self as stored, PlatformUser, RestartNotice};
use crate::store::runs::{RunRow, RunStatus};
use crate::store::{self, Store, StoreError};
use commands::Command;

/// A refused user is told again at most this often.
const TELL_AGAIN: Duration = Duration::from_secs(3600);

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
}

/// How a platform sends one message of a reply.
pub trait Adapter: Send + Sync + 'static {
    /// The most one message may hold, as [`Adapter::unit`] counts.
    fn max_len(&self) -> usize;
    fn unit(&self) -> chunk::Unit;
    /// Sends one part; `first`: the reply's first part (it quotes the user's message).
    fn send_part<'a>(
        &'a self,
        target: &'a ChatTarget,
        text: &'a str,
        first: bool,
    ) -> SendFuture<'a>;
    /// "typing…" in the chat, best effort.
    fn typing<'a>(&'a self, target: &'a ChatTarget) -> Typing<'a>;
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

impl Instance {
    fn new(
        platform: &'static str,
        name: &str,
        mode: &'static str,
        access: &AccessConfig,
        chat_limit: RateLimit,
    ) -> Arc<Self> {
        Arc::new(Instance {
            platform,
            name: name.to_owned(),
            key: format!("{platform}:{name}"),
            mode,
            words: false,
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

    fn access(&self) -> Arc<AccessConfig> {
        self.access
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
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

/// What one inbound message becomes, decided before its commit.
enum Plan {
    /// Logged and let go: nothing stored (a user not allowed who was told already, a
    /// flooding chat).
    Drop,
    /// A turn of the chat's session and the delivery of its reply.
    Turn { row: DeliveryRow, run: NewRun },
    /// An answer of the gateway's own (a command, a refusal), and what else it does once
    /// committed. A row already `delivered` is only a record (`/restart`).
    Answer { row: DeliveryRow, effect: Effect },
}

enum Effect {
    None,
    /// `/stop`: cancel this run.
    Stop(String),
    /// `/new`: the chat's session from now on.
    NewSession {
        chat_key: String,
        session: String,
    },
    /// A pairing code handed out.
    Pair(PlatformUser),
    /// `/restart`: the notice owed once the gateway is back.
    Restart(RestartNotice),
}

impl Plan {
    fn record(&self) -> Option<&DeliveryRow> {
        match self {
            Plan::Drop => None,
            Plan::Turn { row, .. } | Plan::Answer { row, .. } => Some(row),
        }
    }

    /// Inside the batch's transaction.
    fn store(&self, c: &rusqlite::Connection, now: i64) -> rusqlite::Result<()> {
        match self {
            Plan::Drop => Ok(()),
            Plan::Turn { row, run } => {
                rows::insert(c, row)?;
                run.store(c)
            }
            Plan::Answer { row, effect } => {
                rows::insert(c, row)?;
                match effect {
                    Effect::None | Effect::Stop(_) => Ok(()),
                    Effect::NewSession { chat_key, session } => {
                        stored::set_chat_session(c, chat_key, session, now)
                    }
                    Effect::Pair(u) => stored::insert_user(c, u),
                    Effect::Restart(n) => stored::add_restart(c, n),
                }
            }
        }
    }
}

/// What the messages of one batch decided before any of them committed: later messages
/// of a batch see what earlier ones will do.
#[derive(Default)]
struct Batch {
    /// Turns planned per session.
    turns: HashMap<String, usize>,
    /// Sessions changed by a `/new` of the batch.
    sessions: HashMap<String, String>,
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
        for t in &config.platforms.telegram {
            let telegram = telegram::Telegram::new(t)?;
            instances.push(telegram.instance().clone());
            tg.insert(t.name.clone(), Arc::new(telegram));
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

    fn session_of(&self, chat_key: &str, batch: &Batch) -> String {
        if let Some(s) = batch.sessions.get(chat_key) {
            return s.clone();
        }
        self.inner
            .chats
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(chat_key)
            .cloned()
            .unwrap_or_else(|| chat_key.to_owned())
    }

    fn allowed(&self, inst: &Instance, access: &AccessConfig, user: &str) -> bool {
        access.allow_all
            || access.allowed_users.iter().any(|u| u == user)
            || access.admins.iter().any(|u| u == user)
            || self
                .inner
                .approved
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&(inst.key.clone(), user.to_owned()))
    }

    /// Whether a user who may not talk to the agent is to be told so now (at most hourly).
    fn tell(&self, inst: &Instance, user: &str) -> bool {
        let mut told = self
            .inner
            .told
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if told.len() > 10_000 {
            told.retain(|_, t| now.duration_since(*t) < TELL_AGAIN);
        }
        let k = (inst.key.clone(), user.to_owned());
        match told.get(&k) {
            Some(t) if now.duration_since(*t) < TELL_AGAIN => false,
            _ => {
                told.insert(k, now);
                true
            }
        }
    }

    /// A delivery row for an answer of the gateway's own.
    fn answer_row(&self, inst: &Instance, m: &Inbound, event: &str, text: &str) -> DeliveryRow {
        let now = store::now_ms();
        DeliveryRow {
            id: new_id("dlv_"),
            route: inst.key.clone(),
            source_id: m.source_id.clone(),
            event: event.to_owned(),
            state: "pending".into(),
            prompt: m.text.clone(),
            session_id: None,
            run_id: String::new(),
            target: Target::Chat(inst.target(m, false)).to_json(),
            result: Some(json!({"status": "completed", "output": text}).to_string()),
            attempts: 0,
            last_error: None,
            next_attempt_at: Some(now),
            received_at: now,
            updated_at: now,
            progress: 0,
        }
    }

    fn answer(&self, inst: &Instance, m: &Inbound, event: &str, text: &str) -> Plan {
        Plan::Answer {
            row: self.answer_row(inst, m, event, text),
            effect: Effect::None,
        }
    }

    /// Decides what `m` becomes. Commands are answered whatever the chat's queue holds.
    fn plan(&self, inst: &Instance, m: &Inbound, batch: &mut Batch) -> Plan {
        let access = inst.access();
        let log_refused = |what: &str| {
            tracing::warn!(platform = inst.platform, chat_id = %m.chat_id, message_id = %m.message_id,
                user_id = %m.user_id, "{} `{}`: message from {} ({}), who may not talk to the agent: {what}",
                inst.platform, inst.name, m.user_name, m.user_id);
        };
        if !self.allowed(inst, &access, &m.user_id) {
            if !self.tell(inst, &m.user_id) {
                log_refused("dropped (told already)");
                return Plan::Drop;
            }
            if access.pairing {
                let k = (inst.key.clone(), m.user_id.clone());
                let known = self
                    .inner
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&k)
                    .cloned();
                let code = known.clone().unwrap_or_else(|| ids::code(8));
                log_refused("given a pairing code");
                let row = self.answer_row(inst, m, "pairing", &commands::pairing(&code));
                let now = store::now_ms();
                let effect = match known {
                    Some(_) => Effect::None,
                    None => Effect::Pair(PlatformUser {
                        platform: inst.platform.to_owned(),
                        name: inst.name.clone(),
                        user_id: m.user_id.clone(),
                        state: "pending".into(),
                        code: Some(code),
                        display: m.user_name.clone(),
                        chat: Target::Chat(inst.target(m, false)).to_json(),
                        created_at: now,
                        updated_at: now,
                    }),
                };
                return Plan::Answer { row, effect };
            }
            log_refused("refused");
            return self.answer(inst, m, "refused", &commands::refused(&m.user_name));
        }
        let session = self.session_of(&m.chat_key, batch);
        let activity = self.inner.sessions.activity(&session);
        match commands::parse(&m.text, inst.words) {
            Some(Command::Help) => self.answer(inst, m, "command", commands::HELP),
            Some(Command::Start) => self.answer(inst, m, "command", commands::START),
            Some(Command::Status) => {
                let (running, waiting) = activity.map_or((false, 0), |a| (true, a.waiting));
                let text = commands::status(
                    &session,
                    running,
                    waiting + batch.turns.get(&session).copied().unwrap_or(0),
                    self.inner.lifecycle.uptime(),
                );
                self.answer(inst, m, "command", &text)
            }
            Some(Command::New) => {
                let new = format!("{}#{}", m.chat_key, ids::code(6).to_ascii_lowercase());
                batch.sessions.insert(m.chat_key.clone(), new.clone());
                Plan::Answer {
                    row: self.answer_row(inst, m, "command", &commands::new_session(&new)),
                    effect: Effect::NewSession {
                        chat_key: m.chat_key.clone(),
                        session: new,
                    },
                }
            }
            Some(Command::Stop) => match activity {
                Some(a) => Plan::Answer {
                    row: self.answer_row(inst, m, "command", commands::STOPPED),
                    effect: Effect::Stop(a.running),
                },
                None => self.answer(inst, m, "command", commands::NOTHING_TO_STOP),
            },
            Some(Command::Restart) => {
                if !access.admins.iter().any(|a| a == &m.user_id) {
                    tracing::warn!(platform = inst.platform, chat_id = %m.chat_id, message_id = %m.message_id,
                        user_id = %m.user_id, "/restart from a user who is not an admin: refused");
                    return self.answer(inst, m, "command", commands::NOT_ADMIN);
                }
                let mut row = self.answer_row(inst, m, "restart", "");
                // A record that the command was handled, so that it is never handled
                // twice; what the chat is told comes after the restart.
                row.state = "delivered".into();
                row.next_attempt_at = None;
                let notice = RestartNotice {
                    id: new_id("rst_"),
                    target: Target::Chat(inst.target(m, false)).to_json(),
                    requested_at: store::now_ms(),
                };
                Plan::Answer {
                    row,
                    effect: Effect::Restart(notice),
                }
            }
            None => {
                if inst.chat_limit().take(&m.chat_key).is_some() {
                    let first = inst
                        .flooded
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(m.chat_key.clone());
                    tracing::warn!(platform = inst.platform, chat_id = %m.chat_id, message_id = %m.message_id,
                        session_key = %session, "chat over its inbound limit (chat_rate_limit): message not taken");
                    return if first {
                        self.answer(inst, m, "flooded", commands::FLOODED)
                    } else {
                        Plan::Drop
                    };
                }
                inst.flooded
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&m.chat_key);
                let planned = batch.turns.get(&session).copied().unwrap_or(0);
                let waiting = activity.map_or(0, |a| a.waiting + 1) + planned;
                let depth = self.inner.sessions.limits().queue_depth;
                if waiting > depth {
                    tracing::warn!(platform = inst.platform, chat_id = %m.chat_id, message_id = %m.message_id,
                        session_key = %session, "session queue full ({waiting} waiting): message not taken");
                    return self.answer(inst, m, "queue_full", &commands::queue_full(waiting));
                }
                *batch.turns.entry(session.clone()).or_default() += 1;
                self.turn(inst, m, session)
            }
        }
    }

    fn turn(&self, inst: &Instance, m: &Inbound, session: String) -> Plan {
        let now = store::now_ms();
        let content = if m.sender_prefix {
            format!("[{}] {}", m.user_name, m.text)
        } else {
            m.text.clone()
        };
        let messages = vec![json!({"role": "user", "content": content})];
        let run = RunRow {
            id: new_id("run_"),
            session_id: Some(session.clone()),
            status: RunStatus::Queued,
            model: self
                .inner
                .model
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            input: Value::from(messages.clone()).to_string(),
            output: None,
            error: None,
            idempotency_key: None,
            request: None,
            attempt: 0,
            created_at: now,
            started_at: None,
            finished_at: None,
        };
        let row = DeliveryRow {
            id: new_id("dlv_"),
            route: inst.key.clone(),
            source_id: m.source_id.clone(),
            event: "message".into(),
            state: "received".into(),
            prompt: m.text.clone(),
            session_id: Some(session),
            run_id: run.id.clone(),
            target: Target::Chat(inst.target(m, true)).to_json(),
            result: None,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            received_at: now,
            updated_at: now,
            progress: 0,
        };
        let run = self.inner.sessions.new_run(run, messages);
        Plan::Turn { row, run }
    }

    /// Takes a batch of messages from `inst`: decided, committed in one transaction (with
    /// the polling `offset` to confirm next, if any), and only then acted on, in order.
    /// `Ok` means every message is stored (or was a repeat, or was let go on purpose):
    /// acknowledge them now.
    pub async fn receive(
        &self,
        inst: &Arc<Instance>,
        items: Vec<Inbound>,
        offset: Option<i64>,
    ) -> Result<(), StoreError> {
        let mut batch = Batch::default();
        let plans: Vec<Plan> = items
            .iter()
            .map(|m| self.plan(inst, m, &mut batch))
            .collect();
        let runs: Vec<String> = plans
            .iter()
            .filter_map(|p| match p {
                Plan::Turn { run, .. } => Some(run.id().to_owned()),
                _ => None,
            })
            .collect();
        let this = self.clone();
        let runtime = tokio::runtime::Handle::current();
        let (platform, name) = (inst.platform, inst.name.clone());
        let result = self
            .inner
            .store
            .write_then(
                move |c| {
                    let now = store::now_ms();
                    let mut out = Vec::with_capacity(plans.len());
                    for p in plans {
                        let repeat = match p.record() {
                            Some(r) => rows::find_recent(c, &r.route, &r.source_id, 0)?.is_some(),
                            None => false,
                        };
                        if !repeat {
                            p.store(c, now)?;
                        }
                        out.push((p, repeat));
                    }
                    if let Some(o) = offset {
                        stored::set_offset(c, platform, &name, o, now)?;
                    }
                    Ok(out)
                },
                move |out| {
                    let _rt = runtime.enter();
                    this.committed(out, &items);
                },
            )
            .await;
        if result.is_err() {
            // Nothing was stored: the runs made ready for it are not live either.
            for id in &runs {
                self.inner.sessions.discard_run(id);
            }
        }
        result
    }

    /// After the commit, in commit order: queue the turns, start the replies, apply the
    /// commands.
    fn committed(&self, out: Vec<(Plan, bool)>, items: &[Inbound]) {
        let mut restart = false;
        for ((plan, repeat), m) in out.into_iter().zip(items) {
            let platform = m.chat_key.split(':').next().unwrap_or("");
            if repeat {
                tracing::info!(platform, chat_id = %m.chat_id, message_id = %m.message_id,
                    source_id = %m.source_id, "repeated message: already taken, nothing runs again");
                if let Plan::Turn { run, .. } = &plan {
                    self.inner.sessions.discard_run(run.id());
                }
                continue;
            }
            match plan {
                Plan::Drop => {}
                Plan::Turn { row, run } => {
                    tracing::info!(platform, chat_id = %m.chat_id, message_id = %m.message_id,
                        session_key = row.session_id.as_deref().unwrap_or(""), run_id = %row.run_id,
                        delivery_id = %row.id, "message taken: turn queued");
                    self.inner.sessions.queue_run(run);
                    self.inner.ledger.spawn(row);
                }
                Plan::Answer { row, effect } => {
                    tracing::info!(platform, chat_id = %m.chat_id, message_id = %m.message_id,
                        delivery_id = %row.id, "{} answered by the gateway", row.event);
                    match effect {
                        Effect::None => {}
                        Effect::Stop(run_id) => {
                            let sessions = self.inner.sessions.clone();
                            tokio::spawn(async move {
                                if let Err(e) = sessions.cancel_run(&run_id).await {
                                    tracing::error!(run_id = %run_id, "/stop: cannot cancel the run: {e}");
                                }
                            });
                        }
                        Effect::NewSession { chat_key, session } => {
                            self.inner
                                .chats
                                .write()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(chat_key, session);
                        }
                        Effect::Pair(u) => {
                            if let Some(code) = u.code {
                                self.inner
                                    .pending
                                    .lock()
                                    .unwrap_or_else(PoisonError::into_inner)
                                    .insert(
                                        (format!("{}:{}", u.platform, u.name), u.user_id),
                                        code,
                                    );
                            }
                        }
                        Effect::Restart(_) => restart = true,
                    }
                    if row.state != "delivered" {
                        self.inner.ledger.spawn(row);
                    }
                }
            }
        }
        if restart {
            tracing::warn!("/restart from an admin: restarting the gateway as on SIGUSR1");
            if let Err(e) = self.inner.lifecycle.request_restart() {
                tracing::error!("/restart: cannot signal the restart: {e}");
            }
        }
    }

    /// At start: each chat that asked for the restart is told, once, that the gateway is
    /// back and how long it took.
    async fn send_restart_notices(&self) -> Result<(), StoreError> {
        let now = store::now_ms();
        let rows = self
            .inner
            .store
            .write(move |c| {
                let notices = stored::take_restarts(c)?;
                let mut rows = Vec::with_capacity(notices.len());
                for n in notices {
                    let took = Duration::from_millis((now - n.requested_at).max(0) as u64);
                    let route = match Target::from_json(&n.target) {
                        Target::Chat(t) => t.instance(),
                        _ => continue,
                    };
                    let row = DeliveryRow {
                        id: new_id("dlv_"),
                        route,
                        source_id: n.id.clone(),
                        event: "notice".into(),
                        state: "pending".into(),
                        prompt: String::new(),
                        session_id: None,
                        run_id: String::new(),
                        target: n.target,
                        result: Some(
                            json!({"status": "completed", "output": commands::restarted(took)})
                                .to_string(),
                        ),
                        attempts: 0,
                        last_error: None,
                        next_attempt_at: Some(now),
                        received_at: now,
                        updated_at: now,
                        progress: 0,
                    };
                    rows::insert(c, &row)?;
                    rows.push(row);
                }
                Ok(rows)
            })
            .await?;
        for row in rows {
            tracing::info!(delivery_id = %row.id, "telling {} that the gateway restarted", row.route);
            self.inner.ledger.spawn(row);
        }
        Ok(())
    }

    /// Each platform instance for `status`: its state, last error, and backlog (messages
    /// taken and not yet answered).
    pub async fn status(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for i in &self.inner.instances {
            let route = i.key.clone();
            let backlog = self
                .inner
                .store
                .read(move |c| rows::count_open(c, &route))
                .await
                .ok();
            let h = i.health().clone();
            out.push(json!({
                "platform": i.platform,
                "name": i.name,
                "mode": i.mode,
                "state": h.state,
                "last_error": h.last_error,
                "last_error_unix_ms": h.last_error_unix_ms,
                "last_ok_unix_ms": h.last_ok_unix_ms,
                "backlog": backlog,
            }));
        }
        out
    }

    /// Pairing requests and approved users.
    pub async fn pairing_list(&self) -> Result<Vec<PlatformUser>, StoreError> {
        self.inner.store.read(stored::users).await
    }

    /// Approves the user holding `code`; they are told in their chat.
    pub async fn approve(&self, code: &str) -> Result<Option<PlatformUser>, StoreError> {
        let code = code.trim().to_ascii_uppercase();
        let now = store::now_ms();
        let approved = self
            .inner
            .store
            .write(move |c| {
                let Some(u) = stored::approve(c, &code, now)? else {
                    return Ok(None);
                };
                let route = format!("{}:{}", u.platform, u.name);
                let row = DeliveryRow {
                    id: new_id("dlv_"),
                    route,
                    source_id: format!("approved:{}", u.user_id),
                    event: "notice".into(),
                    state: "pending".into(),
                    prompt: String::new(),
                    session_id: None,
                    run_id: String::new(),
                    target: u.chat.clone(),
                    result: Some(
                        json!({"status": "completed", "output": commands::APPROVED}).to_string(),
                    ),
                    attempts: 0,
                    last_error: None,
                    next_attempt_at: Some(now),
                    received_at: now,
                    updated_at: now,
                    progress: 0,
                };
                rows::insert(c, &row)?;
                Ok(Some((u, row)))
            })
            .await?;
        let Some((u, row)) = approved else {
            return Ok(None);
        };
        let k = (format!("{}:{}", u.platform, u.name), u.user_id.clone());
        self.inner
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&k);
        self.inner
            .told
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&k);
        self.inner
            .approved
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(k);
        tracing::info!(platform = %u.platform, user_id = %u.user_id,
            "pairing approved: {} ({}) on {} `{}`", u.display, u.user_id, u.platform, u.name);
        self.inner.ledger.spawn(row);
        Ok(Some(u))
    }

    /// Forgets a user's approval or pairing request (on every instance, or those named).
    pub async fn revoke(
        &self,
        user: &str,
        platform: Option<String>,
        name: Option<String>,
    ) -> Result<Vec<PlatformUser>, StoreError> {
        let u = user.to_owned();
        let removed = self
            .inner
            .store
            .write(move |c| stored::revoke(c, &u, platform.as_deref(), name.as_deref()))
            .await?;
        for r in &removed {
            let k = (format!("{}:{}", r.platform, r.name), r.user_id.clone());
            self.inner
                .approved
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&k);
            self.inner
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&k);
            tracing::info!(platform = %r.platform, user_id = %r.user_id,
                "access revoked: {} on {} `{}`", r.user_id, r.platform, r.name);
        }
        Ok(removed)
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

/// The webhook routes of every platform: `POST /platforms/PLATFORM/NAME`.
pub fn router(platforms: Platforms) -> Router {
    telegram::router(platforms)
}

/// The core's outbox for one instance: splits a reply, paces the parts by the platform's
/// send rate, puts the restart marker where it belongs, records each part confirmed.
struct Outbox<A: Adapter> {
    instance: Arc<Instance>,
    adapter: Arc<A>,
    pace: Mutex<TokenBucket>,
}

impl<A: Adapter> Outbox<A> {
    async fn paced(&self) {
        loop {
            let wait = self
                .pace
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(Instant::now());
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }
}

impl<A: Adapter> ChatOutbox for Outbox<A> {
    fn typing<'a>(&'a self, target: &'a ChatTarget) -> Typing<'a> {
        self.adapter.typing(target)
    }

    fn deliver<'a>(&'a self, d: ChatDelivery<'a>) -> SendFuture<'a> {
        Box::pin(async move {
            let unit = self.adapter.unit();
            // Room for the marker in every part: parts must not move between attempts.
            let reserve: usize = RESENT_MARKER.chars().map(unit).sum();
            let parts = chunk::split(d.text, self.adapter.max_len().saturating_sub(reserve), unit);
            for (i, part) in parts.iter().enumerate().skip(d.from_part) {
                let text = if i == d.from_part && d.resent {
                    format!("{RESENT_MARKER}{part}")
                } else {
                    part.clone()
                };
                self.paced().await;
                match self.adapter.send_part(d.target, &text, i == 0).await {
                    Ok(_) => {
                        self.instance.ok(self.instance.mode);
                        (d.on_part)(i + 1);
                    }
                    Err(e) => {
                        self.instance.failed(e.message());
                        return Err(e);
                    }
                }
            }
            Ok(parts.len())
        })
    }
}
