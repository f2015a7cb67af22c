//! HTTP/1.1 keep-alive load client for "zero failed requests during restarts" tests.
//!
//! [`LoadClient::start`] runs `concurrency` workers on one dedicated thread (own tokio
//! current_thread runtime, so it can live in another network namespace: see
//! [`LoadClient::start_with`] and `SystemdBox::start_load`). Each worker keeps one keep-alive
//! connection (hyper `client::conn::http1` over a tokio `TcpStream`) and sends `GET path` back to
//! back. A response carrying `Connection: close` (or an HTTP/1.0 response without keep-alive) is
//! honoured: that connection is never reused, the worker reconnects; this is not a failure.
//!
//! Every other problem is counted, never silently retried, by [`FailureKind`]:
//! refused/failed connects, a keep-alive connection the server closed without announcing it
//! (whether hyper noticed before the next request was written, [`FailureKind::IdleClosed`], or
//! after, [`FailureKind::Eof`] / [`FailureKind::Reset`]), timeouts and non-2xx statuses.
//! Latency is measured per successful request, including the connect when the request needed a
//! new connection. The client stops on [`LoadClient::stop`] (in-flight requests finish, bounded
//! by the request timeout) or by itself after `max_duration`.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONNECTION, HOST, HeaderMap};
use hyper::{Request, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// Load parameters; [`LoadConfig::new`] gives the defaults, then set fields.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    /// Server address (e.g. `127.0.0.1:8080` inside the box's netns).
    pub addr: SocketAddr,
    /// Request target, origin-form (`/healthz`).
    pub path: String,
    /// Number of workers = concurrent connections.
    pub concurrency: usize,
    /// Per-request limit, connect included (default 10 s) -> [`FailureKind::Timeout`].
    pub timeout: Duration,
    /// The client stops by itself after this long (default 60 s).
    pub max_duration: Duration,
    /// Pause after a failed connect before the next attempt (default 10 ms).
    pub connect_backoff: Duration,
    /// `Host` header (default: `addr`).
    pub host: String,
    /// How many failures are kept as [`FailureSample`]s (default 100).
    pub max_samples: usize,
}

impl LoadConfig {
    /// Defaults: timeout 10 s, max_duration 60 s, connect_backoff 10 ms, Host = addr.
    pub fn new(addr: SocketAddr, path: &str, concurrency: usize) -> Self {
        LoadConfig {
            addr,
            path: path.to_string(),
            concurrency,
            timeout: Duration::from_secs(10),
            max_duration: Duration::from_secs(60),
            connect_backoff: Duration::from_millis(10),
            host: addr.to_string(),
            max_samples: 100,
        }
    }
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureKind {
    /// Connect got ECONNREFUSED (nothing listening).
    ConnectRefused,
    /// Connect failed otherwise (handshake errors included).
    ConnectError,
    /// The server closed a keep-alive connection whose last response did not say
    /// `Connection: close`, and hyper saw the close before the next request was written.
    IdleClosed,
    /// Connection reset (ECONNRESET / EPIPE) after the request was sent.
    Reset,
    /// EOF before a complete response, on a request that was sent (or on a fresh connection).
    Eof,
    /// No complete response within `timeout` (connect included).
    Timeout,
    /// Complete response with a non-2xx status.
    Status(u16),
    /// Anything else (HTTP parse errors, ...); see the samples.
    Protocol,
}

impl fmt::Display for FailureKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FailureKind::Status(code) => write!(f, "status {code}"),
            other => write!(f, "{other:?}"),
        }
    }
}

/// One recorded failure.
#[derive(Clone, Debug)]
pub struct FailureSample {
    /// Time since the load started.
    pub at: Duration,
    pub kind: FailureKind,
    /// Worker index.
    pub worker: usize,
    /// Whether the request was on a reused (keep-alive) connection.
    pub reused: bool,
    /// Error text (with its source chain).
    pub detail: String,
}

/// What happened; from [`LoadClient::stop`].
#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    /// Requests answered completely with a 2xx status.
    pub ok: u64,
    /// Failed requests (all kinds).
    pub failed: u64,
    pub failures_by_kind: BTreeMap<FailureKind, u64>,
    /// The first `max_samples` failures.
    pub failure_samples: Vec<FailureSample>,
    /// TCP connections established.
    pub connections: u64,
    /// Responses with `Connection: close` after which the connection was dropped, as asked.
    pub closes_honoured: u64,
    /// Wall time the load ran.
    pub elapsed: Duration,
    /// True if it stopped because `max_duration` passed (not by `stop()`).
    pub stopped_by_deadline: bool,
    /// Latency percentiles / max / mean of the `ok` requests.
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
    pub mean: Duration,
}

impl LoadReport {
    /// Failures of one kind.
    pub fn failures(&self, kind: FailureKind) -> u64 {
        self.failures_by_kind.get(&kind).copied().unwrap_or(0)
    }

    /// Successful requests per second.
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Panic (printing the whole report) unless `ok > 0` and nothing failed.
    pub fn assert_clean(&self) {
        assert!(
            self.ok > 0 && self.failed == 0,
            "load was not clean (want ok > 0 and 0 failures):\n{self}"
        );
    }
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "load: {} ok, {} failed in {:.2?} ({:.0} ok/s); {} connections, {} `Connection: close` honoured{}",
            self.ok,
            self.failed,
            self.elapsed,
            self.rps(),
            self.connections,
            self.closes_honoured,
            if self.stopped_by_deadline {
                "; stopped by max_duration"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "latency: p50 {:.2?}, p90 {:.2?}, p99 {:.2?}, max {:.2?}, mean {:.2?}",
            self.p50, self.p90, self.p99, self.max, self.mean
        )?;
        for (kind, n) in &self.failures_by_kind {
            writeln!(f, "failures {kind}: {n}")?;
        }
        const SHOWN: usize = 10;
        for s in self.failure_samples.iter().take(SHOWN) {
            writeln!(
                f,
                "  at {:.3?} worker {} ({} connection): {}: {}",
                s.at,
                s.worker,
                if s.reused { "reused" } else { "new" },
                s.kind,
                s.detail
            )?;
        }
        if self.failed as usize > SHOWN {
            let more = self.failed as usize - SHOWN;
            writeln!(
                f,
                "  ... {more} more (first {} in failure_samples)",
                self.failure_samples.len()
            )?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Stats {
    latencies: Vec<Duration>,
    failures_by_kind: BTreeMap<FailureKind, u64>,
    samples: Vec<FailureSample>,
    connections: u64,
    closes_honoured: u64,
}

struct Shared {
    cfg: LoadConfig,
    start: Instant,
    deadline: Instant,
    stop: AtomicBool,
    deadline_hit: AtomicBool,
    ok: AtomicU64,
    failed: AtomicU64,
    stats: Mutex<Stats>,
}

impl Shared {
    fn stats(&self) -> std::sync::MutexGuard<'_, Stats> {
        // a poisoned lock only means another worker panicked; the counters are still usable
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record_ok(&self, latency: Duration) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.stats().latencies.push(latency);
    }

    fn record_failure(&self, worker: usize, reused: bool, f: Failure) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut st = self.stats();
        *st.failures_by_kind.entry(f.kind).or_insert(0) += 1;
        if st.samples.len() < self.cfg.max_samples {
            st.samples.push(FailureSample {
                at: self.start.elapsed(),
                kind: f.kind,
                worker,
                reused,
                detail: f.detail,
            });
        }
    }

    fn done(&self) -> bool {
        if self.stop.load(Ordering::Relaxed) {
            return true;
        }
        let hit = Instant::now() >= self.deadline;
        if hit {
            self.deadline_hit.store(true, Ordering::Relaxed);
        }
        hit
    }
}

/// A running load; see the module docs.
pub struct LoadClient {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<Option<LoadReport>>>,
}

impl LoadClient {
    /// Start the load from the current network namespace (see [`Self::start_with`]).
    pub fn start(addr: SocketAddr, path: &str, concurrency: usize) -> LoadClient {
        Self::start_with(LoadConfig::new(addr, path, concurrency), || Ok(()))
            .expect("start load client thread")
    }

    /// Start the load with `cfg`; `thread_init` runs first on the load's own thread (e.g.
    /// `move || netns.enter()` to send the load from inside a box); its error is returned.
    pub fn start_with<F>(cfg: LoadConfig, thread_init: F) -> io::Result<LoadClient>
    where
        F: FnOnce() -> io::Result<()> + Send + 'static,
    {
        assert!(cfg.concurrency > 0, "load concurrency must be > 0");
        let start = Instant::now();
        let shared = Arc::new(Shared {
            deadline: start + cfg.max_duration,
            cfg,
            start,
            stop: AtomicBool::new(false),
            deadline_hit: AtomicBool::new(false),
            ok: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            stats: Mutex::new(Stats::default()),
        });
        let (tx, rx) = mpsc::sync_channel::<io::Result<()>>(1);
        let sh = shared.clone();
        let thread = thread::Builder::new()
            .name("load-client".into())
            .spawn(move || {
                if let Err(e) = thread_init() {
                    let _ = tx.send(Err(e));
                    return None;
                }
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return None;
                    }
                };
                let _ = tx.send(Ok(()));
                Some(rt.block_on(run(sh)))
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(LoadClient {
                shared,
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(_) => Err(io::Error::other("load thread ended before starting")),
            },
        }
    }

    /// (ok, failed) so far.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.ok.load(Ordering::Relaxed),
            self.shared.failed.load(Ordering::Relaxed),
        )
    }

    /// Wait until at least `n` requests succeeded; false on timeout.
    pub fn wait_for_ok(&self, n: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.progress().0 < n {
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Stop (in-flight requests finish, bounded by the timeout) and report.
    pub fn stop(mut self) -> LoadReport {
        self.finish()
    }

    /// Wait until the load stops by itself (`max_duration`) and report.
    pub fn join(mut self) -> LoadReport {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Some(report))) => report,
            Some(Ok(None)) | None => LoadReport::default(),
            Some(Err(panic)) => std::panic::resume_unwind(panic),
        }
    }

    fn finish(&mut self) -> LoadReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(Some(report))) => report,
            Some(Ok(None)) | None => LoadReport::default(),
            Some(Err(panic)) => std::panic::resume_unwind(panic),
        }
    }
}

impl Drop for LoadClient {
    fn drop(&mut self) {
        // never leave the thread running after a test panicked
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn run(shared: Arc<Shared>) -> LoadReport {
    let mut set = tokio::task::JoinSet::new();
    for w in 0..shared.cfg.concurrency {
        set.spawn(worker(w, shared.clone()));
    }
    while let Some(r) = set.join_next().await {
        if let Err(e) = r
            && e.is_panic()
        {
            std::panic::resume_unwind(e.into_panic());
        }
    }
    let elapsed = shared.start.elapsed();
    let mut st = shared.stats();
    let mut lat = std::mem::take(&mut st.latencies);
    lat.sort_unstable();
    let pct = |p: f64| -> Duration {
        if lat.is_empty() {
            return Duration::ZERO;
        }
        let rank = ((p / 100.0) * lat.len() as f64).ceil() as usize;
        lat[rank.clamp(1, lat.len()) - 1]
    };
    let mean = if lat.is_empty() {
        Duration::ZERO
    } else {
        lat.iter().sum::<Duration>() / lat.len() as u32
    };
    LoadReport {
        ok: shared.ok.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        failures_by_kind: std::mem::take(&mut st.failures_by_kind),
        failure_samples: std::mem::take(&mut st.samples),
        connections: st.connections,
        closes_honoured: st.closes_honoured,
        elapsed,
        stopped_by_deadline: shared.deadline_hit.load(Ordering::Relaxed),
        p50: pct(50.0),
        p90: pct(90.0),
        p99: pct(99.0),
        max: lat.last().copied().unwrap_or_default(),
        mean,
    }
}

struct Failure {
    kind: FailureKind,
    detail: String,
}

impl Failure {
    fn new(kind: FailureKind, detail: impl Into<String>) -> Self {
        Failure {
            kind,
            detail: detail.into(),
        }
    }
}

type Sender = SendRequest<Empty<Bytes>>;

async fn worker(id: usize, shared: Arc<Shared>) {
    let cfg = &shared.cfg;
    let mut conn: Option<Sender> = None;
    while !shared.done() {
        let t0 = Instant::now();
        let reused = conn.is_some();
        let outcome = tokio::time::timeout(cfg.timeout, request(&shared, &mut conn)).await;
        match outcome {
            Ok(Ok(())) => shared.record_ok(t0.elapsed()),
            Ok(Err(f)) => {
                let connect_failed = matches!(
                    f.kind,
                    FailureKind::ConnectRefused | FailureKind::ConnectError
                );
                shared.record_failure(id, reused, f);
                if connect_failed {
                    tokio::time::sleep(cfg.connect_backoff).await;
                }
            }
            Err(_elapsed) => {
                // the request future was dropped: hyper closes that connection; `conn` is
                // already None because `request` takes the sender out while it works
                conn = None;
                let f = Failure::new(
                    FailureKind::Timeout,
                    format!("no complete response within {:?}", cfg.timeout),
                );
                shared.record_failure(id, reused, f);
            }
        }
    }
}

/// One request. Takes the sender out of `conn` and puts it back only if the connection may be
/// reused (complete response without `Connection: close`).
async fn request(shared: &Shared, conn: &mut Option<Sender>) -> Result<(), Failure> {
    let cfg = &shared.cfg;
    let (mut sender, reused) = match conn.take() {
        Some(s) => (s, true),
        None => (connect(shared).await?, false),
    };
    if reused {
        // waits until hyper has finished with the previous response; errors if the server
        // closed the connection meanwhile (without having announced it)
        if let Err(e) = sender.ready().await {
            return Err(Failure::new(
                FailureKind::IdleClosed,
                format!(
                    "keep-alive connection closed by the server before the next request: {}",
                    chain(&e)
                ),
            ));
        }
    }
    let req = Request::builder()
        .uri(cfg.path.as_str())
        .header(HOST, cfg.host.as_str())
        .body(Empty::<Bytes>::new())
        .map_err(|e| Failure::new(FailureKind::Protocol, format!("bad request: {e}")))?;
    let resp = match sender.try_send_request(req).await {
        Ok(r) => r,
        Err(mut e) => {
            let unsent = e.take_message().is_some();
            let e = e.into_error();
            return Err(if unsent && reused {
                Failure::new(
                    FailureKind::IdleClosed,
                    format!(
                        "keep-alive connection closed by the server before the request was written: {}",
                        chain(&e)
                    ),
                )
            } else if unsent {
                Failure::new(
                    FailureKind::Eof,
                    format!(
                        "new connection closed before the request was written: {}",
                        chain(&e)
                    ),
                )
            } else {
                classify(&e)
            });
        }
    };
    let status = resp.status();
    let close = wants_close(resp.version(), resp.headers());
    if let Err(e) = resp.into_body().collect().await {
        return Err(classify(&e));
    }
    if close {
        shared.stats().closes_honoured += 1;
    } else {
        *conn = Some(sender);
    }
    if !status.is_success() {
        return Err(Failure::new(
            FailureKind::Status(status.as_u16()),
            format!("status {status}"),
        ));
    }
    Ok(())
}

async fn connect(shared: &Shared) -> Result<Sender, Failure> {
    let addr = shared.cfg.addr;
    let stream = TcpStream::connect(addr).await.map_err(|e| {
        let kind = if e.kind() == io::ErrorKind::ConnectionRefused {
            FailureKind::ConnectRefused
        } else {
            FailureKind::ConnectError
        };
        Failure::new(kind, format!("connect {addr}: {e}"))
    })?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| {
            Failure::new(
                FailureKind::ConnectError,
                format!("handshake: {}", chain(&e)),
            )
        })?;
    // connection errors surface through the request futures
    tokio::spawn(async move {
        let _ = connection.await;
    });
    shared.stats().connections += 1;
    Ok(sender)
}

/// Does this response ask us not to reuse the connection?
fn wants_close(version: Version, headers: &HeaderMap) -> bool {
    let has = |token: &str| {
        headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if version <= Version::HTTP_10 {
        !has("keep-alive")
    } else {
        has("close")
    }
}

/// Classify a hyper error on a request that was (at least partly) sent.
fn classify(e: &hyper::Error) -> Failure {
    let detail = chain(e);
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            let kind = match io.kind() {
                io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
                | io::ErrorKind::BrokenPipe => FailureKind::Reset,
                io::ErrorKind::UnexpectedEof => FailureKind::Eof,
                io::ErrorKind::TimedOut => FailureKind::Timeout,
                _ => FailureKind::Protocol,
            };
            return Failure::new(kind, detail);
        }
        src = s.source();
    }
    let kind = if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        FailureKind::Eof
    } else if e.is_timeout() {
        FailureKind::Timeout
    } else {
        FailureKind::Protocol
    };
    Failure::new(kind, detail)
}

/// An error and its sources, ": "-joined.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s += &format!(": {x}");
        src = x.source();
    }
    s
}
