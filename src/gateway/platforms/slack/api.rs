//! The two Slack Web API methods the gateway calls (`chat.postMessage`, `auth.test`), on
//! the hyper client it already has. The bot token goes in `Authorization: Bearer`, never in
//! a URL, an error or a log line.
//!
//! Slack answers most refusals with HTTP 200 and `{"ok": false, "error": "…"}`: those are
//! errors too. `ratelimited` (HTTP 429) waits `Retry-After`; Slack's own trouble
//! (`internal_error`, `fatal_error`, `service_unavailable`, `request_timeout`, 5xx) is tried
//! again; anything else (`channel_not_found`, `not_in_channel`, `invalid_auth`,
//! `missing_scope`, `is_archived`, …) gives the same answer every time and ends the reply.

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::super::http::exchange;
use crate::config::Secret;
use crate::gateway::deliveries::SendError;
use crate::gateway::http_client::{self, Client};

/// `ok: false` errors that are Slack's passing trouble, worth another attempt.
const TRANSIENT: &[&str] = &[
    "internal_error",
    "fatal_error",
    "service_unavailable",
    "request_timeout",
    "team_added_to_org",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// `ratelimited`: Slack's `Retry-After`.
    #[error("{0}: Slack asks to wait {1:?} (ratelimited)")]
    RetryAfter(String, Duration),
    /// No answer, a broken connection, a 5xx, Slack's passing trouble.
    #[error("{0}")]
    Transient(String),
    /// Slack refused the request; the same request gets the same answer.
    #[error("{method}: Slack answered {error}")]
    Refused { method: String, error: String },
}

impl ApiError {
    pub fn into_send_error(self) -> SendError {
        let message = self.to_string();
        match self {
            ApiError::RetryAfter(_, d) => SendError::RetryAfter(d, message),
            ApiError::Transient(_) => SendError::Transient(message),
            ApiError::Refused { .. } => SendError::Permanent(message),
        }
    }
}

#[derive(Clone)]
pub struct SlackApi {
    client: Client,
    base: String,
    token: Secret,
}

impl SlackApi {
    pub fn new(base: &str, token: Secret) -> Self {
        SlackApi {
            client: http_client::build(Duration::from_secs(10)),
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// Whatever an error text carries, without the token.
    fn redact(&self, s: String) -> String {
        let t = self.token.expose();
        if t.is_empty() {
            s
        } else {
            s.replace(t, "<token>")
        }
    }

    /// Calls `method` with a JSON body; `Ok(answer)` for `{"ok": true, …}`.
    pub async fn call(
        &self,
        method: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let shown = format!("{}/{method}", self.base);
        let req = http::Request::post(shown.as_str())
            .header(
                http::header::CONTENT_TYPE,
                "application/json; charset=utf-8",
            )
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose()),
            )
            .body(Full::new(Bytes::from(crate::gateway::json_text(body))))
            .map_err(|e| ApiError::Transient(self.redact(format!("{shown}: {e}"))))?;
        let answer = exchange(&self.client, req, &shown, timeout)
            .await
            .map_err(|e| ApiError::Transient(self.redact(e)))?;
        let v = answer.json();
        if answer.status == http::StatusCode::TOO_MANY_REQUESTS || v["error"] == "ratelimited" {
            let wait = answer.retry_after().unwrap_or(Duration::from_secs(1));
            return Err(ApiError::RetryAfter(method.to_owned(), wait));
        }
        if answer.status.is_server_error() || answer.status == http::StatusCode::REQUEST_TIMEOUT {
            return Err(ApiError::Transient(format!(
                "{shown}: Slack answered HTTP {}",
                answer.status
            )));
        }
        if answer.status.is_success() && v["ok"].as_bool() == Some(true) {
            return Ok(v);
        }
        let error = match v["error"].as_str() {
            Some(e) => self.redact(e.chars().take(200).collect()),
            None if answer.status.is_success() => {
                return Err(ApiError::Transient(format!(
                    "{shown}: an answer that is not Slack's (HTTP {}, no \"ok\")",
                    answer.status
                )));
            }
            None => format!("HTTP {}", answer.status),
        };
        if TRANSIENT.contains(&error.as_str()) {
            return Err(ApiError::Transient(format!(
                "{shown}: Slack answered {error}"
            )));
        }
        Err(ApiError::Refused {
            method: method.to_owned(),
            error,
        })
    }

    /// The token's identity: `{"team", "user", "user_id", "bot_id", …}`.
    pub async fn auth_test(&self) -> Result<Value, ApiError> {
        self.call("auth.test", &json!({}), Duration::from_secs(15))
            .await
    }
}
