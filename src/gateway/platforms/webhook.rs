//! `GET|POST /platforms/PLATFORM/NAME` on the webhook listener: one route for every
//! platform whose service pushes its messages. Every request goes the same way: the
//! instance (404), the body within `[webhook] max_body` and `body_timeout` (413, 408), the
//! platform's proof of origin over the raw body, in constant time (401; nothing parsed or
//! stored before), its reading of the body (400; or let go with 200), the commit of what
//! it carries, and only then the platform's answer (2xx). A store that cannot commit is
//! 503 with `Retry-After`: the platform sends it again.

use crate::gateway::scrape::RouteExt;
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http::{HeaderMap, Method, StatusCode};
use serde_json::{Value, json};

use super::{Inbound, Instance, Platforms};
use crate::gateway::body::{BodyError, read_limited};
use crate::gateway::error::{STORE_RETRY_AFTER, STORE_UNAVAILABLE, retry_after};

/// A request, as a platform's inbox sees it.
pub struct Request<'a> {
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
    /// The raw body (empty for a GET).
    pub body: &'a [u8],
    /// The raw query string, if any.
    pub query: Option<&'a str>,
}

/// Why a request is not taken: its status, a short code, and a message for the log and
/// the sender (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Refused {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Refused {
            status,
            code,
            message: message.into(),
        }
    }

    /// 401: the proof of origin is missing or wrong.
    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    /// 400: a body that cannot be read.
    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_body", message)
    }
}

/// What the platform is answered once its messages are committed.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 200 without a body.
    Empty,
    Json(Value),
    /// 200 with a body of its own type (Twilio's TwiML, a verification challenge).
    Text {
        content_type: &'static str,
        text: String,
    },
}

/// What a verified request carries.
pub struct Taken {
    /// The messages to take (none: a handshake, a status callback, an update let go).
    pub messages: Vec<Inbound>,
    pub reply: Reply,
}

impl Taken {
    pub fn nothing(reply: Reply) -> Self {
        Taken {
            messages: Vec::new(),
            reply,
        }
    }
}

/// A platform instance that receives webhooks.
pub trait WebhookInbox: Send + Sync + 'static {
    fn instance(&self) -> &Arc<Instance>;

    /// A GET of the URL (WhatsApp's subscription check). `None`: 405.
    fn get(&self, _query: Option<&str>) -> Option<Result<Reply, Refused>> {
        None
    }

    /// The request's proof of origin, checked over the raw body in constant time.
    fn verify(&self, req: &Request<'_>) -> Result<(), Refused>;

    /// What the verified body carries.
    fn read(&self, req: &Request<'_>) -> Result<Taken, Refused>;
}

pub fn router(platforms: Platforms) -> Router {
    Router::new()
        .route_tagged("/platforms/{platform}/{name}", post(receive).get(receive))
        .with_state(platforms)
}

fn refuse(r: Refused, platform: &str, name: &str) -> Response {
    if r.code == STORE_UNAVAILABLE {
        // Said once per episode by the store.
        tracing::debug!(
            platform,
            status = r.status.as_u16(),
            "{platform} `{name}` webhook refused: {}",
            r.message
        );
    } else if r.status.is_server_error() {
        tracing::error!(
            platform,
            status = r.status.as_u16(),
            "{platform} `{name}` webhook refused: {}",
            r.message
        );
    } else {
        tracing::warn!(
            platform,
            status = r.status.as_u16(),
            "{platform} `{name}` webhook refused: {}",
            r.message
        );
    }
    let mut resp = (
        r.status,
        axum::Json(json!({"status": "error", "error": r.code, "message": r.message})),
    )
        .into_response();
    if r.status == StatusCode::SERVICE_UNAVAILABLE {
        retry_after(&mut resp, STORE_RETRY_AFTER);
    }
    resp
}

fn answer(reply: Reply) -> Response {
    match reply {
        Reply::Empty => StatusCode::OK.into_response(),
        Reply::Json(v) => axum::Json(v).into_response(),
        Reply::Text { content_type, text } => (
            StatusCode::OK,
            [(http::header::CONTENT_TYPE, content_type)],
            text,
        )
            .into_response(),
    }
}

async fn receive(
    State(p): State<Platforms>,
    Path((platform, name)): Path<(String, String)>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let platform = platform.escape_default().to_string();
    let name = name.escape_default().to_string();
    let Some(inbox) = p.inbox(&platform, &name) else {
        return refuse(
            Refused::new(
                StatusCode::NOT_FOUND,
                "unknown_platform",
                format!("no {platform} `{name}` takes webhooks here"),
            ),
            &platform,
            &name,
        );
    };
    if method == Method::GET {
        return match inbox.get(query.as_deref()) {
            Some(Ok(reply)) => answer(reply),
            Some(Err(r)) => refuse(r, &platform, &name),
            None => refuse(
                Refused::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "method_not_allowed",
                    format!("{platform} posts its webhooks"),
                ),
                &platform,
                &name,
            ),
        };
    }
    let (limit, timeout) = p.body_limits();
    let bytes = match read_limited(&headers, body, limit, timeout).await {
        Ok(b) => b,
        Err(e) => {
            let r = match e {
                BodyError::TooLarge => Refused::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the body is larger than {limit} bytes ([webhook] max_body)"),
                ),
                BodyError::Timeout => Refused::new(
                    StatusCode::REQUEST_TIMEOUT,
                    "body_timeout",
                    format!("the body did not arrive within {timeout:?}"),
                ),
                BodyError::Unreadable(e) => Refused::new(
                    StatusCode::BAD_REQUEST,
                    "unreadable_body",
                    format!("cannot read the body: {e}"),
                ),
            };
            return refuse(r, &platform, &name);
        }
    };
    let req = Request {
        method: &method,
        headers: &headers,
        body: &bytes,
        query: query.as_deref(),
    };
    if let Err(r) = inbox.verify(&req) {
        return refuse(r, &platform, &name);
    }
    let taken = match inbox.read(&req) {
        Ok(t) => t,
        Err(r) => return refuse(r, &platform, &name),
    };
    if taken.messages.is_empty() {
        return answer(taken.reply);
    }
    match p.receive(inbox.instance(), taken.messages, None).await {
        Ok(()) => {
            inbox.instance().ok("webhook");
            answer(taken.reply)
        }
        Err(e) => {
            if !e.is_unavailable() {
                tracing::error!(
                    platform,
                    "{platform} `{name}` webhook: the store failed: {e}"
                );
            }
            refuse(
                Refused::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    STORE_UNAVAILABLE,
                    format!(
                        "the messages could not be stored ({e}); the platform sends them again"
                    ),
                ),
                &platform,
                &name,
            )
        }
    }
}
