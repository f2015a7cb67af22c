//! The WAL's checkpoints, on a thread and a connection of their own.
//!
//! Left to itself, SQLite checkpoints in the commit that takes the WAL past 1,000 pages:
//! that commit copies the pages into the database file and syncs both files, and every
//! commit queued behind it waits (8–12 ms on a virtual disk where a commit takes 3–4).
//! A checkpoint can run beside the writer instead — in WAL mode the writer appends and
//! readers read meanwhile — so the writer's connection never checkpoints: its WAL hook
//! [`nudge`](Nudge::nudge)s this thread at the same threshold, and the thread runs a
//! [`PASSIVE`] checkpoint (at most one per [`EVERY`]; none while nothing commits, so an
//! idle gateway does not wake up for it). Once a checkpoint has copied every frame, the
//! writer's next commit starts the WAL over from its beginning.
//!
//! A WAL that starts over keeps its file, whatever length a burst gave it: its pages are
//! written again where they are, already allocated and in the page cache. Cutting the file
//! back in the commit that starts it over (SQLite's `journal_size_limit`) stalled that
//! commit for as long as the kernel took to drop the pages cut (up to 22 ms at 6,000
//! messages/s, where the WAL reached 200 MB between two starts), and made every commit
//! after it grow the file anew: a new page to allocate for each one written. So the file
//! is given back only once the gateway is quiet: [`QUIET`] after the last commit, a
//! `TRUNCATE` checkpoint cuts it to nothing.
//!
//! [`PASSIVE`]: https://sqlite.org/c3ref/wal_checkpoint_v2.html

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rusqlite::Connection;

/// A WAL this long (in pages) is checkpointed: SQLite's own threshold.
pub const PAGES: i32 = 1000;
/// A WAL this long (in frames: 64 MiB) is started over, not only copied: see
/// [`checkpoint`].
const RESTART_AT: i64 = 16 * PAGES as i64;
/// At most one checkpoint per this much time (a checkpoint that a reader's snapshot keeps
/// from finishing is tried again at this pace, not at every commit's).
const EVERY: Duration = Duration::from_millis(50);
/// A WAL file that checkpoints were asked for is cut to nothing once nothing has been
/// committed for this long.
pub const QUIET: Duration = Duration::from_secs(1);

pub struct Checkpointer {
    nudge: Nudge,
    thread: JoinHandle<()>,
}

enum Ask {
    Checkpoint,
    Stop,
}

/// What asks the checkpointer for a checkpoint, and tells it of every commit.
#[derive(Clone)]
pub struct Nudge {
    asks: mpsc::SyncSender<Ask>,
    commits: Arc<Commits>,
}

impl Nudge {
    /// The WAL is long: checkpoint it soon.
    pub fn nudge(&self) {
        // Full: a checkpoint is asked for already. Disconnected: the thread ended.
        let _ = self.asks.try_send(Ask::Checkpoint);
    }

    /// A commit, with `pages` in the WAL after it.
    pub fn committed(&self, pages: i32) {
        self.commits.now();
        if pages >= PAGES {
            self.nudge();
        }
    }
}

/// When the last commit was, in milliseconds from `since`.
struct Commits {
    since: Instant,
    last_ms: AtomicU64,
}

impl Commits {
    fn now(&self) {
        let ms = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn quiet_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.since.elapsed().saturating_sub(last)
    }
}

impl Checkpointer {
    /// Opens the checkpointer's connection to the database at `path` and starts its thread.
    pub fn start(path: &Path) -> std::io::Result<Checkpointer> {
        let conn = Connection::open(path)
            .and_then(|c| {
                super::configure(&c)?;
                // Never waits for a lock: a checkpoint that would wait does what it can
                // without (see `checkpoint`), so that the writer never waits behind it.
                c.busy_timeout(Duration::ZERO)?;
                Ok(c)
            })
            .map_err(std::io::Error::other)?;
        // One ask pending is enough: a checkpoint takes the whole WAL.
        let (asks, rx) = mpsc::sync_channel(1);
        let commits = Arc::new(Commits {
            since: Instant::now(),
            last_ms: AtomicU64::new(0),
        });
        let seen = Arc::clone(&commits);
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || run(&conn, &rx, &seen))?;
        Ok(Checkpointer {
            nudge: Nudge { asks, commits },
            thread,
        })
    }

    pub fn nudger(&self) -> Nudge {
        self.nudge.clone()
    }

    /// Stops the thread, after the checkpoint it is in, if any.
    pub fn stop(self) {
        // Blocks while a checkpoint is asked for, until the thread takes that ask.
        let _ = self.nudge.asks.send(Ask::Stop);
        let _ = self.thread.join();
    }
}

fn run(conn: &Connection, rx: &mpsc::Receiver<Ask>, commits: &Commits) {
    let mut last = Instant::now();
    let mut failing: Option<String> = None;
    // Checkpoints ran since the WAL file was last cut: it may be long.
    let mut long = false;
    // A cut that found the WAL in use waits a whole `QUIET` before the next try.
    let mut refused = false;
    loop {
        let ask = if long {
            // Waits for the next ask, or for the quiet that gives the file back.
            let wait = if refused {
                QUIET
            } else {
                QUIET.saturating_sub(commits.quiet_for())
            };
            match rx.recv_timeout(wait.max(Duration::from_millis(1))) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    refused = false;
                    if commits.quiet_for() >= QUIET {
                        long = !truncate(conn);
                        refused = long;
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Ok(ask) => ask,
            }
        } else {
            match rx.recv() {
                Ok(ask) => ask,
                Err(mpsc::RecvError) => return,
            }
        };
        if matches!(ask, Ask::Stop) {
            return;
        }
        long = true;
        // Not before `EVERY` after the last checkpoint; a stop ends the wait.
        loop {
            let left = EVERY.saturating_sub(last.elapsed());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(left) {
                Ok(Ask::Checkpoint) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                Ok(Ask::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        last = Instant::now();
        match checkpoint(conn) {
            Ok((frames, copied)) => {
                crate::metrics::store_checkpoint(last.elapsed());
                if failing.take().is_some() {
                    tracing::info!("store: WAL checkpoints work again");
                }
                tracing::trace!("store: checkpoint copied {copied} of {frames} WAL frames");
            }
            Err(e) => {
                // Once per episode: the writer reports what the database cannot do, and
                // the next commit's nudge tries again.
                let e = e.to_string();
                if failing.as_ref() != Some(&e) {
                    tracing::warn!("store: WAL checkpoint failed (will retry): {e}");
                }
                failing = Some(e);
            }
        }
    }
}

/// Copies what is left of the WAL into the database and cuts its file to nothing, when
/// nothing writes or reads from it right then (it does not wait: the next quiet spell
/// tries again). Returns whether it did.
fn truncate(conn: &Connection) -> bool {
    let began = Instant::now();
    match conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
        r.get::<_, i64>(0)
    }) {
        Ok(0) => {
            crate::metrics::store_checkpoint(began.elapsed());
            tracing::trace!("store: the WAL file is cut to nothing, the gateway being quiet");
            true
        }
        Ok(_) => false,
        Err(e) => {
            if e.sqlite_error_code() != Some(rusqlite::ErrorCode::DatabaseBusy) {
                tracing::debug!("store: cutting the WAL file failed (will retry): {e}");
            }
            false
        }
    }
}

/// Copies the WAL into the database; returns the frames the WAL holds after, and how many
/// of them are copied.
///
/// A WAL starts over from its beginning once every frame is copied and no reader still
/// reads from it; with reads always under way (a busy gateway), that moment may never
/// come, and the WAL would grow without end (1.2 GB in a minute of 6,000 messages/s).
/// So past [`RESTART_AT`] frames, a `RESTART` checkpoint starts it over — and since this
/// connection does not wait for locks, it does only when nothing is written or read from
/// the WAL right then, and else does what a `PASSIVE` one does: it is tried again at the
/// next ask. (The writer's next commit then finds the lock taken for that instant and
/// retries, as it would for a reader.)
fn checkpoint(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    let pragma = |mode: &str| {
        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
            Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
        })
    };
    let (frames, copied) = pragma("PASSIVE")?;
    if frames < RESTART_AT {
        return Ok((frames, copied));
    }
    match pragma("RESTART") {
        Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) => {
            Ok((frames, copied))
        }
        r => r,
    }
}
