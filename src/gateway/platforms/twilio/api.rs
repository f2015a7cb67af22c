//! The Twilio REST calls the gateway makes — send a message, read the account — on the
//! hyper client it already has, with Basic auth (account SID and auth token). The token
//! travels only in the `Authorization` header; no error or log line carries it.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::Value;

use crate::config::Secret;
use crate::gateway::deliveries::SendError;
use crate::gateway::http_client::{self, Client};
use crate::gateway::platforms::http::{Answer, exchange};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 429 with a `Retry-After`.
    #[error("{1}: Twilio asks to wait {0:?} (429 Too Many Requests)")]
    RetryAfter(Duration, String),
    /// No answer, a broken connection, a 5xx, a 429 without `Retry-After`.
    #[error("{0}")]
    Transient(String),
    /// Twilio refused the request (4xx: 21211 not a valid number, 21610 the recipient
    /// unsubscribed with STOP, 20003 wrong credentials…): another attempt gives the same.
    #[error("{url}: Twilio answered {status} (error {code}): {message}")]
    Refused {
        url: String,
        status: u16,
        code: i64,
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

#[derive(Clone)]
pub struct TwilioApi {
    client: Client,
    base: String,
    sid: String,
    /// `Basic base64(sid:token)`.
    authorization: Secret,
    token: Secret,
}

impl TwilioApi {
    pub fn new(base: &str, sid: &str, token: Secret) -> Self {
        let authorization = Secret::new(format!(
            "Basic {}",
            B64.encode(format!("{sid}:{}", token.expose()))
        ));
        TwilioApi {
            client: http_client::build(Duration::from_secs(10)),
            base: base.trim_end_matches('/').to_owned(),
            sid: sid.to_owned(),
            authorization,
            token,
        }
    }

    async fn call(
        &self,
        method: http::Method,
        path: &str,
        form: Option<String>,
        timeout: Duration,
    ) -> Result<Answer, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = http::Request::builder()
            .method(method)
            .uri(url.as_str())
            .header(http::header::AUTHORIZATION, self.authorization.expose())
            .header(http::header::ACCEPT, "application/json");
        if form.is_some() {
            req = req.header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        }
        let req = req
            .body(Full::new(Bytes::from(form.unwrap_or_default())))
            .map_err(|_| ApiError::Transient(format!("{url}: cannot build the request")))?;
        exchange(&self.client, req, &url, timeout)
            .await
            .map_err(ApiError::Transient)
    }

    fn judge(&self, path: &str, a: &Answer) -> Option<ApiError> {
        if a.status.is_success() {
            return None;
        }
        let url = format!("{}{path}", self.base);
        let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
        let code = v["code"].as_i64().unwrap_or(0);
        let message = v["message"]
            .as_str()
            .map_or_else(|| format!("HTTP {}", a.status), str::to_owned);
        let message = message.replace(self.token.expose(), "<token>");
        let status = a.status.as_u16();
        Some(match status {
            429 => match a.retry_after() {
                Some(d) => ApiError::RetryAfter(d, url),
                None => ApiError::Transient(format!(
                    "{url}: Twilio answered 429 (error {code}): {message}"
                )),
            },
            400..=499 => ApiError::Refused {
                url,
                status,
                code,
                message,
            },
            _ => ApiError::Transient(format!(
                "{url}: Twilio answered {status} (error {code}): {message}"
            )),
        })
    }

    /// `POST /2010-04-01/Accounts/{sid}/Messages.json` with `To`, `From`, `Body`: the
    /// message's SID once Twilio took it.
    pub async fn send(&self, to: &str, from: &str, body: &str) -> Result<String, ApiError> {
        let path = format!("/2010-04-01/Accounts/{}/Messages.json", self.sid);
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("To", to)
            .append_pair("From", from)
            .append_pair("Body", body)
            .finish();
        let a = self
            .call(
                http::Method::POST,
                &path,
                Some(form),
                Duration::from_secs(30),
            )
            .await?;
        if let Some(e) = self.judge(&path, &a) {
            return Err(e);
        }
        let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
        Ok(v["sid"].as_str().unwrap_or("").to_owned())
    }

    /// `GET /2010-04-01/Accounts/{sid}.json`: the account (the cheapest authenticated call).
    pub async fn account(&self) -> Result<Value, ApiError> {
        let path = format!("/2010-04-01/Accounts/{}.json", self.sid);
        let a = self
            .call(http::Method::GET, &path, None, Duration::from_secs(15))
            .await?;
        if let Some(e) = self.judge(&path, &a) {
            return Err(e);
        }
        serde_json::from_slice(&a.body).map_err(|e| {
            ApiError::Transient(format!("{}{path}: the answer is not JSON: {e}", self.base))
        })
    }
}
