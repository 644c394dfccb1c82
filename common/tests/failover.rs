//! Durability through Sentinel failovers, against real processes from the xtask kit: a store is
//! a master and two replicas (a master refuses writes while no replica is connected), watched
//! by three Sentinels, and `Store` acknowledges a write only once `WAIT` saw a replica take it.
//!
//! Each test makes sequential `add`s of 1 to one counter seeded at 0, from one task, and counts
//! the calls that were acknowledged (returned 200) and those that failed (outcome unknown: the
//! increment may or may not have landed). After the failover the counter on the new master must
//! satisfy `acknowledged <= credit <= acknowledged + unknown`, and equal `acknowledged` when no
//! call failed: lower means an acknowledged write was lost, higher that a write was applied
//! twice (a retry after an EXEC whose reply was lost) or a refused one landed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::counters::Counters;
use common::error::ApiError;
use common::idempotency::{Answer, IdemKey};
use common::redis_store::{RedisTarget, Store, StoreError};
use common::types::Amount;
use serde_json::json;
use xtask::{RedisServer, ScratchDir, Sentinel, SentinelSet};

const MASTER_NAME: &str = "data";
/// The retry budget of the stores in the tests that expect refusals (15 s by default).
const BUDGET: Duration = Duration::from_secs(3);
/// The longest a refused call may take: the budget, then one last backoff (0.5 s) and one last
/// try, which the store cuts off after two command timeouts (2 x 3 s).
const REFUSAL_BOUND: Duration = Duration::from_millis(3_000 + 500 + 6_000);

fn target(sentinels: &[Sentinel]) -> RedisTarget {
    RedisTarget::Sentinel {
        sentinels: sentinels.iter().map(|s| s.addr()).collect(),
        master_name: MASTER_NAME.into(),
        password: None,
        sentinel_password: None,
    }
}

/// One counter `user:u` seeded at 0, and the tally of the adds made to it.
struct Credit {
    counters: Counters,
    acknowledged: i64,
    unknown: i64,
}

impl Credit {
    async fn seeded(store: Arc<Store>) -> Self {
        let counters = Counters::new(store.clone(), "user", "credit", &[]);
        let mut seed = redis::pipe();
        counters.init(&mut seed, "u", Amount::ZERO, "e", &[]);
        store.write(&seed).await.unwrap();
        Credit {
            counters,
            acknowledged: 0,
            unknown: 0,
        }
    }

    /// One `add_funds/u/1` under `key`.
    async fn add_with(&self, key: &IdemKey) -> Result<Answer, ApiError> {
        self.counters
            .add(
                "u",
                Amount::new(1).unwrap(),
                key,
                |c| json!({ "credit": c }),
            )
            .await
    }

    /// One `add` under a fresh key, counted as acknowledged or unknown; true if acknowledged.
    async fn add(&mut self) -> bool {
        match self.add_with(&IdemKey::random("/add_funds/u/1")).await {
            Ok(answer) => {
                assert_eq!(answer.status, 200, "{answer:?}");
                self.acknowledged += 1;
                true
            }
            Err(_) => {
                self.unknown += 1;
                false
            }
        }
    }

    /// Checks the counter read from the new master against the tally.
    fn check(&self, credit: i64) {
        let (acknowledged, unknown) = (self.acknowledged, self.unknown);
        assert!(
            credit >= acknowledged,
            "acknowledged writes were lost: credit {credit} < {acknowledged} acknowledged"
        );
        assert!(
            credit <= acknowledged + unknown,
            "writes were applied that were not made: credit {credit} > {acknowledged} \
             acknowledged + {unknown} of unknown outcome"
        );
        if unknown == 0 {
            assert_eq!(
                credit, acknowledged,
                "with every call acknowledged, the credit is exactly their count"
            );
        }
    }
}

/// The counter as `node` itself holds it (read straight from that process).
fn credit_on(node: &RedisServer) -> i64 {
    xtask::resp::text(&node.command(&["HGET", "user:u", "credit"]).unwrap())
        .expect("the counter exists")
        .parse()
        .unwrap()
}

/// Waits until the Sentinels have promoted one of `candidates` and it says it is a master.
fn promoted<'a>(sentinels: &[Sentinel], candidates: &'a [RedisServer]) -> &'a RedisServer {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let port = sentinels[0].master_port(MASTER_NAME).unwrap();
        if let Some(node) = candidates.iter().find(|n| Some(n.port()) == port) {
            if node.role().unwrap() == "master" {
                return node;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no replica was promoted within 60 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_after_the_master_is_killed_and_none_acknowledged_is_lost() {
    let dir = ScratchDir::new("failover-test").unwrap();
    let SentinelSet {
        mut master,
        replicas,
        sentinels,
    } = SentinelSet::start(dir.path(), MASTER_NAME, Duration::from_secs(20)).unwrap();
    let store = Arc::new(Store::new(&target(&sentinels), Duration::from_millis(500)).unwrap());
    let mut credit = Credit::seeded(store.clone()).await;
    for _ in 0..50 {
        assert!(credit.add().await, "a write with both replicas up failed");
    }
    master.kill9();
    let killed_at = Instant::now();
    let mut first_success_after_kill = None;
    while killed_at.elapsed() < Duration::from_secs(12) {
        if credit.add().await {
            first_success_after_kill.get_or_insert(killed_at.elapsed());
        }
        if credit.acknowledged >= 150 {
            break;
        }
    }
    let recovered = first_success_after_kill.expect("writes never resumed after the failover");
    println!(
        "writes resumed {recovered:?} after SIGKILL of the master \
         ({} acknowledged, {} failed calls of unknown outcome)",
        credit.acknowledged, credit.unknown
    );
    // The promoted replica writes only once the other one follows it (min-replicas-to-write).
    assert!(recovered < Duration::from_secs(10), "took {recovered:?}");
    let new_master = promoted(&sentinels, &replicas);
    credit.check(credit_on(new_master));
}

/// A replica dies, the other one lags, then the master dies: the write guard the design asks
/// for. The survivor is stalled (SIGSTOP) with more replication stream queued for it than the
/// kernel's socket buffers hold (a 48 MB value), so whatever the master takes from then on
/// reaches no replica before the master is killed; Sentinel then promotes the survivor anyway.
/// Writes made while it lagged must not have been acknowledged. (Before WAIT was required, a
/// write whose WAIT saw no replica was acknowledged all the same, and this test lost them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_a_dead_replica_a_lagging_one_and_the_masters_death() {
    let dir = ScratchDir::new("durability-test").unwrap();
    let SentinelSet {
        mut master,
        mut replicas,
        sentinels,
    } = SentinelSet::start(dir.path(), MASTER_NAME, Duration::from_secs(20)).unwrap();
    let store = Store::new(&target(&sentinels), Duration::from_millis(500)).unwrap();
    let store = Arc::new(store.with_retry_budget(BUDGET));
    let mut credit = Credit::seeded(store.clone()).await;
    for _ in 0..20 {
        assert!(credit.add().await, "a write with both replicas up failed");
    }

    // One replica dies: the other one still confirms every write.
    replicas[0].kill9();
    for _ in 0..20 {
        assert!(
            credit.add().await,
            "a write with one replica left was not acknowledged"
        );
    }

    // The survivor lags. The master still counts it (it acknowledged within
    // min-replicas-max-lag), so it takes writes, but none reaches a replica.
    replicas[1].pause().unwrap();
    let filler = "x".repeat(48 << 20);
    master.command(&["SET", "filler", &filler]).unwrap();
    let lagging = Instant::now();
    let before = (credit.acknowledged, credit.unknown);
    while lagging.elapsed() < Duration::from_secs(3) {
        credit.add().await;
    }
    let while_lagging = (credit.acknowledged - before.0, credit.unknown - before.1);
    assert_eq!(
        while_lagging.0, 0,
        "a write was acknowledged while no replica could take it"
    );

    // The master dies with writes only it holds; the survivor wakes up and is promoted.
    master.kill9();
    replicas[1].resume().unwrap();
    let new_master = promoted(&sentinels, &replicas[1..]);
    let caught_up = new_master.command(&["EXISTS", "filler"]).unwrap();
    assert_eq!(
        caught_up,
        redis::Value::Int(0),
        "the survivor caught up with the master: this run did not make it lag"
    );
    let on_new_master = credit_on(new_master);
    println!(
        "while the survivor lagged: {} calls acknowledged, {} failed; in all {} acknowledged, \
         {} unknown; the new master holds {on_new_master}",
        while_lagging.0, while_lagging.1, credit.acknowledged, credit.unknown
    );
    credit.check(on_new_master);
}

fn not_durable(result: &Result<Answer, ApiError>) -> bool {
    matches!(result, Err(ApiError::Store(StoreError::NotDurable(_))))
}

/// Waits until the master counts exactly `n` connected replicas.
fn wait_connected_replicas(master: &RedisServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = master.command(&["INFO", "replication"]).unwrap();
        let info = xtask::resp::text(&info).unwrap_or_default();
        let connected = xtask::resp::info_field(&info, "connected_slaves");
        if connected.and_then(|c| c.parse::<usize>().ok()) == Some(n) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "master still has other than {n} replicas:\n{info}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With no replica to confirm it, a write is refused, not acknowledged, within a bound
/// ([`REFUSAL_BOUND`]); once a replica is back, writes are acknowledged again and the retries
/// under the refused keys apply exactly once. Both ways to have no replica: both dead (the
/// master refuses the write itself, `NOREPLICAS`), and both stalled (the master still counts
/// them, takes the write, and `WAIT` finds no replica: the write happened but is not
/// acknowledged, and its retry returns the first answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_replica_writes_are_refused_not_acknowledged_and_resume_when_one_returns() {
    let dir = ScratchDir::new("no-replica-test").unwrap();
    let SentinelSet {
        master,
        mut replicas,
        sentinels,
    } = SentinelSet::start(dir.path(), MASTER_NAME, Duration::from_secs(20)).unwrap();
    let store = Store::new(&target(&sentinels), Duration::from_millis(500)).unwrap();
    let store = Arc::new(store.with_retry_budget(BUDGET));
    let credit = Credit::seeded(store.clone()).await;
    let early = IdemKey::random("/add_funds/u/1");
    let first = credit.add_with(&early).await.unwrap();
    assert_eq!(first.body["credit"], 1, "{first:?}");

    // Both replicas die: the master refuses writes (NOREPLICAS).
    for replica in &mut replicas {
        replica.kill9();
    }
    wait_connected_replicas(&master, 0);
    let refused_key = IdemKey::random("/add_funds/u/1");
    let started = Instant::now();
    let refused = credit.add_with(&refused_key).await;
    let took = started.elapsed();
    println!("with both replicas dead, a write was refused after {took:?}: {refused:?}");
    assert!(not_durable(&refused), "{refused:?}");
    assert!(took >= BUDGET, "gave up before the retry budget: {took:?}");
    assert!(took <= REFUSAL_BOUND, "took {took:?}");
    // A replay is no acknowledgement either while no replica can hold what it replays.
    let replay = credit.add_with(&early).await;
    assert!(not_durable(&replay), "{replay:?}");
    assert_eq!(credit_on(&master), 1, "a refused write was applied");

    // One replica comes back: writes are acknowledged again, each key applied once.
    replicas[0].restart().unwrap();
    replicas[0]
        .wait_replica_synced(Duration::from_secs(20))
        .unwrap();
    master
        .wait_replicas_online(1, Duration::from_secs(20))
        .unwrap();
    let retried = credit.add_with(&refused_key).await.unwrap();
    assert_eq!(retried.body["credit"], 2, "{retried:?}");
    assert_eq!(credit.add_with(&early).await.unwrap(), first);
    let fresh = credit
        .add_with(&IdemKey::random("/add_funds/u/1"))
        .await
        .unwrap();
    assert_eq!(fresh.body["credit"], 3, "{fresh:?}");
    assert_eq!(credit_on(&master), 3);

    // The replica stalls (the other one is still dead): the master still counts it for
    // min-replicas-max-lag (10 s), so it takes the write, but WAIT finds no replica.
    replicas[0].pause().unwrap();
    let stalled_key = IdemKey::random("/add_funds/u/1");
    let started = Instant::now();
    let unconfirmed = credit.add_with(&stalled_key).await;
    let took = started.elapsed();
    println!("with the replica stalled, a write was refused after {took:?}: {unconfirmed:?}");
    assert!(not_durable(&unconfirmed), "{unconfirmed:?}");
    assert!(took <= REFUSAL_BOUND, "took {took:?}");
    assert_eq!(
        credit_on(&master),
        4,
        "the master took the write it could not confirm"
    );
    replicas[0].resume().unwrap();
    let retried = credit.add_with(&stalled_key).await.unwrap();
    assert_eq!(
        retried.body["credit"], 4,
        "the retry returns the first (unconfirmed) run's answer: {retried:?}"
    );
    assert_eq!(credit_on(&master), 4, "the retry applied the write again");
}

/// With both replicas healthy, an acknowledged write is on both of them, not
/// just on the faster one: Sentinel may promote either (it promoted the
/// lagging one in a chaos run, after a false second failover, and writes
/// only the other replica had were lost). One replica stalls briefly (well
/// under a second, so the master still counts it healthy): the write waits
/// for it, and once it returns the master has seen both replicas take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_both_replicas_healthy_an_acknowledged_write_is_on_both() {
    let dir = ScratchDir::new("durability-test").unwrap();
    let SentinelSet {
        master,
        mut replicas,
        sentinels,
    } = SentinelSet::start(dir.path(), MASTER_NAME, Duration::from_secs(20)).unwrap();
    let store = Store::new(&target(&sentinels), Duration::from_millis(1500)).unwrap();
    let store = Arc::new(store.with_retry_budget(BUDGET));
    let mut credit = Credit::seeded(store.clone()).await;
    assert!(credit.add().await);

    let mut slow = replicas.pop().unwrap();
    slow.pause().unwrap();
    let waker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        slow.resume().unwrap();
        slow
    });
    let started = Instant::now();
    assert!(credit.add().await, "the write failed");
    let took = started.elapsed();
    // What the master knows the replicas acknowledged (REPLCONF ACK offsets), right after.
    let info = master.command(&["INFO", "replication"]).unwrap();
    let info = xtask::resp::text(&info).unwrap();
    let _slow = waker.join().unwrap();
    let offset = |prefix: &str| -> i64 {
        info.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let master_offset = offset("master_repl_offset:");
    let acked: Vec<i64> = info
        .lines()
        .filter(|l| l.starts_with("slave") && l.contains("state="))
        .map(|l| {
            l.split(',')
                .find_map(|kv| kv.strip_prefix("offset="))
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    println!("write took {took:?}; master offset {master_offset}, replicas acknowledged {acked:?}");
    assert_eq!(acked.len(), 2, "{info}");
    assert!(
        took >= Duration::from_millis(250),
        "the write was acknowledged before the stalled replica had it ({took:?})"
    );
    assert!(
        acked.iter().all(|&a| a >= master_offset - 100),
        "a replica had not acknowledged the write: {acked:?} vs {master_offset}"
    );
    credit.check(credit_on(&master));
}
