//! `[[platforms.line]]`: a LINE Messaging API channel — its secret (which signs the
//! webhooks), its access token (which sends the replies), and who may talk to the agent.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::super::sections::Secret;
use super::super::webhook::{RateLimit, SecretSource, secret_source};
use super::{
    AccessConfig, DEFAULT_CHAT_RATE, SectionError, UserId, access, http_url, instance_name,
    rate_limit,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLine {
    name: String,
    channel_secret: Option<Secret>,
    channel_secret_file: Option<PathBuf>,
    channel_secret_credential: Option<String>,
    channel_access_token: Option<Secret>,
    channel_access_token_file: Option<PathBuf>,
    channel_access_token_credential: Option<String>,
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
pub struct LineConfig {
    pub name: String,
    /// Signs every webhook (`X-Line-Signature`).
    pub channel_secret: SecretSource,
    /// A long-lived channel access token: `Authorization: Bearer` of the replies.
    pub channel_access_token: SecretSource,
    /// Without a trailing slash.
    pub api_base: String,
    pub access: AccessConfig,
    /// Messages one chat may send (beyond: refused with one notice per episode).
    pub chat_rate_limit: RateLimit,
    /// Push requests the gateway makes through this channel, all chats together.
    pub send_rate_limit: RateLimit,
}

pub const DEFAULT_LINE_API: &str = "https://api.line.me";
/// LINE allows 2,000 push requests a second per channel; a tenth of it leaves room for
/// other programs on the same channel.
pub const DEFAULT_LINE_SEND_RATE: RateLimit = RateLimit {
    count: 200,
    per: Duration::from_secs(1),
    burst: 200,
};

pub(super) fn line(list: Vec<FileLine>) -> Result<Vec<LineConfig>, SectionError> {
    let mut out: Vec<LineConfig> = Vec::with_capacity(list.len());
    for (i, l) in list.into_iter().enumerate() {
        let key = format!("platforms.line[{i}]");
        let taken: Vec<&str> = out.iter().map(|o| o.name.as_str()).collect();
        instance_name("line", &key, &l.name, &taken)?;
        let channel_secret = secret_source(
            &key,
            "channel_secret",
            l.channel_secret,
            l.channel_secret_file,
            l.channel_secret_credential,
        )?
        .ok_or((
            format!("{key}.channel_secret"),
            format!(
                "line `{}` has no channel secret: set channel_secret (or _file, _credential); the LINE Developers console shows it under Basic settings, and nothing else proves a webhook came from LINE",
                l.name
            ),
        ))?;
        if let SecretSource::Inline(v) = &channel_secret
            && v.expose().trim().is_empty()
        {
            return Err((
                format!("{key}.channel_secret"),
                "the channel secret is empty".into(),
            ));
        }
        let channel_access_token = secret_source(
            &key,
            "channel_access_token",
            l.channel_access_token,
            l.channel_access_token_file,
            l.channel_access_token_credential,
        )?
        .ok_or((
            format!("{key}.channel_access_token"),
            format!(
                "line `{}` has no channel access token: set channel_access_token (or _file, _credential); issue a long-lived one in the LINE Developers console under Messaging API",
                l.name
            ),
        ))?;
        if let SecretSource::Inline(v) = &channel_access_token
            && !looks_like_header_value(v.expose())
        {
            return Err((
                format!("{key}.channel_access_token"),
                "the channel access token is empty or holds spaces or control characters".into(),
            ));
        }
        let access = access(&key, l.allowed_users, l.allow_all, l.pairing, l.admins)?;
        let api_base = http_url(
            l.api_base.as_deref().unwrap_or(DEFAULT_LINE_API),
            &format!("{key}.api_base"),
        )?;
        out.push(LineConfig {
            name: l.name,
            channel_secret,
            channel_access_token,
            api_base,
            access,
            chat_rate_limit: rate_limit(
                l.chat_rate_limit,
                DEFAULT_CHAT_RATE,
                &format!("{key}.chat_rate_limit"),
            )?,
            send_rate_limit: rate_limit(
                l.send_rate_limit,
                DEFAULT_LINE_SEND_RATE,
                &format!("{key}.send_rate_limit"),
            )?,
        });
    }
    Ok(out)
}

/// A token that can go in an HTTP header: printable ASCII, no spaces.
pub fn looks_like_header_value(t: &str) -> bool {
    !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic())
}
