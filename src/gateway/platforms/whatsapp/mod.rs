//! WhatsApp, on Meta's Cloud API: Meta verifies the callback URL with a `GET`
//! (`hub.mode=subscribe`, `hub.verify_token`, `hub.challenge`), then POSTs the webhooks of
//! the `messages` field to `/platforms/whatsapp/NAME`, signed with the app secret
//! (`X-Hub-Signature-256`, GitHub's scheme); replies go out with
//! `POST /{version}/{phone number id}/messages` (`api`).
//!
//! What is taken, per message (`wamid…`, the dedupe key) sent to the configured phone
//! number: its text; the caption of a photo, video or document; the title of a button or
//! list reply. A voice message, audio, a sticker, a location, a contact card, or a photo,
//! video or document without a caption is answered by the gateway itself, once, saying it
//! reads text only (no turn runs). Reactions, `unsupported`/`system` messages, messages of
//! types the gateway does not know, messages to another phone number of the same app, and
//! `statuses` callbacks (sent, delivered, read — the gateway's own replies) are answered
//! 200 and stored nowhere. One conversation per WhatsApp user: `whatsapp:NAME:WA_ID`.

pub mod api;

use std::sync::Arc;

use hmac::{Hmac, Mac};
use http::StatusCode;
use serde_json::{Value, json};
use sha2::Sha256;

use super::webhook::{Refused, Reply, Request, Taken, WebhookInbox};
use super::{Adapter, Inbound, Instance, Part, chunk};
use crate::config::{Secret, WhatsAppConfig};
use crate::gateway::deliveries::ChatTarget;
use crate::gateway::deliveries::chat::SendFuture;
use crate::gateway::webhooks::signature;
use api::GraphApi;

/// A text message's `body` holds at most 4,096 characters.
pub const MAX_MESSAGE: usize = 4096;
/// The longest `hub.challenge` echoed (Meta sends a number of a few digits).
const MAX_CHALLENGE: usize = 256;

pub struct WhatsApp {
    instance: Arc<Instance>,
    api: GraphApi,
    verify_token: Secret,
    app_secret: Secret,
    phone_number_id: String,
    config: WhatsAppConfig,
}

impl WhatsApp {
    /// Reads the secrets (errors name the key and source, never the value).
    pub fn new(cfg: &WhatsAppConfig) -> Result<Self, String> {
        let key = format!("[[platforms.whatsapp]] `{}`", cfg.name);
        let read = |what: &str, s: &crate::config::SecretSource| {
            let v = s.read().map_err(|e| format!("{key}: {what}: {e}"))?;
            if v.expose().trim().is_empty() {
                return Err(format!("{key}: {what}: what was read is empty"));
            }
            Ok(v)
        };
        let verify_token = read("verify_token", &cfg.verify_token)?;
        let app_secret = read("app_secret", &cfg.app_secret)?;
        let access_token = read("access_token", &cfg.access_token)?;
        // Nothing to start: the platform posts to the webhook listener.
        let instance = Instance::new(
            "whatsapp",
            &cfg.name,
            "webhook",
            true,
            &cfg.access,
            cfg.chat_rate_limit,
        );
        instance.set_state("webhook");
        Ok(WhatsApp {
            instance,
            api: GraphApi::new(
                &cfg.api_base,
                &cfg.api_version,
                &cfg.phone_number_id,
                access_token,
            ),
            verify_token,
            app_secret,
            phone_number_id: cfg.phone_number_id.clone(),
            config: cfg.clone(),
        })
    }

    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// A reload: access and the inbound limit change now; secrets, the number and the API
    /// take a restart.
    pub fn update(&self, cfg: &WhatsAppConfig) {
        self.instance.reconfigure(&cfg.access, cfg.chat_rate_limit);
        let old = &self.config;
        if cfg.verify_token != old.verify_token
            || cfg.app_secret != old.app_secret
            || cfg.access_token != old.access_token
            || cfg.phone_number_id != old.phone_number_id
            || cfg.api_base != old.api_base
            || cfg.api_version != old.api_version
            || cfg.send_rate_limit != old.send_rate_limit
        {
            tracing::warn!(
                platform = "whatsapp",
                "whatsapp `{}`: a secret, phone_number_id, api_base, api_version or send_rate_limit changed: this takes a restart (SIGUSR1)",
                cfg.name
            );
        }
    }

    /// The messages of one webhook body, and why the others were let go.
    pub fn map(&self, body: &Value) -> Result<Vec<Inbound>, Refused> {
        let name = &self.instance.name;
        if body["object"] != "whatsapp_business_account" {
            tracing::debug!(
                platform = "whatsapp",
                "whatsapp `{name}`: a webhook for object {} let go",
                body["object"]
            );
            return Ok(Vec::new());
        }
        let entries = body["entry"]
            .as_array()
            .ok_or_else(|| malformed("a whatsapp_business_account webhook without entry"))?;
        let mut out = Vec::new();
        for change in entries
            .iter()
            .filter_map(|e| e["changes"].as_array())
            .flatten()
        {
            let field = change["field"].as_str().unwrap_or("");
            if field != "messages" {
                tracing::debug!(
                    platform = "whatsapp",
                    "whatsapp `{name}`: a `{}` change let go",
                    field.escape_default()
                );
                continue;
            }
            let value = &change["value"];
            let to = value["metadata"]["phone_number_id"].as_str().unwrap_or("");
            if to != self.phone_number_id {
                tracing::debug!(
                    platform = "whatsapp",
                    "whatsapp `{name}`: a change for phone number id {} (not ours, {}) let go",
                    to.escape_default(),
                    self.phone_number_id
                );
                continue;
            }
            if let Some(s) = value["statuses"].as_array() {
                tracing::debug!(
                    platform = "whatsapp",
                    "whatsapp `{name}`: {} status callbacks (sent, delivered, read): not stored",
                    s.len()
                );
            }
            if let Some(errors) = value["errors"].as_array() {
                for e in errors {
                    tracing::warn!(
                        platform = "whatsapp",
                        "whatsapp `{name}`: WhatsApp reports an error: {e}"
                    );
                }
            }
            for m in value["messages"].as_array().into_iter().flatten() {
                match self.message(m, &value["contacts"]) {
                    Ok(i) => out.push(i),
                    Err(why) => tracing::debug!(
                        platform = "whatsapp",
                        message_id = m["id"].as_str().unwrap_or(""),
                        "whatsapp `{name}`: message let go: {why}"
                    ),
                }
            }
        }
        Ok(out)
    }

    fn message(&self, m: &Value, contacts: &Value) -> Result<Inbound, String> {
        let id = m["id"]
            .as_str()
            .filter(|i| !i.is_empty())
            .ok_or("a message without id")?;
        let from = m["from"]
            .as_str()
            .filter(|f| !f.is_empty())
            .ok_or("a message without from")?;
        let kind = m["type"].as_str().unwrap_or("");
        let caption = |k: &str| {
            m[k]["caption"]
                .as_str()
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
        };
        let (text, unsupported) = match kind {
            "text" => (
                m["text"]["body"]
                    .as_str()
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .ok_or("a text message without body")?
                    .to_owned(),
                None,
            ),
            "image" | "video" | "document" => match caption(kind) {
                Some(c) => (c, None),
                None => (
                    String::new(),
                    Some(match kind {
                        "image" => "a photo without a caption",
                        "video" => "a video without a caption",
                        _ => "a document without a caption",
                    }),
                ),
            },
            "interactive" => {
                let i = &m["interactive"];
                let title = i["button_reply"]["title"]
                    .as_str()
                    .or_else(|| i["list_reply"]["title"].as_str())
                    .filter(|t| !t.trim().is_empty())
                    .ok_or("an interactive reply without a title")?;
                (title.to_owned(), None)
            }
            "button" => (
                m["button"]["text"]
                    .as_str()
                    .filter(|t| !t.trim().is_empty())
                    .ok_or("a button reply without text")?
                    .to_owned(),
                None,
            ),
            "audio" => (
                String::new(),
                Some(if m["audio"]["voice"].as_bool() == Some(true) {
                    "a voice message"
                } else {
                    "an audio file"
                }),
            ),
            "sticker" => (String::new(), Some("a sticker")),
            "location" => (String::new(), Some("a location")),
            "contacts" => (String::new(), Some("a contact card")),
            "reaction" => return Err("a reaction".into()),
            other => return Err(format!("a message of type `{}`", other.escape_default())),
        };
        let name = &self.instance.name;
        let profile = contacts
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["wa_id"] == from))
            .and_then(|c| c["profile"]["name"].as_str())
            .map(|n| {
                n.chars()
                    .filter(|c| !c.is_control())
                    .take(100)
                    .collect::<String>()
            })
            .filter(|n| !n.trim().is_empty());
        Ok(Inbound {
            source_id: id.to_owned(),
            message_id: id.to_owned(),
            chat_id: from.to_owned(),
            thread_id: None,
            user_id: from.to_owned(),
            user_name: match profile {
                Some(n) => format!("{n} (+{from})"),
                None => format!("+{from}"),
            },
            chat_key: format!("whatsapp:{name}:{from}"),
            text,
            sender_prefix: false,
            unsupported: unsupported.map(str::to_owned),
        })
    }
}

/// `a=1&b=x%20y` as decoded pairs (`+` is a space).
fn query_pairs(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len()
                    && b[i + 1].is_ascii_hexdigit()
                    && b[i + 2].is_ascii_hexdigit() =>
                {
                    let hex = std::str::from_utf8(&b[i + 1..i + 3])
                        .ok()
                        .and_then(|h| u8::from_str_radix(h, 16).ok());
                    if let Some(x) = hex {
                        out.push(x);
                        i += 3;
                        continue;
                    }
                    out.push(b'%');
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Two secrets compared in constant time (both through one HMAC, so that neither the
/// content nor the length leaks through timing).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    let key = b"hermes-gateway verify_token comparison";
    let (Ok(mut x), Ok(mut y)) = (
        Hmac::<Sha256>::new_from_slice(key),
        Hmac::<Sha256>::new_from_slice(key),
    ) else {
        return false;
    };
    x.update(a);
    y.update(b);
    x.verify_slice(&y.finalize().into_bytes()).is_ok()
}

fn malformed(message: impl Into<String>) -> Refused {
    Refused::new(StatusCode::BAD_REQUEST, "malformed_webhook", message)
}

impl WebhookInbox for WhatsApp {
    fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// Meta's verification of the callback URL: `hub.mode=subscribe` with our
    /// `hub.verify_token` gets `hub.challenge` back; a wrong token is 403.
    fn get(&self, query: Option<&str>) -> Option<Result<Reply, Refused>> {
        let pairs = query_pairs(query.unwrap_or(""));
        let param = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let name = &self.instance.name;
        let (Some(mode), Some(token), Some(challenge)) = (
            param("hub.mode"),
            param("hub.verify_token"),
            param("hub.challenge"),
        ) else {
            return Some(Err(Refused::new(
                StatusCode::BAD_REQUEST,
                "not_a_verification",
                "a GET is Meta's verification: hub.mode, hub.verify_token and hub.challenge are required",
            )));
        };
        if mode != "subscribe" {
            return Some(Err(Refused::new(
                StatusCode::BAD_REQUEST,
                "not_a_verification",
                format!("hub.mode is `{}`, not subscribe", mode.escape_default()),
            )));
        }
        if !same_secret(token.as_bytes(), self.verify_token.expose().as_bytes()) {
            return Some(Err(Refused::new(
                StatusCode::FORBIDDEN,
                "invalid_verify_token",
                "hub.verify_token is not this instance's verify_token",
            )));
        }
        if challenge.is_empty()
            || challenge.len() > MAX_CHALLENGE
            || challenge.chars().any(char::is_control)
        {
            return Some(Err(Refused::new(
                StatusCode::BAD_REQUEST,
                "not_a_verification",
                "hub.challenge is empty, too long or not text",
            )));
        }
        tracing::info!(
            platform = "whatsapp",
            "whatsapp `{name}`: callback URL verified (hub.challenge answered)"
        );
        self.instance.set_state("webhook");
        Some(Ok(Reply::Text {
            content_type: "text/plain; charset=utf-8",
            text: challenge.to_owned(),
        }))
    }

    /// `X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app secret, body)>`.
    fn verify(&self, req: &Request<'_>) -> Result<(), Refused> {
        signature::verify_github(self.app_secret.expose().as_bytes(), req.headers, req.body)
            .map_err(|e| Refused::unauthorized(e.code(), format!("X-Hub-Signature-256: {e}")))
    }

    /// The messages are 200 once committed (a repeated `wamid` runs nothing); a body with
    /// none (statuses, other fields) is 200 at once.
    fn read(&self, req: &Request<'_>) -> Result<Taken, Refused> {
        let v: Value = match serde_json::from_slice(req.body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Err(malformed("the body is not a JSON object")),
            Err(e) => return Err(malformed(format!("the body is not JSON: {e}"))),
        };
        Ok(Taken {
            messages: self.map(&v)?,
            reply: Reply::Empty,
        })
    }
}

impl Adapter for WhatsApp {
    fn max_len(&self) -> usize {
        MAX_MESSAGE
    }

    fn unit(&self) -> chunk::Unit {
        chunk::chars
    }

    /// The Cloud API's typing indicator needs the message marked read; not shown.
    fn typing<'a>(&'a self, _target: &'a ChatTarget) -> super::Typing<'a> {
        Box::pin(async {})
    }

    fn send_part<'a>(&'a self, target: &'a ChatTarget, part: Part<'a>) -> SendFuture<'a> {
        Box::pin(async move {
            let mut body = json!({
                "messaging_product": "whatsapp",
                "recipient_type": "individual",
                "to": target.chat_id,
                "type": "text",
                "text": {"preview_url": false, "body": part.text},
            });
            if part.index == 0
                && let Some(r) = &target.reply_to
            {
                body["context"] = json!({"message_id": r});
            }
            self.api
                .send(&body)
                .await
                .map(|_| 1)
                .map_err(api::ApiError::into_send_error)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            query_pairs("hub.mode=subscribe&hub.verify_token=a%20b+c%26&hub.challenge=1158201444"),
            vec![
                ("hub.mode".into(), "subscribe".into()),
                ("hub.verify_token".into(), "a b c&".into()),
                ("hub.challenge".into(), "1158201444".into()),
            ]
        );
        assert_eq!(
            query_pairs("a=%zz&b=%4&c"),
            vec![
                ("a".into(), "%zz".into()),
                ("b".into(), "%4".into()),
                ("c".into(), "".into())
            ]
        );
        assert_eq!(query_pairs("t=%C3%A9"), vec![("t".into(), "é".into())]);
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"abc"));
    }
}
