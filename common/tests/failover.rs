//! A Sentinel failover under writes: the master is killed with SIGKILL, the
//! store keeps retrying until the Sentinels promote the replica, and every
//! acknowledged write is still there afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::counters::Counters;
use common::redis_store::{RedisTarget, Store};
use common::types::Amount;
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
    seed.hset(counters.key("u"), "credit", 0).ignore();
    store.write(&seed).await.unwrap();

    let one = Amount::new(1).unwrap();
    let mut acknowledged = 0i64;
    for _ in 0..50 {
        counters.add("u", one).await.unwrap();
        acknowledged += 1;
    }
    master.kill9();
    let killed_at = Instant::now();
    let mut first_success_after_kill = None;
    let mut failures = 0;
    while killed_at.elapsed() < Duration::from_secs(12) {
        match counters.add("u", one).await {
            Ok(_) => {
                acknowledged += 1;
                first_success_after_kill.get_or_insert(killed_at.elapsed());
            }
            Err(_) => failures += 1,
        }
        if acknowledged >= 150 {
            break;
        }
    }
    let recovered = first_success_after_kill.expect("writes never resumed after the failover");
    println!("writes resumed {recovered:?} after SIGKILL of the master ({failures} failed calls)");
    assert!(recovered < Duration::from_secs(10), "took {recovered:?}");
    let credit: i64 = store
        .query(redis::cmd("HGET").arg(counters.key("u")).arg("credit"))
        .await
        .unwrap();
    // Every acknowledged increment is there. (A write whose answer was lost in
    // the failover may have landed too, so the count may be higher, never lower.)
    assert!(
        credit >= acknowledged,
        "{credit} < {acknowledged} acknowledged"
    );
    assert_eq!(
        sentinels[0].master_port("data").unwrap(),
        Some(replica.port()),
        "the replica was promoted"
    );
}
