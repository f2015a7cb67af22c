//! Restart in place for a gateway nobody supervises: the listening sockets are handed to a
//! fresh image of the binary through `LISTEN_FDS`, in the same process (same PID), so no
//! connection is refused while the new image starts.

use std::ffi::{CString, OsString};
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, fcntl};

use super::activation::{LISTEN_FDS_START, REEXEC_MARKER};

/// The binary and arguments to re-execute, resolved at start: after an upgrade replaced the
/// file, `/proc/self/exe` names the old, deleted one, while this path names the new one.
#[derive(Debug, Clone)]
pub struct Relaunch {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl Relaunch {
    pub fn capture() -> std::io::Result<Self> {
        let exe = std::env::current_exe()?;
        // A path ending in " (deleted)" would mean we were started from a removed file.
        let exe = PathBuf::from(
            exe.to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_owned(),
        );
        Ok(Relaunch {
            exe,
            args: std::env::args_os().collect(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReexecError {
    #[error("cannot prepare descriptor for the new image: {0}")]
    Fd(nix::Error),
    #[error("argument or environment contains a NUL byte")]
    Nul,
    #[error("exec {path}: {source}")]
    Exec { path: PathBuf, source: nix::Error },
}

/// Replaces this process image. Returns only on failure.
///
/// Call it with no other thread running (after the async runtime is shut down): it moves
/// descriptors to the numbers the protocol expects.
pub fn exec(relaunch: &Relaunch, sockets: Vec<(String, OwnedFd)>) -> ReexecError {
    match prepare_and_exec(relaunch, sockets) {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn prepare_and_exec(
    relaunch: &Relaunch,
    sockets: Vec<(String, OwnedFd)>,
) -> Result<std::convert::Infallible, ReexecError> {
    let n = sockets.len() as i32;
    // First lift every descriptor above the target range so that none is overwritten.
    let mut lifted = Vec::with_capacity(sockets.len());
    let mut names = Vec::with_capacity(sockets.len());
    for (name, fd) in &sockets {
        let high =
            fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(LISTEN_FDS_START + n)).map_err(ReexecError::Fd)?;
        lifted.push(high);
        names.push(name.clone());
    }
    drop(sockets);
    for (i, high) in lifted.iter().enumerate() {
        let target = LISTEN_FDS_START + i as i32;
        // dup2 leaves the target without FD_CLOEXEC: exactly the descriptors that survive.
        // SAFETY: only this thread runs (the runtime is shut down) and execve follows; any
        // descriptor already at `target` is meant to be replaced, and `high` is open (it
        // was just returned by F_DUPFD_CLOEXEC). The CLOEXEC copies vanish with the exec.
        if unsafe { libc::dup2(*high, target) } < 0 {
            return Err(ReexecError::Fd(nix::Error::last()));
        }
    }
    let pid = std::process::id();
    let overrides = [
        ("LISTEN_PID".to_owned(), pid.to_string()),
        ("LISTEN_FDS".to_owned(), n.to_string()),
        ("LISTEN_FDNAMES".to_owned(), names.join(":")),
        (REEXEC_MARKER.to_owned(), "1".to_owned()),
    ];
    let mut env: Vec<CString> = Vec::new();
    for (k, v) in std::env::vars_os() {
        if overrides.iter().any(|(o, _)| OsString::from(o) == k) {
            continue;
        }
        let mut kv = k.as_bytes().to_vec();
        kv.push(b'=');
        kv.extend_from_slice(v.as_bytes());
        env.push(CString::new(kv).map_err(|_| ReexecError::Nul)?);
    }
    for (k, v) in &overrides {
        env.push(CString::new(format!("{k}={v}")).map_err(|_| ReexecError::Nul)?);
    }
    let path = cstring(&relaunch.exe)?;
    let args = relaunch
        .args
        .iter()
        .map(|a| CString::new(a.as_bytes()).map_err(|_| ReexecError::Nul))
        .collect::<Result<Vec<_>, _>>()?;
    nix::unistd::execve(&path, &args, &env).map_err(|source| ReexecError::Exec {
        path: relaunch.exe.clone(),
        source,
    })
}

fn cstring(p: &Path) -> Result<CString, ReexecError> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| ReexecError::Nul)
}
