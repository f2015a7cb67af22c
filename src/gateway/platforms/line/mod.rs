//! LINE (Messaging API): webhooks in on the webhook listener, push messages out. A small
//! client on the gateway's hyper stack (`api`).
//!
//! Every request is proven by `X-Line-Signature` (base64 HMAC-SHA256 of the raw body with
//! the channel secret), checked in constant time before anything is read. A request may
//! carry several events; the console's verification request carries none (200). Each
//! event is deduplicated by its `webhookEventId`, so a redelivery (`deliveryContext.
//! isRedelivery`) runs nothing twice.
//!
//! What is taken: a text message (`message` event of type `text`, channel in `active`
//! mode) from a user; in a group or a room, only a text that mentions the bot (the
//! mention is taken out). Everything else — other message types (stickers, images,
//! locations, …), follows, joins, postbacks, unsends, edits, standby-mode events, event
//! types LINE adds later — is let go with a debug log line and answered 200.
//!
//! Sessions: `line:NAME:USER_ID` for a one-to-one chat, `line:NAME:GROUP_ID` and
//! `line:NAME:ROOM_ID` for a group or a room (one conversation; the agent sees
//! `[USER_ID] text`). Replies go out with the push API, at most five messages of 5,000
//! characters per request, each request under an `X-Line-Retry-Key` derived from the
//! reply's ledger id, so that a retried push is never shown twice.

pub mod api;

use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use http::StatusCode;
use serde_json::Value;
use sha2::Sha256;

use super::webhook::{Refused, Reply, Request, Taken, WebhookInbox};
use super::{Adapter, Inbound, Instance, Part, chunk};
use crate::config::{LineConfig, RateLimit, Secret};
use crate::gateway::deliveries::ChatTarget;
use crate::gateway::deliveries::chat::SendFuture;
use crate::gateway::webhooks::signature::SignatureError;
use api::{ApiError, LineApi};

/// A text message's limit, counted in UTF-16 code units (as LINE's servers count).
pub const MAX_TEXT: usize = 5000;
/// Messages one push request may carry.
pub const MAX_MESSAGES: usize = 5;
const SIGNATURE_HEADER: &str = "x-line-signature";
/// The loading animation's length (5 to 60, in steps of 5); shown again while a turn runs.
const LOADING_SECONDS: u32 = 5;

pub struct Line {
    instance: Arc<Instance>,
    api: LineApi,
    secret: Secret,
    send_rate: RateLimit,
    /// What the configuration said, to tell a reload what it cannot change live.
    config: LineConfig,
}

impl Line {
    /// Reads the secrets (errors name the key and source, never the value).
    pub fn new(cfg: &LineConfig) -> Result<Self, String> {
        let key = format!("[[platforms.line]] `{}`", cfg.name);
        let secret = cfg
            .channel_secret
            .read()
            .map_err(|e| format!("{key}: channel_secret: {e}"))?;
        if secret.expose().trim().is_empty() {
            return Err(format!("{key}: channel_secret: what was read is empty"));
        }
        let token = cfg
            .channel_access_token
            .read()
            .map_err(|e| format!("{key}: channel_access_token: {e}"))?;
        if !crate::config::looks_like_header_value(token.expose().trim()) {
            return Err(format!(
                "{key}: channel_access_token: what was read is empty or holds spaces or control characters"
            ));
        }
        let token = Secret::new(token.expose().trim());
        let instance = Instance::new(
            "line",
            &cfg.name,
            "webhook",
            true,
            &cfg.access,
            cfg.chat_rate_limit,
        );
        instance.set_state("webhook");
        Ok(Line {
            instance,
            api: LineApi::new(&cfg.api_base, token),
            secret,
            send_rate: cfg.send_rate_limit,
            config: cfg.clone(),
        })
    }

    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    pub fn send_rate(&self) -> RateLimit {
        self.send_rate
    }

    pub fn api(&self) -> &LineApi {
        &self.api
    }

    /// A reload: access and the inbound limit change now; the rest takes a restart.
    pub fn update(&self, cfg: &LineConfig) {
        self.instance.reload(&cfg.access, cfg.chat_rate_limit);
        let old = &self.config;
        if cfg.channel_secret != old.channel_secret
            || cfg.channel_access_token != old.channel_access_token
            || cfg.api_base != old.api_base
            || cfg.send_rate_limit != old.send_rate_limit
        {
            tracing::warn!(
                platform = "line",
                "line `{}`: channel_secret, channel_access_token, api_base or send_rate_limit changed: this takes a restart (SIGUSR1)",
                cfg.name
            );
        }
    }

    /// An event as a message to take, or why it is let go.
    pub fn map(&self, e: &Value, event_id: &str) -> Result<Inbound, String> {
        let kind = e["type"].as_str().unwrap_or("untyped");
        if kind != "message" {
            return Err(format!("a `{kind}` event"));
        }
        if e["mode"].as_str() == Some("standby") {
            return Err("the channel is in standby mode (another module answers)".into());
        }
        let msg = &e["message"];
        let mtype = msg["type"].as_str().unwrap_or("untyped");
        if mtype != "text" {
            return Err(format!("a `{mtype}` message, not text"));
        }
        let mut text = msg["text"].as_str().unwrap_or("").to_owned();
        let source = &e["source"];
        let user = source["userId"].as_str().unwrap_or("");
        let (chat, group) = match source["type"].as_str() {
            Some("user") => (user, false),
            Some("group") => (source["groupId"].as_str().unwrap_or(""), true),
            Some("room") => (source["roomId"].as_str().unwrap_or(""), true),
            other => {
                return Err(format!(
                    "a message from a `{}` source",
                    other.unwrap_or("?")
                ));
            }
        };
        if chat.is_empty() || !chat.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("a message without a usable source id".into());
        }
        if group {
            let mentions = msg["mention"]["mentionees"].as_array();
            let me = mentions.and_then(|m| m.iter().find(|x| x["isSelf"].as_bool() == Some(true)));
            let Some(me) = me else {
                return Err("a group message that does not mention the bot".into());
            };
            text = without_mention(&text, me["index"].as_u64(), me["length"].as_u64());
        }
        let text = text.trim().to_owned();
        if text.is_empty() {
            return Err("an empty text (or a bare mention)".into());
        }
        let name = &self.instance.name;
        let user_id = if user.is_empty() { "unknown" } else { user };
        Ok(Inbound {
            source_id: event_id.to_owned(),
            message_id: msg["id"].as_str().unwrap_or(event_id).to_owned(),
            chat_id: chat.to_owned(),
            thread_id: None,
            user_id: user_id.to_owned(),
            // The webhook carries no display name (the profile API would).
            user_name: user_id.to_owned(),
            chat_key: format!("line:{name}:{chat}"),
            text,
            sender_prefix: group,
            unsupported: None,
        })
    }
}

/// `text` without the mention at `index`/`length`, counted in UTF-16 code units as LINE
/// counts them; the text unchanged if they do not fall on characters.
fn without_mention(text: &str, index: Option<u64>, length: Option<u64>) -> String {
    let (Some(i), Some(n)) = (index, length) else {
        return text.to_owned();
    };
    // Any numbers may come: ones that do not fall within the text change nothing.
    let (Ok(i), Some(stop)) = (usize::try_from(i), i.checked_add(n)) else {
        return text.to_owned();
    };
    let Ok(stop) = usize::try_from(stop) else {
        return text.to_owned();
    };
    let mut at = 0usize;
    let (mut start, mut end) = (None, None);
    for (b, c) in text.char_indices() {
        if at == i {
            start = Some(b);
        }
        if at == stop {
            end = Some(b);
        }
        at += c.len_utf16();
    }
    if at == stop {
        end = Some(text.len());
    }
    match (start, end) {
        (Some(s), Some(e)) if s <= e => format!("{}{}", &text[..s], &text[e..]),
        _ => text.to_owned(),
    }
}

fn malformed(message: impl Into<String>) -> Refused {
    Refused::new(StatusCode::BAD_REQUEST, "malformed_body", message)
}

impl WebhookInbox for Line {
    fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// `X-Line-Signature`: base64 of HMAC-SHA256(channel secret, raw body).
    fn verify(&self, req: &Request<'_>) -> Result<(), Refused> {
        let refuse =
            |e: SignatureError| Refused::unauthorized(e.code(), format!("X-Line-Signature: {e}"));
        let given = req
            .headers
            .get(SIGNATURE_HEADER)
            .ok_or(SignatureError::Missing("x-line-signature"))
            .map_err(refuse)?;
        let given = B64
            .decode(given.as_bytes())
            .map_err(|_| refuse(SignatureError::Malformed("x-line-signature")))?;
        let mut m = match Hmac::<Sha256>::new_from_slice(self.secret.expose().as_bytes()) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC accepts any key length"),
        };
        m.update(req.body);
        m.verify_slice(&given)
            .map_err(|_| refuse(SignatureError::Mismatch))
    }

    /// The events of one request, each taken or let go; none (the console's check): 200.
    fn read(&self, req: &Request<'_>) -> Result<Taken, Refused> {
        let body: Value = match serde_json::from_slice(req.body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Err(malformed("the body is not a JSON object")),
            Err(e) => return Err(malformed(format!("the body is not JSON: {e}"))),
        };
        let Some(events) = body["events"].as_array() else {
            return Err(malformed("the body has no `events` list"));
        };
        let name = &self.instance.name;
        let mut messages = Vec::new();
        for e in events {
            let Some(id) = e["webhookEventId"].as_str().filter(|s| !s.is_empty()) else {
                tracing::warn!(
                    platform = "line",
                    "line `{name}`: an event without webhookEventId: let go (nothing to recognise a redelivery by)"
                );
                continue;
            };
            let redelivery = e["deliveryContext"]["isRedelivery"].as_bool() == Some(true);
            match self.map(e, id) {
                Ok(m) => {
                    if redelivery {
                        tracing::info!(platform = "line", chat_id = %m.chat_id, source_id = %id,
                            "line `{name}`: a redelivered event (taken unless stored already)");
                    }
                    messages.push(m);
                }
                Err(why) => tracing::debug!(
                    platform = "line",
                    source_id = %id,
                    "line `{name}`: event {id} let go: {why}"
                ),
            }
        }
        if events.is_empty() {
            tracing::info!(
                platform = "line",
                "line `{name}`: a request without events (the console's webhook check): 200"
            );
        }
        Ok(Taken {
            messages,
            reply: Reply::Empty,
        })
    }
}

impl Adapter for Line {
    fn max_len(&self) -> usize {
        MAX_TEXT
    }

    fn unit(&self) -> chunk::Unit {
        chunk::utf16
    }

    fn batch(&self) -> usize {
        MAX_MESSAGES
    }

    fn send_part<'a>(&'a self, target: &'a ChatTarget, part: Part<'a>) -> SendFuture<'a> {
        Box::pin(async move {
            let key = api::retry_key(part.delivery_id, part.index);
            self.api
                .push(&target.chat_id, &[part.text], &key)
                .await
                .map(|()| 1)
                .map_err(ApiError::into_send_error)
        })
    }

    fn send_parts<'a>(&'a self, target: &'a ChatTarget, parts: &'a [Part<'a>]) -> SendFuture<'a> {
        Box::pin(async move {
            let Some(first) = parts.first() else {
                return Ok(0);
            };
            let key = api::retry_key(first.delivery_id, first.index);
            let texts: Vec<&str> = parts.iter().map(|p| p.text).collect();
            self.api
                .push(&target.chat_id, &texts, &key)
                .await
                .map(|()| parts.len())
                .map_err(ApiError::into_send_error)
        })
    }

    /// The loading animation, in one-to-one chats only (LINE shows it nowhere else).
    fn typing<'a>(&'a self, target: &'a ChatTarget) -> super::Typing<'a> {
        Box::pin(async move {
            if !target.chat_id.starts_with('U') {
                return;
            }
            if let Err(e) = self.api.loading(&target.chat_id, LOADING_SECONDS).await {
                tracing::debug!(platform = "line", chat_id = %target.chat_id, "loading animation: {e}");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mentions_are_cut_by_utf16_offsets() {
        assert_eq!(without_mention("@Hermes hi", Some(0), Some(7)), " hi");
        assert_eq!(without_mention("hi @Hermes", Some(3), Some(7)), "hi ");
        // An emoji before the mention counts two units.
        assert_eq!(without_mention("😀 @Bot x", Some(3), Some(4)), "😀  x");
        // Offsets that do not fall on characters leave the text as it is.
        assert_eq!(without_mention("abc", Some(2), Some(5)), "abc");
        assert_eq!(without_mention("abc", None, Some(1)), "abc");
        assert_eq!(without_mention("abc", Some(u64::MAX), Some(1)), "abc");
        assert_eq!(without_mention("abc", Some(1), Some(u64::MAX)), "abc");
    }
}
