//! Twilio SMS on the webhook listener: `POST /platforms/twilio/NAME`, each request signed by
//! the `twilio` library's own `RequestValidator.compute_signature` (PyPI) for the configured
//! `public_url`. The signature is checked before anything is stored; the empty TwiML
//! answer comes only after the commit; a repeated `MessageSid` runs nothing twice; replies
//! go out through the Messages API, split at 1,600 characters, 429/5xx retried and
//! refusals failed.

mod common;
mod twilio_support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use twilio_support::*;

const WAIT: Duration = Duration::from_secs(30);
const FAST_RETRIES: &str = "[webhook]\nretry_initial = \"100ms\"\nretry_max = \"400ms\"\n";
const TWIML: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response/>";

fn start(stub: &Stub, extra: &str, tail: &str) -> (Setup, Gateway, SocketAddr) {
    let setup = Setup::new(
        "127.0.0.1:0",
        &format!("{}{tail}", twilio_config(stub, PUBLIC_URL, extra)),
    );
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

/// Signs each form for `PUBLIC_URL` with the twilio library and posts it: the answers.
fn post_signed(python: &Path, hook: SocketAddr, forms: &[Params]) -> Vec<Response> {
    let reqs: Vec<(String, Params)> = forms
        .iter()
        .map(|p| (PUBLIC_URL.to_owned(), p.clone()))
        .collect();
    let sigs = sign(python, TOKEN, &reqs);
    forms
        .iter()
        .zip(&sigs)
        .map(|(p, s)| post_form(hook, Some(s), &encode(p)))
        .collect()
}

fn stored(setup: &Setup) -> Vec<(String, String, Option<String>)> {
    let db = rusqlite::Connection::open_with_flags(
        setup.state.join("gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    db.prepare("SELECT source_id, state, last_error FROM deliveries WHERE route = 'twilio:main' ORDER BY received_at")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .filter_map(Result::ok)
        .collect()
}

#[test]
fn requests_signed_by_the_twilio_library_are_taken_and_answered_with_empty_twiml() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    let (_setup, _gw, hook) = start(&stub, "allow_all = true", "");
    let alice = "+15552220001";
    let mut media = sms("SMmedia", alice, "");
    media.retain(|(k, _)| k != "NumMedia");
    media.push(("NumMedia".into(), "1".into()));
    media.push((
        "MediaUrl0".into(),
        "https://api.twilio.com/media/ME1".into(),
    ));
    let mut status = sms("SMstatus", alice, "");
    status.retain(|(k, _)| k != "Body");
    status.push(("MessageStatus".into(), "delivered".into()));
    let forms = vec![
        sms("SM0001", alice, "hello"),
        sms("SM0001", alice, "hello"),
        sms("SM0002", FROM, "an echo of our own"),
        media,
        status,
        sms("SM0003", alice, "a+b & c = 😀 100%"),
    ];
    for r in post_signed(&python, hook, &forms) {
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("content-type"), Some("text/xml"));
        assert_eq!(r.body, TWIML);
    }
    // Twilio may sign the URL with its default port written out.
    let with_port = PUBLIC_URL.replace("sms.example.org", "sms.example.org:443");
    let form = sms("SM0004", alice, "port 443");
    let sig = sign(&python, TOKEN, &[(with_port, form.clone())]);
    assert_eq!(post_form(hook, Some(&sig[0]), &encode(&form)).status, 200);

    stub.wait_delivered(WAIT, |d| d.len() >= 3);
    std::thread::sleep(Duration::from_millis(800));
    let got = stub.delivered();
    let bodies: Vec<&str> = got.iter().map(|s| s.body.as_str()).collect();
    assert_eq!(bodies, ["hello", "a+b & c = 😀 100%", "port 443"]);
    assert!(got.iter().all(|s| s.to == alice && s.from == FROM));
}

#[test]
fn signatures_are_checked_before_anything_is_stored_and_bad_forms_get_clear_statuses() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    let (setup, gw, hook) = start(&stub, "allow_all = true", "");
    let form = sms("SM1000", "+15552220002", "hello");
    let body = encode(&form);
    let good = sign(&python, TOKEN, &[(PUBLIC_URL.to_owned(), form.clone())]);
    let wrong = sign(
        &python,
        "fedcba9876543210fedcba9876543210",
        &[(PUBLIC_URL.to_owned(), form.clone())],
    );
    let other_url = sign(
        &python,
        TOKEN,
        &[(
            "https://sms.example.org/platforms/twilio/other".to_owned(),
            form.clone(),
        )],
    );
    let r = post_form(hook, None, &body);
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"], "missing_signature");
    for (sig, what) in [(&wrong[0], "another token"), (&other_url[0], "another URL")] {
        let r = post_form(hook, Some(sig), &body);
        assert_eq!(r.status, 401, "{what}: {}", r.body);
        assert_eq!(r.json()["error"], "invalid_signature");
    }
    let tampered = body.replace("hello", "HELLO");
    assert_eq!(post_form(hook, Some(&good[0]), &tampered).status, 401);
    // A request signed with a shared key (HMAC-SHA256) is not checked with the token.
    let mut c = FormConn::open(hook).unwrap();
    let r = c
        .post("/platforms/twilio/main", FORM, Some(&good[0]), &body)
        .unwrap();
    assert_eq!(
        r.status, 200,
        "the same request without the settings header is fine"
    );
    let raw = format!(
        "POST /platforms/twilio/main HTTP/1.1\r\nHost: x\r\nContent-Type: {FORM}\r\nX-Twilio-Signature: {}\r\nX-Twilio-Webhooks-Signature-Settings: key=webhooks_sharedkey_1,algorithm=HMAC_SHA256\r\nContent-Length: {}\r\n\r\n{body}",
        good[0],
        body.len()
    );
    let mut conn = Conn::open(hook).unwrap();
    conn.send(&raw).unwrap();
    let r = read_any_response(&mut conn.r).unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body.contains("shared key"), "{}", r.body);
    let log = gw.wait_stderr("webhook refused", WAIT);
    assert!(log.contains("X-Twilio-Signature"), "{log}");
    assert!(!log.contains(TOKEN), "no token in the log");

    // Signed, but not what Twilio sends: 400; over [webhook] max_body: 413.
    let mut no_sid = sms("", "+15552220002", "no sid");
    no_sid.retain(|(k, _)| k != "MessageSid");
    let sig = sign(&python, TOKEN, &[(PUBLIC_URL.to_owned(), no_sid.clone())]);
    let r = post_form(hook, Some(&sig[0]), &encode(&no_sid));
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["error"], "malformed_body");
    let json_sig = sign(&python, TOKEN, &[(PUBLIC_URL.to_owned(), vec![])]);
    let r = FormConn::open(hook)
        .unwrap()
        .post(
            "/platforms/twilio/main",
            "application/json",
            Some(&json_sig[0]),
            "",
        )
        .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let big = sms("SMbig", "+15552220002", &"x".repeat(2 << 20));
    let r = post_form(hook, Some(&good[0]), &encode(&big));
    assert_eq!(r.status, 413);
    stub.wait_delivered(WAIT, |d| d.len() == 1);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stub.delivered().len(), 1, "only the one good request ran");
    assert_eq!(
        stored(&setup).len(),
        1,
        "nothing stored for a refused request"
    );
}

#[test]
fn replies_are_split_at_1600_retried_on_429_and_5xx_and_refusals_fail() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    let (a, b, c, d) = (
        "+15553330001",
        "+15553330002",
        "+15553330003",
        "+15553330004",
    );
    stub.set_policy(move |s, n| match (s.to.as_str(), n) {
        (x, 0) if x == a => Answer::ServerError,
        (x, 1) if x == a => Answer::TooMany(Some(1)),
        (x, 0) if x == d => Answer::TooMany(None),
        (x, _) if x == b => Answer::Refuse(
            400,
            21211,
            format!("The 'To' number {x} is not a valid phone number."),
        ),
        (x, _) if x == c => Answer::Refuse(
            400,
            21610,
            "Attempt to send to unsubscribed recipient".into(),
        ),
        _ => Answer::Ok,
    });
    let (setup, _gw, hook) = start(&stub, "allow_all = true", FAST_RETRIES);
    let long: String = (0..700).map(|i| format!("w{i} ")).collect();
    let forms = vec![
        sms("SMa0", a, "a0"),
        sms("SMa1", a, "a1"),
        sms("SMa2", a, "a2"),
        sms("SMb0", b, "b0"),
        sms("SMc0", c, "c0"),
        sms("SMd0", d, &long),
    ];
    for r in post_signed(&python, hook, &forms) {
        assert_eq!(r.status, 200);
    }
    let got = stub.wait_delivered(WAIT, |x| {
        let m = by_number(x);
        m.get(a).map_or(0, Vec::len) == 3 && m.get(d).map_or(0, Vec::len) >= 3
    });
    std::thread::sleep(Duration::from_millis(1000));
    let m = by_number(&stub.delivered());
    assert_eq!(m[a], ["a0", "a1", "a2"], "{got:?}");
    let calls = stub.calls();
    let to_a: Vec<_> = calls.iter().filter(|s| s.to == a).collect();
    assert_eq!(to_a.len(), 5, "a0: 500, 429, ok; then a1, a2");
    assert!(
        to_a[2].at - to_a[1].at >= Duration::from_millis(900),
        "Retry-After: 1"
    );
    // The long reply: parts of at most 1,600 characters, every word in order.
    assert!(m[d].len() >= 2);
    assert!(m[d].iter().all(|p| p.encode_utf16().count() <= 1600));
    assert_eq!(
        m[d].concat().split_whitespace().collect::<String>(),
        long.split_whitespace().collect::<String>()
    );
    // Refusals are not retried: one call each, the delivery failed with Twilio's words.
    assert_eq!(calls.iter().filter(|s| s.to == b).count(), 1);
    assert_eq!(calls.iter().filter(|s| s.to == c).count(), 1);
    let rows = stored(&setup);
    let failed: Vec<_> = rows.iter().filter(|r| r.1 == "failed").collect();
    assert_eq!(failed.len(), 2, "{rows:?}");
    assert!(
        failed
            .iter()
            .any(|r| r.0 == "SMb0" && r.2.as_deref().is_some_and(|e| e.contains("21211")))
    );
    assert!(
        failed
            .iter()
            .any(|r| r.0 == "SMc0" && r.2.as_deref().is_some_and(|e| e.contains("21610")))
    );
    assert!(
        !rows
            .iter()
            .any(|r| r.2.as_deref().is_some_and(|e| e.contains(TOKEN)))
    );
}

#[test]
fn commands_are_plain_words_access_is_denied_by_default_and_platforms_check_reads_the_account() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    let me = "+15554440001";
    let (setup, _gw, hook) = start(&stub, &format!("allowed_users = [\"{me}\"]"), "");
    let forms = vec![
        sms("SMc1", me, "help"),
        sms("SMc2", me, "Status"),
        sms("SMc3", me, "new"),
        sms("SMc4", me, "stop the music"),
        sms("SMc5", "+15554440002", "let me in"),
    ];
    // One by one: each is answered in its own time, commands at once.
    for f in &forms {
        let r = post_signed(&python, hook, std::slice::from_ref(f));
        assert_eq!(r[0].status, 200);
    }
    let got = stub.wait_delivered(WAIT, |d| d.len() >= 5);
    let mine: Vec<&str> = got
        .iter()
        .filter(|s| s.to == me)
        .map(|s| s.body.as_str())
        .collect();
    assert!(
        mine.iter()
            .any(|t| t.contains("new — start a new conversation")),
        "help, in plain words: {mine:?}"
    );
    assert!(
        mine.iter()
            .any(|t| t.contains(&format!("Conversation: twilio:main:{me}"))),
        "{mine:?}"
    );
    assert!(
        mine.iter().any(|t| t.contains("New conversation")),
        "{mine:?}"
    );
    assert!(mine.contains(&"stop the music"), "a sentence is a message");
    let other: Vec<_> = got.iter().filter(|s| s.to == "+15554440002").collect();
    assert_eq!(other.len(), 1);
    assert!(other[0].body.contains("private"));

    let out = Command::new(BIN)
        .args([
            "platforms",
            "check",
            "main",
            "--platform",
            "twilio",
            "--config",
        ])
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
        said.contains("Hermes test account") && said.contains(FROM),
        "{said}"
    );
    assert!(!said.contains(TOKEN));
}

#[test]
fn a_reload_changes_who_may_talk_and_a_changed_token_waits_for_a_restart() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    let (me, friend) = ("+15556660001", "+15556660002");
    let (setup, gw, hook) = start(&stub, &format!("allowed_users = [\"{me}\"]"), "");
    post_signed(&python, hook, &[sms("SMr1", friend, "before")]);
    let got = stub.wait_delivered(WAIT, |d| d.len() == 1);
    assert!(got[0].body.contains("private"), "{}", got[0].body);
    // The friend is added, and the token changed: access now, the token after a restart.
    let text = std::fs::read_to_string(&setup.config).unwrap();
    setup.write_config(
        &text
            .replace(
                &format!("allowed_users = [\"{me}\"]"),
                &format!("allowed_users = [\"{me}\", \"{friend}\"]"),
            )
            .replace(TOKEN, "00000000000000000000000000000000"),
    );
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    gw.wait_stderr("configuration reloaded", WAIT);
    let log = gw.wait_stderr("this takes a restart", WAIT);
    assert!(
        log.contains("twilio `main`: account_sid, auth_token"),
        "{log}"
    );
    // Still the running token: the old signatures are good, replies authenticate.
    post_signed(&python, hook, &[sms("SMr2", friend, "after")]);
    let got = stub.wait_delivered(WAIT, |d| d.len() == 2);
    assert_eq!(got[1].body, "after");
}

#[test]
fn a_token_that_cannot_be_read_exits_78_naming_the_key() {
    let stub = Stub::start();
    let cfg = twilio_config(&stub, PUBLIC_URL, "").replace(
        &format!("auth_token = \"{TOKEN}\""),
        "auth_token_file = \"/nonexistent/twilio-token\"",
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let mut gw = setup.spawn(&[], &[]);
    let st = gw.wait(Duration::from_secs(20));
    assert_eq!(st.code(), Some(78), "{}", gw.stderr());
    let err = gw.stderr();
    assert!(
        err.contains("[[platforms.twilio]] `main`: auth_token"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/twilio-token"), "{err}");
}
