//! Storage failures (issue 14, item 1): with the state folder's disk full, or the database
//! locked by an outside process, every write path answers 503 with `Retry-After` and an
//! error that says storage is unavailable, nothing is acknowledged that was not committed,
//! reads keep working, `/health/detailed` says the store is degraded (and why) until a
//! commit succeeds again, and the log says so once per episode, not once per request.
//!
//! The disk is a small tmpfs mounted on the state folder in a private mount namespace of
//! the gateway's own (`unshare --mount`): it goes away with the process, whatever happens
//! to the test, and nothing outside sees it. The test fills it through
//! `/proc/PID/root`, the gateway's view of the file system.

mod common;
mod telegram_support;
mod webhooks_support;

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use webhooks_support::{Receiver, sign_github};

const GH_SECRET: &str = "storage-secret";
const TG_SECRET: &str = "tg-secret_storage";
const WAIT: Duration = Duration::from_secs(30);
const DEGRADED: &str = "store: degraded, cannot commit";
const RECOVERED: &str = "store: commits succeed again";

fn config(
    setup: &Setup,
    rx: &Receiver,
    hooked: &telegram_support::Stub,
    polled: &telegram_support::Stub,
) -> String {
    format!(
        r#"[listen]
api = "127.0.0.1:0"
webhook = "127.0.0.1:0"
control = "{control}"
[state]
dir = "{state}"

[[webhook.routes]]
name = "gh"
scheme = "github"
secret = "{GH_SECRET}"
template = "{{body.text}}"
target = {{ type = "http", url = "{url}" }}

[[platforms.telegram]]
name = "hooked"
token = "{token}"
api_base = "{hooked}"
mode = "webhook"
webhook_secret = "{TG_SECRET}"
allow_all = true

[[platforms.telegram]]
name = "polled"
token = "{token}"
api_base = "{polled}"
poll_timeout = "1s"
allow_all = true
"#,
        control = setup.control.display(),
        state = setup.state.display(),
        url = rx.url(),
        token = telegram_support::TOKEN,
        hooked = hooked.api_base(),
        polled = polled.api_base(),
    )
}

/// Whether this machine lets us mount a tmpfs in a new mount namespace (root, or
/// CAP_SYS_ADMIN). Under CI it must.
fn can_mount(dir: &Path) -> bool {
    let probe = dir.join("probe");
    let ok = std::fs::create_dir_all(&probe).is_ok()
        && Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o size=64k hermes-probe "$1""#)
            .arg("sh")
            .arg(&probe)
            .output()
            .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: the storage tests need `unshare --mount` and `mount -t tmpfs` (run as root)"
        );
        eprintln!(
            "SKIPPED: cannot mount a tmpfs in a private mount namespace here (needs root or CAP_SYS_ADMIN); the disk-full test did not run"
        );
    }
    ok
}

/// The gateway in a mount namespace of its own, with `size` of tmpfs on its state folder.
fn spawn_on_tmpfs(setup: &Setup, size: &str, notify: &NotifySink) -> Gateway {
    std::fs::create_dir_all(&setup.state).expect("create the state folder");
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
        .arg(format!(
            r#"mount -t tmpfs -o size={size},mode=0700 hermes-state "$1" && shift && exec "$@""#
        ))
        .arg("sh")
        .arg(&setup.state)
        .arg(BIN)
        .arg("run")
        .arg("--config")
        .arg(&setup.config)
        .env_remove("LISTEN_FDS")
        .env_remove("INVOCATION_ID")
        .env("NOTIFY_SOCKET", &notify.path)
        .env("RUST_LOG", "info");
    spawn_command(cmd)
}

/// `path` as the process `pid` sees it (in its mount namespace).
fn seen_by(pid: i32, path: &Path) -> PathBuf {
    Path::new(&format!("/proc/{pid}/root")).join(path.strip_prefix("/").unwrap_or(path))
}

/// Fills the file system of `dir` to the last byte; returns the filler file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("create the filler");
    for size in [1 << 16, 512, 1] {
        let block = vec![0u8; size];
        loop {
            match f.write(&block) {
                Ok(n) if n == size => {}
                Ok(_) => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", path.display()),
            }
        }
    }
    path
}

fn chat(api: SocketAddr, session: &str, text: &str) -> Response {
    let body = json!({"messages": [{"role": "user", "content": text}]}).to_string();
    Conn::open_with_timeout(api, WAIT)
        .and_then(|mut c| {
            c.request(
                "POST",
                "/v1/chat/completions",
                &[("X-Hermes-Session-Id", session)],
                &body,
            )
        })
        .expect("chat request")
}

fn call(api: SocketAddr, method: &str, path: &str, body: &str) -> Response {
    Conn::open_with_timeout(api, WAIT)
        .and_then(|mut c| c.request(method, path, &[], body))
        .expect("request")
}

fn webhook(hook: SocketAddr, id: &str, text: &str) -> Response {
    let body = json!({"text": text}).to_string();
    let sig = sign_github(GH_SECRET, body.as_bytes());
    request(
        hook,
        "POST",
        "/webhooks/gh",
        &[
            ("X-GitHub-Delivery", id),
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sig),
        ],
        &body,
    )
    .expect("webhook request")
}

fn telegram(hook: SocketAddr, update: &Value) -> Response {
    request(
        hook,
        "POST",
        "/platforms/telegram/hooked",
        &[("X-Telegram-Bot-Api-Secret-Token", TG_SECRET)],
        &update.to_string(),
    )
    .expect("telegram webhook request")
}

/// A 503 that says storage is unavailable, with `Retry-After`, in the API's error shape.
fn assert_api_unavailable(r: &Response, what: &str) {
    assert_eq!(r.status, 503, "{what}: {}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"), "{what}: {r:?}");
    let e = &r.json()["error"];
    assert_eq!(e["code"], "store_unavailable", "{what}: {}", r.body);
    assert_eq!(e["type"], "server_error", "{what}: {}", r.body);
    let message = e["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("storage is unavailable"),
        "{what}: {message}"
    );
}

/// The same for the webhook listener's shape.
fn assert_hook_unavailable(r: &Response, what: &str) {
    assert_eq!(r.status, 503, "{what}: {}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"), "{what}: {r:?}");
    let v = r.json();
    assert_eq!(v["error"], "store_unavailable", "{what}: {}", r.body);
    let message = v["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("storage is unavailable"),
        "{what}: {message}"
    );
}

fn health(api: SocketAddr) -> (u16, Value) {
    let r = call(api, "GET", "/health/detailed", "");
    (r.status, r.json())
}

fn session_messages(api: SocketAddr, id: &str) -> usize {
    let r = call(api, "GET", &format!("/v1/sessions/{id}"), "");
    assert_eq!(r.status, 200, "a read while degraded: {}", r.body);
    r.json()["messages"].as_array().map_or(0, Vec::len)
}

/// `hermes_gateway_store_errors_total{kind=KIND}` in a scrape of the control socket.
fn store_errors(control: &Path, kind: &str) -> f64 {
    let (_, text) = control_get(control, "/metrics", "");
    let key = format!("hermes_gateway_store_errors_total{{kind=\"{kind}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in the scrape:\n{text}"))
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < end, "{what} within {WAIT:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_full_disk_refuses_every_write_with_503_keeps_reads_and_recovers_by_itself() {
    let setup = Setup::new("127.0.0.1:0", "");
    if !can_mount(setup.dir.path()) {
        return;
    }
    let rx = Receiver::start(|_, _| 200);
    let hooked = telegram_support::Stub::start();
    let polled = telegram_support::Stub::start();
    setup.write_config(&config(&setup, &rx, &hooked, &polled));
    let notify = setup.notify();
    let gw = spawn_on_tmpfs(&setup, "8m", &notify);
    notify.wait_for("READY=1", WAIT);
    let api = listener_addr(&setup.control, "api");
    let hook = listener_addr(&setup.control, "webhook");

    // Before: a turn, a run and a delivery, stored and done.
    let r = chat(api, "s1", "before");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(api, "POST", "/v1/runs", r#"{"input": "a run"}"#);
    assert_eq!(r.status, 202, "{}", r.body);
    let run_id = r.json()["run_id"].as_str().unwrap_or_default().to_owned();
    wait_for("the run completed", || {
        call(api, "GET", &format!("/v1/runs/{run_id}"), "").json()["status"] == "completed"
    });
    assert_eq!(webhook(hook, "d-before", "before").status, 202);
    rx.wait_until(WAIT, |got| !got.is_empty());
    std::thread::sleep(Duration::from_millis(700)); // the delivery's state, the fold
    assert_eq!(health(api).0, 200);

    let filler = fill(&seen_by(gw.pid(), &setup.state));

    // Every write path: 503, Retry-After, "storage is unavailable". Many of them.
    for i in 0..10 {
        assert_api_unavailable(&chat(api, "s1", &format!("during {i}")), "a chat turn");
    }
    assert_api_unavailable(&chat(api, "s2", "a new session"), "a new session's turn");
    // Streamed, the status went out first: the stream ends failed, never with `stop`.
    let body = json!({"messages": [{"role": "user", "content": "streamed"}], "stream": true});
    let r = Conn::open_with_timeout(api, WAIT)
        .and_then(|mut c| {
            c.request(
                "POST",
                "/v1/chat/completions",
                &[("X-Hermes-Session-Id", "s1")],
                &body.to_string(),
            )
        })
        .expect("streamed chat request");
    assert_eq!(r.status, 200, "{}", r.body);
    let finish: Vec<Value> = r
        .sse()
        .iter()
        .filter_map(|(_, d)| serde_json::from_str::<Value>(d).ok())
        .filter(|v| !v["choices"][0]["finish_reason"].is_null())
        .collect();
    assert_eq!(finish.len(), 1, "{}", r.body);
    assert_eq!(
        finish[0]["choices"][0]["finish_reason"], "error",
        "{}",
        r.body
    );
    assert_eq!(
        finish[0]["hermes"]["error_code"], "store_unavailable",
        "{}",
        r.body
    );
    assert_api_unavailable(
        &call(api, "POST", "/v1/runs", r#"{"input": "another run"}"#),
        "a run",
    );
    assert_api_unavailable(
        &call(api, "POST", "/v1/responses", r#"{"input": "a response"}"#),
        "a response",
    );
    assert_api_unavailable(
        &call(api, "DELETE", "/v1/sessions/s1", ""),
        "a session delete",
    );
    for _ in 0..3 {
        assert_hook_unavailable(&webhook(hook, "d-during", "during"), "a webhook");
    }
    let mut update = telegram_support::text_update(7, 7, 1, "hooked during");
    update["update_id"] = 5000.into();
    assert_hook_unavailable(&telegram(hook, &update), "a telegram webhook");
    // A polling platform: its update is fetched, cannot be stored, and is not confirmed.
    let polls = polled.polls().len();
    let polled_id = polled.push(telegram_support::text_update(8, 8, 1, "polled during"));
    // Fetched, refused by the store, fetched again (a second later), and again.
    wait_for("three more polls", || polled.polls().len() >= polls + 3);
    assert!(
        polled.confirmed() <= polled_id,
        "offset confirmed past update {polled_id} that was never stored (confirmed {})",
        polled.confirmed()
    );

    // Reads go on, and show nothing of the refused writes.
    assert_eq!(session_messages(api, "s1"), 2, "only the turn before");
    let r = call(api, "GET", "/v1/sessions", "");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(api, "GET", &format!("/v1/runs/{run_id}"), "");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(api, "GET", "/v1/sessions/s2", "");
    assert_eq!(r.status, 404, "{}", r.body);

    let (status, h) = health(api);
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["store"]["status"], "degraded", "{h}");
    let why = h["store"]["error"].as_str().unwrap_or_default();
    assert!(why.contains("full"), "the reason: {h}");
    // The metric the store-errors alert watches counts them, by kind.
    assert!(store_errors(&setup.control, "full") >= 1.0);
    assert_eq!(store_errors(&setup.control, "busy"), 0.0);

    // Space returns: the next commit succeeds (the polling retry, or the next request).
    std::fs::remove_file(&filler).expect("remove the filler");
    let r = chat(api, "s1", "after");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["choices"][0]["message"]["content"], "after");
    assert_eq!(
        session_messages(api, "s1"),
        4,
        "the turn before and this one"
    );
    let (status, h) = health(api);
    assert_eq!(status, 200, "{h}");
    assert_eq!(h["store"]["status"], "ok", "{h}");
    // The refused ones, sent again, are taken now: they were not stored before.
    let r = webhook(hook, "d-during", "during");
    assert_eq!(r.status, 202, "accepted, not a duplicate: {}", r.body);
    assert_eq!(r.json()["status"], "accepted");
    assert_eq!(telegram(hook, &update).status, 200);
    hooked.wait_delivered(WAIT, |d| d.iter().any(|c| c.text() == "hooked during"));
    polled.wait_delivered(WAIT, |d| d.iter().any(|c| c.text() == "polled during"));
    wait_for("the polled update confirmed once stored", || {
        polled.confirmed() > polled_id
    });
    let r = call(api, "POST", "/v1/runs", r#"{"input": "another run"}"#);
    assert_eq!(r.status, 202, "{}", r.body);

    // Said once per episode: one warning, one recovery line, nothing per request.
    let log = gw.wait_stderr(RECOVERED, WAIT);
    assert_eq!(log.matches(DEGRADED).count(), 1, "{log}");
    assert_eq!(log.matches(RECOVERED).count(), 1, "{log}");
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| (l.contains("ERROR") || l.contains("WARN")) && l.contains("disk is full"))
        .collect();
    assert_eq!(noisy.len(), 1, "only the episode's warning: {noisy:#?}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn a_database_locked_by_an_outside_process_is_503_until_the_lock_is_released() {
    let setup = Setup::new("127.0.0.1:0", "");
    let (gw, api, _notify) = start_api(&setup);
    assert_eq!(chat(api, "s1", "before").status, 200);
    std::thread::sleep(Duration::from_millis(700)); // folded while idle

    // Another process (this test) takes the write lock and keeps it.
    let outside =
        rusqlite::Connection::open(setup.state.join("gateway.db")).expect("open the database");
    outside
        .busy_timeout(WAIT)
        .expect("set the outside busy timeout");
    outside
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the lock");

    // Each write waits the store's busy timeout (5 s) for the lock, then is refused:
    // writes that queue up meanwhile share the next attempt. (Turns of one session run
    // one after another, so these go to sessions of their own.)
    let started = Instant::now();
    let turns: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || chat(api, &format!("l{i}"), "while locked")))
        .collect();
    let run = call(api, "POST", "/v1/runs", r#"{"input": "a run"}"#);
    for t in turns {
        let r = t.join().expect("a chat thread");
        assert_api_unavailable(&r, "a chat turn while locked");
        let message = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains("locked"), "{message}");
    }
    assert_api_unavailable(&run, "a run while locked");
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "refused before the busy timeout: {:?}",
        started.elapsed()
    );
    assert_eq!(call(api, "GET", "/v1/sessions/l0", "").status, 404);
    assert!(store_errors(&setup.control, "busy") >= 1.0);
    assert_eq!(store_errors(&setup.control, "full"), 0.0);
    // `hermes-gateway status` says so too.
    let st = status_json(&setup.control);
    assert_eq!(st["store"]["status"], "degraded", "{st}");
    let out = Command::new(env!("CARGO_BIN_EXE_hermes-gateway"))
        .args(["status", "--socket"])
        .arg(&setup.control)
        .output()
        .expect("run status");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("store: DEGRADED"), "{text}");

    // Reads go on beside the lock.
    assert_eq!(session_messages(api, "s1"), 2);
    let (status, h) = health(api);
    assert_eq!(status, 503, "{h}");
    assert_eq!(h["store"]["status"], "degraded", "{h}");
    assert!(
        h["store"]["error"]
            .as_str()
            .unwrap_or_default()
            .contains("locked"),
        "{h}"
    );

    outside.execute_batch("ROLLBACK").expect("release the lock");
    drop(outside);
    let r = chat(api, "s1", "after");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(session_messages(api, "s1"), 4);
    assert_eq!(health(api).0, 200);
    assert_eq!(status_json(&setup.control)["store"]["status"], "ok");

    let log = gw.wait_stderr(RECOVERED, WAIT);
    assert_eq!(log.matches(DEGRADED).count(), 1, "{log}");
    assert_eq!(log.matches(RECOVERED).count(), 1, "{log}");
}
