//! The saga log in the saga store (its own Sentinel-managed Redis).
//!
//! Keys, each with a lifetime:
//! - `saga:<id>` → hash: `order`, `user`, `lines` (JSON), `total`, `state`,
//!   `idem`/`idem_ttl` (the checkout's idempotency record), `created_ms`,
//!   `owner` (the instance that drove it last), `attempts`, `decided_ms`,
//!   `step:<step>` (each step's outcome and times, JSON: [`StepLog`]), and
//!   once it ends `finished_ms`, `reason`, `answer`, or `attention` (with
//!   `attention_ms`). Kept while the saga runs; expires [`RETENTION_SECS`]
//!   after it finished, [`ATTENTION_RETENTION_SECS`] if it needs attention.
//! - `lease:<id>` → the instance driving the saga, with a TTL its owner
//!   renews. A saga without a lease has lost its owner. Deleted at the end.
//! - `sagas:active` → set of the sagas not finished yet (recovery scans it).
//! - `sagas:attention` → set of the sagas that could not be finished
//!   automatically (a compensation was dead-lettered, or recovery gave up); an
//!   operator's (`cargo xtask sagas`, which sorts them by their records' times).
//! - `ordersaga:<order>` → the latest saga of the order that reached a
//!   decision (`GET /saga/{order_id}` for an unpaid order; a saga still
//!   undecided is the order's own `checkout`, and a paid order's is its
//!   `paid_by`). Written with the decision, [`POINTER_SECS`]; from the
//!   end of that saga on it lives exactly as long as the saga's record.
//! - `idem:/checkout/<order>:<key>` → `saga:<id>` while the checkout runs,
//!   then its final answer, for the key's lifetime.
//!
//! Step outcomes cost no round trip of their own: the forward steps are
//! written in the decision's MULTI/EXEC, compensations and the settles of
//! recovery in the finish's (or the attention's). A decision with nothing left
//! to do after it (a commit whose settle was sent, an abort that took
//! nothing) carries the end itself, settle included: one MULTI/EXEC instead
//! of two. They are diagnostics: the one written
//! without a replica's confirmation (a compensation left to recovery) may be
//! lost in a failover, and a step of a driver whose decision or finish came
//! second (a slow owner after recovery or an operator) is not recorded.
//!
//! `state` changes once, from PENDING to COMMITTED or ABORTED, by a
//! compare-and-set. It always follows the order's own compare-and-set
//! (`Orders::commit` / `Orders::fence`), which is where a checkout is
//! really decided; this log is what recovery and joining checkouts read.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::idempotency::{Answer, IdemKey};
use common::messages::{Line, Step};
use common::redis_store::{next_reply, Plan, Planned, Store, StoreError, Tx};
use common::types::{Amount, OrderId, SagaId, UserId};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

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
/// How long an order's pointer to its latest decided saga lives from the decision until the
/// saga ends (then it gets the saga record's lifetime): far longer than recovery takes to
/// finish a saga or hand it to an operator.
pub const POINTER_SECS: u64 = 3600;

fn saga_key(id: SagaId) -> String {
    format!("saga:{id}")
}

fn pointer_key(order: &OrderId) -> String {
    format!("ordersaga:{order}")
}

fn step_name(step: Step) -> &'static str {
    match step {
        Step::Reserve => "reserve",
        Step::Charge => "charge",
        Step::Release => "release",
        Step::Refund => "refund",
        Step::Settle => "settle",
    }
}

/// The order in which a saga's steps are shown.
const STEPS: [Step; 5] = [
    Step::Reserve,
    Step::Charge,
    Step::Release,
    Step::Refund,
    Step::Settle,
];

/// One step of a saga as its record keeps it (field `step:<step>`): the last outcome this
/// saga's driver saw, and when the step was sent and ended. Diagnostics only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StepLog {
    /// `reserve`, `charge`, `release`, `refund` or `settle`.
    pub step: String,
    /// `applied`, `refused`, `failed` (dead-lettered), `unknown` (no reply in time),
    /// `skipped` (not sent: an earlier step was refused), `sent` / `not_sent` (a settle, which
    /// has no reply).
    pub outcome: String,
    /// The participant's reason for a refusal or failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the command was first sent (ms since the epoch).
    pub started_ms: u64,
    /// When its outcome was known (or its wait ran out).
    pub ended_ms: u64,
}

impl StepLog {
    pub fn new(
        step: Step,
        outcome: &str,
        reason: Option<String>,
        started_ms: u64,
        ended_ms: u64,
    ) -> Self {
        StepLog {
            step: step_name(step).to_string(),
            outcome: outcome.to_string(),
            reason,
            started_ms,
            ended_ms,
        }
    }

    fn field(&self) -> String {
        format!("step:{}", self.step)
    }

    /// A settle that reached the broker (its outcome is `sent`).
    pub fn was_sent(&self) -> bool {
        self.outcome == "sent"
    }
}

/// Adds the step fields to `writes`.
fn write_steps(writes: &mut redis::Pipeline, key: &str, steps: &[StepLog]) {
    write_fields(writes, key, step_fields(steps));
}

/// The hash fields that log `steps`.
fn step_fields(steps: &[StepLog]) -> Vec<(String, String)> {
    steps
        .iter()
        .map(|step| {
            let json = serde_json::to_string(step).expect("step logs serialize");
            (step.field(), json)
        })
        .collect()
}

/// One HSET of every field (none: nothing): each command is applied, logged and
/// replicated to two replicas, so a saga's fields go together.
fn write_fields(writes: &mut redis::Pipeline, key: &str, fields: Vec<(String, String)>) {
    if !fields.is_empty() {
        writes.hset_multiple(key, &fields).ignore();
    }
}

/// The saga is no longer driven: out of `sagas:active`, its lease gone.
fn write_inactive(writes: &mut redis::Pipeline, id: SagaId) {
    writes
        .srem(ACTIVE, id.to_string())
        .ignore()
        .del(lease_key(id))
        .ignore();
}

/// A first end: `fields` and the answer (if any) in one HSET, the answer under the
/// checkout's key too, no longer active, and the record's lifetime, which starts now.
/// (An answer is only given while the key still points at this saga: see
/// [`SagaStore::finish_with`].)
fn write_end(
    writes: &mut redis::Pipeline,
    saga: &SagaRecord,
    mut fields: Vec<(String, String)>,
    answer: Option<&Answer>,
) {
    let key = saga_key(saga.id);
    if let Some(answer) = answer {
        fields.push(("answer".to_string(), answer.encode()));
        if let Some((idem_key, ttl)) = &saga.idem {
            writes.set_ex(idem_key, answer.encode(), *ttl).ignore();
        }
    }
    write_fields(writes, &key, fields);
    write_inactive(writes, saga.id);
    writes.expire(&key, RETENTION_SECS).ignore();
}

/// Where a saga stands, as an operator sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ViewState {
    /// Not decided yet.
    Pending,
    Committed,
    Aborted,
    /// It could not be finished automatically: an operator must look (`cargo xtask sagas`).
    NeedsAttention,
}

/// A saga as an operator sees it (`GET /saga/{order_id}`, `cargo xtask sagas`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SagaView {
    #[schema(format = Uuid)]
    pub saga_id: String,
    pub order_id: String,
    pub state: ViewState,
    /// True once the saga has ended: settled, or compensated with nothing left taken (a saga
    /// that needs attention has not ended).
    pub finished: bool,
    /// The instance that drove it last (began it, recovered it, or ran an operator's retry).
    pub owner: Option<String>,
    /// The instance holding its lease right now (none once it ended, or while nobody drives it).
    pub lease: Option<String>,
    /// Recovery attempts so far (an operator's retry starts again from 0).
    #[schema(minimum = 0)]
    pub attempts: i64,
    pub created_ms: Option<u64>,
    pub decided_ms: Option<u64>,
    pub finished_ms: Option<u64>,
    /// Why it ended (committed, the refusal, abandoned, aborted by an operator, ...).
    pub reason: Option<String>,
    /// Why it needs an operator.
    pub attention: Option<String>,
    /// Each step with its outcome and times, in saga order (reserve, charge, release, refund,
    /// settle): the forward steps are written with the decision, the others when it ends.
    pub steps: Vec<StepLog>,
    /// False when the saga's record has expired (kept 10 minutes after it ended): then only
    /// what the order itself shows is known (it was paid by this saga).
    pub retained: bool,
}

impl SagaView {
    /// What is left of a committed saga once its record expired: the order says it paid.
    pub fn expired_commit(order: &OrderId, saga: SagaId) -> Self {
        SagaView {
            saga_id: saga.to_string(),
            order_id: order.to_string(),
            state: ViewState::Committed,
            finished: true,
            owner: None,
            lease: None,
            attempts: 0,
            created_ms: None,
            decided_ms: None,
            finished_ms: None,
            reason: None,
            attention: None,
            steps: Vec::new(),
            retained: false,
        }
    }

    /// This saga as the one that paid its order: committed, whatever its record says yet
    /// (the order decides; the log follows a moment later, after the settle).
    pub fn paid_the_order(self) -> Self {
        let state = match self.state {
            ViewState::Pending => ViewState::Committed,
            other => other,
        };
        SagaView { state, ..self }
    }

    fn from_fields(
        id: SagaId,
        fields: &HashMap<String, String>,
        lease: Option<String>,
        active: bool,
    ) -> Self {
        let text = |name: &str| fields.get(name).cloned();
        let ms = |name: &str| fields.get(name).and_then(|v| v.parse().ok());
        let attention = text("attention");
        let state = match (
            &attention,
            fields.get("state").and_then(|s| SagaState::parse(s)),
        ) {
            (Some(_), _) => ViewState::NeedsAttention,
            (None, Some(SagaState::Committed)) => ViewState::Committed,
            (None, Some(SagaState::Aborted)) => ViewState::Aborted,
            (None, _) => ViewState::Pending,
        };
        let steps = STEPS
            .iter()
            .filter_map(|s| fields.get(&format!("step:{}", step_name(*s))))
            .filter_map(|json| serde_json::from_str(json).ok())
            .collect();
        SagaView {
            saga_id: id.to_string(),
            order_id: text("order").unwrap_or_default(),
            state,
            finished: !active && attention.is_none(),
            owner: text("owner"),
            lease,
            attempts: fields
                .get("attempts")
                .and_then(|a| a.parse().ok())
                .unwrap_or(0),
            created_ms: ms("created_ms"),
            decided_ms: ms("decided_ms"),
            finished_ms: ms("finished_ms"),
            reason: text("reason"),
            attention,
            steps,
            retained: true,
        }
    }

    /// When it began, or when it was handed to an operator (the order of `cargo xtask sagas`).
    fn since_ms(&self) -> u64 {
        self.created_ms.unwrap_or(0)
    }
}

/// The sagas an operator looks at, each list oldest first.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SagaList {
    /// Not finished and handled automatically (running, or waiting for recovery).
    pub pending: Vec<SagaView>,
    /// Handed to an operator.
    pub attention: Vec<SagaView>,
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

    /// What a checkout's decision on the order was: committed or not.
    pub fn decided(committed: bool) -> SagaState {
        if committed {
            SagaState::Committed
        } else {
            SagaState::Aborted
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

/// How a finish ended, for the request that waits for the saga's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Finished {
    /// The answer that stands for the checkout's key: this finish's, an earlier driver's,
    /// or one the key recorded since this saga ended without one.
    Answer(Answer),
    /// The saga ended without an answer.
    Nothing,
    /// The saga had ended without an answer, and its key now points at a later saga (a
    /// retry with the same key began it), whose answer will be the key's: this finish
    /// records none.
    KeyMoved,
}

/// What the checkout's idempotency key has recorded so far.
#[derive(Debug)]
pub enum Recorded {
    Nothing,
    Answer(Answer),
    Saga(SagaId),
}

/// A new saga's record, lease and active entry, and the checkout's key pointing at it.
fn begin_writes(saga: &SagaRecord, owner: &str, lease: Duration) -> redis::Pipeline {
    let lines = serde_json::to_string(&saga.lines).expect("lines serialize");
    let mut writes = redis::pipe();
    let mut fields = vec![
        ("order", saga.order_id.to_string()),
        ("user", saga.user_id.to_string()),
        ("lines", lines),
        ("total", saga.total.to_string()),
        ("state", SagaState::Pending.as_str().to_string()),
        ("created_ms", common::now_ms().to_string()),
        ("owner", owner.to_string()),
        ("attempts", "0".to_string()),
    ];
    if let Some((idem_key, ttl)) = &saga.idem {
        fields.push(("idem", idem_key.clone()));
        fields.push(("idem_ttl", ttl.to_string()));
        writes.set_ex(idem_key, saga_key(saga.id), *ttl).ignore();
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
    writes
}

/// What [`SagaStore::decide`] writes.
#[derive(Debug, Clone)]
pub struct Decision {
    pub state: SagaState,
    /// The saga held its order (froze it): the order's pointer names it from now on.
    pub held_order: bool,
    /// The forward steps' logs.
    pub steps: Vec<StepLog>,
    /// Nothing is left to do after the decision (an abort that took nothing, a commit whose
    /// settle was sent first, an abandoned saga): it ends in the same MULTI/EXEC.
    pub end: Option<End>,
}

/// How a saga ends: the checkout's answer (none for a saga abandoned before it sent
/// anything), why, and the steps run after the decision (the settle).
#[derive(Debug, Clone)]
pub struct End {
    pub answer: Option<Answer>,
    pub reason: String,
    pub steps: Vec<StepLog>,
}

/// What [`SagaStore::decide`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logged {
    /// This call decided (and ended the saga, if the decision carried its end).
    Now,
    /// Another driver decided first, this; nothing was written.
    Before(SagaState),
}

/// The writes of a decision on a PENDING saga: one HSET of the record's new fields, the
/// order's pointer, and with an end everything [`SagaStore::finish_with`] writes for a
/// first end (the record's lifetime starts now, and the pointer's with it).
fn decision_writes(
    saga: &SagaRecord,
    decision: &Decision,
    pointer: Option<&str>,
) -> redis::Pipeline {
    let key = saga_key(saga.id);
    let now = common::now_ms().to_string();
    let mut writes = redis::pipe();
    let mut fields = vec![
        ("state".to_string(), decision.state.as_str().to_string()),
        ("decided_ms".to_string(), now.clone()),
    ];
    fields.extend(step_fields(&decision.steps));
    let Some(end) = &decision.end else {
        write_fields(&mut writes, &key, fields);
        if let Some(pointer) = pointer {
            writes
                .set_ex(pointer, saga.id.to_string(), POINTER_SECS)
                .ignore();
        }
        return writes;
    };
    fields.push(("finished_ms".to_string(), now));
    fields.push(("reason".to_string(), end.reason.clone()));
    fields.extend(step_fields(&end.steps));
    // A pending, active saga's key cannot have moved to another saga (`begin` waits for
    // this one), so a decision that ends the saga records its answer under it.
    write_end(&mut writes, saga, fields, end.answer.as_ref());
    if let Some(pointer) = pointer {
        writes
            .set_ex(pointer, saga.id.to_string(), RETENTION_SECS as u64)
            .ignore();
    }
    writes
}

#[derive(Clone)]
pub struct SagaStore {
    store: Arc<Store>,
    /// Begins, decisions and ends go through it: see `begin`, `decide`, `finish_with`.
    planned: Arc<Planned>,
}

impl SagaStore {
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            planned: Arc::new(Planned::start(store.clone())),
            store,
        }
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

    /// Records `answer` under a checkout's key unless something else stands there: returns
    /// the answer that stands (this one, or the first), or the saga the key points at. A
    /// key that points at `over` (a saga that ended without an answer) is recorded over.
    /// One WATCHed transaction (a plan), so a begin under the same key in between is never
    /// overwritten. Never [`Recorded::Nothing`].
    pub async fn record_first_answer(
        &self,
        idem: &IdemKey,
        answer: &Answer,
        over: Option<SagaId>,
    ) -> Result<Recorded, StoreError> {
        let key = idem.redis_key();
        let mut reads = redis::pipe();
        reads.get(&key);
        let (idem, answer) = (idem.clone(), answer.clone());
        let plan = Plan {
            watch: vec![key.clone()],
            also_touches: Vec::new(),
            reads,
            decide: Box::new(move |replies| {
                let raw: Option<String> = next_reply(&mut replies.into_iter(), &key)?;
                Ok(match parse_recorded(raw.as_deref()) {
                    Recorded::Saga(saga) if Some(saga) != over => Tx::Abort(Recorded::Saga(saga)),
                    Recorded::Answer(first) => Tx::Abort(Recorded::Answer(first)),
                    Recorded::Nothing | Recorded::Saga(_) => {
                        let mut writes = redis::pipe();
                        idem.record(&mut writes, &answer);
                        Tx::Commit(writes, Recorded::Answer(answer.clone()))
                    }
                })
            }),
        };
        self.planned.run(plan).await
    }

    /// Writes the saga's record and lease, and points the checkout's key at
    /// it, unless that key already has an answer or a running saga.
    ///
    /// A plan (concurrent checkouts' begins share their round trips and WAIT)
    /// for what nearly every checkout meets: a key with nothing recorded, or
    /// with an answer. A key that points at another saga needs a second look
    /// (is that saga running?), which [`SagaStore::begin_alone`] takes.
    pub async fn begin(
        &self,
        saga: &SagaRecord,
        owner: &str,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let watch: Vec<String> = saga.idem.iter().map(|(k, _)| k.clone()).collect();
        let mut reads = redis::pipe();
        for idem_key in &watch {
            reads.get(idem_key);
        }
        let (record, owner_name) = (saga.clone(), owner.to_string());
        let plan = Plan {
            watch: watch.clone(),
            also_touches: vec![saga_key(saga.id), lease_key(saga.id)],
            reads,
            decide: Box::new(move |replies| {
                let mut replies = replies.into_iter();
                if let Some(idem_key) = watch.first() {
                    let raw: Option<String> = next_reply(&mut replies, idem_key)?;
                    match parse_recorded(raw.as_deref()) {
                        Recorded::Answer(a) => return Ok(Tx::Abort(Some(Begin::Answered(a)))),
                        // A retry after an EXEC whose reply was lost finds its own saga.
                        Recorded::Saga(id) if id == record.id => {
                            return Ok(Tx::Abort(Some(Begin::Started)))
                        }
                        Recorded::Saga(_) => return Ok(Tx::Abort(None)),
                        Recorded::Nothing => {}
                    }
                }
                let writes = begin_writes(&record, &owner_name, lease);
                Ok(Tx::Commit(writes, Some(Begin::Started)))
            }),
        };
        match self.planned.run(plan).await? {
            Some(begun) => Ok(begun),
            None => self.begin_alone(saga, owner, lease).await,
        }
    }

    /// [`SagaStore::begin`] as one transaction of its own, with the second look.
    async fn begin_alone(
        &self,
        saga: &SagaRecord,
        owner: &str,
        lease: Duration,
    ) -> Result<Begin, StoreError> {
        let watched: Vec<String> = saga.idem.iter().map(|(k, _)| k.clone()).collect();
        let watched = &watched;
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
                            // The key's saga is running, or waits for an operator: the
                            // checkout joins it (and hears that), it never starts a second
                            // saga under the same key meanwhile.
                            Recorded::Saga(id) => {
                                let (running, stuck): (bool, bool) = redis::pipe()
                                    .sismember(ACTIVE, id.to_string())
                                    .hexists(saga_key(id), "attention")
                                    .query_async(&mut conn)
                                    .await
                                    .map_err(StoreError::Redis)?;
                                if running || stuck {
                                    return Ok(Tx::Abort(Begin::Joined(id)));
                                }
                            }
                            Recorded::Nothing => {}
                        }
                    }
                    let writes = begin_writes(saga, owner, lease);
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

    /// Drops an active entry whose record is gone (it expired): nothing is
    /// left to recover, and the entry would otherwise be scanned forever.
    pub async fn forget(&self, id: SagaId) -> Result<(), StoreError> {
        let mut writes = redis::pipe();
        write_inactive(&mut writes, id);
        self.store.write(&writes).await
    }

    /// True while the saga has not finished.
    pub async fn is_active(&self, id: SagaId) -> Result<bool, StoreError> {
        self.store
            .query(redis::cmd("SISMEMBER").arg(ACTIVE).arg(id.to_string()))
            .await
    }

    /// The compare-and-set: moves PENDING to `decision.state`, with what `decision` carries
    /// (the forward steps' logs, the order's pointer, and the end when nothing is left to do)
    /// in the same MULTI/EXEC. A plan: concurrent sagas' decisions share their round trips and
    /// WAIT.
    pub async fn decide(
        &self,
        saga: &SagaRecord,
        decision: Decision,
    ) -> Result<Logged, StoreError> {
        let key = saga_key(saga.id);
        let pointer = decision.held_order.then(|| pointer_key(&saga.order_id));
        let mut also_touches: Vec<String> = pointer.iter().cloned().collect();
        if decision.end.is_some() {
            also_touches.push(lease_key(saga.id));
            also_touches.extend(saga.idem.iter().map(|(idem_key, _)| idem_key.clone()));
        }
        let mut reads = redis::pipe();
        reads.hget(&key, "state");
        let saga = saga.clone();
        let plan = Plan {
            watch: vec![key.clone()],
            also_touches,
            reads,
            decide: Box::new(move |replies| {
                let current: Option<String> = next_reply(&mut replies.into_iter(), &key)?;
                let Some(text) = current else {
                    return Err(StoreError::corrupt(key.as_str(), "saga has no state"));
                };
                match SagaState::parse(&text) {
                    None => Err(StoreError::corrupt(key.as_str(), "bad state")),
                    Some(SagaState::Pending) => Ok(Tx::Commit(
                        decision_writes(&saga, &decision, pointer.as_deref()),
                        Logged::Now,
                    )),
                    Some(decided) => Ok(Tx::Abort(Logged::Before(decided))),
                }
            }),
        };
        self.planned.run(plan).await
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
    ) -> Result<Finished, StoreError> {
        self.finish_with(saga, answer, reason, &[]).await
    }

    /// [`SagaStore::finish`], recording `steps` (compensations, the settle) in the same
    /// MULTI/EXEC. The first end's time and reason stand, like its answer (a slow owner
    /// finishing after recovery or an operator does not rewrite why the saga ended).
    pub async fn finish_with(
        &self,
        saga: &SagaRecord,
        answer: Option<&Answer>,
        reason: &str,
        steps: &[StepLog],
    ) -> Result<Finished, StoreError> {
        let key = saga_key(saga.id);
        let pointer = pointer_key(&saga.order_id);
        let idem_key = saga.idem.as_ref().map(|(idem_key, _)| idem_key.clone());
        let mut reads = redis::pipe();
        // The first answer, whether the order still points here, and where the
        // checkout's key points.
        reads.hget(&key, "answer").get(&pointer);
        let mut watch = vec![key.clone(), pointer.clone()];
        if let Some(idem_key) = &idem_key {
            reads.get(idem_key);
            watch.push(idem_key.clone());
        }
        let (saga, answer, reason, steps) = (
            saga.clone(),
            answer.cloned(),
            reason.to_string(),
            steps.to_vec(),
        );
        // A plan: concurrent sagas' ends share their round trips and WAIT. The pointer is
        // watched too: a later checkout's decision may point it elsewhere meanwhile. So is
        // the checkout's key: a saga that ended without an answer (recovery aborted it) lets
        // a repeat of its key start another saga, whose answer a late finish of this one
        // must not overwrite.
        let plan = Plan {
            watch,
            also_touches: Vec::new(),
            reads,
            decide: Box::new(move |replies| {
                let mut replies = replies.into_iter();
                let first: Option<String> = next_reply(&mut replies, &key)?;
                let latest: Option<String> = next_reply(&mut replies, &pointer)?;
                let key_now = match &idem_key {
                    Some(idem_key) => {
                        let held: Option<String> = next_reply(&mut replies, idem_key)?;
                        parse_recorded(held.as_deref())
                    }
                    None => Recorded::Nothing,
                };
                let mut writes = redis::pipe();
                // Finished before (another driver): the first answer stands. Its
                // active entry and lease go all the same, in case a driver that
                // took the saga over meanwhile put them back.
                if let Some(first) = first {
                    write_inactive(&mut writes, saga.id);
                    let stands = Answer::decode(&first).map_or(Finished::Nothing, Finished::Answer);
                    return Ok(Tx::Commit(writes, stands));
                }
                // The key is this saga's (or holds nothing): this answer is the key's. Else
                // the saga ended without one before and the key has moved on: this saga
                // records none, and the request hears what the key stands for.
                let (answer, stands) = match key_now {
                    Recorded::Saga(other) if other != saga.id => (None, Finished::KeyMoved),
                    Recorded::Answer(recorded) => (None, Finished::Answer(recorded)),
                    Recorded::Nothing | Recorded::Saga(_) => {
                        let stands = answer.clone().map_or(Finished::Nothing, Finished::Answer);
                        (answer.clone(), stands)
                    }
                };
                writes
                    .hset_nx(&key, "finished_ms", common::now_ms())
                    .ignore()
                    .hset_nx(&key, "reason", &reason)
                    .ignore();
                if latest.as_deref() == Some(saga.id.to_string().as_str()) {
                    writes.expire(&pointer, RETENTION_SECS).ignore();
                }
                write_end(&mut writes, &saga, step_fields(&steps), answer.as_ref());
                Ok(Tx::Commit(writes, stands))
            }),
        };
        self.planned.run(plan).await
    }

    /// Takes a saga out of automatic handling: an operator must finish it. The order's
    /// pointer to it (if it is the latest) lives as long as its record (`GT`: only lengthened).
    pub async fn needs_attention(
        &self,
        saga: &SagaRecord,
        why: &str,
        steps: &[StepLog],
    ) -> Result<(), StoreError> {
        let id = saga.id;
        let key = saga_key(id);
        let mut writes = redis::pipe();
        write_inactive(&mut writes, id);
        writes
            .sadd(ATTENTION, id.to_string())
            .ignore()
            .hset(&key, "attention", why)
            .ignore()
            .hset(&key, "attention_ms", common::now_ms())
            .ignore()
            // NX: from the first time only. A saga handed to an operator again (a retry that
            // failed again) keeps its first deadline, which the participants' records of
            // what it took outlive (`TAKEN_TTL_SECS`, set when it took them).
            .cmd("EXPIRE")
            .arg(&key)
            .arg(ATTENTION_RETENTION_SECS)
            .arg("NX")
            .ignore()
            .expire(ATTENTION, ATTENTION_RETENTION_SECS)
            .ignore()
            .cmd("EXPIRE")
            .arg(pointer_key(&saga.order_id))
            .arg(ATTENTION_RETENTION_SECS)
            .arg("GT")
            .ignore();
        write_steps(&mut writes, &key, steps);
        self.store.write(&writes).await
    }

    /// Counts one more recovery attempt by `owner`; returns the count.
    pub async fn count_attempt(&self, id: SagaId, owner: &str) -> Result<i64, StoreError> {
        let key = saga_key(id);
        let mut attempt = redis::pipe();
        attempt
            .hincr(&key, "attempts", 1)
            .hset(&key, "owner", owner)
            .ignore();
        let attempt = &attempt;
        let (count,): (i64,) = self
            .store
            .run(|mut conn| async move {
                let result = attempt.query_async(&mut conn).await;
                (conn, result)
            })
            .await?;
        Ok(count)
    }

    /// Records step outcomes on their own, without waiting for a replica (the one path that
    /// has no write of its own to carry them: compensations left to recovery).
    pub async fn record_steps(&self, id: SagaId, steps: &[StepLog]) -> Result<(), StoreError> {
        if steps.is_empty() {
            return Ok(());
        }
        let mut writes = redis::pipe();
        write_steps(&mut writes, &saga_key(id), steps);
        let writes = &writes;
        self.store
            .run(|mut conn| async move {
                let result = writes.query_async::<()>(&mut conn).await;
                (conn, result)
            })
            .await
    }

    /// The latest saga of `order` that reached a decision, while its pointer lives.
    pub async fn latest_of_order(&self, order: &OrderId) -> Result<Option<SagaId>, StoreError> {
        let raw: Option<String> = self
            .store
            .query(redis::cmd("GET").arg(pointer_key(order)))
            .await?;
        Ok(raw.and_then(|id| id.parse().ok()))
    }

    /// How operators see these sagas, in one round trip; sagas without a record are left out.
    pub async fn views(&self, ids: &[SagaId]) -> Result<Vec<SagaView>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut reads = redis::pipe();
        for id in ids {
            reads
                .hgetall(saga_key(*id))
                .get(lease_key(*id))
                .sismember(ACTIVE, id.to_string());
        }
        let reads = &reads;
        let raw: Vec<redis::Value> = self
            .store
            .run(|mut conn| async move {
                let result = reads.query_async(&mut conn).await;
                (conn, result)
            })
            .await?;
        let mut views = Vec::with_capacity(ids.len());
        for (id, chunk) in ids.iter().zip(raw.chunks(3)) {
            let [fields, lease, active] = chunk else {
                return Err(StoreError::corrupt(saga_key(*id), "short pipeline reply"));
            };
            let bad = |e: String| StoreError::corrupt(saga_key(*id), e);
            let fields: HashMap<String, String> =
                redis::from_redis_value(fields.clone()).map_err(|e| bad(e.to_string()))?;
            if fields.is_empty() {
                continue;
            }
            let lease: Option<String> =
                redis::from_redis_value(lease.clone()).map_err(|e| bad(e.to_string()))?;
            let active: bool =
                redis::from_redis_value(active.clone()).map_err(|e| bad(e.to_string()))?;
            views.push(SagaView::from_fields(*id, &fields, lease, active));
        }
        Ok(views)
    }

    /// One saga as an operator sees it; `None` if it has no record (never, or expired).
    pub async fn view(&self, id: SagaId) -> Result<Option<SagaView>, StoreError> {
        Ok(self.views(&[id]).await?.pop())
    }

    /// The sagas not finished (`sagas:active`) and those handed to an operator
    /// (`sagas:attention`), each oldest first, at most `limit` of each.
    pub async fn list(&self, limit: usize) -> Result<SagaList, StoreError> {
        let members = |set: &'static str| async move {
            let ids: Vec<String> = self.store.query(redis::cmd("SMEMBERS").arg(set)).await?;
            let ids: Vec<SagaId> = ids.iter().filter_map(|s| s.parse().ok()).collect();
            let mut views = self.views(&ids).await?;
            views.sort_by_key(SagaView::since_ms);
            views.truncate(limit);
            Ok::<_, StoreError>(views)
        };
        Ok(SagaList {
            pending: members(ACTIVE).await?,
            attention: members(ATTENTION).await?,
        })
    }

    /// An operator takes a saga over (`retry`, `abort`): back among the active sagas (out of
    /// the operator's set), its recovery attempts counted from 0, its lease to `owner`. The
    /// lease is taken even from a live owner: two drivers of one saga agree by the order's
    /// compare-and-set and the finish's. False (nothing written) when the record has expired
    /// since the operator looked: written anyway, its fields would make a partial record
    /// without a lifetime that recovery could never load.
    pub async fn take_over(
        &self,
        id: SagaId,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let key = saga_key(id);
        let mut reads = redis::pipe();
        reads.exists(&key);
        let owner = owner.to_string();
        let plan = Plan {
            watch: vec![key.clone()],
            also_touches: vec![lease_key(id)],
            reads,
            decide: Box::new(move |replies| {
                let exists: bool = next_reply(&mut replies.into_iter(), &key)?;
                if !exists {
                    return Ok(Tx::Abort(false));
                }
                let mut writes = redis::pipe();
                writes
                    .srem(ATTENTION, id.to_string())
                    .ignore()
                    .sadd(ACTIVE, id.to_string())
                    .ignore()
                    .hdel(&key, &["attention", "attention_ms"])
                    .ignore()
                    .hset(&key, "attempts", 0)
                    .ignore()
                    .hset(&key, "owner", &owner)
                    .ignore()
                    .set(lease_key(id), &owner)
                    .arg("PX")
                    .arg(lease.as_millis() as u64)
                    .ignore();
                Ok(Tx::Commit(writes, true))
            }),
        };
        self.planned.run(plan).await
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
