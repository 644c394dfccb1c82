//! `once_after` (work too large for one MULTI/EXEC, `batch_init`) against a real
//! redis-server: a repeat that arrives while the first request runs waits for its
//! answer instead of running the work again, a failed run leaves the key free, and a
//! claim whose EXEC reply was lost is still this call's own.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::error::ApiError;
use common::idempotency::{once_after, Answer, IdemKey};
use serde_json::json;

mod support;

use support::Fixture;

/// Work that counts its runs, takes a while and answers with its run number.
async fn counted_work(runs: &AtomicUsize) -> Result<Answer, ApiError> {
    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(Answer::ok(json!({ "run": run })))
}

#[tokio::test]
async fn a_repeat_during_the_first_run_waits_for_its_answer() {
    let fixture = Fixture::start("idempotency-repeat");
    let store = fixture.store();
    let runs = Arc::new(AtomicUsize::new(0));
    let key = IdemKey::from_client("k-1", "/batch_init/10/1/1/1").unwrap();
    let calls = (0..4).map(|_| {
        let (store, key, runs) = (store.clone(), key.clone(), runs.clone());
        tokio::spawn(async move { once_after(&store, &key, counted_work(&runs)).await })
    });
    let answers: Vec<Answer> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|joined| joined.unwrap().unwrap())
        .collect();
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the work ran more than once"
    );
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    // Later repeats get the recorded answer; another key is another request.
    let again = once_after(&store, &key, counted_work(&runs)).await.unwrap();
    assert_eq!(again, answers[0]);
    let other = IdemKey::from_client("k-2", "/batch_init/10/1/1/1").unwrap();
    once_after(&store, &other, counted_work(&runs))
        .await
        .unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_failed_run_leaves_the_key_to_the_retry() {
    let fixture = Fixture::start("idempotency-failed");
    let store = fixture.store();
    let key = IdemKey::from_client("k-3", "/batch_init/10/1/1/1").unwrap();
    let failed = once_after(&store, &key, async {
        Err(ApiError::Unavailable("the store went away".into()))
    })
    .await;
    assert!(failed.is_err());
    let runs = AtomicUsize::new(0);
    let retried = once_after(&store, &key, counted_work(&runs)).await.unwrap();
    assert_eq!(retried, Answer::ok(json!({ "run": 1 })));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_claim_whose_exec_reply_was_lost_is_still_ours() {
    let fixture = Fixture::start("idempotency-lost-claim");
    let (proxy, store) = fixture.store_behind_proxy();
    let key = IdemKey::from_client("k-4", "/batch_init/10/1/1/1").unwrap();
    // The claim's EXEC applies, its reply is lost, and the store tries again: that try
    // finds the claim taken, by this very call. Taking it for someone else's would wait
    // for the claim to lapse (10 s) or answer 503.
    proxy.drop_reply_after(b"EXEC");
    let runs = AtomicUsize::new(0);
    let started = std::time::Instant::now();
    let answer = once_after(&store, &key, counted_work(&runs)).await.unwrap();
    assert_eq!(proxy.fired(), 1, "the claim's EXEC reply was not dropped");
    assert_eq!(answer, Answer::ok(json!({ "run": 1 })));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "waited on its own claim for {:?}",
        started.elapsed()
    );
    // Released with the answer: a repeat gets the answer, and no claim is left.
    let held: bool = store
        .query(redis::cmd("EXISTS").arg(format!("claim:{}", key.redis_key())))
        .await
        .unwrap();
    assert!(!held);
}

#[tokio::test]
async fn the_claim_of_a_holder_that_is_gone_is_taken_over_once_it_lapses() {
    let fixture = Fixture::start("idempotency-takeover");
    let store = fixture.store();
    let key = IdemKey::from_client("k-5", "/batch_init/10/1/1/1").unwrap();
    // A claim whose holder died: nobody renews it, so it lapses.
    let _: () = store
        .query(
            redis::cmd("SET")
                .arg(format!("claim:{}", key.redis_key()))
                .arg("a-dead-instance")
                .arg("PX")
                .arg(800),
        )
        .await
        .unwrap();
    let runs = AtomicUsize::new(0);
    let started = std::time::Instant::now();
    let answer = once_after(&store, &key, counted_work(&runs)).await.unwrap();
    assert_eq!(answer, Answer::ok(json!({ "run": 1 })));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // It waited for the claim to lapse (800 ms) before it ran the work (300 ms).
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "ran beside a live claim after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_holder_that_lost_its_claim_stops_and_records_nothing() {
    let fixture = Fixture::start("idempotency-lost");
    let store = fixture.store();
    let key = IdemKey::from_client("k-6", "/batch_init/10/1/1/1").unwrap();
    let claim_key = format!("claim:{}", key.redis_key());
    let finished = Arc::new(AtomicUsize::new(0));
    let long_work = {
        let finished = finished.clone();
        async move {
            tokio::time::sleep(Duration::from_secs(8)).await;
            finished.fetch_add(1, Ordering::SeqCst);
            Ok(Answer::ok(json!({ "run": 1 })))
        }
    };
    let holder = {
        let (store, key) = (store.clone(), key.clone());
        tokio::spawn(async move { once_after(&store, &key, long_work).await })
    };
    // The claim lapses and someone else takes it (as if this holder had stalled).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _: () = store
        .query(
            redis::cmd("SET")
                .arg(&claim_key)
                .arg("someone-else")
                .arg("PX")
                .arg(60_000),
        )
        .await
        .unwrap();
    let outcome = holder.await.unwrap();
    assert!(
        matches!(outcome, Err(ApiError::Unavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "the work ran to its end"
    );
    let recorded: Option<String> = store
        .query(redis::cmd("GET").arg(key.redis_key()))
        .await
        .unwrap();
    assert_eq!(recorded, None);
    // The other holder's claim is untouched.
    let claim: Option<String> = store
        .query(redis::cmd("GET").arg(&claim_key))
        .await
        .unwrap();
    assert_eq!(claim.as_deref(), Some("someone-else"));
}
