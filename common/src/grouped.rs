//! Group publishing: the commands (or replies) that many concurrent sagas
//! send to the same queue travel together, as one [`Batch`] message.
//!
//! Why: a persistent, confirmed message costs the broker about the same
//! whether it carries one saga's command or fifty, and the broker was the
//! biggest single CPU cost of a checkout (one message per step, reply and
//! settle). The protocol always carried batches; this is what fills them.
//!
//! How a batch forms, without a timer: each lane (destination queue and
//! reply queue) lets at most [`IN_FLIGHT`] publishes wait for their confirms
//! at once. While they wait, whatever else is sent to the lane queues up,
//! and the next publish takes all of it (up to [`MAX_ITEMS`]). An idle lane
//! therefore sends a lone item at once, with no added latency, and a busy
//! one sends bigger messages instead of more of them.
//!
//! Every caller still waits for the confirm of the message that carried its
//! item, and gets its error if that publish failed: nothing about what a
//! confirm means changes. The message carries the trace context of its first
//! item's sender (one `traceparent` per message).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::types::{FieldTable, ShortString};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::broker::{persistent_json, Broker, BrokerError};
use crate::messages::PROTOCOL_VERSION;

/// Publishes of one lane that may wait for their confirms at once.
pub const IN_FLIGHT: usize = 1;
/// The most items one message carries.
pub const MAX_ITEMS: usize = 128;

/// Where a lane's messages go: the queue, and the queue replies should go to.
type Lane = (String, Option<String>);

struct Pending {
    item: Vec<u8>,
    headers: FieldTable,
    budget: Duration,
    confirmed: oneshot::Sender<Result<(), String>>,
}

/// The process's group publisher (one per broker connection).
pub struct Grouped {
    broker: Arc<Broker>,
    lanes: Mutex<HashMap<Lane, mpsc::UnboundedSender<Pending>>>,
}

impl Grouped {
    pub fn new(broker: Arc<Broker>) -> Arc<Self> {
        Arc::new(Self {
            broker,
            lanes: Mutex::new(HashMap::new()),
        })
    }

    /// Sends `item` to `queue` (answers to `reply_to`) in the next message of
    /// its lane, and waits until the broker confirmed that message. The
    /// publish is retried (reconnecting) for up to `budget`.
    pub async fn publish<T: Serialize>(
        &self,
        queue: &str,
        reply_to: Option<&str>,
        item: &T,
        budget: Duration,
    ) -> Result<(), BrokerError> {
        let (confirmed, outcome) = oneshot::channel();
        let pending = Pending {
            item: serde_json::to_vec(item).expect("protocol types always serialize"),
            headers: crate::trace::current_headers(),
            budget,
            confirmed,
        };
        self.lane(queue, reply_to)
            .send(pending)
            .map_err(|_| BrokerError::Unavailable("publisher stopped".into()))?;
        match outcome.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(BrokerError::Unavailable(why)),
            Err(_) => Err(BrokerError::Unavailable("publisher stopped".into())),
        }
    }

    fn lane(&self, queue: &str, reply_to: Option<&str>) -> mpsc::UnboundedSender<Pending> {
        let key = (queue.to_string(), reply_to.map(str::to_string));
        let mut lanes = self.lanes.lock().unwrap_or_else(|e| e.into_inner());
        lanes
            .entry(key.clone())
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(run_lane(self.broker.clone(), key, rx));
                tx
            })
            .clone()
    }
}

/// Takes whatever queued up while the lane's publishes were in flight and
/// sends it as one message, for the life of the process.
async fn run_lane(broker: Arc<Broker>, lane: Lane, mut queued: mpsc::UnboundedReceiver<Pending>) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    while let Some(first) = queued.recv().await {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let mut group = vec![first];
        while group.len() < MAX_ITEMS {
            match queued.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let broker = broker.clone();
        let lane = lane.clone();
        tokio::spawn(async move {
            let result = send(&broker, &lane, &group).await;
            drop(slot);
            for pending in group {
                let _ = pending.confirmed.send(result.clone());
            }
        });
    }
}

async fn send(broker: &Broker, (queue, reply_to): &Lane, group: &[Pending]) -> Result<(), String> {
    metrics::histogram!("broker_group_items").record(group.len() as f64);
    let body = batch_body(group.iter().map(|p| p.item.as_slice()));
    let mut properties = persistent_json().with_headers(group[0].headers.clone());
    if let Some(reply_to) = reply_to {
        properties = properties.with_reply_to(ShortString::from(reply_to.as_str()));
    }
    broker
        .publish_with_retrying(queue, &body, properties, group[0].budget)
        .await
        .map_err(|e| e.to_string())
}

/// A [`crate::messages::Batch`] body from items already serialized.
fn batch_body<'a>(items: impl Iterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut body = format!("{{\"version\":{PROTOCOL_VERSION},\"items\":[").into_bytes();
    for (i, item) in items.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(item);
    }
    body.extend_from_slice(b"]}");
    body
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{Action, Batch, Command};
    use crate::types::SagaId;

    #[test]
    fn a_body_of_serialized_items_is_a_batch() {
        let commands: Vec<Command> = (0..3)
            .map(|_| Command {
                saga_id: SagaId::new(),
                action: Action::Settle,
                expires_at_ms: None,
            })
            .collect();
        let items: Vec<Vec<u8>> = commands
            .iter()
            .map(|c| serde_json::to_vec(c).unwrap())
            .collect();
        let body = batch_body(items.iter().map(Vec::as_slice));
        assert_eq!(Batch::<Command>::from_json(&body).unwrap().items, commands);
        let empty = batch_body(std::iter::empty());
        assert!(Batch::<Command>::from_json(&empty)
            .unwrap()
            .items
            .is_empty());
    }
}
