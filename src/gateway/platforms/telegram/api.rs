//! The few Bot API methods the gateway calls, on the hyper client it already has. The bot
//! token is part of every URL (`{api_base}/bot{token}/{method}`): it is never put in an
//! error, a log line or a status — errors name `{api_base}/bot<token>/{method}`.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

use crate::config::Secret;
use crate::gateway::deliveries::SendError;
use crate::gateway::http_client::{self, Client};

/// Of an answer this much is read at most (a `getUpdates` batch of 100 is far smaller).
const MAX_ANSWER: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 429: `parameters.retry_after` seconds.
    #[error("{method}: Telegram asks to wait {0:?} (429 Too Many Requests)", method = .1)]
    RetryAfter(Duration, String),
    /// No answer, a broken connection, a 5xx, an unreadable answer.
    #[error("{0}")]
    Transient(String),
    /// Telegram refused the request (`ok: false` with a 4xx); `method` is the URL as shown.
    #[error("{method}: Telegram answered {code}: {description}")]
    Refused {
        method: String,
        code: u16,
        description: String,
    },
}

impl ApiError {
    pub fn into_send_error(self) -> SendError {
        let message = self.to_string();
        match self {
            ApiError::RetryAfter(d, _) => SendError::RetryAfter(d, message),
            ApiError::Transient(_) => SendError::Transient(message),
            // 401 (a revoked token), 400 (chat not found), 403 (blocked by the user):
            // another attempt gives the same answer.
            ApiError::Refused { .. } => SendError::Permanent(message),
        }
    }
}

#[derive(Clone)]
pub struct BotApi {
    client: Client,
    base: String,
    token: Secret,
}

impl BotApi {
    pub fn new(base: &str, token: Secret) -> Self {
        BotApi {
            client: http_client::build(Duration::from_secs(10)),
            base: base.trim_end_matches('/').to_owned(),
            token,
        }
    }

    /// The bot's own user id: the digits before the token's colon.
    pub fn bot_id(&self) -> Option<i64> {
        self.token.expose().split_once(':')?.0.parse().ok()
    }

    /// The method's URL as it may be shown.
    pub fn shown(&self, method: &str) -> String {
        format!("{}/bot<token>/{method}", self.base)
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

    /// Calls `method` with a JSON body; `Ok(result)` for `{"ok": true, "result": …}`.
    pub async fn call(
        &self,
        method: &str,
        body: &Value,
        timeout: Duration,
    ) -> Result<Value, ApiError> {
        let shown = self.shown(method);
        let url = format!("{}/bot{}/{method}", self.base, self.token.expose());
        let req = http::Request::post(url.as_str())
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(crate::gateway::json_text(body))))
            .map_err(|e| ApiError::Transient(self.redact(format!("{shown}: {e}"))))?;
        let answer = async {
            let resp = self.client.request(req).await.map_err(|e| {
                ApiError::Transient(self.redact(format!("cannot reach {shown}: {e}")))
            })?;
            let status = resp.status();
            let body = http_body_util::Limited::new(resp.into_body(), MAX_ANSWER)
                .collect()
                .await
                .map_err(|e| {
                    ApiError::Transient(self.redact(format!("{shown}: answer cut short: {e}")))
                })?
                .to_bytes();
            Ok::<_, ApiError>((status, body))
        };
        let (status, bytes) = tokio::time::timeout(timeout, answer).await.map_err(|_| {
            ApiError::Transient(format!("no answer from {shown} within {timeout:?}"))
        })??;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if v["ok"].as_bool() == Some(true) {
            return Ok(v["result"].clone());
        }
        let code = v["error_code"]
            .as_u64()
            .and_then(|c| u16::try_from(c).ok())
            .unwrap_or(status.as_u16());
        let description = v["description"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| format!("HTTP {status}, no Bot API answer"));
        let description = self.redact(description);
        if code == 429 {
            let secs = v["parameters"]["retry_after"]
                .as_u64()
                .unwrap_or(1)
                .clamp(1, 3600);
            return Err(ApiError::RetryAfter(
                Duration::from_secs(secs),
                method.to_owned(),
            ));
        }
        if !(400..500).contains(&code) {
            return Err(ApiError::Transient(format!(
                "{shown}: Telegram answered {code}: {description}"
            )));
        }
        Err(ApiError::Refused {
            method: shown,
            code,
            description,
        })
    }

    pub async fn get_me(&self) -> Result<Value, ApiError> {
        self.call("getMe", &json!({}), Duration::from_secs(15))
            .await
    }

    /// Long polling: the updates from `offset` on (and so confirms those before it).
    pub async fn get_updates(
        &self,
        offset: Option<i64>,
        timeout: Duration,
    ) -> Result<Vec<Value>, ApiError> {
        let mut body = json!({"timeout": timeout.as_secs(), "limit": 100});
        if let Some(o) = offset {
            body["offset"] = o.into();
        }
        let r = self
            .call("getUpdates", &body, timeout + Duration::from_secs(15))
            .await?;
        match r {
            Value::Array(a) => Ok(a),
            _ => Err(ApiError::Transient(format!(
                "{}: the result is not a list of updates",
                self.shown("getUpdates")
            ))),
        }
    }

    pub async fn set_webhook(&self, url: &str, secret: &str) -> Result<Value, ApiError> {
        // Never drop_pending_updates: what waits at Telegram is answered.
        self.call(
            "setWebhook",
            &json!({"url": url, "secret_token": secret, "drop_pending_updates": false}),
            Duration::from_secs(30),
        )
        .await
    }

    pub async fn delete_webhook(&self) -> Result<Value, ApiError> {
        self.call(
            "deleteWebhook",
            &json!({"drop_pending_updates": false}),
            Duration::from_secs(30),
        )
        .await
    }
}
