//! "Every process back": what the chaos run waits for after each fault and checks at the end.
//!
//! Back means more than alive: every recorded process runs (the supervisor keeps the records
//! pointing at the current processes); every store has one master, the one all three
//! Sentinels name, with both other nodes replicating from it, link up; every Sentinel sees
//! its master, both replicas and both other Sentinels without a down flag (a failover needs
//! them); the broker accepts connections; every service instance answers `/ready`.
//!
//! Blocking code (the small RESP and HTTP clients of the kit), run on the fault thread.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

use crate::fleet;
use crate::state::{Kind, State};
use xtask::{http_get, resp};

/// What is not back yet; empty when everything is.
pub fn problems(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let state = match State::load(root) {
        Ok(Some(s)) => s,
        Ok(None) => return vec!["no fleet state file: is the fleet up?".into()],
        Err(e) => return vec![format!("{e:#}")],
    };
    for r in &state.processes {
        if !r.alive() {
            out.push(format!("{} (pid {}) is not running", r.name, r.pid));
        }
    }
    for (store, nodes) in fleet::STORES {
        if let Err(e) = store_back(store, &nodes) {
            out.push(format!("store {store}: {e:#}"));
        }
    }
    if let Err(e) = sentinels_back() {
        out.push(format!("{e:#}"));
    }
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, fleet::AMQP_PORT));
    if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_err() {
        out.push("the broker does not accept connections".into());
    }
    for r in state.processes.iter().filter(|r| r.kind == Kind::Service) {
        let url = format!("http://127.0.0.1:{}/ready", r.port);
        match http_get(&url, Duration::from_secs(2)) {
            Ok(resp) if resp.status == 200 => {}
            Ok(resp) => out.push(format!("{} is not ready ({})", r.name, resp.status)),
            Err(e) => out.push(format!("{} is not ready ({e:#})", r.name)),
        }
    }
    out
}

/// Polls [`problems`] until there are none; the time it took, or the last problems.
pub fn wait_back(root: &Path, timeout: Duration) -> std::result::Result<Duration, Vec<String>> {
    let start = Instant::now();
    loop {
        let now = problems(root);
        if now.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout || crate::interrupt::requested() {
            return Err(now);
        }
        sleep(Duration::from_millis(300));
    }
}

/// The port of `store`'s master as the Sentinels name it: all that answer must agree.
pub fn master_port(store: &str) -> Result<u16> {
    let mut seen = Vec::new();
    for port in fleet::SENTINEL_PORTS {
        seen.extend(resp::sentinel_master(port, store));
    }
    seen.sort_unstable();
    seen.dedup();
    match seen.as_slice() {
        [] => Err(anyhow!("no Sentinel names a master")),
        [one] => Ok(*one),
        many => Err(anyhow!("the Sentinels disagree on the master: {many:?}")),
    }
}

fn store_back(store: &str, nodes: &[u16]) -> Result<()> {
    let master = master_port(store)?;
    let role = resp::role(master, None)?;
    if role != "master" {
        return Err(anyhow!("{master}, named master, is a {role}"));
    }
    let info = resp::info(master, None, "replication")?;
    let online = online_replicas(&info);
    for &node in nodes.iter().filter(|&&n| n != master) {
        if !online.contains(&node) {
            return Err(anyhow!("{node} is not an online replica of {master}"));
        }
        let info = resp::info(node, None, "replication")?;
        if resp::info_field(&info, "master_link_status") != Some("up") {
            return Err(anyhow!("{node}'s link to its master is not up"));
        }
    }
    Ok(())
}

/// Ports of the replicas a master's INFO replication lists as online
/// (`slave0:ip=127.0.0.1,port=6410,state=online,offset=...,lag=0`).
pub fn online_replicas(info: &str) -> Vec<u16> {
    info.lines()
        .filter(|l| l.starts_with("slave") && l.contains(':'))
        .filter_map(|l| {
            let fields = l.split_once(':')?.1;
            let get = |k: &str| {
                fields
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(k)?.strip_prefix('='))
            };
            (get("state")? == "online").then_some(())?;
            get("port")?.trim().parse().ok()
        })
        .collect()
}

fn sentinels_back() -> Result<()> {
    for port in fleet::SENTINEL_PORTS {
        for (store, _) in fleet::STORES {
            let master = resp::pairs(&resp::query(port, None, &["SENTINEL", "MASTER", store])?);
            let get = |k: &str| {
                master
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.as_str())
            };
            if get("flags") != Some("master") {
                return Err(anyhow!(
                    "Sentinel {port} flags {store}'s master {:?}",
                    get("flags")
                ));
            }
            if get("num-other-sentinels") != Some("2") {
                return Err(anyhow!(
                    "Sentinel {port} knows {:?} other Sentinels for {store}",
                    get("num-other-sentinels")
                ));
            }
            for (what, list) in [("replicas", "REPLICAS"), ("sentinels", "SENTINELS")] {
                let reply = resp::query(port, None, &["SENTINEL", list, store])?;
                let mut up = 0;
                for entry in resp::items(&reply) {
                    let pairs = resp::pairs(entry);
                    let flags = pairs
                        .iter()
                        .find(|(k, _)| k == "flags")
                        .map(|(_, v)| v.as_str())
                        .unwrap_or("");
                    if flags.contains("down") || flags.contains("disconnected") {
                        return Err(anyhow!(
                            "Sentinel {port} flags one of {store}'s {what} {flags}"
                        ));
                    }
                    up += 1;
                }
                if up < 2 {
                    return Err(anyhow!("Sentinel {port} knows {up} {what} of {store}"));
                }
            }
        }
    }
    Ok(())
}

/// The members of the saga store's `sagas:active` and `sagas:attention` sets (see
/// order/src/saga_store.rs), read on the master.
pub fn saga_sets() -> Result<(Vec<String>, Vec<String>)> {
    let master = master_port("saga")?;
    let members = |key: &str| -> Result<Vec<String>> {
        let reply = resp::query(master, None, &["SMEMBERS", key])?;
        let mut v: Vec<String> = resp::items(&reply).iter().filter_map(resp::text).collect();
        v.sort();
        Ok(v)
    };
    Ok((members("sagas:active")?, members("sagas:attention")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn online_replicas_are_read_from_info() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\n\
            slave0:ip=127.0.0.1,port=6410,state=online,offset=10,lag=0\r\n\
            slave1:ip=127.0.0.1,port=6420,state=wait_bgsave,offset=0,lag=0\r\n\
            master_replid:abc\r\n";
        assert_eq!(online_replicas(info), vec![6410]);
        assert!(online_replicas("role:master\r\nconnected_slaves:0\r\n").is_empty());
    }

    #[test]
    fn a_dead_fleet_is_not_back() {
        let dir = xtask::ScratchDir::new("chaos-health").unwrap();
        let p = problems(dir.path());
        assert_eq!(p, vec!["no fleet state file: is the fleet up?".to_string()]);
    }
}
