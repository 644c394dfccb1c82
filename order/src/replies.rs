//! Routes participants' replies to the checkout waiting for them.
//!
//! Each order instance has a reply queue of its own (`order.replies.<instance>`);
//! commands carry its name as `reply_to`. The queue is durable: a reply sent
//! while the instance is reconnecting, or while the broker restarts, waits
//! there and still reaches the step waiting for it. A reply that finds
//! nobody waiting (its step timed out, or the instance restarted) is dropped:
//! the saga store, not a reply, is the truth, and recovery finishes such sagas.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::messages::{Batch, Outcome, Reply, Step};
use common::types::SagaId;
use tokio::sync::oneshot;

/// Each wait is tagged with a number, so a wait only ever removes its own entry.
type Waiting = Mutex<HashMap<(SagaId, Step), (u64, oneshot::Sender<Outcome>)>>;

#[derive(Default)]
pub struct Replies {
    waiting: Arc<Waiting>,
    next_tag: AtomicU64,
}

/// Interest in one step's reply. Dropping it (the reply came, the step timed
/// out, or the waiting task was cancelled) removes the entry, so the map
/// never keeps a step nobody waits for.
pub struct Expected {
    waiting: Arc<Waiting>,
    key: (SagaId, Step),
    tag: u64,
    rx: oneshot::Receiver<Outcome>,
}

impl Expected {
    /// The reply, or `None` if the entry was replaced by a newer wait for the same step.
    pub async fn recv(&mut self) -> Option<Outcome> {
        (&mut self.rx).await.ok()
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        let mut waiting = self.waiting.lock().expect("reply map poisoned");
        // Only our own entry: a newer wait for the same step may have replaced it.
        if waiting
            .get(&self.key)
            .is_some_and(|(tag, _)| *tag == self.tag)
        {
            waiting.remove(&self.key);
        }
    }
}

impl Replies {
    /// Registers interest in one step's reply; register before sending the command.
    pub fn expect(&self, saga: SagaId, step: Step) -> Expected {
        let (tx, rx) = oneshot::channel();
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        self.waiting
            .lock()
            .expect("reply map poisoned")
            .insert((saga, step), (tag, tx));
        Expected {
            waiting: self.waiting.clone(),
            key: (saga, step),
            tag,
            rx,
        }
    }

    /// Steps waited for right now.
    pub fn waiting(&self) -> usize {
        self.waiting.lock().expect("reply map poisoned").len()
    }

    /// Hands every reply of a message to its waiter.
    pub fn deliver(&self, body: &[u8]) {
        let batch = match Batch::<Reply>::from_json(body) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, "undecodable reply dropped");
                return;
            }
        };
        let mut waiting = self.waiting.lock().expect("reply map poisoned");
        for reply in batch.items {
            if let Some((_, tx)) = waiting.remove(&(reply.saga_id, reply.step)) {
                let _ = tx.send(reply.outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_reaches_its_waiter_only() {
        let replies = Replies::default();
        let saga = SagaId::new();
        let mut charge = replies.expect(saga, Step::Charge);
        let mut reserve = replies.expect(saga, Step::Reserve);
        let body = Batch::of(vec![Reply {
            saga_id: saga,
            step: Step::Charge,
            outcome: Outcome::Applied,
        }])
        .to_json();
        replies.deliver(&body);
        assert_eq!(charge.rx.try_recv().unwrap(), Outcome::Applied);
        assert!(reserve.rx.try_recv().is_err());
    }

    #[test]
    fn a_dropped_wait_leaves_nothing_behind() {
        let replies = Replies::default();
        let saga = SagaId::new();
        let first = replies.expect(saga, Step::Reserve);
        assert_eq!(replies.waiting(), 1);
        drop(first);
        assert_eq!(replies.waiting(), 0);
        // A newer wait for the same step is not removed by the older one's drop.
        let older = replies.expect(saga, Step::Reserve);
        let newer = replies.expect(saga, Step::Reserve);
        drop(older);
        assert_eq!(replies.waiting(), 1);
        drop(newer);
        assert_eq!(replies.waiting(), 0);
    }
}
