//! `hermes-gateway platforms check NAME` (a platform instance's credentials, checked with
//! the platform's cheapest authenticated call: Telegram `getMe`, Slack `auth.test`, WhatsApp
//! a `GET` of the phone number id, LINE `GET /v2/bot/info`, Twilio a `GET` of the account)
//! and `platforms telegram set-webhook|delete-webhook NAME`: the calls a user needs, made
//! with the configured secrets, so that nobody has to paste a token into curl.

use crate::cli::{PlatformCheckArgs, SetWebhookArgs, TelegramNameArgs};
use crate::config::{
    Config, LineConfig, SlackConfig, TelegramConfig, TwilioConfig, WhatsAppConfig,
};
use crate::gateway::platforms::line::api::LineApi;
use crate::gateway::platforms::slack::api::SlackApi;
use crate::gateway::platforms::telegram::api::BotApi;
use crate::gateway::platforms::twilio::api::TwilioApi;
use crate::gateway::platforms::whatsapp::api::GraphApi;
use crate::lifecycle::ExitStatus;

fn instance(args: &TelegramNameArgs) -> Result<TelegramConfig, ExitStatus> {
    let config = Config::load_or_default(args.config.config.as_deref()).map_err(|e| {
        eprintln!("hermes-gateway: {e}");
        ExitStatus::Config
    })?;
    let found = config
        .platforms
        .telegram
        .iter()
        .find(|t| t.name == args.name)
        .cloned();
    found.ok_or_else(|| {
        let names: Vec<&str> = config
            .platforms
            .telegram
            .iter()
            .map(|t| t.name.as_str())
            .collect();
        eprintln!(
            "hermes-gateway: {} has no [[platforms.telegram]] named `{}` (configured: {})",
            config.origin(),
            args.name,
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        );
        ExitStatus::Config
    })
}

fn api(t: &TelegramConfig) -> Result<BotApi, ExitStatus> {
    let token = t.token.read().map_err(|e| {
        eprintln!(
            "hermes-gateway: [[platforms.telegram]] `{}`: token: {e}",
            t.name
        );
        ExitStatus::Config
    })?;
    Ok(BotApi::new(&t.api_base, token))
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitStatus> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("hermes-gateway: cannot start a runtime: {e}");
            ExitStatus::Fatal
        })
}

pub fn set_webhook(args: &SetWebhookArgs) -> ExitStatus {
    let run = || -> Result<(), ExitStatus> {
        let t = instance(&args.target)?;
        let Some(secret) = &t.webhook_secret else {
            eprintln!(
                "hermes-gateway: [[platforms.telegram]] `{}` has no webhook_secret: set one (and mode = \"webhook\") first",
                t.name
            );
            return Err(ExitStatus::Config);
        };
        let secret = secret.read().map_err(|e| {
            eprintln!("hermes-gateway: webhook_secret: {e}");
            ExitStatus::Config
        })?;
        if !args.url.starts_with("https://") {
            eprintln!(
                "hermes-gateway: `{}`: Telegram only posts to https:// URLs",
                args.url
            );
            return Err(ExitStatus::Config);
        }
        let api = api(&t)?;
        runtime()?
            .block_on(api.set_webhook(&args.url, secret.expose()))
            .map_err(|e| {
                eprintln!("hermes-gateway: setWebhook failed: {e}");
                ExitStatus::Fatal
            })?;
        println!(
            "telegram `{}`: Telegram now posts updates to {} (with the secret token); pending updates were kept",
            t.name, args.url
        );
        if t.mode != crate::config::TelegramMode::Webhook {
            println!(
                "note: the configuration still says mode = \"polling\": set mode = \"webhook\" and restart the gateway"
            );
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitStatus::Stopped,
        Err(s) => s,
    }
}

pub fn delete_webhook(args: &TelegramNameArgs) -> ExitStatus {
    let run = || -> Result<(), ExitStatus> {
        let t = instance(args)?;
        let api = api(&t)?;
        runtime()?.block_on(api.delete_webhook()).map_err(|e| {
            eprintln!("hermes-gateway: deleteWebhook failed: {e}");
            ExitStatus::Fatal
        })?;
        println!(
            "telegram `{}`: webhook removed; pending updates were kept for polling",
            t.name
        );
        Ok(())
    };
    match run() {
        Ok(()) => ExitStatus::Stopped,
        Err(s) => s,
    }
}

/// The instances named `name` (of `platform`, if given): (platform, what to check).
enum Checked {
    Telegram(TelegramConfig),
    Slack(SlackConfig),
    WhatsApp(WhatsAppConfig),
    Line(LineConfig),
    Twilio(TwilioConfig),
}

/// A secret of `[[platforms.PLATFORM]] NAME`, read as the gateway reads it (exit 78 naming
/// the key if it cannot be).
fn secret(
    platform: &str,
    name: &str,
    key: &str,
    s: &crate::config::SecretSource,
) -> Result<crate::config::Secret, ExitStatus> {
    s.read()
        .map(|v| crate::config::Secret::new(v.expose().trim()))
        .map_err(|e| {
            eprintln!("hermes-gateway: [[platforms.{platform}]] `{name}`: {key}: {e}");
            ExitStatus::Config
        })
}

pub fn check(args: &PlatformCheckArgs) -> ExitStatus {
    let run = || -> Result<(), ExitStatus> {
        let config = Config::load_or_default(args.config.config.as_deref()).map_err(|e| {
            eprintln!("hermes-gateway: {e}");
            ExitStatus::Config
        })?;
        let wanted = |p: &str| args.platform.as_deref().is_none_or(|w| w == p);
        let mut found: Vec<Checked> = Vec::new();
        if wanted("telegram") {
            found.extend(
                config
                    .platforms
                    .telegram
                    .iter()
                    .filter(|t| t.name == args.name)
                    .cloned()
                    .map(Checked::Telegram),
            );
        }
        if wanted("slack") {
            found.extend(
                config
                    .platforms
                    .slack
                    .iter()
                    .filter(|t| t.name == args.name)
                    .cloned()
                    .map(Checked::Slack),
            );
        }
        if wanted("whatsapp") {
            found.extend(
                config
                    .platforms
                    .whatsapp
                    .iter()
                    .filter(|t| t.name == args.name)
                    .cloned()
                    .map(Checked::WhatsApp),
            );
        }
        if wanted("line") {
            found.extend(
                config
                    .platforms
                    .line
                    .iter()
                    .filter(|t| t.name == args.name)
                    .cloned()
                    .map(Checked::Line),
            );
        }
        if wanted("twilio") {
            found.extend(
                config
                    .platforms
                    .twilio
                    .iter()
                    .filter(|t| t.name == args.name)
                    .cloned()
                    .map(Checked::Twilio),
            );
        }
        let one = match found.len() {
            0 => {
                eprintln!(
                    "hermes-gateway: {} has no platform instance named `{}`",
                    config.origin(),
                    args.name
                );
                return Err(ExitStatus::Config);
            }
            1 => found.remove(0),
            _ => {
                eprintln!(
                    "hermes-gateway: several platforms have an instance named `{}`: say which with --platform",
                    args.name
                );
                return Err(ExitStatus::Config);
            }
        };
        let rt = runtime()?;
        match one {
            Checked::Telegram(t) => {
                let me = rt.block_on(api(&t)?.get_me()).map_err(|e| {
                    eprintln!("hermes-gateway: telegram `{}`: {e}", t.name);
                    ExitStatus::Fatal
                })?;
                println!(
                    "telegram `{}`: the token works: the bot is @{} (id {})",
                    t.name,
                    me["username"].as_str().unwrap_or("?"),
                    me["id"]
                );
            }
            Checked::Slack(s) => {
                let token = secret("slack", &s.name, "bot_token", &s.bot_token)?;
                let me = rt
                    .block_on(SlackApi::new(&s.api_base, token).auth_test())
                    .map_err(|e| {
                        eprintln!("hermes-gateway: slack `{}`: {e}", s.name);
                        ExitStatus::Fatal
                    })?;
                println!(
                    "slack `{}`: the bot token works (auth.test): workspace {} ({}), bot user {} ({})",
                    s.name,
                    me["team"].as_str().unwrap_or("?"),
                    me["team_id"].as_str().unwrap_or("?"),
                    me["user"].as_str().unwrap_or("?"),
                    me["user_id"].as_str().unwrap_or("?"),
                );
            }
            Checked::WhatsApp(w) => {
                let token = secret("whatsapp", &w.name, "access_token", &w.access_token)?;
                let api = GraphApi::new(&w.api_base, &w.api_version, &w.phone_number_id, token);
                let me = rt.block_on(api.phone_number()).map_err(|e| {
                    eprintln!("hermes-gateway: whatsapp `{}`: {e}", w.name);
                    ExitStatus::Fatal
                })?;
                println!(
                    "whatsapp `{}`: the access token works: phone number id {} is {} ({})",
                    w.name,
                    w.phone_number_id,
                    me["display_phone_number"].as_str().unwrap_or("?"),
                    me["verified_name"].as_str().unwrap_or("?"),
                );
            }
            Checked::Line(l) => {
                let token = secret(
                    "line",
                    &l.name,
                    "channel_access_token",
                    &l.channel_access_token,
                )?;
                let info = rt
                    .block_on(LineApi::new(&l.api_base, token).bot_info())
                    .map_err(|e| {
                        eprintln!("hermes-gateway: line `{}`: {e}", l.name);
                        ExitStatus::Fatal
                    })?;
                println!(
                    "line `{}`: the channel access token works: the bot is {} ({}, user id {})",
                    l.name,
                    info["displayName"].as_str().unwrap_or("?"),
                    info["basicId"].as_str().unwrap_or("?"),
                    info["userId"].as_str().unwrap_or("?")
                );
            }
            Checked::Twilio(t) => {
                let token = secret("twilio", &t.name, "auth_token", &t.auth_token)?;
                let account = rt
                    .block_on(TwilioApi::new(&t.api_base, &t.account_sid, token).account())
                    .map_err(|e| {
                        eprintln!("hermes-gateway: twilio `{}`: {e}", t.name);
                        ExitStatus::Fatal
                    })?;
                println!(
                    "twilio `{}`: the auth token works: account {} ({}), {}; replies come from {}",
                    t.name,
                    account["friendly_name"].as_str().unwrap_or("?"),
                    t.account_sid,
                    account["status"].as_str().unwrap_or("?"),
                    t.from
                );
            }
        }
        Ok(())
    };
    match run() {
        Ok(()) => ExitStatus::Stopped,
        Err(s) => s,
    }
}
