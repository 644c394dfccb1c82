//! The saga log in the saga store (its own Sentinel-managed Redis).
//!
//! Keys, each with a lifetime:
//! - `saga:<id>` → hash: `order`, `user`, `lines` (JSON), `total`, `state`,
//!   `idem`/`idem_ttl` (the checkout's idempotency record), `created_ms`,
//!   `attempts`, and once it ends `finished_ms`, `answer`, or `attention`.
//!   Kept while the saga runs; expires [`RETENTION_SECS`] after it finished.
//! - `lease:<id>` → the instance driving the saga, with a TTL its owner
//!   renews. A saga without a lease has lost its owner. Deleted at the end.
//! - `sagas:active` → set of the sagas not finished yet (recovery scans it).
//! - `sagas:attention` → sagas that could not be finished automatically
//!   (a compensation was dead-lettered, or recovery gave up); an operator's.
//! - `idem:/checkout/<order>:<key>` → `saga:<id>` while the checkout runs,
//!   then its final answer, for the key's lifetime.
//!
//! `state` changes once, from PENDING to COMMITTED or ABORTED, by a
//! compare-and-set. It always follows the order's own compare-and-set
//! (`Orders::commit` / `Orders::fence`), which is where a checkout is
//! really decided; this log is what recovery and joining checkouts read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::idempotency::{Answer, IdemKey};
use common::messages::Line;
use common::redis_store::{Store, StoreError, Tx};
use common::types::{Amount, OrderId, SagaId, UserId};

const ACTIVE: &str = "sagas:active";
const ATTENTION: &str = "sagas:attention";
/// How long a finished saga's record is kept (joining checkouts, operators): as long as a
/// gateway-stamped idempotency key and a participant's tombstone, the window in which a retry
/// of the same checkout can still arrive. A repeat with a client's own key (24 h) does not need
/// the record: the key holds the final answer itself. Measured: at 1 h this record was 90 % of
/// a checkout's memory (about 1 KB each, 2.5 GB at a sustained 600 checkouts/s).
pub const RETENTION_SECS: i64 = 600;
/// How long a saga that needs an operator is kept.
pub const ATTENTION_RETENTION_SECS: i64 = 30 * 24 * 3600;

fn saga_key(id: SagaId) -> String {
    format!("saga:{id}")
}

fn lease_key(id: SagaId) -> String {
    format!("lease:{id}")
}

/// A saga's decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SagaState {
    Pending,
    Committed,
    Aborted,
}

impl SagaState {
    pub fn as_str(self) -> &'static str {
        match self {
            SagaState::Pending => "PENDING",
            SagaState::Committed => "COMMITTED",
            SagaState::Aborted => "ABORTED",
        }
    }

    pub fn parse(text: &str) -> Option<SagaState> {
        match text {
            "PENDING" => Some(SagaState::Pending),
            "COMMITTED" => Some(SagaState::Committed),
            "ABORTED" => Some(SagaState::Aborted),
            _ => None,
        }
    }
}

/// Everything needed to drive or recover a saga, as written when it began.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRecord {
    pub id: SagaId,
    pub order_id: OrderId,
    pub user_id: UserId,
    pub lines: Vec<Line>,
    pub total: Amount,
    /// The Redis key of the checkout's idempotency record, and its lifetime.
    pub idem: Option<(String, u64)>,
}

/// What [`SagaStore::begin`] found.
pub enum Begin {
    Started,
    /// The same idempotency key already has its answer.
    Answered(Answer),
    /// The same idempotency key is being checked out by this saga.
    Joined(SagaId),
}

/// Where a saga stands, for a checkout waiting on it.
pub enum Progress {
    Running,
    /// Finished; with its answer unless it was abandoned before it sent anything.
    Finished(Option<Answer>),
    NeedsAttention(String),
}

/// What the checkout's idempotency key has recorded so far.
pub enum Recorded {
    Nothing,
    Answer(Answer),
    Saga(SagaId),
}

#[derive(Clone)]
pub struct SagaStore {
    store: Arc<Store>,
}

impl SagaStore {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// What the checkout's idempotency key has recorded. A final answer is
    /// confirmed on a replica before it is returned (it is replayed to the client).
    pub async fn recorded(&self, idem: &IdemKey) -> Result<Recorded, StoreError> {
        let is_answer =
            |raw: &Option<String>| matches!(parse_recorded(raw.as_deref()), Recorded::Answer(_));
        let raw: Option<String> = self
            .store
            .query_confirmed(redis::cmd("GET").arg(idem.redis_key()), is_answer)
            .await?;
        Ok(parse_recorded(raw.as_deref()))
    }

    /// Records a final answer under a checkout's key (a checkout that joined another's saga).
    pub async fn record_answer(&self, idem: &IdemKey, answer: &Answer) -> Result<(), StoreError> {
        let mut writes = redis::pipe();
        idem.record(&mut writes, answer);
        self.store.write(&writes).await
    }

    /// Writes the saga's record and lease, and points the checkout's key at
    /// it, unless that key already has an answer or a running saga.
    pub async fn begin(
        &self,
        saga: &SagaRecord,
        owner: &str,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let lines = serde_json::to_string(&saga.lines).expect("lines serialize");
        let watched: Vec<String> = saga.idem.iter().map(|(k, _)| k.clone()).collect();
        let (lines, watched) = (&lines, &watched);
        self.store
            .transact(watched, |mut conn| async move {
                let decision = async {
                    if let Some(idem_key) = watched.first() {
                        let raw: Option<String> = redis::cmd("GET")
                            .arg(idem_key)
                            .query_async(&mut conn)
                            .await
                            .map_err(StoreError::Redis)?;
                        match parse_recorded(raw.as_deref()) {
                            Recorded::Answer(a) => return Ok(Tx::Abort(Begin::Answered(a))),
                            // A retry after an EXEC whose reply was lost finds its own saga.
                            Recorded::Saga(id) if id == saga.id => {
                                return Ok(Tx::Abort(Begin::Started))
                            }
                            Recorded::Saga(id) => {
                                let running: bool = redis::cmd("SISMEMBER")
                                    .arg(ACTIVE)
                                    .arg(id.to_string())
                                    .query_async(&mut conn)
                                    .await
                                    .map_err(StoreError::Redis)?;
                                if running {
                                    return Ok(Tx::Abort(Begin::Joined(id)));
                                }
                            }
                            Recorded::Nothing => {}
                        }
                    }
                    let mut writes = redis::pipe();
                    let mut fields = vec![
                        ("order", saga.order_id.to_string()),
                        ("user", saga.user_id.to_string()),
                        ("lines", lines.clone()),
                        ("total", saga.total.to_string()),
                        ("state", SagaState::Pending.as_str().to_string()),
                        ("created_ms", common::now_ms().to_string()),
                        ("attempts", "0".to_string()),
                    ];
                    if let Some((idem_key, ttl)) = &saga.idem {
                        fields.push(("idem", idem_key.clone()));
                        fields.push(("idem_ttl", ttl.to_string()));
                        writes
                            .set_ex(idem_key, format!("saga:{}", saga.id), *ttl)
                            .ignore();
                    }
                    writes
                        .hset_multiple(saga_key(saga.id), &fields)
                        .ignore()
                        .set(lease_key(saga.id), owner)
                        .arg("PX")
                        .arg(lease.as_millis() as u64)
                        .ignore()
                        .sadd(ACTIVE, saga.id.to_string())
                        .ignore();
                    Ok(Tx::Commit(writes, Begin::Started))
                }
                .await;
                (conn, decision)
            })
            .await
    }

    /// Rewrites what the saga takes (the order changed between the saga's
    /// start and its freeze). Runs before any step is sent.
    pub async fn set_content(&self, saga: &SagaRecord) -> Result<(), StoreError> {
        let lines = serde_json::to_string(&saga.lines).expect("lines serialize");
        let mut writes = redis::pipe();
        writes
            .hset_multiple(
                saga_key(saga.id),
                &[
                    ("user", saga.user_id.to_string()),
                    ("lines", lines),
                    ("total", saga.total.to_string()),
                ],
            )
            .ignore();
        self.store.write(&writes).await
    }

    async fn fields(&self, id: SagaId) -> Result<HashMap<String, String>, StoreError> {
        self.store
            .query(redis::cmd("HGETALL").arg(saga_key(id)))
            .await
    }

    /// Reads a saga's record and state; `None` if there is no such saga.
    pub async fn load(&self, id: SagaId) -> Result<Option<(SagaRecord, SagaState)>, StoreError> {
        let fields = self.fields(id).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let key = saga_key(id);
        let field = |name: &str| {
            fields
                .get(name)
                .ok_or_else(|| StoreError::corrupt(&key, format!("missing field {name}")))
        };
        let bad = |e: String| StoreError::corrupt(&key, e);
        let idem = match (fields.get("idem"), fields.get("idem_ttl")) {
            (Some(k), Some(ttl)) => Some((
                k.clone(),
                ttl.parse().map_err(|_| bad("bad idem_ttl".into()))?,
            )),
            _ => None,
        };
        let record = SagaRecord {
            id,
            order_id: OrderId::parse(field("order")?).map_err(|e| bad(e.to_string()))?,
            user_id: UserId::parse(field("user")?).map_err(|e| bad(e.to_string()))?,
            lines: serde_json::from_str(field("lines")?).map_err(|e| bad(e.to_string()))?,
            total: field("total")?
                .parse::<i64>()
                .ok()
                .and_then(Amount::new)
                .ok_or_else(|| bad("bad total".into()))?,
            idem,
        };
        let state = SagaState::parse(field("state")?).ok_or_else(|| bad("bad state".into()))?;
        Ok(Some((record, state)))
    }

    /// Where a saga stands (a checkout waiting on it polls this). A finished
    /// saga's answer is confirmed on a replica before it is returned (the
    /// waiting checkout answers with it).
    pub async fn progress(&self, id: SagaId) -> Result<Progress, StoreError> {
        type Seen = (bool, Option<String>, Option<String>);
        let answered =
            |(active, answer, attention): &Seen| !active && attention.is_none() && answer.is_some();
        let (active, answer, attention): Seen = self
            .store
            .run_confirmed(answered, |mut conn| async move {
                let result = redis::pipe()
                    .sismember(ACTIVE, id.to_string())
                    .hget(saga_key(id), "answer")
                    .hget(saga_key(id), "attention")
                    .query_async(&mut conn)
                    .await;
                (conn, result)
            })
            .await?;
        Ok(match (active, attention) {
            (_, Some(why)) => Progress::NeedsAttention(why),
            (true, None) => Progress::Running,
            (false, None) => Progress::Finished(answer.as_deref().and_then(Answer::decode)),
        })
    }

    /// True while the saga has not finished.
    pub async fn is_active(&self, id: SagaId) -> Result<bool, StoreError> {
        self.store
            .query(redis::cmd("SISMEMBER").arg(ACTIVE).arg(id.to_string()))
            .await
    }

    /// The compare-and-set: moves PENDING to `decision`; returns the state that holds now.
    pub async fn decide(&self, id: SagaId, decision: SagaState) -> Result<SagaState, StoreError> {
        let key = saga_key(id);
        let key = &key;
        self.store
            .transact(std::slice::from_ref(key), |mut conn| async move {
                let current: Result<Option<String>, _> = redis::cmd("HGET")
                    .arg(key)
                    .arg("state")
                    .query_async(&mut conn)
                    .await;
                let decision = match current {
                    Err(e) => Err(StoreError::Redis(e)),
                    Ok(None) => Err(StoreError::corrupt(key.as_str(), "saga has no state")),
                    Ok(Some(text)) => match SagaState::parse(&text) {
                        None => Err(StoreError::corrupt(key.as_str(), "bad state")),
                        Some(SagaState::Pending) => {
                            let mut writes = redis::pipe();
                            writes
                                .hset(key, "state", decision.as_str())
                                .ignore()
                                .hset(key, "decided_ms", common::now_ms())
                                .ignore();
                            Ok(Tx::Commit(writes, decision))
                        }
                        Some(decided) => Ok(Tx::Abort(decided)),
                    },
                };
                (conn, decision)
            })
            .await
    }

    /// Marks the saga finished with the checkout's final answer (recorded
    /// under its idempotency key too), or without one when it was abandoned
    /// before it sent anything. Its record then expires.
    ///
    /// Once: when two instances drive one saga (its owner was slow, recovery
    /// took over), both finish it, each with its own words for the outcome.
    /// The first answer recorded stands; a later finish changes nothing and
    /// returns that first answer, so every client hears the same one.
    pub async fn finish(
        &self,
        saga: &SagaRecord,
        answer: Option<&Answer>,
        reason: &str,
    ) -> Result<Option<Answer>, StoreError> {
        let key = saga_key(saga.id);
        let key = &key;
        self.store
            .transact(std::slice::from_ref(key), |mut conn| async move {
                let first: Result<Option<String>, _> = redis::cmd("HGET")
                    .arg(key)
                    .arg("answer")
                    .query_async(&mut conn)
                    .await;
                let decision = match first {
                    Err(e) => Err(StoreError::Redis(e)),
                    Ok(Some(first)) => Ok(Tx::Abort(Answer::decode(&first))),
                    Ok(None) => {
                        let mut writes = redis::pipe();
                        writes
                            .srem(ACTIVE, saga.id.to_string())
                            .ignore()
                            .del(lease_key(saga.id))
                            .ignore()
                            .hset(key, "finished_ms", common::now_ms())
                            .ignore()
                            .hset(key, "reason", reason)
                            .ignore();
                        if let Some(answer) = answer {
                            writes.hset(key, "answer", answer.encode()).ignore();
                            if let Some((idem_key, ttl)) = &saga.idem {
                                writes.set_ex(idem_key, answer.encode(), *ttl).ignore();
                            }
                        }
                        writes.expire(key, RETENTION_SECS).ignore();
                        Ok(Tx::Commit(writes, answer.cloned()))
                    }
                };
                (conn, decision)
            })
            .await
    }

    /// Takes a saga out of automatic handling: an operator must finish it.
    pub async fn needs_attention(&self, id: SagaId, why: &str) -> Result<(), StoreError> {
        let key = saga_key(id);
        let mut writes = redis::pipe();
        writes
            .srem(ACTIVE, id.to_string())
            .ignore()
            .sadd(ATTENTION, id.to_string())
            .ignore()
            .del(lease_key(id))
            .ignore()
            .hset(&key, "attention", why)
            .ignore()
            .expire(&key, ATTENTION_RETENTION_SECS)
            .ignore()
            .expire(ATTENTION, ATTENTION_RETENTION_SECS)
            .ignore();
        self.store.write(&writes).await
    }

    /// Counts one more recovery attempt; returns the count.
    pub async fn count_attempt(&self, id: SagaId) -> Result<i64, StoreError> {
        self.store
            .query(
                redis::cmd("HINCRBY")
                    .arg(saga_key(id))
                    .arg("attempts")
                    .arg(1),
            )
            .await
    }

    /// Extends the owner's leases, all in one pipeline. `XX`: a lease the saga's end deleted
    /// meanwhile is not written again (it would linger until its TTL).
    pub async fn renew(
        &self,
        ids: &[SagaId],
        owner: &str,
        lease: Duration,
    ) -> Result<(), StoreError> {
        let mut renewals = redis::pipe();
        for id in ids {
            renewals
                .cmd("SET")
                .arg(lease_key(*id))
                .arg(owner)
                .arg("XX")
                .arg("PX")
                .arg(lease.as_millis() as u64)
                .ignore();
        }
        let renewals = &renewals;
        self.store
            .run(|mut conn| async move {
                let result = renewals.query_async::<()>(&mut conn).await;
                (conn, result)
            })
            .await
    }

    /// Takes over unfinished sagas whose lease expired (their owner died).
    pub async fn claim_orphans(
        &self,
        owner: &str,
        lease: Duration,
    ) -> Result<Vec<SagaId>, StoreError> {
        let active: Vec<String> = self.store.query(redis::cmd("SMEMBERS").arg(ACTIVE)).await?;
        let ids: Vec<SagaId> = active.iter().filter_map(|s| s.parse().ok()).collect();
        if ids.is_empty() {
            return Ok(ids);
        }
        // One round trip: try to take every lease; only the expired ones are free.
        let mut claims = redis::pipe();
        for id in &ids {
            claims
                .cmd("SET")
                .arg(lease_key(*id))
                .arg(owner)
                .arg("NX")
                .arg("PX")
                .arg(lease.as_millis() as u64);
        }
        let claims = &claims;
        let taken: Vec<Option<String>> = self
            .store
            .run(|mut conn| async move {
                let result = claims.query_async(&mut conn).await;
                (conn, result)
            })
            .await?;
        Ok(ids
            .into_iter()
            .zip(taken)
            .filter_map(|(id, ok)| ok.map(|_| id))
            .collect())
    }
}

fn parse_recorded(raw: Option<&str>) -> Recorded {
    match raw {
        None => Recorded::Nothing,
        Some(text) => match text.strip_prefix("saga:").and_then(|id| id.parse().ok()) {
            Some(id) => Recorded::Saga(id),
            None => Answer::decode(text)
                .map(Recorded::Answer)
                .unwrap_or(Recorded::Nothing),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in [SagaState::Pending, SagaState::Committed, SagaState::Aborted] {
            assert_eq!(SagaState::parse(s.as_str()), Some(s));
        }
        assert_eq!(SagaState::parse("DONE"), None);
    }

    #[test]
    fn idempotency_records_are_a_saga_or_an_answer() {
        let id = SagaId::new();
        assert!(
            matches!(parse_recorded(Some(&format!("saga:{id}"))), Recorded::Saga(s) if s == id)
        );
        let answer = Answer::ok(serde_json::json!({"paid": true}));
        assert!(
            matches!(parse_recorded(Some(&answer.encode())), Recorded::Answer(a) if a == answer)
        );
        assert!(matches!(parse_recorded(None), Recorded::Nothing));
    }
}
