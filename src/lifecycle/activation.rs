//! The socket-activation protocol (`sd_listen_fds(3)`): `LISTEN_PID`, `LISTEN_FDS`,
//! `LISTEN_FDNAMES`, and the checks an inherited descriptor must pass before it is served.
//!
//! Parsing is a pure function so that every malformed environment can be tested; the
//! descriptor checks look at real file descriptors.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::{SFlag, fstat};

/// The first inherited descriptor, `SD_LISTEN_FDS_START`.
pub const LISTEN_FDS_START: RawFd = 3;
/// More than this many inherited descriptors is taken as a corrupt environment.
const MAX_LISTEN_FDS: u32 = 4096;
/// Set by the gateway on its own re-exec, so that the new image knows where its sockets
/// came from and stays unsupervised.
pub const REEXEC_MARKER: &str = "HERMES_GATEWAY_REEXEC";

/// The raw variables, as read from the environment.
#[derive(Debug, Default, Clone)]
pub struct ActivationEnv {
    pub listen_pid: Option<String>,
    pub listen_fds: Option<String>,
    pub listen_fdnames: Option<String>,
    /// `HERMES_GATEWAY_REEXEC` was set: the descriptors come from our own re-exec.
    pub reexec: bool,
}

impl ActivationEnv {
    /// Reads the variables and removes them, so that children do not inherit them.
    ///
    /// Must be called while the process is single-threaded (first thing in `main`).
    pub fn take_from_process() -> Self {
        let env = ActivationEnv {
            listen_pid: std::env::var("LISTEN_PID").ok(),
            listen_fds: std::env::var("LISTEN_FDS").ok(),
            listen_fdnames: std::env::var("LISTEN_FDNAMES").ok(),
            reexec: std::env::var_os(REEXEC_MARKER).is_some(),
        };
        for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", REEXEC_MARKER] {
            // SAFETY: called from `main` before the async runtime or any other thread
            // exists, so no other thread can be reading the environment concurrently.
            unsafe { std::env::remove_var(var) };
        }
        env
    }

    /// Whether socket-activation variables were present at all.
    pub fn present(&self) -> bool {
        self.listen_fds.is_some()
    }
}

/// What the variables say: descriptor numbers with their names.
#[derive(Debug, PartialEq, Eq)]
pub struct Announced {
    pub fds: Vec<(RawFd, String)>,
    /// Problems that did not stop the parse (e.g. a name count that does not match).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivationError {
    #[error("LISTEN_PID=`{0}` is not a process id; ignoring socket activation")]
    BadPid(String),
    #[error("LISTEN_FDS=`{0}` is not a descriptor count; ignoring socket activation")]
    BadCount(String),
}

/// Interprets the variables for the process `my_pid`. An absent `LISTEN_PID`, or one that
/// names another process, means the variables are not ours: nothing is announced.
pub fn parse(env: &ActivationEnv, my_pid: u32) -> Result<Announced, ActivationError> {
    let none = || Announced {
        fds: Vec::new(),
        warnings: Vec::new(),
    };
    let (Some(pid), Some(count)) = (&env.listen_pid, &env.listen_fds) else {
        return Ok(none());
    };
    let pid: u32 = pid
        .trim()
        .parse()
        .map_err(|_| ActivationError::BadPid(pid.clone()))?;
    if pid != my_pid {
        return Ok(none());
    }
    let n: u32 = match count.trim().parse() {
        Ok(n) if n <= MAX_LISTEN_FDS => n,
        _ => return Err(ActivationError::BadCount(count.clone())),
    };
    let mut warnings = Vec::new();
    let mut names: Vec<String> = match &env.listen_fdnames {
        Some(s) if !s.is_empty() => s.split(':').map(str::to_owned).collect(),
        // An empty value is one empty name, unless there are no descriptors at all.
        Some(_) if n > 0 => vec![String::new()],
        _ => Vec::new(),
    };
    if env.listen_fdnames.is_some() && names.len() != n as usize {
        warnings.push(format!(
            "LISTEN_FDNAMES has {} names for {} descriptors; descriptors without a name are treated as `unknown`",
            names.len(),
            n
        ));
    }
    names.resize(n as usize, "unknown".to_owned());
    let fds = (0..n)
        .map(|i| LISTEN_FDS_START + i as RawFd)
        .zip(names.into_iter().map(|s| {
            if s.is_empty() {
                "unknown".to_owned()
            } else {
                s
            }
        }))
        .collect();
    Ok(Announced { fds, warnings })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FdCheckError {
    #[error("fd {0} is not open")]
    NotOpen(RawFd),
    #[error("fd {0} is not a socket")]
    NotSocket(RawFd),
    #[error("fd {0} is not a stream socket")]
    NotStream(RawFd),
    #[error("fd {0} is a socket that is not listening")]
    NotListening(RawFd),
}

/// Takes ownership of an announced descriptor once it is a listening stream socket.
///
/// On failure the descriptor is closed if it was open: it was handed to us, and keeping a
/// stray descriptor would only leak it into children.
pub fn claim(fd: RawFd) -> Result<OwnedFd, FdCheckError> {
    // SAFETY: F_GETFD only reads the descriptor's flags; on a number that is not open it
    // fails with EBADF and has no other effect.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(FdCheckError::NotOpen(fd));
    }
    // SAFETY: the protocol hands descriptors LISTEN_FDS_START.. to this process, the check
    // above proved `fd` is open, and each announced number is claimed at most once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let st = fstat(&owned).map_err(|_| FdCheckError::NotOpen(fd))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFSOCK {
        return Err(FdCheckError::NotSocket(fd));
    }
    match getsockopt(&owned, sockopt::SockType) {
        Ok(nix::sys::socket::SockType::Stream) => {}
        _ => return Err(FdCheckError::NotStream(fd)),
    }
    if !getsockopt(&owned, sockopt::AcceptConn).unwrap_or(false) {
        return Err(FdCheckError::NotListening(fd));
    }
    let _ = nix::fcntl::fcntl(
        &owned,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    Ok(owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn env(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> ActivationEnv {
        ActivationEnv {
            listen_pid: pid.map(Into::into),
            listen_fds: fds.map(Into::into),
            listen_fdnames: names.map(Into::into),
            reexec: false,
        }
    }

    #[test]
    fn names_are_paired_in_order() {
        let a = parse(&env(Some("42"), Some("2"), Some("api:webhook")), 42).unwrap();
        assert_eq!(a.fds, vec![(3, "api".into()), (4, "webhook".into())]);
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn another_process_pid_means_not_ours() {
        let a = parse(&env(Some("41"), Some("2"), Some("api:webhook")), 42).unwrap();
        assert!(a.fds.is_empty());
    }

    #[test]
    fn missing_pid_means_not_ours() {
        assert!(
            parse(&env(None, Some("1"), None), 42)
                .unwrap()
                .fds
                .is_empty()
        );
    }

    #[test]
    fn garbage_values_are_errors() {
        assert_eq!(
            parse(&env(Some("x42"), Some("1"), None), 42),
            Err(ActivationError::BadPid("x42".into()))
        );
        assert_eq!(
            parse(&env(Some("42"), Some("two"), None), 42),
            Err(ActivationError::BadCount("two".into()))
        );
        assert_eq!(
            parse(&env(Some("42"), Some("-1"), None), 42),
            Err(ActivationError::BadCount("-1".into()))
        );
        assert_eq!(
            parse(&env(Some("42"), Some("99999999"), None), 42),
            Err(ActivationError::BadCount("99999999".into()))
        );
    }

    #[test]
    fn no_names_means_unknown() {
        let a = parse(&env(Some("42"), Some("2"), None), 42).unwrap();
        assert_eq!(a.fds, vec![(3, "unknown".into()), (4, "unknown".into())]);
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn fewer_names_than_fds_pads_with_unknown_and_warns() {
        let a = parse(&env(Some("42"), Some("3"), Some("api")), 42).unwrap();
        assert_eq!(
            a.fds,
            vec![
                (3, "api".into()),
                (4, "unknown".into()),
                (5, "unknown".into())
            ]
        );
        assert_eq!(a.warnings.len(), 1);
    }

    #[test]
    fn more_names_than_fds_drops_the_extra_and_warns() {
        let a = parse(&env(Some("42"), Some("1"), Some("api:webhook:control")), 42).unwrap();
        assert_eq!(a.fds, vec![(3, "api".into())]);
        assert_eq!(a.warnings.len(), 1);
    }

    #[test]
    fn empty_name_is_unknown() {
        let a = parse(&env(Some("42"), Some("2"), Some(":webhook")), 42).unwrap();
        assert_eq!(a.fds, vec![(3, "unknown".into()), (4, "webhook".into())]);
    }

    #[test]
    fn zero_fds_is_empty() {
        let a = parse(&env(Some("42"), Some("0"), Some("")), 42).unwrap();
        assert!(a.fds.is_empty());
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn claim_rejects_a_file() {
        let f = tempfile::tempfile().unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(f);
        assert_eq!(claim(fd).unwrap_err(), FdCheckError::NotSocket(fd));
        // claim closed it: the descriptor is no longer open
        assert!(unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0);
    }

    #[test]
    fn claim_rejects_a_closed_fd() {
        assert_eq!(claim(987_654).unwrap_err(), FdCheckError::NotOpen(987_654));
    }

    #[test]
    fn claim_rejects_datagram_and_unlistened_sockets() {
        let d = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(d);
        assert_eq!(claim(fd).unwrap_err(), FdCheckError::NotStream(fd));

        let s = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::empty(),
            None,
        )
        .unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(s);
        assert_eq!(claim(fd).unwrap_err(), FdCheckError::NotListening(fd));
    }

    #[test]
    fn claim_accepts_a_listening_stream_socket() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
        let owned = claim(fd).expect("a listening TCP socket is accepted");
        assert_eq!(owned.as_raw_fd(), fd);
    }
}
