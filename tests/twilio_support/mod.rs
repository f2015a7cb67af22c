//! A stub of Twilio's REST API for the tests (and the benchmark): `POST
//! /2010-04-01/Accounts/{sid}/Messages.json` (recorded; answered by a policy that can say
//! 429, 500, a refusal with Twilio's error code, or hang) and `GET
//! /2010-04-01/Accounts/{sid}.json`, both behind Basic auth. The gateway reaches it through
//! `api_base`. Also: signing requests with the `twilio` library (PyPI), posting forms, and
//! the gateway configuration of a Twilio instance at the stub.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

pub const SID: &str = "AC0123456789abcdef0123456789abcdef";
pub const TOKEN: &str = "9f86d081884c7d659a2feaa0c55ad015";
pub const FROM: &str = "+15550001111";

/// One message the gateway asked Twilio to send (whatever it was answered).
#[derive(Debug, Clone)]
pub struct Sent {
    pub to: String,
    pub from: String,
    pub body: String,
    pub at: Instant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok,
    ServerError,
    /// 429 (Twilio's 20429), with a `Retry-After` in seconds if given.
    TooMany(Option<u64>),
    /// A 4xx with Twilio's error code and message (21211, 21610).
    Refuse(u16, i64, String),
    Hang(Duration),
}

type Policy = Box<dyn Fn(&Sent, usize) -> Answer + Send>;

struct State {
    calls: Vec<Sent>,
    delivered: Vec<Sent>,
    policy: Policy,
    next: u64,
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
                calls: Vec::new(),
                delivered: Vec::new(),
                policy: Box::new(|_, _| Answer::Ok),
                next: 1,
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

    /// Messages answered from now on: `f(message, n)`, `n` the earlier ones to that number.
    pub fn set_policy(&self, f: impl Fn(&Sent, usize) -> Answer + Send + 'static) {
        self.with(|s| s.policy = Box::new(f));
    }

    pub fn calls(&self) -> Vec<Sent> {
        self.with(|s| s.calls.clone())
    }

    pub fn delivered(&self) -> Vec<Sent> {
        self.with(|s| s.delivered.clone())
    }

    /// Waits until `f(delivered)` holds; panics with what was delivered after `timeout`.
    pub fn wait_delivered(&self, timeout: Duration, f: impl Fn(&[Sent]) -> bool) -> Vec<Sent> {
        let end = Instant::now() + timeout;
        let (m, cv) = &*self.shared;
        let mut g = m.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if f(&g.delivered) {
                return g.delivered.clone();
            }
            let now = Instant::now();
            if now >= end {
                let texts: Vec<String> = g
                    .delivered
                    .iter()
                    .map(|c| format!("{}: {}", c.to, c.body.chars().take(60).collect::<String>()))
                    .collect();
                panic!(
                    "condition not met within {timeout:?}; {} delivered:\n{}",
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

/// Messages per number, in the order delivered.
pub fn by_number(sent: &[Sent]) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for s in sent {
        m.entry(s.to.clone()).or_default().push(s.body.clone());
    }
    m
}

fn respond(conn: &mut TcpStream, status: u16, extra: &str, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
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
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{SID}:{TOKEN}"))
    );
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
        let mut auth = String::new();
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
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
                if k.eq_ignore_ascii_case("authorization") {
                    auth = v.trim().to_owned();
                }
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if auth != basic {
            let _ = respond(
                &mut conn,
                401,
                "",
                &json!({"code": 20003, "message": "Authenticate", "status": 401}),
            );
            continue;
        }
        let (status, extra, answer) = handle(shared, &method, &path, &body);
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
    body: &[u8],
) -> (u16, String, Value) {
    let (m, cv) = &**shared;
    let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
    let messages = format!("/2010-04-01/Accounts/{SID}/Messages.json");
    let account = format!("/2010-04-01/Accounts/{SID}.json");
    if method == "GET" && path == account {
        return (
            200,
            String::new(),
            json!({"sid": SID, "friendly_name": "Hermes test account", "status": "active", "type": "Full"}),
        );
    }
    if method != "POST" || path != messages {
        return (
            404,
            String::new(),
            json!({"code": 20404, "message": "The requested resource was not found", "status": 404}),
        );
    }
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let sent = Sent {
        to: form.get("To").cloned().unwrap_or_default(),
        from: form.get("From").cloned().unwrap_or_default(),
        body: form.get("Body").cloned().unwrap_or_default(),
        at: Instant::now(),
    };
    let n = s.calls.iter().filter(|c| c.to == sent.to).count();
    s.calls.push(sent.clone());
    cv.notify_all();
    if sent.body.chars().count() > 1600 {
        return (
            400,
            String::new(),
            json!({"code": 21617, "message": "The concatenated message body exceeds the 1600 character limit", "status": 400}),
        );
    }
    match (s.policy)(&sent, n) {
        Answer::Ok => {
            let sid = format!("SM{:032x}", s.next);
            s.next += 1;
            s.delivered.push(sent.clone());
            cv.notify_all();
            (
                201,
                String::new(),
                json!({"sid": sid, "status": "queued", "to": sent.to, "from": sent.from, "body": sent.body}),
            )
        }
        Answer::ServerError => (
            500,
            String::new(),
            json!({"code": 20500, "message": "Internal Server Error", "status": 500}),
        ),
        Answer::TooMany(after) => (
            429,
            after.map_or_else(String::new, |a| format!("Retry-After: {a}\r\n")),
            json!({"code": 20429, "message": "Too Many Requests", "status": 429}),
        ),
        Answer::Refuse(status, code, message) => (
            status,
            String::new(),
            json!({"code": code, "message": message, "more_info": format!("https://www.twilio.com/docs/errors/{code}"), "status": status}),
        ),
        Answer::Hang(d) => {
            drop(s);
            std::thread::sleep(d);
            (0, String::new(), Value::Null)
        }
    }
}

/// The gateway configuration of a Twilio instance `main` at the stub; `public_url` is the
/// URL the tests sign for.
pub fn twilio_config(stub: &Stub, public_url: &str, extra: &str) -> String {
    format!(
        "[[platforms.twilio]]\nname = \"main\"\naccount_sid = \"{SID}\"\nauth_token = \"{TOKEN}\"\nfrom = \"{FROM}\"\npublic_url = \"{public_url}\"\napi_base = \"{}\"\n{extra}\n",
        stub.api_base()
    )
}

/// The URL Twilio would call, as the tests configure it (a proxy in front, in real life).
pub const PUBLIC_URL: &str = "https://sms.example.org/platforms/twilio/main";

/// The venv's Python with the twilio library, or `None` (and a SKIP line) where it is
/// missing — never under CI=true, where it must be there.
pub fn sdk_python() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join("target/platforms-venv/bin/python");
    let ok = python.exists()
        && Command::new(&python)
            .args(["-c", "import twilio.request_validator"])
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
        "SKIP: no Python venv with the twilio library at {}; tests/run-all.sh creates it",
        python.display()
    );
    None
}

pub type Params = Vec<(String, String)>;

/// `X-Twilio-Signature` of each request (`url`, `params`), computed by the twilio library's
/// `RequestValidator.compute_signature` with `token` (tests/platforms/twilio_sign.py).
pub fn sign(python: &Path, token: &str, requests: &[(String, Params)]) -> Vec<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut child = Command::new(python)
        .arg(root.join("tests/platforms/twilio_sign.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run twilio_sign.py");
    let input = json!({
        "token": token,
        "requests": requests.iter().map(|(u, p)| json!({"url": u, "params": p})).collect::<Vec<_>>(),
    })
    .to_string();
    let mut stdin = child.stdin.take().expect("stdin");
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(input.as_bytes());
    });
    let out = child.wait_with_output().expect("its output");
    let _ = writer.join();
    assert!(
        out.status.success(),
        "twilio_sign.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("a list of signatures")
}

/// The form Twilio posts for an incoming SMS.
pub fn sms(sid: &str, from: &str, body: &str) -> Params {
    [
        ("ToCountry", "US"),
        ("ToState", "CA"),
        ("SmsMessageSid", sid),
        ("NumMedia", "0"),
        ("ToCity", "SAN FRANCISCO"),
        ("FromZip", "94105"),
        ("SmsSid", sid),
        ("FromState", "CA"),
        ("SmsStatus", "received"),
        ("FromCity", "SAN FRANCISCO"),
        ("Body", body),
        ("FromCountry", "US"),
        ("To", FROM),
        ("MessagingServiceSid", ""),
        ("ToZip", "94105"),
        ("NumSegments", "1"),
        ("MessageSid", sid),
        ("AccountSid", SID),
        ("From", from),
        ("ApiVersion", "2010-04-01"),
    ]
    .iter()
    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
    .collect()
}

pub fn encode(params: &Params) -> String {
    let mut s = form_urlencoded::Serializer::new(String::new());
    for (k, v) in params {
        s.append_pair(k, v);
    }
    s.finish()
}

/// A keep-alive connection that posts forms.
pub struct FormConn {
    w: TcpStream,
    r: BufReader<TcpStream>,
}

impl FormConn {
    pub fn open(addr: SocketAddr) -> std::io::Result<Self> {
        let w = TcpStream::connect(addr)?;
        w.set_read_timeout(Some(Duration::from_secs(30)))?;
        let r = BufReader::new(w.try_clone()?);
        Ok(FormConn { w, r })
    }

    /// `POST path` with `body` as `content_type` and `X-Twilio-Signature: signature`.
    pub fn post(
        &mut self,
        path: &str,
        content_type: &str,
        signature: Option<&str>,
        body: &str,
    ) -> std::io::Result<crate::common::Response> {
        let mut raw = format!(
            "POST {path} HTTP/1.1\r\nHost: sms.example.org\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n",
            body.len()
        );
        if let Some(s) = signature {
            raw.push_str(&format!("X-Twilio-Signature: {s}\r\n"));
        }
        raw.push_str("\r\n");
        raw.push_str(body);
        // A body over the limit is answered (413) and the connection closed before it is
        // all written: read the answer even then.
        let written = self.w.write_all(raw.as_bytes());
        match crate::common::read_response(&mut self.r) {
            Ok(r) => Ok(r),
            Err(e) => written.and(Err(e)),
        }
    }
}

pub const FORM: &str = "application/x-www-form-urlencoded";

/// One signed form post on a fresh connection.
pub fn post_form(addr: SocketAddr, signature: Option<&str>, body: &str) -> crate::common::Response {
    FormConn::open(addr)
        .and_then(|mut c| c.post("/platforms/twilio/main", FORM, signature, body))
        .expect("post the form")
}
