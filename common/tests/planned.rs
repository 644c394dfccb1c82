//! Transactions committed together ([`Planned`]) against a real redis-server:
//! each plan decides as if it ran alone, plans on one key never decide on the
//! same value, two processes' groups on one key are arbitrated by WATCH, a
//! corrupt value fails its own plan only, and concurrent plans share EXECs.

use std::sync::Arc;

use common::redis_store::{next_reply, Plan, Planned, Store, StoreError, Tx};

mod support;
use support::{execs, Fixture};

fn fixture() -> Fixture {
    Fixture::start("planned-test")
}

fn store(f: &Fixture) -> Arc<Store> {
    f.store()
}

/// Read-check-write: adds 1 to `key` while it is below `limit`; true if it did.
fn increment_below(key: &str, limit: i64) -> Plan<bool> {
    let key = key.to_string();
    let mut reads = redis::pipe();
    reads.get(&key);
    Plan {
        watch: vec![key.clone()],
        also_touches: Vec::new(),
        reads,
        decide: Box::new(move |replies| {
            let now: Option<i64> = next_reply(&mut replies.into_iter(), &key)?;
            let now = now.unwrap_or(0);
            if now >= limit {
                return Ok(Tx::Abort(false));
            }
            let mut writes = redis::pipe();
            writes.set(&key, now + 1).ignore();
            Ok(Tx::Commit(writes, true))
        }),
    }
}

async fn get(store: &Store, key: &str) -> Option<String> {
    store.query(redis::cmd("GET").arg(key)).await.unwrap()
}

#[tokio::test]
async fn concurrent_plans_on_distinct_keys_share_transactions() {
    let f = fixture();
    let store = store(&f);
    let planned = Arc::new(Planned::start(store.clone()));
    let runs: Vec<_> = (0..200)
        .map(|i| {
            let planned = planned.clone();
            tokio::spawn(async move { planned.run(increment_below(&format!("k{i}"), 1)).await })
        })
        .collect();
    for run in runs {
        assert!(
            run.await.unwrap().unwrap(),
            "a plan on its own key was not applied"
        );
    }
    for i in 0..200 {
        assert_eq!(get(&store, &format!("k{i}")).await.as_deref(), Some("1"));
    }
    let execs = execs(&store).await;
    println!("200 plans: {execs} transactions");
    assert!(execs < 200, "no plan shared a transaction: {execs} EXECs");
}

#[tokio::test]
async fn plans_on_one_key_in_two_processes_never_decide_on_the_same_value() {
    let f = fixture();
    let processes = [
        Arc::new(Planned::start(store(&f))),
        Arc::new(Planned::start(store(&f))),
    ];
    // 400 read-check-writes on one key, a few distinct ones between them so
    // that groups form: exactly 100 may add.
    let runs: Vec<_> = (0..400)
        .map(|i| {
            let planned = processes[i % 2].clone();
            tokio::spawn(async move {
                let hot = planned.run(increment_below("hot", 100));
                let other = planned.run(increment_below(&format!("o{i}"), 1));
                let (hot, other) = tokio::join!(hot, other);
                assert!(other.unwrap());
                hot.unwrap()
            })
        })
        .collect();
    let mut added = 0;
    for run in runs {
        if run.await.unwrap() {
            added += 1;
        }
    }
    assert_eq!(added, 100);
    assert_eq!(get(&store(&f), "hot").await.as_deref(), Some("100"));
}

#[tokio::test]
async fn a_corrupt_value_fails_its_own_plan_only() {
    let f = fixture();
    let store = store(&f);
    let _: () = store
        .query(redis::cmd("SET").arg("bad").arg("not a number"))
        .await
        .unwrap();
    let planned = Arc::new(Planned::start(store.clone()));
    let runs: Vec<_> = ["a", "bad", "b"]
        .into_iter()
        .map(|key| {
            let planned = planned.clone();
            tokio::spawn(async move { planned.run(increment_below(key, 10)).await })
        })
        .collect();
    let mut results = Vec::new();
    for run in runs {
        results.push(run.await.unwrap());
    }
    assert!(matches!(results[0], Ok(true)), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(StoreError::Corrupt { .. })),
        "{:?}",
        results[1]
    );
    assert!(matches!(results[2], Ok(true)), "{:?}", results[2]);
    assert_eq!(get(&store, "a").await.as_deref(), Some("1"));
    assert_eq!(get(&store, "bad").await.as_deref(), Some("not a number"));
}
