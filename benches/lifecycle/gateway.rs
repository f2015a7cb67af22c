//! A gateway under test: its process (exit times exact through a pidfd), the command line
//! and clean environment it runs with, its configuration file and log, and `GET /status`
//! on its control socket.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::logs::log_tail;

/// Variables a gateway could pick up from the bench's own environment and that would
/// change what is measured.
pub const SCRUBBED_ENV: [&str; 13] = [
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "HERMES_GATEWAY_REEXEC",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "INVOCATION_ID",
    "JOURNAL_STREAM",
    "RUST_LOG",
    "XPC_SERVICE_NAME",
    "CONFIGURATION_DIRECTORY",
    "STATE_DIRECTORY",
];

/// A gateway process; killed (SIGKILL) and reaped on drop unless already reaped.
pub struct Proc {
    pub child: Child,
    /// Readable when the process exits: exact exit times without polling.
    pub pidfd: Option<OwnedFd>,
    pub status: Option<ExitStatus>,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc, String> {
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start the gateway: {e}"))?;
        let pidfd = pidfd_open(child.id() as i32);
        Ok(Proc {
            child,
            pidfd,
            status: None,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig`, only while the process is not reaped (so the PID is still ours).
    pub fn signal(&mut self, sig: Signal) -> Result<(), String> {
        if self.status.is_some() {
            return Err(format!("cannot send {sig}: the process already exited"));
        }
        kill(Pid::from_raw(self.pid()), sig).map_err(|e| format!("kill({sig}): {e}"))
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.status = Some(s);
        }
        self.status
    }

    /// Waits up to `timeout` for the exit; returns the status and when it was noticed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<(ExitStatus, Instant)> {
        if let Some(s) = self.status {
            return Some((s, Instant::now()));
        }
        let deadline = Instant::now() + timeout;
        match &self.pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    let ms = left.as_millis().min(i32::MAX as u128) as i32;
                    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
                    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
                    let at = Instant::now();
                    if r > 0 {
                        return self.exited().map(|s| (s, at));
                    }
                    if r == 0
                        || (r < 0
                            && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted)
                    {
                        return self.exited().map(|s| (s, at));
                    }
                }
            }
            None => loop {
                if let Some(s) = self.exited() {
                    return Some((s, Instant::now()));
                }
                if Instant::now() >= deadline {
                    return None;
                }
                thread::sleep(Duration::from_millis(1));
            },
        }
    }

    /// SIGTERM and wait; SIGKILL when it does not stop in time.
    pub fn stop(&mut self, timeout: Duration) -> Result<(ExitStatus, Instant), String> {
        if let Some(s) = self.exited() {
            return Err(format!("had already exited ({})", status_text(s)));
        }
        self.signal(Signal::SIGTERM)?;
        match self.wait_exit(timeout) {
            Some(r) => Ok(r),
            None => {
                let _ = self.signal(Signal::SIGKILL);
                let _ = self.wait_exit(Duration::from_secs(2));
                Err(format!(
                    "did not exit within {timeout:?} of SIGTERM; killed"
                ))
            }
        }
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 8)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `pidfd_open(2)` (Linux 5.3+); `None` falls back to polling.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: a plain syscall with integer arguments; the result is a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the syscall returned a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

pub fn status_text(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{s}"),
    }
}

pub fn open_log(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

pub fn stdio_to(log: &File) -> Result<(Stdio, Stdio), String> {
    let out = log
        .try_clone()
        .map_err(|e| format!("cannot duplicate the log descriptor: {e}"))?;
    let err = log
        .try_clone()
        .map_err(|e| format!("cannot duplicate the log descriptor: {e}"))?;
    Ok((Stdio::from(out), Stdio::from(err)))
}

/// `hermes-gateway run`, logging to `log`, notifying the bench, with a clean environment.
pub fn gateway_command(
    bin: &Path,
    config: &Path,
    supervisor: &str,
    notify: &Path,
    log: &File,
) -> Result<Command, String> {
    let mut cmd = Command::new(bin);
    cmd.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--supervisor")
        .arg(supervisor);
    for var in SCRUBBED_ENV {
        cmd.env_remove(var);
    }
    cmd.env("NOTIFY_SOCKET", notify);
    let (out, err) = stdio_to(log)?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: prctl is async-signal-safe and allocates nothing. A gateway must not outlive
    // the bench even if the bench is killed with SIGKILL (the setting survives execve).
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    Ok(cmd)
}

/// The TOML the gateway runs with: a TCP `api`, no `webhook`, a Unix `control` socket and
/// the state folder, all inside `dir`.
pub fn write_config(dir: &Path, api: &str) -> Result<PathBuf, String> {
    // JSON string quoting is valid TOML basic-string quoting.
    let q = |p: &Path| serde_json::to_string(&p.to_string_lossy()).unwrap_or_default();
    let text = format!(
        "[listen]\napi = \"{api}\"\nwebhook = \"off\"\ncontrol = {}\n[state]\ndir = {}\n",
        q(&dir.join("control.sock")),
        q(&dir.join("state")),
    );
    let path = dir.join("gateway.toml");
    fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(path)
}

pub fn make_dir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// `GET /status` on the control socket.
pub fn control_status(socket: &Path) -> Result<Value, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(2))))
        .map_err(|e| format!("control socket timeouts: {e}"))?;
    s.write_all(b"GET /status HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .map_err(|e| format!("control socket write: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .map_err(|e| format!("control socket read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("control socket: malformed response `{text}`"))?;
    if !head.starts_with("HTTP/1.0 200") && !head.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "control socket answered `{}`",
            head.lines().next().unwrap_or("")
        ));
    }
    serde_json::from_str(body).map_err(|e| format!("control socket: bad JSON ({e}): {body}"))
}

pub fn listener_address(status: &Value, name: &str) -> Option<(String, String)> {
    status["listeners"].as_array()?.iter().find_map(|l| {
        (l["name"] == name).then(|| {
            (
                l["address"].as_str().unwrap_or("").to_owned(),
                l["origin"].as_str().unwrap_or("").to_owned(),
            )
        })
    })
}
