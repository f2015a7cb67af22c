//! Slack on the Events API: `POST /platforms/slack/NAME`, every request signed by
//! slack_sdk's own `SignatureVerifier.generate_signature` (tests/platforms/sign.py), the
//! replies recorded by a stub Web API (tests/slack_support). Checked: the signature, the
//! timestamp and the body before anything is stored; url_verification; app_mention in
//! channels and message in DMs, answered once in their thread, a retry of a stored event
//! running nothing; bots never answered; commands as plain words, one conversation per
//! thread; ratelimited / 500 retried, channel_not_found final; replies split at 4,000.

mod common;
mod slack_support;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use slack_support::*;

const WAIT: Duration = Duration::from_secs(30);

fn count_stored(setup: &Setup) -> i64 {
    let db = rusqlite::Connection::open_with_flags(
        setup.state.join("gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the store");
    db.query_row(
        "SELECT COUNT(*) FROM deliveries WHERE route = 'slack:work'",
        [],
        |r| r.get(0),
    )
    .expect("count")
}

fn states(setup: &Setup) -> Vec<(String, Option<String>)> {
    let db = rusqlite::Connection::open_with_flags(
        setup.state.join("gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the store");
    let mut q = db
        .prepare("SELECT state, last_error FROM deliveries WHERE route = 'slack:work' ORDER BY received_at")
        .expect("prepare");
    q.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

#[test]
fn events_signed_by_slack_sdk_are_answered_once_in_their_thread() {
    let Some(signer) = Signer::start("slack", SIGNING_SECRET) else {
        return;
    };
    let stub = Stub::start();
    let (_setup, gw, hook) = start(&stub, "allow_all = true", "");

    // Slack's Request URL check.
    let r = post(
        hook,
        &signer,
        &json!({"token": "t", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P", "type": "url_verification"}).to_string(),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        r.json()["challenge"],
        "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    );

    // A mention starts a thread; a mention in that thread stays in it; a DM is answered
    // where it was written.
    let m1 = mention(
        "Ev01",
        "C0CHAN",
        "U0ALICE",
        "100.000001",
        None,
        "hello channel",
    )
    .to_string();
    let m2 = mention(
        "Ev02",
        "C0CHAN",
        "U0BOB",
        "100.000009",
        Some("100.000001"),
        "and me",
    )
    .to_string();
    let d1 = dm("Ev03", "D0DM", "U0ALICE", "200.000001", "hello dm").to_string();
    for b in [&m1, &m2, &d1] {
        let r = post(hook, &signer, b, None);
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // Slack sends an event again when it missed the answer: 200, nothing runs twice.
    for b in [&m1, &d1] {
        assert_eq!(post(hook, &signer, b, Some(1)).status, 200);
        assert_eq!(post(hook, &signer, b, Some(2)).status, 200);
    }
    // Never answered: the app's own reply coming back, another bot, an edit, a channel
    // message without a mention, an event type the gateway does not take, a new type.
    let lets_go = [
        event(
            "Ev10",
            json!({"type": "message", "channel_type": "im", "channel": "D0DM",
            "user": BOT_USER, "bot_id": "B0BOT", "text": "hello dm", "ts": "200.000002"}),
        ),
        event(
            "Ev11",
            json!({"type": "message", "channel_type": "im", "channel": "D0DM",
            "subtype": "bot_message", "bot_id": "B0OTHER", "text": "beep", "ts": "200.000003"}),
        ),
        event(
            "Ev12",
            json!({"type": "message", "channel_type": "im", "channel": "D0DM",
            "subtype": "message_changed", "message": {"text": "edited"}, "ts": "200.000004"}),
        ),
        event(
            "Ev13",
            json!({"type": "message", "channel_type": "channel", "channel": "C0CHAN",
            "user": "U0ALICE", "text": "just chatting", "ts": "100.000020"}),
        ),
        event(
            "Ev14",
            json!({"type": "reaction_added", "user": "U0ALICE", "reaction": "+1",
            "item": {"type": "message", "channel": "C0CHAN", "ts": "100.000001"}}),
        ),
        json!({"type": "app_rate_limited", "team_id": TEAM, "minute_rate_limited": 1_700_000_000, "api_app_id": "A0TEST"}),
        json!({"type": "something_new", "token": "t"}),
    ];
    for b in &lets_go {
        let r = post(hook, &signer, &b.to_string(), None);
        assert_eq!(r.status, 200, "{b}: {}", r.body);
    }

    let got = stub.wait_delivered(WAIT, |d| d.len() >= 3);
    std::thread::sleep(Duration::from_millis(800));
    let got = if stub.delivered().len() > got.len() {
        stub.delivered()
    } else {
        got
    };
    let places = by_place(&got);
    assert_eq!(got.len(), 3, "each message answered once: {places:?}");
    // A thread in a channel is shared: the agent sees who speaks.
    assert_eq!(
        places["C0CHAN/100.000001"],
        ["[U0ALICE] hello channel", "[U0BOB] and me"]
    );
    assert_eq!(places["D0DM/-"], ["hello dm"]);
    for c in &got {
        assert_eq!(c.auth, format!("Bearer {BOT_TOKEN}"));
    }
    let log = gw.stderr();
    assert!(
        !log.contains(BOT_TOKEN) && !log.contains(SIGNING_SECRET),
        "no secret in the log"
    );
    assert!(
        log.contains("repeated message"),
        "the retries were recognised"
    );
}

#[test]
fn forged_stale_and_malformed_requests_are_refused_and_nothing_is_stored() {
    let Some(signer) = Signer::start("slack", SIGNING_SECRET) else {
        return;
    };
    let Some(other) = Signer::start("slack", "not-the-signing-secret") else {
        return;
    };
    let stub = Stub::start();
    let (setup, gw, hook) = start(
        &stub,
        "allow_all = true",
        "[webhook]\nmax_body = \"64KiB\"\n",
    );
    let body = dm("Ev20", "D0DM", "U0ALICE", "300.000001", "let me in").to_string();
    let ts = now_ts();
    let sig = signer.sign(&ts, &body);
    let send = |ts: &str, sig: &str, body: &str| {
        request(
            hook,
            "POST",
            PATH,
            &[
                ("X-Slack-Request-Timestamp", ts),
                ("X-Slack-Signature", sig),
            ],
            body,
        )
        .expect("request")
    };
    // A tampered body, a wrong secret, a replay from six minutes ago, a moved timestamp.
    let tampered = body.replace("let me in", "let me out");
    let r = send(&ts, &sig, &tampered);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("invalid_signature"))
    );
    let r = send(&ts, &other.sign(&ts, &body), &body);
    assert_eq!(r.status, 401);
    let old = (now_ts().parse::<i64>().unwrap() - 360).to_string();
    let r = send(&old, &signer.sign(&old, &body), &body);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("stale_timestamp")),
        "{}",
        r.body
    );
    let later = (ts.parse::<i64>().unwrap() + 1).to_string();
    assert_eq!(send(&later, &sig, &body).status, 401);
    // Missing headers.
    let r = request(hook, "POST", PATH, &[("X-Slack-Signature", &sig)], &body).unwrap();
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("missing_signature"))
    );
    let r = request(hook, "POST", PATH, &[], &body).unwrap();
    assert_eq!(r.status, 401);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        count_stored(&setup),
        0,
        "nothing stored for a refused request"
    );
    assert!(stub.calls("chat.postMessage").is_empty());

    // Over [webhook] max_body: 413, before anything else.
    let big = dm(
        "Ev21",
        "D0DM",
        "U0ALICE",
        "300.000002",
        &"x".repeat(100_000),
    )
    .to_string();
    let r = post(hook, &signer, &big, None);
    assert_eq!(r.status, 413);
    // Signed, but not an event: 400.
    for bad in [
        "{not json",
        "[1, 2]",
        "{\"type\": \"event_callback\", \"event\": {}}",
        "{\"no\": \"type\"}",
    ] {
        let r = post(hook, &signer, bad, None);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    // GET is not Slack's.
    let r = request(hook, "GET", PATH, &[], "").unwrap();
    assert_eq!(r.status, 405);
    assert_eq!(count_stored(&setup), 0);

    // The same event, properly signed, is taken.
    assert_eq!(post(hook, &signer, &body, None).status, 200);
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert_eq!(got[0].text(), "let me in");
    let log = gw.stderr();
    assert!(
        log.contains("PLATFORM") || log.contains("slack"),
        "refusals are logged"
    );
    assert!(!log.contains(SIGNING_SECRET), "no secret in the log");
}

#[test]
fn threads_are_conversations_and_commands_are_plain_words() {
    let Some(signer) = Signer::start("slack", SIGNING_SECRET) else {
        return;
    };
    let stub = Stub::start();
    let (_setup, _gw, hook) = start(&stub, "allowed_users = [\"U0ALICE\"]", "");
    let posts = [
        mention("Ev30", "C0CHAN", "U0ALICE", "111.000001", None, "status"),
        mention("Ev31", "C0CHAN", "U0ALICE", "222.000001", None, "status"),
        dm("Ev32", "D0DM", "U0ALICE", "333.000001", "help"),
        dm("Ev33", "D0DM", "U0ALICE", "333.000002", "status"),
        // Not on the list: refused once, never reaches the agent.
        dm("Ev34", "D0EVE", "U0EVE", "444.000001", "hello"),
    ];
    for p in &posts {
        assert_eq!(post(hook, &signer, &p.to_string(), None).status, 200);
    }
    let got = stub.wait_delivered(WAIT, |d| d.len() >= 5);
    let places = by_place(&got);
    assert!(
        places["C0CHAN/111.000001"][0].contains("Conversation: slack:work:C0CHAN:111.000001"),
        "{places:?}"
    );
    assert!(places["C0CHAN/222.000001"][0].contains("Conversation: slack:work:C0CHAN:222.000001"));
    let dm_replies = &places["D0DM/-"];
    assert!(
        dm_replies[0].contains("new — start a new conversation"),
        "{dm_replies:?}"
    );
    assert!(
        !dm_replies[0].contains("/new"),
        "plain words on Slack: {dm_replies:?}"
    );
    assert!(dm_replies[1].contains("Conversation: slack:work:D0DM"));
    assert!(
        places["D0EVE/-"][0].contains("not on its list"),
        "{places:?}"
    );
}

#[test]
fn ratelimited_and_500_are_retried_and_channel_not_found_ends_the_reply() {
    let Some(signer) = Signer::start("slack", SIGNING_SECRET) else {
        return;
    };
    let stub = Stub::start();
    stub.set_policy(|c, n| match (c.channel(), n) {
        ("D0LIMIT", 0) => Answer::RateLimited(2),
        ("D0LIMIT", 1) => Answer::ServerError,
        ("D0GONE", _) => Answer::Refuse("channel_not_found".into()),
        _ => Answer::Ok,
    });
    let (setup, _gw, hook) = start(
        &stub,
        "allow_all = true",
        "[webhook]\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n",
    );
    let sent = Instant::now();
    for p in [
        dm("Ev40", "D0LIMIT", "U0ALICE", "500.000001", "patience"),
        dm("Ev41", "D0GONE", "U0BOB", "600.000001", "anyone?"),
    ] {
        assert_eq!(post(hook, &signer, &p.to_string(), None).status, 200);
    }
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert_eq!(got[0].text(), "patience");
    let calls = stub.calls("chat.postMessage");
    let limited: Vec<_> = calls.iter().filter(|c| c.channel() == "D0LIMIT").collect();
    assert_eq!(limited.len(), 3, "429, 500, then delivered");
    assert!(
        limited[1].at.duration_since(limited[0].at) >= Duration::from_millis(1900),
        "Retry-After: 2 was honoured"
    );
    assert!(sent.elapsed() >= Duration::from_secs(2));
    // channel_not_found: failed at once, with Slack's word kept, never retried.
    let end = Instant::now() + WAIT;
    loop {
        let s = states(&setup);
        if s.iter().any(|(st, _)| st == "failed") {
            let (_, err) = s.iter().find(|(st, _)| st == "failed").unwrap();
            assert!(
                err.as_deref().unwrap_or("").contains("channel_not_found"),
                "{s:?}"
            );
            break;
        }
        assert!(Instant::now() < end, "never failed: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let gone = stub
        .calls("chat.postMessage")
        .into_iter()
        .filter(|c| c.channel() == "D0GONE")
        .count();
    assert_eq!(gone, 1, "a refusal is not retried");
    // status: the instance, its state and its last error, never the token.
    let st = status_json(&setup.control);
    let p = st["platforms"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["platform"] == "slack"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (p["name"].as_str(), p["state"].as_str()),
        (Some("work"), Some("webhook")),
        "{p}"
    );
    // The latest of the errors: a 500, or the refusal, whichever came last.
    let last = p["last_error"].as_str().unwrap_or("");
    assert!(
        last.contains("channel_not_found") || last.contains("500"),
        "{p}"
    );
    assert!(!st.to_string().contains(BOT_TOKEN));
}

#[test]
fn a_long_reply_is_split_at_4000_characters_in_its_thread() {
    let Some(signer) = Signer::start("slack", SIGNING_SECRET) else {
        return;
    };
    let stub = Stub::start();
    let (_setup, _gw, hook) = start(&stub, "allow_all = true", "");
    let words: Vec<String> = (0..1500).map(|i| format!("word{i:04}")).collect();
    let text = words.join(" ");
    assert!(text.chars().count() > 10_000);
    let p = mention("Ev50", "C0LONG", "U0ALICE", "700.000001", None, &text);
    assert_eq!(post(hook, &signer, &p.to_string(), None).status, 200);
    stub.wait_delivered(WAIT, |d| d.len() >= 4);
    std::thread::sleep(Duration::from_millis(500));
    let got = stub.delivered();
    assert!(got.len() >= 4, "{} parts", got.len());
    for c in &got {
        assert!(
            c.text().chars().count() <= 4000,
            "{} characters",
            c.text().chars().count()
        );
        assert_eq!(c.place(), "C0LONG/700.000001");
    }
    let joined: Vec<String> = got
        .iter()
        .flat_map(|c| {
            c.text()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(joined[0], "[U0ALICE]");
    assert_eq!(
        &joined[1..],
        &words[..],
        "nothing lost or reordered between parts"
    );
}

#[test]
fn platforms_check_calls_auth_test_and_unreadable_secrets_exit_78() {
    let stub = Stub::start();
    let setup = Setup::new("127.0.0.1:0", &slack_config(&stub, "allow_all = true"));
    let run = |config: &std::path::Path, args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .expect("run the CLI")
    };
    let out = run(&setup.config, &["platforms", "check", "work"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("U0BOT") && said.contains("Hermes Test"),
        "{said}"
    );
    let calls = stub.calls("auth.test");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].auth, format!("Bearer {BOT_TOKEN}"));
    let out = run(
        &setup.config,
        &["platforms", "check", "work", "--platform", "slack"],
    );
    assert!(out.status.success());
    let out = run(
        &setup.config,
        &["platforms", "check", "work", "--platform", "telegram"],
    );
    assert_eq!(out.status.code(), Some(78));

    // A token Slack refuses: check fails, saying Slack's word, never the token.
    let bad = setup.dir.path().join("bad-token.toml");
    std::fs::write(
        &bad,
        slack_config(&stub, "").replace(BOT_TOKEN, "xoxb-9-9-revokedSECRET"),
    )
    .unwrap();
    let out = run(&bad, &["platforms", "check", "work"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("invalid_auth") && !err.contains("revokedSECRET"),
        "{err}"
    );

    // A secret file that cannot be read: the gateway exits 78 naming the key and the file.
    let missing = setup.dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        format!(
            "[listen]\napi = \"127.0.0.1:0\"\nwebhook = \"127.0.0.1:0\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n[[platforms.slack]]\nname = \"work\"\nsigning_secret_file = \"/nonexistent/slack-signing\"\nbot_token = \"{BOT_TOKEN}\"\n",
            setup.control.display(),
            setup.state.display()
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(["run", "--config"]).arg(&missing);
    cmd.env_remove("NOTIFY_SOCKET").env_remove("LISTEN_FDS");
    let mut gw = spawn_command(cmd);
    let st = gw.wait(Duration::from_secs(20));
    assert_eq!(st.code(), Some(78), "{}", gw.stderr());
    let err = gw.stderr();
    assert!(
        err.contains("[[platforms.slack]] `work`: signing_secret"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/slack-signing"), "{err}");
}
