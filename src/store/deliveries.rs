//! Webhook deliveries: accepted once per sender id within the dedup window, then their
//! result's way to the target: `received` (the turn has not finished) → `pending` →
//! `attempting` → `delivered` | `failed` (a failed attempt with attempts left goes back to
//! `pending` with a next attempt time).

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct DeliveryRow {
    pub id: String,
    pub route: String,
    pub source_id: String,
    pub event: String,
    pub state: String,
    #[serde(skip)]
    pub prompt: String,
    pub session_id: Option<String>,
    pub run_id: String,
    /// JSON: `{"type": "log"}` or `{"type": "http", "url": …}`.
    #[serde(skip)]
    pub target: String,
    /// JSON: the turn's outcome, once known.
    #[serde(skip)]
    pub result: Option<String>,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub next_attempt_at: Option<i64>,
    pub received_at: i64,
    pub updated_at: i64,
    /// Chat replies: how many parts of a long reply the platform confirmed.
    pub progress: i64,
}

const COLUMNS: &str = "id, route, source_id, event, state, prompt, session_id, run_id, target, \
     result, attempts, last_error, next_attempt_at, received_at, updated_at, progress";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DeliveryRow> {
    Ok(DeliveryRow {
        id: r.get(0)?,
        route: r.get(1)?,
        source_id: r.get(2)?,
        event: r.get(3)?,
        state: r.get(4)?,
        prompt: r.get(5)?,
        session_id: r.get(6)?,
        run_id: r.get(7)?,
        target: r.get(8)?,
        result: r.get(9)?,
        attempts: r.get(10)?,
        last_error: r.get(11)?,
        next_attempt_at: r.get(12)?,
        received_at: r.get(13)?,
        updated_at: r.get(14)?,
        progress: r.get(15)?,
    })
}

/// The delivery already accepted for this sender id since `since`, if any.
pub fn find_recent(
    conn: &Connection,
    route: &str,
    source_id: &str,
    since: i64,
) -> rusqlite::Result<Option<String>> {
    conn.prepare_cached(
        "SELECT id FROM deliveries WHERE route = ?1 AND source_id = ?2 AND received_at >= ?3
         ORDER BY received_at DESC LIMIT 1",
    )?
    .query_row(params![route, source_id, since], |r| r.get(0))
    .optional()
}

pub fn insert(conn: &Connection, d: &DeliveryRow) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO deliveries (id, route, source_id, event, state, prompt, session_id, run_id,
         target, result, attempts, last_error, next_attempt_at, received_at, updated_at, progress)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
    )?
    .execute(params![
        d.id,
        d.route,
        d.source_id,
        d.event,
        d.state,
        d.prompt,
        d.session_id,
        d.run_id,
        d.target,
        d.result,
        d.attempts,
        d.last_error,
        d.next_attempt_at,
        d.received_at,
        d.updated_at,
        d.progress
    ])?;
    Ok(())
}

pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<DeliveryRow>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM deliveries WHERE id = ?1"))?
        .query_row([id], row)
        .optional()
}

/// Deliveries not yet delivered or failed, in the order they were stored (the rowid grows
/// with each insert): the work to resume at start, so that one chat's replies keep their
/// order.
pub fn open(conn: &Connection) -> rusqlite::Result<Vec<DeliveryRow>> {
    let mut st = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM deliveries WHERE state NOT IN ('delivered', 'failed')
         ORDER BY rowid"
    ))?;
    st.query_map([], row)?.collect()
}

/// Newest first, optionally in one state.
pub fn list(
    conn: &Connection,
    state: Option<&str>,
    limit: i64,
) -> rusqlite::Result<Vec<DeliveryRow>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM deliveries WHERE (?1 IS NULL OR state = ?1)
         ORDER BY received_at DESC, id DESC LIMIT ?2"
    ))?;
    st.query_map(params![state, limit], row)?.collect()
}

/// The turn finished: its outcome waits for delivery.
pub fn set_result(conn: &Connection, id: &str, result: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE deliveries SET state = 'pending', result = ?2, next_attempt_at = ?3, updated_at = ?3
         WHERE id = ?1",
    )?
    .execute(params![id, result, now])?;
    Ok(())
}

/// An attempt begins: the `attempts`-th. `result`: the turn's outcome, when it is not
/// stored yet (the first attempt stores it with its mark).
pub fn set_attempting(
    conn: &Connection,
    id: &str,
    attempts: i64,
    result: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE deliveries SET state = 'attempting', attempts = ?2, updated_at = ?3,
         result = coalesce(?4, result) WHERE id = ?1",
    )?
    .execute(params![id, attempts, now, result])?;
    Ok(())
}

/// A chat reply: its parts up to `parts` were confirmed by the platform.
pub fn set_progress(conn: &Connection, id: &str, parts: i64, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached("UPDATE deliveries SET progress = ?2, updated_at = ?3 WHERE id = ?1")?
        .execute(params![id, parts, now])?;
    Ok(())
}

/// The delivery stored last for `route` (a schedule's last run), if any.
pub fn latest(conn: &Connection, route: &str) -> rusqlite::Result<Option<DeliveryRow>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM deliveries WHERE route = ?1 ORDER BY received_at DESC, rowid DESC LIMIT 1"
    ))?
    .query_row([route], row)
    .optional()
}

/// Open deliveries of one route (a platform's backlog).
pub fn count_open(conn: &Connection, route: &str) -> rusqlite::Result<i64> {
    conn.prepare_cached(
        "SELECT count(*) FROM deliveries WHERE state NOT IN ('delivered', 'failed') AND route = ?1",
    )?
    .query_row([route], |r| r.get(0))
}

pub fn set_delivered(conn: &Connection, id: &str, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE deliveries SET state = 'delivered', next_attempt_at = NULL, updated_at = ?2
         WHERE id = ?1",
    )?
    .execute(params![id, now])?;
    Ok(())
}

/// A failed attempt: `next` is the next attempt's time, `None` when none is left.
pub fn set_failed_attempt(
    conn: &Connection,
    id: &str,
    error: &str,
    next: Option<i64>,
    now: i64,
) -> rusqlite::Result<()> {
    let state = if next.is_some() { "pending" } else { "failed" };
    conn.prepare_cached(
        "UPDATE deliveries SET state = ?2, last_error = ?3, next_attempt_at = ?4, updated_at = ?5
         WHERE id = ?1",
    )?
    .execute(params![id, state, error, next, now])?;
    Ok(())
}

/// A retry asked by an operator: a fresh budget of attempts from now; the last error stays.
pub fn reset_for_retry(conn: &Connection, id: &str, now: i64) -> rusqlite::Result<bool> {
    let n = conn
        .prepare_cached(
            "UPDATE deliveries SET state = 'pending', attempts = 0, next_attempt_at = ?2,
             updated_at = ?2 WHERE id = ?1 AND state IN ('delivered', 'failed', 'pending')",
        )?
        .execute(params![id, now])?;
    Ok(n == 1)
}

/// Deletes at most `limit` deliveries that ended (delivered or failed) before `before`,
/// oldest first, with their runs (and, by cascade, the runs' events). Returns how many.
/// Open deliveries are never pruned, whatever their age.
pub fn prune(conn: &Connection, before: i64, limit: i64) -> rusqlite::Result<usize> {
    const ENDED: &str = "SELECT id, run_id FROM deliveries
         WHERE state IN ('delivered', 'failed') AND updated_at < ?1
         ORDER BY updated_at, id LIMIT ?2";
    // The events too, explicitly: a delete does not depend on the `foreign_keys` setting.
    // The deliveries last: the statements before find the same ones through them.
    let mut deleted = 0;
    for (table, key, column) in [
        ("run_events", "run_id", "run_id"),
        ("runs", "id", "run_id"),
        ("deliveries", "id", "id"),
    ] {
        deleted = conn
            .prepare_cached(&format!(
                "DELETE FROM {table} WHERE {key} IN (SELECT {column} FROM ({ENDED}))"
            ))?
            .execute(params![before, limit])?;
    }
    Ok(deleted)
}

pub fn count_by_state(conn: &Connection) -> rusqlite::Result<Vec<(String, i64)>> {
    let mut st = conn.prepare_cached("SELECT state, count(*) FROM deliveries GROUP BY state")?;
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
}

/// Deliveries by state, and when the oldest open one was received.
pub type DeliveryMetrics = (Vec<(String, i64)>, Option<i64>);

/// [`DeliveryMetrics`] now, for a scrape.
pub fn metrics(conn: &Connection) -> rusqlite::Result<DeliveryMetrics> {
    let counts = count_by_state(conn)?;
    let oldest = conn
        .prepare_cached(
            "SELECT min(received_at) FROM deliveries WHERE state NOT IN ('delivered', 'failed')",
        )?
        .query_row([], |r| r.get(0))?;
    Ok((counts, oldest))
}
