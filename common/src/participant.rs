//! The participant side of a saga step, shared by stock and payment.
//!
//! A delivery is acknowledged only after every command in it has been
//! applied (its outcome committed beside the data) and the replies have been
//! confirmed by the broker. A crash anywhere before that leads to a
//! redelivery, which finds the recorded outcomes and replies again without
//! applying anything twice. A message that cannot be decoded is rejected to
//! the dead-letter queue instead of being redelivered forever.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};

use crate::broker::{Broker, QueueKind};
use crate::messages::{Batch, Command, Outcome, Reply};
use crate::redis_store::StoreError;

/// Applies commands exactly once: the participant's own store logic.
pub trait Ledger: Send + Sync + 'static {
    /// Applies `command` (or finds its recorded outcome) and returns the outcome.
    fn apply(&self, command: &Command) -> impl Future<Output = Result<Outcome, StoreError>> + Send;
}

/// Consumes `queue` for the life of the process, applying each command with `ledger`.
pub async fn serve_commands<L: Ledger>(
    broker: Arc<Broker>,
    queue: String,
    prefetch: u16,
    ledger: Arc<L>,
) {
    let replies_to = broker.clone();
    broker
        .consume(queue, QueueKind::Durable, prefetch, move |delivery| {
            handle(replies_to.clone(), ledger.clone(), delivery)
        })
        .await
}

async fn handle<L: Ledger>(broker: Arc<Broker>, ledger: Arc<L>, delivery: Delivery) {
    let batch = match Batch::<Command>::from_json(&delivery.data) {
        Ok(batch) => batch,
        Err(e) => {
            tracing::error!(error = %e, "poison message sent to the dead-letter queue");
            metrics::counter!("broker_dead_lettered_total").increment(1);
            let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
            return;
        }
    };
    let outcomes = futures::future::join_all(batch.items.iter().map(|c| ledger.apply(c))).await;
    let mut replies = Vec::with_capacity(outcomes.len());
    for (command, outcome) in batch.items.iter().zip(outcomes) {
        match outcome {
            Ok(outcome) => {
                let label = match &outcome {
                    Outcome::Applied => "applied",
                    Outcome::Refused { .. } => "refused",
                };
                metrics::counter!("participant_commands_total", "step" => format!("{:?}", command.action.step()), "outcome" => label)
                    .increment(1);
                replies.push(Reply {
                    saga_id: command.saga_id,
                    step: command.action.step(),
                    outcome,
                });
            }
            Err(e) => {
                // The store stayed unreachable past its retry budget: try the whole message later.
                // Commands of it that did apply are recorded, so the retry will not repeat them.
                tracing::error!(error = %e, saga = %command.saga_id, "command not applied, will be redelivered");
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await;
                return;
            }
        }
    }
    if let Some(reply_to) = delivery.properties.reply_to() {
        let body = Batch::of(replies).to_json();
        if let Err(e) = broker
            .publish_retrying(reply_to.as_str(), None, &body, Duration::from_secs(10))
            .await
        {
            tracing::warn!(error = %e, "reply not confirmed; the command will be redelivered");
            let _ = delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            return;
        }
    }
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The broker will redeliver; the recorded outcome makes that harmless.
        tracing::warn!(error = %e, "ack failed");
    }
}
