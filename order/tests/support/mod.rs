//! The in-process fleet the order integration tests share: real stock,
//! payment and order apps (each as built by its crate), one real
//! redis-server (a database per store) and a real RabbitMQ broker.
//!
//! Each fleet uses queue names of its own, so fleets (and a `cargo xtask`
//! fleet sharing the broker) never see each other's messages. Every link of
//! a service to its store or to the broker is an address in [`Endpoints`],
//! so a test can put a `FaultProxy` on any of them.
//!
//! [`gateway_fleet`] is the other shape: several instances of each app behind
//! the real nginx gateway (`xtask::gateway`), each instance with links of its own.

// Each test file uses its own part of the harness.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::config::{OrderSettings, QueueType, Service, Settings, StepOrder};
use common::redis_store::{RedisTarget, Store};
use serde_json::Value;
use xtask::{free_port, gateway, proc, RabbitNode, RedisServer, ScratchDir};

/// The broker of a test run: `TEST_AMQP_URL` (`cargo xtask test` points it
/// at the fleet's node), else a private node started for the run and stopped
/// when this is dropped.
pub struct TestBroker {
    pub url: String,
    _node: Option<(RabbitNode, ScratchDir)>,
}

/// Starts the run's broker as node `node_name` (`name@localhost`) unless
/// `TEST_AMQP_URL` names one. Panics (never skips) when RabbitMQ is missing.
pub fn test_broker(node_name: &str) -> TestBroker {
    if let Ok(url) = std::env::var("TEST_AMQP_URL") {
        return TestBroker { url, _node: None };
    }
    let dir = ScratchDir::new("saga-test-broker").unwrap();
    let node = RabbitNode::start(dir.path(), node_name, free_port(), free_port())
        .expect("start a private RabbitMQ node (or set TEST_AMQP_URL)");
    TestBroker {
        url: node.amqp_url(),
        _node: Some((node, dir)),
    }
}

/// A store on the single Redis at `url` (`redis://host:port[/db]`), as the
/// services' own stores are built in these tests.
pub fn direct_store(url: &str) -> Arc<Store> {
    Arc::new(
        Store::new(
            &RedisTarget::Direct {
                url: url.to_string(),
            },
            Duration::from_millis(10),
        )
        .unwrap(),
    )
}

/// A new, empty order of user `u-1`, made through `orders` (no service).
pub async fn new_order(orders: &order::orders::Orders) -> common::types::OrderId {
    let created = orders
        .create(
            common::types::UserId::parse("u-1").unwrap(),
            Ok(()),
            &common::idempotency::IdemKey::random("/create/u-1"),
        )
        .await
        .unwrap();
    common::types::OrderId::parse(created.body["order_id"].as_str().unwrap()).unwrap()
}

/// The port of an `amqp://user:pass@host:port/vhost` URL.
pub fn amqp_port(url: &str) -> u16 {
    let authority = url
        .split('@')
        .next_back()
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    authority.rsplit(':').next().unwrap().parse().unwrap()
}

/// `url` with its port replaced by `port` (to reach the broker through a proxy).
pub fn amqp_via(url: &str, port: u16) -> String {
    url.replace(&format!(":{}/", amqp_port(url)), &format!(":{port}/"))
}

/// Where each service reaches its stores and the broker. Redis addresses are
/// base URLs (`redis://127.0.0.1:<port>/`); the database is added per store.
pub struct Endpoints {
    pub stock_redis: String,
    pub payment_redis: String,
    pub order_redis: String,
    pub saga_redis: String,
    pub stock_amqp: String,
    pub payment_amqp: String,
    pub order_amqp: String,
}

impl Endpoints {
    /// Every link straight to `redis` and `amqp`.
    pub fn direct(redis: &RedisServer, amqp: &str) -> Self {
        Endpoints {
            stock_redis: redis.url(),
            payment_redis: redis.url(),
            order_redis: redis.url(),
            saga_redis: redis.url(),
            stock_amqp: amqp.to_string(),
            payment_amqp: amqp.to_string(),
            order_amqp: amqp.to_string(),
        }
    }
}

/// The order service's saga settings.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    pub step_order: StepOrder,
    pub step_timeout: Duration,
    pub checkout_timeout: Duration,
    pub saga_lease: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            step_order: StepOrder::Adaptive,
            step_timeout: Duration::from_secs(5),
            checkout_timeout: Duration::from_secs(20),
            saga_lease: Duration::from_secs(2),
        }
    }
}

/// The databases of the one redis-server, per store.
pub const STOCK_DB: u8 = 1;
pub const PAYMENT_DB: u8 = 2;
pub const ORDER_DB: u8 = 3;
pub const SAGA_DB: u8 = 4;

pub struct Fleet {
    pub amqp: String,
    pub stock: String,
    pub payment: String,
    pub order: String,
    pub stock_queue: String,
    pub payment_queue: String,
    pub http: reqwest::Client,
    pub redis: RedisServer,
    _dir: ScratchDir,
}

fn settings(service: Service, redis_base: &str, db: u8, amqp: &str) -> Settings {
    Settings {
        service,
        bind_addr: "127.0.0.1:0".into(),
        instance_id: format!("{}-test-{}", service.name(), uuid::Uuid::new_v4().simple()),
        redis: RedisTarget::Direct {
            url: format!("{redis_base}/{db}"),
        },
        wait_timeout: Duration::from_millis(10),
        amqp_url: amqp.to_string(),
        queue_type: QueueType::Classic,
        prefetch: 64,
    }
}

/// The order service's own settings: its saga store on `saga_redis` (a base
/// URL; the database is [`SAGA_DB`]), prices from `stock_url`, users from `payment_url`.
fn order_settings(
    saga_redis: &str,
    stock_url: &str,
    payment_url: &str,
    options: &Options,
) -> OrderSettings {
    OrderSettings {
        saga_redis: RedisTarget::Direct {
            url: format!("{saga_redis}/{SAGA_DB}"),
        },
        step_order: options.step_order,
        stock_url: stock_url.to_string(),
        payment_url: payment_url.to_string(),
        step_timeout: options.step_timeout,
        checkout_timeout: options.checkout_timeout,
        saga_lease: options.saga_lease,
    }
}

/// A fresh redis-server for one fleet, and the directory it lives in.
pub fn redis_server() -> (RedisServer, ScratchDir) {
    let dir = ScratchDir::new("saga-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None)
        .expect("start redis-server (apt-get install redis-server)");
    (redis, dir)
}

pub async fn fleet(amqp: &str) -> Fleet {
    fleet_with(amqp, amqp).await
}

/// A fleet whose order service reaches the broker at `order_amqp` (a fault proxy, say).
pub async fn fleet_with(amqp: &str, order_amqp: &str) -> Fleet {
    let (redis, dir) = redis_server();
    let endpoints = Endpoints {
        order_amqp: order_amqp.to_string(),
        ..Endpoints::direct(&redis, amqp)
    };
    Fleet::start(amqp, redis, dir, &endpoints, &Options::default()).await
}

impl Fleet {
    /// Builds and serves the three apps wired as `endpoints` says, on `redis`
    /// (which the fleet then owns, with `dir`), and waits until each is ready.
    pub async fn start(
        amqp: &str,
        redis: RedisServer,
        dir: ScratchDir,
        endpoints: &Endpoints,
        options: &Options,
    ) -> Fleet {
        let e = endpoints;
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let stock_queue = format!("test.{tag}.stock");
        let payment_queue = format!("test.{tag}.payment");
        let stock_settings = settings(Service::Stock, &e.stock_redis, STOCK_DB, &e.stock_amqp);
        let stock = stock::build(&stock_settings, &stock_queue)
            .unwrap()
            .spawn()
            .await;
        let payment_settings = settings(
            Service::Payment,
            &e.payment_redis,
            PAYMENT_DB,
            &e.payment_amqp,
        );
        let payment = payment::build(&payment_settings, &payment_queue)
            .unwrap()
            .spawn()
            .await;
        let order_settings = order_settings(&e.saga_redis, &stock, &payment, options);
        let queues = order::Queues {
            stock: stock_queue.clone(),
            payment: payment_queue.clone(),
        };
        let order = order::build(
            &settings(Service::Order, &e.order_redis, ORDER_DB, &e.order_amqp),
            &order_settings,
            queues,
        )
        .unwrap()
        .spawn()
        .await;
        let fleet = Fleet {
            amqp: amqp.to_string(),
            stock,
            payment,
            order,
            stock_queue,
            payment_queue,
            http: reqwest::Client::new(),
            redis,
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

    pub async fn post(&self, url: &str) -> (u16, Value) {
        let r = self.http.post(url).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    pub async fn get_text(&self, url: &str) -> String {
        self.http
            .get(url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn get(&self, url: &str) -> (u16, Value) {
        let r = self.http.get(url).send().await.unwrap();
        (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
    }

    /// A POST that must succeed (set-up): its status is checked, its body returned.
    pub async fn post_ok(&self, url: &str) -> Value {
        let (status, body) = self.post(url).await;
        assert_eq!(status, 200, "POST {url} -> {status} {body}");
        body
    }

    pub async fn post_with_key(&self, url: &str, key: &str) -> (u16, Value) {
        let r = self
            .http
            .post(url)
            .header("Idempotency-Key", key)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json().await.unwrap())
    }

    pub async fn item(&self, stock: i64, price: i64) -> String {
        let v = self
            .post_ok(&format!("{}/item/create/{price}", self.stock))
            .await;
        let id = v["item_id"].as_str().unwrap().to_string();
        if stock > 0 {
            self.post_ok(&format!("{}/add/{id}/{stock}", self.stock))
                .await;
        }
        id
    }

    pub async fn user(&self, credit: i64) -> String {
        let v = self.post_ok(&format!("{}/create_user", self.payment)).await;
        let id = v["user_id"].as_str().unwrap().to_string();
        if credit > 0 {
            self.post_ok(&format!("{}/add_funds/{id}/{credit}", self.payment))
                .await;
        }
        id
    }

    pub async fn order(&self, user: &str, items: &[(&str, i64)]) -> String {
        let v = self.post_ok(&format!("{}/create/{user}", self.order)).await;
        let id = v["order_id"].as_str().unwrap().to_string();
        for (item, qty) in items {
            let (status, _) = self
                .post(&format!("{}/addItem/{id}/{item}/{qty}", self.order))
                .await;
            assert_eq!(status, 200);
        }
        id
    }

    pub async fn stock_of(&self, item: &str) -> i64 {
        self.get(&format!("{}/find/{item}", self.stock)).await.1["stock"]
            .as_i64()
            .unwrap()
    }

    pub async fn credit_of(&self, user: &str) -> i64 {
        self.get(&format!("{}/find_user/{user}", self.payment))
            .await
            .1["credit"]
            .as_i64()
            .unwrap()
    }

    pub async fn paid(&self, order: &str) -> bool {
        self.find_order(order).await["paid"].as_bool().unwrap()
    }

    pub async fn find_order(&self, order: &str) -> Value {
        let (status, body) = self.get(&format!("{}/find/{order}", self.order)).await;
        assert_eq!(status, 200, "find {order}: {body}");
        body
    }

    /// A direct connection to one service's database (to corrupt or inspect
    /// it), never through a proxy.
    pub async fn db(&self, db: u8) -> redis::aio::MultiplexedConnection {
        redis::Client::open(format!("{}/{db}", self.redis.url()))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn checkout(&self, order: &str) -> u16 {
        self.post(&format!("{}/checkout/{order}", self.order))
            .await
            .0
    }
}

/// The members of a set in the saga store (`sagas:active`, `sagas:attention`).
pub async fn active_sagas(f: &Fleet, set: &str) -> Vec<String> {
    let mut db = f.db(SAGA_DB).await;
    redis::cmd("SMEMBERS")
        .arg(set)
        .query_async(&mut db)
        .await
        .unwrap()
}

/// The workspace root (where `gateway/`, `test/` live).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the order crate sits in the workspace")
        .to_path_buf()
}

/// nginx, stopped when dropped.
pub struct Nginx(u32);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = proc::terminate(self.0, None, Duration::from_secs(5));
    }
}

/// Where one service instance reaches its store and the broker: a Redis base URL
/// (`redis://127.0.0.1:<port>`, the database is added per store) and an AMQP URL.
pub struct InstanceLinks {
    pub redis: String,
    pub amqp: String,
}

/// Instances of each service behind the real nginx gateway.
pub struct GatewayFleet {
    /// `http://127.0.0.1:<port>` of the gateway.
    pub url: String,
    _nginx: Nginx,
}

fn port_of(url: &str) -> u16 {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.port())
        .expect("an http url with a port")
}

/// Starts `instances` instances of stock, payment and order (in that order), each wired by
/// `links(name)` (`name` is `stock-1`, `stock-2`, ..., `order-2`), with queue names of their
/// own and the saga settings of `options`; puts nginx in front of them, with its files in
/// `dir`, and waits until every service answers `/ready` through it. The order instances ask
/// the first stock instance for prices.
pub async fn gateway_fleet(
    dir: &Path,
    instances: usize,
    options: &Options,
    mut links: impl FnMut(&str) -> InstanceLinks,
) -> GatewayFleet {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let stock_queue = format!("test.{tag}.stock");
    let payment_queue = format!("test.{tag}.payment");
    let mut upstreams: Vec<(String, Vec<u16>)> = Vec::new();
    let (mut stock_url, mut payment_url) = (String::new(), String::new());
    for service in [Service::Stock, Service::Payment, Service::Order] {
        let mut ports = Vec::new();
        for n in 1..=instances {
            let l = links(&format!("{}-{n}", service.name()));
            let url = match service {
                Service::Stock => {
                    let s = settings(service, &l.redis, STOCK_DB, &l.amqp);
                    stock::build(&s, &stock_queue).unwrap().spawn().await
                }
                Service::Payment => {
                    let s = settings(service, &l.redis, PAYMENT_DB, &l.amqp);
                    payment::build(&s, &payment_queue).unwrap().spawn().await
                }
                Service::Order => {
                    let s = settings(service, &l.redis, ORDER_DB, &l.amqp);
                    let order_settings =
                        order_settings(&l.redis, &stock_url, &payment_url, options);
                    let queues = order::Queues {
                        stock: stock_queue.clone(),
                        payment: payment_queue.clone(),
                    };
                    order::build(&s, &order_settings, queues)
                        .unwrap()
                        .spawn()
                        .await
                }
            };
            if service == Service::Stock && stock_url.is_empty() {
                stock_url = url.clone();
            }
            if service == Service::Payment && payment_url.is_empty() {
                payment_url = url.clone();
            }
            ports.push(port_of(&url));
        }
        upstreams.push((service.name().to_string(), ports));
    }
    let port = free_port();
    let started = gateway::start(
        &repo_root(),
        dir,
        &gateway::Params {
            bind_host: "127.0.0.1".into(),
            port,
            prefix: dir.join("nginx"),
            log_dir: dir.join("logs"),
            run_as_root: proc::is_root(),
            nofile: 4096,
            upstreams,
        },
    )
    .expect("start the nginx gateway (apt-get install nginx)");
    let fleet = GatewayFleet {
        url: format!("http://127.0.0.1:{port}"),
        _nginx: Nginx(started.pid),
    };
    wait_ready_through(&fleet.url).await;
    fleet
}

/// Every service answers `/ready` through the gateway.
async fn wait_ready_through(gateway: &str) {
    let http = reqwest::Client::new();
    for prefix in ["stock", "payment", "orders"] {
        let url = format!("{gateway}/{prefix}/ready");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = http
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success());
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "{url} never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
