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
    /// Restart the gateway gracefully, whoever supervises it, and verify it came back.
    ///
    /// Under systemd: SIGUSR1 to the unit (exit 75, relaunched with its sockets), then wait
    /// for a new MainPID that reported READY. Under launchd: `launchctl kill SIGUSR1`, then
    /// `launchctl kickstart -k` if launchd has not relaunched it in time. Unsupervised:
    /// SIGUSR1 to the PID the control socket reports (the gateway re-executes itself).
    Restart(ManageArgs),
    /// Reload the configuration (SIGHUP) and verify the new one is live.
    Reload(ReloadArgs),
    /// Stop the gateway gracefully and verify it stopped.
    Stop(ManageArgs),
    /// Install, remove or print the systemd units or the launchd property list.
    #[command(subcommand)]
    Service(ServiceCommand),
    /// List webhook deliveries and chat replies, or retry one, over the control socket.
    #[command(subcommand)]
    Deliveries(DeliveriesCommand),
    /// Chat users who asked to pair, approvals and revocations, over the control socket.
    #[command(subcommand)]
    Pairing(PairingCommand),
    /// Scheduled runs: list them (next and last run), or run one now, over the control
    /// socket.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Talk to a chat platform's API with the configured credentials.
    #[command(subcommand)]
    Platforms(PlatformsCommand),
    /// Print the man page (roff) generated from these definitions.
    #[command(hide = true)]
    Man,
}

#[derive(Debug, Args)]
pub struct ManageArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// How long to wait for the result before reporting failure.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub manage: ManageArgs,
    /// Send SIGHUP to this process and wait until it applied the configuration, without
    /// asking the service manager: what the unit's `ExecReload=` runs, so that
    /// `systemctl reload` returns only once the new configuration is live.
    #[arg(long, value_name = "PID")]
    pub pid: Option<i32>,
}

#[derive(Debug, Args)]
pub struct TargetArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The control socket [default: from the configuration].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The systemd unit [default: found from the running gateway, else hermes-gateway.service].
    #[arg(long, value_name = "UNIT")]
    pub unit: Option<String>,
    /// Talk to the user's service manager (systemctl --user, launchd gui/UID).
    #[arg(long, conflicts_with = "system")]
    pub user: bool,
    /// Talk to the system's service manager.
    #[arg(long)]
    pub system: bool,
    /// The launchd label.
    #[arg(long, value_name = "LABEL", default_value = "ai.hermes.gateway")]
    pub label: String,
}

#[derive(Debug, Subcommand)]
pub enum ServiceCommand {
    /// Write the systemd units (or, on macOS, the launchd plist and bootstrap it).
    Install(InstallArgs),
    /// Remove what `install` wrote.
    Uninstall(InstallArgs),
    /// Print the rendered files.
    Print(PrintArgs),
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Per-user units (~/.config/systemd/user, or ~/Library/LaunchAgents).
    #[arg(long, conflicts_with = "system")]
    pub user: bool,
    /// System units (/etc/systemd/system, or /Library/LaunchDaemons) [default as root].
    #[arg(long)]
    pub system: bool,
    /// Overwrite or remove files that differ from what this version renders.
    #[arg(long)]
    pub force: bool,
}

#[derive(Debug, Args)]
pub struct PrintArgs {
    /// Which files.
    #[arg(value_enum)]
    pub kind: ServiceKind,
    /// Render the per-user variant.
    #[arg(long)]
    pub user: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ServiceKind {
    Systemd,
    Launchd,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("`{s}` is not a duration ({e}); try \"60s\""))
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

#[derive(Debug, Subcommand)]
pub enum DeliveriesCommand {
    /// List deliveries, newest first: state, attempts, last error, next attempt.
    List(DeliveriesListArgs),
    /// Deliver a failed (or delivered, or waiting) delivery again, with a fresh budget of
    /// attempts starting now.
    Retry(DeliveriesRetryArgs),
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The control socket [default: from the configuration].
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the raw JSON, for scripts.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DeliveriesListArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// Only deliveries in this state.
    #[arg(long, value_parser = ["received", "pending", "attempting", "delivered", "failed"])]
    pub state: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(Debug, Args)]
pub struct DeliveriesRetryArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The delivery id (`dlv_…`, as the 202 answer and `deliveries list` show it).
    pub id: String,
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

#[derive(Debug, Subcommand)]
pub enum PairingCommand {
    /// Users waiting with a pairing code, and users approved.
    List(ControlArgs),
    /// Let the user who was given CODE talk to the agent (they are told in their chat).
    Approve(PairingApproveArgs),
    /// Forget a user's approval or pairing request.
    Revoke(PairingRevokeArgs),
}

#[derive(Debug, Args)]
pub struct PairingApproveArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The code the user was given (as `pairing list` shows it).
    pub code: String,
}

#[derive(Debug, Args)]
pub struct PairingRevokeArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The platform's user id.
    pub user: String,
    /// Only on this platform (`telegram`).
    #[arg(long)]
    pub platform: Option<String>,
    /// Only on the platform instance of this name.
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PlatformsCommand {
    /// Check a platform instance's credentials with the platform's cheapest authenticated
    /// call (Telegram: getMe, Slack: auth.test, WhatsApp: the phone number id); exit 0
    /// when they work.
    Check(PlatformCheckArgs),
    /// Telegram: register or remove the webhook of a `[[platforms.telegram]]` instance.
    #[command(subcommand)]
    Telegram(TelegramCommand),
}

#[derive(Debug, Subcommand)]
pub enum TelegramCommand {
    /// Call setWebhook with the instance's webhook_secret (pending updates are kept).
    SetWebhook(SetWebhookArgs),
    /// Call deleteWebhook (pending updates are kept), e.g. before switching to polling.
    DeleteWebhook(TelegramNameArgs),
}

#[derive(Debug, Args)]
pub struct TelegramNameArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The instance's `name`.
    pub name: String,
}

#[derive(Debug, Args)]
pub struct SetWebhookArgs {
    #[command(flatten)]
    pub target: TelegramNameArgs,
    /// The public https URL Telegram posts to; it reaches the webhook listener's
    /// /platforms/telegram/NAME.
    #[arg(long)]
    pub url: String,
}

#[derive(Debug, Args)]
pub struct PlatformCheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// The instance's `name`.
    pub name: String,
    /// The platform, when several have an instance of that name (`telegram`, `slack`,
    /// `whatsapp`, `line`, `twilio`).
    #[arg(long)]
    pub platform: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Each schedule: its expression and zone, the next slot, the last run and its outcome.
    List(ControlArgs),
    /// Run a schedule now, once, besides its timetable.
    Run(ScheduleRunArgs),
}

#[derive(Debug, Args)]
pub struct ScheduleRunArgs {
    #[command(flatten)]
    pub control: ControlArgs,
    /// The schedule's `name`.
    pub name: String,
}
