//! Telegram in webhook mode under REAL systemd 252 (tests/support/sdbox.rs): the webhook
//! listener held by a `.socket` unit, the gateway a `Type=notify` service, the stub Bot API
//! (tests/telegram_support) in the box's network namespace. 300 updates from 10 chats are
//! POSTed with the secret token while `systemctl restart` hits the service twice; the
//! connections made meanwhile wait in the socket's backlog. Every POST is answered 200 (none
//! refused, none cut), every update is answered exactly once and in its chat's order — a
//! repeat only as the README allows it: a reply whose send the restart cut short, sent again
//! with the "♻️ Recovered reply" marker — and `journalctl PLATFORM=telegram` / `CHAT_ID=…`
//! show each message taken, its turn and its reply.
//!
//! Skips (saying why) where the machine cannot make the namespaces; under CI=true it must run.

mod common;
mod support;
mod telegram_support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Conn;
use support::sdbox::{self, SystemdBox};
use telegram_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");
const SECRET: &str = "systemd-telegram_secret";
const PORT: u16 = 8644;
const CHATS: i64 = 10;
const PER_CHAT: i64 = 30;
const TOTAL: usize = (CHATS * PER_CHAT) as usize;
/// `systemctl restart` once this many POSTs were answered (the burst is paced so that
/// both land in its middle).
const RESTART_AT: [usize; 2] = [100, 200];
/// Between two updates of one chat: 10 chats send about 170 updates/s together.
const PACE: Duration = Duration::from_millis(60);
/// Each sendMessage takes this long at the stub, so that a restart finds sends in flight.
const SEND_DELAY: Duration = Duration::from_millis(30);
/// The gateway's marker on a reply sent again (src/gateway/deliveries/chat.rs).
const MARKER: &str = "♻️ Recovered reply";

const SERVICE: &str = "[Unit]
Description=hermes-gateway (telegram under systemd test)
Requires=hermes-gateway-webhook.socket
After=hermes-gateway-webhook.socket
StartLimitIntervalSec=60
StartLimitBurst=60

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/hermes-gateway run
Restart=on-failure
RestartSec=100ms
SuccessExitStatus=75
RestartForceExitStatus=75
RestartPreventExitStatus=78
StateDirectory=hermes-gateway
RuntimeDirectory=hermes-gateway
RuntimeDirectoryPreserve=restart
ConfigurationDirectory=hermes-gateway
TimeoutStopSec=40
";

const SOCKET: &str = "[Unit]
Description=hermes-gateway webhook socket (test)

[Socket]
ListenStream=127.0.0.1:8644
FileDescriptorName=webhook
Backlog=4096
Service=hermes-gateway.service
";

fn chat_id(c: i64) -> i64 {
    5_000_001 + c
}

fn text_of(chat: i64, i: i64) -> String {
    format!("chat {chat} message {i}")
}

/// What one POST of an update came to.
#[derive(Debug, Clone)]
struct Posted {
    chat: i64,
    i: i64,
    status: u16,
    /// Attempts that got no answer (a connection refused, reset or closed mid-request).
    failures: Vec<String>,
    took: Duration,
}

/// POSTs `body` on the keep-alive connection (a new one if there is none, or the last
/// answer said `Connection: close`). Every attempt that gets no answer is recorded and
/// retried (the same update_id: at worst a repeat, which the gateway answers 200).
fn post(conn: &mut Option<Conn>, hook: SocketAddr, body: &str) -> (u16, Vec<String>) {
    let mut failures = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < end,
            "no answer within 60 s; failures: {failures:?}"
        );
        if conn.is_none() {
            match Conn::open(hook) {
                Ok(c) => {
                    // A connection made during a restart waits in the backlog.
                    let _ =
                        c.r.get_ref()
                            .set_read_timeout(Some(Duration::from_secs(30)));
                    *conn = Some(c);
                }
                Err(e) => {
                    failures.push(format!("connect: {e}"));
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        match c.request(
            "POST",
            "/platforms/telegram/main",
            &[("X-Telegram-Bot-Api-Secret-Token", SECRET)],
            body,
        ) {
            Ok(r) => {
                if r.header("connection")
                    .is_some_and(|v| v.eq_ignore_ascii_case("close"))
                {
                    *conn = None;
                }
                return (r.status, failures);
            }
            Err(e) => {
                failures.push(format!("request: {e}"));
                *conn = None;
            }
        }
    }
}

fn main_pid(sb: &SystemdBox) -> String {
    sb.show("hermes-gateway.service", "MainPID")
}

fn message_of(e: &serde_json::Value) -> &str {
    e["MESSAGE"].as_str().unwrap_or("")
}

fn field<'a>(e: &'a serde_json::Value, name: &str) -> &'a str {
    e[name].as_str().unwrap_or("")
}

/// What a chat was sent and what the journal says of it: for a failure's message.
fn story(sb: &SystemdBox, delivered: &[Call], chat: i64) -> String {
    let sent: Vec<String> = delivered
        .iter()
        .filter(|d| d.chat() == chat)
        .map(|d| format!("{:?} {}", d.at, d.text().replace('\n', " ")))
        .collect();
    let journal: Vec<String> = sb
        .journal(&["-u", "hermes-gateway.service", &format!("CHAT_ID={chat}")])
        .iter()
        .map(|e| {
            format!(
                "pid {} message {} {} {}",
                field(e, "_PID"),
                field(e, "MESSAGE_ID"),
                field(e, "DELIVERY_ID"),
                message_of(e)
            )
        })
        .collect();
    format!(
        "sent to chat {chat}:\n{}\njournal of CHAT_ID={chat}:\n{}",
        sent.join("\n"),
        journal.join("\n")
    )
}

#[test]
fn systemctl_restart_during_a_telegram_burst_loses_and_repeats_nothing() {
    let Some(()) = sdbox::require_or_skip(
        "systemctl_restart_during_a_telegram_burst_loses_and_repeats_nothing",
    ) else {
        return;
    };
    let t0 = Instant::now();
    let sb = SystemdBox::builder()
        .host_file("/usr/local/bin/hermes-gateway", BIN, 0o755)
        .unit("hermes-gateway.service", SERVICE)
        .unit("hermes-gateway-webhook.socket", SOCKET)
        .boot()
        .expect("boot a systemd box");
    // The stub lives in the box's network namespace, beside the gateway: its listener is
    // made there, and the gateway reaches it on the box's loopback.
    let stub = sb.run_in_netns(Stub::start);
    stub.set_send_delay(SEND_DELAY);
    // Limits high enough that neither the inbound limit per chat nor Telegram's pacing
    // takes part: this test is about restarts.
    sb.write_file(
        "/etc/hermes-gateway/gateway.toml",
        format!(
            r#"[listen]
api = "off"
webhook = "127.0.0.1:{PORT}"
[gateway]
drain_timeout = "10s"
[sessions]
queue_depth = 64
{}"#,
            telegram_config(
                &stub,
                &format!(
                    "mode = \"webhook\"\nwebhook_secret = \"{SECRET}\"\nallow_all = true\nchat_rate_limit = \"1000/s\"\nsend_rate_limit = \"1000/s\""
                )
            )
        ),
        0o644,
    );
    sb.systemctl_ok(&["start", "hermes-gateway-webhook.socket"]);
    sb.systemctl_ok(&["start", "hermes-gateway.service"]);
    sdbox::wait_until("service active", Duration::from_secs(20), || {
        sb.show("hermes-gateway.service", "ActiveState") == "active"
    });
    let hook = SocketAddr::from(([127, 0, 0, 1], PORT));

    // One sender per chat, each update after the last one's answer (as Telegram does per
    // chat): the order of a chat's update_ids is the order of its messages.
    let acked = Arc::new(AtomicUsize::new(0));
    let posted: Arc<Mutex<Vec<Posted>>> = Arc::default();
    let ns = sb.netns();
    let senders: Vec<_> = (0..CHATS)
        .map(|c| {
            let (acked, posted) = (acked.clone(), posted.clone());
            ns.spawn(move || {
                let chat = chat_id(c);
                let mut conn = None;
                for i in 0..PER_CHAT {
                    let mut u = text_update(chat, chat, 100 + i, &text_of(chat, i));
                    u["update_id"] = (10_000 + i * CHATS + c).into();
                    let t = Instant::now();
                    let (status, failures) = post(&mut conn, hook, &u.to_string());
                    posted.lock().unwrap().push(Posted {
                        chat,
                        i,
                        status,
                        failures,
                        took: t.elapsed(),
                    });
                    acked.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(PACE);
                }
            })
        })
        .collect();

    let mut restarts = Vec::new();
    for mark in RESTART_AT {
        sdbox::wait_until(
            &format!("{mark} updates answered"),
            Duration::from_secs(60),
            || acked.load(Ordering::Relaxed) >= mark,
        );
        let old = main_pid(&sb);
        let at = acked.load(Ordering::Relaxed);
        let t = Instant::now();
        sb.systemctl_ok(&["restart", "hermes-gateway.service"]);
        let took = t.elapsed();
        let new = main_pid(&sb);
        assert!(
            new != "0" && new != old,
            "systemctl restart ran a new main process ({old} → {new})"
        );
        assert_eq!(sb.show("hermes-gateway.service", "ActiveState"), "active");
        restarts.push((at, took));
    }
    for s in senders {
        s.join().unwrap();
    }
    let posted = posted.lock().unwrap().clone();
    assert_eq!(posted.len(), TOTAL);
    let after: Vec<usize> = restarts.iter().map(|r| r.0).collect();
    assert!(
        after.iter().all(|&a| a < TOTAL - 20),
        "the restarts came in the middle of the burst (after {after:?} of {TOTAL} answers)"
    );
    // No POST refused or cut: each got its 200 at its first attempt, restarts or not.
    let troubled: Vec<&Posted> = posted
        .iter()
        .filter(|p| p.status != 200 || !p.failures.is_empty())
        .collect();
    assert!(
        troubled.is_empty(),
        "{} POSTs refused or cut: {troubled:?}",
        troubled.len()
    );
    let slowest = posted.iter().map(|p| p.took).max().unwrap_or_default();

    // Every update answered: wait until each text arrived, then a little longer for any
    // repeat.
    let want: HashSet<String> = posted.iter().map(|p| text_of(p.chat, p.i)).collect();
    let strip = |t: &str| -> (String, bool) {
        match t.strip_prefix(MARKER) {
            Some(rest) => (
                rest.split_once("\n\n")
                    .map_or(rest, |(_, body)| body)
                    .to_owned(),
                true,
            ),
            None => (t.to_owned(), false),
        }
    };
    stub.wait_delivered(Duration::from_secs(90), |d| {
        let got: HashSet<String> = d.iter().map(|c| strip(c.text()).0).collect();
        want.iter().all(|w| got.contains(w))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let delivered = stub.delivered();

    // Per chat: in order, each once; a repeat only of the reply in flight, and marked.
    let mut recovered = Vec::new();
    let mut marked_first = 0;
    for c in 0..CHATS {
        let chat = chat_id(c);
        let mut seen: Vec<String> = Vec::new();
        for call in delivered.iter().filter(|d| d.chat() == chat) {
            let (text, marked) = strip(call.text());
            let i: i64 = text
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("chat {chat}: an unexpected reply {:?}", call.text()));
            assert_eq!(
                call.reply_to(),
                Some(100 + i),
                "chat {chat}: the reply to message {i} quotes it"
            );
            if seen.contains(&text) {
                assert!(
                    marked,
                    "chat {chat}: {text:?} answered twice, the repeat without the marker\n{}",
                    story(&sb, &delivered, chat)
                );
                assert_eq!(
                    seen.last(),
                    Some(&text),
                    "chat {chat}: a repeat of the reply in flight only, right after it\n{}",
                    story(&sb, &delivered, chat)
                );
                recovered.push(text);
                continue;
            }
            if marked {
                // Sent again after a cut send that never reached Telegram: shown once.
                marked_first += 1;
            }
            seen.push(text);
        }
        let expect: Vec<String> = (0..PER_CHAT).map(|i| text_of(chat, i)).collect();
        assert_eq!(
            seen, expect,
            "chat {chat}: every message answered, in order"
        );
    }
    // A graceful restart lets the replies being sent finish before it exits (the drain
    // waits for them) and starts no new one: nothing is sent twice, marked or not.
    assert!(
        recovered.is_empty() && marked_first == 0,
        "the {} graceful restarts cut replies mid-send: {recovered:?}",
        restarts.len()
    );

    // An update Telegram sends again (it timed out on our answer, say) after the restarts:
    // 200, and nothing runs twice.
    let answers = sb.run_in_netns(move || {
        let mut conn = None;
        (0..CHATS)
            .map(|c| {
                let chat = chat_id(c);
                let mut u = text_update(chat, chat, 100, &text_of(chat, 0));
                u["update_id"] = (10_000 + c).into();
                post(&mut conn, hook, &u.to_string())
            })
            .collect::<Vec<_>>()
    });
    for (status, failures) in &answers {
        assert_eq!(
            (*status, failures.len()),
            (200, 0),
            "a repeated update is 200"
        );
    }
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(
        stub.delivered().len(),
        delivered.len(),
        "repeated updates ran nothing"
    );

    // The journal: PLATFORM=telegram shows each message taken, its turn and its reply.
    let taken_of = |entries: &[serde_json::Value]| {
        entries
            .iter()
            .filter(|e| message_of(e).contains("message taken"))
            .count()
    };
    let mut tg = Vec::new();
    let complete = sdbox::poll(Duration::from_secs(10), || {
        tg = sb.journal(&["PLATFORM=telegram"]);
        (taken_of(&tg) >= TOTAL).then_some(())
    });
    assert!(
        complete.is_some(),
        "journalctl PLATFORM=telegram: {} messages taken of {TOTAL}",
        taken_of(&tg)
    );
    assert_eq!(
        taken_of(&tg),
        TOTAL,
        "each update taken once, restarts or not"
    );
    assert!(tg.iter().all(|e| field(e, "PLATFORM") == "telegram"));
    let turns = tg
        .iter()
        .filter(|e| message_of(e).starts_with("turn "))
        .count();
    let replies = tg
        .iter()
        .filter(|e| message_of(e).starts_with("reply delivered"))
        .count();
    assert!(
        turns >= TOTAL,
        "journalctl PLATFORM=telegram shows the turns: {turns}"
    );
    assert!(
        replies >= TOTAL,
        "journalctl PLATFORM=telegram shows the replies: {replies}"
    );
    let repeats = tg
        .iter()
        .filter(|e| message_of(e).starts_with("repeated message"))
        .count();
    assert_eq!(repeats, CHATS as usize, "the repeated updates are logged");
    // CHAT_ID=… narrows to one chat: its 30 messages, turns and replies, nothing else.
    let chat = chat_id(3);
    let one = sb.journal(&[&format!("CHAT_ID={chat}")]);
    assert!(one.iter().all(|e| field(e, "CHAT_ID") == chat.to_string()));
    let mut ids: Vec<i64> = one
        .iter()
        .filter(|e| message_of(e).contains("message taken"))
        .map(|e| {
            assert_eq!(field(e, "PLATFORM"), "telegram", "{e}");
            assert!(
                field(e, "SESSION_KEY").starts_with(&format!("telegram:main:{chat}")),
                "{e}"
            );
            assert!(field(e, "RUN_ID").starts_with("run_"), "{e}");
            field(e, "MESSAGE_ID").parse().unwrap_or(-1)
        })
        .collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (100..100 + PER_CHAT).collect::<Vec<_>>(),
        "CHAT_ID={chat}: each message taken once, with its MESSAGE_ID"
    );
    for what in ["turn ", "reply delivered"] {
        let n = one
            .iter()
            .filter(|e| message_of(e).starts_with(what))
            .count();
        assert!(
            n >= PER_CHAT as usize,
            "CHAT_ID={chat}: {n} `{what}` lines of {PER_CHAT}"
        );
    }

    let by_chat: HashMap<i64, usize> = delivered.iter().fold(HashMap::new(), |mut m, d| {
        *m.entry(d.chat()).or_default() += 1;
        m
    });
    eprintln!(
        "{TOTAL} updates in {CHATS} chats, {} replies ({} per chat at most), {} recovered replies (repeats) and {marked_first} marked first sends, restarts after {after:?} answers took {:?}; slowest POST {slowest:?}; test took {:?}",
        delivered.len(),
        by_chat.values().max().unwrap_or(&0),
        recovered.len(),
        restarts.iter().map(|r| r.1).collect::<Vec<_>>(),
        t0.elapsed()
    );
    let _ = sb.shutdown();
}
