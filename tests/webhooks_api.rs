//! The webhook listener end to end: the three signature schemes against the real binary,
//! duplicates, every refusal status, the result delivered to an http target with the
//! gateway's own signature, and the ledger over the API and the CLI.

mod common;
mod webhooks_support;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use webhooks_support::*;

const T: Duration = Duration::from_secs(20);
const GH_SECRET: &str = "It's a Secret to Everybody";
const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

fn start(setup: &Setup, routes: &str) -> (Gateway, SocketAddr, SocketAddr) {
    setup.write_config(&format!(
        "[listen]\napi = \"127.0.0.1:0\"\nwebhook = \"127.0.0.1:0\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n{routes}",
        setup.control.display(),
        setup.state.display()
    ));
    let (gw, api, _n) = start_api(setup);
    let hook = listener_addr(&setup.control, "webhook");
    (gw, api, hook)
}

fn post(addr: SocketAddr, route: &str, headers: &[(&str, &str)], body: &str) -> Response {
    request(addr, "POST", &format!("/webhooks/{route}"), headers, body).unwrap()
}

fn github(addr: SocketAddr, route: &str, id: &str, body: &str) -> Response {
    let sig = sign_github(GH_SECRET, body.as_bytes());
    post(
        addr,
        route,
        &[
            ("X-GitHub-Delivery", id),
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sig),
        ],
        body,
    )
}

fn cli(setup: &Setup, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("deliveries")
        .args(args)
        .arg("--socket")
        .arg(&setup.control)
        .output()
        .unwrap()
}

#[test]
fn signed_deliveries_are_accepted_once_and_bad_ones_refused_with_reasons() {
    let rx = Receiver::start(|_, _| 200);
    let setup = Setup::new("127.0.0.1:0", "");
    let routes = format!(
        r#"
[[webhook.routes]]
name = "gh"
scheme = "github"
secret = "{GH_SECRET}"
template = "{{event}} on {{body.repository.full_name}}"
session = "repo-{{body.repository.name}}"
target = {{ type = "http", url = "{url}" }}

[[webhook.routes]]
name = "sw"
scheme = "standard-webhooks"
secret = "{SW_SECRET}"
template = "payment {{body.test}}"
target = {{ type = "http", url = "{url}", secret = "gateway-own-secret" }}

[[webhook.routes]]
name = "tok"
scheme = "token"
header = "X-Gitlab-Token"
secret_file = "{dir}/token"
rate_limit = "2/min"

[[webhook.routes]]
name = "small"
scheme = "github"
secret = "{GH_SECRET}"
max_body = 64
"#,
        url = rx.url(),
        dir = setup.dir.path().display()
    );
    std::fs::write(setup.dir.path().join("token"), "gl-token\n").unwrap();
    let (gw, api, hook) = start(&setup, &routes);

    // 404: no such route.
    let r = github(hook, "nope", "x", "{}");
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(r.json()["error"], "unknown_route");

    // github: accepted once, then a duplicate that names the same delivery.
    let body = r#"{"repository": {"full_name": "octo/hello", "name": "hello"}}"#;
    let a = github(hook, "gh", "gh-1", body);
    assert_eq!(a.status, 202, "{}", a.body);
    assert_eq!(a.json()["status"], "accepted");
    let id = a.json()["delivery_id"].as_str().unwrap().to_owned();
    let d = github(hook, "gh", "gh-1", body);
    assert_eq!(d.status, 200, "{}", d.body);
    assert_eq!(d.json()["status"], "duplicate");
    assert_eq!(d.json()["delivery_id"], id.as_str());

    // 401: wrong secret, tampered body, missing signature.
    let bad = sign_github("another secret", body.as_bytes());
    let r = post(
        hook,
        "gh",
        &[("X-GitHub-Delivery", "gh-2"), ("X-Hub-Signature-256", &bad)],
        body,
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"], "invalid_signature");
    let good = sign_github(GH_SECRET, body.as_bytes());
    let r = post(
        hook,
        "gh",
        &[
            ("X-GitHub-Delivery", "gh-2"),
            ("X-Hub-Signature-256", &good),
        ],
        &body.replace("hello", "HELLO"),
    );
    assert_eq!(r.status, 401, "{}", r.body);
    let r = post(hook, "gh", &[("X-GitHub-Delivery", "gh-2")], body);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"], "missing_signature");

    // 422: the template needs a field this body lacks; or the body is not JSON.
    let r = github(hook, "gh", "gh-3", r#"{"zen": "keep it simple"}"#);
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("repository.full_name"),
        "{}",
        r.body
    );
    let r = github(hook, "gh", "gh-4", "not json");
    assert_eq!(r.status, 422, "{}", r.body);

    // standard-webhooks: fresh timestamp accepted; a stale one refused, saying so.
    let sw_body = r#"{"test": 2432232314}"#;
    let now = unix_now();
    let sig = sign_standard(SW_SECRET, "msg_1", now, sw_body.as_bytes());
    let ts = now.to_string();
    let r = post(
        hook,
        "sw",
        &[
            ("webhook-id", "msg_1"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &sig),
        ],
        sw_body,
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let sw_id = r.json()["delivery_id"].as_str().unwrap().to_owned();
    let old = now - 600;
    let sig = sign_standard(SW_SECRET, "msg_2", old, sw_body.as_bytes());
    let ts = old.to_string();
    let r = post(
        hook,
        "sw",
        &[
            ("webhook-id", "msg_2"),
            ("webhook-timestamp", &ts),
            ("webhook-signature", &sig),
        ],
        sw_body,
    );
    assert_eq!(r.status, 401, "{}", r.body);
    assert_eq!(r.json()["error"], "stale_timestamp");
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("replay window")
    );

    // 413 over the route's limit.
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(100));
    let r = github(hook, "small", "s-1", &big);
    assert_eq!(r.status, 413, "{}", r.body);

    // token scheme, with a rate limit of 2 a minute: the third is 429 with Retry-After.
    for i in 0..2 {
        let r = post(
            hook,
            "tok",
            &[("X-Gitlab-Token", "gl-token")],
            &format!("{{\"n\": {i}}}"),
        );
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let r = post(hook, "tok", &[("X-Gitlab-Token", "gl-token")], "{}");
    assert_eq!(r.status, 429, "{}", r.body);
    let after: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&after), "{after}");

    // The results arrive at the receiver: the delivery id as Idempotency-Key, signed.
    let got = rx.wait_until(T, |g| g.len() >= 2);
    let gh = got
        .iter()
        .find(|g| g.header("idempotency-key") == Some(id.as_str()))
        .expect("the github delivery's result");
    assert_eq!(gh.body["source_id"], "gh-1");
    assert_eq!(gh.body["event"], "push");
    assert_eq!(gh.body["status"], "completed");
    assert_eq!(gh.body["output"], "push on octo/hello", "{}", gh.body);
    assert_eq!(gh.body["session_id"], "repo-hello");
    // Signed with the route's secret (no target secret given) ...
    assert!(verify_gateway_signature(gh, GH_SECRET), "{:?}", gh.headers);
    // ... or with the target's own.
    let sw = got
        .iter()
        .find(|g| g.header("idempotency-key") == Some(sw_id.as_str()))
        .expect("the standard-webhooks delivery's result");
    assert_eq!(sw.body["output"], "payment 2432232314");
    assert!(verify_gateway_signature(sw, "gateway-own-secret"));
    assert!(!verify_gateway_signature(sw, SW_SECRET));

    // The ledger over the API and the CLI.
    let end = std::time::Instant::now() + T;
    loop {
        let l = request(api, "GET", "/v1/deliveries?state=delivered", &[], "")
            .unwrap()
            .json();
        if l["data"].as_array().unwrap().len() >= 4 {
            let one = l["data"]
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["id"] == id.as_str())
                .unwrap()
                .clone();
            assert_eq!(one["attempts"], 1);
            assert_eq!(one["route"], "gh");
            break;
        }
        assert!(std::time::Instant::now() < end, "{l}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = request(api, "GET", "/v1/deliveries?state=bogus", &[], "").unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    let out = cli(&setup, &["list", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["counts"]["delivered"], 4, "{v}");
    let out = cli(&setup, &["list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    let out = cli(&setup, &["retry", "dlv_nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no delivery"));

    // Every refusal was logged with its route and delivery id; nothing panicked.
    let log = gw.stderr();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("stale timestamp"), "{log}");
}

#[test]
fn a_route_without_a_secret_is_refused_unless_insecure_on_loopback() {
    let setup = Setup::new("127.0.0.1:0", "");
    let check = |listen: &str, route: &str| {
        setup.write_config(&format!(
            "[listen]\nwebhook = \"{listen}\"\n[state]\ndir = \"{}\"\n[[webhook.routes]]\nname = \"r\"\nscheme = \"github\"\n{route}",
            setup.state.display()
        ));
        std::process::Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&setup.config)
            .output()
            .unwrap()
    };
    let out = check("127.0.0.1:8644", "");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("has no secret"));
    let out = check("0.0.0.0:8644", "insecure = true\n");
    assert_eq!(out.status.code(), Some(78));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a loopback"));
    let out = check("127.0.0.1:8644", "insecure = true\n");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = check("127.0.0.1:8644", "secret = \"s\"\ntemplate = \"{body.\"\n");
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn routes_reload_on_sighup() {
    let setup = Setup::new("127.0.0.1:0", "");
    let route = |name: &str| {
        format!(
            "[[webhook.routes]]\nname = \"{name}\"\nscheme = \"github\"\nsecret = \"{GH_SECRET}\"\n"
        )
    };
    let (gw, _api, hook) = start(&setup, &route("first"));
    assert_eq!(github(hook, "first", "1", "{}").status, 202);
    assert_eq!(github(hook, "second", "1", "{}").status, 404);
    // The listener is now fixed (port 0 bound once): keep it across the reload.
    setup.write_config(&format!(
        "[listen]\napi = \"127.0.0.1:0\"\nwebhook = \"{hook}\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n{}",
        setup.control.display(),
        setup.state.display(),
        route("second")
    ));
    let before = status_json(&setup.control)["config_generation"].clone();
    gw.signal(nix::sys::signal::Signal::SIGHUP);
    let end = std::time::Instant::now() + T;
    while status_json(&setup.control)["config_generation"] == before {
        assert!(std::time::Instant::now() < end);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(github(hook, "second", "1", "{}").status, 202);
    assert_eq!(github(hook, "first", "2", "{}").status, 404);
}

/// Ended deliveries older than `[webhook] retention` are pruned with their runs (at start,
/// then hourly); newer ones and open ones stay.
#[test]
fn ended_deliveries_older_than_the_retention_are_pruned_at_start() {
    let setup = Setup::new("127.0.0.1:0", "");
    let route = "[[webhook.routes]]\nname = \"gh\"\nscheme = \"github\"\nsecret = \"It's a Secret to Everybody\"\n";
    let (mut gw, api, hook) = start(&setup, route);
    for id in ["old", "new"] {
        assert_eq!(github(hook, "gh", id, "{}").status, 202);
    }
    let end = std::time::Instant::now() + T;
    let delivered = loop {
        let l = request(api, "GET", "/v1/deliveries?state=delivered", &[], "")
            .unwrap()
            .json();
        if l["data"].as_array().unwrap().len() == 2 {
            break l;
        }
        assert!(std::time::Instant::now() < end, "{l}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let old = delivered["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["source_id"] == "old")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    gw.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(gw.wait(T).success());
    // Age one delivery past the default retention (7 days) while the gateway is stopped.
    let db = rusqlite::Connection::open(setup.state.join("gateway.db")).unwrap();
    let eight_days_ago = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 8 * 24 * 3600 * 1000;
    let run: String = db
        .query_row(
            "UPDATE deliveries SET updated_at = ?2, received_at = ?2 WHERE id = ?1 RETURNING run_id",
            rusqlite::params![old, eight_days_ago],
            |r| r.get(0),
        )
        .unwrap();
    drop(db);

    let (gw, api, _hook) = start(&setup, route);
    gw.wait_stderr("1 deliveries older than [webhook] retention pruned", T);
    let l = request(api, "GET", "/v1/deliveries", &[], "")
        .unwrap()
        .json();
    let left: Vec<&str> = l["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["source_id"].as_str().unwrap())
        .collect();
    assert_eq!(left, ["new"], "{l}");
    let r = request(api, "GET", &format!("/v1/runs/{run}"), &[], "").unwrap();
    assert_eq!(
        r.status, 404,
        "the pruned delivery's run went with it: {}",
        r.body
    );
}
