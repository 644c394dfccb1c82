//! Items in the stock store: `item:<id>` is a hash with `stock` and `price`
//! (batch items get theirs on their first change; until then the batch rule in
//! `itembatches` says what they are). Stock changes and saga steps go through
//! [`Counters`], which makes every one of them a WATCH/MULTI/EXEC transaction
//! recorded per saga.

use std::sync::Arc;

use common::counters::{new_epoch, Counters, Current, SagaStep};
use common::error::ApiError;
use common::group_commit::Ledger;
use common::idempotency::{self, Answer, IdemKey};
use common::messages::{Action, Command, Line, Outcome};
use common::redis_store::Store;
use common::types::{Amount, ItemId};
use serde::Serialize;
use serde_json::json;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Item {
    pub stock: Amount,
    pub price: Amount,
}

pub struct Items {
    pub counters: Counters,
}

impl Items {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            counters: Counters::new(store, "item", "stock", &["price"]),
        }
    }

    fn store(&self) -> &Store {
        &self.counters.store
    }

    /// Creates an item with stock 0, once per idempotency key.
    pub async fn create(&self, price: Amount, idem: &IdemKey) -> Result<Answer, ApiError> {
        idempotency::once(self.store(), idem, || {
            let id = ItemId::new_random();
            let mut writes = redis::pipe();
            self.counters.init(
                &mut writes,
                id.as_str(),
                Amount::ZERO,
                &new_epoch(),
                &[price],
            );
            (writes, Answer::ok(json!({ "item_id": id })))
        })
        .await
    }

    /// Creates (or overwrites, in a new epoch) items `"0"`..`"n-1"`, once per
    /// idempotency key: one batch rule, not n hashes.
    pub async fn batch_init(
        &self,
        n: i64,
        stock: Amount,
        price: Amount,
        idem: &IdemKey,
    ) -> Result<Answer, ApiError> {
        idempotency::once(self.store(), idem, || {
            let mut writes = redis::pipe();
            self.counters.init_batch(&mut writes, n, stock, &[price]);
            let msg = format!("batch init for {n} items successful");
            (writes, Answer::ok(json!({ "msg": msg })))
        })
        .await
    }

    pub async fn find(&self, id: &ItemId) -> Result<Item, ApiError> {
        match self.counters.current(id.as_str()).await? {
            Some(Current { count, others }) => Ok(Item {
                stock: count,
                price: others[0],
            }),
            None => Err(ApiError::NotFound(format!("item {id} not found"))),
        }
    }
}

fn as_counter_lines(lines: &[Line]) -> Vec<(String, Amount)> {
    lines
        .iter()
        .map(|l| (l.item_id.as_str().to_string(), l.quantity))
        .collect()
}

impl Ledger for Items {
    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn step(&self, command: &Command) -> Result<SagaStep, Outcome> {
        match &command.action {
            Action::Reserve { lines } => Ok(SagaStep::Take {
                saga: command.saga_id,
                lines: as_counter_lines(lines),
                expires_at_ms: command.expires_at_ms,
            }),
            Action::Release { .. } => Ok(SagaStep::GiveBack(command.saga_id)),
            Action::Settle => Ok(SagaStep::Settle(command.saga_id)),
            other => Err(Outcome::Refused {
                reason: format!("the stock service does not handle {:?}", other.step()),
            }),
        }
    }
}
