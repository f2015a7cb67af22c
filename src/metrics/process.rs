//! The process's own resident memory, descriptors and CPU time, read at each scrape under
//! the names every Prometheus dashboard knows (`process_*`). Linux reads `/proc`; elsewhere
//! only the CPU time (getrusage) and the descriptor limit are known.

use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

#[derive(Debug)]
pub(super) struct Collector;

/// Resident memory in bytes, from `/proc/self/status` (`VmRSS`, in kB).
fn resident_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<i64>()
        .ok()?;
    Some(kb * 1024)
}

fn open_fds() -> Option<i64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    // The directory being read is one of them.
    i64::try_from(n.saturating_sub(1)).ok()
}

fn cpu_seconds() -> Option<f64> {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let secs = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Some(secs(u.user_time()) + secs(u.system_time()))
}

fn max_fds() -> Option<i64> {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    i64::try_from(soft).ok()
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(cpu) = cpu_seconds() {
            let e = encoder.encode_descriptor(
                "process_cpu",
                "User and system CPU time spent",
                Some(&Unit::Seconds),
                MetricType::Counter,
            )?;
            ConstCounter::new(cpu).encode(e)?;
        }
        if let Some(rss) = resident_bytes() {
            let e = encoder.encode_descriptor(
                "process_resident_memory",
                "Resident memory size",
                Some(&Unit::Bytes),
                MetricType::Gauge,
            )?;
            ConstGauge::new(rss).encode(e)?;
        }
        if let Some(n) = open_fds() {
            let e = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(n).encode(e)?;
        }
        if let Some(n) = max_fds() {
            let e = encoder.encode_descriptor(
                "process_max_fds",
                "The soft limit on open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(n).encode(e)?;
        }
        Ok(())
    }
}
