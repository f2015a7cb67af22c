//! The platforms' own signatures for the tests: `tests/platforms/sign.py` in the venv at
//! `target/platforms-venv` (tests/run-all.sh creates it from tests/platforms/requirements.txt),
//! kept running and asked one line at a time. Without the venv a test is skipped, saying
//! why — except under CI=true, where a missing venv is a failure.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Mutex;

use serde_json::{Value, json};

pub struct Signer {
    child: Child,
    io: Mutex<(ChildStdin, BufReader<ChildStdout>)>,
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The venv's python, if it has `module`; otherwise `None` after saying why (and a panic
/// under CI=true).
pub fn python_with(module: &str) -> Option<PathBuf> {
    let python = root().join("target/platforms-venv/bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", &format!("import {module}")])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run this test: create the venv with `python3 -m venv target/platforms-venv && target/platforms-venv/bin/pip install -r tests/platforms/requirements.txt` (tests/run-all.sh does)"
    );
    eprintln!(
        "SKIP: no Python venv with {module} at {}; tests/run-all.sh creates it",
        python.display()
    );
    None
}

impl Signer {
    /// `platform`: `slack` (slack_sdk) or `whatsapp` (checked by pywa). `None`: skipped.
    pub fn start(platform: &str, secret: &str) -> Option<Signer> {
        let module = match platform {
            "slack" => "slack_sdk",
            _ => "pywa",
        };
        let python = python_with(module)?;
        let mut child = Command::new(python)
            .arg(root().join("tests/platforms/sign.py"))
            .args([platform, secret])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start sign.py");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        Some(Signer {
            child,
            io: Mutex::new((stdin, stdout)),
        })
    }

    /// The signature of `body` (at `timestamp`, for Slack).
    pub fn sign(&self, timestamp: &str, body: &str) -> String {
        let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
        let line = json!({"body": body, "timestamp": timestamp}).to_string();
        writeln!(io.0, "{line}").expect("write to sign.py");
        io.0.flush().expect("flush sign.py");
        let mut answer = String::new();
        io.1.read_line(&mut answer).expect("read from sign.py");
        let v: Value = serde_json::from_str(&answer).expect("sign.py answers JSON");
        v["signature"].as_str().expect("a signature").to_owned()
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
