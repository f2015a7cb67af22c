//! Prometheus metrics: what the gateway counts, and the scrape's text.
//!
//! One registry for the process, every name under `hermes_gateway_` (the process's own
//! resident memory, descriptors and CPU under the conventional `process_` names). Labels are
//! bounded: listener and route templates, names from the configuration, states and kinds
//! from fixed sets — never a session id, a chat id, a path or anything a client sent.
//!
//! HTTP requests are the hot path (a `/health` costs about 10 µs of CPU): they are counted in
//! lock-free counters sharded per thread ([`http`]); everything else uses
//! `prometheus-client`'s metric types. `HERMES_GATEWAY_METRICS=off` turns recording off (the
//! benchmark's baseline); the scrape then shows only what is set once.
//!
//! A leaf: it imports nothing from the rest of the crate.

pub mod http;
mod process;

use std::sync::LazyLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// Label sets: every value is one of a fixed set or a name from the configuration.
type L1 = [(&'static str, &'static str); 1];
type Named = [(&'static str, String); 2];
type NamedDir = [(&'static str, String); 3];

/// Bounds (seconds) of the turn-duration histogram.
const TURN_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Bounds (seconds) of the store's commit histogram: an fsync is 0.1–1 ms.
const COMMIT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

pub struct Metrics {
    registry: Registry,
    // lifecycle
    start_time: Gauge<f64, AtomicU64>,
    supervisor: Family<L1, Gauge>,
    reloads: Family<L1, Counter>,
    drains: Family<L1, Counter>,
    drain_seconds: Counter<f64, AtomicU64>,
    last_drain: Gauge<f64, AtomicU64>,
    // store
    commit_duration: Histogram,
    commits: Counter,
    checkpoint_duration: Histogram,
    fold_duration: Histogram,
    store_errors: Family<L1, Counter>,
    // sessions and runs
    sessions_busy: Gauge,
    runs_queued: Gauge,
    runs_finished: Family<L1, Counter>,
    /// The series a turn touches, resolved once: a family's lookup hashes its labels under
    /// a lock, about a thousand instructions a turn.
    runs_done: [Counter; 3],
    turn_duration: Family<L1, Histogram>,
    turn_by_backend: [(&'static str, std::sync::OnceLock<Histogram>); 3],
    agent_failures: Family<L1, Counter>,
    // deliveries
    deliveries: Family<L1, Gauge>,
    delivery_attempts: Family<L1, Counter>,
    oldest_pending: Gauge<f64, AtomicU64>,
    // platforms
    platform_messages: Family<NamedDir, Counter>,
    platform_backlog: Family<Named, Gauge>,
    platform_up: Family<Named, Gauge>,
    platform_last_success: Family<Named, Gauge<f64, AtomicU64>>,
    // schedules
    schedule_runs: Family<Named, Counter>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
static ENABLED: LazyLock<bool> = LazyLock::new(|| {
    !matches!(
        std::env::var("HERMES_GATEWAY_METRICS").as_deref(),
        Ok("off" | "0" | "false")
    )
});

/// Whether requests, commits and turns are counted (`HERMES_GATEWAY_METRICS=off`: not).
pub fn enabled() -> bool {
    *ENABLED
}

fn m() -> Option<&'static Metrics> {
    enabled().then(|| &*METRICS)
}

fn turn_histogram() -> Histogram {
    Histogram::new(TURN_BUCKETS)
}

impl Metrics {
    fn new() -> Metrics {
        let mut root = Registry::default();
        let r = root.sub_registry_with_prefix("hermes_gateway");
        let info = Info::new([("version", env!("CARGO_PKG_VERSION"))]);
        r.register("build", "The running build (always 1)", info);
        let start_time = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "start_time",
            "When this process started, Unix time",
            Unit::Seconds,
            start_time.clone(),
        );
        let supervisor = Family::<L1, Gauge>::default();
        r.register(
            "supervisor",
            "The service manager the gateway runs under (kind: systemd, launchd, none); always 1",
            supervisor.clone(),
        );
        let reloads = Family::<L1, Counter>::default();
        r.register(
            "reloads",
            "Configuration reloads by result (ok, failed)",
            reloads.clone(),
        );
        let drains = Family::<L1, Counter>::default();
        r.register(
            "drains",
            "Drains by kind (stop, restart), counted across restarts from the state folder",
            drains.clone(),
        );
        let drain_seconds = Counter::<f64, AtomicU64>::default();
        r.register_with_unit(
            "drain_duration",
            "Time spent draining, all drains on this state folder together",
            Unit::Seconds,
            drain_seconds.clone(),
        );
        let last_drain = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "last_drain_duration",
            "How long the last drain on this state folder took (0: none yet)",
            Unit::Seconds,
            last_drain.clone(),
        );
        let commit_duration = Histogram::new(COMMIT_BUCKETS);
        r.register_with_unit(
            "store_commit_duration",
            "Duration of the store's group commits, fsync included",
            Unit::Seconds,
            commit_duration.clone(),
        );
        let commits = Counter::default();
        r.register(
            "store_commits",
            "Group commits of the store",
            commits.clone(),
        );
        let checkpoint_duration = Histogram::new(COMMIT_BUCKETS);
        r.register_with_unit(
            "store_checkpoint_duration",
            "Duration of the WAL checkpoints, run beside the writer (none in a commit)",
            Unit::Seconds,
            checkpoint_duration.clone(),
        );
        let fold_duration = Histogram::new(COMMIT_BUCKETS);
        r.register_with_unit(
            "store_fold_duration",
            "Duration of the folds of the turn log into the sessions' tables, during which the writer commits nothing else",
            Unit::Seconds,
            fold_duration.clone(),
        );
        let store_errors = Family::<L1, Counter>::default();
        r.register(
            "store_errors",
            "Writes and commits the database refused, by kind (full, io, busy, readonly, other)",
            store_errors.clone(),
        );
        let sessions_busy = Gauge::default();
        r.register(
            "sessions_busy",
            "Sessions with a turn running or queued",
            sessions_busy.clone(),
        );
        let runs_queued = Gauge::default();
        r.register(
            "runs_queued",
            "Turns and runs waiting behind another of their session",
            runs_queued.clone(),
        );
        let runs_finished = Family::<L1, Counter>::default();
        r.register(
            "runs_finished",
            "Turns and runs ended, by state (completed, failed, cancelled)",
            runs_finished.clone(),
        );
        let turn_duration = Family::<L1, Histogram>::new_with_constructor(turn_histogram as _);
        r.register_with_unit(
            "turn_duration",
            "Duration of the agent's part of a turn, by agent backend",
            Unit::Seconds,
            turn_duration.clone(),
        );
        let agent_failures = Family::<L1, Counter>::default();
        r.register(
            "agent_failures",
            "Turns the agent failed, by kind (upstream, unreachable, timeout, failed)",
            agent_failures.clone(),
        );
        let deliveries = Family::<L1, Gauge>::default();
        r.register(
            "deliveries",
            "Deliveries (webhook results and chat replies) in the ledger, by state",
            deliveries.clone(),
        );
        let delivery_attempts = Family::<L1, Counter>::default();
        r.register(
            "delivery_attempts",
            "Delivery attempts by result (delivered, retry, failed)",
            delivery_attempts.clone(),
        );
        let oldest_pending = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "delivery_oldest_pending_age",
            "Age of the oldest delivery not yet delivered or failed (0: none)",
            Unit::Seconds,
            oldest_pending.clone(),
        );
        let platform_messages = Family::<NamedDir, Counter>::default();
        r.register(
            "platform_messages",
            "Chat messages by platform, name and direction (in: stored from the platform; out: reply parts sent)",
            platform_messages.clone(),
        );
        let platform_backlog = Family::<Named, Gauge>::default();
        r.register(
            "platform_backlog",
            "Chat messages and replies of a platform not yet answered or delivered",
            platform_backlog.clone(),
        );
        let platform_up = Family::<Named, Gauge>::default();
        r.register(
            "platform_up",
            "1 while the platform's last poll or request succeeded, 0 after an error",
            platform_up.clone(),
        );
        let platform_last_success = Family::<Named, Gauge<f64, AtomicU64>>::default();
        r.register_with_unit(
            "platform_last_success",
            "When a platform last polled or was called successfully, Unix time (0: never)",
            Unit::Seconds,
            platform_last_success.clone(),
        );
        let schedule_runs = Family::<Named, Counter>::default();
        r.register(
            "schedule_runs",
            "Slots of each schedule by outcome (completed, failed, cancelled: its run; skipped: missed while down)",
            schedule_runs.clone(),
        );
        r.register_collector(Box::new(http::Collector));
        root.register_collector(Box::new(process::Collector));

        // Series that must read 0 before anything happens (an alert on a rate needs them).
        for kind in ["full", "io", "busy", "readonly", "other"] {
            let _ = store_errors.get_or_create(&[("kind", kind)]);
        }
        for result in ["ok", "failed"] {
            let _ = reloads.get_or_create(&[("result", result)]);
        }
        let runs_done = ["completed", "failed", "cancelled"]
            .map(|state| runs_finished.get_or_create(&[("state", state)]).clone());
        for kind in ["upstream", "unreachable", "timeout", "failed"] {
            let _ = agent_failures.get_or_create(&[("kind", kind)]);
        }
        for result in ["delivered", "retry", "failed"] {
            let _ = delivery_attempts.get_or_create(&[("result", result)]);
        }
        Metrics {
            registry: root,
            start_time,
            supervisor,
            reloads,
            drains,
            drain_seconds,
            last_drain,
            commit_duration,
            commits,
            checkpoint_duration,
            fold_duration,
            store_errors,
            sessions_busy,
            runs_queued,
            runs_finished,
            runs_done,
            turn_duration,
            turn_by_backend: ["echo", "openai", "command"].map(|b| (b, Default::default())),
            agent_failures,
            deliveries,
            delivery_attempts,
            oldest_pending,
            platform_messages,
            platform_backlog,
            platform_up,
            platform_last_success,
            schedule_runs,
        }
    }
}

/// The scrape: OpenMetrics text when `openmetrics`, else Prometheus text format 0.0.4.
pub fn encode(openmetrics: bool) -> Result<String, std::fmt::Error> {
    let mut out = String::with_capacity(16 * 1024);
    text::encode(&mut out, &METRICS.registry)?;
    Ok(if openmetrics {
        out
    } else {
        to_prometheus_text(&out)
    })
}

/// The content type of [`encode`]'s text.
pub fn content_type(openmetrics: bool) -> &'static str {
    if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    }
}

/// OpenMetrics text as Prometheus text format 0.0.4: a counter family `x` is `x_total` there,
/// an info family `x` a gauge `x_info`; there is no `# UNIT` and no `# EOF`. The encoder
/// writes the samples; this only renames the family in the lines that describe it.
fn to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut kinds = std::collections::HashMap::new();
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some((name, kind)) = rest.split_once(' ')
        {
            kinds.insert(name.to_owned(), kind.to_owned());
        }
    }
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let described = ["# TYPE ", "# HELP "]
            .iter()
            .find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        if let Some((prefix, rest)) = described {
            let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
            let (name, tail) = match kinds.get(name).map(String::as_str) {
                Some("counter") => (format!("{name}_total"), tail),
                Some("info") => (
                    format!("{name}_info"),
                    if prefix == "# TYPE " { "gauge" } else { tail },
                ),
                _ => (name.to_owned(), tail),
            };
            out.push_str(prefix);
            out.push_str(&name);
            out.push(' ');
            out.push_str(tail);
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

// ---- lifecycle ----

/// Once at start: the supervisor kind and the start time.
pub fn started(supervisor: &'static str) {
    let m = &*METRICS;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    m.start_time.set(now);
    m.supervisor.get_or_create(&[("kind", supervisor)]).set(1);
}

pub fn reloaded(ok: bool) {
    METRICS
        .reloads
        .get_or_create(&[("result", if ok { "ok" } else { "failed" })])
        .inc();
}

/// The drains so far on this state folder, this process's start included (they are kept
/// there: each drain ends its process).
pub fn drains_before(kinds: &[(&'static str, u64)], seconds_total: f64, last_seconds: f64) {
    let m = &*METRICS;
    for (kind, n) in kinds {
        m.drains.get_or_create(&[("kind", kind)]).inc_by(*n);
    }
    m.drain_seconds.inc_by(seconds_total);
    m.last_drain.set(last_seconds);
}

// ---- store ----

/// A group commit that succeeded, and how long it took (fsync included).
pub fn store_commit(took: Duration) {
    let Some(m) = m() else { return };
    m.commit_duration.observe(took.as_secs_f64());
    m.commits.inc();
}

/// A WAL checkpoint, done.
pub fn store_checkpoint(took: Duration) {
    let Some(m) = m() else { return };
    m.checkpoint_duration.observe(took.as_secs_f64());
}

/// A fold of the turn log, committed.
pub fn store_fold(took: Duration) {
    let Some(m) = m() else { return };
    m.fold_duration.observe(took.as_secs_f64());
}

/// A write the database refused: `full`, `io`, `busy`, `readonly` or `other`.
pub fn store_error(kind: &'static str) {
    let Some(m) = m() else { return };
    m.store_errors.get_or_create(&[("kind", kind)]).inc();
}

// ---- sessions, runs, agents ----

/// Set at each scrape from the sessions' own counts.
pub fn sessions(busy: usize, queued: usize) {
    let m = &*METRICS;
    m.sessions_busy.set(busy as i64);
    m.runs_queued.set(queued as i64);
}

/// A turn or run ended. `agent`: its backend and how long it ran, when the agent ran;
/// `failure`: the agent's failure kind, when it failed.
pub fn run_finished(
    state: &'static str,
    agent: Option<(&'static str, Duration)>,
    failure: Option<&'static str>,
) {
    let Some(m) = m() else { return };
    match state {
        "completed" => m.runs_done[0].inc(),
        "failed" => m.runs_done[1].inc(),
        "cancelled" => m.runs_done[2].inc(),
        other => m.runs_finished.get_or_create(&[("state", other)]).inc(),
    };
    if let Some((backend, took)) = agent {
        let secs = took.as_secs_f64();
        match m.turn_by_backend.iter().find(|(b, _)| *b == backend) {
            Some((_, h)) => h
                .get_or_init(|| {
                    m.turn_duration
                        .get_or_create(&[("backend", backend)])
                        .clone()
                })
                .observe(secs),
            None => m
                .turn_duration
                .get_or_create(&[("backend", backend)])
                .observe(secs),
        }
    }
    if let Some(kind) = failure {
        m.agent_failures.get_or_create(&[("kind", kind)]).inc();
    }
}

// ---- deliveries ----

/// Set at each scrape from the ledger: deliveries by state, and the oldest open one's age.
pub fn deliveries(by_state: &[(&'static str, i64)], oldest_pending_age: Option<Duration>) {
    let m = &*METRICS;
    for (state, n) in by_state {
        m.deliveries.get_or_create(&[("state", state)]).set(*n);
    }
    m.oldest_pending
        .set(oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()));
}

/// A delivery attempt ended: `delivered`, `retry` (it will be tried again) or `failed`.
pub fn delivery_attempt(result: &'static str) {
    let Some(m) = m() else { return };
    m.delivery_attempts
        .get_or_create(&[("result", result)])
        .inc();
}

// ---- platforms ----

fn named(platform: &str, name: &str) -> Named {
    [("platform", platform.to_owned()), ("name", name.to_owned())]
}

/// `n` messages of a platform instance: `in` (stored) or `out` (reply parts sent).
pub fn platform_messages(platform: &str, name: &str, direction: &'static str, n: u64) {
    let Some(m) = m() else { return };
    m.platform_messages
        .get_or_create(&[
            ("platform", platform.to_owned()),
            ("name", name.to_owned()),
            ("direction", direction.to_owned()),
        ])
        .inc_by(n);
}

/// A platform instance's state, set at each scrape: backlog, whether its last poll or
/// request succeeded, and when one last did (Unix seconds).
pub fn platform_state(platform: &str, name: &str, backlog: i64, up: bool, last_success: f64) {
    let m = &*METRICS;
    let l = named(platform, name);
    m.platform_backlog.get_or_create(&l).set(backlog);
    m.platform_up.get_or_create(&l).set(i64::from(up));
    m.platform_last_success.get_or_create(&l).set(last_success);
    // Both directions read 0 before the first message.
    for d in ["in", "out"] {
        let _ = m.platform_messages.get_or_create(&[
            ("platform", platform.to_owned()),
            ("name", name.to_owned()),
            ("direction", d.to_owned()),
        ]);
    }
}

// ---- schedules ----

/// A schedule's slot ended: its run `completed`, `failed` or was `cancelled`, or the slot
/// was `skipped` (missed while the gateway was down, with `missed = "skip"`).
pub fn schedule_run(schedule: &str, outcome: &'static str) {
    let Some(m) = m() else { return };
    m.schedule_runs
        .get_or_create(&[
            ("schedule", schedule.to_owned()),
            ("outcome", outcome.to_owned()),
        ])
        .inc();
}

/// A configured schedule reads 0 before its first slot.
pub fn schedule_known(schedule: &str) {
    let m = &*METRICS;
    for outcome in ["completed", "failed", "cancelled", "skipped"] {
        let _ = m.schedule_runs.get_or_create(&[
            ("schedule", schedule.to_owned()),
            ("outcome", outcome.to_owned()),
        ]);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prometheus_text_renames_counters_and_infos_and_drops_openmetrics_lines() {
        let om = "# HELP a_b Things.\n# TYPE a_b counter\na_b_total{x=\"1\"} 2\n# HELP v The build.\n# TYPE v info\nv_info{version=\"1\"} 1\n# HELP d Secs.\n# TYPE d histogram\n# UNIT d seconds\nd_count 1\n# EOF\n";
        let t = super::to_prometheus_text(om);
        assert_eq!(
            t,
            "# HELP a_b_total Things.\n# TYPE a_b_total counter\na_b_total{x=\"1\"} 2\n# HELP v_info The build.\n# TYPE v_info gauge\nv_info{version=\"1\"} 1\n# HELP d Secs.\n# TYPE d histogram\nd_count 1\n"
        );
    }
}
