//! JSON errors in the OpenAI shape: `{"error": {"message", "type", "code"}}`, where `code`
//! is a string (`"invalid_api_key"`, `"rate_limit_exceeded"`) or null, never a number.

use axum::Json;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub message: String,
    /// A machine-readable code (`invalid_api_key`); `null` in the body when absent.
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            code: None,
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

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
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
}
