//! The payment HTTP API (see API.md): every number in a path is parsed here,
//! so bad input is refused before anything touches the store. Every POST
//! takes its idempotency key ([`IdemKey`]) and answers a repeat with the
//! first answer.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use common::error::ApiError;
use common::idempotency::{self, Answer, IdemKey};
use common::types::{parse_batch_size, Amount, UserId};

use crate::users::Users;

type Result<T> = std::result::Result<T, ApiError>;

pub fn router(users: Arc<Users>) -> Router {
    Router::new()
        .route("/create_user", post(create_user))
        .route("/batch_init/{n}/{starting_money}", post(batch_init))
        .route("/find_user/{user_id}", get(find_user))
        .route("/add_funds/{user_id}/{amount}", post(add_funds))
        .route("/pay/{user_id}/{amount}", post(pay))
        .with_state(users)
}

async fn create_user(State(users): State<Arc<Users>>, idem: IdemKey) -> Result<Answer> {
    users.create(&idem).await
}

async fn batch_init(
    State(users): State<Arc<Users>>,
    idem: IdemKey,
    Path((n, money)): Path<(String, String)>,
) -> Result<Answer> {
    let n = parse_batch_size("n", &n)?;
    let money = Amount::parse("starting_money", &money)?;
    idempotency::once_after(users.counters.store.as_ref(), &idem, async {
        users.batch_init(n, money).await?;
        Ok(Answer::ok(
            json!({ "msg": format!("batch init for {n} users successful") }),
        ))
    })
    .await
}

async fn find_user(State(users): State<Arc<Users>>, Path(id): Path<String>) -> Result<Json<Value>> {
    let id = UserId::parse(&id)?;
    let credit = users.credit(&id).await?;
    Ok(Json(json!({ "user_id": id, "credit": credit })))
}

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
