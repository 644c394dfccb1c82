//! The saga log in the saga store (its own Sentinel-managed Redis).
//!
//! Keys:
//! - `checkout:<order>:<incarnation>` → the id of the saga that currently
//!   owns the order's checkout. Set when a saga begins (so a second checkout of the same order
//!   joins it instead of starting another); deleted when an aborted saga has
//!   finished compensating (so the order may be checked out again); kept
//!   for a week after a commit, so a checkout that read the order before it
//!   was marked paid joins the committed saga instead of charging again.
//! - `saga:<id>` → hash: `order`, `user`, `lines` (JSON), `total`, `state`.
//! - `lease:<id>` → the instance driving the saga, with a TTL its owner
//!   renews. A saga without a lease has lost its owner.
//! - `sagas:active` → set of the sagas not finished yet (recovery scans it).
//!
//! `state` changes once, from PENDING to COMMITTED or ABORTED, by a
//! compare-and-set: whoever decides first wins, and everybody else follows.

use std::sync::Arc;
use std::time::Duration;

use common::messages::Line;
use common::redis_store::{Store, StoreError, Tx};
use common::types::{Amount, OrderId, SagaId, UserId};

use crate::saga::SagaState;

const ACTIVE: &str = "sagas:active";

fn checkout_key(saga: &SagaRecord) -> String {
    format!("checkout:{}:{}", saga.order_id, saga.incarnation)
}

/// How long a committed saga's claim on its order is kept.
const COMMITTED_CLAIM_TTL_SECS: i64 = 7 * 24 * 3600;

fn saga_key(id: SagaId) -> String {
    format!("saga:{id}")
}

fn lease_key(id: SagaId) -> String {
    format!("lease:{id}")
}

/// Everything needed to drive or recover a saga, as written when it began.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRecord {
    pub id: SagaId,
    pub order_id: OrderId,
    /// The order's incarnation the saga was begun for.
    pub incarnation: String,
    pub user_id: UserId,
    pub lines: Vec<Line>,
    pub total: Amount,
}

/// Whether [`SagaStore::begin`] started the saga or found one already running.
pub enum Begin {
    Started,
    Joined(SagaId),
}

#[derive(Clone)]
pub struct SagaStore {
    store: Arc<Store>,
}

impl SagaStore {
    pub fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// Claims the order for `saga` and writes the record, unless another saga holds it.
    pub async fn begin(
        &self,
        saga: &SagaRecord,
        owner: &str,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let checkout = checkout_key(saga);
        let checkout = &checkout;
        let lines = serde_json::to_string(&saga.lines).expect("lines serialize");
        let lines = &lines;
        self.store
            .transact(std::slice::from_ref(checkout), |mut conn| async move {
                let current: Result<Option<String>, _> =
                    redis::cmd("GET").arg(checkout).query_async(&mut conn).await;
                let decision = match current {
                    Err(e) => Err(StoreError::Redis(e)),
                    Ok(Some(existing)) => existing
                        .parse()
                        .map(|id| Tx::Abort(Begin::Joined(id)))
                        .map_err(|e| StoreError::corrupt(checkout.as_str(), e)),
                    Ok(None) => {
                        let mut writes = redis::pipe();
                        writes
                            .set(checkout, saga.id.to_string())
                            .ignore()
                            .hset_multiple(
                                saga_key(saga.id),
                                &[
                                    ("order", saga.order_id.to_string()),
                                    ("incarnation", saga.incarnation.clone()),
                                    ("user", saga.user_id.to_string()),
                                    ("lines", lines.clone()),
                                    ("total", saga.total.to_string()),
                                    ("state", SagaState::Pending.as_str().to_string()),
                                ],
                            )
                            .ignore()
                            .set(lease_key(saga.id), owner)
                            .arg("PX")
                            .arg(lease.as_millis() as u64)
                            .ignore()
                            .sadd(ACTIVE, saga.id.to_string())
                            .ignore();
                        Ok(Tx::Commit(writes, Begin::Started))
                    }
                };
                (conn, decision)
            })
            .await
    }

    /// Reads a saga's record and state; `None` if there is no such saga.
    pub async fn load(&self, id: SagaId) -> Result<Option<(SagaRecord, SagaState)>, StoreError> {
        let key = saga_key(id);
        let fields: std::collections::HashMap<String, String> =
            self.store.query(redis::cmd("HGETALL").arg(&key)).await?;
        if fields.is_empty() {
            return Ok(None);
        }
        let field = |name: &str| {
            fields
                .get(name)
                .ok_or_else(|| StoreError::corrupt(&key, format!("missing field {name}")))
        };
        let bad = |e: String| StoreError::corrupt(&key, e);
        let record = SagaRecord {
            id,
            order_id: OrderId::parse(field("order")?).map_err(|e| bad(e.to_string()))?,
            incarnation: field("incarnation")?.clone(),
            user_id: UserId::parse(field("user")?).map_err(|e| bad(e.to_string()))?,
            lines: serde_json::from_str(field("lines")?).map_err(|e| bad(e.to_string()))?,
            total: field("total")?
                .parse::<i64>()
                .ok()
                .and_then(Amount::new)
                .ok_or_else(|| bad("bad total".into()))?,
        };
        let state = SagaState::parse(field("state")?).ok_or_else(|| bad("bad state".into()))?;
        Ok(Some((record, state)))
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
                            writes.hset(key, "state", decision.as_str()).ignore();
                            Ok(Tx::Commit(writes, decision))
                        }
                        Some(decided) => Ok(Tx::Abort(decided)),
                    },
                };
                (conn, decision)
            })
            .await
    }

    /// Marks the saga finished. An aborted saga also frees its order for a new checkout.
    pub async fn finish(&self, saga: &SagaRecord, state: SagaState) -> Result<(), StoreError> {
        let checkout = checkout_key(saga);
        let checkout = &checkout;
        let id = saga.id.to_string();
        let id = &id;
        self.store
            .transact(std::slice::from_ref(checkout), |mut conn| async move {
                let current: Result<Option<String>, _> =
                    redis::cmd("GET").arg(checkout).query_async(&mut conn).await;
                let decision = current.map_err(StoreError::Redis).map(|current| {
                    let mut writes = redis::pipe();
                    writes
                        .srem(ACTIVE, id)
                        .ignore()
                        .del(lease_key(saga.id))
                        .ignore();
                    if current.as_deref() == Some(id.as_str()) {
                        if state == SagaState::Aborted {
                            writes.del(checkout).ignore();
                        } else {
                            writes.expire(checkout, COMMITTED_CLAIM_TTL_SECS).ignore();
                        }
                    }
                    Tx::Commit(writes, ())
                });
                (conn, decision)
            })
            .await
    }

    /// True once the saga has finished (committed and order paid, or aborted and compensated).
    pub async fn is_finished(&self, id: SagaId) -> Result<bool, StoreError> {
        let active: bool = self
            .store
            .query(redis::cmd("SISMEMBER").arg(ACTIVE).arg(id.to_string()))
            .await?;
        Ok(!active)
    }

    /// Extends the owner's leases, all in one pipeline.
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
