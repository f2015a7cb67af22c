//! Everything the gateway keeps on disk: two SQLite databases in the state folder (WAL,
//! versioned migrations applied at start): `gateway.db`, everything, and `history.db`,
//! the sessions' folded messages (see [`sessions`]), which a thread of its own writes so
//! that moving messages there never holds up a commit.
//!
//! SQLite never runs on the async runtime. Writes go to one dedicated writer thread through
//! a channel; it runs every job that queued up meanwhile in one transaction (group commit),
//! each job in its own savepoint so that one failing job does not undo the others, and
//! answers each caller only after the commit (on the runtime, one task per commit).
//!
//! A job that can fail only when the database itself does (an append to the turn log, an
//! update by primary key, an insert under fresh ids: no constraint to break) may run
//! without a savepoint ([`Store::write_unguarded`], `write_then_unguarded`,
//! `write_detached_unguarded`): when one fails after all, the batch is rolled back, the
//! jobs that ran in it are told so, and the jobs that had not run yet go into the next
//! batch. A savepoint copies every page its job touches (the statement journal): a chat
//! message's jobs, guarded, spent 15 % of its instructions there.
//!
//! Reads run on a small pool of read-only connections inside `spawn_blocking` (WAL lets
//! them run beside the writer).
//!
//! A database that cannot write (disk full, I/O error, locked by another process) fails
//! each write with an error that [`StoreError::is_unavailable`] tells apart, and leaves
//! the store degraded ([`Store::degraded`]) until a commit succeeds again; see [`health`].

mod checkpoint;
pub mod deliveries;
mod folder;
mod health;
mod migrations;
pub mod platforms;
pub mod responses;
pub mod runs;
pub mod schedules;
pub mod sessions;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::{Duration, Instant};

use rusqlite::config::DbConfig;
use rusqlite::{Connection, OpenFlags, TransactionBehavior};
use tokio::sync::oneshot;

pub use migrations::SCHEMA_VERSION;

/// The database file inside the state folder.
pub const DB_FILE: &str = "gateway.db";

/// The folded messages, beside [`DB_FILE`].
pub const HISTORY_FILE: &str = "history.db";

/// The turn log (see [`sessions`]) is folded into the history this often while turns come
/// (see `folder`), and at open and close. A fold's cost is per message moved, whatever its
/// size; a longer period means fewer, larger folds, and each session's pages written once
/// per fold. Folds of at most 512 messages, tried for the p99 of chat platforms, rewrote
/// every busy session's pages in each: an API turn wrote 8.3 KB instead of 3.2, its writer
/// time went from 13 to 27 µs and its rate from 28,000 to 16,000/s (`cargo bench --bench
/// api`).
pub const FOLD_EVERY: Duration = Duration::from_millis(500);

/// Bytes of WAL file kept when it starts over, when the checkpoint thread could not start
/// (it cuts the file itself, once the gateway is quiet: see `checkpoint`).
const WAL_KEPT: i64 = 64 << 20;

/// The page cache of a file attached to a connection for a few reads, in KiB (SQLite's
/// `cache_size` takes KiB as a negative number): SQLite's default is 2 MiB per file and
/// connection, which five connections fill under load.
const ATTACHED_CACHE_KIB: i64 = -64;

/// The folder's page cache of `history.db`, in KiB (negative, as for
/// [`ATTACHED_CACHE_KIB`]).
const FOLDER_CACHE_KIB: i64 = -512;

/// Prepared statements kept per connection.
const STATEMENTS: usize = 128;

/// At most this many jobs share one commit.
const MAX_BATCH: usize = 512;
/// Read connections: async reads wait for one of these rather than open another (opening
/// a connection costs more than most reads).
const READERS: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the database {path} has schema version {found}, newer than this binary knows ({known}): it was written by a newer hermes-gateway; run that version, or give this one another [state] dir"
    )]
    SchemaTooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot migrate the database {path} to schema version {version}: {source}")]
    Migrate {
        path: PathBuf,
        version: i64,
        source: rusqlite::Error,
    },
    #[error("cannot create the database {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("the database writer has stopped")]
    WriterGone,
    #[error("the database commit failed: {0}")]
    Commit(String),
    /// The database cannot write now (see [`StoreError::is_unavailable`]): nothing of the
    /// write was stored.
    #[error("storage is unavailable: {0}")]
    Unavailable(String),
}

/// A write job: runs inside the batch's transaction and returns how it went plus what to
/// do once the commit is known. Given no connection (the transaction could not begin), it
/// runs nothing and returns what to do with the failure.
struct Job {
    /// In a savepoint of its own, so that its failure undoes only its own writes.
    guarded: bool,
    run: JobFn,
}

impl Job {
    /// A job running `f`, whose outcome (once its commit is known) `answer` gets, with
    /// `on_commit`'s value when it committed.
    fn new<T, U, F, C>(
        guarded: bool,
        f: F,
        on_commit: C,
        answer: impl FnOnce(Result<U, StoreError>) + Send + 'static,
    ) -> Job
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        C: FnOnce(T) -> U + Send + 'static,
    {
        Job {
            guarded,
            run: Box::new(move |conn| match conn.map(f) {
                Some(Ok(v)) => (
                    Ran::Ok,
                    Box::new(move |committed: Result<(), StoreError>| {
                        answer(committed.map(|()| on_commit(v)));
                    }),
                ),
                Some(Err(e)) => (
                    Ran::failed(&e),
                    Box::new(move |_| answer(Err(StoreError::Sqlite(e)))),
                ),
                // Not run: the batch's failure is the answer.
                None => (
                    Ran::Failed,
                    Box::new(move |committed: Result<(), StoreError>| {
                        answer(Err(committed.err().unwrap_or(StoreError::WriterGone)));
                    }),
                ),
            }),
        }
    }
}
type JobFn = Box<dyn FnOnce(Option<&Connection>) -> (Ran, Completion) + Send>;
type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// How a job's own statements went.
enum Ran {
    Ok,
    Failed,
    /// Failed because the database cannot write ([`health::unavailable`]): the reason.
    Unavailable(String),
}

impl Ran {
    fn failed(e: &rusqlite::Error) -> Ran {
        if health::unavailable(e) {
            crate::metrics::store_error(health::kind(e));
            Ran::Unavailable(e.to_string())
        } else {
            Ran::Failed
        }
    }
}

/// A cloneable handle on the database.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// [`HISTORY_FILE`], as SQLite takes a file name (UTF-8).
    history: String,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    readers: Mutex<Vec<Connection>>,
    read_permits: tokio::sync::Semaphore,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    folding: Arc<folder::Shared>,
    folder: Mutex<Option<std::thread::JoinHandle<()>>>,
    health: Arc<health::Health>,
}

impl Inner {
    /// Queues `f` for the writer's next batch, for a caller off the runtime: the receiver
    /// gets its outcome once its commit is known.
    fn queue_blocking<T, F>(
        &self,
        guarded: bool,
        f: F,
    ) -> Result<mpsc::Receiver<Result<T, StoreError>>, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel();
        let job = Job::new(
            guarded,
            f,
            |v| v,
            move |r| {
                let _ = tx.send(r);
            },
        );
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .ok_or(StoreError::WriterGone)?
            .send(job)
            .map_err(|_| StoreError::WriterGone)?;
        Ok(rx)
    }
}

impl Inner {
    /// Stops the folder, then the writer after the jobs already queued (it folds what is
    /// left in the log), and waits for each unless this is its own thread (the last handle
    /// on the store dropped there). Nothing writes either file once this returns, so a
    /// store opened again on the same folder in this process cannot race the last one.
    fn shut(&self) {
        fn join(slot: &Mutex<Option<std::thread::JoinHandle<()>>>) {
            let t = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(t) = t
                && t.thread().id() != std::thread::current().id()
            {
                let _ = t.join();
            }
        }
        self.folding.stop();
        join(&self.folder);
        self.writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        join(&self.thread);
    }
}

impl Drop for Inner {
    /// A store dropped without [`Store::close`] closes as it would.
    fn drop(&mut self) {
        self.shut();
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

/// How long a connection waits for a lock another holds before it gives up (busy).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "foreign_keys", true)?;
    // Savepoint and statement journals, sorters: in memory. On disk, folding the turn log
    // (a savepoint holding a few hundred pages) cost as many writes to a temporary file.
    conn.pragma_update(None, "temp_store", "memory")?;
    // Without the query planner stability guarantee, a statement with a bound `LIMIT ?`
    // is compiled again at each new binding (SQLite 3.5x with STAT4): a cached statement
    // would be parsed and planned anew on every call.
    conn.set_db_config(DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)?;
    // Every statement the gateway runs, kept prepared: past rusqlite's default of 16, the
    // writer's (a chat message alone runs a dozen) pushed each other out of the cache and
    // were parsed again.
    conn.set_prepared_statement_cache_capacity(STATEMENTS);
    Ok(())
}

impl Store {
    /// Opens (creating if needed) the database in `state_dir` and applies migrations.
    /// Blocking: call before the runtime serves, or from `spawn_blocking`.
    pub fn open(state_dir: &Path) -> Result<Store, StoreError> {
        Self::open_folding(state_dir, Some(FOLD_EVERY))
    }

    /// [`Store::open`]; `fold_every: None` folds the turn log only at open, at close and
    /// when asked ([`Store::fold`]: tests that look at the log).
    fn open_folding(state_dir: &Path, fold_every: Option<Duration>) -> Result<Store, StoreError> {
        let path = state_dir.join(DB_FILE);
        let history_path = state_dir.join(HISTORY_FILE);
        let open_err = |source| StoreError::Open {
            path: path.clone(),
            source,
        };
        let history = utf8(&history_path)?.to_owned();
        if !exists(&path) && !exists(&sibling(&path, "-wal")) {
            create(&path, migrations::MAIN)?;
        }
        if !exists(&history_path) && !exists(&sibling(&history_path, "-wal")) {
            create(&history_path, migrations::HISTORY)?;
        }
        let mut conn = Connection::open(&path).map_err(open_err)?;
        configure(&conn).map_err(open_err)?;
        conn.busy_handler(Some(writer_busy)).map_err(open_err)?;
        // WAL: readers never wait for the writer. FULL: a commit is on disk when acknowledged.
        conn.pragma_update(None, "journal_mode", "wal")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "full")
            .map_err(open_err)?;
        migrations::apply(&mut conn, &path)?;
        // What the last run logged and did not fold (it was killed, say); the messages of a
        // database from before version 12.
        let mut folding = open_history(&history_path, &path)?;
        fold_all(&mut conn, &mut folding).map_err(open_err)?;
        // Checkpoints beside the writer rather than in its commits (see `checkpoint`); if
        // the checkpointer cannot start, the writer's commits checkpoint as SQLite does.
        let checkpointer = match checkpoint::Checkpointer::start(&path) {
            Ok(c) => {
                // Replaces SQLite's own hook, the one that checkpoints in the commit.
                // It also keeps the WAL file's length while commits come (see `checkpoint`).
                let nudge = c.nudger();
                conn.wal_hook(Some(move |_: &mut rusqlite::hooks::Wal, pages| {
                    nudge.committed(pages);
                    Ok(())
                }))
                .map_err(open_err)?;
                Some(c)
            }
            Err(e) => {
                tracing::warn!(
                    "store: cannot start the checkpoint thread ({e}): commits checkpoint the WAL themselves"
                );
                // Nothing cuts the WAL file when the gateway is quiet: it is cut back to
                // this when it starts over, or it would keep the length a burst gave it.
                conn.pragma_update(None, "journal_size_limit", WAL_KEPT)
                    .map_err(open_err)?;
                None
            }
        };

        let (tx, rx) = mpsc::channel::<Job>();
        let answers = Answers::start();
        let health = Arc::new(health::Health::default());
        let folding_shared = Arc::new(folder::Shared::default());
        let writer = Writer {
            answers,
            health: health.clone(),
            folding: folding_shared.clone(),
            main: path.clone(),
            history: history_path.clone(),
            checkpointer,
        };
        let thread = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(conn, rx))
            .map_err(|e| StoreError::Commit(format!("cannot start the writer thread: {e}")))?;
        let inner = Arc::new(Inner {
            path,
            history,
            writer: Mutex::new(Some(tx)),
            readers: Mutex::new(Vec::new()),
            read_permits: tokio::sync::Semaphore::new(READERS),
            thread: Mutex::new(Some(thread)),
            folding: folding_shared.clone(),
            folder: Mutex::new(None),
            health,
        });
        let folder = folder::start(folding_shared, Arc::downgrade(&inner), folding, fold_every)
            .map_err(|e| StoreError::Commit(format!("cannot start the folder thread: {e}")))?;
        *inner.folder.lock().unwrap_or_else(PoisonError::into_inner) = Some(folder);
        Ok(Store { inner })
    }

    /// Folds the older of the turn log's two tables into the history now (see `folder`),
    /// and returns the messages moved: for tests that look at either. (Twice folds both.)
    pub async fn fold(&self) -> Result<usize, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.inner.folding.ask(tx);
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Why the store is degraded: the last write failed because the database cannot
    /// write, and no commit succeeded since. `None` when it commits.
    pub fn degraded(&self) -> Option<String> {
        self.inner.health.degraded()
    }

    fn sender(&self) -> Option<mpsc::Sender<Job>> {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Runs `f` in the next group commit; resolves once that commit is on disk. When `f`
    /// fails, its writes are undone and nothing else in the commit is.
    pub async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.write_job(true, f).await
    }

    /// [`Store::write`] without a savepoint around `f`, for a job that fails only when the
    /// database does (no constraint it could break): when it fails, the whole commit is
    /// rolled back (see the module's documentation). Saves two statements and a copy of
    /// each page it touches.
    pub async fn write_unguarded<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.write_job(false, f).await
    }

    /// [`Store::write`], then `on_commit` with `f`'s value once the commit is on disk — in
    /// commit order: the `on_commit`s of two writes run in the order their writes
    /// committed, one after the other, on one task of the runtime that opened the store.
    /// What must follow a commit in its order (turns queued for their sessions in the order
    /// their messages were stored) goes there; it must be quick and must not block.
    /// Resolves with `on_commit`'s value.
    pub async fn write_then<T, U, F, C>(&self, f: F, on_commit: C) -> Result<U, StoreError>
    where
        T: Send + 'static,
        U: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        C: FnOnce(T) -> U + Send + 'static,
    {
        self.submit(true, f, on_commit).await
    }

    /// [`Store::write_then`] without a savepoint around `f` (see [`Store::write_unguarded`]).
    pub async fn write_then_unguarded<T, U, F, C>(
        &self,
        f: F,
        on_commit: C,
    ) -> Result<U, StoreError>
    where
        T: Send + 'static,
        U: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        C: FnOnce(T) -> U + Send + 'static,
    {
        self.submit(false, f, on_commit).await
    }

    async fn write_job<T, F>(&self, guarded: bool, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        self.submit(guarded, f, |v| v).await
    }

    /// Queues a job; its completion (on the answering task, in commit order) runs
    /// `on_commit` when the commit succeeded and sends the result to the caller.
    async fn submit<T, U, F, C>(&self, guarded: bool, f: F, on_commit: C) -> Result<U, StoreError>
    where
        T: Send + 'static,
        U: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        C: FnOnce(T) -> U + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job = Job::new(guarded, f, on_commit, move |r| {
            let _ = tx.send(r);
        });
        self.sender()
            .ok_or(StoreError::WriterGone)?
            .send(job)
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Queues `f` for the next group commit without waiting for it. Jobs run in the order
    /// they were queued, so a later awaited write also proves this one committed.
    pub fn write_detached<F>(&self, what: &'static str, f: F)
    where
        F: FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
    {
        self.detached(true, what, f);
    }

    /// [`Store::write_detached`] without a savepoint around `f` (see
    /// [`Store::write_unguarded`]): for an update by primary key, say.
    pub fn write_detached_unguarded<F>(&self, what: &'static str, f: F)
    where
        F: FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
    {
        self.detached(false, what, f);
    }

    fn detached<F>(&self, guarded: bool, what: &'static str, f: F)
    where
        F: FnOnce(&Connection) -> rusqlite::Result<()> + Send + 'static,
    {
        let job = Job {
            guarded,
            run: Box::new(move |conn| {
                let r = conn.map(f);
                let ran = match &r {
                    Some(Ok(())) => Ran::Ok,
                    Some(Err(e)) => Ran::failed(e),
                    None => Ran::Failed,
                };
                (
                    ran,
                    Box::new(move |committed: Result<(), StoreError>| {
                        let r = r.unwrap_or(Ok(())).map_err(StoreError::from);
                        match r.and(committed) {
                            Ok(()) => {}
                            // Said once per episode by the writer.
                            Err(e) if e.is_unavailable() => {
                                tracing::debug!("store: {what} failed: {e}");
                            }
                            Err(e) => tracing::error!("store: {what} failed: {e}"),
                        }
                    }),
                )
            }),
        };
        match self.sender() {
            Some(s) => {
                if s.send(job).is_err() {
                    tracing::error!("store: {what} dropped: the writer has stopped");
                }
            }
            None => tracing::error!("store: {what} dropped: the store is closed"),
        }
    }

    /// Runs `f` on a read connection, off the async runtime.
    pub async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let _permit = self
            .inner
            .read_permits
            .acquire()
            .await
            .map_err(|_| StoreError::WriterGone)?;
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read_blocking(f))
            .await
            .map_err(|e| StoreError::Commit(format!("read task failed: {e}")))?
    }

    /// `read` for code that already runs off the runtime.
    pub fn read_blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<T>,
    {
        let conn = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.inner.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                configure(&c)?;
                c.execute("ATTACH DATABASE ?1 AS history", [&self.inner.history])?;
                // A read takes a few pages of a session's history: a small cache, not
                // SQLite's 2 MiB per file per connection (resident memory).
                c.pragma_update(Some("history"), "cache_size", ATTACHED_CACHE_KIB)?;
                c
            }
        };
        let r = snapshot(&conn, f);
        let mut pool = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A connection whose read transaction could not be ended is not reused.
        if pool.len() < READERS && conn.is_autocommit() {
            pool.push(conn);
        }
        Ok(r?)
    }

    /// Stops the folder, then the writer after the jobs already queued, and waits for
    /// both.
    pub fn close(&self) {
        self.inner.shut();
    }
}

/// Runs `f` in one read transaction, so that all its statements see the same commit: a
/// session read from the turn log and then from the folded tables must not see a fold
/// commit in between (it would find the same messages in both). `history.db`'s snapshot
/// is taken when a statement first reads it, after `gateway.db`'s (see [`sessions`]).
fn snapshot<T>(
    conn: &Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    let r = f(conn);
    // Read only: ending it either way just releases the snapshot.
    let ended = conn.prepare_cached("ROLLBACK")?.execute([]);
    let v = r?;
    ended?;
    Ok(v)
}

/// `path` as the UTF-8 file name `ATTACH` takes.
fn utf8(path: &Path) -> Result<&str, StoreError> {
    path.to_str().ok_or_else(|| StoreError::Create {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "SQLite attaches only UTF-8 file names",
        ),
    })
}

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

/// `gateway.db` + `suffix`.
fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Creates a new database at `path`, schema included, with two fsyncs (the file, then its
/// folder) instead of the seven that opening it in place costs (the switch to WAL goes
/// through a rollback journal, then the first WAL commit syncs the WAL header, the folder
/// and the commit). It is built beside `path` without syncs and renamed into place once
/// it is on disk, so a crash meanwhile leaves a stray `.new` file, never a damaged
/// database.
fn create(path: &Path, schema: &[&str]) -> Result<(), StoreError> {
    let tmp = sibling(path, ".new");
    let io = |source| StoreError::Create {
        path: tmp.clone(),
        source,
    };
    let open_err = |source| StoreError::Open {
        path: tmp.clone(),
        source,
    };
    for suffix in ["", "-journal", "-wal", "-shm"] {
        match std::fs::remove_file(sibling(&tmp, suffix)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
    }
    let mut conn = Connection::open(&tmp).map_err(open_err)?;
    configure(&conn).map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "off")
        .map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "wal")
        .map_err(open_err)?;
    migrations::apply_list(&mut conn, path, schema)?;
    // Closing the last connection checkpoints the WAL into the file and removes it.
    conn.close().map_err(|(_, e)| open_err(e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
    }
    Ok(())
}

/// The writer's wait for a lock another connection holds (the checkpointer starting the
/// WAL over, another process): polls every 100 µs, for [`BUSY_TIMEOUT`] at most like the
/// other connections. SQLite's own timeout sleeps 1, 2, 5, 10… ms between tries, so a lock
/// held for one millisecond cost the writer (and every commit queued behind it) up to 8.
fn writer_busy(tries: i32) -> bool {
    const STEP: Duration = Duration::from_micros(100);
    thread_local! {
        static SINCE: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    }
    // SQLite counts the tries of each wait from 0.
    let since = SINCE.with(|s| {
        if tries == 0 {
            s.set(Some(Instant::now()));
        }
        s.get()
    });
    if since.is_none_or(|t| t.elapsed() >= BUSY_TIMEOUT) {
        return false;
    }
    std::thread::sleep(STEP);
    true
}

/// The writer thread's parts.
struct Writer {
    answers: Answers,
    health: Arc<health::Health>,
    folding: Arc<folder::Shared>,
    main: PathBuf,
    history: PathBuf,
    checkpointer: Option<checkpoint::Checkpointer>,
}

impl Writer {
    fn run(self, mut conn: Connection, rx: mpsc::Receiver<Job>) {
        let health = &*self.health;
        let mut batch: VecDeque<Job> = VecDeque::with_capacity(MAX_BATCH);
        loop {
            if batch.is_empty() {
                match rx.recv() {
                    Ok(first) => batch.push_back(first),
                    Err(mpsc::RecvError) => break,
                }
            }
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(j) => batch.push_back(j),
                    Err(_) => break,
                }
            }
            let ran = batch.len();
            let mut done = Vec::with_capacity(ran);
            let changes = conn.total_changes();
            let began = Instant::now();
            let result = run_batch(&mut conn, &mut batch, &mut done);
            match &result {
                Ok(_) => crate::metrics::store_commit(began.elapsed()),
                Err(StoreError::Sqlite(e)) => crate::metrics::store_error(health::kind(e)),
                // An unavailable job's failure was counted where it failed.
                Err(_) => {}
            }
            let failed = match result {
                Ok(unavailable) => {
                    // Only what committed went to the turn log.
                    self.folding.committed(ran - batch.len());
                    match unavailable {
                        Some(reason) => health.failed(&reason),
                        // Wrote something: the database can write again.
                        None if conn.total_changes() > changes => health.committed(),
                        None => {}
                    }
                    None
                }
                Err(e) => {
                    let f = Failure::from(e);
                    if f.unavailable {
                        health.failed(&f.message);
                    } else {
                        tracing::error!(
                            "store: commit of {} writes failed: {}",
                            done.len(),
                            f.message
                        );
                    }
                    Some(f)
                }
            };
            self.answers.send(done, failed);
        }
        // The folder has stopped (`Store::close`, or the store was dropped): what is left in
        // the log goes to the history now, so that the next start has nothing to fold.
        let folded = open_history(&self.history, &self.main)
            .map_err(|e| e.to_string())
            .and_then(|mut h| fold_all(&mut conn, &mut h).map_err(|e| e.to_string()));
        if let Err(e) = folded {
            tracing::error!("store: folding the turn log at close failed: {e}");
        }
        // Before the writer's connection closes: the last to close checkpoints what is left.
        // (The WAL hook may still nudge the stopped thread: that ask goes nowhere.)
        if let Some(c) = self.checkpointer {
            c.stop();
        }
    }
}

/// Why a commit failed, for each of its callers.
struct Failure {
    message: String,
    /// [`StoreError::is_unavailable`].
    unavailable: bool,
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        let unavailable = e.is_unavailable();
        let message = match e {
            StoreError::Commit(m) | StoreError::Unavailable(m) => m,
            StoreError::Sqlite(e) if unavailable => e.to_string(),
            e => e.to_string(),
        };
        Failure {
            message,
            unavailable,
        }
    }
}

impl Failure {
    fn error(&self) -> StoreError {
        if self.unavailable {
            StoreError::Unavailable(self.message.clone())
        } else {
            StoreError::Commit(self.message.clone())
        }
    }
}

/// Tells the callers of each commit how it went. From a task on the runtime that opened
/// the store, when there is one: handing it a commit's callers wakes one runtime thread,
/// where answering each from the writer would wake one per caller. From the writer when
/// there is no runtime, or no longer one.
struct Answers(Option<tokio::sync::mpsc::UnboundedSender<(Vec<Completion>, Option<Failure>)>>);

impl Answers {
    fn start() -> Answers {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Answers(None);
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        rt.spawn(async move {
            while let Some((done, failed)) = rx.recv().await {
                answer(done, failed);
            }
        });
        Answers(Some(tx))
    }

    fn send(&self, done: Vec<Completion>, failed: Option<Failure>) {
        match &self.0 {
            Some(tx) => {
                if let Err(tokio::sync::mpsc::error::SendError((done, failed))) =
                    tx.send((done, failed))
                {
                    answer(done, failed);
                }
            }
            None => answer(done, failed),
        }
    }
}

fn answer(done: Vec<Completion>, failed: Option<Failure>) {
    for d in done {
        d(match &failed {
            None => Ok(()),
            Some(f) => Err(f.error()),
        });
    }
}

/// Opens `history.db` for folding into it: read-write, synced in full, with `gateway.db`
/// (`main`) attached as `live`, which it only reads.
fn open_history(history: &Path, main: &Path) -> Result<Connection, StoreError> {
    let open_err = |source| StoreError::Open {
        path: history.to_path_buf(),
        source,
    };
    let mut conn = Connection::open(history).map_err(open_err)?;
    configure(&conn).map_err(open_err)?;
    conn.pragma_update(None, "journal_mode", "wal")
        .map_err(open_err)?;
    conn.pragma_update(None, "synchronous", "full")
        .map_err(open_err)?;
    // Nothing cuts this WAL file when the gateway is quiet: back to this when it restarts.
    conn.pragma_update(None, "journal_size_limit", WAL_KEPT)
        .map_err(open_err)?;
    migrations::apply_list(&mut conn, history, migrations::HISTORY)?;
    conn.execute("ATTACH DATABASE ?1 AS live", [utf8(main)?])
        .map_err(open_err)?;
    // The fold reads the log once, in order, and writes runs of each session's pages: small
    // caches (resident memory).
    conn.pragma_update(Some("live"), "cache_size", ATTACHED_CACHE_KIB)
        .map_err(open_err)?;
    conn.pragma_update(Some("main"), "cache_size", FOLDER_CACHE_KIB)
        .map_err(open_err)?;
    Ok(conn)
}

/// Folds the whole turn log into the history, at open and close (nothing else writes
/// either file then): `main` is the writer's connection, `history` from [`open_history`].
/// First moves the messages of a database from before version 12 out of `gateway.db`.
fn fold_all(main: &mut Connection, history: &mut Connection) -> rusqlite::Result<()> {
    let legacy: bool = main.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'messages')",
        [],
        |r| r.get(0),
    )?;
    if legacy {
        // A new database has the table too (migration 1), empty: only dropped.
        let held: i64 = main.query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
        if held > 0 {
            tracing::info!(
                "database: moving {held} stored messages to {HISTORY_FILE} (once, at the first start of schema 12)"
            );
            let tx = history.transaction()?;
            tx.execute(
                "INSERT OR IGNORE INTO messages (session_id, seq, message, run_id, created_at)
                 SELECT session_id, seq, message, run_id, created_at FROM live.messages",
                [],
            )?;
            tx.commit()?;
        }
        main.execute_batch("DROP TABLE messages")?;
        if held > 0 {
            tracing::info!(
                "database: {held} messages moved; gateway.db keeps their pages free for reuse (`VACUUM` gives them back to the disk)"
            );
        }
    }
    // The older table first (on the writer's thread, the one it does not append to): a
    // reader meanwhile still finds each session's newest messages in the log.
    for table in sessions::fold_order() {
        let (_, deletes) = sessions::fold_into_history(history, table)?;
        let tx = main.transaction_with_behavior(TransactionBehavior::Immediate)?;
        sessions::clear_folded(&tx, table, deletes)?;
        tx.commit()?;
    }
    Ok(())
}

/// Runs the jobs of `batch` in one transaction and commits it, pushing each job's
/// completion to `done`. When an unguarded job fails, rolls the transaction back and
/// leaves the jobs that had not run in `batch`, for the next one. `Ok(Some(reason))`: it
/// committed, but a job failed because the database cannot write.
fn run_batch(
    conn: &mut Connection,
    batch: &mut VecDeque<Job>,
    done: &mut Vec<Completion>,
) -> Result<Option<String>, StoreError> {
    let tx = match conn.transaction_with_behavior(TransactionBehavior::Immediate) {
        Ok(t) => t,
        Err(e) => {
            // Nothing runs: each job is told the transaction's failure.
            done.extend(batch.drain(..).map(|job| (job.run)(None).1));
            return Err(e.into());
        }
    };
    let mut unavailable = None;
    while let Some(job) = batch.pop_front() {
        if !job.guarded {
            let (ran, d) = (job.run)(Some(&tx));
            done.push(d);
            if !matches!(ran, Ran::Ok) {
                // Its partial writes cannot be told from its neighbours': undo them all.
                return Err(match (tx.rollback(), ran) {
                    (Ok(()), Ran::Unavailable(reason)) => StoreError::Unavailable(reason),
                    (Ok(()), _) => StoreError::Commit(
                        "another write of the same commit failed, and the commit was rolled back"
                            .into(),
                    ),
                    (Err(e), _) => StoreError::Sqlite(e),
                });
            }
            continue;
        }
        // Cached statements: `Transaction::savepoint` would parse its SQL for every job.
        match savepoint(&tx) {
            Ok(()) => {
                let (ran, d) = (job.run)(Some(&tx));
                if let Err(e) = end_savepoint(&tx, matches!(ran, Ran::Ok)) {
                    tracing::error!("store: savepoint failed: {e}");
                }
                if let Ran::Unavailable(reason) = ran {
                    unavailable = Some(reason);
                }
                done.push(d);
            }
            Err(e) => {
                tracing::error!("store: cannot open a savepoint: {e}");
                drop(job);
            }
        }
    }
    tx.commit()?;
    Ok(unavailable)
}

fn savepoint(tx: &Connection) -> rusqlite::Result<()> {
    tx.prepare_cached("SAVEPOINT job")?.execute([])?;
    Ok(())
}

/// Releases the savepoint, after rolling back to it unless `keep`.
fn end_savepoint(tx: &Connection, keep: bool) -> rusqlite::Result<()> {
    if !keep {
        tx.prepare_cached("ROLLBACK TO job")?.execute([])?;
    }
    tx.prepare_cached("RELEASE job")?.execute([])?;
    Ok(())
}

/// Milliseconds since the Unix epoch, the timestamps in the database.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests;
