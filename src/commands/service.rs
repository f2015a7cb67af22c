//! `hermes-gateway service install|uninstall|print`: the systemd units and the launchd
//! property list, rendered for where this binary actually lives.

use std::path::{Path, PathBuf};

use crate::cli::{InstallArgs, PrintArgs, ServiceKind};
use crate::lifecycle::ExitStatus;

const SYSTEM_UNITS: [(&str, &str); 4] = [
    (
        "hermes-gateway.service",
        include_str!("../../systemd/hermes-gateway.service"),
    ),
    (
        "hermes-gateway-api.socket",
        include_str!("../../systemd/hermes-gateway-api.socket"),
    ),
    (
        "hermes-gateway-webhook.socket",
        include_str!("../../systemd/hermes-gateway-webhook.socket"),
    ),
    (
        "hermes-gateway-control.socket",
        include_str!("../../systemd/hermes-gateway-control.socket"),
    ),
];
const USER_UNITS: [(&str, &str); 4] = [
    (
        "hermes-gateway.service",
        include_str!("../../systemd/user/hermes-gateway.service"),
    ),
    (
        "hermes-gateway-api.socket",
        include_str!("../../systemd/user/hermes-gateway-api.socket"),
    ),
    (
        "hermes-gateway-webhook.socket",
        include_str!("../../systemd/user/hermes-gateway-webhook.socket"),
    ),
    (
        "hermes-gateway-control.socket",
        include_str!("../../systemd/user/hermes-gateway-control.socket"),
    ),
];
const PLIST: &str = include_str!("../../launchd/ai.hermes.gateway.plist");
const PACKAGED_BINARY: &str = "/usr/bin/hermes-gateway";
const PLIST_BINARY: &str = "/usr/local/bin/hermes-gateway";
pub const PLIST_NAME: &str = "ai.hermes.gateway.plist";

/// One file to write: where, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub path: PathBuf,
    pub text: String,
}

/// The systemd units for `binary`, in `dir`.
pub fn render_systemd(user: bool, binary: &Path, dir: &Path) -> Vec<Rendered> {
    let units = if user { &USER_UNITS } else { &SYSTEM_UNITS };
    units
        .iter()
        .map(|(name, text)| Rendered {
            path: dir.join(name),
            text: text
                .replace(
                    &format!("={PACKAGED_BINARY} "),
                    &format!("={} ", binary.display()),
                )
                .replace(
                    &format!("=+{PACKAGED_BINARY} "),
                    &format!("=+{} ", binary.display()),
                ),
        })
        .collect()
}

/// The launchd property list for `binary`, logging under `log_dir`.
pub fn render_launchd(binary: &Path, log_dir: &Path, dir: &Path) -> Rendered {
    let text = PLIST
        .replace(
            &format!("<string>{PLIST_BINARY}</string>"),
            &format!(
                "<string>{}</string>",
                xml_escape(&binary.display().to_string())
            ),
        )
        .replace(
            "<string>/tmp/ai.hermes.gateway.out.log</string>",
            &format!(
                "<string>{}</string>",
                xml_escape(&log_dir.join("hermes-gateway.out.log").display().to_string())
            ),
        )
        .replace(
            "<string>/tmp/ai.hermes.gateway.err.log</string>",
            &format!(
                "<string>{}</string>",
                xml_escape(&log_dir.join("hermes-gateway.err.log").display().to_string())
            ),
        );
    Rendered {
        path: dir.join(PLIST_NAME),
        text,
    }
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn home() -> Result<PathBuf, String> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| "HOME is not set: cannot find the per-user folders".to_owned())
}

fn this_binary() -> Result<PathBuf, String> {
    std::env::current_exe().map_err(|e| format!("cannot find this binary's path: {e}"))
}

/// Per-user unless `--system`, or root without `--user`.
fn wants_user(args: &InstallArgs) -> bool {
    if args.user {
        return true;
    }
    if args.system {
        return false;
    }
    !nix::unistd::Uid::effective().is_root()
}

/// What `install` writes on this platform.
fn plan(user: bool) -> Result<Vec<Rendered>, String> {
    let binary = this_binary()?;
    if cfg!(target_os = "macos") {
        let (dir, logs) = if user {
            let h = home()?;
            (
                h.join("Library/LaunchAgents"),
                h.join("Library/Logs/hermes-gateway"),
            )
        } else {
            (
                PathBuf::from("/Library/LaunchDaemons"),
                PathBuf::from("/Library/Logs/hermes-gateway"),
            )
        };
        return Ok(vec![render_launchd(&binary, &logs, &dir)]);
    }
    let dir = if user {
        match std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
            Some(c) => PathBuf::from(c).join("systemd/user"),
            None => home()?.join(".config/systemd/user"),
        }
    } else {
        PathBuf::from("/etc/systemd/system")
    };
    Ok(render_systemd(user, &binary, &dir))
}

pub fn print(args: &PrintArgs) -> ExitStatus {
    let binary = match this_binary() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("hermes-gateway: {e}");
            return ExitStatus::Fatal;
        }
    };
    match args.kind {
        ServiceKind::Systemd => {
            for r in render_systemd(args.user, &binary, Path::new("")) {
                println!("# {}\n{}", r.path.display(), r.text);
            }
        }
        ServiceKind::Launchd => {
            let logs = match home() {
                Ok(h) => h.join("Library/Logs/hermes-gateway"),
                Err(_) => PathBuf::from("/Library/Logs/hermes-gateway"),
            };
            print!("{}", render_launchd(&binary, &logs, Path::new("")).text);
        }
    }
    ExitStatus::Stopped
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Write,
    Unchanged,
    Remove,
    Absent,
}

/// Decides, for each file, what install (or uninstall) does; refuses to clobber a file
/// that differs from what this version renders unless `force`.
pub fn decide(files: &[Rendered], uninstall: bool, force: bool) -> Result<Vec<Action>, String> {
    let mut actions = Vec::new();
    let mut changed = Vec::new();
    for f in files {
        let current = std::fs::read_to_string(&f.path).ok();
        let action = match (&current, uninstall) {
            (None, false) => Action::Write,
            (None, true) => Action::Absent,
            (Some(c), false) if *c == f.text => Action::Unchanged,
            (Some(c), true) if *c == f.text => Action::Remove,
            (Some(_), false) => {
                changed.push(f.path.display().to_string());
                Action::Write
            }
            (Some(_), true) => {
                changed.push(f.path.display().to_string());
                Action::Remove
            }
        };
        actions.push(action);
    }
    if !changed.is_empty() && !force {
        return Err(format!(
            "{} changed since it was installed (or was written by another version): {}. Compare with `hermes-gateway service print`, then use --force to {} anyway",
            if changed.len() == 1 {
                "this file has"
            } else {
                "these files have"
            },
            changed.join(", "),
            if uninstall { "remove" } else { "overwrite" }
        ));
    }
    Ok(actions)
}

pub fn install(args: &InstallArgs, uninstall: bool) -> ExitStatus {
    let user = wants_user(args);
    let files = match plan(user) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("hermes-gateway: {e}");
            return ExitStatus::Fatal;
        }
    };
    let actions = match decide(&files, uninstall, args.force) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hermes-gateway: refusing: {e}");
            return ExitStatus::Fatal;
        }
    };
    for (f, a) in files.iter().zip(&actions) {
        let result = match a {
            Action::Write => write_file(&f.path, &f.text).map(|()| "wrote"),
            Action::Unchanged => Ok("unchanged"),
            Action::Remove => std::fs::remove_file(&f.path)
                .map(|()| "removed")
                .map_err(|e| e.to_string()),
            Action::Absent => Ok("not present"),
        };
        match result {
            Ok(what) => println!("{what:>11}  {}", f.path.display()),
            Err(e) => {
                eprintln!("hermes-gateway: {}: {e}", f.path.display());
                return ExitStatus::Fatal;
            }
        }
    }
    if !uninstall && !user && !cfg!(target_os = "macos") {
        // LoadCredential= needs its folder to exist.
        let creds = Path::new("/etc/hermes-gateway/credentials");
        if let Err(e) = create_private_dir(creds) {
            eprintln!("hermes-gateway: {}: {e}", creds.display());
            return ExitStatus::Fatal;
        }
    }
    next_steps(user, uninstall, &files)
}

fn create_private_dir(p: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(p)
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    // Write beside, then rename: a reader never sees half a unit.
    let tmp = path.with_extension("tmp-hermes");
    std::fs::write(&tmp, text).map_err(|e| e.to_string())?;
    std::fs::rename(&tmp, path).map_err(|e| e.to_string())
}

fn next_steps(user: bool, uninstall: bool, files: &[Rendered]) -> ExitStatus {
    if cfg!(target_os = "macos") {
        return launchd_next(user, uninstall, files);
    }
    let sc = if user {
        "systemctl --user"
    } else {
        "systemctl"
    };
    let units = "hermes-gateway-api.socket hermes-gateway-webhook.socket hermes-gateway-control.socket hermes-gateway.service";
    if uninstall {
        println!("\nnext: {sc} disable --now {units} && {sc} daemon-reload");
    } else {
        println!("\nnext: {sc} daemon-reload && {sc} enable --now {units}");
        println!("then: curl http://127.0.0.1:8642/health");
        if user {
            println!("to keep it running after you log out: loginctl enable-linger $USER");
        }
    }
    ExitStatus::Stopped
}

#[cfg(target_os = "macos")]
fn launchd_next(user: bool, uninstall: bool, files: &[Rendered]) -> ExitStatus {
    let domain = if user {
        format!("gui/{}", nix::unistd::Uid::current())
    } else {
        "system".to_owned()
    };
    let Some(plist) = files.first() else {
        return ExitStatus::Fatal;
    };
    let verb = if uninstall { "bootout" } else { "bootstrap" };
    let target = if uninstall {
        format!("{domain}/ai.hermes.gateway")
    } else {
        domain.clone()
    };
    let mut cmd = std::process::Command::new("launchctl");
    cmd.arg(verb).arg(&target);
    if !uninstall {
        cmd.arg(&plist.path);
    }
    match cmd.status() {
        Ok(s) if s.success() => {
            println!("launchctl {verb} {target}: done");
            if !uninstall {
                println!("then: curl http://127.0.0.1:8642/health");
            }
            ExitStatus::Stopped
        }
        Ok(s) => {
            eprintln!("hermes-gateway: launchctl {verb} {target} failed ({s})");
            ExitStatus::Fatal
        }
        Err(e) => {
            eprintln!("hermes-gateway: cannot run launchctl: {e}");
            ExitStatus::Fatal
        }
    }
}

#[cfg(not(target_os = "macos"))]
fn launchd_next(_user: bool, _uninstall: bool, _files: &[Rendered]) -> ExitStatus {
    ExitStatus::Stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn systemd_render_points_at_the_binary() {
        let r = render_systemd(
            true,
            Path::new("/home/u/.cargo/bin/hermes-gateway"),
            Path::new("/x"),
        );
        assert_eq!(r.len(), 4);
        let svc = &r[0];
        assert_eq!(svc.path, Path::new("/x/hermes-gateway.service"));
        assert!(
            svc.text
                .contains("ExecStart=/home/u/.cargo/bin/hermes-gateway run")
        );
        assert!(
            svc.text
                .contains("ExecReload=/home/u/.cargo/bin/hermes-gateway reload --pid")
        );
        assert!(
            !svc.text.contains("/usr/bin/hermes-gateway"),
            "{}",
            svc.text
        );
        let system = render_systemd(false, Path::new("/opt/hg"), Path::new("/x"));
        assert!(
            system[0]
                .text
                .contains("ExecReload=+/opt/hg reload --pid $MAINPID")
        );
        assert!(
            !svc.text.contains("DynamicUser"),
            "user units have no DynamicUser"
        );
        let system = render_systemd(false, Path::new("/usr/bin/hermes-gateway"), Path::new("/x"));
        assert!(system[0].text.contains("DynamicUser=yes"));
        assert!(system[0].text.contains("RestartForceExitStatus=75"));
    }

    #[test]
    fn plist_render_fills_paths() {
        let r = render_launchd(
            Path::new("/opt/h&g/hermes-gateway"),
            Path::new("/Users/u/Library/Logs/hermes-gateway"),
            Path::new("/Users/u/Library/LaunchAgents"),
        );
        assert!(
            r.text
                .contains("<string>/opt/h&amp;g/hermes-gateway</string>")
        );
        assert!(
            r.text
                .contains("/Users/u/Library/Logs/hermes-gateway/hermes-gateway.err.log")
        );
        assert!(!r.text.contains("/tmp/"));
        assert_eq!(
            r.path,
            Path::new("/Users/u/Library/LaunchAgents/ai.hermes.gateway.plist")
        );
    }

    #[test]
    fn install_refuses_to_clobber_a_changed_file() {
        let dir = tempfile::tempdir().unwrap();
        let files = render_systemd(false, Path::new("/usr/bin/hermes-gateway"), dir.path());
        assert_eq!(
            decide(&files, false, false).unwrap(),
            vec![Action::Write, Action::Write, Action::Write, Action::Write]
        );
        for f in &files {
            write_file(&f.path, &f.text).unwrap();
        }
        assert_eq!(decide(&files, false, false).unwrap()[0], Action::Unchanged);
        std::fs::write(&files[0].path, "[Service]\nExecStart=/bin/true\n").unwrap();
        let e = decide(&files, false, false).unwrap_err();
        assert!(
            e.contains("hermes-gateway.service") && e.contains("--force"),
            "{e}"
        );
        assert_eq!(decide(&files, false, true).unwrap()[0], Action::Write);
        assert!(
            decide(&files, true, false).is_err(),
            "uninstall refuses too"
        );
        assert_eq!(decide(&files, true, true).unwrap()[0], Action::Remove);
    }
}
