//! Property tests (proptest) for every parser of outside input: the configuration (any
//! TOML: a configuration or an error naming the file, never a panic), signature headers
//! of every scheme (webhooks, Slack, WhatsApp, LINE, Twilio), webhook templates, the
//! payloads of every platform (Telegram updates, Slack events, WhatsApp Cloud webhooks,
//! LINE webhooks, Twilio forms), an `openai` upstream's SSE in chunks of any size, reply
//! chunking, and — through the real binary — the request bodies of every route.
//!
//! CI runs the default number of cases (`PROPTEST_CASES`, 256 unless set); the long run
//! is `PROPTEST_CASES=20000 cargo test --release --test properties`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::LazyLock;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hermes_gateway::config::{Config, TelegramConfig, Template};
use hermes_gateway::gateway::agents::sse::{Item, SseParser, StreamError};
use hermes_gateway::gateway::platforms::chunk;
use hermes_gateway::gateway::platforms::line::Line;
use hermes_gateway::gateway::platforms::slack::Slack;
use hermes_gateway::gateway::platforms::telegram::Telegram;
use hermes_gateway::gateway::platforms::twilio::Twilio;
use hermes_gateway::gateway::platforms::webhook::{Refused, Request, Taken, WebhookInbox};
use hermes_gateway::gateway::platforms::whatsapp::WhatsApp;
use hermes_gateway::gateway::webhooks::signature;
use hermes_gateway::gateway::webhooks::template::{Input, render};
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::prelude::*;
use serde_json::{Value, json};

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("update_id".to_owned()),
                    Just("message".to_owned()),
                    Just("chat".to_owned()),
                    Just("id".to_owned()),
                    Just("type".to_owned()),
                    Just("from".to_owned()),
                    Just("text".to_owned()),
                    Just("entities".to_owned()),
                    Just("reply_to_message".to_owned()),
                    Just("is_topic_message".to_owned()),
                    Just("message_thread_id".to_owned()),
                    "[a-z_]{1,12}",
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// TOML text around the configuration's own sections and keys, with values of any type.
fn toml_text() -> impl Strategy<Value = String> {
    let section = prop_oneof![
        Just("listen"),
        Just("state"),
        Just("gateway"),
        Just("log"),
        Just("agent"),
        Just("api"),
        Just("sessions"),
        Just("webhook"),
        Just("[webhook.routes]"),
        Just("[platforms.telegram]"),
        Just("[schedule]"),
        Just("nonsense"),
    ];
    const KEYS: &[&str] = &[
        "api",
        "webhook",
        "control",
        "dir",
        "drain_timeout",
        "max_connections",
        "level",
        "backend",
        "command",
        "base_url",
        "keys",
        "max_body",
        "queue_depth",
        "name",
        "scheme",
        "secret",
        "template",
        "token",
        "mode",
        "webhook_secret",
        "allowed_users",
        "cron",
        "timezone",
        "prompt",
        "deliver",
        "missed",
        "rate_limit",
        "nonsense_key",
    ];
    let key = prop::sample::select(KEYS);
    let value = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,20}".prop_map(|s| format!("{:?}", s)),
        Just("\"127.0.0.1:0\"".to_owned()),
        Just("\"30s\"".to_owned()),
        Just("\"1:A\"".to_owned()),
        Just("\"*/5 * * * *\"".to_owned()),
        Just("[1, \"x\"]".to_owned()),
        Just("{ type = \"http\" }".to_owned()),
    ];
    prop::collection::vec((section, prop::collection::vec((key, value), 0..5)), 0..5).prop_map(
        |sections| {
            let mut t = String::new();
            for (name, kv) in sections {
                t.push_str(&format!("[{name}]\n"));
                for (k, v) in kv {
                    t.push_str(&format!("{k} = {v}\n"));
                }
            }
            t
        },
    )
}

fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_str(v) {
            h.insert(HeaderName::from_static(k), v);
        }
    }
    h
}

fn telegram() -> Telegram {
    let cfg = Config::parse(
        Path::new("/t.toml"),
        "[[platforms.telegram]]\nname = \"main\"\ntoken = \"123:AAx\"\nallow_all = true\nusername = \"bot\"\n",
    )
    .expect("valid");
    let t: &TelegramConfig = &cfg.platforms.telegram[0];
    Telegram::new(t).expect("a telegram")
}

proptest! {
    #[test]
    fn any_configuration_text_is_a_configuration_or_an_error_naming_the_file(text in toml_text()) {
        if let Err(e) = Config::parse(Path::new("/etc/hermes-gateway/gateway.toml"), &text) {
            prop_assert!(e.to_string().contains("/etc/hermes-gateway/gateway.toml"), "{e}");
        }
    }

    #[test]
    fn any_text_at_all_parses_or_is_refused(text in ".{0,200}") {
        let _ = Config::parse(Path::new("/x.toml"), &text);
    }

    #[test]
    fn signature_headers_never_panic_and_only_the_right_one_verifies(
        secret in prop::collection::vec(any::<u8>(), 1..40),
        body in prop::collection::vec(any::<u8>(), 0..300),
        noise in "[ -~]{0,80}",
        ts in any::<i64>(),
    ) {
        let good = signature::sign_github(&secret, &body);
        prop_assert!(signature::verify_github(&secret, &headers(&[("x-hub-signature-256", good.clone())]), &body).is_ok());
        prop_assert!(signature::verify_github(&secret, &headers(&[("x-hub-signature-256", noise.clone())]), &body).is_err());
        let mut tampered = body.clone();
        tampered.push(b'x');
        prop_assert!(signature::verify_github(&secret, &headers(&[("x-hub-signature-256", good)]), &tampered).is_err());
        let key = signature::standard_key(&String::from_utf8_lossy(&secret));
        let now = ts.clamp(0, 4_000_000_000);
        let sig = signature::sign_standard(&key, "msg_1", now, &body);
        let h = headers(&[("webhook-id", "msg_1".into()), ("webhook-timestamp", now.to_string()), ("webhook-signature", sig)]);
        prop_assert!(signature::verify_standard(&key, &h, &body, now, 300).is_ok());
        let h = headers(&[("webhook-id", noise.clone()), ("webhook-timestamp", noise.clone()), ("webhook-signature", noise.clone())]);
        prop_assert!(signature::verify_standard(&key, &h, &body, now, 300).is_err());
        let h = headers(&[("x-token", noise.clone())]);
        let same = noise.as_bytes() == secret.as_slice();
        prop_assert_eq!(signature::verify_token(&secret, "x-token", &h).is_ok(), same && HeaderValue::from_str(&noise).is_ok());
    }

    #[test]
    fn templates_parse_or_are_refused_and_render_any_body(
        text in "[{}a-z. ]{0,40}",
        body in json(),
    ) {
        if let Ok(t) = Template::parse(&text) {
            let raw = body.to_string();
            let input = Input { body: raw.as_bytes(), json: Some(&body), event: "e", route: "r", source_id: "s" };
            let _ = render(&t, &input);
            let input = Input { body: b"\xff\xfe", json: None, event: "", route: "", source_id: "" };
            let _ = render(&t, &input);
        }
    }

    #[test]
    fn any_telegram_update_is_taken_or_let_go(update in json()) {
        let t = telegram();
        if let Ok(m) = t.map(&update) {
            prop_assert!(!m.text.trim().is_empty());
            prop_assert!(m.chat_key.starts_with("telegram:main:"));
        }
    }

    #[test]
    fn replies_are_split_within_any_limit_without_losing_a_word(
        text in "(\\PC|\\n|```py\\n| ){0,600}",
        limit in 16usize..300,
    ) {
        let parts = chunk::split(&text, limit, chunk::utf16);
        for p in &parts {
            prop_assert!(p.encode_utf16().count() <= limit);
        }
        let words = |s: &str| -> String {
            s.split_whitespace().filter(|w| !w.starts_with("```")).collect::<Vec<_>>().concat()
        };
        prop_assert_eq!(words(&parts.join(" ")), words(&text));
    }
}

/// An address, a path and the headers to send.
type Route = (
    std::net::SocketAddr,
    &'static str,
    &'static [(&'static str, &'static str)],
);

/// Request bodies of every route, through the real binary: any body gets an answer below
/// 500 (or 503 from a store that is busy), and the gateway keeps serving.
#[test]
fn any_request_body_gets_a_clear_answer_and_the_gateway_keeps_serving() {
    use common::*;
    let setup = Setup::new(
        "127.0.0.1:0",
        "[[webhook.routes]]\nname = \"gh\"\nscheme = \"github\"\nsecret = \"s\"\ntemplate = \"{body.a}\"\n\
         [[platforms.telegram]]\nname = \"main\"\ntoken = \"123:AAx\"\nmode = \"webhook\"\nwebhook_secret = \"sec\"\napi_base = \"http://127.0.0.1:9\"\nusername = \"bot\"\nallow_all = true\n",
    );
    let text = std::fs::read_to_string(&setup.config)
        .unwrap()
        .replace("webhook = \"off\"", "webhook = \"127.0.0.1:0\"");
    setup.write_config(&text);
    let (_gw, api, _n) = start_api(&setup);
    let hook = listener_addr(&setup.control, "webhook");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|c| c.parse::<u32>().ok())
        .unwrap_or(256)
        .min(5000);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(cases));
    let routes: [Route; 6] = [
        (api, "/v1/chat/completions", &[]),
        (api, "/v1/runs", &[]),
        (api, "/v1/deliveries/x/retry", &[]),
        (
            hook,
            "/webhooks/gh",
            &[("X-Hub-Signature-256", "sha256=00")],
        ),
        (
            hook,
            "/platforms/telegram/main",
            &[("X-Telegram-Bot-Api-Secret-Token", "sec")],
        ),
        (hook, "/platforms/telegram/main", &[]),
    ];
    let strategy = (
        0usize..routes.len(),
        prop_oneof![json().prop_map(|v| v.to_string()), "\\PC{0,300}"],
    );
    runner
        .run(&strategy, |(i, body)| {
            let (addr, path, headers) = routes[i];
            let r = request(addr, "POST", path, headers, &body).expect("an answer");
            prop_assert!(
                r.status < 500 || r.status == 503,
                "{path} answered {} to {body:?}: {}",
                r.status,
                r.body
            );
            if r.status >= 400 {
                prop_assert!(
                    r.body.is_empty() || serde_json::from_str::<Value>(&r.body).is_ok(),
                    "a JSON error: {}",
                    r.body
                );
            }
            Ok(())
        })
        .unwrap();
    let r = wait_healthy(api, Duration::from_secs(5));
    assert_eq!(r.status, 200);
}

// ---------------------------------------------------------------------------------------
// An `openai` upstream's server-sent events.

/// What a parser reads from `chunks`: its items (as text) and how it ended (whether the
/// stream said its reply was whole).
fn read_sse(chunks: &[&[u8]], max: usize) -> (Vec<String>, Result<bool, StreamError>) {
    let mut p = SseParser::new(max);
    let mut items = Vec::new();
    let mut on = |i: Item<'_>| items.push(format!("{i:?}"));
    let mut end = Ok(());
    for c in chunks {
        end = p.feed(c, &mut on);
        if end.is_err() {
            break;
        }
    }
    if end.is_ok() {
        end = p.finish(&mut on);
    }
    (items, end.map(|()| p.is_complete()))
}

/// `bytes` cut at `cuts`.
fn split_at<'a>(bytes: &'a [u8], cuts: &[prop::sample::Index]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
    at.sort_unstable();
    let mut pieces = Vec::new();
    let mut from = 0;
    for a in at {
        pieces.push(&bytes[from..a]);
        from = a;
    }
    pieces.push(&bytes[from..]);
    pieces
}

/// Bytes made of what a stream holds (fields, line ends, chunks, `[DONE]`) and of any bytes.
fn sse_bytes() -> impl Strategy<Value = Vec<u8>> {
    let token = prop_oneof![
        Just(b"data: ".to_vec()),
        Just(b"data:".to_vec()),
        Just(b"event: hermes.tool.progress".to_vec()),
        Just(b"event: message".to_vec()),
        Just(b"id: 3".to_vec()),
        Just(b": keepalive".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"[DONE]".to_vec()),
        Just(br#"{"choices":[{"delta":{"content":"a"}}]}"#.to_vec()),
        Just(br#"{"choices":[{"delta":{"reasoning_content":"r"},"finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#.to_vec()),
        Just(br#"{"error":{"message":"x"}}"#.to_vec()),
        Just(br#"{"tool":"t","#.to_vec()),
        Just(b"\"n\":1}".to_vec()),
        prop::collection::vec(any::<u8>(), 0..12),
    ];
    prop::collection::vec(token, 0..40).prop_map(|v| v.concat())
}

/// A piece of a well-formed stream.
#[derive(Debug, Clone)]
enum Piece {
    Text(String),
    Reasoning(String),
    Event(String, Value),
    Comment(String),
    Usage(u64, u64),
    Finish(String),
}

fn piece() -> impl Strategy<Value = Piece> {
    let text = "(\\PC|\\n|\\r|\"|\\\\){0,20}";
    prop_oneof![
        4 => text.prop_map(Piece::Text),
        1 => text.prop_map(Piece::Reasoning),
        1 => ("[a-z][a-z.]{0,15}", text, any::<u32>())
            .prop_filter("not the default name", |(n, _, _)| n != "message")
            .prop_map(|(n, t, k)| Piece::Event(n, json!({"tool": t, "n": k}))),
        1 => "[ -~]{0,20}".prop_map(Piece::Comment),
        1 => (any::<u32>(), any::<u32>()).prop_map(|(p, c)| Piece::Usage(p.into(), c.into())),
        1 => prop_oneof![Just("stop".to_owned()), Just("length".to_owned())].prop_map(Piece::Finish),
    ]
}

/// A stream of `pieces` (data pretty-printed over several lines, or not; LF or CRLF), and
/// the items it must read as.
fn render_stream(pieces: &[Piece], crlf: bool, pretty: bool) -> (Vec<u8>, Vec<String>) {
    use hermes_gateway::gateway::agents::Usage;
    let nl = if crlf { "\r\n" } else { "\n" };
    let mut out = String::new();
    let mut expected = Vec::new();
    let data = |out: &mut String, v: &Value| -> String {
        let text = if pretty {
            serde_json::to_string_pretty(v).unwrap()
        } else {
            v.to_string()
        };
        for line in text.split('\n') {
            out.push_str(&format!("data: {line}{nl}"));
        }
        out.push_str(nl);
        text
    };
    let chunk = |delta: Value, finish: Value| json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    for p in pieces {
        match p {
            Piece::Text(t) => {
                data(&mut out, &chunk(json!({"content": t}), Value::Null));
                if !t.is_empty() {
                    expected.push(format!("{:?}", Item::Text(t)));
                }
            }
            Piece::Reasoning(t) => {
                data(
                    &mut out,
                    &chunk(json!({"reasoning_content": t}), Value::Null),
                );
                if !t.is_empty() {
                    expected.push(format!("{:?}", Item::Reasoning(t)));
                }
            }
            Piece::Event(name, v) => {
                out.push_str(&format!("event: {name}{nl}"));
                let text = data(&mut out, v);
                expected.push(format!("{:?}", Item::Event { name, data: &text }));
            }
            Piece::Comment(c) => out.push_str(&format!(":{c}{nl}")),
            Piece::Usage(p, c) => {
                let mut v = chunk(json!({}), Value::Null);
                v["choices"] = json!([]);
                v["usage"] =
                    json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});
                data(&mut out, &v);
                expected.push(format!(
                    "{:?}",
                    Item::Usage(Usage {
                        prompt_tokens: *p,
                        completion_tokens: *c,
                        total_tokens: p + c
                    })
                ));
            }
            Piece::Finish(f) => {
                data(&mut out, &chunk(json!({}), Value::from(f.as_str())));
                expected.push(format!("{:?}", Item::Finish(f)));
            }
        }
    }
    out.push_str(&format!("data: [DONE]{nl}{nl}"));
    expected.push(format!("{:?}", Item::Done));
    (out.into_bytes(), expected)
}

proptest! {
    #[test]
    fn any_bytes_in_any_chunks_read_as_they_do_whole(
        bytes in sse_bytes(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        max in 8usize..400,
    ) {
        let whole = read_sse(&[bytes.as_slice()], max);
        let split = read_sse(&split_at(&bytes, &cuts), max);
        prop_assert_eq!(split, whole);
    }

    #[test]
    fn well_formed_events_split_anywhere_read_as_their_deltas(
        pieces in prop::collection::vec(piece(), 0..12),
        crlf in any::<bool>(),
        pretty in any::<bool>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let (bytes, expected) = render_stream(&pieces, crlf, pretty);
        let whole = read_sse(&[bytes.as_slice()], 1 << 20);
        prop_assert_eq!(&whole, &(expected, Ok(true)));
        let split = read_sse(&split_at(&bytes, &cuts), 1 << 20);
        prop_assert_eq!(&split, &whole);
        let bytewise: Vec<&[u8]> = bytes.chunks(1).collect();
        prop_assert_eq!(&read_sse(&bytewise, 1 << 20), &whole);
    }
}

// ---------------------------------------------------------------------------------------
// The other platforms' payloads and signatures.

const SLACK_SECRET: &str = "8f742231b10e8888abcd99aa00bb85a5";
const WA_APP_SECRET: &str = "0123456789abcdefAPPSECRETxyz";
const WA_VERIFY_TOKEN: &str = "verify-me-VERIFYxyz";
const WA_PHONE_ID: &str = "106540352242922";
const LINE_SECRET: &str = "0123456789abcdef0123456789abcdef";
const TWILIO_TOKEN: &str = "9f86d081884c7d659a2feaa0c55ad015";
const TWILIO_FROM: &str = "+15550001111";
const TWILIO_URL: &str = "https://sms.example.org/platforms/twilio/main";

fn config(text: &str) -> Config {
    Config::parse(Path::new("/t.toml"), text).expect("valid")
}

static SLACK: LazyLock<Slack> = LazyLock::new(|| {
    let c = config(&format!(
        "[[platforms.slack]]\nname = \"work\"\nsigning_secret = \"{SLACK_SECRET}\"\nbot_token = \"xoxb-1234-5678-TESTtokenSECRET\"\nallow_all = true\n"
    ));
    Slack::new(&c.platforms.slack[0]).expect("a slack")
});

static WHATSAPP: LazyLock<WhatsApp> = LazyLock::new(|| {
    let c = config(&format!(
        "[[platforms.whatsapp]]\nname = \"biz\"\nverify_token = \"{WA_VERIFY_TOKEN}\"\napp_secret = \"{WA_APP_SECRET}\"\naccess_token = \"EAAGtestACCESStokenSECRETxyz\"\nphone_number_id = \"{WA_PHONE_ID}\"\nallow_all = true\n"
    ));
    WhatsApp::new(&c.platforms.whatsapp[0]).expect("a whatsapp")
});

static LINE: LazyLock<Line> = LazyLock::new(|| {
    let c = config(&format!(
        "[[platforms.line]]\nname = \"main\"\nchannel_secret = \"{LINE_SECRET}\"\nchannel_access_token = \"line-test-access-token/0123456789+abcdefghij=\"\nallow_all = true\n"
    ));
    Line::new(&c.platforms.line[0]).expect("a line")
});

static TWILIO: LazyLock<Twilio> = LazyLock::new(|| {
    let c = config(&format!(
        "[[platforms.twilio]]\nname = \"main\"\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token = \"{TWILIO_TOKEN}\"\nfrom = \"{TWILIO_FROM}\"\npublic_url = \"{TWILIO_URL}\"\nallow_all = true\n"
    ));
    Twilio::new(&c.platforms.twilio[0]).expect("a twilio")
});

/// `template` with each field kept (its strings sometimes changed), dropped, or replaced
/// by any JSON: payloads near the shape a platform sends, and far from it.
fn shaped(t: Value) -> BoxedStrategy<Value> {
    match t {
        Value::Object(m) => {
            let fields: Vec<BoxedStrategy<Option<(String, Value)>>> = m
                .into_iter()
                .map(|(k, v)| {
                    let k2 = k.clone();
                    prop_oneof![
                        8 => shaped(v).prop_map(move |v| Some((k.clone(), v))),
                        1 => Just(None::<(String, Value)>),
                        1 => json().prop_map(move |v| Some((k2.clone(), v))),
                    ]
                    .boxed()
                })
                .collect();
            fields
                .prop_map(|fs| Value::Object(fs.into_iter().flatten().collect()))
                .boxed()
        }
        Value::Array(a) => {
            let items: Vec<BoxedStrategy<Value>> = a.into_iter().map(shaped).collect();
            (items, prop::collection::vec(json(), 0..2))
                .prop_map(|(mut v, extra)| {
                    v.extend(extra);
                    Value::Array(v)
                })
                .boxed()
        }
        Value::String(s) => prop_oneof![
            6 => Just(Value::String(s)),
            1 => "\\PC{0,24}".prop_map(Value::from),
            1 => Just(Value::from("")),
        ]
        .boxed(),
        // Numbers at their edges too: offsets and ids that overflow what they are added to.
        Value::Number(n) => prop_oneof![
            4 => Just(Value::Number(n)),
            1 => prop_oneof![Just(0u64), Just(u64::MAX), Just(1 << 63)].prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => any::<i64>().prop_map(Value::from),
            1 => json(),
        ]
        .boxed(),
        other => prop_oneof![4 => Just(other), 1 => json()].boxed(),
    }
}

fn slack_templates() -> Vec<Value> {
    vec![
        json!({"type": "event_callback", "event_id": "Ev1", "team_id": "T0TEST",
            "authorizations": [{"user_id": "U0BOT", "is_bot": true}],
            "event": {"type": "app_mention", "channel": "C1", "user": "U1", "ts": "1.2",
                "thread_ts": "1.1", "text": "<@U0BOT> hi &amp; <https://x.org|x> <#C2|general>",
                "user_profile": {"display_name": "Al"}}}),
        json!({"type": "event_callback", "event_id": "Ev2", "authed_users": ["U0BOT"],
            "event": {"type": "message", "channel": "D1", "channel_type": "im", "user": "U1",
                "ts": "3.4", "subtype": "file_share", "text": "a file"}}),
        json!({"type": "url_verification", "challenge": "abc", "token": "t"}),
    ]
}

fn whatsapp_templates() -> Vec<Value> {
    vec![
        json!({"object": "whatsapp_business_account", "entry": [{"id": "1", "changes": [{
        "field": "messages",
        "value": {"messaging_product": "whatsapp",
            "metadata": {"display_phone_number": "15550001111", "phone_number_id": WA_PHONE_ID},
            "contacts": [{"profile": {"name": "Al"}, "wa_id": "15551234567"}],
            "messages": [
                {"from": "15551234567", "id": "wamid.1", "timestamp": "1", "type": "text", "text": {"body": "hi"}},
                {"from": "15551234567", "id": "wamid.2", "type": "image", "image": {"caption": "look"}},
                {"from": "15551234567", "id": "wamid.3", "type": "interactive", "interactive": {"button_reply": {"title": "yes"}}},
                {"from": "15551234567", "id": "wamid.4", "type": "audio", "audio": {"voice": true}},
                {"from": "15551234567", "id": "wamid.5", "type": "button", "button": {"text": "ok"}}
            ],
            "statuses": [{"id": "wamid.x", "status": "read"}]}}]}]}),
    ]
}

fn line_templates() -> Vec<Value> {
    vec![json!({"destination": "Ubot", "events": [
        {"type": "message", "webhookEventId": "01HX", "deliveryContext": {"isRedelivery": false},
            "mode": "active", "timestamp": 1_700_000_000_000_u64,
            "source": {"type": "user", "userId": "U1234"}, "replyToken": "r",
            "message": {"id": "m1", "type": "text", "text": "hello"}},
        {"type": "message", "webhookEventId": "01HY", "deliveryContext": {"isRedelivery": true},
            "mode": "active", "source": {"type": "group", "groupId": "C1234", "userId": "U1234"},
            "message": {"id": "m2", "type": "text", "text": "@Hermes hi",
                "mention": {"mentionees": [{"index": 0, "length": 7, "isSelf": true}]}}},
        {"type": "message", "webhookEventId": "01HZ", "mode": "active",
            "source": {"type": "room", "roomId": "R1234", "userId": "U9"},
            "message": {"id": "m3", "type": "text", "text": "x @Hermes",
                "mention": {"mentionees": [{"index": 2, "length": 7, "isSelf": true}]}}}
    ]})]
}

fn one_of_shaped(templates: Vec<Value>) -> impl Strategy<Value = Value> {
    prop::strategy::Union::new(templates.into_iter().map(shaped))
}

/// A form of Twilio's parameters (and others), in any order, any of them missing.
fn twilio_form() -> impl Strategy<Value = Vec<(String, String)>> {
    let name = prop_oneof![
        Just("MessageSid".to_owned()),
        Just("Body".to_owned()),
        Just("From".to_owned()),
        Just("To".to_owned()),
        Just("NumMedia".to_owned()),
        Just("MessageStatus".to_owned()),
        "\\PC{0,8}",
    ];
    let value = prop_oneof![
        Just("SM0123".to_owned()),
        Just("+15551234567".to_owned()),
        Just(TWILIO_FROM.to_owned()),
        Just("  ".to_owned()),
        "\\PC{0,30}",
    ];
    prop::collection::vec((name, value), 0..8)
}

fn form_body(params: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

/// A read that takes messages takes only ones it can run, under the instance's keys; one
/// that refuses says the sender is wrong (4xx), never the gateway.
fn check_read(r: Result<Taken, Refused>, prefix: &str) -> Result<usize, TestCaseError> {
    match r {
        Ok(t) => {
            for m in &t.messages {
                prop_assert!(m.chat_key.starts_with(prefix), "{}", m.chat_key);
                prop_assert!(!m.source_id.is_empty());
                prop_assert!(
                    !m.text.trim().is_empty() || m.unsupported.is_some(),
                    "{m:?}"
                );
            }
            Ok(t.messages.len())
        }
        Err(e) => {
            prop_assert!(e.status.is_client_error(), "{e:?}");
            Ok(0)
        }
    }
}

fn read(inbox: &dyn WebhookInbox, headers: &HeaderMap, body: &[u8]) -> Result<Taken, Refused> {
    let method = Method::POST;
    inbox.read(&Request {
        method: &method,
        headers,
        body,
        query: None,
    })
}

fn verify(inbox: &dyn WebhookInbox, headers: &HeaderMap, body: &[u8]) -> Result<(), Refused> {
    let method = Method::POST;
    inbox.verify(&Request {
        method: &method,
        headers,
        body,
        query: None,
    })
}

fn form_headers() -> HeaderMap {
    headers(&[("content-type", "application/x-www-form-urlencoded".into())])
}

#[test]
fn the_payload_templates_are_taken_as_they_are() {
    // Otherwise the properties below would only ever see what is let go.
    let none = HeaderMap::new();
    let taken = |inbox: &dyn WebhookInbox, v: &Value| {
        read(inbox, &none, v.to_string().as_bytes())
            .map(|t| t.messages.len())
            .unwrap()
    };
    let s = slack_templates();
    assert_eq!(taken(&*SLACK, &s[0]), 1);
    assert_eq!(taken(&*SLACK, &s[1]), 1);
    assert_eq!(taken(&*WHATSAPP, &whatsapp_templates()[0]), 5);
    assert_eq!(taken(&*LINE, &line_templates()[0]), 3);
    let form = [
        ("MessageSid", "SM1"),
        ("From", "+15551234567"),
        ("Body", "hi"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let t = read(&*TWILIO, &form_headers(), form_body(&form).as_bytes()).unwrap();
    assert_eq!(t.messages.len(), 1);
}

/// Any bytes as a header value (those a header cannot hold leave it out).
fn raw_headers(pairs: &[(&'static str, &[u8])]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        if let Ok(v) = HeaderValue::from_bytes(v) {
            h.insert(HeaderName::from_static(k), v);
        }
    }
    h
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hmac256(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut m = Hmac::<sha2::Sha256>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

fn twilio_signature(url: &str, params: &BTreeMap<String, String>) -> String {
    let mut text = url.to_owned();
    for (k, v) in params {
        text.push_str(k);
        text.push_str(v);
    }
    let mut m = Hmac::<sha1::Sha1>::new_from_slice(TWILIO_TOKEN.as_bytes()).unwrap();
    m.update(text.as_bytes());
    B64.encode(m.finalize().into_bytes())
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

proptest! {
    #[test]
    fn any_slack_event_is_taken_or_let_go(
        v in one_of_shaped(slack_templates()),
        raw in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let none = HeaderMap::new();
        check_read(read(&*SLACK, &none, v.to_string().as_bytes()), "slack:work:")?;
        check_read(read(&*SLACK, &none, &raw), "slack:work:")?;
    }

    #[test]
    fn any_whatsapp_webhook_is_taken_or_let_go(
        v in one_of_shaped(whatsapp_templates()),
        raw in prop::collection::vec(any::<u8>(), 0..200),
        query in "(hub\\.(mode|verify_token|challenge)=(subscribe|verify-me-VERIFYxyz|[0-9]{1,6}|%[0-9A-Fa-f]{0,2}|\\PC{0,8})&?){0,4}",
    ) {
        let none = HeaderMap::new();
        check_read(read(&*WHATSAPP, &none, v.to_string().as_bytes()), "whatsapp:biz:")?;
        check_read(read(&*WHATSAPP, &none, &raw), "whatsapp:biz:")?;
        // Meta's GET of the callback URL: answered, or refused; the challenge back only
        // to the right token.
        match WHATSAPP.get(Some(&query)) {
            Some(Ok(_)) => prop_assert!(query.contains(&format!("hub.verify_token={WA_VERIFY_TOKEN}")), "{query}"),
            Some(Err(e)) => prop_assert!(e.status.is_client_error()),
            None => prop_assert!(false, "a GET is answered"),
        }
    }

    #[test]
    fn any_line_webhook_is_taken_or_let_go(
        v in one_of_shaped(line_templates()),
        raw in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let none = HeaderMap::new();
        check_read(read(&*LINE, &none, v.to_string().as_bytes()), "line:main:")?;
        check_read(read(&*LINE, &none, &raw), "line:main:")?;
    }

    #[test]
    fn any_twilio_form_is_taken_or_let_go(
        params in twilio_form(),
        raw in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let form = form_headers();
        let n = check_read(read(&*TWILIO, &form, form_body(&params).as_bytes()), "twilio:main:")?;
        if n == 1 {
            let from = params.iter().find(|(k, _)| k == "From").map(|(_, v)| v.as_str());
            prop_assert!(from != Some(TWILIO_FROM), "its own number is not taken: {params:?}");
        }
        check_read(read(&*TWILIO, &form, &raw), "twilio:main:")?;
        // Not a form: refused whatever it holds.
        prop_assert!(read(&*TWILIO, &HeaderMap::new(), form_body(&params).as_bytes()).is_err());
    }

    #[test]
    fn platform_signatures_never_panic_and_only_the_right_one_verifies(
        secret in prop::collection::vec(any::<u8>(), 1..40),
        body in prop::collection::vec(any::<u8>(), 0..300),
        noise in prop::collection::vec(any::<u8>(), 0..90),
        ts in any::<i64>(),
        skew in -600i64..600,
        params in prop::collection::btree_map("[ -~]{0,10}", "\\PC{0,20}", 0..6),
    ) {
        let mut tampered = body.clone();
        tampered.push(b'x');

        // Slack v0, over any secret and clock.
        let sign = |ts: &str, body: &[u8]| format!("v0={}", hex(&hmac256(&secret, &[&b"v0:"[..], ts.as_bytes(), &b":"[..], body])));
        let t = ts.to_string();
        let good = sign(&t, &body);
        let h = |sig: &[u8], ts: &[u8]| raw_headers(&[("x-slack-signature", sig), ("x-slack-request-timestamp", ts)]);
        let now = ts.saturating_add(skew);
        let r = signature::verify_slack(&secret, &h(good.as_bytes(), t.as_bytes()), &body, now, 300);
        prop_assert_eq!(r.is_ok(), (now - ts).abs() <= 300, "{:?}", r);
        prop_assert!(signature::verify_slack(&secret, &h(good.as_bytes(), t.as_bytes()), &tampered, ts, 300).is_err());
        prop_assert!(signature::verify_slack(&secret, &h(&noise, t.as_bytes()), &body, ts, 300).is_err());
        prop_assert!(signature::verify_slack(&secret, &h(good.as_bytes(), &noise), &body, ts, 300).is_err() || String::from_utf8_lossy(&noise).trim() == t);
        // And through the Slack instance, now.
        let now = now_secs().to_string();
        let sig = format!("v0={}", hex(&hmac256(SLACK_SECRET.as_bytes(), &[&b"v0:"[..], now.as_bytes(), &b":"[..], &body])));
        prop_assert!(verify(&*SLACK, &h(sig.as_bytes(), now.as_bytes()), &body).is_ok());
        prop_assert!(verify(&*SLACK, &h(sig.as_bytes(), now.as_bytes()), &tampered).is_err());
        prop_assert!(verify(&*SLACK, &h(&noise, now.as_bytes()), &body).is_err());

        // WhatsApp: X-Hub-Signature-256 with the app secret.
        let sig = format!("sha256={}", hex(&hmac256(WA_APP_SECRET.as_bytes(), &[&body])));
        let h = |v: &[u8]| raw_headers(&[("x-hub-signature-256", v)]);
        prop_assert!(verify(&*WHATSAPP, &h(sig.as_bytes()), &body).is_ok());
        prop_assert!(verify(&*WHATSAPP, &h(sig.as_bytes()), &tampered).is_err());
        prop_assert!(verify(&*WHATSAPP, &h(&noise), &body).is_err());
        prop_assert!(verify(&*WHATSAPP, &HeaderMap::new(), &body).is_err());

        // LINE: X-Line-Signature, base64 with the channel secret.
        let sig = B64.encode(hmac256(LINE_SECRET.as_bytes(), &[&body]));
        let h = |v: &[u8]| raw_headers(&[("x-line-signature", v)]);
        prop_assert!(verify(&*LINE, &h(sig.as_bytes()), &body).is_ok());
        prop_assert!(verify(&*LINE, &h(sig.as_bytes()), &tampered).is_err());
        prop_assert!(verify(&*LINE, &h(&noise), &body).is_err());
        prop_assert!(verify(&*LINE, &HeaderMap::new(), &body).is_err());

        // Twilio: X-Twilio-Signature over the URL and the sorted parameters.
        let form: Vec<(String, String)> = params.clone().into_iter().collect();
        let fbody = form_body(&form);
        let sig = twilio_signature(TWILIO_URL, &params);
        let h = |v: &[u8]| {
            let mut h = raw_headers(&[("x-twilio-signature", v)]);
            h.insert("content-type", HeaderValue::from_static("application/x-www-form-urlencoded"));
            h
        };
        prop_assert!(verify(&*TWILIO, &h(sig.as_bytes()), fbody.as_bytes()).is_ok());
        // The URL with its default port written out is the same URL.
        let port = twilio_signature("https://sms.example.org:443/platforms/twilio/main", &params);
        prop_assert!(verify(&*TWILIO, &h(port.as_bytes()), fbody.as_bytes()).is_ok());
        let other = twilio_signature("https://sms.example.org/platforms/twilio/other", &params);
        prop_assert!(verify(&*TWILIO, &h(other.as_bytes()), fbody.as_bytes()).is_err());
        let mut more = params.clone();
        more.insert("Injected".into(), "1".into());
        prop_assert!(verify(&*TWILIO, &h(sig.as_bytes()), form_body(&more.into_iter().collect::<Vec<_>>()).as_bytes()).is_err());
        prop_assert!(verify(&*TWILIO, &h(&noise), fbody.as_bytes()).is_err());
    }
}
