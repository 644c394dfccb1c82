//! `cargo xtask supervise`: keep the fleet running; a process that dies is started again.
//!
//! `up` runs this loop itself in the foreground, and starts it as a detached process of its
//! own with `--detach` (`supervise --daemon`, in a session of its own so it outlives the
//! terminal). The engine and the restart rules are in the library (`xtask::supervisor`,
//! `xtask::respawn`); this module maps the state file's records to them, and keeps the state
//! file current: after each restart the record holds the new pid and start time and counts
//! the restart (so `ps`, `kill` and `chaos` always see the current process).
//!
//! `down` must stop the supervisor before the fleet, or it would restart what `down` stops. It
//! creates [`stop_marker`] and waits for the supervisor to exit: a marker rather than a signal
//! because in the foreground the supervisor is `up` itself, whose SIGTERM handling means "stop
//! the whole fleet" (Ctrl-C). On the marker the supervisor lets restarts under way finish,
//! records them and exits.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::sleep;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::fleet;
use crate::interrupt;
use crate::state::{self, Kind, Record, State, SupervisorRecord};
use crate::up;
use xtask::proc::{self, spawn_logged, tail};
use xtask::respawn::{BrokerNode, Gateway, Program, Ready, RedisNode, SentinelNode};
use xtask::supervisor::{Backoff, Event, Restart, Supervisor};

/// How often the processes are checked.
const POLL: Duration = Duration::from_millis(250);
/// How long a dead Redis master waits for its failover before it is started as the master.
const FAILOVER_GRACE: Duration = Duration::from_secs(30);
/// How long a restart waits for a replica's sync or a service's /health before calling it back.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Why supervision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// Ctrl-C or SIGTERM to the supervising process.
    Interrupted,
    /// `cargo xtask down` asked (see [`stop_marker`]).
    DownRequested,
    /// The state file is gone: the fleet was stopped.
    StateGone,
}

/// The file `down` creates to stop the supervisor.
pub fn stop_marker(root: &Path) -> PathBuf {
    fleet::fleet_dir(root).join("supervisor.stop")
}

/// The supervisor's log: one line per death and restart.
pub fn log_path(fleet_dir: &Path) -> PathBuf {
    fleet_dir.join("logs").join("supervisor.log")
}

/// Supervises the fleet of the state file until interrupted or `down` asks. `daemon`: stdout
/// already is the supervisor log (a detached supervisor); otherwise lines go to stdout and are
/// appended to the log.
pub fn run(root: &Path, daemon: bool) -> Result<Ended> {
    let mut state =
        State::load(root)?.context("no fleet state: start the fleet with `cargo xtask up`")?;
    if let Some(other) = state.live_supervisor() {
        if other.pid != std::process::id() {
            bail!("the fleet is already supervised by pid {}", other.pid);
        }
    }
    if stop_marker(root).exists() {
        bail!("`cargo xtask down` is stopping the fleet");
    }
    let fleet = fleet::fleet_dir(root).canonicalize()?;
    let mut log = Log::open(&log_path(&fleet), !daemon)?;
    let mut sup = Supervisor::new();
    for rec in &state.processes {
        let restart = restarter(root, &fleet, &state, rec)?;
        sup.add(
            &rec.name,
            rec.pid,
            rec.start_ticks,
            Backoff::fleet(),
            restart,
        );
    }
    state.supervisor = Some(SupervisorRecord::me());
    state.save(root)?;
    // What it starts carries the fleet's tag, as what `up` started does (see proc.rs).
    proc::set_child_tag(Some(&state.tag));
    log.line(&format!(
        "supervising {} processes (pid {})",
        state.processes.len(),
        std::process::id()
    ));

    let ended = loop {
        if interrupt::requested() {
            break Ended::Interrupted;
        }
        if stop_marker(root).exists() {
            break Ended::DownRequested;
        }
        if !state::path(root).exists() {
            break Ended::StateGone;
        }
        let events = sup.poll();
        apply(root, &mut state, events, &mut log)?;
        sleep(POLL);
    };
    if sup.is_restarting() {
        log.line("stopping: waiting for the restarts under way");
    }
    let events = sup.shutdown();
    apply(root, &mut state, events, &mut log)?;
    log.line(&format!("supervisor stopped ({ended:?})"));
    Ok(ended)
}

/// Records what the supervisor reports: the state file after each restart, the log always.
fn apply(root: &Path, state: &mut State, events: Vec<Event>, log: &mut Log) -> Result<()> {
    for event in events {
        match event {
            Event::Died {
                member,
                pid,
                retry_in,
            } => {
                let r = &state.processes[member];
                log.line(&format!(
                    "{} ({}, pid {pid}) died; restarting in {:.1} s",
                    r.name,
                    r.role,
                    retry_in.as_secs_f64()
                ));
            }
            Event::Restarted {
                member,
                started,
                start_ticks,
                down_for,
            } => {
                let r = &mut state.processes[member];
                r.pid = started.pid;
                r.start_ticks = start_ticks;
                r.restarts += 1;
                if let Some(role) = started.role {
                    r.role = role;
                }
                let line = format!(
                    "{} is back: pid {}, {:.1} s after it died (restart {}){}",
                    r.name,
                    r.pid,
                    down_for.as_secs_f64(),
                    r.restarts,
                    started.note.map(|n| format!("; {n}")).unwrap_or_default()
                );
                // Never recreate a state file `down` removed.
                if state::path(root).exists() {
                    state.save(root)?;
                }
                log.line(&line);
            }
            Event::Failed {
                member,
                error,
                retry_in,
            } => {
                log.line(&format!(
                    "restarting {} failed; next try in {:.1} s: {error}",
                    state.processes[member].name,
                    retry_in.as_secs_f64()
                ));
            }
        }
    }
    Ok(())
}

/// How the process of `rec` is started again.
pub fn restarter(
    root: &Path,
    fleet_dir: &Path,
    state: &State,
    rec: &Record,
) -> Result<Arc<dyn Restart>> {
    Ok(match rec.kind {
        Kind::Redis => Arc::new(RedisNode {
            dir: fleet::redis_dir(fleet_dir, &rec.name),
            port: rec.port,
            store: rec
                .store
                .clone()
                .with_context(|| format!("{} has no store", rec.name))?,
            sentinel_ports: fleet::SENTINEL_PORTS.to_vec(),
            failover_grace: FAILOVER_GRACE,
            sync_timeout: READY_TIMEOUT,
        }),
        Kind::Sentinel => Arc::new(SentinelNode {
            dir: fleet::sentinel_dir(fleet_dir, &rec.name),
            port: rec.port,
        }),
        Kind::Broker => {
            let b = state
                .broker
                .as_ref()
                .context("the state file has no broker details")?;
            Arc::new(BrokerNode {
                dir: b.dir.clone(),
                node: b.node.clone(),
                amqp_port: b.amqp_port,
                dist_port: b.dist_port,
            })
        }
        Kind::Service => {
            let inst = fleet::instances()
                .into_iter()
                .find(|i| i.name == rec.name)
                .with_context(|| format!("{} is no instance of the fleet", rec.name))?;
            let gateway_port = gateway_port(state);
            let (root, dir) = (root.to_path_buf(), fleet_dir.to_path_buf());
            Arc::new(Program {
                log: up::service_log(fleet_dir, &inst),
                ready: Ready::Http(format!("http://127.0.0.1:{}/health", inst.port)),
                ready_timeout: READY_TIMEOUT,
                command: Box::new(move || up::service_command(&root, &dir, &inst, gateway_port)),
            })
        }
        Kind::Gateway => Arc::new(Gateway {
            root: root.to_path_buf(),
            fleet_dir: fleet_dir.to_path_buf(),
            params: up::gateway_params(fleet_dir, rec.port, up::raise_nofile_limit()),
        }),
    })
}

/// The gateway's port (the services' STOCK_URL goes through it).
fn gateway_port(state: &State) -> u16 {
    state
        .processes
        .iter()
        .find(|r| r.kind == Kind::Gateway)
        .map(|r| r.port)
        .or_else(|| state.gateway_url.rsplit(':').next()?.parse().ok())
        .unwrap_or(fleet::DEFAULT_GATEWAY_PORT)
}

/// Starts `cargo xtask supervise --daemon` in a session of its own and returns its pid once it
/// has taken the fleet over (recorded itself in the state file).
pub fn spawn_detached(root: &Path) -> Result<u32> {
    let state = State::load(root)?.context("no fleet state to supervise")?;
    let fleet = fleet::fleet_dir(root).canonicalize()?;
    let log = log_path(&fleet);
    proc::set_child_tag(Some(&state.tag));
    let mut cmd = proc::command(own_executable());
    proc::set_child_tag(None);
    cmd.args(["supervise", "--daemon"]).current_dir(root);
    let mut child = spawn_logged(&mut cmd, &log)?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the supervisor exited at start ({status}):\n{}",
                tail(&log, 10)
            );
        }
        let registered = State::load(root)?
            .and_then(|s| s.supervisor)
            .is_some_and(|s| s.pid == pid);
        if registered {
            return Ok(pid);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            bail!(
                "the supervisor did not take over within 15 s:\n{}",
                tail(&log, 10)
            );
        }
        sleep(Duration::from_millis(50));
    }
}

/// The program to run `supervise` with: this very binary. When it was replaced on disk
/// meanwhile (another `cargo build` while `up` built the services), its path names a deleted
/// file, but the kernel still runs it through /proc/self/exe.
fn own_executable() -> PathBuf {
    match std::env::current_exe() {
        Ok(p) if p.is_file() => p,
        _ => PathBuf::from("/proc/self/exe"),
    }
}

/// Supervisor log lines, timestamped (UTC).
struct Log {
    /// Also appended here (a foreground supervisor; a detached one's stdout is the log).
    file: Option<File>,
}

impl Log {
    fn open(path: &Path, append_to_file: bool) -> Result<Self> {
        let file = match append_to_file {
            true => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open {}", path.display()))?,
            ),
            false => None,
        };
        Ok(Log { file })
    }

    fn line(&mut self, msg: &str) {
        let line = format!("{} supervisor: {msg}", timestamp(SystemTime::now()));
        println!("{line}");
        if let Some(f) = self.file.as_mut() {
            let _ = writeln!(f, "{line}");
        }
    }
}

/// `HH:MM:SS.mmm` (UTC) of `t`: enough to line the log up with the other logs of one run.
fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_times_of_day() {
        let t = UNIX_EPOCH + Duration::from_millis(86_400_000 * 3 + 3_723_045);
        assert_eq!(timestamp(t), "01:02:03.045");
    }

    #[test]
    fn every_kind_of_record_has_a_restart_rule() {
        let root = Path::new("/repo");
        let fleet_dir = Path::new("/repo/target/fleet");
        let rec = |kind, name: &str, store: Option<&str>| Record {
            store: store.map(str::to_string),
            ..Record::new(kind, "r", name, u32::MAX - 1, 1, None, Path::new("/l"))
        };
        let mut state = State {
            gateway_url: "http://127.0.0.1:8000".into(),
            tag: "t".into(),
            broker: Some(state::Broker {
                node: "fleet@localhost".into(),
                dir: "/b".into(),
                amqp_port: 5673,
                dist_port: 25673,
                started_epmd: false,
            }),
            processes: vec![
                rec(Kind::Redis, "stock-redis-1", Some("stock")),
                rec(Kind::Sentinel, "sentinel-1", None),
                rec(Kind::Broker, "rabbitmq", None),
                rec(Kind::Service, "order-2", None),
                rec(Kind::Gateway, "nginx", None),
            ],
            supervisor: None,
        };
        for r in &state.processes {
            assert!(restarter(root, fleet_dir, &state, r).is_ok(), "{}", r.name);
        }
        // A Redis record without its store, or a service the fleet does not have, is refused.
        let bad = rec(Kind::Redis, "x", None);
        assert!(restarter(root, fleet_dir, &state, &bad).is_err());
        let bad = rec(Kind::Service, "order-9", None);
        assert!(restarter(root, fleet_dir, &state, &bad).is_err());
        state.broker = None;
        let broker = state.processes[2].clone();
        assert!(restarter(root, fleet_dir, &state, &broker).is_err());
        assert_eq!(gateway_port(&state), 1);
    }
}
