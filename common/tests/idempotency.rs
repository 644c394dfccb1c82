//! `once_after` (work too large for one MULTI/EXEC, `batch_init`) against a real
//! redis-server: a repeat that arrives while the first request runs waits for its
//! answer instead of running the work again, and a failed run leaves the key free.

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
