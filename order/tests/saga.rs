//! The checkout saga end to end, in process: real stock, payment and order
//! apps (each as built by its crate), a real redis-server and a real
//! RabbitMQ broker. Each test uses queue names of its own, so tests (and a
//! fleet sharing the broker) never see each other's messages.
//!
//! The broker is `TEST_AMQP_URL` (`cargo xtask test` points it at the
//! fleet's node); without it, a private node is started for the run. The
//! scenarios run one after another inside a single test so that such a node
//! is stopped when they end (a node kept in a static would outlive them).
//! The fleet harness lives in `support/mod.rs`, shared with `participants.rs`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use common::broker::{Broker, QueueKind};
use common::config::QueueType;
use common::messages::{Action, Batch, Command, Line, Outcome, Reply};
use common::types::{Amount, ItemId, SagaId};
use support::{
    active_sagas, amqp_port, direct_store, fleet, fleet_with, test_broker, Endpoints, Fleet,
    Options,
};
use xtask::faultproxy::Mode;
use xtask::FaultProxy;

async fn a_checkout_takes_stock_and_credit_and_marks_the_order_paid(amqp: &str) {
    let f = fleet(amqp).await;
    let item = f.item(5, 3).await;
    let user = f.user(10).await;
    let order = f.order(&user, &[(&item, 2)]).await;
    assert_eq!(f.checkout(&order).await, 200);
    assert_eq!(f.stock_of(&item).await, 3);
    assert_eq!(f.credit_of(&user).await, 4);
    assert!(f.paid(&order).await);
    // Checking out a paid order again charges nothing.
    assert_eq!(f.checkout(&order).await, 200);
    assert_eq!(f.credit_of(&user).await, 4);
    assert_eq!(f.stock_of(&item).await, 3);
}

async fn a_refused_step_is_compensated_and_nothing_stays_taken(amqp: &str) {
    let f = fleet(amqp).await;
    let a = f.item(5, 1).await;
    let b = f.item(1, 1).await;
    let rich = f.user(100).await;
    let poor = f.user(1).await;
    // Not enough of item b: the reservation takes nothing, the charge is refunded.
    let short = f.order(&rich, &[(&a, 2), (&b, 2)]).await;
    assert_eq!(f.checkout(&short).await, 400);
    // Not enough credit: the reservation is released.
    let broke = f.order(&poor, &[(&a, 3)]).await;
    assert_eq!(f.checkout(&broke).await, 400);
    assert_eq!(f.stock_of(&a).await, 5);
    assert_eq!(f.stock_of(&b).await, 1);
    assert_eq!(f.credit_of(&rich).await, 100);
    assert_eq!(f.credit_of(&poor).await, 1);
    assert!(!f.paid(&short).await && !f.paid(&broke).await);
}

/// The status of a checkout of each of `orders`, all sent at once.
async fn checkouts_at_once(f: &Arc<Fleet>, orders: &[String]) -> Vec<u16> {
    let checkouts: Vec<_> = orders
        .iter()
        .map(|order| {
            let (f, order) = (f.clone(), order.clone());
            tokio::spawn(async move { f.checkout(&order).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for checkout in checkouts {
        statuses.push(checkout.await.unwrap());
    }
    statuses
}

async fn concurrent_checkouts_of_one_order_charge_it_once(amqp: &str) {
    let f = Arc::new(fleet(amqp).await);
    let item = f.item(10, 2).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 1)]).await;
    let statuses = checkouts_at_once(&f, &vec![order.clone(); 8]).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(f.credit_of(&user).await, 98);
    assert_eq!(f.stock_of(&item).await, 9);
}

/// A reply queue of the test's own on `f`'s broker: the broker to publish
/// with, the queue's name, and each reply message as it arrives (its replies).
async fn reply_queue(
    f: &Fleet,
) -> (
    Arc<Broker>,
    String,
    tokio::sync::mpsc::UnboundedReceiver<Vec<Reply>>,
) {
    let broker = Broker::new(&f.amqp, QueueType::Classic, &[]);
    let reply_queue = format!("test.replies.{}", uuid::Uuid::new_v4().simple());
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(broker.clone().consume(
        reply_queue.clone(),
        QueueKind::Reply,
        16,
        move |d: lapin::message::Delivery| {
            let _ = tx.send(Batch::<Reply>::from_json(&d.data).unwrap().items);
            async move {
                let _ = d.ack(lapin::options::BasicAckOptions::default()).await;
            }
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await; // the reply queue exists
    (broker, reply_queue, rx)
}

/// The value of counter `series` (name and labels) at `service`'s
/// `/metrics`, 0 while it has not been counted. The registry is the test
/// process's, shared by every in-process service and fleet: compare values
/// taken before and after.
async fn counter(f: &Fleet, service: &str, series: &str) -> u64 {
    let metrics = f.get_text(&format!("{service}/metrics")).await;
    let name = format!("{series} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&name))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// Dead letters of commands that failed for good (all participants of the test process).
const DEAD_LETTERED: &str = "broker_dead_lettered_total{reason=\"store_error\"}";

/// How many checkouts sent their steps `order` (`parallel` or `sequential`).
async fn steps_sent(f: &Fleet, order: &str) -> u64 {
    counter(
        f,
        &f.order,
        &format!("checkout_steps_total{{order=\"{order}\"}}"),
    )
    .await
}

/// `SAGA_STEPS=adaptive` (the default): a checkout whose items no other
/// running checkout reserves sends both steps at once; checkouts racing for
/// one item go in sequence, and so does one of an item stock just refused;
/// whichever way, exactly what was sold was charged. (The broker link is slow,
/// so the racing checkouts' steps surely overlap.)
async fn steps_go_at_once_unless_an_item_may_run_out(amqp: &str) {
    let (f, _proxy) = slow_saga_fleet(amqp).await;
    let f = Arc::new(f);
    let (parallel, sequential) = (
        steps_sent(&f, "parallel").await,
        steps_sent(&f, "sequential").await,
    );
    let item = f.item(5, 2).await;
    let user = f.user(100).await;
    let lone = f.order(&user, &[(&item, 1)]).await;
    assert_eq!(f.checkout(&lone).await, 200);
    assert_eq!(
        steps_sent(&f, "parallel").await,
        parallel + 1,
        "a lone checkout: at once"
    );
    assert_eq!(steps_sent(&f, "sequential").await, sequential);
    let mut orders = Vec::new();
    for _ in 0..12 {
        orders.push(f.order(&f.user(2).await, &[(&item, 1)]).await);
    }
    let statuses = checkouts_at_once(&f, &orders).await;
    let racing_in_sequence = steps_sent(&f, "sequential").await - sequential;
    assert!(
        racing_in_sequence > 0,
        "twelve checkouts racing for one item: some went in sequence"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        4,
        "{statuses:?}"
    );
    assert_eq!(f.stock_of(&item).await, 0);
    for order in &orders {
        let user = f.find_order(order).await["user_id"]
            .as_str()
            .unwrap()
            .to_string();
        let expected = if f.paid(order).await { 0 } else { 2 };
        assert_eq!(
            f.credit_of(&user).await,
            expected,
            "charged exactly when paid"
        );
    }
    // Sold out, and stock just said so: the next checkout of it, alone, goes in
    // sequence and is refused without a charge to refund.
    let (parallel, sequential) = (
        steps_sent(&f, "parallel").await,
        steps_sent(&f, "sequential").await,
    );
    let late = f.order(&user, &[(&item, 1)]).await;
    assert_eq!(f.checkout(&late).await, 400);
    assert_eq!(steps_sent(&f, "sequential").await, sequential + 1);
    assert_eq!(steps_sent(&f, "parallel").await, parallel);
    assert_eq!(
        f.credit_of(&user).await,
        98,
        "charged for the lone checkout only"
    );
}

/// Sends `command` straight to the stock queue `times` times, as a broker
/// redelivery would, and returns the replies.
async fn deliver(f: &Fleet, command: &Command, times: usize) -> Vec<Outcome> {
    let (broker, reply_queue, mut rx) = reply_queue(f).await;
    let body = Batch::of(vec![command.clone()]).to_json();
    let mut outcomes = Vec::new();
    for _ in 0..times {
        broker
            .publish(&f.stock_queue, Some(&reply_queue), &body)
            .await
            .unwrap();
        let replies = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a reply")
            .unwrap();
        outcomes.extend(replies.into_iter().map(|reply| reply.outcome));
    }
    outcomes
}

async fn next_replies(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<Reply>>) -> Vec<Reply> {
    tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .expect("a reply")
        .unwrap()
}

fn reserve(saga_id: SagaId, item: &str, quantity: i64) -> Command {
    Command {
        saga_id,
        action: Action::Reserve {
            lines: vec![Line {
                item_id: ItemId::parse(item).unwrap(),
                quantity: Amount::new(quantity).unwrap(),
            }],
        },
        expires_at_ms: None,
    }
}

/// Makes the stock participant's record of `saga` unreadable: any command of
/// that saga then fails for good (it is never applied on a guess).
async fn corrupt_stock_record(f: &Fleet, saga: SagaId) {
    let mut stock_db = f.db(1).await;
    let _: () = redis::cmd("SET")
        .arg(format!("itemsaga:{saga}"))
        .arg("garbage")
        .query_async(&mut stock_db)
        .await
        .unwrap();
}

/// Two sagas' commands in one message (as group publishing sends them), one of
/// which cannot apply (its record is corrupt): the other is applied and
/// answered at once, in a message of its own, not after the failing one's
/// retries; the failing one is retried alone, then answered `Failed`.
async fn a_failing_command_does_not_hold_up_its_message(amqp: &str) {
    let f = fleet(amqp).await;
    let (broken_item, fine_item) = (f.item(10, 1).await, f.item(10, 1).await);
    let (broken, fine) = (SagaId::new(), SagaId::new());
    corrupt_stock_record(&f, broken).await;
    let (broker, reply_queue, mut rx) = reply_queue(&f).await;
    let body = Batch::of(vec![
        reserve(broken, &broken_item, 1),
        reserve(fine, &fine_item, 3),
    ]);
    broker
        .publish(&f.stock_queue, Some(&reply_queue), &body.to_json())
        .await
        .unwrap();
    let first = next_replies(&mut rx).await;
    assert_eq!(first.len(), 1, "the fine command alone: {first:?}");
    assert_eq!(
        (first[0].saga_id, &first[0].outcome),
        (fine, &Outcome::Applied)
    );
    assert_eq!(f.stock_of(&fine_item).await, 7);
    let last = next_replies(&mut rx).await;
    assert_eq!(last.len(), 1, "the failing command alone: {last:?}");
    assert_eq!(last[0].saga_id, broken);
    assert!(
        matches!(last[0].outcome, Outcome::Failed { .. }),
        "{last:?}"
    );
    assert_eq!(f.stock_of(&broken_item).await, 10, "nothing taken");
}

async fn a_command_delivered_twice_over_the_broker_applies_once(amqp: &str) {
    let f = fleet(amqp).await;
    let item = f.item(10, 1).await;
    let outcomes = deliver(&f, &reserve(SagaId::new(), &item, 4), 2).await;
    assert_eq!(outcomes, vec![Outcome::Applied, Outcome::Applied]);
    assert_eq!(f.stock_of(&item).await, 6);
}

async fn a_late_command_after_its_compensation_is_refused_over_the_broker(amqp: &str) {
    let f = fleet(amqp).await;
    let item = f.item(10, 1).await;
    let saga_id = SagaId::new();
    let lines = vec![Line {
        item_id: ItemId::parse(&item).unwrap(),
        quantity: Amount::new(4).unwrap(),
    }];
    let release = Command {
        saga_id,
        action: Action::Release {
            lines: lines.clone(),
        },
        expires_at_ms: None,
    };
    let reserve = Command {
        saga_id,
        action: Action::Reserve { lines },
        expires_at_ms: None,
    };
    assert_eq!(deliver(&f, &release, 1).await, vec![Outcome::Applied]);
    let late = deliver(&f, &reserve, 1).await;
    assert!(matches!(late[0], Outcome::Refused { .. }), "{late:?}");
    assert_eq!(f.stock_of(&item).await, 10);
}

/// A fleet whose order service talks to the broker through a proxy that
/// delays every chunk: a checkout then takes long enough for other requests
/// to land deterministically in the middle of it.
async fn slow_saga_fleet(amqp: &str) -> (Fleet, FaultProxy) {
    let proxy = FaultProxy::start(amqp_port(amqp)).unwrap();
    let via_proxy = amqp.replace(
        &format!(":{}/", amqp_port(amqp)),
        &format!(":{}/", proxy.port()),
    );
    let f = fleet_with(amqp, &via_proxy).await;
    proxy.set_mode(Mode::Delay(Duration::from_millis(150)));
    (f, proxy)
}

/// addItem racing a checkout of the same order, many times: whatever
/// interleaving happens, a paid order was charged exactly its final total and
/// reserved exactly its final items.
async fn add_item_racing_a_checkout_never_changes_what_was_paid(amqp: &str) {
    let f = Arc::new(fleet(amqp).await);
    let cheap = f.item(1000, 1).await;
    let dear = f.item(1000, 100).await;
    let (mut conflicts, mut before) = (0, 0);
    let mut dear_sold = 0;
    for _ in 0..40 {
        let user = f.user(1_000_000).await;
        let order = f.order(&user, &[(&cheap, 1)]).await;
        let checkout = tokio::spawn({
            let (f, order) = (f.clone(), order.clone());
            async move { f.checkout(&order).await }
        });
        let add = f
            .post(&format!("{}/addItem/{order}/{dear}/1", f.order))
            .await;
        assert_eq!(checkout.await.unwrap(), 200);
        match add.0 {
            200 => before += 1,
            409 | 400 => conflicts += 1,
            other => panic!("addItem answered {other}: {}", add.1),
        }
        let found = f.find_order(&order).await;
        assert!(found["paid"].as_bool().unwrap());
        let total = found["total_cost"].as_i64().unwrap();
        assert_eq!(1_000_000 - f.credit_of(&user).await, total, "{found}");
        let has_dear = found["items"]
            .as_array()
            .unwrap()
            .iter()
            .any(|line| line[0] == dear.as_str());
        assert_eq!(total, if has_dear { 101 } else { 1 }, "{found}");
        dear_sold += i64::from(has_dear);
    }
    assert_eq!(f.stock_of(&dear).await, 1000 - dear_sold);
    assert_eq!(f.stock_of(&cheap).await, 1000 - 40);
    println!("addItem before the checkout froze the order: {before}, refused: {conflicts}");
}

/// A checkout racing a stream of addItems on the same order is never
/// starved into a 5xx: it freezes the order as it finds it and charges
/// exactly that content.
async fn a_checkout_is_not_starved_by_concurrent_add_items(amqp: &str) {
    let f = Arc::new(fleet(amqp).await);
    let item = f.item(100_000, 1).await;
    for _ in 0..10 {
        let user = f.user(1_000_000).await;
        let order = f.order(&user, &[(&item, 1)]).await;
        let adders: Vec<_> = (0..8)
            .map(|_| {
                let (f, order, item) = (f.clone(), order.clone(), item.clone());
                tokio::spawn(async move {
                    for _ in 0..10 {
                        let (status, body) = f
                            .post(&format!("{}/addItem/{order}/{item}/1", f.order))
                            .await;
                        assert!([200, 400, 409].contains(&status), "{status} {body}");
                    }
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(f.checkout(&order).await, 200);
        for adder in adders {
            adder.await.unwrap();
        }
        let found = f.find_order(&order).await;
        let total = found["total_cost"].as_i64().unwrap();
        assert_eq!(1_000_000 - f.credit_of(&user).await, total, "{found}");
    }
}

/// While a checkout runs, addItem is refused with 409 and writes nothing.
async fn an_order_under_checkout_is_frozen(amqp: &str) {
    let (f, _proxy) = slow_saga_fleet(amqp).await;
    let f = Arc::new(f);
    let item = f.item(10, 5).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 1)]).await;
    let checkout = tokio::spawn({
        let (f, order) = (f.clone(), order.clone());
        async move { f.checkout(&order).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (status, body) = f
        .post(&format!("{}/addItem/{order}/{item}/1", f.order))
        .await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("checked out"),
        "{body}"
    );
    assert_eq!(checkout.await.unwrap(), 200);
    let found = f.find_order(&order).await;
    assert_eq!(found["total_cost"], 5, "{found}");
    assert_eq!(f.credit_of(&user).await, 95);
    assert_eq!(f.stock_of(&item).await, 9);
}

/// The wedge from the field: a checkout whose charge is refused reserves,
/// then releases. Adds that land in between must never make the release
/// impossible: those that would are refused, the checkout ends 400 quickly,
/// nothing stays taken, and the fleet keeps serving.
async fn a_legal_add_can_never_make_an_undo_impossible(amqp: &str) {
    let (f, _proxy) = slow_saga_fleet(amqp).await;
    let f = Arc::new(f);
    let item = f.item(5, 1).await;
    let broke = f.user(0).await;
    let order = f.order(&broke, &[(&item, 5)]).await;
    let started = std::time::Instant::now();
    let checkout = tokio::spawn({
        let (f, order) = (f.clone(), order.clone());
        async move { f.checkout(&order).await }
    });
    let mut accepted = 0;
    while !checkout.is_finished() {
        let (status, body) = f
            .post(&format!("{}/add/{item}/{}", f.stock, i64::MAX))
            .await;
        match status {
            200 => accepted += 1,
            400 => {}
            other => panic!("add answered {other}: {body}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(checkout.await.unwrap(), 400);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        accepted, 0,
        "an add that could overflow the release was accepted"
    );
    assert_eq!(f.stock_of(&item).await, 5);
    assert!(!f.paid(&order).await);
    // The fleet is not wedged: another checkout goes through at once.
    let rich = f.user(10).await;
    let other = f.order(&rich, &[(&item, 1)]).await;
    assert_eq!(f.checkout(&other).await, 200);
}

/// `batch_init` overwrites an order while its checkout runs: the checkout
/// cannot commit the old order, answers 400, and nothing stays taken.
async fn batch_init_under_a_checkout_leaves_nothing_taken(amqp: &str) {
    let (f, _proxy) = slow_saga_fleet(amqp).await;
    let f = Arc::new(f);
    f.post_ok(&format!("{}/batch_init/2/100/1", f.stock)).await;
    f.post_ok(&format!("{}/batch_init/1/100", f.payment)).await;
    f.post_ok(&format!("{}/batch_init/1/2/1/1", f.order)).await;
    let checkout = tokio::spawn({
        let f = f.clone();
        async move { f.checkout("0").await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    f.post_ok(&format!("{}/batch_init/1/2/1/1", f.order)).await;
    assert_eq!(checkout.await.unwrap(), 400);
    assert_eq!(f.credit_of("0").await, 100);
    assert_eq!(f.stock_of("0").await + f.stock_of("1").await, 200);
    assert!(!f.paid("0").await);
    // The new order checks out normally.
    assert_eq!(f.checkout("0").await, 200);
    assert_eq!(f.credit_of("0").await, 98);
}

/// "Already paid" is an answer like any other: recorded under the request's
/// key, so a repeat hears it again after batch_init made the order unpaid.
/// (Found by the 10-minute history: the repeat ran a new checkout of the new
/// order and charged for it.)
async fn an_already_paid_answer_is_recorded_under_its_key(amqp: &str) {
    let f = fleet(amqp).await;
    f.post_ok(&format!("{}/batch_init/2/100/1", f.stock)).await;
    f.post_ok(&format!("{}/batch_init/1/100", f.payment)).await;
    f.post_ok(&format!("{}/batch_init/1/2/1/1", f.order)).await;
    assert_eq!(f.checkout("0").await, 200);
    let url = format!("{}/checkout/0", f.order);
    let (status, first) = f.post_with_key(&url, "already-paid").await;
    assert_eq!(status, 200, "{first}");
    f.post_ok(&format!("{}/batch_init/1/2/1/1", f.order)).await;
    assert!(!f.paid("0").await, "batch_init made the order unpaid");
    let (status, again) = f.post_with_key(&url, "already-paid").await;
    assert_eq!((status, &again), (200, &first), "the repeat answered anew");
    assert!(!f.paid("0").await, "the repeat checked the new order out");
    assert_eq!(
        f.credit_of("0").await,
        98,
        "charged once, for the first order"
    );
    assert_eq!(f.stock_of("0").await + f.stock_of("1").await, 198);
}

/// The same Idempotency-Key twice returns the first answer, even when the
/// world changed in between; another key is a new request.
async fn a_checkout_repeated_with_its_key_returns_the_first_answer(amqp: &str) {
    let f = fleet(amqp).await;
    let item = f.item(0, 2).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 1)]).await;
    let url = format!("{}/checkout/{order}", f.order);
    let first = f.post_with_key(&url, "key-1").await;
    assert_eq!(first.0, 400, "{first:?}");
    f.post_ok(&format!("{}/add/{item}/5", f.stock)).await;
    assert_eq!(f.post_with_key(&url, "key-1").await, first);
    assert_eq!(f.stock_of(&item).await, 5);
    let second = f.post_with_key(&url, "key-2").await;
    assert_eq!(second.0, 200, "{second:?}");
    assert_eq!(f.post_with_key(&url, "key-2").await, second);
    assert_eq!(f.credit_of(&user).await, 98);
    // A plain write, repeated with its key, is applied once.
    let add = format!("{}/add_funds/{user}/7", f.payment);
    let a = f.post_with_key(&add, "fund-1").await;
    assert_eq!(f.post_with_key(&add, "fund-1").await, a);
    assert_eq!(f.credit_of(&user).await, 105);
    // A malformed key is a 400 and writes nothing.
    let (status, _) = f.post_with_key(&add, "").await;
    assert_eq!(status, 400);
    assert_eq!(f.credit_of(&user).await, 105);
    // A 404 is a first answer too: the order created since does not turn the key's
    // repeat into a checkout; another key checks it out.
    let missing = format!("{}/checkout/0", f.order);
    let first = f.post_with_key(&missing, "key-3").await;
    assert_eq!(first.0, 404, "{first:?}");
    f.post_ok(&format!("{}/batch_init/1/1/1/1", f.order)).await;
    assert_eq!(f.post_with_key(&missing, "key-3").await, first);
    let other = f.post_with_key(&missing, "key-4").await;
    assert_ne!(other.0, 404, "{other:?}");
}

/// Begins a saga as an order instance that then dies: record written with a
/// lease that lapses at once, order frozen, the reservation applied.
async fn orphan(f: &Fleet, order: &str) -> SagaId {
    let store = direct_store(&format!("{}/4", f.redis.url()));
    let orders = order::orders::Orders::new(direct_store(&format!("{}/3", f.redis.url())));
    let order_id = common::types::OrderId::parse(order).unwrap();
    let seen = orders.find(&order_id).await.unwrap();
    let saga = order::saga_store::SagaRecord {
        id: SagaId::new(),
        order_id: order_id.clone(),
        user_id: seen.user_id.clone(),
        lines: seen.lines(),
        total: seen.total_cost,
        idem: None,
    };
    let sagas = order::saga_store::SagaStore::new(store);
    assert!(matches!(
        sagas
            .begin(&saga, "dead-instance", Duration::from_millis(300))
            .await
            .unwrap(),
        order::saga_store::Begin::Started
    ));
    assert!(matches!(
        orders.freeze(&order_id, saga.id, None).await.unwrap(),
        order::orders::Freeze::Frozen(_)
    ));
    let reserve = Command {
        saga_id: saga.id,
        action: Action::Reserve { lines: saga.lines },
        expires_at_ms: None,
    };
    assert_eq!(deliver(f, &reserve, 1).await, vec![Outcome::Applied]);
    saga.id
}

/// An order instance dies mid-saga: another instance's recovery fences the
/// order, compensates, and frees it, within a few seconds.
async fn a_saga_whose_owner_died_is_recovered(amqp: &str) {
    let f = fleet(amqp).await;
    let item = f.item(10, 3).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 2)]).await;
    let saga = orphan(&f, &order).await;
    assert_eq!(f.stock_of(&item).await, 8);
    let (status, _) = f
        .post(&format!("{}/addItem/{order}/{item}/1", f.order))
        .await;
    assert_eq!(status, 409, "the orphan's order is not frozen");
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while active_sagas(&f, "sagas:active")
        .await
        .contains(&saga.to_string())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "saga {saga} never recovered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f.stock_of(&item).await, 10);
    assert_eq!(f.credit_of(&user).await, 100);
    assert!(!f.paid(&order).await);
    assert_eq!(f.checkout(&order).await, 200);
    assert_eq!(f.credit_of(&user).await, 94);
}

/// A saga recovery finishes by aborting answers nobody: its owner's client
/// heard 503 (or nothing), and a retry with the same key must look at the
/// order again. Here the owner began a saga for an order that another
/// checkout paid meanwhile, and died before it could abandon it: the retry is
/// a 200 ("already paid"), not the recovery's 400 — and nothing is charged.
async fn a_recovered_saga_leaves_the_answer_to_the_retry(amqp: &str) {
    let f = fleet(amqp).await;
    let item = f.item(10, 3).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 2)]).await;
    assert_eq!(f.checkout(&order).await, 200);
    let key = "owner-died-before-abandoning";
    let sagas = order::saga_store::SagaStore::new(direct_store(&format!("{}/4", f.redis.url())));
    let saga = order::saga_store::SagaRecord {
        id: SagaId::new(),
        order_id: common::types::OrderId::parse(&order).unwrap(),
        user_id: common::types::UserId::parse(&user).unwrap(),
        lines: vec![],
        total: Amount::new(6).unwrap(),
        idem: Some((format!("idem:/checkout/{order}:{key}"), 600)),
    };
    assert!(matches!(
        sagas
            .begin(&saga, "dead-instance", Duration::from_millis(300))
            .await
            .unwrap(),
        order::saga_store::Begin::Started
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while active_sagas(&f, "sagas:active")
        .await
        .contains(&saga.id.to_string())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "saga {} never recovered",
            saga.id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, body) = f
        .post_with_key(&format!("{}/checkout/{order}", f.order), key)
        .await;
    assert_eq!(status, 200, "the retry heard the recovery's words: {body}");
    assert_eq!(f.credit_of(&user).await, 94, "charged once");
    assert_eq!(f.stock_of(&item).await, 8, "reserved once");
}

/// A compensation that can never apply (its record is corrupt) is retried a
/// bounded number of times, dead-lettered, and its saga handed to an
/// operator; the order is not locked, and other checkouts are not delayed.
async fn a_compensation_that_cannot_apply_is_dead_lettered(amqp: &str) {
    let f = Arc::new(fleet(amqp).await);
    let item = f.item(10, 3).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 2)]).await;
    let dead_lettered = counter(&f, &f.stock, DEAD_LETTERED).await;
    let saga = orphan(&f, &order).await;
    corrupt_stock_record(&f, saga).await;
    // Meanwhile, an unrelated checkout is served as usual.
    let other_user = f.user(100).await;
    let other = f.order(&other_user, &[(&item, 1)]).await;
    let started = std::time::Instant::now();
    assert_eq!(f.checkout(&other).await, 200);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !active_sagas(&f, "sagas:attention")
        .await
        .contains(&saga.to_string())
    {
        assert!(
            std::time::Instant::now() < deadline,
            "saga {saga} never needed attention"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!active_sagas(&f, "sagas:active")
        .await
        .contains(&saga.to_string()));
    assert!(
        counter(&f, &f.stock, DEAD_LETTERED).await > dead_lettered,
        "no dead letter counted"
    );
    // The order is not locked: it takes items again.
    let (status, body) = f
        .post(&format!("{}/addItem/{order}/{item}/1", f.order))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Sets `maxmemory` of the redis-server behind `conn`: 1 byte makes every write an `OOM`
/// (the store is full), 0 lifts the limit.
async fn set_maxmemory(conn: &mut redis::aio::MultiplexedConnection, bytes: u64) {
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(bytes)
        .query_async(conn)
        .await
        .unwrap();
}

/// A store out of memory (`maxmemory` with `noeviction`, as on k8s) refuses every write: a
/// checkout then answers 503 with `Retry-After` (the system's failure, not the client's: never
/// a 500), having taken nothing, and so does any other write; once there is room again the
/// retry with the same key checks out once.
async fn a_full_store_answers_503_and_takes_nothing(amqp: &str) {
    let f = fleet(amqp).await;
    let item = f.item(5, 3).await;
    let user = f.user(10).await;
    let order = f.order(&user, &[(&item, 2)]).await;
    let mut redis = f.db(0).await;
    set_maxmemory(&mut redis, 1).await;

    let checkout = f
        .http
        .post(format!("{}/checkout/{order}", f.order))
        .header("Idempotency-Key", "full-store")
        .send()
        .await
        .unwrap();
    let status = checkout.status().as_u16();
    let retry_after = checkout.headers().get("retry-after").cloned();
    let body: serde_json::Value = checkout.json().await.unwrap();
    assert_eq!(status, 503, "checkout on a full store: {body}");
    assert_eq!(
        retry_after.as_ref().and_then(|v| v.to_str().ok()),
        Some("10"),
        "a 503 says when to retry"
    );
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains("full")),
        "the reason names the full store: {body}"
    );
    let (status, body) = f
        .post_with_key(&format!("{}/add/{item}/1", f.stock), "full-store-add")
        .await;
    assert_eq!(status, 503, "a plain write on a full store: {body}");

    set_maxmemory(&mut redis, 0).await;
    assert_eq!(
        f.stock_of(&item).await,
        5,
        "the refused checkout took stock"
    );
    assert_eq!(
        f.credit_of(&user).await,
        10,
        "the refused checkout took credit"
    );
    assert!(!f.paid(&order).await);
    let (status, body) = f
        .post_with_key(&format!("{}/checkout/{order}", f.order), "full-store")
        .await;
    assert_eq!(status, 200, "the retry once there is room: {body}");
    assert_eq!(f.stock_of(&item).await, 3);
    assert_eq!(f.credit_of(&user).await, 4);
}

/// A participant whose store is full (only stock's, here: a redis-server of its own) cannot
/// apply the checkout's reservation: the checkout is refused or left undecided (400 or 503,
/// never 500 or 200), the stock participant keeps its commands going round (a full store is
/// curable, like an outage: nothing is dead-lettered), and once there is room every saga ends
/// with nothing taken; a new checkout of the order then succeeds.
async fn a_full_participant_store_holds_its_commands_until_there_is_room(amqp: &str) {
    let (redis, dir) = support::redis_server();
    let (stock_redis, _stock_dir) = support::redis_server();
    let endpoints = Endpoints {
        stock_redis: stock_redis.url(),
        ..Endpoints::direct(&redis, amqp)
    };
    let options = Options {
        step_timeout: Duration::from_secs(1),
        checkout_timeout: Duration::from_secs(8),
        ..Options::default()
    };
    let f = Fleet::start(amqp, redis, dir, &endpoints, &options).await;
    let item = f.item(5, 3).await;
    let user = f.user(10).await;
    let order = f.order(&user, &[(&item, 2)]).await;
    let dead_lettered = counter(&f, &f.stock, DEAD_LETTERED).await;
    let mut stock_store = redis::Client::open(stock_redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    set_maxmemory(&mut stock_store, 1).await;

    let (status, body) = f
        .post_with_key(&format!("{}/checkout/{order}", f.order), "stock-full")
        .await;
    assert!(
        status == 400 || status == 503,
        "a checkout whose reservation met a full store answered {status}: {body}"
    );
    set_maxmemory(&mut stock_store, 0).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !active_sagas(&f, "sagas:active").await.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "sagas still running a minute after the store had room again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(active_sagas(&f, "sagas:attention").await.is_empty());
    assert_eq!(f.stock_of(&item).await, 5, "stock stayed taken");
    assert_eq!(f.credit_of(&user).await, 10, "credit stayed taken");
    assert!(!f.paid(&order).await);
    assert_eq!(
        counter(&f, &f.stock, DEAD_LETTERED).await,
        dead_lettered,
        "a command was dead-lettered for a full store"
    );
    let (status, body) = f
        .post_with_key(&format!("{}/checkout/{order}", f.order), "stock-room")
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(f.stock_of(&item).await, 3);
    assert_eq!(f.credit_of(&user).await, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_scenarios() {
    let broker = test_broker("sagatest@localhost");
    println!("scenario: a_checkout_takes_stock_and_credit_and_marks_the_order_paid");
    a_checkout_takes_stock_and_credit_and_marks_the_order_paid(&broker.url).await;
    println!("scenario: a_refused_step_is_compensated_and_nothing_stays_taken");
    a_refused_step_is_compensated_and_nothing_stays_taken(&broker.url).await;
    println!("scenario: concurrent_checkouts_of_one_order_charge_it_once");
    concurrent_checkouts_of_one_order_charge_it_once(&broker.url).await;
    println!("scenario: a_command_delivered_twice_over_the_broker_applies_once");
    a_command_delivered_twice_over_the_broker_applies_once(&broker.url).await;
    println!("scenario: steps_go_at_once_unless_an_item_may_run_out");
    steps_go_at_once_unless_an_item_may_run_out(&broker.url).await;
    println!("scenario: a_failing_command_does_not_hold_up_its_message");
    a_failing_command_does_not_hold_up_its_message(&broker.url).await;
    println!("scenario: a_late_command_after_its_compensation_is_refused_over_the_broker");
    a_late_command_after_its_compensation_is_refused_over_the_broker(&broker.url).await;
    println!("scenario: add_item_racing_a_checkout_never_changes_what_was_paid");
    add_item_racing_a_checkout_never_changes_what_was_paid(&broker.url).await;
    println!("scenario: a_checkout_is_not_starved_by_concurrent_add_items");
    a_checkout_is_not_starved_by_concurrent_add_items(&broker.url).await;
    println!("scenario: an_order_under_checkout_is_frozen");
    an_order_under_checkout_is_frozen(&broker.url).await;
    println!("scenario: a_legal_add_can_never_make_an_undo_impossible");
    a_legal_add_can_never_make_an_undo_impossible(&broker.url).await;
    println!("scenario: batch_init_under_a_checkout_leaves_nothing_taken");
    batch_init_under_a_checkout_leaves_nothing_taken(&broker.url).await;
    println!("scenario: an_already_paid_answer_is_recorded_under_its_key");
    an_already_paid_answer_is_recorded_under_its_key(&broker.url).await;
    println!("scenario: a_checkout_repeated_with_its_key_returns_the_first_answer");
    a_checkout_repeated_with_its_key_returns_the_first_answer(&broker.url).await;
    println!("scenario: a_saga_whose_owner_died_is_recovered");
    a_saga_whose_owner_died_is_recovered(&broker.url).await;
    println!("scenario: a_recovered_saga_leaves_the_answer_to_the_retry");
    a_recovered_saga_leaves_the_answer_to_the_retry(&broker.url).await;
    println!("scenario: a_compensation_that_cannot_apply_is_dead_lettered");
    a_compensation_that_cannot_apply_is_dead_lettered(&broker.url).await;
    println!("scenario: a_full_store_answers_503_and_takes_nothing");
    a_full_store_answers_503_and_takes_nothing(&broker.url).await;
    println!("scenario: a_full_participant_store_holds_its_commands_until_there_is_room");
    a_full_participant_store_holds_its_commands_until_there_is_room(&broker.url).await;
}
