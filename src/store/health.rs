//! Whether the store can commit. A write that fails because the database itself cannot
//! write (disk full, I/O error, locked by another process, read-only, cannot be opened)
//! makes the store *degraded* until a commit that wrote something succeeds again. Callers
//! tell such a failure by [`StoreError::is_unavailable`] (the API answers 503 with
//! `Retry-After`; a platform is refused so that it sends again), and the log says it once
//! per episode: a warning when the store first fails, a line when it commits again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use rusqlite::ErrorCode;

use super::StoreError;

/// Whether `e` says the database cannot write now (rather than that a statement is wrong):
/// `SQLITE_FULL`, `SQLITE_IOERR*`, `SQLITE_BUSY`/`LOCKED` (past the busy timeout),
/// `SQLITE_READONLY`, `SQLITE_CANTOPEN`.
pub fn unavailable(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::ReadOnly
                | ErrorCode::CannotOpen
        )
    )
}

/// A failure's kind, for metrics: `full`, `io`, `busy`, `readonly` or `other`.
pub fn kind(e: &rusqlite::Error) -> &'static str {
    match e.sqlite_error_code() {
        Some(ErrorCode::DiskFull) => "full",
        Some(ErrorCode::SystemIoFailure | ErrorCode::CannotOpen) => "io",
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => "busy",
        Some(ErrorCode::ReadOnly) => "readonly",
        _ => "other",
    }
}

impl StoreError {
    /// The database cannot write now: nothing was stored, and the same write may succeed
    /// later. (Otherwise the write itself is at fault, or the store is closing.)
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Unavailable(_) => true,
            StoreError::Sqlite(e) | StoreError::Open { source: e, .. } => unavailable(e),
            _ => false,
        }
    }
}

/// The store's state as the writer last saw it.
#[derive(Default)]
pub(super) struct Health {
    /// Set with `episode`; read without the lock on every commit.
    degraded: AtomicBool,
    episode: Mutex<Option<Episode>>,
}

struct Episode {
    /// The last failure's.
    reason: String,
    since: Instant,
    /// Failed commits (and failed jobs) since it began.
    failures: u64,
}

impl Health {
    /// A write failed because the database cannot write: the first failure of an episode
    /// is logged as a warning, the next ones only at debug level.
    pub(super) fn failed(&self, reason: &str) {
        let mut ep = self.episode.lock().unwrap_or_else(PoisonError::into_inner);
        match ep.as_mut() {
            Some(ep) => {
                ep.failures += 1;
                if ep.reason != reason {
                    ep.reason = reason.to_owned();
                }
                tracing::debug!("store: still cannot commit: {reason}");
            }
            None => {
                tracing::warn!(
                    "store: degraded, cannot commit: {reason}; writes are refused (503 with Retry-After) until a commit succeeds again, reads go on"
                );
                *ep = Some(Episode {
                    reason: reason.to_owned(),
                    since: Instant::now(),
                    failures: 1,
                });
                self.degraded.store(true, Ordering::Release);
            }
        }
    }

    /// A commit that wrote something succeeded: ends an episode.
    pub(super) fn committed(&self) {
        if !self.degraded.load(Ordering::Acquire) {
            return;
        }
        let mut ep = self.episode.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(ep) = ep.take() {
            tracing::info!(
                "store: commits succeed again after {:.1}s degraded ({} failed writes; last: {})",
                ep.since.elapsed().as_secs_f64(),
                ep.failures,
                ep.reason
            );
        }
        self.degraded.store(false, Ordering::Release);
    }

    /// Why the store is degraded, if it is.
    pub(super) fn degraded(&self) -> Option<String> {
        if !self.degraded.load(Ordering::Acquire) {
            return None;
        }
        self.episode
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|ep| ep.reason.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::ffi;

    fn sqlite(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    #[test]
    fn full_io_busy_locked_readonly_cantopen_are_unavailable_and_nothing_else() {
        for code in [
            ffi::SQLITE_FULL,
            ffi::SQLITE_IOERR,
            ffi::SQLITE_IOERR_WRITE,
            ffi::SQLITE_IOERR_FSYNC,
            ffi::SQLITE_BUSY,
            ffi::SQLITE_LOCKED,
            ffi::SQLITE_READONLY,
            ffi::SQLITE_CANTOPEN,
        ] {
            assert!(unavailable(&sqlite(code)), "{code}");
            assert!(StoreError::Sqlite(sqlite(code)).is_unavailable(), "{code}");
        }
        for code in [
            ffi::SQLITE_CONSTRAINT,
            ffi::SQLITE_CONSTRAINT_UNIQUE,
            ffi::SQLITE_ERROR,
            ffi::SQLITE_CORRUPT,
            ffi::SQLITE_MISMATCH,
        ] {
            assert!(!unavailable(&sqlite(code)), "{code}");
        }
        assert!(StoreError::Unavailable("x".into()).is_unavailable());
        assert!(!StoreError::WriterGone.is_unavailable());
        assert!(!StoreError::Commit("x".into()).is_unavailable());
        assert!(!StoreError::Sqlite(rusqlite::Error::QueryReturnedNoRows).is_unavailable());
    }

    #[test]
    fn an_episode_begins_at_the_first_failure_and_ends_at_a_commit() {
        let h = Health::default();
        assert_eq!(h.degraded(), None);
        h.committed();
        h.failed("database or disk is full");
        h.failed("database is locked");
        // The reason is the last failure's.
        assert_eq!(h.degraded().as_deref(), Some("database is locked"));
        h.committed();
        assert_eq!(h.degraded(), None);
        h.failed("disk I/O error");
        assert_eq!(h.degraded().as_deref(), Some("disk I/O error"));
    }
}
