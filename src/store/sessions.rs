//! Sessions and their message history.
//!
//! Three places hold a session's messages, and every read here sees them together, so
//! that moving messages from one to the next changes nothing a reader can observe:
//!
//! - **The turn log**, two tables in `gateway.db` (`turn_log_0`, `turn_log_1`) without a
//!   secondary index. A turn's messages are appended to the *active* one (the writer
//!   thread's choice, [`flip`]): every turn of a group commit writes to the same few pages
//!   at its tail, so a commit writes a handful of pages whatever the number of sessions
//!   in it. Beside each, `turn_log_next_N` holds one row per session logged there: the
//!   next `seq`, the `seq` of its first message there, and the times of its first and last.
//! - **`history.messages`**, in a file of its own (`history.db`), where the folder thread
//!   moves the inactive log ([`fold_into_history`]) in a transaction that takes nothing
//!   from the writer: `gateway.db` is only read. A fold never stalls the commits that
//!   acknowledge messages.
//! - **`sessions`**, in `gateway.db`: each folded session's count and times, updated by
//!   the writer when it empties the folded log ([`clear_folded`], a short job).
//!
//! The two files do not commit together, so each step is safe to repeat: the fold
//! inserts `OR IGNORE` (a message is keyed by session and `seq`) and the log is emptied
//! only after the history's commit is on disk. Between the two, a message is in both; a
//! reader takes it from the log, and reads from `history.messages` only the `seq`s below
//! the session's first logged one. A reader reads `gateway.db` before `history.db`, so
//! its snapshot of the history is never older than the one of the log: a message it no
//! longer finds in the log is in the history it sees.
//!
//! A deleted session leaves a row in `history_deletes`, in the same commit as the rest of
//! its deletion; the next fold deletes its messages from the history before it inserts
//! any (those of a new session under the same id come after), and the writer drops the
//! row when it empties the log. Until then a reader ignores the history of a session that
//! neither `sessions` nor the log knows.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::cell::Cell;
use std::sync::OnceLock;

/// One stored session, without its messages.
#[derive(Debug, Clone, Serialize)]
pub struct SessionRow {
    pub id: String,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
    pub updated_at: i64,
    pub messages: i64,
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        id: r.get(0)?,
        created_at: r.get(1)?,
        updated_at: r.get(2)?,
        messages: r.get(3)?,
    })
}

thread_local! {
    /// The log table appends go to, on this thread (the writer's choice; 0 elsewhere).
    static ACTIVE: Cell<usize> = const { Cell::new(0) };
}

/// The log table to fold next, which no append reaches from the next job on: the
/// inactive one while it holds anything (a fold that was cut short, to be done again);
/// else the active one, the other becoming active on this thread (the writer's). So a
/// table is folded only once the one before it is emptied, and the log always holds a
/// session's newest messages: readers rely on it.
pub(super) fn flip(conn: &Connection) -> rusqlite::Result<usize> {
    let active = ACTIVE.with(Cell::get);
    let other = 1 - active;
    if !log_empty(conn, other)? {
        return Ok(other);
    }
    ACTIVE.with(|a| a.set(other));
    Ok(active)
}

/// The log tables, the older first: the inactive one, then the one appends go to (on the
/// writer's thread; elsewhere, the order of their numbers).
pub(super) fn fold_order() -> [usize; 2] {
    let active = ACTIVE.with(Cell::get);
    [1 - active, active]
}

/// Whether a log table and its index of sessions are both empty.
fn log_empty(conn: &Connection, table: usize) -> rusqlite::Result<bool> {
    static EMPTY: PerLog = PerLog::new(
        "SELECT NOT EXISTS (SELECT 1 FROM turn_log_{N})
             AND NOT EXISTS (SELECT 1 FROM turn_log_next_{N})",
    );
    conn.prepare_cached(EMPTY.of(table))?
        .query_row([], |r| r.get(0))
}

/// A statement written once for both log tables: `{N}` stands for the table's number,
/// `{M}` for the other's. Each table's text is made at its first use.
struct PerLog {
    template: &'static str,
    sql: OnceLock<[String; 2]>,
}

impl PerLog {
    const fn new(template: &'static str) -> PerLog {
        PerLog {
            template,
            sql: OnceLock::new(),
        }
    }

    /// The statement for the log table `table` (0 or 1).
    fn of(&self, table: usize) -> &str {
        &self.sql.get_or_init(|| {
            [0, 1].map(|n: usize| {
                self.template
                    .replace("{N}", &n.to_string())
                    .replace("{M}", &(1 - n).to_string())
            })
        })[table]
    }
}

/// What `turn_log_next_0` and `_1` know of a session: its count (the next `seq`), the
/// `seq` of its first logged message, and the times of its first and last.
#[derive(Debug, Clone, Copy)]
struct Logged {
    next: i64,
    first: i64,
    created_at: i64,
    updated_at: i64,
}

fn logged(conn: &Connection, id: &str) -> rusqlite::Result<Option<Logged>> {
    conn.prepare_cached(
        "SELECT max(next), min(first), min(created_at), max(updated_at), count(*) FROM (
             SELECT next, first, created_at, updated_at FROM turn_log_next_0 WHERE session_id = ?1
             UNION ALL
             SELECT next, first, created_at, updated_at FROM turn_log_next_1 WHERE session_id = ?1)",
    )?
    .query_row([id], |r| {
        if r.get::<_, i64>(4)? == 0 {
            return Ok(None);
        }
        let n = |i| r.get::<_, Option<i64>>(i).map(|v| v.unwrap_or(0));
        Ok(Some(Logged {
            next: n(0)?,
            first: n(1)?,
            created_at: n(2)?,
            updated_at: n(3)?,
        }))
    })
}

/// The `seq` below which a session's messages are read from the history: the first one
/// logged, or all of them for a session known only folded, or none for one that neither
/// `sessions` nor the log knows (deleted, its history not yet).
fn history_bound(logged: Option<&Logged>, folded: bool) -> i64 {
    match logged {
        Some(l) => l.first,
        None if folded => i64::MAX,
        None => 0,
    }
}

/// Moves the log table `table` (one the writer no longer appends to, see [`flip`]) into
/// `messages`, after deleting the history of the sessions deleted since the last fold.
/// `conn` is the history database with `gateway.db` attached as `live`; it commits
/// (synced) here. Returns the messages moved (fewer when a repeat found them there) and
/// the last `history_deletes` row applied, for [`clear_folded`].
pub(super) fn fold_into_history(
    conn: &mut Connection,
    table: usize,
) -> rusqlite::Result<(usize, Option<i64>)> {
    static MOVE: PerLog = PerLog::new(
        "INSERT OR IGNORE INTO messages (session_id, seq, message, run_id, created_at)
         SELECT session_id, seq, message, run_id, created_at FROM live.turn_log_{N} ORDER BY id",
    );
    // Deferred: the first statement takes the history's write lock and a snapshot of
    // `gateway.db`, which every statement after it sees; `gateway.db` is never locked
    // for writing. Deletions first: a session deleted and begun again under the same id
    // has its new messages logged after its deletion.
    let tx = conn.transaction()?;
    tx.prepare_cached(
        "DELETE FROM messages WHERE session_id IN (SELECT session_id FROM live.history_deletes)",
    )?
    .execute([])?;
    let deletes: Option<i64> = tx
        .prepare_cached("SELECT max(id) FROM live.history_deletes")?
        .query_row([], |r| r.get(0))?;
    let moved = tx.prepare_cached(MOVE.of(table))?.execute([])?;
    tx.commit()?;
    Ok((moved, deletes))
}

/// Whether the log or the deletions hold anything to fold (`conn` as for
/// [`fold_into_history`]).
pub(super) fn anything_to_fold(conn: &Connection) -> rusqlite::Result<bool> {
    conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM live.turn_log_0) OR EXISTS (SELECT 1 FROM live.turn_log_1)
             OR EXISTS (SELECT 1 FROM live.history_deletes)",
    )?
    .query_row([], |r| r.get(0))
}

/// The writer's part of a fold, once [`fold_into_history`] committed the log table
/// `table`: the folded sessions' counts and times into `sessions`, then the table, its
/// index of sessions and the deletions applied (up to `deletes`) emptied.
pub(super) fn clear_folded(
    conn: &Connection,
    table: usize,
    deletes: Option<i64>,
) -> rusqlite::Result<()> {
    // `WHERE true`: an upsert after a SELECT needs a WHERE for the parser.
    static SESSIONS: PerLog = PerLog::new(
        "INSERT INTO sessions (id, created_at, updated_at, messages)
         SELECT session_id, created_at, updated_at, next FROM turn_log_next_{N} WHERE true
         ON CONFLICT (id) DO UPDATE SET
             updated_at = max(updated_at, excluded.updated_at),
             messages = max(messages, excluded.messages)",
    );
    static CLEAR: PerLog = PerLog::new("DELETE FROM turn_log_{N}");
    static CLEAR_NEXT: PerLog = PerLog::new("DELETE FROM turn_log_next_{N}");
    // An empty table changes nothing: clearing it would still dirty its root page.
    if !log_empty(conn, table)? {
        conn.prepare_cached(SESSIONS.of(table))?.execute([])?;
        conn.prepare_cached(CLEAR.of(table))?.execute([])?;
        conn.prepare_cached(CLEAR_NEXT.of(table))?.execute([])?;
    }
    if let Some(last) = deletes {
        conn.prepare_cached("DELETE FROM history_deletes WHERE id <= ?1")?
            .execute([last])?;
    }
    Ok(())
}

/// Sessions, most recently updated first, logged ones included.
pub fn list(conn: &Connection, limit: u32, offset: u32) -> rusqlite::Result<Vec<SessionRow>> {
    // A session of the page is either logged, or among the first `offset + limit` of
    // `sessions` by its own `updated_at` (a logged session's is older than its true one,
    // which only moves it up), ties at the last of those included: those few rows, not
    // the whole table, are merged. A logged session's creation is its folded row's when it
    // has one, wherever that row ranks.
    let mut st = conn.prepare_cached(
        "SELECT id, min(created_at), max(updated_at), max(messages) FROM (
             SELECT id, created_at, updated_at, messages FROM sessions
             WHERE updated_at >= coalesce(
                 (SELECT updated_at FROM sessions ORDER BY updated_at DESC LIMIT 1 OFFSET ?3),
                 -9223372036854775808)
             UNION ALL
             SELECT n.session_id, coalesce(s.created_at, n.created_at), n.updated_at, n.next
             FROM turn_log_next_0 n LEFT JOIN sessions s ON s.id = n.session_id
             UNION ALL
             SELECT n.session_id, coalesce(s.created_at, n.created_at), n.updated_at, n.next
             FROM turn_log_next_1 n LEFT JOIN sessions s ON s.id = n.session_id)
         GROUP BY id ORDER BY 3 DESC, id LIMIT ?1 OFFSET ?2",
    )?;
    let last = (i64::from(limit) + i64::from(offset) - 1).max(0);
    st.query_map(params![limit, offset, last], row)?.collect()
}

/// Sessions stored, logged ones included.
pub fn count(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT count(*) FROM (SELECT id FROM sessions
             UNION SELECT session_id FROM turn_log_next_0
             UNION SELECT session_id FROM turn_log_next_1)",
        [],
        |r| r.get(0),
    )
}

fn folded(conn: &Connection, id: &str) -> rusqlite::Result<Option<SessionRow>> {
    conn.prepare_cached("SELECT id, created_at, updated_at, messages FROM sessions WHERE id = ?1")?
        .query_row([id], row)
        .optional()
}

pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<SessionRow>> {
    let folded = folded(conn, id)?;
    let Some(l) = logged(conn, id)? else {
        return Ok(folded);
    };
    Ok(Some(match folded {
        None => SessionRow {
            id: id.to_owned(),
            created_at: l.created_at,
            updated_at: l.updated_at,
            messages: l.next,
        },
        Some(s) => SessionRow {
            updated_at: s.updated_at.max(l.updated_at),
            messages: s.messages.max(l.next),
            ..s
        },
    }))
}

/// The last `limit` messages of a session, oldest first, as stored JSON objects.
pub fn history(conn: &Connection, id: &str, limit: u32) -> rusqlite::Result<Vec<String>> {
    let logged = logged(conn, id)?;
    let folded = logged.is_some() || folded(conn, id)?.is_some();
    history_of(conn, id, limit, logged.as_ref(), folded)
}

/// The number of messages a session holds (0 when it does not exist) and its last
/// `limit` messages, oldest first: what a turn needs, in as few lookups as it takes.
pub fn recent(conn: &Connection, id: &str, limit: u32) -> rusqlite::Result<(i64, Vec<String>)> {
    let folded: Option<i64> = conn
        .prepare_cached("SELECT messages FROM sessions WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let logged = logged(conn, id)?;
    let stored = match (folded, &logged) {
        (None, None) => return Ok((0, Vec::new())),
        (f, l) => f.unwrap_or(0).max(l.map_or(0, |l| l.next)),
    };
    Ok((
        stored,
        history_of(conn, id, limit, logged.as_ref(), folded.is_some())?,
    ))
}

fn history_of(
    conn: &Connection,
    id: &str,
    limit: u32,
    logged: Option<&Logged>,
    folded: bool,
) -> rusqlite::Result<Vec<String>> {
    // The logged messages are the newest: take from the log first, then from the history,
    // below the first logged `seq`.
    let mut newest_first: Vec<String> = Vec::new();
    if logged.is_some() {
        let mut st = conn.prepare_cached(
            "SELECT message FROM (
                 SELECT seq, message FROM turn_log_0 WHERE session_id = ?1
                 UNION ALL
                 SELECT seq, message FROM turn_log_1 WHERE session_id = ?1)
             ORDER BY seq DESC LIMIT ?2",
        )?;
        for m in st.query_map(params![id, limit], |r| r.get(0))? {
            newest_first.push(m?);
        }
    }
    let rest = limit.saturating_sub(newest_first.len() as u32);
    let below = history_bound(logged, folded);
    if rest > 0 && below > 0 {
        let mut st = conn.prepare_cached(
            "SELECT message FROM history.messages WHERE session_id = ?1 AND seq < ?3
             ORDER BY seq DESC LIMIT ?2",
        )?;
        for m in st.query_map(params![id, rest, below], |r| r.get(0))? {
            newest_first.push(m?);
        }
    }
    newest_first.reverse();
    Ok(newest_first)
}

/// Appends messages (JSON objects) to a session, creating it if needed.
pub fn append(
    conn: &Connection,
    id: &str,
    messages: &[String],
    run_id: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    append_at(conn, id, messages, run_id, now).map(|_| ())
}

/// [`append`], returning the number of messages the session held before (the `seq` of
/// the first one appended).
pub fn append_at(
    conn: &Connection,
    id: &str,
    messages: &[String],
    run_id: Option<&str>,
    now: i64,
) -> rusqlite::Result<i64> {
    // The active table's index first: a session logged there has its count there.
    static FIRST: PerLog = PerLog::new(
        "SELECT coalesce(
             (SELECT next FROM turn_log_next_{N} WHERE session_id = ?1),
             (SELECT next FROM turn_log_next_{M} WHERE session_id = ?1),
             (SELECT messages FROM sessions WHERE id = ?1),
             0)",
    );
    static INSERT: PerLog = PerLog::new(
        "INSERT INTO turn_log_{N} (session_id, seq, message, run_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    );
    // The session's count, its first `seq` in this table, and the times of its first and
    // last messages there, for reads and the fold.
    static NEXT: PerLog = PerLog::new(
        "INSERT INTO turn_log_next_{N} (session_id, next, first, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?4)
         ON CONFLICT (session_id) DO UPDATE SET
             next = excluded.next,
             created_at = min(created_at, excluded.created_at),
             updated_at = max(updated_at, excluded.updated_at)",
    );
    let active = ACTIVE.with(Cell::get);
    let first: i64 = conn
        .prepare_cached(FIRST.of(active))?
        .query_row([id], |r| r.get(0))?;
    if messages.is_empty() {
        // Nothing logged, nothing indexed: an index row without a message would outlive
        // its table's fold.
        return Ok(first);
    }
    let mut ins = conn.prepare_cached(INSERT.of(active))?;
    for (i, m) in messages.iter().enumerate() {
        ins.execute(params![id, first + i as i64, m, run_id, now])?;
    }
    conn.prepare_cached(NEXT.of(active))?.execute(params![
        id,
        first + messages.len() as i64,
        first,
        now
    ])?;
    Ok(first)
}

/// The `X-Hermes-Session-Key` kept with a session, if any.
pub fn key(conn: &Connection, id: &str) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached("SELECT key FROM session_keys WHERE session_id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()
}

/// Keeps `key` as the session's `X-Hermes-Session-Key`.
pub fn set_key(conn: &Connection, id: &str, key: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO session_keys (session_id, key) VALUES (?1, ?2)
         ON CONFLICT (session_id) DO UPDATE SET key = excluded.key",
    )?
    .execute(params![id, key])?;
    Ok(())
}

/// The first `end` messages of a session, of which the last `limit`, oldest first: the
/// conversation as it was when it held `end` messages.
pub fn history_until(
    conn: &Connection,
    id: &str,
    end: i64,
    limit: u32,
) -> rusqlite::Result<Vec<String>> {
    let start = (end - i64::from(limit)).max(0);
    let logged = logged(conn, id)?;
    let folded = logged.is_some() || folded(conn, id)?.is_some();
    let below = history_bound(logged.as_ref(), folded).min(end);
    // The log holds the newest messages, the history the others: a range of seq may span
    // both, and a message in both is taken from the log.
    let mut st = conn.prepare_cached(
        "SELECT seq, message FROM turn_log_0 WHERE session_id = ?1 AND seq >= ?2 AND seq < ?3
         UNION ALL
         SELECT seq, message FROM turn_log_1 WHERE session_id = ?1 AND seq >= ?2 AND seq < ?3
         UNION ALL
         SELECT seq, message FROM history.messages WHERE session_id = ?1 AND seq >= ?2 AND seq < ?4
         ORDER BY 1",
    )?;
    st.query_map(params![id, start, end, below], |r| r.get(1))?
        .collect()
}

/// Deletes a session and its messages; whether it existed. Its history goes with the
/// next fold (see the module's documentation).
pub fn delete(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("DELETE FROM session_keys WHERE session_id = ?1")?
        .execute([id])?;
    let mut existed = 0;
    for sql in [
        "DELETE FROM turn_log_0 WHERE session_id = ?1",
        "DELETE FROM turn_log_1 WHERE session_id = ?1",
        "DELETE FROM turn_log_next_0 WHERE session_id = ?1",
        "DELETE FROM turn_log_next_1 WHERE session_id = ?1",
        "DELETE FROM sessions WHERE id = ?1",
    ] {
        existed += conn.prepare_cached(sql)?.execute([id])?;
    }
    if existed > 0 {
        conn.prepare_cached("INSERT INTO history_deletes (session_id) VALUES (?1)")?
            .execute([id])?;
    }
    Ok(existed > 0)
}
