//! Users in the payment store: `user:<id>` is a hash with `credit`. Credit
//! changes and saga steps go through [`Counters`], which makes every one of
//! them a WATCH/MULTI/EXEC transaction recorded per saga.

use std::sync::Arc;

use common::counters::{new_epoch, Counters, SagaStep};
use common::error::ApiError;
use common::group_commit::Ledger;
use common::idempotency::{self, Answer, IdemKey};
use common::messages::{Action, Command, Outcome};
use common::redis_store::{Store, StoreError};
use common::types::{Amount, UserId};
use serde_json::json;

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

    /// Creates a user with credit 0, once per idempotency key.
    pub async fn create(&self, idem: &IdemKey) -> Result<Answer, ApiError> {
        idempotency::once(self.store(), idem, || {
            let id = UserId::new_random();
            let mut writes = redis::pipe();
            self.counters
                .init(&mut writes, id.as_str(), Amount::ZERO, &new_epoch(), &[]);
            (writes, Answer::ok(json!({ "user_id": id })))
        })
        .await
    }

    /// Creates (or overwrites, in a new epoch) users `"0"`..`"n-1"`, in pipelined chunks.
    pub async fn batch_init(&self, n: i64, credit: Amount) -> Result<(), ApiError> {
        let epoch = new_epoch();
        self.store()
            .write_batch(n, |writes, ids| {
                for i in ids {
                    self.counters
                        .init(writes, &i.to_string(), credit, &epoch, &[]);
                }
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
    fn counters(&self) -> &Counters {
        &self.counters
    }

    fn step(&self, command: &Command) -> Result<SagaStep, Outcome> {
        match &command.action {
            Action::Charge { user_id, amount } => Ok(SagaStep::Take {
                saga: command.saga_id,
                lines: vec![(user_id.as_str().to_string(), *amount)],
                expires_at_ms: command.expires_at_ms,
            }),
            Action::Refund { .. } => Ok(SagaStep::GiveBack(command.saga_id)),
            Action::Settle => Ok(SagaStep::Settle(command.saga_id)),
            other => Err(Outcome::Refused {
                reason: format!("the payment service does not handle {:?}", other.step()),
            }),
        }
    }
}
