//! `cargo xtask restart <name|role>`: stop one process of the fleet gracefully (SIGTERM) and
//! see it come back.
//!
//! The supervisor starts it again, as after any death; this command waits until the state
//! file shows a new live process and says so. With no supervisor running it starts the process
//! itself, by the same rules (`supervise::restarter`), and records it.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::state::State;
use crate::{fleet, kill, supervise};
use xtask::proc::{self, Stopped};

/// How long a process may take to exit after SIGTERM (RabbitMQ and a Redis master waiting for
/// its replicas take a while) before it gets SIGKILL.
const GRACE: Duration = Duration::from_secs(30);
/// How long to wait for the supervisor to bring it back (a Redis master waits for its
/// failover, RabbitMQ boots in up to 25 s, and the backoff may add 10 s).
const BACK_TIMEOUT: Duration = Duration::from_secs(180);

pub fn run(root: &Path, target: &str) -> Result<()> {
    let state = State::load(root)?.context("no fleet state: is a fleet running?")?;
    let rec = kill::resolve(&state, target)?.clone();
    let index = state
        .processes
        .iter()
        .position(|r| r.name == rec.name)
        .context("record vanished")?;
    let began = Instant::now();
    if rec.alive() {
        println!(
            "xtask: stopping {} (pid {}) with SIGTERM",
            rec.name, rec.pid
        );
        if proc::terminate(rec.pid, rec.start_ticks, GRACE)? == Stopped::Killed {
            println!(
                "xtask: {} ignored SIGTERM for {} s: killed",
                rec.name,
                GRACE.as_secs()
            );
        }
    }
    if state.live_supervisor().is_none() {
        println!("xtask: no supervisor runs; starting {} here", rec.name);
        let fleet_dir = fleet::fleet_dir(root).canonicalize()?;
        let restart = supervise::restarter(root, &fleet_dir, &state, &rec)?;
        let started = restart.restart(&AtomicBool::new(false))?;
        let mut state = state;
        let r = &mut state.processes[index];
        r.pid = started.pid;
        r.start_ticks = proc::start_ticks(started.pid);
        r.restarts += 1;
        if let Some(role) = started.role {
            r.role = role;
        }
        state.save(root)?;
        println!(
            "xtask: {} is back: pid {} after {:.1} s",
            rec.name,
            started.pid,
            began.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    println!("xtask: waiting for the supervisor to start it again");
    loop {
        let now = State::load(root)?.context("the fleet was stopped meanwhile")?;
        let r = &now.processes[index];
        if r.pid != rec.pid && r.alive() {
            println!(
                "xtask: {} is back: pid {} after {:.1} s ({}, restart {})",
                r.name,
                r.pid,
                began.elapsed().as_secs_f64(),
                r.current_role(),
                r.restarts
            );
            return Ok(());
        }
        if began.elapsed() >= BACK_TIMEOUT {
            bail!(
                "{} is not back after {} s; see target/fleet/logs/supervisor.log",
                rec.name,
                BACK_TIMEOUT.as_secs()
            );
        }
        sleep(Duration::from_millis(100));
    }
}
