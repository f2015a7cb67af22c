//! Who supervises this process, which decides what SIGUSR1 means: exit 75 for a service
//! manager to relaunch us, or a re-exec in place when nobody would.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SupervisorChoice {
    Auto,
    Systemd,
    Launchd,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Supervisor {
    Systemd,
    Launchd,
    None,
}

impl Supervisor {
    pub fn as_str(self) -> &'static str {
        match self {
            Supervisor::Systemd => "systemd",
            Supervisor::Launchd => "launchd",
            Supervisor::None => "none",
        }
    }
}

impl fmt::Display for Supervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The facts detection looks at, gathered once so that the rules can be tested.
#[derive(Debug, Default, Clone)]
pub struct Evidence {
    pub notify_socket: bool,
    pub invocation_id: bool,
    /// The parent is the service manager (PID 1, or a process named `systemd`).
    pub parent_is_systemd: bool,
    /// `LISTEN_FDS` named this process.
    pub activated: bool,
    /// The descriptors came from the gateway's own re-exec.
    pub reexec: bool,
    pub xpc_service_name: Option<String>,
}

impl Evidence {
    pub fn gather(activated: bool, reexec: bool) -> Self {
        let ppid = nix::unistd::getppid().as_raw();
        let parent_comm = std::fs::read_to_string(format!("/proc/{ppid}/comm")).unwrap_or_default();
        Evidence {
            notify_socket: std::env::var_os("NOTIFY_SOCKET").is_some_and(|v| !v.is_empty()),
            invocation_id: std::env::var_os("INVOCATION_ID").is_some_and(|v| !v.is_empty()),
            parent_is_systemd: ppid == 1 || parent_comm.trim() == "systemd",
            activated,
            reexec,
            xpc_service_name: std::env::var("XPC_SERVICE_NAME").ok(),
        }
    }
}

/// The detection rules of the README's "Supervised means" paragraph.
pub fn detect(choice: SupervisorChoice, e: &Evidence) -> Supervisor {
    match choice {
        SupervisorChoice::Systemd => return Supervisor::Systemd,
        SupervisorChoice::Launchd => return Supervisor::Launchd,
        SupervisorChoice::None => return Supervisor::None,
        SupervisorChoice::Auto => {}
    }
    // A re-executed gateway stays unsupervised, so that its next SIGUSR1 re-executes again.
    if e.reexec {
        return Supervisor::None;
    }
    if e.notify_socket || (e.invocation_id && e.parent_is_systemd) || e.activated {
        return Supervisor::Systemd;
    }
    if e.xpc_service_name
        .as_deref()
        .is_some_and(|n| n != "0" && !n.is_empty())
    {
        return Supervisor::Launchd;
    }
    Supervisor::None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auto(e: Evidence) -> Supervisor {
        detect(SupervisorChoice::Auto, &e)
    }

    #[test]
    fn notify_socket_means_systemd() {
        assert_eq!(
            auto(Evidence {
                notify_socket: true,
                ..Default::default()
            }),
            Supervisor::Systemd
        );
    }

    #[test]
    fn invocation_id_alone_is_a_desktop_shell() {
        assert_eq!(
            auto(Evidence {
                invocation_id: true,
                ..Default::default()
            }),
            Supervisor::None
        );
        assert_eq!(
            auto(Evidence {
                invocation_id: true,
                parent_is_systemd: true,
                ..Default::default()
            }),
            Supervisor::Systemd
        );
    }

    #[test]
    fn activation_means_systemd_unless_it_is_our_reexec() {
        assert_eq!(
            auto(Evidence {
                activated: true,
                ..Default::default()
            }),
            Supervisor::Systemd
        );
        assert_eq!(
            auto(Evidence {
                activated: true,
                reexec: true,
                notify_socket: true,
                ..Default::default()
            }),
            Supervisor::None
        );
    }

    #[test]
    fn xpc_service_name_means_launchd_unless_zero() {
        assert_eq!(
            auto(Evidence {
                xpc_service_name: Some("ai.hermes.gateway".into()),
                ..Default::default()
            }),
            Supervisor::Launchd
        );
        assert_eq!(
            auto(Evidence {
                xpc_service_name: Some("0".into()),
                ..Default::default()
            }),
            Supervisor::None
        );
    }

    #[test]
    fn explicit_choice_wins() {
        let e = Evidence {
            notify_socket: true,
            ..Default::default()
        };
        assert_eq!(detect(SupervisorChoice::None, &e), Supervisor::None);
        assert_eq!(
            detect(SupervisorChoice::Launchd, &Evidence::default()),
            Supervisor::Launchd
        );
    }
}
