//! JSON errors in the OpenAI shape: `{"error": {"message", "type", "code"}}`, where `code`
//! is a string (`"invalid_api_key"`, `"rate_limit_exceeded"`) or null, never a number.
//!
//! A store error becomes one here ([`ApiError::store`]), for every route: a database that
//! cannot write is 503 `store_unavailable` with `Retry-After`, as the webhook listeners
//! answer it; anything else is 500.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::store::StoreError;

/// The code of a 503 for a store that cannot commit, on every listener.
pub const STORE_UNAVAILABLE: &str = "store_unavailable";
/// The `Retry-After` of that 503, in seconds.
pub const STORE_RETRY_AFTER: u32 = 1;

/// Sets `Retry-After: secs`.
pub fn retry_after(r: &mut Response, secs: u32) {
    r.headers_mut()
        .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    /// A machine-readable code (`invalid_api_key`); `null` in the body when absent.
    pub code: Option<&'static str>,
    /// Sent as `Retry-After` (seconds).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("no {what} with id `{}`", id.escape_default()),
        )
        .with_code("not_found")
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message)
    }

    /// A store error: 503 `store_unavailable` with `Retry-After` when the database cannot
    /// write now (nothing was stored; the store logs that once per episode), 500 (logged)
    /// otherwise.
    pub fn store(e: &StoreError) -> Self {
        if e.is_unavailable() {
            tracing::debug!("store: {e}");
            let mut r = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                format!("{e}; nothing was stored, retry later"),
            )
            .with_code(STORE_UNAVAILABLE);
            r.retry_after = Some(STORE_RETRY_AFTER);
            r
        } else {
            tracing::error!("store: {e}");
            ApiError::internal(format!("storage failed: {e}"))
        }
    }

    /// The error object itself, e.g. for an SSE `error` event.
    pub fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "code": self.code,
            }
        })
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::store(&e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            retry_after(&mut r, secs);
        }
        r
    }
}

pub async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route for {}", uri.path()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_a_string_or_null_never_the_status() {
        let plain = ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", "bad");
        assert_eq!(
            plain.body(),
            json!({"error": {"message": "bad", "type": "invalid_request_error", "code": null}})
        );
        let coded = ApiError::new(StatusCode::UNAUTHORIZED, "invalid_request_error", "no key")
            .with_code("invalid_api_key");
        assert_eq!(coded.body()["error"]["code"], "invalid_api_key");
        assert_eq!(
            ApiError::not_found("run", "x").body()["error"]["code"],
            "not_found"
        );
        assert!(ApiError::internal("boom").body()["error"]["code"].is_null());
    }

    #[test]
    fn a_store_that_cannot_write_is_503_with_retry_after_and_other_store_errors_500() {
        let full = StoreError::Unavailable("database or disk is full".into());
        let r = ApiError::from(full).into_response();
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[http::header::RETRY_AFTER], "1");
        let e = ApiError::store(&StoreError::Unavailable("database is locked".into()));
        assert_eq!(e.body()["error"]["code"], STORE_UNAVAILABLE);
        let message = e.body()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        assert!(
            message.starts_with("storage is unavailable: database is locked"),
            "{message}"
        );

        let other = ApiError::from(StoreError::Commit("constraint".into())).into_response();
        assert_eq!(other.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert!(other.headers().get(http::header::RETRY_AFTER).is_none());
    }
}
