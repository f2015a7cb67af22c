//! API benchmark: `cargo bench --bench api`.
//!
//! Starts the release binary with the `echo` agent and drives it with a hyper client at 64
//! keep-alive connections: `GET /health` against `POST /v1/chat/completions` with an
//! `X-Hermes-Session-Id` header (each turn is a durable write, acknowledged after its group
//! commit). Each connection keeps its own session and starts a new one every
//! `TURNS_PER_SESSION` turns, so the history prepended stays that of a short conversation.
//! Rounds alternate the two workloads; the medians are printed side by side, with the CPU
//! time per request of the gateway and of this load generator (both share the machine's
//! cores), and the share of the CPU that other processes took meanwhile. A third
//! workload, run in the same rounds, is the Responses API as new OpenAI tools use it: a
//! stored, streamed `POST /v1/responses` continuing the connection's previous response
//! with `previous_response_id` (a new chain every `TURNS_PER_SESSION` turns); its rate is
//! reported against the session turn's of the same round. Then it
//! stores 10,000 sessions and reports the gateway's resident memory.
//!
//! Last, what the Prometheus metrics cost: a gateway counting against one with
//! `HERMES_GATEWAY_METRICS=off`, side by side (`BENCH_ONLY=metrics` runs only that).
//!
//! Environment: BENCH_SECS (per round, default 5), BENCH_ROUNDS (default 3),
//! BENCH_CONNS (default 64), BENCH_ONLY=metrics, BENCH_ONLY=responses-instructions (the
//! Responses turn against the session turn in instructions, under callgrind;
//! BENCH_KEEP_CALLGRIND=/path/prefix keeps each run's profile for `callgrind_annotate`).

#[path = "support/procfs.rs"]
mod procfs;
mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use procfs::{TICK_US, cpu_ticks, io, machine_ticks};
use support::{MakeRequest, drive, env_u64, median};
use tokio::net::TcpStream;

use hermes_gateway::store::{DB_FILE, sessions};

const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");
const TURNS_PER_SESSION: u64 = 20;

struct Gateway {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path) -> Gateway {
    start_with(dir, &[])
}

fn start_with(dir: &Path, env: &[(&str, &str)]) -> Gateway {
    start_under(dir, env, &[])
}

/// The gateway, run by `wrapper` (e.g. valgrind) when it is not empty.
fn start_under(dir: &Path, env: &[(&str, &str)], wrapper: &[&str]) -> Gateway {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\napi = \"127.0.0.1:{port}\"\nwebhook = \"off\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n[log]\nlevel = \"warn\"\n[sessions]\nmax_concurrent_runs = 256\n",
            dir.join("control.sock").display(),
            dir.join("state").display()
        ),
    )
    .expect("write config");
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(BIN);
            c
        }
        None => Command::new(BIN),
    };
    let child = cmd
        .args(["run", "--config"])
        .arg(&config)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_FDS")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the gateway");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let end = Instant::now() + Duration::from_secs(120);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < end, "the gateway did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    Gateway { child, addr }
}

#[derive(Clone, Copy)]
enum Load {
    Health,
    SessionTurn,
    ResponseTurn,
}

impl Load {
    fn name(self) -> &'static str {
        match self {
            Load::Health => "health",
            Load::SessionTurn => "turn",
            Load::ResponseTurn => "response",
        }
    }
}

/// The response id (`resp_…`) at the start of a streamed response's events, if any.
fn response_id(body: &[u8]) -> Option<&str> {
    let at = body.windows(6).position(|w| w == b"\"resp_")? + 1;
    let end = body[at..].iter().position(|&b| b == b'"')? + at;
    std::str::from_utf8(&body[at..end]).ok()
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// CPU time (user + system) per request of the gateway and of this load generator, in
    /// microseconds, and the share of the machine's CPU that other processes took.
    gw_cpu_us: f64,
    /// Of `gw_cpu_us`, the store's writer thread.
    writer_cpu_us: f64,
    /// The gateway's threads' context switches per request.
    switches: f64,
    /// The share of the machine's CPU left idle.
    idle_pct: f64,
    client_cpu_us: f64,
    others_pct: f64,
    /// Bytes the gateway wrote (files and sockets) per request.
    gw_write_bytes: f64,
}

/// utime + stime of the gateway's store writer thread, in clock ticks.
fn writer_ticks(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "store-writer")
        })
        .map(|t| {
            let tid = t.file_name().to_string_lossy().into_owned();
            cpu_ticks(&format!("{pid}/task/{tid}"))
        })
        .sum()
}

/// Context switches (voluntary and not) of all the gateway's threads.
fn switches(pid: &str) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("status")).ok())
        .flat_map(|s| {
            s.lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .collect::<Vec<_>>()
        })
        .sum()
}

fn run(gw: &Gateway, load: Load, conns: usize, secs: u64, round: usize) -> Outcome {
    let addr = gw.addr;
    let gw_pid = gw.child.id().to_string();
    let (gw0, me0, m0) = (cpu_ticks(&gw_pid), cpu_ticks("self"), machine_ticks());
    let wr0 = writer_ticks(&gw_pid);
    let cs0 = switches(&gw_pid);
    let w0 = io(&gw_pid, "wchar");
    let make: Arc<MakeRequest> = Arc::new(move |conn_id, n, last| match load {
        Load::Health => Request::get("/health")
            .header("host", "bench")
            .body(Full::new(Bytes::new())),
        Load::SessionTurn => {
            let session = format!("bench-{round}-{conn_id}-{}", n / TURNS_PER_SESSION);
            let body = format!(
                r#"{{"model":"hermes-agent","messages":[{{"role":"user","content":"turn {n} of a benchmark conversation"}}]}}"#
            );
            Request::post("/v1/chat/completions")
                .header("host", "bench")
                .header("content-type", "application/json")
                .header("x-hermes-session-id", session)
                .body(Full::new(Bytes::from(body)))
        }
        Load::ResponseTurn => {
            let previous = match response_id(last) {
                Some(id) if n % TURNS_PER_SESSION != 0 => {
                    format!(r#","previous_response_id":"{id}""#)
                }
                _ => String::new(),
            };
            let body = format!(
                r#"{{"model":"hermes-agent","stream":true,"input":"turn {n} of a benchmark conversation"{previous}}}"#
            );
            Request::post("/v1/responses")
                .header("host", "bench")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
        }
    });
    // The client runtime is dropped by `drive`, so its threads' time is counted below.
    let load = drive(addr, conns, secs, None, make);
    let (gw1, me1, m1) = (cpu_ticks(&gw_pid), cpu_ticks("self"), machine_ticks());
    let wr1 = writer_ticks(&gw_pid);
    let cs1 = switches(&gw_pid);
    let w1 = io(&gw_pid, "wchar");
    let n = load.latencies_us.len().max(1) as f64;
    let ours = (gw1 - gw0) + (me1 - me0);
    let others = (m1.0 - m0.0).saturating_sub(ours);
    Outcome {
        rps: load.rps(),
        p50_ms: load.quantile_ms(0.50),
        p99_ms: load.quantile_ms(0.99),
        errors: load.errors,
        gw_cpu_us: (gw1 - gw0) as f64 * TICK_US / n,
        switches: cs1.saturating_sub(cs0) as f64 / n,
        writer_cpu_us: wr1.saturating_sub(wr0) as f64 * TICK_US / n,
        idle_pct: 100.0 - 100.0 * (m1.0 - m0.0) as f64 / (m1.1 - m0.1).max(1) as f64,
        client_cpu_us: (me1 - me0) as f64 * TICK_US / n,
        others_pct: 100.0 * others as f64 / (m1.1 - m0.1).max(1) as f64,
        gw_write_bytes: w1.saturating_sub(w0) as f64 / n,
    }
}

/// Sessions in the gateway's database, counted as the store counts them (its turn log
/// included).
fn stored_sessions(dir: &Path) -> i64 {
    rusqlite::Connection::open(dir.join("state").join(DB_FILE))
        .and_then(|c| sessions::count(&c))
        .unwrap_or(0)
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

/// What the metrics cost: two gateways side by side, one counting (the default) and one
/// with `HERMES_GATEWAY_METRICS=off`, driven in turn (the order alternates by round) with
/// `/health` and with session turns. Reports the rate with metrics over the rate without,
/// and the gateway's CPU per request without over with (target: both >= 0.97).
fn metrics_overhead(rounds: usize, secs: u64, conns: usize) {
    let (d_on, d_off) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    let on = start_with(d_on.path(), &[]);
    let off = start_with(d_off.path(), &[("HERMES_GATEWAY_METRICS", "off")]);
    for gw in [&on, &off] {
        run(gw, Load::Health, conns, 1, 0);
        run(gw, Load::SessionTurn, conns, 1, 0);
    }
    let mut ratios: [Vec<f64>; 4] = Default::default();
    for round in 1..=rounds {
        for (i, load) in [Load::Health, Load::SessionTurn].into_iter().enumerate() {
            let (a, b) = if round % 2 == 1 {
                let a = run(&on, load, conns, secs, round);
                (a, run(&off, load, conns, secs, round))
            } else {
                let b = run(&off, load, conns, secs, round);
                (run(&on, load, conns, secs, round), b)
            };
            let rate = a.rps / b.rps.max(1.0);
            let cpu = b.gw_cpu_us / a.gw_cpu_us.max(0.001);
            println!(
                "round {round}: {:<12} with metrics {:>8.0} req/s ({:.1} us CPU per request), without {:>8.0} req/s ({:.1} us) | rate ratio {rate:.3}, CPU ratio {cpu:.3} | other processes {:.0}%",
                ["GET /health", "session turn"][i],
                a.rps,
                a.gw_cpu_us,
                b.rps,
                b.gw_cpu_us,
                a.others_pct.max(b.others_pct)
            );
            ratios[2 * i].push(rate);
            ratios[2 * i + 1].push(cpu);
        }
    }
    let [hr, hc, tr, tc] = ratios.map(median);
    println!(
        "median: with metrics, GET /health at {hr:.3} of the rate without (CPU per request ratio {hc:.3}); session turns at {tr:.3} (CPU ratio {tc:.3}) (target >= 0.97)"
    );
}

/// One request on a blocking keep-alive connection; the response read by its length, or
/// to its last chunk when it is chunked (a stream). Returns the response's body as sent.
fn sequential(stream: &mut std::net::TcpStream, raw: &[u8]) -> Vec<u8> {
    use std::io::{Read, Write};
    stream.write_all(raw).expect("send");
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).expect("read");
        assert!(n > 0, "the gateway closed the connection");
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 200"), "{head}");
        if head.contains("transfer-encoding: chunked") {
            if buf.ends_with(b"\r\n0\r\n\r\n") || buf[end + 4..].starts_with(b"0\r\n\r\n") {
                return buf.split_off(end + 4);
            }
            continue;
        }
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("a content-length");
        if buf.len() >= end + 4 + len {
            return buf.split_off(end + 4);
        }
    }
}

/// Instructions the gateway executed in all, counted by callgrind (`valgrind` must be
/// installed): start, `n` requests of `load` on one keep-alive connection, stop.
fn instructions(load: Load, n: usize, metrics: bool) -> u64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("callgrind.out");
    let out_arg = format!("--callgrind-out-file={}", out.display());
    let env: &[(&str, &str)] = if metrics {
        &[]
    } else {
        &[("HERMES_GATEWAY_METRICS", "off")]
    };
    let gw = start_under(
        dir.path(),
        env,
        &["valgrind", "--tool=callgrind", "--quiet", &out_arg],
    );
    let mut stream = std::net::TcpStream::connect(gw.addr).expect("connect");
    let mut last = Vec::new();
    for i in 0..n {
        let raw = match load {
            Load::Health => "GET /health HTTP/1.1\r\nHost: bench\r\n\r\n".to_owned(),
            Load::ResponseTurn => {
                let previous = match response_id(&last) {
                    Some(id) if i as u64 % TURNS_PER_SESSION != 0 => {
                        format!(r#","previous_response_id":"{id}""#)
                    }
                    _ => String::new(),
                };
                let body = format!(
                    r#"{{"model":"hermes-agent","stream":true,"input":"turn {i} of a benchmark conversation"{previous}}}"#
                );
                format!(
                    "POST /v1/responses HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
            }
            Load::SessionTurn => {
                let body = format!(
                    r#"{{"model":"hermes-agent","messages":[{{"role":"user","content":"turn {i} of a benchmark conversation"}}]}}"#
                );
                format!(
                    "POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nX-Hermes-Session-Id: cg-{}\r\nContent-Length: {}\r\n\r\n{body}",
                    i as u64 / TURNS_PER_SESSION,
                    body.len()
                )
            }
        };
        last = sequential(&mut stream, raw.as_bytes());
    }
    drop(stream);
    let mut gw = gw;
    let pid = nix::unistd::Pid::from_raw(gw.child.id() as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let _ = gw.child.wait();
    if let Ok(keep) = std::env::var("BENCH_KEEP_CALLGRIND") {
        // For callgrind_annotate: the profile of this run, by load and count.
        let _ = std::fs::copy(&out, format!("{keep}.{}.{n}", load.name()));
    }
    let text = std::fs::read_to_string(&out).expect("callgrind's output");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("totals: ")
                .or_else(|| l.strip_prefix("summary: "))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("callgrind's totals")
}

/// Instructions per request with and without metrics, from runs of `small` and `large`
/// requests (their difference cancels the start and the stop). Noise-free where the
/// rates are not: a count of instructions does not depend on what else the machine runs.
fn metrics_instructions(small: usize, large: usize) {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("instructions per request: valgrind is not installed, not measured");
        return;
    }
    for (name, load) in [
        ("GET /health", Load::Health),
        ("session turn", Load::SessionTurn),
    ] {
        let per = |metrics: bool| {
            let (a, b) = (
                instructions(load, small, metrics),
                instructions(load, large, metrics),
            );
            b.saturating_sub(a) as f64 / (large - small) as f64
        };
        let (on, off) = (per(true), per(false));
        println!(
            "instructions per request (callgrind, {small} vs {large} requests on one connection): {name} with metrics {on:.0}, without {off:.0} | without / with {:.3} (target >= 0.97)",
            off / on
        );
    }
}

/// Instructions per stored, streamed response with `previous_response_id` against per
/// session turn, counted as `metrics_instructions` counts them (with metrics on). The
/// rate target (>= 0.8 of the session turn's) is about the whole machine; this is the
/// gateway's share of it, free of the machine's noise.
fn responses_instructions(small: usize, large: usize) {
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("instructions per request: valgrind is not installed, not measured");
        return;
    }
    let per = |load: Load| {
        let (a, b) = (
            instructions(load, small, true),
            instructions(load, large, true),
        );
        b.saturating_sub(a) as f64 / (large - small) as f64
    };
    let (turn, response) = (per(Load::SessionTurn), per(Load::ResponseTurn));
    println!(
        "instructions per request (callgrind, {small} vs {large} requests on one connection): session turn {turn:.0}, stored streamed response with previous_response_id {response:.0} | turn / response {:.3}",
        turn / response
    );
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` would pass nothing useful.
    let secs = env_u64("BENCH_SECS", 5);
    let rounds = env_u64("BENCH_ROUNDS", 3) as usize;
    let conns = env_u64("BENCH_CONNS", 64) as usize;
    if std::env::var("BENCH_ONLY").as_deref() == Ok("responses-instructions") {
        responses_instructions(1000, 3000);
        return;
    }
    if std::env::var("BENCH_ONLY").as_deref() == Ok("metrics") {
        metrics_overhead(rounds, secs, conns);
        metrics_instructions(1000, 3000);
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let gw = start(dir.path());
    println!(
        "hermes-gateway API benchmark: {conns} keep-alive connections, {rounds} rounds of {secs}s each, echo agent, log level warn, {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // Warm-up.
    run(&gw, Load::Health, conns, 1, 0);
    run(&gw, Load::SessionTurn, conns, 1, 0);
    run(&gw, Load::ResponseTurn, conns, 1, 0);

    let mut health = Vec::new();
    let mut turns = Vec::new();
    let mut responses = Vec::new();
    for round in 1..=rounds {
        let h = run(&gw, Load::Health, conns, secs, round);
        let t = run(&gw, Load::SessionTurn, conns, secs, round);
        let r = run(&gw, Load::ResponseTurn, conns, secs, round);
        println!(
            "         stored streamed response with previous_response_id {:>8.0} req/s p50 {:>5.2} ms p99 {:>5.2} ms ({} errors), gateway {:.1} us + load generator {:.1} us per request | {:.2} of the session turn's rate",
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.errors,
            r.gw_cpu_us,
            r.client_cpu_us,
            r.rps / t.rps.max(1.0)
        );
        println!(
            "round {round}: GET /health {:>8.0} req/s p50 {:>5.2} ms p99 {:>5.2} ms ({} errors) | session turn {:>8.0} req/s p50 {:>5.2} ms p99 {:>5.2} ms ({} errors) | ratio {:.0}%",
            h.rps,
            h.p50_ms,
            h.p99_ms,
            h.errors,
            t.rps,
            t.p50_ms,
            t.p99_ms,
            t.errors,
            100.0 * t.rps / h.rps.max(1.0)
        );
        println!(
            "         CPU per request: /health gateway {:.1} us + load generator {:.1} us | session turn gateway {:.1} us + load generator {:.1} us | other processes took {:.0}% / {:.0}% of the machine",
            h.gw_cpu_us, h.client_cpu_us, t.gw_cpu_us, t.client_cpu_us, h.others_pct, t.others_pct
        );
        println!(
            "         session turn: of the gateway's CPU, {:.1} us in the store writer thread; machine idle {:.0}% (/health {:.0}%); gateway context switches per request {:.2} (/health {:.2})",
            t.writer_cpu_us, t.idle_pct, h.idle_pct, t.switches, h.switches
        );
        println!(
            "         bytes written by the gateway per request (files and sockets): /health {:.0} | session turn {:.0}",
            h.gw_write_bytes, t.gw_write_bytes
        );
        health.push(h);
        responses.push((r.rps / t.rps.max(1.0), r.rps));
        turns.push(t);
    }
    let med = |v: &[Outcome], f: fn(&Outcome) -> f64| median(v.iter().map(f).collect());
    let (hr, tr) = (med(&health, |o| o.rps), med(&turns, |o| o.rps));
    println!(
        "median: GET /health {hr:.0} req/s p50 {:.2} ms p99 {:.2} ms | session turn {tr:.0} req/s p50 {:.2} ms p99 {:.2} ms | session turns at {:.0}% of /health (target >= 40%, p99 <= 20 ms)",
        med(&health, |o| o.p50_ms),
        med(&health, |o| o.p99_ms),
        med(&turns, |o| o.p50_ms),
        med(&turns, |o| o.p99_ms),
        100.0 * tr / hr.max(1.0)
    );
    println!(
        "median: stored streamed response turn {:.0} req/s, {:.2} of the session turn's rate (median of the rounds' ratios; target >= 0.8)",
        median(responses.iter().map(|r| r.1).collect()),
        median(responses.iter().map(|r| r.0).collect())
    );

    // Resident memory with 10,000 stored sessions: the rounds above stored some already;
    // a restart on the same state folder measures a gateway that holds them on disk only.
    let pid = gw.child.id();
    let stored = stored_sessions(dir.path());
    println!(
        "sessions stored by the rounds: {stored}; RSS after the load: {} KiB",
        rss_kib(pid)
    );
    drop(gw);
    let gw = start(dir.path());
    let rss_idle = rss_kib(gw.child.id());
    // Touch 10,000 distinct sessions through the API (one turn each).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("client runtime");
    let addr = gw.addr;
    let errors = rt.block_on(async move {
        let mut tasks = Vec::new();
        for c in 0..50u32 {
            tasks.push(tokio::spawn(async move {
                let mut errors = 0u32;
                let Ok(stream) = TcpStream::connect(addr).await else {
                    return 200;
                };
                let Ok((mut sender, conn)) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
                else {
                    return 200;
                };
                tokio::spawn(conn);
                for i in 0..200u32 {
                    let req = Request::post("/v1/chat/completions")
                        .header("host", "bench")
                        .header("x-hermes-session-id", format!("mem-{c}-{i}"))
                        .body(Full::new(Bytes::from_static(
                            br#"{"messages":[{"role":"user","content":"remember me"}]}"#,
                        )));
                    let Ok(req) = req else { return errors + 1 };
                    match sender.send_request(req).await {
                        Ok(r) if r.status().is_success() => {
                            let _ = r.into_body().collect().await;
                        }
                        _ => errors += 1,
                    }
                }
                errors
            }));
        }
        let mut e = 0;
        for t in tasks {
            e += t.await.unwrap_or(200);
        }
        e
    });
    std::thread::sleep(Duration::from_millis(500));
    let rss_after = rss_kib(gw.child.id());
    let total = stored_sessions(dir.path());
    println!(
        "resident memory: {:.1} MiB at start with {stored} sessions stored; {:.1} MiB after 10,000 more session turns ({total} sessions stored, {errors} errors) (target <= 40 MiB)",
        rss_idle as f64 / 1024.0,
        rss_after as f64 / 1024.0
    );
    drop(gw);
    metrics_overhead(rounds, secs, conns);
    metrics_instructions(1000, 3000);
}
