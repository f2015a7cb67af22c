//! Subcommands that are not the daemon itself: they talk to it or check its inputs.

pub mod check_config;
pub mod control_client;
pub mod deliveries;
pub mod man;
pub mod manage;
pub mod pairing;
pub mod platforms;
pub mod schedule;
pub mod service;
pub mod status;
