//! The lifecycle against the real binary: socket activation through Debian's
//! `systemd-socket-activate`, the exact sd_notify sequence for start, reload, stop and
//! restart, and the exit statuses 0, 75, 78 and 1.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(10);

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn require_socket_activate() -> bool {
    if std::process::Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_ok()
    {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must have systemd-socket-activate (package systemd)"
    );
    eprintln!("SKIP: systemd-socket-activate is not installed (Debian package `systemd`)");
    false
}

/// Starts an activated gateway and returns it once the first request proved it serves.
fn activated(setup: &Setup, port: u16, notify: &NotifySink, extra_env: &[(&str, &str)]) -> Gateway {
    let n = notify.path.to_str().expect("utf-8 path").to_owned();
    let mut envs = vec![("NOTIFY_SOCKET", n.as_str())];
    envs.extend_from_slice(extra_env);
    let gw = setup.spawn_activated(port, "api", &envs);
    // systemd-socket-activate execs the gateway on the first connection.
    wait_healthy(addr(port), T);
    gw
}

#[test]
fn start_reload_stop_sequence_and_exit_0() {
    if !require_socket_activate() {
        return;
    }
    let port = free_port();
    let setup = Setup::new("127.0.0.1:1", ""); // the configured address is not used: activation wins
    let notify = setup.notify();
    let mut gw = activated(&setup, port, &notify, &[]);

    let ready = notify.wait_for("READY=1", T);
    let status = ready
        .lines()
        .find(|l| l.starts_with("STATUS="))
        .expect("READY carries STATUS");
    assert!(
        status.starts_with("STATUS=serving: 2 listeners"),
        "{status}"
    );

    // The listener came from systemd; the control socket was bound.
    let st = status_json(&setup.control);
    assert_eq!(st["state"], "serving");
    assert_eq!(st["supervisor"], "systemd");
    let api = st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "api")
        .unwrap()
        .clone();
    assert_eq!(api["origin"], "systemd");
    assert_eq!(api["address"], format!("127.0.0.1:{port}"));

    // Reload: RELOADING=1 with MONOTONIC_USEC, then READY=1.
    notify.drain(Duration::from_millis(50));
    gw.signal(Signal::SIGHUP);
    let reloading = notify.wait_for("RELOADING=1", T);
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING")
        .parse()
        .expect("a number");
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    let now_usec = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
    assert!(
        usec <= now_usec && now_usec - usec < 5_000_000,
        "MONOTONIC_USEC={usec} vs now {now_usec}"
    );
    let after = notify.next(T).expect("READY after reload");
    assert!(after.lines().any(|l| l == "READY=1"), "{after}");
    // READY=1 came after the new configuration was applied.
    assert_eq!(status_json(&setup.control)["config_generation"], 2);
    wait_healthy(addr(port), T);

    // Stop: STOPPING=1, exit 0.
    gw.signal(Signal::SIGTERM);
    let stopping = notify.wait_for("STOPPING=1", T);
    assert!(stopping.contains("STATUS=draining for stop"), "{stopping}");
    let s = gw.wait(T);
    assert_eq!(s.code(), Some(0), "stderr:\n{}", gw.stderr());
}

#[test]
fn sigint_is_a_graceful_stop_too() {
    let setup = Setup::new("127.0.0.1:0", "");
    let notify = setup.notify();
    let mut gw = setup.spawn(&[], &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.wait_for("READY=1", T);
    gw.signal(Signal::SIGINT);
    notify.wait_for("STOPPING=1", T);
    assert_eq!(gw.wait(T).code(), Some(0));
}

#[test]
fn usr1_under_a_manager_drains_and_exits_75() {
    if !require_socket_activate() {
        return;
    }
    let port = free_port();
    let setup = Setup::new("127.0.0.1:1", "");
    let notify = setup.notify();
    let mut gw = activated(&setup, port, &notify, &[]);
    notify.wait_for("READY=1", T);
    gw.signal(Signal::SIGUSR1);
    let stopping = notify.wait_for("STOPPING=1", T);
    assert!(
        stopping.contains("STATUS=draining for restart"),
        "{stopping}"
    );
    assert_eq!(gw.wait(T).code(), Some(75), "stderr:\n{}", gw.stderr());
}

#[test]
fn bad_config_at_start_exits_78_with_one_line() {
    let setup = Setup::new("127.0.0.1:0", "[gateway]\ndrain_timout = \"3s\"\n");
    let mut gw = setup.spawn(&[], &[]);
    let s = gw.wait(T);
    assert_eq!(s.code(), Some(78));
    let err = gw.stderr();
    assert_eq!(err.trim().lines().count(), 1, "one line on stderr: {err}");
    assert!(
        err.contains("gateway.toml") && err.contains("drain_timout"),
        "{err}"
    );
}

#[test]
fn check_config_exits_0_or_78() {
    let good = Setup::new("127.0.0.1:0", "");
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&good.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let bad = Setup::new("nowhere", "");
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .arg("--config")
        .arg(&bad.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("listen.api") && err.contains("host:port"),
        "{err}"
    );
}

#[test]
fn address_in_use_is_fatal_exit_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let setup = Setup::new(&taken.local_addr().unwrap().to_string(), "");
    let mut gw = setup.spawn(&[], &[]);
    assert_eq!(gw.wait(T).code(), Some(1));
    assert!(gw.stderr().contains("cannot bind"), "{}", gw.stderr());
}

#[test]
fn a_second_gateway_on_the_same_state_folder_exits_1_naming_the_holder() {
    let setup = Setup::new("127.0.0.1:0", "");
    let notify = setup.notify();
    let first = setup.spawn(&[], &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.wait_for("READY=1", T);
    // Same state folder, other sockets.
    let other = Setup::new("127.0.0.1:0", ""); // fresh control path
    let text = std::fs::read_to_string(&other.config).unwrap().replace(
        &other.state.display().to_string(),
        &setup.state.display().to_string(),
    );
    other.write_config(&text);
    let mut second = other.spawn(&[], &[]);
    assert_eq!(second.wait(T).code(), Some(1));
    let err = second.stderr();
    assert!(err.contains(&format!("PID {}", first.pid())), "{err}");
}

#[test]
fn bad_config_on_reload_keeps_the_old_one_and_says_so() {
    let setup = Setup::new("127.0.0.1:0", "");
    let notify = setup.notify();
    let mut gw = setup.spawn(&[], &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.wait_for("READY=1", T);
    let api = api_addr(&setup);
    setup.write_config("[listen]\napi = 12\n");
    gw.signal(Signal::SIGHUP);
    notify.wait_for("RELOADING=1", T);
    let ready = notify.wait_for("READY=1", T);
    assert!(
        ready.contains("reload failed") && ready.contains("listen.api"),
        "{ready}"
    );
    assert_eq!(get(api, "/health").unwrap().status, 200);
    let st = status_json(&setup.control);
    assert_eq!(st["last_reload"]["ok"], false);
    gw.wait_stderr("reload failed", T);
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
}

#[test]
fn changed_listener_address_on_reload_is_a_warning() {
    let setup = Setup::new("127.0.0.1:0", "");
    let notify = setup.notify();
    let mut gw = setup.spawn(&[], &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.wait_for("READY=1", T);
    let api = api_addr(&setup);
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("127.0.0.1:0", "127.0.0.1:1");
    setup.write_config(&text);
    gw.signal(Signal::SIGHUP);
    let ready = notify.wait_for("READY=1", T);
    assert!(!ready.contains("reload failed"), "{ready}");
    assert_eq!(
        get(api, "/health").unwrap().status,
        200,
        "still serving the old address"
    );
    gw.wait_stderr("takes a restart", T);
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
}

fn api_addr(setup: &Setup) -> SocketAddr {
    let st = status_json(&setup.control);
    st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "api")
        .and_then(|l| l["address"].as_str())
        .expect("api listener")
        .parse()
        .expect("a socket address")
}

#[test]
fn unsupervised_usr1_reexecs_in_place_without_refusing() {
    let setup = Setup::new("127.0.0.1:0", "");
    let notify = setup.notify();
    let mut gw = setup.spawn(
        &["--supervisor", "none"],
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    notify.wait_for("READY=1", T);
    let api = api_addr(&setup);
    let pid = gw.pid();
    for round in 0..3 {
        gw.signal(Signal::SIGUSR1);
        notify.wait_for("STOPPING=1", T);
        // During the gap, connections queue in the backlog and are answered by the new image.
        let r = get(api, "/health").unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(r.status, 200);
        notify.wait_for("READY=1", T);
    }
    let st = status_json(&setup.control);
    assert_eq!(st["pid"], pid, "same PID after re-exec");
    assert_eq!(
        st["supervisor"], "none",
        "a re-executed gateway stays unsupervised"
    );
    for l in st["listeners"].as_array().unwrap() {
        assert_eq!(l["origin"], "re-exec", "{l}");
    }
    assert!(
        gw.child.try_wait().unwrap().is_none(),
        "still the same process"
    );
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
}

/// SIGTERM during a restart's drain: the stop wins. Unsupervised, the gateway must not
/// re-execute (it would come back although the operator stopped it); under a manager it
/// exits 0, not 75. The drain itself goes on: the request in flight is answered.
#[test]
fn a_stop_during_a_restarts_drain_wins() {
    for args in [&["--supervisor", "none"][..], &[][..]] {
        let setup = Setup::new("127.0.0.1:0", "[gateway]\nidle_grace = \"100ms\"\n");
        let notify = setup.notify();
        let mut gw = setup.spawn(args, &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
        notify.wait_for("READY=1", T);
        let api = api_addr(&setup);
        let mut c = Conn::open(api).unwrap();
        // Half a request on the wire keeps the drain going.
        c.send("GET /health HTTP/1.1\r\nHost: te").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        gw.signal(Signal::SIGUSR1);
        notify.wait_for("STOPPING=1", T);
        gw.signal(Signal::SIGTERM);
        gw.wait_stderr("stopping instead of restarting", T);
        c.send("st\r\n\r\n").unwrap();
        let r = common::read_response(&mut c.r).expect("the request in flight is answered");
        assert_eq!(r.status, 200);
        assert_eq!(gw.wait(T).code(), Some(0), "{args:?}: {}", gw.stderr());
        assert!(
            !gw.stderr().contains("second stop signal"),
            "the first stop is not a hurry: {}",
            gw.stderr()
        );
    }
}

#[test]
fn drain_answers_the_next_keepalive_request_with_connection_close() {
    let setup = Setup::new("127.0.0.1:0", "[gateway]\nidle_grace = \"2s\"\n");
    let notify = setup.notify();
    let mut gw = setup.spawn(&[], &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.wait_for("READY=1", T);
    let api = api_addr(&setup);
    let mut c = Conn::open(api).unwrap();
    assert_eq!(c.get("/health").unwrap().status, 200);
    gw.signal(Signal::SIGTERM);
    notify.wait_for("STOPPING=1", T);
    // The idle keep-alive connection is not closed under us: the next request is answered,
    // and told to close.
    let r = c.get("/health").expect("answered during the idle grace");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(gw.wait(T).code(), Some(0));
}

#[test]
fn request_in_flight_at_drain_completes() {
    let setup = Setup::new("127.0.0.1:0", "[gateway]\nidle_grace = \"100ms\"\n");
    let notify = setup.notify();
    let mut gw = setup.spawn(&[], &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.wait_for("READY=1", T);
    let api = api_addr(&setup);
    let mut c = Conn::open(api).unwrap();
    // Half a request is on the wire when the stop begins.
    c.send("GET /health HTTP/1.1\r\nHost: te").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    gw.signal(Signal::SIGTERM);
    notify.wait_for("STOPPING=1", T);
    std::thread::sleep(Duration::from_millis(300)); // past the idle grace
    c.send("st\r\n\r\n").unwrap();
    let r = common::read_response(&mut c.r).expect("the request in flight is answered");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(gw.wait(T).code(), Some(0));
}

#[test]
fn drain_deadline_is_hard_and_extends_the_manager_timeout() {
    let setup = Setup::new(
        "127.0.0.1:0",
        "[gateway]\ndrain_timeout = \"1500ms\"\nidle_grace = \"100ms\"\n",
    );
    let notify = setup.notify();
    let mut gw = setup.spawn(&[], &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.wait_for("READY=1", T);
    let api = api_addr(&setup);
    // A client that never finishes its request holds its connection open.
    let mut c = Conn::open(api).unwrap();
    c.send("GET /health HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    gw.signal(Signal::SIGTERM);
    notify.wait_for("STOPPING=1", T);
    let ext = notify.wait_for_prefix("EXTEND_TIMEOUT_USEC=", T);
    let usec: u64 = ext.parse().expect("a number");
    assert!(usec > 0 && usec <= 7_000_000, "EXTEND_TIMEOUT_USEC={usec}");
    assert_eq!(gw.wait(T).code(), Some(0));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(4),
        "exit after {took:?}"
    );
}

#[test]
fn watchdog_pings_at_half_the_interval() {
    let setup = Setup::new("127.0.0.1:0", "");
    let notify = setup.notify();
    let mut gw = setup.spawn(
        &[],
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    notify.wait_for("READY=1", T);
    let t0 = Instant::now();
    let mut pings = 0;
    while t0.elapsed() < Duration::from_millis(1000) {
        if let Some(m) = notify.next(Duration::from_millis(500)) {
            pings += m.lines().filter(|l| *l == "WATCHDOG=1").count();
        }
    }
    assert!(
        (3..=7).contains(&pings),
        "{pings} pings in 1 s at WATCHDOG_USEC=400ms"
    );
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
}

#[test]
fn unnamed_activated_socket_is_matched_by_address() {
    if !require_socket_activate() {
        return;
    }
    let port = free_port();
    let setup = Setup::new(&format!("127.0.0.1:{port}"), "");
    let notify = setup.notify();
    let mut gw = setup.spawn_activated(
        port,
        "",
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    wait_healthy(addr(port), T);
    notify.wait_for("READY=1", T);
    let st = status_json(&setup.control);
    let api = st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "api")
        .unwrap()
        .clone();
    assert_eq!(api["origin"], "systemd");
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
}

#[test]
fn socket_with_an_unknown_name_is_closed_and_logged() {
    if !require_socket_activate() {
        return;
    }
    let port = free_port();
    let setup = Setup::new("127.0.0.1:0", "");
    let notify = setup.notify();
    let mut gw = setup.spawn_activated(
        port,
        "stats",
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    // Wake the activator (once it listens); the gateway closes the socket it does not know.
    let deadline = Instant::now() + T;
    while std::net::TcpStream::connect(addr(port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "systemd-socket-activate never listened"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    notify.wait_for("READY=1", T);
    let st = status_json(&setup.control);
    let api = st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "api")
        .unwrap()
        .clone();
    assert_eq!(
        api["origin"], "bound",
        "the configured api address was bound instead"
    );
    gw.wait_stderr("`stats`", T);
    // The unknown socket is closed: nothing listens on its port any more.
    let deadline = Instant::now() + T;
    while std::net::TcpStream::connect(addr(port)).is_ok() {
        assert!(
            Instant::now() < deadline,
            "the unknown socket is still listening"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
}

#[test]
fn status_command_prints_for_people() {
    let setup = Setup::new("127.0.0.1:0", "");
    let notify = setup.notify();
    let mut gw = setup.spawn(&[], &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.wait_for("READY=1", T);
    let out = std::process::Command::new(BIN)
        .args(["status", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("PID {}", gw.pid())) && text.contains("serving"),
        "{text}"
    );
    assert!(text.contains("api") && text.contains("(bound)"), "{text}");
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
    // With the gateway gone the command fails with a clear message.
    let out = std::process::Command::new(BIN)
        .args(["status", "--config"])
        .arg(&setup.config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the gateway running?"));
}

#[test]
fn slow_request_headers_get_408_and_an_idle_connection_just_closes() {
    let setup = Setup::new("127.0.0.1:0", "[gateway]\nheader_timeout = \"300ms\"\n");
    let notify = setup.notify();
    let mut gw = setup.spawn(&[], &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())]);
    notify.wait_for("READY=1", T);
    let api = api_addr(&setup);

    // Half a request line, then nothing: 408 in the OpenAI error shape, then the close.
    let mut slow = Conn::open(api).unwrap();
    slow.send("GET /health HTTP/1.1\r\nHost: te").unwrap();
    let t0 = Instant::now();
    let r = common::read_response(&mut slow.r).expect("a 408 answer");
    assert_eq!(r.status, 408);
    assert!(
        r.body.contains("\"type\":\"request_timeout\""),
        "{}",
        r.body
    );
    assert_eq!(r.header("connection"), Some("close"));
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t0.elapsed()
    );

    // A keep-alive connection that was answered and then stays idle is closed without a word.
    let mut idle = Conn::open(api).unwrap();
    assert_eq!(idle.get("/health").unwrap().status, 200);
    let mut rest = Vec::new();
    use std::io::Read;
    let n = idle.r.read_to_end(&mut rest).expect("closed cleanly");
    assert_eq!(
        n,
        0,
        "no unsolicited bytes on an idle connection: {:?}",
        String::from_utf8_lossy(&rest)
    );

    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
}

#[test]
fn children_do_not_inherit_the_activation_variables() {
    if !require_socket_activate() {
        return;
    }
    let port = free_port();
    // A command agent that answers with what it sees of LISTEN_* in its environment.
    let agent = "[agent]\nbackend = \"command\"\ncommand = [\"/bin/sh\", \"-c\", \"cat >/dev/null; echo pid=${LISTEN_PID:-unset} fds=${LISTEN_FDS:-unset} names=${LISTEN_FDNAMES:-unset}\"]\n";
    let setup = Setup::new("127.0.0.1:1", agent);
    let notify = setup.notify();
    let mut gw = activated(&setup, port, &notify, &[]);
    notify.wait_for("READY=1", T);
    let mut c = Conn::open(addr(port)).unwrap();
    let body = r#"{"model":"m","messages":[{"role":"user","content":"env?"}]}"#;
    c.send(&format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
    .unwrap();
    let r = common::read_response(&mut c.r).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(
        r.body.contains("pid=unset fds=unset names=unset"),
        "the agent saw activation variables: {}",
        r.body
    );
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
}
