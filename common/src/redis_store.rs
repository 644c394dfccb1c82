//! Sentinel-aware Redis access: a pool of dedicated connections to the current
//! master, optimistic transactions, and durable acknowledgement.
//!
//! Why a pool and not one multiplexed connection: `WATCH` belongs to a
//! connection, so every read-check-write needs a connection nobody else uses
//! while it runs. Why not redis-rs' `ConnectionManager`: it keeps the address
//! it first resolved and never follows a Sentinel failover. Here every new
//! connection asks the Sentinels for the master, and a connection that failed
//! (I/O error, `READONLY` from a demoted master, a Sentinel that has no master
//! yet) is thrown away instead of going back to the pool, so the retry resolves
//! the master again.
//!
//! Every write that will be acknowledged to a client is followed by `WAIT 1`,
//! so a failover cannot drop it. When no replica answers, the write goes on
//! (availability first), a warning is logged and
//! `redis_wait_without_replica_total` counts it; further writes skip the wait
//! for a second so that a lone master does not slow every request down.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use deadpool_redis::{sentinel, Runtime};
use redis::aio::ConnectionLike;
use redis::{Cmd, Pipeline, RedisError, RedisFuture, Value};

use crate::now_ms;

/// How one store is reached.
#[derive(Debug, Clone)]
pub enum RedisTarget {
    /// A single Redis at a fixed URL (development, tests).
    Direct { url: String },
    /// A master found through the Sentinels.
    Sentinel {
        sentinels: Vec<String>,
        master_name: String,
        password: Option<String>,
        sentinel_password: Option<String>,
    },
}

impl std::fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Direct { url } => {
                // Never print a password that may be part of the URL.
                let shown = url.rsplit('@').next().unwrap_or(url);
                write!(f, "redis {shown}")
            }
            RedisTarget::Sentinel {
                sentinels,
                master_name,
                ..
            } => write!(f, "master {master_name:?} via {}", sentinels.join(",")),
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The master could not be reached within the retry budget (failover, outage).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Redis refused a command for a reason retrying does not fix.
    #[error("redis error: {0}")]
    Redis(RedisError),
    /// A stored value is not what this code writes.
    #[error("corrupt value at {key}: {reason}")]
    Corrupt { key: String, reason: String },
}

impl StoreError {
    pub fn corrupt(key: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        StoreError::Corrupt {
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}

enum Pool {
    Direct(deadpool_redis::Pool),
    Sentinel(sentinel::Pool),
}

/// A pooled connection to the current master, used by one task at a time.
pub enum Conn {
    Direct(deadpool_redis::Connection),
    Sentinel(sentinel::Connection),
}

impl Conn {
    /// Drops the connection for good instead of returning it to the pool.
    fn discard(self) {
        match self {
            Conn::Direct(c) => drop(deadpool_redis::Connection::take(c)),
            Conn::Sentinel(c) => drop(sentinel::Connection::take(c)),
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Direct(c) => c.req_packed_command(cmd),
            Conn::Sentinel(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Direct(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Sentinel(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Direct(c) => c.get_db(),
            Conn::Sentinel(c) => c.get_db(),
        }
    }
}

/// What the body of a [`Store::transact`] decided after reading the watched keys.
pub enum Tx<T> {
    /// Apply these writes atomically (they are sent inside MULTI/EXEC), then return the value.
    Commit(Pipeline, T),
    /// Write nothing and return the value (a refusal, or nothing to do).
    Abort(T),
}

/// One Redis store (a Sentinel master set, or a single Redis).
pub struct Store {
    pool: Pool,
    target: RedisTarget,
    wait_timeout: Duration,
    /// How long an operation keeps retrying through connection errors (a failover takes ~2-3 s).
    retry_budget: Duration,
    /// Until this instant (ms since the epoch) writes skip WAIT: no replica answered recently.
    skip_wait_until_ms: AtomicU64,
}

/// Records written per pipeline by [`Store::write_batch`] (`batch_init` of 100k: 100 round trips).
pub const BATCH_CHUNK: i64 = 1000;
/// Connections per store and process: enough for every in-flight transaction.
const POOL_SIZE: usize = 64;
/// A single command that takes longer than this is treated as a broken connection.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);

impl Store {
    /// Builds the pool. Connecting is lazy: nothing is contacted yet.
    pub fn new(target: &RedisTarget, wait_timeout: Duration) -> Result<Self, StoreError> {
        let pool_config = deadpool_redis::PoolConfig {
            max_size: POOL_SIZE,
            timeouts: deadpool_redis::Timeouts {
                wait: Some(Duration::from_secs(5)),
                create: Some(Duration::from_secs(2)),
                recycle: Some(Duration::from_secs(2)),
            },
            ..Default::default()
        };
        let pool = match target {
            RedisTarget::Direct { url } => {
                let mut cfg = deadpool_redis::Config::from_url(url.clone());
                cfg.pool = Some(pool_config);
                Pool::Direct(
                    cfg.create_pool(Some(Runtime::Tokio1))
                        .map_err(|e| StoreError::Unavailable(e.to_string()))?,
                )
            }
            RedisTarget::Sentinel {
                sentinels,
                master_name,
                password,
                sentinel_password,
            } => {
                let auth = sentinel_password
                    .as_ref()
                    .map(|p| format!(":{p}@"))
                    .unwrap_or_default();
                let urls: Vec<String> = sentinels
                    .iter()
                    .map(|s| format!("redis://{auth}{s}"))
                    .collect();
                let node = sentinel::SentinelNodeConnectionInfo {
                    tls_mode: None,
                    redis_connection_info: Some(deadpool_redis::RedisConnectionInfo {
                        password: password.clone(),
                        ..Default::default()
                    }),
                };
                let mut cfg = sentinel::Config::from_urls(
                    urls,
                    master_name.clone(),
                    sentinel::SentinelServerType::Master,
                )
                .with_node_connection_info(Some(node));
                cfg.pool = Some(pool_config);
                Pool::Sentinel(
                    cfg.create_pool(Some(Runtime::Tokio1))
                        .map_err(|e| StoreError::Unavailable(e.to_string()))?,
                )
            }
        };
        Ok(Self {
            pool,
            target: target.clone(),
            wait_timeout,
            retry_budget: Duration::from_secs(15),
            skip_wait_until_ms: AtomicU64::new(0),
        })
    }

    pub fn target(&self) -> &RedisTarget {
        &self.target
    }

    async fn connection(&self) -> Result<Conn, String> {
        match &self.pool {
            Pool::Direct(p) => p.get().await.map(Conn::Direct).map_err(|e| e.to_string()),
            Pool::Sentinel(p) => p.get().await.map(Conn::Sentinel).map_err(|e| e.to_string()),
        }
    }

    /// True when the master answers a PING right now (readiness).
    pub async fn ping(&self) -> bool {
        let Ok(mut conn) = self.connection().await else {
            return false;
        };
        let pong = tokio::time::timeout(
            Duration::from_secs(1),
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        matches!(pong, Ok(Ok(_)))
    }

    fn retry(&self) -> Retry<'_> {
        Retry {
            store: self,
            started: Instant::now(),
            backoff: Duration::from_millis(50),
        }
    }

    /// Runs `op` on a master connection, retrying through failovers.
    ///
    /// `op` owns the connection while it runs and hands it back with its
    /// result (a future borrowing it would not be provably `Send`). `op` must
    /// be safe to run again: every caller here is idempotent or guarded by WATCH.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = (Conn, Result<T, RedisError>)>,
    {
        let mut retry = self.retry();
        loop {
            let conn = match self.connection().await {
                Ok(conn) => conn,
                Err(e) => {
                    retry.after(e).await?;
                    continue;
                }
            };
            match tokio::time::timeout(COMMAND_TIMEOUT, op(conn)).await {
                Ok((_conn, Ok(value))) => return Ok(value),
                Ok((conn, Err(e))) => {
                    // The connection may hold a WATCH or half a reply: do not reuse it.
                    conn.discard();
                    if !is_retryable(&e) {
                        return Err(StoreError::Redis(e));
                    }
                    retry.after(e.to_string()).await?;
                }
                // The timed-out future owned the connection; dropping it closed it.
                Err(_) => retry.after("command timed out".into()).await?,
            }
        }
    }

    /// An optimistic transaction: `WATCH keys`, let `body` read and decide,
    /// then `MULTI`/`EXEC` its writes; a concurrent writer makes EXEC return nil
    /// and the whole thing runs again. Committed writes are WAITed for.
    ///
    /// `body` gets the watched connection by value and gives it back with its decision.
    pub async fn transact<T, F, Fut>(&self, keys: &[String], mut body: F) -> Result<T, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = (Conn, Result<Tx<T>, StoreError>)>,
    {
        let mut retry = self.retry();
        loop {
            let conn = match self.connection().await {
                Ok(conn) => conn,
                Err(e) => {
                    retry.after(e).await?;
                    continue;
                }
            };
            let attempt = self.attempt(conn, keys, &mut body);
            match tokio::time::timeout(COMMAND_TIMEOUT * 2, attempt).await {
                Ok(Ok(Some(value))) => return Ok(value),
                Ok(Ok(None)) => {
                    metrics::counter!("redis_watch_conflicts_total").increment(1);
                    tokio::task::yield_now().await;
                }
                Ok(Err(StoreError::Redis(e))) if is_retryable(&e) => {
                    retry.after(e.to_string()).await?
                }
                Ok(Err(e)) => return Err(e),
                Err(_) => retry.after("transaction timed out".into()).await?,
            }
        }
    }

    /// One run of a transaction; `Ok(None)` when EXEC found a watched key changed.
    async fn attempt<T, F, Fut>(
        &self,
        mut conn: Conn,
        keys: &[String],
        body: &mut F,
    ) -> Result<Option<T>, StoreError>
    where
        F: FnMut(Conn) -> Fut,
        Fut: Future<Output = (Conn, Result<Tx<T>, StoreError>)>,
    {
        if !keys.is_empty() {
            let watch = redis::cmd("WATCH")
                .arg(keys)
                .query_async::<()>(&mut conn)
                .await;
            if let Err(e) = watch {
                conn.discard();
                return Err(StoreError::Redis(e));
            }
        }
        let (mut conn, decision) = body(conn).await;
        let result = async {
            match decision {
                Err(e) => {
                    redis::cmd("UNWATCH").query_async::<()>(&mut conn).await?;
                    Ok(Err(e))
                }
                Ok(Tx::Abort(value)) => {
                    redis::cmd("UNWATCH").query_async::<()>(&mut conn).await?;
                    Ok(Ok(Some(value)))
                }
                Ok(Tx::Commit(mut writes, value)) => {
                    let done: Option<Value> = writes.atomic().query_async(&mut conn).await?;
                    if done.is_none() {
                        return Ok(Ok(None));
                    }
                    self.wait_for_replica(&mut conn).await;
                    Ok(Ok(Some(value)))
                }
            }
        }
        .await;
        match result {
            Ok(outcome) => {
                if outcome.is_err() {
                    conn.discard();
                }
                outcome
            }
            Err(e) => {
                conn.discard();
                Err(StoreError::Redis(e))
            }
        }
    }

    /// Writes that need no read first (creation, batch loads): sent as one
    /// atomic pipeline, retried through failovers, then WAITed for.
    pub async fn write(&self, writes: &Pipeline) -> Result<(), StoreError> {
        self.run(|mut conn| async move {
            let mut atomic = writes.clone();
            let result = atomic.atomic().query_async::<()>(&mut conn).await;
            if result.is_ok() {
                self.wait_for_replica(&mut conn).await;
            }
            (conn, result)
        })
        .await
    }

    /// Writes `n` records in pipelines of [`BATCH_CHUNK`]; `fill` adds record `i`'s writes.
    /// Each chunk is atomic and WAITed for; a failure stops at the chunk that failed.
    pub async fn write_batch(
        &self,
        n: i64,
        mut fill: impl FnMut(&mut Pipeline, i64),
    ) -> Result<(), StoreError> {
        let mut start = 0;
        while start < n {
            let end = (start + BATCH_CHUNK).min(n);
            let mut writes = redis::pipe();
            for i in start..end {
                fill(&mut writes, i);
            }
            self.write(&writes).await?;
            start = end;
        }
        Ok(())
    }

    /// Sends `cmd` and returns its typed reply, retried through failovers (reads, idempotent writes).
    pub async fn query<T: redis::FromRedisValue>(&self, cmd: &Cmd) -> Result<T, StoreError> {
        self.run(|mut conn| async move {
            let result = cmd.query_async::<T>(&mut conn).await;
            (conn, result)
        })
        .await
    }

    /// `WAIT 1 <timeout>` after an acknowledged write; see the module comment.
    pub async fn wait_for_replica(&self, conn: &mut Conn) {
        let now = now_ms();
        if now < self.skip_wait_until_ms.load(Ordering::Relaxed) {
            metrics::counter!("redis_wait_without_replica_total").increment(1);
            return;
        }
        let acked: Result<i64, _> = redis::cmd("WAIT")
            .arg(1)
            .arg(self.wait_timeout.as_millis() as u64)
            .query_async(conn)
            .await;
        if !matches!(acked, Ok(n) if n >= 1) {
            metrics::counter!("redis_wait_without_replica_total").increment(1);
            tracing::warn!(store = %self.target, "no replica acknowledged a write; continuing without one for 1 s");
            self.skip_wait_until_ms.store(now + 1000, Ordering::Relaxed);
        }
    }
}

/// Backoff and budget of one operation's retries through connection failures.
struct Retry<'a> {
    store: &'a Store,
    started: Instant,
    backoff: Duration,
}

impl Retry<'_> {
    /// Sleeps before the next try, or gives up once the budget is spent.
    async fn after(&mut self, error: String) -> Result<(), StoreError> {
        if self.started.elapsed() >= self.store.retry_budget {
            return Err(StoreError::Unavailable(format!(
                "{}: {error}",
                self.store.target
            )));
        }
        metrics::counter!("redis_retries_total").increment(1);
        tracing::warn!(store = %self.store.target, %error, "redis operation failed, retrying");
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_millis(500));
        Ok(())
    }
}

/// Errors a retry on a freshly resolved master can cure.
pub fn is_retryable(e: &RedisError) -> bool {
    use redis::ErrorKind;
    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() {
        return true;
    }
    if matches!(
        e.kind(),
        ErrorKind::MasterNameNotFoundBySentinel
            | ErrorKind::NoValidReplicasFoundBySentinel
            | ErrorKind::EmptySentinelList
            | ErrorKind::Io
    ) {
        return true;
    }
    matches!(
        e.code(),
        Some("READONLY" | "LOADING" | "TRYAGAIN" | "MASTERDOWN" | "EXECABORT" | "NOREPLICAS")
    )
}
