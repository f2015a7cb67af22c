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
//! [`PASSIVE`]: https://sqlite.org/c3ref/wal_checkpoint_v2.html

use std::path::Path;
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

pub struct Checkpointer {
    nudge: Nudge,
    thread: JoinHandle<()>,
}

enum Ask {
    Checkpoint,
    Stop,
}

/// What asks the checkpointer for a checkpoint.
#[derive(Clone)]
pub struct Nudge(mpsc::SyncSender<Ask>);

impl Nudge {
    /// The WAL is long: checkpoint it soon.
    pub fn nudge(&self) {
        // Full: a checkpoint is asked for already. Disconnected: the thread ended.
        let _ = self.0.try_send(Ask::Checkpoint);
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
        let (nudge, rx) = mpsc::sync_channel(1);
        let thread = std::thread::Builder::new()
            .name("store-checkpoint".into())
            .spawn(move || run(&conn, &rx))?;
        Ok(Checkpointer {
            nudge: Nudge(nudge),
            thread,
        })
    }

    pub fn nudger(&self) -> Nudge {
        self.nudge.clone()
    }

    /// Stops the thread, after the checkpoint it is in, if any.
    pub fn stop(self) {
        // Blocks while a checkpoint is asked for, until the thread takes that ask.
        let _ = self.nudge.0.send(Ask::Stop);
        let _ = self.thread.join();
    }
}

fn run(conn: &Connection, rx: &mpsc::Receiver<Ask>) {
    let mut last = Instant::now();
    let mut failing: Option<String> = None;
    while let Ok(Ask::Checkpoint) = rx.recv() {
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
