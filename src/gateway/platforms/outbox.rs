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
            for (i, part) in parts.iter().enumerate().skip(d.from_part) {
                let text = if i == d.from_part && d.resent {
                    format!("{RESENT_MARKER}{part}")
                } else {
                    part.clone()
                };
                self.paced().await;
                let part = Part {
                    text: &text,
                    index: i,
                    delivery_id: d.delivery_id,
                };
                match self.adapter.send_part(d.target, part).await {
                    Ok(_) => {
                        self.instance.ok(self.instance.mode);
                        (d.on_part)(i + 1);
                    }
                    Err(e) => {
                        self.instance.failed(e.message());
                        return Err(e);
                    }
                }
            }
            Ok(parts.len())
        })
    }
}
