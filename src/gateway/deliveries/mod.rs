//! The delivery ledger: where an accepted webhook becomes a run, and the run's result goes
//! to its target, at least once, across restarts.
//!
//! A delivery is stored (`received`) before the sender hears 202. Its task then makes sure
//! the turn's run exists (created through the sessions machinery, which resumes it after a
//! restart), waits for it, stores the outcome (`pending`) and delivers it: `attempting`,
//! then `delivered`, or back to `pending` with a backoff, or `failed` when no attempt is
//! left. At start every entry not delivered or failed gets its task again.

pub mod api;
pub mod chat;
mod target;

use std::collections::HashMap;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore};

use super::ids::new_id;
use super::sessions::Sessions;
use super::sessions::live::Phase;
use crate::config::WebhookConfig;
use crate::store::deliveries::{self as rows, DeliveryRow};
use crate::store::runs::{self, RunRow, RunStatus};
use crate::store::{self, Store, StoreError};

pub use chat::{ChatDelivery, ChatOutbox, ChatTarget, SendError};
pub use target::Target;

/// How often ended deliveries older than the retention are pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// While a chat's turn runs, "typing…" is shown again this often.
const TYPING_EVERY: Duration = Duration::from_millis(4500);
/// How long a turn runs before its chat is shown "typing…".
const TYPING_AFTER: Duration = Duration::from_millis(250);
/// Deliveries pruned per commit.
const PRUNE_BATCH: i64 = 500;

/// What a reload may change.
#[derive(Clone)]
struct Settings {
    max_attempts: u32,
    retry_initial: Duration,
    retry_max: Duration,
    target_timeout: Duration,
    /// How long an ended delivery is kept (see [`DeliveryLedger::prune`]).
    retention: Duration,
    model: String,
    /// Per route: the key that signs its http deliveries.
    signing: Arc<HashMap<String, Vec<u8>>>,
}

/// A webhook, verified and rendered, ready to be stored.
pub struct NewDelivery {
    pub route: String,
    pub source_id: String,
    pub event: String,
    pub prompt: String,
    pub session_id: Option<String>,
    pub target: Target,
    /// Repeats of `source_id` received since then are duplicates.
    pub dedup_since_ms: i64,
}

pub enum Acceptance {
    Accepted(String),
    Duplicate(String),
}

pub enum RetryOutcome {
    NotFound,
    InProgress(String),
    Queued(Box<DeliveryRow>),
}

#[derive(Clone)]
pub struct DeliveryLedger {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    sessions: Sessions,
    settings: RwLock<Settings>,
    permits: Arc<Semaphore>,
    /// Deliveries with a task, and the bell that makes it attempt now.
    active: Mutex<HashMap<String, Arc<Notify>>>,
    client: target::Client,
    /// Per platform instance (`telegram:main`): what sends its replies.
    outboxes: RwLock<HashMap<String, Arc<dyn ChatOutbox>>>,
    /// Per chat: the ordered replies with a task, in the order they were stored.
    lanes: Mutex<HashMap<String, Lane>>,
    /// Set when the drain begins: no attempt starts after it.
    draining: std::sync::atomic::AtomicBool,
    /// Attempts under way, and the bell rung when one ends.
    sending: std::sync::atomic::AtomicUsize,
    sent: Notify,
}

/// An attempt under way, for the drain to wait for.
struct Sending<'a>(&'a Inner);

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        self.0.sending.fetch_sub(1, Ordering::SeqCst);
        self.0.sent.notify_waiters();
    }
}

/// One chat's ordered replies: each is sent once those before it ended.
#[derive(Default)]
struct Lane {
    queue: VecDeque<String>,
    changed: Arc<Notify>,
}

impl DeliveryLedger {
    pub fn new(
        store: Store,
        sessions: Sessions,
        config: &WebhookConfig,
        model: &str,
        signing: HashMap<String, Vec<u8>>,
    ) -> Self {
        DeliveryLedger {
            inner: Arc::new(Inner {
                store,
                sessions,
                settings: RwLock::new(Settings {
                    max_attempts: config.max_attempts,
                    retry_initial: config.retry_initial,
                    retry_max: config.retry_max,
                    target_timeout: config.target_timeout,
                    retention: config.retention,
                    model: model.to_owned(),
                    signing: Arc::new(signing),
                }),
                permits: Arc::new(Semaphore::new(config.delivery_concurrency)),
                active: Mutex::new(HashMap::new()),
                client: target::client(),
                outboxes: RwLock::new(HashMap::new()),
                lanes: Mutex::new(HashMap::new()),
                draining: std::sync::atomic::AtomicBool::new(false),
                sending: std::sync::atomic::AtomicUsize::new(0),
                sent: Notify::new(),
            }),
        }
    }

    pub fn update(&self, config: &WebhookConfig, model: &str, signing: HashMap<String, Vec<u8>>) {
        let mut s = self
            .inner
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        s.max_attempts = config.max_attempts;
        s.retry_initial = config.retry_initial;
        s.retry_max = config.retry_max;
        s.target_timeout = config.target_timeout;
        s.retention = config.retention;
        s.model = model.to_owned();
        s.signing = Arc::new(signing);
    }

    fn settings(&self) -> Settings {
        self.inner
            .settings
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// Stores a delivery, unless its sender id was seen within the dedup window. Resolves
    /// only after the commit: the caller may acknowledge then.
    pub async fn accept(&self, d: NewDelivery) -> Result<Acceptance, StoreError> {
        let now = store::now_ms();
        let row = DeliveryRow {
            id: new_id("dlv_"),
            route: d.route,
            source_id: d.source_id,
            event: d.event,
            state: "received".into(),
            prompt: d.prompt,
            session_id: d.session_id,
            run_id: new_id("run_"),
            target: d.target.to_json(),
            result: None,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            received_at: now,
            updated_at: now,
            progress: 0,
        };
        let since = d.dedup_since_ms;
        let stored = row.clone();
        let outcome = self
            .inner
            .store
            .write(move |c| {
                // The writer is one thread: this check and the insert cannot interleave
                // with another delivery's.
                if let Some(id) = rows::find_recent(c, &stored.route, &stored.source_id, since)? {
                    return Ok(Acceptance::Duplicate(id));
                }
                rows::insert(c, &stored)?;
                Ok(Acceptance::Accepted(stored.id.clone()))
            })
            .await?;
        if let Acceptance::Accepted(_) = &outcome {
            self.spawn(row);
        }
        Ok(outcome)
    }

    /// At start: a task for every delivery not yet delivered or failed. Blocking.
    pub fn resume_blocking(&self) -> Result<usize, StoreError> {
        let open = self.inner.store.read_blocking(rows::open)?;
        let n = open.len();
        for row in open {
            tracing::info!(route = %row.route, delivery_id = %row.id,
                "resuming delivery that was {} when the gateway stopped", row.state);
            self.spawn(row);
        }
        Ok(n)
    }

    /// Deletes the deliveries that ended (delivered or failed) longer ago than the
    /// retention, with their runs, a few hundred per commit so that other writes are not
    /// held up; returns how many. Open deliveries stay whatever their age.
    pub async fn prune(&self) -> Result<usize, StoreError> {
        let before = store::now_ms() - self.settings().retention.as_millis() as i64;
        let mut pruned = 0;
        loop {
            let n = self
                .inner
                .store
                .write(move |c| rows::prune(c, before, PRUNE_BATCH))
                .await?;
            pruned += n;
            if n < PRUNE_BATCH as usize {
                return Ok(pruned);
            }
        }
    }

    /// Prunes now, then every [`PRUNE_EVERY`] (or half the retention, when that is
    /// shorter), for as long as the runtime runs.
    pub fn spawn_pruner(&self) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                match this.prune().await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!("{n} deliveries older than [webhook] retention pruned"),
                    Err(e) => tracing::warn!("pruning old deliveries failed: {e}"),
                }
                let every =
                    (this.settings().retention / 2).clamp(Duration::from_secs(10), PRUNE_EVERY);
                tokio::time::sleep(every).await;
            }
        });
    }

    pub async fn list(
        &self,
        state: Option<String>,
        limit: i64,
    ) -> Result<Vec<DeliveryRow>, StoreError> {
        self.inner
            .store
            .read(move |c| rows::list(c, state.as_deref(), limit))
            .await
    }

    pub async fn get(&self, id: &str) -> Result<Option<DeliveryRow>, StoreError> {
        let id = id.to_owned();
        self.inner.store.read(move |c| rows::get(c, &id)).await
    }

    /// An operator's retry: a fresh budget of attempts, starting now.
    pub async fn retry(&self, id: &str) -> Result<RetryOutcome, StoreError> {
        let Some(row) = self.get(id).await? else {
            return Ok(RetryOutcome::NotFound);
        };
        if matches!(row.state.as_str(), "received" | "attempting") {
            return Ok(RetryOutcome::InProgress(row.state));
        }
        let rid = id.to_owned();
        let reset = self
            .inner
            .store
            .write(move |c| rows::reset_for_retry(c, &rid, store::now_ms()))
            .await?;
        if !reset {
            return Ok(RetryOutcome::InProgress(row.state));
        }
        let bell = self.active().get(id).cloned();
        match bell {
            Some(b) => b.notify_one(),
            None => {
                if let Some(r) = self.get(id).await? {
                    self.spawn(r);
                }
            }
        }
        tracing::info!(route = %row.route, delivery_id = %id, "delivery retry requested");
        Ok(match self.get(id).await? {
            Some(r) => RetryOutcome::Queued(Box::new(r)),
            None => RetryOutcome::NotFound,
        })
    }

    /// For a scrape: deliveries by state, and the age of the oldest open one. A store that
    /// cannot be read leaves the last values.
    pub async fn export_metrics(&self) {
        let Ok((counts, oldest)) = self.inner.store.read(rows::metrics).await else {
            return;
        };
        let states = ["received", "pending", "attempting", "delivered", "failed"];
        let by_state: Vec<(&'static str, i64)> = states
            .iter()
            .map(|s| {
                let n = counts.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
                (*s, n)
            })
            .collect();
        let age = oldest.map(|t| {
            std::time::Duration::from_millis(u64::try_from(store::now_ms() - t).unwrap_or(0))
        });
        crate::metrics::deliveries(&by_state, age);
    }

    pub async fn counts(&self) -> Result<Vec<(String, i64)>, StoreError> {
        self.inner.store.read(rows::count_by_state).await
    }

    fn active(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.inner
            .active
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a delivery's task, unless it has one. A chat reply that keeps its chat's
    /// order takes its place in the chat's lane now: call in the order the chat's messages
    /// were stored (the ledger's resume does, and a platform from its commit hook).
    pub fn spawn(&self, row: DeliveryRow) {
        let bell = Arc::new(Notify::new());
        {
            let mut active = self.active();
            if active.contains_key(&row.id) {
                return;
            }
            active.insert(row.id.clone(), bell.clone());
        }
        // Parsed once, here: a delivery's target does not change.
        let target = Target::from_json(&row.target);
        let lane = match &target {
            Target::Chat(c) if c.ordered => Some(c.lane()),
            _ => None,
        };
        if let Some(l) = &lane {
            self.join_lane(l, &row.id);
        }
        let this = self.clone();
        tokio::spawn(async move {
            let id = row.id.clone();
            this.drive(row, target, bell).await;
            this.active().remove(&id);
            if let Some(l) = &lane {
                this.leave_lane(l, &id);
            }
        });
    }

    /// One delivery, from its turn to its last attempt.
    async fn drive(&self, mut row: DeliveryRow, target: Target, bell: Arc<Notify>) {
        // Resumed in the middle of an attempt: the gateway stopped while it was sending.
        let cut_short = row.state == "attempting";
        // The turn's outcome, until a commit stores it.
        let mut unstored: Option<String> = None;
        if row.state == "received" {
            let typing = match &target {
                Target::Chat(c) => self.show_typing(c.clone(), &row.run_id),
                _ => None,
            };
            let outcome = self.turn(&row).await;
            if let Some(t) = typing {
                t.abort();
            }
            let outcome = match outcome {
                Ok(v) => v,
                Err(e) => {
                    tracing::error!(route = %row.route, delivery_id = %row.id, run_id = %row.run_id,
                        "delivery stalled: {e}; it resumes at the next start");
                    return;
                }
            };
            // A chat's turn, visible under the chat's own fields (the run's lines carry
            // only SESSION_KEY and RUN_ID): `journalctl PLATFORM=telegram CHAT_ID=…`. Said
            // before the outcome is stored: a stop right after that commit would lose it.
            if let Target::Chat(c) = &target {
                tracing::info!(platform = %c.platform, chat_id = %c.chat_id,
                    message_id = c.reply_to.as_deref().unwrap_or(""),
                    session_key = row.session_id.as_deref().unwrap_or(""), run_id = %row.run_id,
                    delivery_id = %row.id, "turn {}: the reply goes out next",
                    outcome["status"].as_str().unwrap_or("finished"));
            }
            // Stored with the first attempt's mark, not in a commit of its own: until then
            // the delivery stays `received`, and one resumed so reads it from its run
            // again, which stored it when it finished.
            let text = outcome.to_string();
            unstored = Some(text.clone());
            if let Some(schedule) = row.route.strip_prefix("schedule:") {
                let status = match outcome["status"].as_str() {
                    Some("completed") => "completed",
                    Some("cancelled") => "cancelled",
                    _ => "failed",
                };
                crate::metrics::schedule_run(schedule, status);
            }
            row.result = Some(text);
            row.state = "pending".into();
            row.attempts = 0;
        }
        let result: Value = row
            .result
            .as_deref()
            .and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or(Value::Null);
        // What a chat is sent: a cancelled turn sends nothing (its `/stop` answered).
        let chat = match &target {
            Target::Chat(c) => match chat::reply_text(&result) {
                Some(text) => Some((c, text)),
                None => {
                    let id = row.id.clone();
                    let now = store::now_ms();
                    let outcome = unstored.take();
                    // Updates by primary key: no constraint to break.
                    self.inner
                        .store
                        .write_detached_unguarded("delivery done", move |c| {
                            if let Some(o) = &outcome {
                                rows::set_result(c, &id, o, now)?;
                            }
                            rows::set_delivered(c, &id, now)
                        });
                    tracing::info!(platform = %c.platform, chat_id = %c.chat_id, delivery_id = %row.id,
                        run_id = %row.run_id, "turn cancelled: no reply to send");
                    return;
                }
            },
            _ => None,
        };
        if let Some((c, _)) = &chat
            && c.ordered
        {
            self.lane_turn(&c.lane(), &row.id).await;
        }
        // A reply that a restart cut short mid-send: the part in flight may have been shown.
        let resent_part = (cut_short && chat.is_some()).then_some(row.progress);
        let progress = Arc::new(AtomicI64::new(row.progress.max(0)));
        let mut attempts = row.attempts.max(0);
        let mut next = row.next_attempt_at.unwrap_or(0);
        loop {
            let wait = next - store::now_ms();
            if wait > 0 {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(wait as u64)) => {}
                    () = bell.notified() => { attempts = 0; }
                }
            }
            let Ok(_permit) = self.inner.permits.clone().acquire_owned().await else {
                return;
            };
            // No attempt starts once the drain began: the delivery resumes at the next start.
            // One under way finishes (see `drain`), so a reply is not cut mid-send.
            if self.inner.draining.load(Ordering::SeqCst) {
                return;
            }
            self.inner.sending.fetch_add(1, Ordering::SeqCst);
            let _sending = Sending(&self.inner);
            let s = self.settings();
            attempts += 1;
            let (id, n, outcome) = (row.id.clone(), attempts, unstored.clone());
            let mark = move |c: &rusqlite::Connection| {
                rows::set_attempting(c, &id, n, outcome.as_deref(), store::now_ms())
            };
            // A chat reply is on record as being sent before it is: a restart in the middle
            // then re-sends it marked as possibly repeated, never silently twice. (An
            // update by primary key, like the others of a delivery: no savepoint needed.)
            let marked = match &chat {
                Some(_) => self.inner.store.write_unguarded(mark).await,
                None => {
                    self.inner
                        .store
                        .write_detached_unguarded("delivery attempt", mark);
                    Ok(())
                }
            };
            if marked.is_ok() {
                unstored = None;
            }
            let sent = match (&chat, marked) {
                (_, Err(e)) => Err(SendError::Transient(format!(
                    "cannot record the attempt before sending: {e}"
                ))),
                (Some((c, text)), Ok(())) => {
                    self.send_chat(&row, c, text, &progress, resent_part).await
                }
                (None, Ok(())) => {
                    let key = s.signing.get(&row.route).map(Vec::as_slice);
                    target
                        .send(&self.inner.client, &row, &result, key, s.target_timeout)
                        .await
                        .map_err(SendError::Transient)
                }
            };
            let now = store::now_ms();
            let e = match sent {
                Ok(()) => {
                    crate::metrics::delivery_attempt("delivered");
                    let id = row.id.clone();
                    self.inner
                        .store
                        .write_detached_unguarded("delivery done", move |c| {
                            rows::set_delivered(c, &id, now)
                        });
                    match &chat {
                        Some((c, _)) => {
                            tracing::info!(platform = %c.platform, chat_id = %c.chat_id,
                            message_id = c.reply_to.as_deref().unwrap_or(""),
                            delivery_id = %row.id, run_id = %row.run_id,
                            session_key = row.session_id.as_deref().unwrap_or(""),
                            "reply delivered to {} (attempt {attempts})", target.describe())
                        }
                        None => tracing::info!(route = %row.route, delivery_id = %row.id,
                            "delivered to {} (attempt {attempts})", target.describe()),
                    }
                    return;
                }
                Err(e) => e,
            };
            let (left, wait) = match &e {
                // The platform said how long to wait: that is not a failed attempt.
                SendError::RetryAfter(d, _) => {
                    attempts -= 1;
                    (true, *d)
                }
                SendError::Transient(_) => (
                    attempts < i64::from(s.max_attempts),
                    backoff(attempts, s.retry_initial, s.retry_max),
                ),
                SendError::Permanent(_) => (false, Duration::ZERO),
            };
            next = if left {
                now + wait.as_millis() as i64
            } else {
                0
            };
            crate::metrics::delivery_attempt(if left { "retry" } else { "failed" });
            let id = row.id.clone();
            let err = e.message().to_owned();
            let n = left.then_some(next);
            let _ = self
                .inner
                .store
                .write(move |c| rows::set_failed_attempt(c, &id, &err, n, now))
                .await;
            let (platform, chat_id) = chat
                .as_ref()
                .map_or(("", ""), |(c, _)| (c.platform.as_str(), c.chat_id.as_str()));
            if left {
                tracing::warn!(route = %row.route, delivery_id = %row.id, platform, chat_id,
                    "attempt {attempts} to {} failed: {}; next in {}ms",
                    target.describe(), e.message(), next - now);
            } else {
                tracing::error!(route = %row.route, delivery_id = %row.id, platform, chat_id,
                    "delivery failed after {attempts} attempts to {}: {}", target.describe(), e.message());
                return;
            }
        }
    }

    /// One attempt at a chat reply, through its platform's outbox; each part the platform
    /// confirms is recorded (`progress`), so that a later attempt, even after a restart,
    /// goes on from the next part.
    async fn send_chat(
        &self,
        row: &DeliveryRow,
        c: &ChatTarget,
        text: &str,
        progress: &Arc<AtomicI64>,
        resent_part: Option<i64>,
    ) -> Result<(), SendError> {
        let instance = c.instance();
        let Some(outbox) = self.outbox(&instance) else {
            return Err(SendError::Transient(format!(
                "platform {instance} is not configured (is [[platforms.{}]] `{}` still in the configuration?)",
                c.platform, c.name
            )));
        };
        let from = progress.load(Ordering::Relaxed);
        let (store, id, seen) = (self.inner.store.clone(), row.id.clone(), progress.clone());
        let (platform, name) = (c.platform.clone(), c.name.clone());
        let on_part = move |n: usize, total: usize| {
            let n = n as i64;
            let before = seen.swap(n, Ordering::Relaxed);
            crate::metrics::platform_messages(&platform, &name, "out", (n - before).max(0) as u64);
            if n as usize >= total {
                // The last part: `delivered`, written next, says more. A stop in between
                // re-sends this request, marked, as it would had this write not committed.
                return;
            }
            let id = id.clone();
            store.write_detached("reply progress", move |c| {
                rows::set_progress(c, &id, n, store::now_ms())
            });
        };
        outbox
            .deliver(ChatDelivery {
                target: c,
                delivery_id: &row.id,
                text,
                from_part: from as usize,
                resent: resent_part == Some(from),
                on_part: &on_part,
            })
            .await
            .map(|_| ())
    }

    /// While a chat's turn runs, shows the chat that a reply is being written.
    fn show_typing(&self, c: ChatTarget, run_id: &str) -> Option<tokio::task::JoinHandle<()>> {
        let live = self.inner.sessions.runs().get(run_id)?;
        let outbox = self.outbox(&c.instance())?;
        Some(tokio::spawn(async move {
            // From when the turn runs (not while it waits behind the chat's previous one),
            // and only once it has run for TYPING_AFTER: a quicker reply needs no
            // "typing…", and most of a fast agent's are quicker (a request to the
            // platform saved per message).
            let mut phases = live.subscribe();
            while live.phase() == Phase::Queued {
                if phases.changed().await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(TYPING_AFTER).await;
            // Telegram shows "typing…" for 5 s.
            while live.phase() != Phase::Finished {
                outbox.typing(&c).await;
                tokio::time::sleep(TYPING_EVERY).await;
            }
        }))
    }

    /// The drain began: no attempt starts from now on; resolves once those under way
    /// ended (delivered, or failed and recorded).
    pub async fn drain(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
        loop {
            let ended = self.inner.sent.notified();
            tokio::pin!(ended);
            ended.as_mut().enable();
            if self.inner.sending.load(Ordering::SeqCst) == 0 {
                return;
            }
            ended.await;
        }
    }

    /// Registers the outbox that sends the replies of platform instance `instance`
    /// (`telegram:main`).
    pub fn register_outbox(&self, instance: String, outbox: Arc<dyn ChatOutbox>) {
        self.inner
            .outboxes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(instance, outbox);
    }

    fn outbox(&self, instance: &str) -> Option<Arc<dyn ChatOutbox>> {
        self.inner
            .outboxes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(instance)
            .cloned()
    }

    /// Takes a place at the back of `lane` (synchronously, so that places follow the order
    /// of the calls: the order in which the chat's messages were stored).
    fn join_lane(&self, lane: &str, id: &str) {
        self.lanes()
            .entry(lane.to_owned())
            .or_default()
            .queue
            .push_back(id.to_owned());
    }

    /// Waits until `id` is first in `lane`: every reply before it was delivered or failed.
    async fn lane_turn(&self, lane: &str, id: &str) {
        loop {
            let changed = match self.lanes().get(lane) {
                Some(l) if l.queue.front().is_some_and(|f| f != id) => l.changed.clone(),
                _ => return,
            };
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Checked again once registered: a leave in between is not missed.
            if self
                .lanes()
                .get(lane)
                .is_none_or(|l| l.queue.front().is_none_or(|f| f == id))
            {
                return;
            }
            notified.await;
        }
    }

    fn leave_lane(&self, lane: &str, id: &str) {
        let mut lanes = self.lanes();
        if let Some(l) = lanes.get_mut(lane) {
            l.queue.retain(|x| x != id);
            l.changed.notify_waiters();
            if l.queue.is_empty() {
                lanes.remove(lane);
            }
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lane>> {
        self.inner
            .lanes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The outcome of the delivery's turn: creates its run if the store has none yet, then
    /// waits for it to finish.
    async fn turn(&self, row: &DeliveryRow) -> Result<Value, String> {
        // A run queued with its message (a chat's turn) is live: no need to ask the store.
        let live = self.inner.sessions.runs().get(&row.run_id);
        if live.is_none() {
            self.stored_or_created(row).await?;
        }
        if let Some(live) = live.or_else(|| self.inner.sessions.runs().get(&row.run_id)) {
            let mut rx = live.subscribe();
            while live.phase() != Phase::Finished {
                if rx.changed().await.is_err() {
                    break;
                }
            }
            // How it ended, as committed: what the read below would find.
            if let Some(o) = live.outcome() {
                return Ok(json!({
                    "status": o.status.as_str(),
                    "output": o.output,
                    "error": o.error,
                }));
            }
        }
        // Finished runs are stored before they leave the live set.
        let rid = row.run_id.clone();
        match self.inner.store.read(move |c| runs::get(c, &rid)).await {
            Ok(Some(r)) if r.status.is_finished() => Ok(outcome(&r)),
            Ok(_) => Err(format!("run {} did not finish", row.run_id)),
            Err(e) => Err(e.to_string()),
        }
    }

    /// A delivery's run that is not live: finished already (its outcome is read with the
    /// others below), resumed by the sessions at start, or never created (a webhook
    /// delivery accepted before its run): created and queued now.
    async fn stored_or_created(&self, row: &DeliveryRow) -> Result<(), String> {
        let rid = row.run_id.clone();
        let existing = self
            .inner
            .store
            .read(move |c| runs::get(c, &rid))
            .await
            .map_err(|e| e.to_string())?;
        match existing {
            Some(_) => {} // finished, or resumed by the sessions at start
            None => {
                let messages = vec![json!({"role": "user", "content": row.prompt})];
                let run = RunRow {
                    id: row.run_id.clone(),
                    session_id: row.session_id.clone(),
                    status: RunStatus::Queued,
                    model: self.settings().model,
                    input: Value::from(messages.clone()).to_string(),
                    output: None,
                    error: None,
                    idempotency_key: None,
                    request: None,
                    attempt: 0,
                    created_at: store::now_ms(),
                    started_at: None,
                    finished_at: None,
                };
                self.inner
                    .sessions
                    .create_run(run, messages)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }
}

fn outcome(r: &RunRow) -> Value {
    json!({
        "status": r.status.as_str(),
        "output": r.output,
        "error": r.error,
    })
}

/// `initial · 2^(n-1)`, at most `max`, then scaled by a random factor in [0.5, 1) so that
/// deliveries that failed together do not retry together.
pub fn backoff(attempt: i64, initial: Duration, max: Duration) -> Duration {
    let exp = u32::try_from(attempt.saturating_sub(1).clamp(0, 30)).unwrap_or(30);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    let r = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let factor = 0.5 + (r >> 11) as f64 / (1u64 << 53) as f64 * 0.5;
    base.mul_f64(factor)
}

#[cfg(test)]
mod tests {
    use super::backoff;
    use std::time::Duration;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let i = Duration::from_millis(100);
        let m = Duration::from_secs(1);
        for n in 1..=10 {
            let d = backoff(n, i, m);
            let base = (i * 2u32.pow(n as u32 - 1)).min(m);
            assert!(d >= base / 2 && d <= base, "attempt {n}: {d:?} vs {base:?}");
        }
    }
}
