//! Helpers for the webhook tests: a local receiver for `http` targets, signing as the
//! senders do, and a gateway configuration with a webhook listener.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HashMap<String, String>,
    pub body: serde_json::Value,
    pub raw: Vec<u8>,
    pub at: Instant,
    pub status: u16,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

type Policy = dyn Fn(&Received, usize) -> u16 + Send + Sync;

/// An HTTP/1.1 keep-alive receiver; `policy(request, n)` picks the status of the `n`-th
/// (from 1) request carrying that `Idempotency-Key`.
#[derive(Clone)]
pub struct Receiver {
    pub addr: SocketAddr,
    got: Arc<Mutex<Got>>,
}

/// What the receiver got, and how many requests carried each `Idempotency-Key` (counted
/// as they come: scanning every earlier request made the receiver itself the bottleneck
/// of a long soak).
#[derive(Default)]
struct Got {
    all: Vec<Received>,
    per_key: HashMap<String, usize>,
}

impl Receiver {
    pub fn start(policy: impl Fn(&Received, usize) -> u16 + Send + Sync + 'static) -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let got: Arc<Mutex<Got>> = Arc::default();
        let policy: Arc<Policy> = Arc::new(policy);
        let g = got.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let (g, p) = (g.clone(), policy.clone());
                std::thread::spawn(move || serve(s, &g, &*p));
            }
        });
        Receiver { addr, got }
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    pub fn all(&self) -> Vec<Received> {
        self.got.lock().unwrap().all.clone()
    }

    /// Waits until `f` holds over what was received.
    pub fn wait_until(&self, timeout: Duration, f: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let end = Instant::now() + timeout;
        loop {
            let all = self.all();
            if f(&all) {
                return all;
            }
            assert!(
                Instant::now() < end,
                "receiver condition not met within {timeout:?}; got {} requests",
                all.len()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn serve(s: TcpStream, got: &Mutex<Got>, policy: &Policy) {
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
            }
        }
        let len: usize = headers
            .get("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut raw = vec![0u8; len];
        if r.read_exact(&mut raw).is_err() {
            return;
        }
        let mut rec = Received {
            body: serde_json::from_slice(&raw).unwrap_or(serde_json::Value::Null),
            headers,
            raw,
            at: Instant::now(),
            status: 0,
        };
        let status = {
            let mut g = got.lock().unwrap();
            let key = rec.header("idempotency-key").unwrap_or("").to_owned();
            let n = {
                let seen = g.per_key.entry(key).or_default();
                *seen += 1;
                *seen
            };
            rec.status = policy(&rec, n);
            g.all.push(rec.clone());
            rec.status
        };
        let text = if (200..300).contains(&status) {
            "ok"
        } else {
            "receiver says no"
        };
        let resp = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        if w.write_all(resp.as_bytes()).is_err() {
            return;
        }
    }
}

pub fn hmac256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

pub fn sign_github(secret: &str, body: &[u8]) -> String {
    let mac = hmac256(secret.as_bytes(), &[body]);
    format!(
        "sha256={}",
        mac.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

pub fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

pub fn whsec_key(secret: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(secret.trim_start_matches("whsec_"))
        .unwrap()
}

pub fn sign_standard(secret: &str, id: &str, ts: i64, body: &[u8]) -> String {
    let mac = hmac256(
        &whsec_key(secret),
        &[format!("{id}.{ts}.").as_bytes(), body],
    );
    format!("v1,{}", b64(&mac))
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Checks the gateway's own signature on what the receiver got.
pub fn verify_gateway_signature(r: &Received, secret: &str) -> bool {
    let (Some(id), Some(ts), Some(sig)) = (
        r.header("webhook-id"),
        r.header("webhook-timestamp"),
        r.header("webhook-signature"),
    ) else {
        return false;
    };
    let key = if secret.starts_with("whsec_") {
        whsec_key(secret)
    } else {
        secret.as_bytes().to_vec()
    };
    let mac = hmac256(&key, &[format!("{id}.{ts}.").as_bytes(), &r.raw]);
    sig == format!("v1,{}", b64(&mac))
}
