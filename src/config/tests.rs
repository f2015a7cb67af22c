use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(Path::new("/etc/hermes-gateway/gateway.toml"), text)
}

#[test]
fn empty_file_keeps_every_default() {
    let c = parse("").expect("empty config is valid");
    assert_eq!(c.listen.api, ListenAddr::parse(DEFAULT_API).unwrap());
    assert_eq!(
        c.listen.webhook,
        ListenAddr::parse(DEFAULT_WEBHOOK).unwrap()
    );
    assert_eq!(c.drain_timeout, Duration::from_secs(30));
    assert_eq!(c.listen.socket_mode, 0o600);
}

#[test]
fn a_file_changes_only_what_it_names() {
    let c = parse(
        "[listen]\napi = \"127.0.0.1:0\"\ncontrol = \"/tmp/x/control.sock\"\n[gateway]\ndrain_timeout = \"250ms\"\n[state]\ndir = \"/var/lib/x\"\n",
    )
    .expect("valid");
    assert_eq!(
        c.listen.api,
        ListenAddr::Tcp("127.0.0.1:0".parse().unwrap())
    );
    assert_eq!(
        c.listen.webhook,
        ListenAddr::parse(DEFAULT_WEBHOOK).unwrap()
    );
    assert_eq!(
        c.listen.control,
        ListenAddr::Unix(PathBuf::from("/tmp/x/control.sock"))
    );
    assert_eq!(c.drain_timeout, Duration::from_millis(250));
    assert_eq!(c.state_dir, PathBuf::from("/var/lib/x"));
}

#[test]
fn unknown_key_names_file_key_and_line() {
    let e = parse("[gateway]\n\ndrain_timout = \"30s\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("/etc/hermes-gateway/gateway.toml"), "{e}");
    assert!(e.contains("drain_timout"), "{e}");
    assert!(e.contains("drain_timeout"), "expected keys are listed: {e}");
    assert!(e.contains("line 3"), "{e}");
}

#[test]
fn bad_duration_names_key_and_expectation() {
    let e = parse("[gateway]\ndrain_timeout = \"soon\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("gateway.drain_timeout"), "{e}");
    assert!(e.contains("\"30s\""), "{e}");
    assert!(e.contains("line 2"), "{e}");
}

#[test]
fn bad_address_names_key() {
    let e = parse("[listen]\napi = \"localhost\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("listen.api"), "{e}");
    assert!(e.contains("host:port"), "{e}");
}

#[test]
fn wrong_type_names_key() {
    let e = parse("[listen]\napi = 8642\n").unwrap_err().to_string();
    assert!(e.contains("listen.api"), "{e}");
}

#[test]
fn syntax_error_names_file_and_line() {
    let e = parse("[listen\napi = 1\n").unwrap_err().to_string();
    assert!(e.contains("gateway.toml"), "{e}");
    assert!(e.contains("line 1"), "{e}");
}

#[test]
fn unreadable_file_names_path() {
    let e = Config::load(Path::new("/nonexistent/hermes.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("/nonexistent/hermes.toml"), "{e}");
}

#[test]
fn socket_mode_is_octal() {
    assert_eq!(
        parse("[listen]\nsocket_mode = \"0660\"\n")
            .unwrap()
            .listen
            .socket_mode,
        0o660
    );
    let e = parse("[listen]\nsocket_mode = \"rw\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("listen.socket_mode"), "{e}");
}

#[test]
fn bad_log_level_is_rejected() {
    let e = parse("[log]\nlevel = \"loud=!!\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("log.level"), "{e}");
}

#[test]
fn listen_addr_forms() {
    assert_eq!(ListenAddr::parse("off"), Ok(ListenAddr::Off));
    assert_eq!(
        ListenAddr::parse("unix:/run/x.sock"),
        Ok(ListenAddr::Unix("/run/x.sock".into()))
    );
    assert!(ListenAddr::parse("unix:relative.sock").is_err());
    assert!(matches!(
        ListenAddr::parse("[::1]:0"),
        Ok(ListenAddr::Tcp(_))
    ));
}

#[test]
fn agent_api_and_sessions_default_to_echo_open_loopback_and_64_runs() {
    let c = parse("").unwrap();
    assert_eq!(c.agent.backend, AgentBackend::Echo);
    assert_eq!(c.agent.model, "hermes-agent");
    assert!(!c.api.has_keys());
    assert_eq!(c.api.max_body, 1024 * 1024);
    assert_eq!(c.api.body_timeout, Duration::from_secs(30));
    assert_eq!(c.api.keepalive, Duration::from_secs(15));
    assert_eq!(
        c.api.response_retention,
        Duration::from_secs(30 * 24 * 3600)
    );
    assert_eq!(c.sessions.max_concurrent_runs, 64);
    assert_eq!(c.sessions.queue_depth, 16);
}

#[test]
fn openai_backend_takes_url_key_source_and_timeouts() {
    let c = parse(
        "[agent]\nbackend = \"openai\"\nbase_url = \"http://127.0.0.1:8000/v1/\"\nmodel = \"m\"\napi_key_env = \"UPSTREAM_KEY\"\nidle_timeout = \"5s\"\nretries = 0\n",
    )
    .unwrap();
    let AgentBackend::OpenAi(o) = &c.agent.backend else {
        panic!("{:?}", c.agent.backend)
    };
    assert_eq!(o.base_url, "http://127.0.0.1:8000/v1");
    assert_eq!(o.key, Some(KeySource::Env("UPSTREAM_KEY".into())));
    assert_eq!(o.idle_timeout, Duration::from_secs(5));
    assert_eq!(o.retries, 0);
    assert_eq!(c.agent.model, "m");
}

#[test]
fn openai_backend_without_base_url_names_the_key() {
    let e = parse("[agent]\nbackend = \"openai\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("agent.base_url"), "{e}");
    assert!(e.contains("gateway.toml"), "{e}");
    let e = parse("[agent]\nbackend = \"openai\"\nbase_url = \"ftp://x\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("http://"), "{e}");
}

#[test]
fn a_key_given_two_ways_is_refused() {
    let e = parse(
        "[agent]\nbackend = \"openai\"\nbase_url = \"http://h/v1\"\napi_key_env = \"A\"\napi_key_file = \"/k\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("one way only"), "{e}");
}

#[test]
fn command_backend_needs_an_argv() {
    let c =
        parse("[agent]\nbackend = \"command\"\ncommand = [\"/bin/agent\", \"--fast\"]\n").unwrap();
    assert_eq!(
        c.agent.backend,
        AgentBackend::Command {
            argv: vec!["/bin/agent".into(), "--fast".into()]
        }
    );
    let e = parse("[agent]\nbackend = \"command\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("agent.command"), "{e}");
    let e = parse("[agent]\nbackend = \"shell\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("agent.backend"), "{e}");
}

#[test]
fn non_loopback_api_needs_a_key() {
    let e = parse("[listen]\napi = \"0.0.0.0:8642\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("listen.api") && e.contains("loopback"), "{e}");
    let c = parse("[listen]\napi = \"0.0.0.0:8642\"\n[api]\nkeys = [\"k\"]\n").unwrap();
    assert!(c.api.has_keys());
    assert!(
        !format!("{c:?}").contains("\"k\""),
        "keys are redacted in Debug"
    );
    parse("[listen]\napi = \"0.0.0.0:8642\"\n[api]\nkeys_credential = \"api-keys\"\n").unwrap();
}

#[test]
fn sizes_and_limits_are_checked() {
    assert_eq!(
        parse("[api]\nmax_body = \"2MiB\"\n").unwrap().api.max_body,
        2 << 20
    );
    assert_eq!(
        parse("[api]\nmax_body = 4096\n").unwrap().api.max_body,
        4096
    );
    let e = parse("[api]\nmax_body = \"lots\"\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("api.max_body") && e.contains("1MiB"), "{e}");
    let e = parse("[sessions]\nmax_concurrent_runs = 0\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("sessions.max_concurrent_runs"), "{e}");
    let e = parse("[sessions]\nqueue = 3\n").unwrap_err().to_string();
    assert!(e.contains("queue_depth"), "expected keys are listed: {e}");
}

#[test]
fn webhook_retention_defaults_to_a_week_and_may_not_be_shorter_than_the_dedup_window() {
    let c = parse("").expect("valid");
    assert_eq!(c.webhook.retention, Duration::from_secs(7 * 24 * 3600));
    let c = parse("[webhook]\nretention = \"30d\"\n").expect("valid");
    assert_eq!(c.webhook.retention, Duration::from_secs(30 * 24 * 3600));
    let e = parse("[webhook]\ndedup_window = \"48h\"\nretention = \"24h\"\n")
        .expect_err("retention shorter than the dedup window");
    let text = e.to_string();
    assert!(
        text.contains("/etc/hermes-gateway/gateway.toml")
            && text.contains("`webhook.retention`")
            && text.contains("at least webhook.dedup_window (172800s)"),
        "{text}"
    );
}

#[test]
fn api_keepalive_and_response_retention_are_read_and_checked() {
    let c = parse("[api]\nkeepalive = \"2s\"\nresponse_retention = \"1h\"\n").expect("valid");
    assert_eq!(c.api.keepalive, Duration::from_secs(2));
    assert_eq!(c.api.response_retention, Duration::from_secs(3600));
    let e = parse("[api]\nkeepalive = \"0s\"\n").expect_err("a zero keepalive");
    assert!(e.to_string().contains("api.keepalive"), "{e}");
    let e = parse("[api]\nresponse_retention = \"0s\"\n").expect_err("a zero retention");
    assert!(e.to_string().contains("api.response_retention"), "{e}");
}
