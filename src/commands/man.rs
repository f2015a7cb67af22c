//! The man page, generated from the clap definitions (the package installs it).

use clap::CommandFactory;

use crate::cli::Cli;
use crate::lifecycle::ExitStatus;

pub fn print() -> ExitStatus {
    let cmd = Cli::command();
    let mut out = Vec::new();
    if let Err(e) = clap_mangen::Man::new(cmd).render(&mut out) {
        eprintln!("hermes-gateway: cannot render the man page: {e}");
        return ExitStatus::Fatal;
    }
    use std::io::Write;
    match std::io::stdout().write_all(&out) {
        Ok(()) => ExitStatus::Stopped,
        Err(_) => ExitStatus::Fatal,
    }
}
