//! The inbox: what an inbound message becomes (a turn, an answer of the gateway's own, a
//! command's effect, or nothing), decided before its commit, stored in one transaction
//! with the rest of its batch, and acted on after the commit in commit order.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};

use super::commands::{self, Command};
use super::{Inbound, Instance, Platforms};
use crate::gateway::deliveries::Target;
use crate::gateway::ids::{self, new_id};
use crate::gateway::sessions::NewRun;
use crate::store::deliveries::{self as rows, DeliveryRow};
use crate::store::platforms::{self as stored, PlatformUser, RestartNotice};
use crate::store::runs::{RunRow, RunStatus};
use crate::store::{self, StoreError};

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

impl Platforms {
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
            result: Some(crate::gateway::json_text(
                &json!({"status": "completed", "output": text}),
            )),
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
            Some(Command::Help) => self.answer(inst, m, "command", &commands::help(inst.words)),
            Some(Command::Start) => self.answer(inst, m, "command", &commands::start(inst.words)),
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
                if let Some(what) = &m.unsupported {
                    return self.answer(inst, m, "unsupported", &commands::unsupported(what));
                }
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
            input: crate::gateway::json_text(&Value::from(messages.clone())),
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
        let counted = name.clone();
        // Unguarded (no savepoint): each plan inserts rows under fresh ids, or upserts;
        // no constraint to break, only a failing database fails it, and then its whole
        // commit, whose messages are all answered with an error and sent again.
        let result = self
            .inner
            .store
            .write_then_unguarded(
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
                move |out: Vec<(Plan, bool)>| {
                    let _rt = runtime.enter();
                    let taken = out
                        .iter()
                        .filter(|(p, repeat)| !repeat && !matches!(p, Plan::Drop))
                        .count();
                    if taken > 0 {
                        crate::metrics::platform_messages(platform, &counted, "in", taken as u64);
                    }
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
    pub(super) async fn send_restart_notices(&self) -> Result<(), StoreError> {
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
}
