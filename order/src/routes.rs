//! The order HTTP API (see API.md): every number in a path is parsed here,
//! so bad input is refused before anything touches a store. Every POST takes
//! its idempotency key ([`IdemKey`]) and answers a repeat with the first answer.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use common::error::ApiError;
use common::idempotency::{self, Answer, IdemKey};
use common::types::{parse_batch_size, Amount, ItemId, OrderId, UserId};

use crate::orders::{under_checkout, Order};
use crate::saga::{Hold, Orchestrator};
use crate::stock_client::StockClient;

type Result<T> = std::result::Result<T, ApiError>;

pub struct AppState {
    pub saga: Arc<Orchestrator>,
    pub stock: StockClient,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/create/{user_id}", post(create))
        .route(
            "/batch_init/{n}/{n_items}/{n_users}/{item_price}",
            post(batch_init),
        )
        .route("/find/{order_id}", get(find))
        .route("/addItem/{order_id}/{item_id}/{quantity}", post(add_item))
        .route("/checkout/{order_id}", post(checkout))
        .with_state(state)
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

async fn create(
    State(s): State<Arc<AppState>>,
    idem: IdemKey,
    Path(user): Path<String>,
) -> Result<Answer> {
    let user = UserId::parse(&user)?;
    s.saga.orders.create(user, &idem).await
}

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

async fn find(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>> {
    let id = OrderId::parse(&id)?;
    let order = s.saga.orders.find(&id).await?;
    Ok(Json(view(&id, &order)))
}

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
                price = match s.stock.price(&item).await {
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

async fn checkout(
    State(s): State<Arc<AppState>>,
    idem: IdemKey,
    Path(id): Path<String>,
) -> Result<Answer> {
    let id = OrderId::parse(&id)?;
    s.saga.checkout(&id, &idem).await
}
