//! LINE: `POST /platforms/line/bench`, each request one text message event of its own
//! `webhookEventId`, signed (`X-Line-Signature`, base64 HMAC-SHA256 of the body with the
//! channel secret) by the client. A connection speaks for one user, a new one every
//! [`PER_CONVERSATION`] messages.

use base64::Engine;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::Request;
use hyper::body::Bytes;
use sha2::Sha256;

use super::run::{PER_CONVERSATION, Platform};

const SECRET: &str = "bench-channel-secret";

pub const PLATFORM: Platform = Platform {
    name: "line",
    config,
    path: "/platforms/line/bench",
    request,
};

fn config(base: &str) -> String {
    format!(
        "[[platforms.line]]\nname = \"bench\"\nchannel_secret = \"{SECRET}\"\nchannel_access_token = \"bench-token\"\napi_base = \"{base}\"\nallow_all = true\nchat_rate_limit = \"1000000/min\"\nsend_rate_limit = \"1000000/s\"\n"
    )
}

fn request(conn: usize, n: u64) -> http::Result<Request<Full<Bytes>>> {
    let user = format!("U{conn:08x}{:024x}", n / PER_CONVERSATION);
    let body = format!(
        r#"{{"destination":"U0123456789abcdef0123456789abcdef","events":[{{"type":"message","mode":"active","timestamp":1767225600000,"source":{{"type":"user","userId":"{user}"}},"webhookEventId":"01HBENCH{conn:06}{n:012}","deliveryContext":{{"isRedelivery":false}},"replyToken":"r","message":{{"id":"{n}","type":"text","quoteToken":"q","text":"bench message {n} from connection {conn}"}}}}]}}"#
    );
    let mut m = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("hmac key");
    m.update(body.as_bytes());
    let sig = base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes());
    Request::post(PLATFORM.path)
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("x-line-signature", sig)
        .body(Full::new(Bytes::from(body)))
}
