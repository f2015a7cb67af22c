//! The soak: `SOAK_MINUTES` (default 30) of mixed load on one gateway — chat turns with
//! sessions (each session deleted after 20 turns, as users do), durable runs, signed
//! webhooks to an http target, Telegram updates through the stub Bot API, a schedule every
//! 10 s — with a reload (SIGHUP) every minute and a graceful restart (SIGUSR1, a re-exec in
//! place) every five. Every minute it prints the gateway's resident memory, open
//! descriptors, live tasks and database size, and the requests that failed.
//!
//! Goal: after the first five minutes, RSS and descriptors flat within 10 %, zero failed
//! requests, and a database bounded by retention (`[webhook] retention`, `[api]
//! run_retention` and `response_retention` all "2m" here): the rows retention prunes are
//! counted apart from the sessions' messages, which are history kept until a session is
//! deleted (the Telegram chats' sessions here never are, as a user's chat is not).
//!
//! `cargo bench --bench soak` (not part of the test command).

#[path = "../tests/telegram_support/mod.rs"]
mod telegram_support;
#[path = "../tests/webhooks_support/mod.rs"]
mod webhooks_support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");
const SECRET: &str = "soak-secret";

type HttpClient = Client<HttpConnector, Full<Bytes>>;

#[derive(Default)]
struct Counts {
    ok: AtomicU64,
    failed: AtomicU64,
    busy: AtomicU64,
}

fn status_of(control: &Path) -> Value {
    let out = Command::new(BIN)
        .args(["status", "--json", "--socket"])
        .arg(control)
        .output()
        .expect("status");
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn listener(control: &Path, name: &str) -> SocketAddr {
    let st = status_of(control);
    st["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .and_then(|l| l["address"].as_str())
        .and_then(|a| a.parse().ok())
        .expect("a listener address")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn db_bytes(state: &Path) -> u64 {
    [
        "gateway.db",
        "gateway.db-wal",
        "history.db",
        "history.db-wal",
    ]
    .iter()
    .filter_map(|f| std::fs::metadata(state.join(f)).ok())
    .map(|m| m.len())
    .sum()
}

/// Rows of the tables that retention prunes (runs, their events, deliveries, responses),
/// and of the sessions' folded messages (`history.db`, kept until a session is deleted).
fn rows(state: &Path) -> (i64, i64) {
    let Ok(c) = rusqlite::Connection::open_with_flags(
        state.join("gateway.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return (-1, -1);
    };
    let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap_or(-1);
    (
        count(
            "SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM run_events) \
             + (SELECT count(*) FROM deliveries) + (SELECT count(*) FROM responses)",
        ),
        rusqlite::Connection::open_with_flags(
            state.join("history.db"),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .and_then(|h| h.query_row("SELECT count(*) FROM messages", [], |r| r.get(0)))
        .unwrap_or(-1),
    )
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn github_signature(body: &[u8]) -> String {
    webhooks_support::sign_github(SECRET, body)
}

async fn send(
    client: &HttpClient,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: String,
    counts: &Counts,
) {
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"))
        .header("content-type", "application/json");
    for (k, v) in headers {
        req = req.header(*k, v.as_str());
    }
    let Ok(req) = req.body(Full::new(Bytes::from(body))) else {
        counts.failed.fetch_add(1, Ordering::Relaxed);
        return;
    };
    match tokio::time::timeout(Duration::from_secs(30), client.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status();
            let _ = resp.into_body().collect().await;
            if status.is_success() {
                counts.ok.fetch_add(1, Ordering::Relaxed);
            } else if status.as_u16() == 429 {
                counts.busy.fetch_add(1, Ordering::Relaxed);
            } else {
                eprintln!("{method} {path}: {status}");
                counts.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(Err(e)) => {
            eprintln!("{method} {path}: {e}");
            counts.failed.fetch_add(1, Ordering::Relaxed);
        }
        Err(_) => {
            eprintln!("{method} {path}: no answer within 30 s");
            counts.failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn main() {
    let minutes = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse::<u64>().ok())
        .unwrap_or(30);
    let stub = telegram_support::Stub::start();
    let rx = webhooks_support::Receiver::start(|_, _| 200);
    let dir = tempfile::tempdir().expect("a temp folder");
    let state: PathBuf = dir.path().join("state");
    let control = dir.path().join("control.sock");
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\napi = \"127.0.0.1:0\"\nwebhook = \"127.0.0.1:0\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n\
             [log]\nlevel = \"warn\"\n\
             [api]\nrun_retention = \"2m\"\nresponse_retention = \"2m\"\n\
             [webhook]\nretention = \"2m\"\ndedup_window = \"1m\"\n\
             [[webhook.routes]]\nname = \"soak\"\nscheme = \"github\"\nsecret = \"{SECRET}\"\ntemplate = \"{{body.n}}\"\ntarget = {{ type = \"http\", url = \"{}\" }}\n\
             [[platforms.telegram]]\nname = \"main\"\ntoken = \"{}\"\napi_base = \"{}\"\nmode = \"webhook\"\nwebhook_secret = \"{SECRET}\"\nallow_all = true\nusername = \"{}\"\nchat_rate_limit = \"100000/min\"\nsend_rate_limit = \"100000/s\"\n\
             [[schedule]]\nname = \"tick\"\ncron = \"*/10 * * * * *\"\nprompt = \"tick\"\n",
            control.display(),
            state.display(),
            rx.url(),
            telegram_support::TOKEN,
            stub.api_base(),
            telegram_support::BOT_USERNAME,
        ),
    )
    .expect("write the config");
    let mut child: Child = Command::new(BIN)
        .args(["run", "--supervisor", "none", "--config"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .stdout(Stdio::null())
        .spawn()
        .expect("start the gateway");
    let pid = child.id();
    let start = Instant::now();
    while !control.exists() || status_of(&control)["state"] != "serving" {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the gateway did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let api = listener(&control, "api");
    let hook = listener(&control, "webhook");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(5))
        .build(HttpConnector::new());
    let counts = Arc::new(Counts::default());
    let inflight = Arc::new(tokio::sync::Semaphore::new(32));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // The load: a request every 5 ms (about 200/s), in a fixed mix.
    let load = {
        let (client, counts, inflight, stop) = (
            client.clone(),
            counts.clone(),
            inflight.clone(),
            stop.clone(),
        );
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            let mut n: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                n += 1;
                let Ok(permit) = inflight.clone().acquire_owned().await else {
                    return;
                };
                let (client, counts) = (client.clone(), counts.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match n % 10 {
                        0..=4 => {
                            // Chat turns in 25 sessions at a time (`n % 50` with `n % 10`
                            // below 5), each used every fifth `turn`: 20 turns each per
                            // hundred, then deleted at its last, in the hundred's last five.
                            let turn = n / 10;
                            let session = format!("soak-{}-{}", n % 50, turn / 100);
                            let body = json!({"model": "hermes-agent", "messages": [{"role": "user", "content": format!("turn {n}")}]});
                            send(&client, api, "POST", "/v1/chat/completions",
                                &[("x-hermes-session-id", session.clone())], body.to_string(), &counts).await;
                            if turn % 100 >= 95 {
                                send(&client, api, "DELETE", &format!("/v1/sessions/{session}"), &[], String::new(), &counts).await;
                            }
                        }
                        5 => {
                            let body = json!({"input": format!("run {n}")});
                            send(&client, api, "POST", "/v1/runs", &[], body.to_string(), &counts).await;
                        }
                        6 | 7 => {
                            let body = json!({"n": n}).to_string();
                            let sig = github_signature(body.as_bytes());
                            send(&client, hook, "POST", "/webhooks/soak", &[
                                ("x-hub-signature-256", sig), ("x-github-delivery", format!("d-{n}")),
                                ("x-github-event", "push".into())], body, &counts).await;
                        }
                        _ => {
                            let chat = (n % 200) as i64 + 1;
                            let mut u = telegram_support::text_update(chat, chat, n as i64, &format!("hi {n}"));
                            u["update_id"] = (n as i64).into();
                            send(&client, hook, "POST", "/platforms/telegram/main",
                                &[("x-telegram-bot-api-secret-token", SECRET.into())], u.to_string(), &counts).await;
                        }
                    }
                });
            }
        })
    };
    println!(
        "soak: {minutes} min, pid {pid}; minute, RSS MiB, fds, tasks, db MiB, retained rows (runs, events, deliveries, responses), history messages, ok, 429, failed"
    );
    let mut table: Vec<(u64, u64, usize, i64)> = Vec::new();
    for minute in 1..=minutes {
        std::thread::sleep(Duration::from_secs(60));
        let st = status_of(&control);
        let (rss, fd, db) = (rss_kib(pid), fds(pid), db_bytes(&state));
        let (retained, history) = rows(&state);
        println!(
            "{minute:>3}  {:>6.1}  {fd:>4}  {:>5}  {:>6.1}  {retained:>7}  {history:>7}  {:>8}  {:>5}  {:>3}",
            rss as f64 / 1024.0,
            st["tasks"],
            db as f64 / (1 << 20) as f64,
            counts.ok.load(Ordering::Relaxed),
            counts.busy.load(Ordering::Relaxed),
            counts.failed.load(Ordering::Relaxed),
        );
        table.push((minute, rss, fd, retained));
        if minute % 5 == 0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGUSR1,
            );
        } else {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGHUP,
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        let _ = load.await;
        let _ = inflight.acquire_many(32).await;
    });
    let failed = counts.failed.load(Ordering::Relaxed);
    let after: Vec<&(u64, u64, usize, i64)> = table.iter().filter(|r| r.0 >= 5).collect();
    if let (Some(min), Some(max)) = (
        after.iter().map(|r| r.1).min(),
        after.iter().map(|r| r.1).max(),
    ) {
        println!(
            "RSS after minute 5: {:.1}–{:.1} MiB ({:+.1} %); fds {}–{}; retained rows {}–{}; failed requests {failed}; replies in Telegram {}; webhook results {}",
            min as f64 / 1024.0,
            max as f64 / 1024.0,
            (max as f64 / min.max(1) as f64 - 1.0) * 100.0,
            after.iter().map(|r| r.2).min().unwrap_or(0),
            after.iter().map(|r| r.2).max().unwrap_or(0),
            after.iter().map(|r| r.3).min().unwrap_or(0),
            after.iter().map(|r| r.3).max().unwrap_or(0),
            stub.delivered().len(),
            rx.all().len(),
        );
        // The trend, which single samples (a descriptor count depends on the requests in
        // flight at that instant) do not show: minutes 6–10 against the last five.
        if table.len() >= 15 {
            let window = |from: usize, f: fn(&(u64, u64, usize, i64)) -> u64| {
                median(table[from..from + 5].iter().map(f).collect())
            };
            let last = table.len() - 5;
            let (r0, r1) = (window(5, |r| r.1), window(last, |r| r.1));
            let (f0, f1) = (window(5, |r| r.2 as u64), window(last, |r| r.2 as u64));
            println!(
                "trend (median of minutes 6–10 → of the last five): RSS {:.1} → {:.1} MiB ({:+.1} %), fds {f0} → {f1} ({:+.1} %)",
                r0 as f64 / 1024.0,
                r1 as f64 / 1024.0,
                (r1 as f64 / r0.max(1) as f64 - 1.0) * 100.0,
                (f1 as f64 / f0.max(1) as f64 - 1.0) * 100.0,
            );
        }
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
}
