//! A `command` agent that misbehaves ends its turn with a clear error and leaves nothing
//! behind: one that writes without end (bounded by `[agent] max_reply`), one that never
//! exits (`[agent] timeout`), one whose children outlive it holding its stdout, and one
//! that writes invalid UTF-8.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

fn chat(addr: SocketAddr) -> Response {
    let body = serde_json::json!({
        "model": "hermes-agent",
        "messages": [{"role": "user", "content": "go"}],
    })
    .to_string();
    request(addr, "POST", "/v1/chat/completions", &[], &body).expect("chat request")
}

/// `[agent]` with `argv` (a marker argument lets the test find its processes).
fn agent(argv: &[&str], extra: &str) -> String {
    format!(
        "[agent]\nbackend = \"command\"\ncommand = {}\n{extra}\n",
        serde_json::to_string(argv).unwrap()
    )
}

/// Processes whose command line contains `marker`.
fn alive(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(c) = std::fs::read(e.path().join("cmdline"))
            && String::from_utf8_lossy(&c).contains(marker)
        {
            found.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    found
}

fn none_left(marker: &str) {
    let end = Instant::now() + Duration::from_secs(5);
    while !alive(marker).is_empty() {
        assert!(Instant::now() < end, "left behind: {:?}", alive(marker));
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_agent_that_writes_without_end_is_stopped_at_max_reply() {
    let marker = "hermes-endless-writer";
    let setup = Setup::new(
        "127.0.0.1:0",
        &agent(
            &[
                "python3",
                "-c",
                "import sys\nwhile True: sys.stdout.write('x' * 65536)",
                marker,
            ],
            "max_reply = \"256KiB\"",
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let t = Instant::now();
    let r = chat(addr);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("max_reply"), "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(5));
    none_left(marker);
}

#[test]
fn an_agent_that_never_exits_times_out_and_is_killed() {
    let marker = "hermes-never-exits";
    let setup = Setup::new(
        "127.0.0.1:0",
        &agent(
            &["bash", "-c", "exec -a hermes-never-exits sleep 300", marker],
            "timeout = \"1s\"",
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let t = Instant::now();
    let r = chat(addr);
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(t.elapsed() < Duration::from_secs(5));
    none_left(marker);
}

#[test]
fn children_that_outlive_the_agent_do_not_hold_the_turn() {
    let marker = "hermes-orphan-child";
    let setup = Setup::new(
        "127.0.0.1:0",
        &agent(
            &[
                "bash",
                "-c",
                "(exec -a hermes-orphan-child sleep 60) & printf quick",
                marker,
            ],
            "",
        ),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let t = Instant::now();
    let r = chat(addr);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "quick");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    none_left(marker);
}

#[test]
fn invalid_utf8_ends_the_turn_with_a_clear_error() {
    let setup = Setup::new(
        "127.0.0.1:0",
        &agent(&["sh", "-c", "printf 'ok \\377\\376 then more'"], ""),
    );
    let (_gw, addr, _n) = start_api(&setup);
    let r = chat(addr);
    assert_eq!(r.status, 502, "{}", r.body);
    assert!(r.body.contains("invalid UTF-8 at byte 3"), "{}", r.body);
}
