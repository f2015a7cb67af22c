//! What the lifecycle tells the gateway (and, through the control socket, the operator).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use serde::Serialize;

use super::drain::{ConnectionTracker, Shutdown};
use super::listeners::{ListenerSet, Origin};
use super::supervisor::Supervisor;
use crate::config::Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting,
    Serving,
    Reloading,
    Draining,
}

#[derive(Debug, Clone, Serialize)]
pub struct ListenerInfo {
    pub name: String,
    pub address: String,
    pub origin: Origin,
    /// Also parked in systemd's fd store.
    pub parked: bool,
}

/// The answer to the control socket's status request.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    pub pid: u32,
    pub version: &'static str,
    pub state: State,
    pub uptime_secs: u64,
    /// When this image started (changes on every restart, also a re-exec in place).
    pub started_at_unix_ms: u64,
    pub supervisor: Supervisor,
    pub config: String,
    pub state_dir: String,
    pub listeners: Vec<ListenerInfo>,
    pub connections: usize,
    pub requests: u64,
    /// How many configurations have been applied: 1 at start, +1 per successful reload.
    pub config_generation: u64,
    pub last_reload: Option<ReloadInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReloadInfo {
    /// 1 for the first reload of this process, +1 for each one after, failed or not.
    pub number: u64,
    pub at_unix_ms: u64,
    pub ok: bool,
    pub error: Option<String>,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    started_at_unix_ms: u64,
    supervisor: Supervisor,
    listeners: Vec<ListenerInfo>,
    connections: Arc<ConnectionTracker>,
    shutdown: Shutdown,
    mutable: Mutex<Mutable>,
}

#[derive(Debug)]
struct Mutable {
    state: State,
    config: String,
    state_dir: String,
    generation: u64,
    last_reload: Option<ReloadInfo>,
}

/// A cheap, cloneable view of the lifecycle.
#[derive(Debug, Clone)]
pub struct LifecycleHandle(Arc<Inner>);

impl LifecycleHandle {
    pub fn new(
        set: &ListenerSet,
        supervisor: Supervisor,
        connections: Arc<ConnectionTracker>,
        shutdown: Shutdown,
        config: &Config,
    ) -> Self {
        let listeners = set
            .listeners
            .iter()
            .map(|l| ListenerInfo {
                name: l.name.clone(),
                address: l.address.clone(),
                origin: l.origin,
                parked: l.parked,
            })
            .collect();
        LifecycleHandle(Arc::new(Inner {
            started: Instant::now(),
            started_at_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            supervisor,
            listeners,
            connections,
            shutdown,
            mutable: Mutex::new(Mutable {
                state: State::Starting,
                config: config.origin(),
                state_dir: config.state_dir.display().to_string(),
                generation: 1,
                last_reload: None,
            }),
        }))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Mutable) -> T) -> T {
        let mut m = self
            .0
            .mutable
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f(&mut m)
    }

    pub fn set_state(&self, state: State) {
        self.with(|m| m.state = state);
    }

    pub fn state(&self) -> State {
        self.with(|m| m.state)
    }

    pub fn reloaded(&self, config: &Config, error: Option<String>) {
        let at_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.with(|m| {
            let number = m.last_reload.as_ref().map_or(1, |r| r.number + 1);
            if error.is_none() {
                m.generation += 1;
            }
            m.config = config.origin();
            m.last_reload = Some(ReloadInfo {
                number,
                at_unix_ms,
                ok: error.is_none(),
                error,
            });
        });
    }

    /// Tells long-lived work (streams, runs) that a drain began and when it must end.
    pub fn shutdown(&self) -> Shutdown {
        self.0.shutdown.clone()
    }

    /// Asks for a graceful restart, exactly as SIGUSR1 does (it sends SIGUSR1 to this
    /// process): exit 75 for a service manager to relaunch, or a re-exec in place.
    pub fn request_restart(&self) -> std::io::Result<()> {
        super::signals::raise_restart()
    }

    /// Seconds since this image started.
    pub fn uptime(&self) -> std::time::Duration {
        self.0.started.elapsed()
    }

    pub fn listeners(&self) -> &[ListenerInfo] {
        &self.0.listeners
    }

    pub fn report(&self) -> StatusReport {
        let (state, config, state_dir, config_generation, last_reload) = self.with(|m| {
            (
                m.state,
                m.config.clone(),
                m.state_dir.clone(),
                m.generation,
                m.last_reload.clone(),
            )
        });
        StatusReport {
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION"),
            state,
            uptime_secs: self.0.started.elapsed().as_secs(),
            started_at_unix_ms: self.0.started_at_unix_ms,
            supervisor: self.0.supervisor,
            config,
            state_dir,
            listeners: self.0.listeners.clone(),
            connections: self.0.connections.active(),
            requests: self.0.connections.requests(),
            config_generation,
            last_reload,
        }
    }

    /// The one-line summary for `STATUS=`.
    pub fn status_line(&self, extra: Option<&str>) -> String {
        let mut names: Vec<&str> = self.0.listeners.iter().map(|l| l.name.as_str()).collect();
        names.dedup();
        let state = match self.state() {
            State::Starting => "starting",
            State::Serving => "serving",
            State::Reloading => "reloading",
            State::Draining => "draining",
        };
        let mut line = format!(
            "{state}: {} listeners, {} connections",
            names.len(),
            self.0.connections.active()
        );
        if let Some(extra) = extra {
            line.push_str(", ");
            line.push_str(extra);
        }
        if let Some(ReloadInfo { error: Some(e), .. }) = self.with(|m| m.last_reload.clone()) {
            line.push_str("; last reload failed: ");
            line.push_str(&e.replace('\n', " "));
        }
        line
    }
}
