//! Runs (one agent turn each, queued → running → completed | failed | cancelled) and the
//! events each run emitted.

use rusqlite::{Connection, OptionalExtension, params};

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> RunStatus {
        match s {
            "queued" => RunStatus::Queued,
            "running" => RunStatus::Running,
            "completed" => RunStatus::Completed,
            "cancelled" => RunStatus::Cancelled,
            _ => RunStatus::Failed,
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        )
    }
}

#[derive(Debug, Clone)]
pub struct RunRow {
    pub id: String,
    pub session_id: Option<String>,
    pub status: RunStatus,
    pub model: String,
    /// The messages of the turn, a JSON array.
    pub input: String,
    pub output: Option<String>,
    pub error: Option<String>,
    pub idempotency_key: Option<String>,
    /// The canonical request body, to tell a repeat from a conflicting reuse of a key.
    pub request: Option<String>,
    pub attempt: i64,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
}

const COLUMNS: &str = "id, session_id, status, model, input, output, error, idempotency_key, \
     request, attempt, created_at, started_at, finished_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunRow> {
    Ok(RunRow {
        id: r.get(0)?,
        session_id: r.get(1)?,
        status: RunStatus::parse(&r.get::<_, String>(2)?),
        model: r.get(3)?,
        input: r.get(4)?,
        output: r.get(5)?,
        error: r.get(6)?,
        idempotency_key: r.get(7)?,
        request: r.get(8)?,
        attempt: r.get(9)?,
        created_at: r.get(10)?,
        started_at: r.get(11)?,
        finished_at: r.get(12)?,
    })
}

pub fn insert(conn: &Connection, run: &RunRow) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO runs (id, session_id, status, model, input, output, error, idempotency_key,
         request, attempt, created_at, started_at, finished_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
    )?
    .execute(params![
        run.id,
        run.session_id,
        run.status.as_str(),
        run.model,
        run.input,
        run.output,
        run.error,
        run.idempotency_key,
        run.request,
        run.attempt,
        run.created_at,
        run.started_at,
        run.finished_at
    ])?;
    Ok(())
}

pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<RunRow>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM runs WHERE id = ?1"))?
        .query_row([id], row)
        .optional()
}

pub fn by_idempotency_key(conn: &Connection, key: &str) -> rusqlite::Result<Option<RunRow>> {
    conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM runs WHERE idempotency_key = ?1"
    ))?
    .query_row([key], row)
    .optional()
}

/// Runs that were queued or running, in the order they were stored (the rowid grows with
/// each insert; a timestamp would tie within a millisecond and then sort by random id):
/// the work to resume at start, so that a session's turns resume in their order.
pub fn unfinished(conn: &Connection) -> rusqlite::Result<Vec<RunRow>> {
    let mut st = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM runs WHERE status IN ('queued', 'running') ORDER BY rowid"
    ))?;
    st.query_map([], row)?.collect()
}

pub fn count_by_status(conn: &Connection, status: RunStatus) -> rusqlite::Result<i64> {
    conn.query_row(
        "SELECT count(*) FROM runs WHERE status = ?1",
        [status.as_str()],
        |r| r.get(0),
    )
}

pub fn set_running(conn: &Connection, id: &str, attempt: i64, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE runs SET status = 'running', attempt = ?2, started_at = ?3 WHERE id = ?1",
    )?
    .execute(params![id, attempt, now])?;
    Ok(())
}

pub fn finish(
    conn: &Connection,
    id: &str,
    status: RunStatus,
    output: Option<&str>,
    error: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "UPDATE runs SET status = ?2, output = ?3, error = ?4, finished_at = ?5 WHERE id = ?1",
    )?
    .execute(params![id, status.as_str(), output, error, now])?;
    Ok(())
}

/// One stored event of a run.
#[derive(Debug, Clone)]
pub struct EventRow {
    pub seq: i64,
    pub kind: String,
    /// A JSON object.
    pub data: String,
}

pub fn append_event(
    conn: &Connection,
    run_id: &str,
    ev: &EventRow,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO run_events (run_id, seq, type, data, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![run_id, ev.seq, ev.kind, ev.data, now])?;
    Ok(())
}

pub fn events(conn: &Connection, run_id: &str) -> rusqlite::Result<Vec<EventRow>> {
    let mut st = conn
        .prepare_cached("SELECT seq, type, data FROM run_events WHERE run_id = ?1 ORDER BY seq")?;
    st.query_map([run_id], |r| {
        Ok(EventRow {
            seq: r.get(0)?,
            kind: r.get(1)?,
            data: r.get(2)?,
        })
    })?
    .collect()
}

/// Deletes up to `limit` finished runs that ended before `cutoff` and belong to no delivery
/// (a delivery's run is pruned with it), their events first. Returns how many runs went.
pub fn prune_finished(conn: &Connection, cutoff: i64, limit: i64) -> rusqlite::Result<usize> {
    const OLD: &str = "SELECT id FROM runs
         WHERE finished_at < ?1
           AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.run_id = runs.id)
         ORDER BY finished_at LIMIT ?2";
    // The events explicitly: a delete does not depend on the `foreign_keys` setting.
    conn.prepare_cached(&format!("DELETE FROM run_events WHERE run_id IN ({OLD})"))?
        .execute(params![cutoff, limit])?;
    conn.prepare_cached(&format!("DELETE FROM runs WHERE id IN ({OLD})"))?
        .execute(params![cutoff, limit])
}
