//! Start-up and memory: exec → `READY=1` with a fresh state folder (and with one that an
//! earlier start filled), the resident memory at `READY=1` and 200 ms later, and the stop
//! that follows (SIGTERM → `STOPPING=1` → exit 0).

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::gateway::{Proc, gateway_command, make_dir, open_log, status_text, write_config};
use crate::logs::{keep_log, scan_log};
use crate::notify::{Note, Source};
use crate::stats::ms;
use crate::{
    Ctx, EXIT_TIMEOUT, READY_TIMEOUT, RSS_SETTLE, STARTS, STARTS_UNTIL, STOPPING_TIMEOUT,
    WARM_STARTS, check_ready_status,
};

#[derive(Debug, Clone, Copy)]
pub struct Mem {
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub file_kib: u64,
    pub threads: u64,
}

fn read_mem(pid: i32) -> Option<Mem> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    };
    Some(Mem {
        rss_kib: field("VmRSS:")?,
        anon_kib: field("RssAnon:").unwrap_or(0),
        file_kib: field("RssFile:").unwrap_or(0),
        threads: field("Threads:").unwrap_or(0),
    })
}

#[derive(Default)]
pub struct StartsResult {
    pub samples: Vec<StartSample>,
    pub first_sequence: Vec<String>,
    /// exec → READY=1 with a state folder that an earlier start already filled.
    pub warm_ready_ms: Vec<f64>,
}

pub struct StartSample {
    pub ready_ms: f64,
    pub at_ready: Option<Mem>,
    pub settled: Option<Mem>,
    pub stopping_ms: Option<f64>,
    pub exit_ms: Option<f64>,
}

pub fn phase_starts(ctx: &mut Ctx) -> Result<StartsResult, String> {
    let deadline = ctx.deadline(STARTS_UNTIL);
    let mut out = StartsResult::default();
    for i in 0..STARTS {
        if Instant::now() >= deadline {
            ctx.findings.add(
                "time budget",
                format!("start phase stopped after {i} of {STARTS} starts"),
            );
            break;
        }
        let dir = ctx.work.join(format!("start-{i}"));
        make_dir(&dir)?;
        let config = write_config(&dir, "127.0.0.1:0")?;
        let log_path = dir.join("gateway.log");
        let log = open_log(&log_path)?;
        let mut cmd = gateway_command(&ctx.bin, &config, "auto", ctx.notify.path(), &log)?;
        ctx.discard_stale("before a start");

        let t0 = Instant::now();
        let mut gw = Proc::spawn(&mut cmd, &log_path)?;
        let pid = gw.pid();
        let problems = ctx.findings.total();
        let (ready, before) = {
            let mut check = || gw.exited().map(|s| format!("gateway {}", status_text(s)));
            ctx.notify
                .wait_for("READY=1", Source::Pid(pid), READY_TIMEOUT, &mut check)
        }
        .map_err(|e| format!("start {i}: {e}\n{}", gw.log_tail()))?;
        let at_ready = read_mem(pid);
        let ready_ms = ms(ready.at - t0);
        for n in &before {
            if !(n.has("FDSTORE=1") || n.is_status_only()) {
                ctx.findings.add(
                    "unexpected notify datagram before READY=1",
                    format!("pid {}: {}", n.pid_text(), n.one_line()),
                );
            }
        }
        check_ready_status(ctx, &ready, "start");
        thread::sleep(RSS_SETTLE.saturating_sub(ready.at.elapsed()));
        let settled = read_mem(pid);

        let t_term = Instant::now();
        gw.signal(Signal::SIGTERM)?;
        let stopping = {
            let mut check = || None;
            ctx.notify
                .wait_for("STOPPING=1", Source::Pid(pid), STOPPING_TIMEOUT, &mut check)
        };
        let stopping_ms = match &stopping {
            Ok((n, before)) => {
                for b in before {
                    if !b.is_status_only() {
                        ctx.findings.add(
                            "unexpected notify datagram between READY=1 and STOPPING=1",
                            format!("pid {}: {}", b.pid_text(), b.one_line()),
                        );
                    }
                }
                Some(ms(n.at - t_term))
            }
            Err(e) => {
                ctx.findings
                    .add("SIGTERM: no STOPPING=1", format!("start {i}: {e}"));
                None
            }
        };
        let exit_ms = match gw.wait_exit(EXIT_TIMEOUT) {
            Some((s, at)) => {
                if s.code() != Some(0) {
                    ctx.findings.add(
                        "SIGTERM: exit status is not 0",
                        format!("start {i}: {}\n{}", status_text(s), gw.log_tail()),
                    );
                }
                Some(ms(at - t_term))
            }
            None => {
                ctx.findings.add(
                    "SIGTERM: no exit",
                    format!("start {i}: still running {EXIT_TIMEOUT:?} after SIGTERM; killed"),
                );
                None
            }
        };
        drop(gw);
        if i == 0 {
            let mut seq: Vec<String> = before.iter().map(Note::one_line).collect();
            seq.push(ready.one_line());
            if let Ok((n, _)) = &stopping {
                seq.push(n.one_line());
            }
            out.first_sequence = seq;
        }
        let bad = scan_log(ctx, &log_path, "start");
        if i == 0 || bad || problems != ctx.findings.total() {
            keep_log(ctx, &log_path, &format!("start-{i}.log"));
        }
        let _ = fs::remove_dir_all(&dir);
        out.samples.push(StartSample {
            ready_ms,
            at_ready,
            settled,
            stopping_ms,
            exit_ms,
        });
    }
    Ok(out)
}

/// exec → READY=1 when the state folder already exists (filled by an untimed first start).
pub fn phase_warm_starts(ctx: &mut Ctx) -> Result<Vec<f64>, String> {
    let deadline = ctx.deadline(STARTS_UNTIL + Duration::from_secs(10));
    let dir = ctx.work.join("warm");
    make_dir(&dir)?;
    let config = write_config(&dir, "127.0.0.1:0")?;
    let log_path = dir.join("gateway.log");
    let log = open_log(&log_path)?;
    let mut out = Vec::with_capacity(WARM_STARTS);
    for i in 0..=WARM_STARTS {
        if Instant::now() >= deadline {
            ctx.findings.add(
                "time budget",
                format!("warm starts stopped after {i} of {WARM_STARTS}"),
            );
            break;
        }
        let mut cmd = gateway_command(&ctx.bin, &config, "auto", ctx.notify.path(), &log)?;
        ctx.discard_stale("before a warm start");
        let t0 = Instant::now();
        let mut gw = Proc::spawn(&mut cmd, &log_path)?;
        let pid = gw.pid();
        let (ready, _) = {
            let mut check = || gw.exited().map(|s| format!("gateway {}", status_text(s)));
            ctx.notify
                .wait_for("READY=1", Source::Pid(pid), READY_TIMEOUT, &mut check)
        }
        .map_err(|e| format!("warm start {i}: {e}\n{}", gw.log_tail()))?;
        // The first start only fills the state folder.
        if i > 0 {
            out.push(ms(ready.at - t0));
        }
        let stopped = gw.stop(EXIT_TIMEOUT);
        if let Err(e) = ctx.notify.wait_for(
            "STOPPING=1",
            Source::Pid(pid),
            Duration::from_millis(200),
            &mut || None,
        ) {
            ctx.findings
                .add("SIGTERM: no STOPPING=1", format!("warm start {i}: {e}"));
        }
        match stopped {
            Ok((s, _)) if s.code() == Some(0) => {}
            Ok((s, _)) => ctx.findings.add(
                "SIGTERM: exit status is not 0",
                format!("warm start {i}: {}\n{}", status_text(s), gw.log_tail()),
            ),
            Err(e) => ctx
                .findings
                .add("SIGTERM: no exit", format!("warm start {i}: {e}")),
        }
    }
    if scan_log(ctx, &log_path, "warm start") {
        keep_log(ctx, &log_path, "warm.log");
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(out)
}
