//! A supervisor: watches processes by pid and starts again the ones that died, with backoff.
//!
//! The local fleet should heal like a cluster does: a process that dies (SIGKILL, a crash, an
//! exit after SIGTERM) comes back by itself. This is the engine only, without knowledge of the
//! fleet: each member says how it is started again ([`Restart`], implemented in
//! [`crate::respawn`]), and the caller polls ([`Supervisor::poll`], a few times a second) and
//! records what the [`Event`]s report (the launcher keeps state.json current with them).
//!
//! Each restart runs on a thread of its own, because some wait long (a Redis node waits for
//! its set's failover, a RabbitMQ node boots in 10-25 s) and must not hold up the others.
//! Deaths are noticed by polling, not by `wait()`: the processes are not necessarily children
//! of the supervisor (a detached supervisor adopts what `up` started).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::proc;

/// How long to wait before a restart: `initial`, doubling with every death that follows
/// shortly after a start, up to `max`; back to `initial` once the process had been up for
/// `reset_after` (a process that crashes once a day should not wait 10 s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    pub initial: Duration,
    pub max: Duration,
    pub reset_after: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Backoff {
            initial,
            max,
            reset_after,
            next: initial,
        }
    }

    /// The fleet's policy: 0.5 s doubling to 10 s, reset after a minute up.
    pub fn fleet() -> Self {
        Self::new(
            Duration::from_millis(500),
            Duration::from_secs(10),
            Duration::from_secs(60),
        )
    }

    /// The delay before the next start of a process that was up for `uptime` (zero for a
    /// start that failed).
    pub fn delay(&mut self, uptime: Duration) -> Duration {
        if uptime >= self.reset_after {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// How a member is started again.
pub trait Restart: Send + Sync {
    /// Starts the process again and returns once it serves (or gives up with an error; the
    /// supervisor then tries again after a backoff). `stop` is raised when the supervisor shuts
    /// down: a restart that waits for something should give up then.
    fn restart(&self, stop: &AtomicBool) -> Result<Started>;
}

/// A process a [`Restart`] started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub pid: u32,
    /// The role it took, when that can differ from the one it had (a Redis node).
    pub role: Option<String>,
    /// Something worth logging (it runs, but e.g. its replication is not online yet).
    pub note: Option<String>,
}

impl Started {
    pub fn pid(pid: u32) -> Self {
        Started {
            pid,
            role: None,
            note: None,
        }
    }
}

/// What happened to a member in one [`Supervisor::poll`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The process is gone; a restart begins after `retry_in`.
    Died {
        member: usize,
        pid: u32,
        retry_in: Duration,
    },
    /// It runs again: the new pid (and its start time, as `proc::start_ticks` reads it).
    /// `down_for`: from when the death was noticed until it served again.
    Restarted {
        member: usize,
        started: Started,
        start_ticks: Option<u64>,
        down_for: Duration,
    },
    /// The restart failed; the next one begins after `retry_in`.
    Failed {
        member: usize,
        error: String,
        retry_in: Duration,
    },
}

enum Phase {
    Running {
        since: Instant,
    },
    Waiting {
        until: Instant,
        down_since: Instant,
    },
    Restarting {
        handle: JoinHandle<Result<Started>>,
        down_since: Instant,
    },
}

struct Member {
    name: String,
    pid: u32,
    start_ticks: Option<u64>,
    restart: Arc<dyn Restart>,
    backoff: Backoff,
    phase: Phase,
}

/// The supervised processes. Members are numbered in the order they were added.
pub struct Supervisor {
    members: Vec<Member>,
    stop: Arc<AtomicBool>,
}

impl Default for Supervisor {
    fn default() -> Self {
        Self::new()
    }
}

impl Supervisor {
    pub fn new() -> Self {
        Supervisor {
            members: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Adopts the running process `pid` (started at `start_ticks`, `None`: trust the pid) and
    /// returns its member number. A process that is already dead is restarted at the first
    /// poll.
    pub fn add(
        &mut self,
        name: &str,
        pid: u32,
        start_ticks: Option<u64>,
        backoff: Backoff,
        restart: Arc<dyn Restart>,
    ) -> usize {
        self.members.push(Member {
            name: name.to_string(),
            pid,
            start_ticks,
            restart,
            backoff,
            phase: Phase::Running {
                since: Instant::now(),
            },
        });
        self.members.len() - 1
    }

    pub fn name(&self, member: usize) -> &str {
        &self.members[member].name
    }

    /// The current pid of a member (the dead one's while it waits for its restart).
    pub fn pid(&self, member: usize) -> u32 {
        self.members[member].pid
    }

    /// True while a member is dead and waiting for, or in, its restart.
    pub fn is_down(&self, member: usize) -> bool {
        !matches!(self.members[member].phase, Phase::Running { .. })
    }

    /// True while a restart runs (a thread is starting a process).
    pub fn is_restarting(&self) -> bool {
        self.members
            .iter()
            .any(|m| matches!(m.phase, Phase::Restarting { .. }))
    }

    /// One pass: notices deaths, begins restarts whose backoff is over, collects restarts
    /// that finished.
    pub fn poll(&mut self) -> Vec<Event> {
        let mut events = Vec::new();
        let now = Instant::now();
        for (i, m) in self.members.iter_mut().enumerate() {
            let phase = std::mem::replace(&mut m.phase, Phase::Running { since: now });
            m.phase = match phase {
                Phase::Running { since } if proc::same_process(m.pid, m.start_ticks) => {
                    Phase::Running { since }
                }
                Phase::Running { since } => {
                    let retry_in = m.backoff.delay(now.duration_since(since));
                    events.push(Event::Died {
                        member: i,
                        pid: m.pid,
                        retry_in,
                    });
                    Phase::Waiting {
                        until: now + retry_in,
                        down_since: now,
                    }
                }
                Phase::Waiting { until, down_since } if now >= until => {
                    let restart = Arc::clone(&m.restart);
                    let stop = Arc::clone(&self.stop);
                    let handle = std::thread::Builder::new()
                        .name(format!("restart {}", m.name))
                        .spawn(move || restart.restart(&stop));
                    match handle {
                        Ok(handle) => Phase::Restarting { handle, down_since },
                        Err(e) => {
                            let retry_in = m.backoff.delay(Duration::ZERO);
                            events.push(Event::Failed {
                                member: i,
                                error: format!("cannot start a thread: {e}"),
                                retry_in,
                            });
                            Phase::Waiting {
                                until: now + retry_in,
                                down_since,
                            }
                        }
                    }
                }
                Phase::Restarting { handle, down_since } if handle.is_finished() => {
                    finish(i, m, handle, down_since, &mut events)
                }
                other => other,
            };
        }
        events
    }

    /// Stops supervising: restarts under way are told to give up ([`Restart::restart`]'s
    /// `stop`) and waited for; their outcome is returned, so a process that did start is
    /// recorded rather than left behind unknown.
    pub fn shutdown(mut self) -> Vec<Event> {
        self.stop.store(true, Ordering::SeqCst);
        let mut events = Vec::new();
        for (i, m) in self.members.iter_mut().enumerate() {
            let phase = std::mem::replace(
                &mut m.phase,
                Phase::Running {
                    since: Instant::now(),
                },
            );
            if let Phase::Restarting { handle, down_since } = phase {
                finish(i, m, handle, down_since, &mut events);
            }
        }
        events
    }
}

/// The outcome of a finished restart thread, as an event; the member's next phase.
fn finish(
    i: usize,
    m: &mut Member,
    handle: JoinHandle<Result<Started>>,
    down_since: Instant,
    events: &mut Vec<Event>,
) -> Phase {
    let outcome = handle
        .join()
        .unwrap_or_else(|_| Err(anyhow::anyhow!("the restart thread panicked")));
    // After the join: at shutdown it waits for the restart to end.
    let now = Instant::now();
    match outcome {
        Ok(started) => {
            m.pid = started.pid;
            m.start_ticks = proc::start_ticks(started.pid);
            events.push(Event::Restarted {
                member: i,
                started,
                start_ticks: m.start_ticks,
                down_for: now.duration_since(down_since),
            });
            Phase::Running { since: now }
        }
        Err(e) => {
            let retry_in = m.backoff.delay(Duration::ZERO);
            events.push(Event::Failed {
                member: i,
                error: format!("{e:#}"),
                retry_in,
            });
            Phase::Waiting {
                until: now + retry_in,
                down_since,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_resets_after_a_long_run() {
        let mut b = Backoff::fleet();
        let quick = Duration::from_secs(1);
        let delays: Vec<u64> = (0..7).map(|_| b.delay(quick).as_millis() as u64).collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 8000, 10000, 10000]);
        // A failed start counts as a quick death.
        assert_eq!(b.delay(Duration::ZERO), Duration::from_secs(10));
        // Up for a minute: the next death is treated as the first.
        assert_eq!(b.delay(Duration::from_secs(60)), Duration::from_millis(500));
        assert_eq!(b.delay(quick), Duration::from_secs(1));
    }
}
