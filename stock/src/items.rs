//! Items in the stock store: `item:<id>` is a hash with `stock` and `price`.
//! Stock changes and saga steps go through [`Counters`], which makes every
//! one of them a WATCH/MULTI/EXEC transaction recorded per saga.

use std::sync::Arc;

use common::counters::{new_epoch, Counters, SagaStep};
use common::error::ApiError;
use common::group_commit::Ledger;
use common::idempotency::{self, Answer, IdemKey};
use common::messages::{Action, Command, Line, Outcome};
use common::redis_store::{Store, StoreError};
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
            counters: Counters::new(store, "item", "stock"),
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
            self.init(&mut writes, id.as_str(), Amount::ZERO, price, &new_epoch());
            (writes, Answer::ok(json!({ "item_id": id })))
        })
        .await
    }

    fn init(
        &self,
        writes: &mut redis::Pipeline,
        id: &str,
        stock: Amount,
        price: Amount,
        epoch: &str,
    ) {
        self.counters
            .init(writes, id, stock, epoch, &[("price", price.get())]);
    }

    /// Creates (or overwrites, in a new epoch) items `"0"`..`"n-1"`, in pipelined chunks.
    pub async fn batch_init(&self, n: i64, stock: Amount, price: Amount) -> Result<(), ApiError> {
        let epoch = new_epoch();
        self.store()
            .write_batch(n, |writes, ids| {
                for i in ids {
                    self.init(writes, &i.to_string(), stock, price, &epoch);
                }
            })
            .await?;
        Ok(())
    }

    pub async fn find(&self, id: &ItemId) -> Result<Item, ApiError> {
        let key = self.counters.key(id.as_str());
        let (stock, price): (Option<i64>, Option<i64>) = self
            .store()
            .query(redis::cmd("HMGET").arg(&key).arg("stock").arg("price"))
            .await?;
        match (stock, price) {
            (Some(stock), Some(price)) => Ok(Item {
                stock: Amount::new(stock)
                    .ok_or_else(|| StoreError::corrupt(&key, "negative stock"))?,
                price: Amount::new(price)
                    .ok_or_else(|| StoreError::corrupt(&key, "negative price"))?,
            }),
            _ => Err(ApiError::NotFound(format!("item {id} not found"))),
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
