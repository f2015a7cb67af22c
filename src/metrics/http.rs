//! HTTP request metrics, built for the hot path: requests by listener, route and status,
//! durations by listener and route, open connections by listener.
//!
//! A `/health` request costs about 10 µs of CPU, so what it records must cost well under
//! 1 % of that. `prometheus-client`'s histogram takes a mutex per observation, and its
//! families a read lock and a hash of the label set per lookup; on two cores both bounce a
//! cache line between them on every request. Here each counter and histogram is sharded
//! per thread (an uncontended atomic add), the connection keeps the handles it used
//! ([`Cache`]), and the route is a `&'static str` the router tags the request's task with
//! ([`tag_route`]), so a request allocates nothing. The shards are summed at the scrape.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError, RwLock};
use std::time::Duration;

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

/// The route of a request answered before any route matched: an unknown path, or a `/v1`
/// request refused by authentication (which runs before routing).
pub const UNROUTED: &str = "(unrouted)";

/// Bounds (seconds) of the request-duration histogram.
pub const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0, 300.0,
];
const SHARDS: usize = 8;

const BOUNDS_NS: [u64; BUCKETS.len()] = {
    let mut ns = [0u64; BUCKETS.len()];
    let mut i = 0;
    while i < BUCKETS.len() {
        ns[i] = (BUCKETS[i] * 1e9) as u64;
        i += 1;
    }
    ns
};

/// This thread's shard: threads take shards in turn.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

#[repr(align(128))]
#[derive(Default)]
struct CountShard(AtomicU64);

#[derive(Default)]
struct Sharded {
    shards: [CountShard; SHARDS],
}

impl Sharded {
    fn inc(&self, shard: usize) {
        self.shards[shard].0.fetch_add(1, Ordering::Relaxed);
    }
    fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

#[repr(align(128))]
#[derive(Default)]
struct HistShard {
    /// Not cumulative; the last is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

#[derive(Default)]
struct ShardedHistogram {
    shards: [HistShard; SHARDS],
}

impl ShardedHistogram {
    fn observe(&self, shard: usize, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        let i = BOUNDS_NS
            .iter()
            .position(|b| ns <= *b)
            .unwrap_or(BUCKETS.len());
        let s = &self.shards[shard];
        s.buckets[i].fetch_add(1, Ordering::Relaxed);
        s.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Sum (seconds), count and the non-cumulative buckets with their bounds.
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .map(|b| (b, 0))
            .collect();
        let mut sum_ns = 0u64;
        for s in &self.shards {
            for (b, c) in buckets.iter_mut().zip(&s.buckets) {
                b.1 += c.load(Ordering::Relaxed);
            }
            sum_ns = sum_ns.wrapping_add(s.sum_ns.load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        (sum_ns as f64 / 1e9, count, buckets)
    }
}

type RouteKey = (&'static str, &'static str);
type StatusKey = (&'static str, &'static str, u16);

#[derive(Default)]
struct Tables {
    requests: RwLock<HashMap<StatusKey, Arc<Sharded>>>,
    durations: RwLock<HashMap<RouteKey, Arc<ShardedHistogram>>>,
    open: RwLock<HashMap<&'static str, Arc<AtomicI64>>>,
}

static TABLES: LazyLock<Tables> = LazyLock::new(Tables::default);

/// A string kept for the life of the process, once per distinct value: listener names and
/// route templates, a bounded set.
pub fn intern(s: &str) -> &'static str {
    static SET: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Default::default);
    let mut set = SET.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(k) = set.get(s) {
        return k;
    }
    let k: &'static str = Box::leak(s.to_owned().into_boxed_str());
    set.insert(k);
    k
}

fn get_or_insert<K: std::hash::Hash + Eq + Copy, V: Default>(
    map: &RwLock<HashMap<K, Arc<V>>>,
    key: K,
) -> Arc<V> {
    if let Some(v) = map.read().unwrap_or_else(PoisonError::into_inner).get(&key) {
        return v.clone();
    }
    map.write()
        .unwrap_or_else(PoisonError::into_inner)
        .entry(key)
        .or_default()
        .clone()
}

/// The handles of one (listener, route, status).
struct Slot {
    route: &'static str,
    status: u16,
    requests: Arc<Sharded>,
    duration: Arc<ShardedHistogram>,
}

/// What a connection records into: the handles its requests used so far. HTTP/1 answers a
/// connection's requests one at a time, so the lock is never contended.
pub struct Cache {
    listener: &'static str,
    slots: Mutex<Vec<Slot>>,
}

impl Cache {
    pub fn new(listener: &'static str) -> Cache {
        Cache {
            listener,
            slots: Mutex::new(Vec::new()),
        }
    }

    /// A request answered with `status` after `took`, on `route`.
    pub fn record(&self, route: &'static str, status: u16, took: Duration) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        let i = match slots
            .iter()
            .position(|s| s.status == status && std::ptr::eq(s.route, route))
        {
            Some(i) => i,
            None => {
                // A connection sees few routes; a long-lived one with many forgets the oldest.
                if slots.len() >= 16 {
                    slots.remove(0);
                }
                slots.push(Slot {
                    route,
                    status,
                    requests: get_or_insert(&TABLES.requests, (self.listener, route, status)),
                    duration: get_or_insert(&TABLES.durations, (self.listener, route)),
                });
                slots.len() - 1
            }
        };
        let shard = shard();
        slots[i].requests.inc(shard);
        slots[i].duration.observe(shard, took);
    }
}

/// The count of open connections of a listener.
pub fn open_connections(listener: &'static str) -> Arc<AtomicI64> {
    get_or_insert(&TABLES.open, listener)
}

/// A response's route template, put in its extensions by the router when a route
/// matched; read by the connection to label the request's metrics. (A thread-local set
/// during the request's poll lost the tag in release builds on some routes.)
#[derive(Debug, Clone, Copy)]
pub struct RouteLabel(pub &'static str);

/// Encodes the tables at a scrape.
#[derive(Debug)]
pub(super) struct Collector;

fn sorted<K: Ord + Copy, V: Clone>(map: &RwLock<HashMap<K, V>>) -> Vec<(K, V)> {
    let mut v: Vec<(K, V)> = map
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    v.sort_by_key(|e| e.0);
    v
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let t = &*TABLES;
        let mut e = encoder.encode_descriptor(
            "http_requests",
            "HTTP requests answered, by listener, route template and status",
            None,
            MetricType::Counter,
        )?;
        for ((listener, route, status), c) in sorted(&t.requests) {
            let status = status.to_string();
            let labels = [
                ("listener", listener),
                ("route", route),
                ("status", status.as_str()),
            ];
            ConstCounter::new(c.get()).encode(e.encode_family(&labels)?)?;
        }
        let mut e = encoder.encode_descriptor(
            "http_request_duration",
            "Time from a request's headers to its response's head, by listener and route template",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for ((listener, route), h) in sorted(&t.durations) {
            let labels = [("listener", listener), ("route", route)];
            let (sum, count, buckets) = h.snapshot();
            e.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }
        let mut e = encoder.encode_descriptor(
            "http_connections_open",
            "Connections open, by listener",
            None,
            MetricType::Gauge,
        )?;
        for (listener, n) in sorted(&t.open) {
            ConstGauge::new(n.load(Ordering::Relaxed))
                .encode(e.encode_family(&[("listener", listener)])?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_puts_each_duration_in_its_bucket_and_sums_them() {
        let h = ShardedHistogram::default();
        h.observe(0, Duration::from_micros(100)); // ≤ 0.5 ms
        h.observe(3, Duration::from_micros(500)); // ≤ 0.5 ms: bounds are inclusive
        h.observe(7, Duration::from_millis(3)); // ≤ 5 ms
        h.observe(0, Duration::from_secs(400)); // +Inf
        let (sum, count, b) = h.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 400.0036).abs() < 1e-9, "{sum}");
        assert_eq!(b[0], (0.0005, 2));
        assert_eq!(b[3], (0.005, 1));
        assert_eq!(b[BUCKETS.len()], (f64::INFINITY, 1));
        assert_eq!(b.iter().map(|x| x.1).sum::<u64>(), 4);
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let c = Arc::new(Sharded::default());
        let threads: Vec<_> = (0..12)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.inc(shard())))
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.get(), 12_000);
    }

    #[test]
    fn interning_returns_one_string_per_value() {
        let a = intern(&String::from("/v1/x/{id}"));
        let b = intern("/v1/x/{id}");
        assert!(std::ptr::eq(a, b));
    }
}
