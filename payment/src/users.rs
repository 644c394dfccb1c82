//! Users in the payment store: `user:<id>` is a hash with `credit` (batch
//! users get theirs on their first change; until then the batch rule in
//! `userbatches` says what they are). Credit
//! changes and saga steps go through [`Counters`], which makes every one of
//! them a WATCH/MULTI/EXEC transaction recorded per saga.

use std::sync::Arc;

use common::counters::{new_epoch, Counters, SagaStep};
use common::error::ApiError;
use common::group_commit::Ledger;
use common::idempotency::{self, Answer, IdemKey};
use common::messages::{Action, Command, Outcome};
use common::redis_store::Store;
use common::types::{Amount, UserId};
use serde_json::json;

pub struct Users {
    pub counters: Counters,
}

impl Users {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            counters: Counters::new(store, "user", "credit", &[]),
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

    /// Creates (or overwrites, in a new epoch) users `"0"`..`"n-1"`, once per
    /// idempotency key: one batch rule, not n hashes.
    pub async fn batch_init(
        &self,
        n: i64,
        credit: Amount,
        idem: &IdemKey,
    ) -> Result<Answer, ApiError> {
        idempotency::once(self.store(), idem, || {
            let mut writes = redis::pipe();
            self.counters.init_batch(&mut writes, n, credit, &[]);
            let msg = format!("batch init for {n} users successful");
            (writes, Answer::ok(json!({ "msg": msg })))
        })
        .await
    }

    pub async fn credit(&self, id: &UserId) -> Result<Amount, ApiError> {
        match self.counters.current(id.as_str()).await? {
            Some(current) => Ok(current.count),
            None => Err(ApiError::NotFound(format!("user {id} not found"))),
        }
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
