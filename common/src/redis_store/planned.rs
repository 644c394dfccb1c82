//! Transactions written in two halves, so that concurrent ones can share
//! round trips.
//!
//! A [`Plan`] is a WATCH/MULTI/EXEC transaction given as its reads (with the
//! keys it watches) and a decision on what they returned. Written that way,
//! the transactions of concurrent callers are committed together by
//! [`Planned`]: one WATCH of all their keys with all their reads in one
//! pipeline, every decision, then one MULTI/EXEC of all their writes with one
//! WAIT. The orchestrator's saga-store and order-store transactions go this
//! way: a checkout runs five of them, and under load each shares its round
//! trips and its WAIT with those of the checkouts next to it.
//!
//! What holds for each transaction, as if it ran alone ([`Store::transact_plan`]):
//! - two plans that touch a common key never share a group (the later one
//!   waits for the next), so no decision is made on a value another decision
//!   of the same group is about to change;
//! - EXEC applies the whole group or nothing. A watched key changed by
//!   someone else makes every plan of the group run again alone, and so does
//!   any failure of the group (a lost connection, a WAIT no replica
//!   answered): each decision is then made again on what its plan reads
//!   then, exactly as [`Store::transact`] retries;
//! - the group's WAIT confirms what every plan wrote and what every plan that
//!   wrote nothing read (its value may acknowledge it); a group that writes
//!   nothing confirms its reads as `transact` does (marker write + WAIT);
//! - a decision that fails (a corrupt value) fails its own plan only.
//!
//! There is no timer: one group is in flight per store, and what arrives
//! meanwhile goes in the next one, so an idle store commits a lone plan at
//! once.

use std::collections::{HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::future::BoxFuture;
use futures::FutureExt;
use redis::{Pipeline, Value};
use tokio::sync::{mpsc, oneshot};

use super::{Conn, Store, StoreError, Tx, COMMAND_TIMEOUT};

/// Plans per group at most.
const MAX_GROUP: usize = 128;

/// A plan's decision on the replies to its reads, in order.
pub type Decide<T> = Box<dyn Fn(Vec<Value>) -> Result<Tx<T>, StoreError> + Send + Sync>;

/// A transaction as its reads and a decision on them.
pub struct Plan<T> {
    /// Watched from before the reads until EXEC.
    pub watch: Vec<String>,
    /// Keys the plan reads or writes without watching them: they too keep it
    /// out of a group with another plan that touches them.
    pub also_touches: Vec<String>,
    /// The reads (no writes), one reply each.
    pub reads: Pipeline,
    pub decide: Decide<T>,
}

/// The next reply to a plan's reads as a `V`; a reply of another type is a
/// corrupt value at `key`.
pub fn next_reply<V: redis::FromRedisValue>(
    replies: &mut impl Iterator<Item = Value>,
    key: &str,
) -> Result<V, StoreError> {
    redis::from_redis_value(replies.next().unwrap_or(Value::Nil))
        .map_err(|e| StoreError::corrupt(key, e))
}

impl Store {
    /// Runs `plan` alone, as [`Store::transact`] (retried on conflict and through failovers).
    pub async fn transact_plan<T>(&self, plan: &Plan<T>) -> Result<T, StoreError> {
        self.transact(&plan.watch, |mut conn| async move {
            let read: Result<Vec<Value>, _> = if plan.reads.cmd_iter().next().is_none() {
                Ok(Vec::new()) // nothing to read (and nothing watched): decide at once
            } else {
                plan.reads.query_async(&mut conn).await
            };
            let decision = match read {
                Ok(values) => (plan.decide)(values),
                Err(e) => Err(StoreError::Redis(e)),
            };
            (conn, decision)
        })
        .await
    }
}

/// A plan waiting for its group, with its caller's type erased.
trait Queued: Send {
    fn watched(&self) -> &[String];
    fn touches(&self) -> Vec<&str>;
    fn reads(&self) -> &Pipeline;
    /// Decides on `values`; the writes to commit with the group, if any.
    fn decide(&mut self, values: Vec<Value>) -> Option<Pipeline>;
    /// The group committed: tells the caller what was decided.
    fn answer(self: Box<Self>);
    /// The group did not commit: the plan runs again, alone.
    fn run_alone(self: Box<Self>, store: Arc<Store>) -> BoxFuture<'static, ()>;
}

struct Pending<T> {
    plan: Plan<T>,
    decided: Option<Result<T, StoreError>>,
    done: oneshot::Sender<Result<T, StoreError>>,
}

impl<T: Send + 'static> Queued for Pending<T> {
    fn watched(&self) -> &[String] {
        &self.plan.watch
    }

    fn touches(&self) -> Vec<&str> {
        let plan = &self.plan;
        plan.watch
            .iter()
            .chain(&plan.also_touches)
            .map(String::as_str)
            .collect()
    }

    fn reads(&self) -> &Pipeline {
        &self.plan.reads
    }

    fn decide(&mut self, values: Vec<Value>) -> Option<Pipeline> {
        let (writes, decided) = match (self.plan.decide)(values) {
            Ok(Tx::Commit(writes, value)) => (Some(writes), Ok(value)),
            Ok(Tx::Abort(value)) => (None, Ok(value)),
            Err(e) => (None, Err(e)),
        };
        self.decided = Some(decided);
        writes
    }

    fn answer(self: Box<Self>) {
        if let Some(decided) = self.decided {
            let _ = self.done.send(decided); // the caller may be gone: nothing to tell
        }
    }

    fn run_alone(self: Box<Self>, store: Arc<Store>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            let result = store.transact_plan(&self.plan).await;
            let _ = self.done.send(result);
        })
    }
}

/// Commits the plans of concurrent callers on one store together (see the module comment).
pub struct Planned {
    store: Arc<Store>,
    queue: mpsc::UnboundedSender<Box<dyn Queued>>,
}

impl Planned {
    /// Starts the group loop of `store`.
    pub fn start(store: Arc<Store>) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run_groups(store.clone(), waiting));
        Planned { store, queue }
    }

    /// Runs `plan` in the next group; its decision once the group is committed
    /// and confirmed (or once it ran again alone).
    pub async fn run<T: Send + 'static>(&self, plan: Plan<T>) -> Result<T, StoreError> {
        let (done, result) = oneshot::channel();
        let pending = Box::new(Pending {
            plan,
            decided: None,
            done,
        });
        if let Err(mpsc::error::SendError(pending)) = self.queue.send(pending) {
            // The loop is gone (the runtime is shutting down): run it here.
            pending.run_alone(self.store.clone()).await;
        }
        result.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the transaction was dropped before it was decided".into(),
            ))
        })
    }
}

async fn run_groups(store: Arc<Store>, mut waiting: mpsc::UnboundedReceiver<Box<dyn Queued>>) {
    // Plans that overlapped a group: first in line for the next one.
    let mut carried: VecDeque<Box<dyn Queued>> = VecDeque::new();
    loop {
        let first = match carried.pop_front() {
            Some(first) => first,
            None => match waiting.recv().await {
                Some(first) => first,
                None => return,
            },
        };
        let mut keys: HashSet<String> = first.touches().into_iter().map(String::from).collect();
        let mut group = vec![first];
        let mut overlapping = VecDeque::new();
        let mut take = |plan: Box<dyn Queued>, group: &mut Vec<Box<dyn Queued>>| {
            let touches = plan.touches();
            if group.len() < MAX_GROUP && touches.iter().all(|k| !keys.contains(*k)) {
                keys.extend(touches.into_iter().map(String::from));
                group.push(plan);
            } else {
                overlapping.push_back(plan);
            }
        };
        while let Some(plan) = carried.pop_front() {
            take(plan, &mut group);
        }
        while group.len() < MAX_GROUP {
            let Ok(plan) = waiting.try_recv() else { break };
            take(plan, &mut group);
        }
        carried = overlapping;
        // A decision that panics (a bug) loses its group's plans (their callers hear
        // `Unavailable`), not the loop.
        if AssertUnwindSafe(commit_group(&store, group))
            .catch_unwind()
            .await
            .is_err()
        {
            tracing::error!(store = %store.target(), "a planned transaction panicked");
        }
    }
}

async fn commit_group(store: &Arc<Store>, group: Vec<Box<dyn Queued>>) {
    metrics::histogram!("redis_planned_group_size").record(group.len() as f64);
    let mut group = group;
    let committed = match store.connection().await {
        // The connection is taken outside the time limit: a try that runs out of time
        // leaves it mid-exchange, and dropping it then closes it (see `Conn`).
        Ok(mut conn) => {
            let tried = commit_together(store, &mut conn, &mut group);
            match tokio::time::timeout(COMMAND_TIMEOUT * 2, tried).await {
                Ok(Ok(committed)) => committed,
                // Only this connection is closed: if the link broke, the plans' own
                // runs find the other dead ones (and drain the pool) as any operation does.
                Ok(Err(())) | Err(_) => {
                    conn.discard();
                    false
                }
            }
        }
        Err(_) => false,
    };
    if committed {
        for plan in group {
            plan.answer();
        }
    } else {
        // Each runs again on its own (retried as `transact` retries); the loop goes on.
        metrics::counter!("redis_planned_group_retries_total").increment(1);
        for plan in group {
            tokio::spawn(plan.run_alone(store.clone()));
        }
    }
}

/// One try of a group on `conn`: `Ok(true)` once every plan's decision is
/// committed (or, for plans that wrote nothing, its reads confirmed);
/// `Ok(false)` when a watched key changed (nothing written); `Err` when the
/// connection failed or Redis refused a read (the connection is not reused).
async fn commit_together(
    store: &Store,
    conn: &mut Conn,
    group: &mut [Box<dyn Queued>],
) -> Result<bool, ()> {
    let mut reads = redis::pipe();
    let watched: Vec<&String> = group.iter().flat_map(|p| p.watched()).collect();
    if !watched.is_empty() {
        conn.unsettle();
        reads.cmd("WATCH").arg(watched).ignore();
    }
    let mut counts = Vec::with_capacity(group.len());
    for plan in group.iter() {
        counts.push(plan.reads().cmd_iter().count());
        for cmd in plan.reads().cmd_iter() {
            reads.add_command(cmd.clone());
        }
    }
    let values: Vec<Value> = if reads.cmd_iter().next().is_none() {
        Vec::new()
    } else {
        reads.query_async(conn).await.map_err(|_| ())?
    };
    let mut values = values.into_iter();
    let mut writes = redis::pipe();
    for (plan, n) in group.iter_mut().zip(counts) {
        let mine: Vec<Value> = values.by_ref().take(n).collect();
        for cmd in plan.decide(mine).iter().flat_map(Pipeline::cmd_iter) {
            writes.add_command(cmd.clone());
        }
    }
    let confirmed = if writes.cmd_iter().next().is_none() {
        store.confirm_read(conn).await.map(|()| true)
    } else {
        store.exec_confirmed(conn, &writes).await
    };
    confirmed.map_err(|_| ())
}
