//! Durable runs (`/v1/runs`), their events, idempotency and cancel, and the `command`
//! backend's failures, against the real binary.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(20);

/// A `command` agent written in Python: `script` gets `msgs` (the messages).
fn py_agent(script: &str, extra: &str) -> String {
    let code = format!(
        "import json,sys,time,os,subprocess\nmsgs=json.load(sys.stdin)['messages']\n{script}\n"
    );
    format!(
        "[agent]\nbackend = \"command\"\ncommand = [\"python3\", \"-c\", {}]\n{extra}",
        Value::from(code)
    )
}

fn create_run(addr: SocketAddr, body: &str, key: Option<&str>) -> Response {
    let mut h = Vec::new();
    if let Some(k) = key {
        h.push(("Idempotency-Key", k));
    }
    request(addr, "POST", "/v1/runs", &h, body).expect("POST /v1/runs")
}

fn wait_status(addr: SocketAddr, id: &str, want: &str) -> Value {
    let end = Instant::now() + T;
    loop {
        let r = request(addr, "GET", &format!("/v1/runs/{id}"), &[], "").unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        let v = r.json();
        if v["status"] == want {
            return v;
        }
        assert!(Instant::now() < end, "run {id} never became {want}: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn event_types(r: &Response) -> Vec<String> {
    r.sse().into_iter().filter_map(|(e, _)| e).collect()
}

#[test]
fn a_run_streams_its_events_and_a_late_subscriber_gets_them_all() {
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent(
            "for w in ['one ', 'two ', 'three']:\n    print(w, end='', flush=True)\n    time.sleep(0.3)",
            "",
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let r = create_run(addr, r#"{"input": "count", "session_id": "runs-1"}"#, None);
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["run_id"].as_str().unwrap().to_owned();

    // An early subscriber follows the run live to its end.
    let early = std::thread::spawn({
        let id = id.clone();
        move || request(addr, "GET", &format!("/v1/runs/{id}/events"), &[], "").unwrap()
    });
    let done = wait_status(addr, &id, "completed");
    assert_eq!(done["output"], "one two three");
    assert_eq!(done["session_id"], "runs-1");
    let early = early.join().unwrap();
    let types = event_types(&early);
    assert_eq!(
        types.first().map(String::as_str),
        Some("run.queued"),
        "{types:?}"
    );
    assert_eq!(
        types.last().map(String::as_str),
        Some("run.completed"),
        "{types:?}"
    );
    assert!(
        types.iter().filter(|t| *t == "message.delta").count() >= 2,
        "{types:?}"
    );

    // A late subscriber (after the end) gets the same events from the store.
    let late = request(addr, "GET", &format!("/v1/runs/{id}/events"), &[], "").unwrap();
    assert_eq!(late.sse(), early.sse());
    // Last-Event-ID resumes after that event.
    let resumed = request(
        addr,
        "GET",
        &format!("/v1/runs/{id}/events"),
        &[("Last-Event-ID", "2")],
        "",
    )
    .unwrap();
    assert_eq!(resumed.sse().len(), early.sse().len() - 2);

    // The turn is part of the session's history.
    let s = request(addr, "GET", "/v1/sessions/runs-1", &[], "")
        .unwrap()
        .json();
    assert_eq!(s["messages"][1]["content"], "one two three");
}

#[test]
fn idempotency_keys_hold_across_a_restart() {
    let setup = Setup::new("127.0.0.1:0", "");
    let body = r#"{"input": "once", "session_id": "idem"}"#;
    let id = {
        let (mut gw, addr, _n) = start_api(&setup);
        let first = create_run(addr, body, Some("key-1"));
        assert_eq!(first.status, 202, "{}", first.body);
        let id = first.json()["run_id"].as_str().unwrap().to_owned();
        let again = create_run(addr, body, Some("key-1"));
        assert_eq!(again.status, 202);
        assert_eq!(again.json()["run_id"], id.as_str());
        let other = create_run(
            addr,
            r#"{"input": "twice", "session_id": "idem"}"#,
            Some("key-1"),
        );
        assert_eq!(other.status, 409, "{}", other.body);
        assert_eq!(other.json()["error"]["type"], "invalid_request_error");
        wait_status(addr, &id, "completed");
        gw.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(gw.wait(T).code(), Some(0));
        id
    };
    let (_gw, addr, _n) = start_api(&setup);
    let again = create_run(addr, body, Some("key-1"));
    assert_eq!(again.status, 202);
    assert_eq!(again.json()["run_id"], id.as_str());
    // Key order in the body does not make it another request.
    let reordered = create_run(
        addr,
        r#"{"session_id": "idem", "input": "once"}"#,
        Some("key-1"),
    );
    assert_eq!(reordered.json()["run_id"], id.as_str());
    // It ran once: one user message and one reply in the session.
    let s = request(addr, "GET", "/v1/sessions/idem", &[], "")
        .unwrap()
        .json();
    assert_eq!(s["messages"].as_array().unwrap().len(), 2);
}

fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie waiting for a reaper is dead for our purpose.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

fn read_pid(path: &std::path::Path) -> i32 {
    let end = Instant::now() + T;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && let Ok(p) = s.trim().parse()
        {
            return p;
        }
        assert!(
            Instant::now() < end,
            "the agent never wrote {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_dead(pid: i32) {
    let end = Instant::now() + Duration::from_secs(5);
    while alive(pid) {
        assert!(
            Instant::now() < end,
            "process {pid} of the agent's group survived"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn cancel_stops_a_running_run_and_kills_its_process_group() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent(
            &format!(
                "p = subprocess.Popen(['sleep', '60'])\nopen({}, 'w').write(str(p.pid))\np.wait()",
                Value::from(pidfile.display().to_string())
            ),
            "",
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let id = create_run(addr, r#"{"input": "sleep"}"#, None).json()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let grandchild = read_pid(&pidfile);
    let r = request(addr, "POST", &format!("/v1/runs/{id}/cancel"), &[], "").unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["status"], "cancelled");
    wait_dead(grandchild);
    let ev = request(addr, "GET", &format!("/v1/runs/{id}/events"), &[], "").unwrap();
    assert_eq!(
        event_types(&ev).last().map(String::as_str),
        Some("run.cancelled")
    );
}

#[test]
fn a_failing_command_fails_the_turn_with_its_stderr() {
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent("sys.stderr.write('model exploded\\n')\nsys.exit(3)", ""),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let r = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    )
    .unwrap();
    assert_eq!(r.status, 502, "{}", r.body);
    let msg = r.json()["error"]["message"].as_str().unwrap().to_owned();
    assert!(msg.contains("model exploded") && msg.contains('3'), "{msg}");

    let id = create_run(addr, r#"{"input": "x"}"#, None).json()["run_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let v = wait_status(addr, &id, "failed");
    assert!(
        v["error"].as_str().unwrap().contains("model exploded"),
        "{v}"
    );
}

#[test]
fn a_command_past_its_timeout_is_killed_and_answers_504() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("grandchild.pid");
    let setup = Setup::new(
        "127.0.0.1:0",
        &py_agent(
            &format!(
                "p = subprocess.Popen(['sleep', '60'])\nopen({}, 'w').write(str(p.pid))\np.wait()",
                Value::from(pidfile.display().to_string())
            ),
            "timeout = \"1s\"\n",
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let started = Instant::now();
    let r = request(
        addr,
        "POST",
        "/v1/chat/completions",
        &[],
        r#"{"messages":[{"role":"user","content":"x"}]}"#,
    )
    .unwrap();
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(started.elapsed() < Duration::from_secs(10));
    wait_dead(read_pid(&pidfile));
}
