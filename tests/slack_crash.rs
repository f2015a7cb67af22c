//! Nothing Slack delivered is lost, and nothing is answered twice unmarked, when the
//! gateway is killed (SIGKILL) three times while 500 events in 25 conversations (DMs and
//! channel threads) arrive, each signed by slack_sdk, with Slack's retries
//! (`X-Slack-Retry-Num`) and forged requests mixed in — and a test supervisor relaunches
//! it each time on the same listening socket, as systemd's socket activation does.
//!
//! The transcript the stub Web API records must hold, per conversation, every message's
//! reply exactly once and in order, in its thread; the only repeat allowed is the one the
//! README names: a reply whose sending a kill cut short, sent again after the relaunch
//! with the "♻️ Recovered reply" marker.

mod common;
mod slack_support;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use slack_support::*;

const TOTAL: usize = 500;
const PLACES: usize = 25;
const KILLS: usize = 3;
const SENDERS: usize = 5;
const MARKER: &str = "♻️ Recovered reply";

fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Conversation `k`: even ones are DMs `D0k`, odd ones threads in channel `C0SHARED`.
fn place_of(i: usize) -> usize {
    i % PLACES
}

fn dm_place(k: usize) -> bool {
    k % 2 == 0
}

fn thread_ts(k: usize) -> String {
    format!("{}.000000", 1000 + k)
}

/// Where conversation `k`'s replies go, as `Call::place` names it.
fn place_name(k: usize) -> String {
    if dm_place(k) {
        format!("D0{k:02}/-")
    } else {
        format!("C0SHARED/{}", thread_ts(k))
    }
}

fn text_of(i: usize) -> String {
    format!("conversation {} message {}", place_of(i), i / PLACES)
}

fn reply_of(i: usize) -> String {
    if dm_place(place_of(i)) {
        text_of(i)
    } else {
        format!("[U0USER] {}", text_of(i))
    }
}

fn event_of(i: usize) -> String {
    let k = place_of(i);
    let id = format!("Ev{i:05}");
    let ts = format!("{}.{:06}", 5000 + k, i + 1);
    if dm_place(k) {
        dm(&id, &format!("D0{k:02}"), "U0USER", &ts, &text_of(i)).to_string()
    } else {
        mention(
            &id,
            "C0SHARED",
            "U0USER",
            &ts,
            Some(&thread_ts(k)),
            &text_of(i),
        )
        .to_string()
    }
}

/// Per place, the replies with a marked re-send folded into the copy before it.
fn fold(delivered: &[Call]) -> (HashMap<String, Vec<String>>, HashMap<String, usize>) {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut resent: HashMap<String, usize> = HashMap::new();
    for c in delivered {
        let list = out.entry(c.place()).or_default();
        // Slack's text is escaped (& < >); none of these messages has one.
        let text = c.text();
        if let Some(rest) = text.strip_prefix(MARKER) {
            let original = rest.split_once(":\n\n").map_or(rest, |(_, t)| t);
            *resent.entry(c.place()).or_default() += 1;
            if list.last().map(String::as_str) != Some(original) {
                list.push(original.to_owned());
            }
            continue;
        }
        list.push(text.to_owned());
    }
    (out, resent)
}

/// Posts event `i` until it is acknowledged (a forged copy first, when `forged`);
/// `retry`: sent as Slack's retry.
fn post_event(
    conn: &mut Option<Conn>,
    hook: SocketAddr,
    signer: &Signer,
    i: usize,
    forged: bool,
    retry: Option<u32>,
) {
    let body = event_of(i);
    let end = Instant::now() + Duration::from_secs(60);
    let mut forge = forged;
    loop {
        assert!(Instant::now() < end, "event {i} never acknowledged");
        if conn.is_none() {
            *conn = Conn::open(hook).ok();
        }
        let Some(c) = conn.as_mut() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let ts = now_ts();
        let mut sig = signer.sign(&ts, &body);
        if forge {
            sig = sig.replace("v0=", "v0=00");
            sig.truncate(67);
        }
        let n = retry.map(|n| n.to_string());
        let mut headers = vec![
            ("X-Slack-Request-Timestamp", ts.as_str()),
            ("X-Slack-Signature", sig.as_str()),
        ];
        if let Some(n) = &n {
            headers.push(("X-Slack-Retry-Num", n));
        }
        match c.request("POST", PATH, &headers, &body) {
            Ok(r) if forge => {
                assert_eq!(r.status, 401, "a forged signature: {}", r.body);
                forge = false;
            }
            Ok(r) if r.status == 200 => return,
            Ok(r) => {
                // 503 while the store is unavailable is allowed; nothing else is.
                assert_eq!(r.status, 503, "event {i}: {}", r.body);
                *conn = None;
            }
            Err(_) => *conn = None,
        }
    }
}

#[test]
fn slack_events_lose_nothing_across_three_sigkills_with_retries_and_forgeries() {
    let Some(signer) = Signer::start("slack", SIGNING_SECRET) else {
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
        slack_config(
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
    let retries = Arc::new(Mutex::new(0usize));
    // Each sender owns the conversations `k % SENDERS == s` and sends their events in
    // order, as a person writes.
    let senders: Vec<_> = (0..SENDERS)
        .map(|s| {
            let (acked, retries, signer) = (acked.clone(), retries.clone(), signer.clone());
            std::thread::spawn(move || {
                let mut conn = None;
                for i in (0..TOTAL).filter(|i| place_of(*i) % SENDERS == s) {
                    post_event(&mut conn, hook, &signer, i, i % 17 == 0, None);
                    if i % 20 == 0 {
                        // Slack sends an event again when it missed the answer in time.
                        post_event(&mut conn, hook, &signer, i, false, Some(1));
                        *retries.lock().unwrap() += 1;
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
    assert!(*retries.lock().unwrap() >= 20);

    let want: HashMap<String, Vec<String>> = (0..TOTAL).fold(HashMap::new(), |mut m, i| {
        m.entry(place_name(place_of(i)))
            .or_default()
            .push(reply_of(i));
        m
    });
    let all: HashSet<String> = (0..TOTAL).map(reply_of).collect();
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
    // Late re-sends of resumed replies arrive before the count.
    std::thread::sleep(Duration::from_millis(1500));
    let delivered = stub.delivered();
    let (got, resent) = fold(&delivered);
    for (place, replies) in &want {
        assert_eq!(
            got.get(place),
            Some(replies),
            "{place}: every message answered once, in order, in its thread"
        );
    }
    assert_eq!(got.len(), want.len(), "no reply went anywhere else");
    let total: usize = resent.values().sum();
    eprintln!(
        "slack: {} replies for {TOTAL} events, {total} marked re-sends",
        delivered.len()
    );
    for (place, n) in &resent {
        assert!(*n <= KILLS, "{place}: {n} re-sends for {KILLS} kills");
    }
    drop(gw);
}
