//! The drain: stop accepting, finish what is in flight, close keep-alive connections
//! politely, and never outlive the deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Serving,
    Draining {
        deadline: Instant,
        idle_grace: Duration,
    },
}

/// The lifecycle's side: starts the drain and waits for it.
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<Phase>,
    connections: Arc<ConnectionTracker>,
}

/// The gateway's side: tells long-lived work that the drain began and when it must end.
#[derive(Debug, Clone)]
pub struct Shutdown {
    rx: watch::Receiver<Phase>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Phase::Serving);
        Drain {
            tx,
            connections: Arc::new(ConnectionTracker::default()),
        }
    }

    pub fn shutdown(&self) -> Shutdown {
        Shutdown {
            rx: self.tx.subscribe(),
        }
    }

    pub fn connections(&self) -> Arc<ConnectionTracker> {
        self.connections.clone()
    }

    /// Begins the drain; the deadline is `timeout` from now. A second call only ever moves
    /// the deadline earlier (a second SIGTERM means "now").
    pub fn begin(&self, timeout: Duration, idle_grace: Duration) -> Instant {
        let wanted = Instant::now() + timeout;
        let mut deadline = wanted;
        self.tx.send_modify(|p| {
            if let Phase::Draining { deadline: d, .. } = p {
                deadline = (*d).min(wanted);
            }
            *p = Phase::Draining {
                deadline,
                idle_grace,
            };
        });
        deadline
    }

    /// Waits until every connection has ended or the deadline (plus a moment for the
    /// connection tasks to notice it) has passed. Returns the connections still open.
    pub async fn wait(&self) -> usize {
        let deadline = match *self.tx.borrow() {
            Phase::Draining { deadline, .. } => deadline,
            Phase::Serving => return self.connections.active(),
        };
        let grace = deadline + Duration::from_millis(200);
        let _ = tokio::time::timeout_at(grace, self.connections.all_closed()).await;
        self.connections.active()
    }
}

impl Shutdown {
    pub fn is_draining(&self) -> bool {
        matches!(*self.rx.borrow(), Phase::Draining { .. })
    }

    /// Resolves when the drain begins, with its deadline and the idle grace.
    pub async fn started(&mut self) -> (Instant, Duration) {
        loop {
            if let Phase::Draining {
                deadline,
                idle_grace,
            } = *self.rx.borrow_and_update()
            {
                return (deadline, idle_grace);
            }
            if self.rx.changed().await.is_err() {
                // The lifecycle is gone: treat it as an immediate drain.
                return (Instant::now(), Duration::ZERO);
            }
        }
    }

    /// Resolves at the hard deadline (never, while serving... until a drain begins).
    pub async fn deadline(&mut self) {
        loop {
            let (deadline, _) = self.started().await;
            tokio::time::sleep_until(deadline).await;
            // The deadline may have moved earlier while we slept; re-check.
            if let Phase::Draining { deadline: d, .. } = *self.rx.borrow()
                && d <= Instant::now()
            {
                return;
            }
        }
    }
}

/// Counts open connections and requests, for the drain and for `STATUS=`.
#[derive(Debug, Default)]
pub struct ConnectionTracker {
    active: AtomicUsize,
    requests: AtomicU64,
    closed: Notify,
}

impl ConnectionTracker {
    pub fn open(self: &Arc<Self>) -> ConnectionGuard {
        self.active.fetch_add(1, Ordering::SeqCst);
        ConnectionGuard {
            tracker: self.clone(),
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    async fn all_closed(&self) {
        loop {
            let notified = self.closed.notified();
            if self.active() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Held by a connection task for as long as the connection is open.
#[derive(Debug)]
pub struct ConnectionGuard {
    tracker: Arc<ConnectionTracker>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.tracker.active.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.tracker.closed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_returns_when_last_connection_closes() {
        let d = Drain::new();
        let g = d.connections().open();
        d.begin(Duration::from_secs(10), Duration::ZERO);
        let t = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            drop(g);
        });
        let left = tokio::time::timeout(Duration::from_secs(2), d.wait())
            .await
            .unwrap();
        assert_eq!(left, 0);
        t.await.unwrap();
    }

    #[tokio::test]
    async fn wait_gives_up_at_the_deadline() {
        let d = Drain::new();
        let _g = d.connections().open();
        d.begin(Duration::from_millis(50), Duration::ZERO);
        let left = tokio::time::timeout(Duration::from_secs(2), d.wait())
            .await
            .unwrap();
        assert_eq!(left, 1);
    }

    #[tokio::test]
    async fn second_begin_only_moves_the_deadline_earlier() {
        let d = Drain::new();
        let first = d.begin(Duration::from_secs(30), Duration::ZERO);
        let later = d.begin(Duration::from_secs(60), Duration::ZERO);
        assert_eq!(first, later);
        let sooner = d.begin(Duration::ZERO, Duration::ZERO);
        assert!(sooner < first);
    }

    #[tokio::test]
    async fn shutdown_sees_the_drain() {
        let d = Drain::new();
        let mut s = d.shutdown();
        assert!(!s.is_draining());
        d.begin(Duration::from_millis(10), Duration::from_millis(5));
        let (_, grace) = s.started().await;
        assert_eq!(grace, Duration::from_millis(5));
        tokio::time::timeout(Duration::from_secs(1), s.deadline())
            .await
            .unwrap();
    }
}

/// The drains of every process on a state folder, kept there (`drains`) so that their
/// count and duration survive the restarts they end in: a process's own drain is its last
/// act, and nothing could scrape it.
pub mod history {
    use std::path::Path;
    use std::time::Duration;

    const FILE: &str = "drains";

    #[derive(Debug, Default, Clone, PartialEq)]
    pub struct Drains {
        pub stops: u64,
        pub restarts: u64,
        pub seconds_total: f64,
        pub last_seconds: f64,
    }

    /// What the folder holds; nothing (a first start, or an unreadable file) is zero.
    pub fn recall(state_dir: &Path) -> Drains {
        let Ok(text) = std::fs::read_to_string(state_dir.join(FILE)) else {
            return Drains::default();
        };
        let mut d = Drains::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once(' ') else {
                continue;
            };
            match k {
                "stops" => d.stops = v.parse().unwrap_or(0),
                "restarts" => d.restarts = v.parse().unwrap_or(0),
                "seconds_total" => d.seconds_total = v.parse().unwrap_or(0.0),
                "last_seconds" => d.last_seconds = v.parse().unwrap_or(0.0),
                _ => {}
            }
        }
        d
    }

    /// Adds a drain (`restart`: it ends in a restart) and writes the file anew (a
    /// temporary file renamed over it). Best effort: a failure is logged, the exit goes on.
    pub fn remember(state_dir: &Path, restart: bool, took: Duration) {
        let mut d = recall(state_dir);
        if restart {
            d.restarts += 1;
        } else {
            d.stops += 1;
        }
        d.seconds_total += took.as_secs_f64();
        d.last_seconds = took.as_secs_f64();
        let text = format!(
            "stops {}\nrestarts {}\nseconds_total {}\nlast_seconds {}\n",
            d.stops, d.restarts, d.seconds_total, d.last_seconds
        );
        let tmp = state_dir.join(format!("{FILE}.tmp"));
        let r =
            std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, state_dir.join(FILE)));
        if let Err(e) = r {
            tracing::warn!("cannot record the drain in {}: {e}", state_dir.display());
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn drains_add_up_across_processes() {
            let dir = tempfile::tempdir().unwrap();
            assert_eq!(recall(dir.path()), Drains::default());
            remember(dir.path(), true, Duration::from_millis(250));
            remember(dir.path(), false, Duration::from_millis(500));
            let d = recall(dir.path());
            assert_eq!((d.stops, d.restarts), (1, 1));
            assert!((d.seconds_total - 0.75).abs() < 1e-9);
            assert!((d.last_seconds - 0.5).abs() < 1e-9);
        }
    }
}
