//! Restart by exit 75 under a supervisor that keeps the listening socket (`supervisor`):
//! idle, then under load. Each idle gap is broken down into the old image's exit, the
//! relaunch and the new image's start.

use std::collections::BTreeMap;
use std::fs;
use std::net::TcpListener;
use std::process::ExitStatus;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::gateway::{
    control_status, listener_address, make_dir, open_log, status_text, write_config,
};
use crate::logs::{keep_log, log_tail, scan_log};
use crate::notify::Source;
use crate::reconnecting::Load;
use crate::restarts::{
    Breakdown, LoadedRun, NextImage, RestartResult, Restarts, check_load, restarts,
};
use crate::stats::ms;
use crate::supervisor::{ExecPlan, MiniSupervisor, SupEvent};
use crate::{
    CLIENT_CONNECTIONS, CLIENT_PAUSE, Ctx, EXIT75_UNTIL, LOADED_RESTARTS, READY_TIMEOUT, RESTARTS,
};

pub fn phase_exit75(ctx: &mut Ctx, rt: &tokio::runtime::Runtime) -> Result<RestartResult, String> {
    let deadline = ctx.deadline(EXIT75_UNTIL);
    let dir = ctx.work.join("exit75");
    make_dir(&dir)?;
    // The gateway's own api setting is unused: the api socket is handed over.
    let config = write_config(&dir, "127.0.0.1:0")?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|e| format!("cannot bind the supervisor's api socket: {e}"))?;
    let api = listener
        .local_addr()
        .map_err(|e| format!("supervisor's api socket address: {e}"))?;
    let listener = Arc::new(listener);
    let plan = ExecPlan::new(&ctx.bin, &config, ctx.notify.path(), listener.clone())?;
    let log_path = dir.join("gateway.log");
    let log = open_log(&log_path)?;
    ctx.discard_stale("before the exit-75 gateway");
    let max_launches = 1 + RESTARTS + LOADED_RESTARTS;
    let sup = MiniSupervisor::start(plan, log, log_path.clone(), max_launches + 1)?;

    let mut result = RestartResult::default();
    let mut failure: Option<String> = None;
    let mut samples_idle = Vec::new();
    let mut loaded = None;
    // Supervisor events seen while waiting (they arrive on their own channel).
    let mut events: Vec<SupEvent> = Vec::new();
    let mut first_pid = 0;
    {
        let mut gone = || {
            for e in sup.events.try_iter() {
                events.push(e);
            }
            events.iter().find_map(|e| match e {
                SupEvent::Failed(m) => Some(format!("supervisor: {m}")),
                SupEvent::Exited { pid, status, .. } if status.code() != Some(75) => {
                    Some(format!("gateway {pid} {}", status_text(*status)))
                }
                _ => None,
            })
        };
        match ctx
            .notify
            .wait_for("READY=1", Source::NotPid(0), READY_TIMEOUT, &mut gone)
        {
            Ok((n, _)) => first_pid = n.pid.unwrap_or(0),
            Err(e) => failure = Some(format!("first start: {e}\n{}", log_tail(&log_path, 8))),
        }
        if failure.is_none() {
            match control_status(&dir.join("control.sock")) {
                Ok(s) => {
                    if s["supervisor"] != "systemd" {
                        ctx.findings.add(
                            "exit 75: NOTIFY_SOCKET + LISTEN_FDS not detected as systemd",
                            format!("control /status says supervisor = {}", s["supervisor"]),
                        );
                    }
                    match listener_address(&s, "api") {
                        Some((addr, origin)) if addr == api.to_string() && origin == "systemd" => {}
                        other => ctx.findings.add(
                            "exit 75: handed-over api socket not adopted",
                            format!("control /status api = {other:?}, handed over {api}"),
                        ),
                    }
                }
                Err(e) => ctx.findings.add("exit 75: control /status failed", e),
            }
            let mut pid = first_pid;
            match restarts(
                ctx,
                Restarts {
                    label: "exit 75",
                    count: RESTARTS,
                    deadline,
                    next: NextImage::NewPid,
                },
                &mut pid,
                &mut gone,
                &mut result.first_sequence,
            ) {
                Ok(s) => samples_idle = s,
                Err(e) => failure = Some(e),
            }
            if failure.is_none() {
                let load = Load::start(rt, api, CLIENT_CONNECTIONS, CLIENT_PAUSE);
                thread::sleep(Duration::from_millis(200));
                let samples = restarts(
                    ctx,
                    Restarts {
                        label: "exit 75 (loaded)",
                        count: LOADED_RESTARTS,
                        deadline,
                        next: NextImage::NewPid,
                    },
                    &mut pid,
                    &mut gone,
                    &mut result.first_sequence,
                );
                thread::sleep(Duration::from_millis(200));
                let load = load.finish(rt);
                check_load(ctx, "exit 75", &load);
                match samples {
                    Ok(samples) => loaded = Some(LoadedRun { samples, load }),
                    Err(e) => failure = Some(e),
                }
            }
        }
    }
    events.extend(sup.finish());
    drop(listener);

    // Exit statuses and the breakdown of each idle gap.
    let mut spawned: BTreeMap<i32, Instant> = BTreeMap::new();
    let mut exited: BTreeMap<i32, (Instant, ExitStatus)> = BTreeMap::new();
    for e in &events {
        match e {
            SupEvent::Spawned { pid, at } => {
                spawned.insert(*pid, *at);
            }
            SupEvent::Exited { pid, at, status } => {
                exited.insert(*pid, (*at, *status));
            }
            SupEvent::Failed(m) => ctx.findings.add("exit 75: supervisor problem", m.clone()),
        }
    }
    let mut breakdown = Breakdown::default();
    for s in samples_idle
        .iter()
        .chain(loaded.iter().flat_map(|l: &LoadedRun| l.samples.iter()))
    {
        match exited.get(&s.old_pid) {
            Some((_, st)) if st.code() == Some(75) => {}
            Some((_, st)) => ctx.findings.add(
                "exit 75: SIGUSR1 did not end with exit 75",
                format!("pid {}: {}", s.old_pid, status_text(*st)),
            ),
            None => ctx.findings.add(
                "exit 75: old gateway exit not seen",
                format!("pid {}", s.old_pid),
            ),
        }
        if !spawned.contains_key(&s.new_pid) {
            ctx.findings.add(
                "exit 75: READY=1 from a process the supervisor did not start",
                format!("pid {}", s.new_pid),
            );
        }
    }
    for s in &samples_idle {
        if let (Some((exit_at, _)), Some(spawn_at)) =
            (exited.get(&s.old_pid), spawned.get(&s.new_pid))
        {
            breakdown
                .stopping_to_exit
                .push(ms(exit_at.saturating_duration_since(s.t_stopping)));
            breakdown
                .exit_to_spawn
                .push(ms(spawn_at.saturating_duration_since(*exit_at)));
            breakdown
                .spawn_to_ready
                .push(ms(s.t_ready.saturating_duration_since(*spawn_at)));
        }
    }
    // The last gateway was stopped by the supervisor with SIGTERM.
    let last = samples_idle
        .iter()
        .chain(loaded.iter().flat_map(|l: &LoadedRun| l.samples.iter()))
        .last()
        .map_or(first_pid, |s| s.new_pid);
    result.final_exit = exited.get(&last).map(|(_, st)| status_text(*st));
    if failure.is_none() && result.final_exit.as_deref() != Some("exit 0") {
        ctx.findings.add(
            "exit 75: SIGTERM did not end with exit 0",
            format!("pid {last}: {:?}", result.final_exit),
        );
    }
    scan_log(ctx, &log_path, "exit 75");
    keep_log(ctx, &log_path, "exit75.log");
    let _ = fs::remove_dir_all(&dir);
    result.idle = samples_idle;
    result.loaded = loaded;
    result.breakdown = Some(breakdown);
    match failure {
        Some(e) => Err(e),
        None => Ok(result),
    }
}
