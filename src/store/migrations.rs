//! Versioned schema migrations. `PRAGMA user_version` holds the version applied; each
//! migration runs in its own transaction. Append new migrations, never edit old ones.

use std::path::Path;

use rusqlite::Connection;

use super::StoreError;

/// Migration `i` brings the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 1: sessions, their messages, runs and run events.
    r#"
    CREATE TABLE sessions (
        id          TEXT PRIMARY KEY,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        messages    INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX sessions_updated ON sessions (updated_at);
    CREATE TABLE messages (
        session_id  TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
        seq         INTEGER NOT NULL,
        message     TEXT NOT NULL,
        run_id      TEXT,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    CREATE TABLE runs (
        id               TEXT PRIMARY KEY,
        session_id       TEXT,
        status           TEXT NOT NULL,
        model            TEXT NOT NULL,
        input            TEXT NOT NULL,
        output           TEXT,
        error            TEXT,
        idempotency_key  TEXT UNIQUE,
        request          TEXT,
        attempt          INTEGER NOT NULL DEFAULT 0,
        created_at       INTEGER NOT NULL,
        started_at       INTEGER,
        finished_at      INTEGER
    );
    CREATE INDEX runs_unfinished ON runs (status) WHERE status IN ('queued', 'running');
    CREATE INDEX runs_session ON runs (session_id);
    CREATE TABLE run_events (
        run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        seq         INTEGER NOT NULL,
        type        TEXT NOT NULL,
        data        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID;
    "#,
    // 2: webhook deliveries: acceptance (deduplicated by the sender's id) and the ledger of
    // each result's delivery to its target.
    r#"
    CREATE TABLE deliveries (
        id               TEXT PRIMARY KEY,
        route            TEXT NOT NULL,
        source_id        TEXT NOT NULL,
        event            TEXT NOT NULL,
        state            TEXT NOT NULL,
        prompt           TEXT NOT NULL,
        session_id       TEXT,
        run_id           TEXT NOT NULL,
        target           TEXT NOT NULL,
        result           TEXT,
        attempts         INTEGER NOT NULL DEFAULT 0,
        last_error       TEXT,
        next_attempt_at  INTEGER,
        received_at      INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL
    );
    CREATE INDEX deliveries_source ON deliveries (route, source_id, received_at);
    CREATE INDEX deliveries_open ON deliveries (state) WHERE state NOT IN ('delivered', 'failed');
    "#,
    // 3: the turn log. A turn's messages are appended here (the tail of one small table,
    // a page shared by every turn of a commit) and folded into `messages` and `sessions`
    // in batches, instead of each turn rewriting its session's pages in every commit.
    r#"
    CREATE TABLE turn_log (
        id          INTEGER PRIMARY KEY,
        session_id  TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        message     TEXT NOT NULL,
        run_id      TEXT,
        created_at  INTEGER NOT NULL
    );
    CREATE INDEX turn_log_session ON turn_log (session_id, seq);
    "#,
    // 4: the turn log without its index. Turns of one commit belong to many sessions, so
    // the index had them touch as many of its pages, each written whole to the WAL: most
    // of a commit's pages. `turn_log_next` holds one row per session in the log (a few
    // hundred at most, two or three pages): the next `seq` to append, and where a reader
    // learns whether the log holds anything of a session before scanning it.
    r#"
    DROP INDEX turn_log_session;
    CREATE TABLE turn_log_next (
        session_id  TEXT PRIMARY KEY,
        next        INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO turn_log_next (session_id, next)
        SELECT session_id, max(seq) + 1 FROM turn_log GROUP BY session_id;
    "#,
    // 5: finished deliveries by age, for the pruning of those older than the retention.
    r#"
    CREATE INDEX deliveries_finished ON deliveries (updated_at)
        WHERE state IN ('delivered', 'failed');
    "#,
    // 6: chat platforms. A chat reply is a delivery that remembers how many parts of a long
    // reply the platform confirmed (`progress`); a polling platform's next offset; a chat's
    // session after `/new`; users who asked to pair, or were approved; and the restart
    // notices owed to the chats that asked for a restart.
    r#"
    ALTER TABLE deliveries ADD COLUMN progress INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE platform_offsets (
        platform     TEXT NOT NULL,
        name         TEXT NOT NULL,
        next_offset  INTEGER NOT NULL,
        updated_at   INTEGER NOT NULL,
        PRIMARY KEY (platform, name)
    ) WITHOUT ROWID;
    CREATE TABLE platform_chats (
        chat_key    TEXT PRIMARY KEY,
        session_id  TEXT NOT NULL,
        updated_at  INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE platform_users (
        platform    TEXT NOT NULL,
        name        TEXT NOT NULL,
        user_id     TEXT NOT NULL,
        state       TEXT NOT NULL,
        code        TEXT,
        display     TEXT NOT NULL,
        chat        TEXT NOT NULL,
        created_at  INTEGER NOT NULL,
        updated_at  INTEGER NOT NULL,
        PRIMARY KEY (platform, name, user_id)
    ) WITHOUT ROWID;
    CREATE UNIQUE INDEX platform_users_code ON platform_users (code) WHERE code IS NOT NULL;
    CREATE TABLE platform_restarts (
        id            TEXT PRIMARY KEY,
        target        TEXT NOT NULL,
        requested_at  INTEGER NOT NULL
    ) WITHOUT ROWID;
    "#,
    // 7: schedules: since when each is known (a slot before that never ran) and its last
    // slot recorded (its run and delivery are in the ledger, route `schedule:NAME`).
    r#"
    CREATE TABLE schedules (
        name          TEXT PRIMARY KEY,
        created_at    INTEGER NOT NULL,
        last_slot_at  INTEGER
    ) WITHOUT ROWID;
    "#,
    // 8: what a drop-in for the upstream hermes API server keeps: each session's
    // `X-Hermes-Session-Key`, and stored responses (`/v1/responses`). A response's turn is
    // stored in its session like any other; the row says which session, and how many of
    // its messages were there once it was answered (`session_end`), so that a response
    // can be continued from. Rows are inserted in `created_at` order, so the rowid order
    // is the age order the pruning walks: no index of their own besides the id's.
    r#"
    CREATE TABLE session_keys (
        session_id  TEXT PRIMARY KEY,
        key         TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE responses (
        id                    TEXT PRIMARY KEY,
        session_id            TEXT NOT NULL,
        session_end           INTEGER NOT NULL,
        previous_response_id  TEXT,
        conversation          TEXT,
        model                 TEXT NOT NULL,
        instructions          TEXT,
        input                 TEXT NOT NULL,
        output                TEXT NOT NULL,
        usage                 TEXT,
        metadata              TEXT,
        created_at            INTEGER NOT NULL
    );
    "#,
    // 9: the pruning of finished `/v1/runs` runs past `[api] run_retention`: finished runs
    // by age, and which runs belong to a delivery (those go with their delivery).
    r#"
    CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
    CREATE INDEX deliveries_run ON deliveries (run_id);
    "#,
    // 10: no query ever looked runs up by session, and every run's insert wrote a page of
    // this index at its session's place: one more page per chat in every commit.
    r#"
    DROP INDEX IF EXISTS runs_session;
    "#,
    // 11: each logged session's first and last times beside its count, kept as turns are
    // appended: the fold upserts the sessions from these few rows instead of scanning and
    // sorting the log (a third of its time), and a read of a session does not scan it.
    r#"
    ALTER TABLE turn_log_next ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE turn_log_next ADD COLUMN updated_at INTEGER NOT NULL DEFAULT 0;
    UPDATE turn_log_next SET
        created_at = coalesce(
            (SELECT min(l.created_at) FROM turn_log l WHERE l.session_id = turn_log_next.session_id), 0),
        updated_at = coalesce(
            (SELECT max(l.created_at) FROM turn_log l WHERE l.session_id = turn_log_next.session_id), 0);
    "#,
    // 12: the history leaves for a file of its own (`history.db`, see `sessions`), folded
    // into by a thread that never takes this file's write lock. The turn log becomes two
    // tables, one appended to while the other is folded, each with its index of sessions
    // (which now also keeps each session's first logged `seq`: a reader reads the history
    // below it); and deleted sessions wait in `history_deletes` for the history's part.
    // `messages` is moved at the first open and dropped then (it takes both files).
    r#"
    ALTER TABLE turn_log RENAME TO turn_log_0;
    ALTER TABLE turn_log_next RENAME TO turn_log_next_0;
    ALTER TABLE turn_log_next_0 ADD COLUMN first INTEGER NOT NULL DEFAULT 0;
    UPDATE turn_log_next_0 SET first = coalesce(
        (SELECT min(l.seq) FROM turn_log_0 l WHERE l.session_id = turn_log_next_0.session_id), 0);
    CREATE TABLE turn_log_1 (
        id          INTEGER PRIMARY KEY,
        session_id  TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        message     TEXT NOT NULL,
        run_id      TEXT,
        created_at  INTEGER NOT NULL
    );
    CREATE TABLE turn_log_next_1 (
        session_id  TEXT PRIMARY KEY,
        next        INTEGER NOT NULL,
        created_at  INTEGER NOT NULL DEFAULT 0,
        updated_at  INTEGER NOT NULL DEFAULT 0,
        first       INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE history_deletes (
        id          INTEGER PRIMARY KEY,
        session_id  TEXT NOT NULL
    );
    "#,
];

/// The migrations of `history.db`, the folded messages (see `sessions`), which keeps its
/// own `user_version`.
pub const HISTORY: &[&str] = &[
    // 1: the messages, as `gateway.db` kept them until its version 12 (without the foreign
    // key to `sessions`, which a file cannot have on another's table).
    r#"
    CREATE TABLE messages (
        session_id  TEXT NOT NULL,
        seq         INTEGER NOT NULL,
        message     TEXT NOT NULL,
        run_id      TEXT,
        created_at  INTEGER NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    "#,
];

/// The migrations of `gateway.db`.
pub const MAIN: &[&str] = MIGRATIONS;

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema to [`SCHEMA_VERSION`]. A new database (version 0) logs one line, that
/// it was created at that version; an older one logs each migration applied.
pub fn apply(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    apply_list(conn, path, MIGRATIONS)
}

/// Brings a database's schema to the end of `migrations` (see [`apply`]).
pub fn apply_list(
    conn: &mut Connection,
    path: &Path,
    migrations: &[&str],
) -> Result<(), StoreError> {
    let latest = migrations.len() as i64;
    let found: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    if found > latest {
        return Err(StoreError::SchemaTooNew {
            path: path.to_path_buf(),
            found,
            known: latest,
        });
    }
    let new = found <= 0;
    for (i, sql) in migrations.iter().enumerate().skip(found.max(0) as usize) {
        let version = i as i64 + 1;
        let err = |source| StoreError::Migrate {
            path: path.to_path_buf(),
            version,
            source,
        };
        let tx = conn.transaction().map_err(err)?;
        tx.execute_batch(sql).map_err(err)?;
        tx.pragma_update(None, "user_version", version)
            .map_err(err)?;
        tx.commit().map_err(err)?;
        if !new {
            tracing::info!(
                "database {}: migrated to schema version {version}",
                path.display()
            );
        }
    }
    if new {
        tracing::info!(
            "database {}: created at schema version {latest}",
            path.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex, PoisonError};

    use super::*;

    /// Runs `f` with a subscriber that writes info lines (no time, no colour) to a buffer.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let sink = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .without_time()
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let text = buf.0.lock().unwrap_or_else(PoisonError::into_inner).clone();
        String::from_utf8(text).unwrap()
    }

    fn version(conn: &Connection) -> i64 {
        conn.pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn a_new_database_logs_one_line_with_its_version() {
        let path = Path::new("/state/gateway.db");
        let mut conn = Connection::open_in_memory().unwrap();
        let log = logged(|| apply(&mut conn, path).unwrap());
        assert_eq!(version(&conn), SCHEMA_VERSION);
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 1, "{log}");
        assert!(
            lines[0].ends_with(&format!(
                "database /state/gateway.db: created at schema version {SCHEMA_VERSION}"
            )),
            "{log}"
        );
        // Opened again: nothing to do, nothing logged.
        assert_eq!(logged(|| apply(&mut conn, path).unwrap()), "");
    }

    #[test]
    fn an_older_database_logs_each_migration() {
        let path = Path::new("/state/gateway.db");
        let mut conn = Connection::open_in_memory().unwrap();
        // A database an older release left at version 3.
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        let log = logged(|| apply(&mut conn, path).unwrap());
        assert_eq!(version(&conn), SCHEMA_VERSION);
        let migrated: Vec<&str> = log
            .lines()
            .filter_map(|l| l.split_once("database /state/gateway.db: ").map(|(_, m)| m))
            .collect();
        let expected: Vec<String> = (4..=SCHEMA_VERSION)
            .map(|v| format!("migrated to schema version {v}"))
            .collect();
        assert_eq!(migrated, expected, "{log}");
        assert_eq!(log.lines().count(), expected.len(), "{log}");
    }
}
