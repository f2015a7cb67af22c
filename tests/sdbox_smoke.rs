//! Smoke test of the test harness itself: boots a real systemd in a box, socket-activates a
//! `Type=notify` HTTP/1.1 responder, drives load at it from inside the box's netns, reads the
//! journal, and checks that teardown leaves nothing behind. Also checks that the load client
//! counts the failures it is meant to catch.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use support::load::{FailureKind, LoadConfig};
use support::sdbox::{self, SystemdBox};

const PORT: u16 = 18080;

const SOCKET_UNIT: &str = "\
[Unit]
Description=sdbox smoke socket

[Socket]
ListenStream=127.0.0.1:18080
FileDescriptorName=http
";

const SERVICE_UNIT: &str = "\
[Unit]
Description=sdbox smoke HTTP responder
Requires=smoke.socket
After=smoke.socket

[Service]
Type=notify
ExecStart=/usr/bin/python3 /usr/local/lib/smoke/httpd.py
";

/// Socket-activated Type=notify HTTP/1.1 keep-alive responder.
///   /            200 "ok"; every 20th response on a connection says `Connection: close`
///   /machine-id  200 with the box's machine id
///   /close-idle  200 without `Connection: close`, then closes the connection anyway
///   /status/503  503
const HTTPD: &str = r#"#!/usr/bin/python3
import os, socket, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

def notify(msg):
    a = os.environ.get("NOTIFY_SOCKET")
    if not a:
        return
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect("\0" + a[1:] if a.startswith("@") else a)
        s.sendall(msg.encode())

def log(m):
    print(m, flush=True)

assert os.environ.get("LISTEN_PID") == str(os.getpid()), "not socket-activated"
MACHINE_ID = open("/etc/machine-id").read().strip()

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def setup(self):
        super().setup()
        self.served = 0
        log(f"smoke connection from {self.client_address}")

    def do_GET(self):
        self.served += 1
        status, body, close = 200, b"ok\n", False
        if self.path == "/machine-id":
            body = (MACHINE_ID + "\n").encode()
        elif self.path == "/status/503":
            status, body = 503, b"unavailable\n"
        elif self.served % 20 == 0:
            close = True
        self.send_response(status)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        if close:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        if self.path == "/close-idle":
            self.close_connection = True   # close WITHOUT having said so

    def log_message(self, *args):
        pass

class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = socket.socket(fileno=3)

srv = Server()
log(f"smoke httpd ready on {srv.socket.getsockname()} pid={os.getpid()} "
    f"LISTEN_FDNAMES={os.environ.get('LISTEN_FDNAMES')}")
notify("READY=1\nSTATUS=serving")
srv.serve_forever()
"#;

fn smoke_box() -> sdbox::Builder {
    SystemdBox::builder()
        .unit("smoke.socket", SOCKET_UNIT)
        .unit("smoke.service", SERVICE_UNIT)
        .file("/usr/local/lib/smoke/httpd.py", HTTPD, 0o755)
}

fn addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], PORT))
}

/// Blocking one-shot GET (runs on whatever netns the calling thread is in).
fn http_get(path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    Ok(resp)
}

fn sha256(bytes: &[u8]) -> String {
    let mut child = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run sha256sum on the host");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(bytes)
        .expect("feed sha256sum");
    let out = child.wait_with_output().expect("sha256sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn sdbox_smoke() {
    let Some(()) = sdbox::require_or_skip("sdbox_smoke") else {
        return;
    };
    let gateway = env!("CARGO_BIN_EXE_hermes-gateway");
    let sb = smoke_box()
        .host_file("/usr/local/bin/hermes-gateway", gateway, 0o755)
        .boot()
        .expect("boot the systemd box");
    eprintln!(
        "booted {} (host pid {}) in {:.2?}",
        sb.name(),
        sb.pid(),
        sb.boot_duration()
    );
    assert_eq!(
        sb.exec_ok(&["systemctl", "is-system-running"]).trim(),
        "running"
    );

    // the binary arrived intact and executable, policy-rc.d is gone (package tests)
    let inside = sb.exec_ok(&["sha256sum", "/usr/local/bin/hermes-gateway"]);
    let host = sha256(&std::fs::read(gateway).expect("read the gateway binary"));
    assert_eq!(inside.split_whitespace().next(), Some(host.as_str()));
    sb.exec_ok(&["test", "-x", "/usr/local/bin/hermes-gateway"]);
    assert!(!sb.sh("test -e /usr/sbin/policy-rc.d").status.success());
    // the journal is volatile and unlimited
    let jconf = sb.exec_ok(&["cat", "/etc/systemd/journald.conf.d/sdbox.conf"]);
    assert!(jconf.contains("RateLimitBurst=0") && jconf.contains("Storage=volatile"));

    // socket activation: nothing runs until the first connection
    sb.systemctl_ok(&["start", "smoke.socket"]);
    assert_eq!(sb.show("smoke.socket", "ActiveState"), "active");
    assert_eq!(sb.show("smoke.service", "ActiveState"), "inactive");

    // a plain std TcpStream from a thread in the box's netns reaches the listener inside
    let machine_id = String::from_utf8(sb.read_file("/etc/machine-id")).expect("utf-8");
    let resp = sb.run_in_netns(|| http_get("/machine-id").expect("GET /machine-id in netns"));
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert!(resp.contains(machine_id.trim()), "{resp}");
    sb.wait_prop(
        "smoke.service",
        "ActiveState",
        "active",
        Duration::from_secs(5),
    );
    assert_eq!(sb.show("smoke.service", "Type"), "notify");
    let main_pid = sb.show("smoke.service", "MainPID");

    // runtime file + daemon-reload
    sb.write_file(
        "/run/systemd/system/smoke.service.d/50-env.conf",
        "[Service]\nEnvironment=SMOKE_GREETING=hello\n",
        0o644,
    );
    sb.daemon_reload();
    assert_eq!(
        sb.show("smoke.service", "Environment"),
        "SMOKE_GREETING=hello"
    );
    assert_eq!(
        sb.show("smoke.service", "MainPID"),
        main_pid,
        "reload restarted it"
    );

    // keep-alive load, 2 s, from inside the netns: every request must succeed, and the
    // server's periodic `Connection: close` must be honoured (reconnect, no failure)
    let mut cfg = LoadConfig::new(addr(), "/", 8);
    cfg.timeout = Duration::from_secs(5);
    let load = sb.start_load(cfg);
    assert!(
        load.wait_for_ok(1, Duration::from_secs(10)),
        "no request succeeded"
    );
    std::thread::sleep(Duration::from_secs(2));
    let report = load.stop();
    eprintln!("{report}");
    report.assert_clean();
    assert!(
        report.closes_honoured > 0,
        "server never sent Connection: close?\n{report}"
    );
    assert!(report.connections > 8, "no reconnects?\n{report}");

    // the load client catches what it must catch
    // 1. server closes keep-alive connections without announcing it
    let mut cfg = LoadConfig::new(addr(), "/close-idle", 4);
    cfg.max_duration = Duration::from_millis(500);
    let report = sb.start_load(cfg).join();
    eprintln!("/close-idle: {report}");
    assert!(report.ok > 0, "{report}");
    let unannounced = report.failures(FailureKind::IdleClosed)
        + report.failures(FailureKind::Eof)
        + report.failures(FailureKind::Reset);
    assert!(unannounced > 0, "unannounced closes not counted:\n{report}");
    assert_eq!(unannounced, report.failed, "{report}");
    // 2. non-2xx
    let mut cfg = LoadConfig::new(addr(), "/status/503", 2);
    cfg.max_duration = Duration::from_millis(300);
    let report = sb.start_load(cfg).join();
    assert!(report.failures(FailureKind::Status(503)) > 0, "{report}");
    assert_eq!(report.ok, 0, "{report}");
    // 3. nothing listening
    let mut cfg = LoadConfig::new(SocketAddr::from(([127, 0, 0, 1], PORT + 1)), "/", 2);
    cfg.max_duration = Duration::from_millis(200);
    let report = sb.start_load(cfg).join();
    assert!(report.failures(FailureKind::ConnectRefused) > 0, "{report}");
    assert_eq!(
        report.failed,
        report.failures(FailureKind::ConnectRefused),
        "{report}"
    );

    // the service's own log lines are in the journal, as JSON
    let entry = sb.wait_journal("smoke.service", "smoke httpd ready", Duration::from_secs(5));
    assert_eq!(entry["_SYSTEMD_UNIT"], "smoke.service");
    assert_eq!(entry["_PID"].as_str(), Some(main_pid.as_str()));
    let journal = sb.journal_json("smoke.service");
    assert!(
        journal.iter().any(|e| e["MESSAGE"]
            .as_str()
            .is_some_and(|m| m.starts_with("smoke connection from"))),
        "no per-connection lines in the journal"
    );

    // teardown leaves nothing behind
    let (name, pid) = (sb.name().to_string(), sb.pid());
    let (cgroup, base) = (sb.cgroup_dir().to_path_buf(), sb.base_dir().to_path_buf());
    assert!(cgroup.is_dir());
    let t = Instant::now();
    drop(sb);
    eprintln!("teardown took {:.2?}", t.elapsed());
    assert_nothing_left(&name, pid, &cgroup, &base);
}

/// Two boxes at once: separate network namespaces (same port in both), separate cgroups.
#[test]
fn sdbox_two_boxes_in_parallel() {
    let Some(()) = sdbox::require_or_skip("sdbox_two_boxes_in_parallel") else {
        return;
    };
    let t = Instant::now();
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(|| smoke_box().boot_wants("smoke.socket").boot());
        let b = s.spawn(|| smoke_box().boot_wants("smoke.socket").boot());
        (
            a.join().expect("boot thread a").expect("boot box a"),
            b.join().expect("boot thread b").expect("boot box b"),
        )
    });
    eprintln!("two boxes booted in {:.2?}", t.elapsed());
    assert_ne!(a.cgroup_dir(), b.cgroup_dir());
    for sb in [&a, &b] {
        assert_eq!(
            sb.show("smoke.socket", "ActiveState"),
            "active",
            "boot_wants"
        );
        let id = String::from_utf8(sb.read_file("/etc/machine-id")).expect("utf-8");
        let resp = sb.run_in_netns(|| http_get("/machine-id").expect("GET in netns"));
        assert!(resp.contains(id.trim()), "reached the wrong box: {resp}");
    }
    let (na, pa, ca, ba) = leftovers(&a);
    let (nb, pb, cb, bb) = leftovers(&b);
    let ta = a.shutdown().expect("clean shutdown of a");
    let tb = b.shutdown().expect("clean shutdown of b");
    eprintln!("shutdown took {ta:.2?} and {tb:.2?}");
    assert_nothing_left(&na, pa, &ca, &ba);
    assert_nothing_left(&nb, pb, &cb, &bb);
}

/// A boot that ends `degraded` is an error that names the failed unit; nothing is left behind.
#[test]
fn sdbox_degraded_boot_is_an_error() {
    let Some(()) = sdbox::require_or_skip("sdbox_degraded_boot_is_an_error") else {
        return;
    };
    let e = SystemdBox::builder()
        .unit(
            "broken.service",
            "[Service]\nType=oneshot\nExecStart=/bin/sh -c 'echo broken on purpose; exit 3'\n",
        )
        .boot_wants("broken.service")
        .boot()
        .expect_err("a degraded boot must fail");
    let msg = e.to_string();
    assert!(msg.contains("degraded"), "{msg}");
    assert!(
        msg.contains("broken.service"),
        "systemctl --failed output missing: {msg}"
    );
    assert!(
        msg.contains("broken on purpose"),
        "journal tail missing: {msg}"
    );
    let name = e.box_name.expect("the box got a name");
    for cg2 in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let cg = Path::new(cg2).join(&name);
        assert!(!cg.exists(), "cgroup {} left behind", cg.display());
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    assert!(!mountinfo.contains(&name), "mounts left behind");
    let tmp: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("read temp dir")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("{name}."))
        })
        .collect();
    assert!(tmp.is_empty(), "temp dir left behind: {tmp:?}");
}

fn leftovers(sb: &SystemdBox) -> (String, i32, std::path::PathBuf, std::path::PathBuf) {
    (
        sb.name().to_string(),
        sb.pid(),
        sb.cgroup_dir().to_path_buf(),
        sb.base_dir().to_path_buf(),
    )
}

fn assert_nothing_left(name: &str, pid: i32, cgroup: &Path, base: &Path) {
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "box pid {pid} still exists"
    );
    assert!(!cgroup.exists(), "cgroup {} still exists", cgroup.display());
    assert!(!base.exists(), "temp dir {} still exists", base.display());
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    let base_s = base.to_string_lossy();
    let stale: Vec<&str> = mountinfo
        .lines()
        .filter(|l| l.contains(name) || l.contains(base_s.as_ref()))
        .collect();
    assert!(stale.is_empty(), "mounts left behind: {stale:#?}");
}
