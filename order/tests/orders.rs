//! The order's compare-and-sets against a real redis-server, through the
//! fault proxy: what must hold when a transaction ran and its reply was lost.

use common::idempotency::IdemKey;
use common::types::{OrderId, SagaId, UserId};
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
    let created = orders
        .create(
            UserId::parse("u-1").unwrap(),
            &IdemKey::random("/create/u-1"),
        )
        .await
        .unwrap();
    let id = OrderId::parse(created.body["order_id"].as_str().unwrap()).unwrap();
    let saga = SagaId::new();
    proxy.drop_reply_after(b"EXEC");
    let frozen = orders.freeze(&id, saga, None).await.unwrap();
    assert_eq!(proxy.fired(), 1, "the EXEC reply was not dropped");
    assert!(
        matches!(frozen, Freeze::Frozen(ref o) if o.checkout == Some(saga)),
        "a retried freeze did not recognise its own hold"
    );
}
