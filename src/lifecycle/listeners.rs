//! The listening sockets, by name (`api`, `webhook`, `control`), taken in this order:
//! systemd socket activation (or our own re-exec), systemd's fd store, launchd, and only
//! then a socket the gateway binds itself.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, SockaddrLike, SockaddrStorage, bind, getsockname,
    listen, setsockopt, socket, sockopt,
};

use super::activation::{self, ActivationEnv, Announced};
use super::notify::Notifier;
use crate::config::{Listen, ListenAddr};

/// The names the gateway serves.
pub const NAMES: [&str; 4] = ["api", "webhook", "control", "metrics"];
/// Prefix of the `FDNAME=` under which self-bound listeners are parked in the fd store.
const FDSTORE_PREFIX: &str = "fdstore-";
/// Backlog of sockets we bind: connections wait here during a restart gap.
const BACKLOG: i32 = 4096;

/// Where a listener came from; shown by `hermes-gateway status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Origin {
    Systemd,
    Fdstore,
    Launchd,
    Bound,
    ReExec,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Systemd => "systemd",
            Origin::Fdstore => "fdstore",
            Origin::Launchd => "launchd",
            Origin::Bound => "bound",
            Origin::ReExec => "re-exec",
        })
    }
}

#[derive(Debug)]
pub enum Socket {
    Tcp(std::net::TcpListener),
    Unix(UnixListener),
}

impl Socket {
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        match self {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Unix(l) => l.as_fd(),
        }
    }
}

/// One listening socket with its name and provenance.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub origin: Origin,
    /// The address it listens on, as text (`127.0.0.1:8642`, `/run/x/control.sock`).
    pub address: String,
    pub socket: Socket,
    /// Set when this listener is also parked in the fd store.
    pub parked: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listener `{name}`: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: String,
        source: io::Error,
    },
    #[error(
        "listener `{name}`: {path} is in use by a live process; stop it or choose another path"
    )]
    UnixInUse { name: String, path: PathBuf },
    #[error("listener `{name}`: {path} exists and is not a socket; refusing to replace it")]
    NotASocket { name: String, path: PathBuf },
}

/// Every listener the gateway serves, several per name where the manager passed several
/// (launchd gives IPv4 and IPv6 apart; a socket unit may have several `ListenStream=`).
#[derive(Debug, Default)]
pub struct ListenerSet {
    pub listeners: Vec<Listener>,
}

impl ListenerSet {
    pub fn names(&self) -> Vec<&str> {
        let mut n: Vec<&str> = self.listeners.iter().map(|l| l.name.as_str()).collect();
        n.dedup();
        n
    }

    pub fn has(&self, name: &str) -> bool {
        self.listeners.iter().any(|l| l.name == name)
    }

    /// Descriptors and names for a hand-over through `LISTEN_FDS` (re-exec).
    pub fn into_handover(self) -> Vec<(String, OwnedFd)> {
        self.listeners
            .into_iter()
            .map(|l| {
                let fd: OwnedFd = match l.socket {
                    Socket::Tcp(t) => t.into(),
                    Socket::Unix(u) => u.into(),
                };
                (l.name, fd)
            })
            .collect()
    }
}

/// Log lines produced while acquiring, so the caller can report them once logging is up.
pub type Notes = Vec<(tracing::Level, String)>;

/// Takes what the environment handed over, then binds whatever is still missing.
pub fn acquire(
    env: &ActivationEnv,
    listen: &Listen,
    notifier: &Notifier,
    notes: &mut Notes,
) -> Result<ListenerSet, ListenError> {
    let mut set = ListenerSet::default();
    let inherited_origin = if env.reexec {
        Origin::ReExec
    } else {
        Origin::Systemd
    };
    match activation::parse(env, std::process::id()) {
        Ok(Announced { fds, warnings }) => {
            for w in warnings {
                notes.push((tracing::Level::WARN, w));
            }
            for (fd, name) in fds {
                match activation::claim(fd) {
                    Ok(owned) => adopt(
                        &mut set,
                        owned,
                        &name,
                        inherited_origin,
                        listen,
                        notifier,
                        notes,
                    ),
                    Err(e) => notes.push((
                        tracing::Level::WARN,
                        format!("inherited descriptor `{name}` ignored: {e}"),
                    )),
                }
            }
        }
        Err(e) => notes.push((tracing::Level::WARN, e.to_string())),
    }
    for (name, addr) in listen.by_name() {
        if set.has(name) || *addr == ListenAddr::Off {
            continue;
        }
        match super::launchd::activate(name) {
            Ok(fds) => {
                for fd in fds {
                    let address = local_address(&fd);
                    push(&mut set, name, Origin::Launchd, address, fd);
                }
            }
            Err(e) => notes.push((
                tracing::Level::WARN,
                format!("launch_activate_socket({name}) failed: {e}"),
            )),
        }
        if set.has(name) {
            continue;
        }
        set.listeners
            .push(bind_one(name, addr, listen.socket_mode)?);
    }
    set.listeners
        .sort_by_key(|l| NAMES.iter().position(|n| *n == l.name));
    Ok(set)
}

fn adopt(
    set: &mut ListenerSet,
    fd: OwnedFd,
    name: &str,
    origin: Origin,
    listen: &Listen,
    notifier: &Notifier,
    notes: &mut Notes,
) {
    let address = local_address(&fd);
    let (name, origin) = if let Some(base) = name.strip_prefix(FDSTORE_PREFIX) {
        (base.to_owned(), Origin::Fdstore)
    } else if name == "unknown" {
        // An unnamed socket (e.g. `systemd-socket-activate` without --fdname) is matched to
        // the listener configured with the same address.
        match listen
            .by_name()
            .iter()
            .find(|(_, a)| a.to_string() == address)
        {
            Some((n, _)) => ((*n).to_owned(), origin),
            None => {
                notes.push((
                    tracing::Level::WARN,
                    format!(
                        "inherited socket {address} has no name and matches no configured listener; closed (set FileDescriptorName= to one of: {})",
                        NAMES.join(", ")
                    ),
                ));
                return;
            }
        }
    } else {
        (name.to_owned(), origin)
    };
    if !NAMES.contains(&name.as_str()) {
        notes.push((
            tracing::Level::WARN,
            format!(
                "inherited socket `{name}` ({address}) is not a listener this gateway knows ({}); closed",
                NAMES.join(", ")
            ),
        ));
        return;
    }
    if origin == Origin::Fdstore {
        if set
            .listeners
            .iter()
            .any(|l| l.name == name && l.origin != Origin::Fdstore)
        {
            // A socket unit now provides this name: the parked copy is obsolete.
            let fdname = format!("FDNAME={FDSTORE_PREFIX}{name}");
            let _ = notifier.send(&["FDSTOREREMOVE=1", &fdname]);
            notes.push((
                tracing::Level::INFO,
                format!("listener `{name}`: a socket unit provides it now; removed the parked copy from the fd store"),
            ));
            return;
        }
    } else {
        // The socket unit wins over a copy parked earlier.
        let before = set.listeners.len();
        set.listeners
            .retain(|l| !(l.name == name && l.origin == Origin::Fdstore));
        if set.listeners.len() != before {
            let fdname = format!("FDNAME={FDSTORE_PREFIX}{name}");
            let _ = notifier.send(&["FDSTOREREMOVE=1", &fdname]);
        }
    }
    let parked = origin == Origin::Fdstore;
    push(set, &name, origin, address, fd);
    if let Some(l) = set.listeners.last_mut() {
        l.parked = parked;
    }
}

fn push(set: &mut ListenerSet, name: &str, origin: Origin, address: String, fd: OwnedFd) {
    let socket = if is_unix(&fd) {
        Socket::Unix(UnixListener::from(fd))
    } else {
        Socket::Tcp(std::net::TcpListener::from(fd))
    };
    set.listeners.push(Listener {
        name: name.to_owned(),
        origin,
        address,
        socket,
        parked: false,
    });
}

fn is_unix(fd: &OwnedFd) -> bool {
    getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.family())
        == Some(AddressFamily::Unix)
}

/// The local address of a listening socket, formatted as the configuration writes it.
fn local_address(fd: &impl AsRawFd) -> String {
    match getsockname::<SockaddrStorage>(fd.as_raw_fd()) {
        Ok(a) => {
            if let Some(v4) = a.as_sockaddr_in() {
                SocketAddr::from(std::net::SocketAddrV4::from(*v4)).to_string()
            } else if let Some(v6) = a.as_sockaddr_in6() {
                SocketAddr::from(std::net::SocketAddrV6::from(*v6)).to_string()
            } else if let Some(u) = a.as_unix_addr() {
                match (u.path(), u.as_abstract()) {
                    (Some(p), _) => p.display().to_string(),
                    (None, Some(a)) => format!("@{}", String::from_utf8_lossy(a)),
                    _ => "(unnamed unix socket)".into(),
                }
            } else {
                "(unknown address)".into()
            }
        }
        Err(e) => format!("(getsockname failed: {e})"),
    }
}

fn bind_one(name: &str, addr: &ListenAddr, mode: u32) -> Result<Listener, ListenError> {
    let err = |source: io::Error| ListenError::Bind {
        name: name.to_owned(),
        addr: addr.to_string(),
        source,
    };
    match addr {
        ListenAddr::Tcp(sa) => {
            let fd = bind_tcp(*sa).map_err(err)?;
            let address = local_address(&fd);
            Ok(Listener {
                name: name.to_owned(),
                origin: Origin::Bound,
                address,
                socket: Socket::Tcp(std::net::TcpListener::from(fd)),
                parked: false,
            })
        }
        ListenAddr::Unix(path) => {
            let l = bind_unix(name, path, mode)?;
            Ok(Listener {
                name: name.to_owned(),
                origin: Origin::Bound,
                address: path.display().to_string(),
                socket: Socket::Unix(l),
                parked: false,
            })
        }
        ListenAddr::Off => Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "listener is off",
        ))),
    }
}

fn bind_tcp(sa: SocketAddr) -> io::Result<OwnedFd> {
    let family = if sa.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(family, SockType::Stream, SockFlag::SOCK_CLOEXEC, None)?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if sa.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    bind(fd.as_raw_fd(), &SockaddrStorage::from(sa))?;
    listen(&fd, Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN))?;
    Ok(fd)
}

fn bind_unix(name: &str, path: &Path, mode: u32) -> Result<UnixListener, ListenError> {
    let bind_err = |source: io::Error| ListenError::Bind {
        name: name.to_owned(),
        addr: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent()
        && !parent.exists()
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(bind_err)?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenError::UnixInUse {
                    name: name.to_owned(),
                    path: path.to_path_buf(),
                });
            }
            // Nobody answers: a stale socket file from a process that is gone.
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(_) => {
            return Err(ListenError::NotASocket {
                name: name.to_owned(),
                path: path.to_path_buf(),
            });
        }
        Err(_) => {}
    }
    let l = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    Ok(l)
}

/// Parks self-bound TCP listeners in systemd's fd store (`FDSTORE=1`), so that they also
/// survive an exit-75 restart: they come back through `LISTEN_FDS` as `fdstore-NAME`.
/// Unix sockets are not parked: `RuntimeDirectory=` is emptied between runs, so the path a
/// parked socket was bound to would be gone; they are bound anew.
pub fn park_in_fdstore(set: &mut ListenerSet, notifier: &Notifier, notes: &mut Notes) {
    if !notifier.enabled() {
        return;
    }
    let mut done: BTreeMap<String, usize> = BTreeMap::new();
    for l in set.listeners.iter_mut() {
        if l.origin != Origin::Bound || !matches!(l.socket, Socket::Tcp(_)) {
            continue;
        }
        let fdname = format!("FDNAME={FDSTORE_PREFIX}{}", l.name);
        match notifier.send_with_fds(&["FDSTORE=1", &fdname], &[l.socket.as_fd()]) {
            Ok(()) => {
                l.parked = true;
                *done.entry(l.name.clone()).or_default() += 1;
            }
            Err(e) => notes.push((
                tracing::Level::WARN,
                format!(
                    "listener `{}`: could not park it in the fd store: {e}",
                    l.name
                ),
            )),
        }
    }
    if !done.is_empty() {
        notes.push((
            tracing::Level::DEBUG,
            format!(
                "offered to the fd store: {} (kept across restarts where FileDescriptorStoreMax= allows)",
                done.keys().cloned().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listen(api: &str, control: &Path) -> Listen {
        Listen {
            api: ListenAddr::parse(api).unwrap(),
            webhook: ListenAddr::Off,
            control: ListenAddr::Unix(control.to_path_buf()),
            metrics: ListenAddr::Off,
            socket_mode: 0o600,
        }
    }

    #[test]
    fn binds_what_was_not_inherited_and_reports_port_zero() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("run/control.sock");
        let mut notes = Notes::new();
        let set = acquire(
            &ActivationEnv::default(),
            &listen("127.0.0.1:0", &ctl),
            &Notifier::disabled(),
            &mut notes,
        )
        .unwrap();
        assert_eq!(set.names(), vec!["api", "control"]);
        let api = &set.listeners[0];
        assert_eq!(api.origin, Origin::Bound);
        assert!(
            api.address.starts_with("127.0.0.1:") && !api.address.ends_with(":0"),
            "{}",
            api.address
        );
        let mode = std::fs::metadata(&ctl).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn stale_unix_socket_is_replaced_live_one_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("control.sock");
        drop(UnixListener::bind(&ctl).unwrap()); // leaves a stale file
        assert!(bind_unix("control", &ctl, 0o600).is_ok());
        let live = UnixListener::bind(dir.path().join("live.sock")).unwrap();
        let e = bind_unix("control", &dir.path().join("live.sock"), 0o600).unwrap_err();
        assert!(matches!(e, ListenError::UnixInUse { .. }), "{e}");
        drop(live);
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        assert!(matches!(
            bind_unix("control", &dir.path().join("file"), 0o600).unwrap_err(),
            ListenError::NotASocket { .. }
        ));
    }

    #[test]
    fn address_in_use_names_listener_and_address() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap().to_string();
        let e = bind_one("api", &ListenAddr::parse(&addr).unwrap(), 0o600)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`api`") && e.contains(&addr), "{e}");
    }
}
