//! WhatsApp on the Cloud API: Meta's `GET` verification and its signed `POST`s to
//! `/platforms/whatsapp/NAME`, each signature made in Python and accepted by pywa's
//! validator before it is sent (tests/platforms/sign.py), the replies recorded by a stub
//! Graph API (tests/whatsapp_support). Checked: the verify token; the signature before
//! anything is stored; messages answered once (by wamid), in order, quoting the user's
//! message; statuses stored nowhere; the stated rule for other kinds of messages; 429 and
//! 500 retried, a refusal final; commands as plain words; 4,096-character parts.

mod common;
mod whatsapp_support;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use whatsapp_support::*;

const WAIT: Duration = Duration::from_secs(30);

fn rows(setup: &Setup) -> Vec<(String, String, Option<String>)> {
    let db = rusqlite::Connection::open_with_flags(
        setup.state.join("gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .expect("open the store");
    let mut q = db
        .prepare("SELECT source_id, state, last_error FROM deliveries WHERE route = 'whatsapp:biz' ORDER BY received_at")
        .expect("prepare");
    q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

#[test]
fn meta_verifies_the_callback_url_with_the_verify_token() {
    let stub = Stub::start();
    let (setup, _gw, hook) = start(&stub, "allow_all = true", "");
    let get = |q: &str| request(hook, "GET", &format!("{PATH}?{q}"), &[], "").expect("request");
    let r = get(&format!(
        "hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token={VERIFY_TOKEN}"
    ));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "1158201444");
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("text/plain")
    );
    // Percent-encoded as Meta may send it.
    let r = get(&format!(
        "hub.mode=subscribe&hub.challenge=42&hub.verify_token={}",
        VERIFY_TOKEN.replace('-', "%2D")
    ));
    assert_eq!((r.status, r.body.as_str()), (200, "42"));
    let r = get("hub.mode=subscribe&hub.challenge=1158201444&hub.verify_token=guess");
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["error"], "invalid_verify_token");
    let r = get(&format!(
        "hub.mode=unsubscribe&hub.challenge=1&hub.verify_token={VERIFY_TOKEN}"
    ));
    assert_eq!(r.status, 400);
    let r = request(hook, "GET", PATH, &[], "").unwrap();
    assert_eq!(r.status, 400);
    assert!(rows(&setup).is_empty());
}

#[test]
fn signed_messages_are_answered_once_in_order_quoting_the_user() {
    let Some(signer) = Signer::start("whatsapp", APP_SECRET) else {
        return;
    };
    let stub = Stub::start();
    let (setup, gw, hook) = start(&stub, "allow_all = true", "");
    let a = "16315551234";
    let b = "447700900123";
    let first = text_webhook("wamid.A1", a, "hello").to_string();
    assert_eq!(post(hook, &signer, &first).status, 200);
    // Meta sends a webhook again when it missed the answer: once is enough.
    assert_eq!(post(hook, &signer, &first).status, 200);
    // Several messages in one webhook, of two users.
    let batch = webhook(
        vec![
            text("wamid.A2", a, "second"),
            text("wamid.B1", b, "from b"),
            text("wamid.A3", a, "third"),
        ],
        vec![contact(a, "Kerry"), contact(b, "Sam")],
    );
    assert_eq!(post(hook, &signer, &batch.to_string()).status, 200);
    // Status callbacks of the gateway's own replies: 200, stored nowhere.
    let before = rows(&setup).len();
    let statuses = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "value": {"messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550100000", "phone_number_id": PHONE_ID},
            "statuses": [{"id": "wamid.OUT000001", "status": "delivered", "timestamp": "1700000001",
                "recipient_id": a}, {"id": "wamid.OUT000001", "status": "read",
                "timestamp": "1700000002", "recipient_id": a}]},
        "field": "messages"}]}]});
    assert_eq!(post(hook, &signer, &statuses.to_string()).status, 200);
    assert_eq!(rows(&setup).len(), before, "statuses are stored nowhere");

    // The rule for other kinds: a caption is taken; a sticker or a voice message is
    // answered by the gateway; a reaction, an unknown type, another number's message and
    // another object are let go.
    let c = "5511987654321";
    let kinds = webhook(
        vec![
            json!({"from": c, "id": "wamid.C1", "timestamp": "1700000000", "type": "image",
                "image": {"caption": "look at this", "mime_type": "image/jpeg", "sha256": "x", "id": "m1"}}),
            json!({"from": c, "id": "wamid.C2", "timestamp": "1700000000", "type": "sticker",
                "sticker": {"mime_type": "image/webp", "sha256": "x", "id": "m2", "animated": false}}),
            json!({"from": c, "id": "wamid.C3", "timestamp": "1700000000", "type": "audio",
                "audio": {"mime_type": "audio/ogg; codecs=opus", "sha256": "x", "id": "m3", "voice": true}}),
            json!({"from": c, "id": "wamid.C4", "timestamp": "1700000000", "type": "reaction",
                "reaction": {"message_id": "wamid.OUT000001", "emoji": "👍"}}),
            json!({"from": c, "id": "wamid.C5", "timestamp": "1700000000", "type": "order",
                "order": {"catalog_id": "1"}}),
        ],
        vec![contact(c, "Ana")],
    );
    assert_eq!(post(hook, &signer, &kinds.to_string()).status, 200);
    let mut other_number = text_webhook("wamid.D1", c, "to the other number");
    other_number["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = "999".into();
    assert_eq!(post(hook, &signer, &other_number.to_string()).status, 200);
    let page = json!({"object": "page", "entry": [{"id": "1", "messaging": []}]});
    assert_eq!(post(hook, &signer, &page.to_string()).status, 200);
    let other_field = json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "value": {"event": "APPROVED"}, "field": "message_template_status_update"}]}]});
    assert_eq!(post(hook, &signer, &other_field.to_string()).status, 200);

    stub.wait_delivered(WAIT, |d| d.len() >= 7);
    std::thread::sleep(Duration::from_millis(800));
    let got = stub.delivered();
    let users = by_user(&got);
    assert_eq!(got.len(), 7, "{users:?}");
    assert_eq!(users[a], ["hello", "second", "third"]);
    assert_eq!(users[b], ["from b"]);
    // The gateway's own answers go out at once; the caption's reply after its turn.
    let of_c = &users[c];
    assert_eq!(of_c.len(), 3, "{users:?}");
    assert!(of_c.iter().any(|t| t == "look at this"), "{users:?}");
    assert!(
        of_c.iter()
            .any(|t| t.contains("I can only read text: a sticker")),
        "{users:?}"
    );
    assert!(
        of_c.iter()
            .any(|t| t.contains("I can only read text: a voice message")),
        "{users:?}"
    );
    for call in &got {
        assert_eq!(call.auth, format!("Bearer {ACCESS_TOKEN}"));
        assert_eq!(call.path, format!("/{VERSION}/{PHONE_ID}/messages"));
        assert_eq!(call.body["messaging_product"], "whatsapp");
        assert_eq!(call.body["type"], "text");
    }
    let quoted: Vec<Option<&str>> = got
        .iter()
        .filter(|c| c.to() == a)
        .map(|c| c.context())
        .collect();
    assert_eq!(
        quoted,
        [Some("wamid.A1"), Some("wamid.A2"), Some("wamid.A3")]
    );
    let log = gw.stderr();
    assert!(
        !log.contains(ACCESS_TOKEN) && !log.contains(APP_SECRET) && !log.contains(VERIFY_TOKEN),
        "no secret in the log"
    );
}

#[test]
fn forged_oversized_and_malformed_webhooks_are_refused_and_nothing_is_stored() {
    let Some(signer) = Signer::start("whatsapp", APP_SECRET) else {
        return;
    };
    let Some(other) = Signer::start("whatsapp", "not-the-app-secret") else {
        return;
    };
    let stub = Stub::start();
    let (setup, _gw, hook) = start(
        &stub,
        "allow_all = true",
        "[webhook]\nmax_body = \"64KiB\"\n",
    );
    let body = text_webhook("wamid.F1", "16315551234", "let me in").to_string();
    let sig = signer.sign("", &body);
    let send = |headers: &[(&str, &str)], body: &str| {
        request(hook, "POST", PATH, headers, body).expect("request")
    };
    let tampered = body.replace("let me in", "let me out");
    let r = send(&[("X-Hub-Signature-256", &sig)], &tampered);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("invalid_signature"))
    );
    let r = send(&[("X-Hub-Signature-256", &other.sign("", &body))], &body);
    assert_eq!(r.status, 401);
    let r = send(&[], &body);
    assert_eq!(
        (r.status, r.json()["error"].as_str()),
        (401, Some("missing_signature"))
    );
    let sha1 = sig.replace("sha256=", "sha1=");
    assert_eq!(send(&[("X-Hub-Signature", &sha1)], &body).status, 401);
    assert_eq!(send(&[("X-Hub-Signature-256", &sha1)], &body).status, 401);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        rows(&setup).is_empty(),
        "nothing stored for a refused request"
    );
    assert!(stub.calls().is_empty());

    let big = text_webhook("wamid.F2", "16315551234", &"x".repeat(100_000)).to_string();
    assert_eq!(post(hook, &signer, &big).status, 413);
    for bad in [
        "{not json",
        "[]",
        "{\"object\": \"whatsapp_business_account\"}",
    ] {
        let r = post(hook, &signer, bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }
    assert!(rows(&setup).is_empty());
    assert_eq!(post(hook, &signer, &body).status, 200);
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert_eq!(got[0].text(), "let me in");
}

#[test]
fn throughput_limits_and_500_are_retried_and_a_refusal_ends_the_reply() {
    let Some(signer) = Signer::start("whatsapp", APP_SECRET) else {
        return;
    };
    let stub = Stub::start();
    stub.set_policy(|c, n| match (c.to(), n) {
        ("15550001111", 0) => Answer::RateLimited(2),
        ("15550001111", 1) => Answer::ServerError,
        ("15550002222", _) => Answer::Refuse(
            131047,
            "Re-engagement message: more than 24 hours have passed".into(),
        ),
        _ => Answer::Ok,
    });
    let (setup, _gw, hook) = start(
        &stub,
        "allow_all = true",
        "[webhook]\nretry_initial = \"50ms\"\nretry_max = \"200ms\"\n",
    );
    for (id, from, t) in [
        ("wamid.R1", "15550001111", "patience"),
        ("wamid.R2", "15550002222", "late"),
    ] {
        assert_eq!(
            post(hook, &signer, &text_webhook(id, from, t).to_string()).status,
            200
        );
    }
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert_eq!(got[0].text(), "patience");
    let tries: Vec<_> = stub
        .calls()
        .into_iter()
        .filter(|c| c.to() == "15550001111")
        .collect();
    assert_eq!(tries.len(), 3, "429, 500, then delivered");
    assert!(
        tries[1].at.duration_since(tries[0].at) >= Duration::from_millis(1900),
        "Retry-After: 2 was honoured"
    );
    let end = Instant::now() + WAIT;
    loop {
        let r = rows(&setup);
        if let Some((_, _, err)) = r
            .iter()
            .find(|(id, st, _)| id == "wamid.R2" && st == "failed")
        {
            assert!(err.as_deref().unwrap_or("").contains("131047"), "{r:?}");
            break;
        }
        assert!(Instant::now() < end, "never failed: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let refused = stub
        .calls()
        .into_iter()
        .filter(|c| c.to() == "15550002222")
        .count();
    assert_eq!(refused, 1, "a refusal is not retried");
    let st = status_json(&setup.control);
    let p = st["platforms"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["platform"] == "whatsapp"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (p["name"].as_str(), p["state"].as_str()),
        (Some("biz"), Some("webhook")),
        "{p}"
    );
    // The latest of the errors: a 500, or the refusal, whichever came last.
    let last = p["last_error"].as_str().unwrap_or("");
    assert!(last.contains("131047") || last.contains("500"), "{p}");
    assert!(!st.to_string().contains(ACCESS_TOKEN));
}

#[test]
fn commands_are_plain_words_and_long_replies_split_at_4096() {
    let Some(signer) = Signer::start("whatsapp", APP_SECRET) else {
        return;
    };
    let stub = Stub::start();
    let (_setup, _gw, hook) = start(&stub, "allowed_users = [\"16315551234\"]", "");
    let me = "16315551234";
    assert_eq!(
        post(
            hook,
            &signer,
            &text_webhook("wamid.S1", me, "Status").to_string()
        )
        .status,
        200
    );
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    assert!(
        got[0]
            .text()
            .contains("Conversation: whatsapp:biz:16315551234"),
        "{}",
        got[0].text()
    );
    // Someone not on the list is told once and never reaches the agent.
    assert_eq!(
        post(
            hook,
            &signer,
            &text_webhook("wamid.S2", "4915123456789", "hi").to_string()
        )
        .status,
        200
    );
    let got = stub.wait_delivered(WAIT, |d| d.len() >= 2);
    assert!(
        got[1].text().contains("not on its list"),
        "{}",
        got[1].text()
    );

    let words: Vec<String> = (0..1500).map(|i| format!("word{i:04}")).collect();
    let long = words.join(" ");
    assert_eq!(
        post(
            hook,
            &signer,
            &text_webhook("wamid.L1", me, &long).to_string()
        )
        .status,
        200
    );
    stub.wait_delivered(WAIT, |d| d.len() >= 5);
    std::thread::sleep(Duration::from_millis(500));
    let parts: Vec<_> = stub.delivered().into_iter().skip(2).collect();
    assert!(parts.len() >= 3, "{} parts", parts.len());
    for (i, p) in parts.iter().enumerate() {
        assert!(p.text().chars().count() <= 4096);
        assert_eq!(p.to(), me);
        assert_eq!(
            p.context(),
            (i == 0).then_some("wamid.L1"),
            "only the first part quotes"
        );
    }
    let joined: Vec<String> = parts
        .iter()
        .flat_map(|c| {
            c.text()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(joined, words);
}

#[test]
fn platforms_check_gets_the_phone_number_id_and_unreadable_secrets_exit_78() {
    let stub = Stub::start();
    let setup = Setup::new("127.0.0.1:0", &whatsapp_config(&stub, "allow_all = true"));
    let run = |config: &std::path::Path, args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(config)
            .output()
            .expect("run the CLI")
    };
    let out = run(&setup.config, &["platforms", "check", "biz"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("+1 555-010-0000") && said.contains("Hermes Test"),
        "{said}"
    );
    let calls = stub.calls();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method, "GET");
    assert!(calls[0].path.starts_with(&format!("/{VERSION}/{PHONE_ID}")));
    assert_eq!(calls[0].auth, format!("Bearer {ACCESS_TOKEN}"));

    let bad = setup.dir.path().join("bad-token.toml");
    std::fs::write(
        &bad,
        whatsapp_config(&stub, "").replace(ACCESS_TOKEN, "EAAGexpiredSECRET"),
    )
    .unwrap();
    let out = run(&bad, &["platforms", "check", "biz"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("190") && !err.contains("expiredSECRET"),
        "{err}"
    );

    let missing = setup.dir.path().join("missing.toml");
    std::fs::write(
        &missing,
        format!(
            "[listen]\napi = \"127.0.0.1:0\"\nwebhook = \"127.0.0.1:0\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n{}",
            setup.control.display(),
            setup.state.display(),
            whatsapp_config(&stub, "").replace(
                &format!("access_token = \"{ACCESS_TOKEN}\""),
                "access_token_file = \"/nonexistent/wa-token\""
            )
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
        err.contains("[[platforms.whatsapp]] `biz`: access_token"),
        "{err}"
    );
    assert!(err.contains("/nonexistent/wa-token"), "{err}");
}
