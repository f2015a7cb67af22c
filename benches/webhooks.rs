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

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::Request;
use hyper::body::Bytes;
use sha2::Sha256;
use support::{MakeRequest, drive, env_u64, median};

const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");
const SECRET: &str = "bench-secret";
const BODY_SIZE: usize = 4096;

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

fn run(addr: SocketAddr, load: Load, conns: usize, secs: u64, round: usize) -> Outcome {
    let make: Arc<MakeRequest> = Arc::new(move |conn_id, n, _| match load {
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
    });
    let load = drive(addr, conns, secs, None, make);
    Outcome {
        rps: load.rps(),
        p50_ms: load.quantile_ms(0.50),
        p99_ms: load.quantile_ms(0.99),
        errors: load.errors,
        count: load.latencies_us.len(),
    }
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
