//! Restart gaps, idle and under load: a series of SIGUSR1, each timed from the old image's
//! `STOPPING=1` to the new image's `READY=1`, whichever path the restart takes (`reexec`,
//! `exit75`). The load itself is `benches/support/reconnecting.rs`; its failures are
//! findings, placed relative to the restarts.

use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::gateway::{Proc, status_text};
use crate::notify::Source;
use crate::reconnecting::LoadReport;
use crate::stats::ms;
use crate::{Ctx, EXIT_TIMEOUT, READY_TIMEOUT, STOPPING_TIMEOUT, check_ready_status};

#[derive(Default)]
pub struct RestartResult {
    pub idle: Vec<RestartSample>,
    pub loaded: Option<LoadedRun>,
    /// The exit-75 path's breakdown of the idle gap (old exit, relaunch, new start).
    pub breakdown: Option<Breakdown>,
    pub first_sequence: Vec<String>,
    pub final_exit: Option<String>,
}

pub struct LoadedRun {
    pub samples: Vec<RestartSample>,
    pub load: LoadReport,
}

#[derive(Debug, Clone)]
pub struct RestartSample {
    pub old_pid: i32,
    pub new_pid: i32,
    pub t_signal: Instant,
    pub t_stopping: Instant,
    pub t_ready: Instant,
}

impl RestartSample {
    pub fn gap_ms(&self) -> f64 {
        ms(self.t_ready - self.t_stopping)
    }
    pub fn signal_to_ready_ms(&self) -> f64 {
        ms(self.t_ready - self.t_signal)
    }
}

#[derive(Default)]
pub struct Breakdown {
    pub stopping_to_exit: Vec<f64>,
    pub exit_to_spawn: Vec<f64>,
    pub spawn_to_ready: Vec<f64>,
}

/// How the next READY=1 is told apart: same PID (re-exec) or a new one (relaunch).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NextImage {
    SamePid,
    NewPid,
}

/// What a series of restarts is.
pub struct Restarts<'a> {
    pub label: &'a str,
    pub count: usize,
    pub deadline: Instant,
    pub next: NextImage,
}

/// Sends SIGUSR1 `count` times to the current gateway and times STOPPING=1 → READY=1.
pub fn restarts(
    ctx: &mut Ctx,
    plan: Restarts<'_>,
    pid: &mut i32,
    alive: &mut dyn FnMut() -> Option<String>,
    first_sequence: &mut Vec<String>,
) -> Result<Vec<RestartSample>, String> {
    let Restarts {
        label,
        count,
        deadline,
        next,
    } = plan;
    let mut out = Vec::with_capacity(count);
    let mut extend_count = 0;
    for i in 0..count {
        if Instant::now() >= deadline {
            ctx.findings.add(
                "time budget",
                format!("{label}: stopped after {i} of {count} restarts"),
            );
            break;
        }
        ctx.discard_stale(label);
        let old = *pid;
        let t_signal = Instant::now();
        kill(Pid::from_raw(old), Signal::SIGUSR1)
            .map_err(|e| format!("{label} #{i}: SIGUSR1 to {old}: {e}"))?;
        let (stopping, before_stop) = ctx
            .notify
            .wait_for("STOPPING=1", Source::Pid(old), STOPPING_TIMEOUT, alive)
            .map_err(|e| format!("{label} #{i}: {e}"))?;
        let from = match next {
            NextImage::SamePid => Source::Pid(old),
            NextImage::NewPid => Source::NotPid(old),
        };
        let (ready, before_ready) = ctx
            .notify
            .wait_for("READY=1", from, READY_TIMEOUT, alive)
            .map_err(|e| format!("{label} #{i}: {e}"))?;
        let extends = before_ready
            .iter()
            .filter(|n| n.has_prefix("EXTEND_TIMEOUT_USEC=") && n.pid == Some(old))
            .count();
        extend_count += extends;
        for n in before_stop.iter().chain(&before_ready) {
            let by_design = n.has_prefix("EXTEND_TIMEOUT_USEC=") && n.pid == Some(old);
            if !n.is_status_only() && !by_design {
                ctx.findings.add(
                    format!("{label}: unexpected notify datagram during a restart"),
                    format!("pid {}: {}", n.pid_text(), n.one_line()),
                );
            }
        }
        if stopping.text.contains("STATUS=") && !stopping.text.contains("restart") {
            ctx.findings.add(
                format!("{label}: STOPPING=1 status does not say restart"),
                stopping.one_line(),
            );
        }
        check_ready_status(ctx, &ready, label);
        let new = ready.pid.unwrap_or(0);
        if i == 0 && first_sequence.is_empty() {
            let mut seq = vec![format!("(SIGUSR1 to {old})")];
            seq.extend(
                before_stop
                    .iter()
                    .map(|n| format!("pid {}: {}", n.pid_text(), n.one_line())),
            );
            seq.push(format!(
                "pid {}: {}",
                stopping.pid_text(),
                stopping.one_line()
            ));
            seq.extend(
                before_ready
                    .iter()
                    .map(|n| format!("pid {}: {}", n.pid_text(), n.one_line())),
            );
            seq.push(format!("pid {}: {}", ready.pid_text(), ready.one_line()));
            *first_sequence = seq;
        }
        *pid = new;
        out.push(RestartSample {
            old_pid: old,
            new_pid: new,
            t_signal,
            t_stopping: stopping.at,
            t_ready: ready.at,
        });
    }
    if extend_count > 0 {
        ctx.observations.add(
            format!("{label}: EXTEND_TIMEOUT_USEC from the draining image (connections open)"),
            format!("{extend_count} datagrams over {} restarts", out.len()),
        );
    }
    Ok(out)
}

/// SIGTERM, expect STOPPING=1 and exit 0; returns what happened.
pub fn final_stop(ctx: &mut Ctx, gw: &mut Proc, pid: i32, label: &str) -> String {
    ctx.discard_stale(label);
    let text = match gw.stop(EXIT_TIMEOUT) {
        Ok((s, _)) => status_text(s),
        Err(e) => e,
    };
    let stopping = ctx.notify.wait_for(
        "STOPPING=1",
        Source::Pid(pid),
        Duration::from_millis(200),
        &mut || None,
    );
    if stopping.is_err() {
        ctx.findings
            .add(format!("{label}: SIGTERM without STOPPING=1"), text.clone());
    }
    if text != "exit 0" {
        ctx.findings.add(
            format!("{label}: SIGTERM did not end with exit 0"),
            format!("{text}\n{}", gw.log_tail()),
        );
    }
    text
}

/// Failed requests, or none served at all, are findings.
pub fn check_load(ctx: &mut Ctx, label: &str, load: &LoadReport) {
    if load.failed > 0 {
        let kinds: Vec<String> = load
            .kinds
            .iter()
            .map(|(k, n)| format!("{n} × {k}"))
            .collect();
        ctx.findings.add(
            format!("{label}: requests failed during restarts under load"),
            format!(
                "{} failed, {} ok: {}",
                load.failed,
                load.ok,
                kinds.join("; ")
            ),
        );
    }
    if load.ok == 0 {
        ctx.findings.add(
            format!("{label}: the client loop got no response at all"),
            format!("{} failed", load.failed),
        );
    }
}

/// Each failure's time after the latest STOPPING=1 before it (ms), and whether it fell
/// inside that restart's STOPPING → READY window.
pub fn placement(load: &LoadReport, samples: &[RestartSample]) -> Vec<(f64, bool)> {
    load.failed_at
        .iter()
        .filter_map(|t| {
            let s = samples.iter().rev().find(|s| s.t_stopping <= *t)?;
            Some((ms(*t - s.t_stopping), *t <= s.t_ready))
        })
        .collect()
}
