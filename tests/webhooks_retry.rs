//! The ledger's retries against a local receiver: one that fails three times then succeeds
//! ends `delivered` after 4 attempts; one that always fails ends `failed` with its last
//! error kept, and an operator's retry (CLI) delivers it once the receiver recovers.

mod common;
mod webhooks_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use webhooks_support::*;

const SECRET: &str = "retry-secret";

fn start(setup: &Setup, url: &str) -> (Gateway, SocketAddr, SocketAddr) {
    setup.write_config(&format!(
        r#"[listen]
api = "127.0.0.1:0"
webhook = "127.0.0.1:0"
control = "{}"
[state]
dir = "{}"
[webhook]
max_attempts = 4
retry_initial = "50ms"
retry_max = "200ms"
[[webhook.routes]]
name = "r"
scheme = "github"
secret = "{SECRET}"
target = {{ type = "http", url = "{url}" }}
"#,
        setup.control.display(),
        setup.state.display()
    ));
    let (gw, api, _n) = start_api(setup);
    let hook = listener_addr(&setup.control, "webhook");
    (gw, api, hook)
}

fn send(hook: SocketAddr, id: &str) -> String {
    let body = r#"{"n": 1}"#;
    let sig = sign_github(SECRET, body.as_bytes());
    let r = request(
        hook,
        "POST",
        "/webhooks/r",
        &[("X-GitHub-Delivery", id), ("X-Hub-Signature-256", &sig)],
        body,
    )
    .unwrap();
    assert_eq!(r.status, 202, "{}", r.body);
    r.json()["delivery_id"].as_str().unwrap().to_owned()
}

fn wait_state(api: SocketAddr, id: &str, state: &str) -> Value {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let l = request(api, "GET", "/v1/deliveries?limit=1000", &[], "")
            .unwrap()
            .json();
        if let Some(d) = l["data"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["id"] == id && d["state"] == state)
        {
            return d.clone();
        }
        assert!(Instant::now() < end, "{id} never became {state}: {l}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn three_failures_then_success_ends_delivered_after_four_attempts() {
    let rx = Receiver::start(|_, n| if n <= 3 { 503 } else { 200 });
    let setup = Setup::new("127.0.0.1:0", "");
    let (_gw, api, hook) = start(&setup, &rx.url());
    let id = send(hook, "flaky-1");
    let d = wait_state(api, &id, "delivered");
    assert_eq!(d["attempts"], 4, "{d}");
    // The last failure is kept for the record.
    assert!(d["last_error"].as_str().unwrap().contains("503"), "{d}");
    let got = rx.all();
    let mine: Vec<_> = got
        .iter()
        .filter(|g| g.header("idempotency-key") == Some(id.as_str()))
        .collect();
    assert_eq!(mine.len(), 4);
    // The same key and the same body on every attempt, each freshly signed.
    assert!(mine.iter().all(|g| g.body == mine[0].body));
    assert!(mine.iter().all(|g| verify_gateway_signature(g, SECRET)));
    // Backoff: the gaps grow (50ms·2^n, jittered into [½, 1]).
    let gaps: Vec<Duration> = mine.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[0] >= Duration::from_millis(20), "{gaps:?}");
}

#[test]
fn an_always_failing_receiver_ends_failed_with_the_last_error_then_a_retry_delivers() {
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let rx = Receiver::start(move |_, _| if h.load(Ordering::Relaxed) { 200 } else { 500 });
    let setup = Setup::new("127.0.0.1:0", "");
    let (gw, api, hook) = start(&setup, &rx.url());
    let id = send(hook, "doomed-1");
    let d = wait_state(api, &id, "failed");
    assert_eq!(d["attempts"], 4, "{d}");
    let err = d["last_error"].as_str().unwrap();
    assert!(
        err.contains("500") && err.contains("receiver says no"),
        "{d}"
    );
    assert_eq!(d["next_attempt_at"], Value::Null);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.all().len(), 4, "no attempt after failed");

    // The receiver recovers; an operator retries from the command line.
    healthy.store(true, Ordering::Relaxed);
    let out = std::process::Command::new(BIN)
        .args(["deliveries", "retry", &id, "--socket"])
        .arg(&setup.control)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d = wait_state(api, &id, "delivered");
    assert_eq!(d["attempts"], 1, "a retry starts a fresh budget: {d}");
    assert!(d["last_error"].as_str().unwrap().contains("500"));
    assert!(!gw.stderr().contains("panicked"));
}
