//! Shared test helpers: start the real binary, receive its sd_notify datagrams, talk raw
//! HTTP/1.1 to it. Each test binary uses a subset.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");

/// A free TCP port on loopback (bound, then released for the test to use).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// Receives the datagrams a gateway sends to `$NOTIFY_SOCKET`.
pub struct NotifySink {
    pub path: PathBuf,
    sock: UnixDatagram,
}

impl NotifySink {
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("notify.sock");
        let sock = UnixDatagram::bind(&path).expect("bind notify socket");
        NotifySink { path, sock }
    }

    /// The next datagram, or `None` after `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<String> {
        self.sock.set_read_timeout(Some(timeout)).ok()?;
        let mut buf = vec![0u8; 64 * 1024];
        let n = self.sock.recv(&mut buf).ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Skips datagrams until one contains `line` (a whole line such as `READY=1`);
    /// returns it, or panics with everything seen.
    pub fn wait_for(&self, line: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(m) if m.lines().any(|l| l == line) => return m,
                Some(m) => seen.push(m),
                None => break,
            }
        }
        panic!("no datagram with `{line}` within {timeout:?}; saw {seen:?}");
    }

    /// The value of the first `PREFIX...` line to arrive within `timeout`.
    pub fn wait_for_prefix(&self, prefix: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.next(left) {
                Some(m) => {
                    if let Some(v) = m.lines().find_map(|l| l.strip_prefix(prefix)) {
                        return v.to_owned();
                    }
                    seen.push(m);
                }
                None => break,
            }
        }
        panic!("no `{prefix}` line within {timeout:?}; saw {seen:?}");
    }

    /// Every datagram until nothing arrives for `quiet`.
    pub fn drain(&self, quiet: Duration) -> Vec<String> {
        let mut v = Vec::new();
        while let Some(m) = self.next(quiet) {
            v.push(m);
        }
        v
    }
}

/// A temp folder with a config file for one gateway.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub control: PathBuf,
    pub state: PathBuf,
}

impl Setup {
    /// `listen_api` is the `[listen] api` value; `extra` is appended verbatim.
    pub fn new(listen_api: &str, extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let control = dir.path().join("run/control.sock");
        let state = dir.path().join("state");
        let config = dir.path().join("gateway.toml");
        let text = format!(
            "[listen]\napi = \"{listen_api}\"\nwebhook = \"off\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n{extra}",
            control.display(),
            state.display()
        );
        std::fs::write(&config, text).expect("write config");
        Setup {
            dir,
            config,
            control,
            state,
        }
    }

    pub fn write_config(&self, text: &str) {
        std::fs::write(&self.config, text).expect("rewrite config");
    }

    pub fn notify(&self) -> NotifySink {
        NotifySink::new(self.dir.path())
    }

    /// `hermes-gateway run --config FILE ARGS` with `envs`, stderr captured.
    pub fn spawn(&self, args: &[&str], envs: &[(&str, &str)]) -> Gateway {
        let mut cmd = Command::new(BIN);
        cmd.arg("run").arg("--config").arg(&self.config).args(args);
        cmd.env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .env_remove("INVOCATION_ID");
        cmd.env("RUST_LOG", "info");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Gateway::start(cmd)
    }

    /// The gateway under `systemd-socket-activate -l 127.0.0.1:PORT --fdname=NAME`, which
    /// passes the socket with LISTEN_* once the first connection arrives.
    pub fn spawn_activated(&self, port: u16, fdname: &str, envs: &[(&str, &str)]) -> Gateway {
        let mut cmd = Command::new("systemd-socket-activate");
        cmd.arg("-l").arg(format!("127.0.0.1:{port}"));
        if !fdname.is_empty() {
            cmd.arg(format!("--fdname={fdname}"));
        }
        cmd.arg("-E").arg("RUST_LOG=info");
        for (k, v) in envs {
            cmd.arg("-E").arg(format!("{k}={v}"));
        }
        cmd.arg(BIN).arg("run").arg("--config").arg(&self.config);
        Gateway::start(cmd)
    }
}

pub struct Gateway {
    pub child: Child,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    fn start(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn the gateway");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let pipe = child.stderr.take().expect("stderr is piped");
        let sink = stderr.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Ok(mut s) = sink.lock() {
                    s.push_str(&line);
                    s.push('\n');
                }
            }
        });
        Gateway {
            child,
            stderr,
            reader: Some(reader),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).expect("send signal");
    }

    /// Waits for the process to exit; panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return s;
            }
            if Instant::now() > end {
                let _ = self.child.kill();
                panic!(
                    "gateway did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the gateway's stderr contains `needle` (it is read by another thread, so
    /// a line logged before a notification may arrive after it); panics after `timeout`.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let s = self.stderr();
            if s.contains(needle) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "stderr never contained {needle:?}:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One HTTP/1.1 response, read off a raw connection.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The status line and headers of a response.
fn read_head(s: &mut BufReader<TcpStream>) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    if s.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "closed before a response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        s.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    Ok((status, headers))
}

/// Reads one response (Content-Length bodies only, which is all the gateway sends here).
pub fn read_response(s: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let (status, headers) = read_head(s)?;
    let len: usize = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// A keep-alive connection to the gateway.
pub struct Conn {
    pub r: BufReader<TcpStream>,
}

impl Conn {
    pub fn open(addr: SocketAddr) -> std::io::Result<Self> {
        Self::open_with_timeout(addr, Duration::from_secs(10))
    }

    /// [`Conn::open`] with another read timeout (a slow agent's first turn).
    pub fn open_with_timeout(addr: SocketAddr, read: Duration) -> std::io::Result<Self> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(read))?;
        Ok(Conn {
            r: BufReader::new(s),
        })
    }

    pub fn send(&mut self, raw: &str) -> std::io::Result<()> {
        self.r.get_mut().write_all(raw.as_bytes())
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<Response> {
        self.send(&format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n"))?;
        read_response(&mut self.r)
    }
}

/// `GET path` on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> std::io::Result<Response> {
    Conn::open(addr)?.get(path)
}

/// Polls `GET /health` until it answers 200.
pub fn wait_healthy(addr: SocketAddr, timeout: Duration) -> Response {
    let end = Instant::now() + timeout;
    loop {
        match get(addr, "/health") {
            Ok(r) if r.status == 200 => return r,
            other => {
                if Instant::now() > end {
                    panic!("{addr} not healthy within {timeout:?}: {other:?}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// The JSON `hermes-gateway status --json --socket PATH` prints.
pub fn status_json(control: &Path) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(control)
        .output()
        .expect("run status");
    assert!(
        out.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("status prints JSON")
}

/// Reads one response whatever its framing: `Content-Length`, chunked (SSE streams), or
/// until the connection closes.
pub fn read_any_response(s: &mut BufReader<TcpStream>) -> std::io::Result<Response> {
    let (status, headers) = read_head(s)?;
    let find = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let mut body = Vec::new();
    if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
        loop {
            let mut size = String::new();
            if s.read_line(&mut size)? == 0 {
                break; // closed mid-stream: return what arrived
            }
            let n = usize::from_str_radix(size.trim(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
            if n == 0 {
                let mut end = String::new();
                s.read_line(&mut end)?;
                break;
            }
            let mut chunk = vec![0u8; n + 2];
            s.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        s.read_exact(&mut body)?;
    } else {
        s.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

impl Response {
    /// The body as JSON (panics with the body if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    /// The `data:` payloads of an SSE body, with their `event:` names.
    pub fn sse(&self) -> Vec<(Option<String>, String)> {
        let mut out = Vec::new();
        for block in self.body.split("\n\n") {
            let mut event = None;
            let mut data = Vec::new();
            for l in block.lines() {
                if let Some(e) = l.strip_prefix("event: ") {
                    event = Some(e.to_owned());
                } else if let Some(d) = l.strip_prefix("data: ") {
                    data.push(d);
                }
            }
            if !data.is_empty() {
                out.push((event, data.join("\n")));
            }
        }
        out
    }
}

impl Conn {
    /// Sends a request with `body` (JSON when non-empty) and reads the whole response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> std::io::Result<Response> {
        let mut raw = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n",
            body.len()
        );
        if !body.is_empty() {
            raw.push_str("Content-Type: application/json\r\n");
        }
        for (k, v) in headers {
            raw.push_str(&format!("{k}: {v}\r\n"));
        }
        raw.push_str("\r\n");
        raw.push_str(body);
        self.send(&raw)?;
        read_any_response(&mut self.r)
    }
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Response> {
    Conn::open(addr)?.request(method, path, headers, body)
}

/// The address a gateway bound for `listener` (`[listen] api = "127.0.0.1:0"`), from status.
pub fn listener_addr(control: &Path, listener: &str) -> SocketAddr {
    let st = status_json(control);
    st["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == listener))
        .and_then(|l| l["address"].as_str())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no {listener} listener in status: {st}"))
}

/// Starts a gateway on a free API port with `extra` config, waits for `READY=1` and
/// returns it with the API address.
pub fn start_api(setup: &Setup) -> (Gateway, SocketAddr, NotifySink) {
    // A previous start in the same folder left its socket file.
    let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
    let notify = setup.notify();
    let gw = setup.spawn(
        &[],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let addr = listener_addr(&setup.control, "api");
    (gw, addr, notify)
}

/// Starts `cmd` (stdin null, stdout null, stderr captured) as a [`Gateway`].
pub fn spawn_command(cmd: Command) -> Gateway {
    Gateway::start(cmd)
}

/// Starts the gateway with `listener` as socket-activated fd 3 named `fdname`, the way a
/// service manager would (LISTEN_PID is the gateway's own pid: set by the shell it execs).
/// The caller keeps `listener`, so it can relaunch the gateway on the same socket.
pub fn spawn_with_socket(
    setup: &Setup,
    listener: &TcpListener,
    fdname: &str,
    notify: &NotifySink,
    rust_log: &str,
) -> Gateway {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
        .arg(BIN)
        .arg("run")
        .arg("--config")
        .arg(&setup.config)
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", fdname)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("RUST_LOG", rust_log)
        .env_remove("INVOCATION_ID");
    // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl) are made.
    unsafe {
        cmd.pre_exec(move || {
            if fd == 3 {
                // Already fd 3: only clear close-on-exec.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(fd, 3) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    spawn_command(cmd)
}

/// `GET path` over the control socket, with extra header lines (each ending `\r\n`):
/// the response's head and body.
pub fn control_get(control: &Path, path: &str, headers: &str) -> (String, String) {
    let mut s = std::os::unix::net::UnixStream::connect(control).expect("control socket");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{headers}Connection: close\r\n\r\n"
    )
    .expect("write");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read");
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response");
    (head.to_owned(), body.to_owned())
}
