//! Logging: the native journald protocol with structured fields when stderr is the journal
//! (`JOURNAL_STREAM` names it), readable lines on stderr otherwise — coloured only when
//! stderr is a terminal and `NO_COLOR` is not set, so a file or a pipe gets plain text.

use std::ffi::OsStr;
use std::io::IsTerminal;
use std::os::fd::AsFd;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("bad log filter `{0}`: {1}")]
    Filter(String, String),
    #[error("{0}")]
    Init(String),
}

/// Changes the level at run time (SIGHUP).
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    pub journald: bool,
}

fn filter(config_level: Option<&str>) -> Result<EnvFilter, LogError> {
    // RUST_LOG wins, so that an operator can turn up logging without editing the file.
    let spec = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| config_level.map(str::to_owned))
        .unwrap_or_else(|| "info".to_owned());
    EnvFilter::try_new(&spec).map_err(|e| LogError::Filter(spec, e.to_string()))
}

/// Whether stderr is connected to the journal, per `JOURNAL_STREAM=dev:inode`.
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        // The field types differ between platforms (u64 on Linux, i32/u64 on macOS).
        #[allow(clippy::unnecessary_cast)]
        Ok(st) => st.st_dev as u64 == dev && st.st_ino as u64 == ino,
        Err(_) => false,
    }
}

/// Whether readable lines carry ANSI colour codes: only on a terminal, and never when
/// `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
fn colour(stderr_is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// info → 6 (informational), as journalctl and syslog expect; the crate's default maps
/// info to 5 (notice), which would make every access-log line stand out.
fn syslog_priorities() -> tracing_journald::PriorityMappings {
    use tracing_journald::Priority;
    tracing_journald::PriorityMappings {
        error: Priority::Error,
        warn: Priority::Warning,
        info: Priority::Informational,
        debug: Priority::Debug,
        trace: Priority::Debug,
    }
}

pub fn init(config_level: Option<&str>) -> Result<LogControl, LogError> {
    let (filter_layer, handle) = reload::Layer::new(filter(config_level)?);
    let journal = if stderr_is_journal() {
        tracing_journald::layer().ok().map(|l| {
            l.with_field_prefix(None)
                .with_syslog_identifier("hermes-gateway".into())
                .with_priority_mappings(syslog_priorities())
        })
    } else {
        None
    };
    let journald = journal.is_some();
    let fmt = if journald {
        None
    } else {
        Some(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour(
                    std::io::stderr().is_terminal(),
                    std::env::var_os("NO_COLOR").as_deref(),
                ))
                .with_target(false)
                .boxed(),
        )
    };
    tracing_subscriber::registry()
        .with(filter_layer)
        .with(journal)
        .with(fmt)
        .try_init()
        .map_err(|e| LogError::Init(e.to_string()))?;
    Ok(LogControl { handle, journald })
}

impl LogControl {
    pub fn set_level(&self, config_level: Option<&str>) -> Result<(), LogError> {
        let f = filter(config_level)?;
        self.handle
            .reload(f)
            .map_err(|e| LogError::Init(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(!colour(false, None), "a file or a pipe gets plain text");
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(true, Some(OsStr::new("false"))), "any value counts");
        assert!(!colour(false, Some(OsStr::new("1"))));
        // no-color.org: an empty NO_COLOR is as if it were not set.
        assert!(colour(true, Some(OsStr::new(""))));
    }
}
