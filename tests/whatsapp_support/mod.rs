//! A stub of the WhatsApp Cloud API (Graph) for the tests: `POST /{version}/{phone number
//! id}/messages` (recorded; answered by a policy that can say 429 with `Retry-After`, a
//! transient 500, or a refusal) and `GET /{version}/{phone number id}`. The gateway reaches
//! it through `api_base`. Webhooks are signed in Python, each signature checked by pywa's
//! validator (tests/platforms/sign.py).

#![allow(dead_code)]

#[path = "../platforms/http_stub.rs"]
mod http_stub;
#[path = "../platforms/signer.rs"]
pub mod signer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::common::{Gateway, Response, Setup, listener_addr, request};
use http_stub::{StubRequest, StubResponse};
pub use signer::Signer;

pub const VERIFY_TOKEN: &str = "verify-me-VERIFYxyz";
pub const APP_SECRET: &str = "0123456789abcdefAPPSECRETxyz";
pub const ACCESS_TOKEN: &str = "EAAGtestACCESStokenSECRETxyz";
pub const PHONE_ID: &str = "106540352242922";
pub const VERSION: &str = "v21.0";

#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub body: Value,
    pub auth: String,
    pub at: Instant,
}

impl Call {
    pub fn to(&self) -> &str {
        self.body["to"].as_str().unwrap_or("")
    }
    pub fn text(&self) -> &str {
        self.body["text"]["body"].as_str().unwrap_or("")
    }
    pub fn context(&self) -> Option<&str> {
        self.body["context"]["message_id"].as_str()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// HTTP 429, Graph error 130429, with `Retry-After`.
    RateLimited(u64),
    /// HTTP 500, `is_transient: true`.
    ServerError,
    /// HTTP 400 with this Graph error code and message.
    Refuse(i64, String),
}

type Policy = Box<dyn Fn(&Call, usize) -> Answer + Send>;

struct State {
    calls: Vec<Call>,
    delivered: Vec<Call>,
    policy: Policy,
    next_id: u64,
}

#[derive(Clone)]
pub struct Stub {
    pub addr: SocketAddr,
    shared: Arc<(Mutex<State>, Condvar)>,
}

impl Stub {
    pub fn start() -> Stub {
        let shared = Arc::new((
            Mutex::new(State {
                calls: Vec::new(),
                delivered: Vec::new(),
                policy: Box::new(|_, _| Answer::Ok),
                next_id: 1,
            }),
            Condvar::new(),
        ));
        let s = shared.clone();
        let addr = http_stub::serve(Arc::new(move |r| handle(&s, r)));
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

    /// Sends are answered from now on by `f(call, n)`, `n` the earlier sends to the same
    /// user.
    pub fn set_policy(&self, f: impl Fn(&Call, usize) -> Answer + Send + 'static) {
        self.with(|s| s.policy = Box::new(f));
    }

    pub fn calls(&self) -> Vec<Call> {
        self.with(|s| s.calls.clone())
    }

    pub fn delivered(&self) -> Vec<Call> {
        self.with(|s| s.delivered.clone())
    }

    pub fn wait_delivered(&self, timeout: Duration, f: impl Fn(&[Call]) -> bool) -> Vec<Call> {
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
                    .map(|c| {
                        format!(
                            "{}: {}",
                            c.to(),
                            c.text().chars().take(60).collect::<String>()
                        )
                    })
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

fn graph_error(status: u16, code: i64, message: &str, transient: bool) -> StubResponse {
    StubResponse::json(
        status,
        &json!({"error": {"message": message, "type": "OAuthException", "code": code,
            "is_transient": transient, "fbtrace_id": "AbCdEf"}}),
    )
}

fn handle(shared: &Arc<(Mutex<State>, Condvar)>, r: StubRequest) -> StubResponse {
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let auth = r.headers.get("authorization").cloned().unwrap_or_default();
    let (m, cv) = &**shared;
    let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
    let call = Call {
        method: r.method.clone(),
        path: r.path.clone(),
        body,
        auth: auth.clone(),
        at: Instant::now(),
    };
    s.calls.push(call.clone());
    cv.notify_all();
    if auth != format!("Bearer {ACCESS_TOKEN}") {
        return graph_error(
            401,
            190,
            "Invalid OAuth access token - Cannot parse access token",
            false,
        );
    }
    let number = format!("/{VERSION}/{PHONE_ID}");
    let path = r.path.split('?').next().unwrap_or("");
    match (r.method.as_str(), path) {
        ("GET", p) if p == number => StubResponse::json(
            200,
            &json!({"display_phone_number": "+1 555-010-0000", "verified_name": "Hermes Test", "id": PHONE_ID}),
        ),
        ("POST", p) if p == format!("{number}/messages") => {
            let to = call.to().to_owned();
            let n = s
                .calls
                .iter()
                .filter(|c| c.method == "POST" && c.to() == to)
                .count()
                - 1;
            match (s.policy)(&call, n) {
                Answer::Ok => {
                    let id = format!("wamid.OUT{:06}", s.next_id);
                    s.next_id += 1;
                    s.delivered.push(call.clone());
                    cv.notify_all();
                    StubResponse::json(
                        200,
                        &json!({"messaging_product": "whatsapp",
                            "contacts": [{"input": to, "wa_id": to}], "messages": [{"id": id}]}),
                    )
                }
                Answer::RateLimited(secs) => graph_error(429, 130429, "Rate limit hit", true)
                    .with_header("Retry-After", &secs.to_string()),
                Answer::ServerError => graph_error(500, 131000, "Something went wrong", true),
                Answer::Refuse(code, msg) => graph_error(400, code, &msg, false),
            }
        }
        _ => graph_error(404, 100, "Unsupported request", false),
    }
}

/// A webhook body with `messages` (each a Graph message object) for our number.
pub fn webhook(messages: Vec<Value>, contacts: Vec<Value>) -> Value {
    json!({
        "object": "whatsapp_business_account",
        "entry": [{
            "id": "102290129340398",
            "changes": [{
                "value": {
                    "messaging_product": "whatsapp",
                    "metadata": {"display_phone_number": "15550100000", "phone_number_id": PHONE_ID},
                    "contacts": contacts,
                    "messages": messages,
                },
                "field": "messages",
            }],
        }],
    })
}

pub fn contact(wa_id: &str, name: &str) -> Value {
    json!({"profile": {"name": name}, "wa_id": wa_id})
}

/// A text message as the Cloud API sends it.
pub fn text(id: &str, from: &str, body: &str) -> Value {
    json!({"from": from, "id": id, "timestamp": "1700000000", "text": {"body": body}, "type": "text"})
}

/// A webhook with one text message from `from`.
pub fn text_webhook(id: &str, from: &str, body: &str) -> Value {
    webhook(vec![text(id, from, body)], vec![contact(from, "Kerry")])
}

pub fn whatsapp_config(stub: &Stub, extra: &str) -> String {
    format!(
        "[[platforms.whatsapp]]\nname = \"biz\"\nverify_token = \"{VERIFY_TOKEN}\"\napp_secret = \"{APP_SECRET}\"\naccess_token = \"{ACCESS_TOKEN}\"\nphone_number_id = \"{PHONE_ID}\"\napi_base = \"{}\"\n{extra}\n",
        stub.api_base()
    )
}

pub const PATH: &str = "/platforms/whatsapp/biz";

pub fn start(stub: &Stub, extra: &str, more: &str) -> (Setup, Gateway, SocketAddr) {
    let setup = Setup::new("127.0.0.1:0", &(whatsapp_config(stub, extra) + more));
    let text = std::fs::read_to_string(&setup.config)
        .expect("config")
        .replace("webhook = \"off\"", "webhook = \"127.0.0.1:0\"");
    setup.write_config(&text);
    let notify = setup.notify();
    let gw = setup.spawn(
        &[],
        &[("NOTIFY_SOCKET", notify.path.to_str().expect("utf-8"))],
    );
    notify.wait_for("READY=1", Duration::from_secs(20));
    let hook = listener_addr(&setup.control, "webhook");
    (setup, gw, hook)
}

/// Posts `body` with the signature Python made (and pywa accepted).
pub fn post(hook: SocketAddr, signer: &Signer, body: &str) -> Response {
    let sig = signer.sign("", body);
    request(hook, "POST", PATH, &[("X-Hub-Signature-256", &sig)], body).expect("request")
}

/// Replies per user, in the order delivered.
pub fn by_user(calls: &[Call]) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for c in calls {
        m.entry(c.to().to_owned())
            .or_default()
            .push(c.text().to_owned());
    }
    m
}
