//! The OpenAI-compatible API on the `api` listener: chat completions, models, runs and
//! sessions. Every error is an OpenAI error object; no input makes a handler panic.

mod capabilities;
mod chat;
pub mod responses;
pub mod runs;
mod sessions;
pub mod sse;

use crate::gateway::scrape::RouteExt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::body::{BodyError, read_limited};
use super::error::ApiError;
use super::sessions::Sessions;
use crate::config::{ApiConfig, Secret};
use crate::lifecycle::serve::LogFields;
use crate::lifecycle::{LifecycleHandle, Shutdown};

/// The header that names the session a chat completion belongs to.
pub const SESSION_HEADER: &str = "x-hermes-session-id";
/// The header that names a long-term memory scope, kept with the session and passed to
/// the agent (as the upstream hermes API server takes it).
pub const SESSION_KEY_HEADER: &str = "x-hermes-session-key";

/// What the handlers share.
pub struct ApiState {
    pub sessions: Sessions,
    pub shutdown: Shutdown,
    lifecycle: LifecycleHandle,
    /// For `/health/detailed`: each chat platform's state.
    platforms: crate::gateway::platforms::Platforms,
    /// Where recent stored responses ended (see `responses`).
    responses: responses::Index,
    live: RwLock<Live>,
}

/// What a reload may change.
struct Live {
    keys: Arc<Vec<Secret>>,
    max_body: u64,
    body_timeout: Duration,
    keepalive: Duration,
    response_retention: Duration,
    run_retention: Duration,
    model: String,
}

pub type Shared = Arc<ApiState>;

impl ApiState {
    pub fn new(
        sessions: Sessions,
        lifecycle: LifecycleHandle,
        platforms: crate::gateway::platforms::Platforms,
        api: &ApiConfig,
        keys: Vec<Secret>,
        model: &str,
    ) -> Shared {
        Arc::new(ApiState {
            sessions,
            shutdown: lifecycle.shutdown(),
            lifecycle,
            platforms,
            responses: responses::Index::default(),
            live: RwLock::new(Live {
                keys: Arc::new(keys),
                max_body: api.max_body,
                body_timeout: api.body_timeout,
                keepalive: api.keepalive,
                response_retention: api.response_retention,
                run_retention: api.run_retention,
                model: model.to_owned(),
            }),
        })
    }

    pub fn update(&self, api: &ApiConfig, keys: Vec<Secret>, model: &str) {
        let mut l = self.live.write().unwrap_or_else(PoisonError::into_inner);
        l.keys = Arc::new(keys);
        l.max_body = api.max_body;
        l.body_timeout = api.body_timeout;
        l.keepalive = api.keepalive;
        l.response_retention = api.response_retention;
        l.run_retention = api.run_retention;
        l.model = model.to_owned();
    }

    fn live<T>(&self, f: impl FnOnce(&Live) -> T) -> T {
        f(&self.live.read().unwrap_or_else(PoisonError::into_inner))
    }

    pub fn model(&self) -> String {
        self.live(|l| l.model.clone())
    }

    pub fn keepalive(&self) -> Duration {
        self.live(|l| l.keepalive)
    }

    pub fn response_retention(&self) -> Duration {
        self.live(|l| l.response_retention)
    }

    pub fn run_retention(&self) -> Duration {
        self.live(|l| l.run_retention)
    }
}

pub fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route_tagged("/v1/chat/completions", post(chat::completions))
        .route_tagged("/v1/models", get(chat::models))
        .route_tagged("/v1/runs", post(runs::create))
        .route_tagged("/v1/runs/{id}", get(runs::get))
        .route_tagged("/v1/runs/{id}/events", get(runs::events))
        .route_tagged("/v1/runs/{id}/cancel", post(runs::cancel))
        // The upstream hermes API server's name for the same.
        .route_tagged("/v1/runs/{id}/stop", post(runs::cancel))
        .route_tagged("/v1/capabilities", get(capabilities::capabilities))
        .route_tagged("/v1/responses", post(responses::create))
        .route_tagged(
            "/v1/responses/{id}",
            get(responses::get).delete(responses::delete),
        )
        .route_tagged(
            "/v1/responses/{id}/input_items",
            get(responses::input_items),
        )
        .route_tagged("/health/detailed", get(capabilities::health_detailed))
        .route_tagged("/v1/sessions", get(sessions::list))
        .route_tagged(
            "/v1/sessions/{id}",
            get(sessions::get).delete(sessions::delete),
        )
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(log_fields));
    v1.with_state(state)
}

/// Puts the session and run a request is about on its access-log line.
async fn log_fields(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let session = req
        .headers()
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| path_id(path, "/v1/sessions/"));
    let run = path_id(path, "/v1/runs/");
    let mut resp = next.run(req).await;
    let ext = resp.extensions_mut();
    let mut fields = ext.remove::<LogFields>().unwrap_or_default();
    fields.session_key = fields.session_key.or(session);
    fields.run_id = fields.run_id.or(run);
    ext.insert(fields);
    resp
}

/// `abc` from `/v1/runs/abc/events` with prefix `/v1/runs/`.
fn path_id(path: &str, prefix: &str) -> Option<String> {
    let rest = path.strip_prefix(prefix)?;
    let id = rest.split('/').next().unwrap_or_default();
    (!id.is_empty()).then(|| id.to_owned())
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Constant-time equality: the time depends on the lengths only, never on where the first
/// difference is.
fn same_secret(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, b) in given.iter().enumerate() {
        let e = if expected.is_empty() {
            0
        } else {
            expected[i % expected.len()]
        };
        diff |= usize::from(b ^ e);
    }
    diff == 0
}

/// Whether a path is authenticated: every `/v1` path, known or not (a wrong key gets 401
/// before any route is looked up), and `/health/detailed`. Plain `/health` is open.
fn needs_key(path: &str) -> bool {
    path == "/v1" || path.starts_with("/v1/") || path == "/health/detailed"
}

/// Bearer keys, when any are configured, on the paths that need them ([`needs_key`]).
/// Every key is compared, match or not. Layered over the whole `api` listener, so that it
/// runs before routing.
pub(super) async fn authenticate(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if !needs_key(req.uri().path()) {
        return next.run(req).await;
    }
    let keys = s.live(|l| l.keys.clone());
    if keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(given) = given else {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing API key: send `Authorization: Bearer KEY`",
        )
        .with_code("invalid_api_key")
        .into_response();
    };
    let mut ok = false;
    for k in keys.iter() {
        ok |= same_secret(given.as_bytes(), k.expose().as_bytes());
    }
    if !ok {
        return ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid API key",
        )
        .with_code("invalid_api_key")
        .into_response();
    }
    next.run(req).await
}

/// Reads the request body within the size limit (413) and the body timeout (408).
async fn read_body(s: &ApiState, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let (limit, timeout) = s.live(|l| (l.max_body, l.body_timeout));
    read_limited(headers, body, limit, timeout)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("the request body is larger than {limit} bytes ([api] max_body)"),
            ),
            BodyError::Timeout => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the request body did not arrive within {timeout:?} ([api] body_timeout)"),
            ),
            BodyError::Unreadable(e) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                format!("cannot read the request body: {e}"),
            ),
        })
}

/// Parses JSON into `T`; a wrong shape names the field (`messages[0].role`).
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("the request body is not valid JSON: {inner}")
        } else if path == "." {
            format!("invalid request body: {inner}")
        } else {
            format!("invalid field `{path}`: {inner}")
        };
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    })
}

/// A session id or key: 1 to 256 visible ASCII characters (no spaces), as the upstream
/// hermes API server and its client take them.
pub const MAX_SESSION_ID: usize = 256;

fn valid_session_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_SESSION_ID || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "`{}` is not valid: use 1 to {MAX_SESSION_ID} visible ASCII characters without spaces",
            id.escape_default()
        ));
    }
    Ok(())
}

/// Every route's answer to a store error (see [`ApiError::store`]).
fn store_error(e: crate::store::StoreError) -> Response {
    ApiError::from(e).into_response()
}

fn busy(e: &super::sessions::Busy) -> Response {
    let mut r = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        e.to_string(),
    )
    .with_code("rate_limit_exceeded")
    .into_response();
    r.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("1"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn constant_time_comparison_is_equality() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abd", b"abc"));
        assert!(!same_secret(b"ab", b"abc"));
        assert!(!same_secret(b"abcabc", b"abc"));
        assert!(!same_secret(b"", b"abc"));
        assert!(!same_secret(b"x", b""));
        assert!(same_secret(b"", b""));
    }
}
