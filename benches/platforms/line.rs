//! LINE: `POST /platforms/line/bench`, each request one text message event of its own
//! `webhookEventId` (a ULID, as LINE's are), signed (`X-Line-Signature`, base64 HMAC-SHA256 of the body with the
//! channel secret) by the client. A connection speaks for one user, a new one every
//! [`super::run::PER_CONVERSATION`] messages.

use base64::Engine;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::Request;
use hyper::body::Bytes;
use sha2::Sha256;
use std::time::{SystemTime, UNIX_EPOCH};

use super::run::{Platform, conversation, random_part};

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

/// A `webhookEventId` as LINE makes them: a ULID, 26 Crockford base32 digits of the time
/// in milliseconds (48 bits) then 80 random bits, so that they sort by time.
fn ulid(conn: usize, n: u64) -> String {
    const DIGITS: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let v = (ms & 0xffff_ffff_ffff) << 80
        | u128::from(random_part(conn, n)) << 16
        | (conn as u128 & 0xffff);
    (0..26)
        .rev()
        .map(|i| char::from(DIGITS[(v >> (5 * i)) as usize & 31]))
        .collect()
}

fn request(conn: usize, n: u64) -> http::Result<Request<Full<Bytes>>> {
    let user = format!("U{:032x}", conversation(conn, n));
    let event = ulid(conn, n);
    let body = format!(
        r#"{{"destination":"U0123456789abcdef0123456789abcdef","events":[{{"type":"message","mode":"active","timestamp":1767225600000,"source":{{"type":"user","userId":"{user}"}},"webhookEventId":"{event}","deliveryContext":{{"isRedelivery":false}},"replyToken":"r","message":{{"id":"{n}","type":"text","quoteToken":"q","text":"bench message {n} from connection {conn}"}}}}]}}"#
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
