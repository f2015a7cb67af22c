//! What clients of the upstream hermes API server rely on, against the real binary with
//! raw HTTP: `/v1/capabilities`, authentication before routing, `/health/detailed`,
//! `/v1/runs/{id}/stop`, 256-character session ids and keys, `X-Hermes-Session-Key` kept,
//! passed to the agent and echoed, and the shape of chat completion streams (role-only
//! first chunk, `: keepalive`, usage, the finish chunk of a failed or cut turn).

mod common;
mod telegram_support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const KEY: &str = "dropin-test-key-0123456789";
const AUTH: (&str, &str) = ("Authorization", "Bearer dropin-test-key-0123456789");

/// A `command` agent written in Python: `script` gets `turn` (the JSON on stdin), `msgs`.
fn py_agent(script: &str) -> String {
    py_agent_with("", script)
}

/// [`py_agent`] with more `[api]` lines.
fn py_agent_with(api: &str, script: &str) -> String {
    let code = format!(
        "import json,sys,time,os\nturn=json.load(sys.stdin)\nmsgs=turn['messages']\n{script}\n"
    );
    format!(
        "[api]\nkeys = [\"{KEY}\"]\n{api}[agent]\nbackend = \"command\"\ncommand = [\"python3\", \"-c\", {}]\n",
        Value::from(code)
    )
}

fn chat(addr: SocketAddr, headers: &[(&str, &str)], body: Value) -> Response {
    let mut h = vec![AUTH];
    h.extend_from_slice(headers);
    request(addr, "POST", "/v1/chat/completions", &h, &body.to_string()).expect("chat request")
}

fn chunks(r: &Response) -> Vec<Value> {
    r.sse()
        .into_iter()
        .filter(|(e, d)| e.is_none() && d != "[DONE]")
        .map(|(_, d)| serde_json::from_str(&d).unwrap_or_else(|e| panic!("{e}: {d}")))
        .collect()
}

#[test]
fn capabilities_and_detailed_health_are_served_behind_the_key() {
    let setup = Setup::new("127.0.0.1:0", &format!("[api]\nkeys = [\"{KEY}\"]\n"));
    let (_gw, addr, _n) = start_api(&setup);

    let c = request(addr, "GET", "/v1/capabilities", &[AUTH], "").unwrap();
    assert_eq!(c.status, 200, "{}", c.body);
    let v = c.json();
    assert_eq!(v["object"], "hermes.api_server.capabilities");
    assert_eq!(v["platform"], "hermes-agent");
    assert_eq!(v["model"], "hermes-agent");
    assert_eq!(v["auth"], json!({"type": "bearer", "required": true}));
    assert_eq!(v["features"]["chat_completions"], true);
    assert_eq!(v["features"]["chat_completions_streaming"], true);
    assert_eq!(v["features"]["responses_api"], true);
    assert_eq!(v["features"]["run_stop"], true);
    // Not served here, so not advertised.
    assert_eq!(v["features"]["session_fork"], false);
    assert_eq!(
        v["features"]["tool_progress_events"], false,
        "echo has none"
    );
    assert_eq!(v["endpoints"]["run_stop"]["path"], "/v1/runs/{run_id}/stop");

    // Authentication comes before routing: an unknown /v1 path with a wrong key is 401.
    for (path, method) in [
        ("/v1/capabilities", "GET"),
        ("/v1/no-such-route", "GET"),
        ("/v1/runs/x/nothing", "POST"),
        ("/v1", "GET"),
        ("/health/detailed", "GET"),
    ] {
        for h in [vec![], vec![("Authorization", "Bearer wrong")]] {
            let r = request(addr, method, path, &h, "").unwrap();
            assert_eq!(r.status, 401, "{method} {path} {h:?}: {}", r.body);
            assert_eq!(r.json()["error"]["code"], "invalid_api_key");
        }
    }
    let r = request(addr, "GET", "/v1/no-such-route", &[AUTH], "").unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert!(r.json()["error"]["message"].is_string());
    // Outside /v1, plain health stays open.
    assert_eq!(
        request(addr, "GET", "/health", &[], "").unwrap().status,
        200
    );

    let h = request(addr, "GET", "/health/detailed", &[AUTH], "").unwrap();
    assert_eq!(h.status, 200, "{}", h.body);
    let v = h.json();
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["store"]["status"], "ok");
    assert_eq!(v["agent"]["status"], "ok");
    assert_eq!(v["agent"]["backend"], "echo");
    assert_eq!(v["listeners"][0]["name"], "api");
    assert_eq!(v["listeners"][0]["status"], "ok");
    assert_eq!(v["platforms"], json!({}));
}

#[test]
fn detailed_health_reports_each_chat_platform_without_failing_on_one() {
    let stub = telegram_support::Stub::start();
    let closed = free_port();
    let cfg = format!(
        "{}[[platforms.telegram]]\nname = \"down\"\ntoken = \"{}\"\napi_base = \"http://127.0.0.1:{closed}\"\nallow_all = true\n",
        telegram_support::telegram_config(&stub, "allow_all = true\npoll_timeout = \"1s\""),
        telegram_support::TOKEN
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let (_gw, addr, _n) = start_api(&setup);
    let end = Instant::now() + Duration::from_secs(20);
    let v = loop {
        let h = request(addr, "GET", "/health/detailed", &[], "").unwrap();
        assert_eq!(
            h.status, 200,
            "a platform's trouble is not the gateway's: {}",
            h.body
        );
        let v = h.json();
        if v["platforms"]["telegram:main"]["status"] == "ok"
            && v["platforms"]["telegram:main"]["last_ok_unix_ms"].is_i64()
            && v["platforms"]["telegram:down"]["status"] == "error"
        {
            break v;
        }
        assert!(Instant::now() < end, "platforms never reported: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(v["status"], "ok", "{v}");
    assert_eq!(v["platforms"]["telegram:main"]["backlog"], 0, "{v}");
    assert_eq!(v["platforms"]["telegram:main"]["mode"], "polling", "{v}");
    let why = v["platforms"]["telegram:down"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(!why.is_empty(), "the error says why: {v}");
    assert!(
        !v.to_string().contains(telegram_support::TOKEN),
        "the bot token never appears: {v}"
    );
}

#[test]
fn detailed_health_names_an_agent_backend_that_cannot_work() {
    let setup = Setup::new(
        "127.0.0.1:0",
        "[agent]\nbackend = \"command\"\ncommand = [\"/nonexistent/agent-program\"]\n",
    );
    let (_gw, addr, _n) = start_api(&setup);
    let h = request(addr, "GET", "/health/detailed", &[], "").unwrap();
    assert_eq!(h.status, 503, "{}", h.body);
    let v = h.json();
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["store"]["status"], "ok");
    assert_eq!(v["agent"]["status"], "error");
    assert!(
        v["agent"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("/nonexistent/agent-program")),
        "{v}"
    );
}

#[test]
fn runs_stop_as_the_upstream_names_it() {
    let setup = Setup::new("127.0.0.1:0", &py_agent("time.sleep(30)"));
    let (_gw, addr, _n) = start_api(&setup);
    let r = request(addr, "POST", "/v1/runs", &[AUTH], r#"{"input":"wait"}"#).unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["run_id"].as_str().unwrap().to_owned();
    let end = Instant::now() + Duration::from_secs(20);
    while request(addr, "GET", &format!("/v1/runs/{id}"), &[AUTH], "")
        .unwrap()
        .json()["status"]
        != "running"
    {
        assert!(Instant::now() < end, "the run never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = request(addr, "POST", &format!("/v1/runs/{id}/stop"), &[AUTH], "").unwrap();
    assert_eq!(s.status, 200, "{}", s.body);
    assert_eq!(s.json()["status"], "cancelled");
    let missing = request(addr, "POST", "/v1/runs/run_nope/stop", &[AUTH], "").unwrap();
    assert_eq!(missing.status, 404);
}

#[test]
fn session_ids_and_keys_of_256_characters_and_the_key_kept_passed_and_echoed() {
    // The agent answers with the key it was given (JSON and environment) and the number
    // of messages it saw.
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent(
            "print(f\"{turn.get('session_key')}|{os.environ.get('HERMES_SESSION_KEY')}|{len(msgs)}\", end='')",
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let id = "i".repeat(256);
    let key = format!("agent:main:{}", "k".repeat(245));
    assert_eq!(key.len(), 256);
    let body = |t: &str| json!({"messages": [{"role": "user", "content": t}]});

    let r = chat(
        addr,
        &[("X-Hermes-Session-Id", &id), ("X-Hermes-Session-Key", &key)],
        body("one"),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-hermes-session-id"), Some(id.as_str()));
    assert_eq!(r.header("x-hermes-session-key"), Some(key.as_str()));
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        format!("{key}|{key}|1")
    );
    // Kept with the session: a turn without the header passes it on.
    let r = chat(addr, &[("X-Hermes-Session-Id", &id)], body("two"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["choices"][0]["message"]["content"],
        format!("{key}|{key}|3")
    );
    assert_eq!(r.header("x-hermes-session-key"), None);
    // Streamed too, and the echo headers come with the stream.
    let r = chat(
        addr,
        &[
            ("X-Hermes-Session-Id", &id),
            ("X-Hermes-Session-Key", "other-key"),
        ],
        json!({"stream": true, "messages": [{"role": "user", "content": "three"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-hermes-session-id"), Some(id.as_str()));
    assert_eq!(r.header("x-hermes-session-key"), Some("other-key"));
    let text: String = chunks(&r)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert_eq!(text, "other-key|other-key|5");

    // 257 characters, spaces and non-ASCII are refused, naming the header.
    let long = "i".repeat(257);
    for (h, v) in [
        ("X-Hermes-Session-Id", long.as_str()),
        ("X-Hermes-Session-Key", long.as_str()),
        ("X-Hermes-Session-Key", "has space"),
    ] {
        let r = chat(addr, &[(h, v)], body("x"));
        assert_eq!(r.status, 400, "{h}: {}", r.body);
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| m.to_lowercase().contains(&h.to_lowercase())),
            "{}",
            r.body
        );
    }
}

#[test]
fn a_stream_starts_with_the_role_alone_and_ends_with_usage_when_asked() {
    let setup = Setup::new("127.0.0.1:0", &format!("[api]\nkeys = [\"{KEY}\"]\n"));
    let (_gw, addr, _n) = start_api(&setup);
    let r = chat(
        addr,
        &[],
        json!({"stream": true, "stream_options": {"include_usage": true},
               "messages": [{"role": "user", "content": "counted"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.ends_with("data: [DONE]\n\n"), "{}", r.body);
    let c = chunks(&r);
    assert_eq!(c[0]["choices"][0]["delta"], json!({"role": "assistant"}));
    let last = c.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["choices"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        last["usage"],
        json!({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
    );
    assert!(last.get("hermes").is_none(), "{last}");
    // Without the option, no usage.
    let r = chat(
        addr,
        &[],
        json!({"stream": true, "messages": [{"role": "user", "content": "x"}]}),
    );
    assert!(chunks(&r).last().unwrap().get("usage").is_none());
}

#[test]
fn a_silent_agent_gets_keepalive_comments_and_a_failing_one_a_typed_finish() {
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent_with(
            "keepalive = \"300ms\"\n",
            "t=msgs[-1]['content']\n\
             print('part ', end='', flush=True)\n\
             time.sleep(1.2)\n\
             if t == 'fail':\n    sys.stderr.write('boom'); sys.exit(3)\n\
             print('done', end='')",
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let r = chat(
        addr,
        &[],
        json!({"stream": true, "messages": [{"role": "user", "content": "ok"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let keepalives = r.body.matches(": keepalive\n\n").count();
    assert!(keepalives >= 2, "{}", r.body);
    let done = r.body.find("data: [DONE]").expect("[DONE]");
    assert!(
        !r.body[done..].contains("keepalive"),
        "no keepalive after [DONE]: {}",
        r.body
    );
    assert_eq!(
        chunks(&r).last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    let r = chat(
        addr,
        &[],
        json!({"stream": true, "messages": [{"role": "user", "content": "fail"}]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.ends_with("data: [DONE]\n\n"), "{}", r.body);
    let last = chunks(&r).last().cloned().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "error", "{last}");
    assert_eq!(last["hermes"]["completed"], false);
    assert_eq!(last["hermes"]["failed"], true);
    assert_eq!(last["hermes"]["partial"], true, "`part ` was sent");
    assert_eq!(last["hermes"]["error_code"], "agent_error");
    assert!(
        last["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("boom")),
        "{last}"
    );
}

#[test]
fn a_stream_open_at_the_drain_deadline_ends_with_gateway_restarting() {
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!(
            "[gateway]\ndrain_timeout = \"1s\"\n{}",
            py_agent("print('begun ', end='', flush=True)\ntime.sleep(30)")
        ),
    );
    let (gw, addr, _n) = start_api(&setup);
    let stream = std::thread::spawn(move || {
        chat(
            addr,
            &[],
            json!({"stream": true, "messages": [{"role": "user", "content": "long"}]}),
        )
    });
    std::thread::sleep(Duration::from_millis(800));
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let r = stream.join().unwrap();
    assert!(r.body.ends_with("data: [DONE]\n\n"), "{}", r.body);
    let last = chunks(&r).last().cloned().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "error", "{last}");
    assert_eq!(last["hermes"]["error_code"], "gateway_restarting");
    assert_eq!(last["hermes"]["failed"], true);
    assert_eq!(last["hermes"]["partial"], true);
    assert_eq!(last["error"]["type"], "gateway_restarting");
}
