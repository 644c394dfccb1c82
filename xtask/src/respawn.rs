//! How each kind of process of a fleet is started again after it died ([`Restart`]s for the
//! [`crate::supervisor`]).
//!
//! The rules, so a restarted process rejoins what it belonged to instead of forking it:
//! - a Redis node comes back on its port, config and data, always as a replica of its set's
//!   master *now*, as the Sentinels name it; while they still name the dead node itself (the
//!   failover is not done yet) it waits, because starting it as the master it was would give
//!   the set two masters (and an old master with a stale data set serving reads);
//! - a Sentinel comes back on its own rewritten config (its id, epochs, known peers);
//! - a RabbitMQ node comes back as the same node on the same data directory (durable queues
//!   and persistent messages survive; nothing is wiped);
//! - a program (a service instance) comes back with the same command, port and environment,
//!   so the gateway, which keeps every instance in its upstream, routes to it again by itself;
//! - nginx comes back on its config, after the workers its killed master left behind (which
//!   still hold the listening socket) are stopped.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::supervisor::{Restart, Started};
use crate::{gateway, http_get, proc, resp, RabbitNode, RedisServer, Sentinel};

/// Where a dead Redis node should come back, given what the Sentinels say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisPlan {
    /// As a replica of the master on this port.
    ReplicaOf(u16),
    /// As a master: the Sentinels still name it and no failover came within the grace period
    /// (no quorum, or no replica left to promote); its AOF is the best copy there is.
    Master,
    /// Not yet, for this reason.
    Wait(String),
}

/// The master port most of the answering Sentinels name (`None`: a Sentinel did not answer).
/// A tie is no answer: the Sentinels are in the middle of a failover.
pub fn agreed_master(answers: &[Option<u16>]) -> Option<u16> {
    let mut votes: HashMap<u16, usize> = HashMap::new();
    for port in answers.iter().flatten() {
        *votes.entry(*port).or_default() += 1;
    }
    let best = votes.values().copied().max()?;
    let mut leaders = votes.into_iter().filter(|(_, n)| *n == best);
    let (port, _) = leaders.next()?;
    leaders.next().is_none().then_some(port)
}

/// The decision for the node on `port`, `waited` after its restart began.
pub fn redis_plan(
    port: u16,
    answers: &[Option<u16>],
    waited: Duration,
    grace: Duration,
) -> RedisPlan {
    match agreed_master(answers) {
        Some(master) if master != port => RedisPlan::ReplicaOf(master),
        Some(_) if waited >= grace => RedisPlan::Master,
        Some(_) => RedisPlan::Wait("the Sentinels still name it master (failover pending)".into()),
        None if answers.iter().all(Option::is_none) => {
            RedisPlan::Wait("no Sentinel answers".into())
        }
        None => RedisPlan::Wait("the Sentinels disagree on the master".into()),
    }
}

/// A data node of a Sentinel-managed set ([`RedisServer::restart_in_set`]).
#[derive(Debug, Clone)]
pub struct RedisNode {
    pub dir: PathBuf,
    pub port: u16,
    /// The Sentinels' name for its set.
    pub store: String,
    pub sentinel_ports: Vec<u16>,
    /// How long to wait for a failover away from this node before starting it as the master.
    pub failover_grace: Duration,
    /// How long to wait for the replica's initial sync before calling it back anyway.
    pub sync_timeout: Duration,
}

impl RedisNode {
    /// `Some(master port)`: start as its replica; `None`: as a master.
    fn plan(&self, stop: &AtomicBool) -> Result<Option<u16>> {
        let began = Instant::now();
        loop {
            if stop.load(Ordering::SeqCst) {
                bail!("supervisor stopping");
            }
            let answers: Vec<Option<u16>> = self
                .sentinel_ports
                .iter()
                .map(|&s| resp::sentinel_master(s, &self.store))
                .collect();
            match redis_plan(self.port, &answers, began.elapsed(), self.failover_grace) {
                RedisPlan::ReplicaOf(m) => return Ok(Some(m)),
                RedisPlan::Master => return Ok(None),
                RedisPlan::Wait(_) => sleep(Duration::from_millis(200)),
            }
        }
    }
}

impl Restart for RedisNode {
    fn restart(&self, stop: &AtomicBool) -> Result<Started> {
        let replica_of = self.plan(stop)?;
        let server = RedisServer::restart_in_set(&self.dir, self.port, replica_of, None)?;
        let (role, note) = match replica_of {
            Some(master) => {
                let note = server
                    .wait_replica_synced(self.sync_timeout)
                    .err()
                    .map(|e| format!("{e:#}"));
                (
                    format!("{}-redis-replica", self.store),
                    Some(format!("replica of :{master}"))
                        .into_iter()
                        .chain(note)
                        .collect::<Vec<_>>()
                        .join("; "),
                )
            }
            None => (
                format!("{}-redis-master", self.store),
                format!(
                    "as master: no failover within {} s",
                    self.failover_grace.as_secs()
                ),
            ),
        };
        Ok(Started {
            pid: server.disarm(),
            role: Some(role),
            note: Some(note),
        })
    }
}

/// A Sentinel ([`Sentinel::restart_from_config`]).
#[derive(Debug, Clone)]
pub struct SentinelNode {
    pub dir: PathBuf,
    pub port: u16,
}

impl Restart for SentinelNode {
    fn restart(&self, _stop: &AtomicBool) -> Result<Started> {
        let s = Sentinel::restart_from_config(&self.dir, self.port)?;
        Ok(Started::pid(s.disarm()))
    }
}

/// The RabbitMQ node, on the directory it really uses ([`RabbitNode::dir`]).
#[derive(Debug, Clone)]
pub struct BrokerNode {
    pub dir: PathBuf,
    pub node: String,
    pub amqp_port: u16,
    pub dist_port: u16,
}

impl Restart for BrokerNode {
    fn restart(&self, _stop: &AtomicBool) -> Result<Started> {
        let node = RabbitNode::start(&self.dir, &self.node, self.amqp_port, self.dist_port)?;
        Ok(Started::pid(node.disarm()))
    }
}

/// When a restarted [`Program`] counts as back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ready {
    /// It accepts connections on this port.
    Port(u16),
    /// This URL answers 200 (a service's `/health`).
    Http(String),
}

/// Any program started by a command, with output appended to `log` (a service instance).
pub struct Program {
    /// Builds the command afresh for every start (a `Command` is not reusable). Build it with
    /// [`proc::command`], so it runs in a session of its own.
    pub command: Box<dyn Fn() -> Command + Send + Sync>,
    pub log: PathBuf,
    pub ready: Ready,
    /// How long to wait for `ready`; a program still running after that is called back anyway
    /// (a service whose stores are down answers nothing useful, yet it runs and will recover).
    pub ready_timeout: Duration,
}

impl Program {
    fn is_ready(&self) -> bool {
        match &self.ready {
            Ready::Port(p) => crate::net::port_is_open(*p),
            Ready::Http(url) => {
                matches!(http_get(url, Duration::from_secs(1)), Ok(r) if r.status == 200)
            }
        }
    }
}

impl Restart for Program {
    fn restart(&self, _stop: &AtomicBool) -> Result<Started> {
        let mut child = proc::spawn_logged(&mut (self.command)(), &self.log)?;
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "exited at start ({status}); last lines of {}:\n{}",
                    self.log.display(),
                    proc::tail(&self.log, 10)
                );
            }
            if self.is_ready() {
                return Ok(Started::pid(child.id()));
            }
            if Instant::now() >= deadline {
                // Dropped without waiting: the supervisor tracks it by pid (and reaps it).
                return Ok(Started {
                    pid: child.id(),
                    role: None,
                    note: Some(format!(
                        "running, but not ready after {} s",
                        self.ready_timeout.as_secs()
                    )),
                });
            }
            sleep(Duration::from_millis(50));
        }
    }
}

/// The nginx gateway ([`gateway::start`], which renders the same config again).
#[derive(Debug, Clone)]
pub struct Gateway {
    pub root: PathBuf,
    pub fleet_dir: PathBuf,
    pub params: gateway::Params,
}

impl Restart for Gateway {
    fn restart(&self, _stop: &AtomicBool) -> Result<Started> {
        stop_orphaned_workers(&self.params.prefix);
        let started = gateway::start(&self.root, &self.fleet_dir, &self.params)?;
        Ok(Started::pid(started.pid))
    }
}

/// Workers of a killed nginx master keep running and keep the listening socket, so a new
/// master could not bind its port: stop them (they work in the gateway's prefix).
fn stop_orphaned_workers(prefix: &Path) {
    let Ok(prefix) = prefix.canonicalize() else {
        return;
    };
    let workers: Vec<u32> = proc::processes_with_cwd_under(&prefix)
        .into_iter()
        .filter(|&pid| proc::comm(pid) == "nginx")
        .collect();
    for &pid in &workers {
        proc::kill9(pid, None);
    }
    for &pid in &workers {
        proc::wait_gone(pid, None, Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_majority_of_sentinels_names_the_master() {
        assert_eq!(agreed_master(&[Some(1), Some(1), Some(2)]), Some(1));
        assert_eq!(agreed_master(&[Some(2), None, None]), Some(2));
        assert_eq!(agreed_master(&[Some(1), Some(2), None]), None);
        assert_eq!(agreed_master(&[None, None, None]), None);
    }

    #[test]
    fn a_dead_master_waits_for_its_failover() {
        let grace = Duration::from_secs(30);
        let early = Duration::from_secs(1);
        // The Sentinels name another node: replicate from it at once.
        assert_eq!(
            redis_plan(6400, &[Some(6410); 3], early, grace),
            RedisPlan::ReplicaOf(6410)
        );
        // They still name the dead node itself: wait, then (no failover came) start as master.
        assert!(matches!(
            redis_plan(6400, &[Some(6400), Some(6400), None], early, grace),
            RedisPlan::Wait(_)
        ));
        assert_eq!(
            redis_plan(6400, &[Some(6400); 3], grace, grace),
            RedisPlan::Master
        );
        // Nobody to ask, or no agreement: wait (however long; Sentinels come back too).
        assert!(matches!(
            redis_plan(6400, &[None; 3], grace * 2, grace),
            RedisPlan::Wait(_)
        ));
        assert!(matches!(
            redis_plan(6400, &[Some(6410), Some(6420), None], early, grace),
            RedisPlan::Wait(_)
        ));
    }
}
