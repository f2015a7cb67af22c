//! Conformance with the official `openai` Python client (tests/conformance/): models,
//! plain and streaming chat completions, a session kept with the header, typed errors.
//!
//! The client lives in a venv at `target/conformance-venv` (tests/run-all.sh creates it
//! from tests/conformance/requirements.txt). Without it the test is skipped, saying why,
//! except under CI=true, where a missing venv is a failure.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

#[test]
fn the_official_openai_client_speaks_to_the_gateway() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/conformance-venv/bin/python");
    let has_openai = python.exists()
        && Command::new(&python)
            .args(["-c", "import openai"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !has_openai {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run the conformance test: create the venv with `python3 -m venv target/conformance-venv && target/conformance-venv/bin/pip install -r tests/conformance/requirements.txt` (tests/run-all.sh does)"
        );
        eprintln!(
            "SKIP: no Python venv with the `openai` package at {}; tests/run-all.sh creates it (python3 -m venv, pip install -r tests/conformance/requirements.txt)",
            python.display()
        );
        return;
    }
    let setup = Setup::new("127.0.0.1:0", "[api]\nkeys = [\"conformance-key\"]\n");
    let (_gw, addr, _n) = start_api(&setup);
    let out = Command::new(&python)
        .arg(root.join("tests/conformance/openai_client.py"))
        .arg(format!("http://{addr}/v1"))
        .arg("conformance-key")
        .output()
        .expect("run the conformance script");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "conformance failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
