//! Property tests (proptest) for every parser of outside input: the configuration (any
//! TOML: a configuration or an error naming the file, never a panic), signature headers
//! of every scheme, webhook templates, Telegram updates, reply chunking, and — through the
//! real binary — the request bodies of every route.
//!
//! CI runs the default number of cases (`PROPTEST_CASES`, 256 unless set); the long run
//! is `PROPTEST_CASES=20000 cargo test --release --test properties`.

mod common;

use std::path::Path;
use std::time::Duration;

use hermes_gateway::config::{Config, TelegramConfig, Template};
use hermes_gateway::gateway::platforms::chunk;
use hermes_gateway::gateway::platforms::telegram::Telegram;
use hermes_gateway::gateway::webhooks::signature;
use hermes_gateway::gateway::webhooks::template::{Input, render};
use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use serde_json::Value;

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
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
