//! Users in the payment store: `user:<id>` is a hash with `credit`. Credit
//! changes and saga steps go through [`Counters`], which makes every one of
//! them a WATCH/MULTI/EXEC transaction recorded per saga.

use std::sync::Arc;

use common::counters::Counters;
use common::error::ApiError;
use common::messages::{Action, Command, Outcome};
use common::participant::Ledger;
use common::redis_store::{Store, StoreError};
use common::types::{Amount, UserId};

pub struct Users {
    pub counters: Counters,
}

impl Users {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            counters: Counters::new(store, "user", "credit"),
        }
    }

    fn store(&self) -> &Store {
        &self.counters.store
    }

    pub async fn create(&self) -> Result<UserId, ApiError> {
        let id = UserId::new_random();
        let mut writes = redis::pipe();
        writes
            .hset(self.counters.key(id.as_str()), "credit", 0)
            .ignore();
        self.store().write(&writes).await?;
        Ok(id)
    }

    /// Creates (or overwrites) users `"0"`..`"n-1"`, in pipelined chunks.
    pub async fn batch_init(&self, n: i64, credit: Amount) -> Result<(), ApiError> {
        self.store()
            .write_batch(n, |writes, i| {
                writes
                    .hset(self.counters.key(&i.to_string()), "credit", credit.get())
                    .ignore();
            })
            .await?;
        Ok(())
    }

    pub async fn credit(&self, id: &UserId) -> Result<Amount, ApiError> {
        let key = self.counters.key(id.as_str());
        let credit: Option<i64> = self
            .store()
            .query(redis::cmd("HGET").arg(&key).arg("credit"))
            .await?;
        let credit = credit.ok_or_else(|| ApiError::NotFound(format!("user {id} not found")))?;
        Ok(Amount::new(credit).ok_or_else(|| StoreError::corrupt(&key, "negative credit"))?)
    }
}

impl Ledger for Users {
    async fn apply(&self, command: &Command) -> Result<Outcome, StoreError> {
        match &command.action {
            Action::Charge { user_id, amount } => {
                let line = [(user_id.as_str().to_string(), *amount)];
                self.counters.take(command.saga_id, &line).await
            }
            Action::Refund { user_id, amount } => {
                let line = [(user_id.as_str().to_string(), *amount)];
                self.counters.give_back(command.saga_id, &line).await
            }
            other => Ok(Outcome::Refused {
                reason: format!("the payment service does not handle {:?}", other.step()),
            }),
        }
    }
}
