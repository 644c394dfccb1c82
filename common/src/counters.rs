//! Non-negative counters with exactly-once saga steps: the store logic that
//! stock (an item's `stock`) and payment (a user's `credit`) have in common.
//!
//! Each counter is a field of a Redis hash (`item:7` → `stock`). A saga step
//! ([`Counters::take`], [`Counters::give_back`]) writes its outcome under
//! `<prefix>saga:<id>` in the same MULTI/EXEC as the change itself, so:
//! - a redelivered `take` finds the record and answers what was recorded;
//! - a `give_back` that arrives before (or instead of) its `take` leaves a
//!   `released` tombstone, and the late `take` is refused;
//! - a `take` of several counters is all or nothing.
//!
//! Work on the same counter is serialised inside the process by
//! [`KeyLocks`]; WATCH then only arbitrates between processes.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::error::ApiError;
use crate::keylock::KeyLocks;
use crate::messages::Outcome;
use crate::redis_store::{Store, StoreError, Tx};
use crate::types::{Amount, SagaId};

/// How long a saga's record is kept: far beyond any redelivery or recovery.
const SAGA_RECORD_TTL_SECS: u64 = 7 * 24 * 3600;

/// What a participant recorded for one saga.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Record {
    Taken,
    Refused(String),
    /// Given back, or a tombstone left by a compensation that came first.
    Released,
}

impl Record {
    fn encode(&self) -> String {
        match self {
            Record::Taken => "taken".into(),
            Record::Released => "released".into(),
            Record::Refused(reason) => format!("refused:{reason}"),
        }
    }

    fn decode(key: &str, text: &str) -> Result<Record, StoreError> {
        match text {
            "taken" => Ok(Record::Taken),
            "released" => Ok(Record::Released),
            _ => text
                .strip_prefix("refused:")
                .map(|r| Record::Refused(r.to_string()))
                .ok_or_else(|| StoreError::corrupt(key, format!("unknown saga record {text:?}"))),
        }
    }
}

/// A family of counters: one hash per id under `key_prefix`, the count in `field`.
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

    /// Reads the counter of a watched key; `None` when the id does not exist.
    async fn read(
        &self,
        conn: &mut crate::redis_store::Conn,
        key: &str,
    ) -> Result<Option<Amount>, StoreError> {
        let raw: Option<i64> = redis::cmd("HGET")
            .arg(key)
            .arg(self.field)
            .query_async(conn)
            .await
            .map_err(StoreError::Redis)?;
        raw.map(|v| Amount::new(v).ok_or_else(|| StoreError::corrupt(key, "negative counter")))
            .transpose()
    }

    /// Adds `amount`; refuses (400) a sum that would overflow. Returns the new value.
    pub async fn add(&self, id: &str, amount: Amount) -> Result<Amount, ApiError> {
        self.change(id, |current| {
            current.checked_add(amount).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "adding {amount} to {} {id} would overflow ({} is {current})",
                    self.noun, self.field
                ))
            })
        })
        .await
    }

    /// Subtracts `amount`; refuses (400) going below zero. Returns the new value.
    pub async fn subtract(&self, id: &str, amount: Amount) -> Result<Amount, ApiError> {
        self.change(id, |current| {
            current.checked_sub(amount).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "not enough {} for {} {id}: {current} available, {amount} asked",
                    self.field, self.noun
                ))
            })
        })
        .await
    }

    async fn change(
        &self,
        id: &str,
        apply: impl Fn(Amount) -> Result<Amount, ApiError>,
    ) -> Result<Amount, ApiError> {
        let key = self.key(id);
        let _guard = self.locks.lock([key.as_str()]).await;
        let (key, apply) = (&key, &apply);
        let outcome = self
            .store
            .transact(std::slice::from_ref(key), |mut conn| async move {
                let decision = async {
                    let Some(current) = self.read(&mut conn, key).await? else {
                        return Ok(Tx::Abort(Err(self.not_found(id))));
                    };
                    Ok(match apply(current) {
                        Ok(new) => {
                            let mut writes = redis::pipe();
                            writes.hset(key, self.field, new.get()).ignore();
                            Tx::Commit(writes, Ok(new))
                        }
                        Err(refusal) => Tx::Abort(Err(refusal)),
                    })
                }
                .await;
                (conn, decision)
            })
            .await?;
        outcome
    }

    /// Saga step: takes every `(id, amount)` or nothing, exactly once per saga.
    pub async fn take(
        &self,
        saga: SagaId,
        lines: &[(String, Amount)],
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
                        Record::Taken => Outcome::Applied,
                        Record::Refused(reason) => Outcome::Refused { reason },
                        Record::Released => Outcome::Refused {
                            reason: "saga already compensated".into(),
                        },
                    }));
                }
                let mut writes = redis::pipe();
                let mut refusal = None;
                for (id, amount) in wanted {
                    let key = self.key(id);
                    match self.read(&mut conn, &key).await? {
                        None => refusal = Some(format!("{} {id} not found", self.noun)),
                        Some(current) => match current.checked_sub(*amount) {
                            Some(left) => {
                                writes.hset(&key, self.field, left.get()).ignore();
                            }
                            None => {
                                refusal = Some(format!(
                                    "not enough {} for {} {id}: {current} available, {amount} asked",
                                    self.field, self.noun
                                ))
                            }
                        },
                    }
                    if refusal.is_some() {
                        break;
                    }
                }
                let (record, outcome) = match refusal {
                    None => (Record::Taken, Outcome::Applied),
                    Some(reason) => {
                        // Nothing of the partial `writes` is sent: only the record.
                        writes = redis::pipe();
                        (Record::Refused(reason.clone()), Outcome::Refused { reason })
                    }
                };
                writes
                    .set_ex(saga_key, record.encode(), SAGA_RECORD_TTL_SECS)
                    .ignore();
                Ok(Tx::Commit(writes, outcome))
                }
                .await;
                (conn, decision)
            })
            .await
    }

    /// Compensation: gives back what [`Counters::take`] took for `saga`, if
    /// it took anything, and makes sure a later `take` of the saga is refused.
    pub async fn give_back(
        &self,
        saga: SagaId,
        lines: &[(String, Amount)],
    ) -> Result<Outcome, StoreError> {
        let Some(wanted) = merge(lines) else {
            return Err(StoreError::corrupt(
                self.saga_key(saga),
                "compensation quantities overflow",
            ));
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
                    let mut writes = redis::pipe();
                    match self.record(&mut conn, saga_key).await? {
                        Some(Record::Released) | Some(Record::Refused(_)) => {
                            return Ok(Tx::Abort(Outcome::Applied));
                        }
                        Some(Record::Taken) => {
                            for (id, amount) in wanted {
                                let key = self.key(id);
                                // A counter deleted meanwhile (batch_init overwrote it) is recreated.
                                let current =
                                    self.read(&mut conn, &key).await?.unwrap_or(Amount::ZERO);
                                let back = current.checked_add(*amount).ok_or_else(|| {
                                    StoreError::corrupt(&key, "give-back overflows")
                                })?;
                                writes.hset(&key, self.field, back.get()).ignore();
                            }
                        }
                        None => {} // tombstone only
                    }
                    writes
                        .set_ex(saga_key, Record::Released.encode(), SAGA_RECORD_TTL_SECS)
                        .ignore();
                    Ok(Tx::Commit(writes, Outcome::Applied))
                }
                .await;
                (conn, decision)
            })
            .await
    }

    async fn record(
        &self,
        conn: &mut crate::redis_store::Conn,
        saga_key: &str,
    ) -> Result<Option<Record>, StoreError> {
        let raw: Option<String> = redis::cmd("GET")
            .arg(saga_key)
            .query_async(conn)
            .await
            .map_err(StoreError::Redis)?;
        raw.map(|r| Record::decode(saga_key, &r)).transpose()
    }
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
        for r in [
            Record::Taken,
            Record::Released,
            Record::Refused("not enough: 1 < 2".into()),
        ] {
            assert_eq!(Record::decode("k", &r.encode()).unwrap(), r);
        }
        assert!(Record::decode("k", "bogus").is_err());
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
