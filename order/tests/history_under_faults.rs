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

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::config::StepOrder;
use xtask::faultproxy::Mode;
use xtask::{free_port, FaultProxy, RedisServer, ScratchDir};

mod support;
use support::{amqp_port, amqp_via, gateway_fleet, repo_root, test_broker, InstanceLinks, Options};

const INSTANCES: usize = 2;

/// The links of one service instance.
struct Links {
    name: String,
    redis: FaultProxy,
    broker: FaultProxy,
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

    // Every link of every instance goes through a fault proxy of its own.
    let mut links = Vec::new();
    let options = Options {
        step_order: StepOrder::Sequential,
        step_timeout: Duration::from_secs(3),
        checkout_timeout: Duration::from_secs(10),
        saga_lease: Duration::from_secs(2),
    };
    let fleet = gateway_fleet(dir.path(), INSTANCES, &options, |name| {
        let l = Links {
            name: name.to_string(),
            redis: FaultProxy::start(redis.port()).unwrap(),
            broker: FaultProxy::start(amqp_port(&amqp)).unwrap(),
        };
        let instance = InstanceLinks {
            redis: format!("redis://127.0.0.1:{}", l.redis.port()),
            amqp: amqp_via(&amqp, l.broker.port()),
        };
        links.push(l);
        instance
    })
    .await;
    let gateway_url = fleet.url.clone();
    let root = repo_root();

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
