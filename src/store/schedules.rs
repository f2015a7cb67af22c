//! What the store knows of each schedule: since when it exists (a slot before that never
//! runs) and the last slot recorded. A slot's run and its delivery live in the ledger
//! (route `schedule:NAME`, the slot's time as the sender's id), recorded in the same
//! commit as `last_slot_at`.

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScheduleState {
    pub created_at: i64,
    pub last_slot_at: Option<i64>,
}

/// The state of `name`, created (known from `now` on) if it has none.
pub fn ensure(conn: &Connection, name: &str, now: i64) -> rusqlite::Result<ScheduleState> {
    conn.prepare_cached(
        "INSERT INTO schedules (name, created_at, last_slot_at) VALUES (?1, ?2, NULL)
         ON CONFLICT (name) DO NOTHING",
    )?
    .execute(params![name, now])?;
    conn.prepare_cached("SELECT created_at, last_slot_at FROM schedules WHERE name = ?1")?
        .query_row([name], |r| {
            Ok(ScheduleState {
                created_at: r.get(0)?,
                last_slot_at: r.get(1)?,
            })
        })
}

pub fn get(conn: &Connection, name: &str) -> rusqlite::Result<Option<ScheduleState>> {
    conn.prepare_cached("SELECT created_at, last_slot_at FROM schedules WHERE name = ?1")?
        .query_row([name], |r| {
            Ok(ScheduleState {
                created_at: r.get(0)?,
                last_slot_at: r.get(1)?,
            })
        })
        .optional()
}

/// Records `slot` as the schedule's last (never moves back).
pub fn set_last_slot(conn: &Connection, name: &str, slot: i64, now: i64) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO schedules (name, created_at, last_slot_at) VALUES (?1, ?3, ?2)
         ON CONFLICT (name) DO UPDATE SET last_slot_at = max(coalesce(last_slot_at, ?2), ?2)",
    )?
    .execute(params![name, slot, now])?;
    Ok(())
}
