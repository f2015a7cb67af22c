//! The core's outbox: what the ledger calls to send a platform's replies.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use super::{Adapter, Instance, Part, Typing, chunk};
use crate::gateway::deliveries::chat::{RESENT_MARKER, SendFuture};
use crate::gateway::deliveries::{ChatDelivery, ChatOutbox, ChatTarget};
use crate::gateway::rate::TokenBucket;

/// The core's outbox for one instance: splits a reply, paces the parts by the platform's
/// send rate, puts the restart marker where it belongs, records each part confirmed.
pub(super) struct Outbox<A: Adapter> {
    pub(super) instance: Arc<Instance>,
    pub(super) adapter: Arc<A>,
    pub(super) pace: Mutex<TokenBucket>,
}

impl<A: Adapter> Outbox<A> {
    async fn paced(&self) {
        loop {
            let wait = self
                .pace
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take(Instant::now());
            match wait {
                None => return,
                Some(d) => tokio::time::sleep(d).await,
            }
        }
    }
}

impl<A: Adapter> ChatOutbox for Outbox<A> {
    fn typing<'a>(&'a self, target: &'a ChatTarget) -> Typing<'a> {
        self.adapter.typing(target)
    }

    fn deliver<'a>(&'a self, d: ChatDelivery<'a>) -> SendFuture<'a> {
        Box::pin(async move {
            let unit = self.adapter.unit();
            // Room for the marker in every part: parts must not move between attempts.
            let reserve: usize = RESENT_MARKER.chars().map(unit).sum();
            let parts = chunk::split(d.text, self.adapter.max_len().saturating_sub(reserve), unit);
            // Parts go in requests of `batch()`, counted from the first part not yet
            // confirmed: an attempt after a restart sends the same requests again.
            let batch = self.adapter.batch().max(1);
            let mut i = d.from_part;
            while i < parts.len() {
                let end = (i + batch).min(parts.len());
                let texts: Vec<String> = (i..end)
                    .map(|k| {
                        if k == d.from_part && d.resent {
                            format!("{RESENT_MARKER}{}", parts[k])
                        } else {
                            parts[k].clone()
                        }
                    })
                    .collect();
                let these: Vec<Part<'_>> = texts
                    .iter()
                    .enumerate()
                    .map(|(n, text)| Part {
                        text,
                        index: i + n,
                        delivery_id: d.delivery_id,
                    })
                    .collect();
                self.paced().await;
                let sent = match these.as_slice() {
                    [one] => self.adapter.send_part(d.target, *one).await,
                    several => self.adapter.send_parts(d.target, several).await,
                };
                match sent {
                    Ok(_) => {
                        self.instance.ok(self.instance.mode);
                        (d.on_part)(end, parts.len());
                    }
                    Err(e) => {
                        self.instance.failed(e.message());
                        return Err(e);
                    }
                }
                i = end;
            }
            Ok(parts.len())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::config::{AccessConfig, RateLimit};
    use crate::gateway::deliveries::SendError;

    /// Records each request's parts (index, text); fails the request at `fail_at`.
    struct Recorder {
        batch: usize,
        fail_at: Option<usize>,
        requests: Mutex<Vec<Vec<(usize, String)>>>,
    }

    impl Recorder {
        fn record(&self, parts: &[Part<'_>]) -> Result<usize, SendError> {
            let mut r = self.requests.lock().unwrap();
            if self.fail_at == Some(parts[0].index) {
                return Err(SendError::Transient("stub".into()));
            }
            r.push(parts.iter().map(|p| (p.index, p.text.to_owned())).collect());
            Ok(parts.len())
        }
    }

    impl Adapter for Recorder {
        fn max_len(&self) -> usize {
            200
        }
        fn unit(&self) -> chunk::Unit {
            chunk::chars
        }
        fn batch(&self) -> usize {
            self.batch
        }
        fn send_part<'a>(&'a self, _t: &'a ChatTarget, part: Part<'a>) -> SendFuture<'a> {
            let r = self.record(&[part]);
            Box::pin(async move { r })
        }
        fn send_parts<'a>(&'a self, _t: &'a ChatTarget, parts: &'a [Part<'a>]) -> SendFuture<'a> {
            let r = self.record(parts);
            Box::pin(async move { r })
        }
        fn typing<'a>(&'a self, _t: &'a ChatTarget) -> Typing<'a> {
            Box::pin(async {})
        }
    }

    fn outbox(batch: usize, fail_at: Option<usize>) -> Outbox<Recorder> {
        let fast = RateLimit {
            count: 1000,
            per: std::time::Duration::from_secs(1),
            burst: 1000,
        };
        Outbox {
            instance: Instance::new("line", "t", "webhook", true, &AccessConfig::default(), fast),
            adapter: Arc::new(Recorder {
                batch,
                fail_at,
                requests: Mutex::new(Vec::new()),
            }),
            pace: Mutex::new(TokenBucket::new(fast)),
        }
    }

    fn target() -> ChatTarget {
        ChatTarget {
            platform: "line".into(),
            name: "t".into(),
            chat_id: "U1".into(),
            thread_id: None,
            reply_to: None,
            ordered: true,
        }
    }

    /// Seven paragraphs of about 100 characters: seven parts of at most 200 − the marker.
    fn reply() -> String {
        (0..7)
            .map(|i| format!("{i}{}", "x".repeat(99)))
            .collect::<Vec<_>>()
            .join("\n\n")
    }

    #[tokio::test]
    async fn parts_go_in_requests_of_the_adapters_batch_and_resume_whole() {
        let o = outbox(5, Some(5));
        let (t, text) = (target(), reply());
        let confirmed = Mutex::new(Vec::new());
        let on_part = |n: usize, _total: usize| confirmed.lock().unwrap().push(n);
        let d = |from_part, resent| ChatDelivery {
            target: &t,
            delivery_id: "dlv_x",
            text: &text,
            from_part,
            resent,
            on_part: &on_part,
        };
        // The second request (parts 5 and 6) fails: the first five are confirmed at once.
        assert!(o.deliver(d(0, false)).await.is_err());
        assert_eq!(*confirmed.lock().unwrap(), [5]);
        let sent: Vec<Vec<usize>> = o
            .adapter
            .requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.iter().map(|(i, _)| *i).collect())
            .collect();
        assert_eq!(sent, [vec![0, 1, 2, 3, 4]]);
        // A later attempt (after a restart: marked) goes on from part 5, in one request.
        let o2 = outbox(5, None);
        assert_eq!(o2.deliver(d(5, true)).await, Ok(7));
        {
            let r = o2.adapter.requests.lock().unwrap();
            assert_eq!(r.len(), 1);
            assert_eq!(r[0].iter().map(|(i, _)| *i).collect::<Vec<_>>(), [5, 6]);
            assert!(r[0][0].1.starts_with(RESENT_MARKER) && r[0][0].1.contains("5xxx"));
            assert!(!r[0][1].1.starts_with(RESENT_MARKER));
        }
        // One part per request where the platform takes one.
        let o3 = outbox(1, None);
        assert_eq!(o3.deliver(d(0, false)).await, Ok(7));
        assert_eq!(o3.adapter.requests.lock().unwrap().len(), 7);
    }
}
