//! Redis memory of the fleet's stores: `used_memory` from `INFO memory` on each store's
//! current master (the replicas hold the same data set). The master is whoever Sentinel says
//! it is now, since a failover may have moved it; the state file's records are the fallback
//! when no Sentinel answers.

use anyhow::{anyhow, Context, Result};
use xtask::resp;

use crate::fleet;
use crate::state::{Kind, State};

/// The port of `store`'s master now.
pub fn master_port(state: &State, store: &str) -> Result<u16> {
    if let Some(port) = fleet::SENTINEL_PORTS
        .iter()
        .find_map(|&sentinel| resp::sentinel_master(sentinel, store))
    {
        return Ok(port);
    }
    state
        .processes
        .iter()
        .filter(|r| r.kind == Kind::Redis && r.store.as_deref() == Some(store))
        .find(|r| r.current_role() == format!("{store}-redis-master"))
        .map(|r| r.port)
        .ok_or_else(|| anyhow!("no master of the {store} store found"))
}

/// `used_memory` (bytes) of `store`'s master.
pub fn used_memory(state: &State, store: &str) -> Result<u64> {
    let port = master_port(state, store)?;
    let info = resp::info(port, None, "memory")
        .with_context(|| format!("INFO memory on the {store} master (port {port})"))?;
    parse_used_memory(&info).ok_or_else(|| anyhow!("no used_memory in INFO of port {port}"))
}

pub fn parse_used_memory(info: &str) -> Option<u64> {
    resp::info_field(info, "used_memory")?.parse().ok()
}

/// `used_memory` of every store's master, in the order of `fleet::STORES`.
pub fn all_stores(state: &State) -> Result<Vec<(&'static str, u64)>> {
    fleet::STORES
        .iter()
        .map(|(store, _)| Ok((*store, used_memory(state, store)?)))
        .collect()
}

/// Bytes per `per` entities, from a growth of `delta` bytes for `n` entities.
pub fn scaled(delta: i64, n: u64, per: u64) -> i64 {
    if n == 0 {
        return 0;
    }
    (delta as f64 * per as f64 / n as f64).round() as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn used_memory_is_read_from_info() {
        let info = "# Memory\r\nused_memory:1048576\r\nused_memory_human:1.00M\r\n\
                    used_memory_rss:5000000\r\n";
        assert_eq!(parse_used_memory(info), Some(1_048_576));
        assert_eq!(parse_used_memory("# Memory\r\n"), None);
    }

    #[test]
    fn growth_scales_to_a_round_count() {
        assert_eq!(scaled(2_000_000, 20_000, 100_000), 10_000_000);
        assert_eq!(scaled(-50, 10, 100), -500);
        assert_eq!(scaled(5, 0, 100), 0);
    }

    /// Against a real redis-server: the figure is there and grows when data is written.
    #[test]
    fn a_real_server_reports_growth() {
        let dir = xtask::ScratchDir::new("bench-memory").unwrap();
        let Ok(server) = xtask::RedisServer::start(dir.path(), xtask::free_port(), None, None)
        else {
            eprintln!("no redis-server; skipping");
            return;
        };
        let read = || parse_used_memory(&resp::info(server.port(), None, "memory").unwrap());
        let before = read().unwrap();
        let value = "x".repeat(100_000);
        for i in 0..20 {
            resp::query(server.port(), None, &["SET", &format!("k{i}"), &value]).unwrap();
        }
        let after = read().unwrap();
        assert!(after >= before + 2_000_000, "{before} -> {after}");
    }
}
