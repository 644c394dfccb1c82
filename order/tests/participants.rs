//! Promises that only a failing dependency shows, checked on the real fleet
//! (the apps as built by their crates, a real redis-server, a real RabbitMQ
//! broker; see `support/mod.rs`) with a `FaultProxy` on every link from a
//! service to its store or to the broker:
//!
//! - `/ready` follows each service's store(s) and its broker link, `/health`
//!   does not, and a write that cannot reach its store is a bounded 503 with
//!   `Retry-After` that a retry with the same key applies exactly once;
//! - a checkout is all or nothing when the payment participant is dead or
//!   slow, under concurrent checkouts, and once the participant is back and
//!   the fleet quiet, every balance is its start minus exactly what the 200
//!   checkouts took.
//!
//! Nothing here sleeps and then asserts: every wait polls for a condition
//! with a stated bound, and fails when the bound passes.
//!
//! The broker is `TEST_AMQP_URL` when set, else a private node started for
//! the run; the scenarios run one after another in one test, so that node is
//! stopped when they end.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::broker::persistent_json;
use common::config::StepOrder;
use common::http::READY_BOUND;
use common::messages::{Action, Batch, Command, Outcome, Reply as StepReply};
use common::types::{Amount, SagaId, UserId};
use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use reqwest::header::RETRY_AFTER;
use serde_json::Value;
use support::{
    active_sagas, amqp_port, amqp_via, redis_server, test_broker, Endpoints, Fleet, Options,
};
use xtask::faultproxy::Mode;
use xtask::FaultProxy;

/// How long a service may keep answering `/ready` 200 after a link died.
const UNREADY_BOUND: Duration = Duration::from_secs(5);
/// How long a service may take to be ready again once the link is back.
const READY_AGAIN_BOUND: Duration = Duration::from_secs(10);
/// How long one `/ready` or `/health` probe may take to answer at all.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// What a `/ready` answer may take beyond `common::http::READY_BOUND`: the
/// local HTTP round trip on a busy machine.
const READY_SLACK: Duration = Duration::from_millis(500);
/// The longest a write may take to answer while its store is unreachable:
/// the store's retry budget (15 s, `redis_store::Store`) plus its connect and
/// command timeouts.
const WRITE_BOUND: Duration = Duration::from_secs(20);
/// What a checkout's answer may take beyond `CHECKOUT_TIMEOUT_MS` (the HTTP
/// round trip, the last store call before the answer).
const ANSWER_SLACK: Duration = Duration::from_secs(1);
/// How long every saga may take to end once the participant is back.
const QUIESCE_BOUND: Duration = Duration::from_secs(60);

/// One fault proxy on each link from a service to its store or to the broker.
struct Links {
    stock_redis: FaultProxy,
    payment_redis: FaultProxy,
    order_redis: FaultProxy,
    saga_redis: FaultProxy,
    stock_amqp: FaultProxy,
    payment_amqp: FaultProxy,
    order_amqp: FaultProxy,
}

/// A fleet whose every store and broker link goes through a proxy of its own
/// (all forwarding until a scenario says otherwise).
async fn proxied_fleet(amqp: &str, options: &Options) -> (Arc<Fleet>, Links) {
    let (redis, dir) = redis_server();
    let to_redis = || FaultProxy::start(redis.port()).unwrap();
    let to_broker = || FaultProxy::start(amqp_port(amqp)).unwrap();
    let links = Links {
        stock_redis: to_redis(),
        payment_redis: to_redis(),
        order_redis: to_redis(),
        saga_redis: to_redis(),
        stock_amqp: to_broker(),
        payment_amqp: to_broker(),
        order_amqp: to_broker(),
    };
    let redis_url = |p: &FaultProxy| format!("redis://127.0.0.1:{}/", p.port());
    let endpoints = Endpoints {
        stock_redis: redis_url(&links.stock_redis),
        payment_redis: redis_url(&links.payment_redis),
        order_redis: redis_url(&links.order_redis),
        saga_redis: redis_url(&links.saga_redis),
        stock_amqp: amqp_via(amqp, links.stock_amqp.port()),
        payment_amqp: amqp_via(amqp, links.payment_amqp.port()),
        order_amqp: amqp_via(amqp, links.order_amqp.port()),
    };
    let fleet = Fleet::start(amqp, redis, dir, &endpoints, options).await;
    (Arc::new(fleet), links)
}

/// One HTTP answer and how long it took.
#[derive(Debug)]
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
    took: Duration,
}

/// Sends `request`; `Err` when no answer (headers and body) came within `bound`.
async fn try_send(request: reqwest::RequestBuilder, bound: Duration) -> Result<Reply, String> {
    let started = Instant::now();
    let answer = async {
        let r = request.send().await?;
        let status = r.status().as_u16();
        let retry_after = r
            .headers()
            .get(RETRY_AFTER)
            .map(|v| v.to_str().unwrap_or("<not text>").to_string());
        let text = r.text().await?;
        Ok::<_, reqwest::Error>((status, retry_after, text))
    };
    let (status, retry_after, text) = tokio::time::timeout(bound, answer)
        .await
        .map_err(|_| format!("no answer within {bound:?}"))?
        .map_err(|e| format!("request failed: {e}"))?;
    Ok(Reply {
        status,
        retry_after,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        took: started.elapsed(),
    })
}

/// Sends `request`; panics when no answer came within `bound`.
async fn send(request: reqwest::RequestBuilder, bound: Duration) -> Reply {
    try_send(request, bound)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `GET url`, polled until its status satisfies `wanted`, for at most
/// `bound`; a probe that does not answer within [`PROBE_TIMEOUT`] counts as
/// not satisfying it. Returns the satisfying answer (`took`: since the
/// polling began), or the last thing seen.
async fn poll(
    f: &Fleet,
    url: &str,
    bound: Duration,
    wanted: impl Fn(u16) -> bool,
) -> Result<Reply, String> {
    let started = Instant::now();
    loop {
        let last = match try_send(f.http.get(url), PROBE_TIMEOUT).await {
            Ok(reply) if wanted(reply.status) => {
                return Ok(Reply {
                    took: started.elapsed(),
                    ..reply
                })
            }
            Ok(reply) => format!("{} {}", reply.status, reply.body),
            Err(e) => e,
        };
        if started.elapsed() >= bound {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts the shape of every 503 of the contract: a `Retry-After` of whole
/// seconds and a JSON body `{"error": "<reason>"}`.
fn assert_unavailable(what: &str, reply: &Reply) {
    assert_eq!(reply.status, 503, "{what}: {reply:?}");
    let seconds: u64 = reply
        .retry_after
        .as_deref()
        .unwrap_or_else(|| panic!("{what}: a 503 without Retry-After: {reply:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{what}: Retry-After is not whole seconds: {reply:?}"));
    assert!(seconds >= 1, "{what}: {reply:?}");
    let error = reply.body["error"].as_str().unwrap_or_default();
    assert!(
        !error.is_empty(),
        "{what}: not a JSON error body: {reply:?}"
    );
}

/// `/ready` answers 503 within [`UNREADY_BOUND`] once any one link of a
/// service (each of its stores, its broker link) is unreachable, while
/// `/health` stays 200 and the other services stay ready; it is 200 again
/// within [`READY_AGAIN_BOUND`] once the link is back.
async fn ready_follows_every_store_and_broker_link(amqp: &str) {
    let (f, links) = proxied_fleet(amqp, &Options::default()).await;
    let services = [&f.stock, &f.payment, &f.order];
    let cases = [
        ("stock's store", &links.stock_redis, &f.stock),
        ("stock's broker link", &links.stock_amqp, &f.stock),
        ("payment's store", &links.payment_redis, &f.payment),
        ("payment's broker link", &links.payment_amqp, &f.payment),
        ("order's store", &links.order_redis, &f.order),
        ("order's saga store", &links.saga_redis, &f.order),
        ("order's broker link", &links.order_amqp, &f.order),
    ];
    for (link, proxy, service) in cases {
        let ready = format!("{service}/ready");
        proxy.set_mode(Mode::Reset);
        let down = poll(&f, &ready, UNREADY_BOUND, |s| s != 200)
            .await
            .unwrap_or_else(|last| {
                panic!(
                    "{link} unreachable, yet {ready} still answers after {UNREADY_BOUND:?}: {last}"
                )
            });
        assert_unavailable(&format!("{ready} with {link} down"), &down);
        for _ in 0..2 {
            let health = send(f.http.get(format!("{service}/health")), PROBE_TIMEOUT).await;
            assert_eq!(health.status, 200, "{link} down: /health {health:?}");
            for other in services.iter().filter(|s| **s != service) {
                let r = send(f.http.get(format!("{other}/ready")), PROBE_TIMEOUT).await;
                assert_eq!(r.status, 200, "{link} down made {other} unready: {r:?}");
            }
            // Still unready after those probes: no flapping back while the link is down.
            let again = send(f.http.get(&ready), PROBE_TIMEOUT).await;
            assert_unavailable(&format!("{ready} with {link} still down"), &again);
            assert!(
                again.took <= READY_BOUND + READY_SLACK,
                "{link} down: {ready} took {:?}, more than {READY_BOUND:?}",
                again.took
            );
        }
        proxy.set_mode(Mode::Forward);
        let up = poll(&f, &ready, READY_AGAIN_BOUND, |s| s == 200)
            .await
            .unwrap_or_else(|last| {
                panic!("{link} back, yet {ready} not 200 after {READY_AGAIN_BOUND:?}: {last}")
            });
        println!(
            "  {link}: /ready {} after {:?} ({}), 200 again after {:?}",
            down.status, down.took, down.body["error"], up.took
        );
    }
}

/// `/ready` answers 503 within `common::http::READY_BOUND` when a store
/// takes commands but never answers (the fault proxy swallows its replies:
/// a hung master, the case where waiting on the store would outlast a
/// readiness probe's timeout), every time it is asked, and names the store;
/// the service is ready again once the store answers.
async fn ready_answers_within_its_bound_when_a_store_hangs(amqp: &str) {
    let (f, links) = proxied_fleet(amqp, &Options::default()).await;
    let bound = READY_BOUND + READY_SLACK;
    let cases = [
        ("stock's store", &links.stock_redis, &f.stock),
        ("payment's store", &links.payment_redis, &f.payment),
        ("order's store", &links.order_redis, &f.order),
        ("order's saga store", &links.saga_redis, &f.order),
    ];
    for (link, proxy, service) in cases {
        let ready = format!("{service}/ready");
        proxy.set_mode(Mode::DropReplies);
        let mut slowest = Duration::ZERO;
        for _ in 0..3 {
            let r = send(f.http.get(&ready), PROBE_TIMEOUT).await;
            assert_unavailable(&format!("{ready} with {link} hung"), &r);
            assert!(
                r.took <= bound,
                "{link} hung: {ready} took {:?}, more than {bound:?}",
                r.took
            );
            let why = r.body["error"].as_str().unwrap_or_default();
            assert!(
                why.contains(&proxy.port().to_string()),
                "{link} hung: {ready} does not name it: {why}"
            );
            slowest = slowest.max(r.took);
        }
        proxy.set_mode(Mode::Forward);
        let up = poll(&f, &ready, READY_AGAIN_BOUND, |s| s == 200)
            .await
            .unwrap_or_else(|last| {
                panic!(
                    "{link} answers again, yet {ready} not 200 after {READY_AGAIN_BOUND:?}: {last}"
                )
            });
        println!(
            "  {link} hung: /ready 503 in at most {slowest:?} (bound {READY_BOUND:?}), 200 again after {:?}",
            up.took
        );
    }
}

/// A write whose store is unreachable answers 503 with `Retry-After` and a
/// JSON error within [`WRITE_BOUND`] (never a 500, never a hang), applies
/// nothing, and once the store is back the same request with the same
/// `Idempotency-Key` applies exactly once (a repeat replays its answer).
/// One write per store: stock's, payment's, order's, and the saga store.
async fn a_write_to_an_unreachable_store_is_a_bounded_503(amqp: &str) {
    let (f, links) = proxied_fleet(amqp, &Options::default()).await;
    let item = f.item(10, 3).await;
    let sold = f.item(10, 4).await;
    let user = f.user(10).await;
    let buyer = f.user(10).await;
    let growing = f.order(&user, &[(&item, 1)]).await;
    let bought = f.order(&buyer, &[(&sold, 1)]).await;
    let cases = [
        (
            "stock's store",
            &links.stock_redis,
            format!("{}/add/{item}/1", f.stock),
        ),
        (
            "payment's store",
            &links.payment_redis,
            format!("{}/add_funds/{user}/1", f.payment),
        ),
        (
            "order's store",
            &links.order_redis,
            format!("{}/addItem/{growing}/{item}/1", f.order),
        ),
        (
            "the saga store",
            &links.saga_redis,
            format!("{}/checkout/{bought}", f.order),
        ),
    ];
    let key = |link: &str| format!("unreachable-{}", link.replace([' ', '\''], "-"));
    for (_, proxy, _) in &cases {
        proxy.set_mode(Mode::Reset);
    }
    let writes = cases.iter().map(|(link, _, url)| {
        let request = f.http.post(url).header("Idempotency-Key", key(link));
        async move { (link, send(request, WRITE_BOUND).await) }
    });
    for (link, reply) in futures::future::join_all(writes).await {
        assert_unavailable(&format!("a write with {link} down"), &reply);
        println!(
            "  {link} down: {} after {:?}, Retry-After {:?}",
            reply.status, reply.took, reply.retry_after
        );
    }
    for (_, proxy, _) in &cases {
        proxy.set_mode(Mode::Forward);
    }
    for service in [&f.stock, &f.payment, &f.order] {
        poll(&f, &format!("{service}/ready"), READY_AGAIN_BOUND, |s| {
            s == 200
        })
        .await
        .unwrap_or_else(|last| panic!("{service} not ready again: {last}"));
    }
    // Nothing reached a store while it was unreachable: nothing was applied.
    assert_eq!(f.stock_of(&item).await, 10);
    assert_eq!(f.credit_of(&user).await, 10);
    assert_eq!(f.find_order(&growing).await["total_cost"], 3);
    assert!(!f.paid(&bought).await);
    // The client's retry with the same key applies once; a repeat replays it.
    for (link, _, url) in &cases {
        let retry = f.post_with_key(url, &key(link)).await;
        assert_eq!(retry.0, 200, "retry after {link} came back: {retry:?}");
        assert_eq!(f.post_with_key(url, &key(link)).await, retry, "{link}");
    }
    assert_eq!(f.stock_of(&item).await, 11);
    assert_eq!(f.credit_of(&user).await, 11);
    assert_eq!(f.find_order(&growing).await["total_cost"], 6);
    assert!(f.paid(&bought).await);
    assert_eq!(f.credit_of(&buyer).await, 6);
    assert_eq!(f.stock_of(&sold).await, 9);
}

/// One checkout of the concurrent workload: its own user and its own item
/// (so what it took is visible at once), plus one unit of an item every
/// checkout shares (so checkouts race for its stock).
struct Buy {
    order: String,
    user: String,
    credit: i64,
    item: String,
    item_stock: i64,
    quantity: i64,
    total: i64,
    key: String,
}

struct Shop {
    shared: String,
    shared_stock: i64,
    buys: Vec<Buy>,
}

const CHECKOUTS: usize = 20;
const SHARED_STOCK: i64 = 8;
const SHARED_PRICE: i64 = 2;

/// [`CHECKOUTS`] orders built to end every way: most can be paid; every
/// fifth user is one short of the total (payment refuses); a few orders want
/// more of their own item than there is (stock refuses); and only
/// [`SHARED_STOCK`] of them can have the shared item.
async fn shop(f: &Fleet) -> Shop {
    let shared = f.item(SHARED_STOCK, SHARED_PRICE).await;
    let mut buys = Vec::new();
    for i in 0..CHECKOUTS as i64 {
        let price = 1 + i % 3;
        let item_stock = 3;
        let quantity = if i % 7 == 3 { 4 } else { 1 + i % 3 };
        let total = price * quantity + SHARED_PRICE;
        let credit = if i % 5 == 4 { total - 1 } else { total };
        let item = f.item(item_stock, price).await;
        let user = f.user(credit).await;
        let order = f.order(&user, &[(&item, quantity), (&shared, 1)]).await;
        buys.push(Buy {
            order,
            user,
            credit,
            item,
            item_stock,
            quantity,
            total,
            key: format!("buy-{i}-{}", uuid::Uuid::new_v4().simple()),
        });
    }
    Shop {
        shared,
        shared_stock: SHARED_STOCK,
        buys,
    }
}

/// Runs every checkout of `shop` at once and returns each one's answer.
///
/// Each answer must come within the checkout budget (plus [`ANSWER_SLACK`]),
/// and the stores must already agree with it when it arrives: a 200 order is
/// paid, its user charged exactly its total and its own item reserved; a 400
/// order is unpaid with its user's credit and its item's stock exactly as
/// before; a 503 (outcome not known yet) has the contract's shape.
async fn checkout_all(f: &Arc<Fleet>, shop: &Shop, budget: Duration) -> Vec<Reply> {
    let tasks: Vec<_> = shop
        .buys
        .iter()
        .map(|b| {
            let f = f.clone();
            let (order, user, item, key) = (
                b.order.clone(),
                b.user.clone(),
                b.item.clone(),
                b.key.clone(),
            );
            let (credit, stock, quantity, total) = (b.credit, b.item_stock, b.quantity, b.total);
            tokio::spawn(async move {
                let url = format!("{}/checkout/{order}", f.order);
                let request = f.http.post(&url).header("Idempotency-Key", &key);
                let reply = send(request, budget + ANSWER_SLACK * 10).await;
                assert!(
                    reply.took <= budget + ANSWER_SLACK,
                    "checkout of {order} answered {} after {:?}, budget {budget:?}",
                    reply.status,
                    reply.took
                );
                match reply.status {
                    200 => {
                        assert!(f.paid(&order).await, "200 but unpaid: {order}");
                        assert_eq!(f.credit_of(&user).await, credit - total, "200: {order}");
                        assert_eq!(f.stock_of(&item).await, stock - quantity, "200: {order}");
                    }
                    400 => {
                        assert!(!f.paid(&order).await, "400 but paid: {order}");
                        assert_eq!(f.credit_of(&user).await, credit, "400 took credit");
                        assert_eq!(f.stock_of(&item).await, stock, "400 took stock");
                    }
                    503 => assert_unavailable(&format!("checkout of {order}"), &reply),
                    other => panic!("checkout of {order} answered {other}: {reply:?}"),
                }
                reply
            })
        })
        .collect();
    let mut replies = Vec::new();
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

/// Waits (at most `bound`) until the participants have taken every command
/// sent to them, so that nothing still queued can change a balance after the
/// final checks: each participant queue has its consumer back and no message
/// waiting, and then a compensation for a saga nobody ran (it leaves a
/// harmless tombstone), sent after everything else, is answered by each.
/// (AMQP shows no count of deliveries still unacknowledged: a command taken
/// before the probe whose handler outlived the probe's would escape this.
/// Such a handler has only milliseconds of work on a healthy store left.)
async fn drain_participants(f: &Fleet, bound: Duration) {
    let started = Instant::now();
    let connection = lapin::Connection::connect(&f.amqp, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    for queue in [&f.stock_queue, &f.payment_queue] {
        loop {
            let passive = QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let q = channel
                .queue_declare(queue.as_str().into(), passive, FieldTable::default())
                .await
                .unwrap();
            if q.message_count() == 0 && q.consumer_count() > 0 {
                break;
            }
            assert!(
                started.elapsed() < bound,
                "{queue}: {} messages waiting, {} consumers after {bound:?}",
                q.message_count(),
                q.consumer_count()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let private = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    let replies = channel
        .queue_declare(ShortString::from(""), private, FieldTable::default())
        .await
        .unwrap();
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut consumer = channel
        .basic_consume(
            replies.name().clone(),
            "".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .unwrap();
    let probes = [
        (&f.stock_queue, Action::Release { lines: vec![] }),
        (
            &f.payment_queue,
            Action::Refund {
                user_id: UserId::parse("drain-probe").unwrap(),
                amount: Amount::ZERO,
            },
        ),
    ];
    for (queue, action) in probes {
        let saga_id = SagaId::new();
        let body = Batch::of(vec![Command {
            saga_id,
            action,
            expires_at_ms: None,
        }])
        .to_json();
        let properties = persistent_json().with_reply_to(replies.name().clone());
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                properties,
            )
            .await
            .unwrap();
        let left = bound.saturating_sub(started.elapsed());
        let delivery = tokio::time::timeout(left, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{queue}: the probe was not answered within {bound:?}"))
            .expect("the reply consumer ended")
            .unwrap();
        let reply: Vec<StepReply> = Batch::from_json(&delivery.data).unwrap().items;
        assert_eq!(reply.len(), 1, "{queue}: {reply:?}");
        assert_eq!(reply[0].saga_id, saga_id, "{queue}: {reply:?}");
        assert_eq!(reply[0].outcome, Outcome::Applied, "{queue}: {reply:?}");
    }
    let _ = connection.close(200, "drained".into()).await;
}

/// Waits (at most [`QUIESCE_BOUND`]) until no saga is active and the
/// participants took every command sent to them, then checks that none
/// needs an operator and that the stores hold exactly the start
/// minus what the 200 checkouts took: per user, per own item and for the
/// shared item; every 200 order paid, every other order unpaid. A checkout
/// answered 503 is asked again with its key and that answer counts: 400 (it
/// was aborted and nothing of it stayed taken) or 200 (the retry checked the
/// order out).
async fn quiesce_and_check(f: &Fleet, shop: &Shop, statuses: &[u16]) {
    let started = Instant::now();
    loop {
        let active = active_sagas(f, "sagas:active").await;
        if active.is_empty() {
            break;
        }
        assert!(
            started.elapsed() < QUIESCE_BOUND,
            "{} sagas still active after {QUIESCE_BOUND:?}",
            active.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drain_participants(f, QUIESCE_BOUND.saturating_sub(started.elapsed())).await;
    println!(
        "  every saga ended and the participants drained {:?} after the fault",
        started.elapsed()
    );
    let attention = active_sagas(f, "sagas:attention").await;
    assert!(
        attention.is_empty(),
        "sagas need an operator: {attention:?}"
    );
    let mut shared_taken = 0;
    for (b, status) in shop.buys.iter().zip(statuses) {
        // A 503's outcome was unknown; its retry with the same key answers it now: 400
        // (its saga took nothing), or 200 when the retry checked the order out itself
        // (recovery records no refusal, so the retry looks at the order again).
        let status = if *status == 503 {
            let url = format!("{}/checkout/{}", f.order, b.order);
            let (again, body) = f.post_with_key(&url, &b.key).await;
            assert!(
                again == 200 || again == 400,
                "503 then, now: {again} {body}"
            );
            again
        } else {
            *status
        };
        let ok = status == 200;
        shared_taken += i64::from(ok);
        assert_eq!(f.paid(&b.order).await, ok, "order {} ({status})", b.order);
        let took = if ok { b.total } else { 0 };
        assert_eq!(
            f.credit_of(&b.user).await,
            b.credit - took,
            "user of {} ({status})",
            b.order
        );
        let took = if ok { b.quantity } else { 0 };
        assert_eq!(
            f.stock_of(&b.item).await,
            b.item_stock - took,
            "item of {} ({status})",
            b.order
        );
    }
    assert_eq!(
        f.stock_of(&shop.shared).await,
        shop.shared_stock - shared_taken,
        "the shared item"
    );
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

fn statuses(replies: &[Reply]) -> Vec<u16> {
    replies.iter().map(|r| r.status).collect()
}

/// The 400s of checkouts aborted because payment's reply missed the step
/// timeout (the reason the orchestrator gives): their charge may have been
/// applied late, and the refund had to undo it or leave a tombstone first.
fn refused_for_lateness(replies: &[Reply]) -> usize {
    replies
        .iter()
        .filter(|r| r.status == 400)
        .filter(|r| {
            r.body["error"]
                .as_str()
                .is_some_and(|e| e.contains("payment did not answer in time"))
        })
        .count()
}

/// The payment participant is dead (its broker link resets every
/// connection): every one of [`CHECKOUTS`] concurrent checkouts ends 400 or
/// 503 within `CHECKOUT_TIMEOUT_MS`, and none is 200 (nobody could be
/// charged); a 400 left nothing taken. Once the participant is back, every
/// saga ends and every balance is exactly its start (no 200s took anything),
/// and a new checkout is paid. With the steps in parallel, and in sequence
/// (then a checkout that stock refuses never asks payment: a quick 400).
async fn a_dead_payment_participant_leaves_nothing_taken(amqp: &str, step_order: StepOrder) {
    let options = Options {
        step_order,
        step_timeout: Duration::from_secs(1),
        checkout_timeout: Duration::from_secs(10),
        ..Options::default()
    };
    let (f, links) = proxied_fleet(amqp, &options).await;
    let shop = shop(&f).await;
    links.payment_amqp.set_mode(Mode::Reset);
    // The participant is really gone before the checkouts start.
    poll(&f, &format!("{}/ready", f.payment), UNREADY_BOUND, |s| {
        s != 200
    })
    .await
    .expect("payment never noticed its broker link died");
    let statuses = statuses(&checkout_all(&f, &shop, options.checkout_timeout).await);
    println!(
        "  payment dead, steps {step_order:?}: {} x 400, {} x 503",
        count(&statuses, 400),
        count(&statuses, 503)
    );
    assert_eq!(count(&statuses, 200), 0, "{statuses:?}");
    links.payment_amqp.set_mode(Mode::Forward);
    quiesce_and_check(&f, &shop, &statuses).await;
    // A fresh item: the retries of the 503s may have taken the shared one.
    let item = f.item(1, SHARED_PRICE).await;
    let user = f.user(10).await;
    let order = f.order(&user, &[(&item, 1)]).await;
    assert_eq!(f.checkout(&order).await, 200, "payment back, checkout not");
    assert_eq!(f.credit_of(&user).await, 10 - SHARED_PRICE);
}

/// The payment participant answers, but slowly (its broker link delays
/// every chunk by `delay`), with a short step timeout: [`CHECKOUTS`]
/// concurrent checkouts each end within the budget, every 200 order is paid
/// and charged exactly its total with its items reserved, every 400 left
/// nothing taken; once the link is fast again and every saga ended, each
/// balance is its start minus exactly what the 200 checkouts took.
async fn a_slow_payment_participant_is_all_or_nothing(
    amqp: &str,
    step_order: StepOrder,
    delay: Duration,
    step_timeout: Duration,
) -> Vec<Reply> {
    let options = Options {
        step_order,
        step_timeout,
        checkout_timeout: Duration::from_secs(10),
        ..Options::default()
    };
    let (f, links) = proxied_fleet(amqp, &options).await;
    let shop = shop(&f).await;
    links.payment_amqp.set_mode(Mode::Delay(delay));
    let replies = checkout_all(&f, &shop, options.checkout_timeout).await;
    let statuses = statuses(&replies);
    println!(
        "  payment delayed {delay:?}, step timeout {step_timeout:?}, steps {step_order:?}: \
         {} x 200, {} x 400 ({} of them for a late payment), {} x 503",
        count(&statuses, 200),
        count(&statuses, 400),
        refused_for_lateness(&replies),
        count(&statuses, 503)
    );
    links.payment_amqp.set_mode(Mode::Forward);
    quiesce_and_check(&f, &shop, &statuses).await;
    replies
}

/// Slower than the step timeout: a charge's reply needs at least two delays,
/// so no checkout can be paid; all end 400 or 503 and nothing stays taken.
async fn a_payment_slower_than_the_step_timeout_takes_nothing(amqp: &str) {
    let replies = a_slow_payment_participant_is_all_or_nothing(
        amqp,
        StepOrder::Parallel,
        Duration::from_millis(1500),
        Duration::from_millis(500),
    )
    .await;
    let statuses = statuses(&replies);
    assert_eq!(count(&statuses, 200), 0, "{statuses:?}");
}

/// Slow, but well within the step timeout: checkouts are paid or refused
/// (not enough stock or credit) much as on a fast link, and the balances add up.
async fn a_payment_slower_than_usual_but_within_the_step_timeout(amqp: &str) {
    let replies = a_slow_payment_participant_is_all_or_nothing(
        amqp,
        StepOrder::Parallel,
        Duration::from_millis(150),
        Duration::from_secs(1),
    )
    .await;
    let statuses = statuses(&replies);
    assert!(count(&statuses, 200) > 0, "nothing was paid: {statuses:?}");
    assert!(
        count(&statuses, 400) > 0,
        "nothing was refused: {statuses:?}"
    );
}

/// About as slow as the step timeout (a charge's round trip is at least two
/// delays, and the chunks of concurrent checkouts queue behind each other),
/// steps in sequence (the service's default): replies miss the step timeout,
/// at least one checkout is refused for it, and its charge, arriving late or
/// not at all, is refunded or pre-empted by the refund's tombstone. A few
/// replies may still come in time. Whatever the mix, the balances add up.
async fn a_payment_about_as_slow_as_the_step_timeout(amqp: &str) {
    let replies = a_slow_payment_participant_is_all_or_nothing(
        amqp,
        StepOrder::Sequential,
        Duration::from_millis(250),
        Duration::from_millis(600),
    )
    .await;
    assert!(
        refused_for_lateness(&replies) > 0,
        "no reply missed the step timeout: {:?}",
        statuses(&replies)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn participant_scenarios() {
    let broker = test_broker(&format!("participants{}@localhost", std::process::id()));
    println!("scenario: ready_follows_every_store_and_broker_link");
    ready_follows_every_store_and_broker_link(&broker.url).await;
    println!("scenario: ready_answers_within_its_bound_when_a_store_hangs");
    ready_answers_within_its_bound_when_a_store_hangs(&broker.url).await;
    println!("scenario: a_write_to_an_unreachable_store_is_a_bounded_503");
    a_write_to_an_unreachable_store_is_a_bounded_503(&broker.url).await;
    println!("scenario: a_dead_payment_participant_leaves_nothing_taken");
    a_dead_payment_participant_leaves_nothing_taken(&broker.url, StepOrder::Parallel).await;
    a_dead_payment_participant_leaves_nothing_taken(&broker.url, StepOrder::Sequential).await;
    println!("scenario: a_payment_slower_than_the_step_timeout_takes_nothing");
    a_payment_slower_than_the_step_timeout_takes_nothing(&broker.url).await;
    println!("scenario: a_payment_slower_than_usual_but_within_the_step_timeout");
    a_payment_slower_than_usual_but_within_the_step_timeout(&broker.url).await;
    println!("scenario: a_payment_about_as_slow_as_the_step_timeout");
    a_payment_about_as_slow_as_the_step_timeout(&broker.url).await;
}
