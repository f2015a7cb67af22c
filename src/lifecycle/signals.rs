//! Signals, and what each one means to the lifecycle (the README's table).

use nix::sys::signal::{SigSet, SigmaskHow, Signal as NixSignal, pthread_sigmask};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM, SIGINT: graceful stop.
    Stop,
    /// SIGUSR1: graceful restart.
    Restart,
    /// SIGHUP: reload the configuration.
    Reload,
}

pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        NixSignal::SIGTERM,
        NixSignal::SIGINT,
        NixSignal::SIGUSR1,
        NixSignal::SIGHUP,
    ] {
        set.add(s);
    }
    set
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        let s = Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            usr1: signal(SignalKind::user_defined1())?,
            hup: signal(SignalKind::hangup())?,
        };
        // A re-exec blocks these signals across `execve` (see `block_for_exec`), so that
        // none can kill the new image before its handlers exist. They exist now.
        unblock();
        Ok(s)
    }

    pub async fn next(&mut self) -> Signal {
        tokio::select! {
            _ = self.term.recv() => Signal::Stop,
            _ = self.int.recv() => Signal::Stop,
            _ = self.usr1.recv() => Signal::Restart,
            _ = self.hup.recv() => Signal::Reload,
        }
    }
}

/// Blocks the lifecycle signals; the mask survives `execve`, so a signal sent during the
/// hand-over waits for the new image instead of killing it with the default action.
pub fn block_for_exec() {
    let _ = pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled()), None);
}

pub fn unblock() {
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&handled()), None);
}

/// SIGUSR1 to this process: the restart a chat's `/restart` asks for goes exactly the way
/// of `kill -USR1`.
pub fn raise_restart() -> std::io::Result<()> {
    nix::sys::signal::kill(nix::unistd::Pid::this(), NixSignal::SIGUSR1)
        .map_err(std::io::Error::from)
}
