//! Findings (what looked wrong, counted by kind, with a first example) and the figures of
//! the report: median, nearest-rank p90, min and max, in milliseconds and MiB.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};

pub fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Things that looked wrong, by kind, with a count and the first example.
#[derive(Default)]
pub struct Findings(pub BTreeMap<String, (usize, String)>);

impl Findings {
    pub fn json(&self) -> Value {
        self.0
            .iter()
            .map(|(k, (n, e))| json!({"kind": k, "count": n, "example": e}))
            .collect()
    }

    pub fn total(&self) -> usize {
        self.0.values().map(|(n, _)| n).sum()
    }

    pub fn add(&mut self, kind: impl Into<String>, example: impl Into<String>) {
        let e = self.0.entry(kind.into()).or_insert((0, example.into()));
        e.0 += 1;
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub n: usize,
    pub median: f64,
    pub p90: f64,
    pub min: f64,
    pub max: f64,
}

pub fn stats(values: &[f64]) -> Option<Stats> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    // Nearest rank.
    let p90 = v[((n as f64 * 0.9).ceil() as usize).clamp(1, n) - 1];
    Some(Stats {
        n,
        median,
        p90,
        min: v[0],
        max: v[n - 1],
    })
}

pub fn stats_json(values: &[f64]) -> Value {
    match stats(values) {
        Some(s) => json!({
            "n": s.n,
            "median": round3(s.median),
            "p90": round3(s.p90),
            "min": round3(s.min),
            "max": round3(s.max),
            "samples": values.iter().map(|x| round3(*x)).collect::<Vec<_>>(),
        }),
        None => Value::Null,
    }
}

pub fn placement_json(placed: &[(f64, bool)]) -> Value {
    placed
        .iter()
        .map(|(t, inside)| json!({"ms": round3(*t), "before_ready": inside}))
        .collect()
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
