//! Stored responses of the Responses API (`/v1/responses`). The conversation itself lives
//! in the sessions' tables: a response names its session and how many messages that
//! session held once it was answered (`session_end`), which is where a response that
//! continues it (`previous_response_id`) starts from.

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseRow {
    pub id: String,
    pub session_id: String,
    pub session_end: i64,
    pub previous_response_id: Option<String>,
    pub conversation: Option<String>,
    pub model: String,
    pub instructions: Option<String>,
    /// The request's input items, a JSON array of messages.
    pub input: String,
    /// The reply text.
    pub output: String,
    /// JSON `{input_tokens, output_tokens, total_tokens}` when the backend reported them.
    pub usage: Option<String>,
    /// The request's `metadata`, a JSON object.
    pub metadata: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub created_at: i64,
}

const COLUMNS: &str = "id, session_id, session_end, previous_response_id, conversation, model, \
     instructions, input, output, usage, metadata, created_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ResponseRow> {
    Ok(ResponseRow {
        id: r.get(0)?,
        session_id: r.get(1)?,
        session_end: r.get(2)?,
        previous_response_id: r.get(3)?,
        conversation: r.get(4)?,
        model: r.get(5)?,
        instructions: r.get(6)?,
        input: r.get(7)?,
        output: r.get(8)?,
        usage: r.get(9)?,
        metadata: r.get(10)?,
        created_at: r.get(11)?,
    })
}

pub fn insert(conn: &Connection, r: &ResponseRow) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO responses (id, session_id, session_end, previous_response_id, conversation,
             model, instructions, input, output, usage, metadata, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        r.id,
        r.session_id,
        r.session_end,
        r.previous_response_id,
        r.conversation,
        r.model,
        r.instructions,
        r.input,
        r.output,
        r.usage,
        r.metadata,
        r.created_at,
    ])?;
    Ok(())
}

pub fn get(conn: &Connection, id: &str) -> rusqlite::Result<Option<ResponseRow>> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM responses WHERE id = ?1"))?
        .query_row([id], row)
        .optional()
}

/// Deletes a stored response (its session's messages stay); whether it existed.
pub fn delete(conn: &Connection, id: &str) -> rusqlite::Result<bool> {
    Ok(conn
        .prepare_cached("DELETE FROM responses WHERE id = ?1")?
        .execute([id])?
        > 0)
}

/// Deletes the responses created before `cutoff` (ms); how many. Rows are inserted in
/// `created_at` order (it is their commit's time), so the expired ones are those before
/// the first row, in rowid order, that is not: the walk costs what it deletes.
pub fn prune(conn: &Connection, cutoff: i64) -> rusqlite::Result<usize> {
    let first_kept: Option<i64> = conn
        .prepare_cached(
            "SELECT rowid FROM responses WHERE created_at >= ?1 ORDER BY rowid LIMIT 1",
        )?
        .query_row([cutoff], |r| r.get(0))
        .optional()?;
    match first_kept {
        Some(rowid) => conn
            .prepare_cached("DELETE FROM responses WHERE rowid < ?1")?
            .execute([rowid]),
        None => conn.prepare_cached("DELETE FROM responses")?.execute([]),
    }
}
