//! The checkout saga, whole: begin, steps, the one decision, completion,
//! and recovery of sagas whose owner died.
//!
//! ```text
//!   begin: write the saga record + lease, then freeze the order for it
//!                 │
//!      reserve ──►│◄── charge        (sequential or parallel, each with a timeout)
//!                 │
//!   all applied? ─┴─ decide on the order itself (compare-and-set), then log it:
//!      commit: order paid by this saga ──► 200 ──► settle ──► COMMITTED + finished
//!      fence:  order's hold removed    ──► ABORTED ──► release + refund ──► finished ──► 400
//!              (nothing was taken:         ABORTED + finished ──► 400)
//! ```
//!
//! A decision after which nothing is left to do is logged with the saga's
//! end, in one MULTI/EXEC: a commit (its settle is sent before the log, since
//! the order has decided already: if the owner dies in between, recovery
//! finds the order paid by this saga and settles again, which replays) and an
//! abort that took nothing.
//!
//! Why the decision is taken on the order: the order is the record of what
//! was bought. While a saga holds it (`checkout`), `addItem` answers 409,
//! and `Orders::commit` marks it paid only if this saga still holds it, so a
//! paid order was charged and reserved for exactly what it shows. An abort
//! (or a recovery, or `batch_init` overwriting the order) removes the hold
//! first, after which the saga can never commit. The saga store's state
//! follows that decision; it is what recovery and waiting checkouts read.
//!
//! A saga runs in a task of its own, not in the HTTP request: a client that
//! hangs up or a request that runs out of time never cuts a saga short. The
//! request waits for the answer until `CHECKOUT_TIMEOUT_MS`, and then says
//! 503 (the outcome is not known yet; retrying with the same
//! `Idempotency-Key` waits for the same saga).
//!
//! Answers tell the truth: 200 only once the order is paid; 400 only once
//! every compensation is confirmed (nothing stayed taken); otherwise 503.
//! "Paid" and "decided" mean on two nodes: every write and compare-and-set of
//! the order and saga stores returns only once a replica has it (the store's
//! WAIT), and so does a read a checkout answers from (a paid order, a
//! recorded answer). A decision no replica confirmed
//! ([`common::redis_store::StoreError::NotDurable`]) is not a decision yet: it
//! is handled like any decision that could not be recorded, the request
//! answers 503 and recovery finishes the saga once the lease lapses (fencing
//! the order finds the decision if it survived).
//!
//! How the two steps are sent (`SAGA_STEPS`, [`crate::contention`]): by
//! default at once (a step's wait less), except while another saga of this
//! instance reserves one of the same items or stock refused one of them in
//! the last seconds: then in sequence, reserve first, charge only if the
//! reservation held. On a refusal by stock (most checkouts
//! of a sold-out item) that saves the charge, the refund and their replies.
//!
//! A step that timed out counts as possibly done, so an abort compensates
//! it; participants make a compensation for a command that never arrived a
//! tombstone, and refuse a forward command older than its expiry.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::broker::Broker;
use common::config::{StepOrder, COMMAND_GRACE};
use common::error::ApiError;
use common::grouped::Grouped;
use common::idempotency::{Answer, IdemKey};
use common::messages::{Action, Command, Outcome, Step};
use common::redis_store::StoreError;
use common::types::{OrderId, SagaId};
use serde_json::json;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;

use crate::contention::Contention;
use crate::orders::{Freeze, Order, Orders};
use crate::replies::Replies;
use crate::saga_store::{
    Begin, Decision, End, Finished, Logged, Progress, Recorded, SagaRecord, SagaState, SagaStore,
    SagaView, StepLog, ViewState,
};

/// What came back for one step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StepResult {
    Applied,
    Refused(String),
    /// No reply in time: the command may or may not have been applied.
    Unknown,
    /// The participant dead-lettered the command: whether it applied is unknown.
    Failed(String),
    /// Never sent (sequential mode after a refused reservation).
    Skipped,
}

impl StepResult {
    fn may_have_happened(&self) -> bool {
        matches!(
            self,
            StepResult::Applied | StepResult::Unknown | StepResult::Failed(_)
        )
    }
}

/// How compensations ended.
enum Undone {
    /// Every compensation applied: nothing the saga took is still taken.
    Confirmed,
    /// Some compensation did not answer in time: recovery will try again.
    Unconfirmed,
    /// A compensation was dead-lettered: an operator must look.
    Failed(String),
}

/// Where the participants' commands go and how long to wait for them.
pub struct Routing {
    pub stock_queue: String,
    pub payment_queue: String,
    pub reply_queue: String,
    pub step_timeout: Duration,
    /// How long a checkout request waits for its answer before saying 503.
    pub checkout_timeout: Duration,
    pub lease: Duration,
    pub step_order: StepOrder,
    /// This instance's name, written as the owner of its leases.
    pub instance: String,
}

/// How many times a checkout starts over after the saga it waited for was abandoned.
const BEGIN_TRIES: usize = 5;
/// Recovery attempts before a saga is handed to an operator.
const RECOVERY_ATTEMPTS: i64 = 20;
/// How often a step is sent again after the broker connection was lost while
/// it waited (each time with a fresh step timeout).
const RESENDS_AFTER_RECONNECT: usize = 2;

/// How long after its first send a forward command may still be applied:
/// every send may wait a step timeout to publish and one for the reply.
fn step_lifetime(step_timeout: Duration) -> Duration {
    2 * step_timeout * (RESENDS_AFTER_RECONNECT as u32 + 1) + COMMAND_GRACE
}

/// How long after a compensation a forward command of the same saga may
/// still arrive and be applied: another driver (recovery, an operator) may
/// compensate while the first step is still being sent, and in sequential
/// mode the second step is first sent only after the first ended. The
/// participants' tombstones must outlive this (checked by a test).
#[cfg(test)]
fn command_horizon(step_timeout: Duration) -> Duration {
    2 * step_lifetime(step_timeout)
}
/// Tries of one compensation before it is left to recovery.
const COMPENSATION_TRIES: usize = 3;

pub struct Orchestrator {
    pub orders: Arc<Orders>,
    sagas: SagaStore,
    broker: Arc<Broker>,
    /// Commands go out through it: concurrent sagas' commands to one queue share a message.
    outgoing: Arc<Grouped>,
    replies: Arc<Replies>,
    routing: Routing,
    leases: Leases,
    /// The items of this instance's sagas likely to run out (`SAGA_STEPS=adaptive`).
    contention: Contention,
}

/// Whether an order is held by a checkout right now (for `addItem`).
pub enum Hold {
    Free,
    /// Held by a saga that has ended: the hold may be cleared.
    Stale(SagaId),
    Held(SagaId),
}

fn paid(order_id: &OrderId) -> Answer {
    Answer::ok(json!({ "order_id": order_id, "paid": true }))
}

fn not_found(order_id: &OrderId) -> Answer {
    Answer::refusal(&ApiError::NotFound(format!("order {order_id} not found")))
}

fn refused(reason: &str) -> Answer {
    Answer::refusal(&ApiError::BadRequest(format!("checkout refused: {reason}")))
}

impl Orchestrator {
    pub fn new(
        orders: Arc<Orders>,
        sagas: SagaStore,
        broker: Arc<Broker>,
        replies: Arc<Replies>,
        routing: Routing,
    ) -> Self {
        Self {
            orders,
            sagas,
            outgoing: Grouped::new(broker.clone()),
            broker,
            replies,
            routing,
            leases: Leases::default(),
            contention: Contention::default(),
        }
    }

    /// Whether `order` is held by a checkout that is still running.
    pub async fn hold(&self, order: &Order) -> Result<Hold, ApiError> {
        Ok(match order.checkout {
            None => Hold::Free,
            Some(saga) if self.sagas.is_active(saga).await? => Hold::Held(saga),
            Some(saga) => Hold::Stale(saga),
        })
    }

    /// `POST /checkout/{order_id}`: one span, the root of the checkout's
    /// trace (its saga's steps and the participants' work are children of it).
    #[tracing::instrument(
        name = "checkout",
        skip_all,
        fields(order_id = %order_id, saga_id = tracing::field::Empty, trace_id = tracing::field::Empty)
    )]
    pub async fn checkout(
        self: &Arc<Self>,
        order_id: &OrderId,
        idem: &IdemKey,
    ) -> Result<Answer, ApiError> {
        common::trace::record_trace_id(&tracing::Span::current());
        let deadline = Instant::now() + self.routing.checkout_timeout;
        // Whether the key's record was looked at. A free order goes to `begin`, which
        // looks at it in its own transaction (no round trip of its own); a paid or held
        // one is answered from the order, unless this key has an answer (or a running
        // saga) already: the first answer stands.
        let mut replayed = false;
        for _ in 0..BEGIN_TRIES {
            let Some(mut order) = self.find_or_none(order_id).await? else {
                return self
                    .answer_once(idem, not_found(order_id), None, deadline)
                    .await;
            };
            if !replayed && (order.paid || order.checkout.is_some()) {
                replayed = true;
                if let Some(first) = self.replay(idem, deadline).await? {
                    return Ok(first);
                }
                // It may have changed while the key's saga was waited for.
                let Some(now) = self.find_or_none(order_id).await? else {
                    return self
                        .answer_once(idem, not_found(order_id), None, deadline)
                        .await;
                };
                order = now;
            }
            if order.paid {
                return self.answer_once(idem, paid(order_id), None, deadline).await;
            }
            let stale = match self.hold(&order).await? {
                Hold::Held(other) => {
                    if let Some(answer) = self.wait_for(other, deadline).await? {
                        return self.answer_once(idem, answer, None, deadline).await;
                    }
                    continue;
                }
                Hold::Stale(saga) => Some(saga),
                Hold::Free => None,
            };
            let saga = SagaRecord {
                id: SagaId::new(),
                order_id: order_id.clone(),
                user_id: order.user_id.clone(),
                lines: order.lines(),
                total: order.total_cost,
                idem: Some((idem.redis_key(), idem.ttl_secs())),
            };
            tracing::Span::current().record("saga_id", tracing::field::display(saga.id));
            match self
                .sagas
                .begin(&saga, &self.routing.instance, self.routing.lease)
                .await?
            {
                Begin::Answered(first) => return Ok(first),
                Begin::Joined(other) => {
                    if let Some(answer) = self.wait_for(other, deadline).await? {
                        return Ok(answer);
                    }
                    continue;
                }
                Begin::Started => {}
            }
            match self.orders.freeze(order_id, saga.id, stale).await? {
                Freeze::Frozen(frozen) => {
                    let saga = self.bind(saga, &frozen).await?;
                    return self.drive(saga, deadline).await;
                }
                // The key points at this checkout's saga, abandoned: what it answers
                // is recorded over that.
                Freeze::Paid => {
                    self.abandon(&saga).await?;
                    let answer = paid(order_id);
                    return self
                        .answer_once(idem, answer, Some(saga.id), deadline)
                        .await;
                }
                Freeze::Held(other) => {
                    self.abandon(&saga).await?;
                    if let Some(answer) = self.wait_for(other, deadline).await? {
                        return self
                            .answer_once(idem, answer, Some(saga.id), deadline)
                            .await;
                    }
                }
                // Recovery or an operator aborted this saga before it could take
                // the order (this instance was slow); whoever did finishes it. Its
                // end, if it answers nothing, sends this checkout round again.
                Freeze::Fenced => {
                    if let Some(answer) = self.wait_for(saga.id, deadline).await? {
                        return Ok(answer);
                    }
                }
                Freeze::NotFound => {
                    self.abandon(&saga).await?;
                    let answer = not_found(order_id);
                    return self
                        .answer_once(idem, answer, Some(saga.id), deadline)
                        .await;
                }
            }
        }
        Err(ApiError::Unavailable(format!(
            "order {order_id}: every checkout this one waited for was abandoned; retry"
        )))
    }

    /// The order, or `None` when there is no such order.
    async fn find_or_none(&self, order_id: &OrderId) -> Result<Option<Order>, ApiError> {
        match self.orders.find_for_checkout(order_id).await {
            Ok(order) => Ok(Some(order)),
            Err(ApiError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Records `answer` under the checkout's key unless the key recorded
    /// something first, and returns what stands: every repeat hears the first
    /// answer (API.md), also a 404 or "already paid" once the order changed. A
    /// saga a request with the same key began meanwhile answers for the key
    /// (waited for); one that ended without an answer, and `over` (this
    /// checkout's own, abandoned), are recorded over.
    async fn answer_once(
        &self,
        idem: &IdemKey,
        answer: Answer,
        mut over: Option<SagaId>,
        deadline: Instant,
    ) -> Result<Answer, ApiError> {
        for _ in 0..BEGIN_TRIES {
            match self.sagas.record_first_answer(idem, &answer, over).await? {
                Recorded::Saga(saga) => match self.wait_for(saga, deadline).await? {
                    Some(first) => return Ok(first),
                    None => over = Some(saga),
                },
                Recorded::Answer(first) => return Ok(first),
                // Not returned by record_first_answer.
                Recorded::Nothing => return Ok(answer),
            }
        }
        Err(ApiError::Unavailable(
            "the checkouts under this Idempotency-Key did not settle; retry".into(),
        ))
    }

    /// The answer first recorded under the checkout's key, waiting for the
    /// saga it points at if that is still running; `None` when there is none
    /// (or that saga ended without one).
    async fn replay(&self, idem: &IdemKey, deadline: Instant) -> Result<Option<Answer>, ApiError> {
        match self.sagas.recorded(idem).await? {
            Recorded::Answer(first) => Ok(Some(first)),
            Recorded::Saga(saga) => self.wait_for(saga, deadline).await,
            Recorded::Nothing => Ok(None),
        }
    }

    /// The saga takes exactly what the order froze: if an `addItem` landed
    /// between the look at the order and the freeze, its record is rewritten
    /// (before any step is sent).
    async fn bind(&self, saga: SagaRecord, frozen: &Order) -> Result<SagaRecord, ApiError> {
        let bound = SagaRecord {
            user_id: frozen.user_id.clone(),
            lines: frozen.lines(),
            total: frozen.total_cost,
            ..saga.clone()
        };
        if bound != saga {
            self.sagas.set_content(&bound).await?;
        }
        Ok(bound)
    }

    async fn abandon(&self, saga: &SagaRecord) -> Result<(), ApiError> {
        let reason = "abandoned: the order changed";
        let decision = Decision {
            state: SagaState::Aborted,
            held_order: false,
            steps: Vec::new(),
            end: Some(End {
                answer: None,
                reason: reason.into(),
                steps: Vec::new(),
            }),
        };
        if let Logged::Before(_) = self.sagas.decide(saga, decision).await? {
            // Recovery took it over meanwhile: whoever ends it first, it ends.
            self.sagas.finish(saga, None, reason).await?;
        }
        Ok(())
    }

    /// Runs the saga in a task of its own and waits for its answer until `deadline`.
    async fn drive(
        self: &Arc<Self>,
        saga: SagaRecord,
        deadline: Instant,
    ) -> Result<Answer, ApiError> {
        let (answer_tx, answer_rx) = oneshot::channel();
        let this = self.clone();
        // The saga outlives the request's wait, in the checkout's span.
        tokio::spawn(async move { this.run(saga, answer_tx).await }.in_current_span());
        match tokio::time::timeout_at(deadline, answer_rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(ApiError::Unavailable(
                "the checkout stopped before it was decided; retry with the same Idempotency-Key"
                    .into(),
            )),
            Err(_) => Err(still_running()),
        }
    }

    /// Waits for a saga another checkout drives. `None`: it ended without an
    /// answer (abandoned), so the caller should look at the order again.
    async fn wait_for(&self, saga: SagaId, deadline: Instant) -> Result<Option<Answer>, ApiError> {
        metrics::counter!("checkout_joined_total").increment(1);
        let mut pause = Duration::from_millis(5);
        loop {
            match self.sagas.progress(saga).await? {
                Progress::Finished(answer) => return Ok(answer),
                Progress::NeedsAttention(why) => return Err(attention(&why)),
                Progress::Running => {}
            }
            if Instant::now() + pause >= deadline {
                return Err(still_running());
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }

    /// Drives a saga this instance began, and hands its answer to `answer`
    /// as soon as it is true.
    async fn run(&self, saga: SagaRecord, answer: oneshot::Sender<Result<Answer, ApiError>>) {
        let _lease = self.leases.hold(saga.id);
        let reserve = Action::Reserve {
            lines: saga.lines.clone(),
        };
        let charge = Action::Charge {
            user_id: saga.user_id.clone(),
            amount: saga.total,
        };
        // Counted until the steps are done: other sagas of these items meanwhile go in sequence.
        let (reserving, scarce) = self.contention.enter(&saga.lines);
        let at_once = match self.routing.step_order {
            StepOrder::Parallel => true,
            StepOrder::Sequential => false,
            StepOrder::Adaptive => !scarce,
        };
        let (reserved, charged) = if at_once {
            tokio::join!(
                timed(self.step(&self.routing.stock_queue, saga.id, reserve)),
                timed(self.step(&self.routing.payment_queue, saga.id, charge))
            )
        } else {
            let reserved = timed(self.step(&self.routing.stock_queue, saga.id, reserve)).await;
            let charged = if reserved.result == StepResult::Applied {
                timed(self.step(&self.routing.payment_queue, saga.id, charge)).await
            } else {
                Timed::skipped()
            };
            (reserved, charged)
        };
        drop(reserving);
        if matches!(reserved.result, StepResult::Refused(_)) {
            self.contention.refused(&saga.lines);
        }
        let label = if at_once { "parallel" } else { "sequential" };
        metrics::counter!("checkout_steps_total", "order" => label).increment(1);
        // Recorded with the decision (its MULTI/EXEC): no round trip of their own.
        let steps = [reserved.log(Step::Reserve), charged.log(Step::Charge)];
        let (reserved, charged) = (reserved.result, charged.result);
        let all_applied = reserved == StepResult::Applied && charged == StepResult::Applied;
        let undo = Undo {
            release: reserved.may_have_happened(),
            refund: charged.may_have_happened(),
        };
        let mut reason = refusal_reason(&reserved, &charged);
        let decided = if all_applied {
            self.orders.commit(&saga.order_id, saga.id).await
        } else {
            self.orders.fence_own(&saga.order_id, saga.id).await
        };
        let committed = match decided {
            Ok(committed) => committed,
            Err(e) => {
                // Undecided, or decided on the master alone (no replica confirmed it):
                // recovery takes it from here once the lease lapses.
                tracing::error!(saga = %saga.id, error = %e, "order not decided; left to recovery");
                let _ = answer.send(Err(e.into()));
                return;
            }
        };
        if all_applied && !committed {
            reason = "the order was changed or reset during checkout".into();
        }
        let state = SagaState::decided(committed);
        let mut answer = Some(answer);
        // When nothing is left to do after the decision, the log ends the saga in the
        // decision's own MULTI/EXEC: an abort that took nothing, and a commit, whose settle is
        // sent first (the order has decided already; if this instance dies before the log,
        // recovery finds the order paid by this saga and settles again, which replays).
        let end = match state {
            SagaState::Committed => {
                // The order is paid by this saga, on two nodes: that is the answer, given
                // now. It is the only one any driver can record for this saga (recovery and
                // operators find the order paid by it), and a repeat of the checkout waits
                // for the saga's end, which records it under the key.
                let ok = paid(&saga.order_id);
                if let Some(tx) = answer.take() {
                    let _ = tx.send(Ok(ok.clone()));
                }
                let settled = self.settle(&saga).await;
                // A settle that could not be sent is not the end: `complete` sends it
                // again (and recovery would), then finishes the saga.
                settled.was_sent().then(|| End {
                    answer: Some(ok),
                    reason: "committed".into(),
                    steps: vec![settled],
                })
            }
            _ if !undo.release && !undo.refund => Some(End {
                answer: Some(refused(&reason)),
                reason: reason.clone(),
                steps: Vec::new(),
            }),
            _ => None,
        };
        let ended = end.as_ref().and_then(|end| end.answer.clone());
        match self.log_decision(&saga, state, steps.into(), end).await {
            Ok(Logged::Now) => match ended {
                Some(ended) => {
                    count_outcome(state);
                    if let Some(tx) = answer {
                        let _ = tx.send(Ok(ended));
                    }
                }
                None => self.complete(&saga, state, undo, &reason, answer).await,
            },
            // Recovery or an operator decided first (this instance was slow): that
            // decision stands, and this run completes it too (replays, first answer stands).
            Ok(Logged::Before(decided)) => {
                self.complete(&saga, decided, undo, &reason, answer).await
            }
            Err(e) => {
                // Decided on the order but not logged: recovery finds the order's decision
                // (a commit was answered already, and recovery records that same answer).
                tracing::error!(saga = %saga.id, error = %e, "decision not logged; left to recovery");
                if let Some(tx) = answer {
                    let _ = tx.send(Err(e.into()));
                }
            }
        }
    }

    /// Logs the order's decision in the saga store (the two always agree:
    /// whoever decides, decides on the order first), with the forward steps'
    /// logs, and with the saga's end if nothing is left to do.
    async fn log_decision(
        &self,
        saga: &SagaRecord,
        state: SagaState,
        steps: Vec<StepLog>,
        end: Option<End>,
    ) -> Result<Logged, StoreError> {
        let decision = Decision {
            state,
            held_order: true,
            steps,
            end,
        };
        let logged = self.sagas.decide(saga, decision).await?;
        if let Logged::Before(other) = logged {
            if other != state {
                tracing::error!(saga = %saga.id, ?other, wanted = ?state, "saga log disagrees with the order");
            }
        }
        Ok(logged)
    }

    /// [`Orchestrator::log_decision`] for recovery and operators, which complete the saga
    /// whatever the log held: the state that holds now.
    async fn log_found(&self, saga: &SagaRecord, committed: bool) -> Result<SagaState, ApiError> {
        let state = SagaState::decided(committed);
        Ok(
            match self.log_decision(saga, state, Vec::new(), None).await? {
                Logged::Now => state,
                Logged::Before(held) => held,
            },
        )
    }

    /// Carries out a decision: settle, or compensate; then finish the saga.
    /// The answer goes to `answer` (a waiting request) once it is true.
    async fn complete(
        &self,
        saga: &SagaRecord,
        state: SagaState,
        undo: Undo,
        reason: &str,
        answer: Option<oneshot::Sender<Result<Answer, ApiError>>>,
    ) {
        let waited_for = answer.is_some();
        let send = |a: Result<Answer, ApiError>| {
            if let Some(tx) = answer {
                let _ = tx.send(a);
            }
        };
        match state {
            SagaState::Committed => {
                let ok = paid(&saga.order_id);
                send(Ok(ok.clone()));
                count_outcome(state);
                let settled = self.settle(saga).await;
                let finished = self
                    .sagas
                    .finish_with(saga, Some(&ok), "committed", &[settled])
                    .await;
                if let Err(e) = finished {
                    tracing::warn!(saga = %saga.id, error = %e, "not marked finished; recovery will");
                }
            }
            SagaState::Aborted => match self.compensate(saga, undo).await {
                (Undone::Confirmed, steps) => {
                    // A refusal is an answer only for the request that waits for it. Recovery
                    // (nobody waits: the owner's client heard 503 or nothing) records none, so
                    // a retry looks at the order again: it may be paid by another checkout by
                    // now (then it is 200), and this saga took nothing.
                    let no = waited_for.then(|| refused(reason));
                    match self
                        .sagas
                        .finish_with(saga, no.as_ref(), reason, &steps)
                        .await
                    {
                        // The answer that stands for the key (another driver's, maybe) is
                        // the answer.
                        Ok(Finished::Answer(first)) => send(Ok(first)),
                        Ok(Finished::Nothing) => {}
                        // A retry with the key began another saga: its answer will be the
                        // key's, and a repeat waits for it.
                        Ok(Finished::KeyMoved) => send(Err(still_running())),
                        Err(e) => send(Err(e.into())),
                    }
                    count_outcome(state);
                }
                (Undone::Unconfirmed, steps) => {
                    tracing::warn!(saga = %saga.id, "compensation not confirmed; left to recovery");
                    send(Err(still_running()));
                    if let Err(e) = self.sagas.record_steps(saga.id, &steps).await {
                        tracing::debug!(saga = %saga.id, error = %e, "steps not recorded");
                    }
                }
                (Undone::Failed(why), steps) => {
                    tracing::error!(saga = %saga.id, %why, "compensation dead-lettered; needs attention");
                    metrics::counter!("saga_outcomes_total", "outcome" => "needs_attention")
                        .increment(1);
                    if let Err(e) = self.sagas.needs_attention(saga, &why, &steps).await {
                        tracing::error!(saga = %saga.id, error = %e, "attention not recorded");
                    }
                    send(Err(attention(&why)));
                }
            },
            SagaState::Pending => unreachable!("complete() runs only after a decision"),
        }
    }

    /// Tells both participants the saga committed, so they release the hold
    /// kept for a give-back. Nobody waits for it; a settle that is lost only
    /// leaves that hold in place (conservative, never inconsistent).
    async fn settle(&self, saga: &SagaRecord) -> StepLog {
        let started_ms = common::now_ms();
        let settle = Command {
            saga_id: saga.id,
            action: Action::Settle,
            expires_at_ms: None,
        };
        let budget = self.routing.step_timeout;
        // Sent as if it had a reply (participants answer no settle): it then shares a lane,
        // and so a message, with the reserves and charges going to the same queue.
        let lane = Some(self.routing.reply_queue.as_str());
        let (stock, payment) = tokio::join!(
            self.outgoing
                .publish(&self.routing.stock_queue, lane, &settle, budget),
            self.outgoing
                .publish(&self.routing.payment_queue, lane, &settle, budget)
        );
        let sent = stock.is_ok() && payment.is_ok();
        if !sent {
            metrics::counter!("saga_settle_failures_total").increment(1);
            tracing::warn!(saga = %saga.id, "settle not sent; the participants keep a hold");
        }
        let outcome = if sent { "sent" } else { "not_sent" };
        StepLog::new(Step::Settle, outcome, None, started_ms, common::now_ms())
    }

    /// Sends the compensations of every step that may have happened and waits
    /// until each is applied; with what each did, for the saga record.
    async fn compensate(&self, saga: &SagaRecord, undo: Undo) -> (Undone, Vec<StepLog>) {
        let release = async {
            if !undo.release {
                return None;
            }
            let action = Action::Release {
                lines: saga.lines.clone(),
            };
            Some(timed(self.until_answered(&self.routing.stock_queue, saga.id, action)).await)
        };
        let refund = async {
            if !undo.refund {
                return None;
            }
            let action = Action::Refund {
                user_id: saga.user_id.clone(),
                amount: saga.total,
            };
            Some(timed(self.until_answered(&self.routing.payment_queue, saga.id, action)).await)
        };
        let (released, refunded) = tokio::join!(release, refund);
        let mut failures = Vec::new();
        let mut unconfirmed = false;
        let mut steps = Vec::new();
        for (step, timed) in [(Step::Release, released), (Step::Refund, refunded)] {
            let Some(timed) = timed else { continue };
            steps.push(timed.log(step));
            match timed.result {
                StepResult::Applied => {}
                StepResult::Failed(why) | StepResult::Refused(why) => failures.push(why),
                StepResult::Unknown | StepResult::Skipped => unconfirmed = true,
            }
        }
        let undone = if !failures.is_empty() {
            Undone::Failed(failures.join("; "))
        } else if unconfirmed {
            Undone::Unconfirmed
        } else {
            Undone::Confirmed
        };
        (undone, steps)
    }

    /// A compensation, sent again until a participant answers it.
    async fn until_answered(&self, queue: &str, saga: SagaId, action: Action) -> StepResult {
        metrics::counter!("saga_compensations_total", "step" => format!("{:?}", action.step()))
            .increment(1);
        for _ in 0..COMPENSATION_TRIES {
            let result = self.step(queue, saga, action.clone()).await;
            if result != StepResult::Unknown {
                return result;
            }
        }
        StepResult::Unknown
    }

    /// Sends one command and waits for its reply, within the step timeout.
    ///
    /// The step timeout measures a participant that does not answer, not a
    /// broker that is away: when the connection was lost while the step
    /// waited (the broker died, was restarted, or is still down), or the
    /// command could not even be sent, it is sent again once the broker is
    /// back and the wait starts over, at most [`RESENDS_AFTER_RECONNECT`]
    /// times. Participants apply a step once, so a duplicate only replays its
    /// outcome; the reply to either copy ends the step, and replies wait in
    /// the instance's durable reply queue while it reconnects.
    #[tracing::instrument(name = "saga.step", skip(self, action), fields(saga_id = %saga, step = ?action.step()))]
    async fn step(&self, queue: &str, saga: SagaId, action: Action) -> StepResult {
        let step: Step = action.step();
        let timeout = self.routing.step_timeout;
        let mut reply = self.replies.expect(saga, step);
        // Every copy of a forward command expires when the step's last wait can
        // end at the latest (plus grace), counted from the first send: a re-send
        // never extends how late a command may be applied.
        let expires_at_ms = action
            .is_forward()
            .then(|| common::now_ms() + step_lifetime(timeout).as_millis() as u64);
        for resend in 0..=RESENDS_AFTER_RECONNECT {
            let command = Command {
                saga_id: saga,
                action: action.clone(),
                expires_at_ms,
            };
            let generation = self.broker.generation();
            let sent = self
                .outgoing
                .publish(queue, Some(&self.routing.reply_queue), &command, timeout)
                .await;
            let connection_lost = match sent {
                // The broker has been away for a whole step timeout already.
                Err(e) => {
                    tracing::warn!(%saga, ?step, error = %e, "command not sent");
                    true
                }
                Ok(()) => match tokio::time::timeout(timeout, reply.recv()).await {
                    Ok(Some(Outcome::Applied)) => return StepResult::Applied,
                    Ok(Some(Outcome::Refused { reason })) => return StepResult::Refused(reason),
                    Ok(Some(Outcome::Failed { reason })) => return StepResult::Failed(reason),
                    // Replaced by a newer wait for the same step: not ours to judge.
                    Ok(None) => break,
                    Err(_) => {
                        self.broker.generation() != generation || !self.broker.connected().await
                    }
                },
            };
            if !connection_lost {
                break;
            }
            if resend < RESENDS_AFTER_RECONNECT {
                tracing::info!(%saga, ?step, "the broker connection was lost during the step; sending again");
                metrics::counter!("saga_step_resends_total").increment(1);
            }
        }
        tracing::warn!(%saga, ?step, "no reply in time");
        metrics::counter!("saga_step_timeouts_total").increment(1);
        StepResult::Unknown
    }

    /// Renews every lease this instance holds, in one round trip, three times per lease.
    pub async fn renew_leases_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.routing.lease / 3);
        loop {
            tick.tick().await;
            let held = self.leases.held();
            if held.is_empty() {
                continue;
            }
            if let Err(e) = self
                .sagas
                .renew(&held, &self.routing.instance, self.routing.lease)
                .await
            {
                tracing::warn!(error = %e, sagas = held.len(), "leases not renewed");
            }
        }
    }

    /// Finishes a saga whose owner died (its lease was just claimed by this
    /// instance), by the same rules: decide on the order first (the fence
    /// wins unless the owner committed), then settle or compensate. A trace
    /// of its own: the owner's trace context is not kept with the saga.
    #[tracing::instrument(name = "saga.recover", skip(self), fields(saga_id = %id, trace_id = tracing::field::Empty))]
    pub async fn recover(&self, id: SagaId) -> Result<(), ApiError> {
        common::trace::record_trace_id(&tracing::Span::current());
        self.recover_because(id, "recovered after its owner stopped")
            .await
    }

    /// [`Orchestrator::recover`], ending the saga (if it does) with `reason`.
    async fn recover_because(&self, id: SagaId, reason: &str) -> Result<(), ApiError> {
        let _lease = self.leases.hold(id);
        // The scan may have seen the saga just before its owner finished it.
        if !self.sagas.is_active(id).await? {
            return Ok(());
        }
        let Some((saga, state)) = self.sagas.load(id).await? else {
            tracing::warn!(saga = %id, "active saga without a record; forgotten");
            self.sagas.forget(id).await?;
            return Ok(());
        };
        let attempts = self.sagas.count_attempt(id, &self.routing.instance).await?;
        if attempts > RECOVERY_ATTEMPTS {
            let why = format!("recovery gave up after {RECOVERY_ATTEMPTS} attempts");
            tracing::error!(saga = %id, "{why}");
            self.sagas.needs_attention(&saga, &why, &[]).await?;
            return Ok(());
        }
        tracing::info!(saga = %id, state = state.as_str(), attempts, "recovering saga");
        metrics::counter!("saga_recovered_total").increment(1);
        let state = match state {
            SagaState::Pending => {
                let committed = self.orders.fence(&saga.order_id, id).await?;
                self.log_found(&saga, committed).await?
            }
            decided => decided,
        };
        // Nobody knows which steps ran: every one may have.
        self.complete(&saga, state, Undo::ALL, reason, None).await;
        Ok(())
    }

    /// The saga store, for the operator routes.
    pub fn sagas(&self) -> &SagaStore {
        &self.sagas
    }

    /// An operator's `retry` (`POST /ops/sagas/{id}/retry`): runs recovery now, by its rules
    /// (an undecided saga is decided on the order first: the fence wins unless it committed;
    /// a decided one is settled or compensated again). For a saga that needs attention (after
    /// the cause was fixed), or one nobody drives; one whose lease is held (a live instance
    /// drives it) is refused (409): it ends by itself, or can be aborted. A finished saga:
    /// nothing to do.
    pub async fn retry(&self, id: SagaId) -> Result<(), ApiError> {
        let view = self.operated(id).await?;
        if view.finished {
            return Ok(());
        }
        if let (None, Some(owner)) = (&view.attention, &view.lease) {
            return Err(ApiError::Conflict(format!(
                "saga {id} is being driven by {owner} (it holds the lease): it ends by itself, \
                 or abort it"
            )));
        }
        if !self
            .sagas
            .take_over(id, &self.routing.instance, self.routing.lease)
            .await?
        {
            return Err(expired(id));
        }
        self.recover_because(id, "retried by an operator").await
    }

    /// An operator's `abort` (`POST /ops/sagas/{id}/abort`): fences the order (unless the
    /// saga committed, the fence wins: the same compare-and-set recovery uses, so there is
    /// never a second decision), then compensates every step that may have happened. Works on
    /// a saga a live instance still drives (its commit then finds the order fenced). A
    /// committed saga cannot be aborted: 409, with why.
    pub async fn abort(&self, id: SagaId) -> Result<(), ApiError> {
        let _lease = self.leases.hold(id);
        let view = self.operated(id).await?;
        let committed = || {
            ApiError::Conflict(format!(
                "saga {id} committed: order {} is paid, so it cannot be aborted (retry settles \
                 it if it has not ended)",
                view.order_id
            ))
        };
        if view.state == ViewState::Committed {
            return Err(committed());
        }
        let Some((saga, state)) = self.sagas.load(id).await? else {
            return Err(ApiError::NotFound(format!("saga {id} not found")));
        };
        if view.finished {
            return match state {
                SagaState::Committed => Err(committed()),
                _ => Ok(()),
            };
        }
        if !self
            .sagas
            .take_over(id, &self.routing.instance, self.routing.lease)
            .await?
        {
            return Err(expired(id));
        }
        let state = match state {
            SagaState::Pending => {
                let committed = self.orders.fence(&saga.order_id, id).await?;
                self.log_found(&saga, committed).await?
            }
            decided => decided,
        };
        match state {
            SagaState::Committed => {
                // Its owner committed first: that decision stands; finish it as recovery would.
                self.complete(&saga, state, Undo::ALL, "committed", None)
                    .await;
                Err(committed())
            }
            _ => {
                self.complete(&saga, state, Undo::ALL, "aborted by an operator", None)
                    .await;
                Ok(())
            }
        }
    }

    /// The saga an operator names, or 404.
    async fn operated(&self, id: SagaId) -> Result<SagaView, ApiError> {
        self.sagas.view(id).await?.ok_or_else(|| expired(id))
    }

    /// Every half lease, takes over and finishes sagas whose owner died.
    pub async fn recover_forever(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.routing.lease / 2);
        loop {
            tick.tick().await;
            let orphans = match self
                .sagas
                .claim_orphans(&self.routing.instance, self.routing.lease)
                .await
            {
                Ok(orphans) => orphans,
                Err(e) => {
                    tracing::warn!(error = %e, "recovery scan failed");
                    continue;
                }
            };
            for id in orphans {
                let this = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = this.recover(id).await {
                        tracing::warn!(saga = %id, error = %e, "recovery failed; will retry");
                    }
                });
            }
        }
    }
}

fn count_outcome(state: SagaState) {
    let outcome = match state {
        SagaState::Committed => "committed",
        _ => "aborted",
    };
    metrics::counter!("saga_outcomes_total", "outcome" => outcome).increment(1);
}

fn still_running() -> ApiError {
    ApiError::Unavailable(
        "the checkout is still being decided; retry with the same Idempotency-Key".into(),
    )
}

fn attention(why: &str) -> ApiError {
    ApiError::Unavailable(format!(
        "the checkout could not be completed automatically and awaits an operator: {why}"
    ))
}

/// Which compensations an abort must send.
#[derive(Debug, Clone, Copy)]
struct Undo {
    release: bool,
    refund: bool,
}

impl Undo {
    /// Every step may have happened (recovery, an operator: nobody knows which ran).
    const ALL: Undo = Undo {
        release: true,
        refund: true,
    };
}

/// A step's result, with when it was sent and when it ended (for the saga record).
struct Timed {
    result: StepResult,
    started_ms: u64,
    ended_ms: u64,
}

impl Timed {
    fn skipped() -> Self {
        let now = common::now_ms();
        Timed {
            result: StepResult::Skipped,
            started_ms: now,
            ended_ms: now,
        }
    }

    fn log(&self, step: Step) -> StepLog {
        let (outcome, reason) = match &self.result {
            StepResult::Applied => ("applied", None),
            StepResult::Refused(why) => ("refused", Some(why.clone())),
            StepResult::Unknown => ("unknown", None),
            StepResult::Failed(why) => ("failed", Some(why.clone())),
            StepResult::Skipped => ("skipped", None),
        };
        StepLog::new(step, outcome, reason, self.started_ms, self.ended_ms)
    }
}

async fn timed(step: impl std::future::Future<Output = StepResult>) -> Timed {
    let started_ms = common::now_ms();
    let result = step.await;
    Timed {
        result,
        started_ms,
        ended_ms: common::now_ms(),
    }
}

/// The sagas whose leases this instance holds, with how many holders each
/// (a saga being recovered while its own run still ends holds twice). One
/// background task renews them all together: a task per saga would take a
/// store connection per saga per renewal, starving the pool under a burst.
#[derive(Default, Clone)]
struct Leases(Arc<Mutex<HashMap<SagaId, usize>>>);

impl Leases {
    fn hold(&self, saga: SagaId) -> LeaseGuard {
        *self
            .0
            .lock()
            .expect("lease set poisoned")
            .entry(saga)
            .or_insert(0) += 1;
        LeaseGuard {
            leases: self.clone(),
            saga,
        }
    }

    fn held(&self) -> Vec<SagaId> {
        self.0
            .lock()
            .expect("lease set poisoned")
            .keys()
            .copied()
            .collect()
    }
}

struct LeaseGuard {
    leases: Leases,
    saga: SagaId,
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        let mut held = self.leases.0.lock().expect("lease set poisoned");
        if let Some(count) = held.get_mut(&self.saga) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.saga);
            }
        }
    }
}

fn refusal_reason(reserved: &StepResult, charged: &StepResult) -> String {
    let mut reasons = Vec::new();
    for (what, result) in [("stock", reserved), ("payment", charged)] {
        match result {
            StepResult::Refused(reason) => reasons.push(reason.clone()),
            StepResult::Unknown => reasons.push(format!("{what} did not answer in time")),
            StepResult::Failed(reason) => reasons.push(format!("{what} failed: {reason}")),
            StepResult::Applied | StepResult::Skipped => {}
        }
    }
    if reasons.is_empty() {
        "the checkout was aborted".into()
    } else {
        reasons.join("; ")
    }
}

/// An operator's saga that has no record (never, or expired).
fn expired(id: SagaId) -> ApiError {
    ApiError::NotFound(format!("saga {id} not found (or expired)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_outlive_every_late_forward_command() {
        let tombstone = Duration::from_secs(common::counters::TOMBSTONE_TTL_SECS);
        assert!(command_horizon(common::config::MAX_STEP_TIMEOUT) < tombstone);
        // A copy sent again after a reconnect expires with the first.
        assert!(step_lifetime(Duration::from_secs(10)) == Duration::from_secs(90));
    }

    #[test]
    fn timeouts_and_failures_count_as_possibly_done_and_are_reported() {
        assert!(StepResult::Unknown.may_have_happened());
        assert!(StepResult::Failed("x".into()).may_have_happened());
        assert!(!StepResult::Refused("x".into()).may_have_happened());
        assert!(!StepResult::Skipped.may_have_happened());
        let reason = refusal_reason(
            &StepResult::Refused("no stock".into()),
            &StepResult::Unknown,
        );
        assert_eq!(reason, "no stock; payment did not answer in time");
    }

    #[test]
    fn two_holders_of_one_lease_do_not_drop_each_other() {
        let leases = Leases::default();
        let saga = SagaId::new();
        let first = leases.hold(saga);
        let second = leases.hold(saga);
        drop(first);
        assert_eq!(
            leases.held(),
            vec![saga],
            "the second holder lost the lease"
        );
        drop(second);
        assert!(leases.held().is_empty());
    }
}
