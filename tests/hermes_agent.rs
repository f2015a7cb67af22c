//! hermes-gateway in front of the REAL hermes agent: PyPI `hermes-agent==0.19.0[sms]`
//! (tests/hermes_agent/, in the venv tests/run-all.sh caches at target/hermes-agent-venv)
//! runs `hermes gateway run` with only its API server, on a private port, its model a
//! stub that answers like vLLM (tests/hermes_agent/stub_model.py: the reply says how many
//! user messages it was given and the last one). The gateway's `openai` backend points
//! at it: chat, streaming, a session over three turns, a session key, a run, the
//! Responses API, and a restart of hermes-gateway in the middle of a session.
//!
//! Without the venv the test is skipped, saying why, except under CI=true.

mod common;

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

const KEY: &str = "gateway-side-key-0123456789";
const AUTH: (&str, &str) = ("Authorization", "Bearer gateway-side-key-0123456789");
/// The hermes API server refuses to start without a key of at least 16 characters.
const AGENT_KEY: &str = "hermes-agent-side-key-0123456789";

/// One request on a fresh connection, waiting up to two minutes for the answer: the real
/// agent's first turn after its start is slow, more so on a loaded machine.
fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> std::io::Result<Response> {
    Conn::open_with_timeout(addr, Duration::from_secs(120))?.request(method, path, headers, body)
}

/// A process and its group, killed when dropped.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn spawn_group(cmd: &mut Command) -> Group {
    Group(
        cmd.process_group(0)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn"),
    )
}

fn hermes_bin() -> Option<PathBuf> {
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/hermes-agent-venv");
    let ok = venv.join("bin/hermes").exists()
        && Command::new(venv.join("bin/python"))
            .args(["-c", "import aiohttp, gateway.platforms.api_server"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(venv.join("bin/hermes"));
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run the real-agent test: tests/run-all.sh creates target/hermes-agent-venv"
    );
    eprintln!(
        "SKIP: no venv with hermes-agent[sms] at {}; tests/run-all.sh creates it",
        venv.display()
    );
    None
}

fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn chat(addr: SocketAddr, session: Option<&str>, text: &str, stream: bool) -> Response {
    let mut h = vec![AUTH];
    if let Some(s) = session {
        h.push(("X-Hermes-Session-Id", s));
    }
    let body = json!({"stream": stream, "messages": [{"role": "user", "content": text}]});
    request(addr, "POST", "/v1/chat/completions", &h, &body.to_string()).expect("chat")
}

fn content(r: &Response) -> String {
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[test]
fn the_gateway_in_front_of_the_real_hermes_agent() {
    let Some(hermes) = hermes_bin() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();

    // The model server.
    let port_file = root.join("model.port");
    let _model = spawn_group(
        Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hermes_agent/stub_model.py"))
            .arg(&port_file)
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    let model_port: u16 = wait_for("the stub model server", Duration::from_secs(20), || {
        std::fs::read_to_string(&port_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    });

    // The hermes agent, its API server only, on a private port.
    let home = root.join("hermes");
    std::fs::create_dir_all(home.join("cache")).expect("hermes home");
    std::fs::write(
        home.join("config.yaml"),
        format!(
            "model:\n  default: stub-model\n  provider: custom\n  base_url: http://127.0.0.1:{model_port}/v1\n  api_key: stub-model-key\nsecurity:\n  tirith_enabled: false\n"
        ),
    )
    .expect("config.yaml");
    // Model metadata it would otherwise fetch from a hosted catalogue at its first turn.
    std::fs::write(
        home.join("cache/openrouter_model_metadata.json"),
        r#"{"stub-model": {"context_length": 131072}}"#,
    )
    .expect("metadata cache");
    let agent_port = free_port();
    let agent_log = root.join("hermes.log");
    let log = std::fs::File::create(&agent_log).expect("log");
    let _agent = spawn_group(
        Command::new(&hermes)
            .args(["gateway", "run"])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", root.join("home"))
            .env("HERMES_HOME", &home)
            .env("API_SERVER_ENABLED", "true")
            .env("API_SERVER_KEY", AGENT_KEY)
            .env("API_SERVER_HOST", "127.0.0.1")
            .env("API_SERVER_PORT", agent_port.to_string())
            .env("HERMES_GATEWAY_MAX_STARTS", "0")
            .stdout(log.try_clone().expect("log"))
            .stderr(log),
    );
    let agent_addr = SocketAddr::from(([127, 0, 0, 1], agent_port));
    wait_for(
        "the hermes API server to answer /health",
        Duration::from_secs(120),
        || {
            get(agent_addr, "/health")
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| ())
        },
    );
    let agent_log_text = || std::fs::read_to_string(&agent_log).unwrap_or_default();

    // hermes-gateway in front of it.
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!(
            "[api]\nkeys = [\"{KEY}\"]\n[agent]\nbackend = \"openai\"\nmodel = \"hermes-agent\"\nbase_url = \"http://127.0.0.1:{agent_port}/v1\"\napi_key_file = \"{}\"\nidle_timeout = \"120s\"\nretries = 0\n",
            root.join("agent.key").display()
        ),
    );
    std::fs::write(root.join("agent.key"), AGENT_KEY).expect("key file");
    let (mut gw, addr, _n) = start_api(&setup);

    // Plain: its first turn after start takes a while.
    let r = chat(addr, None, "hello agent", false);
    assert_eq!(
        content(&r),
        "user messages: 1; last: hello agent",
        "{}",
        agent_log_text()
    );

    // Streamed: the role first, the text in pieces, `stop`, `[DONE]`.
    let r = chat(addr, None, "stream please", true);
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.sse();
    assert_eq!(events.last().map(|e| e.1.as_str()), Some("[DONE]"));
    let chunks: Vec<Value> = events
        .iter()
        .filter(|(e, d)| e.is_none() && d != "[DONE]")
        .filter_map(|(_, d)| serde_json::from_str(d).ok())
        .collect();
    assert_eq!(
        chunks[0]["choices"][0]["delta"],
        json!({"role": "assistant"})
    );
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text, "user messages: 1; last: stream please");
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    // A session over three turns: the agent sees the whole history, kept here.
    for (i, word) in ["one", "two", "three"].iter().enumerate() {
        let mut h = vec![AUTH, ("X-Hermes-Session-Id", "real-agent-session")];
        if i == 0 {
            h.push(("X-Hermes-Session-Key", "agent:main:test:dm:user-1"));
        }
        let body = json!({"messages": [{"role": "user", "content": word}]}).to_string();
        let r = request(addr, "POST", "/v1/chat/completions", &h, &body).unwrap();
        assert_eq!(
            content(&r),
            format!("user messages: {}; last: {word}", i + 1),
            "{}",
            agent_log_text()
        );
    }

    // A durable run.
    let r = request(
        addr,
        "POST",
        "/v1/runs",
        &[AUTH],
        r#"{"input":"a run","session_id":"real-agent-run"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    let id = r.json()["run_id"].as_str().unwrap().to_owned();
    let run = wait_for("the run to finish", Duration::from_secs(60), || {
        let v = request(addr, "GET", &format!("/v1/runs/{id}"), &[AUTH], "")
            .ok()?
            .json();
        (v["status"] == "completed" || v["status"] == "failed").then_some(v)
    });
    assert_eq!(run["status"], "completed", "{run}");
    assert_eq!(run["output"], "user messages: 1; last: a run");

    // The Responses API, continued once.
    let r = request(
        addr,
        "POST",
        "/v1/responses",
        &[AUTH],
        r#"{"input":"resp one"}"#,
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let first = r.json();
    assert_eq!(
        first["output"][0]["content"][0]["text"],
        "user messages: 1; last: resp one"
    );
    let body = json!({"input": "resp two", "previous_response_id": first["id"]}).to_string();
    let r = request(addr, "POST", "/v1/responses", &[AUTH], &body).unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["output"][0]["content"][0]["text"],
        "user messages: 2; last: resp two"
    );

    // hermes-gateway restarts in the middle of the session: the history is still there.
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(gw.wait(Duration::from_secs(30)).code(), Some(0));
    let (_gw, addr, _n) = start_api(&setup);
    let r = chat(addr, Some("real-agent-session"), "four", false);
    assert_eq!(content(&r), "user messages: 4; last: four");
    let s = request(addr, "GET", "/v1/sessions/real-agent-session", &[AUTH], "").unwrap();
    assert_eq!(s.json()["messages"].as_array().map(Vec::len), Some(8));
}
