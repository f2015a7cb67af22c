//! Telegram benchmark: `cargo bench --bench telegram`.
//!
//! The release binary with the echo agent (log level warn) against a stub Bot API that
//! runs in this process, measured from the stub's and the client's side, in one run:
//!
//! - (a) **webhook**: signed updates (`X-Telegram-Bot-Api-Secret-Token`) POSTed to
//!   `/platforms/telegram/main` on 40 keep-alive connections (as many as Telegram opens),
//!   each answered 200 only after its commit: updates/s and latency, against `GET /health` of the same process. Each
//!   connection moves to a new chat every 4 updates (a chat's turns queue behind each
//!   other; the 16 a session may queue are never reached). The turns and replies behind
//!   the 200s run meanwhile on the same two CPUs; after each round the bench waits until
//!   every one is answered (reported: how long, and replies per second overall), so that
//!   each round and each `/health` round starts from an idle gateway.
//! - (b) **polling**: N updates (1,000 chats) are put at the stub at once; the gateway
//!   takes them in batches of 100 (`getUpdates` `limit`), committing each batch before the
//!   next `getUpdates` confirms it. Measured: push → the offset past the last update
//!   confirmed, and push → the last reply received.
//! - (c) **arrival → sendMessage**: one update every 10 ms (100/s, 4 connections, 200
//!   chats) POSTed to the webhook; the time from the POST being sent to the stub receiving
//!   its reply's `sendMessage` (the gateway's whole path: commit, turn, reply).
//! - (d) **memory**: a fresh gateway takes one update from each of 10,000 chats; VmRSS
//!   once every reply arrived.
//!
//! Every instance sets `send_rate_limit` and `chat_rate_limit` to 100000/s: Telegram's
//! own pacing (30 messages/s per bot by default) would otherwise be what (a)–(c) measure.
//!
//! The stub is this file's, not `tests/telegram_support`: that one (a thread per
//! connection, every call kept with its JSON, and each `sendMessage` counting the chat's
//! earlier calls by scanning them all) slows down as calls accumulate, and tens of
//! thousands of replies is what this bench makes. This one is a hyper server on its own
//! two-thread runtime that only counts replies (and keeps their arrival times in (c)).
//!
//! Environment: BENCH_SECS (per round of (a), (c): default 5 and 10), BENCH_ROUNDS
//! (default 3), BENCH_CONNS (default 40: Telegram's own `max_connections`), BENCH_POLL_UPDATES (per round of (b), default
//! 10000), BENCH_CHATS (for (d), default 10000), BENCH_ONLY (the parts to run, default
//! `abcd`).

#[path = "support/procfs.rs"]
mod procfs;
mod support;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use procfs::{TICK_US, cpu_ticks, machine_ticks};
use support::{MakeRequest, drive, env_u64, median};
use tokio::net::TcpStream;
use tokio::sync::Notify;

const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");
const TOKEN: &str = "123456789:AAbench-token_0123456789abcdefghijklmnop";
const SECRET: &str = "bench-secret_0123";

// ------------------------------------------------------------------------------ the stub

/// A fast stub of the Bot API: `getMe`, `getUpdates` (long polling from a queue),
/// `sendMessage` (counted; timed when asked), the rest answered `true`.
struct Stub {
    addr: SocketAddr,
    state: Arc<StubState>,
    _rt: tokio::runtime::Runtime,
}

#[derive(Default)]
struct StubState {
    /// Updates not yet confirmed: (update_id, JSON).
    pending: Mutex<VecDeque<(i64, String)>>,
    pushed: Notify,
    /// The highest offset a getUpdates confirmed, and when it first reached `watch`.
    confirmed: AtomicI64,
    watch: Mutex<(i64, Option<Instant>)>,
    sends: AtomicU64,
    /// When the send count first reached the target.
    sends_watch: Mutex<(u64, Option<Instant>)>,
    /// (c): arrival of each reply, by the update number its text carries.
    timed: Mutex<Option<Vec<(u64, Instant)>>>,
    next_message_id: AtomicI64,
}

impl Stub {
    fn start() -> Stub {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("stub")
            .enable_all()
            .build()
            .expect("stub runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the stub");
        let addr = listener.local_addr().expect("stub address");
        let state = Arc::new(StubState::default());
        let st = state.clone();
        rt.spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| answer(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        Stub {
            addr,
            state,
            _rt: rt,
        }
    }

    fn api_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn push(&self, updates: Vec<(i64, String)>) {
        self.state
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(updates);
        self.state.pushed.notify_waiters();
    }

    fn watch_offset(&self, offset: i64) {
        *self.state.watch.lock().unwrap() = (offset, None);
        if self.state.confirmed.load(Ordering::SeqCst) >= offset {
            self.state.watch.lock().unwrap().1 = Some(Instant::now());
        }
    }

    fn offset_reached(&self) -> Option<Instant> {
        self.state.watch.lock().unwrap().1
    }

    fn sends(&self) -> u64 {
        self.state.sends.load(Ordering::SeqCst)
    }

    fn watch_sends(&self, n: u64) {
        *self.state.sends_watch.lock().unwrap() = (n, None);
        if self.sends() >= n {
            self.state.sends_watch.lock().unwrap().1 = Some(Instant::now());
        }
    }

    fn sends_reached(&self) -> Option<Instant> {
        self.state.sends_watch.lock().unwrap().1
    }

    /// Waits until `n` replies arrived in all; false after `timeout`.
    fn wait_sends(&self, n: u64, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while self.sends() < n {
            if Instant::now() > end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn start_timing(&self) {
        *self.state.timed.lock().unwrap() = Some(Vec::with_capacity(10_000));
    }

    fn take_timing(&self) -> Vec<(u64, Instant)> {
        self.state.timed.lock().unwrap().take().unwrap_or_default()
    }
}

fn json_response(body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn answer(
    st: Arc<StubState>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_owned();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let method = path
        .strip_prefix("/bot")
        .and_then(|p| p.split_once('/'))
        .filter(|(t, _)| *t == TOKEN)
        .map_or("", |(_, m)| m);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    Ok(match method {
        "sendMessage" => {
            let now = Instant::now();
            let id = st.next_message_id.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = st.timed.lock().unwrap_or_else(|p| p.into_inner()).as_mut()
                && let Some(n) = v["text"]
                    .as_str()
                    .and_then(|t| t.strip_prefix('u'))
                    .and_then(|n| n.parse().ok())
            {
                t.push((n, now));
            }
            let n = st.sends.fetch_add(1, Ordering::SeqCst) + 1;
            {
                let mut w = st.sends_watch.lock().unwrap_or_else(|p| p.into_inner());
                if w.1.is_none() && w.0 > 0 && n >= w.0 {
                    w.1 = Some(now);
                }
            }
            json_response(format!(
                r#"{{"ok":true,"result":{{"message_id":{id},"date":1700000000,"chat":{{"id":{}}}}}}}"#,
                v["chat_id"]
            ))
        }
        "getUpdates" => {
            if let Some(o) = v["offset"].as_i64() {
                st.pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .retain(|(id, _)| *id >= o);
                let was = st.confirmed.fetch_max(o, Ordering::SeqCst);
                if o > was {
                    let mut w = st.watch.lock().unwrap_or_else(|p| p.into_inner());
                    if w.1.is_none() && w.0 > 0 && o >= w.0 {
                        w.1 = Some(Instant::now());
                    }
                }
            }
            let limit = v["limit"].as_u64().unwrap_or(100) as usize;
            let hold = Duration::from_secs(v["timeout"].as_u64().unwrap_or(0).min(60));
            let end = tokio::time::Instant::now() + hold;
            loop {
                let pushed = st.pushed.notified();
                tokio::pin!(pushed);
                pushed.as_mut().enable();
                if !st
                    .pending
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty()
                {
                    break;
                }
                tokio::select! {
                    () = pushed => {}
                    () = tokio::time::sleep_until(end) => break,
                }
            }
            let mut out = String::from(r#"{"ok":true,"result":["#);
            for (i, (_, u)) in st
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .take(limit)
                .enumerate()
            {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(u);
            }
            out.push_str("]}");
            json_response(out)
        }
        "getMe" => json_response(
            r#"{"ok":true,"result":{"id":123456789,"is_bot":true,"first_name":"Bench","username":"hermes_bench_bot"}}"#.into(),
        ),
        "" => {
            let mut r = json_response(r#"{"ok":false,"error_code":404,"description":"Not Found"}"#.into());
            *r.status_mut() = hyper::StatusCode::NOT_FOUND;
            r
        }
        _ => json_response(r#"{"ok":true,"result":true}"#.into()),
    })
}

/// A private-chat text update whose text is `u{n}` (what the echo agent sends back).
fn update(update_id: i64, chat: i64, message_id: i64, n: u64) -> String {
    format!(
        r#"{{"update_id":{update_id},"message":{{"message_id":{message_id},"date":1700000000,"chat":{{"id":{chat},"type":"private"}},"from":{{"id":{chat},"is_bot":false,"first_name":"Bench"}},"text":"u{n}"}}}}"#
    )
}

// ------------------------------------------------------------------------------ the gateway

struct Gateway {
    child: Child,
    api: SocketAddr,
    hook: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    fn pid(&self) -> String {
        self.child.id().to_string()
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn start(stub: &Stub, mode: &str) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let (api, hook) = (free_port(), free_port());
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            r#"[listen]
api = "127.0.0.1:{api}"
webhook = "127.0.0.1:{hook}"
control = "{}"
[state]
dir = "{}"
[log]
level = "warn"
[[platforms.telegram]]
name = "main"
token = "{TOKEN}"
api_base = "{}"
mode = "{mode}"
webhook_secret = "{SECRET}"
allow_all = true
chat_rate_limit = "100000/s"
send_rate_limit = "100000/s"
poll_timeout = "30s"
"#,
            dir.path().join("control.sock").display(),
            dir.path().join("state").display(),
            stub.api_base(),
        ),
    )
    .expect("write config");
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the gateway");
    let api = SocketAddr::from(([127, 0, 0, 1], api));
    let hook = SocketAddr::from(([127, 0, 0, 1], hook));
    let end = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(api).is_err() || std::net::TcpStream::connect(hook).is_err()
    {
        assert!(Instant::now() < end, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Gateway {
        child,
        api,
        hook,
        dir,
    }
}

fn open_deliveries(dir: &Path) -> i64 {
    rusqlite::Connection::open(dir.join("state/gateway.db"))
        .and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM deliveries WHERE state NOT IN ('delivered', 'failed')",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(-1)
}

// ------------------------------------------------------------------------------ CPU figures

/// CPU used between `begin` and `end`: the gateway's, this process's (stub and client),
/// and the share of the machine other processes took.
struct Cpu {
    gw: u64,
    me: u64,
    m: (u64, u64),
    pid: String,
}

impl Cpu {
    fn begin(gw: &Gateway) -> Cpu {
        let pid = gw.pid();
        Cpu {
            gw: cpu_ticks(&pid),
            me: cpu_ticks("self"),
            m: machine_ticks(),
            pid,
        }
    }

    /// (gateway µs per item, bench µs per item, other processes' % of the machine).
    fn end(self, items: f64) -> (f64, f64, f64) {
        let (gw, me, m) = (cpu_ticks(&self.pid), cpu_ticks("self"), machine_ticks());
        let ours = (gw - self.gw) + (me - self.me);
        let others = (m.0 - self.m.0).saturating_sub(ours);
        let n = items.max(1.0);
        (
            (gw - self.gw) as f64 * TICK_US / n,
            (me - self.me) as f64 * TICK_US / n,
            100.0 * others as f64 / (m.1 - self.m.1).max(1) as f64,
        )
    }
}

fn rss_kib(pid: &str) -> u64 {
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

fn quantile(sorted: &[f64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0)
}

// ------------------------------------------------------------------------------ (a) webhook

fn webhook_request(round: usize, conn: usize, n: u64) -> http::Result<Request<Full<Bytes>>> {
    // Unique per round, connection and request; a new chat every 4 updates.
    let update_id = (round as i64) * 1_000_000_000 + (conn as i64) * 10_000_000 + n as i64;
    let chat = (round as i64) * 100_000_000 + (conn as i64) * 1_000_000 + (n / 4) as i64 + 1;
    Request::post("/platforms/telegram/main")
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("x-telegram-bot-api-secret-token", SECRET)
        .body(Full::new(Bytes::from(update(
            update_id,
            chat,
            n as i64 + 1,
            n,
        ))))
}

struct Round {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    count: usize,
    gw_us: f64,
    me_us: f64,
    others_pct: f64,
    /// Replies received by the stub per second, from the load's start to the last one.
    answered_s: f64,
}

/// Waits until every delivery is delivered or failed: (how many were open, seconds taken).
fn drain_backlog(gw: &Gateway) -> (i64, f64) {
    let t = Instant::now();
    let backlog = open_deliveries(gw.dir.path());
    while open_deliveries(gw.dir.path()) > 0 && t.elapsed() < Duration::from_secs(900) {
        std::thread::sleep(Duration::from_millis(50));
    }
    (backlog, t.elapsed().as_secs_f64())
}

fn round_of(
    gw: &Gateway,
    addr: SocketAddr,
    conns: usize,
    secs: u64,
    make: Arc<MakeRequest>,
) -> Round {
    let cpu = Cpu::begin(gw);
    let load = drive(addr, conns, secs, None, make);
    let (gw_us, me_us, others_pct) = cpu.end(load.latencies_us.len() as f64);
    Round {
        rps: load.rps(),
        p50_ms: load.quantile_ms(0.50),
        p99_ms: load.quantile_ms(0.99),
        errors: load.errors,
        count: load.latencies_us.len(),
        gw_us,
        me_us,
        others_pct,
        answered_s: 0.0,
    }
}

fn bench_webhook(stub: &Stub, rounds: usize, secs: u64, conns: usize) -> (Vec<Round>, Vec<Round>) {
    let gw = start(stub, "webhook");
    let health: Arc<MakeRequest> = Arc::new(|_, _, _| {
        Request::get("/health")
            .header("host", "bench")
            .body(Full::new(Bytes::new()))
    });
    // Warm-up.
    round_of(&gw, gw.api, conns, 1, health.clone());
    round_of(
        &gw,
        gw.hook,
        conns,
        1,
        Arc::new(|c, n, _| webhook_request(0, c, n)),
    );
    let mut hs = Vec::new();
    let mut ws = Vec::new();
    drain_backlog(&gw);
    for round in 1..=rounds {
        let h = round_of(&gw, gw.api, conns, secs, health.clone());
        let sends_before = stub.sends();
        let all = Cpu::begin(&gw);
        let mut w = round_of(
            &gw,
            gw.hook,
            conns,
            secs,
            Arc::new(move |c, n, _| webhook_request(round, c, n)),
        );
        // The work behind the 200s (turns, replies) runs meanwhile and after: wait for
        // all of it, so that every round (and /health) starts from an idle gateway.
        let (backlog, drained) = drain_backlog(&gw);
        let replies = stub.sends() - sends_before;
        w.answered_s = replies as f64 / (secs as f64 + drained);
        let (all_gw_us, _, all_others) = all.end(w.count as f64);
        println!(
            "(a) round {round}: GET /health {:>7.0} req/s p99 {:>5.2} ms ({} errors) | webhook update {:>6.0}/s p50 {:>5.2} ms p99 {:>5.2} ms ({} errors) | ratio {:.0}%",
            h.rps,
            h.p99_ms,
            h.errors,
            w.rps,
            w.p50_ms,
            w.p99_ms,
            w.errors,
            100.0 * w.rps / h.rps.max(1.0)
        );
        println!(
            "          CPU per request: /health gateway {:.1} us + bench {:.1} us | update gateway {:.1} us + bench (client, stub) {:.1} us | other processes took {:.0}% / {:.0}% of the machine",
            h.gw_us, h.me_us, w.gw_us, w.me_us, h.others_pct, w.others_pct
        );
        println!(
            "          behind the 200s: {backlog} of the {} updates not yet answered when the load stopped, all answered {drained:.1} s later: {replies} replies in {:.1} s = {:.0} answered/s; all the gateway's work per update (ack, turn, reply) {all_gw_us:.1} us of CPU; other processes took {all_others:.0}% meanwhile",
            w.count,
            secs as f64 + drained,
            w.answered_s
        );
        hs.push(h);
        ws.push(w);
    }
    (hs, ws)
}

// ------------------------------------------------------------------------------ (b) polling

struct PollRound {
    confirm_s: f64,
    replies_s: f64,
    gw_us: f64,
    others_pct: f64,
}

fn bench_polling(stub: &Stub, rounds: usize, n: u64) -> Vec<PollRound> {
    let gw = start(stub, "polling");
    let mut next_id: i64 = 1;
    let mut out = Vec::new();
    // Round 0 warms up.
    for round in 0..=rounds {
        let n = if round == 0 { n / 10 } else { n };
        let updates: Vec<(i64, String)> = (0..n)
            .map(|i| {
                let id = next_id + i as i64;
                let chat = (round as i64 + 1) * 10_000_000 + (i % 1000) as i64;
                (id, update(id, chat, i as i64 + 1, i))
            })
            .collect();
        let last = next_id + n as i64 - 1;
        next_id = last + 1;
        let sends_before = stub.sends();
        stub.watch_offset(last + 1);
        stub.watch_sends(sends_before + n);
        // Let the gateway's long poll settle.
        std::thread::sleep(Duration::from_millis(300));
        let cpu = Cpu::begin(&gw);
        let t0 = Instant::now();
        stub.push(updates);
        let end = t0 + Duration::from_secs(300);
        while (stub.offset_reached().is_none() || stub.sends_reached().is_none())
            && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(2));
        }
        let (gw_us, _, others_pct) = cpu.end(n as f64);
        let (Some(c), Some(r)) = (stub.offset_reached(), stub.sends_reached()) else {
            println!(
                "(b) round {round}: not finished within 300 s (confirmed offset {}, {} replies of {n})",
                stub.state.confirmed.load(Ordering::SeqCst),
                stub.sends() - sends_before
            );
            continue;
        };
        let (cs, rs) = ((c - t0).as_secs_f64(), (r - t0).as_secs_f64());
        if round == 0 {
            continue;
        }
        println!(
            "(b) round {round}: {n} updates pushed at once: all confirmed after {:.0} ms = {:>6.0} updates/s; all {n} replies after {:.0} ms = {:>6.0}/s; gateway CPU {:.1} us per update; other processes took {:.0}% of the machine",
            cs * 1000.0,
            n as f64 / cs,
            rs * 1000.0,
            n as f64 / rs,
            gw_us,
            others_pct
        );
        out.push(PollRound {
            confirm_s: n as f64 / cs,
            replies_s: n as f64 / rs,
            gw_us,
            others_pct,
        });
    }
    out
}

// ------------------------------------------------------------------------------ (c) arrival → sendMessage

struct LatencyRound {
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    ack_p99_ms: f64,
    lost: usize,
    others_pct: f64,
}

fn bench_latency(stub: &Stub, rounds: usize, secs: u64) -> Vec<LatencyRound> {
    const RATE: u64 = 100;
    const CONNS: u64 = 4;
    let gw = start(stub, "webhook");
    let hook = gw.hook;
    let mut out = Vec::new();
    for round in 0..=rounds {
        let secs = if round == 0 { 2 } else { secs };
        let total = RATE * secs;
        stub.start_timing();
        let cpu = Cpu::begin(&gw);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("client runtime");
        let t0 = Instant::now() + Duration::from_millis(50);
        let sent: Vec<(u64, Instant, Duration)> = rt.block_on(async move {
            let tasks: Vec<_> = (0..CONNS)
                .map(|c| {
                    tokio::spawn(async move {
                        let mut out = Vec::new();
                        let Ok(stream) = TcpStream::connect(hook).await else {
                            return out;
                        };
                        let _ = stream.set_nodelay(true);
                        let Ok((mut sender, conn)) =
                            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                        else {
                            return out;
                        };
                        tokio::spawn(conn);
                        let mut k = c;
                        while k < total {
                            let at = t0 + Duration::from_micros(k * 1_000_000 / RATE);
                            tokio::time::sleep_until(at.into()).await;
                            let n = (round as u64) * 1_000_000 + k;
                            let id = n as i64 + 1;
                            let chat = (round as i64 + 1) * 1_000_000 + (k % 200) as i64;
                            let Ok(req) = Request::post("/platforms/telegram/main")
                                .header("host", "bench")
                                .header("content-type", "application/json")
                                .header("x-telegram-bot-api-secret-token", SECRET)
                                .body(Full::new(Bytes::from(update(id, chat, k as i64 + 1, n))))
                            else {
                                break;
                            };
                            let t = Instant::now();
                            match sender.send_request(req).await {
                                Ok(r) if r.status().is_success() => {
                                    let _ = r.into_body().collect().await;
                                    out.push((n, t, t.elapsed()));
                                }
                                _ => break,
                            }
                            k += CONNS;
                        }
                        out
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap_or_default());
            }
            all
        });
        drop(rt);
        // Every reply of the round in.
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let got = stub
                .state
                .timed
                .lock()
                .unwrap()
                .as_ref()
                .map_or(0, Vec::len);
            if got >= sent.len() || Instant::now() > end {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (_, _, others_pct) = cpu.end(total as f64);
        let arrived: HashMap<u64, Instant> = stub.take_timing().into_iter().collect();
        let mut lat: Vec<f64> = sent
            .iter()
            .filter_map(|(n, t, _)| arrived.get(n).map(|a| (*a - *t).as_secs_f64() * 1000.0))
            .collect();
        lat.sort_by(f64::total_cmp);
        let mut acks: Vec<f64> = sent.iter().map(|s| s.2.as_secs_f64() * 1000.0).collect();
        acks.sort_by(f64::total_cmp);
        let r = LatencyRound {
            p50_ms: quantile(&lat, 0.5),
            p99_ms: quantile(&lat, 0.99),
            max_ms: lat.last().copied().unwrap_or(0.0),
            ack_p99_ms: quantile(&acks, 0.99),
            lost: total as usize - lat.len(),
            others_pct,
        };
        if round == 0 {
            continue;
        }
        println!(
            "(c) round {round}: {} updates at {RATE}/s: POST sent → sendMessage received p50 {:.2} ms p99 {:.2} ms max {:.2} ms ({} without a reply); the POST's 200 p99 {:.2} ms; other processes took {:.0}% of the machine",
            lat.len(),
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.lost,
            r.ack_p99_ms,
            r.others_pct
        );
        out.push(r);
    }
    out
}

// ------------------------------------------------------------------------------ (d) memory

struct MemRound {
    start_mib: f64,
    after_mib: f64,
    errors: u64,
}

fn bench_memory(stub: &Stub, rounds: usize, chats: u64) -> Vec<MemRound> {
    let mut out = Vec::new();
    for round in 1..=rounds {
        let gw = start(stub, "webhook");
        std::thread::sleep(Duration::from_millis(300));
        let start_kib = rss_kib(&gw.pid());
        let before = stub.sends();
        let hook = gw.hook;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("client runtime");
        const CONNS: u64 = 32;
        let errors: u64 = rt.block_on(async move {
            let tasks: Vec<_> = (0..CONNS)
                .map(|c| {
                    tokio::spawn(async move {
                        let Ok(stream) = TcpStream::connect(hook).await else {
                            return chats / CONNS;
                        };
                        let Ok((mut sender, conn)) =
                            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                        else {
                            return chats / CONNS;
                        };
                        tokio::spawn(conn);
                        let mut errors = 0;
                        let mut k = c;
                        while k < chats {
                            let id = k as i64 + 1;
                            let chat = (round as i64) * 100_000_000 + k as i64;
                            let req = Request::post("/platforms/telegram/main")
                                .header("host", "bench")
                                .header("content-type", "application/json")
                                .header("x-telegram-bot-api-secret-token", SECRET)
                                .body(Full::new(Bytes::from(update(id, chat, 1, k))));
                            match req {
                                Ok(req) => match sender.send_request(req).await {
                                    Ok(r) if r.status().is_success() => {
                                        let _ = r.into_body().collect().await;
                                    }
                                    _ => errors += 1,
                                },
                                Err(_) => errors += 1,
                            }
                            k += CONNS;
                        }
                        errors
                    })
                })
                .collect();
            let mut e = 0;
            for t in tasks {
                e += t.await.unwrap_or(chats / CONNS);
            }
            e
        });
        drop(rt);
        let answered = stub.wait_sends(before + chats - errors, Duration::from_secs(300));
        std::thread::sleep(Duration::from_millis(1000));
        let after_kib = rss_kib(&gw.pid());
        println!(
            "(d) round {round}: resident memory {:.1} MiB at start, {:.1} MiB after one update from each of {chats} chats ({errors} errors{})",
            start_kib as f64 / 1024.0,
            after_kib as f64 / 1024.0,
            if answered {
                ""
            } else {
                "; NOT every reply arrived"
            }
        );
        out.push(MemRound {
            start_mib: start_kib as f64 / 1024.0,
            after_mib: after_kib as f64 / 1024.0,
            errors,
        });
    }
    out
}

// ------------------------------------------------------------------------------ main

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(String::new(), |k| {
            format!(", {:.0} GiB", k / 1024.0 / 1024.0)
        });
    format!(
        "{} CPUs ({cpu}){mem}, Linux {kernel}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    )
}

fn main() {
    let secs = env_u64("BENCH_SECS", 5);
    let rounds = env_u64("BENCH_ROUNDS", 3) as usize;
    // Telegram opens at most `max_connections` webhook connections at once: 40 unless
    // setWebhook says otherwise, and the gateway does not.
    let conns = env_u64("BENCH_CONNS", 40) as usize;
    let poll_n = env_u64("BENCH_POLL_UPDATES", 10_000);
    let chats = env_u64("BENCH_CHATS", 10_000);
    println!(
        "hermes-gateway Telegram benchmark: echo agent, log level warn, send_rate_limit and chat_rate_limit 100000/s, the bench's own stub Bot API; {rounds} rounds; {}",
        machine()
    );
    let stub = Stub::start();

    let only = std::env::var("BENCH_ONLY").unwrap_or_else(|_| "abcd".into());
    let (health, hooks) = if only.contains('a') {
        bench_webhook(&stub, rounds, secs, conns)
    } else {
        (Vec::new(), Vec::new())
    };
    let polls = if only.contains('b') {
        bench_polling(&stub, rounds, poll_n)
    } else {
        Vec::new()
    };
    let lat = if only.contains('c') {
        bench_latency(&stub, rounds, secs * 2)
    } else {
        Vec::new()
    };
    let mem = if only.contains('d') {
        bench_memory(&stub, rounds, chats)
    } else {
        Vec::new()
    };

    let med = |v: Vec<f64>| if v.is_empty() { f64::NAN } else { median(v) };
    println!("medians of {rounds} rounds:");
    let (hr, wr) = (
        med(health.iter().map(|r| r.rps).collect()),
        med(hooks.iter().map(|r| r.rps).collect()),
    );
    println!(
        "(a) webhook: {wr:.0} updates/s acknowledged after commit, p50 {:.2} ms, p99 {:.2} ms ({conns} connections; target >= 5000/s, p99 <= 25 ms) | GET /health {hr:.0} req/s, p99 {:.2} ms | updates at {:.0}% of /health | answered (turn + reply) {:.0}/s overall | gateway CPU {:.1} us per update | other processes {:.0}%",
        med(hooks.iter().map(|r| r.p50_ms).collect()),
        med(hooks.iter().map(|r| r.p99_ms).collect()),
        med(health.iter().map(|r| r.p99_ms).collect()),
        100.0 * wr / hr.max(1.0),
        med(hooks.iter().map(|r| r.answered_s).collect()),
        med(hooks.iter().map(|r| r.gw_us).collect()),
        med(hooks.iter().map(|r| r.others_pct).collect()),
    );
    println!(
        "(b) polling: {:.0} updates/s confirmed from batches of 100, replies {:.0}/s ({poll_n} per round; target >= 2000/s) | gateway CPU {:.1} us per update | other processes {:.0}%",
        med(polls.iter().map(|r| r.confirm_s).collect()),
        med(polls.iter().map(|r| r.replies_s).collect()),
        med(polls.iter().map(|r| r.gw_us).collect()),
        med(polls.iter().map(|r| r.others_pct).collect()),
    );
    println!(
        "(c) arrival → sendMessage at 100 updates/s: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms (target p99 <= 20 ms); {} updates without a reply | other processes {:.0}%",
        med(lat.iter().map(|r| r.p50_ms).collect()),
        med(lat.iter().map(|r| r.p99_ms).collect()),
        med(lat.iter().map(|r| r.max_ms).collect()),
        lat.iter().map(|r| r.lost).sum::<usize>(),
        med(lat.iter().map(|r| r.others_pct).collect()),
    );
    println!(
        "(d) memory: {:.1} MiB after updates from {chats} chats (target <= 40 MiB), {:.1} MiB at start; {} errors",
        med(mem.iter().map(|r| r.after_mib).collect()),
        med(mem.iter().map(|r| r.start_mib).collect()),
        mem.iter().map(|r| r.errors).sum::<u64>(),
    );
}
