//! `[[platforms.*]]`: which chat platforms the gateway serves, with which credentials,
//! and who may talk to the agent through them. Each platform's section is a file here;
//! what they share (user lists, access rules, rates, URLs) is below.

mod line;
mod slack;
mod telegram;
mod twilio;
mod whatsapp;

use std::time::Duration;

use serde::Deserialize;

use super::webhook::{RateLimit, rate};

use line::FileLine;
pub use line::{LineConfig, looks_like_header_value};
use slack::FileSlack;
pub use slack::{SlackConfig, looks_like_slack_bot_token};
use telegram::FileTelegram;
pub use telegram::{GroupSessions, TelegramConfig, TelegramMode, looks_like_bot_token};
use twilio::FileTwilio;
pub use twilio::TwilioConfig;
use whatsapp::FileWhatsApp;
pub use whatsapp::WhatsAppConfig;

type SectionError = (String, String);

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FilePlatforms {
    #[serde(default)]
    telegram: Vec<FileTelegram>,
    #[serde(default)]
    slack: Vec<FileSlack>,
    #[serde(default)]
    whatsapp: Vec<FileWhatsApp>,
    #[serde(default)]
    line: Vec<FileLine>,
    #[serde(default)]
    twilio: Vec<FileTwilio>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PlatformsConfig {
    pub telegram: Vec<TelegramConfig>,
    pub slack: Vec<SlackConfig>,
    pub whatsapp: Vec<WhatsAppConfig>,
    pub line: Vec<LineConfig>,
    pub twilio: Vec<TwilioConfig>,
}

impl PlatformsConfig {
    pub fn is_empty(&self) -> bool {
        self.telegram.is_empty()
            && self.slack.is_empty()
            && self.whatsapp.is_empty()
            && self.line.is_empty()
            && self.twilio.is_empty()
    }

    /// Whether an instance `name` of `platform` is configured.
    pub fn has(&self, platform: &str, name: &str) -> bool {
        match platform {
            "telegram" => self.telegram.iter().any(|t| t.name == name),
            "slack" => self.slack.iter().any(|t| t.name == name),
            "whatsapp" => self.whatsapp.iter().any(|t| t.name == name),
            "line" => self.line.iter().any(|t| t.name == name),
            "twilio" => self.twilio.iter().any(|t| t.name == name),
            _ => false,
        }
    }
}

/// Who may talk to the agent through one platform instance. Deny by default.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessConfig {
    /// The platform's user ids allowed.
    pub allowed_users: Vec<String>,
    /// Everyone may.
    pub allow_all: bool,
    /// An unknown user gets a one-time code for the operator to approve.
    pub pairing: bool,
    /// May use `/restart` (and are allowed).
    pub admins: Vec<String>,
}

/// A platform's user id: Telegram's are numbers, other platforms' are strings.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum UserId {
    Number(i64),
    Text(String),
}

impl UserId {
    fn into_string(self) -> String {
        match self {
            UserId::Number(n) => n.to_string(),
            UserId::Text(s) => s,
        }
    }
}

/// A person types a few messages a minute; a flood is far beyond.
pub const DEFAULT_CHAT_RATE: RateLimit = RateLimit {
    count: 20,
    per: Duration::from_secs(60),
    burst: 20,
};
fn users(v: Option<Vec<UserId>>, key: &str) -> Result<Vec<String>, SectionError> {
    let mut out = Vec::new();
    for (i, u) in v.unwrap_or_default().into_iter().enumerate() {
        let s = u.into_string();
        if s.is_empty() || s.len() > 64 || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err((
                format!("{key}[{i}]"),
                format!(
                    "`{}` is not a user id: a platform's user id, e.g. 123456789",
                    s.escape_default()
                ),
            ));
        }
        out.push(s);
    }
    Ok(out)
}

fn rate_limit(s: Option<String>, default: RateLimit, key: &str) -> Result<RateLimit, SectionError> {
    match s {
        None => Ok(default),
        Some(s) => {
            let (count, per) = rate(&s).ok_or((
                key.to_owned(),
                format!("`{s}` is not a rate: expected \"N/s\", \"N/min\" or \"N/h\""),
            ))?;
            Ok(RateLimit {
                count,
                per,
                burst: count,
            })
        }
    }
}

fn http_url(url: &str, key: &str) -> Result<String, SectionError> {
    if !(url.starts_with("http://") || url.starts_with("https://"))
        || url.parse::<http::Uri>().is_err()
    {
        return Err((
            key.to_owned(),
            format!("`{url}` is not an http:// or https:// URL"),
        ));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// An instance's `name`: a URL segment (`/platforms/PLATFORM/NAME`), unique per platform.
fn instance_name(
    platform: &str,
    key: &str,
    name: &str,
    taken: &[&str],
) -> Result<(), SectionError> {
    if !super::webhook::valid_route_name(name) {
        return Err((
            format!("{key}.name"),
            format!(
                "`{}` is not a platform name: use 1 to 64 letters, digits, `-`, `_` or `.` (the webhook URL is /platforms/{platform}/NAME)",
                name.escape_default()
            ),
        ));
    }
    if taken.contains(&name) {
        return Err((
            format!("{key}.name"),
            format!(
                "{platform} `{name}` is defined twice: each [[platforms.{platform}]] needs a name of its own"
            ),
        ));
    }
    Ok(())
}

/// Who may talk to the agent, as a section gives it: `allowed_users`, `allow_all`,
/// `pairing`, `admins`. `key` is the section's path (`platforms.telegram[0]`).
fn access(
    key: &str,
    allowed_users: Option<Vec<UserId>>,
    allow_all: bool,
    pairing: bool,
    admins: Option<Vec<UserId>>,
) -> Result<AccessConfig, SectionError> {
    let allowed_users = users(allowed_users, &format!("{key}.allowed_users"))?;
    if allow_all && !allowed_users.is_empty() {
        return Err((
            format!("{key}.allow_all"),
            "allow_all = true lets everyone in, which makes allowed_users meaningless: keep one of them".into(),
        ));
    }
    Ok(AccessConfig {
        allowed_users,
        allow_all,
        pairing,
        admins: users(admins, &format!("{key}.admins"))?,
    })
}

pub(super) fn platforms(f: FilePlatforms) -> Result<PlatformsConfig, SectionError> {
    Ok(PlatformsConfig {
        telegram: telegram::telegram(f.telegram)?,
        slack: slack::slack(f.slack)?,
        whatsapp: whatsapp::whatsapp(f.whatsapp)?,
        line: line::line(f.line)?,
        twilio: twilio::twilio(f.twilio)?,
    })
}
