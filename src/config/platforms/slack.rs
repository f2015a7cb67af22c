//! `[[platforms.slack]]`: a Slack app on the Events API — its signing secret (inbound
//! requests), its bot token (replies) and who may talk to the agent.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::super::sections::Secret;
use super::super::webhook::{RateLimit, SecretSource, secret_source, valid_route_name};
use super::{AccessConfig, DEFAULT_CHAT_RATE, SectionError, UserId, access, http_url, rate_limit};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSlack {
    name: String,
    signing_secret: Option<Secret>,
    signing_secret_file: Option<PathBuf>,
    signing_secret_credential: Option<String>,
    bot_token: Option<Secret>,
    bot_token_file: Option<PathBuf>,
    bot_token_credential: Option<String>,
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
pub struct SlackConfig {
    pub name: String,
    /// Checks `X-Slack-Signature` (Basic Information → App Credentials → Signing Secret).
    pub signing_secret: SecretSource,
    /// `xoxb-…` (OAuth & Permissions → Bot User OAuth Token): `chat.postMessage`.
    pub bot_token: SecretSource,
    /// The Web API, without a trailing slash: `https://slack.com/api`.
    pub api_base: String,
    pub access: AccessConfig,
    pub chat_rate_limit: RateLimit,
    pub send_rate_limit: RateLimit,
}

pub const DEFAULT_SLACK_API: &str = "https://slack.com/api";
/// `chat.postMessage` is about one message a second per channel, with bursts; across
/// channels a workspace allows far more. A 429 says how long to wait (`Retry-After`).
pub const DEFAULT_SLACK_SEND_RATE: RateLimit = RateLimit {
    count: 20,
    per: Duration::from_secs(1),
    burst: 20,
};

/// A bot token: `xoxb-…` (or a rotating one, `xoxe.xoxb-…`), printable, no spaces.
pub fn looks_like_slack_bot_token(t: &str) -> bool {
    (t.starts_with("xoxb-") || t.starts_with("xoxe.xoxb-"))
        && t.len() > 10
        && t.bytes().all(|b| b.is_ascii_graphic())
}

pub(super) fn slack(list: Vec<FileSlack>) -> Result<Vec<SlackConfig>, SectionError> {
    let mut out: Vec<SlackConfig> = Vec::with_capacity(list.len());
    for (i, s) in list.into_iter().enumerate() {
        let key = format!("platforms.slack[{i}]");
        if !valid_route_name(&s.name) {
            return Err((
                format!("{key}.name"),
                format!(
                    "`{}` is not a platform name: use 1 to 64 letters, digits, `-`, `_` or `.` (the Request URL is /platforms/slack/NAME)",
                    s.name.escape_default()
                ),
            ));
        }
        if out.iter().any(|o| o.name == s.name) {
            return Err((
                format!("{key}.name"),
                format!(
                    "slack `{}` is defined twice: each [[platforms.slack]] needs a name of its own",
                    s.name
                ),
            ));
        }
        let signing_secret = secret_source(
            &key,
            "signing_secret",
            s.signing_secret,
            s.signing_secret_file,
            s.signing_secret_credential,
        )?
        .ok_or((
            format!("{key}.signing_secret"),
            format!(
                "slack `{}` has no signing secret: set signing_secret, signing_secret_file or signing_secret_credential (the app's Basic Information page shows it); nothing else proves a request came from Slack",
                s.name
            ),
        ))?;
        let bot_token = secret_source(
            &key,
            "bot_token",
            s.bot_token,
            s.bot_token_file,
            s.bot_token_credential,
        )?
        .ok_or((
            format!("{key}.bot_token"),
            format!(
                "slack `{}` has no bot token: set bot_token, bot_token_file or bot_token_credential (OAuth & Permissions → Bot User OAuth Token, xoxb-…)",
                s.name
            ),
        ))?;
        if let SecretSource::Inline(v) = &bot_token
            && !looks_like_slack_bot_token(v.expose())
        {
            return Err((
                format!("{key}.bot_token"),
                "a Slack bot token starts with xoxb- (OAuth & Permissions → Bot User OAuth Token)"
                    .into(),
            ));
        }
        let access = access(&key, s.allowed_users, s.allow_all, s.pairing, s.admins)?;
        let api_base = http_url(
            s.api_base.as_deref().unwrap_or(DEFAULT_SLACK_API),
            &format!("{key}.api_base"),
        )?;
        out.push(SlackConfig {
            name: s.name,
            signing_secret,
            bot_token,
            api_base,
            access,
            chat_rate_limit: rate_limit(
                s.chat_rate_limit,
                DEFAULT_CHAT_RATE,
                &format!("{key}.chat_rate_limit"),
            )?,
            send_rate_limit: rate_limit(
                s.send_rate_limit,
                DEFAULT_SLACK_SEND_RATE,
                &format!("{key}.send_rate_limit"),
            )?,
        });
    }
    Ok(out)
}
