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
