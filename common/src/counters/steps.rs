//! Saga steps on counters, applied many at a time.
//!
//! A participant gathers the commands of concurrent sagas and applies them as
//! one transaction ([`Counters::apply_steps`]): one `WATCH` of every key they
//! touch, their reads in one pipeline, the decisions made in memory in the
//! order the steps came (a later step sees what an earlier one did to a
//! counter or to a saga's record), and one `MULTI`/`EXEC` with one `WAIT`.
//! A group of any size costs two round trips (three when it ends sagas:
//! which counters to read is known only once their records are read), where
//! each step alone cost three or four.
//!
//! A step writes its outcome under `<noun>saga:<id>` in the same MULTI/EXEC as
//! the change itself, so:
//! - a redelivered `take` finds the record and answers what was recorded;
//! - a `give_back` that arrives before (or instead of) its `take` leaves a
//!   `released` tombstone, and the late `take` is refused;
//! - a `take` of several counters is all or nothing;
//! - `give_back` and `settle` act on what the record says was taken, never on
//!   what a message claims.
//!
//! None of that depends on the grouping: a group commits whole or not at all
//! (EXEC), a conflict with another process reads and decides every step
//! again, and a step that meets a corrupt value fails alone (it writes
//! nothing; the others commit).
//!
//! Records have lifetimes: `taken` lives until the saga settles or gives back
//! (with a long safety TTL), every other record is a tombstone that only has
//! to outlive a redelivered forward command, whose age the orchestrator
//! bounds (`expires_at_ms`).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redis::Value;
use serde::{Deserialize, Serialize};

use super::{Counters, State, HELD};
use crate::messages::Outcome;
use crate::redis_store::{Conn, StoreError, Tx};
use crate::types::{Amount, SagaId};

/// Safety lifetime of a `taken` record whose settle or give-back never came. Longer than
/// a saga that needs an operator is kept (30 days, the order service's
/// `ATTENTION_RETENTION_SECS`): an operator's retry or abort must still find what the saga
/// took, or its give-back would leave a tombstone and the stock or credit would stay taken.
pub const TAKEN_TTL_SECS: u64 = 31 * 24 * 3600;
/// Lifetime of every other record: far longer than a forward command may live.
pub const TOMBSTONE_TTL_SECS: u64 = 600;

/// What a saga asks of a participant's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaStep {
    /// Take every `(id, amount)` or nothing, once. A saga met for the first
    /// time after `expires_at_ms` is refused: its orchestrator has stopped
    /// waiting for it.
    Take {
        saga: SagaId,
        lines: Vec<(String, Amount)>,
        expires_at_ms: Option<u64>,
    },
    /// The saga aborted: give back what it took, if it took anything, and
    /// make sure a later take of it is refused.
    GiveBack(SagaId),
    /// The saga committed: what it took stays taken, and the hold kept for a
    /// give-back is released.
    Settle(SagaId),
}

impl SagaStep {
    pub fn saga(&self) -> SagaId {
        match self {
            SagaStep::Take { saga, .. } => *saga,
            SagaStep::GiveBack(saga) | SagaStep::Settle(saga) => *saga,
        }
    }
}

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

    fn decode(text: &str) -> Result<Record, String> {
        serde_json::from_str(text).map_err(|e| format!("saga record {text:?}: {e}"))
    }

    fn ttl_secs(&self) -> u64 {
        match self {
            Record::Taken { .. } => TAKEN_TTL_SECS,
            _ => TOMBSTONE_TTL_SECS,
        }
    }
}

/// A value a group read: decoded (`None`: no such key), or why it could not
/// be (the steps that meet it fail, and change nothing).
type Read<T> = Result<Option<T>, String>;

/// What a group read, and what its steps have made of it so far.
#[derive(Default)]
struct View {
    records: HashMap<String, Read<Record>>,
    counters: HashMap<String, Read<State>>,
    changed_records: BTreeSet<String>,
    changed_counters: BTreeSet<String>,
}

impl View {
    fn record(&self, saga_key: &str) -> Result<Option<Record>, StoreError> {
        match self.records.get(saga_key) {
            Some(Ok(record)) => Ok(record.clone()),
            Some(Err(why)) => Err(StoreError::corrupt(saga_key, why)),
            None => unreachable!("every step's record is read before it is decided"),
        }
    }

    fn counter(&self, key: &str) -> Result<Option<State>, StoreError> {
        match self.counters.get(key) {
            Some(Ok(state)) => Ok(state.clone()),
            Some(Err(why)) => Err(StoreError::corrupt(key, why)),
            None => unreachable!("every counter a step names is read before it is decided"),
        }
    }

    fn set_record(&mut self, saga_key: &str, record: Record) {
        self.records.insert(saga_key.to_string(), Ok(Some(record)));
        self.changed_records.insert(saga_key.to_string());
    }

    fn set_counter(&mut self, key: &str, state: State) {
        self.counters.insert(key.to_string(), Ok(Some(state)));
        self.changed_counters.insert(key.to_string());
    }
}

/// What happens to a saga's `taken` record when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Aborted: give back what was taken.
    GiveBack,
    /// Committed: keep it, release the hold.
    Settle,
}

impl Counters {
    /// Saga step: takes every `(id, amount)` or nothing, exactly once per saga
    /// (a group of one; see [`SagaStep::Take`]).
    pub async fn take(
        &self,
        saga: SagaId,
        lines: &[(String, Amount)],
        expires_at_ms: Option<u64>,
    ) -> Result<Outcome, StoreError> {
        self.apply_one(SagaStep::Take {
            saga,
            lines: lines.to_vec(),
            expires_at_ms,
        })
        .await
    }

    /// Compensation: see [`SagaStep::GiveBack`].
    pub async fn give_back(&self, saga: SagaId) -> Result<Outcome, StoreError> {
        self.apply_one(SagaStep::GiveBack(saga)).await
    }

    /// See [`SagaStep::Settle`].
    pub async fn settle(&self, saga: SagaId) -> Result<Outcome, StoreError> {
        self.apply_one(SagaStep::Settle(saga)).await
    }

    async fn apply_one(&self, step: SagaStep) -> Result<Outcome, StoreError> {
        let mut outcomes = self.apply_steps(std::slice::from_ref(&step)).await?;
        outcomes.pop().expect("one outcome per step")
    }

    /// Applies `steps`, in order, as one transaction (see the module comment);
    /// one result per step. `Err` when the group as a whole could not be
    /// applied: the store unreachable, the outcome not confirmed on a replica,
    /// or a command Redis refused.
    ///
    /// Counters the steps take from are locked in this process first, so
    /// groups and single steps in one process never race on a hot key; WATCH
    /// arbitrates between processes (and covers the counters a step ends,
    /// which are known only once its record is read).
    pub async fn apply_steps(
        &self,
        steps: &[SagaStep],
    ) -> Result<Vec<Result<Outcome, StoreError>>, StoreError> {
        let wanted: Vec<Option<BTreeMap<String, Amount>>> = steps
            .iter()
            .map(|step| match step {
                SagaStep::Take { lines, .. } => merge(lines),
                _ => None,
            })
            .collect();
        let saga_keys: BTreeSet<String> = steps.iter().map(|s| self.saga_key(s.saga())).collect();
        let taken_keys: BTreeSet<String> = wanted
            .iter()
            .flatten()
            .flat_map(|w| w.keys().map(|id| self.key(id)))
            .collect();
        let _guard = self.locks.lock(taken_keys.iter().map(String::as_str)).await;
        let watched: Vec<String> = saga_keys.iter().chain(&taken_keys).cloned().collect();
        let (saga_keys, taken_keys, wanted) = (&saga_keys, &taken_keys, &wanted);
        self.store
            .transact(&watched, |mut conn| async move {
                let decision = async {
                    let mut view = View::default();
                    self.read_into(&mut conn, &mut view, saga_keys, taken_keys, false)
                        .await?;
                    let ended = self.counters_to_end(&view, steps);
                    if !ended.is_empty() {
                        self.read_into(&mut conn, &mut view, &BTreeSet::new(), &ended, true)
                            .await?;
                    }
                    let outcomes: Vec<Result<Outcome, StoreError>> = steps
                        .iter()
                        .zip(wanted)
                        .map(|(step, wanted)| self.decide(&mut view, step, wanted.as_ref()))
                        .collect();
                    let writes = self.writes(&view);
                    Ok(if writes.cmd_iter().next().is_none() {
                        Tx::Abort(outcomes)
                    } else {
                        Tx::Commit(writes, outcomes)
                    })
                }
                .await;
                (conn, decision)
            })
            .await
    }

    /// Reads records and counters into `view` in one round trip; `watch`
    /// watches the counters first (the transaction's own WATCH covered the
    /// keys known before anything was read).
    async fn read_into(
        &self,
        conn: &mut Conn,
        view: &mut View,
        saga_keys: &BTreeSet<String>,
        counter_keys: &BTreeSet<String>,
        watch: bool,
    ) -> Result<(), StoreError> {
        let mut reads = redis::pipe();
        if watch {
            reads
                .cmd("WATCH")
                .arg(counter_keys.iter().collect::<Vec<_>>())
                .ignore();
        }
        for key in saga_keys {
            reads.cmd("GET").arg(key);
        }
        for key in counter_keys {
            self.queue_read(&mut reads, key);
        }
        let replies: Vec<Value> = reads.query_async(conn).await.map_err(StoreError::Redis)?;
        let mut replies = replies.into_iter();
        for key in saga_keys {
            let reply = replies.next().unwrap_or(Value::Nil);
            let record = redis::from_redis_value::<Option<String>>(reply)
                .map_err(|e| e.to_string())
                .and_then(|text| text.as_deref().map(Record::decode).transpose());
            view.records.insert(key.clone(), record);
        }
        for key in counter_keys {
            let state = self.take_state(key, &mut replies);
            view.counters.insert(key.clone(), state);
        }
        Ok(())
    }

    /// The counters that `taken` records name for the steps that end them,
    /// not read yet.
    fn counters_to_end(&self, view: &View, steps: &[SagaStep]) -> BTreeSet<String> {
        steps
            .iter()
            .filter(|step| !matches!(step, SagaStep::Take { .. }))
            .filter_map(|step| match view.records.get(&self.saga_key(step.saga())) {
                Some(Ok(Some(Record::Taken { took }))) => Some(took),
                _ => None,
            })
            .flatten()
            .map(|t| self.key(&t.id))
            .filter(|key| !view.counters.contains_key(key))
            .collect()
    }

    /// Decides one step against `view` and applies it there.
    fn decide(
        &self,
        view: &mut View,
        step: &SagaStep,
        wanted: Option<&BTreeMap<String, Amount>>,
    ) -> Result<Outcome, StoreError> {
        let saga_key = self.saga_key(step.saga());
        match step {
            SagaStep::Take { expires_at_ms, .. } => match wanted {
                None => Ok(Outcome::Refused {
                    reason: "quantities overflow".into(),
                }),
                Some(wanted) => self.decide_take(view, &saga_key, wanted, *expires_at_ms),
            },
            SagaStep::GiveBack(_) => self.decide_end(view, &saga_key, Ending::GiveBack),
            SagaStep::Settle(_) => self.decide_end(view, &saga_key, Ending::Settle),
        }
    }

    fn decide_take(
        &self,
        view: &mut View,
        saga_key: &str,
        wanted: &BTreeMap<String, Amount>,
        expires_at_ms: Option<u64>,
    ) -> Result<Outcome, StoreError> {
        if let Some(record) = view.record(saga_key)? {
            return Ok(match record {
                Record::Taken { .. } | Record::Settled => Outcome::Applied,
                Record::Refused { reason } => Outcome::Refused { reason },
                Record::Released => Outcome::Refused {
                    reason: "saga already compensated".into(),
                },
            });
        }
        let refuse = |view: &mut View, reason: String| {
            view.set_record(
                saga_key,
                Record::Refused {
                    reason: reason.clone(),
                },
            );
            Ok(Outcome::Refused { reason })
        };
        if expires_at_ms.is_some_and(|t| crate::now_ms() > t) {
            return refuse(
                view,
                "the command expired before it could be applied".into(),
            );
        }
        // Decided in full before anything is applied: all or nothing.
        let mut after = Vec::with_capacity(wanted.len());
        let mut took = Vec::with_capacity(wanted.len());
        for (id, amount) in wanted {
            let key = self.key(id);
            let Some(state) = view.counter(&key)? else {
                return refuse(view, format!("{} {id} not found", self.noun));
            };
            let Some(left) = state.count.checked_sub(*amount) else {
                return refuse(
                    view,
                    format!(
                        "not enough {} for {} {id}: {} available, {amount} asked",
                        self.field, self.noun, state.count
                    ),
                );
            };
            // count + held <= i64::MAX holds, so held + amount cannot overflow.
            let held = state
                .held
                .checked_add(*amount)
                .ok_or_else(|| StoreError::corrupt(&key, "held overflows"))?;
            took.push(Took {
                id: id.clone(),
                amount: *amount,
                epoch: state.epoch.clone(),
            });
            after.push((
                key,
                State {
                    count: left,
                    held,
                    ..state
                },
            ));
        }
        for (key, state) in after {
            view.set_counter(&key, state);
        }
        view.set_record(saga_key, Record::Taken { took });
        Ok(Outcome::Applied)
    }

    fn decide_end(
        &self,
        view: &mut View,
        saga_key: &str,
        ending: Ending,
    ) -> Result<Outcome, StoreError> {
        let ended = match ending {
            Ending::GiveBack => Record::Released,
            Ending::Settle => Record::Settled,
        };
        match view.record(saga_key)? {
            Some(Record::Taken { took }) => {
                // Decided in full before anything is applied, like a take.
                let mut after = Vec::with_capacity(took.len());
                for t in &took {
                    let key = self.key(&t.id);
                    let Some(state) = view.counter(&key)? else {
                        continue; // deleted since: nothing to give back to
                    };
                    if state.epoch != t.epoch {
                        continue; // overwritten by batch_init since
                    }
                    let held = state.held.checked_sub(t.amount).ok_or_else(|| {
                        StoreError::corrupt(&key, format!("{HELD} is below what saga took"))
                    })?;
                    let count = match ending {
                        // count + held <= i64::MAX, so this always fits.
                        Ending::GiveBack => state
                            .count
                            .checked_add(t.amount)
                            .ok_or_else(|| StoreError::corrupt(&key, "give-back overflows"))?,
                        Ending::Settle => state.count,
                    };
                    after.push((
                        key,
                        State {
                            count,
                            held,
                            ..state
                        },
                    ));
                }
                for (key, state) in after {
                    view.set_counter(&key, state);
                }
            }
            Some(Record::Released | Record::Refused { .. }) if ending == Ending::GiveBack => {
                return Ok(Outcome::Applied);
            }
            Some(Record::Settled) if ending == Ending::Settle => return Ok(Outcome::Applied),
            Some(other) => {
                // A committed saga compensated, or an aborted one settled: the
                // orchestrator decided twice. Never apply it; an operator must look.
                return Ok(Outcome::Failed {
                    reason: format!("cannot {ending:?} a saga recorded as {other:?}"),
                });
            }
            // Settles are sent only after the take was confirmed: its record expired.
            None if ending == Ending::Settle => return Ok(Outcome::Applied),
            None => {} // a compensation that overtook its command: tombstone only
        }
        view.set_record(saga_key, ended);
        Ok(Outcome::Applied)
    }

    /// The group's writes: each changed counter and record once, as the last
    /// step left it.
    fn writes(&self, view: &View) -> redis::Pipeline {
        let mut writes = redis::pipe();
        for key in &view.changed_counters {
            if let Some(Ok(Some(state))) = view.counters.get(key) {
                self.queue_write(&mut writes, key, state);
            }
        }
        for key in &view.changed_records {
            if let Some(Ok(Some(record))) = view.records.get(key) {
                writes
                    .set_ex(key, record.encode(), record.ttl_secs())
                    .ignore();
            }
        }
        writes
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
            assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
        assert!(Record::decode("taken").is_err());
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
