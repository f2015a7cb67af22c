//! The gateway's business: what each listener serves. It receives listeners and a shutdown
//! signal from the lifecycle and knows nothing of signals, sockets or exit statuses.
//!
//! A chat completion or a run crosses: `api` (HTTP, auth, validation) → `sessions` (the
//! per-session queue and the concurrency limit) → `agents` (the backend) → `store`.

pub mod agents;
mod api;
mod control;
mod error;
mod health;
mod ids;
pub mod sessions;

use std::net::SocketAddr;

use axum::Router;

use crate::config::{ApiConfig, Config, Secret};
use crate::lifecycle::{ConfigurationError, LifecycleHandle, Service};
use crate::store::{Store, StoreError};

pub use error::ApiError;

/// The gateway, as the lifecycle sees it.
pub struct Gateway {
    lifecycle: LifecycleHandle,
    api: api::Shared,
    sessions: sessions::Sessions,
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
        let api = api::ApiState::new(
            sessions.clone(),
            lifecycle.shutdown(),
            &config.api,
            keys,
            &config.agent.model,
        );
        Ok(Gateway {
            lifecycle,
            api,
            sessions,
        })
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
            "control" => control::router(self.lifecycle.clone()),
            "api" => health::router().merge(api::router(self.api.clone())),
            // The webhook routes arrive with the webhook issue; until then it answers health.
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
        if &config.sessions != self.sessions.limits() {
            tracing::warn!("[sessions] changed: this takes a restart (SIGUSR1)");
        }
    }

    fn summary(&self) -> Option<String> {
        Some(self.sessions.summary())
    }
}
