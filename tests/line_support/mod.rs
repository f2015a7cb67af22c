//! A stub of the LINE Messaging API for the tests (and the benchmark): `POST
//! /v2/bot/message/push` (recorded with its `X-Line-Retry-Key`; a key already accepted is
//! answered 409 as LINE does; otherwise answered by a policy that can say 500, 429, a
//! refusal, or hang), `POST /v2/bot/chat/loading/start`, `GET /v2/bot/info`. The gateway
//! reaches it through `api_base`. Also: signing bodies with line-bot-sdk (PyPI), and the
//! gateway configuration of a LINE instance at the stub.

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const TOKEN: &str = "line-test-access-token/0123456789+abcdefghij=";
pub const SECRET: &str = "0123456789abcdef0123456789abcdef";
pub const BOT_USER_ID: &str = "U0123456789abcdef0123456789abcdef";

/// One push the gateway made (whatever it was answered).
#[derive(Debug, Clone)]
pub struct Push {
    pub to: String,
    pub texts: Vec<String>,
    pub retry_key: Option<String>,
    pub at: Instant,
}

/// How the stub answers a push whose key it has not accepted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// Accepted (so the key is taken), but answered 500 as if the answer were lost.
    OkButLost,
    ServerError,
    /// 429, with a `Retry-After` in seconds if given.
    TooMany(Option<u64>),
    /// A 4xx with LINE's message.
    Refuse(u16, String),
    /// Holds the request this long, then closes the connection without an answer.
    Hang(Duration),
}

type Policy = Box<dyn Fn(&Push, usize) -> Answer + Send>;

struct State {
    /// Every push, in the order received.
    pushes: Vec<Push>,
    /// Pushes accepted (shown to the chat), in the order accepted.
    delivered: Vec<Push>,
    accepted_keys: HashSet<String>,
    /// Pushes answered 409 (a key accepted before).
    conflicts: usize,
    loading: Vec<String>,
    info_calls: usize,
    policy: Policy,
}

#[derive(Clone)]
pub struct Stub {
    pub addr: SocketAddr,
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Stub {
    pub fn start() -> Stub {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the stub");
        let addr = listener.local_addr().expect("stub address");
        let shared = Arc::new((
            Mutex::new(State {
                pushes: Vec::new(),
                delivered: Vec::new(),
                accepted_keys: HashSet::new(),
                conflicts: 0,
                loading: Vec::new(),
                info_calls: 0,
                policy: Box::new(|_, _| Answer::Ok),
            }),
            Condvar::new(),
        ));
        let s = shared.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                std::thread::spawn(move || serve(conn, &s));
            }
        });
        Stub { addr, shared }
    }

    pub fn api_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut g = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut g);
        self.shared.1.notify_all();
        r
    }

    /// Pushes answered from now on: `f(push, n)`, `n` the earlier pushes to the same chat.
    pub fn set_policy(&self, f: impl Fn(&Push, usize) -> Answer + Send + 'static) {
        self.with(|s| s.policy = Box::new(f));
    }

    pub fn pushes(&self) -> Vec<Push> {
        self.with(|s| s.pushes.clone())
    }

    pub fn delivered(&self) -> Vec<Push> {
        self.with(|s| s.delivered.clone())
    }

    pub fn conflicts(&self) -> usize {
        self.with(|s| s.conflicts)
    }

    pub fn loading(&self) -> Vec<String> {
        self.with(|s| s.loading.clone())
    }

    /// Waits until `f(pushes so far)` holds; panics after `timeout`.
    pub fn wait_pushes(&self, timeout: Duration, f: impl Fn(&[Push]) -> bool) -> Vec<Push> {
        self.wait(timeout, |s| &s.pushes, f)
    }

    /// Waits until `f(delivered)` holds; panics with what was delivered after `timeout`.
    pub fn wait_delivered(&self, timeout: Duration, f: impl Fn(&[Push]) -> bool) -> Vec<Push> {
        self.wait(timeout, |s| &s.delivered, f)
    }

    fn wait(
        &self,
        timeout: Duration,
        which: impl Fn(&State) -> &Vec<Push>,
        f: impl Fn(&[Push]) -> bool,
    ) -> Vec<Push> {
        let end = Instant::now() + timeout;
        let (m, cv) = &*self.shared;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if f(which(&g)) {
                return which(&g).clone();
            }
            let now = Instant::now();
            if now >= end {
                let texts: Vec<String> = which(&g)
                    .iter()
                    .map(|p| {
                        format!(
                            "{}: {:?}",
                            p.to,
                            p.texts
                                .iter()
                                .map(|t| t.chars().take(50).collect::<String>())
                                .collect::<Vec<_>>()
                        )
                    })
                    .collect();
                panic!(
                    "condition not met within {timeout:?}; {} pushes:\n{}",
                    texts.len(),
                    texts.join("\n")
                );
            }
            g = cv
                .wait_timeout(g, (end - now).min(Duration::from_millis(200)))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

/// The texts each chat was shown, in order (one entry per message of a push).
pub fn by_chat(pushes: &[Push]) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for p in pushes {
        m.entry(p.to.clone())
            .or_default()
            .extend(p.texts.iter().cloned());
    }
    m
}

fn respond(conn: &mut TcpStream, status: u16, extra: &str, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        409 => "Conflict",
        429 => "Too Many Requests",
        _ => "Internal Server Error",
    };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{text}",
        text.len()
    )?;
    conn.flush()
}

fn serve(conn: TcpStream, shared: &Arc<(Mutex<State>, Condvar)>) {
    let _ = conn.set_nodelay(true);
    let Ok(read_half) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(read_half);
    let mut conn = conn;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let mut len = 0usize;
        let mut headers: HashMap<String, String> = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
                if k == "content-length" {
                    len = v.parse().unwrap_or(0);
                }
                headers.insert(k, v);
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if headers.get("authorization").map(String::as_str) != Some(&format!("Bearer {TOKEN}")) {
            let _ = respond(
                &mut conn,
                401,
                "",
                &json!({"message": "Authentication failed. Confirm that the access token in the authorization header is valid."}),
            );
            continue;
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (status, extra, answer) = handle(shared, &method, &path, &headers, body);
        if status == 0 {
            return;
        }
        if respond(&mut conn, status, &extra, &answer).is_err() {
            return;
        }
    }
}

fn handle(
    shared: &Arc<(Mutex<State>, Condvar)>,
    method: &str,
    path: &str,
    headers: &HashMap<String, String>,
    body: Value,
) -> (u16, String, Value) {
    let (m, cv) = &**shared;
    let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
    match (method, path) {
        ("GET", "/v2/bot/info") => {
            s.info_calls += 1;
            (
                200,
                String::new(),
                json!({"userId": BOT_USER_ID, "basicId": "@123abcde", "displayName": "Hermes Test",
                    "chatMode": "bot", "markAsReadMode": "manual"}),
            )
        }
        ("POST", "/v2/bot/chat/loading/start") => {
            s.loading
                .push(body["chatId"].as_str().unwrap_or("").to_owned());
            (202, String::new(), json!({}))
        }
        ("POST", "/v2/bot/message/push") => {
            let push = Push {
                to: body["to"].as_str().unwrap_or("").to_owned(),
                texts: body["messages"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|m| m["text"].as_str().unwrap_or("").to_owned())
                            .collect()
                    })
                    .unwrap_or_default(),
                retry_key: headers.get("x-line-retry-key").cloned(),
                at: Instant::now(),
            };
            let n = s.pushes.iter().filter(|p| p.to == push.to).count();
            s.pushes.push(push.clone());
            cv.notify_all();
            if push.texts.is_empty() || push.texts.len() > 5 {
                return (
                    400,
                    String::new(),
                    json!({"message": "The request body has 1 error(s)", "details": [{"message": "Size must be between 1 and 5", "property": "messages"}]}),
                );
            }
            if let Some(k) = &push.retry_key
                && s.accepted_keys.contains(k)
            {
                s.conflicts += 1;
                return (
                    409,
                    "x-line-accepted-request-id: 0123-accepted\r\n".into(),
                    json!({"message": "The retry key is already accepted"}),
                );
            }
            let answer = (s.policy)(&push, n);
            let accept = |s: &mut State| {
                if let Some(k) = &push.retry_key {
                    s.accepted_keys.insert(k.clone());
                }
                s.delivered.push(push.clone());
                cv.notify_all();
            };
            match answer {
                Answer::Ok => {
                    accept(&mut s);
                    (
                        200,
                        String::new(),
                        json!({"sentMessages": push.texts.iter().enumerate().map(|(i, _)| json!({"id": format!("{i}"), "quoteToken": "q"})).collect::<Vec<_>>()}),
                    )
                }
                Answer::OkButLost => {
                    accept(&mut s);
                    (500, String::new(), json!({"message": "answer lost"}))
                }
                Answer::ServerError => (500, String::new(), json!({"message": "Internal error"})),
                Answer::TooMany(after) => (
                    429,
                    after.map_or_else(String::new, |a| format!("Retry-After: {a}\r\n")),
                    json!({"message": "Too Many Requests"}),
                ),
                Answer::Refuse(code, msg) => (code, String::new(), json!({"message": msg})),
                Answer::Hang(d) => {
                    drop(s);
                    std::thread::sleep(d);
                    (0, String::new(), Value::Null)
                }
            }
        }
        _ => (404, String::new(), json!({"message": "Not found"})),
    }
}

/// The gateway configuration of a LINE instance `main` at the stub.
pub fn line_config(stub: &Stub, extra: &str) -> String {
    format!(
        "[[platforms.line]]\nname = \"main\"\nchannel_secret = \"{SECRET}\"\nchannel_access_token = \"{TOKEN}\"\napi_base = \"{}\"\n{extra}\n",
        stub.api_base()
    )
}

/// The venv's Python with line-bot-sdk, or `None` (and a SKIP line) where it is missing —
/// never under CI=true, where it must be there.
pub fn sdk_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/platforms-venv/bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", "import linebot.v3.webhook"])
            .output()
            .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run this test: create the venv with `python3 -m venv target/platforms-venv && target/platforms-venv/bin/pip install -r tests/platforms/requirements.txt` (tests/run-all.sh does)"
    );
    eprintln!(
        "SKIP: no Python venv with line-bot-sdk at {}; tests/run-all.sh creates it",
        python.display()
    );
    None
}

/// Runs `script` (in tests/platforms) with `input` on stdin; its stdout as JSON.
pub fn run_python(python: &Path, script: &str, args: &[&str], input: &Value) -> Value {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(python)
        .arg(root.join("tests/platforms").join(script))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the Python script");
    let mut stdin = child.stdin.take().expect("stdin");
    let text = input.to_string();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(text.as_bytes());
    });
    let out = child.wait_with_output().expect("the script's output");
    let _ = writer.join();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON from the script")
}

/// `X-Line-Signature` for each body, made and checked by line-bot-sdk's side (see
/// tests/platforms/line_sign.py); `parse`: the SDK must also parse each body.
pub fn sign(python: &Path, secret: &str, bodies: &[String], parse: bool) -> Vec<String> {
    let v = run_python(
        python,
        "line_sign.py",
        &[],
        &json!({"secret": secret, "bodies": bodies, "parse": parse}),
    );
    serde_json::from_value(v).expect("a list of signatures")
}

/// A LINE webhook body with one text message event.
pub fn text_event(event_id: &str, user: &str, text: &str, redelivery: bool) -> Value {
    json!({
        "type": "message",
        "mode": "active",
        "timestamp": 1_767_225_600_000u64,
        "source": {"type": "user", "userId": user},
        "webhookEventId": event_id,
        "deliveryContext": {"isRedelivery": redelivery},
        "replyToken": "nHuyWiB7yP5Zw52FIkcQobQuGDXCTA",
        "message": {"id": format!("m{event_id}"), "type": "text", "text": text, "quoteToken": "q"},
    })
}

pub fn body(events: &[Value]) -> String {
    json!({"destination": BOT_USER_ID, "events": events}).to_string()
}

/// A LINE user id for test user `i`.
pub fn user(i: usize) -> String {
    format!("U{:032x}", 0xabc0_0000_u64 + i as u64)
}
