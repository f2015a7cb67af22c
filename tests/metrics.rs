//! Prometheus metrics end to end: exact counts after known traffic (HTTP, chat turns,
//! webhooks, a Telegram message, a reload, a drain), histogram buckets, no session or chat
//! id in the scrape, `promtool check metrics` on a scrape and `promtool check rules` on the
//! example alerts, every metric the alerts and the dashboard use present, a real Prometheus
//! scraping the `metrics` listener, and that listener taken from socket activation.

mod common;
mod telegram_support;
mod webhooks_support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use telegram_support::*;
use webhooks_support::*;

const WAIT: Duration = Duration::from_secs(30);
const GH_SECRET: &str = "metrics-test-secret";

/// A tool from Debian's `prometheus` package, or `None` (a skip that says so; never under
/// CI=true, where tests/run-all.sh installs it).
fn prometheus_tool(name: &str) -> Option<String> {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is missing under CI=true: tests/run-all.sh installs Debian's prometheus package"
        );
        eprintln!("SKIP: {name} not found (Debian package `prometheus`); its checks do not run");
    }
    found
}

/// The samples of a Prometheus text scrape: `name{labels}` → value (labels as written).
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn value(s: &HashMap<String, f64>, key: &str) -> f64 {
    *s.get(key)
        .unwrap_or_else(|| panic!("no sample {key} in the scrape; samples: {:#?}", sorted(s)))
}

fn sorted(s: &HashMap<String, f64>) -> Vec<String> {
    let mut v: Vec<String> = s.keys().cloned().collect();
    v.sort();
    v
}

/// Metric names a PromQL text uses (`hermes_gateway_…`, `process_…`).
fn names_used(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text
        .match_indices("hermes_gateway_")
        .chain(text.match_indices("process_"))
    {
        if i > 0 {
            let before = text.as_bytes()[i - 1];
            if before.is_ascii_alphanumeric() || before == b'_' {
                continue;
            }
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.push(name);
    }
    out.sort();
    out.dedup();
    out
}

fn github(hook: std::net::SocketAddr, id: &str, body: &str) -> Response {
    let sig = sign_github(GH_SECRET, body.as_bytes());
    request(
        hook,
        "POST",
        "/webhooks/gh",
        &[
            ("X-GitHub-Delivery", id),
            ("X-GitHub-Event", "push"),
            ("X-Hub-Signature-256", &sig),
        ],
        body,
    )
    .expect("webhook")
}

#[test]
fn a_scrape_counts_known_traffic_exactly_and_names_no_session() {
    let stub = Stub::start();
    let rx = Receiver::start(|_, _| 200);
    let setup = Setup::new("127.0.0.1:0", "");
    let config = format!(
        "[listen]\napi = \"127.0.0.1:0\"\nwebhook = \"127.0.0.1:0\"\nmetrics = \"127.0.0.1:0\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n\
         [[webhook.routes]]\nname = \"gh\"\nscheme = \"github\"\nsecret = \"{GH_SECRET}\"\ntemplate = \"{{{{event}}}}\"\ntarget = {{ type = \"http\", url = \"{}\" }}\n\
         [[schedule]]\nname = \"yearly\"\ncron = \"0 0 1 1 *\"\nprompt = \"happy new year\"\n\
         {}",
        setup.control.display(),
        setup.state.display(),
        rx.url(),
        telegram_config(&stub, "allow_all = true\npoll_timeout = \"1s\"")
    );
    setup.write_config(&config);
    let (gw, api, _n) = start_api(&setup);
    let hook = listener_addr(&setup.control, "webhook");
    let metrics = listener_addr(&setup.control, "metrics");
    let began = jiff::Timestamp::now().as_second() as f64;

    // Known traffic.
    for _ in 0..7 {
        assert_eq!(get(api, "/health").unwrap().status, 200);
    }
    assert_eq!(get(api, "/v1/no/such/route").unwrap().status, 404);
    let sessions = ["secret-session-alpha", "secret-session-beta"];
    for (i, sid) in [sessions[0], sessions[1], sessions[0]].iter().enumerate() {
        let r = request(
            api,
            "POST",
            "/v1/chat/completions",
            &[("X-Hermes-Session-Id", sid)],
            &format!(r#"{{"messages":[{{"role":"user","content":"turn {i}"}}]}}"#),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for id in ["gh-1", "gh-2"] {
        let r = github(hook, id, r#"{"zen":"metrics"}"#);
        assert_eq!(r.status, 202, "{}", r.body);
    }
    const CHAT: i64 = 987_654_321;
    stub.push(text_update(CHAT, 4242, 77, "hello from telegram"));
    stub.wait_delivered(WAIT, |d| !d.is_empty());
    rx.wait_until(WAIT, |r| r.len() >= 2);
    // A reload, counted by result.
    gw.signal(Signal::SIGHUP);
    gw.wait_stderr("configuration reloaded", WAIT);

    // The ledger records a delivery as delivered just after sending it: wait for that.
    let end = Instant::now() + WAIT;
    let (head, text) = loop {
        let (head, text) = control_get(&setup.control, "/metrics", "");
        let s = samples(&text);
        if s.get("hermes_gateway_deliveries{state=\"delivered\"}") == Some(&3.0) {
            break (head, text);
        }
        assert!(
            Instant::now() < end,
            "3 deliveries never delivered:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        head.contains("text/plain; version=0.0.4"),
        "Prometheus text format by default: {head}"
    );
    let s = samples(&text);

    // HTTP, exactly.
    let req = |listener: &str, route: &str, status: u16| {
        value(
            &s,
            &format!(
                "hermes_gateway_http_requests_total{{listener=\"{listener}\",route=\"{route}\",status=\"{status}\"}}"
            ),
        )
    };
    assert_eq!(req("api", "/health", 200), 7.0);
    assert_eq!(req("api", "(unrouted)", 404), 1.0);
    assert_eq!(req("api", "/v1/chat/completions", 200), 3.0);
    assert_eq!(req("webhook", "/webhooks/{route}", 202), 2.0);
    // The histogram of /health: 7 observations, cumulative buckets ending at +Inf.
    let h = |suffix: &str| {
        format!(
            "hermes_gateway_http_request_duration_seconds_{suffix}{{listener=\"api\",route=\"/health\"}}"
        )
    };
    assert_eq!(value(&s, &h("count")), 7.0);
    let sum = value(&s, &h("sum"));
    assert!(sum > 0.0 && sum < 7.0, "{sum}");
    let mut buckets: Vec<(f64, f64)> = s
        .iter()
        .filter_map(|(k, v)| {
            let rest =
                k.strip_prefix("hermes_gateway_http_request_duration_seconds_bucket{le=\"")?;
            let (le, labels) = rest.split_once('"')?;
            (labels == ",listener=\"api\",route=\"/health\"}").then(|| {
                (
                    if le == "+Inf" {
                        f64::INFINITY
                    } else {
                        le.parse().unwrap()
                    },
                    *v,
                )
            })
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(buckets.len(), 16, "{buckets:?}");
    assert!(
        buckets.windows(2).all(|w| w[0].1 <= w[1].1),
        "cumulative: {buckets:?}"
    );
    assert_eq!(buckets.last(), Some(&(f64::INFINITY, 7.0)));
    assert_eq!(
        value(&s, "hermes_gateway_http_connections_open{listener=\"api\"}"),
        0.0,
        "every API connection of the test is closed"
    );

    // Turns: 3 chat turns, 2 webhook runs, 1 Telegram turn; all by the echo agent.
    assert_eq!(
        value(
            &s,
            "hermes_gateway_runs_finished_total{state=\"completed\"}"
        ),
        6.0
    );
    assert_eq!(
        value(&s, "hermes_gateway_runs_finished_total{state=\"failed\"}"),
        0.0
    );
    assert_eq!(
        value(
            &s,
            "hermes_gateway_turn_duration_seconds_count{backend=\"echo\"}"
        ),
        6.0
    );
    assert_eq!(value(&s, "hermes_gateway_sessions_busy"), 0.0);
    // Deliveries: 2 webhook results and 1 chat reply, each delivered at its first attempt.
    assert_eq!(
        value(
            &s,
            "hermes_gateway_delivery_attempts_total{result=\"delivered\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "hermes_gateway_delivery_attempts_total{result=\"retry\"}"
        ),
        0.0
    );
    assert_eq!(
        value(&s, "hermes_gateway_deliveries{state=\"pending\"}"),
        0.0
    );
    assert_eq!(
        value(&s, "hermes_gateway_delivery_oldest_pending_age_seconds"),
        0.0
    );
    // Telegram: one message in, one reply part out, nothing waiting, polling fine.
    let tg = |m: &str, extra: &str| {
        value(
            &s,
            &format!("hermes_gateway_{m}{{platform=\"telegram\",name=\"main\"{extra}}}"),
        )
    };
    assert_eq!(tg("platform_messages_total", ",direction=\"in\""), 1.0);
    assert_eq!(tg("platform_messages_total", ",direction=\"out\""), 1.0);
    assert_eq!(tg("platform_backlog", ""), 0.0);
    assert_eq!(tg("platform_up", ""), 1.0);
    assert!(tg("platform_last_success_seconds", "") >= began - 1.0);
    // The schedule is known and has not run.
    assert_eq!(
        value(
            &s,
            "hermes_gateway_schedule_runs_total{schedule=\"yearly\",outcome=\"completed\"}"
        ),
        0.0
    );
    // Store, lifecycle, process.
    assert!(value(&s, "hermes_gateway_store_commits_total") >= 6.0);
    assert_eq!(
        value(&s, "hermes_gateway_store_commit_duration_seconds_count"),
        value(&s, "hermes_gateway_store_commits_total")
    );
    for kind in ["full", "io", "busy", "readonly", "other"] {
        assert_eq!(
            value(
                &s,
                &format!("hermes_gateway_store_errors_total{{kind=\"{kind}\"}}")
            ),
            0.0
        );
    }
    assert_eq!(
        value(&s, "hermes_gateway_reloads_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        value(
            &s,
            &format!(
                "hermes_gateway_build_info{{version=\"{}\"}}",
                env!("CARGO_PKG_VERSION")
            )
        ),
        1.0
    );
    let kind = status_json(&setup.control)["supervisor"].clone();
    let kind = kind
        .as_str()
        .unwrap_or_else(|| panic!("status names the supervisor: {kind}"));
    assert_eq!(
        value(&s, &format!("hermes_gateway_supervisor{{kind=\"{kind}\"}}")),
        1.0
    );
    let started = value(&s, "hermes_gateway_start_time_seconds");
    assert!((began - started).abs() < 60.0, "{started} vs {began}");
    assert!(value(&s, "process_resident_memory_bytes") > 1e6);
    assert!(value(&s, "process_open_fds") > 5.0);
    assert!(value(&s, "process_cpu_seconds_total") > 0.0);

    // Bounded labels: no session id, chat id, user id or path with an id.
    for secret in sessions.iter().map(|s| s.to_string()).chain([
        CHAT.to_string(),
        "4242".into(),
        "no/such".into(),
        "gh-1".into(),
    ]) {
        assert!(!text.contains(&secret), "{secret} appears in the scrape");
    }

    // The metrics listener serves the same; OpenMetrics when asked for it.
    let r = get(metrics, "/metrics").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains(
        "hermes_gateway_http_requests_total{listener=\"api\",route=\"/health\",status=\"200\"} 7"
    ));
    let (head, om) = control_get(
        &setup.control,
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n",
    );
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(om.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    assert!(om.contains("# TYPE hermes_gateway_http_requests counter"));

    // promtool on the scrape, and on the example alert rules; every name the alerts and the
    // dashboard use is in the scrape.
    if let Some(promtool) = prometheus_tool("promtool") {
        let mut child = Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && said.trim().is_empty(),
            "promtool check metrics: {said}"
        );
        let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/alerts.yml");
        let out = Command::new(&promtool)
            .args(["check", "rules"])
            .arg(&rules)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool check rules: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let exported = |name: &str| {
        families.iter().any(|f| {
            *f == name
                || ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|sfx| name.strip_suffix(sfx) == Some(f))
        })
    };
    for doc in ["docs/alerts.yml", "docs/grafana-dashboard.json"] {
        let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc))
            .unwrap_or_else(|e| panic!("{doc}: {e}"));
        let used = names_used(&text);
        assert!(used.len() >= 3, "{doc} uses {used:?}");
        for name in used {
            assert!(
                exported(&name),
                "{doc} uses {name}, which the gateway does not export"
            );
        }
    }

    // A drain is counted across the restart it ends in.
    let mut gw = gw;
    gw.signal(Signal::SIGTERM);
    assert_eq!(gw.wait(WAIT).code(), Some(0));
    let (_gw, _api, _n) = start_api(&setup);
    let (_, text) = control_get(&setup.control, "/metrics", "");
    let s = samples(&text);
    assert_eq!(value(&s, "hermes_gateway_drains_total{kind=\"stop\"}"), 1.0);
    assert_eq!(
        value(&s, "hermes_gateway_drains_total{kind=\"restart\"}"),
        0.0
    );
    let last = value(&s, "hermes_gateway_last_drain_duration_seconds");
    assert!(last > 0.0 && last < 30.0, "{last}");
    // Counters of a new process start again; the ledger's gauges are read from the store.
    assert_eq!(
        value(&s, "hermes_gateway_deliveries{state=\"delivered\"}"),
        3.0
    );
    assert_eq!(
        value(
            &s,
            "hermes_gateway_runs_finished_total{state=\"completed\"}"
        ),
        0.0
    );
}

/// Prometheus' HTTP API: the value of an instant query's first result, if any.
fn prom_query(addr: std::net::SocketAddr, q: &str) -> Option<f64> {
    let path = format!(
        "/api/v1/query?query={}",
        form_urlencoded::byte_serialize(q.as_bytes()).collect::<String>()
    );
    let r = request(addr, "GET", &path, &[], "").ok()?;
    let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}

#[test]
fn a_real_prometheus_scrapes_the_metrics_listener() {
    let Some(prometheus) = prometheus_tool("prometheus") else {
        return;
    };
    let setup = Setup::new("127.0.0.1:0", "");
    let config = format!(
        "[listen]\napi = \"127.0.0.1:0\"\nwebhook = \"off\"\nmetrics = \"127.0.0.1:0\"\ncontrol = \"{}\"\n[state]\ndir = \"{}\"\n",
        setup.control.display(),
        setup.state.display()
    );
    setup.write_config(&config);
    let (_gw, api, _n) = start_api(&setup);
    let metrics = listener_addr(&setup.control, "metrics");
    const N: usize = 23;
    for _ in 0..N {
        assert_eq!(get(api, "/health").unwrap().status, 200);
    }

    let dir = setup.dir.path();
    let prom_port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n  - job_name: hermes-gateway\n    static_configs:\n      - targets: ['{metrics}']\n",
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("docs/alerts.yml")
                .display()
        ),
    )
    .unwrap();
    let mut server = Command::new(prometheus)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start prometheus");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stderr = server.stderr.take();
    let _server = Kill(server);
    let prom = std::net::SocketAddr::from(([127, 0, 0, 1], prom_port));
    let end = Instant::now() + Duration::from_secs(60);
    let q = "hermes_gateway_http_requests_total{listener=\"api\",route=\"/health\",status=\"200\"}";
    loop {
        let up = prom_query(prom, "up{job=\"hermes-gateway\"}");
        let count = prom_query(prom, q);
        if up == Some(1.0) && count == Some(N as f64) {
            break;
        }
        if Instant::now() > end {
            let mut log = String::new();
            if let Some(mut e) = stderr {
                let _ = nix::fcntl::fcntl(
                    &e,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                );
                let _ = e.read_to_string(&mut log);
            }
            panic!("prometheus saw up={up:?} and {q}={count:?} (wanted 1 and {N}):\n{log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The rules loaded from docs/alerts.yml evaluate without error.
    let r = request(prom, "GET", "/api/v1/rules", &[], "").unwrap();
    let v = r.json();
    let groups = v["data"]["groups"].as_array().expect("rule groups");
    let rules: Vec<&serde_json::Value> = groups
        .iter()
        .flat_map(|g| g["rules"].as_array().into_iter().flatten())
        .collect();
    assert!(rules.len() >= 3, "{v}");
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let v = request(prom, "GET", "/api/v1/rules", &[], "")
            .unwrap()
            .json();
        let rules: Vec<serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(Instant::now() < end, "rules not healthy: {v}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_metrics_listener_is_taken_from_socket_activation() {
    if prometheus_tool("systemd-socket-activate").is_none() {
        return;
    }
    let setup = Setup::new("127.0.0.1:0", "");
    let port = free_port();
    let _gw = setup.spawn_activated(port, "metrics", &[]);
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    // The first connection starts the gateway; it answers on the inherited socket.
    let end = Instant::now() + WAIT;
    let r = loop {
        match get(addr, "/metrics") {
            Ok(r) if r.status == 200 => break r,
            other => {
                assert!(
                    Instant::now() < end,
                    "no scrape on the activated socket: {other:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    assert!(r.body.contains("hermes_gateway_build_info"), "{}", r.body);
    let st = status_json(&setup.control);
    let l = st["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "metrics"))
        .unwrap_or_else(|| panic!("no metrics listener in status: {st}"));
    assert_eq!(l["origin"], "systemd", "{st}");
}
