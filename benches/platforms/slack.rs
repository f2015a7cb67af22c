//! Slack: `app_mention`-free direct messages (`message`, `channel_type = im`) posted as
//! the Events API does, each with its own `event_id`, signed with the signing secret
//! (`X-Slack-Signature: v0=` HMAC-SHA256 of `v0:TIMESTAMP:BODY`). A connection speaks for
//! one DM, a new one every [`super::run::PER_CONVERSATION`] messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::Request;
use hyper::body::Bytes;
use serde_json::json;
use sha2::Sha256;

use super::run::{Platform, conversation, random_part};

const SECRET: &str = "bench-signing-secret";
static SEQ: AtomicU64 = AtomicU64::new(0);

pub const PLATFORM: Platform = Platform {
    name: "slack",
    config,
    path: "/platforms/slack/bench",
    request,
};

fn config(base: &str) -> String {
    format!(
        "[[platforms.slack]]\nname = \"bench\"\nsigning_secret = \"{SECRET}\"\nbot_token = \"xoxb-1-2-bench\"\napi_base = \"{base}/api\"\nallow_all = true\nchat_rate_limit = \"1000000/min\"\nsend_rate_limit = \"1000000/s\"\n"
    )
}

fn request(conn: usize, n: u64) -> http::Result<Request<Full<Bytes>>> {
    let id = SEQ.fetch_add(1, Ordering::Relaxed);
    let chat = conversation(conn, n);
    let body = json!({
        "token": "unused", "team_id": "T0BENCH", "api_app_id": "A0BENCH",
        "event": {"type": "message", "channel_type": "im", "channel": format!("D{chat:08}"),
            "user": format!("U{chat:08}"), "text": format!("message {id} of the benchmark"),
            "ts": format!("1700000000.{id:06}"), "event_ts": format!("1700000000.{id:06}"),
            "team": "T0BENCH"},
        "type": "event_callback", "event_id": format!("Ev{:016X}", random_part(conn, n)), "event_time": 1_700_000_000,
        "authorizations": [{"team_id": "T0BENCH", "user_id": "U0BOT", "is_bot": true}],
    })
    .to_string();
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .to_string();
    let mut m = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    m.update(format!("v0:{ts}:").as_bytes());
    m.update(body.as_bytes());
    let sig: String = m
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Request::post(PLATFORM.path)
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("x-slack-request-timestamp", ts)
        .header("x-slack-signature", format!("v0={sig}"))
        .body(Full::new(Bytes::from(body)))
}
