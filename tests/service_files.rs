//! The unit files and the property list as `hermes-gateway service` renders and installs
//! them: systemd-analyze accepts the per-user units, a real plist parser reads the plist,
//! and `service install` refuses to clobber a changed file.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::BIN;

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

fn hermes(home: &Path, args: &[&str]) -> Output {
    run(Command::new(BIN)
        .args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env("XDG_RUNTIME_DIR", home.join("run")))
}

fn have(tool: &str) -> bool {
    let ok = Command::new(tool).arg("--version").output().is_ok();
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI must have {tool}"
        );
        eprintln!("SKIP: {tool} is not installed");
    }
    ok
}

#[test]
fn user_install_writes_units_that_systemd_analyze_accepts_and_refuses_to_clobber() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(home.path().join("run")).unwrap();
    let out = hermes(home.path(), &["service", "install", "--user"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("systemctl --user daemon-reload"),
        "prints the next command: {said}"
    );
    let dir = home.path().join(".config/systemd/user");
    let units: Vec<_> = [
        "hermes-gateway.service",
        "hermes-gateway-api.socket",
        "hermes-gateway-webhook.socket",
        "hermes-gateway-control.socket",
    ]
    .iter()
    .map(|u| dir.join(u))
    .collect();
    for u in &units {
        assert!(u.exists(), "{} written", u.display());
    }
    let svc = std::fs::read_to_string(&units[0]).unwrap();
    assert!(svc.contains(&format!("ExecStart={BIN} run")), "{svc}");

    if have("systemd-analyze") {
        let mut cmd = Command::new("systemd-analyze");
        cmd.arg("verify")
            .arg("--user")
            .args(&units)
            .env("XDG_RUNTIME_DIR", home.path().join("run"));
        let v = run(&mut cmd);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&v.stdout),
            String::from_utf8_lossy(&v.stderr)
        );
        assert!(
            v.status.success() && text.trim().is_empty(),
            "systemd-analyze verify --user: {text}"
        );
    }

    // Installing again is a no-op; a changed file is not overwritten without --force.
    let again = hermes(home.path(), &["service", "install", "--user"]);
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("unchanged"));
    std::fs::write(&units[1], "[Socket]\nListenStream=127.0.0.1:9999\n").unwrap();
    let refused = hermes(home.path(), &["service", "install", "--user"]);
    assert_eq!(refused.status.code(), Some(1));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("hermes-gateway-api.socket") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&units[1]).unwrap(),
        "[Socket]\nListenStream=127.0.0.1:9999\n",
        "left alone"
    );
    let uninstall = hermes(home.path(), &["service", "uninstall", "--user"]);
    assert_eq!(
        uninstall.status.code(),
        Some(1),
        "uninstall refuses the changed file too"
    );
    let forced = hermes(home.path(), &["service", "install", "--user", "--force"]);
    assert!(forced.status.success());
    assert!(
        std::fs::read_to_string(&units[1])
            .unwrap()
            .contains("FileDescriptorName=api")
    );
    let uninstall = hermes(home.path(), &["service", "uninstall", "--user"]);
    assert!(
        uninstall.status.success(),
        "{}",
        String::from_utf8_lossy(&uninstall.stderr)
    );
    for u in &units {
        assert!(!u.exists(), "{} removed", u.display());
    }
}

const PLIST_CHECK: &str = r#"
import plistlib, sys
d = plistlib.loads(sys.stdin.buffer.read())
assert d["Label"] == "ai.hermes.gateway", d["Label"]
assert d["KeepAlive"] == {"SuccessfulExit": False}, d["KeepAlive"]
assert d["RunAtLoad"] is True
assert isinstance(d["ThrottleInterval"], int)
assert d["ProgramArguments"][1:] == ["run", "--supervisor", "launchd"], d["ProgramArguments"]
for name, port in (("api", "8642"), ("webhook", "8644")):
    s = d["Sockets"][name]
    assert s["SockServiceName"] == port and s["SockType"] == "stream", s
assert d["StandardErrorPath"] and d["StandardOutPath"]
print(d["ProgramArguments"][0])
"#;

#[test]
fn the_plist_parses_with_a_real_plist_parser() {
    if !have("python3") {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    for source in ["rendered", "repository"] {
        let xml = if source == "rendered" {
            let out = hermes(home.path(), &["service", "print", "launchd"]);
            assert!(out.status.success());
            out.stdout
        } else {
            std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/launchd/ai.hermes.gateway.plist"
            ))
            .unwrap()
        };
        let mut child = Command::new("python3")
            .args(["-c", PLIST_CHECK])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(&xml).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{source} plist: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let program = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if source == "rendered" {
            assert_eq!(program, BIN, "the rendered plist runs this binary");
        }
    }
}
