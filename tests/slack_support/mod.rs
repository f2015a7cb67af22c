//! A stub of Slack's Web API for the tests (and what they need around it): `auth.test`,
//! `chat.postMessage` (recorded; answered by a policy that can say `ratelimited` with
//! `Retry-After`, 500, or `ok: false` with an error), `chat.update`. The gateway reaches
//! it through `api_base`. Events are signed by slack_sdk (`tests/platforms/sign.py`).

#![allow(dead_code)]

#[path = "../platforms/http_stub.rs"]
mod http_stub;
#[path = "../platforms/signer.rs"]
pub mod signer;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::common::{Gateway, Response, Setup, listener_addr, request};
use http_stub::{StubRequest, StubResponse};
pub use signer::Signer;

pub const SIGNING_SECRET: &str = "8f742231b10e8888abcd99aa00bb85a5";
pub const BOT_TOKEN: &str = "xoxb-1234-5678-TESTtokenSECRET";
pub const BOT_USER: &str = "U0BOT";
pub const TEAM: &str = "T0TEST";

/// One call the gateway made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub body: Value,
    pub auth: String,
    pub at: Instant,
}

impl Call {
    pub fn channel(&self) -> &str {
        self.body["channel"].as_str().unwrap_or("")
    }
    pub fn text(&self) -> &str {
        self.body["text"].as_str().unwrap_or("")
    }
    pub fn thread_ts(&self) -> Option<&str> {
        self.body["thread_ts"].as_str()
    }
    /// Where the reply went: the channel and its thread.
    pub fn place(&self) -> String {
        format!("{}/{}", self.channel(), self.thread_ts().unwrap_or("-"))
    }
}

/// How the stub answers a `chat.postMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// HTTP 429 `{"ok": false, "error": "ratelimited"}` with `Retry-After`.
    RateLimited(u64),
    /// HTTP 500.
    ServerError,
    /// HTTP 200 `{"ok": false, "error": …}`.
    Refuse(String),
}

type Policy = Box<dyn Fn(&Call, usize) -> Answer + Send>;

struct State {
    calls: Vec<Call>,
    delivered: Vec<Call>,
    policy: Policy,
    next_ts: u64,
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
                next_ts: 1,
            }),
            Condvar::new(),
        ));
        let s = shared.clone();
        let addr = http_stub::serve(Arc::new(move |r| handle(&s, r)));
        Stub { addr, shared }
    }

    pub fn api_base(&self) -> String {
        format!("http://{}/api", self.addr)
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut g = self.shared.0.lock().unwrap_or_else(|p| p.into_inner());
        let r = f(&mut g);
        self.shared.1.notify_all();
        r
    }

    /// `chat.postMessage` answers from now on: `f(call, n)` with `n` the number of earlier
    /// calls for the same channel.
    pub fn set_policy(&self, f: impl Fn(&Call, usize) -> Answer + Send + 'static) {
        self.with(|s| s.policy = Box::new(f));
    }

    pub fn calls(&self, method: &str) -> Vec<Call> {
        self.with(|s| {
            s.calls
                .iter()
                .filter(|c| c.method == method)
                .cloned()
                .collect()
        })
    }

    /// `chat.postMessage` calls answered ok, in the order answered.
    pub fn delivered(&self) -> Vec<Call> {
        self.with(|s| s.delivered.clone())
    }

    /// Waits until `f(delivered)` holds; panics with what was delivered after `timeout`.
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
                            c.place(),
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

fn handle(shared: &Arc<(Mutex<State>, Condvar)>, r: StubRequest) -> StubResponse {
    let method = r.path.strip_prefix("/api/").unwrap_or("").to_owned();
    let body: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    let auth = r.headers.get("authorization").cloned().unwrap_or_default();
    let (m, cv) = &**shared;
    let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
    let call = Call {
        method: method.clone(),
        body,
        auth: auth.clone(),
        at: Instant::now(),
    };
    s.calls.push(call.clone());
    cv.notify_all();
    if auth != format!("Bearer {BOT_TOKEN}") {
        return StubResponse::json(200, &json!({"ok": false, "error": "invalid_auth"}));
    }
    match method.as_str() {
        "auth.test" => StubResponse::json(
            200,
            &json!({"ok": true, "url": "https://hermes-test.slack.com/", "team": "Hermes Test",
                "user": "hermes", "team_id": TEAM, "user_id": BOT_USER, "bot_id": "B0BOT"}),
        ),
        "chat.postMessage" | "chat.update" => {
            let channel = call.channel().to_owned();
            let n = s
                .calls
                .iter()
                .filter(|c| c.method == "chat.postMessage" && c.channel() == channel)
                .count()
                - usize::from(method == "chat.postMessage");
            match (s.policy)(&call, n) {
                Answer::Ok => {
                    let ts = format!("1700000000.{:06}", s.next_ts);
                    s.next_ts += 1;
                    if method == "chat.postMessage" {
                        s.delivered.push(call.clone());
                    }
                    cv.notify_all();
                    StubResponse::json(
                        200,
                        &json!({"ok": true, "channel": channel, "ts": ts,
                            "message": {"text": call.text(), "ts": ts}}),
                    )
                }
                Answer::RateLimited(secs) => {
                    StubResponse::json(429, &json!({"ok": false, "error": "ratelimited"}))
                        .with_header("Retry-After", &secs.to_string())
                }
                Answer::ServerError => StubResponse::json(500, &json!({"ok": false})),
                Answer::Refuse(e) => StubResponse::json(200, &json!({"ok": false, "error": e})),
            }
        }
        _ => StubResponse::json(200, &json!({"ok": false, "error": "unknown_method"})),
    }
}

pub fn now_ts() -> String {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        .to_string()
}

fn envelope(event_id: &str, event: Value) -> Value {
    json!({
        "token": "verification-token-not-used",
        "team_id": TEAM,
        "api_app_id": "A0TEST",
        "event": event,
        "type": "event_callback",
        "event_id": event_id,
        "event_time": 1_700_000_000,
        "authorizations": [{"enterprise_id": null, "team_id": TEAM, "user_id": BOT_USER,
            "is_bot": true, "is_enterprise_install": false}],
        "is_ext_shared_channel": false,
        "event_context": format!("4-{event_id}"),
    })
}

/// An `app_mention` in channel `channel` (in the thread `thread_ts`, if any).
pub fn mention(
    event_id: &str,
    channel: &str,
    user: &str,
    ts: &str,
    thread_ts: Option<&str>,
    text: &str,
) -> Value {
    let mut e = json!({
        "type": "app_mention",
        "user": user,
        "text": format!("<@{BOT_USER}> {text}"),
        "ts": ts,
        "channel": channel,
        "event_ts": ts,
        "team": TEAM,
    });
    if let Some(t) = thread_ts {
        e["thread_ts"] = t.into();
    }
    envelope(event_id, e)
}

/// A direct message `text` from `user` in the DM channel `channel`.
pub fn dm(event_id: &str, channel: &str, user: &str, ts: &str, text: &str) -> Value {
    envelope(
        event_id,
        json!({
            "type": "message",
            "channel_type": "im",
            "user": user,
            "text": text,
            "ts": ts,
            "channel": channel,
            "event_ts": ts,
            "team": TEAM,
        }),
    )
}

/// Any event in an envelope.
pub fn event(event_id: &str, event: Value) -> Value {
    envelope(event_id, event)
}

/// The gateway configuration of a Slack instance `work` at the stub.
pub fn slack_config(stub: &Stub, extra: &str) -> String {
    format!(
        "[[platforms.slack]]\nname = \"work\"\nsigning_secret = \"{SIGNING_SECRET}\"\nbot_token = \"{BOT_TOKEN}\"\napi_base = \"{}\"\n{extra}\n",
        stub.api_base()
    )
}

/// Starts a gateway with the webhook listener on a free loopback port.
pub fn start(stub: &Stub, extra: &str, more: &str) -> (Setup, Gateway, SocketAddr) {
    let setup = Setup::new("127.0.0.1:0", &(slack_config(stub, extra) + more));
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

pub const PATH: &str = "/platforms/slack/work";

/// Posts `body` signed by slack_sdk now; `retry`: `X-Slack-Retry-Num`.
pub fn post(hook: SocketAddr, signer: &Signer, body: &str, retry: Option<u32>) -> Response {
    let ts = now_ts();
    let sig = signer.sign(&ts, body);
    let n = retry.map(|n| n.to_string());
    let mut headers = vec![
        ("X-Slack-Request-Timestamp", ts.as_str()),
        ("X-Slack-Signature", sig.as_str()),
    ];
    if let Some(n) = &n {
        headers.push(("X-Slack-Retry-Num", n.as_str()));
        headers.push(("X-Slack-Retry-Reason", "http_timeout"));
    }
    request(hook, "POST", PATH, &headers, body).expect("request")
}

/// Replies per place (channel/thread), in the order delivered.
pub fn by_place(calls: &[Call]) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for c in calls {
        m.entry(c.place()).or_default().push(c.text().to_owned());
    }
    m
}
