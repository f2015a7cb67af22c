//! The Responses API: with the official `openai` client (tests/conformance/, the venv
//! tests/run-all.sh creates) plain and streamed, `previous_response_id` over three turns
//! and a branch, `conversation`, `store`, retrieve, delete, input items, and a retrieve
//! after a restart; with raw HTTP the failures, bad input and the pruning.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const KEY: &str = "responses-test-key-0123";
const AUTH: (&str, &str) = ("Authorization", "Bearer responses-test-key-0123");

/// The agent answers `<messages seen>|<system message or ->|<last message's text>`, or
/// fails when that text is `fail`, or takes 2 s when it is `slow`.
fn config(extra: &str) -> String {
    let code = "import json,sys\n\
        msgs=json.load(sys.stdin)['messages']\n\
        sysm=msgs[0]['content'] if msgs and msgs[0]['role']=='system' else '-'\n\
        last=msgs[-1]['content']\n\
        last=last if isinstance(last,str) else ''.join(p.get('text','') for p in last)\n\
        if last=='fail':\n    sys.stderr.write('agent broke'); sys.exit(2)\n\
        if last=='slow':\n    import time; time.sleep(2)\n\
        print(f'{len(msgs)}|{sysm}|{last}', end='')\n";
    format!(
        "[api]\nkeys = [\"{KEY}\"]\n{extra}[agent]\nbackend = \"command\"\ncommand = [\"python3\", \"-c\", {}]\n",
        Value::from(code)
    )
}

fn create(addr: SocketAddr, body: Value) -> Response {
    request(addr, "POST", "/v1/responses", &[AUTH], &body.to_string()).expect("request")
}

fn venv_python() -> Option<std::path::PathBuf> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/conformance-venv/bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run the Responses conformance test: tests/run-all.sh creates target/conformance-venv"
    );
    eprintln!(
        "SKIP: no venv with the `openai` package at {}; tests/run-all.sh creates it",
        python.display()
    );
    None
}

fn script(python: &Path, addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/openai_responses.py"))
        .arg(format!("http://{addr}/v1"))
        .arg(KEY)
        .args(args)
        .output()
        .expect("run the script");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the Responses checks failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_official_openai_client_uses_the_responses_api_across_a_restart() {
    let Some(python) = venv_python() else { return };
    let setup = Setup::new("127.0.0.1:0", &config(""));
    let (mut gw, addr, _n) = start_api(&setup);
    let out = script(&python, addr, &["main"]);
    assert!(out.contains("responses: all checks passed"), "{out}");
    let keep = out
        .lines()
        .find_map(|l| l.strip_prefix("keep="))
        .expect("a kept response id")
        .to_owned();

    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gw.wait(Duration::from_secs(20)).code(), Some(0));
    let (_gw, addr, _n) = start_api(&setup);
    let out = script(&python, addr, &["restart", &keep]);
    assert!(
        out.contains("responses restart: all checks passed"),
        "{out}"
    );
}

#[test]
fn a_failing_agent_bad_input_and_the_pruning() {
    let setup = Setup::new("127.0.0.1:0", &config("response_retention = \"1s\"\n"));
    let (_gw, addr, _n) = start_api(&setup);

    // Plain: the agent's failure is a 502 error object.
    let r = create(addr, json!({"input": "fail"}));
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("agent broke")
    );

    // Streamed: created … then response.failed, numbered.
    let r = create(addr, json!({"input": "fail", "stream": true}));
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.sse();
    let kinds: Vec<_> = events
        .iter()
        .map(|e| e.0.clone().unwrap_or_default())
        .collect();
    assert_eq!(kinds.first().map(String::as_str), Some("response.created"));
    assert_eq!(
        kinds.last().map(String::as_str),
        Some("response.failed"),
        "{kinds:?}"
    );
    let last: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(last["type"], "response.failed");
    assert_eq!(last["sequence_number"], (events.len() - 1) as u64);
    assert_eq!(last["response"]["status"], "failed");
    assert_eq!(last["response"]["error"]["code"], "agent_error");

    // Bad input: 400 naming the field, OpenAI-shaped.
    for (body, field) in [
        (json!({}), "input"),
        (json!({"input": []}), "input"),
        (json!({"input": 5}), "input"),
        (
            json!({"input": [{"role": "robot", "content": "x"}]}),
            "input[0].role",
        ),
        (
            json!({"input": [{"type": "function_call_output", "role": "user", "content": "x"}]}),
            "input[0].type",
        ),
        (
            json!({"input": "x", "conversation": "has space"}),
            "conversation",
        ),
        (json!({"input": "x", "metadata": {"a": 1}}), "metadata"),
        (json!({"input": "x", "store": "yes"}), "store"),
    ] {
        let r = create(addr, body.clone());
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        let v = r.json();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(field),
            "{body}: {v}"
        );
    }
    let r = request(addr, "POST", "/v1/responses", &[AUTH], "{not json").unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let r = request(
        addr,
        "GET",
        "/v1/responses/resp_x/input_items?order=sideways",
        &[AUTH],
        "",
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let r = request(addr, "GET", "/v1/responses/resp_missing", &[AUTH], "").unwrap();
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"]["code"], "not_found");
    let r = request(addr, "GET", "/v1/responses/x", &[], "").unwrap();
    assert_eq!(r.status, 401);

    // Stored, then pruned after the retention (1 s here; the pruner runs as often).
    let r = create(addr, json!({"input": "short-lived"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-hermes-session-id"), r.json()["id"].as_str());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/responses/{id}");
    assert_eq!(
        request(addr, "GET", &path, &[AUTH], "").unwrap().status,
        200
    );
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let st = request(addr, "GET", &path, &[AUTH], "").unwrap().status;
        if st == 404 {
            break;
        }
        assert!(std::time::Instant::now() < end, "never pruned");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A streamed response's opening events wait a few milliseconds for a quick turn (to go
/// out in one write), never for a slow one: `response.created` comes at once, the rest
/// when the agent is done.
#[test]
fn a_slow_turn_streams_its_opening_events_at_once() {
    use std::io::Read;
    let setup = Setup::new("127.0.0.1:0", &config(""));
    let (_gw, addr, _n) = start_api(&setup);
    let mut c = Conn::open(addr).unwrap();
    let body = json!({"input": "slow", "stream": true}).to_string();
    let sent = std::time::Instant::now();
    c.send(&format!(
        "POST /v1/responses HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
    .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let mut created_at = None;
    while !seen.ends_with(b"0\r\n\r\n") {
        let n = c.r.read(&mut buf).expect("read the stream");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if created_at.is_none() && text.contains("event: response.created") {
            created_at = Some(sent.elapsed());
            assert!(
                !text.contains("response.completed"),
                "the opening came with the end: {text}"
            );
        }
    }
    let done_at = sent.elapsed();
    let created_at = created_at.expect("a response.created event");
    assert!(
        created_at < Duration::from_millis(1000),
        "response.created after {created_at:?}"
    );
    assert!(
        done_at >= Duration::from_millis(1900),
        "the agent takes 2 s, the stream ended after {done_at:?}"
    );
    assert!(String::from_utf8_lossy(&seen).contains("event: response.completed"));
}
