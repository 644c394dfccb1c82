//! What the store-level tests share: a real redis-server of their own, stores
//! on it (each a process's pool), and the server's count of transactions.

use std::sync::Arc;
use std::time::Duration;

use common::redis_store::{RedisTarget, Store};
use xtask::{free_port, FaultProxy, RedisServer, ScratchDir};

pub struct Fixture {
    redis: RedisServer,
    _dir: ScratchDir,
}

// Each test binary compiles this module; not every one uses every part.
#[allow(dead_code)]
impl Fixture {
    pub fn start(name: &str) -> Fixture {
        let dir = ScratchDir::new(name).unwrap();
        let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
        Fixture { redis, _dir: dir }
    }

    pub fn redis(&self) -> &RedisServer {
        &self.redis
    }

    /// A store on the server, with a pool of its own: what one process has.
    /// No replica here: a short WAIT keeps the tests quick.
    pub fn store(&self) -> Arc<Store> {
        store_at(self.redis.url())
    }

    /// A fault proxy in front of the server, and a store that reaches the server
    /// through it (so a test can drop a reply the server sent).
    pub fn store_behind_proxy(&self) -> (FaultProxy, Arc<Store>) {
        let proxy = FaultProxy::start(self.redis.port()).unwrap();
        let store = store_at(format!("redis://127.0.0.1:{}/", proxy.port()));
        (proxy, store)
    }
}

fn store_at(url: String) -> Arc<Store> {
    let target = RedisTarget::Direct { url };
    Arc::new(Store::new(&target, Duration::from_millis(10)).unwrap())
}

/// How many EXECs the server has run since its statistics were last reset.
// Each test binary compiles this module; not every one counts EXECs.
#[allow(dead_code)]
pub async fn execs(store: &Store) -> u64 {
    let info: String = store
        .query(redis::cmd("INFO").arg("commandstats"))
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_exec:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}
