//! What operators see and do, against real processes: the saga status endpoint
//! (`GET /saga/{order_id}`, through the gateway `/orders/saga/{order_id}`), the operator
//! routes `cargo xtask sagas` uses (`xtask::sagas`), and the dead-letter queue as
//! `cargo xtask dlq` works it (`xtask::dlq`), on real dead letters.
//!
//! - `paid_and_refused_checkouts_show_their_steps`: the status of a paid and of a refused
//!   checkout (each step with its outcome and times, why it ended); 404 for an order never
//!   checked out; abort of a committed saga refused (409).
//! - `a_dead_lettered_compensation_is_worked_off_by_an_operator`: a compensation that cannot
//!   apply is dead-lettered and its saga needs attention (status, `sagas` list, `dlq` list with
//!   reason, original queue, saga id, attempts, times; a poison message beside it, counted by
//!   reason); the operator fixes the data, requeues the dead letter (it applies), drops the
//!   poison, retries the saga: it ends aborted, nothing taken.
//! - `a_stuck_saga_is_aborted_once`: the payment participant's broker link is dead, so a
//!   checkout's saga stays pending; retry is refused (its owner is alive), abort fences the
//!   order and compensates: everything given back exactly once, never a second decision.
//! - `the_gateway_routes_the_status_and_refuses_the_operator_routes`.
//!
//! The broker is `TEST_AMQP_URL` or a private node, as in `saga.rs`; the dead-letter queue is
//! shared by every fleet on it, so each scenario works only its own queue's dead letters.

mod support;

use std::time::{Duration, Instant};

use common::broker::Broker;
use common::config::QueueType;
use common::messages::{Action, Batch, Command};
use common::types::{OrderId, SagaId};
use serde_json::Value;
use support::{
    active_sagas, amqp_port, amqp_via, direct_store, gateway_fleet, redis_server, test_broker,
    Endpoints, Fleet, InstanceLinks, Options, SAGA_DB,
};
use xtask::dlq::{self, Action as DlqAction, Pick};
use xtask::faultproxy::Mode;
use xtask::sagas::{self, Request};
use xtask::{FaultProxy, ScratchDir};

async fn status(f: &Fleet, order: &str) -> (u16, Value) {
    f.get(&format!("{}/saga/{order}", f.order)).await
}

/// The step named `name` of a saga view.
fn step<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {view:#}"))
}

/// Polls the order's saga status until `done` holds (or panics after `secs`).
async fn wait_status(f: &Fleet, order: &str, secs: u64, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (code, view) = status(f, order).await;
        if code == 200 && done(&view) {
            return view;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting: {code} {view:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn paid_and_refused_checkouts_show_their_steps(amqp: &str) {
    let f = support::fleet(amqp).await;
    let item = f.item(5, 3).await;
    let user = f.user(10).await;
    let never = f.order(&user, &[(&item, 1)]).await;
    let (code, body) = status(&f, &never).await;
    assert_eq!(code, 404, "an order never checked out: {body}");
    assert!(body["error"].is_string());

    let paid = f.order(&user, &[(&item, 2)]).await;
    assert_eq!(f.checkout(&paid).await, 200);
    let view = wait_status(&f, &paid, 10, |v| v["finished"] == true).await;
    assert_eq!(view["state"], "committed", "{view:#}");
    assert_eq!(view["order_id"], paid.as_str());
    assert_eq!(view["reason"], "committed");
    assert_eq!(view["retained"], true);
    assert!(view["owner"].as_str().unwrap().starts_with("order-test-"));
    assert!(view["lease"].is_null(), "a finished saga holds no lease");
    for name in ["reserve", "charge"] {
        let s = step(&view, name);
        assert_eq!(s["outcome"], "applied", "{view:#}");
        assert!(s["ended_ms"].as_u64().unwrap() >= s["started_ms"].as_u64().unwrap());
    }
    assert_eq!(step(&view, "settle")["outcome"], "sent");
    let created = view["created_ms"].as_u64().unwrap();
    let decided = view["decided_ms"].as_u64().unwrap();
    let finished = view["finished_ms"].as_u64().unwrap();
    assert!(created <= decided && decided <= finished, "{view:#}");

    // A committed saga cannot be aborted: 409, with why; nothing changes.
    let saga = view["saga_id"].as_str().unwrap().to_string();
    let refused = sagas::send(&f.order, &Request::Abort(saga.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("409") && refused.contains("committed"),
        "{refused}"
    );
    assert!(f.paid(&paid).await);
    assert_eq!(f.credit_of(&user).await, 4);
    let shown = sagas::send(&f.order, &Request::Show(saga)).await.unwrap();
    assert_eq!(shown["state"], "committed");

    // Not enough credit: refused, the reservation released.
    let broke = f.order(&user, &[(&item, 3)]).await;
    assert_eq!(f.checkout(&broke).await, 400);
    let view = wait_status(&f, &broke, 10, |v| v["finished"] == true).await;
    assert_eq!(view["state"], "aborted", "{view:#}");
    let charge = step(&view, "charge");
    assert_eq!(charge["outcome"], "refused");
    assert!(
        charge["reason"].as_str().unwrap().contains("credit"),
        "{view:#}"
    );
    assert_eq!(step(&view, "release")["outcome"], "applied");
    assert!(
        view["reason"].as_str().unwrap().contains("credit"),
        "{view:#}"
    );
    assert_eq!(f.stock_of(&item).await, 3);
}

/// Begins a saga as an order instance that then dies: record written with a lease that
/// lapses at once, order frozen, the reservation applied (as `saga.rs` does).
async fn orphan(f: &Fleet, order: &str) -> SagaId {
    let orders = order::orders::Orders::new(direct_store(&format!("{}/3", f.redis.url())));
    let sagas =
        order::saga_store::SagaStore::new(direct_store(&format!("{}/{SAGA_DB}", f.redis.url())));
    let order_id = OrderId::parse(order).unwrap();
    let seen = orders.find(&order_id).await.unwrap();
    let saga = order::saga_store::SagaRecord {
        id: SagaId::new(),
        order_id: order_id.clone(),
        user_id: seen.user_id.clone(),
        lines: seen.lines(),
        total: seen.total_cost,
        idem: None,
    };
    sagas
        .begin(&saga, "dead-instance", Duration::from_millis(300))
        .await
        .unwrap();
    orders.freeze(&order_id, saga.id, None).await.unwrap();
    let broker = Broker::new(&f.amqp, QueueType::Classic, &[]);
    let reserve = Batch::of(vec![Command {
        saga_id: saga.id,
        action: Action::Reserve { lines: saga.lines },
        expires_at_ms: None,
    }])
    .to_json();
    broker
        .publish(&f.stock_queue, None, &reserve)
        .await
        .unwrap();
    saga.id
}

async fn stock_settles_at(f: &Fleet, item: &str, want: i64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.stock_of(item).await != want {
        assert!(
            Instant::now() < deadline,
            "stock of {item} never became {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_dead_lettered_compensation_is_worked_off_by_an_operator(amqp: &str) {
    let f = support::fleet(amqp).await;
    let item = f.item(10, 3).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 2)]).await;
    let saga = orphan(&f, &order).await;
    stock_settles_at(&f, &item, 8).await;
    // The participant's record of the reservation is damaged: its release cannot apply.
    let mut stock_db = f.db(1).await;
    let record_key = format!("itemsaga:{saga}");
    let record: String = redis::cmd("GET")
        .arg(&record_key)
        .query_async(&mut stock_db)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(&record_key)
        .arg("garbage")
        .query_async(&mut stock_db)
        .await
        .unwrap();
    let view = wait_status(&f, &order, 40, |v| v["state"] == "needs_attention").await;
    assert_eq!(view["saga_id"], saga.to_string());
    assert_eq!(view["finished"], false);
    assert!(
        view["attention"].as_str().unwrap().contains("corrupt"),
        "{view:#}"
    );
    assert_eq!(step(&view, "release")["outcome"], "failed", "{view:#}");
    assert_eq!(step(&view, "refund")["outcome"], "applied", "{view:#}");
    let listed = sagas::send(&f.order, &Request::List).await.unwrap();
    let attention = listed["attention"].as_array().unwrap();
    assert!(
        attention.iter().any(|s| s["saga_id"] == saga.to_string()),
        "{listed:#}"
    );
    assert!(sagas::render_list(&listed).contains(&saga.to_string()));

    // Beside it, a poison message on the same queue.
    let broker = Broker::new(&f.amqp, QueueType::Classic, &[]);
    broker
        .publish(&f.stock_queue, None, b"not a command")
        .await
        .unwrap();
    let queue = Some(f.stock_queue.as_str());
    let deadline = Instant::now() + Duration::from_secs(10);
    let letters = loop {
        let letters = dlq::list(&f.amqp, queue).await.unwrap();
        if letters.len() >= 2 {
            break letters;
        }
        assert!(Instant::now() < deadline, "dead letters: {letters:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!("{}", dlq::render(&letters));
    assert_eq!(letters.len(), 2, "{letters:?}");
    let failed = letters.iter().find(|l| l.reason == "store_error").unwrap();
    assert_eq!(failed.saga_ids, vec![saga.to_string()]);
    assert_eq!(failed.original_queue.as_deref(), queue);
    assert_eq!(
        failed.attempts,
        Some(common::participant::PERMANENT_ATTEMPTS)
    );
    let (first, last) = (failed.first_seen_ms.unwrap(), failed.last_seen_ms.unwrap());
    assert!(first <= last, "{failed:?}");
    let poison = letters.iter().find(|l| l.reason == "undecodable").unwrap();
    assert_eq!(poison.original_queue.as_deref(), queue);
    // Listing took nothing away.
    assert_eq!(dlq::list(&f.amqp, queue).await.unwrap().len(), 2);
    let metrics = f.get_text(&format!("{}/metrics", f.stock)).await;
    for reason in ["store_error", "undecodable"] {
        assert!(
            metrics.contains(&format!(
                "broker_dead_lettered_total{{reason=\"{reason}\"}}"
            )),
            "no dead letter counted for {reason}"
        );
    }

    // The operator repairs the record and requeues the dead letter: the release applies.
    let _: () = redis::cmd("SET")
        .arg(&record_key)
        .arg(&record)
        .query_async(&mut stock_db)
        .await
        .unwrap();
    let requeued = dlq::act(
        &f.amqp,
        &Pick::Id(failed.id.clone()),
        DlqAction::Requeue,
        queue,
    )
    .await
    .unwrap();
    assert_eq!(requeued.len(), 1);
    stock_settles_at(&f, &item, 10).await;
    // The poison is dropped; an id that is gone is an error.
    let dropped = dlq::act(&f.amqp, &Pick::All, DlqAction::Drop, queue)
        .await
        .unwrap();
    assert_eq!(dropped.len(), 1);
    assert_eq!(dropped[0].reason, "undecodable");
    assert!(dlq::list(&f.amqp, queue).await.unwrap().is_empty());
    assert!(dlq::act(
        &f.amqp,
        &Pick::Id(failed.id.clone()),
        DlqAction::Drop,
        queue
    )
    .await
    .is_err());

    // Retry: recovery runs again, finds every compensation applied, and ends the saga.
    let view = sagas::send(&f.order, &Request::Retry(saga.to_string()))
        .await
        .unwrap();
    assert_eq!(view["state"], "aborted", "{view:#}");
    assert_eq!(view["finished"], true, "{view:#}");
    assert_eq!(view["reason"], "retried by an operator");
    assert!(view["attention"].is_null());
    assert!(!active_sagas(&f, "sagas:attention")
        .await
        .contains(&saga.to_string()));
    assert_eq!(f.stock_of(&item).await, 10);
    assert_eq!(f.credit_of(&user).await, 100);
    assert!(!f.paid(&order).await);
    // A second retry has nothing to do.
    let again = sagas::send(&f.order, &Request::Retry(saga.to_string()))
        .await
        .unwrap();
    assert_eq!(again["finished_ms"], view["finished_ms"]);
    assert_eq!(f.checkout(&order).await, 200);
    assert_eq!(f.credit_of(&user).await, 94);
}

async fn a_stuck_saga_is_aborted_once(amqp: &str) {
    let proxy = FaultProxy::start(amqp_port(amqp)).unwrap();
    let (redis, dir) = redis_server();
    let endpoints = Endpoints {
        payment_amqp: amqp_via(amqp, proxy.port()),
        ..Endpoints::direct(&redis, amqp)
    };
    let options = Options {
        step_timeout: Duration::from_secs(15),
        checkout_timeout: Duration::from_secs(1),
        ..Options::default()
    };
    let f = Fleet::start(amqp, redis, dir, &endpoints, &options).await;
    let item = f.item(10, 3).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 2)]).await;
    // The payment participant cannot reach the broker: the charge waits in its queue.
    proxy.set_mode(Mode::Reset);
    assert_eq!(f.checkout(&order).await, 503);
    let view = wait_status(&f, &order, 5, |v| v["state"] == "pending").await;
    let saga = view["saga_id"].as_str().unwrap().to_string();
    assert!(view["lease"].is_string(), "its owner drives it: {view:#}");
    assert!(
        view["steps"].as_array().unwrap().is_empty(),
        "undecided: {view:#}"
    );
    let listed = sagas::send(&f.order, &Request::List).await.unwrap();
    assert!(listed["pending"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["saga_id"] == saga.as_str()));
    // Its owner is alive: a retry is refused.
    let refused = sagas::send(&f.order, &Request::Retry(saga.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("409"), "{refused}");

    let abort = tokio::spawn({
        let (base, saga) = (f.order.clone(), saga.clone());
        async move { sagas::send(&base, &Request::Abort(saga)).await }
    });
    // The abort decides at once (the order is fenced); the refund then waits for payment.
    let decided = wait_status(&f, &order, 10, |v| v["state"] == "aborted").await;
    let (code, body) = f
        .post(&format!("{}/addItem/{order}/{item}/1", f.order))
        .await;
    assert_eq!(code, 200, "the fenced order is free again: {body}");
    proxy.set_mode(Mode::Forward);
    let answered = abort.await.unwrap().unwrap();
    assert_eq!(answered["state"], "aborted", "{answered:#}");
    let ended = wait_status(&f, &order, 60, |v| v["finished"] == true).await;
    assert_eq!(ended["saga_id"], saga.as_str());
    assert_eq!(ended["state"], "aborted", "a second decision: {ended:#}");
    assert_eq!(ended["decided_ms"], decided["decided_ms"], "decided twice");
    // Two drivers finish it (the operator's abort, and the owner, whose charge was answered
    // once the link came back and whose commit found the order fenced); `finish` is a
    // compare-and-set, so whichever records first names the reason. Which one that is depends
    // on how the participant's replies are grouped: both are true.
    let reason = ended["reason"].as_str().unwrap_or_default();
    assert!(
        reason == "aborted by an operator"
            || reason == "the order was changed or reset during checkout",
        "{ended:#}"
    );
    // Everything given back exactly once (the late charge applied, then refunded).
    let deadline = Instant::now() + Duration::from_secs(20);
    while f.credit_of(&user).await != 100 || f.stock_of(&item).await != 10 {
        assert!(Instant::now() < deadline, "not everything given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(f.credit_of(&user).await, 100);
    assert_eq!(f.stock_of(&item).await, 10);
    assert!(!f.paid(&order).await);
    // Aborting it again changes nothing; a new checkout charges the new total once.
    let again = sagas::send(&f.order, &Request::Abort(saga.clone()))
        .await
        .unwrap();
    assert_eq!(again["finished_ms"], ended["finished_ms"]);
    assert_eq!(f.checkout(&order).await, 200);
    assert_eq!(f.credit_of(&user).await, 91);
    assert_eq!(f.stock_of(&item).await, 7);
    let latest = wait_status(&f, &order, 10, |v| v["finished"] == true).await;
    assert_ne!(
        latest["saga_id"],
        saga.as_str(),
        "the latest checkout is shown"
    );
    assert_eq!(latest["state"], "committed");
}

async fn the_gateway_routes_the_status_and_refuses_the_operator_routes(amqp: &str) {
    let dir = ScratchDir::new("operator-gateway").unwrap();
    let (redis, _redis_dir) = redis_server();
    let base = format!("redis://127.0.0.1:{}", redis.port());
    let fleet = gateway_fleet(dir.path(), 2, &Options::default(), |_| InstanceLinks {
        redis: base.clone(),
        amqp: amqp.to_string(),
    })
    .await;
    let http = reqwest::Client::new();
    let post = |path: String| {
        let http = http.clone();
        let url = format!("{}{path}", fleet.url);
        async move {
            let r = http.post(&url).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let item = post("/stock/item/create/2".into()).await.1["item_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(post(format!("/stock/add/{item}/5")).await.0, 200);
    let user = post("/payment/create_user".into()).await.1["user_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(post(format!("/payment/add_funds/{user}/10")).await.0, 200);
    let order = post(format!("/orders/create/{user}")).await.1["order_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        post(format!("/orders/addItem/{order}/{item}/1")).await.0,
        200
    );
    assert_eq!(post(format!("/orders/checkout/{order}")).await.0, 200);
    let r = http
        .get(format!("{}/orders/saga/{order}", fleet.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let view: Value = r.json().await.unwrap();
    assert_eq!(view["state"], "committed", "{view:#}");
    let saga = view["saga_id"].as_str().unwrap();
    for path in [
        "/orders/ops/sagas".to_string(),
        format!("/ORDERS/ops/sagas/{saga}"),
        "/orders/ops".to_string(),
    ] {
        let r = http
            .get(format!("{}{path}", fleet.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "GET {path} went through the gateway");
    }
    let (code, _) = post(format!("/orders/ops/sagas/{saga}/abort")).await;
    assert_eq!(code, 404, "an abort went through the gateway");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_scenarios() {
    let broker = test_broker("operatortest@localhost");
    println!("scenario: paid_and_refused_checkouts_show_their_steps");
    paid_and_refused_checkouts_show_their_steps(&broker.url).await;
    println!("scenario: a_dead_lettered_compensation_is_worked_off_by_an_operator");
    a_dead_lettered_compensation_is_worked_off_by_an_operator(&broker.url).await;
    println!("scenario: a_stuck_saga_is_aborted_once");
    a_stuck_saga_is_aborted_once(&broker.url).await;
    println!("scenario: the_gateway_routes_the_status_and_refuses_the_operator_routes");
    the_gateway_routes_the_status_and_refuses_the_operator_routes(&broker.url).await;
}
