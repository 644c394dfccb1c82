//! Domain events through the transactional outbox (issue 9, item 4): every
//! checkout decision reaches a downstream consumer as exactly one event
//! (after the consumer's dedupe by event id), even when the relay that read it
//! died before publishing, and a decision repeated after a lost EXEC reply
//! announces nothing twice.
//!
//! The "notification service" here is a tiny consumer: a queue of its own
//! bound to the `order.events` topic exchange, deduplicating by message id.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::broker::Broker;
use common::config::QueueType;
use common::redis_store::Store;
use common::types::{OrderId, SagaId};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use order::orders::{Freeze, Orders};
use order::outbox::{self, Event, EventType, EVENTS_EXCHANGE, OUTBOX};
use support::direct_store;
use xtask::{free_port, FaultProxy, RedisServer, ScratchDir};

/// Events received, by event id, with how often each arrived.
type Received = Arc<Mutex<HashMap<String, (Event, usize)>>>;

/// The example consumer: binds a queue of its own to every order event and
/// counts deliveries per event id (a real consumer would drop the repeats).
async fn notification_service(amqp: &str) -> Received {
    let connection = Connection::connect(amqp, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            EVENTS_EXCHANGE.into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let queue = format!("test.notifications.{}", uuid::Uuid::new_v4().simple());
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    channel
        .queue_bind(
            queue.as_str().into(),
            EVENTS_EXCHANGE.into(),
            "order.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let received: Received = Arc::default();
    let sink = received.clone();
    tokio::spawn(async move {
        let _keep = connection;
        while let Some(Ok(delivery)) = consumer.next().await {
            let event: Event = serde_json::from_slice(&delivery.data).unwrap();
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.to_string())
                .unwrap();
            assert_eq!(id, event.event_id, "the message id is the event id");
            sink.lock().unwrap().entry(id).or_insert((event, 0)).1 += 1;
            delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    received
}

/// Waits until the consumer holds an event for `order`, then a little longer
/// (for repeats), and returns every delivery it got for that order.
async fn events_for(received: &Received, order: &str) -> Vec<(Event, usize)> {
    let of_order = || -> Vec<(Event, usize)> {
        received
            .lock()
            .unwrap()
            .values()
            .filter(|(e, _)| e.order_id.as_str() == order)
            .cloned()
            .collect()
    };
    for _ in 0..150 {
        if !of_order().is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return of_order();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    of_order()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_decision_reaches_the_consumer_as_one_event() {
    let broker = support::test_broker("outbox-events");
    let f = support::fleet(&broker.url).await;
    let received = notification_service(&broker.url).await;

    let item = f.item(10, 5).await;
    let rich = f.user(100).await;
    let paid = f.order(&rich, &[(&item, 2)]).await;
    assert_eq!(f.checkout(&paid).await, 200);
    let poor = f.user(1).await;
    let refused = f.order(&poor, &[(&item, 1)]).await;
    assert_eq!(f.checkout(&refused).await, 400);
    // A repeated checkout of the paid order decides nothing: no second event.
    assert_eq!(f.checkout(&paid).await, 200);

    let got = events_for(&received, &paid).await;
    assert_eq!(got.len(), 1, "{got:?}");
    let (event, deliveries) = &got[0];
    assert_eq!(*deliveries, 1);
    assert_eq!(event.event_type, EventType::Paid);
    assert_eq!(event.user_id.as_str(), rich);
    assert_eq!(event.total_cost.get(), 10);
    assert_eq!(event.event_id, format!("{}:order.paid", event.saga_id));

    let got = events_for(&received, &refused).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.event_type, EventType::CheckoutFailed);
    assert_eq!(got[0].1, 1);
}

/// An order store of its own (no relay of a running service reads it), with
/// an order frozen for `saga`.
async fn frozen_order(store_url: &str, saga: SagaId) -> (Orders, OrderId) {
    let orders = Orders::new(direct_store(store_url));
    let id = support::new_order(&orders).await;
    assert!(matches!(
        orders.freeze(&id, saga, None).await.unwrap(),
        Freeze::Frozen(_)
    ));
    (orders, id)
}

/// A Redis of its own holding one order committed by a new saga: its outbox holds that
/// decision's `order.paid` event.
struct Committed {
    _dir: ScratchDir,
    redis: RedisServer,
    store: Arc<Store>,
    id: OrderId,
    saga: SagaId,
}

async fn committed_order() -> Committed {
    let dir = ScratchDir::new("outbox-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let store = direct_store(&redis.url());
    let saga = SagaId::new();
    let (orders, id) = frozen_order(&redis.url(), saga).await;
    assert!(orders.commit(&id, saga).await.unwrap());
    Committed {
        _dir: dir,
        redis,
        store,
        id,
        saga,
    }
}

fn outbox_length(redis: &RedisServer) -> usize {
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    redis::cmd("XLEN").arg(OUTBOX).query(&mut conn).unwrap()
}

/// Makes the relays' group and reads every event in it as `consumer`, as a
/// relay does before it publishes them: they are pending to it from then on.
fn read_as(conn: &mut redis::Connection, consumer: &str) {
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(OUTBOX)
        .arg("relay")
        .arg("0")
        .query(conn)
        .unwrap();
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("relay")
        .arg(consumer)
        .arg("STREAMS")
        .arg(OUTBOX)
        .arg(">")
        .query(conn)
        .unwrap();
}

/// A relay read the event and died before publishing it: the event stays
/// pending, another relay takes it over once it has been idle for
/// `CLAIM_IDLE`, and the consumer gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_a_dead_relay_held_is_relayed_by_another() {
    let amqp = support::test_broker("outbox-relay");
    let received = notification_service(&amqp.url).await;
    let Committed {
        _dir,
        redis,
        store,
        id,
        saga,
    } = committed_order().await;
    assert_eq!(outbox_length(&redis), 1, "the decision wrote its event");

    // The relay that dies: it reads the event (it is now pending to it) and
    // never publishes or acknowledges it.
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    read_as(&mut conn, "dead-relay");

    let broker = Broker::new(&amqp.url, QueueType::Classic, &[]);
    let live = "live-relay";
    assert_eq!(
        outbox::relay_once(&store, &broker, live, true)
            .await
            .unwrap(),
        0,
        "taken over before it was idle for CLAIM_IDLE"
    );
    tokio::time::sleep(outbox::CLAIM_IDLE + Duration::from_millis(500)).await;
    assert_eq!(
        outbox::relay_once(&store, &broker, live, false)
            .await
            .unwrap(),
        0,
        "a pass that does not look for a dead relay's events reads only new ones"
    );
    assert_eq!(
        outbox::relay_once(&store, &broker, live, true)
            .await
            .unwrap(),
        1
    );
    assert_eq!(outbox_length(&redis), 0, "relayed events leave the outbox");

    let got = events_for(&received, id.as_str()).await;
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0.event_type, EventType::Paid);
    assert_eq!(got[0].0.saga_id, saga);
    assert_eq!(got[0].1, 1);
}

/// The first pass of a relay on a new outbox need not be one that looks for a
/// dead relay's events: reading new ones makes the consumer group too.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pass_that_only_reads_makes_the_group_it_needs() {
    let amqp = support::test_broker("outbox-group");
    let Committed {
        _dir, redis, store, ..
    } = committed_order().await;
    let broker = Broker::new(&amqp.url, QueueType::Classic, &[]);
    assert_eq!(
        outbox::relay_once(&store, &broker, "first", false)
            .await
            .unwrap(),
        1
    );
    assert_eq!(outbox_length(&redis), 0, "relayed events leave the outbox");
}

/// A commit whose EXEC ran but whose reply was lost is retried by the store;
/// the retry finds the order paid by the saga and appends no second event.
#[tokio::test]
async fn a_decision_retried_after_a_lost_reply_announces_once() {
    let dir = ScratchDir::new("outbox-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let proxy = FaultProxy::start(redis.port()).unwrap();
    let via_proxy = format!("redis://127.0.0.1:{}", proxy.port());
    let saga = SagaId::new();
    let (orders, id) = frozen_order(&via_proxy, saga).await;
    proxy.drop_reply_after(b"EXEC");
    assert!(orders.commit(&id, saga).await.unwrap());
    assert_eq!(proxy.fired(), 1, "the EXEC reply was not dropped");
    assert_eq!(outbox_length(&redis), 1);

    // And a fence after the commit (recovery arriving late) announces nothing.
    assert!(orders.fence(&id, saga).await.unwrap());
    assert_eq!(outbox_length(&redis), 1);
}

/// Relays that ended leave consumers in the group (each start names a new
/// one): a pass deletes those that hold nothing once idle long enough, and
/// keeps its own, a recent one, and one still holding an event (another relay
/// takes that over first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumers_of_ended_relays_are_deleted_once_they_hold_nothing() {
    let Committed {
        _dir, redis, store, ..
    } = committed_order().await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let consumers = |conn: &mut redis::Connection| -> Vec<(String, i64)> {
        let infos: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(OUTBOX)
            .arg("relay")
            .query(conn)
            .unwrap();
        let mut named: Vec<(String, i64)> = infos
            .iter()
            .map(|info| {
                (
                    redis::from_redis_value(info["name"].clone()).unwrap(),
                    redis::from_redis_value(info["pending"].clone()).unwrap(),
                )
            })
            .collect();
        named.sort();
        named
    };
    // No stream group yet: nothing to prune, and no error.
    let _: () = redis::cmd("DEL").arg(OUTBOX).query(&mut conn).unwrap();
    assert_eq!(
        outbox::prune_consumers(&store, "live", Duration::ZERO)
            .await
            .unwrap(),
        0
    );

    let saga = SagaId::new();
    let (orders, id) = frozen_order(&redis.url(), saga).await;
    assert!(orders.commit(&id, saga).await.unwrap());
    // "holding" read the event and ended before acknowledging it.
    read_as(&mut conn, "holding");
    for name in ["ended-1", "ended-2", "live"] {
        let _: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(OUTBOX)
            .arg("relay")
            .arg(name)
            .query(&mut conn)
            .unwrap();
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let _: i64 = redis::cmd("XGROUP")
        .arg("CREATECONSUMER")
        .arg(OUTBOX)
        .arg("relay")
        .arg("recent")
        .query(&mut conn)
        .unwrap();

    // "recent" has been idle for far less than 2 s, the others for more than 3 s.
    let deleted = outbox::prune_consumers(&store, "live", Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(deleted, 2);
    assert_eq!(
        consumers(&mut conn),
        vec![
            ("holding".to_string(), 1),
            ("live".to_string(), 0),
            ("recent".to_string(), 0)
        ]
    );
    assert_eq!(outbox_length(&redis), 1, "the held event is still there");
}
