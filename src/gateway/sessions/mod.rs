//! Sessions: turns of one session run strictly one after another, in arrival order, from a
//! bounded queue; different sessions run concurrently, up to `max_concurrent_runs`.
//!
//! A session is *busy* while it has a turn running or waiting. Each busy session holds one
//! permit of a semaphore of `max_concurrent_runs`, taken when it becomes busy and given back
//! when its queue runs dry: a turn for an idle session when no permit is left is refused
//! (429), as is a turn for a session whose queue is full. A turn without a session is a
//! session of its own for that purpose. Runs resumed after a restart were accepted before:
//! they are queued whatever the limits.
//!
//! A plain (not streamed) chat turn of an idle session runs on its request's own task
//! ([`Sessions::run_here`]); the turns that queue behind it, and every other turn, run on a
//! task per busy session. A chat turn whose client leaves is abandoned, agent call
//! included, whether it runs or waits, streamed or not — as a reverse proxy aborts the
//! upstream request of a client that went away. Durable runs go on to their end.

mod history;
pub mod live;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use serde_json::{Map, Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use super::agents::{Agent, AgentError, Delta, Reply, TurnInput};
use crate::config::SessionsConfig;
use crate::store::runs::{self, RunRow, RunStatus};
use crate::store::{self, Store, StoreError};
use history::{HistoryCache, Recent};
use live::{LiveRun, Phase, RunHub};

/// Why a turn was not accepted (the API answers 429).
#[derive(Debug, Clone, thiserror::Error)]
pub enum Busy {
    #[error("{0} sessions are busy, the limit of [sessions] max_concurrent_runs; retry later")]
    TooManySessions(usize),
    #[error(
        "session `{0}` already has {1} turns waiting, the limit of [sessions] queue_depth; retry later"
    )]
    QueueFull(String, usize),
}

/// What [`Sessions::delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    /// No such session.
    Missing,
    /// A turn of the session is running or waiting: nothing was deleted.
    Busy,
}

/// Why an accepted chat turn produced no reply.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Shared: a turn's outcome is cloned.
    #[error("cannot store the turn: {0}")]
    Store(Arc<StoreError>),
}

/// One turn to run.
pub struct Turn {
    pub run_id: String,
    pub session_id: Option<String>,
    /// The client's `X-Hermes-Session-Key`: kept with the session, passed to the agent. A
    /// turn without one passes the key kept with its session, if any.
    pub session_key: Option<String>,
    /// A system message given to the agent before the history, and not stored (a
    /// response's `instructions`).
    pub instructions: Option<String>,
    /// The messages the turn adds (after the stored history, when there is a session).
    pub messages: Vec<Value>,
    pub model: String,
    pub params: Map<String, Value>,
    pub stream: bool,
    pub kind: TurnKind,
}

pub enum TurnKind {
    /// A chat completion: the reply goes back to the request that waits for it.
    Chat {
        /// Where the reply goes as it is produced, when the client streams.
        deltas: Option<mpsc::UnboundedSender<Piece>>,
        done: oneshot::Sender<Result<Reply, TurnError>>,
        /// Written with the turn's messages, in the same commit (a stored response).
        record: Option<Record>,
    },
    /// A durable run: its events and result go to the store and to subscribers.
    Run { live: Arc<LiveRun>, attempt: i64 },
}

/// A piece of a streamed turn, as the agent produced it ([`Delta`], owned).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Reasoning(String),
    Event { name: String, data: String },
}

/// The channel a streamed turn's pieces go through; none when the client does not stream.
pub type Pieces = (
    Option<mpsc::UnboundedSender<Piece>>,
    Option<mpsc::UnboundedReceiver<Piece>>,
);

pub fn pieces(stream: bool) -> Pieces {
    if stream {
        let (tx, rx) = mpsc::unbounded_channel();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    }
}

impl From<Delta<'_>> for Piece {
    fn from(d: Delta<'_>) -> Self {
        match d {
            Delta::Text(t) => Piece::Text(t.to_owned()),
            Delta::Reasoning(t) => Piece::Reasoning(t.to_owned()),
            Delta::Event { name, data } => Piece::Event {
                name: name.to_owned(),
                data: data.to_owned(),
            },
        }
    }
}

/// A write that goes with a chat turn's messages: given the reply and the number of
/// messages the session holds with them.
pub type Record =
    Box<dyn FnOnce(&rusqlite::Connection, &Reply, i64) -> rusqlite::Result<()> + Send>;

/// A chat turn's outcome and where it goes; see [`Sessions::execute`].
struct Answer(
    oneshot::Sender<Result<Reply, TurnError>>,
    Result<Reply, TurnError>,
);

impl Answer {
    fn send(self) {
        let _ = self.0.send(self.1);
    }
}

/// A busy session: the run id of the turn it runs, and the turns waiting behind it (at
/// most `queue_depth`, checked when one is queued).
#[derive(Default)]
struct Slot {
    current: String,
    waiting: VecDeque<Turn>,
}

/// A durable run made ready to be stored by the caller's own write (with whatever else
/// must commit with it), then queued with [`Sessions::queue_run`] once that commit is on
/// disk — or given up with [`Sessions::discard_run`]. The write carries it to
/// the commit and back (`write_then(move |c| { run.store(c)?; Ok(run) }, …)`).
pub struct NewRun {
    row: RunRow,
    messages: Vec<Value>,
    live: Arc<LiveRun>,
    queued: Arc<runs::EventRow>,
}

impl NewRun {
    pub fn id(&self) -> &str {
        &self.row.id
    }

    /// Stores the run and its `run.queued` event, inside the caller's transaction.
    pub fn store(&self, c: &rusqlite::Connection) -> rusqlite::Result<()> {
        runs::insert(c, &self.row)?;
        runs::append_event(c, &self.row.id, &self.queued, self.row.created_at)
    }
}

/// What a session is doing, for a chat's `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionActivity {
    /// The run id of the turn running.
    pub running: String,
    /// Turns waiting behind it.
    pub waiting: usize,
}

/// A session made busy by a turn, and that turn: run it, then the turns that queue
/// behind it ([`Sessions::next_turn`]) until there is none.
struct Start {
    key: String,
    turn: Turn,
    permit: Option<OwnedSemaphorePermit>,
}

/// The session scheduler, shared by the API handlers.
#[derive(Clone)]
pub struct Sessions {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    agent: RwLock<Arc<dyn Agent>>,
    limits: SessionsConfig,
    permits: Arc<Semaphore>,
    slots: Mutex<HashMap<String, Slot>>,
    queued: AtomicUsize,
    runs: RunHub,
    /// Recent history of recently used sessions (see `history`).
    recent: HistoryCache,
}

/// Ends what holds a session outside a worker — a turn run by [`Sessions::run_here`], or a
/// [`Sessions::delete`]: the session goes idle, or its waiting turns go to a worker. On drop
/// too, so that a caller dropped midway strands no turn.
struct Handover<'a> {
    sessions: &'a Sessions,
    key: Option<String>,
    permit: Option<OwnedSemaphorePermit>,
}

impl Handover<'_> {
    fn release(&mut self) {
        let Some(key) = self.key.take() else { return };
        let mut slots = self.sessions.slots();
        let waiting = slots.get(&key).is_some_and(|s| !s.waiting.is_empty());
        // Without a runtime (a request dropped while the process stops), the waiting turns
        // go with their slot: their requests are being dropped too.
        if let (true, Ok(rt)) = (waiting, tokio::runtime::Handle::try_current()) {
            drop(slots);
            let this = self.sessions.clone();
            // A delete holds no permit: the turns that waited behind it take one if any
            // is left (they were accepted, so they run either way).
            let permit = self
                .permit
                .take()
                .or_else(|| this.inner.permits.clone().try_acquire_owned().ok());
            rt.spawn(async move { this.worker(key, permit, None).await });
        } else {
            if let Some(slot) = slots.remove(&key) {
                let dropped = slot.waiting.len();
                self.sessions
                    .inner
                    .queued
                    .fetch_sub(dropped, Ordering::Relaxed);
            }
            drop(slots);
            self.permit.take();
        }
    }
}

impl Drop for Handover<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

impl Sessions {
    pub fn new(store: Store, agent: Arc<dyn Agent>, limits: &SessionsConfig) -> Self {
        Sessions {
            inner: Arc::new(Inner {
                store,
                agent: RwLock::new(agent),
                limits: limits.clone(),
                permits: Arc::new(Semaphore::new(limits.max_concurrent_runs)),
                slots: Mutex::new(HashMap::new()),
                queued: AtomicUsize::new(0),
                runs: RunHub::default(),
                recent: HistoryCache::default(),
            }),
        }
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn runs(&self) -> &RunHub {
        &self.inner.runs
    }

    pub fn set_agent(&self, agent: Arc<dyn Agent>) {
        *self
            .inner
            .agent
            .write()
            .unwrap_or_else(PoisonError::into_inner) = agent;
    }

    /// The configured backend's kind (`echo`, `openai`, `command`).
    pub fn agent_kind(&self) -> &'static str {
        self.agent().kind()
    }

    /// Whether the configured backend looks usable, or why not.
    pub async fn agent_check(&self) -> Result<(), String> {
        self.agent().check().await
    }

    fn agent(&self) -> Arc<dyn Agent> {
        self.inner
            .agent
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn limits(&self) -> &SessionsConfig {
        &self.inner.limits
    }

    /// `N active sessions, M runs queued` for `STATUS=`.
    /// For a scrape: sessions busy, and turns waiting behind another of their session.
    pub fn export_metrics(&self) {
        let busy = self.slots().len();
        crate::metrics::sessions(busy, self.inner.queued.load(Ordering::Relaxed));
    }

    pub fn summary(&self) -> String {
        let active = self.slots().len();
        let queued = self.inner.queued.load(Ordering::Relaxed);
        format!("{active} active sessions, {queued} runs queued")
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn key(turn: &Turn) -> String {
        match &turn.session_id {
            Some(s) => s.clone(),
            // Session ids are printable: a NUL prefix cannot collide with one.
            None => format!("\0{}", turn.run_id),
        }
    }

    /// Whether a session has a turn running or waiting.
    pub fn is_busy(&self, session_id: &str) -> bool {
        self.slots().contains_key(session_id)
    }

    /// The turn a session is running and how many wait behind it; `None` when it is idle.
    pub fn activity(&self, session_id: &str) -> Option<SessionActivity> {
        self.slots().get(session_id).map(|s| SessionActivity {
            running: s.current.clone(),
            waiting: s.waiting.len(),
        })
    }

    /// Whether a turn for `session_id` would be accepted now.
    pub fn check(&self, session_id: Option<&str>) -> Result<(), Busy> {
        let slots = self.slots();
        match session_id.and_then(|s| slots.get(s)) {
            Some(slot) => {
                let w = slot.waiting.len();
                if w >= self.inner.limits.queue_depth {
                    return Err(Busy::QueueFull(session_id.unwrap_or("").into(), w));
                }
                Ok(())
            }
            None if self.inner.permits.available_permits() == 0 => {
                Err(Busy::TooManySessions(self.inner.limits.max_concurrent_runs))
            }
            None => Ok(()),
        }
    }

    /// Queues a turn, or refuses it when the limits are reached. It runs on a task of its
    /// own; see [`Sessions::run_here`] to run it on the caller's.
    pub fn submit(&self, turn: Turn) -> Result<(), Busy> {
        if let Some(start) = self.enqueue(turn, false)? {
            self.spawn_worker(start);
        }
        Ok(())
    }

    /// Queues a turn that was accepted before (a durable run): limits do not apply.
    pub fn submit_accepted(&self, turn: Turn) {
        // With `force`, enqueue never refuses.
        if let Ok(Some(start)) = self.enqueue(turn, true) {
            self.spawn_worker(start);
        }
    }

    /// [`Sessions::submit`], but when the session is idle the turn runs right here, on
    /// the caller's task: no task, channel or wake-up of its own. Turns that arrive
    /// meanwhile queue behind it and run on a task of their own once it is done. Returns
    /// once the turn ran or was queued; its result arrives as for `submit`. A caller
    /// dropped mid-turn (its client went away) abandons the turn, agent call included,
    /// as it would any request.
    pub async fn run_here(&self, turn: Turn) -> Result<(), Busy> {
        let Some(Start { key, turn, permit }) = self.enqueue(turn, false)? else {
            return Ok(());
        };
        // Hands the session on (to a worker, if turns are waiting) however this ends.
        let mut handover = Handover {
            sessions: self,
            key: Some(key),
            permit,
        };
        let answer = self.execute(turn).await;
        handover.release();
        if let Some(a) = answer {
            a.send();
        }
        Ok(())
    }

    /// Queues `turn`. `Ok(Some(start))`: the session was idle and is now busy, and the
    /// caller must run `start`.
    fn enqueue(&self, turn: Turn, force: bool) -> Result<Option<Start>, Busy> {
        let key = Self::key(&turn);
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(&key) {
            let w = slot.waiting.len();
            if !force && w >= self.inner.limits.queue_depth {
                return Err(Busy::QueueFull(key, w));
            }
            slot.waiting.push_back(turn);
            self.inner.queued.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        }
        let permit = match self.inner.permits.clone().try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) if force => None,
            Err(_) => {
                return Err(Busy::TooManySessions(self.inner.limits.max_concurrent_runs));
            }
        };
        slots.insert(
            key.clone(),
            Slot {
                current: turn.run_id.clone(),
                waiting: VecDeque::new(),
            },
        );
        Ok(Some(Start { key, turn, permit }))
    }

    fn spawn_worker(&self, start: Start) {
        let this = self.clone();
        tokio::spawn(async move {
            let Start { key, turn, permit } = start;
            let answer = this.execute(turn).await;
            this.worker(key, permit, answer).await;
        });
    }

    /// The next waiting turn of a busy session; `None`, and the session is idle again,
    /// when there is none.
    fn next_turn(&self, key: &str) -> Option<Turn> {
        let mut slots = self.slots();
        let slot = slots.get_mut(key);
        match slot.and_then(|s| s.waiting.pop_front().map(|t| (s, t))) {
            Some((slot, t)) => {
                self.inner.queued.fetch_sub(1, Ordering::Relaxed);
                slot.current.clone_from(&t.run_id);
                Some(t)
            }
            None => {
                slots.remove(key);
                None
            }
        }
    }

    /// Runs a busy session's waiting turns one after another until there is none. Each
    /// answer (`answer`: that of the turn run before) is sent once the next turn is taken,
    /// or the session is idle and its permit given back.
    async fn worker(
        self,
        key: String,
        mut permit: Option<OwnedSemaphorePermit>,
        mut answer: Option<Answer>,
    ) {
        loop {
            let next = self.next_turn(&key);
            if next.is_none() {
                permit.take();
            }
            if let Some(a) = answer.take() {
                a.send();
            }
            let Some(turn) = next else { break };
            answer = self.execute(turn).await;
        }
    }

    /// Deletes a session and its history, unless a turn of it is running or waiting.
    /// The session is held busy meanwhile, as by a turn: a turn that arrives during the
    /// delete waits for it and then starts a new session, rather than reading the history
    /// being deleted and writing its reply into the session after it.
    pub async fn delete(&self, session_id: &str) -> Result<Deleted, StoreError> {
        {
            let mut slots = self.slots();
            if slots.contains_key(session_id) {
                return Ok(Deleted::Busy);
            }
            slots.insert(session_id.to_owned(), Slot::default());
        }
        // Turns that queued behind the delete go to a worker when it ends, however it ends.
        let mut hold = Handover {
            sessions: self,
            key: Some(session_id.to_owned()),
            permit: None,
        };
        let id = session_id.to_owned();
        let deleted = self
            .inner
            .store
            .write(move |c| store::sessions::delete(c, &id))
            .await;
        self.inner.recent.forget(session_id);
        hold.release();
        Ok(if deleted? {
            Deleted::Deleted
        } else {
            Deleted::Missing
        })
    }

    /// The recent history of a session, for one turn: from memory when it is there, else
    /// from the store. `None` when no history is prepended (no session, or a
    /// `history_limit` of 0). Give it back with [`Sessions::keep_history`] once the turn's
    /// messages are stored.
    async fn history(&self, session_id: &Option<String>) -> Result<Option<Recent>, StoreError> {
        let (Some(id), limit) = (session_id.as_deref(), self.inner.limits.history_limit) else {
            return Ok(None);
        };
        if limit == 0 {
            return Ok(None);
        }
        if let Some(r) = self.inner.recent.take(id) {
            return Ok(Some(r));
        }
        let id = id.to_owned();
        let (stored, rows, key) = self
            .inner
            .store
            .read(move |c| {
                let (stored, rows) = store::sessions::recent(c, &id, limit)?;
                Ok((stored, rows, store::sessions::key(c, &id)?))
            })
            .await?;
        let mut recent = Recent::new(stored);
        recent.key = key;
        for r in rows {
            if let Ok(v) = serde_json::from_str::<Value>(&r) {
                recent.push(Arc::new(v), r.len(), limit as usize);
            }
        }
        Ok(Some(recent))
    }

    /// After a turn of `session_id` stored `rows` (the messages `added`, as JSON) from
    /// position `first`: the history in memory goes on from there, if it was still what
    /// the store held.
    fn keep_history(
        &self,
        session_id: &str,
        recent: Option<Recent>,
        first: i64,
        added: impl IntoIterator<Item = Arc<Value>>,
        rows: &[String],
    ) {
        let Some(mut recent) = recent else { return };
        if recent.stored != first {
            // The store changed under this copy (a delete, say): drop it.
            return;
        }
        let limit = self.inner.limits.history_limit as usize;
        for (m, row) in added.into_iter().zip(rows) {
            recent.push(m, row.len(), limit);
        }
        recent.stored = first + rows.len() as i64;
        self.inner.recent.put(session_id.to_owned(), recent);
    }

    /// Gives back a history that the turn did not change.
    fn return_history(&self, session_id: &Option<String>, recent: Option<Recent>) {
        if let (Some(id), Some(r)) = (session_id, recent) {
            self.inner.recent.put(id.clone(), r);
        }
    }

    /// Runs one turn. A chat turn's answer is returned, not sent: the caller sends it once
    /// the session is handed on, so that a client that has its answer finds the session
    /// idle (a DELETE right after the reply is not refused as busy).
    async fn execute(&self, turn: Turn) -> Option<Answer> {
        let Turn {
            run_id,
            session_id,
            session_key,
            instructions,
            messages,
            model,
            params,
            stream,
            kind,
        } = turn;
        match kind {
            TurnKind::Chat {
                deltas,
                mut done,
                record,
            } => {
                if done.is_closed() {
                    // Queued, and its client has gone since: nobody to answer.
                    tracing::info!(
                        session_key = session_id.as_deref().unwrap_or(""),
                        run_id = %run_id,
                        "turn dropped before it started: its client went away"
                    );
                    return None;
                }
                let started = Instant::now();
                let mut recent = match self.history(&session_id).await {
                    Ok(h) => h,
                    Err(e) => return Some(Answer(done, Err(TurnError::Store(e.into())))),
                };
                // A key given with the turn is kept (when it changed); else the kept one.
                let kept_key = recent.as_ref().and_then(|r| r.key.clone());
                let new_key = session_key.filter(|k| kept_key.as_ref() != Some(k));
                if let (Some(r), Some(k)) = (recent.as_mut(), &new_key) {
                    r.key = Some(k.clone());
                }
                let messages: Vec<Arc<Value>> = messages.into_iter().map(Arc::new).collect();
                let mut input = turn_input(
                    &session_id,
                    new_key.clone().or(kept_key),
                    &run_id,
                    model,
                    recent.as_ref(),
                    &messages,
                    params,
                    stream,
                );
                if let Some(i) = instructions {
                    input
                        .messages
                        .insert(0, Arc::new(json!({"role": "system", "content": i})));
                }
                let agent = self.agent();
                let mut sink = |d: Delta<'_>| {
                    if let Some(deltas) = &deltas {
                        let _ = deltas.send(d.into());
                    }
                };
                // The client leaving ends the turn: its request is dropped, or (streamed or
                // queued) the receiver of its answer.
                let agent_began = Instant::now();
                let result = tokio::select! {
                    r = agent.run(&input, &mut sink) => Some(r),
                    () = done.closed() => None,
                };
                let ran = Some((agent.kind(), agent_began.elapsed()));
                drop(input);
                let Some(result) = result else {
                    crate::metrics::run_finished("cancelled", ran, None);
                    self.return_history(&session_id, recent);
                    tracing::info!(
                        session_key = session_id.as_deref().unwrap_or(""),
                        run_id = %run_id,
                        "turn abandoned: its client went away"
                    );
                    return None;
                };
                let result = match (result, &session_id) {
                    (Ok(reply), Some(sid)) => {
                        let sid = sid.clone();
                        let id = run_id.clone();
                        let (answer, rows) = reply_rows(&messages, &reply.text);
                        let sid2 = sid.clone();
                        let job = move |c: &rusqlite::Connection| {
                            let now = store::now_ms();
                            let first =
                                store::sessions::append_at(c, &sid2, &rows, Some(&id), now)?;
                            if let Some(k) = &new_key {
                                store::sessions::set_key(c, &sid2, k)?;
                            }
                            if let Some(record) = record {
                                record(c, &reply, first + rows.len() as i64)?;
                            }
                            Ok((first, rows, reply))
                        };
                        // An append breaks no constraint: only a failing database fails it.
                        // Nor does a record (a response's row, under a fresh unique id).
                        let written = self.inner.store.write_unguarded(job).await;
                        match written {
                            Ok((first, rows, reply)) => {
                                self.keep_history(
                                    &sid,
                                    recent,
                                    first,
                                    messages.into_iter().chain([answer]),
                                    &rows,
                                );
                                Ok(reply)
                            }
                            // Whether it is stored is not known: the store is asked next time.
                            Err(e) => Err(TurnError::Store(e.into())),
                        }
                    }
                    (Ok(reply), None) => Ok(reply),
                    (Err(e), _) => {
                        self.return_history(&session_id, recent);
                        Err(TurnError::Agent(e))
                    }
                };
                let failure = match &result {
                    Err(TurnError::Agent(e)) => Some(e.kind()),
                    _ => None,
                };
                let state = if result.is_ok() {
                    "completed"
                } else {
                    "failed"
                };
                crate::metrics::run_finished(state, ran, failure);
                match &result {
                    Ok(_) => tracing::debug!(
                        session_key = session_id.as_deref().unwrap_or(""),
                        run_id = %run_id,
                        "turn done in {:.1}ms",
                        started.elapsed().as_secs_f64() * 1000.0
                    ),
                    // A store that cannot write is logged once per episode, by the store.
                    Err(TurnError::Store(e)) if e.is_unavailable() => tracing::debug!(
                        session_key = session_id.as_deref().unwrap_or(""),
                        run_id = %run_id,
                        "turn failed: {e}"
                    ),
                    Err(e) => tracing::warn!(
                        session_key = session_id.as_deref().unwrap_or(""),
                        run_id = %run_id,
                        "turn failed: {e}"
                    ),
                }
                Some(Answer(done, result))
            }
            TurnKind::Run { live, attempt } => {
                self.execute_run(live, attempt, session_id, messages, model, params)
                    .await;
                None
            }
        }
    }

    /// Records an event: in memory for subscribers now, in the store with the next commit.
    fn emit(&self, live: &LiveRun, kind: &str, fields: Map<String, Value>) {
        let ev = live.push(kind, fields);
        let id = live.id.clone();
        // Unguarded: the event's seq follows the run's stored events (see `LiveRun::new`),
        // and its run is stored before it.
        self.inner
            .store
            .write_detached_unguarded("run event", move |c| {
                runs::append_event(c, &id, &ev, store::now_ms())
            });
    }

    async fn execute_run(
        &self,
        live: Arc<LiveRun>,
        attempt: i64,
        session_id: Option<String>,
        messages: Vec<Value>,
        model: String,
        params: Map<String, Value>,
    ) {
        let run_id = live.id.clone();
        let skey = session_id.clone().unwrap_or_default();
        if !live.start() {
            // Cancelled while it waited: the cancel already stored that.
            self.inner.runs.remove(&run_id);
            return;
        }
        let started = Instant::now();
        {
            // The run's start and its event, in one job.
            let ev = live.push("run.started", obj(json!({ "attempt": attempt })));
            let id = run_id.clone();
            self.inner
                .store
                .write_detached_unguarded("run start", move |c| {
                    let now = store::now_ms();
                    runs::set_running(c, &id, attempt, now)?;
                    runs::append_event(c, &id, &ev, now)
                });
        }
        tracing::info!(session_key = %skey, run_id = %run_id, "run started (attempt {attempt})");

        let mut recent = None;
        let mut ran = None;
        let messages: Vec<Arc<Value>> = messages.into_iter().map(Arc::new).collect();
        let outcome = match self.history(&session_id).await {
            Err(e) => Some(Err(TurnError::Store(e.into()))),
            Ok(history) => {
                let input = turn_input(
                    &session_id,
                    history.as_ref().and_then(|h| h.key.clone()),
                    &run_id,
                    model.clone(),
                    history.as_ref(),
                    &messages,
                    params,
                    true,
                );
                recent = history;
                let agent = self.agent();
                let this = self.clone();
                let live2 = live.clone();
                let mut sink = move |d: Delta<'_>| {
                    if let Delta::Text(d) = d {
                        this.emit(&live2, "message.delta", obj(json!({ "delta": d })));
                    }
                };
                let agent_began = Instant::now();
                let r = tokio::select! {
                    r = agent.run(&input, &mut sink) => Some(r.map(|r| r.text).map_err(TurnError::Agent)),
                    () = live.cancelled() => None,
                };
                ran = Some((agent.kind(), agent_began.elapsed()));
                r
            }
        };

        let failure = match &outcome {
            Some(Err(TurnError::Agent(e))) => Some(e.kind()),
            _ => None,
        };
        let (status, output, error, kind, fields) = match outcome {
            Some(Ok(reply)) => (
                RunStatus::Completed,
                Some(reply.clone()),
                None,
                "run.completed",
                json!({ "output": reply }),
            ),
            Some(Err(e)) => (
                RunStatus::Failed,
                None,
                Some(e.to_string()),
                "run.failed",
                json!({ "error": e.to_string() }),
            ),
            None => (RunStatus::Cancelled, None, None, "run.cancelled", json!({})),
        };
        crate::metrics::run_finished(status.as_str(), ran, failure);
        let ev = live.push(kind, obj(fields));
        let id = run_id.clone();
        let sid = session_id.clone();
        let reply = output.clone();
        let err = error.clone();
        let (answer, rows) = match output.as_deref().map(|r| reply_rows(&messages, r)) {
            Some((answer, rows)) => (Some(answer), rows),
            None => (None, Vec::new()),
        };
        // Unguarded: an update of the run by its id, its next event (see `emit`) and the
        // turn's append (see `store::sessions::append`); none has a constraint to break,
        // its run being unfinished until this commits (only finished runs are pruned).
        let committed = self
            .inner
            .store
            .write_unguarded(move |c| {
                let now = store::now_ms();
                runs::finish(c, &id, status, reply.as_deref(), err.as_deref(), now)?;
                runs::append_event(c, &id, &ev, now)?;
                match (sid, reply) {
                    (Some(sid), Some(_)) => {
                        let first = store::sessions::append_at(c, &sid, &rows, Some(&id), now)?;
                        Ok(Some((first, rows)))
                    }
                    _ => Ok(None),
                }
            })
            .await;
        let committed = match committed {
            Ok(appended) => {
                match (appended, &session_id, answer) {
                    (Some((first, rows)), Some(sid), Some(answer)) => self.keep_history(
                        sid,
                        recent,
                        first,
                        messages.into_iter().chain([answer]),
                        &rows,
                    ),
                    // Nothing was added to the session.
                    _ => self.return_history(&session_id, recent),
                }
                Ok(())
            }
            Err(e) => Err(e),
        };
        live.finish(committed.is_ok().then(|| live::Outcome {
            status,
            output: output.clone(),
            error: error.clone(),
        }));
        self.inner.runs.remove(&run_id);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        match committed {
            // The store closed under it: the gateway is stopping, and a graceful restart
            // does this to every run its drain cut short. Expected, so not an error.
            Err(StoreError::WriterGone) => tracing::warn!(session_key = %skey, run_id = %run_id,
                "run finished ({}) as the gateway stopped, before it was stored; it will run again at the next start", status.as_str()),
            Err(e) => tracing::error!(session_key = %skey, run_id = %run_id,
                "run finished ({}) but could not be stored: {e}; it will run again at the next start", status.as_str()),
            Ok(()) => match &error {
                Some(e) => {
                    tracing::warn!(session_key = %skey, run_id = %run_id, "run failed after {ms:.0}ms: {e}")
                }
                None => {
                    tracing::info!(session_key = %skey, run_id = %run_id, "run {} after {ms:.0}ms", status.as_str())
                }
            },
        }
    }

    /// Creates a durable run: stored as queued, then queued for its session. The caller
    /// checked the limits with [`Sessions::check`].
    pub async fn create_run(&self, row: RunRow, messages: Vec<Value>) -> Result<(), StoreError> {
        let run = self.new_run(row, messages);
        let id = run.id().to_owned();
        let stored = self
            .inner
            .store
            .write(move |c| {
                run.store(c)?;
                Ok(run)
            })
            .await;
        match stored {
            Ok(run) => {
                self.queue_run(run);
                Ok(())
            }
            Err(e) => {
                self.inner.runs.remove(&id);
                Err(e)
            }
        }
    }

    /// A durable run, ready to be stored ([`NewRun::store`]). It is live from now on, so
    /// that a subscriber never misses it between its commit and its queueing.
    pub fn new_run(&self, row: RunRow, messages: Vec<Value>) -> NewRun {
        let live = LiveRun::new(row.id.clone(), Vec::new());
        let queued = live.push(
            "run.queued",
            obj(json!({ "session_id": row.session_id, "model": row.model })),
        );
        self.inner.runs.insert(live.clone());
        NewRun {
            row,
            messages,
            live,
            queued,
        }
    }

    /// Queues a run whose [`NewRun::store`] committed: limits do not apply (it was
    /// accepted). Runs queued one after another run in that order within their session.
    pub fn queue_run(&self, run: NewRun) {
        let NewRun {
            row,
            messages,
            live,
            ..
        } = run;
        tracing::info!(session_key = %row.session_id.as_deref().unwrap_or(""), run_id = %row.id, "run queued");
        self.submit_accepted(run_turn(row, messages, live, 1));
    }

    /// A run that will not be stored after all (its write failed, or found it redundant).
    pub fn discard_run(&self, run_id: &str) {
        self.inner.runs.remove(run_id);
    }

    /// Cancels a run. `Ok(None)`: unknown; `Ok(Some(status))`: its status afterwards.
    pub async fn cancel_run(&self, id: &str) -> Result<Option<RunStatus>, StoreError> {
        if let Some(live) = self.inner.runs.get(id) {
            match live.request_cancel() {
                Phase::Queued => {
                    // The worker will skip it; the cancel is stored here.
                    let ev = live.push("run.cancelled", Map::new());
                    let rid = id.to_owned();
                    self.inner
                        .store
                        .write(move |c| {
                            let now = store::now_ms();
                            runs::finish(c, &rid, RunStatus::Cancelled, None, None, now)?;
                            runs::append_event(c, &rid, &ev, now)
                        })
                        .await?;
                    live.finish(Some(live::Outcome {
                        status: RunStatus::Cancelled,
                        output: None,
                        error: None,
                    }));
                    self.inner.runs.remove(id);
                    tracing::info!(run_id = %id, "run cancelled before it started");
                    return Ok(Some(RunStatus::Cancelled));
                }
                Phase::Running => {
                    // The worker stores the cancel once the agent stopped.
                    let mut rx = live.subscribe();
                    let wait = async {
                        while live.phase() != Phase::Finished {
                            if rx.changed().await.is_err() {
                                break;
                            }
                        }
                    };
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), wait).await;
                }
                Phase::Finished => {}
            }
        }
        let rid = id.to_owned();
        let row = self.inner.store.read(move |c| runs::get(c, &rid)).await?;
        Ok(row.map(|r| r.status))
    }

    /// At start: every run that was queued or running when the gateway stopped is queued
    /// again, in its original order. A run that was running starts over from its input,
    /// and its events say so (`run.resumed`). Blocking: call off the runtime.
    pub fn resume_blocking(&self) -> Result<usize, StoreError> {
        let pending = self.inner.store.read_blocking(runs::unfinished)?;
        let n = pending.len();
        for row in pending {
            let id = row.id.clone();
            let stored = self.inner.store.read_blocking(|c| runs::events(c, &id))?;
            let live = LiveRun::new(row.id.clone(), stored);
            let attempt = row.attempt.max(0) + 1;
            if row.status == RunStatus::Running {
                self.emit(
                    &live,
                    "run.resumed",
                    obj(json!({
                        "attempt": attempt,
                        "reason": "the gateway restarted during the run; it runs again from its input",
                    })),
                );
            }
            let messages: Vec<Value> = serde_json::from_str(&row.input).unwrap_or_default();
            tracing::info!(session_key = %row.session_id.as_deref().unwrap_or(""), run_id = %row.id,
                "resuming run that was {} when the gateway stopped", row.status.as_str());
            self.inner.runs.insert(live.clone());
            self.submit_accepted(run_turn(row, messages, live, attempt));
        }
        Ok(n)
    }
}

/// What an agent is given for a turn: the session's recent history, then the turn's own
/// messages.
#[allow(clippy::too_many_arguments)]
fn turn_input(
    session_id: &Option<String>,
    session_key: Option<String>,
    run_id: &str,
    model: String,
    recent: Option<&Recent>,
    messages: &[Arc<Value>],
    params: Map<String, Value>,
    stream: bool,
) -> TurnInput {
    TurnInput {
        session_id: session_id.clone(),
        session_key,
        run_id: run_id.to_owned(),
        model,
        messages: recent
            .iter()
            .flat_map(|r| r.messages.iter().cloned())
            .chain(messages.iter().cloned())
            .collect(),
        params,
        stream,
    }
}

/// The agent's reply as a message, and the rows (JSON) a turn adds to its session: its
/// messages, then that reply.
fn reply_rows(messages: &[Arc<Value>], reply: &str) -> (Arc<Value>, Vec<String>) {
    let answer = Arc::new(json!({"role": "assistant", "content": reply}));
    let rows = messages
        .iter()
        .chain([&answer])
        .map(|m| crate::gateway::json_text(m))
        .collect();
    (answer, rows)
}

/// The turn of a durable run, stored as `row`, at its `attempt`.
fn run_turn(row: RunRow, messages: Vec<Value>, live: Arc<LiveRun>, attempt: i64) -> Turn {
    Turn {
        run_id: row.id,
        session_id: row.session_id,
        session_key: None,
        instructions: None,
        messages,
        model: row.model,
        params: Map::new(),
        stream: true,
        kind: TurnKind::Run { live, attempt },
    }
}

fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

#[cfg(test)]
mod tests;
