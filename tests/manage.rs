//! `hermes-gateway restart|reload|stop` against an unsupervised gateway: each acts and then
//! verifies, and says so when the result is not what was asked.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(10);

fn cli(setup: &Setup, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .arg("--config")
        .arg(&setup.config)
        .arg("--timeout")
        .arg("10s")
        .output()
        .expect("run the CLI");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn restart_reload_and_stop_verify_their_result() {
    let setup = Setup::new("127.0.0.1:0", "");
    let notify = setup.notify();
    let mut gw = setup.spawn(
        &["--supervisor", "none"],
        &[("NOTIFY_SOCKET", notify.path.to_str().unwrap())],
    );
    notify.wait_for("READY=1", T);
    let before = status_json(&setup.control);

    let (code, out, err) = cli(&setup, &["restart"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("PID {} re-executed and serving", gw.pid())),
        "{out}"
    );
    let after = status_json(&setup.control);
    assert_eq!(after["pid"], before["pid"]);
    assert_ne!(
        after["started_at_unix_ms"], before["started_at_unix_ms"],
        "a new image runs"
    );

    let (code, out, err) = cli(&setup, &["reload"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("configuration generation 1 → 2"), "{out}");

    // A broken file: the reload is refused, the command says why and fails.
    let good = std::fs::read_to_string(&setup.config).unwrap();
    setup.write_config(&format!("{good}[gateway]\ndrain_timeout = \"whenever\"\n"));
    let (code, out, err) = cli(&setup, &["reload"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("reload failed") && err.contains("gateway.drain_timeout"),
        "{err}"
    );
    assert_eq!(
        get(api(&setup), "/health").unwrap().status,
        200,
        "the old configuration serves"
    );
    setup.write_config(&good);

    let (code, out, err) = cli(&setup, &["stop"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("stopped"), "{out}");
    assert_eq!(gw.wait(T).code(), Some(0));

    // Nothing runs any more: every command says so and fails.
    for cmd in ["restart", "reload", "stop"] {
        let (code, _, err) = cli(&setup, &[cmd]);
        assert_eq!(code, 1, "{cmd}: {err}");
        assert!(
            err.contains("no running gateway answers") || err.contains("does not answer"),
            "{cmd}: {err}"
        );
    }
}

fn api(setup: &Setup) -> std::net::SocketAddr {
    let st = status_json(&setup.control);
    st["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "api"))
        .and_then(|l| l["address"].as_str())
        .and_then(|a| a.parse().ok())
        .expect("api address")
}
