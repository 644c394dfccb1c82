//! The broker dies and comes back: nothing in flight is lost, nothing is
//! applied twice, and no checkout fails for it (issue 8, item 3).
//!
//! Each test runs a private RabbitMQ node it can SIGKILL and start again on
//! the same directory and ports, as the supervisor does with the fleet's
//! broker. What must survive the restart: commands confirmed by the broker
//! (durable queues, persistent messages), and the replies to them, which
//! travel through each order instance's durable reply queue rather than a
//! queue that dies with its connection.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::broker::{Broker, QueueKind};
use common::config::{QueueType, StepOrder};
use common::messages::{Action, Batch, Command, Line, Outcome, Reply};
use common::types::{Amount, ItemId, SagaId};
use lapin::options::BasicAckOptions;
use support::{Endpoints, Fleet, Options};
use tokio::time::Instant;
use xtask::faultproxy::Mode;
use xtask::{free_port, FaultProxy, RabbitNode, ScratchDir};

/// A broker this test may kill: never `TEST_AMQP_URL`, always a node of its own.
fn private_broker(name: &str) -> (RabbitNode, ScratchDir) {
    let dir = ScratchDir::new("broker-restart").unwrap();
    let node = RabbitNode::start(dir.path(), name, free_port(), free_port())
        .expect("start a private RabbitMQ node");
    (node, dir)
}

/// SIGKILL, then (after `down`) the same node on the same directory, as a
/// crash and a supervisor's restart would do; returns how long the broker
/// was away.
async fn kill_and_restart(node: RabbitNode, down: Duration) -> (RabbitNode, Duration) {
    tokio::task::spawn_blocking(move || {
        let mut node = node;
        let started = std::time::Instant::now();
        node.kill9();
        std::thread::sleep(down);
        node.restart().expect("restart the broker");
        (node, started.elapsed())
    })
    .await
    .unwrap()
}

/// The seed scenario: with the participant's consumers stopped, commands keep
/// coming; the broker is killed and started again; then the consumers return.
/// Every command confirmed before the kill is applied exactly once, and its
/// reply reaches the (durable) reply queue whose consumer also lived through
/// the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_queued_across_a_broker_restart_are_applied_once_and_answered() {
    let (node, _broker_dir) = private_broker("restart-seed");
    let (redis, dir) = support::redis_server();
    let stock_link = FaultProxy::start(node.amqp_port()).unwrap();
    let endpoints = Endpoints {
        stock_amqp: support::amqp_via(&node.amqp_url(), stock_link.port()),
        ..Endpoints::direct(&redis, &node.amqp_url())
    };
    let fleet = Fleet::start(
        &node.amqp_url(),
        redis,
        dir,
        &endpoints,
        &Options::default(),
    )
    .await;
    let item = fleet.item(1_000, 1).await;

    // The test's own client: a durable reply queue, consumed across the restart.
    let client = Broker::new(&node.amqp_url(), QueueType::Classic, &[&fleet.stock_queue]);
    let reply_queue = format!("{}.test-replies", fleet.stock_queue);
    let answered: Arc<Mutex<HashMap<SagaId, Vec<Outcome>>>> = Arc::default();
    client.expect_consumer(&reply_queue);
    tokio::spawn({
        let answered = answered.clone();
        client
            .clone()
            .consume(reply_queue.clone(), QueueKind::Reply, 64, move |delivery| {
                let answered = answered.clone();
                async move {
                    let batch = Batch::<Reply>::from_json(&delivery.data).unwrap();
                    {
                        let mut answered = answered.lock().unwrap();
                        for reply in batch.items {
                            answered
                                .entry(reply.saga_id)
                                .or_default()
                                .push(reply.outcome);
                        }
                    }
                    let _ = delivery.ack(BasicAckOptions::default()).await;
                }
            })
    });

    // The participant stops consuming: its link to the broker is dead.
    stock_link.set_mode(Mode::Reset);
    let mut sagas = Vec::new();
    for _ in 0..40 {
        let saga = SagaId::new();
        let body = Batch::of(vec![Command {
            saga_id: saga,
            action: Action::Reserve {
                lines: vec![Line {
                    item_id: ItemId::parse(&item).unwrap(),
                    quantity: Amount::new(1).unwrap(),
                }],
            },
            expires_at_ms: Some(common::now_ms() + 120_000),
        }])
        .to_json();
        client
            .publish(&fleet.stock_queue, Some(&reply_queue), &body)
            .await
            .expect("confirmed before the kill");
        sagas.push(saga);
    }

    let (_node, away) = kill_and_restart(node, Duration::ZERO).await;
    println!("broker away for {away:?}");
    stock_link.set_mode(Mode::Forward);

    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = answered.lock().unwrap().len();
        if done == sagas.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {done} of {} commands answered after the restart",
            sagas.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Redeliveries (there may be some) must find the recorded outcome, not apply again.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(fleet.stock_of(&item).await, 1_000 - sagas.len() as i64);
    let answered = answered.lock().unwrap();
    for saga in &sagas {
        let outcomes = &answered[saga];
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Applied),
            "{saga}: {outcomes:?}"
        );
    }
}

/// Checkouts keep coming while the broker is SIGKILLed and, longer than a
/// step timeout later, started again: every one of them is answered by the
/// business rule (here: all can pay, so 200), none by a step timeout, and
/// stock and credit match what was paid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkouts_in_flight_when_the_broker_is_killed_finish_after_it_returns() {
    let (node, _broker_dir) = private_broker("restart-sagas");
    let (redis, dir) = support::redis_server();
    let options = Options {
        step_order: StepOrder::Sequential,
        // The production default (STEP_TIMEOUT_MS): a restart must fit in it.
        step_timeout: Duration::from_secs(10),
        checkout_timeout: Duration::from_secs(30),
        saga_lease: Duration::from_secs(3),
    };
    let endpoints = Endpoints::direct(&redis, &node.amqp_url());
    let fleet = Arc::new(Fleet::start(&node.amqp_url(), redis, dir, &endpoints, &options).await);
    let item = fleet.item(100_000, 1).await;
    const CHECKOUTS: usize = 240;
    let mut orders = Vec::new();
    for _ in 0..CHECKOUTS {
        let user = fleet.user(10).await;
        let order = fleet.order(&user, &[(&item, 1)]).await;
        orders.push((user, order));
    }

    // A steady stream of checkouts, 200 per second; the broker dies 0.6 s in.
    let started = Instant::now();
    let mut running = Vec::new();
    for (i, (_, order)) in orders.iter().enumerate() {
        let fleet = fleet.clone();
        let order = order.clone();
        let send_at = started + Duration::from_millis(5 * i as u64);
        running.push(tokio::spawn(async move {
            tokio::time::sleep_until(send_at).await;
            let sent = Instant::now();
            let (status, body) = fleet
                .post(&format!("{}/checkout/{order}", fleet.order))
                .await;
            (sent, Instant::now(), status, body)
        }));
    }
    tokio::time::sleep_until(started + Duration::from_millis(600)).await;
    let killed_at = Instant::now();
    // Away for longer than a step may wait: a step's clock must not run out
    // for a broker that is away, only for a participant that does not answer.
    let (_node, away) = kill_and_restart(node, options.step_timeout).await;

    let mut in_flight = 0;
    let mut by_status: HashMap<u16, usize> = HashMap::new();
    let mut failures = Vec::new();
    for task in running {
        let (sent, answered, status, body) = task.await.unwrap();
        *by_status.entry(status).or_default() += 1;
        if sent <= killed_at && answered >= killed_at {
            in_flight += 1;
        }
        if status != 200 {
            failures.push(format!("{status} {body}"));
        }
    }
    println!(
        "broker away {away:?}; {in_flight} checkouts in flight at the kill; answers {by_status:?}"
    );
    // At 200 per second a checkout in flight at the kill is one sent in the ~40 ms before
    // it: 8-20 of them, fewer on a fast box (a clean-clone CI run saw 9 against a bound
    // of 10 there, all 240 answered 200). Five still make the kill land mid-saga.
    assert!(
        in_flight >= 5,
        "only {in_flight} checkouts in flight at the kill"
    );
    assert!(failures.is_empty(), "checkouts failed: {failures:?}");

    // The stores agree with the answers: every order paid once, nothing else taken.
    assert_eq!(fleet.stock_of(&item).await, 100_000 - CHECKOUTS as i64);
    for (user, order) in &orders {
        assert!(
            fleet.paid(order).await,
            "{order} answered 200 but is not paid"
        );
        assert_eq!(fleet.credit_of(user).await, 9, "{user}");
    }
}
