//! `cargo xtask kill <name|role>`: SIGKILL one process of the fleet, as a crash would.
//!
//! By name (`stock-redis-1`, `order-2`, `rabbitmq`, as `ps` lists them) or by the role it has
//! *now* (`stock-redis-master` is whichever node is the master at this moment; a role several
//! processes share, such as `stock-service`, picks the first live one). The supervisor then
//! starts it again; `ps` shows the restart.

use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::state::{Record, State};
use xtask::proc;

pub fn run(root: &Path, target: &str) -> Result<()> {
    let state = State::load(root)?.context("no fleet state: is a fleet running?")?;
    let rec = resolve(&state, target)?;
    if !rec.alive() {
        bail!(
            "{} (pid {}) is not running; {}",
            rec.name,
            rec.pid,
            match state.live_supervisor() {
                Some(_) => "the supervisor is starting it again",
                None => "no supervisor runs to start it again",
            }
        );
    }
    let role = rec.current_role();
    proc::kill9(rec.pid, rec.start_ticks);
    println!(
        "xtask: killed {} ({role}, pid {}) with SIGKILL",
        rec.name, rec.pid
    );
    if state.live_supervisor().is_none() {
        println!("xtask: no supervisor runs: it stays dead (`cargo xtask supervise --detach`)");
    }
    Ok(())
}

/// The record named `target`, or the first live one whose current role is `target`.
pub fn resolve<'a>(state: &'a State, target: &str) -> Result<&'a Record> {
    if let Some(r) = state.processes.iter().find(|r| r.name == target) {
        return Ok(r);
    }
    // Only Redis roles change; asking every node is wasted on the others.
    let asks_redis = target.ends_with("-redis-master") || target.ends_with("-redis-replica");
    let by_role = state.processes.iter().find(|r| {
        if asks_redis {
            r.alive() && r.current_role() == target
        } else {
            r.role == target && r.alive()
        }
    });
    if let Some(r) = by_role {
        return Ok(r);
    }
    let mut roles: Vec<&str> = state.processes.iter().map(|r| r.role.as_str()).collect();
    roles.sort_unstable();
    roles.dedup();
    bail!(
        "no live process named or in role {target:?}. names: {}; roles: {}",
        state
            .processes
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        roles.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Kind;

    #[test]
    fn names_resolve_and_unknown_targets_list_the_choices() {
        let me = std::process::id();
        let state = State {
            gateway_url: "http://127.0.0.1:8000".into(),
            tag: "t".into(),
            broker: None,
            processes: vec![
                // A dead one first: a role picks a live process.
                Record::new(
                    Kind::Service,
                    "order-service",
                    "order-1",
                    u32::MAX - 1,
                    1,
                    None,
                    Path::new("/l"),
                ),
                Record::new(
                    Kind::Service,
                    "order-service",
                    "order-2",
                    me,
                    2,
                    None,
                    Path::new("/l"),
                ),
            ],
            supervisor: None,
        };
        assert_eq!(resolve(&state, "order-1").unwrap().name, "order-1");
        assert_eq!(resolve(&state, "order-service").unwrap().name, "order-2");
        let err = resolve(&state, "nope").unwrap_err().to_string();
        assert!(
            err.contains("order-1, order-2") && err.contains("order-service"),
            "{err}"
        );
    }
}
