//! The load the lifecycle benchmark keeps running through restarts: keep-alive
//! connections doing `GET /health`, each pausing between requests (a light load) and
//! reconnecting when the server closes it. Unlike the closed-loop generator of `mod.rs`,
//! it counts every request that was sent and got no 200 as failed, by kind and time, and
//! sends again a request that was never written because the connection was already
//! closing (what any HTTP client does). Only the lifecycle benchmark includes this file.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::TrySendError;
use hyper_util::rt::TokioIo;

/// How long a request may wait for its answer ("no response within 2 s").
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Default)]
struct LoadStats {
    ok: AtomicU64,
    failed: AtomicU64,
    connections: AtomicU64,
    /// Requests not written because the connection was already closing; sent again on a
    /// new connection (what any HTTP client does).
    retried_unsent: AtomicU64,
    kinds: Mutex<BTreeMap<String, u64>>,
    /// When each failure happened, to place it relative to the restarts.
    failed_at: Mutex<Vec<Instant>>,
}

impl LoadStats {
    fn fail(&self, kind: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut k) = self.kinds.lock() {
            *k.entry(kind).or_default() += 1;
        }
        if let Ok(mut t) = self.failed_at.lock() {
            t.push(Instant::now());
        }
    }
}

pub struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<LoadStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub ok: u64,
    pub failed: u64,
    pub connections: u64,
    pub retried_unsent: u64,
    pub kinds: BTreeMap<String, u64>,
    pub failed_at: Vec<Instant>,
    pub seconds: f64,
}

impl Load {
    /// `connections` clients of `addr`, each pausing `pause` between two requests.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        addr: SocketAddr,
        connections: usize,
        pause: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LoadStats::default());
        let tasks = (0..connections)
            .map(|_| rt.spawn(client(addr, pause, stop.clone(), stats.clone())))
            .collect();
        Load {
            stop,
            stats,
            tasks,
            started: Instant::now(),
        }
    }

    pub fn finish(self, rt: &tokio::runtime::Runtime) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64();
        rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            for t in self.tasks {
                let abort = t.abort_handle();
                if tokio::time::timeout_at(deadline, t).await.is_err() {
                    abort.abort();
                }
            }
        });
        let s = &self.stats;
        LoadReport {
            ok: s.ok.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            connections: s.connections.load(Ordering::Relaxed),
            retried_unsent: s.retried_unsent.load(Ordering::Relaxed),
            kinds: s.kinds.lock().map(|k| k.clone()).unwrap_or_default(),
            failed_at: s.failed_at.lock().map(|k| k.clone()).unwrap_or_default(),
            seconds,
        }
    }
}

/// One keep-alive connection doing `GET /health` in a loop; reconnects when the server
/// closes it. Every request that was sent and got no 200 counts as failed.
async fn client(addr: SocketAddr, pause: Duration, stop: Arc<AtomicBool>, stats: Arc<LoadStats>) {
    let mut pending: Option<http::Request<Empty<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        let stream =
            match tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    stats.fail(format!("connect: {:?}", e.kind()));
                    pending = None;
                    tokio::time::sleep(pause).await;
                    continue;
                }
                Err(_) => {
                    stats.fail("connect: timeout".into());
                    pending = None;
                    continue;
                }
            };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => {
                    stats.fail(format!("handshake: {}", classify(&e)));
                    pending = None;
                    continue;
                }
            };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut nth = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // The server closed the connection between requests (`Connection: close`, or an
            // idle close it announced): nothing was sent, open a new one.
            if sender.ready().await.is_err() {
                break;
            }
            let req = match pending.take() {
                Some(r) => r,
                None => match health_request() {
                    Ok(r) => r,
                    Err(e) => {
                        stats.fail(format!("building the request: {e}"));
                        tokio::time::sleep(pause).await;
                        continue;
                    }
                },
            };
            let exchange = async {
                let resp = sender.try_send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await;
                Ok::<_, TrySendError<http::Request<Empty<Bytes>>>>(body.map(|_| status))
            };
            nth += 1;
            let on = if nth == 1 {
                "1st request on a new connection"
            } else {
                "later request on a keep-alive connection"
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(Ok(status))) if status == http::StatusCode::OK => {
                    stats.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(Ok(status))) => stats.fail(format!("status {status}, {on}")),
                Ok(Ok(Err(e))) => {
                    stats.fail(format!("response body: {}, {on}", classify(&e)));
                    break;
                }
                Ok(Err(mut e)) => {
                    if let Some(unsent) = e.take_message() {
                        stats.retried_unsent.fetch_add(1, Ordering::Relaxed);
                        pending = Some(unsent);
                    } else {
                        stats.fail(format!("{}, {on}", classify(e.error())));
                    }
                    break;
                }
                Err(_) => {
                    stats.fail(format!("no response within 2 s, {on}"));
                    break;
                }
            }
            tokio::time::sleep(pause).await;
        }
        driver.abort();
    }
}

fn health_request() -> Result<http::Request<Empty<Bytes>>, http::Error> {
    http::Request::get("/health")
        .header(http::header::HOST, "127.0.0.1")
        .body(Empty::new())
}

fn classify(e: &hyper::Error) -> String {
    let kind = if e.is_incomplete_message() {
        "connection closed before the response"
    } else if e.is_canceled() {
        "canceled"
    } else if e.is_closed() {
        "connection closed"
    } else if e.is_parse() {
        "parse error"
    } else if e.is_timeout() {
        "timeout"
    } else {
        "error"
    };
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return format!("{kind} ({:?})", io.kind());
        }
        source = s.source();
    }
    kind.to_owned()
}
