//! Sessions and their message history.
//!
//! A turn's messages are appended to `turn_log`, a table without a secondary index: every
//! turn of a group commit writes to the same few pages at its tail, so a commit writes a
//! handful of pages whatever the number of sessions in it. `turn_log_next` holds, for each
//! session in the log, the next `seq` and the times of its first and last logged messages
//! (one row per session: a few pages). [`fold`] moves
//! the log into `messages` and `sessions` in one statement each; the writer runs it every
//! [`super::FOLD_EVERY`] (and at open and close), so that each session's pages are
//! written once per fold rather than once per turn.
//!
//! Every read here sees the log and the folded tables together, so a fold changes nothing
//! a reader can observe. A read of a session that `turn_log_next` does not list touches
//! the folded tables only; one that it lists scans the log, which folds keep to at most a
//! few thousand rows.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

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

/// Moves every logged message into `messages`, and the sessions' counts and times into
/// `sessions`. Runs inside the caller's transaction. Returns the messages moved.
pub fn fold(conn: &Connection) -> rusqlite::Result<usize> {
    // An empty log changes nothing: no page is touched, and a commit has nothing to sync
    // (clearing the empty table would still dirty its root page).
    let empty: bool = conn
        .prepare_cached("SELECT NOT EXISTS (SELECT 1 FROM turn_log)")?
        .query_row([], |r| r.get(0))?;
    if empty {
        return Ok(0);
    }
    // From the log's index of sessions, which keeps each one's count and times as turns
    // are appended: scanning and sorting the log for them was a third of a fold's time.
    // `WHERE true`: an upsert after a SELECT needs a WHERE for the parser.
    conn.prepare_cached(
        "INSERT INTO sessions (id, created_at, updated_at, messages)
         SELECT session_id, created_at, updated_at, next FROM turn_log_next
         WHERE true
         ON CONFLICT (id) DO UPDATE SET
             updated_at = max(updated_at, excluded.updated_at),
             messages = max(messages, excluded.messages)",
    )?
    .execute([])?;
    // `OR FAIL`: a statement that may stop half-way on a conflict keeps its rows so far, so
    // SQLite copies none of the pages it changes into a statement journal (a plain insert
    // of many rows copies each, to undo itself): 6.0 ms instead of 7.1 for 6,500 messages.
    // A conflict cannot happen (each session's numbers follow its messages), and if it
    // did, the fold's error rolls its whole transaction back.
    let moved = conn
        .prepare_cached(
            "INSERT OR FAIL INTO messages (session_id, seq, message, run_id, created_at)
             SELECT session_id, seq, message, run_id, created_at FROM turn_log ORDER BY id",
        )?
        .execute([])?;
    conn.prepare_cached("DELETE FROM turn_log")?.execute([])?;
    conn.prepare_cached("DELETE FROM turn_log_next")?
        .execute([])?;
    Ok(moved)
}

/// Sessions, most recently updated first. Call after a [`fold`] (the API's list does):
/// sessions whose first turn is still in the log are not listed.
pub fn list(conn: &Connection, limit: u32, offset: u32) -> rusqlite::Result<Vec<SessionRow>> {
    let mut st = conn.prepare_cached(
        "SELECT id, created_at, updated_at, messages FROM sessions
         ORDER BY updated_at DESC, id LIMIT ?1 OFFSET ?2",
    )?;
    st.query_map(params![limit, offset], row)?.collect()
}

/// Sessions stored, logged ones included.
pub fn count(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT count(*) FROM (SELECT id FROM sessions UNION SELECT session_id FROM turn_log_next)",
        [],
        |r| r.get(0),
    )
}

/// The number of messages of a session that has some in the log (`None`: it has none
/// there). A primary-key lookup: readers ask this before they scan the log.
fn logged(conn: &Connection, id: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT next FROM turn_log_next WHERE session_id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()
}

pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<SessionRow>> {
    let folded = conn
        .prepare_cached("SELECT id, created_at, updated_at, messages FROM sessions WHERE id = ?1")?
        .query_row([id], row)
        .optional()?;
    let logged: Option<(i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT next, created_at, updated_at FROM turn_log_next WHERE session_id = ?1",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((messages, created_at, updated_at)) = logged else {
        return Ok(folded);
    };
    Ok(Some(match folded {
        None => SessionRow {
            id: id.to_owned(),
            created_at,
            updated_at,
            messages,
        },
        Some(s) => SessionRow {
            updated_at: s.updated_at.max(updated_at),
            messages: s.messages.max(messages),
            ..s
        },
    }))
}

/// The last `limit` messages of a session, oldest first, as stored JSON objects.
pub fn history(conn: &Connection, id: &str, limit: u32) -> rusqlite::Result<Vec<String>> {
    let logged = logged(conn, id)?.is_some();
    history_of(conn, id, limit, logged)
}

/// The number of messages a session holds (0 when it does not exist) and its last
/// `limit` messages, oldest first: what a turn needs, in as few lookups as it takes.
pub fn recent(conn: &Connection, id: &str, limit: u32) -> rusqlite::Result<(i64, Vec<String>)> {
    let folded: Option<i64> = conn
        .prepare_cached("SELECT messages FROM sessions WHERE id = ?1")?
        .query_row([id], |r| r.get(0))
        .optional()?;
    let logged = logged(conn, id)?;
    let stored = match (folded, logged) {
        (None, None) => return Ok((0, Vec::new())),
        (f, l) => f.unwrap_or(0).max(l.unwrap_or(0)),
    };
    Ok((stored, history_of(conn, id, limit, logged.is_some())?))
}

fn history_of(
    conn: &Connection,
    id: &str,
    limit: u32,
    logged: bool,
) -> rusqlite::Result<Vec<String>> {
    // The logged messages are the newest: take from the log first, then from the folded.
    let mut newest_first: Vec<String> = Vec::new();
    if logged {
        let mut st = conn.prepare_cached(
            "SELECT message FROM turn_log WHERE session_id = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        for m in st.query_map(params![id, limit], |r| r.get(0))? {
            newest_first.push(m?);
        }
    }
    let rest = limit.saturating_sub(newest_first.len() as u32);
    if rest > 0 {
        let mut st = conn.prepare_cached(
            "SELECT message FROM messages WHERE session_id = ?1 ORDER BY seq DESC LIMIT ?2",
        )?;
        for m in st.query_map(params![id, rest], |r| r.get(0))? {
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
    let first: i64 = conn
        .prepare_cached(
            "SELECT coalesce(
                 (SELECT next FROM turn_log_next WHERE session_id = ?1),
                 (SELECT messages FROM sessions WHERE id = ?1),
                 0)",
        )?
        .query_row([id], |r| r.get(0))?;
    let mut ins = conn.prepare_cached(
        "INSERT INTO turn_log (session_id, seq, message, run_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (i, m) in messages.iter().enumerate() {
        ins.execute(params![id, first + i as i64, m, run_id, now])?;
    }
    // The session's count and the times of its first and last logged messages, for reads
    // and the fold.
    conn.prepare_cached(
        "INSERT INTO turn_log_next (session_id, next, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (session_id) DO UPDATE SET
             next = excluded.next,
             created_at = min(created_at, excluded.created_at),
             updated_at = max(updated_at, excluded.updated_at)",
    )?
    .execute(params![id, first + messages.len() as i64, now])?;
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
    // The log holds the newest messages, the folded table the others: a range of seq
    // may span both, and a message is in exactly one of them at any snapshot.
    let mut st = conn.prepare_cached(
        "SELECT seq, message FROM turn_log WHERE session_id = ?1 AND seq >= ?2 AND seq < ?3
         UNION ALL
         SELECT seq, message FROM messages WHERE session_id = ?1 AND seq >= ?2 AND seq < ?3
         ORDER BY 1",
    )?;
    st.query_map(params![id, start, end], |r| r.get(1))?
        .collect()
}

/// Deletes a session and its messages; whether it existed.
pub fn delete(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    conn.prepare_cached("DELETE FROM session_keys WHERE session_id = ?1")?
        .execute([id])?;
    let logged = conn
        .prepare_cached("DELETE FROM turn_log WHERE session_id = ?1")?
        .execute([id])?;
    conn.prepare_cached("DELETE FROM turn_log_next WHERE session_id = ?1")?
        .execute([id])?;
    // The foreign key's cascade would do it; said here too, so that a delete never
    // depends on the connection's `foreign_keys` setting (the writer turns it off to fold).
    conn.prepare_cached("DELETE FROM messages WHERE session_id = ?1")?
        .execute([id])?;
    let folded = conn
        .prepare_cached("DELETE FROM sessions WHERE id = ?1")?
        .execute([id])?;
    Ok(logged + folded > 0)
}
