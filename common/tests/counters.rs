//! Exactly-once saga steps and hot-key behaviour of [`Counters`], against a
//! real redis-server started by the project's process kit.

use std::sync::Arc;
use std::time::Duration;

use common::counters::Counters;
use common::messages::Outcome;
use common::redis_store::{RedisTarget, Store};
use common::types::{Amount, SagaId};
use xtask::{free_port, RedisServer, ScratchDir};

struct Fixture {
    counters: Arc<Counters>,
    _redis: RedisServer,
    _dir: ScratchDir,
}

fn amount(n: i64) -> Amount {
    Amount::new(n).unwrap()
}

async fn fixture() -> Fixture {
    let dir = ScratchDir::new("counters-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let target = RedisTarget::Direct { url: redis.url() };
    // No replica here: a short WAIT keeps the test quick.
    let store = Arc::new(Store::new(&target, Duration::from_millis(10)).unwrap());
    let counters = Arc::new(Counters::new(store, "item", "stock"));
    Fixture {
        counters,
        _redis: redis,
        _dir: dir,
    }
}

async fn stock_of(counters: &Counters, id: &str) -> i64 {
    let v: Option<i64> = counters
        .store
        .query(redis::cmd("HGET").arg(counters.key(id)).arg("stock"))
        .await
        .unwrap();
    v.expect("item exists")
}

async fn seed(counters: &Counters, id: &str, stock: i64) {
    let mut p = redis::pipe();
    p.hset(counters.key(id), "stock", stock).ignore();
    counters.store.write(&p).await.unwrap();
}

#[tokio::test]
async fn the_same_take_delivered_twice_applies_once() {
    let f = fixture().await;
    seed(&f.counters, "a", 10).await;
    let saga = SagaId::new();
    let lines = [("a".to_string(), amount(3))];
    assert_eq!(
        f.counters.take(saga, &lines).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        f.counters.take(saga, &lines).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(stock_of(&f.counters, "a").await, 7);
    // And the compensation, twice, gives back once.
    assert_eq!(
        f.counters.give_back(saga, &lines).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        f.counters.give_back(saga, &lines).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(stock_of(&f.counters, "a").await, 10);
}

#[tokio::test]
async fn a_compensation_before_its_command_leaves_a_tombstone() {
    let f = fixture().await;
    seed(&f.counters, "a", 10).await;
    let saga = SagaId::new();
    let lines = [("a".to_string(), amount(4))];
    assert_eq!(
        f.counters.give_back(saga, &lines).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(stock_of(&f.counters, "a").await, 10, "nothing to give back");
    let late = f.counters.take(saga, &lines).await.unwrap();
    assert!(matches!(late, Outcome::Refused { .. }), "{late:?}");
    assert_eq!(stock_of(&f.counters, "a").await, 10, "late command applied");
}

#[tokio::test]
async fn a_reservation_with_one_short_line_takes_nothing() {
    let f = fixture().await;
    seed(&f.counters, "a", 10).await;
    seed(&f.counters, "b", 1).await;
    let saga = SagaId::new();
    let lines = [("a".to_string(), amount(5)), ("b".to_string(), amount(2))];
    let outcome = f.counters.take(saga, &lines).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Refused { ref reason } if reason.contains("b")),
        "{outcome:?}"
    );
    assert_eq!(stock_of(&f.counters, "a").await, 10);
    assert_eq!(stock_of(&f.counters, "b").await, 1);
    // The refusal is recorded: a redelivery answers the same.
    assert_eq!(f.counters.take(saga, &lines).await.unwrap(), outcome);
    // Unknown items are refused too, taking nothing.
    let unknown = [("a".to_string(), amount(1)), ("zz".to_string(), amount(1))];
    assert!(matches!(
        f.counters.take(SagaId::new(), &unknown).await.unwrap(),
        Outcome::Refused { .. }
    ));
    assert_eq!(stock_of(&f.counters, "a").await, 10);
}

#[tokio::test]
async fn a_thousand_takes_on_one_hot_key_sell_exactly_the_stock() {
    let f = fixture().await;
    seed(&f.counters, "hot", 100).await;
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let counters = f.counters.clone();
            tokio::spawn(async move {
                counters
                    .take(SagaId::new(), &[("hot".to_string(), amount(1))])
                    .await
                    .unwrap()
            })
        })
        .collect();
    let started = std::time::Instant::now();
    let mut applied = 0;
    for t in tasks {
        if t.await.unwrap() == Outcome::Applied {
            applied += 1;
        }
    }
    println!("1000 takes on one key: {:?}", started.elapsed());
    assert_eq!(applied, 100);
    assert_eq!(stock_of(&f.counters, "hot").await, 0);
}

#[tokio::test]
async fn plain_changes_never_go_below_zero_or_overflow() {
    let f = fixture().await;
    seed(&f.counters, "a", 5).await;
    assert!(f.counters.subtract("a", amount(6)).await.is_err());
    assert_eq!(f.counters.subtract("a", amount(5)).await.unwrap().get(), 0);
    assert!(f.counters.add("a", amount(i64::MAX)).await.is_ok());
    assert!(f.counters.add("a", amount(1)).await.is_err());
    assert_eq!(stock_of(&f.counters, "a").await, i64::MAX);
    assert!(f.counters.add("missing", amount(1)).await.is_err());
}
