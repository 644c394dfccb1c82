//! `cargo xtask down`: stop everything `up` started, then prove nothing of ours is left.
//!
//! The supervisor goes first (asked through `supervise::stop_marker`, waited for), so nothing
//! is restarted while the fleet goes down; the state file is read after it stopped, since it
//! may have recorded a restart at the last moment.
//! Stop order is then the reverse of the dependencies: gateway (no new requests), services, broker,
//! Sentinels (so they do not start failovers while the data nodes go away), Redis. After that,
//! leftovers are stopped too (an nginx worker orphaned by a SIGKILLed master, a process started
//! by an `up` that died before recording it): processes that carry the fleet's tag in their
//! environment, and fleet programs whose working directory is inside target/fleet (redis-server
//! and nginx overwrite their environment with their process title, so the tag is gone there).
//! epmd is exempt: it is shared by every Erlang node on the machine and handled by
//! `rabbit::release_epmd`. Running `down` twice, or with no fleet, is fine.

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::state::{self, Kind, Record, State};
use crate::{fleet, supervise};
use xtask::{proc, rabbit};

pub fn run(root: &Path) -> Result<()> {
    stop_supervisor(root)?;
    let state = State::load(root)?;
    let fleet_dir = fleet::fleet_dir(root);
    let tag = match &state {
        Some(s) => s.tag.clone(),
        None => fleet_dir
            .canonicalize()
            .unwrap_or_else(|_| fleet_dir.clone())
            .display()
            .to_string(),
    };
    match &state {
        None => println!(
            "xtask: no fleet state ({}): nothing recorded to stop",
            state::path(root).display()
        ),
        Some(s) => stop_recorded(s)?,
    }

    let strays = leftovers(&tag, &fleet_dir);
    if !strays.is_empty() {
        println!(
            "xtask: stopping {} leftover process(es) of this fleet: {}",
            strays.len(),
            describe(&strays)
        );
        for pid in &strays {
            proc::signal(*pid, libc::SIGTERM);
        }
        wait_all_gone(&strays, Duration::from_secs(5));
        for pid in &strays {
            proc::kill9(*pid, None);
        }
        wait_all_gone(&strays, Duration::from_secs(5));
    }

    // Verify: no recorded process and no tagged process survives.
    let mut survivors: Vec<String> = state
        .iter()
        .flat_map(|s| s.processes.iter())
        .filter(|r| r.alive())
        .map(|r| format!("{} (pid {})", r.name, r.pid))
        .collect();
    let tagged_left = leftovers(&tag, &fleet_dir);
    if !tagged_left.is_empty() {
        survivors.push(describe(&tagged_left));
    }
    if !survivors.is_empty() {
        bail!("still running after down: {}", survivors.join(", "));
    }
    let _ = std::fs::remove_file(supervise::stop_marker(root));
    if state.is_some() {
        std::fs::remove_file(state::path(root))?;
        println!(
            "xtask: fleet stopped; nothing of it is left running (logs kept in {})",
            fleet_dir.join("logs").display()
        );
    }
    Ok(())
}

/// How long the supervisor may take to finish restarts under way (a RabbitMQ node boots in up
/// to 25 s, `rabbitmqctl wait` gives up after 90).
const SUPERVISOR_GRACE: Duration = Duration::from_secs(120);

/// Asks the supervisor to stop and waits until it did (SIGKILL after [`SUPERVISOR_GRACE`]).
/// Nothing to do when none runs, or when it is this very process (`up` in the foreground,
/// stopping its fleet after Ctrl-C: its supervision loop has already ended).
fn stop_supervisor(root: &Path) -> Result<()> {
    let Some(sup) = State::load(root)?.and_then(|s| s.live_supervisor().cloned()) else {
        return Ok(());
    };
    if sup.pid == std::process::id() {
        return Ok(());
    }
    println!(
        "xtask: stopping the supervisor (pid {}) first, so nothing is restarted meanwhile",
        sup.pid
    );
    std::fs::write(
        supervise::stop_marker(root),
        format!("{}\n", std::process::id()),
    )?;
    let start = Instant::now();
    let mut told = false;
    while sup.alive() && start.elapsed() < SUPERVISOR_GRACE {
        if !told && start.elapsed() >= Duration::from_secs(3) {
            println!("xtask: the supervisor finishes a restart under way first");
            told = true;
        }
        sleep(Duration::from_millis(50));
    }
    if sup.alive() {
        println!(
            "xtask: the supervisor did not stop within {} s: SIGKILL",
            SUPERVISOR_GRACE.as_secs()
        );
        proc::kill9(sup.pid, sup.start_ticks);
        proc::wait_gone(sup.pid, sup.start_ticks, Duration::from_secs(5));
    }
    Ok(())
}

/// Programs the fleet runs with their working directory inside target/fleet.
const FLEET_PROGRAMS: &[&str] = &[
    "redis-server",
    "redis-sentinel",
    "nginx",
    "stock",
    "payment",
    "order",
];

/// Processes of this fleet still running: tagged ones except epmd (shared with other Erlang
/// nodes; see the module docs), and fleet programs working inside the fleet directory.
fn leftovers(tag: &str, fleet_dir: &Path) -> Vec<u32> {
    let mut pids: Vec<u32> = proc::tagged_processes(tag)
        .into_iter()
        .filter(|&pid| proc::comm(pid) != "epmd")
        .collect();
    if let Ok(dir) = fleet_dir.canonicalize() {
        pids.extend(
            proc::processes_with_cwd_under(&dir)
                .into_iter()
                .filter(|&pid| FLEET_PROGRAMS.contains(&proc::comm(pid).as_str())),
        );
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn describe(pids: &[u32]) -> String {
    pids.iter()
        .map(|&p| format!("{} (pid {p})", proc::comm(p)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn wait_all_gone(pids: &[u32], timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| proc::is_alive(p)) && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
}

fn stop_recorded(state: &State) -> Result<()> {
    let of = |kind: Kind| -> Vec<&Record> {
        state.processes.iter().filter(|r| r.kind == kind).collect()
    };
    stop_all("gateway", &of(Kind::Gateway), Duration::from_secs(5));
    stop_all("services", &of(Kind::Service), Duration::from_secs(10));
    for r in of(Kind::Broker) {
        if !r.alive() {
            continue;
        }
        println!("xtask: stopping RabbitMQ ({})", r.name);
        match &state.broker {
            Some(b) => {
                if let Err(e) = rabbit::stop_node(&b.dir, &b.node, b.amqp_port, b.dist_port, r.pid)
                {
                    eprintln!("xtask: {e:#}");
                }
            }
            None => stop_all("broker", &[r], Duration::from_secs(20)),
        }
    }
    if let Some(b) = &state.broker {
        if b.started_epmd {
            if let Ok(true) = rabbit::release_epmd(&b.node) {
                println!("xtask: stopped epmd (started by this fleet, no other node used it)");
            }
        }
    }
    stop_all("sentinels", &of(Kind::Sentinel), Duration::from_secs(5));
    stop_all("redis", &of(Kind::Redis), Duration::from_secs(10));
    Ok(())
}

/// SIGTERM to every live one at once, SIGKILL to whoever is left after `grace`.
fn stop_all(what: &str, records: &[&Record], grace: Duration) {
    let live: Vec<&Record> = records.iter().copied().filter(|r| r.alive()).collect();
    if live.is_empty() {
        return;
    }
    println!("xtask: stopping {what} ({})", names(&live));
    for r in &live {
        proc::signal(r.pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while live.iter().any(|r| r.alive()) && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
    let stubborn: Vec<&Record> = live.iter().copied().filter(|r| r.alive()).collect();
    if stubborn.is_empty() {
        return;
    }
    println!(
        "xtask: {} ignored SIGTERM for {} s: SIGKILL",
        names(&stubborn),
        grace.as_secs()
    );
    for r in &stubborn {
        proc::kill9(r.pid, r.start_ticks);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while stubborn.iter().any(|r| r.alive()) && Instant::now() < deadline {
        sleep(Duration::from_millis(50));
    }
}

fn names(records: &[&Record]) -> String {
    records
        .iter()
        .map(|r| r.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
