//! Lifecycle benchmark of the real `hermes-gateway` binary.
//!
//! 1. exec → `READY=1`: 50 starts, each with a fresh state folder and `NOTIFY_SOCKET` set
//!    (so `--supervisor auto` means systemd), stopped with SIGTERM; plus 20 starts on a state
//!    folder that already exists, for comparison.
//! 2. Resident memory (`VmRSS`) right after `READY=1` and ~200 ms later.
//! 3. The restart gap, `STOPPING=1` (old image) → `READY=1` (new image):
//!    - re-exec in place (`--supervisor none`, SIGUSR1, same PID, sockets via `LISTEN_FDS`);
//!    - exit 75 under a supervisor in this bench that holds the listening socket and
//!      relaunches the gateway with it as fd 3 (`LISTEN_FDS=1`, `LISTEN_PID` = the child).
//!
//!    Each path runs once idle (the figure compared with the target) and once under a
//!    light HTTP/1.1 keep-alive load that counts failed requests.
//!
//! Every datagram is timestamped on receipt and attributed to its sender (`SO_PASSCRED`);
//! the notification order, exit statuses and the gateway's ERROR/WARN lines are checked and
//! reported as findings. Other processes' CPU use during the run is reported too: medians
//! from a busy machine are inflated.
//!
//! Run with `cargo bench --bench lifecycle`: prints a table and writes
//! `target/bench-lifecycle.json`; gateway logs go to `target/bench-lifecycle-logs/`. Exits
//! non-zero only when a phase could not run. Without `--bench` (`cargo test --all-targets`)
//! it only says how to run it, so that test runs stay fast.
//!
//! One module per thing measured or used, each readable alone:
//! - `starts`: exec → `READY=1` and resident memory (1 and 2 above);
//! - `restarts`: the gaps of a series of restarts, idle and under load, run on each path
//!   by `reexec` and by `exit75` (with the bench's own service manager, `supervisor`);
//! - `notify`: the timestamped `NOTIFY_SOCKET`; `gateway`: a gateway's process, command
//!   line, configuration and control socket; `logs`: what the gateways logged;
//! - `stats`, `machine`, `report`: findings and figures, the machine, the table and JSON;
//! - the load client that runs through restarts: `benches/support/reconnecting.rs`.

mod exit75;
mod gateway;
mod logs;
mod machine;
mod notify;
#[path = "../support/reconnecting.rs"]
mod reconnecting;
mod reexec;
mod report;
mod restarts;
mod starts;
mod stats;
mod supervisor;

use std::fs;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use exit75::phase_exit75;
use logs::keep_remaining_logs;
use machine::{CpuSnapshot, Machine};
use notify::{Note, NotifySocket};
use reexec::phase_reexec;
use report::{Report, json_path};
use restarts::RestartResult;
use starts::{StartsResult, phase_starts, phase_warm_starts};
use stats::Findings;

const STARTS: usize = 50;
/// Extra starts on a state folder that already exists (for comparison only).
const WARM_STARTS: usize = 20;
/// Restarts per path without load: the figure compared with the target.
const RESTARTS: usize = 50;
/// Restarts per path with the client loop running.
const LOADED_RESTARTS: usize = 50;
const CLIENT_CONNECTIONS: usize = 8;
/// Pause between two requests of one client connection ("light" load).
const CLIENT_PAUSE: Duration = Duration::from_millis(2);
const READY_TIMEOUT: Duration = Duration::from_secs(5);
const STOPPING_TIMEOUT: Duration = Duration::from_secs(2);
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);
const RSS_SETTLE: Duration = Duration::from_millis(200);
/// Phase deadlines, from the start of the run; the whole run stays under 3 minutes.
const STARTS_UNTIL: Duration = Duration::from_secs(60);
const REEXEC_UNTIL: Duration = Duration::from_secs(110);
const EXIT75_UNTIL: Duration = Duration::from_secs(160);

const TARGET_READY_MS: f64 = 15.0;
const TARGET_RSS_MIB: f64 = 12.0;
const TARGET_GAP_MS: f64 = 25.0;

fn main() -> ExitCode {
    if !std::env::args().any(|a| a == "--bench") {
        println!("lifecycle: skipped (run it with `cargo bench --bench lifecycle`)");
        return ExitCode::SUCCESS;
    }
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lifecycle bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every phase; `Ok(false)` when a phase could not complete (the report still prints).
fn run() -> Result<bool, String> {
    let started = Instant::now();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_hermes-gateway"));
    if !bin.is_file() {
        return Err(format!("gateway binary {} does not exist", bin.display()));
    }
    let machine = Machine::probe(&bin);
    println!("hermes-gateway lifecycle bench");
    machine.print();
    println!();
    let cpu_start = CpuSnapshot::take();

    // Unix socket paths are limited to ~108 bytes: keep the work folder short.
    let base = std::env::temp_dir();
    let base = if base.as_os_str().len() > 40 {
        PathBuf::from("/tmp")
    } else {
        base
    };
    let work = tempfile::Builder::new()
        .prefix("hgw-bench.")
        .tempdir_in(&base)
        .map_err(|e| format!("cannot create a work folder in {}: {e}", base.display()))?;
    let notify = NotifySocket::bind(&work.path().join("notify.sock"))?;
    let kept_logs = json_path(&bin).with_file_name("bench-lifecycle-logs");
    if kept_logs.exists() {
        fs::remove_dir_all(&kept_logs)
            .map_err(|e| format!("cannot clear {}: {e}", kept_logs.display()))?;
    }
    let mut ctx = Ctx {
        kept_logs,
        bin,
        work: work.path().to_path_buf(),
        notify,
        findings: Findings::default(),
        observations: Findings::default(),
        started,
    };

    let mut ok = true;
    print!("[1/3] {STARTS} starts (exec → READY=1, VmRSS), {WARM_STARTS} warm starts ... ");
    flush_stdout();
    let mut starts = phase_starts(&mut ctx).unwrap_or_else(|e| {
        ok = false;
        ctx.findings.add("phase aborted: starts", e);
        StartsResult::default()
    });
    match phase_warm_starts(&mut ctx) {
        Ok(v) => starts.warm_ready_ms = v,
        Err(e) => {
            ok = false;
            ctx.findings.add("phase aborted: warm starts", e);
        }
    }
    println!(
        "{} fresh + {} warm done",
        starts.samples.len(),
        starts.warm_ready_ms.len()
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the client runtime: {e}"))?;

    print!("[2/3] re-exec in place: {RESTARTS} idle + {LOADED_RESTARTS} loaded SIGUSR1 ... ");
    flush_stdout();
    let reexec = phase_reexec(&mut ctx, &rt).unwrap_or_else(|e| {
        ok = false;
        ctx.findings.add("phase aborted: re-exec", e);
        RestartResult::default()
    });
    println!(
        "{} + {} done",
        reexec.idle.len(),
        reexec.loaded.as_ref().map_or(0, |l| l.samples.len())
    );

    print!("[3/3] exit 75 + relaunch: {RESTARTS} idle + {LOADED_RESTARTS} loaded SIGUSR1 ... ");
    flush_stdout();
    let exit75 = phase_exit75(&mut ctx, &rt).unwrap_or_else(|e| {
        ok = false;
        ctx.findings.add("phase aborted: exit 75", e);
        RestartResult::default()
    });
    println!(
        "{} + {} done",
        exit75.idle.len(),
        exit75.loaded.as_ref().map_or(0, |l| l.samples.len())
    );
    drop(rt);
    keep_remaining_logs(&mut ctx);

    let elapsed = started.elapsed();
    let status_only = ctx.notify.status_only.load(Ordering::Relaxed);
    if status_only > 0 {
        ctx.observations.add(
            "STATUS=-only datagrams (the status refresher; its first tick repeats READY's STATUS)",
            format!("{status_only} in the run"),
        );
    }
    let background_cpus = match (cpu_start, CpuSnapshot::take()) {
        (Some(a), Some(b)) => Some(a.others_since(&b)),
        _ => None,
    };
    let report = Report {
        background_cpus,
        machine: &machine,
        starts: &starts,
        reexec: &reexec,
        exit75: &exit75,
        findings: &ctx.findings,
        observations: &ctx.observations,
        kept_logs: &ctx.kept_logs,
        elapsed,
    };
    println!();
    report.print();
    let json_path = json_path(&ctx.bin);
    match serde_json::to_string_pretty(&report.json()) {
        Ok(text) => match fs::write(&json_path, text + "\n") {
            Ok(()) => println!("\nJSON summary: {}", json_path.display()),
            Err(e) => {
                ok = false;
                eprintln!("cannot write {}: {e}", json_path.display());
            }
        },
        Err(e) => {
            ok = false;
            eprintln!("cannot serialise the JSON summary: {e}");
        }
    }
    drop(ctx);
    work.close()
        .map_err(|e| format!("cannot remove the work folder: {e}"))?;
    Ok(ok)
}

struct Ctx {
    bin: PathBuf,
    work: PathBuf,
    notify: NotifySocket,
    findings: Findings,
    /// Notable but expected behaviour, reported for information.
    observations: Findings,
    started: Instant,
    /// Where gateway logs are kept after the run (`target/bench-lifecycle-logs`).
    kept_logs: PathBuf,
}

impl Ctx {
    fn deadline(&self, from_start: Duration) -> Instant {
        self.started + from_start
    }

    /// Reports datagrams left over from an earlier step, then forgets them.
    fn discard_stale(&mut self, when: &str) {
        for n in self.notify.drain() {
            if !n.is_status_only() {
                self.findings.add(
                    format!("late notify datagram ({when})"),
                    format!("from pid {}: {}", n.pid_text(), n.one_line()),
                );
            }
        }
    }
}

fn flush_stdout() {
    let _ = io::stdout().flush();
}

fn check_ready_status(ctx: &mut Ctx, ready: &Note, when: &str) {
    let status = ready.text.lines().find_map(|l| l.strip_prefix("STATUS="));
    match status {
        Some(s) if s.starts_with("serving") => {}
        other => ctx.findings.add(
            format!("READY=1 without a `STATUS=serving...` line ({when})"),
            format!("STATUS={other:?}"),
        ),
    }
}
