//! A Sentinel failover under writes: the master is killed with SIGKILL, the
//! store keeps retrying until the Sentinels promote the replica, and every
//! acknowledged write is still there afterwards, and nothing else is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::counters::Counters;
use common::idempotency::IdemKey;
use common::redis_store::{RedisTarget, Store};
use common::types::Amount;
use serde_json::json;
use xtask::{ScratchDir, SentinelSet};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_resume_after_the_master_is_killed_and_none_acknowledged_is_lost() {
    let dir = ScratchDir::new("failover-test").unwrap();
    let SentinelSet {
        mut master,
        replica,
        sentinels,
    } = SentinelSet::start(dir.path(), "data", Duration::from_secs(20)).unwrap();
    let target = RedisTarget::Sentinel {
        sentinels: sentinels.iter().map(|s| s.addr()).collect(),
        master_name: "data".into(),
        password: None,
        sentinel_password: None,
    };
    let store = Arc::new(Store::new(&target, Duration::from_millis(500)).unwrap());
    let counters = Counters::new(store.clone(), "user", "credit");
    let mut seed = redis::pipe();
    counters.init(&mut seed, "u", Amount::ZERO, "e");
    store.write(&seed).await.unwrap();
    let add_one = || {
        let key = IdemKey::random("/add_funds/u/1");
        let counters = &counters;
        async move {
            let answer = counters
                .add(
                    "u",
                    Amount::new(1).unwrap(),
                    &key,
                    |c| json!({ "credit": c }),
                )
                .await?;
            assert_eq!(answer.status, 200, "{answer:?}");
            Ok::<_, common::error::ApiError>(())
        }
    };

    let mut acknowledged = 0i64;
    for _ in 0..50 {
        add_one().await.unwrap();
        acknowledged += 1;
    }
    master.kill9();
    let killed_at = Instant::now();
    let mut first_success_after_kill = None;
    // Calls that returned an error: the store gave up on them (retry budget
    // spent), so whether their increment landed is unknown: 0 or 1 each.
    let mut unknown = 0i64;
    while killed_at.elapsed() < Duration::from_secs(12) {
        match add_one().await {
            Ok(_) => {
                acknowledged += 1;
                first_success_after_kill.get_or_insert(killed_at.elapsed());
            }
            Err(_) => unknown += 1,
        }
        if acknowledged >= 150 {
            break;
        }
    }
    let recovered = first_success_after_kill.expect("writes never resumed after the failover");
    println!(
        "writes resumed {recovered:?} after SIGKILL of the master \
         ({acknowledged} acknowledged, {unknown} failed calls of unknown outcome)"
    );
    assert!(recovered < Duration::from_secs(10), "took {recovered:?}");
    let credit: i64 = store
        .query(redis::cmd("HGET").arg(counters.key("u")).arg("credit"))
        .await
        .unwrap();
    // The increments are sequential (each `add` is awaited before the next
    // starts, from this one task, on a counter seeded at 0), and the master is
    // killed between two of them, so no write is in flight at the kill. Each
    // acknowledged call added exactly 1; each failed call added 0 or 1. So:
    //   acknowledged <= credit <= acknowledged + unknown
    // and with no failed call, credit == acknowledged. Lower means an
    // acknowledged write was lost; higher means a write was applied twice (a
    // retry after an EXEC whose reply was lost) or a refused one landed.
    assert!(
        credit >= acknowledged,
        "acknowledged writes were lost: credit {credit} < {acknowledged} acknowledged"
    );
    assert!(
        credit <= acknowledged + unknown,
        "writes were applied that were not made: credit {credit} > {acknowledged} acknowledged \
         + {unknown} of unknown outcome"
    );
    if unknown == 0 {
        assert_eq!(
            credit, acknowledged,
            "with every call acknowledged, the credit is exactly their count"
        );
    }
    assert_eq!(
        sentinels[0].master_port("data").unwrap(),
        Some(replica.port()),
        "the replica was promoted"
    );
}
