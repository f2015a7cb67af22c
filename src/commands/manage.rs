//! `hermes-gateway restart|reload|stop`: act through whoever supervises the gateway, then
//! verify the result instead of hoping (the upstream gateway once stayed dead after a
//! restart request that nobody checked).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::control_client;
use crate::cli::{ManageArgs, ReloadArgs, TargetArgs};
use crate::lifecycle::ExitStatus;

const DEFAULT_UNIT: &str = "hermes-gateway.service";
const POLL: Duration = Duration::from_millis(100);

/// Who runs the gateway, found from its control socket or the service manager.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Systemd { unit: String, user: bool },
    Launchd { service: String },
    Unsupervised { pid: i32 },
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

fn fail<T>(msg: impl Into<String>) -> Result<T, Failure> {
    Err(Failure(msg.into()))
}

pub fn restart(args: &ManageArgs) -> ExitStatus {
    report(run_restart(args))
}

pub fn reload(args: &ReloadArgs) -> ExitStatus {
    report(run_reload(&args.manage, args.pid))
}

pub fn stop(args: &ManageArgs) -> ExitStatus {
    report(run_stop(args))
}

fn report(r: Result<String, Failure>) -> ExitStatus {
    match r {
        Ok(msg) => {
            println!("{msg}");
            ExitStatus::Stopped
        }
        Err(Failure(msg)) => {
            eprintln!("hermes-gateway: {msg}");
            ExitStatus::Fatal
        }
    }
}

fn control_socket(t: &TargetArgs) -> Option<PathBuf> {
    let configured = control_client::configured_socket(t.config.config.as_deref())
        .ok()
        .flatten();
    control_client::find_socket(t.socket.as_deref(), configured.as_deref())
}

/// The running gateway's status, if its control socket answers.
fn status(socket: Option<&Path>) -> Option<Value> {
    let (code, body) = control_client::request(socket?, "GET", "/status").ok()?;
    if code != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// The systemd unit of a process, from its cgroup (`…/hermes-gateway.service`), and
/// whether it runs under a user manager (`…/user@1000.service/…`).
fn unit_of_pid(pid: u64) -> Option<(String, bool)> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    unit_of_cgroup(&cg)
}

fn unit_of_cgroup(cg: &str) -> Option<(String, bool)> {
    let path = cg.lines().find_map(|l| l.strip_prefix("0::")).or_else(|| {
        cg.lines()
            .find_map(|l| l.split_once(":name=systemd:").map(|(_, p)| p))
    })?;
    let user = path.contains("/user@");
    let unit = path.rsplit('/').find(|c| c.ends_with(".service"))?;
    Some((unit.to_owned(), user))
}

fn locate(t: &TargetArgs) -> Result<(Target, Option<Value>), Failure> {
    let socket = control_socket(t);
    let st = status(socket.as_deref());
    if let Some(s) = &st {
        let pid = s["pid"].as_u64().unwrap_or(0);
        match s["supervisor"].as_str() {
            Some("systemd") => {
                let (unit, user) = match (&t.unit, unit_of_pid(pid)) {
                    (Some(u), _) => (u.clone(), t.user),
                    (None, Some((u, user))) => (u, user && !t.system),
                    (None, None) => (DEFAULT_UNIT.to_owned(), t.user),
                };
                return Ok((Target::Systemd { unit, user }, st));
            }
            Some("launchd") => {
                return Ok((
                    Target::Launchd {
                        service: launchd_service(t),
                    },
                    st,
                ));
            }
            _ => {
                let pid =
                    i32::try_from(pid).map_err(|_| Failure(format!("bad pid {pid} in status")))?;
                return Ok((Target::Unsupervised { pid }, st));
            }
        }
    }
    // Not answering: ask the service manager about the unit.
    if cfg!(target_os = "macos") {
        return Ok((
            Target::Launchd {
                service: launchd_service(t),
            },
            None,
        ));
    }
    let unit = t.unit.clone().unwrap_or_else(|| DEFAULT_UNIT.to_owned());
    let candidates: Vec<bool> = if t.user {
        vec![true]
    } else if t.system {
        vec![false]
    } else {
        vec![false, true]
    };
    for user in candidates {
        if systemctl_show(user, &unit, "LoadState").as_deref() == Some("loaded") {
            return Ok((Target::Systemd { unit, user }, None));
        }
    }
    let where_ = socket.map_or("(no control socket configured)".to_owned(), |p| {
        p.display().to_string()
    });
    fail(format!(
        "no running gateway answers on {where_}, and no systemd unit {unit} is loaded; start it with `hermes-gateway run` or `systemctl start {unit}`"
    ))
}

fn launchd_service(t: &TargetArgs) -> String {
    if t.system {
        format!("system/{}", t.label)
    } else {
        format!("gui/{}/{}", nix::unistd::Uid::current(), t.label)
    }
}

fn systemctl(user: bool, args: &[&str]) -> Result<String, Failure> {
    let mut cmd = Command::new("systemctl");
    if user {
        cmd.arg("--user");
    }
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| Failure(format!("cannot run systemctl: {e}")))?;
    if !out.status.success() {
        return fail(format!(
            "systemctl {}{} failed: {}",
            if user { "--user " } else { "" },
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn systemctl_show(user: bool, unit: &str, prop: &str) -> Option<String> {
    systemctl(user, &["show", "-P", prop, unit]).ok()
}

/// Waits until `probe` says yes, or the budget runs out.
fn wait_until(budget: Duration, mut probe: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + budget;
    loop {
        if probe() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

fn send(pid: i32, sig: nix::sys::signal::Signal) -> Result<(), Failure> {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .map_err(|e| Failure(format!("cannot signal PID {pid}: {e}")))
}

fn run_restart(args: &ManageArgs) -> Result<String, Failure> {
    let (target, before) = locate(&args.target)?;
    let socket = control_socket(&args.target);
    match target {
        Target::Systemd { unit, user } => {
            let old = systemctl_show(user, &unit, "MainPID").unwrap_or_default();
            if old.is_empty() || old == "0" {
                systemctl(user, &["start", &unit])?;
            } else {
                // A graceful restart: the gateway drains and exits 75, and systemd relaunches
                // it (RestartForceExitStatus=75) with the sockets it kept open.
                systemctl(user, &["kill", "--kill-whom=main", "-s", "USR1", &unit])?;
            }
            let ok = wait_until(args.timeout, || {
                let pid = systemctl_show(user, &unit, "MainPID").unwrap_or_default();
                pid != old
                    && pid != "0"
                    && !pid.is_empty()
                    && systemctl_show(user, &unit, "ActiveState").as_deref() == Some("active")
                    && systemctl_show(user, &unit, "SubState").as_deref() == Some("running")
            });
            let state = |p| systemctl_show(user, &unit, p).unwrap_or_default();
            if !ok {
                return fail(format!(
                    "{unit} did not come back within {:?}: ActiveState={} SubState={} Result={} (see `journalctl {}-u {unit}`)",
                    args.timeout,
                    state("ActiveState"),
                    state("SubState"),
                    state("Result"),
                    if user { "--user " } else { "" }
                ));
            }
            Ok(format!(
                "restarted {unit}: PID {old} → {} (ready)",
                state("MainPID")
            ))
        }
        Target::Launchd { service } => restart_launchd(&service, args.timeout, before.as_ref()),
        Target::Unsupervised { pid } => {
            let started = before.as_ref().map(|b| b["started_at_unix_ms"].clone());
            send(pid, nix::sys::signal::Signal::SIGUSR1)?;
            let mut last = None;
            let ok = wait_until(args.timeout, || {
                last = status(socket.as_deref());
                last.as_ref().is_some_and(|s| {
                    Some(s["started_at_unix_ms"].clone()) != started && s["state"] == "serving"
                })
            });
            if !ok {
                return fail(format!(
                    "the gateway (PID {pid}) did not come back within {:?}; its last status: {}",
                    args.timeout,
                    last.map_or("no answer".into(), |s| s.to_string())
                ));
            }
            Ok(format!(
                "restarted in place: PID {pid} re-executed and serving"
            ))
        }
    }
}

fn launchd_pid(service: &str) -> Option<String> {
    let out = Command::new("launchctl")
        .args(["print", service])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_prefix("pid = "))
        .map(str::to_owned)
}

fn restart_launchd(
    service: &str,
    budget: Duration,
    before: Option<&Value>,
) -> Result<String, Failure> {
    let old = launchd_pid(service)
        .or_else(|| {
            before
                .and_then(|b| b["pid"].as_u64())
                .map(|p| p.to_string())
        })
        .unwrap_or_default();
    let run = |args: &[&str]| -> Result<(), Failure> {
        match Command::new("launchctl").args(args).status() {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => fail(format!("launchctl {} failed ({s})", args.join(" "))),
            Err(e) => fail(format!("cannot run launchctl: {e}")),
        }
    };
    run(&["kill", "SIGUSR1", service])?;
    let relaunched = |budget| wait_until(budget, || launchd_pid(service).is_some_and(|p| p != old));
    if relaunched(budget / 2) {
        return Ok(format!(
            "restarted {service}: PID {old} → {}",
            launchd_pid(service).unwrap_or_default()
        ));
    }
    // launchd did not relaunch it (throttled, or the job was unloaded): force it.
    run(&["kickstart", "-k", service])?;
    if relaunched(budget / 2) {
        return Ok(format!(
            "restarted {service} with `launchctl kickstart -k` (launchd had not relaunched it): PID {old} → {}",
            launchd_pid(service).unwrap_or_default()
        ));
    }
    fail(format!(
        "{service} did not come back within {budget:?}, even after `launchctl kickstart -k`"
    ))
}

fn run_reload(args: &ManageArgs, pid: Option<i32>) -> Result<String, Failure> {
    let socket = control_socket(&args.target);
    let (target, before) = match pid {
        // ExecReload=: signal the main process directly (asking systemd would recurse).
        Some(pid) => (Target::Unsupervised { pid }, status(socket.as_deref())),
        None => locate(&args.target)?,
    };
    let generation = |s: &Option<Value>| s.as_ref().and_then(|s| s["config_generation"].as_u64());
    let reload_at = |s: &Option<Value>| s.as_ref().map(|s| s["last_reload"].clone());
    let (gen0, at0) = (generation(&before), reload_at(&before));
    match &target {
        // `systemctl reload` returns once the gateway sent READY=1 after RELOADING=1.
        Target::Systemd { unit, user } => {
            systemctl(*user, &["reload", unit])?;
        }
        Target::Unsupervised { pid } if before.is_none() || !pid_matches(&before, *pid) => {
            // Nothing to verify against (or the socket belongs to another gateway): at
            // least deliver the signal, like `kill -HUP` would.
            send(*pid, nix::sys::signal::Signal::SIGHUP)?;
            return Ok(format!(
                "sent SIGHUP to PID {pid}; its control socket does not answer, so the result is not verified"
            ));
        }
        Target::Launchd { .. } | Target::Unsupervised { .. } => {
            let pid = before
                .as_ref()
                .and_then(|b| b["pid"].as_i64())
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| Failure("the gateway's control socket does not answer".into()))?;
            send(pid, nix::sys::signal::Signal::SIGHUP)?;
        }
    }
    let mut after = None;
    let done = wait_until(args.timeout, || {
        after = status(socket.as_deref());
        after.as_ref().is_some_and(|s| s["state"] == "serving") && reload_at(&after) != at0
    });
    if !done {
        if before.is_none() {
            return Ok("reload sent; the gateway's control socket does not answer, so the result is not verified".into());
        }
        return fail(format!("no reload seen within {:?}", args.timeout));
    }
    let last = reload_at(&after).unwrap_or(Value::Null);
    if last["ok"] == Value::Bool(false) {
        return fail(format!(
            "reload failed, the previous configuration keeps running: {}",
            last["error"].as_str().unwrap_or("unknown error")
        ));
    }
    Ok(format!(
        "reloaded: configuration generation {} → {}",
        gen0.map_or("?".into(), |g| g.to_string()),
        generation(&after).map_or("?".into(), |g| g.to_string())
    ))
}

/// Whether `pid` still runs: it exists and is not a zombie waiting for its parent.
fn alive(pid: i32) -> bool {
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z"),
        Err(_) => true,
    }
}

fn pid_matches(status: &Option<Value>, pid: i32) -> bool {
    status.as_ref().and_then(|s| s["pid"].as_i64()) == Some(i64::from(pid))
}

fn run_stop(args: &ManageArgs) -> Result<String, Failure> {
    let (target, before) = locate(&args.target)?;
    match target {
        Target::Systemd { unit, user } => {
            systemctl(user, &["stop", &unit])?;
            let state = systemctl_show(user, &unit, "ActiveState").unwrap_or_default();
            if state != "inactive" && state != "failed" {
                return fail(format!("{unit} is {state} after stop"));
            }
            Ok(format!(
                "stopped {unit}. Its sockets still listen and start it on the next connection; `systemctl {}stop 'hermes-gateway-*.socket'` stops them too",
                if user { "--user " } else { "" }
            ))
        }
        Target::Launchd { .. } | Target::Unsupervised { .. } if before.is_some() => {
            let pid = before
                .as_ref()
                .and_then(|b| b["pid"].as_i64())
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| Failure("the status has no PID".into()))?;
            // Exit 0 is a successful exit: launchd's KeepAlive{SuccessfulExit=false} leaves
            // it stopped.
            send(pid, nix::sys::signal::Signal::SIGTERM)?;
            let gone = wait_until(args.timeout, || !alive(pid));
            if !gone {
                return fail(format!("PID {pid} still runs after {:?}", args.timeout));
            }
            Ok(format!("stopped (PID {pid} exited)"))
        }
        _ => fail("the gateway's control socket does not answer; nothing to stop"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_from_cgroup_v2_and_v1() {
        assert_eq!(
            unit_of_cgroup("0::/system.slice/hermes-gateway.service\n"),
            Some(("hermes-gateway.service".into(), false))
        );
        assert_eq!(
            unit_of_cgroup(
                "0::/user.slice/user-1000.slice/user@1000.service/app.slice/hermes-gateway.service\n"
            ),
            Some(("hermes-gateway.service".into(), true))
        );
        assert_eq!(
            unit_of_cgroup("12:pids:/\n1:name=systemd:/system.slice/gw.service\n0::/\n"),
            None,
            "cgroup v2 line without a unit wins over the v1 name=systemd line"
        );
        assert_eq!(
            unit_of_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
    }
}
