//! The order HTTP API (see API.md): every number in a path is parsed here,
//! so bad input is refused before anything touches a store. Every POST takes
//! its idempotency key ([`IdemKey`]) and answers a repeat with the first answer.
//!
//! Each route is declared once, with its entry in the OpenAPI document
//! (`#[utoipa::path]`, collected by `routes!`): see [`crate::openapi`].

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::{Json, Router};
use serde_json::{json, Value};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use common::error::ApiError;
use common::idempotency::{self, Answer, IdemKey};
use common::openapi::PositiveAmountParam;
use common::openapi::{AmountParam, BatchDone, BatchSizeParam, ErrorBody, IdParam};
use common::types::{parse_batch_size, Amount, ItemId, OrderId, UserId};

use crate::lookups::Lookups;
use crate::openapi::{CheckedOut, OrderCreated, OrderView};
use crate::orders::{under_checkout, Order};
use crate::saga::{Hold, Orchestrator};
use crate::saga_store::SagaView;

type Result<T> = std::result::Result<T, ApiError>;

pub struct AppState {
    pub saga: Arc<Orchestrator>,
    pub lookups: Lookups,
}

/// The business routes, each with its OpenAPI operation.
pub fn api() -> OpenApiRouter<Arc<AppState>> {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(batch_init))
        .routes(routes!(find))
        .routes(routes!(add_item))
        .routes(routes!(checkout))
        .routes(routes!(saga_status))
}

pub fn router(state: Arc<AppState>) -> Router {
    let (business, _) = api().split_for_parts();
    business
        .with_state(state.clone())
        .merge(common::openapi::serve(&crate::openapi::document()))
        // Operator routes: not in the API document, refused by the gateway.
        .merge(crate::ops::router(state))
}

fn view(id: &OrderId, order: &Order) -> Value {
    json!({
        "order_id": id,
        "paid": order.paid,
        "items": order.items,
        "user_id": order.user_id,
        "total_cost": order.total_cost,
    })
}

#[utoipa::path(post, path = "/create/{user_id}", tag = "order",
    summary = "Create an order for a user: unpaid, no items, total 0",
    params(("user_id" = IdParam, Path)),
    responses(
        (status = 200, description = "created", body = OrderCreated),
        (status = 400, description = "malformed user id or Idempotency-Key", body = ErrorBody),
        (status = 404, description = "no such user (the payment service does not know it)",
            body = ErrorBody),
    ))]
async fn create(
    State(s): State<Arc<AppState>>,
    idem: IdemKey,
    Path(user): Path<String>,
) -> Result<Answer> {
    let user = UserId::parse(&user)?;
    let orders = &s.saga.orders;
    // A repeat gets the first answer without asking payment again.
    if let Some(first) = idempotency::recorded(orders.store(), &idem).await? {
        return Ok(first);
    }
    // An unknown user is an answer (recorded, a 404); payment not answering is not.
    let known = match s.lookups.user(&user).await {
        Err(ApiError::Unavailable(why)) => return Err(ApiError::Unavailable(why)),
        known => known,
    };
    orders.create(user, known, &idem).await
}

#[utoipa::path(post, path = "/batch_init/{n}/{n_items}/{n_users}/{item_price}", tag = "order",
    summary = "Create (overwrite) orders \"0\"..\"n-1\", each for a random user in \
        0..n_users with two random items in 0..n_items of quantity 1",
    params(
        ("n" = BatchSizeParam, Path),
        ("n_items" = BatchSizeParam, Path, description = "at least 1 when n is"),
        ("n_users" = BatchSizeParam, Path, description = "at least 1 when n is"),
        ("item_price" = AmountParam, Path),
    ),
    responses(
        (status = 200, description = "done", body = BatchDone),
        (status = 400, description = "bad numbers or Idempotency-Key", body = ErrorBody),
    ))]
async fn batch_init(
    State(s): State<Arc<AppState>>,
    idem: IdemKey,
    Path((n, n_items, n_users, price)): Path<(String, String, String, String)>,
) -> Result<Answer> {
    let n = parse_batch_size("n", &n)?;
    let n_items = parse_batch_size("n_items", &n_items)?;
    let n_users = parse_batch_size("n_users", &n_users)?;
    let price = Amount::parse("item_price", &price)?;
    let orders = &s.saga.orders;
    idempotency::once_after(orders.store(), &idem, async {
        orders.batch_init(n, n_items, n_users, price).await?;
        Ok(Answer::ok(
            json!({ "msg": format!("batch init for {n} orders successful") }),
        ))
    })
    .await
}

#[utoipa::path(get, path = "/find/{order_id}", tag = "order",
    summary = "An order",
    params(("order_id" = IdParam, Path)),
    responses(
        (status = 200, description = "the order", body = OrderView),
        (status = 400, description = "malformed id", body = ErrorBody),
        (status = 404, description = "no such order", body = ErrorBody),
    ))]
async fn find(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>> {
    let id = OrderId::parse(&id)?;
    let order = s.saga.orders.find(&id).await?;
    Ok(Json(view(&id, &order)))
}

#[utoipa::path(post, path = "/addItem/{order_id}/{item_id}/{quantity}", tag = "order",
    summary = "Add an item: its current price times quantity is added to total_cost",
    params(
        ("order_id" = IdParam, Path),
        ("item_id" = IdParam, Path),
        ("quantity" = PositiveAmountParam, Path),
    ),
    responses(
        (status = 200, description = "the order", body = OrderView),
        (status = 400, description = "bad input, the order is already paid, or its total \
            would overflow", body = ErrorBody),
        (status = 404, description = "no such order, or no such item", body = ErrorBody),
        (status = 409, description = "a checkout of the order is in flight (nothing written)",
            body = ErrorBody),
    ))]
async fn add_item(
    State(s): State<Arc<AppState>>,
    idem: IdemKey,
    Path((id, item, quantity)): Path<(String, String, String)>,
) -> Result<Answer> {
    let id = OrderId::parse(&id)?;
    let item = ItemId::parse(&item)?;
    let quantity = Amount::parse_positive("quantity", &quantity)?;
    let orders = &s.saga.orders;
    // A repeat gets the first answer, whatever happened to the order since.
    if let Some(first) = idempotency::recorded(orders.store(), &idem).await? {
        return Ok(first);
    }
    // What the transaction needs from outside the order store: whether a
    // hold on the order is stale, and the item's price (or why there is none).
    let (mut stale, mut price) = (None, Err(under_checkout(&id)));
    match orders.find(&id).await {
        Ok(order) if !order.paid => match s.saga.hold(&order).await? {
            Hold::Held(_) => {}
            hold => {
                if let Hold::Stale(saga) = hold {
                    stale = Some(saga);
                }
                price = match s.lookups.price(&item).await {
                    Err(ApiError::Unavailable(why)) => return Err(ApiError::Unavailable(why)),
                    other => other,
                };
            }
        },
        Ok(_) | Err(ApiError::NotFound(_)) => {}
        Err(e) => return Err(e),
    }
    let render = |order: &Order| view(&id, order);
    orders
        .add_item(&id, &item, quantity, price, stale, &idem, render)
        .await
}

#[utoipa::path(post, path = "/checkout/{order_id}", tag = "order",
    summary = "Check the order out: take stock for every item and charge total_cost, all or \
        nothing",
    params(("order_id" = IdParam, Path)),
    responses(
        (status = 200, description = "paid (also when it already was: charged once)",
            body = CheckedOut),
        (status = 400, description = "refused: not enough stock or credit (nothing stayed \
            taken), or malformed id", body = ErrorBody),
        (status = 404, description = "no such order", body = ErrorBody),
    ))]
async fn checkout(
    State(s): State<Arc<AppState>>,
    idem: IdemKey,
    Path(id): Path<String>,
) -> Result<Answer> {
    let id = OrderId::parse(&id)?;
    s.saga.checkout(&id, &idem).await
}

#[utoipa::path(get, path = "/saga/{order_id}", tag = "order",
    summary = "For operators: the latest checkout of the order (its saga), with each step",
    description = "The saga holding the order, else the one that paid it (`committed` from \
        its 200 on), else its latest decided checkout. A saga's record is kept 10 minutes after it ended (30 days if it needs \
        attention); after that a paid order still answers with its saga id and `committed` \
        (`retained: false`, no steps), an unpaid one answers 404.",
    params(("order_id" = IdParam, Path)),
    responses(
        (status = 200, description = "the order's latest checkout", body = SagaView),
        (status = 400, description = "malformed id", body = ErrorBody),
        (status = 404, description = "no such order, or it was never checked out (or its \
            last checkout ended more than 10 minutes ago)", body = ErrorBody),
    ))]
async fn saga_status(
    State(s): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SagaView>> {
    let id = OrderId::parse(&id)?;
    Ok(Json(crate::ops::order_saga(&s.saga, &id).await?))
}
