//! Replies to a chat: a ledger target like the others, sent through the outbox its platform
//! registered. The ledger keeps the states, attempts, backoff and the order of one chat's
//! replies; the outbox splits a reply into the platform's messages and sends them.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Put before a reply sent again after a restart cut its sending short: the platform may
/// have shown it already. The upstream gateway's words, so its users recognise them.
pub const RESENT_MARKER: &str =
    "♻️ Recovered reply — the gateway restarted during delivery, so this may be a duplicate:\n\n";

/// Where a reply goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatTarget {
    /// `telegram`, …
    pub platform: String,
    /// The platform instance (`[[platforms.telegram]] name`).
    pub name: String,
    pub chat_id: String,
    /// A forum topic or thread within the chat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    /// The message this replies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<String>,
    /// Sent in the chat's order, after every earlier ordered reply to it is delivered or
    /// has failed (a turn's reply). `false`: sent at once (a command's answer, a notice).
    #[serde(default)]
    pub ordered: bool,
}

impl ChatTarget {
    /// The platform instance's key in the outbox registry: `telegram:main`.
    pub fn instance(&self) -> String {
        format!("{}:{}", self.platform, self.name)
    }

    /// The order ordered replies keep: one chat (one topic of it).
    pub fn lane(&self) -> String {
        match &self.thread_id {
            Some(t) => format!("{}:{}:{}:{t}", self.platform, self.name, self.chat_id),
            None => format!("{}:{}:{}", self.platform, self.name, self.chat_id),
        }
    }
}

/// Why a send failed, as far as retrying goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SendError {
    /// The platform asked to wait this long (Telegram's 429 `retry_after`); not counted
    /// against the attempts.
    RetryAfter(Duration, String),
    /// Worth another attempt after a backoff (5xx, timeouts, connection errors).
    Transient(String),
    /// Never going to work (chat not found, bot blocked): the delivery fails now.
    Permanent(String),
}

impl SendError {
    pub fn message(&self) -> &str {
        match self {
            SendError::RetryAfter(_, m) | SendError::Transient(m) | SendError::Permanent(m) => m,
        }
    }
}

/// One attempt at a reply.
pub struct ChatDelivery<'a> {
    pub target: &'a ChatTarget,
    pub delivery_id: &'a str,
    /// The whole reply.
    pub text: &'a str,
    /// Parts already confirmed by the platform: send from the next one.
    pub from_part: usize,
    /// Put [`RESENT_MARKER`] before the first part sent: it may have been shown already.
    pub resent: bool,
    /// Called after each request with the number of parts confirmed so far, and the
    /// reply's number of parts.
    pub on_part: &'a (dyn Fn(usize, usize) + Send + Sync),
}

pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<usize, SendError>> + Send + 'a>>;

/// What a platform gives the ledger to send its replies.
pub trait ChatOutbox: Send + Sync + 'static {
    /// Sends the reply's parts from `from_part` on; `Ok(parts)`: all of them are confirmed.
    fn deliver<'a>(&'a self, d: ChatDelivery<'a>) -> SendFuture<'a>;

    /// Shows the chat that a reply is being written (best effort; called every few
    /// seconds while the turn runs).
    fn typing<'a>(
        &'a self,
        target: &'a ChatTarget,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
}

/// The text a turn's outcome becomes in the chat; `None` for a turn that was cancelled
/// (the `/stop` that cancelled it answered already).
pub fn reply_text(result: &Value) -> Option<String> {
    match result["status"].as_str() {
        Some("completed") => {
            let out = result["output"].as_str().unwrap_or("").trim_end();
            Some(if out.trim().is_empty() {
                "(the agent's reply was empty)".to_owned()
            } else {
                out.to_owned()
            })
        }
        Some("cancelled") => None,
        _ => Some(format!(
            "⚠️ The agent could not answer: {}",
            result["error"].as_str().unwrap_or("unknown error")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outcomes_become_chat_text() {
        assert_eq!(
            reply_text(&json!({"status": "completed", "output": "hi\n"})).as_deref(),
            Some("hi")
        );
        assert_eq!(
            reply_text(&json!({"status": "completed", "output": "  "})).as_deref(),
            Some("(the agent's reply was empty)")
        );
        assert_eq!(reply_text(&json!({"status": "cancelled"})), None);
        let failed = reply_text(&json!({"status": "failed", "error": "upstream 500"}));
        assert!(failed.is_some_and(|t| t.contains("upstream 500")));
    }

    #[test]
    fn lanes_are_per_chat_and_topic() {
        let t = ChatTarget {
            platform: "telegram".into(),
            name: "main".into(),
            chat_id: "-100".into(),
            thread_id: None,
            reply_to: Some("7".into()),
            ordered: true,
        };
        assert_eq!(t.lane(), "telegram:main:-100");
        assert_eq!(t.instance(), "telegram:main");
        let topic = ChatTarget {
            thread_id: Some("5".into()),
            ..t.clone()
        };
        assert_eq!(topic.lane(), "telegram:main:-100:5");
        let back: ChatTarget =
            serde_json::from_str(&serde_json::to_string(&topic).unwrap_or_default()).unwrap_or(t);
        assert_eq!(back, topic);
    }
}
