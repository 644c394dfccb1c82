//! The saga log against a real redis-server: what must hold however many
//! instances drive one saga.

use std::time::Duration;

use common::error::ApiError;
use common::idempotency::{Answer, IdemKey};
use common::messages::{Line, Step};
use common::types::{Amount, ItemId, OrderId, SagaId, UserId};
use order::saga_store::{
    Begin, Decision, End, Finished, Logged, Progress, Recorded, SagaRecord, SagaState, SagaStore,
    StepLog, RETENTION_SECS,
};
use redis::Value;
use xtask::resp;
use xtask::{free_port, FaultProxy, RedisServer, ScratchDir};

mod support;
use support::direct_store;

/// A saga store on a redis-server of its own (the directory and server live as long as
/// the returned values).
fn scratch_saga_store(name: &str) -> (ScratchDir, RedisServer, SagaStore) {
    let dir = ScratchDir::new(name).unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let sagas = SagaStore::new(direct_store(&redis.url()));
    (dir, redis, sagas)
}

fn record(idem_key: &str) -> SagaRecord {
    SagaRecord {
        id: SagaId::new(),
        order_id: OrderId::parse("o-1").unwrap(),
        user_id: UserId::parse("u-1").unwrap(),
        lines: vec![Line {
            item_id: ItemId::parse("i-1").unwrap(),
            quantity: Amount::new(1).unwrap(),
        }],
        total: Amount::new(5).unwrap(),
        idem: Some((idem_key.to_string(), 600)),
    }
}

/// Two drivers of one saga (the owner was slow and recovery took over) both
/// finish it, each with its own reason: the first answer recorded stands, in
/// the saga record and under the checkout's key, and the second finish
/// returns it instead of its own, so every client hears the same answer.
#[tokio::test]
async fn the_first_answer_of_a_saga_stands() {
    let (_dir, redis, sagas) = scratch_saga_store("saga-store-test");
    let idem_key = "idem:/checkout/o-1:first-answer";
    let saga = record(idem_key);
    let begun = sagas
        .begin(&saga, "instance-a", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        matches!(begun, Begin::Started),
        "begin did not start the saga"
    );

    let refused = |why: &str| Answer::refusal(&ApiError::BadRequest(why.into()));
    let first = refused("checkout refused: payment did not answer in time");
    let second = refused("checkout refused: recovered after its owner stopped");
    let stood = sagas.finish(&saga, Some(&first), "first").await.unwrap();
    assert_eq!(stood, Finished::Answer(first.clone()));
    let stood = sagas.finish(&saga, Some(&second), "second").await.unwrap();
    assert_eq!(
        stood,
        Finished::Answer(first.clone()),
        "a second finish replaced the answer"
    );

    let recorded = redis.command(&["GET", idem_key]).unwrap();
    assert_eq!(
        resp::text(&recorded),
        Some(first.encode()),
        "the checkout's key holds the first answer"
    );
}

/// A checkout's 404 is recorded under its key only where nothing stands: a saga that a
/// request with the same key began meanwhile is not overwritten (its answer will be the
/// key's), unless it ended without one; an answer recorded first stays.
#[tokio::test]
async fn a_404_never_overwrites_what_its_key_recorded_first() {
    let (_dir, redis, sagas) = scratch_saga_store("saga-store-404");
    let idem = IdemKey::from_client("k-404", "/checkout/o-1").unwrap();
    let saga = record(&idem.redis_key());
    let begun = sagas
        .begin(&saga, "instance-a", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(begun, Begin::Started));
    let not_found = Answer::refusal(&ApiError::NotFound("order o-1 not found".into()));
    let stands = sagas
        .record_first_answer(&idem, &not_found, None)
        .await
        .unwrap();
    assert!(
        matches!(stands, Recorded::Saga(id) if id == saga.id),
        "{stands:?}"
    );
    assert_eq!(
        resp::text(&redis.command(&["GET", &idem.redis_key()]).unwrap()),
        Some(format!("saga:{}", saga.id)),
        "the key no longer points at its saga"
    );
    // That saga ends without an answer (abandoned): the 404 is recorded over it, and
    // then stays.
    sagas.finish(&saga, None, "abandoned").await.unwrap();
    let stands = sagas
        .record_first_answer(&idem, &not_found, Some(saga.id))
        .await
        .unwrap();
    assert!(
        matches!(&stands, Recorded::Answer(a) if *a == not_found),
        "{stands:?}"
    );
    let other = Answer::refusal(&ApiError::NotFound("something else".into()));
    let stands = sagas
        .record_first_answer(&idem, &other, None)
        .await
        .unwrap();
    assert!(
        matches!(&stands, Recorded::Answer(a) if *a == not_found),
        "{stands:?}"
    );
}

/// `begin` whose EXEC ran but whose reply was lost is retried by the store;
/// the retry finds the checkout's key pointing at the saga it just wrote and
/// must carry on as that saga (Started), not join it as someone else's
/// (nobody would drive it, and the client would get a 400 after the lease).
#[tokio::test]
async fn a_begin_whose_reply_was_lost_starts_its_own_saga() {
    let dir = ScratchDir::new("saga-store-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let proxy = FaultProxy::start(redis.port()).unwrap();
    let sagas = SagaStore::new(direct_store(&format!("redis://127.0.0.1:{}", proxy.port())));
    let saga = record("idem:/checkout/o-1:lost-begin");
    proxy.drop_reply_after(b"EXEC");
    let begun = sagas
        .begin(&saga, "instance-a", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(proxy.fired(), 1, "the EXEC reply was not dropped");
    assert!(
        matches!(begun, Begin::Started),
        "a retried begin did not recognise its own saga"
    );
}

/// A checkout's saga that waits for an operator (a compensation was dead-lettered) is no
/// longer active, and its order is free again; a repeat of that checkout (same key) joins it
/// and hears that it needs attention. It must not start a second saga under the key: that
/// one could be refused for what the stuck saga still holds, and the refusal would stand.
#[tokio::test]
async fn a_repeat_joins_its_saga_that_needs_attention() {
    let (_dir, _redis, sagas) = scratch_saga_store("saga-store-test");
    let idem_key = "idem:/checkout/o-1:stuck";
    let stuck = record(idem_key);
    let begun = sagas
        .begin(&stuck, "instance-a", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(begun, Begin::Started));
    sagas
        .needs_attention(&stuck, "release dead-lettered", &[])
        .await
        .unwrap();
    let repeat = record(idem_key);
    let begun = sagas
        .begin(&repeat, "instance-b", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(
        matches!(begun, Begin::Joined(id) if id == stuck.id),
        "a repeat started a second saga under a key whose saga needs attention"
    );
    // Once an operator took it over and it ended, a repeat may start again.
    sagas
        .take_over(stuck.id, "operator", Duration::from_secs(5))
        .await
        .unwrap();
    sagas.finish(&stuck, None, "operator").await.unwrap();
    let begun = sagas
        .begin(&record(idem_key), "instance-b", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(begun, Begin::Started));
}

/// A decision that carries its end (nothing left to do: a commit whose settle was sent, an
/// abort that took nothing) ends the saga in the same MULTI/EXEC, exactly as a finish
/// would: the answer under the checkout's key and in the record, no longer active, no lease,
/// the record and the order's pointer living [`RETENTION_SECS`]. A second driver's decision
/// finds it decided and writes nothing; its finish hears the first answer.
#[tokio::test]
async fn a_decision_with_its_end_finishes_the_saga_in_one_write() {
    let (_dir, redis, sagas) = scratch_saga_store("saga-store-test");
    let idem_key = "idem:/checkout/o-1:decided-and-ended";
    // A client's own key: it outlives the record (24 h).
    let saga = SagaRecord {
        idem: Some((idem_key.to_string(), 86_400)),
        ..record(idem_key)
    };
    let begun = sagas
        .begin(&saga, "instance-a", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(matches!(begun, Begin::Started));

    let paid = Answer {
        status: 200,
        body: serde_json::json!({"paid": true}),
    };
    let decision = |answer: &Answer, reason: &str| Decision {
        state: SagaState::Committed,
        held_order: true,
        steps: Vec::new(),
        end: Some(End {
            answer: Some(answer.clone()),
            reason: reason.into(),
            steps: Vec::new(),
        }),
    };
    let logged = sagas
        .decide(&saga, decision(&paid, "committed"))
        .await
        .unwrap();
    assert_eq!(logged, Logged::Now);

    let text = |args: &[&str]| resp::text(&redis.command(args).unwrap());
    let int = |args: &[&str]| match redis.command(args).unwrap() {
        Value::Int(n) => n,
        other => panic!("{args:?}: not an integer: {other:?}"),
    };
    let key = format!("saga:{}", saga.id);
    assert_eq!(text(&["GET", idem_key]), Some(paid.encode()));
    assert_eq!(text(&["HGET", &key, "answer"]), Some(paid.encode()));
    assert_eq!(text(&["HGET", &key, "state"]).as_deref(), Some("COMMITTED"));
    assert!(text(&["HGET", &key, "finished_ms"]).is_some());
    let decided_ms = text(&["HGET", &key, "decided_ms"]);
    assert!(decided_ms.is_some());
    assert_eq!(text(&["GET", "ordersaga:o-1"]), Some(saga.id.to_string()));
    assert!(
        int(&["TTL", idem_key]) > RETENTION_SECS,
        "the key's answer lives as long as the key, not as the record"
    );
    assert_eq!(int(&["SISMEMBER", "sagas:active", &saga.id.to_string()]), 0);
    assert_eq!(int(&["EXISTS", &format!("lease:{}", saga.id)]), 0);
    for lived in [key.clone(), "ordersaga:o-1".to_string()] {
        let ttl = int(&["TTL", &lived]);
        assert!(
            0 < ttl && ttl <= RETENTION_SECS,
            "{lived} lives {ttl} s, not the record's {RETENTION_SECS} s"
        );
    }
    assert!(matches!(
        sagas.progress(saga.id).await.unwrap(),
        Progress::Finished(Some(ref answer)) if *answer == paid
    ));

    // A slow second driver: its decision finds the first, its finish hears the first answer.
    let other = Answer {
        status: 200,
        body: serde_json::json!({"paid": "again"}),
    };
    let logged = sagas
        .decide(&saga, decision(&other, "recovered"))
        .await
        .unwrap();
    assert_eq!(logged, Logged::Before(SagaState::Committed));
    assert_eq!(
        text(&["HGET", &key, "decided_ms"]),
        decided_ms,
        "a second decision wrote"
    );
    let stood = sagas
        .finish(&saga, Some(&other), "recovered")
        .await
        .unwrap();
    assert_eq!(stood, Finished::Answer(paid.clone()));
    assert_eq!(text(&["GET", idem_key]), Some(paid.encode()));
    assert_eq!(
        text(&["HGET", &key, "reason"]).as_deref(),
        Some("committed")
    );
}

/// A finished saga's record stays one compact listpack in Redis (~0.9 KB), although its
/// order lines and step logs pass Redis' default 64-byte limit for one: the project's
/// Redis nodes raise that limit (`hash-max-ziplist-value`, `xtask/src/redis.rs`), and a
/// hashtable would take more than twice the memory for the ten minutes a record is kept.
#[tokio::test]
async fn a_finished_saga_record_is_one_listpack() {
    let (_dir, redis, sagas) = scratch_saga_store("saga-store-test");
    let idem_key = "idem:/checkout/o-1:compact-record";
    let lines: Vec<Line> = ["item-one", "item-two", "item-three"]
        .iter()
        .map(|id| Line {
            item_id: ItemId::parse(id).unwrap(),
            quantity: Amount::new(2).unwrap(),
        })
        .collect();
    let saga = SagaRecord {
        lines,
        ..record(idem_key)
    };
    assert!(
        serde_json::to_string(&saga.lines).unwrap().len() > 64,
        "the lines must pass the default limit for this test to mean anything"
    );
    sagas
        .begin(&saga, "instance-a", Duration::from_secs(5))
        .await
        .unwrap();
    let now = 1_795_559_548_745;
    let step = |step, outcome| StepLog::new(step, outcome, None, now, now + 20);
    let paid = Answer {
        status: 200,
        body: serde_json::json!({"order_id": "o-1", "paid": true}),
    };
    let decision = Decision {
        state: SagaState::Committed,
        held_order: true,
        steps: vec![
            step(Step::Reserve, "applied"),
            step(Step::Charge, "applied"),
        ],
        end: Some(End {
            answer: Some(paid),
            reason: "committed".into(),
            steps: vec![step(Step::Settle, "sent")],
        }),
    };
    assert_eq!(sagas.decide(&saga, decision).await.unwrap(), Logged::Now);

    let key = format!("saga:{}", saga.id);
    let values = redis.command(&["HVALS", &key]).unwrap();
    let longest = resp::items(&values)
        .iter()
        .filter_map(resp::text)
        .map(|v| v.len())
        .max()
        .unwrap_or(0);
    assert!(
        longest > 64,
        "no value of the record passed 64 bytes ({longest})"
    );
    let encoding = resp::text(&redis.command(&["OBJECT", "ENCODING", &key]).unwrap());
    assert!(
        // Redis 7 says listpack, Redis 6 ziplist.
        matches!(encoding.as_deref(), Some("listpack" | "ziplist")),
        "the finished record {key} is {encoding:?}, not one listpack"
    );
}

/// Recovery aborted a saga and ended it without an answer (its owner was away), so the
/// client's retry with the same key began a second saga, which committed and recorded its
/// 200 under the key. The first saga's owner comes back and finishes it with its own
/// refusal: that refusal is the first saga's, not the key's. The key keeps the 200, or
/// a repeat would answer 400 for an order its key paid.
#[tokio::test]
async fn a_late_finish_never_overwrites_the_answer_of_its_keys_next_saga() {
    let (_dir, redis, sagas) = scratch_saga_store("saga-store-late-finish");
    let idem_key = "idem:/checkout/o-1:retried";
    let lease = Duration::from_secs(5);
    let first = record(idem_key);
    assert!(matches!(
        sagas.begin(&first, "instance-a", lease).await.unwrap(),
        Begin::Started
    ));
    let aborted = Decision {
        state: SagaState::Aborted,
        held_order: true,
        steps: Vec::new(),
        end: None,
    };
    assert_eq!(sagas.decide(&first, aborted).await.unwrap(), Logged::Now);
    // Recovery ends it; recovery answers nobody.
    assert_eq!(
        sagas.finish(&first, None, "recovered").await.unwrap(),
        Finished::Nothing
    );

    let second = SagaRecord {
        id: SagaId::new(),
        ..first.clone()
    };
    assert!(matches!(
        sagas.begin(&second, "instance-b", lease).await.unwrap(),
        Begin::Started
    ));
    // While the second saga runs, the first one's late finish answers nothing of its own:
    // the key's answer will be the second saga's.
    let refused = Answer::refusal(&ApiError::BadRequest("checkout refused".into()));
    assert_eq!(
        sagas
            .finish(&first, Some(&refused), "the owner's own end")
            .await
            .unwrap(),
        Finished::KeyMoved
    );
    assert_eq!(
        resp::text(&redis.command(&["GET", idem_key]).unwrap()),
        Some(format!("saga:{}", second.id)),
        "a late finish of the first saga took the key back"
    );
    let paid = Answer {
        status: 200,
        body: serde_json::json!({"paid": true}),
    };
    let committed = Decision {
        state: SagaState::Committed,
        held_order: true,
        steps: Vec::new(),
        end: Some(End {
            answer: Some(paid.clone()),
            reason: "committed".into(),
            steps: Vec::new(),
        }),
    };
    assert_eq!(sagas.decide(&second, committed).await.unwrap(), Logged::Now);

    // Once the second saga answered, a late finish of the first hears that answer, and
    // the key keeps it.
    let late = sagas
        .finish(&first, Some(&refused), "the owner's own end")
        .await
        .unwrap();
    assert_eq!(
        late,
        Finished::Answer(paid.clone()),
        "what the key stands for"
    );
    assert_eq!(
        resp::text(&redis.command(&["GET", idem_key]).unwrap()),
        Some(paid.encode()),
        "a late finish of the first saga overwrote the key's answer"
    );
    // The first saga's record holds no answer of its own: a request still waiting on it
    // looks at the key again.
    assert_eq!(
        resp::text(
            &redis
                .command(&["HGET", &format!("saga:{}", first.id), "answer"])
                .unwrap()
        ),
        None
    );
}

/// An operator's retry or abort of a saga whose record expired since the operator looked
/// writes nothing: written anyway, its fields would make a partial record without a
/// lifetime, active for ever and never loadable by recovery.
#[tokio::test]
async fn taking_over_an_expired_saga_writes_nothing() {
    let (_dir, redis, sagas) = scratch_saga_store("saga-store-take-over");
    let gone = SagaId::new();
    let lease = Duration::from_secs(5);
    assert!(!sagas.take_over(gone, "operator", lease).await.unwrap());
    let keys = redis.command(&["KEYS", "*"]).unwrap();
    assert!(
        matches!(&keys, Value::Array(k) if k.iter().all(|k| resp::text(k).as_deref() == Some("durability:mark"))),
        "{keys:?}"
    );
    // A saga that is there is taken over.
    let saga = record("idem:/checkout/o-1:taken-over");
    sagas.begin(&saga, "instance-a", lease).await.unwrap();
    assert!(sagas.take_over(saga.id, "operator", lease).await.unwrap());
    assert_eq!(
        resp::text(
            &redis
                .command(&["GET", &format!("lease:{}", saga.id)])
                .unwrap()
        ),
        Some("operator".to_string())
    );
}

/// A saga handed to an operator again (a retry that failed again) keeps the deadline of
/// its first hand-over: extended, it would outlive what the participants keep of what it
/// took, and a later give-back would find nothing to give back.
#[tokio::test]
async fn a_saga_needing_attention_again_keeps_its_first_deadline() {
    let (_dir, redis, sagas) = scratch_saga_store("saga-store-attention");
    let saga = record("idem:/checkout/o-1:attention-twice");
    sagas
        .begin(&saga, "instance-a", Duration::from_secs(5))
        .await
        .unwrap();
    let deadline = || match redis
        .command(&["EXPIRETIME", &format!("saga:{}", saga.id)])
        .unwrap()
    {
        Value::Int(at) => at,
        other => panic!("{other:?}"),
    };
    sagas.needs_attention(&saga, "first", &[]).await.unwrap();
    let first = deadline();
    assert!(first > 0, "the record got its lifetime");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    sagas.needs_attention(&saga, "again", &[]).await.unwrap();
    assert_eq!(deadline(), first);
}

/// A participant keeps what a saga took for longer than the saga store keeps a saga that
/// needs an operator, so an operator's late retry or abort still gives it back (the saga
/// is handed to an operator minutes after its take, well inside the margin).
#[test]
fn what_a_saga_took_outlives_a_saga_that_needs_an_operator() {
    assert!(common::counters::TAKEN_TTL_SECS > order::saga_store::ATTENTION_RETENTION_SECS as u64);
}
