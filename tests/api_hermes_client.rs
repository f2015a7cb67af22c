//! hermes-gateway with the upstream hermes API server's own client, PyPI
//! `hermes-agent-api-client` (tests/hermes_client/): capabilities, streams with session id
//! and key, a 256-character id, an agent that fails, an agent silent for 50 s (longer than
//! the client's 45 s read timeout), and a stream open at SIGTERM — each ends in the
//! client's typed terminal event, never a protocol error.
//!
//! The client needs Python >= 3.13; tests/run-all.sh makes `target/hermes-client-venv`
//! with one. Without it the tests are skipped, saying why, except under CI=true.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::Value;

const KEY: &str = "hermes-client-test-key-0123";

fn config(extra: &str) -> String {
    let code = "import json,sys,time\n\
        turn=json.load(sys.stdin)\n\
        msgs=turn['messages']\n\
        last=msgs[-1]['content']\n\
        if last=='silent':\n    time.sleep(50); print('woke up', end='')\n\
        elif last=='fail':\n    print('part', end='', flush=True); sys.exit(1)\n\
        elif last=='hang':\n    print('begun ', end='', flush=True); time.sleep(60)\n\
        else:\n    print(f\"{len(msgs)}|{turn.get('session_key')}|{last}\", end='')\n";
    format!(
        "{extra}[api]\nkeys = [\"{KEY}\"]\n[agent]\nbackend = \"command\"\ncommand = [\"python3\", \"-c\", {}]\n",
        Value::from(code)
    )
}

fn client_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/hermes-client-venv/bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", "import hermes_agent_api_client"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run the hermes client test: tests/run-all.sh creates target/hermes-client-venv with Python >= 3.13"
    );
    eprintln!(
        "SKIP: no venv with hermes-agent-api-client at {} (needs Python >= 3.13); tests/run-all.sh creates it",
        python.display()
    );
    None
}

fn checks(python: &Path, base: &str, phase: &str) -> Command {
    let mut c = Command::new(python);
    c.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/hermes_client/checks.py"))
        .arg(base)
        .arg(KEY)
        .arg(phase);
    c
}

#[test]
fn the_upstream_client_gets_typed_terminal_events_for_every_stream() {
    let Some(python) = client_python() else {
        return;
    };
    let setup = Setup::new("127.0.0.1:0", &config(""));
    let (_gw, addr, _n) = start_api(&setup);
    let out = checks(&python, &format!("http://{addr}"), "main")
        .output()
        .expect("run the client checks");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the upstream client's checks failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("hermes client: all checks passed"),
        "{stdout}"
    );
    eprintln!("{stdout}");
}

#[test]
fn a_stream_open_at_sigterm_ends_in_the_client_s_typed_terminal_event() {
    let Some(python) = client_python() else {
        return;
    };
    let setup = Setup::new(
        "127.0.0.1:0",
        &config("[gateway]\ndrain_timeout = \"2s\"\n"),
    );
    let (gw, addr, _n) = start_api(&setup);
    let mut child = checks(&python, &format!("http://{addr}"), "sigterm")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the client checks");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(first, "STREAMING", "the stream never started");
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("wait");
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut err);
    }
    assert!(status.success(), "{status}: {rest:?}\n{err}");
    assert!(
        rest.iter().any(|l| l.contains("all checks passed")),
        "{rest:?}\n{err}"
    );
}
