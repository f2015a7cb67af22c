//! hermes-gateway as a library: the binary in `main.rs` is a thin shell around it.
//!
//! - [`lifecycle`]: everything the service manager sees (listeners, notify, signals, drain,
//!   exit statuses, re-exec). No routes.
//! - [`gateway`]: the gateway's business, given listeners and a shutdown signal.
//! - [`config`]: the TOML configuration and its defaults.

pub mod cli;
pub mod commands;
pub mod config;
pub mod gateway;
pub mod lifecycle;
pub mod logging;
pub mod metrics;
pub mod store;
