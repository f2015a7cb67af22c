//! Readable log lines against the real binary: ANSI colour codes only when stderr is a
//! terminal, never in a file or a pipe (`hermes-gateway run 2>gateway.log`), and never
//! with `NO_COLOR` set; and what a first start says of its new database.

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use nix::sys::signal::Signal;

const T: Duration = Duration::from_secs(20);
const ESC: u8 = 0x1b;

/// Runs a gateway with `stderr` until it served one request, then stops it (exit 0).
fn run_once(setup: &Setup, stderr: Stdio, envs: &[(&str, &str)]) {
    let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
    let notify = setup.notify();
    let mut cmd = Command::new(BIN);
    cmd.arg("run").arg("--config").arg(&setup.config);
    for var in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "NO_COLOR",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("RUST_LOG", "info")
        .env("NOTIFY_SOCKET", &notify.path);
    cmd.envs(envs.iter().copied());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let mut child = cmd.spawn().expect("spawn the gateway");
    // Our copy of a pty's slave side must close, so that its reader sees the end.
    drop(cmd);
    notify.wait_for("READY=1", T);
    let api = listener_addr(&setup.control, "api");
    assert_eq!(get(api, "/health").expect("GET /health").status, 200);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = child.wait().expect("wait for the gateway");
    assert_eq!(status.code(), Some(0));
}

/// What the gateway logs when stderr is a pseudo-terminal, with `envs`.
fn on_a_terminal(envs: &[(&str, &str)]) -> String {
    let setup = Setup::new("127.0.0.1:0", "");
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the given out pointers; the name,
    // termios and winsize pointers may be null.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty succeeded: both descriptors are new and owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let reader = std::thread::spawn(move || {
        let mut f = std::fs::File::from(master);
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Reads end with EIO once every slave descriptor is closed (the gateway exited).
        while let Ok(n) = f.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    run_once(&setup, Stdio::from(slave), envs);
    let out = reader.join().expect("pty reader");
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn a_log_file_gets_no_colour_codes() {
    let setup = Setup::new("127.0.0.1:0", "");
    let path = setup.dir.path().join("gateway.log");
    let file = std::fs::File::create(&path).expect("create the log file");
    run_once(&setup, Stdio::from(file), &[]);
    let log = std::fs::read(&path).expect("read the log file");
    let text = String::from_utf8_lossy(&log);
    assert!(
        text.contains("listener api on") && text.contains("GET /health"),
        "the log says what happened:\n{text}"
    );
    assert!(!log.contains(&ESC), "ESC in a log file:\n{text:?}");
}

#[test]
fn a_pipe_gets_no_colour_codes() {
    let setup = Setup::new("127.0.0.1:0", "");
    let (mut gw, _api, _notify) = start_api(&setup);
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(T).code(), Some(0));
    let log = gw.stderr();
    assert!(log.contains("listener api on"), "{log}");
    assert!(!log.contains('\u{1b}'), "ESC in a pipe:\n{log:?}");
}

#[test]
fn a_terminal_gets_colour_unless_no_color_is_set() {
    let coloured = on_a_terminal(&[]);
    assert!(coloured.contains("listener api on"), "{coloured}");
    assert!(
        coloured.contains('\u{1b}'),
        "no colour on a terminal:\n{coloured:?}"
    );

    let plain = on_a_terminal(&[("NO_COLOR", "1")]);
    assert!(plain.contains("listener api on"), "{plain}");
    assert!(
        !plain.contains('\u{1b}'),
        "ESC despite NO_COLOR:\n{plain:?}"
    );
}

#[test]
fn a_new_database_says_once_that_it_was_created() {
    let setup = Setup::new("127.0.0.1:0", "");
    let db_lines = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("schema version"))
            .map(str::to_owned)
            .collect()
    };
    for start in ["first", "second"] {
        let (mut gw, _api, _notify) = start_api(&setup);
        gw.signal(Signal::SIGTERM);
        assert_eq!(gw.wait(T).code(), Some(0));
        let lines = db_lines(&gw.stderr());
        if start == "first" {
            // One line per database file: everything, and the sessions' history.
            assert_eq!(lines.len(), 2, "{lines:?}");
            assert!(
                lines[0].contains("gateway.db: created at schema version "),
                "{lines:?}"
            );
            assert!(
                lines[1].contains("history.db: created at schema version 1"),
                "{lines:?}"
            );
        } else {
            assert_eq!(
                lines,
                Vec::<String>::new(),
                "an up-to-date database logs nothing"
            );
        }
    }
}
