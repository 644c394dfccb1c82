//! RabbitMQ plumbing: one connection per process, re-established with backoff
//! after any loss; durable queues with a dead-letter queue; persistent,
//! confirmed publishing; consumers that resume on their own.
//!
//! Publishing never waits for one confirm before sending the next message:
//! every caller awaits only its own confirm, so many publishes are in flight
//! on the shared channel at once (the broker is the scarce resource).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;

use crate::config::QueueType;

/// Where poison messages end up (bound through the default exchange).
pub const DEAD_LETTER_QUEUE: &str = "dead-letters";

/// Deliveries of one message a quorum command queue allows: a message given back
/// (nack with requeue) more often is dead-lettered by the broker itself
/// (`x-death` reason `delivery_limit`; the participant counts it as it gives it back).
pub const DELIVERY_LIMIT: i32 = 20;

/// Bound on a whole (re)connect to the broker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Properties of every message sent here: persistent, JSON.
pub fn persistent_json() -> BasicProperties {
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type(ShortString::from("application/json"))
}

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    #[error("broker refused the message (nack)")]
    Nacked,
}

impl From<lapin::Error> for BrokerError {
    fn from(e: lapin::Error) -> Self {
        BrokerError::Unavailable(e.to_string())
    }
}

/// How a queue is declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueKind {
    /// Survives restarts; undeliverable messages go to [`DEAD_LETTER_QUEUE`].
    Durable,
    /// The reply queue of one order instance: durable, so replies published
    /// while the instance is reconnecting (or the broker restarting) wait
    /// for it instead of being dropped, and deleted by the broker once
    /// nobody has used it for [`REPLY_QUEUE_EXPIRES`] (an instance that is
    /// gone for good).
    Reply,
}

/// How long an unused reply queue outlives its instance. Long enough for any
/// restart; a reply that finds its queue gone is harmless (the saga store,
/// not a reply, is the truth, and recovery finishes the saga).
pub const REPLY_QUEUE_EXPIRES: Duration = Duration::from_secs(600);

/// The longest pause between two reconnect attempts. A refused connection
/// costs nothing, and a broker that was restarted should find its clients
/// back within a second: a saga step waits for its reply meanwhile.
const MAX_RECONNECT_PAUSE: Duration = Duration::from_secs(1);

struct Live {
    connection: Connection,
    publisher: Channel,
}

/// The process's connection to RabbitMQ.
pub struct Broker {
    url: String,
    queue_type: QueueType,
    /// Durable queues declared on every (re)connect, so a publish never lands nowhere.
    durable_queues: Vec<String>,
    live: Mutex<Option<Live>>,
    /// Every queue [`consume`](Self::consume) was asked to consume, and
    /// whether its consumer runs right now (readiness waits for all of them).
    consumers: std::sync::Mutex<HashMap<String, bool>>,
    /// Connections made so far: a change tells a waiting caller that the
    /// connection it sent on was lost meanwhile.
    generation: AtomicU64,
    /// Exchanges declared, by the connection generation they were declared on.
    declared_exchanges: std::sync::Mutex<HashSet<(String, u64)>>,
}

impl Broker {
    /// Connecting is lazy; the first publish or consumer connects.
    pub fn new(url: &str, queue_type: QueueType, durable_queues: &[&str]) -> Arc<Self> {
        Arc::new(Self {
            url: url.to_string(),
            queue_type,
            durable_queues: durable_queues.iter().map(|q| q.to_string()).collect(),
            live: Mutex::new(None),
            consumers: std::sync::Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            declared_exchanges: std::sync::Mutex::new(HashSet::new()),
        })
    }

    /// True while the connection is up and every consumer runs (readiness).
    /// Tries to connect when it is not. A consumer counts because an instance
    /// that can publish but not yet hear (its reply queue is declared by its
    /// consumer; on a first start, replies sent before it exists are lost)
    /// would time out every checkout it takes, and a participant that cannot
    /// consume does no work.
    pub async fn is_ready(&self) -> bool {
        self.publisher().await.is_ok() && self.consuming()
    }

    /// How many connections this process has made to the broker so far.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Relaxed)
    }

    /// True while the current connection is up (it is not re-established here).
    pub async fn connected(&self) -> bool {
        self.live
            .lock()
            .await
            .as_ref()
            .is_some_and(|l| l.connection.status().connected() && l.publisher.status().connected())
    }

    /// True when every consumer asked for runs.
    fn consuming(&self) -> bool {
        self.consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .all(|running| *running)
    }

    /// Declares that `queue` will be consumed: readiness waits for it from
    /// now on. Call it before spawning [`consume`](Self::consume), whose
    /// first poll may come after the first readiness probe.
    pub fn expect_consumer(&self, queue: &str) {
        self.set_consuming(queue, false);
    }

    fn set_consuming(&self, queue: &str, running: bool) {
        self.consumers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(queue.to_string(), running);
    }

    /// The shared confirm-mode channel, connecting first when needed.
    ///
    /// The whole connect (TCP, channel, confirm mode, declarations) is bounded
    /// by [`CONNECT_TIMEOUT`]: it runs under the lock every publisher needs, so
    /// a broker that accepts the socket and then hangs must not stall them all.
    async fn publisher(&self) -> Result<Channel, BrokerError> {
        let mut live = self.live.lock().await;
        if let Some(l) = live.as_ref() {
            if l.connection.status().connected() && l.publisher.status().connected() {
                return Ok(l.publisher.clone());
            }
        }
        *live = None;
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, self.connect())
            .await
            .map_err(|_| BrokerError::Unavailable("connect timed out".into()))??;
        let publisher = connected.publisher.clone();
        *live = Some(connected);
        self.generation.fetch_add(1, Ordering::Relaxed);
        tracing::info!("connected to the broker");
        Ok(publisher)
    }

    async fn connect(&self) -> Result<Live, BrokerError> {
        let connection = Connection::connect(&self.url, ConnectionProperties::default()).await?;
        let publisher = connection.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        declare(
            &publisher,
            DEAD_LETTER_QUEUE,
            QueueKind::Durable,
            self.queue_type,
            false,
        )
        .await?;
        for queue in &self.durable_queues {
            declare(&publisher, queue, QueueKind::Durable, self.queue_type, true).await?;
        }
        Ok(Live {
            connection,
            publisher,
        })
    }

    async fn connection_channel(&self) -> Result<Channel, BrokerError> {
        self.publisher().await?;
        let live = self.live.lock().await;
        let l = live
            .as_ref()
            .ok_or_else(|| BrokerError::Unavailable("connection lost".into()))?;
        Ok(l.connection.create_channel().await?)
    }

    /// Publishes one persistent message to `queue` and waits for the broker's confirm.
    pub async fn publish(
        &self,
        queue: &str,
        reply_to: Option<&str>,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let mut properties = persistent_json();
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(ShortString::from(reply_to));
        }
        self.publish_with(queue, body, properties).await
    }

    /// Publishes with the given properties (persistent ones: see [`persistent_json`])
    /// and the current trace context.
    pub async fn publish_with(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), BrokerError> {
        let channel = self.publisher().await?;
        publish_confirmed(&channel, "", queue, body, properties).await
    }

    /// Publishes one persistent event to the durable topic `exchange`
    /// (declared on first use on each connection) under `routing_key`, with
    /// `message_id` for consumers' dedupe, and waits for the confirm.
    pub async fn publish_event(
        &self,
        exchange: &str,
        routing_key: &str,
        message_id: &str,
        body: &[u8],
    ) -> Result<(), BrokerError> {
        let channel = self.publisher().await?;
        let generation = self.generation();
        let declared = self
            .declared_exchanges
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&(exchange.to_string(), generation));
        if !declared {
            channel
                .exchange_declare(
                    ShortString::from(exchange),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            let mut known = self
                .declared_exchanges
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            known.retain(|(_, g)| *g == generation);
            known.insert((exchange.to_string(), generation));
        }
        let properties = persistent_json().with_message_id(ShortString::from(message_id));
        publish_confirmed(&channel, exchange, routing_key, body, properties).await
    }

    /// [`Broker::publish`], retried with backoff (reconnecting) for up to `budget`.
    pub async fn publish_retrying(
        &self,
        queue: &str,
        reply_to: Option<&str>,
        body: &[u8],
        budget: Duration,
    ) -> Result<(), BrokerError> {
        let mut properties = persistent_json();
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(ShortString::from(reply_to));
        }
        self.publish_with_retrying(queue, body, properties, budget)
            .await
    }

    /// [`Broker::publish_with`], retried with backoff (reconnecting) for up to `budget`.
    pub async fn publish_with_retrying(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
        budget: Duration,
    ) -> Result<(), BrokerError> {
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.publish_with(queue, body, properties.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) if started.elapsed() + backoff >= budget => return Err(e),
                Err(e) => {
                    metrics::counter!("broker_publish_retries_total").increment(1);
                    tracing::warn!(error = %e, queue, "publish failed, retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_RECONNECT_PAUSE);
                }
            }
        }
    }

    /// Consumes `queue` for the life of the process, reconnecting after any
    /// loss. Each delivery is handed to `handler` on its own task; the handler
    /// acknowledges it (after its effect is committed). Deliveries never
    /// acknowledged before a connection dies are delivered again.
    pub async fn consume<F, Fut>(
        self: Arc<Self>,
        queue: String,
        kind: QueueKind,
        prefetch: u16,
        handler: F,
    ) where
        F: Fn(lapin::message::Delivery) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let mut backoff = Duration::from_millis(200);
        self.set_consuming(&queue, false);
        loop {
            match self.open_consumer(&queue, kind, prefetch).await {
                Ok(mut consumer) => {
                    backoff = Duration::from_millis(200);
                    self.set_consuming(&queue, true);
                    tracing::info!(queue, "consuming");
                    while let Some(delivery) = consumer.next().await {
                        match delivery {
                            Ok(delivery) => {
                                if delivery.redelivered {
                                    metrics::counter!("broker_redelivered_total", "queue" => queue.clone())
                                        .increment(1);
                                }
                                tokio::spawn(handler(delivery));
                            }
                            Err(e) => {
                                tracing::warn!(queue, error = %e, "consumer stopped");
                                break;
                            }
                        }
                    }
                    self.set_consuming(&queue, false);
                }
                Err(e) => tracing::warn!(queue, error = %e, "cannot consume yet"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_RECONNECT_PAUSE);
        }
    }

    async fn open_consumer(
        &self,
        queue: &str,
        kind: QueueKind,
        prefetch: u16,
    ) -> Result<lapin::Consumer, BrokerError> {
        let channel = self.connection_channel().await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        declare(&channel, queue, kind, self.queue_type, true).await?;
        let consumer = channel
            .basic_consume(
                ShortString::from(queue),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(consumer)
    }
}

/// One persistent publish through the confirm-mode `channel`, waiting for its
/// confirm. The message carries the current span's trace context in its
/// headers unless they carry one already (a retry copy keeps its original's).
async fn publish_confirmed(
    channel: &Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<(), BrokerError> {
    let mut headers = properties.headers().clone().unwrap_or_default();
    if !headers.inner().contains_key(crate::trace::TRACEPARENT) {
        crate::trace::inject_current(&mut headers);
    }
    let properties = properties.with_headers(headers);
    let confirm = async {
        channel
            .basic_publish(
                ShortString::from(exchange),
                ShortString::from(routing_key),
                BasicPublishOptions::default(),
                body,
                properties,
            )
            .await?
            .await
    };
    match tokio::time::timeout(Duration::from_secs(10), confirm).await {
        Ok(Ok(Confirmation::Ack(_) | Confirmation::NotRequested)) => Ok(()),
        Ok(Ok(Confirmation::Nack(_))) => Err(BrokerError::Nacked),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(BrokerError::Unavailable("publish confirm timed out".into())),
    }
}

async fn declare(
    channel: &Channel,
    queue: &str,
    kind: QueueKind,
    queue_type: QueueType,
    dead_lettered: bool,
) -> Result<(), BrokerError> {
    let mut args = FieldTable::default();
    let options = match kind {
        QueueKind::Durable => {
            if dead_lettered {
                args.insert(
                    ShortString::from("x-dead-letter-exchange"),
                    AMQPValue::LongString(LongString::from("")),
                );
                args.insert(
                    ShortString::from("x-dead-letter-routing-key"),
                    AMQPValue::LongString(LongString::from(DEAD_LETTER_QUEUE)),
                );
            }
            if queue_type == QueueType::Quorum {
                args.insert(
                    ShortString::from("x-queue-type"),
                    AMQPValue::LongString(LongString::from("quorum")),
                );
                if dead_lettered {
                    // A message that keeps failing is dead-lettered rather than looping forever.
                    args.insert(
                        ShortString::from("x-delivery-limit"),
                        AMQPValue::LongInt(DELIVERY_LIMIT),
                    );
                }
            }
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            }
        }
        QueueKind::Reply => {
            args.insert(
                ShortString::from("x-expires"),
                AMQPValue::LongLongInt(REPLY_QUEUE_EXPIRES.as_millis() as i64),
            );
            if queue_type == QueueType::Quorum {
                args.insert(
                    ShortString::from("x-queue-type"),
                    AMQPValue::LongString(LongString::from("quorum")),
                );
            }
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            }
        }
    };
    channel
        .queue_declare(ShortString::from(queue), options, args)
        .await?;
    Ok(())
}
