//! An `openai` upstream that misbehaves ends its turn with a clear error — a JSON error
//! object (502, or 504 for the turn's timeout) for a plain client, the error finish chunk
//! and `[DONE]` for a streaming one — and leaves nothing behind: the gateway closes the
//! upstream connection, and its open descriptors and tasks come back to what they were.
//!
//! Each test starts a small upstream on a raw `TcpListener` doing one wrong thing:
//! malformed SSE (garbage lines, a `data:` that is not JSON, an endless line, a stream cut
//! before `[DONE]`, a `finish_reason: "error"`), a stream that never ends (keepalive
//! comments, or deltas), an answer that never ends, a 10 MB error body, redirects, and an
//! answer that is not HTTP at all.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// What a stub does with one request, after reading it: the connection, the stub's own
/// address, and whether the request asked for a stream.
type Behaviour = fn(&mut TcpStream, SocketAddr, bool);

struct Stub {
    addr: SocketAddr,
    /// The request line of each request.
    requests: Arc<Mutex<Vec<String>>>,
    /// Connections not yet closed (by either side).
    open: Arc<AtomicUsize>,
}

impl Stub {
    fn start(behave: Behaviour) -> Stub {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let requests: Arc<Mutex<Vec<String>>> = Arc::default();
        let open: Arc<AtomicUsize> = Arc::default();
        let (r, o) = (requests.clone(), open.clone());
        std::thread::spawn(move || {
            for conn in l.incoming().map_while(Result::ok) {
                let (r, o) = (r.clone(), o.clone());
                o.fetch_add(1, Ordering::SeqCst);
                std::thread::spawn(move || {
                    serve(conn, addr, behave, &r);
                    o.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Stub {
            addr,
            requests,
            open,
        }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }

    /// Waits until the gateway has closed every connection to the stub.
    fn all_closed(&self) {
        let end = Instant::now() + Duration::from_secs(5);
        while self.open.load(Ordering::SeqCst) > 0 {
            assert!(
                Instant::now() < end,
                "the gateway still holds {} connection(s) to the upstream",
                self.open.load(Ordering::SeqCst)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve(conn: TcpStream, addr: SocketAddr, behave: Behaviour, seen: &Mutex<Vec<String>>) {
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':')
            && k.eq_ignore_ascii_case("content-length")
        {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    seen.lock().unwrap().push(line.trim_end().to_owned());
    let stream = serde_json::from_slice::<Value>(&body).is_ok_and(|v| v["stream"] == true);
    let mut w = r.into_inner();
    behave(&mut w, addr, stream);
}

/// Keeps the connection open until the gateway closes it.
fn hold(w: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    while matches!(w.read(&mut buf), Ok(n) if n > 0) {}
}

const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n\r\n";

fn delta(text: &str) -> String {
    let chunk = json!({"object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]});
    format!("data: {chunk}\n\n")
}

/// A gateway in front of `stub`: the turn bounded by 3 s, silence by 1 s, the reply by
/// 64 KiB.
fn gateway(stub: &Stub) -> (Setup, Gateway, SocketAddr) {
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!(
            "[agent]\nbackend = \"openai\"\nbase_url = \"http://{}/v1\"\nmodel = \"m\"\nidle_timeout = \"1s\"\ntimeout = \"3s\"\nmax_reply = \"64KiB\"\nretries = 0\n",
            stub.addr
        ),
    );
    let (gw, addr, _n) = start_api(&setup);
    (setup, gw, addr)
}

fn chat(addr: SocketAddr, stream: bool) -> Response {
    let body = json!({"stream": stream, "messages": [{"role": "user", "content": "go"}]});
    request(addr, "POST", "/v1/chat/completions", &[], &body.to_string()).expect("an answer")
}

/// The descriptors a process has open, as their link targets.
fn fds(pid: i32) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .map(|e| {
            std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        })
        .collect();
    v.sort();
    v
}

fn tasks(setup: &Setup) -> u64 {
    status_json(&setup.control)["tasks"]
        .as_u64()
        .expect("status gives tasks")
}

/// What the gateway holds before a case, to compare with after it.
struct Before {
    fds: Vec<String>,
    tasks: u64,
}

impl Before {
    fn take(setup: &Setup, gw: &Gateway) -> Before {
        Before {
            fds: fds(gw.pid()),
            tasks: tasks(setup),
        }
    }

    /// Waits until the gateway is back to at most the descriptors and tasks it had.
    fn settled(&self, setup: &Setup, gw: &Gateway) {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let now = fds(gw.pid());
            let t = tasks(setup);
            if now.len() <= self.fds.len() && t <= self.tasks {
                return;
            }
            assert!(
                Instant::now() < end,
                "left behind: {t} tasks (were {}), descriptors {now:?} (were {:?})",
                self.tasks,
                self.fds
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A plain client's error: `status`, an OpenAI error object of `kind` whose message
/// contains `needle`.
fn assert_error(r: &Response, status: u16, kind: &str, needle: &str) -> String {
    assert_eq!(r.status, status, "{}", r.body);
    let v = r.json();
    assert_eq!(v["error"]["type"], kind, "{v}");
    let m = v["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(m.contains(needle), "{needle:?} not in {m:?}");
    m
}

/// A streaming client's error: 200, then a finish chunk with `finish_reason: "error"`,
/// the error object (`kind`, a message containing `needle`) and `hermes.error_code`, then
/// `[DONE]`. Returns the text streamed before it and the `hermes.partial` flag.
fn assert_stream_error(r: &Response, kind: &str, needle: &str) -> (String, bool) {
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.sse();
    assert_eq!(
        events.last().map(|e| e.1.as_str()),
        Some("[DONE]"),
        "{}",
        r.body
    );
    let finish: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "error", "{finish}");
    assert_eq!(finish["error"]["type"], kind, "{finish}");
    assert_eq!(finish["hermes"]["error_code"], "agent_error", "{finish}");
    assert_eq!(finish["hermes"]["failed"], true, "{finish}");
    let m = finish["error"]["message"].as_str().unwrap_or_default();
    assert!(m.contains(needle), "{needle:?} not in {m:?}");
    let text: String = events[..events.len() - 2]
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    (text, finish["hermes"]["partial"] == true)
}

#[test]
fn a_data_line_that_is_not_json_ends_the_turn_at_once() {
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        let _ = write!(
            w,
            "{SSE_HEAD}hello, this is no SSE\n: a comment\nid: 1\nretry: x\n\n{}data: {{oops, not json\n\n",
            delta("par")
        );
        let _ = w.flush();
        hold(w); // the error must not wait for the end of the answer
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);

    let t = Instant::now();
    let r = chat(addr, false);
    let m = assert_error(&r, 502, "upstream_error", "not a JSON object");
    assert!(m.contains("{oops, not json"), "{m}");
    // Not the turn's timeout (3 s): the bad line ended it.
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );

    let r = chat(addr, true);
    let (text, partial) = assert_stream_error(&r, "upstream_error", "malformed");
    assert_eq!(text, "par", "what came before went out");
    assert!(partial);

    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn a_stream_cut_before_done_is_a_502() {
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        let _ = write!(w, "{SSE_HEAD}{}{}", delta("half a "), delta("rep"));
        // And the connection closes: no finish_reason, no [DONE].
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);

    let r = chat(addr, false);
    assert_error(&r, 502, "upstream_error", "ended before its reply did");
    let r = chat(addr, true);
    let (text, partial) = assert_stream_error(&r, "upstream_error", "ended before");
    assert_eq!(text, "half a rep");
    assert!(partial);

    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn a_reply_that_finishes_with_error_is_a_502() {
    // As an upstream hermes API server ends a turn whose agent crashed mid-stream.
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        let end = json!({"object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "error"}]});
        let _ = write!(
            w,
            "{SSE_HEAD}{}data: {end}\n\ndata: [DONE]\n\n",
            delta("so far")
        );
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);
    let r = chat(addr, false);
    assert_error(&r, 502, "upstream_error", "finish_reason \"error\"");
    let r = chat(addr, true);
    let (text, partial) = assert_stream_error(&r, "upstream_error", "finish_reason");
    assert_eq!((text.as_str(), partial), ("so far", true));
    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn garbage_that_is_no_stream_at_all_is_a_502() {
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        let _ = w.write_all(SSE_HEAD.as_bytes());
        let _ = w.write_all(b"\x00\xff\xfe garbage\r\n<html>502 Bad Gateway</html>\n\n\n");
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);
    for stream in [false, true] {
        let r = chat(addr, stream);
        if stream {
            let (text, partial) = assert_stream_error(&r, "upstream_error", "ended before");
            assert_eq!((text.as_str(), partial), ("", false));
        } else {
            assert_error(&r, 502, "upstream_error", "ended before");
        }
    }
    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn a_line_without_end_is_cut_at_its_limit() {
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        let _ = write!(w, "{SSE_HEAD}data: ");
        let block = [b'x'; 64 * 1024];
        while w.write_all(&block).is_ok() {}
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);
    let t = Instant::now();
    let r = chat(addr, false);
    assert_error(&r, 502, "upstream_error", "a line of more than");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    let r = chat(addr, true);
    assert_stream_error(&r, "upstream_error", "a line of more than");
    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn keepalives_without_end_stop_at_the_turn_timeout() {
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        let _ = write!(w, "{SSE_HEAD}{}", delta("still "));
        // Never silent for the idle timeout (1 s), never done.
        while write!(w, ": keepalive\n\n").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);
    for stream in [false, true] {
        let t = Instant::now();
        let r = chat(addr, stream);
        let took = t.elapsed();
        assert!(
            took >= Duration::from_millis(2900) && took < Duration::from_secs(8),
            "{took:?}"
        );
        if stream {
            let (text, partial) = assert_stream_error(&r, "timeout_error", "[agent] timeout");
            assert_eq!(text, "still ");
            assert!(partial);
        } else {
            assert_error(&r, 504, "timeout_error", "[agent] timeout");
        }
    }
    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn deltas_without_end_stop_at_max_reply() {
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        let _ = w.write_all(SSE_HEAD.as_bytes());
        let piece = delta(&"y".repeat(1000));
        while w.write_all(piece.as_bytes()).is_ok() {}
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);
    let t = Instant::now();
    let r = chat(addr, false);
    assert_error(&r, 502, "upstream_error", "[agent] max_reply");
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    let r = chat(addr, true);
    let (text, partial) = assert_stream_error(&r, "upstream_error", "[agent] max_reply");
    assert!(partial);
    assert!(
        !text.is_empty() && text.len() <= 64 * 1024,
        "{} bytes streamed",
        text.len()
    );
    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn an_answer_without_end_stops_at_its_limit() {
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        // A plain completion whose content never closes, sent chunked.
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        );
        let head = r#"{"choices":[{"message":{"role":"assistant","content":""#;
        let _ = write!(w, "{:x}\r\n{head}\r\n", head.len());
        let block = "z".repeat(32 * 1024);
        while write!(w, "{:x}\r\n{block}\r\n", block.len()).is_ok() {}
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);
    for stream in [false, true] {
        let r = chat(addr, stream);
        if stream {
            assert_stream_error(&r, "upstream_error", "[agent] max_reply");
        } else {
            assert_error(&r, 502, "upstream_error", "[agent] max_reply");
        }
    }
    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn a_10_mb_error_body_is_not_read_and_its_message_is_cut() {
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        let size = 10 * 1024 * 1024;
        let _ = write!(
            w,
            "HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\nContent-Length: {size}\r\n\r\nupstream exploded: "
        );
        let block = vec![b'e'; 64 * 1024];
        let mut sent = 19;
        while sent < size {
            let n = block.len().min(size - sent);
            if w.write_all(&block[..n]).is_err() {
                return;
            }
            sent += n;
        }
        hold(w);
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);
    for stream in [false, true] {
        let t = Instant::now();
        let r = chat(addr, stream);
        assert!(
            t.elapsed() < Duration::from_millis(2500),
            "{:?}",
            t.elapsed()
        );
        let m = if stream {
            assert_stream_error(&r, "upstream_error", "upstream exploded: eee");
            r.body.clone()
        } else {
            assert_error(&r, 502, "upstream_error", "the upstream answered 500")
        };
        assert!(m.contains("more than 16 KiB, cut"), "{m}");
        assert!(r.body.len() < 4096, "{} bytes to the client", r.body.len());
    }
    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn redirects_are_not_followed() {
    fn behave(w: &mut TcpStream, addr: SocketAddr, stream: bool) {
        let code = if stream {
            "307 Temporary Redirect"
        } else {
            "301 Moved Permanently"
        };
        let _ = write!(
            w,
            "HTTP/1.1 {code}\r\nLocation: http://{addr}/elsewhere/v1/chat/completions\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);
    let location = format!("http://{}/elsewhere/v1/chat/completions", stub.addr);

    let r = chat(addr, false);
    let m = assert_error(&r, 502, "upstream_error", "the upstream answered 301");
    assert!(m.contains(&location), "{m}");
    assert!(m.contains("not followed"), "{m}");
    let r = chat(addr, true);
    let (text, partial) = assert_stream_error(&r, "upstream_error", "answered 307");
    assert!(r.body.contains(&location), "{}", r.body);
    assert_eq!((text.as_str(), partial), ("", false));
    assert_eq!(
        stub.requests(),
        vec!["POST /v1/chat/completions HTTP/1.1"; 2],
        "nothing went to the Location"
    );
    stub.all_closed();
    before.settled(&setup, &gw);
}

#[test]
fn an_answer_that_is_not_http_is_a_502() {
    fn behave(w: &mut TcpStream, _: SocketAddr, _: bool) {
        let _ = w.write_all(b"SSH-2.0-OpenSSH_9.2\r\n\x00\x01\x02 garbage\r\n\r\n");
    }
    let stub = Stub::start(behave);
    let (setup, gw, addr) = gateway(&stub);
    let before = Before::take(&setup, &gw);
    let r = chat(addr, false);
    assert_error(&r, 502, "upstream_error", "");
    let r = chat(addr, true);
    assert_stream_error(&r, "upstream_error", "");
    stub.all_closed();
    before.settled(&setup, &gw);
}
