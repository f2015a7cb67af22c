//! The machine the bench ran on (CPUs, kernel, load, binary and commit), and how much CPU
//! other processes took meanwhile: medians from a busy machine are inflated.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::Instant;

/// CPU time of the whole machine and of this bench (with its reaped children), to tell
/// how much other processes competed with the measurement.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    pub at: Instant,
    pub machine_busy_s: f64,
    pub own_s: f64,
}

impl CpuSnapshot {
    pub fn take() -> Option<CpuSnapshot> {
        let stat = fs::read_to_string("/proc/stat").ok()?;
        let fields: Vec<u64> = stat
            .lines()
            .next()?
            .strip_prefix("cpu ")?
            .split_whitespace()
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let busy: u64 = [0, 1, 2, 5, 6, 7]
            .iter()
            .filter_map(|&i| fields.get(i))
            .sum();
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if hz <= 0 {
            return None;
        }
        let usage = |who| {
            // SAFETY: getrusage fills the zeroed struct it is given.
            let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
            if unsafe { libc::getrusage(who, &mut ru) } != 0 {
                return 0.0;
            }
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            tv(ru.ru_utime) + tv(ru.ru_stime)
        };
        Some(CpuSnapshot {
            at: Instant::now(),
            machine_busy_s: busy as f64 / hz as f64,
            own_s: usage(libc::RUSAGE_SELF) + usage(libc::RUSAGE_CHILDREN),
        })
    }

    /// Average number of CPUs kept busy by other processes between `self` and `later`.
    pub fn others_since(&self, later: &CpuSnapshot) -> f64 {
        let wall = (later.at - self.at).as_secs_f64();
        if wall <= 0.0 {
            return 0.0;
        }
        let others = (later.machine_busy_s - self.machine_busy_s) - (later.own_s - self.own_s);
        (others / wall).max(0.0)
    }
}

pub struct Machine {
    pub nproc: String,
    pub cpu: String,
    pub kernel: String,
    pub date: String,
    pub loadavg: String,
    pub binary: PathBuf,
    pub profile: String,
    pub git: String,
}

impl Machine {
    pub fn probe(bin: &Path) -> Machine {
        let cmd = |prog: &str, args: &[&str]| -> Option<String> {
            let out = Command::new(prog)
                .args(args)
                .stderr(Stdio::null())
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
        };
        let cpu = fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let nproc = cmd("nproc", &[]).unwrap_or_else(|| {
            thread::available_parallelism().map_or("?".into(), |n| n.to_string())
        });
        let kernel = cmd("uname", &["-srm"]).unwrap_or_else(|| {
            fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into())
        });
        let date = cmd("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_else(|| {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            format!("@{secs}")
        });
        let loadavg = fs::read_to_string("/proc/loadavg")
            .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
            .unwrap_or_default();
        let profile = bin
            .parent()
            .and_then(|p| p.file_name())
            .map_or("?".into(), |p| p.to_string_lossy().into_owned());
        let manifest = env!("CARGO_MANIFEST_DIR");
        let git = match cmd("git", &["-C", manifest, "rev-parse", "--short", "HEAD"]) {
            Some(rev) => {
                let dirty = cmd(
                    "git",
                    &[
                        "-C",
                        manifest,
                        "status",
                        "--porcelain",
                        "--untracked-files=no",
                    ],
                )
                .is_some_and(|s| !s.is_empty());
                if dirty {
                    format!("{rev} (modified)")
                } else {
                    rev
                }
            }
            None => "unknown".into(),
        };
        Machine {
            nproc,
            cpu,
            kernel,
            date,
            loadavg,
            binary: bin.to_path_buf(),
            profile,
            git,
        }
    }

    pub fn print(&self) {
        println!("date:    {}", self.date);
        println!(
            "machine: {} CPUs, {}, {}",
            self.nproc, self.cpu, self.kernel
        );
        println!("load:    {} (1/5/15 min, at start)", self.loadavg);
        println!(
            "binary:  {} ({} build, commit {})",
            self.binary.display(),
            self.profile,
            self.git
        );
        if self.profile != "release" {
            println!("WARNING: not a release build; figures are not representative");
        }
    }
}
