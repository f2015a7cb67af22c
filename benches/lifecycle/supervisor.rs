//! The bench's own service manager for the exit-75 path: it holds the api socket, starts
//! the gateway with it as fd 3 (`LISTEN_FDS=1`, and `LISTEN_PID` = the child, written
//! between fork and exec), and relaunches it whenever it exits 75, as systemd's
//! `RestartForceExitStatus=75` does.

use std::fs::File;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::EXIT_TIMEOUT;
use crate::gateway::{Proc, SCRUBBED_ENV, stdio_to};

pub enum SupEvent {
    Spawned {
        pid: i32,
        at: Instant,
    },
    Exited {
        pid: i32,
        at: Instant,
        status: ExitStatus,
    },
    Failed(String),
}

/// The bench's own service manager: holds the api socket, starts the gateway with it as
/// fd 3, and relaunches it whenever it exits 75. Stops (SIGTERM) the gateway on drop.
pub struct MiniSupervisor {
    pub stop: Arc<AtomicBool>,
    pub events: mpsc::Receiver<SupEvent>,
    pub thread: Option<JoinHandle<()>>,
}

impl MiniSupervisor {
    pub fn start(
        plan: ExecPlan,
        log: File,
        log_path: PathBuf,
        max_launches: usize,
    ) -> Result<Self, String> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, events) = mpsc::channel();
        let flag = stop.clone();
        let thread = thread::Builder::new()
            .name("mini-supervisor".into())
            .spawn(move || supervise(plan, log, log_path, flag, tx, max_launches))
            .map_err(|e| format!("cannot start the supervisor thread: {e}"))?;
        Ok(MiniSupervisor {
            stop,
            events,
            thread: Some(thread),
        })
    }

    /// Stops the gateway and returns every event.
    pub fn finish(mut self) -> Vec<SupEvent> {
        self.shutdown();
        self.events.try_iter().collect()
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for MiniSupervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn supervise(
    mut plan: ExecPlan,
    log: File,
    log_path: PathBuf,
    stop: Arc<AtomicBool>,
    tx: mpsc::Sender<SupEvent>,
    max_launches: usize,
) {
    for _ in 0..max_launches {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let mut cmd = match plan.command(&log) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(SupEvent::Failed(e));
                return;
            }
        };
        let at = Instant::now();
        let mut gw = match Proc::spawn(&mut cmd, &log_path) {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(SupEvent::Failed(e));
                return;
            }
        };
        let pid = gw.pid();
        let _ = tx.send(SupEvent::Spawned { pid, at });
        let exit = loop {
            if let Some(r) = gw.wait_exit(Duration::from_millis(100)) {
                break Some(r);
            }
            if stop.load(Ordering::Relaxed) {
                match gw.stop(EXIT_TIMEOUT) {
                    Ok(r) => break Some(r),
                    Err(e) => {
                        let _ = tx.send(SupEvent::Failed(format!("gateway {pid}: {e}")));
                        break None;
                    }
                }
            }
        };
        let Some((status, at)) = exit else {
            return;
        };
        let _ = tx.send(SupEvent::Exited { pid, at, status });
        // Like `RestartForceExitStatus=75`: only a restart request is relaunched.
        if status.code() != Some(75) || stop.load(Ordering::Relaxed) {
            return;
        }
    }
    let _ = tx.send(SupEvent::Failed(format!(
        "relaunch limit ({max_launches}) reached"
    )));
}

/// Everything `execve` needs, prepared before the fork so that the child only does
/// async-signal-safe work: write its PID into `LISTEN_PID`, move the socket to fd 3, exec.
pub struct ExecPlan {
    pub path: Vec<u8>,
    pub argv: Vec<Vec<u8>>,
    pub envp: Vec<Vec<u8>>,
    /// Index in `envp` of the `LISTEN_PID=` entry, sized for any PID.
    pub pid_slot: usize,
    pub listen_fd: RawFd,
    /// Keeps the socket open for as long as launches may happen.
    pub _listener: Arc<TcpListener>,
}

const MAX_ARGS: usize = 16;
const MAX_ENV: usize = 1024;
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl ExecPlan {
    pub fn new(
        bin: &Path,
        config: &Path,
        notify: &Path,
        listener: Arc<TcpListener>,
    ) -> Result<Self, String> {
        let cstr = |b: &[u8]| -> Result<Vec<u8>, String> {
            if b.contains(&0) {
                return Err(format!("NUL byte in `{}`", String::from_utf8_lossy(b)));
            }
            let mut v = b.to_vec();
            v.push(0);
            Ok(v)
        };
        let path = cstr(bin.as_os_str().as_bytes())?;
        let argv = [
            bin.as_os_str(),
            "run".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
            "--supervisor".as_ref(),
            "auto".as_ref(),
        ]
        .iter()
        .map(|a| cstr(a.as_bytes()))
        .collect::<Result<Vec<_>, _>>()?;
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if SCRUBBED_ENV.iter().any(|s| k == *s) {
                continue;
            }
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            envp.push(cstr(&kv)?);
        }
        let mut notify_kv = b"NOTIFY_SOCKET=".to_vec();
        notify_kv.extend_from_slice(notify.as_os_str().as_bytes());
        envp.push(cstr(&notify_kv)?);
        envp.push(cstr(b"LISTEN_FDS=1")?);
        envp.push(cstr(b"LISTEN_FDNAMES=api")?);
        let mut slot = LISTEN_PID_PREFIX.to_vec();
        slot.extend_from_slice(&[0u8; 12]);
        let pid_slot = envp.len();
        envp.push(slot);
        if argv.len() >= MAX_ARGS || envp.len() >= MAX_ENV {
            return Err(format!(
                "too many arguments ({}) or environment variables ({})",
                argv.len(),
                envp.len()
            ));
        }
        Ok(ExecPlan {
            path,
            argv,
            envp,
            pid_slot,
            listen_fd: listener.as_raw_fd(),
            _listener: listener,
        })
    }

    pub fn command(&mut self, log: &File) -> Result<Command, String> {
        // The program is never run by std: the pre_exec hook execs the prepared image.
        let mut cmd = Command::new("/proc/self/exe");
        let (out, err) = stdio_to(log)?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let path = self.path.clone();
        let argv = self.argv.clone();
        let mut envp = self.envp.clone();
        let pid_slot = self.pid_slot;
        let listen_fd = self.listen_fd;
        // SAFETY: the hook runs in the forked child of a multi-threaded process, so it may
        // only call async-signal-safe functions and must not allocate. It only calls
        // prctl, getpid, fcntl, dup2 and execve, and writes into buffers and stack arrays
        // prepared before the fork (the child's copy; the parent's stays untouched).
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                write_pid(&mut envp[pid_slot], libc::getpid());
                if listen_fd == 3 {
                    // dup2(3, 3) would keep FD_CLOEXEC: clear it instead.
                    let flags = libc::fcntl(3, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(3, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                } else if libc::dup2(listen_fd, 3) < 0 {
                    // dup2 leaves fd 3 without FD_CLOEXEC: it survives the exec.
                    return Err(io::Error::last_os_error());
                }
                let mut args = [std::ptr::null::<libc::c_char>(); MAX_ARGS];
                for (slot, a) in args.iter_mut().zip(&argv) {
                    *slot = a.as_ptr().cast();
                }
                let mut env = [std::ptr::null::<libc::c_char>(); MAX_ENV];
                for (slot, e) in env.iter_mut().zip(&envp) {
                    *slot = e.as_ptr().cast();
                }
                libc::execve(path.as_ptr().cast(), args.as_ptr(), env.as_ptr());
                Err(io::Error::last_os_error())
            });
        }
        Ok(cmd)
    }
}

/// Writes `pid` in decimal after `LISTEN_PID=`, NUL-terminated, without allocating.
fn write_pid(slot: &mut [u8], pid: libc::pid_t) {
    let mut digits = [0u8; 12];
    let mut n = pid.unsigned_abs();
    let mut len = 0;
    loop {
        digits[len] = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
        if n == 0 || len == digits.len() {
            break;
        }
    }
    let start = LISTEN_PID_PREFIX.len();
    for i in 0..len {
        if let Some(b) = slot.get_mut(start + i) {
            *b = digits[len - 1 - i];
        }
    }
    if let Some(b) = slot.get_mut(start + len) {
        *b = 0;
    }
}
