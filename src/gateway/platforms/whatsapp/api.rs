//! The two Graph API calls the gateway makes for WhatsApp (`POST /{version}/{phone number
//! id}/messages`, and a `GET` of the phone number id for `platforms check`), on the hyper
//! client it already has. The access token goes in `Authorization: Bearer`, never in a
//! URL, an error or a log line.
//!
//! Errors are Graph's `{"error": {"message", "code", "is_transient", …}}`: a 5xx, or one
//! Graph marks `is_transient` or that is a throughput limit (`4`, `80007`, `130429`,
//! `131048`, `131056`), is tried again (after `Retry-After` when one is sent); anything
//! else (`190` an expired token, `100` a bad parameter, `131047` outside the 24-hour
//! window, `131026` undeliverable, …) ends the reply.

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::Value;

use super::super::http::{Answer, exchange};
use crate::config::Secret;
use crate::gateway::deliveries::SendError;
use crate::gateway::http_client::{self, Client};

/// Graph error codes that are throughput limits: the same message goes through later.
const RATE_LIMITS: &[i64] = &[4, 80007, 130429, 131048, 131056];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// A throughput limit with `Retry-After`.
    #[error("{0}: WhatsApp asks to wait {1:?}")]
    RetryAfter(String, Duration),
    /// No answer, a broken connection, a 5xx, a throughput limit, a transient error.
    #[error("{0}")]
    Transient(String),
    /// Graph refused the request; the same request gets the same answer.
    #[error("{call}: WhatsApp answered {code}: {message}")]
    Refused {
        call: String,
        code: i64,
        message: String,
    },
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
pub struct GraphApi {
    client: Client,
    /// `{api_base}/{version}/{phone number id}`.
    number: String,
    token: Secret,
}

impl GraphApi {
    pub fn new(base: &str, version: &str, phone_number_id: &str, token: Secret) -> Self {
        GraphApi {
            client: http_client::build(Duration::from_secs(10)),
            number: format!("{}/{version}/{phone_number_id}", base.trim_end_matches('/')),
            token,
        }
    }

    fn redact(&self, s: String) -> String {
        let t = self.token.expose();
        if t.is_empty() {
            s
        } else {
            s.replace(t, "<token>")
        }
    }

    async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let url = format!("{}{path}", self.number);
        let shown = format!("{method} {}", url.split('?').next().unwrap_or(&url));
        let mut req = http::Request::builder()
            .method(method)
            .uri(url.as_str())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose()),
            );
        let bytes = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(crate::gateway::json_text(b))
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(bytes))
            .map_err(|e| ApiError::Transient(self.redact(format!("{shown}: {e}"))))?;
        let answer = exchange(&self.client, req, &shown, timeout)
            .await
            .map_err(|e| ApiError::Transient(self.redact(e)))?;
        self.judge(&shown, &answer)
    }

    fn judge(&self, shown: &str, answer: &Answer) -> Result<Value, ApiError> {
        let v = answer.json();
        if answer.status.is_success() && v.get("error").is_none() {
            return Ok(v);
        }
        let e = &v["error"];
        let code = e["code"].as_i64().unwrap_or(0);
        let message = match e["message"].as_str() {
            Some(m) => self.redact(m.chars().take(300).collect()),
            None => format!("HTTP {}, no Graph error", answer.status),
        };
        let limited =
            answer.status == http::StatusCode::TOO_MANY_REQUESTS || RATE_LIMITS.contains(&code);
        if limited && let Some(wait) = answer.retry_after() {
            return Err(ApiError::RetryAfter(shown.to_owned(), wait));
        }
        if limited
            || answer.status.is_server_error()
            || answer.status == http::StatusCode::REQUEST_TIMEOUT
            || e["is_transient"].as_bool() == Some(true)
        {
            return Err(ApiError::Transient(format!(
                "{shown}: WhatsApp answered HTTP {} ({code}: {message})",
                answer.status
            )));
        }
        Err(ApiError::Refused {
            call: shown.to_owned(),
            code,
            message,
        })
    }

    /// Sends one message (`{"messaging_product": "whatsapp", "to", "type", …}`).
    pub async fn send(&self, body: &Value) -> Result<Value, ApiError> {
        self.request(
            http::Method::POST,
            "/messages",
            Some(body),
            Duration::from_secs(30),
        )
        .await
    }

    /// The phone number's own record: the cheapest call that needs the token.
    pub async fn phone_number(&self) -> Result<Value, ApiError> {
        self.request(
            http::Method::GET,
            "?fields=display_phone_number,verified_name",
            None,
            Duration::from_secs(15),
        )
        .await
    }
}
