//! `[[schedule]]`: the agent acts on a timetable. Each schedule is a cron expression in a
//! time zone, a prompt, a session (or a fresh one per run), where the output goes, and
//! what a slot missed while the gateway was down becomes.

use std::path::PathBuf;
use std::str::FromStr;

use serde::Deserialize;

use super::sections::Secret;
use super::webhook::{SecretSource, secret_source, valid_route_name};

type SectionError = (String, String);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileSchedule {
    name: String,
    cron: String,
    timezone: Option<String>,
    prompt: String,
    session: Option<String>,
    deliver: Option<FileDeliver>,
    missed: Option<Missed>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDeliver {
    #[serde(rename = "type")]
    kind: Option<String>,
    url: Option<String>,
    secret: Option<Secret>,
    secret_file: Option<PathBuf>,
    secret_credential: Option<String>,
    platform: Option<String>,
    name: Option<String>,
    chat: Option<ChatId>,
    thread: Option<ChatId>,
}

/// A chat id: Telegram's are numbers.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum ChatId {
    Number(i64),
    Text(String),
}

impl ChatId {
    fn into_string(self) -> String {
        match self {
            ChatId::Number(n) => n.to_string(),
            ChatId::Text(s) => s,
        }
    }
}

/// What a slot that fell while the gateway was down (or the clock jumped over) becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missed {
    /// The latest missed slot runs once, at start.
    RunOnce,
    /// Missed slots are let go.
    Skip,
}

/// Where a scheduled run's output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deliver {
    /// The journal.
    Log,
    /// A POST, signed like webhook deliveries (with `secret`, if any).
    Http {
        url: String,
        secret: Option<SecretSource>,
    },
    /// A chat of a configured platform instance.
    Chat {
        platform: String,
        name: String,
        chat: String,
        thread: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduleConfig {
    pub name: String,
    /// The cron expression as written (5 fields, 6 with seconds, or `@hourly`…).
    pub cron: String,
    /// An IANA time zone name; `None`: the system's.
    pub timezone: Option<String>,
    pub prompt: String,
    /// `None`: a fresh session per run.
    pub session: Option<String>,
    pub deliver: Deliver,
    pub missed: Missed,
}

impl ScheduleConfig {
    /// The parsed expression (it parsed when the configuration was read).
    pub fn parsed(&self) -> Result<croner::Cron, String> {
        parse_cron(&self.cron)
    }

    /// The time zone (it resolved when the configuration was read).
    pub fn zone(&self) -> Result<jiff::tz::TimeZone, String> {
        zone(self.timezone.as_deref())
    }

    /// The ledger route of its runs' deliveries: `schedule:NAME`.
    pub fn route(&self) -> String {
        format!("schedule:{}", self.name)
    }
}

/// A cron expression: 5 fields (minutes), 6 (seconds first), or `@hourly`, `@daily`…
pub fn parse_cron(s: &str) -> Result<croner::Cron, String> {
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Optional)
        .build()
        .parse(s.trim())
        .map_err(|e| {
            format!(
                "`{}` is not a cron expression ({e}): expected 5 fields \"MIN HOUR DOM MONTH DOW\" (e.g. \"0 8 * * 1-5\"), 6 with seconds first, or @hourly, @daily, @weekly, @monthly, @yearly",
                s.escape_default()
            )
        })
}

/// An IANA time zone, or the system's.
pub fn zone(name: Option<&str>) -> Result<jiff::tz::TimeZone, String> {
    match name {
        None => Ok(jiff::tz::TimeZone::system()),
        Some(n) => jiff::tz::TimeZone::get(n).map_err(|e| {
            format!(
                "`{}` is not a time zone this system knows ({e}): expected an IANA name such as \"Europe/Berlin\" or \"UTC\"",
                n.escape_default()
            )
        }),
    }
}

pub(super) fn schedules(list: Vec<FileSchedule>) -> Result<Vec<ScheduleConfig>, SectionError> {
    let mut out: Vec<ScheduleConfig> = Vec::with_capacity(list.len());
    for (i, s) in list.into_iter().enumerate() {
        let key = format!("schedule[{i}]");
        if !valid_route_name(&s.name) {
            return Err((
                format!("{key}.name"),
                format!(
                    "`{}` is not a schedule name: use 1 to 64 letters, digits, `-`, `_` or `.`",
                    s.name.escape_default()
                ),
            ));
        }
        if out.iter().any(|o| o.name == s.name) {
            return Err((
                format!("{key}.name"),
                format!("schedule `{}` is defined twice", s.name),
            ));
        }
        parse_cron(&s.cron).map_err(|e| (format!("{key}.cron"), e))?;
        zone(s.timezone.as_deref()).map_err(|e| (format!("{key}.timezone"), e))?;
        if s.prompt.trim().is_empty() {
            return Err((format!("{key}.prompt"), "must not be empty".into()));
        }
        if let Some(sid) = &s.session
            && (sid.is_empty() || sid.len() > 200 || !sid.bytes().all(|b| b.is_ascii_graphic()))
        {
            return Err((
                format!("{key}.session"),
                "a session id is 1 to 200 printable ASCII characters without spaces".into(),
            ));
        }
        let deliver = match s.deliver {
            None => Deliver::Log,
            Some(d) => deliver(&format!("{key}.deliver"), d)?,
        };
        out.push(ScheduleConfig {
            name: s.name,
            cron: s.cron.trim().to_owned(),
            timezone: s.timezone,
            prompt: s.prompt,
            session: s.session,
            deliver,
            missed: s.missed.unwrap_or(Missed::RunOnce),
        });
    }
    Ok(out)
}

fn deliver(key: &str, d: FileDeliver) -> Result<Deliver, SectionError> {
    if let Some(platform) = d.platform {
        let (Some(name), Some(chat)) = (d.name, d.chat) else {
            return Err((
                key.to_owned(),
                "a chat delivery needs platform, name and chat, e.g. { platform = \"telegram\", name = \"main\", chat = \"123456789\" }".into(),
            ));
        };
        return Ok(Deliver::Chat {
            platform,
            name,
            chat: chat.into_string(),
            thread: d.thread.map(ChatId::into_string),
        });
    }
    match d.kind.as_deref() {
        None | Some("log") => Ok(Deliver::Log),
        Some("http") => {
            let url = d.url.ok_or((
                format!("{key}.url"),
                "an http delivery needs url = \"https://…\"".to_owned(),
            ))?;
            if !(url.starts_with("http://") || url.starts_with("https://"))
                || http::Uri::from_str(&url).is_err()
            {
                return Err((
                    format!("{key}.url"),
                    format!("`{url}` is not an http:// or https:// URL"),
                ));
            }
            Ok(Deliver::Http {
                url,
                secret: secret_source(key, "secret", d.secret, d.secret_file, d.secret_credential)?,
            })
        }
        Some(other) => Err((
            format!("{key}.type"),
            format!(
                "`{}` is not a delivery: expected \"log\", \"http\", or a chat ({{ platform, name, chat }})",
                other.escape_default()
            ),
        )),
    }
}
