//! The gateway's business: what each listener serves. It receives listeners and a shutdown
//! signal from the lifecycle and knows nothing of signals, sockets or exit statuses.

mod control;
mod error;
mod health;

use axum::Router;

use crate::config::Config;
use crate::lifecycle::{LifecycleHandle, Service};

pub use error::ApiError;

/// The gateway, as the lifecycle sees it.
pub struct Gateway {
    lifecycle: LifecycleHandle,
}

impl Gateway {
    pub fn new(_config: &Config, lifecycle: LifecycleHandle) -> anyhow::Result<Self> {
        Ok(Gateway { lifecycle })
    }
}

impl Service for Gateway {
    fn router(&self, name: &str) -> Router {
        match name {
            "control" => control::router(self.lifecycle.clone()),
            // The webhook routes arrive with the webhook issue; until then it answers health.
            _ => health::router(),
        }
        .fallback(error::not_found)
    }

    fn reload(&self, _config: &Config) {}
}
