//! Nothing an SMS sender wrote is lost, and nothing is sent twice unmarked, when the gateway
//! is killed (SIGKILL) at random moments while 500 signed Twilio webhooks from 25 numbers
//! arrive, mixed with repeats of a MessageSid and bad signatures, and a test supervisor
//! relaunches it on the same socket each time.
//!
//! Twilio takes no idempotency key, so here — unlike LINE — a reply whose sending a kill
//! cut short is sent again after the relaunch, marked "♻️ Recovered reply". The transcript
//! must hold, per number, every message's reply exactly once and in order, and nothing
//! else but such marked re-sends right after the first copy.

mod common;
mod twilio_support;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use twilio_support::*;

const TOTAL: usize = 500;
const CHATS: usize = 25;
const KILLS: usize = 3;
const SENDERS: usize = 5;
const MARKER: &str = "♻️ Recovered reply";

fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn chat_of(i: usize) -> String {
    format!("+1555700{:04}", i % CHATS)
}

fn text_of(i: usize) -> String {
    format!("chat {} message {}", i % CHATS, i / CHATS)
}

/// Per number, the texts sent with a marked re-send folded into the copy before it; and
/// the re-sends per number.
fn fold(delivered: &[Sent]) -> (HashMap<String, Vec<String>>, HashMap<String, usize>) {
    let mut out: HashMap<String, Vec<String>> = HashMap::new();
    let mut resent: HashMap<String, usize> = HashMap::new();
    for m in delivered {
        let list = out.entry(m.to.clone()).or_default();
        if let Some(rest) = m.body.strip_prefix(MARKER) {
            let original = rest.split_once(":\n\n").map_or(rest, |(_, t)| t);
            *resent.entry(m.to.clone()).or_default() += 1;
            if list.last().map(String::as_str) != Some(original) {
                list.push(original.to_owned());
            }
            continue;
        }
        list.push(m.body.clone());
    }
    (out, resent)
}

/// Posts form `body` until it is acknowledged with the TwiML (a bad signature first,
/// which must be refused).
fn post(conn: &mut Option<FormConn>, hook: SocketAddr, body: &str, sig: &str, bad_first: bool) {
    let end = Instant::now() + Duration::from_secs(60);
    let mut bad = bad_first;
    loop {
        assert!(Instant::now() < end, "never acknowledged: {body}");
        if conn.is_none() {
            *conn = FormConn::open(hook).ok();
        }
        let Some(c) = conn.as_mut() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        let s = if bad {
            "c2lnbmF0dXJlIG9mIHNvbWV0aGluZyBlbHNl"
        } else {
            sig
        };
        match c.post("/platforms/twilio/main", FORM, Some(s), body) {
            Ok(r) if bad => {
                assert_eq!(r.status, 401, "a bad signature: {}", r.body);
                bad = false;
            }
            Ok(r) if r.status == 200 => {
                assert!(r.body.contains("<Response/>"), "{}", r.body);
                return;
            }
            Ok(r) => {
                assert_eq!(r.status, 503, "{}", r.body);
                *conn = None;
            }
            Err(_) => *conn = None,
        }
    }
}

#[test]
fn twilio_webhooks_lose_nothing_across_three_sigkills_with_repeats_and_bad_signatures() {
    let Some(python) = sdk_python() else { return };
    let stub = Stub::start();
    // Forms: each message; every 20th is posted twice (Twilio retries a webhook whose
    // answer it missed, with the same MessageSid).
    let forms: Vec<Params> = (0..TOTAL)
        .map(|i| sms(&format!("SM{i:032}"), &chat_of(i), &text_of(i)))
        .collect();
    let redelivered: Vec<usize> = (0..TOTAL).filter(|i| i % 20 == 0).collect();
    let sigs = sign(
        &python,
        TOKEN,
        &forms
            .iter()
            .map(|f| (PUBLIC_URL.to_owned(), f.clone()))
            .collect::<Vec<_>>(),
    );
    let bodies: Vec<String> = forms.iter().map(encode).collect();
    let bodies = Arc::new(bodies);
    let sigs = Arc::new(sigs);

    let setup = Setup::new("127.0.0.1:0", "");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = listener.local_addr().unwrap();
    setup.write_config(&format!(
        "[listen]\napi = \"off\"\nwebhook = \"127.0.0.1:1\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n{}[webhook]\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n",
        setup.control.display(),
        setup.state.display(),
        twilio_config(
            &stub,
            PUBLIC_URL,
            "allow_all = true\nchat_rate_limit = \"100000/min\"\nsend_rate_limit = \"100000/s\""
        )
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
    // Each sender owns the numbers `i % CHATS % SENDERS == k` and sends their messages in
    // order.
    let senders: Vec<_> = (0..SENDERS)
        .map(|k| {
            let (acked, repeats, bodies, sigs) =
                (acked.clone(), repeats.clone(), bodies.clone(), sigs.clone());
            let redelivered = redelivered.clone();
            std::thread::spawn(move || {
                let mut conn = None;
                for i in (0..TOTAL).filter(|i| i % CHATS % SENDERS == k) {
                    post(&mut conn, hook, &bodies[i], &sigs[i], i % 17 == 0);
                    if redelivered.contains(&i) {
                        post(&mut conn, hook, &bodies[i], &sigs[i], false);
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
    assert_eq!(*repeats.lock().unwrap(), redelivered.len());

    let want: HashMap<String, Vec<String>> = (0..TOTAL).fold(HashMap::new(), |mut m, i| {
        m.entry(chat_of(i)).or_default().push(text_of(i));
        m
    });
    let all: HashSet<String> = (0..TOTAL).map(text_of).collect();
    stub.wait_delivered(Duration::from_secs(120), |d| {
        let (seen, _) = fold(d);
        let seen: HashSet<&String> = seen.values().flatten().collect();
        all.iter().all(|t| seen.contains(t))
    });
    std::thread::sleep(Duration::from_millis(1500));
    let delivered = stub.delivered();
    let (got, resent) = fold(&delivered);
    for chat in 0..CHATS {
        let c = chat_of(chat);
        assert_eq!(
            got.get(&c),
            want.get(&c),
            "number {chat}: every message answered once, in order"
        );
    }
    let total: usize = resent.values().sum();
    eprintln!(
        "twilio: {} messages sent for {TOTAL} received, {total} marked re-sends",
        delivered.len()
    );
    for (chat, n) in &resent {
        assert!(*n <= KILLS, "{chat}: {n} re-sends for {KILLS} kills");
    }
    drop(gw);
}
