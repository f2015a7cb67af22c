//! hermes-gateway: reads the command line and hands over to the lifecycle or a command.

use std::process::ExitCode;

use clap::Parser;

use hermes_gateway::cli::{
    Cli, Command, DeliveriesCommand, PairingCommand, PlatformsCommand, ScheduleCommand,
    ServiceCommand, TelegramCommand,
};
use hermes_gateway::lifecycle::{self, RunOptions, activation::ActivationEnv};
use hermes_gateway::{commands, gateway};

/// glibc's allocator spent a tenth of a session turn's CPU on memory allocated on one
/// thread (the store writer, a runtime worker) and freed on another; mimalloc's
/// thread-local free lists do not.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Read and clear the socket-activation variables while the process is single-threaded.
    let env = ActivationEnv::take_from_process();
    let cli = Cli::parse();
    let status = match cli.command {
        Command::Run(args) => lifecycle::run(
            RunOptions {
                config_path: args.config.config,
                supervisor: args.supervisor,
            },
            env,
            gateway::Gateway::new,
        ),
        Command::CheckConfig(args) => commands::check_config::run(&args),
        Command::Status(args) => commands::status::run(&args),
        Command::Restart(args) => commands::manage::restart(&args),
        Command::Reload(args) => commands::manage::reload(&args),
        Command::Stop(args) => commands::manage::stop(&args),
        Command::Service(ServiceCommand::Install(args)) => commands::service::install(&args, false),
        Command::Service(ServiceCommand::Uninstall(args)) => {
            commands::service::install(&args, true)
        }
        Command::Service(ServiceCommand::Print(args)) => commands::service::print(&args),
        Command::Deliveries(DeliveriesCommand::List(args)) => commands::deliveries::list(&args),
        Command::Deliveries(DeliveriesCommand::Retry(args)) => commands::deliveries::retry(&args),
        Command::Pairing(PairingCommand::List(args)) => commands::pairing::list(&args),
        Command::Pairing(PairingCommand::Approve(args)) => commands::pairing::approve(&args),
        Command::Pairing(PairingCommand::Revoke(args)) => commands::pairing::revoke(&args),
        Command::Schedule(ScheduleCommand::List(args)) => commands::schedule::list(&args),
        Command::Schedule(ScheduleCommand::Run(args)) => commands::schedule::run(&args),
        Command::Platforms(PlatformsCommand::Check(args)) => commands::platforms::check(&args),
        Command::Platforms(PlatformsCommand::Telegram(TelegramCommand::SetWebhook(args))) => {
            commands::platforms::set_webhook(&args)
        }
        Command::Platforms(PlatformsCommand::Telegram(TelegramCommand::DeleteWebhook(args))) => {
            commands::platforms::delete_webhook(&args)
        }
        Command::Man => commands::man::print(),
    };
    status.into()
}
