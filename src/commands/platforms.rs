//! `hermes-gateway platforms telegram set-webhook|delete-webhook NAME`: the Bot API calls
//! a webhook-mode user needs, made with the configured token and secret, so that nobody
//! has to paste a token into curl.

use crate::cli::{SetWebhookArgs, TelegramNameArgs};
use crate::config::{Config, TelegramConfig};
use crate::gateway::platforms::telegram::api::BotApi;
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
