//! `batch_init` as a rule (`common/src/counters/batches.rs`), against a real
//! redis-server: batch counters read as the rule says until their first
//! change, a later rule overwrites what it covers (hashes included), and what
//! a saga took from an overwritten counter is never given back to the new one.

use std::sync::Arc;
use std::time::Duration;

use common::counters::{Counters, Current};
use common::idempotency::IdemKey;
use common::messages::Outcome;
use common::redis_store::{RedisTarget, Store};
use common::types::{Amount, SagaId};
use serde_json::json;
use xtask::{free_port, RedisServer, ScratchDir};

struct Fixture {
    counters: Arc<Counters>,
    _redis: RedisServer,
    _dir: ScratchDir,
}

fn fixture() -> Fixture {
    let dir = ScratchDir::new("batches-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let target = RedisTarget::Direct { url: redis.url() };
    let store = Arc::new(Store::new(&target, Duration::from_millis(10)).unwrap());
    Fixture {
        counters: Arc::new(Counters::new(store, "item", "stock", &["price"])),
        _redis: redis,
        _dir: dir,
    }
}

fn amount(n: i64) -> Amount {
    Amount::new(n).unwrap()
}

async fn batch(counters: &Counters, n: i64, stock: i64, price: i64) {
    let mut writes = redis::pipe();
    counters.init_batch(&mut writes, n, amount(stock), &[amount(price)]);
    counters.store.write(&writes).await.unwrap();
}

/// (stock, price) as `find` sees them; `None`: no such item.
async fn current(counters: &Counters, id: &str) -> Option<(i64, i64)> {
    counters
        .current(id)
        .await
        .unwrap()
        .map(|Current { count, others }| (count.get(), others[0].get()))
}

async fn hash(counters: &Counters, id: &str) -> Vec<(String, String)> {
    counters
        .store
        .query(redis::cmd("HGETALL").arg(counters.key(id)))
        .await
        .unwrap()
}

async fn take(counters: &Counters, id: &str, n: i64) -> (SagaId, Outcome) {
    let saga = SagaId::new();
    let outcome = counters
        .take(saga, &[(id.to_string(), amount(n))], None)
        .await
        .unwrap();
    (saga, outcome)
}

#[tokio::test]
async fn batch_ids_read_as_the_rule_says_until_their_first_change() {
    let f = fixture();
    batch(&f.counters, 10, 5, 3).await;
    assert_eq!(current(&f.counters, "0").await, Some((5, 3)));
    assert_eq!(current(&f.counters, "9").await, Some((5, 3)));
    // Outside the batch, or not a batch id's spelling: no such item.
    for id in ["10", "09", "a"] {
        assert_eq!(current(&f.counters, id).await, None, "{id}");
    }
    assert!(
        hash(&f.counters, "4").await.is_empty(),
        "nothing written per id"
    );

    // A take materialises the counter with every field; its neighbours stay rules.
    assert_eq!(take(&f.counters, "4", 2).await.1, Outcome::Applied);
    assert_eq!(current(&f.counters, "4").await, Some((3, 3)));
    let fields: std::collections::HashMap<_, _> =
        hash(&f.counters, "4").await.into_iter().collect();
    assert_eq!(fields["stock"], "3");
    assert_eq!(fields["held"], "2");
    assert_eq!(fields["price"], "3");
    assert_eq!(current(&f.counters, "5").await, Some((5, 3)));

    // A plain change does too, and a refused one writes nothing.
    let render = |n: Amount| json!({ "stock": n });
    let added = f
        .counters
        .add("6", amount(4), &IdemKey::random("/t"), render)
        .await
        .unwrap();
    assert_eq!(added.status, 200);
    assert_eq!(current(&f.counters, "6").await, Some((9, 3)));
    let refused = f
        .counters
        .subtract("7", amount(6), &IdemKey::random("/t"), render)
        .await
        .unwrap();
    assert_eq!(refused.status, 400);
    assert!(hash(&f.counters, "7").await.is_empty());
}

#[tokio::test]
async fn a_later_rule_overwrites_what_it_covers_and_nothing_else() {
    let f = fixture();
    batch(&f.counters, 100, 1, 1).await;
    batch(&f.counters, 10, 2, 2).await;
    assert_eq!(current(&f.counters, "5").await, Some((2, 2)));
    assert_eq!(current(&f.counters, "50").await, Some((1, 1)));
    // Changed, then covered again: the new rule wins over the hash.
    assert_eq!(take(&f.counters, "50", 1).await.1, Outcome::Applied);
    assert_eq!(current(&f.counters, "50").await, Some((0, 1)));
    batch(&f.counters, 60, 3, 3).await;
    assert_eq!(current(&f.counters, "5").await, Some((3, 3)));
    assert_eq!(current(&f.counters, "50").await, Some((3, 3)));
    assert_eq!(current(&f.counters, "70").await, Some((1, 1)));
    // Rules covered entirely by a newer one are dropped: 100 and 60 remain.
    let rules: Vec<(String, i64)> = f
        .counters
        .store
        .query(
            redis::cmd("ZRANGE")
                .arg(f.counters.rules_key())
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES"),
        )
        .await
        .unwrap();
    let sizes: Vec<i64> = rules.iter().map(|(_, n)| *n).collect();
    assert_eq!(sizes, vec![60, 100]);
}

#[tokio::test]
async fn what_a_saga_took_is_not_given_back_to_an_overwritten_counter() {
    let f = fixture();
    batch(&f.counters, 10, 10, 1).await;
    let (saga, outcome) = take(&f.counters, "3", 4).await;
    assert_eq!(outcome, Outcome::Applied);
    batch(&f.counters, 10, 7, 1).await;
    assert_eq!(f.counters.give_back(saga).await.unwrap(), Outcome::Applied);
    assert_eq!(current(&f.counters, "3").await, Some((7, 1)));
    // In its own epoch a give-back lands: the rule's value is the base.
    let (saga, _) = take(&f.counters, "3", 2).await;
    assert_eq!(current(&f.counters, "3").await, Some((5, 1)));
    assert_eq!(f.counters.give_back(saga).await.unwrap(), Outcome::Applied);
    assert_eq!(current(&f.counters, "3").await, Some((7, 1)));
    let fields: std::collections::HashMap<_, _> =
        hash(&f.counters, "3").await.into_iter().collect();
    assert_eq!(fields["held"], "0");
}

/// 1000 takes of one batch item, grouped by two processes, with a batch_init
/// landing among them, then every winner given back: the takes decided before
/// the rule give back nothing to it, the ones after give back all they took,
/// so the counter ends exactly at the rule's value.
#[tokio::test]
async fn takes_racing_a_batch_init_give_back_only_to_their_own_epoch() {
    let f = fixture();
    batch(&f.counters, 1, 500, 1).await;
    let other = Arc::new(Counters::new(
        f.counters.store.clone(),
        "item",
        "stock",
        &["price"],
    ));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let counters = if i % 2 == 0 {
            f.counters.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let (saga, outcome) = take(&counters, "0", 1).await;
            (outcome == Outcome::Applied).then_some(saga)
        }));
        if i == 500 {
            let counters = f.counters.clone();
            tasks.push(tokio::spawn(async move {
                batch(&counters, 1, 300, 1).await;
                None
            }));
        }
    }
    let mut won = Vec::new();
    for t in tasks {
        won.extend(t.await.unwrap());
    }
    // 500 before the rule and 300 after it at most; 300 at least.
    assert!((300..=800).contains(&won.len()), "{} takes won", won.len());
    for (i, saga) in won.into_iter().enumerate() {
        let counters = if i % 2 == 0 { &f.counters } else { &other };
        assert_eq!(counters.give_back(saga).await.unwrap(), Outcome::Applied);
    }
    assert_eq!(current(&f.counters, "0").await, Some((300, 1)));
}

/// A rule that is not what this code writes (a field missing) fails the read
/// as corrupt data; it never panics or invents a value.
#[tokio::test]
async fn a_malformed_rule_is_reported_as_corrupt() {
    let f = fixture();
    let _: () = f
        .counters
        .store
        .query(
            redis::cmd("ZADD")
                .arg(f.counters.rules_key())
                .arg(10)
                .arg(r#"{"epoch":"e","count":5,"others":[]}"#),
        )
        .await
        .unwrap();
    let read = f.counters.current("3").await;
    assert!(
        read.as_ref()
            .is_err_and(|e| e.to_string().contains("other fields")),
        "{read:?}"
    );
}
