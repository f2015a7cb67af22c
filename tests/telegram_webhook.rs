//! Telegram in webhook mode: `POST /platforms/telegram/NAME` on the webhook listener. The
//! secret token is checked before anything is stored; 200 only after the commit; a
//! repeated update_id is 200 and runs nothing; bad bodies get a clear status.

mod common;
mod telegram_support;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use serde_json::json;
use telegram_support::*;

const WAIT: Duration = Duration::from_secs(30);
const SECRET: &str = "webhook-secret_123";

fn start(stub: &Stub, extra: &str) -> (Setup, Gateway, SocketAddr) {
    let cfg = telegram_config(
        stub,
        &format!("mode = \"webhook\"\nwebhook_secret = \"{SECRET}\"\n{extra}"),
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("webhook = \"off\"", "webhook = \"127.0.0.1:0\"");
    setup.write_config(&text);
    let notify = setup.notify();
    let gw = setup.spawn(
        &[],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let hook = listener_addr(&setup.control, "webhook");
    (setup, gw, hook)
}

fn post(hook: SocketAddr, secret: Option<&str>, body: &str) -> Response {
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(s) = secret {
        headers.push(("X-Telegram-Bot-Api-Secret-Token", s));
    }
    request(hook, "POST", "/platforms/telegram/main", &headers, body).expect("request")
}

#[test]
fn the_secret_token_is_checked_before_anything_is_stored() {
    let stub = Stub::start();
    let (_setup, _gw, hook) = start(&stub, "allow_all = true");
    let mut u = text_update(7, 7, 1, "hello");
    u["update_id"] = 5000.into();
    let body = u.to_string();
    assert_eq!(post(hook, None, &body).status, 401);
    assert_eq!(post(hook, Some("wrong"), &body).status, 401);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        stub.delivered().is_empty(),
        "nothing ran for a refused update"
    );
    // The same update, properly sent: answered once, however often it arrives.
    assert_eq!(post(hook, Some(SECRET), &body).status, 200);
    assert_eq!(post(hook, Some(SECRET), &body).status, 200);
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stub.delivered().len(), 1, "{got:?}");
    assert_eq!(got[0].text(), "hello");
    assert_eq!(got[0].reply_to(), Some(1));
}

#[test]
fn bad_bodies_get_clear_statuses_and_lose_nothing() {
    let stub = Stub::start();
    let (_setup, _gw, hook) = start(&stub, "allow_all = true");
    let r = post(hook, Some(SECRET), "{not json");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "malformed_update");
    let r = post(hook, Some(SECRET), "[1, 2]");
    assert_eq!(r.status, 400);
    let r = post(hook, Some(SECRET), &json!({"message": {}}).to_string());
    assert_eq!(r.status, 400, "no update_id");
    let big = json!({"update_id": 1, "message": {"text": "x".repeat(2 << 20)}}).to_string();
    let r = post(hook, Some(SECRET), &big);
    assert_eq!(r.status, 413);
    // An unknown update type is taken (200) and let go.
    let r = post(
        hook,
        Some(SECRET),
        &json!({"update_id": 9, "poll": {"id": "1"}}).to_string(),
    );
    assert_eq!(r.status, 200);
    // Unknown instance.
    let r = request(
        hook,
        "POST",
        "/platforms/telegram/nope",
        &[("X-Telegram-Bot-Api-Secret-Token", SECRET)],
        "{}",
    )
    .unwrap();
    assert_eq!(r.status, 404);
    // And the gateway still answers the next good update.
    let mut u = text_update(8, 8, 3, "still here");
    u["update_id"] = 10.into();
    assert_eq!(post(hook, Some(SECRET), &u.to_string()).status, 200);
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert_eq!(got[0].text(), "still here");
}

#[test]
fn set_webhook_and_delete_webhook_use_the_configured_token_and_secret() {
    let stub = Stub::start();
    let cfg = telegram_config(
        &stub,
        &format!("mode = \"webhook\"\nwebhook_secret = \"{SECRET}\"\nallow_all = true"),
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let run = |args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&setup.config)
            .output()
            .expect("run the CLI")
    };
    let out = run(&[
        "platforms",
        "telegram",
        "set-webhook",
        "main",
        "--url",
        "https://bot.example.org/platforms/telegram/main",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = stub.calls("setWebhook");
    assert_eq!(calls.len(), 1);
    assert_eq!(
        calls[0].body["url"],
        "https://bot.example.org/platforms/telegram/main"
    );
    assert_eq!(calls[0].body["secret_token"], SECRET);
    assert_eq!(calls[0].body["drop_pending_updates"], false);
    let out = run(&["platforms", "telegram", "delete-webhook", "main"]);
    assert!(out.status.success());
    assert_eq!(
        stub.calls("deleteWebhook")[0].body["drop_pending_updates"],
        false
    );
    // A name that is not configured, and a URL Telegram would refuse.
    let out = run(&["platforms", "telegram", "delete-webhook", "other"]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no [[platforms.telegram]] named `other`")
    );
    let out = run(&[
        "platforms",
        "telegram",
        "set-webhook",
        "main",
        "--url",
        "http://x",
    ]);
    assert_eq!(out.status.code(), Some(78));

    // `platforms check` asks getMe with the configured token.
    let out = run(&["platforms", "check", "main"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("@{BOT_USERNAME}")), "{said}");
    let out = run(&["platforms", "check", "nope"]);
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn a_token_that_cannot_be_read_exits_78_naming_the_key() {
    let stub = Stub::start();
    let cfg = format!(
        "[[platforms.telegram]]\nname = \"main\"\ntoken_file = \"/nonexistent/telegram-token\"\napi_base = \"{}\"\n",
        stub.api_base()
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let mut gw = setup.spawn(&[], &[]);
    let st = gw.wait(Duration::from_secs(20));
    assert_eq!(st.code(), Some(78), "{}", gw.stderr());
    let err = gw.stderr();
    assert!(
        err.contains("[[platforms.telegram]] `main`: token"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/telegram-token"), "{err}");
    // check-config says the same about a section that does not validate.
    let bad = setup.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[platforms.telegram]]\nname = \"x\"\nmode = \"webhook\"\ntoken = \"1:A\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("bad.toml") && e.contains("platforms.telegram[0].webhook_secret"),
        "{e}"
    );
}
