//! The crash test under REAL systemd 252 (tests/support/sdbox.rs): the webhook socket held
//! by a `.socket` unit, the gateway a `Type=notify` service with `Restart=on-failure`.
//! 2,000 signed deliveries (every 25th sent twice) while `systemctl kill -s KILL` hits the
//! service at 5 random moments; systemd restarts it on the same socket. Every acknowledged
//! delivery reaches the receiver; an id arrives twice only across a kill; deliberate repeats
//! are answered `duplicate`.
//!
//! Skips (saying why) where the machine cannot make the namespaces; under CI=true it must run.

mod common;
mod support;
mod webhooks_support;

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Conn;
use support::sdbox::{self, SystemdBox};
use webhooks_support::*;

const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");
const SECRET: &str = "systemd-crash-secret";
const TOTAL: usize = 2000;
const KILLS: usize = 5;
const SENDERS: usize = 8;
const PORT: u16 = 8644;

type Answers = HashMap<String, Vec<(u16, String)>>;

const SERVICE: &str = "[Unit]
Description=hermes-gateway (webhook crash test)
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
";

const SOCKET: &str = "[Unit]
Description=hermes-gateway webhook socket (test)

[Socket]
ListenStream=127.0.0.1:8644
FileDescriptorName=webhook
Backlog=4096
Service=hermes-gateway.service
";

fn random() -> u64 {
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

fn deliver(conn: &mut Option<Conn>, hook: SocketAddr, id: &str) -> (u16, serde_json::Value) {
    let body = format!("{{\"id\": \"{id}\"}}");
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
            &[("X-GitHub-Delivery", id), ("X-Hub-Signature-256", &sig)],
            &body,
        ) {
            Ok(r) if (200..300).contains(&r.status) => return (r.status, r.json()),
            Ok(r) => {
                assert_eq!(r.status, 503, "{id}: {}", r.body);
                *conn = None;
            }
            Err(_) => *conn = None,
        }
    }
}

fn main_pid(sb: &SystemdBox) -> String {
    sb.show("hermes-gateway.service", "MainPID")
}

#[test]
fn systemctl_kill_at_five_random_moments_loses_no_acknowledged_delivery() {
    let Some(()) = sdbox::require_or_skip(
        "systemctl_kill_at_five_random_moments_loses_no_acknowledged_delivery",
    ) else {
        return;
    };
    // The receiver lives in the box's network namespace, beside the gateway.
    let pending = SystemdBox::builder()
        .host_file("/usr/local/bin/hermes-gateway", BIN, 0o755)
        .unit("hermes-gateway.service", SERVICE)
        .unit("hermes-gateway-webhook.socket", SOCKET);
    // The config names the receiver, which needs the namespace: boot first, then write it.
    let sb = pending.boot().expect("boot a systemd box");
    let rx = sb.run_in_netns(|| Receiver::start(|_, _| 200));
    sb.write_file(
        "/etc/hermes-gateway/gateway.toml",
        format!(
            r#"[listen]
api = "off"
webhook = "127.0.0.1:{PORT}"
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
            rx.url()
        ),
        0o644,
    );
    sb.systemctl_ok(&["start", "hermes-gateway-webhook.socket"]);
    sb.systemctl_ok(&["start", "hermes-gateway.service"]);
    sdbox::wait_until("service active", Duration::from_secs(20), || {
        sb.show("hermes-gateway.service", "ActiveState") == "active"
    });
    let hook = SocketAddr::from(([127, 0, 0, 1], PORT));

    let next = Arc::new(AtomicUsize::new(0));
    let acked = Arc::new(AtomicUsize::new(0));
    let answers: Arc<Mutex<Answers>> = Arc::default();
    let ns = sb.netns();
    let senders: Vec<_> = (0..SENDERS)
        .map(|_| {
            let (next, acked, answers) = (next.clone(), acked.clone(), answers.clone());
            ns.spawn(move || {
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

    let mut marks: Vec<usize> = (0..KILLS)
        .map(|_| 100 + (random() % (TOTAL as u64 - 600)) as usize)
        .collect();
    marks.sort_unstable();
    let restarts_before: u64 = sb
        .show("hermes-gateway.service", "NRestarts")
        .parse()
        .unwrap_or(0);
    let mut kills = Vec::new();
    for m in marks {
        while acked.load(Ordering::Relaxed) < m {
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_micros(random() % 5000));
        let old = main_pid(&sb);
        sb.systemctl_ok(&["kill", "-s", "KILL", "hermes-gateway.service"]);
        kills.push(Instant::now());
        sdbox::wait_until("restarted after SIGKILL", Duration::from_secs(20), || {
            let pid = main_pid(&sb);
            pid != "0"
                && pid != old
                && sb.show("hermes-gateway.service", "ActiveState") == "active"
                && sb.show("hermes-gateway.service", "SubState") == "running"
        });
    }
    for s in senders {
        s.join().unwrap();
    }
    let restarts: u64 = sb
        .show("hermes-gateway.service", "NRestarts")
        .parse()
        .unwrap_or(0);
    assert_eq!(
        restarts - restarts_before,
        KILLS as u64,
        "Restart=on-failure relaunched each kill"
    );
    let answers = answers.lock().unwrap().clone();
    assert_eq!(answers.len(), TOTAL);

    let all_ids: HashSet<String> = answers.keys().cloned().collect();
    rx.wait_until(Duration::from_secs(120), |g| {
        let seen: HashSet<&str> = g
            .iter()
            .filter_map(|r| r.body["source_id"].as_str())
            .collect();
        all_ids.iter().all(|id| seen.contains(id.as_str()))
    });
    std::thread::sleep(Duration::from_millis(1000));
    let got = rx.all();
    let mut by_id: HashMap<String, Vec<Instant>> = HashMap::new();
    for r in &got {
        let id = r.body["source_id"].as_str().unwrap_or("").to_owned();
        assert_eq!(r.body["output"].as_str(), Some(id.as_str()), "{}", r.body);
        by_id.entry(id).or_default().push(r.at);
    }
    let mut repeated = 0;
    for (id, times) in &by_id {
        if times.len() > 1 {
            repeated += 1;
            let (first, second) = (times[0], times[1]);
            assert!(
                kills
                    .iter()
                    .any(|k| first <= *k + Duration::from_millis(100)
                        && *k <= second
                        && k.duration_since(first) < Duration::from_secs(2)),
                "{id} arrived {} times, not across a kill",
                times.len()
            );
        }
    }
    for (id, a) in &answers {
        if a.len() == 2 {
            assert_eq!(a[1], (200, "duplicate".to_owned()), "{id}: {a:?}");
        }
    }
    eprintln!(
        "{} ids, {} receipts, {repeated} ids repeated across {} kills (systemd)",
        by_id.len(),
        got.len(),
        kills.len()
    );
    // The journal carries ROUTE and DELIVERY_ID as fields of their own.
    let accepted = sb.journal(&["-u", "hermes-gateway.service", "MESSAGE=webhook accepted"]);
    let e = accepted
        .first()
        .expect("an accepted delivery in the journal");
    assert!(
        e.get("ROUTE")
            .and_then(|r| r.as_str())
            .is_some_and(|r| !r.is_empty()),
        "{e}"
    );
    assert!(
        e.get("DELIVERY_ID")
            .and_then(|d| d.as_str())
            .is_some_and(|d| d.starts_with("dlv_")),
        "{e}"
    );
    let route = e["ROUTE"].as_str().unwrap_or_default();
    let by_route = sb.journal(&["-u", "hermes-gateway.service", &format!("ROUTE={route}")]);
    assert!(
        by_route.len() >= TOTAL / 2,
        "journalctl ROUTE={route} filters: {} entries",
        by_route.len()
    );
    let _ = sb.shutdown();
}
