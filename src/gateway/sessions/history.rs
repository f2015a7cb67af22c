//! The recent history of recently used sessions, kept in memory so that a turn does not
//! read (and re-parse) its session's messages from SQLite each time.
//!
//! The store stays the truth; this is a copy, bounded in size, that may be dropped at any
//! time. A session's worker takes its entry out for the length of a turn (turns of one
//! session never overlap) and puts it back after the turn's write committed. Each entry
//! carries the number of messages the store held for the session when it was read or last
//! written: an append returns the count it found, and when the two differ (the session was
//! deleted, or written past this copy) the copy is dropped and the next turn reads the
//! store again.
//!
//! Eviction is a two-generation approximation of LRU: entries go into the young map; when
//! it holds half of the budget, the old map is dropped and the young one becomes old. A
//! lookup takes from either. So the maps never hold more than the budget (plus one
//! entry), and a session used within the last half-budget's worth of turns stays.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::Value;

/// Approximate bytes the cache may hold, young and old generations together.
pub const BUDGET_BYTES: usize = 8 << 20;
/// At most this many sessions, young and old generations together.
pub const BUDGET_SESSIONS: usize = 8192;
/// What one message costs besides its JSON text: a `serde_json` object is a `BTreeMap`
/// whose first node holds room for 11 entries, plus the key strings and the `Arc`.
const PER_MESSAGE: usize = 768;

/// One session's recent messages.
#[derive(Debug, Default)]
pub struct Recent {
    /// The last `history_limit` messages, oldest first.
    pub messages: VecDeque<Arc<Value>>,
    /// The JSON length of each message in `messages`, to keep `bytes` exact.
    lens: VecDeque<usize>,
    /// The number of messages the store holds for the session.
    pub stored: i64,
    /// The session's `X-Hermes-Session-Key`, as the store holds it.
    pub key: Option<String>,
    bytes: usize,
}

impl Recent {
    /// An empty copy of a session of which the store holds `stored` messages; `push` the
    /// newest of them, oldest first.
    pub fn new(stored: i64) -> Self {
        Recent {
            stored,
            ..Recent::default()
        }
    }

    /// Appends a message (and its JSON length), keeping the newest `limit`.
    pub fn push(&mut self, m: Arc<Value>, json_len: usize, limit: usize) {
        self.messages.push_back(m);
        self.lens.push_back(json_len);
        self.bytes += json_len + PER_MESSAGE;
        while self.messages.len() > limit {
            self.messages.pop_front();
            if let Some(l) = self.lens.pop_front() {
                self.bytes -= l + PER_MESSAGE;
            }
        }
    }
}

#[derive(Default)]
struct Generation {
    map: HashMap<String, Recent>,
    bytes: usize,
}

impl Generation {
    fn take(&mut self, key: &str) -> Option<Recent> {
        let r = self.map.remove(key)?;
        self.bytes -= r.bytes;
        Some(r)
    }
}

#[derive(Default)]
struct Generations {
    young: Generation,
    old: Generation,
}

/// The cache, shared by the session workers.
#[derive(Default)]
pub struct HistoryCache {
    inner: Mutex<Generations>,
}

impl HistoryCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes a session's entry out, if the cache holds one.
    pub fn take(&self, key: &str) -> Option<Recent> {
        let mut g = self.lock();
        match g.young.take(key) {
            Some(r) => Some(r),
            None => g.old.take(key),
        }
    }

    /// Puts a session's entry (back) in.
    pub fn put(&self, key: String, recent: Recent) {
        if recent.bytes > BUDGET_BYTES / 4 {
            // Too big to be worth keeping: the store serves it.
            return;
        }
        let mut g = self.lock();
        g.young.bytes += recent.bytes;
        if let Some(prev) = g.young.map.insert(key, recent) {
            g.young.bytes -= prev.bytes;
        }
        if g.young.bytes > BUDGET_BYTES / 2 || g.young.map.len() > BUDGET_SESSIONS / 2 {
            g.old = std::mem::take(&mut g.young);
        }
    }

    /// Forgets a session (it was deleted).
    pub fn forget(&self, key: &str) {
        let mut g = self.lock();
        g.young.take(key);
        g.old.take(key);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        let g = self.lock();
        g.young.map.len() + g.old.map.len()
    }

    #[cfg(test)]
    fn bytes(&self) -> usize {
        let g = self.lock();
        g.young.bytes + g.old.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize) -> (Arc<Value>, usize) {
        let v = serde_json::json!({"role": "user", "content": "x".repeat(n)});
        let len = v.to_string().len();
        (Arc::new(v), len)
    }

    #[test]
    fn keeps_the_newest_messages_and_counts_their_bytes() {
        let mut r = Recent::new(0);
        for _ in 0..5 {
            let (m, l) = msg(10);
            r.push(m, l, 3);
        }
        assert_eq!(r.messages.len(), 3);
        assert_eq!(r.bytes, 3 * (msg(10).1 + PER_MESSAGE));
    }

    #[test]
    fn take_removes_and_put_restores() {
        let c = HistoryCache::default();
        assert!(c.take("a").is_none());
        c.put("a".into(), Recent::new(4));
        let r = c.take("a").map(|r| r.stored);
        assert_eq!(r, Some(4));
        assert!(c.take("a").is_none(), "taken out while in use");
        c.put("a".into(), Recent::new(6));
        c.forget("a");
        assert!(c.take("a").is_none());
    }

    #[test]
    fn stays_within_its_budget() {
        let c = HistoryCache::default();
        for i in 0..BUDGET_SESSIONS * 3 {
            let mut r = Recent::new(1);
            let (m, l) = msg(2000);
            r.push(m, l, 10);
            c.put(format!("s{i}"), r);
            assert!(c.len() <= BUDGET_SESSIONS);
            assert!(c.bytes() <= BUDGET_BYTES + 4096);
        }
        // The most recent sessions are still there.
        let last = format!("s{}", BUDGET_SESSIONS * 3 - 1);
        assert!(c.take(&last).is_some());
        // An entry bigger than a quarter of the budget is not kept.
        let mut big = Recent::new(1);
        let (m, l) = msg(BUDGET_BYTES / 4);
        big.push(m, l, 10);
        c.put("big".into(), big);
        assert!(c.take("big").is_none());
    }
}
