//! The LINE Messaging API calls the gateway makes — push, the loading animation, the bot's
//! info — on the hyper client it already has. The channel access token travels only in
//! `Authorization: Bearer`; no error or log line carries it.

use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};
use sha1::{Digest, Sha1};

use crate::config::Secret;
use crate::gateway::deliveries::SendError;
use crate::gateway::http_client::{self, Client};
use crate::gateway::platforms::http::{Answer, exchange};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 429 with a `Retry-After`.
    #[error("{1}: LINE asks to wait {0:?} (429 Too Many Requests)")]
    RetryAfter(Duration, String),
    /// No answer, a broken connection, a 5xx, a 429 without `Retry-After` (LINE's rate
    /// limit, or the month's message quota: retried within the attempts).
    #[error("{0}")]
    Transient(String),
    /// LINE refused the request (4xx): another attempt gives the same answer.
    #[error("{url}: LINE answered {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
}

impl ApiError {
    pub fn into_send_error(self) -> SendError {
        let message = self.to_string();
        match self {
            ApiError::RetryAfter(d, _) => SendError::RetryAfter(d, message),
            ApiError::Transient(_) => SendError::Transient(message),
            ApiError::Refused { .. } => SendError::Permanent(message),
        }
    }
}

/// A name-based UUID (version 5, RFC 9562) in this namespace: the same name gives the same
/// key on every attempt and after any restart.
const RETRY_KEY_NAMESPACE: [u8; 16] = [
    0x6f, 0x1d, 0x2a, 0x8e, 0x7c, 0x1b, 0x4d, 0x3e, 0x9a, 0x55, 0x2b, 0x7f, 0x0c, 0x4e, 0x8d, 0x10,
];

/// `X-Line-Retry-Key` of the push that carries a reply's parts from `first_part` on: a
/// UUID derived from the reply's ledger id, so that LINE accepts a retried push only once.
pub fn retry_key(delivery_id: &str, first_part: usize) -> String {
    let mut h = Sha1::new();
    h.update(RETRY_KEY_NAMESPACE);
    h.update(format!("{delivery_id}:{first_part}").as_bytes());
    let d = h.finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&d[..16]);
    b[6] = (b[6] & 0x0f) | 0x50;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[derive(Clone)]
pub struct LineApi {
    client: Client,
    base: String,
    token: Secret,
}

impl LineApi {
    pub fn new(base: &str, token: Secret) -> Self {
        LineApi {
            client: http_client::build(Duration::from_secs(10)),
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
        retry_key: Option<&str>,
        timeout: Duration,
    ) -> Result<Answer, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = http::Request::builder()
            .method(method)
            .uri(url.as_str())
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose()),
            );
        if let Some(k) = retry_key {
            req = req.header("X-Line-Retry-Key", k);
        }
        let payload = match body {
            Some(b) => {
                req = req.header(http::header::CONTENT_TYPE, "application/json");
                Bytes::from(crate::gateway::json_text(b))
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|_| ApiError::Transient(format!("{url}: cannot build the request")))?;
        exchange(&self.client, req, &url, timeout)
            .await
            .map_err(ApiError::Transient)
    }

    /// What LINE said, as an error (`None`: a 2xx).
    fn judge(&self, path: &str, a: &Answer) -> Option<ApiError> {
        if a.status.is_success() {
            return None;
        }
        let url = format!("{}{path}", self.base);
        let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
        let mut message = v["message"]
            .as_str()
            .map_or_else(|| format!("HTTP {}", a.status), str::to_owned);
        if let Some(details) = v["details"].as_array() {
            for d in details.iter().take(3) {
                message.push_str(&format!(
                    "; {}: {}",
                    d["property"].as_str().unwrap_or("?"),
                    d["message"].as_str().unwrap_or("?")
                ));
            }
        }
        let message = self.redact(message);
        let status = a.status.as_u16();
        Some(match status {
            429 => match a.retry_after() {
                Some(d) => ApiError::RetryAfter(d, url),
                None => ApiError::Transient(format!("{url}: LINE answered 429: {message}")),
            },
            400..=499 => ApiError::Refused {
                url,
                status,
                message,
            },
            _ => ApiError::Transient(format!("{url}: LINE answered {status}: {message}")),
        })
    }

    fn redact(&self, s: String) -> String {
        let t = self.token.expose();
        if t.is_empty() {
            s
        } else {
            s.replace(t, "<token>")
        }
    }

    /// `POST /v2/bot/message/push`: up to five text messages to `to` (a user, group or
    /// room id) under `retry_key`. A 409 means LINE accepted this key already: delivered.
    pub async fn push(&self, to: &str, texts: &[&str], retry_key: &str) -> Result<(), ApiError> {
        const PATH: &str = "/v2/bot/message/push";
        let messages: Vec<Value> = texts
            .iter()
            .map(|t| json!({"type": "text", "text": t}))
            .collect();
        let body = json!({"to": to, "messages": messages});
        let a = self
            .call(
                http::Method::POST,
                PATH,
                Some(&body),
                Some(retry_key),
                Duration::from_secs(30),
            )
            .await?;
        if a.status == http::StatusCode::CONFLICT {
            tracing::info!(platform = "line", chat_id = %to, "LINE had accepted this push already (409 for X-Line-Retry-Key {retry_key}): delivered");
            return Ok(());
        }
        match self.judge(PATH, &a) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// `POST /v2/bot/chat/loading/start`: the loading animation in a one-to-one chat.
    pub async fn loading(&self, chat_id: &str, seconds: u32) -> Result<(), ApiError> {
        const PATH: &str = "/v2/bot/chat/loading/start";
        let body = json!({"chatId": chat_id, "loadingSeconds": seconds});
        let a = self
            .call(
                http::Method::POST,
                PATH,
                Some(&body),
                None,
                Duration::from_secs(10),
            )
            .await?;
        match self.judge(PATH, &a) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// `GET /v2/bot/info`: who the channel's bot is (the cheapest authenticated call).
    pub async fn bot_info(&self) -> Result<Value, ApiError> {
        const PATH: &str = "/v2/bot/info";
        let a = self
            .call(http::Method::GET, PATH, None, None, Duration::from_secs(15))
            .await?;
        if let Some(e) = self.judge(PATH, &a) {
            return Err(e);
        }
        serde_json::from_slice(&a.body).map_err(|e| {
            ApiError::Transient(format!("{}{PATH}: the answer is not JSON: {e}", self.base))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_keys_are_version_5_uuids_stable_per_delivery_and_part() {
        // Python: uuid.uuid5(uuid.UUID("6f1d2a8e-7c1b-4d3e-9a55-2b7f0c4e8d10"), "dlv_abc:0")
        assert_eq!(
            retry_key("dlv_abc", 0),
            "9bed544b-b901-524f-b050-e629c896b766"
        );
        assert_eq!(
            retry_key("dlv_abc", 5),
            "d9183fac-4c6e-5f5f-ad63-911aca2258a8"
        );
        assert_eq!(retry_key("dlv_abc", 0), retry_key("dlv_abc", 0));
        assert_ne!(retry_key("dlv_abc", 0), retry_key("dlv_abd", 0));
    }
}
