//! Twilio SMS: Twilio's "A message comes in" webhook (HTTP POST, form-encoded) on the
//! webhook listener, the Messages API out. A small client on the gateway's hyper stack
//! (`api`).
//!
//! Every request is proven by `X-Twilio-Signature`: base64 HMAC-SHA1, keyed with the auth
//! token, of the URL Twilio called (`public_url`, exactly as configured there) followed by
//! each form parameter's name and value, sorted by name — checked in constant time before
//! anything is read. A message is deduplicated by its `MessageSid`, answered with an
//! empty TwiML `<Response/>` once committed (the reply goes out through the API, so it is
//! retried like every reply).
//!
//! What is taken: a message with a non-empty `Body` (the text; media attached to it is
//! not passed on). Let go with a debug log line, still answered with TwiML: a message
//! without text (media only), a message from the configured `from` number itself (no
//! loops), and requests that carry no `Body` at all (status callbacks).
//!
//! Sessions: `twilio:NAME:FROM_NUMBER`, one per phone number. Replies: `To` the sender,
//! `From` the configured number, split at 1,600 characters.

pub mod api;

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use http::StatusCode;
use sha1::Sha1;

use super::webhook::{Refused, Reply, Request, Taken, WebhookInbox};
use super::{Adapter, Inbound, Instance, Part, chunk};
use crate::config::{RateLimit, Secret, TwilioConfig};
use crate::gateway::deliveries::ChatTarget;
use crate::gateway::deliveries::chat::SendFuture;
use crate::gateway::webhooks::signature::SignatureError;
use api::{ApiError, TwilioApi};

/// A message's `Body` limit, counted in UTF-16 code units (UCS-2, as SMS encodes it).
pub const MAX_BODY: usize = 1600;
const SIGNATURE_HEADER: &str = "x-twilio-signature";
/// Twilio's newer shared-key signing names its algorithm here; the auth token's is SHA-1.
const SETTINGS_HEADER: &str = "x-twilio-webhooks-signature-settings";
/// The answer to every webhook: no message from TwiML (replies go through the API).
pub const EMPTY_TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>";

pub struct Twilio {
    instance: Arc<Instance>,
    api: TwilioApi,
    token: Secret,
    from: String,
    /// The URLs a signature may cover: `public_url` as configured, and with its default
    /// port added or removed (Twilio signs either, as its own libraries accept).
    urls: Vec<String>,
    send_rate: RateLimit,
    config: TwilioConfig,
}

/// `url` with its default port written out, or taken out: the other spelling Twilio may
/// have signed.
fn other_spelling(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme {
        "https" => "443",
        "http" => "80",
        _ => return None,
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    let host_end = if hostport.starts_with('[') {
        hostport.find(']').map_or(hostport.len(), |i| i + 1)
    } else {
        hostport.find(':').unwrap_or(hostport.len())
    };
    let (host, port) = hostport.split_at(host_end);
    let other = match port.strip_prefix(':') {
        Some(p) if p == default => host.to_owned(),
        Some(_) => return None,
        None => format!("{host}:{default}"),
    };
    Some(format!("{scheme}://{userinfo}{other}{tail}"))
}

/// What Twilio signs: the URL, then each parameter name and value, names sorted and the
/// values of one name sorted, repeats counted once (as Twilio's libraries do).
pub fn signed_text(url: &str, params: &[(String, String)]) -> String {
    let mut sorted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (k, v) in params {
        sorted.entry(k).or_default().push(v);
    }
    let mut s = url.to_owned();
    for (k, mut vs) in sorted {
        vs.sort_unstable();
        vs.dedup();
        for v in vs {
            s.push_str(k);
            s.push_str(v);
        }
    }
    s
}

fn hmac_sha1(key: &[u8]) -> Hmac<Sha1> {
    match Hmac::<Sha1>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC accepts any key length"),
    }
}

impl Twilio {
    /// Reads the auth token (errors name the key and source, never the value).
    pub fn new(cfg: &TwilioConfig) -> Result<Self, String> {
        let key = format!("[[platforms.twilio]] `{}`", cfg.name);
        let token = cfg
            .auth_token
            .read()
            .map_err(|e| format!("{key}: auth_token: {e}"))?;
        let token = Secret::new(token.expose().trim());
        if !crate::config::looks_like_header_value(token.expose()) {
            return Err(format!(
                "{key}: auth_token: what was read is empty or holds spaces or control characters"
            ));
        }
        let instance = Instance::new(
            "twilio",
            &cfg.name,
            "webhook",
            true,
            &cfg.access,
            cfg.chat_rate_limit,
        );
        instance.set_state("webhook");
        let mut urls = vec![cfg.public_url.clone()];
        urls.extend(other_spelling(&cfg.public_url));
        Ok(Twilio {
            instance,
            api: TwilioApi::new(&cfg.api_base, &cfg.account_sid, token.clone()),
            token,
            from: cfg.from.clone(),
            urls,
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

    pub fn api(&self) -> &TwilioApi {
        &self.api
    }

    /// A reload: access and the inbound limit change now; the rest takes a restart.
    pub fn update(&self, cfg: &TwilioConfig) {
        self.instance.reload(&cfg.access, cfg.chat_rate_limit);
        let old = &self.config;
        if cfg.account_sid != old.account_sid
            || cfg.auth_token != old.auth_token
            || cfg.from != old.from
            || cfg.public_url != old.public_url
            || cfg.api_base != old.api_base
            || cfg.send_rate_limit != old.send_rate_limit
        {
            tracing::warn!(
                platform = "twilio",
                "twilio `{}`: account_sid, auth_token, from, public_url, api_base or send_rate_limit changed: this takes a restart (SIGUSR1)",
                cfg.name
            );
        }
    }

    /// The form's parameters as a message to take, or why it is let go.
    pub fn map(&self, params: &[(String, String)]) -> Result<Result<Inbound, String>, Refused> {
        let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let Some(sid) = get("MessageSid").filter(|s| !s.is_empty()) else {
            return Err(malformed("the form has no MessageSid"));
        };
        let Some(body) = get("Body") else {
            return Ok(Err(format!(
                "{sid}: no Body (a status callback: {})",
                get("MessageStatus").unwrap_or("?")
            )));
        };
        let Some(from) = get("From").filter(|s| !s.is_empty()) else {
            return Err(malformed("the form has no From"));
        };
        if from == self.from {
            return Ok(Err(format!(
                "{sid}: a message from the gateway's own number"
            )));
        }
        let text = body.trim();
        if text.is_empty() {
            return Ok(Err(format!(
                "{sid}: no text ({} media)",
                get("NumMedia").unwrap_or("0")
            )));
        }
        let name = &self.instance.name;
        Ok(Ok(Inbound {
            source_id: sid.to_owned(),
            message_id: sid.to_owned(),
            chat_id: from.to_owned(),
            thread_id: None,
            user_id: from.to_owned(),
            user_name: from.chars().filter(|c| !c.is_control()).take(64).collect(),
            chat_key: format!("twilio:{name}:{from}"),
            text: text.to_owned(),
            sender_prefix: false,
            unsupported: None,
        }))
    }
}

fn malformed(message: impl Into<String>) -> Refused {
    Refused::new(StatusCode::BAD_REQUEST, "malformed_body", message)
}

fn form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).into_owned().collect()
}

fn twiml() -> Reply {
    Reply::Text {
        content_type: "text/xml",
        text: EMPTY_TWIML.to_owned(),
    }
}

impl WebhookInbox for Twilio {
    fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    /// `X-Twilio-Signature`: base64 HMAC-SHA1(auth token, URL + sorted parameters).
    fn verify(&self, req: &Request<'_>) -> Result<(), Refused> {
        let refuse =
            |e: SignatureError| Refused::unauthorized(e.code(), format!("X-Twilio-Signature: {e}"));
        if let Some(s) = req.headers.get(SETTINGS_HEADER) {
            let s = s.to_str().unwrap_or("");
            let algorithm = s
                .split(',')
                .find_map(|p| p.trim().strip_prefix("algorithm="))
                .unwrap_or("HMAC_SHA1");
            if !algorithm.eq_ignore_ascii_case("HMAC_SHA1") {
                return Err(Refused::unauthorized(
                    "invalid_signature",
                    format!(
                        "the request is signed with a shared key ({algorithm}), not the auth token: only auth-token (HMAC-SHA1) signatures are checked here"
                    ),
                ));
            }
        }
        let given = req
            .headers
            .get(SIGNATURE_HEADER)
            .ok_or(SignatureError::Missing("x-twilio-signature"))
            .map_err(refuse)?;
        let given = B64
            .decode(given.as_bytes())
            .map_err(|_| refuse(SignatureError::Malformed("x-twilio-signature")))?;
        let params = form(req.body);
        let mut ok = false;
        for url in &self.urls {
            let mut m = hmac_sha1(self.token.expose().as_bytes());
            m.update(signed_text(url, &params).as_bytes());
            ok |= m.verify_slice(&given).is_ok();
        }
        if ok {
            Ok(())
        } else {
            Err(refuse(SignatureError::Mismatch))
        }
    }

    fn read(&self, req: &Request<'_>) -> Result<Taken, Refused> {
        let form_type = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.trim_start()
                    .to_ascii_lowercase()
                    .starts_with("application/x-www-form-urlencoded")
            });
        if !form_type {
            return Err(malformed(
                "the body is not a form (Content-Type: application/x-www-form-urlencoded)",
            ));
        }
        if std::str::from_utf8(req.body).is_err() {
            return Err(malformed("the form is not UTF-8"));
        }
        let params = form(req.body);
        match self.map(&params)? {
            Ok(m) => Ok(Taken {
                messages: vec![m],
                reply: twiml(),
            }),
            Err(why) => {
                tracing::debug!(
                    platform = "twilio",
                    "twilio `{}`: let go: {why}",
                    self.instance.name
                );
                Ok(Taken::nothing(twiml()))
            }
        }
    }
}

impl Adapter for Twilio {
    fn max_len(&self) -> usize {
        MAX_BODY
    }

    fn unit(&self) -> chunk::Unit {
        chunk::utf16
    }

    fn send_part<'a>(&'a self, target: &'a ChatTarget, part: Part<'a>) -> SendFuture<'a> {
        Box::pin(async move {
            let sid = self
                .api
                .send(&target.chat_id, &self.from, part.text)
                .await
                .map_err(ApiError::into_send_error)?;
            tracing::debug!(platform = "twilio", chat_id = %target.chat_id, "Twilio took message {sid}");
            Ok(1)
        })
    }

    /// SMS shows no "typing…".
    fn typing<'a>(&'a self, _target: &'a ChatTarget) -> super::Typing<'a> {
        Box::pin(async {})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    // Twilio's documentation ("Webhooks security"), its example request and signature
    // (also what twilio-python's RequestValidator.compute_signature gives).
    #[test]
    fn twilio_documentation_example() {
        let url = "https://mycompany.com/myapp.php?foo=1&bar=2";
        let params = p(&[
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]);
        let mut m = hmac_sha1(b"12345");
        m.update(signed_text(url, &params).as_bytes());
        assert_eq!(
            B64.encode(m.finalize().into_bytes()),
            "GvWf1cFY/Q7PnoempGyD5oXAezc="
        );
    }

    #[test]
    fn repeated_names_sort_their_values_once() {
        let params = p(&[("b", "2"), ("a", "z"), ("a", "y"), ("a", "y")]);
        assert_eq!(signed_text("u", &params), "uayazb2");
    }

    #[test]
    fn the_other_spelling_adds_or_removes_the_default_port() {
        assert_eq!(
            other_spelling("https://h.example/p?x=1").as_deref(),
            Some("https://h.example:443/p?x=1")
        );
        assert_eq!(
            other_spelling("https://h.example:443/p").as_deref(),
            Some("https://h.example/p")
        );
        assert_eq!(other_spelling("http://h:80").as_deref(), Some("http://h"));
        assert_eq!(other_spelling("http://h:8080/p"), None);
        assert_eq!(
            other_spelling("http://[::1]/x").as_deref(),
            Some("http://[::1]:80/x")
        );
    }
}
