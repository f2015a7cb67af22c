//! Exit statuses, the contract with the service manager (see the README's table).

/// Why the gateway ends, and the status it exits with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// SIGTERM or SIGINT: a graceful stop. `0`.
    Stopped,
    /// SIGUSR1 under a service manager: relaunch me. `75` (EX_TEMPFAIL), so that
    /// `RestartForceExitStatus=75` and launchd's `SuccessfulExit = false` restart it.
    Restart,
    /// A configuration error: `78` (EX_CONFIG), so that `RestartPreventExitStatus=78`
    /// stops a restart loop.
    Config,
    /// Any other fatal error. `1`.
    Fatal,
}

impl ExitStatus {
    pub const fn code(self) -> u8 {
        match self {
            ExitStatus::Stopped => 0,
            ExitStatus::Restart => 75,
            ExitStatus::Config => 78,
            ExitStatus::Fatal => 1,
        }
    }
}

impl From<ExitStatus> for std::process::ExitCode {
    fn from(s: ExitStatus) -> Self {
        std::process::ExitCode::from(s.code())
    }
}

/// A problem of the configuration class that the gateway finds while it starts (a key file
/// that cannot be read, a database written by a newer version): the lifecycle exits 78 for
/// it, like for a bad configuration file, so that the service manager stops retrying.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigurationError(pub String);
