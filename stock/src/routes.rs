//! The stock HTTP API (see API.md): every number in a path is parsed here,
//! so bad input is refused before anything touches the store. Every POST
//! takes its idempotency key ([`IdemKey`]) and answers a repeat with the
//! first answer.
//!
//! Each route is declared once, with its entry in the OpenAPI document
//! (`#[utoipa::path]`, collected by `routes!`): see [`crate::openapi`].

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::{Json, Router};
use serde_json::json;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use common::error::ApiError;
use common::idempotency::{Answer, IdemKey};
use common::openapi::PositiveAmountParam;
use common::openapi::{AmountParam, BatchDone, BatchSizeParam, ErrorBody, IdParam};
use common::types::{parse_batch_size, Amount, ItemId};

use crate::items::{Item, Items};
use crate::openapi::{ItemCreated, ItemFound, StockLevel};

type Result<T> = std::result::Result<T, ApiError>;

/// The business routes, each with its OpenAPI operation.
pub fn api() -> OpenApiRouter<Arc<Items>> {
    OpenApiRouter::new()
        .routes(routes!(create))
        .routes(routes!(batch_init))
        .routes(routes!(find))
        .routes(routes!(add))
        .routes(routes!(subtract))
}

pub fn router(items: Arc<Items>) -> Router {
    let (business, _) = api().split_for_parts();
    business
        .with_state(items)
        .merge(common::openapi::serve(&crate::openapi::document()))
}

#[utoipa::path(post, path = "/item/create/{price}", tag = "stock",
    summary = "Create an item with stock 0",
    params(("price" = AmountParam, Path)),
    responses(
        (status = 200, description = "created", body = ItemCreated),
        (status = 400, description = "bad price or Idempotency-Key", body = ErrorBody),
    ))]

async fn create(
    State(items): State<Arc<Items>>,
    idem: IdemKey,
    Path(price): Path<String>,
) -> Result<Answer> {
    let price = Amount::parse("price", &price)?;
    items.create(price, &idem).await
}

#[utoipa::path(post, path = "/batch_init/{n}/{starting_stock}/{item_price}", tag = "stock",
    summary = "Create (overwrite) items \"0\"..\"n-1\"",
    params(
        ("n" = BatchSizeParam, Path),
        ("starting_stock" = AmountParam, Path),
        ("item_price" = AmountParam, Path),
    ),
    responses(
        (status = 200, description = "done", body = BatchDone),
        (status = 400, description = "bad numbers or Idempotency-Key", body = ErrorBody),
    ))]
async fn batch_init(
    State(items): State<Arc<Items>>,
    idem: IdemKey,
    Path((n, stock, price)): Path<(String, String, String)>,
) -> Result<Answer> {
    let n = parse_batch_size("n", &n)?;
    let stock = Amount::parse("starting_stock", &stock)?;
    let price = Amount::parse("item_price", &price)?;
    items.batch_init(n, stock, price, &idem).await
}

#[utoipa::path(get, path = "/find/{item_id}", tag = "stock",
    summary = "An item's stock and price",
    params(("item_id" = IdParam, Path)),
    responses(
        (status = 200, description = "the item", body = ItemFound),
        (status = 400, description = "malformed id", body = ErrorBody),
        (status = 404, description = "no such item", body = ErrorBody),
    ))]
async fn find(State(items): State<Arc<Items>>, Path(id): Path<String>) -> Result<Json<Item>> {
    let id = ItemId::parse(&id)?;
    Ok(Json(items.find(&id).await?))
}

#[utoipa::path(post, path = "/add/{item_id}/{amount}", tag = "stock",
    summary = "Add stock",
    params(("item_id" = IdParam, Path), ("amount" = PositiveAmountParam, Path)),
    responses(
        (status = 200, description = "the new stock", body = StockLevel),
        (status = 400, description = "bad input, or the stock would not fit in an i64 \
            together with what may be given back to it", body = ErrorBody),
        (status = 404, description = "no such item", body = ErrorBody),
    ))]
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

#[utoipa::path(post, path = "/subtract/{item_id}/{amount}", tag = "stock",
    summary = "Take stock",
    params(("item_id" = IdParam, Path), ("amount" = PositiveAmountParam, Path)),
    responses(
        (status = 200, description = "the new stock", body = StockLevel),
        (status = 400, description = "bad input, or not enough stock (nothing changes)",
            body = ErrorBody),
        (status = 404, description = "no such item", body = ErrorBody),
    ))]
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
