//! What a process, or the machine, has used so far, from `/proc`: the CPU and bytes
//! written figures of the API, Telegram and platform benchmarks. Those include it by
//! `#[path]` (the webhook benchmark does not use it, so it is no submodule of `support`).

// Each of them uses only some of these.
#![allow(dead_code)]

/// Clock ticks per second (`getconf CLK_TCK`): 100 on Linux.
pub const TICK_US: f64 = 10_000.0;

/// utime + stime of a process (`PID`, `self`, or `PID/task/TID` for a thread), in clock
/// ticks.
pub fn cpu_ticks(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // After the command's `(name)`, which may hold spaces.
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0)
}

/// (busy, total) clock ticks of the whole machine.
pub fn machine_ticks() -> (u64, u64) {
    let s = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = s
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// A field of `/proc/PID/io`: `wchar` (bytes passed to write(2) and its kin, sockets
/// included) or `write_bytes` (bytes that reached the disk).
pub fn io(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}
