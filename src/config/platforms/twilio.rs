//! `[[platforms.twilio]]`: an SMS number at Twilio — the account, its auth token (which
//! signs the webhooks and authenticates the replies), the number replies come from, and
//! the exact URL Twilio calls (its signatures cover it).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::super::sections::Secret;
use super::super::webhook::{RateLimit, SecretSource, secret_source};
use super::line::looks_like_header_value;
use super::{
    AccessConfig, DEFAULT_CHAT_RATE, SectionError, UserId, access, http_url, instance_name,
    rate_limit,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileTwilio {
    name: String,
    account_sid: Option<String>,
    auth_token: Option<Secret>,
    auth_token_file: Option<PathBuf>,
    auth_token_credential: Option<String>,
    from: Option<String>,
    public_url: Option<String>,
    api_base: Option<String>,
    allowed_users: Option<Vec<UserId>>,
    #[serde(default)]
    allow_all: bool,
    #[serde(default)]
    pairing: bool,
    admins: Option<Vec<UserId>>,
    chat_rate_limit: Option<String>,
    send_rate_limit: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwilioConfig {
    pub name: String,
    /// `AC` and 32 hex digits.
    pub account_sid: String,
    /// Signs the webhooks (`X-Twilio-Signature`) and, with the account SID, authenticates
    /// the replies (Basic auth).
    pub auth_token: SecretSource,
    /// The number replies come from (`+15551234567`); a message from it is never a turn.
    pub from: String,
    /// The URL Twilio calls, exactly as configured at Twilio (scheme, host, port, path,
    /// query): the signature covers it.
    pub public_url: String,
    /// Without a trailing slash.
    pub api_base: String,
    pub access: AccessConfig,
    /// Messages one number may send (beyond: refused with one notice per episode).
    pub chat_rate_limit: RateLimit,
    /// Messages the gateway sends through this account, all numbers together.
    pub send_rate_limit: RateLimit,
}

pub const DEFAULT_TWILIO_API: &str = "https://api.twilio.com";
/// Twilio queues what a number cannot send at once; this keeps the API calls polite.
pub const DEFAULT_TWILIO_SEND_RATE: RateLimit = RateLimit {
    count: 30,
    per: Duration::from_secs(1),
    burst: 30,
};

fn account_sid(s: &str) -> bool {
    s.len() == 34 && s.starts_with("AC") && s[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

pub(super) fn twilio(list: Vec<FileTwilio>) -> Result<Vec<TwilioConfig>, SectionError> {
    let mut out: Vec<TwilioConfig> = Vec::with_capacity(list.len());
    for (i, t) in list.into_iter().enumerate() {
        let key = format!("platforms.twilio[{i}]");
        let taken: Vec<&str> = out.iter().map(|o| o.name.as_str()).collect();
        instance_name("twilio", &key, &t.name, &taken)?;
        let sid = t.account_sid.ok_or((
            format!("{key}.account_sid"),
            format!(
                "twilio `{}` has no account_sid: the Account SID on the Twilio Console's dashboard (AC…)",
                t.name
            ),
        ))?;
        if !account_sid(&sid) {
            return Err((
                format!("{key}.account_sid"),
                format!(
                    "`{}` is not an Account SID: `AC` and 32 hexadecimal digits",
                    sid.escape_default()
                ),
            ));
        }
        let auth_token = secret_source(
            &key,
            "auth_token",
            t.auth_token,
            t.auth_token_file,
            t.auth_token_credential,
        )?
        .ok_or((
            format!("{key}.auth_token"),
            format!(
                "twilio `{}` has no auth token: set auth_token (or _file, _credential); it signs Twilio's webhooks and authenticates the replies",
                t.name
            ),
        ))?;
        if let SecretSource::Inline(v) = &auth_token
            && !looks_like_header_value(v.expose())
        {
            return Err((
                format!("{key}.auth_token"),
                "the auth token is empty or holds spaces or control characters".into(),
            ));
        }
        let from = t.from.ok_or((
            format!("{key}.from"),
            format!(
                "twilio `{}` has no `from`: the Twilio number replies are sent from, e.g. \"+15551234567\"",
                t.name
            ),
        ))?;
        if from.is_empty() || from.len() > 64 || !from.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((
                format!("{key}.from"),
                format!(
                    "`{}` is not a phone number: E.164, e.g. \"+15551234567\"",
                    from.escape_default()
                ),
            ));
        }
        let public_url = t.public_url.ok_or((
            format!("{key}.public_url"),
            format!(
                "twilio `{}` has no public_url: the exact URL Twilio calls for \"A message comes in\" (https://your.host/platforms/twilio/{}), as seen from outside; Twilio's signature covers it",
                t.name, t.name
            ),
        ))?;
        // Kept exactly as written (a trailing slash changes the signature).
        http_url(&public_url, &format!("{key}.public_url"))?;
        let access = access(&key, t.allowed_users, t.allow_all, t.pairing, t.admins)?;
        let api_base = http_url(
            t.api_base.as_deref().unwrap_or(DEFAULT_TWILIO_API),
            &format!("{key}.api_base"),
        )?;
        out.push(TwilioConfig {
            name: t.name,
            account_sid: sid,
            auth_token,
            from,
            public_url,
            api_base,
            access,
            chat_rate_limit: rate_limit(
                t.chat_rate_limit,
                DEFAULT_CHAT_RATE,
                &format!("{key}.chat_rate_limit"),
            )?,
            send_rate_limit: rate_limit(
                t.send_rate_limit,
                DEFAULT_TWILIO_SEND_RATE,
                &format!("{key}.send_rate_limit"),
            )?,
        });
    }
    Ok(out)
}
