//! Serves an HTTP service on a listener and obeys the drain. Knows connections, not routes.
//!
//! During a drain a keep-alive connection is not simply closed: its client may be writing
//! its next request right now (the race behind nginx/nginx#437 and haproxy/haproxy#3472).
//! Every response from then on carries `Connection: close`, and an idle connection gets
//! `idle_grace` to send one more request before it is closed.

use std::convert::Infallible;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use axum::body::Body;
use http::{HeaderValue, Request, Response, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::ServiceExt;

use super::drain::{ConnectionTracker, Shutdown};
use super::listeners::{Listener, Socket};
use crate::metrics::http as http_metrics;

/// What a handler may want to know about the connection a request came on.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub listener: Arc<str>,
    pub peer: Arc<str>,
}

/// Fields the service wants on a request's access-log line (journald `SESSION_KEY`,
/// `RUN_ID`), put into the response's extensions.
#[derive(Debug, Clone, Default)]
pub struct LogFields {
    pub session_key: Option<String>,
    pub run_id: Option<String>,
}

/// The id given to each request (also returned as `x-request-id`).
#[derive(Debug, Clone)]
pub struct RequestId(pub Arc<str>);

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// The part of request ids that is the same for the whole process image: the PID and
/// the image's start time, so ids stay unique across re-execs of the same PID. Computed
/// once (getpid(2) is a system call).
static ID_PREFIX: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64 & 0xffff_ffff);
    format!("{:x}{nonce:08x}", std::process::id())
});

fn next_request_id() -> Arc<str> {
    let n = REQUEST_SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{}-{n:x}", *ID_PREFIX).into()
}

/// Accepts on `listener` until the drain begins, serving each connection with `router`.
/// With `limit`, a connection is accepted only once it has a permit: beyond the limit,
/// new connections wait in the kernel's backlog instead of being accepted and starved.
pub fn spawn(
    listener: Listener,
    router: axum::Router,
    shutdown: Shutdown,
    tracker: Arc<ConnectionTracker>,
    header_timeout: Duration,
    limit: Option<Arc<Semaphore>>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let name: Arc<str> = listener.name.as_str().into();
    let ctx = LoopContext {
        name,
        shutdown,
        tracker,
        router,
        header_timeout,
        limit,
    };
    Ok(match listener.socket {
        Socket::Tcp(std) => {
            std.set_nonblocking(true)?;
            let l = Arc::new(tokio::net::TcpListener::from_std(std)?);
            tokio::spawn(accept_loop(ctx, move || {
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
            tokio::spawn(accept_loop(ctx, move || {
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

struct LoopContext {
    name: Arc<str>,
    shutdown: Shutdown,
    tracker: Arc<ConnectionTracker>,
    router: axum::Router,
    header_timeout: Duration,
    limit: Option<Arc<Semaphore>>,
}

/// After answering a request whose body it did not read to its end (an early 413, a 404
/// or 401 to a POST), a connection is not simply closed: closing a socket with unread
/// data makes the kernel answer the client's next segment with a reset, which may reach
/// the client before it has read the answer (it sees `ECONNRESET`, not the 413). As
/// nginx's `lingering_close`: stop writing (the client reads the answer, then the end),
/// read and discard what still arrives, at most `LINGER_TIMEOUT` between two reads and
/// `LINGER_TIME` in all (nginx's defaults), then close. A drain ends it at once.
const LINGER_TIMEOUT: Duration = Duration::from_secs(5);
const LINGER_TIME: Duration = Duration::from_secs(30);

/// Accept failures (EMFILE, ENFILE, ENOBUFS…) come in bursts: one warning per this
/// period, with the count of those not logged.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

async fn accept_loop<S, F, Fut>(ctx: LoopContext, mut accept: F)
where
    S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(S, String)>>,
{
    let LoopContext {
        name,
        mut shutdown,
        tracker,
        router,
        header_timeout,
        limit,
    } = ctx;
    let mut last_warning: Option<tokio::time::Instant> = None;
    let mut unlogged = 0u64;
    let metrics = crate::metrics::enabled().then(|| {
        let listener = http_metrics::intern(&name);
        (listener, http_metrics::open_connections(listener))
    });
    loop {
        let permit = match &limit {
            None => None,
            Some(sem) => tokio::select! {
                biased;
                _ = shutdown.started() => break,
                p = sem.clone().acquire_owned() => match p {
                    Ok(p) => Some(p),
                    Err(_) => break,
                },
            },
        };
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
                        metrics: metrics.as_ref().map(|(l, open)| Metrics::open(l, open)),
                        router: router.clone(),
                        shutdown: shutdown.clone(),
                        tracker: tracker.clone(),
                        header_timeout,
                    };
                    tokio::spawn(conn.run(stream, guard, permit));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning, and say so once
                    // per period, not once per failure.
                    let now = tokio::time::Instant::now();
                    if last_warning.is_none_or(|t| now.duration_since(t) >= ACCEPT_WARN_EVERY) {
                        let more = if unlogged > 0 {
                            format!(" ({unlogged} more failures since the last warning)")
                        } else {
                            String::new()
                        };
                        tracing::warn!(listener = %name, "accept failed: {e}{more}; backing off");
                        last_warning = Some(now);
                        unlogged = 0;
                    } else {
                        unlogged += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // Returning drops our copy of the listening socket: a socket the service manager holds
    // keeps queueing connections in its backlog for the next process.
    tracing::debug!(listener = %name, "stopped accepting");
}

/// A connection's metrics: its place in the open count, and the handles its requests use.
struct Metrics {
    open: Arc<std::sync::atomic::AtomicI64>,
    cache: Arc<http_metrics::Cache>,
}

impl Metrics {
    fn open(listener: &'static str, open: &Arc<std::sync::atomic::AtomicI64>) -> Metrics {
        open.fetch_add(1, Ordering::Relaxed);
        Metrics {
            open: open.clone(),
            cache: Arc::new(http_metrics::Cache::new(listener)),
        }
    }
}

impl Drop for Metrics {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Connection {
    info: ConnInfo,
    metrics: Option<Metrics>,
    router: axum::Router,
    shutdown: Shutdown,
    tracker: Arc<ConnectionTracker>,
    header_timeout: Duration,
}

impl Connection {
    /// Serves the connection; `_permit` is its place under `[gateway] max_connections`,
    /// given back when it ends.
    async fn run<S>(
        self,
        stream: S,
        _guard: super::drain::ConnectionGuard,
        _permit: Option<OwnedSemaphorePermit>,
    ) where
        S: AsyncRead + AsyncWrite + AsFd + Unpin + Send + 'static,
    {
        // A second handle on the socket, to answer 408 after hyper gave up on the headers.
        let late_writer = stream
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(std::fs::File::from);
        let stream = Watched::new(stream);
        let unanswered = stream.unanswered.clone();
        let unread = Arc::new(AtomicBool::new(false));
        let unread_seen = unread.clone();
        let mut shutdown = self.shutdown.clone();
        let info = self.info.clone();
        let router = self.router.clone();
        let draining = self.shutdown.clone();
        let tracker = self.tracker.clone();
        let cache = self.metrics.as_ref().map(|m| m.cache.clone());
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            // A new request: what an earlier one left unread was drained by hyper.
            unread.store(false, Ordering::Relaxed);
            let req = req.map(|body| Tracked {
                inner: body,
                ended: false,
                unread: unread.clone(),
            });
            handle(
                req,
                info.clone(),
                router.clone(),
                draining.clone(),
                tracker.clone(),
                cache.clone(),
            )
        });
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            .serve_connection(TokioIo::new(stream), service);
        // Served in a block of its own, so that hyper's handle on the socket is closed when
        // it returns: `late_writer` is then the last one.
        let ended = async {
            tokio::pin!(conn);
            let idle_grace = tokio::select! {
                r = conn.as_mut() => return Some(r),
                (_, grace) = shutdown.started() => grace,
            };
            // Draining: responses now say `Connection: close`. Let an idle client send one
            // more request before the connection is closed under it.
            tokio::select! {
                r = conn.as_mut() => return Some(r),
                _ = tokio::time::sleep(idle_grace) => conn.as_mut().graceful_shutdown(),
            }
            tokio::select! {
                r = conn.as_mut() => Some(r),
                _ = shutdown.deadline() => {
                    tracing::warn!(listener = %self.info.listener, peer = %self.info.peer,
                        "drain deadline reached; closing connection");
                    None
                }
            }
        }
        .await;
        match ended {
            Some(Err(e)) if e.is_timeout() && unanswered.load(Ordering::Relaxed) => {
                // Part of a request arrived, but not its headers in time: say so.
                request_timeout(late_writer, &self.info, self.header_timeout);
            }
            Some(Ok(())) if unread_seen.load(Ordering::Relaxed) => {
                if let Some(socket) = late_writer {
                    tokio::select! {
                        _ = linger(socket) => {}
                        _ = shutdown.started() => {}
                    }
                }
            }
            _ => {}
        }
    }
}

/// A request's body, noting when it is dropped before its end (see [`LINGER_TIME`]).
struct Tracked {
    inner: Incoming,
    ended: bool,
    unread: Arc<AtomicBool>,
}

impl http_body::Body for Tracked {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) {
            self.ended = true;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        use http_body::Body as _;
        if !self.ended && !self.inner.is_end_stream() {
            self.unread.store(true, Ordering::Relaxed);
        }
    }
}

/// Ends a connection whose last request was not read to its end: no more writing, then
/// what the client still sends is read and discarded until it closes, or for at most
/// [`LINGER_TIMEOUT`] without data and [`LINGER_TIME`] in all. `socket`: the last handle.
async fn linger(socket: std::fs::File) {
    use nix::sys::socket::{AddressFamily, Shutdown, SockaddrLike, SockaddrStorage};
    use std::os::fd::{AsRawFd, OwnedFd};
    use tokio::io::AsyncReadExt;
    let fd = OwnedFd::from(socket);
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), Shutdown::Write);
    let unix = nix::sys::socket::getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.family())
        == Some(AddressFamily::Unix);
    // The descriptor is already non-blocking (it shares the accepted socket's flags).
    let stream: std::io::Result<Box<dyn AsyncRead + Unpin + Send>> = if unix {
        tokio::net::UnixStream::from_std(fd.into()).map(|s| Box::new(s) as _)
    } else {
        tokio::net::TcpStream::from_std(fd.into()).map(|s| Box::new(s) as _)
    };
    let Ok(mut stream) = stream else {
        return;
    };
    let end = tokio::time::Instant::now() + LINGER_TIME;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let until = end.min(tokio::time::Instant::now() + LINGER_TIMEOUT);
        match tokio::time::timeout_at(until, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // The client closed, the socket failed, or the time is up.
            _ => return,
        }
    }
}

/// Writes a 408 on a connection whose request headers did not arrive in time. Best effort:
/// the socket is non-blocking and the answer small; the connection closes right after.
fn request_timeout(writer: Option<std::fs::File>, info: &ConnInfo, limit: Duration) {
    use std::io::Write;
    let body = format!(
        "{{\"error\":{{\"message\":\"request headers not received within {limit:?}\",\"type\":\"request_timeout\",\"code\":408}}}}"
    );
    let raw = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    if let Some(mut w) = writer {
        let _ = w.write_all(raw.as_bytes());
    }
    tracing::info!(
        target: "access",
        listener = %info.listener,
        peer = %info.peer,
        status = 408u16,
        "request headers not received within {limit:?}: 408"
    );
}

/// The stream hyper reads, noting whether bytes arrived that no response has followed yet
/// (a request in progress, as opposed to an idle keep-alive connection).
struct Watched<S> {
    inner: S,
    unanswered: Arc<AtomicBool>,
}

impl<S> Watched<S> {
    fn new(inner: S) -> Self {
        Watched {
            inner,
            unanswered: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.unanswered.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.unanswered.store(false, Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.unanswered.store(false, Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

async fn handle(
    mut req: Request<Tracked>,
    info: ConnInfo,
    router: axum::Router,
    shutdown: Shutdown,
    tracker: Arc<ConnectionTracker>,
    metrics: Option<Arc<http_metrics::Cache>>,
) -> Result<Response<Body>, Infallible> {
    let started = std::time::Instant::now();
    let id = next_request_id();
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    req.extensions_mut().insert(info.clone());
    req.extensions_mut().insert(RequestId(id.clone()));
    tracker.count_request();
    let resp = router.oneshot(req.map(Body::new)).await;
    let mut resp = match resp {
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
    let took = started.elapsed();
    if let Some(m) = metrics {
        let route = resp
            .extensions()
            .get::<http_metrics::RouteLabel>()
            .map_or(http_metrics::UNROUTED, |r| r.0);
        m.record(route, status, took);
    }
    let duration_ms = took.as_secs_f64() * 1000.0;
    let fields = resp.extensions().get::<LogFields>();
    tracing::info!(
        target: "access",
        request_id = %id,
        listener = %info.listener,
        peer = %info.peer,
        session_key = fields.and_then(|f| f.session_key.as_deref()),
        run_id = fields.and_then(|f| f.run_id.as_deref()),
        method = %method,
        path = %path,
        status,
        duration_ms = format_args!("{duration_ms:.3}"),
        "{method} {path} {status} {duration_ms:.1}ms"
    );
    Ok(resp)
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_start_with_the_pid_and_never_repeat() {
        let a = super::next_request_id();
        let b = super::next_request_id();
        assert_ne!(a, b);
        let pid = format!("{:x}", std::process::id());
        assert!(a.starts_with(&pid), "{a} starts with the PID {pid}");
        let (prefix_a, _) = a.rsplit_once('-').unwrap();
        let (prefix_b, _) = b.rsplit_once('-').unwrap();
        assert_eq!(prefix_a, prefix_b, "one prefix per process image");
    }
}
