//! Update bodies built with the official `python-telegram-bot` types (PyPI), not ours:
//! private and group messages, a mention, a reply to the bot, a photo's caption, a forum
//! topic, a sticker, an edit and a bot's own message — each posted to the webhook and
//! answered (or let go) as the README's rule says.
//!
//! The library lives in a venv at `target/platforms-venv` (tests/run-all.sh creates it
//! from tests/platforms/requirements.txt). Without it the test is skipped, saying why,
//! except under CI=true, where a missing venv is a failure.

mod common;
mod telegram_support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;
use telegram_support::*;

const SECRET: &str = "ptb-secret";

#[test]
fn updates_built_by_python_telegram_bot_are_taken_as_the_readme_says() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/platforms-venv/bin/python");
    let has_ptb = python.exists()
        && Command::new(&python)
            .args(["-c", "import telegram"])
            .output()
            .is_ok_and(|o| o.status.success());
    if !has_ptb {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must run this test: create the venv with `python3 -m venv target/platforms-venv && target/platforms-venv/bin/pip install -r tests/platforms/requirements.txt` (tests/run-all.sh does)"
        );
        eprintln!(
            "SKIP: no Python venv with python-telegram-bot at {}; tests/run-all.sh creates it",
            python.display()
        );
        return;
    }
    let out = Command::new(&python)
        .arg(root.join("tests/platforms/telegram_updates.py"))
        .arg(BOT_ID.to_string())
        .arg(BOT_USERNAME)
        .output()
        .expect("run the update builder");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cases: Vec<Value> = serde_json::from_slice(&out.stdout).expect("a JSON list");
    assert!(cases.len() >= 9);

    let stub = Stub::start();
    let cfg = telegram_config(
        &stub,
        &format!("mode = \"webhook\"\nwebhook_secret = \"{SECRET}\"\nallow_all = true"),
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("webhook = \"off\"", "webhook = \"127.0.0.1:0\"");
    setup.write_config(&text);
    let notify = setup.notify();
    let _gw = setup.spawn(
        &[],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let hook = listener_addr(&setup.control, "webhook");
    // The username comes from getMe: wait until mentions can be judged (503 until then).
    let mut expected = Vec::new();
    for case in &cases {
        let body = case["update"].to_string();
        let end = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let r = request(
                hook,
                "POST",
                "/platforms/telegram/main",
                &[("X-Telegram-Bot-Api-Secret-Token", SECRET)],
                &body,
            )
            .unwrap();
            if r.status == 200 {
                break;
            }
            assert_eq!(r.status, 503, "{}: {}", body, r.body);
            assert!(std::time::Instant::now() < end, "never taken: {body}");
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Some(t) = case["expect"].as_str() {
            expected.push((case["update"]["message"].clone(), t.to_owned()));
        }
    }
    stub.wait_delivered(Duration::from_secs(30), |d| d.len() >= expected.len());
    std::thread::sleep(Duration::from_millis(800));
    let got = stub.delivered();
    assert_eq!(
        got.len(),
        expected.len(),
        "only what the rule takes is answered"
    );
    for (msg, text) in &expected {
        let reply = got
            .iter()
            .find(|c| c.text() == text)
            .unwrap_or_else(|| panic!("no reply `{text}`"));
        assert_eq!(reply.body["chat_id"], msg["chat"]["id"]);
        assert_eq!(reply.reply_to(), msg["message_id"].as_i64());
        if let Some(thread) = msg["message_thread_id"].as_i64() {
            assert_eq!(reply.body["message_thread_id"], thread);
        }
    }
}
