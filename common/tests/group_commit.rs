//! Saga steps applied in groups ([`Counters::apply_steps`] and the
//! participant's [`GroupCommit`]) against a real redis-server: steps decided
//! in order inside one transaction, a bad step failing alone, and concurrent
//! deliveries of two processes sharing transactions without selling one unit
//! too many.

use std::sync::Arc;

use common::counters::{new_epoch, Counters, SagaStep};
use common::group_commit::{Applied, GroupCommit, Ledger};
use common::messages::{Action, Command, Line, Outcome};
use common::redis_store::StoreError;
use common::types::{Amount, ItemId, SagaId};

mod support;
use support::{execs, Fixture};

fn fixture() -> Fixture {
    Fixture::start("group-commit-test")
}

/// Counters over a store of their own: what one participant process has.
fn counters(f: &Fixture) -> Arc<Counters> {
    Arc::new(Counters::new(f.store(), "item", "stock", &[]))
}

fn amount(n: i64) -> Amount {
    Amount::new(n).unwrap()
}

async fn seed(counters: &Counters, id: &str, stock: i64) {
    let mut p = redis::pipe();
    counters.init(&mut p, id, amount(stock), &new_epoch(), &[]);
    counters.store.write(&p).await.unwrap();
}

async fn field(counters: &Counters, id: &str, field: &str) -> i64 {
    let v: Option<i64> = counters
        .store
        .query(redis::cmd("HGET").arg(counters.key(id)).arg(field))
        .await
        .unwrap();
    v.expect("item exists")
}

async fn reset_stats(counters: &Counters) {
    let _: () = counters
        .store
        .query(&redis::cmd("CONFIG").arg("RESETSTAT").clone())
        .await
        .unwrap();
}

fn take(saga: SagaId, id: &str, n: i64) -> SagaStep {
    SagaStep::Take {
        saga,
        lines: vec![(id.to_string(), amount(n))],
        expires_at_ms: None,
    }
}

#[tokio::test]
async fn a_group_decides_its_steps_in_order_in_one_transaction() {
    let f = fixture();
    let c = counters(&f);
    seed(&c, "a", 5).await;
    let (s1, s2, s3, s4) = (SagaId::new(), SagaId::new(), SagaId::new(), SagaId::new());
    let steps = [
        take(s1, "a", 3),
        take(s2, "a", 3), // 2 left: refused
        SagaStep::GiveBack(s1),
        take(s3, "a", 3), // 5 left again
        take(s3, "a", 3), // the same command again: applied once
        SagaStep::Settle(s3),
        SagaStep::GiveBack(s4), // overtakes its command: a tombstone
        take(s4, "a", 1),       // ... which refuses it
    ];
    reset_stats(&c).await;
    let outcomes: Vec<Outcome> = c
        .apply_steps(&steps)
        .await
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        execs(&c.store).await,
        1,
        "one transaction for the whole group"
    );
    assert_eq!(outcomes[0], Outcome::Applied);
    assert!(
        matches!(&outcomes[1], Outcome::Refused { reason } if reason.contains("2 available")),
        "{:?}",
        outcomes[1]
    );
    assert!(
        outcomes[2..7].iter().all(|o| *o == Outcome::Applied),
        "{outcomes:?}"
    );
    assert!(
        matches!(&outcomes[7], Outcome::Refused { reason } if reason.contains("compensated")),
        "{:?}",
        outcomes[7]
    );
    assert_eq!(field(&c, "a", "stock").await, 2);
    assert_eq!(field(&c, "a", "held").await, 0, "s3 settled, s1 given back");
    // What the group recorded answers a redelivery of any of it, in a later group.
    let again = c
        .apply_steps(&[steps[3].clone(), steps[1].clone(), steps[0].clone()])
        .await
        .unwrap();
    assert_eq!(again[0].as_ref().unwrap(), &Outcome::Applied);
    assert_eq!(again[1].as_ref().unwrap(), &outcomes[1]);
    assert!(
        matches!(again[2].as_ref().unwrap(), Outcome::Refused { reason } if reason.contains("compensated")),
        "{:?}",
        again[2]
    );
    assert_eq!(field(&c, "a", "stock").await, 2);
}

#[tokio::test]
async fn a_corrupt_record_fails_its_step_alone() {
    let f = fixture();
    let c = counters(&f);
    seed(&c, "a", 5).await;
    let (good, bad) = (SagaId::new(), SagaId::new());
    let _: () = c
        .store
        .query(
            redis::cmd("SET")
                .arg(format!("itemsaga:{bad}"))
                .arg("garbage"),
        )
        .await
        .unwrap();
    let outcomes = c
        .apply_steps(&[take(good, "a", 2), SagaStep::GiveBack(bad)])
        .await
        .unwrap();
    assert_eq!(outcomes[0].as_ref().unwrap(), &Outcome::Applied);
    assert!(
        matches!(outcomes[1], Err(StoreError::Corrupt { .. })),
        "{:?}",
        outcomes[1]
    );
    assert_eq!(field(&c, "a", "stock").await, 3);
}

/// The stock participant's ledger, over the test's counters.
struct Stock(Arc<Counters>);

impl Ledger for Stock {
    fn counters(&self) -> &Counters {
        &self.0
    }

    fn step(&self, command: &Command) -> Result<SagaStep, Outcome> {
        match &command.action {
            Action::Reserve { lines } => Ok(SagaStep::Take {
                saga: command.saga_id,
                lines: lines
                    .iter()
                    .map(|l| (l.item_id.as_str().to_string(), l.quantity))
                    .collect(),
                expires_at_ms: None,
            }),
            Action::Settle => Ok(SagaStep::Settle(command.saga_id)),
            other => Err(Outcome::Refused {
                reason: format!("not handled: {:?}", other.step()),
            }),
        }
    }
}

fn reserve(saga: SagaId, id: &str) -> Command {
    Command {
        saga_id: saga,
        action: Action::Reserve {
            lines: vec![Line {
                item_id: ItemId::parse(id).unwrap(),
                quantity: amount(1),
            }],
        },
        expires_at_ms: None,
    }
}

#[tokio::test]
async fn a_command_redis_refuses_fails_alone_and_its_group_still_commits() {
    let f = fixture();
    let c = counters(&f);
    seed(&c, "a", 5).await;
    // Not a hash: Redis refuses HMGET on it (WRONGTYPE), failing the group's read.
    let _: () = c
        .store
        .query(redis::cmd("LPUSH").arg(c.key("w")).arg("x"))
        .await
        .unwrap();
    let commits = GroupCommit::start(Arc::new(Stock(c.clone())));
    let charge = Command {
        saga_id: SagaId::new(),
        action: Action::Charge {
            user_id: common::types::UserId::parse("u").unwrap(),
            amount: amount(1),
        },
        expires_at_ms: None,
    };
    let applied = commits
        .apply(vec![
            reserve(SagaId::new(), "a"),
            reserve(SagaId::new(), "w"),
            charge,
        ])
        .await;
    assert_eq!(applied[0], Applied::Done(Outcome::Applied));
    assert!(
        matches!(&applied[1], Applied::Error(why) if why.contains("WRONGTYPE")),
        "{:?}",
        applied[1]
    );
    assert!(
        matches!(&applied[2], Applied::Done(Outcome::Refused { .. })),
        "{:?}",
        applied[2]
    );
    assert_eq!(field(&c, "a", "stock").await, 4);
}

#[tokio::test]
async fn two_processes_grouping_a_thousand_checkouts_of_one_item_sell_exactly_the_stock() {
    let f = fixture();
    let (one, two) = (counters(&f), counters(&f));
    seed(&one, "hot", 100).await;
    reset_stats(&one).await;
    let processes = [
        Arc::new(GroupCommit::start(Arc::new(Stock(one.clone())))),
        Arc::new(GroupCommit::start(Arc::new(Stock(two.clone())))),
    ];
    let started = std::time::Instant::now();
    let deliveries: Vec<_> = (0..1000)
        .map(|i| {
            let commits = processes[i % 2].clone();
            tokio::spawn(async move {
                let saga = SagaId::new();
                let applied = commits.apply(vec![reserve(saga, "hot")]).await;
                (saga, applied)
            })
        })
        .collect();
    let mut sold = Vec::new();
    for d in deliveries {
        let (saga, applied) = d.await.unwrap();
        match &applied[..] {
            [Applied::Done(Outcome::Applied)] => sold.push(saga),
            [Applied::Done(Outcome::Refused { .. })] => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    let execs = execs(&one.store).await;
    println!(
        "1000 reservations of one item in two processes: {:?}, {execs} transactions",
        started.elapsed()
    );
    assert_eq!(sold.len(), 100);
    assert_eq!(field(&one, "hot", "stock").await, 0);
    assert_eq!(field(&one, "hot", "held").await, 100);
    assert!(
        execs < 1000,
        "deliveries shared transactions: {execs} EXECs"
    );
    // Settled from either process, in groups: the holds go, the stock stays sold.
    let settles = sold.iter().enumerate().map(|(i, saga)| {
        let commits = processes[i % 2].clone();
        let settle = Command {
            saga_id: *saga,
            action: Action::Settle,
            expires_at_ms: None,
        };
        async move { commits.apply(vec![settle]).await }
    });
    for applied in futures::future::join_all(settles).await {
        assert_eq!(applied, [Applied::Done(Outcome::Applied)]);
    }
    assert_eq!(field(&one, "hot", "stock").await, 0);
    assert_eq!(field(&one, "hot", "held").await, 0);
}
