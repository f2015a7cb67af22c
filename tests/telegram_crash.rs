//! Nothing a chat sent is lost, and nothing is answered twice unmarked, when the gateway is
//! killed (SIGKILL) at random moments while 500 updates in 25 chats arrive — by long polling
//! and by webhook — and a test supervisor relaunches it each time.
//!
//! The transcript the stub Bot API records must hold, per chat, every message's reply
//! exactly once and in order; the only repeat allowed is the one the README names: a reply
//! whose sending a kill cut short is sent again after the relaunch, right after the first
//! copy, prefixed with the "♻️ Recovered reply" marker.

mod common;
mod telegram_support;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use telegram_support::*;

const TOTAL: usize = 500;
const CHATS: i64 = 25;
const KILLS: usize = 3;
const MARKER: &str = "♻️ Recovered reply";
const SECRET: &str = "crash-secret";

fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn chat_of(i: usize) -> i64 {
    1 + (i as i64 % CHATS)
}

fn text_of(i: usize) -> String {
    format!("chat {} message {}", chat_of(i), i / CHATS as usize)
}

/// Per chat, the replies with a marked re-send folded into the copy before it. Returns the
/// folded transcripts and the re-sends per chat.
fn fold(delivered: &[Call]) -> (HashMap<i64, Vec<String>>, HashMap<i64, usize>) {
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    let mut resent: HashMap<i64, usize> = HashMap::new();
    for c in delivered {
        let list = out.entry(c.chat()).or_default();
        let text = c.text();
        if let Some(rest) = text.strip_prefix(MARKER) {
            let original = rest.split_once(":\n\n").map_or(rest, |(_, t)| t);
            // The re-send of the reply in flight at a kill: the same as the last one (or
            // the first copy never arrived).
            *resent.entry(c.chat()).or_default() += 1;
            if list.last().map(String::as_str) != Some(original) {
                list.push(original.to_owned());
            }
            continue;
        }
        list.push(text.to_owned());
    }
    (out, resent)
}

fn check(stub: &Stub, what: &str) {
    let want: HashMap<i64, Vec<String>> = (0..TOTAL).fold(HashMap::new(), |mut m, i| {
        m.entry(chat_of(i)).or_default().push(text_of(i));
        m
    });
    let all: HashSet<String> = (0..TOTAL).map(text_of).collect();
    let delivered = stub.wait_delivered(Duration::from_secs(120), |d| {
        let seen: HashSet<String> = d
            .iter()
            .map(|c| {
                let t = c.text();
                t.strip_prefix(MARKER)
                    .and_then(|r| r.split_once(":\n\n"))
                    .map_or(t, |(_, t)| t)
                    .to_owned()
            })
            .collect();
        all.iter().all(|t| seen.contains(t))
    });
    // Late re-sends of resumed replies arrive before the count.
    std::thread::sleep(Duration::from_millis(1500));
    let delivered = if stub.delivered().len() > delivered.len() {
        stub.delivered()
    } else {
        delivered
    };
    let (got, resent) = fold(&delivered);
    for chat in 1..=CHATS {
        assert_eq!(
            got.get(&chat),
            want.get(&chat),
            "{what}: chat {chat}: every message answered once, in order"
        );
    }
    let total: usize = resent.values().sum();
    eprintln!(
        "{what}: {} replies for {TOTAL} messages, {total} marked re-sends",
        delivered.len()
    );
    // A chat has one reply in flight at most: a kill cuts at most one send per chat.
    for (chat, n) in &resent {
        assert!(
            *n <= KILLS,
            "{what}: chat {chat}: {n} re-sends for {KILLS} kills"
        );
    }
}

fn base_config(stub: &Stub, extra: &str) -> String {
    // Pacing and the inbound limit are Telegram's business, not this test's.
    telegram_config(
        stub,
        &format!(
            "allow_all = true\nchat_rate_limit = \"100000/min\"\nsend_rate_limit = \"100000/s\"\n{extra}"
        ),
    ) + "[webhook]\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n"
}

fn relaunch(gw: &mut Gateway, kills: &mut Vec<Instant>, launch: &mut dyn FnMut() -> Gateway) {
    gw.signal(Signal::SIGKILL);
    kills.push(Instant::now());
    let st = gw.wait(Duration::from_secs(10));
    assert_eq!(st.code(), None, "killed by a signal");
    *gw = launch();
}

#[test]
fn polling_loses_nothing_across_three_sigkills() {
    let stub = Stub::start();
    let setup = Setup::new("127.0.0.1:0", &base_config(&stub, "poll_timeout = \"2s\""));
    let mut launch = || {
        let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
        let notify = setup.notify();
        let gw = setup.spawn(
            &[],
            &[
                ("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8")),
                ("RUST_LOG", "warn"),
            ],
        );
        notify.wait_for("READY=1", Duration::from_secs(20));
        gw
    };
    let mut gw = launch();
    let pushed = Arc::new(AtomicUsize::new(0));
    let producer = {
        let (stub, pushed) = (stub.clone(), pushed.clone());
        std::thread::spawn(move || {
            for i in 0..TOTAL {
                let id = stub.next_update_id();
                stub.push(text_update(chat_of(i), chat_of(i), id, &text_of(i)));
                pushed.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(8));
            }
        })
    };
    let mut marks: Vec<usize> = (0..KILLS)
        .map(|_| 40 + (random() % (TOTAL as u64 - 80)) as usize)
        .collect();
    marks.sort_unstable();
    let mut kills = Vec::new();
    for m in marks {
        while pushed.load(Ordering::Relaxed) < m {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(random() % 20_000));
        relaunch(&mut gw, &mut kills, &mut launch);
    }
    producer.join().unwrap();
    check(&stub, "polling");
    // Every update confirmed to Telegram is in the store: no offset ran ahead of a commit.
    let confirmed = stub.confirmed();
    let db = rusqlite::Connection::open_with_flags(
        setup.state.join("gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .unwrap();
    let stored: HashSet<i64> = db
        .prepare("SELECT source_id FROM deliveries WHERE route = 'telegram:main'")
        .unwrap()
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .filter_map(|s| s.ok()?.parse().ok())
        .collect();
    let first = 1000;
    for id in first..confirmed {
        assert!(
            stored.contains(&id),
            "update {id} was confirmed but never stored"
        );
    }
    drop(gw);
}

/// Posts update `i` (its id `10_000 + i`) until it is acknowledged; bad-token posts of it
/// before, which must be refused. Returns the acknowledged answer's status.
fn post(conn: &mut Option<Conn>, hook: SocketAddr, i: usize, bad_first: bool) -> u16 {
    let mut u = text_update(chat_of(i), chat_of(i), i as i64 + 1, &text_of(i));
    u["update_id"] = (10_000 + i as i64).into();
    let body = u.to_string();
    let end = Instant::now() + Duration::from_secs(60);
    let mut bad = bad_first;
    loop {
        assert!(Instant::now() < end, "update {i} never acknowledged");
        if conn.is_none() {
            *conn = Conn::open(hook).ok();
        }
        let Some(c) = conn.as_mut() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let secret = if bad { "not-the-secret" } else { SECRET };
        match c.request(
            "POST",
            "/platforms/telegram/main",
            &[("X-Telegram-Bot-Api-Secret-Token", secret)],
            &body,
        ) {
            Ok(r) if bad => {
                assert_eq!(r.status, 401, "a bad token: {}", r.body);
                bad = false;
            }
            Ok(r) if r.status == 200 => return r.status,
            Ok(r) => {
                // 503 while the store is unavailable is allowed; nothing else is.
                assert_eq!(r.status, 503, "update {i}: {}", r.body);
                *conn = None;
            }
            Err(_) => *conn = None,
        }
    }
}

#[test]
fn webhooks_lose_nothing_across_three_sigkills_with_repeats_and_bad_tokens() {
    const SENDERS: i64 = 5;
    let stub = Stub::start();
    let setup = Setup::new("127.0.0.1:0", "");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = listener.local_addr().unwrap();
    setup.write_config(&format!(
        "[listen]\napi = \"off\"\nwebhook = \"127.0.0.1:1\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n{}",
        setup.control.display(),
        setup.state.display(),
        base_config(
            &stub,
            &format!("mode = \"webhook\"\nwebhook_secret = \"{SECRET}\"")
        )
    ));
    let notify_path = setup.dir.path().join("notify.sock");
    let mut launch = || {
        let _ = std::fs::remove_file(&notify_path);
        let notify = setup.notify();
        let gw = spawn_with_socket(&setup, &listener, "webhook", &notify, "warn");
        notify.wait_for("READY=1", Duration::from_secs(20));
        gw
    };
    let mut gw = launch();
    let acked = Arc::new(AtomicUsize::new(0));
    let repeats = Arc::new(Mutex::new(0usize));
    // Each sender owns the chats `chat % SENDERS == k` and sends their updates in order,
    // as Telegram does for one chat.
    let senders: Vec<_> = (0..SENDERS)
        .map(|k| {
            let (acked, repeats) = (acked.clone(), repeats.clone());
            std::thread::spawn(move || {
                let mut conn = None;
                for i in (0..TOTAL).filter(|i| chat_of(*i) % SENDERS == k) {
                    post(&mut conn, hook, i, i % 17 == 0);
                    if i % 20 == 0 {
                        // Telegram sends an update again when it missed the answer.
                        post(&mut conn, hook, i, false);
                        *repeats.lock().unwrap() += 1;
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    let mut marks: Vec<usize> = (0..KILLS)
        .map(|_| 40 + (random() % (TOTAL as u64 - 80)) as usize)
        .collect();
    marks.sort_unstable();
    let mut kills = Vec::new();
    for m in marks {
        while acked.load(Ordering::Relaxed) < m {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(random() % 20_000));
        relaunch(&mut gw, &mut kills, &mut launch);
    }
    for s in senders {
        s.join().unwrap();
    }
    assert!(*repeats.lock().unwrap() >= 20);
    check(&stub, "webhook");
    drop(gw);
}
