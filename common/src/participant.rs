//! The participant side of a saga step, shared by stock and payment.
//!
//! A delivery's commands join the next group of the participant's group
//! commit ([`crate::group_commit`]: the commands of concurrent deliveries
//! applied as one transaction). A delivery is acknowledged only after every
//! command in it has been applied (its outcome committed beside the data) and
//! the replies have been confirmed by the broker. A crash anywhere before that leads to a
//! redelivery, which finds the recorded outcomes and replies again without
//! applying anything twice.
//!
//! When a command cannot be applied, the message is never simply requeued
//! (that puts it straight back at the head of the queue: a spin). Instead the
//! commands of the delivery that were applied are answered at once, a copy of
//! the others with an attempt count (`x-attempts`) is published to the back
//! of the queue after a backoff, and the original is acked: nothing waits
//! behind a failing command, not even the commands that shared its message.
//! An outage of the store, a write no replica confirmed
//! ([`StoreError::NotDurable`]: the outcome is recorded on the master only, if
//! at all), or a store out of memory ([`StoreError::Full`]) is retried like
//! that without end: the command is not answered
//! until its outcome is on two nodes, and the dedupe record makes the retry
//! find (and confirm) the first outcome. Any other failure (a corrupt value, a command Redis refuses) is
//! retried [`PERMANENT_ATTEMPTS`] times, then the failing commands go to the
//! dead-letter queue with their reason and the orchestrator is told
//! [`Outcome::Failed`]. A message that cannot be decoded goes to the
//! dead-letter queue at once.
//!
//! Every dead letter is counted in `broker_dead_lettered_total{reason}`:
//! `store_error` and `undecodable` as they are published here (headers
//! `x-reason`, `x-original-queue`, `x-saga-ids`, `x-attempts`,
//! `x-first-seen-ms`, `x-last-seen-ms`, a `message_id`; `cargo xtask dlq`
//! reads them), and `delivery_limit` when a quorum queue's message is given
//! back for the last time its delivery limit allows (the broker dead-letters
//! it then, with its own `x-death` header).

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use tracing::Instrument;

use crate::broker::{persistent_json, Broker, QueueKind, DEAD_LETTER_QUEUE, DELIVERY_LIMIT};
use crate::group_commit::{Applied, GroupCommit, Ledger};
use crate::grouped::Grouped;
use crate::messages::{Batch, Command, Outcome, Reply, Step};

/// Tries of a command that fails for a reason other than an unreachable store.
pub const PERMANENT_ATTEMPTS: i64 = 5;
const ATTEMPTS_HEADER: &str = "x-attempts";
const FIRST_SEEN_HEADER: &str = "x-first-seen-ms";

/// Consumes `queue` for the life of the process, applying each command with `ledger`.
pub async fn serve_commands<L: Ledger>(
    broker: Arc<Broker>,
    queue: String,
    prefetch: u16,
    ledger: Arc<L>,
) {
    let participant = Arc::new(Participant {
        replies: Grouped::new(broker.clone()),
        broker: broker.clone(),
        commits: GroupCommit::start(ledger),
    });
    broker
        .consume(queue, QueueKind::Durable, prefetch, move |delivery| {
            handle(participant.clone(), delivery)
        })
        .await
}

/// What handling a delivery needs: the broker (retry copies, dead letters), the
/// replies' group publisher, and the group commit of the participant's own
/// store logic.
struct Participant {
    broker: Arc<Broker>,
    replies: Arc<Grouped>,
    commits: GroupCommit,
}

/// Handles one delivery in a span of the checkout's trace (its context comes
/// in the message headers).
async fn handle(participant: Arc<Participant>, delivery: Delivery) {
    let span = tracing::info_span!(
        "participant.apply",
        queue = %delivery.routing_key,
        saga_id = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    crate::trace::follow(&span, delivery.properties.headers().as_ref());
    apply(&participant, delivery).instrument(span).await
}

async fn apply(participant: &Participant, delivery: Delivery) {
    let Participant {
        broker,
        replies: grouped,
        commits,
    } = participant;
    let batch = match Batch::<Command>::from_json(&delivery.data) {
        Ok(batch) => batch,
        Err(e) => {
            tracing::error!(error = %e, "poison message sent to the dead-letter queue");
            let attempts = header_int(&delivery, ATTEMPTS_HEADER).unwrap_or(0) + 1;
            let body = delivery.data.clone();
            match dead_letter(broker, &delivery, "undecodable", &body, &[], attempts).await {
                Ok(()) => {
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
                // The queue's own dead-lettering takes it (with `x-death`, reason `rejected`).
                Err(()) => {
                    metrics::counter!("broker_dead_lettered_total", "reason" => "undecodable")
                        .increment(1);
                    let _ = delivery.reject(BasicRejectOptions { requeue: false }).await;
                }
            }
            return;
        }
    };
    let sagas: Vec<String> = batch.items.iter().map(|c| c.saga_id.to_string()).collect();
    tracing::Span::current().record("saga_id", sagas.join(","));
    let outcomes = commits.apply(batch.items.clone()).await;
    let attempts = header_int(&delivery, ATTEMPTS_HEADER).unwrap_or(0) + 1;
    let mut replies = Vec::with_capacity(outcomes.len());
    let mut again = Vec::new();
    let mut failed = Vec::new();
    for (command, outcome) in batch.items.iter().zip(outcomes) {
        // Retrying cures these: never dead-lettered, never answered yet.
        let curable = matches!(outcome, Applied::Retry(_));
        let outcome = match outcome {
            Applied::Done(outcome) => outcome,
            Applied::Retry(e) | Applied::Error(e) => {
                if curable || attempts < PERMANENT_ATTEMPTS {
                    tracing::warn!(error = %e, saga = %command.saga_id, attempts, "command not applied; will try again");
                    again.push(command.clone());
                    continue;
                }
                tracing::error!(error = %e, saga = %command.saga_id, attempts, "command failed for good; dead-lettered");
                failed.push(command.clone());
                Outcome::Failed { reason: e }
            }
        };
        let label = match &outcome {
            Outcome::Applied => "applied",
            Outcome::Refused { .. } => "refused",
            Outcome::Failed { .. } => "failed",
        };
        metrics::counter!("participant_commands_total", "step" => format!("{:?}", command.action.step()), "outcome" => label)
            .increment(1);
        replies.push(Reply {
            saga_id: command.saga_id,
            step: command.action.step(),
            outcome,
        });
    }
    if !failed.is_empty() {
        let sagas: Vec<String> = failed.iter().map(|c| c.saga_id.to_string()).collect();
        let body = Batch::of(failed).to_json();
        let reason = "store_error";
        if dead_letter(broker, &delivery, reason, &body, &sagas, attempts)
            .await
            .is_err()
        {
            give_back(&delivery).await;
            return;
        }
    }
    // A settle needs no answer, and sends none.
    replies.retain(|r| r.step != Step::Settle);
    if let (Some(reply_to), false) = (delivery.properties.reply_to(), replies.is_empty()) {
        // Each reply joins the next message to its queue (with other deliveries' replies).
        let sent = replies
            .iter()
            .map(|reply| grouped.publish(reply_to.as_str(), None, reply, Duration::from_secs(10)));
        if let Err(e) = futures::future::try_join_all(sent).await {
            tracing::warn!(error = %e, "reply not confirmed; the command will be redelivered");
            give_back(&delivery).await;
            return;
        }
    }
    if !again.is_empty() {
        // Only the commands not applied go round again: the others are answered already,
        // and a neighbour's failure never holds them up.
        retry_later(broker, delivery, attempts, &Batch::of(again).to_json()).await;
        return;
    }
    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
        // The broker will redeliver; the recorded outcome makes that harmless.
        tracing::warn!(error = %e, "ack failed");
    }
}

/// Gives a delivery back to its queue (the broker is in trouble: nothing better can be
/// done). A quorum queue counts it (`x-delivery-count`); past [`DELIVERY_LIMIT`] the broker
/// dead-letters it instead, and that is counted here, the one place that sees it happen.
async fn give_back(delivery: &Delivery) {
    if header_int(delivery, "x-delivery-count").unwrap_or(0) >= i64::from(DELIVERY_LIMIT) {
        tracing::error!("message given back past its delivery limit: the broker dead-letters it");
        metrics::counter!("broker_dead_lettered_total", "reason" => "delivery_limit").increment(1);
    }
    let options = BasicNackOptions {
        requeue: true,
        ..Default::default()
    };
    let _ = delivery.nack(options).await;
}

/// How long to wait before attempt `attempts + 1`.
fn backoff(attempts: i64) -> Duration {
    let exp = attempts.clamp(1, 7) as u32 - 1;
    Duration::from_millis(100 * 2u64.pow(exp)).min(Duration::from_secs(5))
}

/// Puts `commands` (the delivery's commands that were not applied) at the back of its
/// queue with one more attempt counted, after a backoff, and acknowledges the delivery.
/// Only if that copy cannot be published is the original requeued (the broker itself is
/// in trouble then; its commands that were applied replay their recorded outcomes).
async fn retry_later(broker: &Broker, delivery: Delivery, attempts: i64, commands: &[u8]) {
    tokio::time::sleep(backoff(attempts)).await;
    let queue = delivery.routing_key.as_str().to_string();
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(attempts));
    if header_int(&delivery, FIRST_SEEN_HEADER).is_none() {
        headers.insert(
            FIRST_SEEN_HEADER.into(),
            AMQPValue::LongLongInt(crate::now_ms() as i64),
        );
    }
    let mut properties = persistent_json().with_headers(headers);
    if let Some(reply_to) = delivery.properties.reply_to() {
        properties = properties.with_reply_to(reply_to.clone());
    }
    metrics::counter!("participant_retries_total").increment(1);
    match broker.publish_with(&queue, commands, properties).await {
        Ok(()) => {
            let _ = delivery.ack(BasicAckOptions::default()).await;
        }
        Err(e) => {
            tracing::warn!(error = %e, "retry copy not published; requeueing");
            give_back(&delivery).await;
        }
    }
}

/// Publishes `body` (the commands that failed for good, or a message that cannot be
/// decoded) to the dead-letter queue, with what an operator needs: why, from where, which
/// sagas, how often, when; an id (`message_id`) to name it by, and the original reply queue
/// (a requeued command answers there). Counted by `reason` once the broker confirmed it.
async fn dead_letter(
    broker: &Broker,
    delivery: &Delivery,
    reason: &'static str,
    body: &[u8],
    sagas: &[String],
    attempts: i64,
) -> Result<(), ()> {
    let now = crate::now_ms() as i64;
    let mut headers = FieldTable::default();
    let text = |s: String| AMQPValue::LongString(LongString::from(s));
    headers.insert("x-reason".into(), text(reason.into()));
    headers.insert(
        "x-original-queue".into(),
        text(delivery.routing_key.to_string()),
    );
    headers.insert("x-saga-ids".into(), text(sagas.join(",")));
    headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongLongInt(attempts));
    let first_seen = header_int(delivery, FIRST_SEEN_HEADER).unwrap_or(now);
    headers.insert(FIRST_SEEN_HEADER.into(), AMQPValue::LongLongInt(first_seen));
    headers.insert("x-last-seen-ms".into(), AMQPValue::LongLongInt(now));
    let mut properties = persistent_json()
        .with_headers(headers)
        .with_message_id(ShortString::from(uuid::Uuid::new_v4().simple().to_string()));
    if let Some(reply_to) = delivery.properties.reply_to() {
        properties = properties.with_reply_to(reply_to.clone());
    }
    match broker
        .publish_with(DEAD_LETTER_QUEUE, body, properties)
        .await
    {
        Ok(()) => {
            metrics::counter!("broker_dead_lettered_total", "reason" => reason).increment(1);
            Ok(())
        }
        Err(e) => {
            tracing::warn!(error = %e, "dead letter not published; requeueing");
            Err(())
        }
    }
}

fn header_int(delivery: &Delivery, name: &str) -> Option<i64> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(&ShortString::from(name))? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(100));
        assert_eq!(backoff(2), Duration::from_millis(200));
        assert_eq!(backoff(50), Duration::from_secs(5));
    }
}
