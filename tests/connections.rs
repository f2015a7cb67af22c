//! `[gateway] max_connections`: beyond it new connections wait in the kernel's backlog
//! rather than being accepted and starved; by default it is sized from the descriptor
//! limit, so a gateway started with `ulimit -n 64` never runs out of descriptors in
//! accept; and when accept does fail, the warning is rate-limited.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn health_pending(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("the backlog takes the connection");
    s.write_all(b"GET /health HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    s
}

/// Whether an answer starts arriving on `s` within `wait`.
fn answered(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 12];
    matches!(s.read(&mut b), Ok(n) if n > 0 && b.starts_with(b"HTTP/1.1 200"))
}

#[test]
fn beyond_max_connections_new_ones_wait_in_the_backlog() {
    let setup = Setup::new("127.0.0.1:0", "[gateway]\nmax_connections = 2\n");
    let (_gw, addr, _n) = start_api(&setup);
    let mut a = Conn::open(addr).unwrap();
    let mut b = Conn::open(addr).unwrap();
    assert_eq!(a.get("/health").unwrap().status, 200);
    assert_eq!(b.get("/health").unwrap().status, 200);
    // A third is not accepted while the two stay open…
    let mut c = health_pending(addr);
    assert!(
        !answered(&mut c, Duration::from_millis(700)),
        "served beyond the limit"
    );
    // …and is served as soon as one of them goes.
    drop(a);
    assert!(answered(&mut c, Duration::from_secs(5)), "never served");
    // The control socket is not counted: status answers while the API is full.
    let st = status_json(&setup.control);
    assert_eq!(st["state"], "serving");
    assert_eq!(b.get("/health").unwrap().status, 200);
}

#[test]
fn with_64_descriptors_accept_never_fails_and_everyone_is_served() {
    let setup = Setup::new("127.0.0.1:0", "");
    let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
    let notify = setup.notify();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"])
        .arg(&setup.config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("RUST_LOG", "info")
        .env_remove("LISTEN_FDS");
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 64,
                rlim_max: 64,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let gw = spawn_command(cmd);
    notify.wait_for("READY=1", Duration::from_secs(20));
    let addr = listener_addr(&setup.control, "api");
    // 60 clients at once, each keeping its connection: more than the descriptors left.
    let mut held: Vec<TcpStream> = (0..60).map(|_| health_pending(addr)).collect();
    let t = Instant::now();
    let mut served = 0;
    // Clients that got their answer leave; the others are served in turn.
    while served < 60 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "only {served} served"
        );
        let mut still = Vec::new();
        for mut s in held.drain(..) {
            if answered(&mut s, Duration::from_millis(20)) {
                served += 1;
            } else {
                still.push(s);
            }
        }
        held = still;
    }
    let log = gw.stderr();
    assert!(!log.contains("accept failed"), "{log}");
    assert!(log.contains("serving at most 16 connections"), "{log}");
}

#[test]
fn accept_failures_are_warned_about_once_per_period() {
    // A limit above what the descriptors allow: accept itself fails with EMFILE.
    let setup = Setup::new("127.0.0.1:0", "[gateway]\nmax_connections = 1000\n");
    let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
    let notify = setup.notify();
    let mut cmd = Command::new(BIN);
    cmd.args(["run", "--config"])
        .arg(&setup.config)
        .env("NOTIFY_SOCKET", &notify.path)
        .env("RUST_LOG", "info");
    // SAFETY: only setrlimit, async-signal-safe, between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 48,
                rlim_max: 48,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let gw = spawn_command(cmd);
    notify.wait_for("READY=1", Duration::from_secs(20));
    let addr = listener_addr(&setup.control, "api");
    let held: Vec<TcpStream> = (0..80).map(|_| health_pending(addr)).collect();
    std::thread::sleep(Duration::from_secs(2));
    let log = gw.stderr();
    let warnings = log.matches("accept failed").count();
    assert!(warnings >= 1, "EMFILE was hit and said: {log}");
    assert!(warnings <= 2, "{warnings} warnings in 2 s: {log}");
    // Once clients leave, accept works again.
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let mut s = BufReader::new(TcpStream::connect(addr).unwrap());
    s.get_mut()
        .write_all(b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    let r = read_response(&mut s).unwrap();
    assert_eq!(r.status, 200);
}

/// Posts `size` bytes to `path` without reading anything until all are written, as a
/// client that does not expect an early answer does; then reads the answer and the end.
/// Returns the write error if any, the answer, and whether the connection then ended.
fn post_all_then_read(
    addr: SocketAddr,
    path: &str,
    size: usize,
) -> (Option<std::io::Error>, std::io::Result<Response>, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    );
    let chunk = vec![b' '; 64 * 1024];
    let written = (|| {
        s.write_all(head.as_bytes())?;
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])?;
            left -= n;
        }
        Ok(())
    })();
    let mut r = BufReader::new(s);
    let answer = read_response(&mut r);
    let mut rest = Vec::new();
    let ended = matches!(r.read_to_end(&mut rest), Ok(0));
    (written.err(), answer, ended)
}

#[test]
fn a_body_left_unread_is_taken_in_and_discarded_so_the_client_reads_its_answer() {
    // 32 MiB: far more than the sockets' buffers hold, so that a connection closed with
    // the body unread resets the client while it still writes (EPIPE/ECONNRESET).
    const SIZE: usize = 32 << 20;
    let setup = Setup::new("127.0.0.1:0", "");
    let (gw, addr, _n) = start_api(&setup);
    // Refused from its Content-Length (over [api] max_body), before a byte of it is read.
    let (werr, answer, ended) = post_all_then_read(addr, "/v1/chat/completions", SIZE);
    assert!(
        werr.is_none(),
        "the client could not write its body: {werr:?}"
    );
    let answer = answer.expect("the answer is read in full");
    assert_eq!(answer.status, 413, "{}", answer.body);
    assert!(
        answer.body.contains("error"),
        "a JSON error: {}",
        answer.body
    );
    assert!(ended, "the connection ends after the answer");
    // A route that never reads its body.
    let (werr, answer, ended) = post_all_then_read(addr, "/nowhere", SIZE);
    assert!(
        werr.is_none(),
        "the client could not write its body: {werr:?}"
    );
    assert_eq!(answer.expect("the answer is read in full").status, 404);
    assert!(ended);
    // The gateway goes on serving.
    assert_eq!(get(addr, "/health").unwrap().status, 200);
    drop(gw);
}

#[test]
fn a_lingering_connection_does_not_hold_up_a_stop() {
    let setup = Setup::new("127.0.0.1:0", "");
    let (mut gw, addr, _n) = start_api(&setup);
    // Announces 32 MiB, sends a little, then nothing: the gateway answers 413 and lingers.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n",
            32 << 20
        )
        .as_bytes(),
    )
    .unwrap();
    s.write_all(&[b' '; 1024]).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    assert_eq!(read_response(&mut r).unwrap().status, 413);
    // The client still writes: the connection is kept, taking it in.
    std::thread::sleep(Duration::from_millis(200));
    s.write_all(&[b' '; 1024])
        .expect("the lingering connection still takes data");
    let began = Instant::now();
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let status = gw.wait(Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "the stop waited {:?} for the lingering connection",
        began.elapsed()
    );
}
