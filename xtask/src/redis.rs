//! A real `redis-server` process: master or replica, AOF on, bound to 127.0.0.1.
//!
//! Both [`RedisServer`] and [`crate::Sentinel`] are `redis-server` processes with a config file
//! of their own, so the common part (write config, spawn, wait until it answers, kill) lives
//! here in [`RedisProcess`].
//!
//! Config choices, all for "durable and quick to fail over on one box":
//! - `appendonly yes` + `appendfsync everysec`: the durability the design asks of masters;
//! - `save ""`: no periodic RDB snapshots competing with the AOF for the disk;
//! - `repl-diskless-sync-delay 0`: a replica's full sync starts at once instead of after the
//!   default 5 s wait for more replicas (that wait would delay every start and failover);
//! - `hash-max-ziplist-value 256` (Redis 7's `hash-max-listpack-value`, both accept the old
//!   name): a saga's record (a hash whose order lines and step logs pass the default 64
//!   bytes) stays one compact listpack, ~0.9 KB instead of a ~2 KB hashtable, which halves
//!   the saga store's memory per finished checkout and its AOF rewrites (BENCHMARKS.md);
//! - for a node of a replicated set ([`RedisServer::start_in_set`]: the fleet's stores,
//!   [`crate::SentinelSet`]) `min-replicas-to-write 1` and `min-replicas-max-lag 10`: while it
//!   is a master it refuses writes (`NOREPLICAS`) unless a replica is connected and has
//!   acknowledged within 10 s, so a master that lost its replicas cannot take writes only it
//!   holds. A replica ignores both until Sentinel promotes it. A replica's initial sync is not a
//!   write, so a master started before its replicas still lets them attach (it refuses writes
//!   until the first one is online). 10 s, not 1: replicas acknowledge once a second, and a busy
//!   two-core box must not make a healthy replica count as missing. A single node started with
//!   [`RedisServer::start`] has neither setting: it serves `RedisTarget::Direct` (development,
//!   tests), which is not durable against the loss of that node anyway;
//! - file names carry the port, so several servers may share one directory;
//! - the config file is absolute and writable, because Sentinel rewrites it on failover
//!   (`CONFIG REWRITE`), and [`RedisServer::restart`] starts from the rewritten file.

use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::OnceLock;
use std::thread::sleep;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::install::find_binary;
use crate::net::port_is_free;
use crate::proc::{self, spawn_logged, tail};
use crate::resp;

/// How long a fresh redis-server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// `min-replicas-to-write` of a node in a replicated set: a master needs one replica to write.
pub const MIN_REPLICAS_TO_WRITE: u32 = 1;
/// `min-replicas-max-lag` (seconds) of a node in a replicated set: how long a replica may stay
/// silent before its master stops counting it (replicas acknowledge once a second).
pub const MIN_REPLICAS_MAX_LAG_SECS: u32 = 10;
/// Longest hash value (bytes) a hash may hold and still be one listpack (see the module docs);
/// the same in docker-compose (`deploy/redis/redis-node.sh`) and on k8s
/// (`helm-config/redis-values.yaml`).
pub const HASH_LISTPACK_VALUE: u32 = 256;

/// A redis-server process (data node or Sentinel) started from a config file.
#[derive(Debug)]
pub(crate) struct RedisProcess {
    pub(crate) port: u16,
    pub(crate) dir: PathBuf,
    pub(crate) conf: PathBuf,
    /// The server's own log (`logfile`).
    pub(crate) log: PathBuf,
    /// stdout/stderr, where config errors go before the log file is opened.
    pub(crate) out: PathBuf,
    pub(crate) password: Option<String>,
    sentinel: bool,
    child: Option<Child>,
    pid: u32,
}

impl RedisProcess {
    /// Writes `config` (the caller's lines; `port`, `bind`, `dir` and `logfile` are added here)
    /// to `<dir>/<stem>.conf` and starts the server.
    pub(crate) fn start(
        dir: &Path,
        port: u16,
        stem: &str,
        config: &str,
        password: Option<&str>,
        sentinel: bool,
    ) -> Result<Self> {
        if !port_is_free(port) {
            bail!("port {port} is already in use");
        }
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let dir = dir.canonicalize()?;
        let conf = dir.join(format!("{stem}.conf"));
        let log = dir.join(format!("{stem}.log"));
        let out = dir.join(format!("{stem}.out"));
        let text = format!(
            "# Written by xtask. Sentinel may rewrite parts of this file.\n\
             port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\nlogfile {}\n{config}",
            dir.display(),
            log.display()
        );
        std::fs::write(&conf, text).with_context(|| format!("cannot write {}", conf.display()))?;
        let mut p = RedisProcess {
            port,
            dir,
            conf,
            log,
            out,
            password: password.map(str::to_string),
            sentinel,
            child: None,
            pid: 0,
        };
        p.spawn()?;
        Ok(p)
    }

    /// A process for the config file an earlier [`RedisProcess::start`] wrote to
    /// `<dir>/<stem>.conf` (possibly rewritten since by the server or Sentinel), not started yet:
    /// how a supervisor brings a dead node back on its own files.
    pub(crate) fn from_config(
        dir: &Path,
        port: u16,
        stem: &str,
        password: Option<&str>,
        sentinel: bool,
    ) -> Result<Self> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("no directory {}", dir.display()))?;
        let conf = dir.join(format!("{stem}.conf"));
        if !conf.is_file() {
            bail!("no config file {}", conf.display());
        }
        Ok(RedisProcess {
            port,
            log: dir.join(format!("{stem}.log")),
            out: dir.join(format!("{stem}.out")),
            conf,
            dir,
            password: password.map(str::to_string),
            sentinel,
            child: None,
            pid: 0,
        })
    }

    /// Starts the process from its config file and waits until it is the one answering PING.
    pub(crate) fn spawn(&mut self) -> Result<()> {
        let bin = find_binary("redis-server")
            .ok_or_else(|| anyhow!("redis-server not found (apt-get install redis-server)"))?;
        let mut cmd = proc::command(bin);
        cmd.arg(&self.conf).current_dir(&self.dir);
        if self.sentinel {
            cmd.arg("--sentinel");
        }
        let child = spawn_logged(&mut cmd, &self.out)?;
        self.pid = child.id();
        self.child = Some(child);
        if let Err(e) = self.wait_ready() {
            self.kill9();
            return Err(e);
        }
        Ok(())
    }

    /// Waits until the server answers PING and reports our pid (so a foreign server that happens
    /// to hold the port is not mistaken for ours).
    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "redis-server on port {} exited at start ({status})\n{}\n{}",
                        self.port,
                        tail(&self.out, 20),
                        tail(&self.log, 20)
                    );
                }
            }
            let last = match self.answering_pid() {
                Ok(pid) if pid == self.pid => return Ok(()),
                Ok(pid) => bail!("port {} is answered by another process ({pid})", self.port),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                bail!(
                    "redis-server on port {} did not answer within {} s ({last})\n{}",
                    self.port,
                    START_TIMEOUT.as_secs(),
                    tail(&self.log, 20)
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    fn answering_pid(&self) -> Result<u32> {
        let mut c = resp::connect(
            self.port,
            self.password.as_deref().filter(|_| !self.sentinel),
            Duration::from_secs(1),
        )?;
        resp::command(&mut c, &["PING"])?;
        let info = resp::text(&resp::command(&mut c, &["INFO", "server"])?).unwrap_or_default();
        resp::info_field(&info, "process_id")
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no process_id in INFO"))
    }

    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    pub(crate) fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGSTOP (`stop == true`) or SIGCONT to the process: a stalled, not dead, node.
    pub(crate) fn pause(&mut self, stop: bool) -> Result<()> {
        if !self.is_running() {
            bail!("redis-server on port {} is not running", self.port);
        }
        let sig = if stop { libc::SIGSTOP } else { libc::SIGCONT };
        if !proc::signal(self.pid, sig) {
            bail!(
                "cannot signal redis-server {} (port {})",
                self.pid,
                self.port
            );
        }
        Ok(())
    }

    /// SIGKILL (to the process group, in case an AOF-rewrite child is running) and reap.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(None)) {
                // SAFETY: the child leads its own process group (setsid in proc::command).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }

    /// Gives up ownership: the process keeps running after this value is dropped.
    pub(crate) fn disarm(&mut self) -> u32 {
        self.child = None;
        self.pid
    }

    pub(crate) fn query(&self, args: &[&str]) -> Result<redis::Value> {
        let pw = self.password.as_deref().filter(|_| !self.sentinel);
        resp::query(self.port, pw, args)
    }
}

impl Drop for RedisProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The major version of the installed redis-server (`appenddirname` exists from 7 on).
fn redis_major_version() -> u32 {
    static MAJOR: OnceLock<u32> = OnceLock::new();
    *MAJOR.get_or_init(|| {
        let out = find_binary("redis-server")
            .and_then(|b| std::process::Command::new(b).arg("--version").output().ok())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        parse_major(&out).unwrap_or(7)
    })
}

/// "Redis server v=7.0.15 sha=..." → 7.
fn parse_major(version_output: &str) -> Option<u32> {
    let v = version_output.split("v=").nth(1)?;
    v.split('.').next()?.parse().ok()
}

/// The data-node config lines for `port` (see the module docs for why each is there);
/// `in_set`: a node of a replicated set, whose master refuses writes without a replica.
fn data_config(
    port: u16,
    replica_of: Option<u16>,
    password: Option<&str>,
    major_version: u32,
    in_set: bool,
) -> String {
    let mut c = String::new();
    c.push_str("appendonly yes\nappendfsync everysec\n");
    if major_version >= 7 {
        c.push_str(&format!("appenddirname appendonlydir-{port}\n"));
    } else {
        c.push_str(&format!("appendfilename appendonly-{port}.aof\n"));
    }
    c.push_str(&format!("dbfilename dump-{port}.rdb\n"));
    c.push_str("save \"\"\nrepl-diskless-sync-delay 0\n");
    c.push_str(&format!("hash-max-ziplist-value {HASH_LISTPACK_VALUE}\n"));
    if in_set {
        c.push_str(&format!(
            "min-replicas-to-write {MIN_REPLICAS_TO_WRITE}\nmin-replicas-max-lag {MIN_REPLICAS_MAX_LAG_SECS}\n"
        ));
    }
    if let Some(master) = replica_of {
        c.push_str(&format!("replicaof 127.0.0.1 {master}\n"));
    }
    if let Some(pw) = password {
        // masterauth too: after a failover any node may have to replicate from any other.
        c.push_str(&format!("requirepass {pw}\nmasterauth {pw}\n"));
    }
    c
}

/// `config` with its `replicaof`/`slaveof` lines (the ones xtask wrote and the ones `CONFIG
/// REWRITE` wrote) replaced by one for `replica_of`, or by none: a master.
fn with_replicaof(config: &str, replica_of: Option<u16>) -> String {
    let mut out: String = config
        .lines()
        .filter(|l| {
            let first = l
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            first != "replicaof" && first != "slaveof"
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if let Some(master) = replica_of {
        out.push_str(&format!("replicaof 127.0.0.1 {master}\n"));
    }
    out
}

/// A `redis-server` data node (master or replica) that is killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    inner: RedisProcess,
}

impl RedisServer {
    /// Starts redis-server on 127.0.0.1:`port` with AOF on, files in `dir` (created if missing;
    /// may be shared with other servers), as a replica of 127.0.0.1:`replica_of` when given,
    /// with `requirepass`/`masterauth` when `password` is given. Returns once it answers PING.
    ///
    /// A master started this way takes writes with no replica at all: right for a single node
    /// (`RedisTarget::Direct`). Nodes of a replicated set use [`RedisServer::start_in_set`].
    pub fn start(
        dir: impl AsRef<Path>,
        port: u16,
        replica_of: Option<u16>,
        password: Option<&str>,
    ) -> Result<Self> {
        Self::start_with(dir.as_ref(), port, replica_of, password, false)
    }

    /// As [`RedisServer::start`], for a node of a replicated set (a Sentinel-managed master and
    /// its replicas): while it is a master it refuses writes (`NOREPLICAS`) unless at least
    /// [`MIN_REPLICAS_TO_WRITE`] replica acknowledged within [`MIN_REPLICAS_MAX_LAG_SECS`]. Start
    /// the master first, then its replicas: their sync is accepted, writes are refused until
    /// one is online.
    pub fn start_in_set(
        dir: impl AsRef<Path>,
        port: u16,
        replica_of: Option<u16>,
        password: Option<&str>,
    ) -> Result<Self> {
        Self::start_with(dir.as_ref(), port, replica_of, password, true)
    }

    /// Starts a node of a replicated set again, on the port, config file and data (AOF) an
    /// earlier [`RedisServer::start_in_set`] on `port` left in `dir`: what a supervisor does
    /// after the node died. Its `replicaof` line is set to `replica_of` first (none: it starts
    /// as a master), so a node whose set failed over meanwhile comes back as a replica of the
    /// new master instead of as a second master; every other line is kept. Returns once it
    /// answers PING.
    pub fn restart_in_set(
        dir: impl AsRef<Path>,
        port: u16,
        replica_of: Option<u16>,
        password: Option<&str>,
    ) -> Result<Self> {
        if !port_is_free(port) {
            bail!("port {port} is already in use");
        }
        let mut inner = RedisProcess::from_config(
            dir.as_ref(),
            port,
            &format!("redis-{port}"),
            password,
            false,
        )?;
        let text = std::fs::read_to_string(&inner.conf)
            .with_context(|| format!("cannot read {}", inner.conf.display()))?;
        std::fs::write(&inner.conf, with_replicaof(&text, replica_of))
            .with_context(|| format!("cannot write {}", inner.conf.display()))?;
        inner.spawn()?;
        Ok(RedisServer { inner })
    }

    fn start_with(
        dir: &Path,
        port: u16,
        replica_of: Option<u16>,
        password: Option<&str>,
        in_set: bool,
    ) -> Result<Self> {
        let config = data_config(port, replica_of, password, redis_major_version(), in_set);
        let inner = RedisProcess::start(
            dir,
            port,
            &format!("redis-{port}"),
            &config,
            password,
            false,
        )?;
        Ok(RedisServer { inner })
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// The directory holding its config, log and AOF.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Its config file (Sentinel may have rewritten it).
    pub fn conf_path(&self) -> &Path {
        &self.inner.conf
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.inner.log
    }

    /// `redis://[:password@]127.0.0.1:<port>/` for a direct client.
    pub fn url(&self) -> String {
        match &self.inner.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}/", self.inner.port),
            None => format!("redis://127.0.0.1:{}/", self.inner.port),
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.inner.is_running()
    }

    /// SIGKILL, as a crash would: no shutdown, nothing flushed beyond what AOF already holds.
    pub fn kill9(&mut self) {
        self.inner.kill9();
    }

    /// SIGSTOP: the process stays, with its connections open, but answers nothing (a stalled
    /// node, or a replica that lags without end) until [`Self::resume`].
    pub fn pause(&mut self) -> Result<()> {
        self.inner.pause(true)
    }

    /// SIGCONT after [`Self::pause`].
    pub fn resume(&mut self) -> Result<()> {
        self.inner.pause(false)
    }

    /// Starts the server again from its config file and data (after [`Self::kill9`]; a running
    /// server is killed first). Sentinel may have rewritten the config meanwhile, e.g. to make
    /// this node a replica of the promoted one.
    pub fn restart(&mut self) -> Result<()> {
        self.inner.kill9();
        self.inner.spawn()
    }

    /// Sends one command (with AUTH when the server has a password).
    pub fn command(&self, args: &[&str]) -> Result<redis::Value> {
        self.inner.query(args)
    }

    /// The current role as reported by ROLE: `master` or `slave`.
    pub fn role(&self) -> Result<String> {
        resp::role(self.inner.port, self.inner.password.as_deref())
    }

    /// For a replica: waits until its link to the master is up (initial sync done).
    pub fn wait_replica_synced(&self, timeout: Duration) -> Result<()> {
        self.wait_replication(timeout, |info| {
            if resp::info_field(info, "master_link_status") == Some("up") {
                Ok(())
            } else {
                Err("did not sync with its master".to_string())
            }
        })
    }

    /// For a master: waits until at least `n` replicas are online and count as good for
    /// `min-replicas-to-write` (a replica's link is up a moment before its master counts it).
    pub fn wait_replicas_online(&self, n: usize, timeout: Duration) -> Result<()> {
        self.wait_replication(timeout, |info| {
            let online = info
                .lines()
                .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                .count();
            let good = resp::info_field(info, "min_slaves_good_slaves")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(online);
            if online >= n && good >= n {
                Ok(())
            } else {
                Err(format!(
                    "has {online} replica(s) online ({good} good), not {n}"
                ))
            }
        })
    }

    /// Polls `INFO replication` until `ready` accepts it; fails with `ready`'s last
    /// complaint after `timeout`.
    fn wait_replication(
        &self,
        timeout: Duration,
        ready: impl Fn(&str) -> std::result::Result<(), String>,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = resp::info(
                self.inner.port,
                self.inner.password.as_deref(),
                "replication",
            )
            .unwrap_or_default();
            let why = match ready(&info) {
                Ok(()) => return Ok(()),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                bail!(
                    "redis on port {} {why} within {} s",
                    self.inner.port,
                    timeout.as_secs()
                );
            }
            sleep(Duration::from_millis(50));
        }
    }

    /// Hands the process over (it keeps running after this) and returns its pid.
    pub fn disarm(mut self) -> u32 {
        self.inner.disarm()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_parsed() {
        assert_eq!(
            parse_major("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc"),
            Some(7)
        );
        assert_eq!(parse_major("garbage"), None);
    }

    #[test]
    fn config_has_aof_replication_and_auth() {
        let c = data_config(6410, Some(6400), Some("pw"), 7, false);
        for line in [
            "appendonly yes",
            "appendfsync everysec",
            "appenddirname appendonlydir-6410",
            "dbfilename dump-6410.rdb",
            "replicaof 127.0.0.1 6400",
            "requirepass pw",
            "masterauth pw",
            "repl-diskless-sync-delay 0",
            "hash-max-ziplist-value 256",
        ] {
            assert!(c.lines().any(|l| l == line), "missing {line:?} in\n{c}");
        }
        assert!(
            !c.contains("min-replicas"),
            "a single node writes alone:\n{c}"
        );
        let c6 = data_config(6400, None, None, 6, false);
        assert!(!c6.contains("appenddirname"));
        assert!(!c6.contains("replicaof"));
        assert!(!c6.contains("requirepass"));
    }

    /// docker-compose and k8s start their Redis nodes from files of their own: they must keep
    /// hashes as compact as the local fleet does.
    #[test]
    fn compose_and_helm_keep_hashes_as_compact_as_the_fleet() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let setting = format!("hash-max-ziplist-value {HASH_LISTPACK_VALUE}");
        let compose = std::fs::read_to_string(root.join("deploy/redis/redis-node.sh")).unwrap();
        assert!(
            compose.contains(&format!("--{setting}")),
            "deploy/redis/redis-node.sh does not start redis-server with --{setting}"
        );
        let helm = std::fs::read_to_string(root.join("helm-config/redis-values.yaml")).unwrap();
        assert!(
            helm.lines().any(|l| l.trim() == setting),
            "helm-config/redis-values.yaml: commonConfiguration lacks {setting:?}"
        );
    }

    #[test]
    fn restart_config_points_at_the_current_master() {
        let conf = "port 6410\nreplicaof 127.0.0.1 6400\nappendonly yes\n\
                    # Generated by CONFIG REWRITE\nSLAVEOF 127.0.0.1 6420\n";
        let replica = with_replicaof(conf, Some(6411));
        assert_eq!(
            replica,
            "port 6410\nappendonly yes\n# Generated by CONFIG REWRITE\nreplicaof 127.0.0.1 6411\n"
        );
        let master = with_replicaof(conf, None);
        assert!(!master.to_lowercase().contains("replicaof") && !master.contains("SLAVEOF"));
        assert!(master.contains("appendonly yes"));
    }

    #[test]
    fn nodes_of_a_set_refuse_writes_without_a_replica() {
        for replica_of in [None, Some(6400)] {
            let c = data_config(6410, replica_of, None, 7, true);
            for line in ["min-replicas-to-write 1", "min-replicas-max-lag 10"] {
                assert!(c.lines().any(|l| l == line), "missing {line:?} in\n{c}");
            }
        }
    }
}
