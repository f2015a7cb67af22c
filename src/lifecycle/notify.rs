//! The service manager's notification protocol (`sd_notify(3)`): datagrams of
//! `KEY=VALUE` lines to `$NOTIFY_SOCKET`, a path or an abstract `@name`.
//!
//! Where `NOTIFY_SOCKET` is unset every call is a no-op, so code never has to ask whether
//! it runs under systemd.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, SockFlag, SockType, UnixAddr, sendmsg, socket};

/// A connection to the service manager's notification socket.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: Option<UnixAddr>,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET` (kept in the environment: a re-executed image notifies too).
    pub fn from_env() -> io::Result<Self> {
        match std::env::var("NOTIFY_SOCKET") {
            Ok(s) if !s.is_empty() => Ok(Notifier {
                target: Some(parse_address(&s)?),
            }),
            _ => Ok(Notifier::disabled()),
        }
    }

    pub fn disabled() -> Self {
        Notifier { target: None }
    }

    pub fn target(&self) -> Option<&UnixAddr> {
        self.target.as_ref()
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one datagram with the given lines.
    pub fn send(&self, lines: &[&str]) -> io::Result<()> {
        self.send_with_fds(lines, &[])
    }

    /// Sends one datagram, passing descriptors along (`FDSTORE=1`).
    pub fn send_with_fds(&self, lines: &[&str], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let Some(target) = &self.target else {
            return Ok(());
        };
        let mut msg = String::new();
        for l in lines {
            msg.push_str(l);
            msg.push('\n');
        }
        let sock = socket(
            nix::sys::socket::AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let raw: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs: Vec<ControlMessage<'_>> = if raw.is_empty() {
            Vec::new()
        } else {
            vec![ControlMessage::ScmRights(&raw)]
        };
        let iov = [io::IoSlice::new(msg.as_bytes())];
        let sent = sendmsg(
            sock.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            Some(target),
        )?;
        if sent != msg.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short write to NOTIFY_SOCKET",
            ));
        }
        Ok(())
    }
}

fn parse_address(s: &str) -> io::Result<UnixAddr> {
    if let Some(name) = s.strip_prefix('@') {
        #[cfg(any(target_os = "linux", target_os = "android"))]
        return UnixAddr::new_abstract(name.as_bytes()).map_err(io::Error::from);
        #[cfg(not(any(target_os = "linux", target_os = "android")))]
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("abstract NOTIFY_SOCKET `@{name}` needs Linux"),
        ));
    }
    if s.starts_with('/') {
        return UnixAddr::new(s).map_err(io::Error::from);
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("NOTIFY_SOCKET=`{s}` is neither an absolute path nor an abstract @name"),
    ))
}

/// `CLOCK_MONOTONIC` in microseconds, for `MONOTONIC_USEC=` with `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000 + ts.tv_nsec() as u64 / 1_000,
        Err(_) => 0,
    }
}

/// The watchdog interval the manager asked for, when it is meant for this process.
pub fn watchdog_interval(my_pid: u32) -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok()? != my_pid
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;

    #[test]
    fn sends_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            target: Some(parse_address(path.to_str().unwrap()).unwrap()),
        };
        n.send(&["READY=1", "STATUS=serving"]).unwrap();
        let mut buf = [0u8; 256];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=serving\n");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn sends_to_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("hermes-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let rx = UnixDatagram::bind_addr(&addr).unwrap();
        let n = Notifier {
            target: Some(parse_address(&format!("@{name}")).unwrap()),
        };
        n.send(&["STOPPING=1"]).unwrap();
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\n");
    }

    #[test]
    fn relative_path_is_rejected() {
        assert!(parse_address("notify.sock").is_err());
    }

    #[test]
    fn disabled_is_a_no_op() {
        assert!(Notifier::disabled().send(&["READY=1"]).is_ok());
    }
}
