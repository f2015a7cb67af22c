//! Token buckets: a webhook route's rate limit, a chat's inbound limit, a platform's
//! outbound limit. `N` tokens per period, up to `burst` saved up.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::RateLimit;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens per second.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(limit: RateLimit) -> Self {
        TokenBucket {
            rate: f64::from(limit.count) / limit.per.as_secs_f64().max(1e-9),
            burst: f64::from(limit.burst.max(1)),
            tokens: f64::from(limit.burst.max(1)),
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.last = now;
    }

    /// Takes a token: `None` when one was there, else how long until one is.
    pub fn take(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Whether it has refilled completely (it then says nothing a new bucket would not).
    pub fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// One bucket per key (a chat), made full on first use. Buckets that refilled are dropped
/// from time to time, so that memory follows the keys recently active, not all ever seen.
pub struct KeyedBuckets {
    limit: RateLimit,
    map: Mutex<(HashMap<String, TokenBucket>, usize)>,
}

/// The map is swept for full buckets every this many new keys.
const SWEEP_EVERY: usize = 1024;

impl KeyedBuckets {
    pub fn new(limit: RateLimit) -> Self {
        KeyedBuckets {
            limit,
            map: Mutex::new((HashMap::new(), 0)),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// [`TokenBucket::take`] on `key`'s bucket.
    pub fn take(&self, key: &str) -> Option<Duration> {
        let now = Instant::now();
        let mut guard = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        let (map, added) = &mut *guard;
        if let Some(b) = map.get_mut(key) {
            return b.take(now);
        }
        *added += 1;
        if *added >= SWEEP_EVERY {
            *added = 0;
            map.retain(|_, b| !b.is_full(now));
        }
        let mut b = TokenBucket::new(self.limit);
        let r = b.take(now);
        map.insert(key.to_owned(), b);
        r
    }

    /// Keys with a bucket now.
    pub fn len(&self) -> usize {
        self.map
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(count: u32, per: Duration, burst: u32) -> RateLimit {
        RateLimit { count, per, burst }
    }

    #[test]
    fn a_bucket_gives_its_burst_then_paces() {
        let mut b = TokenBucket::new(limit(10, Duration::from_secs(1), 3));
        let t0 = Instant::now();
        assert!(b.take(t0).is_none());
        assert!(b.take(t0).is_none());
        assert!(b.take(t0).is_none());
        let wait = b.take(t0).expect("empty after the burst");
        assert!(wait <= Duration::from_millis(100) && wait > Duration::from_millis(90));
        assert!(b.take(t0 + Duration::from_millis(100)).is_none());
        assert!(!b.is_full(t0 + Duration::from_millis(100)));
        assert!(b.is_full(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn keyed_buckets_are_independent_and_full_ones_are_swept() {
        let k = KeyedBuckets::new(limit(1, Duration::from_secs(3600), 1));
        assert!(k.take("a").is_none());
        assert!(k.take("a").is_some(), "a is spent");
        assert!(k.take("b").is_none(), "b has its own bucket");
        // Buckets that refilled are swept when enough new keys arrive; spent ones stay.
        let fast = KeyedBuckets::new(limit(1000, Duration::from_millis(1), 1));
        for i in 0..SWEEP_EVERY {
            let _ = fast.take(&i.to_string());
        }
        std::thread::sleep(Duration::from_millis(5));
        let _ = fast.take("last");
        assert!(fast.len() < SWEEP_EVERY, "{} buckets kept", fast.len());
        assert!(k.take("a").is_some(), "a spent bucket is kept");
    }
}
