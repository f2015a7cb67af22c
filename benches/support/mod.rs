//! What the API and webhook benchmarks share: the load generator, closed-loop (each
//! keep-alive connection sends its next request when the last answer is in) or at a set
//! rate, its latency figures, and small helpers.
//!
//! Beside it, `reconnecting.rs` is the other load client: the light load the lifecycle
//! benchmark keeps running through restarts, counting every failed request. Only that
//! benchmark includes it (`#[path]`), so it is no submodule here.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// `name` from the environment as a number, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `n`-th request (from 0) of connection `conn`, given the body of the answer to the
/// connection's previous request (empty for the first): a request may depend on it.
pub type MakeRequest =
    dyn Fn(usize, u64, &[u8]) -> http::Result<Request<Full<Bytes>>> + Send + Sync;

/// What one load run measured.
pub struct Load {
    /// Latencies of the answered requests, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    pub errors: u64,
    pub elapsed: Duration,
}

impl Load {
    pub fn rps(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p` quantile (0..1) of the latencies, in milliseconds.
    pub fn quantile_ms(&self, p: f64) -> f64 {
        let all = &self.latencies_us;
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(0.0, |&us| f64::from(us) / 1000.0)
    }
}

/// `conns` keep-alive connections to `addr` for `secs` seconds, each sending the requests
/// `make` builds, on a client runtime of two threads (dropped before this returns, so that
/// its threads' CPU time is counted by whoever reads it next).
///
/// `rate: None`: closed loop, each connection sending its next request as soon as the last
/// is answered: the most the server answers with `conns` requests in flight, and the
/// latency at that saturation (by Little's law, about `conns` over the rate).
/// `rate: Some(r)`: open loop, `r` requests a second in all, due at even intervals spread
/// over the connections (as wrk2, or vegeta's constant rate), each latency counted from
/// when its request was due: a request sent late because its connection was still
/// waiting on the one before counts that wait too (no "coordinated omission").
pub fn drive(
    addr: SocketAddr,
    conns: usize,
    secs: u64,
    rate: Option<f64>,
    make: Arc<MakeRequest>,
) -> Load {
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
            .map(|i| {
                let pace = rate.map(|r| Pace {
                    start: started,
                    rate: r,
                    conns,
                });
                tokio::spawn(connection(
                    addr,
                    i,
                    until,
                    pace,
                    errors.clone(),
                    make.clone(),
                ))
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            if let Ok(v) = t.await {
                all.extend(v);
            }
        }
        all
    });
    let elapsed = started.elapsed();
    drop(rt);
    all.sort_unstable();
    Load {
        latencies_us: all,
        errors: errors.load(Ordering::Relaxed),
        elapsed,
    }
}

/// An open loop's schedule: request `k` of all (from 0) is due `k / rate` seconds after
/// `start`, and connection `i` sends requests `i`, `i + conns`, `i + 2 conns`…
struct Pace {
    start: Instant,
    rate: f64,
    conns: usize,
}

impl Pace {
    fn due(&self, conn_id: usize, n: u64) -> Instant {
        let k = n as f64 * self.conns as f64 + conn_id as f64;
        self.start + Duration::from_secs_f64(k / self.rate)
    }
}

async fn connection(
    addr: SocketAddr,
    conn_id: usize,
    until: Instant,
    pace: Option<Pace>,
    errors: Arc<AtomicU64>,
    make: Arc<MakeRequest>,
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
    let mut last = Bytes::new();
    loop {
        let t = match &pace {
            None => Instant::now(),
            Some(p) => p.due(conn_id, n),
        };
        if t >= until {
            break;
        }
        if pace.is_some() {
            tokio::time::sleep_until(t.into()).await;
        }
        let Ok(req) = make(conn_id, n, &last) else {
            break;
        };
        n += 1;
        match sender.send_request(req).await {
            Ok(resp) => {
                let ok = resp.status().is_success();
                match resp.into_body().collect().await {
                    Ok(body) if ok => last = body.to_bytes(),
                    _ => {
                        last = Bytes::new();
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
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
