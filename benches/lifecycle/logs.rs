//! What the gateways logged: ERROR lines and panics become findings, WARN lines
//! observations; the logs worth reading are kept in `target/bench-lifecycle-logs/`.

use std::fs;
use std::path::{Path, PathBuf};

use crate::Ctx;

/// Reports what a gateway logged: ERROR lines and panics as findings, WARN lines as
/// observations. Returns whether there was an ERROR or a panic.
pub fn scan_log(ctx: &mut Ctx, path: &Path, what: &str) -> bool {
    let Ok(text) = fs::read_to_string(path) else {
        return false;
    };
    let mut bad = false;
    for line in text.lines().map(strip_ansi) {
        if line.contains("panicked at") {
            bad = true;
            ctx.findings
                .add(format!("gateway panicked ({what})"), line.trim().to_owned());
            continue;
        }
        let level = if line.contains(" ERROR ") {
            "ERROR"
        } else if line.contains(" WARN ") {
            "WARN"
        } else {
            continue;
        };
        // The message without its timestamp, so that repeats count as one finding.
        let message = line
            .split_once(&format!(" {level} "))
            .map_or(line.as_str(), |(_, m)| m)
            .trim()
            .to_owned();
        if level == "ERROR" {
            bad = true;
            ctx.findings
                .add(format!("gateway logged ERROR ({what})"), message);
        } else {
            ctx.observations
                .add(format!("gateway logged WARN ({what})"), message);
        }
    }
    bad
}

/// Keeps the logs of steps that ended early (their folders are still in the work folder).
pub fn keep_remaining_logs(ctx: &mut Ctx) {
    let Ok(entries) = fs::read_dir(&ctx.work) else {
        return;
    };
    let mut logs: Vec<(PathBuf, String)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let log = e.path().join("gateway.log");
            let name = format!("{}.log", e.file_name().to_string_lossy());
            (log.is_file() && !ctx.kept_logs.join(&name).exists()).then_some((log, name))
        })
        .collect();
    logs.sort();
    for (log, name) in logs {
        keep_log(ctx, &log, &name);
    }
}

/// Copies a gateway log out of the work folder (which is removed at the end).
pub fn keep_log(ctx: &mut Ctx, path: &Path, name: &str) {
    if let Err(e) = fs::create_dir_all(&ctx.kept_logs)
        .and_then(|()| fs::copy(path, ctx.kept_logs.join(name)).map(|_| ()))
    {
        ctx.findings.add(
            "bench: cannot keep a gateway log",
            format!("{} → {}: {e}", path.display(), ctx.kept_logs.display()),
        );
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<String> = text.lines().map(strip_ansi).collect();
    let from = all.len().saturating_sub(lines);
    format!(
        "--- last lines of {} ---\n{}",
        path.display(),
        all[from..].join("\n")
    )
}
