//! Scheduled runs: each `[[schedule]]` is a task that sleeps until its next slot (on the
//! wall clock, see `clock`), then records the slot — a ledger delivery (route
//! `schedule:NAME`, the slot's time as the sender's id), its durable run and the
//! schedule's last slot, in one commit — and only then queues the run. So a slot runs at
//! most once across crashes and restarts (a run cut short resumes, as every durable run
//! does), and its output goes to its target through the ledger: the log, an http
//! endpoint, or a chat.
//!
//! After downtime (or a jump of the clock), the latest slot missed runs once
//! (`missed = "run_once"`) or is let go (`"skip"`). A schedule new to the store has missed
//! nothing. Reload adds, changes and removes schedules; `schedule run NAME` runs one now.

pub mod clock;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde_json::{Value, json};

use super::deliveries::{ChatTarget, DeliveryLedger, Target};
use super::ids::new_id;
use super::sessions::Sessions;
use crate::config::{Deliver, Missed, ScheduleConfig};
use crate::store::deliveries::{self as rows, DeliveryRow};
use crate::store::runs::{self, RunRow, RunStatus};
use crate::store::schedules as stored;
use crate::store::{self, Store, StoreError};

/// A slot found this much after its time is still on time; later, it was missed (the
/// gateway was down, suspended, or the clock jumped) and `missed` decides.
const ON_TIME: i64 = 60_000;

/// The slot's time as shown and as the ledger's sender id: RFC 3339 in UTC.
pub fn slot_id(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map_or_else(|_| ms.to_string(), |t| t.to_string())
}

/// The first slot after `after_ms`.
pub fn next_slot(cron: &croner::Cron, tz: &jiff::tz::TimeZone, after_ms: i64) -> Option<i64> {
    let t = jiff::Timestamp::from_millisecond(after_ms)
        .ok()?
        .to_zoned(tz.clone());
    let n = cron.find_next_occurrence(&t, false).ok()?;
    Some(n.timestamp().as_millisecond())
}

/// The latest slot at or before `at_ms`.
pub fn previous_slot(cron: &croner::Cron, tz: &jiff::tz::TimeZone, at_ms: i64) -> Option<i64> {
    let t = jiff::Timestamp::from_millisecond(at_ms)
        .ok()?
        .to_zoned(tz.clone());
    let p = cron.find_previous_occurrence(&t, true).ok()?;
    Some(p.timestamp().as_millisecond())
}

struct Running {
    config: ScheduleConfig,
    task: tokio::task::JoinHandle<()>,
    /// The next slot it sleeps for (ms), 0 when none.
    next: Arc<AtomicI64>,
}

#[derive(Clone)]
pub struct Schedules {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    sessions: Sessions,
    ledger: DeliveryLedger,
    model: RwLock<String>,
    running: Mutex<HashMap<String, Running>>,
}

impl Schedules {
    pub fn new(store: Store, sessions: Sessions, ledger: DeliveryLedger, model: &str) -> Self {
        Schedules {
            inner: Arc::new(Inner {
                store,
                sessions,
                ledger,
                model: RwLock::new(model.to_owned()),
                running: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.inner
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the schedules of a configuration, restarts those that changed and stops
    /// those that went (at start, and on every reload).
    pub fn apply(&self, configs: &[ScheduleConfig], model: &str) {
        *self
            .inner
            .model
            .write()
            .unwrap_or_else(PoisonError::into_inner) = model.to_owned();
        let mut running = self.running();
        running.retain(|name, r| {
            let keep = configs.iter().any(|c| c == &r.config);
            if !keep {
                r.task.abort();
                if !configs.iter().any(|c| &c.name == name) {
                    tracing::info!(schedule = %name, "schedule `{name}` removed");
                }
            }
            keep
        });
        for c in configs {
            if running.contains_key(&c.name) {
                continue;
            }
            crate::metrics::schedule_known(&c.name);
            let next = Arc::new(AtomicI64::new(0));
            let this = self.clone();
            let (config, cell) = (c.clone(), next.clone());
            let task = tokio::spawn(async move { this.run(config, cell).await });
            tracing::info!(schedule = %c.name, "schedule `{}`: \"{}\" in {}", c.name, c.cron,
                c.timezone.as_deref().unwrap_or("the system's time zone"));
            running.insert(
                c.name.clone(),
                Running {
                    config: c.clone(),
                    task,
                    next,
                },
            );
        }
    }

    /// One schedule, for as long as it is configured.
    async fn run(self, c: ScheduleConfig, next_cell: Arc<AtomicI64>) {
        let name = c.name.clone();
        let (cron, tz) = match (c.parsed(), c.zone()) {
            (Ok(cron), Ok(tz)) => (cron, tz),
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(schedule = %name, "schedule `{name}` cannot run: {e}");
                return;
            }
        };
        // What the store knows: since when the schedule exists, its last slot.
        let state = loop {
            let n = name.clone();
            match self
                .inner
                .store
                .write(move |conn| stored::ensure(conn, &n, store::now_ms()))
                .await
            {
                Ok(s) => break s,
                Err(e) => {
                    tracing::error!(schedule = %name, "schedule `{name}`: cannot read its state ({e}); again in 5s");
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        };
        let mut last = state
            .last_slot_at
            .unwrap_or(state.created_at)
            .max(state.created_at);
        if let Some(due) = previous_slot(&cron, &tz, store::now_ms())
            && due > last
        {
            last = self
                .missed(&c, due, "while the gateway was down")
                .await
                .unwrap_or(last);
        }
        loop {
            let Some(next) = next_slot(&cron, &tz, store::now_ms().max(last)) else {
                tracing::warn!(schedule = %name, "schedule `{name}` has no slot left");
                next_cell.store(0, Ordering::Relaxed);
                return;
            };
            next_cell.store(next, Ordering::Relaxed);
            if clock::until(next).await == clock::Woke::ClockChanged {
                tracing::info!(schedule = %name, "the wall clock was set: schedule `{name}` computes its next slot again");
            }
            let now = store::now_ms();
            let Some(due) = previous_slot(&cron, &tz, now) else {
                continue;
            };
            if due <= last {
                continue;
            }
            last = if now - due <= ON_TIME {
                self.record(&c, due, false).await.map_or(last, |_| due)
            } else {
                self.missed(&c, due, "while the clock jumped or the machine slept")
                    .await
                    .unwrap_or(last)
            };
        }
    }

    /// A slot that was missed: run it once or let it go, per `missed`. The slot counts as
    /// handled either way (`Some(slot)`), unless it could not be recorded.
    async fn missed(&self, c: &ScheduleConfig, slot: i64, why: &str) -> Option<i64> {
        match c.missed {
            Missed::RunOnce => {
                tracing::info!(schedule = %c.name, "schedule `{}`: slot {} was missed {why}: it runs once now",
                    c.name, slot_id(slot));
                self.record(c, slot, false).await.map(|_| slot)
            }
            Missed::Skip => {
                tracing::info!(schedule = %c.name, "schedule `{}`: slot {} was missed {why}: skipped (missed = \"skip\")",
                    c.name, slot_id(slot));
                crate::metrics::schedule_run(&c.name, "skipped");
                let name = c.name.clone();
                let _ = self
                    .inner
                    .store
                    .write(move |conn| stored::set_last_slot(conn, &name, slot, store::now_ms()))
                    .await;
                Some(slot)
            }
        }
    }

    fn target(&self, c: &ScheduleConfig) -> Target {
        match &c.deliver {
            Deliver::Log => Target::Log,
            Deliver::Http { url, .. } => Target::Http { url: url.clone() },
            Deliver::Chat {
                platform,
                name,
                chat,
                thread,
            } => Target::Chat(ChatTarget {
                platform: platform.clone(),
                name: name.clone(),
                chat_id: chat.clone(),
                thread_id: thread.clone(),
                reply_to: None,
                ordered: true,
            }),
        }
    }

    /// Records a slot (or, `manual`, a run asked for now) and queues its run: the slot,
    /// its delivery and its run are stored in one commit before anything runs. `None`
    /// when it was not recorded (the store failed), `Some(None)` when the slot was
    /// already recorded, `Some(Some(id))` with the new delivery's id.
    async fn record(&self, c: &ScheduleConfig, slot: i64, manual: bool) -> Option<Option<String>> {
        let now = store::now_ms();
        let messages = vec![json!({"role": "user", "content": c.prompt})];
        let run = RunRow {
            id: new_id("run_"),
            session_id: c.session.clone(),
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
        let source_id = if manual {
            format!("manual:{}", slot_id(slot))
        } else {
            slot_id(slot)
        };
        let row = DeliveryRow {
            id: new_id("dlv_"),
            route: c.route(),
            source_id,
            event: if manual { "manual" } else { "slot" }.into(),
            state: "received".into(),
            prompt: c.prompt.clone(),
            session_id: c.session.clone(),
            run_id: run.id.clone(),
            target: self.target(c).to_json(),
            result: None,
            attempts: 0,
            last_error: None,
            next_attempt_at: None,
            received_at: now,
            updated_at: now,
            progress: 0,
        };
        let run = self.inner.sessions.new_run(run, messages);
        let run_id = run.id().to_owned();
        let (name, stored_row) = (c.name.clone(), row.clone());
        let this = self.clone();
        let runtime = tokio::runtime::Handle::current();
        let recorded = self
            .inner
            .store
            .write_then(
                move |conn| {
                    if rows::find_recent(conn, &stored_row.route, &stored_row.source_id, 0)?
                        .is_some()
                    {
                        return Ok((run, None));
                    }
                    rows::insert(conn, &stored_row)?;
                    run.store(conn)?;
                    if !manual {
                        stored::set_last_slot(conn, &name, slot, store::now_ms())?;
                    }
                    Ok((run, Some(stored_row)))
                },
                move |(run, row)| {
                    let _rt = runtime.enter();
                    match row {
                        Some(row) => {
                            let id = row.id.clone();
                            this.inner.sessions.queue_run(run);
                            this.inner.ledger.spawn(row);
                            Some(id)
                        }
                        None => {
                            this.inner.sessions.discard_run(run.id());
                            None
                        }
                    }
                },
            )
            .await;
        match recorded {
            Ok(Some(id)) => {
                tracing::info!(schedule = %c.name, run_id = %run_id, delivery_id = %id,
                    session_key = c.session.as_deref().unwrap_or(""),
                    "schedule `{}`: {} {} runs", c.name, if manual { "a run asked for at" } else { "slot" }, slot_id(slot));
                Some(Some(id))
            }
            Ok(None) => {
                tracing::info!(schedule = %c.name, "schedule `{}`: slot {} was recorded already: it does not run again",
                    c.name, slot_id(slot));
                Some(None)
            }
            Err(e) => {
                self.inner.sessions.discard_run(&run_id);
                tracing::error!(schedule = %c.name, "schedule `{}`: cannot record slot {} ({e})", c.name, slot_id(slot));
                None
            }
        }
    }

    /// `schedule run NAME`: a run now, once, besides the timetable. `Ok(None)`: no such
    /// schedule.
    pub async fn run_now(&self, name: &str) -> Result<Option<String>, StoreError> {
        let Some(c) = self.running().get(name).map(|r| r.config.clone()) else {
            return Ok(None);
        };
        match self.record(&c, store::now_ms(), true).await {
            Some(Some(id)) => Ok(Some(id)),
            _ => Err(StoreError::Commit(format!(
                "schedule `{name}`: the run could not be recorded"
            ))),
        }
    }

    /// Each schedule: its expression, zone, next slot, last run and its outcome.
    pub async fn list(&self) -> Result<Vec<Value>, StoreError> {
        let mut list: Vec<(ScheduleConfig, i64)> = self
            .running()
            .values()
            .map(|r| (r.config.clone(), r.next.load(Ordering::Relaxed)))
            .collect();
        list.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        let mut out = Vec::with_capacity(list.len());
        for (c, next) in list {
            let route = c.route();
            let last = self
                .inner
                .store
                .read(move |conn| {
                    let Some(d) = rows::latest(conn, &route)? else {
                        return Ok(None);
                    };
                    let run = runs::get(conn, &d.run_id)?;
                    Ok(Some((d, run)))
                })
                .await?;
            let last = last.map(|(d, run)| {
                json!({
                    "slot": d.source_id,
                    "delivery_id": d.id,
                    "delivery_state": d.state,
                    "run_id": d.run_id,
                    "run_status": run.as_ref().map(|r| r.status.as_str()),
                    "error": run.as_ref().and_then(|r| r.error.clone()).or(d.last_error),
                })
            });
            out.push(json!({
                "name": c.name,
                "cron": c.cron,
                "timezone": c.timezone,
                "next_at": (next > 0).then(|| slot_id(next)),
                "next_at_unix_ms": (next > 0).then_some(next),
                "last": last,
            }));
        }
        Ok(out)
    }

    /// The schedule due next, and when (ms).
    pub fn next_due(&self) -> Option<(String, i64)> {
        self.running()
            .iter()
            .map(|(n, r)| (n.clone(), r.next.load(Ordering::Relaxed)))
            .filter(|(_, at)| *at > 0)
            .min_by_key(|(_, at)| *at)
    }

    pub fn next_due_text(&self) -> Option<String> {
        self.next_due()
            .map(|(n, at)| format!("{n} at {}", slot_id(at)))
    }
}

/// For the ledger's signing keys: each schedule's http target secret, by its route.
pub fn signing_keys(configs: &[ScheduleConfig]) -> Result<HashMap<String, Vec<u8>>, String> {
    let mut keys = HashMap::new();
    for c in configs {
        if let Deliver::Http {
            secret: Some(s), ..
        } = &c.deliver
        {
            let secret = s
                .read()
                .map_err(|e| format!("[[schedule]] `{}`: deliver.secret: {e}", c.name))?;
            keys.insert(
                c.route(),
                crate::gateway::webhooks::signature::standard_key(secret.expose()),
            );
        }
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn slots_follow_the_expression_in_its_zone() {
        let cron = crate::config::ScheduleConfig {
            name: "x".into(),
            cron: "0 8 * * 1-5".into(),
            timezone: Some("Europe/Berlin".into()),
            prompt: "p".into(),
            session: None,
            deliver: Deliver::Log,
            missed: Missed::RunOnce,
        };
        let (c, tz) = (cron.parsed().unwrap(), cron.zone().unwrap());
        // Friday 2026-12-04 08:00 in Berlin is 07:00 UTC; the next is Monday.
        assert_eq!(
            next_slot(&c, &tz, ms("2026-12-04T06:00:00Z")),
            Some(ms("2026-12-04T07:00:00Z"))
        );
        assert_eq!(
            next_slot(&c, &tz, ms("2026-12-04T07:00:00Z")),
            Some(ms("2026-12-07T07:00:00Z"))
        );
        assert_eq!(
            previous_slot(&c, &tz, ms("2026-12-06T12:00:00Z")),
            Some(ms("2026-12-04T07:00:00Z"))
        );
        // In summer Berlin is UTC+2.
        assert_eq!(
            next_slot(&c, &tz, ms("2026-07-01T00:00:00Z")),
            Some(ms("2026-07-01T06:00:00Z"))
        );
    }

    #[test]
    fn daylight_saving_changes_neither_skip_nor_double_a_slot() {
        let tz = jiff::tz::TimeZone::get("Europe/Berlin").unwrap();
        // 02:30 does not exist on 2026-03-29 (02:00 → 03:00) and exists twice on
        // 2026-10-25 (03:00 → 02:00).
        let c = crate::config::schedule::parse_cron("30 2 * * *").unwrap();
        let spring = next_slot(&c, &tz, ms("2026-03-28T12:00:00Z")).unwrap();
        let spring2 = next_slot(&c, &tz, spring).unwrap();
        // The gap's slot is not skipped: it runs once on the 29th, then 02:30 on the 30th.
        assert!(
            spring >= ms("2026-03-29T00:00:00Z") && spring < ms("2026-03-29T02:00:00Z"),
            "{}",
            slot_id(spring)
        );
        assert_eq!(spring2, ms("2026-03-30T00:30:00Z"));
        let autumn = next_slot(&c, &tz, ms("2026-10-24T12:00:00Z")).unwrap();
        let autumn2 = next_slot(&c, &tz, autumn).unwrap();
        // The repeated 02:30 runs once: the next slot is the following day's.
        assert!(
            autumn >= ms("2026-10-25T00:00:00Z") && autumn <= ms("2026-10-25T01:30:00Z"),
            "{}",
            slot_id(autumn)
        );
        assert_eq!(autumn2, ms("2026-10-26T01:30:00Z"), "{}", slot_id(autumn2));
    }
}
