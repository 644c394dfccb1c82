//! What the store-level tests share: a real redis-server of their own, stores
//! on it (each a process's pool), and the server's count of transactions.

use std::sync::Arc;
use std::time::Duration;

use common::redis_store::{RedisTarget, Store};
use xtask::{free_port, RedisServer, ScratchDir};

pub struct Fixture {
    redis: RedisServer,
    _dir: ScratchDir,
}

impl Fixture {
    pub fn start(name: &str) -> Fixture {
        let dir = ScratchDir::new(name).unwrap();
        let redis = RedisServer::start(dir.path(), free_port(), None, None).unwrap();
        Fixture { redis, _dir: dir }
    }

    /// A store on the server, with a pool of its own: what one process has.
    /// No replica here: a short WAIT keeps the tests quick.
    pub fn store(&self) -> Arc<Store> {
        let target = RedisTarget::Direct {
            url: self.redis.url(),
        };
        Arc::new(Store::new(&target, Duration::from_millis(10)).unwrap())
    }
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
