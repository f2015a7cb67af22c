//! Nothing WhatsApp delivered is lost, and nothing is answered twice unmarked, when the
//! gateway is killed (SIGKILL) three times while 500 messages of 25 users arrive, each
//! webhook signed in Python and accepted by pywa's validator, with Meta's redeliveries and
//! forged requests mixed in — and a test supervisor relaunches it each time on the same
//! listening socket, as systemd's socket activation does.
//!
//! The transcript the stub Graph API records must hold, per user, every message's reply
//! exactly once and in order; the only repeat allowed is the one the README names: a reply
//! whose sending a kill cut short, sent again after the relaunch with the "♻️ Recovered
//! reply" marker.

mod common;
mod whatsapp_support;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use whatsapp_support::*;

const TOTAL: usize = 500;
const USERS: usize = 25;
const KILLS: usize = 3;
const SENDERS: usize = 5;
const MARKER: &str = "♻️ Recovered reply";

fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn user_of(i: usize) -> String {
    format!("{}", 15_550_000_100u64 + (i % USERS) as u64)
}

fn text_of(i: usize) -> String {
    format!("user {} message {}", i % USERS, i / USERS)
}

/// Per user, the replies with a marked re-send folded into the copy before it.
fn fold(delivered: &[Call]) -> (HashMap<String, Vec<String>>, HashMap<String, usize>) {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut resent: HashMap<String, usize> = HashMap::new();
    for c in delivered {
        let list = out.entry(c.to().to_owned()).or_default();
        let text = c.text();
        if let Some(rest) = text.strip_prefix(MARKER) {
            let original = rest.split_once(":\n\n").map_or(rest, |(_, t)| t);
            *resent.entry(c.to().to_owned()).or_default() += 1;
            if list.last().map(String::as_str) != Some(original) {
                list.push(original.to_owned());
            }
            continue;
        }
        list.push(text.to_owned());
    }
    (out, resent)
}

/// Posts message `i` until it is acknowledged (a forged copy first, when `forged`).
fn post_message(
    conn: &mut Option<Conn>,
    hook: SocketAddr,
    signer: &Signer,
    i: usize,
    forged: bool,
) {
    let body = text_webhook(&format!("wamid.CRASH{i:05}"), &user_of(i), &text_of(i)).to_string();
    let sig = signer.sign("", &body);
    let end = Instant::now() + Duration::from_secs(60);
    let mut forge = forged;
    loop {
        assert!(Instant::now() < end, "message {i} never acknowledged");
        if conn.is_none() {
            *conn = Conn::open(hook).ok();
        }
        let Some(c) = conn.as_mut() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let bad = format!("sha256={}", "0".repeat(64));
        let s = if forge { bad.as_str() } else { sig.as_str() };
        match c.request("POST", PATH, &[("X-Hub-Signature-256", s)], &body) {
            Ok(r) if forge => {
                assert_eq!(r.status, 401, "a forged signature: {}", r.body);
                forge = false;
            }
            Ok(r) if r.status == 200 => return,
            Ok(r) => {
                // 503 while the store is unavailable is allowed; nothing else is.
                assert_eq!(r.status, 503, "message {i}: {}", r.body);
                *conn = None;
            }
            Err(_) => *conn = None,
        }
    }
}

#[test]
fn whatsapp_messages_lose_nothing_across_three_sigkills_with_redeliveries_and_forgeries() {
    let Some(signer) = Signer::start("whatsapp", APP_SECRET) else {
        return;
    };
    let signer = Arc::new(signer);
    let stub = Stub::start();
    let setup = Setup::new("127.0.0.1:0", "");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = listener.local_addr().unwrap();
    setup.write_config(&format!(
        "[listen]\napi = \"off\"\nwebhook = \"127.0.0.1:1\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n{}[webhook]\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n",
        setup.control.display(),
        setup.state.display(),
        whatsapp_config(
            &stub,
            "allow_all = true\nchat_rate_limit = \"100000/min\"\nsend_rate_limit = \"100000/s\""
        ),
    ));
    let notify_path = setup.dir.path().join("notify.sock");
    let launch = || {
        let _ = std::fs::remove_file(&notify_path);
        let notify = setup.notify();
        let gw = spawn_with_socket(&setup, &listener, "webhook", &notify, "warn");
        notify.wait_for("READY=1", Duration::from_secs(20));
        gw
    };
    let mut gw = launch();
    let acked = Arc::new(AtomicUsize::new(0));
    let repeats = Arc::new(Mutex::new(0usize));
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (acked, repeats, signer) = (acked.clone(), repeats.clone(), signer.clone());
            std::thread::spawn(move || {
                let mut conn = None;
                for i in (0..TOTAL).filter(|i| (i % USERS) % SENDERS == s) {
                    post_message(&mut conn, hook, &signer, i, i % 17 == 0);
                    if i % 20 == 0 {
                        // Meta sends a webhook again when it missed the answer.
                        post_message(&mut conn, hook, &signer, i, false);
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
    for m in marks {
        while acked.load(Ordering::Relaxed) < m {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(random() % 20_000));
        gw.signal(Signal::SIGKILL);
        let st = gw.wait(Duration::from_secs(10));
        assert_eq!(st.code(), None, "killed by a signal");
        gw = launch();
    }
    for s in senders {
        s.join().unwrap();
    }
    assert!(*repeats.lock().unwrap() >= 20);

    let want: HashMap<String, Vec<String>> = (0..TOTAL).fold(HashMap::new(), |mut m, i| {
        m.entry(user_of(i)).or_default().push(text_of(i));
        m
    });
    let all: HashSet<String> = (0..TOTAL).map(text_of).collect();
    stub.wait_delivered(Duration::from_secs(120), |d| {
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
    std::thread::sleep(Duration::from_millis(1500));
    let delivered = stub.delivered();
    let (got, resent) = fold(&delivered);
    for (user, replies) in &want {
        assert_eq!(
            got.get(user),
            Some(replies),
            "{user}: every message answered once, in order"
        );
    }
    assert_eq!(got.len(), want.len(), "no reply went to anyone else");
    let total: usize = resent.values().sum();
    eprintln!(
        "whatsapp: {} replies for {TOTAL} messages, {total} marked re-sends",
        delivered.len()
    );
    for (user, n) in &resent {
        assert!(*n <= KILLS, "{user}: {n} re-sends for {KILLS} kills");
    }
    drop(gw);
}
