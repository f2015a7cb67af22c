//! Slack, on the Events API: Slack POSTs each event to `/platforms/slack/NAME` on the
//! webhook listener, signed with the app's signing secret; replies go out with
//! `chat.postMessage` (`api`).
//!
//! What is taken: `app_mention` in channels (public, private, group DMs) and `message` in
//! direct messages (`channel_type = im`), from people. Everything else — messages from bots
//! (the app's own replies included: `bot_id`, `subtype = bot_message`), edits, deletions,
//! joins and other subtypes, channel messages without a mention, other event types — is
//! answered 200 and let go with a debug log line. In a channel the reply goes into the
//! mention's thread (a new thread under the mention, or the thread it was written in),
//! and each thread is a conversation of its own (`slack:NAME:CHANNEL:THREAD_TS`); a direct
//! message is one conversation (`slack:NAME:CHANNEL`), answered where it was written.

pub mod api;

use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serde_json::{Value, json};

use super::webhook::{Refused, Reply, Request, Taken, WebhookInbox};
use super::{Adapter, Inbound, Instance, Part, chunk};
use crate::config::{Secret, SlackConfig};
use crate::gateway::deliveries::ChatTarget;
use crate::gateway::deliveries::chat::SendFuture;
use crate::gateway::webhooks::signature::{self, SignatureError};
use api::SlackApi;

/// Slack truncates a message's `text` past 40,000 characters and recommends at most 4,000
/// per message: longer ones are hard to read and get collapsed ("Show more"). Replies are
/// split at 4,000 characters (Unicode scalar values; the `&`, `<`, `>` escapes added after
/// the split stay far below 40,000).
pub const MAX_MESSAGE: usize = 4000;
/// Slack refuses requests whose timestamp is more than five minutes away (replays).
pub const REPLAY_WINDOW_SECS: u64 = 300;

pub struct Slack {
    instance: Arc<Instance>,
    api: SlackApi,
    signing_secret: Secret,
    /// What the configuration said, to tell a reload what it cannot change live.
    config: SlackConfig,
}

impl Slack {
    /// Reads the secrets (errors name the key and source, never the value).
    pub fn new(cfg: &SlackConfig) -> Result<Self, String> {
        let key = format!("[[platforms.slack]] `{}`", cfg.name);
        let signing_secret = cfg
            .signing_secret
            .read()
            .map_err(|e| format!("{key}: signing_secret: {e}"))?;
        if signing_secret.expose().trim().is_empty() {
            return Err(format!("{key}: signing_secret: what was read is empty"));
        }
        let token = cfg
            .bot_token
            .read()
            .map_err(|e| format!("{key}: bot_token: {e}"))?;
        if !crate::config::looks_like_slack_bot_token(token.expose()) {
            return Err(format!(
                "{key}: bot_token: what was read is not a Slack bot token (xoxb-…)"
            ));
        }
        // Nothing to start: the platform posts to the webhook listener.
        let instance = Instance::new(
            "slack",
            &cfg.name,
            "webhook",
            true,
            &cfg.access,
            cfg.chat_rate_limit,
        );
        instance.set_state("webhook");
        Ok(Slack {
            instance,
            api: SlackApi::new(&cfg.api_base, token),
            signing_secret,
            config: cfg.clone(),
        })
    }

    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// A reload: access and the inbound limit change now; secrets and the API take a
    /// restart.
    pub fn update(&self, cfg: &SlackConfig) {
        self.instance.reconfigure(&cfg.access, cfg.chat_rate_limit);
        let old = &self.config;
        if cfg.signing_secret != old.signing_secret
            || cfg.bot_token != old.bot_token
            || cfg.api_base != old.api_base
            || cfg.send_rate_limit != old.send_rate_limit
        {
            tracing::warn!(
                platform = "slack",
                "slack `{}`: signing_secret, bot_token, api_base or send_rate_limit changed: this takes a restart (SIGUSR1)",
                cfg.name
            );
        }
    }

    /// An `event_callback` as a message to take, or why it is let go.
    pub fn map(&self, envelope: &Value, event_id: &str) -> Result<Inbound, String> {
        let e = &envelope["event"];
        let kind = e["type"].as_str().unwrap_or("");
        let channel = e["channel"]
            .as_str()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| format!("a `{kind}` event without a channel"))?;
        let dm = match e["channel_type"].as_str() {
            Some(t) => t == "im",
            // app_mention carries no channel_type; direct message channels start with D.
            None => channel.starts_with('D'),
        };
        match kind {
            "app_mention" if !dm => {}
            "app_mention" => {
                return Err(
                    "an app_mention in a direct message (its message event is taken)".into(),
                );
            }
            "message" if dm => {}
            "message" => {
                return Err(
                    "a channel message (in channels only mentions, app_mention, are taken)".into(),
                );
            }
            other => return Err(format!("a `{other}` event")),
        }
        if !e["bot_id"].is_null() || e["subtype"] == "bot_message" {
            return Err("a message from a bot (the app's own replies included)".into());
        }
        if let Some(sub) = e["subtype"].as_str()
            && !matches!(sub, "file_share" | "thread_broadcast")
        {
            return Err(format!("a message with subtype `{sub}`"));
        }
        let user = e["user"]
            .as_str()
            .filter(|u| !u.is_empty())
            .ok_or("a message without a user")?;
        let own = own_user_ids(envelope);
        if own.contains(&user) {
            return Err("the app's own message".into());
        }
        let ts = e["ts"]
            .as_str()
            .filter(|t| !t.is_empty())
            .ok_or("a message without ts")?;
        let text = plain_text(
            e["text"].as_str().unwrap_or(""),
            &own,
            kind == "app_mention",
        );
        if text.is_empty() {
            return Err("a message without text (a bare mention, a file alone)".into());
        }
        let name = &self.instance.name;
        let thread = e["thread_ts"].as_str().filter(|t| !t.is_empty());
        let (chat_key, thread_id) = if dm {
            (format!("slack:{name}:{channel}"), thread.map(str::to_owned))
        } else {
            let t = thread.unwrap_or(ts);
            (format!("slack:{name}:{channel}:{t}"), Some(t.to_owned()))
        };
        Ok(Inbound {
            source_id: event_id.to_owned(),
            message_id: ts.to_owned(),
            chat_id: channel.to_owned(),
            thread_id,
            user_id: user.to_owned(),
            user_name: display_name(e, user),
            chat_key,
            text,
            // A thread in a channel is shared: the agent sees who speaks.
            sender_prefix: !dm,
            unsupported: None,
        })
    }
}

/// The app's own user ids, as the envelope says (`authorizations`, or the older
/// `authed_users`): mentions of them are not the message's words.
fn own_user_ids(envelope: &Value) -> Vec<&str> {
    let mut ids: Vec<&str> = envelope["authorizations"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|x| x["is_bot"].as_bool() != Some(false))
                .filter_map(|x| x["user_id"].as_str())
                .collect()
        })
        .unwrap_or_default();
    if let Some(a) = envelope["authed_users"].as_array() {
        ids.extend(a.iter().filter_map(Value::as_str));
    }
    ids
}

/// The user's name as far as the event says (`user_profile`), else their id.
fn display_name(e: &Value, user: &str) -> String {
    let p = &e["user_profile"];
    let n = [&p["display_name"], &p["real_name"], &p["name"]]
        .into_iter()
        .filter_map(Value::as_str)
        .find(|s| !s.trim().is_empty())
        .unwrap_or(user);
    n.chars().filter(|c| !c.is_control()).take(100).collect()
}

/// Slack's message text as a person reads it: mentions of the app removed (the first
/// mention of an `app_mention` too, when the app's id is not given), `<#C1|general>` →
/// `#general`, `<https://x|label>` → `label (https://x)`, `<!here>` → `@here`, and
/// `&amp;` `&lt;` `&gt;` unescaped.
pub fn plain_text(text: &str, own: &[&str], mention: bool) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut stripped_one = false;
    while let Some(open) = rest.find('<') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let Some(close) = after.find('>') else {
            out.push_str(&rest[open..]);
            rest = "";
            break;
        };
        let inner = &after[..close];
        rest = &after[close + 1..];
        let (target, label) = match inner.split_once('|') {
            Some((t, l)) => (t, Some(l)),
            None => (inner, None),
        };
        if let Some(id) = target.strip_prefix('@') {
            let ours = own.contains(&id) || (own.is_empty() && mention && !stripped_one);
            if ours {
                stripped_one = true;
                // "<@U1> hi" → "hi", "hey <@U1> there" → "hey there".
                if (out.is_empty() || out.ends_with(' ')) && rest.starts_with(' ') {
                    rest = &rest[1..];
                }
                continue;
            }
            out.push('@');
            out.push_str(label.unwrap_or(id));
        } else if let Some(id) = target.strip_prefix('#') {
            out.push('#');
            out.push_str(label.unwrap_or(id));
        } else if let Some(special) = target.strip_prefix('!') {
            out.push('@');
            out.push_str(label.unwrap_or(special.split('^').next().unwrap_or(special)));
        } else {
            match label {
                Some(l) if l != target && !target.ends_with(l) => {
                    out.push_str(l);
                    out.push_str(" (");
                    out.push_str(target);
                    out.push(')');
                }
                _ => out.push_str(target),
            }
        }
    }
    out.push_str(rest);
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
        .trim()
        .to_owned()
}

/// The three characters Slack's text format reserves, escaped.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            c => out.push(c),
        }
    }
    out
}

fn now_secs() -> i64 {
    crate::store::now_ms() / 1000
}

impl WebhookInbox for Slack {
    fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// `X-Slack-Signature` over `v0:TIMESTAMP:BODY` with the signing secret; a timestamp
    /// more than five minutes away is a replay.
    fn verify(&self, req: &Request<'_>) -> Result<(), Refused> {
        signature::verify_slack(
            self.signing_secret.expose().as_bytes(),
            req.headers,
            req.body,
            now_secs(),
            REPLAY_WINDOW_SECS,
        )
        .map_err(|e| match e {
            SignatureError::Stale(skew, window) => Refused::unauthorized(
                "stale_timestamp",
                format!(
                    "X-Slack-Request-Timestamp is {skew}s away from the gateway's clock, outside Slack's {window}s: a replay, or a clock that is off"
                ),
            ),
            e => Refused::unauthorized(e.code(), format!("X-Slack-Signature: {e}")),
        })
    }

    /// `url_verification` is answered with its challenge; an `event_callback` with a
    /// message is 200 once committed (a retry of a stored `event_id` runs nothing); other
    /// events and types are 200 at once.
    fn read(&self, req: &Request<'_>) -> Result<Taken, Refused> {
        let v: Value = match serde_json::from_slice(req.body) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => return Err(malformed("the body is not a JSON object")),
            Err(e) => return Err(malformed(format!("the body is not JSON: {e}"))),
        };
        let name = &self.instance.name;
        match v["type"].as_str() {
            Some("url_verification") => {
                let Some(challenge) = v["challenge"].as_str() else {
                    return Err(malformed("a url_verification without a challenge"));
                };
                tracing::info!(
                    platform = "slack",
                    "slack `{name}`: Request URL verified (url_verification answered)"
                );
                Ok(Taken::nothing(Reply::Json(json!({"challenge": challenge}))))
            }
            Some("event_callback") => {
                let Some(event_id) = v["event_id"].as_str().filter(|i| !i.is_empty()) else {
                    return Err(malformed("an event_callback without event_id"));
                };
                if !v["event"].is_object() {
                    return Err(malformed("an event_callback without an event"));
                }
                if let Some(n) = req.headers.get("x-slack-retry-num") {
                    tracing::debug!(
                        platform = "slack",
                        source_id = event_id,
                        "slack `{name}`: event {event_id} sent again (retry {:?}, {:?})",
                        n,
                        req.headers.get("x-slack-retry-reason")
                    );
                }
                match self.map(&v, event_id) {
                    Ok(m) => Ok(Taken {
                        messages: vec![m],
                        reply: Reply::Empty,
                    }),
                    Err(why) => {
                        tracing::debug!(
                            platform = "slack",
                            source_id = event_id,
                            "slack `{name}`: event {event_id} let go: {why}"
                        );
                        Ok(Taken::nothing(Reply::Empty))
                    }
                }
            }
            Some("app_rate_limited") => {
                tracing::warn!(
                    platform = "slack",
                    "slack `{name}`: Slack says the app went over the Events API's limit (30,000 events an hour per workspace) and drops events for a while"
                );
                Ok(Taken::nothing(Reply::Empty))
            }
            Some(other) => {
                tracing::debug!(
                    platform = "slack",
                    "slack `{name}`: a request of type `{}` let go",
                    other.escape_default()
                );
                Ok(Taken::nothing(Reply::Empty))
            }
            None => Err(malformed("the body has no type")),
        }
    }
}

fn malformed(message: impl Into<String>) -> Refused {
    Refused::new(StatusCode::BAD_REQUEST, "malformed_event", message)
}

impl Adapter for Slack {
    fn max_len(&self) -> usize {
        MAX_MESSAGE
    }

    fn unit(&self) -> chunk::Unit {
        chunk::chars
    }

    /// No "typing…" for bots on the Events API: nothing to show.
    fn typing<'a>(&'a self, _target: &'a ChatTarget) -> super::Typing<'a> {
        Box::pin(async {})
    }

    fn send_part<'a>(&'a self, target: &'a ChatTarget, part: Part<'a>) -> SendFuture<'a> {
        Box::pin(async move {
            let mut body = json!({
                "channel": target.chat_id,
                "text": escape(part.text),
                "unfurl_links": false,
                "unfurl_media": false,
            });
            if let Some(t) = &target.thread_id {
                body["thread_ts"] = t.as_str().into();
            }
            self.api
                .call("chat.postMessage", &body, Duration::from_secs(30))
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
    fn slack_text_reads_as_a_person_reads_it() {
        assert_eq!(
            plain_text("<@U0BOT> what is &lt;b&gt; &amp; why", &["U0BOT"], true),
            "what is <b> & why"
        );
        // Unknown app id: the first mention of an app_mention is the app's.
        assert_eq!(
            plain_text("<@U0BOT> ask <@U0ALICE>", &[], true),
            "ask @U0ALICE"
        );
        assert_eq!(
            plain_text(
                "see <https://example.org|the site> in <#C123|general> <!here> <https://x.org>",
                &["U0BOT"],
                false
            ),
            "see the site (https://example.org) in #general @here https://x.org"
        );
        assert_eq!(
            plain_text("hey <@U0BOT> there", &["U0BOT"], true),
            "hey there"
        );
        assert_eq!(plain_text("<@U0BOT>", &["U0BOT"], true), "");
        assert_eq!(plain_text("a < b", &[], false), "a < b");
    }

    #[test]
    fn replies_escape_what_slack_reserves() {
        assert_eq!(escape("a < b && c > d"), "a &lt; b &amp;&amp; c &gt; d");
        assert_eq!(escape("`code`"), "`code`");
    }
}
