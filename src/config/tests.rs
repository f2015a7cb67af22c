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

const TG: &str = "[[platforms.telegram]]\nname = \"main\"\ntoken = \"123456:AAabc_def-1\"\n";

#[test]
fn a_telegram_instance_takes_its_defaults() {
    let c = parse(&format!(
        "{TG}allowed_users = [42, \"43\"]\nadmins = [42]\n"
    ))
    .expect("valid");
    let t = &c.platforms.telegram[0];
    assert_eq!(t.name, "main");
    assert_eq!(t.mode, TelegramMode::Polling);
    assert_eq!(t.api_base, "https://api.telegram.org");
    assert_eq!(t.access.allowed_users, ["42", "43"]);
    assert_eq!(t.access.admins, ["42"]);
    assert_eq!(t.group_sessions, GroupSessions::PerUser);
    assert_eq!(t.poll_timeout, Duration::from_secs(50));
    assert!(t.markdown);
    assert_eq!(
        format!("{:?}", t.token),
        "Inline([redacted])",
        "the token never prints"
    );
}

fn telegram_error(extra: &str) -> String {
    parse(extra).unwrap_err().to_string()
}

#[test]
fn telegram_configuration_errors_name_the_file_and_the_key() {
    let cases = [
        (
            "[[platforms.telegram]]\nname = \"main\"\n".to_owned(),
            "platforms.telegram[0].token",
            "no bot token",
        ),
        (
            format!("{TG}mode = \"webhook\"\n"),
            "platforms.telegram[0].webhook_secret",
            "webhook mode without a secret",
        ),
        (
            format!("{TG}{TG}"),
            "platforms.telegram[1].name",
            "defined twice",
        ),
        (
            "[[platforms.telegram]]\nname = \"main\"\ntoken = \"not-a-token\"\n".to_owned(),
            "platforms.telegram[0].token",
            "123456789:AA",
        ),
        (
            format!("{TG}token_file = \"/etc/t\"\n"),
            "platforms.telegram[0].token_file",
            "one way only",
        ),
        (
            format!("{TG}mode = \"webhook\"\nwebhook_secret = \"has spaces\"\n"),
            "platforms.telegram[0].webhook_secret",
            "A-Z, a-z, 0-9",
        ),
        (
            format!("{TG}allow_all = true\nallowed_users = [1]\n"),
            "platforms.telegram[0].allow_all",
            "keep one",
        ),
        (
            format!("{TG}api_base = \"ftp://x\"\n"),
            "platforms.telegram[0].api_base",
            "http",
        ),
        (
            format!("{TG}chat_rate_limit = \"lots\"\n"),
            "platforms.telegram[0].chat_rate_limit",
            "N/min",
        ),
        (
            format!("{TG}mode = \"carrier-pigeon\"\n"),
            "platforms.telegram[0].mode",
            "polling",
        ),
        (
            "[[platforms.telegram]]\nname = \"a/b\"\ntoken = \"1:A\"\n".to_owned(),
            "platforms.telegram[0].name",
            "/platforms/telegram/NAME",
        ),
    ];
    for (text, key, why) in cases {
        let e = telegram_error(&text);
        assert!(e.contains("/etc/hermes-gateway/gateway.toml"), "{e}");
        assert!(e.contains(key), "{key}: {e}");
        assert!(e.contains(why), "{why}: {e}");
        assert!(!e.contains("AAabc_def"), "no secret in {e}");
    }
}

const SLACK: &str = "[[platforms.slack]]\nname = \"work\"\nsigning_secret = \"8f742231b10e8888abcd99yyyzzz85a5\"\nbot_token = \"xoxb-1-2-SECRETxyz\"\n";

#[test]
fn a_slack_instance_takes_its_defaults() {
    let c = parse(&format!("{SLACK}allowed_users = [\"U012AB3CD\"]\n")).expect("valid");
    let s = &c.platforms.slack[0];
    assert_eq!(s.name, "work");
    assert_eq!(s.api_base, "https://slack.com/api");
    assert_eq!(s.access.allowed_users, ["U012AB3CD"]);
    assert_eq!(s.send_rate_limit.count, 20);
    assert_eq!(s.chat_rate_limit.per, Duration::from_secs(60));
    let shown = format!("{s:?}");
    assert!(
        !shown.contains("SECRETxyz") && !shown.contains("8f742231"),
        "the secrets never print: {shown}"
    );
}

#[test]
fn slack_configuration_errors_name_the_file_and_the_key() {
    let cases = [
        (
            "[[platforms.slack]]\nname = \"work\"\nbot_token = \"xoxb-1-2-SECRETxyz\"\n".to_owned(),
            "platforms.slack[0].signing_secret",
            "no signing secret",
        ),
        (
            "[[platforms.slack]]\nname = \"work\"\nsigning_secret = \"s\"\n".to_owned(),
            "platforms.slack[0].bot_token",
            "no bot token",
        ),
        (
            "[[platforms.slack]]\nname = \"work\"\nsigning_secret = \"s\"\nbot_token = \"xoxp-user-SECRETxyz\"\n".to_owned(),
            "platforms.slack[0].bot_token",
            "xoxb-",
        ),
        (
            format!("{SLACK}bot_token_file = \"/etc/t\"\n"),
            "platforms.slack[0].bot_token_file",
            "one way only",
        ),
        (
            format!("{SLACK}signing_secret_credential = \"slack\"\n"),
            "platforms.slack[0].signing_secret_credential",
            "one way only",
        ),
        (
            format!("{SLACK}{SLACK}"),
            "platforms.slack[1].name",
            "defined twice",
        ),
        (
            format!("{SLACK}api_base = \"slack.com\"\n"),
            "platforms.slack[0].api_base",
            "http",
        ),
        (
            format!("{SLACK}allow_all = true\nallowed_users = [\"U1\"]\n"),
            "platforms.slack[0].allow_all",
            "keep one",
        ),
        (
            format!("{SLACK}send_rate_limit = \"fast\"\n"),
            "platforms.slack[0].send_rate_limit",
            "N/s",
        ),
        (
            format!("{SLACK}verify_token = \"x\"\n"),
            "platforms.slack[0]",
            "verify_token",
        ),
        (
            "[[platforms.slack]]\nname = \"\"\nsigning_secret = \"s\"\nbot_token = \"xoxb-1\"\n".to_owned(),
            "platforms.slack[0].name",
            "/platforms/slack/NAME",
        ),
    ];
    for (text, key, why) in cases {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("/etc/hermes-gateway/gateway.toml"), "{e}");
        assert!(e.contains(key), "{key}: {e}");
        assert!(e.contains(why), "{why}: {e}");
        assert!(
            !e.contains("SECRETxyz") && !e.contains("8f742231"),
            "no secret in {e}"
        );
    }
}

const WA: &str = "[[platforms.whatsapp]]\nname = \"biz\"\nverify_token = \"VERIFYxyz\"\napp_secret = \"APPSECRETxyz\"\naccess_token = \"EAAGSECRETxyz\"\nphone_number_id = \"106540352242922\"\n";

#[test]
fn a_whatsapp_instance_takes_its_defaults() {
    let c = parse(&format!(
        "{WA}allowed_users = [\"16315551234\", 447700900123]\n"
    ))
    .expect("valid");
    let w = &c.platforms.whatsapp[0];
    assert_eq!(w.name, "biz");
    assert_eq!(w.api_base, "https://graph.facebook.com");
    assert_eq!(w.api_version, "v21.0");
    assert_eq!(w.phone_number_id, "106540352242922");
    assert_eq!(w.access.allowed_users, ["16315551234", "447700900123"]);
    assert_eq!(w.send_rate_limit.count, 80);
    let shown = format!("{w:?}");
    assert!(
        !shown.contains("SECRETxyz") && !shown.contains("VERIFYxyz"),
        "{shown}"
    );
    // A number id may be written as a TOML integer.
    let c = parse(&WA.replace("\"106540352242922\"", "106540352242922")).expect("valid");
    assert_eq!(c.platforms.whatsapp[0].phone_number_id, "106540352242922");
}

#[test]
fn whatsapp_configuration_errors_name_the_file_and_the_key() {
    let without = |key: &str| {
        WA.lines()
            .filter(|l| !l.starts_with(&format!("{key} =")))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n"
    };
    let cases = [
        (
            without("verify_token"),
            "platforms.whatsapp[0].verify_token",
            "no verify_token",
        ),
        (
            without("app_secret"),
            "platforms.whatsapp[0].app_secret",
            "no app_secret",
        ),
        (
            without("access_token"),
            "platforms.whatsapp[0].access_token",
            "no access_token",
        ),
        (
            without("phone_number_id"),
            "platforms.whatsapp[0].phone_number_id",
            "no phone_number_id",
        ),
        (
            WA.replace("\"106540352242922\"", "\"+1 631 555 1234\""),
            "platforms.whatsapp[0].phone_number_id",
            "not the phone number",
        ),
        (
            format!("{WA}api_version = \"21\"\n"),
            "platforms.whatsapp[0].api_version",
            "v21.0",
        ),
        (
            format!("{WA}app_secret_file = \"/etc/s\"\n"),
            "platforms.whatsapp[0].app_secret_file",
            "one way only",
        ),
        (
            format!("{WA}api_base = \"graph.facebook.com\"\n"),
            "platforms.whatsapp[0].api_base",
            "http",
        ),
        (
            format!("{WA}{WA}"),
            "platforms.whatsapp[1].name",
            "defined twice",
        ),
        (
            WA.replace("access_token = \"EAAGSECRETxyz\"", "access_token = \"\""),
            "platforms.whatsapp[0].access_token",
            "must not be empty",
        ),
    ];
    for (text, key, why) in cases {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("/etc/hermes-gateway/gateway.toml"), "{e}");
        assert!(e.contains(key), "{key}: {e}");
        assert!(e.contains(why), "{why}: {e}");
        assert!(
            !e.contains("SECRETxyz") && !e.contains("VERIFYxyz"),
            "no secret in {e}"
        );
    }
}

#[test]
fn webhook_templates_are_parsed_with_the_configuration() {
    let route = "[[webhook.routes]]\nname = \"gh\"\nscheme = \"github\"\nsecret = \"s\"\n";
    let c = parse(&format!(
        "{route}template = \"{{event}}: {{body.action}}\"\nsession = \"repo-{{body.repo}}\"\n"
    ))
    .expect("valid");
    let r = &c.webhook.routes[0];
    assert_eq!(
        r.template,
        Template::parse("{event}: {body.action}").unwrap()
    );
    assert!(r.template.needs_json());
    assert_eq!(
        r.session,
        Some(Template::parse("repo-{body.repo}").unwrap())
    );
    // Left out: the default prompt, and a session of its own per delivery.
    let c = parse(route).expect("valid");
    assert_eq!(
        c.webhook.routes[0].template,
        Template::parse(webhook::DEFAULT_TEMPLATE).unwrap()
    );
    assert_eq!(c.webhook.routes[0].session, None);

    for (key, line) in [
        ("template", "template = \"{body.\"\n"),
        ("session", "session = \"{nope}\"\n"),
    ] {
        let text = parse(&format!("{route}{line}")).unwrap_err().to_string();
        assert!(
            text.contains(&format!("`webhook.routes[0].{key}`")),
            "{key}: {text}"
        );
    }
    let text = parse(&format!("{route}session = \"{{nope}}\"\n"))
        .unwrap_err()
        .to_string();
    assert!(text.contains("unknown placeholder `{nope}`"), "{text}");
}

#[test]
fn schedules_take_their_defaults_and_their_errors_name_the_key() {
    let c = parse(
        "[[schedule]]\nname = \"brief\"\ncron = \"0 8 * * 1-5\"\ntimezone = \"Europe/Berlin\"\nprompt = \"Summarise.\"\n",
    )
    .expect("valid");
    let s = &c.schedules[0];
    assert_eq!(s.missed, Missed::RunOnce);
    assert_eq!(s.deliver, Deliver::Log);
    assert_eq!(s.session, None);
    assert_eq!(s.route(), "schedule:brief");
    let base = "[[schedule]]\nname = \"b\"\nprompt = \"p\"\n";
    for (text, key, why) in [
        (
            format!("{base}cron = \"61 * * * *\"\n"),
            "schedule[0].cron",
            "not a cron expression",
        ),
        (
            format!("{base}cron = \"@hourly\"\ntimezone = \"Mars/Olympus\"\n"),
            "schedule[0].timezone",
            "IANA",
        ),
        (
            format!("{base}cron = \"@daily\"\nmissed = \"sometimes\"\n"),
            "schedule[0].missed",
            "run_once",
        ),
        (
            format!("{base}cron = \"@daily\"\ndeliver = {{ type = \"http\" }}\n"),
            "schedule[0].deliver.url",
            "needs url",
        ),
        (
            format!(
                "{base}cron = \"@daily\"\ndeliver = {{ platform = \"telegram\", name = \"main\", chat = 1 }}\n"
            ),
            "schedule[0].deliver",
            "no [[platforms.telegram]] named `main`",
        ),
        (
            format!("{base}cron = \"@daily\"\n{base}cron = \"@daily\"\n"),
            "schedule[1].name",
            "defined twice",
        ),
    ] {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains(key), "{key}: {e}");
        assert!(e.contains(why), "{why}: {e}");
    }
    // Seconds are allowed (six fields), and chat deliveries name a configured instance.
    let c = parse(&format!(
        "{TG}[[schedule]]\nname = \"s\"\ncron = \"*/2 * * * * *\"\nprompt = \"p\"\ndeliver = {{ platform = \"telegram\", name = \"main\", chat = 42 }}\n"
    ))
    .expect("valid");
    assert_eq!(
        c.schedules[0].deliver,
        Deliver::Chat {
            platform: "telegram".into(),
            name: "main".into(),
            chat: "42".into(),
            thread: None
        }
    );
}

const LINE: &str = "[[platforms.line]]\nname = \"jp\"\nchannel_secret = \"line-secret-value\"\nchannel_access_token = \"line-token-value\"\n";

#[test]
fn a_line_instance_takes_its_defaults() {
    let c = parse(&format!("{LINE}allowed_users = [\"U4af4980629\"]\n")).expect("valid");
    let l = &c.platforms.line[0];
    assert_eq!(l.name, "jp");
    assert_eq!(l.api_base, "https://api.line.me");
    assert_eq!(l.access.allowed_users, ["U4af4980629"]);
    assert_eq!(l.send_rate_limit.count, 200);
    assert_eq!(format!("{:?}", l.channel_secret), "Inline([redacted])");
    assert_eq!(
        format!("{:?}", l.channel_access_token),
        "Inline([redacted])"
    );
}

#[test]
fn line_configuration_errors_name_the_file_and_the_key() {
    let cases = [
        (
            "[[platforms.line]]\nname = \"jp\"\nchannel_access_token = \"t\"\n".to_owned(),
            "platforms.line[0].channel_secret",
            "no channel secret",
        ),
        (
            "[[platforms.line]]\nname = \"jp\"\nchannel_secret = \"s\"\n".to_owned(),
            "platforms.line[0].channel_access_token",
            "no channel access token",
        ),
        (
            format!("{LINE}channel_secret_file = \"/etc/s\"\n"),
            "platforms.line[0].channel_secret_file",
            "one way only",
        ),
        (
            format!("{LINE}{LINE}"),
            "platforms.line[1].name",
            "defined twice",
        ),
        (
            LINE.replace("jp", "a b"),
            "platforms.line[0].name",
            "/platforms/line/NAME",
        ),
        (
            format!("{LINE}api_base = \"ftp://x\"\n"),
            "platforms.line[0].api_base",
            "http",
        ),
        (
            format!("{LINE}allow_all = true\nallowed_users = [\"U1\"]\n"),
            "platforms.line[0].allow_all",
            "keep one",
        ),
        (
            format!("{LINE}send_rate_limit = \"fast\"\n"),
            "platforms.line[0].send_rate_limit",
            "N/min",
        ),
        (
            format!("{LINE}webhook_secret = \"x\"\n"),
            "webhook_secret",
            "unknown field",
        ),
    ];
    for (text, key, why) in cases {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("/etc/hermes-gateway/gateway.toml"), "{e}");
        assert!(e.contains(key), "{key}: {e}");
        assert!(e.contains(why), "{why}: {e}");
        assert!(
            !e.contains("line-secret-value") && !e.contains("line-token-value"),
            "no secret in {e}"
        );
    }
}

const TWILIO: &str = "[[platforms.twilio]]\nname = \"sms\"\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token = \"twilio-token-value\"\nfrom = \"+15550001111\"\npublic_url = \"https://bot.example.org/platforms/twilio/sms\"\n";

#[test]
fn a_twilio_instance_takes_its_defaults_and_keeps_its_url_exactly() {
    let c = parse(&format!(
        "{}allowed_users = [\"+15552223333\"]\n",
        TWILIO.replace("twilio/sms\"", "twilio/sms/\"")
    ))
    .expect("valid");
    let t = &c.platforms.twilio[0];
    assert_eq!(t.name, "sms");
    assert_eq!(t.api_base, "https://api.twilio.com");
    assert_eq!(t.from, "+15550001111");
    // The signature covers the URL: a trailing slash stays.
    assert_eq!(
        t.public_url,
        "https://bot.example.org/platforms/twilio/sms/"
    );
    assert_eq!(t.access.allowed_users, ["+15552223333"]);
    assert_eq!(format!("{:?}", t.auth_token), "Inline([redacted])");
}

#[test]
fn twilio_configuration_errors_name_the_file_and_the_key() {
    let without = |k: &str| {
        TWILIO
            .lines()
            .filter(|l| !l.starts_with(&format!("{k} =")))
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    };
    let cases = [
        (
            without("account_sid"),
            "platforms.twilio[0].account_sid",
            "Account SID",
        ),
        (
            TWILIO.replace("AC0123456789abcdef0123456789abcdef", "SK123"),
            "platforms.twilio[0].account_sid",
            "32 hexadecimal",
        ),
        (
            without("auth_token"),
            "platforms.twilio[0].auth_token",
            "no auth token",
        ),
        (
            format!("{TWILIO}auth_token_credential = \"t\"\n"),
            "platforms.twilio[0].auth_token_credential",
            "one way only",
        ),
        (without("from"), "platforms.twilio[0].from", "+15551234567"),
        (
            TWILIO.replace("+15550001111", "my number"),
            "platforms.twilio[0].from",
            "E.164",
        ),
        (
            without("public_url"),
            "platforms.twilio[0].public_url",
            "exact URL",
        ),
        (
            TWILIO.replace("https://bot.example.org", "bot.example.org"),
            "platforms.twilio[0].public_url",
            "http",
        ),
        (
            format!("{TWILIO}{TWILIO}"),
            "platforms.twilio[1].name",
            "defined twice",
        ),
        (
            format!("{TWILIO}chat_rate_limit = \"many\"\n"),
            "platforms.twilio[0].chat_rate_limit",
            "N/min",
        ),
    ];
    for (text, key, why) in cases {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.contains("/etc/hermes-gateway/gateway.toml"), "{e}");
        assert!(e.contains(key), "{key}: {e}");
        assert!(e.contains(why), "{why}: {e}");
        assert!(!e.contains("twilio-token-value"), "no secret in {e}");
    }
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
    let c = parse("[api]\nrun_retention = \"2m\"\n").expect("valid");
    assert_eq!(c.api.run_retention, Duration::from_secs(120));
    assert_eq!(
        parse("").expect("defaults").api.run_retention,
        Duration::from_secs(7 * 24 * 3600)
    );
    let e = parse("[api]\nrun_retention = \"0s\"\n").expect_err("a zero retention");
    assert!(e.to_string().contains("api.run_retention"), "{e}");
}
