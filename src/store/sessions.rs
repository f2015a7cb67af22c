//! Sessions and their message history.

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

/// Sessions, most recently updated first.
pub fn list(conn: &Connection, limit: u32, offset: u32) -> rusqlite::Result<Vec<SessionRow>> {
    let mut st = conn.prepare_cached(
        "SELECT id, created_at, updated_at, messages FROM sessions
         ORDER BY updated_at DESC, id LIMIT ?1 OFFSET ?2",
    )?;
    st.query_map(params![limit, offset], row)?.collect()
}

pub fn count(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT count(*) FROM sessions", [], |r| r.get(0))
}

pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<SessionRow>> {
    conn.prepare_cached("SELECT id, created_at, updated_at, messages FROM sessions WHERE id = ?1")?
        .query_row([id], row)
        .optional()
}

/// The last `limit` messages of a session, oldest first, as stored JSON objects.
pub fn history(conn: &Connection, id: &str, limit: u32) -> rusqlite::Result<Vec<String>> {
    let mut st = conn.prepare_cached(
        "SELECT message FROM (SELECT seq, message FROM messages WHERE session_id = ?1
         ORDER BY seq DESC LIMIT ?2) ORDER BY seq",
    )?;
    st.query_map(params![id, limit], |r| r.get(0))?.collect()
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
    let n = messages.len() as i64;
    let total: i64 = conn
        .prepare_cached(
            "INSERT INTO sessions (id, created_at, updated_at, messages) VALUES (?1, ?2, ?2, ?3)
             ON CONFLICT (id) DO UPDATE SET updated_at = excluded.updated_at,
                 messages = messages + excluded.messages
             RETURNING messages",
        )?
        .query_row(params![id, now, n], |r| r.get(0))?;
    let first = total - n;
    let mut ins = conn.prepare_cached(
        "INSERT INTO messages (session_id, seq, message, run_id, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    for (i, m) in messages.iter().enumerate() {
        ins.execute(params![id, first + i as i64, m, run_id, now])?;
    }
    Ok(first)
}

/// Deletes a session and its messages; whether it existed.
pub fn delete(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    Ok(conn.execute("DELETE FROM sessions WHERE id = ?1", [id])? > 0)
}
