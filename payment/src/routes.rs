//! The payment HTTP API (see API.md): every number in a path is parsed here,
//! so bad input is refused before anything touches the store. Every POST
//! takes its idempotency key ([`IdemKey`]) and answers a repeat with the
//! first answer.
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
use common::idempotency::{Answer, IdemKey};
use common::openapi::PositiveAmountParam;
use common::openapi::{AmountParam, BatchDone, BatchSizeParam, ErrorBody, IdParam};
use common::types::{parse_batch_size, Amount, UserId};

use crate::openapi::{Credit, UserCreated};
use crate::users::Users;

type Result<T> = std::result::Result<T, ApiError>;

/// The business routes, each with its OpenAPI operation.
pub fn api() -> OpenApiRouter<Arc<Users>> {
    OpenApiRouter::new()
        .routes(routes!(create_user))
        .routes(routes!(batch_init))
        .routes(routes!(find_user))
        .routes(routes!(add_funds))
        .routes(routes!(pay))
}

pub fn router(users: Arc<Users>) -> Router {
    let (business, _) = api().split_for_parts();
    business
        .with_state(users)
        .merge(common::openapi::serve(&crate::openapi::document()))
}

#[utoipa::path(post, path = "/create_user", tag = "payment",
    summary = "Create a user with credit 0",
    responses(
        (status = 200, description = "created", body = UserCreated),
        (status = 400, description = "bad Idempotency-Key", body = ErrorBody),
    ))]

async fn create_user(State(users): State<Arc<Users>>, idem: IdemKey) -> Result<Answer> {
    users.create(&idem).await
}

#[utoipa::path(post, path = "/batch_init/{n}/{starting_money}", tag = "payment",
    summary = "Create (overwrite) users \"0\"..\"n-1\"",
    params(("n" = BatchSizeParam, Path), ("starting_money" = AmountParam, Path)),
    responses(
        (status = 200, description = "done", body = BatchDone),
        (status = 400, description = "bad numbers or Idempotency-Key", body = ErrorBody),
    ))]
async fn batch_init(
    State(users): State<Arc<Users>>,
    idem: IdemKey,
    Path((n, money)): Path<(String, String)>,
) -> Result<Answer> {
    let n = parse_batch_size("n", &n)?;
    let money = Amount::parse("starting_money", &money)?;
    users.batch_init(n, money, &idem).await
}

#[utoipa::path(get, path = "/find_user/{user_id}", tag = "payment",
    summary = "A user's credit",
    params(("user_id" = IdParam, Path)),
    responses(
        (status = 200, description = "the user", body = Credit),
        (status = 400, description = "malformed id", body = ErrorBody),
        (status = 404, description = "no such user", body = ErrorBody),
    ))]
async fn find_user(State(users): State<Arc<Users>>, Path(id): Path<String>) -> Result<Json<Value>> {
    let id = UserId::parse(&id)?;
    let credit = users.credit(&id).await?;
    Ok(Json(json!({ "user_id": id, "credit": credit })))
}

#[utoipa::path(post, path = "/add_funds/{user_id}/{amount}", tag = "payment",
    summary = "Add credit",
    params(("user_id" = IdParam, Path), ("amount" = PositiveAmountParam, Path)),
    responses(
        (status = 200, description = "the new credit", body = Credit),
        (status = 400, description = "bad input, or the credit would not fit in an i64 \
            together with what may be given back to it", body = ErrorBody),
        (status = 404, description = "no such user", body = ErrorBody),
    ))]
async fn add_funds(
    State(users): State<Arc<Users>>,
    idem: IdemKey,
    Path((id, amount)): Path<(String, String)>,
) -> Result<Answer> {
    let id = UserId::parse(&id)?;
    let amount = Amount::parse_positive("amount", &amount)?;
    let render = |credit| json!({ "user_id": id, "credit": credit });
    users.counters.add(id.as_str(), amount, &idem, render).await
}

#[utoipa::path(post, path = "/pay/{user_id}/{amount}", tag = "payment",
    summary = "Take credit",
    params(("user_id" = IdParam, Path), ("amount" = PositiveAmountParam, Path)),
    responses(
        (status = 200, description = "the new credit", body = Credit),
        (status = 400, description = "bad input, or not enough credit (nothing changes)",
            body = ErrorBody),
        (status = 404, description = "no such user", body = ErrorBody),
    ))]
async fn pay(
    State(users): State<Arc<Users>>,
    idem: IdemKey,
    Path((id, amount)): Path<(String, String)>,
) -> Result<Answer> {
    let id = UserId::parse(&id)?;
    let amount = Amount::parse_positive("amount", &amount)?;
    let render = |credit| json!({ "user_id": id, "credit": credit });
    users
        .counters
        .subtract(id.as_str(), amount, &idem, render)
        .await
}
