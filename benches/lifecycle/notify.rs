//! The notification socket: a datagram socket like the one systemd gives a service
//! (`NOTIFY_SOCKET`), read by a thread that stamps each datagram with its time of receipt
//! and its sender's PID (`SO_PASSCRED`), so that `READY=1` and `STOPPING=1` are timed as
//! they arrive and told apart between the old image and the new one.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg, setsockopt, sockopt};

/// One datagram received on `NOTIFY_SOCKET`, timestamped on receipt.
#[derive(Debug, Clone)]
pub struct Note {
    pub at: Instant,
    /// The sender, from `SCM_CREDENTIALS` (the socket has `SO_PASSCRED`).
    pub pid: Option<i32>,
    pub text: String,
    /// Descriptors that came with it (`FDSTORE=1`); closed on receipt.
    pub fds: usize,
}

impl Note {
    pub fn has(&self, line: &str) -> bool {
        self.text.lines().any(|l| l == line)
    }

    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.text.lines().any(|l| l.starts_with(prefix))
    }

    /// Only `STATUS=` lines: the periodic status refresh, harmless anywhere.
    pub fn is_status_only(&self) -> bool {
        self.text.lines().all(|l| l.starts_with("STATUS="))
    }

    pub fn one_line(&self) -> String {
        let mut s = self.text.trim_end().replace('\n', "\\n");
        if self.fds > 0 {
            s.push_str(&format!(" (+{} fds)", self.fds));
        }
        s
    }

    pub fn pid_text(&self) -> String {
        self.pid.map_or("?".to_owned(), |p| p.to_string())
    }
}

/// Which sender a wait accepts.
#[derive(Debug, Clone, Copy)]
pub enum Source {
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
pub struct NotifySocket {
    pub path: PathBuf,
    pub rx: mpsc::Receiver<Note>,
    pub stop: Arc<AtomicBool>,
    pub thread: Option<JoinHandle<()>>,
    /// Datagrams holding only `STATUS=` lines (the gateway's status refresher).
    pub status_only: Arc<AtomicU64>,
}

impl NotifySocket {
    pub fn bind(path: &Path) -> Result<Self, String> {
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

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn next(&self, timeout: Duration) -> Option<Note> {
        self.rx.recv_timeout(timeout).ok()
    }

    pub fn drain(&self) -> Vec<Note> {
        self.rx.try_iter().collect()
    }

    /// Waits for a datagram holding the line `key` from an accepted sender. Returns it with
    /// the datagrams seen before it. `check` is called between receipts and aborts the wait
    /// with its message (e.g. the process exited).
    pub fn wait_for(
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
