//! The order's compare-and-sets against a real redis-server, through the
//! fault proxy: what must hold when a transaction ran and its reply was lost.

use common::types::SagaId;
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
