//! The command line. These definitions are also the source of the man page.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::lifecycle::SupervisorChoice;

/// hermes-gateway: holds the sockets, sessions and deliveries in front of AI agents, so
/// that restarting or upgrading it refuses no connection and loses no message.
#[derive(Debug, Parser)]
#[command(name = "hermes-gateway", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway in the foreground (it never daemonizes).
    ///
    /// SIGTERM/SIGINT stop it gracefully (exit 0); SIGUSR1 restarts it gracefully (exit 75
    /// under a service manager, re-exec in place otherwise); SIGHUP reloads the configuration.
    Run(RunArgs),
    /// Validate the configuration: exit 0, or 78 with the problem on stderr.
    CheckConfig(ConfigArg),
    /// Ask the running gateway for its state over the control socket.
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// The TOML configuration file [default: $CONFIGURATION_DIRECTORY/gateway.toml if it
    /// exists, else built-in defaults].
    #[arg(long, short = 'c', value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Who relaunches the gateway after SIGUSR1: a service manager (exit 75), or nobody
    /// (re-exec in place). `auto` detects systemd and launchd.
    #[arg(long, value_enum, default_value = "auto")]
    pub supervisor: SupervisorChoice,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The control socket [default: from the configuration].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the raw JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}
