//! Webhook benchmark: `cargo bench --bench webhooks`.
//!
//! Starts the release binary (echo agent, `log` target, log level warn) and drives it with
//! a hyper client at 64 keep-alive connections: signed GitHub-style deliveries of 4 KiB
//! (`POST /webhooks/bench`, each with its own delivery id and HMAC-SHA256 signature,
//! computed by the client) against `GET /health` on the same binary. A delivery is
//! answered 202 only after its group commit, so its latency includes the fsync. Rounds
//! alternate the two workloads; the medians are printed side by side. The turns and
//! deliveries behind the 202s run in the background meanwhile (they share the 2 CPUs and
//! the writer); at the end the bench waits for that backlog to drain and reports how
//! long it took.
//!
//! Environment: BENCH_SECS (per round, default 5), BENCH_ROUNDS (default 3),
//! BENCH_CONNS (default 64).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use sha2::Sha256;
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");
const SECRET: &str = "bench-secret";
const BODY_SIZE: usize = 4096;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Gateway {
    child: Child,
    api: SocketAddr,
    hook: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

fn start(dir: &Path) -> Gateway {
    let (api, hook) = (free_port(), free_port());
    let config = dir.join("gateway.toml");
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
[[webhook.routes]]
name = "bench"
scheme = "github"
secret = "{SECRET}"
template = "{{event}} {{body.action}} on {{body.repository.full_name}}"
target = {{ type = "log" }}
"#,
            dir.join("control.sock").display(),
            dir.join("state").display()
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
    while std::net::TcpStream::connect(hook).is_err() {
        assert!(Instant::now() < end, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Gateway { child, api, hook }
}

#[derive(Clone, Copy)]
enum Load {
    Health,
    Delivery,
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    count: usize,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A GitHub-like push payload padded to `BODY_SIZE` bytes.
fn payload(id: &str) -> String {
    let head = format!(
        r#"{{"action":"opened","delivery":"{id}","repository":{{"full_name":"octo/bench","name":"bench"}},"pad":""#
    );
    let pad = BODY_SIZE.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

async fn connection(
    addr: SocketAddr,
    load: Load,
    conn_id: usize,
    round: usize,
    until: Instant,
    errors: Arc<AtomicU64>,
) -> Vec<u32> {
    let mut lat = Vec::with_capacity(100_000);
    let Ok(stream) = TcpStream::connect(addr).await else {
        errors.fetch_add(1, Ordering::Relaxed);
        return lat;
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut sender, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        errors.fetch_add(1, Ordering::Relaxed);
        return lat;
    };
    tokio::spawn(conn);
    let mut n: u64 = 0;
    while Instant::now() < until {
        let req = match load {
            Load::Health => Request::get("/health")
                .header("host", "bench")
                .body(Full::new(Bytes::new())),
            Load::Delivery => {
                let id = format!("bench-{round}-{conn_id}-{n}");
                let body = payload(&id);
                let mut m = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
                m.update(body.as_bytes());
                let sig = format!("sha256={}", hex(&m.finalize().into_bytes()));
                Request::post("/webhooks/bench")
                    .header("host", "bench")
                    .header("content-type", "application/json")
                    .header("x-github-delivery", id)
                    .header("x-github-event", "pull_request")
                    .header("x-hub-signature-256", sig)
                    .body(Full::new(Bytes::from(body)))
            }
        };
        let Ok(req) = req else { break };
        n += 1;
        let t = Instant::now();
        match sender.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                if resp.into_body().collect().await.is_err() || !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                lat.push(t.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
            }
            Err(_) => {
                errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    lat
}

fn run(addr: SocketAddr, load: Load, conns: usize, secs: u64, round: usize) -> Outcome {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let mut all: Vec<u32> = rt.block_on(async {
        let tasks: Vec<_> = (0..conns)
            .map(|i| tokio::spawn(connection(addr, load, i, round, until, errors.clone())))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            if let Ok(v) = t.await {
                all.extend(v);
            }
        }
        all
    });
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |&us| f64::from(us) / 1000.0)
    };
    Outcome {
        rps: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors: errors.load(Ordering::Relaxed),
        count: all.len(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn open_deliveries(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .and_then(|c| {
            c.query_row(
                "SELECT count(*) FROM deliveries WHERE state NOT IN ('delivered', 'failed')",
                [],
                |r| r.get(0),
            )
        })
        .unwrap_or(-1)
}

fn main() {
    let secs = env_u64("BENCH_SECS", 5);
    let rounds = env_u64("BENCH_ROUNDS", 3) as usize;
    let conns = env_u64("BENCH_CONNS", 64) as usize;
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path());
    println!(
        "hermes-gateway webhook benchmark: {conns} keep-alive connections, {rounds} rounds of {secs}s each, signed 4 KiB GitHub-style deliveries (202 after commit), echo agent, log target, log level warn, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    run(gw.api, Load::Health, conns, 1, 0);
    run(gw.hook, Load::Delivery, conns, 1, 0);

    let mut health = Vec::new();
    let mut hooks = Vec::new();
    let mut accepted = 0;
    for round in 1..=rounds {
        let h = run(gw.api, Load::Health, conns, secs, round);
        let d = run(gw.hook, Load::Delivery, conns, secs, round);
        accepted += d.count;
        println!(
            "round {round}: GET /health {:>8.0} req/s p50 {:>5.2} ms p99 {:>5.2} ms ({} errors) | webhook delivery {:>7.0}/s p50 {:>5.2} ms p99 {:>5.2} ms ({} errors)",
            h.rps, h.p50_ms, h.p99_ms, h.errors, d.rps, d.p50_ms, d.p99_ms, d.errors
        );
        health.push(h);
        hooks.push(d);
    }
    let med = |v: &[Outcome], f: fn(&Outcome) -> f64| median(v.iter().map(f).collect());
    println!(
        "median: GET /health {:.0} req/s p99 {:.2} ms | webhook deliveries {:.0}/s p50 {:.2} ms p99 {:.2} ms (target >= 5000/s, p99 <= 25 ms)",
        med(&health, |o| o.rps),
        med(&health, |o| o.p99_ms),
        med(&hooks, |o| o.rps),
        med(&hooks, |o| o.p50_ms),
        med(&hooks, |o| o.p99_ms),
    );
    // The work behind the 202s: how long until every accepted delivery ran and was logged.
    let db = dir.path().join("state/gateway.db");
    let t = Instant::now();
    let backlog = open_deliveries(&db);
    while open_deliveries(&db) > 0 && t.elapsed() < Duration::from_secs(600) {
        std::thread::sleep(Duration::from_millis(200));
    }
    println!(
        "backlog: {backlog} of the round's deliveries still open when the load stopped; all done {:.1}s later (rounds and warm-up accepted about {accepted})",
        t.elapsed().as_secs_f64()
    );
}
