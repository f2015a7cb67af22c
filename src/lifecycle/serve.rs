//! Serves an HTTP service on a listener and obeys the drain. Knows connections, not routes.
//!
//! During a drain a keep-alive connection is not simply closed: its client may be writing
//! its next request right now (the race behind nginx/nginx#437 and haproxy/haproxy#3472).
//! Every response from then on carries `Connection: close`, and an idle connection gets
//! `idle_grace` to send one more request before it is closed.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::body::Body;
use http::{HeaderValue, Request, Response, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::ServiceExt;

use super::drain::{ConnectionTracker, Shutdown};
use super::listeners::{Listener, Socket};

/// What a handler may want to know about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: Arc<str>,
}

/// The id given to each request (also returned as `x-request-id`).
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

/// Bound on the time a client may take to send request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// Unique across re-execs of the same PID: the image's start time is part of the id.
static IMAGE_NONCE: std::sync::LazyLock<u64> = std::sync::LazyLock::new(|| {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64 & 0xffff_ffff)
});

fn next_request_id() -> Arc<str> {
    let n = REQUEST_SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{:08x}-{n:x}", std::process::id(), *IMAGE_NONCE).into()
}

/// Accepts on `listener` until the drain begins, serving each connection with `router`.
pub fn spawn(
    listener: Listener,
    router: axum::Router,
    shutdown: Shutdown,
    tracker: Arc<ConnectionTracker>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let name: Arc<str> = listener.name.as_str().into();
    Ok(match listener.socket {
        Socket::Tcp(std) => {
            std.set_nonblocking(true)?;
            let l = Arc::new(tokio::net::TcpListener::from_std(std)?);
            tokio::spawn(accept_loop(name, shutdown, tracker, router, move || {
                let l = l.clone();
                async move {
                    let (s, peer) = l.accept().await?;
                    let _ = s.set_nodelay(true);
                    Ok((s, peer.to_string()))
                }
            }))
        }
        Socket::Unix(std) => {
            std.set_nonblocking(true)?;
            let l = Arc::new(tokio::net::UnixListener::from_std(std)?);
            tokio::spawn(accept_loop(name, shutdown, tracker, router, move || {
                let l = l.clone();
                async move {
                    let (s, _) = l.accept().await?;
                    let peer = match s.peer_cred() {
                        Ok(c) => format!("unix:pid={}", c.pid().unwrap_or(0)),
                        Err(_) => "unix".to_owned(),
                    };
                    Ok((s, peer))
                }
            }))
        }
    })
}

async fn accept_loop<S, F, Fut>(
    name: Arc<str>,
    mut shutdown: Shutdown,
    tracker: Arc<ConnectionTracker>,
    router: axum::Router,
    mut accept: F,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(S, String)>>,
{
    loop {
        tokio::select! {
            biased;
            _ = shutdown.started() => break,
            r = accept() => match r {
                Ok((stream, peer)) => {
                    // Counted here, not when the task first runs: the drain must see every
                    // connection that was accepted.
                    let guard = tracker.open();
                    let conn = Connection {
                        info: ConnInfo { listener: name.clone(), peer: peer.into() },
                        router: router.clone(),
                        shutdown: shutdown.clone(),
                        tracker: tracker.clone(),
                    };
                    tokio::spawn(conn.run(stream, guard));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // Returning drops our copy of the listening socket: a socket the service manager holds
    // keeps queueing connections in its backlog for the next process.
    tracing::debug!(listener = %name, "stopped accepting");
}

struct Connection {
    info: ConnInfo,
    router: axum::Router,
    shutdown: Shutdown,
    tracker: Arc<ConnectionTracker>,
}

impl Connection {
    async fn run<S>(self, stream: S, _guard: super::drain::ConnectionGuard)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut shutdown = self.shutdown.clone();
        let info = self.info.clone();
        let router = self.router.clone();
        let draining = self.shutdown.clone();
        let tracker = self.tracker.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            handle(
                req,
                info.clone(),
                router.clone(),
                draining.clone(),
                tracker.clone(),
            )
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), service);
        tokio::pin!(conn);

        let idle_grace = tokio::select! {
            _ = conn.as_mut() => return,
            (_, grace) = shutdown.started() => grace,
        };
        // Draining: responses now say `Connection: close`. Let an idle client send one
        // more request before the connection is closed under it.
        tokio::select! {
            _ = conn.as_mut() => return,
            _ = tokio::time::sleep(idle_grace) => conn.as_mut().graceful_shutdown(),
        }
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = shutdown.deadline() => {
                tracing::warn!(listener = %self.info.listener, peer = %self.info.peer,
                    "drain deadline reached; closing connection");
            }
        }
    }
}

async fn handle(
    mut req: Request<Incoming>,
    info: ConnInfo,
    router: axum::Router,
    shutdown: Shutdown,
    tracker: Arc<ConnectionTracker>,
) -> Result<Response<Body>, Infallible> {
    let started = std::time::Instant::now();
    let id = next_request_id();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    req.extensions_mut().insert(info.clone());
    req.extensions_mut().insert(RequestId(id.clone()));
    tracker.count_request();
    let mut resp = match router.oneshot(req.map(Body::new)).await {
        Ok(r) => r,
        Err(never) => match never {},
    };
    if shutdown.is_draining() {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    tracing::info!(
        target: "access",
        request_id = %id,
        listener = %info.listener,
        peer = %info.peer,
        method = %method,
        path = %path,
        status,
        duration_ms = format_args!("{duration_ms:.3}"),
        "{method} {path} {status} {duration_ms:.1}ms"
    );
    Ok(resp)
}
