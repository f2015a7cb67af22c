//! `[[platforms.whatsapp]]`: a WhatsApp Business phone number on Meta's Cloud API — the
//! webhook's verify token and app secret (inbound), the access token and phone number id
//! (replies), and who may talk to the agent.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::super::sections::Secret;
use super::super::webhook::{RateLimit, SecretSource, secret_source, valid_route_name};
use super::{AccessConfig, DEFAULT_CHAT_RATE, SectionError, UserId, access, http_url, rate_limit};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileWhatsApp {
    name: String,
    verify_token: Option<Secret>,
    verify_token_file: Option<PathBuf>,
    verify_token_credential: Option<String>,
    app_secret: Option<Secret>,
    app_secret_file: Option<PathBuf>,
    app_secret_credential: Option<String>,
    access_token: Option<Secret>,
    access_token_file: Option<PathBuf>,
    access_token_credential: Option<String>,
    phone_number_id: Option<UserId>,
    api_base: Option<String>,
    api_version: Option<String>,
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
pub struct WhatsAppConfig {
    pub name: String,
    /// What Meta sends back in `hub.verify_token` when the callback URL is verified.
    pub verify_token: SecretSource,
    /// Signs every POST (`X-Hub-Signature-256`): App settings → Basic → App secret.
    pub app_secret: SecretSource,
    /// Bearer token for the Graph API (a system user's permanent token).
    pub access_token: SecretSource,
    /// The sending number's id (WhatsApp → API Setup), not the phone number itself.
    pub phone_number_id: String,
    /// The Graph API, without a trailing slash: `https://graph.facebook.com`.
    pub api_base: String,
    /// `v21.0`.
    pub api_version: String,
    pub access: AccessConfig,
    pub chat_rate_limit: RateLimit,
    pub send_rate_limit: RateLimit,
}

pub const DEFAULT_WHATSAPP_API: &str = "https://graph.facebook.com";
pub const DEFAULT_WHATSAPP_VERSION: &str = "v21.0";
/// The Cloud API's default throughput: 80 messages a second per phone number.
pub const DEFAULT_WHATSAPP_SEND_RATE: RateLimit = RateLimit {
    count: 80,
    per: Duration::from_secs(1),
    burst: 80,
};

/// `v21.0`: a `v`, digits, a dot, digits.
fn graph_version(v: &str) -> bool {
    v.strip_prefix('v')
        .and_then(|r| r.split_once('.'))
        .is_some_and(|(a, b)| {
            !a.is_empty()
                && !b.is_empty()
                && a.bytes().all(|c| c.is_ascii_digit())
                && b.bytes().all(|c| c.is_ascii_digit())
        })
}

pub(super) fn whatsapp(list: Vec<FileWhatsApp>) -> Result<Vec<WhatsAppConfig>, SectionError> {
    let mut out: Vec<WhatsAppConfig> = Vec::with_capacity(list.len());
    for (i, w) in list.into_iter().enumerate() {
        let key = format!("platforms.whatsapp[{i}]");
        if !valid_route_name(&w.name) {
            return Err((
                format!("{key}.name"),
                format!(
                    "`{}` is not a platform name: use 1 to 64 letters, digits, `-`, `_` or `.` (the callback URL is /platforms/whatsapp/NAME)",
                    w.name.escape_default()
                ),
            ));
        }
        if out.iter().any(|o| o.name == w.name) {
            return Err((
                format!("{key}.name"),
                format!(
                    "whatsapp `{}` is defined twice: each [[platforms.whatsapp]] needs a name of its own",
                    w.name
                ),
            ));
        }
        let name = &w.name;
        let verify_token = secret_source(
            &key,
            "verify_token",
            w.verify_token,
            w.verify_token_file,
            w.verify_token_credential,
        )?
        .ok_or((
            format!("{key}.verify_token"),
            format!(
                "whatsapp `{name}` has no verify_token: choose one (or _file, _credential) and enter the same in the app's WhatsApp → Configuration → Webhook"
            ),
        ))?;
        let app_secret = secret_source(
            &key,
            "app_secret",
            w.app_secret,
            w.app_secret_file,
            w.app_secret_credential,
        )?
        .ok_or((
            format!("{key}.app_secret"),
            format!(
                "whatsapp `{name}` has no app_secret: set app_secret (or _file, _credential) from App settings → Basic; nothing else proves a request came from Meta"
            ),
        ))?;
        let access_token = secret_source(
            &key,
            "access_token",
            w.access_token,
            w.access_token_file,
            w.access_token_credential,
        )?
        .ok_or((
            format!("{key}.access_token"),
            format!(
                "whatsapp `{name}` has no access_token: set access_token (or _file, _credential), a system user's token with whatsapp_business_messaging"
            ),
        ))?;
        let phone_number_id = match w.phone_number_id {
            Some(id) => {
                let id = id.into_string();
                if id.is_empty() || id.len() > 32 || !id.bytes().all(|b| b.is_ascii_digit()) {
                    return Err((
                        format!("{key}.phone_number_id"),
                        format!(
                            "`{}` is not a phone number id: the digits WhatsApp → API Setup shows as \"Phone number ID\" (not the phone number)",
                            id.escape_default()
                        ),
                    ));
                }
                id
            }
            None => {
                return Err((
                    format!("{key}.phone_number_id"),
                    format!(
                        "whatsapp `{name}` has no phone_number_id: WhatsApp → API Setup shows it (\"Phone number ID\")"
                    ),
                ));
            }
        };
        let api_version = w
            .api_version
            .unwrap_or_else(|| DEFAULT_WHATSAPP_VERSION.to_owned());
        if !graph_version(&api_version) {
            return Err((
                format!("{key}.api_version"),
                format!(
                    "`{}` is not a Graph API version: expected e.g. \"{DEFAULT_WHATSAPP_VERSION}\"",
                    api_version.escape_default()
                ),
            ));
        }
        let access = access(&key, w.allowed_users, w.allow_all, w.pairing, w.admins)?;
        let api_base = http_url(
            w.api_base.as_deref().unwrap_or(DEFAULT_WHATSAPP_API),
            &format!("{key}.api_base"),
        )?;
        out.push(WhatsAppConfig {
            name: w.name,
            verify_token,
            app_secret,
            access_token,
            phone_number_id,
            api_base,
            api_version,
            access,
            chat_rate_limit: rate_limit(
                w.chat_rate_limit,
                DEFAULT_CHAT_RATE,
                &format!("{key}.chat_rate_limit"),
            )?,
            send_rate_limit: rate_limit(
                w.send_rate_limit,
                DEFAULT_WHATSAPP_SEND_RATE,
                &format!("{key}.send_rate_limit"),
            )?,
        });
    }
    Ok(out)
}
