//! The stock HTTP API (see API.md): every number in a path is parsed here,
//! so bad input is refused before anything touches the store. Every POST
//! takes its idempotency key ([`IdemKey`]) and answers a repeat with the
//! first answer.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use common::error::ApiError;
use common::idempotency::{self, Answer, IdemKey};
use common::types::{parse_batch_size, Amount, ItemId};

use crate::items::{Item, Items};

type Result<T> = std::result::Result<T, ApiError>;

pub fn router(items: Arc<Items>) -> Router {
    Router::new()
        .route("/item/create/{price}", post(create))
        .route(
            "/batch_init/{n}/{starting_stock}/{item_price}",
            post(batch_init),
        )
        .route("/find/{item_id}", get(find))
        .route("/add/{item_id}/{amount}", post(add))
        .route("/subtract/{item_id}/{amount}", post(subtract))
        .with_state(items)
}

async fn create(
    State(items): State<Arc<Items>>,
    idem: IdemKey,
    Path(price): Path<String>,
) -> Result<Answer> {
    let price = Amount::parse("price", &price)?;
    items.create(price, &idem).await
}

async fn batch_init(
    State(items): State<Arc<Items>>,
    idem: IdemKey,
    Path((n, stock, price)): Path<(String, String, String)>,
) -> Result<Answer> {
    let n = parse_batch_size("n", &n)?;
    let stock = Amount::parse("starting_stock", &stock)?;
    let price = Amount::parse("item_price", &price)?;
    idempotency::once_after(items.counters.store.as_ref(), &idem, async {
        items.batch_init(n, stock, price).await?;
        Ok(Answer::ok(
            json!({ "msg": format!("batch init for {n} items successful") }),
        ))
    })
    .await
}

async fn find(State(items): State<Arc<Items>>, Path(id): Path<String>) -> Result<Json<Item>> {
    let id = ItemId::parse(&id)?;
    Ok(Json(items.find(&id).await?))
}

async fn add(
    State(items): State<Arc<Items>>,
    idem: IdemKey,
    Path((id, amount)): Path<(String, String)>,
) -> Result<Answer> {
    let id = ItemId::parse(&id)?;
    let amount = Amount::parse_positive("amount", &amount)?;
    let render = |stock| json!({ "item_id": id, "stock": stock });
    items.counters.add(id.as_str(), amount, &idem, render).await
}

async fn subtract(
    State(items): State<Arc<Items>>,
    idem: IdemKey,
    Path((id, amount)): Path<(String, String)>,
) -> Result<Answer> {
    let id = ItemId::parse(&id)?;
    let amount = Amount::parse_positive("amount", &amount)?;
    let render = |stock| json!({ "item_id": id, "stock": stock });
    items
        .counters
        .subtract(id.as_str(), amount, &idem, render)
        .await
}
