//! The gateway's business: what each listener serves. It receives listeners and a shutdown
//! signal from the lifecycle and knows nothing of signals, sockets or exit statuses.
//!
//! A chat completion or a run crosses: `api` (HTTP, auth, validation) → `sessions` (the
//! per-session queue and the concurrency limit) → `agents` (the backend) → `store`.
//! A webhook crosses: `webhooks` (route, signature, template) → `deliveries` (the ledger:
//! stored before the 202, then a run through `sessions`, then its result to the target).
//! A chat message crosses: `platforms/telegram` (update → message) → `platforms` (access,
//! commands, limits; the message, its run and its reply's delivery stored in one commit)
//! → `sessions` (the chat's turns in order) → `deliveries` (the reply, through the
//! platform's outbox).

pub mod agents;
mod api;
pub mod body;
mod control;
pub mod deliveries;
mod error;
mod health;
pub mod http_client;
pub mod ids;
pub mod platforms;
pub mod rate;
pub mod schedules;
mod scrape;
pub mod sessions;
pub mod webhooks;

use std::net::SocketAddr;

use axum::Router;

use crate::config::{ApiConfig, Config, Secret};
use crate::lifecycle::{ConfigurationError, LifecycleHandle, Service};
use crate::store::{Store, StoreError};

/// `v` as JSON text, through `Serialize` into a buffer: `Value`'s `Display` (`to_string`)
/// writes each token through `fmt`, about twice the instructions (6 % of a chat message's
/// under callgrind). A map of JSON values always serialises; the fallback only spares a
/// panic.
pub fn json_text(v: &serde_json::Value) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| v.to_string())
}

pub use error::ApiError;

/// The gateway, as the lifecycle sees it.
pub struct Gateway {
    lifecycle: LifecycleHandle,
    api: api::Shared,
    sessions: sessions::Sessions,
    webhooks: webhooks::Shared,
    ledger: deliveries::DeliveryLedger,
    platforms: platforms::Platforms,
    schedules: schedules::Schedules,
}

/// A route without a secret is only allowed where the webhook listener is loopback (or a
/// Unix socket), whatever the file said: the socket may come from the service manager.
fn check_insecure_routes(
    config: &crate::config::WebhookConfig,
    lifecycle: &LifecycleHandle,
) -> Result<(), String> {
    let Some(r) = config.routes.iter().find(|r| r.secret.is_none()) else {
        return Ok(());
    };
    for l in lifecycle.listeners().iter().filter(|l| l.name == "webhook") {
        if let Ok(a) = l.address.parse::<SocketAddr>()
            && !a.ip().is_loopback()
        {
            return Err(format!(
                "webhook route `{}` has no secret and the webhook listener is on {a}, not a loopback address: set its secret, secret_file or secret_credential",
                r.name
            ));
        }
    }
    Ok(())
}

/// The webhook routes, and the keys that sign http deliveries: each route's, and each
/// schedule's with an http target and a secret.
fn routes_and_keys(
    config: &Config,
) -> Result<
    (
        webhooks::RouteTable,
        std::collections::HashMap<String, Vec<u8>>,
    ),
    String,
> {
    let (table, mut signing) = webhooks::build_routes(&config.webhook)?;
    signing.extend(schedules::signing_keys(&config.schedules)?);
    Ok((table, signing))
}

/// The API keys of the configuration: inline ones, then those of each file or credential
/// (one per non-empty line).
fn load_keys(api: &ApiConfig) -> Result<Vec<Secret>, String> {
    let mut keys = api.keys.clone();
    for src in &api.key_sources {
        let text = src.read().map_err(|e| format!("[api] keys: {e}"))?;
        keys.extend(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(Secret::new),
        );
    }
    if keys.iter().any(|k| k.expose().is_empty()) {
        return Err("[api] keys: an API key must not be empty".into());
    }
    Ok(keys)
}

impl Gateway {
    pub fn new(config: &Config, lifecycle: LifecycleHandle) -> anyhow::Result<Self> {
        let keys = load_keys(&config.api).map_err(ConfigurationError)?;
        if keys.is_empty() {
            // Whatever the file said, the socket may have come from the service manager.
            for l in lifecycle.listeners().iter().filter(|l| l.name == "api") {
                if let Ok(a) = l.address.parse::<SocketAddr>()
                    && !a.ip().is_loopback()
                {
                    return Err(ConfigurationError(format!(
                        "the api listener is on {a}, not a loopback address, and no API key is configured: set [api] keys, keys_file or keys_credential"
                    ))
                    .into());
                }
            }
            if !lifecycle.listeners().is_empty() {
                tracing::warn!(
                    "no API key configured: the API serves loopback clients only, without authentication"
                );
            }
        }
        let agent = agents::build(&config.agent)
            .map_err(|e| ConfigurationError(format!("[agent]: {e}")))?;
        let store = tokio::task::block_in_place(|| Store::open(&config.state_dir)).map_err(
            |e| -> anyhow::Error {
                match e {
                    StoreError::SchemaTooNew { .. } => ConfigurationError(e.to_string()).into(),
                    e => e.into(),
                }
            },
        )?;
        tracing::info!(backend = agent.kind(), model = %config.agent.model,
            "agent backend {} (model {}); database {}", agent.kind(), config.agent.model, store.path().display());
        let sessions = sessions::Sessions::new(store, agent, &config.sessions);
        let resumed = tokio::task::block_in_place(|| sessions.resume_blocking())?;
        if resumed > 0 {
            tracing::info!("{resumed} unfinished runs resumed");
        }
        check_insecure_routes(&config.webhook, &lifecycle).map_err(ConfigurationError)?;
        let (table, signing) = routes_and_keys(config).map_err(ConfigurationError)?;
        let ledger = deliveries::DeliveryLedger::new(
            sessions.store().clone(),
            sessions.clone(),
            &config.webhook,
            &config.agent.model,
            signing,
        );
        // Platforms register their outboxes before the ledger resumes their replies.
        let platforms = tokio::task::block_in_place(|| {
            platforms::Platforms::new(
                config,
                sessions.store().clone(),
                sessions.clone(),
                ledger.clone(),
                lifecycle.clone(),
            )
        })
        .map_err(ConfigurationError)?;
        let resumed = tokio::task::block_in_place(|| ledger.resume_blocking())?;
        if resumed > 0 {
            tracing::info!("{resumed} undelivered webhook deliveries and chat replies resumed");
        }
        ledger.spawn_pruner();
        platforms.start();
        let schedules = schedules::Schedules::new(
            sessions.store().clone(),
            sessions.clone(),
            ledger.clone(),
            &config.agent.model,
        );
        schedules.apply(&config.schedules, &config.agent.model);
        let webhooks = webhooks::Webhooks::new(&config.webhook, table, ledger.clone());
        let api = api::ApiState::new(
            sessions.clone(),
            lifecycle.clone(),
            platforms.clone(),
            &config.api,
            keys,
            &config.agent.model,
        );
        api::responses::spawn_pruner(api.clone());
        api::runs::spawn_pruner(api.clone());
        Ok(Gateway {
            lifecycle,
            api,
            sessions,
            webhooks,
            ledger,
            platforms,
            schedules,
        })
    }
}

impl Gateway {
    fn scrape_sources(&self) -> scrape::Sources {
        scrape::Sources {
            sessions: self.sessions.clone(),
            ledger: self.ledger.clone(),
            platforms: self.platforms.clone(),
        }
    }
}

impl Drop for Gateway {
    /// Lets the writer finish what is queued and close the database (a WAL checkpoint).
    fn drop(&mut self) {
        self.sessions.store().close();
    }
}

impl Service for Gateway {
    fn router(&self, name: &str) -> Router {
        match name {
            "control" => control::router(
                self.lifecycle.clone(),
                self.platforms.clone(),
                self.schedules.clone(),
            )
            .merge(deliveries::api::router(self.ledger.clone(), ""))
            .merge(scrape::router(self.scrape_sources())),
            "metrics" => health::router().merge(scrape::router(self.scrape_sources())),
            // Authenticated before routing: an unknown `/v1` path with a wrong key is 401.
            // Plain `/health` stays outside the layer, and costs what it did.
            "api" => {
                let authenticated = api::router(self.api.clone())
                    .merge(deliveries::api::router(self.ledger.clone(), "/v1"))
                    .fallback(error::not_found)
                    .layer(axum::middleware::from_fn_with_state(
                        self.api.clone(),
                        api::authenticate,
                    ));
                return health::router().merge(authenticated);
            }
            "webhook" => health::router()
                .merge(webhooks::router(self.webhooks.clone()))
                .merge(platforms::router(self.platforms.clone())),
            _ => health::router(),
        }
        .fallback(error::not_found)
    }

    fn reload(&self, config: &Config) {
        match load_keys(&config.api) {
            Ok(keys) => self.api.update(&config.api, keys, &config.agent.model),
            Err(e) => tracing::error!("reload: {e}; the previous API keys stay in force"),
        }
        match agents::build(&config.agent) {
            Ok(agent) => {
                tracing::info!(
                    "agent backend {} (model {})",
                    agent.kind(),
                    config.agent.model
                );
                self.sessions.set_agent(agent);
            }
            Err(e) => tracing::error!("reload: [agent]: {e}; the previous backend stays in force"),
        }
        let routes = check_insecure_routes(&config.webhook, &self.lifecycle)
            .and_then(|()| routes_and_keys(config));
        match routes {
            Ok((table, signing)) => {
                tracing::info!(
                    "{} webhook routes, {} schedules",
                    config.webhook.routes.len(),
                    config.schedules.len()
                );
                self.webhooks.update(&config.webhook, table);
                self.ledger
                    .update(&config.webhook, &config.agent.model, signing);
                self.schedules.apply(&config.schedules, &config.agent.model);
            }
            Err(e) => tracing::error!(
                "reload: {e}; the previous webhook routes and schedules stay in force"
            ),
        }
        self.platforms.update(config);
        if &config.sessions != self.sessions.limits() {
            tracing::warn!("[sessions] changed: this takes a restart (SIGUSR1)");
        }
    }

    fn drain(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        let ledger = self.ledger.clone();
        Box::pin(async move { ledger.drain().await })
    }

    fn summary(&self) -> Option<String> {
        let mut s = match self.sessions.store().degraded() {
            Some(_) => "STORE DEGRADED (writes refused), ".to_owned(),
            None => String::new(),
        };
        s.push_str(&self.sessions.summary());
        if let Some(next) = self.schedules.next_due_text() {
            s.push_str(", next schedule ");
            s.push_str(&next);
        }
        Some(s)
    }
}
