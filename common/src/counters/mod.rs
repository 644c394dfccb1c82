//! Non-negative counters with exactly-once saga steps: the store logic that
//! stock (an item's `stock`) and payment (a user's `credit`) have in common.
//!
//! Each counter is a Redis hash (`item:7`) with three fields besides whatever
//! else the service keeps there (an item's `price`):
//! - the count itself (`stock` or `credit`);
//! - `held`: what sagas took and may still give back. `count + held` never
//!   exceeds `i64::MAX`, because `add` refuses what would break that. So a
//!   give-back (`count += q, held -= q`) can always be applied, whatever
//!   legal requests came in between;
//! - `epoch`: new each time `batch_init` overwrites the counter. What a saga
//!   took is given back only to the epoch it was taken from: an overwritten
//!   counter starts from the value it was given, not from that plus old holds.
//!
//! This module holds the counters and their plain changes (`add`, `subtract`:
//! HTTP, once per idempotency key); the saga steps (take, give back, settle,
//! applied many at a time, each recorded per saga) are in [`steps`].
//!
//! Work on the same counter is serialised inside the process by
//! [`KeyLocks`]; WATCH then only arbitrates between processes.

mod steps;

use std::sync::Arc;

use serde_json::Value;

use crate::error::ApiError;
use crate::idempotency::{self, Answer, IdemKey};
use crate::keylock::KeyLocks;
use crate::redis_store::{Conn, Store, StoreError};
use crate::types::{Amount, SagaId};

pub use steps::{SagaStep, TOMBSTONE_TTL_SECS};

const HELD: &str = "held";
const EPOCH: &str = "epoch";

/// A counter as stored.
#[derive(Debug, Clone)]
struct State {
    count: Amount,
    held: Amount,
    epoch: String,
}

/// A family of counters: one hash per id under `noun:`, the count in `field`.
pub struct Counters {
    pub store: Arc<Store>,
    locks: KeyLocks,
    /// `"item"` or `"user"`: the key prefix and the word used in messages.
    noun: &'static str,
    /// `"stock"` or `"credit"`.
    field: &'static str,
}

impl Counters {
    pub fn new(store: Arc<Store>, noun: &'static str, field: &'static str) -> Self {
        Self {
            store,
            locks: KeyLocks::default(),
            noun,
            field,
        }
    }

    /// The Redis key of the hash that holds `id`'s counter.
    pub fn key(&self, id: &str) -> String {
        format!("{}:{id}", self.noun)
    }

    fn saga_key(&self, saga: SagaId) -> String {
        format!("{}saga:{saga}", self.noun)
    }

    fn not_found(&self, id: &str) -> ApiError {
        ApiError::NotFound(format!("{} {id} not found", self.noun))
    }

    /// Adds the write that (re)initialises counter `id` to `count` in a new `epoch`
    /// (creation and `batch_init`: nothing is held in a new epoch), together with the
    /// service's `other` fields of the same hash (an item's `price`): one command per
    /// counter, which is what `batch_init` of 100k pays for.
    pub fn init(
        &self,
        writes: &mut redis::Pipeline,
        id: &str,
        count: Amount,
        epoch: &str,
        other: &[(&str, i64)],
    ) {
        let hset = writes
            .cmd("HSET")
            .arg(self.key(id))
            .arg(self.field)
            .arg(count.get())
            .arg(HELD)
            .arg(0)
            .arg(EPOCH)
            .arg(epoch);
        for (field, value) in other {
            hset.arg(*field).arg(*value);
        }
        hset.ignore();
    }

    /// `HMGET` of what a counter's state is made of (see [`Counters::parse_state`]).
    fn read_command(&self, key: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(key).arg(self.field).arg(HELD).arg(EPOCH);
        cmd
    }

    /// A counter's state from the reply to [`Counters::read_command`]: `None` when the id
    /// does not exist, `Err` (why) when the value is not what this code writes.
    fn parse_state(&self, reply: redis::Value) -> Result<Option<State>, String> {
        let (count, held, epoch): (Option<i64>, Option<i64>, Option<String>) =
            redis::from_redis_value(reply).map_err(|e| e.to_string())?;
        let Some(count) = count else {
            return Ok(None);
        };
        let amount = |v: i64, what: &str| Amount::new(v).ok_or_else(|| format!("negative {what}"));
        Ok(Some(State {
            count: amount(count, self.field)?,
            held: amount(held.unwrap_or(0), HELD)?,
            epoch: epoch.unwrap_or_default(),
        }))
    }

    /// Reads a watched counter; `None` when the id does not exist.
    async fn read(&self, conn: &mut Conn, key: &str) -> Result<Option<State>, StoreError> {
        let reply: redis::Value = self
            .read_command(key)
            .query_async(conn)
            .await
            .map_err(StoreError::Redis)?;
        self.parse_state(reply)
            .map_err(|why| StoreError::corrupt(key, why))
    }

    /// `POST add`: adds `amount`, exactly once per idempotency key. Refused
    /// (400) when the count together with what may be given back to it would
    /// not fit in an i64. `render` makes the success body from the new count.
    pub async fn add(
        &self,
        id: &str,
        amount: Amount,
        idem: &IdemKey,
        render: impl Fn(Amount) -> Value,
    ) -> Result<Answer, ApiError> {
        let apply = |state: &State| {
            let new = state.count.checked_add(amount);
            match new.filter(|n| n.checked_add(state.held).is_some()) {
                Some(new) => Ok(new),
                None => Err(ApiError::BadRequest(format!(
                    "adding {amount} to {} {id} would exceed {} ({} is {}, and {} more may be given back by checkouts in flight)",
                    self.noun,
                    i64::MAX,
                    self.field,
                    state.count,
                    state.held
                ))),
            }
        };
        self.change(id, idem, apply, render).await
    }

    /// `POST subtract`/`pay`: subtracts `amount`, exactly once per idempotency
    /// key; refused (400) below zero.
    pub async fn subtract(
        &self,
        id: &str,
        amount: Amount,
        idem: &IdemKey,
        render: impl Fn(Amount) -> Value,
    ) -> Result<Answer, ApiError> {
        let apply = |state: &State| {
            state.count.checked_sub(amount).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "not enough {} for {} {id}: {} available, {amount} asked",
                    self.field, self.noun, state.count
                ))
            })
        };
        self.change(id, idem, apply, render).await
    }

    /// One read-check-write of a counter, with its answer recorded under the
    /// idempotency key in the same MULTI/EXEC. A repeat (a client's retry, or
    /// the store's own retry after an EXEC whose reply was lost) finds the
    /// record inside the WATCH and returns the first answer.
    async fn change(
        &self,
        id: &str,
        idem: &IdemKey,
        apply: impl Fn(&State) -> Result<Amount, ApiError>,
        render: impl Fn(Amount) -> Value,
    ) -> Result<Answer, ApiError> {
        let key = self.key(id);
        let _guard = self.locks.lock([key.as_str()]).await;
        let (key_ref, apply, render) = (&key, &apply, &render);
        idempotency::transact_once(
            &self.store,
            idem,
            std::slice::from_ref(&key),
            |mut conn| async move {
                let decided = async {
                    let mut writes = redis::pipe();
                    let answer = match self.read(&mut conn, key_ref).await? {
                        None => Answer::refusal(&self.not_found(id)),
                        Some(state) => match apply(&state) {
                            Ok(new) => {
                                writes.hset(key_ref, self.field, new.get()).ignore();
                                Answer::ok(render(new))
                            }
                            Err(refusal) => Answer::refusal(&refusal),
                        },
                    };
                    Ok((writes, answer))
                }
                .await;
                (conn, decided)
            },
        )
        .await
    }
}

/// A fresh epoch for counters being (re)initialised.
pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
