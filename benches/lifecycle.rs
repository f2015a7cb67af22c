//! Lifecycle benchmark of the real `hermes-gateway` binary.
//!
//! 1. exec → `READY=1`: 50 starts, each with a fresh state folder and `NOTIFY_SOCKET` set
//!    (so `--supervisor auto` means systemd), stopped with SIGTERM; plus 20 starts on a state
//!    folder that already exists, for comparison.
//! 2. Resident memory (`VmRSS`) right after `READY=1` and ~200 ms later.
//! 3. The restart gap, `STOPPING=1` (old image) → `READY=1` (new image):
//!    - re-exec in place (`--supervisor none`, SIGUSR1, same PID, sockets via `LISTEN_FDS`);
//!    - exit 75 under a supervisor in this bench that holds the listening socket and
//!      relaunches the gateway with it as fd 3 (`LISTEN_FDS=1`, `LISTEN_PID` = the child).
//!
//!    Each path runs once idle (the figure compared with the target) and once under a
//!    light HTTP/1.1 keep-alive load that counts failed requests.
//!
//! Every datagram is timestamped on receipt and attributed to its sender (`SO_PASSCRED`);
//! the notification order, exit statuses and the gateway's ERROR/WARN lines are checked and
//! reported as findings. Other processes' CPU use during the run is reported too: medians
//! from a busy machine are inflated.
//!
//! Run with `cargo bench --bench lifecycle`: prints a table and writes
//! `target/bench-lifecycle.json`; gateway logs go to `target/bench-lifecycle-logs/`. Exits
//! non-zero only when a phase could not run. Without `--bench` (`cargo test --all-targets`)
//! it only says how to run it, so that test runs stay fast.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::client::conn::TrySendError;
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, kill};
use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};
use nix::unistd::Pid;
use serde_json::{Value, json};

const STARTS: usize = 50;
/// Extra starts on a state folder that already exists (for comparison only).
const WARM_STARTS: usize = 20;
/// Restarts per path without load: the figure compared with the target.
const RESTARTS: usize = 50;
/// Restarts per path with the client loop running.
const LOADED_RESTARTS: usize = 50;
const CLIENT_CONNECTIONS: usize = 8;
/// Pause between two requests of one client connection ("light" load).
const CLIENT_PAUSE: Duration = Duration::from_millis(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const STOPPING_TIMEOUT: Duration = Duration::from_secs(2);
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
const RSS_SETTLE: Duration = Duration::from_millis(200);
/// Phase deadlines, from the start of the run; the whole run stays under 3 minutes.
const STARTS_UNTIL: Duration = Duration::from_secs(60);
const REEXEC_UNTIL: Duration = Duration::from_secs(110);
const EXIT75_UNTIL: Duration = Duration::from_secs(160);

const TARGET_READY_MS: f64 = 15.0;
const TARGET_RSS_MIB: f64 = 12.0;
const TARGET_GAP_MS: f64 = 25.0;

/// Variables a gateway could pick up from the bench's own environment and that would
/// change what is measured.
const SCRUBBED_ENV: [&str; 13] = [
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

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("lifecycle: skipped (run it with `cargo bench --bench lifecycle`)");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lifecycle bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every phase; `Ok(false)` when a phase could not complete (the report still prints).
fn run() -> Result<bool, String> {
    let started = Instant::now();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_hermes-gateway"));
    if !bin.is_file() {
        return Err(format!("gateway binary {} does not exist", bin.display()));
    }
    let machine = Machine::probe(&bin);
    println!("hermes-gateway lifecycle bench");
    machine.print();
    println!();
    let cpu_start = CpuSnapshot::take();

    // Unix socket paths are limited to ~108 bytes: keep the work folder short.
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 40 {
        PathBuf::from("/tmp")
    } else {
        base
    };
    let work = tempfile::Builder::new()
        .prefix("hgw-bench.")
        .tempdir_in(&base)
        .map_err(|e| format!("cannot create a work folder in {}: {e}", base.display()))?;
    let notify = NotifySocket::bind(&work.path().join("notify.sock"))?;
    let kept_logs = json_path(&bin).with_file_name("bench-lifecycle-logs");
    if kept_logs.exists() {
        fs::remove_dir_all(&kept_logs)
            .map_err(|e| format!("cannot clear {}: {e}", kept_logs.display()))?;
    }
    let mut ctx = Ctx {
        kept_logs,
        bin,
        work: work.path().to_path_buf(),
        notify,
        findings: Findings::default(),
        observations: Findings::default(),
        started,
    };

    let mut ok = true;
    print!("[1/3] {STARTS} starts (exec → READY=1, VmRSS), {WARM_STARTS} warm starts ... ");
    flush_stdout();
    let mut starts = phase_starts(&mut ctx).unwrap_or_else(|e| {
        ok = false;
        ctx.findings.add("phase aborted: starts", e);
        StartsResult::default()
    });
    match phase_warm_starts(&mut ctx) {
        Ok(v) => starts.warm_ready_ms = v,
        Err(e) => {
            ok = false;
            ctx.findings.add("phase aborted: warm starts", e);
        }
    }
    println!(
        "{} fresh + {} warm done",
        starts.samples.len(),
        starts.warm_ready_ms.len()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the client runtime: {e}"))?;

    print!("[2/3] re-exec in place: {RESTARTS} idle + {LOADED_RESTARTS} loaded SIGUSR1 ... ");
    flush_stdout();
    let reexec = phase_reexec(&mut ctx, &rt).unwrap_or_else(|e| {
        ok = false;
        ctx.findings.add("phase aborted: re-exec", e);
        RestartResult::default()
    });
    println!(
        "{} + {} done",
        reexec.idle.len(),
        reexec.loaded.as_ref().map_or(0, |l| l.samples.len())
    );

    print!("[3/3] exit 75 + relaunch: {RESTARTS} idle + {LOADED_RESTARTS} loaded SIGUSR1 ... ");
    flush_stdout();
    let exit75 = phase_exit75(&mut ctx, &rt).unwrap_or_else(|e| {
        ok = false;
        ctx.findings.add("phase aborted: exit 75", e);
        RestartResult::default()
    });
    println!(
        "{} + {} done",
        exit75.idle.len(),
        exit75.loaded.as_ref().map_or(0, |l| l.samples.len())
    );
    drop(rt);
    keep_remaining_logs(&mut ctx);

    let elapsed = started.elapsed();
    let status_only = ctx.notify.status_only.load(Ordering::Relaxed);
    if status_only > 0 {
        ctx.observations.add(
            "STATUS=-only datagrams (the status refresher; its first tick repeats READY's STATUS)",
            format!("{status_only} in the run"),
        );
    }
    let background_cpus = match (cpu_start, CpuSnapshot::take()) {
        (Some(a), Some(b)) => Some(a.others_since(&b)),
        _ => None,
    };
    let report = Report {
        background_cpus,
        machine: &machine,
        starts: &starts,
        reexec: &reexec,
        exit75: &exit75,
        findings: &ctx.findings,
        observations: &ctx.observations,
        kept_logs: &ctx.kept_logs,
        elapsed,
    };
    println!();
    report.print();
    let json_path = json_path(&ctx.bin);
    match serde_json::to_string_pretty(&report.json()) {
        Ok(text) => match fs::write(&json_path, text + "\n") {
            Ok(()) => println!("\nJSON summary: {}", json_path.display()),
            Err(e) => {
                ok = false;
                eprintln!("cannot write {}: {e}", json_path.display());
            }
        },
        Err(e) => {
            ok = false;
            eprintln!("cannot serialise the JSON summary: {e}");
        }
    }
    drop(ctx);
    work.close()
        .map_err(|e| format!("cannot remove the work folder: {e}"))?;
    Ok(ok)
}

struct Ctx {
    bin: PathBuf,
    work: PathBuf,
    notify: NotifySocket,
    findings: Findings,
    /// Notable but expected behaviour, reported for information.
    observations: Findings,
    started: Instant,
    /// Where gateway logs are kept after the run (`target/bench-lifecycle-logs`).
    kept_logs: PathBuf,
}

impl Ctx {
    fn deadline(&self, from_start: Duration) -> Instant {
        self.started + from_start
    }

    /// Reports datagrams left over from an earlier step, then forgets them.
    fn discard_stale(&mut self, when: &str) {
        for n in self.notify.drain() {
            if !n.is_status_only() {
                self.findings.add(
                    format!("late notify datagram ({when})"),
                    format!("from pid {}: {}", n.pid_text(), n.one_line()),
                );
            }
        }
    }
}

fn flush_stdout() {
    let _ = io::stdout().flush();
}

// ---------------------------------------------------------------------------------------
// The notification socket
// ---------------------------------------------------------------------------------------

/// One datagram received on `NOTIFY_SOCKET`, timestamped on receipt.
#[derive(Debug, Clone)]
struct Note {
    at: Instant,
    /// The sender, from `SCM_CREDENTIALS` (the socket has `SO_PASSCRED`).
    pid: Option<i32>,
    text: String,
    /// Descriptors that came with it (`FDSTORE=1`); closed on receipt.
    fds: usize,
}

impl Note {
    fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    fn has_prefix(&self, prefix: &str) -> bool {
        self.text.lines().any(|l| l.starts_with(prefix))
    }

    /// Only `STATUS=` lines: the periodic status refresh, harmless anywhere.
    fn is_status_only(&self) -> bool {
        self.text.lines().all(|l| l.starts_with("STATUS="))
    }

    fn one_line(&self) -> String {
        let mut s = self.text.trim_end().replace('\n', "\\n");
        if self.fds > 0 {
            s.push_str(&format!(" (+{} fds)", self.fds));
        }
        s
    }

    fn pid_text(&self) -> String {
        self.pid.map_or("?".to_owned(), |p| p.to_string())
    }
}

/// Which sender a wait accepts.
#[derive(Debug, Clone, Copy)]
enum Source {
    Pid(i32),
    NotPid(i32),
}

impl Source {
    fn accepts(self, pid: Option<i32>) -> bool {
        match (self, pid) {
            (Source::Pid(p), Some(q)) => p == q,
            (Source::NotPid(p), Some(q)) => p != q,
            (_, None) => false,
        }
    }
}

/// A datagram socket like the one systemd gives a service, read by a thread that stamps
/// each datagram with the time of receipt.
struct NotifySocket {
    path: PathBuf,
    rx: mpsc::Receiver<Note>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Datagrams holding only `STATUS=` lines (the gateway's status refresher).
    status_only: Arc<AtomicU64>,
}

impl NotifySocket {
    fn bind(path: &Path) -> Result<Self, String> {
        let sock = UnixDatagram::bind(path)
            .map_err(|e| format!("cannot bind the notify socket {}: {e}", path.display()))?;
        setsockopt(&sock, sockopt::PassCred, &true)
            .map_err(|e| format!("SO_PASSCRED on the notify socket: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .map_err(|e| format!("read timeout on the notify socket: {e}"))?;
        let (tx, rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let status_only = Arc::new(AtomicU64::new(0));
        let counter = status_only.clone();
        let thread = thread::Builder::new()
            .name("notify-rx".into())
            .spawn(move || receive_loop(sock, tx, flag, counter))
            .map_err(|e| format!("cannot start the notify thread: {e}"))?;
        Ok(NotifySocket {
            path: path.to_path_buf(),
            rx,
            stop,
            thread: Some(thread),
            status_only,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn next(&self, timeout: Duration) -> Option<Note> {
        self.rx.recv_timeout(timeout).ok()
    }

    fn drain(&self) -> Vec<Note> {
        self.rx.try_iter().collect()
    }

    /// Waits for a datagram holding the line `key` from an accepted sender. Returns it with
    /// the datagrams seen before it. `check` is called between receipts and aborts the wait
    /// with its message (e.g. the process exited).
    fn wait_for(
        &self,
        key: &str,
        from: Source,
        timeout: Duration,
        check: &mut dyn FnMut() -> Option<String>,
    ) -> Result<(Note, Vec<Note>), String> {
        let deadline = Instant::now() + timeout;
        let mut before = Vec::new();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(format!(
                    "no `{key}` within {timeout:?}; received meanwhile: [{}]",
                    describe(&before)
                ));
            }
            let slice = (deadline - now).min(Duration::from_millis(50));
            match self.next(slice) {
                Some(n) if n.has(key) && from.accepts(n.pid) => return Ok((n, before)),
                Some(n) => before.push(n),
                None => {
                    if let Some(why) = check() {
                        // One last look: the datagram may have raced the exit.
                        while let Some(n) = self.next(Duration::from_millis(20)) {
                            if n.has(key) && from.accepts(n.pid) {
                                return Ok((n, before));
                            }
                            before.push(n);
                        }
                        return Err(format!(
                            "{why} before `{key}`; received: [{}]",
                            describe(&before)
                        ));
                    }
                }
            }
        }
    }
}

fn describe(notes: &[Note]) -> String {
    notes
        .iter()
        .map(|n| format!("pid {}: {}", n.pid_text(), n.one_line()))
        .collect::<Vec<_>>()
        .join("; ")
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn receive_loop(
    sock: UnixDatagram,
    tx: mpsc::Sender<Note>,
    stop: Arc<AtomicBool>,
    status_only: Arc<AtomicU64>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut cmsg = nix::cmsg_space!(libc::ucred, [RawFd; 32]);
    while !stop.load(Ordering::Relaxed) {
        let mut iov = [io::IoSliceMut::new(&mut buf)];
        let received = recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        );
        let at = Instant::now();
        let (bytes, pid, fds, note) = match received {
            Ok(msg) => {
                let mut pid = None;
                let mut fds = 0;
                let mut note = None;
                match msg.cmsgs() {
                    Ok(cmsgs) => {
                        for c in cmsgs {
                            match c {
                                ControlMessageOwned::ScmCredentials(cred) => pid = Some(cred.pid()),
                                ControlMessageOwned::ScmRights(raw) => {
                                    fds += raw.len();
                                    for fd in raw {
                                        // SAFETY: the kernel just installed `fd` in this
                                        // process for us; nobody else owns it. Dropping
                                        // the OwnedFd closes it.
                                        drop(unsafe { OwnedFd::from_raw_fd(fd) });
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    Err(e) => note = Some(format!(" [control data truncated: {e}]")),
                }
                (msg.bytes, pid, fds, note)
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                let _ = tx.send(Note {
                    at,
                    pid: None,
                    text: format!("BENCH-ERROR=recvmsg failed: {e}\n"),
                    fds: 0,
                });
                return;
            }
        };
        let mut text = String::from_utf8_lossy(&buf[..bytes]).into_owned();
        if let Some(n) = note {
            text.push_str(&n);
        }
        if text.lines().all(|l| l.starts_with("STATUS=")) {
            status_only.fetch_add(1, Ordering::Relaxed);
        }
        if tx.send(Note { at, pid, text, fds }).is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Child processes
// ---------------------------------------------------------------------------------------

/// A gateway process; killed (SIGKILL) and reaped on drop unless already reaped.
struct Proc {
    child: Child,
    /// Readable when the process exits: exact exit times without polling.
    pidfd: Option<OwnedFd>,
    status: Option<ExitStatus>,
    log: PathBuf,
}

impl Proc {
    fn spawn(cmd: &mut Command, log: &Path) -> Result<Proc, String> {
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

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig`, only while the process is not reaped (so the PID is still ours).
    fn signal(&mut self, sig: Signal) -> Result<(), String> {
        if self.status.is_some() {
            return Err(format!("cannot send {sig}: the process already exited"));
        }
        kill(Pid::from_raw(self.pid()), sig).map_err(|e| format!("kill({sig}): {e}"))
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(s)) = self.child.try_wait()
        {
            self.status = Some(s);
        }
        self.status
    }

    /// Waits up to `timeout` for the exit; returns the status and when it was noticed.
    fn wait_exit(&mut self, timeout: Duration) -> Option<(ExitStatus, Instant)> {
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
    fn stop(&mut self, timeout: Duration) -> Result<(ExitStatus, Instant), String> {
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

    fn log_tail(&self) -> String {
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

fn status_text(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{s}"),
    }
}

fn open_log(path: &Path) -> Result<File, String> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))
}

fn stdio_to(log: &File) -> Result<(Stdio, Stdio), String> {
    let out = log
        .try_clone()
        .map_err(|e| format!("cannot duplicate the log descriptor: {e}"))?;
    let err = log
        .try_clone()
        .map_err(|e| format!("cannot duplicate the log descriptor: {e}"))?;
    Ok((Stdio::from(out), Stdio::from(err)))
}

/// `hermes-gateway run`, logging to `log`, notifying the bench, with a clean environment.
fn gateway_command(
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
fn write_config(dir: &Path, api: &str) -> Result<PathBuf, String> {
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

fn make_dir(path: &Path) -> Result<(), String> {
    fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// `GET /status` on the control socket.
fn control_status(socket: &Path) -> Result<Value, String> {
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

fn listener_address(status: &Value, name: &str) -> Option<(String, String)> {
    status["listeners"].as_array()?.iter().find_map(|l| {
        (l["name"] == name).then(|| {
            (
                l["address"].as_str().unwrap_or("").to_owned(),
                l["origin"].as_str().unwrap_or("").to_owned(),
            )
        })
    })
}

// ---------------------------------------------------------------------------------------
// Memory
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
struct Mem {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
}

fn read_mem(pid: i32) -> Option<Mem> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some(Mem {
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        file_kib: field("RssFile:").unwrap_or(0),
        threads: field("Threads:").unwrap_or(0),
    })
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

// ---------------------------------------------------------------------------------------
// Phase 1: starts
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct StartsResult {
    samples: Vec<StartSample>,
    first_sequence: Vec<String>,
    /// exec → READY=1 with a state folder that an earlier start already filled.
    warm_ready_ms: Vec<f64>,
}

struct StartSample {
    ready_ms: f64,
    at_ready: Option<Mem>,
    settled: Option<Mem>,
    stopping_ms: Option<f64>,
    exit_ms: Option<f64>,
}

fn phase_starts(ctx: &mut Ctx) -> Result<StartsResult, String> {
    let deadline = ctx.deadline(STARTS_UNTIL);
    let mut out = StartsResult::default();
    for i in 0..STARTS {
        if Instant::now() >= deadline {
            ctx.findings.add(
                "time budget",
                format!("start phase stopped after {i} of {STARTS} starts"),
            );
            break;
        }
        let dir = ctx.work.join(format!("start-{i}"));
        make_dir(&dir)?;
        let config = write_config(&dir, "127.0.0.1:0")?;
        let log_path = dir.join("gateway.log");
        let log = open_log(&log_path)?;
        let mut cmd = gateway_command(&ctx.bin, &config, "auto", ctx.notify.path(), &log)?;
        ctx.discard_stale("before a start");

        let t0 = Instant::now();
        let mut gw = Proc::spawn(&mut cmd, &log_path)?;
        let pid = gw.pid();
        let problems = ctx.findings.total();
        let (ready, before) = {
            let mut check = || gw.exited().map(|s| format!("gateway {}", status_text(s)));
            ctx.notify
                .wait_for("READY=1", Source::Pid(pid), READY_TIMEOUT, &mut check)
        }
        .map_err(|e| format!("start {i}: {e}\n{}", gw.log_tail()))?;
        let at_ready = read_mem(pid);
        let ready_ms = ms(ready.at - t0);
        for n in &before {
            if !(n.has("FDSTORE=1") || n.is_status_only()) {
                ctx.findings.add(
                    "unexpected notify datagram before READY=1",
                    format!("pid {}: {}", n.pid_text(), n.one_line()),
                );
            }
        }
        check_ready_status(ctx, &ready, "start");
        thread::sleep(RSS_SETTLE.saturating_sub(ready.at.elapsed()));
        let settled = read_mem(pid);

        let t_term = Instant::now();
        gw.signal(Signal::SIGTERM)?;
        let stopping = {
            let mut check = || None;
            ctx.notify
                .wait_for("STOPPING=1", Source::Pid(pid), STOPPING_TIMEOUT, &mut check)
        };
        let stopping_ms = match &stopping {
            Ok((n, before)) => {
                for b in before {
                    if !b.is_status_only() {
                        ctx.findings.add(
                            "unexpected notify datagram between READY=1 and STOPPING=1",
                            format!("pid {}: {}", b.pid_text(), b.one_line()),
                        );
                    }
                }
                Some(ms(n.at - t_term))
            }
            Err(e) => {
                ctx.findings
                    .add("SIGTERM: no STOPPING=1", format!("start {i}: {e}"));
                None
            }
        };
        let exit_ms = match gw.wait_exit(EXIT_TIMEOUT) {
            Some((s, at)) => {
                if s.code() != Some(0) {
                    ctx.findings.add(
                        "SIGTERM: exit status is not 0",
                        format!("start {i}: {}\n{}", status_text(s), gw.log_tail()),
                    );
                }
                Some(ms(at - t_term))
            }
            None => {
                ctx.findings.add(
                    "SIGTERM: no exit",
                    format!("start {i}: still running {EXIT_TIMEOUT:?} after SIGTERM; killed"),
                );
                None
            }
        };
        drop(gw);
        if i == 0 {
            let mut seq: Vec<String> = before.iter().map(Note::one_line).collect();
            seq.push(ready.one_line());
            if let Ok((n, _)) = &stopping {
                seq.push(n.one_line());
            }
            out.first_sequence = seq;
        }
        let bad = scan_log(ctx, &log_path, "start");
        if i == 0 || bad || problems != ctx.findings.total() {
            keep_log(ctx, &log_path, &format!("start-{i}.log"));
        }
        let _ = fs::remove_dir_all(&dir);
        out.samples.push(StartSample {
            ready_ms,
            at_ready,
            settled,
            stopping_ms,
            exit_ms,
        });
    }
    Ok(out)
}

/// exec → READY=1 when the state folder already exists (filled by an untimed first start).
fn phase_warm_starts(ctx: &mut Ctx) -> Result<Vec<f64>, String> {
    let deadline = ctx.deadline(STARTS_UNTIL + Duration::from_secs(10));
    let dir = ctx.work.join("warm");
    make_dir(&dir)?;
    let config = write_config(&dir, "127.0.0.1:0")?;
    let log_path = dir.join("gateway.log");
    let log = open_log(&log_path)?;
    let mut out = Vec::with_capacity(WARM_STARTS);
    for i in 0..=WARM_STARTS {
        if Instant::now() >= deadline {
            ctx.findings.add(
                "time budget",
                format!("warm starts stopped after {i} of {WARM_STARTS}"),
            );
            break;
        }
        let mut cmd = gateway_command(&ctx.bin, &config, "auto", ctx.notify.path(), &log)?;
        ctx.discard_stale("before a warm start");
        let t0 = Instant::now();
        let mut gw = Proc::spawn(&mut cmd, &log_path)?;
        let pid = gw.pid();
        let (ready, _) = {
            let mut check = || gw.exited().map(|s| format!("gateway {}", status_text(s)));
            ctx.notify
                .wait_for("READY=1", Source::Pid(pid), READY_TIMEOUT, &mut check)
        }
        .map_err(|e| format!("warm start {i}: {e}\n{}", gw.log_tail()))?;
        // The first start only fills the state folder.
        if i > 0 {
            out.push(ms(ready.at - t0));
        }
        let stopped = gw.stop(EXIT_TIMEOUT);
        if let Err(e) = ctx.notify.wait_for(
            "STOPPING=1",
            Source::Pid(pid),
            Duration::from_millis(200),
            &mut || None,
        ) {
            ctx.findings
                .add("SIGTERM: no STOPPING=1", format!("warm start {i}: {e}"));
        }
        match stopped {
            Ok((s, _)) if s.code() == Some(0) => {}
            Ok((s, _)) => ctx.findings.add(
                "SIGTERM: exit status is not 0",
                format!("warm start {i}: {}\n{}", status_text(s), gw.log_tail()),
            ),
            Err(e) => ctx
                .findings
                .add("SIGTERM: no exit", format!("warm start {i}: {e}")),
        }
    }
    if scan_log(ctx, &log_path, "warm start") {
        keep_log(ctx, &log_path, "warm.log");
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(out)
}

fn check_ready_status(ctx: &mut Ctx, ready: &Note, when: &str) {
    let status = ready.text.lines().find_map(|l| l.strip_prefix("STATUS="));
    match status {
        Some(s) if s.starts_with("serving") => {}
        other => ctx.findings.add(
            format!("READY=1 without a `STATUS=serving...` line ({when})"),
            format!("STATUS={other:?}"),
        ),
    }
}

/// Reports what a gateway logged: ERROR lines and panics as findings, WARN lines as
/// observations. Returns whether there was an ERROR or a panic.
fn scan_log(ctx: &mut Ctx, path: &Path, what: &str) -> bool {
    let Ok(text) = fs::read_to_string(path) else {
        return false;
    };
    let mut bad = false;
    for line in text.lines().map(strip_ansi) {
        if line.contains("panicked at") {
            bad = true;
            ctx.findings
                .add(format!("gateway panicked ({what})"), line.trim().to_owned());
            continue;
        }
        let level = if line.contains(" ERROR ") {
            "ERROR"
        } else if line.contains(" WARN ") {
            "WARN"
        } else {
            continue;
        };
        // The message without its timestamp, so that repeats count as one finding.
        let message = line
            .split_once(&format!(" {level} "))
            .map_or(line.as_str(), |(_, m)| m)
            .trim()
            .to_owned();
        if level == "ERROR" {
            bad = true;
            ctx.findings
                .add(format!("gateway logged ERROR ({what})"), message);
        } else {
            ctx.observations
                .add(format!("gateway logged WARN ({what})"), message);
        }
    }
    bad
}

/// Keeps the logs of steps that ended early (their folders are still in the work folder).
fn keep_remaining_logs(ctx: &mut Ctx) {
    let Ok(entries) = fs::read_dir(&ctx.work) else {
        return;
    };
    let mut logs: Vec<(PathBuf, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let log = e.path().join("gateway.log");
            let name = format!("{}.log", e.file_name().to_string_lossy());
            (log.is_file() && !ctx.kept_logs.join(&name).exists()).then_some((log, name))
        })
        .collect();
    logs.sort();
    for (log, name) in logs {
        keep_log(ctx, &log, &name);
    }
}

/// Copies a gateway log out of the work folder (which is removed at the end).
fn keep_log(ctx: &mut Ctx, path: &Path, name: &str) {
    if let Err(e) = fs::create_dir_all(&ctx.kept_logs)
        .and_then(|()| fs::copy(path, ctx.kept_logs.join(name)).map(|_| ()))
    {
        ctx.findings.add(
            "bench: cannot keep a gateway log",
            format!("{} → {}: {e}", path.display(), ctx.kept_logs.display()),
        );
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<String> = text.lines().map(strip_ansi).collect();
    let from = all.len().saturating_sub(lines);
    format!(
        "--- last lines of {} ---\n{}",
        path.display(),
        all[from..].join("\n")
    )
}

// ---------------------------------------------------------------------------------------
// Restarts (both paths)
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct RestartResult {
    idle: Vec<RestartSample>,
    loaded: Option<LoadedRun>,
    /// The exit-75 path's breakdown of the idle gap (old exit, relaunch, new start).
    breakdown: Option<Breakdown>,
    first_sequence: Vec<String>,
    final_exit: Option<String>,
}

struct LoadedRun {
    samples: Vec<RestartSample>,
    load: LoadReport,
}

#[derive(Debug, Clone)]
struct RestartSample {
    old_pid: i32,
    new_pid: i32,
    t_signal: Instant,
    t_stopping: Instant,
    t_ready: Instant,
}

impl RestartSample {
    fn gap_ms(&self) -> f64 {
        ms(self.t_ready - self.t_stopping)
    }
    fn signal_to_ready_ms(&self) -> f64 {
        ms(self.t_ready - self.t_signal)
    }
}

#[derive(Default)]
struct Breakdown {
    stopping_to_exit: Vec<f64>,
    exit_to_spawn: Vec<f64>,
    spawn_to_ready: Vec<f64>,
}

/// How the next READY=1 is told apart: same PID (re-exec) or a new one (relaunch).
#[derive(Clone, Copy, PartialEq, Eq)]
enum NextImage {
    SamePid,
    NewPid,
}

/// What a series of restarts is.
struct Restarts<'a> {
    label: &'a str,
    count: usize,
    deadline: Instant,
    next: NextImage,
}

/// Sends SIGUSR1 `count` times to the current gateway and times STOPPING=1 → READY=1.
fn restarts(
    ctx: &mut Ctx,
    plan: Restarts<'_>,
    pid: &mut i32,
    alive: &mut dyn FnMut() -> Option<String>,
    first_sequence: &mut Vec<String>,
) -> Result<Vec<RestartSample>, String> {
    let Restarts {
        label,
        count,
        deadline,
        next,
    } = plan;
    let mut out = Vec::with_capacity(count);
    let mut extend_count = 0;
    for i in 0..count {
        if Instant::now() >= deadline {
            ctx.findings.add(
                "time budget",
                format!("{label}: stopped after {i} of {count} restarts"),
            );
            break;
        }
        ctx.discard_stale(label);
        let old = *pid;
        let t_signal = Instant::now();
        kill(Pid::from_raw(old), Signal::SIGUSR1)
            .map_err(|e| format!("{label} #{i}: SIGUSR1 to {old}: {e}"))?;
        let (stopping, before_stop) = ctx
            .notify
            .wait_for("STOPPING=1", Source::Pid(old), STOPPING_TIMEOUT, alive)
            .map_err(|e| format!("{label} #{i}: {e}"))?;
        let from = match next {
            NextImage::SamePid => Source::Pid(old),
            NextImage::NewPid => Source::NotPid(old),
        };
        let (ready, before_ready) = ctx
            .notify
            .wait_for("READY=1", from, READY_TIMEOUT, alive)
            .map_err(|e| format!("{label} #{i}: {e}"))?;
        let extends = before_ready
            .iter()
            .filter(|n| n.has_prefix("EXTEND_TIMEOUT_USEC=") && n.pid == Some(old))
            .count();
        extend_count += extends;
        for n in before_stop.iter().chain(&before_ready) {
            let by_design = n.has_prefix("EXTEND_TIMEOUT_USEC=") && n.pid == Some(old);
            if !n.is_status_only() && !by_design {
                ctx.findings.add(
                    format!("{label}: unexpected notify datagram during a restart"),
                    format!("pid {}: {}", n.pid_text(), n.one_line()),
                );
            }
        }
        if stopping.text.contains("STATUS=") && !stopping.text.contains("restart") {
            ctx.findings.add(
                format!("{label}: STOPPING=1 status does not say restart"),
                stopping.one_line(),
            );
        }
        check_ready_status(ctx, &ready, label);
        let new = ready.pid.unwrap_or(0);
        if i == 0 && first_sequence.is_empty() {
            let mut seq = vec![format!("(SIGUSR1 to {old})")];
            seq.extend(
                before_stop
                    .iter()
                    .map(|n| format!("pid {}: {}", n.pid_text(), n.one_line())),
            );
            seq.push(format!(
                "pid {}: {}",
                stopping.pid_text(),
                stopping.one_line()
            ));
            seq.extend(
                before_ready
                    .iter()
                    .map(|n| format!("pid {}: {}", n.pid_text(), n.one_line())),
            );
            seq.push(format!("pid {}: {}", ready.pid_text(), ready.one_line()));
            *first_sequence = seq;
        }
        *pid = new;
        out.push(RestartSample {
            old_pid: old,
            new_pid: new,
            t_signal,
            t_stopping: stopping.at,
            t_ready: ready.at,
        });
    }
    if extend_count > 0 {
        ctx.observations.add(
            format!("{label}: EXTEND_TIMEOUT_USEC from the draining image (connections open)"),
            format!("{extend_count} datagrams over {} restarts", out.len()),
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Phase 2: re-exec in place
// ---------------------------------------------------------------------------------------

fn phase_reexec(ctx: &mut Ctx, rt: &tokio::runtime::Runtime) -> Result<RestartResult, String> {
    let deadline = ctx.deadline(REEXEC_UNTIL);
    let dir = ctx.work.join("reexec");
    make_dir(&dir)?;
    let config = write_config(&dir, "127.0.0.1:0")?;
    let log_path = dir.join("gateway.log");
    let log = open_log(&log_path)?;
    let mut cmd = gateway_command(&ctx.bin, &config, "none", ctx.notify.path(), &log)?;
    ctx.discard_stale("before the re-exec gateway");
    let mut gw = Proc::spawn(&mut cmd, &log_path)?;
    let first_pid = gw.pid();
    {
        let mut check = || gw.exited().map(|s| format!("gateway {}", status_text(s)));
        ctx.notify
            .wait_for("READY=1", Source::Pid(first_pid), READY_TIMEOUT, &mut check)
    }
    .map_err(|e| format!("{e}\n{}", gw.log_tail()))?;
    let status = control_status(&dir.join("control.sock"))?;
    if status["supervisor"] != "none" {
        ctx.findings.add(
            "re-exec: --supervisor none not honoured",
            format!("control /status says supervisor = {}", status["supervisor"]),
        );
    }
    let (api, _) = listener_address(&status, "api")
        .ok_or_else(|| format!("control /status lists no api listener: {status}"))?;
    let api: SocketAddr = api
        .parse()
        .map_err(|e| format!("api listener address `{api}`: {e}"))?;

    let mut result = RestartResult::default();
    let mut pid = first_pid;
    let outcome = (|| -> Result<(), String> {
        let mut alive = || gw.exited().map(|s| format!("gateway {}", status_text(s)));
        result.idle = restarts(
            ctx,
            Restarts {
                label: "re-exec",
                count: RESTARTS,
                deadline,
                next: NextImage::SamePid,
            },
            &mut pid,
            &mut alive,
            &mut result.first_sequence,
        )?;
        let load = Load::start(rt, api, CLIENT_CONNECTIONS);
        // Let the client loop reach its steady state first.
        thread::sleep(Duration::from_millis(200));
        let samples = restarts(
            ctx,
            Restarts {
                label: "re-exec (loaded)",
                count: LOADED_RESTARTS,
                deadline,
                next: NextImage::SamePid,
            },
            &mut pid,
            &mut alive,
            &mut result.first_sequence,
        );
        thread::sleep(Duration::from_millis(200));
        let load = load.finish(rt);
        check_load(ctx, "re-exec", &load);
        result.loaded = Some(LoadedRun {
            samples: samples?,
            load,
        });
        Ok(())
    })();

    // After the re-execs: still the same process, sockets from the re-exec.
    if outcome.is_ok() {
        match control_status(&dir.join("control.sock")) {
            Ok(s) => {
                if s["pid"] != first_pid {
                    ctx.findings.add(
                        "re-exec: PID changed",
                        format!("started as {first_pid}, control /status says {}", s["pid"]),
                    );
                }
                match listener_address(&s, "api") {
                    Some((addr, origin)) if addr == api.to_string() && origin == "re-exec" => {}
                    other => ctx.findings.add(
                        "re-exec: api listener not inherited",
                        format!("after re-execs: {other:?}, before: {api}"),
                    ),
                }
            }
            Err(e) => ctx
                .findings
                .add("re-exec: control /status failed after re-execs", e),
        }
    }
    result.final_exit = Some(final_stop(ctx, &mut gw, first_pid, "re-exec"));
    scan_log(ctx, &log_path, "re-exec");
    keep_log(ctx, &log_path, "reexec.log");
    let _ = fs::remove_dir_all(&dir);
    outcome?;
    Ok(result)
}

/// SIGTERM, expect STOPPING=1 and exit 0; returns what happened.
fn final_stop(ctx: &mut Ctx, gw: &mut Proc, pid: i32, label: &str) -> String {
    ctx.discard_stale(label);
    let text = match gw.stop(EXIT_TIMEOUT) {
        Ok((s, _)) => status_text(s),
        Err(e) => e,
    };
    let stopping = ctx.notify.wait_for(
        "STOPPING=1",
        Source::Pid(pid),
        Duration::from_millis(200),
        &mut || None,
    );
    if stopping.is_err() {
        ctx.findings
            .add(format!("{label}: SIGTERM without STOPPING=1"), text.clone());
    }
    if text != "exit 0" {
        ctx.findings.add(
            format!("{label}: SIGTERM did not end with exit 0"),
            format!("{text}\n{}", gw.log_tail()),
        );
    }
    text
}

// ---------------------------------------------------------------------------------------
// Phase 3: exit 75 under a supervisor that keeps the listening socket
// ---------------------------------------------------------------------------------------

enum SupEvent {
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
struct MiniSupervisor {
    stop: Arc<AtomicBool>,
    events: mpsc::Receiver<SupEvent>,
    thread: Option<JoinHandle<()>>,
}

impl MiniSupervisor {
    fn start(
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
    fn finish(mut self) -> Vec<SupEvent> {
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
struct ExecPlan {
    path: Vec<u8>,
    argv: Vec<Vec<u8>>,
    envp: Vec<Vec<u8>>,
    /// Index in `envp` of the `LISTEN_PID=` entry, sized for any PID.
    pid_slot: usize,
    listen_fd: RawFd,
    /// Keeps the socket open for as long as launches may happen.
    _listener: Arc<TcpListener>,
}

const MAX_ARGS: usize = 16;
const MAX_ENV: usize = 1024;
const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";

impl ExecPlan {
    fn new(
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

    fn command(&mut self, log: &File) -> Result<Command, String> {
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

fn phase_exit75(ctx: &mut Ctx, rt: &tokio::runtime::Runtime) -> Result<RestartResult, String> {
    let deadline = ctx.deadline(EXIT75_UNTIL);
    let dir = ctx.work.join("exit75");
    make_dir(&dir)?;
    // The gateway's own api setting is unused: the api socket is handed over.
    let config = write_config(&dir, "127.0.0.1:0")?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot bind the supervisor's api socket: {e}"))?;
    let api = listener
        .local_addr()
        .map_err(|e| format!("supervisor's api socket address: {e}"))?;
    let listener = Arc::new(listener);
    let plan = ExecPlan::new(&ctx.bin, &config, ctx.notify.path(), listener.clone())?;
    let log_path = dir.join("gateway.log");
    let log = open_log(&log_path)?;
    ctx.discard_stale("before the exit-75 gateway");
    let max_launches = 1 + RESTARTS + LOADED_RESTARTS;
    let sup = MiniSupervisor::start(plan, log, log_path.clone(), max_launches + 1)?;

    let mut result = RestartResult::default();
    let mut failure: Option<String> = None;
    let mut samples_idle = Vec::new();
    let mut loaded = None;
    // Supervisor events seen while waiting (they arrive on their own channel).
    let mut events: Vec<SupEvent> = Vec::new();
    let mut first_pid = 0;
    {
        let mut gone = || {
            for e in sup.events.try_iter() {
                events.push(e);
            }
            events.iter().find_map(|e| match e {
                SupEvent::Failed(m) => Some(format!("supervisor: {m}")),
                SupEvent::Exited { pid, status, .. } if status.code() != Some(75) => {
                    Some(format!("gateway {pid} {}", status_text(*status)))
                }
                _ => None,
            })
        };
        match ctx
            .notify
            .wait_for("READY=1", Source::NotPid(0), READY_TIMEOUT, &mut gone)
        {
            Ok((n, _)) => first_pid = n.pid.unwrap_or(0),
            Err(e) => failure = Some(format!("first start: {e}\n{}", log_tail(&log_path, 8))),
        }
        if failure.is_none() {
            match control_status(&dir.join("control.sock")) {
                Ok(s) => {
                    if s["supervisor"] != "systemd" {
                        ctx.findings.add(
                            "exit 75: NOTIFY_SOCKET + LISTEN_FDS not detected as systemd",
                            format!("control /status says supervisor = {}", s["supervisor"]),
                        );
                    }
                    match listener_address(&s, "api") {
                        Some((addr, origin)) if addr == api.to_string() && origin == "systemd" => {}
                        other => ctx.findings.add(
                            "exit 75: handed-over api socket not adopted",
                            format!("control /status api = {other:?}, handed over {api}"),
                        ),
                    }
                }
                Err(e) => ctx.findings.add("exit 75: control /status failed", e),
            }
            let mut pid = first_pid;
            match restarts(
                ctx,
                Restarts {
                    label: "exit 75",
                    count: RESTARTS,
                    deadline,
                    next: NextImage::NewPid,
                },
                &mut pid,
                &mut gone,
                &mut result.first_sequence,
            ) {
                Ok(s) => samples_idle = s,
                Err(e) => failure = Some(e),
            }
            if failure.is_none() {
                let load = Load::start(rt, api, CLIENT_CONNECTIONS);
                thread::sleep(Duration::from_millis(200));
                let samples = restarts(
                    ctx,
                    Restarts {
                        label: "exit 75 (loaded)",
                        count: LOADED_RESTARTS,
                        deadline,
                        next: NextImage::NewPid,
                    },
                    &mut pid,
                    &mut gone,
                    &mut result.first_sequence,
                );
                thread::sleep(Duration::from_millis(200));
                let load = load.finish(rt);
                check_load(ctx, "exit 75", &load);
                match samples {
                    Ok(samples) => loaded = Some(LoadedRun { samples, load }),
                    Err(e) => failure = Some(e),
                }
            }
        }
    }
    events.extend(sup.finish());
    drop(listener);

    // Exit statuses and the breakdown of each idle gap.
    let mut spawned: BTreeMap<i32, Instant> = BTreeMap::new();
    let mut exited: BTreeMap<i32, (Instant, ExitStatus)> = BTreeMap::new();
    for e in &events {
        match e {
            SupEvent::Spawned { pid, at } => {
                spawned.insert(*pid, *at);
            }
            SupEvent::Exited { pid, at, status } => {
                exited.insert(*pid, (*at, *status));
            }
            SupEvent::Failed(m) => ctx.findings.add("exit 75: supervisor problem", m.clone()),
        }
    }
    let mut breakdown = Breakdown::default();
    for s in samples_idle
        .iter()
        .chain(loaded.iter().flat_map(|l: &LoadedRun| l.samples.iter()))
    {
        match exited.get(&s.old_pid) {
            Some((_, st)) if st.code() == Some(75) => {}
            Some((_, st)) => ctx.findings.add(
                "exit 75: SIGUSR1 did not end with exit 75",
                format!("pid {}: {}", s.old_pid, status_text(*st)),
            ),
            None => ctx.findings.add(
                "exit 75: old gateway exit not seen",
                format!("pid {}", s.old_pid),
            ),
        }
        if !spawned.contains_key(&s.new_pid) {
            ctx.findings.add(
                "exit 75: READY=1 from a process the supervisor did not start",
                format!("pid {}", s.new_pid),
            );
        }
    }
    for s in &samples_idle {
        if let (Some((exit_at, _)), Some(spawn_at)) =
            (exited.get(&s.old_pid), spawned.get(&s.new_pid))
        {
            breakdown
                .stopping_to_exit
                .push(ms(exit_at.saturating_duration_since(s.t_stopping)));
            breakdown
                .exit_to_spawn
                .push(ms(spawn_at.saturating_duration_since(*exit_at)));
            breakdown
                .spawn_to_ready
                .push(ms(s.t_ready.saturating_duration_since(*spawn_at)));
        }
    }
    // The last gateway was stopped by the supervisor with SIGTERM.
    let last = samples_idle
        .iter()
        .chain(loaded.iter().flat_map(|l: &LoadedRun| l.samples.iter()))
        .last()
        .map_or(first_pid, |s| s.new_pid);
    result.final_exit = exited.get(&last).map(|(_, st)| status_text(*st));
    if failure.is_none() && result.final_exit.as_deref() != Some("exit 0") {
        ctx.findings.add(
            "exit 75: SIGTERM did not end with exit 0",
            format!("pid {last}: {:?}", result.final_exit),
        );
    }
    scan_log(ctx, &log_path, "exit 75");
    keep_log(ctx, &log_path, "exit75.log");
    let _ = fs::remove_dir_all(&dir);
    result.idle = samples_idle;
    result.loaded = loaded;
    result.breakdown = Some(breakdown);
    match failure {
        Some(e) => Err(e),
        None => Ok(result),
    }
}

// ---------------------------------------------------------------------------------------
// The client loop
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct LoadStats {
    ok: AtomicU64,
    failed: AtomicU64,
    connections: AtomicU64,
    /// Requests not written because the connection was already closing; sent again on a
    /// new connection (what any HTTP client does).
    retried_unsent: AtomicU64,
    kinds: Mutex<BTreeMap<String, u64>>,
    /// When each failure happened, to place it relative to the restarts.
    failed_at: Mutex<Vec<Instant>>,
}

impl LoadStats {
    fn fail(&self, kind: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut k) = self.kinds.lock() {
            *k.entry(kind).or_default() += 1;
        }
        if let Ok(mut t) = self.failed_at.lock() {
            t.push(Instant::now());
        }
    }
}

struct Load {
    stop: Arc<AtomicBool>,
    stats: Arc<LoadStats>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    started: Instant,
}

#[derive(Debug, Default)]
struct LoadReport {
    ok: u64,
    failed: u64,
    connections: u64,
    retried_unsent: u64,
    kinds: BTreeMap<String, u64>,
    failed_at: Vec<Instant>,
    seconds: f64,
}

impl LoadReport {
    /// Each failure's time after the latest STOPPING=1 before it (ms), and whether it fell
    /// inside that restart's STOPPING → READY window.
    fn placement(&self, samples: &[RestartSample]) -> Vec<(f64, bool)> {
        self.failed_at
            .iter()
            .filter_map(|t| {
                let s = samples.iter().rev().find(|s| s.t_stopping <= *t)?;
                Some((ms(*t - s.t_stopping), *t <= s.t_ready))
            })
            .collect()
    }
}

impl Load {
    fn start(rt: &tokio::runtime::Runtime, addr: SocketAddr, connections: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LoadStats::default());
        let tasks = (0..connections)
            .map(|_| rt.spawn(client(addr, stop.clone(), stats.clone())))
            .collect();
        Load {
            stop,
            stats,
            tasks,
            started: Instant::now(),
        }
    }

    fn finish(self, rt: &tokio::runtime::Runtime) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        let seconds = self.started.elapsed().as_secs_f64();
        rt.block_on(async {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
            for t in self.tasks {
                let abort = t.abort_handle();
                if tokio::time::timeout_at(deadline, t).await.is_err() {
                    abort.abort();
                }
            }
        });
        let s = &self.stats;
        LoadReport {
            ok: s.ok.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            connections: s.connections.load(Ordering::Relaxed),
            retried_unsent: s.retried_unsent.load(Ordering::Relaxed),
            kinds: s.kinds.lock().map(|k| k.clone()).unwrap_or_default(),
            failed_at: s.failed_at.lock().map(|k| k.clone()).unwrap_or_default(),
            seconds,
        }
    }
}

/// One keep-alive connection doing `GET /health` in a loop; reconnects when the server
/// closes it. Every request that was sent and got no 200 counts as failed.
async fn client(addr: SocketAddr, stop: Arc<AtomicBool>, stats: Arc<LoadStats>) {
    let mut pending: Option<http::Request<Empty<Bytes>>> = None;
    while !stop.load(Ordering::Relaxed) {
        let stream =
            match tokio::time::timeout(REQUEST_TIMEOUT, tokio::net::TcpStream::connect(addr)).await
            {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    stats.fail(format!("connect: {:?}", e.kind()));
                    pending = None;
                    tokio::time::sleep(CLIENT_PAUSE).await;
                    continue;
                }
                Err(_) => {
                    stats.fail("connect: timeout".into());
                    pending = None;
                    continue;
                }
            };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(x) => x,
                Err(e) => {
                    stats.fail(format!("handshake: {}", classify(&e)));
                    pending = None;
                    continue;
                }
            };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let driver = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut nth = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            // The server closed the connection between requests (`Connection: close`, or an
            // idle close it announced): nothing was sent, open a new one.
            if sender.ready().await.is_err() {
                break;
            }
            let req = match pending.take() {
                Some(r) => r,
                None => match health_request() {
                    Ok(r) => r,
                    Err(e) => {
                        stats.fail(format!("building the request: {e}"));
                        tokio::time::sleep(CLIENT_PAUSE).await;
                        continue;
                    }
                },
            };
            let exchange = async {
                let resp = sender.try_send_request(req).await?;
                let status = resp.status();
                let body = resp.into_body().collect().await;
                Ok::<_, TrySendError<http::Request<Empty<Bytes>>>>(body.map(|_| status))
            };
            nth += 1;
            let on = if nth == 1 {
                "1st request on a new connection"
            } else {
                "later request on a keep-alive connection"
            };
            match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
                Ok(Ok(Ok(status))) if status == http::StatusCode::OK => {
                    stats.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok(Ok(status))) => stats.fail(format!("status {status}, {on}")),
                Ok(Ok(Err(e))) => {
                    stats.fail(format!("response body: {}, {on}", classify(&e)));
                    break;
                }
                Ok(Err(mut e)) => {
                    if let Some(unsent) = e.take_message() {
                        stats.retried_unsent.fetch_add(1, Ordering::Relaxed);
                        pending = Some(unsent);
                    } else {
                        stats.fail(format!("{}, {on}", classify(e.error())));
                    }
                    break;
                }
                Err(_) => {
                    stats.fail(format!("no response within 2 s, {on}"));
                    break;
                }
            }
            tokio::time::sleep(CLIENT_PAUSE).await;
        }
        driver.abort();
    }
}

/// Failed requests, or none served at all, are findings.
fn check_load(ctx: &mut Ctx, label: &str, load: &LoadReport) {
    if load.failed > 0 {
        let kinds: Vec<String> = load
            .kinds
            .iter()
            .map(|(k, n)| format!("{n} × {k}"))
            .collect();
        ctx.findings.add(
            format!("{label}: requests failed during restarts under load"),
            format!(
                "{} failed, {} ok: {}",
                load.failed,
                load.ok,
                kinds.join("; ")
            ),
        );
    }
    if load.ok == 0 {
        ctx.findings.add(
            format!("{label}: the client loop got no response at all"),
            format!("{} failed", load.failed),
        );
    }
}

fn health_request() -> Result<http::Request<Empty<Bytes>>, http::Error> {
    http::Request::get("/health")
        .header(http::header::HOST, "127.0.0.1")
        .body(Empty::new())
}

fn classify(e: &hyper::Error) -> String {
    let kind = if e.is_incomplete_message() {
        "connection closed before the response"
    } else if e.is_canceled() {
        "canceled"
    } else if e.is_closed() {
        "connection closed"
    } else if e.is_parse() {
        "parse error"
    } else if e.is_timeout() {
        "timeout"
    } else {
        "error"
    };
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return format!("{kind} ({:?})", io.kind());
        }
        source = s.source();
    }
    kind.to_owned()
}

// ---------------------------------------------------------------------------------------
// Findings, statistics, machine, report
// ---------------------------------------------------------------------------------------

/// Things that looked wrong, by kind, with a count and the first example.
#[derive(Default)]
struct Findings(BTreeMap<String, (usize, String)>);

impl Findings {
    fn json(&self) -> Value {
        self.0
            .iter()
            .map(|(k, (n, e))| json!({"kind": k, "count": n, "example": e}))
            .collect()
    }

    fn total(&self) -> usize {
        self.0.values().map(|(n, _)| n).sum()
    }

    fn add(&mut self, kind: impl Into<String>, example: impl Into<String>) {
        let e = self.0.entry(kind.into()).or_insert((0, example.into()));
        e.0 += 1;
    }
}

#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    median: f64,
    p90: f64,
    min: f64,
    max: f64,
}

fn stats(values: &[f64]) -> Option<Stats> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    // Nearest rank.
    let p90 = v[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1];
    Some(Stats {
        n,
        median,
        p90,
        min: v[0],
        max: v[n - 1],
    })
}

fn stats_json(values: &[f64]) -> Value {
    match stats(values) {
        Some(s) => json!({
            "n": s.n,
            "median": round3(s.median),
            "p90": round3(s.p90),
            "min": round3(s.min),
            "max": round3(s.max),
            "samples": values.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
        }),
        None => Value::Null,
    }
}

fn placement_json(placed: &[(f64, bool)]) -> Value {
    placed
        .iter()
        .map(|(t, inside)| json!({"ms": round3(*t), "before_ready": inside}))
        .collect()
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// CPU time of the whole machine and of this bench (with its reaped children), to tell
/// how much other processes competed with the measurement.
#[derive(Debug, Clone, Copy)]
struct CpuSnapshot {
    at: Instant,
    machine_busy_s: f64,
    own_s: f64,
}

impl CpuSnapshot {
    fn take() -> Option<CpuSnapshot> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let busy: u64 = [0, 1, 2, 5, 6, 7]
            .iter()
            .filter_map(|&i| fields.get(i))
            .sum();
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if hz <= 0 {
            return None;
        }
        let usage = |who| {
            // SAFETY: getrusage fills the zeroed struct it is given.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            if unsafe { libc::getrusage(who, &mut ru) } != 0 {
                return 0.0;
            }
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            tv(ru.ru_utime) + tv(ru.ru_stime)
        };
        Some(CpuSnapshot {
            at: Instant::now(),
            machine_busy_s: busy as f64 / hz as f64,
            own_s: usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN),
        })
    }

    /// Average number of CPUs kept busy by other processes between `self` and `later`.
    fn others_since(&self, later: &CpuSnapshot) -> f64 {
        let wall = (later.at - self.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        let others = (later.machine_busy_s - self.machine_busy_s) - (later.own_s - self.own_s);
        (others / wall).max(0.0)
    }
}

struct Machine {
    nproc: String,
    cpu: String,
    kernel: String,
    date: String,
    loadavg: String,
    binary: PathBuf,
    profile: String,
    git: String,
}

impl Machine {
    fn probe(bin: &Path) -> Machine {
        let cmd = |prog: &str, args: &[&str]| -> Option<String> {
            let out = Command::new(prog)
                .args(args)
                .stderr(Stdio::null())
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let nproc = cmd("nproc", &[]).unwrap_or_else(|| {
            thread::available_parallelism().map_or("?".into(), |n| n.to_string())
        });
        let kernel = cmd("uname", &["-srm"]).unwrap_or_else(|| {
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into())
        });
        let date = cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("@{secs}")
        });
        let loadavg = fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let profile = bin
            .parent()
            .and_then(|p| p.file_name())
            .map_or("?".into(), |p| p.to_string_lossy().into_owned());
        let manifest = env!("CARGO_MANIFEST_DIR");
        let git = match cmd("git", &["-C", manifest, "rev-parse", "--short", "HEAD"]) {
            Some(rev) => {
                let dirty = cmd(
                    "git",
                    &[
                        "-C",
                        manifest,
                        "status",
                        "--porcelain",
                        "--untracked-files=no",
                    ],
                )
                .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{rev} (modified)")
                } else {
                    rev
                }
            }
            None => "unknown".into(),
        };
        Machine {
            nproc,
            cpu,
            kernel,
            date,
            loadavg,
            binary: bin.to_path_buf(),
            profile,
            git,
        }
    }

    fn print(&self) {
        println!("date:    {}", self.date);
        println!(
            "machine: {} CPUs, {}, {}",
            self.nproc, self.cpu, self.kernel
        );
        println!("load:    {} (1/5/15 min, at start)", self.loadavg);
        println!(
            "binary:  {} ({} build, commit {})",
            self.binary.display(),
            self.profile,
            self.git
        );
        if self.profile != "release" {
            println!("WARNING: not a release build; figures are not representative");
        }
    }
}

fn json_path(bin: &Path) -> PathBuf {
    // target/release/hermes-gateway → target/bench-lifecycle.json
    bin.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-lifecycle.json")
}

struct Report<'a> {
    /// CPUs kept busy by other processes during the run, on average.
    background_cpus: Option<f64>,
    machine: &'a Machine,
    starts: &'a StartsResult,
    reexec: &'a RestartResult,
    exit75: &'a RestartResult,
    findings: &'a Findings,
    observations: &'a Findings,
    kept_logs: &'a Path,
    elapsed: Duration,
}

struct Row {
    label: String,
    values: Vec<f64>,
    unit: &'static str,
    target: Option<f64>,
}

impl Report<'_> {
    fn rows(&self) -> Vec<Row> {
        let s = &self.starts.samples;
        let row = |label: &str, values: Vec<f64>, unit, target| Row {
            label: label.to_owned(),
            values,
            unit,
            target,
        };
        let mut rows = vec![
            row(
                "exec → READY=1",
                s.iter().map(|x| x.ready_ms).collect(),
                "ms",
                Some(TARGET_READY_MS),
            ),
            row(
                "exec → READY=1, existing state",
                self.starts.warm_ready_ms.clone(),
                "ms",
                None,
            ),
            row(
                "VmRSS at READY=1",
                s.iter()
                    .filter_map(|x| x.at_ready)
                    .map(|m| mib(m.rss_kib))
                    .collect(),
                "MiB",
                Some(TARGET_RSS_MIB),
            ),
            row(
                "VmRSS 200 ms after READY=1",
                s.iter()
                    .filter_map(|x| x.settled)
                    .map(|m| mib(m.rss_kib))
                    .collect(),
                "MiB",
                Some(TARGET_RSS_MIB),
            ),
            row(
                "  of which RssAnon",
                s.iter()
                    .filter_map(|x| x.settled)
                    .map(|m| mib(m.anon_kib))
                    .collect(),
                "MiB",
                None,
            ),
            row(
                "  of which RssFile",
                s.iter()
                    .filter_map(|x| x.settled)
                    .map(|m| mib(m.file_kib))
                    .collect(),
                "MiB",
                None,
            ),
            row(
                "threads at READY=1",
                s.iter()
                    .filter_map(|x| x.at_ready)
                    .map(|m| m.threads as f64)
                    .collect(),
                "",
                None,
            ),
            row(
                "SIGTERM → STOPPING=1",
                s.iter().filter_map(|x| x.stopping_ms).collect(),
                "ms",
                None,
            ),
            row(
                "SIGTERM → exit",
                s.iter().filter_map(|x| x.exit_ms).collect(),
                "ms",
                None,
            ),
        ];
        for (name, r) in [("re-exec", self.reexec), ("exit 75", self.exit75)] {
            rows.push(row(
                &format!("{name}: STOPPING → READY (gap)"),
                r.idle.iter().map(RestartSample::gap_ms).collect(),
                "ms",
                Some(TARGET_GAP_MS),
            ));
            rows.push(row(
                &format!("{name}: SIGUSR1 → READY"),
                r.idle
                    .iter()
                    .map(RestartSample::signal_to_ready_ms)
                    .collect(),
                "ms",
                None,
            ));
            if let Some(b) = &r.breakdown {
                rows.push(row(
                    "  old STOPPING → old exit",
                    b.stopping_to_exit.clone(),
                    "ms",
                    None,
                ));
                rows.push(row(
                    "  old exit → relaunch",
                    b.exit_to_spawn.clone(),
                    "ms",
                    None,
                ));
                rows.push(row(
                    "  relaunch → new READY",
                    b.spawn_to_ready.clone(),
                    "ms",
                    None,
                ));
            }
            if let Some(l) = &r.loaded {
                rows.push(row(
                    &format!("{name}: gap under load"),
                    l.samples.iter().map(RestartSample::gap_ms).collect(),
                    "ms",
                    None,
                ));
            }
        }
        rows
    }

    fn print(&self) {
        println!(
            "{:<38} {:>3} {:>8} {:>8} {:>8} {:>8}  {:<10} verdict",
            "metric", "n", "median", "p90", "min", "max", "target"
        );
        println!("{}", "-".repeat(102));
        for r in self.rows() {
            let label = if r.unit.is_empty() {
                r.label.clone()
            } else {
                format!("{} ({})", r.label, r.unit)
            };
            let target = r
                .target
                .map_or(String::new(), |t| format!("≤ {t} {}", r.unit));
            match stats(&r.values) {
                Some(s) => {
                    let verdict = r
                        .target
                        .map_or("", |t| if s.median <= t { "ok" } else { "MISSED" });
                    println!(
                        "{:<38} {:>3} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {:<10} {}",
                        label, s.n, s.median, s.p90, s.min, s.max, target, verdict
                    );
                }
                None => println!("{label:<38} {:>3} {:>8}", 0, "n/a"),
            }
        }
        println!();
        for (name, r) in [("re-exec", self.reexec), ("exit 75", self.exit75)] {
            match &r.loaded {
                Some(l) => {
                    let d = &l.load;
                    let rps = if d.seconds > 0.0 {
                        d.ok as f64 / d.seconds
                    } else {
                        0.0
                    };
                    println!(
                        "{name}: {} restarts under load ({CLIENT_CONNECTIONS} keep-alive \
                         connections, GET /health): {} ok, {} FAILED{}",
                        l.samples.len(),
                        d.ok,
                        d.failed,
                        if d.failed == 0 { "" } else { " <<<" },
                    );
                    println!(
                        "    {rps:.0} req/s, {} connections opened, {} unsent requests retried",
                        d.connections, d.retried_unsent
                    );
                    for (k, n) in &d.kinds {
                        println!("    {n:>6} × {k}");
                    }
                    let placed = d.placement(&l.samples);
                    if !placed.is_empty() {
                        let text: Vec<String> = placed
                            .iter()
                            .map(|(t, inside)| {
                                format!("+{t:.2} ms{}", if *inside { "" } else { " (after READY)" })
                            })
                            .collect();
                        println!(
                            "    failures after the latest STOPPING=1: {}",
                            text.join(", ")
                        );
                    }
                }
                None => println!("{name}: no loaded run"),
            }
            if let Some(e) = &r.final_exit {
                println!("{name}: final SIGTERM → {e}");
            }
        }
        println!();
        println!(
            "notify datagrams, first start:        {}",
            self.starts.first_sequence.join("  |  ")
        );
        println!(
            "notify datagrams, first re-exec:      {}",
            self.reexec.first_sequence.join("  |  ")
        );
        println!(
            "notify datagrams, first exit-75 cycle: {}",
            self.exit75.first_sequence.join("  |  ")
        );
        println!();
        if self.findings.0.is_empty() {
            println!("findings: none");
        } else {
            println!("findings ({}):", self.findings.0.len());
            for (kind, (n, example)) in &self.findings.0 {
                println!("  - {kind} (×{n}): {}", example.replace('\n', "\n      "));
            }
        }
        if !self.observations.0.is_empty() {
            println!("observations (expected behaviour, for information):");
            for (kind, (n, example)) in &self.observations.0 {
                println!("  - {kind} (×{n}): {example}");
            }
        }
        if let Some(b) = self.background_cpus {
            println!(
                "\nbackground: other processes kept {b:.2} of {} CPUs busy on average{}",
                self.machine.nproc,
                if b > 0.25 {
                    " (noisy: figures inflated)"
                } else {
                    ""
                }
            );
        }
        println!("gateway logs kept in {}", self.kept_logs.display());
        println!("elapsed: {:.1} s", self.elapsed.as_secs_f64());
    }

    fn json(&self) -> Value {
        let m = self.machine;
        let rows: serde_json::Map<String, Value> = self
            .rows()
            .into_iter()
            .map(|r| {
                let mut v = stats_json(&r.values);
                if let Value::Object(o) = &mut v {
                    o.insert("unit".into(), json!(r.unit));
                    if let Some(t) = r.target {
                        o.insert("target_median_max".into(), json!(t));
                        o.insert(
                            "target_met".into(),
                            json!(stats(&r.values).is_some_and(|s| s.median <= t)),
                        );
                    }
                }
                (r.label.trim().to_owned(), v)
            })
            .collect();
        let load = |r: &RestartResult| {
            r.loaded.as_ref().map(|l| {
                json!({
                    "restarts": l.samples.len(),
                    "connections": CLIENT_CONNECTIONS,
                    "ok": l.load.ok,
                    "failed": l.load.failed,
                    "failure_kinds": l.load.kinds,
                    "connections_opened": l.load.connections,
                    "unsent_requests_retried": l.load.retried_unsent,
                    "failures_ms_after_stopping": placement_json(&l.load.placement(&l.samples)),
                    "seconds": round3(l.load.seconds),
                })
            })
        };
        json!({
            "bench": "lifecycle",
            "date": m.date,
            "machine": {
                "nproc": m.nproc,
                "cpu": m.cpu,
                "kernel": m.kernel,
                "loadavg_at_start": m.loadavg,
            },
            "binary": m.binary.display().to_string(),
            "profile": m.profile,
            "git": m.git,
            "targets": {
                "exec_to_ready_ms_median": TARGET_READY_MS,
                "rss_mib_median": TARGET_RSS_MIB,
                "restart_gap_ms_median": TARGET_GAP_MS,
            },
            "metrics": rows,
            "load": {
                "re-exec": load(self.reexec),
                "exit 75": load(self.exit75),
            },
            "final_exit": {
                "re-exec": self.reexec.final_exit,
                "exit 75": self.exit75.final_exit,
            },
            "first_sequences": {
                "start": self.starts.first_sequence,
                "re-exec": self.reexec.first_sequence,
                "exit 75": self.exit75.first_sequence,
            },
            "findings": self.findings.json(),
            "observations": self.observations.json(),
            "background_cpus_busy": self.background_cpus.map(round3),
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
        })
    }
}
