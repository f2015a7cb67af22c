//! WhatsApp Cloud API: `messages` webhooks of one text message each, as Meta posts them,
//! each with its own `wamid`, signed with the app secret (`X-Hub-Signature-256: sha256=`
//! HMAC-SHA256 of the body). A connection speaks for one number, a new one every
//! [`super::run::PER_CONVERSATION`] messages.

use std::sync::atomic::{AtomicU64, Ordering};

use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::Request;
use hyper::body::Bytes;
use serde_json::json;
use sha2::Sha256;

use super::run::{Platform, conversation, random_part};

const SECRET: &str = "bench-app-secret";
const PHONE_ID: &str = "106540352242922";
static SEQ: AtomicU64 = AtomicU64::new(0);

pub const PLATFORM: Platform = Platform {
    name: "whatsapp",
    config,
    path: "/platforms/whatsapp/bench",
    request,
};

fn config(base: &str) -> String {
    format!(
        "[[platforms.whatsapp]]\nname = \"bench\"\nverify_token = \"bench\"\napp_secret = \"{SECRET}\"\naccess_token = \"EAAGbench\"\nphone_number_id = \"{PHONE_ID}\"\napi_base = \"{base}\"\nallow_all = true\nchat_rate_limit = \"1000000/min\"\nsend_rate_limit = \"1000000/s\"\n"
    )
}

fn request(conn: usize, n: u64) -> http::Result<Request<Full<Bytes>>> {
    let id = SEQ.fetch_add(1, Ordering::Relaxed);
    let from = format!("{}", 15_550_000_000u64 + conversation(conn, n));
    let body = json!({
        "object": "whatsapp_business_account",
        "entry": [{"id": "102290129340398", "changes": [{"field": "messages", "value": {
            "messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550100000", "phone_number_id": PHONE_ID},
            "contacts": [{"profile": {"name": "Bench"}, "wa_id": from}],
            "messages": [{"from": from, "id": format!("wamid.HBgL{:016x}{:016x}", random_part(conn, n), id),
                "timestamp": "1700000000", "type": "text",
                "text": {"body": format!("message {id} of the benchmark")}}]}}]}],
    })
    .to_string();
    let mut m = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
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
        .header("x-hub-signature-256", format!("sha256={sig}"))
        .body(Full::new(Bytes::from(body)))
}
