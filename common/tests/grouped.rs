//! Group publishing against a real RabbitMQ node: concurrent senders to one
//! queue share messages, every item arrives exactly once, and every sender
//! hears of a publish that failed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::broker::{Broker, QueueKind};
use common::config::QueueType;
use common::grouped::Grouped;
use common::messages::{Action, Batch, Command};
use common::types::SagaId;
use lapin::options::BasicAckOptions;
use xtask::{free_port, RabbitNode, ScratchDir};

const QUEUE: &str = "grouped.test";

/// What arrived: items per saga, messages, and the reply queue each message named.
type Arrived = (HashMap<SagaId, usize>, usize, Vec<String>);
const SENDERS: usize = 300;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_items_share_messages_and_each_arrives_once() {
    let dir = ScratchDir::new("grouped-test-broker").unwrap();
    let node = RabbitNode::start(dir.path(), "grouped-test", free_port(), free_port())
        .expect("start a private RabbitMQ node");
    let broker = Broker::new(&node.amqp_url(), QueueType::Classic, &[QUEUE]);
    let grouped = Grouped::new(broker.clone());

    let sent: Vec<SagaId> = (0..SENDERS).map(|_| SagaId::new()).collect();
    let publishes = sent.iter().map(|saga| {
        let grouped = grouped.clone();
        let command = Command {
            saga_id: *saga,
            action: Action::Settle,
            expires_at_ms: None,
        };
        tokio::spawn(async move {
            grouped
                .publish(
                    QUEUE,
                    Some("replies.here"),
                    &command,
                    Duration::from_secs(10),
                )
                .await
        })
    });
    for confirmed in futures::future::join_all(publishes).await {
        confirmed.unwrap().expect("every sender hears its confirm");
    }

    let seen: Arc<Mutex<Arrived>> = Arc::default();
    let recorder = seen.clone();
    tokio::spawn(broker.clone().consume(
        QUEUE.to_string(),
        QueueKind::Durable,
        50,
        move |delivery| {
            let recorder = recorder.clone();
            async move {
                let batch = Batch::<Command>::from_json(&delivery.data).expect("a batch");
                {
                    let mut seen = recorder.lock().unwrap();
                    for command in batch.items {
                        *seen.0.entry(command.saga_id).or_default() += 1;
                    }
                    seen.1 += 1;
                    let reply_to = delivery
                        .properties
                        .reply_to()
                        .as_ref()
                        .map(|q| q.to_string());
                    seen.2.push(reply_to.unwrap_or_default());
                }
                delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
        },
    ));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if seen.lock().unwrap().0.len() == SENDERS || tokio::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (items, messages, reply_queues) = &*seen.lock().unwrap();
    assert_eq!(items.len(), SENDERS, "every item arrived");
    assert!(
        sent.iter().all(|saga| items.get(saga) == Some(&1)),
        "each item arrived exactly once"
    );
    assert!(
        *messages <= SENDERS / 10,
        "{SENDERS} concurrent items travelled in {messages} messages: not grouped"
    );
    assert!(reply_queues.iter().all(|q| q == "replies.here"));
    println!("{SENDERS} items in {messages} messages");
}

#[tokio::test]
async fn every_sender_hears_of_a_publish_that_failed() {
    // Nothing listens on this port: no message can be confirmed.
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let broker = Broker::new(&url, QueueType::Classic, &[QUEUE]);
    let grouped = Grouped::new(broker);
    let publishes = (0..20).map(|_| {
        let grouped = grouped.clone();
        tokio::spawn(async move {
            let command = Command {
                saga_id: SagaId::new(),
                action: Action::Settle,
                expires_at_ms: None,
            };
            grouped
                .publish(QUEUE, None, &command, Duration::from_millis(300))
                .await
        })
    });
    for outcome in futures::future::join_all(publishes).await {
        assert!(
            outcome.unwrap().is_err(),
            "a failed publish reported as sent"
        );
    }
}
