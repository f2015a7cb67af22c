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
