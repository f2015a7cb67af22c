//! What every platform's measurement shares: the gateway with all their sections, the stub
//! API that takes the replies, the rounds against `GET /health`, and the report.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::Request;
use hyper::body::Bytes;
use serde_json::json;

use super::http_stub::{self, StubResponse};
use super::procfs;
use super::support::{MakeRequest, drive, env_u64, median};

const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");

/// One platform, as the benchmark drives it.
pub struct Platform {
    pub name: &'static str,
    /// Its `[[platforms.NAME]]` section, its API at `api_base`.
    pub config: fn(api_base: &str) -> String,
    /// Its webhook path.
    pub path: &'static str,
    /// Connection `conn`'s `n`-th request (from 0), signed: a new message.
    pub request: fn(conn: usize, n: u64) -> http::Result<Request<Full<Bytes>>>,
}

/// A conversation takes this many messages of a connection, then the next one starts
/// (people write a few messages each; the sessions stay a few thousand).
pub const PER_CONVERSATION: u64 = 8;

/// The conversation of connection `conn`'s `n`-th request: each connection holds one at a
/// time, so that 64 connections are 64 chats waiting on their turns, as many users are.
/// (When consecutive requests of all connections shared a conversation instead, their
/// turns queued behind each other in a handful of sessions, and the work behind the 200s
/// lagged until the round ended: a lighter load than production's.)
pub fn conversation(conn: usize, n: u64) -> u64 {
    ((conn as u64) << 40) | (n / PER_CONVERSATION)
}

/// A number that looks random, and differs for every `(conn, n)`: the part of the ids
/// that Slack (`event_id`), Meta (`wamid`) and Twilio (`MessageSid`) draw at random. Ids
/// in the order they are made would land at the tail of the gateway's index of the
/// platforms' ids, each commit in one page of it; real ones land anywhere.
pub fn random_part(conn: usize, n: u64) -> u64 {
    // splitmix64's finaliser: a bijection, so distinct inputs never collide.
    let mut z = ((conn as u64) << 48 ^ n).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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

fn start(dir: &Path, sections: &str) -> Gateway {
    start_under(dir, sections, BIN, &[])
}

/// The gateway `bin`, run by `wrapper` (valgrind) when it is not empty.
fn start_under(dir: &Path, sections: &str, bin: &str, wrapper: &[&str]) -> Gateway {
    let (api, hook) = (free_port(), free_port());
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\napi = \"127.0.0.1:{api}\"\nwebhook = \"127.0.0.1:{hook}\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n[log]\nlevel = \"warn\"\n{sections}",
            dir.join("control.sock").display(),
            dir.join("state").display()
        ),
    )
    .expect("write config");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
        None => Command::new(bin),
    };
    let child = cmd
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
    let end = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(hook).is_err() {
        assert!(Instant::now() < end, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Gateway { child, api, hook }
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// Messages answered.
    n: u64,
}

/// What a process has used so far: CPU seconds (user and system, all its threads), and
/// bytes written (`wchar`: every write and pwrite, sockets included; `write_bytes`: those
/// that reached the disk), from `/proc`.
#[derive(Clone, Copy, Default)]
struct Usage {
    cpu_s: f64,
    wchar: u64,
    disk: u64,
}

impl Usage {
    fn of(pid: u32) -> Usage {
        let pid = pid.to_string();
        Usage {
            cpu_s: procfs::cpu_ticks(&pid) as f64 * procfs::TICK_US / 1e6,
            wchar: procfs::io(&pid, "wchar"),
            disk: procfs::io(&pid, "write_bytes"),
        }
    }

    /// Per message, from `before` to now: (CPU µs, KB written, KB to disk).
    fn per_message(self, before: Usage, n: u64) -> (f64, f64, f64) {
        let n = n.max(1) as f64;
        (
            (self.cpu_s - before.cpu_s) * 1e6 / n,
            self.wchar.saturating_sub(before.wchar) as f64 / 1024.0 / n,
            self.disk.saturating_sub(before.disk) as f64 / 1024.0 / n,
        )
    }
}

/// `rate`: see [`drive`] (`None`: as fast as the gateway answers `conns` at a time).
fn measure(
    addr: SocketAddr,
    conns: usize,
    secs: u64,
    rate: Option<f64>,
    make: Arc<MakeRequest>,
) -> Outcome {
    let load = drive(addr, conns, secs, rate, make);
    Outcome {
        rps: load.rps(),
        p50_ms: load.quantile_ms(0.50),
        p99_ms: load.quantile_ms(0.99),
        errors: load.errors,
        n: load.latencies_us.len() as u64,
    }
}

fn health() -> Arc<MakeRequest> {
    Arc::new(|_, _, _| {
        Request::get("/health")
            .header("host", "bench")
            .body(Full::new(Bytes::new()))
    })
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

/// Instructions the gateway `bin` executed in all, counted by callgrind: start, `secs` of
/// messages of `p` on one keep-alive connection (`BENCH_CONNS` when set: many share a
/// commit then, as under load), every reply sent, stop. Returns them with
/// the number of messages.
fn instructions(p: &Platform, bin: &str, base: &str, secs: u64) -> (u64, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("callgrind.out");
    let out_arg = format!("--callgrind-out-file={}", out.display());
    let gw = start_under(
        dir.path(),
        &(p.config)(base),
        bin,
        &["valgrind", "--tool=callgrind", "--quiet", &out_arg],
    );
    let request = p.request;
    let load = drive(
        gw.hook,
        env_u64("BENCH_CONNS", 1) as usize,
        secs,
        None,
        Arc::new(move |conn, n, _| request(conn, n)),
    );
    assert_eq!(
        load.errors, 0,
        "{}: failed requests under callgrind",
        p.name
    );
    let db = dir.path().join("state/gateway.db");
    let t = Instant::now();
    while open_deliveries(&db) != 0 && t.elapsed() < Duration::from_secs(300) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut gw = gw;
    let pid = nix::unistd::Pid::from_raw(gw.child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = gw.child.wait();
    if let Ok(keep) = std::env::var("BENCH_CALLGRIND_OUT") {
        let _ = std::fs::copy(&out, format!("{keep}.{}.{secs}", p.name));
    }
    let text = std::fs::read_to_string(&out).expect("callgrind's output");
    let total = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals: ")
                .or_else(|| l.strip_prefix("summary: "))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("callgrind's totals");
    (total, load.latencies_us.len() as u64)
}

/// `BENCH_INSTRUCTIONS=1`: instructions per message (its commit, its turn and its reply),
/// from a short and a long run under callgrind (the difference cancels start and stop);
/// with `BENCH_BASELINE=/path/to/an/older/hermes-gateway`, that binary's beside.
fn instructions_per_message(platforms: &[&Platform], base: &str) {
    let baseline = std::env::var("BENCH_BASELINE").ok();
    for p in platforms {
        let per = |bin: &str| {
            let (a, na) = instructions(p, bin, base, 10);
            let (b, nb) = instructions(p, bin, base, 30);
            (
                b.saturating_sub(a) as f64 / nb.saturating_sub(na).max(1) as f64,
                nb - na,
            )
        };
        let (this, n) = per(BIN);
        let mut line = format!(
            "instructions per message (callgrind, {n} messages between a 10 s and a 30 s run): {} {this:.0}",
            p.name
        );
        if let Some(old) = &baseline {
            let (before, _) = per(old);
            line.push_str(&format!(
                " | baseline {before:.0} | this / baseline {:.3}",
                this / before.max(1.0)
            ));
        }
        println!("{line}");
    }
}

pub fn main(all: &[Platform]) {
    let secs = env_u64("BENCH_SECS", 5);
    let rounds = env_u64("BENCH_ROUNDS", 3) as usize;
    let conns = env_u64("BENCH_CONNS", 64) as usize;
    let rate = env_u64("BENCH_RATE", 5000) as f64;
    let only = std::env::var("BENCH_PLATFORMS").unwrap_or_default();
    let platforms: Vec<&Platform> = all
        .iter()
        .filter(|p| only.is_empty() || only.split(',').any(|o| o.trim() == p.name))
        .collect();
    assert!(
        !platforms.is_empty(),
        "BENCH_PLATFORMS names none of the platforms"
    );
    // Every platform's API: each send is answered as a success in Slack's and Graph's
    // shapes at once (`ok: true`, `messages`).
    let sink = http_stub::serve(Arc::new(|_| {
        StubResponse::json(
            200,
            &json!({"ok": true, "ts": "1.1", "messages": [{"id": "wamid.bench"}]}),
        )
    }));
    let base = format!("http://{sink}");
    if std::env::var("BENCH_INSTRUCTIONS").is_ok() {
        instructions_per_message(&platforms, &base);
        return;
    }
    let sections: String = platforms.iter().map(|p| (p.config)(&base)).collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path(), &sections);
    // `BENCH_BASELINE=/path/to/an/older/hermes-gateway`: that binary too, its own state,
    // measured in the same rounds (in turn first and second), for ratios.
    let baseline = std::env::var("BENCH_BASELINE").ok().map(|bin| {
        let dir = tempfile::tempdir().expect("tempdir");
        let gw = start_under(dir.path(), &sections, &bin, &[]);
        (dir, gw)
    });
    println!(
        "hermes-gateway platform benchmark: {}; {conns} keep-alive connections, {rounds} rounds of {secs}s as fast as answered and {secs}s at {rate:.0}/s, signed webhooks of new messages (200 after commit), {PER_CONVERSATION} messages per conversation, echo agent, replies to a stub API, log level warn, {} CPUs{}",
        platforms
            .iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
            .join(", "),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        if baseline.is_some() {
            "; beside the baseline binary, in the same rounds"
        } else {
            ""
        }
    );
    // Each round's requests are numbered apart from every other round's: the load
    // generator counts from 0 on each connection every round, and a platform that builds
    // its ids from that count (LINE's webhookEventId, Twilio's MessageSid) would otherwise
    // repeat the round before's, which the gateway acknowledges as duplicates without a
    // turn or a reply (a fast answer that is not what is measured).
    let rounds_made = std::sync::atomic::AtomicU64::new(0);
    let make = |p: &Platform| -> Arc<MakeRequest> {
        let request = p.request;
        let offset = rounds_made.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 32;
        Arc::new(move |conn, n, _| request(conn, offset + n))
    };
    // The replies behind a round's 200s are still being sent when it ends; each round
    // starts once they are, so that none is measured against the one before's work.
    let settle = |db: &Path| {
        let t = Instant::now();
        while open_deliveries(db) > 0 && t.elapsed() < Duration::from_secs(600) {
            std::thread::sleep(Duration::from_millis(100));
        }
        t.elapsed()
    };
    let db = dir.path().join("state/gateway.db");
    let gateways: Vec<(&Gateway, std::path::PathBuf)> = std::iter::once((&gw, db.clone()))
        .chain(
            baseline
                .iter()
                .map(|(d, g)| (g, d.path().join("state/gateway.db"))),
        )
        .collect();
    for (g, db) in &gateways {
        measure(g.api, conns, 1, None, health());
        for p in &platforms {
            measure(g.hook, conns, 1, None, make(p));
        }
        settle(db);
    }
    let mut healths = Vec::new();
    let mut settled = Vec::new();
    // Per platform and round: this binary's (saturated, paced, and what the gateway used
    // per message of the paced loop: CPU µs, KB written, KB to disk, its turns and replies
    // included), and the baseline's.
    type Measured = (Outcome, Outcome, (f64, f64, f64));
    let mut results: Vec<Vec<Measured>> = platforms.iter().map(|_| Vec::new()).collect();
    let mut baselines: Vec<Vec<Measured>> = platforms.iter().map(|_| Vec::new()).collect();
    for round in 1..=rounds {
        let h = measure(gw.api, conns, secs, None, health());
        let mut line = format!(
            "round {round}: GET /health {:>7.0} req/s p99 {:>5.2} ms",
            h.rps, h.p99_ms
        );
        for (i, p) in platforms.iter().enumerate() {
            // In turn first and second, so that neither always follows the other's work.
            let order: Vec<usize> = if round % 2 == 1 {
                (0..gateways.len()).collect()
            } else {
                (0..gateways.len()).rev().collect()
            };
            for k in order {
                let (g, db) = &gateways[k];
                let most = measure(g.hook, conns, secs, None, make(p));
                settled.push(settle(db));
                let before = Usage::of(g.child.id());
                let paced = measure(g.hook, conns, secs, Some(rate), make(p));
                settled.push(settle(db));
                let used = Usage::of(g.child.id()).per_message(before, paced.n);
                if k == 0 {
                    results[i].push((most, paced, used));
                } else {
                    baselines[i].push((most, paced, used));
                }
            }
            let Some((o, q, u)) = results[i].last() else {
                continue;
            };
            line.push_str(&format!(
                " | {} {:>6.0}/s p50 {:>5.2} ms p99 {:>5.2} ms, at {rate:.0}/s p50 {:>5.2} ms p99 {:>5.2} ms, {:.0} µs CPU and {:.1} KB written per message ({} errors)",
                p.name,
                o.rps,
                o.p50_ms,
                o.p99_ms,
                q.p50_ms,
                q.p99_ms,
                u.0,
                u.1,
                o.errors + q.errors,
            ));
            if let Some((b, bq, bu)) = baselines[i].last() {
                line.push_str(&format!(
                    " [baseline {:>6.0}/s p99 {:>5.2} ms, at {rate:.0}/s p99 {:>5.2} ms, {:.0} µs, {:.1} KB]",
                    b.rps, b.p99_ms, bq.p99_ms, bu.0, bu.1
                ));
            }
        }
        println!("{line}");
        healths.push(h);
    }
    let h = median(healths.iter().map(|o| o.rps).collect());
    println!("median: GET /health {h:.0} req/s");
    for ((p, r), b) in platforms.iter().zip(&results).zip(&baselines) {
        let med = |f: fn(&Measured) -> f64| median(r.iter().map(f).collect());
        let rps = med(|m| m.0.rps);
        let mut line = format!(
            "median: {} {rps:.0} messages/s acknowledged after commit ({:.1} % of /health), p50 {:.2} ms, p99 {:.2} ms with {conns} in flight; at {rate:.0}/s offered: {:.0}/s answered, p50 {:.2} ms, p99 {:.2} ms; per message at that rate, the gateway's CPU {:.0} µs, {:.1} KB written ({:.1} KB to disk); {} errors (target >= 5000/s, p99 <= 25 ms)",
            p.name,
            100.0 * rps / h,
            med(|m| m.0.p50_ms),
            med(|m| m.0.p99_ms),
            med(|m| m.1.rps),
            med(|m| m.1.p50_ms),
            med(|m| m.1.p99_ms),
            med(|m| m.2.0),
            med(|m| m.2.1),
            med(|m| m.2.2),
            r.iter().map(|m| m.0.errors + m.1.errors).sum::<u64>(),
        );
        if !b.is_empty() {
            // Medians of the rounds' ratios: each round's pair ran side by side.
            let ratio = |f: fn(&Measured) -> f64| {
                median(
                    r.iter()
                        .zip(b)
                        .map(|(x, y)| f(x) / f(y).max(1e-3))
                        .collect(),
                )
            };
            line.push_str(&format!(
                " | this / baseline (medians of the rounds' ratios): rate {:.2}, p99 {:.2}, p99 at {rate:.0}/s {:.2}, CPU per message {:.2}, written {:.2}, to disk {:.2}",
                ratio(|m| m.0.rps),
                ratio(|m| m.0.p99_ms),
                ratio(|m| m.1.p99_ms),
                ratio(|m| m.2.0),
                ratio(|m| m.2.1),
                ratio(|m| m.2.2),
            ));
        }
        println!("{line}");
    }
    // The work behind the 200s: how long it took, after each round, until every turn ran
    // and its reply was sent.
    let longest = settled.iter().max().copied().unwrap_or_default();
    println!(
        "after each platform's round, every reply was sent within {:.1}s (median {:.1}s)",
        longest.as_secs_f64(),
        median(settled.iter().map(Duration::as_secs_f64).collect()),
    );
}
