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
//! `batch_init` writes no hashes: it records a rule that ids `0`..`n-1` start
//! at a value ([`batches`]), and a batch counter gets a hash of its own on its
//! first change.
//!
//! This module holds the counters and their plain changes (`add`, `subtract`:
//! HTTP, once per idempotency key); the saga steps (take, give back, settle,
//! applied many at a time, each recorded per saga) are in [`steps`].
//!
//! Work on the same counter is serialised inside the process by
//! [`KeyLocks`]; WATCH then only arbitrates between processes.

mod batches;
mod steps;

use std::sync::Arc;

use serde_json::Value;

use crate::error::ApiError;
use crate::idempotency::{self, Answer, IdemKey};
use crate::keylock::KeyLocks;
use crate::redis_store::{Conn, Store, StoreError};
use crate::types::{Amount, SagaId};

pub use steps::{SagaStep, TAKEN_TTL_SECS, TOMBSTONE_TTL_SECS};

const HELD: &str = "held";
const EPOCH: &str = "epoch";

/// A counter as read (from its hash, or from the batch rule that covers it).
#[derive(Debug, Clone)]
struct State {
    count: Amount,
    held: Amount,
    epoch: String,
    /// The family's other fields (an item's price), as [`Counters::others`] names them.
    others: Vec<Amount>,
    /// False when the value comes from a batch rule: the first write then
    /// writes every field, making the hash the counter's own.
    in_hash: bool,
}

/// What a client sees of a counter: its count and the family's other fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub count: Amount,
    pub others: Vec<Amount>,
}

/// A family of counters: one hash per id under `noun:`, the count in `field`.
pub struct Counters {
    pub store: Arc<Store>,
    locks: KeyLocks,
    /// `"item"` or `"user"`: the key prefix and the word used in messages.
    noun: &'static str,
    /// `"stock"` or `"credit"`.
    field: &'static str,
    /// The other fields of the hash, set at creation and by `batch_init` (`["price"]`).
    others: &'static [&'static str],
}

impl Counters {
    pub fn new(
        store: Arc<Store>,
        noun: &'static str,
        field: &'static str,
        others: &'static [&'static str],
    ) -> Self {
        Self {
            store,
            locks: KeyLocks::default(),
            noun,
            field,
            others,
        }
    }

    /// The Redis key of the hash that holds `id`'s counter.
    pub fn key(&self, id: &str) -> String {
        format!("{}:{id}", self.noun)
    }

    /// The sorted set of this family's batch rules (see [`batches`]).
    pub fn rules_key(&self) -> String {
        format!("{}batches", self.noun)
    }

    /// The id a counter key names.
    fn id_of<'k>(&self, key: &'k str) -> &'k str {
        key.strip_prefix(self.noun)
            .and_then(|rest| rest.strip_prefix(':'))
            .unwrap_or(key)
    }

    fn saga_key(&self, saga: SagaId) -> String {
        format!("{}saga:{saga}", self.noun)
    }

    fn not_found(&self, id: &str) -> ApiError {
        ApiError::NotFound(format!("{} {id} not found", self.noun))
    }

    /// Adds the write that (re)initialises counter `id` to `count` in a new `epoch`
    /// (creation: nothing is held in a new epoch), with the family's `others` in the
    /// order [`Counters::others`] names them.
    pub fn init(
        &self,
        writes: &mut redis::Pipeline,
        id: &str,
        count: Amount,
        epoch: &str,
        others: &[Amount],
    ) {
        let state = State {
            count,
            held: Amount::ZERO,
            epoch: epoch.to_string(),
            others: others.to_vec(),
            in_hash: false,
        };
        self.queue_write(writes, &self.key(id), &state);
    }

    /// Adds the writes of `batch_init(n)`: ids `0`..`n-1` start at `count` and
    /// `others` in a new epoch, whatever they were (see [`batches`]).
    pub fn init_batch(
        &self,
        writes: &mut redis::Pipeline,
        n: i64,
        count: Amount,
        others: &[Amount],
    ) {
        if n <= 0 {
            return;
        }
        let rules = self.rules_key();
        // Rules for at most n ids are covered by this one entirely.
        writes.zrembyscore(&rules, "-inf", n).ignore();
        let rule = batches::Rule {
            epoch: new_epoch(),
            count,
            others: others.to_vec(),
        };
        writes.zadd(&rules, rule.encode(), n).ignore();
    }

    /// Queues the reads of counter `key`: its hash and, for a batch id, the rule
    /// that covers it. [`Counters::take_state`] consumes their replies.
    fn queue_read(&self, reads: &mut redis::Pipeline, key: &str) {
        let hmget = reads
            .cmd("HMGET")
            .arg(key)
            .arg(self.field)
            .arg(HELD)
            .arg(EPOCH);
        for field in self.others {
            hmget.arg(*field);
        }
        if let Some(i) = batches::batch_index(self.id_of(key)) {
            reads
                .cmd("ZRANGEBYSCORE")
                .arg(self.rules_key())
                .arg(format!("({i}"))
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(1);
        }
    }

    /// A counter's state from the replies to [`Counters::queue_read`] (taken
    /// from `replies`): `None` when the id does not exist, `Err` (why) when a
    /// value is not what this code writes.
    fn take_state(
        &self,
        key: &str,
        replies: &mut impl Iterator<Item = redis::Value>,
    ) -> Result<Option<State>, String> {
        let hash = replies.next().unwrap_or(redis::Value::Nil);
        let rule = match batches::batch_index(self.id_of(key)) {
            Some(_) => replies.next(),
            None => None,
        };
        let fields: Vec<redis::Value> = redis::from_redis_value(hash).map_err(|e| e.to_string())?;
        let number = |v: redis::Value| -> Result<Option<i64>, String> {
            redis::from_redis_value(v).map_err(|e| e.to_string())
        };
        // A field HMGET did not answer reads as absent.
        let mut fields = fields.into_iter();
        let mut next = || fields.next().unwrap_or(redis::Value::Nil);
        let stored = batches::Stored {
            count: number(next())?,
            held: number(next())?,
            epoch: redis::from_redis_value(next()).map_err(|e| e.to_string())?,
            others: (0..self.others.len())
                .map(|_| number(next()))
                .collect::<Result<_, _>>()?,
        };
        let rule = match rule {
            None => None,
            Some(reply) => {
                let found: Vec<String> =
                    redis::from_redis_value(reply).map_err(|e| e.to_string())?;
                found
                    .first()
                    .map(|text| batches::Rule::decode(text))
                    .transpose()?
            }
        };
        let amount = |v: i64, what: &str| Amount::new(v).ok_or_else(|| format!("negative {what}"));
        match batches::source(&stored, rule) {
            batches::Source::Missing => Ok(None),
            batches::Source::Rule(rule) if rule.others.len() != self.others.len() => Err(format!(
                "batch rule has {} other fields, {} expected",
                rule.others.len(),
                self.others.len()
            )),
            batches::Source::Rule(rule) => Ok(Some(State {
                count: rule.count,
                held: Amount::ZERO,
                epoch: rule.epoch,
                others: rule.others,
                in_hash: false,
            })),
            batches::Source::Hash => {
                let others = stored
                    .others
                    .iter()
                    .zip(self.others)
                    .map(|(v, field)| amount(v.unwrap_or(0), field))
                    .collect::<Result<_, _>>()?;
                Ok(Some(State {
                    count: amount(stored.count.unwrap_or(0), self.field)?,
                    held: amount(stored.held.unwrap_or(0), HELD)?,
                    epoch: stored.epoch.unwrap_or_default(),
                    others,
                    in_hash: true,
                }))
            }
        }
    }

    /// Queues the write of `state` to `key`: the count and `held`, and every
    /// other field too when the hash does not hold the counter yet.
    fn queue_write(&self, writes: &mut redis::Pipeline, key: &str, state: &State) {
        let hset = writes
            .cmd("HSET")
            .arg(key)
            .arg(self.field)
            .arg(state.count.get())
            .arg(HELD)
            .arg(state.held.get());
        if !state.in_hash {
            hset.arg(EPOCH).arg(&state.epoch);
            for (field, value) in self.others.iter().zip(&state.others) {
                hset.arg(*field).arg(value.get());
            }
        }
        hset.ignore();
    }

    /// Reads a watched counter; `None` when the id does not exist.
    async fn read(&self, conn: &mut Conn, key: &str) -> Result<Option<State>, StoreError> {
        let mut reads = redis::pipe();
        self.queue_read(&mut reads, key);
        let replies: Vec<redis::Value> =
            reads.query_async(conn).await.map_err(StoreError::Redis)?;
        self.take_state(key, &mut replies.into_iter())
            .map_err(|why| StoreError::corrupt(key, why))
    }

    /// What a client sees of counter `id` (`find`); `None` when it does not exist.
    pub async fn current(&self, id: &str) -> Result<Option<Current>, StoreError> {
        let key = self.key(id);
        let mut reads = redis::pipe();
        self.queue_read(&mut reads, &key);
        let reads = &reads;
        let replies: Vec<redis::Value> = self
            .store
            .run(|mut conn| async move {
                let result = reads.query_async(&mut conn).await;
                (conn, result)
            })
            .await?;
        let state = self
            .take_state(&key, &mut replies.into_iter())
            .map_err(|why| StoreError::corrupt(&key, why))?;
        Ok(state.map(|s| Current {
            count: s.count,
            others: s.others,
        }))
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
                                let state = State {
                                    count: new,
                                    ..state
                                };
                                self.queue_write(&mut writes, key_ref, &state);
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
