//! A stub of Telegram's Bot API for the tests (and the benchmark): `getMe`, `getUpdates`
//! (long polling, offsets recorded), `sendMessage` (recorded; answered by a policy that can
//! say 429 with `retry_after`, 500, a refusal, or hang), `editMessageText`,
//! `sendChatAction`, `setWebhook`, `deleteWebhook`. The gateway reaches it through
//! `api_base`.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

pub const TOKEN: &str = "123456789:AAtest-token_0123456789abcdefghijklmnop";
pub const BOT_ID: i64 = 123456789;
pub const BOT_USERNAME: &str = "hermes_test_bot";

/// One call the gateway made.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: String,
    pub body: Value,
    pub at: Instant,
}

impl Call {
    pub fn chat(&self) -> i64 {
        self.body["chat_id"].as_i64().unwrap_or(0)
    }
    pub fn text(&self) -> &str {
        self.body["text"].as_str().unwrap_or("")
    }
    pub fn reply_to(&self) -> Option<i64> {
        self.body["reply_parameters"]["message_id"].as_i64()
    }
}

/// How the stub answers a `sendMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Ok,
    /// 429 with `parameters.retry_after`.
    RetryAfter(u64),
    /// 500 Internal Server Error.
    ServerError,
    /// `ok: false` with this code and description (400 chat not found, 403 blocked).
    Refuse(u16, String),
    /// Holds the request this long, then closes the connection without an answer.
    Hang(Duration),
}

type Policy = Box<dyn Fn(&Call, usize) -> Answer + Send>;

struct State {
    /// Updates not yet confirmed, by update_id.
    pending: Vec<Value>,
    next_update_id: i64,
    /// The highest offset any getUpdates confirmed.
    confirmed: i64,
    /// Offsets of the getUpdates calls, in order.
    polls: Vec<Option<i64>>,
    calls: Vec<Call>,
    /// `sendMessage` calls answered ok.
    delivered: Vec<Call>,
    /// `sendMessage` calls so far, by chat (a long soak made counting them in `calls` the
    /// stub's own bottleneck).
    sends: HashMap<i64, usize>,
    policy: Policy,
    next_message_id: i64,
    /// The longest a getUpdates is held (Telegram holds for `timeout`).
    max_hold: Duration,
    /// How long a `sendMessage` takes before it is decided (as Telegram's round trip).
    send_delay: Duration,
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
                pending: Vec::new(),
                next_update_id: 1000,
                confirmed: 0,
                polls: Vec::new(),
                calls: Vec::new(),
                delivered: Vec::new(),
                sends: HashMap::new(),
                policy: Box::new(|_, _| Answer::Ok),
                next_message_id: 1,
                max_hold: Duration::from_secs(60),
                send_delay: Duration::ZERO,
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

    /// `sendMessage` answers from now on: `f(call, n)` with `n` the number of earlier
    /// `sendMessage` calls for the same chat.
    pub fn set_policy(&self, f: impl Fn(&Call, usize) -> Answer + Send + 'static) {
        self.with(|s| s.policy = Box::new(f));
    }

    pub fn set_max_hold(&self, d: Duration) {
        self.with(|s| s.max_hold = d);
    }

    /// Every `sendMessage` from now on waits this long before it is decided (answered and,
    /// if ok, recorded as delivered): as on Telegram, a message whose sender went away
    /// meanwhile is shown all the same.
    pub fn set_send_delay(&self, d: Duration) {
        self.with(|s| s.send_delay = d);
    }

    /// Queues an update for getUpdates; gives it the next update_id unless it has one.
    pub fn push(&self, mut update: Value) -> i64 {
        self.with(|s| {
            let id = match update["update_id"].as_i64() {
                Some(id) => id,
                None => {
                    let id = s.next_update_id;
                    update["update_id"] = id.into();
                    id
                }
            };
            s.next_update_id = s.next_update_id.max(id + 1);
            s.pending.push(update);
            s.pending
                .sort_by_key(|u| u["update_id"].as_i64().unwrap_or(0));
            id
        })
    }

    /// The next update_id `push` would give.
    pub fn next_update_id(&self) -> i64 {
        self.with(|s| s.next_update_id)
    }

    pub fn reserve_update_id(&self) -> i64 {
        self.with(|s| {
            let id = s.next_update_id;
            s.next_update_id += 1;
            id
        })
    }

    pub fn confirmed(&self) -> i64 {
        self.with(|s| s.confirmed)
    }

    pub fn polls(&self) -> Vec<Option<i64>> {
        self.with(|s| s.polls.clone())
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

    /// `sendMessage` calls answered ok, in the order answered.
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
                            c.chat(),
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

/// A private-chat text message from `user` in chat `chat` (chat id = user id in private).
pub fn text_update(chat: i64, user: i64, message_id: i64, text: &str) -> Value {
    json!({
        "message": {
            "message_id": message_id,
            "date": 1_700_000_000,
            "chat": {"id": chat, "type": if chat < 0 { "supergroup" } else { "private" }},
            "from": {"id": user, "is_bot": false, "first_name": format!("User{user}")},
            "text": text,
        }
    })
}

fn respond(conn: &mut TcpStream, status: u16, body: &Value) -> std::io::Result<()> {
    let text = body.to_string();
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        _ => "Internal Server Error",
    };
    write!(
        conn,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
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
        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let (token, method) = path
            .strip_prefix("/bot")
            .and_then(|p| p.split_once('/'))
            .unwrap_or(("", ""));
        if token != TOKEN {
            let _ = respond(
                &mut conn,
                404,
                &json!({"ok": false, "error_code": 404, "description": "Not Found"}),
            );
            continue;
        }
        if method == "sendMessage" {
            let delay = shared.0.lock().map_or(Duration::ZERO, |s| s.send_delay);
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
        }
        let (status, answer) = handle(shared, method, body);
        if status == 0 {
            // Hang: hold, then close without answering.
            return;
        }
        if respond(&mut conn, status, &answer).is_err() {
            return;
        }
    }
}

fn handle(shared: &Arc<(Mutex<State>, Condvar)>, method: &str, body: Value) -> (u16, Value) {
    let (m, cv) = &**shared;
    let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
    let call = Call {
        method: method.to_owned(),
        body: body.clone(),
        at: Instant::now(),
    };
    s.calls.push(call.clone());
    match method {
        "getMe" => (
            200,
            json!({"ok": true, "result": {"id": BOT_ID, "is_bot": true, "first_name": "Hermes", "username": BOT_USERNAME}}),
        ),
        "getUpdates" => {
            let offset = body["offset"].as_i64();
            s.polls.push(offset);
            if let Some(o) = offset {
                s.pending
                    .retain(|u| u["update_id"].as_i64().unwrap_or(0) >= o);
                s.confirmed = s.confirmed.max(o);
            }
            cv.notify_all();
            let limit = body["limit"].as_u64().unwrap_or(100) as usize;
            let hold = Duration::from_secs(body["timeout"].as_u64().unwrap_or(0)).min(s.max_hold);
            let end = Instant::now() + hold;
            loop {
                if !s.pending.is_empty() || Instant::now() >= end {
                    break;
                }
                let left = end.saturating_duration_since(Instant::now());
                s = cv
                    .wait_timeout(s, left)
                    .map(|(g, _)| g)
                    .unwrap_or_else(|p| p.into_inner().0);
            }
            let batch: Vec<Value> = s.pending.iter().take(limit).cloned().collect();
            (200, json!({"ok": true, "result": batch}))
        }
        "sendMessage" | "editMessageText" => {
            let chat = call.chat();
            // Earlier `sendMessage` calls to the chat, this one not counted.
            let n = s.sends.get(&chat).copied().unwrap_or(0);
            if method == "sendMessage" {
                *s.sends.entry(chat).or_default() += 1;
            }
            let answer = (s.policy)(&call, n);
            match answer {
                Answer::Ok => {
                    let id = s.next_message_id;
                    s.next_message_id += 1;
                    if method == "sendMessage" {
                        s.delivered.push(call.clone());
                    }
                    cv.notify_all();
                    (
                        200,
                        json!({"ok": true, "result": {"message_id": id, "date": 1_700_000_000,
                            "chat": {"id": chat}, "text": call.text()}}),
                    )
                }
                Answer::RetryAfter(secs) => (
                    429,
                    json!({"ok": false, "error_code": 429,
                        "description": format!("Too Many Requests: retry after {secs}"),
                        "parameters": {"retry_after": secs}}),
                ),
                Answer::ServerError => (
                    500,
                    json!({"ok": false, "error_code": 500, "description": "Internal Server Error"}),
                ),
                Answer::Refuse(code, d) => (
                    code,
                    json!({"ok": false, "error_code": code, "description": d}),
                ),
                Answer::Hang(d) => {
                    drop(s);
                    std::thread::sleep(d);
                    (0, Value::Null)
                }
            }
        }
        "sendChatAction" | "setWebhook" | "deleteWebhook" => {
            (200, json!({"ok": true, "result": true}))
        }
        _ => (
            404,
            json!({"ok": false, "error_code": 404, "description": "Not Found: method not found"}),
        ),
    }
}

/// The gateway configuration of a Telegram instance `main` at the stub.
pub fn telegram_config(stub: &Stub, extra: &str) -> String {
    format!(
        "[[platforms.telegram]]\nname = \"main\"\ntoken = \"{TOKEN}\"\napi_base = \"{}\"\n{extra}\n",
        stub.api_base()
    )
}

/// Replies per chat, in the order delivered.
pub fn by_chat(calls: &[Call]) -> HashMap<i64, Vec<String>> {
    let mut m: HashMap<i64, Vec<String>> = HashMap::new();
    for c in calls {
        m.entry(c.chat()).or_default().push(c.text().to_owned());
    }
    m
}
