//! Everything the service manager sees: listeners, readiness, signals, reload, drain,
//! exit statuses and re-exec. It knows nothing of routes; the gateway plugs in through
//! [`Service`] and receives listeners, a [`Shutdown`] and a [`LifecycleHandle`].
//!
//! The state machine is in `docs/LIFECYCLE.md`; each transition below is marked with it.

pub mod activation;
pub mod drain;
pub mod exit;
mod launchd;
pub mod listeners;
mod lock;
pub mod notify;
mod reexec;
mod reload_signal;
pub mod serve;
mod signals;
mod status;
pub mod supervisor;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::Config;
use crate::logging::LogControl;

pub use drain::Shutdown;
pub use exit::{ConfigurationError, ExitStatus};
pub use status::{LifecycleHandle, ListenerInfo, State, StatusReport};
pub use supervisor::{Supervisor, SupervisorChoice};

use activation::ActivationEnv;
use drain::Drain;
use listeners::{ListenerSet, Notes};
use notify::Notifier;
use reexec::Relaunch;
use signals::{Signal, Signals};

/// What the gateway's business provides to the lifecycle.
pub trait Service: Send + Sync + 'static {
    /// The HTTP service for listener `name` (`api`, `webhook` or `control`).
    fn router(&self, name: &str) -> axum::Router;
    /// A new configuration passed validation on SIGHUP; apply what can change live.
    fn reload(&self, config: &Config);
    /// The gateway's part of the `STATUS=` line, e.g. `0 active sessions`.
    fn summary(&self) -> Option<String> {
        None
    }
    /// The drain began: start nothing new, and resolve once what is under way that must
    /// not be cut (a reply being sent) has finished. Waited for within the drain's
    /// deadline, beside the connections.
    fn drain(&self) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
        Box::pin(async {})
    }
}

/// How the gateway was asked to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config_path: Option<PathBuf>,
    pub supervisor: SupervisorChoice,
}

enum Outcome {
    Exit(ExitStatus),
    ReExec(Vec<(String, std::os::fd::OwnedFd)>),
}

/// Runs the gateway until it stops, and returns the status to exit with. `make` builds the
/// gateway's business once the configuration is known.
pub fn run<S, F>(opts: RunOptions, env: ActivationEnv, make: F) -> ExitStatus
where
    S: Service,
    F: FnOnce(&Config, LifecycleHandle) -> anyhow::Result<S>,
{
    // starting: a configuration error exits 78 with one line on stderr.
    let config = match Config::load_or_default(opts.config_path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("hermes-gateway: {e}");
            return ExitStatus::Config;
        }
    };
    let log = match crate::logging::init(config.log_level.as_deref()) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hermes-gateway: cannot set up logging: {e}");
            return ExitStatus::Fatal;
        }
    };
    let relaunch = match Relaunch::capture() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("cannot resolve the binary's path, SIGUSR1 will not re-exec: {e}");
            None
        }
    };
    let evidence = supervisor::Evidence::gather(env.present(), env.reexec);
    let supervisor = supervisor::detect(opts.supervisor, &evidence);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("cannot start the async runtime: {e}");
            return ExitStatus::Fatal;
        }
    };
    let ctx = Context {
        opts,
        config,
        log,
        supervisor,
        relaunch: relaunch.clone(),
    };
    let outcome = runtime.block_on(ctx.serve(env, make));
    // Only one thread may remain for the descriptor shuffle of a re-exec.
    runtime.shutdown_timeout(Duration::from_millis(500));
    match outcome {
        Outcome::Exit(status) => status,
        Outcome::ReExec(sockets) => {
            let Some(relaunch) = relaunch else {
                return ExitStatus::Fatal;
            };
            tracing::info!(exe = %relaunch.exe.display(), "re-executing with {} inherited sockets", sockets.len());
            signals::block_for_exec();
            let err = reexec::exec(&relaunch, sockets);
            signals::unblock();
            tracing::error!("re-exec failed: {err}");
            ExitStatus::Fatal
        }
    }
}

struct Context {
    opts: RunOptions,
    config: Config,
    log: LogControl,
    supervisor: Supervisor,
    relaunch: Option<Relaunch>,
}

#[derive(Clone, Copy)]
enum StopKind {
    Stop,
    Restart,
}

impl Context {
    async fn serve<S, F>(self, env: ActivationEnv, make: F) -> Outcome
    where
        S: Service,
        F: FnOnce(&Config, LifecycleHandle) -> anyhow::Result<S>,
    {
        // Handlers first: the default action of SIGHUP and SIGUSR1 is to terminate.
        let mut signals = match Signals::install() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot install signal handlers: {e}");
                return Outcome::Exit(ExitStatus::Fatal);
            }
        };
        let notifier = Notifier::from_env().unwrap_or_else(|e| {
            tracing::warn!("NOTIFY_SOCKET unusable, readiness will not be reported: {e}");
            Notifier::disabled()
        });
        // RELOADING=1 straight from the SIGHUP handler (see reload_signal).
        let reloading_from_handler = reload_signal::install(notifier.target());
        let mut config = self.config;

        // One gateway per state folder, before any listener serves.
        let _lock = match lock::StateLock::acquire(&config.state_dir) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("{e}");
                return Outcome::Exit(ExitStatus::Fatal);
            }
        };
        let drains = drain::history::recall(&config.state_dir);
        crate::metrics::started(self.supervisor.as_str());
        crate::metrics::drains_before(
            &[("stop", drains.stops), ("restart", drains.restarts)],
            drains.seconds_total,
            drains.last_seconds,
        );
        let mut notes = Notes::new();
        let mut set = match listeners::acquire(&env, &config.listen, &notifier, &mut notes) {
            Ok(s) => s,
            Err(e) => {
                flush(notes);
                tracing::error!("{e}");
                return Outcome::Exit(ExitStatus::Fatal);
            }
        };
        if self.supervisor == Supervisor::Systemd {
            listeners::park_in_fdstore(&mut set, &notifier, &mut notes);
        }
        flush(notes);
        for l in &set.listeners {
            tracing::info!(listener = %l.name, address = %l.address, origin = %l.origin,
                "listener {} on {} ({})", l.name, l.address, l.origin);
        }

        let drain = Drain::new();
        let handle = LifecycleHandle::new(
            &set,
            self.supervisor,
            drain.connections(),
            drain.shutdown(),
            &config,
        );
        let service = match make(&config, handle.clone()) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!("cannot start the gateway: {e:#}");
                // A configuration-class problem found by the gateway exits 78 too.
                let config_class = e.chain().any(|c| c.is::<ConfigurationError>());
                return Outcome::Exit(if config_class {
                    ExitStatus::Config
                } else {
                    ExitStatus::Fatal
                });
            }
        };
        let reexec = self.supervisor == Supervisor::None && self.relaunch.is_some();
        let (handover, accept_loops) =
            match serve_all(set, service.as_ref(), &drain, reexec, &config) {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!("cannot serve: {e}");
                    return Outcome::Exit(ExitStatus::Fatal);
                }
            };

        // starting → serving
        handle.set_state(State::Serving);
        let line = status_line(&handle, service.as_ref());
        if let Err(e) = notifier.send(&["READY=1", &format!("STATUS={line}")]) {
            tracing::warn!("cannot notify readiness: {e}");
        }
        tracing::info!(supervisor = %self.supervisor, config = %config.origin(), "ready: {line}");
        let watchdog = spawn_watchdog(&notifier);
        let refresher = spawn_status_refresher(notifier.clone(), handle.clone(), service.clone());

        let mut kind = loop {
            match signals.next().await {
                Signal::Reload => {
                    // serving → reloading → serving
                    reload(
                        &self.opts,
                        &mut config,
                        &notifier,
                        reloading_from_handler,
                        &handle,
                        service.as_ref(),
                        &self.log,
                    );
                }
                Signal::Stop => break StopKind::Stop,
                Signal::Restart => break StopKind::Restart,
            }
        };
        refresher.abort();

        // serving → draining
        handle.set_state(State::Draining);
        let what = match kind {
            StopKind::Stop => "stop",
            StopKind::Restart => "restart",
        };
        // The drain begins before STOPPING=1 is announced: whoever sees STOPPING=1 already
        // gets `Connection: close` on the next response.
        let drain_began = std::time::Instant::now();
        let deadline = drain.begin(config.drain_timeout, config.idle_grace);
        let open = drain.connections().active();
        let _ = notifier.send(&[
            "STOPPING=1",
            &format!("STATUS=draining for {what}: {open} connections open"),
        ]);
        tracing::info!(
            "{what} requested: draining {open} connections (deadline {:?})",
            config.drain_timeout
        );
        let extender = spawn_timeout_extender(notifier.clone(), drain.connections(), deadline);
        let business = tokio::spawn(service.drain());
        // Every accept loop has stopped (and counted what it accepted) before the
        // connections are counted down; otherwise a connection accepted at the very moment
        // the drain began could be dropped unanswered — a reset, seen in the benchmark.
        for l in accept_loops {
            let _ = l.await;
        }
        let left = {
            let wait = drain.wait();
            tokio::pin!(wait);
            loop {
                tokio::select! {
                    left = &mut wait => break left,
                    s = signals.next() => match (s, kind) {
                        // A stop asked for during a restart's drain wins: the drain goes
                        // on to its deadline, then the gateway exits instead of coming
                        // back (re-executing in place would ignore the operator's stop).
                        (Signal::Stop, StopKind::Restart) => {
                            tracing::warn!("stop requested during the restart's drain: stopping instead of restarting");
                            let _ = notifier.send(&["STATUS=draining for stop (asked during a restart)"]);
                            kind = StopKind::Stop;
                        }
                        (Signal::Stop, StopKind::Stop) => {
                            tracing::warn!("second stop signal: closing every connection now");
                            drain.begin(Duration::ZERO, Duration::ZERO);
                        }
                        // Reloads and further restarts have nothing to do during a drain.
                        _ => {}
                    },
                }
            }
        };
        if tokio::time::timeout_at(deadline, business).await.is_err() {
            tracing::warn!(
                "work under way was still running at the drain deadline; it resumes at the next start"
            );
        }
        extender.abort();
        if let Some(w) = watchdog {
            w.abort();
        }
        if left > 0 {
            tracing::warn!("{left} connections were still open at the drain deadline; closed");
        }
        drain::history::remember(
            &config.state_dir,
            matches!(kind, StopKind::Restart),
            drain_began.elapsed(),
        );
        // draining → exit
        match kind {
            StopKind::Stop => {
                tracing::info!("stopped");
                Outcome::Exit(ExitStatus::Stopped)
            }
            StopKind::Restart if self.supervisor == Supervisor::None => match handover {
                Some(h) => Outcome::ReExec(h),
                None => Outcome::Exit(ExitStatus::Restart),
            },
            StopKind::Restart => {
                tracing::info!(
                    "exiting with status 75 for the {} to relaunch",
                    self.supervisor
                );
                Outcome::Exit(ExitStatus::Restart)
            }
        }
    }
}

type Handover = Option<Vec<(String, std::os::fd::OwnedFd)>>;
type AcceptLoops = Vec<tokio::task::JoinHandle<()>>;

/// Starts an accept loop per listener. With `keep_for_reexec`, duplicates of the sockets
/// are kept for the hand-over to the next image.
fn serve_all<S: Service>(
    set: ListenerSet,
    service: &S,
    drain: &Drain,
    keep_for_reexec: bool,
    config: &Config,
) -> std::io::Result<(Handover, AcceptLoops)> {
    let mut handover = keep_for_reexec.then(Vec::new);
    let mut loops = Vec::new();
    // TCP listeners share the limit; the control socket is never starved by them.
    let max = connection_limit(config);
    tracing::info!("serving at most {max} connections at once ([gateway] max_connections)");
    let limit = Arc::new(tokio::sync::Semaphore::new(max));
    for l in set.listeners {
        if let Some(h) = handover.as_mut() {
            h.push((l.name.clone(), l.socket.as_fd().try_clone_to_owned()?));
        }
        let router = service.router(&l.name);
        let limit = matches!(l.socket, listeners::Socket::Tcp(_)).then(|| limit.clone());
        loops.push(serve::spawn(
            l,
            router,
            drain.shutdown(),
            drain.connections(),
            config.header_timeout,
            limit,
        )?);
    }
    Ok((handover, loops))
}

/// `[gateway] max_connections`, or what the descriptor limit leaves once the store, the
/// agents' pipes and upstream connections have theirs: each connection is a descriptor.
fn connection_limit(config: &Config) -> usize {
    if let Some(n) = config.max_connections {
        return n;
    }
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let reserve = 64 + 4 * config.sessions.max_concurrent_runs as u64;
    usize::try_from(soft.saturating_sub(reserve).max(16)).unwrap_or(usize::MAX)
}

fn flush(notes: Notes) {
    for (level, msg) in notes {
        match level {
            tracing::Level::ERROR => tracing::error!("{msg}"),
            tracing::Level::WARN => tracing::warn!("{msg}"),
            tracing::Level::INFO => tracing::info!("{msg}"),
            _ => tracing::debug!("{msg}"),
        }
    }
}

fn status_line<S: Service + ?Sized>(handle: &LifecycleHandle, service: &S) -> String {
    handle.status_line(service.summary().as_deref())
}

fn reload<S: Service>(
    opts: &RunOptions,
    config: &mut Config,
    notifier: &Notifier,
    announced: bool,
    handle: &LifecycleHandle,
    service: &S,
    log: &LogControl,
) {
    handle.set_state(State::Reloading);
    if !announced {
        let usec = notify::monotonic_usec();
        let _ = notifier.send(&[
            "RELOADING=1",
            &format!("MONOTONIC_USEC={usec}"),
            "STATUS=reloading configuration",
        ]);
    }
    match Config::load_or_default(opts.config_path.as_deref()) {
        Ok(new) => {
            for ((name, old), (_, addr)) in config
                .listen
                .by_name()
                .iter()
                .zip(new.listen.by_name().iter())
            {
                if old != addr {
                    tracing::warn!(listener = %name,
                        "listener `{name}` changed from {old} to {addr}: this takes a restart (systemctl restart, or SIGUSR1); still serving {old}");
                }
            }
            if new.max_connections != config.max_connections {
                tracing::warn!("[gateway] max_connections changed: this takes a restart");
            }
            if new.state_dir != config.state_dir {
                tracing::warn!(
                    "[state] dir changed to {}: this takes a restart",
                    new.state_dir.display()
                );
            }
            if let Err(e) = log.set_level(new.log_level.as_deref()) {
                tracing::warn!("log level not changed: {e}");
            }
            service.reload(&new);
            crate::metrics::reloaded(true);
            tracing::info!(config = %new.origin(), "configuration reloaded from {}", new.origin());
            handle.reloaded(&new, None);
            *config = new;
        }
        Err(e) => {
            crate::metrics::reloaded(false);
            tracing::error!("reload failed, still running the previous configuration: {e}");
            handle.reloaded(config, Some(e.to_string()));
        }
    }
    handle.set_state(State::Serving);
    let line = status_line(handle, service);
    let _ = notifier.send(&["READY=1", &format!("STATUS={line}")]);
}

/// `WATCHDOG=1` at half the manager's interval, only while the runtime runs tasks.
fn spawn_watchdog(notifier: &Notifier) -> Option<tokio::task::JoinHandle<()>> {
    let interval = notify::watchdog_interval(std::process::id())? / 2;
    let notifier = notifier.clone();
    tracing::debug!("watchdog: pinging every {interval:?}");
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            // A task that a worker must pick up: a stuck runtime misses the ping.
            let probe = tokio::spawn(async {});
            if tokio::time::timeout(interval, probe).await.is_ok() {
                let _ = notifier.send(&["WATCHDOG=1"]);
            } else {
                tracing::warn!("runtime unresponsive: skipping the watchdog ping");
            }
        }
    }))
}

fn spawn_status_refresher<S: Service>(
    notifier: Notifier,
    handle: LifecycleHandle,
    service: Arc<S>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        // READY=1 carried the current line already.
        let mut last = status_line(&handle, service.as_ref());
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        tick.tick().await;
        loop {
            tick.tick().await;
            let line = status_line(&handle, service.as_ref());
            if line != last {
                let _ = notifier.send(&[&format!("STATUS={line}")]);
                last = line;
            }
        }
    })
}

/// While connections remain, keep the manager's stop timeout beyond our own deadline.
fn spawn_timeout_extender(
    notifier: Notifier,
    connections: Arc<drain::ConnectionTracker>,
    deadline: tokio::time::Instant,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let open = connections.active();
            if open == 0 {
                continue;
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let usec = (left + Duration::from_secs(5)).as_micros();
            let _ = notifier.send(&[
                &format!("EXTEND_TIMEOUT_USEC={usec}"),
                &format!(
                    "STATUS=draining: {open} connections open, {}s left",
                    left.as_secs()
                ),
            ]);
        }
    })
}
