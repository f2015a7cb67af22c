//! Server-sent events: a response body fed from a channel, the `: keepalive` comment sent
//! after `[api] keepalive` of silence, and the `gateway_restarting` error that ends every
//! stream still open just before the drain deadline.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::response::Response;
use http::{HeaderValue, StatusCode, header};
use hyper::body::Frame;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::gateway::error::ApiError;
use crate::lifecycle::Shutdown;

/// How long before the drain deadline a stream is ended, so the event reaches the client
/// before the lifecycle closes the connection.
pub const RESTART_MARGIN: Duration = Duration::from_millis(200);

/// A body that sends what arrives on a channel, and ends when the sender is dropped.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A body that also drives the future feeding its channel: both are polled by the
/// connection's own task, so a stream costs no task, cross-thread wake-up or hand-over of
/// its own. Dropping the body (the client went away) drops the future.
struct DrivenBody {
    rx: mpsc::Receiver<Bytes>,
    feed: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    /// The first piece, when it was read before the response was returned (`primed`).
    first: Option<Bytes>,
}

impl DrivenBody {
    fn poll_piece(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if let Some(b) = self.first.take() {
            return Poll::Ready(Some(b));
        }
        if let Some(f) = self.feed.as_mut()
            && f.as_mut().poll(cx).is_ready()
        {
            // Its sender is dropped with it: what it sent is read, then the end.
            self.feed = None;
        }
        self.rx.poll_recv(cx)
    }
}

impl http_body::Body for DrivenBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.poll_piece(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A `text/event-stream` response fed by the future `feed` builds from a sender, driven
/// by the body itself (see `DrivenBody`). The feed runs first, for up to `wait`, until it
/// sends its first piece: the response's head then goes out with that piece in one write,
/// and a stream that is over by then (its feed sent everything at once) costs the client
/// one wake-up.
pub async fn primed<F, Fut>(feed: F, wait: Duration) -> Response
where
    F: FnOnce(mpsc::Sender<Bytes>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    let mut body = DrivenBody {
        rx,
        feed: Some(Box::pin(feed(tx))),
        first: None,
    };
    let first = tokio::time::timeout(wait, std::future::poll_fn(|cx| body.poll_piece(cx))).await;
    if let Ok(first) = first {
        // `None`: the feed ended without a word; the body is then empty.
        body.first = first;
    }
    stream_response(Body::new(body))
}

/// A `text/event-stream` response and the sender that feeds it. A send fails once the
/// client has gone.
pub fn response() -> (mpsc::Sender<Bytes>, Response) {
    let (tx, rx) = mpsc::channel(64);
    (tx, stream_response(Body::new(ChannelBody(rx))))
}

fn stream_response(body: Body) -> Response {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

/// One event: optional `id:` and `event:` lines, then `data:`.
pub fn event(id: Option<i64>, name: Option<&str>, data: &str) -> Bytes {
    let mut s = String::with_capacity(data.len() + 48);
    if let Some(id) = id {
        s.push_str(&format!("id: {id}\n"));
    }
    if let Some(n) = name {
        s.push_str("event: ");
        s.push_str(n);
        s.push('\n');
    }
    for line in data.split('\n') {
        s.push_str("data: ");
        s.push_str(line);
        s.push('\n');
    }
    s.push('\n');
    Bytes::from(s)
}

/// What a stream cut by a restart or stop says.
pub const RESTARTING_MESSAGE: &str = "the gateway is restarting; retry the request (a run goes on after the restart: GET /v1/runs/{id}/events)";

/// The error object of a stream cut by a restart or stop (OpenAI's shape: `code` is a
/// string or null).
pub fn restarting_error() -> serde_json::Value {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "gateway_restarting",
        RESTARTING_MESSAGE,
    )
    .body()["error"]
        .clone()
}

/// The error event that ends a run's event stream cut by a restart or stop.
pub fn restarting_event() -> Bytes {
    let data = serde_json::json!({ "error": restarting_error() });
    event(None, Some("error"), &data.to_string())
}

/// The SSE comment sent on a stream that has been silent for `[api] keepalive`, so that
/// clients and proxies with a read timeout keep it open.
pub fn keepalive_comment() -> Bytes {
    Bytes::from_static(b": keepalive\n\n")
}

/// The silence of a stream: [`Idle::elapsed`] resolves once nothing was sent for the
/// keepalive interval; [`Idle::reset`] after each send.
pub struct Idle {
    sleep: Pin<Box<tokio::time::Sleep>>,
    every: Duration,
}

impl Idle {
    pub fn new(every: Duration) -> Self {
        Idle::first_after(every, every)
    }

    /// Resolves first after `first`, then after each `every` of silence.
    pub fn first_after(first: Duration, every: Duration) -> Self {
        Idle {
            sleep: Box::pin(tokio::time::sleep(first)),
            every,
        }
    }

    pub fn reset(&mut self) {
        self.sleep.as_mut().reset(Instant::now() + self.every);
    }

    pub async fn elapsed(&mut self) {
        self.sleep.as_mut().await;
    }
}

/// Resolves `RESTART_MARGIN` before the drain deadline (at once if that has passed).
/// Polls, because a second stop signal moves the deadline earlier.
pub async fn restart_notice(mut shutdown: Shutdown) {
    loop {
        let (deadline, _) = shutdown.started().await;
        let now = Instant::now();
        let at = deadline.checked_sub(RESTART_MARGIN).unwrap_or(deadline);
        if now >= at {
            return;
        }
        tokio::time::sleep((at - now).min(Duration::from_millis(100))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_restarting_event_is_an_openai_error_with_a_null_code() {
        let raw = restarting_event();
        let text = std::str::from_utf8(&raw).unwrap();
        let data = text.lines().find_map(|l| l.strip_prefix("data: ")).unwrap();
        assert!(text.starts_with("event: error\n"), "{text}");
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["error"]["type"], "gateway_restarting");
        assert!(v["error"]["code"].is_null(), "{v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("restarting")
        );
    }
}
