//! The `openai` backend against a stub upstream inside the test: plain, streaming, an
//! upstream 5xx (502 to the client), an upstream that never answers (504 after the idle
//! timeout), an upstream that cannot be reached (502 after the retries).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

/// What the stub saw: (authorization header, request body).
type Seen = Arc<Mutex<Vec<(String, Value)>>>;

/// A chat-completions server: the last user message picks the behaviour.
fn stub_upstream() -> (SocketAddr, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in l.incoming().map_while(Result::ok) {
            let s = s.clone();
            std::thread::spawn(move || serve(conn, &s));
        }
    });
    (addr, seen)
}

fn serve(conn: TcpStream, seen: &Seen) {
    let mut r = BufReader::new(conn);
    let mut auth = String::new();
    let mut session_key = Value::Null;
    let mut len = 0usize;
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    loop {
        let mut h = String::new();
        if r.read_line(&mut h).unwrap_or(0) == 0 {
            return;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            match k.to_ascii_lowercase().as_str() {
                "authorization" => auth = v.trim().to_owned(),
                "x-hermes-session-key" => session_key = Value::from(v.trim()),
                "content-length" => len = v.trim().parse().unwrap_or(0),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; len];
    if r.read_exact(&mut body).is_err() {
        return;
    }
    let mut req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    if let Some(o) = req.as_object_mut() {
        // Not part of the request body: the header, noted for the tests.
        o.insert("seen_session_key".into(), session_key);
    }
    seen.lock().unwrap().push((auth, req.clone()));
    let last = req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_owned();
    let mut w = r.into_inner();
    match last.as_str() {
        "fail" => {
            let b = r#"{"error":{"message":"upstream overloaded","type":"server_error"}}"#;
            let _ = write!(
                w,
                "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            );
        }
        "hang" => std::thread::sleep(Duration::from_secs(5)),
        // As an upstream hermes API server streams: reasoning, tool progress events, text,
        // then a length cut with usage.
        "tools" => {
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            );
            let chunk = |delta: Value, finish: Value| {
                json!({"object": "chat.completion.chunk",
                       "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
            };
            let _ = write!(
                w,
                "data: {}\n\n",
                chunk(json!({"role": "assistant"}), Value::Null)
            );
            let _ = write!(
                w,
                "data: {}\n\n",
                chunk(
                    json!({"reasoning_content": "thinking it over"}),
                    Value::Null
                )
            );
            let _ = write!(
                w,
                "event: hermes.tool.progress\ndata: {}\n\n",
                json!({"tool": "terminal", "emoji": "💻", "label": "ls", "toolCallId": "call_1", "status": "running"})
            );
            let _ = write!(
                w,
                "event: hermes.tool.progress\ndata: {}\n\n",
                json!({"tool": "terminal", "toolCallId": "call_1", "status": "completed"})
            );
            let _ = write!(
                w,
                "data: {}\n\n",
                chunk(json!({"content": "cut sh"}), Value::Null)
            );
            let mut last = chunk(json!({}), Value::from("length"));
            last["usage"] =
                json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15});
            let _ = write!(w, "data: {last}\n\ndata: [DONE]\n\n");
        }
        _ if req["stream"] == true => {
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
            );
            for piece in ["up", "stream ", &last] {
                let chunk = json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]});
                let _ = write!(w, "data: {chunk}\n\n");
                let _ = w.flush();
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = write!(w, "data: [DONE]\n\n");
        }
        _ => {
            let b = json!({
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": format!("upstream says: {last}")}, "finish_reason": "stop"}],
            })
            .to_string();
            let _ = write!(
                w,
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{b}",
                b.len()
            );
        }
    }
}

fn chat(addr: SocketAddr, text: &str, stream: bool) -> Response {
    let body = json!({"model": "whatever", "stream": stream, "temperature": 0.5,
        "messages": [{"role": "user", "content": text}]})
    .to_string();
    request(addr, "POST", "/v1/chat/completions", &[], &body).unwrap()
}

fn gateway_for(upstream: SocketAddr, extra: &str) -> (Setup, Gateway, SocketAddr) {
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!(
            "[agent]\nbackend = \"openai\"\nbase_url = \"http://{upstream}/v1\"\nmodel = \"upstream-model\"\napi_key_env = \"STUB_UPSTREAM_KEY\"\nidle_timeout = \"1s\"\n{extra}"
        ),
    );
    let notify = setup.notify();
    let gw = setup.spawn(
        &[],
        &[
            ("NOTIFY_SOCKET", notify.path.to_str().unwrap()),
            ("STUB_UPSTREAM_KEY", "sk-upstream-secret"),
        ],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let addr = listener_addr(&setup.control, "api");
    (setup, gw, addr)
}

#[test]
fn plain_and_streaming_replies_come_from_the_upstream() {
    let (up, seen) = stub_upstream();
    let (_setup, gw, addr) = gateway_for(up, "");

    let r = chat(addr, "hello", false);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        "upstream says: hello"
    );
    {
        let seen = seen.lock().unwrap();
        let (auth, req) = seen.last().unwrap();
        assert_eq!(auth, "Bearer sk-upstream-secret");
        assert_eq!(req["model"], "upstream-model");
        assert_eq!(req["stream"], false);
        assert_eq!(req["temperature"], 0.5, "parameters pass through");
    }

    let r = chat(addr, "you", true);
    assert_eq!(r.status, 200);
    let events = r.sse();
    let text: String = events
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "upstream you");
    assert_eq!(events.last().unwrap().1, "[DONE]");
    assert_eq!(seen.lock().unwrap().last().unwrap().1["stream"], true);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !gw.stderr().contains("sk-upstream-secret"),
        "the upstream key reached the log"
    );
}

#[test]
fn an_upstream_5xx_is_a_502() {
    let (up, _seen) = stub_upstream();
    let (_setup, _gw, addr) = gateway_for(up, "");
    let r = chat(addr, "fail", false);
    assert_eq!(r.status, 502, "{}", r.body);
    let v = r.json();
    assert_eq!(v["error"]["type"], "upstream_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("upstream overloaded"),
        "{v}"
    );
    // Streaming: the error arrives in a finish chunk (`finish_reason: "error"`, the error
    // object, `hermes.error_code`), then `[DONE]`.
    let r = chat(addr, "fail", true);
    let events = r.sse();
    assert_eq!(events.last().unwrap().1, "[DONE]", "{events:?}");
    let finish: Value = serde_json::from_str(&events[events.len() - 2].1).unwrap();
    assert_eq!(finish["choices"][0]["finish_reason"], "error", "{finish}");
    assert_eq!(finish["hermes"]["error_code"], "agent_error");
    assert!(
        finish["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("upstream overloaded")),
        "{finish}"
    );
}

#[test]
fn an_upstream_that_never_answers_is_a_504_after_the_idle_timeout() {
    let (up, _seen) = stub_upstream();
    let (_setup, _gw, addr) = gateway_for(up, "");
    let started = Instant::now();
    let r = chat(addr, "hang", false);
    assert_eq!(r.status, 504, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "timeout_error");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "{took:?}"
    );
}

#[test]
fn an_unreachable_upstream_is_a_502_after_connect_retries() {
    // A port nobody listens on: connects are refused, and retried (they never reached it).
    let closed = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (_setup, gw, addr) = gateway_for(closed, "retries = 2\n");
    let r = chat(addr, "hello", false);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("reached"), "{}", r.body);
    std::thread::sleep(Duration::from_millis(100));
    assert!(gw.stderr().contains("retry 2/2"), "{}", gw.stderr());
}

#[test]
fn an_upstream_hermes_server_s_tool_progress_reasoning_usage_and_length_pass_through() {
    let (up, seen) = stub_upstream();
    let (_setup, _gw, addr) = gateway_for(up, "");
    let body = json!({"stream": true, "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "tools"}]})
    .to_string();
    let r = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[("X-Hermes-Session-Key", "agent:main:dm:7")],
        &body,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.sse();
    let progress: Vec<Value> = events
        .iter()
        .filter(|(e, _)| e.as_deref() == Some("hermes.tool.progress"))
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(progress.len(), 2, "{}", r.body);
    assert_eq!(progress[0]["toolCallId"], "call_1");
    assert_eq!(progress[0]["status"], "running");
    assert_eq!(progress[0]["label"], "ls", "passed on whole");
    assert_eq!(progress[1]["status"], "completed");
    let chunks: Vec<Value> = events
        .iter()
        .filter(|(e, d)| e.is_none() && d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    assert!(
        chunks
            .iter()
            .any(|c| c["choices"][0]["delta"]["reasoning_content"] == "thinking it over"),
        "{}",
        r.body
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length", "{last}");
    assert_eq!(last["hermes"]["error_code"], "output_truncated");
    assert_eq!(last["hermes"]["partial"], true);
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}),
        "the upstream's counts"
    );
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let req = seen.lock().unwrap().last().unwrap().1.clone();
    assert_eq!(
        req["seen_session_key"], "agent:main:dm:7",
        "the key goes upstream"
    );
    assert!(req.get("stream_options").is_none(), "{req}");
}
