//! Restart by re-exec in place (`--supervisor none`): on SIGUSR1 the same PID executes the
//! binary again with its listening sockets handed over through `LISTEN_FDS`. Idle, then
//! under load; afterwards the PID and the api listener must still be the same.

use std::fs;
use std::net::SocketAddr;
use std::thread;
use std::time::Duration;

use crate::gateway::{
    Proc, control_status, gateway_command, listener_address, make_dir, open_log, status_text,
    write_config,
};
use crate::logs::{keep_log, scan_log};
use crate::notify::Source;
use crate::reconnecting::Load;
use crate::restarts::{
    LoadedRun, NextImage, RestartResult, Restarts, check_load, final_stop, restarts,
};
use crate::{
    CLIENT_CONNECTIONS, CLIENT_PAUSE, Ctx, LOADED_RESTARTS, READY_TIMEOUT, REEXEC_UNTIL, RESTARTS,
};

pub fn phase_reexec(ctx: &mut Ctx, rt: &tokio::runtime::Runtime) -> Result<RestartResult, String> {
    let deadline = ctx.deadline(REEXEC_UNTIL);
    let dir = ctx.work.join("reexec");
    make_dir(&dir)?;
    let config = write_config(&dir, "127.0.0.1:0")?;
    let log_path = dir.join("gateway.log");
    let log = open_log(&log_path)?;
    let mut cmd = gateway_command(&ctx.bin, &config, "none", ctx.notify.path(), &log)?;
    ctx.discard_stale("before the re-exec gateway");
    let mut gw = Proc::spawn(&mut cmd, &log_path)?;
    let first_pid = gw.pid();
    {
        let mut check = || gw.exited().map(|s| format!("gateway {}", status_text(s)));
        ctx.notify
            .wait_for("READY=1", Source::Pid(first_pid), READY_TIMEOUT, &mut check)
    }
    .map_err(|e| format!("{e}\n{}", gw.log_tail()))?;
    let status = control_status(&dir.join("control.sock"))?;
    if status["supervisor"] != "none" {
        ctx.findings.add(
            "re-exec: --supervisor none not honoured",
            format!("control /status says supervisor = {}", status["supervisor"]),
        );
    }
    let (api, _) = listener_address(&status, "api")
        .ok_or_else(|| format!("control /status lists no api listener: {status}"))?;
    let api: SocketAddr = api
        .parse()
        .map_err(|e| format!("api listener address `{api}`: {e}"))?;

    let mut result = RestartResult::default();
    let mut pid = first_pid;
    let outcome = (|| -> Result<(), String> {
        let mut alive = || gw.exited().map(|s| format!("gateway {}", status_text(s)));
        result.idle = restarts(
            ctx,
            Restarts {
                label: "re-exec",
                count: RESTARTS,
                deadline,
                next: NextImage::SamePid,
            },
            &mut pid,
            &mut alive,
            &mut result.first_sequence,
        )?;
        let load = Load::start(rt, api, CLIENT_CONNECTIONS, CLIENT_PAUSE);
        // Let the client loop reach its steady state first.
        thread::sleep(Duration::from_millis(200));
        let samples = restarts(
            ctx,
            Restarts {
                label: "re-exec (loaded)",
                count: LOADED_RESTARTS,
                deadline,
                next: NextImage::SamePid,
            },
            &mut pid,
            &mut alive,
            &mut result.first_sequence,
        );
        thread::sleep(Duration::from_millis(200));
        let load = load.finish(rt);
        check_load(ctx, "re-exec", &load);
        result.loaded = Some(LoadedRun {
            samples: samples?,
            load,
        });
        Ok(())
    })();

    // After the re-execs: still the same process, sockets from the re-exec.
    if outcome.is_ok() {
        match control_status(&dir.join("control.sock")) {
            Ok(s) => {
                if s["pid"] != first_pid {
                    ctx.findings.add(
                        "re-exec: PID changed",
                        format!("started as {first_pid}, control /status says {}", s["pid"]),
                    );
                }
                match listener_address(&s, "api") {
                    Some((addr, origin)) if addr == api.to_string() && origin == "re-exec" => {}
                    other => ctx.findings.add(
                        "re-exec: api listener not inherited",
                        format!("after re-execs: {other:?}, before: {api}"),
                    ),
                }
            }
            Err(e) => ctx
                .findings
                .add("re-exec: control /status failed after re-execs", e),
        }
    }
    result.final_exit = Some(final_stop(ctx, &mut gw, first_pid, "re-exec"));
    scan_log(ctx, &log_path, "re-exec");
    keep_log(ctx, &log_path, "reexec.log");
    let _ = fs::remove_dir_all(&dir);
    outcome?;
    Ok(result)
}
