//! LINE on the webhook listener: `POST /platforms/line/NAME`, each request signed the way
//! the LINE Platform signs it and checked by line-bot-sdk (PyPI) before it is sent; bodies
//! built with the SDK's own models. The signature is checked before anything is stored;
//! 200 only after the commit; a redelivered event runs nothing twice; replies are pushed
//! in order per chat, at most five messages per request, under an `X-Line-Retry-Key` that
//! stays the same across retries and restarts.

mod common;
mod line_support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use line_support::*;
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);
const FAST_RETRIES: &str = "[webhook]\nretry_initial = \"100ms\"\nretry_max = \"400ms\"\n";

fn launch(setup: &Setup) -> (Gateway, SocketAddr) {
    let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
    let notify = setup.notify();
    let gw = setup.spawn(
        &[],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let hook = listener_addr(&setup.control, "webhook");
    (gw, hook)
}

fn start(stub: &Stub, extra: &str, tail: &str) -> (Setup, Gateway, SocketAddr) {
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!("{}{tail}", line_config(stub, extra)),
    );
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("webhook = \"off\"", "webhook = \"127.0.0.1:0\"");
    setup.write_config(&text);
    let (gw, hook) = launch(&setup);
    (setup, gw, hook)
}

fn post(hook: SocketAddr, signature: Option<&str>, body: &str) -> Response {
    let mut headers = vec![];
    if let Some(s) = signature {
        headers.push(("X-Line-Signature", s));
    }
    request(hook, "POST", "/platforms/line/main", &headers, body).expect("request")
}

/// Signs `bodies` with line-bot-sdk's side and posts each; every one must be 200.
fn post_signed(python: &Path, hook: SocketAddr, bodies: &[String]) {
    let sigs = sign(python, SECRET, bodies, true);
    for (b, s) in bodies.iter().zip(&sigs) {
        let r = post(hook, Some(s), b);
        assert_eq!(r.status, 200, "{b}: {}", r.body);
    }
}

#[test]
fn events_built_by_line_bot_sdk_are_taken_as_the_readme_says() {
    let Some(python) = sdk_python() else { return };
    let cases = run_python(&python, "line_events.py", &[BOT_USER_ID], &Value::Null);
    let cases = cases.as_array().expect("a list of cases").clone();
    assert!(cases.len() >= 8);
    let stub = Stub::start();
    let (_setup, _gw, hook) = start(&stub, "allow_all = true", "");
    // The console's "Verify": a signed request without events.
    let verify = json!({"destination": BOT_USER_ID, "events": []}).to_string();
    let sig = sign(&python, SECRET, std::slice::from_ref(&verify), true);
    assert_eq!(post(hook, Some(&sig[0]), &verify).status, 200);

    let bodies: Vec<String> = cases
        .iter()
        .map(|c| c["body"].as_str().expect("body").to_owned())
        .collect();
    post_signed(&python, hook, &bodies);
    let expected: Vec<(String, String)> = cases
        .iter()
        .flat_map(|c| c["expect"].as_array().cloned().unwrap_or_default())
        .map(|e| {
            (
                e["to"].as_str().unwrap_or("").to_owned(),
                e["text"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    stub.wait_delivered(WAIT, |d| d.len() >= expected.len());
    std::thread::sleep(Duration::from_millis(800));
    let got = stub.delivered();
    let got: Vec<(String, String)> = got
        .iter()
        .flat_map(|p| p.texts.iter().map(|t| (p.to.clone(), t.clone())))
        .collect();
    let mut want = expected.clone();
    let mut have = got.clone();
    want.sort();
    have.sort();
    assert_eq!(
        have, want,
        "only what the rule takes is answered, once, to the right chat"
    );
    // Per chat, in the order sent.
    let bob = "U".to_owned() + &"b".repeat(32);
    let order: Vec<&str> = got
        .iter()
        .filter(|(to, _)| *to == bob)
        .map(|(_, t)| t.as_str())
        .collect();
    assert_eq!(order, ["first of two", "second of two"]);
    // A one-to-one chat saw the loading animation only if a turn ran long enough: never
    // in a group or a room.
    assert!(stub.loading().iter().all(|c| c.starts_with('U')));
}

#[test]
fn signatures_are_checked_before_anything_is_stored_and_bad_bodies_get_clear_statuses() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    let (_setup, gw, hook) = start(&stub, "allow_all = true", "");
    let good = body(&[text_event(
        "01HGOOD0000000000000000001",
        &user(1),
        "hello",
        false,
    )]);
    let tampered = good.replace("hello", "HELLO");
    let other_secret = sign(
        &python,
        "not-the-channel-secret",
        std::slice::from_ref(&good),
        true,
    );
    let sigs = sign(&python, SECRET, std::slice::from_ref(&good), true);
    let r = post(hook, None, &good);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"], "missing_signature");
    let r = post(hook, Some(&other_secret[0]), &good);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "invalid_signature");
    let r = post(hook, Some(&sigs[0]), &tampered);
    assert_eq!(r.status, 401, "a body changed after signing");
    let r = post(hook, Some("not base64!"), &good);
    assert_eq!(r.status, 401);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        stub.pushes().is_empty(),
        "nothing ran for a refused request"
    );
    let log = gw.wait_stderr("webhook refused", WAIT);
    assert!(log.contains("X-Line-Signature"), "{log}");
    assert!(
        !log.contains(SECRET) && !log.contains(TOKEN),
        "no secret in the log"
    );
    let db = rusqlite::Connection::open_with_flags(
        _setup.state.join("gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let stored: i64 = db
        .query_row(
            "SELECT count(*) FROM deliveries WHERE route = 'line:main'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 0, "nothing stored for a refused request");

    // Signed, but not what LINE sends: 400; over [webhook] max_body: 413.
    let bad = [
        "{not json".to_owned(),
        "[1, 2]".to_owned(),
        json!({"events": 5}).to_string(),
    ];
    let bad_sigs = sign(&python, SECRET, &bad, false);
    for (b, s) in bad.iter().zip(&bad_sigs) {
        let r = post(hook, Some(s), b);
        assert_eq!(r.status, 400, "{b}: {}", r.body);
        assert_eq!(r.json()["error"], "malformed_body");
    }
    let big = body(&[text_event("01HBIG", &user(1), &"x".repeat(2 << 20), false)]);
    let r = post(hook, Some(&sigs[0]), &big);
    assert_eq!(r.status, 413);
    // An event type LINE may add one day: 200, let go.
    let unknown = json!({"destination": BOT_USER_ID, "events": [{"type": "somethingNew",
        "webhookEventId": "01HNEW", "mode": "active", "timestamp": 1,
        "deliveryContext": {"isRedelivery": false}, "source": {"type": "user", "userId": user(1)}}]})
    .to_string();
    let s = sign(&python, SECRET, std::slice::from_ref(&unknown), false);
    assert_eq!(post(hook, Some(&s[0]), &unknown).status, 200);
    // Unknown instance: 404.
    let r = request(
        hook,
        "POST",
        "/platforms/line/other",
        &[("X-Line-Signature", sigs[0].as_str())],
        &good,
    )
    .unwrap();
    assert_eq!(r.status, 404);
    // The good request, sent twice (a redelivery): answered once.
    assert_eq!(post(hook, Some(&sigs[0]), &good).status, 200);
    assert_eq!(post(hook, Some(&sigs[0]), &good).status, 200);
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(stub.delivered().len(), 1, "{got:?}");
    assert_eq!(got[0].to, user(1));
    assert_eq!(got[0].texts, ["hello"]);
}

#[test]
fn replies_go_in_order_per_chat_five_messages_a_push_and_500_and_429_are_retried_under_one_key() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    let (a, b) = (user(1), user(2));
    let (pa, pb) = (a.clone(), b.clone());
    stub.set_policy(move |p, n| {
        if p.to == pa {
            match n {
                0 => Answer::ServerError,
                1 => Answer::TooMany(Some(1)),
                _ => Answer::Ok,
            }
        } else if p.to == pb && n == 0 {
            Answer::TooMany(None)
        } else {
            Answer::Ok
        }
    });
    let (_setup, _gw, hook) = start(&stub, "allow_all = true", FAST_RETRIES);
    let long: String =
        (0..3000).map(|i| format!("word{i} ")).collect::<String>() + &"y".repeat(8000);
    let mut bodies = Vec::new();
    for i in 0..3 {
        bodies.push(body(&[text_event(
            &format!("01HA{i}"),
            &a,
            &format!("a{i}"),
            false,
        )]));
        bodies.push(body(&[text_event(
            &format!("01HB{i}"),
            &b,
            &format!("b{i}"),
            false,
        )]));
    }
    let c = user(3);
    bodies.push(body(&[text_event("01HLONG", &c, &long, false)]));
    post_signed(&python, hook, &bodies);
    let got = stub.wait_delivered(WAIT, |d| {
        by_chat(d).values().map(Vec::len).sum::<usize>() >= 6 + 6
    });
    std::thread::sleep(Duration::from_millis(800));
    let chats = by_chat(&stub.delivered());
    assert_eq!(chats[&a], ["a0", "a1", "a2"], "{got:?}");
    assert_eq!(chats[&b], ["b0", "b1", "b2"]);
    // The first push to A: three attempts (500, 429, ok), one key.
    let pushes = stub.pushes();
    let to_a: Vec<_> = pushes.iter().filter(|p| p.to == a).collect();
    assert_eq!(to_a.len(), 5, "a0 three times, a1, a2");
    assert!(to_a[..3].iter().all(|p| p.texts == ["a0"]));
    let key = to_a[0].retry_key.clone().expect("a retry key");
    assert!(
        to_a[..3]
            .iter()
            .all(|p| p.retry_key.as_deref() == Some(key.as_str()))
    );
    assert_eq!(key.len(), 36, "a UUID: {key}");
    assert_ne!(
        to_a[3].retry_key.as_deref(),
        Some(key.as_str()),
        "another reply, another key"
    );
    assert!(
        to_a[2].at - to_a[1].at >= Duration::from_millis(900),
        "Retry-After: 1 was waited"
    );
    let to_b: Vec<_> = pushes.iter().filter(|p| p.to == b).collect();
    assert_eq!(to_b.len(), 4);
    assert_eq!(to_b[0].retry_key, to_b[1].retry_key);
    // The long reply: at most five messages of at most 5,000 UTF-16 units per push.
    let to_c: Vec<_> = stub.delivered().into_iter().filter(|p| p.to == c).collect();
    assert_eq!(to_c.len(), 2, "{} messages", chats[&c].len());
    assert_eq!(to_c[0].texts.len(), 5);
    assert!(
        to_c.iter()
            .flat_map(|p| &p.texts)
            .all(|t| t.encode_utf16().count() <= 5000)
    );
    let joined: String = chats[&c].concat().split_whitespace().collect();
    assert_eq!(
        joined,
        long.split_whitespace().collect::<String>(),
        "every word, in order"
    );
    assert_ne!(to_c[0].retry_key, to_c[1].retry_key);
    assert!(
        pushes.iter().all(|p| p.retry_key.is_some()),
        "every push has a key"
    );
}

#[test]
fn the_retry_key_is_the_same_after_a_sigkill_mid_retry_and_a_409_means_delivered() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    let (k, l) = (user(7), user(8));
    let (pk, pl) = (k.clone(), l.clone());
    let down = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let d = down.clone();
    stub.set_policy(move |p, n| {
        if p.to == pk && d.load(std::sync::atomic::Ordering::SeqCst) {
            Answer::ServerError
        } else if p.to == pl && n == 0 {
            Answer::OkButLost
        } else {
            Answer::Ok
        }
    });
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!("{}{FAST_RETRIES}", line_config(&stub, "allow_all = true")),
    );
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("webhook = \"off\"", "webhook = \"127.0.0.1:0\"");
    setup.write_config(&text);
    let (mut gw, hook) = launch(&setup);
    post_signed(
        &python,
        hook,
        &[body(&[text_event("01HKILL", &k, "k1", false)])],
    );
    let before = stub.wait_pushes(WAIT, |p| p.iter().filter(|x| x.to == k).count() >= 2);
    let key = before[0].retry_key.clone().expect("a key");
    gw.signal(Signal::SIGKILL);
    let st = gw.wait(Duration::from_secs(10));
    assert_eq!(st.code(), None, "killed");
    let n = stub.pushes().len();
    let (_gw2, hook2) = launch(&setup);
    let after = stub.wait_pushes(WAIT, |p| p.len() > n && p[n..].iter().any(|x| x.to == k));
    let again = after[n..]
        .iter()
        .find(|x| x.to == k)
        .expect("an attempt after the relaunch");
    assert_eq!(
        again.retry_key.as_deref(),
        Some(key.as_str()),
        "the same key after a restart"
    );
    assert!(again.texts[0].ends_with("k1"), "{:?}", again.texts);
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let got = stub.wait_delivered(WAIT, |d| d.iter().any(|p| p.to == k));
    assert_eq!(got.iter().filter(|p| p.to == k).count(), 1);

    // LINE accepted a push but its answer was lost (500): the retry's 409 means delivered.
    post_signed(
        &python,
        hook2,
        &[body(&[text_event("01HLOST", &l, "l1", false)])],
    );
    stub.wait_pushes(WAIT, |p| p.iter().filter(|x| x.to == l).count() >= 2);
    std::thread::sleep(Duration::from_millis(1500));
    let to_l: Vec<_> = stub.pushes().into_iter().filter(|p| p.to == l).collect();
    assert_eq!(
        to_l.len(),
        2,
        "accepted, then 409, then nothing more: {to_l:?}"
    );
    assert_eq!(to_l[0].retry_key, to_l[1].retry_key);
    assert!(stub.conflicts() >= 1);
    assert_eq!(
        stub.delivered().iter().filter(|p| p.to == l).count(),
        1,
        "shown once"
    );
    let db = rusqlite::Connection::open_with_flags(
        setup.state.join("gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let states: Vec<String> = db
        .prepare("SELECT state FROM deliveries WHERE route = 'line:main' ORDER BY received_at")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .filter_map(Result::ok)
        .collect();
    assert_eq!(states, ["delivered", "delivered"]);
}

#[test]
fn commands_are_plain_words_access_is_denied_by_default_and_platforms_check_reads_the_bot() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    let me = user(1);
    let (setup, _gw, hook) = start(&stub, &format!("allowed_users = [\"{me}\"]"), "");
    let say = |id: &str, who: &str, text: &str| {
        post_signed(&python, hook, &[body(&[text_event(id, who, text, false)])]);
    };
    say("01HC1", &me, "help");
    say("01HC2", &me, "status");
    say("01HC3", &me, "stop the music");
    say("01HC4", &me, "new");
    say("01HC5", &user(2), "let me in");
    let got = stub.wait_delivered(WAIT, |d| d.len() >= 5);
    let to_me: Vec<&str> = got
        .iter()
        .filter(|p| p.to == me)
        .map(|p| p.texts[0].as_str())
        .collect();
    // The gateway's own answers go out at once, each on its own: in any order among
    // themselves; the one message ("stop the music") is a turn.
    let has = |needle: &str| to_me.iter().any(|t| t.contains(needle));
    assert!(
        has("new — start a new conversation"),
        "help, in plain words: {to_me:?}"
    );
    assert!(has(&format!("Conversation: line:main:{me}")), "{to_me:?}");
    assert!(
        to_me.contains(&"stop the music"),
        "a sentence is a message: {to_me:?}"
    );
    assert!(has("New conversation"), "{to_me:?}");
    let refused = got.iter().find(|p| p.to == user(2)).expect("told once");
    assert!(refused.texts[0].contains("private"), "{:?}", refused.texts);
    assert!(!got.iter().any(|p| p.texts.iter().any(|t| t == "let me in")));

    let out = Command::new(BIN)
        .args(["platforms", "check", "main", "--config"])
        .arg(&setup.config)
        .output()
        .expect("run the CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("Hermes Test") && said.contains("@123abcde"),
        "{said}"
    );
    assert!(!said.contains(TOKEN));
}

#[test]
fn a_secret_that_cannot_be_read_exits_78_naming_the_key() {
    let stub = Stub::start();
    let cfg = format!(
        "[[platforms.line]]\nname = \"main\"\nchannel_secret_file = \"/nonexistent/line-secret\"\nchannel_access_token = \"{TOKEN}\"\napi_base = \"{}\"\n",
        stub.api_base()
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let mut gw = setup.spawn(&[], &[]);
    let st = gw.wait(Duration::from_secs(20));
    assert_eq!(st.code(), Some(78), "{}", gw.stderr());
    let err = gw.stderr();
    assert!(
        err.contains("[[platforms.line]] `main`: channel_secret"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/line-secret"), "{err}");
    assert!(!err.contains(TOKEN));
}
