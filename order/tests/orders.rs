//! The order's compare-and-sets against a real redis-server, through the
//! fault proxy: what must hold when a transaction ran and its reply was lost.

use common::types::{Amount, OrderId, SagaId};
use order::orders::{Freeze, Orders};
use xtask::{free_port, FaultProxy, RedisServer, ScratchDir};

mod support;
use support::direct_store;

/// A freeze whose EXEC ran but whose reply was lost is retried by the store;
/// the retry finds the order held by the same saga and must answer Frozen,
/// not Held (the checkout would abandon its own saga and leave the hold).
#[tokio::test]
async fn a_freeze_whose_reply_was_lost_is_frozen() {
    let dir = ScratchDir::new("orders-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let proxy = FaultProxy::start(redis.port()).unwrap();
    let orders = Orders::new(direct_store(&format!("redis://127.0.0.1:{}", proxy.port())));
    let id = support::new_order(&orders).await;
    let saga = SagaId::new();
    proxy.drop_reply_after(b"EXEC");
    let frozen = orders.freeze(&id, saga, None).await.unwrap();
    assert_eq!(proxy.fired(), 1, "the EXEC reply was not dropped");
    assert!(
        matches!(frozen, Freeze::Frozen(ref o) if o.checkout == Some(saga)),
        "a retried freeze did not recognise its own hold"
    );
}

/// A Redis of its own holding one order that a new saga froze.
struct Frozen {
    _dir: ScratchDir,
    redis: RedisServer,
    orders: Orders,
    id: OrderId,
    saga: SagaId,
}

async fn frozen_order() -> Frozen {
    let dir = ScratchDir::new("orders-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let orders = Orders::new(direct_store(&redis.url()));
    let id = support::new_order(&orders).await;
    let saga = SagaId::new();
    assert!(matches!(
        orders.freeze(&id, saga, None).await.unwrap(),
        Freeze::Frozen(_)
    ));
    Frozen {
        _dir: dir,
        redis,
        orders,
        id,
        saga,
    }
}

/// Recovery (or an operator) fenced a saga that held the order while its owner's
/// freeze was still being retried (the freeze's EXEC ran, its reply was lost, and the
/// owner's lease lapsed meanwhile). The retry must find the saga fenced, not a free
/// order to freeze again: frozen again, the owner would take stock and credit that the
/// recovery was giving back, and commit an order whose goods went back.
#[tokio::test]
async fn a_saga_fenced_while_it_held_the_order_never_freezes_it_again() {
    let f = frozen_order().await;
    let (orders, id, saga) = (&f.orders, f.id.clone(), f.saga);
    assert!(!orders.fence(&id, saga).await.unwrap(), "nothing committed");
    assert_eq!(
        orders.freeze(&id, saga, None).await.unwrap(),
        Freeze::Fenced,
        "a fenced saga froze the order again"
    );
    assert!(!orders.commit(&id, saga).await.unwrap());
    assert!(
        !orders.fence(&id, saga).await.unwrap(),
        "a repeat is the same"
    );
    // The order is free for the next checkout.
    let next = SagaId::new();
    assert!(matches!(
        orders.freeze(&id, next, None).await.unwrap(),
        Freeze::Frozen(ref o) if o.checkout == Some(next)
    ));
}

/// The owner's own abort (its freeze has returned, so none of this saga can come) takes
/// the hold off and leaves no mark: a key per refused checkout would fill the store.
#[tokio::test]
async fn the_owners_own_fence_leaves_no_mark() {
    let f = frozen_order().await;
    let (orders, id, saga, redis) = (&f.orders, f.id.clone(), f.saga, &f.redis);
    assert!(!orders.fence_own(&id, saga).await.unwrap());
    assert!(
        !orders.commit(&id, saga).await.unwrap(),
        "fenced: never commits"
    );
    let mark = redis
        .command(&["EXISTS", &format!("fence:{saga}")])
        .unwrap();
    assert_eq!(mark, redis::Value::Int(0));
}

/// Recovery (or an operator) may abort a saga whose owner began it but has
/// not frozen the order yet. The fence then finds nothing to take off the
/// order; it leaves a mark instead, so the owner's late freeze is refused:
/// otherwise the owner would go on, take stock and credit, and commit a saga
/// that was already logged as aborted and compensated.
#[tokio::test]
async fn a_saga_fenced_before_it_froze_the_order_never_freezes_it() {
    let dir = ScratchDir::new("orders-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let orders = Orders::new(direct_store(&redis.url()));
    let id = support::new_order(&orders).await;
    let slow = SagaId::new();
    assert!(!orders.fence(&id, slow).await.unwrap(), "nothing committed");
    assert!(
        !orders.fence(&id, slow).await.unwrap(),
        "a repeat is the same"
    );
    assert_eq!(
        orders.freeze(&id, slow, None).await.unwrap(),
        Freeze::Fenced,
        "a fenced saga took the order"
    );
    assert!(!orders.commit(&id, slow).await.unwrap());
    // The mark is the fenced saga's alone: the next checkout takes the order.
    let next = SagaId::new();
    assert!(matches!(
        orders.freeze(&id, next, None).await.unwrap(),
        Freeze::Frozen(ref o) if o.checkout == Some(next)
    ));
    assert!(orders.commit(&id, next).await.unwrap());
    let order = orders.find(&id).await.unwrap();
    assert_eq!(order.paid_by, Some(next));
}

/// A commit is answered 200 and settled before the saga store logs it. Should `batch_init`
/// overwrite the order in between (and the owner die), recovery's fence must still find the
/// saga committed, or it would abort a checkout that was answered 200 and whose settle may
/// have landed; a retried commit (its EXEC reply lost) must find its own commit too. The
/// commit's paid mark says so; a saga that never committed still fences.
#[tokio::test]
async fn a_commit_stands_after_batch_init_overwrote_its_order() {
    let dir = ScratchDir::new("orders-test").unwrap();
    let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
    let orders = Orders::new(direct_store(&redis.url()));
    let amount = |n| Amount::new(n).unwrap();
    orders.batch_init(2, 1, 1, amount(1)).await.unwrap();
    let id = OrderId::parse("0").unwrap();
    let saga = SagaId::new();
    assert!(matches!(
        orders.freeze(&id, saga, None).await.unwrap(),
        Freeze::Frozen(_)
    ));
    assert!(orders.commit(&id, saga).await.unwrap());

    orders.batch_init(2, 1, 1, amount(1)).await.unwrap();
    let reset = orders.find(&id).await.unwrap();
    assert!(!reset.paid && reset.paid_by.is_none() && reset.checkout.is_none());
    assert!(
        orders.fence(&id, saga).await.unwrap(),
        "recovery's fence aborted a committed saga"
    );
    assert!(
        orders.commit(&id, saga).await.unwrap(),
        "a retried commit did not find its own"
    );
    let ttl = redis.command(&["TTL", &format!("paid:{saga}")]).unwrap();
    assert!(
        matches!(ttl, redis::Value::Int(t) if t > 0),
        "the paid mark has no lifetime: {ttl:?}"
    );
    assert_eq!(
        orders.find(&id).await.unwrap(),
        reset,
        "neither changed the order"
    );

    // Another saga that never committed is fenced as ever.
    let other = SagaId::new();
    assert!(matches!(
        orders.freeze(&id, other, None).await.unwrap(),
        Freeze::Frozen(_)
    ));
    assert!(!orders.fence(&id, other).await.unwrap());
    assert_eq!(orders.find(&id).await.unwrap().checkout, None);
}
