//! The checkout saga end to end, in process: real stock, payment and order
//! apps (each as built by its crate), a real redis-server and a real
//! RabbitMQ broker. Each test uses queue names of its own, so tests (and a
//! fleet sharing the broker) never see each other's messages.
//!
//! The broker is `TEST_AMQP_URL` (`cargo xtask test` points it at the
//! fleet's node); without it, a private node is started for the run. The
//! scenarios run one after another inside a single test so that such a node
//! is stopped when they end (a node kept in a static would outlive them).

use std::sync::Arc;
use std::time::Duration;

use common::broker::{Broker, QueueKind};
use common::config::{OrderSettings, QueueType, Service, Settings, StepOrder};
use common::messages::{Action, Batch, Command, Line, Outcome, Reply};
use common::redis_store::RedisTarget;
use common::types::{Amount, ItemId, SagaId};
use serde_json::Value;
use xtask::{free_port, RabbitNode, RedisServer, ScratchDir};

/// A broker of the run's own, when `TEST_AMQP_URL` does not name one.
struct TestBroker {
    url: String,
    _node: Option<(RabbitNode, ScratchDir)>,
}

fn test_broker() -> TestBroker {
    if let Ok(url) = std::env::var("TEST_AMQP_URL") {
        return TestBroker { url, _node: None };
    }
    let dir = ScratchDir::new("saga-test-broker").unwrap();
    let node = RabbitNode::start(dir.path(), "sagatest@localhost", free_port(), free_port())
        .expect("start a private RabbitMQ node (or set TEST_AMQP_URL)");
    TestBroker {
        url: node.amqp_url(),
        _node: Some((node, dir)),
    }
}

struct Fleet {
    amqp: String,
    stock: String,
    payment: String,
    order: String,
    stock_queue: String,
    http: reqwest::Client,
    _redis: RedisServer,
    _dir: ScratchDir,
}

fn settings(service: Service, redis: &RedisServer, db: u8, amqp: &str) -> Settings {
    Settings {
        service,
        bind_addr: "127.0.0.1:0".into(),
        instance_id: format!("{}-test-{}", service.name(), uuid::Uuid::new_v4().simple()),
        redis: RedisTarget::Direct {
            url: format!("{}/{db}", redis.url()),
        },
        wait_timeout: Duration::from_millis(10),
        amqp_url: amqp.to_string(),
        queue_type: QueueType::Classic,
        prefetch: 64,
    }
}

async fn fleet(amqp: &str) -> Fleet {
    let amqp = amqp.to_string();
    let dir = ScratchDir::new("saga-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let stock_queue = format!("test.{tag}.stock");
    let payment_queue = format!("test.{tag}.payment");
    let stock = stock::build(&settings(Service::Stock, &redis, 1, &amqp), &stock_queue)
        .unwrap()
        .spawn()
        .await;
    let payment = payment::build(
        &settings(Service::Payment, &redis, 2, &amqp),
        &payment_queue,
    )
    .unwrap()
    .spawn()
    .await;
    let order_settings = OrderSettings {
        saga_redis: RedisTarget::Direct {
            url: format!("{}/4", redis.url()),
        },
        step_order: StepOrder::Parallel,
        stock_url: stock.clone(),
        step_timeout: Duration::from_secs(5),
        saga_lease: Duration::from_secs(2),
    };
    let queues = order::Queues {
        stock: stock_queue.clone(),
        payment: payment_queue,
    };
    let order = order::build(
        &settings(Service::Order, &redis, 3, &amqp),
        &order_settings,
        queues,
    )
    .unwrap()
    .spawn()
    .await;
    let fleet = Fleet {
        amqp,
        stock,
        payment,
        order,
        stock_queue,
        http: reqwest::Client::new(),
        _redis: redis,
        _dir: dir,
    };
    for base in [&fleet.stock, &fleet.payment, &fleet.order] {
        let mut ready = false;
        for _ in 0..100 {
            if fleet.get(&format!("{base}/ready")).await.0 == 200 {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ready, "{base} never became ready");
    }
    fleet
}

impl Fleet {
    async fn post(&self, url: &str) -> (u16, Value) {
        let r = self.http.post(url).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn get(&self, url: &str) -> (u16, Value) {
        let r = self.http.get(url).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    async fn item(&self, stock: i64, price: i64) -> String {
        let (_, v) = self
            .post(&format!("{}/item/create/{price}", self.stock))
            .await;
        let id = v["item_id"].as_str().unwrap().to_string();
        if stock > 0 {
            self.post(&format!("{}/add/{id}/{stock}", self.stock)).await;
        }
        id
    }

    async fn user(&self, credit: i64) -> String {
        let (_, v) = self.post(&format!("{}/create_user", self.payment)).await;
        let id = v["user_id"].as_str().unwrap().to_string();
        if credit > 0 {
            self.post(&format!("{}/add_funds/{id}/{credit}", self.payment))
                .await;
        }
        id
    }

    async fn order(&self, user: &str, items: &[(&str, i64)]) -> String {
        let (_, v) = self.post(&format!("{}/create/{user}", self.order)).await;
        let id = v["order_id"].as_str().unwrap().to_string();
        for (item, qty) in items {
            let (status, _) = self
                .post(&format!("{}/addItem/{id}/{item}/{qty}", self.order))
                .await;
            assert_eq!(status, 200);
        }
        id
    }

    async fn stock_of(&self, item: &str) -> i64 {
        self.get(&format!("{}/find/{item}", self.stock)).await.1["stock"]
            .as_i64()
            .unwrap()
    }

    async fn credit_of(&self, user: &str) -> i64 {
        self.get(&format!("{}/find_user/{user}", self.payment))
            .await
            .1["credit"]
            .as_i64()
            .unwrap()
    }

    async fn paid(&self, order: &str) -> bool {
        self.get(&format!("{}/find/{order}", self.order)).await.1["paid"]
            .as_bool()
            .unwrap()
    }

    async fn checkout(&self, order: &str) -> u16 {
        self.post(&format!("{}/checkout/{order}", self.order))
            .await
            .0
    }
}

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

async fn concurrent_checkouts_of_one_order_charge_it_once(amqp: &str) {
    let f = Arc::new(fleet(amqp).await);
    let item = f.item(10, 2).await;
    let user = f.user(100).await;
    let order = f.order(&user, &[(&item, 1)]).await;
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let (f, order) = (f.clone(), order.clone());
            tokio::spawn(async move { f.checkout(&order).await })
        })
        .collect();
    let mut statuses = Vec::new();
    for a in attempts {
        statuses.push(a.await.unwrap());
    }
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(f.credit_of(&user).await, 98);
    assert_eq!(f.stock_of(&item).await, 9);
}

/// Sends `command` straight to the stock queue `times` times, as a broker
/// redelivery would, and returns the replies.
async fn deliver(f: &Fleet, command: &Command, times: usize) -> Vec<Outcome> {
    let broker = Broker::new(&f.amqp, QueueType::Classic, &[]);
    let reply_queue = format!("test.replies.{}", uuid::Uuid::new_v4().simple());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(broker.clone().consume(
        reply_queue.clone(),
        QueueKind::Private,
        16,
        move |d: lapin::message::Delivery| {
            for reply in Batch::<Reply>::from_json(&d.data).unwrap().items {
                let _ = tx.send(reply.outcome);
            }
            std::future::ready(())
        },
    ));
    tokio::time::sleep(Duration::from_millis(300)).await; // the reply queue exists
    let body = Batch::of(vec![command.clone()]).to_json();
    let mut outcomes = Vec::new();
    for _ in 0..times {
        broker
            .publish(&f.stock_queue, Some(&reply_queue), &body)
            .await
            .unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("a reply")
            .unwrap();
        outcomes.push(outcome);
    }
    outcomes
}

async fn a_command_delivered_twice_over_the_broker_applies_once(amqp: &str) {
    let f = fleet(amqp).await;
    let item = f.item(10, 1).await;
    let reserve = Command {
        saga_id: SagaId::new(),
        action: Action::Reserve {
            lines: vec![Line {
                item_id: ItemId::parse(&item).unwrap(),
                quantity: Amount::new(4).unwrap(),
            }],
        },
    };
    let outcomes = deliver(&f, &reserve, 2).await;
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
    };
    let reserve = Command {
        saga_id,
        action: Action::Reserve { lines },
    };
    assert_eq!(deliver(&f, &release, 1).await, vec![Outcome::Applied]);
    let late = deliver(&f, &reserve, 1).await;
    assert!(matches!(late[0], Outcome::Refused { .. }), "{late:?}");
    assert_eq!(f.stock_of(&item).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_scenarios() {
    let broker = test_broker();
    println!("scenario: a_checkout_takes_stock_and_credit_and_marks_the_order_paid");
    a_checkout_takes_stock_and_credit_and_marks_the_order_paid(&broker.url).await;
    println!("scenario: a_refused_step_is_compensated_and_nothing_stays_taken");
    a_refused_step_is_compensated_and_nothing_stays_taken(&broker.url).await;
    println!("scenario: concurrent_checkouts_of_one_order_charge_it_once");
    concurrent_checkouts_of_one_order_charge_it_once(&broker.url).await;
    println!("scenario: a_command_delivered_twice_over_the_broker_applies_once");
    a_command_delivered_twice_over_the_broker_applies_once(&broker.url).await;
    println!("scenario: a_late_command_after_its_compensation_is_refused_over_the_broker");
    a_late_command_after_its_compensation_is_refused_over_the_broker(&broker.url).await;
}
