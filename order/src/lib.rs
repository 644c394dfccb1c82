//! The order service: orders, and the orchestrator of the checkout saga.
//!
//! Read top-down: `main.rs` wires it, [`routes`] is the HTTP API,
//! [`saga`] is the whole checkout state machine, [`orders`] and
//! [`saga_store`] are its two stores, [`replies`] routes participants'
//! answers back to the waiting checkout, [`ops`] is what operators see of
//! and do to sagas, [`contention`] tells a saga whether to send its steps at
//! once.

pub mod contention;
pub mod lookups;
pub mod openapi;
pub mod ops;
pub mod orders;
pub mod outbox;
pub mod replies;
pub mod routes;
pub mod saga;
pub mod saga_store;

use std::sync::Arc;

use common::broker::{Broker, QueueKind};
use common::config::{OrderSettings, Settings};
use common::redis_store::{Store, StoreError};
use common::service::{readiness, App};
use lapin::options::BasicAckOptions;

use crate::orders::Orders;
use crate::replies::Replies;
use crate::saga::{Orchestrator, Routing};
use crate::saga_store::SagaStore;

/// The participants' command queues (tests use their own names).
pub struct Queues {
    pub stock: String,
    pub payment: String,
}

/// Builds the service; starts the reply consumer and saga recovery in the background.
pub fn build(
    settings: &Settings,
    order_settings: &OrderSettings,
    queues: Queues,
) -> Result<App, StoreError> {
    let order_store = Arc::new(Store::new(&settings.redis, settings.wait_timeout)?);
    let saga_store = Arc::new(Store::new(
        &order_settings.saga_redis,
        settings.wait_timeout,
    )?);
    let broker = Broker::new(
        &settings.amqp_url,
        settings.queue_type,
        &[&queues.stock, &queues.payment],
    );
    let replies = Arc::new(Replies::default());
    let reply_queue = format!("order.replies.{}", settings.instance_id);
    broker.expect_consumer(&reply_queue);
    tokio::spawn({
        let replies = replies.clone();
        broker.clone().consume(
            reply_queue.clone(),
            QueueKind::Reply,
            settings.prefetch,
            move |delivery| {
                // The reply's span continues the participant's, in the checkout's trace.
                let span = tracing::info_span!("saga.reply", trace_id = tracing::field::Empty);
                common::trace::follow(&span, delivery.properties.headers().as_ref());
                span.in_scope(|| replies.deliver(&delivery.data));
                // Handed over (or nobody waits for it any more): done with it.
                async move {
                    if let Err(e) = delivery.ack(BasicAckOptions::default()).await {
                        tracing::debug!(error = %e, "reply not acknowledged; it will come again");
                    }
                }
            },
        )
    });
    let orders = Arc::new(Orders::new(order_store.clone()));
    // Domain events leave through the outbox the decisions write to.
    tokio::spawn(outbox::relay_forever(
        order_store.clone(),
        broker.clone(),
        settings.instance_id.clone(),
        orders.relay_wake(),
    ));
    let orchestrator = Arc::new(Orchestrator::new(
        orders,
        SagaStore::new(saga_store.clone()),
        broker.clone(),
        replies,
        Routing {
            stock_queue: queues.stock,
            payment_queue: queues.payment,
            reply_queue,
            step_timeout: order_settings.step_timeout,
            checkout_timeout: order_settings.checkout_timeout,
            lease: order_settings.saga_lease,
            step_order: order_settings.step_order,
            instance: settings.instance_id.clone(),
        },
    ));
    tokio::spawn(orchestrator.clone().recover_forever());
    tokio::spawn(orchestrator.clone().renew_leases_forever());
    let state = Arc::new(routes::AppState {
        saga: orchestrator,
        lookups: lookups::Lookups::new(&order_settings.stock_url, &order_settings.payment_url),
    });
    let ready = readiness(vec![order_store, saga_store], broker);
    let metrics = common::telemetry::init_metrics();
    Ok(App {
        router: common::http::with_ops(routes::router(state), ready, metrics),
    })
}
