//! A Telegram chat as its user sees it (polling mode, stub Bot API): commands answered by
//! the gateway even while a turn runs, deny-by-default access and pairing, long replies
//! split at Telegram's limit, the Bot API's 429/5xx retried and a blocked chat failed,
//! groups and forum topics, the per-chat inbound limit and the queue bound.

mod common;
mod telegram_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use telegram_support::*;

const WAIT: Duration = Duration::from_secs(30);

/// Replies `N|TEXT` (N: messages the agent was given, history included); `slow S` sleeps S
/// seconds first; `long` replies with about 10,000 characters.
const AGENT: &str = r#"
import json, sys, time
t = json.load(sys.stdin)
m = t["messages"]
last = [x for x in m if x["role"] == "user"][-1]["content"]
if last.startswith("slow"):
    time.sleep(float(last.split()[1]))
if last.startswith("long"):
    out, n = [], 0
    while sum(len(s) for s in out) < 10000:
        out.append("Sentence number %d of a long reply. " % n)
        n += 1
        if n % 7 == 0:
            out.append("\n\n")
    sys.stdout.write("".join(out))
else:
    sys.stdout.write("%d|%s" % (len(m), last))
"#;

fn agent() -> String {
    format!(
        "[agent]\nbackend = \"command\"\ncommand = [\"python3\", \"-c\", {}]\n",
        serde_json::to_string(AGENT).unwrap()
    )
}

fn start(stub: &Stub, platform: &str, extra: &str) -> (Setup, Gateway) {
    let cfg = format!(
        "{}{extra}\n{}",
        agent(),
        telegram_config(stub, &format!("poll_timeout = \"5s\"\n{platform}"))
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let notify = setup.notify();
    let gw = setup.spawn(
        &[],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    (setup, gw)
}

fn texts_to(calls: &[Call], chat: i64) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.chat() == chat)
        .map(|c| c.text().to_owned())
        .collect()
}

fn say(stub: &Stub, chat: i64, user: i64, text: &str) -> i64 {
    let id = stub.next_update_id();
    stub.push(text_update(chat, user, id, text));
    id
}

fn cli(setup: &Setup, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--socket")
        .arg(&setup.control)
        .output()
        .expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn commands_are_answered_by_the_gateway_even_while_a_turn_runs() {
    let stub = Stub::start();
    let (_setup, _gw) = start(&stub, "allowed_users = [7]", "");
    say(&stub, 7, 7, "first");
    stub.wait_delivered(WAIT, |d| d.len() == 1);
    let t0 = Instant::now();
    say(&stub, 7, 7, "slow 4");
    std::thread::sleep(Duration::from_millis(500));
    say(&stub, 7, 7, "/status");
    say(&stub, 7, 7, "/help");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 3);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "answered while the turn ran"
    );
    // Answers of the gateway's own go out at once, each on its own: in either order.
    let status = got[1..]
        .iter()
        .map(Call::text)
        .find(|t| t.contains("Conversation:"))
        .expect("the /status answer");
    assert!(status.contains("Conversation: telegram:main:7"), "{status}");
    assert!(status.contains("writing a reply"), "{status}");
    assert!(
        got[1..].iter().any(|c| c.text().contains("/new")),
        "the /help answer"
    );
    // While the turn runs, the chat sees "typing…".
    let typing = stub.calls("sendChatAction");
    assert!(
        typing
            .iter()
            .any(|c| c.chat() == 7 && c.body["action"] == "typing"),
        "{typing:?}"
    );
    // /stop cancels the running turn: its reply never comes.
    say(&stub, 7, 7, "/stop");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 4);
    assert!(got[3].text().contains("Stopped"), "{}", got[3].text());
    say(&stub, 7, 7, "/start");
    say(&stub, 7, 7, "after stop");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 6);
    assert!(got[4].text().contains("/help"), "{}", got[4].text());
    // first, its reply, (slow 4 cancelled: stored as nothing), after stop: 3 messages.
    assert_eq!(got[5].text(), "3|after stop");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(stub.delivered().len(), 6, "the stopped turn sent nothing");
    // /new: a new conversation, without the old history.
    say(&stub, 7, 7, "/new");
    say(&stub, 7, 7, "fresh");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 8);
    assert!(
        got[6].text().contains("New conversation"),
        "{}",
        got[6].text()
    );
    assert_eq!(got[7].text(), "1|fresh");
    say(&stub, 7, 7, "/status");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 9);
    assert!(
        got[8].text().contains("telegram:main:7#"),
        "{}",
        got[8].text()
    );
}

#[test]
fn deny_by_default_refuses_once_and_never_reaches_the_agent() {
    let stub = Stub::start();
    let (_setup, gw) = start(&stub, "", "");
    for i in 0..3 {
        say(&stub, 9, 9, &format!("let me in {i}"));
    }
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    std::thread::sleep(Duration::from_millis(800));
    let all = stub.delivered();
    assert_eq!(all.len(), 1, "refused once: {:?}", texts_to(&all, 9));
    assert!(got[0].text().contains("private"), "{}", got[0].text());
    assert!(!all.iter().any(|c| c.text().contains("let me in")));
    let log = gw.wait_stderr("may not talk to the agent", WAIT);
    assert!(log.contains("refused"), "{log}");
}

#[test]
fn pairing_codes_are_approved_by_the_operator_and_revoked() {
    let stub = Stub::start();
    let (setup, _gw) = start(&stub, "pairing = true", "");
    say(&stub, 9, 9, "hello?");
    let got = stub.wait_delivered(WAIT, |d| !d.is_empty());
    let text = got[0].text().to_owned();
    let code = text
        .split("pairing approve ")
        .nth(1)
        .expect("the reply names the command")
        .trim()
        .to_owned();
    assert_eq!(code.len(), 8, "{text}");
    let (rc, out, err) = cli(&setup, &["pairing", "list"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains(&code) && out.contains("pending"), "{out}");
    let (rc, _, err) = cli(&setup, &["pairing", "approve", "WRONGCOD"]);
    assert_ne!(rc, 0);
    assert!(err.contains("no pairing request"), "{err}");
    let (rc, out, err) = cli(&setup, &["pairing", "approve", &code.to_lowercase()]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("approved"), "{out}");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 2);
    assert!(got[1].text().contains("approved you"), "{}", got[1].text());
    say(&stub, 9, 9, "now?");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 3);
    assert_eq!(got[2].text(), "1|now?");
    let (rc, out, _) = cli(&setup, &["pairing", "list"]);
    assert_eq!(rc, 0);
    assert!(out.contains("approved"), "{out}");
    let (rc, out, err) = cli(&setup, &["pairing", "revoke", "9"]);
    assert_eq!(rc, 0, "{err}");
    assert!(out.contains("revoked user 9"), "{out}");
    say(&stub, 9, 9, "still?");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 4);
    assert!(got[3].text().contains("pairing code"), "{}", got[3].text());
}

#[test]
fn a_ten_thousand_character_reply_goes_out_in_parts_within_the_limit() {
    let stub = Stub::start();
    let (_setup, _gw) = start(&stub, "allow_all = true", "");
    let msg = say(&stub, 5, 5, "long");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 3);
    for c in &got {
        let units: usize = c.text().encode_utf16().count();
        assert!(units <= 4096, "{units} units");
    }
    assert_eq!(
        got[0].reply_to(),
        Some(msg),
        "the first part quotes the message"
    );
    assert_eq!(got[1].reply_to(), None);
    let joined = got.iter().map(Call::text).collect::<Vec<_>>().join(" ");
    let n = joined.matches("Sentence number").count();
    for i in 0..n {
        assert_eq!(
            joined.matches(&format!("Sentence number {i} of")).count(),
            1,
            "sentence {i} once"
        );
    }
    assert!(n > 250, "{n} sentences");
}

#[test]
fn the_bot_apis_429_and_5xx_are_retried_and_a_blocked_chat_fails() {
    let stub = Stub::start();
    stub.set_policy(|call, n| match (call.chat(), n) {
        (1, 0) => Answer::RetryAfter(1),
        (1, 1) => Answer::ServerError,
        (2, _) => Answer::Refuse(403, "Forbidden: bot was blocked by the user".into()),
        _ => Answer::Ok,
    });
    let (setup, _gw) = start(
        &stub,
        "allow_all = true",
        "[webhook]\nretry_initial = \"200ms\"\n",
    );
    say(&stub, 1, 1, "one");
    say(&stub, 2, 2, "two");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 1);
    assert_eq!(got[0].text(), "1|one");
    let attempts = stub.calls("sendMessage");
    let to1: Vec<&Call> = attempts.iter().filter(|c| c.chat() == 1).collect();
    assert_eq!(to1.len(), 3, "429, 500, then ok");
    assert!(
        to1[1].at.duration_since(to1[0].at) >= Duration::from_millis(950),
        "retry_after was honoured: {:?}",
        to1[1].at.duration_since(to1[0].at)
    );
    // The blocked chat: one attempt, then `failed` with Telegram's words kept.
    let end = Instant::now() + WAIT;
    let failed = loop {
        let (rc, out, err) = cli(
            &setup,
            &["deliveries", "list", "--state", "failed", "--json"],
        );
        assert_eq!(rc, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if let Some(d) = v["data"].as_array().and_then(|a| a.first()).cloned() {
            break d;
        }
        assert!(
            Instant::now() < end,
            "the blocked chat's reply never failed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(failed["route"], "telegram:main");
    assert!(
        failed["last_error"]
            .as_str()
            .unwrap()
            .contains("blocked by the user"),
        "{failed}"
    );
    assert_eq!(
        stub.calls("sendMessage")
            .iter()
            .filter(|c| c.chat() == 2)
            .count(),
        1,
        "a refusal is not retried"
    );
    let api = listener_addr(&setup.control, "api");
    let r = get(api, "/v1/deliveries?state=failed").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["data"][0]["id"], failed["id"]);
}

#[test]
fn groups_take_mentions_replies_and_commands_and_topics_keep_their_thread() {
    let stub = Stub::start();
    let (_setup, _gw) = start(&stub, "allow_all = true", "");
    let group = -100;
    let msg = |user: i64, id: i64, text: &str, extra: serde_json::Value| {
        let mut u = json!({"message": {"message_id": id, "date": 1,
            "chat": {"id": group, "type": "supergroup", "title": "G"},
            "from": {"id": user, "is_bot": false, "first_name": format!("U{user}")},
            "text": text}});
        if let serde_json::Value::Object(e) = extra {
            for (k, v) in e {
                u["message"][k] = v;
            }
        }
        stub.push(u);
    };
    msg(1, 1, "just chatting", json!({}));
    msg(1, 2, "@hermes_test_bot hello", json!({}));
    msg(2, 3, "and me @HERMES_TEST_BOT", json!({}));
    msg(
        1,
        4,
        "a reply to the bot",
        json!({"reply_to_message": {"message_id": 99, "date": 1,
            "chat": {"id": group, "type": "supergroup"}, "from": {"id": BOT_ID, "is_bot": true, "first_name": "Hermes"}}}),
    );
    msg(2, 5, "/status@hermes_test_bot", json!({}));
    msg(2, 6, "/status@some_other_bot", json!({}));
    msg(
        1,
        7,
        "@hermes_test_bot in a topic",
        json!({"is_topic_message": true, "message_thread_id": 55}),
    );
    let got = stub.wait_delivered(WAIT, |d| d.len() == 5);
    std::thread::sleep(Duration::from_millis(800));
    let all = stub.delivered();
    assert_eq!(all.len(), 5, "{:?}", texts_to(&all, group));
    let texts = texts_to(&got, group);
    // Per-user sessions: user 1's second message sees its first; user 2 starts fresh.
    assert!(texts.contains(&"1|hello".to_owned()), "{texts:?}");
    assert!(texts.contains(&"1|and me".to_owned()), "{texts:?}");
    assert!(
        texts.contains(&"3|a reply to the bot".to_owned()),
        "{texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("Conversation: telegram:main:-100:2")),
        "{texts:?}"
    );
    let topic = got
        .iter()
        .find(|c| c.text().ends_with("in a topic"))
        .expect("the topic message is answered");
    assert_eq!(topic.body["message_thread_id"], 55);
    assert_eq!(
        topic.text(),
        "1|in a topic",
        "a topic is a session of its own"
    );
}

#[test]
fn a_flooding_chat_is_told_once_and_other_chats_go_on() {
    let stub = Stub::start();
    let (_setup, _gw) = start(&stub, "allow_all = true\nchat_rate_limit = \"3/min\"", "");
    for i in 0..8 {
        say(&stub, 4, 4, &format!("flood {i}"));
    }
    say(&stub, 6, 6, "calm");
    let got = stub.wait_delivered(WAIT, |d| d.len() == 5);
    std::thread::sleep(Duration::from_millis(800));
    let to4 = texts_to(&stub.delivered(), 4);
    assert_eq!(to4.len(), 4, "{to4:?}");
    assert_eq!(
        to4.iter()
            .filter(|t| t.contains("a lot of messages"))
            .count(),
        1
    );
    assert_eq!(texts_to(&got, 6), vec!["1|calm".to_owned()]);
}

#[test]
fn a_full_queue_is_said_and_the_queued_messages_are_answered() {
    let stub = Stub::start();
    let (_setup, _gw) = start(&stub, "allow_all = true", "[sessions]\nqueue_depth = 2\n");
    say(&stub, 3, 3, "slow 2");
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..4 {
        say(&stub, 3, 3, &format!("q{i}"));
    }
    let got = stub.wait_delivered(WAIT, |d| d.len() == 5);
    let texts = texts_to(&got, 3);
    assert_eq!(
        texts.iter().filter(|t| t.contains("still working")).count(),
        2,
        "{texts:?}"
    );
    let answered: Vec<&String> = texts.iter().filter(|t| t.contains('|')).collect();
    assert_eq!(answered.len(), 3, "{texts:?}");
    assert!(
        answered[0].ends_with("slow 2")
            && answered[1].ends_with("q0")
            && answered[2].ends_with("q1")
    );
}

#[test]
fn the_token_never_reaches_a_log_or_the_status() {
    let stub = Stub::start();
    // The stub does not know this token: every call is refused with 404.
    let other = "987654321:AAanother-secret-token-value_xyz";
    let cfg = format!(
        "[[platforms.telegram]]\nname = \"main\"\ntoken = \"{other}\"\napi_base = \"{}\"\nallow_all = true\npoll_timeout = \"1s\"\n",
        stub.api_base()
    );
    let setup = Setup::new("127.0.0.1:0", &cfg);
    let notify = setup.notify();
    let gw = setup.spawn(
        &[],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let log = gw.wait_stderr("getMe failed", WAIT);
    assert!(log.contains("bot<token>/getMe"), "{log}");
    let st = status_json(&setup.control);
    let p = &st["platforms"][0];
    assert_eq!(p["name"], "main");
    assert!(p["last_error"].as_str().unwrap().contains("404"), "{p}");
    let (_, human, _) = cli(&setup, &["status"]);
    assert!(human.contains("telegram:main"), "{human}");
    for text in [log, st.to_string(), human] {
        assert!(!text.contains("AAanother-secret-token-value_xyz"), "{text}");
    }
}
