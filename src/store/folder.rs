//! The folder thread: moves the turn log into `history.db` (see [`super::sessions`]) every
//! [`super::FOLD_EVERY`] while turns come, sooner once the writer has committed
//! [`FOLD_AFTER_JOBS`] jobs, and when asked ([`super::Store::fold`]).
//!
//! A fold is three steps. The writer switches appends to the other log table (a job that
//! touches no page); this thread copies the table it left into the history, in a
//! transaction on `history.db` alone, synced; the writer then records the sessions' counts
//! and empties that table (a short job: a few statements over one table's index). The copy,
//! which took the writer 13–15 ms twice a second at 5,000 messages a second, no longer
//! holds up a commit. Every step can be repeated after a failure or a crash (see
//! `sessions`), so a fold cut short anywhere is simply done again.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::oneshot;

use super::{Inner, StoreError, health, sessions};

/// The writer nudges the folder once this many jobs committed since the last fold.
const FOLD_AFTER_JOBS: usize = 16384;

/// How often a folder waiting for the writer looks whether it was told to stop.
const POLL: Duration = Duration::from_millis(20);

type Asked = oneshot::Sender<Result<usize, StoreError>>;

#[derive(Default)]
struct State {
    stop: bool,
    nudged: bool,
    asked: Vec<Asked>,
}

/// What the store, the writer and the folder thread share.
#[derive(Default)]
pub(super) struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    /// Jobs committed since the last fold began.
    pending: AtomicUsize,
}

impl Shared {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The writer committed `jobs` jobs.
    pub(super) fn committed(&self, jobs: usize) {
        if self.pending.fetch_add(jobs, Ordering::Relaxed) + jobs >= FOLD_AFTER_JOBS {
            self.state().nudged = true;
            self.wake.notify_one();
        }
    }

    /// Asks for a fold; `answer` gets its result (an error once the folder stopped).
    pub(super) fn ask(&self, answer: Asked) {
        let mut st = self.state();
        if st.stop {
            let _ = answer.send(Err(StoreError::WriterGone));
            return;
        }
        st.asked.push(answer);
        self.wake.notify_one();
    }

    /// Tells the thread to stop after the step it is in.
    pub(super) fn stop(&self) {
        let mut st = self.state();
        st.stop = true;
        for a in st.asked.drain(..) {
            let _ = a.send(Err(StoreError::WriterGone));
        }
        self.wake.notify_one();
    }

    fn stopped(&self) -> bool {
        self.state().stop
    }
}

/// Starts the thread. `conn` is the history database with `gateway.db` attached as
/// `live`; `every: None` folds only when asked.
pub(super) fn start(
    shared: Arc<Shared>,
    inner: Weak<Inner>,
    conn: Connection,
    every: Option<Duration>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("store-folder".into())
        .spawn(move || run(&shared, &inner, conn, every))
}

/// A fold that fails leaves the log as it is (turns go on committing to it) and is tried
/// again at the next period: the first failure of a run of them is a warning, the next
/// ones debug lines, and the first success after them says so.
fn run(shared: &Shared, inner: &Weak<Inner>, mut conn: Connection, every: Option<Duration>) {
    let mut failing: Option<(Instant, u64)> = None;
    loop {
        let asked = {
            let mut st = shared.state();
            loop {
                if st.stop {
                    return;
                }
                if st.nudged || !st.asked.is_empty() {
                    break;
                }
                match every {
                    Some(every) => {
                        let (g, waited) = shared
                            .wake
                            .wait_timeout(st, every)
                            .unwrap_or_else(PoisonError::into_inner);
                        st = g;
                        if waited.timed_out() {
                            break;
                        }
                    }
                    None => st = shared.wake.wait(st).unwrap_or_else(PoisonError::into_inner),
                }
            }
            st.nudged = false;
            std::mem::take(&mut st.asked)
        };
        let pending = shared.pending.swap(0, Ordering::Relaxed);
        if asked.is_empty() && pending == 0 {
            continue;
        }
        let r = fold(shared, inner, &mut conn);
        if r.is_err() {
            // Tried again at the next period, even if no job commits meanwhile.
            shared.pending.fetch_add(pending.max(1), Ordering::Relaxed);
        }
        match (&r, &mut failing) {
            (Err(StoreError::WriterGone), _) => {}
            (Err(e), None) => {
                tracing::warn!(
                    "store: folding the turn log into {} failed: {e}; turns are still stored (in the log), the fold is tried again every {:?}",
                    super::HISTORY_FILE,
                    every.unwrap_or(super::FOLD_EVERY)
                );
                failing = Some((Instant::now(), 1));
            }
            (Err(e), Some((_, n))) => {
                *n += 1;
                tracing::debug!("store: folding the turn log failed again: {e}");
            }
            (Ok(_), Some((since, n))) => {
                tracing::info!(
                    "store: folding the turn log succeeds again after {:.1}s ({n} failed)",
                    since.elapsed().as_secs_f64()
                );
                failing = None;
            }
            (Ok(_), None) => {}
        }
        for a in asked {
            let _ = a.send(match &r {
                Ok(n) => Ok(*n),
                Err(e) if e.is_unavailable() => Err(StoreError::Unavailable(e.to_string())),
                Err(e) => Err(StoreError::Commit(e.to_string())),
            });
        }
    }
}

/// One fold (see the module's documentation): the messages moved.
fn fold(shared: &Shared, inner: &Weak<Inner>, conn: &mut Connection) -> Result<usize, StoreError> {
    if !sessions::anything_to_fold(conn).map_err(unavailable)? {
        return Ok(0);
    }
    let began = Instant::now();
    let table = writer(shared, inner, false, sessions::flip)?;
    let (moved, deletes) = sessions::fold_into_history(conn, table).map_err(unavailable)?;
    writer(shared, inner, true, move |c| {
        sessions::clear_folded(c, table, deletes)
    })?;
    crate::metrics::store_fold(began.elapsed());
    Ok(moved)
}

fn unavailable(e: rusqlite::Error) -> StoreError {
    if health::unavailable(&e) {
        crate::metrics::store_error(health::kind(&e));
        StoreError::Unavailable(e.to_string())
    } else {
        StoreError::Sqlite(e)
    }
}

/// Runs `f` in the writer's next batch and waits for its commit, giving up when told to
/// stop (the fold is done again by the next one, at the latest at the next open).
fn writer<T, F>(shared: &Shared, inner: &Weak<Inner>, guarded: bool, f: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
{
    let rx = {
        let inner = inner.upgrade().ok_or(StoreError::WriterGone)?;
        inner.queue_blocking(guarded, f)?
    };
    loop {
        match rx.recv_timeout(POLL) {
            Ok(r) => return r,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) if !shared.stopped() => {}
            Err(_) => return Err(StoreError::WriterGone),
        }
    }
}
