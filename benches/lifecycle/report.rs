//! The report: the table printed at the end, the loaded runs, the first notification
//! sequences, the findings, and `target/bench-lifecycle.json`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use crate::machine::Machine;
use crate::restarts::{RestartResult, RestartSample, placement};
use crate::starts::StartsResult;
use crate::stats::{Findings, mib, placement_json, round3, stats, stats_json};
use crate::{CLIENT_CONNECTIONS, TARGET_GAP_MS, TARGET_READY_MS, TARGET_RSS_MIB};

pub fn json_path(bin: &Path) -> PathBuf {
    // target/release/hermes-gateway → target/bench-lifecycle.json
    bin.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench-lifecycle.json")
}

pub struct Report<'a> {
    /// CPUs kept busy by other processes during the run, on average.
    pub background_cpus: Option<f64>,
    pub machine: &'a Machine,
    pub starts: &'a StartsResult,
    pub reexec: &'a RestartResult,
    pub exit75: &'a RestartResult,
    pub findings: &'a Findings,
    pub observations: &'a Findings,
    pub kept_logs: &'a Path,
    pub elapsed: Duration,
}

struct Row {
    label: String,
    values: Vec<f64>,
    unit: &'static str,
    target: Option<f64>,
}

impl Report<'_> {
    fn rows(&self) -> Vec<Row> {
        let s = &self.starts.samples;
        let row = |label: &str, values: Vec<f64>, unit, target| Row {
            label: label.to_owned(),
            values,
            unit,
            target,
        };
        let mut rows = vec![
            row(
                "exec → READY=1",
                s.iter().map(|x| x.ready_ms).collect(),
                "ms",
                Some(TARGET_READY_MS),
            ),
            row(
                "exec → READY=1, existing state",
                self.starts.warm_ready_ms.clone(),
                "ms",
                None,
            ),
            row(
                "VmRSS at READY=1",
                s.iter()
                    .filter_map(|x| x.at_ready)
                    .map(|m| mib(m.rss_kib))
                    .collect(),
                "MiB",
                Some(TARGET_RSS_MIB),
            ),
            row(
                "VmRSS 200 ms after READY=1",
                s.iter()
                    .filter_map(|x| x.settled)
                    .map(|m| mib(m.rss_kib))
                    .collect(),
                "MiB",
                Some(TARGET_RSS_MIB),
            ),
            row(
                "  of which RssAnon",
                s.iter()
                    .filter_map(|x| x.settled)
                    .map(|m| mib(m.anon_kib))
                    .collect(),
                "MiB",
                None,
            ),
            row(
                "  of which RssFile",
                s.iter()
                    .filter_map(|x| x.settled)
                    .map(|m| mib(m.file_kib))
                    .collect(),
                "MiB",
                None,
            ),
            row(
                "threads at READY=1",
                s.iter()
                    .filter_map(|x| x.at_ready)
                    .map(|m| m.threads as f64)
                    .collect(),
                "",
                None,
            ),
            row(
                "SIGTERM → STOPPING=1",
                s.iter().filter_map(|x| x.stopping_ms).collect(),
                "ms",
                None,
            ),
            row(
                "SIGTERM → exit",
                s.iter().filter_map(|x| x.exit_ms).collect(),
                "ms",
                None,
            ),
        ];
        for (name, r) in [("re-exec", self.reexec), ("exit 75", self.exit75)] {
            rows.push(row(
                &format!("{name}: STOPPING → READY (gap)"),
                r.idle.iter().map(RestartSample::gap_ms).collect(),
                "ms",
                Some(TARGET_GAP_MS),
            ));
            rows.push(row(
                &format!("{name}: SIGUSR1 → READY"),
                r.idle
                    .iter()
                    .map(RestartSample::signal_to_ready_ms)
                    .collect(),
                "ms",
                None,
            ));
            if let Some(b) = &r.breakdown {
                rows.push(row(
                    "  old STOPPING → old exit",
                    b.stopping_to_exit.clone(),
                    "ms",
                    None,
                ));
                rows.push(row(
                    "  old exit → relaunch",
                    b.exit_to_spawn.clone(),
                    "ms",
                    None,
                ));
                rows.push(row(
                    "  relaunch → new READY",
                    b.spawn_to_ready.clone(),
                    "ms",
                    None,
                ));
            }
            if let Some(l) = &r.loaded {
                rows.push(row(
                    &format!("{name}: gap under load"),
                    l.samples.iter().map(RestartSample::gap_ms).collect(),
                    "ms",
                    None,
                ));
            }
        }
        rows
    }

    pub fn print(&self) {
        println!(
            "{:<38} {:>3} {:>8} {:>8} {:>8} {:>8}  {:<10} verdict",
            "metric", "n", "median", "p90", "min", "max", "target"
        );
        println!("{}", "-".repeat(102));
        for r in self.rows() {
            let label = if r.unit.is_empty() {
                r.label.clone()
            } else {
                format!("{} ({})", r.label, r.unit)
            };
            let target = r
                .target
                .map_or(String::new(), |t| format!("≤ {t} {}", r.unit));
            match stats(&r.values) {
                Some(s) => {
                    let verdict = r
                        .target
                        .map_or("", |t| if s.median <= t { "ok" } else { "MISSED" });
                    println!(
                        "{:<38} {:>3} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {:<10} {}",
                        label, s.n, s.median, s.p90, s.min, s.max, target, verdict
                    );
                }
                None => println!("{label:<38} {:>3} {:>8}", 0, "n/a"),
            }
        }
        println!();
        for (name, r) in [("re-exec", self.reexec), ("exit 75", self.exit75)] {
            match &r.loaded {
                Some(l) => {
                    let d = &l.load;
                    let rps = if d.seconds > 0.0 {
                        d.ok as f64 / d.seconds
                    } else {
                        0.0
                    };
                    println!(
                        "{name}: {} restarts under load ({CLIENT_CONNECTIONS} keep-alive \
                         connections, GET /health): {} ok, {} FAILED{}",
                        l.samples.len(),
                        d.ok,
                        d.failed,
                        if d.failed == 0 { "" } else { " <<<" },
                    );
                    println!(
                        "    {rps:.0} req/s, {} connections opened, {} unsent requests retried",
                        d.connections, d.retried_unsent
                    );
                    for (k, n) in &d.kinds {
                        println!("    {n:>6} × {k}");
                    }
                    let placed = placement(d, &l.samples);
                    if !placed.is_empty() {
                        let text: Vec<String> = placed
                            .iter()
                            .map(|(t, inside)| {
                                format!("+{t:.2} ms{}", if *inside { "" } else { " (after READY)" })
                            })
                            .collect();
                        println!(
                            "    failures after the latest STOPPING=1: {}",
                            text.join(", ")
                        );
                    }
                }
                None => println!("{name}: no loaded run"),
            }
            if let Some(e) = &r.final_exit {
                println!("{name}: final SIGTERM → {e}");
            }
        }
        println!();
        println!(
            "notify datagrams, first start:        {}",
            self.starts.first_sequence.join("  |  ")
        );
        println!(
            "notify datagrams, first re-exec:      {}",
            self.reexec.first_sequence.join("  |  ")
        );
        println!(
            "notify datagrams, first exit-75 cycle: {}",
            self.exit75.first_sequence.join("  |  ")
        );
        println!();
        if self.findings.0.is_empty() {
            println!("findings: none");
        } else {
            println!("findings ({}):", self.findings.0.len());
            for (kind, (n, example)) in &self.findings.0 {
                println!("  - {kind} (×{n}): {}", example.replace('\n', "\n      "));
            }
        }
        if !self.observations.0.is_empty() {
            println!("observations (expected behaviour, for information):");
            for (kind, (n, example)) in &self.observations.0 {
                println!("  - {kind} (×{n}): {example}");
            }
        }
        if let Some(b) = self.background_cpus {
            println!(
                "\nbackground: other processes kept {b:.2} of {} CPUs busy on average{}",
                self.machine.nproc,
                if b > 0.25 {
                    " (noisy: figures inflated)"
                } else {
                    ""
                }
            );
        }
        println!("gateway logs kept in {}", self.kept_logs.display());
        println!("elapsed: {:.1} s", self.elapsed.as_secs_f64());
    }

    pub fn json(&self) -> Value {
        let m = self.machine;
        let rows: serde_json::Map<String, Value> = self
            .rows()
            .into_iter()
            .map(|r| {
                let mut v = stats_json(&r.values);
                if let Value::Object(o) = &mut v {
                    o.insert("unit".into(), json!(r.unit));
                    if let Some(t) = r.target {
                        o.insert("target_median_max".into(), json!(t));
                        o.insert(
                            "target_met".into(),
                            json!(stats(&r.values).is_some_and(|s| s.median <= t)),
                        );
                    }
                }
                (r.label.trim().to_owned(), v)
            })
            .collect();
        let load = |r: &RestartResult| {
            r.loaded.as_ref().map(|l| {
                json!({
                    "restarts": l.samples.len(),
                    "connections": CLIENT_CONNECTIONS,
                    "ok": l.load.ok,
                    "failed": l.load.failed,
                    "failure_kinds": l.load.kinds,
                    "connections_opened": l.load.connections,
                    "unsent_requests_retried": l.load.retried_unsent,
                    "failures_ms_after_stopping": placement_json(&placement(&l.load, &l.samples)),
                    "seconds": round3(l.load.seconds),
                })
            })
        };
        json!({
            "bench": "lifecycle",
            "date": m.date,
            "machine": {
                "nproc": m.nproc,
                "cpu": m.cpu,
                "kernel": m.kernel,
                "loadavg_at_start": m.loadavg,
            },
            "binary": m.binary.display().to_string(),
            "profile": m.profile,
            "git": m.git,
            "targets": {
                "exec_to_ready_ms_median": TARGET_READY_MS,
                "rss_mib_median": TARGET_RSS_MIB,
                "restart_gap_ms_median": TARGET_GAP_MS,
            },
            "metrics": rows,
            "load": {
                "re-exec": load(self.reexec),
                "exit 75": load(self.exit75),
            },
            "final_exit": {
                "re-exec": self.reexec.final_exit,
                "exit 75": self.exit75.final_exit,
            },
            "first_sequences": {
                "start": self.starts.first_sequence,
                "re-exec": self.reexec.first_sequence,
                "exit 75": self.exit75.first_sequence,
            },
            "findings": self.findings.json(),
            "observations": self.observations.json(),
            "background_cpus_busy": self.background_cpus.map(round3),
            "elapsed_s": round3(self.elapsed.as_secs_f64()),
        })
    }
}
