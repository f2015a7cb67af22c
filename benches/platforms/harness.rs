//! What the platform modules share: the gateway under test (release binary, echo agent,
//! log level warn), a stub of a platform API that takes every reply at once, the rounds
//! against `GET /health`, and the report.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response};

use crate::support::{MakeRequest, drive, env_u64, median};

const BIN: &str = env!("CARGO_BIN_EXE_hermes-gateway");

pub struct Gateway {
    child: Child,
    pid: u32,
    pub api: SocketAddr,
    pub hook: SocketAddr,
    _dir: tempfile::TempDir,
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

/// The gateway with `platform` (a `[[platforms.…]]` section) on a webhook listener.
pub fn start(platform: &str) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let (api, hook) = (free_port(), free_port());
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[listen]\napi = \"127.0.0.1:{api}\"\nwebhook = \"127.0.0.1:{hook}\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n[log]\nlevel = \"warn\"\n{platform}\n",
            dir.path().join("control.sock").display(),
            dir.path().join("state").display()
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
    Gateway {
        pid: child.id(),
        child,
        api,
        hook,
        _dir: dir,
    }
}

/// A platform API stub that answers every request at once with `status` and `body`
/// (its own thread and runtime); its base URL.
pub fn stub_api(status: u16, body: &'static str) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the stub");
    let addr = listener.local_addr().expect("stub address");
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("stub runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(
                        move |_req: Request<hyper::body::Incoming>| async move {
                            Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from_static(body.as_bytes())))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                });
            }
        });
    });
    format!("http://{addr}")
}

struct Outcome {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// The gateway's CPU time (all threads) per answered request, in microseconds.
    cpu_us: f64,
}

/// The CPU time the process `pid` used so far (user + system, all threads), in seconds.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<f64> = rest
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (f.get(10).unwrap_or(&0.0) + f.get(11).unwrap_or(&0.0)) / hz
}

fn health() -> Arc<MakeRequest> {
    Arc::new(|_, _| {
        Request::get("/health")
            .header("host", "bench")
            .body(Full::new(Bytes::new()))
    })
}

/// Rounds of `GET /health` and of `make` (the platform's signed requests) on `gw`,
/// alternating; prints each round and the medians.
pub fn measure(platform: &str, what: &str, gw: &Gateway, make: Arc<MakeRequest>) {
    let secs = env_u64("BENCH_SECS", 5);
    let rounds = env_u64("BENCH_ROUNDS", 3) as usize;
    let conns = env_u64("BENCH_CONNS", 64) as usize;
    let run = |addr, make: Arc<MakeRequest>, secs| {
        let cpu = cpu_s(gw.pid);
        let l = drive(addr, conns, secs, make);
        let used = cpu_s(gw.pid) - cpu;
        Outcome {
            rps: l.rps(),
            p50_ms: l.quantile_ms(0.50),
            p99_ms: l.quantile_ms(0.99),
            errors: l.errors,
            cpu_us: 1e6 * used / (l.latencies_us.len().max(1) as f64),
        }
    };
    println!(
        "{platform}: {conns} keep-alive connections, {rounds} rounds of {secs}s, {what}, each answered after its commit; echo agent, replies to a stub"
    );
    // Each round numbers its requests apart: an id sent again would be a repeat, which
    // the gateway acknowledges without a turn, and the figures would flatter it.
    let numbered = |round: u64| -> Arc<MakeRequest> {
        let make = make.clone();
        Arc::new(move |conn, n| make(conn, round * 1_000_000_000 + n))
    };
    run(gw.api, health(), 1);
    run(gw.hook, numbered(0), 1);
    let (mut h, mut p) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let a = run(gw.api, health(), secs);
        let b = run(gw.hook, numbered(round as u64), secs);
        println!(
            "{platform} round {round}: GET /health {:>8.0} req/s p99 {:>5.2} ms ({} errors, {:.0} µs CPU each) | {platform} {:>7.0}/s p50 {:>5.2} ms p99 {:>5.2} ms ({} errors, {:.0} µs gateway CPU each, turn and reply included) | {:.1} % of /health",
            a.rps,
            a.p99_ms,
            a.errors,
            a.cpu_us,
            b.rps,
            b.p50_ms,
            b.p99_ms,
            b.errors,
            b.cpu_us,
            100.0 * b.rps / a.rps.max(1.0)
        );
        h.push(a);
        p.push(b);
    }
    let med = |v: &[Outcome], f: fn(&Outcome) -> f64| median(v.iter().map(f).collect());
    let (rps, p99) = (med(&p, |o| o.rps), med(&p, |o| o.p99_ms));
    println!(
        "{platform} median: GET /health {:.0} req/s | {platform} {:.0}/s p50 {:.2} ms p99 {:.2} ms, {:.0} µs gateway CPU each, {:.1} % of /health (target >= 5000/s, p99 <= 25 ms: {})",
        med(&h, |o| o.rps),
        rps,
        med(&p, |o| o.p50_ms),
        p99,
        med(&p, |o| o.cpu_us),
        100.0 * rps / med(&h, |o| o.rps).max(1.0),
        if rps >= 5000.0 && p99 <= 25.0 {
            "met"
        } else {
            "NOT met"
        }
    );
}

/// CPUs, kernel and load at the start, so the figures can be read against the machine.
pub fn print_machine() {
    let read = |p: &str| std::fs::read_to_string(Path::new(p)).unwrap_or_default();
    let model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    println!(
        "machine: {} CPUs ({model}), Linux {}, load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        read("/proc/sys/kernel/osrelease").trim(),
        read("/proc/loadavg")
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
}
