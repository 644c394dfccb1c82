//! Domain events for downstream consumers, through a transactional outbox.
//!
//! A checkout's decision is taken on the order (`Orders::commit` marks it
//! paid, `Orders::fence` takes the saga's hold off it). The event that tells
//! the world (`order.paid`, `order.checkout_failed`) is appended to the
//! outbox stream ([`OUTBOX`], a Redis stream in the order store) in the same
//! MULTI/EXEC as that change: there is no decision without its event, even if
//! the process dies right after, and no event without its decision (a retry
//! after a lost EXEC reply finds the decision made and appends nothing).
//!
//! The relay ([`relay_forever`], one per order instance) moves events from the
//! stream to the topic exchange [`EVENTS_EXCHANGE`] (routing key = event
//! type), persistent and publisher-confirmed, and only then acknowledges and
//! deletes them. The instances share the stream through one consumer group:
//! each event goes to one relay; one that died holding events loses them to
//! another after [`CLAIM_IDLE`] (relays look for such events every few
//! seconds, not on every pass). Delivery is therefore at least once: each
//! event carries a stable `event_id` (also the AMQP `message_id`), and
//! consumers drop repeats by it.
//!
//! Each process is a consumer of the group under its instance id, which is
//! new at every start where `INSTANCE_ID` is not set (compose, Kubernetes).
//! Redis keeps a consumer until it is deleted, so the relays also delete the
//! consumers that hold nothing and have not been heard from for
//! [`CONSUMER_IDLE_LIMIT`] ([`prune_consumers`]): without it, every restart
//! would leave one behind for good.

use std::sync::Arc;
use std::time::Duration;

use common::broker::Broker;
use common::redis_store::{Store, StoreError};
use common::types::{Amount, OrderId, SagaId, UserId};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// The outbox stream in the order store.
pub const OUTBOX: &str = "outbox:order-events";
/// The relays' consumer group on [`OUTBOX`].
const GROUP: &str = "relay";
/// The topic exchange events are published to.
pub const EVENTS_EXCHANGE: &str = "order.events";
/// An event read by a relay that has not acknowledged it for this long is
/// taken over by another (its relay is presumed dead).
pub const CLAIM_IDLE: Duration = Duration::from_secs(10);
/// How often a relay looks for such events: a dead relay's events wait at most
/// `CLAIM_IDLE + CLAIM_EVERY`, and a pass under load costs one round trip fewer.
const CLAIM_EVERY: Duration = Duration::from_secs(5);
/// Lifetime of the stream key, renewed whenever events are added or relayed:
/// it only lapses if no order instance ran for that long.
const OUTBOX_TTL_SECS: i64 = 30 * 24 * 3600;
/// Events moved per round trip.
const BATCH: usize = 256;
/// How often a relay looks for events when nothing woke it.
const POLL: Duration = Duration::from_millis(500);
/// A consumer of the group that holds no event and has not read for this long
/// is deleted: a live relay reads every [`POLL`], so only a relay cut off from
/// the store for this long could be deleted alive, and its next read makes
/// it again.
pub const CONSUMER_IDLE_LIMIT: Duration = Duration::from_secs(600);

/// Deletes the consumers of `KEYS[1]`'s group `ARGV[1]`, other than `ARGV[2]`,
/// that hold no pending event and have been idle for more than `ARGV[3]` ms.
/// A script, so no consumer can take an event between the look and the
/// delete (deleting a consumer drops what it holds). A missing stream or group
/// deletes nothing.
const PRUNE_CONSUMERS: &str = r#"
local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if not ok then return 0 end
local removed = 0
for _, consumer in ipairs(consumers) do
  local field = {}
  for i = 1, #consumer, 2 do field[consumer[i]] = consumer[i + 1] end
  if field['name'] ~= ARGV[2] and field['pending'] == 0
      and field['idle'] > tonumber(ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], field['name'])
    removed = removed + 1
  end
end
return removed
"#;

/// What kind of event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "order.paid")]
    Paid,
    #[serde(rename = "order.checkout_failed")]
    CheckoutFailed,
}

impl EventType {
    /// The routing key, and the `type` of the event.
    pub fn name(self) -> &'static str {
        match self {
            EventType::Paid => "order.paid",
            EventType::CheckoutFailed => "order.checkout_failed",
        }
    }
}

/// One domain event, as published (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Stable across redeliveries: `<saga_id>:<type>` (a saga decides once).
    pub event_id: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    pub order_id: OrderId,
    pub saga_id: SagaId,
    pub user_id: UserId,
    pub total_cost: Amount,
    /// Unix time (ms) of the decision.
    pub occurred_at_ms: u64,
}

impl Event {
    pub fn new(
        event_type: EventType,
        order_id: &OrderId,
        saga_id: SagaId,
        user_id: &UserId,
        total_cost: Amount,
    ) -> Self {
        Event {
            event_id: format!("{saga_id}:{}", event_type.name()),
            event_type,
            order_id: order_id.clone(),
            saga_id,
            user_id: user_id.clone(),
            total_cost,
            occurred_at_ms: common::now_ms(),
        }
    }

    /// Adds the commands that append this event to the outbox to `writes`
    /// (the decision's own transaction).
    pub fn append_to(&self, writes: &mut redis::Pipeline) {
        let body = serde_json::to_string(self).expect("an event serialises");
        writes
            .cmd("XADD")
            .arg(OUTBOX)
            .arg("*")
            .arg("event")
            .arg(body)
            .ignore()
            .expire(OUTBOX, OUTBOX_TTL_SECS)
            .ignore();
    }
}

/// Wakes the relay of this instance when a decision appended an event.
#[derive(Default)]
pub struct Wake(Notify);

impl Wake {
    pub fn event_added(&self) {
        self.0.notify_one();
    }
}

/// Relays events from the outbox to the broker for the life of the process.
pub async fn relay_forever(
    store: Arc<Store>,
    broker: Arc<Broker>,
    consumer: String,
    wake: Arc<Wake>,
) {
    let mut next_claim = tokio::time::Instant::now();
    loop {
        let now = tokio::time::Instant::now();
        let claim = now >= next_claim;
        if claim {
            next_claim = now + CLAIM_EVERY;
            if let Err(e) = prune_consumers(&store, &consumer, CONSUMER_IDLE_LIMIT).await {
                tracing::debug!(error = %e, "outbox consumers not pruned; trying again later");
            }
        }
        match relay_once(&store, &broker, &consumer, claim).await {
            // A full batch: there may be more right away.
            Ok(n) if n == BATCH => continue,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "outbox relay failed; trying again"),
        }
        let _ = tokio::time::timeout(POLL, wake.0.notified()).await;
    }
}

/// One pass: take over events a dead relay left (when `claim`), read new
/// ones, publish them, then acknowledge and delete them. Returns how many were
/// relayed.
pub async fn relay_once(
    store: &Store,
    broker: &Broker,
    consumer: &str,
    claim: bool,
) -> Result<usize, RelayError> {
    let mut entries = if claim {
        take_over(store, consumer).await?
    } else {
        Vec::new()
    };
    if entries.len() < BATCH {
        let mut read = redis::cmd("XREADGROUP");
        read.arg("GROUP")
            .arg(GROUP)
            .arg(consumer)
            .arg("COUNT")
            .arg(BATCH - entries.len())
            .arg("STREAMS")
            .arg(OUTBOX)
            .arg(">");
        let read: StreamReadReply = with_group(store, &read).await?;
        entries.extend(read.keys.into_iter().flat_map(|k| k.ids));
    }
    if entries.is_empty() {
        return Ok(0);
    }
    publish(broker, &entries).await?;
    let done: Vec<&str> = entries.iter().map(|e| e.id.as_str()).collect();
    let mut writes = redis::pipe();
    writes
        .cmd("XACK")
        .arg(OUTBOX)
        .arg(GROUP)
        .arg(&done)
        .ignore()
        .cmd("XDEL")
        .arg(OUTBOX)
        .arg(&done)
        .ignore()
        .expire(OUTBOX, OUTBOX_TTL_SECS)
        .ignore();
    // Not confirmed on a replica: nobody is told it happened. Lost (a failover
    // before a replica had it), the events are published again, and consumers
    // drop repeats by event id.
    let writes = &writes;
    store
        .run(|mut conn| async move {
            let result = writes.query_async::<()>(&mut conn).await;
            (conn, result)
        })
        .await?;
    Ok(done.len())
}

/// The events other relays read and left unacknowledged for [`CLAIM_IDLE`].
async fn take_over(store: &Store, consumer: &str) -> Result<Vec<StreamId>, RelayError> {
    let mut autoclaim = redis::cmd("XAUTOCLAIM");
    autoclaim
        .arg(OUTBOX)
        .arg(GROUP)
        .arg(consumer)
        .arg(CLAIM_IDLE.as_millis() as u64)
        .arg("0-0")
        .arg("COUNT")
        .arg(BATCH);
    let claimed: StreamAutoClaimReply = with_group(store, &autoclaim).await?;
    Ok(claimed.claimed)
}

/// Deletes the group's consumers, other than `consumer`, that hold no event
/// and have been idle for more than `idle` (relays that ended). Returns how
/// many it deleted. Not confirmed on a replica: a deletion lost in a failover
/// is made again by a later pass.
pub async fn prune_consumers(
    store: &Store,
    consumer: &str,
    idle: Duration,
) -> Result<usize, StoreError> {
    store
        .query(
            redis::cmd("EVAL")
                .arg(PRUNE_CONSUMERS)
                .arg(1)
                .arg(OUTBOX)
                .arg(GROUP)
                .arg(consumer)
                .arg(idle.as_millis() as u64),
        )
        .await
}

/// Runs a command on the relays' group, making the group first if it is
/// missing: once, by whichever relay first finds it so (not on every pass: a
/// pass runs after every decision).
async fn with_group<T: redis::FromRedisValue>(
    store: &Store,
    cmd: &redis::Cmd,
) -> Result<T, RelayError> {
    match store.query(cmd).await {
        Err(e) if e.to_string().contains("NOGROUP") => {
            ensure_group(store).await?;
            Ok(store.query(cmd).await?)
        }
        reply => Ok(reply?),
    }
}

/// Publishes every event of a pass at once (each waits for its own confirm),
/// not one confirm after another: a pass takes one broker round trip however
/// many it relays.
async fn publish(broker: &Broker, entries: &[StreamId]) -> Result<(), RelayError> {
    let publishes = entries.iter().map(|entry| async move {
        match decode(entry) {
            Some(event) => {
                let body = serde_json::to_vec(&event).expect("an event serialises");
                broker
                    .publish_event(
                        EVENTS_EXCHANGE,
                        event.event_type.name(),
                        &event.event_id,
                        &body,
                    )
                    .await
                    .map_err(|e| RelayError::Broker(e.to_string()))?;
                metrics::counter!("outbox_events_relayed_total", "type" => event.event_type.name())
                    .increment(1);
            }
            None => {
                tracing::error!(id = %entry.id, "undecodable outbox entry dropped");
                metrics::counter!("outbox_events_dropped_total").increment(1);
            }
        }
        Ok::<_, RelayError>(())
    });
    futures::future::try_join_all(publishes).await?;
    Ok(())
}

fn decode(entry: &StreamId) -> Option<Event> {
    let body: String = entry.get("event")?;
    serde_json::from_str(&body).ok()
}

/// Creates the consumer group (and the stream) unless it exists. Reading from
/// `0`: events appended before any relay ever ran are relayed too.
async fn ensure_group(store: &Store) -> Result<(), RelayError> {
    let created: Result<(), StoreError> = store
        .query(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(OUTBOX)
                .arg(GROUP)
                .arg("0")
                .arg("MKSTREAM"),
        )
        .await;
    match created {
        Ok(()) => Ok(()),
        Err(e) if e.to_string().contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("broker: {0}")]
    Broker(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_id_is_stable_and_names_its_saga_and_type() {
        let saga = SagaId::new();
        let order = OrderId::parse("o1").unwrap();
        let user = UserId::parse("u1").unwrap();
        let a = Event::new(
            EventType::Paid,
            &order,
            saga,
            &user,
            Amount::new(5).unwrap(),
        );
        let b = Event::new(
            EventType::Paid,
            &order,
            saga,
            &user,
            Amount::new(5).unwrap(),
        );
        assert_eq!(a.event_id, b.event_id);
        assert_eq!(a.event_id, format!("{saga}:order.paid"));
        let json: serde_json::Value = serde_json::to_value(&a).unwrap();
        assert_eq!(json["type"], "order.paid");
        let failed = Event::new(
            EventType::CheckoutFailed,
            &order,
            saga,
            &user,
            Amount::new(5).unwrap(),
        );
        assert_ne!(failed.event_id, a.event_id);
    }
}
