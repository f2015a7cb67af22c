//! Server-sent events: a response body fed from a channel, and the `gateway_restarting`
//! error that ends every stream still open just before the drain deadline.

use std::convert::Infallible;
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

/// A `text/event-stream` response and the sender that feeds it. A send fails once the
/// client has gone.
pub fn response() -> (mpsc::Sender<Bytes>, Response) {
    let (tx, rx) = mpsc::channel(64);
    let mut r = Response::new(Body::new(ChannelBody(rx)));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    (tx, r)
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

/// The error event that ends a stream cut by a restart or stop.
pub fn restarting_event() -> Bytes {
    let data = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "gateway_restarting",
        "the gateway is restarting; retry the request (a run goes on after the restart: GET /v1/runs/{id}/events)",
    )
    .body();
    event(None, Some("error"), &data.to_string())
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
