//! Group commit for a participant: the commands of every delivery that comes
//! in while a group is being applied wait, and go together in the next group,
//! as one transaction with one `WAIT` ([`Counters::apply_steps`]).
//!
//! There is no timer. One group is applied at a time per process: an idle
//! participant applies a lone command at once, a busy one applies bigger
//! groups, not more of them. So the round trips to the store and the waits
//! for a replica are shared by every saga in the group, and the groups of one
//! process never race each other on a hot counter (WATCH still arbitrates
//! between processes and against plain HTTP changes).
//!
//! Grouping changes no guarantee: each command's outcome is recorded per saga
//! in the group's MULTI/EXEC, and a delivery is acknowledged (by the
//! participant loop) only after its group committed and was confirmed.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::counters::{Counters, SagaStep};
use crate::messages::{Command, Outcome};
use crate::redis_store::StoreError;

/// A participant's business: which counters its commands act on, and how.
pub trait Ledger: Send + Sync + 'static {
    /// The counters this participant's saga steps act on.
    fn counters(&self) -> &Counters;

    /// What `command` asks of the counters; `Err` is the outcome of a command
    /// this participant does not handle (it touches nothing).
    fn step(&self, command: &Command) -> Result<SagaStep, Outcome>;
}

/// Commands per group at most: one transaction's worth of reads and writes
/// that keeps Redis' other clients waiting for well under a millisecond.
pub const MAX_GROUP_COMMANDS: usize = 256;

/// What became of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// Applied (or found applied): its outcome is recorded and confirmed.
    Done(Outcome),
    /// Not applied, and trying again cures it: the store was unreachable, or
    /// no replica confirmed the outcome.
    Retry(String),
    /// Not applied, for a reason retrying may not cure (a corrupt value, a
    /// command Redis refused).
    Error(String),
}

/// A delivery's commands waiting for the next group.
struct Pending {
    commands: Vec<Command>,
    done: oneshot::Sender<Vec<Applied>>,
}

/// The handle deliveries use; the group loop runs in a task of its own.
pub struct GroupCommit {
    queue: mpsc::UnboundedSender<Pending>,
}

impl GroupCommit {
    /// Starts the group loop of `ledger`.
    pub fn start<L: Ledger>(ledger: Arc<L>) -> Self {
        let (queue, waiting) = mpsc::unbounded_channel();
        tokio::spawn(run(ledger, waiting));
        GroupCommit { queue }
    }

    /// Applies `commands` in the next group; one result per command, in order.
    pub async fn apply(&self, commands: Vec<Command>) -> Vec<Applied> {
        let n = commands.len();
        let (done, result) = oneshot::channel();
        let stopped = || vec![Applied::Retry("the group commit loop stopped".into()); n];
        if self.queue.send(Pending { commands, done }).is_err() {
            return stopped();
        }
        result.await.unwrap_or_else(|_| stopped())
    }
}

async fn run<L: Ledger>(ledger: Arc<L>, mut waiting: mpsc::UnboundedReceiver<Pending>) {
    while let Some(first) = waiting.recv().await {
        let mut size = first.commands.len();
        let mut group = vec![first];
        while size < MAX_GROUP_COMMANDS {
            let Ok(next) = waiting.try_recv() else { break };
            size += next.commands.len();
            group.push(next);
        }
        let commands: Vec<&Command> = group.iter().flat_map(|p| &p.commands).collect();
        metrics::histogram!("participant_group_commands").record(commands.len() as f64);
        // A bug that panics fails the command that causes it, not its group nor a later one.
        let applied = match unpanicked(apply_group(&*ledger, &commands)).await {
            Some(applied) => applied,
            None => {
                tracing::error!("applying a group panicked; applying its commands one by one");
                let mut one_by_one = Vec::with_capacity(commands.len());
                for command in &commands {
                    let alone = unpanicked(apply_group(&*ledger, std::slice::from_ref(command)));
                    one_by_one.extend(alone.await.unwrap_or_else(|| {
                        vec![Applied::Error("applying the command panicked".into())]
                    }));
                }
                one_by_one
            }
        };
        let mut applied = applied.into_iter();
        for pending in group {
            let mine: Vec<Applied> = applied.by_ref().take(pending.commands.len()).collect();
            let _ = pending.done.send(mine); // the delivery's task may be gone: nothing to tell
        }
    }
}

/// `None` if `applying` panicked.
async fn unpanicked<T>(applying: impl std::future::Future<Output = T>) -> Option<T> {
    AssertUnwindSafe(applying).catch_unwind().await.ok()
}

/// Applies one group. If the group as a whole fails for a reason retrying may
/// not cure, each step is applied alone, so one bad command fails alone.
async fn apply_group<L: Ledger>(ledger: &L, commands: &[&Command]) -> Vec<Applied> {
    let asked: Vec<Result<SagaStep, Outcome>> = commands.iter().map(|c| ledger.step(c)).collect();
    let steps: Vec<SagaStep> = asked.iter().filter_map(|a| a.clone().ok()).collect();
    let counters = ledger.counters();
    let mut results: Vec<Applied> = match counters.apply_steps(&steps).await {
        Ok(outcomes) => outcomes.into_iter().map(applied).collect(),
        Err(e) if is_curable(&e) || steps.len() <= 1 => {
            vec![applied(Err(e)); steps.len()]
        }
        Err(e) => {
            tracing::warn!(error = %e, steps = steps.len(), "group failed; applying its steps one by one");
            let mut one_by_one = Vec::with_capacity(steps.len());
            for step in &steps {
                let outcome = counters.apply_steps(std::slice::from_ref(step)).await;
                one_by_one.push(match outcome {
                    Ok(mut outcomes) => applied(outcomes.pop().expect("one outcome per step")),
                    Err(e) => applied(Err(e)),
                });
            }
            one_by_one
        }
    }
    .into_iter()
    .rev()
    .collect();
    asked
        .into_iter()
        .map(|a| match a {
            Err(outcome) => Applied::Done(outcome),
            Ok(_) => results.pop().expect("one result per step"),
        })
        .collect()
}

fn is_curable(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Unavailable(_) | StoreError::NotDurable(_) | StoreError::Full(_)
    )
}

fn applied(outcome: Result<Outcome, StoreError>) -> Applied {
    match outcome {
        Ok(outcome) => Applied::Done(outcome),
        Err(e) if is_curable(&e) => Applied::Retry(e.to_string()),
        Err(e) => Applied::Error(e.to_string()),
    }
}
