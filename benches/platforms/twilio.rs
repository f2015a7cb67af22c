//! Twilio SMS: `POST /platforms/twilio/bench`, each request the form Twilio posts for an
//! incoming SMS (20 parameters, its own `MessageSid`), signed (`X-Twilio-Signature`, base64
//! HMAC-SHA1 of the public URL and the sorted parameters with the auth token) by the
//! client, answered with the empty TwiML. A connection speaks for one number, a new one
//! every [`PER_CONVERSATION`] messages.

use base64::Engine;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::Request;
use hyper::body::Bytes;
use sha1::Sha1;

use super::run::{PER_CONVERSATION, Platform, random_part};

const SID: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "9f86d081884c7d659a2feaa0c55ad015";
const URL: &str = "https://bench.example.org/platforms/twilio/bench";

pub const PLATFORM: Platform = Platform {
    name: "twilio",
    config,
    path: "/platforms/twilio/bench",
    request,
};

fn config(base: &str) -> String {
    format!(
        "[[platforms.twilio]]\nname = \"bench\"\naccount_sid = \"{SID}\"\nauth_token = \"{TOKEN}\"\nfrom = \"+15550001111\"\npublic_url = \"{URL}\"\napi_base = \"{base}\"\nallow_all = true\nchat_rate_limit = \"1000000/min\"\nsend_rate_limit = \"1000000/s\"\n"
    )
}

fn request(conn: usize, n: u64) -> http::Result<Request<Full<Bytes>>> {
    let sid = format!(
        "SM{:016x}{:016x}",
        random_part(conn, n),
        random_part(conn, !n)
    );
    let from = format!("+1{:03}{:07}", 200 + conn, n / PER_CONVERSATION);
    let text = format!("bench message {n} from connection {conn}");
    let mut params: Vec<(&str, &str)> = vec![
        ("ToCountry", "US"),
        ("ToState", "CA"),
        ("SmsMessageSid", &sid),
        ("NumMedia", "0"),
        ("ToCity", "SAN FRANCISCO"),
        ("FromZip", "94105"),
        ("SmsSid", &sid),
        ("FromState", "CA"),
        ("SmsStatus", "received"),
        ("FromCity", "SAN FRANCISCO"),
        ("Body", &text),
        ("FromCountry", "US"),
        ("To", "+15550001111"),
        ("ToZip", "94105"),
        ("NumSegments", "1"),
        ("MessageSid", &sid),
        ("AccountSid", SID),
        ("From", &from),
        ("ApiVersion", "2010-04-01"),
        ("MessagingServiceSid", ""),
    ];
    let mut form = form_urlencoded::Serializer::new(String::new());
    for (k, v) in &params {
        form.append_pair(k, v);
    }
    let body = form.finish();
    params.sort_unstable();
    let mut m = Hmac::<Sha1>::new_from_slice(TOKEN.as_bytes()).expect("hmac key");
    m.update(URL.as_bytes());
    for (k, v) in &params {
        m.update(k.as_bytes());
        m.update(v.as_bytes());
    }
    let sig = base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes());
    Request::post(PLATFORM.path)
        .header("host", "bench.example.org")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-twilio-signature", sig)
        .body(Full::new(Bytes::from(body)))
}
