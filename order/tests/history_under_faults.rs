//! The randomized history of `test/test_history.py`, run against a fleet whose every link to
//! Redis and to the broker goes through a fault proxy that misbehaves while the history runs.
//!
//! Why a Rust test starts a Python one: the model of the contract lives once, in
//! `test/history_model.py`; what only Rust has is the fleet built in process (two real
//! instances of each service, as built by their crates, behind the real nginx gateway) with a
//! [`FaultProxy`] on each link, and the hand on the proxies. So this test builds that fleet,
//! runs the history against its gateway with `HISTORY_FAULTS=1`, and meanwhile injects one
//! fault after another, drawn from the history's seed:
//!
//! - a slow link (every chunk delayed), a link that swallows replies, a link that is down
//!   (every connection reset), a one-off reset of every connection;
//! - "the command ran, its reply was lost, the connection died": after an `EXEC` on a Redis
//!   link, after a published command (order → broker) or reply (participant → broker).
//!
//! The model then allows 5xx and lost answers (the client retries them with the same key) but
//! nothing else: conservation of stock and credit, paid orders charged exactly their content,
//! idempotent repeats, no 409 but for addItem, and a quiet store at the end. The faults stop
//! when the random mix ends (the history writes its phase to `HISTORY_PHASE_FILE`).
//!
//! `HISTORY_SEED`, `HISTORY_SECONDS` and `HISTORY_CLIENTS` pass through; the broker is
//! `TEST_AMQP_URL` or a private node. Needs `python3` with `test/requirements.txt` and nginx:
//! without them the test fails, it does not skip.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::config::{OrderSettings, QueueType, Service, Settings, StepOrder};
use common::redis_store::RedisTarget;
use xtask::faultproxy::Mode;
use xtask::gateway;
use xtask::{free_port, proc, FaultProxy, RedisServer, ScratchDir};

mod support;
use support::{amqp_port, amqp_via, test_broker};

const INSTANCES: usize = 2;

/// The links of one service instance.
struct Links {
    name: String,
    redis: FaultProxy,
    broker: FaultProxy,
}

/// nginx, stopped when dropped.
struct Nginx(u32);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = proc::terminate(self.0, None, Duration::from_secs(5));
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the order crate sits in the workspace")
        .to_path_buf()
}

fn port_of(url: &str) -> u16 {
    reqwest::Url::parse(url)
        .ok()
        .and_then(|u| u.port())
        .expect("an http url with a port")
}

fn settings(service: Service, links: &Links, redis_port: u16, db: u8, amqp: &str) -> Settings {
    Settings {
        service,
        bind_addr: "127.0.0.1:0".into(),
        // Unique: the broker may be shared with a running fleet whose order instances own
        // exclusive reply queues named after theirs ("order-1", ...).
        instance_id: format!("{}-test-{}", links.name, uuid::Uuid::new_v4().simple()),
        redis: RedisTarget::Direct {
            url: format!("redis://127.0.0.1:{redis_port}/{db}"),
        },
        wait_timeout: Duration::from_millis(10),
        amqp_url: amqp.to_string(),
        queue_type: QueueType::Classic,
        prefetch: 64,
    }
}

/// SplitMix64: a seeded schedule without a dependency; quality is not the point.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }
}

/// What the injector did, for the report and the assertions.
#[derive(Default, Debug)]
struct Injected {
    delays: usize,
    dropped_replies: usize,
    downs: usize,
    resets: usize,
    lost_replies_armed: usize,
    lost_replies_fired: usize,
    /// Faults that hit the link of every instance of a service at once.
    whole_service: usize,
}

/// Injects one fault at a time, on a random link, while `phase_file` says "clients".
fn inject(links: &[Links], seed: u64, phase_file: &Path, stop: &AtomicBool) -> Injected {
    let mut rng = Rng(seed);
    let mut done = Injected::default();
    let in_mix = || std::fs::read_to_string(phase_file).is_ok_and(|p| p.trim() == "clients");
    let pause = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until && !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    while !stop.load(Ordering::SeqCst) {
        if !in_mix() {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        // One link of one instance, or (one time in four) that link of every instance of a
        // service: then the service as a whole is slow, deaf or down, not only one instance.
        let chosen = &links[rng.below(links.len() as u64) as usize];
        let redis = rng.below(2) == 0;
        let service = chosen.name.split('-').next().unwrap_or_default();
        let whole_service = rng.below(4) == 0;
        let proxies: Vec<&FaultProxy> = links
            .iter()
            .filter(|l| {
                if whole_service {
                    l.name.starts_with(service)
                } else {
                    l.name == chosen.name
                }
            })
            .map(|l| if redis { &l.redis } else { &l.broker })
            .collect();
        let set = |mode: Mode| proxies.iter().for_each(|p| p.set_mode(mode));
        // A whole service lasts longer: past the saga's step timeout, so that steps time out,
        // compensations wait for the link and answers become unknown (503).
        let scale = if whole_service { 3 } else { 1 };
        match rng.below(5) {
            0 => {
                set(Mode::Delay(rng.millis(20, 250)));
                done.delays += 1;
                pause(rng.millis(500, 2500) * scale);
            }
            1 => {
                set(Mode::DropReplies);
                done.dropped_replies += 1;
                pause(rng.millis(200, 1500) * scale);
            }
            2 => {
                set(Mode::Reset);
                done.downs += 1;
                pause(rng.millis(200, 2000) * scale);
            }
            3 => {
                proxies.iter().for_each(|p| p.reset_all());
                done.resets += 1;
            }
            _ => {
                // Redis: the transaction ran. Order's broker link: a command was published.
                // A participant's: its reply was published (the command is not acked yet).
                let pattern: &[u8] = match (redis, service == "order") {
                    (true, _) => b"EXEC",
                    (false, true) => b"\"action\"",
                    (false, false) => b"\"outcome\"",
                };
                let before: usize = proxies.iter().map(|p| p.fired()).sum();
                proxies.iter().for_each(|p| p.drop_reply_after(pattern));
                done.lost_replies_armed += 1;
                pause(rng.millis(300, 1200));
                done.lost_replies_fired +=
                    proxies.iter().map(|p| p.fired()).sum::<usize>() - before;
            }
        }
        set(Mode::Forward);
        if whole_service {
            done.whole_service += 1;
        }
        pause(rng.millis(100, 800));
    }
    for link in links {
        link.redis.set_mode(Mode::Forward);
        link.broker.set_mode(Mode::Forward);
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_history_under_link_faults() {
    let broker = test_broker("historyfaults@localhost");
    let amqp = broker.url.clone();
    let dir = ScratchDir::new("history-faults").unwrap();
    let redis = RedisServer::start(dir.path().join("redis"), free_port(), None, None).unwrap();

    let tag = uuid::Uuid::new_v4().simple().to_string();
    let stock_queue = format!("test.{tag}.stock");
    let payment_queue = format!("test.{tag}.payment");
    let mut links = Vec::new();
    let mut upstreams: Vec<(String, Vec<u16>)> = Vec::new();
    let mut stock_url = String::new();
    for service in [Service::Stock, Service::Payment, Service::Order] {
        let mut ports = Vec::new();
        for n in 1..=INSTANCES {
            let l = Links {
                name: format!("{}-{n}", service.name()),
                redis: FaultProxy::start(redis.port()).unwrap(),
                broker: FaultProxy::start(amqp_port(&amqp)).unwrap(),
            };
            let broker_url = amqp_via(&amqp, l.broker.port());
            let url = match service {
                Service::Stock => {
                    let s = settings(service, &l, l.redis.port(), 1, &broker_url);
                    stock::build(&s, &stock_queue).unwrap().spawn().await
                }
                Service::Payment => {
                    let s = settings(service, &l, l.redis.port(), 2, &broker_url);
                    payment::build(&s, &payment_queue).unwrap().spawn().await
                }
                Service::Order => {
                    let s = settings(service, &l, l.redis.port(), 3, &broker_url);
                    let order_settings = OrderSettings {
                        saga_redis: RedisTarget::Direct {
                            url: format!("redis://127.0.0.1:{}/4", l.redis.port()),
                        },
                        step_order: StepOrder::Sequential,
                        stock_url: stock_url.clone(),
                        step_timeout: Duration::from_secs(3),
                        checkout_timeout: Duration::from_secs(10),
                        saga_lease: Duration::from_secs(2),
                    };
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
            ports.push(port_of(&url));
            links.push(l);
        }
        upstreams.push((service.name().to_string(), ports));
    }

    let root = repo_root();
    let gateway_port = free_port();
    let started = gateway::start(
        &root,
        dir.path(),
        &gateway::Params {
            bind_host: "127.0.0.1".into(),
            port: gateway_port,
            prefix: dir.path().join("nginx"),
            log_dir: dir.path().join("logs"),
            run_as_root: proc::is_root(),
            nofile: 4096,
            upstreams,
        },
    )
    .expect("start the nginx gateway");
    let _nginx = Nginx(started.pid);
    let gateway_url = format!("http://127.0.0.1:{gateway_port}");
    wait_ready(&gateway_url).await;

    let seed: u64 = match std::env::var("HISTORY_SEED") {
        Ok(s) => s.parse().expect("HISTORY_SEED is a number"),
        Err(_) => rand::random::<u32>() as u64,
    };
    let phase_file = dir.path().join("history-phase");
    let stop = Arc::new(AtomicBool::new(false));
    let links = Arc::new(links);
    let injector = {
        let (links, stop, phase_file) = (links.clone(), stop.clone(), phase_file.clone());
        std::thread::spawn(move || inject(&links, seed, &phase_file, &stop))
    };

    let mut pytest = std::process::Command::new("python3");
    pytest
        .current_dir(&root)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "history",
        ])
        .arg("test/test_history.py")
        .env("GATEWAY_URL", &gateway_url)
        .env("HISTORY_FAULTS", "1")
        .env("HISTORY_SEED", seed.to_string())
        .env("HISTORY_PHASE_FILE", &phase_file);
    let status = tokio::task::spawn_blocking(move || pytest.status())
        .await
        .unwrap()
        .expect("run python3 -m pytest (install test/requirements.txt)");
    stop.store(true, Ordering::SeqCst);
    let injected = injector.join().unwrap();
    println!("history under faults (seed {seed}): injected {injected:?}");

    assert!(
        status.success(),
        "the history under faults failed (seed {seed}, replay with HISTORY_SEED={seed}): {status}"
    );
    let total = injected.delays
        + injected.dropped_replies
        + injected.downs
        + injected.resets
        + injected.lost_replies_armed;
    assert!(
        total >= 5,
        "only {total} faults were injected: the history did not run under faults ({injected:?})"
    );
}

/// Every service answers `/ready` through the gateway.
async fn wait_ready(gateway: &str) {
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
