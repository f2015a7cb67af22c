//! Where a result goes: the journal (`log`) or an HTTP endpoint (`http`): a POST of JSON
//! with `Idempotency-Key` (the delivery id, the same on every attempt) and a Standard
//! Webhooks signature of the gateway's own (`webhook-id`, `webhook-timestamp`,
//! `webhook-signature`). A 2xx is delivered; anything else is an attempt that failed.

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{Value, json};

use super::chat::ChatTarget;
use crate::gateway::webhooks::signature;
use crate::store::deliveries::DeliveryRow;

pub use crate::gateway::http_client::Client;

/// Of an error answer's body, this much is kept as the attempt's error.
const ERROR_EXCERPT: usize = 200;

pub fn client() -> Client {
    crate::gateway::http_client::build(Duration::from_secs(10))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Log,
    Http {
        url: String,
    },
    /// A reply to a chat, sent by its platform's outbox (see `chat`).
    Chat(ChatTarget),
}

impl Target {
    pub fn to_json(&self) -> String {
        let v = match self {
            Target::Log => json!({"type": "log"}),
            Target::Http { url } => json!({"type": "http", "url": url}),
            Target::Chat(c) => {
                let mut v = serde_json::to_value(c).unwrap_or(Value::Null);
                if let Value::Object(m) = &mut v {
                    m.insert("type".into(), "chat".into());
                }
                v
            }
        };
        crate::gateway::json_text(&v)
    }

    pub fn from_json(s: &str) -> Target {
        let v: Value = serde_json::from_str(s).unwrap_or(Value::Null);
        match (v["type"].as_str(), v["url"].as_str()) {
            (Some("http"), Some(url)) => Target::Http {
                url: url.to_owned(),
            },
            (Some("chat"), _) => match serde_json::from_value::<ChatTarget>(v) {
                Ok(c) => Target::Chat(c),
                Err(_) => Target::Log,
            },
            _ => Target::Log,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Target::Log => "the log".into(),
            Target::Http { url } => url.clone(),
            Target::Chat(c) => format!("{} chat {}", c.instance(), c.chat_id),
        }
    }

    /// One attempt. `Err` carries what to keep as the last error.
    pub async fn send(
        &self,
        client: &Client,
        d: &DeliveryRow,
        result: &Value,
        key: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<(), String> {
        match self {
            Target::Log => {
                tracing::info!(route = %d.route, delivery_id = %d.id, run_id = %d.run_id,
                    "webhook result ({}): {}", result["status"].as_str().unwrap_or("?"),
                    result["output"].as_str().or(result["error"].as_str()).unwrap_or(""));
                Ok(())
            }
            // The ledger sends these through the platform's outbox, not from here.
            Target::Chat(c) => Err(format!("{} has no sender here", c.instance())),
            Target::Http { url } => {
                let body = json!({
                    "delivery_id": d.id,
                    "route": d.route,
                    "source_id": d.source_id,
                    "event": d.event,
                    "run_id": d.run_id,
                    "session_id": d.session_id,
                    "received_at": d.received_at,
                    "status": result["status"],
                    "output": result["output"],
                    "error": result["error"],
                })
                .to_string();
                let ts = crate::store::now_ms() / 1000;
                let mut req = http::Request::post(url.as_str())
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header("idempotency-key", d.id.as_str())
                    .header("webhook-id", d.id.as_str())
                    .header("webhook-timestamp", ts.to_string());
                if let Some(k) = key {
                    req = req.header(
                        "webhook-signature",
                        signature::sign_standard(k, &d.id, ts, body.as_bytes()),
                    );
                }
                let req = req
                    .body(Full::new(Bytes::from(body)))
                    .map_err(|e| format!("cannot build the request to {url}: {e}"))?;
                let resp = match tokio::time::timeout(timeout, client.request(req)).await {
                    Err(_) => return Err(format!("no answer from {url} within {timeout:?}")),
                    Ok(Err(e)) => return Err(format!("cannot reach {url}: {e}")),
                    Ok(Ok(r)) => r,
                };
                let status = resp.status();
                // Read the body either way, so that the connection can be reused.
                let text = match tokio::time::timeout(timeout, resp.into_body().collect()).await {
                    Ok(Ok(b)) => {
                        let b = b.to_bytes();
                        let cut = b.len().min(ERROR_EXCERPT);
                        String::from_utf8_lossy(&b[..cut]).into_owned()
                    }
                    _ => String::new(),
                };
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("{url} answered {status}: {}", text.trim()))
                }
            }
        }
    }
}
