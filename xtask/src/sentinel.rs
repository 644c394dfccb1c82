//! A real Redis Sentinel (`redis-server <conf> --sentinel`) monitoring one or more masters.
//!
//! Sentinels find each other and the replicas on their own (hello messages every 2 s, INFO
//! every 10 s), so right after start a Sentinel may not yet know enough peers to reach a quorum.
//! [`Sentinel::wait_monitoring`] waits for that, so a test (or the fleet) that kills a master
//! right after start-up gets a real failover and not a silent "no quorum".

use std::path::Path;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::redis::RedisProcess;
use crate::resp;

/// The Sentinel config for the given masters (all on 127.0.0.1).
fn sentinel_config(
    monitors: &[(&str, u16)],
    quorum: u32,
    down_after_ms: u64,
    failover_timeout_ms: u64,
    auth_pass: Option<&str>,
) -> String {
    let mut c = String::new();
    for (name, port) in monitors {
        c.push_str(&format!(
            "sentinel monitor {name} 127.0.0.1 {port} {quorum}\n\
             sentinel down-after-milliseconds {name} {down_after_ms}\n\
             sentinel failover-timeout {name} {failover_timeout_ms}\n\
             sentinel parallel-syncs {name} 1\n"
        ));
        if let Some(pw) = auth_pass {
            c.push_str(&format!("sentinel auth-pass {name} {pw}\n"));
        }
    }
    c
}

/// A Sentinel process, killed when dropped.
#[derive(Debug)]
pub struct Sentinel {
    inner: RedisProcess,
}

impl Sentinel {
    /// Starts a Sentinel on 127.0.0.1:`port` with files in `dir`, monitoring each
    /// `(master_name, master_port)` with the given quorum and timings. Returns once it answers.
    pub fn start(
        dir: impl AsRef<Path>,
        port: u16,
        monitors: &[(&str, u16)],
        quorum: u32,
        down_after_ms: u64,
        failover_timeout_ms: u64,
    ) -> Result<Self> {
        Self::start_with_auth(
            dir,
            port,
            monitors,
            quorum,
            down_after_ms,
            failover_timeout_ms,
            None,
        )
    }

    /// As [`Sentinel::start`], for masters protected by `requirepass` (`auth_pass`).
    pub fn start_with_auth(
        dir: impl AsRef<Path>,
        port: u16,
        monitors: &[(&str, u16)],
        quorum: u32,
        down_after_ms: u64,
        failover_timeout_ms: u64,
        auth_pass: Option<&str>,
    ) -> Result<Self> {
        let config = sentinel_config(
            monitors,
            quorum,
            down_after_ms,
            failover_timeout_ms,
            auth_pass,
        );
        let inner = RedisProcess::start(
            dir.as_ref(),
            port,
            &format!("sentinel-{port}"),
            &config,
            auth_pass,
            true,
        )?;
        Ok(Sentinel { inner })
    }

    /// Starts a Sentinel again from the config file an earlier [`Sentinel::start`] on `port`
    /// left in `dir`, as Sentinel rewrote it (its id, the current masters, the replicas and
    /// Sentinels it knows, the epochs): what a supervisor does after it died. Returns once it
    /// answers.
    pub fn restart_from_config(dir: impl AsRef<Path>, port: u16) -> Result<Self> {
        if !crate::port_is_free(port) {
            bail!("port {port} is already in use");
        }
        let mut inner =
            RedisProcess::from_config(dir.as_ref(), port, &format!("sentinel-{port}"), None, true)?;
        inner.spawn()?;
        Ok(Sentinel { inner })
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// `127.0.0.1:<port>`, as the services' `REDIS_SENTINELS` lists it.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.inner.port)
    }

    /// The Sentinel's log file.
    pub fn log_path(&self) -> &Path {
        &self.inner.log
    }

    /// The port of the current master of `name`, as this Sentinel sees it.
    pub fn master_port(&self, name: &str) -> Result<Option<u16>> {
        let r = self
            .inner
            .query(&["SENTINEL", "get-master-addr-by-name", name])?;
        Ok(resp::master_addr_port(&r))
    }

    /// `SENTINEL MASTER <name>` as field/value pairs (flags, num-slaves, num-other-sentinels...).
    pub fn master_info(&self, name: &str) -> Result<Vec<(String, String)>> {
        Ok(resp::pairs(
            &self.inner.query(&["SENTINEL", "MASTER", name])?,
        ))
    }

    /// Waits until, for every master in `masters`, this Sentinel knows at least `replicas`
    /// replicas and `other_sentinels` other Sentinels, and does not consider the master down.
    pub fn wait_monitoring(
        &self,
        masters: &[&str],
        replicas: usize,
        other_sentinels: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut missing = Vec::new();
            for name in masters {
                let info = self.master_info(name).unwrap_or_default();
                let get = |k: &str| {
                    info.iter()
                        .find(|(f, _)| f == k)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default()
                };
                let n_replicas: usize = get("num-slaves").parse().unwrap_or(0);
                let n_sentinels: usize = get("num-other-sentinels").parse().unwrap_or(0);
                let flags = get("flags");
                if n_replicas < replicas || n_sentinels < other_sentinels || flags != "master" {
                    missing.push(format!(
                        "{name} (replicas {n_replicas}, other sentinels {n_sentinels}, flags {flags:?})"
                    ));
                }
            }
            if missing.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "sentinel on port {} not ready within {} s: {}",
                    self.inner.port,
                    timeout.as_secs(),
                    missing.join(", ")
                );
            }
            sleep(Duration::from_millis(200));
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.inner.is_running()
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        self.inner.kill9();
    }

    /// Starts it again from its (rewritten) config file.
    pub fn restart(&mut self) -> Result<()> {
        self.inner.kill9();
        self.inner.spawn()
    }

    /// Hands the process over (it keeps running after this) and returns its pid.
    pub fn disarm(mut self) -> u32 {
        self.inner.disarm()
    }
}

/// A master, two replicas (synced) and three Sentinels (quorum 2, down-after 1000 ms,
/// failover-timeout 3000 ms) that all monitor it: a store as the fleet runs it, in which one
/// lost node still leaves a master and a replica. Every node is started with
/// [`crate::RedisServer::start_in_set`], so a master with no replica refuses writes.
#[derive(Debug)]
pub struct SentinelSet {
    pub master: crate::RedisServer,
    /// The two replicas; Sentinel promotes one of them when the master dies.
    pub replicas: Vec<crate::RedisServer>,
    pub sentinels: Vec<Sentinel>,
}

/// Replicas of a [`SentinelSet`]'s master.
pub const SET_REPLICAS: usize = 2;

impl SentinelSet {
    /// Starts the set under `dir` as master `name`; returns once every Sentinel
    /// knows both replicas and the other two Sentinels.
    pub fn start(dir: &Path, name: &str, timeout: Duration) -> Result<Self> {
        let master = crate::RedisServer::start_in_set(dir, crate::free_port(), None, None)?;
        let replicas = (0..SET_REPLICAS)
            .map(|_| {
                crate::RedisServer::start_in_set(dir, crate::free_port(), Some(master.port()), None)
            })
            .collect::<Result<Vec<_>>>()?;
        for replica in &replicas {
            replica.wait_replica_synced(timeout)?;
        }
        master.wait_replicas_online(SET_REPLICAS, timeout)?;
        let sentinels = (0..3)
            .map(|_| {
                Sentinel::start(
                    dir,
                    crate::free_port(),
                    &[(name, master.port())],
                    2,
                    1000,
                    3000,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        for s in &sentinels {
            s.wait_monitoring(&[name], SET_REPLICAS, 2, timeout)?;
        }
        Ok(SentinelSet {
            master,
            replicas,
            sentinels,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_monitors_every_master() {
        let c = sentinel_config(
            &[("order", 6400), ("saga", 6403)],
            2,
            1000,
            3000,
            Some("pw"),
        );
        for line in [
            "sentinel monitor order 127.0.0.1 6400 2",
            "sentinel down-after-milliseconds order 1000",
            "sentinel failover-timeout order 3000",
            "sentinel monitor saga 127.0.0.1 6403 2",
            "sentinel auth-pass saga pw",
        ] {
            assert!(c.lines().any(|l| l == line), "missing {line:?}");
        }
    }
}
