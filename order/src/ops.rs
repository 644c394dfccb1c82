//! What operators see of and do to sagas.
//!
//! - [`order_saga`]: the latest checkout of an order (`GET /saga/{order_id}`, through the
//!   gateway `GET /orders/saga/{order_id}`; the route is in [`crate::routes`], with the API).
//! - [`router`]: the operator routes under `/ops/`, served on each instance and refused by the
//!   gateway (like `/metrics`): they change sagas, so they are not part of the public API.
//!   `cargo xtask sagas` speaks to them.
//!   - `GET /ops/sagas`: the pending sagas and those needing attention, oldest first.
//!   - `GET /ops/sagas/{saga_id}`: one saga.
//!   - `POST /ops/sagas/{saga_id}/retry` and `/abort`: [`Orchestrator::retry`],
//!     [`Orchestrator::abort`]; the answer is the saga as it stands afterwards.
//!
//! Which saga is "the latest checkout" of an order: the one holding it (its `checkout`: a
//! saga not decided yet), else the one that paid it (`paid_by`: `committed` as soon as the
//! order is paid, though the saga store logs it a moment later), else the latest that reached
//! a decision (`ordersaga:<order>` in the saga store, kept as long as that saga's record).
//! Once a saga's record has expired (10 minutes after it ended), a paid order still answers
//! with its saga id and `committed` (`retained: false`, no steps); an unpaid one answers 404,
//! like an order never checked out.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use common::error::ApiError;
use common::types::{OrderId, SagaId};

use crate::routes::AppState;
use crate::saga::Orchestrator;
use crate::saga_store::SagaView;

/// At most this many sagas per list in `GET /ops/sagas` (the oldest).
const LIST_LIMIT: usize = 1000;

type Result<T> = std::result::Result<T, ApiError>;

/// The latest checkout of `order_id`; 404 if it has none (never checked out, or long ago).
pub async fn order_saga(orchestrator: &Orchestrator, order_id: &OrderId) -> Result<SagaView> {
    let order = orchestrator.orders.find(order_id).await?;
    let sagas = orchestrator.sagas();
    let latest = match (order.checkout, order.paid_by) {
        (Some(holding), _) => holding,
        // A paid order's last checkout is the one that paid it: the saga store logs
        // the commit only after the 200 and the settle, so its pointer may lag.
        (None, Some(paid_by)) => {
            return match sagas.view(paid_by).await? {
                Some(view) => Ok(view.paid_the_order()),
                None => Ok(SagaView::expired_commit(order_id, paid_by)),
            };
        }
        (None, None) => match sagas.latest_of_order(order_id).await? {
            Some(decided) => decided,
            None => return Err(never_checked_out(order_id)),
        },
    };
    match sagas.view(latest).await? {
        Some(view) => Ok(view),
        None => Err(never_checked_out(order_id)),
    }
}

fn never_checked_out(order_id: &OrderId) -> ApiError {
    ApiError::NotFound(format!(
        "order {order_id} has no checkout on record (never checked out, or its last \
         checkout ended more than 10 minutes ago)"
    ))
}

/// The operator routes (see the module's documentation).
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ops/sagas", get(list))
        .route("/ops/sagas/{saga_id}", get(one))
        .route("/ops/sagas/{saga_id}/retry", post(retry))
        .route("/ops/sagas/{saga_id}/abort", post(abort))
        .with_state(state)
}

fn saga_id(text: &str) -> Result<SagaId> {
    text.parse()
        .map_err(|_| ApiError::BadRequest(format!("{text:?} is not a saga id (a UUID)")))
}

async fn list(State(s): State<Arc<AppState>>) -> Result<Json<Value>> {
    let list = s.saga.sagas().list(LIST_LIMIT).await?;
    Ok(Json(json!(list)))
}

async fn one(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<SagaView>> {
    let id = saga_id(&id)?;
    Ok(Json(view(&s.saga, id).await?))
}

async fn retry(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<SagaView>> {
    let id = saga_id(&id)?;
    s.saga.retry(id).await?;
    Ok(Json(view(&s.saga, id).await?))
}

async fn abort(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<SagaView>> {
    let id = saga_id(&id)?;
    s.saga.abort(id).await?;
    Ok(Json(view(&s.saga, id).await?))
}

async fn view(orchestrator: &Orchestrator, id: SagaId) -> Result<SagaView> {
    orchestrator
        .sagas()
        .view(id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("saga {id} not found (or expired)")))
}
