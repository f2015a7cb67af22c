//! Chat completions, models, sessions, authentication and bad input against the real
//! binary with the `echo` and `command` agents.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);

fn chat(addr: SocketAddr, session: Option<&str>, text: &str, stream: bool) -> Response {
    let body = serde_json::json!({
        "model": "hermes-agent",
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    })
    .to_string();
    let mut h = Vec::new();
    if let Some(s) = session {
        h.push(("X-Hermes-Session-Id", s));
    }
    request(addr, "POST", "/v1/chat/completions", &h, &body).expect("chat request")
}

/// A `command` agent written in Python: `script` gets `msgs` (the messages) and `sys`.
fn py_agent(script: &str) -> String {
    let code = format!("import json,sys,time\nmsgs=json.load(sys.stdin)['messages']\n{script}\n");
    format!(
        "[agent]\nbackend = \"command\"\ncommand = [\"python3\", \"-c\", {}]\n",
        serde_json::Value::from(code)
    )
}

#[test]
fn echo_answers_plain_and_streaming() {
    let setup = Setup::new("127.0.0.1:0", "");
    let (_gw, addr, _n) = start_api(&setup);

    let r = chat(addr, None, "hello there", false);
    assert_eq!(r.status, 200, "{}", r.body);
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], "hello there");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");

    let r = chat(addr, None, "streamed", true);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    let events = r.sse();
    assert_eq!(
        events.last().map(|e| e.1.as_str()),
        Some("[DONE]"),
        "{events:?}"
    );
    let mut text = String::new();
    for (_, d) in &events[..events.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(d).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        if let Some(c) = v["choices"][0]["delta"]["content"].as_str() {
            text.push_str(c);
        }
    }
    assert_eq!(text, "streamed");
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");

    let m = request(addr, "GET", "/v1/models", &[], "").unwrap();
    assert_eq!(m.status, 200);
    assert_eq!(m.json()["data"][0]["id"], "hermes-agent");
}

#[test]
fn a_session_keeps_its_history_and_prepends_it() {
    // The agent answers with how many messages it was given, and the first one's text.
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent("print(f\"{len(msgs)}:{msgs[0]['content']}\", end='')"),
    );
    let (_gw, addr, _n) = start_api(&setup);
    assert_eq!(
        chat(addr, Some("conv-1"), "first", false).json()["choices"][0]["message"]["content"],
        "1:first"
    );
    assert_eq!(
        chat(addr, Some("conv-1"), "second", false).json()["choices"][0]["message"]["content"],
        "3:first"
    );
    // Without the header nothing is kept.
    assert_eq!(
        chat(addr, None, "alone", false).json()["choices"][0]["message"]["content"],
        "1:alone"
    );
    let s = request(addr, "GET", "/v1/sessions/conv-1", &[], "").unwrap();
    assert_eq!(s.status, 200, "{}", s.body);
    let msgs = s.json()["messages"].as_array().unwrap().clone();
    assert_eq!(msgs.len(), 4);
    assert_eq!(msgs[2]["content"], "second");
    assert_eq!(msgs[3]["role"], "assistant");
    assert_eq!(msgs[3]["content"], "3:first");

    let list = request(addr, "GET", "/v1/sessions", &[], "")
        .unwrap()
        .json();
    assert_eq!(list["data"][0]["id"], "conv-1");
    assert_eq!(list["data"].as_array().unwrap().len(), 1);

    let d = request(addr, "DELETE", "/v1/sessions/conv-1", &[], "").unwrap();
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(d.json()["deleted"], true);
    let gone = request(addr, "GET", "/v1/sessions/conv-1", &[], "").unwrap();
    assert_eq!(gone.status, 404);
    assert_eq!(
        request(addr, "DELETE", "/v1/sessions/conv-1", &[], "")
            .unwrap()
            .status,
        404
    );
}

#[test]
fn history_in_memory_keeps_the_limit_and_forgets_a_deleted_session() {
    // The agent answers with the number of messages and the text of each.
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!(
            "{}[sessions]\nhistory_limit = 3\n",
            py_agent("print(f\"{len(msgs)}:\" + ','.join(m['content'] for m in msgs), end='')")
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let say = |text: &str| {
        let r = chat(addr, Some("lim"), text, false);
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert_eq!(say("a"), "1:a");
    assert_eq!(say("b"), "3:a,1:a,b");
    // The newest 3 of the 4 stored messages, then the new one.
    assert_eq!(say("c"), "4:1:a,b,3:a,1:a,b,c");
    let d = request(addr, "DELETE", "/v1/sessions/lim", &[], "").unwrap();
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(say("d"), "1:d", "a deleted session starts over");
    let s = request(addr, "GET", "/v1/sessions/lim", &[], "").unwrap();
    assert_eq!(s.json()["messages"].as_array().map(Vec::len), Some(2));
}

#[test]
fn turns_of_one_session_run_in_order_one_at_a_time() {
    // Each turn sleeps, then answers with its text; overlapping turns would interleave.
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent("time.sleep(0.2)\nprint(msgs[-1]['content'], end='')"),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let started = Instant::now();
    let mut threads = Vec::new();
    for i in 0..4 {
        threads.push(std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30 * i));
            chat(addr, Some("ordered"), &format!("turn {i}"), false)
        }));
    }
    for t in threads {
        assert_eq!(t.join().unwrap().status, 200);
    }
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "4 turns of 200 ms in one session must not overlap: {:?}",
        started.elapsed()
    );
    let h = request(addr, "GET", "/v1/sessions/ordered", &[], "")
        .unwrap()
        .json();
    let texts: Vec<String> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["content"].as_str().unwrap_or("").to_owned())
        .collect();
    assert_eq!(
        texts,
        vec![
            "turn 0", "turn 0", "turn 1", "turn 1", "turn 2", "turn 2", "turn 3", "turn 3"
        ]
    );
}

/// Sends a chat turn on a raw connection and closes it `after` the request went out.
fn leave_after(
    addr: SocketAddr,
    session: &str,
    text: &str,
    stream: bool,
    after: Duration,
) -> std::thread::JoinHandle<()> {
    let body = serde_json::json!({
        "stream": stream,
        "messages": [{"role": "user", "content": text}],
    })
    .to_string();
    let session = session.to_owned();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Hermes-Session-Id: {session}\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        std::thread::sleep(after);
        drop(s);
    })
}

/// The contents of a session's stored messages, oldest first.
fn stored_texts(addr: SocketAddr, session: &str) -> (Vec<String>, serde_json::Value) {
    let h = request(addr, "GET", &format!("/v1/sessions/{session}"), &[], "")
        .unwrap()
        .json();
    let texts = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["content"].as_str().map(str::to_owned))
        .collect();
    (texts, h)
}

#[test]
fn a_turn_whose_client_leaves_is_abandoned_and_the_turns_behind_it_still_run() {
    // The agent notes each turn it finishes: an abandoned one is killed before that.
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("finished");
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent(&format!(
            "time.sleep(1.0)\nopen({:?}, 'a').write(msgs[-1]['content'] + '\\n')\nprint(msgs[-1]['content'], end='')",
            log.display().to_string()
        )),
    );
    let (_gw, addr, _n) = start_api(&setup);
    for (session, stream) in [("plain", false), ("streamed", true)] {
        // A client that sends a turn and leaves while the agent works on it.
        let leaver = leave_after(
            addr,
            session,
            "abandoned",
            stream,
            Duration::from_millis(300),
        );
        std::thread::sleep(Duration::from_millis(100));
        // Queued behind it, in the same session.
        let r = chat(addr, Some(session), "queued", false);
        leaver.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["choices"][0]["message"]["content"], "queued");
        let finished = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !finished.lines().any(|l| l == "abandoned"),
            "{session}: the abandoned turn's agent was stopped, not run to its end: {finished:?}"
        );
        let (texts, h) = stored_texts(addr, session);
        assert_eq!(
            texts,
            ["queued", "queued"],
            "{session}: the abandoned turn is not stored"
        );
        assert_eq!(h["busy"], false, "{session}: the session is free again");
    }
}

#[test]
fn a_queued_turn_whose_client_left_is_never_run() {
    // The agent notes each turn it starts, so that "never run" is seen, not timed.
    let log_dir = tempfile::tempdir().unwrap();
    let log = log_dir.path().join("started");
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent(&format!(
            "open({:?}, 'a').write(msgs[-1]['content'] + '\\n')\ntime.sleep(0.8)\nprint(msgs[-1]['content'], end='')",
            log.display().to_string()
        )),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let first = std::thread::spawn(move || chat(addr, Some("q"), "first", false));
    std::thread::sleep(Duration::from_millis(150));
    // Waits behind `first`, and leaves before its turn comes.
    let leaver = leave_after(addr, "q", "left", false, Duration::from_millis(150));
    std::thread::sleep(Duration::from_millis(100));
    let last = chat(addr, Some("q"), "last", false);
    leaver.join().unwrap();
    assert_eq!(first.join().unwrap().status, 200);
    assert_eq!(last.status, 200, "{}", last.body);
    let started = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        started.lines().collect::<Vec<_>>(),
        ["first", "last"],
        "the turn whose client left never started"
    );
    let (texts, _) = stored_texts(addr, "q");
    assert_eq!(texts, ["first", "first", "last", "last"]);
}

#[test]
fn beyond_the_limits_the_answer_is_429_with_retry_after() {
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!(
            "{}[sessions]\nmax_concurrent_runs = 1\nqueue_depth = 1\n",
            py_agent("time.sleep(1.5)\nprint('ok', end='')")
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let busy = std::thread::spawn(move || chat(addr, Some("a"), "x", false));
    std::thread::sleep(Duration::from_millis(300));
    let waiting = std::thread::spawn(move || chat(addr, Some("a"), "y", false));
    std::thread::sleep(Duration::from_millis(200));

    // Another session: every permit is taken.
    let r = chat(addr, Some("b"), "z", false);
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded");
    assert!(r.body.contains("max_concurrent_runs"), "{}", r.body);
    // The same session: its queue (depth 1) is full.
    let r = chat(addr, Some("a"), "w", false);
    assert_eq!(r.status, 429, "{}", r.body);
    assert!(r.body.contains("queue_depth"), "{}", r.body);

    assert_eq!(busy.join().unwrap().status, 200);
    assert_eq!(waiting.join().unwrap().status, 200);
    // Free again.
    assert_eq!(chat(addr, Some("b"), "z", false).status, 200);
}

#[test]
fn api_keys_are_required_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let keyfile = dir.path().join("keys");
    std::fs::write(&keyfile, "# operators\nfile-key-1\n\n").unwrap();
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!(
            "[api]\nkeys = [\"inline-key\"]\nkeys_file = \"{}\"\n",
            keyfile.display()
        ),
    );
    let (gw, addr, _n) = start_api(&setup);
    let body = r#"{"messages":[{"role":"user","content":"hi"}]}"#;
    let none = request(addr, "POST", "/v1/chat/completions", &[], body).unwrap();
    assert_eq!(none.status, 401);
    assert_eq!(none.json()["error"]["code"], "invalid_api_key");
    let wrong = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer inline-kez")],
        body,
    )
    .unwrap();
    assert_eq!(wrong.status, 401);
    for key in ["inline-key", "file-key-1"] {
        let auth = format!("Bearer {key}");
        let ok = request(
            addr,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", &auth)],
            body,
        )
        .unwrap();
        assert_eq!(ok.status, 200, "{key}: {}", ok.body);
    }
    assert_eq!(
        get(addr, "/health").unwrap().status,
        200,
        "health stays open"
    );
    assert_eq!(
        request(addr, "GET", "/v1/models", &[], "").unwrap().status,
        401
    );
    std::thread::sleep(Duration::from_millis(100));
    let log = gw.stderr();
    assert!(
        !log.contains("inline-key") && !log.contains("file-key-1"),
        "a key reached the log:\n{log}"
    );
}

#[test]
fn a_non_loopback_api_without_a_key_exits_78() {
    let setup = Setup::new("0.0.0.0:0", "");
    let mut gw = setup.spawn(&[], &[]);
    assert_eq!(gw.wait(T).code(), Some(78), "{}", gw.stderr());
    assert!(gw.stderr().contains("loopback"), "{}", gw.stderr());
}

#[test]
fn a_database_from_a_newer_version_exits_78() {
    let setup = Setup::new("127.0.0.1:0", "");
    {
        let (mut gw, _addr, _n) = start_api(&setup);
        gw.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(gw.wait(T).code(), Some(0));
    }
    bump_user_version(&setup.state.join("gateway.db"), 999);
    let mut gw = setup.spawn(&[], &[]);
    assert_eq!(gw.wait(T).code(), Some(78), "{}", gw.stderr());
    assert!(gw.stderr().contains("newer"), "{}", gw.stderr());
}

/// Sets `PRAGMA user_version`, as a newer gateway's migration would.
fn bump_user_version(db: &std::path::Path, v: u32) {
    let c = rusqlite::Connection::open(db).unwrap();
    c.pragma_update(None, "user_version", v).unwrap();
}

#[test]
fn a_user_message_without_content_is_400_naming_it() {
    let setup = Setup::new("127.0.0.1:0", "");
    let (_gw, addr, _n) = start_api(&setup);
    let post = |body: &str| request(addr, "POST", "/v1/chat/completions", &[], body).unwrap();

    for (body, field) in [
        (r#"{"messages": [{"role": "user"}]}"#, "messages[0].content"),
        (
            r#"{"messages": [{"role": "user", "content": null}]}"#,
            "messages[0].content",
        ),
        (
            r#"{"messages": [{"role": "system", "content": "be brief"}, {"role": "user"}]}"#,
            "messages[1].content",
        ),
    ] {
        let r = post(body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let e = r.json();
        assert_eq!(e["error"]["type"], "invalid_request_error", "{}", r.body);
        let message = e["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(&format!("`{field}`")), "{body}: {message}");
    }
    // The same refusal on a session turn, and nothing of it is stored.
    let r = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("X-Hermes-Session-Id", "empty-user")],
        r#"{"messages": [{"role": "user"}]}"#,
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(
        request(addr, "GET", "/v1/sessions/empty-user", &[], "")
            .unwrap()
            .status,
        404
    );
    // An assistant turn that called tools may still come without content.
    let r = post(
        r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}, {"role": "user", "content": "b"}]}"#,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "b");
}

#[test]
fn bad_input_gets_openai_errors() {
    let setup = Setup::new(
        "127.0.0.1:0",
        "[api]\nmax_body = \"1KiB\"\nbody_timeout = \"300ms\"\n",
    );
    let (_gw, addr, _n) = start_api(&setup);
    let post = |body: &str| request(addr, "POST", "/v1/chat/completions", &[], body).unwrap();

    // 400: malformed JSON, wrong shapes, naming the field.
    let r = post("{\"messages\": [");
    assert_eq!(r.status, 400);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("JSON")
    );
    let r = post(r#"{"messages": "hi"}"#);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("messages"), "{}", r.body);
    let r = post(r#"{"messages": [{"role": "wizard", "content": "x"}]}"#);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("messages[0].role"), "{}", r.body);
    // OpenAI's shape: `code` is a string or null, never the HTTP status.
    assert!(r.json()["error"]["code"].is_null(), "{}", r.body);
    let r = post(r#"{"messages": [{"content": "x"}]}"#);
    assert_eq!(r.status, 400);
    assert!(r.body.contains("role"), "{}", r.body);
    let r = post(r#"{"messages": []}"#);
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let r = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("X-Hermes-Session-Id", "has space")],
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let r = request(addr, "POST", "/v1/runs", &[], r#"{"inpt": "x"}"#).unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.contains("inpt"), "{}", r.body);

    // 413: over max_body, by Content-Length and by a chunked body.
    let big = format!(
        r#"{{"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(2000)
    );
    let r = post(&big);
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    let mut c = Conn::open(addr).unwrap();
    c.send(&format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
        big.len()
    ))
    .unwrap();
    assert_eq!(read_any_response(&mut c.r).unwrap().status, 413);

    // 408: a body that does not arrive within body_timeout.
    let mut c = Conn::open(addr).unwrap();
    c.send("POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{\"mess")
        .unwrap();
    let r = read_any_response(&mut c.r).unwrap();
    assert_eq!(r.status, 408, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");

    // 404: unknown run, session, route.
    for path in ["/v1/runs/run_nope", "/v1/sessions/nope", "/v1/nothing"] {
        let r = request(addr, "GET", path, &[], "").unwrap();
        assert_eq!(r.status, 404, "{path}");
        assert!(r.json()["error"]["message"].is_string());
        let code = &r.json()["error"]["code"];
        assert!(code.is_string() || code.is_null(), "{path}: {}", r.body);
    }
    let r = request(addr, "POST", "/v1/runs/run_nope/cancel", &[], "").unwrap();
    assert_eq!(r.status, 404);
    let r = request(addr, "GET", "/v1/runs/run_nope/events", &[], "").unwrap();
    assert_eq!(r.status, 404);

    // 405 in the same shape.
    let r = request(addr, "GET", "/v1/chat/completions", &[], "").unwrap();
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"].is_string());
    assert!(r.json()["error"]["code"].is_null(), "{}", r.body);

    // Still serving.
    assert_eq!(
        post(r#"{"messages":[{"role":"user","content":"ok"}]}"#).status,
        200
    );
}
