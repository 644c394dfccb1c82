//! Exactly-once saga steps, give-backs that always apply, idempotent plain
//! changes and hot-key behaviour of [`Counters`], against a real
//! redis-server started by the project's process kit (and, for lost
//! replies, the kit's fault-injecting proxy in front of it).

use std::sync::Arc;

use common::counters::{new_epoch, Counters};
use common::error::ApiError;
use common::idempotency::{Answer, IdemKey};
use common::messages::Outcome;
use common::types::{Amount, SagaId};
use serde_json::json;
use xtask::faultproxy::Mode;

mod support;

struct Fixture {
    counters: Arc<Counters>,
    _server: support::Fixture,
}

fn amount(n: i64) -> Amount {
    Amount::new(n).unwrap()
}

async fn fixture() -> Fixture {
    let server = support::Fixture::start("counters-test");
    let counters = Arc::new(Counters::new(server.store(), "item", "stock", &[]));
    Fixture {
        counters,
        _server: server,
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

async fn held_of(counters: &Counters, id: &str) -> i64 {
    let v: Option<i64> = counters
        .store
        .query(redis::cmd("HGET").arg(counters.key(id)).arg("held"))
        .await
        .unwrap();
    v.expect("item exists")
}

async fn seed(counters: &Counters, id: &str, stock: i64) {
    let mut p = redis::pipe();
    counters.init(&mut p, id, amount(stock), &new_epoch(), &[]);
    counters.store.write(&p).await.unwrap();
}

fn key() -> IdemKey {
    IdemKey::random("/test")
}

fn render(n: Amount) -> serde_json::Value {
    json!({ "stock": n })
}

async fn add(counters: &Counters, id: &str, n: i64) -> Answer {
    counters.add(id, amount(n), &key(), render).await.unwrap()
}

async fn subtract(counters: &Counters, id: &str, n: i64) -> Answer {
    counters
        .subtract(id, amount(n), &key(), render)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_same_take_delivered_twice_applies_once() {
    let f = fixture().await;
    seed(&f.counters, "a", 10).await;
    let saga = SagaId::new();
    let lines = [("a".to_string(), amount(3))];
    assert_eq!(
        f.counters.take(saga, &lines, None).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        f.counters.take(saga, &lines, None).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(stock_of(&f.counters, "a").await, 7);
    // And the compensation, twice, gives back once.
    assert_eq!(f.counters.give_back(saga).await.unwrap(), Outcome::Applied);
    assert_eq!(f.counters.give_back(saga).await.unwrap(), Outcome::Applied);
    assert_eq!(stock_of(&f.counters, "a").await, 10);
}

#[tokio::test]
async fn a_compensation_before_its_command_leaves_a_tombstone() {
    let f = fixture().await;
    seed(&f.counters, "a", 10).await;
    let saga = SagaId::new();
    let lines = [("a".to_string(), amount(4))];
    assert_eq!(f.counters.give_back(saga).await.unwrap(), Outcome::Applied);
    assert_eq!(stock_of(&f.counters, "a").await, 10, "nothing to give back");
    let late = f.counters.take(saga, &lines, None).await.unwrap();
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
    let outcome = f.counters.take(saga, &lines, None).await.unwrap();
    assert!(
        matches!(outcome, Outcome::Refused { ref reason } if reason.contains("b")),
        "{outcome:?}"
    );
    assert_eq!(stock_of(&f.counters, "a").await, 10);
    assert_eq!(stock_of(&f.counters, "b").await, 1);
    // The refusal is recorded: a redelivery answers the same.
    assert_eq!(f.counters.take(saga, &lines, None).await.unwrap(), outcome);
    // Unknown items are refused too, taking nothing.
    let unknown = [("a".to_string(), amount(1)), ("zz".to_string(), amount(1))];
    assert!(matches!(
        f.counters
            .take(SagaId::new(), &unknown, None)
            .await
            .unwrap(),
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
                    .take(SagaId::new(), &[("hot".to_string(), amount(1))], None)
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
    assert_eq!(subtract(&f.counters, "a", 6).await.status, 400);
    assert_eq!(
        subtract(&f.counters, "a", 5).await,
        Answer::ok(json!({"stock": 0}))
    );
    assert_eq!(add(&f.counters, "a", i64::MAX).await.status, 200);
    assert_eq!(add(&f.counters, "a", 1).await.status, 400);
    assert_eq!(stock_of(&f.counters, "a").await, i64::MAX);
    assert_eq!(add(&f.counters, "missing", 1).await.status, 404);
}

/// The wedge from the field: a reservation, then a legal add, then the
/// release. The add must be refused when the release could not fit after it.
#[tokio::test]
async fn a_give_back_always_fits_after_any_legal_add() {
    let f = fixture().await;
    seed(&f.counters, "a", 5).await;
    let saga = SagaId::new();
    let lines = [("a".to_string(), amount(5))];
    assert_eq!(
        f.counters.take(saga, &lines, None).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        (
            stock_of(&f.counters, "a").await,
            held_of(&f.counters, "a").await
        ),
        (0, 5)
    );
    let refused = add(&f.counters, "a", i64::MAX).await;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert_eq!(stock_of(&f.counters, "a").await, 0, "a refused add wrote");
    assert_eq!(add(&f.counters, "a", i64::MAX - 5).await.status, 200);
    assert_eq!(f.counters.give_back(saga).await.unwrap(), Outcome::Applied);
    assert_eq!(stock_of(&f.counters, "a").await, i64::MAX);
    assert_eq!(held_of(&f.counters, "a").await, 0);
}

/// A committed saga's settle frees the hold: the full range is usable again.
#[tokio::test]
async fn a_settle_releases_the_hold_and_a_later_give_back_changes_nothing() {
    let f = fixture().await;
    seed(&f.counters, "a", 10).await;
    let saga = SagaId::new();
    let lines = [("a".to_string(), amount(3))];
    f.counters.take(saga, &lines, None).await.unwrap();
    assert_eq!(add(&f.counters, "a", i64::MAX - 7).await.status, 400);
    assert_eq!(f.counters.settle(saga).await.unwrap(), Outcome::Applied);
    assert_eq!(f.counters.settle(saga).await.unwrap(), Outcome::Applied);
    assert_eq!(held_of(&f.counters, "a").await, 0);
    assert_eq!(add(&f.counters, "a", i64::MAX - 7).await.status, 200);
    // A give-back of a settled saga is an orchestrator bug: refused, nothing moves.
    let wrong = f.counters.give_back(saga).await.unwrap();
    assert!(matches!(wrong, Outcome::Failed { .. }), "{wrong:?}");
    assert_eq!(stock_of(&f.counters, "a").await, i64::MAX);
}

/// `batch_init` overwrites a counter in a new epoch: a give-back of what was
/// taken from the old one does not land on the new value.
#[tokio::test]
async fn a_give_back_to_an_overwritten_counter_changes_nothing() {
    let f = fixture().await;
    seed(&f.counters, "a", 10).await;
    let saga = SagaId::new();
    f.counters
        .take(saga, &[("a".to_string(), amount(3))], None)
        .await
        .unwrap();
    seed(&f.counters, "a", i64::MAX).await;
    assert_eq!(f.counters.give_back(saga).await.unwrap(), Outcome::Applied);
    assert_eq!(stock_of(&f.counters, "a").await, i64::MAX);
    assert_eq!(held_of(&f.counters, "a").await, 0);
}

/// A forward command met for the first time after its expiry takes nothing,
/// and a redelivery of it later is refused the same way.
#[tokio::test]
async fn an_expired_take_is_refused_and_recorded() {
    let f = fixture().await;
    seed(&f.counters, "a", 10).await;
    let saga = SagaId::new();
    let lines = [("a".to_string(), amount(3))];
    let expired = Some(common::now_ms() - 1);
    for _ in 0..2 {
        let outcome = f.counters.take(saga, &lines, expired).await.unwrap();
        assert!(matches!(outcome, Outcome::Refused { .. }), "{outcome:?}");
    }
    assert_eq!(stock_of(&f.counters, "a").await, 10);
}

/// The same idempotency key twice: applied once, the first answer returned twice.
#[tokio::test]
async fn a_repeated_key_returns_the_first_answer_and_applies_nothing() {
    let f = fixture().await;
    seed(&f.counters, "a", 10).await;
    let k = key();
    let first = f.counters.add("a", amount(5), &k, render).await.unwrap();
    let again = f.counters.add("a", amount(5), &k, render).await.unwrap();
    assert_eq!(first, Answer::ok(json!({"stock": 15})));
    assert_eq!(again, first);
    assert_eq!(stock_of(&f.counters, "a").await, 15);
    // A refusal is a first answer too.
    let k = key();
    let no = f
        .counters
        .subtract("a", amount(99), &k, render)
        .await
        .unwrap();
    assert_eq!(no.status, 400);
    add(&f.counters, "a", 100).await;
    let replay = f
        .counters
        .subtract("a", amount(99), &k, render)
        .await
        .unwrap();
    assert_eq!(replay, no);
    assert_eq!(stock_of(&f.counters, "a").await, 115);
    // Bad keys are a client mistake.
    assert!(matches!(
        IdemKey::from_client("", "/add/a/1"),
        Err(ApiError::BadRequest(_))
    ));
}

/// The EXEC of an add runs on the server but its reply is lost and the
/// connection dies: the store retries. Before idempotency keys the retry
/// re-read the counter and added again; now it finds the recorded answer.
#[tokio::test]
async fn an_add_whose_exec_reply_was_lost_is_applied_once() {
    let fixture = support::Fixture::start("counters-lost-reply");
    let (proxy, store) = fixture.store_behind_proxy();
    let redis = fixture.redis();
    let counters = Counters::new(store, "item", "stock", &[]);
    seed(&counters, "a", 10).await;
    for round in 1..=5 {
        proxy.drop_reply_after(b"EXEC");
        let answer = counters.add("a", amount(1), &key(), render).await.unwrap();
        assert_eq!(proxy.fired(), round, "the fault did not fire");
        assert_eq!(answer, Answer::ok(json!({"stock": 10 + round})));
        let direct: i64 = xtask::resp::text(&redis.command(&["HGET", "item:a", "stock"]).unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(direct, 10 + round as i64, "an add was applied twice");
    }
    proxy.set_mode(Mode::Forward);
}
