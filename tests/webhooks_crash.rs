//! Nothing acknowledged is lost: 2,000 signed deliveries (every 25th id sent twice on
//! purpose) while the test SIGKILLs the gateway at 5 random moments and relaunches it on
//! the same listening socket, as a supervisor would. Afterwards the receiver has every
//! delivery that was ever answered 2xx; an id arrived twice only when a kill fell between
//! its arrival and the ledger recording it; the deliberate repeats were answered
//! `duplicate` and ran once.

mod common;
mod webhooks_support;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use webhooks_support::*;

const SECRET: &str = "crash-secret";
const TOTAL: usize = 2000;
const KILLS: usize = 5;
const SENDERS: usize = 8;

/// Each id's answers, in order: the HTTP status and the `status` field.
type Answers = HashMap<String, Vec<(u16, String)>>;

fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn launch(setup: &Setup, listener: &TcpListener, notify: &NotifySink) -> Gateway {
    spawn_with_socket(setup, listener, "webhook", notify, "warn")
}

/// Sends `id` until some answer is 2xx (as a sender redelivers); returns that answer's
/// status and body.
fn deliver(conn: &mut Option<Conn>, hook: SocketAddr, id: &str) -> (u16, serde_json::Value) {
    let body = format!("{{\"id\": \"{id}\", \"pad\": \"{}\"}}", "x".repeat(200));
    let sig = sign_github(SECRET, body.as_bytes());
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(Instant::now() < end, "{id} never acknowledged");
        if conn.is_none() {
            *conn = Conn::open(hook).ok();
        }
        let Some(c) = conn.as_mut() else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        match c.request(
            "POST",
            "/webhooks/crash",
            &[
                ("X-GitHub-Delivery", id),
                ("X-GitHub-Event", "ping"),
                ("X-Hub-Signature-256", &sig),
            ],
            &body,
        ) {
            Ok(r) if (200..300).contains(&r.status) => return (r.status, r.json()),
            Ok(r) => {
                // 503 while the store is unavailable is allowed; nothing else is.
                assert_eq!(r.status, 503, "{id}: {}", r.body);
                *conn = None;
            }
            Err(_) => *conn = None, // killed mid-request: send again
        }
    }
}

#[test]
fn sigkill_at_five_random_moments_loses_no_acknowledged_delivery() {
    let rx = Receiver::start(|_, _| 200);
    let setup = Setup::new("127.0.0.1:0", "");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = listener.local_addr().unwrap();
    setup.write_config(&format!(
        r#"[listen]
api = "off"
webhook = "127.0.0.1:1"
control = "{}"
[state]
dir = "{}"
[webhook]
retry_initial = "50ms"
retry_max = "500ms"
[[webhook.routes]]
name = "crash"
scheme = "github"
secret = "{SECRET}"
template = "{{body.id}}"
target = {{ type = "http", url = "{}" }}
"#,
        setup.control.display(),
        setup.state.display(),
        rx.url()
    ));
    let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
    let notify = setup.notify();
    let gateway = Arc::new(Mutex::new(launch(&setup, &listener, &notify)));
    notify.wait_for("READY=1", Duration::from_secs(20));

    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    // id → answers (status, status field) in order.
    let answers: Arc<Mutex<Answers>> = Arc::default();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (next, acked, answers) = (next.clone(), acked.clone(), answers.clone());
            std::thread::spawn(move || {
                let mut conn = None;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= TOTAL {
                        return;
                    }
                    let id = format!("d-{i}");
                    let times = if i % 25 == 0 { 2 } else { 1 };
                    for _ in 0..times {
                        let (status, v) = deliver(&mut conn, hook, &id);
                        answers
                            .lock()
                            .unwrap()
                            .entry(id.clone())
                            .or_default()
                            .push((status, v["status"].as_str().unwrap_or("").to_owned()));
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();

    // Kill at 5 random points of progress, relaunching on the same socket each time.
    let mut marks: Vec<usize> = (0..KILLS)
        .map(|_| 100 + (random() % (TOTAL as u64 - 300)) as usize)
        .collect();
    marks.sort_unstable();
    let mut kills: Vec<Instant> = Vec::new();
    let mut notify = notify;
    for m in marks {
        while acked.load(Ordering::Relaxed) < m {
            std::thread::sleep(Duration::from_millis(1));
        }
        // A random moment within the next few milliseconds, not just at the mark.
        std::thread::sleep(Duration::from_micros(random() % 5000));
        let mut g = gateway.lock().unwrap();
        g.signal(Signal::SIGKILL);
        kills.push(Instant::now());
        let st = g.wait(Duration::from_secs(10));
        assert_eq!(st.code(), None, "killed by a signal");
        drop(notify);
        let _ = std::fs::remove_file(setup.dir.path().join("notify.sock"));
        notify = setup.notify();
        *g = launch(&setup, &listener, &notify);
        drop(g);
        notify.wait_for("READY=1", Duration::from_secs(20));
    }
    for s in senders {
        s.join().unwrap();
    }
    let answers = answers.lock().unwrap().clone();
    assert_eq!(answers.len(), TOTAL);
    assert_eq!(kills.len(), KILLS);

    // Every acknowledged id reaches the receiver.
    let all_ids: HashSet<String> = answers.keys().cloned().collect();
    let got = rx.wait_until(Duration::from_secs(120), |g| {
        let seen: HashSet<&str> = g
            .iter()
            .filter_map(|r| r.body["source_id"].as_str())
            .collect();
        all_ids.iter().all(|id| seen.contains(id.as_str()))
    });
    // Let late repeats (resumed attempts) arrive before counting.
    std::thread::sleep(Duration::from_millis(1000));
    let got = if rx.all().len() > got.len() {
        rx.all()
    } else {
        got
    };

    let mut by_id: HashMap<String, Vec<Instant>> = HashMap::new();
    for r in &got {
        let id = r.body["source_id"].as_str().unwrap_or("").to_owned();
        assert_eq!(r.body["status"], "completed", "{}", r.body);
        assert_eq!(
            r.body["output"].as_str(),
            Some(id.as_str()),
            "the turn saw its own body"
        );
        by_id.entry(id).or_default().push(r.at);
    }
    // The receiver records requests as its connections read them, not in time order.
    for times in by_id.values_mut() {
        times.sort();
    }
    // Repeats only for ids in flight at a kill: first arrival shortly before a kill,
    // the next one after it.
    let mut repeated = 0;
    for (id, times) in &by_id {
        if times.len() > 1 {
            repeated += 1;
            let (first, second) = (times[0], times[1]);
            assert!(
                // The receiver stamps a request when it has read it, which may be just
                // after the signal was sent: 100 ms of slack.
                kills
                    .iter()
                    .any(|k| first <= *k + Duration::from_millis(100)
                        && *k <= second
                        && k.duration_since(first) < Duration::from_secs(2)),
                "{id} arrived {} times, not across a kill: arrivals {:?}, kills {:?} (ms from the first kill)",
                times.len(),
                times
                    .iter()
                    .map(|t| t.saturating_duration_since(kills[0]).as_millis() as i64
                        - if *t < kills[0] {
                            kills[0].duration_since(*t).as_millis() as i64
                        } else {
                            0
                        })
                    .collect::<Vec<_>>(),
                kills
                    .iter()
                    .map(|k| k.duration_since(kills[0]).as_millis())
                    .collect::<Vec<_>>()
            );
        }
    }
    // The deliberate repeats: the second answer was `duplicate`, and they ran once
    // (unless in flight at a kill, as above).
    for (id, a) in &answers {
        if a.len() == 2 {
            assert_eq!(a[1], (200, "duplicate".to_owned()), "{id}: {a:?}");
        }
    }
    eprintln!(
        "{} ids, {} receipts, {repeated} ids repeated across {} kills",
        by_id.len(),
        got.len(),
        kills.len()
    );
    assert!(repeated <= KILLS * 64, "too many repeats: {repeated}");
}
