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
//! A saga step writes its outcome under `<noun>saga:<id>` in the same
//! MULTI/EXEC as the change itself, so:
//! - a redelivered `take` finds the record and answers what was recorded;
//! - a `give_back` that arrives before (or instead of) its `take` leaves a
//!   `released` tombstone, and the late `take` is refused;
//! - a `take` of several counters is all or nothing;
//! - `give_back` and `settle` act on what the record says was taken, never on
//!   what a message claims.
//!
//! Records have lifetimes: `taken` lives until the saga settles or gives back
//! (with a long safety TTL), every other record is a tombstone that only has
//! to outlive a redelivered forward command, whose age the orchestrator
//! bounds (`expires_at_ms`).
//!
//! Work on the same counter is serialised inside the process by
//! [`KeyLocks`]; WATCH then only arbitrates between processes.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ApiError;
use crate::idempotency::{self, Answer, IdemKey};
use crate::keylock::KeyLocks;
use crate::messages::Outcome;
use crate::redis_store::{Conn, Store, StoreError, Tx};
use crate::types::{Amount, SagaId};

/// Safety lifetime of a `taken` record whose settle or give-back never came.
const TAKEN_TTL_SECS: u64 = 7 * 24 * 3600;
/// Lifetime of every other record: far longer than a forward command may live.
pub const TOMBSTONE_TTL_SECS: u64 = 600;

const HELD: &str = "held";
const EPOCH: &str = "epoch";

/// One counter's share of a saga's take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Took {
    id: String,
    amount: Amount,
    epoch: String,
}

/// What a participant recorded for one saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "s", rename_all = "snake_case")]
enum Record {
    Taken {
        took: Vec<Took>,
    },
    Refused {
        reason: String,
    },
    /// Given back, or a tombstone left by a compensation that came first.
    Released,
    /// The saga committed: what it took is final.
    Settled,
}

impl Record {
    fn encode(&self) -> String {
        serde_json::to_string(self).expect("records serialize")
    }

    fn decode(key: &str, text: &str) -> Result<Record, StoreError> {
        serde_json::from_str(text)
            .map_err(|e| StoreError::corrupt(key, format!("saga record {text:?}: {e}")))
    }

    fn ttl_secs(&self) -> u64 {
        match self {
            Record::Taken { .. } => TAKEN_TTL_SECS,
            _ => TOMBSTONE_TTL_SECS,
        }
    }
}

/// A counter as stored.
#[derive(Debug, Clone)]
struct State {
    count: Amount,
    held: Amount,
    epoch: String,
}

/// What happens to a saga's `taken` record when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Aborted: give back what was taken.
    GiveBack,
    /// Committed: keep it, release the hold.
    Settle,
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

    /// Adds the writes that (re)initialise counter `id` to `count` in a new `epoch`
    /// (creation and `batch_init`: nothing is held in a new epoch).
    pub fn init(&self, writes: &mut redis::Pipeline, id: &str, count: Amount, epoch: &str) {
        writes
            .cmd("HSET")
            .arg(self.key(id))
            .arg(self.field)
            .arg(count.get())
            .arg(HELD)
            .arg(0)
            .arg(EPOCH)
            .arg(epoch)
            .ignore();
    }

    /// Reads a watched counter; `None` when the id does not exist.
    async fn read(&self, conn: &mut Conn, key: &str) -> Result<Option<State>, StoreError> {
        let (count, held, epoch): (Option<i64>, Option<i64>, Option<String>) = redis::cmd("HMGET")
            .arg(key)
            .arg(self.field)
            .arg(HELD)
            .arg(EPOCH)
            .query_async(conn)
            .await
            .map_err(StoreError::Redis)?;
        let Some(count) = count else {
            return Ok(None);
        };
        let amount = |v: i64, what: &str| {
            Amount::new(v).ok_or_else(|| StoreError::corrupt(key, format!("negative {what}")))
        };
        Ok(Some(State {
            count: amount(count, self.field)?,
            held: amount(held.unwrap_or(0), HELD)?,
            epoch: epoch.unwrap_or_default(),
        }))
    }

    async fn record(&self, conn: &mut Conn, saga_key: &str) -> Result<Option<Record>, StoreError> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(saga_key)
            .query_async(conn)
            .await
            .map_err(StoreError::Redis)?;
        raw.map(|r| Record::decode(saga_key, &r)).transpose()
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

    /// Saga step: takes every `(id, amount)` or nothing, exactly once per
    /// saga. A saga met for the first time after `expires_at_ms` is refused:
    /// its orchestrator has stopped waiting for it.
    pub async fn take(
        &self,
        saga: SagaId,
        lines: &[(String, Amount)],
        expires_at_ms: Option<u64>,
    ) -> Result<Outcome, StoreError> {
        let wanted = match merge(lines) {
            Some(w) => w,
            None => {
                return Ok(Outcome::Refused {
                    reason: "quantities overflow".into(),
                })
            }
        };
        let saga_key = self.saga_key(saga);
        let keys: Vec<String> = wanted.keys().map(|id| self.key(id)).collect();
        let _guard = self.locks.lock(keys.iter().map(String::as_str)).await;
        let mut watched = keys.clone();
        watched.push(saga_key.clone());
        let (wanted, saga_key) = (&wanted, &saga_key);
        self.store
            .transact(&watched, |mut conn| async move {
                let decision = async {
                    if let Some(record) = self.record(&mut conn, saga_key).await? {
                        return Ok(Tx::Abort(match record {
                            Record::Taken { .. } | Record::Settled => Outcome::Applied,
                            Record::Refused { reason } => Outcome::Refused { reason },
                            Record::Released => Outcome::Refused {
                                reason: "saga already compensated".into(),
                            },
                        }));
                    }
                    let refuse = |reason: String| {
                        let mut writes = redis::pipe();
                        let record = Record::Refused {
                            reason: reason.clone(),
                        };
                        writes
                            .set_ex(saga_key, record.encode(), record.ttl_secs())
                            .ignore();
                        Ok(Tx::Commit(writes, Outcome::Refused { reason }))
                    };
                    if expires_at_ms.is_some_and(|t| crate::now_ms() > t) {
                        return refuse("the command expired before it could be applied".into());
                    }
                    let mut writes = redis::pipe();
                    let mut took = Vec::with_capacity(wanted.len());
                    for (id, amount) in wanted {
                        let key = self.key(id);
                        let Some(state) = self.read(&mut conn, &key).await? else {
                            return refuse(format!("{} {id} not found", self.noun));
                        };
                        let Some(left) = state.count.checked_sub(*amount) else {
                            return refuse(format!(
                                "not enough {} for {} {id}: {} available, {amount} asked",
                                self.field, self.noun, state.count
                            ));
                        };
                        // count + held <= i64::MAX holds, so held + amount cannot overflow.
                        let held = state
                            .held
                            .checked_add(*amount)
                            .ok_or_else(|| StoreError::corrupt(&key, "held overflows"))?;
                        writes
                            .cmd("HSET")
                            .arg(&key)
                            .arg(self.field)
                            .arg(left.get())
                            .arg(HELD)
                            .arg(held.get())
                            .ignore();
                        took.push(Took {
                            id: id.clone(),
                            amount: *amount,
                            epoch: state.epoch,
                        });
                    }
                    let record = Record::Taken { took };
                    writes
                        .set_ex(saga_key, record.encode(), record.ttl_secs())
                        .ignore();
                    Ok(Tx::Commit(writes, Outcome::Applied))
                }
                .await;
                (conn, decision)
            })
            .await
    }

    /// Compensation: gives back what [`Counters::take`] took for `saga`, if
    /// it took anything, and makes sure a later `take` of the saga is refused.
    pub async fn give_back(&self, saga: SagaId) -> Result<Outcome, StoreError> {
        self.end(saga, Ending::GiveBack).await
    }

    /// The saga committed: what it took stays taken, and the hold kept for a
    /// give-back is released.
    pub async fn settle(&self, saga: SagaId) -> Result<Outcome, StoreError> {
        self.end(saga, Ending::Settle).await
    }

    async fn end(&self, saga: SagaId, ending: Ending) -> Result<Outcome, StoreError> {
        let saga_key = self.saga_key(saga);
        loop {
            // Which counters to lock and watch: those the record names. The
            // transaction checks the record still names exactly these.
            let seen: Option<String> = self.store.query(redis::cmd("GET").arg(&saga_key)).await?;
            let seen = seen.map(|r| Record::decode(&saga_key, &r)).transpose()?;
            let ids: Vec<String> = match &seen {
                Some(Record::Taken { took }) => took.iter().map(|t| t.id.clone()).collect(),
                _ => Vec::new(),
            };
            let keys: Vec<String> = ids.iter().map(|id| self.key(id)).collect();
            let _guard = self.locks.lock(keys.iter().map(String::as_str)).await;
            let mut watched = keys.clone();
            watched.push(saga_key.clone());
            let (saga_key, seen) = (&saga_key, &seen);
            let outcome = self
                .store
                .transact(&watched, |mut conn| async move {
                    let decision = async {
                        let record = self.record(&mut conn, saga_key).await?;
                        if record != *seen {
                            return Ok(Tx::Abort(None)); // changed since: look again
                        }
                        self.end_record(&mut conn, saga_key, record, ending).await
                    }
                    .await;
                    (conn, decision)
                })
                .await?;
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
        }
    }

    /// The writes that end a saga's record, given what it holds now.
    async fn end_record(
        &self,
        conn: &mut Conn,
        saga_key: &str,
        record: Option<Record>,
        ending: Ending,
    ) -> Result<Tx<Option<Outcome>>, StoreError> {
        let ended = match ending {
            Ending::GiveBack => Record::Released,
            Ending::Settle => Record::Settled,
        };
        let mut writes = redis::pipe();
        match record {
            Some(Record::Taken { took }) => {
                for t in &took {
                    let key = self.key(&t.id);
                    let Some(state) = self.read(conn, &key).await? else {
                        continue; // deleted since: nothing to give back to
                    };
                    if state.epoch != t.epoch {
                        continue; // overwritten by batch_init since
                    }
                    let held = state.held.checked_sub(t.amount).ok_or_else(|| {
                        StoreError::corrupt(&key, format!("{HELD} is below what saga took"))
                    })?;
                    writes.hset(&key, HELD, held.get()).ignore();
                    if ending == Ending::GiveBack {
                        // count + held <= i64::MAX, so this always fits.
                        let back = state
                            .count
                            .checked_add(t.amount)
                            .ok_or_else(|| StoreError::corrupt(&key, "give-back overflows"))?;
                        writes.hset(&key, self.field, back.get()).ignore();
                    }
                }
            }
            Some(Record::Released | Record::Refused { .. }) if ending == Ending::GiveBack => {
                return Ok(Tx::Abort(Some(Outcome::Applied)));
            }
            Some(Record::Settled) if ending == Ending::Settle => {
                return Ok(Tx::Abort(Some(Outcome::Applied)));
            }
            Some(other) => {
                // A committed saga compensated, or an aborted one settled: the
                // orchestrator decided twice. Never apply it; an operator must look.
                return Ok(Tx::Abort(Some(Outcome::Failed {
                    reason: format!("cannot {ending:?} a saga recorded as {other:?}"),
                })));
            }
            None if ending == Ending::Settle => {
                // Settles are sent only after the take was confirmed: its record expired.
                return Ok(Tx::Abort(Some(Outcome::Applied)));
            }
            None => {} // a compensation that overtook its command: tombstone only
        }
        writes
            .set_ex(saga_key, ended.encode(), ended.ttl_secs())
            .ignore();
        Ok(Tx::Commit(writes, Some(Outcome::Applied)))
    }
}

/// A fresh epoch for counters being (re)initialised.
pub fn new_epoch() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Sums the amounts of repeated ids; `None` on overflow.
fn merge(lines: &[(String, Amount)]) -> Option<BTreeMap<String, Amount>> {
    let mut merged: BTreeMap<String, Amount> = BTreeMap::new();
    for (id, amount) in lines {
        let slot = merged.entry(id.clone()).or_insert(Amount::ZERO);
        *slot = slot.checked_add(*amount)?;
    }
    Some(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let took = vec![Took {
            id: "7".into(),
            amount: Amount::new(2).unwrap(),
            epoch: "e1".into(),
        }];
        for r in [
            Record::Taken { took },
            Record::Released,
            Record::Settled,
            Record::Refused {
                reason: "not enough: 1 < 2".into(),
            },
        ] {
            assert_eq!(Record::decode("k", &r.encode()).unwrap(), r);
        }
        assert!(Record::decode("k", "taken").is_err());
        assert_eq!(Record::Released.ttl_secs(), TOMBSTONE_TTL_SECS);
    }

    #[test]
    fn repeated_lines_are_summed() {
        let two = Amount::new(2).unwrap();
        let merged = merge(&[("a".into(), two), ("b".into(), two), ("a".into(), two)]).unwrap();
        assert_eq!(merged["a"].get(), 4);
        assert_eq!(merged["b"].get(), 2);
        let max = Amount::new(i64::MAX).unwrap();
        assert!(merge(&[("a".into(), max), ("a".into(), two)]).is_none());
    }
}
