//! Routes participants' replies to the checkout waiting for them.
//!
//! Each order instance has a private reply queue; commands carry its name
//! as `reply_to`. A reply that finds nobody waiting (its checkout timed out,
//! or the instance restarted) is dropped: the saga store, not a reply, is the
//! truth, and recovery finishes such sagas.

use std::collections::HashMap;
use std::sync::Mutex;

use common::messages::{Batch, Outcome, Reply, Step};
use common::types::SagaId;
use tokio::sync::oneshot;

#[derive(Default)]
pub struct Replies {
    waiting: Mutex<HashMap<(SagaId, Step), oneshot::Sender<Outcome>>>,
}

impl Replies {
    /// Registers interest in one step's reply; register before sending the command.
    pub fn expect(&self, saga: SagaId, step: Step) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.waiting
            .lock()
            .expect("reply map poisoned")
            .insert((saga, step), tx);
        rx
    }

    /// Forgets a step nobody waits for any more (timed out).
    pub fn forget(&self, saga: SagaId, step: Step) {
        self.waiting
            .lock()
            .expect("reply map poisoned")
            .remove(&(saga, step));
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
            if let Some(tx) = waiting.remove(&(reply.saga_id, reply.step)) {
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
        assert_eq!(charge.try_recv().unwrap(), Outcome::Applied);
        assert!(reserve.try_recv().is_err());
    }
}
