//! What the chat platforms keep besides their messages (which are deliveries and runs):
//! a polling platform's next offset, the session a chat moved to with `/new`, users who
//! asked to pair or were approved, and the restart notices owed to chats.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

/// The offset to confirm at the next poll of platform instance `platform`/`name`.
pub fn offset(conn: &Connection, platform: &str, name: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached(
        "SELECT next_offset FROM platform_offsets WHERE platform = ?1 AND name = ?2",
    )?
    .query_row(params![platform, name], |r| r.get(0))
    .optional()
}

pub fn set_offset(
    conn: &Connection,
    platform: &str,
    name: &str,
    next: i64,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO platform_offsets (platform, name, next_offset, updated_at)
         VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (platform, name) DO UPDATE SET
             next_offset = max(next_offset, excluded.next_offset), updated_at = excluded.updated_at",
    )?
    .execute(params![platform, name, next, now])?;
    Ok(())
}

/// Every chat that moved to a session of its own (`/new`): (chat key, session id).
pub fn chat_sessions(conn: &Connection) -> rusqlite::Result<Vec<(String, String)>> {
    let mut st = conn.prepare("SELECT chat_key, session_id FROM platform_chats")?;
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect()
}

pub fn set_chat_session(
    conn: &Connection,
    chat_key: &str,
    session_id: &str,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO platform_chats (chat_key, session_id, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (chat_key) DO UPDATE SET
             session_id = excluded.session_id, updated_at = excluded.updated_at",
    )?
    .execute(params![chat_key, session_id, now])?;
    Ok(())
}

/// A user of a platform instance who asked to pair (`pending`, with a code) or was
/// approved by the operator (`approved`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PlatformUser {
    pub platform: String,
    pub name: String,
    pub user_id: String,
    pub state: String,
    pub code: Option<String>,
    /// The name the platform showed for the user, for the operator's list.
    pub display: String,
    /// Where to tell the user they were approved (a chat target, JSON).
    #[serde(skip)]
    pub chat: String,
    pub created_at: i64,
    pub updated_at: i64,
}

const USER_COLUMNS: &str =
    "platform, name, user_id, state, code, display, chat, created_at, updated_at";

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PlatformUser> {
    Ok(PlatformUser {
        platform: r.get(0)?,
        name: r.get(1)?,
        user_id: r.get(2)?,
        state: r.get(3)?,
        code: r.get(4)?,
        display: r.get(5)?,
        chat: r.get(6)?,
        created_at: r.get(7)?,
        updated_at: r.get(8)?,
    })
}

pub fn users(conn: &Connection) -> rusqlite::Result<Vec<PlatformUser>> {
    let mut st = conn.prepare(&format!(
        "SELECT {USER_COLUMNS} FROM platform_users ORDER BY platform, name, created_at"
    ))?;
    st.query_map([], user_row)?.collect()
}

pub fn user(
    conn: &Connection,
    platform: &str,
    name: &str,
    user_id: &str,
) -> rusqlite::Result<Option<PlatformUser>> {
    conn.prepare_cached(&format!(
        "SELECT {USER_COLUMNS} FROM platform_users WHERE platform = ?1 AND name = ?2 AND user_id = ?3"
    ))?
    .query_row(params![platform, name, user_id], user_row)
    .optional()
}

pub fn user_by_code(conn: &Connection, code: &str) -> rusqlite::Result<Option<PlatformUser>> {
    conn.prepare_cached(&format!(
        "SELECT {USER_COLUMNS} FROM platform_users WHERE code = ?1"
    ))?
    .query_row([code], user_row)
    .optional()
}

/// Records a pairing request. A user who already has a row keeps it (and its code).
pub fn insert_user(conn: &Connection, u: &PlatformUser) -> rusqlite::Result<()> {
    conn.prepare_cached(&format!(
        "INSERT INTO platform_users ({USER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (platform, name, user_id) DO NOTHING"
    ))?
    .execute(params![
        u.platform,
        u.name,
        u.user_id,
        u.state,
        u.code,
        u.display,
        u.chat,
        u.created_at,
        u.updated_at
    ])?;
    Ok(())
}

/// Approves the pending user holding `code`; the code is spent.
pub fn approve(conn: &Connection, code: &str, now: i64) -> rusqlite::Result<Option<PlatformUser>> {
    let Some(u) = user_by_code(conn, code)? else {
        return Ok(None);
    };
    conn.prepare_cached(
        "UPDATE platform_users SET state = 'approved', code = NULL, updated_at = ?2 WHERE code = ?1",
    )?
    .execute(params![code, now])?;
    Ok(Some(PlatformUser {
        state: "approved".into(),
        code: None,
        updated_at: now,
        ..u
    }))
}

/// Forgets `user_id` (approved or pending) on every platform instance, or on those named;
/// returns the rows removed.
pub fn revoke(
    conn: &Connection,
    user_id: &str,
    platform: Option<&str>,
    name: Option<&str>,
) -> rusqlite::Result<Vec<PlatformUser>> {
    let mut st = conn.prepare_cached(&format!(
        "DELETE FROM platform_users WHERE user_id = ?1 AND (?2 IS NULL OR platform = ?2)
         AND (?3 IS NULL OR name = ?3) RETURNING {USER_COLUMNS}"
    ))?;
    let removed = st
        .query_map(params![user_id, platform, name], user_row)?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(removed)
}

/// A restart notice owed to a chat: its delivery target (JSON) and when the restart was
/// asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartNotice {
    pub id: String,
    pub target: String,
    pub requested_at: i64,
}

pub fn add_restart(conn: &Connection, n: &RestartNotice) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO platform_restarts (id, target, requested_at) VALUES (?1, ?2, ?3)",
    )?
    .execute(params![n.id, n.target, n.requested_at])?;
    Ok(())
}

/// Takes every owed restart notice: they are deleted in the caller's transaction, which
/// stores their deliveries, so each is sent once.
pub fn take_restarts(conn: &Connection) -> rusqlite::Result<Vec<RestartNotice>> {
    let mut st =
        conn.prepare_cached("DELETE FROM platform_restarts RETURNING id, target, requested_at")?;
    let taken = st
        .query_map([], |r| {
            Ok(RestartNotice {
                id: r.get(0)?,
                target: r.get(1)?,
                requested_at: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(taken)
}
