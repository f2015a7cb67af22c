//! The live side of a run: its events so far (for subscribers that come late), a wake-up
//! for subscribers, and the cancel request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Map, Value};
use tokio::sync::{Notify, watch};

use crate::store::runs::EventRow;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Queued,
    Running,
    Finished,
}

#[derive(Debug)]
struct State {
    phase: Phase,
    events: Vec<Arc<EventRow>>,
    cancel_requested: bool,
    /// How it ended, once that is committed.
    outcome: Option<Outcome>,
}

/// A finished run's end as the store holds it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: crate::store::runs::RunStatus,
    pub output: Option<String>,
    pub error: Option<String>,
}

/// One run's live state, shared by its worker and its subscribers.
#[derive(Debug)]
pub struct LiveRun {
    pub id: String,
    state: Mutex<State>,
    /// The number of events so far; subscribers wait on it.
    count: watch::Sender<usize>,
    cancel: Notify,
}

impl LiveRun {
    pub fn new(id: String, stored: Vec<EventRow>) -> Arc<Self> {
        let n = stored.len();
        Arc::new(LiveRun {
            id,
            state: Mutex::new(State {
                phase: Phase::Queued,
                events: stored.into_iter().map(Arc::new).collect(),
                cancel_requested: false,
                outcome: None,
            }),
            count: watch::channel(n).0,
            cancel: Notify::new(),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Builds the next event (`{"type", "run_id", "seq", …fields}`) and records it in memory;
    /// the caller stores it.
    pub fn push(&self, kind: &str, fields: Map<String, Value>) -> Arc<EventRow> {
        let ev = self.with(|s| {
            let seq = s.events.last().map_or(1, |e| e.seq + 1);
            let mut data = Map::with_capacity(fields.len() + 3);
            data.insert("type".into(), Value::from(kind));
            data.insert("run_id".into(), Value::from(self.id.as_str()));
            data.insert("seq".into(), Value::from(seq));
            data.extend(fields);
            let ev = Arc::new(EventRow {
                seq,
                kind: kind.to_owned(),
                data: crate::gateway::json_text(&Value::Object(data)),
            });
            s.events.push(ev.clone());
            ev
        });
        self.count.send_modify(|n| *n += 1);
        ev
    }

    /// Events from index `from` on, and whether the run has finished.
    pub fn events_from(&self, from: usize) -> (Vec<Arc<EventRow>>, bool) {
        self.with(|s| {
            (
                s.events.get(from..).map(<[_]>::to_vec).unwrap_or_default(),
                s.phase == Phase::Finished,
            )
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    pub fn phase(&self) -> Phase {
        self.with(|s| s.phase)
    }

    /// Queued → running, unless a cancel came first.
    pub fn start(&self) -> bool {
        self.with(|s| {
            if s.cancel_requested || s.phase != Phase::Queued {
                return false;
            }
            s.phase = Phase::Running;
            true
        })
    }

    /// Finished; `stored`: how, as committed (`None` when the commit failed: the store
    /// must then be asked).
    pub fn finish(&self, stored: Option<Outcome>) {
        self.with(|s| {
            s.phase = Phase::Finished;
            s.outcome = stored;
        });
        self.count.send_modify(|_| {});
    }

    /// How the run ended, when it finished and that is committed: what a reader of the
    /// store would find, without the read.
    pub fn outcome(&self) -> Option<Outcome> {
        self.with(|s| s.outcome.clone())
    }

    /// Asks the run to stop; returns its phase at that moment.
    pub fn request_cancel(&self) -> Phase {
        let phase = self.with(|s| {
            s.cancel_requested = true;
            s.phase
        });
        self.cancel.notify_one();
        phase
    }

    pub async fn cancelled(&self) {
        self.cancel.notified().await;
    }
}

/// The runs not yet finished, by id.
#[derive(Debug, Default)]
pub struct RunHub {
    runs: Mutex<HashMap<String, Arc<LiveRun>>>,
}

impl RunHub {
    pub fn insert(&self, run: Arc<LiveRun>) {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(run.id.clone(), run);
    }

    pub fn get(&self, id: &str) -> Option<Arc<LiveRun>> {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(id)
            .cloned()
    }

    pub fn remove(&self, id: &str) {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    pub fn len(&self) -> usize {
        self.runs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
